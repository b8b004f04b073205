//! Certificate renewal over the sync connection (protocol 4): a site sends a signing request for
//! a key it generated itself; central signs a new site certificate for the site named by the
//! session's verified certificate, never by the request. Needs the fleet CA's key
//! (`[renewal] ca_dir`); without it every request is refused with that reason and sites keep
//! their certificates until an operator re-enrols them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use outpost_protocol::MAX_CSR_BYTES;
use rcgen::CertificateSigningRequestParams;
use rustls::pki_types::CertificateSigningRequestDer;

use crate::certs;

/// Certificates signed and requests refused since start (`/metrics`).
pub static RENEWED: AtomicU64 = AtomicU64::new(0);
pub static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Most sites whose last renewal time is remembered; older entries are dropped first. Far above
/// any fleet, and it bounds the map whatever sites send.
const MAX_REMEMBERED: usize = 100_000;

/// Why a renewal request was refused; the text is what the agent is told (`CertificateRefused`)
/// and keeps in its health.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(
        "central cannot sign certificates: no CA key is configured ([renewal] ca_dir); re-enrol \
         the site before its certificate expires"
    )]
    NoCa,
    #[error("signing request of {0} bytes is larger than {MAX_CSR_BYTES}")]
    TooLarge(usize),
    #[error(
        "a certificate was signed for this site {ago_secs}s ago; the least interval is \
         {min_secs}s ([renewal] min_interval_secs)"
    )]
    TooSoon { ago_secs: u64, min_secs: u64 },
    #[error("not a valid signing request: {0}")]
    InvalidRequest(#[source] rcgen::Error),
    #[error("{0}")]
    Params(#[source] certs::CertError),
    #[error("central cannot load its CA: {0}")]
    LoadCa(#[source] certs::CertError),
    #[error("signing failed: {0}")]
    Signing(#[source] rcgen::Error),
}

/// Signs renewed site certificates; shared by every session.
#[derive(Debug)]
pub struct Signer {
    /// The fleet CA (`ca.pem` + `ca.key`); `None`: renewal is off.
    ca_dir: Option<PathBuf>,
    validity_days: i64,
    /// Least time between two certificates signed for one site.
    min_interval: Duration,
    last: Mutex<HashMap<String, Instant>>,
}

impl Signer {
    pub fn new(ca_dir: Option<PathBuf>, validity_days: i64, min_interval: Duration) -> Self {
        Signer {
            ca_dir,
            validity_days,
            min_interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Signs `csr_der` for `site` (the session's certificate identity): returns the new
    /// certificate as PEM, or why not (sent to the agent as `CertificateRefused`). Blocking:
    /// reads the CA key and signs; call it off the async workers.
    pub fn sign(&self, site: &str, csr_der: &[u8]) -> Result<String, SignError> {
        let Some(ca_dir) = &self.ca_dir else {
            return Err(SignError::NoCa);
        };
        if csr_der.len() > MAX_CSR_BYTES {
            return Err(SignError::TooLarge(csr_der.len()));
        }
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(at) = last.get(site)
                && at.elapsed() < self.min_interval
            {
                return Err(SignError::TooSoon {
                    ago_secs: at.elapsed().as_secs(),
                    min_secs: self.min_interval.as_secs(),
                });
            }
            if last.len() >= MAX_REMEMBERED
                && let Some(oldest) = last
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(s, _)| s.clone())
            {
                last.remove(&oldest);
            }
            last.insert(site.to_string(), Instant::now());
        }
        let result = self.sign_now(ca_dir, site, csr_der);
        if result.is_err() {
            // A refused request does not count against the interval.
            self.last
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(site);
        }
        result
    }

    fn sign_now(
        &self,
        ca_dir: &std::path::Path,
        site: &str,
        csr_der: &[u8],
    ) -> Result<String, SignError> {
        // Parses the request and checks its signature: the agent holds the key it names.
        let mut csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(SignError::InvalidRequest)?;
        // Whatever the request asks for, the certificate says what a site certificate says,
        // for the site of this session.
        csr.params = certs::site_params(site, self.validity_days).map_err(SignError::Params)?;
        let issuer = certs::load_issuer(ca_dir).map_err(|e| {
            tracing::error!(error = %e, "cannot load the fleet CA to sign a renewal");
            SignError::LoadCa(e)
        })?;
        let cert = csr.signed_by(&issuer).map_err(SignError::Signing)?;
        Ok(cert.pem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn csr(key: &KeyPair, site_claimed: &str) -> Vec<u8> {
        let mut p = CertificateParams::new(vec![format!("{site_claimed}.example")]).unwrap();
        p.subject_alt_names = vec![rcgen::SanType::URI(
            outpost_protocol::identity::site_uri(site_claimed)
                .try_into()
                .unwrap(),
        )];
        p.serialize_request(key).unwrap().der().to_vec()
    }

    #[test]
    fn signs_for_the_session_site_with_the_requested_key_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        certs::create_ca(dir.path(), false).unwrap();
        let signer = Signer::new(
            Some(dir.path().to_path_buf()),
            400,
            Duration::from_secs(3600),
        );
        let key = KeyPair::generate().unwrap();
        // The request claims another site: the certificate is for the session's site anyway.
        let pem = signer.sign("plant-1", &csr(&key, "plant-2")).unwrap();
        use rustls::pki_types::pem::PemObject as _;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(
            outpost_protocol::identity::site_id_from_cert_der(&der).unwrap(),
            "plant-1"
        );
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            &*cert.public_key().subject_public_key.data,
            key.public_key_raw(),
            "the certificate names the requester's key"
        );
        let days = (cert.validity().not_after.timestamp()
            - time::OffsetDateTime::now_utc().unix_timestamp())
            / 86_400;
        assert!((398..=400).contains(&days), "{days}");
        // A second request within the interval is refused; garbage is refused and not counted.
        let again = signer
            .sign("plant-1", &csr(&key, "plant-1"))
            .unwrap_err()
            .to_string();
        assert!(again.contains("least interval"), "{again}");
        let bad = signer
            .sign("plant-3", b"not a csr")
            .unwrap_err()
            .to_string();
        assert!(bad.contains("not a valid signing request"), "{bad}");
        assert!(signer.sign("plant-3", &csr(&key, "plant-3")).is_ok());
        let big = signer
            .sign("plant-4", &vec![0u8; MAX_CSR_BYTES + 1])
            .unwrap_err()
            .to_string();
        assert!(big.contains("larger than"), "{big}");
    }

    #[test]
    fn without_a_ca_key_requests_are_refused_with_the_reason() {
        let signer = Signer::new(None, 365, Duration::from_secs(1));
        let key = KeyPair::generate().unwrap();
        let why = signer
            .sign("plant-1", &csr(&key, "plant-1"))
            .unwrap_err()
            .to_string();
        assert!(why.contains("[renewal] ca_dir"), "{why}");
    }
}
