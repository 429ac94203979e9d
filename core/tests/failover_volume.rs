//! Volumes end to end: on regular files always, and on loop devices (direct I/O through
//! io_uring) as root: byte-for-byte copies across fragmented extents on several devices,
//! the catalog surviving a restart, bad input refused with the store unchanged, foreign data
//! refused without force, formatted daemon devices (formatted with `daemon::mkfs`) that
//! `daemon::mount` still accepts after volume operations and after a crash between the
//! bitmap and superblock writes, one store per directory.

use std::path::{Path, PathBuf};

use blocklab::daemon::{mkfs, mount, MkfsRequest, Mounted};
use blocklab::dev::{AlignedBuf, Device, IoEngine, UringEngine};
use blocklab::format::Layout;
use blocklab::testing::{pattern, scratch_dir, sparse_files, LoopDevices};
use blocklab::volume::{Applied, StoreConfig, VolumeError, VolumeStore, APPLIED_KEEP};

const MIB: u64 = 1 << 20;

/// `n` sparse files of `size` bytes as devices, in a scratch directory (which also holds
/// the store's metadata).
fn files(n: usize, size: u64) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = scratch_dir("blocklab-vol-");
    let devs = sparse_files(dir.path(), n, size);
    (dir, devs)
}

/// Runs `check(devices, metadata directory)` on `n` sparse files of `size` bytes.
fn on_files(n: usize, size: u64, check: impl FnOnce(&[PathBuf], &Path)) {
    let (dir, devs) = files(n, size);
    check(&devs, &dir.path().join("meta"));
}

/// Runs `check(devices, metadata directory)` on `n` loop devices of `size` bytes (root).
fn on_loop_devices(set: &str, n: usize, size: u64, check: impl FnOnce(&[PathBuf], &Path)) {
    let Some(g) = LoopDevices::provision(set, n, size) else {
        return;
    };
    let dir = scratch_dir("blocklab-vol-");
    check(&g.paths(), &dir.path().join("meta"));
}

fn small_cfg() -> StoreConfig {
    StoreConfig {
        unit: MIB,
        copy_chunk: 256 * 1024,
        copy_depth: 4,
    }
}

/// Creates fragmented volumes over several devices, copies, checks every byte; reopens and
/// checks the catalog and data again.
fn copy_and_restart(devs: &[PathBuf], meta: &std::path::Path) {
    let (src_data, names_before);
    {
        let mut st = VolumeStore::open(meta, devs, small_cfg(), false).unwrap();
        // Fragment the free space: a, b, c, then free b.
        st.create("a", 3 * MIB, None).unwrap();
        st.create("b", 2 * MIB, None).unwrap();
        st.create("c", 3 * MIB, None).unwrap();
        st.delete("b", None).unwrap();
        // `src` spans the hole left by b, then the rest of device 0, then device 1.
        let size = 15 * MIB;
        let v = st.create("src", size, Some("op-1")).unwrap();
        assert_eq!(
            st.applied("op-1"),
            Some(&Applied::Created {
                name: "src".into(),
                size
            })
        );
        assert!(v.extents.len() >= 2, "fragmented: {:?}", v.extents);
        src_data = pattern(size as usize, 7);
        st.write("src", 0, &src_data).unwrap();
        let free_before = st.free_bytes();
        let mut seen = 0;
        let (dst, stats) = st
            .copy("src", "dst", Some("op-2"), &mut |b| {
                assert!(b >= seen);
                seen = b;
                true
            })
            .unwrap();
        assert_eq!(stats.bytes, size);
        assert_eq!(dst.size, size);
        assert_eq!(st.free_bytes(), free_before - size);
        assert_eq!(st.read("dst", 0, size as usize).unwrap(), src_data);
        names_before = st
            .list()
            .iter()
            .map(|v| (v.name.clone(), v.extents.clone()))
            .collect::<Vec<_>>();
    }
    // "Restart": a fresh store from the same directory and devices.
    let mut st = VolumeStore::open(meta, devs, small_cfg(), false).unwrap();
    let names_after = st
        .list()
        .iter()
        .map(|v| (v.name.clone(), v.extents.clone()))
        .collect::<Vec<_>>();
    assert_eq!(names_before, names_after);
    assert_eq!(
        st.applied("op-2"),
        Some(&Applied::Copied {
            src: "src".into(),
            dst: "dst".into(),
            bytes: size_of_src(&st)
        }),
        "the catalog remembers what op-2 did"
    );
    let size = src_data.len();
    assert_eq!(st.read("dst", 0, size).unwrap(), src_data);
    assert_eq!(st.read("src", 0, size).unwrap(), src_data);
    // Allocation after restart does not overlap existing volumes.
    st.create("e", 2 * MIB, None).unwrap();
    assert_eq!(st.read("dst", 0, size).unwrap(), src_data);
}

fn size_of_src(st: &VolumeStore) -> u64 {
    st.get("src").unwrap().size
}

#[test]
fn copy_is_byte_exact_and_catalog_survives_restart_on_files() {
    on_files(2, 24 * MIB, copy_and_restart);
}

#[test]
fn copy_is_byte_exact_and_catalog_survives_restart_on_loop_devices() {
    on_loop_devices("fo-vol", 2, 24 * MIB, copy_and_restart);
}

#[test]
fn bad_input_is_refused_and_leaves_the_store_unchanged() {
    let (dir, devs) = files(1, 24 * MIB);
    let meta = dir.path().join("meta");
    let mut st = VolumeStore::open(&meta, &devs, small_cfg(), false).unwrap();
    st.create("v", 2 * MIB, None).unwrap();
    st.create("w", MIB, None).unwrap();
    let before = (st.list(), st.free_bytes());
    let catalog = std::fs::read(meta.join("volumes.json")).unwrap();

    let e = st.copy("v", "w", None, &mut |_| true).unwrap_err().0;
    assert!(matches!(e, VolumeError::Exists(ref n) if n == "w"), "{e}");
    let e = st.create("big", 100 * MIB, None).unwrap_err();
    assert!(matches!(e, VolumeError::NoSpace { .. }), "{e}");
    assert!(e.to_string().contains("exceeds the free space"));
    let e = st.copy("nope", "x", None, &mut |_| true).unwrap_err().0;
    assert!(matches!(e, VolumeError::Unknown(_)), "{e}");
    let e = st.delete("nope", None).unwrap_err();
    assert_eq!(e.to_string(), "no volume named \"nope\"");
    let e = st.create("v", MIB, None).unwrap_err();
    assert!(matches!(e, VolumeError::Exists(_)));
    let e = st.create("bad/name", MIB, None).unwrap_err();
    assert!(matches!(e, VolumeError::BadName(_)));
    let e = st.create("z", 0, None).unwrap_err();
    assert!(matches!(e, VolumeError::BadSize(0)));
    // A copy that needs more than the free space.
    st.create("fill", 9 * MIB, None).unwrap();
    let before2 = (st.list(), st.free_bytes());
    let e = st.copy("fill", "fill2", None, &mut |_| true).unwrap_err().0;
    assert!(matches!(e, VolumeError::NoSpace { .. }), "{e}");
    assert_eq!((st.list(), st.free_bytes()), before2);
    st.delete("fill", None).unwrap();
    assert_eq!((st.list(), st.free_bytes()), before);
    assert_eq!(
        std::fs::read(meta.join("volumes.json")).unwrap(),
        catalog,
        "the catalog on disk is unchanged"
    );
    // A stopped copy frees its destination and records nothing.
    let e = st
        .copy("v", "v2", Some("op-stop"), &mut |_| false)
        .unwrap_err()
        .0;
    assert!(matches!(e, VolumeError::Stopped(_)));
    assert_eq!((st.list(), st.free_bytes()), before);
    assert_eq!(st.applied("op-stop"), None);
    // Reads and writes outside a volume or unaligned are refused, not truncated.
    for (off, len) in [(2 * MIB, 4096), (2 * MIB - 4096, 8192), (1, 4096), (0, 100)] {
        let e = st.read("v", off, len).unwrap_err();
        assert!(matches!(e, VolumeError::BadRange { .. }), "{e}");
        let e = st.write("v", off, &vec![1; len]).unwrap_err();
        assert!(matches!(e, VolumeError::BadRange { .. }), "{e}");
    }
    assert_eq!(
        std::fs::read(meta.join("volumes.json")).unwrap(),
        catalog,
        "the catalog on disk is still unchanged"
    );
}

#[test]
fn bad_settings_are_refused_with_one_line() {
    let (dir, devs) = files(1, 24 * MIB);
    let meta = dir.path().join("meta");
    for (chunk, depth, what) in [
        (0, 8, "copy chunk 0"),
        (1000, 8, "copy chunk 1000"),
        (MIB, 0, "copy depth 0"),
        (MIB, 4096, "copy depth 4096"),
    ] {
        let cfg = StoreConfig {
            copy_chunk: chunk,
            copy_depth: depth,
            ..small_cfg()
        };
        let e = VolumeStore::open(&meta, &devs, cfg, false).unwrap_err();
        assert!(matches!(e, VolumeError::Config(_)), "{e}");
        let m = e.to_string();
        assert!(m.contains(what) && !m.contains('\n'), "{m}");
    }
    assert!(!meta.join("volumes.json").exists(), "nothing was created");
}

#[test]
fn a_second_store_on_the_same_directory_is_refused() {
    let (dir, devs) = files(1, 24 * MIB);
    let meta = dir.path().join("meta");
    let st = VolumeStore::open(&meta, &devs, small_cfg(), false).unwrap();
    let e = VolumeStore::open(&meta, &devs, small_cfg(), false).unwrap_err();
    assert!(matches!(e, VolumeError::Locked(_)), "{e}");
    drop(st);
    VolumeStore::open(&meta, &devs, small_cfg(), false).unwrap();
}

#[test]
fn a_copy_goes_to_another_device_than_its_source() {
    let (dir, devs) = files(2, 24 * MIB);
    let mut st = VolumeStore::open(&dir.path().join("meta"), &devs, small_cfg(), false).unwrap();
    st.create("a", 4 * MIB, None).unwrap();
    let src_devs: Vec<usize> = st
        .get("a")
        .unwrap()
        .extents
        .iter()
        .map(|e| e.device)
        .collect();
    assert_eq!(src_devs, vec![0], "first fit on an empty store");
    let (v, _) = st.copy("a", "b", None, &mut |_| true).unwrap();
    assert!(v.extents.iter().all(|e| e.device == 1), "{:?}", v.extents);
}

#[test]
fn the_applied_window_is_bounded() {
    let (dir, devs) = files(1, 24 * MIB);
    let meta = dir.path().join("meta");
    let mut st = VolumeStore::open(&meta, &devs, small_cfg(), false).unwrap();
    for i in 0..APPLIED_KEEP + 5 {
        st.create("v", MIB, Some(&format!("c{i}"))).unwrap();
        st.delete("v", Some(&format!("d{i}"))).unwrap();
    }
    assert_eq!(st.applied("c0"), None, "the oldest were pruned");
    let last = format!("d{}", APPLIED_KEEP + 4);
    assert!(st.applied(&last).is_some());
    drop(st);
    let st = VolumeStore::open(&meta, &devs, small_cfg(), false).unwrap();
    assert!(st.applied(&last).is_some(), "kept across a reopen");
}

#[test]
fn a_catalog_naming_a_missing_device_or_a_newer_version_is_an_error() {
    let (dir, devs) = files(1, 24 * MIB);
    let meta = dir.path().join("meta");
    {
        let mut st = VolumeStore::open(&meta, &devs, small_cfg(), false).unwrap();
        st.create("v", MIB, None).unwrap();
    }
    let path = meta.join("volumes.json");
    let good = std::fs::read_to_string(&path).unwrap();
    let mut cat: serde_json::Value = serde_json::from_str(&good).unwrap();
    cat["volumes"]["v"]["extents"][0]["device"] = 7.into();
    std::fs::write(&path, serde_json::to_vec(&cat).unwrap()).unwrap();
    let e = VolumeStore::open(&meta, &devs, small_cfg(), false).unwrap_err();
    assert!(matches!(e, VolumeError::Catalog { .. }), "{e}");
    assert!(e.to_string().contains("device 7"), "{e}");
    let mut cat: serde_json::Value = serde_json::from_str(&good).unwrap();
    cat["version"] = 99.into();
    std::fs::write(&path, serde_json::to_vec(&cat).unwrap()).unwrap();
    let e = VolumeStore::open(&meta, &devs, small_cfg(), false).unwrap_err();
    assert!(e.to_string().contains("version 99"), "{e}");
}

#[test]
fn foreign_data_is_refused_without_force() {
    let (dir, devs) = files(1, 32 * MIB);
    std::fs::write(&devs[0], vec![0xAB; 8192]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&devs[0])
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let e = VolumeStore::open(&dir.path().join("m1"), &devs, small_cfg(), false).unwrap_err();
    assert!(matches!(e, VolumeError::Foreign { .. }), "{e}");
    assert!(e.to_string().contains("--force"));
    assert!(!dir.path().join("m1/volumes.json").exists());
    VolumeStore::open(&dir.path().join("m2"), &devs, small_cfg(), true).unwrap();
}

/// Formats a device for daemon `daemon_id` with `daemon::mkfs`.
fn format_device(path: &Path, daemon_id: u32) -> Layout {
    let dev = Device::open(path).unwrap();
    let mut eng = UringEngine::with_queue_depth(4).unwrap();
    let req = MkfsRequest::new(uuid::Uuid::new_v4(), daemon_id);
    mkfs(&mut eng, &dev, &req).unwrap().label.layout
}

/// `daemon::mount` of the device: every checksum, the layout, the metadata units.
fn mounted(path: &Path) -> Mounted {
    let dev = Device::open(path).unwrap();
    let mut eng = UringEngine::with_queue_depth(4).unwrap();
    mount(&mut eng, &dev).unwrap_or_else(|e| panic!("daemon::mount refuses the device: {e}"))
}

fn formatted_devices_use_the_on_device_bitmap_and_stay_mountable(devs: &[PathBuf], meta: &Path) {
    let layouts: Vec<Layout> = devs
        .iter()
        .enumerate()
        .map(|(i, p)| format_device(p, i as u32))
        .collect();
    let initial_used = mounted(&devs[0]).bitmap.used();
    let size = 20 * MIB;
    let data = pattern(size as usize, 3);
    {
        let mut st = VolumeStore::open(meta, devs, StoreConfig::default(), false).unwrap();
        assert!(st.is_formatted(0) && st.is_formatted(1));
        st.create("src", size, None).unwrap();
        st.write("src", 0, &data).unwrap();
        st.copy("src", "dst", None, &mut |_| true).unwrap();
        assert_eq!(st.read("dst", 0, size as usize).unwrap(), data);
        // daemon::mount accepts the devices while the store has them open, too.
        for d in devs {
            let m = mounted(d);
            assert!(!m.used_units_stale());
        }
    }
    // The bitmaps on the devices hold exactly metadata + both volumes (4 KiB units), and
    // the superblock counters follow them.
    let units = |i: usize| {
        let m = mounted(&devs[i]);
        assert!(
            !m.used_units_stale(),
            "superblock counter follows the bitmap"
        );
        m.bitmap.used() - initial_used
    };
    assert_eq!(units(0) + units(1), 2 * size / 4096);
    let write_bitmap = |i: usize, b: &blocklab::format::Bitmap| {
        let dev = Device::open(&devs[i]).unwrap();
        let mut eng = UringEngine::with_queue_depth(4).unwrap();
        eng.write_at(
            &dev,
            layouts[i].bitmap_offset,
            &AlignedBuf::from_slice(b.as_bytes()),
        )
        .unwrap();
        eng.fsync(&dev).unwrap();
    };
    // A crash after the bitmap write, before the superblock write and the catalog commit:
    // units marked used on the device that no volume owns, the counter stale. The device
    // still mounts (the counter is a hint); the next open gives the units back and
    // rewrites the counter.
    let before = units(1);
    {
        let mut b = mounted(&devs[1]).bitmap;
        let last = layouts[1].total_units() - 10;
        b.allocate(last..last + 5).unwrap();
        write_bitmap(1, &b);
    }
    let m = mounted(&devs[1]);
    assert!(
        m.used_units_stale(),
        "the simulated crash left the counter stale"
    );
    assert_eq!(m.bitmap.used() - initial_used, before + 5);
    let mut st = VolumeStore::open(meta, devs, StoreConfig::default(), false).unwrap();
    assert_eq!(
        units(1),
        before,
        "leaked units reclaimed, counter rewritten"
    );
    assert_eq!(st.read("dst", 0, size as usize).unwrap(), data);
    st.delete("src", None).unwrap();
    assert_eq!(units(0) + units(1), size / 4096);
    drop(st);
    // The same crash during a delete (bitmap freed, counter and catalog not yet): the
    // catalog still has the volume, so its units are marked used again.
    let before = units(0) + units(1);
    let dst_dev = {
        let st = VolumeStore::open(meta, devs, StoreConfig::default(), false).unwrap();
        st.get("dst").unwrap().extents[0].device
    };
    {
        let m = mounted(&devs[dst_dev]);
        let mut b = m.bitmap;
        let first = layouts[dst_dev].first_data_unit();
        let used: Vec<u64> = (first..layouts[dst_dev].total_units())
            .filter(|&u| b.is_used(u))
            .take(3)
            .collect();
        for u in used {
            b.release(u..u + 1).unwrap();
        }
        write_bitmap(dst_dev, &b);
    }
    assert!(mounted(&devs[dst_dev]).used_units_stale());
    let mut st = VolumeStore::open(meta, devs, StoreConfig::default(), false).unwrap();
    assert_eq!(units(0) + units(1), before);
    assert_eq!(st.read("dst", 0, size as usize).unwrap(), data);
}

#[test]
fn formatted_devices_use_the_on_device_bitmap_and_stay_mountable_on_files() {
    on_files(
        2,
        32 * MIB,
        formatted_devices_use_the_on_device_bitmap_and_stay_mountable,
    );
}

#[test]
fn formatted_devices_use_the_on_device_bitmap_and_stay_mountable_on_loop_devices() {
    on_loop_devices(
        "fo-volfmt",
        2,
        32 * MIB,
        formatted_devices_use_the_on_device_bitmap_and_stay_mountable,
    );
}

#[test]
fn a_formatted_device_that_now_reads_blank_is_named_not_used_raw() {
    let (dir, devs) = files(1, 32 * MIB);
    format_device(&devs[0], 0);
    let uuid = mounted(&devs[0]).label.daemon_uuid;
    let meta = dir.path().join("meta");
    VolumeStore::open(&meta, &devs, StoreConfig::default(), false).unwrap();
    // The device is wiped (or another one is at that path now).
    std::fs::File::create(&devs[0])
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    for force in [false, true] {
        let e = VolumeStore::open(&meta, &devs, StoreConfig::default(), force).unwrap_err();
        assert!(matches!(e, VolumeError::DeviceMismatch(_)), "{e}");
        let m = e.to_string();
        assert!(
            m.contains(&uuid.to_string()) && !m.contains("--force"),
            "{m}"
        );
    }
}

#[test]
fn a_corrupt_superblock_is_noticed() {
    let (dir, devs) = files(1, 32 * MIB);
    let l = format_device(&devs[0], 0);
    let meta = dir.path().join("meta");
    VolumeStore::open(&meta, &devs, StoreConfig::default(), false).unwrap();
    {
        let dev = Device::open(&devs[0]).unwrap();
        let mut eng = UringEngine::with_queue_depth(4).unwrap();
        let mut b = AlignedBuf::new(4096);
        eng.read_at(&dev, l.superblock_offset, &mut b).unwrap();
        b[40] ^= 0xff;
        eng.write_at(&dev, l.superblock_offset, &b).unwrap();
        eng.fsync(&dev).unwrap();
    }
    let e = VolumeStore::open(&meta, &devs, StoreConfig::default(), false).unwrap_err();
    assert!(matches!(e, VolumeError::Daemon(_)), "{e}");
    assert!(e.to_string().contains("not mountable"), "{e}");
}
