//! Shared-memory segments: files in a node directory (normally on tmpfs, `/dev/shm`)
//! mapped `MAP_SHARED` by every process of the node.
//!
//! A segment starts with a magic (which kind of segment) and a format version. A segment
//! appears atomically: it is built under a temporary name and hard-linked into place, so
//! a process that attaches never sees a half-initialised one. Attaching checks the magic,
//! the version and the size and refuses anything else.
//!
//! Everything inside a segment is accessed through `AtomicU64`/`AtomicU32` (no pointers,
//! only offsets and indexes), which is what makes the memory usable by several processes
//! that map it at different addresses.

use std::fs::{File, OpenOptions};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use memmap2::MmapMut;

use super::AllocError;

/// Version of every segment layout in this module tree.
pub const SEG_VERSION: u64 = 3;
/// Byte offset of the magic.
const OFF_MAGIC: usize = 0;
/// Byte offset of the version.
const OFF_VERSION: usize = 8;
/// Smallest segment: the header page.
pub const MIN_SEG_LEN: usize = 4096;

/// One mapped shared-memory segment.
pub struct Segment {
    path: PathBuf,
    map: MmapMut,
    base: *mut u8,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("path", &self.path)
            .field("len", &self.map.len())
            .finish()
    }
}

// SAFETY: the mapping is owned by the segment and lives as long as it; every access to
// the mapped bytes goes through atomics (or the process-shared pthread mutex of
// `shm_lock`), which are designed for concurrent access from any thread or process.
unsafe impl Send for Segment {}
// SAFETY: as above: shared access only through atomic operations.
unsafe impl Sync for Segment {}

fn os(path: &Path, op: &'static str, source: std::io::Error) -> AllocError {
    AllocError::Os {
        path: path.to_path_buf(),
        op,
        cause: source,
    }
}

impl Segment {
    /// Creates a segment of `len` bytes at `path`. `init` fills it in completely (magic
    /// and version are written by this function, after `init`); then the file is linked
    /// into place. Fails with `AlreadyExists` if `path` exists.
    pub fn create(
        path: &Path,
        magic: u64,
        len: usize,
        init: impl FnOnce(&Segment) -> Result<(), AllocError>,
    ) -> Result<Segment, AllocError> {
        let len = len.max(MIN_SEG_LEN).next_multiple_of(4096);
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| os(&tmp, "create", e))?;
        file.set_len(len as u64)
            .map_err(|e| os(&tmp, "ftruncate", e))?;
        let seg = Self::map(&tmp, &file, len)?;
        let built = init(&seg).and_then(|()| {
            seg.u64_at(OFF_VERSION)
                .store(SEG_VERSION, Ordering::Relaxed);
            seg.u64_at(OFF_MAGIC).store(magic, Ordering::Release);
            // rename(2) never replaces atomically-but-silently here: we want to fail if
            // another process created it first, so use a hard link then unlink.
            std::fs::hard_link(&tmp, path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    AllocError::AlreadyExists {
                        path: path.to_path_buf(),
                    }
                } else {
                    os(path, "link", e)
                }
            })
        });
        let _ = std::fs::remove_file(&tmp);
        built?;
        Ok(Segment {
            path: path.to_path_buf(),
            ..seg
        })
    }

    /// Attaches the segment at `path`, refusing a wrong magic, version or size.
    pub fn attach(path: &Path, magic: u64) -> Result<Segment, AllocError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    AllocError::NoSegment {
                        path: path.to_path_buf(),
                    }
                } else {
                    os(path, "open", e)
                }
            })?;
        let len = file.metadata().map_err(|e| os(path, "stat", e))?.len() as usize;
        if len < MIN_SEG_LEN || len % 4096 != 0 {
            return Err(AllocError::BadSegment {
                path: path.to_path_buf(),
                reason: format!("size {len} bytes is not a whole number of 4 KiB pages ≥ 4 KiB"),
            });
        }
        let seg = Self::map(path, &file, len)?;
        let found = seg.u64_at(OFF_MAGIC).load(Ordering::Acquire);
        if found != magic {
            return Err(AllocError::BadSegment {
                path: path.to_path_buf(),
                reason: format!("wrong magic {found:#018x} (expected {magic:#018x})"),
            });
        }
        let v = seg.u64_at(OFF_VERSION).load(Ordering::Relaxed);
        if v != SEG_VERSION {
            return Err(AllocError::BadSegment {
                path: path.to_path_buf(),
                reason: format!("format version {v}, this build understands {SEG_VERSION}"),
            });
        }
        Ok(seg)
    }

    fn map(path: &Path, file: &File, len: usize) -> Result<Segment, AllocError> {
        // SAFETY: the file is a shared-memory segment of this node; other processes
        // modify it concurrently, which is why this module never hands out plain
        // references into it, only atomics. Truncation by another process would make
        // accesses fault; segments are never truncated after creation (only unlinked,
        // which keeps the mapping valid).
        let mut map = unsafe { MmapMut::map_mut(file) }.map_err(|e| os(path, "mmap", e))?;
        if map.len() != len {
            return Err(AllocError::BadSegment {
                path: path.to_path_buf(),
                reason: format!("mapped {} bytes, expected {len}", map.len()),
            });
        }
        let base = map.as_mut_ptr();
        Ok(Segment {
            path: path.to_path_buf(),
            map,
            base,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the mapping in bytes (a whole number of pages, at least one).
    #[allow(clippy::len_without_is_empty)]
    #[inline]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The `AtomicU64` at byte offset `off` (8-aligned, inside the segment).
    #[inline]
    pub fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(
            off % 8 == 0 && off + 8 <= self.len(),
            "u64 at {off} outside segment"
        );
        // SAFETY: in bounds and 8-aligned (the mapping is page aligned); the memory is
        // valid for the life of `self` and only ever accessed atomically.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    /// The `AtomicU32` at byte offset `off` (4-aligned, inside the segment).
    #[inline]
    pub fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(
            off % 4 == 0 && off + 4 <= self.len(),
            "u32 at {off} outside segment"
        );
        // SAFETY: in bounds and 4-aligned; valid for the life of `self`; atomic access.
        unsafe { &*(self.base.add(off) as *const AtomicU32) }
    }

    /// Raw pointer to byte `off`, for the process-shared mutex in `shm_lock`.
    pub(super) fn raw_at(&self, off: usize, len: usize) -> *mut u8 {
        assert!(off + len <= self.len(), "range at {off} outside segment");
        // SAFETY: in bounds of the mapping.
        unsafe { self.base.add(off) }
    }

    /// Stores `bytes` (at most `max` of them) at `off` as little-endian u64 words with a
    /// length word first.
    pub fn put_bytes(&self, off: usize, max: usize, bytes: &[u8]) {
        let n = bytes.len().min(max);
        self.u64_at(off).store(n as u64, Ordering::Relaxed);
        for (i, chunk) in bytes[..n].chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.u64_at(off + 8 + i * 8)
                .store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
    }

    /// Reads what [`put_bytes`](Self::put_bytes) stored.
    pub fn get_bytes(&self, off: usize, max: usize) -> Vec<u8> {
        let n = (self.u64_at(off).load(Ordering::Relaxed) as usize).min(max);
        let mut out = Vec::with_capacity(n + 8);
        for i in 0..n.div_ceil(8) {
            out.extend_from_slice(
                &self
                    .u64_at(off + 8 + i * 8)
                    .load(Ordering::Relaxed)
                    .to_le_bytes(),
            );
        }
        out.truncate(n);
        out
    }
}

/// A slot whose value can be replaced while references handed out before stay valid: a
/// replaced value is kept (still mapped, for a segment) until the slot itself is dropped.
/// Reading is one `Acquire` load, the same as `OnceLock::get`; replacing takes a lock.
///
/// The node's device table uses it: a device index can be reused for a new segment after
/// its old segment went offline, and a thread that still holds the old one keeps a valid
/// (offline) mapping.
pub struct RetainingSlot<T> {
    cur: AtomicPtr<T>,
    kept: Mutex<Vec<Box<T>>>,
    // `get` hands out `&T` to any thread holding `&self`: Sync only for T: Sync.
    _marker: PhantomData<T>,
}

impl<T> Default for RetainingSlot<T> {
    fn default() -> Self {
        RetainingSlot {
            cur: AtomicPtr::new(std::ptr::null_mut()),
            kept: Mutex::new(Vec::new()),
            _marker: PhantomData,
        }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for RetainingSlot<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RetainingSlot").field(&self.get()).finish()
    }
}

impl<T> RetainingSlot<T> {
    /// The current value, if any.
    #[inline]
    pub fn get(&self) -> Option<&T> {
        let p = self.cur.load(Ordering::Acquire);
        // SAFETY: a non-null `cur` points into a `Box` owned by `kept`; boxes are only
        // pushed, never removed or dropped before the slot is, so the value lives (and
        // does not move) as long as `&self`. The Acquire load pairs with the Release
        // store in `set`, so the value's initialisation is visible.
        (!p.is_null()).then(|| unsafe { &*p })
    }

    /// Makes `v` the current value (the previous one stays alive) and returns it.
    pub fn set(&self, v: T) -> &T {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let b = Box::new(v);
        let p = &*b as *const T as *mut T;
        kept.push(b);
        self.cur.store(p, Ordering::Release);
        // SAFETY: `p` points into the box just pushed to `kept` (see `get`).
        unsafe { &*p }
    }
}
