//! The layouts of the node's shared-memory segments, over [`Segment`].
//!
//! * node segment (`node.shm`): pause flag, device epoch and serial counter, leader pid,
//!   strategy, block size;
//! * device segment (`dev-<i>.shm`): geometry, status, the free structure (a lock-free
//!   bitmap, one bit per block, or a locked array for the `mutex` baseline) and one state
//!   word per block;
//! * process segment (`proc-<id>.shm`): pid, busy flag, the block being written; its
//!   process holds an `flock` on the file while it lives;
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

/// Most blocks per device (block numbers are 32-bit everywhere: records, table entries).
pub const MAX_BLOCKS: u64 = u32::MAX as u64;
/// Most devices per node.
pub const MAX_DEVICES: usize = 64;
/// Largest block: used units must fit 15 bits in an unfilled-table entry.
pub const MAX_BLOCK_SIZE: u64 = (1 << 15) * UNIT - UNIT;

/// Refuses a block size the segments cannot represent (checked before anything is created).
pub fn check_block_size(block_size: u64) -> Result<(), AllocError> {
    if block_size == 0 || block_size % UNIT != 0 || block_size > MAX_BLOCK_SIZE {
        return Err(AllocError::BadInput(format!(
            "block size {block_size} must be a non-zero multiple of {UNIT} bytes, at most {MAX_BLOCK_SIZE}"
        )));
    }
    Ok(())
}

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
    /// word, released with an atomic AND. Each process starts searching on its own cache
    /// line (see [`spread_hint`]).
    Bitmap,
    /// Array + count under a robust process-shared mutex.
    Locked,
}

/// Bitmap words per 64-byte cache line.
pub const WORDS_PER_LINE: u32 = 8;

/// Where process `proc_id` starts searching a bitmap of `words` words.
///
/// The van der Corput sequence (the id's bits reversed, read as a fraction: 1 → ½, 2 → ¼,
/// 3 → ¾, 4 → ⅛, …) spreads the processes over the bitmap's cache lines (8 words each)
/// when it has at least two: processes 1..=2^k start on distinct lines whenever there are
/// at least 2^k lines, and processes that must share a line start on distinct words of
/// it (the fraction's next bits pick the word). A bitmap of less than two lines is spread
/// over its words. The same idea as the per-CPU hints of Linux's `sbitmap`.
pub fn spread_hint(proc_id: u16, words: u32) -> u32 {
    let frac = (proc_id as u32).reverse_bits() as u64;
    let lines = words / WORDS_PER_LINE;
    if lines < 2 {
        return ((frac * words as u64) >> 32) as u32;
    }
    let pos = frac * lines as u64; // 32.32 fixed point
    let line = (pos >> 32) as u32;
    let word_in_line = (((pos & 0xffff_ffff) * WORDS_PER_LINE as u64) >> 32) as u32;
    line * WORDS_PER_LINE + word_in_line
}

impl FreeMode {
    fn code(self) -> u64 {
        match self {
            FreeMode::Locked => 2,
            FreeMode::Bitmap => 3,
        }
    }
    fn from_code(c: u64) -> Option<FreeMode> {
        match c {
            2 => Some(FreeMode::Locked),
            3 => Some(FreeMode::Bitmap),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------- node segment

const N_PAUSED: usize = 64;
const N_LEADER_PID: usize = 128;
const N_DEV_EPOCH: usize = 144;
const N_DEV_SERIAL: usize = 152;
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
        check_block_size(block_size)?;
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
    /// Bumped whenever a device segment is added or removed.
    pub fn device_epoch(&self) -> &AtomicU64 {
        self.seg.u64_at(N_DEV_EPOCH)
    }
    /// Counter of device segments ever created: each gets the next value as its serial,
    /// which tells a reused device index's new segment from the old one.
    pub fn device_serial(&self) -> &AtomicU64 {
        self.seg.u64_at(N_DEV_SERIAL)
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
const D_SERIAL: usize = 72;
const D_COUNT: usize = 192;
const D_MUTEX: usize = 256;
const D_PATH: usize = 512;
const D_PATH_MAX: usize = 1024;
/// The free structure (bitmap words, or the locked list's array) starts here, on a
/// cache-line (and page) boundary; the state words follow it.
const D_ARRAYS: usize = 4096;

pub const STATUS_ONLINE: u64 = 1;
pub const STATUS_OFFLINE: u64 = 2;

/// Where the arrays of a device segment of `n` blocks lie.
#[derive(Debug, Clone, Copy)]
struct DevLayout {
    n: u32,
    mode: FreeMode,
    states_off: usize,
}

impl DevLayout {
    fn new(n: u32, mode: FreeMode) -> DevLayout {
        // The bitmap takes 8 bytes per 64 blocks, the locked list 4 bytes per block.
        let free_bytes = match mode {
            FreeMode::Bitmap => 8 * n.div_ceil(64) as usize,
            FreeMode::Locked => 4 * n as usize,
        };
        DevLayout {
            n,
            mode,
            states_off: (D_ARRAYS + free_bytes).next_multiple_of(64),
        }
    }
    fn len(&self) -> usize {
        self.states_off + 8 * self.n as usize
    }
    fn words(&self) -> u32 {
        self.n.div_ceil(64)
    }
    /// Bits of the last bitmap word past the last block (kept set: "taken" for good).
    fn tail_mask(&self) -> u64 {
        match self.n % 64 {
            0 => 0,
            r => !((1u64 << r) - 1),
        }
    }
    #[inline]
    fn word<'s>(&self, s: &'s Segment, w: u32) -> &'s AtomicU64 {
        s.u64_at(D_ARRAYS + 8 * w as usize)
    }
    #[inline]
    fn link<'s>(&self, s: &'s Segment, i: u32) -> &'s AtomicU32 {
        s.u32_at(D_ARRAYS + 4 * i as usize)
    }
    /// Writes the free structure: exactly the blocks for which `free` is true. Only while
    /// nobody else uses the structure (before the segment is published, or paused).
    fn write_free(&self, s: &Segment, free: impl Fn(u32) -> bool) {
        match self.mode {
            FreeMode::Bitmap => {
                for w in 0..self.words() {
                    let mut v = u64::MAX;
                    for bit in 0..64 {
                        let b = w * 64 + bit;
                        if b < self.n && free(b) {
                            v &= !(1u64 << bit);
                        }
                    }
                    self.word(s, w).store(v, Ordering::Release);
                }
            }
            FreeMode::Locked => {
                // link[0..count] holds the free blocks and a claim takes link[count-1]:
                // filled from the top so that block 0 goes out first.
                let mut c = 0u32;
                for b in (0..self.n).rev() {
                    if free(b) {
                        self.link(s, c).store(b, Ordering::Relaxed);
                        c += 1;
                    }
                }
                s.u64_at(D_COUNT).store(c as u64, Ordering::Release);
            }
        }
    }
}

/// A device segment.
#[derive(Debug)]
pub struct DeviceSeg {
    pub seg: Segment,
    lay: DevLayout,
    block_size: u64,
    region_offset: u64,
}

impl DeviceSeg {
    /// Creates the segment of device `index` (unique `serial`): every block of `region`
    /// free. The free structure is complete before the segment appears under `path`.
    pub fn create(
        path: &Path,
        index: u16,
        serial: u64,
        region: &DeviceRegion,
        block_size: u64,
        mode: FreeMode,
    ) -> Result<DeviceSeg, AllocError> {
        check_block_size(block_size)?;
        let n64 = region.len / block_size;
        if n64 == 0 || n64 > MAX_BLOCKS {
            return Err(AllocError::BadInput(format!(
                "{}: region of {} bytes holds {n64} blocks of {block_size} bytes (1..={MAX_BLOCKS})",
                region.path.display(),
                region.len
            )));
        }
        let lay = DevLayout::new(n64 as u32, mode);
        let path_bytes = region.path.as_os_str().as_encoded_bytes().to_vec();
        if path_bytes.len() > D_PATH_MAX {
            return Err(AllocError::BadInput(format!(
                "device path {} is longer than {D_PATH_MAX} bytes",
                region.path.display()
            )));
        }
        let seg = Segment::create(path, DEV_MAGIC, lay.len(), |s| {
            s.u64_at(D_BLOCK_SIZE).store(block_size, Ordering::Relaxed);
            s.u64_at(D_BLOCK_COUNT)
                .store(lay.n as u64, Ordering::Relaxed);
            s.u64_at(D_REGION_OFF)
                .store(region.offset, Ordering::Relaxed);
            s.u64_at(D_REGION_LEN).store(region.len, Ordering::Relaxed);
            s.u64_at(D_STATUS).store(STATUS_ONLINE, Ordering::Relaxed);
            s.u64_at(D_MODE).store(mode.code(), Ordering::Relaxed);
            s.u64_at(D_INDEX).store(index as u64, Ordering::Relaxed);
            s.u64_at(D_SERIAL).store(serial, Ordering::Relaxed);
            s.put_bytes(D_PATH, D_PATH_MAX, &path_bytes);
            RobustMutex::init(s, D_MUTEX)?;
            // Every state word is 0 (`Free`) in a new file: every block free, the bits
            // past the last block set.
            lay.write_free(s, |_| true);
            Ok(())
        })?;
        Self::from_seg(seg)
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
        if n == 0 || n > MAX_BLOCKS {
            return Err(bad(format!("block count {n}")));
        }
        let m = seg.u64_at(D_MODE).load(Ordering::Relaxed);
        let mode = FreeMode::from_code(m)
            .ok_or_else(|| bad(format!("unknown free-structure mode {m}")))?;
        let lay = DevLayout::new(n as u32, mode);
        if lay.len() > seg.len() {
            return Err(bad(format!("{} bytes too small for {n} blocks", seg.len())));
        }
        Ok(DeviceSeg {
            lay,
            block_size: seg.u64_at(D_BLOCK_SIZE).load(Ordering::Relaxed),
            region_offset: seg.u64_at(D_REGION_OFF).load(Ordering::Relaxed),
            seg,
        })
    }

    pub fn block_count(&self) -> u32 {
        self.lay.n
    }
    pub fn block_size(&self) -> u64 {
        self.block_size
    }
    pub fn mode(&self) -> FreeMode {
        self.lay.mode
    }
    pub fn index(&self) -> u16 {
        self.seg.u64_at(D_INDEX).load(Ordering::Relaxed) as u16
    }
    /// This segment's serial (unique on the node, never reused).
    pub fn serial(&self) -> u64 {
        self.seg.u64_at(D_SERIAL).load(Ordering::Relaxed)
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
    #[inline]
    pub fn block_offset(&self, block: u32) -> u64 {
        self.region_offset + block as u64 * self.block_size
    }
    pub fn status(&self) -> &AtomicU64 {
        self.seg.u64_at(D_STATUS)
    }
    #[inline]
    pub fn is_online(&self) -> bool {
        self.status().load(Ordering::Acquire) == STATUS_ONLINE
    }
    #[inline]
    pub fn state(&self, block: u32) -> &AtomicU64 {
        assert!(block < self.lay.n);
        self.seg.u64_at(self.lay.states_off + 8 * block as usize)
    }
    /// Number of 64-bit bitmap words.
    #[inline]
    pub fn words(&self) -> u32 {
        self.lay.words()
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
    /// Replaces state `from` by `to`; false (nothing changed) if the state was not `from`.
    pub fn cas_state(&self, block: u32, from: BlockState, to: BlockState) -> bool {
        self.state(block)
            .compare_exchange(
                from.encode(),
                to.encode(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    // ---- lock-free bitmap: bit b of word b/64 is set while block b is taken. A claim is a
    // CAS that sets one clear bit of a word it has just read, a release an atomic AND: no
    // pointers and no links, so there is nothing for the ABA problem to corrupt (a word
    // that changed and changed back still means exactly what it says). Bits past the last
    // block are set for good.

    /// Claims a free block (lock-free), searching from word `*hint` on and leaving `*hint`
    /// at the word it found one in. The hint is the caller's own (process-local); one out
    /// of range (a new hint, or a device that changed) starts at `spread_hint(seed, ..)`.
    #[inline]
    pub fn claim_bitmap(&self, hint: &mut u32, seed: u16) -> Option<u32> {
        let nw = self.words();
        let mut w = if *hint < nw {
            *hint
        } else {
            spread_hint(seed, nw)
        };
        for _ in 0..nw {
            let word = self.lay.word(&self.seg, w);
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
    pub fn release_bitmap(&self, block: u32) {
        self.lay
            .word(&self.seg, block / 64)
            .fetch_and(!(1u64 << (block % 64)), Ordering::Release);
    }

    // ---- locked list (the `mutex` baseline): link[0..count] holds the free blocks. Each
    // operation commits with its single store of `count`, so a holder that dies leaves a
    // consistent list (at worst a block missing from it, which recovery puts back).

    pub fn claim_locked(&self) -> Result<Option<u32>, AllocError> {
        let _g: LockGuard<'_> = self.mutex().lock()?;
        let c = self.count().load(Ordering::Relaxed);
        if c == 0 {
            return Ok(None);
        }
        let n = self.lay.n as u64;
        let b = if c <= n {
            self.lay
                .link(&self.seg, (c - 1) as u32)
                .load(Ordering::Relaxed)
        } else {
            u32::MAX
        };
        if u64::from(b) >= n {
            // Shared memory another process can scribble on: refused, not indexed with.
            return Err(AllocError::BadSegment {
                path: self.seg.path().to_path_buf(),
                reason: format!("free list count {c} or entry {b} out of range ({n} blocks)"),
            });
        }
        self.count().store(c - 1, Ordering::Relaxed);
        Ok(Some(b))
    }

    pub fn release_locked(&self, block: u32) -> Result<(), AllocError> {
        let _g = self.mutex().lock()?;
        let c = self.count().load(Ordering::Relaxed);
        if c >= self.lay.n as u64 {
            return Err(AllocError::BadSegment {
                path: self.seg.path().to_path_buf(),
                reason: format!("free list already holds all {} blocks", self.lay.n),
            });
        }
        self.lay
            .link(&self.seg, c as u32)
            .store(block, Ordering::Relaxed);
        self.count().store(c + 1, Ordering::Relaxed);
        Ok(())
    }

    /// Takes a free block; `hint`/`seed` are the caller's bitmap search start (see
    /// [`claim_bitmap`](Self::claim_bitmap)), unused by the locked list.
    #[inline]
    pub fn claim(&self, hint: &mut u32, seed: u16) -> Result<Option<u32>, AllocError> {
        match self.lay.mode {
            FreeMode::Bitmap => Ok(self.claim_bitmap(hint, seed)),
            FreeMode::Locked => self.claim_locked(),
        }
    }

    #[inline]
    pub fn release(&self, block: u32) -> Result<(), AllocError> {
        match self.lay.mode {
            FreeMode::Bitmap => {
                self.release_bitmap(block);
                Ok(())
            }
            FreeMode::Locked => self.release_locked(block),
        }
    }

    /// Rebuilds the free structure from the state words: exactly the `Free` blocks. Only
    /// while no process is inside an operation (node paused).
    pub fn rebuild_free(&self) {
        self.lay
            .write_free(&self.seg, |b| self.load_state(b) == BlockState::Free);
    }

    /// How many blocks the free structure holds (duplicates of the locked list counted).
    /// Only while quiescent.
    pub fn free_count(&self) -> u64 {
        match self.lay.mode {
            FreeMode::Bitmap => {
                let last = self.words() - 1;
                (0..self.words())
                    .map(|w| {
                        let mut v = self.lay.word(&self.seg, w).load(Ordering::Acquire);
                        if w == last {
                            v |= self.lay.tail_mask();
                        }
                        (!v).count_ones() as u64
                    })
                    .sum()
            }
            FreeMode::Locked => self.count().load(Ordering::Acquire).min(self.lay.n as u64),
        }
    }

    /// The blocks in the free structure, in order, with duplicates as found (the locked
    /// list can hold one twice; the bitmap cannot). Only while quiescent.
    pub fn free_members(&self) -> Vec<u32> {
        let mut out = Vec::new();
        match self.lay.mode {
            FreeMode::Bitmap => {
                for w in 0..self.words() {
                    let v = self.lay.word(&self.seg, w).load(Ordering::Acquire);
                    for bit in 0..64 {
                        let b = w * 64 + bit;
                        if b < self.lay.n && v & (1 << bit) == 0 {
                            out.push(b);
                        }
                    }
                }
            }
            FreeMode::Locked => {
                let c = (self.count().load(Ordering::Acquire) as u32).min(self.lay.n);
                for i in 0..c {
                    out.push(self.lay.link(&self.seg, i).load(Ordering::Relaxed));
                }
            }
        }
        out
    }

    /// True unless a bitmap bit past the last block was cleared (which would let a claim
    /// hand out a block that does not exist).
    pub fn tail_bits_set(&self) -> bool {
        self.lay.mode != FreeMode::Bitmap || {
            let m = self.lay.tail_mask();
            self.lay
                .word(&self.seg, self.words() - 1)
                .load(Ordering::Acquire)
                & m
                == m
        }
    }
}

// ---------------------------------------------------------------- process segment

const P_PROC_ID: usize = 16;
const P_PID: usize = 24;
const P_BUSY: usize = 64;
const P_CURRENT: usize = 128;
const P_RECOVERED: usize = 192;
const P_LAST_RECOVERED: usize = 200;

/// A process's segment: the block it is writing, and its busy flag.
///
/// Its process holds an exclusive `flock` on the file for its whole life ([`OwnerLock`]);
/// the kernel drops it when the process exits, however it exits, so "the lock is free"
/// means "its process is gone" (no pid to be reused).
#[derive(Debug)]
pub struct ProcSeg {
    pub seg: Segment,
}

/// The `flock` a process holds on its own segment while it lives.
#[derive(Debug)]
pub struct OwnerLock {
    _file: std::fs::File,
}

fn open_for_lock(path: &Path) -> Result<Option<std::fs::File>, AllocError> {
    match std::fs::File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AllocError::Os {
            path: path.to_path_buf(),
            op: "open",
            cause: e,
        }),
    }
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

    /// Takes the owner lock of the segment at `path` for the calling process; refuses
    /// when a live process holds it.
    pub fn lock_owner(path: &Path) -> Result<OwnerLock, AllocError> {
        use rustix::fs::{flock, FlockOperation};
        let file = open_for_lock(path)?.ok_or_else(|| AllocError::NoSegment {
            path: path.to_path_buf(),
        })?;
        // Liveness probes hold a shared lock for a moment: retry briefly.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(OwnerLock { _file: file }),
                Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(AllocError::BadInput(format!(
                        "{}: in use by a live process (its owner lock is held)",
                        path.display()
                    )))
                }
                Err(e) => {
                    return Err(AllocError::Os {
                        path: path.to_path_buf(),
                        op: "flock",
                        cause: e.into(),
                    })
                }
            }
        }
    }

    /// Whether a live process holds the owner lock of the segment at `path` (false when
    /// the segment does not exist).
    pub fn owner_alive(path: &Path) -> Result<bool, AllocError> {
        use rustix::fs::{flock, FlockOperation};
        let Some(file) = open_for_lock(path)? else {
            return Ok(false);
        };
        // A shared probe: concurrent probes do not see each other as owners.
        match flock(&file, FlockOperation::NonBlockingLockShared) {
            Ok(()) => {
                let _ = flock(&file, FlockOperation::Unlock);
                Ok(false)
            }
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(true),
            Err(e) => Err(AllocError::Os {
                path: path.to_path_buf(),
                op: "flock",
                cause: e.into(),
            }),
        }
    }

    pub fn proc_id(&self) -> u16 {
        self.seg.u64_at(P_PROC_ID).load(Ordering::Relaxed) as u16
    }
    /// The pid of the process that registered last with this record (0 once recovery
    /// returned what a dead one left). Informational and for telling a re-registration of
    /// the same process; liveness is the owner lock.
    pub fn pid(&self) -> &AtomicU64 {
        self.seg.u64_at(P_PID)
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
            if block_units.saturating_sub(u.used_units) >= units && online(u.block.dev) {
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
