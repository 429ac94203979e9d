//! `blocklab devices provision|list|teardown`.

use std::path::PathBuf;

use anyhow::Context;
use blocklab::dev::provision::{self, TeardownOutcome, DEFAULT_STATE_DIR};
use blocklab::dev::DevError;
use clap::Subcommand;

use crate::args::parse_size;

#[derive(Debug, Subcommand)]
pub enum DevicesCmd {
    /// Create N sparse files and attach each to a free loop device with direct I/O (root).
    Provision {
        /// How many devices.
        #[arg(long, short = 'n')]
        count: usize,
        /// Size of each device: bytes, or with a K/M/G/T suffix (powers of 1024), 4 KiB aligned.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Name of the set (a directory under the state directory).
        #[arg(long, default_value = "default")]
        set: String,
        /// Where backing files and the record of what was attached live.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// List provisioned sets and whether each device is still attached.
    List {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Detach exactly the loop devices of a set and delete their backing files.
    Teardown {
        #[arg(long, default_value = "default")]
        set: String,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

pub fn run(cmd: DevicesCmd) -> anyhow::Result<()> {
    match cmd {
        DevicesCmd::Provision {
            count,
            size,
            set,
            state_dir,
        } => {
            let st = provision::provision(&state_dir, &set, count, size)
                .map_err(|e| match e {
                    DevError::NotRoot { .. } => anyhow::anyhow!("{e}: run it as root"),
                    e => e.into(),
                })
                .with_context(|| format!("provisioning set {set:?}"))?;
            for d in &st.devices {
                println!(
                    "{}\t{}\t{} bytes\tdirect_io={}",
                    device_name(d),
                    d.backing_file.display(),
                    d.size_bytes,
                    d.direct_io
                );
            }
        }
        DevicesCmd::List { state_dir } => {
            let sets = provision::list_sets(&state_dir)?;
            if sets.is_empty() {
                println!("no provisioned sets under {}", state_dir.display());
            }
            for s in sets {
                for d in &s.devices {
                    let state = match provision::is_attached(d) {
                        Ok(true) => "attached".to_string(),
                        Ok(false) => "not attached".to_string(),
                        Err(DevError::Os { cause: source, .. })
                            if source.kind() == std::io::ErrorKind::PermissionDenied =>
                        {
                            "unknown (needs root)".to_string()
                        }
                        Err(e) => format!("unknown ({e})"),
                    };
                    println!(
                        "{}\t{}\t{}\t{} bytes\t{state}",
                        s.set,
                        device_name(d),
                        d.backing_file.display(),
                        d.size_bytes
                    );
                }
            }
        }
        DevicesCmd::Teardown { set, state_dir } => {
            for (d, outcome) in provision::teardown(&state_dir, &set)
                .with_context(|| format!("tearing down set {set:?}"))?
            {
                let what = match outcome {
                    TeardownOutcome::Detached => "detached".to_string(),
                    TeardownOutcome::DetachPending => "detach pending (still open elsewhere; the kernel detaches it when the last user closes it)".to_string(),
                    TeardownOutcome::WasNotAttached => "was not attached".to_string(),
                    TeardownOutcome::LeftAlone { reason } => format!("left alone ({reason})"),
                };
                println!(
                    "{}: {what}; {} deleted",
                    device_name(&d),
                    d.backing_file.display()
                );
            }
        }
    }
    Ok(())
}

/// `/dev/loopN`, or a note for a backing file recorded before its attach finished.
fn device_name(d: &provision::LoopDevice) -> String {
    match &d.device {
        Some(p) => p.display().to_string(),
        None => "(no loop device recorded)".to_string(),
    }
}
