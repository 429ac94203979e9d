//! `blocklab mkfs|inspect|monitor|node|init` as real processes: a monitor process, two
//! node agent processes and the orchestrator over TCP on loop devices; a monitor killed
//! with SIGKILL and restarted keeps its map; `mkfs` killed (SIGKILL) after each phase
//! leaves a device that does not mount and that a second `mkfs` completes; `monitor
//! remove`; a monitor whose commit fails exits with an error.

use blocklab::testing::{
    assert_success, free_port, make_ext4, output_text as text, require_program, require_zookeeper,
    scratch, sparse_files, spawn_announcing, KillOnDrop, LoopDevices,
};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_blocklab");

/// Starts a server subcommand and returns it with the address it printed.
fn serve(args: &[&str]) -> (KillOnDrop, String) {
    let (p, line) = spawn_announcing(Command::new(BIN).args(args).stderr(Stdio::inherit()));
    let addr = line
        .split_whitespace()
        .skip_while(|w| *w != "on")
        .nth(1)
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    (p, addr)
}

/// `monitor serve` on an ephemeral port with `args` (its journal or store, options).
fn serve_monitor(args: &[&str]) -> (KillOnDrop, String) {
    serve(&[&["monitor", "serve", "--listen", "127.0.0.1:0"], args].concat())
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn daemons(map: &serde_json::Value) -> &Vec<serde_json::Value> {
    map["daemons"].as_array().expect("a list of daemons")
}

fn map_json(mon: &str) -> serde_json::Value {
    let o = run(&["monitor", "map", "--monitor", mon, "--json"]);
    assert_success(&o);
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn monitor_nodes_and_orchestrator_as_processes() {
    let Some(g) = LoopDevices::provision("init-cli", 4, 64 << 20) else {
        return;
    };
    let sd = scratch();
    let paths: Vec<String> = g.paths().iter().map(|p| p.display().to_string()).collect();
    let journal = sd.path().join("mon.journal");
    let j = journal.to_str().unwrap();
    let (mon, addr) = serve_monitor(&["--journal", j, "--propose-interval", "50ms"]);
    let (_n0, a0) = serve(&[
        "node",
        "serve",
        "--name",
        "n0",
        "--monitor",
        &addr,
        "--devices",
        &format!("{},{}", paths[0], paths[1]),
    ]);
    let (_n1, a1) = serve(&[
        "node",
        "serve",
        "--name",
        "n1",
        "--monitor",
        &addr,
        "--devices",
        &format!("{},{}", paths[2], paths[3]),
    ]);
    let o = run(&[
        "init",
        "--monitor",
        &addr,
        "--nodes",
        &format!("{a0},{a1}"),
        "--strategy",
        "parallel",
    ]);
    assert_success(&o);
    let map = map_json(&addr);
    let ds = daemons(&map);
    assert_eq!(ds.len(), 4);
    for d in ds {
        assert_eq!(d["state"], "up", "{d}");
        let o = run(&["inspect", d["device"].as_str().unwrap(), "--json"]);
        assert_success(&o);
        let ins: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(ins["label"]["daemon_id"], d["id"]);
        assert_eq!(ins["label"]["cluster_fsid"], map["fsid"]);
        assert_eq!(ins["ready"], true);
    }

    // The same init again: every daemon is up already, nothing happens.
    let o = run(&["init", "--monitor", &addr, "--nodes", &format!("{a0},{a1}")]);
    assert_success(&o);
    assert_eq!(text(&o).matches("(already up)").count(), 4, "{}", text(&o));
    assert_eq!(map_json(&addr), map);

    // SIGKILL the monitor, restart it on the same journal: same map.
    drop(mon);
    let (_mon, addr2) = serve_monitor(&["--journal", j]);
    assert_eq!(map_json(&addr2), map);

    // A node listing another node's device is refused before anything happens.
    let (_n2, a2) = serve(&[
        "node",
        "serve",
        "--name",
        "n2",
        "--monitor",
        &addr2,
        "--devices",
        &paths[0],
    ]);
    let o = run(&[
        "init",
        "--monitor",
        &addr2,
        "--nodes",
        &format!("{a0},{a2}"),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("listed by node n0 and by node n2"),
        "{}",
        text(&o)
    );

    // Unreachable monitor: clear error, non-zero exit.
    let port = free_port();
    let o = run(&[
        "node",
        "init",
        "--name",
        "x",
        "--monitor",
        &format!("127.0.0.1:{port}"),
        "--devices",
        &paths[0],
        "--connect-retry",
        "1s",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("unreachable"), "{}", text(&o));
    assert_eq!(map_json(&addr2), map);

    // Removing a daemon that is up needs --force.
    let o = run(&["monitor", "remove", "--monitor", &addr2, "--id", "0"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("is up; use --force"), "{}", text(&o));
    let o = run(&[
        "monitor",
        "remove",
        "--monitor",
        &addr2,
        "--id",
        "0",
        "--force",
    ]);
    assert_success(&o);
    let after = map_json(&addr2);
    assert_eq!(daemons(&after).len(), 3);
    assert!(daemons(&after).iter().all(|d| d["id"] != 0));
    let o = run(&["monitor", "remove", "--monitor", &addr2, "--id", "0"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("no daemon 0"), "{}", text(&o));
}

#[test]
fn a_monitor_whose_commit_fails_exits_with_the_error() {
    if !require_zookeeper() {
        return;
    }
    use blocklab::coord::{connect, ConnectOptions};
    use blocklab::monitor::{CoordStore, MapStore, MonitorClient};
    let zk = blocklab::coord::zk_server::ZkServer::start().unwrap();
    let spec = zk.spec("/");
    let (mut mon, line) = spawn_announcing(
        Command::new(BIN)
            .args(["monitor", "serve", "--listen", "127.0.0.1:0", "--store"])
            .arg(spec.to_string())
            .args(["--propose-interval", "10ms"])
            .stderr(Stdio::piped()),
    );
    let addr = line.split_whitespace().nth(3).unwrap().to_string();
    let mut c = MonitorClient::connect(&addr, std::time::Duration::from_secs(30)).unwrap();
    c.alloc("n", &["/dev/a".into()]).unwrap();
    // Another writer replaces the map behind the monitor's back.
    let mut other = CoordStore::new(
        connect(&spec, &ConnectOptions::default()).unwrap(),
        blocklab::monitor::coord_store::DEFAULT_MAP_PATH,
    );
    let mut next = other.load().unwrap().unwrap();
    next.epoch += 1;
    other.commit(&next, &[]).unwrap();
    let e = c.alloc("n", &["/dev/b".into()]).unwrap_err();
    assert!(e.to_string().contains("commit failed"), "{e}");
    // The process exits by itself, non-zero, saying why.
    let status = mon.wait_exit("the monitor to exit", std::time::Duration::from_secs(60));
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut mon.0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("the monitor stopped"), "{err}");
    assert!(err.contains("commit failed"), "{err}");
}

fn mkfs(dev: &str, fsid: &str, id: &str, extra: &[&str]) -> Output {
    let mut a = vec!["mkfs", dev, "--cluster-fsid", fsid, "--id", id];
    a.extend_from_slice(extra);
    run(&a)
}

#[test]
fn mkfs_killed_after_each_phase_then_completes() {
    let phases = ["probe", "label", "superblock", "log", "bitmap", "flush"];
    let Some(g) = LoopDevices::provision("init-cli-crash", phases.len() + 1, 64 << 20) else {
        return;
    };
    if !require_program("mkfs.ext4", "e2fsprogs") {
        return;
    }
    let paths: Vec<String> = g.paths().iter().map(|p| p.display().to_string()).collect();
    let fsid = uuid::Uuid::new_v4().to_string();
    for (i, phase) in phases.iter().enumerate() {
        let dev = &paths[i];
        let o = mkfs(dev, &fsid, "3", &["--crash-after", phase]);
        assert_eq!(o.status.signal(), Some(9), "{phase}: {}", text(&o));
        let o = run(&["inspect", dev]);
        assert!(
            !o.status.success(),
            "{phase}: inspect accepted: {}",
            text(&o)
        );
        let o = mkfs(dev, &fsid, "3", &[]);
        assert!(o.status.success(), "{phase}: {}", text(&o));
        assert!(text(&o).contains("formatted for cluster"), "{}", text(&o));
        let o = run(&["inspect", dev]);
        assert!(o.status.success(), "{phase}: {}", text(&o));
        assert!(text(&o).contains("mountable     yes"), "{}", text(&o));
        // Idempotent.
        let o = mkfs(dev, &fsid, "3", &[]);
        assert!(text(&o).contains("nothing to do"), "{}", text(&o));
    }
    // Refusals: another cluster's label, an ext4 filesystem; --force overrides.
    let o = mkfs(&paths[0], &uuid::Uuid::new_v4().to_string(), "3", &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("blocklab label of cluster"),
        "{}",
        text(&o)
    );
    let last = &paths[phases.len()];
    make_ext4(std::path::Path::new(last));
    let o = mkfs(last, &fsid, "9", &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("ext2/3/4"), "{}", text(&o));
    let o = run(&["inspect", last]);
    assert!(!o.status.success());
    assert!(text(&o).contains("no blocklab label"), "{}", text(&o));
    let o = mkfs(last, &fsid, "9", &["--force"]);
    assert_success(&o);
}

#[test]
fn monitor_on_the_embedded_coord_store_and_node_init() {
    // Regular files as devices: no root needed.
    let dir = scratch();
    let devs: Vec<String> = sparse_files(dir.path(), 2, 32 << 20)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let store = format!("embedded:{}", dir.path().join("coord.store").display());
    let (mon, addr) = serve_monitor(&["--store", &store, "--propose-interval", "20ms"]);
    let o = run(&[
        "node",
        "init",
        "--name",
        "solo",
        "--monitor",
        &addr,
        "--devices",
        &format!("{},{}", devs[0], devs[1]),
        "--parallel",
    ]);
    assert_success(&o);
    let map = map_json(&addr);
    assert_eq!(daemons(&map).len(), 2);
    assert!(daemons(&map)
        .iter()
        .all(|d| d["state"] == "up" && d["node"] == "solo"));
    drop(mon);
    let (_mon, addr) = serve_monitor(&["--store", &store]);
    assert_eq!(map_json(&addr), map);
    // Neither --journal nor --store: a clear error.
    let o = run(&["monitor", "serve", "--listen", "127.0.0.1:0"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--journal"), "{}", text(&o));
}

/// The Ceph backend as processes: `ceph create` leaves a monitor running, two node agents
/// (`node serve --ceph`) deploy BlueStore OSDs for `init --ceph`, `ceph status` shows them
/// up and reported, `ceph teardown` stops everything; a directory blocklab did not make
/// is refused by teardown and left alone.
#[test]
fn ceph_cluster_nodes_and_orchestrator_as_processes() {
    if !blocklab::testing::require_ceph() {
        return;
    }
    let Some(g) = LoopDevices::provision("init-cli-ceph", 3, 2 << 30) else {
        return;
    };
    let sd = scratch();
    let paths: Vec<String> = g.paths().iter().map(|p| p.display().to_string()).collect();
    let dir = sd.path().join("ceph");
    let d = dir.to_str().unwrap();
    let o = run(&["ceph", "create", d]);
    assert_success(&o);
    assert!(text(&o).contains("monitor on 127.0.0.1:"), "{}", text(&o));
    let (_n0, a0) = serve(&[
        "node",
        "serve",
        "--name",
        "n0",
        "--ceph",
        d,
        "--devices",
        &format!("{},{}", paths[0], paths[1]),
    ]);
    let (_n1, a1) = serve(&[
        "node",
        "serve",
        "--name",
        "n1",
        "--ceph",
        d,
        "--devices",
        &paths[2],
    ]);
    let o = run(&[
        "init",
        "--ceph",
        d,
        "--nodes",
        &format!("{a0},{a1}"),
        "--strategy",
        "parallel",
    ]);
    assert_success(&o);
    let o = run(&["ceph", "status", d]);
    assert_success(&o);
    let out = text(&o);
    assert!(out.contains("3 OSDs, 3 up"), "{out}");
    assert_eq!(out.matches("\"up\":true").count(), 3, "{out}");

    let other = sd.path().join("not-ours");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("keep"), b"x").unwrap();
    let o = run(&["ceph", "teardown", other.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("not a Ceph cluster made by blocklab"),
        "{}",
        text(&o)
    );
    assert!(other.join("keep").exists());

    let o = run(&["ceph", "teardown", d]);
    assert_success(&o);
    assert!(!dir.exists());
    assert!(blocklab::ceph::processes(&dir.join("blocklab.conf")).is_empty());
}
