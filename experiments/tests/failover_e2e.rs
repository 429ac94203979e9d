//! Failover end to end with real processes (`blocklab mgmt block-service` + three
//! `blocklab mgmt serve`), real sockets, and loop devices (as root; regular files
//! otherwise): the VIP holder is SIGKILLed in the middle of a copy, the copy runs once and
//! the client gets its result; bad input is refused over the wire with the cluster
//! unchanged (on devices formatted with `daemon::mkfs`, which `daemon::mount` still accepts
//! afterwards); the `client_retry` baseline re-runs the interrupted copy; and (as root) the
//! same kill with the `netns` backend.

use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use blocklab::coord::zk_server::ZkServer;
use blocklab::coord::{connect, ConnectOptions, CoordSpec};
use blocklab::daemon::{mkfs, mount, MkfsRequest};
use blocklab::dev::{Device, UringEngine};
use blocklab::failover::client::Client;
use blocklab::failover::coord_journal::CoordJournal;
use blocklab::failover::journal::{read_records, Record};
use blocklab::failover::wire::{Op, OpResult};
use blocklab::testing::{
    pattern, require_program, require_root, require_zookeeper, scratch_dir, wait_for, TestDevices,
};
use blocklab::volume::{StoreConfig, VolumeStore};
use harness::cli::failover::cluster::{enter_netns, Cluster, ClusterSpec, Mode, VipKind};

const MIB: u64 = 1 << 20;

/// Two 96 MiB devices: loop devices as root, sparse files otherwise.
fn devices(name: &str) -> TestDevices {
    TestDevices::loop_or_files(name, 2, 96 * MIB)
}

fn create_op(name: &str, size: u64) -> Op {
    Op::Create {
        name: name.into(),
        size,
    }
}

fn copy_op(src: &str, dst: &str) -> Op {
    Op::Copy {
        src: src.into(),
        dst: dst.into(),
    }
}

fn copied(src: &str, dst: &str, bytes: u64) -> OpResult {
    OpResult::Copied {
        src: src.into(),
        dst: dst.into(),
        bytes,
    }
}

fn tmp() -> tempfile::TempDir {
    scratch_dir("blocklab-fo-")
}

fn spec(dir: &tempfile::TempDir, devs: &TestDevices, mode: Mode, backend: VipKind) -> ClusterSpec {
    ClusterSpec {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_blocklab")),
        dir: dir.path().join("cluster"),
        devices: devs.paths().to_vec(),
        force: false,
        nodes: 3,
        mode,
        heartbeat: Duration::from_millis(100),
        backend,
        copy_rate: 16 << 20,
        journal: None,
        service_args: Vec::new(),
    }
}

/// The journal's records, from the file or (with `--journal zk://…`) from ZooKeeper.
fn records(c: &Cluster) -> Vec<Record> {
    match c.spec.journal.as_deref() {
        None => read_records(&c.journal_path()).unwrap(),
        Some(spec) => {
            let spec = CoordSpec::parse(spec).unwrap();
            let coord = connect(&spec, &ConnectOptions::default()).unwrap();
            CoordJournal::open(coord, "/blocklab/failover")
                .unwrap()
                .all_records()
                .unwrap()
        }
    }
}

fn client(c: &Cluster) -> Client {
    let mut cl = Client::new(vec![c.vip]);
    cl.resend_after = Duration::from_secs(3);
    cl.give_up = Duration::from_secs(60);
    cl
}

/// Polls the journal until `op_id` has started (generous deadline).
fn wait_started(c: &Cluster, op_id: &str) {
    wait_for(
        &format!("{op_id} to start"),
        Duration::from_secs(30),
        || {
            records(c)
                .iter()
                .any(|r| matches!(r, Record::Started { op_id: id, .. } if id == op_id))
        },
    );
}

fn count(c: &Cluster, op_id: &str) -> (usize, usize, usize) {
    let recs = records(c);
    let started = recs
        .iter()
        .filter(|r| matches!(r, Record::Started { op_id: id, .. } if id == op_id))
        .count();
    let done = recs
        .iter()
        .filter(|r| matches!(r, Record::Done { op_id: id, .. } if id == op_id))
        .count();
    let aborted = recs
        .iter()
        .filter(|r| matches!(r, Record::Aborted { op_id: id, .. } if id == op_id))
        .count();
    (started, done, aborted)
}

/// Stops the service and opens the volume store it owned.
fn stop_and_open_store(c: &mut Cluster) -> VolumeStore {
    c.stop_service().unwrap();
    VolumeStore::open(
        &c.service_dir(),
        &c.spec.devices,
        StoreConfig::default(),
        false,
    )
    .unwrap()
}

/// Compares two volumes byte for byte through a store opened after stopping the service.
fn check_copy_bytes(c: &mut Cluster, src: &str, dst: &str, size: u64) {
    let mut st = stop_and_open_store(c);
    let a = st.read(src, 0, size as usize).unwrap();
    let b = st.read(dst, 0, size as usize).unwrap();
    assert!(a == b, "{dst} differs from {src}");
    assert!(a.iter().any(|&x| x != 0), "the source pattern is there");
}

fn fill_pattern(c: &mut Cluster, name: &str, size: u64) {
    // The store belongs to the service process: stop it, write, restart it.
    {
        let mut st = stop_and_open_store(c);
        st.write(name, 0, &pattern(size as usize, 1)).unwrap();
    }
    c.start_service().unwrap();
}

fn kill_during_copy(backend: VipKind, journal: Option<String>) {
    let dir = tmp();
    let devs = devices(&format!("fo-e2e-{backend}"));
    let mut sp = spec(&dir, &devs, Mode::VipHandoff, backend);
    sp.journal = journal;
    let mut c = Cluster::start(sp).unwrap();
    c.wait_holder(None, Duration::from_secs(30)).unwrap();
    let net_client = c.net.is_some();
    let size = 32 * MIB;

    let call = |c: &Cluster, op_id: &str, op: Op| -> OpResult {
        let cl = client(c);
        let op_id = op_id.to_string();
        let enter = net_client.then(|| c.net.as_ref().unwrap().client.clone());
        thread::scope(|s| {
            s.spawn(|| {
                if let Some(ns) = enter {
                    enter_netns(&ns).unwrap();
                }
                cl.call(&op_id, &op, None).unwrap().0
            })
            .join()
            .unwrap()
        })
    };

    let r = call(&c, "create-src", create_op("src", size));
    assert!(r.is_ok(), "{r:?}");
    fill_pattern(&mut c, "src", size);

    // The copy runs in a client thread; the holder dies once the service has started it.
    let copy = copy_op("src", "dst");
    let cl = client(&c);
    let enter = c.net.as_ref().map(|n| n.client.clone());
    let copy2 = copy.clone();
    let h = thread::spawn(move || {
        if let Some(ns) = enter {
            enter_netns(&ns).unwrap();
        }
        cl.call("copy-1", &copy2, None).unwrap()
    });
    wait_started(&c, "copy-1");
    // (Stopping the service for fill_pattern made every node unhealthy for a while, so
    // the holder may have changed since `first`.)
    let holder = c.wait_holder(None, Duration::from_secs(30)).unwrap();
    c.kill_node(holder).unwrap();
    let (result, info) = h.join().unwrap();
    assert_eq!(result, copied("src", "dst", size));
    assert!(info.attempts >= 2, "the client had to re-send: {info:?}");
    let new_holder = c
        .wait_holder(Some(holder), Duration::from_secs(30))
        .unwrap();
    assert_ne!(new_holder, holder);
    // At most once: one execution, one result.
    assert_eq!(count(&c, "copy-1"), (1, 1, 0));
    // Re-sending the same id again returns the same result without running anything.
    assert_eq!(call(&c, "copy-1", copy), result);
    assert_eq!(count(&c, "copy-1"), (1, 1, 0));
    let enter = c.net.as_ref().map(|n| n.client.clone());
    let cl = client(&c);
    let volumes = thread::spawn(move || {
        if let Some(ns) = enter {
            enter_netns(&ns).unwrap();
        }
        cl.list().unwrap()
    })
    .join()
    .unwrap();
    let names: Vec<_> = volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, vec!["dst", "src"]);
    check_copy_bytes(&mut c, "src", "dst", size);
}

#[test]
fn loopback_holder_killed_during_copy_copy_runs_once_and_client_gets_result() {
    kill_during_copy(VipKind::Loopback, None);
}

#[test]
fn loopback_with_the_journal_in_zookeeper_holder_killed_during_copy_runs_once() {
    if !require_zookeeper() {
        return;
    }
    let zk = ZkServer::start().expect("a private ZooKeeper server");
    kill_during_copy(VipKind::Loopback, Some(zk.spec("/fo").to_string()));
}

#[test]
fn netns_holder_killed_during_copy_copy_runs_once_and_client_gets_result() {
    if !require_root("the netns VIP backend needs root") {
        return;
    }
    if !require_program("ip", "iproute2") {
        return;
    }
    kill_during_copy(VipKind::Netns, None);
}

#[test]
fn bad_input_over_the_wire_is_refused_and_the_cluster_unchanged() {
    let dir = tmp();
    let devs = devices("fo-e2e-bad");
    // This cluster's devices are formatted daemon devices (`daemon::mkfs`).
    let fsid = uuid::Uuid::new_v4();
    let mut eng = UringEngine::with_queue_depth(4).unwrap();
    for (i, p) in devs.paths().iter().enumerate() {
        let dev = Device::open(p).unwrap();
        mkfs(&mut eng, &dev, &MkfsRequest::new(fsid, i as u32)).unwrap();
    }
    let c = Cluster::start(spec(&dir, &devs, Mode::VipHandoff, VipKind::Loopback)).unwrap();
    c.wait_holder(None, Duration::from_secs(30)).unwrap();
    let cl = client(&c);
    let call = |id: &str, op: Op| cl.call(id, &op, None).unwrap().0;
    let err = |r: OpResult| match r {
        OpResult::Error { message } => message,
        other => panic!("expected an error, got {other:?}"),
    };
    assert!(call("c1", create_op("v", 4 * MIB)).is_ok());
    assert!(call("c2", create_op("w", 4 * MIB)).is_ok());
    let listed = |cl: &Client| cl.list().unwrap();
    let before = listed(&cl);
    let journal_before = read_records(&c.journal_path()).unwrap().len();

    let m = err(call("c3", copy_op("v", "w")));
    assert_eq!(m, "volume \"w\" already exists");
    let m = err(call("c4", create_op("huge", 1 << 40)));
    assert!(m.contains("exceeds the free space"), "{m}");
    let m = err(call("c5", copy_op("nope", "x")));
    assert_eq!(m, "no volume named \"nope\"");
    let m = err(call("c1", create_op("other", MIB)));
    assert!(m.contains("already used with different arguments"), "{m}");
    // A malformed request: a clear error line, nothing run.
    {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::net::TcpStream::connect(c.vip).unwrap();
        s.write_all(b"{\"msg\":\"request\",\"op_id\":\"x\"}\n")
            .unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains("malformed request"), "{line}");
    }
    assert_eq!(listed(&cl), before, "the cluster is unchanged");
    // Refused duplicates and the malformed request left no execution behind; the three
    // failed operations ran (and failed) once each.
    let recs = read_records(&c.journal_path()).unwrap();
    assert_eq!(recs.len(), journal_before + 3 * 2);
    assert!(!recs
        .iter()
        .any(|r| matches!(r, Record::Started { op_id, .. } if op_id == "x")));
    // After the volume operations the formatted devices still mount, with the volumes'
    // units (8 MiB in 4 KiB units) marked used in their on-device bitmaps.
    let mut used = 0;
    for p in devs.paths() {
        let dev = Device::open(p).unwrap();
        let m = mount(&mut eng, &dev).unwrap_or_else(|e| panic!("{e}"));
        assert!(!m.used_units_stale());
        used += m.bitmap.used() - blocklab::format::Bitmap::initial(&m.label.layout).used();
    }
    assert_eq!(used, 8 * MIB / 4096);
}

#[test]
fn client_retry_baseline_reexecutes_the_interrupted_copy() {
    let dir = tmp();
    let devs = devices("fo-e2e-retry");
    let mut c = Cluster::start(spec(&dir, &devs, Mode::ClientRetry, VipKind::Loopback)).unwrap();
    c.wait_event_from_all("listening", Duration::from_secs(30))
        .unwrap();
    let mut cl = Client::new(c.node_addrs.clone());
    cl.resend_after = Duration::from_secs(30);
    let size = 32 * MIB;
    let mut next = 0usize;
    let r = cl
        .call_retry("create", &create_op("src", size), &mut next)
        .unwrap()
        .0;
    assert!(r.is_ok(), "{r:?}");
    let copy = copy_op("src", "dst");
    let cl2 = cl.clone();
    let h = thread::spawn(move || {
        let mut next = 0usize;
        cl2.call_retry("copy", &copy, &mut next).unwrap()
    });
    wait_started(&c, "copy-a1");
    // Let the copy get under way (not asserted on: only makes the waste visible).
    thread::sleep(Duration::from_millis(300));
    c.kill_node(0).unwrap();
    let (result, info) = h.join().unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(info.op_id, "copy-a2", "a new operation id");
    // The first execution was abandoned after doing some of the work; the second ran it all.
    let recs = read_records(&c.journal_path()).unwrap();
    assert!(
        recs.iter()
            .any(|r| matches!(r, Record::Aborted { op_id, .. } if op_id == "copy-a1")),
        "the first execution was abandoned when its node died"
    );
    assert_eq!(count(&c, "copy-a1"), (1, 0, 1));
    assert!(
        recs.iter().any(|r| matches!(r,
        Record::Done { op_id, bytes, .. } if op_id == "copy-a2" && *bytes == size)),
        "the second execution copied everything again"
    );
}

/// The block service dies (a real process exit at a chosen point) after a copy's catalog
/// commit and before the journal's `Done`. Restarted, it finds the outcome in the catalog:
/// the client's re-send gets the result, and the copy ran once (no second execution, no
/// `Aborted`).
#[test]
fn service_crash_between_catalog_commit_and_done_delivers_without_rerunning() {
    let dir = tmp();
    let devs = devices("fo-e2e-crash");
    let mut sp = spec(&dir, &devs, Mode::VipHandoff, VipKind::Loopback);
    sp.service_args = vec!["--crash-after-commit".into(), "copy-c".into()];
    let mut c = Cluster::start(sp).unwrap();
    c.wait_holder(None, Duration::from_secs(30)).unwrap();
    let size = 8 * MIB;
    let cl = client(&c);
    let r = cl
        .call("create-c", &create_op("src", size), None)
        .unwrap()
        .0;
    assert!(r.is_ok(), "{r:?}");
    let copy = copy_op("src", "dst");
    let h = thread::spawn(move || cl.call("copy-c", &copy, None).unwrap());
    let status = c.wait_service_exit(Duration::from_secs(60)).unwrap();
    assert!(!status.success(), "the injected crash stops the service");
    let recs = read_records(&c.journal_path()).unwrap();
    assert!(
        !recs
            .iter()
            .any(|r| matches!(r, Record::Done { op_id, .. } if op_id == "copy-c")),
        "the crash came before the Done record"
    );
    c.spec.service_args.clear();
    c.start_service().unwrap();
    let (result, _) = h.join().unwrap();
    assert_eq!(result, copied("src", "dst", size));
    assert_eq!(count(&c, "copy-c"), (1, 1, 0), "delivered, not re-run");
}

/// The netns backend's VIP takeover announces itself: a client host whose ARP entry for the
/// VIP points elsewhere (and which sends nothing) has it pointed at the VIP's virtual MAC
/// by the gratuitous ARP alone; giving the VIP up removes the address.
#[test]
fn netns_vip_acquire_sends_a_gratuitous_arp() {
    if !require_root("the netns VIP backend needs root") {
        return;
    }
    if !require_program("ip", "iproute2") {
        return;
    }
    use blocklab::failover::vip::VipBackend;
    use harness::cli::failover::cluster::NetTopo;
    let tag = format!("bg{}", std::process::id() % 100000);
    let net = NetTopo::create(&tag, 1).unwrap();
    let vip = net.addr(100);
    let mac = "02:00:5e:00:01:07";
    let neigh = |ns: &str| -> String {
        let out = std::process::Command::new("ip")
            .args(["-n", ns, "neigh", "show", &vip.to_string()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let ok = std::process::Command::new("ip")
        .args(["-n", &net.client, "neigh", "replace", &vip.to_string()])
        .args(["lladdr", "02:00:00:00:00:99", "dev", "eth0", "nud", "stale"])
        .status()
        .unwrap();
    assert!(ok.success());
    assert!(neigh(&net.client).contains("02:00:00:00:00:99"));
    let node_ns = net.nodes[0].clone();
    let vip_dev_addrs = thread::scope(|s| {
        s.spawn(|| {
            enter_netns(&node_ns).unwrap();
            let b = VipBackend::Netns {
                vip: std::net::IpAddr::V4(vip),
                lower: "eth0".into(),
                vip_dev: "vip0".into(),
                mac: mac.into(),
            };
            let listener = b.acquire(7200).unwrap();
            assert_eq!(listener.local_addr().unwrap().ip(), vip);
            // The client host learns the virtual MAC without sending anything.
            wait_for("a gratuitous ARP", Duration::from_secs(20), || {
                neigh(&net.client).contains(mac)
            });
            drop(listener);
            b.release();
            let out = std::process::Command::new("ip")
                .args(["-o", "addr", "show"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).to_string()
        })
        .join()
        .unwrap()
    });
    assert!(
        !vip_dev_addrs.contains(&vip.to_string()),
        "the VIP is gone after release: {vip_dev_addrs}"
    );
}
