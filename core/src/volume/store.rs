//! The volume store: devices, the free-space bitmaps, the persisted catalog.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dev::{probe, AlignedBuf, DevError, Device, Found, IoEngine, UringEngine};
use crate::format::{Bitmap, FormatError, Label, Layout, LayoutParams, Superblock, BLOCK};

use super::copy::{copy_extents, CopyStats};

/// A contiguous byte range of one device (by index into the store's device list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub device: usize,
    pub offset: u64,
    pub len: u64,
}

/// One volume of the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    pub size: u64,
    pub extents: Vec<Extent>,
    /// The operation that created it (lets a re-run of that operation recognise its work).
    pub created_by: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeviceRecord {
    path: PathBuf,
    size: u64,
    /// The daemon uuid of a formatted device (None: a blank device used raw).
    daemon_uuid: Option<uuid::Uuid>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Catalog {
    version: u32,
    devices: Vec<DeviceRecord>,
    volumes: BTreeMap<String, Volume>,
}

/// One device of the store: its layout and free-space bitmap.
struct DevState {
    layout: Layout,
    bitmap: Bitmap,
    /// Formatted daemon device: the bitmap (and superblock counters) live on it.
    formatted: bool,
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
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: holds {found} — refusing to use it for volumes (pass --force to overwrite)")]
    Foreign { path: PathBuf, found: String },
    #[error("{path}: too small for volumes ({size} bytes; need more than {need})")]
    TooSmall { path: PathBuf, size: u64, need: u64 },
    #[error("catalog {path}: {msg}")]
    Catalog { path: PathBuf, msg: String },
    #[error("store device list differs from the catalog: {0}")]
    DeviceMismatch(String),
    #[error("copy of {0:?} was stopped before it finished")]
    Stopped(String),
    #[error(transparent)]
    Dev(#[from] DevError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How a store lays volumes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    /// Allocation unit for blank (unformatted) devices; formatted ones use their own.
    pub unit: u64,
    /// Copy chunk size and requests in flight.
    pub copy_chunk: u64,
    pub copy_depth: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            unit: 1 << 20,
            copy_chunk: 1 << 20,
            copy_depth: 8,
        }
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

fn read_block(
    engine: &mut UringEngine,
    dev: &Device,
    off: u64,
    len: usize,
) -> Result<AlignedBuf, DevError> {
    let mut b = AlignedBuf::new(len);
    engine.read_at(dev, off, &mut b)?;
    Ok(b)
}

fn format_err(dev: &Device, e: FormatError) -> VolumeError {
    VolumeError::Format {
        path: dev.path().to_path_buf(),
        msg: e.to_string(),
    }
}

/// Reads a formatted daemon device: its label (must be ready, layout verified) and bitmap.
fn load_formatted(engine: &mut UringEngine, dev: &Device) -> Result<(Label, Bitmap), VolumeError> {
    let b = read_block(engine, dev, 0, BLOCK)?;
    let label = Label::decode(&b).map_err(|e| format_err(dev, e))?;
    if !label.is_ready() {
        return Err(VolumeError::Format {
            path: dev.path().to_path_buf(),
            msg: "the daemon format was never completed (label not ready): run mkfs again".into(),
        });
    }
    label
        .layout
        .verify(dev.size())
        .map_err(|e| format_err(dev, e))?;
    let l = &label.layout;
    let bytes = read_block(engine, dev, l.bitmap_offset, l.bitmap_len as usize)?;
    let bitmap = Bitmap::decode(&bytes, l.total_units()).map_err(|e| format_err(dev, e))?;
    Ok((label, bitmap))
}

impl VolumeStore {
    /// Opens the store in `dir` over `devices`. Formatted daemon devices (a ready blocklab
    /// label) are used through their layout and on-device free-space bitmap; blank devices
    /// get the same layout computed in memory (bitmap not persisted on them). A device with
    /// any other data is refused unless `force`. Later opens check the device list matches
    /// the catalog, and reconcile every bitmap with the catalog (the catalog wins).
    pub fn open(
        dir: &Path,
        devices: &[PathBuf],
        cfg: StoreConfig,
        force: bool,
    ) -> Result<VolumeStore, VolumeError> {
        let io = |source| VolumeError::Io {
            path: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let mut engine = UringEngine::with_queue_depth(cfg.copy_depth.max(2) as u32 * 2)?;
        let opened: Vec<Device> = devices.iter().map(Device::open).collect::<Result<_, _>>()?;
        let cpath = catalog_path(dir);
        let existing: Option<Catalog> = match fs::read(&cpath) {
            Ok(bytes) => {
                Some(
                    serde_json::from_slice(&bytes).map_err(|e| VolumeError::Catalog {
                        path: cpath.clone(),
                        msg: e.to_string(),
                    })?,
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(e)),
        };
        let mut devs = Vec::new();
        let mut records = Vec::new();
        for (i, d) in opened.iter().enumerate() {
            let found = probe(&mut engine, d)?;
            let known = existing.as_ref().and_then(|c| c.devices.get(i));
            let (layout, bitmap, uuid) = if matches!(found, Found::Blocklab) {
                let (label, bitmap) = load_formatted(&mut engine, d)?;
                (label.layout, bitmap, Some(label.daemon_uuid))
            } else {
                // Blank (or, on first open with force, overwritten): compute a layout.
                let raw_ok = match known {
                    Some(r) => r.daemon_uuid.is_none(),
                    None => force || matches!(found, Found::Empty),
                };
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
                .map_err(|_| VolumeError::TooSmall {
                    path: d.path().to_path_buf(),
                    size: d.size(),
                    need: cfg.unit * 20,
                })?;
                let bitmap = Bitmap::initial(&layout);
                (layout, bitmap, None)
            };
            records.push(DeviceRecord {
                path: d.path().to_path_buf(),
                size: d.size(),
                daemon_uuid: uuid,
            });
            devs.push(DevState {
                formatted: uuid.is_some(),
                layout,
                bitmap,
            });
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
                    version: 2,
                    devices: records,
                    volumes: BTreeMap::new(),
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
        };
        store.reconcile()?;
        Ok(store)
    }

    fn unit(&self, d: usize) -> u64 {
        self.devs[d].layout.alloc_unit as u64
    }

    fn units_of(&self, e: &Extent) -> std::ops::Range<u64> {
        let au = self.unit(e.device);
        e.offset / au..(e.offset + e.len) / au
    }

    /// Rebuilds every bitmap from the layout and the catalog; rewrites a formatted device's
    /// bitmap if it differs (units leaked or lost by a crash between bitmap and catalog).
    fn reconcile(&mut self) -> Result<(), VolumeError> {
        let mut fresh: Vec<Bitmap> = self
            .devs
            .iter()
            .map(|d| Bitmap::initial(&d.layout))
            .collect();
        for v in self.catalog.volumes.values() {
            for e in &v.extents {
                let r = self.units_of(e);
                fresh[e.device]
                    .allocate(r)
                    .map_err(|err| VolumeError::Catalog {
                        path: catalog_path(&self.dir),
                        msg: format!("volume {:?}: {err}", v.name),
                    })?;
            }
        }
        for (i, b) in fresh.into_iter().enumerate() {
            let differs = self.devs[i].bitmap != b;
            self.devs[i].bitmap = b;
            if differs && self.devs[i].formatted {
                let all = 0..self.devs[i].layout.total_units();
                self.persist_bitmap(i, &all)?;
            }
        }
        Ok(())
    }

    /// Writes the bitmap blocks covering `units` of device `i` (formatted devices only),
    /// updates the superblock's counters, and flushes.
    fn persist_bitmap(
        &mut self,
        i: usize,
        units: &std::ops::Range<u64>,
    ) -> Result<(), VolumeError> {
        if !self.devs[i].formatted {
            return Ok(());
        }
        let dev = &self.devices[i];
        let l = self.devs[i].layout.clone();
        let bytes = self.devs[i].bitmap.as_bytes();
        let blocks = Bitmap::blocks_of(units);
        let lo = (blocks.start as usize * BLOCK).min(bytes.len());
        let hi = (blocks.end as usize * BLOCK).min(bytes.len());
        if lo < hi {
            let buf = AlignedBuf::from_slice(&bytes[lo..hi]);
            self.engine
                .write_at(dev, l.bitmap_offset + lo as u64, &buf)?;
        }
        let sb_buf = read_block(&mut self.engine, dev, l.superblock_offset, BLOCK)?;
        let mut sb = Superblock::decode(&sb_buf).map_err(|e| format_err(dev, e))?;
        sb.used_units = self.devs[i].bitmap.used();
        sb.generation += 1;
        let enc = AlignedBuf::from_slice(&sb.encode());
        self.engine.write_at(dev, l.superblock_offset, &enc)?;
        self.engine.fdatasync(dev)?;
        Ok(())
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

    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Whether device `i` is a formatted daemon device (bitmap on the device).
    pub fn is_formatted(&self, i: usize) -> bool {
        self.devs[i].formatted
    }

    /// First-fit allocation of `size` bytes across devices (free runs of the bitmaps, in
    /// device order). Marks the units used in memory; nothing is persisted.
    fn allocate(&mut self, size: u64) -> Result<Vec<Extent>, VolumeError> {
        let free = self.free_bytes();
        let mut left = size;
        let mut out: Vec<Extent> = Vec::new();
        for d in 0..self.devs.len() {
            let au = self.unit(d);
            let total = self.devs[d].layout.total_units();
            let mut u = self.devs[d].layout.first_data_unit();
            while u < total && left > 0 {
                if self.devs[d].bitmap.is_used(u) {
                    u += 1;
                    continue;
                }
                let start = u;
                let want = left.div_ceil(au);
                while u < total && !self.devs[d].bitmap.is_used(u) && u - start < want {
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
                .map_err(|err| format_err(&self.devices[e.device], err))?;
        }
        Ok(out)
    }

    fn release_in_memory(&mut self, extents: &[Extent]) {
        for e in extents {
            let r = self.units_of(e);
            let _ = self.devs[e.device].bitmap.release(r);
        }
    }

    fn persist_extents(&mut self, extents: &[Extent]) -> Result<(), VolumeError> {
        for e in extents {
            let r = self.units_of(e);
            self.persist_bitmap(e.device, &r)?;
        }
        Ok(())
    }

    fn commit(&self) -> Result<(), VolumeError> {
        write_catalog(&self.dir, &self.catalog)
    }

    /// Creates a volume of `size` bytes: bitmap units marked used on the devices first,
    /// then the catalog entry (the commit point).
    pub fn create(
        &mut self,
        name: &str,
        size: u64,
        created_by: Option<&str>,
    ) -> Result<Volume, VolumeError> {
        check_name(name)?;
        if size == 0 || size % BLOCK as u64 != 0 {
            return Err(VolumeError::BadSize(size));
        }
        if self.catalog.volumes.contains_key(name) {
            return Err(VolumeError::Exists(name.to_string()));
        }
        let extents = self.allocate(size)?;
        let v = Volume {
            name: name.to_string(),
            size,
            extents: extents.clone(),
            created_by: created_by.map(str::to_string),
        };
        self.catalog.volumes.insert(name.to_string(), v.clone());
        let res = self.persist_extents(&extents).and_then(|_| self.commit());
        if let Err(e) = res {
            self.catalog.volumes.remove(name);
            self.release_in_memory(&extents);
            return Err(e);
        }
        Ok(v)
    }

    /// Deletes a volume: the catalog entry goes first (the commit point), then its units
    /// are freed in the bitmaps.
    pub fn delete(&mut self, name: &str) -> Result<Volume, VolumeError> {
        let v = self
            .catalog
            .volumes
            .remove(name)
            .ok_or_else(|| VolumeError::Unknown(name.to_string()))?;
        if let Err(e) = self.commit() {
            self.catalog.volumes.insert(name.to_string(), v);
            return Err(e);
        }
        self.release_in_memory(&v.extents);
        // A failure here leaves units marked used on the device; the next open reconciles.
        self.persist_extents(&v.extents)?;
        Ok(v)
    }

    /// Copies `src` into a new volume `dst` of the same size. `progress(bytes)` is called
    /// as the copy advances; returning false stops it: the destination is freed and the
    /// error is `Stopped`. Errors come with the bytes copied before them.
    pub fn copy(
        &mut self,
        src: &str,
        dst: &str,
        created_by: Option<&str>,
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
        let extents = self.allocate(s.size).map_err(|e| (e, 0))?;
        let mut done = 0u64;
        let res = copy_extents(
            &mut self.engine,
            &self.devices,
            &s.extents,
            &extents,
            s.size,
            self.cfg.copy_chunk,
            self.cfg.copy_depth,
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
            extents: extents.clone(),
            created_by: created_by.map(str::to_string),
        };
        self.catalog.volumes.insert(dst.to_string(), v.clone());
        let res = self.persist_extents(&extents).and_then(|_| self.commit());
        if let Err(e) = res {
            self.catalog.volumes.remove(dst);
            self.release_in_memory(&extents);
            return Err((e, stats.bytes));
        }
        Ok((v, stats))
    }

    /// Writes `data` at logical offset `off` of a volume (4 KiB aligned), for tests and tools.
    pub fn write(&mut self, name: &str, off: u64, data: &[u8]) -> Result<(), VolumeError> {
        let v = self
            .get(name)
            .cloned()
            .ok_or_else(|| VolumeError::Unknown(name.to_string()))?;
        let buf = crate::dev::AlignedBuf::from_slice(data);
        self.rw(&v, off, data.len() as u64, |eng, dev, doff, lo, len| {
            eng.write_at(dev, doff, &buf[lo..lo + len])
        })?;
        for d in &self.devices {
            self.engine.fdatasync(d)?;
        }
        Ok(())
    }

    /// Reads `len` bytes at logical offset `off` of a volume (4 KiB aligned).
    pub fn read(&mut self, name: &str, off: u64, len: usize) -> Result<Vec<u8>, VolumeError> {
        let v = self
            .get(name)
            .cloned()
            .ok_or_else(|| VolumeError::Unknown(name.to_string()))?;
        let mut tmp = crate::dev::AlignedBuf::new(len);
        self.rw(&v, off, len as u64, |eng, dev, doff, lo, l| {
            eng.read_at(dev, doff, &mut tmp[lo..lo + l])
        })?;
        let out = tmp[..len].to_vec();
        Ok(out)
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
    crate::fsutil::write_atomic(&path, &bytes).map_err(|source| VolumeError::Io { path, source })
}
