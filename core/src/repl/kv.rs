//! The storage engine committed entries are applied to: a key → value map persisted in a
//! region `(offset, len)` of a device, one 4 KiB slot per key.
//!
//! A payload is `key:u64le` followed by the value (at most [`MAX_VALUE`] bytes). A slot
//! holds `magic:u32 nonce:u32 key:u64 index:u64 vlen:u32 crc32c:u32 value`, written with
//! `O_DIRECT` through the io_uring engine when the entry is applied. A key's home slot is
//! `key mod slots`; a key whose home slot holds another key takes the next free slot
//! (linear probing). Keys are never removed, so a key keeps its slot, and the in-memory
//! index (rebuilt from every slot at open) finds it.
//!
//! Applies are not flushed: after a crash the replica applies its committed entries again
//! from its log, and applying is idempotent. Entries must be applied in index order: the
//! engine refuses a gap or a repeat ([`KvError::OutOfOrder`]), which is how tests check
//! apply order.
//!
//! Bad writes are refused before they reach the log: the primary calls
//! [`KvStore::check`] for every proposal (payload shape, value size, and a free slot for a
//! new key counting the keys admitted but not applied yet) and [`KvStore::reserve`]s the
//! key. An entry that is still invalid when applied (from a build without these checks,
//! or a data region of another size) is skipped with its [`Invalid`] reason and the
//! applied index moves on: the same decision on every replica with the same region size,
//! instead of an error that would stop every replica on the same entry, again at every
//! restart.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

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
    #[error("apply of entry {got} out of order: last applied is {applied}")]
    OutOfOrder { got: u64, applied: u64 },
}

/// Why a write cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("payload of {len} bytes is shorter than its 8-byte key")]
    ShortPayload { len: usize },
    #[error("value of {len} bytes exceeds the slot limit of {MAX_VALUE} bytes")]
    ValueTooLarge { len: usize },
    #[error("storage engine full: all {slots} slots hold other keys")]
    Full { slots: u64 },
}

/// A value and the index of the entry that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub index: u64,
    /// The entry's payload (key and value).
    payload: Arc<[u8]>,
}

impl Versioned {
    pub fn value(&self) -> &[u8] {
        &self.payload[8..]
    }
}

/// Encodes a `key = value` write as an entry payload.
pub fn put_payload(key: u64, value: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + value.len());
    p.extend_from_slice(&key.to_le_bytes());
    p.extend_from_slice(value);
    p
}

/// Splits a payload into key and value, checking both.
pub fn split_payload(p: &[u8]) -> Result<(u64, &[u8]), Invalid> {
    if p.len() < 8 {
        return Err(Invalid::ShortPayload { len: p.len() });
    }
    let value = &p[8..];
    if value.len() > MAX_VALUE {
        return Err(Invalid::ValueTooLarge { len: value.len() });
    }
    let key = u64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
    Ok((key, value))
}

/// Slots of a data region of `len` bytes (its first block is the header).
pub const fn slots_for(len: u64) -> u64 {
    (len / BLOCK).saturating_sub(1)
}

/// The storage engine.
#[derive(Debug)]
pub struct KvStore {
    dev: Arc<Device>,
    offset: u64,
    slots: u64,
    nonce: u64,
    /// key → (slot, value).
    map: BTreeMap<u64, (u64, Versioned)>,
    /// Which slots hold a key.
    used: Vec<bool>,
    /// Keys admitted by [`KvStore::reserve`] and not applied yet.
    reserved: HashSet<u64>,
    applied: u64,
}

impl KvStore {
    fn check_region(dev: &Device, offset: u64, len: u64) -> Result<u64, KvError> {
        if offset % BLOCK != 0 || len % BLOCK != 0 || len < 2 * BLOCK {
            return Err(KvError::BadRegion { offset, len });
        }
        dev.check_range(offset, len)?;
        Ok(slots_for(len))
    }

    fn empty(dev: Device, offset: u64, slots: u64, nonce: u64) -> KvStore {
        KvStore {
            dev: Arc::new(dev),
            offset,
            slots,
            nonce,
            map: BTreeMap::new(),
            used: vec![false; slots as usize],
            reserved: HashSet::new(),
            applied: 0,
        }
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
        eng.execute(&mut [IoRequest::write_dsync(&dev, offset, &h)])?;
        Ok(KvStore::empty(dev, offset, slots, nonce))
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
        let mut kv = KvStore::empty(dev, offset, slots, nonce);
        for s in 0..slots {
            let at = ((s + 1) * BLOCK) as usize;
            let Some(v) = parse_slot(&region[at..at + BLOCK as usize], nonce) else {
                continue;
            };
            kv.used[s as usize] = true;
            let key = u64::from_le_bytes(v.payload[..8].try_into().expect("8 bytes"));
            // A key in two slots (only a store written by another placement could have
            // that): the newer write wins.
            if kv.map.get(&key).is_none_or(|(_, old)| old.index < v.index) {
                kv.map.insert(key, (s, v));
            }
        }
        Ok(kv)
    }

    pub fn get(&self, key: u64) -> Option<&Versioned> {
        self.map.get(&key).map(|(_, v)| v)
    }
    /// Every key with its value, in key order.
    pub fn entries(&self) -> impl Iterator<Item = (u64, &Versioned)> {
        self.map.iter().map(|(k, (_, v))| (*k, v))
    }
    /// Last index applied since open.
    pub fn applied(&self) -> u64 {
        self.applied
    }
    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// Whether a write of `payload` can be applied once committed: its shape and size, and
    /// for a key that has no slot yet, a free one counting the keys reserved. Returns the
    /// key.
    pub fn check(&self, payload: &[u8]) -> Result<u64, Invalid> {
        let (key, _) = split_payload(payload)?;
        if !self.map.contains_key(&key)
            && !self.reserved.contains(&key)
            && (self.map.len() + self.reserved.len()) as u64 >= self.slots
        {
            return Err(Invalid::Full { slots: self.slots });
        }
        Ok(key)
    }

    /// Counts `key` (checked with [`KvStore::check`]) as taking a slot until it is applied.
    pub fn reserve(&mut self, key: u64) {
        if !self.map.contains_key(&key) {
            self.reserved.insert(key);
        }
    }

    /// A free slot for a new key, probing from its home slot; `taken` marks slots given to
    /// other keys of the same batch.
    fn free_slot(&self, key: u64, taken: impl Fn(u64) -> bool) -> Option<u64> {
        let home = key % self.slots;
        (0..self.slots)
            .map(|i| (home + i) % self.slots)
            .find(|&s| !self.used[s as usize] && !taken(s))
    }

    /// Applies committed entries, which must continue the applied index, and writes their
    /// slots in one batch. Returns the entries skipped as invalid (see the module docs),
    /// with why; an error applies nothing. The same as [`KvStore::plan`],
    /// [`ApplyPlan::write`] and [`KvStore::commit`] in a row.
    pub fn apply(
        &mut self,
        eng: &mut dyn IoEngine,
        entries: &[Entry],
    ) -> Result<Vec<(u64, Invalid)>, KvError> {
        let plan = self.plan(entries)?;
        plan.write(eng)?;
        self.commit(plan)
    }

    /// Decides how `entries` (which must continue the applied index) are applied: which
    /// slot each valid one takes and the blocks to write. Changes nothing, so the writes
    /// can go out without holding the store (the apply worker releases its lock meanwhile;
    /// only [`KvStore::commit`] changes what [`KvStore::plan`] reads, and the worker is
    /// the only one calling either).
    pub fn plan(&self, entries: &[Entry]) -> Result<ApplyPlan, KvError> {
        let first = self.applied + 1;
        for (i, e) in entries.iter().enumerate() {
            if e.index != first + i as u64 {
                return Err(KvError::OutOfOrder {
                    got: e.index,
                    applied: first + i as u64 - 1,
                });
            }
        }
        let mut rejected = Vec::new();
        // The last write per slot, and the slots given to new keys of this batch.
        let mut writes: BTreeMap<u64, (u64, &Entry)> = BTreeMap::new();
        let mut placed: HashMap<u64, u64> = HashMap::new();
        for e in entries {
            let key = match split_payload(&e.payload) {
                Ok((key, _)) => key,
                Err(why) => {
                    rejected.push((e.index, why));
                    continue;
                }
            };
            let known = self.map.get(&key).map(|(s, _)| *s);
            let slot = match known.or_else(|| placed.get(&key).copied()) {
                Some(s) => s,
                None => match self.free_slot(key, |s| writes.contains_key(&s)) {
                    Some(s) => {
                        placed.insert(key, s);
                        s
                    }
                    None => {
                        rejected.push((e.index, Invalid::Full { slots: self.slots }));
                        continue;
                    }
                },
            };
            writes.insert(slot, (key, e));
        }
        let writes = writes
            .into_iter()
            .map(|(slot, (key, e))| {
                let mut block = AlignedBuf::new(BLOCK as usize);
                fill_slot(&mut block, self.nonce, key, e.index, &e.payload[8..]);
                SlotWrite {
                    slot,
                    key,
                    value: Versioned {
                        index: e.index,
                        payload: e.payload.clone(),
                    },
                    at: self.offset + (slot + 1) * BLOCK,
                    block,
                }
            })
            .collect();
        Ok(ApplyPlan {
            dev: self.dev.clone(),
            first,
            count: entries.len() as u64,
            writes,
            rejected,
        })
    }

    /// Takes a written plan into the index and moves the applied index past its entries.
    /// Returns the entries it skipped as invalid. A plan made before another batch was
    /// committed is refused ([`KvError::OutOfOrder`]) and changes nothing.
    pub fn commit(&mut self, plan: ApplyPlan) -> Result<Vec<(u64, Invalid)>, KvError> {
        if plan.count > 0 && plan.first != self.applied + 1 {
            return Err(KvError::OutOfOrder {
                got: plan.first,
                applied: self.applied,
            });
        }
        for w in plan.writes {
            self.used[w.slot as usize] = true;
            self.reserved.remove(&w.key);
            self.map.insert(w.key, (w.slot, w.value));
        }
        self.applied += plan.count;
        Ok(plan.rejected)
    }
}

/// How a batch of committed entries is applied ([`KvStore::plan`]): the slot blocks to
/// write, then what [`KvStore::commit`] records.
#[derive(Debug)]
pub struct ApplyPlan {
    dev: Arc<Device>,
    first: u64,
    count: u64,
    /// The last write to each slot the batch touches.
    writes: Vec<SlotWrite>,
    rejected: Vec<(u64, Invalid)>,
}

/// One slot of an [`ApplyPlan`]: what the index records, and the block written at `at`.
#[derive(Debug)]
struct SlotWrite {
    slot: u64,
    key: u64,
    value: Versioned,
    at: u64,
    block: AlignedBuf,
}

impl ApplyPlan {
    /// Writes the plan's slot blocks in one batch (not flushed: see the module docs).
    pub fn write(&self, eng: &mut dyn IoEngine) -> Result<(), KvError> {
        if self.writes.is_empty() {
            return Ok(());
        }
        let mut reqs: Vec<IoRequest<'_>> = self
            .writes
            .iter()
            .map(|w| IoRequest::write(&self.dev, w.at, &w.block))
            .collect();
        eng.execute(&mut reqs)?;
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

fn parse_slot(b: &[u8], nonce: u64) -> Option<Versioned> {
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
    let mut payload = Vec::with_capacity(8 + vlen);
    payload.extend_from_slice(&b[8..16]);
    payload.extend_from_slice(value);
    Some(Versioned {
        index: u64_at(16),
        payload: payload.into(),
    })
}
