//! Polling with a deadline: the only way tests wait for the cluster.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Interval between two polls.
const POLL: Duration = Duration::from_millis(50);

/// Polls `check` until it returns `true`; panics naming `what` if `timeout`
/// passes first.
pub async fn wait_until<F, Fut>(timeout: Duration, what: impl Display, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(timeout, what, || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Polls `check` until it returns `Some(value)` and returns the value; panics
/// naming `what` if `timeout` passes first.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: impl Display, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        // A poll that hangs must not outlive the deadline.
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(Some(v)) = tokio::time::timeout(left.max(POLL), check()).await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {:.1?} waiting for {what}", start.elapsed());
        }
        tokio::time::sleep(POLL).await;
    }
}
