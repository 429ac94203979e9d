//! One CSV per experiment run, its `meta.json` sidecar, and the raw data kept beside the
//! CSV (latency histograms, fio's JSON).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;

use crate::stats::LatencyHist;

/// Creates `dir` and refuses to replace an existing file there unless `overwrite`.
fn new_file(dir: &Path, name: &str, overwrite: bool) -> anyhow::Result<(PathBuf, File)> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating output directory {}", dir.display()))?;
    let path = dir.join(name);
    // create_new: the check and the creation are one step, so a file that appears in
    // between is not replaced.
    let mut opts = OpenOptions::new();
    opts.write(true);
    if overwrite {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    match opts.open(&path) {
        Ok(f) => Ok((path, f)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(anyhow::anyhow!(
            "{} already exists; choose another --out or pass --overwrite",
            path.display()
        )),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// A CSV file whose columns are the fields of `T` (snake_case, units in the names).
/// Every row is flushed, so an interrupted run keeps what it measured.
#[derive(Debug)]
pub struct CsvOut<T: Serialize> {
    path: PathBuf,
    w: csv::Writer<File>,
    rows: u64,
    _t: std::marker::PhantomData<T>,
}

impl<T: Serialize> CsvOut<T> {
    pub fn create(dir: &Path, name: &str, overwrite: bool) -> anyhow::Result<CsvOut<T>> {
        let (path, f) = new_file(dir, name, overwrite)?;
        Ok(CsvOut {
            path,
            w: csv::Writer::from_writer(f),
            rows: 0,
            _t: std::marker::PhantomData,
        })
    }
    /// Writes one row and flushes it (a run's row survives an interrupted experiment).
    pub fn write(&mut self, row: &T) -> anyhow::Result<()> {
        self.write_all(std::slice::from_ref(row))
    }
    /// Writes rows and flushes once.
    pub fn write_all(&mut self, rows: &[T]) -> anyhow::Result<()> {
        for row in rows {
            self.w
                .serialize(row)
                .with_context(|| format!("writing {}", self.path.display()))?;
        }
        self.w
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.rows += rows.len() as u64;
        Ok(())
    }
    pub fn rows(&self) -> u64 {
        self.rows
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes `bytes` to `dir/name` (creating `dir`), refusing to replace an existing file
/// unless `overwrite`: raw output kept beside the CSV as it was produced (fio's JSON).
pub fn write_raw(dir: &Path, name: &str, bytes: &[u8], overwrite: bool) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    let (path, mut f) = new_file(dir, name, overwrite)?;
    f.write_all(bytes)
        .and_then(|()| f.flush())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The histogram columns of a `<experiment>-hist.csv` row.
#[derive(Debug, Serialize)]
pub struct HistCols {
    /// What was measured, with the unit in the name (`apply_lag_us`, `alloc_ns`).
    metric: &'static str,
    /// The histogram: [`LatencyHist::to_v2_base64`].
    hdr: String,
}

/// `<experiment>-hist.csv` beside the experiment's CSV: the latency histograms of every
/// (configuration, repetition), one row per metric. The columns are the fields of `K` (the
/// configuration columns of the main CSV's row, `repetition` included), then `metric` and
/// `hdr` (HdrHistogram V2 deflate, base64), so percentiles can be taken from histograms
/// merged across repetitions. Every row is flushed, like [`CsvOut`]'s.
#[derive(Debug)]
pub struct HistOut<K: Serialize> {
    csv: CsvOut<(K, HistCols)>,
}

impl<K: Serialize + Clone> HistOut<K> {
    /// Creates `dir/<experiment>-hist.csv` (refusing to replace it unless `overwrite`).
    pub fn create(dir: &Path, experiment: &str, overwrite: bool) -> anyhow::Result<HistOut<K>> {
        Ok(HistOut {
            csv: CsvOut::create(dir, &format!("{experiment}-hist.csv"), overwrite)?,
        })
    }
    /// Writes one row per `(metric, histogram)` of configuration `key`, and flushes.
    pub fn write(&mut self, key: &K, hists: &[(&'static str, &LatencyHist)]) -> anyhow::Result<()> {
        let rows = hists
            .iter()
            .map(|&(metric, h)| {
                let hdr = h
                    .to_v2_base64()
                    .with_context(|| format!("encoding the {metric} histogram"))?;
                Ok((key.clone(), HistCols { metric, hdr }))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.csv.write_all(&rows)
    }
    pub fn path(&self) -> &Path {
        self.csv.path()
    }
}

/// The `meta.json` of a run: where and how it ran.
#[derive(Debug, Clone, Serialize)]
pub struct RunMeta {
    pub experiment: String,
    pub run_id: String,
    pub profile: String,
    pub git_revision: String,
    /// Whether the tracked files matched `git_revision` (`git status --porcelain
    /// --untracked-files=no` printed nothing); false when git could not tell.
    pub clean: bool,
    pub kernel: String,
    pub cpu_count: usize,
    /// `model name` of `/proc/cpuinfo`.
    pub cpu_model: Option<String>,
    /// `MemTotal` of `/proc/meminfo`, in bytes.
    pub memory_bytes: Option<u64>,
    /// The compiler the binary was built with (`rustc -V` at build time).
    pub rustc: String,
    /// `fio --version`, `null` when fio is not installed.
    pub fio: Option<String>,
    /// The version of Debian's `zookeeper` package, `null` when it is not installed.
    pub zookeeper: Option<String>,
    pub command_line: Vec<String>,
    pub start_utc: String,
    pub end_utc: Option<String>,
    pub devices: serde_json::Value,
    /// Share of the CPU time between start and end that the hypervisor gave to others
    /// (`steal` in `/proc/stat`), in percent: on a virtual machine the main source of
    /// multi-millisecond stalls, which decide tail latencies. `null` where not available.
    pub cpu_steal_percent: Option<f64>,
    /// Experiment-specific settings and measurements of the run.
    pub extra: serde_json::Value,
    #[serde(skip)]
    cpu_at_start: Option<CpuTimes>,
}

/// Aggregate CPU time counters of `/proc/stat` (in clock ticks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    pub total: u64,
    pub steal: u64,
}

impl CpuTimes {
    /// Reads the aggregate `cpu` line of `/proc/stat`.
    pub fn now() -> Option<CpuTimes> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }
    /// Parses the aggregate `cpu` line (user nice system idle iowait irq softirq steal
    /// …; guest time is already counted in user and nice, so it is left out of the total).
    pub fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        let steal = *v.get(7)?;
        Some(CpuTimes {
            total: v.iter().take(8).sum(),
            steal,
        })
    }
    /// Steal from `start` until now, in percent of all CPU time in between.
    pub fn steal_percent_since(start: Option<CpuTimes>) -> Option<f64> {
        start?.steal_percent_until(&CpuTimes::now()?)
    }
    /// Steal between `self` and `later`, in percent of all CPU time in between.
    pub fn steal_percent_until(&self, later: &CpuTimes) -> Option<f64> {
        let total = later.total.checked_sub(self.total)?;
        let steal = later.steal.checked_sub(self.steal)?;
        (total > 0).then(|| (steal as f64 * 10_000.0 / total as f64).round() / 100.0)
    }
}

impl RunMeta {
    /// Starts the record of a run now.
    pub fn start(experiment: &str, profile: impl std::fmt::Display) -> RunMeta {
        RunMeta {
            experiment: experiment.to_string(),
            run_id: uuid::Uuid::new_v4().to_string(),
            profile: profile.to_string(),
            git_revision: git_revision(),
            clean: git_clean(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            cpu_count: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|s| cpu_model(&s)),
            memory_bytes: std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|s| mem_total_bytes(&s)),
            rustc: env!("BLOCKLAB_RUSTC_VERSION").to_string(),
            fio: stdout_of("fio", &["--version"]).filter(|s| !s.is_empty()),
            zookeeper: stdout_of("dpkg-query", &["-W", "-f=${Version}", "zookeeper"])
                .filter(|s| !s.is_empty()),
            command_line: std::env::args().collect(),
            start_utc: utc_now(),
            end_utc: None,
            devices: serde_json::Value::Null,
            cpu_steal_percent: None,
            extra: serde_json::json!({}),
            cpu_at_start: CpuTimes::now(),
        }
    }
    /// Stamps the end time and writes `dir/<experiment>.meta.json`.
    pub fn finish(&mut self, dir: &Path, overwrite: bool) -> anyhow::Result<PathBuf> {
        self.end_utc = Some(utc_now());
        self.cpu_steal_percent = CpuTimes::steal_percent_since(self.cpu_at_start);
        let (path, f) = new_file(dir, &format!("{}.meta.json", self.experiment), overwrite)?;
        serde_json::to_writer_pretty(f, self)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// The trimmed standard output of `program args`, if it ran and exited with success.
fn stdout_of(program: &str, args: &[&str]) -> Option<String> {
    std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// The first `model name` of a `/proc/cpuinfo` text.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name").then(|| v.trim().to_string())
    })
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
pub fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut it = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// Whether git reports no changes to tracked files; false when git cannot tell (not
/// installed, not a repository).
pub fn git_clean() -> bool {
    stdout_of("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| s.is_empty())
}

/// `git rev-parse HEAD` (with `-dirty` when the tree has changes), or `unknown`.
pub fn git_revision() -> String {
    let run = |args: &[&str]| stdout_of("git", args);
    match run(&["rev-parse", "HEAD"]) {
        Some(rev) if !rev.is_empty() => {
            let dirty = run(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{rev}-dirty")
            } else {
                rev
            }
        }
        _ => "unknown".into(),
    }
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_utc(secs)
}

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian).
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize)]
    struct Row {
        tool: &'static str,
        iops: f64,
    }

    #[test]
    fn csv_has_the_struct_columns_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = CsvOut::<Row>::create(dir.path(), "x.csv", false).unwrap();
        out.write(&Row {
            tool: "fio",
            iops: 1.5,
        })
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join("x.csv")).unwrap();
        assert_eq!(text, "tool,iops\nfio,1.5\n");
        let err = CsvOut::<Row>::create(dir.path(), "x.csv", false).unwrap_err();
        assert!(err.to_string().contains("already exists"));
        // --overwrite replaces the file (truncated, not appended to).
        let mut out = CsvOut::<Row>::create(dir.path(), "x.csv", true).unwrap();
        out.write(&Row {
            tool: "blocklab",
            iops: 2.0,
        })
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join("x.csv")).unwrap();
        assert_eq!(text, "tool,iops\nblocklab,2.0\n");
    }

    #[test]
    fn meta_json_parses() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = RunMeta::start("exp-test", "quick");
        let p = m.finish(dir.path(), false).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        for key in [
            "git_revision",
            "kernel",
            "cpu_count",
            "command_line",
            "start_utc",
            "end_utc",
            "devices",
            "run_id",
            "cpu_steal_percent",
            "profile",
            "cpu_model",
            "memory_bytes",
            "rustc",
            "fio",
            "zookeeper",
            "clean",
        ] {
            assert!(v.get(key).is_some(), "meta.json lacks {key}");
        }
        assert!(v["clean"].is_boolean());
        assert!(v["rustc"].as_str().unwrap().starts_with("rustc "), "{v}");
    }

    #[test]
    fn cpu_model_and_memory_from_proc() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nprocessor\t: 1\nmodel name\t: other\n";
        assert_eq!(
            cpu_model(cpuinfo).as_deref(),
            Some("Intel(R) Xeon(R) CPU @ 2.20GHz")
        );
        assert_eq!(cpu_model("processor\t: 0\n"), None);
        let meminfo = "MemTotal:        8141252 kB\nMemFree:          123 kB\n";
        assert_eq!(mem_total_bytes(meminfo), Some(8_141_252 * 1024));
        assert_eq!(mem_total_bytes("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total_bytes("MemTotal: x kB\n"), None);
    }

    #[derive(Debug, Clone, Serialize)]
    struct Key {
        policy: &'static str,
        repetition: u32,
    }

    #[test]
    fn hist_csv_has_the_key_columns_then_metric_and_hdr() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = HistOut::<Key>::create(dir.path(), "exp-test", false).unwrap();
        let mut h = LatencyHist::new();
        h.record(7);
        let key = Key {
            policy: "idle",
            repetition: 2,
        };
        out.write(
            &key,
            &[("apply_lag_us", &h), ("write_us", &LatencyHist::new())],
        )
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join("exp-test-hist.csv")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "policy,repetition,metric,hdr");
        assert_eq!(lines.len(), 3);
        let want = format!("idle,2,apply_lag_us,{}", h.to_v2_base64().unwrap());
        assert_eq!(lines[1], want);
        assert!(lines[2].starts_with("idle,2,write_us,HISTFAAA"));
        assert!(HistOut::<Key>::create(dir.path(), "exp-test", false).is_err());
    }

    #[test]
    fn raw_files_refuse_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("exp-io-fio");
        let p = write_raw(&sub, "a.json", b"{\"x\": 1}\n", false).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"x\": 1}\n");
        let err = write_raw(&sub, "a.json", b"{}", false).unwrap_err();
        assert!(err.to_string().contains("already exists"));
        write_raw(&sub, "a.json", b"{}", true).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{}");
    }

    #[test]
    fn steal_share_from_proc_stat() {
        let a = CpuTimes::parse("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!(
            a,
            CpuTimes {
                total: 1000,
                steal: 35
            }
        );
        let b = CpuTimes::parse("cpu  200 0 100 1500 20 0 10 170 7 0\n").unwrap();
        assert_eq!(a.steal_percent_until(&b), Some(13.5));
        assert_eq!(b.steal_percent_until(&a), None);
        assert_eq!(a.steal_percent_until(&a), None);
        assert_eq!(CpuTimes::parse("intr 5\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 2 3\n"), None);
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_305_600), "2026-11-22T00:00:00Z");
    }
}
