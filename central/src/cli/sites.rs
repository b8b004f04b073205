//! `outpost-central sites add`: issues a site's certificate and key with the fleet CA and writes
//! them, with the CA certificate and where central is, into one enrolment bundle file that
//! `outpost-agent enroll` installs at the site. Files only (reads the CA, writes the bundle); no
//! sockets.
//!
//! The bundle is TOML so that an operator can read what it holds (everything but the key is
//! public). Its reader is `outpost-agent`'s `enroll` module; the two crates do not depend on each
//! other, so the format is written down twice, versioned by `format_version`, and
//! tests/tests/enroll.rs checks that one reads what the other writes.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use outpost_protocol::identity::{SiteIdError, validate_site_id};

use outpost_central::certs::{self, CA_VALIDITY_DAYS, CertError};

/// Version of the bundle format written here (`format_version`); `outpost-agent enroll` refuses
/// any other.
pub const BUNDLE_FORMAT_VERSION: u32 = 1;
/// Longest accepted `--days`: a site certificate outliving the fleet CA that signed it would be
/// refused before it expires anyway.
pub const MAX_SITE_CERT_DAYS: i64 = CA_VALIDITY_DAYS;
/// Mode of the bundle file: it holds the site's private key, so owner-only from its creation.
pub const BUNDLE_MODE: u32 = 0o600;

/// What `sites add` is asked to do.
#[derive(Debug, Clone)]
pub struct AddSiteOptions {
    pub site: String,
    pub ca_dir: PathBuf,
    /// Central's QUIC address as the site will reach it, `host:port`.
    pub central_addr: String,
    /// The name in central's certificate (`sync.central_name` at the site).
    pub central_name: String,
    /// Validity of the site certificate, from now.
    pub days: i64,
    pub out: PathBuf,
    pub force: bool,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct AddedSite {
    pub site: String,
    pub out: PathBuf,
    pub central_addr: String,
    pub central_name: String,
    pub issued_at: String,
    pub not_before: String,
    pub not_after: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AddSiteError {
    #[error(transparent)]
    SiteId(#[from] SiteIdError),
    #[error("--days must be 1..={MAX_SITE_CERT_DAYS}, got {0}")]
    Days(i64),
    #[error("--central-addr {0}")]
    CentralAddr(#[from] outpost_protocol::identity::CentralAddrsError),
    #[error("--central-name must be a DNS name or an IP address, got {0:?}")]
    CentralName(String),
    #[error("{0} already exists (use --force to replace it)")]
    Exists(PathBuf),
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A TOML basic string (quoted and escaped).
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A PEM block as a TOML multi-line literal string: kept verbatim, readable, no escaping. PEM
/// text never holds `'''`.
fn toml_pem(pem: &str) -> String {
    debug_assert!(!pem.contains("'''"), "PEM text holds no triple quote");
    format!("'''\n{}'''", pem.trim_end().to_string() + "\n")
}

/// The bundle's text. Field names and meanings are `outpost-agent`'s `enroll::Bundle`.
fn render(a: &AddedSite, ca_pem: &str, cert_pem: &str, key_pem: &str) -> String {
    format!(
        "# Outpost site enrolment bundle, written by `outpost-central sites add`.\n\
         # It holds the site's PRIVATE KEY: copy it to the site over a trusted channel, run\n\
         #     outpost-agent enroll {file}\n\
         # there, then delete it.\n\
         format_version = {version}\n\
         site_id = {site}\n\
         # Where the agent finds central (sync.central_addr) and the name in central's\n\
         # certificate (sync.central_name).\n\
         central_addr = {addr}\n\
         central_name = {name}\n\
         issued_at = {issued}\n\
         not_before = {not_before}\n\
         not_after = {not_after}\n\n\
         # The fleet CA: central's certificate must chain to it.\n\
         ca_cert = {ca}\n\n\
         # The site's certificate (its site id is the URI name urn:outpost:site:<id>).\n\
         cert = {cert}\n\n\
         key = {key}\n",
        file = a
            .out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "BUNDLE".into()),
        version = BUNDLE_FORMAT_VERSION,
        site = toml_str(&a.site),
        addr = toml_str(&a.central_addr),
        name = toml_str(&a.central_name),
        issued = toml_str(&a.issued_at),
        not_before = toml_str(&a.not_before),
        not_after = toml_str(&a.not_after),
        ca = toml_pem(ca_pem),
        cert = toml_pem(cert_pem),
        key = toml_pem(key_pem),
    )
}

/// Writes `contents` to `path` with mode `BUNDLE_MODE` from the first byte: a temporary file in
/// the same directory is created with that mode, written and fsynced, then linked into place
/// (which fails if `path` exists: no overwrite without `force`) or, with `force`, renamed over
/// it; then the directory is fsynced. The file is never visible with other permissions or half
/// written.
fn write_private(path: &Path, contents: &str, force: bool) -> Result<(), AddSiteError> {
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| AddSiteError::Write { path: p, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| AddSiteError::Write {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
        })?
        .to_string_lossy()
        .into_owned();
    let tag: [u8; 6] = rand::random();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}",
        outpost_protocol::secret::to_hex(&tag)
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(BUNDLE_MODE)
            .open(&tmp)
            .map_err(err(&tmp))?;
        // The umask can only remove bits from `mode`; make the mode exact all the same.
        f.set_permissions(std::fs::Permissions::from_mode(BUNDLE_MODE))
            .map_err(err(&tmp))?;
        f.write_all(contents.as_bytes()).map_err(err(&tmp))?;
        f.sync_all().map_err(err(&tmp))?;
        drop(f);
        if force {
            std::fs::rename(&tmp, path).map_err(err(path))?;
        } else {
            match std::fs::hard_link(&tmp, path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(AddSiteError::Exists(path.to_path_buf()));
                }
                Err(e) => return Err(err(path)(e)),
            }
            std::fs::remove_file(&tmp).map_err(err(&tmp))?;
        }
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(err(&dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Issues `opts.site`'s certificate and key with the fleet CA in `opts.ca_dir` and writes the
/// bundle to `opts.out` (mode 0600; refused if it exists, unless `opts.force`). Everything is
/// checked before the certificate is issued.
pub fn add(opts: &AddSiteOptions) -> Result<AddedSite, AddSiteError> {
    validate_site_id(&opts.site)?;
    if !(1..=MAX_SITE_CERT_DAYS).contains(&opts.days) {
        return Err(AddSiteError::Days(opts.days));
    }
    outpost_protocol::identity::parse_central_addrs(&opts.central_addr)?;
    if rustls::pki_types::ServerName::try_from(opts.central_name.as_str()).is_err() {
        return Err(AddSiteError::CentralName(opts.central_name.clone()));
    }
    if !opts.force && opts.out.exists() {
        return Err(AddSiteError::Exists(opts.out.clone()));
    }
    let ca_path = opts.ca_dir.join(certs::CA_CERT_FILE);
    let ca_pem = std::fs::read_to_string(&ca_path).map_err(|source| CertError::Io {
        path: ca_path.clone(),
        source,
    })?;
    let issued_at = SystemTime::now();
    let issued = certs::issue_site_in_memory(&opts.ca_dir, &opts.site, opts.days)?;
    let added = AddedSite {
        site: opts.site.clone(),
        out: opts.out.clone(),
        central_addr: opts.central_addr.clone(),
        central_name: opts.central_name.clone(),
        issued_at: rfc3339(issued_at),
        not_before: rfc3339(issued.not_before.into()),
        not_after: rfc3339(issued.not_after.into()),
    };
    let text = render(
        &added,
        &ca_pem,
        &issued.cert_pem,
        &issued.key.serialize_pem(),
    );
    write_private(&opts.out, &text, opts.force)?;
    Ok(added)
}

/// What `sites add` prints: what was written and what to do at the site.
pub fn summary(a: &AddedSite) -> String {
    let file = a
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| a.out.display().to_string());
    format!(
        "wrote {out} (mode 0600): enrolment bundle for site {site}\n\
         \x20 certificate  valid {not_before} .. {not_after}\n\
         \x20 central      {addr} (name {name})\n\
         \x20 it holds the site's private key: copy it to the site over a trusted channel\n\
         next, at the site (as root):\n\
         \x20 outpost-agent enroll {file}    # installs the certificate, writes or updates /etc/outpost/agent.toml\n\
         \x20 systemctl restart outpost-agent\n\
         then delete {file}\n",
        out = a.out.display(),
        site = a.site,
        not_before = a.not_before,
        not_after = a.not_after,
        addr = a.central_addr,
        name = a.central_name,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> AddSiteOptions {
        AddSiteOptions {
            site: "plant-9".into(),
            ca_dir: dir.to_path_buf(),
            central_addr: "central.example.net:7601".into(),
            central_name: "central.example.net".into(),
            days: 30,
            out: dir.join("plant-9.bundle"),
            force: false,
        }
    }

    /// Goal: the bundle is owner-only, parses as TOML with every field, holds a certificate for
    /// the site, and is not overwritten without --force. Method: a CA in a temp dir, `add`
    /// twice, then with force.
    #[test]
    fn writes_an_owner_only_bundle_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        certs::create_ca(dir.path(), false).unwrap();
        let o = AddSiteOptions {
            central_addr: "central.example.net:7601,10.99.0.5:7601".into(),
            ..opts(dir.path())
        };
        let added = add(&o).unwrap();
        let mode = std::fs::metadata(&o.out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let t: toml::Table = std::fs::read_to_string(&o.out).unwrap().parse().unwrap();
        assert_eq!(t["format_version"].as_integer(), Some(1));
        assert_eq!(t["site_id"].as_str(), Some("plant-9"));
        assert_eq!(t["not_after"].as_str(), Some(added.not_after.as_str()));
        assert_eq!(t["central_addr"].as_str(), Some(o.central_addr.as_str()));
        for k in [
            "central_addr",
            "central_name",
            "issued_at",
            "not_before",
            "ca_cert",
            "cert",
            "key",
        ] {
            assert!(t.contains_key(k), "{k}");
        }
        let cert = rustls::pki_types::CertificateDer::from_pem_slice(
            t["cert"].as_str().unwrap().as_bytes(),
        )
        .unwrap();
        assert_eq!(
            outpost_protocol::identity::site_id_from_cert_der(&cert).unwrap(),
            "plant-9"
        );
        let before = std::fs::read(&o.out).unwrap();
        assert!(matches!(add(&o), Err(AddSiteError::Exists(_))));
        assert_eq!(std::fs::read(&o.out).unwrap(), before, "left as it was");
        add(&AddSiteOptions {
            force: true,
            ..o.clone()
        })
        .unwrap();
        assert_ne!(
            std::fs::read(&o.out).unwrap(),
            before,
            "replaced with --force"
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn refuses_bad_arguments_before_issuing() {
        let dir = tempfile::tempdir().unwrap();
        certs::create_ca(dir.path(), false).unwrap();
        let o = opts(dir.path());
        for (bad, what) in [
            (
                AddSiteOptions {
                    site: "Plant_9".into(),
                    ..o.clone()
                },
                "site id",
            ),
            (
                AddSiteOptions {
                    days: 0,
                    ..o.clone()
                },
                "--days",
            ),
            (
                AddSiteOptions {
                    central_addr: "central".into(),
                    ..o.clone()
                },
                "--central-addr",
            ),
            (
                AddSiteOptions {
                    central_addr: "a.example:7601,a.example:7601".into(),
                    ..o.clone()
                },
                "twice",
            ),
            (
                AddSiteOptions {
                    central_name: "not a name".into(),
                    ..o.clone()
                },
                "--central-name",
            ),
        ] {
            let e = add(&bad).unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
        }
        assert!(!o.out.exists());
    }

    use rustls::pki_types::pem::PemObject;
}
