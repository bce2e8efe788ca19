//! Routing a key to the replica that can serve it.
//!
//! The API layer calls [`Router::write`], [`Router::read`] and [`Router::scan`]
//! with user keys. They look the key's range up in the directory, stamp the
//! command with the range's id and epoch, and execute it on the shard:
//! locally when this node leads the shard, otherwise forwarded (one RPC hop)
//! to the leader. A refusal that proves nothing was applied is retried
//! until the request's deadline — a stale route (421) at once after a
//! directory refresh, a frozen range every 2 ms, no leader yet with
//! backoff; an answer whose outcome is unknown is never retried.
//!
//! One deadline bounds a request from end to end: every step gets the time
//! that is left of it, not a fresh timeout — a proposal, a read barrier, a
//! directory refresh, a forwarding hop (which carries the time left to the
//! node it goes to) — so nothing commits long after the client gave up.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_metadata::{Directory, NodeId, ShardId, META_GROUP};

use crate::command::{Command, CommandResponse, KvCommand, KvError, KvOp};
use crate::kv;
use crate::node::Node;
use crate::raft::{GroupRaft, ReadError, SmState, WriteError};
use crate::rpc::{self, ExecError, Lane, NodeCall, Request, Response, RpcError};

/// Forwarding hops allowed before giving up (a leader change in flight).
const MAX_HOPS: u8 = 3;

/// How long a node-internal request (a split step, a membership change, a
/// status look) may take end to end, forwarding included.
pub const INTERNAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The deadline of a node-internal request started now.
pub fn internal_deadline() -> Instant {
    Instant::now() + INTERNAL_TIMEOUT
}

/// The time left until `deadline` (zero once it passed).
pub fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// The least time worth starting a proposal or a hop with. With less left, a
/// step is not started at all and the request fails as *not applied* (503):
/// a proposal handed to Raft with no time to wait for it would answer
/// "outcome unknown" and commit after the client gave up.
pub const MIN_ATTEMPT: Duration = Duration::from_millis(20);

/// What a forwarded request keeps back for the answer's way home: a tenth of
/// the time left, at least 5 ms, so the next node gives up before we do.
fn hop_margin(left: Duration) -> Duration {
    (left / 10).max(Duration::from_millis(5))
}

/// The budget, in milliseconds, a request forwarded now carries to the next
/// node: what is left of `deadline` less the hop margin.
pub fn budget_ms(deadline: Instant) -> u64 {
    let l = left(deadline);
    l.saturating_sub(hop_margin(l)).as_millis() as u64
}

/// The refusal of a step there is no time left to start (nothing was sent).
fn out_of_time(what: &str) -> ExecError {
    ExecError::Unavailable(format!("request deadline reached before {what}"))
}

/// The deadline of a request that arrived with `budget_ms` left, never
/// beyond this node's own limit `max`.
pub fn deadline_of(budget_ms: u64, max: Duration) -> Instant {
    Instant::now() + Duration::from_millis(budget_ms).min(max)
}

/// How long a range may answer "moving" before a retry refreshes the
/// directory first (a refresh is a whole heartbeat: not every few
/// milliseconds; a cutover normally ends well within this).
const MOVING_REFRESH: Duration = Duration::from_millis(250);

/// Whether retrying after `e` is safe and useful.
pub(crate) fn retryable(e: &ExecError) -> bool {
    matches!(
        e,
        ExecError::NoLeader { .. }
            | ExecError::Unavailable(_)
            | ExecError::Kv(KvError::WrongRange { .. } | KvError::RangeMoving)
    )
}

/// Retries `attempt` with backoff while it fails retryably, until `deadline`.
pub(crate) async fn with_retries<T, F, Fut>(
    node: &Router<'_>,
    deadline: Instant,
    mut attempt: F,
) -> Result<T, ExecError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ExecError>>,
{
    let mut backoff = Duration::from_millis(10);
    // Since when the range has answered "moving" without a directory refresh.
    let mut moving_since: Option<Instant> = None;
    loop {
        match attempt().await {
            Err(e) if retryable(&e) && Instant::now() + backoff < deadline => {
                tracing::debug!("retrying after: {e}");
                match e {
                    // A stale route: learn the new directory and go at once.
                    ExecError::Kv(KvError::WrongRange { .. }) => {
                        metrics::counter!("cleave_router_stale_routes_total").increment(1);
                        node.refresh_directory_by(deadline).await
                    }
                    // A cutover in progress lasts milliseconds: poll closely,
                    // and now and then learn the directory anew (a source
                    // still frozen while its target already serves: the
                    // source's last step of the cutover was cut short).
                    ExecError::Kv(KvError::RangeMoving) => {
                        let since = *moving_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= MOVING_REFRESH {
                            moving_since = None;
                            node.refresh_directory_by(deadline).await;
                        } else {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                    }
                    _ => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(100));
                    }
                }
            }
            Err(e) if retryable(&e) => {
                return Err(match e {
                    ExecError::Kv(KvError::WrongRange { .. } | KvError::RangeMoving) | ExecError::NoLeader { .. } => {
                        ExecError::Unavailable(e.to_string())
                    }
                    e => e,
                })
            }
            r => return r,
        }
    }
}

/// Checks that replica `g`'s shard owns all of `[start, end)` (a point read
/// of `key` passes `start = end = key`) and takes a RocksDB snapshot under
/// the same state lock. The state machine writes each apply batch while
/// holding that lock for writing, so the snapshot holds exactly the data of
/// the state that was checked: a `SplitDone` applied after the check cannot
/// delete the data under the read. `Ok(None)`: a snapshot install is
/// replacing this replica's data; read elsewhere.
///
/// With `linearizable`, a range frozen for a split is refused
/// (`RangeMoving`, retried in milliseconds) for reads as for writes: the
/// split's target may take writes as soon as the split commits, before this
/// shard lets go of the range, and a read here would miss them. A stale
/// read promises no such thing and is served.
pub(crate) fn owned_snapshot<'a>(
    db: &'a crate::storage::Db,
    g: &GroupRaft,
    (start, end): (&str, Option<&str>),
    linearizable: bool,
) -> Result<Option<kv::Snapshot<'a>>, ExecError> {
    let state = g.state.read().unwrap();
    let SmState::Shard(s) = &*state else { return Err(ExecError::Internal("not a shard".into())) };
    if g.is_installing() {
        return Ok(None);
    }
    if !s.owns(start, end) {
        return Err(ExecError::Kv(KvError::WrongRange { ranges: s.ranges.clone() }));
    }
    // `covers(start)` for a point read, whose empty `[key, key)` overlaps nothing.
    let frozen = |c: &kv::Capture| c.frozen_at.is_some() && (c.covers(start) || c.overlaps(start, end));
    if linearizable && s.captures.iter().any(frozen) {
        Err(ExecError::Kv(KvError::RangeMoving))
    } else {
        Ok(Some(db.snapshot()))
    }
}

/// Routing and serving of requests: see the module.
pub struct Router<'a> {
    node: &'a Node,
}

impl<'a> Router<'a> {
    pub fn new(node: &'a Node) -> Self {
        Router { node }
    }

    /// Sends a node-level request to another node; answers its typed reply.
    pub async fn call<R: NodeCall>(&self, addr: &str, req: R, timeout: Duration) -> Result<R::Reply, ExecError> {
        self.call_on(Lane::Default, addr, req, timeout).await
    }

    /// [`Router::call`] on the connection of `lane`.
    async fn call_on<R: NodeCall>(
        &self,
        lane: Lane,
        addr: &str,
        req: R,
        timeout: Duration,
    ) -> Result<R::Reply, ExecError> {
        match self.node.ctx().transport.call_on(lane, addr, Request::Node(req.request()), timeout).await {
            Ok(Response::Node(r)) => R::reply(r?),
            Ok(other) => Err(ExecError::Internal(format!("a node request answered with {other:?}"))),
            Err(RpcError::Connect { addr, msg }) => Err(ExecError::Unavailable(format!("{addr}: {msg}"))),
            Err(e @ RpcError::Timeout(_)) => Err(ExecError::Timeout(e.to_string())),
            Err(e) => Err(ExecError::Indeterminate(e.to_string())),
        }
    }

    /// Sends `req` to node `id` (handled in place when it is this node).
    pub async fn node_call<R: NodeCall>(&self, id: NodeId, req: R) -> Result<R::Reply, ExecError> {
        self.node_call_on(Lane::Default, id, req).await
    }

    /// Sends `req` to node `id` on the bulk lane: bulk data, which must not
    /// queue ahead of Raft traffic (handled in place when it is this node).
    pub async fn bulk_call<R: NodeCall>(&self, id: NodeId, req: R) -> Result<R::Reply, ExecError> {
        self.node_call_on(Lane::Bulk, id, req).await
    }

    async fn node_call_on<R: NodeCall>(&self, lane: Lane, id: NodeId, req: R) -> Result<R::Reply, ExecError> {
        if id == self.node.id() {
            return R::reply(Box::pin(self.node.handle_node_request(req.request())).await?);
        }
        let addr = self
            .node
            .dir_cache()
            .raft_addr_of(&self.node.directory(), id)
            .ok_or(ExecError::Unavailable(format!("node {id} has no known address")))?;
        self.call_on(lane, &addr, req, INTERNAL_TIMEOUT).await
    }

    /// Runs `local` here if this node leads `shard` (after a read barrier),
    /// else forwards `req` to the leader.
    pub async fn at_leader<R: NodeCall, F, Fut>(
        &self,
        shard: ShardId,
        hops: u8,
        req: impl Fn(u8) -> R,
        local: F,
    ) -> Result<R::Reply, ExecError>
    where
        F: FnOnce(Arc<GroupRaft>) -> Fut,
        Fut: std::future::Future<Output = Result<R::Reply, ExecError>>,
    {
        self.at_leader_confirming(true, shard, hops, req, local).await
    }

    /// Like [`Router::at_leader`], without confirming leadership first:
    /// answered by the replica that believes it leads (or forwarded to the
    /// leader it knows of). For answers that are right whoever gives them,
    /// asked often — a split driver polls its source's forwarder every
    /// millisecond while writes are paused, and a read-index round per poll
    /// both slowed the poll and loaded the paused shard.
    pub async fn at_known_leader<R: NodeCall, F, Fut>(
        &self,
        shard: ShardId,
        hops: u8,
        req: impl Fn(u8) -> R,
        local: F,
    ) -> Result<R::Reply, ExecError>
    where
        F: FnOnce(Arc<GroupRaft>) -> Fut,
        Fut: std::future::Future<Output = Result<R::Reply, ExecError>>,
    {
        self.at_leader_confirming(false, shard, hops, req, local).await
    }

    /// [`Router::at_leader`] (`confirm`: with a read barrier) and
    /// [`Router::at_known_leader`].
    async fn at_leader_confirming<R: NodeCall, F, Fut>(
        &self,
        confirm: bool,
        shard: ShardId,
        hops: u8,
        req: impl Fn(u8) -> R,
        local: F,
    ) -> Result<R::Reply, ExecError>
    where
        F: FnOnce(Arc<GroupRaft>) -> Fut,
        Fut: std::future::Future<Output = Result<R::Reply, ExecError>>,
    {
        let deadline = internal_deadline();
        let leader = match self.node.group(shard) {
            Some(g) => {
                let here = if confirm { self.barrier(&g, shard, deadline).await } else { self.believed_leader(&g) };
                match here {
                    Ok(()) => return local(g).await,
                    Err(Some(l)) => Some(l),
                    Err(None) => return Err(ExecError::NoLeader { group: shard }),
                }
            }
            None => None,
        };
        self.forward(shard, hops, leader, deadline, req).await
    }

    /// Whether replica `g` believes it leads, in [`Router::barrier`]'s terms:
    /// `Err(Some(node))` names another leader, `Err(None)` none known.
    fn believed_leader(&self, g: &GroupRaft) -> Result<(), Option<u64>> {
        let s = g.status();
        match s.leader {
            _ if s.is_leader => Ok(()),
            Some(l) if l.node_id != self.node.id() => Err(Some(l.node_id)),
            _ => Err(None),
        }
    }

    /// Remembers a requested key of `shard` for load-based split points.
    fn sample_key(&self, g: &GroupRaft, key: &str) {
        // Sample one request in eight to keep the cost off the hot path.
        if g.served.load(Ordering::Relaxed).is_multiple_of(8) {
            let mut s = g.samples.lock().unwrap();
            if s.len() >= 1024 {
                s.pop_front();
            }
            s.push_back(key.to_string());
        }
    }

    /// Refreshes the directory, giving up at `deadline`.
    async fn refresh_directory_by(&self, deadline: Instant) {
        let _ = tokio::time::timeout(left(deadline), self.node.meta_leader().refresh_directory()).await;
    }

    /// The range of `key` in this node's directory, fetched first if
    /// this node has none yet.
    pub(crate) async fn range_of(
        &self,
        key: &str,
        deadline: Instant,
    ) -> Result<cleave_metadata::RangeDescriptor, ExecError> {
        match self.node.directory().lookup(key) {
            Some(r) => Ok(r.clone()),
            None => self.route(key, deadline).await,
        }
    }

    /// The range of `key`, fetching the directory first if this node has none yet.
    async fn route(&self, key: &str, deadline: Instant) -> Result<cleave_metadata::RangeDescriptor, ExecError> {
        self.refresh_directory_by(deadline).await;
        self.node.directory().lookup(key).cloned().ok_or(ExecError::Unavailable("directory not loaded yet".into()))
    }

    /// Writes one key through its shard's leader. Returns the new version.
    pub async fn write(&self, op: KvOp) -> Result<u64, ExecError> {
        self.write_keyed(op, false).await
    }

    /// A write of a user's key: mapped to its stored key (`keyspace`: under
    /// a hash-spread keyspace, its bucket's) on every attempt, by the
    /// directory the attempt is routed by — a write refused for a stale
    /// route is mapped again with the directory that refusal brought.
    pub async fn write_user(&self, op: KvOp) -> Result<u64, ExecError> {
        self.write_keyed(op, true).await
    }

    async fn write_keyed(&self, op: KvOp, map: bool) -> Result<u64, ExecError> {
        let deadline = Instant::now() + self.node.settings().write_timeout;
        let key = match &op {
            KvOp::Put { key, .. } | KvOp::Delete { key, .. } => key.clone(),
        };
        let started = Instant::now();
        let mut shard_label = 0;
        let shard_label_ref = &mut shard_label;
        let (key_ref, op_ref) = (&key, &op);
        let r = crate::txn::resolve::settling(self, deadline, || {
            let range = self.node.directory().lookup(key_ref).cloned();
            if let Some(r) = &range {
                *shard_label_ref = r.shard_id;
            }
            with_retries(self, deadline, move || {
                let dir = self.node.directory();
                let stored = stored_key(&dir, key_ref, map);
                async move {
                    let stored = stored?;
                    let op = match op_ref.clone() {
                        KvOp::Put { value, if_version, .. } => KvOp::Put { key: stored.clone(), value, if_version },
                        KvOp::Delete { if_version, .. } => KvOp::Delete { key: stored.clone(), if_version },
                    };
                    let range = match dir.lookup(&stored).cloned() {
                        Some(r) => r,
                        None => self.route(&stored, deadline).await?,
                    };
                    let cmd = KvCommand { range_id: range.range_id, epoch: range.epoch, op };
                    self.exec_write(range.shard_id, cmd, 0, deadline).await
                }
            })
        })
        .await;
        crate::metrics::record_request(shard_label, "write", started, r.is_ok());
        r
    }

    /// Reads one key. `linearizable` reads go through the shard leader.
    pub async fn read(&self, key: &str, linearizable: bool) -> Result<Option<(u64, String)>, ExecError> {
        self.read_keyed(key, linearizable, false).await
    }

    /// Reads one user's key (mapped as [`Router::write_user`] maps it).
    pub async fn read_user(&self, key: &str, linearizable: bool) -> Result<Option<(u64, String)>, ExecError> {
        self.read_keyed(key, linearizable, true).await
    }

    async fn read_keyed(&self, key: &str, linearizable: bool, map: bool) -> Result<Option<(u64, String)>, ExecError> {
        let deadline = Instant::now() + self.node.settings().write_timeout;
        let started = Instant::now();
        let mut shard_label = 0;
        let shard_label_ref = &mut shard_label;
        let r = crate::txn::resolve::settling(self, deadline, || {
            let range = self.node.directory().lookup(key).cloned();
            if let Some(r) = &range {
                *shard_label_ref = r.shard_id;
            }
            with_retries(self, deadline, move || {
                let dir = self.node.directory();
                let stored = stored_key(&dir, key, map);
                async move {
                    let stored = stored?;
                    let range = match dir.lookup(&stored).cloned() {
                        Some(r) => r,
                        None => self.route(&stored, deadline).await?,
                    };
                    self.exec_read(range.shard_id, &stored, linearizable, 0, deadline).await
                }
            })
        })
        .await;
        crate::metrics::record_request(shard_label, "read", started, r.is_ok());
        r
    }

    /// Live items in `[start, end)` across ranges, in key order, at most
    /// `limit`. Returns the items and whether more may follow.
    pub async fn scan(
        &self,
        start: &str,
        end: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<(String, u64, String)>, bool), ExecError> {
        let deadline = Instant::now() + self.node.settings().write_timeout;
        let mut out: Vec<(String, u64, String)> = Vec::new();
        let mut cursor = start.to_string();
        loop {
            if out.len() >= limit {
                return Ok((out, true));
            }
            if end.is_some_and(|e| cursor.as_str() >= e) {
                return Ok((out, false));
            }
            let want = limit - out.len();
            let cur = cursor.clone();
            let cur = &cur;
            let (items, range_end) = crate::txn::resolve::settling(self, deadline, || {
                with_retries(self, deadline, move || {
                    let range = self.node.directory().lookup(cur).cloned();
                    let cur = cur.clone();
                    async move {
                        let range = match range {
                            Some(r) => r,
                            None => self.route(&cur, deadline).await?,
                        };
                        let stop = match (&range.end, end) {
                            (Some(a), Some(b)) => Some(a.as_str().min(b).to_string()),
                            (Some(a), None) => Some(a.clone()),
                            (None, b) => b.map(str::to_string),
                        };
                        let items = self.exec_scan(range.shard_id, &cur, stop.as_deref(), want, 0, deadline).await?;
                        Ok((items, range.end.clone()))
                    }
                })
            })
            .await?;
            let got = items.len();
            out.extend(items);
            if got >= want {
                return Ok((out, true));
            }
            match range_end {
                Some(e) => cursor = e,
                None => return Ok((out, false)),
            }
        }
    }

    /// Sends `req` (built for the next hop, at the moment it is sent, so a
    /// budget it carries is current) to `group`'s leader, or to each replica
    /// in turn when the leader is not known, until `deadline`.
    pub(crate) async fn forward<R: NodeCall>(
        &self,
        group: ShardId,
        hops: u8,
        leader: Option<u64>,
        deadline: Instant,
        req: impl Fn(u8) -> R,
    ) -> Result<R::Reply, ExecError> {
        if hops >= MAX_HOPS {
            return Err(ExecError::NoLeader { group });
        }
        let (dir, cache) = (self.node.directory(), self.node.dir_cache());
        let targets: Vec<String> =
            match leader.filter(|n| *n != self.node.id()).and_then(|n| cache.raft_addr_of(&dir, n)) {
                Some(addr) => vec![addr],
                None => cache.candidates(&dir, group),
            };
        let mut last = ExecError::NoLeader { group };
        for addr in targets {
            if left(deadline) < MIN_ATTEMPT {
                return Err(out_of_time(&format!("forwarding to group {group}'s leader")));
            }
            match self.call(&addr, req(hops + 1), left(deadline)).await {
                Err(e @ ExecError::Unavailable(_)) => last = e,
                r => return r,
            }
        }
        Err(last)
    }

    /// Proposes `cmd` to this node's replica of `group`. `Ok(Ok(..))`: it
    /// was applied here; `Ok(Err(leader))`: this node does not lead the group
    /// (or has no replica) and the request belongs at `leader`, if known.
    pub(crate) async fn propose_here(
        &self,
        group: u64,
        cmd: Command,
        timeout: Duration,
    ) -> Result<Result<(Arc<GroupRaft>, CommandResponse), Option<u64>>, ExecError> {
        let Some(g) = self.node.group(group) else { return Ok(Err(None)) };
        if timeout < MIN_ATTEMPT {
            return Err(out_of_time(&format!("proposing to group {group}")));
        }
        match tokio::time::timeout(timeout, g.write(cmd)).await {
            Err(_) => Err(ExecError::Timeout(format!("entry for group {group} not applied in time"))),
            Ok(Ok(resp)) => Ok(Ok((g, resp))),
            Ok(Err(WriteError::NotLeader { leader: Some(l) })) if l.node_id != self.node.id() => {
                Ok(Err(Some(l.node_id)))
            }
            Ok(Err(WriteError::NotLeader { .. })) => Err(ExecError::NoLeader { group }),
            Ok(Err(WriteError::Indeterminate(m))) => Err(ExecError::Indeterminate(m)),
            // The replica was stopped under the write because it was removed
            // (a move's source, a GC'd leftover): openraft cannot tell whether
            // the entry reached the log first, so the outcome is unknown (as
            // with a leader change), and the client retries elsewhere.
            Ok(Err(WriteError::Fatal(m))) if self.was_removed(group, &g) => {
                Err(ExecError::Indeterminate(format!("replica of group {group} removed during the write ({m})")))
            }
            Ok(Err(WriteError::Fatal(m))) => Err(ExecError::Internal(m)),
        }
    }

    /// Whether `g`, a replica of `group` this node held, has since been
    /// removed from it (stopped and deleted, or replaced by a newer replica).
    fn was_removed(&self, group: u64, g: &Arc<GroupRaft>) -> bool {
        self.node.group(group).is_none_or(|cur| !Arc::ptr_eq(&cur, g))
    }

    /// Executes a write on `shard`: here if this node leads it, else at the leader.
    pub async fn exec_write(
        &self,
        shard: ShardId,
        cmd: KvCommand,
        hops: u8,
        deadline: Instant,
    ) -> Result<u64, ExecError> {
        let leader = match self.propose_here(shard, Command::Kv(cmd.clone()), left(deadline)).await? {
            Ok((g, CommandResponse::Kv(r))) => {
                self.sample_key(&g, cmd.key());
                g.served.fetch_add(1, Ordering::Relaxed);
                return r.map_err(ExecError::Kv);
            }
            Ok((_, other)) => return Err(ExecError::Internal(format!("unexpected response {other:?}"))),
            Err(leader) => leader,
        };
        let req = |hops| rpc::KvWrite { shard, cmd: cmd.clone(), hops, budget_ms: budget_ms(deadline) };
        self.forward(shard, hops, leader, deadline, req).await
    }

    /// The leader `g` knows of, when it is another node.
    fn other_leader(&self, g: &GroupRaft) -> Option<u64> {
        g.status().leader.map(|l| l.node_id).filter(|n| *n != self.node.id())
    }

    /// Executes a read on `shard`, locally when allowed, else at the leader.
    pub async fn exec_read(
        &self,
        shard: ShardId,
        key: &str,
        linearizable: bool,
        hops: u8,
        deadline: Instant,
    ) -> Result<Option<(u64, String)>, ExecError> {
        let leader = match self.node.group(shard) {
            Some(g) => {
                let barrier = if linearizable { self.barrier(&g, shard, deadline).await } else { Ok(()) };
                match barrier {
                    Ok(()) => {
                        self.sample_key(&g, key);
                        g.served.fetch_add(1, Ordering::Relaxed);
                        match owned_snapshot(&self.node.ctx().db, &g, (key, Some(key)), linearizable)? {
                            None => self.other_leader(&g),
                            Some(snap) => {
                                let rec = kv::read_at(&self.node.ctx().db, &snap, shard, key)
                                    .map_err(|e| ExecError::Internal(e.to_string()))?;
                                // A replica removed meanwhile may have had its
                                // data deleted (removal from the map comes
                                // first): ask the group's leader instead.
                                if self.was_removed(shard, &g) {
                                    None
                                } else {
                                    drop(snap);
                                    if linearizable {
                                        self.check_lock(key, rec.as_ref(), deadline).await?;
                                    }
                                    return Ok(rec
                                        .filter(|r| !r.tombstone)
                                        .map(|r| (r.version, String::from_utf8_lossy(&r.json).into_owned())));
                                }
                            }
                        }
                    }
                    Err(Some(l)) => Some(l),
                    Err(None) if self.was_removed(shard, &g) => None,
                    Err(None) => return Err(ExecError::NoLeader { group: shard }),
                }
            }
            None => None,
        };
        let key = key.to_string();
        let req = |hops| rpc::KvRead { shard, key: key.clone(), linearizable, hops, budget_ms: budget_ms(deadline) };
        self.forward(shard, hops, leader, deadline, req).await
    }

    /// A linearizable read found `rec` under `key`: if a transaction holds
    /// it for writing, its primary says whether the value read is still
    /// current. Pending: it is (the transaction commits later, if ever, and
    /// nothing else can write the key meanwhile). Over: the read must not
    /// answer the old value; `Locked` makes the caller finish the key and
    /// read again.
    async fn check_lock(
        &self,
        key: &str,
        rec: Option<&crate::storage::ValueRecord>,
        deadline: Instant,
    ) -> Result<(), ExecError> {
        let Some(lock) = rec.and_then(|r| r.lock()).filter(|l| l.write) else { return Ok(()) };
        match crate::txn::resolve::ask_primary(self, lock.txn, &lock.primary, lock.expires_ms, false, deadline).await? {
            crate::txn::Status::Pending => Ok(()),
            _ => Err(ExecError::Kv(KvError::Locked { key: key.to_string(), lock: lock.clone() })),
        }
    }

    /// Executes a transaction step on `shard`: here if this node leads it,
    /// else at the leader.
    pub async fn exec_txn(
        &self,
        shard: ShardId,
        cmd: crate::txn::TxnCommand,
        hops: u8,
        deadline: Instant,
    ) -> Result<crate::txn::TxnReply, ExecError> {
        self.exec_txn_at(shard, cmd, 0, hops, deadline).await
    }

    /// [`Router::exec_txn`] with the entry stamped `at` (0: by the leader's
    /// clock): a commit timestamp, or a floor the step's timestamp must reach.
    pub async fn exec_txn_at(
        &self,
        shard: ShardId,
        cmd: crate::txn::TxnCommand,
        at: crate::clock::Ts,
        hops: u8,
        deadline: Instant,
    ) -> Result<crate::txn::TxnReply, ExecError> {
        let proposal = Command::stamped(at, Command::Txn(cmd.clone()));
        let leader = match self.propose_here(shard, proposal, left(deadline)).await? {
            Ok((g, CommandResponse::Txn(r))) => {
                g.served.fetch_add(1, Ordering::Relaxed);
                return r.map_err(ExecError::Kv);
            }
            Ok((_, other)) => return Err(ExecError::Internal(format!("unexpected response {other:?}"))),
            Err(leader) => leader,
        };
        let req = |hops| rpc::TxnStep { shard, cmd: cmd.clone(), at, hops, budget_ms: budget_ms(deadline) };
        self.forward(shard, hops, leader, deadline, req).await
    }

    /// Confirms leadership for a linearizable read. `Err(Some(node))` names
    /// the leader to forward to; `Err(None)` means no leader is known.
    pub(crate) async fn barrier(
        &self,
        g: &crate::raft::GroupRaft,
        shard: ShardId,
        deadline: Instant,
    ) -> Result<(), Option<u64>> {
        match tokio::time::timeout(left(deadline), g.read_barrier()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(ReadError::NotLeader { leader: Some(l) })) if l.node_id != self.node.id() => Err(Some(l.node_id)),
            Ok(Err(e)) => {
                tracing::debug!(shard, "read barrier: {e}");
                Err(None)
            }
            Err(_) => Err(None),
        }
    }

    /// Scans `[start, end)` of `shard` at its leader.
    pub async fn exec_scan(
        &self,
        shard: ShardId,
        start: &str,
        end: Option<&str>,
        limit: usize,
        hops: u8,
        deadline: Instant,
    ) -> Result<Vec<(String, u64, String)>, ExecError> {
        let leader = match self.node.group(shard) {
            Some(g) => match self.barrier(&g, shard, deadline).await {
                Ok(()) => {
                    g.served.fetch_add(1, Ordering::Relaxed);
                    match owned_snapshot(&self.node.ctx().db, &g, (start, end), true)? {
                        None => self.other_leader(&g),
                        Some(snap) => {
                            let items = kv::scan_at(&self.node.ctx().db, &snap, shard, start, end, limit)
                                .map_err(|e| ExecError::Internal(e.to_string()))?;
                            if self.was_removed(shard, &g) {
                                None // as for a point read: the data may have gone under the scan
                            } else {
                                drop(snap);
                                for i in &items {
                                    self.check_lock(&i.key, Some(&i.record), deadline).await?;
                                }
                                return Ok(items
                                    .into_iter()
                                    .filter(|i| !i.record.tombstone)
                                    .map(|i| {
                                        (i.key, i.record.version, String::from_utf8_lossy(&i.record.json).into_owned())
                                    })
                                    .collect());
                            }
                        }
                    }
                }
                Err(Some(l)) => Some(l),
                Err(None) if self.was_removed(shard, &g) => None,
                Err(None) => return Err(ExecError::NoLeader { group: shard }),
            },
            None => None,
        };
        let (start, end) = (start.to_string(), end.map(str::to_string));
        let req = |hops| rpc::KvScan {
            shard,
            start: start.clone(),
            end: end.clone(),
            limit,
            hops,
            budget_ms: budget_ms(deadline),
        };
        self.forward(shard, hops, leader, deadline, req).await
    }

    /// Proposes a directory change through the metadata leader.
    pub async fn propose_meta(
        &self,
        cmd: cleave_metadata::MetaCommand,
        hops: u8,
    ) -> Result<cleave_metadata::MetaResponse, ExecError> {
        let deadline = Instant::now() + self.node.settings().write_timeout;
        let leader = match self.propose_here(META_GROUP, Command::Meta(cmd.clone()), left(deadline)).await? {
            Ok((_, CommandResponse::Meta(r))) => return r.map_err(ExecError::Meta),
            Ok((_, other)) => return Err(ExecError::Internal(format!("unexpected response {other:?}"))),
            Err(leader) => leader,
        };
        self.forward(META_GROUP, hops, leader, deadline, |hops| rpc::MetaPropose { cmd: cmd.clone(), hops }).await
    }
}

/// The key `key` is stored under: its bucket's (`map`, under a hash-spread
/// keyspace of `dir`), else itself.
fn stored_key(dir: &Directory, key: &str, map: bool) -> Result<String, ExecError> {
    match map {
        true => crate::keyspace::internal(dir, key),
        false => Ok(key.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::ShardCommand;
    use crate::testing::{range, temp_ctx, whole_shard, GROUP};

    #[tokio::test]
    async fn a_read_checked_before_a_cutover_keeps_its_data() {
        let (_d, ctx) = temp_ctx();
        let g = GroupRaft::create(&ctx, GROUP, 1, SmState::Shard(whole_shard())).await.unwrap();
        {
            let mut state = g.state.write().unwrap();
            let SmState::Shard(s) = &mut *state else { unreachable!() };
            for (i, k) in ["a", "m", "z"].iter().enumerate() {
                crate::testing::put(&ctx.db, s, i as u64 + 1, k, "1").unwrap();
            }
        }
        // The router checks ownership of the whole key space and gets its
        // snapshot; then the split's cutover applies before it reads.
        let snap = owned_snapshot(&ctx.db, &g, ("", None), true).unwrap().expect("not installing");
        {
            let mut state = g.state.write().unwrap();
            let SmState::Shard(s) = &mut *state else { unreachable!() };
            let done = ShardCommand::SplitDone {
                op_id: 5,
                left: range(1, "", Some("m"), 2),
                moved: range(2, "m", None, 2),
                moved_keys: 2,
                moved_bytes: 4,
            };
            crate::testing::step(&ctx.db, s, 10, done).unwrap();
        }
        let keys: Vec<String> =
            kv::scan_at(&ctx.db, &snap, GROUP, "", None, 10).unwrap().into_iter().map(|i| i.key).collect();
        assert_eq!(keys, ["a", "m", "z"], "the scan sees the range it was checked for, whole");
        assert!(kv::read_at(&ctx.db, &snap, GROUP, "z").unwrap().is_some());
        drop(snap);
        // Checked after the cutover, the same read is a stale route.
        assert!(matches!(
            owned_snapshot(&ctx.db, &g, ("", None), true),
            Err(ExecError::Kv(KvError::WrongRange { .. }))
        ));
        assert!(owned_snapshot(&ctx.db, &g, ("a", Some("b")), true).unwrap().is_some());
        // Half old, half new data while a snapshot installs: read elsewhere.
        g.set_installing(true);
        assert!(
            owned_snapshot(&ctx.db, &g, ("a", Some("b")), true).unwrap().is_none(),
            "no read of a replica mid-install"
        );
        g.set_installing(false);
        g.shutdown().await;
    }

    #[tokio::test]
    async fn a_range_frozen_for_a_split_is_refused_to_reads_until_the_capture_ends() {
        let (_d, ctx) = temp_ctx();
        let g = GroupRaft::create(&ctx, GROUP, 1, SmState::Shard(whole_shard())).await.unwrap();
        let with_state = |f: &dyn Fn(&crate::storage::Db, &mut kv::ShardState)| {
            let mut state = g.state.write().unwrap();
            let SmState::Shard(s) = &mut *state else { unreachable!() };
            f(&ctx.db, s);
        };
        let capture = ShardCommand::BeginCapture { op_id: 5, start: "m".into(), end: Some("t".into()), target: 2 };
        with_state(&|db, s| {
            crate::testing::step(db, s, 1, capture.clone()).unwrap();
        });
        let moving = |start: &str, end: Option<&str>| {
            matches!(owned_snapshot(&ctx.db, &g, (start, end), true), Err(ExecError::Kv(KvError::RangeMoving)))
        };
        assert!(!moving("m", Some("m")), "captured but not frozen: served");
        with_state(&|db, s| {
            crate::testing::step(db, s, 2, ShardCommand::Freeze { op_id: 5 }).unwrap();
        });
        // Point reads (start = end = key) at the range's first key, inside, at its end.
        assert!(moving("m", Some("m")), "the split key itself");
        assert!(moving("s", Some("s")));
        assert!(!moving("t", Some("t")), "the range's end is not in it");
        assert!(!moving("l", Some("l")));
        // Scans that overlap the frozen range, and one that stops short of it.
        assert!(moving("a", None));
        assert!(moving("a", Some("n")));
        assert!(!moving("a", Some("m")));
        assert!(!moving("t", None));
        // A stale read promises nothing about the split's target: served.
        assert!(owned_snapshot(&ctx.db, &g, ("m", Some("m")), false).unwrap().is_some());
        // An abandoned split ends the capture: reads are served again.
        with_state(&|db, s| {
            crate::testing::step(db, s, 3, ShardCommand::EndCapture { op_id: 5 }).unwrap();
        });
        assert!(!moving("m", Some("m")));
        assert!(owned_snapshot(&ctx.db, &g, ("m", Some("m")), true).unwrap().is_some());
        g.shutdown().await;
    }
}
