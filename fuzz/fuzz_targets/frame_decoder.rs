//! Fuzz target: `FrameDecoder` fed an arbitrary byte stream cut into arbitrary chunks. It must never
//! panic, never yield a frame after refusing a prefix as too large, and never buffer more than what
//! was pushed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocol::{AgentMsg, CentralMsg, FrameDecoder, FrameError, MAX_FRAME_BYTES};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size (1..=64) and which message type is expected.
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(ctl % 64) + 1;
    let as_agent = ctl & 0x80 == 0;
    let mut dec = FrameDecoder::new();
    let mut pushed = 0usize;
    let mut taken = 0usize;
    for piece in stream.chunks(chunk) {
        dec.push(piece);
        pushed += piece.len();
        loop {
            let before = dec.buffered();
            let r = if as_agent {
                dec.poll_frame::<AgentMsg>().map(|m| m.is_some())
            } else {
                dec.poll_frame::<CentralMsg>().map(|m| m.is_some())
            };
            match r {
                Ok(true) => {
                    assert!(dec.buffered() < before, "a returned frame consumes bytes");
                    taken += before - dec.buffered();
                }
                Ok(false) => break,
                Err(FrameError::TooLarge { len }) => {
                    assert!(len > MAX_FRAME_BYTES);
                    // The stream is unusable: a session is closed here.
                    return;
                }
                Err(e) => {
                    assert!(e.is_protocol_violation());
                    taken += before - dec.buffered();
                }
            }
        }
        assert_eq!(taken + dec.buffered(), pushed, "no byte lost or invented");
    }
});
