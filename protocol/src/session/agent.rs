//! The agent's side of one sync session as a pure state machine (sans-IO, in quinn-proto's
//! shape): central's messages, storage completions and time go in (`handle_*`); frames to send
//! (`poll_transmit`), requests for the store and the host (`poll_request`), things to tell the
//! rest of the agent (`poll_event`) and the next deadline (`poll_timeout`) come out. It never
//! touches a socket, redb, tokio or the clock: the agent's sync driver and the simulation both
//! drive this same machine.
//!
//! The rules it keeps:
//! - Central's Welcome must carry the negotiated protocol version; anything but Welcome or Refuse
//!   first is a violation.
//! - Central's store incarnation is adopted before any Master frame is applied; a central behind
//!   what it acknowledged gets the retained events again (rewind), or the session ends with a
//!   divergence when they were pruned.
//! - The upload resumes after central's durable mark, within the in-flight window; an ack beyond
//!   what was sent is a violation; every ack that advances the mark is persisted, and a failed
//!   persist ends the session.
//! - Master batches are applied one at a time, in arrival order.
//! - The first heartbeat goes out before the upload, then one per interval; renewal is checked
//!   at the start and every interval on protocol 4, one request in flight.
//! - Allowance requests are bounded in number and live until their deadline.

use std::collections::{BTreeMap, VecDeque};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use crate::escrow::Pool;
use crate::frame::{FrameError, encode};
use crate::messages::{
    AgentMsg, CentralMsg, EventEnvelope, Heartbeat, Hello, MasterBatch, Refuse, Welcome,
};
pub use crate::session::StoreFailure;
use crate::session::{SessionError, Uploader};

/// Most allowance requests awaiting central's answer in one session. Each lives at most one
/// request deadline, so this is only reached if central stops answering under a burst of
/// orders; further requests are then not sent and their orders go on with what the site holds.
pub const MAX_PENDING_ASKS: usize = 256;
/// Master batches received and not yet applied. While full, the driver stops reading
/// (`wants_input`), and QUIC flow control slows central down.
pub const MAX_QUEUED_MASTER: usize = 4;
/// Longest reason kept from a refused renewal (it ends up in the agent's health).
pub const MAX_KEPT_REASON: usize = 200;

/// The agent's durable marks, as the store reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentMarks {
    pub last_seq: u64,
    pub acked_seq: u64,
    pub master_rev: u64,
    pub retained_from_seq: u64,
    pub central_incarnation: u64,
}

/// Fixed for one session.
#[derive(Clone, Debug)]
pub struct AgentSessionConfig {
    pub site: String,
    pub agent_version: String,
    /// Protocol version negotiated in the handshake (ALPN).
    pub protocol_version: u16,
    /// Most events in flight (sent, not acked).
    pub window: u64,
    /// Most events per `Events` frame.
    pub max_batch: u64,
    /// How long central has to answer the Hello.
    pub welcome_timeout: Duration,
    /// Heartbeat interval; `None`: no heartbeats.
    pub heartbeat_every: Option<Duration>,
    /// How often renewal is considered on protocol 4 (the first time at the Welcome).
    pub renew_check_every: Duration,
}

/// What the machine asks of the store and the host. Each is answered by the `handle_*` call
/// named on it; the driver may run them on any thread, but must answer them.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentRequest {
    /// Record central's store incarnation (dropping allowances if it changed); answered by
    /// `handle_incarnation_adopted`. Always before any `ApplyMaster` of the session.
    AdoptIncarnation {
        incarnation: u64,
        master_from_rev: u64,
        /// The last seq this session's Hello named. Central, when its incarnation changed,
        /// counts orders up to it as confirmed from the old incarnation's grants and every later
        /// one against its new grants, so orders the site confirmed after the Hello (from the
        /// allowances it is about to drop) are owed from the new grants.
        hello_last_seq: u64,
    },
    /// Move the acked mark back to `to` so that retained events are sent again; answered by
    /// `handle_rewound`.
    Rewind { to: u64 },
    /// Persist that central acknowledged through `through`; answered by `handle_ack_persisted`
    /// or `handle_ack_persist_failed`. Later requests supersede earlier ones.
    PersistAck { through: u64 },
    /// Apply one master batch in one transaction; answered by `handle_master_applied`.
    ApplyMaster(MasterBatch),
    /// Read these outbox events; answered by `handle_outbox`.
    ReadOutbox(RangeInclusive<u64>),
    /// Sample the host's health; answered by `handle_heartbeat`.
    SampleHeartbeat,
    /// Consider renewing the certificate; answered by `handle_renewal_request` (with `None`
    /// when no renewal is due or a request cannot be made).
    CheckRenewal,
}

/// What the rest of the agent should know.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// The session is live: the upload resumes after `acked_seq`.
    Connected {
        acked_seq: u64,
        last_seq: u64,
        master_rev: u64,
        central_rev: u64,
        central_version: String,
    },
    /// Central's incarnation was recorded (`changed`: it differs from the last one seen).
    IncarnationAdopted { incarnation: u64, changed: bool },
    /// Central was behind what it acknowledged: events after `to` are sent again.
    Rewound { from: u64, to: u64 },
    /// Central answered allowance request `request_id` in time.
    AllowanceAnswered {
        request_id: u64,
        granted: i64,
        rev: u64,
        reason: String,
    },
    /// An answer came after its deadline (a grant still arrives as a master change).
    AllowanceLate { request_id: u64 },
    /// Too many requests unanswered; this one was not sent.
    AllowanceNotSent,
    /// Central signed a certificate for the key of the request in flight: check and install it.
    Certificate { chain_pem: String },
    /// Central sent a certificate nobody asked for: ignored.
    CertificateUnasked,
    /// Central refused the renewal in flight (reason bounded).
    RenewalRefused { reason: String },
    /// A heartbeat could not be encoded and was skipped.
    HeartbeatSkipped { error: String },
    /// Events `range` were sent.
    Sent { range: RangeInclusive<u64> },
}

/// Why a session ended. `is_protocol_violation` says whether central broke the protocol.
#[derive(Debug, thiserror::Error)]
pub enum AgentSessionError {
    #[error("central refused the session ({:?}): {}", .0.code, .0.reason)]
    Refused(Refuse),
    #[error("expected Welcome or Refuse, got {0}")]
    UnexpectedFirstMessage(&'static str),
    #[error("central answered with protocol version {got}, the handshake negotiated {negotiated}")]
    WrongVersion { got: u16, negotiated: u16 },
    #[error("a second Welcome in one session")]
    SecondWelcome,
    #[error("{0}")]
    Upload(#[from] SessionError),
    #[error("master batch refused: {0}")]
    BadMasterBatch(String),
    #[error("allowance reply {request_id} grants a negative quantity {granted}")]
    NegativeGrant { request_id: u64, granted: i64 },
    #[error(
        "central reports seq {central} as its high-water mark but already acknowledged {acked}; \
         events {}..={} were pruned here after that ack ([outbox] retain_acked_secs and \
         retain_acked_max_events bound what is kept) and cannot be resent (was central restored \
         from an old backup?)", .central + 1, .retained_from.saturating_sub(1)
    )]
    NotRetained {
        central: u64,
        acked: u64,
        retained_from: u64,
    },
    #[error("the outbox has no events in {from}..={to} although its last seq is {last_seq}")]
    OutboxGap { from: u64, to: u64, last_seq: u64 },
    #[error("timed out waiting for central's welcome")]
    WelcomeTimeout,
    #[error("could not record central's ack through {through}: {error}")]
    AckPersist { through: u64, error: String },
    #[error("store error: {0}")]
    Store(String),
    #[error("frame error: {0}")]
    Frame(#[from] FrameError),
}

impl AgentSessionError {
    /// Central broke the protocol (the connection is closed with a violation code).
    pub fn is_protocol_violation(&self) -> bool {
        matches!(
            self,
            AgentSessionError::UnexpectedFirstMessage(_)
                | AgentSessionError::WrongVersion { .. }
                | AgentSessionError::SecondWelcome
                | AgentSessionError::Upload(_)
                | AgentSessionError::BadMasterBatch(_)
                | AgentSessionError::NegativeGrant { .. }
                | AgentSessionError::NotRetained { .. }
        )
    }

    /// The upload cannot go on from central's mark (central is ahead of this site, or behind
    /// events pruned here): an operator must look.
    pub fn is_divergence(&self) -> bool {
        matches!(
            self,
            AgentSessionError::NotRetained { .. }
                | AgentSessionError::Upload(SessionError::CentralAhead { .. })
        )
    }

    /// The agent's own store failed (not central's fault).
    pub fn is_local(&self) -> bool {
        matches!(
            self,
            AgentSessionError::Store(_)
                | AgentSessionError::AckPersist { .. }
                | AgentSessionError::OutboxGap { .. }
        )
    }
}

/// Why a master batch was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyMasterFailure {
    /// The batch is malformed (central's fault): it does not start at the applied revision, say.
    #[error("{0}")]
    BadBatch(String),
    /// The store could not write it.
    #[error(transparent)]
    Store(StoreFailure),
}

/// How `AdoptIncarnation` went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adopted {
    Unchanged,
    First,
    Changed,
}

/// How `Rewind` went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewound {
    /// The acked mark moved back from `from`.
    From(u64),
    /// The events after central's mark were already pruned here.
    NotRetained { retained_from: u64 },
}

#[derive(Debug)]
enum Phase {
    /// Hello sent; waiting for Welcome until the deadline.
    AwaitWelcome { deadline: Instant },
    /// Welcome received; incarnation being adopted.
    Adopting(Welcome),
    /// Acked mark being moved back.
    Rewinding(Welcome, AgentMarks),
    /// Uploading and applying.
    Live,
    /// Ended; the error (if any) was handed out.
    Ended,
}

/// One sync session, agent side.
#[derive(Debug)]
pub struct AgentSession {
    cfg: AgentSessionConfig,
    phase: Phase,
    up: Uploader,
    last_seq: u64,
    /// The last seq the Hello named.
    hello_last_seq: u64,
    transmits: VecDeque<Vec<u8>>,
    requests: VecDeque<AgentRequest>,
    events: VecDeque<AgentEvent>,
    error: Option<AgentSessionError>,
    failed: bool,
    /// Messages that arrived before the session was live, applied in order once it is.
    early: VecDeque<CentralMsg>,
    /// Master batches waiting for the one being applied.
    master_queue: VecDeque<MasterBatch>,
    master_in_flight: bool,
    read_in_flight: bool,
    /// Highest ack handed out for persisting in this session, and the highest persisted.
    ack_requested: Option<u64>,
    ack_persisted: u64,
    /// The first heartbeat is sampled before the upload starts.
    first_beat_pending: bool,
    beat_in_flight: bool,
    next_beat: Option<Instant>,
    next_renew_check: Option<Instant>,
    renewal_in_flight: bool,
    renewal_check_in_flight: bool,
    next_request_id: u64,
    /// Allowance requests sent and not answered, with their deadlines.
    pending_asks: BTreeMap<u64, Instant>,
}

impl AgentSession {
    /// Starts a session: the Hello goes out at once. `wall_ms`: the agent's wall clock (for
    /// central's clock-offset estimate only).
    pub fn new(cfg: AgentSessionConfig, marks: AgentMarks, wall_ms: i64, now: Instant) -> Self {
        let hello = AgentMsg::Hello(Hello {
            protocol_version: cfg.protocol_version,
            agent_version: cfg.agent_version.clone(),
            site: cfg.site.clone(),
            master_rev: marks.master_rev,
            last_seq: marks.last_seq,
            agent_time_ms: wall_ms,
            acked_seq: marks.acked_seq,
            retained_from_seq: marks.retained_from_seq,
            central_incarnation: marks.central_incarnation,
        });
        let mut s = AgentSession {
            up: Uploader::new(cfg.window, cfg.max_batch),
            phase: Phase::AwaitWelcome {
                deadline: now + cfg.welcome_timeout,
            },
            last_seq: marks.last_seq,
            hello_last_seq: marks.last_seq,
            transmits: VecDeque::new(),
            requests: VecDeque::new(),
            events: VecDeque::new(),
            error: None,
            failed: false,
            early: VecDeque::new(),
            master_queue: VecDeque::new(),
            master_in_flight: false,
            read_in_flight: false,
            ack_requested: None,
            ack_persisted: marks.acked_seq,
            first_beat_pending: false,
            beat_in_flight: false,
            next_beat: None,
            next_renew_check: None,
            renewal_in_flight: false,
            renewal_check_in_flight: false,
            next_request_id: 0,
            pending_asks: BTreeMap::new(),
            cfg,
        };
        s.transmit(&hello);
        s
    }

    // ----- outputs --------------------------------------------------------------------------

    /// The next encoded frame to send to central.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// The next request for the store or the host.
    pub fn poll_request(&mut self) -> Option<AgentRequest> {
        self.requests.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }

    /// The session's end: `Some(Err)` once it failed (frames queued before may still be sent).
    pub fn poll_end(&mut self) -> Option<AgentSessionError> {
        self.error.take()
    }

    pub fn is_ended(&self) -> bool {
        matches!(self.phase, Phase::Ended)
    }

    pub fn is_live(&self) -> bool {
        matches!(self.phase, Phase::Live)
    }

    /// Whether requests are waiting to be polled.
    pub fn has_requests(&self) -> bool {
        !self.requests.is_empty()
    }

    /// Whether the driver may hand over another message from central now.
    pub fn wants_input(&self) -> bool {
        !self.is_ended()
            && self.master_queue.len() < MAX_QUEUED_MASTER
            && self.early.len() < MAX_QUEUED_MASTER
    }

    /// When `handle_timeout` must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        match &self.phase {
            Phase::AwaitWelcome { deadline } => at(Some(*deadline)),
            Phase::Live => {
                at(self.next_beat);
                at(self.next_renew_check);
            }
            _ => {}
        }
        t
    }

    /// Central's acked mark as the session knows it.
    pub fn acked(&self) -> u64 {
        self.up.acked()
    }

    /// The highest ack persisted in this session.
    pub fn ack_persisted(&self) -> u64 {
        self.ack_persisted
    }

    // ----- inputs ---------------------------------------------------------------------------

    /// One message from central.
    pub fn handle_message(&mut self, now: Instant, msg: CentralMsg) {
        if self.is_ended() {
            return;
        }
        match &self.phase {
            Phase::AwaitWelcome { .. } => match msg {
                CentralMsg::Welcome(w) => {
                    if w.protocol_version != self.cfg.protocol_version {
                        return self.fail(AgentSessionError::WrongVersion {
                            got: w.protocol_version,
                            negotiated: self.cfg.protocol_version,
                        });
                    }
                    self.requests.push_back(AgentRequest::AdoptIncarnation {
                        incarnation: w.incarnation,
                        master_from_rev: w.master_from_rev,
                        hello_last_seq: self.hello_last_seq,
                    });
                    self.phase = Phase::Adopting(w);
                }
                CentralMsg::Refuse(r) => self.fail(AgentSessionError::Refused(r)),
                other => self.fail(AgentSessionError::UnexpectedFirstMessage(msg_name(&other))),
            },
            // Nothing central sends after its Welcome is acted on before the incarnation is
            // settled: Master frames in particular must not be applied before it.
            Phase::Adopting(_) | Phase::Rewinding(..) => self.early.push_back(msg),
            Phase::Live => self.live_message(now, msg),
            Phase::Ended => {}
        }
    }

    fn live_message(&mut self, now: Instant, msg: CentralMsg) {
        match msg {
            CentralMsg::Ack { through_seq } => match self.up.handle_ack(through_seq) {
                Ok(true) => {
                    self.persist_ack(through_seq);
                    // The window opened.
                    self.try_send();
                }
                Ok(false) => {}
                Err(e) => self.fail(e.into()),
            },
            CentralMsg::Master(batch) => {
                self.master_queue.push_back(batch);
                self.next_master();
            }
            CentralMsg::AllowanceReply {
                request_id,
                granted,
                rev,
                reason,
            } => {
                if granted < 0 {
                    return self.fail(AgentSessionError::NegativeGrant {
                        request_id,
                        granted,
                    });
                }
                match self.pending_asks.remove(&request_id) {
                    Some(deadline) if deadline > now => {
                        self.events.push_back(AgentEvent::AllowanceAnswered {
                            request_id,
                            granted,
                            rev,
                            reason,
                        })
                    }
                    _ => self
                        .events
                        .push_back(AgentEvent::AllowanceLate { request_id }),
                }
            }
            CentralMsg::Refuse(r) => self.fail(AgentSessionError::Refused(r)),
            CentralMsg::Welcome(_) => self.fail(AgentSessionError::SecondWelcome),
            CentralMsg::Certificate { chain_pem } => {
                if std::mem::take(&mut self.renewal_in_flight) {
                    self.events.push_back(AgentEvent::Certificate { chain_pem });
                } else {
                    self.events.push_back(AgentEvent::CertificateUnasked);
                }
            }
            CentralMsg::CertificateRefused { reason } => {
                if std::mem::take(&mut self.renewal_in_flight) {
                    let reason = reason.chars().take(MAX_KEPT_REASON).collect();
                    self.events.push_back(AgentEvent::RenewalRefused { reason });
                }
            }
        }
    }

    /// The store recorded central's incarnation; `marks` are read after it.
    pub fn handle_incarnation_adopted(
        &mut self,
        now: Instant,
        outcome: Result<Adopted, StoreFailure>,
        marks: AgentMarks,
    ) {
        let Phase::Adopting(w) = std::mem::replace(&mut self.phase, Phase::Ended) else {
            return self.fail(AgentSessionError::Store(
                "incarnation adopted outside the Welcome".into(),
            ));
        };
        let adopted = match outcome {
            Ok(a) => a,
            Err(e) => return self.fail(AgentSessionError::Store(e.0)),
        };
        self.events.push_back(AgentEvent::IncarnationAdopted {
            incarnation: w.incarnation,
            changed: adopted == Adopted::Changed,
        });
        // Central's durable mark decides where the upload resumes. Behind what it acknowledged
        // before means central lost acknowledged events (restored from a backup): they are
        // sent again from the retained rows, with their original seqs and event ids.
        if w.acked_seq < marks.acked_seq {
            self.requests
                .push_back(AgentRequest::Rewind { to: w.acked_seq });
            self.phase = Phase::Rewinding(w, marks);
        } else {
            self.go_live(now, w, marks);
        }
    }

    /// The acked mark was moved back (or could not be); `marks` are read after it.
    pub fn handle_rewound(
        &mut self,
        now: Instant,
        outcome: Result<Rewound, StoreFailure>,
        marks: AgentMarks,
    ) {
        let Phase::Rewinding(w, before) = std::mem::replace(&mut self.phase, Phase::Ended) else {
            return self.fail(AgentSessionError::Store(
                "rewind outside the Welcome".into(),
            ));
        };
        match outcome {
            Ok(Rewound::From(from)) => {
                self.events.push_back(AgentEvent::Rewound {
                    from,
                    to: w.acked_seq,
                });
                self.go_live(now, w, marks);
            }
            Ok(Rewound::NotRetained { retained_from }) => {
                self.fail(AgentSessionError::NotRetained {
                    central: w.acked_seq,
                    acked: before.acked_seq,
                    retained_from,
                })
            }
            Err(e) => self.fail(AgentSessionError::Store(e.0)),
        }
    }

    fn go_live(&mut self, now: Instant, w: Welcome, marks: AgentMarks) {
        if let Err(e) = self.up.handle_welcome(w.acked_seq, marks.last_seq) {
            return self.fail(e.into());
        }
        self.phase = Phase::Live;
        self.last_seq = marks.last_seq;
        // Central's mark is recorded first thing, even when it equals ours.
        self.persist_ack(w.acked_seq);
        self.events.push_back(AgentEvent::Connected {
            acked_seq: w.acked_seq,
            last_seq: marks.last_seq,
            master_rev: marks.master_rev,
            central_rev: w.master_rev,
            central_version: w.central_version,
        });
        if let Some(every) = self.cfg.heartbeat_every {
            // The first beat goes out before the upload starts, so central sees the backlog
            // built up while the link was down, not the outbox after it drained.
            self.first_beat_pending = true;
            self.beat_in_flight = true;
            self.requests.push_back(AgentRequest::SampleHeartbeat);
            self.next_beat = Some(now + every);
        }
        if self.cfg.protocol_version >= 4 {
            self.next_renew_check = Some(now);
        }
        let early: Vec<_> = self.early.drain(..).collect();
        for m in early {
            self.live_message(now, m);
            if self.is_ended() {
                return;
            }
        }
        self.try_send();
    }

    fn persist_ack(&mut self, through: u64) {
        if self.ack_requested.is_none_or(|r| through > r) {
            self.ack_requested = Some(through);
            self.requests
                .push_back(AgentRequest::PersistAck { through });
        }
    }

    pub fn handle_ack_persisted(&mut self, through: u64) {
        self.ack_persisted = self.ack_persisted.max(through);
    }

    /// A failed ack persist ends the session: carrying on would keep a frozen mark while the
    /// outbox is uploaded again and again.
    pub fn handle_ack_persist_failed(&mut self, through: u64, error: String) {
        self.fail(AgentSessionError::AckPersist { through, error });
    }

    fn next_master(&mut self) {
        if self.master_in_flight {
            return;
        }
        if let Some(b) = self.master_queue.pop_front() {
            self.master_in_flight = true;
            self.requests.push_back(AgentRequest::ApplyMaster(b));
        }
    }

    /// A master batch was applied, refused as malformed (central's fault) or not written.
    pub fn handle_master_applied(&mut self, outcome: Result<(), ApplyMasterFailure>) {
        self.master_in_flight = false;
        match outcome {
            Ok(()) => self.next_master(),
            Err(ApplyMasterFailure::BadBatch(bad)) => {
                self.fail(AgentSessionError::BadMasterBatch(bad))
            }
            Err(ApplyMasterFailure::Store(e)) => self.fail(AgentSessionError::Store(e.0)),
        }
    }

    /// The outbox grew: its last seq is now `last_seq`.
    pub fn handle_new_events(&mut self, last_seq: u64) {
        self.last_seq = self.last_seq.max(last_seq);
        self.try_send();
    }

    fn try_send(&mut self) {
        if !self.is_live() || self.read_in_flight || self.first_beat_pending {
            return;
        }
        if let Some(range) = self.up.poll_send(self.last_seq) {
            self.read_in_flight = true;
            self.requests.push_back(AgentRequest::ReadOutbox(range));
        }
    }

    /// The events of the last `ReadOutbox` (or the store's error).
    pub fn handle_outbox(&mut self, events: Result<Vec<EventEnvelope>, StoreFailure>) {
        self.read_in_flight = false;
        if self.is_ended() {
            return;
        }
        let events = match events {
            Ok(e) => e,
            Err(e) => return self.fail(AgentSessionError::Store(e.0)),
        };
        let Some(first) = events.first().map(|e| e.seq) else {
            let from = self.up.sent() + 1;
            return self.fail(AgentSessionError::OutboxGap {
                from,
                to: self.last_seq,
                last_seq: self.last_seq,
            });
        };
        match encode_batches(&events) {
            Ok(frames) => {
                let mut last = first;
                for (through, frame) in frames {
                    self.transmits.push_back(frame);
                    self.up.handle_sent(through);
                    last = through;
                }
                self.events.push_back(AgentEvent::Sent {
                    range: first..=last,
                });
            }
            Err(e) => return self.fail(e.into()),
        }
        self.try_send();
    }

    /// A heartbeat sample (`None`: the sample failed; the beat is skipped).
    pub fn handle_heartbeat(&mut self, hb: Option<Heartbeat>) {
        self.beat_in_flight = false;
        if let Some(hb) = hb {
            match encode(&AgentMsg::Heartbeat(hb)) {
                Ok(f) => self.transmits.push_back(f),
                Err(e) => self.events.push_back(AgentEvent::HeartbeatSkipped {
                    error: e.to_string(),
                }),
            }
        }
        if std::mem::take(&mut self.first_beat_pending) {
            self.try_send();
        }
    }

    /// The answer to `CheckRenewal`: a signing request for a new key, or `None`.
    pub fn handle_renewal_request(&mut self, csr_der: Option<Vec<u8>>) {
        self.renewal_check_in_flight = false;
        let Some(csr_der) = csr_der else { return };
        if !self.is_live() || self.renewal_in_flight {
            return;
        }
        match encode(&AgentMsg::RenewCertificate { csr_der }) {
            Ok(f) => {
                self.transmits.push_back(f);
                self.renewal_in_flight = true;
            }
            Err(e) => self.fail(e.into()),
        }
    }

    /// An order needs `qty` more of `pool` now; its caller waits until `deadline`. Returns the
    /// request id to match the answer, or `None` when nothing was sent (expired, not live, or
    /// too many unanswered).
    pub fn handle_ask(
        &mut self,
        now: Instant,
        pool: Pool,
        qty: i64,
        deadline: Instant,
    ) -> Option<u64> {
        self.pending_asks.retain(|_, d| *d > now);
        if !self.is_live() || deadline <= now {
            return None;
        }
        if self.pending_asks.len() >= MAX_PENDING_ASKS {
            self.events.push_back(AgentEvent::AllowanceNotSent);
            return None;
        }
        self.next_request_id = self.next_request_id.wrapping_add(1);
        let request_id = self.next_request_id;
        match encode(&AgentMsg::AllowanceRequest {
            request_id,
            pool,
            qty,
        }) {
            Ok(f) => self.transmits.push_back(f),
            Err(e) => {
                self.fail(e.into());
                return None;
            }
        }
        self.pending_asks.insert(request_id, deadline);
        Some(request_id)
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::AwaitWelcome { deadline } if now >= deadline => {
                self.fail(AgentSessionError::WelcomeTimeout)
            }
            Phase::Live => {
                if let (Some(at), Some(every)) = (self.next_beat, self.cfg.heartbeat_every)
                    && now >= at
                {
                    // A beat whose sample is still out is skipped, not queued.
                    if !self.beat_in_flight {
                        self.beat_in_flight = true;
                        self.requests.push_back(AgentRequest::SampleHeartbeat);
                    }
                    self.next_beat = Some(now + every);
                }
                if let Some(at) = self.next_renew_check
                    && now >= at
                {
                    if !self.renewal_in_flight && !self.renewal_check_in_flight {
                        self.renewal_check_in_flight = true;
                        self.requests.push_back(AgentRequest::CheckRenewal);
                    }
                    self.next_renew_check = Some(now + self.cfg.renew_check_every);
                }
            }
            _ => {}
        }
    }

    /// The stream or connection failed under the session.
    pub fn handle_read_error(&mut self, e: FrameError) {
        self.fail(AgentSessionError::Frame(e));
    }

    /// Ends the session with its first error (later ones are consequences of it).
    fn fail(&mut self, e: AgentSessionError) {
        self.phase = Phase::Ended;
        if !std::mem::replace(&mut self.failed, true) {
            self.error = Some(e);
        }
    }

    fn transmit(&mut self, msg: &AgentMsg) {
        match encode(msg) {
            Ok(f) => self.transmits.push_back(f),
            Err(e) => self.fail(e.into()),
        }
    }
}

/// Encodes `events` as one `Events` frame, or several if one would exceed the frame limit
/// (large orders). Returns each frame with the last seq it carries.
pub fn encode_batches(events: &[EventEnvelope]) -> Result<Vec<(u64, Vec<u8>)>, FrameError> {
    let mut out = Vec::new();
    let mut stack: Vec<&[EventEnvelope]> = vec![events];
    while let Some(slice) = stack.pop() {
        let Some(last) = slice.last() else { continue };
        match encode(&AgentMsg::Events(slice.to_vec())) {
            Ok(frame) => out.push((last.seq, frame)),
            Err(FrameError::TooLarge { .. }) if slice.len() > 1 => {
                let (a, b) = slice.split_at(slice.len() / 2);
                // Pushed in reverse so `a` is encoded (and sent) first.
                stack.push(b);
                stack.push(a);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// A message's name, for errors and logs.
pub fn msg_name(m: &CentralMsg) -> &'static str {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameDecoder;
    use crate::messages::{EventBody, Grant, MasterChange, Milestone, MilestoneKind};

    fn cfg(heartbeat: bool) -> AgentSessionConfig {
        AgentSessionConfig {
            site: "plant-1".into(),
            agent_version: "test".into(),
            protocol_version: crate::PROTOCOL_VERSION,
            window: 4,
            max_batch: 2,
            welcome_timeout: Duration::from_secs(5),
            heartbeat_every: heartbeat.then_some(Duration::from_secs(10)),
            renew_check_every: Duration::from_secs(3_600),
        }
    }

    fn marks(last_seq: u64, acked_seq: u64) -> AgentMarks {
        AgentMarks {
            last_seq,
            acked_seq,
            master_rev: 0,
            retained_from_seq: acked_seq + 1,
            central_incarnation: 7,
        }
    }

    fn welcome(acked_seq: u64) -> CentralMsg {
        CentralMsg::Welcome(Welcome {
            protocol_version: crate::PROTOCOL_VERSION,
            central_version: "test".into(),
            acked_seq,
            master_rev: 0,
            incarnation: 7,
            master_from_rev: 0,
        })
    }

    fn sent(s: &mut AgentSession) -> Vec<AgentMsg> {
        let mut out = Vec::new();
        while let Some(f) = s.poll_transmit() {
            let mut d = FrameDecoder::new();
            d.push(&f);
            out.push(d.poll_frame::<AgentMsg>().unwrap().unwrap());
        }
        out
    }

    fn requests(s: &mut AgentSession) -> Vec<AgentRequest> {
        std::iter::from_fn(|| s.poll_request()).collect()
    }

    fn ev(seq: u64) -> EventEnvelope {
        EventEnvelope::new(
            "plant-1",
            seq,
            &format!("e{seq}"),
            0,
            &EventBody::Milestone(Milestone {
                shipment_id: "S1".into(),
                milestone: MilestoneKind::Picked,
                scanner_id: "scan-1".into(),
                at: "2026-01-01T00:00:00Z".into(),
            }),
        )
    }

    /// A session welcomed at `acked` with `last` events in the outbox, live.
    fn live(now: Instant, last: u64, acked: u64, heartbeat: bool) -> AgentSession {
        let mut s = AgentSession::new(cfg(heartbeat), marks(last, acked), 0, now);
        assert!(matches!(sent(&mut s)[..], [AgentMsg::Hello(_)]));
        s.handle_message(now, welcome(acked));
        assert_eq!(
            requests(&mut s),
            vec![AgentRequest::AdoptIncarnation {
                incarnation: 7,
                master_from_rev: 0,
                hello_last_seq: last,
            }]
        );
        s.handle_incarnation_adopted(now, Ok(Adopted::Unchanged), marks(last, acked));
        assert!(s.is_live());
        s
    }

    /// Goal: no Master frame is applied before central's incarnation is adopted (a restored
    /// central's grants must not be mixed with the old ones). Method: a Master frame arrives
    /// right after the Welcome; no ApplyMaster may be asked until the adoption completes.
    #[test]
    fn master_frames_wait_for_the_incarnation() {
        let now = Instant::now();
        let mut s = AgentSession::new(cfg(false), marks(0, 0), 0, now);
        sent(&mut s);
        s.handle_message(now, welcome(0));
        let grant = MasterBatch {
            from_rev: 0,
            through_rev: 1,
            changes: vec![MasterChange::Grant(Grant {
                site: "plant-1".into(),
                pool: Pool::atp("A"),
                qty: 5,
            })],
        };
        s.handle_message(now, CentralMsg::Master(grant.clone()));
        let reqs = requests(&mut s);
        assert!(
            !reqs
                .iter()
                .any(|r| matches!(r, AgentRequest::ApplyMaster(_))),
            "{reqs:?}"
        );
        s.handle_incarnation_adopted(now, Ok(Adopted::Changed), marks(0, 0));
        let reqs = requests(&mut s);
        assert!(reqs.contains(&AgentRequest::ApplyMaster(grant)), "{reqs:?}");
    }

    /// Goal: an ack persister that fails ends the session instead of carrying on with a frozen
    /// mark; an ack beyond what was sent is a violation.
    #[test]
    fn a_failed_ack_persist_ends_the_session_and_acks_are_bounded() {
        let now = Instant::now();
        let mut s = live(now, 3, 0, false);
        let reqs = requests(&mut s);
        assert!(reqs.contains(&AgentRequest::PersistAck { through: 0 }));
        assert!(reqs.contains(&AgentRequest::ReadOutbox(1..=2)), "{reqs:?}");
        s.handle_outbox(Ok(vec![ev(1), ev(2)]));
        assert!(matches!(sent(&mut s)[..], [AgentMsg::Events(_)]));
        s.handle_message(now, CentralMsg::Ack { through_seq: 2 });
        assert!(requests(&mut s).contains(&AgentRequest::PersistAck { through: 2 }));
        s.handle_ack_persist_failed(2, "disk full".into());
        assert!(s.is_ended());
        assert!(matches!(
            s.poll_end(),
            Some(AgentSessionError::AckPersist { through: 2, .. })
        ));

        let mut s = live(now, 3, 0, false);
        requests(&mut s);
        s.handle_message(now, CentralMsg::Ack { through_seq: 1 });
        let e = s
            .poll_end()
            .expect("an ack beyond what was sent ends the session");
        assert!(e.is_protocol_violation(), "{e}");
    }

    /// Goal: the first heartbeat goes out before the upload, so central sees the backlog the
    /// outage built; then the window bounds what is in flight.
    #[test]
    fn the_first_heartbeat_precedes_the_upload_and_the_window_bounds_it() {
        let now = Instant::now();
        let mut s = live(now, 10, 0, true);
        let reqs = requests(&mut s);
        assert!(reqs.contains(&AgentRequest::SampleHeartbeat), "{reqs:?}");
        assert!(
            !reqs
                .iter()
                .any(|r| matches!(r, AgentRequest::ReadOutbox(_))),
            "no upload before the first beat: {reqs:?}"
        );
        let hb = crate::messages::Heartbeat {
            agent_time_ms: 0,
            agent_version: "t".into(),
            uptime_secs: 0,
            process_cpu_pct: None,
            process_rss_bytes: None,
            host_cpu_pct: None,
            host_mem_used_bytes: None,
            host_mem_total_bytes: None,
            disk_free_bytes: None,
            disk_total_bytes: None,
            store_file_bytes: None,
            outbox_events: 10,
            outbox_bytes: 0,
            oldest_unsynced_ms: None,
            master_rev: 0,
            master_applied_ms: None,
            api_requests: 0,
            api_errors: 0,
        };
        s.handle_heartbeat(Some(hb));
        assert!(matches!(sent(&mut s)[..], [AgentMsg::Heartbeat(_)]));
        let mut uploaded = 0;
        for _ in 0..10 {
            match requests(&mut s)[..] {
                [AgentRequest::ReadOutbox(ref r)] => {
                    let evs: Vec<_> = r.clone().map(ev).collect();
                    uploaded = *r.end();
                    s.handle_outbox(Ok(evs));
                }
                [] => break,
                ref other => panic!("{other:?}"),
            }
        }
        assert_eq!(uploaded, 4, "window of 4 events in flight");
    }

    /// Goal: central's Welcome must carry the negotiated version; anything but Welcome or
    /// Refuse first is a violation; a Refuse ends the session with central's reason.
    #[test]
    fn the_welcome_is_checked() {
        let now = Instant::now();
        let mut s = AgentSession::new(cfg(false), marks(0, 0), 0, now);
        s.handle_message(
            now,
            CentralMsg::Welcome(Welcome {
                protocol_version: 3,
                central_version: "x".into(),
                acked_seq: 0,
                master_rev: 0,
                incarnation: 1,
                master_from_rev: 0,
            }),
        );
        assert!(matches!(
            s.poll_end(),
            Some(AgentSessionError::WrongVersion { got: 3, .. })
        ));
        let mut s = AgentSession::new(cfg(false), marks(0, 0), 0, now);
        s.handle_message(now, CentralMsg::Ack { through_seq: 0 });
        assert!(matches!(
            s.poll_end(),
            Some(AgentSessionError::UnexpectedFirstMessage("Ack"))
        ));
        let mut s = AgentSession::new(cfg(false), marks(0, 0), 0, now);
        s.handle_timeout(now + Duration::from_secs(6));
        assert!(matches!(
            s.poll_end(),
            Some(AgentSessionError::WelcomeTimeout)
        ));
    }

    /// Goal: a central behind what it acknowledged gets the retained events again (rewind);
    /// when they were pruned the session ends naming the pruned range.
    #[test]
    fn a_central_behind_its_acks_is_rewound_or_refused() {
        let now = Instant::now();
        let mut s = AgentSession::new(cfg(false), marks(10, 8), 0, now);
        s.handle_message(now, welcome(5));
        requests(&mut s);
        s.handle_incarnation_adopted(now, Ok(Adopted::Changed), marks(10, 8));
        assert_eq!(requests(&mut s), vec![AgentRequest::Rewind { to: 5 }]);
        s.handle_rewound(now, Ok(Rewound::From(8)), marks(10, 5));
        assert!(s.is_live());
        assert!(requests(&mut s).contains(&AgentRequest::ReadOutbox(6..=7)));

        let mut s = AgentSession::new(cfg(false), marks(10, 8), 0, now);
        s.handle_message(now, welcome(5));
        requests(&mut s);
        s.handle_incarnation_adopted(now, Ok(Adopted::Changed), marks(10, 8));
        requests(&mut s);
        s.handle_rewound(
            now,
            Ok(Rewound::NotRetained { retained_from: 9 }),
            marks(10, 8),
        );
        let e = s.poll_end().expect("ended").to_string();
        assert!(e.contains("events 6..=8 were pruned"), "{e}");
    }
}
