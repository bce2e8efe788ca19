//! Group commit: one WAL fsync acknowledges the appends of many groups.
//!
//! Raft log appends are written to RocksDB without `sync`, which only puts
//! them in the WAL's OS buffer. The append is not reported flushed to
//! openraft until a [`Syncer`] round has fsync'd the WAL *after* the write.
//! Waiters that arrive while a sync is running are served by the next one,
//! so under load each fsync covers everything that queued behind it — across
//! all groups of the node — and a write is acknowledged only once it is on
//! disk, never before.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::Db;

type Done = Box<dyn FnOnce(Result<(), std::io::Error>) + Send>;

/// Handle to the node's WAL sync task.
#[derive(Clone)]
pub struct Syncer {
    tx: mpsc::UnboundedSender<Done>,
}

impl Syncer {
    /// Starts the sync task for `db`.
    pub fn start(db: Arc<Db>) -> Syncer {
        let (tx, mut rx) = mpsc::unbounded_channel::<Done>();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while rx.recv_many(&mut batch, 4096).await > 0 {
                let db = db.clone();
                let result = tokio::task::spawn_blocking(move || db.flush_wal(true))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r.map_err(super::io_err));
                metrics::counter!("cleave_wal_syncs_total").increment(1);
                metrics::histogram!("cleave_wal_sync_batch").record(batch.len() as f64);
                for done in batch.drain(..) {
                    done(result.as_ref().map(|_| ()).map_err(|e| std::io::Error::new(e.kind(), e.to_string())));
                }
            }
        });
        Syncer { tx }
    }

    /// Calls `done` once every write issued before this call is durable.
    pub fn after_sync(&self, done: impl FnOnce(Result<(), std::io::Error>) + Send + 'static) {
        if let Err(mpsc::error::SendError(done)) = self.tx.send(Box::new(done)) {
            done(Err(std::io::Error::other("syncer stopped")));
        }
    }

    /// Waits until every write issued before this call is durable.
    pub async fn sync(&self) -> Result<(), std::io::Error> {
        let (tx, rx) = oneshot::channel();
        self.after_sync(move |r| {
            let _ = tx.send(r);
        });
        rx.await.map_err(|_| std::io::Error::other("syncer stopped"))?
    }
}
