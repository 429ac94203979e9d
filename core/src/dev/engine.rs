//! The I/O engine: a trait every consumer programs against, and its io_uring
//! implementation [`UringEngine`].
//!
//! Two ways of driving it:
//!
//! * [`IoEngine::execute`] takes a batch of [`IoRequest`]s (reads, writes, flushes on any
//!   number of devices) and returns once every one has completed. Up to the queue depth are
//!   in flight at once. A flush request is a barrier: the batch is cut at each flush, every
//!   request before it runs to completion (short transfers resumed, `EAGAIN`/`EINTR`
//!   resubmitted), then the flush runs alone, then the requests after it. So `[write,
//!   fdatasync]` returns `Ok` only once the whole write was done before the flush started.
//!   (`IOSQE_IO_DRAIN` is not enough: it orders a request against those submitted before
//!   it, and the resumed part of a short write is submitted after the flush.) The first
//!   error is returned after every request already in flight has completed, and nothing
//!   after it is started, so no buffer is ever borrowed by the kernel after the call
//!   returns.
//!   A durable write ([`IoRequest::write_dsync`]) carries its own flush: it completes only
//!   once its data is durable, and is not a barrier for the requests around it.
//! * [`IoEngine::stream`] keeps `queue_depth` fixed-size reads or writes in flight on one
//!   device (the shape of a benchmark), optionally with registered buffers and a fixed
//!   file, reporting each completion's latency. Its buffers (and their registration) are
//!   kept in the engine from call to call while the block size stays the same.

use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use super::buf::AlignedBuf;
use super::device::Device;
use super::error::{DevError, Result};

/// What a request does.
#[derive(Debug)]
pub enum IoOp<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
    /// A write that completes only once it is durable (`RWF_DSYNC`: on a block device a
    /// FUA write, which the block layer turns into the write followed by a cache flush
    /// when the device has no FUA).
    DsyncWrite(&'a [u8]),
    /// `fsync(2)` as a ring operation.
    Fsync,
    /// `fdatasync(2)` as a ring operation.
    Fdatasync,
}

/// One request of a batch.
#[derive(Debug)]
pub struct IoRequest<'a> {
    pub dev: &'a Device,
    pub offset: u64,
    pub op: IoOp<'a>,
}

impl<'a> IoRequest<'a> {
    pub fn read(dev: &'a Device, offset: u64, buf: &'a mut [u8]) -> Self {
        IoRequest {
            dev,
            offset,
            op: IoOp::Read(buf),
        }
    }
    pub fn write(dev: &'a Device, offset: u64, buf: &'a [u8]) -> Self {
        IoRequest {
            dev,
            offset,
            op: IoOp::Write(buf),
        }
    }
    pub fn write_dsync(dev: &'a Device, offset: u64, buf: &'a [u8]) -> Self {
        IoRequest {
            dev,
            offset,
            op: IoOp::DsyncWrite(buf),
        }
    }
    pub fn fsync(dev: &'a Device) -> Self {
        IoRequest {
            dev,
            offset: 0,
            op: IoOp::Fsync,
        }
    }
    pub fn fdatasync(dev: &'a Device) -> Self {
        IoRequest {
            dev,
            offset: 0,
            op: IoOp::Fdatasync,
        }
    }
    fn name(&self) -> &'static str {
        match self.op {
            IoOp::Read(_) => "read",
            IoOp::Write(_) => "write",
            IoOp::DsyncWrite(_) => "dsync write",
            IoOp::Fsync => "fsync",
            IoOp::Fdatasync => "fdatasync",
        }
    }
    fn is_flush(&self) -> bool {
        matches!(self.op, IoOp::Fsync | IoOp::Fdatasync)
    }
    fn len(&self) -> usize {
        match &self.op {
            IoOp::Read(b) => b.len(),
            IoOp::Write(b) | IoOp::DsyncWrite(b) => b.len(),
            IoOp::Fsync | IoOp::Fdatasync => 0,
        }
    }
    fn validate(&self) -> Result<()> {
        let (addr, len) = match &self.op {
            IoOp::Read(b) => (b.as_ptr() as usize, b.len()),
            IoOp::Write(b) | IoOp::DsyncWrite(b) => (b.as_ptr() as usize, b.len()),
            IoOp::Fsync | IoOp::Fdatasync => return Ok(()),
        };
        if len > u32::MAX as usize {
            return Err(DevError::Config(format!(
                "a single request is limited to 4 GiB, got {len} bytes"
            )));
        }
        self.dev.check_buffer(addr)?;
        self.dev.check_range(self.offset, len as u64)
    }
}

/// Read or write, for [`StreamSpec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOp {
    Read,
    Write,
}

/// Offsets of a [`StreamSpec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Block after block, wrapping at the end of the region.
    Sequential,
    /// Uniformly random block-aligned offsets from a seeded generator.
    Random { seed: u64 },
}

/// When a stream stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamLimit {
    Ops(u64),
    Time(Duration),
}

/// A benchmark-shaped stream of I/O on one device.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub op: StreamOp,
    pub pattern: Pattern,
    pub block_size: usize,
    pub queue_depth: u32,
    /// Start of the region the stream stays in.
    pub region_offset: u64,
    /// Length of the region (0: to the end of the device).
    pub region_len: u64,
    pub limit: StreamLimit,
    /// Register the stream's buffers with the ring (`READ_FIXED`/`WRITE_FIXED`).
    pub fixed_buffers: bool,
    /// Register the device's file descriptor with the ring.
    pub fixed_file: bool,
}

/// What a stream did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamStats {
    pub ops: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl StreamStats {
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The interface of an I/O engine.
pub trait IoEngine {
    /// Runs every request of the batch to completion (see the module docs).
    fn execute(&mut self, reqs: &mut [IoRequest<'_>]) -> Result<()>;

    /// Runs a benchmark-shaped stream; `on_complete` gets each completion's latency.
    fn stream(
        &mut self,
        dev: &Device,
        spec: &StreamSpec,
        on_complete: &mut dyn FnMut(Duration),
    ) -> Result<StreamStats>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, dev: &Device, offset: u64, buf: &[u8]) -> Result<()> {
        self.execute(&mut [IoRequest::write(dev, offset, buf)])
    }
    /// Fills all of `buf` from `offset`.
    fn read_at(&mut self, dev: &Device, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.execute(&mut [IoRequest::read(dev, offset, buf)])
    }
    fn fsync(&mut self, dev: &Device) -> Result<()> {
        self.execute(&mut [IoRequest::fsync(dev)])
    }
    fn fdatasync(&mut self, dev: &Device) -> Result<()> {
        self.execute(&mut [IoRequest::fdatasync(dev)])
    }
}

/// The io_uring implementation of [`IoEngine`]. One per thread.
pub struct UringEngine {
    ring: IoUring,
    queue_depth: u32,
    scratch: Scratch,
    stream_bufs: StreamBufs,
    #[cfg(test)]
    hooks: tests::Hooks,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("queue_depth", &self.queue_depth)
            .finish()
    }
}

/// Buffers `execute` reuses from call to call.
#[derive(Default)]
struct Scratch {
    /// Bytes done of each request of the batch.
    done: Vec<usize>,
    cqes: Vec<(u64, i32)>,
    retry: Vec<usize>,
}

/// The buffers of `stream`, kept from call to call: allocating, filling and registering
/// them costs more than a short stream.
#[derive(Default)]
struct StreamBufs {
    bufs: Vec<AlignedBuf>,
    /// Block size and alignment of `bufs`.
    shape: (usize, usize),
    /// `bufs` are registered with the ring (their indexes are the buffer indexes).
    registered: bool,
    /// `bufs` hold the pseudo-random bytes writes send (a read overwrites them).
    write_pattern: bool,
}

impl UringEngine {
    /// An engine with queue depth `qd` (1..=4096): at most `qd` requests in flight.
    pub fn with_queue_depth(qd: u32) -> Result<UringEngine> {
        if qd == 0 || qd > 4096 {
            return Err(DevError::Config(format!(
                "queue depth must be 1..=4096, got {qd}"
            )));
        }
        let entries = qd.next_power_of_two();
        // COOP_TASKRUN (Linux 5.19+) spares an interrupt per completion, as fio's io_uring
        // engine does; older kernels refuse the flag, so fall back to a plain ring.
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .setup_coop_taskrun()
            .build(entries)
            .or_else(|_| IoUring::builder().setup_cqsize(entries * 2).build(entries))
            .map_err(|source| DevError::Ring {
                op: "io_uring_setup",
                cause: source,
            })?;
        Ok(UringEngine {
            ring,
            queue_depth: qd,
            scratch: Scratch::default(),
            stream_bufs: StreamBufs::default(),
            #[cfg(test)]
            hooks: tests::Hooks::default(),
        })
    }

    pub fn queue_depth(&self) -> u32 {
        self.queue_depth
    }

    /// Builds the submission entry for `len` bytes of request `idx` from byte `done` on
    /// (the whole rest, or less under a test hook).
    fn entry(req: &mut IoRequest<'_>, idx: usize, done: usize, len: usize) -> squeue::Entry {
        let fd = types::Fd(req.dev.raw_fd());
        let off = req.offset + done as u64;
        let e = match &mut req.op {
            IoOp::Read(b) => {
                let rest = &mut b[done..done + len];
                opcode::Read::new(fd, rest.as_mut_ptr(), rest.len() as u32)
                    .offset(off)
                    .build()
            }
            IoOp::Write(b) => {
                let rest = &b[done..done + len];
                opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
                    .offset(off)
                    .build()
            }
            IoOp::DsyncWrite(b) => {
                // Each part of a resumed short write is durable on its own, so the whole
                // is durable once the last part completes.
                let rest = &b[done..done + len];
                opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
                    .offset(off)
                    .rw_flags(libc::RWF_DSYNC)
                    .build()
            }
            IoOp::Fsync => opcode::Fsync::new(fd).build(),
            IoOp::Fdatasync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        e.user_data(idx as u64)
    }

    /// Pushes one entry. The caller keeps what it points at alive until its completion.
    fn push(&mut self, e: &squeue::Entry) -> Result<()> {
        loop {
            // SAFETY: every entry built by this engine points at a buffer borrowed by the
            // request batch (or owned by the stream) that outlives the request's
            // completion: `execute`/`stream` reap every in-flight entry before returning,
            // also on error.
            let pushed = unsafe { self.ring.submission().push(e) };
            if pushed.is_ok() {
                return Ok(());
            }
            // Queue full (cannot happen while in-flight <= queue depth <= SQ size, but
            // harmless): hand what we have to the kernel and try again.
            self.wait_one(1)?;
        }
    }

    fn submit(&mut self, want: usize) -> Result<usize> {
        // Waits are sliced into WAIT_SLICE timeouts (when the kernel has EXT_ARG), so that a
        // completion that never comes turns into an error after LOST_COMPLETION instead of
        // a silent hang. We saw it once on 6.18: a 4 KiB read on a loop device consumed from
        // the SQ, nothing in flight on any device, no CQE, no overflow.
        const WAIT_SLICE: Duration = Duration::from_secs(5);
        const LOST_COMPLETION: Duration = Duration::from_secs(120);
        let ext_arg = want > 0 && self.ring.params().is_feature_ext_arg();
        let started = Instant::now();
        loop {
            let r = if ext_arg {
                let ts = types::Timespec::from(WAIT_SLICE);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            } else {
                self.ring.submit_and_wait(want)
            };
            match r {
                Ok(n) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                    if !self.ring.completion().is_empty() {
                        return Ok(0);
                    }
                    if started.elapsed() >= LOST_COMPLETION {
                        return Err(DevError::Ring {
                            op: "io_uring_enter (no completion within 120 s)",
                            cause: e,
                        });
                    }
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && want > 0 => continue,
                Err(source) => {
                    return Err(DevError::Ring {
                        op: "io_uring_enter",
                        cause: source,
                    })
                }
            }
        }
    }

    /// Submits what is queued and waits for a completion (or one wait slice: callers loop
    /// while requests are in flight). If the ring itself fails
    /// while requests are in flight, the kernel may still write into buffers the caller
    /// is about to free: that cannot be reported as an error safely, so the process aborts.
    fn wait_one(&mut self, in_flight: usize) -> Result<()> {
        match self.submit(1) {
            Ok(_) => Ok(()),
            Err(e) if in_flight > 0 => {
                eprintln!("blocklab: fatal: {e} with {in_flight} requests in flight; aborting");
                std::process::abort()
            }
            Err(e) => Err(e),
        }
    }

    fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        out.clear();
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
    }

    /// Runs `reqs[range]` to completion: up to the queue depth in flight, short transfers
    /// resumed, `EAGAIN`/`EINTR` resubmitted. Returns the first error once nothing of the
    /// range is in flight any more; after an error nothing new is submitted.
    fn run_segment(
        &mut self,
        reqs: &mut [IoRequest<'_>],
        range: std::ops::Range<usize>,
        s: &mut Scratch,
    ) -> Result<()> {
        s.retry.clear();
        let mut next = range.start;
        let mut in_flight = 0usize;
        let mut first_err: Option<DevError> = None;
        while in_flight > 0 || (first_err.is_none() && (next < range.end || !s.retry.is_empty())) {
            if first_err.is_none() {
                while in_flight < self.queue_depth as usize {
                    let idx = if let Some(i) = s.retry.pop() {
                        i
                    } else if next < range.end {
                        next += 1;
                        next - 1
                    } else {
                        break;
                    };
                    let done = s.done[idx];
                    #[allow(unused_mut)]
                    let mut len = reqs[idx].len() - done;
                    #[cfg(test)]
                    {
                        len = self.hooks.submit(idx, done, len, reqs[idx].dev.align());
                    }
                    let e = Self::entry(&mut reqs[idx], idx, done, len);
                    self.push(&e)?;
                    in_flight += 1;
                }
            }
            self.wait_one(in_flight)?;
            let mut cqes = std::mem::take(&mut s.cqes);
            self.reap(&mut cqes);
            for &(ud, res) in &cqes {
                in_flight -= 1;
                let idx = ud as usize;
                #[cfg(test)]
                self.hooks.complete(idx);
                let req = &reqs[idx];
                let done = &mut s.done[idx];
                if res < 0 {
                    let errno = -res;
                    if errno == libc::EAGAIN || errno == libc::EINTR {
                        s.retry.push(idx);
                        continue;
                    }
                    first_err.get_or_insert(DevError::Io {
                        path: req.dev.path().to_path_buf(),
                        op: req.name(),
                        offset: req.offset + *done as u64,
                        len: (req.len() - *done) as u64,
                        cause: std::io::Error::from_raw_os_error(errno),
                    });
                    continue;
                }
                let len = req.len();
                if len == 0 {
                    continue;
                }
                if res == 0 {
                    first_err.get_or_insert(DevError::Short {
                        path: req.dev.path().to_path_buf(),
                        op: req.name(),
                        offset: req.offset,
                        len: len as u64,
                        done: *done as u64,
                    });
                    continue;
                }
                *done += res as usize;
                if *done < len {
                    s.retry.push(idx); // short transfer: resume the rest
                }
            }
            s.cqes = cqes;
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Makes `self.stream_bufs` hold `qd` buffers of `bs` bytes aligned to `align`,
    /// registered when `register`, filled with the write pattern when `write`.
    fn prepare_stream_bufs(
        &mut self,
        bs: usize,
        align: usize,
        qd: usize,
        register: bool,
        write: bool,
    ) -> Result<()> {
        let sb = &mut self.stream_bufs;
        if sb.shape != (bs, align) || sb.bufs.len() < qd {
            if sb.registered {
                // Nothing is in flight between calls, so the old buffers can go.
                let _ = self.ring.submitter().unregister_buffers();
                sb.registered = false;
            }
            sb.bufs = (0..qd)
                .map(|_| AlignedBuf::with_alignment(bs, align))
                .collect();
            sb.shape = (bs, align);
            sb.write_pattern = false;
        }
        if write && !sb.write_pattern {
            let mut rng = SmallRng::seed_from_u64(0x5eed_b10c);
            for b in sb.bufs.iter_mut() {
                rng.fill_bytes(b);
            }
            sb.write_pattern = true;
        }
        if !write {
            sb.write_pattern = false;
        }
        if register && !sb.registered {
            let iovecs: Vec<libc::iovec> = sb
                .bufs
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            // SAFETY: the iovecs describe `sb.bufs`, whose allocations stay put (moving
            // an AlignedBuf or the Vec does not move the heap buffer) until they are
            // unregistered above, or the ring is dropped: `ring` is the engine's first
            // field, so it is closed before the buffers are freed.
            unsafe { self.ring.submitter().register_buffers(&iovecs) }.map_err(|source| {
                DevError::Ring {
                    op: "register_buffers",
                    cause: source,
                }
            })?;
            sb.registered = true;
        }
        Ok(())
    }
}

impl IoEngine for UringEngine {
    fn execute(&mut self, reqs: &mut [IoRequest<'_>]) -> Result<()> {
        for r in reqs.iter() {
            r.validate()?;
        }
        // Reused across calls: a log append is two small batches per write, and should not
        // cost three allocations each.
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.done.clear();
        scratch.done.resize(reqs.len(), 0);
        let mut result = Ok(());
        let mut start = 0;
        while start < reqs.len() {
            // The barrier: a flush is a segment of its own, and `run_segment` returns only
            // once everything of the previous segment has completed.
            let end = if reqs[start].is_flush() {
                start + 1
            } else {
                reqs[start..]
                    .iter()
                    .position(IoRequest::is_flush)
                    .map_or(reqs.len(), |p| start + p)
            };
            result = self.run_segment(reqs, start..end, &mut scratch);
            if result.is_err() {
                break;
            }
            start = end;
        }
        self.scratch = scratch;
        result
    }

    fn stream(
        &mut self,
        dev: &Device,
        spec: &StreamSpec,
        on_complete: &mut dyn FnMut(Duration),
    ) -> Result<StreamStats> {
        let bs = spec.block_size;
        if bs == 0 || bs % dev.align() != 0 {
            return Err(DevError::Misaligned {
                path: dev.path().to_path_buf(),
                what: "block size",
                value: bs as u64,
                align: dev.align() as u64,
            });
        }
        if spec.queue_depth == 0 || spec.queue_depth > self.queue_depth {
            return Err(DevError::Config(format!(
                "stream queue depth {} must be 1..={} (the engine's queue depth)",
                spec.queue_depth, self.queue_depth
            )));
        }
        if bs > u32::MAX as usize {
            return Err(DevError::Config(format!(
                "a single request is limited to 4 GiB, got a block size of {bs} bytes"
            )));
        }
        let region_len = if spec.region_len == 0 {
            dev.size().saturating_sub(spec.region_offset)
        } else {
            spec.region_len
        };
        dev.check_range(spec.region_offset, region_len)?;
        let blocks = region_len / bs as u64;
        if blocks == 0 {
            return Err(DevError::TooSmall {
                path: dev.path().to_path_buf(),
                size: dev.size(),
                needed: spec.region_offset + bs as u64,
            });
        }
        let qd = spec.queue_depth as usize;
        self.prepare_stream_bufs(
            bs,
            dev.align(),
            qd,
            spec.fixed_buffers,
            spec.op == StreamOp::Write,
        )?;
        // The file is registered for this call only: a registered file keeps the device
        // open (a loop device would not detach) until it is unregistered.
        if spec.fixed_file {
            self.ring
                .submitter()
                .register_files(&[dev.raw_fd()])
                .map_err(|source| DevError::Ring {
                    op: "register_files",
                    cause: source,
                })?;
        }
        let mut sb = std::mem::take(&mut self.stream_bufs);
        let result = self.run_stream(dev, spec, &mut sb.bufs[..qd], blocks, on_complete);
        self.stream_bufs = sb;
        if spec.fixed_file {
            let _ = self.ring.submitter().unregister_files();
        }
        result
    }
}

impl UringEngine {
    fn run_stream(
        &mut self,
        dev: &Device,
        spec: &StreamSpec,
        bufs: &mut [AlignedBuf],
        blocks: u64,
        on_complete: &mut dyn FnMut(Duration),
    ) -> Result<StreamStats> {
        let bs = spec.block_size;
        let qd = bufs.len();
        let mut rng = SmallRng::seed_from_u64(match spec.pattern {
            Pattern::Random { seed } => seed,
            Pattern::Sequential => 0,
        });
        let mut seq = 0u64;
        let mut next_offset = || -> u64 {
            let block = match spec.pattern {
                Pattern::Sequential => {
                    let b = seq % blocks;
                    seq += 1;
                    b
                }
                Pattern::Random { .. } => rng.random_range(0..blocks),
            };
            spec.region_offset + block * bs as u64
        };
        let mut started = vec![Instant::now(); qd];
        let mut offsets = vec![0u64; qd];
        let start = Instant::now();
        let (max_ops, deadline) = match spec.limit {
            StreamLimit::Ops(n) => (n, None),
            StreamLimit::Time(d) => (u64::MAX, Some(start + d)),
        };
        let mut issued = 0u64;
        let mut completed = 0u64;
        let mut in_flight = 0usize;
        let mut err: Option<DevError> = None;
        let mut free_slots: Vec<usize> = (0..qd).rev().collect();
        let mut cqes = Vec::with_capacity(qd);
        let mut now = start;
        loop {
            let stop = err.is_some() || issued >= max_ops || deadline.is_some_and(|d| now >= d);
            if !stop {
                // One submission-queue handle for the whole refill: the queue's head and
                // tail are synchronised once per batch, not once per request.
                let mut sq = self.ring.submission();
                while let Some(slot) = free_slots.pop() {
                    if issued >= max_ops {
                        free_slots.push(slot);
                        break;
                    }
                    let off = next_offset();
                    offsets[slot] = off;
                    let e = Self::stream_entry(dev, spec, &mut bufs[slot], slot, off);
                    // SAFETY: the entry points at `bufs[slot]`, owned by the engine and not
                    // touched again until this slot's completion is reaped; `run_stream`
                    // reaps every in-flight request before returning. The queue has room:
                    // at most `qd` <= SQ size requests are in flight, and everything queued
                    // before was submitted by the last `wait_one`.
                    if unsafe { sq.push(&e) }.is_err() {
                        free_slots.push(slot);
                        break;
                    }
                    started[slot] = now;
                    issued += 1;
                    in_flight += 1;
                }
            }
            if in_flight == 0 {
                break;
            }
            self.wait_one(in_flight)?;
            self.reap(&mut cqes);
            now = Instant::now();
            for &(ud, res) in &cqes {
                let slot = ud as usize;
                in_flight -= 1;
                if res == -libc::EAGAIN || res == -libc::EINTR {
                    // Resubmit the same block.
                    let e = Self::stream_entry(dev, spec, &mut bufs[slot], slot, offsets[slot]);
                    self.push(&e)?;
                    in_flight += 1;
                    continue;
                }
                if res < 0 || (res as usize) < bs {
                    err.get_or_insert_with(|| {
                        let op = if spec.op == StreamOp::Read {
                            "read"
                        } else {
                            "write"
                        };
                        if res < 0 {
                            DevError::Io {
                                path: dev.path().to_path_buf(),
                                op,
                                offset: offsets[slot],
                                len: bs as u64,
                                cause: std::io::Error::from_raw_os_error(-res),
                            }
                        } else {
                            DevError::Short {
                                path: dev.path().to_path_buf(),
                                op,
                                offset: offsets[slot],
                                len: bs as u64,
                                done: res as u64,
                            }
                        }
                    });
                }
                completed += 1;
                on_complete(now.duration_since(started[slot]));
                free_slots.push(slot);
            }
        }
        if let Some(e) = err {
            return Err(e);
        }
        Ok(StreamStats {
            ops: completed,
            bytes: completed * bs as u64,
            elapsed: start.elapsed(),
        })
    }

    fn stream_entry(
        dev: &Device,
        spec: &StreamSpec,
        buf: &mut AlignedBuf,
        slot: usize,
        off: u64,
    ) -> squeue::Entry {
        let len = spec.block_size as u32;
        // A fixed file is index 0 of the registered table, flagged FIXED_FILE.
        let fd = types::Fd(if spec.fixed_file { 0 } else { dev.raw_fd() });
        let e = match (spec.op, spec.fixed_buffers) {
            (StreamOp::Read, false) => opcode::Read::new(fd, buf.as_mut_ptr(), len)
                .offset(off)
                .build(),
            (StreamOp::Read, true) => {
                opcode::ReadFixed::new(fd, buf.as_mut_ptr(), len, slot as u16)
                    .offset(off)
                    .build()
            }
            (StreamOp::Write, false) => opcode::Write::new(fd, buf.as_ptr(), len)
                .offset(off)
                .build(),
            (StreamOp::Write, true) => opcode::WriteFixed::new(fd, buf.as_ptr(), len, slot as u16)
                .offset(off)
                .build(),
        };
        let e = if spec.fixed_file {
            e.flags(squeue::Flags::FIXED_FILE)
        } else {
            e
        };
        e.user_data(slot as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{file_device, pattern_buf, scratch};

    /// What `execute` submitted and reaped, in order (request indexes).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum Event {
        Submit(usize),
        Complete(usize),
    }

    /// Test hooks of `execute`.
    #[derive(Debug, Default)]
    pub(super) struct Hooks {
        /// Submit only the first half (aligned) of every request of at least two alignment
        /// units the first time, so that each is a short transfer `execute` must resume.
        split_first: bool,
        trace: Vec<Event>,
    }

    impl Hooks {
        /// Records a submission; returns how many of the `len` remaining bytes to submit.
        pub(super) fn submit(
            &mut self,
            idx: usize,
            done: usize,
            len: usize,
            align: usize,
        ) -> usize {
            self.trace.push(Event::Submit(idx));
            if self.split_first && done == 0 && len >= 2 * align {
                len / 2 / align * align
            } else {
                len
            }
        }
        pub(super) fn complete(&mut self, idx: usize) {
            self.trace.push(Event::Complete(idx));
        }
    }

    /// Position of the first / last event matching `e` in the trace.
    fn first(trace: &[Event], e: Event) -> usize {
        trace.iter().position(|&x| x == e).unwrap()
    }
    fn last(trace: &[Event], e: Event) -> usize {
        trace.iter().rposition(|&x| x == e).unwrap()
    }
    fn submits(trace: &[Event], i: usize) -> usize {
        trace.iter().filter(|&&e| e == Event::Submit(i)).count()
    }

    /// Every buffer `i` reads back from offset `i * stride`.
    fn assert_landed(eng: &mut UringEngine, dev: &Device, bufs: &[AlignedBuf], stride: u64) {
        let mut back = AlignedBuf::new(bufs[0].len());
        for (i, b) in bufs.iter().enumerate() {
            eng.read_at(dev, i as u64 * stride, &mut back).unwrap();
            assert_eq!(&back[..], &b[..], "write {i}");
        }
    }

    /// Durable (`RWF_DSYNC`) writes land like plain ones, also when a short first transfer
    /// is resumed (each part is submitted durable on its own).
    #[test]
    fn dsync_writes_land_whole_even_when_resumed() {
        let dir = scratch();
        let dev = file_device(dir.path(), 1 << 20);
        for split in [false, true] {
            let mut eng = UringEngine::with_queue_depth(4).unwrap();
            eng.hooks.split_first = split;
            let bufs: Vec<AlignedBuf> = (0..8).map(|i| pattern_buf(32 << 10, i + 9)).collect();
            let mut reqs: Vec<IoRequest<'_>> = bufs
                .iter()
                .enumerate()
                .map(|(i, b)| IoRequest::write_dsync(&dev, i as u64 * (64 << 10), b))
                .collect();
            eng.execute(&mut reqs).unwrap();
            let trace = std::mem::take(&mut eng.hooks.trace);
            for i in 0..reqs.len() {
                assert_eq!(submits(&trace, i), if split { 2 } else { 1 }, "request {i}");
            }
            drop(reqs);
            assert_landed(&mut eng, &dev, &bufs, 64 << 10);
        }
    }

    /// `[writes..., flush, writes..., flush]` with every write resumed after a short first
    /// transfer: each flush is submitted only after every earlier request completed (the
    /// resumed parts included), later requests only after the flush completed, and every
    /// byte lands.
    #[test]
    fn a_flush_is_a_barrier_even_for_resumed_writes() {
        let dir = scratch();
        let dev = file_device(dir.path(), 4 << 20);
        for split in [false, true] {
            let mut eng = UringEngine::with_queue_depth(8).unwrap();
            eng.hooks.split_first = split;
            let bufs: Vec<AlignedBuf> = (0..40).map(|i| pattern_buf(16 << 10, i + 1)).collect();
            let mut reqs: Vec<IoRequest<'_>> = Vec::new();
            for (i, b) in bufs.iter().enumerate() {
                if i == 20 {
                    reqs.push(IoRequest::fdatasync(&dev));
                }
                reqs.push(IoRequest::write(&dev, i as u64 * (32 << 10), b));
            }
            reqs.push(IoRequest::fsync(&dev));
            eng.execute(&mut reqs).unwrap();
            let trace = std::mem::take(&mut eng.hooks.trace);
            let flushes: Vec<usize> = (0..reqs.len()).filter(|&i| reqs[i].is_flush()).collect();
            assert_eq!(flushes, vec![20, 41]);
            for &f in &flushes {
                let f_submit = first(&trace, Event::Submit(f));
                let f_done = last(&trace, Event::Complete(f));
                for i in 0..reqs.len() {
                    if i < f {
                        assert!(
                            last(&trace, Event::Complete(i)) < f_submit,
                            "request {i} completed after flush {f} started (split {split})"
                        );
                    } else if i > f {
                        assert!(
                            first(&trace, Event::Submit(i)) > f_done,
                            "request {i} started before flush {f} completed (split {split})"
                        );
                    }
                }
            }
            for i in (0..reqs.len()).filter(|i| !flushes.contains(i)) {
                assert_eq!(submits(&trace, i), if split { 2 } else { 1 }, "request {i}");
            }
            drop(reqs);
            assert_landed(&mut eng, &dev, &bufs, 32 << 10);
        }
    }

    /// Reads are resumed as well, and the queue depth bounds what is in flight.
    #[test]
    fn resumed_reads_and_queue_depth() {
        let dir = scratch();
        let dev = file_device(dir.path(), 1 << 20);
        let data = pattern_buf(1 << 20, 3);
        let mut eng = UringEngine::with_queue_depth(4).unwrap();
        eng.write_at(&dev, 0, &data).unwrap();
        eng.hooks.split_first = true;
        eng.hooks.trace.clear();
        let mut back: Vec<AlignedBuf> = (0..16).map(|_| AlignedBuf::new(64 << 10)).collect();
        let mut reqs: Vec<IoRequest<'_>> = back
            .iter_mut()
            .enumerate()
            .map(|(i, b)| IoRequest::read(&dev, i as u64 * (64 << 10), b))
            .collect();
        eng.execute(&mut reqs).unwrap();
        drop(reqs);
        for (i, b) in back.iter().enumerate() {
            assert_eq!(
                &b[..],
                &data[i * (64 << 10)..(i + 1) * (64 << 10)],
                "read {i}"
            );
        }
        let mut in_flight = 0i32;
        for e in &eng.hooks.trace {
            in_flight += if matches!(e, Event::Submit(_)) { 1 } else { -1 };
            assert!(
                (0..=4).contains(&in_flight),
                "{in_flight} in flight at QD 4"
            );
        }
    }
}
