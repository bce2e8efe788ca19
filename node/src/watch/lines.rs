//! The lines of a watch's stream: changes, progress and errors, as the
//! NDJSON the API promises (`cleave_metadata::api::WatchEvent`). A
//! change's line is made once, by the first watch to emit it, and shared
//! by every other (it is the same for all but the previous value).

use cleave_metadata::api::{PrevValue, WatchEvent};

use super::changes::Change;
use super::cursor::Position;

/// A change's line of the stream (with its previous value if `prev`):
/// made by the first watch that emits the change, shared by the others.
/// `key` is the change's key as the user knows it (its bucket taken out,
/// under a hash-spread keyspace: the same for every watch).
pub fn event_line(c: &Change, prev: bool, key: &str) -> bytes::Bytes {
    c.lines.get(prev, || {
        let cursor = Position::after(c).encode();
        let prev = match (&c.prev, prev) {
            (Some((version, json)), true) => Some(PrevValue { value: raw(json), version: *version }),
            _ => None,
        };
        let (key, version) = (key.to_string(), c.version);
        line(&match &c.value {
            Some(json) => WatchEvent::Put { key, value: raw(json), version, cursor, prev },
            None => WatchEvent::Delete { key, version, cursor, prev },
        })
    })
}

/// A stored value: JSON text as the user sent it.
fn raw(json: &[u8]) -> serde_json::Value {
    serde_json::from_slice(json).unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(json).into()))
}

/// `e` as a line of the stream, newline included.
fn line(e: &WatchEvent) -> bytes::Bytes {
    let mut l = serde_json::to_vec(e).expect("a watch event encodes");
    l.push(b'\n');
    l.into()
}

pub fn progress_line(pos: &Position) -> bytes::Bytes {
    line(&WatchEvent::Progress { cursor: pos.encode() })
}

pub fn error_line(code: &str, message: &str) -> bytes::Bytes {
    line(&WatchEvent::Error { code: code.into(), message: message.into() })
}
