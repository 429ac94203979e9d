//! Crash recovery: pause the node, wait until no live process is inside an allocator
//! operation, return in-flight blocks nobody will finish and rebuild every device's free
//! structure from the per-block state words.
//!
//! Rebuilding from the state words (rather than patching the free structure) also repairs
//! the narrow windows inside an operation: a block claimed by a process that died before
//! marking it is `Free` but taken in the bitmap; a block freed by a process that died
//! before releasing it likewise. Both are put back by the rebuild.
//!
//! A process is alive while it holds the owner lock of its record
//! ([`ProcSeg::owner_alive`]); recovery never trusts a pid.
//!
//! Lock order: the unfilled-table lock first, then the pause flag. Processes never take
//! the table lock while inside an operation, so this cannot deadlock.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::attached::Attached;
use super::segs::{BlockRef, BlockState, ProcSeg, Unfilled};
use super::shm_lock::LockGuard;
use super::{AllocError, UNIT};

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
                cause: e.into(),
            }
        })?;
    }
    // Every device segment, even one whose creator died before announcing it.
    at.rescan_devices()?;
    let deadline = Instant::now() + QUIESCE_TIMEOUT;
    let mut busy = at.proc_records()?;
    let mut nap = Duration::from_micros(20);
    loop {
        // A busy flag left set by a dead process does not count.
        let mut still = Vec::new();
        for (path, rec) in busy {
            if rec.busy().load(Ordering::SeqCst) != 0 && ProcSeg::owner_alive(&path)? {
                still.push((path, rec));
            }
        }
        busy = still;
        let Some((path, _)) = busy.first() else {
            return Ok(q);
        };
        if Instant::now() > deadline {
            return Err(AllocError::Timeout(format!(
                "process record {} stayed busy for {QUIESCE_TIMEOUT:?}",
                path.display()
            )));
        }
        // Operations take nanoseconds; a process still busy was descheduled: sleep.
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(1));
    }
}

/// What recovery did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The processes whose blocks were returned.
    pub procs: Vec<u16>,
    /// In-flight blocks put back as free.
    pub freed: Vec<BlockRef>,
    /// Partly filled blocks being appended to, returned to the unfilled table with their
    /// previously acknowledged contents.
    pub returned_unfilled: Vec<BlockRef>,
    /// Free blocks that were off the free structure (rebuild found them).
    pub rebuilt_free: u64,
}

impl Recovered {
    /// Blocks returned (freed or back to the unfilled table).
    pub fn blocks(&self) -> usize {
        self.freed.len() + self.returned_unfilled.len()
    }
}

/// One process whose in-flight blocks go back; `keep` is a block it still works on.
struct Target<'a> {
    rec: &'a ProcSeg,
    keep: Option<BlockRef>,
}

/// Returns the targets' in-flight blocks (except each one's `keep`) and rebuilds every
/// online free structure. One pass over every device, with the node quiesced by the
/// caller (`_q`).
fn return_in_flight(at: &Attached, _q: &Quiesced<'_>, targets: &[Target<'_>]) -> Recovered {
    let mut out = Recovered {
        procs: targets.iter().map(|t| t.rec.proc_id()).collect(),
        ..Recovered::default()
    };
    let mut per_target = vec![(0u64, 0u64); targets.len()];
    for d in at.attached_devices() {
        let units = (d.block_size() / UNIT) as u32;
        let before = d.free_count();
        let mut freed_here = 0u64;
        for b in 0..d.block_count() {
            let BlockState::InFlight { owner, prior_units } = d.load_state(b) else {
                continue;
            };
            let r = BlockRef {
                dev: d.index(),
                block: b,
            };
            let Some(ti) = targets
                .iter()
                .position(|t| t.rec.proc_id() == owner && t.keep != Some(r))
            else {
                continue;
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
                freed_here += 1;
            }
            per_target[ti] = (per_target[ti].0 + 1, r.pack());
        }
        if d.is_online() {
            d.rebuild_free();
            out.rebuilt_free += d.free_count().saturating_sub(before + freed_here);
        }
    }
    for (t, (n, last)) in targets.iter().zip(per_target) {
        if n > 0 {
            t.rec.recovered().fetch_add(n, Ordering::AcqRel);
            t.rec.last_recovered().store(last, Ordering::Release);
        }
    }
    out
}

/// Recovers process record `dead` (whose process is gone): its in-flight blocks go back,
/// its record is cleared, and the free structures are rebuilt.
pub fn recover_process(at: &Attached, dead: &ProcSeg) -> Result<Recovered, AllocError> {
    let q = quiesce(at)?;
    let out = return_in_flight(
        at,
        &q,
        &[Target {
            rec: dead,
            keep: None,
        }],
    );
    dead.current().store(0, Ordering::Release);
    dead.busy().store(0, Ordering::Release);
    dead.pid().store(0, Ordering::Release);
    Ok(out)
}

/// Recovers every process record whose process is dead and was not recovered yet (a new
/// leader's first act): one pause and one pass for all of them.
pub fn recover_dead(at: &Attached) -> Result<Recovered, AllocError> {
    let recs = at.proc_records()?;
    let mut dead = Vec::new();
    for (path, rec) in &recs {
        if rec.pid().load(Ordering::Acquire) != 0 && !ProcSeg::owner_alive(path)? {
            dead.push(rec);
        }
    }
    if dead.is_empty() {
        return Ok(Recovered::default());
    }
    let q = quiesce(at)?;
    let targets: Vec<Target<'_>> = dead.iter().map(|&rec| Target { rec, keep: None }).collect();
    let out = return_in_flight(at, &q, &targets);
    for rec in dead {
        rec.current().store(0, Ordering::Release);
        rec.busy().store(0, Ordering::Release);
        rec.pid().store(0, Ordering::Release);
    }
    Ok(out)
}

/// Returns the in-flight blocks of live process `rec` other than the one its record
/// names: allocations a dead central server made for it whose replies never arrived.
pub fn recover_orphans(at: &Attached, rec: &ProcSeg) -> Result<Recovered, AllocError> {
    let q = quiesce(at)?;
    let keep = BlockRef::unpack(rec.current().load(Ordering::Acquire));
    Ok(return_in_flight(at, &q, &[Target { rec, keep }]))
}
