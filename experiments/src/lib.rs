//! The experiment harness shared by every `exp-*` binary, and the subcommands of the
//! `blocklab` binary.
//!
//! * [`args`]: the common clap arguments (`--profile`, `--out`, device selection,
//!   `--repetitions`) and the one size and one duration parser every CLI argument uses.
//! * [`child`]: child processes that announce their address (`listening on ADDR`).
//! * [`devices`]: device set-up and teardown (provisioned loop devices are torn down on
//!   every exit path, Ctrl-C included).
//! * [`etcd`]: an etcd reference cluster (members behind delay proxies) and its
//!   follower apply-lag measurement, for exp-commit.
//! * [`fio`]: fio's JSON output.
//! * [`output`]: one CSV per run (csv + serde), its `meta.json`, and the raw data beside
//!   it (`<experiment>-hist.csv`: latency histograms; fio JSON files).
//! * [`stats`]: hdrhistogram percentiles (p50/p90/p99/p999/max) and the histograms as
//!   text (V2 deflate, base64).
//! * [`progress`]: progress bars for runs longer than a few seconds.
//! * [`repl_cluster`]: a replication cluster of `blocklab repl serve` processes behind
//!   delay proxies, with their timelines.

pub mod args;
pub mod child;
pub mod cli;
pub mod devices;
pub mod etcd;
pub mod fio;
pub mod output;
pub mod progress;
pub mod repl_cluster;
pub mod stats;

pub use args::{CommonArgs, Profile};

/// The `blocklab` binary the experiments run as child processes: `given` if set, else the
/// one next to the running executable (the same target directory and profile; `../` for
/// test executables in `deps/`).
pub fn blocklab_bin(given: Option<&std::path::Path>) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    if let Some(p) = given {
        anyhow::ensure!(p.exists(), "{}: no such blocklab binary", p.display());
        return Ok(p.to_path_buf());
    }
    let me = std::env::current_exe().context("locating the running executable")?;
    let dir = me.parent().context("executable has no directory")?;
    [dir.join("blocklab"), dir.join("../blocklab")]
        .into_iter()
        .find(|c| c.exists())
        .with_context(|| {
            format!(
                "no `blocklab` binary next to {} (build it: cargo build --release -p blocklab-experiments --bins, the same profile as this binary)",
                me.display()
            )
        })
}

/// Runs a binary's real main and turns an error into one line on stderr (the whole
/// context chain, no backtrace) and exit status 1. After Ctrl-C it waits for the handler's
/// cleanup and exit (status 130) instead: an error then is most likely the handler having
/// torn the devices down under the run.
pub fn exit_on_error(name: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    devices::await_interrupt();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
pub use devices::DeviceSet;
pub use output::{CpuTimes, CsvOut, HistOut, RunMeta};
pub use stats::{LatencyHist, Percentiles};
