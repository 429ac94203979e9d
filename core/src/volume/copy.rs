//! The copy pipeline: chunks read from the source extents and written to the destination
//! extents through one io_uring engine, several requests in flight. Each batch submits the
//! writes of the previous chunk set together with the reads of the next one, so reading and
//! writing overlap; a final fdatasync per destination device (one batch) makes the copy
//! durable. The buffers ([`CopyBuffers`]) belong to the caller and are reused across copies.

use crate::dev::{AlignedBuf, DevError, Device, IoEngine, IoRequest};

use super::extent::Extent;

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    pub bytes: u64,
    pub chunks: u64,
}

/// The pipeline's buffers: two sets of `depth` chunks (one being read, one being written).
#[derive(Debug)]
pub struct CopyBuffers {
    chunk: usize,
    a: Vec<AlignedBuf>,
    b: Vec<AlignedBuf>,
}

impl CopyBuffers {
    /// Buffers for `depth` (at least 1) chunks of `chunk` bytes in flight.
    pub fn new(chunk: usize, depth: usize) -> CopyBuffers {
        let depth = depth.max(1);
        let set = || (0..depth).map(|_| AlignedBuf::new(chunk)).collect();
        CopyBuffers {
            chunk,
            a: set(),
            b: set(),
        }
    }
    pub fn depth(&self) -> usize {
        self.a.len()
    }
}

/// A contiguous piece: (device index, offset) on both sides and a length.
#[derive(Debug, Clone, Copy)]
struct Piece {
    src_dev: usize,
    src_off: u64,
    dst_dev: usize,
    dst_off: u64,
    len: u64,
}

/// Splits the first `limit` logical bytes of two extent lists into pieces of at most
/// `chunk` (> 0; empty extents are skipped).
fn pieces(src: &[Extent], dst: &[Extent], limit: u64, chunk: u64) -> Vec<Piece> {
    if chunk == 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut total = 0u64;
    let (mut si, mut di) = (0usize, 0usize);
    let (mut so, mut do_) = (0u64, 0u64);
    while si < src.len() && di < dst.len() && total < limit {
        let s = &src[si];
        let d = &dst[di];
        let len = (s.len - so).min(d.len - do_).min(chunk).min(limit - total);
        total += len;
        if len > 0 {
            out.push(Piece {
                src_dev: s.device,
                src_off: s.offset + so,
                dst_dev: d.device,
                dst_off: d.offset + do_,
                len,
            });
        }
        so += len;
        do_ += len;
        if so == s.len {
            si += 1;
            so = 0;
        }
        if do_ == d.len {
            di += 1;
            do_ = 0;
        }
    }
    out
}

/// Copies the first `len` logical bytes of `src` extents onto `dst` extents.
/// `bufs.depth()` chunks of `bufs.chunk()` bytes are read per batch. `progress(bytes_done)`
/// is called after each batch; returning `false` stops the copy early (the stats say how
/// far it got).
pub fn copy_extents(
    engine: &mut dyn IoEngine,
    devices: &[Device],
    src: &[Extent],
    dst: &[Extent],
    len: u64,
    bufs: &mut CopyBuffers,
    progress: &mut dyn FnMut(u64) -> bool,
) -> Result<(CopyStats, bool), DevError> {
    let depth = bufs.depth();
    let all = pieces(src, dst, len, bufs.chunk as u64);
    let mut stats = CopyStats::default();
    let CopyBuffers {
        a: bufs_a,
        b: bufs_b,
        ..
    } = bufs;
    // `pending` = pieces whose data sits in bufs_b, to be written in the next batch.
    let mut pending: &[Piece] = &[];
    let mut next = 0usize;
    let mut stopped = false;
    loop {
        let reading = &all[next..(next + depth).min(all.len())];
        if reading.is_empty() && pending.is_empty() {
            break;
        }
        {
            let mut reqs: Vec<IoRequest<'_>> = Vec::with_capacity(reading.len() + pending.len());
            for (p, b) in pending.iter().zip(bufs_b.iter()) {
                reqs.push(IoRequest::write(
                    &devices[p.dst_dev],
                    p.dst_off,
                    &b[..p.len as usize],
                ));
            }
            for (p, b) in reading.iter().zip(bufs_a.iter_mut()) {
                reqs.push(IoRequest::read(
                    &devices[p.src_dev],
                    p.src_off,
                    &mut b[..p.len as usize],
                ));
            }
            engine.execute(&mut reqs)?;
        }
        for p in pending {
            stats.bytes += p.len;
            stats.chunks += 1;
        }
        pending = reading;
        next += reading.len();
        std::mem::swap(bufs_a, bufs_b);
        if !progress(stats.bytes) {
            stopped = true;
            break;
        }
    }
    if !stopped {
        let mut flushed: Vec<usize> = dst.iter().map(|e| e.device).collect();
        flushed.sort_unstable();
        flushed.dedup();
        let mut syncs: Vec<IoRequest<'_>> = flushed
            .into_iter()
            .map(|d| IoRequest::fdatasync(&devices[d]))
            .collect();
        engine.execute(&mut syncs)?;
    }
    Ok((stats, !stopped))
}
