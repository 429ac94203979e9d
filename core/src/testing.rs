//! Support shared by the integration tests, benches and experiment tests (feature
//! `testing`): the root check, loop devices in a scratch state directory, child processes
//! killed on drop, and polling until a condition holds.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::dev::provision::{LoopDevice, ProvisionGuard, TeardownOutcome};

/// Loop devices (and so most end-to-end tests) need root; CI runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A fresh directory under `/var/tmp`, removed on drop. `/var/tmp` rather than the
/// default temporary directory because backing files and O_DIRECT files need a file system
/// that supports O_DIRECT, which tmpfs does not on every kernel.
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .expect("creating a scratch directory in /var/tmp")
}

/// Loop devices over sparse files in their own scratch state directory, detached and
/// deleted on drop (the devices first, then the directory).
pub struct LoopDevices {
    guard: ProvisionGuard,
    _state: tempfile::TempDir,
}

impl LoopDevices {
    /// `n` loop devices of `size` bytes named after `set`, or `None` when not root (after
    /// printing that the test skips).
    pub fn provision(set: &str, n: usize, size: u64) -> Option<LoopDevices> {
        if !is_root() {
            eprintln!("skipping: loop devices need root");
            return None;
        }
        let state = scratch_dir("blocklab-test-");
        let guard = ProvisionGuard::new(state.path(), set, n, size)
            .unwrap_or_else(|e| panic!("provisioning {n} loop devices: {e}"));
        Some(LoopDevices {
            guard,
            _state: state,
        })
    }
    pub fn paths(&self) -> Vec<PathBuf> {
        self.guard.paths()
    }
    pub fn guard(&self) -> &ProvisionGuard {
        &self.guard
    }
    /// Tears the devices down now (for tests that check what remains afterwards).
    pub fn teardown(self) -> crate::dev::Result<Vec<(LoopDevice, TeardownOutcome)>> {
        self.guard.teardown()
    }
}

/// Creates (or truncates) a sparse regular file of `size` bytes at `path`: a device for
/// tests that do not need a block device, opened with O_DIRECT like one.
pub fn sparse_file(path: &Path, size: u64) -> PathBuf {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    path.to_path_buf()
}

/// `n` sparse files `dev0.img`, `dev1.img`, … of `size` bytes in `dir`.
pub fn sparse_files(dir: &Path, n: usize, size: u64) -> Vec<PathBuf> {
    (0..n)
        .map(|i| sparse_file(&dir.join(format!("dev{i}.img")), size))
        .collect()
}

/// A child process, killed and reaped on drop (every exit path of a test).
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` with stdout piped and returns it with the first line it prints (servers
/// announce their address that way). Panics if it exits before printing one.
pub fn spawn_announcing(cmd: &mut Command) -> (KillOnDrop, String) {
    let mut c = cmd.stdout(Stdio::piped()).spawn().expect("spawning");
    let out = c.stdout.take().expect("piped stdout");
    let child = KillOnDrop(c);
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .expect("reading the first line");
    assert!(!line.is_empty(), "{cmd:?} exited before printing a line");
    (child, line.trim_end().to_string())
}

/// Polls `f` every 10 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sets a block device read-only or back to read-write (`blockdev --setro` / `--setrw`, the
/// BLKROSET ioctl). A read-only device refuses writes, also through descriptors opened
/// before: a real device error for tests to inject under a running component.
pub fn set_read_only(dev: &Path, read_only: bool) {
    let flag = if read_only { "--setro" } else { "--setrw" };
    let status = Command::new("blockdev")
        .arg(flag)
        .arg(dev)
        .status()
        .expect("running blockdev");
    assert!(
        status.success(),
        "blockdev {flag} {}: {status}",
        dev.display()
    );
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}
