//! TLS with rustls: the API over HTTPS (`--tls-cert`, `--tls-key`) and
//! mutual TLS on the RPC port (`--tls-ca`: each node presents its own
//! certificate, and accepts only peers whose certificate the CA signed).
//!
//! The PEM files are read at start (a file that does not load stops the
//! node) and again on SIGHUP ([`Tls::reload`]: certificates rotate without
//! a restart; a set that no longer loads is ignored with an error in the
//! log). Every new connection takes the configuration in force; open ones
//! keep theirs. The crypto is *ring*'s, the same on both ends.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {err}")]
    File { what: &'static str, path: String, err: String },
    #[error("{0}")]
    Config(String),
}

/// Where the PEM files are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This node's certificate chain and its private key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signs every node's certificate: mutual TLS on the RPC port.
    pub ca: Option<PathBuf>,
}

/// The configurations built from one reading of the files.
struct Configs {
    http: Arc<ServerConfig>,
    rpc: Option<(Arc<ServerConfig>, Arc<ClientConfig>)>,
}

/// TLS of a node, reloadable.
pub struct Tls {
    files: TlsFiles,
    configs: RwLock<Arc<Configs>>,
}

/// *ring*'s provider. (rustls marks it deprecated for want of post-quantum
/// key exchange, which only aws-lc-rs has; aws-lc-rs would add a large C
/// build to every build of the project.)
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes *ring* the process's default provider (for clients, such as the
/// join request's, that take the default). Idempotent.
pub fn install_default_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = Arc::try_unwrap(provider()).map(|p| p.install_default());
    }
}

fn file_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(String) -> TlsError + 'a {
    move |err| TlsError::File { what, path: path.display().to_string(), err }
}

/// The certificates of a PEM file (at least one).
pub fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(what, path)(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(what, path)(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(what, path)("no certificate in the file".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err("the private key", path)(e.to_string()))
}

/// A root store of the CA file's certificates.
pub fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs("the CA certificate", path)? {
        roots.add(cert).map_err(|e| file_err("the CA certificate", path)(e.to_string()))?;
    }
    Ok(roots)
}

fn config_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(format!("TLS configuration: {e}"))
}

fn build(files: &TlsFiles) -> Result<Configs, TlsError> {
    let certs = load_certs("the certificate", &files.cert)?;
    let key = load_key(&files.key)?;
    let http = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_no_client_auth()
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(|e| TlsError::Config(format!("the certificate and the key do not go together: {e}")))?;
    let rpc = match &files.ca {
        None => None,
        Some(ca) => {
            let roots = Arc::new(roots(ca)?);
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(config_err)?;
            let server = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(config_err)?
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs.clone(), key.clone_key())
                .map_err(config_err)?;
            let client = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(config_err)?
                .with_root_certificates(roots)
                .with_client_auth_cert(certs, key)
                .map_err(config_err)?;
            Some((Arc::new(server), Arc::new(client)))
        }
    };
    Ok(Configs { http: Arc::new(http), rpc })
}

impl Tls {
    /// Loads the files; any that does not load is an error.
    pub fn load(files: TlsFiles) -> Result<Tls, TlsError> {
        let configs = build(&files)?;
        Ok(Tls { files, configs: RwLock::new(Arc::new(configs)) })
    }

    /// Reads the files again (SIGHUP); on failure the configuration in
    /// force stays, with an error in the log.
    pub fn reload(&self) {
        match build(&self.files) {
            Ok(c) => {
                *self.configs.write().unwrap() = Arc::new(c);
                tracing::info!("TLS certificates reloaded");
            }
            Err(e) => tracing::error!("TLS certificates not reloaded, the previous ones stay in force: {e}"),
        }
    }

    fn current(&self) -> Arc<Configs> {
        self.configs.read().unwrap().clone()
    }

    /// For the API's next connection.
    pub fn http_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current().http.clone())
    }

    /// For the RPC port's next connection (`None`: no mutual TLS).
    pub fn rpc_acceptor(&self) -> Option<TlsAcceptor> {
        self.current().rpc.as_ref().map(|(s, _)| TlsAcceptor::from(s.clone()))
    }

    /// For the next RPC connection this node dials (`None`: no mutual TLS).
    pub fn rpc_connector(&self) -> Option<TlsConnector> {
        self.current().rpc.as_ref().map(|(_, c)| TlsConnector::from(c.clone()))
    }

    /// Whether the RPC port is mutual TLS.
    pub fn mutual(&self) -> bool {
        self.files.ca.is_some()
    }
}

/// The name a peer's certificate must hold, from its `host:port` address.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    ServerName::try_from(host.to_string()).map_err(|e| TlsError::Config(format!("{addr}: not a host name: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_names_come_from_their_addresses() {
        assert!(matches!(server_name("127.0.0.1:7101").unwrap(), ServerName::IpAddress(_)));
        assert!(matches!(server_name("[::1]:7101").unwrap(), ServerName::IpAddress(_)));
        assert!(matches!(server_name("node-1.example:7101").unwrap(), ServerName::DnsName(_)));
        assert!(server_name("bad name:1").is_err());
    }

    #[test]
    fn files_that_do_not_load_are_refused_with_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let files = TlsFiles { cert: junk.clone(), key: junk.clone(), ca: None };
        let err = Tls::load(files).err().expect("refused");
        assert!(err.to_string().contains("junk.pem"), "{err}");
        let missing = TlsFiles { cert: dir.path().join("none.pem"), key: junk, ca: None };
        let err = Tls::load(missing).err().expect("refused");
        assert!(err.to_string().contains("none.pem"), "{err}");
    }
}
