//! Support shared by the integration tests, benches, experiment tests and unit tests
//! (feature `testing`), so each piece exists once:
//!
//! - scratch directories ([`scratch`], [`scratch_dir`], [`shm_dir`]) and [`free_port`];
//! - the root check ([`require_root`]) and the installed-program check
//!   ([`require_program`], [`require_zookeeper`]): a test that lacks either skips, saying
//!   so — unless `BLOCKLAB_REQUIRE_ROOT=1` ("require everything"), when it fails — see
//!   [`root`] and [`program`];
//! - devices: loop devices ([`LoopDevices`]), loop devices or sparse files
//!   ([`TestDevices`]), sparse files, [`file_device`], read-only switching, and
//!   [`DeviceRegion`](crate::alloc::DeviceRegion) builders ([`region`], [`regions_of`]);
//! - deterministic byte patterns ([`pattern`], [`pattern_buf`], [`fill_pattern`]);
//! - child processes killed on drop ([`KillOnDrop`]) and reading what they print;
//! - waiting for an observable condition ([`wait_for`], [`wait_for_some`], [`retry`],
//!   [`next_event`]) instead of sleeping.

pub mod devices;
pub mod fill;
pub mod process;
pub mod program;
pub mod root;
pub mod wait;

pub use devices::{
    ext4_intact, file_device, make_ext4, region, region_file, regions_of, set_read_only,
    sparse_file, sparse_files, LoopDevices, TestDevices, REGION_OFFSET,
};
pub use fill::{fill_pattern, pattern, pattern_buf};
pub use process::{
    assert_success, next_line_where, output_text, spawn_announcing, spawn_lines, KillOnDrop,
};
pub use program::{find_program, program_path, require_ceph, require_program, require_zookeeper};
pub use root::{is_root, require_root, REQUIRE_ROOT_VAR, SKIP_LOG_VAR};
pub use wait::{next_event, retry, wait_for, wait_for_some};

/// A fresh directory under `/var/tmp` whose name starts with `prefix`, removed on drop.
/// `/var/tmp` rather than the default temporary directory because backing files and
/// O_DIRECT files need a file system that supports O_DIRECT, which tmpfs does not on every
/// kernel.
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .expect("creating a scratch directory in /var/tmp")
}

/// [`scratch_dir`] with the usual prefix `blocklab-test-`.
pub fn scratch() -> tempfile::TempDir {
    scratch_dir("blocklab-test-")
}

/// A fresh directory under `/dev/shm` (shared-memory segments of the allocator live
/// there), removed on drop.
pub fn shm_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/dev/shm")
        .expect("creating a scratch directory in /dev/shm")
}

/// A TCP port on 127.0.0.1 that was free a moment ago (also: a port nobody listens on).
pub fn free_port() -> u16 {
    crate::netutil::free_port().expect("binding 127.0.0.1:0")
}
