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
//!   operations are reads, a quarter blind writes, a quarter compare-and-set
//!   from the version the client last saw.
//! - **set**: create-only inserts (`if_version: 0`) of fresh keys.
//! - **monotonic**: reads and blind writes of a few keys.
//!
//! Written values are unique in the run (one counter), so reads say which
//! write they saw. A client that gets no answer moves on to its next
//! operation (its indeterminate one stays in the history as such); after a
//! failure it pauses briefly, so a dead node is not hammered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::history::{Call, Op, Outcome, Recorder, Ret, Workload};
use crate::http::Api;

/// How many clients of each workload, and their keys.
#[derive(Clone, Debug)]
pub struct WorkloadOpts {
    /// Distinguishes this run's keys from any other run's.
    pub run_id: String,
    pub workloads: Vec<Workload>,
    pub register_clients: usize,
    pub set_clients: usize,
    pub monotonic_clients: usize,
    /// Register keys in use at a time.
    pub register_slots: usize,
    /// How long one register key is used.
    pub rotate: Duration,
    pub monotonic_keys: usize,
    /// Seeds the clients' choices.
    pub seed: u64,
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
    key.split_once('/').is_some_and(|(_, rest)| rest.starts_with(&format!("{run}/set/")))
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
        };
        let complete = self.recorder.now();
        let op = Op { id, workload, client, key: key.to_string(), call, invoke, complete, outcome, node };
        self.recorder.record(op.clone());
        if !op.outcome.is_ok() {
            // Pace retries against a node that is down or cut off.
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..100))).await;
        }
        op
    }
}

/// The version an answer reveals, if any.
fn version_seen(outcome: &Outcome) -> Option<u64> {
    match outcome.ret()? {
        Ret::Value { version, .. } | Ret::Written { version } => Some(*version),
        Ret::Conflict { current } => *current,
        Ret::NotFound => Some(0),
        Ret::Unparsable { .. } => None,
    }
}

async fn register_client(ctx: Ctx, opts: Arc<WorkloadOpts>, client: u32) {
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ ((client as u64) << 32) ^ 0x7e9);
    let mut last_version: HashMap<String, u64> = HashMap::new();
    let rotate = opts.rotate.as_nanos().max(1) as u64;
    while !ctx.stopped() {
        let generation = ctx.recorder.now() / rotate;
        let slot = rng.random_range(0..opts.register_slots.max(1));
        let key = key(&opts.run_id, Workload::Register, &format!("r{slot}g{generation}"));
        let call = match rng.random_range(0..4) {
            0 | 1 => Call::Read,
            2 => Call::Write { value: ctx.value() },
            _ => Call::Cas { expected: last_version.get(&key).copied().unwrap_or(0), value: ctx.value() },
        };
        let op = ctx.op(&mut rng, Workload::Register, client, &key, call).await;
        if let Some(v) = version_seen(&op.outcome) {
            last_version.insert(key, v);
        }
        if last_version.len() > 4 * opts.register_slots.max(1) {
            last_version.clear();
        }
    }
}

async fn set_client(ctx: Ctx, opts: Arc<WorkloadOpts>, client: u32) {
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ ((client as u64) << 32) ^ 0x5e7);
    let mut n = 0u64;
    while !ctx.stopped() {
        n += 1;
        let key = key(&opts.run_id, Workload::Set, &format!("c{client}-{n}"));
        ctx.op(&mut rng, Workload::Set, client, &key, Call::Cas { expected: 0, value: ctx.value() }).await;
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

/// Starts every client; they run until `ctx.stop` turns true. Client ids
/// are unique across workloads.
pub fn spawn_clients(ctx: &Ctx, opts: WorkloadOpts) -> Vec<JoinHandle<()>> {
    let opts = Arc::new(opts);
    let mut handles = Vec::new();
    let mut client = 0u32;
    for workload in opts.workloads.clone() {
        let count = match workload {
            Workload::Register => opts.register_clients,
            Workload::Set => opts.set_clients,
            Workload::Monotonic => opts.monotonic_clients,
        };
        for _ in 0..count {
            client += 1;
            let (ctx, opts) = (ctx.clone(), opts.clone());
            handles.push(tokio::spawn(async move {
                match workload {
                    Workload::Register => register_client(ctx, opts, client).await,
                    Workload::Set => set_client(ctx, opts, client).await,
                    Workload::Monotonic => monotonic_client(ctx, opts, client).await,
                }
            }));
        }
    }
    handles
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
    }
}
