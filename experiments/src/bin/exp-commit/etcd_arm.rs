//! The production reference: a 3-member etcd cluster under the same sparse writes.

use std::path::Path;
use std::time::Duration;

use anyhow::bail;

use crate::measure::Measured;

/// Fails unless etcd is installed.
pub fn check_installed() -> anyhow::Result<()> {
    bail!("the etcd reference is not wired in yet (--etcd-rtt none skips it)")
}

/// One run: `writes` puts at Poisson `rate` through a leader, each follower's watch.
pub fn run(
    _bin: &Path,
    _rtt: Duration,
    _jitter: f64,
    _writes: u64,
    _rate: f64,
    _seed: u64,
    _scratch: &Path,
) -> anyhow::Result<Measured> {
    bail!("not wired in yet")
}
