//! The few ioctls blocklab needs: block-device geometry and loop-device control.
//! All `unsafe` of the device layer outside the ring and the buffers lives here.
//!
//! The block-device request numbers are `_IO`/`_IOR` encodings, which differ between
//! architectures (direction bits and the size of `size_t`), so they are composed with
//! `rustix::ioctl::opcode` (or taken from rustix's safe wrapper) rather than written out.
//! The loop-device numbers are plain constants in `<linux/loop.h>`, the same everywhere.

use std::io;
use std::os::fd::{AsFd, RawFd};

use rustix::ioctl::{opcode, Getter, Opcode};

// From <linux/fs.h>.
const BLKROGET: Opcode = opcode::none(0x12, 94); // _IO(0x12, 94)
const BLKGETSIZE64: Opcode = opcode::read::<libc::size_t>(0x12, 114); // _IOR(0x12, 114, size_t)

// From <linux/loop.h>.
pub(crate) const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
pub(crate) const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
pub(crate) const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
pub(crate) const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
pub(crate) const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct LoopInfo64 {
    pub lo_device: u64,
    pub lo_inode: u64,
    pub lo_rdevice: u64,
    pub lo_offset: u64,
    pub lo_sizelimit: u64,
    pub lo_number: u32,
    pub lo_encrypt_type: u32,
    pub lo_encrypt_key_size: u32,
    pub lo_flags: u32,
    pub lo_file_name: [u8; LO_NAME_SIZE],
    pub lo_crypt_name: [u8; LO_NAME_SIZE],
    pub lo_encrypt_key: [u8; LO_KEY_SIZE],
    pub lo_init: [u64; 2],
}

impl LoopInfo64 {
    pub fn zeroed() -> Self {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }
}

/// `struct loop_config`.
#[repr(C)]
pub(crate) struct LoopConfig {
    pub fd: u32,
    pub block_size: u32,
    pub info: LoopInfo64,
    pub reserved: [u64; 8],
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

pub(crate) fn block_size_bytes(fd: impl AsFd) -> io::Result<u64> {
    // SAFETY: BLKGETSIZE64 is a getter that writes one u64 (the size in bytes), whatever
    // the width of `size_t` in its encoding.
    let size = unsafe { rustix::ioctl::ioctl(fd, Getter::<BLKGETSIZE64, u64>::new()) }?;
    Ok(size)
}

pub(crate) fn block_logical_sector(fd: impl AsFd) -> io::Result<u32> {
    Ok(rustix::fs::ioctl_blksszget(fd)?)
}

pub(crate) fn block_read_only(fd: impl AsFd) -> io::Result<bool> {
    // SAFETY: BLKROGET is a getter that writes one int (non-zero: read-only).
    let ro = unsafe { rustix::ioctl::ioctl(fd, Getter::<BLKROGET, libc::c_int>::new()) }?;
    Ok(ro != 0)
}

/// `LOOP_CTL_GET_FREE` on `/dev/loop-control`: the number of a free loop device.
pub(crate) fn loop_get_free(ctl: RawFd) -> io::Result<u32> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns the device number.
    let n = check(unsafe { libc::ioctl(ctl, LOOP_CTL_GET_FREE) })?;
    Ok(n as u32)
}

/// `LOOP_CONFIGURE`: attach `backing` to the loop device `dev` in one step.
pub(crate) fn loop_configure(dev: RawFd, config: &LoopConfig) -> io::Result<()> {
    // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which `LoopConfig` mirrors
    // field for field (repr(C)); the reference keeps it alive for the call.
    check(unsafe { libc::ioctl(dev, LOOP_CONFIGURE, config as *const LoopConfig) })?;
    Ok(())
}

/// `LOOP_GET_STATUS64`: what is attached to the loop device `dev`.
pub(crate) fn loop_status(dev: RawFd) -> io::Result<LoopInfo64> {
    let mut info = LoopInfo64::zeroed();
    // SAFETY: LOOP_GET_STATUS64 writes a `struct loop_info64` through the pointer, which
    // points at a live `LoopInfo64` of the same layout.
    check(unsafe { libc::ioctl(dev, LOOP_GET_STATUS64, &mut info as *mut LoopInfo64) })?;
    Ok(info)
}

/// `LOOP_CLR_FD`: detach the loop device `dev`.
pub(crate) fn loop_clear(dev: RawFd) -> io::Result<()> {
    // SAFETY: LOOP_CLR_FD takes no argument.
    check(unsafe { libc::ioctl(dev, LOOP_CLR_FD, 0) })?;
    Ok(())
}
