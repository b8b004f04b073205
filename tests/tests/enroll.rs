//! Site enrolment with real binaries: `outpost-central sites add` writes a bundle, `outpost-agent
//! enroll` installs it, the agent syncs with a central started from its own config; bad bundles
//! change nothing; and a site whose certificate expired while it was offline is enrolled again
//! without losing its outbox. The expiry test needs libfaketime (Debian package `faketime`, as
//! tests/tests/clock.rs) to issue a certificate in the past; without it, it skips through
//! `outpost_tests::skip`, which fails it under `CI=true`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use outpost_tests::*;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Where Debian's `faketime` package puts the preload library.
/// Longest one CLI run may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
const SITE: &str = "plant-9";

/// The preload library, or `None` after `outpost_tests::skip` (which fails the test under CI).
fn libfaketime() -> Option<PathBuf> {
    outpost_tests::libfaketime("the expired-certificate recovery test")
}

/// Env that shifts a process's wall clock by `offset` (libfaketime syntax, e.g. "-400d").
fn faked(lib: &Path, offset: &str) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), lib.display().to_string()),
        ("FAKETIME".into(), offset.to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ("DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

/// Runs a workspace binary with `args` and extra environment, bounded by `CLI_TIMEOUT`.
fn run(name: &str, args: &[&str], env: &[(String, String)]) -> Result<CliOutput> {
    run_cli_env(name, args, env, CLI_TIMEOUT)
}

/// `run` that must succeed.
fn ok(name: &str, args: &[&str], env: &[(String, String)]) -> Result<CliOutput> {
    let out = run(name, args, env)?;
    ensure!(
        out.success,
        "{name} {args:?} failed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    Ok(out)
}

fn p(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::metadata(path)
        .with_context(|| path.display().to_string())?
        .permissions()
        .mode()
        & 0o777)
}

/// A fleet CA made with `certs ca` and a central certificate made with `certs central`, in
/// `root/ca`.
fn make_ca(root: &Path) -> Result<PathBuf> {
    let ca = root.join("ca");
    ok("outpost-central", &["certs", "ca", "--out", p(&ca)], &[])?;
    ok(
        "outpost-central",
        &["certs", "central", "--ca-dir", p(&ca), "--out", p(&ca)],
        &[],
    )?;
    Ok(ca)
}

/// Starts central from a config written here (as an operator would, not by `dev init`), on
/// ephemeral ports, with one admin API client. Returns it and its QUIC address.
fn start_central(root: &Path, ca: &Path) -> Result<(Proc, String)> {
    let token = "enroll-test-admin-token-0123456789abcdef";
    let data = root.join("central-data");
    std::fs::create_dir_all(&data)?;
    let cfg = root.join("central.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {data:?}\n\n[api]\nlisten = \"127.0.0.1:0\"\n\n[[api.tokens]]\n\
             name = \"admin\"\nrole = \"admin\"\nsha256 = {hash:?}\n\n[quic]\n\
             listen = \"127.0.0.1:0\"\nca_cert = {ca_cert:?}\ncert = {cert:?}\nkey = {key:?}\n",
            data = p(&data),
            hash = outpost_protocol::secret::sha256_hex(token),
            ca_cert = p(&ca.join("ca.pem")),
            cert = p(&ca.join("central.pem")),
            key = p(&ca.join("central.key")),
        ),
    )?;
    let m = Member {
        id: "central".into(),
        token: token.into(),
        command: vec![
            p(&bin("outpost-central")).to_string(),
            "serve".into(),
            "--config".into(),
            p(&cfg).to_string(),
        ],
        data_dir: data,
        config: cfg,
    };
    let env: Vec<(String, String)> = fast_central_env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let central = Proc::start(&m, &env, &root.join("logs"))?;
    let quic = central
        .ready
        .quic
        .clone()
        .context("central's ready file has quic")?;
    Ok((central, quic))
}

/// Starts the agent of `config` (written by enroll) with its API on an ephemeral port, as the
/// client holding `token`.
fn start_agent(root: &Path, config: &Path, data: &Path, token: &str) -> Result<Proc> {
    let m = Member {
        id: SITE.into(),
        token: token.into(),
        command: vec![
            p(&bin("outpost-agent")).to_string(),
            "run".into(),
            "--config".into(),
            p(config).to_string(),
        ],
        data_dir: data.to_path_buf(),
        config: config.to_path_buf(),
    };
    let mut env: Vec<(String, String)> = fast_agent_env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    env.push(("OUTPOST_API__LISTEN".into(), "127.0.0.1:0".into()));
    Proc::start(&m, &env, &root.join("logs"))
}

/// `sites add SITE` with `extra` arguments (`--days`, `--force`) writing `out`.
fn sites_add(
    ca: &Path,
    quic: &str,
    out: &Path,
    extra: &[&str],
    env: &[(String, String)],
) -> Result<CliOutput> {
    let mut args = vec![
        "sites",
        "add",
        SITE,
        "--ca-dir",
        p(ca),
        "--central-addr",
        quic,
        "--out",
        p(out),
    ];
    args.extend_from_slice(extra);
    ok("outpost-central", &args, env)
}

/// The plain token enroll printed for `role`.
fn printed_token(stdout: &str, role: &str) -> Result<String> {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{role}:")))
        .map(|t| t.trim().to_string())
        .with_context(|| format!("enroll printed no {role} token:\n{stdout}"))
}

/// Every file of `dir` (recursively) and of `extra`, with its mode and contents.
fn snapshot(paths: &[&Path]) -> Result<BTreeMap<PathBuf, (u32, Vec<u8>)>> {
    let mut out = BTreeMap::new();
    let mut todo: Vec<PathBuf> = paths.iter().map(|p| p.to_path_buf()).collect();
    while let Some(path) = todo.pop() {
        let meta = std::fs::metadata(&path)?;
        if meta.is_dir() {
            out.insert(path.clone(), (meta.permissions().mode(), Vec::new()));
            for e in std::fs::read_dir(&path)? {
                todo.push(e?.path());
            }
        } else {
            out.insert(
                path.clone(),
                (meta.permissions().mode(), std::fs::read(&path)?),
            );
        }
    }
    Ok(out)
}

/// Central's feed entries of `SITE`, by event id, with how often each appears.
async fn site_events(c: &Api) -> Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for e in read_feed(c).await? {
        if e["site"] == SITE {
            let id = e["id"].as_str().context("feed entry id")?.to_string();
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

/// Goal: a site is enrolled from nothing with the two commands, and works. Method: a CA and
/// central certificate with `certs`, central started from a hand-written config; `sites add`
/// writes a bundle (mode 0600, readable by the agent's parser, the key in it only); `enroll`
/// writes the TLS files (key 0600) and a config that `check-config` accepts; the agent started
/// from it takes milestones and central's feed has each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_enrolled_from_scratch_syncs() -> Result<()> {
    let t = tempfile::Builder::new()
        .prefix("outpost-enroll")
        .tempdir()?;
    let root = t.path();
    let ca = make_ca(root)?;
    let (central, quic) = start_central(root, &ca)?;
    let bundle = root.join("b.bundle");
    let added = sites_add(&ca, &quic, &bundle, &[], &[])?;
    ensure!(
        added.stdout.contains("outpost-agent enroll") && !added.stdout.contains("PRIVATE KEY"),
        "sites add says what to do next and prints no key:\n{}",
        added.stdout
    );
    ensure!(mode(&bundle)? == 0o600, "bundle mode {:o}", mode(&bundle)?);
    let b = outpost_agent::enroll::read_bundle(&bundle)?;
    ensure!(b.format_version == 1 && b.site_id == SITE && b.central_addr == quic);
    ensure!(
        b.central_name == "central.outpost.local",
        "{}",
        b.central_name
    );
    ensure!(b.key.contains("PRIVATE KEY") && b.cert.contains("CERTIFICATE"));
    ensure!(
        b.ca_cert.trim() == std::fs::read_to_string(ca.join("ca.pem"))?.trim(),
        "the bundle carries the fleet CA"
    );

    let config = root.join("agent.toml");
    let data = root.join("data");
    let out = ok(
        "outpost-agent",
        &[
            "enroll",
            p(&bundle),
            "--config",
            p(&config),
            "--data-dir",
            p(&data),
        ],
        &[],
    )?;
    ensure!(
        out.stdout.contains("config OK")
            && out.stdout.contains("systemctl restart outpost-agent")
            && !out.stdout.contains("PRIVATE KEY")
            && !out.stdout.contains(b.key.lines().nth(1).unwrap_or("?")),
        "enroll reports, never shows the key:\n{}",
        out.stdout
    );
    let tls = root.join("agent");
    ensure!(mode(&tls.join("site.key"))? == 0o600, "key mode");
    ensure!(
        mode(&tls)? == 0o700,
        "a TLS directory enroll creates is 0700"
    );
    let text = std::fs::read_to_string(&config)?;
    let scanner = printed_token(&out.stdout, "scanner")?;
    ensure!(
        !text.contains(&scanner) && text.contains(&outpost_protocol::secret::sha256_hex(&scanner)),
        "the config keeps the token's hash only"
    );
    ok(
        "outpost-agent",
        &["check-config", "--config", p(&config)],
        &[],
    )?;

    let agent = start_agent(root, &config, &data, &scanner)?;
    let a = Api::new(&agent);
    let ids = post_milestones(&a, "enrolled", 3).await?;
    wait_drained(&a).await?;
    let c = Api::new(&central);
    let events = site_events(&c).await?;
    for id in &ids {
        ensure!(
            events.get(id) == Some(&1),
            "{id} once at central: {events:?}"
        );
    }
    Ok(())
}

/// Goal: a bundle that fails a check is refused with a message naming the problem, and changes
/// nothing. Method: enrol a good bundle, snapshot the TLS directory and the config (modes and
/// bytes), then feed enroll a certificate of another CA, a key of another certificate, an
/// edited site id and a truncated file; each must exit non-zero with its message, show no key
/// material, and leave the snapshot as it was.
#[test]
fn bad_bundles_change_nothing() -> Result<()> {
    let t = tempfile::Builder::new()
        .prefix("outpost-enroll")
        .tempdir()?;
    let root = t.path();
    let ca = make_ca(root)?;
    let rogue_root = root.join("rogue");
    std::fs::create_dir_all(&rogue_root)?;
    let rogue = make_ca(&rogue_root)?;
    let addr = "127.0.0.1:7601";
    let good = root.join("good.bundle");
    sites_add(&ca, addr, &good, &[], &[])?;
    let config = root.join("agent.toml");
    let data = root.join("data");
    ok(
        "outpost-agent",
        &[
            "enroll",
            p(&good),
            "--config",
            p(&config),
            "--data-dir",
            p(&data),
        ],
        &[],
    )?;
    let tls = root.join("agent");
    let before = snapshot(&[&tls, &config])?;

    let good_text = std::fs::read_to_string(&good)?;
    let good_b = outpost_agent::enroll::read_bundle(&good)?;
    let other = root.join("other.bundle");
    sites_add(&ca, addr, &other, &[], &[])?;
    let other_b = outpost_agent::enroll::read_bundle(&other)?;
    let rogue_bundle = rogue_root.join("rogue.bundle");
    sites_add(&rogue, addr, &rogue_bundle, &[], &[])?;
    let rogue_b = outpost_agent::enroll::read_bundle(&rogue_bundle)?;

    let swap = |text: &str, from: &str, to: &str| -> Result<String> {
        ensure!(
            text.contains(from.trim_end()),
            "bundle text holds the block"
        );
        Ok(text.replace(from.trim_end(), to.trim_end()))
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "another CA's certificate",
            swap(
                &std::fs::read_to_string(&rogue_bundle)?,
                &rogue_b.ca_cert,
                &good_b.ca_cert,
            )?,
            "not issued by the bundle's CA",
        ),
        (
            "a key of another certificate",
            swap(&good_text, &good_b.key, &other_b.key)?,
            "the key does not belong to the certificate",
        ),
        (
            "an edited site id",
            swap(&good_text, "site_id = \"plant-9\"", "site_id = \"plant-8\"")?,
            "the certificate is for site \"plant-9\" but the bundle's site_id is \"plant-8\"",
        ),
        (
            "a truncated file",
            good_text[..good_text.len() * 2 / 3].to_string(),
            "not a valid bundle",
        ),
    ];
    let key_lines: Vec<&str> = good_b
        .key
        .lines()
        .chain(other_b.key.lines())
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for (what, text, message) in &cases {
        let bad = root.join("bad.bundle");
        std::fs::write(&bad, text)?;
        let out = run(
            "outpost-agent",
            &["enroll", p(&bad), "--config", p(&config), "--force"],
            &[],
        )?;
        ensure!(!out.success, "{what}: enroll must fail:\n{}", out.stdout);
        ensure!(
            out.stderr.contains(message) && out.stderr.contains("nothing was changed"),
            "{what}: stderr names the problem ({message}):\n{}",
            out.stderr
        );
        for l in &key_lines {
            ensure!(
                !out.stderr.contains(l) && !out.stdout.contains(l),
                "{what}: no key material printed"
            );
        }
        ensure!(
            snapshot(&[&tls, &config])? == before,
            "{what}: the TLS directory and the config are untouched"
        );
        eprintln!("{what}: refused: {}", out.stderr.trim());
    }
    Ok(())
}

/// Goal: a site whose certificate expired while it was offline recovers its outbox whole.
/// Method: `sites add` under libfaketime 400 days back with `--days 30` issues a certificate
/// that expired a year ago; enroll refuses it at the real time (nothing changed) and takes it at
/// the faked time. The agent, started at the real time, says in its log that its certificate
/// EXPIRED, stays disconnected (central refuses the handshake), and takes N milestones into its
/// outbox. After SIGTERM, a fresh bundle (`sites add --force`) is enrolled over the same config
/// (`--force`, data directory untouched); the agent restarted on it delivers all N to central,
/// each exactly once, and its outbox drains to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_with_an_expired_certificate_is_enrolled_again_without_losing_its_outbox()
-> Result<()> {
    let Some(lib) = libfaketime() else {
        return Ok(());
    };
    const N: usize = 12;
    let t = tempfile::Builder::new()
        .prefix("outpost-enroll")
        .tempdir()?;
    let root = t.path();
    let ca = make_ca(root)?;
    let (central, quic) = start_central(root, &ca)?;
    let c = Api::new(&central);
    let bundle = root.join("plant-9.bundle");
    let past = faked(&lib, "-400d");
    sites_add(&ca, &quic, &bundle, &["--days", "30"], &past)?;
    let old = outpost_agent::enroll::read_bundle(&bundle)?;
    let not_after = OffsetDateTime::parse(&old.not_after, &Rfc3339)
        .with_context(|| format!("not_after {:?}", old.not_after))?;
    ensure!(
        not_after < OffsetDateTime::now_utc() - time::Duration::days(300),
        "the certificate expired about a year ago (libfaketime in effect?): {}",
        old.not_after
    );

    let config = root.join("agent.toml");
    let data = root.join("data");
    let enroll_args = [
        "enroll",
        p(&bundle),
        "--config",
        p(&config),
        "--data-dir",
        p(&data),
    ];
    let refused = run("outpost-agent", &enroll_args, &[])?;
    ensure!(
        !refused.success
            && refused.stderr.contains("EXPIRED")
            && refused.stderr.contains(&old.not_after)
            && !config.exists(),
        "an expired certificate is refused, with its dates, and nothing written:\n{}",
        refused.stderr
    );
    let out = ok("outpost-agent", &enroll_args, &past)?;
    let token = printed_token(&out.stdout, "admin")?;

    let mut agent = start_agent(root, &config, &data, &token)?;
    let a = Api::new(&agent);
    let ids = post_milestones(&a, "offline", N).await?;
    // Until the agent has tried central and been refused: its log records the failed session
    // (the first at warn, `failures` at error), so "not connected" below follows a refusal.
    eventually(
        "a refused session in the agent's log",
        CONVERGE_TIMEOUT,
        || async {
            let log = std::fs::read_to_string(&agent.log)?;
            Ok(
                (log.contains("sync session ended") || log.contains("sync session failed"))
                    .then_some(()),
            )
        },
    )
    .await?;
    let h = health(&a).await?;
    eprintln!("expired certificate: GET /v1/health = {h}");
    ensure!(
        h["connected"] == Value::Bool(false) && h["outbox_depth"].as_u64() == Some(N as u64),
        "an agent with an expired certificate is not connected and holds its {N} events: {h}"
    );
    // Health shows the expiry too: the field must be there, and negative by about a year.
    let days = h["certificate"]["expires_in_days"]
        .as_i64()
        .with_context(|| format!("health carries certificate.expires_in_days: {h}"))?;
    ensure!(
        days < -300,
        "health shows the certificate expired about a year ago: {days} days: {h}"
    );
    let log = std::fs::read_to_string(&agent.log)?;
    ensure!(
        log.contains("certificate has EXPIRED"),
        "the agent's log says its certificate expired:\n{}",
        agent.log_tail()
    );
    ensure!(
        site_events(&c).await?.is_empty(),
        "central took nothing from a site with an expired certificate"
    );
    ensure!(agent.terminate()?, "the agent exits cleanly on SIGTERM");
    drop(agent);

    sites_add(&ca, &quic, &bundle, &["--force"], &[])?;
    let again = ok(
        "outpost-agent",
        &["enroll", p(&bundle), "--config", p(&config), "--force"],
        &[],
    )?;
    ensure!(
        again.stdout.contains("updated")
            && again
                .stdout
                .contains(&format!("holds site {SITE}'s outbox")),
        "re-enrolment updates the config and keeps the store:\n{}",
        again.stdout
    );
    let agent = start_agent(root, &config, &data, &token)?;
    let a = Api::new(&agent);
    wait_drained(&a).await?;
    let h = health(&a).await?;
    ensure!(h["outbox_depth"].as_u64() == Some(0), "{h}");
    let events = site_events(&c).await?;
    ensure!(
        events.len() == N && ids.iter().all(|id| events.get(id) == Some(&1)),
        "all {N} events buffered while the certificate was expired are at central exactly once: \
         {events:?}"
    );
    Ok(())
}

/// Goal: enrolling over an existing config changes only `site_id` and the five `[sync]` keys,
/// keeps every other key and comment, and is refused when the config or the store belongs to
/// another site unless `--force`. Method: the package's default config (deploy/examples/
/// plant.toml, site plant-1) with its data directory pointed at a store holding a plant-1 event;
/// enroll a plant-9 bundle: refused for the config, then (config changed to plant-9 by hand)
/// refused for the store, each leaving the files as they were; then with --force: every line
/// but those six is unchanged and check-config accepts the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolling_over_an_existing_config_keeps_the_rest() -> Result<()> {
    use outpost_agent::store::{NewMilestone, Store};
    let t = tempfile::Builder::new()
        .prefix("outpost-enroll")
        .tempdir()?;
    let root = t.path();
    let ca = make_ca(root)?;
    let bundle = root.join("b.bundle");
    sites_add(&ca, "central.example.net:7601", &bundle, &[], &[])?;

    let data = root.join("data");
    let (store, writer) = Store::open(&data.join("agent.redb"), "plant-1")?;
    let m = NewMilestone {
        event_id: "old-1".into(),
        shipment_id: "SH-1".into(),
        milestone: outpost_protocol::MilestoneKind::Picked,
        scanner_id: "s".into(),
        at: "2026-11-26T10:00:00Z".into(),
    };
    store
        .record_milestone(m, 1_000)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    drop(store);
    writer.shutdown().await;

    let packaged = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/plant.toml");
    let original = std::fs::read_to_string(&packaged)?.replace(
        "data_dir = \"/var/lib/outpost-agent\"",
        &format!("data_dir = {:?}", p(&data)),
    );
    ensure!(original.contains(p(&data)), "the example sets data_dir");
    let config = root.join("agent.toml");
    std::fs::write(&config, &original)?;
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o640))?;
    let args = ["enroll", p(&bundle), "--config", p(&config)];

    let out = run("outpost-agent", &args, &[])?;
    ensure!(
        !out.success
            && out.stderr.contains("is for site \"plant-1\"")
            && out.stderr.contains("--force"),
        "a config of another site is refused:\n{}",
        out.stderr
    );
    let as_plant_9 = original.replace("site_id = \"plant-1\"", "site_id = \"plant-9\"");
    std::fs::write(&config, &as_plant_9)?;
    let out = run("outpost-agent", &args, &[])?;
    ensure!(
        !out.success && out.stderr.contains("holds the store of site \"plant-1\""),
        "a store of another site is refused:\n{}",
        out.stderr
    );
    ensure!(
        std::fs::read_to_string(&config)? == as_plant_9,
        "config untouched"
    );
    ensure!(!root.join("agent").exists(), "no TLS directory written");

    std::fs::write(&config, &original)?;
    let mut forced = args.to_vec();
    forced.push("--force");
    let out = ok("outpost-agent", &forced, &[])?;
    ensure!(
        !out.stdout.contains("API tokens"),
        "no tokens are made for an existing config:\n{}",
        out.stdout
    );
    let after = std::fs::read_to_string(&config)?;
    let changed_keys = [
        "site_id",
        "central_addr",
        "central_name",
        "ca_cert",
        "cert",
        "key",
    ];
    let key_of = |l: &str| l.split('=').next().unwrap_or("").trim().to_string();
    let (before_lines, after_lines): (Vec<&str>, Vec<&str>) =
        (original.lines().collect(), after.lines().collect());
    ensure!(
        before_lines.len() == after_lines.len(),
        "same lines:\n{after}"
    );
    for (b, a) in before_lines.iter().zip(&after_lines) {
        if b != a {
            ensure!(
                changed_keys.contains(&key_of(b).as_str()) && key_of(a) == key_of(b),
                "only site_id and [sync]'s keys change: {b:?} became {a:?}"
            );
        }
    }
    ensure!(after.contains("site_id = \"plant-9\""), "{after}");
    ensure!(
        after.contains(&format!(
            "key = {:?}",
            p(&root.join("agent").join("site.key"))
        )),
        "{after}"
    );
    ensure!(mode(&config)? == 0o640, "the config keeps its mode");
    ok(
        "outpost-agent",
        &["check-config", "--config", p(&config)],
        &[],
    )?;
    Ok(())
}
