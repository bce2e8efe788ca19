//! `PUT /admin/keyspaces/{prefix}` (declare a hash-spread keyspace; answers
//! once it is active) and `GET /admin/keyspaces` (list them).

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::Json;
use cleave_metadata::api::{ErrorCode, KeyspaceRequest, KeyspaceView};
use cleave_metadata::keyspace::MAX_BUCKETS;

use super::{ApiError, AppState};

pub async fn declare(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<KeyspaceView>, ApiError> {
    let Path(prefix) = path.map_err(|e| ApiError::bad_request(format!("invalid prefix in path: {e}")))?;
    if prefix.len() > cleave_metadata::MAX_KEY_BYTES {
        return Err(ApiError::too_large("prefix too long"));
    }
    let body = body.map_err(|e| ApiError::bad_request(format!("cannot read request body: {e}")))?;
    let req: KeyspaceRequest = super::json_object(&body, r#"{"hash_buckets": n}"#)?;
    let Some(n) = req.hash_buckets else {
        return Err(ApiError::bad_request(format!("give \"hash_buckets\": 2 to {MAX_BUCKETS}")));
    };
    let k = crate::keyspace::declare(&s.node, prefix.clone(), n, 0).await?;
    if k.active {
        return Ok(Json(KeyspaceView { prefix, hash_buckets: k.buckets, active: true }));
    }
    // Answer once its buckets are ranges of their own.
    let deadline = std::time::Instant::now() + crate::keyspace::DECLARE_TIMEOUT;
    loop {
        let dir = s.node.meta_leader().cluster_view(0).await?.directory;
        if dir.keyspaces.0.get(&prefix).is_some_and(|k| k.active) {
            return Ok(Json(KeyspaceView { prefix, hash_buckets: n, active: true }));
        }
        if std::time::Instant::now() > deadline {
            return Err(ApiError::new(
                ErrorCode::Timeout,
                format!("keyspace {prefix:?} is declared and not active yet: ask again to see it finish"),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

pub async fn list(State(s): State<AppState>) -> Result<Json<Vec<KeyspaceView>>, ApiError> {
    let dir = s.node.meta_leader().cluster_view(0).await?.directory;
    let views = dir.keyspaces.0.iter().map(|(p, k)| KeyspaceView {
        prefix: p.clone(),
        hash_buckets: k.buckets,
        active: k.active,
    });
    Ok(Json(views.collect()))
}
