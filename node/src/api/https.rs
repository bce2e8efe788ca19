//! Serving the API over HTTPS: each accepted connection is taken through
//! the TLS handshake (with the certificate in force at that moment, see
//! `security::tls`) and then served by the same router as plain HTTP.
//! A client that speaks plain HTTP to this port fails the handshake and is
//! disconnected; it never reaches a handler.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::security::tls::Tls;

/// How long a client has to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` over TLS until `shutdown` completes.
pub async fn serve(listener: TcpListener, app: Router, tls: Arc<Tls>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let proving = Arc::new(tokio::sync::Semaphore::new(crate::rpc::transport::MAX_PROVING));
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("https accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        stream.set_nodelay(true).ok();
        // Handshakes in progress are bounded, as on the RPC port.
        let Ok(permit) = proving.clone().try_acquire_owned() else {
            metrics::counter!("cleave_http_tls_handshakes_failed_total").increment(1);
            continue;
        };
        let (acceptor, app) = (tls.http_acceptor(), app.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
            drop(permit);
            let stream = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    metrics::counter!("cleave_http_tls_handshakes_failed_total").increment(1);
                    tracing::debug!(%peer, "https handshake: {e}");
                    return;
                }
                Err(_) => return,
            };
            let service = TowerToHyperService::new(app);
            // A client slow to send its headers (slowloris) is dropped.
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            if let Err(e) = http.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%peer, "https connection: {e}");
            }
        });
    }
}
