//! Virtual-IP failover of the management service.
//!
//! * [`dispatcher`]: the task dispatcher's decisions as a deterministic state machine
//!   (heartbeats, peer health table, deterministic holder choice, epochs).
//! * [`journal`]: the operation journal (at most once per operation id; results kept), in a
//!   file or ([`coord_journal`]) in the coordination backend.
//! * [`service`]: the block service the nodes act on; executes, fences, delivers to the VIP.
//! * [`node`]: a node's management service + dispatcher (`blocklab mgmt serve`).
//! * [`vip`]: the `loopback` and `netns` VIP backends.
//! * [`client`]: the client (same-op-id resend) and the `client_retry` baseline.
//! * [`wire`]: the JSON-lines protocol.

pub mod client;
pub mod coord_journal;
pub mod dispatcher;
pub mod journal;
pub mod node;
pub mod service;
pub mod vip;
pub mod wire;
