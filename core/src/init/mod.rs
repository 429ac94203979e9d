//! Daemon initialisation: node agents that format their devices and register the daemons
//! with the monitor, and the four orchestration strategies compared by `exp-init`.
//!
//! * `sequential`: per daemon, one id request, mkfs, register, report, then the next
//!   (`ceph-volume lvm batch` / `ceph osd new` one at a time);
//! * `parallel_nodes`: nodes in parallel, each node's daemons one by one (Rook, cephadm);
//! * `parallel_daemons`: nodes one by one, each node's daemons in parallel;
//! * `parallel`: the mechanism: one batch id request for every daemon of every node, then
//!   all nodes and all daemons in parallel, each result reported to the monitor;
//! * `parallel_nobatch`: everything in parallel, but each daemon requests its own id (the
//!   control that isolates the batch's own effect).
//!
//! Every daemon in flight has its own thread, its own io_uring engine and its own monitor
//! connection, so all of them are in flight at once however few cores there are.
//!
//! Running init again after a failure or an interruption resumes: daemons already `up`
//! are left alone, the others get their id back from the monitor and finish (mkfs of a
//! device formatted for the same daemon writes nothing). [`Strategy::lower_bound`] is
//! the least time a strategy can take (module `bound` has the derivation).

mod agent;
mod bound;
mod ceph;
mod error;
mod orchestrate;
mod remote;

pub use agent::{
    DaemonKey, DaemonOutcome, NodeAgent, NodeInfo, NodeInitRequest, NodeReport, StepTime,
};
pub use bound::BoundInput;
pub use ceph::{release_stranded, run_ceph, CephNodeAgent, DEFAULT_UP_TIMEOUT};
pub use error::{InitError, Result};
pub use orchestrate::{run, InitRun, Node};
pub use remote::{serve_node, NodeServer, RemoteNode, DEFAULT_INIT_TIMEOUT};

crate::names::named_enum! {
    /// How daemons are initialised.
    #[derive(serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Strategy("strategy") {
        Sequential,
        ParallelNodes,
        ParallelDaemons,
        Parallel,
        ParallelNobatch,
    }
}

impl Strategy {
    pub const ALL: [Strategy; 5] = [
        Strategy::Sequential,
        Strategy::ParallelNodes,
        Strategy::ParallelDaemons,
        Strategy::Parallel,
        Strategy::ParallelNobatch,
    ];

    /// Are a node's daemons initialised in parallel?
    pub fn parallel_daemons(self) -> bool {
        matches!(
            self,
            Strategy::ParallelDaemons | Strategy::Parallel | Strategy::ParallelNobatch
        )
    }

    /// Does the orchestrator request every id in one batch before the nodes start?
    pub fn batch(self) -> bool {
        matches!(self, Strategy::Parallel)
    }

    /// Are nodes initialised in parallel?
    pub fn parallel_nodes(self) -> bool {
        matches!(
            self,
            Strategy::ParallelNodes | Strategy::Parallel | Strategy::ParallelNobatch
        )
    }

    /// The least number of monitor proposals the strategy needs: every daemon needs three
    /// committed changes (id, registration, report) one after another, and changes only
    /// share a proposal when they are in flight together, so it is three per wave of the
    /// longest chain of daemons done one after another (see [`Strategy::lower_bound`]).
    pub fn min_proposals(self, nodes: u64, daemons_per_node: u64) -> u64 {
        3 * match self {
            Strategy::Sequential => nodes * daemons_per_node,
            Strategy::ParallelNodes => daemons_per_node,
            Strategy::ParallelDaemons => nodes,
            Strategy::Parallel | Strategy::ParallelNobatch => 1,
        }
    }
}
