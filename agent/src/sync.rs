//! The sync client: one QUIC connection to central at a time (mutual TLS, ALPN, the newest
//! protocol version both speak), reconnecting forever with capped exponential backoff and full
//! jitter, and no connection while the wall clock reads before a sane date. Each session runs
//! the protocol's pure `AgentSession` machine (Hello/Welcome, upload, acks, master data,
//! allowance requests, heartbeats, certificate renewal) through the driver in `session`. I/O
//! side: sockets, tasks and store calls.
//!
//! - `addrs`: which of central's addresses the next attempt goes to (pure);
//! - `backoff`: reconnection timing (pure);
//! - `clock`: whether the wall clock can be trusted (pure);
//! - `renewal`: when a renewal is due (pure), and the key, request and install (blocking pool);
//! - `session`: the driver of one session.

pub mod addrs;
pub mod backoff;
pub mod clock;
pub mod renewal;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use outpost_protocol::session::SessionError;
use outpost_protocol::session::agent::AgentSessionError;
use outpost_protocol::{FrameError, Refuse, RefuseCode};
use quinn::VarInt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tracing::Instrument;

use crate::config::SyncSettings;
use crate::health::HealthProbe;
use crate::link::LinkState;
use crate::store::{ReadError, Store, now_ms};
use crate::tls::{self, CertInfo, TlsError};
use crate::topup::AllowanceAsk;

pub use addrs::{CentralAddrs, Ended, NextAttempt};
pub use backoff::{ATTEMPT_RTTS, Backoff, MIN_ATTEMPT_TIMEOUT, attempt_timeout};
pub use clock::{CLOCK_RECHECK, ClockUntrusted, TIME_FLOOR_UNIX, clock_sane};
pub use outpost_protocol::session::agent::MAX_PENDING_ASKS;
pub use renewal::{RENEW_CHECK, renewal_due};

/// RTT assumed before the first sample of a connection. quinn's default (333 ms) makes the
/// handshake's first retransmission wait about a second; on the LANs and WANs sites use, 100 ms
/// retransmits a lost Initial within ~0.3 s, so a link that comes back is used promptly.
pub const INITIAL_RTT: Duration = Duration::from_millis(100);

/// Most bytes of encoded frames gathered before one `write_all`: several `Events` frames per
/// write amortise the per-write cost (performance.md §4.4: 5× more messages per second).
pub const MAX_COALESCE_BYTES: usize = 1024 * 1024;
/// Longest a single write to central may block. Flow control blocks a write while central is
/// busy committing; a live connection that accepts nothing for this long is treated as stuck.
/// A dead one is noticed sooner, by the QUIC idle timeout.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Depth of the queue of central's messages between the reader task and the session loop. When
/// full, the reader stops reading and QUIC flow control slows central down.
pub const INBOUND_QUEUE_DEPTH: usize = 16;
/// Longest the endpoint waits for connections to close cleanly at shutdown.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Application close codes sent to central.
const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_PROTOCOL_VIOLATION: u32 = 1;
const CLOSE_LOCAL_ERROR: u32 = 2;

/// Why a session ended (other than a shutdown).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot resolve {addr}: {detail}")]
    Resolve { addr: String, detail: String },
    #[error("cannot bind a UDP socket: {0}")]
    Bind(std::io::Error),
    #[error("cannot start a connection: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("frame error: {0}")]
    Frame(#[from] FrameError),
    #[error("write to central failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("central broke the protocol: no Outpost protocol version negotiated")]
    NoVersion,
    /// The session machine ended the session: central refused or broke the protocol, the
    /// upload cannot continue, or the store failed under it.
    #[error("{}{source}", session_prefix(.source))]
    Session {
        #[from]
        source: AgentSessionError,
    },
    #[error("store error: {0}")]
    StoreRead(#[from] ReadError),
    #[error("session task failed: {0}")]
    Task(String),
}

/// Why the sync task cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SyncSetupError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("no central address configured ([sync] central_addr)")]
    NoAddress,
}

/// How a session error reads in the log: a divergence stops the upload, a violation is
/// central's fault.
fn session_prefix(e: &AgentSessionError) -> &'static str {
    if e.is_divergence() {
        "cannot continue the upload: "
    } else if e.is_protocol_violation() {
        "central broke the protocol: "
    } else {
        ""
    }
}

impl SyncError {
    /// Central's refusal, if that is what ended the session.
    pub fn refusal(&self) -> Option<&Refuse> {
        match self {
            SyncError::Session {
                source: AgentSessionError::Refused(r),
            } => Some(r),
            _ => None,
        }
    }
}

fn window(bytes: u64) -> Result<VarInt, TlsError> {
    VarInt::from_u64(bytes).map_err(|e| TlsError::Quic(format!("window of {bytes} bytes: {e}")))
}

/// The rustls + transport configuration for connections to central.
pub fn client_config(s: &SyncSettings) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = tls::quic_client_crypto(tls::client_config(
        &s.ca_cert,
        &s.cert,
        &s.key,
        s.protocol_version_max,
    )?)?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(s.keep_alive))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(s.idle_timeout)
                .map_err(|e| TlsError::Quic(e.to_string()))?,
        ))
        // The agent opens the one stream; central opens none and sends no datagrams.
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None)
        .initial_rtt(INITIAL_RTT)
        // Windows sized for the link's bandwidth-delay product (`[sync] *_window_bytes`): the
        // uplink (events) is bounded by central's receive windows and this send window, the
        // downlink (master data) by these receive windows.
        .stream_receive_window(window(s.receive_window_bytes)?)
        .receive_window(window(s.receive_window_bytes)?)
        .send_window(s.send_window_bytes);
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// The long-lived sync task.
pub struct SyncClient {
    settings: SyncSettings,
    site: String,
    store: Store,
    link: Arc<LinkState>,
    /// Central's addresses and the one the next attempt goes to.
    addrs: CentralAddrs,
    asks: mpsc::Receiver<AllowanceAsk>,
    /// False once every sender of `asks` is gone (the API stopped).
    asks_open: bool,
    client_config: quinn::ClientConfig,
    /// The certificate in use (`None` if unreadable: the handshake will say why).
    cert: Option<CertInfo>,
    endpoint: Option<(bool, quinn::Endpoint)>,
    /// Heartbeat interval and probe; `None`: no heartbeats (scripted centrals in unit tests).
    /// The probe outlives sessions so CPU figures always cover the time since the last beat.
    heartbeat: Option<(Duration, Arc<std::sync::Mutex<HealthProbe>>)>,
}

/// How a session ended without error.
enum SessionEnd {
    /// Central closed the stream cleanly after a Welcome.
    Closed,
}

/// Aborts the session's helper tasks when the session ends, however it ends.
struct TaskGuard(Vec<JoinHandle<()>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl SyncClient {
    /// `asks`: the API's allowance requests (see `topup::TopUp`).
    pub fn new(
        settings: SyncSettings,
        site: String,
        store: Store,
        link: Arc<LinkState>,
        asks: mpsc::Receiver<AllowanceAsk>,
    ) -> Result<Self, SyncSetupError> {
        let client_config = client_config(&settings)?;
        let addrs =
            CentralAddrs::new(settings.central_addrs.clone()).ok_or(SyncSetupError::NoAddress)?;
        let cert = tls::cert_info(&settings.cert).ok();
        link.update_certificate(|c| c.not_after = cert.as_ref().map(|c| c.not_after));
        Ok(SyncClient {
            settings,
            site,
            store,
            link,
            addrs,
            asks,
            asks_open: true,
            client_config,
            cert,
            endpoint: None,
            heartbeat: None,
        })
    }

    /// Sends a heartbeat sampled by `probe` every `every` on each live session, the first one
    /// right after the Welcome.
    pub fn with_heartbeat(mut self, every: Duration, probe: HealthProbe) -> Self {
        self.heartbeat = Some((every, Arc::new(std::sync::Mutex::new(probe))));
        self
    }

    /// Runs sessions until `shutdown` turns true, then closes the endpoint.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        let mut failures: u32 = 0;
        loop {
            if *shutdown.borrow() {
                break;
            }
            // Certificate dates mean nothing on a clock reset to the past: wait for a sane
            // clock instead of failing handshakes (and never renew on a wrong clock).
            match clock_sane(now_ms() / 1000, self.cert.as_ref()) {
                Ok(()) => {
                    if self.link.clock_untrusted().is_some() {
                        tracing::info!("the system clock is sane again; connecting to central");
                        self.link.set_clock_untrusted(None);
                    }
                }
                Err(why) => {
                    if self.link.clock_untrusted().is_none() {
                        tracing::warn!(reason = %why, "not connecting to central");
                    }
                    self.link.set_clock_untrusted(Some(why.to_string()));
                    if !self.pause(CLOCK_RECHECK, &mut shutdown).await {
                        break;
                    }
                    continue;
                }
            }
            let mut welcomed = false;
            let addr = self.addrs.current().to_string();
            self.link.set_central_addr(&addr);
            let span = tracing::info_span!("sync_session", site.id = %self.site, central = %addr);
            let result = tokio::select! {
                r = self.session(&mut welcomed).instrument(span) => Some(r),
                _ = shutdown.changed() => None,
            };
            let Some(result) = result else { break };
            self.link.set_connected(false);
            if welcomed {
                // The link was alive (QUIC keep-alives answered) until just now.
                self.link.heard(now_ms());
                backoff.reset();
                failures = 0;
            }
            let next = self.addrs.ended(end_kind(&result, welcomed));
            match result {
                Ok(SessionEnd::Closed) => {
                    tracing::warn!("central closed the session; reconnecting");
                }
                Err(e) => {
                    failures += 1;
                    log_failure(&e, welcomed, failures);
                }
            }
            if self.addrs.current() != addr {
                self.link.address_switched();
                tracing::info!(from = %addr, to = %self.addrs.current(), "trying another central address");
            }
            let delay = match next {
                NextAttempt::BackOff => backoff.next_delay(rand::random::<f64>()),
                NextAttempt::Soon => self.settings.backoff_initial.mul_f64(rand::random::<f64>()),
            };
            tracing::debug!(
                ?delay,
                attempt = backoff.attempt(),
                "reconnecting after backoff"
            );
            if !self.pause(delay, &mut shutdown).await {
                break;
            }
        }
        // Waiting for the close to reach central only matters for a live session; a handshake
        // towards an unreachable central would just hold up the shutdown.
        let was_connected = self.link.set_connected(false);
        if let Some((_, ep)) = self.endpoint.take() {
            ep.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"agent shutting down");
            if was_connected && timeout(CLOSE_TIMEOUT, ep.wait_idle()).await.is_err() {
                tracing::debug!("connections did not close within {CLOSE_TIMEOUT:?}");
            }
        }
    }

    /// Waits `delay` between sessions; returns false on shutdown. Allowance requests arriving
    /// meanwhile are dropped at once, so their orders do not wait for a link that is down.
    async fn pause(&mut self, delay: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return true,
                _ = shutdown.changed() => return false,
                ask = self.asks.recv(), if self.asks_open => {
                    if ask.is_none() {
                        self.asks_open = false;
                    }
                }
            }
        }
    }

    /// An endpoint of the address family of `addr`, created on first use.
    fn endpoint_for(&mut self, addr: SocketAddr) -> Result<quinn::Endpoint, SyncError> {
        let v6 = addr.is_ipv6();
        if let Some((fam, ep)) = &self.endpoint
            && *fam == v6
        {
            return Ok(ep.clone());
        }
        let bind: SocketAddr = if v6 {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let ep = quinn::Endpoint::client(bind).map_err(SyncError::Bind)?;
        self.endpoint = Some((v6, ep.clone()));
        Ok(ep)
    }

    async fn resolve(&self) -> Result<SocketAddr, SyncError> {
        let addr = self.addrs.current();
        if let Ok(a) = addr.parse::<SocketAddr>() {
            return Ok(a);
        }
        let err = |detail: String| SyncError::Resolve {
            addr: addr.to_string(),
            detail,
        };
        let mut addrs = timeout(self.settings.connect_timeout, tokio::net::lookup_host(addr))
            .await
            .map_err(|_| SyncError::Timeout("resolving central's address"))?
            .map_err(|e| err(e.to_string()))?;
        addrs.next().ok_or_else(|| err("no addresses".into()))
    }

    /// One session: connect, hello, then upload and apply until something ends it.
    async fn session(&mut self, welcomed: &mut bool) -> Result<SessionEnd, SyncError> {
        let limit = attempt_timeout(self.settings.connect_timeout, self.addrs.current_rtt());
        let addr = self.resolve().await?;
        let endpoint = self.endpoint_for(addr)?;
        let connecting = endpoint.connect_with(
            self.client_config.clone(),
            addr,
            &self.settings.central_name,
        )?;
        let conn = timeout(limit, connecting)
            .await
            .map_err(|_| SyncError::Timeout("connecting to central"))??;
        self.addrs.set_current_rtt(conn.rtt());
        let result = self.converse(&conn, welcomed).await;
        // The RTT the session ended with is the better guess for the next attempts.
        self.addrs.set_current_rtt(conn.rtt());
        match &result {
            Err(SyncError::NoVersion) => conn.close(
                VarInt::from_u32(CLOSE_PROTOCOL_VIOLATION),
                b"no Outpost protocol version negotiated",
            ),
            Err(SyncError::Session { source: e }) if e.is_protocol_violation() => conn.close(
                VarInt::from_u32(CLOSE_PROTOCOL_VIOLATION),
                truncate(&e.to_string()).as_bytes(),
            ),
            Err(SyncError::Session { source: e }) if e.is_local() => {
                conn.close(VarInt::from_u32(CLOSE_LOCAL_ERROR), b"agent store error")
            }
            Err(SyncError::StoreRead(_)) => {
                conn.close(VarInt::from_u32(CLOSE_LOCAL_ERROR), b"agent store error")
            }
            _ => conn.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"session ended"),
        }
        result
    }
}

/// How a session ended, for the choice of the next address: central closing a welcomed session
/// itself (its restart, a refusal) keeps the address; a lost link moves on.
fn end_kind(result: &Result<SessionEnd, SyncError>, welcomed: bool) -> Ended {
    if !welcomed {
        return Ended::Failed;
    }
    match result {
        Ok(SessionEnd::Closed) => Ended::ClosedByCentral,
        Err(SyncError::Connection(
            quinn::ConnectionError::ApplicationClosed(_)
            | quinn::ConnectionError::ConnectionClosed(_),
        )) => Ended::ClosedByCentral,
        Err(e) if e.refusal().is_some() => Ended::ClosedByCentral,
        Err(_) => Ended::Lost,
    }
}

/// QUIC close reasons must fit in a packet; keep them short.
fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

/// Logs a failed session once per streak at warn (error for conditions an operator must fix),
/// and repeats of the same streak at debug, so an outage does not flood the log.
fn log_failure(e: &SyncError, welcomed: bool, failures: u32) {
    let operator_must_act = matches!(
        e,
        SyncError::Session {
            source: AgentSessionError::NotRetained { .. }
                | AgentSessionError::Upload(SessionError::CentralAhead { .. })
                | AgentSessionError::Refused(Refuse {
                    code: RefuseCode::IncompatibleVersion
                        | RefuseCode::WrongSite
                        | RefuseCode::Revoked,
                    ..
                })
        }
    );
    if operator_must_act {
        tracing::error!(error = %e, failures, "sync session failed");
    } else if welcomed || failures == 1 {
        tracing::warn!(error = %e, "sync session ended; retrying with backoff");
    } else {
        tracing::debug!(error = %e, failures, "sync session failed again");
    }
}

#[cfg(test)]
mod tests;
