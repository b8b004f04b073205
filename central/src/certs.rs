//! Fleet PKI for development and small deployments (rcgen): the fleet CA, central's server
//! certificate and one client certificate per site carrying its identity as a URI SAN; plus PEM
//! loading for the TLS setup. Reads and writes files; no sockets.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use outpost_protocol::identity::{SiteIdError, site_uri, validate_site_id};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Central's TLS name used by `dev init` and expected by agents (`sync.central_name`).
pub const DEFAULT_CENTRAL_NAME: &str = "central.outpost.local";
/// Fleet CA lifetime: long, because replacing the trust root touches every site.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Leaf certificate lifetime: a year, renewed well before expiry.
pub const LEAF_VALIDITY_DAYS: i64 = 365;
/// Every certificate is valid from this many days in the past: site clocks drift during long
/// outages, and a certificate that is "not yet valid" would cut a site off.
pub const BACKDATE_DAYS: i64 = 1;
/// Serial number length: 16 random bytes (RFC 5280 allows up to 20).
const SERIAL_BYTES: usize = 16;

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} already exists (use --force to overwrite)")]
    Exists(PathBuf),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: not a usable PEM file: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error(transparent)]
    SiteId(#[from] SiteIdError),
}

/// Where a certificate and its key were written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `contents` with `mode`; refuses to overwrite unless `force`.
fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> Result<(), CertError> {
    if !force && path.exists() {
        return Err(CertError::Exists(path.to_path_buf()));
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    // `mode` only applies on creation; an overwritten file keeps its old bits otherwise.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_err(path))?;
    f.write_all(contents.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(())
}

fn write_pair(
    out_dir: &Path,
    stem: &str,
    cert_pem: &str,
    key: &KeyPair,
    force: bool,
) -> Result<IssuedFiles, CertError> {
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let files = IssuedFiles {
        cert: out_dir.join(format!("{stem}.pem")),
        key: out_dir.join(format!("{stem}.key")),
    };
    if !force {
        for p in [&files.cert, &files.key] {
            if p.exists() {
                return Err(CertError::Exists(p.clone()));
            }
        }
    }
    write_file(&files.key, &key.serialize_pem(), 0o600, force)?;
    write_file(&files.cert, cert_pem, 0o644, force)?;
    Ok(files)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; SERIAL_BYTES] = rand::random();
    // Keep the DER INTEGER positive and of full length.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn base_params(common_name: &str, validity_days: i64) -> Result<CertificateParams, CertError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "Outpost");
    p.distinguished_name.push(DnType::CommonName, common_name);
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(BACKDATE_DAYS);
    p.not_after = now + time::Duration::days(validity_days);
    p.serial_number = Some(random_serial());
    Ok(p)
}

/// Creates the fleet CA: `out_dir/ca.pem` and `out_dir/ca.key` (mode 0600).
pub fn create_ca(out_dir: &Path, force: bool) -> Result<IssuedFiles, CertError> {
    // A distinct name per CA keeps issuers apart when an old and a new CA are trusted together
    // during a rotation (verifiers look issuers up by name).
    let tag: [u8; 4] = rand::random();
    let tag = outpost_protocol::secret::to_hex(&tag);
    let mut p = base_params(&format!("Outpost fleet CA {tag}"), CA_VALIDITY_DAYS)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    write_pair(out_dir, "ca", &cert.pem(), &key, force)
}

fn read_to_string(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

/// Loads the fleet CA from `ca_dir/ca.pem` + `ca_dir/ca.key` for signing.
pub fn load_issuer(ca_dir: &Path) -> Result<Issuer<'static, KeyPair>, CertError> {
    let cert_path = ca_dir.join(CA_CERT_FILE);
    let key_path = ca_dir.join(CA_KEY_FILE);
    let key = KeyPair::from_pem(&read_to_string(&key_path)?).map_err(|e| CertError::Pem {
        path: key_path.clone(),
        detail: e.to_string(),
    })?;
    Issuer::from_ca_cert_pem(&read_to_string(&cert_path)?, key).map_err(|e| CertError::Pem {
        path: cert_path,
        detail: e.to_string(),
    })
}

/// Issues central's server certificate `out_dir/central.{pem,key}` for `name` (plus `localhost`
/// and 127.0.0.1, so that local tools can connect too).
pub fn issue_central(
    ca_dir: &Path,
    out_dir: &Path,
    name: &str,
    force: bool,
) -> Result<IssuedFiles, CertError> {
    let issuer = load_issuer(ca_dir)?;
    let mut p = base_params(name, LEAF_VALIDITY_DAYS)?;
    p.subject_alt_names = vec![
        SanType::DnsName(name.try_into()?),
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])),
    ];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    write_pair(out_dir, "central", &cert.pem(), &key, force)
}

/// Issues the client certificate of site `site`: `out_dir/<site>.{pem,key}`, URI SAN
/// `urn:outpost:site:<site>`, extended key usage clientAuth.
pub fn issue_site(
    ca_dir: &Path,
    site: &str,
    out_dir: &Path,
    force: bool,
) -> Result<IssuedFiles, CertError> {
    let issued = issue_site_in_memory(ca_dir, site, LEAF_VALIDITY_DAYS)?;
    write_pair(out_dir, site, &issued.cert_pem, &issued.key, force)
}

/// A site certificate and its key, not yet written anywhere, with the validity it was given.
pub struct IssuedSite {
    pub cert_pem: String,
    pub key: KeyPair,
    pub not_before: time::OffsetDateTime,
    pub not_after: time::OffsetDateTime,
}

/// Issues the client certificate of site `site` (URI SAN `urn:outpost:site:<site>`, extended
/// key usage clientAuth), valid from `BACKDATE_DAYS` ago until `validity_days` from now, and
/// returns it with its key instead of writing files (`sites add` puts both in a bundle).
pub fn issue_site_in_memory(
    ca_dir: &Path,
    site: &str,
    validity_days: i64,
) -> Result<IssuedSite, CertError> {
    let p = site_params(site, validity_days)?;
    let issuer = load_issuer(ca_dir)?;
    let (not_before, not_after) = (p.not_before, p.not_after);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    Ok(IssuedSite {
        cert_pem: cert.pem(),
        key,
        not_before,
        not_after,
    })
}

/// What a site certificate says, whoever made its key: the site id as the URI SAN
/// `urn:outpost:site:<site>` (the only identity central trusts), clientAuth, valid from
/// `BACKDATE_DAYS` ago for `validity_days`. Used when issuing and when renewing.
pub fn site_params(site: &str, validity_days: i64) -> Result<CertificateParams, CertError> {
    validate_site_id(site)?;
    let mut p = base_params(&format!("outpost site {site}"), validity_days)?;
    p.subject_alt_names = vec![SanType::URI(site_uri(site).try_into()?)];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// Every certificate in a PEM file, in order (leaf first for a chain).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem_err = |detail: String| CertError::Pem {
        path: path.to_path_buf(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| CertError::Pem {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::identity::site_id_from_cert_der;
    use rustls::RootCertStore;
    use rustls::pki_types::UnixTime;
    use rustls::server::WebPkiClientVerifier;
    use rustls::server::danger::ClientCertVerifier;
    use std::sync::Arc;

    fn verifier(ca_dir: &Path) -> Arc<dyn ClientCertVerifier> {
        let mut roots = RootCertStore::empty();
        for c in load_certs(&ca_dir.join(CA_CERT_FILE)).unwrap() {
            roots.add(c).unwrap();
        }
        WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap()
    }

    #[test]
    fn site_cert_carries_its_site_id_and_verifies_against_the_fleet_ca() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path(), false).unwrap();
        let files = issue_site(dir.path(), "plant-1", dir.path(), false).unwrap();
        let key_mode = std::fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(key_mode, 0o600);
        let ca_key_mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(ca_key_mode, 0o600);
        let certs = load_certs(&files.cert).unwrap();
        assert_eq!(site_id_from_cert_der(&certs[0]).unwrap(), "plant-1");
        load_key(&files.key).unwrap();
        verifier(dir.path())
            .verify_client_cert(&certs[0], &[], UnixTime::now())
            .expect("a fleet site cert verifies");
        // Refuses to overwrite without force, overwrites with it.
        assert!(matches!(
            issue_site(dir.path(), "plant-1", dir.path(), false),
            Err(CertError::Exists(_))
        ));
        issue_site(dir.path(), "plant-1", dir.path(), true).unwrap();
        assert!(issue_site(dir.path(), "Bad_Site", dir.path(), false).is_err());
    }

    #[test]
    fn a_cert_from_another_ca_fails_verification_against_the_fleet_ca() {
        let fleet = tempfile::tempdir().unwrap();
        let rogue = tempfile::tempdir().unwrap();
        create_ca(fleet.path(), false).unwrap();
        create_ca(rogue.path(), false).unwrap();
        let files = issue_site(rogue.path(), "plant-1", rogue.path(), false).unwrap();
        let cert = load_certs(&files.cert).unwrap().remove(0);
        // Same claimed identity, wrong issuer.
        assert_eq!(site_id_from_cert_der(&cert).unwrap(), "plant-1");
        let err = verifier(fleet.path())
            .verify_client_cert(&cert, &[], UnixTime::now())
            .expect_err("a cert from another CA must not verify");
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "{err:?}"
        );
    }

    #[test]
    fn central_cert_is_not_a_site() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path(), false).unwrap();
        let files = issue_central(dir.path(), dir.path(), DEFAULT_CENTRAL_NAME, false).unwrap();
        let cert = load_certs(&files.cert).unwrap().remove(0);
        assert!(site_id_from_cert_der(&cert).is_err());
    }
}
