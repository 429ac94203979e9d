//! A robust, process-shared lock living inside a shared-memory segment.
//!
//! Choice: a `pthread_mutex_t` with `PTHREAD_PROCESS_SHARED` and `PTHREAD_MUTEX_ROBUST`
//! rather than a hand-made futex word with an owner pid. The kernel's robust-futex list
//! releases a dead holder's lock at the moment the holder dies (no polling of pid
//! liveness, no pid-reuse race), and the next locker gets `EOWNERDEAD`, which we turn
//! into [`LockGuard::previous_owner_died`] after `pthread_mutex_consistent`. Callers keep
//! the data under the lock consistent at every single store (each update is one atomic
//! word), so after an owner's death there is nothing to repair beyond what the caller's
//! crash recovery already does.

use std::sync::atomic::Ordering;

use super::shm::Segment;
use super::AllocError;

/// Bytes reserved for the mutex inside a segment.
pub const MUTEX_BYTES: usize = 64;
const _: () = assert!(std::mem::size_of::<libc::pthread_mutex_t>() <= MUTEX_BYTES);

/// A robust process-shared mutex at a fixed offset of a segment.
#[derive(Debug, Clone, Copy)]
pub struct RobustMutex<'a> {
    seg: &'a Segment,
    off: usize,
}

/// Holding the lock; unlocks on drop.
#[derive(Debug)]
pub struct LockGuard<'a> {
    m: RobustMutex<'a>,
    previous_owner_died: bool,
}

impl LockGuard<'_> {
    /// True when the previous holder died holding the lock (it was made consistent).
    pub fn previous_owner_died(&self) -> bool {
        self.previous_owner_died
    }
}

fn pthread_err(op: &'static str, rc: i32) -> AllocError {
    AllocError::Lock {
        op,
        cause: std::io::Error::from_raw_os_error(rc),
    }
}

impl<'a> RobustMutex<'a> {
    /// Initialises a new mutex at `off` (only while building the segment).
    pub fn init(seg: &'a Segment, off: usize) -> Result<RobustMutex<'a>, AllocError> {
        assert!(off % 64 == 0);
        let m = RobustMutex { seg, off };
        let ptr = m.ptr();
        let mut attr = std::mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        // SAFETY: `attr` is a local attribute object, initialised by
        // pthread_mutexattr_init before any other use and destroyed at the end; `ptr`
        // points at MUTEX_BYTES bytes inside the mapping reserved for this mutex, which no
        // other process uses yet (the segment is still under its temporary name).
        unsafe {
            let rc = libc::pthread_mutexattr_init(attr.as_mut_ptr());
            if rc != 0 {
                return Err(pthread_err("pthread_mutexattr_init", rc));
            }
            let mut rc =
                libc::pthread_mutexattr_setpshared(attr.as_mut_ptr(), libc::PTHREAD_PROCESS_SHARED);
            if rc == 0 {
                rc = libc::pthread_mutexattr_setrobust(
                    attr.as_mut_ptr(),
                    libc::PTHREAD_MUTEX_ROBUST,
                );
            }
            if rc == 0 {
                rc = libc::pthread_mutex_init(ptr, attr.as_ptr());
            }
            libc::pthread_mutexattr_destroy(attr.as_mut_ptr());
            if rc != 0 {
                return Err(pthread_err("pthread_mutex_init", rc));
            }
        }
        std::sync::atomic::fence(Ordering::Release);
        Ok(m)
    }

    /// The mutex at `off` of an attached segment (initialised by its creator).
    pub fn at(seg: &'a Segment, off: usize) -> RobustMutex<'a> {
        assert!(off % 64 == 0);
        RobustMutex { seg, off }
    }

    fn ptr(&self) -> *mut libc::pthread_mutex_t {
        self.seg.raw_at(self.off, MUTEX_BYTES) as *mut libc::pthread_mutex_t
    }

    /// Takes the lock. If its holder died, the lock is made consistent and the guard says so.
    pub fn lock(&self) -> Result<LockGuard<'a>, AllocError> {
        // SAFETY: `ptr` points at a mutex initialised by `init` in the same segment (the
        // segment's magic is only written after initialisation), and the mapping stays
        // valid while `self.seg` is borrowed.
        let rc = unsafe { libc::pthread_mutex_lock(self.ptr()) };
        let mut died = false;
        if rc == libc::EOWNERDEAD {
            // SAFETY: we hold the mutex (EOWNERDEAD means it was acquired).
            let rc2 = unsafe { libc::pthread_mutex_consistent(self.ptr()) };
            if rc2 != 0 {
                // Do not keep a lock we cannot hand out: release it (it stays
                // unrecoverable for the next locker, who gets the error too).
                // SAFETY: we hold the mutex (acquired with EOWNERDEAD above).
                unsafe { libc::pthread_mutex_unlock(self.ptr()) };
                return Err(pthread_err("pthread_mutex_consistent", rc2));
            }
            died = true;
        } else if rc != 0 {
            return Err(pthread_err("pthread_mutex_lock", rc));
        }
        Ok(LockGuard {
            m: *self,
            previous_owner_died: died,
        })
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: this guard exists only while the calling thread holds the mutex.
        unsafe {
            libc::pthread_mutex_unlock(self.m.ptr());
        }
    }
}
