//! `/admin/move`, `/admin/transfer-leader` and `/admin/nodes/{id}/decommission`.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::Json;
use cleave_metadata::api::{
    ErrorCode, MoveRequest, NodeStatus, OperationStarted, TransferLeaderRequest, TransferLeaderResponse,
};

use super::{ApiError, AppState};

fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| ApiError::bad_request(format!("cannot read request body: {e}")))
}

pub async fn start_move(
    State(s): State<AppState>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<OperationStarted>, ApiError> {
    let req: MoveRequest = super::json_object(&body(raw)?, r#"{"shard_id": n, "from_node": n, "to_node": n}"#)?;
    if req.from_node == req.to_node {
        return Err(ApiError::bad_request("from_node and to_node are the same node"));
    }
    let op = crate::ops::moves::start(&s.node, req.shard_id, req.from_node, req.to_node, "admin".into(), 0).await?;
    Ok(Json(OperationStarted { operation_id: op }))
}

pub async fn transfer_leader(
    State(s): State<AppState>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<TransferLeaderResponse>, ApiError> {
    let req: TransferLeaderRequest = super::json_object(&body(raw)?, r#"{"shard_id": n, "to_node": n}"#)?;
    crate::moves::calls::admin_transfer_leader(&s.node, req.shard_id, req.to_node).await?;
    Ok(Json(TransferLeaderResponse { shard_id: req.shard_id, leader: req.to_node }))
}

pub async fn decommission(
    State(s): State<AppState>,
    path: Result<Path<u64>, PathRejection>,
) -> Result<Json<NodeStatus>, ApiError> {
    let id = path.map(|Path(id)| id).map_err(|e| ApiError::bad_request(format!("node id must be a number: {e}")))?;
    crate::moves::calls::decommission(&s.node, id).await?;
    let view = s.node.meta_leader().cluster_view(0).await?;
    view.nodes
        .into_iter()
        .find(|n| n.id == id)
        .map(Json)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no node {id}")))
}
