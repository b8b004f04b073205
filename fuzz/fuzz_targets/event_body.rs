//! Fuzz target: `EventEnvelope::decode` on arbitrary bodies and schema numbers. Never panics; a body
//! that decodes and validates re-encodes to an envelope that decodes to the same event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocol::{EVENT_SCHEMA, EventDecodeError, EventEnvelope};

fuzz_target!(|data: &[u8]| {
    // Two bytes of schema (mostly the current one, so the body parser gets exercised), then the body.
    let (schema, body) = match data {
        [0, rest @ ..] => (EVENT_SCHEMA, rest),
        [a, b, rest @ ..] => (u16::from_be_bytes([*a, *b]), rest),
        _ => (EVENT_SCHEMA, data),
    };
    let env = EventEnvelope {
        site: "plant-1".into(),
        seq: 1,
        event_id: "e1".into(),
        at_ms: 0,
        schema,
        body: body.to_vec(),
        trace_id: outpost_protocol::derived_trace_id("plant-1", 1, "e1"),
    };
    match env.decode() {
        Ok(ev) => {
            let again = EventEnvelope::new("plant-1", 1, "e1", 0, &ev);
            assert_eq!(
                again.decode().expect("a valid event re-encodes validly"),
                ev
            );
        }
        Err(EventDecodeError::UnknownSchema(s)) => assert_ne!(s, EVENT_SCHEMA),
        Err(_) => {}
    }
});
