//! `mount`: read and verify everything mkfs wrote; `inspect`: read the label.

use crate::dev::{self, AlignedBuf, Device, Found, IoEngine};
use crate::format::{Bitmap, Label, LogInitRecord, Superblock, BLOCK};

use super::error::{DaemonError, Result};

/// A verified device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mounted {
    pub label: Label,
    /// The superblock as read. Its `used_units` is a hint: the count is derived from the
    /// bitmap (`free_units`, `bitmap.used()`), and a stale counter (a crash between a
    /// bitmap write and the superblock write) is tolerated.
    pub superblock: Superblock,
    /// Free allocation units, counted in the bitmap.
    pub free_units: u64,
    /// The decoded free-space bitmap.
    #[serde(skip)]
    pub bitmap: Bitmap,
}

impl Mounted {
    /// Whether the superblock's `used_units` counter disagrees with the bitmap (to be
    /// rewritten by whoever next writes the superblock).
    pub fn used_units_stale(&self) -> bool {
        self.superblock.used_units != self.bitmap.used()
    }
}

fn not_mountable(dev: &Device, reason: impl Into<String>) -> DaemonError {
    DaemonError::NotMountable {
        path: dev.path().to_path_buf(),
        reason: reason.into(),
    }
}

pub(super) fn read_block(eng: &mut dyn IoEngine, dev: &Device, off: u64) -> Result<AlignedBuf> {
    let mut b = AlignedBuf::with_alignment(BLOCK, dev.align());
    eng.read_at(dev, off, &mut b)?;
    Ok(b)
}

/// Reads and decodes the primary label (any state of `ready`).
pub fn read_label(eng: &mut dyn IoEngine, dev: &Device) -> Result<Label> {
    if dev.size() < BLOCK as u64 {
        return Err(not_mountable(dev, "device smaller than one block"));
    }
    let b = read_block(eng, dev, 0)?;
    Label::decode(&b).map_err(|e| not_mountable(dev, e.to_string()))
}

/// Verifies every checksum (label, its copies, superblock, log init record), the layout
/// against the device, the bitmap against the superblock's geometry and the metadata
/// regions, and the commit point (`ready`). The superblock's `used_units` counter is not
/// checked against the bitmap (see [`Mounted::superblock`]).
pub fn mount(eng: &mut dyn IoEngine, dev: &Device) -> Result<Mounted> {
    let label = read_label(eng, dev)?;
    if !label.is_ready() {
        return Err(not_mountable(
            dev,
            "label is not marked ready (mkfs did not finish; run mkfs again to complete it)",
        ));
    }
    let l = &label.layout;
    l.verify(dev.size())
        .map_err(|e| not_mountable(dev, e.to_string()))?;
    let sb = Superblock::decode(&read_block(eng, dev, l.superblock_offset)?)
        .map_err(|e| not_mountable(dev, e.to_string()))?;
    if sb.cluster_fsid != label.cluster_fsid || sb.daemon_id != label.daemon_id {
        return Err(not_mountable(
            dev,
            "superblock belongs to another daemon than the label",
        ));
    }
    if sb.alloc_unit != l.alloc_unit || sb.total_units != l.total_units() {
        return Err(not_mountable(
            dev,
            "superblock geometry disagrees with the label's layout",
        ));
    }
    let rec = LogInitRecord::decode(&read_block(eng, dev, l.log_offset)?)
        .map_err(|e| not_mountable(dev, e.to_string()))?;
    if rec.daemon_uuid != label.daemon_uuid || rec.log_len != l.log_len {
        return Err(not_mountable(
            dev,
            "log init record belongs to another daemon or log",
        ));
    }
    let mut bits = AlignedBuf::with_alignment(l.bitmap_len as usize, dev.align());
    eng.read_at(dev, l.bitmap_offset, &mut bits)?;
    let bitmap =
        Bitmap::decode(&bits, l.total_units()).map_err(|e| not_mountable(dev, e.to_string()))?;
    if sb.used_units > sb.total_units {
        return Err(not_mountable(
            dev,
            format!(
                "superblock: {} units used of {}",
                sb.used_units, sb.total_units
            ),
        ));
    }
    for r in l.metadata_units() {
        if let Some(u) = r.clone().find(|&u| !bitmap.is_used(u)) {
            return Err(not_mountable(
                dev,
                format!("bitmap: metadata unit {u} is marked free"),
            ));
        }
    }
    for &off in &l.label_copies {
        let copy = Label::decode(&read_block(eng, dev, off)?)
            .map_err(|e| not_mountable(dev, format!("label copy at {off}: {e}")))?;
        if copy != label {
            return Err(not_mountable(
                dev,
                format!("label copy at {off} differs from the label"),
            ));
        }
    }
    Ok(Mounted {
        free_units: bitmap.free(),
        label,
        superblock: sb,
        bitmap,
    })
}

/// What `inspect` found on a device.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Inspection {
    pub device: String,
    pub size_bytes: u64,
    pub label: Label,
    pub ready: bool,
    /// `None` when the device mounts; else why not.
    pub mount_error: Option<String>,
    pub superblock: Option<Superblock>,
}

/// Reads the label (refusing a device without one) and tries a mount.
pub fn inspect(eng: &mut dyn IoEngine, dev: &Device) -> Result<Inspection> {
    let label = match read_label(eng, dev) {
        Ok(l) => l,
        Err(e) => {
            let found = dev::probe(eng, dev)?;
            return Err(match found {
                Found::Blocklab => e,
                f => DaemonError::NoLabel {
                    path: dev.path().to_path_buf(),
                    found: f.to_string(),
                },
            });
        }
    };
    let (mount_error, superblock) = match mount(eng, dev) {
        Ok(m) => (None, Some(m.superblock)),
        Err(e) => (Some(e.to_string()), None),
    };
    Ok(Inspection {
        device: dev.path().display().to_string(),
        size_bytes: dev.size(),
        ready: label.is_ready(),
        label,
        mount_error,
        superblock,
    })
}
