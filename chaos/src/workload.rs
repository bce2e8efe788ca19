//! The client workloads: concurrent closed-loop clients, each sending one
//! request at a time to a random node, recording every operation.
//!
//! Key layout: `{bucket}/{run}/{kind}/{name}`. The two-letter `bucket`
//! (derived from the name) spreads each workload's keys over the key space,
//! so splits at two-letter keys put them in different ranges and shards;
//! `run` keeps runs against a long-lived cluster apart.
//!
//! - **register**: `slots` keys at a time, each used for `rotate` seconds and
//!   then replaced by a fresh one (Jepsen's "independent keys"): a key's
//!   sub-history stays short enough for the linearizability search. Half the
//!   operations are reads, a fifth blind writes, a fifth compare-and-set
//!   from the version the client last saw, a tenth deletes (blind or
//!   conditional).
//! - **client**: the same operations on keys of its own, sent through the
//!   Rust client library (`cleave_client`) with its routing cache and its
//!   retries, so that what the library hides is checked too: a write it
//!   reports as indeterminate is recorded as such, one it reports as done
//!   must have happened exactly once.
//! - **set**: create-only inserts (`if_version: 0`) of fresh keys.
//! - **monotonic**: reads and blind writes of a few keys.
//! - **scan**: create-only inserts of fresh keys, and one scanner reading
//!   the whole key space page by page over and over (a page that fails is
//!   asked again, at a random node, until the scan's deadline), each scan
//!   recorded with its pages for the scan checker.
//!
//! - **bank**: transfers between accounts on several shards and reads of
//!   every account, all through transactions (see [`crate::bank`]).
//!
//! Written values are unique in the run (one counter), so reads say which
//! write they saw. A client that gets no answer moves on to its next
//! operation (its indeterminate one stays in the history as such); after a
//! failure it pauses briefly, so a dead node is not hammered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cleave_client::{Client, ClientOptions, Consistency};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::history::{Call, Op, Outcome, PageRecord, Recorder, Ret, Workload};
use crate::http::Api;

/// Items per page of the scan workload's scans (several pages per scan).
pub const SCAN_PAGE: usize = 500;

/// How many clients of each workload, and their keys.
#[derive(Clone, Debug)]
pub struct WorkloadOpts {
    /// Distinguishes this run's keys from any other run's.
    pub run_id: String,
    pub workloads: Vec<Workload>,
    pub register_clients: usize,
    pub set_clients: usize,
    pub monotonic_clients: usize,
    /// Inserting clients of the scan workload (plus one scanner).
    pub scan_clients: usize,
    /// Clients of the client workload (sharing one `cleave_client::Client`).
    pub library_clients: usize,
    /// Clients of the bank workload.
    pub bank_clients: usize,
    /// Credentials of a secured cluster.
    pub auth: crate::http::Auth,
    /// Register keys in use at a time.
    pub register_slots: usize,
    /// How long one register key is used.
    pub rotate: Duration,
    pub monotonic_keys: usize,
    /// Seeds the clients' choices.
    pub seed: u64,
    /// The client-side limit of one request (the library's attempts get
    /// half of it, its deadline, retries included, twice it).
    pub op_timeout: Duration,
}

/// What every client shares.
#[derive(Clone)]
pub struct Ctx {
    pub api: Api,
    pub endpoints: Arc<Vec<String>>,
    pub recorder: Arc<Recorder>,
    pub stop: watch::Receiver<bool>,
    pub values: Arc<AtomicU64>,
}

/// Two lowercase letters from a name (FNV-1a), for spreading keys.
pub fn bucket(name: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    let a = (b'a' + (h % 26) as u8) as char;
    let b = (b'a' + ((h / 26) % 26) as u8) as char;
    format!("{a}{b}")
}

/// The full key of `name` in workload `kind` of run `run`.
pub fn key(run: &str, kind: Workload, name: &str) -> String {
    format!("{}/{run}/{}/{name}", bucket(name), kind.name())
}

/// Whether `key` belongs to the set workload of run `run`.
pub fn is_set_key(run: &str, key: &str) -> bool {
    is_key_of(run, Workload::Set, key)
}

/// Whether `key` belongs to workload `kind` of run `run`.
pub fn is_key_of(run: &str, kind: Workload, key: &str) -> bool {
    key.split_once('/').is_some_and(|(_, rest)| {
        rest.strip_prefix(run)
            .and_then(|r| r.strip_prefix('/'))
            .and_then(|r| r.strip_prefix(kind.name()))
            .is_some_and(|r| r.starts_with('/'))
    })
}

impl Ctx {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn value(&self) -> u64 {
        self.values.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs one operation against a random node and records it.
    async fn op(&self, rng: &mut ChaCha8Rng, workload: Workload, client: u32, key: &str, call: Call) -> Op {
        let node = self.endpoints[rng.random_range(0..self.endpoints.len())].clone();
        let id = self.recorder.next_id();
        let invoke = self.recorder.now();
        let outcome = match call {
            Call::Read => self.api.read(&node, key).await,
            Call::Write { value } => self.api.write(&node, key, value, None).await,
            Call::Cas { expected, value } => self.api.write(&node, key, value, Some(expected)).await,
            Call::Delete => self.api.delete(&node, key, None).await,
            Call::CasDelete { expected } => self.api.delete(&node, key, Some(expected)).await,
            Call::Scan | Call::ReadAll | Call::Transfer { .. } => {
                unreachable!("scans and transactions have loops of their own")
            }
        };
        let stale = call == Call::Read && self.api.stale_reads();
        self.finish(
            rng,
            Op { id, workload, client, key: key.to_string(), call, invoke, complete: 0, outcome, node, stale },
        )
        .await
    }

    /// Stamps the completion time, records `op`, and paces the client after
    /// a failure.
    async fn finish(&self, rng: &mut ChaCha8Rng, mut op: Op) -> Op {
        op.complete = self.recorder.now();
        self.recorder.record(op.clone());
        if !op.outcome.is_ok() {
            // Pace retries against a node that is down or cut off.
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..100))).await;
        }
        op
    }

    /// Runs one operation through the client library and records it.
    async fn library_op(&self, rng: &mut ChaCha8Rng, lib: &Client, client: u32, key: &str, call: Call) -> Op {
        let id = self.recorder.next_id();
        let invoke = self.recorder.now();
        let stale = call == Call::Read && self.api.stale_reads();
        let outcome = library_call(lib, key, call, stale).await;
        let op = Op {
            id,
            workload: Workload::Client,
            client,
            key: key.to_string(),
            call,
            invoke,
            complete: 0,
            outcome,
            node: "cleave_client".into(),
            stale,
        };
        self.finish(rng, op).await
    }
}

/// One call through the client library, as an outcome. The library retries
/// what it may; what comes back is classified by its documented meaning.
async fn library_call(lib: &Client, key: &str, call: Call, stale: bool) -> Outcome {
    let write = |r: cleave_client::Result<cleave_client::WriteResult>| match r {
        Ok(w) => Outcome::ok(Ret::Written { version: w.version }),
        Err(e) => library_error(e, true),
    };
    match call {
        Call::Read => {
            let consistency = if stale { Consistency::Stale } else { Consistency::Linearizable };
            match lib.get(key, consistency).await {
                Ok(Some(item)) => match serde_json::from_str::<u64>(item.value.get()) {
                    Ok(value) => Outcome::ok(Ret::Value { value, version: item.version }),
                    Err(_) => Outcome::ok(Ret::Unparsable { text: item.value.get().to_string() }),
                },
                Ok(None) => Outcome::ok(Ret::NotFound),
                Err(e) => library_error(e, false),
            }
        }
        Call::Write { value } => write(lib.put(key, &value, None).await),
        Call::Cas { expected, value } => write(lib.put(key, &value, Some(expected)).await),
        Call::Delete => write(lib.delete(key, None).await),
        Call::CasDelete { expected } => write(lib.delete(key, Some(expected)).await),
        Call::Scan | Call::ReadAll | Call::Transfer { .. } => {
            unreachable!("the client workload neither scans nor runs transactions")
        }
    }
}

/// The outcome a library error stands for.
fn library_error(e: cleave_client::Error, write: bool) -> Outcome {
    use cleave_client::Error as E;
    let reason = e.to_string();
    match e {
        E::NotFound => Outcome::ok(Ret::NotFound),
        E::VersionConflict { current } => Outcome::ok(Ret::Conflict { current: Some(current) }),
        // Every attempt was refused in a way that proves nothing applied.
        E::Unavailable { .. } | E::InvalidArgument(_) | E::Transport(_) => Outcome::Failed { reason },
        E::Api { status, .. } if status < 500 => Outcome::Failed { reason },
        // 5xx, an undecodable success, an unknown outcome: maybe applied.
        _ if write => Outcome::Indeterminate { reason },
        _ => Outcome::Failed { reason },
    }
}

/// The live version an answer reveals, if any (0: the key is absent).
fn version_seen(call: Call, outcome: &Outcome) -> Option<u64> {
    match outcome.ret()? {
        Ret::Written { .. } if matches!(call, Call::Delete | Call::CasDelete { .. }) => Some(0),
        Ret::Value { version, .. } | Ret::Written { version } => Some(*version),
        Ret::Conflict { current } => *current,
        Ret::NotFound => Some(0),
        Ret::Unparsable { .. } | Ret::Scanned { .. } | Ret::Balances { .. } | Ret::Txn { .. } => None,
    }
}

/// The next register operation on `key`, given the live version last seen.
fn register_call(rng: &mut ChaCha8Rng, ctx: &Ctx, last: Option<u64>) -> Call {
    let expected = last.unwrap_or(0);
    match rng.random_range(0..20) {
        0..10 => Call::Read,
        10..14 => Call::Write { value: ctx.value() },
        14..18 => Call::Cas { expected, value: ctx.value() },
        18 => Call::Delete,
        _ => Call::CasDelete { expected },
    }
}

/// The register clients' loop, over raw HTTP (`lib = None`) or the library.
async fn register_loop(ctx: Ctx, opts: Arc<WorkloadOpts>, client: u32, lib: Option<Client>) {
    let kind = if lib.is_some() { Workload::Client } else { Workload::Register };
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ ((client as u64) << 32) ^ 0x7e9);
    let mut last_version: HashMap<String, u64> = HashMap::new();
    let rotate = opts.rotate.as_nanos().max(1) as u64;
    while !ctx.stopped() {
        let generation = ctx.recorder.now() / rotate;
        let slot = rng.random_range(0..opts.register_slots.max(1));
        let key = key(&opts.run_id, kind, &format!("r{slot}g{generation}"));
        let call = register_call(&mut rng, &ctx, last_version.get(&key).copied());
        let op = match &lib {
            Some(lib) => ctx.library_op(&mut rng, lib, client, &key, call).await,
            None => ctx.op(&mut rng, Workload::Register, client, &key, call).await,
        };
        if let Some(v) = version_seen(call, &op.outcome) {
            last_version.insert(key, v);
        }
        if last_version.len() > 4 * opts.register_slots.max(1) {
            last_version.clear();
        }
    }
}

/// Create-only inserts of fresh keys of workload `kind` (set or scan).
async fn insert_loop(ctx: Ctx, opts: Arc<WorkloadOpts>, client: u32, kind: Workload) {
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ ((client as u64) << 32) ^ 0x5e7);
    let mut n = 0u64;
    while !ctx.stopped() {
        n += 1;
        let key = key(&opts.run_id, kind, &format!("c{client}-{n}"));
        ctx.op(&mut rng, kind, client, &key, Call::Cas { expected: 0, value: ctx.value() }).await;
    }
}

/// Scans the whole key space again and again, recording each scan.
async fn scanner(ctx: Ctx, opts: Arc<WorkloadOpts>, client: u32) {
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ ((client as u64) << 32) ^ 0x5ca);
    let run = opts.run_id.clone();
    let keep = move |k: &str| is_key_of(&run, Workload::Scan, k);
    let budget = opts.op_timeout * 3;
    while !ctx.stopped() {
        let id = ctx.recorder.next_id();
        let invoke = ctx.recorder.now();
        let deadline = tokio::time::Instant::now() + budget;
        let mut pages: Vec<PageRecord> = Vec::new();
        let mut cursor = String::new();
        let mut node: String;
        let outcome = loop {
            node = ctx.endpoints[rng.random_range(0..ctx.endpoints.len())].clone();
            match ctx.api.scan_record(&node, &cursor, SCAN_PAGE, &keep).await {
                Ok(page) => {
                    let next = page.next.clone();
                    pages.push(page);
                    match next {
                        Some(n) if pages.len() < 100_000 => cursor = n,
                        _ => break Outcome::ok(Ret::Scanned { pages: std::mem::take(&mut pages) }),
                    }
                }
                // A scan changes nothing: a page that failed is asked again.
                Err(why) if tokio::time::Instant::now() < deadline && !ctx.stopped() => {
                    tracing::debug!("scan page at {cursor:?} via {node}: {why:?}; asking again");
                    tokio::time::sleep(Duration::from_millis(rng.random_range(20..100))).await;
                }
                Err(why) => {
                    let reason = match why {
                        Outcome::Failed { reason } | Outcome::Indeterminate { reason } => reason,
                        Outcome::Ok { .. } => String::new(),
                    };
                    break Outcome::Failed { reason: format!("page {} at {cursor:?}: {reason}", pages.len()) };
                }
            }
        };
        let op = Op {
            id,
            workload: Workload::Scan,
            client,
            key: String::new(),
            call: Call::Scan,
            invoke,
            complete: 0,
            outcome,
            node,
            stale: false,
        };
        ctx.finish(&mut rng, op).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A bank client: opens the accounts (if no one has), then transfers and
/// reads every account, at random.
async fn bank_client(ctx: Ctx, opts: Arc<WorkloadOpts>, client: u32) {
    use crate::bank::{self, ACCOUNTS};
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ ((client as u64) << 32) ^ 0xba2);
    let run = &opts.run_id;
    // Open: one transaction whose comparisons ("every account absent") let
    // exactly one opening through; an answer either way means opened.
    while !ctx.stopped() {
        let node = ctx.endpoints[rng.random_range(0..ctx.endpoints.len())].clone();
        if ctx.api.txn(&node, &bank::open_body(run)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..200))).await;
    }
    while !ctx.stopped() {
        let node = ctx.endpoints[rng.random_range(0..ctx.endpoints.len())].clone();
        let id = ctx.recorder.next_id();
        let invoke = ctx.recorder.now();
        let (call, outcome) = if rng.random_bool(0.3) {
            (Call::ReadAll, bank::read_all_outcome(ctx.api.txn(&node, &bank::read_all_body(run)).await))
        } else {
            let from = rng.random_range(0..ACCOUNTS);
            let to = (from + rng.random_range(1..ACCOUNTS)) % ACCOUNTS;
            let amount = rng.random_range(1..20u32);
            let call = Call::Transfer { from, to, amount };
            // The read is not recorded: only the transfer changes anything.
            let read = ctx.api.txn(&node, &bank::read_two_body(run, from, to)).await.map(|v| bank::balances(&v));
            let seen = match read.as_deref() {
                Ok([Some(a), Some(b)]) => [*a, *b],
                _ => {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(20..100))).await;
                    continue;
                }
            };
            let body = bank::transfer_body(run, (from, to, amount as i64), seen);
            let outcome = match ctx.api.txn(&node, &body).await {
                Ok(v) => Outcome::ok(Ret::Txn { succeeded: v["succeeded"] == true }),
                Err(o) => o,
            };
            (call, outcome)
        };
        let op = Op {
            id,
            workload: Workload::Bank,
            client,
            key: "bank".into(),
            call,
            invoke,
            complete: 0,
            outcome,
            node,
            stale: false,
        };
        ctx.finish(&mut rng, op).await;
    }
}

async fn monotonic_client(ctx: Ctx, opts: Arc<WorkloadOpts>, client: u32) {
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ ((client as u64) << 32) ^ 0x303);
    while !ctx.stopped() {
        let i = rng.random_range(0..opts.monotonic_keys.max(1));
        let key = key(&opts.run_id, Workload::Monotonic, &format!("m{i}"));
        let call = if rng.random_bool(0.5) { Call::Read } else { Call::Write { value: ctx.value() } };
        ctx.op(&mut rng, Workload::Monotonic, client, &key, call).await;
    }
}

/// The client library the client workload uses, seeded with every endpoint.
/// Its attempts time out after half of `op_timeout`, before the server's
/// own timeout (`--server-timeout`, 3 s by default): a paused or cut-off
/// leader then leaves the library with writes whose outcome it does not
/// know, which is the case it must not get wrong.
pub fn library_client(endpoints: &[String], op_timeout: Duration, auth: &crate::http::Auth) -> crate::Result<Client> {
    let options = ClientOptions::default()
        .with_token(auth.token.clone())
        .with_ca_cert(auth.ca_pem.clone())
        .with_attempt_timeout(op_timeout / 2)
        .with_deadline(op_timeout * 2)
        .with_connect_timeout(Duration::from_secs(1).min(op_timeout))
        .with_refresh_timeout(Duration::from_secs(1).min(op_timeout));
    Client::with_options(endpoints, options).map_err(|e| crate::Error::Config(format!("client library: {e}")))
}

/// Starts every client; they run until `ctx.stop` turns true. Client ids
/// are unique across workloads.
pub fn spawn_clients(ctx: &Ctx, opts: WorkloadOpts) -> crate::Result<Vec<JoinHandle<()>>> {
    let opts = Arc::new(opts);
    let lib = if opts.workloads.contains(&Workload::Client) {
        Some(library_client(&ctx.endpoints, opts.op_timeout, &opts.auth)?)
    } else {
        None
    };
    let mut handles = Vec::new();
    let mut client = 0u32;
    for workload in opts.workloads.clone() {
        let count = match workload {
            Workload::Register => opts.register_clients,
            Workload::Set => opts.set_clients,
            Workload::Monotonic => opts.monotonic_clients,
            Workload::Scan => opts.scan_clients + 1,
            Workload::Client => opts.library_clients,
            Workload::Bank => opts.bank_clients,
            Workload::Watch => 0,
        };
        for i in 0..count {
            client += 1;
            let (ctx, opts, lib) = (ctx.clone(), opts.clone(), lib.clone());
            handles.push(tokio::spawn(async move {
                match workload {
                    Workload::Register => register_loop(ctx, opts, client, None).await,
                    Workload::Client => register_loop(ctx, opts, client, lib).await,
                    Workload::Set => insert_loop(ctx, opts, client, Workload::Set).await,
                    Workload::Scan if i == 0 => scanner(ctx, opts, client).await,
                    Workload::Scan => insert_loop(ctx, opts, client, Workload::Scan).await,
                    Workload::Monotonic => monotonic_client(ctx, opts, client).await,
                    Workload::Bank => bank_client(ctx, opts, client).await,
                    Workload::Watch => {}
                }
            }));
        }
    }
    Ok(handles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_spread_over_buckets_and_are_recognisable() {
        let buckets: std::collections::BTreeSet<String> = (0..200).map(|i| bucket(&format!("c1-{i}"))).collect();
        assert!(buckets.len() > 100, "only {} buckets", buckets.len());
        let k = key("r42", Workload::Set, "c1-7");
        assert!(is_set_key("r42", &k), "{k}");
        assert!(!is_set_key("r4", &k));
        assert!(!is_set_key("r42", &key("r42", Workload::Register, "r1g0")));
        assert_eq!(&k[2..3], "/");
        let s = key("r42", Workload::Scan, "c1-7");
        assert!(is_key_of("r42", Workload::Scan, &s));
        assert!(!is_key_of("r42", Workload::Set, &s));
        assert!(!is_key_of("r4", Workload::Scan, &s));
    }

    #[test]
    fn library_errors_are_classified_by_their_meaning() {
        use cleave_client::Error as E;
        let unavailable = || E::Unavailable { attempts: 3, last: "503".into() };
        assert!(matches!(library_error(E::Indeterminate("x".into()), true), Outcome::Indeterminate { .. }));
        assert!(matches!(library_error(unavailable(), true), Outcome::Failed { .. }));
        assert_eq!(library_error(E::NotFound, true), Outcome::ok(Ret::NotFound));
        assert_eq!(
            library_error(E::VersionConflict { current: 4 }, true),
            Outcome::ok(Ret::Conflict { current: Some(4) })
        );
        let api = |status| E::Api { status, code: None, message: String::new() };
        assert!(matches!(library_error(api(400), true), Outcome::Failed { .. }));
        assert!(matches!(library_error(api(500), true), Outcome::Indeterminate { .. }));
        assert!(matches!(library_error(api(500), false), Outcome::Failed { .. }));
        assert!(matches!(library_error(E::Decode("x".into()), true), Outcome::Indeterminate { .. }));
    }

    #[test]
    fn a_delete_reveals_that_the_key_is_absent() {
        let written = Outcome::ok(Ret::Written { version: 5 });
        assert_eq!(version_seen(Call::Delete, &written), Some(0));
        assert_eq!(version_seen(Call::CasDelete { expected: 4 }, &written), Some(0));
        assert_eq!(version_seen(Call::Write { value: 1 }, &written), Some(5));
        assert_eq!(version_seen(Call::Read, &Outcome::ok(Ret::NotFound)), Some(0));
    }
}
