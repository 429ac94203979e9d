//! The volume store: devices, the free-space bitmaps, the persisted catalog.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::daemon::DaemonError;
use crate::dev::{probe, AlignedBuf, DevError, Device, Found, IoEngine, IoRequest, UringEngine};
use crate::format::{Bitmap, Layout, LayoutParams, Superblock, BLOCK};

use super::copy::{copy_extents, CopyBuffers, CopyStats};
use super::extent::Extent;

/// One volume of the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    pub size: u64,
    pub extents: Vec<Extent>,
}

/// What a committed operation changed. Recorded under its operation id in the same catalog
/// write as the change itself, so a caller that crashed after the commit (before its own
/// record of the outcome) finds the outcome here instead of running the operation again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Applied {
    Created {
        name: String,
        size: u64,
    },
    Deleted {
        name: String,
    },
    Copied {
        src: String,
        dst: String,
        bytes: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct AppliedOp {
    op_id: String,
    #[serde(flatten)]
    change: Applied,
}

/// How many applied operations the catalog remembers (newest last). Only the newest one
/// can be unrecorded by its caller after a crash (the store runs one operation at a time),
/// so a short window is enough.
pub const APPLIED_KEEP: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeviceRecord {
    path: PathBuf,
    size: u64,
    /// The daemon uuid of a formatted device (None: a blank device used raw).
    daemon_uuid: Option<uuid::Uuid>,
}

/// The catalog format this build writes; it reads versions 2 (without `applied`) and 3.
const CATALOG_VERSION: u32 = 3;
const CATALOG_VERSIONS_READ: std::ops::RangeInclusive<u32> = 2..=CATALOG_VERSION;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Catalog {
    version: u32,
    devices: Vec<DeviceRecord>,
    volumes: BTreeMap<String, Volume>,
    #[serde(default)]
    applied: Vec<AppliedOp>,
}

/// One device of the store: its layout and free-space bitmap.
struct DevState {
    layout: Layout,
    bitmap: Bitmap,
    /// A formatted daemon device's superblock (its bitmap and counters live on the device);
    /// `None` for a blank device used raw.
    superblock: Option<Superblock>,
}

/// Errors of the volume store. Each names what was wrong in one line.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {0:?} already exists")]
    Exists(String),
    #[error("no volume named {0:?}")]
    Unknown(String),
    #[error("volume size {requested} bytes exceeds the free space ({free} bytes free)")]
    NoSpace { requested: u64, free: u64 },
    #[error("invalid volume name {0:?}: use 1-64 characters of [A-Za-z0-9._-]")]
    BadName(String),
    #[error("invalid volume size {0}: must be a positive multiple of 4096 bytes")]
    BadSize(u64),
    #[error("volume {name:?}: bytes {off}..{end} are not 4096-aligned inside its {size} bytes")]
    BadRange {
        name: String,
        off: u64,
        end: u64,
        size: u64,
    },
    #[error("invalid store setting: {0}")]
    Config(String),
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("{path}: holds {found} — refusing to use it for volumes (pass --force to overwrite)")]
    Foreign { path: PathBuf, found: String },
    #[error("{path}: too small for volumes ({size} bytes): {reason}")]
    TooSmall {
        path: PathBuf,
        size: u64,
        reason: String,
    },
    #[error("catalog {path}: {msg}")]
    Catalog { path: PathBuf, msg: String },
    #[error("store device list differs from the catalog: {0}")]
    DeviceMismatch(String),
    #[error("volume store {0} is in use by another process (locked)")]
    Locked(PathBuf),
    #[error("copy of {0:?} was stopped before it finished")]
    Stopped(String),
    #[error(transparent)]
    Dev(#[from] DevError),
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// How a store lays volumes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    /// Allocation unit for blank (unformatted) devices; formatted ones use their own.
    pub unit: u64,
    /// Copy chunk size (a positive multiple of 4096) and requests in flight (1..=2048).
    pub copy_chunk: u64,
    pub copy_depth: usize,
}

/// The most copy chunks in flight [`StoreConfig::copy_depth`] allows.
pub const MAX_COPY_DEPTH: usize = 2048;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            unit: 1 << 20,
            copy_chunk: 1 << 20,
            copy_depth: 8,
        }
    }
}

/// Most bytes of copy buffers a store keeps (2 × chunk × depth).
pub const MAX_COPY_BUFFERS: u64 = 1 << 30;

impl StoreConfig {
    /// Checks the settings: one line naming the bad one.
    pub fn validate(&self) -> Result<(), VolumeError> {
        let b = BLOCK as u64;
        if self.unit == 0 || self.unit % b != 0 || self.unit > u32::MAX as u64 {
            return Err(VolumeError::Config(format!(
                "allocation unit {} must be a positive multiple of {b} bytes below 4 GiB",
                self.unit
            )));
        }
        if self.copy_chunk == 0 || self.copy_chunk % b != 0 || self.copy_chunk > 1 << 30 {
            return Err(VolumeError::Config(format!(
                "copy chunk {} must be a positive multiple of {b} bytes, at most 1 GiB",
                self.copy_chunk
            )));
        }
        if self.copy_depth == 0 || self.copy_depth > MAX_COPY_DEPTH {
            return Err(VolumeError::Config(format!(
                "copy depth {} must be 1..={MAX_COPY_DEPTH}",
                self.copy_depth
            )));
        }
        // The copy keeps a read and a write buffer per slot for the store's lifetime.
        let buffers = 2 * self.copy_chunk * self.copy_depth as u64;
        if buffers > MAX_COPY_BUFFERS {
            return Err(VolumeError::Config(format!(
                "copy chunk {} × depth {} needs {buffers} bytes of buffers, more than {MAX_COPY_BUFFERS}",
                self.copy_chunk, self.copy_depth
            )));
        }
        Ok(())
    }
}

/// The volumes of a set of devices.
pub struct VolumeStore {
    dir: PathBuf,
    cfg: StoreConfig,
    devs: Vec<DevState>,
    devices: Vec<Device>,
    catalog: Catalog,
    engine: UringEngine,
    /// The copy pipeline's buffers, allocated at the first copy and kept.
    copy_bufs: Option<CopyBuffers>,
    /// `flock` on `volumes.lock`: one store per directory.
    _lock: File,
}

impl std::fmt::Debug for VolumeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeStore")
            .field("dir", &self.dir)
            .field("volumes", &self.catalog.volumes.len())
            .finish()
    }
}

fn catalog_path(dir: &Path) -> PathBuf {
    dir.join("volumes.json")
}

pub(crate) fn check_name(name: &str) -> Result<(), VolumeError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(VolumeError::BadName(name.to_string()))
    }
}

/// Takes the store directory's lock (`volumes.lock`, `flock`), or says who holds it.
fn lock_dir(dir: &Path) -> Result<File, VolumeError> {
    let path = dir.join("volumes.lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| VolumeError::Io {
            path: path.clone(),
            cause: source,
        })?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(|_| VolumeError::Locked(dir.to_path_buf()))?;
    Ok(f)
}

fn read_catalog(dir: &Path) -> Result<Option<Catalog>, VolumeError> {
    let path = catalog_path(dir);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(VolumeError::Io {
                path,
                cause: source,
            })
        }
    };
    let bad = |msg: String| VolumeError::Catalog {
        path: path.clone(),
        msg,
    };
    let c: Catalog = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if !CATALOG_VERSIONS_READ.contains(&c.version) {
        return Err(bad(format!(
            "version {} is not supported (this build reads versions {}..={})",
            c.version,
            CATALOG_VERSIONS_READ.start(),
            CATALOG_VERSIONS_READ.end()
        )));
    }
    Ok(Some(c))
}

/// Merges ranges (sorted by start) that overlap or touch.
fn merge(mut v: Vec<Range<u64>>) -> Vec<Range<u64>> {
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in v {
        match out.last_mut() {
            Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

impl VolumeStore {
    /// Opens the store in `dir` over `devices` (one store per directory: a second open
    /// fails with [`VolumeError::Locked`]). Formatted daemon devices (a ready blocklab
    /// label) are mounted with [`crate::daemon::mount`] (every checksum verified) and used
    /// through their layout and on-device free-space bitmap; blank devices get the same
    /// layout computed in memory (bitmap not persisted on them). A device with any other
    /// data is refused unless `force` (first open only: later opens check the device list
    /// matches the catalog). Every bitmap is then reconciled with the catalog (the catalog
    /// wins) and a formatted device's bitmap and superblock counter rewritten if they differ.
    pub fn open(
        dir: &Path,
        devices: &[PathBuf],
        cfg: StoreConfig,
        force: bool,
    ) -> Result<VolumeStore, VolumeError> {
        cfg.validate()?;
        fs::create_dir_all(dir).map_err(|source| VolumeError::Io {
            path: dir.to_path_buf(),
            cause: source,
        })?;
        let lock = lock_dir(dir)?;
        let mut engine = UringEngine::with_queue_depth(cfg.copy_depth.max(2) as u32 * 2)?;
        let opened: Vec<Device> = devices.iter().map(Device::open).collect::<Result<_, _>>()?;
        let existing = read_catalog(dir)?;
        let mut devs = Vec::new();
        let mut records = Vec::new();
        for (i, d) in opened.iter().enumerate() {
            let found = probe(&mut engine, d)?;
            let known = existing.as_ref().and_then(|c| c.devices.get(i));
            let (state, uuid) = if matches!(found, Found::Blocklab) {
                let m = crate::daemon::mount(&mut engine, d)?;
                let uuid = m.label.daemon_uuid;
                (
                    DevState {
                        layout: m.label.layout,
                        bitmap: m.bitmap,
                        superblock: Some(m.superblock),
                    },
                    Some(uuid),
                )
            } else {
                if let Some(u) = known.and_then(|r| r.daemon_uuid) {
                    return Err(VolumeError::DeviceMismatch(format!(
                        "{}: the catalog records the formatted daemon device {u}, but the \
                         device now holds {found} (wrong device, or it was overwritten)",
                        d.path().display()
                    )));
                }
                // Blank (or, on first open with force, overwritten): compute a layout.
                let raw_ok = known.is_some() || force || matches!(found, Found::Empty);
                if !raw_ok {
                    return Err(VolumeError::Foreign {
                        path: d.path().to_path_buf(),
                        found: found.to_string(),
                    });
                }
                let layout = Layout::compute(
                    d.size(),
                    LayoutParams {
                        alloc_unit: cfg.unit as u32,
                        ..LayoutParams::default()
                    },
                )
                .map_err(|e| VolumeError::TooSmall {
                    path: d.path().to_path_buf(),
                    size: d.size(),
                    reason: e.to_string(),
                })?;
                let bitmap = Bitmap::initial(&layout);
                (
                    DevState {
                        layout,
                        bitmap,
                        superblock: None,
                    },
                    None,
                )
            };
            records.push(DeviceRecord {
                path: d.path().to_path_buf(),
                size: d.size(),
                daemon_uuid: uuid,
            });
            devs.push(state);
        }
        let catalog = match existing {
            Some(c) => {
                let want: Vec<(&PathBuf, u64, Option<uuid::Uuid>)> = c
                    .devices
                    .iter()
                    .map(|d| (&d.path, d.size, d.daemon_uuid))
                    .collect();
                let have: Vec<(&PathBuf, u64, Option<uuid::Uuid>)> = records
                    .iter()
                    .map(|d| (&d.path, d.size, d.daemon_uuid))
                    .collect();
                if want != have {
                    return Err(VolumeError::DeviceMismatch(format!(
                        "catalog has {want:?}, found {have:?}"
                    )));
                }
                c
            }
            None => {
                let c = Catalog {
                    version: CATALOG_VERSION,
                    devices: records,
                    volumes: BTreeMap::new(),
                    applied: Vec::new(),
                };
                write_catalog(dir, &c)?;
                c
            }
        };
        let mut store = VolumeStore {
            dir: dir.to_path_buf(),
            cfg,
            devs,
            devices: opened,
            catalog,
            engine,
            copy_bufs: None,
            _lock: lock,
        };
        store.reconcile()?;
        Ok(store)
    }

    fn unit(&self, d: usize) -> u64 {
        self.devs[d].layout.alloc_unit as u64
    }

    fn units_of(&self, e: &Extent) -> Range<u64> {
        let au = self.unit(e.device);
        e.offset / au..(e.offset + e.len) / au
    }

    fn catalog_err(&self, msg: String) -> VolumeError {
        VolumeError::Catalog {
            path: catalog_path(&self.dir),
            msg,
        }
    }

    /// Rebuilds every bitmap from the layout and the catalog (refusing extents that name no
    /// device, are not unit-aligned, or overlap); rewrites a formatted device's bitmap and
    /// superblock counter if they differ (units leaked or lost by a crash between the
    /// bitmap write and the catalog commit, or a counter left stale by a crash between the
    /// bitmap and superblock writes).
    fn reconcile(&mut self) -> Result<(), VolumeError> {
        let mut fresh: Vec<Bitmap> = self
            .devs
            .iter()
            .map(|d| Bitmap::initial(&d.layout))
            .collect();
        for v in self.catalog.volumes.values() {
            for e in &v.extents {
                if e.device >= self.devs.len() {
                    return Err(self.catalog_err(format!(
                        "volume {:?}: extent on device {} of {}",
                        v.name,
                        e.device,
                        self.devs.len()
                    )));
                }
                let au = self.unit(e.device);
                if e.len == 0 || e.offset % au != 0 || e.len % au != 0 {
                    return Err(self.catalog_err(format!(
                        "volume {:?}: extent {e:?} is not a whole number of {au}-byte units",
                        v.name
                    )));
                }
                let r = self.units_of(e);
                fresh[e.device]
                    .allocate(r)
                    .map_err(|err| self.catalog_err(format!("volume {:?}: {err}", v.name)))?;
            }
        }
        let mut rewrite = Vec::new();
        for (i, b) in fresh.into_iter().enumerate() {
            let d = &mut self.devs[i];
            let stale = d
                .superblock
                .as_ref()
                .is_some_and(|sb| sb.used_units != b.used());
            let differs = d.bitmap != b;
            d.bitmap = b;
            if d.superblock.is_some() && (differs || stale) {
                rewrite.push((i, 0..d.layout.total_units()));
            }
        }
        self.persist(rewrite)
    }

    /// Writes, for each formatted device in `touched`, the bitmap blocks covering its unit
    /// ranges and the superblock with the bitmap's counter, all in one batch, then one
    /// `fdatasync` per device (in one more batch).
    fn persist(&mut self, touched: Vec<(usize, Range<u64>)>) -> Result<(), VolumeError> {
        let mut blocks: BTreeMap<usize, Vec<Range<u64>>> = BTreeMap::new();
        for (d, units) in touched {
            if self.devs[d].superblock.is_some() {
                blocks.entry(d).or_default().push(Bitmap::blocks_of(&units));
            }
        }
        if blocks.is_empty() {
            return Ok(());
        }
        let mut writes: Vec<(usize, u64, AlignedBuf)> = Vec::new();
        for (&d, ranges) in &blocks {
            let st = &mut self.devs[d];
            let bytes = st.bitmap.as_bytes();
            for r in merge(ranges.clone()) {
                let lo = (r.start as usize * BLOCK).min(bytes.len());
                let hi = (r.end as usize * BLOCK).min(bytes.len());
                if lo < hi {
                    writes.push((
                        d,
                        st.layout.bitmap_offset + lo as u64,
                        AlignedBuf::from_slice(&bytes[lo..hi]),
                    ));
                }
            }
            if let Some(sb) = st.superblock.as_mut() {
                sb.used_units = st.bitmap.used();
                sb.generation += 1;
                writes.push((
                    d,
                    st.layout.superblock_offset,
                    AlignedBuf::from_slice(&sb.encode()),
                ));
            }
        }
        let devices = &self.devices;
        let mut reqs: Vec<IoRequest<'_>> = writes
            .iter()
            .map(|(d, off, b)| IoRequest::write(&devices[*d], *off, b))
            .collect();
        self.engine.execute(&mut reqs)?;
        let mut syncs: Vec<IoRequest<'_>> = blocks
            .keys()
            .map(|&d| IoRequest::fdatasync(&devices[d]))
            .collect();
        self.engine.execute(&mut syncs)?;
        Ok(())
    }

    /// Persists the bitmap units of `extents` (grouped by device).
    fn persist_extents(&mut self, extents: &[Extent]) -> Result<(), VolumeError> {
        let touched = extents
            .iter()
            .map(|e| (e.device, self.units_of(e)))
            .collect();
        self.persist(touched)
    }

    /// Free bytes over all devices' data regions.
    pub fn free_bytes(&self) -> u64 {
        self.devs
            .iter()
            .map(|d| d.bitmap.free() * d.layout.alloc_unit as u64)
            .sum()
    }

    pub fn list(&self) -> Vec<Volume> {
        self.catalog.volumes.values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<&Volume> {
        self.catalog.volumes.get(name)
    }

    /// Whether device `i` is a formatted daemon device (bitmap on the device).
    pub fn is_formatted(&self, i: usize) -> bool {
        self.catalog
            .devices
            .get(i)
            .is_some_and(|r| r.daemon_uuid.is_some())
    }

    /// What the operation `op_id` changed, if its change was committed (and it is among the
    /// last [`APPLIED_KEEP`] operations).
    pub fn applied(&self, op_id: &str) -> Option<&Applied> {
        self.catalog
            .applied
            .iter()
            .rev()
            .find(|a| a.op_id == op_id)
            .map(|a| &a.change)
    }

    /// Allocates `size` bytes, first fit within a device, trying the devices not in
    /// `avoid` first (a copy's destination away from its source's devices). Marks the
    /// units used in memory; nothing is persisted.
    fn allocate(&mut self, size: u64, avoid: &BTreeSet<usize>) -> Result<Vec<Extent>, VolumeError> {
        let free = self.free_bytes();
        let mut order: Vec<usize> = (0..self.devs.len()).collect();
        order.sort_by_key(|d| avoid.contains(d));
        let mut left = size;
        let mut out: Vec<Extent> = Vec::new();
        for d in order {
            let au = self.unit(d);
            let bitmap = &self.devs[d].bitmap;
            let total = self.devs[d].layout.total_units();
            let mut u = self.devs[d].layout.first_data_unit();
            while u < total && left > 0 {
                if bitmap.is_used(u) {
                    u += 1;
                    continue;
                }
                let start = u;
                let want = left.div_ceil(au);
                while u < total && !bitmap.is_used(u) && u - start < want {
                    u += 1;
                }
                let n = u - start;
                out.push(Extent {
                    device: d,
                    offset: start * au,
                    len: n * au,
                });
                left = left.saturating_sub(n * au);
            }
            if left == 0 {
                break;
            }
        }
        if left > 0 {
            return Err(VolumeError::NoSpace {
                requested: size,
                free,
            });
        }
        for e in &out {
            let r = self.units_of(e);
            self.devs[e.device]
                .bitmap
                .allocate(r)
                .map_err(|err| VolumeError::Format {
                    path: self.devices[e.device].path().to_path_buf(),
                    msg: err.to_string(),
                })?;
        }
        Ok(out)
    }

    fn release_in_memory(&mut self, extents: &[Extent]) {
        for e in extents {
            let r = self.units_of(e);
            let _ = self.devs[e.device].bitmap.release(r);
        }
    }

    /// Records `change` under `op_id` (if any) in the in-memory catalog, to be committed
    /// with the change; returns what to undo it with.
    fn note_applied(&mut self, op_id: Option<&str>, change: Applied) -> Vec<AppliedOp> {
        let before = self.catalog.applied.clone();
        if let Some(id) = op_id {
            self.catalog.applied.retain(|a| a.op_id != id);
            self.catalog.applied.push(AppliedOp {
                op_id: id.to_string(),
                change,
            });
            let n = self.catalog.applied.len();
            if n > APPLIED_KEEP {
                self.catalog.applied.drain(..n - APPLIED_KEEP);
            }
        }
        before
    }

    fn commit(&mut self) -> Result<(), VolumeError> {
        self.catalog.version = CATALOG_VERSION;
        write_catalog(&self.dir, &self.catalog)
    }

    /// Creates a volume of `size` bytes: bitmap units marked used on the devices first,
    /// then the catalog entry (the commit point), recorded as applied by `op_id`.
    pub fn create(
        &mut self,
        name: &str,
        size: u64,
        op_id: Option<&str>,
    ) -> Result<Volume, VolumeError> {
        check_name(name)?;
        if size == 0 || size % BLOCK as u64 != 0 {
            return Err(VolumeError::BadSize(size));
        }
        if self.catalog.volumes.contains_key(name) {
            return Err(VolumeError::Exists(name.to_string()));
        }
        let extents = self.allocate(size, &BTreeSet::new())?;
        let v = Volume {
            name: name.to_string(),
            size,
            extents: extents.clone(),
        };
        self.insert_committed(
            v.clone(),
            op_id,
            Applied::Created {
                name: name.to_string(),
                size,
            },
        )?;
        Ok(v)
    }

    /// Persists the bitmap units of a new volume, then commits it to the catalog with its
    /// applied record; undoes everything in memory on failure.
    fn insert_committed(
        &mut self,
        v: Volume,
        op_id: Option<&str>,
        change: Applied,
    ) -> Result<(), VolumeError> {
        let name = v.name.clone();
        let extents = v.extents.clone();
        self.catalog.volumes.insert(name.clone(), v);
        let applied_before = self.note_applied(op_id, change);
        let res = self.persist_extents(&extents).and_then(|_| self.commit());
        if let Err(e) = res {
            self.catalog.volumes.remove(&name);
            self.catalog.applied = applied_before;
            self.release_in_memory(&extents);
            return Err(e);
        }
        Ok(())
    }

    /// Deletes a volume: the catalog entry goes first (the commit point, recorded as
    /// applied by `op_id`), then its units are freed in the bitmaps.
    pub fn delete(&mut self, name: &str, op_id: Option<&str>) -> Result<Volume, VolumeError> {
        let v = self
            .catalog
            .volumes
            .remove(name)
            .ok_or_else(|| VolumeError::Unknown(name.to_string()))?;
        let applied_before = self.note_applied(
            op_id,
            Applied::Deleted {
                name: name.to_string(),
            },
        );
        if let Err(e) = self.commit() {
            self.catalog.volumes.insert(name.to_string(), v);
            self.catalog.applied = applied_before;
            return Err(e);
        }
        self.release_in_memory(&v.extents);
        // Past the commit point the delete has happened (the catalog records it under the
        // operation id), so it is reported as done: a failure here only leaves units marked
        // used on the device, which the next open reconciles.
        let _ = self.persist_extents(&v.extents);
        Ok(v)
    }

    /// Copies `src` into a new volume `dst` of the same size, placed on other devices than
    /// the source's where there is room. `progress(bytes)` is called as the copy advances;
    /// returning false stops it: the destination is freed and the error is `Stopped`.
    /// Errors come with the bytes copied before them. The volume is committed (recorded as
    /// applied by `op_id`) only after its data is flushed.
    pub fn copy(
        &mut self,
        src: &str,
        dst: &str,
        op_id: Option<&str>,
        progress: &mut dyn FnMut(u64) -> bool,
    ) -> Result<(Volume, CopyStats), (VolumeError, u64)> {
        check_name(dst).map_err(|e| (e, 0))?;
        let s = self
            .catalog
            .volumes
            .get(src)
            .cloned()
            .ok_or_else(|| (VolumeError::Unknown(src.to_string()), 0))?;
        if self.catalog.volumes.contains_key(dst) {
            return Err((VolumeError::Exists(dst.to_string()), 0));
        }
        let avoid: BTreeSet<usize> = s.extents.iter().map(|e| e.device).collect();
        let extents = self.allocate(s.size, &avoid).map_err(|e| (e, 0))?;
        let (chunk, depth) = (self.cfg.copy_chunk, self.cfg.copy_depth);
        let bufs = self
            .copy_bufs
            .get_or_insert_with(|| CopyBuffers::new(chunk as usize, depth));
        let mut done = 0u64;
        let res = copy_extents(
            &mut self.engine,
            &self.devices,
            &s.extents,
            &extents,
            s.size,
            bufs,
            &mut |b| {
                done = b;
                progress(b)
            },
        );
        let stats = match res {
            Ok((stats, true)) => stats,
            Ok((stats, false)) => {
                self.release_in_memory(&extents);
                return Err((VolumeError::Stopped(dst.to_string()), stats.bytes));
            }
            Err(e) => {
                self.release_in_memory(&extents);
                return Err((e.into(), done));
            }
        };
        let v = Volume {
            name: dst.to_string(),
            size: s.size,
            extents,
        };
        let change = Applied::Copied {
            src: src.to_string(),
            dst: dst.to_string(),
            bytes: stats.bytes,
        };
        self.insert_committed(v.clone(), op_id, change)
            .map_err(|e| (e, stats.bytes))?;
        Ok((v, stats))
    }

    /// The volume `name`, checking that `off..off+len` is 4 KiB aligned and inside it.
    fn range_of(&self, name: &str, off: u64, len: u64) -> Result<Volume, VolumeError> {
        let v = self
            .get(name)
            .cloned()
            .ok_or_else(|| VolumeError::Unknown(name.to_string()))?;
        let b = BLOCK as u64;
        let end = off.checked_add(len);
        match end {
            Some(end) if end <= v.size && off % b == 0 && len % b == 0 => Ok(v),
            _ => Err(VolumeError::BadRange {
                name: name.to_string(),
                off,
                end: end.unwrap_or(u64::MAX),
                size: v.size,
            }),
        }
    }

    /// Writes `data` at logical offset `off` of a volume (4 KiB aligned, inside the volume)
    /// and flushes the devices it touched, for tests and tools.
    pub fn write(&mut self, name: &str, off: u64, data: &[u8]) -> Result<(), VolumeError> {
        let v = self.range_of(name, off, data.len() as u64)?;
        let buf = AlignedBuf::from_slice(data);
        self.rw(&v, off, data.len() as u64, |eng, dev, doff, lo, len| {
            eng.write_at(dev, doff, &buf[lo..lo + len])
        })?;
        let touched: BTreeSet<usize> = v.extents.iter().map(|e| e.device).collect();
        let mut syncs: Vec<IoRequest<'_>> = touched
            .iter()
            .map(|&d| IoRequest::fdatasync(&self.devices[d]))
            .collect();
        self.engine.execute(&mut syncs)?;
        Ok(())
    }

    /// Reads `len` bytes at logical offset `off` of a volume (4 KiB aligned, inside it).
    pub fn read(&mut self, name: &str, off: u64, len: usize) -> Result<Vec<u8>, VolumeError> {
        let v = self.range_of(name, off, len as u64)?;
        let mut tmp = AlignedBuf::new(len);
        self.rw(&v, off, len as u64, |eng, dev, doff, lo, l| {
            eng.read_at(dev, doff, &mut tmp[lo..lo + l])
        })?;
        Ok(tmp[..len].to_vec())
    }

    fn rw(
        &mut self,
        v: &Volume,
        off: u64,
        len: u64,
        mut f: impl FnMut(&mut UringEngine, &Device, u64, usize, usize) -> Result<(), DevError>,
    ) -> Result<(), VolumeError> {
        let mut logical = 0u64;
        let end = off + len;
        for e in &v.extents {
            let (a, b) = (logical, logical + e.len);
            let (lo, hi) = (a.max(off), b.min(end));
            if lo < hi {
                f(
                    &mut self.engine,
                    &self.devices[e.device],
                    e.offset + (lo - a),
                    (lo - off) as usize,
                    (hi - lo) as usize,
                )?;
            }
            logical = b;
        }
        Ok(())
    }
}

fn write_catalog(dir: &Path, c: &Catalog) -> Result<(), VolumeError> {
    let path = catalog_path(dir);
    let bytes = serde_json::to_vec_pretty(c).map_err(|e| VolumeError::Catalog {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    crate::fsutil::write_atomic(&path, &bytes).map_err(|source| VolumeError::Io {
        path,
        cause: source,
    })
}
