//! The cluster secret (`--cluster-secret-file`): what nodes prove to one
//! another before a single RPC is served, and what a joining node proves
//! to the cluster.
//!
//! Nothing derived from it ever travels but HMAC-SHA256 tags over fresh
//! nonces (the RPC handshake, [`super::handshake`]) or over a join request
//! ([`Secret::join_proof`]); the secret itself never leaves the file and
//! this process. The file must not be readable by other users: a node
//! refuses to start otherwise, as ssh refuses a private key others can read.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Fewest bytes a secret may have: shorter ones can be guessed offline
/// from one recorded handshake.
pub const MIN_SECRET_BYTES: usize = 16;

/// Why the secret file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading the cluster secret file {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("the cluster secret file {path} is readable by other users (mode {mode:o}): chmod 600 it")]
    WorldReadable { path: String, mode: u32 },
    #[error("the cluster secret in {path} has {len} bytes; at least {MIN_SECRET_BYTES} are needed")]
    TooShort { path: String, len: usize },
}

/// The cluster secret, in memory only.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

type HmacSha256 = Hmac<Sha256>;

impl Secret {
    /// Reads the secret from `path` (surrounding whitespace is not part
    /// of it), refusing a file other users may read.
    pub fn from_file(path: &Path) -> Result<Secret, SecretError> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|err| SecretError::Read { path: shown.clone(), err })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            return Err(SecretError::WorldReadable { path: shown, mode });
        }
        let bytes = std::fs::read(path).map_err(|err| SecretError::Read { path: shown.clone(), err })?;
        Secret::from_bytes(bytes.trim_ascii()).map_err(|len| SecretError::TooShort { path: shown, len })
    }

    /// A secret from its bytes; `Err(len)` when too short.
    pub fn from_bytes(bytes: &[u8]) -> Result<Secret, usize> {
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(bytes.len());
        }
        Ok(Secret(bytes.to_vec()))
    }

    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        for p in parts {
            // Length-prefixed, so that no two different lists of parts
            // make the same input.
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p);
        }
        m
    }

    /// The HMAC-SHA256 tag of `parts`.
    pub fn tag(&self, parts: &[&[u8]]) -> [u8; 32] {
        self.mac(parts).finalize().into_bytes().into()
    }

    /// Whether `tag` is the tag of `parts` (constant time).
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.mac(parts).verify_slice(tag).is_ok()
    }

    /// The proof a joining node sends with its join request's `body` at
    /// wall-clock `now_ms`, in the [`JOIN_PROOF_HEADER`] header:
    /// `<now_ms>.<hex of the tag of both>`.
    pub fn join_proof(&self, body: &[u8], now_ms: u64) -> String {
        let tag = self.tag(&[b"cleave-join", &now_ms.to_be_bytes(), body]);
        format!("{now_ms}.{}", tag.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }

    /// Whether `proof` proves `body` came from a holder of the secret,
    /// made within [`JOIN_PROOF_WINDOW_MS`] of `now_ms` (a recorded join
    /// cannot be replayed later, say once that node was removed).
    pub fn check_join_proof(&self, body: &[u8], proof: &str, now_ms: u64) -> bool {
        let Some((at, hex)) = proof.split_once('.') else { return false };
        let (Ok(at), Some(tag)) = (at.parse::<u64>(), from_hex(hex)) else { return false };
        at.abs_diff(now_ms) <= JOIN_PROOF_WINDOW_MS && self.verify(&[b"cleave-join", &at.to_be_bytes(), body], &tag)
    }
}

/// How far a join proof's time may be from the receiver's clock.
pub const JOIN_PROOF_WINDOW_MS: u64 = 120_000;

/// Header carrying a join request's proof of the cluster secret.
pub const JOIN_PROOF_HEADER: &str = "x-cleave-join-proof";

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn secret(s: &str) -> Secret {
        Secret::from_bytes(s.as_bytes()).unwrap()
    }

    #[test]
    fn the_file_must_be_private_and_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "  0123456789abcdef-cluster \n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Secret::from_file(&path).unwrap_err();
        assert!(matches!(err, SecretError::WorldReadable { mode: 0o644, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = Secret::from_file(&path).unwrap();
        assert!(s.verify(&[b"x"], &secret("0123456789abcdef-cluster").tag(&[b"x"])), "whitespace trimmed");
        std::fs::write(&path, "short\n").unwrap();
        assert!(matches!(Secret::from_file(&path), Err(SecretError::TooShort { len: 5, .. })));
        assert!(matches!(Secret::from_file(&dir.path().join("none")), Err(SecretError::Read { .. })));
        assert_eq!(format!("{s:?}"), "Secret(..)", "never printed");
    }

    #[test]
    fn tags_bind_the_secret_and_every_part() {
        let (a, b) = (secret("0123456789abcdef-a"), secret("0123456789abcdef-b"));
        let tag = a.tag(&[b"one", b"two"]);
        assert!(a.verify(&[b"one", b"two"], &tag));
        assert!(!b.verify(&[b"one", b"two"], &tag), "another secret");
        assert!(!a.verify(&[b"onet", b"wo"], &tag), "parts are not concatenated");
        assert!(!a.verify(&[b"one", b"two"], &tag[..31]), "a cut tag");
        let body = br#"{"raft_addr":"127.0.0.1:7104"}"#;
        let now = 1_700_000_000_000;
        let proof = a.join_proof(body, now);
        assert!(a.check_join_proof(body, &proof, now));
        assert!(a.check_join_proof(body, &proof, now + JOIN_PROOF_WINDOW_MS), "clocks a little apart");
        assert!(!a.check_join_proof(body, &proof, now + JOIN_PROOF_WINDOW_MS + 1), "replayed later");
        assert!(!b.check_join_proof(body, &proof, now));
        assert!(!a.check_join_proof(br#"{"raft_addr":"10.0.0.9:7104"}"#, &proof, now), "another body");
        let (_, hex) = proof.split_once('.').unwrap();
        let moved = format!("{}.{hex}", now + 1);
        assert!(!a.check_join_proof(body, &moved, now), "the time is signed too");
        for junk in ["", "zz", &"g".repeat(64), &proof[..proof.len() - 2], "\u{e9}\u{e9}", "x.y", hex] {
            assert!(!a.check_join_proof(body, junk, now), "{junk:?}");
        }
    }
}
