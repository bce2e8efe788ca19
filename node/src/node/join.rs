//! Joining an existing cluster: a node started with `--join ADDR` asks the
//! node at that API address to register it in the directory, learns its id,
//! and takes the metadata replicas' addresses as seeds for its heartbeats.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cleave_metadata::api::{JoinRequest, JoinResponse};
use cleave_metadata::Directory;

use super::{Identity, NodeSettings};

/// Registers this node with the cluster reachable at `addr` (an API address).
pub async fn join(settings: &NodeSettings, addr: &str) -> anyhow::Result<Identity> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let base = if addr.starts_with("http") { addr.to_string() } else { format!("http://{addr}") };
    let req = JoinRequest {
        node_id: settings.id,
        raft_addr: settings.raft_addr.clone(),
        api_addr: settings.api_addr.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let resp: JoinResponse = loop {
        let r = http.post(format!("{base}/admin/nodes/join")).json(&req).send().await;
        match r {
            Ok(r) if r.status().is_success() => break r.json().await.context("decoding join answer")?,
            Ok(r) if r.status().is_client_error() => bail!("join refused: {}", r.text().await.unwrap_or_default()),
            other if Instant::now() > deadline => bail!("cannot join via {base}: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    let dir: Directory =
        http.get(format!("{base}/admin/directory")).send().await?.json().await.context("reading directory")?;
    let mut seeds: Vec<String> = dir
        .meta
        .iter()
        .flat_map(|m| m.replicas.iter())
        .filter_map(|r| dir.nodes.get(&r.node_id).map(|n| n.raft_addr.clone()))
        .collect();
    if seeds.is_empty() {
        seeds = dir.nodes.values().map(|n| n.raft_addr.clone()).collect();
    }
    tracing::info!(node = resp.node_id, "joined the cluster");
    Ok(Identity { node_id: resp.node_id, seeds })
}
