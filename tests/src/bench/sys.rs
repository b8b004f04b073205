//! Machine facts, process CPU/RSS from `/proc`, and the fsync probe.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::Figure;
use super::hist::Hist;

/// Clock ticks per second of `/proc/PID/stat` times (`getconf CLK_TCK`, 100 if unknown).
fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds (user + system) the process has used so far.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`, which may contain spaces: state is field 3, utime 14, stime 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clk_tck())
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`), in MiB.
pub fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU time and peak RSS of the processes of a scenario, accumulated across restarts: call
/// `sample` before a process is stopped and at the end of the scenario.
#[derive(Default)]
pub struct Usage {
    /// name → (CPU seconds of processes already stopped, peak RSS MiB).
    done: BTreeMap<String, (f64, f64)>,
    /// name → CPU seconds of the live process at its latest sample (pid-keyed).
    live: BTreeMap<(String, u32), f64>,
}

impl Usage {
    pub fn sample(&mut self, name: &str, pid: u32) {
        if let Some(c) = cpu_secs(pid) {
            self.live.insert((name.to_string(), pid), c);
        }
        if let Some(h) = status_mib(pid, "VmHWM") {
            let e = self.done.entry(name.to_string()).or_default();
            e.1 = e.1.max(h);
        }
    }

    /// `{prefix}.{name}.cpu_s` and `{prefix}.{name}.peak_rss_mib` for each process name.
    pub fn figures(&self, prefix: &str) -> Vec<Figure> {
        let mut cpu: BTreeMap<&str, f64> = BTreeMap::new();
        for ((name, _), c) in &self.live {
            *cpu.entry(name.as_str()).or_default() += c;
        }
        let mut out = Vec::new();
        for (name, (_, peak)) in &self.done {
            out.push(
                Figure::new(
                    format!("{prefix}.{name}.cpu_s"),
                    cpu.get(name.as_str()).copied().unwrap_or(0.0),
                    "s",
                )
                .note("user+system CPU of the process(es) over the scenario, incl. start-up"),
            );
            out.push(Figure::new(
                format!("{prefix}.{name}.peak_rss_mib"),
                *peak,
                "MiB",
            ));
        }
        out
    }
}

/// Result of one fsync probe.
#[derive(Clone, Debug)]
pub struct FsyncProbe {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub n: u64,
}

impl FsyncProbe {
    pub fn describe(&self) -> String {
        format!(
            "fsync probe just before: p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            us(self.p50),
            us(self.p99),
            us(self.max)
        )
    }

    pub fn figures(&self, prefix: &str) -> Vec<Figure> {
        let note = "200 × (4 KiB write + fdatasync) on the agent data directory's filesystem";
        vec![
            Figure::new(format!("{prefix}.p50"), us(self.p50), "µs").note(note),
            Figure::new(format!("{prefix}.p99"), us(self.p99), "µs"),
            Figure::new(format!("{prefix}.max"), us(self.max), "µs"),
        ]
    }

    pub fn json(&self) -> Value {
        json!({"n": self.n, "p50_us": us(self.p50), "p99_us": us(self.p99), "max_us": us(self.max)})
    }
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// 200 × (4 KiB overwrite + `fdatasync`) in a scratch file in `dir` (bounded to 10 s).
pub fn fsync_probe(dir: &Path) -> std::io::Result<FsyncProbe> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("fsync-probe.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let block = vec![0x5au8; 4096];
    let mut h = Hist::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let result = (|| {
        for i in 0..200u64 {
            use std::io::Seek;
            f.seek(std::io::SeekFrom::Start((i % 16) * 4096))?;
            f.write_all(&block)?;
            let t = Instant::now();
            f.sync_data()?;
            h.record(t.elapsed());
            if Instant::now() > deadline {
                break;
            }
        }
        Ok::<(), std::io::Error>(())
    })();
    let _ = std::fs::remove_file(&path);
    result?;
    Ok(FsyncProbe {
        p50: h.quantile(0.5),
        p99: h.quantile(0.99),
        max: h.max(),
        n: h.count(),
    })
}

/// Cores, RAM, kernel and CPU model from `/proc`.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string());
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    json!({
        "loadavg_1_5_15": loadavg,
        "cores": cores,
        "cpu_model": model,
        "ram_gib": (mem_kb / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": kernel,
    })
}

/// `git rev-parse --short HEAD`, if git and a repository are there.
pub fn git_rev() -> Option<String> {
    let o = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Now as RFC 3339 UTC (seconds).
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
