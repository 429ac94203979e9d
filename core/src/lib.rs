//! blocklab: a research prototype of five control-plane mechanisms of a distributed
//! block store, each running against real Linux block devices through io_uring.
//!
//! The foundation is [`dev`]: block devices opened with `O_DIRECT`, aligned buffers, an
//! io_uring engine, and loop-device provisioning. The mechanisms build on it, one module
//! each (see the README and `docs/<mechanism>.md`).
//!
//! `unsafe` code is denied crate-wide and allowed only where the design puts it: the
//! io_uring engine, aligned buffers and ioctls of [`dev`], and the shared memory and its
//! process-shared lock of [`alloc`] (`alloc::shm`, `alloc::shm_lock`). Every block has a
//! `// SAFETY:` comment.

#![deny(unsafe_code)]

pub mod alloc;
pub mod ceph;
pub mod coord;
pub mod daemon;
pub mod delayproxy;
pub mod dev;
pub mod failover;
pub mod format;
pub mod fsutil;
pub mod init;
pub mod jsonl;
pub mod linelog;
pub mod lunmap;
pub mod monitor;
pub mod names;
pub mod netutil;
pub mod procstat;
pub mod repl;
#[cfg(feature = "testing")]
pub mod testing;
pub mod volume;
