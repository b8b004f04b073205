//! `outpost-agent enroll BUNDLE`: installs a site's enrolment bundle (written by `outpost-central
//! sites add`). It checks the bundle (`check_bundle`, pure, the clock passed in), writes the CA,
//! the site's certificate and its key into the TLS directory, and writes a complete config or
//! updates `site_id` and `[sync]` of the existing one. Nothing is changed unless the bundle is
//! sound and the resulting config validates as `check-config` would: every file is first written
//! under a temporary name and the config checked against those, then all are renamed into place.
//! I/O shell (files, the store); no sockets.
//!
//! The bundle's format is also written down in `outpost-central`'s `cli::sites` (the two crates do
//! not depend on each other); tests/tests/enroll.rs checks that one reads what the other writes.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_protocol::identity::{self, SiteIdError};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use serde::Deserialize;

use crate::config::{self, Role};
use crate::store::{OpenStoreError, Store};

/// The bundle format this agent reads (`format_version`).
pub const BUNDLE_FORMAT_VERSION: i64 = 1;
/// Largest bundle read: three PEM blocks and a few lines are a few KiB.
pub const MAX_BUNDLE_BYTES: u64 = 256 * 1024;
/// Where the agent's config is unless `--config` says otherwise (the systemd unit's path).
pub const DEFAULT_CONFIG: &str = "/etc/outpost/agent.toml";
/// The data directory written into a new config unless `--data-dir` says otherwise (the unit's
/// `StateDirectory`).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/outpost-agent";
/// The TLS directory's name, next to the config file, unless `--tls-dir` says otherwise.
pub const DEFAULT_TLS_DIR_NAME: &str = "agent";
/// `api.listen` of a new config: loopback only, until the operator opens it to the site's LAN.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:7602";
/// File names in the TLS directory (those of deploy/examples/plant.toml).
pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "site.pem";
pub const KEY_FILE: &str = "site.key";
/// The store's file in the data directory (`Settings::store_path`).
const STORE_FILE: &str = "agent.redb";

/// The key is created owner-only; see `share_with_dir_group` for the one case it is widened.
const KEY_MODE: u32 = 0o600;
const KEY_MODE_GROUP: u32 = 0o640;
const CERT_MODE: u32 = 0o644;
/// A TLS directory that enroll creates is owner-only.
const TLS_DIR_MODE: u32 = 0o700;
/// A new config lists token hashes only, still nothing for other users to read.
const CONFIG_MODE: u32 = 0o640;

/// The bundle as written by `outpost-central sites add`. Not `Debug`: it holds the key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub format_version: i64,
    pub site_id: String,
    pub central_addr: String,
    pub central_name: String,
    /// RFC 3339, informational: the certificate's own dates are what is checked.
    pub issued_at: String,
    #[serde(default)]
    pub not_before: Option<String>,
    pub not_after: String,
    pub ca_cert: String,
    pub cert: String,
    pub key: String,
}

/// Why a bundle is refused. Messages never quote the key.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// (`path` is not in the message: `EnrollError::Bundle` names the file.)
    #[error("cannot read it: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("larger than {MAX_BUNDLE_BYTES} bytes: not a bundle")]
    TooLarge { path: PathBuf },
    #[error("not a valid bundle (truncated or damaged?): {message}{}", .line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Parse {
        line: Option<usize>,
        message: String,
    },
    #[error("no format_version: not an Outpost site bundle")]
    NoVersion,
    #[error(
        "bundle format version {0} is not supported; this agent reads version {BUNDLE_FORMAT_VERSION}"
    )]
    Version(i64),
    #[error("site_id: {0}")]
    SiteId(SiteIdError),
    #[error("{field}: {detail}")]
    Pem { field: &'static str, detail: String },
    #[error("cert: {0}")]
    CertIdentity(SiteIdError),
    #[error("the certificate is for site {cert:?} but the bundle's site_id is {bundle:?}")]
    WrongSite { cert: String, bundle: String },
    #[error("the key does not belong to the certificate (their public keys differ)")]
    KeyMismatch,
    #[error(
        "the certificate EXPIRED at {not_after} (it was valid from {not_before}; now is {now}): issue a new bundle with `outpost-central sites add SITE --force`"
    )]
    Expired {
        not_before: String,
        not_after: String,
        now: String,
    },
    #[error(
        "the certificate is NOT YET VALID: valid from {not_before} until {not_after}, now is {now} (is this machine's clock right?)"
    )]
    NotYetValid {
        not_before: String,
        not_after: String,
        now: String,
    },
    #[error("the certificate was not issued by the bundle's CA: {0}")]
    WrongCa(String),
}

/// A bundle that passed every check.
pub struct CheckedBundle {
    pub site_id: String,
    pub central_addr: String,
    pub central_name: String,
    pub ca_pem: String,
    pub cert_pem: String,
    key_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl fmt::Debug for CheckedBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckedBundle")
            .field("site_id", &self.site_id)
            .field("central_addr", &self.central_addr)
            .field("central_name", &self.central_name)
            .field("not_after", &rfc3339(self.not_after))
            .finish_non_exhaustive()
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Reads a bundle file (bounded) and parses it.
pub fn read_bundle(path: &Path) -> Result<Bundle, BundleError> {
    let read_err = |source| BundleError::Read {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    let text = String::from_utf8(bytes).map_err(|_| BundleError::Parse {
        line: None,
        message: "not UTF-8 text".into(),
    })?;
    parse_bundle(&text)
}

/// Parses a bundle's text. A TOML error is reported by its message and line only: the
/// parser's excerpt of the offending line could be a line of the key.
pub fn parse_bundle(text: &str) -> Result<Bundle, BundleError> {
    let parse_err = |e: toml::de::Error| BundleError::Parse {
        line: e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1),
        message: e.message().trim().to_string(),
    };
    let table: toml::Table = text.parse().map_err(parse_err)?;
    match table.get("format_version").map(toml::Value::as_integer) {
        None => return Err(BundleError::NoVersion),
        Some(Some(BUNDLE_FORMAT_VERSION)) => {}
        Some(Some(n)) => return Err(BundleError::Version(n)),
        Some(None) => {
            return Err(BundleError::Parse {
                line: None,
                message: "format_version must be an integer".into(),
            });
        }
    }
    toml::Value::Table(table).try_into().map_err(parse_err)
}

fn pem_certs(field: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, BundleError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BundleError::Pem {
            field,
            detail: format!("not a PEM certificate: {e}"),
        })?;
    if certs.is_empty() {
        return Err(BundleError::Pem {
            field,
            detail: "holds no certificate".into(),
        });
    }
    Ok(certs)
}

/// The certificate's validity period.
fn validity(der: &[u8]) -> Result<(SystemTime, SystemTime), BundleError> {
    let (not_before, not_after) = crate::tls::cert_validity(der).map_err(|e| BundleError::Pem {
        field: "cert",
        detail: format!("cannot be parsed: {e}"),
    })?;
    let at = |secs: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    Ok((at(not_before), at(not_after)))
}

/// Every check of a bundle, at time `now`: the format, the site id, that the key belongs to the
/// certificate, that the certificate names `site_id`, is valid at `now` and chains to the
/// bundle's CA. The first failure is returned.
pub fn check_bundle(b: &Bundle, now: SystemTime) -> Result<CheckedBundle, BundleError> {
    if b.format_version != BUNDLE_FORMAT_VERSION {
        return Err(BundleError::Version(b.format_version));
    }
    identity::validate_site_id(&b.site_id).map_err(BundleError::SiteId)?;
    let roots = pem_certs("ca_cert", &b.ca_cert)?;
    let chain = pem_certs("cert", &b.cert)?;
    let key = PrivateKeyDer::from_pem_slice(b.key.as_bytes()).map_err(|e| BundleError::Pem {
        field: "key",
        detail: format!("no usable private key: {e}"),
    })?;
    let cert_site =
        identity::site_id_from_cert_der(chain[0].as_ref()).map_err(BundleError::CertIdentity)?;
    if cert_site != b.site_id {
        return Err(BundleError::WrongSite {
            cert: cert_site,
            bundle: b.site_id.clone(),
        });
    }
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| BundleError::Pem {
            field: "key",
            detail: format!("not a usable key: {e}"),
        })?;
    rustls::sign::CertifiedKey::new(chain.clone(), signing)
        .keys_match()
        .map_err(|_| BundleError::KeyMismatch)?;
    let (not_before, not_after) = validity(chain[0].as_ref())?;
    let dates = || (rfc3339(not_before), rfc3339(not_after), rfc3339(now));
    if now > not_after {
        let (not_before, not_after, now) = dates();
        return Err(BundleError::Expired {
            not_before,
            not_after,
            now,
        });
    }
    if now < not_before {
        let (not_before, not_after, now) = dates();
        return Err(BundleError::NotYetValid {
            not_before,
            not_after,
            now,
        });
    }
    let mut store = rustls::RootCertStore::empty();
    for c in roots {
        store.add(c).map_err(|e| BundleError::Pem {
            field: "ca_cert",
            detail: format!("not a usable CA certificate: {e}"),
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
            .build()
            .map_err(|e| BundleError::WrongCa(e.to_string()))?;
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    verifier
        .verify_client_cert(
            &chain[0],
            &chain[1..],
            UnixTime::since_unix_epoch(since_epoch),
        )
        .map_err(|e| BundleError::WrongCa(e.to_string()))?;
    Ok(CheckedBundle {
        site_id: b.site_id.clone(),
        central_addr: b.central_addr.clone(),
        central_name: b.central_name.clone(),
        ca_pem: b.ca_cert.clone(),
        cert_pem: b.cert.clone(),
        key_pem: b.key.clone(),
        not_before,
        not_after,
    })
}

/// What `enroll` is asked to do.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    pub bundle: PathBuf,
    pub config: PathBuf,
    /// Default: `DEFAULT_TLS_DIR_NAME` next to the config file.
    pub tls_dir: Option<PathBuf>,
    /// Used only when the config does not exist yet.
    pub data_dir: PathBuf,
    pub force: bool,
}

/// Why enrolment was refused or failed. Apart from `Incomplete`, nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{path}: {source}")]
    Bundle { path: PathBuf, source: BundleError },
    #[error("cannot read the config {path}: {detail}")]
    Config { path: PathBuf, detail: String },
    #[error(
        "the config {path} is for site {configured:?}, the bundle for site {bundle:?}: to turn this \
         machine into {bundle:?} run again with --force"
    )]
    OtherSite {
        path: PathBuf,
        configured: String,
        bundle: String,
    },
    #[error(
        "the data directory {data_dir} holds the store of site {store:?} (the site of the events in \
         its outbox), the bundle is for site {bundle:?}: give this site another data directory, or \
         run again with --force"
    )]
    OtherSiteStore {
        data_dir: PathBuf,
        store: String,
        bundle: String,
    },
    #[error("cannot check the store in {data_dir}: {detail}")]
    Store { data_dir: PathBuf, detail: String },
    #[error("the resulting config would not be valid:\n{}", .problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { problems: Vec<String> },
    /// Before anything was renamed into place (the temporary files are removed).
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config in place does not load although its staged copy did (a file changed under
    /// enroll's feet).
    #[error("the config in place is not valid:\n{}", .problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    InvalidInPlace { problems: Vec<String> },
    /// While renaming the files into place: some are new, some old.
    #[error("cannot put {path} in place: {source}")]
    Incomplete {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl EnrollError {
    /// Whether the files were left as they were: every refusal and every failure before the
    /// first rename (at most an empty TLS directory was created).
    pub fn changed_nothing(&self) -> bool {
        !matches!(
            self,
            EnrollError::Incomplete { .. } | EnrollError::InvalidInPlace { .. }
        )
    }
}

/// What the data directory's store says about whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSite {
    /// No store yet.
    Absent,
    /// A store whose outbox holds no event: nothing in it names a site.
    Unattributed,
    /// A store whose outbox holds events of this site.
    Site(String),
    /// The store is open (an agent runs on it): not checked; the config's `site_id` was.
    InUse,
}

/// What was done.
#[derive(Debug)]
pub struct Enrolled {
    pub site_id: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub central_addr: String,
    pub central_name: String,
    pub tls_dir: PathBuf,
    pub created_tls_dir: bool,
    pub files: [PathBuf; 3],
    pub key_mode: u32,
    pub config: PathBuf,
    /// `None`: a new config was written; `Some(previous site_id)`: the existing one was updated.
    pub updated_from: Option<Option<String>>,
    pub data_dir: PathBuf,
    pub store: StoreSite,
    /// New API clients (role, plain token), for a new config only. Shown once.
    pub tokens: Vec<(Role, String)>,
}

/// Reads which site a store belongs to. The store records no site id of its own; every event
/// in its outbox carries the site it was recorded for, so the oldest one held tells.
fn store_site(data_dir: &Path, site_hint: &str) -> Result<StoreSite, EnrollError> {
    let path = data_dir.join(STORE_FILE);
    if !path.exists() {
        return Ok(StoreSite::Absent);
    }
    let store_err = |detail: String| EnrollError::Store {
        data_dir: data_dir.to_path_buf(),
        detail,
    };
    // `site_hint` only names events this process would write; it writes none.
    let (store, writer) = match Store::open(&path, site_hint) {
        Ok(s) => s,
        Err(OpenStoreError::AlreadyOpen { .. }) => return Ok(StoreSite::InUse),
        Err(e) => return Err(store_err(e.to_string())),
    };
    let found = (|| {
        let m = store.marks()?;
        if m.retained_from_seq > m.last_seq {
            return Ok(StoreSite::Unattributed);
        }
        let first = store.outbox_range(m.retained_from_seq..=m.retained_from_seq)?;
        Ok(first
            .first()
            .map_or(StoreSite::Unattributed, |e| StoreSite::Site(e.site.clone())))
    })()
    .map_err(|e: crate::store::ReadError| store_err(e.to_string()));
    drop(store);
    // The writer thread closes the database; wait for it so that the file is free again.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| store_err(e.to_string()))?;
    rt.block_on(writer.shutdown());
    found
}

/// The `[sync]` values enroll sets.
struct SyncKeys<'a> {
    central_addr: &'a str,
    central_name: &'a str,
    ca_cert: &'a Path,
    cert: &'a Path,
    key: &'a Path,
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn path_text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A complete new config: the site, its data directory, one API client per role (their token
/// hashes only) and `[sync]`.
fn new_config(site: &str, data_dir: &Path, clients: &[(Role, String)], sync: &SyncKeys) -> String {
    let mut s = format!(
        "# Written by `outpost-agent enroll` from the bundle of site {site}. Every key not set here\n\
         # has its default (`outpost-agent config-reference`); check with\n\
         #     outpost-agent check-config --config THIS_FILE\n\
         site_id = {site_q}\n\
         data_dir = {data}\n\n\
         [api]\n\
         # Loopback only: open it to the site's LAN (e.g. 0.0.0.0:8080) once the firewall is set.\n\
         listen = {listen}\n\n\
         # One client per role; enroll printed each token once and keeps only its SHA-256.\n\
         # Add or replace clients with `outpost-agent hash-token --generate --name N --role R`.\n",
        site_q = toml_str(site),
        data = toml_str(&path_text(data_dir)),
        listen = toml_str(DEFAULT_API_LISTEN),
    );
    for (role, hash) in clients {
        s.push_str(&format!(
            "[[api.tokens]]\nname = {name}\nrole = {name}\nsha256 = {hash}\n\n",
            name = toml_str(role.as_str()),
            hash = toml_str(hash),
        ));
    }
    s.push_str(&format!(
        "[sync]\n\
         # Written by enroll from the site's bundle; `outpost-agent enroll` replaces them.\n\
         central_addr = {addr}\n\
         central_name = {name}\n\
         ca_cert = {ca}\n\
         cert = {cert}\n\
         key = {key}\n",
        addr = toml_str(sync.central_addr),
        name = toml_str(sync.central_name),
        ca = toml_str(&path_text(sync.ca_cert)),
        cert = toml_str(&path_text(sync.cert)),
        key = toml_str(&path_text(sync.key)),
    ));
    s
}

/// Sets `key` to the string `v` in `t`, keeping the decoration (spacing, trailing comment) of
/// the value it replaces; the key's own comments stay with the key.
fn set_str(t: &mut dyn toml_edit::TableLike, key: &str, v: &str) {
    match t.get_mut(key).and_then(toml_edit::Item::as_value_mut) {
        Some(old) => {
            let decor = old.decor().clone();
            *old = toml_edit::Value::from(v);
            *old.decor_mut() = decor;
        }
        None => {
            t.insert(key, toml_edit::value(v));
        }
    }
}

/// Why an existing config could not be updated for the bundle (`updated_config`).
#[derive(Debug, thiserror::Error)]
enum UpdateConfigError {
    #[error("sync is not a table")]
    SyncNotATable,
}

/// `doc` with `site_id` and the `[sync]` keys set, everything else as it was.
fn updated_config(
    doc: &toml_edit::DocumentMut,
    site: &str,
    sync: &SyncKeys,
) -> Result<String, UpdateConfigError> {
    let mut doc = doc.clone();
    set_str(doc.as_table_mut(), "site_id", site);
    if !doc.contains_key("sync") {
        doc.insert("sync", toml_edit::table());
    }
    let t = doc["sync"]
        .as_table_like_mut()
        .ok_or(UpdateConfigError::SyncNotATable)?;
    set_str(t, "central_addr", sync.central_addr);
    set_str(t, "central_name", sync.central_name);
    set_str(t, "ca_cert", &path_text(sync.ca_cert));
    set_str(t, "cert", &path_text(sync.cert));
    set_str(t, "key", &path_text(sync.key));
    Ok(doc.to_string())
}

/// Files written under temporary names in their final directory, renamed into place by
/// `commit`; any not committed are removed on drop.
#[derive(Default)]
struct Staged {
    /// (temporary, final) paths.
    files: Vec<(PathBuf, PathBuf)>,
}

impl Staged {
    /// Writes `contents` to a new temporary file next to `target` with `mode` from creation,
    /// and fsyncs it. `owner`: (uid, gid) to give it, and the mode to set after that.
    fn write(
        &mut self,
        target: &Path,
        contents: &[u8],
        mode: u32,
        owner: Option<(Option<u32>, Option<u32>, u32)>,
    ) -> Result<PathBuf, EnrollError> {
        let dir = target.parent().expect("absolute target path has a parent");
        let name = target
            .file_name()
            .expect("target path names a file")
            .to_string_lossy();
        let tag: [u8; 6] = rand::random();
        let tmp = dir.join(format!(".{name}.enroll-{}", config::to_hex(&tag)));
        let err = |source| EnrollError::Write {
            path: tmp.clone(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(err)?;
        self.files.push((tmp.clone(), target.to_path_buf()));
        // The umask only removes bits; make the mode exact.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(err)?;
        if let Some((uid, gid, mode_after)) = owner {
            std::os::unix::fs::fchown(&f, uid, gid).map_err(err)?;
            f.set_permissions(std::fs::Permissions::from_mode(mode_after))
                .map_err(err)?;
        }
        f.write_all(contents).map_err(err)?;
        f.sync_all().map_err(err)?;
        Ok(tmp)
    }

    /// Renames every file into place, in order, then fsyncs each directory touched.
    fn commit(mut self) -> Result<(), EnrollError> {
        let files = std::mem::take(&mut self.files);
        let mut dirs: Vec<PathBuf> = Vec::new();
        for (i, (tmp, target)) in files.iter().enumerate() {
            if let Err(source) = std::fs::rename(tmp, target) {
                self.files = files[i..].to_vec();
                return Err(EnrollError::Incomplete {
                    path: target.clone(),
                    source,
                });
            }
            let dir = target.parent().expect("absolute").to_path_buf();
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        for d in dirs {
            std::fs::File::open(&d)
                .and_then(|f| f.sync_all())
                .map_err(|source| EnrollError::Incomplete { path: d, source })?;
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (tmp, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// When enroll runs as root (the file it just created is root's) in a directory that belongs to
/// another group (`root:outpost-agent 0770`, as the package creates `/etc/outpost/agent`), the
/// files get that group so that the agent, which runs as `outpost-agent`, can read them; the key
/// is then 0640 instead of 0600: readable by the agent's group, never by other users. Run as
/// the agent's own user (or in a directory of root's group), the key stays 0600.
fn share_with_dir_group(dir: &Path) -> Result<Option<u32>, EnrollError> {
    let probe_err = |source| EnrollError::Write {
        path: dir.to_path_buf(),
        source,
    };
    let dir_meta = std::fs::metadata(dir).map_err(probe_err)?;
    let me = effective_uid(dir).map_err(probe_err)?;
    Ok((me == 0 && dir_meta.gid() != 0).then_some(dir_meta.gid()))
}

/// This process's effective uid, read from the owner of a file it creates (std has no getuid).
fn effective_uid(dir: &Path) -> std::io::Result<u32> {
    let tag: [u8; 6] = rand::random();
    let probe = dir.join(format!(".enroll-probe-{}", config::to_hex(&tag)));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)?;
    let uid = f.metadata().map(|m| m.uid());
    let _ = std::fs::remove_file(&probe);
    uid
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Installs the bundle `opts.bundle`: see the module's documentation. Refusals leave every file
/// as it was.
pub fn enroll(opts: &EnrollOptions) -> Result<Enrolled, EnrollError> {
    let bundle_err = |source| EnrollError::Bundle {
        path: opts.bundle.clone(),
        source,
    };
    let bundle = read_bundle(&opts.bundle).map_err(bundle_err)?;
    let b = check_bundle(&bundle, SystemTime::now()).map_err(bundle_err)?;
    drop(bundle);

    let config_path = absolute(&opts.config);
    let config_dir = config_path
        .parent()
        .expect("an absolute file path has a parent")
        .to_path_buf();
    let tls_dir = absolute(
        &opts
            .tls_dir
            .clone()
            .unwrap_or_else(|| config_dir.join(DEFAULT_TLS_DIR_NAME)),
    );
    let config_err = |detail: String| EnrollError::Config {
        path: config_path.clone(),
        detail,
    };

    // The existing config, if any: its site and data directory.
    let existing = match std::fs::read_to_string(&config_path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(config_err(e.to_string())),
    };
    let doc = match &existing {
        Some(text) => Some(
            text.parse::<toml_edit::DocumentMut>()
                .map_err(|e| config_err(format!("not valid TOML: {}", e.message().trim())))?,
        ),
        None => None,
    };
    let configured_site = doc
        .as_ref()
        .and_then(|d| d.get("site_id"))
        .and_then(|i| i.as_str())
        .map(str::to_string);
    if let Some(site) = &configured_site
        && !site.is_empty()
        && *site != b.site_id
        && !opts.force
    {
        return Err(EnrollError::OtherSite {
            path: config_path.clone(),
            configured: site.clone(),
            bundle: b.site_id.clone(),
        });
    }
    let data_dir = match doc
        .as_ref()
        .and_then(|d| d.get("data_dir"))
        .and_then(|i| i.as_str())
    {
        Some(d) if !d.is_empty() => config_dir.join(d),
        _ => absolute(&opts.data_dir),
    };
    let store = store_site(&data_dir, &b.site_id)?;
    if let StoreSite::Site(s) = &store
        && *s != b.site_id
        && !opts.force
    {
        return Err(EnrollError::OtherSiteStore {
            data_dir,
            store: s.clone(),
            bundle: b.site_id.clone(),
        });
    }

    // Everything checks: stage the files.
    let created_tls_dir = !tls_dir.exists();
    if created_tls_dir {
        let dir_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| EnrollError::Write { path, source }
        };
        // Missing parents (the config's directory, usually) get the usual mode; only the TLS
        // directory itself is owner-only.
        if let Some(parent) = tls_dir.parent() {
            std::fs::create_dir_all(parent).map_err(dir_err(parent))?;
        }
        std::fs::DirBuilder::new()
            .mode(TLS_DIR_MODE)
            .create(&tls_dir)
            .map_err(dir_err(&tls_dir))?;
    }
    let group = share_with_dir_group(&tls_dir)?;
    let key_mode = if group.is_some() {
        KEY_MODE_GROUP
    } else {
        KEY_MODE
    };
    let files = [
        tls_dir.join(CA_FILE),
        tls_dir.join(CERT_FILE),
        tls_dir.join(KEY_FILE),
    ];
    let mut staged = Staged::default();
    let ca_tmp = staged.write(
        &files[0],
        b.ca_pem.as_bytes(),
        CERT_MODE,
        group.map(|g| (None, Some(g), CERT_MODE)),
    )?;
    let cert_tmp = staged.write(
        &files[1],
        b.cert_pem.as_bytes(),
        CERT_MODE,
        group.map(|g| (None, Some(g), CERT_MODE)),
    )?;
    let key_tmp = staged.write(
        &files[2],
        b.key_pem.as_bytes(),
        KEY_MODE,
        group.map(|g| (None, Some(g), KEY_MODE_GROUP)),
    )?;

    let tokens: Vec<(Role, String)> = if doc.is_none() {
        Role::ALL
            .into_iter()
            .map(|r| (r, config::generate_token()))
            .collect()
    } else {
        Vec::new()
    };
    let hashes: Vec<(Role, String)> = tokens
        .iter()
        .map(|(r, t)| (*r, config::to_hex(&config::hash_token(t.as_bytes()))))
        .collect();
    let render = |ca: &Path, cert: &Path, key: &Path| -> Result<String, EnrollError> {
        let sync = SyncKeys {
            central_addr: &b.central_addr,
            central_name: &b.central_name,
            ca_cert: ca,
            cert,
            key,
        };
        match &doc {
            Some(d) => updated_config(d, &b.site_id, &sync).map_err(|e| config_err(e.to_string())),
            None => Ok(new_config(&b.site_id, &data_dir, &hashes, &sync)),
        }
    };

    // The config as it will be, pointing at the staged files, must validate as check-config
    // would (environment overrides included) before anything is renamed into place.
    std::fs::create_dir_all(&config_dir).map_err(|source| EnrollError::Write {
        path: config_dir.clone(),
        source,
    })?;
    // An existing config keeps its mode and (when root can give it back) its owner; a new one
    // is 0640, with the TLS directory's group when shared with the agent's group.
    let root = effective_uid(&config_dir).map_err(|source| EnrollError::Write {
        path: config_dir.clone(),
        source,
    })? == 0;
    let (config_mode, config_owner) = match std::fs::metadata(&config_path) {
        Ok(m) => {
            let mode = m.mode() & 0o7777;
            (mode, root.then_some((Some(m.uid()), Some(m.gid()), mode)))
        }
        Err(_) => (CONFIG_MODE, group.map(|g| (None, Some(g), CONFIG_MODE))),
    };
    let mut probe = Staged::default();
    let probe_path = probe.write(
        &config_path,
        render(&ca_tmp, &cert_tmp, &key_tmp)?.as_bytes(),
        0o600,
        None,
    )?;
    if let Err(e) = config::load(&probe_path) {
        return Err(EnrollError::Invalid {
            problems: e.problems(),
        });
    }
    drop(probe);
    staged.write(
        &config_path,
        render(&files[0], &files[1], &files[2])?.as_bytes(),
        config_mode,
        config_owner,
    )?;
    staged.commit()?;
    // What `check-config` (and the unit's ExecStartPre) will read: the files in place.
    config::load(&config_path).map_err(|e| EnrollError::InvalidInPlace {
        problems: e.problems(),
    })?;

    Ok(Enrolled {
        site_id: b.site_id.clone(),
        not_before: b.not_before,
        not_after: b.not_after,
        central_addr: b.central_addr.clone(),
        central_name: b.central_name.clone(),
        tls_dir,
        created_tls_dir,
        files,
        key_mode,
        config: config_path,
        updated_from: doc.map(|_| configured_site),
        data_dir,
        store,
        tokens,
    })
}

/// What `enroll` prints: what it did, the new tokens (once), the next step. Never the key.
pub fn report(e: &Enrolled) -> String {
    let mut s = format!(
        "enrolled site {site}: certificate valid {nb} .. {na}, central {addr} (name {name})\n",
        site = e.site_id,
        nb = rfc3339(e.not_before),
        na = rfc3339(e.not_after),
        addr = e.central_addr,
        name = e.central_name,
    );
    s.push_str(&format!(
        "  wrote {}, {} and {} (key mode {:04o}){}\n",
        e.files[0].display(),
        e.files[1].display(),
        e.files[2].display(),
        e.key_mode,
        if e.created_tls_dir {
            format!("; created {} (mode 0700)", e.tls_dir.display())
        } else {
            String::new()
        }
    ));
    match &e.updated_from {
        None => s.push_str(&format!(
            "  wrote {} (new): site_id, data_dir {}, [api] listen {} with one client per role, [sync]\n",
            e.config.display(),
            e.data_dir.display(),
            DEFAULT_API_LISTEN,
        )),
        Some(prev) => {
            s.push_str(&format!(
                "  updated {}: site_id and [sync] central_addr, central_name, ca_cert, cert, key; \
                 every other key and comment kept\n",
                e.config.display()
            ));
            // An empty site id is the packaged config's: filled in without --force.
            if let Some(p) = prev
                && *p != e.site_id
                && !p.is_empty()
            {
                s.push_str(&format!(
                    "  site_id was {p:?} (replaced with --force)\n"
                ));
            }
        }
    }
    let store = match &e.store {
        StoreSite::Absent => "none yet (the agent creates it at start)".to_string(),
        StoreSite::Unattributed => "present, its outbox holds no event".to_string(),
        StoreSite::Site(site) if *site == e.site_id => {
            format!("present, holds site {site}'s outbox, kept as is")
        }
        StoreSite::Site(site) => format!("present, holds site {site}'s outbox (--force)"),
        StoreSite::InUse => "in use by a running agent, not checked".to_string(),
    };
    s.push_str(&format!("  store in {}: {store}\n", e.data_dir.display()));
    if !e.tokens.is_empty() {
        s.push_str(
            "API tokens, shown only now (the config keeps their SHA-256; give each to its clients):\n",
        );
        for (role, token) in &e.tokens {
            s.push_str(&format!("  {:<12} {token}\n", format!("{role}:")));
        }
    }
    s.push_str("config OK\n");
    s.push_str("next: systemctl restart outpost-agent\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_text(site: &str) -> String {
        format!(
            "format_version = 1\nsite_id = {site:?}\ncentral_addr = \"127.0.0.1:7601\"\n\
             central_name = \"central.outpost.local\"\nissued_at = \"x\"\nnot_after = \"y\"\n\
             ca_cert = \"\"\ncert = \"\"\nkey = \"-----BEGIN PRIVATE KEY-----\\nSECRETSECRET\"\n"
        )
    }

    /// Goal: a damaged bundle is refused by line and message, never quoting its text (which
    /// could be the key). Method: cut a bundle inside the key and parse it.
    #[test]
    fn a_truncated_bundle_is_refused_without_quoting_it() {
        let text = bundle_text("plant-9");
        let cut = &text[..text.len() - 8];
        let e = parse_bundle(cut).err().expect("refused").to_string();
        assert!(e.contains("not a valid bundle"), "{e}");
        assert!(!e.contains("SECRET"), "{e}");
        assert!(matches!(
            parse_bundle("site_id = \"x\"\n"),
            Err(BundleError::NoVersion)
        ));
        assert!(matches!(
            parse_bundle(&text.replace("format_version = 1", "format_version = 2")),
            Err(BundleError::Version(2))
        ));
    }

    /// Goal: editing an existing config changes only site_id and [sync]'s five keys, keeping
    /// every comment, other key and trailing comment.
    #[test]
    fn update_keeps_comments_and_other_keys() {
        let before = "# top comment\nsite_id = \"plant-1\"   # the site\ndata_dir = \"/d\"\n\n\
                      [api]\n# clients\nlisten = \"0.0.0.0:8080\"\n\n\
                      [sync]\n# where central is\ncentral_addr = \"old:1\"\nkeep_alive_ms = 500\n";
        let doc: toml_edit::DocumentMut = before.parse().unwrap();
        let sync = SyncKeys {
            central_addr: "new.example:7601",
            central_name: "central.example",
            ca_cert: Path::new("/t/ca.pem"),
            cert: Path::new("/t/site.pem"),
            key: Path::new("/t/site.key"),
        };
        let after = updated_config(&doc, "plant-9", &sync).unwrap();
        for kept in [
            "# top comment",
            "# the site",
            "# clients",
            "# where central is",
            "keep_alive_ms = 500",
            "listen = \"0.0.0.0:8080\"",
            "data_dir = \"/d\"",
        ] {
            assert!(after.contains(kept), "{kept} lost:\n{after}");
        }
        let t: toml::Table = after.parse().unwrap();
        assert_eq!(t["site_id"].as_str(), Some("plant-9"));
        assert_eq!(t["sync"]["central_addr"].as_str(), Some("new.example:7601"));
        assert_eq!(t["sync"]["key"].as_str(), Some("/t/site.key"));
        assert!(!after.contains("old:1"));
    }
}
