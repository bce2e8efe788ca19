//! Client settings: timeouts, the retry budget and routing.
//!
//! Three clocks bound a request. `connect_timeout` bounds opening one
//! connection (a dead node answers "refused" at once, but an unreachable
//! host only times out). `attempt_timeout` bounds one attempt end to end,
//! which catches a paused or partitioned node; its default is a little
//! longer than the server's own request timeout (10 s), so that a slow write
//! normally gets the server's definite answer (504 or 503) rather than a
//! client-side timeout, which for a write is indeterminate.
//! `deadline` bounds the whole
//! request including every retry and wait, so a caller always gets an answer
//! (possibly [`crate::Error::Unavailable`]) within it.
//!
//! Settings are plain fields with a [`Default`]; the `with_*` methods allow
//! chaining: `ClientOptions::default().with_deadline(Duration::from_secs(5))`.

use std::time::Duration;

use crate::retry::RetryPolicy;

/// Settings of a [`crate::Client`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Bound on opening one TCP connection.
    pub connect_timeout: Duration,
    /// Bound on one attempt (connect, send, wait, read the answer).
    pub attempt_timeout: Duration,
    /// Bound on a whole request, retries and waits included.
    pub deadline: Duration,
    /// Bound on fetching the directory from one node during a refresh.
    pub refresh_timeout: Duration,
    /// Refresh the routing cache in the background once it is this old,
    /// even without any failure (leaders move).
    pub cache_ttl: Duration,
    /// Retry budget and backoff.
    pub retry: RetryPolicy,
    /// Send key requests straight to the shard leader using the routing
    /// cache (loaded on first use). When off, requests go to the seeds in
    /// turn and the nodes forward them, which saves the two requests that
    /// load the cache: the right choice for a one-shot tool. Either way the
    /// cache is refreshed after a failure, to discover other nodes.
    pub smart_routing: bool,
    /// The bearer token sent with every request (a node started with
    /// `--tokens-file` answers 401 without one).
    pub token: Option<BearerToken>,
    /// PEM of the CA that signed the nodes' certificates: the client then
    /// speaks HTTPS (to `host:port` endpoints and to every node the
    /// directory names) and trusts only that CA.
    pub ca_cert: Option<Vec<u8>>,
}

/// A bearer token: never printed (`Debug` shows only that there is one).
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(pub String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(1),
            attempt_timeout: Duration::from_secs(11),
            deadline: Duration::from_secs(15),
            refresh_timeout: Duration::from_secs(1),
            cache_ttl: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            smart_routing: true,
            token: None,
            ca_cert: None,
        }
    }
}

impl ClientOptions {
    pub fn with_connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    pub fn with_attempt_timeout(mut self, d: Duration) -> Self {
        self.attempt_timeout = d;
        self
    }

    pub fn with_deadline(mut self, d: Duration) -> Self {
        self.deadline = d;
        self
    }

    pub fn with_refresh_timeout(mut self, d: Duration) -> Self {
        self.refresh_timeout = d;
        self
    }

    pub fn with_cache_ttl(mut self, d: Duration) -> Self {
        self.cache_ttl = d;
        self
    }

    pub fn with_max_retries(mut self, n: u32) -> Self {
        self.retry.max_retries = n;
        self
    }

    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.retry.min_backoff = min;
        self.retry.max_backoff = max;
        self
    }

    pub fn with_smart_routing(mut self, on: bool) -> Self {
        self.smart_routing = on;
        self
    }

    /// Speaks HTTPS, trusting only the CA whose PEM is `pem` (`None`: plain HTTP).
    pub fn with_ca_cert(mut self, pem: Option<Vec<u8>>) -> Self {
        self.ca_cert = pem;
        self
    }

    /// Sends `token` (`None`: no token) as `Authorization: Bearer <token>`.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.map(BearerToken);
        self
    }
}
