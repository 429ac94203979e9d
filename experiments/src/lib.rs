//! The experiment harness shared by every `exp-*` binary, and the subcommands of the
//! `blocklab` binary.
//!
//! * [`args`]: the common clap arguments (`--profile`, `--out`, device selection,
//!   `--repetitions`) and size parsing.
//! * [`devices`]: device set-up and teardown (provisioned loop devices are torn down on
//!   every exit path, Ctrl-C included).
//! * [`output`]: one CSV per run (csv + serde) and its `meta.json`.
//! * [`stats`]: hdrhistogram percentiles (p50/p90/p99/p999/max).
//! * [`progress`]: progress bars for runs longer than a few seconds.

pub mod args;
pub mod cli;
pub mod devices;
pub mod output;
pub mod progress;
pub mod stats;

pub use args::{CommonArgs, Profile};

/// Runs a binary's real main and turns an error into one line on stderr (the whole
/// context chain, no backtrace) and exit status 1.
pub fn exit_on_error(name: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
pub use devices::DeviceSet;
pub use output::{CsvOut, RunMeta};
pub use stats::{LatencyHist, Percentiles};
