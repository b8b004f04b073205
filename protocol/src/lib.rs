//! Outpost wire protocol shared by the agent and central: message types, length-prefixed frames,
//! site identity rules and the pure state machines of the sync session. Pure code: no sockets, no
//! storage, no clock (time is passed in).

// The one module besides `io` that does I/O: it reads the config file and the environment.
#[cfg(feature = "config-load")]
pub mod config_load;
pub mod config_reference;
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
pub mod v3;
pub mod validation;

pub use escrow::{CentralPool, EscrowError, Pool, SitePool};
pub use frame::{FrameDecoder, FrameError, MAX_FRAME_BYTES, decode_body, decode_len, encode};
pub use messages::*;
pub use money::Money;
pub use trace::{
    TRACE_ID_LEN, TRACEPARENT_HEADER, TRACERESPONSE_HEADER, derived_trace_id, parse_traceparent,
    trace_id_from_bytes, traceparent, validate_trace_id,
};

/// Version of the sync protocol spoken on the QUIC connection. Bumped on any change to the
/// messages below. Each build also speaks the version before it (`MIN_PROTOCOL_VERSION`), so a
/// fleet is upgraded one site at a time: central first or agents first.
///
/// - 4: certificate renewal over the sync connection (`RenewCertificate`, `Certificate`,
///   `CertificateRefused`, appended to the message enums). Everything else encodes as in 3.
/// - 3: the Hello carries the acked mark, the retention start and central's store
///   incarnation; the Welcome carries the incarnation and the revision master data resumes from.
pub const PROTOCOL_VERSION: u16 = 4;

/// Oldest protocol version this build still speaks: one behind.
pub const MIN_PROTOCOL_VERSION: u16 = 3;

/// ALPN identifier of the current protocol version, negotiated in the TLS handshake. It carries
/// the version so that an incompatible peer is refused before any application byte is exchanged.
pub const ALPN: &[u8] = b"outpost/4";

/// The ALPN identifier of protocol `version`: `outpost/<version>`.
pub fn alpn_for(version: u16) -> Vec<u8> {
    format!("outpost/{version}").into_bytes()
}

/// The ALPN identifiers to offer or accept, newest first: every version from `max` down to
/// `MIN_PROTOCOL_VERSION` (`max` is clamped into the versions this build speaks). TLS picks the
/// first one both sides list, so two builds settle on the newest version both speak.
pub fn alpn_protocols(max: u16) -> Vec<Vec<u8>> {
    let max = max.clamp(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION);
    (MIN_PROTOCOL_VERSION..=max).rev().map(alpn_for).collect()
}

/// The protocol version an ALPN identifier names, if this build speaks it.
pub fn version_of_alpn(alpn: &[u8]) -> Option<u16> {
    let v: u16 = std::str::from_utf8(alpn.strip_prefix(b"outpost/")?)
        .ok()?
        .parse()
        .ok()?;
    (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION)
        .contains(&v)
        .then_some(v)
}

#[cfg(test)]
mod alpn_tests {
    use super::*;

    #[test]
    fn alpn_lists_every_spoken_version_newest_first() {
        assert_eq!(alpn_protocols(PROTOCOL_VERSION)[0], ALPN);
        assert_eq!(
            alpn_protocols(PROTOCOL_VERSION).len(),
            usize::from(PROTOCOL_VERSION - MIN_PROTOCOL_VERSION + 1)
        );
        assert_eq!(
            alpn_protocols(MIN_PROTOCOL_VERSION),
            vec![v3::ALPN.to_vec()]
        );
        // Out-of-range limits are clamped to what this build speaks.
        assert_eq!(alpn_protocols(0), vec![v3::ALPN.to_vec()]);
        assert_eq!(alpn_protocols(99), alpn_protocols(PROTOCOL_VERSION));
        assert_eq!(version_of_alpn(b"outpost/3"), Some(3));
        assert_eq!(version_of_alpn(ALPN), Some(PROTOCOL_VERSION));
        for bad in [
            &b"outpost/2"[..],
            b"outpost/5",
            b"outpost/",
            b"h3",
            b"outpost/x",
        ] {
            assert_eq!(version_of_alpn(bad), None);
        }
    }
}
