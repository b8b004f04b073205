//! Length-prefixed frames: a 4-byte big-endian body length, then a postcard body. The length is
//! checked against `MAX_FRAME_BYTES` before any of the body is read or allocated. Pure code.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest frame body. A full `Events` batch (`MAX_EVENTS_PER_BATCH` orders of a few hundred bytes)
/// or `Master` batch fits with room to spare; anything larger is a broken or hostile peer.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
/// Size of the length prefix.
pub const HEADER_BYTES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge { len: usize },
    #[error("malformed frame body: {0}")]
    Malformed(#[from] postcard::Error),
    #[error("frame body has {0} unexpected trailing bytes")]
    TrailingBytes(usize),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// Whether the error is the peer's fault (a protocol violation) rather than the transport's.
    pub fn is_protocol_violation(&self) -> bool {
        !matches!(self, FrameError::Io(_))
    }
}

/// Encodes one message as a frame (prefix + body).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER_BYTES];
    out = postcard::to_extend(msg, out)?;
    let len = out.len() - HEADER_BYTES;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len });
    }
    out[..HEADER_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Reads a length prefix and refuses it if it exceeds the limit.
pub fn decode_len(header: [u8; HEADER_BYTES]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len });
    }
    Ok(len)
}

/// Decodes a whole frame body; trailing bytes are an error (postcard alone would accept them).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Incremental decoder over a byte stream that arrives in arbitrary pieces.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes. The buffer never holds more than one frame's worth beyond what the
    /// caller has pushed without polling, because `poll_frame` checks each prefix first.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed.
    pub fn poll_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        if self.buf.len() < HEADER_BYTES {
            return Ok(None);
        }
        let header: [u8; HEADER_BYTES] = self.buf[..HEADER_BYTES].try_into().expect("4 bytes");
        let len = decode_len(header)?;
        if self.buf.len() < HEADER_BYTES + len {
            return Ok(None);
        }
        let msg = decode_body(&self.buf[HEADER_BYTES..HEADER_BYTES + len]);
        self.buf.drain(..HEADER_BYTES + len);
        msg.map(Some)
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;
    use crate::money::Money;
    use proptest::prelude::*;

    fn sample_order(seq: u64, qty: i64) -> EventBody {
        EventBody::Order(Order {
            order_id: format!("plant-1-{seq}"),
            customer_id: "C1".into(),
            status: "confirmed".into(),
            lines: vec![OrderLine {
                sku: "SKU-1".into(),
                qty,
                unit_price: Money(125_000),
                currency: "EUR".into(),
                promise: LinePromise::Confirmed,
            }],
            master_rev: 4,
            offline: false,
        })
    }

    fn sample_event(seq: u64) -> EventEnvelope {
        EventEnvelope::new(
            "plant-1",
            seq,
            &format!("plant-1-{seq}"),
            1_700_000_000_000,
            &sample_order(seq, 3),
        )
    }

    #[test]
    fn round_trip_through_the_decoder_in_pieces() {
        let msgs = vec![
            AgentMsg::Hello(Hello {
                protocol_version: 1,
                agent_version: "0.1.0".into(),
                site: "plant-1".into(),
                master_rev: 7,
                last_seq: 3,
                agent_time_ms: 1_700_000_000_000,
                acked_seq: 3,
                retained_from_seq: 1,
                central_incarnation: 77,
            }),
            AgentMsg::Events((1..=3).map(sample_event).collect()),
        ];
        let bytes: Vec<u8> = msgs.iter().flat_map(|m| encode(m).unwrap()).collect();
        let mut dec = FrameDecoder::new();
        let mut out = Vec::new();
        for chunk in bytes.chunks(5) {
            dec.push(chunk);
            while let Some(m) = dec.poll_frame::<AgentMsg>().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_the_body_arrives() {
        let mut dec = FrameDecoder::new();
        dec.push(&(MAX_FRAME_BYTES as u32 + 1).to_be_bytes());
        assert!(matches!(
            dec.poll_frame::<AgentMsg>(),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(decode_len(u32::MAX.to_be_bytes()).is_err());
        assert_eq!(
            decode_len((MAX_FRAME_BYTES as u32).to_be_bytes()).unwrap(),
            MAX_FRAME_BYTES
        );
    }

    #[test]
    fn trailing_bytes_and_truncation_are_refused() {
        let mut body = postcard::to_allocvec(&CentralMsg::Ack { through_seq: 5 }).unwrap();
        assert!(decode_body::<CentralMsg>(&body).is_ok());
        body.extend_from_slice(&[0, 0]);
        assert!(matches!(
            decode_body::<CentralMsg>(&body),
            Err(FrameError::TrailingBytes(2))
        ));
        let full = encode(&AgentMsg::Events(vec![sample_event(1)])).unwrap();
        let cut = &full[HEADER_BYTES..full.len() - 3];
        assert!(decode_body::<AgentMsg>(cut).is_err());
    }

    #[test]
    fn bad_event_bodies_are_reported_per_event() {
        let mut e = sample_event(1);
        assert!(e.decode().is_ok());
        e.schema = 99;
        assert_eq!(e.decode(), Err(EventDecodeError::UnknownSchema(99)));
        let mut e = sample_event(2);
        e.body.truncate(3);
        assert!(matches!(e.decode(), Err(EventDecodeError::Malformed(_))));
        let mut e = sample_event(3);
        e.body.push(0);
        assert!(matches!(e.decode(), Err(EventDecodeError::Malformed(_))));
        let e = EventEnvelope::new("plant-1", 4, "o4", 0, &sample_order(4, 0));
        assert!(
            matches!(e.decode(), Err(EventDecodeError::Invalid(_))),
            "qty 0 is invalid"
        );
    }

    #[test]
    fn a_huge_declared_vector_does_not_allocate_it() {
        // Variant 1 (Events) followed by a varint length of ~4 billion and no elements.
        let body = [1u8, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(decode_body::<AgentMsg>(&body).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes pushed in arbitrary pieces never panic the decoder, and it never
        /// buffers a frame whose prefix exceeds the limit.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048),
                                       split in 1usize..64) {
            let mut dec = FrameDecoder::new();
            for chunk in data.chunks(split) {
                dec.push(chunk);
                loop {
                    match dec.poll_frame::<AgentMsg>() {
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(FrameError::TooLarge { len }) => {
                            prop_assert!(len > MAX_FRAME_BYTES);
                            return Ok(());
                        }
                        Err(_) => return Ok(()),
                    }
                }
            }
            let _ = dec.poll_frame::<CentralMsg>();
        }

        /// Arbitrary bodies never panic either decoder.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_body::<AgentMsg>(&body);
            let _ = decode_body::<CentralMsg>(&body);
        }

        /// Encoding then decoding gives back the same batch.
        #[test]
        fn events_round_trip(n in 0u64..50, qty in 1i64..1000) {
            let events: Vec<_> = (1..=n)
                .map(|s| EventEnvelope::new("plant-1", s, &format!("o{s}"), 0, &sample_order(s, qty)))
                .collect();
            let msg = AgentMsg::Events(events);
            let frame = encode(&msg).unwrap();
            let back: AgentMsg = decode_body(&frame[HEADER_BYTES..]).unwrap();
            prop_assert_eq!(&back, &msg);
            if let AgentMsg::Events(evs) = back {
                for (i, e) in evs.iter().enumerate() {
                    prop_assert_eq!(e.decode().unwrap(), sample_order(i as u64 + 1, qty));
                }
            }
        }
    }
}
