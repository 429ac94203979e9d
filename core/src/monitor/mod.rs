//! The monitor: the cluster map (fsid, epoch, daemons `new → formatted → up | failed`),
//! smallest-free id allocation (one id or a batch per request), key registration and init
//! reports. Changes are batched into proposals at most one per `propose_interval`; each
//! proposal is journaled and fsynced before any client is answered, and gets a new epoch.
//!
//! * [`map`]: the map and its changes; [`state`]: the proposal logic without I/O or clocks;
//! * [`journal`]: the [`journal::MapStore`] trait and the file journal; [`coord_store`]: the
//!   map on a coordination backend (embedded file store or ZooKeeper);
//! * [`server`]: the TCP server; [`client`]: the client library; [`proto`]: messages (over [`crate::jsonl`]).

pub mod client;
pub mod coord_store;
pub mod error;
pub mod journal;
pub mod map;
pub mod proto;
pub mod server;
pub mod state;

pub use client::{MonitorClient, DEFAULT_CONNECT_RETRY};
pub use coord_store::CoordStore;
pub use error::MonitorError;
pub use journal::{FileJournal, MapStore};
pub use map::{Change, ClusterMap, DaemonEntry, DaemonState};
pub use proto::{Outcome, Request, Response, Slot};
pub use server::Monitor;
pub use state::{MonitorState, ProposeConfig};
