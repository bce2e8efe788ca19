//! The RPC handshake: before any frame, both ends of a node-to-node
//! connection prove they hold the cluster secret (mutual challenge and
//! response), so a stranger on the RPC port is disconnected before it can
//! send a single request, and a node with another secret cannot take part.
//!
//! ```text
//! dialler  → listener   "CLV1" ‖ nonce_d (32 bytes)
//! listener → dialler    "CLV1" ‖ nonce_l (32)
//! dialler  → listener   HMAC(secret, "dialler", nonce_d, nonce_l)
//! listener → dialler    HMAC(secret, "listener", nonce_d, nonce_l)
//! ```
//!
//! Fresh random nonces on both sides make every tag new: a recorded
//! handshake replayed proves nothing. The two tags differ by role, so one
//! end's answer cannot be reflected back to it. The dialler proves itself
//! first: a stranger who connects learns no tag at all (with one, it could
//! guess at a weak secret offline). What it does not do is
//! protect the frames that follow from someone who can rewrite traffic on
//! the wire: for that, the RPC port takes mutual TLS (`--tls-ca`).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::secret::Secret;

const MAGIC: &[u8; 4] = b"CLV1";
const NONCE: usize = 32;
const TAG: usize = 32;

/// How long a peer has to complete the handshake (a dialler gives up on
/// its whole dial sooner: a peer that takes this long is a stranger).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the peer does not speak CleaveDB's RPC handshake (or has no cluster secret)")]
    NotCleave,
    #[error("the peer does not hold this cluster's secret")]
    WrongSecret,
    #[error("the handshake timed out")]
    Timeout,
    #[error("the handshake failed: {0}")]
    Io(#[from] std::io::Error),
}

fn nonce() -> [u8; NONCE] {
    rand::random()
}

/// The dialling side.
pub async fn dial<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, secret: &Secret) -> Result<(), HandshakeError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, dial_inner(s, secret)).await.map_err(|_| HandshakeError::Timeout)?
}

async fn dial_inner<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, secret: &Secret) -> Result<(), HandshakeError> {
    let mine = nonce();
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&mine);
    s.write_all(&hello).await?;
    s.flush().await?;
    let mut answer = [0u8; 4 + NONCE];
    read_or(s, &mut answer, HandshakeError::NotCleave).await?;
    if &answer[..4] != MAGIC {
        return Err(HandshakeError::NotCleave);
    }
    let theirs = &answer[4..];
    s.write_all(&secret.tag(&[b"dialler", &mine, theirs])).await?;
    s.flush().await?;
    let mut tag = [0u8; TAG];
    read_or(s, &mut tag, HandshakeError::WrongSecret).await?;
    if !secret.verify(&[b"listener", &mine, theirs], &tag) {
        return Err(HandshakeError::WrongSecret);
    }
    Ok(())
}

/// The listening side.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, secret: &Secret) -> Result<(), HandshakeError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, accept_inner(s, secret)).await.map_err(|_| HandshakeError::Timeout)?
}

async fn accept_inner<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, secret: &Secret) -> Result<(), HandshakeError> {
    let mut hello = [0u8; 4 + NONCE];
    read_or(s, &mut hello, HandshakeError::NotCleave).await?;
    if &hello[..4] != MAGIC {
        return Err(HandshakeError::NotCleave);
    }
    let theirs = &hello[4..];
    let mine = nonce();
    let mut answer = MAGIC.to_vec();
    answer.extend_from_slice(&mine);
    s.write_all(&answer).await?;
    s.flush().await?;
    let mut tag = [0u8; TAG];
    read_or(s, &mut tag, HandshakeError::WrongSecret).await?;
    if !secret.verify(&[b"dialler", theirs, &mine], &tag) {
        return Err(HandshakeError::WrongSecret);
    }
    s.write_all(&secret.tag(&[b"listener", theirs, &mine])).await?;
    s.flush().await?;
    Ok(())
}

/// Reads exactly `buf.len()` bytes; a peer that closes first fails with
/// `eof` (what its leaving means at that step).
async fn read_or<S: AsyncRead + Unpin>(s: &mut S, buf: &mut [u8], eof: HandshakeError) -> Result<(), HandshakeError> {
    match s.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(eof),
        Err(e) => Err(HandshakeError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::from_bytes(s.as_bytes()).unwrap()
    }

    async fn pair(dialler: Secret, listener: Secret) -> (Result<(), HandshakeError>, Result<(), HandshakeError>) {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let d = tokio::spawn(async move { dial(&mut a, &dialler).await });
        let l = accept(&mut b, &listener).await;
        drop(b);
        (d.await.unwrap(), l)
    }

    #[tokio::test]
    async fn the_same_secret_is_accepted_both_ways() {
        let (d, l) = pair(secret("0123456789abcdef-one"), secret("0123456789abcdef-one")).await;
        assert!(d.is_ok() && l.is_ok(), "{d:?} {l:?}");
    }

    #[tokio::test]
    async fn another_secret_is_refused_on_both_sides() {
        let (d, l) = pair(secret("0123456789abcdef-one"), secret("0123456789abcdef-two")).await;
        // The listener refuses the dialler's tag and closes without one of
        // its own.
        assert!(matches!(l, Err(HandshakeError::WrongSecret)), "{l:?}");
        assert!(matches!(d, Err(HandshakeError::WrongSecret)), "{d:?}");
    }

    #[tokio::test]
    async fn a_stranger_learns_no_tag() {
        // A dialler without the secret says hello and waits: all it gets is
        // the listener's nonce, never a tag over its own.
        let (mut a, mut b) = tokio::io::duplex(1024);
        let listener = tokio::spawn(async move { accept(&mut b, &secret("0123456789abcdef-one")).await });
        let mut hello = b"CLV1".to_vec();
        hello.extend_from_slice(&[7u8; NONCE]);
        a.write_all(&hello).await.unwrap();
        let mut answer = [0u8; 4 + NONCE];
        a.read_exact(&mut answer).await.unwrap();
        a.write_all(&[0u8; TAG]).await.unwrap();
        let mut rest = Vec::new();
        a.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing after a wrong tag: {rest:?}");
        assert!(matches!(listener.await.unwrap(), Err(HandshakeError::WrongSecret)));
    }

    #[tokio::test]
    async fn strangers_and_garbage_are_refused_without_waiting_for_more() {
        let s = secret("0123456789abcdef-one");
        // Bytes that are not the handshake (an RPC frame, an HTTP request).
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n0123456789").await.unwrap();
        assert!(matches!(accept(&mut b, &s).await, Err(HandshakeError::NotCleave)));
        // A peer that says hello and leaves.
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"CLV1").await.unwrap();
        drop(a);
        assert!(matches!(accept(&mut b, &s).await, Err(HandshakeError::NotCleave)));
        // A peer that answers the challenge with a replayed or made-up tag.
        let (mut a, mut b) = tokio::io::duplex(1024);
        let mut hello = b"CLV1".to_vec();
        hello.extend_from_slice(&[7u8; NONCE]);
        a.write_all(&hello).await.unwrap();
        a.write_all(&[9u8; TAG]).await.unwrap();
        assert!(matches!(accept(&mut b, &s).await, Err(HandshakeError::WrongSecret)));
        // A listener without a secret (or not CleaveDB) that answers junk.
        let (mut a, mut b) = tokio::io::duplex(1024);
        b.write_all(&[0u8; 4 + NONCE]).await.unwrap();
        assert!(matches!(dial(&mut a, &s).await, Err(HandshakeError::NotCleave)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_dropped_after_the_timeout() {
        let (_a, mut b) = tokio::io::duplex(1024);
        let r = accept(&mut b, &secret("0123456789abcdef-one")).await;
        assert!(matches!(r, Err(HandshakeError::Timeout)), "{r:?}");
    }
}
