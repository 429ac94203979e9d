//! The audit: walks every block of every device of a node and classifies it as free,
//! in use and recorded, or neither (leaked); and counts blocks owned twice. A bitmap whose
//! bits past the last block are not all set counts as one double allocation too (a claim
//! could hand out a block that does not exist).
//!
//! Records come from three places: the caller's list (index-server records, blocks a
//! worker reported holding), the unfilled-block table, and each process's current-block
//! record where the block's state says that process has it in flight. Run it while the
//! node is quiescent (after a run), or under [`super::recovery::quiesce`].

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::attached::Attached;
use super::segs::{BlockRef, BlockState};
use super::AllocError;

/// A byte range of a block that some owner recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub block: BlockRef,
    pub offset: u64,
    pub len: u64,
}

/// What the audit found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditReport {
    pub blocks: u64,
    pub free: u64,
    pub in_use: u64,
    pub leaked_blocks: u64,
    pub double_allocated: u64,
    /// The first few problems, for humans.
    pub problems: Vec<String>,
}

impl AuditReport {
    fn problem(&mut self, s: String) {
        if self.problems.len() < 20 {
            self.problems.push(s);
        }
    }
}

/// Audits every online device of the node.
pub fn audit(at: &Attached, records: &[Record]) -> Result<AuditReport, AllocError> {
    let mut by_block: HashMap<BlockRef, Vec<(u64, u64)>> = HashMap::new();
    for r in records {
        by_block.entry(r.block).or_default().push((r.offset, r.len));
    }
    let mut unfilled: HashMap<BlockRef, u32> = HashMap::new();
    for (_, u) in at.unfilled.entries() {
        *unfilled.entry(u.block).or_default() += 1;
    }
    let mut current: HashMap<BlockRef, Vec<u16>> = HashMap::new();
    for (_, p) in at.proc_records()? {
        if let Some(b) = BlockRef::unpack(p.current().load(Ordering::Acquire)) {
            current.entry(b).or_default().push(p.proc_id());
        }
    }
    let mut rep = AuditReport::default();
    for d in at.attached_devices().filter(|d| d.is_online()) {
        let dev = d.index();
        if !d.tail_bits_set() {
            rep.double_allocated += 1;
            rep.problem(format!(
                "device {dev}: a bitmap bit past its last block is clear (a claim could hand out a block that does not exist)"
            ));
        }
        let mut in_free = vec![0u32; d.block_count() as usize];
        for b in d.free_members() {
            match in_free.get_mut(b as usize) {
                Some(c) => *c += 1,
                None => {
                    rep.double_allocated += 1;
                    rep.problem(format!(
                        "device {dev}: the free structure names block {b}, past its {} blocks",
                        d.block_count()
                    ));
                }
            }
        }
        for b in 0..d.block_count() {
            rep.blocks += 1;
            let r = BlockRef { dev, block: b };
            let state = d.load_state(b);
            let recs = by_block.get(&r).map(|v| v.as_slice()).unwrap_or(&[]);
            let unf = unfilled.get(&r).copied().unwrap_or(0);
            let cur_owner = match state {
                BlockState::InFlight { owner, .. } => {
                    current.get(&r).is_some_and(|v| v.contains(&owner))
                }
                _ => false,
            };
            let mut overlap = false;
            for (i, a) in recs.iter().enumerate() {
                for b2 in &recs[i + 1..] {
                    if a.0 < b2.0 + b2.1 && b2.0 < a.0 + a.1 {
                        overlap = true;
                    }
                }
            }
            let f = in_free[b as usize];
            if f >= 2 {
                rep.double_allocated += 1;
                rep.problem(format!("block {r} is {f} times in the free structure"));
            } else if f == 1 {
                if state != BlockState::Free || !recs.is_empty() || unf > 0 {
                    rep.double_allocated += 1;
                    rep.problem(format!(
                        "block {r} is free and also owned (state {state:?}, {} records, {unf} unfilled entries)",
                        recs.len()
                    ));
                } else {
                    rep.free += 1;
                }
            } else if overlap || unf >= 2 {
                rep.double_allocated += 1;
                rep.problem(format!("block {r} has overlapping owners"));
            } else {
                let recorded = match state {
                    BlockState::Free => false,
                    BlockState::InFlight { .. } => cur_owner || !recs.is_empty(),
                    BlockState::Filled { .. } => !recs.is_empty() || unf > 0,
                };
                if recorded {
                    rep.in_use += 1;
                } else {
                    rep.leaked_blocks += 1;
                    rep.problem(format!(
                        "block {r} is neither free nor recorded (state {state:?})"
                    ));
                }
            }
        }
    }
    Ok(rep)
}
