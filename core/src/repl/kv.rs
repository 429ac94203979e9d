//! The storage engine committed entries are applied to: a key → value map persisted in a
//! region `(offset, len)` of a device, one 4 KiB slot per key.
//!
//! A payload is `key:u64le` followed by the value. Key `k` lives in slot `k mod slots`;
//! a slot holds `magic:u32 nonce:u32 key:u64 index:u64 vlen:u32 crc32c:u32 value`, written
//! with `O_DIRECT` through the io_uring engine when the entry is applied. Applies are not
//! flushed: after a crash the replica applies its committed entries again from its log,
//! and applying is idempotent. Entries must be applied in index order: the engine refuses
//! a gap or a repeat ([`KvError::OutOfOrder`]), which is how tests check apply order.

use std::collections::BTreeMap;

use crate::dev::{AlignedBuf, DevError, Device, IoEngine, IoRequest};

use super::protocol::Entry;

const BLOCK: u64 = 4096;
const HEADER_MAGIC: &[u8; 8] = b"BLRPKV01";
const SLOT_MAGIC: u32 = 0x544f_4c53; // "SLOT"
const SLOT_HEADER: usize = 4 + 4 + 8 + 8 + 4 + 4;
/// Largest value a slot holds.
pub const MAX_VALUE: usize = BLOCK as usize - SLOT_HEADER;

/// Errors of the storage engine.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error(transparent)]
    Dev(#[from] DevError),
    #[error(
        "data region at offset {offset}, {len} bytes: must be 4 KiB aligned and at least 8 KiB"
    )]
    BadRegion { offset: u64, len: u64 },
    #[error("no storage engine header in the data region ({0})")]
    NotAStore(&'static str),
    #[error("entry {index}: payload of {len} bytes is shorter than its 8-byte key")]
    BadPayload { index: u64, len: usize },
    #[error("entry {index}: value of {len} bytes exceeds the slot limit of {MAX_VALUE} bytes")]
    ValueTooLarge { index: u64, len: usize },
    #[error("entry {index}: key {key} maps to slot {slot}, which holds key {holder}")]
    SlotTaken {
        index: u64,
        key: u64,
        slot: u64,
        holder: u64,
    },
    #[error("apply of entry {got} out of order: last applied is {applied}")]
    OutOfOrder { got: u64, applied: u64 },
}

/// A value and the index of the entry that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub index: u64,
    pub value: Vec<u8>,
}

/// Encodes a `key = value` write as an entry payload.
pub fn put_payload(key: u64, value: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + value.len());
    p.extend_from_slice(&key.to_le_bytes());
    p.extend_from_slice(value);
    p
}

/// Splits a payload into key and value.
pub fn split_payload(index: u64, p: &[u8]) -> Result<(u64, &[u8]), KvError> {
    if p.len() < 8 {
        return Err(KvError::BadPayload {
            index,
            len: p.len(),
        });
    }
    let key = u64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
    Ok((key, &p[8..]))
}

/// The storage engine.
#[derive(Debug)]
pub struct KvStore {
    dev: Device,
    offset: u64,
    slots: u64,
    nonce: u64,
    map: BTreeMap<u64, Versioned>,
    /// slot → key held there.
    owners: BTreeMap<u64, u64>,
    applied: u64,
}

impl KvStore {
    fn check_region(dev: &Device, offset: u64, len: u64) -> Result<u64, KvError> {
        if offset % BLOCK != 0 || len % BLOCK != 0 || len < 2 * BLOCK {
            return Err(KvError::BadRegion { offset, len });
        }
        dev.check_range(offset, len)?;
        Ok(len / BLOCK - 1)
    }

    /// An empty store in the region (slots of an earlier store there are ignored).
    pub fn create(
        eng: &mut dyn IoEngine,
        dev: Device,
        offset: u64,
        len: u64,
    ) -> Result<KvStore, KvError> {
        let slots = Self::check_region(&dev, offset, len)?;
        let nonce = rand::random::<u64>() | 1;
        let mut h = AlignedBuf::new(BLOCK as usize);
        h[..8].copy_from_slice(HEADER_MAGIC);
        h[8..16].copy_from_slice(&nonce.to_le_bytes());
        let crc = crc32c::crc32c(&h[..16]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        eng.execute(&mut [
            IoRequest::write(&dev, offset, &h),
            IoRequest::fdatasync(&dev),
        ])?;
        Ok(KvStore {
            dev,
            offset,
            slots,
            nonce,
            map: BTreeMap::new(),
            owners: BTreeMap::new(),
            applied: 0,
        })
    }

    /// Opens the store and reads every slot. `applied` starts at 0: the replica applies
    /// its committed entries again (idempotent), in order.
    pub fn open(
        eng: &mut dyn IoEngine,
        dev: Device,
        offset: u64,
        len: u64,
    ) -> Result<KvStore, KvError> {
        let slots = Self::check_region(&dev, offset, len)?;
        let mut region = AlignedBuf::new(len as usize);
        eng.read_at(&dev, offset, &mut region)?;
        if &region[..8] != HEADER_MAGIC {
            return Err(KvError::NotAStore("no header magic"));
        }
        let crc = u32::from_le_bytes(region[16..20].try_into().expect("4 bytes"));
        if crc32c::crc32c(&region[..16]) != crc {
            return Err(KvError::NotAStore("header checksum mismatch"));
        }
        let nonce = u64::from_le_bytes(region[8..16].try_into().expect("8 bytes"));
        let mut map = BTreeMap::new();
        let mut owners = BTreeMap::new();
        for s in 0..slots {
            let at = ((s + 1) * BLOCK) as usize;
            let b = &region[at..at + BLOCK as usize];
            if let Some((key, v)) = parse_slot(b, nonce) {
                owners.insert(s, key);
                map.insert(key, v);
            }
        }
        Ok(KvStore {
            dev,
            offset,
            slots,
            nonce,
            map,
            owners,
            applied: 0,
        })
    }

    pub fn get(&self, key: u64) -> Option<&Versioned> {
        self.map.get(&key)
    }
    /// Every key with its value, in key order.
    pub fn entries(&self) -> impl Iterator<Item = (u64, &Versioned)> {
        self.map.iter().map(|(k, v)| (*k, v))
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// Last index applied since open.
    pub fn applied(&self) -> u64 {
        self.applied
    }
    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// Applies committed entries, which must continue the applied index, and writes their
    /// slots in one batch. Nothing is applied when any entry is refused.
    pub fn apply(&mut self, eng: &mut dyn IoEngine, entries: &[Entry]) -> Result<(), KvError> {
        let mut next = self.applied + 1;
        // Validate first, and keep the last write per slot.
        let mut per_slot: BTreeMap<u64, (u64, &Entry)> = BTreeMap::new();
        for e in entries {
            if e.index != next {
                return Err(KvError::OutOfOrder {
                    got: e.index,
                    applied: next - 1,
                });
            }
            next += 1;
            let (key, value) = split_payload(e.index, &e.payload)?;
            if value.len() > MAX_VALUE {
                return Err(KvError::ValueTooLarge {
                    index: e.index,
                    len: value.len(),
                });
            }
            let slot = key % self.slots;
            let holder = per_slot
                .get(&slot)
                .map(|(k, _)| *k)
                .or_else(|| self.owners.get(&slot).copied())
                .filter(|&h| h != key);
            if let Some(holder) = holder {
                return Err(KvError::SlotTaken {
                    index: e.index,
                    key,
                    slot,
                    holder,
                });
            }
            per_slot.insert(slot, (key, e));
        }
        if per_slot.is_empty() {
            return Ok(());
        }
        let mut bufs: Vec<(u64, AlignedBuf)> = Vec::with_capacity(per_slot.len());
        for (&slot, &(key, e)) in &per_slot {
            let mut b = AlignedBuf::new(BLOCK as usize);
            fill_slot(&mut b, self.nonce, key, e.index, &e.payload[8..]);
            bufs.push((self.offset + (slot + 1) * BLOCK, b));
        }
        let mut reqs: Vec<IoRequest<'_>> = bufs
            .iter()
            .map(|(at, b)| IoRequest::write(&self.dev, *at, b))
            .collect();
        eng.execute(&mut reqs)?;
        for e in entries {
            let (key, value) = split_payload(e.index, &e.payload)?;
            self.owners.insert(key % self.slots, key);
            self.map.insert(
                key,
                Versioned {
                    index: e.index,
                    value: value.to_vec(),
                },
            );
        }
        self.applied = next - 1;
        Ok(())
    }
}

fn fill_slot(b: &mut [u8], nonce: u64, key: u64, index: u64, value: &[u8]) {
    b[0..4].copy_from_slice(&SLOT_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&(nonce as u32).to_le_bytes());
    b[8..16].copy_from_slice(&key.to_le_bytes());
    b[16..24].copy_from_slice(&index.to_le_bytes());
    b[24..28].copy_from_slice(&(value.len() as u32).to_le_bytes());
    b[SLOT_HEADER..SLOT_HEADER + value.len()].copy_from_slice(value);
    let mut crc = crc32c::crc32c(&b[..28]);
    crc = crc32c::crc32c_append(crc, value);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
}

fn parse_slot(b: &[u8], nonce: u64) -> Option<(u64, Versioned)> {
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    if u32_at(0) != SLOT_MAGIC || u32_at(4) != nonce as u32 {
        return None;
    }
    let vlen = u32_at(24) as usize;
    if vlen > MAX_VALUE {
        return None;
    }
    let value = &b[SLOT_HEADER..SLOT_HEADER + vlen];
    let mut crc = crc32c::crc32c(&b[..28]);
    crc = crc32c::crc32c_append(crc, value);
    if crc != u32_at(28) {
        return None;
    }
    Some((
        u64_at(8),
        Versioned {
            index: u64_at(16),
            value: value.to_vec(),
        },
    ))
}
