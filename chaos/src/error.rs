//! The library's errors. Anomalies in the database are *not* errors: they
//! are findings, reported in the summary. Errors are what stops the suite
//! from running or judging a run at all.

use std::path::PathBuf;

/// Why the suite could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad flags or an impossible combination of them.
    #[error("configuration: {0}")]
    Config(String),
    /// A system command (ip, nft, …) failed.
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    /// Network namespaces are needed (partitions) and cannot be made here.
    #[error("network namespaces are unavailable ({0}); the partition nemesis needs root and `ip netns`: run as root, or leave `partition` out of --nemesis")]
    NoNamespaces(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A node process could not be started or stopped.
    #[error("node {node}: {message}")]
    Node { node: u64, message: String },
    /// The cluster did not come up (or back) in time.
    #[error("cluster not ready: {0}")]
    NotReady(String),
    /// An HTTP request to the cluster failed where the runner needed it to work.
    #[error("HTTP {0}")]
    Http(String),
    /// The run was interrupted (Ctrl-C, SIGTERM).
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io { path: path.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
