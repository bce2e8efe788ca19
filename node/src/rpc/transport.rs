//! A multiplexed RPC transport: one TCP connection per peer (and lane), many requests
//! in flight on it at once.
//!
//! Frames are `u32 length | u64 request id | bincode body`. A writer task per
//! connection coalesces queued frames into one socket write; a reader task
//! routes each answer to the caller waiting on its id. A broken connection
//! fails every call in flight on it and is re-dialled by the next call.
//!
//! A connection can also die silently: across a network partition no FIN
//! or RST arrives, and TCP's retransmission back-off would keep the old
//! connection useless long after the network heals. So a call that times
//! out on a connection that has received nothing for [`SILENT_DEAD`] drops
//! the connection, and the next call dials afresh; TCP keepalive reaps what
//! the server side holds.
//!
//! With a cluster secret, each connection starts with the mutual handshake
//! of `security::handshake` on both sides before any frame: a peer that
//! fails it, or later sends a frame that does not decode, is disconnected.
//!
//! Bulk transfers (Raft snapshot chunks of 1 MiB, split backfill chunks of
//! 4 MiB) take a second
//! connection per peer, [`Lane::Bulk`], as TiKV sends snapshots apart from
//! its Raft messages: queued behind chunks, heartbeats and appends would
//! time out, and a connection dropped for silence would take a snapshot
//! transfer of many seconds down with it (the receiver then installs one
//! snapshot and is sent the next, seen during replica moves).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::{Request, Response};
use crate::security::tls::{self, Tls};
use crate::security::{handshake, Secret};

/// The two halves of a connection, plain TCP or TLS alike.
type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

fn plain_halves(stream: TcpStream) -> (Reader, Writer) {
    let (r, w) = stream.into_split();
    (Box::new(r), Box::new(w))
}

fn halves<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(stream: S) -> (Reader, Writer) {
    let (r, w) = tokio::io::split(stream);
    (Box::new(r), Box::new(w))
}

/// What a node's RPC connections prove: the cluster secret, mutual TLS,
/// both or neither.
#[derive(Clone, Default)]
pub struct Security {
    pub secret: Option<Arc<Secret>>,
    pub tls: Option<Arc<Tls>>,
}

impl Security {
    pub fn new(secret: Option<Secret>, tls: Option<Arc<Tls>>) -> Security {
        Security { secret: secret.map(Arc::new), tls: tls.filter(|t| t.mutual()) }
    }
}

/// Largest frame accepted (snapshot chunks are 1 MiB; log batches are bounded).
const MAX_FRAME: usize = crate::codec::DECODE_LIMIT;
/// The most memory a frame's body takes before its bytes arrive: a split's
/// backfill chunk and what goes around it.
const FRAME_STEP: usize = crate::split::sst::CHUNK_BYTES + (64 << 10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on a whole dial: connecting, then TLS and the secret's handshake
/// (a peer that accepts but never answers, e.g. a paused process).
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Most accepted connections still in their TLS or secret handshake.
pub const MAX_PROVING: usize = 256;
/// A connection silent this long when a call on it times out is dropped.
/// Not shortened for calls with a short timeout: a busy peer that misses a
/// heartbeat's few hundred milliseconds is not a dead connection.
const SILENT_DEAD: Duration = Duration::from_secs(2);

/// Which of the two connections to a peer a call travels on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Raft messages and node requests: small and latency-bound.
    Default,
    /// Snapshot chunks: large, and slow to answer while the receiver installs.
    Bulk,
}

/// Keepalive probes so a peer that vanished is noticed by the kernel.
fn keepalive(stream: &TcpStream) {
    let ka = socket2::TcpKeepalive::new().with_time(Duration::from_secs(5)).with_interval(Duration::from_secs(2));
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!("tcp keepalive: {e}");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("cannot connect to {addr}: {msg}")]
    Connect { addr: String, msg: String },
    #[error("connection to {0} closed")]
    Closed(String),
    #[error("request to {0} timed out")]
    Timeout(String),
    #[error("codec: {0}")]
    Codec(String),
    #[error("handshake with {addr}: {err}")]
    Handshake { addr: String, err: handshake::HandshakeError },
    #[error("TLS with {addr}: {err}")]
    Tls { addr: String, err: String },
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, RpcError> {
    crate::codec::encode(v).map_err(|e| RpcError::Codec(e.to_string()))
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, RpcError> {
    crate::codec::decode(b).map_err(|e| RpcError::Codec(e.to_string()))
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;
/// Open connections by peer address, one slot per lane (indexed by
/// `Lane as usize`, so a lookup needs no owned key).
type Conns = HashMap<String, [Option<Arc<Conn>>; 2]>;
/// The dial in progress per (peer address, lane), one at a time.
type DialGates = HashMap<(String, usize), Arc<tokio::sync::Mutex<()>>>;

struct Conn {
    tx: mpsc::UnboundedSender<(u64, Vec<u8>)>,
    pending: Pending,
    closed: Arc<AtomicBool>,
    /// When a frame last arrived.
    last_recv: Arc<Mutex<std::time::Instant>>,
    tasks: [tokio::task::AbortHandle; 2],
}

impl Conn {
    /// Gives up on the connection: stops its tasks (closing the socket) and
    /// fails the calls waiting on it.
    fn kill(&self) {
        self.closed.store(true, Ordering::Release);
        for t in &self.tasks {
            t.abort();
        }
        self.pending.lock().unwrap().clear();
    }
}

/// Client side: cheap to clone, shared by every group on the node.
#[derive(Clone, Default)]
pub struct Transport {
    conns: Arc<Mutex<Conns>>,
    /// One dial at a time per peer and lane, without holding `conns`: a
    /// peer slow to connect or to handshake delays only its own calls.
    dialling: Arc<Mutex<DialGates>>,
    next_id: Arc<AtomicU64>,
    /// What every connection proves (see [`Security`]).
    security: Security,
}

async fn write_loop(stream: Writer, mut rx: mpsc::UnboundedReceiver<(u64, Vec<u8>)>) {
    let mut w = BufWriter::with_capacity(256 << 10, stream);
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 256).await > 0 {
        for (id, body) in batch.drain(..) {
            let len = (body.len() + 8) as u32;
            if w.write_all(&len.to_be_bytes()).await.is_err()
                || w.write_all(&id.to_be_bytes()).await.is_err()
                || w.write_all(&body).await.is_err()
            {
                return;
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
}

async fn read_frame(r: &mut BufReader<Reader>) -> std::io::Result<(u64, Vec<u8>)> {
    let len = r.read_u32().await? as usize;
    if !(8..=MAX_FRAME).contains(&len) {
        return Err(std::io::Error::other(format!("bad frame length {len}")));
    }
    let id = r.read_u64().await?;
    // Memory grows with the bytes that actually arrive (reserved ahead by at
    // most `FRAME_STEP`, then doubling), not with what the length prefix
    // claims: a 12-byte header must not make the node hold 256 MiB. A frame
    // within one step (a backfill chunk) is read into memory allocated once.
    let want = len - 8;
    let mut body = Vec::with_capacity(want.min(FRAME_STEP));
    while body.len() < want {
        if body.len() == body.capacity() {
            body.reserve_exact(body.len().min(want - body.len()));
        }
        let room = (body.capacity() - body.len()).min(want - body.len());
        if (&mut *r).take(room as u64).read_buf(&mut body).await? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "frame cut short"));
        }
    }
    Ok((id, body))
}

impl Transport {
    pub fn new() -> Transport {
        Transport::default()
    }

    /// A transport whose connections prove what `security` holds.
    pub fn with_security(security: Security) -> Transport {
        Transport { security, ..Transport::default() }
    }

    /// The cluster secret this transport's connections prove.
    pub fn secret(&self) -> Option<&Secret> {
        self.security.secret.as_deref()
    }

    /// Opens a connection to `addr` and proves what it must.
    async fn dial(&self, addr: &str) -> Result<(Reader, Writer), RpcError> {
        let connect_err = |msg: String| RpcError::Connect { addr: addr.to_string(), msg };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err("timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        stream.set_nodelay(true).ok();
        keepalive(&stream);
        let refused = |err: handshake::HandshakeError| {
            tracing::warn!(addr, "rpc handshake: {err}");
            RpcError::Handshake { addr: addr.to_string(), err }
        };
        match self.security.tls.as_ref().and_then(|t| t.rpc_connector()) {
            Some(connector) => {
                let tls_err = |err: String| {
                    tracing::warn!(addr, "rpc TLS: {err}");
                    RpcError::Tls { addr: addr.to_string(), err }
                };
                let name = tls::server_name(addr).map_err(|e| tls_err(e.to_string()))?;
                let mut s = tokio::time::timeout(handshake::HANDSHAKE_TIMEOUT, connector.connect(name, stream))
                    .await
                    .map_err(|_| tls_err("timed out".into()))?
                    .map_err(|e| tls_err(e.to_string()))?;
                if let Some(secret) = &self.security.secret {
                    handshake::dial(&mut s, secret).await.map_err(refused)?;
                }
                Ok(halves(s))
            }
            None => {
                let mut s = stream;
                if let Some(secret) = &self.security.secret {
                    handshake::dial(&mut s, secret).await.map_err(refused)?;
                }
                Ok(plain_halves(s))
            }
        }
    }

    /// The open connection to `addr` on `lane`, if there is one.
    fn open_conn(&self, addr: &str, lane: Lane) -> Option<Arc<Conn>> {
        let conns = self.conns.lock().unwrap();
        conns.get(addr).and_then(|slots| slots[lane as usize].clone()).filter(|c| !c.closed.load(Ordering::Acquire))
    }

    async fn conn(&self, addr: &str, lane: Lane) -> Result<Arc<Conn>, RpcError> {
        if let Some(c) = self.open_conn(addr, lane) {
            return Ok(c);
        }
        let gate = self.dialling.lock().unwrap().entry((addr.to_string(), lane as usize)).or_default().clone();
        let _dialling = gate.lock().await;
        // Another call may have dialled while this one waited.
        if let Some(c) = self.open_conn(addr, lane) {
            return Ok(c);
        }
        let (r, w) = tokio::time::timeout(DIAL_TIMEOUT, self.dial(addr)).await.map_err(|_| RpcError::Connect {
            addr: addr.to_string(),
            msg: "connected, but the handshake timed out".into(),
        })??;
        let (tx, rx) = mpsc::unbounded_channel();
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let last_recv = Arc::new(Mutex::new(std::time::Instant::now()));
        let writer = tokio::spawn(write_loop(w, rx)).abort_handle();
        let reader = {
            let (pending, closed, last_recv) = (pending.clone(), closed.clone(), last_recv.clone());
            tokio::spawn(async move {
                let mut r = BufReader::with_capacity(256 << 10, r);
                while let Ok((id, body)) = read_frame(&mut r).await {
                    *last_recv.lock().unwrap() = std::time::Instant::now();
                    let Ok(resp) = decode::<Response>(&body) else { break };
                    if let Some(tx) = pending.lock().unwrap().remove(&id) {
                        let _ = tx.send(resp);
                    }
                }
                closed.store(true, Ordering::Release);
                pending.lock().unwrap().clear();
            })
            .abort_handle()
        };
        let conn = Arc::new(Conn { tx, pending, closed, last_recv, tasks: [writer, reader] });
        self.conns.lock().unwrap().entry(addr.to_string()).or_default()[lane as usize] = Some(conn.clone());
        Ok(conn)
    }

    /// Sends `req` to the node at `addr` and waits up to `timeout` for its answer.
    pub async fn call(&self, addr: &str, req: Request, timeout: Duration) -> Result<Response, RpcError> {
        self.call_on(Lane::Default, addr, req, timeout).await
    }

    /// [`Transport::call`] on the connection of `lane`.
    pub async fn call_on(&self, lane: Lane, addr: &str, req: Request, timeout: Duration) -> Result<Response, RpcError> {
        let body = encode(&req)?;
        // The call's time bounds the dial too (a paused peer accepts, then
        // never answers the handshake).
        let started = std::time::Instant::now();
        let conn = tokio::time::timeout(timeout, self.conn(addr, lane))
            .await
            .map_err(|_| RpcError::Timeout(addr.to_string()))??;
        let timeout = timeout.saturating_sub(started.elapsed());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().unwrap().insert(id, tx);
        if conn.closed.load(Ordering::Acquire) || conn.tx.send((id, body)).is_err() {
            conn.pending.lock().unwrap().remove(&id);
            return Err(RpcError::Closed(addr.to_string()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(_)) => Err(RpcError::Closed(addr.to_string())),
            Err(_) => {
                conn.pending.lock().unwrap().remove(&id);
                let silent = conn.last_recv.lock().unwrap().elapsed();
                if silent >= SILENT_DEAD {
                    tracing::debug!(addr, ?silent, "dropping a silent connection");
                    conn.kill();
                }
                Err(RpcError::Timeout(addr.to_string()))
            }
        }
    }
}

/// The listening side of [`Transport::dial`]: TLS (verifying the peer's
/// certificate), then the secret's handshake, as configured.
async fn accept(stream: TcpStream, security: &Security) -> Result<(Reader, Writer), String> {
    match security.tls.as_ref().and_then(|t| t.rpc_acceptor()) {
        Some(acceptor) => {
            let mut s = tokio::time::timeout(handshake::HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                .await
                .map_err(|_| "TLS handshake timed out".to_string())?
                .map_err(|e| format!("TLS: {e}"))?;
            if let Some(secret) = &security.secret {
                handshake::accept(&mut s, secret).await.map_err(|e| e.to_string())?;
            }
            Ok(halves(s))
        }
        None => {
            let mut s = stream;
            if let Some(secret) = &security.secret {
                handshake::accept(&mut s, secret).await.map_err(|e| e.to_string())?;
            }
            Ok(plain_halves(s))
        }
    }
}

/// Handles one request on the server side.
pub type Handler = Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// Accepts connections on `listener` forever, answering each request with
/// `handler`. Requests on one connection are handled concurrently. A
/// connection is served only once its peer proved what `security` asks.
pub async fn serve(listener: TcpListener, handler: Handler, security: Security) {
    // Connections still proving themselves are bounded: strangers that
    // connect and say nothing cannot hold every file descriptor.
    let proving = Arc::new(tokio::sync::Semaphore::new(MAX_PROVING));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("rpc accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        stream.set_nodelay(true).ok();
        keepalive(&stream);
        let Ok(permit) = proving.clone().try_acquire_owned() else {
            metrics::counter!("cleave_rpc_handshakes_refused_total").increment(1);
            tracing::warn!(%peer, "rpc connection refused: {MAX_PROVING} others are still in their handshake");
            continue;
        };
        let (handler, security) = (handler.clone(), security.clone());
        tokio::spawn(async move {
            let accepted = accept(stream, &security).await;
            drop(permit);
            let (r, w) = match accepted {
                Ok(halves) => halves,
                Err(e) => {
                    metrics::counter!("cleave_rpc_handshakes_refused_total").increment(1);
                    tracing::warn!(%peer, "rpc connection refused: {e}");
                    return;
                }
            };
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(write_loop(w, rx));
            let mut r = BufReader::with_capacity(256 << 10, r);
            loop {
                let (id, body) = match read_frame(&mut r).await {
                    Ok(f) => f,
                    Err(_) => break,
                };
                let req = match decode::<Request>(&body) {
                    Ok(req) => req,
                    Err(e) => {
                        tracing::warn!(%peer, "undecodable rpc: {e}");
                        break;
                    }
                };
                let (handler, tx) = (handler.clone(), tx.clone());
                tokio::spawn(async move {
                    let resp = handler(req).await;
                    if let Ok(body) = encode(&resp) {
                        let _ = tx.send((id, body));
                    }
                });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::{NodeReply, NodeRequest};

    /// A server that answers a read of `key` after a delay set by the key:
    /// a peer busy with some requests (a snapshot install), quick with others.
    async fn slow_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handler: Handler = Arc::new(|req| {
            Box::pin(async move {
                let Request::Node(NodeRequest::KvRead(crate::rpc::KvRead { key, .. })) = req else {
                    panic!("unexpected {req:?}")
                };
                let delay = match key.as_str() {
                    "slow" => Duration::from_millis(1000),
                    "install" => Duration::from_millis(3000),
                    "stuck" => Duration::from_secs(30),
                    _ => Duration::ZERO,
                };
                tokio::time::sleep(delay).await; // the peer's work, not synchronisation
                Response::Node(Ok(NodeReply::KvRead(Some((1, key)))))
            })
        });
        tokio::spawn(serve(listener, handler, Security::default()));
        addr
    }

    fn read(key: &str) -> Request {
        Request::Node(NodeRequest::KvRead(crate::rpc::KvRead {
            shard: 1,
            key: key.into(),
            linearizable: false,
            hops: 0,
            budget_ms: 0,
        }))
    }

    fn answered(r: Result<Response, RpcError>, key: &str) {
        match r {
            Ok(Response::Node(Ok(NodeReply::KvRead(Some((1, k)))))) if k == key => {}
            other => panic!("{key}: {other:?}"),
        }
    }

    /// Writes a frame as `write_loop` does: length (id included), id, body.
    async fn frame(w: &mut (impl AsyncWrite + Unpin), id: u64, body: &[u8]) {
        w.write_all(&((body.len() + 8) as u32).to_be_bytes()).await.unwrap();
        w.write_all(&id.to_be_bytes()).await.unwrap();
        w.write_all(body).await.unwrap();
    }

    #[tokio::test]
    async fn frames_of_every_size_are_read_whole_and_a_cut_one_is_an_error() {
        let (mut w, r) = tokio::io::duplex(64 << 10);
        let mut r = BufReader::new(Box::new(r) as Reader);
        // Empty, small, a backfill chunk's size, and larger than one step
        // of the reader's reservation (it grows past it).
        let sizes = [0, 100, crate::split::sst::CHUNK_BYTES + 300, FRAME_STEP * 2 + 12_345];
        let bodies: Vec<Vec<u8>> = sizes.iter().map(|&n| (0..n).map(|i| (i * 31 % 251) as u8).collect()).collect();
        let sent = bodies.clone();
        let writer = tokio::spawn(async move {
            for (id, body) in sent.iter().enumerate() {
                frame(&mut w, id as u64, body).await;
            }
            // A frame whose body stops short, then the connection closes.
            w.write_all(&1008u32.to_be_bytes()).await.unwrap();
            w.write_all(&9u64.to_be_bytes()).await.unwrap();
            w.write_all(&[7u8; 10]).await.unwrap();
        });
        for (id, body) in bodies.iter().enumerate() {
            let (got_id, got) = read_frame(&mut r).await.unwrap();
            assert_eq!((got_id, got.len()), (id as u64, body.len()));
            assert!(got == *body, "frame {id} read back different bytes");
        }
        writer.await.unwrap();
        let err = read_frame(&mut r).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[tokio::test]
    async fn a_length_prefix_past_the_largest_frame_is_refused() {
        let (mut w, r) = tokio::io::duplex(1024);
        let mut r = BufReader::new(Box::new(r) as Reader);
        w.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        w.write_all(&1u64.to_be_bytes()).await.unwrap();
        let err = read_frame(&mut r).await.unwrap_err();
        assert!(err.to_string().contains("bad frame length"), "{err}");
    }

    #[tokio::test]
    async fn a_short_timeout_on_a_busy_peer_fails_only_its_own_call() {
        let addr = slow_server().await;
        let t = Transport::new();
        answered(t.call(&addr, read("warm-up"), Duration::from_secs(5)).await, "warm-up");
        let (t2, a2) = (t.clone(), addr.clone());
        let slow = tokio::spawn(async move { t2.call(&a2, read("slow"), Duration::from_secs(10)).await });
        let bulk_t = t.clone();
        let bulk_addr = addr.clone();
        let bulk =
            tokio::spawn(
                async move { bulk_t.call_on(Lane::Bulk, &bulk_addr, read("slow"), Duration::from_secs(10)).await },
            );
        // A heartbeat-like call times out: the peer is busy, not gone.
        let r = t.call(&addr, read("stuck"), Duration::from_millis(300)).await;
        assert!(matches!(r, Err(RpcError::Timeout(_))), "{r:?}");
        // The calls in flight beside it, on either lane, still get their answers.
        answered(slow.await.unwrap(), "slow");
        answered(bulk.await.unwrap(), "slow");
        answered(t.call(&addr, read("after"), Duration::from_secs(5)).await, "after");
    }

    fn secured() -> Security {
        Security::new(Some(Secret::from_bytes(b"0123456789abcdef-test").unwrap()), None)
    }

    #[tokio::test]
    async fn a_peer_that_accepts_but_never_answers_the_handshake_costs_each_call_only_its_own_time() {
        // A paused process: the kernel accepts, nobody answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap().to_string();
        let held = tokio::spawn(async move {
            let mut socks = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                socks.push(s);
            }
        });
        let t = Transport::with_security(secured());
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let (t, a) = (t.clone(), silent_addr.clone());
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    let r = t.call(&a, read("x"), Duration::from_millis(300)).await;
                    (r, started.elapsed())
                })
            })
            .collect();
        for c in calls {
            let (r, took) = c.await.unwrap();
            assert!(matches!(r, Err(RpcError::Timeout(_))), "{r:?}");
            assert!(took < Duration::from_millis(1500), "a call outlived its 300 ms by far: {took:?}");
        }
        // A healthy peer with the same secret is reached meanwhile.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handler: Handler = Arc::new(|req| {
            Box::pin(async move {
                let Request::Node(NodeRequest::KvRead(crate::rpc::KvRead { key, .. })) = req else { unreachable!() };
                Response::Node(Ok(NodeReply::KvRead(Some((1, key)))))
            })
        });
        tokio::spawn(serve(listener, handler, secured()));
        answered(t.call(&addr, read("ok"), Duration::from_secs(5)).await, "ok");
        // Concurrent first calls share one connection.
        let both = futures::future::join_all((0..8).map(|_| t.call(&addr, read("ok"), Duration::from_secs(5)))).await;
        for r in both {
            answered(r, "ok");
        }
        assert!(t.open_conn(&addr, Lane::Default).is_some());
        held.abort();
    }

    #[tokio::test]
    async fn a_transport_without_the_secret_is_refused_and_one_with_another_too() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handler: Handler = Arc::new(|_| Box::pin(async { Response::Raft(Err("unexpected".into())) }));
        tokio::spawn(serve(listener, handler, secured()));
        let plain = Transport::new().call(&addr, read("x"), Duration::from_secs(5)).await;
        assert!(matches!(plain, Err(RpcError::Closed(_))), "{plain:?}");
        let other = Security::new(Some(Secret::from_bytes(b"0123456789abcdef-other").unwrap()), None);
        let wrong = Transport::with_security(other).call(&addr, read("x"), Duration::from_secs(5)).await;
        assert!(matches!(wrong, Err(RpcError::Handshake { .. })), "{wrong:?}");
    }

    #[tokio::test]
    async fn a_dropped_connection_does_not_take_a_snapshot_transfer_with_it() {
        let addr = slow_server().await;
        let t = Transport::new();
        let (t2, a2) = (t.clone(), addr.clone());
        let bulk =
            tokio::spawn(async move { t2.call_on(Lane::Bulk, &a2, read("install"), Duration::from_secs(60)).await });
        // Silent past SILENT_DEAD: the default connection is given up on...
        let r = t.call(&addr, read("stuck"), SILENT_DEAD + Duration::from_millis(200)).await;
        assert!(matches!(r, Err(RpcError::Timeout(_))), "{r:?}");
        // ...but the snapshot chunk on its own connection is answered, and
        // the next call dials afresh.
        answered(bulk.await.unwrap(), "install");
        answered(t.call(&addr, read("after"), Duration::from_secs(5)).await, "after");
    }
}
