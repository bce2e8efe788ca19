//! Addresses and URLs: turning `host:port` into a base URL, and keys into
//! URL path segments and query values.
//!
//! Nodes publish their API address as `host:port` and users type either that
//! or `http://host:port`; both are normalised to one spelling
//! (`http://host:port`, no trailing slash) so the same node met twice (as a
//! seed and in the directory) is recognised as one.
//!
//! Keys are arbitrary UTF-8 and travel in the URL path, so every byte outside
//! the RFC 3986 *unreserved* set (`A-Z a-z 0-9 - . _ ~`) is percent-encoded,
//! including `/`, `?`, `#`, `%` and `+`. The same encoding is used for query
//! values (scan bounds and cursors).
//!
//! Three keys cannot be carried in a URL path at all: the empty key (no
//! segment) and the keys `.` and `..`, which URL parsers resolve as dot
//! segments even when percent-encoded. [`check_key`] refuses them up front
//! with a clear error instead of sending a request to the wrong path.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::error::{Error, Result};

/// Everything except the unreserved characters of RFC 3986.
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Normalises an API address (`host:port`, `http://host:port/`) to a base URL
/// `http://host:port`. TLS is not supported, so `https://` is refused.
pub fn base_url(addr: &str) -> Result<String> {
    base_url_with(addr, false)
}

/// Like [`base_url`]; an address without a scheme gets `https://` when
/// `https` (a cluster serving its API over TLS), `http://` otherwise.
pub fn base_url_with(addr: &str, https: bool) -> Result<String> {
    let addr = addr.trim();
    let (scheme, rest) = if let Some(rest) = addr.strip_prefix("http://") {
        ("http", rest)
    } else if let Some(rest) = addr.strip_prefix("https://") {
        ("https", rest)
    } else if addr.contains("://") {
        return Err(Error::InvalidArgument(format!("{addr}: unsupported scheme")));
    } else {
        (if https { "https" } else { "http" }, addr)
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return Err(Error::InvalidArgument(format!("{addr:?} is not a host:port address")));
    }
    let url = format!("{scheme}://{rest}");
    reqwest::Url::parse(&url).map_err(|e| Error::InvalidArgument(format!("{addr:?}: {e}")))?;
    Ok(url)
}

/// Percent-encodes `s` for use as one path segment or one query value.
pub fn encode(s: &str) -> String {
    utf8_percent_encode(s, NOT_UNRESERVED).to_string()
}

/// Refuses the keys that cannot be addressed through a URL path.
pub fn check_key(key: &str) -> Result<()> {
    match key {
        "" => Err(Error::InvalidArgument("the key must not be empty".into())),
        "." | ".." => Err(Error::InvalidArgument(format!("the key {key:?} cannot be carried in a URL path"))),
        _ => Ok(()),
    }
}

/// Path of a key: `/v1/kv/{encoded key}`.
pub fn key_path(key: &str) -> String {
    format!("/v1/kv/{}", encode(key))
}

/// Appends `?name=value&…` for the pairs whose value is present.
pub fn with_query(path: &str, pairs: &[(&str, Option<String>)]) -> String {
    let mut out = path.to_owned();
    let mut sep = '?';
    for (name, value) in pairs {
        if let Some(value) = value {
            out.push(sep);
            out.push_str(name);
            out.push('=');
            out.push_str(&encode(value));
            sep = '&';
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_normalised() {
        assert_eq!(base_url("127.0.0.1:7001").unwrap(), "http://127.0.0.1:7001");
        assert_eq!(base_url(" http://localhost:7001/ ").unwrap(), "http://localhost:7001");
        assert_eq!(base_url("[::1]:7001").unwrap(), "http://[::1]:7001");
        assert_eq!(base_url("https://a:1").unwrap(), "https://a:1");
        assert_eq!(base_url_with("a:1", true).unwrap(), "https://a:1");
        assert_eq!(base_url_with("http://a:1", true).unwrap(), "http://a:1", "a scheme given is kept");
        assert!(base_url("ftp://a:1").is_err());
        assert!(base_url("").is_err());
        assert!(base_url("a:1/v1").is_err());
    }

    #[test]
    fn keys_encode_everything_but_unreserved() {
        assert_eq!(encode("abc-._~XYZ019"), "abc-._~XYZ019");
        assert_eq!(encode("a/b"), "a%2Fb");
        assert_eq!(encode("a b+c%d?e#f&g=h"), "a%20b%2Bc%25d%3Fe%23f%26g%3Dh");
        assert_eq!(encode("é"), "%C3%A9");
        assert_eq!(encode(".."), "..");
        assert_eq!(key_path("user/1"), "/v1/kv/user%2F1");
    }

    #[test]
    fn dot_segments_and_the_empty_key_are_refused() {
        assert!(check_key("").is_err());
        assert!(check_key(".").is_err());
        assert!(check_key("..").is_err());
        assert!(check_key("...").is_ok());
        assert!(check_key("a/..").is_ok());
        // what the URL parser would do to them, encoded or not
        for k in [".", ".."] {
            let url = reqwest::Url::parse(&format!("http://h{}", key_path(k))).unwrap();
            assert_ne!(url.path(), key_path(k));
        }
        let url = reqwest::Url::parse(&format!("http://h{}", key_path("a/../b"))).unwrap();
        assert_eq!(url.path(), "/v1/kv/a%2F..%2Fb");
    }

    #[test]
    fn query_skips_absent_values() {
        assert_eq!(with_query("/v1/kv", &[]), "/v1/kv");
        assert_eq!(
            with_query("/v1/kv", &[("start", Some("a b".into())), ("end", None), ("limit", Some("10".into()))]),
            "/v1/kv?start=a%20b&limit=10"
        );
    }
}
