//! Which role each HTTP request needs: the access rules in one place, as a
//! pure function of the method and the path (the same raw path the router
//! matches, so the rule and the handler can never see different requests).
//!
//! - `/health`: open to all (load balancers and orchestrators probe it).
//! - `/v1/kv…`, `/v1/watch…`: reading methods need `read`; others `write`.
//! - `/v1/txn…`: `write`.
//! - `/admin/…` and `/metrics`: `admin`.
//! - anything else: `read` (an unknown path answers 404 only to a caller
//!   the node knows).

use axum::http::Method;

use super::tokens::Role;

/// The role `method` on `path` needs; `None`: open to anyone.
pub fn required(method: &Method, path: &str) -> Option<Role> {
    let reading = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let under = |prefix: &str| path == prefix || path.starts_with(&format!("{prefix}/"));
    if path == "/health" {
        None
    } else if under("/admin") || under("/metrics") {
        Some(Role::Admin)
    } else if under("/v1/txn") {
        Some(Role::Write)
    } else if under("/v1/kv") || under("/v1/watch") {
        Some(if reading { Role::Read } else { Role::Write })
    } else {
        Some(Role::Read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_endpoint_needs_its_role() {
        let cases = [
            (Method::GET, "/health", None),
            (Method::GET, "/v1/kv/a", Some(Role::Read)),
            (Method::GET, "/v1/kv", Some(Role::Read)),
            (Method::HEAD, "/v1/kv/a", Some(Role::Read)),
            (Method::PUT, "/v1/kv/a", Some(Role::Write)),
            (Method::DELETE, "/v1/kv/a", Some(Role::Write)),
            (Method::POST, "/v1/kv/a", Some(Role::Write)),
            (Method::GET, "/v1/watch", Some(Role::Read)),
            (Method::POST, "/v1/txn", Some(Role::Write)),
            (Method::GET, "/admin/nodes", Some(Role::Admin)),
            (Method::POST, "/admin/split", Some(Role::Admin)),
            (Method::GET, "/admin", Some(Role::Admin)),
            (Method::GET, "/metrics", Some(Role::Admin)),
            (Method::GET, "/nowhere", Some(Role::Read)),
            (Method::GET, "/", Some(Role::Read)),
            // Look-alikes get no special treatment either way.
            (Method::GET, "/administrator", Some(Role::Read)),
            (Method::PUT, "/v1/kvx", Some(Role::Read)),
            (Method::GET, "/health/x", Some(Role::Read)),
            // A key that spells an admin path is still a key.
            (Method::PUT, "/v1/kv/../admin/split", Some(Role::Write)),
        ];
        for (method, path, want) in cases {
            assert_eq!(required(&method, path), want, "{method} {path}");
        }
    }
}
