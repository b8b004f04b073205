//! Fuzz target: JSON request bodies. The agent's and central's request structs are private to their
//! crates, so this parses arbitrary bytes with `serde_json` into the protocol types those requests
//! are built from (orders, milestones, master records, status updates) and into `Money`. Never
//! panics; whatever parses and validates survives a JSON round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocol::{
    AtpRecord, CustomerRecord, Milestone, Money, Order, OrderStatusUpdate, PriceRecord,
    parse_idempotency_key, validate_id, validate_text,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn json_round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<T>(data) {
        let text = serde_json::to_vec(&v).expect("a parsed value serializes");
        let back: T = serde_json::from_slice(&text).expect("serialized JSON parses");
        assert_eq!(back, v);
    }
}

fuzz_target!(|data: &[u8]| {
    json_round_trip::<Order>(data);
    json_round_trip::<Milestone>(data);
    json_round_trip::<PriceRecord>(data);
    json_round_trip::<AtpRecord>(data);
    json_round_trip::<CustomerRecord>(data);
    json_round_trip::<OrderStatusUpdate>(data);
    json_round_trip::<Money>(data);
    let _ = serde_json::from_slice::<serde_json::Value>(data);
    let _ = parse_idempotency_key(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = validate_id("order_id", s);
        let _ = validate_text("note", s);
        if let Ok(m) = Money::parse(s) {
            assert_eq!(Money::parse(&m.to_string()), Ok(m), "Display parses back");
        }
    }
});
