//! Loop devices provisioned from sparse files, with direct I/O on, and torn down again.
//!
//! A *set* of devices lives in `<state_dir>/<set>/`: the sparse backing files
//! (`disk-<i>.img`) and `state.json`, which records each backing file with its device and
//! inode numbers, and the loop device it is attached to. The state is written
//! (atomically) before every attach, with no loop device yet, and again after it, so a
//! crash (or Ctrl-C) at any point leaves a record: teardown finds the attachments of a
//! backing file recorded without a loop device by its inode, among the attached loop
//! devices. Teardown detaches a loop device only when the kernel says it is backed by the
//! recorded file: a loop device this tool did not attach is never touched.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{DevError, Result};
use super::ioctl::{self, LoopConfig, LoopInfo64, LO_FLAGS_DIRECT_IO};

/// Where sets live unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/tmp/blocklab";
const STATE_FILE: &str = "state.json";

/// One provisioned loop device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopDevice {
    /// `/dev/loopN`; `None` while the backing file is recorded but its attach has not
    /// finished (teardown then looks the attachment up by inode).
    pub device: Option<PathBuf>,
    pub backing_file: PathBuf,
    /// `st_dev` and `st_ino` of the backing file, to recognise our attachment.
    pub backing_dev: u64,
    pub backing_ino: u64,
    pub size_bytes: u64,
    /// Whether the kernel accepted direct I/O for this loop device.
    pub direct_io: bool,
}

/// The record of one set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionState {
    pub set: String,
    pub devices: Vec<LoopDevice>,
}

/// What teardown did with one recorded device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TeardownOutcome {
    Detached,
    /// Detach requested, but the loop device is still open elsewhere (a process, a mount):
    /// the kernel detaches it when the last opener closes it.
    DetachPending,
    /// The loop device was no longer attached (e.g. detached by hand, or the host rebooted).
    WasNotAttached,
    /// The loop device is now attached to something else: left alone.
    LeftAlone {
        reason: String,
    },
}

/// Checks the set name: a plain directory name.
fn check_set_name(set: &str) -> Result<()> {
    let ok = !set.is_empty()
        && set.len() <= 64
        && set
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !set.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(DevError::Provision(format!(
            "invalid set name {set:?}: use 1-64 letters, digits, '-', '_' or '.'"
        )))
    }
}

/// Checks a size for provisioning: non-zero and 4 KiB aligned.
pub fn check_size(size: u64) -> Result<()> {
    if size == 0 || size % 4096 != 0 {
        return Err(DevError::Provision(format!(
            "size {size} bytes is not a positive multiple of 4096"
        )));
    }
    Ok(())
}

/// Fails with [`DevError::NotRoot`] unless running as root.
pub fn require_root() -> Result<()> {
    let uid = rustix::process::geteuid().as_raw();
    if uid != 0 {
        return Err(DevError::NotRoot { uid });
    }
    Ok(())
}

fn set_dir(state_dir: &Path, set: &str) -> PathBuf {
    state_dir.join(set)
}

/// Reads the state of `set`, if it was provisioned.
pub fn load_state(state_dir: &Path, set: &str) -> Result<Option<ProvisionState>> {
    check_set_name(set)?;
    let path = set_dir(state_dir, set).join(STATE_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            DevError::Provision(format!("{}: corrupt state file: {e}", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DevError::os(path, "read", e)),
    }
}

/// Every set recorded under `state_dir`.
pub fn list_sets(state_dir: &Path) -> Result<Vec<ProvisionState>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(state_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(DevError::os(state_dir, "read_dir", e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| DevError::os(state_dir, "read_dir", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if check_set_name(&name).is_ok() {
            if let Some(s) = load_state(state_dir, &name)? {
                out.push(s);
            }
        }
    }
    out.sort_by(|a, b| a.set.cmp(&b.set));
    Ok(out)
}

fn save_state(state_dir: &Path, state: &ProvisionState) -> Result<()> {
    let path = set_dir(state_dir, &state.set).join(STATE_FILE);
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| DevError::Provision(e.to_string()))?;
    crate::fsutil::write_atomic(&path, &bytes).map_err(|e| DevError::os(&path, "write", e))
}

fn c_name(path: &Path) -> [u8; 64] {
    let mut name = [0u8; 64];
    let bytes = path.as_os_str().as_encoded_bytes();
    let n = bytes.len().min(63);
    name[..n].copy_from_slice(&bytes[..n]);
    name
}

/// Attaches `backing` to a free loop device with direct I/O; returns the device path and
/// whether direct I/O was accepted.
fn attach(backing: &Path) -> Result<(PathBuf, bool)> {
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(|e| DevError::os("/dev/loop-control", "open", e))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(backing)
        .map_err(|e| DevError::os(backing, "open", e))?;
    for _attempt in 0..32 {
        let n = ioctl::loop_get_free(ctl.as_raw_fd())
            .map_err(|e| DevError::os("/dev/loop-control", "ioctl(LOOP_CTL_GET_FREE)", e))?;
        let dev_path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = match open_loop(&dev_path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // udev may not have made the node yet; try again shortly.
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(DevError::os(&dev_path, "open", e)),
        };
        let mut info = LoopInfo64::zeroed();
        info.lo_flags = LO_FLAGS_DIRECT_IO;
        info.lo_file_name = c_name(backing);
        let config = LoopConfig {
            fd: file.as_raw_fd() as u32,
            block_size: 0,
            info,
            reserved: [0; 8],
        };
        // No LO_FLAGS_AUTOCLEAR: that would detach the device as soon as we close it.
        match ioctl::loop_configure(dev.as_raw_fd(), &config) {
            Ok(()) => {
                let status = ioctl::loop_status(dev.as_raw_fd())
                    .map_err(|e| DevError::os(&dev_path, "ioctl(LOOP_GET_STATUS64)", e))?;
                let direct = status.lo_flags & LO_FLAGS_DIRECT_IO != 0;
                return Ok((dev_path, direct));
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue, // raced with another attach
            Err(e) => return Err(DevError::os(&dev_path, "ioctl(LOOP_CONFIGURE)", e)),
        }
    }
    Err(DevError::Provision(
        "no free loop device after 32 attempts".into(),
    ))
}

fn open_loop(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// Provisions `count` loop devices of `size` bytes each as set `set` under `state_dir`.
/// Needs root. Refuses when the set already exists.
pub fn provision(state_dir: &Path, set: &str, count: usize, size: u64) -> Result<ProvisionState> {
    check_set_name(set)?;
    check_size(size)?;
    if count == 0 {
        return Err(DevError::Provision("count must be at least 1".into()));
    }
    require_root()?;
    if load_state(state_dir, set)?.is_some() {
        return Err(DevError::Provision(format!(
            "set {set:?} is already provisioned under {}; tear it down first",
            state_dir.display()
        )));
    }
    let dir = set_dir(state_dir, set);
    fs::create_dir_all(&dir).map_err(|e| DevError::os(&dir, "mkdir", e))?;
    let mut state = ProvisionState {
        set: set.to_string(),
        devices: Vec::new(),
    };
    save_state(state_dir, &state)?;
    let result = (|| {
        for i in 0..count {
            let backing = dir.join(format!("disk-{i}.img"));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&backing)
                .map_err(|e| DevError::os(&backing, "create", e))?;
            f.set_len(size)
                .map_err(|e| DevError::os(&backing, "truncate", e))?;
            let meta = f
                .metadata()
                .map_err(|e| DevError::os(&backing, "stat", e))?;
            drop(f);
            // Recorded before the attach: from here on a crash leaves a record teardown
            // can act on (it finds the attachment by inode).
            state.devices.push(LoopDevice {
                device: None,
                backing_file: backing.clone(),
                backing_dev: meta.dev(),
                backing_ino: meta.ino(),
                size_bytes: size,
                direct_io: false,
            });
            save_state(state_dir, &state)?;
            let (device, direct_io) = attach(&backing)?;
            let d = state.devices.last_mut().expect("pushed above");
            d.device = Some(device);
            d.direct_io = direct_io;
            save_state(state_dir, &state)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(state),
        Err(e) => {
            let _ = teardown(state_dir, set);
            Err(e)
        }
    }
}

/// Detaches and deletes everything recorded for `set`. Returns what happened to each
/// device (for one recorded without a loop device, the record names the loop device found
/// attached to its file, if any); a set that does not exist is an error.
pub fn teardown(state_dir: &Path, set: &str) -> Result<Vec<(LoopDevice, TeardownOutcome)>> {
    let state = load_state(state_dir, set)?.ok_or_else(|| {
        DevError::Provision(format!("no set {set:?} under {}", state_dir.display()))
    })?;
    let mut out = Vec::new();
    for d in &state.devices {
        let (found, outcome) = detach_if_ours(d)?;
        match fs::remove_file(&d.backing_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DevError::os(&d.backing_file, "unlink", e)),
        }
        let mut d = d.clone();
        if d.device.is_none() {
            d.device = found;
        }
        out.push((d, outcome));
    }
    let dir = set_dir(state_dir, set);
    // A backing file created but not yet recorded (a crash in between) was never attached; a
    // state-file temporary is what a crash during a state write leaves.
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stale_state =
                name.starts_with(STATE_FILE) && name.contains(crate::fsutil::TEMP_MARKER);
            if (name.starts_with("disk-") && name.ends_with(".img")) || stale_state {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let _ = fs::remove_file(dir.join(STATE_FILE));
    fs::remove_dir(&dir).map_err(|e| DevError::os(&dir, "rmdir", e))?;
    Ok(out)
}

/// Whether a loop device is currently backed by the file recorded in `d`. Needs root (to
/// ask the loop device); without it, a permission error.
pub fn is_attached(d: &LoopDevice) -> Result<bool> {
    Ok(match &d.device {
        Some(p) => attachment(p, d)? == Attachment::Ours,
        None => !find_attachments(d)?.is_empty(),
    })
}

/// What a loop device is attached to, as far as `d` is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attachment {
    Ours,
    Other,
    Nothing,
}

fn attachment(dev_path: &Path, d: &LoopDevice) -> Result<Attachment> {
    let dev = match open_loop(dev_path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Attachment::Nothing),
        Err(e) => return Err(DevError::os(dev_path, "open", e)),
    };
    match ioctl::loop_status(dev.as_raw_fd()) {
        Ok(info) if info.lo_inode == d.backing_ino && info.lo_device == d.backing_dev => {
            Ok(Attachment::Ours)
        }
        Ok(_) => Ok(Attachment::Other),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(Attachment::Nothing),
        Err(e) => Err(DevError::os(dev_path, "ioctl(LOOP_GET_STATUS64)", e)),
    }
}

/// Every loop device attached to `d`'s backing file: the attached ones are those with a
/// `/sys/block/loopN/loop` directory; each is asked for its backing device and inode.
fn find_attachments(d: &LoopDevice) -> Result<Vec<PathBuf>> {
    let sys = Path::new("/sys/block");
    let entries = fs::read_dir(sys).map_err(|e| DevError::os(sys, "read_dir", e))?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") || !entry.path().join("loop").exists() {
            continue;
        }
        let dev = PathBuf::from("/dev").join(&name);
        if attachment(&dev, d)? == Attachment::Ours {
            out.push(dev);
        }
    }
    out.sort();
    Ok(out)
}

/// Detaches the loop devices backed by `d`'s file; returns the (first) one found.
fn detach_if_ours(d: &LoopDevice) -> Result<(Option<PathBuf>, TeardownOutcome)> {
    let devices = match &d.device {
        Some(p) => match attachment(p, d)? {
            Attachment::Nothing => return Ok((None, TeardownOutcome::WasNotAttached)),
            Attachment::Other => {
                return Ok((
                    None,
                    TeardownOutcome::LeftAlone {
                        reason: format!("{} is attached to another file now", p.display()),
                    },
                ))
            }
            Attachment::Ours => vec![p.clone()],
        },
        None => find_attachments(d)?,
    };
    let mut outcome = TeardownOutcome::WasNotAttached;
    for p in &devices {
        match detach(p, d)? {
            TeardownOutcome::WasNotAttached => {}
            TeardownOutcome::Detached if outcome != TeardownOutcome::DetachPending => {
                outcome = TeardownOutcome::Detached
            }
            o => outcome = o,
        }
    }
    Ok((devices.into_iter().next(), outcome))
}

/// `LOOP_CLR_FD` on `p` (backed by `d`'s file), then waits up to a second for the kernel
/// to detach it (it does when the last opener closes it).
fn detach(p: &Path, d: &LoopDevice) -> Result<TeardownOutcome> {
    let dev = open_loop(p).map_err(|e| DevError::os(p, "open", e))?;
    match ioctl::loop_clear(dev.as_raw_fd()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            return Ok(TeardownOutcome::WasNotAttached)
        }
        Err(e) => return Err(DevError::os(p, "ioctl(LOOP_CLR_FD)", e)),
    }
    drop(dev);
    for _ in 0..100 {
        if attachment(p, d)? != Attachment::Ours {
            return Ok(TeardownOutcome::Detached);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(TeardownOutcome::DetachPending)
}

/// A set name made from `prefix`, the process id and a counter: unique on this host among
/// live processes.
pub fn unique_set_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A provisioned set that is torn down when dropped (tests, experiments).
#[derive(Debug)]
pub struct ProvisionGuard {
    state_dir: PathBuf,
    state: ProvisionState,
    armed: bool,
}

impl ProvisionGuard {
    /// Provisions `count` devices of `size` bytes as a fresh set named after `prefix`, the
    /// process id and a counter.
    pub fn new(state_dir: &Path, prefix: &str, count: usize, size: u64) -> Result<ProvisionGuard> {
        Self::named(state_dir, &unique_set_name(prefix), count, size)
    }

    /// Provisions `count` devices of `size` bytes as set `set` (see [`unique_set_name`]),
    /// for a caller that must know the name before provisioning starts (to tear it down
    /// from a signal handler).
    pub fn named(state_dir: &Path, set: &str, count: usize, size: u64) -> Result<ProvisionGuard> {
        let state = provision(state_dir, set, count, size)?;
        Ok(ProvisionGuard {
            state_dir: state_dir.to_path_buf(),
            state,
            armed: true,
        })
    }
    pub fn state(&self) -> &ProvisionState {
        &self.state
    }
    pub fn set(&self) -> &str {
        &self.state.set
    }
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
    /// Paths of the loop devices, in order.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.state
            .devices
            .iter()
            .filter_map(|d| d.device.clone())
            .collect()
    }
    /// Tears down now, reporting errors (drop does it silently otherwise).
    pub fn teardown(mut self) -> Result<Vec<(LoopDevice, TeardownOutcome)>> {
        self.armed = false;
        teardown(&self.state_dir, &self.state.set)
    }
    /// Leaves the devices attached and the state recorded (simulates a crash).
    pub fn forget(mut self) -> ProvisionState {
        self.armed = false;
        self.state.clone()
    }
}

impl Drop for ProvisionGuard {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = teardown(&self.state_dir, &self.state.set) {
                eprintln!("blocklab: teardown of {} failed: {e}", self.state.set);
            }
        }
    }
}
