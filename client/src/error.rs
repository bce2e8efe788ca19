//! The client's typed errors, and how an HTTP error answer becomes one.
//!
//! The server always answers an error with an honest status and a JSON
//! [`ErrorBody`]. Callers care about a few of those answers as *values* (an
//! absent key, a lost compare-and-set race) and about the rest as failures, so
//! the common ones get their own variants and everything else is kept as
//! [`Error::Api`] with the status, code and message the server sent.
//!
//! Two variants describe what the *client* concluded after retrying:
//! [`Error::Unavailable`] means every attempt failed in a way that proves
//! nothing was applied, while [`Error::Indeterminate`] means some attempt of a
//! write may have been applied and the client cannot tell (the connection
//! dropped after the request was sent, or the server timed out). A caller that
//! needs to know must read the key back.

use cleave_metadata::api::{ErrorBody, ErrorCode, ErrorDetail};

/// Result type of every client operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a client operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key does not exist (404 `not_found`).
    #[error("key not found")]
    NotFound,

    /// A compare-and-set (`if_version`) did not match (409). `current` is the
    /// key's version now; 0 means the key is absent.
    #[error("version conflict: the key's current version is {current}")]
    VersionConflict { current: u64 },

    /// Any other error answer from the server (400, 413, 500, a 404 that is
    /// not about a key...). `code` is `None` when the body was not an
    /// [`ErrorBody`] the client understands.
    #[error("server error {status}{}: {message}", code.map(|c| format!(" ({})", code_name(c))).unwrap_or_default())]
    Api { status: u16, code: Option<ErrorCode>, message: String },

    /// Every attempt failed without anything being applied (no leader, no
    /// quorum, unreachable nodes, stale routes) until the retry budget or the
    /// deadline ran out.
    #[error("cluster unavailable after {attempts} attempt(s): {last}")]
    Unavailable { attempts: u32, last: String },

    /// A write may or may not have been applied: the request was sent but no
    /// answer came back (a timeout, a reset, a 504), or the server failed
    /// with a 5xx other than 503. A put or delete is never replayed after
    /// that (a replay would be a second write); an idempotent admin request
    /// may have been, and a later error answer is then reported as this too.
    /// Read the key to find out.
    #[error("outcome unknown, the write may or may not have been applied: {0}")]
    Indeterminate(String),

    /// A transport failure that is not a reason to retry (for example a
    /// request that could not be built).
    #[error("transport error: {}", describe(.0))]
    Transport(#[source] reqwest::Error),

    /// A successful answer whose body could not be decoded.
    #[error("cannot decode the server's answer: {0}")]
    Decode(String),

    /// The caller passed something the client refuses to send (an empty key,
    /// an endpoint it cannot parse, a value that is not JSON).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// Builds the error for a non-success answer with HTTP `status` and raw
    /// `body`. Pure: used by the client for every error answer and handy for
    /// anyone talking to the HTTP API directly.
    pub fn from_response(status: u16, body: &[u8]) -> Error {
        Error::from_detail(status, parse_error_body(body), body)
    }

    /// Like [`Error::from_response`], with the body already parsed.
    pub(crate) fn from_detail(status: u16, detail: Option<ErrorDetail>, body: &[u8]) -> Error {
        match detail {
            Some(d) if status == 404 && d.code == ErrorCode::NotFound => Error::NotFound,
            Some(d) if status == 409 && d.code == ErrorCode::VersionConflict => {
                Error::VersionConflict { current: d.version.unwrap_or(0) }
            }
            Some(d) => Error::Api { status, code: Some(d.code), message: d.message },
            None => Error::Api { status, code: None, message: body_snippet(status, body) },
        }
    }

    /// Like [`Error::from_detail`] for answers that are not about a key
    /// (admin calls): a 404 or 409 keeps the server's message (which
    /// operation or range it is about) as an [`Error::Api`].
    pub(crate) fn from_admin_detail(status: u16, detail: Option<ErrorDetail>, body: &[u8]) -> Error {
        match detail {
            Some(d) => Error::Api { status, code: Some(d.code), message: d.message },
            None => Error::Api { status, code: None, message: body_snippet(status, body) },
        }
    }

    /// The server's error code behind this error, when it came from an
    /// answer that carried one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::NotFound => Some(ErrorCode::NotFound),
            Error::VersionConflict { .. } => Some(ErrorCode::VersionConflict),
            Error::Api { code, .. } => *code,
            _ => None,
        }
    }

    /// The HTTP status behind this error, when it came from an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::NotFound => Some(404),
            Error::VersionConflict { .. } => Some(409),
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Parses an [`ErrorBody`]; `None` when the body is not one (a proxy's HTML
/// page, an empty 404 from an unknown route, an unknown error code...).
pub(crate) fn parse_error_body(body: &[u8]) -> Option<ErrorDetail> {
    serde_json::from_slice::<ErrorBody>(body).ok().map(|b| b.error)
}

/// A short description of a transport failure: what went wrong and the
/// innermost cause (reqwest's own message repeats the URL and wraps the
/// cause several times).
pub(crate) fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_connect() {
        "cannot connect"
    } else if e.is_timeout() {
        "no answer in time"
    } else {
        "request failed"
    };
    let mut root: &dyn std::error::Error = e;
    while let Some(inner) = root.source() {
        root = inner;
    }
    format!("{what} ({root})")
}

/// The snake_case wire name of a code, for messages.
fn code_name(code: ErrorCode) -> String {
    serde_json::to_value(code).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_else(|| format!("{code:?}"))
}

/// A short, printable stand-in for a body that is not an [`ErrorBody`].
fn body_snippet(status: u16, body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return format!("HTTP {status} with an empty body");
    }
    let mut cut: String = text.chars().take(MAX).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(code: ErrorCode, version: Option<u64>) -> Vec<u8> {
        let mut b = ErrorBody::new(code, "some message");
        b.error.version = version;
        serde_json::to_vec(&b).unwrap()
    }

    #[test]
    fn not_found_and_version_conflict_become_values() {
        assert!(matches!(Error::from_response(404, &body(ErrorCode::NotFound, Some(0))), Error::NotFound));
        assert!(matches!(
            Error::from_response(409, &body(ErrorCode::VersionConflict, Some(7))),
            Error::VersionConflict { current: 7 }
        ));
        // A conflict without a version reads as "absent".
        assert!(matches!(
            Error::from_response(409, &body(ErrorCode::VersionConflict, None)),
            Error::VersionConflict { current: 0 }
        ));
    }

    #[test]
    fn other_codes_keep_status_code_and_message() {
        match Error::from_response(413, &body(ErrorCode::TooLarge, None)) {
            Error::Api { status: 413, code: Some(ErrorCode::TooLarge), message } => assert_eq!(message, "some message"),
            e => panic!("unexpected {e:?}"),
        }
        let e = Error::from_response(400, &body(ErrorCode::BadRequest, None));
        assert_eq!(e.status(), Some(400));
        assert_eq!(e.to_string(), "server error 400 (bad_request): some message");
    }

    #[test]
    fn a_404_that_is_not_about_a_key_is_not_not_found() {
        // An unknown route answers 404 without an ErrorBody.
        match Error::from_response(404, b"") {
            Error::Api { status: 404, code: None, message } => assert!(message.contains("empty body")),
            e => panic!("unexpected {e:?}"),
        }
        // A 404 carrying a different code is kept as is.
        assert!(matches!(
            Error::from_response(404, &body(ErrorCode::BadRequest, None)),
            Error::Api { status: 404, code: Some(ErrorCode::BadRequest), .. }
        ));
    }

    #[test]
    fn admin_answers_keep_the_message_of_404_and_409() {
        let busy = serde_json::to_vec(&ErrorBody::new(ErrorCode::VersionConflict, "range 1 is busy")).unwrap();
        let e = Error::from_admin_detail(409, parse_error_body(&busy), &busy);
        assert_eq!(e.to_string(), "server error 409 (version_conflict): range 1 is busy");
        assert_eq!((e.status(), e.code()), (Some(409), Some(ErrorCode::VersionConflict)));
        let e = Error::from_admin_detail(404, None, b"");
        assert!(matches!(e, Error::Api { status: 404, code: None, .. }), "{e:?}");
        assert_eq!(Error::NotFound.code(), Some(ErrorCode::NotFound));
    }

    #[test]
    fn unknown_codes_and_garbage_bodies_are_kept_as_text() {
        let e = Error::from_response(418, br#"{"error":{"code":"teapot","message":"short and stout"}}"#);
        assert!(matches!(e, Error::Api { status: 418, code: None, .. }), "{e:?}");
        let long = "x".repeat(1000);
        match Error::from_response(502, long.as_bytes()) {
            Error::Api { message, .. } => assert!(message.chars().count() <= 201),
            e => panic!("unexpected {e:?}"),
        }
    }

    #[test]
    fn stale_route_body_keeps_its_ranges() {
        let mut b = ErrorBody::new(ErrorCode::StaleRoute, "moved");
        b.error.ranges = Some(vec![]);
        let d = parse_error_body(&serde_json::to_vec(&b).unwrap()).unwrap();
        assert_eq!(d.code, ErrorCode::StaleRoute);
        assert_eq!(d.ranges, Some(vec![]));
    }
}
