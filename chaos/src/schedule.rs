//! The fault schedule: which fault happens when, generated from a seed.
//!
//! The whole schedule is computed before the run from `--seed` alone (a
//! ChaCha generator, so the same seed gives the same schedule on every
//! machine and Rust version), which makes a run replayable: same seed, same
//! faults at the same times. What the schedule cannot fix in advance is
//! *which node* is the leader when a fault strikes, so targets are described
//! by role ([`Target`]) plus a random `pick`, resolved against the cluster at
//! that moment; the runner logs the node it chose.
//!
//! Two streams are interleaved:
//! - *disruptive* faults (kill, pause, partition, split-cancel,
//!   meta-isolate), one at a time: fault, hold for a few seconds, heal
//!   everything (restart, resume, reconnect), quiet gap, next;
//! - *administrative* ones (split, replica move, leader transfer), at random
//!   intervals, regardless of whatever disruptive fault is in progress.
//!
//! Nothing happens in the warm-up at the start, nor in the cool-down at the
//! end (so the final heal finds a cluster that had time to settle).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// A kind of fault (`--nemesis kill,pause,…`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum NemesisKind {
    /// `kill -9` a node, restart it at the heal.
    Kill,
    /// SIGSTOP a node, SIGCONT at the heal.
    Pause,
    /// Cut the network: one node from the rest, or the cluster in two halves.
    Partition,
    /// `POST /admin/split` at a random key.
    Split,
    /// `POST /admin/move`: move a replica of a shard to another node.
    Move,
    /// `POST /admin/transfer-leader`: hand a shard's leadership to another replica.
    Transfer,
    /// Start a split, wait until it sits in a held phase (the nodes run with
    /// `--fault-hold`), cut the metadata leader off from the source shard's
    /// leader, then cancel the split (`POST /admin/operations/{id}/cancel`).
    SplitCancel,
    /// Cut the metadata leader off from the other metadata replicas only
    /// (it still reaches every other node and the clients), and kill and
    /// restart a node while it lasts.
    MetaIsolate,
    /// `POST /admin/merge`: merge a random range with its right neighbour.
    Merge,
}

impl NemesisKind {
    pub const ALL: [NemesisKind; 9] = [
        NemesisKind::Kill,
        NemesisKind::Pause,
        NemesisKind::Partition,
        NemesisKind::Split,
        NemesisKind::Move,
        NemesisKind::Transfer,
        NemesisKind::SplitCancel,
        NemesisKind::MetaIsolate,
        NemesisKind::Merge,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NemesisKind::Kill => "kill",
            NemesisKind::Pause => "pause",
            NemesisKind::Partition => "partition",
            NemesisKind::Split => "split",
            NemesisKind::Move => "move",
            NemesisKind::Transfer => "transfer",
            NemesisKind::SplitCancel => "split-cancel",
            NemesisKind::MetaIsolate => "meta-isolate",
            NemesisKind::Merge => "merge",
        }
    }

    /// Kill, pause and the partitions need control of the processes and the
    /// network; they are held and healed one at a time.
    pub fn is_disruptive(self) -> bool {
        matches!(
            self,
            NemesisKind::Kill
                | NemesisKind::Pause
                | NemesisKind::Partition
                | NemesisKind::SplitCancel
                | NemesisKind::MetaIsolate
        )
    }

    /// Whether it cuts network links (needs namespaces, hence root).
    pub fn needs_network(self) -> bool {
        matches!(self, NemesisKind::Partition | NemesisKind::SplitCancel | NemesisKind::MetaIsolate)
    }
}

impl fmt::Display for NemesisKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for NemesisKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        NemesisKind::ALL.into_iter().find(|k| k.name() == s.trim()).ok_or_else(|| {
            let known: Vec<&str> = NemesisKind::ALL.iter().map(|k| k.name()).collect();
            Error::Config(format!("unknown nemesis {s:?} (known: {})", known.join(", ")))
        })
    }
}

/// Which node a fault hits, resolved when it strikes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Target {
    /// The `pick % n`-th node.
    Any { pick: u64 },
    /// The leader of the `pick % n`-th data shard.
    ShardLeader { pick: u64 },
    /// The leader of the metadata group (shard 0).
    MetaLeader,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Any { pick } => write!(f, "node#{pick}"),
            Target::ShardLeader { pick } => write!(f, "leader of shard#{pick}"),
            Target::MetaLeader => write!(f, "metadata leader"),
        }
    }
}

/// One scheduled step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    Kill {
        target: Target,
    },
    Pause {
        target: Target,
    },
    /// Cut one node off from every other node, both directions.
    Isolate {
        target: Target,
    },
    /// Cut the cluster in two (a majority and a minority chosen by `pick`).
    Halves {
        pick: u64,
    },
    /// Undo every disruptive fault: restart killed nodes, resume paused
    /// ones, remove every partition.
    Heal,
    Split {
        key: String,
    },
    /// Move a replica: shard, source and destination chosen by `pick`.
    Move {
        pick: u64,
    },
    /// Transfer a shard's leadership: shard and new leader chosen by `pick`.
    Transfer {
        pick: u64,
    },
    /// Merge a range (chosen by `pick` among those with a right neighbour)
    /// with its right neighbour.
    Merge {
        pick: u64,
    },
    /// Split at `key`; once the split is `frozen` (else capturing), cut the
    /// metadata leader from the source shard's leader, wait `wait_ms`, and
    /// cancel the split. The cut lasts until the next heal.
    SplitCancel {
        key: String,
        frozen: bool,
        wait_ms: u64,
    },
    /// Cut the metadata leader off from the other metadata replicas, until
    /// the next heal.
    MetaIsolate,
    /// `kill -9` a node and start it again at once (its in-memory state is
    /// lost), in the middle of a [`Action::MetaIsolate`].
    Restart {
        target: Target,
    },
}

impl Action {
    /// The nemesis this step belongs to (`None` for a heal).
    pub fn kind(&self) -> Option<NemesisKind> {
        Some(match self {
            Action::Kill { .. } => NemesisKind::Kill,
            Action::Pause { .. } => NemesisKind::Pause,
            Action::Isolate { .. } | Action::Halves { .. } => NemesisKind::Partition,
            Action::Split { .. } => NemesisKind::Split,
            Action::Move { .. } => NemesisKind::Move,
            Action::Transfer { .. } => NemesisKind::Transfer,
            Action::Merge { .. } => NemesisKind::Merge,
            Action::SplitCancel { .. } => NemesisKind::SplitCancel,
            Action::MetaIsolate | Action::Restart { .. } => NemesisKind::MetaIsolate,
            Action::Heal => return None,
        })
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Kill { target } => write!(f, "kill -9 {target}"),
            Action::Pause { target } => write!(f, "pause {target}"),
            Action::Isolate { target } => write!(f, "isolate {target}"),
            Action::Halves { pick } => write!(f, "split the network in halves #{pick}"),
            Action::Heal => write!(f, "heal"),
            Action::Split { key } => write!(f, "split at {key:?}"),
            Action::Move { pick } => write!(f, "move replica #{pick}"),
            Action::Transfer { pick } => write!(f, "transfer leadership #{pick}"),
            Action::Merge { pick } => write!(f, "merge range #{pick} with its right neighbour"),
            Action::SplitCancel { key, frozen, wait_ms } => write!(
                f,
                "split at {key:?}, cut the metadata leader from the source leader once {}, cancel after {wait_ms} ms",
                if *frozen { "frozen" } else { "capturing" }
            ),
            Action::MetaIsolate => write!(f, "isolate the metadata leader from the other metadata replicas"),
            Action::Restart { target } => write!(f, "restart {target}"),
        }
    }
}

/// A step at a time since the start of the workload.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub at_ms: u64,
    #[serde(flatten)]
    pub action: Action,
}

/// Timing of a schedule.
#[derive(Clone, Debug)]
pub struct ScheduleOpts {
    /// Length of the faulty part of the run.
    pub duration: Duration,
    /// No fault before this.
    pub warmup: Duration,
    /// No fault starts after `duration - cooldown`, and every fault is healed by then.
    pub cooldown: Duration,
    /// How long a disruptive fault lasts, at least / at most.
    pub hold: (Duration, Duration),
    /// Quiet time between two disruptive faults, at least / at most.
    pub gap: (Duration, Duration),
    /// Mean time between two administrative steps.
    pub admin_every: Duration,
}

impl Default for ScheduleOpts {
    fn default() -> Self {
        ScheduleOpts {
            duration: Duration::from_secs(60),
            warmup: Duration::from_secs(3),
            cooldown: Duration::from_secs(3),
            hold: (Duration::from_secs(2), Duration::from_secs(7)),
            gap: (Duration::from_secs(1), Duration::from_secs(4)),
            admin_every: Duration::from_secs(8),
        }
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn between(rng: &mut ChaCha8Rng, (lo, hi): (Duration, Duration)) -> u64 {
    let (lo, hi) = (ms(lo), ms(hi).max(ms(lo)));
    rng.random_range(lo..=hi)
}

fn target(rng: &mut ChaCha8Rng) -> Target {
    match rng.random_range(0..3) {
        0 => Target::Any { pick: rng.random() },
        1 => Target::ShardLeader { pick: rng.random() },
        _ => Target::MetaLeader,
    }
}

/// A split key in the workloads' key space: keys start with two lowercase
/// letters (see [`crate::workload`]), so a two-letter key cuts between them.
fn split_key(rng: &mut ChaCha8Rng) -> String {
    let a = rng.random_range(b'a'..=b'z') as char;
    let b = rng.random_range(b'a'..=b'z') as char;
    format!("{a}{b}")
}

/// The schedule for `seed` with the nemeses `kinds`, sorted by time.
pub fn generate(seed: u64, kinds: &[NemesisKind], opts: &ScheduleOpts) -> Vec<Event> {
    let end = ms(opts.duration).saturating_sub(ms(opts.cooldown));
    let start = ms(opts.warmup);
    let mut events = Vec::new();

    // Separate generators: adding an administrative nemesis does not change
    // the disruptive faults of a seed, and the other way round.
    let disruptive: Vec<NemesisKind> = kinds.iter().copied().filter(|k| k.is_disruptive()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    if !disruptive.is_empty() {
        let mut t = start;
        loop {
            let hold = between(&mut rng, opts.hold);
            if t + hold > end {
                break;
            }
            let action = match disruptive[rng.random_range(0..disruptive.len())] {
                NemesisKind::Kill => Action::Kill { target: target(&mut rng) },
                NemesisKind::Pause => Action::Pause { target: target(&mut rng) },
                NemesisKind::SplitCancel => Action::SplitCancel {
                    key: split_key(&mut rng),
                    frozen: rng.random_bool(0.5),
                    wait_ms: rng.random_range(0..=1000),
                },
                NemesisKind::MetaIsolate => {
                    // A node restarts while the leader is cut off.
                    let at_ms = t + hold / 3 + rng.random_range(0..=hold / 3);
                    events.push(Event { at_ms, action: Action::Restart { target: target(&mut rng) } });
                    Action::MetaIsolate
                }
                _ if rng.random_bool(0.5) => Action::Isolate { target: target(&mut rng) },
                _ => Action::Halves { pick: rng.random() },
            };
            events.push(Event { at_ms: t, action });
            events.push(Event { at_ms: t + hold, action: Action::Heal });
            t += hold + between(&mut rng, opts.gap);
        }
    }

    let admin: Vec<NemesisKind> = kinds.iter().copied().filter(|k| !k.is_disruptive()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_ad31);
    if !admin.is_empty() {
        let every = ms(opts.admin_every).max(1);
        let mut t = start + rng.random_range(0..every);
        while t < end {
            let action = match admin[rng.random_range(0..admin.len())] {
                NemesisKind::Split => Action::Split { key: split_key(&mut rng) },
                NemesisKind::Move => Action::Move { pick: rng.random() },
                NemesisKind::Merge => Action::Merge { pick: rng.random() },
                _ => Action::Transfer { pick: rng.random() },
            };
            events.push(Event { at_ms: t, action });
            t += rng.random_range(every / 2..=every * 3 / 2);
        }
    }
    events.sort_by_key(|e| e.at_ms);
    events
}

/// The two sides of [`Action::Halves`] among `ids`: a majority and a
/// minority (the smaller half, at least one node), chosen by `pick`.
pub fn halves(ids: &[u64], pick: u64) -> (Vec<u64>, Vec<u64>) {
    let mut ids = ids.to_vec();
    ids.shuffle(&mut ChaCha8Rng::seed_from_u64(pick));
    let minority = ids.split_off(ids.len().div_ceil(2));
    (ids, minority)
}

/// Every pair of nodes, one from each side: the links a partition cuts.
pub fn cut_between(a: &[u64], b: &[u64]) -> BTreeSet<(usize, usize)> {
    a.iter().flat_map(|&x| b.iter().map(move |&y| (x as usize, y as usize))).collect()
}

/// Parses `kill,pause,…` (or `all`, or `none`).
pub fn parse_kinds(s: &str) -> Result<Vec<NemesisKind>, Error> {
    match s.trim() {
        "all" => return Ok(NemesisKind::ALL.to_vec()),
        "none" | "" => return Ok(Vec::new()),
        _ => {}
    }
    let mut kinds: Vec<NemesisKind> = s.split(',').map(str::parse).collect::<Result<_, _>>()?;
    kinds.sort();
    kinds.dedup();
    Ok(kinds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn opts(secs: u64) -> ScheduleOpts {
        ScheduleOpts { duration: Duration::from_secs(secs), ..Default::default() }
    }

    #[test]
    fn same_seed_same_schedule() {
        let all = NemesisKind::ALL;
        assert_eq!(generate(7, &all, &opts(120)), generate(7, &all, &opts(120)));
        assert_ne!(generate(7, &all, &opts(120)), generate(8, &all, &opts(120)));
    }

    #[test]
    fn disruptive_faults_do_not_depend_on_admin_nemeses() {
        let disruptive = |events: Vec<Event>| -> Vec<Event> {
            events.into_iter().filter(|e| e.action.kind().is_none_or(|k| k.is_disruptive())).collect()
        };
        let a = disruptive(generate(3, &[NemesisKind::Kill, NemesisKind::Pause], &opts(90)));
        let b = disruptive(generate(
            3,
            &NemesisKind::ALL[..2].iter().copied().chain([NemesisKind::Split]).collect::<Vec<_>>(),
            &opts(90),
        ));
        assert_eq!(a, b);
    }

    #[test]
    fn parses_kind_lists() {
        assert_eq!(parse_kinds("split,kill,kill").unwrap(), vec![NemesisKind::Kill, NemesisKind::Split]);
        assert_eq!(parse_kinds("all").unwrap().len(), 9);
        assert_eq!(
            parse_kinds("meta-isolate,split-cancel").unwrap(),
            vec![NemesisKind::SplitCancel, NemesisKind::MetaIsolate]
        );
        assert!(parse_kinds("none").unwrap().is_empty());
        assert!(parse_kinds("kill,fire").is_err());
    }

    #[test]
    fn the_ci_seeds_play_every_fault_and_split() {
        // scripts/chaos.sh: seeds 1 and 2, 40 s, every nemesis. The scan
        // checker needs splits under it, and each new nemesis should run.
        let ci = parse_kinds("kill,pause,partition,split,move,transfer,split-cancel,meta-isolate").unwrap();
        let mut seen = BTreeSet::new();
        for seed in [1, 2] {
            let events = generate(seed, &ci, &opts(40));
            assert!(
                events.iter().any(|e| matches!(e.action, Action::Split { .. } | Action::SplitCancel { .. })),
                "seed {seed} splits nothing: {events:?}"
            );
            seen.extend(events.iter().filter_map(|e| e.action.kind()));
        }
        assert!(seen.contains(&NemesisKind::SplitCancel), "{seen:?}");
        assert!(seen.contains(&NemesisKind::MetaIsolate), "{seen:?}");
    }

    #[test]
    fn halves_split_into_majority_and_minority() {
        let ids = [1, 2, 3, 4, 5];
        let (major, minor) = halves(&ids, 9);
        assert_eq!((major.len(), minor.len()), (3, 2));
        let mut all: Vec<u64> = major.iter().chain(&minor).copied().collect();
        all.sort();
        assert_eq!(all, ids);
        assert_eq!(halves(&ids, 9), (major.clone(), minor.clone()), "same pick, same halves");
        assert_eq!(halves(&[1, 2, 3], 0).1.len(), 1);
        let cut = cut_between(&major, &minor);
        assert_eq!(cut.len(), 6);
        assert!(cut.iter().all(|(a, b)| major.contains(&(*a as u64)) && minor.contains(&(*b as u64))));
    }

    proptest! {
        #[test]
        fn schedules_are_well_formed(seed: u64, secs in 5u64..600, mask in 1u16..256) {
            let kinds: Vec<NemesisKind> =
                NemesisKind::ALL.into_iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, k)| k).collect();
            let o = opts(secs);
            let events = generate(seed, &kinds, &o);
            let end = ms(o.duration) - ms(o.cooldown);
            let mut faulty = false;
            let mut last = 0;
            for e in &events {
                prop_assert!(e.at_ms >= last, "not sorted");
                last = e.at_ms;
                prop_assert!(e.at_ms >= ms(o.warmup) && e.at_ms <= end, "{:?} outside the window", e);
                if matches!(e.action, Action::Restart { .. }) {
                    prop_assert!(faulty, "a restart outside the fault it belongs to");
                    continue;
                }
                match e.action.kind() {
                    None => { prop_assert!(faulty, "heal without a fault"); faulty = false; }
                    Some(k) => {
                        prop_assert!(kinds.contains(&k), "{:?} not enabled", k);
                        if k.is_disruptive() {
                            prop_assert!(!faulty, "two disruptive faults at once");
                            faulty = true;
                        }
                    }
                }
            }
            prop_assert!(!faulty, "a fault is never healed");
        }
    }
}
