//! Where a replica keeps its state on the device ([`Regions`]), and opening it: the log
//! and the storage engine, recovered or created, refusing a device that holds something
//! else.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::daemon::{self, DaemonError};
use crate::dev::{probe_head, DevError, Device, Found, UringEngine};
use crate::format::{Label, Layout};

use super::error::ReplicaError;
use super::kv::KvStore;
use super::log::LogStore;
use super::protocol::Entry;

/// Where on the device the log and the storage engine live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regions {
    pub log_offset: u64,
    pub log_len: u64,
    pub data_offset: u64,
    pub data_len: u64,
}

impl Regions {
    /// The layout used on a device that is not formatted as a daemon device: the first MiB
    /// is left alone, then a log of `log_len` bytes, then a data region of `data_len`.
    pub fn plain(log_len: u64, data_len: u64) -> Regions {
        Regions {
            log_offset: 1 << 20,
            log_len,
            data_offset: (1 << 20) + log_len,
            data_len,
        }
    }
    pub fn end(&self) -> u64 {
        (self.log_offset + self.log_len).max(self.data_offset + self.data_len)
    }

    /// The regions of a formatted daemon device (`core::format`): the log region after its
    /// init record block, and the first `data_len` bytes of the data region (all of it
    /// when smaller).
    pub fn formatted(layout: &Layout, data_len: u64) -> Regions {
        let block = crate::format::BLOCK as u64;
        Regions {
            log_offset: layout.log_offset + block,
            log_len: layout.log_len.saturating_sub(block),
            data_offset: layout.data_offset,
            data_len: data_len.min(layout.data_len) / block * block,
        }
    }

    /// Formatted regions when `path` carries a ready blocklab label (read with the daemon's
    /// own label reader), else [`Regions::plain`]`(log_len, data_len)`. Returns whether
    /// the device was formatted.
    pub fn detect(
        path: &Path,
        log_len: u64,
        data_len: u64,
    ) -> Result<(Regions, bool), ReplicaError> {
        let dev = Device::open_read_only(path)?;
        let mut eng = UringEngine::with_queue_depth(1)?;
        match daemon::read_label(&mut eng, &dev) {
            Ok(l) if l.is_ready() => Ok((Regions::formatted(&l.layout, data_len), true)),
            Err(DaemonError::Dev(e)) => Err(e.into()),
            _ => Ok((Regions::plain(log_len, data_len), false)),
        }
    }
}

/// The replica's I/O engine and its log.
pub(super) struct Storage {
    pub(super) eng: UringEngine,
    pub(super) log: LogStore,
}

/// Opens (or, with `fresh` or on a device without a log, creates) the log and the store.
/// Ownership is decided from the log region's first block alone: a replication log there
/// is ours; anything else needs `force` unless the device is empty. A block device is
/// opened once, exclusively (`O_EXCL`): a device that is mounted, held by device-mapper,
/// md or LVM, or used by another replica is refused ([`crate::dev::DevError::InUse`]);
/// the log and the store share that open. A device in use is waited for up to
/// [`RELEASE_WAIT`] first.
pub(super) fn open_storage(
    device: &Path,
    r: Regions,
    fresh: bool,
    force: bool,
) -> Result<(Storage, KvStore, Vec<Entry>), ReplicaError> {
    let mut eng = UringEngine::with_queue_depth(64)?;
    let dev = open_exclusive(device)?;
    dev.require_size(r.end())?;
    let kv_dev = dev.try_clone()?;
    let ours = LogStore::holds_log(&mut eng, &dev, r.log_offset)?;
    if ours && !fresh {
        let (log, entries) = LogStore::open(&mut eng, dev, r.log_offset, r.log_len)?;
        let kv = KvStore::open(&mut eng, kv_dev, r.data_offset, r.data_len)?;
        return Ok((Storage { eng, log }, kv, entries));
    }
    if !ours && !force {
        refuse_foreign(&mut eng, &dev)?;
    }
    let log = LogStore::create(&mut eng, dev, r.log_offset, r.log_len)?;
    let kv = KvStore::create(&mut eng, kv_dev, r.data_offset, r.data_len)?;
    Ok((Storage { eng, log }, kv, Vec::new()))
}

/// How long [`open_storage`] waits for a device in use to be released. A replica killed
/// just before still holds its claim after it exited, until the kernel has finished its
/// last I/O (io_uring tears down asynchronously): tens of milliseconds.
pub(super) const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// [`Device::open_exclusive`], retried while the device is in use for up to
/// [`RELEASE_WAIT`].
fn open_exclusive(device: &Path) -> Result<Device, ReplicaError> {
    let start = Instant::now();
    loop {
        match Device::open_exclusive(device) {
            Err(DevError::InUse { .. }) if start.elapsed() < RELEASE_WAIT => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(cause @ DevError::InUse { .. }) => {
                return Err(ReplicaError::Busy {
                    cause,
                    waited: RELEASE_WAIT,
                })
            }
            other => return Ok(other?),
        }
    }
}

/// Errs unless the device's first MiB is empty, naming what it holds (a daemon device's
/// cluster and daemon id).
fn refuse_foreign(eng: &mut UringEngine, dev: &Device) -> Result<(), ReplicaError> {
    // One read: the label is decoded from the bytes the probe read.
    let probed = probe_head(eng, dev)?;
    let found = match probed.found {
        Found::Empty => return Ok(()),
        Found::Blocklab => match Label::decode(probed.head()) {
            Ok(l) => format!(
                "a blocklab label of cluster {} daemon {} and no replication log",
                l.cluster_fsid, l.daemon_id
            ),
            Err(e) => format!("a damaged blocklab label ({e})"),
        },
        other => other.to_string(),
    };
    Err(ReplicaError::Foreign {
        path: dev.path().to_path_buf(),
        found,
    })
}
