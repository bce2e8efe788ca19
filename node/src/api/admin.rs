//! `/admin/…`, `/health` and `/metrics` handlers.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;
use cleave_metadata::api::{ErrorCode, JoinRequest, JoinResponse, NodeStatus, ShardStatus};
use cleave_metadata::{Directory, MetaCommand, MetaResponse, RangeDescriptor};
use serde_json::json;

use super::{ApiError, AppState};
use crate::rpc::ClusterView;

async fn view(s: &AppState) -> Result<ClusterView, ApiError> {
    Ok(s.node.meta_leader().cluster_view(0).await?)
}

pub async fn nodes(State(s): State<AppState>) -> Result<Json<Vec<NodeStatus>>, ApiError> {
    Ok(Json(view(&s).await?.nodes))
}

pub async fn shards(State(s): State<AppState>) -> Result<Json<Vec<ShardStatus>>, ApiError> {
    Ok(Json(view(&s).await?.shards))
}

/// The directory, fresh from the metadata leader, or this node's copy when
/// the leader cannot be reached.
async fn fresh_directory(s: &AppState) -> Result<Directory, ApiError> {
    match view(s).await {
        Ok(v) => Ok(v.directory),
        Err(e) => {
            let local = s.node.directory();
            if local.version > 0 {
                Ok((*local).clone())
            } else {
                Err(e)
            }
        }
    }
}

pub async fn ranges(State(s): State<AppState>) -> Result<Json<Vec<RangeDescriptor>>, ApiError> {
    Ok(Json(fresh_directory(&s).await?.ranges.into_values().collect()))
}

pub async fn directory(State(s): State<AppState>) -> Result<Json<Directory>, ApiError> {
    Ok(Json(fresh_directory(&s).await?))
}

pub async fn join(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<JoinResponse>, ApiError> {
    let body = body.map_err(|e| ApiError::bad_request(format!("cannot read request body: {e}")))?;
    // In a cluster with a secret, the joining node proves it holds it (the
    // authentication middleware leaves this request to us): a node that
    // cannot take part in the RPC handshake is never registered.
    if let Some(secret) = s.access.secret() {
        let proof = headers.get(crate::security::secret::JOIN_PROOF_HEADER).and_then(|v| v.to_str().ok());
        let now = crate::ops::supervisor::now_ms();
        if !proof.is_some_and(|p| secret.check_join_proof(&body, p, now)) {
            metrics::counter!("cleave_http_auth_refused_total", "reason" => "join_proof").increment(1);
            return Err(ApiError::new(
                ErrorCode::Unauthenticated,
                "joining this cluster needs its cluster secret (--cluster-secret-file)",
            ));
        }
    }
    let req: JoinRequest = super::json_object(&body, r#"{"node_id": n?, "raft_addr": "...", "api_addr": "..."}"#)?;
    // Refused for an id already taken (an active node's, say a wiped one
    // rejoining with `--id`): it would inherit that node's replicas on paper.
    let cmd = MetaCommand::JoinNode { node_id: req.node_id, raft_addr: req.raft_addr, api_addr: Some(req.api_addr) };
    let node_id = match s.node.router().propose_meta(cmd, 0).await? {
        MetaResponse::Node(node_id) => node_id,
        other => return Err(ApiError::new(ErrorCode::Internal, format!("unexpected answer {other:?}"))),
    };
    // Where the new node finds the metadata group: the RPC addresses of its
    // replicas (of every node while none is known).
    let dir = fresh_directory(&s).await?;
    let mut seeds: Vec<String> = dir
        .meta
        .iter()
        .flat_map(|m| m.replicas.iter())
        .filter_map(|r| dir.nodes.get(&r.node_id).map(|n| n.raft_addr.clone()))
        .collect();
    if seeds.is_empty() {
        seeds = dir.nodes.values().map(|n| n.raft_addr.clone()).collect();
    }
    Ok(Json(JoinResponse { node_id, seeds }))
}

/// `POST /admin/fault/isolate-meta {"isolated": bool}`: a test fault point
/// (only with `--fault-api true`) cutting this node's metadata-group Raft
/// traffic both ways.
pub async fn isolate_meta(body: Result<Bytes, BytesRejection>) -> Result<Json<serde_json::Value>, ApiError> {
    use std::sync::atomic::Ordering;
    if !crate::raft::network::FAULT_API.load(Ordering::Relaxed) {
        return Err(ApiError::new(ErrorCode::NotFound, "no such endpoint"));
    }
    let body = body.map_err(|e| ApiError::bad_request(format!("cannot read request body: {e}")))?;
    #[derive(serde::Deserialize)]
    struct Req {
        isolated: bool,
    }
    let req: Req = super::json_object(&body, r#"{"isolated": bool}"#)?;
    crate::raft::network::ISOLATE_META.store(req.isolated, Ordering::Relaxed);
    tracing::warn!(isolated = req.isolated, "fault point: metadata group traffic");
    Ok(Json(json!({"isolated": req.isolated})))
}

pub async fn health(State(s): State<AppState>) -> impl IntoResponse {
    Json(json!({"status": "ok", "node_id": s.node.id(), "uptime_ms": s.node.started().elapsed().as_millis() as u64}))
}

pub async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    crate::metrics::update_gauges(&s.node.groups().in_service(), &s.node.ctx().db);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}

pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such endpoint")
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> impl IntoResponse {
    let err = ApiError::bad_request(format!("{method} is not supported on {}", uri.path()));
    (axum::http::StatusCode::METHOD_NOT_ALLOWED, axum::Json(err.0))
}
