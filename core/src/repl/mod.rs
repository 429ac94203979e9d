//! Log replication with idle-commit notification.
//!
//! * [`protocol`]: the replication protocol without I/O (tick/step/ready), with the five
//!   commit-notification policies.
//! * [`wire`]: the versioned, length-prefixed binary wire format.
//! * [`log`]: the log, persisted in a device region through the io_uring engine.
//! * [`kv`]: the key → value storage engine committed entries are applied to.
//! * [`apply`]: the worker thread that applies committed entries to it.
//! * [`transport`]: TCP links with an optional injected one-way delay.
//! * [`replica`]: a replica process: protocol + log + storage engine + transport.
//! * [`client`]: a blocking client for writes and status queries.

pub mod apply;
pub mod client;
pub mod kv;
pub mod log;
pub mod protocol;
pub mod replica;
pub mod transport;
pub mod wire;

pub use protocol::{
    AppendOutcome, Config, Entry, Message, Node, NodeId, Policy, ProtocolError, Ready, Stats,
};
