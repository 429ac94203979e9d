//! Subcommands of the `blocklab` binary, one module per mechanism.

pub mod alloc;
pub mod ceph;
pub mod devices;
pub mod failover;
pub mod init;
pub mod lunmap;
pub mod proxy;
pub mod repl;
