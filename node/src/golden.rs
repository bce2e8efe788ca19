//! Golden-script tests of what a shard applies: [`kv::apply`] (puts,
//! compare-and-set, deletes, tombstones, route fencing) and the split steps
//! of [`crate::split::apply`] (captures, freezes, ingest, activation, split
//! done), in the style of toyDB's `testscripts`.
//!
//! Each file under `src/testscripts/<area>/` is one test. A script is a list
//! of commands, each block followed by `---` and the output it must produce;
//! the output is generated with `UPDATE_GOLDENFILES=1 cargo test -p
//! cleave-node golden`, then read and checked by hand before it is
//! committed. A change in behaviour shows up as a diff of that output.
//!
//! Several shards can live in one script (one RocksDB, one group id each);
//! a command's `name:` prefix picks the shard, the first shard created is
//! the default. Each applied command consumes the shard's next log index,
//! printed as `#N`. After every command the runner also checks invariants
//! that must hold whatever the script does, and fails the test if one
//! breaks:
//! - the live keys and bytes that apply reported add up to what is stored;
//! - a target's incoming digest equals the digest of what it stores;
//! - a capture's `changes` equal the change of the range's digest since
//!   the capture began.
//!
//! Commands (keys and JSON values are strings; `end` absent or empty is +∞):
//! - `shard NAME id=G [range=R epoch=E start=S end=E]`: a shard of group G
//!   owning one range (default: range 1 at epoch 1, the whole key space);
//!   `shard NAME id=G incoming=OP start=S [end=E]`: a split target
//!   receiving `[S, E)` for operation OP.
//! - `own range=R epoch=E start=S [end=E]`: the shard also owns that range.
//! - `put K JSON [expect=V] [range=R epoch=E]`, `cas K JSON expect=V`,
//!   `delete K [expect=V]`: KV writes, routed through the owning range
//!   unless `range`/`epoch` say otherwise (a client's stale route).
//! - `get K`, `scan [from=K] [to=K] [limit=N]`, `dump`, `state`, `stats`.
//! - `begin_batch`, `commit`: the commands between apply into one write
//!   batch, as the entries of one state-machine apply call do.
//! - `begin_capture op=OP start=S [end=E] target=T`, `freeze op=OP`,
//!   `end_capture op=OP`, `split_done op=OP at=K moved=R target=T`,
//!   `activate op=OP`, `ingest op=OP [seq=I] K@V=JSON|K@V=tombstone...`.
//! - `backfill op=OP from=A to=B`, `forward op=OP from=A to=B [after=I]
//!   [upto=I]`, `verify op=OP from=A to=B`: the forwarder's and the
//!   driver's parts, done by hand (see `split/forwarder.rs`).

use std::collections::{BTreeMap, HashMap};
use std::error::Error;
use std::fmt::Write as _;
use std::sync::Arc;

use cleave_metadata::{OpId, RangeDescriptor};
use goldenscript::Command;

use crate::command::{KvCommand, KvError, KvOp, ShardCommand, StepError};
use crate::kv::{self, ApplyBatch, ForwardEntry, Incoming, ShardState};
use crate::split::digest;
use crate::storage::{self, data_key, Db, ValueRecord};

type Res<T> = Result<T, Box<dyn Error>>;

/// A step's log index, its answer, and the watched keys it stored.
type StepApplied = (u64, Result<u64, StepError>, Vec<(String, ValueRecord)>);

/// One shard (Raft group) of a script, applied to directly.
struct Shard {
    group: u64,
    state: ShardState,
    /// The last log index applied.
    applied: u64,
    /// Live keys and bytes, summed from what apply reported.
    stats: (i64, i64),
    /// An open `begin_batch`.
    batch: Option<ApplyBatch>,
    /// The digest of each capture's range when it began.
    capture_base: HashMap<OpId, u64>,
}

/// Runs the scripts: shards by name over one temporary database.
struct Runner {
    _dir: tempfile::TempDir,
    db: Arc<Db>,
    shards: BTreeMap<String, Shard>,
    first: Option<String>,
    /// The `SplitDone` of each operation, for redeliveries and `activate`.
    splits: HashMap<OpId, ShardCommand>,
}

fn end_of(v: Option<&str>) -> Option<String> {
    v.filter(|e| !e.is_empty()).map(str::to_string)
}

fn show_end(end: Option<&str>) -> String {
    end.map_or("∞".to_string(), |e| format!("{e:?}"))
}

fn show_range(r: &RangeDescriptor) -> String {
    format!("r{}@{} [{:?}, {}) → shard {}", r.range_id, r.epoch, r.start, show_end(r.end.as_deref()), r.shard_id)
}

fn show_record(key: &str, r: &ValueRecord) -> String {
    match r.tombstone {
        true => format!("{key}@{} tombstone", r.version),
        false => format!("{key}@{} = {}", r.version, String::from_utf8_lossy(&r.json)),
    }
}

fn show_kv_error(e: &KvError) -> String {
    match e {
        KvError::WrongRange { ranges } => {
            let list: Vec<String> = ranges.iter().map(show_range).collect();
            format!(
                "stale route; the shard tells: {}",
                if list.is_empty() { "no ranges".into() } else { list.join(", ") }
            )
        }
        e => e.to_string(),
    }
}

fn show_step(r: &Result<u64, StepError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("refused: {e}"),
    }
}

impl Runner {
    fn new() -> Runner {
        let (dir, db) = crate::testing::temp_db();
        Runner { _dir: dir, db, shards: BTreeMap::new(), first: None, splits: HashMap::new() }
    }

    fn name_of(&self, cmd: &Command) -> Res<String> {
        cmd.prefix.clone().or_else(|| self.first.clone()).ok_or_else(|| "no shard yet: use `shard`".into())
    }

    fn shard(&self, name: &str) -> Res<&Shard> {
        self.shards.get(name).ok_or_else(|| format!("no shard {name}").into())
    }

    fn shard_mut(&mut self, name: &str) -> Res<&mut Shard> {
        self.shards.get_mut(name).ok_or_else(|| format!("no shard {name}").into())
    }

    /// Stored user records of `group` in `[start, end)`, tombstones too.
    fn stored(&self, group: u64, start: &str, end: Option<&str>) -> Res<Vec<(String, ValueRecord)>> {
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(match end {
            Some(e) => data_key(group, e.as_bytes()),
            None => kv::user_data_end(group),
        });
        let from = data_key(group, start.as_bytes());
        let cf = storage::cf(&self.db, storage::CF_DATA);
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward)) {
            let (k, v) = item?;
            let key = String::from_utf8(storage::user_key_of(&k).to_vec())?;
            out.push((key, ValueRecord::decode(&v).ok_or("undecodable record")?));
        }
        Ok(out)
    }

    fn digest(&self, group: u64, start: &str, end: Option<&str>) -> Res<u64> {
        Ok(self.stored(group, start, end)?.iter().fold(0u64, |d, (k, r)| d.wrapping_add(digest::record_hash(k, r))))
    }

    /// The digest of `[start, end)` of shard `name` as its open batch (if
    /// any) sees it: the database overlaid with what the batch wrote.
    fn digest_now(&self, name: &str, start: &str, end: Option<&str>) -> Res<u64> {
        let s = self.shard(name)?;
        let mut records: BTreeMap<String, ValueRecord> = self.stored(s.group, start, end)?.into_iter().collect();
        if let Some(b) = &s.batch {
            let inside = |k: &str| k >= start && end.is_none_or(|e| k < e);
            records.extend(b.overlay.iter().filter(|(k, _)| inside(k)).map(|(k, r)| (k.clone(), r.clone())));
        }
        Ok(records.iter().fold(0u64, |d, (k, r)| d.wrapping_add(digest::record_hash(k, r))))
    }

    /// Forward-log entries of `op` in group `group` with index in `(after, upto]`.
    fn forward_log(&self, group: u64, op: OpId, after: u64, upto: u64) -> Res<Vec<(u64, ForwardEntry)>> {
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(kv::forward_key(group, op + 1, 0));
        let from = kv::forward_key(group, op, after + 1);
        let cf = storage::cf(&self.db, storage::CF_DATA);
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward)) {
            let (k, v) = item?;
            let seq = u64::from_be_bytes(k[k.len() - 8..].try_into()?);
            if seq <= upto {
                out.push((seq, crate::codec::decode::<ForwardEntry>(&v)?));
            }
        }
        Ok(out)
    }

    /// Every forward-log entry stored for `group`: (operation, index, entry).
    fn forward_logs(&self, group: u64) -> Res<Vec<(OpId, u64, ForwardEntry)>> {
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(kv::forward_key(group, u64::MAX, u64::MAX));
        let from = kv::forward_key(group, 0, 0);
        let cf = storage::cf(&self.db, storage::CF_DATA);
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward)) {
            let (k, v) = item?;
            let op = u64::from_be_bytes(k[k.len() - 16..k.len() - 8].try_into()?);
            let seq = u64::from_be_bytes(k[k.len() - 8..].try_into()?);
            out.push((op, seq, crate::codec::decode::<ForwardEntry>(&v)?));
        }
        Ok(out)
    }

    /// Applies a KV command to shard `name` at its next index.
    fn apply_kv(&mut self, name: &str, cmd: &KvCommand) -> Res<(u64, Result<u64, KvError>)> {
        let db = self.db.clone();
        let s = self.shard_mut(name)?;
        s.applied += 1;
        let mut own = None;
        let b = match &mut s.batch {
            Some(b) => b,
            None => own.insert(ApplyBatch::default()),
        };
        let r = kv::apply(&db, s.group, s.applied, &mut s.state, b, cmd)?;
        if let Some(b) = own {
            s.write(&db, b)?;
        }
        Ok((s.applied, r))
    }

    /// Applies a split step to shard `name` at its next index. Also returns
    /// the keys it stored, of those in `watch`, as (key, record).
    fn apply_step(&mut self, name: &str, cmd: &ShardCommand, watch: &[String]) -> Res<StepApplied> {
        let db = self.db.clone();
        let base = match cmd {
            ShardCommand::BeginCapture { start, end, .. } => Some(self.digest_now(name, start, end.as_deref())?),
            _ => None,
        };
        let s = self.shard_mut(name)?;
        s.applied += 1;
        let mut own = None;
        let b = match &mut s.batch {
            Some(b) => b,
            None => own.insert(ApplyBatch::default()),
        };
        let mut watch = watch.to_vec();
        let mut seen = std::collections::HashSet::new();
        watch.retain(|k| seen.insert(k.clone()));
        let before: Vec<Option<ValueRecord>> = watch.iter().map(|k| b.overlay.get(k).cloned()).collect();
        let had_capture = |st: &ShardState, op: OpId| st.captures.iter().any(|c| c.op_id == op);
        let began = match cmd {
            ShardCommand::BeginCapture { op_id, .. } if !had_capture(&s.state, *op_id) => Some(*op_id),
            _ => None,
        };
        let r = crate::split::apply::apply(&db, s.group, s.applied, &mut s.state, b, cmd)?;
        let stored = watch
            .iter()
            .zip(before)
            .filter_map(|(k, was)| {
                b.overlay.get(k).filter(|now| Some(*now) != was.as_ref()).map(|r| (k.clone(), r.clone()))
            })
            .collect();
        if let (Some(op), Some(base)) = (began, base) {
            if had_capture(&s.state, op) {
                s.capture_base.insert(op, base);
            }
        }
        s.capture_base.retain(|op, _| s.state.captures.iter().any(|c| c.op_id == *op));
        if let Some(b) = own {
            s.write(&db, b)?;
        }
        Ok((s.applied, r, stored))
    }

    /// The route a client with a current directory would use for `key`, or
    /// the one the command gives.
    fn route(&self, name: &str, key: &str, cmd: &Command) -> Res<(u64, u64)> {
        let mut args = cmd.consume_args();
        let range = args.lookup_parse::<u64>("range")?;
        let epoch = args.lookup_parse::<u64>("epoch")?;
        if let (Some(r), Some(e)) = (range, epoch) {
            return Ok((r, e));
        }
        let s = self.shard(name)?;
        let owner =
            s.state.owner(key).ok_or_else(|| format!("no range of {name} holds {key:?}: give range= epoch="))?;
        Ok((range.unwrap_or(owner.range_id), epoch.unwrap_or(owner.epoch)))
    }

    fn run_kv(&mut self, name: &str, cmd: &Command) -> Res<String> {
        let mut args = cmd.consume_args();
        let key = args.next_pos().ok_or("key missing")?.value.clone();
        let value = match cmd.name.as_str() {
            "delete" => None,
            _ => Some(args.next_pos().ok_or("value missing")?.value.clone()),
        };
        let expect = args.lookup_parse::<u64>("expect")?;
        args.lookup("range");
        args.lookup("epoch");
        args.reject_rest()?;
        if cmd.name == "cas" && expect.is_none() {
            return Err("cas needs expect=".into());
        }
        let (range_id, epoch) = self.route(name, &key, cmd)?;
        let op = match &value {
            Some(value) => KvOp::Put { key: key.clone(), value: value.clone(), if_version: expect },
            None => KvOp::Delete { key: key.clone(), if_version: expect },
        };
        let (index, r) = self.apply_kv(name, &KvCommand { range_id, epoch, op })?;
        let what = match &value {
            Some(v) => format!("{} {key}={v}", cmd.name),
            None => format!("delete {key}"),
        };
        Ok(match r {
            Ok(v) => format!("#{index} {what} → v{v}\n"),
            Err(e) => format!("#{index} {what} → refused: {}\n", show_kv_error(&e)),
        })
    }

    fn op_arg(args: &mut goldenscript::ArgumentConsumer<'_>) -> Res<OpId> {
        args.lookup_parse::<u64>("op")?.ok_or_else(|| "op= missing".into())
    }

    fn run_step(&mut self, name: &str, cmd: &Command) -> Res<String> {
        let mut args = cmd.consume_args();
        let op_id = Self::op_arg(&mut args)?;
        let mut watch = Vec::new();
        let step = match cmd.name.as_str() {
            "begin_capture" => {
                let start = args.lookup("start").map(|a| a.value.clone()).unwrap_or_default();
                let end = end_of(args.lookup("end").map(|a| a.value.as_str()));
                let target = args.lookup_parse::<u64>("target")?.ok_or("target= missing")?;
                ShardCommand::BeginCapture { op_id, start, end, target }
            }
            "freeze" => ShardCommand::Freeze { op_id },
            "end_capture" => ShardCommand::EndCapture { op_id },
            "split_done" => {
                let at = args.lookup("at").ok_or("at= missing")?.value.clone();
                let moved_id = args.lookup_parse::<u64>("moved")?.ok_or("moved= missing")?;
                let target = args.lookup_parse::<u64>("target")?.ok_or("target= missing")?;
                match self.splits.get(&op_id) {
                    // A redelivery: the very command the driver sent before.
                    Some(done) => done.clone(),
                    None => {
                        let done = self.split_done(name, op_id, &at, moved_id, target)?;
                        self.splits.insert(op_id, done.clone());
                        done
                    }
                }
            }
            "activate" => match self.splits.get(&op_id) {
                Some(ShardCommand::SplitDone { moved, .. }) => {
                    ShardCommand::Activate { op_id, ranges: vec![moved.clone()] }
                }
                _ => return Err("no split_done of that operation yet".into()),
            },
            "ingest" => {
                let source_index = args.lookup_parse::<u64>("seq")?;
                let mut records = Vec::new();
                for a in args.rest() {
                    let spec = a.key.as_deref().ok_or("records are KEY@VERSION=JSON")?;
                    let (key, version) = spec.rsplit_once('@').ok_or("records are KEY@VERSION=JSON")?;
                    let record = match a.value.as_str() {
                        "tombstone" => ValueRecord::deleted(version.parse()?),
                        json => ValueRecord::live(version.parse()?, json.into()),
                    };
                    watch.push(key.to_string());
                    records.push((key.to_string(), record.encode()));
                }
                ShardCommand::Ingest { op_id, source_index, records }
            }
            other => return Err(format!("unknown step {other}").into()),
        };
        args.reject_rest()?;
        let (index, r, stored) = self.apply_step(name, &step, &watch)?;
        let seq = match &step {
            ShardCommand::Ingest { source_index: Some(i), .. } => format!(" seq={i}"),
            _ => String::new(),
        };
        let mut out = format!("#{index} {} op={op_id}{seq} → {}", cmd.name, show_step(&r));
        match (&step, &r) {
            (ShardCommand::Freeze { .. }, Ok(at)) => write!(out, ", frozen at #{at}")?,
            (ShardCommand::Ingest { .. }, Ok(_)) => write!(out, "{}", self.ingested(name, &stored)?)?,
            _ => {}
        }
        Ok(out + "\n")
    }

    /// The `SplitDone` the driver sends once `op` committed: the source
    /// keeps its range up to `at` at the next epoch, the rest moves to
    /// `target` as range `moved_id`, with the target's live keys and bytes.
    fn split_done(&self, name: &str, op_id: OpId, at: &str, moved_id: u64, target: u64) -> Res<ShardCommand> {
        let s = self.shard(name)?;
        let split = s.state.owner(at).ok_or_else(|| format!("{name} owns no range holding {at:?}"))?;
        let left = RangeDescriptor { end: Some(at.to_string()), epoch: split.epoch + 1, ..split.clone() };
        let moved = RangeDescriptor {
            range_id: moved_id,
            start: at.to_string(),
            end: split.end.clone(),
            shard_id: target,
            epoch: split.epoch + 1,
            state: Default::default(),
        };
        let t =
            self.shards.values().find(|t| t.group == target).ok_or_else(|| format!("no shard of group {target}"))?;
        let (moved_keys, moved_bytes) = (t.stats.0 as u64, t.stats.1 as u64);
        Ok(ShardCommand::SplitDone { op_id, left, moved, moved_keys, moved_bytes })
    }

    /// What an ingest stored, and the target's watermark after it.
    fn ingested(&self, name: &str, stored: &[(String, ValueRecord)]) -> Res<String> {
        let list: Vec<String> = stored.iter().map(|(k, r)| show_record(k, r)).collect();
        let mut out = match list.is_empty() {
            true => ", stored nothing".to_string(),
            false => format!(", stored {}", list.join(", ")),
        };
        if let Some(inc) = &self.shard(name)?.state.incoming {
            write!(out, "; watermark #{}", inc.watermark)?;
        }
        Ok(out)
    }

    /// The forwarder's backfill: the capture's range as the source holds it,
    /// ingested by the target, then `BackfillDone` with the source's digests.
    fn backfill(&mut self, op: OpId, from: &str, to: &str) -> Res<String> {
        let src = self.shard(from)?;
        let cap = src.state.captures.iter().find(|c| c.op_id == op).ok_or("the source has no such capture")?.clone();
        let records = self.stored(src.group, &cap.start, cap.end.as_deref())?;
        let digest = records.iter().fold(0u64, |d, (k, r)| d.wrapping_add(digest::record_hash(k, r)));
        let snapshot_index = src.applied;
        let watch: Vec<String> = records.iter().map(|(k, _)| k.clone()).collect();
        let bytes = records.iter().map(|(k, r)| (k.len() + r.encode().len()) as u64).sum();
        let keys = records.len() as u64;
        let ingest = ShardCommand::Ingest {
            op_id: op,
            source_index: None,
            records: records.into_iter().map(|(k, r)| (k, r.encode())).collect(),
        };
        let (index, r, stored) = self.apply_step(to, &ingest, &watch)?;
        let mut out = format!("{to}: #{index} ingest op={op} backfill of {keys} records → {}", show_step(&r));
        if r.is_ok() {
            out += &self.ingested(to, &stored)?;
        }
        let capture_base = digest.wrapping_sub(cap.changes);
        let done = ShardCommand::BackfillDone { op_id: op, snapshot_index, digest, capture_base, keys, bytes };
        let (index, r, _) = self.apply_step(to, &done, &[])?;
        writeln!(out, "\n{to}: #{index} backfill_done op={op} snapshot=#{snapshot_index} → {}", show_step(&r))?;
        Ok(out)
    }

    /// The forwarder's catch-up: forward-log entries of `op` after the
    /// target's watermark (or `after`), up to `upto`, as one ingest.
    fn forward(&mut self, op: OpId, from: &str, to: &str, after: Option<u64>, upto: Option<u64>) -> Res<String> {
        let watermark = self.shard(to)?.state.incoming.as_ref().map_or(0, |i| i.watermark);
        let after = after.unwrap_or(watermark);
        let entries = self.forward_log(self.shard(from)?.group, op, after, upto.unwrap_or(u64::MAX))?;
        let Some((last, _)) = entries.last() else { return Ok(format!("{from}: nothing to ship after #{after}\n")) };
        let first = entries[0].0;
        let seq = *last;
        let records =
            entries.into_iter().flat_map(|(_, e)| e.records.into_iter().map(|r| (r.key, r.record))).collect::<Vec<_>>();
        let watch: Vec<String> = records.iter().map(|(k, _)| k.clone()).collect();
        let n = records.len();
        let ingest = ShardCommand::Ingest { op_id: op, source_index: Some(seq), records };
        let (index, r, stored) = self.apply_step(to, &ingest, &watch)?;
        let entries = if n == 1 { "1 entry".to_string() } else { format!("{n} entries") };
        let mut out = format!("{from}: ship #{first}..#{seq} ({entries})\n");
        write!(out, "{to}: #{index} ingest op={op} seq={seq} → {}", show_step(&r))?;
        if r.is_ok() {
            out += &self.ingested(to, &stored)?;
        }
        Ok(out + "\n")
    }

    /// The driver's check before it commits: the target has every
    /// forwarded entry and its digest equals that of what the source holds.
    fn verify(&self, op: OpId, from: &str, to: &str) -> Res<String> {
        let src = self.shard(from)?;
        let cap = src.state.captures.iter().find(|c| c.op_id == op).ok_or("the source has no such capture")?;
        let inc = self.shard(to)?.state.incoming.as_ref().filter(|i| i.op_id == op).ok_or("target not receiving")?;
        let last = self.forward_log(src.group, op, 0, u64::MAX)?.last().map_or(0, |(s, _)| *s);
        if inc.backfill.is_none() {
            return Ok("not ready: no backfill yet\n".into());
        }
        if inc.watermark < last {
            return Ok(format!("not ready: target at #{}, forward log at #{last}\n", inc.watermark));
        }
        let source = inc.capture_base.wrapping_add(cap.changes);
        Ok(match source == inc.digest {
            true => "digests match: the target holds what the source holds\n".into(),
            false => "digests differ: the split must abort\n".into(),
        })
    }

    fn dump(&self, name: &str) -> Res<String> {
        let s = self.shard(name)?;
        let mut out = String::new();
        for (k, r) in self.stored(s.group, "", None)? {
            writeln!(out, "{}", show_record(&k, &r))?;
        }
        for (op, seq, e) in self.forward_logs(s.group)? {
            for f in &e.records {
                let r = ValueRecord::decode(&f.record).ok_or("undecodable forwarded record")?;
                writeln!(out, "forward op={op} #{seq}: {}", show_record(&f.key, &r))?;
            }
        }
        if out.is_empty() {
            out = "(nothing stored)\n".into();
        }
        Ok(out)
    }

    fn show_state(&self, name: &str) -> Res<String> {
        let st = &self.shard(name)?.state;
        let list = |v: Vec<String>| if v.is_empty() { "none".to_string() } else { v.join(", ") };
        let mut out = String::new();
        writeln!(out, "ranges: {}", list(st.ranges.iter().map(show_range).collect()))?;
        writeln!(out, "moved: {}", list(st.moved.iter().map(show_range).collect()))?;
        let captures = st.captures.iter().map(|c| {
            let frozen = c.frozen_at.map_or("open".to_string(), |i| format!("frozen at #{i}"));
            format!("op={} [{:?}, {}) → shard {}, {frozen}", c.op_id, c.start, show_end(c.end.as_deref()), c.target)
        });
        writeln!(out, "captures: {}", list(captures.collect()))?;
        let incoming = st.incoming.iter().map(|i: &Incoming| {
            let backfill = i.backfill.map_or("no backfill yet".to_string(), |(s, _)| format!("backfilled from #{s}"));
            let range = format!("[{:?}, {})", i.start, show_end(i.end.as_deref()));
            let (keys, bytes) = i.live;
            format!("op={} {range}, watermark #{}, {backfill}, live {keys} keys {bytes} bytes", i.op_id, i.watermark)
        });
        writeln!(out, "incoming: {}", list(incoming.collect()))?;
        if let Some(r) = &st.received {
            writeln!(out, "received: op={}, {} keys {} bytes", r.op_id, r.keys, r.bytes)?;
        }
        let mut ended = list(st.ended_ops.iter().map(u64::to_string).collect());
        if st.ended_below > 0 {
            write!(ended, " (and all up to {})", st.ended_below)?;
        }
        writeln!(out, "ended ops: {ended}")?;
        Ok(out)
    }

    fn new_shard(&mut self, cmd: &Command) -> Res<String> {
        let mut args = cmd.consume_args();
        let name = args.next_pos().ok_or("shard name missing")?.value.clone();
        let group = args.lookup_parse::<u64>("id")?.ok_or("id= missing")?;
        let start = args.lookup("start").map(|a| a.value.clone()).unwrap_or_default();
        let end = end_of(args.lookup("end").map(|a| a.value.as_str()));
        let state = match args.lookup_parse::<u64>("incoming")? {
            Some(op_id) => ShardState { incoming: Some(Incoming::new(op_id, start, end)), ..Default::default() },
            None => {
                let range_id = args.lookup_parse::<u64>("range")?.unwrap_or(1);
                let epoch = args.lookup_parse::<u64>("epoch")?.unwrap_or(1);
                let r = RangeDescriptor { range_id, start, end, shard_id: group, epoch, state: Default::default() };
                ShardState { ranges: vec![r], ..Default::default() }
            }
        };
        args.reject_rest()?;
        if self.shards.values().any(|s| s.group == group) {
            return Err(format!("group {group} exists").into());
        }
        let shard = Shard { group, state, applied: 0, stats: (0, 0), batch: None, capture_base: HashMap::new() };
        self.shards.insert(name.clone(), shard);
        self.first.get_or_insert(name);
        Ok(String::new())
    }

    fn own(&mut self, name: &str, cmd: &Command) -> Res<String> {
        let mut args = cmd.consume_args();
        let range_id = args.lookup_parse::<u64>("range")?.ok_or("range= missing")?;
        let epoch = args.lookup_parse::<u64>("epoch")?.ok_or("epoch= missing")?;
        let start = args.lookup("start").map(|a| a.value.clone()).unwrap_or_default();
        let end = end_of(args.lookup("end").map(|a| a.value.as_str()));
        args.reject_rest()?;
        let s = self.shard_mut(name)?;
        let r = RangeDescriptor { range_id, start, end, shard_id: s.group, epoch, state: Default::default() };
        s.state.ranges.push(r);
        s.state.ranges.sort_by(|a, b| a.start.cmp(&b.start));
        Ok(String::new())
    }

    fn get(&self, name: &str, cmd: &Command) -> Res<String> {
        let mut args = cmd.consume_args();
        let key = args.next_pos().ok_or("key missing")?.value.clone();
        args.reject_rest()?;
        Ok(match kv::read(&self.db, self.shard(name)?.group, &key)? {
            Some(r) => format!("{}\n", show_record(&key, &r)),
            None => format!("{key} absent\n"),
        })
    }

    fn scan(&self, name: &str, cmd: &Command) -> Res<String> {
        let mut args = cmd.consume_args();
        let from = args.lookup("from").map(|a| a.value.clone()).unwrap_or_default();
        let to = end_of(args.lookup("to").map(|a| a.value.as_str()));
        let limit = args.lookup_parse::<usize>("limit")?.unwrap_or(usize::MAX);
        args.reject_rest()?;
        let snap = self.db.snapshot();
        let items = kv::scan_at(&self.db, &snap, self.shard(name)?.group, &from, to.as_deref(), limit)?;
        let mut out: String = items.iter().map(|i| show_record(&i.key, &i.record) + "\n").collect();
        if out.is_empty() {
            out = "(no live keys)\n".into();
        }
        Ok(out)
    }

    /// Checks the invariants of the module doc on every shard without an open batch.
    fn check_invariants(&self) -> Res<()> {
        for (name, s) in &self.shards {
            if s.batch.is_some() {
                continue;
            }
            let records = self.stored(s.group, "", None)?;
            let live: Vec<_> = records.iter().filter(|(_, r)| !r.tombstone).collect();
            let bytes = live.iter().map(|(k, r)| (k.len() + r.json.len()) as i64).sum::<i64>();
            if s.stats != (live.len() as i64, bytes) {
                return Err(
                    format!("{name}: stats {:?} but {} live keys, {bytes} bytes stored", s.stats, live.len()).into()
                );
            }
            if let Some(inc) = &s.state.incoming {
                if inc.digest != self.digest(s.group, &inc.start, inc.end.as_deref())? {
                    return Err(format!("{name}: incoming digest differs from what is stored").into());
                }
                // A target holds nothing but what it received.
                if (inc.live.0 as i64, inc.live.1 as i64) != s.stats {
                    return Err(format!("{name}: received {:?} but stats {:?}", inc.live, s.stats).into());
                }
            }
            for c in &s.state.captures {
                let base = s.capture_base.get(&c.op_id).ok_or("a capture the runner did not see begin")?;
                if base.wrapping_add(c.changes) != self.digest(s.group, &c.start, c.end.as_deref())? {
                    return Err(format!("{name}: capture {} changes do not account for the range", c.op_id).into());
                }
            }
        }
        Ok(())
    }
}

impl Shard {
    fn write(&mut self, db: &Db, b: ApplyBatch) -> Res<()> {
        db.write(b.write)?;
        self.stats.0 += b.stats.keys;
        self.stats.1 += b.stats.bytes;
        Ok(())
    }
}

impl goldenscript::Runner for Runner {
    fn run(&mut self, cmd: &Command) -> Result<String, Box<dyn Error>> {
        if cmd.name == "shard" {
            return self.new_shard(cmd);
        }
        let name = self.name_of(cmd)?;
        match cmd.name.as_str() {
            "own" => self.own(&name, cmd),
            "put" | "cas" | "delete" => self.run_kv(&name, cmd),
            "get" => self.get(&name, cmd),
            "scan" => self.scan(&name, cmd),
            "dump" => self.dump(&name),
            "state" => self.show_state(&name),
            "stats" => {
                let (keys, bytes) = self.shard(&name)?.stats;
                Ok(format!("live keys: {keys}, bytes: {bytes}\n"))
            }
            "begin_batch" => {
                let s = self.shard_mut(&name)?;
                if s.batch.replace(ApplyBatch::default()).is_some() {
                    return Err("a batch is already open".into());
                }
                Ok(String::new())
            }
            "commit" => {
                let db = self.db.clone();
                let s = self.shard_mut(&name)?;
                let b = s.batch.take().ok_or("no open batch")?;
                s.write(&db, b)?;
                Ok(String::new())
            }
            "begin_capture" | "freeze" | "end_capture" | "split_done" | "activate" | "ingest" => {
                self.run_step(&name, cmd)
            }
            "backfill" | "forward" | "verify" => {
                let mut args = cmd.consume_args();
                let op = Self::op_arg(&mut args)?;
                let from = args.lookup("from").ok_or("from= missing")?.value.clone();
                let to = args.lookup("to").ok_or("to= missing")?.value.clone();
                let after = args.lookup_parse::<u64>("after")?;
                let upto = args.lookup_parse::<u64>("upto")?;
                args.reject_rest()?;
                match cmd.name.as_str() {
                    "backfill" => self.backfill(op, &from, &to),
                    "forward" => self.forward(op, &from, &to, after, upto),
                    _ => self.verify(op, &from, &to),
                }
            }
            other => Err(format!("unknown command {other}").into()),
        }
    }

    fn end_command(&mut self, _cmd: &Command) -> Result<String, Box<dyn Error>> {
        self.check_invariants().map(|()| String::new()).map_err(|e| format!("invariant broken: {e}").into())
    }
}

fn run(script: &str) {
    let path = format!("{}/src/testscripts/{script}", env!("CARGO_MANIFEST_DIR"));
    goldenscript::run(&mut Runner::new(), path).expect("goldenscript");
}

/// One test per script file: `scripts!(area: name, ...)` runs
/// `src/testscripts/area/name`.
macro_rules! scripts {
    ($area:ident: $($name:ident),* $(,)?) => {
        mod $area {
            pub const NAMES: &[&str] = &[$(stringify!($name)),*];
            $(
                #[test]
                fn $name() {
                    super::run(concat!(stringify!($area), "/", stringify!($name)));
                }
            )*
        }
    };
}

scripts!(kv_apply:
    a_delete_leaves_a_tombstone_with_the_next_version,
    a_put_creates_a_key_and_every_write_bumps_its_version,
    a_stale_route_is_refused_and_changes_nothing,
    cas_applies_only_at_the_expected_version,
    scans_return_live_keys_in_order_within_bounds,
    writes_in_one_apply_batch_see_each_other,
);

scripts!(split_steps:
    a_backfilled_old_value_never_overwrites_a_newer_write,
    a_batch_older_than_the_watermark_is_ignored,
    a_begin_capture_after_its_operation_ended_is_refused,
    a_capture_begins_once_and_only_on_a_range_the_shard_owns,
    a_frozen_range_refuses_writes_and_keeps_its_data,
    a_gap_in_the_forwarded_log_fails_verification,
    a_redelivered_batch_is_applied_once,
    a_split_moves_every_record_and_tombstone,
    a_step_applies_to_the_next_entry_of_the_same_batch,
    after_split_done_the_moved_range_is_refused_as_a_stale_route,
    backfill_and_forwarding_bring_the_target_level_with_the_source,
    end_capture_drops_the_forward_log_and_unfreezes,
    the_target_serves_nothing_until_activated,
    writes_to_a_captured_range_are_logged_for_the_target,
);

#[test]
fn every_script_file_has_a_test() {
    for (area, names) in [("kv_apply", kv_apply::NAMES), ("split_steps", split_steps::NAMES)] {
        let dir = format!("{}/src/testscripts/{area}", env!("CARGO_MANIFEST_DIR"));
        let mut files: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        files.sort();
        let mut listed: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        listed.sort();
        assert_eq!(files, listed, "the scripts of {area} and the tests that run them");
    }
}
