//! The layouts of the node's shared-memory segments, over [`Segment`].
//!
//! * node segment (`node.shm`): pause flag, device epoch, leader pid, strategy;
//! * device segment (`dev-<i>.shm`): geometry, status, the free structure (a lock-free
//!   bitmap, one bit per block, or a locked array for the `mutex` baseline) and one state
//!   word per block;
//! * process segment (`proc-<id>.shm`): pid, busy flag, the block being written;
//! * unfilled-block table (`unfilled.shm`): robust mutex + packed entries.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::shm::Segment;
use super::shm_lock::{LockGuard, RobustMutex};
use super::{AllocError, Strategy, UNIT};

pub const NODE_MAGIC: u64 = u64::from_le_bytes(*b"BLALNODE");
pub const DEV_MAGIC: u64 = u64::from_le_bytes(*b"BLALDEVS");
pub const PROC_MAGIC: u64 = u64::from_le_bytes(*b"BLALPROC");
pub const UNFILLED_MAGIC: u64 = u64::from_le_bytes(*b"BLALUNFL");

/// No block (the locked list's and the index's "none").
pub const NIL: u32 = u32::MAX;
/// Most devices per node.
pub const MAX_DEVICES: usize = 64;
/// Largest block: used units must fit 15 bits in an unfilled-table entry.
pub const MAX_BLOCK_SIZE: u64 = (1 << 15) * UNIT - UNIT;

/// A block of a device of the node.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct BlockRef {
    pub dev: u16,
    pub block: u32,
}

impl BlockRef {
    pub fn pack(self) -> u64 {
        (1 << 63) | ((self.dev as u64) << 32) | self.block as u64
    }
    pub fn unpack(w: u64) -> Option<BlockRef> {
        (w >> 63 == 1).then_some(BlockRef {
            dev: (w >> 32) as u16,
            block: w as u32,
        })
    }
}

impl std::fmt::Display for BlockRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.dev, self.block)
    }
}

/// A device region blocks are carved from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceRegion {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
}

/// The state word of one block: who has it, and how much of it holds acknowledged data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Free (in the free structure, or about to be put back by its last owner).
    Free,
    /// Being written by process `owner`; `prior_units` units were acknowledged before
    /// (non-zero for a partly filled block taken from the unfilled table).
    InFlight { owner: u16, prior_units: u32 },
    /// Holds `used_units` units of acknowledged data.
    Filled { used_units: u32 },
}

impl BlockState {
    pub fn encode(self) -> u64 {
        match self {
            BlockState::Free => 0,
            BlockState::InFlight { owner, prior_units } => {
                (1 << 62) | ((owner as u64) << 32) | prior_units as u64
            }
            BlockState::Filled { used_units } => (2 << 62) | used_units as u64,
        }
    }
    pub fn decode(w: u64) -> BlockState {
        match w >> 62 {
            1 => BlockState::InFlight {
                owner: (w >> 32) as u16,
                prior_units: w as u32,
            },
            2 => BlockState::Filled {
                used_units: w as u32,
            },
            _ => BlockState::Free,
        }
    }
}

/// Which free structure a device segment uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeMode {
    /// Lock-free bitmap: one bit per block (set = taken), claimed with a CAS on its 64-bit
    /// word, released with an atomic AND. Each process starts searching at its own word
    /// (see [`spread_hint`]), so processes of a node work on different cache lines.
    Bitmap,
    /// Array + count under a robust process-shared mutex.
    Locked,
}

/// Where process `proc_id` starts searching a bitmap of `words` words: the van der Corput
/// sequence (process ids with their bits reversed, read as a fraction: 0, ½, ¼, ¾, ⅛, …)
/// puts processes 0..2^k on distinct words, as far apart as possible, whenever there are
/// at least 2^k words, so processes of a node claim blocks on different cache lines.
pub fn spread_hint(proc_id: u16, words: u32) -> u32 {
    let frac = (proc_id as u32).reverse_bits() as u64;
    ((frac * words as u64) >> 32) as u32
}

impl FreeMode {
    fn code(self) -> u64 {
        match self {
            FreeMode::Locked => 2,
            FreeMode::Bitmap => 3,
        }
    }
}

// ---------------------------------------------------------------- node segment

const N_PAUSED: usize = 64;
const N_LEADER_PID: usize = 128;
const N_LEADER_TERM: usize = 136;
const N_DEV_EPOCH: usize = 144;
const N_NEXT_DEV: usize = 152;
const N_STRATEGY: usize = 160;
const N_BLOCK_SIZE: usize = 168;
const N_FENCE: usize = 176;

/// Fence protocol of `enter`: the fast side pays only a compiler fence and recovery pays
/// a system-wide `membarrier(MEMBARRIER_CMD_GLOBAL)` (the asymmetric Dekker pattern).
pub const FENCE_ASYMMETRIC: u64 = 1;
/// Both sides use SeqCst atomics (when the kernel lacks the global membarrier).
pub const FENCE_SYMMETRIC: u64 = 2;

/// The node segment.
#[derive(Debug)]
pub struct NodeSeg {
    pub seg: Segment,
}

impl NodeSeg {
    pub fn create(path: &Path, strategy: Strategy, block_size: u64) -> Result<NodeSeg, AllocError> {
        use rustix::thread::{membarrier_query, MembarrierCommand};
        let fence = if membarrier_query().contains_command(MembarrierCommand::Global) {
            FENCE_ASYMMETRIC
        } else {
            FENCE_SYMMETRIC
        };
        let seg = Segment::create(path, NODE_MAGIC, 4096, |s| {
            s.u64_at(N_STRATEGY)
                .store(strategy.code(), Ordering::Relaxed);
            s.u64_at(N_BLOCK_SIZE).store(block_size, Ordering::Relaxed);
            s.u64_at(N_FENCE).store(fence, Ordering::Relaxed);
            Ok(())
        })?;
        Ok(NodeSeg { seg })
    }
    pub fn attach(path: &Path) -> Result<NodeSeg, AllocError> {
        Ok(NodeSeg {
            seg: Segment::attach(path, NODE_MAGIC)?,
        })
    }
    pub fn paused(&self) -> &AtomicU64 {
        self.seg.u64_at(N_PAUSED)
    }
    pub fn leader_pid(&self) -> &AtomicU64 {
        self.seg.u64_at(N_LEADER_PID)
    }
    pub fn leader_term(&self) -> &AtomicU64 {
        self.seg.u64_at(N_LEADER_TERM)
    }
    /// Bumped whenever a device segment is added or removed.
    pub fn device_epoch(&self) -> &AtomicU64 {
        self.seg.u64_at(N_DEV_EPOCH)
    }
    pub fn next_device(&self) -> &AtomicU64 {
        self.seg.u64_at(N_NEXT_DEV)
    }
    pub fn strategy(&self) -> Option<Strategy> {
        Strategy::from_code(self.seg.u64_at(N_STRATEGY).load(Ordering::Relaxed))
    }
    pub fn block_size(&self) -> u64 {
        self.seg.u64_at(N_BLOCK_SIZE).load(Ordering::Relaxed)
    }
    /// True when `enter` may use the asymmetric fence (see [`FENCE_ASYMMETRIC`]).
    pub fn asymmetric_fence(&self) -> bool {
        self.seg.u64_at(N_FENCE).load(Ordering::Relaxed) == FENCE_ASYMMETRIC
    }
}

// ---------------------------------------------------------------- device segment

const D_BLOCK_SIZE: usize = 16;
const D_BLOCK_COUNT: usize = 24;
const D_REGION_OFF: usize = 32;
const D_REGION_LEN: usize = 40;
const D_STATUS: usize = 48;
const D_MODE: usize = 56;
const D_INDEX: usize = 64;
const D_COUNT: usize = 192;
const D_MUTEX: usize = 256;
const D_PATH: usize = 512;
const D_PATH_MAX: usize = 1024;
const D_ARRAYS: usize = 4096;

pub const STATUS_ONLINE: u64 = 1;
pub const STATUS_OFFLINE: u64 = 2;

/// A device segment.
#[derive(Debug)]
pub struct DeviceSeg {
    pub seg: Segment,
    n: u32,
    states_off: usize,
    block_size: u64,
    region_offset: u64,
    mode: FreeMode,
}

impl DeviceSeg {
    /// Creates the segment of device `index`: every block of `region` free.
    pub fn create(
        path: &Path,
        index: u16,
        region: &DeviceRegion,
        block_size: u64,
        mode: FreeMode,
    ) -> Result<DeviceSeg, AllocError> {
        if block_size == 0 || block_size % UNIT != 0 || block_size > MAX_BLOCK_SIZE {
            return Err(AllocError::BadInput(format!(
                "block size {block_size} must be a multiple of {UNIT} bytes, at most {MAX_BLOCK_SIZE}"
            )));
        }
        let n64 = region.len / block_size;
        if n64 == 0 || n64 >= NIL as u64 {
            return Err(AllocError::BadInput(format!(
                "{}: region of {} bytes holds {n64} blocks of {block_size} bytes",
                region.path.display(),
                region.len
            )));
        }
        let n = n64 as u32;
        let states_off = (D_ARRAYS + 4 * n as usize).next_multiple_of(8);
        let len = states_off + 8 * n as usize;
        let path_bytes = region.path.as_os_str().as_encoded_bytes().to_vec();
        let seg = Segment::create(path, DEV_MAGIC, len, |s| {
            s.u64_at(D_BLOCK_SIZE).store(block_size, Ordering::Relaxed);
            s.u64_at(D_BLOCK_COUNT).store(n as u64, Ordering::Relaxed);
            s.u64_at(D_REGION_OFF)
                .store(region.offset, Ordering::Relaxed);
            s.u64_at(D_REGION_LEN).store(region.len, Ordering::Relaxed);
            s.u64_at(D_STATUS).store(STATUS_ONLINE, Ordering::Relaxed);
            s.u64_at(D_MODE).store(mode.code(), Ordering::Relaxed);
            s.u64_at(D_INDEX).store(index as u64, Ordering::Relaxed);
            s.put_bytes(D_PATH, D_PATH_MAX, &path_bytes);
            RobustMutex::init(s, D_MUTEX)?;
            Ok(())
        })?;
        let d = Self::from_seg(seg)?;
        // Every block free (block 0 first out of the locked list).
        d.rebuild_free();
        Ok(d)
    }

    pub fn attach(path: &Path) -> Result<DeviceSeg, AllocError> {
        Self::from_seg(Segment::attach(path, DEV_MAGIC)?)
    }

    fn from_seg(seg: Segment) -> Result<DeviceSeg, AllocError> {
        let n = seg.u64_at(D_BLOCK_COUNT).load(Ordering::Relaxed);
        let bad = |reason: String| AllocError::BadSegment {
            path: seg.path().to_path_buf(),
            reason,
        };
        if n == 0 || n >= NIL as u64 {
            return Err(bad(format!("block count {n}")));
        }
        let states_off = (D_ARRAYS + 4 * n as usize).next_multiple_of(8);
        if states_off + 8 * n as usize > seg.len() {
            return Err(bad(format!("{} bytes too small for {n} blocks", seg.len())));
        }
        let mode = match seg.u64_at(D_MODE).load(Ordering::Relaxed) {
            2 => FreeMode::Locked,
            3 => FreeMode::Bitmap,
            m => return Err(bad(format!("unknown free-structure mode {m}"))),
        };
        Ok(DeviceSeg {
            n: n as u32,
            states_off,
            block_size: seg.u64_at(D_BLOCK_SIZE).load(Ordering::Relaxed),
            region_offset: seg.u64_at(D_REGION_OFF).load(Ordering::Relaxed),
            mode,
            seg,
        })
    }

    pub fn block_count(&self) -> u32 {
        self.n
    }
    pub fn block_size(&self) -> u64 {
        self.block_size
    }
    pub fn mode(&self) -> FreeMode {
        self.mode
    }
    pub fn index(&self) -> u16 {
        self.seg.u64_at(D_INDEX).load(Ordering::Relaxed) as u16
    }
    pub fn region(&self) -> DeviceRegion {
        DeviceRegion {
            path: self.device_path(),
            offset: self.region_offset,
            len: self.seg.u64_at(D_REGION_LEN).load(Ordering::Relaxed),
        }
    }
    pub fn device_path(&self) -> PathBuf {
        use std::os::unix::ffi::OsStringExt;
        PathBuf::from(std::ffi::OsString::from_vec(
            self.seg.get_bytes(D_PATH, D_PATH_MAX),
        ))
    }
    /// Byte offset of `block` on the device.
    pub fn block_offset(&self, block: u32) -> u64 {
        self.region_offset + block as u64 * self.block_size
    }
    pub fn status(&self) -> &AtomicU64 {
        self.seg.u64_at(D_STATUS)
    }
    pub fn is_online(&self) -> bool {
        self.status().load(Ordering::Acquire) == STATUS_ONLINE
    }
    #[inline]
    pub fn state(&self, block: u32) -> &AtomicU64 {
        assert!(block < self.n);
        self.seg.u64_at(self.states_off + 8 * block as usize)
    }
    #[inline]
    fn link(&self, block: u32) -> &AtomicU32 {
        self.seg.u32_at(D_ARRAYS + 4 * block as usize)
    }
    /// Number of 64-bit bitmap words (the bitmap lives where the locked list's array
    /// does: `8 × ⌈n/64⌉ ≤ 4n` rounded up to 8 bytes, so the layout is the same).
    #[inline]
    pub fn words(&self) -> u32 {
        self.n.div_ceil(64)
    }
    #[inline]
    fn word(&self, w: u32) -> &AtomicU64 {
        self.seg.u64_at(D_ARRAYS + 8 * w as usize)
    }
    fn count(&self) -> &AtomicU64 {
        self.seg.u64_at(D_COUNT)
    }
    pub fn mutex(&self) -> RobustMutex<'_> {
        RobustMutex::at(&self.seg, D_MUTEX)
    }

    pub fn load_state(&self, block: u32) -> BlockState {
        BlockState::decode(self.state(block).load(Ordering::Acquire))
    }
    pub fn set_state(&self, block: u32, s: BlockState) {
        self.state(block).store(s.encode(), Ordering::Release);
    }

    // ---- lock-free bitmap: bit b of word b/64 is set while block b is taken. A claim is a
    // CAS that sets one clear bit of a word it has just read, a release an atomic AND: no
    // pointers and no links, so there is nothing for the ABA problem to corrupt (a word
    // that changed and changed back still means exactly what it says). Bits past the last
    // block are set for good.

    /// Claims a free block (lock-free), searching from word `*hint` on and leaving `*hint`
    /// at the word it found one in. The hint is the caller's own (process-local).
    #[inline]
    pub fn pop_bitmap(&self, hint: &mut u32) -> Option<u32> {
        let nw = self.words();
        let mut w = if *hint < nw { *hint } else { 0 };
        for _ in 0..nw {
            let word = self.word(w);
            let mut v = word.load(Ordering::Relaxed);
            while v != u64::MAX {
                let bit = (!v).trailing_zeros();
                match word.compare_exchange_weak(
                    v,
                    v | (1 << bit),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        *hint = w;
                        return Some(w * 64 + bit);
                    }
                    Err(cur) => v = cur,
                }
            }
            w = if w + 1 == nw { 0 } else { w + 1 };
        }
        None
    }

    /// Releases a block (lock-free).
    #[inline]
    pub fn push_bitmap(&self, block: u32) {
        self.word(block / 64)
            .fetch_and(!(1u64 << (block % 64)), Ordering::Release);
    }

    // ---- locked list (the `mutex` baseline): link[0..count] holds the free blocks. Each
    // operation commits with its single store of `count`, so a holder that dies leaves a
    // consistent list (at worst a block missing from it, which recovery puts back).

    pub fn pop_locked(&self) -> Result<Option<u32>, AllocError> {
        let _g: LockGuard<'_> = self.mutex().lock()?;
        let c = self.count().load(Ordering::Relaxed);
        if c == 0 {
            return Ok(None);
        }
        let b = self.link((c - 1) as u32).load(Ordering::Relaxed);
        self.count().store(c - 1, Ordering::Relaxed);
        Ok(Some(b))
    }

    pub fn push_locked(&self, block: u32) -> Result<(), AllocError> {
        let _g = self.mutex().lock()?;
        let c = self.count().load(Ordering::Relaxed);
        self.link(c as u32).store(block, Ordering::Relaxed);
        self.count().store(c + 1, Ordering::Relaxed);
        Ok(())
    }

    /// Takes a free block; `hint` is the caller's search start for the bitmap (see
    /// [`pop_bitmap`](Self::pop_bitmap)), unused by the locked list.
    pub fn pop(&self, hint: &mut u32) -> Result<Option<u32>, AllocError> {
        match self.mode {
            FreeMode::Bitmap => Ok(self.pop_bitmap(hint)),
            FreeMode::Locked => self.pop_locked(),
        }
    }

    pub fn push(&self, block: u32) -> Result<(), AllocError> {
        match self.mode {
            FreeMode::Bitmap => {
                self.push_bitmap(block);
                Ok(())
            }
            FreeMode::Locked => self.push_locked(block),
        }
    }

    /// Rebuilds the free structure from the state words: exactly the `Free` blocks, block
    /// 0 first out. Only while no process is inside an operation (node paused) or before
    /// the segment is published.
    pub fn rebuild_free(&self) {
        let free: Vec<u32> = (0..self.n)
            .rev()
            .filter(|&b| self.load_state(b) == BlockState::Free)
            .collect();
        match self.mode {
            FreeMode::Bitmap => {
                let mut words = vec![u64::MAX; self.words() as usize];
                for &b in &free {
                    words[(b / 64) as usize] &= !(1u64 << (b % 64));
                }
                for (w, v) in words.into_iter().enumerate() {
                    self.word(w as u32).store(v, Ordering::Release);
                }
            }
            FreeMode::Locked => {
                for (i, &b) in free.iter().enumerate() {
                    self.link(i as u32).store(b, Ordering::Relaxed);
                }
                self.count().store(free.len() as u64, Ordering::Release);
            }
        }
    }

    /// The blocks in the free structure, in order, with duplicates as found (the locked
    /// list can hold one twice; the bitmap cannot). Only while quiescent.
    pub fn free_members(&self) -> Vec<u32> {
        let mut out = Vec::new();
        match self.mode {
            FreeMode::Bitmap => {
                for w in 0..self.words() {
                    let v = self.word(w).load(Ordering::Acquire);
                    for bit in 0..64 {
                        let b = w * 64 + bit;
                        if b < self.n && v & (1 << bit) == 0 {
                            out.push(b);
                        }
                    }
                }
            }
            FreeMode::Locked => {
                let c = (self.count().load(Ordering::Acquire) as u32).min(self.n);
                for i in 0..c {
                    out.push(self.link(i).load(Ordering::Relaxed));
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------- process segment

const P_PROC_ID: usize = 16;
const P_PID: usize = 24;
const P_INCARNATION: usize = 32;
const P_BUSY: usize = 64;
const P_CURRENT: usize = 128;
const P_RECOVERED: usize = 192;
const P_LAST_RECOVERED: usize = 200;

/// A process's segment: the block it is writing, and its busy flag.
#[derive(Debug)]
pub struct ProcSeg {
    pub seg: Segment,
}

impl ProcSeg {
    pub fn create(path: &Path, proc_id: u16) -> Result<ProcSeg, AllocError> {
        let seg = Segment::create(path, PROC_MAGIC, 4096, |s| {
            s.u64_at(P_PROC_ID).store(proc_id as u64, Ordering::Relaxed);
            Ok(())
        })?;
        Ok(ProcSeg { seg })
    }
    pub fn attach(path: &Path) -> Result<ProcSeg, AllocError> {
        Ok(ProcSeg {
            seg: Segment::attach(path, PROC_MAGIC)?,
        })
    }
    pub fn proc_id(&self) -> u16 {
        self.seg.u64_at(P_PROC_ID).load(Ordering::Relaxed) as u16
    }
    pub fn pid(&self) -> &AtomicU64 {
        self.seg.u64_at(P_PID)
    }
    pub fn incarnation(&self) -> &AtomicU64 {
        self.seg.u64_at(P_INCARNATION)
    }
    pub fn busy(&self) -> &AtomicU64 {
        self.seg.u64_at(P_BUSY)
    }
    /// Packed [`BlockRef`] of the block being written, 0 if none.
    pub fn current(&self) -> &AtomicU64 {
        self.seg.u64_at(P_CURRENT)
    }
    /// Clears the current-block record if it names `b`. Only the owning process writes its
    /// record (recovery does too, but only for a dead process), so a load and a store do:
    /// no read-modify-write is needed.
    #[inline]
    pub fn clear_current_if(&self, b: BlockRef) {
        if self.current().load(Ordering::Relaxed) == b.pack() {
            self.current().store(0, Ordering::Release);
        }
    }
    /// How many in-flight blocks recovery returned for this process, over its life.
    pub fn recovered(&self) -> &AtomicU64 {
        self.seg.u64_at(P_RECOVERED)
    }
    /// Packed [`BlockRef`] of the last block recovery returned for it (0 if none).
    pub fn last_recovered(&self) -> &AtomicU64 {
        self.seg.u64_at(P_LAST_RECOVERED)
    }
}

// ---------------------------------------------------------------- unfilled table

const U_CAPACITY: usize = 16;
const U_MUTEX: usize = 64;
const U_ENTRIES: usize = 128;

/// A partly filled block with room left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unfilled {
    pub block: BlockRef,
    pub used_units: u32,
}

impl Unfilled {
    fn pack(self) -> u64 {
        (1 << 63)
            | ((self.used_units as u64 & 0x7fff) << 48)
            | (self.block.dev as u64) << 32
            | self.block.block as u64
    }
    fn unpack(w: u64) -> Option<Unfilled> {
        (w >> 63 == 1).then_some(Unfilled {
            block: BlockRef {
                dev: (w >> 32) as u16,
                block: w as u32,
            },
            used_units: ((w >> 48) & 0x7fff) as u32,
        })
    }
}

/// The unfilled-block table. Every change is one store of one entry word, made under
/// the robust lock.
#[derive(Debug)]
pub struct UnfilledSeg {
    pub seg: Segment,
    cap: usize,
}

impl UnfilledSeg {
    pub fn create(path: &Path, capacity: usize) -> Result<UnfilledSeg, AllocError> {
        let seg = Segment::create(path, UNFILLED_MAGIC, U_ENTRIES + 8 * capacity, |s| {
            s.u64_at(U_CAPACITY)
                .store(capacity as u64, Ordering::Relaxed);
            RobustMutex::init(s, U_MUTEX)?;
            Ok(())
        })?;
        Self::from_seg(seg)
    }
    pub fn attach(path: &Path) -> Result<UnfilledSeg, AllocError> {
        Self::from_seg(Segment::attach(path, UNFILLED_MAGIC)?)
    }
    fn from_seg(seg: Segment) -> Result<UnfilledSeg, AllocError> {
        let cap = seg.u64_at(U_CAPACITY).load(Ordering::Relaxed) as usize;
        if U_ENTRIES + 8 * cap > seg.len() {
            return Err(AllocError::BadSegment {
                path: seg.path().to_path_buf(),
                reason: format!("capacity {cap} does not fit {} bytes", seg.len()),
            });
        }
        Ok(UnfilledSeg { seg, cap })
    }
    pub fn lock(&self) -> Result<LockGuard<'_>, AllocError> {
        RobustMutex::at(&self.seg, U_MUTEX).lock()
    }
    fn entry(&self, i: usize) -> &AtomicU64 {
        self.seg.u64_at(U_ENTRIES + 8 * i)
    }
    /// All entries (call with the lock held for a consistent view).
    pub fn entries(&self) -> Vec<(usize, Unfilled)> {
        (0..self.cap)
            .filter_map(|i| Unfilled::unpack(self.entry(i).load(Ordering::Acquire)).map(|u| (i, u)))
            .collect()
    }
    /// Takes (removes) an entry with at least `units` units of room; lock held.
    pub fn take_fitting(
        &self,
        units: u32,
        block_units: u32,
        online: impl Fn(u16) -> bool,
    ) -> Option<Unfilled> {
        for (i, u) in self.entries() {
            if block_units - u.used_units >= units && online(u.block.dev) {
                return Some(u).inspect(|_| self.entry(i).store(0, Ordering::Release));
            }
        }
        None
    }
    /// Adds an entry; lock held. A full table drops the entry (the block then stays
    /// filled as it is: its room is lost, its data is not).
    pub fn put(&self, u: Unfilled) -> bool {
        for i in 0..self.cap {
            if self.entry(i).load(Ordering::Relaxed) == 0 {
                self.entry(i).store(u.pack(), Ordering::Release);
                return true;
            }
        }
        false
    }
    /// Removes every entry for which `f` is true; lock held.
    pub fn remove_where(&self, f: impl Fn(&Unfilled) -> bool) {
        for (i, u) in self.entries() {
            if f(&u) {
                self.entry(i).store(0, Ordering::Release);
            }
        }
    }
}
