//! Serving a router on a listener with limits that a peer cannot talk its way around: a
//! connection must send a request's headers within the header timeout (also while idle between
//! requests, so an idle keep-alive or a silent socket is closed), headers are bounded in size
//! and count, and a request must be answered within the request timeout (a body trickled in
//! byte by byte ends there). WebSocket upgrades leave these limits behind; the relay keeps its
//! own (pings, idle timeout, message size).
//!
//! hyper's HTTP/1 server directly rather than `axum::serve`, which sets no timer, so no header
//! timeout, and kept every idle socket open for as long as the peer liked.

use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use ecars_runtime::accept::{self, AcceptFailures};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics;

/// Limits of one HTTP listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Time a connection has to send a request's headers, from its opening or from the last
    /// response.
    pub header_timeout: Duration,
    /// Time a request has to be answered, its body included.
    pub request_timeout: Duration,
    /// Largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
}

/// At most this many headers in a request.
const MAX_HEADERS: usize = 64;

/// Serves `router` on a bound listener until `shutdown` fires, then lets requests in flight
/// finish (idle connections close at once).
/// With `tls`, the listener speaks HTTPS (the handshake has the header timeout).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, https = tls.is_some(), "HTTP listening");
    let request_timeout = limits.request_timeout;
    let router = router.layer(axum::middleware::from_fn(move |request, next| {
        answer_within(request_timeout, request, next)
    }));
    let connections = TaskTracker::new();
    let mut failures = AcceptFailures::default();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    failures.succeeded();
                    stream
                }
                Err(error) => {
                    // Mostly the descriptor limit: pause rather than spin on the error, and
                    // say how many failed once per interval rather than once per failure.
                    ::metrics::counter!(metrics::ACCEPT_FAILURES).increment(1);
                    let after = failures.failed(accept::is_exhaustion(&error), tokio::time::Instant::now());
                    if let Some(count) = after.log {
                        tracing::warn!(%error, failures = count, pause = ?after.pause, "HTTP accept failing; pausing before the next");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(after.pause) => continue,
                    }
                }
            },
        };
        let service = TowerToHyperService::new(router.clone());
        let stop = shutdown.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            match tls {
                None => serve_connection(stream, service, limits, stop).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => serve_connection(stream, service, limits, stop).await,
                        Ok(Err(_)) => {
                            ::metrics::counter!(metrics::CONNECTIONS_CLOSED, "reason" => "tls_handshake_failed").increment(1);
                        }
                        Err(_) => {
                            ::metrics::counter!(metrics::CONNECTIONS_CLOSED, "reason" => "tls_handshake_timeout").increment(1);
                        }
                    }
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Serves HTTP/1 on one connection (plain or TLS) until it ends or `stop` fires.
async fn serve_connection<I>(
    io: I,
    service: TowerToHyperService<Router>,
    limits: HttpLimits,
    stop: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_headers(MAX_HEADERS);
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        _ = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = ended {
        // A peer that timed out or sent garbage: counted, not logged.
        let reason = if error.is_timeout() {
            "header_timeout"
        } else if error.is_parse_too_large() {
            "header_too_large"
        } else if error.is_parse() {
            "malformed"
        } else {
            "io"
        };
        ::metrics::counter!(metrics::CONNECTIONS_CLOSED, "reason" => reason).increment(1);
    }
}

/// Answers 408 when the handler (reading the body included) takes longer than `limit`.
async fn answer_within(limit: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            ::metrics::counter!(metrics::CONNECTIONS_CLOSED, "reason" => "request_timeout")
                .increment(1);
            (
                StatusCode::REQUEST_TIMEOUT,
                axum::Json(serde_json::json!({ "error": "the request took too long" })),
            )
                .into_response()
        }
    }
}
