//! Volumes end to end: on regular files always, and on loop devices (direct I/O through
//! io_uring) as root: byte-for-byte copies across fragmented extents on several devices,
//! the catalog surviving a restart, bad input refused with the store unchanged, foreign data
//! refused without force.

use std::path::PathBuf;

use blocklab::dev::{AlignedBuf, Device, IoEngine, UringEngine};
use blocklab::format::{
    Bitmap, Label, Layout, LayoutParams, LogInitRecord, Superblock, LABEL_FLAG_READY,
};
use blocklab::testing::{scratch_dir, sparse_files, LoopDevices};
use blocklab::volume::{StoreConfig, VolumeError, VolumeStore};

const MIB: u64 = 1 << 20;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("blocklab-vol-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn files(dir: &tempfile::TempDir, n: usize, size: u64) -> Vec<PathBuf> {
    sparse_files(dir.path(), n, size)
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
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
        st.delete("b").unwrap();
        // `src` spans the hole left by b, then the rest of device 0, then device 1.
        let size = 15 * MIB;
        let v = st.create("src", size, Some("op-1")).unwrap();
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
    assert_eq!(st.get("dst").unwrap().created_by.as_deref(), Some("op-2"));
    let size = src_data.len();
    assert_eq!(st.read("dst", 0, size).unwrap(), src_data);
    assert_eq!(st.read("src", 0, size).unwrap(), src_data);
    // Allocation after restart does not overlap existing volumes.
    st.create("e", 2 * MIB, None).unwrap();
    assert_eq!(st.read("dst", 0, size).unwrap(), src_data);
}

#[test]
fn copy_is_byte_exact_and_catalog_survives_restart_on_files() {
    let dir = tmp();
    let devs = files(&dir, 2, 24 * MIB);
    copy_and_restart(&devs, &dir.path().join("meta"));
}

#[test]
fn copy_is_byte_exact_and_catalog_survives_restart_on_loop_devices() {
    let Some(g) = LoopDevices::provision("fo-vol", 2, 24 * MIB) else {
        return;
    };
    let dir = scratch_dir("blocklab-test-");
    copy_and_restart(&g.paths(), &dir.path().join("meta"));
}

#[test]
fn bad_input_is_refused_and_leaves_the_store_unchanged() {
    let dir = tmp();
    let devs = files(&dir, 1, 24 * MIB);
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
    let e = st.delete("nope").unwrap_err();
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
    st.delete("fill").unwrap();
    assert_eq!((st.list(), st.free_bytes()), before);
    assert_eq!(
        std::fs::read(meta.join("volumes.json")).unwrap(),
        catalog,
        "the catalog on disk is unchanged"
    );
    // A stopped copy frees its destination and records nothing.
    let e = st.copy("v", "v2", None, &mut |_| false).unwrap_err().0;
    assert!(matches!(e, VolumeError::Stopped(_)));
    assert_eq!((st.list(), st.free_bytes()), before);
}

#[test]
fn foreign_data_is_refused_without_force() {
    let dir = tmp();
    let devs = files(&dir, 1, 32 * MIB);
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

/// Writes the daemon format (label with `ready`, superblock, log init record, initial
/// bitmap) with `core::format`'s encoders — standing in for `daemon::mkfs`, which is built
/// on another branch and not yet on main.
fn format_device(path: &std::path::Path, daemon_id: u32) -> Layout {
    let dev = Device::open(path).unwrap();
    let mut eng = UringEngine::with_queue_depth(4).unwrap();
    let layout = Layout::compute(dev.size(), LayoutParams::default()).unwrap();
    let fsid = uuid::Uuid::new_v4();
    let daemon_uuid = uuid::Uuid::new_v4();
    let bitmap = Bitmap::initial(&layout);
    let sb = Superblock {
        cluster_fsid: fsid,
        daemon_id,
        alloc_unit: layout.alloc_unit,
        total_units: layout.total_units(),
        used_units: bitmap.used(),
        generation: 1,
    };
    let log = LogInitRecord {
        daemon_uuid,
        log_len: layout.log_len,
        birth_time_unix_ns: 1,
    };
    let label = Label {
        flags: LABEL_FLAG_READY,
        cluster_fsid: fsid,
        daemon_id,
        daemon_uuid,
        birth_time_unix_ns: 1,
        layout: layout.clone(),
    };
    for (off, bytes) in [
        (layout.superblock_offset, sb.encode()),
        (layout.log_offset, log.encode()),
        (layout.bitmap_offset, bitmap.as_bytes().to_vec()),
        (0, label.encode()),
    ] {
        eng.write_at(&dev, off, &AlignedBuf::from_slice(&bytes))
            .unwrap();
    }
    eng.fsync(&dev).unwrap();
    layout
}

fn on_device_bitmap(path: &std::path::Path, l: &Layout) -> (Bitmap, Superblock) {
    let dev = Device::open(path).unwrap();
    let mut eng = UringEngine::with_queue_depth(4).unwrap();
    let mut b = AlignedBuf::new(l.bitmap_len as usize);
    eng.read_at(&dev, l.bitmap_offset, &mut b).unwrap();
    let mut s = AlignedBuf::new(4096);
    eng.read_at(&dev, l.superblock_offset, &mut s).unwrap();
    (
        Bitmap::decode(&b, l.total_units()).unwrap(),
        Superblock::decode(&s).unwrap(),
    )
}

#[test]
fn formatted_devices_use_the_on_device_bitmap_and_reconcile_after_a_crash() {
    let dir = tmp();
    let devs = files(&dir, 2, 32 * MIB);
    let layouts: Vec<Layout> = devs
        .iter()
        .enumerate()
        .map(|(i, p)| format_device(p, i as u32))
        .collect();
    let initial_used = Bitmap::initial(&layouts[0]).used();
    let meta = dir.path().join("meta");
    let size = 20 * MIB;
    let data = pattern(size as usize, 3);
    {
        let mut st = VolumeStore::open(&meta, &devs, StoreConfig::default(), false).unwrap();
        assert!(st.is_formatted(0) && st.is_formatted(1));
        st.create("src", size, None).unwrap();
        st.write("src", 0, &data).unwrap();
        st.copy("src", "dst", None, &mut |_| true).unwrap();
        assert_eq!(st.read("dst", 0, size as usize).unwrap(), data);
    }
    // The bitmaps on the devices hold exactly metadata + both volumes (4 KiB units).
    let units = |i: usize| {
        let (b, sb) = on_device_bitmap(&devs[i], &layouts[i]);
        assert_eq!(
            sb.used_units,
            b.used(),
            "superblock counter follows the bitmap"
        );
        b.used() - initial_used
    };
    assert_eq!(units(0) + units(1), 2 * size / 4096);
    // Crash between the bitmap write and the catalog commit: units marked used on the
    // device that no volume owns. The next open gives them back.
    let before = units(1);
    {
        let (mut b, _) = on_device_bitmap(&devs[1], &layouts[1]);
        let last = layouts[1].total_units() - 10;
        b.allocate(last..last + 5).unwrap();
        let dev = Device::open(&devs[1]).unwrap();
        let mut eng = UringEngine::with_queue_depth(4).unwrap();
        eng.write_at(
            &dev,
            layouts[1].bitmap_offset,
            &AlignedBuf::from_slice(b.as_bytes()),
        )
        .unwrap();
    }
    let mut st = VolumeStore::open(&meta, &devs, StoreConfig::default(), false).unwrap();
    assert_eq!(units(1), before, "leaked units reclaimed");
    assert_eq!(st.read("dst", 0, size as usize).unwrap(), data);
    st.delete("src").unwrap();
    assert_eq!(units(0) + units(1), size / 4096);
}
