//! `blocklab`: the operator and daemon binary. Each mechanism's subcommands live in
//! `harness::cli::<mechanism>`; this file only dispatches.

use clap::{Parser, Subcommand};
use harness::cli;

#[derive(Debug, Parser)]
#[command(
    name = "blocklab",
    version,
    propagate_version = true,
    about = "blocklab: control-plane mechanisms of a distributed block store",
    long_about = None
)]
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
    /// Log replication: run a replica, write through the primary, query status.
    #[command(subcommand)]
    Repl(cli::repl::ReplCmd),
    /// Format a device for a daemon (refuses foreign data unless --force; idempotent).
    Mkfs(cli::init::MkfsArgs),
    /// Print a device's blocklab label and whether it mounts.
    Inspect(cli::init::InspectArgs),
    /// Run or query the monitor.
    #[command(subcommand)]
    Monitor(cli::init::MonitorCmd),
    /// Run a node agent, or initialise a node's daemons directly.
    #[command(subcommand)]
    Node(cli::init::NodeCmd),
    /// Initialise the daemons of a set of node agents with a strategy.
    Init(cli::init::InitArgs),
    /// A private Ceph cluster to deploy BlueStore OSDs into: create, status, teardown.
    #[command(subcommand)]
    Ceph(cli::ceph::CephCmd),
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
    /// Forward TCP connections to an address with an injected one-way delay (and jitter),
    /// until SIGTERM/SIGINT. Prints `listening on ADDR`.
    Proxy(cli::proxy::ProxyArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Devices(c) => cli::devices::run(c),
        Command::Alloc(c) => cli::alloc::run(c),
        Command::Index(c) => cli::alloc::run_index(c),
        Command::Repl(c) => cli::repl::run(c),
        Command::Mkfs(a) => cli::init::mkfs(a),
        Command::Inspect(a) => cli::init::inspect(a),
        Command::Monitor(c) => cli::init::monitor(c),
        Command::Node(c) => cli::init::node(c),
        Command::Init(a) => cli::init::orchestrate(a),
        Command::Ceph(c) => cli::ceph::run(c),
        Command::Mgmt(c) => cli::failover::run_mgmt(c),
        Command::Volume(c) => cli::failover::run_volume(c),
        Command::Gateway(a) => cli::lunmap::run_gateway(*a),
        Command::Lunmap(c) => cli::lunmap::run(c),
        Command::Proxy(a) => cli::proxy::run(a),
    };
    harness::exit_on_error("blocklab", result)
}
