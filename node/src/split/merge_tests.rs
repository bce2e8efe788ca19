//! The merge's steps as the two shards apply them (`split::apply`): the
//! left shard absorbs the right range beside its own, serving none of it
//! until `Absorb`, or drops it on abort; the right shard, `Subsumed`, owns
//! nothing and sends stale routes to the merged range.

use crate::command::{KvError, ShardCommand, StepError};
use crate::kv::{self, Absorbed, ShardState};
use crate::storage::ValueRecord;
use crate::testing::{put, range, step, temp_db, GROUP};

fn begin(op_id: u64) -> ShardCommand {
    ShardCommand::BeginAbsorb { op_id, start: "m".into(), end: None, source: 9 }
}

fn ingest(op_id: u64, key: &str) -> ShardCommand {
    let record = ValueRecord::live(3, b"\"x\"".to_vec()).encode();
    ShardCommand::Ingest { op_id, source_index: None, records: vec![(key.to_string(), record)] }
}

/// The left shard: range 1 `["", "m")` at epoch 1.
fn left() -> ShardState {
    ShardState { ranges: vec![range(1, "", Some("m"), 1)], ..Default::default() }
}

#[test]
fn the_left_shard_absorbs_beside_its_own_range_and_serves_it_only_once_absorbed() {
    let (_d, db) = temp_db();
    let mut s = left();
    put(&db, &mut s, 1, "a", "1").unwrap();
    assert_eq!(step(&db, &mut s, 2, begin(5)), Ok(2));
    assert_eq!(step(&db, &mut s, 3, begin(5)), Ok(3), "a resent step changes nothing");
    let other = ShardCommand::BeginAbsorb { op_id: 6, start: "x".into(), end: None, source: 8 };
    assert_eq!(step(&db, &mut s, 4, other), Err(StepError::Overlaps { op_id: 6, running: 5 }));
    assert_eq!(step(&db, &mut s, 5, ingest(5, "n")), Ok(5));
    assert!(kv::read(&db, GROUP, "n").unwrap().is_some(), "stored under the left shard's keys");
    assert_eq!(s.check_route("n", 1, 1).unwrap_err(), KvError::RangeMoving, "not served before the cutover");
    assert!(put(&db, &mut s, 6, "b", "2").is_ok(), "the shard's own range is served throughout");
    let merged = range(1, "", None, 2);
    let absorb = ShardCommand::Absorb { op_id: 5, ranges: vec![merged.clone()], since: 40 };
    assert_eq!(step(&db, &mut s, 7, absorb.clone()), Ok(7));
    assert!(s.incoming.is_none());
    assert_eq!(s.ranges, vec![merged]);
    assert_eq!(s.absorbed, vec![Absorbed { start: "m".into(), end: None, since: 40, from: 9 }]);
    assert!(s.check_route("n", 1, 2).is_ok(), "the merged range serves the absorbed keys");
    assert!(s.check_route("a", 1, 1).is_err(), "the old epoch is a stale route");
    assert_eq!(step(&db, &mut s, 8, absorb), Ok(8), "a resent absorb changes nothing");
    assert_eq!(s.absorbed.len(), 1);
    let late = step(&db, &mut s, 9, begin(5));
    assert!(late.is_err(), "a late BeginAbsorb of the merge is refused: {late:?}");
    assert!(s.incoming.is_none());
}

#[test]
fn an_aborted_absorption_drops_what_was_received_and_fences_its_late_steps() {
    let (_d, db) = temp_db();
    let mut s = left();
    put(&db, &mut s, 1, "a", "1").unwrap();
    assert_eq!(step(&db, &mut s, 2, begin(5)), Ok(2));
    assert_eq!(step(&db, &mut s, 3, ingest(5, "n")), Ok(3));
    assert_eq!(s.incoming.as_ref().map(|i| i.live.0), Some(1));
    assert_eq!(step(&db, &mut s, 4, ShardCommand::DropAbsorbed { op_id: 5 }), Ok(4));
    assert!(s.incoming.is_none());
    assert_eq!(kv::read(&db, GROUP, "n").unwrap(), None, "what was received is gone");
    assert!(kv::read(&db, GROUP, "a").unwrap().is_some(), "the shard's own data stays");
    assert_eq!(step(&db, &mut s, 5, begin(5)), Err(StepError::Ended { op_id: 5 }), "a late begin is fenced");
    assert_eq!(step(&db, &mut s, 6, ingest(5, "n")), Ok(6), "a late ingest is dropped (the shard is active)");
    assert_eq!(kv::read(&db, GROUP, "n").unwrap(), None);
    // A later merge of the same ranges starts afresh.
    assert_eq!(step(&db, &mut s, 7, begin(7)), Ok(7));
}

#[test]
fn a_subsumed_source_owns_nothing_and_sends_stale_routes_to_the_merged_range() {
    let (_d, db) = temp_db();
    // Range 1 `["", ∞)` stands for the right range here (the helpers write
    // through range 1 at epoch 1).
    let mut s = ShardState { ranges: vec![range(1, "", None, 1)], ..Default::default() };
    put(&db, &mut s, 1, "n", "1").unwrap();
    let capture = ShardCommand::BeginCapture { op_id: 5, start: "".into(), end: None, target: 2 };
    assert_eq!(step(&db, &mut s, 2, capture), Ok(2));
    assert_eq!(step(&db, &mut s, 3, ShardCommand::Freeze { op_id: 5 }), Ok(3));
    let merged = range(4, "", None, 2);
    let subsumed = ShardCommand::Subsumed { op_id: 5, merged: merged.clone() };
    assert_eq!(step(&db, &mut s, 4, subsumed.clone()), Ok(4));
    assert!(s.ranges.is_empty() && s.captures.is_empty());
    assert_eq!(kv::read(&db, GROUP, "n").unwrap(), None, "the data went with the range");
    assert_eq!(s.check_route("n", 1, 1).unwrap_err(), KvError::WrongRange { ranges: vec![merged] });
    assert_eq!(step(&db, &mut s, 5, subsumed), Ok(5), "a resent step changes nothing");
    assert_eq!(s.moved.len(), 1);
}

/// A cutover built from a directory that had not applied the commit yet
/// names the left range as it was: both shards refuse it, rather than
/// unfreeze the right range (which would take writes the merge then drops)
/// or leave the absorbed keys unserved.
#[test]
fn a_cutover_naming_the_ranges_as_they_were_is_refused_by_both_shards() {
    let (_d, db) = temp_db();
    let mut l = left();
    assert_eq!(step(&db, &mut l, 1, begin(5)), Ok(1));
    let stale = range(1, "", Some("m"), 1);
    let absorb = ShardCommand::Absorb { op_id: 5, ranges: vec![stale.clone()], since: 40 };
    assert_eq!(step(&db, &mut l, 2, absorb), Err(StepError::NotOwned { start: "m".into(), end: None }));
    assert!(l.incoming.is_some(), "still absorbing");

    let mut r = ShardState { ranges: vec![range(2, "m", None, 1)], ..Default::default() };
    let capture = ShardCommand::BeginCapture { op_id: 5, start: "m".into(), end: None, target: 1 };
    assert_eq!(step(&db, &mut r, 1, capture), Ok(1));
    assert_eq!(step(&db, &mut r, 2, ShardCommand::Freeze { op_id: 5 }), Ok(2));
    let subsumed = ShardCommand::Subsumed { op_id: 5, merged: stale };
    assert_eq!(step(&db, &mut r, 3, subsumed), Err(StepError::NotOwned { start: "m".into(), end: None }));
    assert!(r.captures[0].frozen_at.is_some(), "still frozen");
    assert_eq!(r.ranges.len(), 1);
}
