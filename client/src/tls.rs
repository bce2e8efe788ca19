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

/// Adds a bearer token (sent with every request, marked sensitive so it
/// is never logged) and a CA to trust instead of the system's (the client
/// then speaks HTTPS to nodes that CA signed) to `builder`. The one place
/// every HTTP client of the project gets its credentials; `Err` says what
/// is wrong with them.
pub fn with_credentials(
    builder: reqwest::ClientBuilder,
    token: Option<&str>,
    ca_pem: Option<&[u8]>,
) -> Result<reqwest::ClientBuilder, String> {
    let mut builder = builder;
    if let Some(token) = token {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a token is visible ASCII without spaces".into());
        }
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "a token is visible ASCII without spaces".to_string())?;
        value.set_sensitive(true);
        builder = builder.default_headers([(reqwest::header::AUTHORIZATION, value)].into_iter().collect());
    }
    if let Some(pem) = ca_pem {
        let certs =
            reqwest::Certificate::from_pem_bundle(pem).map_err(|e| format!("the CA certificate does not load: {e}"))?;
        if certs.is_empty() {
            return Err("the CA certificate file holds no certificate".into());
        }
        builder = builder.tls_certs_only(certs);
    }
    Ok(builder)
}
