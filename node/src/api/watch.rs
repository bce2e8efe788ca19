//! `GET /v1/watch?start&end[&cursor][&prev=true]`: a stream of the changes
//! to a key range, one JSON object per line (`watch::stream`).

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use cleave_metadata::api::ErrorCode;
use cleave_metadata::MAX_KEY_BYTES;

use super::{ApiError, AppState};
use crate::watch::cursor::Position;
use crate::watch::stream::{self, OpenError, WatchSpec};

/// How far ahead of this node's clock a cursor may be (clock skew between
/// nodes is far less: their clocks observe each other's timestamps).
const FUTURE_MS: u64 = 60_000;

pub async fn watch(
    State(s): State<AppState>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = query.map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
    for name in p.keys() {
        if !["start", "end", "cursor", "prev"].contains(&name.as_str()) {
            return Err(ApiError::bad_request(format!("unknown parameter {name:?}: use start, end, cursor, prev")));
        }
    }
    let start = p.get("start").cloned().unwrap_or_default();
    let end = p.get("end").filter(|e| !e.is_empty()).cloned();
    if start.len() > MAX_KEY_BYTES || end.as_ref().is_some_and(|e| e.len() > MAX_KEY_BYTES) {
        return Err(ApiError::too_large(format!("watch bounds are limited to {MAX_KEY_BYTES} bytes")));
    }
    if end.as_ref().is_some_and(|e| *e <= start) {
        return Err(ApiError::bad_request("end must be after start"));
    }
    let cursor = match p.get("cursor") {
        None => None,
        Some(c) => Some(
            Position::decode(c)
                .ok_or_else(|| ApiError::bad_request(format!("cursor {c:?} is not one this cluster gave")))?,
        ),
    };
    // A cursor far ahead of this node's clock was not given by this
    // cluster (or is forged): the watch would wait silently for its time.
    let now_ms = crate::clock::wall_ms(s.node.ctx().clock.now());
    if let Some(c) = cursor.as_ref().filter(|c| crate::clock::wall_ms(c.ts) > now_ms.saturating_add(FUTURE_MS)) {
        return Err(ApiError::bad_request(format!("cursor {} is ahead of this cluster's clock", c.encode())));
    }
    let prev = match p.get("prev").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(ApiError::bad_request(format!("prev must be true or false, got {other:?}"))),
    };
    // Keys under a hash-spread keyspace: read the whole keyspace, keep the
    // user's keys.
    let (start, end, keys) = crate::keyspace::watch_span(&s.node.directory().keyspaces, &start, end.as_deref());
    let spec = WatchSpec { start, end, cursor, prev, keys };
    let outbox = stream::open(s.node.clone(), spec).await.map_err(|e| match e {
        OpenError::Compacted => ApiError::new(ErrorCode::Compacted, e.to_string()),
        OpenError::Unavailable(m) => ApiError::new(ErrorCode::Unavailable, m),
    })?;
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson"), (header::CACHE_CONTROL, "no-cache")],
        Body::from_stream(outbox.body()),
    )
        .into_response())
}
