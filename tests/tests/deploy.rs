//! The deployment files are real: every example config in `deploy/examples/` passes the real
//! `check-config` binary with real certificates, a broken copy of each fails naming the key, the
//! systemd units carry the hardening and the config check, and the Dockerfile runs as non-root.
//!
//! Method: each example is copied into a temp dir with its absolute paths (`/var/lib/...`,
//! `/etc/outpost/...`) moved under it, the TLS files it names are issued with
//! `outpost-central certs`, and `outpost-agent`/`outpost-central check-config` run on it as child
//! processes. The units and the Dockerfile are read line by line. Nothing here needs systemd,
//! Docker or root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use outpost_tests::{bin, hermetic};

/// The repository root (this crate lives in `tests/`).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    hermetic(cmd).output().expect("run a workspace binary")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Which binary checks a config: agents have a `site_id`, central a `[quic]` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Agent,
    Central,
}

impl Kind {
    fn of(config: &str) -> Kind {
        if config
            .lines()
            .any(|l| l.trim_start().starts_with("site_id"))
        {
            Kind::Agent
        } else {
            assert!(
                config.lines().any(|l| l.trim() == "[quic]"),
                "an example is neither an agent config (site_id) nor central's ([quic])"
            );
            Kind::Central
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Kind::Agent => "outpost-agent",
            Kind::Central => "outpost-central",
        }
    }

    /// Where the packages put this kind's state and TLS files (deploy/README.md).
    fn layout(self) -> (&'static str, &'static str) {
        match self {
            Kind::Agent => ("/var/lib/outpost-agent", "/etc/outpost/agent/"),
            Kind::Central => ("/var/lib/outpost-central", "/etc/outpost/central/"),
        }
    }
}

/// `key = "value"` assignments of a TOML file by key, outside arrays of tables (a simple line
/// reader: the examples keep one assignment per line). Later tables may reuse a key (`listen`), so
/// each key maps to every value it has, in order.
fn assignments(config: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in config.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.split(" #").next().unwrap_or(v).trim();
        if let Some(s) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            out.entry(k.trim().to_string())
                .or_default()
                .push(s.to_string());
        }
    }
    out
}

fn one(map: &BTreeMap<String, Vec<String>>, key: &str, file: &str) -> String {
    match map.get(key).map(Vec::as_slice) {
        Some([v]) => v.clone(),
        other => panic!("{file}: expected one `{key} = \"...\"`, found {other:?}"),
    }
}

/// The fleet CA, issued once per test with the real `certs ca` command.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let out = run(Command::new(bin("outpost-central"))
            .args(["certs", "ca", "--out"])
            .arg(dir.path().join("ca")));
        assert!(out.status.success(), "certs ca: {}", text(&out));
        Pki { dir }
    }

    fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// Issues `certs site` or `certs central` and returns (cert, key).
    fn issue(&self, args: &[&str], stem: &str) -> (PathBuf, PathBuf) {
        let out_dir = self.dir.path().join(format!("issued-{stem}"));
        let out = run(Command::new(bin("outpost-central"))
            .args(["certs"])
            .args(args)
            .arg("--ca-dir")
            .arg(self.ca_dir())
            .arg("--out")
            .arg(&out_dir)
            .arg("--force"));
        assert!(out.status.success(), "certs {args:?}: {}", text(&out));
        (
            out_dir.join(format!("{stem}.pem")),
            out_dir.join(format!("{stem}.key")),
        )
    }
}

/// One example laid out for `check-config`: its paths moved under `root`, its TLS files issued.
struct Staged {
    kind: Kind,
    config: PathBuf,
    text: String,
}

fn stage(example: &Path, pki: &Pki, root: &Path) -> Staged {
    let name = example.file_name().unwrap().to_string_lossy().to_string();
    let original = std::fs::read_to_string(example).unwrap();
    let kind = Kind::of(&original);
    let vars = assignments(&original);

    // The example follows the package layout: state under /var/lib/<package>, TLS files under
    // /etc/outpost/<product>/, and no other absolute path (which the rewrite would miss).
    let (data_dir, tls_dir) = kind.layout();
    assert_eq!(one(&vars, "data_dir", &name), data_dir, "{name}: data_dir");
    for key in ["ca_cert", "cert", "key"] {
        let p = one(&vars, key, &name);
        assert!(
            p.starts_with(tls_dir),
            "{name}: {key} = {p:?} is not under {tls_dir}"
        );
    }
    for values in vars.values() {
        for v in values.iter().filter(|v| v.starts_with('/')) {
            assert!(
                v.starts_with("/var/lib/") || v.starts_with("/etc/outpost/"),
                "{name}: absolute path {v:?} outside /var/lib and /etc/outpost"
            );
        }
    }
    // Token hashes in examples are placeholders, never a real token's hash.
    for h in vars.get("sha256").into_iter().flatten() {
        assert!(
            h.starts_with("00000000000000000000000000000000"),
            "{name}: sha256 {h:?} does not look like a placeholder"
        );
    }

    let root_s = root.to_str().unwrap();
    let text = original
        .replace("\"/var/lib/", &format!("\"{root_s}/var/lib/"))
        .replace("\"/etc/outpost/", &format!("\"{root_s}/etc/outpost/"));
    let moved = assignments(&text);
    let (cert, key) = match kind {
        Kind::Agent => {
            let site = one(&moved, "site_id", &name);
            pki.issue(&["site", "--site", &site], &site)
        }
        Kind::Central => pki.issue(&["central", "--name", "central.example.net"], "central"),
    };
    for (field, from) in [
        ("ca_cert", pki.ca_dir().join("ca.pem")),
        ("cert", cert),
        ("key", key),
    ] {
        let to = PathBuf::from(one(&moved, field, &name));
        assert!(
            to.starts_with(root),
            "{name}: {field} was not moved: {to:?}"
        );
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap();
    }
    // Central's `[renewal] ca_dir` holds the fleet CA (certificate and key).
    if let Some(dir) = moved.get("ca_dir").and_then(|v| v.first()) {
        let to = PathBuf::from(dir);
        assert!(to.starts_with(root), "{name}: ca_dir was not moved: {to:?}");
        std::fs::create_dir_all(&to).unwrap();
        for f in ["ca.pem", "ca.key"] {
            std::fs::copy(pki.ca_dir().join(f), to.join(f)).unwrap();
        }
    }
    let config = root.join(&name);
    std::fs::write(&config, &text).unwrap();
    Staged { kind, config, text }
}

fn check_config(kind: Kind, config: &Path) -> Output {
    run(Command::new(bin(kind.binary()))
        .args(["check-config", "--config"])
        .arg(config))
}

fn examples() -> Vec<PathBuf> {
    let dir = repo().join("deploy/examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Goal: every file in deploy/examples/ is a config the real binaries accept once its files are
/// in place, so an operator can start from any of them; a new example that does not validate
/// fails here. Also: the examples cover both agents and central.
#[test]
fn every_example_config_passes_check_config() {
    let files = examples();
    assert!(
        files.len() >= 3,
        "expected plant, warehouse and central examples"
    );
    let pki = Pki::new();
    let mut kinds = Vec::new();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            name.ends_with(".toml"),
            "{name}: deploy/examples/ holds TOML configs only"
        );
        let root = tempfile::tempdir().unwrap();
        let staged = stage(file, &pki, root.path());
        let out = check_config(staged.kind, &staged.config);
        assert!(out.status.success(), "{name}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("config OK"),
            "{name}: {}",
            text(&out)
        );
        kinds.push(staged.kind);
    }
    assert!(kinds.contains(&Kind::Agent) && kinds.contains(&Kind::Central));
}

/// Goal: check-config (what the units run before every start) refuses a broken copy of each
/// example and names the key: an unknown key, and a bad value (data_dir naming a file).
/// Method: the staged copy is edited; each edit must fail with the key in the output.
#[test]
fn a_broken_example_fails_check_config_naming_the_key() {
    let pki = Pki::new();
    for file in examples() {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let root = tempfile::tempdir().unwrap();
        let staged = stage(&file, &pki, root.path());

        // An unknown key at the top level (before the first table).
        let unknown = root.path().join("unknown.toml");
        std::fs::write(
            &unknown,
            format!("bogus_retention_days = 3\n{}", staged.text),
        )
        .unwrap();
        let out = check_config(staged.kind, &unknown);
        assert!(
            !out.status.success(),
            "{name} + unknown key: {}",
            text(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("bogus_retention_days"),
            "{name}: the unknown key is not named: {}",
            text(&out)
        );

        // A bad value: data_dir is an existing file, not a directory.
        let bad = root.path().join("bad-value.toml");
        let data_dir = one(&assignments(&staged.text), "data_dir", &name);
        let broken = staged.text.replace(
            &format!("data_dir = \"{data_dir}\""),
            &format!("data_dir = \"{}\"", staged.config.display()),
        );
        assert_ne!(broken, staged.text, "{name}: data_dir line not found");
        std::fs::write(&bad, broken).unwrap();
        let out = check_config(staged.kind, &bad);
        assert!(
            !out.status.success(),
            "{name} + bad data_dir: {}",
            text(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("data_dir: "),
            "{name}: data_dir is not named: {}",
            text(&out)
        );
    }
}

/// A unit file as `section -> key -> values` (a key may repeat).
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse_unit(path: &Path) -> Unit {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut unit = Unit::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{}: not key=value: {line}", path.display()));
        assert!(
            !section.is_empty(),
            "{}: {line} before any section",
            path.display()
        );
        unit.entry(section.clone())
            .or_default()
            .entry(k.trim().to_string())
            .or_default()
            .push(v.trim().to_string());
    }
    unit
}

fn value<'a>(unit: &'a Unit, section: &str, key: &str, file: &str) -> &'a str {
    match unit
        .get(section)
        .and_then(|s| s.get(key))
        .map(Vec::as_slice)
    {
        Some([v]) => v,
        other => panic!("{file}: [{section}] {key}= expected once, found {other:?}"),
    }
}

/// Goal: both units run as their own user with their state directory, check the config before
/// every start with the same file they run with, restart on failure with a start limit, stop on
/// SIGTERM with a timeout, and carry the hardening directives; the agent may write its TLS dir.
/// Method: parse the unit files line by line; run each binary's subcommands' `--help` to prove
/// the subcommands the units name exist.
#[test]
fn systemd_units_are_hardened_and_check_the_config_first() {
    for (product, serve, config) in [
        ("agent", "run", "/etc/outpost/agent.toml"),
        ("central", "serve", "/etc/outpost/central.toml"),
    ] {
        let package = format!("outpost-{product}");
        let file = format!("deploy/systemd/{package}.service");
        let unit = parse_unit(&repo().join(&file));
        let v = |section: &str, key: &str| value(&unit, section, key, &file).to_string();

        for key in ["StartLimitIntervalSec", "StartLimitBurst"] {
            let n: u64 = v("Unit", key)
                .parse()
                .unwrap_or_else(|_| panic!("{file}: {key}"));
            assert!(n > 0, "{file}: {key}");
        }
        assert_eq!(v("Service", "User"), package, "{file}");
        assert_eq!(v("Service", "Group"), package, "{file}");
        assert_eq!(v("Service", "StateDirectory"), package, "{file}");

        // ExecStartPre checks exactly the config ExecStart runs with.
        let pre = v("Service", "ExecStartPre");
        let start = v("Service", "ExecStart");
        let bin_path = format!("/usr/bin/{package}");
        assert_eq!(
            pre,
            format!("{bin_path} check-config --config {config}"),
            "{file}"
        );
        assert_eq!(
            start,
            format!("{bin_path} {serve} --config {config}"),
            "{file}"
        );
        let config_of = |cmd: &str| {
            let words: Vec<&str> = cmd.split_whitespace().collect();
            let i = words
                .iter()
                .position(|w| *w == "--config")
                .expect("--config");
            words[i + 1].to_string()
        };
        assert_eq!(config_of(&pre), config_of(&start), "{file}");
        for sub in ["check-config", serve] {
            let out = run(Command::new(bin(&package)).args([sub, "--help"]));
            assert!(out.status.success(), "{package} {sub}: {}", text(&out));
        }

        for (key, want) in [
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("NoNewPrivileges", "yes"),
            ("CapabilityBoundingSet", ""),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
            ("LockPersonality", "yes"),
            ("MemoryDenyWriteExecute", "yes"),
            ("SystemCallFilter", "@system-service"),
            ("Restart", "on-failure"),
            ("RestartSec", "2"),
            ("KillSignal", "SIGTERM"),
        ] {
            assert_eq!(v("Service", key), want, "{file}: {key}");
        }
        let stop: u64 = v("Service", "TimeoutStopSec")
            .parse()
            .unwrap_or_else(|_| panic!("{file}: TimeoutStopSec in seconds"));
        assert!((10..=120).contains(&stop), "{file}: TimeoutStopSec={stop}");
        let nofile: u64 = v("Service", "LimitNOFILE")
            .parse()
            .unwrap_or_else(|_| panic!("{file}: LimitNOFILE"));
        assert_eq!(v("Install", "WantedBy"), "multi-user.target", "{file}");

        let writable = v("Service", "ReadWritePaths");
        if product == "agent" {
            // One descriptor per API connection, at the largest cap check-config accepts.
            assert!(
                nofile > outpost_agent::config::MAX_MAX_CONNECTIONS,
                "{file}: LimitNOFILE={nofile} below api.max_connections' maximum"
            );
            // Certificates are written in place in the agent's TLS directory.
            assert!(
                writable
                    .split_whitespace()
                    .any(|p| p.trim_start_matches('-') == "/etc/outpost/agent"),
                "{file}: ReadWritePaths={writable}"
            );
        } else {
            assert!(nofile >= 4096, "{file}: LimitNOFILE={nofile}");
        }
    }
}

/// Goal: the container image for central is built in two stages, runs as a non-root user, keeps
/// its store on a volume, exposes the ports central's example config listens on and starts
/// `serve` with the packaged config path. Docker is not needed: the Dockerfile is read.
#[test]
fn dockerfile_builds_in_two_stages_and_runs_as_non_root() {
    let file = repo().join("deploy/Dockerfile");
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let with = |kw: &str| -> Vec<&str> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(kw))
            .filter(|rest| rest.starts_with(' '))
            .map(str::trim)
            .collect()
    };
    let froms = with("FROM");
    assert_eq!(froms.len(), 2, "two FROM stages: {froms:?}");
    assert!(froms[0].starts_with("rust:1-bookworm"), "{froms:?}");
    assert_eq!(froms[1], "debian:bookworm-slim", "{froms:?}");
    let users = with("USER");
    let user = users.last().expect("a USER line");
    assert!(
        !["root", "0", "0:0"].contains(user),
        "the runtime user must not be root: {user}"
    );
    assert!(with("VOLUME").contains(&"/var/lib/outpost-central"));

    // EXPOSE matches the listen ports of deploy/examples/central.toml.
    let central = std::fs::read_to_string(repo().join("deploy/examples/central.toml")).unwrap();
    let listens = &assignments(&central)["listen"];
    assert_eq!(listens.len(), 2, "api.listen and quic.listen: {listens:?}");
    let port = |addr: &str| addr.rsplit_once(':').unwrap().1.to_string();
    let exposed: Vec<&str> = with("EXPOSE")
        .iter()
        .flat_map(|l| l.split_whitespace())
        .collect();
    assert!(
        exposed.contains(&format!("{}/tcp", port(&listens[0])).as_str()),
        "HTTP port: {exposed:?}"
    );
    assert!(
        exposed.contains(&format!("{}/udp", port(&listens[1])).as_str()),
        "QUIC port: {exposed:?}"
    );
    let entry = with("ENTRYPOINT");
    assert_eq!(
        entry,
        [r#"["outpost-central", "serve", "--config", "/etc/outpost/central.toml"]"#]
    );

    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    for dir in ["target", "var"] {
        assert!(
            ignore
                .lines()
                .any(|l| l.trim().trim_end_matches('/') == dir),
            ".dockerignore must exclude {dir}/"
        );
    }
}

/// Runs a maintainer script with `args` where every command it may call is a stub that logs its
/// arguments: PATH holds only the stubs, so nothing on this machine is changed. `user_exists`
/// is what the `getent` stub answers. Returns the log, one `command args` line per call.
fn run_maintainer_script(script: &Path, args: &[&str], user_exists: bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    std::fs::write(&log, "").unwrap();
    let stubs = dir.path().join("bin");
    std::fs::create_dir(&stubs).unwrap();
    for name in [
        "getent",
        "adduser",
        "deluser",
        "delgroup",
        "install",
        "deb-systemd-helper",
        "deb-systemd-invoke",
        "systemctl",
    ] {
        let code = if name == "getent" && !user_exists {
            2
        } else {
            0
        };
        let stub = stubs.join(name);
        std::fs::write(
            &stub,
            format!(
                "#!/bin/sh\necho \"{name} $*\" >> '{}'\nexit {code}\n",
                log.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = Command::new("/bin/sh")
        .arg(script)
        .args(args)
        .env_clear()
        .env("PATH", &stubs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        script.display(),
        text(&out)
    );
    std::fs::read_to_string(&log).unwrap()
}

/// Goal: the packages' maintainer scripts (deploy/debian/) create the system user only when it
/// is missing, create the TLS directory (group-writable for the agent) and copy the default
/// config, and remove the user on purge only. Method: run each script with stubs for every
/// command it calls (nothing on this machine changes) and read what it called.
#[test]
fn maintainer_scripts_create_the_user_once_and_remove_it_on_purge_only() {
    for (product, tls_mode) in [("agent", "0770"), ("central", "0750")] {
        let package = format!("outpost-{product}");
        let dir = repo().join("deploy/debian").join(product);
        let postinst = dir.join("postinst");
        let postrm = dir.join("postrm");

        let fresh = run_maintainer_script(&postinst, &["configure"], false);
        assert!(
            fresh.contains(&format!(
                "adduser --system --group --home /var/lib/{package} --no-create-home {package}"
            )),
            "{package}: {fresh}"
        );
        // The script checks the real /etc (normally without Outpost's files on a test machine):
        // what exists there already is left alone, so only what is missing is expected.
        if !Path::new(&format!("/etc/outpost/{product}")).exists() {
            assert!(
                fresh.contains(&format!(
                    "install -d -o root -g {package} -m {tls_mode} /etc/outpost/{product}\n"
                )),
                "{package}: {fresh}"
            );
        }
        if !Path::new(&format!("/etc/outpost/{product}.toml")).exists() {
            assert!(
                fresh.contains(&format!(
                    "install -o root -g {package} -m 0640 /usr/share/{package}/{product}.toml /etc/outpost/{product}.toml"
                )),
                "{package}: {fresh}"
            );
        }
        let again = run_maintainer_script(&postinst, &["configure", "0.1.0-1"], true);
        assert!(
            !again.contains("adduser"),
            "{package}: user created twice: {again}"
        );

        let removed = run_maintainer_script(&postrm, &["remove"], true);
        assert!(!removed.contains("deluser"), "{package}: {removed}");
        let purged = run_maintainer_script(&postrm, &["purge"], true);
        assert!(
            purged.contains(&format!("deluser --system --quiet {package}"))
                && purged.contains(&format!("delgroup --system --quiet {package}")),
            "{package}: {purged}"
        );
    }
}

/// Goal: the agent package's default config is the plant example with `site_id` left empty, so
/// that a fresh install enrols without `--force`: `sites add` + `enroll` into the package layout
/// (config at etc/outpost/agent.toml, TLS files in etc/outpost/agent/) gives a config that
/// check-config accepts; before enrolment check-config names `site_id`.
/// Method: the default config is staged as the postinst would leave it (paths moved under a temp
/// root), then the real binaries run.
#[test]
fn packaged_default_agent_config_enrolls_into_the_package_layout() {
    let default = std::fs::read_to_string(repo().join("deploy/debian/agent/agent.toml")).unwrap();
    let plant = std::fs::read_to_string(repo().join("deploy/examples/plant.toml")).unwrap();
    let site_line = format!(
        "site_id = \"{}\"\n",
        one(&assignments(&plant), "site_id", "plant.toml")
    );
    assert_eq!(
        default,
        plant.replacen(&site_line, "site_id = \"\"\n", 1),
        "deploy/debian/agent/agent.toml must be deploy/examples/plant.toml with site_id = \"\""
    );

    let agent = bin("outpost-agent");
    let pki = Pki::new();
    let root = tempfile::tempdir().unwrap();
    let root_s = root.path().to_str().unwrap();
    let etc = root.path().join("etc/outpost");
    std::fs::create_dir_all(etc.join("agent")).unwrap();
    let config = etc.join("agent.toml");
    std::fs::write(
        &config,
        default
            .replace("\"/var/lib/", &format!("\"{root_s}/var/lib/"))
            .replace("\"/etc/outpost/", &format!("\"{root_s}/etc/outpost/")),
    )
    .unwrap();
    let out = check_config(Kind::Agent, &config);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("site_id: "),
        "{}",
        text(&out)
    );

    let bundle = root.path().join("plant-9.bundle");
    let out = run(Command::new(bin("outpost-central"))
        .args(["sites", "add", "plant-9", "--ca-dir"])
        .arg(pki.ca_dir())
        .args(["--central-addr", "central.example.net:7601"])
        .args(["--central-name", "central.example.net", "--out"])
        .arg(&bundle));
    assert!(out.status.success(), "sites add: {}", text(&out));
    let out = run(Command::new(&agent)
        .arg("enroll")
        .arg(&bundle)
        .arg("--config")
        .arg(&config));
    assert!(out.status.success(), "enroll: {}", text(&out));
    for f in ["ca.pem", "site.pem", "site.key"] {
        assert!(
            etc.join("agent").join(f).is_file(),
            "{f} not in etc/outpost/agent/"
        );
    }
    let out = check_config(Kind::Agent, &config);
    assert!(out.status.success(), "after enroll: {}", text(&out));
    let enrolled = std::fs::read_to_string(&config).unwrap();
    assert_eq!(
        one(&assignments(&enrolled), "site_id", "agent.toml"),
        "plant-9"
    );
}
