//! A thin raw-HTTP helper over reqwest. The tests check the HTTP contract
//! itself, so this returns status and body as they came, and offers typed
//! decoding into the shared wire types on top.

use std::time::Duration;

use anyhow::Context;
use reqwest::{Method, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;

use cleave_metadata::api::{
    ErrorBody, ErrorCode, Item, NodeStatus, OperationView, ScanResult, ShardStatus, WriteResult,
};
use cleave_metadata::RangeDescriptor;

/// Default time limit of one request: above the node's own request timeout
/// (10 s), so that its 504 arrives before the client gives up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// An HTTP answer: status, `Retry-After` and body text, as received.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub retry_after: Option<String>,
    pub content_type: Option<String>,
    pub body: String,
}

impl Resp {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Decodes the body; panics with the body text if it does not fit `T`.
    pub fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not a valid {}: {e}\nbody: {}",
                self.status,
                std::any::type_name::<T>(),
                truncate(&self.body, 2000)
            )
        })
    }

    /// The body as untyped JSON.
    pub fn value(&self) -> Value {
        self.json()
    }

    /// The body of a successful write or delete; panics on any other answer.
    pub fn write_result(&self) -> WriteResult {
        assert_eq!(self.status, 200, "expected a successful write, got {self:?}");
        self.json()
    }

    /// The body of a successful read; panics on any other answer.
    pub fn item(&self) -> Item {
        assert_eq!(self.status, 200, "expected a successful read, got {self:?}");
        self.json()
    }

    /// The error body; panics unless this is a well-formed error answer
    /// (4xx/5xx, `{"error":{"code","message",…}}`, code matching the status,
    /// non-empty message).
    pub fn error(&self) -> ErrorBody {
        assert!(self.status >= 400, "expected an error answer, got {self:?}");
        let e: ErrorBody = self.json();
        assert!(!e.error.message.trim().is_empty(), "error message is empty: {self:?}");
        assert_eq!(
            e.error.code.status(),
            self.status,
            "error code {:?} does not match HTTP status {}: {self:?}",
            e.error.code,
            self.status
        );
        e
    }

    /// Asserts this is an error answer with `status` and `code`; returns it.
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: ErrorCode) -> ErrorBody {
        assert_eq!(self.status, status, "unexpected status: {self:?}");
        let e = self.error();
        assert_eq!(e.error.code, code, "unexpected error code: {self:?}");
        e
    }

    /// Whether the answer says "try again" (no leader, no quorum, timeout,
    /// stale route): worth retrying an idempotent request.
    pub fn is_transient(&self) -> bool {
        matches!(self.status, 421 | 503 | 504)
    }
}

/// Percent-encodes every byte of `s` except RFC 3986 unreserved characters.
/// (Not `Url::path_segments_mut`: URL parsing silently drops tabs and
/// newlines, which are valid in keys.)
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Raw HTTP access to the nodes. Every method takes the node's base URL
/// (`http://127.0.0.1:PORT`). Transport errors (refused, reset, timed out)
/// are returned as `Err`; every HTTP answer, error statuses included, as `Ok`.
#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
    /// `Authorization` header sent with every request, if any.
    auth: Option<String>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Self {
        Self::with_timeout(REQUEST_TIMEOUT)
    }

    /// A client whose requests give up after `timeout`.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self::build(timeout, None)
    }

    /// A client that speaks HTTPS to nodes whose certificates the CA of
    /// `ca_pem` signed (and trusts nothing else).
    pub fn with_ca(ca_pem: &[u8]) -> Self {
        Self::build(REQUEST_TIMEOUT, Some(ca_pem))
    }

    fn build(timeout: Duration, ca_pem: Option<&[u8]>) -> Self {
        cleave_client::tls::install_provider();
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(5));
        if let Some(pem) = ca_pem {
            builder = builder.tls_certs_only(reqwest::Certificate::from_pem_bundle(pem).expect("CA certificate"));
        }
        Http { client: builder.build().expect("build HTTP client"), auth: None }
    }

    /// The same client sending `Authorization: Bearer <token>` (`None`: no
    /// header).
    pub fn with_token(&self, token: Option<&str>) -> Self {
        Http { client: self.client.clone(), auth: token.map(|t| format!("Bearer {t}")) }
    }

    /// The same client sending `value` as the `Authorization` header, as
    /// is (tests of malformed headers).
    pub fn with_authorization(&self, value: &str) -> Self {
        Http { client: self.client.clone(), auth: Some(value.to_string()) }
    }

    /// `base` + a literal path and query, sent as is (no encoding).
    pub fn url(base: &str, path_and_query: &str) -> Url {
        Url::parse(&format!("{base}{path_and_query}")).unwrap_or_else(|e| panic!("bad URL {base}{path_and_query}: {e}"))
    }

    /// `base/v1/kv/{key}` with the key percent-encoded as one path segment.
    pub fn kv_url(base: &str, key: &str) -> Url {
        Self::url(base, &format!("/v1/kv/{}", percent_encode(key)))
    }

    /// Sends one request with an optional JSON body text.
    pub async fn send(&self, method: Method, url: Url, body: Option<String>) -> anyhow::Result<Resp> {
        let what = format!("{method} {url}");
        let mut req = self.client.request(method, url);
        if let Some(auth) = &self.auth {
            req = req.header(reqwest::header::AUTHORIZATION, auth);
        }
        if let Some(body) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
        }
        let resp = req.send().await.with_context(|| what.clone())?;
        let status = resp.status().as_u16();
        let header = |name| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let retry_after = header(reqwest::header::RETRY_AFTER);
        let content_type = header(reqwest::header::CONTENT_TYPE);
        let body = resp.text().await.with_context(|| format!("{what}: reading body"))?;
        Ok(Resp { status, retry_after, content_type, body })
    }

    /// `POST /v1/txn` with `body` (a JSON value, sent as it is).
    pub async fn txn(&self, base: &str, body: &Value) -> anyhow::Result<Resp> {
        self.send(Method::POST, Self::url(base, "/v1/txn"), Some(body.to_string())).await
    }

    pub async fn get_path(&self, base: &str, path_and_query: &str) -> anyhow::Result<Resp> {
        self.send(Method::GET, Self::url(base, path_and_query), None).await
    }

    /// `PUT /v1/kv/{key}` with `{"value": value, "if_version": …}`.
    pub async fn put(&self, base: &str, key: &str, value: &Value, if_version: Option<u64>) -> anyhow::Result<Resp> {
        let mut body = serde_json::json!({ "value": value });
        if let Some(v) = if_version {
            body["if_version"] = v.into();
        }
        self.put_raw(base, key, body.to_string()).await
    }

    /// `PUT /v1/kv/{key}` with a body given as raw text.
    pub async fn put_raw(&self, base: &str, key: &str, body: String) -> anyhow::Result<Resp> {
        self.send(Method::PUT, Self::kv_url(base, key), Some(body)).await
    }

    /// `GET /v1/kv/{key}`, with `?consistency=` when given.
    pub async fn get(&self, base: &str, key: &str, consistency: Option<&str>) -> anyhow::Result<Resp> {
        let mut url = Self::kv_url(base, key);
        if let Some(c) = consistency {
            url.query_pairs_mut().append_pair("consistency", c);
        }
        self.send(Method::GET, url, None).await
    }

    /// `DELETE /v1/kv/{key}`, with `?if_version=` when given.
    pub async fn delete(&self, base: &str, key: &str, if_version: Option<u64>) -> anyhow::Result<Resp> {
        let mut url = Self::kv_url(base, key);
        if let Some(v) = if_version {
            url.query_pairs_mut().append_pair("if_version", &v.to_string());
        }
        self.send(Method::DELETE, url, None).await
    }

    /// `GET /v1/kv?start=&end=&limit=`; absent parameters are left out.
    pub async fn scan(
        &self,
        base: &str,
        start: Option<&str>,
        end: Option<&str>,
        limit: Option<&str>,
    ) -> anyhow::Result<Resp> {
        let mut url = Self::url(base, "/v1/kv");
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = start {
                q.append_pair("start", s);
            }
            if let Some(e) = end {
                q.append_pair("end", e);
            }
            if let Some(l) = limit {
                q.append_pair("limit", l);
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        self.send(Method::GET, url, None).await
    }

    /// Scans `[start, end)` page by page (`limit` items per page), following
    /// `next`, and returns every item. Panics on any non-200 page, on a page
    /// larger than `limit`, or after an absurd number of pages (a `next` that
    /// does not advance).
    pub async fn scan_all(&self, base: &str, start: Option<&str>, end: Option<&str>, limit: usize) -> Vec<Item> {
        let mut items = Vec::new();
        let mut cursor = start.map(str::to_owned);
        let limit_s = limit.to_string();
        for page in 0.. {
            assert!(page < 100_000, "scan does not finish: `next` does not advance (cursor {cursor:?})");
            let r = self.scan(base, cursor.as_deref(), end, Some(&limit_s)).await.expect("scan request");
            assert_eq!(r.status, 200, "scan page {page} failed: {r:?}");
            let s: ScanResult = r.json();
            assert!(s.items.len() <= limit, "page {page} has {} items, more than limit {limit}", s.items.len());
            if let (Some(prev), Some(next)) = (&cursor, &s.next) {
                assert!(next > prev, "`next` {next:?} does not advance past the page start {prev:?}");
            }
            items.extend(s.items);
            match s.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        items
    }

    pub async fn health(&self, base: &str) -> anyhow::Result<Resp> {
        self.get_path(base, "/health").await
    }

    /// `GET /admin/shards`, decoded.
    pub async fn admin_shards(&self, base: &str) -> anyhow::Result<Vec<ShardStatus>> {
        decode_admin(self.get_path(base, "/admin/shards").await?)
    }

    /// `GET /admin/nodes`, decoded.
    pub async fn admin_nodes(&self, base: &str) -> anyhow::Result<Vec<NodeStatus>> {
        decode_admin(self.get_path(base, "/admin/nodes").await?)
    }

    /// `GET /admin/ranges`, decoded.
    pub async fn admin_ranges(&self, base: &str) -> anyhow::Result<Vec<RangeDescriptor>> {
        decode_admin(self.get_path(base, "/admin/ranges").await?)
    }

    /// `POST /admin/split` with `body` sent as is.
    pub async fn admin_split(&self, base: &str, body: impl Into<String>) -> anyhow::Result<Resp> {
        self.send(Method::POST, Self::url(base, "/admin/split"), Some(body.into())).await
    }

    /// `GET /admin/operations`, decoded.
    pub async fn admin_operations(&self, base: &str) -> anyhow::Result<Vec<OperationView>> {
        decode_admin(self.get_path(base, "/admin/operations").await?)
    }

    /// `GET /admin/operations/{id}`, decoded.
    pub async fn admin_operation(&self, base: &str, id: u64) -> anyhow::Result<OperationView> {
        decode_admin(self.get_path(base, &format!("/admin/operations/{id}")).await?)
    }

    /// `POST /admin/operations/{id}/cancel` (`id` sent as is, for bad ids too).
    pub async fn cancel_operation(&self, base: &str, id: &str) -> anyhow::Result<Resp> {
        self.send(Method::POST, Self::url(base, &format!("/admin/operations/{id}/cancel")), None).await
    }
}

fn decode_admin<T: DeserializeOwned>(r: Resp) -> anyhow::Result<T> {
    anyhow::ensure!(r.status == 200, "HTTP {}: {}", r.status, truncate(&r.body, 500));
    serde_json::from_str(&r.body).with_context(|| format!("decoding {}", truncate(&r.body, 2000)))
}
