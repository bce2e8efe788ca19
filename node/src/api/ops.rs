//! `/admin/split`, `/admin/merge` and `/admin/operations…` handlers.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::Json;
use cleave_metadata::api::{ErrorCode, MergeRequest, OperationStarted, OperationView, SplitRequest};
use cleave_metadata::{MetaCommand, MAX_KEY_BYTES};

use super::{ApiError, AppState};
use crate::ops::now_ms;

pub async fn split(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<OperationStarted>, ApiError> {
    let body = body.map_err(|e| ApiError::bad_request(format!("cannot read request body: {e}")))?;
    let req: SplitRequest = super::json_object(&body, r#"{"key": "..."} or {"range_id": n}"#)?;
    match (&req.key, req.range_id) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(ApiError::bad_request("give exactly one of \"key\" and \"range_id\""));
        }
        (Some(k), None) if k.is_empty() => return Err(ApiError::bad_request("the split key must not be empty")),
        (Some(k), None) if k.len() > MAX_KEY_BYTES => return Err(ApiError::too_large("split key too long")),
        _ => {}
    }
    let op = crate::ops::split::start(&s.node, req.range_id, req.key, "admin".into(), 0).await?;
    Ok(Json(OperationStarted { operation_id: op }))
}

pub async fn merge(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<OperationStarted>, ApiError> {
    let body = body.map_err(|e| ApiError::bad_request(format!("cannot read request body: {e}")))?;
    let req: MergeRequest = super::json_object(&body, r#"{"range_id": n}"#)?;
    let range_id = req.range_id.ok_or_else(|| ApiError::bad_request("give \"range_id\": the left range of the two"))?;
    let op = crate::ops::merge::start(&s.node, range_id, "admin".into(), 0).await?;
    Ok(Json(OperationStarted { operation_id: op }))
}

async fn fresh_ops(s: &AppState) -> Result<Vec<cleave_metadata::Operation>, ApiError> {
    let dir = s.node.meta_leader().cluster_view(0).await?.directory;
    Ok(dir.ops.into_values().collect())
}

pub async fn list(State(s): State<AppState>) -> Result<Json<Vec<OperationView>>, ApiError> {
    let now = now_ms();
    Ok(Json(fresh_ops(&s).await?.into_iter().map(|op| OperationView::new(op, now)).collect()))
}

fn op_id(path: Result<Path<u64>, PathRejection>) -> Result<u64, ApiError> {
    path.map(|Path(id)| id).map_err(|e| ApiError::bad_request(format!("operation id must be a number: {e}")))
}

async fn view(s: &AppState, id: u64) -> Result<Json<OperationView>, ApiError> {
    let op = fresh_ops(s)
        .await?
        .into_iter()
        .find(|o| o.op_id == id)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no operation {id}")))?;
    Ok(Json(OperationView::new(op, now_ms())))
}

pub async fn get(
    State(s): State<AppState>,
    path: Result<Path<u64>, PathRejection>,
) -> Result<Json<OperationView>, ApiError> {
    view(&s, op_id(path)?).await
}

pub async fn cancel(
    State(s): State<AppState>,
    path: Result<Path<u64>, PathRejection>,
) -> Result<Json<OperationView>, ApiError> {
    let id = op_id(path)?;
    let cmd = MetaCommand::AbortOp {
        op_id: id,
        reason: "cancelled by request".into(),
        now_ms: now_ms(),
        learner_only: false,
    };
    s.node.router().propose_meta(cmd, 0).await?;
    view(&s, id).await
}
