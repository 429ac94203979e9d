//! The free-space bitmap: one bit per allocation unit of the whole device, 1 = used.

use std::ops::Range;

use super::{FormatError, Layout, Result, BLOCK};

/// The in-memory bitmap. Its on-disk form is [`Bitmap::as_bytes`], exactly
/// `layout.bitmap_len` bytes; bits past `units` are zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    bits: Vec<u8>,
    units: u64,
    used: u64,
}

impl Bitmap {
    /// The bitmap of a freshly formatted device: metadata units used, the rest free.
    pub fn initial(layout: &Layout) -> Bitmap {
        let mut b = Bitmap {
            bits: vec![0; layout.bitmap_len as usize],
            units: layout.total_units(),
            used: 0,
        };
        for r in layout.metadata_units() {
            // Metadata ranges lie inside the device by construction of the layout.
            let _ = b.set_range(r);
        }
        b
    }

    /// Decodes the on-disk bytes of a device with `units` units.
    pub fn decode(bytes: &[u8], units: u64) -> Result<Bitmap> {
        let need = units.div_ceil(8) as usize;
        if bytes.len() < need {
            return Err(FormatError::Bitmap(format!(
                "{} bytes cannot hold {units} units",
                bytes.len()
            )));
        }
        let b = Bitmap {
            bits: bytes.to_vec(),
            units,
            used: 0,
        };
        // Bits past the last unit must be clear.
        let tail_start = units;
        let tail_end = bytes.len() as u64 * 8;
        if (tail_start..tail_end).any(|u| b.bit(u)) {
            return Err(FormatError::Bitmap(
                "bits set past the last allocation unit".into(),
            ));
        }
        let used = b.bits.iter().map(|x| x.count_ones() as u64).sum();
        Ok(Bitmap { used, ..b })
    }

    fn bit(&self, unit: u64) -> bool {
        self.bits[(unit / 8) as usize] & (1 << (unit % 8)) != 0
    }

    fn check(&self, r: &Range<u64>) -> Result<()> {
        if r.start > r.end || r.end > self.units {
            return Err(FormatError::Bitmap(format!(
                "units {}..{} outside the device's {} units",
                r.start, r.end, self.units
            )));
        }
        Ok(())
    }

    pub fn units(&self) -> u64 {
        self.units
    }
    pub fn used(&self) -> u64 {
        self.used
    }
    pub fn free(&self) -> u64 {
        self.units - self.used
    }
    pub fn is_used(&self, unit: u64) -> bool {
        unit < self.units && self.bit(unit)
    }

    /// Marks `r` used; fails (changing nothing) if any unit in it is already used.
    pub fn allocate(&mut self, r: Range<u64>) -> Result<()> {
        self.check(&r)?;
        if let Some(u) = r.clone().find(|&u| self.bit(u)) {
            return Err(FormatError::Bitmap(format!("unit {u} is already used")));
        }
        self.set_range(r)
    }

    /// Marks `r` free; fails (changing nothing) if any unit in it is already free.
    pub fn release(&mut self, r: Range<u64>) -> Result<()> {
        self.check(&r)?;
        if let Some(u) = r.clone().find(|&u| !self.bit(u)) {
            return Err(FormatError::Bitmap(format!("unit {u} is already free")));
        }
        for u in r {
            self.bits[(u / 8) as usize] &= !(1 << (u % 8));
            self.used -= 1;
        }
        Ok(())
    }

    fn set_range(&mut self, r: Range<u64>) -> Result<()> {
        self.check(&r)?;
        for u in r {
            let byte = &mut self.bits[(u / 8) as usize];
            if *byte & (1 << (u % 8)) == 0 {
                *byte |= 1 << (u % 8);
                self.used += 1;
            }
        }
        Ok(())
    }

    /// The first run of `len` free units at or after `from` (first fit).
    pub fn find_free(&self, len: u64, from: u64) -> Option<Range<u64>> {
        if len == 0 {
            return None;
        }
        let mut start = from;
        let mut u = from;
        while u < self.units {
            if self.bit(u) {
                start = u + 1;
            } else if u + 1 - start == len {
                return Some(start..u + 1);
            }
            u += 1;
        }
        None
    }

    /// The on-disk bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// Indexes of the 4 KiB bitmap blocks that hold the bits of `r` (to write only those).
    pub fn blocks_of(r: &Range<u64>) -> Range<u64> {
        let bits_per_block = BLOCK as u64 * 8;
        if r.start >= r.end {
            return 0..0;
        }
        r.start / bits_per_block..(r.end - 1) / bits_per_block + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::LayoutParams;

    #[test]
    fn initial_marks_metadata_and_round_trips() {
        let l = Layout::compute(64 << 20, LayoutParams::default()).unwrap();
        let b = Bitmap::initial(&l);
        assert_eq!(b.used(), l.first_data_unit());
        assert!(b.is_used(0) && b.is_used(l.first_data_unit() - 1));
        assert!(!b.is_used(l.first_data_unit()));
        let d = Bitmap::decode(b.as_bytes(), l.total_units()).unwrap();
        assert_eq!(d, b);
    }

    #[test]
    fn allocate_release_find() {
        let l = Layout::compute(64 << 20, LayoutParams::default()).unwrap();
        let mut b = Bitmap::initial(&l);
        let first = l.first_data_unit();
        let r = b.find_free(10, 0).unwrap();
        assert_eq!(r, first..first + 10);
        b.allocate(r.clone()).unwrap();
        assert!(
            b.allocate(first + 5..first + 12).is_err(),
            "overlap refused"
        );
        assert_eq!(b.used(), first + 10);
        assert_eq!(b.find_free(1, 0).unwrap(), first + 10..first + 11);
        b.release(first + 2..first + 4).unwrap();
        assert!(
            b.release(first + 2..first + 3).is_err(),
            "double free refused"
        );
        assert_eq!(b.find_free(2, 0).unwrap(), first + 2..first + 4);
        assert!(b.find_free(b.units(), 0).is_none());
        assert!(b.allocate(b.units()..b.units() + 1).is_err());
    }

    #[test]
    fn decode_refuses_tail_bits() {
        let mut bytes = vec![0u8; 4096];
        bytes[4095] = 0x80;
        assert!(Bitmap::decode(&bytes, 100).is_err());
        assert!(Bitmap::decode(&bytes[..4], 100).is_err());
    }

    #[test]
    fn blocks_of_ranges() {
        assert_eq!(Bitmap::blocks_of(&(0..1)), 0..1);
        assert_eq!(Bitmap::blocks_of(&(32767..32769)), 0..2);
        assert_eq!(Bitmap::blocks_of(&(5..5)), 0..0);
    }
}
