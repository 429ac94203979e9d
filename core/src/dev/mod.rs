//! Block devices: `O_DIRECT` access, aligned buffers, the io_uring engine, probing for
//! foreign data, and loop-device provisioning.
//!
//! This module and `alloc::shm` are the only places with `unsafe` code; each block has a
//! `// SAFETY:` comment. The contract the ring depends on (buffers outlive their
//! requests) is kept inside [`engine`]: the public API is safe.

pub mod buf;
pub mod device;
pub mod engine;
pub mod error;
mod ioctl;
pub mod probe;
pub mod provision;

pub use buf::AlignedBuf;
pub use device::{Device, DeviceKind, MIN_ALIGN};
pub use engine::{
    IoEngine, IoOp, IoRequest, Pattern, StreamLimit, StreamOp, StreamSpec, StreamStats, UringEngine,
};
pub use error::{DevError, Result};
pub use probe::{probe, probe_head, Found, Probed};
