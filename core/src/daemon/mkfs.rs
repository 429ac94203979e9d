//! mkfs in phases (see the module docs of [`super`]).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use crate::dev::{self, AlignedBuf, Device, Found, IoEngine, IoRequest};
use crate::format::{Bitmap, Label, Layout, LayoutParams, LogInitRecord, Superblock, BLOCK};

use super::error::{DaemonError, Result};
use super::mount::mount;
use super::Phase;

/// Largest single write mkfs issues (the log and bitmap go out in chunks of this size).
const CHUNK: usize = 1 << 20;

/// What to format.
#[derive(Debug, Clone)]
pub struct MkfsRequest {
    pub cluster_fsid: Uuid,
    pub daemon_id: u32,
    /// The daemon's uuid; `None`: keep the one already on the device for this daemon
    /// (finished or not), else a new random one. A finished format with another uuid is
    /// refused unless `force`.
    pub daemon_uuid: Option<Uuid>,
    /// Overwrite foreign data, and a finished format of this daemon that does not mount
    /// or differs from the request.
    pub force: bool,
    pub params: LayoutParams,
    /// Crash injection: stop (return [`DaemonError::InjectedStop`]) right after this phase.
    pub stop_after: Option<Phase>,
}

impl MkfsRequest {
    pub fn new(cluster_fsid: Uuid, daemon_id: u32) -> MkfsRequest {
        MkfsRequest {
            cluster_fsid,
            daemon_id,
            daemon_uuid: None,
            force: false,
            params: LayoutParams::default(),
            stop_after: None,
        }
    }
}

/// What mkfs did.
#[derive(Debug, Clone)]
pub struct MkfsReport {
    pub label: Label,
    /// The device was already formatted (and mounts) for this cluster and daemon, as
    /// requested: nothing written.
    pub already_formatted: bool,
    /// Each phase that ran and how long it took.
    pub phases: Vec<(Phase, Duration)>,
    pub bytes_written: u64,
}

impl MkfsReport {
    pub fn total(&self) -> Duration {
        self.phases.iter().map(|(_, d)| *d).sum()
    }
}

struct Run<'a> {
    dev: &'a Device,
    req: &'a MkfsRequest,
    phases: Vec<(Phase, Duration)>,
    started: Instant,
    bytes: u64,
}

impl Run<'_> {
    /// Ends a phase: records its time, and stops here if crash injection says so.
    fn end(&mut self, phase: Phase) -> Result<()> {
        let now = Instant::now();
        self.phases.push((phase, now - self.started));
        self.started = now;
        if self.req.stop_after == Some(phase) {
            return Err(DaemonError::InjectedStop {
                path: self.dev.path().to_path_buf(),
                phase,
            });
        }
        Ok(())
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn block_of(dev: &Device, bytes: &[u8]) -> AlignedBuf {
    let mut b = AlignedBuf::with_alignment(BLOCK, dev.align());
    b[..bytes.len()].copy_from_slice(bytes);
    b
}

/// How a finished, mountable format of this daemon differs from the request (empty: it
/// is what was asked for).
fn differences(label: &Label, req: &MkfsRequest) -> Vec<String> {
    let mut out = Vec::new();
    let l = &label.layout;
    if l.alloc_unit != req.params.alloc_unit {
        out.push(format!(
            "allocation unit {} (requested {})",
            l.alloc_unit, req.params.alloc_unit
        ));
    }
    if l.log_len != req.params.log_len {
        out.push(format!(
            "a log of {} bytes (requested {})",
            l.log_len, req.params.log_len
        ));
    }
    if let Some(u) = req.daemon_uuid.filter(|&u| u != label.daemon_uuid) {
        out.push(format!("daemon uuid {} (requested {u})", label.daemon_uuid));
    }
    out
}

/// Formats `dev` for daemon `req.daemon_id` of cluster `req.cluster_fsid`.
///
/// Refuses (unless `force`) a device holding another cluster's or daemon's label, a
/// filesystem, a partition table, or non-zero bytes in its first MiB. For a label of the
/// same cluster and daemon:
/// * not ready (a format interrupted before its commit point): formatted again, keeping
///   its daemon uuid unless the request names one;
/// * ready and mountable, with the requested layout parameters and uuid: left alone
///   ([`MkfsReport::already_formatted`]);
/// * ready but not mountable (damaged), or with other parameters or another uuid than
///   requested: refused unless `force`, which formats it again.
pub fn mkfs(eng: &mut dyn IoEngine, dev: &Device, req: &MkfsRequest) -> Result<MkfsReport> {
    let path = dev.path().to_path_buf();
    let layout = Layout::compute(dev.size(), req.params).map_err(|source| DaemonError::Format {
        path: path.clone(),
        cause: source,
    })?;
    let mut run = Run {
        dev,
        req,
        phases: Vec::new(),
        started: Instant::now(),
        bytes: 0,
    };

    // Phase probe. The label, if any, is decoded from the bytes the probe read.
    let mut keep_uuid = None;
    let probed = dev::probe_head(eng, dev)?;
    let refused = |found: String| DaemonError::Refused {
        path: path.clone(),
        found,
    };
    match probed.found {
        Found::Empty => {}
        Found::Blocklab => match Label::decode(probed.head()) {
            Ok(l) if l.cluster_fsid == req.cluster_fsid && l.daemon_id == req.daemon_id => {
                if l.is_ready() {
                    match mount(eng, dev) {
                        Ok(m) => {
                            let diff = differences(&m.label, req);
                            if diff.is_empty() {
                                run.end(Phase::Probe)?;
                                return Ok(MkfsReport {
                                    label: m.label,
                                    already_formatted: true,
                                    phases: run.phases,
                                    bytes_written: 0,
                                });
                            }
                            if !req.force {
                                return Err(refused(format!(
                                    "a blocklab format of this daemon with {}",
                                    diff.join(", ")
                                )));
                            }
                        }
                        Err(DaemonError::NotMountable { reason, .. }) if !req.force => {
                            return Err(refused(format!(
                                "a blocklab format of this daemon that does not mount: {reason}"
                            )));
                        }
                        Err(DaemonError::NotMountable { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                // Not ready: our own unfinished format, done again. Ready: `force`.
                keep_uuid = Some(l.daemon_uuid);
            }
            Ok(l) if !req.force => {
                return Err(refused(format!(
                    "a blocklab label of cluster {} daemon {}",
                    l.cluster_fsid, l.daemon_id
                )))
            }
            Err(e) if !req.force => {
                return Err(refused(format!("a damaged blocklab label ({e})")));
            }
            _ => {}
        },
        found if !req.force => return Err(refused(found.to_string())),
        _ => {}
    }
    drop(probed);
    run.end(Phase::Probe)?;

    let daemon_uuid = req.daemon_uuid.or(keep_uuid).unwrap_or_else(Uuid::new_v4);
    let birth = now_ns();
    let label = Label {
        flags: 0,
        cluster_fsid: req.cluster_fsid,
        daemon_id: req.daemon_id,
        daemon_uuid,
        birth_time_unix_ns: birth,
        layout: layout.clone(),
    };

    // Phase label: not ready.
    let b = block_of(dev, &label.encode());
    eng.write_at(dev, 0, &b)?;
    run.bytes += BLOCK as u64;
    run.end(Phase::Label)?;

    // Phase superblock.
    let bitmap = Bitmap::initial(&layout);
    let sb = Superblock {
        cluster_fsid: req.cluster_fsid,
        daemon_id: req.daemon_id,
        alloc_unit: layout.alloc_unit,
        total_units: layout.total_units(),
        used_units: bitmap.used(),
        generation: 1,
    };
    let b = block_of(dev, &sb.encode());
    eng.write_at(dev, layout.superblock_offset, &b)?;
    run.bytes += BLOCK as u64;
    run.end(Phase::Superblock)?;

    // Phase log: the init record in its first block. The rest of the region is not
    // zeroed (as BlueFS does not zero its log): a log user trusts only entries after a
    // valid init record of this daemon's uuid, each with its own checksum.
    let rec = LogInitRecord {
        daemon_uuid,
        log_len: layout.log_len,
        birth_time_unix_ns: birth,
    };
    let b = block_of(dev, &rec.encode());
    eng.write_at(dev, layout.log_offset, &b)?;
    run.bytes += BLOCK as u64;
    run.end(Phase::Log)?;

    // Phase bitmap, written straight from the bitmap's own (4 KiB aligned) bytes.
    let mut reqs: Vec<IoRequest<'_>> = bitmap
        .as_bytes()
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, c)| IoRequest::write(dev, layout.bitmap_offset + (i * CHUNK) as u64, c))
        .collect();
    eng.execute(&mut reqs)?;
    drop(reqs);
    run.bytes += layout.bitmap_len;
    run.end(Phase::Bitmap)?;

    // Phase flush.
    eng.fsync(dev)?;
    run.end(Phase::Flush)?;

    // Phase commit: copies, flush, then the primary label with ready, flush.
    let ready = label.with_ready(true);
    let b = block_of(dev, &ready.encode());
    if !layout.label_copies.is_empty() {
        let mut reqs: Vec<IoRequest<'_>> = layout
            .label_copies
            .iter()
            .map(|&off| IoRequest::write(dev, off, &b))
            .collect();
        reqs.push(IoRequest::fsync(dev));
        eng.execute(&mut reqs)?;
        run.bytes += (BLOCK * layout.label_copies.len()) as u64;
    }
    eng.execute(&mut [IoRequest::write(dev, 0, &b), IoRequest::fsync(dev)])?;
    run.bytes += BLOCK as u64;
    run.end(Phase::Commit)?;

    Ok(MkfsReport {
        label: ready,
        already_formatted: false,
        phases: run.phases,
        bytes_written: run.bytes,
    })
}
