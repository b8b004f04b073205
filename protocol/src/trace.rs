//! W3C Trace Context trace ids carried by every site event (pure: parsing, checking, and building
//! ids from bytes the caller supplies; no randomness or clock of its own).

use sha2::Digest;

use crate::validation::ValidationError;

/// Length of a W3C trace-id in lower-case hex characters (16 bytes).
pub const TRACE_ID_LEN: usize = 32;
/// HTTP request header a client may send to continue its trace (W3C Trace Context).
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// HTTP response header naming the trace the agent recorded the request under (W3C Trace Context
/// Level 2 `traceresponse`).
pub const TRACERESPONSE_HEADER: &str = "traceresponse";

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks a trace id: exactly `TRACE_ID_LEN` lower-case hex characters, not all zero (W3C).
pub fn validate_trace_id(s: &str) -> Result<(), ValidationError> {
    if s.len() != TRACE_ID_LEN || !is_lower_hex(s) || s.bytes().all(|b| b == b'0') {
        return Err(ValidationError::OutOfRange {
            field: "trace_id",
            detail: format!("must be {TRACE_ID_LEN} lower-case hex characters, not all zero"),
        });
    }
    Ok(())
}

/// Parses a `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`) and returns its trace id, or
/// `None` when the header is malformed or an id is all zeros; W3C says the receiver then starts a
/// new trace rather than failing the request. Versions above `00` are accepted by their first
/// four fields, as the specification asks of forward-compatible parsers.
pub fn parse_traceparent(header: &str) -> Option<String> {
    let header = header.trim();
    let mut parts = header.split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let parent_id = parts.next()?;
    let flags = parts.next()?;
    let rest = parts.next();
    if version.len() != 2 || !is_lower_hex(version) || version == "ff" {
        return None;
    }
    // Version 00 has exactly four fields; later versions may append more.
    if version == "00" && rest.is_some() {
        return None;
    }
    if parent_id.len() != 16 || !is_lower_hex(parent_id) || parent_id.bytes().all(|b| b == b'0') {
        return None;
    }
    if flags.len() != 2 || !is_lower_hex(flags) {
        return None;
    }
    validate_trace_id(trace_id).ok()?;
    Some(trace_id.to_string())
}

/// Renders 16 (random) bytes as a trace id. An all-zero input, invalid in W3C, becomes `…01`.
pub fn trace_id_from_bytes(mut bytes: [u8; 16]) -> String {
    if bytes == [0; 16] {
        bytes[15] = 1;
    }
    crate::secret::to_hex(&bytes)
}

/// Renders a `traceparent` value for `trace_id` with the given (random) span id, sampled flag set.
pub fn traceparent(trace_id: &str, mut span_id: [u8; 8]) -> String {
    if span_id == [0; 8] {
        span_id[7] = 1;
    }
    format!("00-{trace_id}-{}-01", crate::secret::to_hex(&span_id))
}

/// A trace id derived from an event's identity, for envelopes built where no request carried a
/// trace (central's own sales channel, tests): stable for the same event, valid, and distinct per
/// `(site, seq, event_id)`.
pub fn derived_trace_id(site: &str, seq: u64, event_id: &str) -> String {
    let mut h = sha2::Sha256::new();
    h.update(site.as_bytes());
    h.update([0]);
    h.update(seq.to_be_bytes());
    h.update(event_id.as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    trace_id_from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[test]
    fn traceparent_is_parsed_and_bad_ones_refused() {
        // Goal: only well-formed headers with non-zero ids yield a trace id; the rest restart.
        assert_eq!(
            parse_traceparent(&format!("00-{TID}-00f067aa0ba902b7-01")).as_deref(),
            Some(TID)
        );
        assert_eq!(
            parse_traceparent(&format!("01-{TID}-00f067aa0ba902b7-01-extra")).as_deref(),
            Some(TID)
        );
        for bad in [
            "",
            "garbage",
            &format!("00-{TID}-00f067aa0ba902b7-01-extra"),
            &format!("ff-{TID}-00f067aa0ba902b7-01"),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            &format!("00-{TID}-0000000000000000-01"),
            &format!("00-{}-00f067aa0ba902b7-01", TID.to_uppercase()),
            &format!("00-{TID}-00f067aa0ba902b7-1"),
            &format!("00-{}-00f067aa0ba902b7-01", &TID[1..]),
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_event_with_a_bad_trace_id_is_invalid() {
        // Goal: central's validation refuses a missing or malformed trace id (dead letter), and
        // accepts a well-formed one.
        use crate::messages::{
            EventBody, EventDecodeError, EventEnvelope, Milestone, MilestoneKind,
        };
        let env = EventEnvelope::new(
            "plant-1",
            1,
            "e1",
            0,
            &EventBody::Milestone(Milestone {
                shipment_id: "SH-1".into(),
                milestone: MilestoneKind::Loaded,
                scanner_id: "s-1".into(),
                at: "x".into(),
            }),
        );
        assert!(env.decode().is_ok());
        assert!(env.clone().with_trace_id(TID).decode().is_ok());
        for bad in [
            "",
            "xyz",
            &TID.to_uppercase(),
            "00000000000000000000000000000000",
        ] {
            assert!(
                matches!(
                    env.clone().with_trace_id(bad).decode(),
                    Err(EventDecodeError::Invalid(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn generated_and_derived_ids_are_valid() {
        assert_eq!(
            trace_id_from_bytes([0; 16]),
            "00000000000000000000000000000001"
        );
        validate_trace_id(&trace_id_from_bytes([0xab; 16])).unwrap();
        validate_trace_id(&derived_trace_id("plant-1", 1, "o1")).unwrap();
        assert_ne!(
            derived_trace_id("plant-1", 1, "o1"),
            derived_trace_id("plant-1", 2, "o1")
        );
        assert!(validate_trace_id("").is_err());
        let tp = traceparent(TID, [0; 8]);
        assert_eq!(parse_traceparent(&tp).as_deref(), Some(TID));
    }
}
