//! A watch kept running in the background while a test does other things:
//! every event it delivers is collected, and the test can wait until it is
//! established (its first progress line) before writing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cleave_client::{Client, WatchEvent, WatchRequest};
use futures::StreamExt;

use crate::{secs, wait_until};

/// A background watch and what it has seen so far.
pub struct Watching {
    pub seen: Arc<Mutex<Vec<WatchEvent>>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Watching {
    /// Starts watching `req` through `client` and waits (20 s at most)
    /// until the watch is established. The task panics if the watch ends
    /// with an error: a test's watch must go on through whatever it does.
    pub async fn start(client: &Client, req: WatchRequest) -> Watching {
        let seen: Arc<Mutex<Vec<WatchEvent>>> = Arc::default();
        let established = Arc::new(AtomicBool::new(false));
        let task = {
            let (seen, established) = (seen.clone(), established.clone());
            let mut events = Box::pin(client.watch(req));
            tokio::spawn(async move {
                while let Some(e) = events.next().await {
                    let e = e.expect("the watch goes on");
                    if matches!(e, WatchEvent::Progress { .. }) {
                        established.store(true, Ordering::SeqCst);
                    }
                    seen.lock().unwrap().push(e);
                }
            })
        };
        wait_until(secs(20), "the watch is established", || async { established.load(Ordering::SeqCst) }).await;
        Watching { seen, task }
    }
}
