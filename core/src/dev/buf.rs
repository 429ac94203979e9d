//! Buffers aligned for direct I/O.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::device::MIN_ALIGN;

/// A heap buffer whose address and length are multiples of its alignment, zero-filled
/// when allocated. Derefs to `[u8]`, so aligned sub-slices can be handed to the engine.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); no interior
// sharing, so moving it to another thread or sharing `&AlignedBuf` is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: see above; `&AlignedBuf` only gives out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to 4096 bytes. `len` is rounded up to a
    /// multiple of the alignment (and is at least one alignment unit).
    pub fn new(len: usize) -> AlignedBuf {
        Self::with_alignment(len, MIN_ALIGN)
    }

    /// A zeroed buffer aligned to `align` (a power of two, at least 4096 is used).
    pub fn with_alignment(len: usize, align: usize) -> AlignedBuf {
        let align = align.max(MIN_ALIGN).next_power_of_two();
        let len = len.max(1).div_ceil(align) * align;
        // `align` is a power of two and `len` a non-zero multiple of it, so the layout is
        // valid unless `len` overflows isize, which is a caller bug (like Vec).
        let layout = Layout::from_size_align(len, align).expect("buffer size overflows isize");
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, layout }
    }

    /// A buffer holding a copy of `data`, zero-padded to the alignment.
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut b = Self::new(data.len());
        b[..data.len()].copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn alignment(&self) -> usize {
        self.layout.align()
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points at `layout.size()` initialised (zeroed at allocation)
        // bytes owned by `self`, alive for the borrow.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated with exactly `layout` and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        let mut b = AlignedBuf::with_alignment(self.len(), self.alignment());
        b.copy_from_slice(self);
        b
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len())
            .field("align", &self.alignment())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_rounded() {
        let b = AlignedBuf::new(100);
        assert_eq!(b.len(), 4096);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert!(b.iter().all(|&x| x == 0));
        let b = AlignedBuf::with_alignment(8192, 8192);
        assert_eq!(b.as_ptr() as usize % 8192, 0);
    }
}
