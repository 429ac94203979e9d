//! The device layer end to end: the io_uring engine on a regular file and (as root) on
//! provisioned loop devices; provisioning and teardown, including after a crash.

use std::process::Command;
use std::time::Duration;

use blocklab::dev::provision::{self, LoopDevice, ProvisionGuard, ProvisionState, TeardownOutcome};
use blocklab::dev::{
    AlignedBuf, DevError, Device, DeviceKind, IoEngine, IoRequest, Pattern, StreamLimit, StreamOp,
    StreamSpec, UringEngine,
};
use blocklab::testing::{
    assert_success, file_device, output_text, pattern_buf, require_program, require_root, scratch,
    set_read_only, wait_for, LoopDevices, REQUIRE_ROOT_VAR, SKIP_LOG_VAR,
};

/// The loop-device tests here exercise provisioning itself, so they hold the
/// `ProvisionGuard` directly (in a scratch state directory) and check root themselves.
const LOOP: &str = "loop devices need root";

/// After a teardown: no device is attached any more and no backing file is left.
fn assert_gone(devices: &[LoopDevice]) {
    for d in devices {
        assert!(
            !provision::is_attached(d).unwrap(),
            "{:?} still attached",
            d.device
        );
        assert!(
            !d.backing_file.exists(),
            "{} left behind",
            d.backing_file.display()
        );
    }
}

/// Writes 64 distinct 4 KiB blocks plus a 1 MiB block in one batch at queue depth `qd`,
/// flushes, reads them back in another batch and compares.
fn write_read_back(dev: &Device, qd: u32) {
    let mut eng = UringEngine::with_queue_depth(qd).unwrap();
    let bufs: Vec<AlignedBuf> = (0..64)
        .map(|i| pattern_buf(4096, i + u64::from(qd)))
        .collect();
    let big = pattern_buf(1 << 20, 99);
    let mut reqs: Vec<IoRequest<'_>> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| IoRequest::write(dev, (i as u64 * 2) * 4096, b))
        .collect();
    reqs.push(IoRequest::write(dev, 1 << 20, &big));
    reqs.push(IoRequest::fdatasync(dev));
    eng.execute(&mut reqs).unwrap();

    let mut back: Vec<AlignedBuf> = (0..64).map(|_| AlignedBuf::new(4096)).collect();
    let mut big_back = AlignedBuf::new(1 << 20);
    let mut reqs: Vec<IoRequest<'_>> = back
        .iter_mut()
        .enumerate()
        .map(|(i, b)| IoRequest::read(dev, (i as u64 * 2) * 4096, b))
        .collect();
    reqs.push(IoRequest::read(dev, 1 << 20, &mut big_back));
    eng.execute(&mut reqs).unwrap();
    for (w, r) in bufs.iter().zip(&back) {
        assert_eq!(&w[..], &r[..]);
    }
    assert_eq!(&big[..], &big_back[..]);
    // The gaps between the written blocks stay zero.
    let mut gap = AlignedBuf::new(4096);
    eng.read_at(dev, 4096, &mut gap).unwrap();
    assert!(gap.iter().all(|&b| b == 0));
}

#[test]
fn engine_round_trip_on_a_regular_file() {
    let dir = scratch();
    let dev = file_device(dir.path(), 4 << 20);
    assert_eq!(dev.kind(), DeviceKind::File);
    for qd in [1, 4, 32] {
        write_read_back(&dev, qd);
    }
}

#[test]
fn engine_refuses_misaligned_io_and_reads_past_end() {
    let dir = scratch();
    let dev = file_device(dir.path(), 1 << 20);
    let mut eng = UringEngine::with_queue_depth(4).unwrap();
    let buf = AlignedBuf::new(8192);
    let err = eng.write_at(&dev, 100, &buf[..4096]).unwrap_err();
    assert!(
        matches!(
            err,
            DevError::Misaligned {
                what: "offset",
                value: 100,
                ..
            }
        ),
        "{err}"
    );
    let err = eng.write_at(&dev, 0, &buf[..1000]).unwrap_err();
    assert!(
        matches!(err, DevError::Misaligned { what: "length", .. }),
        "{err}"
    );
    let err = eng.write_at(&dev, 0, &buf[512..4608]).unwrap_err();
    assert!(matches!(err, DevError::MisalignedBuffer { .. }), "{err}");
    let mut rbuf = AlignedBuf::new(8192);
    let err = eng.read_at(&dev, (1 << 20) - 4096, &mut rbuf).unwrap_err();
    assert!(matches!(err, DevError::PastEnd { .. }), "{err}");
    assert!(
        err.to_string().contains("dev.img"),
        "error names the device: {err}"
    );
    // Nothing was written by the refused requests.
    eng.read_at(&dev, 0, &mut rbuf).unwrap();
    assert!(rbuf.iter().all(|&b| b == 0));
}

#[test]
fn open_reports_bad_paths() {
    let dir = scratch();
    assert!(matches!(
        Device::open(dir.path().join("nope")),
        Err(DevError::NotFound { .. })
    ));
    assert!(matches!(
        Device::open(dir.path()),
        Err(DevError::IsDirectory { .. })
    ));
    assert!(matches!(
        Device::open("/dev/null"),
        Err(DevError::UnsupportedKind { .. })
    ));
}

#[test]
fn stream_covers_every_option_on_a_file() {
    let dir = scratch();
    let dev = file_device(dir.path(), 8 << 20);
    let mut eng = UringEngine::with_queue_depth(8).unwrap();
    for (op, fixed) in [
        (StreamOp::Write, false),
        (StreamOp::Write, true),
        (StreamOp::Read, false),
        (StreamOp::Read, true),
    ] {
        let spec = StreamSpec {
            op,
            pattern: Pattern::Random { seed: 7 },
            block_size: 4096,
            queue_depth: 8,
            region_offset: 0,
            region_len: 0,
            limit: StreamLimit::Ops(500),
            fixed_buffers: fixed,
            fixed_file: fixed,
        };
        let mut n = 0u64;
        let stats = eng.stream(&dev, &spec, &mut |_| n += 1).unwrap();
        assert_eq!(stats.ops, 500);
        assert_eq!(n, 500);
        assert_eq!(stats.bytes, 500 * 4096);
    }
    // The writes really landed: the file is no longer all zeros.
    let mut buf = AlignedBuf::new(8 << 20);
    eng.read_at(&dev, 0, &mut buf).unwrap();
    assert!(buf.iter().any(|&b| b != 0));
}

#[test]
fn loop_devices_round_trip_and_teardown() {
    if !require_root(LOOP) {
        return;
    }
    let sd = scratch();
    let guard = ProvisionGuard::new(sd.path(), "t-rt", 3, 64 << 20).unwrap();
    let paths = guard.paths();
    assert_eq!(paths.len(), 3);
    for d in &guard.state().devices {
        assert!(
            d.direct_io,
            "{} should have direct I/O on",
            d.backing_file.display()
        );
        let dev = Device::open(d.device.as_ref().unwrap()).unwrap();
        assert_eq!(dev.kind(), DeviceKind::Block);
        assert_eq!(dev.size(), 64 << 20);
        assert!(provision::is_attached(d).unwrap());
        for qd in [1, 8, 32] {
            write_read_back(&dev, qd);
        }
    }
    let devices = guard.state().devices.clone();
    let out = guard.teardown().unwrap();
    assert!(out.iter().all(|(_, o)| *o == TeardownOutcome::Detached));
    assert_gone(&devices);
    assert!(provision::list_sets(sd.path()).unwrap().is_empty());
}

/// The root rule end to end (as root): this test binary, run as `nobody` on the
/// loop-device test above, fails with `BLOCKLAB_REQUIRE_ROOT=1` and skips without it.
#[test]
fn a_loop_device_test_run_as_non_root_fails_when_root_is_required() {
    if !require_root("running a test as another user needs root") {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let run_as_nobody = |require: Option<&str>| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&exe)
            .args(["--exact", "loop_devices_round_trip_and_teardown"])
            .current_dir("/")
            .env_remove(REQUIRE_ROOT_VAR)
            .env_remove(SKIP_LOG_VAR);
        if let Some(v) = require {
            c.env(REQUIRE_ROOT_VAR, v);
        }
        c.output().expect("running setpriv")
    };
    let o = run_as_nobody(Some("1"));
    let text = output_text(&o);
    assert!(!o.status.success(), "passed without root: {text}");
    assert!(
        text.contains("loop devices need root, and this process is not root")
            && text.contains("BLOCKLAB_REQUIRE_ROOT=1 forbids skipping"),
        "{text}"
    );
    let o = run_as_nobody(None);
    assert_success(&o);
    assert!(output_text(&o).contains("1 passed"), "{}", output_text(&o));
}

#[test]
fn teardown_after_a_crash_cleans_up() {
    if !require_root(LOOP) {
        return;
    }
    let sd = scratch();
    // A "crashed" run: devices attached and the state file present, nobody to tear down.
    let state = ProvisionGuard::new(sd.path(), "t-crash", 2, 16 << 20)
        .unwrap()
        .forget();
    assert!(state
        .devices
        .iter()
        .all(|d| provision::is_attached(d).unwrap()));
    let listed = provision::list_sets(sd.path()).unwrap();
    assert_eq!(listed, vec![state.clone()]);
    // ... and a crash in the middle of a state write left its temporary behind.
    let stale = sd
        .path()
        .join(&state.set)
        .join(format!("state.json{}4242.0", blocklab::fsutil::TEMP_MARKER));
    std::fs::write(&stale, b"{").unwrap();
    let out = provision::teardown(sd.path(), &state.set).unwrap();
    assert_eq!(out.len(), 2);
    assert!(!stale.exists());
    assert!(!sd.path().join(&state.set).exists());
    assert_gone(&state.devices);
    // A second teardown of the same set is a clear error, not a silent success.
    assert!(provision::teardown(sd.path(), &state.set).is_err());
}

#[test]
fn provision_refuses_bad_sizes_and_names() {
    let sd = scratch();
    assert!(provision::provision(sd.path(), "x", 1, 1000).is_err());
    assert!(provision::provision(sd.path(), "x", 1, 0).is_err());
    assert!(provision::provision(sd.path(), "../evil", 1, 4096).is_err());
    assert!(provision::provision(sd.path(), "x", 0, 4096).is_err());
}

/// A crash after the attach but before the state recorded the loop device (or before the
/// backing file was recorded at all): teardown finds the attachment by the backing file's
/// inode, detaches it, and removes the unrecorded file too.
#[test]
fn teardown_finds_attachments_the_state_did_not_record() {
    if !require_root(LOOP) {
        return;
    }
    let sd = scratch();
    let state = ProvisionGuard::new(sd.path(), "t-norec", 2, 16 << 20)
        .unwrap()
        .forget();
    let attached: Vec<_> = state.devices.iter().map(|d| d.device.clone()).collect();
    // What the state file holds when the process dies right after LOOP_CONFIGURE.
    let mut crashed = state.clone();
    for d in &mut crashed.devices {
        d.device = None;
        d.direct_io = false;
    }
    let set_dir = sd.path().join(&state.set);
    std::fs::write(
        set_dir.join("state.json"),
        serde_json::to_vec(&crashed).unwrap(),
    )
    .unwrap();
    // And a backing file created but not recorded yet (a crash before its record).
    std::fs::write(set_dir.join("disk-2.img"), b"").unwrap();
    let listed: Vec<ProvisionState> = provision::list_sets(sd.path()).unwrap();
    assert_eq!(listed, vec![crashed.clone()]);
    assert!(crashed
        .devices
        .iter()
        .all(|d| provision::is_attached(d).unwrap()));
    let out = provision::teardown(sd.path(), &state.set).unwrap();
    assert_eq!(out.len(), 2);
    for ((d, outcome), dev) in out.iter().zip(&attached) {
        assert_eq!(*outcome, TeardownOutcome::Detached);
        assert_eq!(&d.device, dev, "the record names the loop device found");
    }
    assert_gone(&state.devices);
    assert!(!set_dir.exists(), "set directory left behind");
}

/// A loop device still open elsewhere is not detached at once: teardown says so instead of
/// claiming it detached, and the kernel detaches it when the last user closes it.
#[test]
fn teardown_of_a_device_still_open_is_pending() {
    if !require_root(LOOP) {
        return;
    }
    let sd = scratch();
    let guard = ProvisionGuard::new(sd.path(), "t-busy", 1, 16 << 20).unwrap();
    let d = guard.state().devices[0].clone();
    let held = Device::open(d.device.as_ref().unwrap()).unwrap();
    let out = guard.teardown().unwrap();
    assert_eq!(out[0].1, TeardownOutcome::DetachPending);
    drop(held);
    wait_for(
        "the kernel to detach the closed loop device",
        Duration::from_secs(10),
        || !provision::is_attached(&d).unwrap(),
    );
}

/// `open_exclusive` on a block device someone holds exclusively (here: ourselves) is a
/// clear "in use" error; a shared open still works, and a regular file has no such claim.
#[test]
fn open_exclusive_refuses_a_held_device() {
    let Some(g) = LoopDevices::provision("t-excl", 1, 16 << 20) else {
        return;
    };
    let paths = g.paths();
    let p = &paths[0];
    let first = Device::open_exclusive(p).unwrap();
    let err = Device::open_exclusive(p).unwrap_err();
    assert!(matches!(err, DevError::InUse { .. }), "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
    assert!(err.to_string().contains(&p.display().to_string()), "{err}");
    Device::open(p).unwrap();
    drop(first);
    Device::open_exclusive(p).unwrap();

    let dir = scratch();
    let f = file_device(dir.path(), 1 << 20);
    let _a = Device::open_exclusive(f.path()).unwrap();
    Device::open_exclusive(f.path()).unwrap();
}

/// EPERM/EACCES is a permission error, not "read-only"; EROFS (or BLKROGET) is read-only.
#[test]
fn permission_errors_are_not_read_only() {
    if !require_root("chattr +i needs root") {
        return;
    }
    if !require_program("chattr", "e2fsprogs") {
        return;
    }
    let dir = scratch();
    let p = file_device(dir.path(), 1 << 20).path().to_path_buf();
    let immutable = Command::new("chattr").arg("+i").arg(&p).status();
    if !immutable.is_ok_and(|s| s.success()) {
        eprintln!("skipping: chattr +i is not available here (needs ext4/xfs)");
        return;
    }
    // Opening an immutable file for writing fails with EPERM, even for root.
    let err = Device::open(&p).unwrap_err();
    let _ = Command::new("chattr").arg("-i").arg(&p).status();
    assert!(matches!(err, DevError::PermissionDenied { .. }), "{err}");
    assert!(err.to_string().contains("permission denied"), "{err}");
    assert!(!err.to_string().contains("read-only"), "{err}");

    let Some(g) = LoopDevices::provision("t-ro", 1, 16 << 20) else {
        return;
    };
    let paths = g.paths();
    let dev = &paths[0];
    set_read_only(dev, true);
    let err = Device::open(dev).unwrap_err();
    set_read_only(dev, false);
    assert!(matches!(err, DevError::ReadOnly { .. }), "{err}");
}

/// A stream may not ask for more in flight than the engine allows (nor for nothing).
#[test]
fn stream_refuses_a_queue_depth_beyond_the_engine() {
    let dir = scratch();
    let dev = file_device(dir.path(), 1 << 20);
    let mut eng = UringEngine::with_queue_depth(4).unwrap();
    for qd in [0, 5, 64] {
        let spec = StreamSpec {
            op: StreamOp::Read,
            pattern: Pattern::Sequential,
            block_size: 4096,
            queue_depth: qd,
            region_offset: 0,
            region_len: 0,
            limit: StreamLimit::Ops(10),
            fixed_buffers: false,
            fixed_file: false,
        };
        let err = eng.stream(&dev, &spec, &mut |_| {}).unwrap_err();
        assert!(matches!(err, DevError::Config(_)), "qd {qd}: {err}");
        assert!(err.to_string().contains("queue depth"), "{err}");
    }
}

/// The stream's buffers are kept from call to call: a write stream after a read stream
/// (which overwrote them with zeros) still writes non-zero data, and a change of block
/// size or of registration works.
#[test]
fn stream_buffers_survive_calls_of_other_shapes() {
    let dir = scratch();
    let dev = file_device(dir.path(), 8 << 20);
    let mut eng = UringEngine::with_queue_depth(8).unwrap();
    let spec = |op, bs: usize, fixed, off: u64| StreamSpec {
        op,
        pattern: Pattern::Sequential,
        block_size: bs,
        queue_depth: 8,
        region_offset: off,
        region_len: 2 << 20,
        limit: StreamLimit::Ops((2 << 20) / bs as u64),
        fixed_buffers: fixed,
        fixed_file: fixed,
    };
    let runs = [
        (StreamOp::Read, 4096, true, 0),
        (StreamOp::Write, 4096, true, 2 << 20),
        (StreamOp::Read, 65536, false, 0),
        (StreamOp::Write, 65536, false, 4 << 20),
        (StreamOp::Read, 4096, false, 0),
        (StreamOp::Write, 4096, true, 6 << 20),
    ];
    for (op, bs, fixed, off) in runs {
        let st = eng
            .stream(&dev, &spec(op, bs, fixed, off), &mut |_| {})
            .unwrap();
        assert_eq!(st.bytes, 2 << 20);
    }
    // Every written block holds data (a read in between must not turn writes into zeros).
    let mut back = AlignedBuf::new(8 << 20);
    eng.read_at(&dev, 0, &mut back).unwrap();
    assert!(
        back[..2 << 20].iter().all(|&b| b == 0),
        "reads wrote nothing"
    );
    for block in back[2 << 20..].chunks(4096) {
        assert!(
            block.iter().any(|&b| b != 0),
            "a written block is all zeros"
        );
    }
}
