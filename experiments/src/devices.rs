//! Device set-up and teardown for experiments.
//!
//! An experiment asks for `count` devices of at least `min_size` bytes and gets them from
//! exactly one source: `--devices` (given block devices, which must look unused unless
//! `--force`, and must not be mounted or held by another driver whatever `--force` says),
//! `--provision N --size S` (loop devices from sparse files, torn down at exit, also on
//! error and on Ctrl-C), `--files DIR` (regular files in a fresh directory under DIR,
//! deleted at exit, also on Ctrl-C), or by default loop devices when root and regular files
//! in a temporary directory otherwise (with a warning).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, Once};

use anyhow::{bail, Context};
use blocklab::dev::provision::{self, ProvisionGuard};
use blocklab::dev::{
    self, DevError, Device, DeviceKind, Found, IoEngine, Pattern, StreamLimit, StreamOp,
    StreamSpec, UringEngine,
};

use crate::args::CommonArgs;

/// What the Ctrl-C handler cleans up before exiting.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cleanup {
    /// A set of loop devices: torn down.
    Set { state_dir: PathBuf, set: String },
    /// A directory of `--files` devices: removed.
    Dir(PathBuf),
}

static ACTIVE: Mutex<Vec<Cleanup>> = Mutex::new(Vec::new());
/// Held while loop devices are being provisioned. The Ctrl-C handler takes it first, so it
/// tears a set down only once its provisioning has finished (or failed and cleaned up
/// after itself), never in the middle of an attach.
static PROVISIONING: Mutex<()> = Mutex::new(());
static HANDLER: Once = Once::new();
/// Held by the Ctrl-C handler from its start until it exits the process, so the main thread
/// can wait for it (see [`await_interrupt`]).
static HANDLING: Mutex<()> = Mutex::new(());
/// Set by the Ctrl-C handler, under [`HANDLING`], before it touches any device.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn install_interrupt_handler() {
    HANDLER.call_once(|| {
        let r = ctrlc::set_handler(|| {
            let _handling = lock(&HANDLING);
            INTERRUPTED.store(true, Ordering::SeqCst);
            let _provisioning = lock(&PROVISIONING);
            let items = lock(&ACTIVE).clone();
            for item in items {
                match item {
                    Cleanup::Set { state_dir, set } => {
                        if !matches!(provision::load_state(&state_dir, &set), Ok(Some(_))) {
                            continue; // its provisioning failed and cleaned up already
                        }
                        eprintln!("interrupted: tearing down loop devices of set {set}");
                        if let Err(e) = provision::teardown(&state_dir, &set) {
                            eprintln!("teardown of {set} failed: {e}; run `blocklab devices teardown --set {set} --state-dir {}`", state_dir.display());
                        }
                    }
                    Cleanup::Dir(dir) => {
                        eprintln!("interrupted: removing {}", dir.display());
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                }
            }
            std::process::exit(130);
        });
        if let Err(e) = r {
            eprintln!("warning: cannot install the Ctrl-C handler ({e}); an interrupted run may leave loop devices or files behind");
        }
    });
}

/// If Ctrl-C was pressed, waits for its handler to finish cleaning up; the handler then
/// exits the process with status 130, so this does not return. Returns at once otherwise.
///
/// The handler tears devices down while the main thread may still be using them, so the
/// main thread's next step can be an I/O error or its own teardown. Both must wait here:
/// exiting with the error's status 1 would cut the handler's cleanup short, and a second
/// teardown would race the handler's.
pub fn await_interrupt() {
    if INTERRUPTED.load(Ordering::SeqCst) {
        drop(lock(&HANDLING));
        std::process::exit(130); // only if the handler returned without exiting
    }
}

/// An entry of [`ACTIVE`], removed again on drop.
#[derive(Debug)]
struct Registration(Cleanup);

impl Registration {
    fn new(c: Cleanup) -> Registration {
        install_interrupt_handler();
        lock(&ACTIVE).push(c.clone());
        Registration(c)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&ACTIVE).retain(|c| *c != self.0);
    }
}

/// Where the devices of a run came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Given,
    Provisioned,
    Files,
}

/// The devices of one experiment run. Dropping it tears provisioned devices down and
/// removes `--files` devices (the fields drop in this order).
#[derive(Debug)]
pub struct DeviceSet {
    paths: Vec<PathBuf>,
    source: Source,
    kind: DeviceKind,
    size: u64,
    guard: Option<ProvisionGuard>,
    _files_dir: Option<tempfile::TempDir>,
    _registration: Option<Registration>,
}

/// Checks a `--files` directory.
fn check_files_dir(dir: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("--files {}: no such directory", dir.display()))?;
    if !meta.is_dir() {
        bail!("--files {}: not a directory", dir.display());
    }
    Ok(())
}

impl Drop for DeviceSet {
    fn drop(&mut self) {
        // The fields' drops tear down and remove; after Ctrl-C that is the handler's job.
        await_interrupt();
    }
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
            if args.size.is_some() {
                // clap refuses the combination too; this guards library callers.
                bail!("--size applies to --provision and --files, not to --devices");
            }
            return Self::given(args, count, min_size);
        }
        if let Some(dir) = &args.files {
            check_files_dir(dir)?;
        }
        let size = args.size.unwrap_or(default_size.max(min_size));
        if size < min_size {
            bail!("--size {size} is smaller than this run needs ({min_size} bytes per device)");
        }
        if let Some(n) = args.provision {
            if n < count {
                bail!("--provision {n}: this run needs {count} devices");
            }
            if n > count {
                eprintln!("note: --provision {n}: this run uses {count} devices, so it provisions {count}");
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
        if args.devices.len() > count {
            eprintln!(
                "note: this run uses {count} devices: {} of --devices are not touched",
                args.devices[count..]
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let paths: Vec<PathBuf> = args.devices[..count].to_vec();
        let mut eng = UringEngine::with_queue_depth(1)?;
        let mut kinds = Vec::new();
        let mut size = u64::MAX;
        for p in &paths {
            // Exclusive for the check: a mounted device, or one held by device-mapper, md
            // or LVM, is refused even with --force.
            let d =
                Device::open_exclusive(p).with_context(|| format!("opening {}", p.display()))?;
            let found = dev::probe(&mut eng, &d)?;
            if found != Found::Empty && !args.force {
                bail!(
                    "{}: refusing to overwrite it: it holds {found}; pass --force to overwrite",
                    p.display()
                );
            }
            d.require_size(min_size)?;
            kinds.push((d.kind(), p));
            size = size.min(d.size());
        }
        let kind = kinds[0].0;
        if let Some((k, p)) = kinds.iter().find(|(k, _)| *k != kind) {
            bail!(
                "--devices mixes block devices and regular files ({} is a {k}, {} a {kind}); the figures would mix both",
                p.display(),
                kinds[0].1.display()
            );
        }
        Ok(DeviceSet {
            paths,
            source: Source::Given,
            kind,
            size,
            guard: None,
            _files_dir: None,
            _registration: None,
        })
    }

    fn provisioned(args: &CommonArgs, count: usize, size: u64) -> anyhow::Result<DeviceSet> {
        std::fs::create_dir_all(&args.state_dir)
            .with_context(|| format!("creating {}", args.state_dir.display()))?;
        // Registered before provisioning starts, so that Ctrl-C during it tears down what
        // was attached (the handler waits for PROVISIONING).
        let set = provision::unique_set_name("exp");
        let registration = Registration::new(Cleanup::Set {
            state_dir: args.state_dir.clone(),
            set: set.clone(),
        });
        let guard = {
            let _provisioning = lock(&PROVISIONING);
            ProvisionGuard::named(&args.state_dir, &set, count, size)
        }
        .map_err(|e| match e {
            DevError::NotRoot { .. } => {
                anyhow::anyhow!("{e}; use --files DIR to run on regular files instead")
            }
            e => e.into(),
        })?;
        if let Some(d) = guard.state().devices.iter().find(|d| !d.direct_io) {
            eprintln!(
                "warning: the kernel refused direct I/O on {}; figures include the page cache",
                d.device.as_deref().unwrap_or(&d.backing_file).display()
            );
        }
        Ok(DeviceSet {
            paths: guard.paths(),
            source: Source::Provisioned,
            kind: DeviceKind::Block,
            size,
            guard: Some(guard),
            _files_dir: None,
            _registration: Some(registration),
        })
    }

    fn files(dir: &Path, count: usize, size: u64) -> anyhow::Result<DeviceSet> {
        // Ctrl-C exits the process without running TempDir's drop: the handler removes the
        // directory. It is created under the registry's lock, so a Ctrl-C right after its
        // creation waits for its registration.
        install_interrupt_handler();
        let (tmp, registration) = {
            let mut active = lock(&ACTIVE);
            let tmp = tempfile::Builder::new()
                .prefix("blocklab-files-")
                .tempdir_in(dir)
                .with_context(|| format!("creating a directory under {}", dir.display()))?;
            let c = Cleanup::Dir(tmp.path().to_path_buf());
            active.push(c.clone());
            (tmp, Registration(c))
        };
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
            _registration: Some(registration),
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
    /// Tears down now (drop does it too), reporting errors. Close the set's devices
    /// first: a loop device still open is only detached when its last user closes it.
    pub fn teardown(mut self) -> anyhow::Result<()> {
        if let Some(g) = self.guard.take() {
            let set = g.set().to_string();
            for (d, outcome) in g
                .teardown()
                .with_context(|| format!("tearing down set {set}"))?
            {
                if outcome == provision::TeardownOutcome::DetachPending {
                    eprintln!(
                        "warning: {} is still open elsewhere; the kernel detaches it when it is closed",
                        d.device.as_deref().unwrap_or(&d.backing_file).display()
                    );
                }
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Profile;
    use blocklab::testing::{scratch_dir, sparse_file, LoopDevices};

    fn args(devices: Vec<PathBuf>) -> CommonArgs {
        CommonArgs {
            profile: Profile::Quick,
            out: PathBuf::from("unused"),
            devices,
            provision: None,
            size: None,
            files: None,
            repetitions: None,
            overwrite: false,
            force: false,
            state_dir: PathBuf::from("unused"),
        }
    }

    #[test]
    fn given_devices_of_mixed_kinds_are_refused() {
        let Some(g) = LoopDevices::provision("t-mixed", 1, 16 << 20) else {
            return;
        };
        let dir = scratch_dir("blocklab-test-");
        let file = sparse_file(&dir.path().join("f.img"), 16 << 20);
        let err = DeviceSet::setup(&args(vec![g.paths()[0].clone(), file]), 2, 1 << 20, 1 << 20)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("mixes block devices and regular files"),
            "{err}"
        );
        // One kind: fine, and the set says which.
        let set = DeviceSet::setup(&args(g.paths()), 1, 1 << 20, 1 << 20).unwrap();
        assert_eq!(set.kind(), DeviceKind::Block);
    }

    #[test]
    fn size_with_given_devices_is_refused() {
        let mut a = args(vec![PathBuf::from("/dev/null")]);
        a.size = Some(1 << 20);
        let err = DeviceSet::setup(&a, 1, 1 << 20, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("not to --devices"), "{err}");
    }
}
