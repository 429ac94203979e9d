//! The allocator trait and the two shared-memory implementations (`shm`: lock-free
//! bitmap; `mutex`: robust-mutex free list). The `central` client is in [`super::central`].
//!
//! Every operation runs between `enter` and `leave`: the process sets its busy flag and
//! checks the node's pause flag (both `SeqCst`, a Dekker-style handshake with
//! [`super::recovery`]), so recovery can wait until no live process is inside an
//! operation and then repair the structures without racing anyone.
//!
//! Order of stores (what a crash at any point leaves behind):
//! * alloc: claim → state `InFlight(me)` → current record. Dead before the state store:
//!   the block is `Free` but not in the free structure; recovery's rebuild puts it back.
//!   Dead after: `InFlight(me)`; recovery returns it.
//! * commit: state `Filled(used)` → current cleared.
//! * free: current record cleared → state CAS to `Free` → release. Dead in between:
//!   rebuilt. Only the owner frees an in-flight block; a filled block's unfilled-table
//!   entries are removed before its state changes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::attached::Attached;
use super::segs::{BlockRef, BlockState, NodeSeg, ProcSeg, MAX_DEVICES};
use super::{AllocError, Strategy, UNIT};

/// A block allocator of a node process.
pub trait BlockAllocator: Send {
    /// Takes a free block of device `dev`; it becomes this process's current (in-flight)
    /// block.
    fn alloc(&mut self, dev: u16) -> Result<BlockRef, AllocError>;
    /// The in-flight block `b` now holds `used_bytes` of acknowledged data.
    fn commit(&mut self, b: BlockRef, used_bytes: u64) -> Result<(), AllocError>;
    /// Returns block `b` to the free structure: a block this process has in flight, or a
    /// filled block.
    fn free(&mut self, b: BlockRef) -> Result<(), AllocError>;
    fn strategy(&self) -> Strategy;
}

/// Sets the busy flag, waiting while the node is paused.
///
/// With the asymmetric fence (the node's default when the kernel has
/// `MEMBARRIER_CMD_GLOBAL`) the store and the load are plain, separated by a compiler
/// fence only: recovery stores the pause flag and then runs a global membarrier, which
/// puts a full barrier on every CPU, so either this process's busy store is visible to
/// recovery or this load sees the pause. Otherwise both are SeqCst.
#[inline]
pub(crate) fn enter(node: &NodeSeg, asym: bool, me: &ProcSeg) {
    loop {
        if asym {
            me.busy().store(1, Ordering::Relaxed);
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
            if node.paused().load(Ordering::Relaxed) == 0 {
                std::sync::atomic::compiler_fence(Ordering::SeqCst);
                return;
            }
        } else {
            me.busy().store(1, Ordering::SeqCst);
            if node.paused().load(Ordering::SeqCst) == 0 {
                return;
            }
        }
        me.busy().store(0, Ordering::SeqCst);
        while node.paused().load(Ordering::Acquire) != 0 {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }
}

#[inline]
pub(crate) fn leave(me: &ProcSeg) {
    me.busy().store(0, Ordering::Release);
}

/// Where a process (or the central server) starts searching each device's bitmap:
/// process-local, one per device index, starting at [`spread_hint`] and then left at the
/// word the last claim came from.
///
/// [`spread_hint`]: super::segs::spread_hint
#[derive(Debug, Clone)]
pub struct Hints {
    seed: u16,
    by_dev: [u32; MAX_DEVICES],
}

impl Hints {
    pub fn new(proc_id: u16) -> Hints {
        Hints {
            seed: proc_id,
            // Out of range for every device: the first claim starts at the spread hint.
            by_dev: [u32::MAX; MAX_DEVICES],
        }
    }
}

/// Takes a block of `dev` for `owner`; `busy` is the record whose busy flag guards the
/// operation (the caller's own, or the central server's).
#[inline]
pub(crate) fn alloc_for(
    at: &Attached,
    busy: &ProcSeg,
    owner: u16,
    dev: u16,
    hints: &mut Hints,
) -> Result<BlockRef, AllocError> {
    let mut d = at.device(dev)?;
    let hint = &mut hints.by_dev[dev as usize % MAX_DEVICES];
    loop {
        enter(&at.node, at.asym, busy);
        let r = (|| {
            if !d.is_online() {
                return Err(AllocError::DeviceOffline { dev });
            }
            match d.claim(hint, hints.seed)? {
                Some(b) => {
                    d.set_state(
                        b,
                        BlockState::InFlight {
                            owner,
                            prior_units: 0,
                        },
                    );
                    Ok(BlockRef { dev, block: b })
                }
                None => Err(AllocError::DeviceFull { dev }),
            }
        })();
        leave(busy);
        match r {
            // The index may have been given to a new device since this process looked.
            Err(AllocError::DeviceOffline { .. }) => match at.reattach(dev, d)? {
                Some(newer) => d = newer,
                None => return r,
            },
            r => return r,
        }
    }
}

/// Frees `b` for `owner`: a block `owner` has in flight, or a filled block (whose
/// unfilled-table entries go first). Refuses a free block and another process's
/// in-flight block.
#[inline]
pub(crate) fn free_with(
    at: &Attached,
    busy: &ProcSeg,
    owner: u16,
    b: BlockRef,
) -> Result<(), AllocError> {
    let d = at.device(b.dev)?;
    let not_held = || AllocError::NotHeld {
        dev: b.dev,
        block: b.block,
    };
    if b.block >= d.block_count() {
        return Err(not_held());
    }
    let mut table_cleared = false;
    loop {
        enter(&at.node, at.asym, busy);
        let r = (|| {
            let cur = d.state(b.block).load(Ordering::Acquire);
            match BlockState::decode(cur) {
                BlockState::Free => return Err(not_held()),
                BlockState::InFlight { owner: o, .. } if o != owner => return Err(not_held()),
                // Processes never take the table lock inside an operation (recovery
                // holds it while it waits for them): leave, clear, come back.
                BlockState::Filled { .. } if !table_cleared => return Ok(false),
                _ => {}
            }
            if d.state(b.block)
                .compare_exchange(cur, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return Err(not_held());
            }
            d.release(b.block).map(|()| true)
        })();
        leave(busy);
        match r {
            Ok(true) => return Ok(()),
            Ok(false) => {
                let _l = at.unfilled.lock()?;
                at.unfilled.remove_where(|u| u.block == b);
                table_cleared = true;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Marks in-flight block `b` of `owner` as holding `used_bytes`.
pub(crate) fn commit_for(
    at: &Attached,
    me: &ProcSeg,
    owner: u16,
    b: BlockRef,
    used_bytes: u64,
) -> Result<(), AllocError> {
    let d = at.device(b.dev)?;
    if b.block >= d.block_count() || used_bytes > d.block_size() {
        return Err(AllocError::BadInput(format!(
            "commit of {used_bytes} bytes to block {b} (block size {})",
            d.block_size()
        )));
    }
    enter(&at.node, at.asym, me);
    let r = (|| {
        if !d.is_online() {
            return Err(AllocError::DeviceOffline { dev: b.dev });
        }
        match d.load_state(b.block) {
            BlockState::InFlight { owner: o, .. } if o == owner => {
                d.set_state(
                    b.block,
                    BlockState::Filled {
                        used_units: used_bytes.div_ceil(UNIT) as u32,
                    },
                );
                me.clear_current_if(b);
                Ok(())
            }
            _ => Err(AllocError::NotHeld {
                dev: b.dev,
                block: b.block,
            }),
        }
    })();
    leave(me);
    r
}

/// `shm` and `mutex`: allocation straight from the device segments.
pub struct LocalAllocator {
    at: Arc<Attached>,
    me: Arc<ProcSeg>,
    id: u16,
    strategy: Strategy,
    hints: Hints,
}

impl LocalAllocator {
    pub fn new(at: Arc<Attached>, me: Arc<ProcSeg>, strategy: Strategy) -> LocalAllocator {
        let id = me.proc_id();
        LocalAllocator {
            at,
            me,
            id,
            strategy,
            hints: Hints::new(id),
        }
    }
}

impl BlockAllocator for LocalAllocator {
    #[inline]
    fn alloc(&mut self, dev: u16) -> Result<BlockRef, AllocError> {
        let b = alloc_for(&self.at, &self.me, self.id, dev, &mut self.hints)?;
        self.me.current().store(b.pack(), Ordering::Release);
        Ok(b)
    }
    fn commit(&mut self, b: BlockRef, used_bytes: u64) -> Result<(), AllocError> {
        commit_for(&self.at, &self.me, self.id, b, used_bytes)
    }
    #[inline]
    fn free(&mut self, b: BlockRef) -> Result<(), AllocError> {
        // Clear the record first: dead after this, the block is still `InFlight(me)` and
        // recovery returns it; the record never names a block that is already free.
        self.me.clear_current_if(b);
        free_with(&self.at, &self.me, self.id, b)
    }
    fn strategy(&self) -> Strategy {
        self.strategy
    }
}
