//! The sync client: one QUIC connection to central at a time (mutual TLS, ALPN), a Hello/Welcome
//! exchange, then the outbox uploaded in sequence order through the protocol's `Uploader` while
//! central's acks and master data (grants and reclaims included) are applied to the store, and
//! the API's allowance requests are relayed to central and answered. Reconnects forever with
//! capped exponential backoff and full jitter. Async network shell around the pure `Uploader`.
//! The protocol version is negotiated by ALPN (this build's and the one before); on protocol 4
//! the session also renews the site certificate when it nears expiry (new key made here, the
//! signed certificate checked, installed and used for the next connection). No connection is
//! attempted while the wall clock reads before a sane date (`clock_sane`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use outpost_protocol::io::{read_frame, write_frame};
use outpost_protocol::session::Uploader;
use outpost_protocol::{
    AgentMsg, CentralMsg, EventEnvelope, FrameError, Heartbeat, Hello, Refuse, RefuseCode,
};
use quinn::VarInt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tracing::Instrument;

use crate::config::SyncSettings;
use crate::health::HealthProbe;
use crate::link::LinkState;
use crate::store::{IncarnationChange, ReadError, Store, WriteError, now_ms};
use crate::tls::{self, CertInfo, RenewalRequest, TlsError};
use crate::topup::{AllowanceAnswer, AllowanceAsk};

/// RTT assumed before the first sample of a connection. quinn's default (333 ms) makes the
/// handshake's first retransmission wait about a second; on the LANs and WANs sites use, 100 ms
/// retransmits a lost Initial within ~0.3 s, so a link that comes back is used promptly.
pub const INITIAL_RTT: Duration = Duration::from_millis(100);
/// Shortest time one connection attempt is given, however fast the last link was.
pub const MIN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// An attempt is given this many times the last measured RTT (capped by
/// `[sync] connect_timeout_ms`): a handshake needs about two round trips.
pub const ATTEMPT_RTTS: u32 = 10;

/// No wall clock before this is sane (2026-11-01T00:00:00Z): a box without a real-time clock
/// that boots into 1970 or 2000 is below it. The site certificate's start date raises the floor.
pub const TIME_FLOOR_UNIX: i64 = 1_793_491_200;
/// How often the agent looks again at a clock it does not trust.
pub const CLOCK_RECHECK: Duration = Duration::from_secs(2);
/// How often a live session checks whether the certificate is due for renewal (the first check
/// is at the session's start).
pub const RENEW_CHECK: Duration = Duration::from_secs(3_600);

/// Whether the wall clock can be trusted with certificate dates: `now` (s since the epoch) is
/// not before `TIME_FLOOR_UNIX` nor before the site certificate's start. `Err` says why not.
pub fn clock_sane(now_unix: i64, cert: Option<&CertInfo>) -> Result<(), String> {
    let (floor, what) = match cert {
        Some(c) if c.not_before > TIME_FLOOR_UNIX => (c.not_before, "the site certificate's start"),
        _ => (TIME_FLOOR_UNIX, "this build's earliest sane date"),
    };
    if now_unix < floor {
        return Err(format!(
            "the system clock ({}) is before {what} ({}): waiting for a sane clock (NTP) before \
             trusting certificate dates; orders and milestones are still taken",
            crate::store::rfc3339_millis(now_unix.saturating_mul(1000)),
            crate::store::rfc3339_millis(floor.saturating_mul(1000)),
        ));
    }
    Ok(())
}

/// How long one connection attempt may take: `connect_timeout`, shortened to
/// `ATTEMPT_RTTS` × the last session's RTT (at least `MIN_ATTEMPT_TIMEOUT`) once one is known,
/// so that while central is unreachable the agent tries again often enough to notice it is back
/// within about a second on a fast link, and a slow link still gets the time it needs.
pub fn attempt_timeout(connect_timeout: Duration, last_rtt: Option<Duration>) -> Duration {
    match last_rtt {
        Some(rtt) => (rtt * ATTEMPT_RTTS)
            .max(MIN_ATTEMPT_TIMEOUT)
            .min(connect_timeout),
        None => connect_timeout,
    }
}
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
/// Most allowance requests awaiting central's answer in one session. Each lives at most one
/// request deadline (expired ones are dropped when the next request comes), so this is only
/// reached if central stops answering under a burst of orders; further requests are then not
/// sent and their orders go on with what the site holds.
pub const MAX_PENDING_ASKS: usize = 256;

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
    #[error("central refused the session ({:?}): {}", .0.code, .0.reason)]
    Refused(Refuse),
    #[error("central broke the protocol: {0}")]
    Protocol(String),
    #[error("central ended the session")]
    Closed,
    #[error("cannot continue the upload: {0}")]
    Diverged(String),
    #[error("store error: {0}")]
    StoreRead(#[from] ReadError),
    #[error("store error: {0}")]
    StoreWrite(#[from] WriteError),
}

/// Capped exponential backoff with full jitter: the n-th delay is uniform in
/// `0..=min(max, initial * 2^n)`. Pure; the randomness is passed in.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The cap for the next attempt (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay, given a uniform sample in `[0, 1)`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let cap = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        cap.mul_f64(unit.clamp(0.0, 1.0))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
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

/// Allowance requests sent to central and not yet answered, by request id: where to answer and
/// until when anyone is waiting.
type PendingAsks = HashMap<u64, (oneshot::Sender<AllowanceAnswer>, Instant)>;

/// The long-lived sync task.
pub struct SyncClient {
    settings: SyncSettings,
    site: String,
    store: Store,
    link: Arc<LinkState>,
    asks: mpsc::Receiver<AllowanceAsk>,
    /// False once every sender of `asks` is gone (the API stopped).
    asks_open: bool,
    next_request_id: u64,
    client_config: quinn::ClientConfig,
    /// The certificate in use (`None` if unreadable: the handshake will say why).
    cert: Option<CertInfo>,
    endpoint: Option<(bool, quinn::Endpoint)>,
    /// RTT of the last connection that completed its handshake (shortens later attempts).
    last_rtt: Option<Duration>,
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
    ) -> Result<Self, TlsError> {
        let client_config = client_config(&settings)?;
        let cert = tls::cert_info(&settings.cert).ok();
        link.update_certificate(|c| c.not_after = cert.as_ref().map(|c| c.not_after));
        Ok(SyncClient {
            settings,
            site,
            store,
            link,
            asks,
            asks_open: true,
            next_request_id: 0,
            client_config,
            cert,
            endpoint: None,
            last_rtt: None,
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
                    self.link.set_clock_untrusted(Some(why));
                    if !self.pause(CLOCK_RECHECK, &mut shutdown).await {
                        break;
                    }
                    continue;
                }
            }
            let mut welcomed = false;
            let span = tracing::info_span!("sync_session", site.id = %self.site, central = %self.settings.central_addr);
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
            match result {
                Ok(SessionEnd::Closed) => {
                    tracing::warn!("central closed the session; reconnecting");
                }
                Err(e) => {
                    failures += 1;
                    log_failure(&e, welcomed, failures);
                }
            }
            let delay = backoff.next_delay(rand::random::<f64>());
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

    /// Sends one allowance request to central, unless nobody waits for it any more.
    async fn send_ask(
        &mut self,
        ask: AllowanceAsk,
        send: &mut quinn::SendStream,
        pending: &mut PendingAsks,
    ) -> Result<(), SyncError> {
        let now = Instant::now();
        pending.retain(|_, (reply, deadline)| !reply.is_closed() && *deadline > now);
        if ask.reply.is_closed() || ask.deadline <= now {
            return Ok(());
        }
        if pending.len() >= MAX_PENDING_ASKS {
            tracing::warn!(
                pending = pending.len(),
                "too many allowance requests unanswered; not sending another"
            );
            return Ok(());
        }
        self.next_request_id = self.next_request_id.wrapping_add(1);
        let request_id = self.next_request_id;
        let frame = outpost_protocol::encode(&AgentMsg::AllowanceRequest {
            request_id,
            pool: ask.pool.clone(),
            qty: ask.qty,
        })?;
        write_all(send, &frame).await?;
        tracing::debug!(request_id, pool = %ask.pool.key(), qty = ask.qty, "allowance requested");
        pending.insert(request_id, (ask.reply, ask.deadline));
        Ok(())
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
        let addr = &self.settings.central_addr;
        if let Ok(a) = addr.parse::<SocketAddr>() {
            return Ok(a);
        }
        let err = |detail: String| SyncError::Resolve {
            addr: addr.clone(),
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
        let limit = attempt_timeout(self.settings.connect_timeout, self.last_rtt);
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
        self.last_rtt = Some(conn.rtt());
        let result = self.converse(&conn, welcomed).await;
        // The RTT the session ended with is the better guess for the next attempts.
        self.last_rtt = Some(conn.rtt());
        match &result {
            Err(SyncError::Protocol(reason)) | Err(SyncError::Diverged(reason)) => conn.close(
                VarInt::from_u32(CLOSE_PROTOCOL_VIOLATION),
                truncate(reason).as_bytes(),
            ),
            Err(SyncError::StoreRead(_)) | Err(SyncError::StoreWrite(_)) => {
                conn.close(VarInt::from_u32(CLOSE_LOCAL_ERROR), b"agent store error")
            }
            _ => conn.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"session ended"),
        }
        result
    }

    async fn converse(
        &mut self,
        conn: &quinn::Connection,
        welcomed: &mut bool,
    ) -> Result<SessionEnd, SyncError> {
        let limit = self.settings.connect_timeout;
        let (mut send, mut recv) = timeout(limit, conn.open_bi())
            .await
            .map_err(|_| SyncError::Timeout("opening the stream"))??;
        // The handshake only completes on an ALPN both sides list (`tls::client_config`).
        let version = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol)
            .and_then(|p| outpost_protocol::version_of_alpn(&p))
            .ok_or_else(|| SyncError::Protocol("no Outpost protocol version negotiated".into()))?;
        let marks = self.store.marks()?;
        let hello = AgentMsg::Hello(Hello {
            protocol_version: version,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            site: self.site.clone(),
            master_rev: marks.master_rev,
            last_seq: marks.last_seq,
            agent_time_ms: now_ms(),
            acked_seq: marks.acked_seq,
            retained_from_seq: marks.retained_from_seq,
            central_incarnation: marks.central_incarnation,
        });
        timeout(limit, write_frame(&mut send, &hello))
            .await
            .map_err(|_| SyncError::Timeout("sending hello"))??;
        let reply: Option<CentralMsg> = timeout(limit, read_frame(&mut recv))
            .await
            .map_err(|_| SyncError::Timeout("waiting for central's welcome"))??;
        let welcome = match reply {
            Some(CentralMsg::Welcome(w)) => w,
            Some(CentralMsg::Refuse(r)) => return Err(SyncError::Refused(r)),
            Some(other) => {
                return Err(SyncError::Protocol(format!(
                    "expected Welcome or Refuse, got {}",
                    msg_name(&other)
                )));
            }
            None => return Err(SyncError::Closed),
        };
        if welcome.protocol_version != version {
            return Err(SyncError::Protocol(format!(
                "central answered with protocol version {}, the handshake negotiated {version}",
                welcome.protocol_version
            )));
        }
        *welcomed = true;
        self.link.heard(now_ms());
        self.link.set_protocol_version(version);

        // Central's store may have been replaced (restored from a backup) since the last
        // Welcome: it may not know the grants this site holds. Settled before any Master frame of
        // the session is applied (they are read only after this, in the loop below).
        match self
            .store
            .adopt_central_incarnation(welcome.incarnation, welcome.master_from_rev)
            .await?
        {
            IncarnationChange::Unchanged => {}
            IncarnationChange::First => tracing::info!(
                incarnation = welcome.incarnation,
                "recorded the incarnation of central's store"
            ),
            IncarnationChange::Changed {
                previous,
                allowances_dropped,
                atp_dropped,
                credit_dropped,
                master_rev_before,
            } => tracing::warn!(
                previous_incarnation = previous,
                incarnation = welcome.incarnation,
                allowances_dropped,
                atp_dropped,
                credit_dropped,
                master_rev_before,
                master_rev = welcome.master_from_rev,
                "central's store changed (restored from a backup?): every allowance dropped to 0; \
                 master data resumes from revision {}",
                welcome.master_from_rev
            ),
        }

        // Central's durable mark decides where the upload resumes. It is never ahead of what
        // exists here. Behind what it acknowledged before means central lost acknowledged
        // events (restored from a backup): they are sent again from the retained rows, with
        // their original seqs and event ids, if they are still held.
        let marks = self.store.marks()?;
        if welcome.acked_seq < marks.acked_seq {
            match self.store.rewind_acked(welcome.acked_seq).await {
                Ok(from) => {
                    let resent = from - welcome.acked_seq;
                    tracing::warn!(
                        central_acked_seq = welcome.acked_seq,
                        agent_acked_seq = from,
                        resent,
                        "central is behind what it acknowledged (restored from a backup?): \
                         re-sending {resent} events"
                    );
                }
                Err(WriteError::NotRetained { retained_from, .. }) => {
                    return Err(SyncError::Diverged(format!(
                        "central reports seq {} as its high-water mark but already acknowledged \
                         {}; events {}..={} were pruned here after that ack ([outbox] \
                         retain_acked_secs and retain_acked_max_events bound what is kept) and \
                         cannot be resent (was central restored from an old backup?)",
                        welcome.acked_seq,
                        marks.acked_seq,
                        welcome.acked_seq + 1,
                        retained_from.saturating_sub(1),
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let marks = self.store.marks()?;
        let mut up = Uploader::new(self.settings.window_events, self.settings.batch_max_events);
        up.handle_welcome(welcome.acked_seq, marks.last_seq)
            .map_err(|e| SyncError::Diverged(e.to_string()))?;
        self.store.mark_acked(welcome.acked_seq).await?;
        self.link.set_connected(true);
        tracing::info!(
            acked_seq = welcome.acked_seq,
            last_seq = marks.last_seq,
            master_rev = marks.master_rev,
            central_rev = welcome.master_rev,
            central_version = %welcome.central_version,
            protocol_version = version,
            "connected to central"
        );

        let (in_tx, mut inbound) = mpsc::channel(INBOUND_QUEUE_DEPTH);
        let link = self.link.clone();
        // No timeout on each read: central may rightly say nothing for long stretches. A dead
        // link is detected by the QUIC idle timeout (keep-alives hold a healthy one open), which
        // fails the read.
        let reader = tokio::spawn(
            async move {
                loop {
                    let msg = read_frame::<CentralMsg, _>(&mut recv).await;
                    let end = !matches!(msg, Ok(Some(_)));
                    if !end {
                        link.heard(now_ms());
                    }
                    if in_tx.send(msg).await.is_err() || end {
                        break;
                    }
                }
            }
            .in_current_span(),
        );
        let (ack_tx, ack_rx) = watch::channel(welcome.acked_seq);
        let acker = tokio::spawn(persist_acks(self.store.clone(), ack_rx).in_current_span());
        let mut tasks = vec![reader, acker];
        // Heartbeats are sampled off the session loop and handed over through a one-slot queue:
        // a beat that finds the slot taken (the loop is busy writing) is skipped, not queued.
        let (hb_tx, mut heartbeats) = mpsc::channel::<Heartbeat>(1);
        if let Some((every, probe)) = self.heartbeat.clone() {
            // The first beat goes out before the upload starts, so central sees the backlog
            // built up while the link was down, not the outbox after it drained.
            if let Some(hb) = sample_heartbeat(probe.clone()).await {
                match outpost_protocol::encode(&AgentMsg::Heartbeat(hb)) {
                    Ok(frame) => write_all(&mut send, &frame).await?,
                    Err(e) => tracing::warn!(error = %e, "cannot encode a heartbeat"),
                }
            }
            tasks.push(tokio::spawn(
                run_heartbeats(every, probe, hb_tx).in_current_span(),
            ));
        }
        let _guard = TaskGuard(tasks);
        // Dropped with the session: the orders waiting on these requests then go on at once.
        let mut pending = PendingAsks::new();

        // Certificate renewal (protocol 4): checked now and every `RENEW_CHECK`; at most one
        // request in flight, and one per check.
        let mut renewal: Option<RenewalRequest> = None;
        let mut renew_check = tokio::time::interval(RENEW_CHECK);
        renew_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let mut buf: Vec<u8> = Vec::new();
        loop {
            // Send everything the window allows, several frames per write.
            let last_seq = self.store.marks()?.last_seq;
            while let Some(range) = up.poll_send(last_seq) {
                let events = self.store.outbox_range(range.clone())?;
                // One line per event, so a trace can be followed from the request to the upload.
                if tracing::enabled!(tracing::Level::DEBUG) {
                    for e in &events {
                        tracing::debug!(
                            trace_id = %e.trace_id,
                            seq = e.seq,
                            event_id = %e.event_id,
                            "event sent to central"
                        );
                    }
                }
                let frames = encode_batches(&events)?;
                for (through, frame) in frames {
                    buf.extend_from_slice(&frame);
                    up.handle_sent(through);
                    if buf.len() >= MAX_COALESCE_BYTES {
                        write_all(&mut send, &buf).await?;
                        buf.clear();
                    }
                }
                tracing::trace!(?range, "events sent");
            }
            if !buf.is_empty() {
                write_all(&mut send, &buf).await?;
                buf.clear();
            }

            tokio::select! {
                msg = inbound.recv() => {
                    match msg {
                        Some(Ok(Some(CentralMsg::Certificate { chain_pem }))) => {
                            self.install_certificate(renewal.take(), chain_pem).await;
                        }
                        Some(Ok(Some(CentralMsg::CertificateRefused { reason }))) => {
                            if renewal.take().is_some() {
                                // Kept in the health until the next renewal: bounded like a close reason.
                                let reason = truncate(&reason);
                                tracing::warn!(%reason, "central refused to renew the certificate; asking again later");
                                self.link.update_certificate(|c| c.last_error = Some(format!("central refused: {reason}")));
                            }
                        }
                        Some(Ok(Some(msg))) => {
                            self.handle_central(msg, &mut up, &ack_tx, &mut pending).await?
                        }
                        Some(Ok(None)) | None => return Ok(SessionEnd::Closed),
                        Some(Err(e)) if e.is_protocol_violation() => {
                            return Err(SyncError::Protocol(e.to_string()));
                        }
                        Some(Err(e)) => return Err(reader_error(conn, e)),
                    }
                }
                _ = self.store.new_events().notified() => {}
                Some(hb) = heartbeats.recv() => {
                    // Only a failed write ends the session; a beat that cannot be encoded is
                    // skipped.
                    match outpost_protocol::encode(&AgentMsg::Heartbeat(hb)) {
                        Ok(frame) => write_all(&mut send, &frame).await?,
                        Err(e) => tracing::warn!(error = %e, "cannot encode a heartbeat"),
                    }
                }
                ask = self.asks.recv(), if self.asks_open => match ask {
                    Some(ask) => self.send_ask(ask, &mut send, &mut pending).await?,
                    None => self.asks_open = false,
                },
                _ = renew_check.tick(), if version >= 4 && renewal.is_none() => {
                    if let Some(request) = self.renewal_request().await {
                        let frame = outpost_protocol::encode(&AgentMsg::RenewCertificate {
                            csr_der: request.csr_der.clone(),
                        })?;
                        write_all(&mut send, &frame).await?;
                        tracing::info!("asked central to renew the site certificate (new key made here)");
                        renewal = Some(request);
                    }
                }
            }
        }
    }

    /// A new key and signing request when the certificate expires within `[sync]
    /// renew_before_days` (and the clock is sane); `None` when no renewal is due.
    async fn renewal_request(&self) -> Option<RenewalRequest> {
        let cert = self.cert.as_ref()?;
        let before = i64::try_from(self.settings.renew_before.as_secs()).unwrap_or(i64::MAX);
        let now = now_ms() / 1000;
        if before == 0 || clock_sane(now, Some(cert)).is_err() || cert.not_after - now > before {
            return None;
        }
        let site = self.site.clone();
        match tokio::task::spawn_blocking(move || tls::new_renewal_request(&site)).await {
            Ok(Ok(r)) => Some(r),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot make a certificate signing request");
                self.link
                    .update_certificate(|c| c.last_error = Some(e.to_string()));
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "certificate signing request task failed");
                None
            }
        }
    }

    /// Checks and installs a renewed certificate, then uses it for the next connections (this
    /// one goes on: its TLS session is already established). Failures are logged and kept in
    /// the health; the old certificate stays in use.
    async fn install_certificate(&mut self, request: Option<RenewalRequest>, chain_pem: String) {
        let Some(request) = request else {
            tracing::warn!("central sent a certificate that was not asked for; ignored");
            return;
        };
        let (ca, cert, key, site) = (
            self.settings.ca_cert.clone(),
            self.settings.cert.clone(),
            self.settings.key.clone(),
            self.site.clone(),
        );
        let installed = tokio::task::spawn_blocking(move || {
            let info = tls::check_renewed(&ca, &site, &request, &chain_pem, now_ms() / 1000)
                .map_err(|e| e.to_string())?;
            tls::install_renewed(&cert, &key, &chain_pem, &request.key_pem)
                .map_err(|e| format!("cannot write the renewed certificate: {e}"))?;
            Ok::<_, String>(info)
        })
        .await
        .unwrap_or_else(|e| Err(format!("renewal task failed: {e}")));
        let result = installed.and_then(|info| {
            let cfg = client_config(&self.settings)
                .map_err(|e| format!("the renewed certificate cannot be loaded: {e}"))?;
            Ok((info, cfg))
        });
        match result {
            Ok((info, cfg)) => {
                self.client_config = cfg;
                tracing::info!(
                    not_after = %crate::store::rfc3339_millis(info.not_after.saturating_mul(1000)),
                    "installed the renewed site certificate; the next connection uses it"
                );
                self.link.update_certificate(|c| {
                    c.not_after = Some(info.not_after);
                    c.renewed_at_ms = Some(now_ms());
                    c.renewals += 1;
                    c.last_error = None;
                });
                self.cert = Some(info);
            }
            Err(e) => {
                tracing::error!(error = %e, "certificate renewal failed; keeping the current certificate");
                self.link.update_certificate(|c| c.last_error = Some(e));
            }
        }
    }

    async fn handle_central(
        &mut self,
        msg: CentralMsg,
        up: &mut Uploader,
        ack_tx: &watch::Sender<u64>,
        pending: &mut PendingAsks,
    ) -> Result<(), SyncError> {
        match msg {
            CentralMsg::Ack { through_seq } => {
                let advanced = up
                    .handle_ack(through_seq)
                    .map_err(|e| SyncError::Protocol(e.to_string()))?;
                if advanced {
                    // Persisted by the acker task, so the upload does not wait for the fsync.
                    ack_tx.send_replace(through_seq);
                }
                Ok(())
            }
            CentralMsg::Master(batch) => {
                let (from, through, n) = (batch.from_rev, batch.through_rev, batch.changes.len());
                match self.store.apply_master(batch).await {
                    Ok(applied) => {
                        tracing::debug!(from, through, changes = n, applied, "master batch");
                        Ok(())
                    }
                    Err(WriteError::BadMasterBatch(reason)) => Err(SyncError::Protocol(reason)),
                    Err(e) => Err(e.into()),
                }
            }
            CentralMsg::AllowanceReply {
                request_id,
                granted,
                rev,
                reason,
            } => {
                if granted < 0 {
                    return Err(SyncError::Protocol(format!(
                        "allowance reply {request_id} grants a negative quantity {granted}"
                    )));
                }
                match pending.remove(&request_id) {
                    Some((reply, _)) => {
                        tracing::debug!(request_id, granted, rev, %reason, "allowance reply");
                        let _ = reply.send(AllowanceAnswer {
                            granted,
                            rev,
                            reason,
                        });
                    }
                    // Its order stopped waiting (deadline) before the answer came; a grant still
                    // arrives as a master change and stays in the site's allowance.
                    None => tracing::debug!(request_id, granted, "late allowance reply"),
                }
                Ok(())
            }
            CentralMsg::Refuse(r) => Err(SyncError::Refused(r)),
            CentralMsg::Welcome(_) => Err(SyncError::Protocol(
                "a second Welcome in one session".into(),
            )),
            // Handled by the session loop, which holds the renewal in flight.
            CentralMsg::Certificate { .. } | CentralMsg::CertificateRefused { .. } => Ok(()),
        }
    }
}

/// One heartbeat, sampled on the blocking pool (`/proc`, `statvfs` and redb reads).
async fn sample_heartbeat(probe: Arc<std::sync::Mutex<HealthProbe>>) -> Option<Heartbeat> {
    let sampled = tokio::task::spawn_blocking(move || {
        probe
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .sample()
    })
    .await;
    match sampled {
        Ok(hb) => Some(hb),
        Err(e) => {
            tracing::warn!(error = %e, "sampling a heartbeat failed");
            None
        }
    }
}

/// Samples a heartbeat every `every` (the first one `every` after the session's first) and hands it to the session loop until
/// the session ends (the receiver is dropped).
async fn run_heartbeats(
    every: Duration,
    probe: Arc<std::sync::Mutex<HealthProbe>>,
    out: mpsc::Sender<Heartbeat>,
) {
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(hb) = sample_heartbeat(probe.clone()).await else {
            continue;
        };
        match out.try_send(hb) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!("previous heartbeat not sent yet; skipping this one");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// Persists the latest acknowledged seq, coalescing acks that arrive during a commit.
async fn persist_acks(store: Store, mut rx: watch::Receiver<u64>) {
    while rx.changed().await.is_ok() {
        let through = *rx.borrow_and_update();
        if let Err(e) = store.mark_acked(through).await {
            // The rows stay in the outbox; the next Welcome carries central's mark again.
            tracing::warn!(error = %e, through, "could not record central's ack");
            break;
        }
    }
}

/// Encodes `events` as one `Events` frame, or several if one would exceed the frame limit
/// (large orders). Returns each frame with the last seq it carries.
fn encode_batches(events: &[EventEnvelope]) -> Result<Vec<(u64, Vec<u8>)>, SyncError> {
    let mut out = Vec::new();
    let mut stack: Vec<&[EventEnvelope]> = vec![events];
    while let Some(slice) = stack.pop() {
        let Some(last) = slice.last() else { continue };
        match outpost_protocol::encode(&AgentMsg::Events(slice.to_vec())) {
            Ok(frame) => out.push((last.seq, frame)),
            Err(FrameError::TooLarge { .. }) if slice.len() > 1 => {
                let (a, b) = slice.split_at(slice.len() / 2);
                // Pushed in reverse so `a` is encoded (and sent) first.
                stack.push(b);
                stack.push(a);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

async fn write_all(send: &mut quinn::SendStream, buf: &[u8]) -> Result<(), SyncError> {
    timeout(WRITE_TIMEOUT, send.write_all(buf))
        .await
        .map_err(|_| SyncError::Timeout("writing to central"))??;
    Ok(())
}

/// A transport error from the reader: prefer the connection's own close reason (it says
/// whether central closed it, the idle timeout fired, or it was reset).
fn reader_error(conn: &quinn::Connection, e: FrameError) -> SyncError {
    match conn.close_reason() {
        Some(reason) => SyncError::Connection(reason),
        None => SyncError::Frame(e),
    }
}

fn msg_name(m: &CentralMsg) -> &'static str {
    match m {
        CentralMsg::Welcome(_) => "Welcome",
        CentralMsg::Refuse(_) => "Refuse",
        CentralMsg::Ack { .. } => "Ack",
        CentralMsg::Master(_) => "Master",
        CentralMsg::AllowanceReply { .. } => "AllowanceReply",
        CentralMsg::Certificate { .. } => "Certificate",
        CentralMsg::CertificateRefused { .. } => "CertificateRefused",
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
        SyncError::Diverged(_)
            | SyncError::Refused(Refuse {
                code: RefuseCode::IncompatibleVersion | RefuseCode::WrongSite | RefuseCode::Revoked,
                ..
            })
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
mod tests {
    use super::*;
    use crate::store::{NewMilestone, StoreWriter};
    use crate::testutil::{Pki, catalogue, grants};
    use crate::topup::TopUp;
    use outpost_protocol::{
        EventBody, Grant, MasterChange, Milestone, MilestoneKind, PROTOCOL_VERSION, Pool, Welcome,
    };
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::path::Path;

    const CENTRAL_NAME: &str = "central.outpost.local";

    /// A scripted central: mTLS with the fleet CA, ALPN, one stream per connection.
    fn fake_central(pki: &Pki) -> quinn::Endpoint {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let (cert, key) = pki.server(CENTRAL_NAME);
        let mut scfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap();
        scfg.alpn_protocols = vec![outpost_protocol::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(scfg).unwrap();
        quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(crypto)),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap()
    }

    fn settings(dir: &Path, pki: &Pki, central: SocketAddr) -> SyncSettings {
        pki.write_site_files(dir, "plant-1");
        SyncSettings {
            central_addr: central.to_string(),
            central_name: CENTRAL_NAME.into(),
            ca_cert: dir.join("ca.pem"),
            cert: dir.join("plant-1.pem"),
            key: dir.join("plant-1.key"),
            connect_timeout: Duration::from_secs(3),
            keep_alive: Duration::from_millis(200),
            idle_timeout: Duration::from_secs(2),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            batch_max_events: 4,
            window_events: 8,
            send_window_bytes: 1 << 20,
            receive_window_bytes: 1 << 20,
            protocol_version_max: PROTOCOL_VERSION,
            renew_before: Duration::ZERO,
        }
    }

    fn scan(id: &str) -> NewMilestone {
        NewMilestone {
            event_id: id.into(),
            shipment_id: "SH-1".into(),
            milestone: MilestoneKind::Picked,
            scanner_id: "scanner-1".into(),
            at: "2026-11-26T10:00:00Z".into(),
        }
    }

    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// Accepts one session, checks the hello, welcomes with `acked`, pushes `master`, then acks
    /// every contiguous batch until the agent closes or `stop` fires. Returns the seqs received.
    async fn serve_session(
        ep: &quinn::Endpoint,
        acked: u64,
        master: Option<outpost_protocol::MasterBatch>,
        seen: Arc<std::sync::Mutex<Vec<u64>>>,
        stop_after: Option<u64>,
    ) -> quinn::Connection {
        let script = Script {
            acked,
            master,
            stop_after,
            ..Script::default()
        };
        let record = move |evs: &[EventEnvelope]| {
            seen.lock().unwrap().extend(evs.iter().map(|e| e.seq));
        };
        serve_scripted(ep, script, record).await.0
    }

    /// What a scripted central answers in one session.
    struct Script {
        /// The Welcome's high-water mark.
        acked: u64,
        incarnation: u64,
        /// The Welcome's `master_from_rev`; `None`: the Hello's `master_rev`.
        master_from_rev: Option<u64>,
        /// Sent right after the Welcome.
        master: Option<outpost_protocol::MasterBatch>,
        /// Cut the link, unacked, once this seq has arrived.
        stop_after: Option<u64>,
    }

    impl Default for Script {
        fn default() -> Self {
            Script {
                acked: 0,
                incarnation: 1,
                master_from_rev: None,
                master: None,
                stop_after: None,
            }
        }
    }

    /// `serve_session` as scripted: `record` gets the new events of each batch (duplicates of
    /// what central already holds left out). Returns the connection and the agent's Hello.
    async fn serve_scripted(
        ep: &quinn::Endpoint,
        script: Script,
        record: impl Fn(&[EventEnvelope]) + Send + 'static,
    ) -> (quinn::Connection, Hello) {
        let conn = ep.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let hello: AgentMsg = read_frame(&mut recv).await.unwrap().unwrap();
        let AgentMsg::Hello(h) = hello else {
            panic!("expected hello")
        };
        assert_eq!(h.site, "plant-1");
        assert_eq!(h.protocol_version, PROTOCOL_VERSION);
        write_frame(
            &mut send,
            &CentralMsg::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                central_version: "test".into(),
                acked_seq: script.acked,
                master_rev: 5,
                incarnation: script.incarnation,
                master_from_rev: script.master_from_rev.unwrap_or(h.master_rev),
            }),
        )
        .await
        .unwrap();
        if let Some(m) = script.master {
            write_frame(&mut send, &CentralMsg::Master(m))
                .await
                .unwrap();
        }
        let conn2 = conn.clone();
        let (acked, stop_after) = (script.acked, script.stop_after);
        tokio::spawn(async move {
            let mut hwm = acked;
            while let Ok(Some(AgentMsg::Events(batch))) = read_frame::<AgentMsg, _>(&mut recv).await
            {
                let plan = outpost_protocol::session::plan_ingest("plant-1", hwm, &batch).unwrap();
                record(&batch[plan.duplicates..]);
                hwm = plan.new_hwm;
                if stop_after.is_some_and(|s| hwm >= s) {
                    // Drop the link without acking: the agent must resend after reconnecting.
                    conn2.close(VarInt::from_u32(9), b"test cut");
                    return;
                }
                if write_frame(&mut send, &CentralMsg::Ack { through_seq: hwm })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        (conn, h)
    }

    /// A sync client for `store` towards `central`, running until the returned sender fires.
    fn start_client(
        dir: &Path,
        pki: &Pki,
        central: &quinn::Endpoint,
        store: &Store,
    ) -> (Arc<LinkState>, watch::Sender<bool>, JoinHandle<()>) {
        let link = Arc::new(LinkState::default());
        let (_ask_tx, ask_rx) = mpsc::channel(crate::topup::ASK_QUEUE_DEPTH);
        let client = SyncClient::new(
            settings(dir, pki, central.local_addr().unwrap()),
            "plant-1".into(),
            store.clone(),
            link.clone(),
            ask_rx,
        )
        .unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        (link, stop_tx, tokio::spawn(client.run(stop_rx)))
    }

    async fn stop_client(stop: watch::Sender<bool>, task: JoinHandle<()>) {
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("sync task stops on shutdown")
            .unwrap();
    }

    /// Goal: a central restored from a backup (its Welcome's mark below what it acknowledged)
    /// receives the acknowledged events the agent retained again, with their original seqs and
    /// event ids, and the agent's Hello tells it what it holds; guards against losing the events
    /// central acknowledged after its backup.
    /// Method: central acks all 20 events, the link is cut, the next central welcomes with 5.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_central_behind_its_acks_gets_the_retained_events_again() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let central = fake_central(&pki);
        let (store, writer) = Store::open(&dir.path().join("agent.redb"), "plant-1").unwrap();
        for i in 0..20 {
            store
                .record_milestone(scan(&format!("e{i}")), now_ms())
                .await
                .unwrap();
        }
        let (link, stop, task) = start_client(dir.path(), &pki, &central, &store);
        let first = Arc::new(std::sync::Mutex::new(Vec::new()));
        let rec = first.clone();
        let (c1, h1) = serve_scripted(&central, Script::default(), move |evs| {
            rec.lock().unwrap().extend(evs.iter().cloned())
        })
        .await;
        assert_eq!(
            (h1.acked_seq, h1.retained_from_seq, h1.central_incarnation),
            (0, 1, 0)
        );
        eventually("all acked", || store.marks().unwrap().acked_seq == 20).await;
        assert_eq!(store.marks().unwrap().outbox_depth(), 0);
        c1.close(VarInt::from_u32(9), b"central restored");

        let again = Arc::new(std::sync::Mutex::new(Vec::new()));
        let rec = again.clone();
        let script = Script {
            acked: 5,
            ..Script::default()
        };
        let (_c2, h2) = serve_scripted(&central, script, move |evs| {
            rec.lock().unwrap().extend(evs.iter().cloned())
        })
        .await;
        assert_eq!(
            (h2.acked_seq, h2.retained_from_seq, h2.last_seq),
            (20, 1, 20),
            "the hello names the acked mark and the retained rows"
        );
        assert_eq!(h2.central_incarnation, 1);
        eventually("re-sent and acked", || again.lock().unwrap().len() == 15).await;
        let first = first.lock().unwrap().clone();
        let again = again.lock().unwrap().clone();
        assert_eq!(again, first[5..], "same seqs, event ids and bodies");
        eventually("acked again", || store.marks().unwrap().acked_seq == 20).await;
        assert!(link.is_connected());
        stop_client(stop, task).await;
        writer.shutdown().await;
    }

    /// Goal: when the events a lagging central needs were pruned, the agent refuses to go on
    /// (`Diverged`) and says why, naming the retention keys, instead of silently skipping them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_central_behind_pruned_events_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let central = fake_central(&pki);
        let (store, writer) = Store::open(&dir.path().join("agent.redb"), "plant-1").unwrap();
        // Stored at 1 ms after the epoch: past the default week as soon as they are acked.
        for i in 0..6 {
            store
                .record_milestone(scan(&format!("e{i}")), 1)
                .await
                .unwrap();
        }
        let (_link, stop, task) = start_client(dir.path(), &pki, &central, &store);
        let (c1, _) = serve_scripted(&central, Script::default(), |_| {}).await;
        eventually("all acked", || store.marks().unwrap().acked_seq == 6).await;
        assert_eq!(store.marks().unwrap().retained_acked(), 0);
        c1.close(VarInt::from_u32(9), b"central restored");

        let script = Script {
            acked: 2,
            ..Script::default()
        };
        let (c2, h2) = serve_scripted(&central, script, |_| {}).await;
        assert_eq!((h2.acked_seq, h2.retained_from_seq), (6, 7));
        let closed = tokio::time::timeout(Duration::from_secs(5), c2.closed())
            .await
            .unwrap();
        let quinn::ConnectionError::ApplicationClosed(close) = closed else {
            panic!("expected the agent to close: {closed:?}")
        };
        assert_eq!(close.error_code, VarInt::from_u32(CLOSE_PROTOCOL_VIOLATION));
        let reason = String::from_utf8_lossy(&close.reason).to_string();
        assert!(reason.contains("events 3..=6 were pruned"), "{reason}");
        assert!(reason.contains("retain_acked_secs"), "{reason}");
        assert_eq!(store.marks().unwrap().acked_seq, 6, "nothing rewound");
        stop_client(stop, task).await;
        writer.shutdown().await;
    }

    /// Goal: the first incarnation a Welcome names is recorded without touching allowances; the
    /// same one again changes nothing; a new one (central restored) drops every allowance to 0
    /// and sets the applied revision to `master_from_rev` before the session's first Master
    /// frame, which then applies from there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_changed_central_incarnation_drops_allowances_before_master_data() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let central = fake_central(&pki);
        let (store, writer) = Store::open(&dir.path().join("agent.redb"), "plant-1").unwrap();
        let gear = Pool::atp("GEAR-12T");
        store.apply_master(catalogue(0, 5)).await.unwrap();
        store
            .apply_master(grants(5, 8, &[(gear.clone(), 9)]))
            .await
            .unwrap();
        let (_link, stop, task) = start_client(dir.path(), &pki, &central, &store);
        let cut = |c: quinn::Connection| c.close(VarInt::from_u32(9), b"next session");

        for session in 0..2 {
            let (c, h) = serve_scripted(&central, Script::default(), |_| {}).await;
            assert_eq!(h.central_incarnation, session, "0 before the first Welcome");
            eventually("incarnation recorded", || {
                store.marks().unwrap().central_incarnation == 1
            })
            .await;
            cut(c);
        }
        assert_eq!(store.allowance(&gear).unwrap(), 9, "unchanged: kept");
        assert_eq!(store.marks().unwrap().master_rev, 8);

        let script = Script {
            incarnation: 2,
            master_from_rev: Some(3),
            master: Some(grants(3, 4, &[(gear.clone(), 2)])),
            ..Script::default()
        };
        let (_c, h) = serve_scripted(&central, script, |_| {}).await;
        assert_eq!((h.central_incarnation, h.master_rev), (1, 8));
        eventually("master resumed from 3", || {
            store.marks().unwrap().master_rev == 4
        })
        .await;
        assert_eq!(store.allowance(&gear).unwrap(), 2, "only the new grant");
        assert_eq!(store.marks().unwrap().central_incarnation, 2);
        stop_client(stop, task).await;
        writer.shutdown().await;
    }

    /// Goal: against a scripted central over real QUIC + mTLS, the agent uploads its whole
    /// outbox in order within the window, records acks durably, applies master data with its
    /// revision, uploads new events as they are committed, survives a cut link by resuming from
    /// central's mark, and reports `connected` accordingly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uploads_acks_master_and_resumes_after_a_cut() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let central = fake_central(&pki);
        let addr = central.local_addr().unwrap();
        let (store, writer): (Store, StoreWriter) =
            Store::open(&dir.path().join("agent.redb"), "plant-1").unwrap();
        for i in 0..30 {
            store
                .record_milestone(scan(&format!("e{i}")), 1)
                .await
                .unwrap();
        }
        let link = Arc::new(LinkState::default());
        let (_ask_tx, ask_rx) = mpsc::channel(crate::topup::ASK_QUEUE_DEPTH);
        let client = SyncClient::new(
            settings(dir.path(), &pki, addr),
            "plant-1".into(),
            store.clone(),
            link.clone(),
            ask_rx,
        )
        .unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(client.run(stop_rx));

        // First session: central has nothing; it cuts the link once 12 events arrived, unacked.
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let _c1 = serve_session(&central, 0, Some(catalogue(0, 5)), seen.clone(), Some(12)).await;
        eventually("master applied", || store.marks().unwrap().master_rev == 5).await;
        assert_eq!(store.atp("GEAR-12T").unwrap(), Some((40, 5)));
        eventually("first batches", || seen.lock().unwrap().len() >= 12).await;

        // Second session: central says it durably has 10 of them; the agent resends from 11.
        let seen2 = Arc::new(std::sync::Mutex::new(Vec::new()));
        let _c2 = serve_session(&central, 10, None, seen2.clone(), None).await;
        eventually("outbox drained", || store.marks().unwrap().acked_seq == 30).await;
        assert_eq!(*seen2.lock().unwrap(), (11..=30).collect::<Vec<_>>());
        assert!(link.is_connected());
        assert_eq!(store.outbox_rows().unwrap(), 0);

        // A new local commit is uploaded without any polling delay.
        store.record_milestone(scan("late"), 2).await.unwrap();
        eventually("new event acked", || store.marks().unwrap().acked_seq == 31).await;
        assert_eq!(seen2.lock().unwrap().last(), Some(&31));

        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("sync task stops on shutdown")
            .unwrap();
        assert!(!link.is_connected());
        writer.shutdown().await;
    }

    /// Goal: the first heartbeat of a session goes out right after the Welcome and before any
    /// event, so it shows the backlog built while offline; later ones follow every interval.
    /// Method: 5 events in the outbox, a scripted central that reads the frames in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_heartbeat_precedes_the_upload() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let central = fake_central(&pki);
        let addr = central.local_addr().unwrap();
        let path = dir.path().join("agent.redb");
        let (store, writer) = Store::open(&path, "plant-1").unwrap();
        for i in 0..5 {
            store
                .record_milestone(scan(&format!("e{i}")), 1_000 + i)
                .await
                .unwrap();
        }
        let link = Arc::new(LinkState::default());
        let (_ask_tx, ask_rx) = mpsc::channel(crate::topup::ASK_QUEUE_DEPTH);
        let probe = HealthProbe::new(
            store.clone(),
            path,
            Arc::new(crate::api::ApiCounters::default()),
        );
        let client = SyncClient::new(
            settings(dir.path(), &pki, addr),
            "plant-1".into(),
            store.clone(),
            link.clone(),
            ask_rx,
        )
        .unwrap()
        .with_heartbeat(Duration::from_millis(200), probe);
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(client.run(stop_rx));

        let conn = central.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let Some(AgentMsg::Hello(_)) = read_frame(&mut recv).await.unwrap() else {
            panic!("expected hello")
        };
        let welcome = CentralMsg::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            central_version: "test".into(),
            acked_seq: 0,
            master_rev: 0,
            incarnation: 1,
            master_from_rev: 0,
        });
        write_frame(&mut send, &welcome).await.unwrap();
        let first: AgentMsg = read_frame(&mut recv).await.unwrap().unwrap();
        let AgentMsg::Heartbeat(hb) = first else {
            panic!("expected a heartbeat first, got {first:?}")
        };
        assert_eq!(hb.outbox_events, 5);
        assert_eq!(hb.oldest_unsynced_ms, Some(1_000));
        // Events follow (not acked here), then the next heartbeat within a bounded number of
        // frames.
        let mut beats = 0;
        for _ in 0..20 {
            match read_frame::<AgentMsg, _>(&mut recv).await.unwrap().unwrap() {
                AgentMsg::Heartbeat(_) => {
                    beats += 1;
                    break;
                }
                AgentMsg::Events(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(beats, 1, "a second heartbeat follows");
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        writer.shutdown().await;
    }

    /// Goal: a refusal ends the session and the agent retries with backoff; an unreachable
    /// central leaves `connected` false and the agent keeps trying.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_sessions_are_retried() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let central = fake_central(&pki);
        let addr = central.local_addr().unwrap();
        let (store, writer) = Store::open(&dir.path().join("agent.redb"), "plant-1").unwrap();
        let link = Arc::new(LinkState::default());
        let (_ask_tx, ask_rx) = mpsc::channel(crate::topup::ASK_QUEUE_DEPTH);
        let client = SyncClient::new(
            settings(dir.path(), &pki, addr),
            "plant-1".into(),
            store.clone(),
            link.clone(),
            ask_rx,
        )
        .unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(client.run(stop_rx));
        for _ in 0..3 {
            let conn = central.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let _hello: AgentMsg = read_frame(&mut recv).await.unwrap().unwrap();
            write_frame(
                &mut send,
                &CentralMsg::Refuse(Refuse {
                    code: RefuseCode::Superseded,
                    reason: "test".into(),
                }),
            )
            .await
            .unwrap();
            let _ = send.finish();
            assert!(!link.is_connected());
        }
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        writer.shutdown().await;
    }

    /// A scripted central for the top-up tests: welcomes, acks every batch, and answers each
    /// `AllowanceRequest` with a grant of all that was asked, the reply first and the grant's
    /// master change a moment later (so the agent must wait for the revision, not only the
    /// reply), or, when `answer` is false, never answers. Records every request.
    async fn allowance_central(
        ep: quinn::Endpoint,
        answer: bool,
        asked: Arc<std::sync::Mutex<Vec<(Pool, i64)>>>,
    ) {
        let conn = ep.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let Some(AgentMsg::Hello(h)) = read_frame(&mut recv).await.unwrap() else {
            panic!("expected hello")
        };
        let mut rev = h.master_rev;
        let welcome = CentralMsg::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            central_version: "test".into(),
            acked_seq: 0,
            master_rev: rev,
            incarnation: 1,
            master_from_rev: h.master_rev,
        });
        write_frame(&mut send, &welcome).await.unwrap();
        let mut hwm = 0;
        while let Ok(Some(msg)) = read_frame::<AgentMsg, _>(&mut recv).await {
            match msg {
                AgentMsg::Heartbeat(_) | AgentMsg::RenewCertificate { .. } => {}
                AgentMsg::Events(batch) => {
                    let plan =
                        outpost_protocol::session::plan_ingest("plant-1", hwm, &batch).unwrap();
                    hwm = plan.new_hwm;
                    let ack = CentralMsg::Ack { through_seq: hwm };
                    if write_frame(&mut send, &ack).await.is_err() {
                        return;
                    }
                }
                AgentMsg::AllowanceRequest {
                    request_id,
                    pool,
                    qty,
                } => {
                    asked.lock().unwrap().push((pool.clone(), qty));
                    if !answer {
                        continue;
                    }
                    rev += 1;
                    let reply = CentralMsg::AllowanceReply {
                        request_id,
                        granted: qty,
                        rev,
                        reason: "granted".into(),
                    };
                    write_frame(&mut send, &reply).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    let grant = CentralMsg::Master(outpost_protocol::MasterBatch {
                        from_rev: rev - 1,
                        through_rev: rev,
                        changes: vec![MasterChange::Grant(Grant {
                            site: "plant-1".into(),
                            pool,
                            qty,
                        })],
                    });
                    write_frame(&mut send, &grant).await.unwrap();
                }
                AgentMsg::Hello(_) => panic!("a second hello"),
            }
        }
    }

    /// An agent (store, sync client, API with online top-up) connected to `allowance_central`.
    struct TopUpRig {
        app: axum::Router,
        store: Store,
        writer: StoreWriter,
        stop: watch::Sender<bool>,
        task: JoinHandle<()>,
        asked: Arc<std::sync::Mutex<Vec<(Pool, i64)>>>,
        _central: quinn::Endpoint,
        _dir: tempfile::TempDir,
    }

    impl TopUpRig {
        /// The site holds 3 gears and 100.00 of ACME's credit.
        async fn start(answer: bool, deadline: Duration) -> TopUpRig {
            let dir = tempfile::tempdir().unwrap();
            let pki = Pki::new();
            let central = fake_central(&pki);
            let addr = central.local_addr().unwrap();
            let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
            tokio::spawn(allowance_central(central.clone(), answer, asked.clone()));
            let (store, writer) = Store::open(&dir.path().join("agent.redb"), "plant-1").unwrap();
            store.apply_master(catalogue(0, 5)).await.unwrap();
            let allowance = [
                (Pool::atp("GEAR-12T"), 3),
                (Pool::credit("ACME"), 1_000_000),
            ];
            store.apply_master(grants(5, 6, &allowance)).await.unwrap();
            let link = Arc::new(LinkState::default());
            let (ask_tx, ask_rx) = mpsc::channel(crate::topup::ASK_QUEUE_DEPTH);
            let client = SyncClient::new(
                settings(dir.path(), &pki, addr),
                "plant-1".into(),
                store.clone(),
                link.clone(),
                ask_rx,
            )
            .unwrap();
            let (stop, stop_rx) = watch::channel(false);
            let task = tokio::spawn(client.run(stop_rx));
            let topup = TopUp::new(ask_tx, deadline, store.master_rev_watch(), link.clone());
            let app = crate::router::router_with(
                crate::api::ApiState {
                    store: store.clone(),
                    site: "plant-1".into(),
                    link: link.clone(),
                    topup: Some(topup),
                    max_body_bytes: 65536,
                },
                crate::api::Boundary::admin_tokens(&[TOKEN]),
            );
            eventually("connected", || link.is_connected()).await;
            assert_eq!(link.stale_secs(now_ms()), Some(0));
            TopUpRig {
                app,
                store,
                writer,
                stop,
                task,
                asked,
                _central: central,
                _dir: dir,
            }
        }

        async fn order(&self, key: &str, qty: i64) -> serde_json::Value {
            use tower::ServiceExt;
            let body =
                format!(r#"{{"customer_id":"ACME","lines":[{{"sku":"GEAR-12T","qty":{qty}}}]}}"#);
            let req = axum::http::Request::post("/v1/orders")
                .header("authorization", format!("Bearer {TOKEN}"))
                .header("idempotency-key", key)
                .body(axum::body::Body::from(body))
                .unwrap();
            let resp = self.app.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.status().as_u16(), 201);
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            serde_json::from_slice(&bytes).unwrap()
        }

        async fn stop(self) {
            self.stop.send(true).unwrap();
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .unwrap()
                .unwrap();
            drop(self.app);
            drop(self.store);
            self.writer.shutdown().await;
        }
    }

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    /// Goal: online, an order beyond the site's allowance asks central for exactly the
    /// shortfall and is confirmed once the grant's revision is applied; a retry asks nothing.
    /// Method: a scripted central over real QUIC that grants what is asked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn online_top_up_confirms_beyond_the_allowance() {
        // A generous deadline: this test is about the outcome, not the speed.
        let rig = TopUpRig::start(true, Duration::from_secs(5)).await;
        let v = rig.order("t-1", 5).await;
        assert_eq!(v["status"], "confirmed", "{v}");
        assert_eq!(v["lines"][0]["promise"], "confirmed");
        assert_eq!(v["offline"], false);
        assert_eq!(v["master_rev"], 7, "captured against the granted revision");
        assert_eq!(*rig.asked.lock().unwrap(), [(Pool::atp("GEAR-12T"), 2)]);
        assert_eq!(rig.store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 0);
        let again = rig.order("t-1", 5).await;
        assert_eq!(again, v);
        assert_eq!(
            rig.asked.lock().unwrap().len(),
            1,
            "a retry asks for nothing"
        );
        rig.stop().await;
    }

    /// Goal: online, when central never answers, the order comes back pending (never
    /// confirmed, never lost) once the request deadline passes. The elapsed-time check is only
    /// an upper bound with generous slack (a hang would fail it), not a timing goal.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unanswered_top_up_leaves_the_order_pending_within_the_deadline() {
        let deadline = Duration::from_millis(300);
        let rig = TopUpRig::start(false, deadline).await;
        let started = std::time::Instant::now();
        let v = rig.order("t-2", 5).await;
        let took = started.elapsed();
        assert_eq!(v["status"], "pending", "{v}");
        assert_eq!(v["lines"][0]["promise"], "pending_allowance");
        assert_eq!(v["offline"], false);
        assert!(took < deadline + Duration::from_secs(3), "took {took:?}");
        eventually("request seen", || rig.asked.lock().unwrap().len() == 1).await;
        assert_eq!(rig.store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 3);
        rig.stop().await;
    }

    /// Goal: `stale_secs` is 0 while connected, counts from the last time central was heard
    /// from otherwise (never moving back), and is unknown if central was never heard from.
    #[test]
    fn a_clock_before_the_floor_or_the_certificate_is_not_trusted() {
        assert!(clock_sane(TIME_FLOOR_UNIX, None).is_ok());
        let why = clock_sane(946_684_800, None).unwrap_err(); // 2000-01-01
        assert!(
            why.contains("2000-01-01") && why.contains("waiting for a sane clock"),
            "{why}"
        );
        let cert = CertInfo {
            not_before: TIME_FLOOR_UNIX + 86_400,
            not_after: TIME_FLOOR_UNIX + 400 * 86_400,
            site: "plant-1".into(),
        };
        let why = clock_sane(TIME_FLOOR_UNIX + 3_600, Some(&cert)).unwrap_err();
        assert!(why.contains("certificate"), "{why}");
        assert!(clock_sane(TIME_FLOOR_UNIX + 2 * 86_400, Some(&cert)).is_ok());
    }

    #[test]
    fn stale_secs_counts_from_the_last_frame() {
        let link = LinkState::new(None);
        assert_eq!(link.stale_secs(1_000_000), None);
        link.heard(1_000_000);
        link.heard(900_000);
        assert_eq!(link.stale_secs(1_061_999), Some(61));
        link.set_connected(true);
        assert_eq!(link.stale_secs(5_000_000), Some(0));
        link.set_connected(false);
        assert_eq!(link.stale_secs(1_002_000), Some(2));
        assert_eq!(LinkState::new(Some(10_000)).stale_secs(20_000), Some(10));
    }

    /// Goal: an attempt gets ten round trips of the last link, at least a second, never more
    /// than the configured connect timeout.
    #[test]
    fn attempts_are_shortened_by_a_known_rtt_within_bounds() {
        let cap = Duration::from_secs(3);
        assert_eq!(
            attempt_timeout(cap, None),
            cap,
            "no RTT known: the configured timeout"
        );
        assert_eq!(
            attempt_timeout(cap, Some(Duration::from_micros(300))),
            MIN_ATTEMPT_TIMEOUT,
            "a fast link: tried again every second"
        );
        assert_eq!(
            attempt_timeout(cap, Some(Duration::from_millis(200))),
            Duration::from_secs(2),
            "ten round trips"
        );
        assert_eq!(
            attempt_timeout(cap, Some(Duration::from_millis(600))),
            cap,
            "never beyond the configured timeout"
        );
        assert_eq!(
            attempt_timeout(Duration::from_millis(500), Some(Duration::from_micros(300))),
            Duration::from_millis(500),
            "a configured timeout below the floor wins"
        );
    }

    /// Goal: the n-th delay is uniform in [0, min(cap, initial·2^n)].
    #[test]
    fn backoff_is_capped_exponential_with_full_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(2000));
        let ceilings: Vec<u128> = (0..8)
            .map(|_| {
                let c = b.ceiling().as_millis();
                assert!(b.next_delay(0.999_999).as_millis() <= c);
                c
            })
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(
            b.next_delay(0.0),
            Duration::ZERO,
            "full jitter reaches zero"
        );
        for _ in 0..100 {
            b.next_delay(0.5);
        }
        assert_eq!(b.ceiling(), Duration::from_millis(2000), "no overflow");
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    fn big_event(seq: u64, bytes: usize) -> EventEnvelope {
        EventEnvelope::new(
            "plant-1",
            seq,
            &format!("e{seq}"),
            0,
            &EventBody::Milestone(Milestone {
                shipment_id: "S".into(),
                milestone: MilestoneKind::Picked,
                scanner_id: "s".into(),
                at: "x".repeat(bytes),
            }),
        )
    }

    /// Goal: a batch whose frame would exceed the frame limit is split, in order, and every
    /// event is carried exactly once.
    #[test]
    fn oversized_batches_are_split_in_order() {
        let events: Vec<_> = (1..=10).map(|s| big_event(s, 1024 * 1024)).collect();
        let frames = encode_batches(&events).unwrap();
        assert!(frames.len() > 1);
        let mut seqs = Vec::new();
        for (through, f) in &frames {
            assert!(f.len() - 4 <= outpost_protocol::MAX_FRAME_BYTES);
            let msg: AgentMsg = outpost_protocol::decode_body(&f[4..]).unwrap();
            let AgentMsg::Events(evs) = msg else { panic!() };
            assert_eq!(evs.last().unwrap().seq, *through);
            seqs.extend(evs.iter().map(|e| e.seq));
        }
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
        let small: Vec<_> = (1..=3).map(|s| big_event(s, 10)).collect();
        assert_eq!(encode_batches(&small).unwrap().len(), 1);
    }
}
