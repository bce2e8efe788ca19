//! The API's authentication middleware: checks each request's bearer
//! token against the tokens in force and the role [`super::policy`] asks
//! for, before any handler (or the not-found fallback) sees it.
//!
//! One exception: `POST /admin/nodes/join` in a cluster with a secret is
//! left to its handler, which checks the joining node's proof of the
//! secret over the request body (a new node has no token).

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cleave_metadata::api::ErrorCode;

use super::tokens::{Role, TokenSet};
use crate::api::{ApiError, AppState};

/// Why a request was turned away.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// 401: no token, a malformed header, or a secret no token has.
    Unauthenticated(&'static str),
    /// 403: a known token whose role is too low.
    Forbidden { token: String, role: Role, needed: Role },
}

/// The name of the token that may make a request (`None`: none needed), or
/// why not. Pure.
pub fn check(
    tokens: &TokenSet,
    needed: Option<Role>,
    authorization: Option<&HeaderValue>,
) -> Result<Option<String>, Denied> {
    let Some(needed) = needed else { return Ok(None) };
    let Some(value) = authorization else {
        return Err(Denied::Unauthenticated("this node needs a token: send Authorization: Bearer <token>"));
    };
    let value = value.as_bytes();
    let secret = match value.iter().position(|b| *b == b' ') {
        Some(i) if value[..i].eq_ignore_ascii_case(b"bearer") => value[i..].trim_ascii(),
        _ => return Err(Denied::Unauthenticated("the Authorization header must be: Bearer <token>")),
    };
    let Some(token) = tokens.authenticate(secret) else {
        return Err(Denied::Unauthenticated("unknown token"));
    };
    if token.role < needed {
        return Err(Denied::Forbidden { token: token.name.clone(), role: token.role, needed });
    }
    Ok(Some(token.name.clone()))
}

/// Whether a request is a join the handler checks itself (see above).
fn is_join(state: &AppState, req: &Request) -> bool {
    state.access.secret().is_some()
        && *req.method() == axum::http::Method::POST
        && req.uri().path() == "/admin/nodes/join"
}

/// The middleware.
pub async fn authorize(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(tokens) = state.access.tokens() else { return next.run(req).await };
    if is_join(&state, &req) {
        return next.run(req).await;
    }
    let needed = super::policy::required(req.method(), req.uri().path());
    match check(&tokens, needed, req.headers().get(header::AUTHORIZATION)) {
        Ok(_) => next.run(req).await,
        Err(Denied::Unauthenticated(why)) => {
            metrics::counter!("cleave_http_auth_refused_total", "reason" => "unauthenticated").increment(1);
            let mut resp = ApiError::new(ErrorCode::Unauthenticated, why).into_response();
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"cleavedb\""));
            resp
        }
        Err(Denied::Forbidden { token, role, needed }) => {
            metrics::counter!("cleave_http_auth_refused_total", "reason" => "forbidden").increment(1);
            tracing::debug!(token, path = req.uri().path(), "refused: role {} below {}", role.name(), needed.name());
            let msg = format!("token {token:?} has role {}; this request needs {}", role.name(), needed.name());
            ApiError::new(ErrorCode::Forbidden, msg).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> TokenSet {
        TokenSet::parse(
            "[[token]]\nname = \"r\"\nsecret = \"read-secret\"\nrole = \"read\"\n\
             [[token]]\nname = \"a\"\nsecret = \"admin-secret\"\nrole = \"admin\"\n",
        )
        .unwrap()
    }

    fn h(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn the_header_must_name_a_token_whose_role_covers_the_request() {
        let t = tokens();
        assert_eq!(check(&t, None, None), Ok(None), "open endpoint");
        assert_eq!(check(&t, Some(Role::Read), Some(&h("Bearer read-secret"))), Ok(Some("r".into())));
        assert_eq!(check(&t, Some(Role::Read), Some(&h("bearer   read-secret "))), Ok(Some("r".into())));
        assert_eq!(check(&t, Some(Role::Write), Some(&h("Bearer admin-secret"))), Ok(Some("a".into())));
        assert_eq!(
            check(&t, Some(Role::Write), Some(&h("Bearer read-secret"))),
            Err(Denied::Forbidden { token: "r".into(), role: Role::Read, needed: Role::Write })
        );
        for bad in [
            None,
            Some(h("read-secret")),
            Some(h("Basic cmVhZC1zZWNyZXQ=")),
            Some(h("Bearer")),
            Some(h("Bearer ")),
            Some(h("Bearer wrong")),
            Some(h("Bearerread-secret")),
            Some(HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap()),
            Some(h(&format!("Bearer {}", "x".repeat(100_000)))),
        ] {
            assert!(matches!(check(&t, Some(Role::Read), bad.as_ref()), Err(Denied::Unauthenticated(_))), "{bad:?}");
        }
    }
}
