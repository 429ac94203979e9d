//! The free-space bitmap: one bit per allocation unit of the whole device, 1 = used.

use std::ops::Range;

use super::{FormatError, Layout, Result, BLOCK};
use crate::dev::AlignedBuf;

/// The in-memory bitmap. Its on-disk form is [`Bitmap::as_bytes`], exactly
/// `layout.bitmap_len` bytes; bits past `units` are zero. The bytes live in an
/// [`AlignedBuf`] (4 KiB aligned), so they can be written with `O_DIRECT` as they are.
#[derive(Debug, Clone)]
pub struct Bitmap {
    bits: AlignedBuf,
    /// Bytes of the on-disk form (`bits` may be longer, rounded up to its alignment).
    len: usize,
    units: u64,
    used: u64,
}

impl PartialEq for Bitmap {
    fn eq(&self, other: &Self) -> bool {
        self.units == other.units && self.used == other.used && self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Bitmap {}

impl Bitmap {
    /// The bitmap of a freshly formatted device: metadata units used, the rest free.
    pub fn initial(layout: &Layout) -> Bitmap {
        let len = layout.bitmap_len as usize;
        let mut b = Bitmap {
            bits: AlignedBuf::new(len),
            len,
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
        // Bits past the last unit must be clear: the rest of the last unit's byte, and
        // every byte after it.
        let partial = (units % 8) as u32;
        let tail_dirty = (partial != 0 && bytes[need - 1] >> partial != 0)
            || bytes[need..].iter().any(|&x| x != 0);
        if tail_dirty {
            return Err(FormatError::Bitmap(
                "bits set past the last allocation unit".into(),
            ));
        }
        let mut bits = AlignedBuf::new(bytes.len());
        bits[..bytes.len()].copy_from_slice(bytes);
        let used = bytes.iter().map(|x| x.count_ones() as u64).sum();
        Ok(Bitmap {
            bits,
            len: bytes.len(),
            units,
            used,
        })
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

    /// Marks `r` used (units already used stay used). Whole bytes are set at once: the
    /// initial bitmap of a large device is mostly one long metadata run.
    fn set_range(&mut self, r: Range<u64>) -> Result<()> {
        self.check(&r)?;
        let (mut u, end) = (r.start, r.end);
        while u < end {
            if u % 8 == 0 && end - u >= 8 {
                // A whole byte: the count of units newly used is its zero bits.
                let whole = ((end - u) / 8) as usize;
                let first = (u / 8) as usize;
                for b in &mut self.bits[first..first + whole] {
                    self.used += b.count_zeros() as u64;
                    *b = 0xFF;
                }
                u += whole as u64 * 8;
                continue;
            }
            let byte = &mut self.bits[(u / 8) as usize];
            if *byte & (1 << (u % 8)) == 0 {
                *byte |= 1 << (u % 8);
                self.used += 1;
            }
            u += 1;
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

    /// The on-disk bytes (4 KiB aligned).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bits[..self.len]
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
        // Unit 99 is the last one: bit 3 of byte 12 may be set, bit 4 may not.
        let mut bytes = vec![0u8; 4096];
        bytes[12] = 0x08;
        assert_eq!(Bitmap::decode(&bytes, 100).unwrap().used(), 1);
        bytes[12] = 0x10;
        assert!(Bitmap::decode(&bytes, 100).is_err());
    }

    /// Whole-byte setting counts exactly the units it newly marks, whatever the range's
    /// alignment and whatever was already used.
    #[test]
    fn set_range_matches_bit_by_bit() {
        let l = Layout::compute(64 << 20, LayoutParams::default()).unwrap();
        for (pre, r) in [
            (0..0, 0..64),
            (3..5, 1..70),
            (0..9, 5..13),
            (8..16, 0..24),
            (17..18, 16..17),
        ] {
            let mut b = Bitmap::initial(&l);
            let base = l.first_data_unit().div_ceil(8) * 8;
            let shift = |x: &Range<u64>| base + x.start..base + x.end;
            b.allocate(shift(&pre)).unwrap();
            b.set_range(shift(&r)).unwrap();
            let expect = (l.first_data_unit()..b.units())
                .filter(|&u| shift(&pre).contains(&u) || shift(&r).contains(&u))
                .count() as u64
                + l.first_data_unit();
            assert_eq!(b.used(), expect, "pre {pre:?} range {r:?}");
            for u in 0..b.units() {
                let want =
                    u < l.first_data_unit() || shift(&pre).contains(&u) || shift(&r).contains(&u);
                assert_eq!(b.is_used(u), want, "unit {u}, pre {pre:?} range {r:?}");
            }
        }
        assert_eq!(b_aligned(&l), 0);
    }

    fn b_aligned(l: &Layout) -> usize {
        Bitmap::initial(l).as_bytes().as_ptr() as usize % 4096
    }

    #[test]
    fn blocks_of_ranges() {
        assert_eq!(Bitmap::blocks_of(&(0..1)), 0..1);
        assert_eq!(Bitmap::blocks_of(&(32767..32769)), 0..2);
        assert_eq!(Bitmap::blocks_of(&(5..5)), 0..0);
    }
}
