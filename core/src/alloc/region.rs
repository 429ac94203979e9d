//! Where a device's blocks go: the data region of a formatted daemon device
//! (`core::format`, label at offset 0 with `ready` set), else the raw device after its
//! first MiB (which `dev::probe` inspects, so blocks written there never make a device
//! look foreign).

use super::segs::DeviceRegion;
use super::AllocError;
use crate::dev::{AlignedBuf, Device, IoEngine};
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

/// The block region of `dev`: whole blocks of `block_size` inside the data region of a
/// formatted device (stopping before the first label copy inside it), else after the
/// first MiB of a raw device.
pub fn region_of(
    eng: &mut dyn IoEngine,
    dev: &Device,
    block_size: u64,
) -> Result<(DeviceRegion, RegionSource), AllocError> {
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
    let start = start.next_multiple_of(4096);
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
