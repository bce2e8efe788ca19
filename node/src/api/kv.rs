//! `/v1/kv` handlers: validate the request, hand it to the router, shape the answer.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cleave_metadata::api::{Consistency, ErrorCode, Item, PutBody, ScanResult, WriteResult};
use cleave_metadata::MAX_KEY_BYTES;
use serde_json::value::RawValue;

use super::{ApiError, AppState};
use crate::command::KvOp;

/// Scan page size when `limit` is not given, and the largest allowed.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

type Params = Result<Query<HashMap<String, String>>, QueryRejection>;

fn key_of(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(key) = path.map_err(|e| ApiError::bad_request(format!("invalid key in path: {e}")))?;
    validate_key(&key)?;
    Ok(key)
}

fn validate_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::bad_request("key must not be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ApiError::too_large(format!("key is {} bytes; the limit is {MAX_KEY_BYTES}", key.len())));
    }
    Ok(())
}

fn params(q: Params) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(p)| p).map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))
}

fn parse_u64(p: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    p.get(name)
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("{name} must be a non-negative integer, got {v:?}")))
        })
        .transpose()
}

pub(super) fn body_error(e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(format!("request body too large: {e}"))
    } else {
        ApiError::bad_request(format!("cannot read request body: {e}"))
    }
}

fn raw(json: String) -> Result<Box<RawValue>, ApiError> {
    RawValue::from_string(json)
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("stored value is not JSON: {e}")))
}

pub async fn empty_key() -> ApiError {
    ApiError::bad_request("key must not be empty: use /v1/kv/{key}")
}

pub async fn put(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<WriteResult>, ApiError> {
    let key = key_of(path)?;
    let body = body.map_err(body_error)?;
    let req: PutBody = super::json_object(&body, r#"{"value": <json>, "if_version": n?}"#)?;
    let max = s.node.settings().max_value_bytes;
    let value = req.value.get();
    if value.len() > max {
        return Err(ApiError::too_large(format!("value is {} bytes of JSON; the limit is {max}", value.len())));
    }
    let put = KvOp::Put { key: key.clone(), value: value.to_string(), if_version: req.if_version };
    let version = s.node.router().write_user(put).await?;
    Ok(Json(WriteResult { key, version }))
}

pub async fn get(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Params,
) -> Result<Response, ApiError> {
    let key = key_of(path)?;
    let p = params(query)?;
    let consistency = match p.get("consistency").map(String::as_str) {
        None | Some("linearizable") => Consistency::Linearizable,
        Some("stale") => Consistency::Stale,
        Some(other) => {
            return Err(ApiError::bad_request(format!("unknown consistency {other:?}: use linearizable or stale")))
        }
    };
    match s.node.router().read_user(&key, consistency == Consistency::Linearizable).await? {
        Some((version, json)) => Ok(Json(Item { key, value: raw(json)?, version }).into_response()),
        None => Err(ApiError::new(ErrorCode::NotFound, format!("key {key:?} not found"))),
    }
}

pub async fn delete(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Params,
) -> Result<Json<WriteResult>, ApiError> {
    let key = key_of(path)?;
    let p = params(query)?;
    let if_version = parse_u64(&p, "if_version")?;
    let version = s.node.router().write_user(KvOp::Delete { key: key.clone(), if_version }).await?;
    Ok(Json(WriteResult { key, version }))
}

/// The longest `start` of a scan: a key of the maximum length plus the
/// `"\0"` that `next` appends to a page's last key.
pub const MAX_SCAN_START_BYTES: usize = MAX_KEY_BYTES + 1;

pub async fn scan(State(s): State<AppState>, query: Params) -> Result<Json<ScanResult>, ApiError> {
    let p = params(query)?;
    let start = p.get("start").cloned().unwrap_or_default();
    let end = p.get("end").filter(|e| !e.is_empty()).cloned();
    let limit = match parse_u64(&p, "limit")? {
        None => DEFAULT_LIMIT,
        Some(l) if (1..=MAX_LIMIT as u64).contains(&l) => l as usize,
        Some(l) => return Err(ApiError::bad_request(format!("limit must be between 1 and {MAX_LIMIT}, got {l}"))),
    };
    // `start` may be one byte longer than a key: a page that ends on a key
    // of the maximum length continues at that key + "\0".
    if start.len() > MAX_SCAN_START_BYTES || end.as_ref().is_some_and(|e| e.len() > MAX_KEY_BYTES) {
        return Err(ApiError::too_large(format!(
            "scan bounds are limited to {MAX_KEY_BYTES} bytes (start: {MAX_SCAN_START_BYTES}, to follow `next`)"
        )));
    }
    if end.as_ref().is_some_and(|e| *e < start) {
        return Err(ApiError::bad_request("end must not be before start"));
    }
    // Keys under a hash-spread keyspace come from its buckets, merged.
    let (items, more) = crate::keyspace::scan(&s.node, &start, end.as_deref(), limit).await?;
    let next = if more { items.last().map(|(k, _, _)| format!("{k}\u{0}")) } else { None };
    let items = items
        .into_iter()
        .map(|(key, version, json)| Ok(Item { key, value: raw(json)?, version }))
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Json(ScanResult { items, next }))
}
