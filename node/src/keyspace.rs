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
//! keyspace is marked active. Every step is idempotent: declaring again
//! after a failure finishes the job.

use std::time::{Duration, Instant};

use cleave_metadata::keyspace::{bucket_bounds, bucket_span, Keyspace, Keyspaces};
use cleave_metadata::{MetaCommand, MetaError, Phase, RangeState};

use crate::command::KvOp;
use crate::node::Node;
use crate::rpc::{self, ExecError};

/// One scanned item: key, version, value's JSON text.
pub type ScanItem = (String, u64, String);

/// A key span `[start, end)` (`None`: to the end of the key space).
pub type Span = (String, Option<String>);

/// A part of a scanned range: its span, and the keyspace `(prefix,
/// buckets)` it lies under (`None`: plain keys).
type Part<'a> = (String, Option<String>, Option<(&'a str, u32)>);

/// The internal key of user key `key` under the directory this node has.
pub fn internal(node: &Node, key: &str) -> Result<String, ExecError> {
    node.directory().keyspaces.to_internal(key).map_err(|e| ExecError::Meta(MetaError::Keyspace(e)))
}

/// The user key of internal key `key`.
pub fn user(node: &Node, key: &str) -> String {
    node.directory().keyspaces.to_user(key)
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
/// `[start, end)`: up to `limit` from each bucket, merged by user key, the
/// first `limit` kept. That is exact: a bucket that had more holds nothing
/// below its last item read, and `limit` items at or below it were read.
async fn scan_buckets(
    node: &Node,
    spaces: &Keyspaces,
    prefix: &str,
    n: u32,
    start: &str,
    end: Option<&str>,
    limit: usize,
) -> Result<(Vec<ScanItem>, bool), ExecError> {
    let reads = (0..n)
        .filter_map(|b| bucket_span(prefix, b, start, end))
        .map(|(from, to)| async move { node.router().scan(&from, Some(&to), limit).await });
    let mut all = Vec::new();
    let mut more = false;
    for r in futures::future::join_all(reads).await {
        let (items, m) = r?;
        more |= m;
        all.extend(items.into_iter().map(|(k, v, j)| (spaces.to_user(&k), v, j)));
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    more |= all.len() > limit;
    all.truncate(limit);
    Ok((all, more))
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
const DECLARE_TIMEOUT: Duration = Duration::from_secs(120);

/// Declares keyspace `prefix` with `buckets` buckets, as metadata leader
/// (forwarding there if needed); answers once it is active.
pub async fn declare(node: &Node, prefix: String, buckets: u32, hops: u8) -> Result<Keyspace, ExecError> {
    if !node.meta_leader().is_leader() {
        let req = |hops| rpc::DeclareKeyspace { prefix: prefix.clone(), buckets, hops };
        return node.meta_leader().forward_to_leader(hops, req).await;
    }
    let deadline = Instant::now() + DECLARE_TIMEOUT;
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
            if let Some(k) = plain_keys(node, &prefix, 1).await?.first() {
                return Err(ExecError::Refused(format!(
                    "keys already exist under {prefix:?} (for one {k:?}): a keyspace is declared over a prefix \
                     that holds no data"
                )));
            }
            node.router().propose_meta(MetaCommand::DeclareKeyspace { prefix: prefix.clone(), buckets }, 0).await?;
        }
    }
    for bound in bucket_bounds(&prefix, buckets) {
        split_at(node, &bound, deadline).await?;
    }
    move_strays(node, &prefix).await?;
    node.router().propose_meta(MetaCommand::ActivateKeyspace { prefix: prefix.clone() }, 0).await?;
    Ok(Keyspace { buckets, active: true })
}

/// Keys under `prefix` that are not in a bucket (plain keys), at most `limit`.
async fn plain_keys(node: &Node, prefix: &str, limit: usize) -> Result<Vec<ScanItem>, ExecError> {
    let router = node.router();
    let mut out = Vec::new();
    // The two guard spans: below the first bucket, from the last one's end.
    let bounds = bucket_bounds(prefix, cleave_metadata::keyspace::MAX_BUCKETS);
    let (first, last) = (bounds[0].clone(), bounds[bounds.len() - 1].clone());
    for (s, e) in [(prefix.to_string(), Some(first)), (last, prefix_end(prefix))] {
        let (items, _) = router.scan(&s, e.as_deref(), limit).await?;
        out.extend(items);
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
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
/// not know the keyspace yet, before the splits fenced it out) to its
/// internal key: written there first, then deleted if unchanged. A crash in
/// between leaves both; declaring again moves it again.
async fn move_strays(node: &Node, prefix: &str) -> Result<(), ExecError> {
    let router = node.router();
    loop {
        let strays = plain_keys(node, prefix, 100).await?;
        if strays.is_empty() {
            return Ok(());
        }
        for (key, version, json) in strays {
            let to = internal(node, &key)?;
            router.write(KvOp::Put { key: to, value: json, if_version: None }).await?;
            match router.write(KvOp::Delete { key: key.clone(), if_version: Some(version) }).await {
                Ok(_) | Err(ExecError::Kv(crate::command::KvError::VersionConflict { .. })) => {}
                Err(e) => return Err(e),
            }
        }
    }
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
    fn the_end_of_a_prefix_is_the_first_key_past_every_key_under_it() {
        assert_eq!(prefix_end("ev/").as_deref(), Some("ev0"));
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
    }
}
