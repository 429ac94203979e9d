//! Where each region of a formatted device lives.

use super::{FormatError, Result, BLOCK};

/// Default allocation unit: 4 KiB.
pub const DEFAULT_ALLOC_UNIT: u32 = 4096;
/// Default log region: 4 MiB.
pub const DEFAULT_LOG_LEN: u64 = 4 << 20;
/// Offsets of the label's copies, used where the device is large enough.
pub const LABEL_COPY_OFFSETS: [u64; 3] = [1 << 30, 10 << 30, 100 << 30];
/// The data region must hold at least this many allocation units.
const MIN_DATA_UNITS: u64 = 16;

/// The knobs of a layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutParams {
    /// Allocation unit in bytes: a power of two, at least 4 KiB.
    pub alloc_unit: u32,
    /// Log region length in bytes: a multiple of 4 KiB, at least two blocks.
    pub log_len: u64,
}

impl Default for LayoutParams {
    fn default() -> Self {
        LayoutParams {
            alloc_unit: DEFAULT_ALLOC_UNIT,
            log_len: DEFAULT_LOG_LEN,
        }
    }
}

/// Offsets and lengths of every region, in bytes. Stored in the label.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    pub device_size: u64,
    pub alloc_unit: u32,
    pub superblock_offset: u64,
    pub log_offset: u64,
    pub log_len: u64,
    pub bitmap_offset: u64,
    pub bitmap_len: u64,
    pub data_offset: u64,
    pub data_len: u64,
    /// Offsets of the label copies (subset of [`LABEL_COPY_OFFSETS`]).
    pub label_copies: Vec<u64>,
}

impl Layout {
    /// The layout of a device of `device_size` bytes.
    pub fn compute(device_size: u64, params: LayoutParams) -> Result<Layout> {
        let au = params.alloc_unit as u64;
        if !au.is_power_of_two() || au < BLOCK as u64 {
            return Err(FormatError::Layout(format!(
                "allocation unit {au} must be a power of two of at least {BLOCK}"
            )));
        }
        if params.log_len % BLOCK as u64 != 0 || params.log_len < 2 * BLOCK as u64 {
            return Err(FormatError::Layout(format!(
                "log length {} must be a multiple of {BLOCK} and at least {}",
                params.log_len,
                2 * BLOCK
            )));
        }
        let units = device_size / au;
        let bitmap_len = units.div_ceil(8).div_ceil(BLOCK as u64) * BLOCK as u64;
        let superblock_offset = BLOCK as u64;
        let log_offset = 2 * BLOCK as u64;
        let bitmap_offset = log_offset + params.log_len;
        let data_offset = (bitmap_offset + bitmap_len).div_ceil(au) * au;
        let data_end = units * au;
        let needed = data_offset + MIN_DATA_UNITS * au;
        if data_end < needed {
            return Err(FormatError::TooSmall {
                size: device_size,
                needed,
            });
        }
        let label_copies = LABEL_COPY_OFFSETS
            .iter()
            .copied()
            .filter(|&off| off >= data_offset && off + au <= data_end)
            .collect();
        Ok(Layout {
            device_size,
            alloc_unit: params.alloc_unit,
            superblock_offset,
            log_offset,
            log_len: params.log_len,
            bitmap_offset,
            bitmap_len,
            data_offset,
            data_len: data_end - data_offset,
            label_copies,
        })
    }

    /// Allocation units of the whole device (what the bitmap covers).
    pub fn total_units(&self) -> u64 {
        self.device_size / self.alloc_unit as u64
    }

    /// First unit of the data region.
    pub fn first_data_unit(&self) -> u64 {
        self.data_offset / self.alloc_unit as u64
    }

    /// Units that metadata occupies: everything before the data region, and the units
    /// holding label copies.
    pub fn metadata_units(&self) -> Vec<std::ops::Range<u64>> {
        let au = self.alloc_unit as u64;
        let mut out = Vec::with_capacity(1 + self.label_copies.len());
        out.push(0..self.first_data_unit());
        for &c in &self.label_copies {
            out.push(c / au..c / au + 1);
        }
        out
    }

    /// Checks that a layout read from a label is consistent with itself and with the
    /// device it was read from: the same as recomputing it from its own parameters.
    pub fn verify(&self, actual_device_size: u64) -> Result<()> {
        if self.device_size != actual_device_size {
            return Err(FormatError::Layout(format!(
                "label says the device is {} bytes, it is {actual_device_size}",
                self.device_size
            )));
        }
        let expect = Layout::compute(
            self.device_size,
            LayoutParams {
                alloc_unit: self.alloc_unit,
                log_len: self.log_len,
            },
        )?;
        if *self != expect {
            return Err(FormatError::Layout(format!(
                "regions recorded in the label do not match the format's layout (recorded {self:?}, expected {expect:?})"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_device() {
        let l = Layout::compute(256 << 20, LayoutParams::default()).unwrap();
        assert_eq!(l.superblock_offset, 4096);
        assert_eq!(l.log_offset, 8192);
        assert_eq!(l.bitmap_offset, 8192 + (4 << 20));
        // 65536 units -> 8 KiB of bitmap.
        assert_eq!(l.bitmap_len, 8192);
        assert_eq!(l.data_offset, l.bitmap_offset + 8192);
        assert_eq!(l.data_offset + l.data_len, 256 << 20);
        assert!(l.label_copies.is_empty());
        l.verify(256 << 20).unwrap();
        assert!(l.verify(512 << 20).is_err());
    }

    #[test]
    fn bitmap_is_32k_per_gib_and_copies_appear() {
        let l = Layout::compute(16 << 30, LayoutParams::default()).unwrap();
        assert_eq!(l.bitmap_len, 16 * 32 * 1024);
        assert_eq!(l.label_copies, vec![1 << 30, 10 << 30]);
        let units = l.metadata_units();
        assert_eq!(units.len(), 3);
        assert_eq!(units[1], (1 << 30) / 4096..(1 << 30) / 4096 + 1);
    }

    #[test]
    fn refuses_bad_params_and_tiny_devices() {
        assert!(matches!(
            Layout::compute(1 << 20, LayoutParams::default()),
            Err(FormatError::TooSmall { .. })
        ));
        let bad_au = LayoutParams {
            alloc_unit: 6000,
            ..Default::default()
        };
        assert!(matches!(
            Layout::compute(1 << 30, bad_au),
            Err(FormatError::Layout(_))
        ));
        let bad_log = LayoutParams {
            log_len: 5000,
            ..Default::default()
        };
        assert!(matches!(
            Layout::compute(1 << 30, bad_log),
            Err(FormatError::Layout(_))
        ));
    }

    #[test]
    fn verify_rejects_tampered_regions() {
        let mut l = Layout::compute(64 << 20, LayoutParams::default()).unwrap();
        l.data_offset += 4096;
        assert!(l.verify(64 << 20).is_err());
    }
}
