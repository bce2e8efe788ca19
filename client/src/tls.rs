//! The TLS crypto provider. reqwest is built on rustls without a default
//! provider, so every process that builds an HTTP client first installs
//! *ring* (the provider the nodes use too) as the default: the library
//! does it before building its own client, and the tools and tests that
//! build one of their own call [`install_provider`].

/// Installs *ring* as the process's default rustls provider, unless one
/// is installed already. Cheap and idempotent. (rustls marks ring's
/// provider deprecated for want of post-quantum key exchange, which only
/// aws-lc-rs has; aws-lc-rs would add a large C build to every build.)
#[allow(deprecated)]
pub fn install_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
