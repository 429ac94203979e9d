//! A real Ceph cluster, driven through Debian's Ceph 16 programs: one monitor on loopback
//! and BlueStore OSDs on block devices, deployed by the manual steps (ceph-volume is not
//! packaged and refuses loop devices). `init`'s Ceph backend deploys OSDs with it.
//!
//! Everything of a cluster lives in one directory under a private cluster name
//! ([`CLUSTER_NAME`]) with its monitor on a port of the caller's choosing, so a host's own
//! Ceph is not touched; [`CephCluster`] tears it down (its processes are found by the
//! config file on their command line).

mod asok;
mod cluster;
mod conf;
mod error;
mod monc;
pub mod osd;

pub use cluster::{missing, peak_rss_kib, processes, teardown, CephCluster, PROGRAMS};
pub use conf::{CephConf, CLUSTER_NAME};
pub use error::{CephError, Result};
pub use monc::{MonAnswer, MonClient, MonCommand, SessionReport, PYTHON};
pub use osd::{OsdMap, OsdState};
