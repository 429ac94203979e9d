//! Device set-up and teardown for experiments.
//!
//! An experiment asks for `count` devices of at least `min_size` bytes and gets them from
//! exactly one source: `--devices` (given block devices, which must look unused unless
//! `--force`), `--provision N --size S` (loop devices from sparse files, torn down at
//! exit, also on error and on Ctrl-C), `--files DIR` (regular files in a fresh directory
//! under DIR, deleted at exit), or by default loop devices when root and regular files in
//! a temporary directory otherwise (with a warning).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

use anyhow::{bail, Context};
use blocklab::dev::provision::{self, ProvisionGuard};
use blocklab::dev::{
    self, Device, DeviceKind, Found, IoEngine, Pattern, StreamLimit, StreamOp, StreamSpec,
    UringEngine,
};

use crate::args::CommonArgs;

/// Sets the Ctrl-C handler tears down before exiting.
static ACTIVE: Mutex<Vec<(PathBuf, String)>> = Mutex::new(Vec::new());
static HANDLER: Once = Once::new();

fn install_interrupt_handler() {
    HANDLER.call_once(|| {
        let r = ctrlc::set_handler(|| {
            let sets = ACTIVE.lock().map(|v| v.clone()).unwrap_or_default();
            for (dir, set) in sets {
                eprintln!("interrupted: tearing down loop devices of set {set}");
                if let Err(e) = provision::teardown(&dir, &set) {
                    eprintln!("teardown of {set} failed: {e}; run `blocklab devices teardown --set {set} --state-dir {}`", dir.display());
                }
            }
            std::process::exit(130);
        });
        if let Err(e) = r {
            eprintln!("warning: cannot install the Ctrl-C handler ({e}); an interrupted run may leave loop devices behind");
        }
    });
}

/// Where the devices of a run came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Given,
    Provisioned,
    Files,
}

/// The devices of one experiment run.
#[derive(Debug)]
pub struct DeviceSet {
    paths: Vec<PathBuf>,
    source: Source,
    kind: DeviceKind,
    size: u64,
    guard: Option<ProvisionGuard>,
    _files_dir: Option<tempfile::TempDir>,
}

impl DeviceSet {
    /// Sets up `count` devices of at least `min_size` bytes; `default_size` is used when the
    /// command line does not say (`--size`).
    pub fn setup(
        args: &CommonArgs,
        count: usize,
        min_size: u64,
        default_size: u64,
    ) -> anyhow::Result<DeviceSet> {
        if count == 0 {
            bail!("an experiment needs at least one device");
        }
        if !args.devices.is_empty() {
            return Self::given(args, count, min_size);
        }
        if let Some(dir) = &args.files {
            let meta = std::fs::metadata(dir)
                .with_context(|| format!("--files {}: no such directory", dir.display()))?;
            if !meta.is_dir() {
                bail!("--files {}: not a directory", dir.display());
            }
        }
        let size = args.size.unwrap_or(default_size.max(min_size));
        if size < min_size {
            bail!("--size {size} is smaller than this run needs ({min_size} bytes per device)");
        }
        if let Some(n) = args.provision {
            if n < count {
                bail!("--provision {n}: this run needs {count} devices");
            }
            return Self::provisioned(args, count, size);
        }
        if let Some(dir) = &args.files {
            return Self::files(dir, count, size);
        }
        if rustix::process::geteuid().is_root() {
            Self::provisioned(args, count, size)
        } else {
            eprintln!("warning: not root, so no loop devices: using regular files with O_DIRECT in a temporary directory (figures are not block-device figures)");
            Self::files(&std::env::temp_dir(), count, size)
        }
    }

    fn given(args: &CommonArgs, count: usize, min_size: u64) -> anyhow::Result<DeviceSet> {
        let mut seen = std::collections::HashSet::new();
        for p in &args.devices {
            let canon = std::fs::canonicalize(p)
                .with_context(|| format!("{}: no such device", p.display()))?;
            if !seen.insert(canon) {
                bail!("{}: listed twice in --devices", p.display());
            }
        }
        if args.devices.len() < count {
            bail!(
                "this run needs {count} devices, --devices lists {}",
                args.devices.len()
            );
        }
        let paths: Vec<PathBuf> = args.devices[..count].to_vec();
        let mut eng = UringEngine::with_queue_depth(1)?;
        let mut kind = DeviceKind::Block;
        let mut size = u64::MAX;
        for p in &paths {
            let d = Device::open(p).with_context(|| format!("opening {}", p.display()))?;
            let found = dev::probe(&mut eng, &d)?;
            if found != Found::Empty && !args.force {
                bail!(
                    "{}: refusing to overwrite it: it holds {found}; pass --force to overwrite",
                    p.display()
                );
            }
            d.require_size(min_size)?;
            kind = d.kind();
            size = size.min(d.size());
        }
        Ok(DeviceSet {
            paths,
            source: Source::Given,
            kind,
            size,
            guard: None,
            _files_dir: None,
        })
    }

    fn provisioned(args: &CommonArgs, count: usize, size: u64) -> anyhow::Result<DeviceSet> {
        install_interrupt_handler();
        std::fs::create_dir_all(&args.state_dir)
            .with_context(|| format!("creating {}", args.state_dir.display()))?;
        let guard = ProvisionGuard::new(&args.state_dir, "exp", count, size)?;
        if let Ok(mut v) = ACTIVE.lock() {
            v.push((args.state_dir.clone(), guard.set().to_string()));
        }
        if let Some(d) = guard.state().devices.iter().find(|d| !d.direct_io) {
            eprintln!(
                "warning: the kernel refused direct I/O on {}; figures include the page cache",
                d.device.display()
            );
        }
        Ok(DeviceSet {
            paths: guard.paths(),
            source: Source::Provisioned,
            kind: DeviceKind::Block,
            size,
            guard: Some(guard),
            _files_dir: None,
        })
    }

    fn files(dir: &Path, count: usize, size: u64) -> anyhow::Result<DeviceSet> {
        let meta = std::fs::metadata(dir)
            .with_context(|| format!("--files {}: no such directory", dir.display()))?;
        if !meta.is_dir() {
            bail!("--files {}: not a directory", dir.display());
        }
        let tmp = tempfile::Builder::new()
            .prefix("blocklab-files-")
            .tempdir_in(dir)
            .with_context(|| format!("creating a directory under {}", dir.display()))?;
        let mut paths = Vec::new();
        for i in 0..count {
            let p = tmp.path().join(format!("dev-{i}.img"));
            let f = std::fs::File::create_new(&p)
                .with_context(|| format!("creating {}", p.display()))?;
            f.set_len(size)
                .with_context(|| format!("sizing {}", p.display()))?;
            paths.push(p);
        }
        // O_DIRECT must work there (it does not on every tmpfs).
        Device::open(&paths[0])
            .with_context(|| format!("{} does not support O_DIRECT files", dir.display()))?;
        Ok(DeviceSet {
            paths,
            source: Source::Files,
            kind: DeviceKind::File,
            size,
            guard: None,
            _files_dir: Some(tmp),
        })
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }
    pub fn len(&self) -> usize {
        self.paths.len()
    }
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }
    /// Size of each device (the smallest, for given devices).
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn source(&self) -> Source {
        self.source
    }
    /// Opens device `i` for reading and writing.
    pub fn open(&self, i: usize) -> anyhow::Result<Device> {
        let p = self
            .paths
            .get(i)
            .with_context(|| format!("no device {i} in a set of {}", self.paths.len()))?;
        Device::open(p).with_context(|| format!("opening {}", p.display()))
    }
    /// What goes into meta.json.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "source": self.source,
            "kind": self.kind,
            "size_bytes": self.size,
            "count": self.paths.len(),
            "paths": self.paths,
        })
    }
    /// Tears down now (drop does it too), reporting errors.
    pub fn teardown(mut self) -> anyhow::Result<()> {
        if let Some(g) = self.guard.take() {
            let set = g.set().to_string();
            g.teardown()
                .with_context(|| format!("tearing down set {set}"))?;
            if let Ok(mut v) = ACTIVE.lock() {
                v.retain(|(_, s)| *s != set);
            }
        }
        Ok(())
    }
}

impl Drop for DeviceSet {
    fn drop(&mut self) {
        if let Some(g) = self.guard.take() {
            let set = g.set().to_string();
            drop(g);
            if let Ok(mut v) = ACTIVE.lock() {
                v.retain(|(_, s)| *s != set);
            }
        }
    }
}

/// Writes `[offset, offset + len)` of `dev` once, sequentially in 1 MiB writes (a tail
/// under 1 MiB is left alone), then flushes, so that measurements do not pay for the first
/// write into a sparse backing file (block allocation in the host file system, whose
/// journal commits then stall flushes). The bytes written are meaningless: use it only on
/// a range the experiment is about to overwrite or own.
pub fn precondition(dev: &Device, offset: u64, len: u64) -> anyhow::Result<()> {
    const MIB: u64 = 1 << 20;
    if len < MIB {
        return Ok(());
    }
    let mut eng = UringEngine::with_queue_depth(8)?;
    let spec = StreamSpec {
        op: StreamOp::Write,
        pattern: Pattern::Sequential,
        block_size: MIB as usize,
        queue_depth: 8,
        region_offset: offset,
        region_len: len / MIB * MIB,
        limit: StreamLimit::Ops(len / MIB),
        fixed_buffers: false,
        fixed_file: false,
    };
    eng.stream(dev, &spec, &mut |_| {})
        .with_context(|| format!("preconditioning {} bytes at {offset}", len / MIB * MIB))?;
    eng.fsync(dev).context("flushing after preconditioning")?;
    Ok(())
}
