//! Process wiring for `outpost-agent run`: opens the store, binds the API, starts the sync task,
//! writes the ready file, and shuts everything down in order on SIGINT/SIGTERM. Async shell; owns
//! the process's sockets, files and signals.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::api::{self, ApiState, Boundary, Clients, ServeLimits};
use crate::config::Settings;
use crate::health::HealthProbe;
use crate::link::LinkState;
use crate::store::{self, OpenStoreError, Store};
use crate::sync::SyncClient;
use crate::tls::TlsError;
use crate::topup::{ASK_QUEUE_DEPTH, TopUp};

/// Longest in-flight HTTP requests may take to finish after a shutdown signal.
pub const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Longest the sync task may take to close its connection after a shutdown signal.
pub const SYNC_SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot prepare {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] OpenStoreError),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Sync(#[from] crate::sync::SyncSetupError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot write the ready file {path}: {source}")]
    Ready {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(settings: Settings) -> Result<(), RunError> {
    // Said plainly once at start: later, central's refusal looks like any failed handshake.
    crate::health::check_own_certificate(&settings.sync.cert, &settings.site_id);
    let data_dir = &settings.data_dir;
    std::fs::create_dir_all(data_dir).map_err(|source| RunError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let ready_path = settings.ready_path();
    // A stale ready file from a crashed run would make pollers believe we are up already.
    remove_ready(&ready_path).map_err(|source| RunError::Ready {
        path: ready_path.clone(),
        source,
    })?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(RunError::Signals)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(RunError::Signals)?;

    let (store, writer) = Store::open_with_retention(
        &settings.store_path(),
        &settings.site_id,
        settings.retention,
    )?;
    // Until central is heard from again, the freshest sign of it is the last master batch.
    let as_of = store.as_of_ms().map_err(OpenStoreError::Read)?;
    let link = Arc::new(LinkState::new(as_of));
    let (ask_tx, ask_rx) = mpsc::channel(ASK_QUEUE_DEPTH);
    let topup = TopUp::new(
        ask_tx,
        settings.allowance.request_deadline,
        store.master_rev_watch(),
        link.clone(),
    );
    let boundary = Boundary::new(Clients::new(
        settings.api.clients.clone(),
        settings.api.rate_limit_burst,
    ));
    let counters = boundary.counters.clone();
    let probe = HealthProbe::new(store.clone(), settings.store_path(), counters.clone());
    let sync = SyncClient::new(
        settings.sync.clone(),
        settings.site_id.clone(),
        store.clone(),
        link.clone(),
        ask_rx,
    )?
    .with_heartbeat(settings.health.heartbeat, probe);
    let listener = tokio::net::TcpListener::bind(settings.api.listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: settings.api.listen,
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| RunError::Bind {
        addr: settings.api.listen,
        source,
    })?;
    let app = crate::router::router_with(
        ApiState {
            store: store.clone(),
            site: settings.site_id.clone(),
            link,
            topup: Some(topup),
            max_body_bytes: settings.api.max_body_bytes,
        },
        boundary,
    );

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let limits = ServeLimits {
        header_read_timeout: settings.api.header_read_timeout,
        max_connections: settings.api.max_connections,
    };
    let mut server = tokio::spawn(api::serve(
        listener,
        app,
        limits,
        counters,
        shutdown_rx.clone(),
    ));
    // Acks prune acknowledged events too; this covers a quiet site. Ends with the shutdown.
    let pruner = tokio::spawn(store::run_pruner(
        store.clone(),
        store::PRUNE_INTERVAL,
        shutdown_rx.clone(),
    ));
    let mut sync_task = tokio::spawn(sync.run(shutdown_rx));

    write_ready(&ready_path, api_addr).map_err(|source| RunError::Ready {
        path: ready_path.clone(),
        source,
    })?;
    // Clients by name and role only: tokens and their hashes never reach the log.
    let clients = settings
        .api
        .clients
        .iter()
        .map(|c| format!("{} ({})", c.name, c.role))
        .collect::<Vec<_>>()
        .join(", ");
    tracing::info!(
        site.id = %settings.site_id,
        api = %api_addr,
        central = %settings.sync.central_addrs.join(","),
        store = %settings.store_path().display(),
        %clients,
        max_connections = settings.api.max_connections,
        header_read_timeout_ms = settings.api.header_read_timeout.as_millis() as u64,
        "listening"
    );

    let mut failure = None;
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT received; shutting down"),
        r = &mut server => {
            let e = match r {
                Ok(Ok(())) => std::io::Error::other("the server stopped unexpectedly"),
                Ok(Err(e)) => e,
                Err(e) => std::io::Error::other(e.to_string()),
            };
            tracing::error!(error = %e, "HTTP server failed; shutting down");
            failure = Some(RunError::Serve(e));
        }
    }
    // The ready file goes first: from now on nobody should send us new work.
    let _ = remove_ready(&ready_path);
    let _ = shutdown_tx.send(true);
    if failure.is_none()
        && tokio::time::timeout(HTTP_SHUTDOWN_GRACE, &mut server)
            .await
            .is_err()
    {
        tracing::warn!("in-flight requests did not finish within {HTTP_SHUTDOWN_GRACE:?}");
        server.abort();
    }
    if tokio::time::timeout(SYNC_SHUTDOWN_GRACE, &mut sync_task)
        .await
        .is_err()
    {
        sync_task.abort();
    }
    pruner.abort();
    let _ = pruner.await;
    drop(store);
    writer.shutdown().await;
    tracing::info!("stopped");
    failure.map_or(Ok(()), Err)
}

fn remove_ready(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes `{"pid": N, "api": "ip:port"}` atomically: a temporary file, fsync, rename, fsync of
/// the directory, so a poller never reads a partial file.
pub fn write_ready(path: &Path, api: SocketAddr) -> std::io::Result<()> {
    use std::io::Write;
    let body = serde_json::json!({"pid": std::process::id(), "api": api.to_string()});
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body.to_string().as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
