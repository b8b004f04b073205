//! Fuzz target: `decode_body::<AgentMsg>` and `decode_body::<CentralMsg>` on arbitrary bodies.
//! Whenever a body decodes, re-encoding it as a frame and decoding again gives the same message
//! (the codec is canonical enough for the round trip), and the re-encoded body is no longer than
//! the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocol::frame::HEADER_BYTES;
use outpost_protocol::{AgentMsg, CentralMsg, decode_body, encode};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(body: &[u8]) {
    if let Ok(msg) = decode_body::<T>(body) {
        let frame = encode(&msg).expect("a decoded message re-encodes");
        let back: T = decode_body(&frame[HEADER_BYTES..]).expect("re-encoded frame decodes");
        assert_eq!(back, msg);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<AgentMsg>(data);
    round_trip::<CentralMsg>(data);
});
