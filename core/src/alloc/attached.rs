//! The segments a process has attached ([`Attached`]) and where each segment of a node
//! directory lives. Everything that works on a node's shared memory starts from here: the
//! allocators ([`super::allocator`], [`super::central`]), recovery ([`super::recovery`]),
//! the audit and the node process ([`super::node`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::segs::{DeviceSeg, NodeSeg, ProcSeg, UnfilledSeg, MAX_DEVICES};
use super::shm::RetainingSlot;
use super::{AllocError, Strategy};

/// The segments a process has attached.
#[derive(Debug)]
pub struct Attached {
    pub dir: PathBuf,
    pub node: NodeSeg,
    /// The node's fence protocol is asymmetric (read once at attach).
    pub asym: bool,
    pub unfilled: UnfilledSeg,
    devices: Vec<RetainingSlot<DeviceSeg>>,
    epoch_seen: AtomicU64,
    refresh_lock: Mutex<()>,
    /// Serialises this process's segment creation and removal, registrations and
    /// recoveries (the leader's connection threads, its own scan, a takeover).
    admin: Mutex<()>,
}

pub fn node_path(dir: &Path) -> PathBuf {
    dir.join("node.shm")
}
pub fn unfilled_path(dir: &Path) -> PathBuf {
    dir.join("unfilled.shm")
}
pub fn device_path(dir: &Path, i: u16) -> PathBuf {
    dir.join(format!("dev-{i}.shm"))
}
pub fn proc_path(dir: &Path, id: u16) -> PathBuf {
    dir.join(format!("proc-{id}.shm"))
}
pub fn central_socket(dir: &Path) -> PathBuf {
    dir.join("central.sock")
}

pub(super) fn io<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> AllocError + 'a {
    move |source| AllocError::Os {
        path: path.to_path_buf(),
        op,
        cause: source,
    }
}

impl Attached {
    /// Attaches the node's segments in `dir` (refusing wrong magic/version).
    pub fn open(dir: &Path) -> Result<Attached, AllocError> {
        let node = NodeSeg::attach(&node_path(dir))?;
        let at = Attached {
            dir: dir.to_path_buf(),
            asym: node.asymmetric_fence(),
            node,
            unfilled: UnfilledSeg::attach(&unfilled_path(dir))?,
            devices: (0..MAX_DEVICES).map(|_| RetainingSlot::default()).collect(),
            epoch_seen: AtomicU64::new(u64::MAX),
            refresh_lock: Mutex::new(()),
            admin: Mutex::new(()),
        };
        at.refresh()?;
        Ok(at)
    }

    /// [`open`](Self::open), refusing a node created with another strategy or block size.
    pub fn open_checked(
        dir: &Path,
        strategy: Strategy,
        block_size: u64,
    ) -> Result<Attached, AllocError> {
        let at = Self::open(dir)?;
        let (s, bs) = (at.node.strategy(), at.node.block_size());
        if s != Some(strategy) || bs != block_size {
            return Err(AllocError::BadSegment {
                path: node_path(dir),
                reason: format!(
                    "node was created with strategy {} and block size {bs}, this process runs {strategy} with {block_size}",
                    s.map_or("unknown".to_string(), |s| s.to_string()),
                ),
            });
        }
        Ok(at)
    }

    /// Takes the `admin` lock (see the field).
    pub(super) fn admin(&self) -> MutexGuard<'_, ()> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches device segments that appeared since the last look, replacing an offline
    /// one whose index was given to a new segment (cheap when the node's device epoch did
    /// not move).
    pub fn refresh(&self) -> Result<(), AllocError> {
        let epoch = self.node.device_epoch().load(Ordering::Acquire);
        if self.epoch_seen.load(Ordering::Acquire) == epoch {
            return Ok(());
        }
        self.rescan(epoch)
    }

    /// [`refresh`](Self::refresh) whatever the epoch says: for the leader's segment
    /// changes and recovery, which must also see a segment whose creator died before it
    /// bumped the epoch.
    pub fn rescan_devices(&self) -> Result<(), AllocError> {
        self.rescan(self.node.device_epoch().load(Ordering::Acquire))
    }

    fn rescan(&self, epoch: u64) -> Result<(), AllocError> {
        let _g = self.refresh_lock.lock().unwrap_or_else(|e| e.into_inner());
        for (i, slot) in self.devices.iter().enumerate() {
            // An online segment keeps its index: it goes offline before it is unlinked.
            let cur = slot.get();
            if cur.is_some_and(|d| d.is_online()) {
                continue;
            }
            let path = device_path(&self.dir, i as u16);
            match DeviceSeg::attach(&path) {
                Ok(d) if d.index() != i as u16 => {
                    // Its header is shared memory: an index that does not match the file
                    // would alias another device's slot.
                    return Err(AllocError::BadSegment {
                        path,
                        reason: format!(
                            "segment of device {} in the file of device {i}",
                            d.index()
                        ),
                    });
                }
                Ok(d) => {
                    if cur.map(|c| c.serial()) != Some(d.serial()) {
                        slot.set(d);
                    }
                }
                Err(AllocError::NoSegment { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.epoch_seen.store(epoch, Ordering::Release);
        Ok(())
    }

    /// Device segment `i` (attaching it if it appeared).
    #[inline]
    pub fn device(&self, i: u16) -> Result<&DeviceSeg, AllocError> {
        let slot = self
            .devices
            .get(i as usize)
            .ok_or(AllocError::NoDevice { dev: i })?;
        if let Some(d) = slot.get() {
            return Ok(d);
        }
        self.refresh()?;
        slot.get().ok_or(AllocError::NoDevice { dev: i })
    }

    /// After `old` (device `i`) was found offline: the newer segment that took index `i`
    /// since, if any.
    pub fn reattach(&self, i: u16, old: &DeviceSeg) -> Result<Option<&DeviceSeg>, AllocError> {
        self.refresh()?;
        let d = self.device(i)?;
        Ok((!std::ptr::eq(d, old) && d.is_online()).then_some(d))
    }

    /// Every attached device segment (online or not).
    pub fn attached_devices(&self) -> impl Iterator<Item = &DeviceSeg> {
        self.devices.iter().filter_map(|d| d.get())
    }

    /// Indexes of the online devices.
    pub fn online_devices(&self) -> Vec<u16> {
        let _ = self.refresh();
        self.attached_devices()
            .filter(|d| d.is_online())
            .map(|d| d.index())
            .collect()
    }

    /// Every process record in the node directory.
    pub fn proc_records(&self) -> Result<Vec<(PathBuf, ProcSeg)>, AllocError> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir).map_err(io(&self.dir, "readdir"))?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("proc-") && name.ends_with(".shm") {
                match ProcSeg::attach(&e.path()) {
                    Ok(p) => out.push((e.path(), p)),
                    Err(AllocError::NoSegment { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}
