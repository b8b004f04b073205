//! Fixed-point money amounts (four decimal places), exact on the wire and in JSON. Pure type.
//!
//! JSON renders an amount as a decimal string (`"12.50"`) so that no client parses money as a binary
//! float; input accepts either a string or a JSON number. Postcard (the wire) carries the raw `i64`.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Number of decimal places kept. Four covers every currency's minor unit plus sub-cent unit prices.
pub const MONEY_SCALE: u32 = 4;
const FACTOR: i64 = 10_i64.pow(MONEY_SCALE);

/// An exact amount in units of 1/10,000 of the currency's major unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(pub i64);

/// A string or number that is not a valid money amount.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid amount {0:?}: expected a decimal number with at most 4 decimal places")]
pub struct ParseMoneyError(pub String);

impl Money {
    /// The amount in minor units of 1/10,000.
    pub fn units(self) -> i64 {
        self.0
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// Parses `"12"`, `"12.5"`, `"-0.0001"`. Rejects exponents, more than four decimals and overflow.
    pub fn parse(s: &str) -> Result<Money, ParseMoneyError> {
        let err = || ParseMoneyError(s.chars().take(40).collect());
        let t = s.trim();
        let (neg, digits) = match t.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if int.is_empty() && frac.is_empty()
            || frac.len() > MONEY_SCALE as usize
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(err());
        }
        let int_v: i64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| err())?
        };
        let mut frac_v: i64 = if frac.is_empty() {
            0
        } else {
            frac.parse().map_err(|_| err())?
        };
        frac_v *= 10_i64.pow(MONEY_SCALE - frac.len() as u32);
        let v = int_v
            .checked_mul(FACTOR)
            .and_then(|v| v.checked_add(frac_v))
            .ok_or_else(err)?;
        Ok(Money(if neg { -v } else { v }))
    }
}

impl fmt::Display for Money {
    /// At least two decimals, trailing zeros beyond them trimmed: `12.50`, `0.1234`, `-3.00`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let int = abs / FACTOR as u64;
        let mut frac = format!("{:04}", abs % FACTOR as u64);
        while frac.len() > 2 && frac.ends_with('0') {
            frac.pop();
        }
        write!(f, "{sign}{int}.{frac}")
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_i64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Money, D::Error> {
        if !d.is_human_readable() {
            return i64::deserialize(d).map(Money);
        }
        struct V;
        impl Visitor<'_> for V {
            type Value = Money;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a decimal amount as a string or number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Money, E> {
                Money::parse(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Money, E> {
                v.checked_mul(FACTOR)
                    .map(Money)
                    .ok_or_else(|| E::custom("amount out of range"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Money, E> {
                i64::try_from(v)
                    .map_err(|_| E::custom("amount out of range"))
                    .and_then(|v| self.visit_i64(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Money, E> {
                // The shortest representation of the float is what the client wrote (`12.5`).
                Money::parse(&v.to_string()).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        for (s, units, shown) in [
            ("12", 120_000, "12.00"),
            ("12.5", 125_000, "12.50"),
            ("0.0001", 1, "0.0001"),
            ("-3", -30_000, "-3.00"),
            (".5", 5_000, "0.50"),
        ] {
            let m = Money::parse(s).unwrap();
            assert_eq!(m.units(), units, "{s}");
            assert_eq!(m.to_string(), shown, "{s}");
        }
        for bad in [
            "",
            ".",
            "1.23456",
            "1e3",
            "abc",
            "1.2.3",
            "99999999999999999",
        ] {
            assert!(Money::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn json_accepts_numbers_and_strings_and_emits_strings() {
        let a: Money = serde_json::from_str("12.5").unwrap();
        let b: Money = serde_json::from_str("\"12.50\"").unwrap();
        let c: Money = serde_json::from_str("7").unwrap();
        assert_eq!(a, b);
        assert_eq!(c, Money(70_000));
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"12.50\"");
        assert!(serde_json::from_str::<Money>("true").is_err());
    }

    #[test]
    fn postcard_carries_raw_units() {
        let bytes = postcard::to_allocvec(&Money(123_456)).unwrap();
        assert_eq!(
            postcard::from_bytes::<Money>(&bytes).unwrap(),
            Money(123_456)
        );
    }
}
