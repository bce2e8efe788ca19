//! Fault points for tests: `--fault-hold capturing=2000,frozen=500` keeps
//! every operation in the named phases for at least that many milliseconds
//! (from when it entered the phase, as recorded in the directory, so the
//! hold survives a change of metadata leader). Tests use it to kill nodes
//! at a chosen phase; `merge.frozen=500` (`KIND.PHASE`, kind `split`,
//! `merge` or `move`) holds only that kind's operations. Besides phase names, `enter_joint=MS` holds a move
//! in `Joint` *before* its joint configuration is entered (a hold of
//! `joint` holds it inside the joint configuration). `txn_locked=MS` holds
//! a multi-shard transaction this node coordinates once every lock is
//! taken, before its commit; `txn_committed=MS` right after the commit
//! point, before the answer and the other shards' commits (see
//! [`hold_txn`]).
//!
//! `--fault-corrupt-backfill` damages every split backfill chunk the node
//! sends ([`CORRUPT_BACKFILL`]): the receivers must refuse the file.

use cleave_metadata::Phase;

/// Damage the split backfill chunks this node sends (tests).
pub static CORRUPT_BACKFILL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

static HOLDS: std::sync::OnceLock<Vec<(String, u64)>> = std::sync::OnceLock::new();

/// Hold points that are not phases.
const EXTRA_HOLDS: [&str; 3] = ["enter_joint", "txn_locked", "txn_committed"];

/// Parses a fault-point spec (`PHASE=MS,...`).
pub fn parse(spec: &str) -> anyhow::Result<Vec<(String, u64)>> {
    let mut holds = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, ms) = part.split_once('=').ok_or_else(|| anyhow::anyhow!("{part:?} is not PHASE=MS"))?;
        let name = name.trim();
        let phase = match name.split_once('.') {
            Some((kind, phase)) if ["split", "merge", "move"].contains(&kind) => phase,
            Some((kind, _)) => anyhow::bail!("unknown operation kind {kind:?}"),
            None => name,
        };
        if !EXTRA_HOLDS.contains(&name) {
            serde_json::from_value::<Phase>(serde_json::Value::String(phase.into()))
                .map_err(|_| anyhow::anyhow!("unknown phase {phase:?}"))?;
        }
        holds.push((name.to_string(), ms.trim().parse()?));
    }
    Ok(holds)
}

/// Parses and installs the fault-point spec; call once at start-up.
pub fn set_fault_hold(spec: &str) -> anyhow::Result<()> {
    let _ = HOLDS.set(parse(spec)?);
    Ok(())
}

/// The hold of a named point (a phase's name, or one of [`EXTRA_HOLDS`]).
pub fn hold_named_ms(name: &str) -> u64 {
    HOLDS.get().and_then(|h| h.iter().find(|(p, _)| p == name)).map_or(0, |(_, ms)| *ms)
}

/// Holds a transaction at point `name` (`txn_locked`, `txn_committed`)
/// for its configured time, counting it in `cleave_txn_fault_held_total`
/// first so that a test knows when to strike.
pub async fn hold_txn(name: &'static str) {
    let ms = hold_named_ms(name);
    if ms > 0 {
        metrics::counter!("cleave_txn_fault_held_total", "point" => name).increment(1);
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

/// The hold of a phase for an operation of kind `kind` ("split", "merge"
/// or "move"): its own (`KIND.PHASE`) or every operation's (`PHASE`).
pub fn hold_ms(kind: &str, phase: Phase) -> u64 {
    match serde_json::to_value(phase) {
        Ok(serde_json::Value::String(name)) => hold_named_ms(&name).max(hold_named_ms(&format!("{kind}.{name}"))),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_holds_name_phases_or_known_points() {
        assert_eq!(parse("capturing=2000, frozen=5").unwrap(), vec![("capturing".into(), 2000), ("frozen".into(), 5)]);
        assert_eq!(parse("enter_joint=10").unwrap(), vec![("enter_joint".into(), 10)]);
        assert!(parse("nonsense=1").is_err(), "an unknown phase is refused");
        assert_eq!(parse("merge.frozen=7").unwrap(), vec![("merge.frozen".into(), 7)]);
        assert!(parse("merge.nonsense=1").is_err());
        assert!(parse("nonsense.frozen=1").is_err(), "an unknown kind is refused");
        assert!(parse("frozen").is_err(), "a hold needs a duration");
        assert!(parse("frozen=abc").is_err());
        assert!(parse("").unwrap().is_empty());
    }
}
