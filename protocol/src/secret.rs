//! Bearer tokens as both processes keep them: only their SHA-256 is configured, presented tokens
//! are hashed once and compared in constant time, and clients are known by a name that logs may
//! show. Shared so that the agent and central accept exactly the same tokens and names.

use sha2::Digest;

/// Shortest accepted bearer token: 16 characters of a random hex token is 64 bits.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest accepted bearer token: keeps headers small and hashing cheap.
pub const MAX_TOKEN_LEN: usize = 256;
/// Longest client name.
pub const MAX_CLIENT_NAME_LEN: usize = 64;

/// SHA-256 of a bearer token.
pub fn hash_token(token: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(token).into()
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// The SHA-256 of a token as 64 lower-case hex digits: what `[[api.tokens]] sha256` holds.
pub fn sha256_hex(token: &str) -> String {
    to_hex(&hash_token(token.as_bytes()))
}

/// Parses 64 lower-case hex digits; `None` for anything else.
pub fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let b = hex.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// A token that cannot be used: its length or its characters (never its value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a token must be {MIN_TOKEN_LEN}..={MAX_TOKEN_LEN} visible ASCII characters (no spaces), got {len} bytes"
)]
pub struct BadTokenError {
    pub len: usize,
}

/// Why a token cannot be used: its length or its characters (never its value).
pub fn check_token(token: &str) -> Result<(), BadTokenError> {
    if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&token.len())
        || !token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(BadTokenError { len: token.len() });
    }
    Ok(())
}

/// Whether `name` is a valid client name: 1..=64 characters of `[A-Za-z0-9._-]`.
pub fn valid_client_name(name: &str) -> bool {
    (1..=MAX_CLIENT_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Compares two byte strings in time independent of where they differ (their length is not
/// secret: both are SHA-256 digests).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_anything_else() {
        let h = hash_token(b"0123456789abcdef");
        let hex = to_hex(&h);
        assert_eq!(hex, sha256_hex("0123456789abcdef"));
        assert_eq!(parse_sha256_hex(&hex), Some(h));
        assert_eq!(parse_sha256_hex(&hex.to_uppercase()), None);
        assert_eq!(parse_sha256_hex(&hex[..63]), None);
        assert_eq!(parse_sha256_hex(&format!("{}g", &hex[..63])), None);
        assert_eq!(to_hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        // A known vector: SHA-256 of "abc".
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn tokens_names_and_comparison() {
        assert!(check_token("0123456789abcdef").is_ok());
        assert!(check_token("short").is_err());
        assert!(check_token("0123456789 abcdef").is_err());
        assert!(check_token(&"x".repeat(MAX_TOKEN_LEN + 1)).is_err());
        assert!(valid_client_name("order-entry.line_2"));
        assert!(!valid_client_name(""));
        assert!(!valid_client_name("a b"));
        assert!(!valid_client_name(&"a".repeat(MAX_CLIENT_NAME_LEN + 1)));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
