//! Where a device's blocks go: the data region of a formatted daemon device
//! (`core::format`, label at offset 0 with `ready` set, stopping before a label copy), else
//! the raw device after its first MiB (which `dev::probe` inspects, so blocks written
//! there never make a device look foreign).
//!
//! [`resolve`] is the one place a device named by an operator becomes a block region: the
//! node's leader calls it when it brings a device online. A device given by path gets
//! [`region_of`]; an explicit region is checked against it.

use std::path::PathBuf;

use super::segs::DeviceRegion;
use super::AllocError;
use crate::dev::{AlignedBuf, Device, IoEngine, UringEngine};
use crate::format::Label;

/// Start of the raw region on an unformatted device.
pub const RAW_OFFSET: u64 = 1 << 20;

/// Where a region came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionSource {
    /// The data region of daemon `daemon_id`'s formatted device.
    Formatted { daemon_id: u32 },
    /// No (ready) blocklab label: the raw device after its first MiB.
    Raw,
}

/// A byte range of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

/// A device as an operator names it: by path (its blocks go where [`region_of`] says), or
/// with an explicit region (which must lie inside that).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceSpec {
    pub path: PathBuf,
    #[serde(default)]
    pub range: Option<ByteRange>,
}

impl DeviceSpec {
    /// The whole usable region of the device at `path`.
    pub fn path(path: impl Into<PathBuf>) -> DeviceSpec {
        DeviceSpec {
            path: path.into(),
            range: None,
        }
    }
    /// An explicit region.
    pub fn region(r: &DeviceRegion) -> DeviceSpec {
        DeviceSpec {
            path: r.path.clone(),
            range: Some(ByteRange {
                offset: r.offset,
                len: r.len,
            }),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.range {
            Some(r) => write!(f, "{}:{}:{}", r.offset, r.len, self.path.display()),
            None => write!(f, "{}", self.path.display()),
        }
    }
}

/// Where blocks may go on `dev`: `[start, end)` and why.
fn usable_range(
    eng: &mut dyn IoEngine,
    dev: &Device,
) -> Result<(u64, u64, RegionSource), AllocError> {
    let mut head = AlignedBuf::new(4096);
    eng.read_at(dev, 0, &mut head)?;
    let (start, end, src) = match Label::decode(&head) {
        Ok(l) if l.is_ready() => {
            let lay = &l.layout;
            let mut end = lay.data_offset + lay.data_len;
            for &c in &lay.label_copies {
                if c >= lay.data_offset && c < end {
                    end = c;
                }
            }
            (
                lay.data_offset,
                end.min(dev.size()),
                RegionSource::Formatted {
                    daemon_id: l.daemon_id,
                },
            )
        }
        _ => (RAW_OFFSET, dev.size(), RegionSource::Raw),
    };
    Ok((start.next_multiple_of(4096), end, src))
}

/// The block region of `dev`: whole blocks of `block_size` inside the data region of a
/// formatted device (stopping before the first label copy inside it), else after the
/// first MiB of a raw device.
pub fn region_of(
    eng: &mut dyn IoEngine,
    dev: &Device,
    block_size: u64,
) -> Result<(DeviceRegion, RegionSource), AllocError> {
    let (start, end, src) = usable_range(eng, dev)?;
    let len = end.saturating_sub(start) / block_size * block_size;
    if len == 0 {
        return Err(AllocError::BadInput(format!(
            "{}: no room for a single {block_size}-byte block (region {start}..{end})",
            dev.path().display()
        )));
    }
    Ok((
        DeviceRegion {
            path: dev.path().to_path_buf(),
            offset: start,
            len,
        },
        src,
    ))
}

/// Resolves `spec` to a block region: [`region_of`] for a path; an explicit region must
/// be aligned, inside the device, and inside what [`region_of`] allows (not over a daemon
/// label or metadata, not in the first MiB of a raw device).
pub fn resolve(
    spec: &DeviceSpec,
    block_size: u64,
) -> Result<(DeviceRegion, RegionSource), AllocError> {
    let dev = Device::open_read_only(&spec.path)?;
    let mut eng = UringEngine::with_queue_depth(1)?;
    let Some(r) = spec.range else {
        return region_of(&mut eng, &dev, block_size);
    };
    let path = spec.path.display();
    let end = r.offset.checked_add(r.len).ok_or_else(|| {
        AllocError::BadInput(format!("{path}: region {}+{} overflows", r.offset, r.len))
    })?;
    if end > dev.size() {
        return Err(AllocError::BadInput(format!(
            "{path}: region {}..{end} goes past the end of the device ({} bytes)",
            r.offset,
            dev.size()
        )));
    }
    dev.check_range(r.offset, r.len)?;
    let (start, stop, src) = usable_range(&mut eng, &dev)?;
    if r.offset < start || end > stop {
        return Err(AllocError::BadInput(match src {
            RegionSource::Formatted { daemon_id } => format!(
                "{path}: region {}..{end} overlaps daemon {daemon_id}'s label or metadata \
                 (its data region is {start}..{stop})",
                r.offset
            ),
            RegionSource::Raw => format!(
                "{path}: region {}..{end} overlaps the first MiB, which the device probe \
                 reads (blocks may use {start}..{stop})",
                r.offset
            ),
        }));
    }
    if r.len / block_size == 0 {
        return Err(AllocError::BadInput(format!(
            "{path}: region of {} bytes holds no {block_size}-byte block",
            r.len
        )));
    }
    Ok((
        DeviceRegion {
            path: spec.path.clone(),
            offset: r.offset,
            len: r.len,
        },
        src,
    ))
}
