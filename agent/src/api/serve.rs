//! The API's accept loop: HTTP/1.1 connections served until shutdown, at most
//! `max_connections` at once, clients that trickle their headers dropped, refusals counted and
//! their warnings rate-limited. Async shell (tokio, hyper).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;

use crate::counters::ApiCounters;

/// Least time between two warnings about refused connections; the ones in between are counted.
pub const REFUSED_WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Pause after an accept error that is not about one connection (out of file descriptors), so
/// the loop does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Limits of the accept loop.
#[derive(Clone, Debug)]
pub struct ServeLimits {
    /// Longest a client may take to send a request's headers; hyper also applies it to an idle
    /// keep-alive connection waiting for its next request.
    pub header_read_timeout: Duration,
    /// Most connections served at once; past it a new connection is closed at once.
    pub max_connections: usize,
}

/// At most one log line per interval; counts the ones it held back.
struct LogEvery {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogEvery {
    fn new(interval: Duration) -> LogEvery {
        LogEvery {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(held back since the last line)` when a line may be logged at `now`.
    fn tick(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Resolves once shutdown is asked for (`true`) or nobody can ask any more (sender dropped).
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Errors of `accept` that concern only the connection being accepted.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Serves `app` on `listener` (HTTP/1.1) until `shutdown` turns true (or its sender is dropped),
/// then stops accepting, lets every connection finish its in-flight request (idle ones close at
/// once) and returns when all are closed. At most `limits.max_connections` connections are open
/// at once: past it a new connection is closed as soon as it is accepted, counted, and warned
/// about at most once per `REFUSED_WARN_INTERVAL`. A client that has not sent a request's headers
/// within `limits.header_read_timeout` is disconnected (slow-loris). Errors of one connection
/// never end the loop.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ServeLimits,
    counters: Arc<ApiCounters>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut conns = tokio::task::JoinSet::new();
    let mut refused_log = LogEvery::new(REFUSED_WARN_INTERVAL);
    let mut accept_log = LogEvery::new(REFUSED_WARN_INTERVAL);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        let accepted = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            // Reap finished connections so the set stays as small as the open connections.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                if let Some(held) = accept_log.tick(Instant::now()) {
                    tracing::warn!(error = %e, similar_errors_not_logged = held, "accept failed");
                }
                tokio::select! {
                    _ = stopped(&mut shutdown) => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            ApiCounters::bump(&counters.connections_refused);
            if let Some(held) = refused_log.tick(Instant::now()) {
                tracing::warn!(
                    %peer,
                    max_connections = limits.max_connections,
                    refused_not_logged = held,
                    "connection refused: too many open connections"
                );
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                app.clone().oneshot(req)
            });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let mut stop = shutdown.clone();
        let counters = counters.clone();
        let header_read_timeout = limits.header_read_timeout;
        let span = tracing::info_span!("connection", %peer);
        conns.spawn(tracing::Instrument::instrument(
            async move {
                counters.connections_open.fetch_add(1, Ordering::Relaxed);
                let mut conn = std::pin::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    _ = stopped(&mut stop) => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                // The slot first: a count of 0 open means every slot is free again.
                drop(slot);
                counters.connections_open.fetch_sub(1, Ordering::Relaxed);
                match result {
                    Ok(()) => {}
                    Err(e) if e.is_timeout() => {
                        ApiCounters::bump(&counters.header_timeouts);
                        tracing::debug!(
                            "connection closed: no complete request headers within {header_read_timeout:?}"
                        );
                    }
                    Err(e) => tracing::debug!(error = %e, "connection ended with an error"),
                }
            },
            span,
        ));
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
    Ok(())
}
