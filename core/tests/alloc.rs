//! In-process tests of core::alloc: segment validation, the lock-free bitmap under
//! concurrent threads, the robust lock, recovery, the audit, device regions and indexes,
//! and bad requests on the JSON-line ports. Multi-process tests (real OS processes) live
//! in `experiments/tests/alloc*.rs`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use blocklab::alloc::attached::{central_socket, proc_path, Attached};
use blocklab::alloc::audit::{audit, Record};
use blocklab::alloc::central::CentralClient;
use blocklab::alloc::index::IndexServer;
use blocklab::alloc::node::{NodeConfig, NodeProcess};
use blocklab::alloc::recovery;
use blocklab::alloc::region::{region_of, resolve, RegionSource, RAW_OFFSET};
use blocklab::alloc::segs::{
    spread_hint, DeviceSeg, FreeMode, ProcSeg, Unfilled, UnfilledSeg, DEV_MAGIC, WORDS_PER_LINE,
};
use blocklab::alloc::shm::Segment;
use blocklab::alloc::store::StoreService;
use blocklab::alloc::wire::MAX_REQUEST_LINE;
use blocklab::alloc::{
    AllocError, BlockAllocator, BlockRef, BlockState, ByteRange, DeviceRegion, DeviceSpec,
    LocalAllocator, Strategy,
};
use blocklab::dev::{Device, IoEngine, UringEngine};
use blocklab::testing::{free_port, region_file, scratch, scratch_dir, sparse_file};

const BLOCK: u64 = 65536;

/// A region that is never opened (segment-level tests).
fn region(path: &str, blocks: u64) -> DeviceRegion {
    blocklab::testing::region(path, blocks, BLOCK)
}

/// A sparse file with room for `blocks` blocks after its first MiB, named by path (the
/// leader resolves it to exactly those blocks).
fn dev_file(dir: &Path, name: &str, blocks: u64) -> DeviceSpec {
    DeviceSpec::path(region_file(&dir.join(name), blocks, BLOCK))
}

/// A scratch directory and a node configuration with one device file `a` of `blocks`
/// blocks in it.
fn one_device(strategy: Strategy, blocks: u64) -> (tempfile::TempDir, NodeConfig) {
    let files = scratch_dir("blocklab-alloc-t-");
    let cfg = config(
        files.path(),
        strategy,
        vec![dev_file(files.path(), "a", blocks)],
    );
    (files, cfg)
}

fn config(dir: &Path, strategy: Strategy, devices: Vec<DeviceSpec>) -> NodeConfig {
    NodeConfig {
        dir: dir.join("node"),
        internal_port: free_port(),
        proc_id: 1,
        strategy,
        block_size: BLOCK,
        devices,
        unfilled_capacity: 16,
    }
}

/// A record for process `id` as a second process would have it (no owner lock held:
/// to liveness checks it is a process that is gone).
fn other_process(at: &Arc<Attached>, id: u16) -> (Arc<ProcSeg>, LocalAllocator) {
    let me = Arc::new(ProcSeg::create(&proc_path(&at.dir, id), id).unwrap());
    let a = LocalAllocator::new(at.clone(), me.clone(), Strategy::Shm);
    (me, a)
}

#[test]
fn wrong_magic_or_version_is_refused() {
    let dir = scratch();
    let p = dir.path().join("dev-0.shm");
    DeviceSeg::create(&p, 0, 0, &region("/dev/x", 8), BLOCK, FreeMode::Bitmap).unwrap();
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
fn a_device_segment_appears_with_its_free_structure_complete() {
    let dir = scratch();
    for (mode, name) in [(FreeMode::Bitmap, "b.shm"), (FreeMode::Locked, "l.shm")] {
        let p = dir.path().join(name);
        DeviceSeg::create(&p, 0, 0, &region("/dev/x", 100), BLOCK, mode).unwrap();
        // Whoever attaches the published file sees every block free, and nothing else.
        let d = DeviceSeg::attach(&p).unwrap();
        let mut members = d.free_members();
        members.sort();
        assert_eq!(members, (0..100).collect::<Vec<_>>(), "{mode:?}");
        assert_eq!(d.free_count(), 100, "{mode:?}");
        assert!(d.tail_bits_set(), "{mode:?}");
        if mode == FreeMode::Locked {
            assert_eq!(d.claim_locked().unwrap(), Some(0), "block 0 first out");
        }
    }
    // The bitmap is sized by its mode: 2 words for 100 blocks, not 4 bytes a block.
    let small = std::fs::metadata(dir.path().join("b.shm")).unwrap().len();
    let big = std::fs::metadata(dir.path().join("l.shm")).unwrap().len();
    assert!(small <= big, "{small} vs {big}");
}

#[test]
fn lock_free_bitmap_never_hands_out_a_block_twice() {
    let dir = scratch();
    let p = dir.path().join("dev-0.shm");
    let n = 64u32;
    let d = Arc::new(
        DeviceSeg::create(
            &p,
            0,
            0,
            &region("/dev/x", n as u64),
            BLOCK,
            FreeMode::Bitmap,
        )
        .unwrap(),
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
                        if let Some(b) = d.claim_bitmap(&mut hint, 1) {
                            let prev = owned[b as usize].fetch_add(1, Ordering::SeqCst);
                            assert_eq!(prev, 0, "block {b} handed out twice");
                            held.push(b);
                        }
                    } else {
                        let b = held.swap_remove((i as usize * 7) % held.len());
                        owned[b as usize].fetch_sub(1, Ordering::SeqCst);
                        d.release_bitmap(b);
                    }
                }
                for b in held {
                    owned[b as usize].fetch_sub(1, Ordering::SeqCst);
                    d.release_bitmap(b);
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
    let dir = scratch();
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

#[test]
fn recovery_returns_a_dead_process_in_flight_block_and_a_claimed_one() {
    let files = scratch_dir("blocklab-alloc-t-");
    let cfg = config(
        files.path(),
        Strategy::Shm,
        vec![
            dev_file(files.path(), "a", 16),
            dev_file(files.path(), "b", 16),
        ],
    );
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
    // A second process (id 7) that died: one block in flight, one claimed but never
    // marked. Its record names pid 1, which is alive: a reused pid must not make a dead
    // process look alive (liveness is its owner lock, which nobody holds).
    let rec = ProcSeg::create(&proc_path(&cfg.dir, 7), 7).unwrap();
    rec.pid().store(1, Ordering::SeqCst);
    let d = p.at.device(1).unwrap();
    let inflight = d.claim_bitmap(&mut 0, 7).unwrap();
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
    let claimed = d.claim_bitmap(&mut 0, 7).unwrap();
    let records = [Record {
        block: kept,
        offset: 0,
        len: 4096,
    }];
    let before = audit(&p.at, &records).unwrap();
    assert_eq!(before.leaked_blocks, 1, "{before:?}"); // the claimed-unmarked block
    assert_eq!(before.double_allocated, 0);
    // The double-allocation counter counts: the same bytes recorded by two owners.
    let twice = audit(&p.at, &[records[0], records[0]]).unwrap();
    assert_eq!(twice.double_allocated, 1, "{twice:?}");
    let got = recovery::recover_dead(&p.at).unwrap();
    assert_eq!(
        got.procs,
        vec![7],
        "only the dead process (the leader holds its lock)"
    );
    assert_eq!(
        got.freed,
        vec![BlockRef {
            dev: 1,
            block: inflight
        }]
    );
    assert_eq!(
        got.rebuilt_free, 1,
        "block {claimed} put back by the rebuild"
    );
    assert_eq!(rec.recovered().load(Ordering::SeqCst), 1);
    assert_eq!(
        rec.pid().load(Ordering::SeqCst),
        0,
        "recovered records say so"
    );
    assert_eq!(
        BlockRef::unpack(rec.last_recovered().load(Ordering::SeqCst)),
        Some(BlockRef {
            dev: 1,
            block: inflight
        })
    );
    // Once recovered, a second pass finds nothing to do.
    assert_eq!(
        recovery::recover_dead(&p.at).unwrap().procs,
        Vec::<u16>::new()
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
fn only_the_owner_frees_an_in_flight_block_and_freeing_a_filled_one_drops_its_table_entry() {
    let (_files, cfg) = one_device(Strategy::Shm, 16);
    let p = NodeProcess::start(cfg).unwrap();
    let mut mine = p.allocator().unwrap();
    let (_rec, mut other) = other_process(&p.at, 5);
    let theirs = other.alloc(0).unwrap();
    let e = mine.free(theirs).unwrap_err();
    assert!(matches!(e, AllocError::NotHeld { .. }), "{e}");
    assert_eq!(
        p.at.device(0).unwrap().load_state(theirs.block),
        BlockState::InFlight {
            owner: 5,
            prior_units: 0
        }
    );
    other.free(theirs).unwrap();
    // A filled block with room is in the unfilled table; freeing it removes the entry.
    let b = mine.alloc(0).unwrap();
    mine.commit(b, 4096).unwrap();
    {
        let _l = p.at.unfilled.lock().unwrap();
        p.at.unfilled.put(Unfilled {
            block: b,
            used_units: 1,
        });
    }
    other.free(b).unwrap();
    assert!(p.at.unfilled.entries().is_empty());
    let rep = audit(&p.at, &[]).unwrap();
    assert_eq!((rep.free, rep.leaked_blocks), (16, 0), "{rep:?}");
}

#[test]
fn full_device_and_offline_device_give_clear_errors() {
    let files = scratch_dir("blocklab-alloc-t-");
    let cfg = config(
        files.path(),
        Strategy::Mutex,
        vec![
            dev_file(files.path(), "a", 2),
            dev_file(files.path(), "b", 4),
        ],
    );
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
    let i = p.device_online(&dev_file(files.path(), "c", 3)).unwrap();
    assert_eq!(i, 2, "indexes are handed out in order first");
    a.alloc(i).unwrap();
    let e = "nope".parse::<Strategy>().unwrap_err();
    assert!(e.to_string().contains("unknown strategy"));
}

#[test]
fn device_indexes_are_reused_and_other_processes_follow_the_new_segment() {
    let (files, cfg) = one_device(Strategy::Shm, 4);
    let p = NodeProcess::start(cfg.clone()).unwrap();
    // Another process's view of the node, opened before any of the churn.
    let at2 = Arc::new(Attached::open(&cfg.dir).unwrap());
    let (_rec, mut other) = other_process(&at2, 9);
    let spare = dev_file(files.path(), "spare", 4);
    let mut reused = false;
    // More online events than a node has device indexes.
    for round in 0..80u64 {
        let i = p.device_online(&spare).unwrap();
        let d = p.at.device(i).unwrap();
        assert_eq!(d.serial(), round + 1, "round {round}");
        reused |= (i as u64) < round + 1;
        // The other process allocates from the new segment, not its old mapping.
        let b = other.alloc(i).unwrap();
        assert_eq!(at2.device(i).unwrap().serial(), d.serial());
        assert_eq!(
            d.load_state(b.block),
            BlockState::InFlight {
                owner: 9,
                prior_units: 0
            }
        );
        other.free(b).unwrap();
        p.device_offline(i).unwrap();
    }
    assert!(reused, "indexes were reused once all had been handed out");
    let rep = audit(&p.at, &[]).unwrap();
    assert_eq!((rep.leaked_blocks, rep.double_allocated), (0, 0), "{rep:?}");
}

#[test]
fn bad_settings_are_refused_before_the_node_directory_is_touched() {
    let (_files, mut cfg) = one_device(Strategy::Shm, 4);
    cfg.block_size = 1000;
    let e = NodeProcess::start(cfg.clone()).unwrap_err();
    assert!(e.to_string().contains("block size 1000"), "{e}");
    assert!(!cfg.dir.exists(), "nothing created");
    // The same directory then works with a good block size...
    cfg.block_size = BLOCK;
    let p = NodeProcess::start(cfg.clone()).unwrap();
    assert!(p.is_leader());
    // ...and a follower of another strategy or block size is refused, like a leader.
    for (strategy, bs) in [(Strategy::Mutex, BLOCK), (Strategy::Shm, 2 * BLOCK)] {
        let f = NodeConfig {
            proc_id: 2,
            strategy,
            block_size: bs,
            ..cfg.clone()
        };
        let e = NodeProcess::start(f).unwrap_err();
        assert!(e.to_string().contains("node was created with"), "{e}");
    }
}

#[test]
fn blocks_go_into_the_data_region_of_a_formatted_device_else_after_the_first_mib() {
    use blocklab::format::{Label, Layout, LayoutParams};
    let dir = scratch_dir("blocklab-alloc-t-");
    let p = dir.path().join("dev.img");
    let size = 64u64 << 20;
    sparse_file(&p, size);
    let dev = Device::open(&p).unwrap();
    let mut eng = UringEngine::with_queue_depth(1).unwrap();
    let (r, src) = region_of(&mut eng, &dev, BLOCK).unwrap();
    assert_eq!(src, RegionSource::Raw);
    assert_eq!(r.offset, RAW_OFFSET);
    assert_eq!(r.len, size - RAW_OFFSET);
    let explicit = |offset, len| DeviceSpec {
        path: p.clone(),
        range: Some(ByteRange { offset, len }),
    };
    // An explicit region is checked against the same rule.
    assert_eq!(
        resolve(&explicit(2 << 20, 4 * BLOCK), BLOCK)
            .unwrap()
            .0
            .offset,
        2 << 20
    );
    let e = resolve(&explicit(0, 4 * BLOCK), BLOCK).unwrap_err();
    assert!(e.to_string().contains("overlaps the first MiB"), "{e}");
    let e = resolve(&explicit(60 << 20, 8 << 20), BLOCK).unwrap_err();
    assert!(e.to_string().contains("past the end of the device"), "{e}");
    let e = resolve(&explicit((2 << 20) + 512, 4 * BLOCK), BLOCK).unwrap_err();
    assert!(e.to_string().contains("not a multiple"), "{e}");
    let e = resolve(&DeviceSpec::path("/nonexistent/dev"), BLOCK).unwrap_err();
    assert!(e.to_string().contains("no such file"), "{e}");
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
    let (r, src) = region_of(&mut eng, &dev, BLOCK).unwrap();
    assert_eq!(src, RegionSource::Formatted { daemon_id: 3 });
    assert!(r.offset >= layout.data_offset);
    assert!(r.offset + r.len <= layout.data_offset + layout.data_len);
    assert_eq!(r.len % BLOCK, 0);
    assert!(r.len > 0);
    // By path, the node's leader puts the blocks there too; an explicit region over the
    // daemon's metadata is refused.
    assert_eq!(resolve(&DeviceSpec::path(&p), BLOCK).unwrap().0, r);
    let e = resolve(&explicit(RAW_OFFSET, 4 * BLOCK), BLOCK).unwrap_err();
    assert!(e.to_string().contains("daemon 3's label"), "{e}");
    // A node refuses such a device with that message, and creates nothing for it.
    let (_files, cfg) = one_device(Strategy::Shm, 4);
    let node = NodeProcess::start(cfg.clone()).unwrap();
    let e = node
        .device_online(&explicit(RAW_OFFSET, 4 * BLOCK))
        .unwrap_err();
    assert!(e.to_string().contains("daemon 3's label"), "{e}");
    assert_eq!(node.at.online_devices(), vec![0]);
}

#[test]
fn bitmap_hands_out_each_block_once_then_reports_full() {
    let dir = scratch();
    let p = dir.path().join("dev-0.shm");
    // 100 blocks: two words, the second with 28 bits past the end that must never count.
    let d = DeviceSeg::create(&p, 0, 0, &region("/dev/x", 100), BLOCK, FreeMode::Bitmap).unwrap();
    assert_eq!(d.words(), 2);
    let mut hint = 1; // start in the second word: the search wraps to the first
    let mut got: Vec<u32> = (0..100)
        .map(|_| d.claim_bitmap(&mut hint, 1).unwrap())
        .collect();
    assert_eq!(d.claim_bitmap(&mut hint, 1), None, "all 100 taken: full");
    assert_eq!(
        &got[..36],
        &(64..100).collect::<Vec<_>>()[..],
        "hint word first"
    );
    got.sort();
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    assert!(d.free_members().is_empty());
    assert_eq!(d.free_count(), 0);
    d.release_bitmap(42);
    assert_eq!(d.free_members(), vec![42]);
    assert_eq!(d.claim_bitmap(&mut hint, 1), Some(42));
    assert_eq!(hint, 0, "the hint follows the word of the last claim");
    // An out-of-range hint starts at the process's spread hint instead.
    d.release_bitmap(7);
    assert_eq!(d.claim_bitmap(&mut 1000, 1), Some(7));
    // The audit notices a cleared bit past the last block.
    d.release_bitmap(100);
    assert!(!d.tail_bits_set());
}

#[test]
fn processes_start_their_bitmap_search_on_different_cache_lines() {
    // Node process ids are 1..=N.
    let ids = 1..=8u16;
    for words in [64u32, 100, 1024, 4096] {
        let lines: std::collections::HashSet<u32> = ids
            .clone()
            .map(|p| spread_hint(p, words) / WORDS_PER_LINE)
            .collect();
        assert_eq!(lines.len(), 8, "{words} words: {lines:?}");
        assert!(ids.clone().all(|p| spread_hint(p, words) < words));
    }
    // Fewer lines than processes: distinct words at least.
    for words in [8u32, 16, 40] {
        let starts: std::collections::HashSet<u32> =
            ids.clone().map(|p| spread_hint(p, words)).collect();
        assert_eq!(starts.len(), 8, "{words} words: {starts:?}");
        assert!(starts.iter().all(|&w| w < words));
    }
    assert_eq!(spread_hint(5, 1), 0);
}

#[test]
fn a_central_caller_must_be_the_process_it_claims_to_be() {
    let (_files, cfg) = one_device(Strategy::Central, 4);
    let p = NodeProcess::start(cfg.clone()).unwrap();
    let mut a = p.allocator().unwrap();
    let b = a.alloc(0).unwrap();
    a.free(b).unwrap();
    // Process 5's record names pid 1; this process says it is process 5.
    let rec = Arc::new(ProcSeg::create(&proc_path(&cfg.dir, 5), 5).unwrap());
    rec.pid().store(1, Ordering::SeqCst);
    let e = CentralClient::connect(&central_socket(&cfg.dir), p.at.clone(), rec).unwrap_err();
    assert!(e.to_string().contains("registered as pid 1"), "{e}");
    // The server's errors arrive with their text.
    let e = a.alloc(40).unwrap_err();
    assert!(matches!(e, AllocError::NoDevice { dev: 40 }), "{e}");
}

/// Sends `line` and reads one JSON reply line.
fn ask(s: &mut TcpStream, r: &mut BufReader<TcpStream>, line: &[u8]) -> serde_json::Value {
    s.write_all(line).unwrap();
    let mut rep = String::new();
    r.read_line(&mut rep).unwrap();
    serde_json::from_str(&rep).unwrap_or_else(|e| panic!("{rep:?}: {e}"))
}

fn connect(addr: &str) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(addr).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

#[test]
fn bad_requests_get_a_bad_request_reply_and_the_connection_stays_usable() {
    let (_files, cfg) = one_device(Strategy::Shm, 8);
    let index = IndexServer::start("127.0.0.1:0").unwrap().addr.to_string();
    let p = Arc::new(NodeProcess::start(cfg.clone()).unwrap());
    let svc = Arc::new(StoreService::new(p.clone(), "n", &index).unwrap());
    let ep = svc
        .serve(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let internal = format!("127.0.0.1:{}", cfg.internal_port);
    let valid: [(&str, &[u8]); 3] = [
        (
            internal.as_str(),
            b"{\"op\":\"device_offline\",\"dev\":9}\n",
        ),
        (index.as_str(), b"{\"op\":\"records\"}\n"),
        (
            ep.as_str(),
            b"{\"op\":\"store\",\"channel\":1,\"len\":5}\nhello",
        ),
    ];
    for (addr, good) in valid {
        let (mut s, mut r) = connect(addr);
        for bad in [&b"not json\n"[..], b"{\"op\":\"nope\"}\n"] {
            let rep = ask(&mut s, &mut r, bad);
            assert_eq!(rep["ok"], false, "{addr}: {rep}");
            assert_eq!(rep["kind"], "bad_request", "{addr}: {rep}");
            assert!(
                rep["error"].as_str().unwrap().contains("malformed"),
                "{rep}"
            );
        }
        // The same connection answers a valid request.
        let rep = ask(&mut s, &mut r, good);
        assert_ne!(rep["kind"], "bad_request", "{addr}: {rep}");
        // A line over the limit: answered, then the connection closes.
        let rep = ask(&mut s, &mut r, &vec![b'x'; MAX_REQUEST_LINE + 1]);
        assert_eq!(rep["kind"], "bad_request", "{addr}: {rep}");
        let mut rest = String::new();
        assert_eq!(r.read_line(&mut rest).unwrap_or(0), 0, "{addr}: closed");
    }
    // The store went through: channel 1 is recorded.
    let got = blocklab::alloc::store::client_fetch(&index, 1).unwrap();
    assert_eq!(got, vec![b"hello".to_vec()]);
}

#[test]
fn a_stale_unfilled_entry_is_dropped_instead_of_appended_to() {
    let (_files, cfg) = one_device(Strategy::Shm, 8);
    let index = IndexServer::start("127.0.0.1:0").unwrap().addr.to_string();
    let p = Arc::new(NodeProcess::start(cfg).unwrap());
    let svc = StoreService::new(p.clone(), "n", &index).unwrap();
    // An entry for block 5, which is free (freed after the entry was made).
    let stale = BlockRef { dev: 0, block: 5 };
    {
        let _l = p.at.unfilled.lock().unwrap();
        p.at.unfilled.put(Unfilled {
            block: stale,
            used_units: 1,
        });
    }
    // The store cannot be recorded: no index listens there. The block it used is freed.
    let dead = format!("127.0.0.1:{}", free_port());
    let unrecorded = StoreService::new(p.clone(), "n", &dead).unwrap();
    assert!(unrecorded.store(1, b"lost").is_err());
    assert!(p.at.unfilled.entries().is_empty(), "stale entry dropped");
    let rep = audit(&p.at, &[]).unwrap();
    assert_eq!(
        (rep.free, rep.leaked_blocks),
        (8, 0),
        "nothing kept: {rep:?}"
    );
    // A recorded store keeps its block and offers the rest of it.
    let loc = svc.store(2, b"kept").unwrap();
    assert_eq!(loc.offset_in_block, 0);
    let b = BlockRef {
        dev: 0,
        block: loc.block,
    };
    let entries = |p: &NodeProcess| -> Vec<Unfilled> {
        p.at.unfilled.entries().into_iter().map(|e| e.1).collect()
    };
    let kept = Unfilled {
        block: b,
        used_units: 1,
    };
    assert_eq!(entries(&p), vec![kept]);
    // An unrecorded append to it goes back to what was acknowledged before.
    assert!(unrecorded.store(3, b"lost too").is_err());
    assert_eq!(entries(&p), vec![kept]);
    assert_eq!(
        p.at.device(0).unwrap().load_state(b.block),
        BlockState::Filled { used_units: 1 }
    );
    let rec = [Record {
        block: b,
        offset: 0,
        len: 4,
    }];
    let rep = audit(&p.at, &rec).unwrap();
    assert_eq!((rep.in_use, rep.leaked_blocks), (1, 0), "{rep:?}");
}

#[test]
fn concurrent_requests_for_one_device_create_one_segment() {
    let (files, cfg) = one_device(Strategy::Shm, 4);
    let p = Arc::new(NodeProcess::start(cfg).unwrap());
    let spec = dev_file(files.path(), "b", 4);
    for _ in 0..5 {
        let got: Vec<u16> = (0..4)
            .map(|_| {
                let (p, spec) = (p.clone(), spec.clone());
                std::thread::spawn(move || p.device_online(&spec).unwrap())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert!(got.iter().all(|&i| i == got[0]), "{got:?}");
        assert_eq!(p.at.online_devices().len(), 2, "one segment for the device");
        p.device_offline(got[0]).unwrap();
    }
}
