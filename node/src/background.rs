//! Bulk work at a low CPU priority: a split's backfill (reading the range,
//! writing its table files, reading them for sending, staging them at the
//! receivers) runs on threads of its own at `nice` [`NICE`], so that on a
//! busy node the foreground's threads — the runtime serving requests, Raft,
//! the WAL syncs — get most of the cores and the copy a share of what is
//! contended. On an idle node the copy runs as fast as ever: priority only
//! matters when there is a queue.
//!
//! Why 10 and not 19: under 16 writers on a 2-core box, `nice` 19 made the
//! copy a fifth slower and the foreground no faster (the rest of what
//! slows it is not in these threads: the runtime's RPC work, the writes
//! forwarded to the target, the disk).
//!
//! The byte rate of the copy is bounded as well (`--split-backfill-rate`),
//! for the disk's sake; the priority is the CPU share.

use tokio::sync::oneshot;

/// The scheduling priority of bulk threads (0 is the default, 19 the lowest).
pub const NICE: i32 = 10;

/// Starts `f` at once on a new thread at priority [`NICE`]; its result
/// comes through the returned future (an error if `f` panicked or the
/// thread could not start). Like `spawn_blocking`, the work runs whether or
/// not the future is polled.
pub fn run<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> impl std::future::Future<Output = Result<T, std::io::Error>> {
    let (tx, rx) = oneshot::channel();
    let started = std::thread::Builder::new().name("cleave-bulk".into()).spawn(move || {
        lower_priority();
        let _ = tx.send(f());
    });
    async move {
        started?;
        rx.await.map_err(|_| std::io::Error::other("a background task panicked"))
    }
}

/// Gives the calling thread priority [`NICE`]. Best effort: a refusal only
/// costs the foreground some CPU.
#[cfg(target_os = "linux")]
fn lower_priority() {
    // On Linux a thread is a task of its own: PRIO_PROCESS with its id
    // applies to this thread alone.
    // SAFETY: gettid and setpriority take and return plain integers.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, NICE) };
    if rc != 0 {
        tracing::debug!("lowering a bulk thread's priority: {}", std::io::Error::last_os_error());
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn runs_the_work_at_a_low_priority_and_hands_back_its_result() {
        let (value, nice) = super::run(|| {
            // SAFETY: as above.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
            (42, nice)
        })
        .await
        .unwrap();
        assert_eq!(value, 42);
        assert!(nice >= super::NICE, "nice {nice}");
    }

    #[tokio::test]
    async fn the_work_starts_before_its_future_is_polled() {
        let (tx, rx) = std::sync::mpsc::channel();
        let done = super::run(move || tx.send(()).unwrap());
        // The work must not wait for `done` to be awaited (a caller may
        // wait for what the work sends before it awaits the result).
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the work ran");
        done.await.unwrap();
    }

    #[tokio::test]
    async fn a_panic_is_an_error_not_a_hang() {
        let r = super::run(|| -> u8 { panic!("boom") }).await;
        assert!(r.is_err());
    }
}
