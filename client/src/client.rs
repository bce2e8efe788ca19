//! [`Client`]: the operations of the CleaveDB HTTP API as async methods.
//!
//! Each method builds one request (path, body, which key to route by, and
//! whether it is safe to replay), hands it to the retry loop in
//! `transport`, and decodes the answer into the wire types of
//! `cleave_metadata::api`. A `Client` is cheap to clone; clones share the
//! connection pool and the routing cache.
//!
//! ```no_run
//! # async fn demo() -> cleave_client::Result<()> {
//! use cleave_client::{Client, Consistency};
//! let client = Client::new(["127.0.0.1:7001", "127.0.0.1:7002"])?;
//! let w = client.put("user/1", &serde_json::json!({"name": "ada"}), None).await?;
//! let item = client.get("user/1", Consistency::Linearizable).await?.expect("just written");
//! assert_eq!(item.version, w.version);
//! client.put("user/1", &serde_json::json!({"name": "ada l."}), Some(w.version)).await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_metadata::api::{
    Consistency, Item, NodeStatus, OperationStarted, OperationView, PutBody, ScanResult, ShardStatus, SplitRequest,
    WriteResult,
};
use cleave_metadata::{Directory, OpId, RangeDescriptor, RangeId};
use reqwest::Method;
use serde::Serialize;

use crate::endpoint::{base_url, check_key, key_path, with_query};
use crate::error::{Error, Result};
use crate::options::ClientOptions;
use crate::retry::RequestKind;
use crate::routing::RoutingTable;
use crate::transport::{decode, Call, Inner};

/// Largest page the server returns; [`Client::scan_all`] asks for this much.
pub const MAX_SCAN_LIMIT: usize = 1000;

/// A CleaveDB client. See the crate documentation.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("seeds", &self.inner.table().seeds()).finish_non_exhaustive()
    }
}

impl Client {
    /// A client with default options. `seeds` are API addresses of some
    /// nodes (`host:port` or `http://host:port`); the rest of the cluster is
    /// discovered from them.
    pub fn new<I, S>(seeds: I) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Client::with_options(seeds, ClientOptions::default())
    }

    /// A client with the given options.
    pub fn with_options<I, S>(seeds: I, options: ClientOptions) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut urls: Vec<String> = Vec::new();
        for seed in seeds {
            let url = base_url(seed.as_ref())?;
            if !urls.contains(&url) {
                urls.push(url);
            }
        }
        if urls.is_empty() {
            return Err(Error::InvalidArgument("at least one endpoint is needed".into()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(Error::Transport)?;
        Ok(Client { inner: Arc::new(Inner::new(http, options, urls)) })
    }

    /// The options this client was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// Reads `key`; `None` if it does not exist.
    pub async fn get(&self, key: &str, consistency: Consistency) -> Result<Option<Item>> {
        check_key(key)?;
        let consistency = match consistency {
            Consistency::Linearizable => "linearizable",
            Consistency::Stale => "stale",
        };
        let path = with_query(&key_path(key), &[("consistency", Some(consistency.into()))]);
        match self.inner.execute(&Call::read(path, Some(key))).await {
            Ok(body) => decode(&body).map(Some),
            Err(Error::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `value` (anything serialisable to JSON: a
    /// [`serde_json::Value`], a [`serde_json::value::RawValue`] to send text
    /// unchanged, or your own type) under `key`. With `if_version`, writes
    /// only if the key's version is exactly that (0: only if absent), else
    /// fails with [`Error::VersionConflict`].
    ///
    /// If the connection drops after the request was sent, a plain put is
    /// retried (writing the same value twice is harmless) but a conditional
    /// one fails with [`Error::Indeterminate`].
    pub async fn put<V: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &V,
        if_version: Option<u64>,
    ) -> Result<WriteResult> {
        check_key(key)?;
        let value = serde_json::value::to_raw_value(value)
            .map_err(|e| Error::InvalidArgument(format!("value is not serialisable to JSON: {e}")))?;
        let body = serde_json::to_vec(&PutBody { value, if_version })
            .map_err(|e| Error::InvalidArgument(format!("cannot encode the request: {e}")))?;
        let call = Call {
            method: Method::PUT,
            path: key_path(key),
            body: Some(body),
            route_key: Some(key.to_owned()),
            kind: if if_version.is_some() { RequestKind::Conditional } else { RequestKind::Put },
            about_key: true,
        };
        decode(&self.inner.execute(&call).await?)
    }

    /// Like [`Client::put`] with the value given as JSON text, stored
    /// byte for byte. Fails with [`Error::InvalidArgument`] if it is not JSON.
    pub async fn put_json(&self, key: &str, json: &str, if_version: Option<u64>) -> Result<WriteResult> {
        let raw: Box<serde_json::value::RawValue> =
            serde_json::from_str(json).map_err(|e| Error::InvalidArgument(format!("value is not valid JSON: {e}")))?;
        self.put(key, &*raw, if_version).await
    }

    /// Deletes `key`. Fails with [`Error::NotFound`] if it does not exist,
    /// and with [`Error::VersionConflict`] if `if_version` does not match.
    pub async fn delete(&self, key: &str, if_version: Option<u64>) -> Result<WriteResult> {
        check_key(key)?;
        let call = Call {
            method: Method::DELETE,
            path: with_query(&key_path(key), &[("if_version", if_version.map(|v| v.to_string()))]),
            body: None,
            route_key: Some(key.to_owned()),
            kind: if if_version.is_some() { RequestKind::Conditional } else { RequestKind::Delete },
            about_key: true,
        };
        decode(&self.inner.execute(&call).await?)
    }

    /// One page of the keys in `[start, end)` (`end = None`: to the end of
    /// the key space), in key order, at most `limit` items (server default
    /// 100, max [`MAX_SCAN_LIMIT`]). Pass [`ScanResult::next`] as `start` to
    /// continue.
    pub async fn scan(&self, start: &str, end: Option<&str>, limit: Option<usize>) -> Result<ScanResult> {
        let path = with_query(
            "/v1/kv",
            &[
                ("start", Some(start.to_owned()).filter(|s| !s.is_empty())),
                ("end", end.map(str::to_owned)),
                ("limit", limit.map(|l| l.to_string())),
            ],
        );
        decode(&self.inner.execute(&Call::read(path, Some(start))).await?)
    }

    /// Every item in `[start, end)`, following the pages to the end.
    pub async fn scan_all(&self, start: &str, end: Option<&str>) -> Result<Vec<Item>> {
        let mut items = Vec::new();
        let mut cursor = start.to_owned();
        loop {
            let page = self.scan(&cursor, end, Some(MAX_SCAN_LIMIT)).await?;
            items.extend(page.items);
            match page.next {
                None => return Ok(items),
                Some(next) if next <= cursor => {
                    return Err(Error::Decode(format!("scan cursor did not advance (from {cursor:?} to {next:?})")))
                }
                Some(next) => cursor = next,
            }
        }
    }

    /// The cluster's directory (`GET /admin/directory`).
    pub async fn directory(&self) -> Result<Directory> {
        self.admin("/admin/directory").await
    }

    /// Every shard with its leader (`GET /admin/shards`).
    pub async fn shards(&self) -> Result<Vec<ShardStatus>> {
        self.admin("/admin/shards").await
    }

    /// Every node with its liveness (`GET /admin/nodes`).
    pub async fn nodes(&self) -> Result<Vec<NodeStatus>> {
        self.admin("/admin/nodes").await
    }

    /// Every range descriptor (`GET /admin/ranges`).
    pub async fn ranges(&self) -> Result<Vec<RangeDescriptor>> {
        self.admin("/admin/ranges").await
    }

    /// Starts splitting the range that contains `key` at `key`: the keys
    /// from `key` on move to a new shard. Returns the operation's id; follow
    /// it with [`Client::operation`] or [`Client::follow_operation`].
    ///
    /// Fails with [`Error::Api`] 400 if `key` is the first key of its range,
    /// 409 if the range is busy with another operation.
    pub async fn split_at(&self, key: &str) -> Result<OpId> {
        check_key(key)?;
        self.start_split(SplitRequest { key: Some(key.to_owned()), range_id: None }).await
    }

    /// Starts splitting range `range_id` at its median key. Returns the
    /// operation's id. Fails with [`Error::Api`] 404 for an unknown range,
    /// 409 if the range is busy.
    pub async fn split_range(&self, range_id: RangeId) -> Result<OpId> {
        self.start_split(SplitRequest { key: None, range_id: Some(range_id) }).await
    }

    async fn start_split(&self, req: SplitRequest) -> Result<OpId> {
        let body = serde_json::to_vec(&req).map_err(|e| Error::InvalidArgument(format!("cannot encode: {e}")))?;
        // Not replayed after "no answer": a second split could start.
        let call = Call::admin(Method::POST, "/admin/split".into(), Some(body), RequestKind::Conditional);
        let started: OperationStarted = decode(&self.inner.execute(&call).await?)?;
        Ok(started.operation_id)
    }

    /// Every operation the directory remembers (`GET /admin/operations`).
    pub async fn operations(&self) -> Result<Vec<OperationView>> {
        self.admin("/admin/operations").await
    }

    /// One operation. Fails with [`Error::Api`] 404 if there is no such
    /// operation.
    pub async fn operation(&self, id: OpId) -> Result<OperationView> {
        self.admin(&format!("/admin/operations/{id}")).await
    }

    /// Abandons an operation that has not committed yet; returns it as it
    /// is now (phase `aborted`). Fails with [`Error::Api`] 409 once it has
    /// committed, 404 if there is no such operation.
    pub async fn cancel_operation(&self, id: OpId) -> Result<OperationView> {
        // Aborting twice is harmless, so a lost answer may be retried.
        let call = Call::admin(Method::POST, format!("/admin/operations/{id}/cancel"), None, RequestKind::Put);
        decode(&self.inner.execute(&call).await?)
    }

    /// Polls operation `id` every `every` until it is done or aborted, and
    /// returns its last view. `on_update` sees every view polled, the last
    /// one included (to draw progress). A failed poll fails the wait; the
    /// operation itself goes on regardless.
    pub async fn follow_operation(
        &self,
        id: OpId,
        every: Duration,
        mut on_update: impl FnMut(&OperationView),
    ) -> Result<OperationView> {
        loop {
            let view = self.operation(id).await?;
            on_update(&view);
            if view.op.phase.is_terminal() {
                return Ok(view);
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Succeeds once some node answers `GET /health` (with retries).
    pub async fn health(&self) -> Result<()> {
        self.inner.execute(&Call::read("/health".into(), None)).await.map(drop)
    }

    /// One `GET /health` to the node at `endpoint`, without retries.
    /// Connection failures come back as [`Error::Transport`].
    pub async fn health_at(&self, endpoint: &str) -> Result<()> {
        let base = base_url(endpoint)?;
        self.inner.get_once(&base, "/health", self.inner.options.attempt_timeout).await.map(drop)
    }

    /// Reloads the routing cache now (it also reloads itself after failures
    /// and once older than [`ClientOptions::cache_ttl`]).
    pub async fn refresh_routing(&self) -> Result<()> {
        self.inner.refresh(None, Instant::now() + self.inner.options.deadline).await
    }

    /// A snapshot of the routing cache, e.g. to see where a key would go.
    pub fn routing_table(&self) -> RoutingTable {
        self.inner.table().clone()
    }

    async fn admin<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        decode(&self.inner.execute(&Call::read(path.to_owned(), None)).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn client_and_its_futures_can_cross_threads() {
        let c = Client::new(["127.0.0.1:1"]).unwrap();
        let clone = c.clone();
        std::thread::spawn(move || drop(clone)).join().unwrap();
        assert_send(&c.get("k", Consistency::Stale));
        assert_send(&c.put("k", &1, Some(0)));
        assert_send(&c.delete("k", None));
        assert_send(&c.scan_all("", None));
        assert_send(&c.refresh_routing());
        assert_send(&c.directory());
        assert_send(&c.split_at("k"));
        assert_send(&c.follow_operation(1, Duration::from_millis(1), |_| {}));
        assert_send(&c.cancel_operation(1));
    }

    fn error(code: &str, message: &str) -> String {
        serde_json::json!({"error": {"code": code, "message": message}}).to_string()
    }

    fn direct(mock: &crate::mock::Mock) -> Client {
        Client::with_options([&mock.addr], ClientOptions::default().with_smart_routing(false)).unwrap()
    }

    #[tokio::test]
    async fn range_moving_is_retried_within_milliseconds_at_the_same_node() {
        let moving = (503, error("range_moving", "range 1 is being cut over"));
        let ok = (200, r#"{"key":"k","version":4}"#.to_string());
        let mock = crate::mock::Mock::start(vec![moving.clone(), moving.clone(), moving, ok]).await;
        let client = direct(&mock);
        let started = Instant::now();
        let w = client.put("k", &1, None).await.unwrap();
        assert_eq!(w.version, 4);
        // three short waits (at most 2 + 4 + 8 ms), no routing refresh in between
        assert!(started.elapsed() < Duration::from_millis(300), "{:?}", started.elapsed());
        let lines: Vec<String> = mock.received().into_iter().map(|r| r.line).collect();
        assert_eq!(lines, vec!["PUT /v1/kv/k"; 4]);
    }

    #[tokio::test]
    async fn split_and_operation_calls_keep_the_servers_message() {
        let mock = crate::mock::Mock::start(vec![
            (200, r#"{"operation_id": 12}"#.into()),
            (409, error("version_conflict", "range 1 is busy with operation 12")),
            (404, error("not_found", "no operation 99")),
            (409, error("version_conflict", "operation 12 already committed")),
        ])
        .await;
        let client = direct(&mock);
        assert_eq!(client.split_range(1).await.unwrap(), 12);
        match client.split_at("m").await {
            Err(Error::Api { status: 409, message, .. }) => assert!(message.contains("busy")),
            r => panic!("{r:?}"),
        }
        match client.operation(99).await {
            Err(e @ Error::Api { status: 404, .. }) => assert!(e.to_string().contains("no operation 99")),
            r => panic!("{r:?}"),
        }
        assert!(matches!(client.cancel_operation(12).await, Err(Error::Api { status: 409, .. })));
        let received = mock.received();
        assert_eq!(received[0].line, "POST /admin/split");
        assert_eq!(received[0].body, r#"{"range_id":1}"#);
        assert_eq!(received[1].body, r#"{"key":"m"}"#);
        assert_eq!(received[2].line, "GET /admin/operations/99");
        assert_eq!(received[3].line, "POST /admin/operations/12/cancel");
    }

    #[test]
    fn construction_checks_the_endpoints() {
        assert!(matches!(Client::new(Vec::<String>::new()), Err(Error::InvalidArgument(_))));
        assert!(matches!(Client::new(["https://a:1"]), Err(Error::InvalidArgument(_))));
        let c = Client::new(["a:1", "http://a:1/", "b:2"]).unwrap();
        assert_eq!(c.routing_table().seeds(), ["http://a:1", "http://b:2"]);
        assert!(!c.routing_table().has_directory());
    }
}
