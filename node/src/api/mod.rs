//! The HTTP JSON API (axum): `/v1/kv…`, `/v1/txn` and `/v1/watch` for data, `/admin/…` for the
//! cluster, `/metrics` and `/health`.
//!
//! Every failure becomes an [`ApiError`]: a JSON `{"error": {…}}` body with an
//! honest status (see `ErrorCode::status`). Extractor rejections (bad path
//! encoding, oversized bodies) are mapped too, so a client never sees a
//! plain-text error or a 500 for bad input.

mod admin;
mod error;
pub mod https;
mod keyspaces;
mod kv;
mod moves;
mod ops;
mod txn;
mod watch;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

pub use error::ApiError;

use crate::node::Node;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub node: Arc<Node>,
    pub metrics: PrometheusHandle,
    /// Who may do what (`security`): tokens, and the cluster secret joins prove.
    pub access: Arc<crate::security::Access>,
}

/// Slack above the value limit for the rest of a PUT body.
const BODY_OVERHEAD: usize = 64 * 1024;

/// Header stating the answering node's directory version; a client whose
/// cached directory is older refreshes it (ranges or leaders moved).
pub const DIRECTORY_VERSION_HEADER: &str = "x-cleave-directory-version";

async fn stamp_directory_version(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let mut resp = next.run(req).await;
    let version = state.node.directory().version;
    resp.headers_mut().insert(DIRECTORY_VERSION_HEADER, axum::http::HeaderValue::from(version));
    resp
}

/// Parses a request body that must be a JSON object. serde would also
/// accept an array for a struct (fields in order), which no client means.
pub fn json_object<T: serde::de::DeserializeOwned>(body: &[u8], shape: &str) -> Result<T, ApiError> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(format!("body must be a JSON object {shape}")));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("body must be {shape}: {e}")))
}

/// Builds the API router.
pub fn router(state: AppState) -> Router {
    let body_limit = state.node.settings().max_value_bytes + BODY_OVERHEAD;
    Router::new()
        .route("/v1/kv", get(kv::scan))
        .route("/v1/kv/", get(kv::empty_key).put(kv::empty_key).delete(kv::empty_key))
        .route("/v1/kv/{*key}", get(kv::get).put(kv::put).delete(kv::delete))
        .route("/v1/txn", post(txn::txn))
        .route("/v1/watch", get(watch::watch))
        .route("/admin/nodes", get(admin::nodes))
        .route("/admin/nodes/join", post(admin::join))
        .route("/admin/shards", get(admin::shards))
        .route("/admin/ranges", get(admin::ranges))
        .route("/admin/directory", get(admin::directory))
        .route("/admin/split", post(ops::split))
        .route("/admin/merge", post(ops::merge))
        .route("/admin/keyspaces", get(keyspaces::list))
        .route("/admin/keyspaces/{*prefix}", axum::routing::put(keyspaces::declare))
        .route("/admin/move", post(moves::start_move))
        .route("/admin/transfer-leader", post(moves::transfer_leader))
        .route("/admin/nodes/{id}/decommission", post(moves::decommission))
        .route("/admin/operations", get(ops::list))
        .route("/admin/operations/{id}", get(ops::get))
        .route("/admin/operations/{id}/cancel", post(ops::cancel))
        .route("/admin/fault/isolate-meta", post(admin::isolate_meta))
        .route("/health", get(admin::health))
        .route("/metrics", get(admin::metrics))
        .layer(axum::middleware::from_fn_with_state(state.clone(), stamp_directory_version))
        .fallback(admin::not_found)
        .method_not_allowed_fallback(admin::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        // Outermost: a refused request reaches no handler, not even the
        // not-found fallback (an unknown path answers 404 only to a caller
        // the node knows).
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::security::http::authorize))
        .with_state(state)
}
