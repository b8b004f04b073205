//! Frozen copy of protocol 3's message enums, the previous version this build still speaks.
//!
//! **Do not change these definitions.** They are what an agent or central of the previous
//! release puts on the wire; the tests below (and `tests/tests/compat.rs`) hold the current
//! types to them. Protocol 4 only appended variants to both enums, so every protocol 3 message
//! decodes as the same current message and every current message a protocol 3 peer can receive
//! encodes as it expects. The structs the variants carry (`Hello`, `Welcome`, `EventEnvelope`,
//! ...) did not change between 3 and 4; the golden bytes below pin their encoding, so a change
//! to one of them fails here first.

use serde::{Deserialize, Serialize};

use crate::escrow::Pool;
use crate::messages::{EventEnvelope, Heartbeat, Hello, MasterBatch, Refuse, Welcome};

/// Protocol 3's ALPN identifier.
pub const ALPN: &[u8] = b"outpost/3";
pub const PROTOCOL_VERSION: u16 = 3;

/// Protocol 3: sent by the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AgentMsg {
    Hello(Hello),
    Events(Vec<EventEnvelope>),
    AllowanceRequest {
        request_id: u64,
        pool: Pool,
        qty: i64,
    },
    Heartbeat(Heartbeat),
}

/// Protocol 3: sent by central.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CentralMsg {
    Welcome(Welcome),
    Refuse(Refuse),
    Ack {
        through_seq: u64,
    },
    Master(MasterBatch),
    AllowanceReply {
        request_id: u64,
        granted: i64,
        rev: u64,
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{EventBody, Milestone, MilestoneKind, RefuseCode};
    use crate::{decode_body, encode};

    fn hello() -> Hello {
        Hello {
            protocol_version: 3,
            agent_version: "0.1.0".into(),
            site: "plant-1".into(),
            master_rev: 7,
            last_seq: 12,
            agent_time_ms: 1_700_000_000_000,
            acked_seq: 10,
            retained_from_seq: 1,
            central_incarnation: 99,
        }
    }

    fn welcome() -> Welcome {
        Welcome {
            protocol_version: 3,
            central_version: "0.1.0".into(),
            acked_seq: 10,
            master_rev: 8,
            incarnation: 99,
            master_from_rev: 7,
        }
    }

    fn event() -> EventEnvelope {
        EventEnvelope::new(
            "plant-1",
            11,
            "scan-1",
            1_700_000_000_000,
            &EventBody::Milestone(Milestone {
                shipment_id: "SH-1".into(),
                milestone: MilestoneKind::Picked,
                scanner_id: "gun-1".into(),
                at: "2026-11-27T10:00:00Z".into(),
            }),
        )
        .with_trace_id("0af7651916cd43dd8448eb211c80319c")
    }

    fn hex(b: &[u8]) -> String {
        crate::secret::to_hex(b)
    }

    /// The bytes a protocol 3 peer sends, recorded: if one of these changes, peers of the
    /// previous release can no longer talk to this one.
    #[test]
    fn protocol_3_frames_keep_their_bytes() {
        let hello = encode(&AgentMsg::Hello(hello())).unwrap();
        assert_eq!(
            hex(&hello),
            "0000001b000305302e312e3007706c616e742d31070c80a0abfef9620a0163"
        );
        let welcome = encode(&CentralMsg::Welcome(welcome())).unwrap();
        assert_eq!(hex(&welcome), "0000000c000305302e312e300a086307");
    }

    /// Every protocol 3 message decodes as the same current message, and back.
    #[test]
    fn protocol_3_messages_read_the_same_as_current_ones() {
        let agent = [
            (AgentMsg::Hello(hello()), crate::AgentMsg::Hello(hello())),
            (
                AgentMsg::Events(vec![event()]),
                crate::AgentMsg::Events(vec![event()]),
            ),
            (
                AgentMsg::AllowanceRequest {
                    request_id: 3,
                    pool: Pool::atp("SKU-1"),
                    qty: 5,
                },
                crate::AgentMsg::AllowanceRequest {
                    request_id: 3,
                    pool: Pool::atp("SKU-1"),
                    qty: 5,
                },
            ),
        ];
        for (old, new) in agent {
            let bytes = encode(&old).unwrap();
            assert_eq!(bytes, encode(&new).unwrap());
            let back: crate::AgentMsg = decode_body(&bytes[4..]).unwrap();
            assert_eq!(back, new);
            let back: AgentMsg = decode_body(&bytes[4..]).unwrap();
            assert_eq!(back, old);
        }
        let central = [
            (
                CentralMsg::Welcome(welcome()),
                crate::CentralMsg::Welcome(welcome()),
            ),
            (
                CentralMsg::Refuse(Refuse {
                    code: RefuseCode::Revoked,
                    reason: "r".into(),
                }),
                crate::CentralMsg::Refuse(Refuse {
                    code: RefuseCode::Revoked,
                    reason: "r".into(),
                }),
            ),
            (
                CentralMsg::Ack { through_seq: 9 },
                crate::CentralMsg::Ack { through_seq: 9 },
            ),
            (
                CentralMsg::AllowanceReply {
                    request_id: 3,
                    granted: 2,
                    rev: 4,
                    reason: String::new(),
                },
                crate::CentralMsg::AllowanceReply {
                    request_id: 3,
                    granted: 2,
                    rev: 4,
                    reason: String::new(),
                },
            ),
        ];
        for (old, new) in central {
            let bytes = encode(&old).unwrap();
            assert_eq!(bytes, encode(&new).unwrap());
            let back: crate::CentralMsg = decode_body(&bytes[4..]).unwrap();
            assert_eq!(back, new);
        }
    }

    /// The messages protocol 4 added are not protocol 3: a peer of the previous release would
    /// refuse them as undecodable, which is why they are only sent on a protocol 4 session.
    #[test]
    fn protocol_4_additions_do_not_decode_as_protocol_3() {
        let renew = encode(&crate::AgentMsg::RenewCertificate {
            csr_der: vec![1, 2, 3],
        })
        .unwrap();
        assert!(decode_body::<AgentMsg>(&renew[4..]).is_err());
        let cert = encode(&crate::CentralMsg::Certificate {
            chain_pem: "x".into(),
        })
        .unwrap();
        assert!(decode_body::<CentralMsg>(&cert[4..]).is_err());
    }
}
