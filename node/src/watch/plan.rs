//! The pure part of a watch: which shards to read for a key range, and
//! what may be emitted, in which order, given their answers.
//!
//! A watch over `[start, end)` is cut into **pieces**, one per range of the
//! directory it overlaps. Each piece reads its shard's changes from the
//! watch's position on ([`super::serve`]); an answer is complete up to its
//! `through`, so the watch can emit, in `(timestamp, origin, key)` order, every
//! change at or below the smallest `through` of all pieces — never a change
//! another piece might still bring before it — and then say so in a
//! progress line.
//!
//! What a shard's view says about a piece:
//! - **Born later** (a split's target, [`crate::kv::Born`]): the piece's
//!   changes up to the target's birth are in the shard it was split from. A
//!   *stage* reading that shard up to the birth is put in front; it can
//!   itself be born of another, and so on.
//! - **Frozen** (a split is cutting the range over): nothing more changes
//!   there, and what comes after the freeze is the target's: the piece
//!   holds at the freeze until the split ends.
//! - **Absorbed later** (a merge's left shard, [`crate::kv::Absorbed`]):
//!   the range's changes up to the merge source's freeze are in the source
//!   (kept a little while after the merge for this). A piece within the
//!   absorbed range gets a stage reading the source up to the freeze; one
//!   that spans more than it is first cut at its bounds (the watch plans
//!   again with the cut).
//! - **Not owned** (the split committed, or the route was stale): the
//!   watch plans its pieces again from the directory, from its position.
//!   What the pieces had read past it is read again (emitting only what is
//!   past the position keeps that exact).

use std::sync::Arc;

use cleave_metadata::ShardId;

use super::changes::Change;
use super::cursor::Position;
use super::serve::{ChangesReply, ChangesRequest};
use crate::clock::Ts;
use crate::kv::{span_within as within, spans_overlap as overlaps};

/// Where one piece's changes come from: `shard`, up to `until` (a range's
/// changes before a split target's birth), or for good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub shard: ShardId,
    pub until: Option<Ts>,
}

/// A part of the watched range within one directory range.
#[derive(Clone, Debug)]
pub struct Piece {
    pub start: String,
    pub end: Option<String>,
    /// The first is read now; each bounded one hands over to the next.
    pub stages: Vec<Stage>,
    /// The next read starts after here.
    pub after: Position,
    /// Every change of the piece up to here has been read (below `after`
    /// while the shard has not reached a watch's starting point yet).
    pub through: Position,
    /// Read, not yet emitted (after the watch's position).
    pub buffer: Vec<Arc<Change>>,
    /// Bytes of `buffer` ([`Change::size`]).
    pub buffered: usize,
}

/// What an answer came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Ok,
    /// The changes after the position were trimmed: the watch cannot go on.
    Compacted,
    /// The directory moved under the piece: plan again.
    Replan,
}

/// A watch's merge of its pieces.
#[derive(Debug)]
pub struct Merge {
    pub start: String,
    pub end: Option<String>,
    /// Everything up to here has been emitted.
    pub pos: Position,
    /// Every piece has reached `pos` once: the watch is established. A
    /// watch from a cursor is at once (all up to the cursor was sent
    /// before); one from now, once every shard has caught up with the
    /// moment it began.
    pub established: bool,
    pub pieces: Vec<Piece>,
    /// Where pieces are cut besides the directory's range bounds: the
    /// bounds of ranges merged in, whose pieces read another lineage.
    pub cuts: std::collections::BTreeSet<String>,
}

/// Changes read per request.
pub const LIMIT: usize = 1_000;

impl Merge {
    /// A watch of `[start, end)` from `pos`, over the directory's `ranges`
    /// (`(start, end, shard)`, in key order); `established` when `pos` is a
    /// cursor the watch was given.
    pub fn new(
        start: String,
        end: Option<String>,
        pos: Position,
        established: bool,
        ranges: &[(String, Option<String>, ShardId)],
    ) -> Merge {
        let mut m = Merge { start, end, pos, established, pieces: Vec::new(), cuts: Default::default() };
        m.replan(ranges);
        m
    }

    /// Cuts the watched range into pieces anew, each from the position.
    pub fn replan(&mut self, ranges: &[(String, Option<String>, ShardId)]) {
        self.pieces.clear();
        for (rs, re, shard) in ranges {
            if !overlaps(rs, re.as_deref(), &self.start, self.end.as_deref()) {
                continue;
            }
            let start = rs.clone().max(self.start.clone());
            let end = match (re, &self.end) {
                (None, e) | (e, None) => e.clone(),
                (Some(a), Some(b)) => Some(a.clone().min(b.clone())),
            };
            // Cut at the bounds of ranges merged in that lie inside.
            let inside: Vec<String> = self
                .cuts
                .iter()
                .filter(|c| c.as_str() > start.as_str() && end.as_ref().is_none_or(|e| c.as_str() < e.as_str()))
                .cloned()
                .collect();
            let mut from = start;
            for to in inside.into_iter().map(Some).chain([end]) {
                self.pieces.push(Piece {
                    start: from,
                    end: to.clone(),
                    stages: vec![Stage { shard: *shard, until: None }],
                    after: self.pos.clone(),
                    // Whatever the shard, every key is complete up to an
                    // established position.
                    through: if self.established { self.pos.clone() } else { Position::after_all(0) },
                    buffer: Vec::new(),
                    buffered: 0,
                });
                let Some(next) = to else { break };
                from = next;
            }
        }
    }

    /// Whether the pieces cover the watched range without a gap (a
    /// directory that does not yet hold every range is planned again).
    pub fn covers(&self) -> bool {
        let mut at = self.start.clone();
        for p in &self.pieces {
            if p.start != at {
                return false;
            }
            match &p.end {
                None => return true,
                Some(e) => at = e.clone(),
            }
        }
        self.end.as_ref().is_some_and(|e| *e <= at)
    }

    /// The request piece `i` makes next, and of which shard.
    pub fn request(&self, i: usize, wait_ms: u64) -> (ShardId, ChangesRequest) {
        let p = &self.pieces[i];
        let stage = &p.stages[0];
        let req = ChangesRequest {
            after: Some(p.after.clone()),
            until: stage.until,
            start: p.start.clone(),
            end: p.end.clone(),
            limit: LIMIT,
            wait_ms,
            prev: false,
            past_freezes: false,
        };
        (stage.shard, req)
    }

    /// Takes piece `i`'s answer (to the request [`Merge::request`] made).
    pub fn apply(&mut self, i: usize, reply: ChangesReply) -> Applied {
        if reply.compacted {
            return Applied::Compacted;
        }
        let p = &mut self.pieces[i];
        if reply.after != p.after {
            return Applied::Ok; // an answer to an older request: ignored
        }
        let v = &reply.view;
        let stage = p.stages[0].clone();
        // Born after the piece's position: its earlier changes are elsewhere.
        if let Some(b) = v.born.as_ref().filter(|b| within(&p.start, p.end.as_deref(), &b.start, b.end.as_deref())) {
            if p.after.ts < b.ts && stage.until.is_none_or(|u| u > b.ts) {
                p.stages.insert(0, Stage { shard: b.from, until: Some(b.ts) });
                return Applied::Ok;
            }
        }
        // Merged in after the piece's position: the changes before the
        // merge are in the merge's source (up to its freeze).
        let behind = |since: Ts| p.after < Position::after_all(since) && stage.until.is_none_or(|u| u > since);
        let absorbed =
            v.absorbed.iter().find(|a| overlaps(&p.start, p.end.as_deref(), &a.0, a.1.as_deref()) && behind(a.2));
        if let Some((s, e, since, from)) = absorbed {
            if within(&p.start, p.end.as_deref(), s, e.as_deref()) {
                p.stages.insert(0, Stage { shard: *from, until: Some(*since) });
                return Applied::Ok;
            }
            let (s, e) = (s.clone(), e.clone());
            self.cuts.insert(s);
            self.cuts.extend(e);
            return Applied::Replan;
        }
        let owned = v.ranges.iter().any(|(s, e)| within(&p.start, p.end.as_deref(), s, e.as_deref()));
        if stage.until.is_none() && !owned {
            // Split off (or a stale route): the directory says who has it
            // now, and a target's lineage leads back here for what came
            // before it (read again, from the position).
            return Applied::Replan;
        }
        let mut through = reply.through;
        if let Some(f) = v.freeze_over(&p.start, p.end.as_deref()).filter(|_| stage.until.is_none()) {
            through = through.min(Position::after_all(f));
        }
        self.take(i, reply.changes, through);
        let p = &mut self.pieces[i];
        if let Some(u) = stage.until {
            if p.through >= Position::after_all(u) {
                p.stages.remove(0);
                (p.after, p.through) = (Position::after_all(u), Position::after_all(u));
                if p.stages.is_empty() {
                    return Applied::Replan;
                }
            }
        }
        Applied::Ok
    }

    fn take(&mut self, i: usize, changes: Vec<Arc<Change>>, through: Position) {
        let p = &mut self.pieces[i];
        for c in changes {
            let inside = crate::kv::within(&c.key, &p.start, p.end.as_deref());
            if inside && !through.precedes(&c) && self.pos.precedes(&c) {
                p.buffered += c.size();
                p.buffer.push(c);
            }
        }
        if through > p.through {
            p.through = through.clone();
        }
        if through > p.after {
            p.after = through;
        }
    }

    /// Up to where every piece has been read: what may be emitted.
    pub fn complete(&self) -> Position {
        self.pieces.iter().map(|p| p.through.clone()).min().unwrap_or_else(|| self.pos.clone())
    }

    /// The changes that may be emitted now, in order; the position moves
    /// past them (to [`Merge::complete`]).
    pub fn ready(&mut self) -> Vec<Arc<Change>> {
        let upto = self.complete();
        if upto >= self.pos {
            self.established = true;
        }
        if upto <= self.pos {
            return Vec::new();
        }
        let mut out = Vec::new();
        for p in &mut self.pieces {
            let (now, later): (Vec<_>, Vec<_>) = p.buffer.drain(..).partition(|c| !upto.precedes(c));
            p.buffered -= now.iter().map(|c| c.size()).sum::<usize>().min(p.buffered);
            out.extend(now);
            p.buffer = later;
        }
        out.sort_by(|a, b| a.order().cmp(&b.order()));
        self.pos = upto;
        out
    }

    /// Changes read and held back (a piece behind the others).
    pub fn held(&self) -> usize {
        self.pieces.iter().map(|p| p.buffer.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::Born;
    use crate::watch::serve::ShardView;

    fn change(ts: Ts, key: &str) -> Arc<Change> {
        from(ts, 1, key)
    }

    fn from(ts: Ts, origin: u128, key: &str) -> Arc<Change> {
        let value = Some(b"1".to_vec());
        Arc::new(Change { ts, origin, key: key.into(), version: ts, value, prev: None, lines: Default::default() })
    }

    fn view(ranges: &[(&str, Option<&str>)], resolved: Ts) -> ShardView {
        ShardView {
            resolved,
            ranges: ranges.iter().map(|(s, e)| (s.to_string(), e.map(str::to_string))).collect(),
            ..ShardView::default()
        }
    }

    fn reply(m: &Merge, i: usize, changes: Vec<Arc<Change>>, through: Position, view: ShardView) -> ChangesReply {
        ChangesReply { changes, through, after: m.pieces[i].after.clone(), compacted: false, view }
    }

    fn keys(cs: &[Arc<Change>]) -> Vec<(Ts, &str)> {
        cs.iter().map(|c| (c.ts, c.key.as_str())).collect()
    }

    fn two_shards() -> Merge {
        let ranges = vec![("".to_string(), Some("m".to_string()), 1), ("m".to_string(), None, 2)];
        Merge::new("c".into(), Some("x".into()), Position::after_all(10), true, &ranges)
    }

    #[test]
    fn pieces_cut_the_watched_range_by_the_directory() {
        let m = two_shards();
        assert!(m.covers());
        let spans: Vec<_> = m.pieces.iter().map(|p| (p.start.as_str(), p.end.as_deref(), p.stages[0].shard)).collect();
        assert_eq!(spans, vec![("c", Some("m"), 1), ("m", Some("x"), 2)]);
        let gap = Merge::new("a".into(), None, Position::after_all(0), true, &[("b".into(), None, 1)]);
        assert!(!gap.covers(), "a directory without the range's start");
    }

    #[test]
    fn nothing_is_emitted_past_the_slowest_piece_and_then_in_timestamp_then_key_order() {
        let mut m = two_shards();
        let r =
            reply(&m, 0, vec![change(12, "d"), change(15, "c")], Position::after_all(20), view(&[("", Some("m"))], 20));
        assert_eq!(m.apply(0, r), Applied::Ok);
        assert!(m.ready().is_empty(), "piece 2 has said nothing yet");
        let r = reply(&m, 1, vec![change(12, "n"), change(30, "p")], Position::after_all(30), view(&[("m", None)], 30));
        assert_eq!(m.apply(1, r), Applied::Ok);
        assert_eq!(keys(&m.ready()), vec![(12, "d"), (12, "n"), (15, "c")]);
        assert_eq!(m.pos, Position::after_all(20));
        assert_eq!(m.held(), 1, "the change at 30 waits for piece 1");
    }

    /// Two transactions committed at one timestamp (two nodes' clocks
    /// gave the same), each on both shards: each one's writes come out
    /// together, not interleaved by key.
    #[test]
    fn transactions_at_one_timestamp_on_two_shards_come_out_one_after_the_other() {
        let mut m = two_shards();
        let (t1, t2) = (crate::watch::cursor::txn_origin(5), crate::watch::cursor::txn_origin(9));
        let left = vec![from(12, t1, "d"), from(12, t2, "e")];
        let r = reply(&m, 0, left, Position::after_all(20), view(&[("", Some("m"))], 20));
        m.apply(0, r);
        let right = vec![from(12, 2, "m"), from(12, t1, "p"), from(12, t2, "n")];
        let r = reply(&m, 1, right, Position::after_all(20), view(&[("m", None)], 20));
        m.apply(1, r);
        let out: Vec<_> = m.ready().iter().map(|c| (c.origin, c.key.clone())).collect();
        let want = [(2, "m"), (t1, "d"), (t1, "p"), (t2, "e"), (t2, "n")];
        assert_eq!(out, want.map(|(o, k)| (o, k.to_string())));
    }

    #[test]
    fn a_piece_read_up_to_a_limit_completes_only_up_to_its_last_change() {
        let mut m = two_shards();
        let through = Position::after(&change(14, "e"));
        let r = reply(&m, 0, vec![change(12, "d"), change(14, "e")], through.clone(), view(&[("", Some("m"))], 20));
        m.apply(0, r);
        let r = reply(&m, 1, vec![change(14, "f"), change(14, "n")], Position::after_all(30), view(&[("m", None)], 30));
        m.apply(1, r);
        assert_eq!(keys(&m.ready()), vec![(12, "d"), (14, "e")]);
        assert_eq!(m.pos, through, "(14, n) is after (14, e): not yet");
        let (_, req) = m.request(0, 0);
        assert_eq!(req.after, Some(through));
    }

    /// A watch of `["a", ∞)` behind a merge of `["m", ∞)` (shard 2) into
    /// shard 1: the piece is cut at the absorbed range, whose part reads
    /// shard 2 up to its freeze (40) first, then shard 1.
    #[test]
    fn a_range_merged_in_reads_its_earlier_changes_from_the_merged_shard_first() {
        let mut m = Merge::new("a".into(), None, Position::after_all(10), true, &[("a".into(), None, 1)]);
        let left = ShardView { absorbed: vec![("m".into(), None, 40, 2)], ..view(&[("a", None)], 50) };
        let r = reply(&m, 0, vec![change(45, "b")], Position::after_all(50), left.clone());
        assert_eq!(m.apply(0, r), Applied::Replan, "the piece spans more than the absorbed range");
        m.replan(&[("a".into(), None, 1)]);
        let spans: Vec<_> = m.pieces.iter().map(|p| (p.start.as_str(), p.end.as_deref())).collect();
        assert_eq!(spans, vec![("a", Some("m")), ("m", None)]);
        // The left part is the left shard's all along.
        let r = reply(&m, 0, vec![change(45, "b")], Position::after_all(50), left.clone());
        assert_eq!(m.apply(0, r), Applied::Ok);
        // The absorbed part: the merged shard first, up to its freeze.
        let r = reply(&m, 1, vec![change(45, "n")], Position::after_all(50), left.clone());
        assert_eq!(m.apply(1, r), Applied::Ok);
        assert_eq!(m.request(1, 0).0, 2);
        assert_eq!(m.request(1, 0).1.until, Some(40));
        let source = ShardView { moved: vec![("a".into(), None)], ..view(&[], 60) };
        let r = reply(&m, 1, vec![change(30, "p")], Position::after_all(40), source);
        assert_eq!(m.apply(1, r), Applied::Ok);
        assert_eq!(m.request(1, 0).0, 1, "then the left shard, from the freeze");
        let r = reply(&m, 1, vec![change(45, "n")], Position::after_all(50), left);
        assert_eq!(m.apply(1, r), Applied::Ok);
        assert_eq!(keys(&m.ready()), vec![(30, "p"), (45, "b"), (45, "n")]);
        // A watch that read the merged shard up to its freeze goes on.
        let mut at_freeze = Merge::new("m".into(), None, Position::after_all(40), true, &[("a".into(), None, 1)]);
        let left = ShardView { absorbed: vec![("m".into(), None, 40, 2)], ..view(&[("a", None)], 50) };
        let r = reply(&at_freeze, 0, vec![change(45, "n")], Position::after_all(50), left);
        assert_eq!(at_freeze.apply(0, r), Applied::Ok);
        assert_eq!(keys(&at_freeze.ready()), vec![(45, "n")]);
    }

    #[test]
    fn a_split_target_reads_its_earlier_changes_from_its_source_first() {
        let mut m = Merge::new("a".into(), None, Position::after_all(10), true, &[("a".into(), None, 2)]);
        let born = Born { from: 1, start: "a".into(), end: None, ts: 40 };
        let v = ShardView { born: Some(born), ..view(&[("a", None)], 50) };
        let r = reply(&m, 0, vec![change(45, "b")], Position::after_all(50), v);
        assert_eq!(m.apply(0, r), Applied::Ok);
        assert!(m.ready().is_empty(), "nothing of the target before its source's part");
        let (shard, req) = m.request(0, 0);
        assert_eq!((shard, req.until), (1, Some(40)));
        // The source has moved the range on: its part is complete to the birth.
        let source = ShardView { moved: vec![("a".into(), None)], ..view(&[], 60) };
        let r = reply(&m, 0, vec![change(20, "c")], Position::after_all(40), source);
        assert_eq!(m.apply(0, r), Applied::Ok);
        assert_eq!(keys(&m.ready()), vec![(20, "c")]);
        assert_eq!(
            m.request(0, 0),
            (
                2,
                ChangesRequest {
                    after: Some(Position::after_all(40)),
                    until: None,
                    start: "a".into(),
                    end: None,
                    limit: LIMIT,
                    wait_ms: 0,
                    prev: false,
                    past_freezes: false,
                }
            )
        );
        let v = ShardView {
            born: Some(Born { from: 1, start: "a".into(), end: None, ts: 40 }),
            ..view(&[("a", None)], 50)
        };
        let r = reply(&m, 0, vec![change(45, "b")], Position::after_all(50), v);
        assert_eq!(m.apply(0, r), Applied::Ok);
        assert_eq!(keys(&m.ready()), vec![(45, "b")]);
    }

    #[test]
    fn a_frozen_piece_holds_at_its_freeze_and_a_moved_one_is_planned_again() {
        let mut m = Merge::new("a".into(), None, Position::after_all(10), true, &[("a".into(), None, 1)]);
        let frozen = ShardView { frozen: vec![("m".into(), None, 25)], ..view(&[("a", None)], 40) };
        let r = reply(&m, 0, vec![change(20, "n"), change(30, "b")], Position::after_all(40), frozen);
        m.apply(0, r);
        assert_eq!(keys(&m.ready()), vec![(20, "n")], "not past the freeze: the target may follow it");
        assert_eq!(m.pos, Position::after_all(25));
        let done = ShardView { moved: vec![("m".into(), None)], ..view(&[("a", Some("m"))], 50) };
        let r = reply(&m, 0, vec![change(30, "b")], Position::after_all(50), done);
        assert_eq!(m.apply(0, r), Applied::Replan);
        m.replan(&[("a".into(), Some("m".into()), 1), ("m".into(), None, 2)]);
        assert!(m.covers());
        assert!(m.pieces.iter().all(|p| p.through == Position::after_all(25)), "planned again from the position");
    }

    /// A watch from now starts at the watcher's clock: a shard whose
    /// resolved timestamp is behind it may still make changes up to it
    /// (its leader's clock is behind), so nothing counts as established —
    /// no progress line — before every shard is past it, and nothing from
    /// before it is emitted.
    #[test]
    fn a_watch_from_now_is_established_once_every_shard_has_reached_its_start() {
        let ranges = vec![("".to_string(), Some("m".to_string()), 1), ("m".to_string(), None, 2)];
        let mut m = Merge::new("".into(), None, Position::after_all(100), false, &ranges);
        assert_eq!(m.complete(), Position::after_all(0));
        let r = reply(&m, 0, vec![], Position::after_all(120), view(&[("", Some("m"))], 120));
        m.apply(0, r);
        let behind = reply(&m, 1, vec![], Position::after_all(60), view(&[("m", None)], 60));
        m.apply(1, behind);
        assert!(m.ready().is_empty() && !m.established, "shard 2 is at 60, short of 100");
        assert_eq!(m.request(1, 0).1.after, Some(Position::after_all(100)), "still read from the start");
        let r =
            reply(&m, 1, vec![change(99, "n"), change(101, "o")], Position::after_all(130), view(&[("m", None)], 130));
        m.apply(1, r);
        assert_eq!(keys(&m.ready()), vec![(101, "o")], "only what came after the start");
        assert!(m.established);
    }

    #[test]
    fn a_compacted_answer_ends_the_watch_and_an_old_answer_is_ignored() {
        let mut m = two_shards();
        let mut r = reply(&m, 0, vec![], Position::after_all(10), view(&[("", Some("m"))], 20));
        r.compacted = true;
        assert_eq!(m.apply(0, r), Applied::Compacted);
        let mut stale = reply(&m, 0, vec![change(11, "d")], Position::after_all(20), view(&[("", Some("m"))], 20));
        stale.after = Position::after_all(3);
        assert_eq!(m.apply(0, stale), Applied::Ok);
        assert_eq!(m.held(), 0);
    }
}
