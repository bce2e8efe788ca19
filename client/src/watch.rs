//! [`Client::watch`](crate::Client::watch): a change stream that outlives
//! its connections.
//!
//! A task reads `GET /v1/watch` line by line and hands the events over a
//! bounded channel. When the connection breaks, the node dies, or the
//! server cuts the watcher off for reading too slowly, it connects again —
//! to the next node, after a short backoff — with the cursor of the last
//! line it passed on, so the stream goes on with nothing missed and nothing
//! twice. Only a cursor whose history is gone (`compacted`) or a request
//! the server refuses (bad range, no permission) ends it, with an error.

use std::sync::Arc;
use std::time::Duration;

use cleave_metadata::api::{ErrorCode, WatchEvent};

use crate::endpoint::with_query;
use crate::error::{Error, Result};
use crate::transport::Inner;

/// A watch connection silent this long is given up for another.
const SILENT: Duration = Duration::from_secs(5);

/// What to watch.
#[derive(Clone, Debug, Default)]
pub struct WatchRequest {
    pub start: String,
    /// Exclusive end; `None`: to the end of the key space.
    pub end: Option<String>,
    /// Resume right after this cursor; `None`: from now.
    pub cursor: Option<String>,
    /// Include each change's previous value.
    pub prev: bool,
}

/// Runs the watch until the receiver is dropped or it cannot go on.
pub(crate) async fn run(inner: Arc<Inner>, mut req: WatchRequest, tx: tokio::sync::mpsc::Sender<Result<WatchEvent>>) {
    let mut attempt = 0u32;
    loop {
        let endpoints = inner.table().candidates(None);
        let base = &endpoints[attempt as usize % endpoints.len().max(1)];
        let path = with_query(
            "/v1/watch",
            &[
                ("start", Some(req.start.clone())),
                ("end", req.end.clone()),
                ("cursor", req.cursor.clone()),
                ("prev", req.prev.then(|| "true".to_string())),
            ],
        );
        match once(&inner, base, &path, &mut req, &tx).await {
            Ended::Receiver => return,
            Ended::Fatal(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            Ended::Again { progressed } => {
                attempt = if progressed { 0 } else { attempt + 1 };
                let backoff = Duration::from_millis(50 * u64::from(attempt.min(20)));
                tokio::time::sleep(backoff).await;
                if progressed {
                    attempt = 1; // the next connection tries another node first
                }
            }
        }
    }
}

enum Ended {
    /// The consumer dropped the stream.
    Receiver,
    /// Nothing more can come.
    Fatal(Error),
    /// Connect again (`progressed`: this connection passed something on).
    Again { progressed: bool },
}

/// One connection: passes its events on, keeping the last cursor in `req`.
async fn once(
    inner: &Inner,
    base: &str,
    path: &str,
    req: &mut WatchRequest,
    tx: &tokio::sync::mpsc::Sender<Result<WatchEvent>>,
) -> Ended {
    let mut resp = match inner.http.get(format!("{base}{path}")).send().await {
        Ok(r) => r,
        Err(_) => return Ended::Again { progressed: false },
    };
    let status = resp.status().as_u16();
    if status != 200 {
        let body = resp.bytes().await.unwrap_or_default();
        let e = Error::from_response(status, &body);
        // A refusal is final (a bad range, a trimmed cursor, no
        // permission); the rest (unavailable, overloaded) is tried again.
        return match status {
            400..=499 if status != 429 => Ended::Fatal(e),
            _ => Ended::Again { progressed: false },
        };
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut progressed = false;
    loop {
        // The server sends a line at least every second: a connection
        // silent for longer is dead (a partition, a paused node) even if
        // TCP has not noticed.
        let chunk = match tokio::time::timeout(SILENT, resp.chunk()).await {
            Ok(Ok(Some(c))) => c,
            Ok(Ok(None) | Err(_)) | Err(_) => return Ended::Again { progressed },
        };
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let event: WatchEvent = match serde_json::from_slice(&line) {
                Ok(e) => e,
                Err(e) => return Ended::Fatal(Error::Decode(format!("a watch line: {e}"))),
            };
            match &event {
                WatchEvent::Error { code, message } if code == "compacted" => {
                    let code = Some(ErrorCode::Compacted);
                    return Ended::Fatal(Error::Api { status: 410, code, message: message.clone() });
                }
                // Cut off (slow), or the server gave up: resume elsewhere.
                WatchEvent::Error { .. } => return Ended::Again { progressed },
                e => {
                    let cursor = e.cursor().map(str::to_string);
                    if tx.send(Ok(event)).await.is_err() {
                        return Ended::Receiver;
                    }
                    req.cursor = cursor.or(req.cursor.take());
                    progressed = true;
                }
            }
        }
    }
}

/// The end of the keys starting with `prefix`: the prefix with its last
/// character moved to the next one (UTF-8 sorts as code points do), or
/// `None` for the whole key space (an empty prefix, or one of only the
/// last character).
pub fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (last as u32 + 1..=char::MAX as u32).find_map(char::from_u32);
        if let Some(n) = next {
            chars.push(n);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

impl WatchRequest {
    /// Every key starting with `prefix`, from now.
    pub fn prefix(prefix: &str) -> WatchRequest {
        WatchRequest { start: prefix.to_string(), end: prefix_end(prefix), ..WatchRequest::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefixs_end_follows_every_key_that_starts_with_it_and_nothing_else() {
        assert_eq!(prefix_end("user/"), Some("user0".into()));
        assert_eq!(prefix_end("aé"), Some("aê".into()));
        assert_eq!(prefix_end("a\u{d7ff}"), Some("a\u{e000}".into()), "over the surrogates");
        assert_eq!(prefix_end("a\u{10ffff}"), Some("b".into()));
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("\u{10ffff}"), None);
        let end = prefix_end("ké").unwrap();
        for key in ["ké", "ké\u{10ffff}\u{10ffff}", "ké/zzz"] {
            assert!(key.starts_with("ké") && key < end.as_str(), "{key}");
        }
        assert!("kê" >= end.as_str());
    }
}
