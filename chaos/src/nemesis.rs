//! The nemesis: plays the fault schedule against the cluster.
//!
//! It waits for each step's time (on the history's clock, so fault times
//! line up with operation times in reports), resolves the step's target
//! against the cluster as it is at that moment (who leads which shard, who
//! leads the metadata group), applies it, and logs what it did. In between
//! it watches for nodes that exit on their own: a crash is a finding, and
//! the node is restarted so the run goes on.
//!
//! Administrative steps go through the admin API. Replica moves and leader
//! transfers may not exist on the server being tested: a 404 from the
//! router's fallback ("no such endpoint") marks the nemesis unavailable for
//! the rest of the run, with one warning, instead of failing it.
//!
//! Two steps combine the two: `split-cancel` starts a split, waits until
//! the split sits in a phase the nodes hold it in (`--fault-hold`), cuts
//! the metadata leader off from the source shard's leader and cancels the
//! split across that cut; `meta-isolate` cuts the metadata leader off from
//! the other metadata replicas only (group 0's, from `/admin/directory`) while
//! a node restarts. At the end, [`Nemesis::wait_operations`] demands that
//! every split and move it started ends once the faults are healed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

use crate::history::Recorder;
use crate::http::Api;
use crate::nodes::LocalCluster;
use crate::schedule::{self, Action, Event, NemesisKind, Target};

/// One step as it was carried out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FaultRecord {
    /// Seconds on the history's clock.
    pub at_s: f64,
    pub action: String,
    pub result: String,
}

/// A node that exited without being killed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Crash {
    pub at_s: f64,
    pub node: u64,
    pub status: String,
    pub log_tail: String,
}

/// What the nemesis did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct NemesisReport {
    /// Faults applied, by kind (`kill`, `pause`, `partition-isolate`,
    /// `partition-halves`, `split`, `move`, `transfer`, `split-cancel`,
    /// `meta-isolate`, `restart`; `*-refused` when the server declined an
    /// administrative request).
    pub counts: BTreeMap<String, u64>,
    pub log: Vec<FaultRecord>,
    pub warnings: Vec<String>,
    /// Operation ids of the splits and moves started.
    pub operation_ids: Vec<u64>,
    pub crashes: Vec<Crash>,
}

/// Plays a schedule. `endpoints[i]` is node `i + 1`'s API when `local` is
/// set; otherwise just the addresses to send admin requests to.
pub struct Nemesis {
    api: Api,
    endpoints: Vec<String>,
    local: Option<Arc<Mutex<LocalCluster>>>,
    recorder: Arc<Recorder>,
    unavailable: BTreeSet<NemesisKind>,
    pub report: NemesisReport,
}

/// The source shard of a split, from its `GET /admin/operations/{id}` view.
pub fn split_source(view: &serde_json::Value) -> Option<u64> {
    view.pointer("/kind/split/source").and_then(|s| s.as_u64())
}

fn lock(c: &Mutex<LocalCluster>) -> MutexGuard<'_, LocalCluster> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// Outcome of one step: counted under a name, or skipped.
enum Applied {
    Done { count: String, what: String },
    Skipped(String),
}

impl Nemesis {
    pub fn new(
        api: Api,
        endpoints: Vec<String>,
        local: Option<Arc<Mutex<LocalCluster>>>,
        recorder: Arc<Recorder>,
    ) -> Self {
        Nemesis { api, endpoints, local, recorder, unavailable: BTreeSet::new(), report: NemesisReport::default() }
    }

    fn now_s(&self) -> f64 {
        self.recorder.now() as f64 / 1e9
    }

    fn log(&mut self, action: String, result: String) {
        tracing::info!("nemesis: {action}: {result}");
        self.report.log.push(FaultRecord { at_s: self.now_s(), action, result });
    }

    /// Plays `schedule` until it ends or `stop` turns true, then heals
    /// everything.
    pub async fn run(&mut self, schedule: &[Event], mut stop: watch::Receiver<bool>) {
        for event in schedule {
            if !self.wait_until(event.at_ms, &mut stop).await {
                break;
            }
            self.apply(&event.action).await;
        }
        self.wait_until(u64::MAX, &mut stop).await;
        self.heal().await;
    }

    /// Waits until `at_ms` on the history's clock, watching for crashes;
    /// `false` if stopped first.
    async fn wait_until(&mut self, at_ms: u64, stop: &mut watch::Receiver<bool>) -> bool {
        loop {
            if *stop.borrow() {
                return false;
            }
            self.check_crashes();
            let now_ms = self.recorder.now() / 1_000_000;
            if now_ms >= at_ms {
                return true;
            }
            let nap = Duration::from_millis((at_ms - now_ms).min(500));
            tokio::select! {
                _ = tokio::time::sleep(nap) => {}
                changed = stop.changed() => if changed.is_err() { return false },
            }
        }
    }

    /// Records and restarts nodes that exited on their own.
    pub fn check_crashes(&mut self) {
        let Some(local) = self.local.clone() else { return };
        let crashed = lock(&local).reap_crashed();
        for (node, status, log_tail) in crashed {
            tracing::error!("node {node} exited on its own ({status}); restarting it\n{log_tail}");
            let at_s = self.now_s();
            if self.report.crashes.len() < 20 {
                self.report.crashes.push(Crash { at_s, node, status: status.clone(), log_tail });
            }
            let restarted = lock(&local).restart(node);
            self.log(format!("node {node} crashed ({status})"), format!("restart: {restarted:?}"));
        }
    }

    /// Undoes every disruptive fault.
    pub async fn heal(&mut self) {
        if let Some(local) = self.local.clone() {
            let r = lock(&local).heal();
            self.log(
                "heal".into(),
                match r {
                    Ok(()) => "ok".into(),
                    Err(e) => format!("error: {e}"),
                },
            );
        }
    }

    async fn apply(&mut self, action: &Action) {
        if let Some(kind) = action.kind() {
            if self.unavailable.contains(&kind) {
                return;
            }
        }
        if matches!(action, Action::Heal) {
            return self.heal().await;
        }
        let applied = match action {
            Action::Kill { target } | Action::Pause { target } | Action::Isolate { target } => {
                self.disrupt(action, target).await
            }
            Action::Halves { pick } => self.halves(*pick),
            Action::Split { key } => self.admin(NemesisKind::Split, "/admin/split", json!({ "key": key })).await,
            Action::Move { pick } => self.move_replica(*pick).await,
            Action::Transfer { pick } => self.transfer(*pick).await,
            Action::Merge { pick } => self.merge(*pick).await,
            Action::SplitCancel { key, frozen, wait_ms } => self.split_cancel(key, *frozen, *wait_ms).await,
            Action::MetaIsolate => self.meta_isolate().await,
            Action::Restart { target } => self.restart(target).await,
            Action::Heal => unreachable!("handled above"),
        };
        match applied {
            Applied::Done { count, what } => {
                *self.report.counts.entry(count).or_default() += 1;
                self.log(action.to_string(), what);
            }
            Applied::Skipped(why) => self.log(action.to_string(), format!("skipped: {why}")),
        }
    }

    fn local(&self) -> Option<Arc<Mutex<LocalCluster>>> {
        self.local.clone()
    }

    /// Endpoints of nodes that are running and not paused.
    fn live_endpoints(&self) -> Vec<String> {
        match &self.local {
            Some(l) => {
                let c = lock(l);
                c.ids()
                    .into_iter()
                    .filter(|&id| c.is_running(id) && !c.is_paused(id))
                    .map(|id| self.endpoints[id as usize - 1].clone())
                    .collect()
            }
            None => self.endpoints.clone(),
        }
    }

    /// The node a target names right now, with how it was found.
    async fn resolve(&self, target: &Target) -> Option<(u64, String)> {
        let local = self.local()?;
        let ids: Vec<u64> = {
            let c = lock(&local);
            c.ids().into_iter().filter(|&id| c.is_running(id) && !c.is_paused(id)).collect()
        };
        if ids.is_empty() {
            return None;
        }
        let any = |pick: u64| ids[(pick % ids.len() as u64) as usize];
        match target {
            Target::Any { pick } => Some((any(*pick), "random node".into())),
            Target::ShardLeader { pick } => {
                for base in self.live_endpoints() {
                    let Ok(mut shards) = self.api.shards(&base).await else { continue };
                    shards.sort_by_key(|s| s.shard_id);
                    let Some(shard) = shards.get((*pick % shards.len().max(1) as u64) as usize) else { break };
                    if let Some(l) = shard.leader.filter(|l| ids.contains(l)) {
                        return Some((l, format!("leader of shard {}", shard.shard_id)));
                    }
                    break;
                }
                Some((any(*pick), "random node (no shard leader known)".into()))
            }
            Target::MetaLeader => {
                for &id in &ids {
                    if self.api.leads_group(&self.endpoints[id as usize - 1], 0).await.unwrap_or(false) {
                        return Some((id, "metadata leader".into()));
                    }
                }
                Some((any(0), "random node (no metadata leader known)".into()))
            }
        }
    }

    async fn disrupt(&mut self, action: &Action, target: &Target) -> Applied {
        let Some(local) = self.local() else { return Applied::Skipped("no process control".into()) };
        let Some((node, how)) = self.resolve(target).await else {
            return Applied::Skipped("no running node".into());
        };
        let mut c = lock(&local);
        let (count, result) = match action {
            Action::Kill { .. } => ("kill", c.kill(node)),
            Action::Pause { .. } => ("pause", c.pause(node)),
            _ => {
                let others: Vec<u64> = c.ids().into_iter().filter(|&j| j != node).collect();
                ("partition-isolate", c.partition(&schedule::cut_between(&[node], &others)))
            }
        };
        match result {
            Ok(()) => Applied::Done { count: count.into(), what: format!("node {node} ({how})") },
            Err(e) => Applied::Skipped(format!("node {node}: {e}")),
        }
    }

    fn halves(&mut self, pick: u64) -> Applied {
        let Some(local) = self.local() else { return Applied::Skipped("no process control".into()) };
        let c = lock(&local);
        let (majority, minority) = schedule::halves(&c.ids(), pick);
        match c.partition(&schedule::cut_between(&majority, &minority)) {
            Ok(()) => Applied::Done { count: "partition-halves".into(), what: format!("{majority:?} | {minority:?}") },
            Err(e) => Applied::Skipped(e.to_string()),
        }
    }

    /// Sends an admin request to a live node; counts it under `kind`.
    async fn admin(&mut self, kind: NemesisKind, path: &str, body: serde_json::Value) -> Applied {
        let mut last = "no live node".to_string();
        for base in self.live_endpoints() {
            let answer = match self.api.admin_post(&base, path, body.clone()).await {
                Ok(a) => a,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            if answer.is_missing_route() {
                let warning = format!("{path} does not exist on this server: the {kind} nemesis is not available");
                tracing::warn!("{warning}");
                self.report.warnings.push(warning);
                self.unavailable.insert(kind);
                return Applied::Skipped("not available".into());
            }
            if answer.status == 200 {
                let id = answer.json().and_then(|v| v.get("operation_id").and_then(|i| i.as_u64()));
                self.report.operation_ids.extend(id);
                let what = match id {
                    Some(id) => format!("{body} → operation {id}"),
                    None => format!("{body} → ok"),
                };
                return Applied::Done { count: kind.to_string(), what };
            }
            let what = format!("{body} → {} {}", answer.status, answer.body.chars().take(200).collect::<String>());
            return Applied::Done { count: format!("{kind}-refused"), what };
        }
        Applied::Skipped(last)
    }

    async fn move_replica(&mut self, pick: u64) -> Applied {
        let Some((shards, nodes)) = self.topology().await else { return Applied::Skipped("no topology".into()) };
        let shard = &shards[(pick % shards.len() as u64) as usize];
        let holders: Vec<u64> = shard.replicas.iter().map(|r| r.node_id).collect();
        let free: Vec<u64> = nodes.iter().copied().filter(|n| !holders.contains(n)).collect();
        if holders.is_empty() || free.is_empty() {
            return Applied::Skipped(format!("shard {}: no node without a replica", shard.shard_id));
        }
        let from = holders[((pick >> 8) % holders.len() as u64) as usize];
        let to = free[((pick >> 16) % free.len() as u64) as usize];
        let body = json!({ "shard_id": shard.shard_id, "from_node": from, "to_node": to });
        self.admin(NemesisKind::Move, "/admin/move", body).await
    }

    async fn merge(&mut self, pick: u64) -> Applied {
        let mut ranges = None;
        for base in self.live_endpoints() {
            if let Ok(r) = self.api.ranges(&base).await {
                ranges = Some(r);
                break;
            }
        }
        let Some(mut ranges) = ranges else { return Applied::Skipped("no ranges".into()) };
        ranges.retain(|r| r.end.is_some());
        if ranges.is_empty() {
            return Applied::Skipped("one range: nothing to merge".into());
        }
        let range = &ranges[(pick % ranges.len() as u64) as usize];
        let what = format!("range {} [{:?}, {:?})", range.range_id, range.start, range.end);
        match self.admin(NemesisKind::Merge, "/admin/merge", json!({ "range_id": range.range_id })).await {
            Applied::Done { count, what: answer } => Applied::Done { count, what: format!("{what}: {answer}") },
            skipped => skipped,
        }
    }

    async fn transfer(&mut self, pick: u64) -> Applied {
        let Some((shards, _)) = self.topology().await else { return Applied::Skipped("no topology".into()) };
        let shard = &shards[(pick % shards.len() as u64) as usize];
        let others: Vec<u64> = shard.replicas.iter().map(|r| r.node_id).filter(|n| Some(*n) != shard.leader).collect();
        if others.is_empty() {
            return Applied::Skipped(format!("shard {}: no other replica", shard.shard_id));
        }
        let to = others[((pick >> 8) % others.len() as u64) as usize];
        let body = json!({ "shard_id": shard.shard_id, "to_node": to });
        self.admin(NemesisKind::Transfer, "/admin/transfer-leader", body).await
    }

    /// Data shards (sorted) and node ids, from the first live node that answers.
    async fn topology(&self) -> Option<(Vec<crate::http::ShardInfo>, Vec<u64>)> {
        for base in self.live_endpoints() {
            let (Ok(mut shards), Ok(nodes)) = (self.api.shards(&base).await, self.api.nodes(&base).await) else {
                continue;
            };
            if shards.is_empty() {
                return None;
            }
            shards.sort_by_key(|s| s.shard_id);
            return Some((shards, nodes.into_iter().map(|n| n.id).collect()));
        }
        None
    }

    /// The metadata leader among the running nodes, if one says it leads.
    async fn meta_leader(&self) -> Option<u64> {
        let local = self.local()?;
        let ids: Vec<u64> = {
            let c = lock(&local);
            c.ids().into_iter().filter(|&id| c.is_running(id) && !c.is_paused(id)).collect()
        };
        for id in ids {
            if self.api.leads_group(&self.endpoints[id as usize - 1], 0).await.unwrap_or(false) {
                return Some(id);
            }
        }
        None
    }

    /// The groups' leaders and replicas, from the first live node that answers.
    async fn shards(&self) -> Option<Vec<crate::http::ShardInfo>> {
        for base in self.live_endpoints() {
            if let Ok(shards) = self.api.shards(&base).await {
                return Some(shards);
            }
        }
        None
    }

    /// The leader of `shard` as `/admin/shards` reports it, asked again
    /// for up to `within` while it reports none (an election).
    async fn shard_leader(&self, shard: u64, within: Duration) -> Option<u64> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let leader =
                self.shards().await.unwrap_or_default().iter().find(|s| s.shard_id == shard).and_then(|s| s.leader);
            if leader.is_some() || tokio::time::Instant::now() >= deadline {
                return leader;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls operation `id` until `done` says so or `within` passes; the
    /// last view seen.
    async fn poll_operation(
        &self,
        id: u64,
        within: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + within;
        let mut last = None;
        loop {
            for base in self.live_endpoints() {
                if let Ok(view) = self.api.operation(&base, id).await {
                    last = Some(view);
                    break;
                }
            }
            if last.as_ref().is_some_and(&done) || tokio::time::Instant::now() >= deadline {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn split_cancel(&mut self, key: &str, frozen: bool, wait_ms: u64) -> Applied {
        let Some(local) = self.local() else { return Applied::Skipped("no process control".into()) };
        let Some(base) = self.live_endpoints().into_iter().next() else {
            return Applied::Skipped("no live node".into());
        };
        let answer = match self.api.admin_post(&base, "/admin/split", json!({ "key": key })).await {
            Ok(a) => a,
            Err(e) => return Applied::Skipped(e.to_string()),
        };
        let Some(id) = answer.json().and_then(|v| v.get("operation_id").and_then(|i| i.as_u64())) else {
            let body: String = answer.body.chars().take(200).collect();
            return Applied::Done {
                count: "split-cancel-refused".into(),
                what: format!("split {key:?} → {} {body}", answer.status),
            };
        };
        self.report.operation_ids.push(id);
        let wanted = if frozen { "frozen" } else { "capturing" };
        let phase_of = |v: &serde_json::Value| v.get("phase").and_then(|p| p.as_str()).unwrap_or("").to_string();
        let terminal = |p: &str| matches!(p, "done" | "aborted" | "committed");
        let view = self
            .poll_operation(id, Duration::from_secs(10), |v| {
                let p = phase_of(v);
                p == wanted || terminal(&p) || (wanted == "capturing" && p == "frozen")
            })
            .await;
        let phase = view.as_ref().map(phase_of).unwrap_or_default();
        let source = view.as_ref().and_then(split_source);
        let mut what = format!("split {key:?} = operation {id}, in phase {phase:?}");
        if !terminal(&phase) {
            let meta = self.meta_leader().await;
            let source_leader = match source {
                Some(shard) => self.shard_leader(shard, Duration::from_secs(2)).await,
                None => None,
            };
            match (meta, source_leader) {
                (Some(m), Some(l)) if m != l => {
                    let cut = schedule::cut_between(&[m], &[l]);
                    match lock(&local).partition(&cut) {
                        Ok(()) => {
                            what.push_str(&format!("; cut metadata leader {m} from shard {source:?}'s leader {l}"))
                        }
                        Err(e) => what.push_str(&format!("; cut failed: {e}")),
                    }
                }
                (m, l) => what.push_str(&format!("; no cut (metadata leader {m:?}, shard {source:?}'s leader {l:?})")),
            }
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        }
        let path = format!("/admin/operations/{id}/cancel");
        let mut cancelled = "no live node to cancel through".to_string();
        for base in self.live_endpoints() {
            match self.api.admin_post(&base, &path, json!({})).await {
                Ok(a) => {
                    let phase = a.json().map(|v| phase_of(&v)).filter(|p| !p.is_empty());
                    cancelled = match phase {
                        Some(p) => format!("cancel → {} (phase {p})", a.status),
                        None => format!("cancel → {} {}", a.status, a.body.chars().take(160).collect::<String>()),
                    };
                    break;
                }
                Err(e) => cancelled = format!("cancel: {e}"),
            }
        }
        Applied::Done { count: "split-cancel".into(), what: format!("{what}; {cancelled}") }
    }

    async fn meta_isolate(&mut self) -> Applied {
        let Some(local) = self.local() else { return Applied::Skipped("no process control".into()) };
        let Some(leader) = self.meta_leader().await else { return Applied::Skipped("no metadata leader".into()) };
        let mut replicas = None;
        for base in self.live_endpoints() {
            if let Ok(r) = self.api.meta_replicas(&base).await {
                replicas = Some(r);
                break;
            }
        }
        let Some(replicas) = replicas else { return Applied::Skipped("no metadata replica list".into()) };
        let others: Vec<u64> = replicas.into_iter().filter(|&n| n != leader).collect();
        if others.is_empty() {
            return Applied::Skipped(format!("metadata leader {leader} has no other replica"));
        }
        let cut = lock(&local).partition(&schedule::cut_between(&[leader], &others));
        match cut {
            Ok(()) => Applied::Done {
                count: "meta-isolate".into(),
                what: format!("metadata leader {leader} cut from metadata replicas {others:?} only"),
            },
            Err(e) => Applied::Skipped(e.to_string()),
        }
    }

    async fn restart(&mut self, target: &Target) -> Applied {
        let Some(local) = self.local() else { return Applied::Skipped("no process control".into()) };
        let Some((node, how)) = self.resolve(target).await else {
            return Applied::Skipped("no running node".into());
        };
        let mut c = lock(&local);
        match c.kill(node).and_then(|()| c.restart(node)) {
            Ok(()) => {
                Applied::Done { count: "restart".into(), what: format!("node {node} ({how}) killed and started again") }
            }
            Err(e) => Applied::Skipped(format!("node {node}: {e}")),
        }
    }

    /// Waits (up to `within`) until every split and move this nemesis
    /// started has ended; returns their final phases, counted, and the ones
    /// that did not end (`op N phase`).
    pub async fn wait_operations(&self, within: Duration) -> (BTreeMap<String, u64>, Vec<String>) {
        let mut phases = BTreeMap::new();
        if self.report.operation_ids.is_empty() {
            return (phases, Vec::new());
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut ops = None;
            for base in self.live_endpoints() {
                if let Ok(list) = self.api.operations(&base).await {
                    ops = Some(list);
                    break;
                }
            }
            let found: Vec<(u64, String)> = self
                .report
                .operation_ids
                .iter()
                .map(|id| {
                    let phase = ops
                        .iter()
                        .flatten()
                        .find(|o| o.get("op_id").and_then(|i| i.as_u64()) == Some(*id))
                        .and_then(|o| o.get("phase").and_then(|p| p.as_str()).map(str::to_owned))
                        .unwrap_or_else(|| "unknown".into());
                    (*id, phase)
                })
                .collect();
            // "unknown": no longer listed (finished long ago). A list that
            // could not be read at all proves nothing: every operation
            // counts as still running until one can be read.
            let running: Vec<String> = match &ops {
                None => self.report.operation_ids.iter().map(|id| format!("op {id} (operations unreadable)")).collect(),
                Some(_) => found
                    .iter()
                    .filter(|(_, p)| !matches!(p.as_str(), "done" | "aborted" | "unknown"))
                    .map(|(id, p)| format!("op {id} {p}"))
                    .collect(),
            };
            if running.is_empty() || tokio::time::Instant::now() >= deadline {
                for (_, p) in found {
                    *phases.entry(p).or_default() += 1;
                }
                return (phases, running);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleave_client::cleave_metadata::api::OperationView;
    use cleave_client::cleave_metadata::{OpKind, Operation, Phase, Progress};

    #[test]
    fn the_split_source_is_read_from_the_servers_operation_view() {
        let op = Operation {
            op_id: 3,
            kind: OpKind::Split {
                range_id: 1,
                split_key: "sy".into(),
                source: 7,
                target: 9,
                new_range_id: 4,
                target_replicas: vec![],
                reason: "admin".into(),
            },
            phase: Phase::Capturing,
            history: vec![(Phase::Planned, 1), (Phase::Capturing, 2)],
            progress: Progress::default(),
            write_pause_ms: None,
            error: None,
            cleaned: false,
        };
        let view = serde_json::to_value(OperationView::new(op, 5)).unwrap();
        assert_eq!(split_source(&view), Some(7));
        assert_eq!(view.get("phase").and_then(|p| p.as_str()), Some("capturing"));
    }
}
