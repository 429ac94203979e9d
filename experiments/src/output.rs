//! One CSV per experiment run and its `meta.json` sidecar.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;

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

/// The `meta.json` of a run: where and how it ran.
#[derive(Debug, Clone, Serialize)]
pub struct RunMeta {
    pub experiment: String,
    pub run_id: String,
    pub profile: String,
    pub git_revision: String,
    pub kernel: String,
    pub cpu_count: usize,
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
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            cpu_count: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
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

/// `git rev-parse HEAD` (with `-dirty` when the tree has changes), or `unknown`.
pub fn git_revision() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
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
        ] {
            assert!(v.get(key).is_some(), "meta.json lacks {key}");
        }
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
