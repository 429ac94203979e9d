//! The volume store: devices, the free-space bitmaps, the persisted catalog.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dev::{probe, DevError, Device, Found, IoEngine, UringEngine};

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Catalog {
    version: u32,
    unit: u64,
    data_offset: u64,
    devices: Vec<DeviceRecord>,
    volumes: BTreeMap<String, Volume>,
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
    #[error("invalid volume size {0}: must be greater than zero")]
    BadSize(u64),
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
    /// Allocation unit in bytes (a multiple of 4 KiB).
    pub unit: u64,
    /// Where the data region starts on each device.
    pub data_offset: u64,
    /// Copy chunk size and requests in flight.
    pub copy_chunk: u64,
    pub copy_depth: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            unit: 1 << 20,
            data_offset: 1 << 20,
            copy_chunk: 1 << 20,
            copy_depth: 8,
        }
    }
}

/// The volumes of a set of devices.
pub struct VolumeStore {
    dir: PathBuf,
    cfg: StoreConfig,
    devices: Vec<Device>,
    catalog: Catalog,
    /// One bit (bool) per allocation unit per device; true = used.
    bitmaps: Vec<Vec<bool>>,
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

impl VolumeStore {
    /// Opens the store in `dir` over `devices`. The first open probes each device and
    /// refuses foreign data unless `force`; later opens check the device list matches.
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
        let catalog = match fs::read(&cpath) {
            Ok(bytes) => {
                let c: Catalog =
                    serde_json::from_slice(&bytes).map_err(|e| VolumeError::Catalog {
                        path: cpath.clone(),
                        msg: e.to_string(),
                    })?;
                let want: Vec<&PathBuf> = c.devices.iter().map(|d| &d.path).collect();
                let have: Vec<&PathBuf> = devices.iter().collect();
                if want != have {
                    return Err(VolumeError::DeviceMismatch(format!(
                        "catalog has {want:?}, given {have:?}"
                    )));
                }
                for (d, r) in opened.iter().zip(&c.devices) {
                    if d.size() != r.size {
                        return Err(VolumeError::DeviceMismatch(format!(
                            "{} is {} bytes, the catalog says {}",
                            r.path.display(),
                            d.size(),
                            r.size
                        )));
                    }
                }
                c
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                for d in &opened {
                    if d.size() <= cfg.data_offset + cfg.unit {
                        return Err(VolumeError::TooSmall {
                            path: d.path().to_path_buf(),
                            size: d.size(),
                            need: cfg.data_offset + cfg.unit,
                        });
                    }
                    let found = probe(&mut engine, d)?;
                    if !force && !matches!(found, Found::Empty) {
                        return Err(VolumeError::Foreign {
                            path: d.path().to_path_buf(),
                            found: format!("{found:?}"),
                        });
                    }
                }
                let c = Catalog {
                    version: 1,
                    unit: cfg.unit,
                    data_offset: cfg.data_offset,
                    devices: opened
                        .iter()
                        .map(|d| DeviceRecord {
                            path: d.path().to_path_buf(),
                            size: d.size(),
                        })
                        .collect(),
                    volumes: BTreeMap::new(),
                };
                write_catalog(dir, &c)?;
                c
            }
            Err(e) => return Err(io(e)),
        };
        let cfg = StoreConfig {
            unit: catalog.unit,
            data_offset: catalog.data_offset,
            ..cfg
        };
        let mut store = VolumeStore {
            dir: dir.to_path_buf(),
            cfg,
            bitmaps: opened
                .iter()
                .map(|d| vec![false; ((d.size() - cfg.data_offset) / cfg.unit) as usize])
                .collect(),
            devices: opened,
            catalog,
            engine,
        };
        let all: Vec<Extent> = store
            .catalog
            .volumes
            .values()
            .flat_map(|v| v.extents.clone())
            .collect();
        for e in all {
            store.mark(&e, true);
        }
        Ok(store)
    }

    fn mark(&mut self, e: &Extent, used: bool) {
        let first = ((e.offset - self.cfg.data_offset) / self.cfg.unit) as usize;
        let n = (e.len / self.cfg.unit) as usize;
        for b in &mut self.bitmaps[e.device][first..first + n] {
            *b = used;
        }
    }

    /// Free bytes over all devices.
    pub fn free_bytes(&self) -> u64 {
        self.bitmaps
            .iter()
            .map(|b| b.iter().filter(|u| !**u).count() as u64)
            .sum::<u64>()
            * self.cfg.unit
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

    /// First-fit allocation of `size` bytes (rounded up to the unit) across devices.
    fn allocate(&mut self, size: u64) -> Result<Vec<Extent>, VolumeError> {
        let units = size.div_ceil(self.cfg.unit) as usize;
        let free = self.free_bytes();
        if (units as u64) * self.cfg.unit > free {
            return Err(VolumeError::NoSpace {
                requested: size,
                free,
            });
        }
        let mut left = units;
        let mut out: Vec<Extent> = Vec::new();
        for (d, bm) in self.bitmaps.iter_mut().enumerate() {
            let mut i = 0;
            while i < bm.len() && left > 0 {
                if bm[i] {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < bm.len() && !bm[i] && i - start < left {
                    bm[i] = true;
                    i += 1;
                }
                let n = i - start;
                left -= n;
                out.push(Extent {
                    device: d,
                    offset: self.cfg.data_offset + start as u64 * self.cfg.unit,
                    len: n as u64 * self.cfg.unit,
                });
            }
        }
        debug_assert_eq!(left, 0);
        Ok(out)
    }

    fn commit(&self) -> Result<(), VolumeError> {
        write_catalog(&self.dir, &self.catalog)
    }

    /// Creates a volume of `size` bytes.
    pub fn create(
        &mut self,
        name: &str,
        size: u64,
        created_by: Option<&str>,
    ) -> Result<Volume, VolumeError> {
        check_name(name)?;
        if size == 0 {
            return Err(VolumeError::BadSize(size));
        }
        if self.catalog.volumes.contains_key(name) {
            return Err(VolumeError::Exists(name.to_string()));
        }
        let extents = self.allocate(size)?;
        let v = Volume {
            name: name.to_string(),
            size,
            extents,
            created_by: created_by.map(str::to_string),
        };
        self.catalog.volumes.insert(name.to_string(), v.clone());
        if let Err(e) = self.commit() {
            self.catalog.volumes.remove(name);
            for x in &v.extents {
                self.mark(x, false);
            }
            return Err(e);
        }
        Ok(v)
    }

    /// Deletes a volume and frees its extents.
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
        for x in &v.extents {
            self.mark(x, false);
        }
        Ok(v)
    }

    /// Copies `src` into a new volume `dst` of the same size. `progress(bytes)` is called
    /// as the copy advances; returning false stops it (the destination is then freed and
    /// the stopped stats are in the error's place: `Err(Stopped)`, bytes via `on_stop`).
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
        let free_all = |st: &mut VolumeStore| {
            for x in &extents {
                st.mark(x, false);
            }
        };
        let mut done = 0u64;
        let res = copy_extents(
            &mut self.engine,
            &self.devices,
            &s.extents,
            &extents,
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
                free_all(self);
                return Err((VolumeError::Stopped(dst.to_string()), stats.bytes));
            }
            Err(e) => {
                free_all(self);
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
        if let Err(e) = self.commit() {
            self.catalog.volumes.remove(dst);
            free_all(self);
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
    let tmp = dir.join("volumes.json.tmp");
    let io = |p: &Path, source| VolumeError::Io {
        path: p.to_path_buf(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(c).map_err(|e| VolumeError::Catalog {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let mut f = fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(&bytes).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))?;
    Ok(())
}
