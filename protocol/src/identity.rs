//! Site identity: the site id is carried in the site certificate as a URI SAN
//! `urn:outpost:site:<id>` and is only ever taken from there. Pure functions over DER bytes.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Prefix of the URI subject alternative name that names a site.
pub const SITE_URI_PREFIX: &str = "urn:outpost:site:";
/// Longest site id: short enough for a DNS label, a file name and a metric label.
pub const MAX_SITE_ID_LEN: usize = 63;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SiteIdError {
    #[error(
        "site id {0:?} is invalid: use 1..=63 characters of [a-z0-9-], starting with a letter or digit"
    )]
    Invalid(String),
    #[error("the certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("the certificate carries no {SITE_URI_PREFIX}<id> URI name")]
    Missing,
    #[error("the certificate carries more than one site name")]
    Ambiguous,
}

/// A site id is a lower-case DNS-label-like name: `plant-1`, `warehouse-berlin`.
pub fn validate_site_id(id: &str) -> Result<(), SiteIdError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_SITE_ID_LEN
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(SiteIdError::Invalid(id.chars().take(80).collect()))
    }
}

/// The URI SAN written into a site's certificate.
pub fn site_uri(id: &str) -> String {
    format!("{SITE_URI_PREFIX}{id}")
}

/// Extracts the site id from a DER certificate. Exactly one `urn:outpost:site:` URI name must be
/// present and name a valid site id.
pub fn site_id_from_cert_der(der: &[u8]) -> Result<String, SiteIdError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| SiteIdError::BadCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SiteIdError::BadCertificate(e.to_string()))?;
    let mut found = None;
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && let Some(id) = uri.strip_prefix(SITE_URI_PREFIX)
            {
                if found.is_some() {
                    return Err(SiteIdError::Ambiguous);
                }
                found = Some(id.to_string());
            }
        }
    }
    let id = found.ok_or(SiteIdError::Missing)?;
    validate_site_id(&id)?;
    Ok(id)
}

/// Whether `s` is where a site can reach central: `ip:port`, `[ipv6]:port` or `host:port` with a
/// non-zero port (what `[sync] central_addr` and enrolment bundles accept).
pub fn valid_host_port(s: &str) -> bool {
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    port_ok && host_ok
}

/// Most addresses `[sync] central_addr` may list.
pub const MAX_CENTRAL_ADDRS: usize = 16;

/// Why a list of central addresses is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CentralAddrsError {
    #[error("is empty")]
    Empty,
    #[error("invalid socket address {0:?} (expected host:port or ip:port with a non-zero port)")]
    Invalid(String),
    #[error("lists {0:?} twice")]
    Duplicate(String),
    #[error("lists {0} addresses; at most {MAX_CENTRAL_ADDRS}")]
    TooMany(usize),
}

/// Parses where a site reaches central: one address, or several addresses of the same central
/// separated by commas (`a.example:7601,b.example:7601`), in the order the agent tries them. Spaces around
/// an address are ignored.
pub fn parse_central_addrs(s: &str) -> Result<Vec<String>, CentralAddrsError> {
    if s.trim().is_empty() {
        return Err(CentralAddrsError::Empty);
    }
    let n = s.split(',').count();
    if n > MAX_CENTRAL_ADDRS {
        return Err(CentralAddrsError::TooMany(n));
    }
    let mut out: Vec<String> = Vec::new();
    for part in s.split(',') {
        let a = part.trim();
        if !valid_host_port(a) {
            return Err(CentralAddrsError::Invalid(a.to_string()));
        }
        if out.iter().any(|o| o == a) {
            return Err(CentralAddrsError::Duplicate(a.to_string()));
        }
        out.push(a.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn central_addr_lists() {
        assert_eq!(
            parse_central_addrs("127.0.0.1:7601"),
            Ok(vec!["127.0.0.1:7601".to_string()])
        );
        assert_eq!(
            parse_central_addrs(" a.example:7601, b.example:7601 ,[::1]:9"),
            Ok(vec![
                "a.example:7601".to_string(),
                "b.example:7601".to_string(),
                "[::1]:9".to_string()
            ])
        );
        assert_eq!(parse_central_addrs(" "), Err(CentralAddrsError::Empty));
        assert_eq!(
            parse_central_addrs("a:1,"),
            Err(CentralAddrsError::Invalid(String::new()))
        );
        assert_eq!(
            parse_central_addrs("a:1,b:0"),
            Err(CentralAddrsError::Invalid("b:0".into()))
        );
        assert_eq!(
            parse_central_addrs("a:1, a:1"),
            Err(CentralAddrsError::Duplicate("a:1".into()))
        );
        let many: Vec<String> = (1..=MAX_CENTRAL_ADDRS + 1)
            .map(|p| format!("h:{p}"))
            .collect();
        assert_eq!(
            parse_central_addrs(&many.join(",")),
            Err(CentralAddrsError::TooMany(MAX_CENTRAL_ADDRS + 1))
        );
    }

    #[test]
    fn site_ids() {
        for ok in ["plant-1", "warehouse-1", "a", "x9"] {
            assert!(validate_site_id(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in ["", "-x", "Plant", "a_b", "a.b", long.as_str()] {
            assert!(validate_site_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(
            site_id_from_cert_der(b"not a certificate"),
            Err(SiteIdError::BadCertificate(_))
        ));
    }
}
