//! The pure state machines of a sync session: the agent's session (`agent::AgentSession`) and
//! central's (`central::CentralSession`), and the rules they share: what the agent may send next
//! given what central has acknowledged (`Uploader`), whether a Hello matches the certificate
//! (`check_hello`), and what central applies from an uploaded batch given its durable per-site
//! high-water mark (`plan_ingest`). No I/O: the drivers in the agent and central (and the
//! simulation) persist and transmit, then report back.

pub mod agent;
pub mod central;

use std::ops::RangeInclusive;

use crate::messages::{EventEnvelope, Hello, MAX_EVENTS_PER_BATCH, Refuse, RefuseCode};
use crate::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// A store (or the host) could not carry out a machine's request: its error as text. A machine
/// only needs to know that the session cannot go on, and why, for the log; the driver keeps the
/// typed error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreFailure(pub String);

/// A protocol violation by the peer: the session is closed with this reason.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("central acknowledged seq {acked} but only {sent} has been sent")]
    AckBeyondSent { acked: u64, sent: u64 },
    #[error("central's high-water mark {central} is beyond this site's last seq {local}")]
    CentralAhead { central: u64, local: u64 },
}

/// Agent side: which outbox range to send next, bounded by an in-flight window.
///
/// Invariant: `acked <= sent`; events `acked+1..=sent` are in flight and are sent again (as-is,
/// same seq) on the next session if this one dies, which central recognises as duplicates.
#[derive(Debug, Clone)]
pub struct Uploader {
    acked: u64,
    sent: u64,
    window: u64,
    max_batch: u64,
}

impl Uploader {
    /// `window`: most events in flight (sent, not acked); `max_batch`: most events per frame.
    pub fn new(window: u64, max_batch: u64) -> Self {
        assert!(
            window >= 1 && max_batch >= 1,
            "window and batch must be positive"
        );
        let max_batch = max_batch.min(MAX_EVENTS_PER_BATCH as u64);
        Uploader {
            acked: 0,
            sent: 0,
            window,
            max_batch,
        }
    }

    /// Starts a session from central's durable high-water mark. Everything after it is (re)sent.
    pub fn handle_welcome(
        &mut self,
        central_acked: u64,
        last_local_seq: u64,
    ) -> Result<(), SessionError> {
        if central_acked > last_local_seq {
            return Err(SessionError::CentralAhead {
                central: central_acked,
                local: last_local_seq,
            });
        }
        self.acked = central_acked;
        self.sent = central_acked;
        Ok(())
    }

    /// Central acknowledged through `through`. Returns whether it advanced the acked mark; an
    /// old or repeated ack changes nothing.
    pub fn handle_ack(&mut self, through: u64) -> Result<bool, SessionError> {
        if through > self.sent {
            return Err(SessionError::AckBeyondSent {
                acked: through,
                sent: self.sent,
            });
        }
        if through <= self.acked {
            return Ok(false);
        }
        self.acked = through;
        Ok(true)
    }

    /// The next range of sequence numbers to send, if any, given the last seq in the outbox.
    pub fn poll_send(&self, last_local_seq: u64) -> Option<RangeInclusive<u64>> {
        let limit = last_local_seq
            .min(self.sent + self.max_batch)
            .min(self.acked + self.window);
        (limit > self.sent).then(|| self.sent + 1..=limit)
    }

    /// The shell transmitted events through `through`.
    pub fn handle_sent(&mut self, through: u64) {
        assert!(
            through >= self.sent,
            "sent mark never goes back within a session"
        );
        self.sent = through;
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }
}

/// Central side: checks a hello against the identity from the certificate and the protocol
/// version negotiated in the TLS handshake (ALPN).
pub fn check_hello(cert_site: &str, negotiated: u16, hello: &Hello) -> Result<(), Refuse> {
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.protocol_version) {
        return Err(Refuse {
            code: RefuseCode::IncompatibleVersion,
            reason: format!(
                "agent speaks protocol version {}, central speaks {MIN_PROTOCOL_VERSION} to \
                 {PROTOCOL_VERSION}; upgrade the older side",
                hello.protocol_version
            ),
        });
    }
    if hello.protocol_version != negotiated {
        return Err(Refuse {
            code: RefuseCode::IncompatibleVersion,
            reason: format!(
                "the Hello says protocol version {} but the handshake negotiated {negotiated}",
                hello.protocol_version
            ),
        });
    }
    if hello.site != cert_site {
        return Err(Refuse {
            code: RefuseCode::WrongSite,
            reason: format!(
                "the certificate is for site {cert_site:?} but the agent says it is {:?}",
                hello.site
            ),
        });
    }
    Ok(())
}

/// What central does with a batch: skip the first `duplicates` events (already committed), store
/// the rest, and move the high-water mark to `new_hwm` in the same transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestPlan {
    pub duplicates: usize,
    pub new_hwm: u64,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum IngestError {
    #[error("event seq {seq} claims site {claimed:?}, but the connection is site {site:?}")]
    ForeignSite {
        seq: u64,
        claimed: String,
        site: String,
    },
    #[error("batch of {0} events exceeds the limit of {MAX_EVENTS_PER_BATCH}")]
    TooMany(usize),
    #[error("expected seq {expected}, got {got}: events must be contiguous and in order")]
    Gap { expected: u64, got: u64 },
}

/// Plans the ingest of `events` from `site` whose durable high-water mark is `hwm`.
///
/// Events at or below `hwm` are duplicates of a re-upload after a lost ack and must form a prefix;
/// the rest must continue exactly at `hwm + 1` without gaps. Only the envelope is checked here:
/// an event whose body cannot be decoded or validated still takes its place in the sequence and is
/// dead-lettered by central, so that one bad event never blocks the ones behind it.
pub fn plan_ingest(
    site: &str,
    hwm: u64,
    events: &[EventEnvelope],
) -> Result<IngestPlan, IngestError> {
    if events.len() > MAX_EVENTS_PER_BATCH {
        return Err(IngestError::TooMany(events.len()));
    }
    let mut expected: Option<u64> = None;
    let mut duplicates = 0;
    let mut new_hwm = hwm;
    for e in events {
        if e.site != site {
            return Err(IngestError::ForeignSite {
                seq: e.seq,
                claimed: e.site.clone(),
                site: site.to_string(),
            });
        }
        if let Some(exp) = expected
            && e.seq != exp
        {
            return Err(IngestError::Gap {
                expected: exp,
                got: e.seq,
            });
        }
        if e.seq <= hwm {
            duplicates += 1;
        } else if e.seq != new_hwm + 1 {
            return Err(IngestError::Gap {
                expected: new_hwm + 1,
                got: e.seq,
            });
        } else {
            new_hwm = e.seq;
        }
        expected = Some(e.seq + 1);
    }
    Ok(IngestPlan {
        duplicates,
        new_hwm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{EventBody, Milestone, MilestoneKind};
    use proptest::prelude::*;

    fn ev(site: &str, seq: u64) -> EventEnvelope {
        EventEnvelope::new(
            site,
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

    #[test]
    fn uploader_respects_window_and_batch() {
        let mut u = Uploader::new(5, 2);
        u.handle_welcome(0, 10).unwrap();
        assert_eq!(u.poll_send(10), Some(1..=2));
        u.handle_sent(2);
        assert_eq!(u.poll_send(10), Some(3..=4));
        u.handle_sent(4);
        assert_eq!(u.poll_send(10), Some(5..=5), "window of 5 caps in-flight");
        u.handle_sent(5);
        assert_eq!(u.poll_send(10), None);
        assert_eq!(u.handle_ack(3), Ok(true));
        assert_eq!(u.handle_ack(2), Ok(false), "old ack ignored");
        assert_eq!(u.poll_send(10), Some(6..=7));
        assert!(u.handle_ack(9).is_err(), "ack beyond sent is a violation");
    }

    #[test]
    fn welcome_resumes_after_central_mark_and_refuses_central_ahead() {
        let mut u = Uploader::new(100, 10);
        u.handle_welcome(7, 9).unwrap();
        assert_eq!(u.poll_send(9), Some(8..=9));
        assert!(u.handle_welcome(10, 9).is_err());
    }

    #[test]
    fn ingest_skips_duplicate_prefix_and_refuses_gaps_and_foreign_sites() {
        let batch: Vec<_> = (3..=6).map(|s| ev("plant-1", s)).collect();
        assert_eq!(
            plan_ingest("plant-1", 4, &batch),
            Ok(IngestPlan {
                duplicates: 2,
                new_hwm: 6
            })
        );
        assert_eq!(
            plan_ingest("plant-1", 9, &batch),
            Ok(IngestPlan {
                duplicates: 4,
                new_hwm: 9
            })
        );
        assert!(matches!(
            plan_ingest("plant-1", 1, &batch),
            Err(IngestError::Gap {
                expected: 2,
                got: 3
            })
        ));
        let mut foreign = batch.clone();
        foreign[1].site = "plant-2".into();
        assert!(matches!(
            plan_ingest("plant-1", 2, &foreign),
            Err(IngestError::ForeignSite { .. })
        ));
        let holes = vec![ev("plant-1", 1), ev("plant-1", 3)];
        assert!(plan_ingest("plant-1", 0, &holes).is_err());
    }

    #[test]
    fn hello_is_checked_against_the_certificate() {
        let mut h = Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "x".into(),
            site: "plant-1".into(),
            master_rev: 0,
            last_seq: 0,
            agent_time_ms: 0,
            acked_seq: 0,
            retained_from_seq: 0,
            central_incarnation: 0,
        };
        assert!(check_hello("plant-1", PROTOCOL_VERSION, &h).is_ok());
        assert_eq!(
            check_hello("plant-2", PROTOCOL_VERSION, &h)
                .unwrap_err()
                .code,
            RefuseCode::WrongSite
        );
        // The previous version is still spoken, when the handshake agreed on it.
        h.protocol_version = MIN_PROTOCOL_VERSION;
        assert!(check_hello("plant-1", MIN_PROTOCOL_VERSION, &h).is_ok());
        assert_eq!(
            check_hello("plant-1", PROTOCOL_VERSION, &h)
                .unwrap_err()
                .code,
            RefuseCode::IncompatibleVersion
        );
        for v in [MIN_PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1] {
            h.protocol_version = v;
            let r = check_hello("plant-1", v, &h).unwrap_err();
            assert_eq!(r.code, RefuseCode::IncompatibleVersion);
            assert!(r.reason.contains(&v.to_string()), "{}", r.reason);
        }
    }

    proptest! {
        /// Model check of the upload path over a lossy, duplicating, restarting link: whatever
        /// happens, applying planned batches yields every event exactly once, in order.
        #[test]
        fn exactly_once_under_loss_duplication_and_restarts(
            total in 1u64..200,
            ops in proptest::collection::vec((0u8..4, 1u64..30), 1..300),
        ) {
            let mut central_hwm = 0u64;
            let mut applied: Vec<u64> = Vec::new();
            let mut up = Uploader::new(50, 16);
            up.handle_welcome(central_hwm, total).unwrap();
            let mut in_flight: Vec<Vec<EventEnvelope>> = Vec::new();
            for (op, _n) in ops {
                match op {
                    // send the next batch
                    0 => if let Some(r) = up.poll_send(total) {
                        let end = *r.end();
                        in_flight.push(r.map(|s| ev("plant-1", s)).collect());
                        up.handle_sent(end);
                    },
                    // deliver the oldest batch and its ack
                    1 => if !in_flight.is_empty() {
                        let b = in_flight.remove(0);
                        let plan = plan_ingest("plant-1", central_hwm, &b).unwrap();
                        applied.extend(b[plan.duplicates..].iter().map(|e| e.seq));
                        central_hwm = plan.new_hwm;
                        up.handle_ack(central_hwm).unwrap();
                    },
                    // deliver the oldest batch but lose the ack
                    2 => if !in_flight.is_empty() {
                        let b = in_flight.remove(0);
                        let plan = plan_ingest("plant-1", central_hwm, &b).unwrap();
                        applied.extend(b[plan.duplicates..].iter().map(|e| e.seq));
                        central_hwm = plan.new_hwm;
                    },
                    // connection dies: in-flight frames are lost, a new session resumes
                    _ => {
                        in_flight.clear();
                        up = Uploader::new(50, 16);
                        up.handle_welcome(central_hwm, total).unwrap();
                    }
                }
            }
            // Drain to completion on a healthy link, bounded.
            for _ in 0..1000 {
                if up.acked() == total { break; }
                in_flight.clear();
                up = Uploader::new(50, 16);
                up.handle_welcome(central_hwm, total).unwrap();
                while let Some(r) = up.poll_send(total) {
                    let end = *r.end();
                    let b: Vec<_> = r.map(|s| ev("plant-1", s)).collect();
                    up.handle_sent(end);
                    let plan = plan_ingest("plant-1", central_hwm, &b).unwrap();
                    applied.extend(b[plan.duplicates..].iter().map(|e| e.seq));
                    central_hwm = plan.new_hwm;
                    up.handle_ack(central_hwm).unwrap();
                }
            }
            prop_assert_eq!(applied, (1..=total).collect::<Vec<_>>());
        }
    }

    proptest! {
        // Each case is a few hundred steps of pure code: 2,000 cases take about a second.
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Convergence when frames in flight are lost, duplicated and reordered in both
        /// directions: `Events` frames on the way to central and `Ack` frames on the way back sit
        /// in two unordered "network" bags; every step either sends, delivers any frame in either
        /// bag (not only the oldest), duplicates one, drops one, or restarts the session. Central
        /// applies a batch only through `plan_ingest` and refuses (drops) what it plans as a gap,
        /// like the shell closing a session; the agent drops acks it refuses. After healing, the
        /// central state is every seq exactly once, in order, whatever the interleaving.
        #[test]
        fn converges_under_reordering_duplication_and_loss_in_flight(
            total in 1u64..120,
            window in 1u64..40,
            max_batch in 1u64..20,
            ops in proptest::collection::vec((0u8..8, any::<u16>()), 1..400),
        ) {
            let mut central_hwm = 0u64;
            let mut applied: Vec<u64> = Vec::new();
            let mut up = Uploader::new(window, max_batch);
            up.handle_welcome(central_hwm, total).unwrap();
            // Frames in flight; a restart does not clear them: stale frames of an old session
            // may still arrive at central (a new connection) or be discarded by the agent.
            let mut to_central: Vec<Vec<EventEnvelope>> = Vec::new();
            let mut to_agent: Vec<u64> = Vec::new();
            let deliver = |b: &[EventEnvelope], hwm: &mut u64, applied: &mut Vec<u64>| {
                match plan_ingest("plant-1", *hwm, b) {
                    Ok(plan) => {
                        applied.extend(b[plan.duplicates..].iter().map(|e| e.seq));
                        *hwm = plan.new_hwm;
                        Some(*hwm)
                    }
                    Err(IngestError::Gap { .. }) => None,
                    Err(e) => panic!("unexpected refusal {e}"),
                }
            };
            for (op, pick) in ops {
                let pick = usize::from(pick);
                match op {
                    0 | 1 => if let Some(r) = up.poll_send(total) {
                        let end = *r.end();
                        to_central.push(r.map(|s| ev("plant-1", s)).collect());
                        up.handle_sent(end);
                    },
                    // deliver any events frame (reordering); central answers with its mark
                    2 | 3 => if !to_central.is_empty() {
                        let b = to_central.swap_remove(pick % to_central.len());
                        if let Some(hwm) = deliver(&b, &mut central_hwm, &mut applied) {
                            to_agent.push(hwm);
                        }
                    },
                    // deliver any ack (reordered acks arrive old after new)
                    4 => if !to_agent.is_empty() {
                        let a = to_agent.swap_remove(pick % to_agent.len());
                        // An ack beyond what this session sent belongs to an older session's
                        // frames: the shell closes the session, which is a restart.
                        if up.handle_ack(a).is_err() {
                            up = Uploader::new(window, max_batch);
                            up.handle_welcome(central_hwm, total).unwrap();
                        }
                    },
                    // duplicate a frame in flight, in either direction
                    5 => if pick % 2 == 0 && !to_central.is_empty() {
                        let b = to_central[pick % to_central.len()].clone();
                        to_central.push(b);
                    } else if !to_agent.is_empty() {
                        let a = to_agent[pick % to_agent.len()];
                        to_agent.push(a);
                    },
                    // lose a frame in flight, in either direction
                    6 => if pick % 2 == 0 && !to_central.is_empty() {
                        to_central.swap_remove(pick % to_central.len());
                    } else if !to_agent.is_empty() {
                        to_agent.swap_remove(pick % to_agent.len());
                    },
                    // the connection dies and a new session starts from central's durable mark
                    _ => {
                        up = Uploader::new(window, max_batch);
                        up.handle_welcome(central_hwm, total).unwrap();
                    }
                }
                prop_assert!(up.acked() <= central_hwm, "the agent never believes more than central has");
                prop_assert_eq!(&applied, &(1..=central_hwm).collect::<Vec<_>>());
            }
            // Late stale frames still arrive after the fault phase, in any order.
            while let Some(b) = to_central.pop() {
                deliver(&b, &mut central_hwm, &mut applied);
            }
            // Heal: a fresh session on a healthy link drains the rest, bounded.
            for _ in 0..1000 {
                if up.acked() == total { break; }
                up = Uploader::new(window, max_batch);
                up.handle_welcome(central_hwm, total).unwrap();
                while let Some(r) = up.poll_send(total) {
                    let end = *r.end();
                    let b: Vec<_> = r.map(|s| ev("plant-1", s)).collect();
                    up.handle_sent(end);
                    let hwm = deliver(&b, &mut central_hwm, &mut applied).expect("healthy link has no gaps");
                    up.handle_ack(hwm).unwrap();
                }
            }
            prop_assert_eq!(up.acked(), total);
            prop_assert_eq!(applied, (1..=total).collect::<Vec<_>>());
        }
    }
}
