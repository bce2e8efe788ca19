//! Joining an existing cluster: a node started with `--join ADDR` asks the
//! node at that API address to register it in the directory, learns its id,
//! and takes the metadata replicas' addresses as seeds for its heartbeats.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cleave_metadata::api::{JoinRequest, JoinResponse};

use super::{Identity, NodeSettings};
use crate::security::Secret;

/// Registers this node with the cluster reachable at `addr` (an API address).
pub async fn join(settings: &NodeSettings, secret: Option<&Secret>, addr: &str) -> anyhow::Result<Identity> {
    let mut http = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if let Some(Some(ca)) = &settings.join_https {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        http = http.tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).context("loading the CA certificate")?);
    }
    let http = http.build()?;
    let scheme = if settings.join_https.is_some() { "https" } else { "http" };
    let base = if addr.contains("://") { addr.to_string() } else { format!("{scheme}://{addr}") };
    let req = JoinRequest {
        node_id: settings.id,
        raft_addr: settings.raft_addr.clone(),
        api_addr: settings.api_addr.clone(),
    };
    let body = serde_json::to_vec(&req)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let resp: JoinResponse = loop {
        let mut post = http
            .post(format!("{base}/admin/nodes/join"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone());
        if let Some(s) = secret {
            let now = crate::ops::supervisor::now_ms();
            post = post.header(crate::security::secret::JOIN_PROOF_HEADER, s.join_proof(&body, now));
        }
        match post.send().await {
            Ok(r) if r.status().is_success() => break r.json().await.context("decoding join answer")?,
            Ok(r) if r.status().is_client_error() => bail!("join refused: {}", r.text().await.unwrap_or_default()),
            other if Instant::now() > deadline => bail!("cannot join via {base}: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    if resp.seeds.is_empty() {
        bail!("the join answer names no node to reach the metadata group through");
    }
    tracing::info!(node = resp.node_id, "joined the cluster");
    Ok(Identity { node_id: resp.node_id, seeds: resp.seeds })
}
