//! The operator guide's fresh install on Debian, run as written: the shell block after the
//! `<!-- walkthrough: ... -->` marker in deploy/README.md ("Install on Debian") builds both
//! packages, installs them under a temp root, makes the fleet CA, central's certificate and a
//! site's bundle, enrols the site, sets every API token and checks both configs. Then the units'
//! own `ExecStartPre=` and `ExecStart=` lines, read from the unpacked unit files with their paths
//! moved under that root, start central and the agent, and a milestone goes through.
//!
//! Method: the block runs in `bash -euo pipefail` from the repository root with `ROOT` a temp dir,
//! `PROFILE` the profile of this test run's binaries (no release build), and `PATH` starting at
//! `$ROOT/usr/bin`, so every `outpost-*` command it runs is the unpacked package's. The processes
//! listen on ephemeral loopback ports through the `OUTPOST_*` overrides a systemd drop-in would
//! set. Nothing here needs root, systemd or the network. Needs `cargo deb` and `dpkg-deb`; without
//! them the test skips through `outpost_tests::skip` (a failure under `CI=true`; `.ci/test`
//! installs cargo-deb).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use outpost_tests::*;

/// The line right before the block, in deploy/README.md.
const MARKER: &str = "<!-- walkthrough: run by tests/tests/walkthrough.rs -->";
/// Longest the block may take: two `cargo deb` runs (about 10 s each on 2 cores, longer while
/// another cargo holds the package cache), certificates and config checks.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest one `ExecStartPre=` (check-config) may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// The site the walkthrough enrols (not the README's default, to prove `SITE` is honoured).
const SITE: &str = "plant-walk";
/// Central's name in its certificate and in the bundle: the README's default.
const CENTRAL_NAME: &str = "central.example.net";
/// Command words the block must hold: one per step the issue asks the guide to walk through.
const STEPS: &[&str] = &[
    "cargo deb -p outpost-agent --no-build",
    "cargo deb -p outpost-central --no-build",
    "apt install",
    "dpkg-deb -x",
    "outpost-central certs ca",
    "outpost-central certs central",
    "outpost-central sites add",
    "outpost-agent enroll",
    "hash-token",
    "outpost-central check-config",
    "outpost-agent check-config",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The one ```sh block right after `MARKER`.
fn walkthrough_block(readme: &str) -> Result<String> {
    let n = readme.lines().filter(|l| l.trim() == MARKER).count();
    ensure!(
        n == 1,
        "deploy/README.md must hold the line `{MARKER}` exactly once, right before the fenced \
         ```sh block of the fresh install (section \"Install on Debian\"); found it {n} times"
    );
    let mut lines = readme.lines().skip_while(|l| l.trim() != MARKER).skip(1);
    let open = lines.next().unwrap_or("");
    ensure!(
        open.trim() == "```sh",
        "deploy/README.md: the line after `{MARKER}` must open the block with ```sh, found {open:?}"
    );
    let mut block = String::new();
    for line in lines {
        if line.trim() == "```" {
            return Ok(block);
        }
        block.push_str(line);
        block.push('\n');
    }
    bail!("deploy/README.md: the walkthrough block after `{MARKER}` is never closed")
}

/// Whether `cmd --version` runs; reports the skip (or fails, under CI) when it does not.
fn available(cmd: &mut Command, what: &str) -> bool {
    match cmd.arg("--version").stdout(Stdio::null()).output() {
        Ok(o) if o.status.success() => true,
        _ => {
            outpost_tests::skip(
                "the operator guide's fresh install on Debian (tests/tests/walkthrough.rs)",
                &format!(
                    "{what} is not installed (`cargo install cargo-deb --locked`, as `bash \
                     .ci/test` does; dpkg-deb comes with dpkg)"
                ),
            );
            false
        }
    }
}

/// The cargo profile of the binaries this test uses: `target/debug` is `dev`.
fn profile() -> String {
    let dir = bin_dir();
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    if name == "debug" { "dev".into() } else { name }
}

/// Runs `cmd` in its own process group with stdout and stderr into `log`, killing the whole group
/// (bash and whatever it started) if it takes longer than `timeout`. Returns whether it succeeded.
fn run_bounded(cmd: &mut Command, log: &Path, timeout: Duration) -> Result<bool> {
    let f = std::fs::File::create(log)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st.success());
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-KILL", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{cmd:?} did not finish within {timeout:?}; output:\n{}",
                tail(log)
            );
        }
        // Poll interval of the bounded wait around it, not a wait for a condition by itself.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last lines of a log file, for failure messages.
fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// What the test takes from a unit file: its config check, its command and its state directory.
struct Unit {
    pre: String,
    start: String,
    state_directory: String,
}

/// Reads `[Service]` `ExecStartPre=`, `ExecStart=` and `StateDirectory=` (each exactly once).
fn read_unit(path: &Path) -> Result<Unit> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut section = "";
    let mut found: Vec<(&str, &str)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s;
        } else if section == "Service"
            && let Some((k, v)) = line.split_once('=')
            && ["ExecStartPre", "ExecStart", "StateDirectory"].contains(&k.trim())
        {
            found.push((k.trim(), v.trim()));
        }
    }
    let one = |key: &str| -> Result<String> {
        let values: Vec<&str> = found
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .collect();
        match values.as_slice() {
            [v] => Ok(v.to_string()),
            other => bail!("{}: [Service] {key}= once, found {other:?}", path.display()),
        }
    };
    Ok(Unit {
        pre: one("ExecStartPre")?,
        start: one("ExecStart")?,
        state_directory: one("StateDirectory")?,
    })
}

/// A unit's command line as argv with every absolute path moved under `root`. Only the plain
/// form is understood (no `-@:+!` prefix, no quoting, no `$`/`%` expansion); anything else fails
/// here so that the test never runs something other than what systemd would.
fn under_root(cmd: &str, root: &Path) -> Result<Vec<String>> {
    ensure!(
        !cmd.starts_with(['-', '@', ':', '+', '!'])
            && !cmd.contains(['"', '\'', '$', '%', '\\', ';']),
        "unit command {cmd:?} uses systemd syntax this test does not interpret"
    );
    Ok(cmd
        .split_whitespace()
        .map(|w| match w.strip_prefix('/') {
            Some(rel) => root.join(rel).display().to_string(),
            None => w.to_string(),
        })
        .collect())
}

/// The string value of `key = "..."` at the top of a TOML config (before the first table).
fn top_level(config: &str, key: &str) -> Option<String> {
    config
        .lines()
        .take_while(|l| !l.trim_start().starts_with('['))
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
}

/// The unpacked unit file of `package` under `root` (cargo-deb puts it in /usr/lib/systemd).
fn installed_unit(root: &Path, package: &str) -> Result<PathBuf> {
    ["usr/lib/systemd/system", "lib/systemd/system"]
        .iter()
        .map(|d| root.join(d).join(format!("{package}.service")))
        .find(|p| p.is_file())
        .with_context(|| format!("{package}.service is not in the unpacked package"))
}

/// One installed process: its unit's commands under `root`, its data directory and the token the
/// walkthrough made for the client this test acts as.
fn installed(
    root: &Path,
    pki: &Path,
    product: &str,
    client: &str,
) -> Result<(Vec<String>, Member)> {
    let package = format!("outpost-{product}");
    let unit = read_unit(&installed_unit(root, &package)?)?;
    let pre = under_root(&unit.pre, root)?;
    let start = under_root(&unit.start, root)?;
    ensure!(
        pre[0] == start[0] && start[0] == root.join("usr/bin").join(&package).display().to_string(),
        "{package}: the unit must run the installed binary: {pre:?} / {start:?}"
    );
    let config = PathBuf::from(
        start
            .windows(2)
            .find(|w| w[0] == "--config")
            .map(|w| w[1].clone())
            .with_context(|| format!("{package}: ExecStart has no --config: {start:?}"))?,
    );
    // systemd makes /var/lib/<StateDirectory> for the process: the config must keep its store
    // there, or the hardened unit (read-only file system) could not write it.
    let data_dir = root.join("var/lib").join(&unit.state_directory);
    let text = std::fs::read_to_string(&config).with_context(|| config.display().to_string())?;
    ensure!(
        top_level(&text, "data_dir").as_deref() == Some(data_dir.to_str().unwrap()),
        "{package}: data_dir of {} is not the unit's state directory {}",
        config.display(),
        data_dir.display()
    );
    ensure!(
        !text.contains("sha256 = \"0000000000000000"),
        "{package}: the walkthrough left a placeholder token hash in {}",
        config.display()
    );
    let token_file = pki.join("tokens").join(format!("{product}-{client}"));
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("the token the walkthrough made: {}", token_file.display()))?;
    Ok((
        pre,
        Member {
            id: product.to_string(),
            token: token.trim().to_string(),
            command: start,
            data_dir,
            config,
        },
    ))
}

/// Runs a unit's `ExecStartPre=` (check-config) with the same overrides as the process.
fn exec_start_pre(pre: &[String], env: &[(String, String)], log: &Path) -> Result<()> {
    let mut cmd = Command::new(&pre[0]);
    hermetic(&mut cmd).args(&pre[1..]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let ok = run_bounded(&mut cmd, log, CHECK_TIMEOUT)?;
    let out = std::fs::read_to_string(log)?;
    ensure!(ok && out.contains("config OK"), "{pre:?} failed:\n{out}");
    Ok(())
}

fn overrides(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Goal: the README's fresh install on Debian works as written, up to a synced milestone, and the
/// units' command lines start what it installed. Method: see the file's doc comment; checks that
/// the block covers every step, that it exits 0, that it replaced every placeholder token hash,
/// that each config keeps its store in its unit's state directory, that both processes write
/// `ready.json` and the agent connects, that a milestone posted at the agent with the token the
/// walkthrough made arrives once in central's feed under the enrolled site, and that both exit
/// cleanly on SIGTERM and remove their ready files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_fresh_install_on_debian_runs_and_syncs() -> Result<()> {
    let readme = std::fs::read_to_string(repo().join("deploy/README.md"))?;
    let block = walkthrough_block(&readme)?;
    for step in STEPS {
        ensure!(
            block.contains(step),
            "the walkthrough block in deploy/README.md has no `{step}`:\n{block}"
        );
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    if !available(Command::new(&cargo).arg("deb"), "cargo-deb")
        || !available(&mut Command::new("dpkg-deb"), "dpkg-deb")
        || !available(&mut Command::new("bash"), "bash")
    {
        return Ok(());
    }

    let mut tmp = tempfile::Builder::new()
        .prefix("outpost-walkthrough")
        .tempdir()?;
    // For post-mortems: keep the root (configs, stores, logs, the trace of the block).
    let keep = std::env::var("OUTPOST_TEST_KEEP_DIRS").is_ok_and(|v| v == "1");
    if keep {
        tmp.disable_cleanup(true);
        eprintln!("keeping {}", tmp.path().display());
    }
    let root = tmp.path().join("root");
    let pki = root.join("root/outpost-pki");
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&root)?;
    std::fs::create_dir_all(&logs)?;
    ensure!(root.is_absolute() && root != Path::new("/"));

    // The block, as an operator would save and run it.
    let script = tmp.path().join("install.sh");
    std::fs::write(&script, &block)?;
    let mut path = vec![root.join("usr/bin")];
    if let Some(dir) = Path::new(&cargo).parent().filter(|d| d.is_absolute()) {
        path.push(dir.to_path_buf());
    }
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let vars: [(&str, OsString); 7] = [
        ("ROOT", root.clone().into()),
        ("PROFILE", profile().into()),
        ("DEBS", tmp.path().join("debs").into()),
        ("PKI", pki.clone().into()),
        ("CENTRAL", CENTRAL_NAME.into()),
        ("SITE", SITE.into()),
        ("PATH", std::env::join_paths(path)?),
    ];
    let mut bash = Command::new("bash");
    hermetic(&mut bash)
        .args(["-x", "-euo", "pipefail"])
        .arg(&script)
        .current_dir(repo());
    for (k, v) in &vars {
        bash.env(k, v);
    }
    let log = logs.join("install.log");
    let ok = run_bounded(&mut bash, &log, SCRIPT_TIMEOUT)?;
    ensure!(
        ok,
        "the walkthrough block of deploy/README.md failed (trace of `bash -x`):\n{}",
        tail(&log)
    );
    for package in ["outpost-agent", "outpost-central"] {
        ensure!(
            root.join("usr/bin").join(package).is_file(),
            "{package} was not unpacked into ROOT"
        );
    }
    let agent_toml = std::fs::read_to_string(root.join("etc/outpost/agent.toml"))?;
    ensure!(
        top_level(&agent_toml, "site_id").as_deref() == Some(SITE),
        "enroll did not set site_id = {SITE:?}:\n{agent_toml}"
    );

    // Start central as its unit does, on ephemeral loopback ports.
    let (pre, central_m) = installed(&root, &pki, "central", "erp")?;
    let env = overrides(&[
        ("OUTPOST_API__LISTEN", "127.0.0.1:0"),
        ("OUTPOST_QUIC__LISTEN", "127.0.0.1:0"),
    ]);
    exec_start_pre(&pre, &env, &logs.join("central-check.log"))?;
    let mut central = Proc::start(&central_m, &env, &logs)?;
    let quic = central
        .ready
        .quic
        .clone()
        .context("central's ready.json has its QUIC address")?;
    ensure!(
        central.ready.api.starts_with("127.0.0.1:") && quic.starts_with("127.0.0.1:"),
        "central listens on loopback only: {:?}",
        central.ready
    );

    // Then the agent, pointed at central's QUIC port (the name stays the certificate's).
    let (pre, agent_m) = installed(&root, &pki, "agent", "scanners")?;
    let env = overrides(&[
        ("OUTPOST_API__LISTEN", "127.0.0.1:0"),
        ("OUTPOST_SYNC__CENTRAL_ADDR", &quic),
    ]);
    exec_start_pre(&pre, &env, &logs.join("agent-check.log"))?;
    let mut agent = Proc::start(&agent_m, &env, &logs)?;
    ensure!(
        agent.ready.api.starts_with("127.0.0.1:"),
        "{:?}",
        agent.ready
    );

    let a = Api::new(&agent);
    wait_connected(&a, true)
        .await
        .with_context(|| format!("agent log:\n{}", agent.log_tail()))?;
    let ids = post_milestones(&a, "walkthrough", 1).await?;
    wait_drained(&a).await?;
    let c = Api::new(&central);
    let id = ids[0].clone();
    let arrived = eventually("the milestone in central's feed", CONVERGE_TIMEOUT, || {
        let (c, id) = (c.clone(), id.clone());
        async move {
            let feed = read_feed(&c).await?;
            let hits: Vec<_> = feed.iter().filter(|e| e["id"] == id.as_str()).collect();
            Ok((!hits.is_empty()).then(|| hits.into_iter().cloned().collect::<Vec<_>>()))
        }
    })
    .await?;
    ensure!(
        arrived.len() == 1 && arrived[0]["site"] == SITE,
        "the milestone is in central's feed once, from {SITE}: {arrived:?}"
    );

    // Stop both as systemd would (SIGTERM, bounded wait); a clean exit removes ready.json.
    for (p, data_dir) in [
        (&mut agent, &agent_m.data_dir),
        (&mut central, &central_m.data_dir),
    ] {
        let clean = p.terminate()?;
        ensure!(
            clean,
            "{} did not exit cleanly on SIGTERM:\n{}",
            p.name,
            p.log_tail()
        );
        ensure!(
            !data_dir.join("ready.json").exists(),
            "{} left its ready.json",
            p.name
        );
    }
    drop((agent, central));
    if !keep {
        let dir = tmp.path().to_path_buf();
        tmp.close()?;
        ensure!(!dir.exists(), "{} was not removed", dir.display());
    }
    Ok(())
}

/// Goal: a README without the marker, or with the marker not right before a ```sh block, fails
/// with a message that says what is missing instead of running nothing. Method: synthetic texts.
#[test]
fn the_block_is_found_only_right_after_the_marker() {
    let missing = walkthrough_block("# Guide\n```sh\necho hi\n```\n").unwrap_err();
    assert!(missing.to_string().contains("exactly once"), "{missing}");
    let not_sh = walkthrough_block(&format!("{MARKER}\n```ini\n[a]\n```\n")).unwrap_err();
    assert!(not_sh.to_string().contains("```sh"), "{not_sh}");
    let open = walkthrough_block(&format!("{MARKER}\n```sh\necho hi\n")).unwrap_err();
    assert!(open.to_string().contains("never closed"), "{open}");
    let twice = format!("{MARKER}\n```sh\na\n```\n{MARKER}\n```sh\nb\n```\n");
    assert!(walkthrough_block(&twice).is_err());
    let ok = walkthrough_block(&format!(
        "text\n{MARKER}\n```sh\nset -x\necho hi\n```\nafter\n"
    ));
    assert_eq!(ok.unwrap(), "set -x\necho hi\n");
}
