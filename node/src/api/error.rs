//! API errors and their JSON form.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cleave_metadata::api::{ErrorBody, ErrorCode};
use cleave_metadata::MetaError;

use crate::command::KvError;
use crate::rpc::ExecError;

/// An error answer: status from the code, JSON body.
#[derive(Debug)]
pub struct ApiError(pub ErrorBody);

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError(ErrorBody::new(code, message))
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::BadRequest, message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::TooLarge, message)
    }
}

impl From<ExecError> for ApiError {
    fn from(e: ExecError) -> ApiError {
        let msg = e.to_string();
        match e {
            ExecError::Kv(KvError::VersionConflict { current }) => {
                let mut err = ApiError::new(ErrorCode::VersionConflict, msg);
                err.0.error.version = Some(current);
                err
            }
            ExecError::Kv(KvError::NotFound) => ApiError::new(ErrorCode::NotFound, msg),
            ExecError::Kv(KvError::WrongRange { ranges }) => {
                let mut err = ApiError::new(ErrorCode::StaleRoute, msg);
                err.0.error.ranges = Some(ranges);
                err
            }
            ExecError::Kv(KvError::RangeMoving) => ApiError::new(ErrorCode::RangeMoving, msg),
            // Settled by the router; surfacing, they mean "not applied, try again".
            ExecError::Kv(KvError::Locked { .. } | KvError::TxnAborted) => ApiError::new(ErrorCode::Unavailable, msg),
            ExecError::Meta(
                MetaError::RangeBusy { .. }
                | MetaError::ShardBusy { .. }
                | MetaError::AlreadyCommitted(_)
                | MetaError::WrongPhase { .. }
                | MetaError::NodeExists(_)
                | MetaError::Keyspace(cleave_metadata::keyspace::KeyspaceError::Overlaps { .. }),
            )
            | ExecError::Refused(_) => ApiError::new(ErrorCode::VersionConflict, msg),
            ExecError::Meta(
                MetaError::UnknownRange(_)
                | MetaError::UnknownOp(_)
                | MetaError::UnknownShard(_)
                | MetaError::UnknownNode(_)
                | MetaError::UnknownKeyspace(_),
            ) => ApiError::new(ErrorCode::NotFound, msg),
            ExecError::BadRequest(_) => ApiError::new(ErrorCode::BadRequest, msg),
            ExecError::Meta(MetaError::BadPlacement(_)) => ApiError::new(ErrorCode::Unavailable, msg),
            ExecError::Meta(_) => ApiError::new(ErrorCode::BadRequest, msg),
            ExecError::NoLeader { .. } | ExecError::Unavailable(_) => ApiError::new(ErrorCode::Unavailable, msg),
            ExecError::Timeout(_) | ExecError::Indeterminate(_) => ApiError::new(ErrorCode::Timeout, msg),
            // A split step refused by a shard: internal traffic, never a
            // user request, but answered honestly if one surfaces.
            ExecError::Step(_) => ApiError::new(ErrorCode::VersionConflict, msg),
            ExecError::Internal(_) => ApiError::new(ErrorCode::Internal, msg),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.0.error.code;
        let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(self.0)).into_response();
        if code == ErrorCode::Unavailable {
            resp.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        if code == ErrorCode::TooLarge {
            // The rest of an oversized body is not read; say so before closing.
            resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        }
        resp
    }
}
