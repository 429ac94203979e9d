//! Crash recovery: pause the node, wait until no live process is inside an allocator
//! operation, return a dead process's in-flight blocks and rebuild every device's free
//! structure from the per-block state words.
//!
//! Rebuilding from the state words (rather than patching the free structure) also repairs
//! the narrow windows inside an operation: a block claimed by a process that died before
//! marking it is `Free` but taken in the bitmap; a block freed by a process that died
//! before releasing it likewise. Both are put back by the rebuild.
//!
//! Lock order: the unfilled-table lock first, then the pause flag. Processes never take
//! the table lock while inside an operation, so this cannot deadlock.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::node::Attached;
use super::segs::{BlockRef, BlockState, ProcSeg, Unfilled};
use super::shm_lock::LockGuard;
use super::{pid_alive, AllocError, UNIT};

/// How long recovery waits for live processes to leave their operations.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

/// The node paused, the unfilled table locked, every live process outside operations.
/// Dropping it resumes the node.
pub struct Quiesced<'a> {
    at: &'a Attached,
    _table: LockGuard<'a>,
}

impl std::fmt::Debug for Quiesced<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Quiesced")
    }
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        self.at.node.paused().store(0, Ordering::SeqCst);
    }
}

/// Pauses the node and waits until every live process's busy flag is clear.
pub fn quiesce(at: &Attached) -> Result<Quiesced<'_>, AllocError> {
    let table = at.unfilled.lock()?;
    at.node.paused().store(1, Ordering::SeqCst);
    let q = Quiesced { at, _table: table };
    if at.asym {
        // The slow half of the asymmetric fence (see `allocator::enter`).
        rustix::thread::membarrier(rustix::thread::MembarrierCommand::Global).map_err(|e| {
            AllocError::Lock {
                op: "membarrier(MEMBARRIER_CMD_GLOBAL)",
                source: e.into(),
            }
        })?;
    }
    let deadline = Instant::now() + QUIESCE_TIMEOUT;
    for (path, rec) in at.proc_records()? {
        loop {
            let pid = rec.pid().load(Ordering::Acquire) as u32;
            if rec.busy().load(Ordering::SeqCst) == 0 || !pid_alive(pid) {
                break;
            }
            if Instant::now() > deadline {
                return Err(AllocError::Timeout(format!(
                    "process record {} (pid {pid}) stayed busy for {QUIESCE_TIMEOUT:?}",
                    path.display()
                )));
            }
            std::thread::yield_now();
        }
    }
    Ok(q)
}

/// What recovery did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// In-flight blocks of the dead process put back as free.
    pub freed: Vec<BlockRef>,
    /// Partly filled blocks it was appending to, returned to the unfilled table with
    /// their previously acknowledged contents.
    pub returned_unfilled: Vec<BlockRef>,
    /// Free blocks that were off the free structure (rebuild found them).
    pub rebuilt_free: u64,
}

/// Recovers process `dead_id` (whose process is gone): its in-flight blocks go back, and
/// the free structures are rebuilt.
pub fn recover_process(at: &Attached, dead: &ProcSeg) -> Result<Recovered, AllocError> {
    let dead_id = dead.proc_id();
    let q = quiesce(at)?;
    let mut out = Recovered::default();
    for d in at.attached_devices() {
        let units = (d.block_size() / UNIT) as u32;
        let before = d.free_members().len() as u64;
        for b in 0..d.block_count() {
            if let BlockState::InFlight { owner, prior_units } = d.load_state(b) {
                if owner != dead_id {
                    continue;
                }
                let r = BlockRef {
                    dev: d.index(),
                    block: b,
                };
                at.unfilled.remove_where(|u| u.block == r);
                if prior_units > 0 {
                    d.set_state(
                        b,
                        BlockState::Filled {
                            used_units: prior_units,
                        },
                    );
                    if prior_units < units {
                        at.unfilled.put(Unfilled {
                            block: r,
                            used_units: prior_units,
                        });
                    }
                    out.returned_unfilled.push(r);
                } else {
                    d.set_state(b, BlockState::Free);
                    out.freed.push(r);
                }
            }
        }
        if d.is_online() {
            d.rebuild_free();
        }
        let after = d.free_members().len() as u64;
        let freed_here = out.freed.iter().filter(|r| r.dev == d.index()).count() as u64;
        out.rebuilt_free += after.saturating_sub(before + freed_here);
    }
    let n = (out.freed.len() + out.returned_unfilled.len()) as u64;
    if n > 0 {
        dead.recovered().fetch_add(n, Ordering::AcqRel);
        if let Some(b) = out.freed.iter().chain(&out.returned_unfilled).last() {
            dead.last_recovered().store(b.pack(), Ordering::Release);
        }
    }
    dead.current().store(0, Ordering::Release);
    dead.busy().store(0, Ordering::Release);
    drop(q);
    Ok(out)
}

/// Recovers every process record whose process is dead (a new leader's first act).
pub fn recover_dead(at: &Attached) -> Result<Vec<(u16, Recovered)>, AllocError> {
    let mut out = Vec::new();
    for (_, rec) in at.proc_records()? {
        let pid = rec.pid().load(Ordering::Acquire) as u32;
        if pid != 0 && !pid_alive(pid) {
            out.push((rec.proc_id(), recover_process(at, &rec)?));
            rec.pid().store(0, Ordering::Release);
        }
    }
    Ok(out)
}
