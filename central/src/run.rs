//! Wiring of `outpost-central serve`: opens the store, binds the HTTP and QUIC listeners, writes
//! the ready file, runs until told to stop, then shuts down in order. I/O shell.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::api::{ApiState, Clients};
use crate::config::CentralConfig;
use crate::quic::{SyncContext, TlsSetupError};
use crate::registry::Registry;
use crate::router::router;
use crate::store::{OpenStoreError, Store};

/// How long in-flight HTTP requests may take to finish after shutdown starts.
pub const HTTP_DRAIN: Duration = Duration::from_secs(5);
/// How long the QUIC side may take to say goodbye to every session and close.
pub const QUIC_DRAIN: Duration = Duration::from_secs(8);

/// Contents of `data_dir/ready.json`, written once every listener is bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub pid: u32,
    pub api: String,
    pub quic: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot prepare {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] OpenStoreError),
    #[error("invalid listen address: {0}")]
    Addr(#[from] std::net::AddrParseError),
    #[error("cannot bind the HTTP API on {addr}: {source}")]
    BindApi {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind QUIC on {addr}: {source}")]
    BindQuic {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("cannot write the ready file {path}: {source}")]
    Ready {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Http(std::io::Error),
}

/// Writes `path` atomically: a temporary file in the same directory, fsync, rename, fsync of the
/// directory.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Runs central until `shutdown` completes, then stops accepting, drains HTTP (bounded), ends
/// every sync session with a Refuse, closes the QUIC endpoint, closes the store and removes the
/// ready file.
pub async fn serve(
    cfg: CentralConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let ready_path = cfg.ready_path();
    let data_err = |source| ServeError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    };
    std::fs::create_dir_all(&cfg.data_dir).map_err(data_err)?;
    // A stale ready file from a crashed run must not be mistaken for this one.
    remove_if_present(&ready_path).map_err(data_err)?;

    let store = Store::open_with(&cfg.store_path(), cfg.allowance.store_options())?;
    // The startup check runs before any listener is up: sites silent past the limit (while
    // central was down too) are asked back, and nothing races the first requests.
    allowance_check(&store, Vec::new()).await;
    let registry = Arc::new(Registry::new());
    // A drill that was running when central stopped goes on; a restore drill whose backup this
    // store came from ends its cut now.
    crate::drill_driver::resume(&store, &registry).await;

    let api_addr = cfg.api_addr()?;
    let quic_addr = cfg.quic_addr()?;
    let listener = tokio::net::TcpListener::bind(api_addr)
        .await
        .map_err(|source| ServeError::BindApi {
            addr: api_addr,
            source,
        })?;
    let server_config = crate::quic::server_config(&cfg.quic)?;
    let endpoint = quinn::Endpoint::server(server_config, quic_addr).map_err(|source| {
        ServeError::BindQuic {
            addr: quic_addr,
            source,
        }
    })?;
    let api_bound = listener
        .local_addr()
        .map_err(|source| ServeError::BindApi {
            addr: api_addr,
            source,
        })?;
    let quic_bound = endpoint
        .local_addr()
        .map_err(|source| ServeError::BindQuic {
            addr: quic_addr,
            source,
        })?;

    let ready = Ready {
        pid: std::process::id(),
        api: api_bound.to_string(),
        quic: quic_bound.to_string(),
    };
    let ready_json = serde_json::to_vec(&ready).expect("Ready serialises");
    write_atomic(&ready_path, &ready_json).map_err(|source| ServeError::Ready {
        path: ready_path.clone(),
        source,
    })?;
    tracing::info!(api = %api_bound, quic = %quic_bound, data_dir = %cfg.data_dir.display(), version = crate::VERSION, "listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    let state = ApiState {
        store: store.clone(),
        registry: registry.clone(),
        clients: Arc::new(Clients::from_config(&cfg.api.tokens)),
        data_dir: cfg.data_dir.clone(),
    };
    let app = router(state, cfg.api.max_body_bytes as usize);
    let mut http_stop = stop_rx.clone();
    let mut http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });
    let check = tokio::spawn(run_allowance_checks(
        store.clone(),
        registry.clone(),
        Duration::from_secs(cfg.allowance.reclaim_check_secs),
        stop_rx.clone(),
    ));
    let monitor = tokio::spawn(crate::fleet::run_monitor(
        store.clone(),
        registry.clone(),
        cfg.health.thresholds(),
        stop_rx.clone(),
    ));
    let webhooks = (!cfg.health.webhooks.is_empty()).then(|| {
        tokio::spawn(crate::fleet::run_webhooks(
            registry.clone(),
            cfg.health.webhooks.clone(),
            stop_rx.clone(),
        ))
    });
    let ctx = SyncContext {
        store: store.clone(),
        registry,
        signer: Arc::new(crate::renewal::Signer::new(
            cfg.renewal.ca_dir.clone(),
            i64::try_from(cfg.renewal.site_validity_days).unwrap_or(i64::MAX),
            Duration::from_secs(cfg.renewal.min_interval_secs),
        )),
    };
    let limits = crate::quic::AcceptLimits::from_config(&cfg.quic);
    let drills = tokio::spawn(crate::drill_driver::run_driver(
        store.clone(),
        ctx.registry.clone(),
        stop_rx.clone(),
    ));
    let mut quic = tokio::spawn(serve_quic(
        endpoint,
        cfg.quic.clone(),
        quic_bound,
        ctx,
        limits,
        stop_rx,
    ));

    let mut failure = None;
    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        r = &mut http => {
            tracing::error!("the HTTP server stopped unexpectedly");
            failure = Some(match r {
                Ok(Err(e)) => ServeError::Http(e),
                _ => ServeError::Http(std::io::Error::other("the HTTP server task ended")),
            });
        }
        _ = &mut quic => tracing::error!("the QUIC server stopped unexpectedly"),
    }
    let _ = stop_tx.send(true);
    if !http.is_finished() && tokio::time::timeout(HTTP_DRAIN, &mut http).await.is_err() {
        tracing::warn!("HTTP requests did not finish in time; dropping them");
        http.abort();
    }
    if !quic.is_finished() && tokio::time::timeout(QUIC_DRAIN, &mut quic).await.is_err() {
        tracing::warn!("the QUIC server did not stop in time");
        quic.abort();
    }
    // The driver stores the active drill's progress on its way out.
    if tokio::time::timeout(QUIC_DRAIN, drills).await.is_err() {
        tracing::warn!("the drill driver did not stop in time");
    }
    // The check only queues store writes; it ends at the next await once told to stop.
    check.abort();
    let _ = check.await;
    // Both end at their next await; a webhook POST in flight is abandoned.
    monitor.abort();
    let _ = monitor.await;
    if let Some(w) = webhooks {
        w.abort();
        let _ = w.await;
    }
    store.close().await;
    if let Err(e) = remove_if_present(&ready_path) {
        tracing::warn!(error = %e, "cannot remove the ready file");
    }
    tracing::info!("stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Serves sync sessions on `endpoint` until `stop`. While an outage drill holds central's
/// listener down, the endpoint is closed (sites see central vanish, not a refusal) and bound
/// again on the same address when the drill's cut ends.
async fn serve_quic(
    endpoint: quinn::Endpoint,
    cfg: crate::config::QuicConfig,
    addr: SocketAddr,
    ctx: SyncContext,
    limits: crate::quic::AcceptLimits,
    mut stop: watch::Receiver<bool>,
) {
    let mut outage = ctx.registry.drills().outage();
    let mut endpoint = Some(endpoint);
    loop {
        let ep = match endpoint.take() {
            Some(ep) => ep,
            None => match rebind(&cfg, addr, &mut stop).await {
                Some(ep) => ep,
                None => return,
            },
        };
        // This round ends on shutdown or when an outage drill starts.
        let (round_tx, round_rx) = watch::channel(false);
        let mut round_stop = stop.clone();
        let mut round_outage = outage.clone();
        let trigger = tokio::spawn(async move {
            tokio::select! {
                _ = round_stop.wait_for(|s| *s) => {}
                _ = round_outage.wait_for(|o| *o) => {}
            }
            let _ = round_tx.send(true);
        });
        crate::quic::run(ep, ctx.clone(), limits, round_rx).await;
        trigger.abort();
        if *stop.borrow() {
            return;
        }
        tracing::warn!("outage drill: the QUIC listener is down");
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = outage.wait_for(|o| !*o) => {}
        }
        tracing::warn!("outage drill over: the QUIC listener comes back");
    }
}

/// Binds the QUIC endpoint on `addr` again (the old socket may take a moment to be released).
async fn rebind(
    cfg: &crate::config::QuicConfig,
    addr: SocketAddr,
    stop: &mut watch::Receiver<bool>,
) -> Option<quinn::Endpoint> {
    let mut delay = Duration::from_millis(50);
    loop {
        let bound = crate::quic::server_config(cfg)
            .map_err(|e| e.to_string())
            .and_then(|sc| quinn::Endpoint::server(sc, addr).map_err(|e| e.to_string()));
        match bound {
            Ok(ep) => return Some(ep),
            Err(e) => tracing::warn!(error = %e, %addr, "cannot bind QUIC again yet; retrying"),
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// One allowance check: marks `connected` sites as heard from, asks sites silent for too long to
/// return their allowance and tops up eligible sites. A failure is logged; the next check retries.
async fn allowance_check(store: &Store, connected: Vec<String>) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    match store.periodic(connected, now_ms).await {
        Ok(out) if out.grants + out.reclaims > 0 => {
            tracing::info!(
                grants = out.grants,
                reclaims = out.reclaims,
                "allowance check"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "allowance check failed; retrying at the next one"),
    }
}

/// The periodic allowance check, every `every` (the startup check is done by `serve` before the
/// listeners come up).
pub async fn run_allowance_checks(
    store: Store,
    registry: Arc<Registry>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let connected: Vec<String> = registry
            .snapshot()
            .into_iter()
            .filter(|(_, l)| l.connected)
            .map(|(site, _)| site)
            .collect();
        allowance_check(&store, connected).await;
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops central");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
