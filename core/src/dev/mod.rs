//! Block devices: `O_DIRECT` access, aligned buffers, the io_uring engine, probing for
//! foreign data, and loop-device provisioning.
//!
//! [`buf`], [`engine`] and `ioctl` (with `alloc::shm` and `alloc::shm_lock`) are the only
//! modules allowed `unsafe` code (the crate denies it elsewhere); each block has a
//! `// SAFETY:` comment. The contract the ring depends on (buffers outlive their
//! requests) is kept inside [`engine`]: the public API is safe.

#[allow(unsafe_code)]
pub mod buf;
pub mod device;
#[allow(unsafe_code)]
pub mod engine;
pub mod error;
#[allow(unsafe_code)]
mod ioctl;
pub mod probe;
pub mod provision;
pub mod stats;

pub use buf::AlignedBuf;
pub use device::{Device, DeviceKind, MIN_ALIGN};
pub use engine::{
    IoEngine, IoOp, IoRequest, Pattern, StreamLimit, StreamOp, StreamSpec, StreamStats, UringEngine,
};
pub use error::{DevError, Result};
pub use probe::{probe, probe_head, Found, Probed};
pub use stats::{io_counters, IoCounters};
