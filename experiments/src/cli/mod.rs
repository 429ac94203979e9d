//! Subcommands of the `blocklab` binary, one module per mechanism.

pub mod devices;
pub mod init;
pub mod lunmap;
pub mod repl;
