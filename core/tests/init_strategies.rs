//! The four init strategies end to end: a monitor over TCP, node agents (in this process
//! and behind their own TCP servers), loop devices (root). Every daemon must end `up` in
//! the monitor's map and every device must mount with the label the map describes.
//! Plus the bad inputs: duplicate devices, a device of another node, unknown ids, an
//! unreachable monitor, a refused device among good ones; and running init again after a
//! failed daemon or a failed node resumes with the same ids.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blocklab::daemon;
use blocklab::dev::{Device, UringEngine};
use blocklab::init::{self, InitError, Node, NodeAgent, NodeInitRequest, RemoteNode, Strategy};
use blocklab::monitor::{DaemonState, FileJournal, Monitor, MonitorClient, ProposeConfig};
use blocklab::testing::{
    ext4_intact, free_port, make_ext4, require_program, scratch, sparse_files, LoopDevices,
};

const RETRY: Duration = Duration::from_secs(30);

fn monitor(dir: &Path, interval_ms: u64) -> Monitor {
    Monitor::start(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        Box::new(FileJournal::new(
            dir.join(format!("mon-{}.journal", uuid::Uuid::new_v4())),
        )),
        ProposeConfig::with_interval(Duration::from_millis(interval_ms)),
        None,
    )
    .unwrap()
}

/// Runs init with `strategy` against `mon` on `nodes`.
fn run_init(strategy: Strategy, mon: &Monitor, nodes: &[&dyn Node], force: bool) -> init::InitRun {
    init::run(strategy, &mon.addr().to_string(), nodes, force, RETRY).unwrap()
}

fn agents(paths: &[PathBuf], nodes: usize, mon: &Monitor) -> Vec<NodeAgent> {
    let per = paths.len() / nodes;
    (0..nodes)
        .map(|n| {
            NodeAgent::new(
                &format!("node{n}"),
                &paths[n * per..(n + 1) * per],
                &mon.addr().to_string(),
            )
            .unwrap()
        })
        .collect()
}

/// Every daemon up in the map, every device mounts with the map's fsid, id and uuid.
fn check_all_up(mon: &Monitor, run: &init::InitRun, expected: usize) {
    assert_eq!(run.daemons.len(), expected);
    let failed: Vec<_> = run.failed().collect();
    assert!(failed.is_empty(), "failed daemons: {failed:?}");
    let map = mon.map();
    assert_eq!(map.daemons.len(), expected);
    let mut eng = UringEngine::with_queue_depth(4).unwrap();
    for d in map.daemons.values() {
        assert_eq!(d.state, DaemonState::Up, "daemon {}", d.id);
        let dev = Device::open(&d.device).unwrap();
        let m = daemon::mount(&mut eng, &dev).unwrap();
        assert_eq!(m.label.cluster_fsid, map.fsid);
        assert_eq!(m.label.daemon_id, d.id);
        assert_eq!(Some(m.label.daemon_uuid), d.uuid);
        assert!(d.key.is_some());
    }
}

#[test]
fn every_strategy_leaves_every_daemon_up_and_mountable() {
    let Some(g) = LoopDevices::provision("init-strat", 6, 64 << 20) else {
        return;
    };
    let sd = scratch();
    let paths = g.paths();
    for strategy in Strategy::ALL {
        // A longer interval for `parallel` so that "all in flight at once" does not
        // depend on how fast six threads start on a loaded machine.
        let interval = if strategy == Strategy::Parallel {
            200
        } else {
            20
        };
        let mon = monitor(sd.path(), interval);
        let ag = agents(&paths, 3, &mon);
        let nodes: Vec<&dyn Node> = ag.iter().map(|a| a as &dyn Node).collect();
        // force: the devices hold the previous strategy's cluster.
        let run = run_init(strategy, &mon, &nodes, true);
        check_all_up(&mon, &run, 6);
        // Never fewer proposals than the strategy's critical path of committed changes.
        let proposals = run.monitor_proposals.unwrap();
        assert!(proposals >= strategy.min_proposals(3, 2));
        // Each daemon counts from its own start on its node: never more in flight than
        // the strategy runs at once.
        match strategy {
            Strategy::Sequential => {
                assert_eq!(run.max_in_flight, 1);
                assert_eq!(proposals, 18);
            }
            Strategy::ParallelNodes => assert!(run.max_in_flight <= 3, "{}", run.max_in_flight),
            Strategy::ParallelDaemons => {
                assert!(run.max_in_flight <= 2, "{}", run.max_in_flight)
            }
            // Each daemon asks for its own id (its own `alloc` step, on its node) and gets
            // a distinct one.
            Strategy::ParallelNobatch => {
                assert!(run.max_in_flight <= 6, "{}", run.max_in_flight);
                let mut ids: Vec<u32> = run.daemons.iter().map(|d| d.id.unwrap()).collect();
                ids.sort();
                assert_eq!(ids, (0..6).collect::<Vec<_>>());
                for d in &run.daemons {
                    assert_eq!(d.steps[0].step, "alloc", "{:?}", d.steps);
                }
            }
            Strategy::Parallel => {
                // All six overlapped (each waits at least one interval for its
                // registration); ids 0..6 in one batch, which is every daemon's first
                // step and part of its time.
                assert_eq!(run.max_in_flight, 6);
                let ids: Vec<u32> = run.daemons.iter().map(|d| d.id.unwrap()).collect();
                assert_eq!(ids, (0..6).collect::<Vec<_>>());
                for d in &run.daemons {
                    assert_eq!(d.steps[0].step, "alloc");
                    assert!(d.elapsed_ns >= d.steps.iter().map(|s| s.ns).sum::<u64>());
                }
            }
        }
    }
}

#[test]
fn remote_node_agents_over_tcp_and_a_refused_device_fails_alone() {
    let Some(g) = LoopDevices::provision("init-remote", 4, 64 << 20) else {
        return;
    };
    if !require_program("mkfs.ext4", "e2fsprogs") {
        return;
    }
    let sd = scratch();
    let paths = g.paths();
    // An ext4 filesystem on one device: that daemon fails, the others come up.
    make_ext4(&paths[1]);
    let mon = monitor(sd.path(), 20);
    let servers: Vec<_> = agents(&paths, 2, &mon)
        .into_iter()
        .map(|a| init::serve_node(a, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap())
        .collect();
    let remotes: Vec<RemoteNode> = servers
        .iter()
        .map(|s| RemoteNode::new(&s.addr().to_string()))
        .collect();
    let nodes: Vec<&dyn Node> = remotes.iter().map(|r| r as &dyn Node).collect();
    let run = run_init(Strategy::Parallel, &mon, &nodes, false);
    let failed: Vec<_> = run.failed().collect();
    assert_eq!(failed.len(), 1);
    assert!(failed[0].error.as_ref().unwrap().contains("ext2/3/4"));
    let map = mon.map();
    let bad = map
        .daemons
        .values()
        .find(|d| d.device == failed[0].device)
        .unwrap();
    assert_eq!(bad.state, DaemonState::Failed);
    assert!(bad.reason.as_ref().unwrap().contains("ext2/3/4"));
    let up = map
        .daemons
        .values()
        .filter(|d| d.state == DaemonState::Up)
        .count();
    assert_eq!(up, 3);
    // The ext4 filesystem is intact.
    let (intact, fsck) = ext4_intact(&paths[1]);
    assert!(intact, "{fsck}");

    // The operator wipes the filesystem and runs the same init again: the failed daemon
    // gets its id back and comes up, the others are left alone, no id is stranded.
    let bad_id = bad.id;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&paths[1])
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, &vec![0u8; 1 << 20])?;
            f.sync_all()
        })
        .unwrap();
    let again = run_init(Strategy::Parallel, &mon, &nodes, false);
    check_all_up(&mon, &again, 4);
    for (d, before) in again.daemons.iter().zip(&run.daemons) {
        assert_eq!(d.id, before.id);
        assert_eq!(d.already_up, before.is_up(), "{d:?}");
    }
    assert_eq!(
        again.daemons.iter().find(|d| !d.already_up).unwrap().id,
        Some(bad_id)
    );
}

/// Regular files as devices: these checks need no root.
fn files(dir: &Path, n: usize) -> Vec<PathBuf> {
    sparse_files(dir, n, 32 << 20)
}

fn all_zero(paths: &[PathBuf]) -> bool {
    paths
        .iter()
        .all(|p| std::fs::read(p).unwrap().iter().all(|&b| b == 0))
}

#[test]
fn bad_input_is_refused_before_anything_is_formatted() {
    let dir = scratch();
    let paths = files(dir.path(), 3);
    let mon = monitor(dir.path(), 10);
    let addr = mon.addr().to_string();

    // Duplicate device in one node's list (also through a symlink).
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink(&paths[0], &link).unwrap();
    let e = NodeAgent::new("a", &[paths[0].clone(), link], &addr).unwrap_err();
    assert!(matches!(e, InitError::DuplicateDevice { .. }), "{e}");
    assert!(e.to_string().contains("listed twice"), "{e}");

    // A node that lists another node's device.
    let a = NodeAgent::new("a", &paths[0..2], &addr).unwrap();
    let b = NodeAgent::new("b", &paths[1..3], &addr).unwrap();
    let e = init::run(Strategy::Parallel, &addr, &[&a, &b], false, RETRY).unwrap_err();
    assert!(matches!(e, InitError::SharedDevice { .. }), "{e}");
    assert!(
        e.to_string().contains("listed by node a and by node b"),
        "{e}"
    );

    // Unknown daemon id handed to a node.
    let e = a
        .init(&NodeInitRequest {
            keys: None,
            ids: Some(vec![40, 41]),
            parallel: true,
            force: false,
        })
        .unwrap_err();
    assert!(e.to_string().contains("unknown daemon id 40"), "{e}");
    assert!(all_zero(&paths));
    assert!(mon.map().daemons.is_empty());

    // A missing device.
    let e = NodeAgent::new("c", &[dir.path().join("nope")], &addr).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");

    // An unreachable monitor: clear error after a bounded retry, nothing formatted.
    drop(mon);
    let port = free_port();
    let a = NodeAgent::new("a", &paths[0..2], &format!("127.0.0.1:{port}"))
        .unwrap()
        .with_connect_retry(Duration::from_millis(300));
    let e = a
        .init(&NodeInitRequest {
            keys: None,
            ids: None,
            parallel: true,
            force: false,
        })
        .unwrap_err();
    assert!(e.to_string().contains("unreachable"), "{e}");
    assert!(all_zero(&paths));
    let e = MonitorClient::connect(&format!("127.0.0.1:{port}"), Duration::from_millis(100))
        .unwrap_err();
    assert!(e.to_string().contains("unreachable"), "{e}");
}

#[test]
fn a_failed_node_and_an_interrupted_init_resume_with_the_same_ids() {
    let dir = scratch();
    let paths = files(dir.path(), 4);
    let mon = monitor(dir.path(), 5);
    let addr = mon.addr().to_string();
    let a = NodeAgent::new("a", &paths[0..2], &addr).unwrap();
    // Node b cannot reach the monitor (a wrong address): it fails as a whole after the
    // orchestrator allocated its batch ids.
    let dead = format!("127.0.0.1:{}", free_port());
    let b_dead = NodeAgent::new("b", &paths[2..4], &dead)
        .unwrap()
        .with_connect_retry(Duration::from_millis(100));
    let run = run_init(Strategy::Parallel, &mon, &[&a, &b_dead], false);
    assert_eq!(run.daemons.len(), 4);
    assert!(run.daemons[..2].iter().all(|d| d.is_up()));
    let failed: Vec<_> = run.failed().collect();
    assert_eq!(failed.len(), 2);
    for d in &failed {
        assert_eq!(d.node, "b");
        assert!(d.error.as_ref().unwrap().contains("unreachable"), "{d:?}");
    }
    // Its ids are not stranded `new`: the monitor knows they failed, and why.
    let map = mon.map();
    for d in &failed {
        let e = &map.daemons[&d.id.unwrap()];
        assert_eq!(e.state, DaemonState::Failed);
        assert!(e.reason.as_ref().unwrap().contains("unreachable"));
    }
    // b fixed, the same init again: b's daemons come up under their ids, a's are left.
    let b = NodeAgent::new("b", &paths[2..4], &addr).unwrap();
    let again = run_init(Strategy::Parallel, &mon, &[&a, &b], false);
    check_all_up(&mon, &again, 4);
    let ids = |r: &init::InitRun| r.daemons.iter().map(|d| d.id).collect::<Vec<_>>();
    assert_eq!(ids(&again), ids(&run));
    assert!(again.daemons[..2].iter().all(|d| d.already_up));
    assert!(again.daemons[2..].iter().all(|d| !d.already_up));

    // An interrupted init: ids allocated (the orchestrator died), nothing formatted.
    let c_dir = dir.path().join("c");
    std::fs::create_dir(&c_dir).unwrap();
    let c_paths = files(&c_dir, 2);
    let c = NodeAgent::new("c", &c_paths, &addr).unwrap();
    let mut cl = MonitorClient::connect(&addr, RETRY).unwrap();
    let stranded = cl.alloc_batch(&c_slots(&c)).unwrap();
    // Each daemon asks for its own id this time, and gets the stranded one.
    let run = run_init(Strategy::ParallelDaemons, &mon, &[&c], false);
    assert!(run.failed().next().is_none(), "{:?}", run.daemons);
    assert_eq!(
        run.daemons
            .iter()
            .map(|d| d.id.unwrap())
            .collect::<Vec<_>>(),
        stranded
    );
    assert_eq!(mon.map().daemons.len(), 6);
}

fn c_slots(n: &NodeAgent) -> Vec<blocklab::monitor::Slot> {
    let i = n.info();
    i.devices
        .iter()
        .map(|d| blocklab::monitor::Slot {
            node: i.name.clone(),
            device: d.clone(),
            host: i.host.clone(),
        })
        .collect()
}

#[test]
fn strategies_on_files_without_root() {
    // The orchestration on regular files (O_DIRECT), so it is exercised without root too.
    let dir = scratch();
    let paths = files(dir.path(), 4);
    let mon = monitor(dir.path(), 5);
    let ag = agents(&paths, 2, &mon);
    let nodes: Vec<&dyn Node> = ag.iter().map(|a| a as &dyn Node).collect();
    let run = run_init(Strategy::ParallelNodes, &mon, &nodes, false);
    check_all_up(&mon, &run, 4);
    // Nodes in parallel, each node's daemons one by one.
    assert!(run.max_in_flight <= 2);
}

/// A node agent that accepts the request and never answers fails the call when its
/// deadline passes, instead of hanging the orchestrator.
#[test]
fn a_silent_node_fails_at_its_deadline() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let hold = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        drop(s);
    });
    let node = RemoteNode::new(&addr).with_init_timeout(Duration::from_millis(200));
    let req = NodeInitRequest {
        ids: None,
        keys: None,
        parallel: false,
        force: false,
    };
    match node.init(&req) {
        Err(InitError::NodeIo { what, .. }) => assert_eq!(what, "receive"),
        other => panic!("{other:?}"),
    }
    hold.join().unwrap();
}

/// A daemon removed from the map leaves its formatted device behind; its id, handed out
/// again for the same device, comes with a new uuid, so init does not take the old
/// daemon's format (and data) for the new daemon's: it refuses the device unless forced.
#[test]
fn a_removed_id_given_to_the_same_device_does_not_resurrect_the_old_daemon() {
    let Some(g) = LoopDevices::provision("init-removed", 1, 64 << 20) else {
        return;
    };
    let sd = scratch();
    let paths = g.paths();
    let mon = monitor(sd.path(), 20);
    let ag = agents(&paths, 1, &mon);
    let nodes: Vec<&dyn Node> = ag.iter().map(|a| a as &dyn Node).collect();
    let first = run_init(Strategy::Sequential, &mon, &nodes, true);
    check_all_up(&mon, &first, 1);
    let old_uuid = mon.map().daemons[&0].uuid.unwrap();
    let mut c = MonitorClient::connect(&mon.addr().to_string(), RETRY).unwrap();
    c.remove(0).unwrap();
    assert!(mon.map().daemons.is_empty());

    let again = run_init(Strategy::Sequential, &mon, &nodes, false);
    let d = &again.daemons[0];
    assert_eq!(d.id, Some(0));
    let why = d
        .error
        .as_deref()
        .expect("the old daemon's device is refused");
    assert!(why.contains(&old_uuid.to_string()), "{why}");
    assert_eq!(mon.map().daemons[&0].state, DaemonState::Failed);

    // Forced, the device is formatted for the new daemon, with the map's new uuid.
    let forced = run_init(Strategy::Sequential, &mon, &nodes, true);
    check_all_up(&mon, &forced, 1);
    assert_ne!(mon.map().daemons[&0].uuid, Some(old_uuid));
}
