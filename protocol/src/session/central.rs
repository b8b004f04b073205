//! Central's side of one sync session as a pure state machine (sans-IO, in quinn-proto's
//! shape): the agent's messages, storage completions and time go in (`handle_*`); frames to
//! send (`poll_transmit`), requests for the store and the registry (`poll_request`) and the
//! session's end (`poll_end`) come out. The QUIC driver in central and the simulation both drive
//! this same machine.
//!
//! The rules it keeps:
//! - The first message is a Hello, in time; it must agree with the certificate and the
//!   negotiated version, and its marks with each other; a revoked site or one cut off by a drill
//!   is refused; a store that cannot record the session refuses with `Unavailable`.
//! - One request at a time, in arrival order: a batch is acknowledged only after the store
//!   reports it committed (`handle_ingested`), never before.
//! - Master changes are pushed whenever the agent is behind central's revision, one frame at a
//!   time, filtered to what concerns the site.
//! - A second Hello, an oversized heartbeat field and a renewal on protocol 3 are violations.
//! - Revocation, a drill, a newer connection and shutdown end the session with a Refuse.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::escrow::Pool;
use crate::frame::{FrameError, encode};
use crate::messages::{
    AgentMsg, CentralMsg, EventEnvelope, Heartbeat, Hello, MAX_CHANGES_PER_FRAME, MAX_ID_LEN,
    MAX_TEXT_LEN, MasterBatch, MasterChange, Refuse, RefuseCode, Welcome,
};
pub use crate::session::StoreFailure;
use crate::session::{IngestError, check_hello};

/// Messages from the agent queued while a request is out. While full, the driver stops reading
/// (`wants_input`), and QUIC flow control slows the agent down.
pub const MAX_QUEUED_INPUT: usize = 4;

/// Fixed for one session.
#[derive(Clone, Debug)]
pub struct CentralSessionConfig {
    /// The site named by the client certificate: the only identity central takes.
    pub site: String,
    /// Protocol version negotiated in the handshake (ALPN).
    pub protocol_version: u16,
    pub central_version: String,
    /// How long the agent has to send its Hello.
    pub hello_timeout: Duration,
}

/// Why the driver's admission checks refused a site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// On the deny list since `at` (RFC 3339), for `reason`.
    Revoked { at: String, reason: String },
    /// Cut off by a disaster-recovery drill.
    Drill(String),
}

/// What central's store said when the session began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begun {
    pub acked_seq: u64,
    pub incarnation: u64,
    pub master_from_rev: u64,
    /// Central's master revision when the Welcome is built.
    pub central_rev: u64,
}

/// Why the signer refused a renewal (sent to the agent, bounded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SignRefused(pub String);

/// Why an ingest was not committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestFailure {
    /// The batch breaks the rules (foreign site, gap, too many).
    Plan(IngestError),
    /// The store cannot write now.
    Unavailable(String),
}

/// What the machine asks of the store, the registry and the signer. Those named with a
/// `handle_*` must be answered by it; the others need no answer.
#[derive(Debug, Clone, PartialEq)]
pub enum CentralRequest {
    /// Check revocation and drills and register the session (the registry may later end it
    /// through `handle_end`); answered by `handle_admission`.
    Admit,
    /// Durably open the session (report, restore bookkeeping, top-up); answered by
    /// `handle_begun`.
    Begin(Hello),
    /// Commit a batch and move the site's high-water mark; answered by `handle_ingested`.
    Ingest(Vec<EventEnvelope>),
    /// Grant allowance now; answered by `handle_allowance`.
    Allowance { pool: Pool, qty: i64 },
    /// Read up to `max` master changes after revision `from`; answered by `handle_changes`.
    ReadChanges { from: u64, max: usize },
    /// Sign a certificate for the session's site; answered by `handle_signed`.
    Sign { csr_der: Vec<u8> },
    /// Keep the agent's health signals (no answer).
    RecordHeartbeat {
        heartbeat: Heartbeat,
        central_rev: u64,
    },
    /// The site was heard from (no answer).
    Touch,
}

/// What the driver logs or tells others.
#[derive(Debug, Clone, PartialEq)]
pub enum CentralEvent {
    /// The Welcome was sent.
    Welcomed { hello: Hello, begun: Begun },
    /// The agent has applied a higher revision than central holds (central's store replaced?).
    AgentAhead { agent_rev: u64, central_rev: u64 },
    /// A batch was committed: the site's high-water mark is `hwm`.
    Committed { hwm: u64 },
    /// Master changes were sent.
    MasterSent {
        from: u64,
        through: u64,
        changes: usize,
    },
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq)]
pub enum CentralEnd {
    /// The agent closed its stream or the connection went away.
    Gone(String),
    /// Central refused (the Refuse frame is the last transmit).
    Refused(Refuse),
}

/// Why the registry ended a live session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Revoked,
    Drill,
    Superseded,
    Shutdown,
}

#[derive(Debug)]
enum Phase {
    AwaitHello { deadline: Instant },
    Admitting(Hello),
    Beginning(Hello),
    Live,
    Ended,
}

/// What the one request in flight is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Busy {
    Ingest,
    Allowance { request_id: u64 },
    Changes,
    Sign,
}

/// One sync session, central side.
#[derive(Debug)]
pub struct CentralSession {
    cfg: CentralSessionConfig,
    phase: Phase,
    busy: Option<Busy>,
    input: VecDeque<AgentMsg>,
    transmits: VecDeque<Vec<u8>>,
    requests: VecDeque<CentralRequest>,
    events: VecDeque<CentralEvent>,
    end: Option<CentralEnd>,
    agent_rev: u64,
    central_rev: u64,
    warned_agent_ahead: bool,
    /// A broken variant for the simulation only: acknowledge a batch before it is committed.
    #[cfg(feature = "broken-variants")]
    ack_before_commit: bool,
}

/// Cuts a reason sent to an agent to `MAX_TEXT_LEN` bytes (on a character boundary).
pub fn bounded(mut reason: String) -> String {
    if reason.len() > MAX_TEXT_LEN {
        let mut cut = MAX_TEXT_LEN;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    reason
}

pub fn refuse(code: RefuseCode, reason: impl Into<String>) -> Refuse {
    Refuse {
        code,
        reason: bounded(reason.into()),
    }
}

/// The Refuse for a batch that breaks the rules.
pub fn refuse_for_ingest(e: &IngestError) -> Refuse {
    let code = match e {
        IngestError::ForeignSite { .. } => RefuseCode::WrongSite,
        _ => RefuseCode::ProtocolViolation,
    };
    refuse(code, e.to_string())
}

impl CentralSession {
    pub fn new(cfg: CentralSessionConfig, now: Instant) -> Self {
        CentralSession {
            phase: Phase::AwaitHello {
                deadline: now + cfg.hello_timeout,
            },
            cfg,
            busy: None,
            input: VecDeque::new(),
            transmits: VecDeque::new(),
            requests: VecDeque::new(),
            events: VecDeque::new(),
            end: None,
            agent_rev: 0,
            central_rev: 0,
            warned_agent_ahead: false,
            #[cfg(feature = "broken-variants")]
            ack_before_commit: false,
        }
    }

    /// The broken variant the simulation must catch: an Ack leaves before the commit.
    #[cfg(feature = "broken-variants")]
    pub fn break_ack_before_commit(&mut self) {
        self.ack_before_commit = true;
    }

    // ----- outputs --------------------------------------------------------------------------

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    pub fn poll_request(&mut self) -> Option<CentralRequest> {
        self.requests.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<CentralEvent> {
        self.events.pop_front()
    }

    /// How the session ended, once (the frames queued before it are still to be sent).
    pub fn poll_end(&mut self) -> Option<CentralEnd> {
        self.end.take()
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

    /// Whether the driver may hand over another message now.
    pub fn wants_input(&self) -> bool {
        !self.is_ended() && self.input.len() < MAX_QUEUED_INPUT
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::AwaitHello { deadline } => Some(deadline),
            _ => None,
        }
    }

    /// The revision the agent holds, as far as this session knows.
    pub fn agent_rev(&self) -> u64 {
        self.agent_rev
    }

    // ----- inputs ---------------------------------------------------------------------------

    pub fn handle_timeout(&mut self, now: Instant) {
        if let Phase::AwaitHello { deadline } = self.phase
            && now >= deadline
        {
            self.refuse(refuse(RefuseCode::ProtocolViolation, "no Hello in time"));
        }
    }

    /// One message from the agent.
    pub fn handle_message(&mut self, msg: AgentMsg) {
        if self.is_ended() {
            return;
        }
        if let Phase::AwaitHello { .. } = self.phase {
            let AgentMsg::Hello(hello) = msg else {
                return self.refuse(refuse(
                    RefuseCode::ProtocolViolation,
                    "the first message must be Hello",
                ));
            };
            if let Err(r) = check_hello(&self.cfg.site, self.cfg.protocol_version, &hello) {
                return self.refuse(r);
            }
            self.requests.push_back(CentralRequest::Admit);
            self.phase = Phase::Admitting(hello);
            return;
        }
        self.input.push_back(msg);
        self.step();
    }

    /// The stream failed: a malformed frame is the agent's violation, anything else means it
    /// is gone.
    pub fn handle_read_error(&mut self, e: FrameError) {
        if e.is_protocol_violation() {
            self.refuse(refuse(
                RefuseCode::ProtocolViolation,
                format!("bad frame: {e}"),
            ));
        } else {
            self.finish(CentralEnd::Gone(format!("read failed: {e}")));
        }
    }

    /// A frame could not be written to the agent (it does not read, or the connection is gone).
    pub fn handle_write_failed(&mut self, error: String) {
        self.finish(CentralEnd::Gone(format!(
            "cannot send to the agent: {error}"
        )));
    }

    /// The agent closed its stream.
    pub fn handle_closed(&mut self) {
        self.finish(CentralEnd::Gone("agent closed the stream".into()));
    }

    /// The registry (or shutdown) ends the session.
    pub fn handle_end(&mut self, why: EndReason) {
        let r = match why {
            EndReason::Revoked => refuse(
                RefuseCode::Revoked,
                "this site was revoked by an operator at central",
            ),
            EndReason::Drill => refuse(
                RefuseCode::Unavailable,
                "cut off by a disaster-recovery drill at central",
            ),
            EndReason::Superseded => refuse(
                RefuseCode::Superseded,
                "a newer connection from this site replaced this one",
            ),
            EndReason::Shutdown => refuse(RefuseCode::Unavailable, "central is shutting down"),
        };
        self.refuse(r);
    }

    /// The admission checks' answer.
    pub fn handle_admission(&mut self, refusal: Option<Refusal>) {
        let Phase::Admitting(hello) = std::mem::replace(&mut self.phase, Phase::Ended) else {
            return;
        };
        self.phase = Phase::Admitting(hello.clone());
        match refusal {
            Some(Refusal::Revoked { at, reason }) => {
                return self.refuse(refuse(
                    RefuseCode::Revoked,
                    format!("this site was revoked by an operator at central at {at}: {reason}"),
                ));
            }
            Some(Refusal::Drill(why)) => return self.refuse(refuse(RefuseCode::Unavailable, why)),
            None => {}
        }
        // The Hello's marks must agree with each other before central acts on them: a mark
        // beyond the agent's own last seq would move the site's high-water mark past events
        // that do not exist.
        if hello.acked_seq > hello.last_seq
            || hello.retained_from_seq > hello.last_seq.saturating_add(1)
        {
            return self.refuse(refuse(
                RefuseCode::ProtocolViolation,
                format!(
                    "inconsistent Hello: acked_seq {} and retained_from_seq {} must not exceed last_seq {} (+1)",
                    hello.acked_seq, hello.retained_from_seq, hello.last_seq
                ),
            ));
        }
        self.requests
            .push_back(CentralRequest::Begin(hello.clone()));
        self.phase = Phase::Beginning(hello);
    }

    /// The store opened the session (or could not).
    pub fn handle_begun(&mut self, begun: Result<Begun, StoreFailure>) {
        let Phase::Beginning(hello) = std::mem::replace(&mut self.phase, Phase::Ended) else {
            return;
        };
        self.phase = Phase::Beginning(hello.clone());
        let begun = match begun {
            Ok(b) => b,
            Err(e) => {
                return self.refuse(refuse(
                    RefuseCode::Unavailable,
                    format!("central cannot record the session: {e}"),
                ));
            }
        };
        let welcome = CentralMsg::Welcome(Welcome {
            protocol_version: self.cfg.protocol_version,
            central_version: self.cfg.central_version.clone(),
            acked_seq: begun.acked_seq,
            master_rev: begun.central_rev,
            incarnation: begun.incarnation,
            master_from_rev: begun.master_from_rev,
        });
        if !self.transmit(&welcome) {
            return;
        }
        self.agent_rev = begun.master_from_rev;
        self.central_rev = begun.central_rev;
        self.events
            .push_back(CentralEvent::Welcomed { hello, begun });
        self.phase = Phase::Live;
        self.step();
    }

    /// Central's master revision moved (or is known to be at least `rev`).
    pub fn handle_revision(&mut self, rev: u64) {
        self.central_rev = self.central_rev.max(rev);
        self.step();
    }

    /// The store committed (or refused) the batch in flight.
    pub fn handle_ingested(&mut self, outcome: Result<u64, IngestFailure>) {
        let Some(Busy::Ingest) = self.busy.take() else {
            return;
        };
        if self.is_ended() {
            return;
        }
        match outcome {
            Ok(hwm) => {
                #[cfg(feature = "broken-variants")]
                let acked_already = self.ack_before_commit;
                #[cfg(not(feature = "broken-variants"))]
                let acked_already = false;
                if !acked_already && !self.transmit(&CentralMsg::Ack { through_seq: hwm }) {
                    return;
                }
                self.events.push_back(CentralEvent::Committed { hwm });
            }
            Err(IngestFailure::Plan(e)) => return self.refuse(refuse_for_ingest(&e)),
            Err(IngestFailure::Unavailable(e)) => {
                return self.refuse(refuse(
                    RefuseCode::Unavailable,
                    format!("central cannot store events right now: {e}"),
                ));
            }
        }
        self.step();
    }

    /// The allowance answer for the request in flight.
    pub fn handle_allowance(&mut self, granted: i64, rev: u64, reason: String) {
        let Some(Busy::Allowance { request_id }) = self.busy.take() else {
            return;
        };
        if self.is_ended() {
            return;
        }
        // The grant is a master change at `rev`: push it right after the reply, the agent waits
        // for both.
        self.central_rev = self.central_rev.max(rev);
        let reply = CentralMsg::AllowanceReply {
            request_id,
            granted,
            rev,
            reason: bounded(reason),
        };
        if self.transmit(&reply) {
            self.step();
        }
    }

    /// Up to `MAX_CHANGES_PER_FRAME` changes after the agent's revision, each with its
    /// revision (or the store's error).
    pub fn handle_changes(&mut self, scanned: Result<Vec<(u64, MasterChange)>, StoreFailure>) {
        let Some(Busy::Changes) = self.busy.take() else {
            return;
        };
        if self.is_ended() {
            return;
        }
        let scanned = match scanned {
            Ok(s) => s,
            Err(e) => {
                return self.refuse(refuse(
                    RefuseCode::Unavailable,
                    format!("central cannot read master data: {e}"),
                ));
            }
        };
        let from = self.agent_rev;
        let Some(&(through, _)) = scanned.last() else {
            // The revision said there is more, the log has nothing: nothing to send.
            self.agent_rev = self.central_rev;
            return self.step();
        };
        let site = &self.cfg.site;
        let changes: Vec<MasterChange> = scanned
            .into_iter()
            .filter(|(_, c)| c.concerns(site))
            .map(|(_, c)| c)
            .collect();
        let n = changes.len();
        let msg = CentralMsg::Master(MasterBatch {
            from_rev: from,
            through_rev: through,
            changes,
        });
        if !self.transmit(&msg) {
            return;
        }
        self.agent_rev = through;
        self.events.push_back(CentralEvent::MasterSent {
            from,
            through,
            changes: n,
        });
        self.step();
    }

    /// The signer's answer: a certificate chain, or why not. A refusal is an answer too; the
    /// session goes on either way.
    pub fn handle_signed(&mut self, signed: Result<String, SignRefused>) {
        let Some(Busy::Sign) = self.busy.take() else {
            return;
        };
        if self.is_ended() {
            return;
        }
        let reply = match signed {
            Ok(chain_pem) => CentralMsg::Certificate { chain_pem },
            Err(SignRefused(reason)) => CentralMsg::CertificateRefused {
                reason: bounded(reason),
            },
        };
        if self.transmit(&reply) {
            self.step();
        }
    }

    // ----- the loop -------------------------------------------------------------------------

    /// Starts the next piece of work when nothing is in flight: queued messages first, in
    /// order, then the master push.
    fn step(&mut self) {
        while self.is_live() && self.busy.is_none() {
            if let Some(msg) = self.input.pop_front() {
                self.live_message(msg);
                continue;
            }
            if self.agent_rev > self.central_rev && !self.warned_agent_ahead {
                self.warned_agent_ahead = true;
                self.events.push_back(CentralEvent::AgentAhead {
                    agent_rev: self.agent_rev,
                    central_rev: self.central_rev,
                });
            }
            if self.agent_rev < self.central_rev {
                self.busy = Some(Busy::Changes);
                self.requests.push_back(CentralRequest::ReadChanges {
                    from: self.agent_rev,
                    max: MAX_CHANGES_PER_FRAME,
                });
            }
            break;
        }
    }

    fn live_message(&mut self, msg: AgentMsg) {
        match msg {
            AgentMsg::Hello(_) => {
                self.refuse(refuse(RefuseCode::ProtocolViolation, "Hello sent twice"))
            }
            AgentMsg::Heartbeat(hb) => {
                // Every other field is fixed-size: bounding the version bounds what the registry
                // keeps per beat.
                if hb.agent_version.len() > MAX_ID_LEN {
                    return self.refuse(refuse(
                        RefuseCode::ProtocolViolation,
                        format!("heartbeat agent_version longer than {MAX_ID_LEN} bytes"),
                    ));
                }
                self.requests.push_back(CentralRequest::RecordHeartbeat {
                    heartbeat: hb,
                    central_rev: self.central_rev,
                });
            }
            AgentMsg::AllowanceRequest {
                request_id,
                pool,
                qty,
            } => {
                self.requests.push_back(CentralRequest::Touch);
                self.busy = Some(Busy::Allowance { request_id });
                self.requests
                    .push_back(CentralRequest::Allowance { pool, qty });
            }
            AgentMsg::RenewCertificate { csr_der } => {
                if self.cfg.protocol_version < 4 {
                    return self.refuse(refuse(
                        RefuseCode::ProtocolViolation,
                        "RenewCertificate is not part of protocol 3",
                    ));
                }
                self.busy = Some(Busy::Sign);
                self.requests.push_back(CentralRequest::Sign { csr_der });
            }
            AgentMsg::Events(batch) => {
                self.requests.push_back(CentralRequest::Touch);
                #[cfg(feature = "broken-variants")]
                if self.ack_before_commit {
                    let through_seq = batch.last().map_or(0, |e| e.seq);
                    if !self.transmit(&CentralMsg::Ack { through_seq }) {
                        return;
                    }
                }
                self.busy = Some(Busy::Ingest);
                self.requests.push_back(CentralRequest::Ingest(batch));
            }
        }
    }

    fn transmit(&mut self, msg: &CentralMsg) -> bool {
        match encode(msg) {
            Ok(f) => {
                self.transmits.push_back(f);
                true
            }
            Err(e) => {
                self.finish(CentralEnd::Gone(format!("cannot encode a frame: {e}")));
                false
            }
        }
    }

    fn refuse(&mut self, r: Refuse) {
        if self.is_ended() {
            return;
        }
        // Frames queued before the refusal (an Ack, say) still go out first.
        if let Ok(f) = encode(&CentralMsg::Refuse(r.clone())) {
            self.transmits.push_back(f);
        }
        self.finish(CentralEnd::Refused(r));
    }

    fn finish(&mut self, end: CentralEnd) {
        if !self.is_ended() {
            self.phase = Phase::Ended;
            self.end = Some(end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_reasons_are_bounded_and_codes_follow_the_error() {
        let long = "é".repeat(400);
        let r = refuse(RefuseCode::ProtocolViolation, long);
        assert!(r.reason.len() <= MAX_TEXT_LEN);
        let foreign = IngestError::ForeignSite {
            seq: 1,
            claimed: "plant-2".into(),
            site: "plant-1".into(),
        };
        assert_eq!(refuse_for_ingest(&foreign).code, RefuseCode::WrongSite);
        let gap = IngestError::Gap {
            expected: 2,
            got: 5,
        };
        assert_eq!(refuse_for_ingest(&gap).code, RefuseCode::ProtocolViolation);
    }

    #[test]
    fn refuse_codes_keep_their_wire_encoding() {
        // Guards against inserting a code in the middle: older agents decode by index.
        for (code, index) in [
            (RefuseCode::IncompatibleVersion, 0u8),
            (RefuseCode::WrongSite, 1),
            (RefuseCode::ProtocolViolation, 2),
            (RefuseCode::Superseded, 3),
            (RefuseCode::Unavailable, 4),
            (RefuseCode::Revoked, 5),
        ] {
            assert_eq!(
                postcard::to_allocvec(&code).unwrap(),
                vec![index],
                "{code:?}"
            );
        }
    }

    use crate::frame::FrameDecoder;
    use crate::messages::{AtpRecord, EventBody, Grant, Milestone, MilestoneKind, PriceRecord};
    use crate::money::Money;

    fn hello(site: &str) -> Hello {
        Hello {
            protocol_version: crate::PROTOCOL_VERSION,
            agent_version: "t".into(),
            site: site.into(),
            master_rev: 0,
            last_seq: 4,
            agent_time_ms: 0,
            acked_seq: 0,
            retained_from_seq: 1,
            central_incarnation: 0,
        }
    }

    fn sent(s: &mut CentralSession) -> Vec<CentralMsg> {
        let mut out = Vec::new();
        while let Some(f) = s.poll_transmit() {
            let mut d = FrameDecoder::new();
            d.push(&f);
            out.push(d.poll_frame::<CentralMsg>().unwrap().unwrap());
        }
        out
    }

    fn requests(s: &mut CentralSession) -> Vec<CentralRequest> {
        std::iter::from_fn(|| s.poll_request()).collect()
    }

    fn session() -> CentralSession {
        CentralSession::new(
            CentralSessionConfig {
                site: "plant-1".into(),
                protocol_version: crate::PROTOCOL_VERSION,
                central_version: "t".into(),
                hello_timeout: Duration::from_secs(10),
            },
            Instant::now(),
        )
    }

    /// A session past its Welcome at central revision `rev`.
    fn live(rev: u64) -> CentralSession {
        let mut s = session();
        s.handle_message(AgentMsg::Hello(hello("plant-1")));
        assert_eq!(requests(&mut s), vec![CentralRequest::Admit]);
        s.handle_admission(None);
        assert!(matches!(requests(&mut s)[..], [CentralRequest::Begin(_)]));
        s.handle_begun(Ok(Begun {
            acked_seq: 0,
            incarnation: 1,
            master_from_rev: rev,
            central_rev: rev,
        }));
        assert!(matches!(sent(&mut s)[..], [CentralMsg::Welcome(_)]));
        s
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

    /// Goal: an Ack leaves only after the store reports the batch committed; meanwhile the
    /// next message waits its turn. Guards against acknowledging what a crash could lose.
    #[test]
    fn an_ack_leaves_only_after_the_commit() {
        let mut s = live(0);
        s.handle_message(AgentMsg::Events(vec![ev(1), ev(2)]));
        s.handle_message(AgentMsg::Events(vec![ev(3)]));
        let reqs = requests(&mut s);
        assert_eq!(
            reqs.iter()
                .filter(|r| matches!(r, CentralRequest::Ingest(_)))
                .count(),
            1,
            "one batch at a time: {reqs:?}"
        );
        assert!(sent(&mut s).is_empty(), "no Ack before the commit");
        s.handle_ingested(Ok(2));
        assert_eq!(sent(&mut s), vec![CentralMsg::Ack { through_seq: 2 }]);
        assert!(
            requests(&mut s)
                .iter()
                .any(|r| matches!(r, CentralRequest::Ingest(b) if b[0].seq == 3))
        );
        s.handle_ingested(Err(IngestFailure::Unavailable("disk full".into())));
        assert!(matches!(
            &sent(&mut s)[..],
            [CentralMsg::Refuse(Refuse {
                code: RefuseCode::Unavailable,
                ..
            })]
        ));
        assert!(s.is_ended());
    }

    /// Goal: master changes are pushed when the agent is behind, filtered to what concerns the
    /// site, from the agent's revision through the last one scanned.
    #[test]
    fn master_changes_are_pushed_filtered_per_site() {
        let mut s = live(2);
        assert!(
            requests(&mut s).is_empty(),
            "nothing to push at the same revision"
        );
        s.handle_revision(5);
        assert_eq!(
            requests(&mut s),
            vec![CentralRequest::ReadChanges {
                from: 2,
                max: MAX_CHANGES_PER_FRAME
            }]
        );
        let price = MasterChange::Price(PriceRecord {
            sku: "A".into(),
            customer: None,
            unit_price: Money::parse("1.00").unwrap(),
            currency: "EUR".into(),
        });
        let mine = MasterChange::Atp(AtpRecord {
            sku: "A".into(),
            site: "plant-1".into(),
            available: 3,
        });
        let theirs = MasterChange::Grant(Grant {
            site: "plant-2".into(),
            pool: crate::Pool::atp("A"),
            qty: 1,
        });
        s.handle_changes(Ok(vec![(3, price.clone()), (4, theirs), (5, mine.clone())]));
        assert_eq!(
            sent(&mut s),
            vec![CentralMsg::Master(MasterBatch {
                from_rev: 2,
                through_rev: 5,
                changes: vec![price, mine],
            })]
        );
        assert_eq!(s.agent_rev(), 5);
        assert!(requests(&mut s).is_empty());
    }

    /// Goal: the Hello is checked before anything is recorded: the certificate's site, the
    /// marks' consistency, a second Hello, and admission refusals.
    #[test]
    fn hellos_are_checked_before_anything_is_recorded() {
        let mut s = session();
        s.handle_message(AgentMsg::Hello(hello("plant-2")));
        assert!(matches!(
            &sent(&mut s)[..],
            [CentralMsg::Refuse(Refuse {
                code: RefuseCode::WrongSite,
                ..
            })]
        ));
        assert!(requests(&mut s).is_empty());

        let mut s = session();
        let mut h = hello("plant-1");
        h.acked_seq = 9;
        s.handle_message(AgentMsg::Hello(h));
        requests(&mut s);
        s.handle_admission(None);
        assert!(
            requests(&mut s).is_empty(),
            "no session begun on inconsistent marks"
        );
        assert!(matches!(
            &sent(&mut s)[..],
            [CentralMsg::Refuse(Refuse {
                code: RefuseCode::ProtocolViolation,
                ..
            })]
        ));

        let mut s = session();
        s.handle_message(AgentMsg::Hello(hello("plant-1")));
        requests(&mut s);
        s.handle_admission(Some(Refusal::Revoked {
            at: "2026-01-01T00:00:00Z".into(),
            reason: "stolen".into(),
        }));
        assert!(matches!(
            &sent(&mut s)[..],
            [CentralMsg::Refuse(Refuse {
                code: RefuseCode::Revoked,
                ..
            })]
        ));

        let mut s = live(0);
        s.handle_message(AgentMsg::Hello(hello("plant-1")));
        assert!(matches!(s.poll_end(), Some(CentralEnd::Refused(_))));

        let mut s = session();
        s.handle_message(AgentMsg::Events(vec![ev(1)]));
        assert!(matches!(
            s.poll_end(),
            Some(CentralEnd::Refused(Refuse {
                code: RefuseCode::ProtocolViolation,
                ..
            }))
        ));
    }
}
