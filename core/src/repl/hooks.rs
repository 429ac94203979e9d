//! [`Hooks`]: in-process observers of (and a workload inside) the replica loop.

use std::time::Instant;

use super::protocol::{Entry, NodeId, Stats};

/// In-process hooks into the replica loop (all optional).
pub trait Hooks: Send {
    /// Primary: payloads to propose now; returns when to be asked again.
    fn poll(&mut self, _now: Instant, _propose: &mut Vec<Vec<u8>>) -> Option<Instant> {
        None
    }
    /// Primary: a proposal was appended at `index`.
    fn proposed(&mut self, _index: u64, _now: Instant) {}
    /// The commit index advanced to `commit` (on a secondary: the commit it learned).
    fn committed(&mut self, _commit: u64, _now: Instant) {}
    /// Entries were applied to the storage engine.
    fn applied(&mut self, _entries: &[Entry], _now: Instant) {}
    /// Entries `first..=last` were appended to the log with one durable write (one call per
    /// write the log reports, in index order: one per batch with group commit, one per
    /// entry without); `flushes` is the log's flush count since start, this one included.
    fn persisted(&mut self, _first: u64, _last: u64, _flushes: u64) {}
    /// Primary: the connection to secondary `peer` is up (handshake done).
    fn peer_connected(&mut self, _peer: NodeId) {}
    /// The loop handled everything pending; the node's counters.
    fn loop_done(&mut self, _stats: &Stats) {}
}

/// No hooks.
#[derive(Debug, Default)]
pub struct NoHooks;
impl Hooks for NoHooks {}
