//! Sending one logical request: pick a node, send, classify the answer,
//! update the routing cache, back off, try again.
//!
//! This is the only module that combines I/O with the pure pieces:
//! [`crate::routing`] says where to send, [`crate::retry`] says whether and
//! when to retry, [`crate::error`] says what a final answer means. The loop
//! in [`Inner::execute`] is, per attempt:
//!
//! 1. make sure the routing cache is filled (first use) or fresh enough
//!    (refreshed in the background once older than the TTL);
//! 2. take the best candidate node not yet tried by this request;
//! 3. send with a timeout of `min(attempt_timeout, time left)`;
//! 4. on success, or on a final error answer, return (after a success that
//!    needed retries, refresh the cache in the background: whatever moved
//!    has settled by now);
//! 5. on a retryable failure, fix the cache (421: patch in the ranges from
//!    the body; 503: drop the shard's leader hint; unreachable: drop the
//!    node's hints and try it last for a while), refresh the cache from
//!    some node, wait, go to 1. A 503 `range_moving` is the exception: the
//!    leader is fine and the cutover ends within milliseconds, so the same
//!    node is asked again after a few milliseconds, without a refresh (once
//!    the range has moved, the old owner answers 421 with the new route).
//!
//! Refreshes are single-flight: a request records the refresh counter before
//! its attempt, and only refreshes if nobody started one since. So a burst of
//! requests failing together costs one refresh, not one each.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use cleave_metadata::api::ShardStatus;
use cleave_metadata::Directory;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use reqwest::Method;
use tracing::{debug, warn};

use crate::error::{describe, parse_error_body, Error, Result};
use crate::options::ClientOptions;
use crate::retry::{
    after_failure, ambiguous_answer, classify_status, parse_retry_after, write_outcome_unknown, Failure, RequestKind,
    Step,
};
use crate::routing::{choose, RoutingTable};

/// How long a node that did not answer is tried after the others.
const SUSPECT_FOR: Duration = Duration::from_secs(3);

/// One logical request, as the retry loop sees it.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub method: Method,
    /// Path and query, already percent-encoded.
    pub path: String,
    /// JSON body, if any.
    pub body: Option<Vec<u8>>,
    /// The key whose shard leader should receive the request.
    pub route_key: Option<String>,
    pub kind: RequestKind,
    /// Whether error answers are about a key, so that 404 `not_found` and
    /// 409 `version_conflict` mean [`Error::NotFound`] and
    /// [`Error::VersionConflict`]. Otherwise (admin calls) every error answer
    /// is kept as [`Error::Api`] with the server's message.
    pub about_key: bool,
    /// Whether a 504 is the server's definite answer rather than a lost one:
    /// the server waits for something to happen (a leader transfer) and
    /// says 504 when it did not happen in time. Such a 504 is final, kept
    /// as [`Error::Api`], instead of being retried as "no answer".
    pub timeout_is_final: bool,
}

impl Call {
    /// A GET; its errors are about a key when it is routed by one.
    pub fn read(path: String, route_key: Option<&str>) -> Call {
        Call {
            method: Method::GET,
            path,
            body: None,
            route_key: route_key.map(str::to_owned),
            kind: RequestKind::Read,
            about_key: route_key.is_some(),
            timeout_is_final: false,
        }
    }

    /// An admin request that is not about a key.
    pub fn admin(method: Method, path: String, body: Option<Vec<u8>>, kind: RequestKind) -> Call {
        Call { method, path, body, route_key: None, kind, about_key: false, timeout_is_final: false }
    }

    /// The same call, with a 504 taken as the server's final answer (see
    /// [`Call::timeout_is_final`]).
    pub fn with_final_timeout(mut self) -> Call {
        self.timeout_is_final = true;
        self
    }
}

/// What one attempt brought back before interpretation.
struct RawAnswer {
    status: u16,
    retry_after: Option<Duration>,
    /// The answering node's directory version (`x-cleave-directory-version`).
    directory_version: Option<u64>,
    body: Vec<u8>,
}

/// Header in which every node states its directory version, so a client
/// whose cache is older learns that ranges or shards changed.
pub const DIRECTORY_VERSION_HEADER: &str = "x-cleave-directory-version";

/// The state shared by every clone of a [`crate::Client`].
pub(crate) struct Inner {
    pub http: reqwest::Client,
    pub options: ClientOptions,
    table: RwLock<RoutingTable>,
    /// Held while a refresh runs.
    refresh_lock: tokio::sync::Mutex<()>,
    /// Counts refreshes started; see the module docs.
    refresh_epoch: AtomicU64,
    /// Whether a background refresh task is running.
    background: AtomicBool,
    /// Round-robin position for requests without a key.
    next: AtomicUsize,
}

impl Inner {
    pub fn new(http: reqwest::Client, options: ClientOptions, seeds: Vec<String>) -> Inner {
        Inner {
            http,
            options,
            table: RwLock::new(RoutingTable::new(seeds)),
            refresh_lock: tokio::sync::Mutex::new(()),
            refresh_epoch: AtomicU64::new(0),
            background: AtomicBool::new(false),
            next: AtomicUsize::new(0),
        }
    }

    /// The routing table for reading. A panic while it was held cannot
    /// leave it inconsistent in a way that matters for hints, so poisoning
    /// is ignored.
    pub fn table(&self) -> RwLockReadGuard<'_, RoutingTable> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn table_mut(&self) -> RwLockWriteGuard<'_, RoutingTable> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Candidates for a request, best first. Requests without a key start
    /// at a rotating position to spread them over the nodes.
    fn candidates(&self, key: Option<&str>) -> Vec<String> {
        let mut c = self.table().candidates(key);
        if key.is_none() && !c.is_empty() {
            let n = self.next.fetch_add(1, Ordering::Relaxed) % c.len();
            c.rotate_left(n);
        }
        c
    }

    /// Runs `call` to a final answer: the body of a 2xx reply, or the error
    /// the answer means.
    pub async fn execute(self: &Arc<Self>, call: &Call) -> Result<Vec<u8>> {
        let opts = &self.options;
        let deadline = Instant::now() + opts.deadline;
        let routed_key = call.route_key.as_deref().filter(|_| opts.smart_routing);
        let mut retries = 0u32;
        let mut moving_retries = 0u32;
        let mut tried: Vec<String> = Vec::new();
        let mut maybe_applied = false;
        let mut load_tried = false;
        let mut last = String::from("deadline exceeded before the first attempt");

        loop {
            let epoch = self.refresh_epoch.load(Ordering::SeqCst);
            if routed_key.is_some() {
                let (filled, stale) = {
                    let t = self.table();
                    (t.has_directory(), t.is_stale(Instant::now(), opts.cache_ttl))
                };
                if !filled && !load_tried {
                    load_tried = true;
                    if let Err(e) = self.refresh(Some(epoch), deadline).await {
                        debug!(error = %e, "could not load the routing cache; using the seeds");
                    }
                } else if stale {
                    self.spawn_refresh();
                }
            }

            if self.table().has_suspects() {
                self.table_mut().expire_suspects(Instant::now());
            }
            let (addr, shard) = {
                let candidates = self.candidates(routed_key);
                let Some(addr) = choose(&candidates, &tried).cloned() else {
                    return Err(Error::InvalidArgument("no endpoint to send the request to".into()));
                };
                if tried.contains(&addr) {
                    tried.clear(); // every candidate failed once: start a new round
                }
                (addr, routed_key.and_then(|k| self.table().route(k)).map(|r| r.shard_id))
            };

            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(give_up(maybe_applied, retries, last));
            }
            let answer = self.send(&addr, call, opts.attempt_timeout.min(remaining)).await;

            let (failure, retry_after) = match answer {
                Ok(a) if (200..300).contains(&a.status) => {
                    if self.table().is_suspect(&addr) {
                        self.table_mut().clear_suspect(&addr);
                    }
                    let newer = a.directory_version.is_some_and(|v| v > self.table().directory_version());
                    if retries > 0 || moving_retries > 0 || newer {
                        // Something moved (a leader, a range): once it has
                        // settled, learn where it went.
                        self.spawn_refresh();
                    }
                    return Ok(a.body);
                }
                Ok(a) => {
                    let detail = parse_error_body(&a.body);
                    let code = detail.as_ref().map(|d| d.code);
                    let failure = classify_status(a.status, code);
                    let failure = failure.filter(|_| !(call.timeout_is_final && a.status == 504));
                    let message = detail.as_ref().map_or("", |d| d.message.as_str());
                    if failure.is_none() && ambiguous_answer(a.status, maybe_applied) {
                        warn!(path = %call.path, status = a.status, "error answer after an attempt that may have applied");
                        return Err(Error::Indeterminate(format!(
                            "{addr} answered {} ({message}) after an earlier attempt that may have been applied got \
                             no answer ({last})",
                            a.status
                        )));
                    }
                    if write_outcome_unknown(call.kind, a.status) {
                        warn!(path = %call.path, status = a.status, "write answered with a server error; outcome unknown");
                        return Err(Error::Indeterminate(format!("{addr} answered {}: {message}", a.status)));
                    }
                    let Some(failure) = failure else {
                        return Err(if call.about_key {
                            Error::from_detail(a.status, detail, &a.body)
                        } else {
                            Error::from_admin_detail(a.status, detail, &a.body)
                        });
                    };
                    last = format!("{addr} answered {}: {message}", a.status);
                    match failure {
                        Failure::StaleRoute => {
                            if let Some(ranges) = detail.as_ref().and_then(|d| d.ranges.as_deref()) {
                                self.table_mut().apply_stale_route(ranges);
                            }
                        }
                        Failure::RangeMoving => {}
                        _ => {
                            if let Some(shard) = shard {
                                self.table_mut().forget_leader(shard);
                            }
                            tried.push(addr.clone());
                        }
                    }
                    (failure, a.retry_after)
                }
                Err(e) if e.is_builder() => return Err(Error::Transport(e)),
                Err(e) => {
                    let failure = if e.is_connect() { Failure::Unreachable } else { Failure::NoAnswer };
                    last = format!("{addr}: {}", describe(&e));
                    let mut t = self.table_mut();
                    t.forget_node(&addr);
                    t.mark_suspect(&addr, Instant::now() + SUSPECT_FOR);
                    drop(t);
                    tried.push(addr.clone());
                    (failure, None)
                }
            };

            match after_failure(call.kind, failure) {
                Step::Indeterminate => {
                    warn!(path = %call.path, %last, "write got no answer; outcome unknown, not replayed");
                    return Err(Error::Indeterminate(last));
                }
                Step::Retry { maybe_applied: m } => maybe_applied |= m,
            }

            let remaining = deadline.saturating_duration_since(Instant::now());
            if failure == Failure::RangeMoving {
                let Some(delay) = opts.retry.next_moving_delay(moving_retries, remaining, rand::random()) else {
                    return Err(give_up(maybe_applied, retries + moving_retries + 1, last));
                };
                debug!(method = %call.method, path = %call.path, retry = moving_retries + 1, ?delay, "range moving");
                tokio::time::sleep(delay).await;
                moving_retries += 1;
                continue;
            }
            let Some(delay) = opts.retry.next_delay(retries, retry_after, remaining, rand::random()) else {
                return Err(give_up(maybe_applied, retries + moving_retries + 1, last));
            };
            debug!(method = %call.method, path = %call.path, ?failure, retry = retries + 1, ?delay, %last, "retrying");
            let wake = tokio::time::Instant::now() + delay;
            if let Err(e) = self.refresh(Some(epoch), deadline).await {
                debug!(error = %e, "routing refresh failed");
            }
            tokio::time::sleep_until(wake).await;
            retries += 1;
        }
    }

    /// One attempt against one node; reads the whole answer.
    async fn send(&self, base: &str, call: &Call, timeout: Duration) -> Result<RawAnswer, reqwest::Error> {
        let mut req = self.http.request(call.method.clone(), format!("{base}{}", call.path)).timeout(timeout);
        if let Some(body) = &call.body {
            req = req.header(CONTENT_TYPE, "application/json").body(body.clone());
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let retry_after = resp.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let directory_version =
            resp.headers().get(DIRECTORY_VERSION_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let body = resp.bytes().await?.to_vec();
        Ok(RawAnswer { status, retry_after, directory_version, body })
    }

    /// A single GET without retries (refreshes, `health_at`).
    pub async fn get_once(&self, base: &str, path: &str, timeout: Duration) -> Result<Vec<u8>> {
        let call = Call::read(path.to_owned(), None);
        let a = self.send(base, &call, timeout).await.map_err(Error::Transport)?;
        if (200..300).contains(&a.status) {
            Ok(a.body)
        } else {
            Err(Error::from_response(a.status, &a.body))
        }
    }

    /// Reloads the directory and leader hints from the first node that
    /// answers. With `seen = Some(epoch)`, does nothing if another refresh
    /// started after the caller read `epoch`.
    /// Waiting for a refresh already running counts against `deadline` too.
    pub async fn refresh(&self, seen: Option<u64>, deadline: Instant) -> Result<()> {
        let lock = self.refresh_lock.lock();
        let Ok(_guard) = tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), lock).await else {
            return Err(Error::Unavailable {
                attempts: 0,
                last: "the deadline passed while another routing refresh was running".into(),
            });
        };
        if seen.is_some_and(|s| s != self.refresh_epoch.load(Ordering::SeqCst)) {
            return Ok(());
        }
        self.refresh_epoch.fetch_add(1, Ordering::SeqCst);
        let candidates = self.candidates(None);
        let mut last = String::from("no endpoint to ask");
        let mut asked = 0;
        for addr in &candidates {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            asked += 1;
            match self.fetch_routing(addr, self.options.refresh_timeout.min(remaining)).await {
                Ok((dir, shards)) => {
                    let version = dir.version;
                    let mut t = self.table_mut();
                    let installed = t.install_directory(dir, Instant::now());
                    if let Some(shards) = shards {
                        t.install_leaders(&shards);
                    }
                    debug!(from = %addr, version, installed, "routing cache refreshed");
                    return Ok(());
                }
                Err(e) => {
                    debug!(from = %addr, error = %e, "routing refresh attempt failed");
                    last = format!("{addr}: {e}");
                }
            }
        }
        self.table_mut().note_refresh_attempt(Instant::now());
        Err(Error::Unavailable { attempts: asked, last })
    }

    /// Fetches `/admin/directory` and, best effort, `/admin/shards`.
    async fn fetch_routing(&self, base: &str, timeout: Duration) -> Result<(Directory, Option<Vec<ShardStatus>>)> {
        let body = self.get_once(base, "/admin/directory", timeout).await?;
        let dir: Directory = decode(&body)?;
        let shards = match self.get_once(base, "/admin/shards", timeout).await {
            Ok(body) => decode::<Vec<ShardStatus>>(&body).ok(),
            Err(_) => None,
        };
        Ok((dir, shards))
    }

    /// Starts a background refresh unless one is already running.
    fn spawn_refresh(self: &Arc<Self>) {
        if self.background.swap(true, Ordering::SeqCst) {
            return;
        }
        let inner = Arc::clone(self);
        let epoch = self.refresh_epoch.load(Ordering::SeqCst);
        tokio::spawn(async move {
            let deadline = Instant::now() + inner.options.deadline;
            if let Err(e) = inner.refresh(Some(epoch), deadline).await {
                debug!(error = %e, "background routing refresh failed");
            }
            inner.background.store(false, Ordering::SeqCst);
        });
    }
}

/// Decodes a JSON answer body.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::Decode(e.to_string()))
}

/// The error once retrying stopped.
fn give_up(maybe_applied: bool, attempts: u32, last: String) -> Error {
    if maybe_applied {
        Error::Indeterminate(format!("gave up after {attempts} attempt(s), one of which got no answer: {last}"))
    } else {
        Error::Unavailable { attempts, last }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_for_the_refresh_lock_ends_at_the_deadline() {
        crate::tls::install_provider();
        let http = reqwest::Client::new();
        let inner = Inner::new(http, ClientOptions::default(), vec!["http://127.0.0.1:1".into()]);
        let _held = inner.refresh_lock.lock().await; // a refresh that never ends
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(5), inner.refresh(None, started + Duration::from_millis(50)))
            .await
            .expect("the refresh waited past its deadline");
        assert!(matches!(r, Err(Error::Unavailable { attempts: 0, .. })), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }
}
