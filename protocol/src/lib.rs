//! Outpost wire protocol shared by the agent and central: message types, length-prefixed frames,
//! site identity rules and the pure state machines of the sync session. Pure code: no sockets, no
//! storage, no clock (time is passed in).

pub mod escrow;
pub mod frame;
pub mod identity;
#[cfg(feature = "io")]
pub mod io;
pub mod messages;
pub mod money;
pub mod secret;
pub mod session;
pub mod trace;

pub use escrow::{CentralPool, EscrowError, Pool, SitePool};
pub use frame::{FrameDecoder, FrameError, MAX_FRAME_BYTES, decode_body, decode_len, encode};
pub use messages::*;
pub use money::Money;
pub use trace::{
    TRACE_ID_LEN, TRACEPARENT_HEADER, TRACERESPONSE_HEADER, derived_trace_id, parse_traceparent,
    trace_id_from_bytes, traceparent, validate_trace_id,
};

/// Version of the sync protocol spoken on the QUIC connection. Bumped on any incompatible change to
/// the messages below; the hello exchange refuses a peer speaking another version.
pub const PROTOCOL_VERSION: u16 = 3;

/// ALPN identifier negotiated in the TLS handshake. It carries the protocol version so that an
/// incompatible peer is refused before any application byte is exchanged.
pub const ALPN: &[u8] = b"outpost/3";
