//! A replica's incarnation: the right of its tasks to write to storage.
//!
//! openraft's `shutdown` joins its core task only. The state-machine worker
//! can still be applying a batch or installing a snapshot, and the snapshot
//! builder can still be writing a file, when the node goes on to delete the
//! replica's data (a move's source, replica GC) or to replace it with a new
//! replica of the same group. A late write of that dead incarnation would
//! bring deleted keys back, overwrite the new replica's applied index or
//! state, or leave an install marker whose file is gone.
//!
//! So every storage write of a replica's tasks goes through
//! [`Incarnation::write`], which holds a read lock while the write runs, and
//! [`Incarnation::end`] takes the write lock: once `end` returns, no write of
//! the old incarnation is running or can start, and the data may go.

use std::io;
use std::sync::RwLock;

/// Whether a replica's tasks may still write; see the module doc.
#[derive(Debug, Default)]
pub struct Incarnation {
    ended: RwLock<bool>,
}

impl Incarnation {
    /// Runs the storage write `f` unless the incarnation has ended.
    pub fn write<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let ended = self.ended.read().map_err(|_| io::Error::other("incarnation lock poisoned"))?;
        if *ended {
            return Err(io::Error::other("the replica was stopped: its incarnation has ended"));
        }
        f()
    }

    /// Ends the incarnation: waits for a running write, refuses all later ones.
    pub fn end(&self) {
        match self.ended.write() {
            Ok(mut e) => *e = true,
            Err(p) => *p.into_inner() = true,
        }
    }

    pub fn has_ended(&self) -> bool {
        self.ended.read().map_or(true, |e| *e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_write_runs_after_the_end() {
        let inc = Incarnation::default();
        assert_eq!(inc.write(|| Ok(1)).unwrap(), 1);
        inc.end();
        let mut ran = false;
        assert!(inc
            .write(|| {
                ran = true;
                Ok(())
            })
            .is_err());
        assert!(!ran);
        assert!(inc.has_ended());
    }

    #[test]
    fn end_waits_for_a_running_write() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let inc = Arc::new(Incarnation::default());
        let finished = Arc::new(AtomicBool::new(false));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let writer = {
            let (inc, finished) = (inc.clone(), finished.clone());
            std::thread::spawn(move || {
                inc.write(|| {
                    started_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    finished.store(true, Ordering::SeqCst);
                    Ok(())
                })
            })
        };
        started_rx.recv().unwrap();
        let ender = {
            let inc = inc.clone();
            std::thread::spawn(move || inc.end())
        };
        // Give a wrong `end` (one that does not wait) the chance to return
        // while the write is held: poll it, with a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
        while !ender.is_finished() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(!ender.is_finished(), "end() returned while a write was running");
        go_tx.send(()).unwrap();
        ender.join().unwrap();
        assert!(finished.load(Ordering::SeqCst), "end() returned while a write was still running");
        writer.join().unwrap().unwrap();
    }
}
