//! `blocklab`: the operator and daemon binary. Each mechanism's subcommands live in
//! `harness::cli::<mechanism>`; this file only dispatches.

use clap::{Parser, Subcommand};
use harness::cli;

#[derive(Debug, Parser)]
#[command(name = "blocklab", version, about = "blocklab: control-plane mechanisms of a distributed block store", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Provision, list and tear down loop devices backed by sparse files.
    #[command(subcommand)]
    Devices(cli::devices::DevicesCmd),
    /// Shared-memory block allocation: node processes of a storage node.
    #[command(subcommand)]
    Alloc(cli::alloc::AllocCmd),
    /// The index server of the block-allocation mechanism, and its client.
    #[command(subcommand)]
    Index(cli::alloc::IndexCmd),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Devices(c) => cli::devices::run(c),
        Command::Alloc(c) => cli::alloc::run(c),
        Command::Index(c) => cli::alloc::run_index(c),
    };
    harness::exit_on_error("blocklab", result)
}
