//! mkfs / mount / inspect on loop devices (root): round trip, idempotence, refusals of
//! foreign data (another cluster's label, ext4), of a damaged or different format of the
//! same daemon, and `force`, crash after each phase, corruption of each region.

use blocklab::daemon::{self, DaemonError, MkfsRequest, Phase};
use blocklab::dev::{AlignedBuf, Device, IoEngine, UringEngine};
use blocklab::format::LayoutParams;
use blocklab::testing::{
    ext4_intact, make_ext4, require_program, scratch, sparse_file, LoopDevices,
};
use uuid::Uuid;

fn eng() -> UringEngine {
    UringEngine::with_queue_depth(16).unwrap()
}

fn flip_byte(dev: &Device, off: u64) {
    let mut e = eng();
    let block = off / 4096 * 4096;
    let mut b = AlignedBuf::new(4096);
    e.read_at(dev, block, &mut b).unwrap();
    b[(off - block) as usize] ^= 0xFF;
    e.write_at(dev, block, &b).unwrap();
    e.fsync(dev).unwrap();
}

#[test]
fn mkfs_mount_inspect_idempotent_and_corruption() {
    // 2 GiB (sparse): big enough for a label copy at 1 GiB.
    let Some(g) = LoopDevices::provision("init-rt", 1, 2 << 30) else {
        return;
    };
    let dev = Device::open(&g.paths()[0]).unwrap();
    let mut e = eng();
    let fsid = Uuid::new_v4();
    let rep = daemon::mkfs(&mut e, &dev, &MkfsRequest::new(fsid, 5)).unwrap();
    assert!(!rep.already_formatted);
    assert_eq!(
        rep.phases.iter().map(|p| p.0).collect::<Vec<_>>(),
        Phase::ALL.to_vec()
    );
    let l = &rep.label.layout;
    assert_eq!(l.label_copies, vec![1 << 30]);
    assert_eq!(rep.bytes_written, 4096 * 3 + l.bitmap_len + 4096 * 2);
    let m = daemon::mount(&mut e, &dev).unwrap();
    assert_eq!(m.label, rep.label);
    assert_eq!(m.label.cluster_fsid, fsid);
    assert_eq!(m.label.daemon_id, 5);
    assert!(m.label.is_ready());
    assert_eq!(m.free_units + m.superblock.used_units, l.total_units());
    let ins = daemon::inspect(&mut e, &dev).unwrap();
    assert!(ins.ready && ins.mount_error.is_none());
    assert_eq!(ins.label, rep.label);

    // Idempotent: same cluster and daemon, nothing written, same uuid.
    let again = daemon::mkfs(&mut e, &dev, &MkfsRequest::new(fsid, 5)).unwrap();
    assert!(again.already_formatted);
    assert_eq!(again.bytes_written, 0);
    assert_eq!(again.label, rep.label);

    // Another daemon id of the same cluster, or another cluster: refused.
    for req in [
        MkfsRequest::new(fsid, 6),
        MkfsRequest::new(Uuid::new_v4(), 5),
    ] {
        let err = daemon::mkfs(&mut e, &dev, &req).unwrap_err();
        assert!(matches!(err, DaemonError::Refused { .. }), "{err}");
        assert!(
            err.to_string().contains("blocklab label of cluster"),
            "{err}"
        );
    }
    assert_eq!(daemon::mount(&mut e, &dev).unwrap().label, rep.label);

    // The same daemon asked with other layout parameters or another uuid: refused unless
    // forced (a no-op would hand back a format other than the one asked for).
    let mut other_log = MkfsRequest::new(fsid, 5);
    other_log.params = LayoutParams {
        log_len: 8 << 20,
        ..LayoutParams::default()
    };
    let mut other_au = MkfsRequest::new(fsid, 5);
    other_au.params.alloc_unit = 8192;
    let mut other_uuid = MkfsRequest::new(fsid, 5);
    other_uuid.daemon_uuid = Some(Uuid::new_v4());
    for (req, what) in [
        (&other_log, "a log of 4194304 bytes (requested 8388608)"),
        (&other_au, "allocation unit 4096 (requested 8192)"),
        (&other_uuid, "daemon uuid"),
    ] {
        let err = daemon::mkfs(&mut e, &dev, req).unwrap_err();
        assert!(matches!(err, DaemonError::Refused { .. }), "{err}");
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
    assert_eq!(daemon::mount(&mut e, &dev).unwrap().label, rep.label);
    let mut same_uuid = MkfsRequest::new(fsid, 5);
    same_uuid.daemon_uuid = Some(rep.label.daemon_uuid);
    assert!(
        daemon::mkfs(&mut e, &dev, &same_uuid)
            .unwrap()
            .already_formatted
    );

    // Corruption of each region makes mount fail. mkfs of the same daemon refuses a
    // finished format that does not mount (it is not a crash between phases) and, forced,
    // formats it again with the same uuid.
    let targets = [
        ("label", 100),
        ("superblock", l.superblock_offset + 17),
        ("log init record", l.log_offset + 9),
        ("bitmap", l.bitmap_offset),
        ("label copy", l.label_copies[0] + 40),
    ];
    for (what, off) in targets {
        flip_byte(&dev, off);
        let err = daemon::mount(&mut e, &dev).unwrap_err();
        assert!(
            matches!(err, DaemonError::NotMountable { .. }),
            "{what}: {err}"
        );
        if what == "label" {
            // A damaged label is foreign data to mkfs (without force).
            let err = daemon::mkfs(&mut e, &dev, &MkfsRequest::new(fsid, 5)).unwrap_err();
            assert!(err.to_string().contains("damaged blocklab label"), "{err}");
            flip_byte(&dev, off);
        } else {
            let err = daemon::mkfs(&mut e, &dev, &MkfsRequest::new(fsid, 5)).unwrap_err();
            assert!(matches!(err, DaemonError::Refused { .. }), "{what}: {err}");
            assert!(
                err.to_string()
                    .contains("a blocklab format of this daemon that does not mount"),
                "{what}: {err}"
            );
            assert!(err.to_string().contains("--force"), "{what}: {err}");
            // Nothing was written: still the same damage.
            assert!(daemon::mount(&mut e, &dev).is_err(), "{what}");
            let mut forced = MkfsRequest::new(fsid, 5);
            forced.force = true;
            let r = daemon::mkfs(&mut e, &dev, &forced).unwrap();
            assert!(!r.already_formatted, "{what}");
            assert_eq!(r.label.daemon_uuid, rep.label.daemon_uuid);
        }
        daemon::mount(&mut e, &dev).unwrap();
    }
    // Forced with other parameters: formatted as asked, same uuid.
    other_log.force = true;
    let r = daemon::mkfs(&mut e, &dev, &other_log).unwrap();
    assert!(!r.already_formatted);
    assert_eq!(r.label.layout.log_len, 8 << 20);
    assert_eq!(r.label.daemon_uuid, rep.label.daemon_uuid);
    assert_eq!(daemon::mount(&mut e, &dev).unwrap().label, r.label);

    // --force overrides another cluster's label.
    let other = Uuid::new_v4();
    let mut req = MkfsRequest::new(other, 1);
    req.force = true;
    daemon::mkfs(&mut e, &dev, &req).unwrap();
    assert_eq!(
        daemon::mount(&mut e, &dev).unwrap().label.cluster_fsid,
        other
    );
}

#[test]
fn crash_after_each_phase_then_mount_rejects_and_mkfs_completes() {
    let phases = &Phase::ALL[..Phase::ALL.len() - 1];
    let Some(g) = LoopDevices::provision("init-crash", phases.len(), 64 << 20) else {
        return;
    };
    let fsid = Uuid::new_v4();
    let mut e = eng();
    for (i, (&phase, path)) in phases.iter().zip(g.paths()).enumerate() {
        let dev = Device::open(&path).unwrap();
        let mut req = MkfsRequest::new(fsid, i as u32);
        req.stop_after = Some(phase);
        let err = daemon::mkfs(&mut e, &dev, &req).unwrap_err();
        assert!(
            matches!(err, DaemonError::InjectedStop { phase: p, .. } if p == phase),
            "{err}"
        );
        assert!(
            daemon::mount(&mut e, &dev).is_err(),
            "mount accepted a device whose mkfs stopped after {phase}"
        );
        let rep = daemon::mkfs(&mut e, &dev, &MkfsRequest::new(fsid, i as u32)).unwrap();
        assert!(!rep.already_formatted, "{phase}");
        let m = daemon::mount(&mut e, &dev).unwrap();
        assert_eq!(m.label.daemon_id, i as u32);
    }
}

#[test]
fn refuses_ext4_and_data_and_too_small_devices() {
    let Some(g) = LoopDevices::provision("init-foreign", 2, 64 << 20) else {
        return;
    };
    if !require_program("mkfs.ext4", "e2fsprogs") {
        return;
    }
    let paths = g.paths();
    make_ext4(&paths[0]);
    let fsid = Uuid::new_v4();
    let mut e = eng();
    let dev = Device::open(&paths[0]).unwrap();
    let err = daemon::mkfs(&mut e, &dev, &MkfsRequest::new(fsid, 0)).unwrap_err();
    assert!(err.to_string().contains("ext2/3/4 filesystem"), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    drop(dev);
    let (intact, fsck) = ext4_intact(&paths[0]);
    assert!(intact, "the refused ext4 filesystem was damaged: {fsck}");
    // --force formats it.
    let dev = Device::open(&paths[0]).unwrap();
    let mut req = MkfsRequest::new(fsid, 0);
    req.force = true;
    daemon::mkfs(&mut e, &dev, &req).unwrap();
    daemon::mount(&mut e, &dev).unwrap();

    // Non-zero bytes in the first MiB.
    let dev = Device::open(&paths[1]).unwrap();
    let mut b = AlignedBuf::new(4096);
    b[10] = 0x42;
    e.write_at(&dev, 512 << 10, &b).unwrap();
    let err = daemon::mkfs(&mut e, &dev, &MkfsRequest::new(fsid, 1)).unwrap_err();
    assert!(err.to_string().contains("non-zero data"), "{err}");
    let mut back = AlignedBuf::new(4096);
    e.read_at(&dev, 512 << 10, &mut back).unwrap();
    assert_eq!(back[10], 0x42);
    assert!(daemon::inspect(&mut e, &dev).is_err());

    // Too small for the layout: a clear error, nothing written.
    let dir = scratch();
    let p = dir.path().join("tiny.img");
    sparse_file(&p, 1 << 20);
    let tiny = Device::open(&p).unwrap();
    let err = daemon::mkfs(&mut e, &tiny, &MkfsRequest::new(fsid, 2)).unwrap_err();
    assert!(
        err.to_string().contains("too small for the layout"),
        "{err}"
    );
    assert!(std::fs::read(&p).unwrap().iter().all(|&x| x == 0));
}
