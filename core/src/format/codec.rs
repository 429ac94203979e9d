//! Little-endian field encoding into a 4 KiB block with a trailing CRC32C.

use super::{FormatError, Result, BLOCK};

/// Offset of the CRC32C in every metadata block.
pub(crate) const CRC_OFFSET: usize = BLOCK - 4;

/// Writes fields front to back into a zeroed 4 KiB block.
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer {
            buf: Vec::with_capacity(BLOCK),
        }
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Pads to 4 KiB and seals with the CRC32C of everything before it.
    pub fn seal(mut self) -> Vec<u8> {
        debug_assert!(
            self.buf.len() <= CRC_OFFSET,
            "metadata block overflows 4 KiB"
        );
        self.buf.resize(CRC_OFFSET, 0);
        let crc = crc32c::crc32c(&self.buf);
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

/// Reads fields front to back from a verified block.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Checks length, magic, CRC and version; returns a reader positioned after the
    /// version field.
    pub fn open(
        buf: &'a [u8],
        what: &'static str,
        magic: &[u8; 8],
        version: u32,
    ) -> Result<Reader<'a>> {
        if buf.len() < BLOCK {
            return Err(FormatError::Truncated {
                what,
                len: buf.len(),
                need: BLOCK,
            });
        }
        let buf = &buf[..BLOCK];
        if &buf[..8] != magic {
            return Err(FormatError::BadMagic { what });
        }
        let stored = u32::from_le_bytes([
            buf[CRC_OFFSET],
            buf[CRC_OFFSET + 1],
            buf[CRC_OFFSET + 2],
            buf[CRC_OFFSET + 3],
        ]);
        let computed = crc32c::crc32c(&buf[..CRC_OFFSET]);
        if stored != computed {
            return Err(FormatError::BadCrc {
                what,
                stored,
                computed,
            });
        }
        let mut r = Reader { buf, pos: 8 };
        let found = r.u32();
        if found != version {
            return Err(FormatError::BadVersion {
                what,
                found,
                supported: version,
            });
        }
        Ok(r)
    }
    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.pos..self.pos + N]);
        self.pos += N;
        out
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}
