//! `blocklab devices provision|list|teardown`.

use std::path::PathBuf;

use anyhow::Context;
use blocklab::dev::provision::{self, TeardownOutcome, DEFAULT_STATE_DIR};
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
                .with_context(|| format!("provisioning set {set:?}"))?;
            for d in &st.devices {
                println!(
                    "{}\t{}\t{} bytes\tdirect_io={}",
                    d.device.display(),
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
                    let state = if provision::is_attached(d) {
                        "attached"
                    } else {
                        "not attached"
                    };
                    println!(
                        "{}\t{}\t{}\t{} bytes\t{state}",
                        s.set,
                        d.device.display(),
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
                match outcome {
                    TeardownOutcome::Detached => println!(
                        "{}: detached, {} deleted",
                        d.device.display(),
                        d.backing_file.display()
                    ),
                    TeardownOutcome::WasNotAttached => println!(
                        "{}: was not attached; {} deleted",
                        d.device.display(),
                        d.backing_file.display()
                    ),
                    TeardownOutcome::LeftAlone { reason } => println!(
                        "{}: left alone ({reason}); {} deleted",
                        d.device.display(),
                        d.backing_file.display()
                    ),
                }
            }
        }
    }
    Ok(())
}
