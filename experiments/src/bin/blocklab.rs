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
    /// Management nodes (task dispatcher + VIP) and the block service they act on.
    #[command(subcommand)]
    Mgmt(cli::failover::MgmtCmd),
    /// The management client: create, delete, copy, list volumes through the VIP.
    Volume(cli::failover::VolumeArgs),
    /// Serve block I/O of LUNs to the initiators the live LUN map allows.
    Gateway(Box<cli::lunmap::GatewayArgs>),
    /// Edit and inspect the LUN map (LUN -> target -> initiators).
    #[command(subcommand)]
    Lunmap(cli::lunmap::LunmapCmd),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Devices(c) => cli::devices::run(c),
        Command::Mgmt(c) => cli::failover::run_mgmt(c),
        Command::Volume(c) => cli::failover::run_volume(c),
        Command::Gateway(a) => cli::lunmap::run_gateway(*a),
        Command::Lunmap(c) => cli::lunmap::run(c),
    };
    harness::exit_on_error("blocklab", result)
}
