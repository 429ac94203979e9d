//! In-process tests of core::alloc: segment validation, the lock-free bitmap under
//! concurrent threads, the robust lock, recovery and the audit. Multi-process tests
//! (real OS processes) live in `experiments/tests/alloc*.rs`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use blocklab::alloc::audit::{audit, Record};
use blocklab::alloc::node::{proc_path, NodeConfig, NodeProcess};
use blocklab::alloc::recovery;
use blocklab::alloc::segs::{DeviceSeg, FreeMode, ProcSeg, UnfilledSeg, DEV_MAGIC};
use blocklab::alloc::shm::Segment;
use blocklab::alloc::{AllocError, BlockRef, BlockState, DeviceRegion, Strategy};
use blocklab::testing::{free_port, sparse_file};

fn region(path: &str, blocks: u64) -> DeviceRegion {
    DeviceRegion {
        path: path.into(),
        offset: 1 << 20,
        len: blocks * 65536,
    }
}

#[test]
fn wrong_magic_or_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dev-0.shm");
    DeviceSeg::create(&p, 0, &region("/dev/x", 8), 65536, FreeMode::Bitmap).unwrap();
    // Attaching as another kind of segment: wrong magic.
    let e = ProcSeg::attach(&p).unwrap_err();
    assert!(matches!(e, AllocError::BadSegment { .. }), "{e}");
    assert!(e.to_string().contains("wrong magic"), "{e}");
    // Bump the version word: refused with a version message.
    let seg = Segment::attach(&p, DEV_MAGIC).unwrap();
    seg.u64_at(8).store(99, Ordering::SeqCst);
    let e = DeviceSeg::attach(&p).unwrap_err();
    assert!(e.to_string().contains("version 99"), "{e}");
    // A truncated file is refused too.
    let q = dir.path().join("short.shm");
    std::fs::write(&q, b"short").unwrap();
    assert!(matches!(
        DeviceSeg::attach(&q),
        Err(AllocError::BadSegment { .. })
    ));
    // Creating over an existing segment fails instead of clobbering it.
    let e = UnfilledSeg::create(&p, 4).unwrap_err();
    assert!(matches!(e, AllocError::AlreadyExists { .. }), "{e}");
}

#[test]
fn lock_free_bitmap_never_hands_out_a_block_twice() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dev-0.shm");
    let n = 64u32;
    let d = Arc::new(
        DeviceSeg::create(&p, 0, &region("/dev/x", n as u64), 65536, FreeMode::Bitmap).unwrap(),
    );
    let owned: Arc<Vec<AtomicU8>> = Arc::new((0..n).map(|_| AtomicU8::new(0)).collect());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let d = d.clone();
            let owned = owned.clone();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                // All threads start on the same word, so they contend for its bits.
                let mut hint = 0u32;
                for i in 0..50_000u32 {
                    if (i + t) % 3 != 0 || held.is_empty() {
                        if let Some(b) = d.pop_bitmap(&mut hint) {
                            let prev = owned[b as usize].fetch_add(1, Ordering::SeqCst);
                            assert_eq!(prev, 0, "block {b} handed out twice");
                            held.push(b);
                        }
                    } else {
                        let b = held.swap_remove((i as usize * 7) % held.len());
                        owned[b as usize].fetch_sub(1, Ordering::SeqCst);
                        d.push_bitmap(b);
                    }
                }
                for b in held {
                    owned[b as usize].fetch_sub(1, Ordering::SeqCst);
                    d.push_bitmap(b);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut members = d.free_members();
    members.sort();
    assert_eq!(
        members,
        (0..n).collect::<Vec<_>>(),
        "every block back exactly once"
    );
}

#[test]
fn robust_lock_survives_a_holder_that_died() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("unfilled.shm");
    let t = Arc::new(UnfilledSeg::create(&p, 8).unwrap());
    let t2 = t.clone();
    // A thread takes the lock and ends without releasing it (as a killed process would).
    std::thread::spawn(move || std::mem::forget(t2.lock().unwrap()))
        .join()
        .unwrap();
    let g = t.lock().unwrap();
    assert!(g.previous_owner_died());
    drop(g);
    let g = t.lock().unwrap();
    assert!(!g.previous_owner_died());
}

fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[test]
fn recovery_returns_a_dead_process_in_flight_block_and_a_popped_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = NodeConfig {
        dir: dir.path().join("node"),
        internal_port: free_port(),
        proc_id: 1,
        strategy: Strategy::Shm,
        block_size: 65536,
        devices: vec![region("/dev/a", 16), region("/dev/b", 16)],
        unfilled_capacity: 16,
    };
    let p = NodeProcess::start(cfg.clone()).unwrap();
    assert!(p.is_leader());
    // The node uses the asymmetric fence exactly when the kernel has the global membarrier
    // (recovery below then exercises it).
    use rustix::thread::{membarrier_query, MembarrierCommand};
    assert_eq!(
        p.at.asym,
        membarrier_query().contains_command(MembarrierCommand::Global)
    );
    eprintln!("asymmetric fence: {}", p.at.asym);
    let mut a = p.allocator().unwrap();
    let kept = a.alloc(0).unwrap();
    a.commit(kept, 4096).unwrap();
    // A second process (id 7) that died: one block in flight, one popped but never marked.
    let rec = ProcSeg::create(&proc_path(&cfg.dir, 7), 7).unwrap();
    rec.pid().store(dead_pid() as u64, Ordering::SeqCst);
    let d = p.at.device(1).unwrap();
    let inflight = d.pop_bitmap(&mut 0).unwrap();
    d.set_state(
        inflight,
        BlockState::InFlight {
            owner: 7,
            prior_units: 0,
        },
    );
    rec.current().store(
        BlockRef {
            dev: 1,
            block: inflight,
        }
        .pack(),
        Ordering::SeqCst,
    );
    let popped = d.pop_bitmap(&mut 0).unwrap();
    let records = [Record {
        block: kept,
        offset: 0,
        len: 4096,
    }];
    let before = audit(&p.at, &records).unwrap();
    assert_eq!(before.leaked_blocks, 1, "{before:?}"); // the popped-unmarked block
    assert_eq!(before.double_allocated, 0);
    let got = recovery::recover_dead(&p.at).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].1.freed,
        vec![BlockRef {
            dev: 1,
            block: inflight
        }]
    );
    assert_eq!(
        got[0].1.rebuilt_free, 1,
        "block {popped} put back by the rebuild"
    );
    assert_eq!(rec.recovered().load(Ordering::SeqCst), 1);
    assert_eq!(
        BlockRef::unpack(rec.last_recovered().load(Ordering::SeqCst)),
        Some(BlockRef {
            dev: 1,
            block: inflight
        })
    );
    let after = audit(&p.at, &records).unwrap();
    assert_eq!(after.leaked_blocks, 0, "{after:?}");
    assert_eq!(after.double_allocated, 0, "{after:?}");
    assert_eq!(after.free, 31);
    assert_eq!(after.in_use, 1);
    // Freeing a block twice is refused.
    a.free(kept).unwrap();
    assert!(matches!(a.free(kept), Err(AllocError::NotHeld { .. })));
}

#[test]
fn full_device_and_offline_device_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = NodeConfig {
        dir: dir.path().join("node"),
        internal_port: free_port(),
        proc_id: 1,
        strategy: Strategy::Mutex,
        block_size: 65536,
        devices: vec![region("/dev/a", 2), region("/dev/b", 4)],
        unfilled_capacity: 16,
    };
    let p = NodeProcess::start(cfg).unwrap();
    let mut a = p.allocator().unwrap();
    a.alloc(0).unwrap();
    a.alloc(0).unwrap();
    let e = a.alloc(0).unwrap_err();
    assert!(matches!(e, AllocError::DeviceFull { dev: 0 }), "{e}");
    assert!(e.to_string().contains("device full"));
    p.device_offline(1).unwrap();
    let e = a.alloc(1).unwrap_err();
    assert!(matches!(e, AllocError::DeviceOffline { dev: 1 }), "{e}");
    assert!(matches!(a.alloc(9), Err(AllocError::NoDevice { dev: 9 })));
    // A device that comes online gets a new segment and can be used at once.
    let i = p.device_online(&region("/dev/c", 3)).unwrap();
    assert_eq!(i, 2);
    a.alloc(i).unwrap();
    let e: AllocError = "nope".parse::<Strategy>().unwrap_err();
    assert!(e.to_string().contains("unknown strategy"));
}

#[test]
fn blocks_go_into_the_data_region_of_a_formatted_device_else_after_the_first_mib() {
    use blocklab::alloc::region::{region_of, RegionSource, RAW_OFFSET};
    use blocklab::dev::{Device, IoEngine, UringEngine};
    use blocklab::format::{Label, Layout, LayoutParams};
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let p = dir.path().join("dev.img");
    let size = 64u64 << 20;
    sparse_file(&p, size);
    let dev = Device::open(&p).unwrap();
    let mut eng = UringEngine::with_queue_depth(1).unwrap();
    let (r, src) = region_of(&mut eng, &dev, 65536).unwrap();
    assert_eq!(src, RegionSource::Raw);
    assert_eq!(r.offset, RAW_OFFSET);
    assert_eq!(r.len, size - RAW_OFFSET);
    // A formatted device (ready label at offset 0): its data region.
    let layout = Layout::compute(size, LayoutParams::default()).unwrap();
    let label = Label {
        flags: 0,
        cluster_fsid: uuid::Uuid::from_u128(1),
        daemon_id: 3,
        daemon_uuid: uuid::Uuid::from_u128(2),
        birth_time_unix_ns: 0,
        layout: layout.clone(),
    }
    .with_ready(true);
    let buf = blocklab::dev::AlignedBuf::from_slice(&label.encode());
    eng.write_at(&dev, 0, &buf).unwrap();
    let (r, src) = region_of(&mut eng, &dev, 65536).unwrap();
    assert_eq!(src, RegionSource::Formatted { daemon_id: 3 });
    assert!(r.offset >= layout.data_offset);
    assert!(r.offset + r.len <= layout.data_offset + layout.data_len);
    assert_eq!(r.len % 65536, 0);
    assert!(r.len > 0);
}

#[test]
fn bitmap_hands_out_each_block_once_then_reports_full() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dev-0.shm");
    // 100 blocks: two words, the second with 28 bits past the end that must never count.
    let d = DeviceSeg::create(&p, 0, &region("/dev/x", 100), 65536, FreeMode::Bitmap).unwrap();
    assert_eq!(d.words(), 2);
    let mut hint = 1; // start in the second word: the search wraps to the first
    let mut got: Vec<u32> = (0..100).map(|_| d.pop_bitmap(&mut hint).unwrap()).collect();
    assert_eq!(d.pop_bitmap(&mut hint), None, "all 100 taken: full");
    assert_eq!(
        &got[..36],
        &(64..100).collect::<Vec<_>>()[..],
        "hint word first"
    );
    got.sort();
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    assert!(d.free_members().is_empty());
    d.push_bitmap(42);
    assert_eq!(d.free_members(), vec![42]);
    assert_eq!(d.pop_bitmap(&mut hint), Some(42));
    assert_eq!(hint, 0, "the hint follows the word of the last claim");
    // An out-of-range hint is treated as word 0, not an error.
    d.push_bitmap(7);
    assert_eq!(d.pop_bitmap(&mut 1000), Some(7));
}

#[test]
fn processes_start_their_bitmap_search_on_different_words() {
    use blocklab::alloc::segs::spread_hint;
    for words in [8u32, 64, 1024] {
        let starts: std::collections::HashSet<u32> =
            (0..8u16).map(|p| spread_hint(p, words)).collect();
        assert_eq!(starts.len(), 8, "{words} words: {starts:?}");
        assert!(starts.iter().all(|&w| w < words));
    }
    assert_eq!(spread_hint(5, 1), 0);
}
