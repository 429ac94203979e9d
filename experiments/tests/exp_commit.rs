//! exp-commit end to end with tiny settings on regular files: the documented CSV, and the
//! per-write samples of `--samples`, which must show no secondary applying a write before
//! it was committed, before the secondary learned so, or before it had the write durable.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use blocklab::testing::{scratch, KillOnDrop};

const COLUMNS: &str = "policy,param_ms,workload,rate_per_s,replicas,rtt_ms,backing,repetition,writes,achieved_per_s,apply_lag_p50_us,apply_lag_p99_us,apply_lag_p999_us,apply_lag_max_us,commit_lag_p99_us,empty_messages,empty_responses,extra_messages_per_write,log_flushes,write_p50_us,write_p99_us,violations";

type Record = std::collections::HashMap<String, String>;

fn read_csv(path: &std::path::Path) -> (Vec<String>, Vec<Record>) {
    let mut r =
        csv::Reader::from_path(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let header = r.headers().unwrap().iter().map(str::to_string).collect();
    let rows = r.deserialize().map(Result::unwrap).collect();
    (header, rows)
}

fn num(r: &Record, k: &str) -> i64 {
    r[k].parse().unwrap_or_else(|e| panic!("{k}={}: {e}", r[k]))
}

/// A histogram of exp-commit-hist.csv's `hdr` column.
fn decode(text: &str) -> hdrhistogram::Histogram<u64> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap();
    hdrhistogram::serialization::Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .unwrap()
}

#[test]
fn writes_rows_histograms_and_kill_checks_from_replica_processes() {
    let files = scratch();
    let out = scratch();
    let stderr_path = files.path().join("stderr");
    let mut child = KillOnDrop::spawn(
        Command::new(env!("CARGO_BIN_EXE_exp-commit"))
            .arg("--files")
            .arg(files.path())
            .args([
                "--policies",
                "eager,idle_ack",
                "--workloads",
                "poisson,bursty",
                "--rates",
                "100",
                "--poisson-duration",
                "50ms",
                "--rtt",
                "1ms",
                "--bursts",
                "2",
                "--burst",
                "3",
                "--gap",
                "30ms",
                "--repetitions",
                "1",
                "--etcd-rtt",
                "none",
                "--kills",
                "primary_before_notify",
                "--out",
            ])
            .arg(out.path())
            .stdout(Stdio::null())
            // A file, not a pipe: a child blocked on a full pipe would look hung.
            .stderr(std::fs::File::create(&stderr_path).expect("creating the stderr file")),
    );
    // A hung replica (a deadlock, a lost wake-up) fails the test instead of hanging it.
    let status = child.wait_exit("exp-commit to finish", Duration::from_secs(300));
    let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(status.success(), "exp-commit failed: {err}");
    let (header, rows) = read_csv(&out.path().join("exp-commit.csv"));
    assert_eq!(header.join(","), COLUMNS);
    assert_eq!(rows.len(), 4, "2 policies x 2 workloads");
    let mut seen = BTreeSet::new();
    for r in &rows {
        let writes = if r["workload"] == "poisson" { 5 } else { 6 };
        assert_eq!(num(r, "writes"), writes, "{r:?}");
        // No group commit: one flush per write per replica, whatever the policy.
        assert_eq!(num(r, "log_flushes"), 3 * writes, "{r:?}");
        assert_eq!(num(r, "violations"), 0, "{r:?}");
        assert_eq!(r["backing"], "disk");
        seen.insert((r["policy"].clone(), r["workload"].clone()));
    }
    assert_eq!(seen.len(), 4);
    // Each row's histograms: apply and commit lag of every write at both secondaries, and
    // the write latency of every write; the row's percentiles are theirs.
    let (header, hists) = read_csv(&out.path().join("exp-commit-hist.csv"));
    assert_eq!(
        header.join(","),
        "policy,param_ms,workload,rate_per_s,replicas,rtt_ms,backing,repetition,metric,hdr"
    );
    assert_eq!(hists.len(), 4 * 3, "3 metrics per row");
    for r in &rows {
        let h = |metric: &str| {
            let keys = [
                "policy",
                "param_ms",
                "workload",
                "rate_per_s",
                "replicas",
                "rtt_ms",
            ];
            let h = hists
                .iter()
                .find(|h| h["metric"] == metric && keys.iter().all(|k| h[*k] == r[*k]))
                .unwrap_or_else(|| panic!("no {metric} histogram for {r:?}"));
            decode(&h["hdr"])
        };
        let writes = num(r, "writes") as u64;
        let apply = h("apply_lag_us");
        assert_eq!(apply.len(), 2 * writes, "{r:?}");
        assert_eq!(
            apply.value_at_quantile(0.99) as i64,
            num(r, "apply_lag_p99_us")
        );
        assert_eq!(h("commit_lag_us").len(), 2 * writes, "{r:?}");
        let write = h("write_us");
        assert_eq!(write.len(), writes, "{r:?}");
        assert_eq!(write.value_at_quantile(0.5) as i64, num(r, "write_p50_us"));
    }
    let (header, kills) = read_csv(&out.path().join("exp-commit-kills.csv"));
    assert_eq!(
        header.join(","),
        "scenario,policy,replicas,repetition,window_hit,applied_uncommitted,not_converged,diverged,violations"
    );
    assert_eq!(kills.len(), 1);
    assert_eq!(kills[0]["scenario"], "primary_before_notify");
    assert_eq!(kills[0]["window_hit"], "true", "{:?}", kills[0]);
    assert_eq!(num(&kills[0], "violations"), 0, "{:?}", kills[0]);
}
