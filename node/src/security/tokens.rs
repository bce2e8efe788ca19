//! Bearer tokens and their roles: the `--tokens-file` a node checks every
//! HTTP request against.
//!
//! The file is TOML, one `[[token]]` table per token:
//!
//! ```toml
//! [[token]]
//! name = "app"       # shows in logs and metrics, never the secret
//! secret = "..."     # what clients send: `Authorization: Bearer <secret>`
//! role = "write"     # read < write < admin
//! ```
//!
//! Only a SHA-256 digest of each secret is kept in memory, and a presented
//! secret is compared with every token's digest in constant time: how long
//! the check takes says nothing of how much of a secret was right, nor of
//! which token matched. Pure: parsing and checking, no I/O.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a token may do. Ordered: each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: get, scan (and watch).
    Read,
    /// Reads and writes: put, delete (and transactions).
    Write,
    /// Everything: `/admin/*` and `/metrics` too.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }
}

/// One known token: its name and role, and the digest of its secret.
#[derive(Debug, Clone)]
pub struct Token {
    pub name: String,
    pub role: Role,
    digest: [u8; 32],
}

/// Why a tokens file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokensError {
    #[error("the tokens file does not parse: {0}")]
    Parse(String),
    #[error("the tokens file holds no [[token]]: nobody could use the API")]
    Empty,
    #[error("token {index}: {what}")]
    Invalid { index: usize, what: String },
    #[error("tokens {first:?} and {second:?} have the same secret: a request could not tell them apart")]
    DuplicateSecret { first: String, second: String },
    #[error("two tokens are named {0:?}: names tell them apart in logs and metrics")]
    DuplicateName(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    token: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    secret: String,
    role: Role,
}

/// A parse error's message, with its line, never quoting a value: toml
/// quotes the offending value in some messages ("invalid type: integer
/// `…`"), and that value may be a secret written without its quotes.
fn describe(text: &str, e: &toml::de::Error) -> String {
    let mut msg = String::new();
    let mut quoted = false;
    // (Other messages quote only names: an unknown role or field.)
    let redact = e.message().starts_with("invalid");
    for c in e.message().chars() {
        if !redact {
            msg.push(c);
            continue;
        }
        match c {
            '`' if !quoted => (quoted, msg) = (true, msg + "`"),
            '`' => (quoted, msg) = (false, msg + "…`"),
            c if !quoted => msg.push(c),
            _ => {}
        }
    }
    match e.span() {
        Some(span) => format!("line {}: {msg}", text[..span.start.min(text.len())].matches('\n').count() + 1),
        None => msg,
    }
}

/// The tokens a node knows.
#[derive(Debug, Clone, Default)]
pub struct TokenSet {
    tokens: Vec<Token>,
}

fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Whether `s` can travel in an `Authorization: Bearer` header as is:
/// visible ASCII, no spaces.
fn sendable(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

impl TokenSet {
    /// Parses and checks a tokens file's text.
    pub fn parse(text: &str) -> Result<TokenSet, TokensError> {
        let file: File = toml::from_str(text).map_err(|e| TokensError::Parse(describe(text, &e)))?;
        if file.token.is_empty() {
            return Err(TokensError::Empty);
        }
        let mut tokens: Vec<Token> = Vec::with_capacity(file.token.len());
        for (i, e) in file.token.into_iter().enumerate() {
            let invalid = |what: &str| TokensError::Invalid { index: i + 1, what: what.to_string() };
            if e.name.trim().is_empty() || e.name.len() > 128 || e.name.chars().any(char::is_control) {
                return Err(invalid("a name must be 1 to 128 printable characters"));
            }
            if !sendable(&e.secret) {
                return Err(invalid("a secret must be visible ASCII without spaces (it travels in an HTTP header)"));
            }
            if e.secret.len() > 4096 {
                return Err(invalid("a secret may have at most 4096 characters"));
            }
            let token = Token { name: e.name, role: e.role, digest: digest(e.secret.as_bytes()) };
            if let Some(other) = tokens.iter().find(|t| t.digest == token.digest) {
                return Err(TokensError::DuplicateSecret { first: other.name.clone(), second: token.name });
            }
            if tokens.iter().any(|t| t.name == token.name) {
                return Err(TokensError::DuplicateName(token.name));
            }
            tokens.push(token);
        }
        Ok(TokenSet { tokens })
    }

    /// The token whose secret is `presented`, if any. Every token is
    /// compared, each in constant time.
    pub fn authenticate(&self, presented: &[u8]) -> Option<&Token> {
        let d = digest(presented);
        let mut found = None;
        for t in &self.tokens {
            if bool::from(t.digest.ct_eq(&d)) {
                found = Some(t);
            }
        }
        found
    }

    /// The tokens' names and roles (for the log at start and reload).
    pub fn names(&self) -> impl Iterator<Item = (&str, Role)> {
        self.tokens.iter().map(|t| (t.name.as_str(), t.role))
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[token]]
name = "reader"
secret = "r-0123456789abcdef"
role = "read"

[[token]]
name = "app"
secret = "w-0123456789abcdef"
role = "write"

[[token]]
name = "ops"
secret = "a-0123456789abcdef"
role = "admin"
"#;

    #[test]
    fn each_secret_finds_its_token_and_role() {
        let set = TokenSet::parse(FILE).unwrap();
        assert_eq!(set.len(), 3);
        let who = |s: &str| set.authenticate(s.as_bytes()).map(|t| (t.name.clone(), t.role));
        assert_eq!(who("r-0123456789abcdef"), Some(("reader".into(), Role::Read)));
        assert_eq!(who("w-0123456789abcdef"), Some(("app".into(), Role::Write)));
        assert_eq!(who("a-0123456789abcdef"), Some(("ops".into(), Role::Admin)));
        for wrong in ["", "r-0123456789abcde", "r-0123456789abcdefX", "R-0123456789ABCDEF", "reader", "\0\0"] {
            assert_eq!(who(wrong), None, "{wrong:?}");
        }
        assert!(Role::Read < Role::Write && Role::Write < Role::Admin, "roles include the lower ones");
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let one = |name: &str, secret: &str, role: &str| {
            format!("[[token]]\nname = {name:?}\nsecret = {secret:?}\nrole = {role:?}\n")
        };
        let err = |text: &str| TokensError::parse_err(text);
        assert!(matches!(err("not toml at all ["), TokensError::Parse(_)));
        assert_eq!(err(""), TokensError::Empty);
        assert!(matches!(err(&one("x", "s3cret", "root")), TokensError::Parse(m) if m.contains("unknown variant")));
        assert!(matches!(err(&format!("{}extra = 1\n", one("x", "s", "read"))), TokensError::Parse(_)));
        assert!(
            matches!(err("[[token]]\nname = \"x\"\nrole = \"read\"\n"), TokensError::Parse(m) if m.contains("secret"))
        );
        assert!(matches!(err(&one("x", "with space", "read")), TokensError::Invalid { index: 1, .. }));
        assert!(matches!(err(&one("x", "", "read")), TokensError::Invalid { index: 1, .. }));
        assert!(matches!(err(&one("x", "caf\u{e9}", "read")), TokensError::Invalid { index: 1, .. }));
        assert!(matches!(err(&one("", "s", "read")), TokensError::Invalid { index: 1, .. }));
        assert!(matches!(err(&one("x", &"s".repeat(5000), "read")), TokensError::Invalid { .. }));
        let dup_secret = format!("{}{}", one("a", "same", "read"), one("b", "same", "admin"));
        assert_eq!(err(&dup_secret), TokensError::DuplicateSecret { first: "a".into(), second: "b".into() });
        // A secret written without quotes is never quoted back.
        let unquoted = "[[token]]\nname = \"x\"\nsecret = 123456789012345678\nrole = \"read\"\n";
        match err(unquoted) {
            TokensError::Parse(m) => {
                assert!(!m.contains("123456789012345678"), "{m}");
                assert!(m.starts_with("line 3"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        let dup_name = format!("{}{}", one("a", "one", "read"), one("a", "two", "admin"));
        assert_eq!(err(&dup_name), TokensError::DuplicateName("a".into()));
    }

    impl TokensError {
        fn parse_err(text: &str) -> TokensError {
            TokenSet::parse(text).expect_err(text)
        }
    }
}
