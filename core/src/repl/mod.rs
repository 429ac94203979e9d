//! Log replication with idle-commit notification.
//!
//! * [`protocol`]: the replication protocol without I/O (tick/step/ready), with the five
//!   commit-notification policies.
//! * [`wire`]: the versioned, length-prefixed binary wire format.
//! * [`log`]: the log, persisted in a device region through the io_uring engine.
//! * [`kv`]: the key → value storage engine committed entries are applied to.
//! * [`apply`]: the worker thread that applies committed entries to it.
//! * [`check`]: the safety check of kill runs over timelines and final logs.
//! * [`transport`]: TCP links, one writer thread per connection.
//! * [`replica`]: a replica process: protocol + log + storage engine + transport; its
//!   options, [`replica::spawn`]/[`replica::run`] and the event loop. Its parts, private
//!   and re-exported from [`replica`] where public:
//!   * `error.rs`: [`replica::ReplicaError`] and [`replica::AdmitError`];
//!   * `spec.rs`: [`replica::PolicySpec`], a policy with durations, parsed and printed;
//!   * `storage.rs`: [`replica::Regions`] of the device, and opening the log and the
//!     storage engine in them;
//!   * `hooks.rs`: [`replica::Hooks`], in-process observers of the loop;
//!   * `peers.rs`: the connection threads: accepting, the primary's connections to its
//!     secondaries with handshake and reconnect backoff, reading frames into the loop.
//! * [`client`]: a blocking client for writes and status queries, and a pipelined one.
//! * [`events`]: a replica's timeline in a file, on the machine-wide monotonic clock.

pub mod apply;
pub mod check;
pub mod client;
mod error;
pub mod events;
mod hooks;
pub mod kv;
pub mod log;
mod peers;
pub mod protocol;
pub mod replica;
mod spec;
mod storage;
pub mod transport;
pub mod wire;

pub use protocol::{
    AppendOutcome, Config, Entry, Message, Node, NodeId, Policy, ProtocolError, Ready, Stats,
};
