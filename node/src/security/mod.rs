//! Who may talk to a node, and how it knows.
//!
//! Without any of these flags a node trusts its network, as it always did:
//! anyone who reaches its ports may do anything. With them:
//!
//! - **Clients** (`--tokens-file`): every HTTP request but `GET /health`
//!   carries `Authorization: Bearer <secret>`; the token's role (read <
//!   write < admin, [`tokens`]) must cover what the request does
//!   ([`policy`]). The file is re-read on SIGHUP ([`Access::reload`]).
//!   Requests a node forwards to another travel on the authenticated RPC
//!   port after the first node checked them, so a read token cannot write
//!   by going through another node.
//! - **Nodes** (`--cluster-secret-file`, [`secret`]): every RPC connection
//!   begins with a mutual challenge and response over the secret
//!   ([`handshake`]); a node joining proves it holds the secret too.
//!
//! - **Encryption** ([`tls`]): the API over HTTPS, the RPC port as mutual
//!   TLS between nodes whose certificates one CA signed.
//!
//! [`http`] is the API's middleware that applies the first.

pub mod handshake;
pub mod http;
pub mod policy;
pub mod secret;
pub mod tls;
pub mod tokens;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

pub use secret::Secret;
pub use tokens::{Role, TokenSet, TokensError};

/// Why a security file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("reading the tokens file {path}: {err}")]
    ReadTokens { path: String, err: std::io::Error },
    #[error("the tokens file {path}: {err}")]
    Tokens { path: String, err: TokensError },
    #[error(transparent)]
    Secret(#[from] secret::SecretError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// The API's access rules as they stand: the tokens (none: no
/// authentication) and the cluster secret (for joins). Shared by every
/// request; the tokens are swapped whole on reload.
#[derive(Default)]
pub struct Access {
    tokens_file: Option<PathBuf>,
    tokens: RwLock<Option<Arc<TokenSet>>>,
    secret: Option<Secret>,
}

fn read_tokens(path: &std::path::Path) -> Result<TokenSet, SecurityError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| SecurityError::ReadTokens { path: shown.clone(), err })?;
    TokenSet::parse(&text).map_err(|err| SecurityError::Tokens { path: shown, err })
}

impl Access {
    /// Loads the tokens file (if any): one that cannot be read or does not
    /// parse is an error, so a node never starts less protected than meant.
    pub fn load(tokens_file: Option<PathBuf>, secret: Option<Secret>) -> Result<Access, SecurityError> {
        let tokens = tokens_file.as_deref().map(read_tokens).transpose()?.map(Arc::new);
        if let Some(t) = &tokens {
            let names: Vec<String> = t.names().map(|(n, r)| format!("{n} ({})", r.name())).collect();
            tracing::info!(tokens = %names.join(", "), "API authentication on");
        }
        Ok(Access { tokens_file, tokens: RwLock::new(tokens), secret })
    }

    /// Re-reads the tokens file (SIGHUP). A file that no longer reads or
    /// parses is ignored, with an error in the log: the tokens in force
    /// stay as they were.
    pub fn reload(&self) {
        let Some(path) = &self.tokens_file else { return };
        match read_tokens(path) {
            Ok(t) => {
                tracing::info!(tokens = t.len(), "tokens file reloaded");
                *self.tokens.write().unwrap() = Some(Arc::new(t));
            }
            Err(e) => tracing::error!("tokens file not reloaded, the previous tokens stay in force: {e}"),
        }
    }

    /// The tokens in force; `None`: authentication is off.
    pub fn tokens(&self) -> Option<Arc<TokenSet>> {
        self.tokens.read().unwrap().clone()
    }

    /// The cluster secret, if the node has one.
    pub fn secret(&self) -> Option<&Secret> {
        self.secret.as_ref()
    }
}
