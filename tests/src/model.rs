//! What the cluster acknowledged, and checks that it is still there.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::Cluster;
use crate::http::Resp;
use crate::{value_of, ErrorCode, Item, NodeId};

/// The acknowledged state of one key.
#[derive(Debug, Clone, PartialEq)]
pub enum Expected {
    /// Last acknowledged write: this value at this version.
    Value { value: Value, version: u64 },
    /// Last acknowledged operation was a delete.
    Absent,
}

/// Acknowledged state of every key a test touched.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub keys: BTreeMap<String, Expected>,
}

impl Model {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an acknowledged write.
    pub fn put(&mut self, key: impl Into<String>, value: Value, version: u64) {
        self.keys.insert(key.into(), Expected::Value { value, version });
    }

    /// Records an acknowledged delete.
    pub fn delete(&mut self, key: impl Into<String>) {
        self.keys.insert(key.into(), Expected::Absent);
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Why `resp` (an answer to `GET key`) does not show the expected state,
    /// or `None` if it does.
    pub fn mismatch(&self, key: &str, resp: &Resp) -> Option<String> {
        let expected = self.keys.get(key).unwrap_or_else(|| panic!("{key:?} is not in the model"));
        match expected {
            Expected::Value { value, version } => {
                if resp.status != 200 {
                    return Some(format!("expected {value} at version {version}, got {resp:?}"));
                }
                let item: Item = resp.json();
                let got = value_of(&item);
                (item.key != key || &got != value || item.version != *version).then(|| {
                    format!(
                        "expected {key:?} = {value} at version {version}, got {:?} = {got} at version {}",
                        item.key, item.version
                    )
                })
            }
            Expected::Absent => {
                if resp.status != 404 {
                    return Some(format!("expected deleted (404), got {resp:?}"));
                }
                let e = resp.error();
                (e.error.code != ErrorCode::NotFound).then(|| format!("404 with code {:?}: {resp:?}", e.error.code))
            }
        }
    }

    /// Reads every key through node `via` once (retrying only transient
    /// answers, `per_key` at most) and asserts each shows the acknowledged
    /// state right away. For linearizable reads after acknowledged writes.
    pub async fn assert_on(&self, cluster: &Cluster, via: NodeId, consistency: &str, per_key: Duration) {
        for key in self.keys.keys() {
            let r = cluster.read_retry(via, key, Some(consistency), per_key).await;
            if let Some(why) = self.mismatch(key, &r) {
                panic!("{consistency} read of {key:?} through node {via}: {why}");
            }
        }
    }

    /// Waits (until `timeout` overall) for every key read through node `via`
    /// to show the acknowledged state: for stale reads on a replica that is
    /// catching up.
    pub async fn wait_on(&self, cluster: &Cluster, via: NodeId, consistency: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let api = cluster.api(via);
        for key in self.keys.keys() {
            let mut last = String::new();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let found = tokio::time::timeout(left, async {
                loop {
                    match cluster.http.get(&api, key, Some(consistency)).await {
                        Ok(r) => match self.mismatch(key, &r) {
                            None => return,
                            Some(why) => last = why,
                        },
                        Err(e) => last = format!("{e:#}"),
                    }
                    cluster.assert_running();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            if found.is_err() {
                panic!(
                    "node {via} did not catch up within {timeout:?}: {consistency} read of {key:?}: {last} \
                     ({} keys checked in order, this one failed)",
                    self.keys.len()
                );
            }
        }
    }
}
