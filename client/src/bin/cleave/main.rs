//! `cleave`: the CleaveDB command-line client.
//!
//! A thin shell over [`cleave_client::Client`]: parse the command line,
//! make one client from `--endpoints`, run one operation, print the answer
//! as text or JSON. Errors end the process with a one-line message on
//! stderr and an exit code a script can test:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | any other error |
//! | 2 | bad command line |
//! | 3 | key not found |
//! | 4 | version conflict (`--if-version` did not match) |
//! | 5 | outcome unknown (a write may or may not have been applied) |
//! | 6 | cluster unavailable (retries exhausted) |
//! | 7 | the split or move was aborted |
//! | 130 | interrupted (Ctrl-C) while following; what was followed goes on |
//!
//! Operations: `cleave split KEY` (or `--range ID`) starts a split and
//! `cleave move SHARD FROM TO` a replica move, each followed with a progress
//! bar to the end; `cleave ops` lists operations, `cleave ops ID` shows one
//! (following it while it runs) and `cleave ops cancel ID` (or
//! `cleave cancel ID`) abandons one that has not committed.
//!
//! Nodes and leaders: `cleave transfer-leader SHARD NODE` makes a shard's
//! replica on NODE its leader; `cleave decommission NODE` moves every replica
//! off a node and follows it until the node is removed.
//!
//! Logs go to stderr; set `RUST_LOG=debug` to watch routing and retries.

mod follow;
mod format;
mod nodes;
mod operations;

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use cleave_client::cleave_metadata::api::{OperationStarted, TransferLeaderResponse};
use cleave_client::{
    Client, ClientOptions, Consistency, Error, NodeId, OpId, OperationView, Phase, ScanResult, ShardId, MAX_SCAN_LIMIT,
};
use serde::Serialize;
use serde_json::value::RawValue;

#[derive(Parser, Debug)]
#[command(name = "cleave", version, about = "Command-line client for CleaveDB", after_help = EXIT_CODES)]
struct Cli {
    /// API addresses of one or more nodes (host:port), comma-separated.
    #[arg(long, global = true, env = "CLEAVE_ENDPOINTS", value_delimiter = ',', default_value = "127.0.0.1:7001")]
    endpoints: Vec<String>,

    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,

    /// Give up on a request after this long, retries included (e.g. 15s, 500ms).
    #[arg(long, global = true, default_value = "15s", value_parser = parse_duration)]
    timeout: Duration,

    /// Bearer token for a cluster whose nodes check tokens (--tokens-file).
    #[arg(long, global = true, env = "CLEAVE_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// CA certificate (PEM) of a cluster serving its API over HTTPS (--tls-cert): speak HTTPS and
    /// trust only this CA.
    #[arg(long, global = true, env = "CLEAVE_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,

    #[command(subcommand)]
    command: Command,
}

const EXIT_CODES: &str = "Exit codes: 0 ok, 1 error, 2 usage, 3 key not found, 4 version conflict, \
                          5 outcome unknown, 6 cluster unavailable, 7 split or move aborted, \
                          130 interrupted while following.";

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
enum Command {
    /// Read a key.
    Get {
        key: String,
        /// Read from the local replica of the receiving node (may lag).
        #[arg(long)]
        stale: bool,
    },
    /// Write a key. The value is JSON; text that is not valid JSON is stored as a JSON string.
    Put {
        key: String,
        #[arg(allow_hyphen_values = true)]
        value: String,
        /// Write only if the key's current version is N (0: only if absent).
        #[arg(long, value_name = "N")]
        if_version: Option<u64>,
    },
    /// Delete a key.
    #[command(visible_alias = "delete")]
    Del {
        key: String,
        /// Delete only if the key's current version is N.
        #[arg(long, value_name = "N")]
        if_version: Option<u64>,
    },
    /// List keys in [start, end) in key order.
    Scan {
        /// First key (inclusive); default: the beginning of the key space.
        #[arg(long, default_value = "")]
        start: String,
        /// End key (exclusive); default: the end of the key space.
        #[arg(long)]
        end: Option<String>,
        /// Items per page (server default 100, max 1000).
        #[arg(long)]
        limit: Option<usize>,
        /// Follow the pages to the end instead of printing one page.
        #[arg(long)]
        all: bool,
    },
    /// Stream every change to the keys starting with PREFIX (all keys: ""), one JSON object per
    /// line, until interrupted; reconnects by itself.
    Watch {
        prefix: String,
        /// Resume right after this cursor (from an earlier line) instead of starting now.
        #[arg(long)]
        cursor: Option<String>,
        /// Include each change's previous value.
        #[arg(long)]
        prev: bool,
    },
    /// Run a transaction: JSON {"compare": [...], "success": [...], "failure": [...]} from FILE, or from
    /// stdin when FILE is absent or "-". Prints which branch ran and its results.
    Txn {
        /// File holding the transaction's JSON.
        file: Option<std::path::PathBuf>,
    },
    /// Show nodes, shards (with leaders) and ranges.
    Status,
    /// Split a range at KEY (the first key of the new range), or with --range at the median key of range ID.
    ///
    /// Follows the split with a progress bar until it is done or aborted, then prints its phase durations
    /// and how long writes to the moving keys were paused. Exits with 7 if the split was aborted.
    Split {
        #[arg(required_unless_present = "range", conflicts_with = "range")]
        key: Option<String>,
        /// Split range ID at its median key instead.
        #[arg(long, value_name = "ID")]
        range: Option<u64>,
        /// Print the operation id and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Merge range RANGE_ID with its right-hand neighbour into one range of RANGE_ID's shard.
    ///
    /// Follows the merge with a progress bar until it is done or aborted, then prints its phase durations
    /// and how long writes to the merged keys were paused. Exits with 7 if the merge was aborted.
    Merge {
        /// The left range of the two.
        range_id: u64,
        /// Print the operation id and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Move shard SHARD's replica from node FROM to node TO (shard 0 is the metadata group).
    ///
    /// The new replica catches up as a learner, then joint consensus swaps it in and the old one is
    /// deleted. Follows the move with a progress bar until it is done or aborted, then prints its phase
    /// durations. Exits with 7 if the move was aborted.
    Move {
        /// The shard (Raft group) whose replica moves.
        shard: ShardId,
        /// The node that holds the replica now.
        #[arg(value_name = "FROM")]
        from_node: NodeId,
        /// The node that gets the new replica.
        #[arg(value_name = "TO")]
        to_node: NodeId,
        /// Print the operation id and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Make the replica of shard SHARD on node NODE its leader; prints who leads once it does.
    TransferLeader {
        /// The shard (Raft group).
        shard: ShardId,
        /// The node whose replica should lead.
        #[arg(value_name = "NODE")]
        to_node: NodeId,
    },
    /// Move every replica off node NODE, then remove it from the cluster.
    ///
    /// Follows it with a progress bar of the node's replicas moved away until the node is removed,
    /// however long that takes (Ctrl-C stops following; the decommission goes on).
    Decommission {
        /// The node to empty and remove.
        node: NodeId,
        /// Print the node's status and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// List operations; `ops ID` shows one (following it while it runs); `ops cancel ID` cancels one.
    Ops(OpsArgs),
    /// Cancel an operation that has not committed yet (same as `ops cancel ID`).
    Cancel { id: OpId },
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct OpsArgs {
    #[command(subcommand)]
    action: Option<OpsAction>,
    /// Show this operation; while it runs, follow it with a progress bar.
    id: Option<OpId>,
    /// With ID: print the operation as it is now instead of following it.
    #[arg(long, requires = "id")]
    no_wait: bool,
}

#[derive(Subcommand, Debug)]
enum OpsAction {
    /// Cancel an operation that has not committed yet (its leftovers are cleaned up).
    Cancel { id: OpId },
}

/// A split or move that ended aborted (exit code 7).
#[derive(Debug, thiserror::Error)]
#[error("operation {id} was aborted: {reason}")]
struct Aborted {
    id: OpId,
    reason: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit code for an error (see the module docs).
fn exit_code(e: &anyhow::Error) -> u8 {
    match e.chain().find_map(|c| c.downcast_ref::<Error>()) {
        Some(Error::NotFound) => 3,
        Some(Error::VersionConflict { .. }) => 4,
        Some(Error::Indeterminate(_)) => 5,
        Some(Error::Unavailable { .. }) => 6,
        _ if e.downcast_ref::<Aborted>().is_some() => 7,
        _ if e.downcast_ref::<follow::Interrupted>().is_some() => 130,
        _ => 1,
    }
}

async fn run(cli: Cli) -> Result<()> {
    // One request per run: sending it to a seed (which forwards it) is
    // cheaper than first loading the routing cache.
    let ca = match &cli.ca_cert {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("reading --ca-cert {}", p.display()))?),
        None => None,
    };
    let options = ClientOptions::default()
        .with_deadline(cli.timeout)
        .with_smart_routing(false)
        .with_token(cli.token.clone())
        .with_ca_cert(ca);
    let client = Client::with_options(&cli.endpoints, options).context("invalid --endpoints")?;
    let out = cli.output;
    match cli.command {
        Command::Get { key, stale } => {
            let consistency = if stale { Consistency::Stale } else { Consistency::Linearizable };
            let item = client.get(&key, consistency).await?.ok_or(Error::NotFound)?;
            print(out, &item, || format::item_line(&item))
        }
        Command::Put { key, value, if_version } => {
            let w = match serde_json::from_str::<Box<RawValue>>(&value) {
                Ok(raw) => client.put(&key, &*raw, if_version).await?,
                Err(_) => client.put(&key, &value, if_version).await?,
            };
            print(out, &w, || format!("ok: {} is at version {}", w.key, w.version))
        }
        Command::Txn { file } => {
            let text = match file.as_deref() {
                None => std::io::read_to_string(std::io::stdin())?,
                Some(p) if p.as_os_str() == "-" => std::io::read_to_string(std::io::stdin())?,
                Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            };
            let req: cleave_client::TxnRequest = serde_json::from_str(&text)
                .map_err(|e| Error::InvalidArgument(format!("the transaction is not valid JSON of its shape: {e}")))?;
            let r = client.txn(&req).await?;
            print(out, &r, || format::txn_lines(&r))
        }
        Command::Del { key, if_version } => {
            let w = client.delete(&key, if_version).await?;
            print(out, &w, || format!("deleted: {} (version {})", w.key, w.version))
        }
        Command::Scan { start, end, limit, all } => {
            if all {
                let items = client.scan_all(&start, end.as_deref()).await?;
                let result = ScanResult { items, next: None };
                print(out, &result, || lines(&result))
            } else {
                let limit = limit.map(|l| l.min(MAX_SCAN_LIMIT));
                let page = client.scan(&start, end.as_deref(), limit).await?;
                if let (Output::Text, Some(next)) = (out, &page.next) {
                    eprintln!("(more: continue with --start {})", serde_json::to_string(next)?);
                }
                print(out, &page, || lines(&page))
            }
        }
        Command::Watch { prefix, cursor, prev } => {
            use futures::StreamExt;
            let req = cleave_client::WatchRequest { cursor, prev, ..cleave_client::WatchRequest::prefix(&prefix) };
            let mut events = std::pin::pin!(client.watch(req));
            let mut stdout = std::io::stdout().lock();
            while let Some(event) = events.next().await {
                let event = event.context("watching")?;
                serde_json::to_writer(&mut stdout, &event)?;
                writeln!(stdout)?;
                stdout.flush()?;
            }
            Ok(())
        }
        Command::Status => {
            let (nodes, shards, ranges) = tokio::try_join!(client.nodes(), client.shards(), client.ranges())
                .context("cannot read the cluster status")?;
            #[derive(Serialize)]
            struct Status<'a> {
                nodes: &'a [cleave_client::NodeStatus],
                shards: &'a [cleave_client::ShardStatus],
                ranges: &'a [cleave_client::RangeDescriptor],
            }
            let status = Status { nodes: &nodes, shards: &shards, ranges: &ranges };
            print(out, &status, || format::status(&nodes, &shards, &ranges))
        }
        Command::Split { key, range, no_wait } => {
            let id = match (key, range) {
                (Some(key), _) => client.split_at(&key).await,
                (None, Some(range)) => client.split_range(range).await,
                (None, None) => anyhow::bail!("give a key or --range"),
            }
            .context("cannot start the split")?;
            run_operation(&client, out, "split", id, no_wait).await
        }
        Command::Merge { range_id, no_wait } => {
            let id = client.merge_range(range_id).await.context("cannot start the merge")?;
            run_operation(&client, out, "merge", id, no_wait).await
        }
        Command::Move { shard, from_node, to_node, no_wait } => {
            let id = client.move_replica(shard, from_node, to_node).await.context("cannot start the move")?;
            run_operation(&client, out, "move", id, no_wait).await
        }
        Command::TransferLeader { shard, to_node } => {
            let leader = client
                .transfer_leader(shard, to_node)
                .await
                .with_context(|| format!("cannot make node {to_node} the leader of shard {shard}"))?;
            let answer = TransferLeaderResponse { shard_id: shard, leader };
            print(out, &answer, || format!("{}: node {leader} leads now", operations::shard_label(shard)))
        }
        Command::Decommission { node, no_wait } => {
            let started =
                client.decommission(node).await.with_context(|| format!("cannot decommission node {node}"))?;
            if no_wait {
                return print(out, &started, || nodes::decommission_started(&started));
            }
            if out == Output::Text {
                eprintln!("{}", nodes::decommission_started(&started));
            }
            let began = Instant::now();
            let last = follow::follow_decommission(&client, &started, out == Output::Json).await?;
            print(out, &last, || nodes::decommission_done(&last, began.elapsed()))
        }
        Command::Ops(OpsArgs { action: Some(OpsAction::Cancel { id }), .. }) | Command::Cancel { id } => {
            let view = client.cancel_operation(id).await.with_context(|| format!("cannot cancel operation {id}"))?;
            print(out, &view, || operations::details(&view))
        }
        Command::Ops(OpsArgs { action: None, id: None, .. }) => {
            let mut ops = client.operations().await.context("cannot list the operations")?;
            ops.sort_by_key(|v| v.op.op_id);
            print(out, &ops, || operations::ops_table(&ops))
        }
        Command::Ops(OpsArgs { action: None, id: Some(id), no_wait }) => {
            let view: OperationView = client.operation(id).await.with_context(|| format!("operation {id}"))?;
            let view = if no_wait || view.op.phase.is_terminal() {
                view
            } else {
                follow::follow(&client, id, out == Output::Json).await?
            };
            print(out, &view, || operations::details(&view))
        }
    }
}

/// After a split or move was started as operation `id`: prints its id and
/// returns (`no_wait`), or follows it to the end and prints it; an aborted
/// one is an [`Aborted`] error.
async fn run_operation(client: &Client, out: Output, what: &str, id: OpId, no_wait: bool) -> Result<()> {
    if no_wait {
        return print(out, &OperationStarted { operation_id: id }, || id.to_string());
    }
    if out == Output::Text {
        eprintln!("{what} started: operation {id}");
    }
    let view = follow::follow(client, id, out == Output::Json).await?;
    print(out, &view, || operations::details(&view))?;
    match view.op.phase {
        Phase::Aborted => {
            Err(Aborted { id, reason: view.op.error.clone().unwrap_or_else(|| "no reason given".into()) }.into())
        }
        _ => Ok(()),
    }
}

/// Prints `value` as JSON, or the text `render` makes.
fn print<T: Serialize>(out: Output, value: &T, render: impl FnOnce() -> String) -> Result<()> {
    let text = match out {
        Output::Json => serde_json::to_string_pretty(value).context("cannot encode the output")?,
        Output::Text => render(),
    };
    if text.is_empty() {
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}") {
        // The reader went away (`cleave ops | head`): not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("cannot write to stdout"),
    }
}

fn lines(page: &ScanResult) -> String {
    page.items.iter().map(format::item_line).collect::<Vec<_>>().join("\n")
}

/// Parses `1500ms`, `15s`, `2m` or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(Duration::from_secs_f64(v * scale)),
        _ => Err(format!("{s:?} is not a positive duration like 15s or 500ms")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn command_line_parses() {
        let cli =
            Cli::try_parse_from(["cleave", "--endpoints", "a:1,b:2", "put", "k", "-5", "--if-version", "0"]).unwrap();
        assert_eq!(cli.endpoints, vec!["a:1", "b:2"]);
        match cli.command {
            Command::Put { key, value, if_version } => {
                assert_eq!((key, value, if_version), ("k".into(), "-5".into(), Some(0)))
            }
            c => panic!("{c:?}"),
        }
        let cli = Cli::try_parse_from(["cleave", "scan", "--all", "--output", "json"]).unwrap();
        assert_eq!(cli.output, Output::Json);
        assert!(matches!(cli.command, Command::Scan { all: true, .. }));
        Cli::command_for_tests().debug_assert();
    }

    #[test]
    fn operations_commands_parse() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.command);
        assert!(
            matches!(parse(&["cleave", "split", "user5"]), Ok(Command::Split { key: Some(k), range: None, no_wait: false }) if k == "user5")
        );
        assert!(matches!(
            parse(&["cleave", "split", "--range", "3", "--no-wait"]),
            Ok(Command::Split { key: None, range: Some(3), no_wait: true })
        ));
        assert!(matches!(parse(&["cleave", "merge", "4"]), Ok(Command::Merge { range_id: 4, no_wait: false })));
        assert!(parse(&["cleave", "merge"]).is_err(), "the range is required");
        assert!(matches!(
            parse(&["cleave", "merge", "4", "--no-wait"]),
            Ok(Command::Merge { range_id: 4, no_wait: true })
        ));
        assert!(parse(&["cleave", "split"]).is_err(), "a key or --range is required");
        assert!(parse(&["cleave", "split", "k", "--range", "3"]).is_err(), "not both");
        assert!(matches!(parse(&["cleave", "ops"]), Ok(Command::Ops(OpsArgs { action: None, id: None, .. }))));
        assert!(matches!(
            parse(&["cleave", "ops", "12", "--no-wait"]),
            Ok(Command::Ops(OpsArgs { action: None, id: Some(12), no_wait: true }))
        ));
        assert!(matches!(
            parse(&["cleave", "ops", "cancel", "12"]),
            Ok(Command::Ops(OpsArgs { action: Some(OpsAction::Cancel { id: 12 }), .. }))
        ));
        assert!(matches!(parse(&["cleave", "cancel", "4"]), Ok(Command::Cancel { id: 4 })));
        assert!(parse(&["cleave", "ops", "--no-wait"]).is_err(), "--no-wait needs an id");
    }

    #[test]
    fn move_transfer_and_decommission_commands_parse() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.command);
        assert!(matches!(
            parse(&["cleave", "move", "3", "1", "4"]),
            Ok(Command::Move { shard: 3, from_node: 1, to_node: 4, no_wait: false })
        ));
        assert!(matches!(
            parse(&["cleave", "move", "0", "2", "5", "--no-wait"]),
            Ok(Command::Move { shard: 0, from_node: 2, to_node: 5, no_wait: true })
        ));
        assert!(parse(&["cleave", "move", "3", "1"]).is_err(), "the target node is required");
        assert!(parse(&["cleave", "move", "3", "1", "x"]).is_err(), "node ids are numbers");
        assert!(parse(&["cleave", "move", "3", "1", "4", "5"]).is_err());
        assert!(matches!(
            parse(&["cleave", "transfer-leader", "3", "4"]),
            Ok(Command::TransferLeader { shard: 3, to_node: 4 })
        ));
        assert!(parse(&["cleave", "transfer-leader", "3"]).is_err(), "the node is required");
        assert!(parse(&["cleave", "transfer-leader", "3", "4", "--no-wait"]).is_err(), "it always waits");
        assert!(matches!(
            parse(&["cleave", "decommission", "4"]),
            Ok(Command::Decommission { node: 4, no_wait: false })
        ));
        assert!(matches!(
            parse(&["cleave", "--output", "json", "decommission", "--no-wait", "4"]),
            Ok(Command::Decommission { node: 4, no_wait: true })
        ));
        assert!(parse(&["cleave", "decommission"]).is_err(), "the node is required");
        assert!(parse(&["cleave", "decommission", "-1"]).is_err(), "node ids are not negative");
    }

    #[test]
    fn exit_codes_follow_the_error() {
        assert_eq!(exit_code(&anyhow::Error::new(Error::NotFound)), 3);
        assert_eq!(exit_code(&anyhow::Error::new(Error::VersionConflict { current: 2 }).context("while putting")), 4);
        assert_eq!(exit_code(&anyhow::anyhow!("boom")), 1);
        assert_eq!(exit_code(&anyhow::Error::new(Aborted { id: 1, reason: "x".into() })), 7);
        let interrupted = follow::Interrupted { what: "operation 1".into(), see: "cleave ops 1".into() };
        assert_eq!(exit_code(&anyhow::Error::new(interrupted)), 130);
        let indeterminate = Error::Indeterminate("no answer".into());
        assert_eq!(exit_code(&anyhow::Error::new(indeterminate).context("cannot start the move")), 5);
    }

    impl Cli {
        fn command_for_tests() -> clap::Command {
            <Cli as clap::CommandFactory>::command()
        }
    }
}
