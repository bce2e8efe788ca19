//! Hash-spread keyspaces, the node's side: declaring one, and the data
//! API's view of keys under one (`cleave_metadata::keyspace` holds the
//! mapping; `docs/plans/merge.md`, part 2).
//!
//! Users read and write plain keys. Every key the data API takes is mapped
//! to its internal key ([`internal`]) before it is routed, and every key
//! it answers with is mapped back, so the bucket never shows. A scan that
//! covers a keyspace reads each bucket's part of it and merges them by
//! user key ([`scan`]): the keys come out in order, each once, and pages
//! follow on with the usual `next`.
//!
//! Declaring ([`declare`], on the metadata leader): refused with 409 when
//! plain keys already sit under the prefix (no live migration). Then
//! (1) the keyspace is recorded: every router that sees it maps keys from
//! then on; (2) the range holding the prefix is split at each bucket's
//! bound, one shard per bucket; each split commits at a bumped epoch, so a
//! write routed by a directory older than (1) is refused from then on and
//! retried with the mapping; (3) a plain key that such a write left under
//! the prefix before the splits (in the two guard spans, below the first
//! bucket and above the last) is moved to its internal key; (4) the
//! keyspace is marked active. (2)–(4) run in a task of their own on the
//! metadata leader, and a new metadata leader finishes a declaration left
//! unfinished ([`finish_declarations`]); every step is idempotent.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_metadata::keyspace::{bucket_bounds, bucket_span, Keyspace, Keyspaces};
use cleave_metadata::{MetaCommand, MetaError, Phase, RangeState};

use crate::command::{KvError, KvOp};
use crate::node::Node;
use crate::rpc::{self, ExecError};

/// One scanned item: key, version, value's JSON text.
pub type ScanItem = (String, u64, String);

/// A key span `[start, end)` (`None`: to the end of the key space).
pub type Span = (String, Option<String>);

/// A part of a scanned range: its span, and the keyspace `(prefix,
/// buckets)` it lies under (`None`: plain keys).
type Part<'a> = (String, Option<String>, Option<(&'a str, u32)>);

/// The internal key of user key `key` under the keyspaces of `dir`.
pub fn internal(dir: &cleave_metadata::Directory, key: &str) -> Result<String, ExecError> {
    dir.keyspaces.to_internal(key).map_err(|e| ExecError::Meta(MetaError::Keyspace(e)))
}

/// The first key after every key that starts with `prefix` (`None`: the
/// end of the key space).
pub fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        if let Some(next) = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// The parts of the user key range `[start, end)`, in key order: plain
/// spans (`None`) and the parts under a keyspace (`Some((prefix, n))`).
fn parts<'a>(spaces: &'a Keyspaces, start: &str, end: Option<&str>) -> Vec<Part<'a>> {
    let mut out = Vec::new();
    let mut at = start.to_string();
    for (prefix, k) in &spaces.0 {
        let p_end = prefix_end(prefix);
        let before_end = |x: &str| end.is_none_or(|e| x < e);
        // Keyspaces entirely before `at` or from `end` on are not touched.
        if p_end.as_deref().is_some_and(|pe| pe <= at.as_str()) || !before_end(prefix) {
            continue;
        }
        if at.as_str() < prefix.as_str() {
            out.push((at.clone(), Some(prefix.clone()), None));
            at = prefix.clone();
        }
        let stop = match (&p_end, end) {
            (Some(pe), Some(e)) => Some(pe.as_str().min(e).to_string()),
            (Some(pe), None) => Some(pe.clone()),
            (None, e) => e.map(str::to_string),
        };
        out.push((at.clone(), stop.clone(), Some((prefix.as_str(), k.buckets))));
        match stop {
            Some(s) => at = s,
            None => return out,
        }
    }
    if end.is_none_or(|e| at.as_str() < e) {
        out.push((at, end.map(str::to_string), None));
    }
    out
}

/// Up to `limit` items of user keys in `[start, end)`, in user key order,
/// and whether there are more.
pub async fn scan(
    node: &Node,
    start: &str,
    end: Option<&str>,
    limit: usize,
) -> Result<(Vec<ScanItem>, bool), ExecError> {
    let spaces = node.directory().keyspaces.clone();
    if spaces.0.is_empty() {
        return node.router().scan(start, end, limit).await;
    }
    let mut items = Vec::new();
    for (s, e, space) in parts(&spaces, start, end) {
        let left = limit - items.len();
        let (mut got, more) = match space {
            None => node.router().scan(&s, e.as_deref(), left).await?,
            Some((prefix, n)) => scan_buckets(node, &spaces, prefix, n, &s, e.as_deref(), left).await?,
        };
        items.append(&mut got);
        if more || items.len() >= limit {
            return Ok((items, true));
        }
    }
    Ok((items, false))
}

/// Up to `limit` items of keyspace `prefix` (`n` buckets) with user keys in
/// `[start, end)`, in user key order, and whether there may be more. Each
/// bucket is read for a share of the page (so a page of a 256-bucket
/// keyspace reads about twice the page, not 256 pages); what is kept stops
/// at the smallest last key of the buckets that had more, below which
/// every bucket's keys were read, so nothing is skipped (a page may come
/// out shorter than `limit`, and `next` goes on from it).
async fn scan_buckets(
    node: &Node,
    spaces: &Keyspaces,
    prefix: &str,
    n: u32,
    start: &str,
    end: Option<&str>,
    limit: usize,
) -> Result<(Vec<ScanItem>, bool), ExecError> {
    let share = bucket_share(limit, n);
    let reads = (0..n)
        .filter_map(|b| bucket_span(prefix, b, start, end))
        .map(|(from, to)| async move { node.router().scan(&from, Some(&to), share).await });
    let mut all = Vec::new();
    // The smallest last user key of the buckets that had more.
    let mut cutoff: Option<String> = None;
    for r in futures::future::join_all(reads).await {
        let (items, more) = r?;
        let items: Vec<ScanItem> = items.into_iter().map(|(k, v, j)| (spaces.to_user(&k), v, j)).collect();
        if more {
            if let Some(last) = items.last() {
                cutoff = Some(cutoff.map_or(last.0.clone(), |c| c.min(last.0.clone())));
            }
        }
        all.extend(items);
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let mut more = cutoff.is_some();
    if let Some(c) = &cutoff {
        all.retain(|i| i.0 <= *c);
    }
    more |= all.len() > limit;
    all.truncate(limit);
    Ok((all, more))
}

/// How many items each of `n` buckets is read for, for a page of `limit`.
fn bucket_share(limit: usize, n: u32) -> usize {
    (2 * limit / n.max(1) as usize + 1).clamp(1, limit.max(1))
}

/// What a watch of user keys `[start, end)` reads: the range widened to
/// the whole of every keyspace it overlaps (a keyspace's internal keys all
/// lie under its prefix, but not in the order of its user keys), and the
/// user keys to keep when it was widened.
pub fn watch_span(spaces: &Keyspaces, start: &str, end: Option<&str>) -> (String, Option<String>, Option<Span>) {
    let touched: Vec<&str> =
        parts(spaces, start, end).into_iter().filter_map(|(_, _, k)| k.map(|(prefix, _)| prefix)).collect();
    let (Some(first), Some(last)) = (touched.first(), touched.last()) else {
        return (start.to_string(), end.map(str::to_string), None);
    };
    let from = start.min(first).to_string();
    let to = match (end, prefix_end(last)) {
        (Some(e), Some(pe)) => Some(e.max(pe.as_str()).to_string()),
        _ => None,
    };
    (from, to, Some((start.to_string(), end.map(str::to_string))))
}

/// How long a declaration may take, splits included.
pub const DECLARE_TIMEOUT: Duration = Duration::from_secs(120);

/// Declares keyspace `prefix` with `buckets` buckets, as metadata leader
/// (forwarding there if needed): checks and records it, and wakes
/// [`finish_declarations`], which does the rest in a task of its own (a
/// client that hangs up, or a forwarded call's deadline, must not cut it
/// short). Answers the keyspace as recorded (`active` once the rest is
/// done; the caller waits for it).
pub async fn declare(node: &Node, prefix: String, buckets: u32, hops: u8) -> Result<Keyspace, ExecError> {
    if !node.meta_leader().is_leader() {
        let req = |hops| rpc::DeclareKeyspace { prefix: prefix.clone(), buckets, hops };
        return node.meta_leader().forward_to_leader(hops, req).await;
    }
    let known = node.directory().keyspaces.0.get(&prefix).copied();
    match known {
        Some(k) if k.active && k.buckets == buckets => return Ok(k),
        // Declared already (a declaration cut short): finish it.
        Some(k) if k.buckets == buckets => {}
        _ => {
            node.directory()
                .keyspaces
                .check_new(&prefix, buckets)
                .map_err(|e| ExecError::Meta(MetaError::Keyspace(e)))?;
            let (found, _) = node.router().scan(&prefix, prefix_end(&prefix).as_deref(), 1).await?;
            if let Some(k) = found.first() {
                return Err(ExecError::Refused(format!(
                    "keys already exist under {prefix:?} (for one {:?}): a keyspace is declared over a prefix \
                     that holds no data",
                    k.0
                )));
            }
            node.router().propose_meta(MetaCommand::DeclareKeyspace { prefix: prefix.clone(), buckets }, 0).await?;
        }
    }
    WAKE.notify_one();
    Ok(Keyspace { buckets, active: false })
}

/// Wakes [`finish_declarations`] at once after a declaration.
static WAKE: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// The declarations being finished on this node.
static FINISHING: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());

/// Runs [`finish`] for `prefix` in a task, unless one runs already.
fn start_finishing(node: &Arc<Node>, prefix: String, buckets: u32) {
    if !FINISHING.lock().expect("finishing lock").insert(prefix.clone()) {
        return;
    }
    let node = node.clone();
    tokio::spawn(async move {
        if let Err(e) = finish(&node, &prefix, buckets).await {
            tracing::warn!(prefix, "keyspace declaration not finished yet: {e}");
        }
        FINISHING.lock().expect("finishing lock").remove(&prefix);
    });
}

/// The rest of a declaration: the splits at every bucket bound (the
/// fence), the strays moved, the keyspace marked active.
async fn finish(node: &Node, prefix: &str, buckets: u32) -> Result<(), ExecError> {
    let deadline = Instant::now() + DECLARE_TIMEOUT;
    for bound in bucket_bounds(prefix, buckets) {
        split_at(node, &bound, deadline).await?;
    }
    move_strays(node, prefix, buckets).await?;
    node.router().propose_meta(MetaCommand::ActivateKeyspace { prefix: prefix.to_string() }, 0).await?;
    tracing::info!(prefix, buckets, "keyspace active");
    Ok(())
}

/// While this node leads the metadata group: finishes every declaration
/// not finished yet — just made ([`declare`] wakes it), or left by a
/// metadata leader that stopped, or cut short by a failure (looked at
/// every few seconds).
pub async fn finish_declarations(node: Arc<Node>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = WAKE.notified() => {}
        }
        if !node.meta_leader().confirmed().await {
            continue;
        }
        let pending: Vec<(String, u32)> = node
            .directory()
            .keyspaces
            .0
            .iter()
            .filter(|(_, k)| !k.active)
            .map(|(p, k)| (p.clone(), k.buckets))
            .collect();
        for (prefix, buckets) in pending {
            start_finishing(&node, prefix, buckets);
        }
    }
}

/// The spans under keyspace `prefix` (`n` buckets) that no bucket covers:
/// below the first bucket, and from the end of the last on.
fn guard_spans(prefix: &str, n: u32) -> [Span; 2] {
    let bounds = bucket_bounds(prefix, n);
    [(prefix.to_string(), Some(bounds[0].clone())), (bounds[n as usize].clone(), prefix_end(prefix))]
}

/// Splits the range holding `key` at `key`, unless a range already starts
/// there; waits for the split to finish.
async fn split_at(node: &Node, key: &str, deadline: Instant) -> Result<(), ExecError> {
    loop {
        let dir = node.directory();
        let Some(range) = dir.lookup(key).cloned() else {
            return Err(ExecError::Unavailable("directory not loaded".into()));
        };
        if range.start == key {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(ExecError::Timeout(format!("splitting at {key:?} for a keyspace took too long")));
        }
        let busy = match range.state {
            RangeState::Busy { op_id } => Some(op_id),
            RangeState::Active => {
                match crate::ops::split::start(node, None, Some(key.to_string()), "keyspace".into(), 0).await {
                    Ok(op) => Some(op),
                    Err(ExecError::Meta(MetaError::RangeBusy { op_id, .. } | MetaError::ShardBusy { op_id, .. })) => {
                        Some(op_id)
                    }
                    // Too few nodes heard from yet (a cluster just started),
                    // a leader changing: try again until the deadline.
                    Err(
                        e @ (ExecError::Unavailable(_)
                        | ExecError::NoLeader { .. }
                        | ExecError::Meta(MetaError::BadPlacement(_))),
                    ) if Instant::now() + Duration::from_millis(200) < deadline => {
                        tracing::debug!(key, "keyspace split not started yet: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        None
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        if let Some(op) = busy {
            wait_ended(node, op, deadline).await;
        }
    }
}

/// Waits until operation `op` has ended (or the deadline passed).
async fn wait_ended(node: &Node, op: u64, deadline: Instant) {
    while Instant::now() < deadline {
        let ended = node.directory().ops.get(&op).is_none_or(|o| o.phase == Phase::Done || o.phase.is_terminal());
        if ended {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Moves each plain key left under `prefix` (written by a router that did
/// not know the keyspace yet, before the splits fenced it out; none can
/// come after them, so one pass does) to its internal key: written there
/// only if absent (a write through a router that knew the keyspace wins:
/// the two were concurrent), then deleted if unchanged. A crash in between
/// leaves both; declaring again moves it again. A stray that cannot be
/// mapped (a bucket marker after the prefix) is left where it is.
async fn move_strays(node: &Node, prefix: &str, n: u32) -> Result<(), ExecError> {
    let router = node.router();
    for (start, end) in guard_spans(prefix, n) {
        let mut from = start;
        loop {
            let (strays, more) = router.scan(&from, end.as_deref(), 100).await?;
            for (key, version, json) in &strays {
                let to = match internal(&node.directory(), key) {
                    Ok(to) => to,
                    Err(e) => {
                        tracing::warn!(key, "keyspace {prefix:?}: a stray key that cannot be moved: {e}");
                        continue;
                    }
                };
                let put = KvOp::Put { key: to, value: json.clone(), if_version: Some(0) };
                match router.write(put).await {
                    Ok(_) | Err(ExecError::Kv(KvError::VersionConflict { .. })) => {}
                    Err(e) => return Err(e),
                }
                let delete = KvOp::Delete { key: key.clone(), if_version: Some(*version) };
                match router.write(delete).await {
                    Ok(_) | Err(ExecError::Kv(KvError::VersionConflict { .. } | KvError::NotFound)) => {}
                    Err(e) => return Err(e),
                }
            }
            match strays.last() {
                Some((last, _, _)) if more => from = format!("{last}\u{0}"),
                _ => break,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spaces(prefixes: &[&str]) -> Keyspaces {
        Keyspaces(prefixes.iter().map(|p| (p.to_string(), Keyspace { buckets: 4, active: true })).collect())
    }

    #[test]
    fn a_scan_range_is_cut_into_plain_parts_and_keyspace_parts_in_order() {
        let s = spaces(&["ev/", "log/"]);
        let got = parts(&s, "a", None);
        let shape: Vec<(&str, Option<&str>, Option<&str>)> =
            got.iter().map(|(a, b, k)| (a.as_str(), b.as_deref(), k.map(|k| k.0))).collect();
        assert_eq!(
            shape,
            vec![
                ("a", Some("ev/"), None),
                ("ev/", Some("ev0"), Some("ev/")),
                ("ev0", Some("log/"), None),
                ("log/", Some("log0"), Some("log/")),
                ("log0", None, None),
            ]
        );
        // Inside one keyspace only.
        let got = parts(&s, "ev/b", Some("ev/d"));
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].0.as_str(), got[0].1.as_deref(), got[0].2.map(|k| k.0)),
            ("ev/b", Some("ev/d"), Some("ev/"))
        );
        // Entirely outside.
        let got = parts(&s, "m", Some("n"));
        assert_eq!(got.len(), 1);
        assert!(got[0].2.is_none());
        assert!(parts(&s, "ev/", Some("ev/")).is_empty(), "an empty range has no parts");
    }

    #[test]
    fn a_watch_over_part_of_a_keyspace_reads_all_of_it_and_keeps_the_users_keys() {
        let s = spaces(&["ev/"]);
        assert_eq!(watch_span(&s, "a", Some("b")), ("a".into(), Some("b".into()), None), "no keyspace: as asked");
        let (from, to, keep) = watch_span(&s, "ev/b", Some("ev/d"));
        assert_eq!((from.as_str(), to.as_deref()), ("ev/", Some("ev0")));
        assert_eq!(keep, Some(("ev/b".into(), Some("ev/d".into()))));
        let (from, to, _) = watch_span(&s, "a", None);
        assert_eq!((from.as_str(), to), ("a", None));
    }

    #[test]
    fn each_bucket_is_read_for_a_share_of_the_page() {
        assert_eq!(bucket_share(1000, 256), 8);
        assert_eq!(bucket_share(1000, 2), 1000, "never more than the page");
        assert_eq!(bucket_share(1, 256), 1, "never less than one");
        assert_eq!(bucket_share(100, 8), 26);
    }

    #[test]
    fn the_end_of_a_prefix_is_the_first_key_past_every_key_under_it() {
        assert_eq!(prefix_end("ev/").as_deref(), Some("ev0"));
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
    }
}
