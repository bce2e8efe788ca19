//! `POST /v1/txn`: check the request, run it (`txn::coordinator`), shape
//! the answer.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use cleave_metadata::api::{ErrorCode, TxnRequest, TxnResponse, TxnResult};
use serde_json::value::RawValue;

use super::kv::body_error;
use super::{ApiError, AppState};
use crate::txn::plan::{self, Invalid, Outcome};

const SHAPE: &str = r#"{"compare": [{"key", "version"}], "success": [{"op", "key", "value"?}], "failure": [...]}"#;

pub async fn txn(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TxnResponse>, ApiError> {
    let body = body.map_err(body_error)?;
    let req: TxnRequest = super::json_object(&body, SHAPE)?;
    let mut txn = plan::validate(req, s.node.settings().max_value_bytes).map_err(|e| match e {
        Invalid::Bad(m) => ApiError::bad_request(m),
        Invalid::TooLarge(m) => ApiError::too_large(m),
    })?;
    // Keys under a hash-spread keyspace go to their buckets (and come back
    // as the user wrote them, below).
    let spaces = s.node.directory().keyspaces.clone();
    for key in txn.keys_mut() {
        *key = spaces.to_internal(key).map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    // In a task of its own: a client that hangs up must not cut the
    // coordinator off between its commit and the finishing of the other
    // shards (their locks would wait for someone to meet them).
    let node = s.node.clone();
    let decided = tokio::spawn(async move { crate::txn::coordinator::run(&node, txn).await })
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("the transaction's task failed: {e}")))??;
    let raw = |json: String| {
        RawValue::from_string(json)
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("stored value is not JSON: {e}")))
    };
    let results = decided
        .results
        .into_iter()
        .map(|o| {
            let user = |key: String| spaces.to_user(&key);
            Ok(match o {
                Outcome::Written { key, version } => {
                    TxnResult { key: user(key), value: None, version: Some(version), found: None }
                }
                Outcome::Got { key, version, value } => {
                    TxnResult { key: user(key), value: Some(raw(value)?), version: Some(version), found: None }
                }
                Outcome::Missing { key } => {
                    TxnResult { key: user(key), value: None, version: None, found: Some(false) }
                }
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Json(TxnResponse { succeeded: decided.succeeded, results }))
}
