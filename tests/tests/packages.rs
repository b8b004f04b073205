//! The `.deb` packages: built with cargo-deb from the binaries this test run already uses (no
//! release build), then inspected with `dpkg-deb`: the binary, the systemd unit, the default
//! config, the maintainer scripts and the control fields. Nothing is installed.
//!
//! Needs `cargo deb` (`cargo install cargo-deb --locked`) and `dpkg-deb`; without them the test
//! skips through `outpost_tests::skip` (a failure under `CI=true`; `.ci/test` installs cargo-deb).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use outpost_tests::{bin_dir, hermetic, skip};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `cmd --version` runs; reports the skip (or fails, under CI) when it does not.
fn available(cmd: &mut Command, what: &str) -> bool {
    match cmd.arg("--version").output() {
        Ok(o) if o.status.success() => true,
        _ => {
            skip(
                "the .deb package checks (tests/tests/packages.rs)",
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

/// Builds `package`'s .deb into `out` from the existing binary and returns its path.
fn build_deb(package: &str, out: &Path) -> PathBuf {
    let stdout = ok(hermetic(&mut cargo())
        .current_dir(repo())
        .args(["deb", "-p", package, "--no-build", "--fast", "--profile"])
        .arg(profile())
        .arg("--output")
        .arg(out));
    let deb = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("cargo deb printed no .deb path: {stdout}"));
    assert!(deb.is_file(), "{}", deb.display());
    deb
}

/// Goal: each package installs the binary in /usr/bin, the hardened unit in the systemd unit
/// directory, the default config where the postinst copies it from, and maintainer scripts that
/// create the system user idempotently, copy the config only if absent, hand the unit to
/// deb-systemd-helper and remove the user on purge only; the control fields are sane.
/// Method: `cargo deb --no-build` from the binaries of this test run, then `dpkg-deb --contents`,
/// `-x`, `-e` and `-f` on the result; the extracted binary is run.
#[test]
fn debian_packages_hold_binary_unit_config_and_scripts() {
    if !available(cargo().arg("deb"), "cargo-deb")
        || !available(&mut Command::new("dpkg-deb"), "dpkg-deb")
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for (product, default_config) in [
        ("agent", "deploy/debian/agent/agent.toml"),
        ("central", "deploy/examples/central.toml"),
    ] {
        let package = format!("outpost-{product}");
        let deb = build_deb(&package, tmp.path());

        // Contents: every path the brief of the package layout names.
        let contents = ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
        let paths: Vec<&str> = contents
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .collect();
        let has = |p: &str| paths.contains(&p);
        assert!(has(&format!("./usr/bin/{package}")), "{contents}");
        let unit_in_package = [
            format!("./lib/systemd/system/{package}.service"),
            format!("./usr/lib/systemd/system/{package}.service"),
        ]
        .into_iter()
        .find(|p| has(p))
        .unwrap_or_else(|| panic!("{package}: no systemd unit in {contents}"));
        let config_in_package = format!("./usr/share/{package}/{product}.toml");
        assert!(has(&config_in_package), "{contents}");

        // The files are the repository's, and the binary runs.
        let root = tmp.path().join(format!("{package}-root"));
        ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
        let same = |in_package: &str, in_repo: &str| {
            let a = std::fs::read(root.join(in_package)).unwrap();
            let b = std::fs::read(repo().join(in_repo)).unwrap();
            assert!(a == b, "{package}: {in_package} differs from {in_repo}");
        };
        same(
            &unit_in_package,
            &format!("deploy/systemd/{package}.service"),
        );
        same(&config_in_package, default_config);
        let version = ok(Command::new(root.join(format!("usr/bin/{package}"))).arg("--version"));
        assert!(version.starts_with(&package), "{version}");

        // Maintainer scripts.
        let control = tmp.path().join(format!("{package}-control"));
        ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
        let script = |name: &str| {
            let p = control.join(name);
            let s =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{package}: {name}: {e}"));
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert!(mode & 0o111 != 0, "{package}: {name} is not executable");
            ok(Command::new("sh").arg("-n").arg(&p));
            assert!(
                !s.contains("#DEBHELPER#"),
                "{package}: {name}: token left in"
            );
            s
        };
        let postinst = script("postinst");
        assert!(
            postinst.contains(&format!("getent passwd {package}"))
                && postinst.contains(&format!(
                    "adduser --system --group --home /var/lib/{package} --no-create-home {package}"
                )),
            "{package}: postinst does not create the user idempotently:\n{postinst}"
        );
        let etc_config = format!("/etc/outpost/{product}.toml");
        assert!(
            postinst.contains(&format!("[ ! -e {etc_config} ]"))
                && postinst.contains(&format!("/usr/share/{package}/{product}.toml {etc_config}")),
            "{package}: postinst must copy the default config only if absent:\n{postinst}"
        );
        assert!(
            postinst.contains(&format!("install -d -o root -g {package}"))
                && postinst.contains(&format!("/etc/outpost/{product}")),
            "{package}: postinst does not create /etc/outpost/{product}:\n{postinst}"
        );
        if product == "agent" {
            assert!(
                postinst.contains("-m 0770 /etc/outpost/agent"),
                "the agent's TLS directory must be group-writable:\n{postinst}"
            );
        }
        assert!(
            postinst.contains(&format!(
                "deb-systemd-helper update-state {package}.service"
            )) && postinst.contains("daemon-reload"),
            "{package}: postinst does not register the unit:\n{postinst}"
        );
        let postrm = script("postrm");
        let purge = postrm
            .find("\"$1\" = \"purge\" ]; then\n    if getent passwd")
            .unwrap_or_else(|| panic!("{package}: postrm removes no user on purge:\n{postrm}"));
        let deluser = format!("deluser --system --quiet {package}");
        assert!(
            postrm.find(&deluser).is_some_and(|i| i > purge)
                && postrm.matches(&deluser).count() == 1,
            "{package}: postrm must remove the user on purge only:\n{postrm}"
        );

        // Control fields.
        let fields = ok(Command::new("dpkg-deb").arg("-f").arg(&deb).args([
            "Package",
            "Depends",
            "Description",
            "Section",
        ]));
        let field = |name: &str| {
            fields
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .unwrap_or_else(|| panic!("{package}: no {name} in {fields}"))
                .to_string()
        };
        assert_eq!(field("Package"), package);
        let depends = field("Depends");
        assert!(
            depends.contains("adduser") && depends.contains("libc6"),
            "{package}: Depends: {depends}"
        );
        assert!(
            field("Description").starts_with("Outpost "),
            "{package}: {fields}"
        );
        assert_eq!(field("Section"), "net");
    }
}
