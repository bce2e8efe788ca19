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

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_metadata::api::{
    Consistency, Item, KeyspaceRequest, KeyspaceView, MergeRequest, MoveRequest, NodeCondition, NodeStatus,
    OperationStarted, OperationView, PutBody, ScanResult, ShardStatus, SplitRequest, TransferLeaderRequest,
    TransferLeaderResponse, TxnOpKind, TxnRequest, TxnResponse, WriteResult,
};
use cleave_metadata::{Directory, NodeId, OpId, RangeDescriptor, RangeId, ShardId};
use reqwest::Method;
use serde::Serialize;

use crate::endpoint::{base_url_with, check_key, key_path, with_query};
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
        let https = options.ca_cert.is_some();
        let mut urls: Vec<String> = Vec::new();
        for seed in seeds {
            let url = base_url_with(seed.as_ref(), https)?;
            if !urls.contains(&url) {
                urls.push(url);
            }
        }
        if urls.is_empty() {
            return Err(Error::InvalidArgument("at least one endpoint is needed".into()));
        }
        crate::tls::install_provider();
        let builder = reqwest::Client::builder().connect_timeout(options.connect_timeout).tcp_nodelay(true);
        let token = options.token.as_ref().map(|t| t.0.as_str());
        let builder =
            crate::tls::with_credentials(builder, token, options.ca_cert.as_deref()).map_err(Error::InvalidArgument)?;
        let http = builder.build().map_err(Error::Transport)?;
        Ok(Client { inner: Arc::new(Inner::new(http, options, urls)) })
    }

    /// Streams every change to `[req.start, req.end)` (see
    /// [`crate::watch`]): `put`, `delete` and `progress` events, in
    /// order, reconnecting by itself — to another node if need be — from
    /// the last cursor. Ends with an error only when it cannot go on (a
    /// cursor older than the history kept: `ErrorCode::Compacted`; a
    /// refused request). Dropping the stream stops it.
    pub fn watch(&self, req: crate::watch::WatchRequest) -> impl futures::Stream<Item = Result<crate::WatchEvent>> {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(crate::watch::run(self.inner.clone(), req, tx));
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
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
    /// Failures that prove nothing was applied (no leader, a node that
    /// cannot be reached, a stale route) are retried. A put whose outcome is
    /// unknown (a timeout or a reset after the request was sent, a 504, a
    /// 5xx other than 503) is **never replayed**, conditional or not: every
    /// write bumps the version, so a replay would be a second write. It
    /// fails with [`Error::Indeterminate`]; read the key to find out.
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
            timeout_is_final: false,
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
    /// Like [`Client::put`], a delete whose outcome is unknown is not
    /// replayed (a replay could delete someone else's later write): it
    /// fails with [`Error::Indeterminate`].
    pub async fn delete(&self, key: &str, if_version: Option<u64>) -> Result<WriteResult> {
        check_key(key)?;
        let call = Call {
            method: Method::DELETE,
            path: with_query(&key_path(key), &[("if_version", if_version.map(|v| v.to_string()))]),
            body: None,
            route_key: Some(key.to_owned()),
            kind: if if_version.is_some() { RequestKind::Conditional } else { RequestKind::Delete },
            about_key: true,
            timeout_is_final: false,
        };
        decode(&self.inner.execute(&call).await?)
    }

    /// Runs a transaction (`POST /v1/txn`): if every comparison of
    /// `req.compare` holds (a key's version, 0 for absent), `req.success`
    /// runs, else `req.failure` — all of it one atomic step over keys on any
    /// shards, strictly serializable with every other operation. The answer
    /// says which branch ran and gives one result per operation of it.
    ///
    /// A transaction that may write is, like a put, **never replayed** when
    /// its outcome is unknown: it fails with [`Error::Indeterminate`]. One
    /// that only reads is retried like a read.
    pub async fn txn(&self, req: &TxnRequest) -> Result<TxnResponse> {
        let ops = || req.success.iter().chain(&req.failure);
        let writes = ops().any(|o| o.op != TxnOpKind::Get);
        let first = req.compare.iter().map(|c| &c.key).chain(ops().map(|o| &o.key)).min().cloned();
        let call = Call {
            method: Method::POST,
            path: "/v1/txn".into(),
            body: Some(json_body(req)?),
            route_key: first,
            kind: if writes { RequestKind::Conditional } else { RequestKind::Read },
            about_key: false,
            timeout_is_final: false,
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

    /// Starts merging range `range_id` with its right-hand neighbour (one
    /// range of `range_id`'s shard at a bumped epoch). Returns the
    /// operation's id; follow it with [`Client::operation`].
    pub async fn merge_range(&self, range_id: RangeId) -> Result<OpId> {
        self.start_operation("/admin/merge", json_body(&MergeRequest { range_id: Some(range_id) })?).await
    }

    async fn start_split(&self, req: SplitRequest) -> Result<OpId> {
        self.start_operation("/admin/split", json_body(&req)?).await
    }

    /// Starts moving shard `shard_id`'s replica from node `from_node` to
    /// node `to_node` (shard 0 is the metadata group): a new replica is
    /// created on `to_node`, caught up as a learner, swapped in by joint
    /// consensus, and the old one is deleted. Returns the operation's id;
    /// follow it with [`Client::operation`] or [`Client::follow_operation`].
    ///
    /// Fails with [`Error::Api`] 404 for an unknown shard or node, 409 if
    /// the shard is busy with another operation, 400 if the move makes no
    /// sense (no replica on `from_node`, one already on `to_node`, a target
    /// that is not active); with [`Error::InvalidArgument`] if both nodes
    /// are the same.
    pub async fn move_replica(&self, shard_id: ShardId, from_node: NodeId, to_node: NodeId) -> Result<OpId> {
        if from_node == to_node {
            return Err(Error::InvalidArgument(format!("moving shard {shard_id} from node {from_node} to itself")));
        }
        self.start_operation("/admin/move", json_body(&MoveRequest { shard_id, from_node, to_node })?).await
    }

    /// Sends a request that starts an operation and returns its id.
    async fn start_operation(&self, path: &str, body: Vec<u8>) -> Result<OpId> {
        // Not replayed after "no answer": a second operation could start.
        let started: OperationStarted = self.admin_post(path.to_owned(), Some(body), RequestKind::Conditional).await?;
        Ok(started.operation_id)
    }

    /// Declares a hash-spread keyspace: keys under `prefix` are spread over
    /// `hash_buckets` (2–256) buckets, each its own range and shard, while
    /// every request keeps using plain keys. Returns once the keyspace is
    /// active (the buckets are split off). Declaring the same again is
    /// harmless; a prefix holding data or overlapping another keyspace is
    /// refused with [`Error::Api`] 409.
    pub async fn declare_keyspace(&self, prefix: &str, hash_buckets: u32) -> Result<KeyspaceView> {
        let body = json_body(&KeyspaceRequest { hash_buckets: Some(hash_buckets) })?;
        let path = format!("/admin/keyspaces/{}", crate::endpoint::encode(prefix));
        let call = Call::admin(Method::PUT, path, Some(body), RequestKind::Idempotent).with_final_timeout();
        decode(&self.inner.execute(&call).await?)
    }

    /// Makes the replica of shard `shard_id` on node `to_node` its leader
    /// and returns once it leads; returns the node that leads now.
    ///
    /// Fails with [`Error::Api`] 400 if `to_node` holds no voting replica
    /// of the shard, 404 for an unknown shard, and 504 (code `timeout`) if
    /// the node did not take over within the server's wait (the transfer
    /// may still happen; asking again is harmless).
    pub async fn transfer_leader(&self, shard_id: ShardId, to_node: NodeId) -> Result<NodeId> {
        let body = json_body(&TransferLeaderRequest { shard_id, to_node })?;
        // Asking twice for the same leader is harmless, so a lost answer may
        // be retried; but a 504 is the server's verdict, not a lost answer.
        let call = Call::admin(Method::POST, "/admin/transfer-leader".into(), Some(body), RequestKind::Idempotent)
            .with_final_timeout();
        let answer: TransferLeaderResponse = decode(&self.inner.execute(&call).await?)?;
        if answer.shard_id != shard_id {
            return Err(Error::Decode(format!(
                "asked about shard {shard_id}, the answer is about shard {}",
                answer.shard_id
            )));
        }
        Ok(answer.leader)
    }

    /// Starts decommissioning node `node_id`: the cluster moves every
    /// replica off it, then marks it removed. Returns the node's row as it
    /// is now (status `decommissioning`); follow it with
    /// [`Client::follow_decommission`].
    ///
    /// Fails with [`Error::Api`] 404 for an unknown node, and with the
    /// server's refusal if the node was already removed. Decommissioning a
    /// node that is already decommissioning is harmless.
    pub async fn decommission(&self, node_id: NodeId) -> Result<NodeStatus> {
        // Idempotent on the server, so a lost answer may be retried.
        self.admin_post(format!("/admin/nodes/{node_id}/decommission"), None, RequestKind::Idempotent).await
    }

    /// Polls `GET /admin/nodes` every `every` until node `node_id` is
    /// removed, with no deadline of its own (drop the future to stop), and
    /// returns its last row. `on_update` sees every row polled, the last one
    /// included. A failed poll fails the wait (each poll retries within the
    /// client's deadline); the decommission itself goes on regardless. Fails
    /// with [`Error::InvalidArgument`] if the node is not in the list.
    pub async fn follow_decommission(
        &self,
        node_id: NodeId,
        every: Duration,
        on_update: impl FnMut(&NodeStatus),
    ) -> Result<NodeStatus> {
        let node = || async {
            let nodes = self.nodes().await?;
            nodes
                .into_iter()
                .find(|n| n.id == node_id)
                .ok_or_else(|| Error::InvalidArgument(format!("no node {node_id} in the cluster")))
        };
        poll_until(every, node, on_update, |n| n.status == NodeCondition::Removed).await
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
        self.admin_post(format!("/admin/operations/{id}/cancel"), None, RequestKind::Idempotent).await
    }

    /// Polls operation `id` every `every` until it is done or aborted, and
    /// returns its last view. `on_update` sees every view polled, the last
    /// one included (to draw progress). A failed poll fails the wait; the
    /// operation itself goes on regardless.
    pub async fn follow_operation(
        &self,
        id: OpId,
        every: Duration,
        on_update: impl FnMut(&OperationView),
    ) -> Result<OperationView> {
        poll_until(every, || self.operation(id), on_update, |v| v.op.phase.is_terminal()).await
    }

    /// Succeeds once some node answers `GET /health` (with retries).
    pub async fn health(&self) -> Result<()> {
        self.inner.execute(&Call::read("/health".into(), None)).await.map(drop)
    }

    /// One `GET /health` to the node at `endpoint`, without retries.
    /// Connection failures come back as [`Error::Transport`].
    pub async fn health_at(&self, endpoint: &str) -> Result<()> {
        let base = base_url_with(endpoint, self.inner.table().https())?;
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

    async fn admin_post<T: serde::de::DeserializeOwned>(
        &self,
        path: String,
        body: Option<Vec<u8>>,
        kind: RequestKind,
    ) -> Result<T> {
        decode(&self.inner.execute(&Call::admin(Method::POST, path, body, kind)).await?)
    }
}

/// Calls `fetch` every `every` until what it returns is `done`, and returns
/// that; `on_update` sees every answer, the last one included. The first
/// failed fetch ends the wait.
async fn poll_until<T, F: Future<Output = Result<T>>>(
    every: Duration,
    mut fetch: impl FnMut() -> F,
    mut on_update: impl FnMut(&T),
    done: impl Fn(&T) -> bool,
) -> Result<T> {
    loop {
        let answer = fetch().await?;
        on_update(&answer);
        if done(&answer) {
            return Ok(answer);
        }
        tokio::time::sleep(every).await;
    }
}

/// A request body as JSON.
fn json_body<T: Serialize>(req: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(req).map_err(|e| Error::InvalidArgument(format!("cannot encode the request: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleave_metadata::api::ErrorCode;

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
        assert_send(&c.move_replica(1, 2, 3));
        assert_send(&c.transfer_leader(1, 2));
        assert_send(&c.decommission(2));
        assert_send(&c.follow_decommission(2, Duration::from_millis(1), |_| {}));
    }

    /// A client of one endpoint, without smart routing, quick to retry.
    fn plain_client(addr: &str) -> Client {
        let opts = ClientOptions::default()
            .with_smart_routing(false)
            .with_backoff(Duration::from_millis(1), Duration::from_millis(2));
        Client::with_options([addr], opts).unwrap()
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

    fn puts_and_deletes(mock: &crate::mock::Mock) -> Vec<String> {
        mock.received().into_iter().map(|r| r.line).filter(|l| !l.starts_with("GET")).collect()
    }

    #[tokio::test]
    async fn a_put_whose_answer_was_a_504_is_not_replayed() {
        let mock = crate::mock::Mock::start_matching(vec![
            ("PUT".into(), 504, error("timeout", "outcome unknown")),
            ("PUT".into(), 200, r#"{"key":"k","version":3}"#.into()),
        ])
        .await;
        let client = direct(&mock);
        let r = client.put("k", &1, None).await;
        assert!(matches!(r, Err(Error::Indeterminate(_))), "{r:?}");
        assert_eq!(puts_and_deletes(&mock), ["PUT /v1/kv/k"], "exactly one PUT was sent");
    }

    #[tokio::test]
    async fn no_write_is_replayed_after_a_lost_answer_or_a_server_error() {
        // status 0: the connection is closed without an answer
        for (status, body) in
            [(0, String::new()), (504, error("timeout", "x")), (500, error("internal", "x")), (502, "".into())]
        {
            let script = |method: &str| {
                let ok = r#"{"key":"k","version":2}"#.to_string();
                vec![(method.to_string(), status, body.clone()), (method.to_string(), 200, ok)]
            };
            let mock = crate::mock::Mock::start_matching(script("PUT")).await;
            let r = direct(&mock).put("k", &1, None).await;
            assert!(matches!(r, Err(Error::Indeterminate(_))), "put after {status}: {r:?}");
            assert_eq!(puts_and_deletes(&mock), ["PUT /v1/kv/k"], "after {status}");
            let mock = crate::mock::Mock::start_matching(script("DELETE")).await;
            let r = direct(&mock).delete("k", None).await;
            assert!(matches!(r, Err(Error::Indeterminate(_))), "delete after {status}: {r:?}");
            assert_eq!(puts_and_deletes(&mock), ["DELETE /v1/kv/k"], "after {status}");
            let mock = crate::mock::Mock::start_matching(script("PUT")).await;
            let r = direct(&mock).put("k", &1, Some(1)).await;
            assert!(matches!(r, Err(Error::Indeterminate(_))), "cas after {status}: {r:?}");
            assert_eq!(puts_and_deletes(&mock), ["PUT /v1/kv/k"], "after {status}");
        }
    }

    #[tokio::test]
    async fn a_write_refused_with_503_is_retried_and_a_read_is_retried_after_a_504() {
        let mock = crate::mock::Mock::start_matching(vec![
            ("PUT".into(), 503, error("unavailable", "no leader")),
            ("PUT".into(), 200, r#"{"key":"k","version":1}"#.into()),
            ("GET /v1/kv".into(), 504, error("timeout", "x")),
            ("GET /v1/kv".into(), 200, r#"{"key":"k","value":5,"version":1}"#.into()),
        ])
        .await;
        let client = plain_client(&mock.addr);
        assert_eq!(client.put("k", &5, None).await.unwrap().version, 1);
        assert_eq!(client.get("k", Consistency::Linearizable).await.unwrap().unwrap().version, 1);
        let lines: Vec<String> = mock.received().into_iter().map(|r| r.line).collect();
        let kv: Vec<&String> = lines.iter().filter(|l| l.contains("/v1/kv/")).collect();
        assert_eq!(
            kv,
            [
                "PUT /v1/kv/k",
                "PUT /v1/kv/k",
                "GET /v1/kv/k?consistency=linearizable",
                "GET /v1/kv/k?consistency=linearizable"
            ]
        );
    }

    #[tokio::test]
    async fn an_error_after_a_replayed_idempotent_request_is_indeterminate() {
        // The cancel's first attempt may have aborted the operation; the
        // second one's 409 may be about what the first one did.
        let mock = crate::mock::Mock::start_matching(vec![
            ("POST".into(), 504, error("timeout", "x")),
            ("POST".into(), 409, error("version_conflict", "operation 3 is not running")),
        ])
        .await;
        let client = plain_client(&mock.addr);
        let r = client.cancel_operation(3).await;
        assert!(matches!(r, Err(Error::Indeterminate(_))), "{r:?}");
        let posts = mock.received().into_iter().filter(|r| r.line.starts_with("POST")).count();
        assert_eq!(posts, 2, "the cancel was asked again");
    }

    /// A directory with node 1 at `a` and node 2 at `b`; shard 1 (on node
    /// 1) owns the whole key space, shard 2 (on node 2) nothing yet.
    fn two_node_directory(a: &str, b: &str) -> String {
        use cleave_metadata::{NodeDescriptor, NodeState, RangeState, Replica, ShardDescriptor};
        let mut d = Directory { version: 5, ..Default::default() };
        for (id, addr) in [(1, a), (2, b)] {
            d.nodes.insert(
                id,
                NodeDescriptor {
                    id,
                    raft_addr: format!("r:{id}"),
                    api_addr: Some(addr.into()),
                    state: NodeState::Active,
                },
            );
            d.shards.insert(
                id,
                ShardDescriptor {
                    shard_id: id,
                    replicas: vec![Replica { replica_id: id, node_id: id }],
                    conf_version: 1,
                },
            );
        }
        d.ranges.insert(
            "".into(),
            RangeDescriptor {
                range_id: 1,
                start: "".into(),
                end: None,
                shard_id: 1,
                epoch: 1,
                state: RangeState::Active,
            },
        );
        serde_json::to_string(&d).unwrap()
    }

    #[tokio::test]
    async fn a_421_patches_the_route_and_the_retry_goes_to_the_new_owner() {
        // The current server never answers 421 for KV requests (its router
        // absorbs stale routes), but the API documents it for servers and
        // proxies that do: the client keeps handling it, tested here.
        let (a, b) = (
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        );
        let (a_addr, b_addr) = (a.local_addr().unwrap().to_string(), b.local_addr().unwrap().to_string());
        drop((a, b));
        let dir = two_node_directory(&a_addr, &b_addr);
        let shards = r#"[{"shard_id":1,"leader":1,"replicas":[],"conf_version":1},
                         {"shard_id":2,"leader":2,"replicas":[],"conf_version":1}]"#;
        let now_at_2 = RangeDescriptor {
            range_id: 2,
            start: "".into(),
            end: None,
            shard_id: 2,
            epoch: 2,
            state: cleave_metadata::RangeState::Active,
        };
        let moved = serde_json::json!({"error": {"code": "stale_route", "message": "moved", "ranges": [now_at_2]}});
        let routes = |put: Option<(u16, String)>| {
            let mut s: Vec<(String, u16, String)> = Vec::new();
            for _ in 0..5 {
                s.push(("GET /admin/directory".into(), 200, dir.clone()));
                s.push(("GET /admin/shards".into(), 200, shards.to_string()));
            }
            s.extend(put.map(|(status, body)| ("PUT /v1/kv/k".to_string(), status, body)));
            s
        };
        let mock_a = crate::mock::Mock::start_matching_at(&a_addr, routes(Some((421, moved.to_string())))).await;
        let mock_b =
            crate::mock::Mock::start_matching_at(&b_addr, routes(Some((200, r#"{"key":"k","version":7}"#.into()))))
                .await;
        let client = Client::with_options(
            [&a_addr],
            ClientOptions::default().with_backoff(Duration::from_millis(1), Duration::from_millis(2)),
        )
        .unwrap();
        assert_eq!(client.put("k", &1, None).await.unwrap().version, 7);
        assert_eq!(puts_and_deletes(&mock_a), ["PUT /v1/kv/k"]);
        assert_eq!(puts_and_deletes(&mock_b), ["PUT /v1/kv/k"]);
        assert_eq!(client.routing_table().route("k").unwrap().shard_id, 2, "the 421's range was patched in");
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

    #[tokio::test]
    async fn a_move_is_started_once_and_not_replayed_after_no_answer() {
        let mock = crate::mock::Mock::start(vec![
            (200, r#"{"operation_id": 5}"#.into()),
            (409, error("version_conflict", "shard 3 is busy with operation 5")),
            (504, error("timeout", "no answer from the metadata leader")),
        ])
        .await;
        let client = direct(&mock);
        assert_eq!(client.move_replica(3, 1, 4).await.unwrap(), 5);
        match client.move_replica(3, 1, 4).await {
            Err(Error::Api { status: 409, message, .. }) => assert!(message.contains("busy")),
            r => panic!("{r:?}"),
        }
        assert!(matches!(client.move_replica(3, 1, 4).await, Err(Error::Indeterminate(_))));
        assert!(matches!(client.move_replica(3, 2, 2).await, Err(Error::InvalidArgument(_))), "checked locally");
        let received = mock.received();
        assert_eq!(received.len(), 3, "the 504 was not replayed, the same-node move was not sent: {received:?}");
        assert_eq!(received[0].line, "POST /admin/move");
        assert_eq!(received[0].body, r#"{"shard_id":3,"from_node":1,"to_node":4}"#);
    }

    #[tokio::test]
    async fn a_leader_transfer_returns_the_new_leader_and_its_504_is_final() {
        let mock = crate::mock::Mock::start(vec![
            (200, r#"{"shard_id": 3, "leader": 4}"#.into()),
            (400, error("bad_request", "node 9 holds no replica of shard 3")),
            (504, error("timeout", "shard 3: node 4 did not take over in time")),
        ])
        .await;
        let client = direct(&mock);
        assert_eq!(client.transfer_leader(3, 4).await.unwrap(), 4);
        assert!(matches!(client.transfer_leader(3, 9).await, Err(Error::Api { status: 400, .. })));
        match client.transfer_leader(3, 4).await {
            Err(e @ Error::Api { status: 504, code: Some(ErrorCode::Timeout), .. }) => {
                assert!(e.to_string().contains("did not take over"), "{e}")
            }
            r => panic!("{r:?}"),
        }
        let received = mock.received();
        assert_eq!(received.len(), 3, "{received:?}");
        assert_eq!(received[0].line, "POST /admin/transfer-leader");
        assert_eq!(received[0].body, r#"{"shard_id":3,"to_node":4}"#);
    }

    fn node_row(status: &str, replicas: usize) -> serde_json::Value {
        let state = match status {
            "decommissioning" | "removed" => status,
            _ => "active",
        };
        serde_json::json!({"id": 4, "raft_addr": "h:7104", "api_addr": "h:7004", "status": status, "state": state,
                           "liveness": "up", "last_heartbeat_ms": 5, "replicas": replicas, "leaders": 0})
    }

    #[tokio::test]
    async fn decommission_is_followed_until_the_node_is_removed() {
        let other = serde_json::json!({"id": 1, "raft_addr": "h:7101", "api_addr": null, "status": "up",
                                       "state": "active", "liveness": "up", "last_heartbeat_ms": 5,
                                       "replicas": 9, "leaders": 3});
        let list = |row: serde_json::Value| (200, serde_json::json!([other, row]).to_string());
        let mock = crate::mock::Mock::start(vec![
            (200, node_row("decommissioning", 3).to_string()),
            // a node that has not applied the decommission yet answers first
            list(node_row("up", 3)),
            list(node_row("decommissioning", 1)),
            list(node_row("decommissioning", 0)),
            list(node_row("removed", 0)),
            (404, error("not_found", "no node 8")),
        ])
        .await;
        let client = direct(&mock);
        let started = client.decommission(4).await.unwrap();
        assert_eq!((started.status, started.replicas), (NodeCondition::Decommissioning, 3));
        let mut seen = Vec::new();
        let last = client.follow_decommission(4, Duration::from_millis(1), |n| seen.push(n.replicas)).await.unwrap();
        assert_eq!(last.status, NodeCondition::Removed);
        assert_eq!(seen, [3, 1, 0, 0]);
        assert!(matches!(client.decommission(8).await, Err(Error::Api { status: 404, .. })));
        let lines: Vec<String> = mock.received().into_iter().map(|r| r.line).collect();
        assert_eq!(lines[0], "POST /admin/nodes/4/decommission");
        assert_eq!(lines[1..5], ["GET /admin/nodes"; 4]);
        assert_eq!(lines[5], "POST /admin/nodes/8/decommission");
    }

    #[tokio::test]
    async fn following_an_unknown_node_fails() {
        let mock = crate::mock::Mock::start(vec![(200, "[]".into())]).await;
        let r = direct(&mock).follow_decommission(4, Duration::from_millis(1), |_| {}).await;
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    }

    #[test]
    fn construction_checks_the_endpoints() {
        assert!(matches!(Client::new(Vec::<String>::new()), Err(Error::InvalidArgument(_))));
        assert!(matches!(Client::new(["ftp://a:1"]), Err(Error::InvalidArgument(_))));
        let c = Client::new(["a:1", "http://a:1/", "b:2"]).unwrap();
        assert_eq!(c.routing_table().seeds(), ["http://a:1", "http://b:2"]);
        assert!(!c.routing_table().has_directory());
        assert!(!c.routing_table().https());
        // With a CA certificate, bare addresses are HTTPS (and the nodes the
        // directory names too); a CA file without a certificate is refused.
        let opts = |pem: &[u8]| ClientOptions::default().with_ca_cert(Some(pem.to_vec()));
        let bad = Client::with_options(["a:1"], opts(b"no certificate here"));
        assert!(matches!(bad, Err(Error::InvalidArgument(_))), "{bad:?}");
        let c = Client::new(["https://a:1"]).unwrap();
        assert!(c.routing_table().https());
        // A token that cannot travel in a header is refused up front.
        let t = |tok: &str| ClientOptions::default().with_token(Some(tok.to_string()));
        assert!(matches!(Client::with_options(["a:1"], t("has space")), Err(Error::InvalidArgument(_))));
        assert!(matches!(Client::with_options(["a:1"], t("")), Err(Error::InvalidArgument(_))));
        assert!(Client::with_options(["a:1"], t("fine-token")).is_ok());
        assert_eq!(format!("{:?}", t("s3cret").token), "Some(BearerToken(..))", "never printed");
    }
}
