//! Devices for tests: loop devices (root), loop devices or sparse files, sparse files,
//! read-only switching, and allocator regions on them.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::alloc::DeviceRegion;
use crate::dev::provision::{LoopDevice, ProvisionGuard, TeardownOutcome};
use crate::dev::Device;

use super::root::{require_root, root_available};
use super::scratch;

/// Loop devices over sparse files in their own scratch state directory, detached and
/// deleted on drop (the devices first, then the directory).
pub struct LoopDevices {
    guard: ProvisionGuard,
    _state: tempfile::TempDir,
}

impl LoopDevices {
    /// `n` loop devices of `size` bytes named after `set`, or `None` when not root (after
    /// printing that the test skips; a failure instead with `BLOCKLAB_REQUIRE_ROOT=1`, see
    /// [`super::require_root`]).
    pub fn provision(set: &str, n: usize, size: u64) -> Option<LoopDevices> {
        if !require_root("loop devices need root") {
            return None;
        }
        Some(Self::provision_as_root(set, n, size))
    }

    fn provision_as_root(set: &str, n: usize, size: u64) -> LoopDevices {
        let state = scratch();
        let guard = ProvisionGuard::new(state.path(), set, n, size)
            .unwrap_or_else(|e| panic!("provisioning {n} loop devices: {e}"));
        LoopDevices {
            guard,
            _state: state,
        }
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

/// `n` devices of `size` bytes for a test that runs either way: loop devices when root,
/// sparse files in a scratch directory otherwise (a failure instead with
/// `BLOCKLAB_REQUIRE_ROOT=1`: the loop-device half of the test must not be skipped).
/// Declare it before anything that uses the devices, so that goes first on drop.
pub struct TestDevices {
    paths: Vec<PathBuf>,
    _loops: Option<LoopDevices>,
    _files: Option<tempfile::TempDir>,
}

impl TestDevices {
    pub fn loop_or_files(set: &str, n: usize, size: u64) -> TestDevices {
        if root_available("loop devices need root") {
            let g = LoopDevices::provision_as_root(set, n, size);
            return TestDevices {
                paths: g.paths(),
                _loops: Some(g),
                _files: None,
            };
        }
        eprintln!("not root: sparse files instead of loop devices");
        let dir = scratch();
        TestDevices {
            paths: sparse_files(dir.path(), n, size),
            _loops: None,
            _files: Some(dir),
        }
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Whether these are loop devices (else regular files).
    pub fn is_loop(&self) -> bool {
        self._loops.is_some()
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

/// A sparse file `dir/dev.img` of `size` bytes, opened as a [`Device`].
pub fn file_device(dir: &Path, size: u64) -> Device {
    let p = sparse_file(&dir.join("dev.img"), size);
    Device::open(&p).unwrap_or_else(|e| panic!("opening {}: {e}", p.display()))
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

/// Where the regions of tests start on a device: after its first MiB.
pub const REGION_OFFSET: u64 = 1 << 20;

/// A region of `blocks` blocks of `block` bytes after the first MiB of `path` (which need
/// not exist for tests that never open it).
pub fn region(path: impl Into<PathBuf>, blocks: u64, block: u64) -> DeviceRegion {
    DeviceRegion {
        path: path.into(),
        offset: REGION_OFFSET,
        len: blocks * block,
    }
}

/// For devices of `size` bytes: the region of the whole blocks after the first MiB.
pub fn regions_of(paths: &[PathBuf], size: u64, block: u64) -> Vec<DeviceRegion> {
    paths
        .iter()
        .map(|p| region(p.clone(), (size - REGION_OFFSET) / block, block))
        .collect()
}

/// A sparse file at `path` with room for `blocks` blocks of `block` bytes after its first
/// MiB (what [`region`] describes).
pub fn region_file(path: &Path, blocks: u64, block: u64) -> PathBuf {
    sparse_file(path, REGION_OFFSET + blocks * block)
}

/// Puts an ext4 file system on `dev` (`mkfs.ext4 -q -F`): data a tool must refuse to
/// overwrite.
pub fn make_ext4(dev: &Path) {
    let out = Command::new(super::program_path("mkfs.ext4"))
        .args(["-q", "-F"])
        .arg(dev)
        .output()
        .expect("running mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4 {}: {}",
        dev.display(),
        super::output_text(&out)
    );
}

/// Whether the ext4 file system on `dev` is intact (`e2fsck -n -f` finds nothing), with
/// e2fsck's output for the assertion message.
pub fn ext4_intact(dev: &Path) -> (bool, String) {
    let out = Command::new(super::program_path("e2fsck"))
        .args(["-n", "-f"])
        .arg(dev)
        .output()
        .expect("running e2fsck");
    (out.status.success(), super::output_text(&out))
}
