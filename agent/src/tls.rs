//! TLS material for the sync connection: PEM loading and the rustls/quinn client configuration
//! (TLS 1.3 only, ring provider, fleet CA as the only trust root, this site's certificate as the
//! client identity). Reads files; no sockets.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Largest PEM file read: a certificate chain or key is a few KiB; anything larger is a mistake.
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_PEM_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("QUIC does not accept this TLS configuration: {0}")]
    Quic(String),
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_err = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_PEM_BYTES {
        return Err(TlsError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    std::fs::read(path).map_err(read_err)
}

/// Reads every certificate of a PEM file; at least one is required.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_bounded(path)?;
    let pem_err = |detail: String| TlsError::Pem {
        path: path.to_path_buf(),
        detail,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(pem_err("contains no certificate".into()));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_bounded(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        detail: format!("no usable private key: {e}"),
    })
}

/// The rustls client configuration: TLS 1.3 only, the ring provider made explicit, only the fleet
/// CA trusted, this site's certificate presented, ALPN offering every protocol version this
/// build speaks up to `protocol_max`, newest first.
pub fn client_config(
    ca_cert: &Path,
    cert: &Path,
    key: &Path,
    protocol_max: u16,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(ca_cert)? {
        roots.add(c)?;
    }
    finish_renewal(cert, key)?;
    let chain = read_certs(cert)?;
    let key = read_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = outpost_protocol::alpn_protocols(protocol_max);
    Ok(cfg)
}

/// What the agent needs to know of its own certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Validity, in seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// The site id the certificate names (its `urn:outpost:site:` URI).
    pub site: String,
}

/// Reads the validity and site id of the first certificate in `path`.
pub fn cert_info(path: &Path) -> Result<CertInfo, TlsError> {
    let der = read_certs(path)?.swap_remove(0);
    cert_info_der(&der).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Why a DER certificate's validity could not be read (`cert_validity`).
#[derive(Debug, thiserror::Error)]
pub enum CertValidityError {
    #[error("not an X.509 certificate: {0}")]
    NotX509(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
}

/// The validity period of a DER certificate, in seconds since the Unix epoch.
pub fn cert_validity(der: &[u8]) -> Result<(i64, i64), CertValidityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(CertValidityError::NotX509)?;
    Ok((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

/// Why a DER certificate's validity and site id could not be read (`cert_info_der`).
#[derive(Debug, thiserror::Error)]
pub enum CertInfoError {
    #[error(transparent)]
    Validity(#[from] CertValidityError),
    #[error(transparent)]
    SiteId(#[from] outpost_protocol::identity::SiteIdError),
}

fn cert_info_der(der: &[u8]) -> Result<CertInfo, CertInfoError> {
    let (not_before, not_after) = cert_validity(der)?;
    let site = outpost_protocol::identity::site_id_from_cert_der(der)?;
    Ok(CertInfo {
        not_before,
        not_after,
        site,
    })
}

/// Suffix of the files a renewal writes before it moves them into place.
const NEXT_SUFFIX: &str = "next";

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

/// Completes a renewal that was cut short between moving the new key and the new certificate
/// into place (`install_renewed`): the new key is in place and the new certificate still waits
/// beside it. Anything else is left alone.
fn finish_renewal(cert: &Path, key: &Path) -> Result<(), TlsError> {
    let next_cert = with_suffix(cert, NEXT_SUFFIX);
    if !next_cert.exists() || with_suffix(key, NEXT_SUFFIX).exists() {
        return Ok(());
    }
    let (Ok(chain), Ok(k)) = (read_certs(&next_cert), read_key(key)) else {
        return Ok(());
    };
    if key_matches(&chain[0], &k) {
        tracing::warn!(
            cert = %cert.display(),
            "finishing a certificate renewal that was interrupted: the renewed certificate \
             matches the key in place"
        );
        std::fs::rename(&next_cert, cert).map_err(|source| TlsError::Read {
            path: next_cert.clone(),
            source,
        })?;
        sync_dir(cert);
    }
    Ok(())
}

fn key_matches(cert: &CertificateDer<'_>, key: &PrivateKeyDer<'_>) -> bool {
    let Ok(signing) = rustls::crypto::ring::sign::any_supported_type(key) else {
        return false;
    };
    let Some(public) = signing.public_key() else {
        return false;
    };
    x509_parser::parse_x509_certificate(cert)
        .map(|(_, c)| c.public_key().raw == public.as_ref())
        .unwrap_or(false)
}

fn sync_dir(file: &Path) {
    if let Some(dir) = file.parent()
        && let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
    {
        let _ = d.sync_all();
    }
}

/// A key made at the site for a renewal, and its signing request for central.
pub struct RenewalRequest {
    pub key_pem: String,
    pub csr_der: Vec<u8>,
}

/// Why a renewal's key and signing request could not be made (`new_renewal_request`).
#[derive(Debug, thiserror::Error)]
pub enum NewRenewalRequestError {
    #[error("cannot generate a key: {0}")]
    Key(#[source] rcgen::Error),
    #[error("cannot build a signing request: {0}")]
    Request(#[source] rcgen::Error),
    #[error("site uri: {0}")]
    SiteUri(#[source] rcgen::Error),
}

/// Generates a new key (ECDSA P-256) and a signing request naming `site`. Central decides what
/// the certificate says; the request only proves possession of the key.
pub fn new_renewal_request(site: &str) -> Result<RenewalRequest, NewRenewalRequestError> {
    let key = rcgen::KeyPair::generate().map_err(NewRenewalRequestError::Key)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(NewRenewalRequestError::Request)?;
    params.subject_alt_names = vec![rcgen::SanType::URI(
        outpost_protocol::identity::site_uri(site)
            .try_into()
            .map_err(NewRenewalRequestError::SiteUri)?,
    )];
    let csr = params
        .serialize_request(&key)
        .map_err(NewRenewalRequestError::Request)?;
    Ok(RenewalRequest {
        key_pem: key.serialize_pem(),
        csr_der: csr.der().to_vec(),
    })
}

/// Why a certificate central signed was refused (`check_renewed`). Nothing is installed then;
/// the old certificate stays in use.
#[derive(Debug, thiserror::Error)]
pub enum CheckRenewedError {
    #[error("not a PEM certificate: {0}")]
    NotPem(#[source] rustls::pki_types::pem::Error),
    #[error("no certificate in the answer")]
    NoCertificate,
    #[error(transparent)]
    Unreadable(#[from] CertInfoError),
    #[error("the certificate names site {found:?}, this agent is {site:?}")]
    OtherSite { found: String, site: String },
    #[error("the new key: {0}")]
    Key(#[source] rustls::pki_types::pem::Error),
    #[error("the certificate does not certify the key this agent generated")]
    OtherKey,
    #[error("the certificate is not valid now (valid {not_before}..{not_after}, now {now})")]
    NotValidNow {
        not_before: i64,
        not_after: i64,
        now: i64,
    },
    #[error(transparent)]
    Ca(#[from] TlsError),
    #[error(transparent)]
    CaRoot(#[from] rustls::Error),
    #[error(transparent)]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the certificate does not chain to the fleet CA: {0}")]
    NotChained(#[source] rustls::Error),
}

/// Checks a certificate central signed for `request`: it names this site, certifies the new
/// key, chains to the fleet CA and is valid now (by `now_unix`); returns its validity.
pub fn check_renewed(
    ca_cert: &Path,
    site: &str,
    request: &RenewalRequest,
    chain_pem: &str,
    now_unix: i64,
) -> Result<CertInfo, CheckRenewedError> {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(CheckRenewedError::NotPem)?;
    let leaf = chain.first().ok_or(CheckRenewedError::NoCertificate)?;
    let info = cert_info_der(leaf)?;
    if info.site != site {
        return Err(CheckRenewedError::OtherSite {
            found: info.site,
            site: site.to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(request.key_pem.as_bytes())
        .map_err(CheckRenewedError::Key)?;
    if !key_matches(leaf, &key) {
        return Err(CheckRenewedError::OtherKey);
    }
    if !(info.not_before..info.not_after).contains(&now_unix) {
        return Err(CheckRenewedError::NotValidNow {
            not_before: info.not_before,
            not_after: info.not_after,
            now: now_unix,
        });
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(ca_cert)? {
        roots.add(c)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()?;
    let now = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(now_unix).unwrap_or(0),
    ));
    verifier
        .verify_client_cert(leaf, &chain[1..], now)
        .map_err(CheckRenewedError::NotChained)?;
    Ok(info)
}

/// Replaces the site's certificate and key with renewed ones, crash-safely: both are written
/// next to their targets (`*.next`, the key with mode 0600) and synced, then the key and the
/// certificate are renamed into place. A crash between the two renames leaves the new key and
/// `cert.next`; `client_config` finishes the move at the next load.
pub fn install_renewed(
    cert: &Path,
    key: &Path,
    chain_pem: &str,
    key_pem: &str,
) -> Result<(), std::io::Error> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let next_cert = with_suffix(cert, NEXT_SUFFIX);
    let next_key = with_suffix(key, NEXT_SUFFIX);
    for (path, body, mode) in [(&next_key, key_pem, 0o600), (&next_cert, chain_pem, 0o644)] {
        let _ = std::fs::remove_file(path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        f.write_all(body.as_bytes())?;
        f.sync_all()?;
    }
    sync_dir(key);
    std::fs::rename(&next_key, key)?;
    sync_dir(key);
    std::fs::rename(&next_cert, cert)?;
    sync_dir(cert);
    Ok(())
}

/// Wraps a rustls client configuration for quinn.
pub fn quic_client_crypto(
    cfg: rustls::ClientConfig,
) -> Result<quinn::crypto::rustls::QuicClientConfig, TlsError> {
    quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
        .map_err(|e| TlsError::Quic(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Pki;

    fn now() -> i64 {
        crate::store::now_ms() / 1000
    }

    /// plant-1's CA, certificate and key files in `dir`.
    fn site_files(pki: &Pki, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        pki.write_site_files(dir, "plant-1");
        (
            dir.join("ca.pem"),
            dir.join("plant-1.pem"),
            dir.join("plant-1.key"),
        )
    }

    /// Goal: a renewed certificate is checked (site, key, CA, dates) before it replaces the old
    /// one, and then loads as the client identity.
    #[test]
    fn a_renewed_certificate_is_checked_then_installed() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let (ca, cert, key) = site_files(&pki, dir.path());
        let old_key = std::fs::read(&key).unwrap();
        let req = new_renewal_request("plant-1").unwrap();
        // Wrong site, wrong key, another CA, not valid now: each refused, nothing written.
        let other_site = pki.sign_request("plant-2", &req.csr_der, 30);
        let e = check_renewed(&ca, "plant-1", &req, &other_site, now())
            .unwrap_err()
            .to_string();
        assert!(e.contains("plant-2"), "{e}");
        let other_req = new_renewal_request("plant-1").unwrap();
        let other_key = pki.sign_request("plant-1", &other_req.csr_der, 30);
        let e = check_renewed(&ca, "plant-1", &req, &other_key, now())
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not certify the key"), "{e}");
        let foreign = Pki::new().sign_request("plant-1", &req.csr_der, 30);
        let e = check_renewed(&ca, "plant-1", &req, &foreign, now())
            .unwrap_err()
            .to_string();
        assert!(e.contains("fleet CA"), "{e}");
        let good = pki.sign_request("plant-1", &req.csr_der, 30);
        let e = check_renewed(&ca, "plant-1", &req, &good, now() + 40 * 86_400)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid now"), "{e}");
        assert_eq!(std::fs::read(&key).unwrap(), old_key);

        let info = check_renewed(&ca, "plant-1", &req, &good, now()).unwrap();
        assert_eq!(info.site, "plant-1");
        assert!((29..=30).contains(&((info.not_after - now()) / 86_400)));
        install_renewed(&cert, &key, &good, &req.key_pem).unwrap();
        assert_eq!(std::fs::read_to_string(&key).unwrap(), req.key_pem);
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(cert_info(&cert).unwrap(), info);
        client_config(&ca, &cert, &key, outpost_protocol::PROTOCOL_VERSION).unwrap();
        assert!(!with_suffix(&cert, NEXT_SUFFIX).exists());
        assert!(!with_suffix(&key, NEXT_SUFFIX).exists());
    }

    /// Goal: a crash between moving the new key and the new certificate into place is finished
    /// at the next load instead of leaving a key that does not match the certificate.
    #[test]
    fn an_interrupted_install_is_finished_at_the_next_load() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let (ca, cert, key) = site_files(&pki, dir.path());
        let req = new_renewal_request("plant-1").unwrap();
        let good = pki.sign_request("plant-1", &req.csr_der, 30);
        // The state right after the key's rename: new key in place, certificate still beside it.
        std::fs::write(&key, &req.key_pem).unwrap();
        std::fs::write(with_suffix(&cert, NEXT_SUFFIX), &good).unwrap();
        client_config(&ca, &cert, &key, outpost_protocol::PROTOCOL_VERSION).unwrap();
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), good);
        assert!(!with_suffix(&cert, NEXT_SUFFIX).exists());
        // A stray `.next` certificate for another key is left alone.
        let stray = pki.sign_request(
            "plant-1",
            &new_renewal_request("plant-1").unwrap().csr_der,
            30,
        );
        std::fs::write(with_suffix(&cert, NEXT_SUFFIX), &stray).unwrap();
        client_config(&ca, &cert, &key, outpost_protocol::PROTOCOL_VERSION).unwrap();
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), good);
    }

    use std::os::unix::fs::PermissionsExt as _;
}
