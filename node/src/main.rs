//! The `cleave-node` binary: parse configuration, open storage, start the
//! RPC and HTTP servers, and run until SIGINT/SIGTERM.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use cleave_node::config::Args;
use cleave_node::node::Node;
use cleave_node::raft::RaftContext;
use cleave_node::rpc::{transport, ExecError, Request, Response, Transport};
use cleave_node::security::tls::{self, Tls};
use cleave_node::security::{Access, Secret};
use cleave_node::{api, balance, ops, split, storage};

/// jemalloc, as TiKV uses: it hands freed memory back to the system (glibc's
/// arenas kept the garbage of every split's transient buffers resident) and
/// is faster on the many small allocations of the request path.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,openraft=error,cleave_node=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = Args::parse().merged()?.resolve()?;
    if cfg.fault_api {
        cleave_node::raft::network::FAULT_API.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if let Some(spec) = &cfg.fault_hold {
        cleave_node::ops::faults::set_fault_hold(spec)?;
    }
    if cfg.fault_corrupt_backfill {
        cleave_node::ops::faults::CORRUPT_BACKFILL.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(cfg))
}

async fn run(cfg: cleave_node::config::Resolved) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.node.data_dir).with_context(|| format!("creating {}", cfg.node.data_dir.display()))?;
    // SIGHUP reloads (below); handled from the start, so that one sent
    // while the node starts up does not kill it (its default action).
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("SIGHUP handler")?;
    // Security files first: a node never starts less protected than meant.
    tls::install_default_provider();
    let secret = cfg.cluster_secret_file.as_deref().map(Secret::from_file).transpose()?;
    let access = Arc::new(Access::load(cfg.tokens_file.clone(), secret.clone())?);
    let tls = cfg.tls.clone().map(Tls::load).transpose()?.map(Arc::new);
    if access.tokens().is_some() && secret.is_none() && !tls.as_ref().is_some_and(|t| t.mutual()) {
        tracing::warn!(
            "--tokens-file without --cluster-secret-file or --tls-ca: the RPC port is open, and anyone who \
             reaches it can do what tokens deny on the API; give the nodes a cluster secret"
        );
    }
    let security = transport::Security::new(secret, tls.clone());
    let metrics = cleave_node::metrics::install()?;
    let db = storage::open(&cfg.node.data_dir.join("db")).context("opening RocksDB")?;
    let syncer = storage::Syncer::start(db.clone());
    let transport = Transport::with_security(security.clone());
    let ctx = RaftContext {
        addresses: Default::default(),
        db,
        syncer,
        transport,
        snapshot_root: cfg.node.data_dir.join("snapshots"),
        settings: cfg.raft.clone(),
        awake: Default::default(),
        mirrors: Arc::new(cleave_node::split::mirror::Mirrors::with_rate(cfg.node.backfill_bytes_per_s)),
        clock: Default::default(),
    };
    // Bind both ports before anything else so a taken port fails fast.
    let raft_listener = tokio::net::TcpListener::bind(&cfg.listen_raft)
        .await
        .with_context(|| format!("binding {}", cfg.listen_raft))?;
    let api_listener =
        tokio::net::TcpListener::bind(&cfg.listen_api).await.with_context(|| format!("binding {}", cfg.listen_api))?;

    // The RPC server must run while groups start: peers' Raft traffic and
    // our own groups' elections need it. Requests for groups not open yet
    // are answered with an error and retried by the sender.
    let node_slot: Arc<tokio::sync::OnceCell<Arc<Node>>> = Arc::default();
    let slot = node_slot.clone();
    let handler: transport::Handler = Arc::new(move |req| {
        let slot = slot.clone();
        Box::pin(async move {
            match slot.get() {
                Some(node) => node.clone().handle_rpc(req).await,
                None => match req {
                    Request::Raft { .. } => Response::Raft(Err("node is starting".into())),
                    Request::Node(_) => Response::Node(Err(ExecError::Unavailable("node is starting".into()))),
                },
            }
        })
    });
    tokio::spawn(transport::serve(raft_listener, handler, security));

    let node = Node::start(cfg.node.clone(), ctx, &node_slot).await?;
    tokio::spawn(cleave_node::node::heartbeat_loop(node.clone()));
    tokio::spawn(split::forwarder::supervise(node.clone()));
    tokio::spawn(cleave_node::node::quiescer::run(node.clone()));
    tokio::spawn(cleave_node::node::liveness::run(node.clone()));
    tokio::spawn(ops::supervisor::run(node.clone()));
    tokio::spawn(balance::run::auto_split(node.clone(), cfg.split.clone()));
    tokio::spawn(balance::run::auto_merge(node.clone(), cfg.merge.clone()));
    tokio::spawn(cleave_node::keyspace::finish_declarations(node.clone()));
    tokio::spawn(balance::run::replicas(node.clone(), cfg.balance.clone()));
    tokio::spawn(cleave_node::watch::trim::run(node.clone()));
    tracing::info!(node = node.id(), api = %cfg.listen_api, raft = %cfg.listen_raft, "serving");

    tokio::spawn(reload_on_hangup(hup, access.clone(), tls.clone()));
    let app = api::router(api::AppState { node: node.clone(), metrics, access });
    match tls {
        Some(tls) => api::https::serve(api_listener, app, tls, shutdown_signal()).await,
        None => axum::serve(api_listener, app).with_graceful_shutdown(shutdown_signal()).await?,
    }
    node.shutdown().await;
    Ok(())
}

/// Re-reads the tokens file and the TLS certificates on every SIGHUP
/// (they rotate without a restart).
async fn reload_on_hangup(mut hup: tokio::signal::unix::Signal, access: Arc<Access>, tls: Option<Arc<Tls>>) {
    while hup.recv().await.is_some() {
        access.reload();
        if let Some(t) = &tls {
            t.reload();
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
