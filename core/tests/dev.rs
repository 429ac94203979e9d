//! The device layer end to end: the io_uring engine on a regular file and (as root) on
//! provisioned loop devices; provisioning and teardown, including after a crash.

use blocklab::dev::provision::{self, ProvisionGuard, TeardownOutcome};
use blocklab::dev::{
    AlignedBuf, DevError, Device, DeviceKind, IoEngine, IoRequest, Pattern, StreamLimit, StreamOp,
    StreamSpec, UringEngine,
};
use blocklab::testing::{is_root, scratch_dir};

/// These tests exercise provisioning itself, so they hold the `ProvisionGuard` directly.
fn state_dir() -> tempfile::TempDir {
    scratch_dir("blocklab-test-")
}

fn file_device(dir: &tempfile::TempDir, size: u64) -> Device {
    let p = dir.path().join("dev.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    Device::open(&p).unwrap()
}

fn pattern_buf(len: usize, seed: u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(len);
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    b
}

/// Writes 64 distinct 4 KiB blocks plus a 1 MiB block in one batch at queue depth `qd`,
/// flushes, reads them back in another batch and compares.
fn write_read_back(dev: &Device, qd: u32) {
    let mut eng = UringEngine::with_queue_depth(qd).unwrap();
    let bufs: Vec<AlignedBuf> = (0..64)
        .map(|i| pattern_buf(4096, i as u8 + qd as u8))
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
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let dev = file_device(&dir, 4 << 20);
    assert_eq!(dev.kind(), DeviceKind::File);
    for qd in [1, 4, 32] {
        write_read_back(&dev, qd);
    }
}

#[test]
fn engine_refuses_misaligned_io_and_reads_past_end() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let dev = file_device(&dir, 1 << 20);
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
    let dir = tempfile::tempdir().unwrap();
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
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let dev = file_device(&dir, 8 << 20);
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
    if !is_root() {
        eprintln!("skipping: loop devices need root");
        return;
    }
    let sd = state_dir();
    let guard = ProvisionGuard::new(sd.path(), "t-rt", 3, 64 << 20).unwrap();
    let paths = guard.paths();
    assert_eq!(paths.len(), 3);
    for d in &guard.state().devices {
        assert!(
            d.direct_io,
            "{} should have direct I/O on",
            d.device.display()
        );
        let dev = Device::open(&d.device).unwrap();
        assert_eq!(dev.kind(), DeviceKind::Block);
        assert_eq!(dev.size(), 64 << 20);
        assert!(provision::is_attached(d));
        for qd in [1, 8, 32] {
            write_read_back(&dev, qd);
        }
    }
    let devices = guard.state().devices.clone();
    let out = guard.teardown().unwrap();
    assert!(out.iter().all(|(_, o)| *o == TeardownOutcome::Detached));
    for d in &devices {
        assert!(
            !provision::is_attached(d),
            "{} still attached",
            d.device.display()
        );
        assert!(
            !d.backing_file.exists(),
            "{} left behind",
            d.backing_file.display()
        );
    }
    assert!(provision::list_sets(sd.path()).unwrap().is_empty());
}

#[test]
fn teardown_after_a_crash_cleans_up() {
    if !is_root() {
        eprintln!("skipping: loop devices need root");
        return;
    }
    let sd = state_dir();
    // A "crashed" run: devices attached and the state file present, nobody to tear down.
    let state = ProvisionGuard::new(sd.path(), "t-crash", 2, 16 << 20)
        .unwrap()
        .forget();
    assert!(state.devices.iter().all(provision::is_attached));
    let listed = provision::list_sets(sd.path()).unwrap();
    assert_eq!(listed, vec![state.clone()]);
    let out = provision::teardown(sd.path(), &state.set).unwrap();
    assert_eq!(out.len(), 2);
    for d in &state.devices {
        assert!(!provision::is_attached(d));
        assert!(!d.backing_file.exists());
    }
    // A second teardown of the same set is a clear error, not a silent success.
    assert!(provision::teardown(sd.path(), &state.set).is_err());
}

#[test]
fn provision_refuses_bad_sizes_and_names() {
    let sd = state_dir();
    assert!(provision::provision(sd.path(), "x", 1, 1000).is_err());
    assert!(provision::provision(sd.path(), "x", 1, 0).is_err());
    assert!(provision::provision(sd.path(), "../evil", 1, 4096).is_err());
    assert!(provision::provision(sd.path(), "x", 0, 4096).is_err());
}
