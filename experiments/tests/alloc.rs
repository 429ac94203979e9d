//! Multi-process tests of the shared-memory allocator: every node process is a real OS
//! process (`blocklab alloc worker`), killed with SIGKILL where a test says so.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use blocklab::alloc::attached::{proc_path, Attached};
use blocklab::alloc::audit::{audit, AuditReport, Record};
use blocklab::alloc::segs::ProcSeg;
use blocklab::alloc::{BlockRef, DeviceRegion, DeviceSpec, Strategy};
use blocklab::dev::{AlignedBuf, Device, IoEngine, UringEngine};
use blocklab::testing::{free_port, regions_of, scratch, sparse_files, wait_for, LoopDevices};
use harness::cli::alloc::{NodeArgs, WorkerEvent, WorkerProc, WorkerSpec};

const WAIT: Duration = Duration::from_secs(60);
const BLOCK: u64 = 64 << 10;

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blocklab"))
}

/// Block regions (after the first MiB) of devices of `size` bytes.
fn regions(paths: Vec<PathBuf>, size: u64) -> Vec<DeviceRegion> {
    regions_of(&paths, size, BLOCK)
}

/// Sparse regular files as devices (O_DIRECT works on them).
fn file_devices(dir: &Path, n: usize, size: u64) -> Vec<DeviceRegion> {
    regions(sparse_files(dir, n, size), size)
}

fn loop_regions(g: &LoopDevices, size: u64) -> Vec<DeviceRegion> {
    regions(g.paths(), size)
}

fn spec(
    node_dir: &Path,
    strategy: Strategy,
    devices: Vec<DeviceRegion>,
    seconds: f64,
    with_io: bool,
    hold: usize,
) -> WorkerSpec {
    WorkerSpec {
        exe: exe(),
        node: NodeArgs {
            dir: node_dir.to_path_buf(),
            proc_id: 0,
            internal_port: free_port(),
            strategy,
            block_size: BLOCK,
            devices: devices.iter().map(DeviceSpec::region).collect(),
            unfilled_capacity: 64,
        },
        duration: Duration::from_secs_f64(seconds),
        with_io,
        hold,
    }
}

fn shm_dir() -> tempfile::TempDir {
    blocklab::testing::shm_dir("blocklab-alloc-test-")
}

/// Spawns `n` workers at once and waits until each is ready.
fn start(spec: &WorkerSpec, n: u16) -> (Vec<WorkerProc>, Vec<(u16, bool, usize)>) {
    let mut ws: Vec<WorkerProc> = (1..=n)
        .map(|i| WorkerProc::spawn(spec, i).unwrap())
        .collect();
    let mut ready = Vec::new();
    for w in &mut ws {
        match w.event(WAIT).unwrap() {
            WorkerEvent::Ready {
                proc_id,
                leader,
                recovered,
                ..
            } => ready.push((proc_id, leader, recovered)),
            e => panic!("unexpected {e:?}"),
        }
    }
    (ws, ready)
}

fn leader_of(ready: &[(u16, bool, usize)]) -> u16 {
    let leaders: Vec<u16> = ready.iter().filter(|r| r.1).map(|r| r.0).collect();
    assert_eq!(leaders.len(), 1, "exactly one leader: {ready:?}");
    leaders[0]
}

/// Collects every worker's `done`; returns (total ops, held blocks).
fn collect(ws: &mut [WorkerProc], seconds: f64) -> (u64, Vec<BlockRef>) {
    let (mut ops, mut held) = (0, Vec::new());
    for w in ws.iter_mut() {
        match w.event(WAIT + Duration::from_secs_f64(seconds)).unwrap() {
            WorkerEvent::Done {
                ops: o, held: h, ..
            } => {
                ops += o;
                held.extend(h);
            }
            e => panic!("unexpected {e:?}"),
        }
    }
    (ops, held)
}

fn audit_node(dir: &Path, held: &[BlockRef]) -> AuditReport {
    let at = Attached::open(dir).unwrap();
    let recs: Vec<Record> = held
        .iter()
        .map(|&b| Record {
            block: b,
            offset: 0,
            len: 4096,
        })
        .collect();
    audit(&at, &recs).unwrap()
}

/// Closes every worker, the node's current leader last (it serves the others).
fn finish(mut ws: Vec<WorkerProc>, node_dir: &Path) {
    let at = Attached::open(node_dir).unwrap();
    let leader_pid = at.node.leader_pid().load(Ordering::SeqCst) as u32;
    ws.sort_by_key(|w| w.pid() == leader_pid);
    for w in ws {
        w.finish().unwrap();
    }
}

#[test]
fn processes_allocating_and_freeing_concurrently_never_share_a_block() {
    let files = scratch();
    for strategy in Strategy::ALL {
        let node = shm_dir();
        let devs = file_devices(files.path(), 2, 8 << 20);
        let blocks_total: u64 = devs.iter().map(|d| d.len / BLOCK).sum();
        let s = spec(node.path(), strategy, devs, 0.5, false, 3);
        let (mut ws, ready) = start(&s, 4);
        leader_of(&ready);
        for w in &mut ws {
            w.go().unwrap();
        }
        let (ops, held) = collect(&mut ws, 0.5);
        assert!(ops > 0, "{strategy}: no operation completed");
        let mut sorted = held.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            held.len(),
            "{strategy}: a block was handed to two processes"
        );
        let rep = audit_node(node.path(), &held);
        assert_eq!(rep.double_allocated, 0, "{strategy}: {rep:?}");
        assert_eq!(rep.leaked_blocks, 0, "{strategy}: {rep:?}");
        assert_eq!(rep.in_use, 12, "{strategy}: {rep:?}");
        assert_eq!(
            rep.free,
            blocks_total - 12,
            "{strategy}: exact free count {rep:?}"
        );
        finish(ws, node.path());
    }
}

#[test]
fn simultaneous_starts_elect_exactly_one_leader() {
    let files = scratch();
    let node = shm_dir();
    let s = spec(
        node.path(),
        Strategy::Shm,
        file_devices(files.path(), 1, 4 << 20),
        0.1,
        false,
        0,
    );
    let (mut ws, ready) = start(&s, 6);
    let leader = leader_of(&ready);
    let at = Attached::open(node.path()).unwrap();
    let lpid = at.node.leader_pid().load(Ordering::SeqCst) as u32;
    let w = ws.iter().find(|w| w.proc_id == leader).unwrap();
    assert_eq!(lpid, w.pid(), "the node segment names the elected leader");
    for w in &mut ws {
        w.go().unwrap();
    }
    collect(&mut ws, 0.1);
    finish(ws, node.path());
}

#[test]
fn leader_death_a_follower_takes_over_and_reclaims() {
    // `central` too: its clients reach the new leader's server and go on.
    for strategy in [Strategy::Shm, Strategy::Central] {
        let files = scratch();
        let node = shm_dir();
        let s = spec(
            node.path(),
            strategy,
            file_devices(files.path(), 2, 8 << 20),
            1.5,
            false,
            2,
        );
        let (mut ws, ready) = start(&s, 3);
        let leader = leader_of(&ready);
        // The leader stops with a block in flight and dies there; the others run on.
        for w in &mut ws {
            if w.proc_id == leader {
                w.go_stop_in_flight(Duration::from_millis(300)).unwrap();
            } else {
                w.go().unwrap();
            }
        }
        let i = ws.iter().position(|w| w.proc_id == leader).unwrap();
        let mut old = ws.remove(i);
        let in_flight = match old.event(WAIT).unwrap() {
            WorkerEvent::InFlight { block, .. } => block,
            e => panic!("unexpected {e:?}"),
        };
        let old_pid = old.pid();
        old.kill().unwrap();
        // A follower notices, wins the election and records itself as leader.
        let at = Attached::open(node.path()).unwrap();
        let survivors: Vec<u32> = ws.iter().map(|w| w.pid()).collect();
        wait_for(
            &format!("{strategy}: a follower to take over"),
            WAIT,
            || {
                let p = at.node.leader_pid().load(Ordering::SeqCst) as u32;
                p != old_pid && survivors.contains(&p)
            },
        );
        // The old leader restarts with its id: it is now a follower, and the new leader
        // had already returned its in-flight block (exactly once).
        let mut again = WorkerProc::spawn(&s, leader).unwrap();
        match again.event(WAIT).unwrap() {
            WorkerEvent::Ready {
                leader: l,
                recovered,
                ..
            } => {
                assert!(!l, "{strategy}: the restarted old leader must follow");
                assert_eq!(
                    recovered, 0,
                    "{strategy}: recovered by the takeover already"
                );
            }
            e => panic!("unexpected {e:?}"),
        }
        let rec = ProcSeg::attach(&proc_path(node.path(), leader)).unwrap();
        assert_eq!(rec.recovered().load(Ordering::SeqCst), 1, "{strategy}");
        assert_eq!(
            BlockRef::unpack(rec.last_recovered().load(Ordering::SeqCst)),
            Some(in_flight),
            "{strategy}"
        );
        again.go().unwrap();
        ws.push(again);
        let (ops, held) = collect(&mut ws, 1.5);
        assert!(ops > 0, "{strategy}");
        let rep = audit_node(node.path(), &held);
        assert_eq!(rep.leaked_blocks, 0, "{strategy}: {rep:?}");
        assert_eq!(rep.double_allocated, 0, "{strategy}: {rep:?}");
        assert_eq!(rep.in_use as usize, held.len(), "{strategy}: {rep:?}");
        finish(ws, node.path());
    }
}

#[test]
fn killed_writer_restarts_and_its_in_flight_block_is_recovered() {
    let Some(g) = LoopDevices::provision("t-alloc-crash", 2, 32 << 20) else {
        return;
    };
    let node = shm_dir();
    let s = spec(
        node.path(),
        Strategy::Shm,
        loop_regions(&g, 32 << 20),
        1.0,
        true,
        2,
    );
    let (mut ws, ready) = start(&s, 3);
    let leader = leader_of(&ready);
    // A follower stops after writing a block it has not committed; it is killed there.
    let i = ws.iter().position(|w| w.proc_id != leader).unwrap();
    for (j, w) in ws.iter_mut().enumerate() {
        if j == i {
            w.go_stop_in_flight(Duration::from_millis(300)).unwrap();
        } else {
            w.go().unwrap();
        }
    }
    let mut victim = ws.remove(i);
    let in_flight = match victim.event(WAIT).unwrap() {
        WorkerEvent::InFlight { block, .. } => block,
        e => panic!("unexpected {e:?}"),
    };
    let id = victim.proc_id;
    victim.kill().unwrap();
    let mut again = WorkerProc::spawn(&s, id).unwrap();
    assert!(matches!(
        again.event(WAIT).unwrap(),
        WorkerEvent::Ready { leader: false, .. }
    ));
    // Its block came back exactly once (by the leader when its connection dropped, or at
    // its registration, whichever came first).
    let rec = ProcSeg::attach(&proc_path(node.path(), id)).unwrap();
    assert_eq!(rec.recovered().load(Ordering::SeqCst), 1);
    assert_eq!(
        BlockRef::unpack(rec.last_recovered().load(Ordering::SeqCst)),
        Some(in_flight)
    );
    again.go().unwrap();
    ws.push(again);
    let (_, held) = collect(&mut ws, 1.0);
    let rep = audit_node(node.path(), &held);
    assert_eq!(rep.leaked_blocks, 0, "{rep:?}");
    assert_eq!(rep.double_allocated, 0, "{rep:?}");
    assert_eq!(rep.in_use as usize, held.len());
    finish(ws, node.path());
}

#[test]
fn a_lock_holder_that_is_killed_does_not_wedge_the_others() {
    let files = scratch();
    let node = shm_dir();
    let s = spec(
        node.path(),
        Strategy::Mutex,
        file_devices(files.path(), 2, 8 << 20),
        0.3,
        false,
        1,
    );
    let (mut ws, ready) = start(&s, 2);
    leader_of(&ready);
    // Two processes take the robust locks of both devices and are killed holding them.
    for dev in 0..2u16 {
        let mut h = Command::new(exe())
            .args(["alloc", "hold-lock", "--dir"])
            .arg(node.path())
            .args(["--dev", &dev.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(h.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "locked");
        h.kill().unwrap();
        h.wait().unwrap();
    }
    for w in &mut ws {
        w.go().unwrap();
    }
    let (ops, held) = collect(&mut ws, 0.3);
    assert!(ops > 0, "the others went on allocating");
    let rep = audit_node(node.path(), &held);
    assert_eq!(rep.leaked_blocks, 0, "{rep:?}");
    assert_eq!(rep.double_allocated, 0, "{rep:?}");
    finish(ws, node.path());
}

#[test]
fn device_offline_while_writing_processes_switch_and_nothing_acknowledged_is_lost() {
    let Some(g) = LoopDevices::provision("t-alloc-offline", 2, 32 << 20) else {
        return;
    };
    let node = shm_dir();
    let regions = loop_regions(&g, 32 << 20);
    let s = spec(node.path(), Strategy::Shm, regions.clone(), 1.0, true, 3);
    let (mut ws, ready) = start(&s, 3);
    leader_of(&ready);
    for w in &mut ws {
        w.go().unwrap();
    }
    std::thread::sleep(Duration::from_millis(250));
    let st = Command::new(exe())
        .args(["alloc", "device-offline", "--internal-port"])
        .arg(s.node.internal_port.to_string())
        .args(["--dev", "0"])
        .status()
        .unwrap();
    assert!(st.success());
    let (ops, held) = collect(&mut ws, 1.0);
    assert!(ops > 0);
    // Everything kept after the device went offline is on the other device.
    assert!(held.iter().all(|b| b.dev == 1), "{held:?}");
    // Acknowledged (committed) blocks hold what their writer wrote.
    let at = Attached::open(node.path()).unwrap();
    let mut eng = UringEngine::with_queue_depth(1).unwrap();
    let dev = Device::open_read_only(&regions[1].path).unwrap();
    for b in &held {
        let mut buf = AlignedBuf::new(4096);
        eng.read_at(&dev, at.device(1).unwrap().block_offset(b.block), &mut buf)
            .unwrap();
        let first = buf[0];
        assert!((1..=3).contains(&first), "block {b} holds a writer's bytes");
        assert!(buf.iter().all(|&x| x == first), "block {b} is intact");
    }
    let rep = audit_node(node.path(), &held);
    assert_eq!(rep.leaked_blocks, 0, "{rep:?}");
    assert_eq!(rep.double_allocated, 0, "{rep:?}");
    assert!(
        !node.path().join("dev-0.shm").exists(),
        "offline segment freed"
    );
    finish(ws, node.path());
}
