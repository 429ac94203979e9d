//! LUN mapping end to end: editing on a real ZooKeeper started by the test (and on the
//! embedded store), concurrent editors, gateways deciding I/O on a real device, the
//! filesync baseline.

use blocklab::coord::embedded::EmbeddedStore;
use blocklab::coord::zk_server::ZkServer;
use blocklab::coord::{connect, ConnectOptions, Coord, CoordSpec};
use blocklab::dev::{AlignedBuf, Device, IoEngine, UringEngine};
use blocklab::lunmap::editor::LunMap;
use blocklab::lunmap::follow::follow_coord;
use blocklab::lunmap::gateway::{GatewayClient, GatewayServer};
use blocklab::lunmap::view::{Change, MapView};
use blocklab::lunmap::{filesync, Backing, Layout, Lun, LunMapError, Target};
use blocklab::testing::{is_root, scratch_dir, sparse_file, wait_for, LoopDevices};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// How long a test waits for a condition before failing.
const WAIT: Duration = Duration::from_secs(30);

const T0: &str = "iqn.2026-11.lab.blocklab:t0";
const H1: &str = "iqn.2026-11.lab.host:h1";
const H2: &str = "iqn.2026-11.lab.host:h2";

fn target(iqn: &str) -> Target {
    Target {
        iqn: iqn.into(),
        portal: "127.0.0.1:3260".into(),
    }
}

fn range(dev: &str) -> Backing {
    Backing::Range {
        device: dev.into(),
        offset: 1 << 20,
    }
}

fn zk_connect(zk: &ZkServer, chroot: &str) -> Box<dyn Coord> {
    connect(&zk.spec(chroot), &ConnectOptions::default()).unwrap()
}

fn operations(c: &dyn Coord) {
    let m = LunMap::open(c, "c1").unwrap();
    m.create_lun(1, "db0", 16 << 20, range("/dev/loop-x"))
        .unwrap();
    assert!(matches!(
        m.create_lun(2, "db0", 4096, range("/dev/loop-x")),
        Err(LunMapError::LunExists(_))
    ));
    let a = m.map("db0", &target(T0), H1).unwrap();
    assert_eq!((a.generation, a.changed), (1, true));
    let again = m.map("db0", &target(T0), H1).unwrap();
    assert!(!again.changed, "mapping twice is a no-op");
    m.map("db0", &target(T0), H2).unwrap();
    assert_eq!(
        m.query_initiator(H1).unwrap(),
        vec![("db0".to_string(), T0.to_string())]
    );
    let v = m.load().unwrap();
    assert_eq!(v.mapping_count(), 2);
    assert_eq!(v.luns["db0"].lun.generation, 2);
    assert_eq!(
        v.luns["db0"].targets[T0].target.as_ref().unwrap().portal,
        "127.0.0.1:3260"
    );
    // The layout is the documented one.
    let l = m.layout();
    assert!(c.exists(&l.initiator("db0", T0, H1)).unwrap().is_some());
    // Bad input.
    assert!(matches!(
        m.map("nolun", &target(T0), H1),
        Err(LunMapError::NoSuchLun(_))
    ));
    for bad in ["", "Upper", "a/b", "iqn"] {
        assert!(matches!(
            m.map("db0", &target(T0), bad),
            Err(LunMapError::InvalidName { .. })
        ));
        assert!(matches!(
            m.map("db0", &target(bad), H1),
            Err(LunMapError::InvalidName { .. })
        ));
    }
    assert!(matches!(
        m.create_lun(3, "../x", 4096, range("/d")),
        Err(LunMapError::InvalidName { .. })
    ));
    assert!(matches!(
        m.create_lun(3, "odd", 1000, range("/d")),
        Err(LunMapError::BadLun { .. })
    ));
    assert!(LunMap::open(c, "Bad/Cluster").is_err());
    // Deleting a mapped LUN is refused unless forced.
    assert!(matches!(
        m.delete_lun("db0", false),
        Err(LunMapError::StillMapped { initiators: 2, .. })
    ));
    m.unmap("db0", T0, H2).unwrap();
    assert!(matches!(
        m.unmap("db0", T0, H2),
        Err(LunMapError::NotMapped { .. })
    ));
    m.delete_lun("db0", true).unwrap();
    assert!(m.load().unwrap().luns.is_empty());
    assert!(c.exists(&l.lun("db0")).unwrap().is_none());
    m.create_lun(1, "db1", 4096, range("/d")).unwrap();
    m.delete_lun("db1", false).unwrap();
}

#[test]
fn lunmap_operations_on_zookeeper_readable_with_zkcli() {
    let zk = ZkServer::start().unwrap();
    let c = zk_connect(&zk, "/");
    operations(&*c);
    let m = LunMap::open(&*c, "c1").unwrap();
    m.create_lun(7, "web", 1 << 20, range("/dev/loop-y"))
        .unwrap();
    m.map("web", &target(T0), H1).unwrap();
    // ZooKeeper's own client shows the layout.
    let cli = std::path::Path::new("/usr/share/zookeeper/bin/zkCli.sh");
    let out = std::process::Command::new(cli)
        .args(["-server", &zk.connect_string(), "ls", "-R", "/blocklab/c1"])
        .env("ZOO_LOG_DIR", zk.dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "/blocklab/c1/lunmap/luns/web/targets/{T0}/initiators/{H1}"
        )),
        "{text}"
    );
}

#[test]
fn lunmap_operations_on_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path().join("c.store")).unwrap();
    operations(&store.session());
}

fn concurrent_editors(new: &(dyn Fn() -> Box<dyn Coord> + Sync)) {
    let c = new();
    let m = LunMap::open(&*c, "race").unwrap();
    m.create_lun(1, "shared", 1 << 20, range("/d")).unwrap();
    let acked = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for e in 0..4 {
            let acked = &acked;
            s.spawn(move || {
                let c = new();
                let m = LunMap::open(&*c, "race").unwrap();
                for k in 0..15 {
                    // Two targets, so target creation races too.
                    let t = format!("iqn.2026-11.lab.blocklab:t{}", k % 2);
                    let i = format!("iqn.2026-11.lab.host:e{e}-{k}");
                    let ack = m.map("shared", &target(&t), &i).unwrap();
                    assert!(ack.changed);
                    acked.lock().unwrap().push((t, i, ack.generation));
                }
            });
        }
    });
    let acked = acked.into_inner().unwrap();
    let v = m.load().unwrap();
    assert_eq!(v.mapping_count(), 60);
    for (t, i, _) in &acked {
        assert!(v.check("shared", t, i).is_ok(), "lost {i}");
    }
    // Every acknowledged edit got its own generation.
    let mut gens: Vec<u64> = acked.iter().map(|a| a.2).collect();
    gens.sort();
    gens.dedup();
    assert_eq!(gens.len(), 60);
    assert_eq!(v.luns["shared"].lun.generation, 60);
}

#[test]
fn concurrent_editors_lose_nothing_on_zookeeper() {
    let zk = ZkServer::start().unwrap();
    concurrent_editors(&|| zk_connect(&zk, "/race"));
}

#[test]
fn concurrent_editors_lose_nothing_on_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path().join("c.store")).unwrap();
    concurrent_editors(&|| Box::new(store.session()));
}

fn pattern(len: usize, seed: u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(len);
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(7).wrapping_add(seed);
    }
    b
}

#[test]
fn gateway_refuses_unmapped_initiator_on_a_real_device() {
    let state = scratch_dir("blocklab-lunmap-");
    // A loop device when root, else a regular file.
    let (_guard, dev_path) = if is_root() {
        let g = LoopDevices::provision("lunmap-gw", 1, 64 << 20).unwrap();
        let p = g.paths()[0].clone();
        (Some(g), p)
    } else {
        eprintln!("not root: using a regular file instead of a loop device");
        let p = state.path().join("dev.img");
        sparse_file(&p, 64 << 20);
        (None, p)
    };
    let zk = ZkServer::start().unwrap();
    let editor = zk_connect(&zk, "/gw");
    let m = LunMap::open(&*editor, "c1").unwrap();
    m.create_lun(1, "db0", 8 << 20, range(&dev_path.display().to_string()))
        .unwrap();
    m.map("db0", &target(T0), H1).unwrap();

    let gw_coord: Arc<dyn Coord> = Arc::from(zk_connect(&zk, "/gw"));
    let view = Arc::new(RwLock::new(MapView::new(Layout::new("c1").unwrap())));
    let changes = Arc::new(Mutex::new(Vec::new()));
    let ch = Arc::clone(&changes);
    let _follower = follow_coord(
        gw_coord,
        Layout::new("c1").unwrap(),
        Arc::clone(&view),
        Box::new(move |c: &Change, _| ch.lock().unwrap().push(c.clone())),
    )
    .unwrap();
    let server = GatewayServer::start("127.0.0.1:0".parse().unwrap(), Arc::clone(&view)).unwrap();
    let mut cl = GatewayClient::connect(server.addr()).unwrap();

    let a = pattern(8192, 1);
    let r = cl.write("db0", T0, H1, 4096, &a).unwrap();
    assert!(r.ok, "{}", r.error);
    let (r, data) = cl.read("db0", T0, H1, 4096, 8192).unwrap();
    assert!(r.ok);
    assert_eq!(&data[..], &a[..]);
    // What is on the device: the LUN starts 1 MiB in.
    let dev = Device::open(&dev_path).unwrap();
    let mut eng = UringEngine::with_queue_depth(4).unwrap();
    let mut on_disk = AlignedBuf::new(8192);
    eng.read_at(&dev, (1 << 20) + 4096, &mut on_disk).unwrap();
    assert_eq!(&on_disk[..], &a[..]);

    // H2 is not mapped: refused, and nothing is written.
    let b = pattern(8192, 99);
    let r = cl.write("db0", T0, H2, 4096, &b).unwrap();
    assert!(!r.ok && r.refused, "{r:?}");
    assert!(r.error.contains("not mapped"), "{}", r.error);
    let (r, data) = cl.read("db0", T0, H2, 4096, 8192).unwrap();
    assert!(!r.ok && r.refused && data.is_empty());
    // Wrong target, unknown LUN, out of range, unaligned.
    assert!(
        cl.read("db0", "iqn.2026-11.lab.blocklab:t9", H1, 0, 4096)
            .unwrap()
            .0
            .refused
    );
    assert!(cl.read("nolun", T0, H1, 0, 4096).unwrap().0.refused);
    let (r, _) = cl.read("db0", T0, H1, 8 << 20, 4096).unwrap();
    assert!(!r.ok && !r.refused && r.error.contains("beyond"), "{r:?}");
    assert!(!cl.read("db0", T0, H1, 100, 4096).unwrap().0.ok);
    eng.read_at(&dev, (1 << 20) + 4096, &mut on_disk).unwrap();
    assert_eq!(
        &on_disk[..],
        &a[..],
        "refused write left the device untouched"
    );

    // Map H2: the gateway learns it through the watch, then serves it.
    let ack = m.map("db0", &target(T0), H2).unwrap();
    wait_for("mapping reaches the gateway", WAIT, || {
        view.read().unwrap().check("db0", T0, H2).is_ok()
    });
    let r = cl.write("db0", T0, H2, 4096, &b).unwrap();
    assert!(r.ok && r.generation >= ack.generation, "{r:?}");
    eng.read_at(&dev, (1 << 20) + 4096, &mut on_disk).unwrap();
    assert_eq!(&on_disk[..], &b[..]);
    // Unmap H1: refused again afterwards.
    m.unmap("db0", T0, H1).unwrap();
    wait_for("unmapping reaches the gateway", WAIT, || {
        view.read().unwrap().check("db0", T0, H1).is_err()
    });
    assert!(cl.read("db0", T0, H1, 0, 4096).unwrap().0.refused);
    let seen = changes.lock().unwrap().clone();
    assert!(seen.contains(&Change::Mapped {
        lun: "db0".into(),
        target: T0.into(),
        initiator: H2.into()
    }));
    assert!(seen.contains(&Change::Unmapped {
        lun: "db0".into(),
        target: T0.into(),
        initiator: H1.into()
    }));
    assert!(
        server
            .stats()
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 5
    );
}

#[test]
fn a_confirming_gateway_serves_a_mapping_its_view_has_not_seen_yet() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("dev.img");
    sparse_file(&dev, 4 << 20);
    let zk = ZkServer::start().unwrap();
    let editor = zk_connect(&zk, "/confirm");
    let m = LunMap::open(&*editor, "c1").unwrap();
    m.create_lun(1, "db0", 1 << 20, range(&dev.display().to_string()))
        .unwrap();
    m.map("db0", &target(T0), H1).unwrap();
    // A view that is never fed: every decision on it alone would be a refusal.
    let view = Arc::new(RwLock::new(MapView::new(Layout::new("c1").unwrap())));
    let gw: Arc<dyn Coord> = Arc::from(zk_connect(&zk, "/confirm"));
    let server = GatewayServer::start_confirming("127.0.0.1:0".parse().unwrap(), view, gw).unwrap();
    let mut cl = GatewayClient::connect(server.addr()).unwrap();
    let data = pattern(4096, 5);
    let r = cl.write("db0", T0, H1, 0, &data).unwrap();
    assert!(r.ok, "{r:?}");
    let (r, back) = cl.read("db0", T0, H1, 0, 4096).unwrap();
    assert!(r.ok && back[..] == data[..]);
    // An initiator the backend does not map is still refused, with nothing written.
    let r = cl.write("db0", T0, H2, 0, &pattern(4096, 6)).unwrap();
    assert!(!r.ok && r.refused, "{r:?}");
    let (_, back) = cl.read("db0", T0, H1, 0, 4096).unwrap();
    assert_eq!(&back[..], &data[..]);
    assert_eq!(
        server
            .stats()
            .confirmed
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
}

#[test]
fn gateway_follows_the_map_across_a_zookeeper_restart() {
    let mut zk = ZkServer::start().unwrap();
    let opts = ConnectOptions {
        session_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let spec = zk.spec("/restart");
    let editor = connect(&spec, &opts).unwrap();
    let m = LunMap::open(&*editor, "c1").unwrap();
    m.create_lun(1, "db0", 1 << 20, range("/d")).unwrap();
    m.map("db0", &target(T0), H1).unwrap();
    let gw: Arc<dyn Coord> = Arc::from(connect(&spec, &opts).unwrap());
    let view = Arc::new(RwLock::new(MapView::new(Layout::new("c1").unwrap())));
    let f = follow_coord(
        gw,
        Layout::new("c1").unwrap(),
        Arc::clone(&view),
        Box::new(|_, _| {}),
    )
    .unwrap();
    assert!(view.read().unwrap().check("db0", T0, H1).is_ok());
    zk.restart().unwrap();
    // The editor's next change (retried through the reconnect) reaches the gateway.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match m.map("db0", &target(T0), H2) {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "{e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    wait_for("change after restart reaches the gateway", WAIT, || {
        view.read().unwrap().check("db0", T0, H2).is_ok()
    });
    let v = m.load().unwrap();
    assert_eq!(v.mapping_count(), 2, "map intact after the restart");
    assert!(!f.finished(), "the follower survived the restart");
}

#[test]
fn filesync_baseline_propagates_by_copy_and_detects_a_silent_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let master = dir.path().join("master.json");
    let gw_dir = dir.path().join("gw1");
    let hb = dir.path().join("hb");
    std::fs::create_dir_all(&gw_dir).unwrap();
    std::fs::create_dir_all(&hb).unwrap();
    let ed = filesync::FileEditor::new(&master);
    ed.create_lun(Lun {
        id: 1,
        name: "db0".into(),
        size_bytes: 1 << 20,
        backing: range("/d"),
        generation: 0,
    })
    .unwrap();
    assert!(matches!(
        ed.map("nolun", &target(T0), H1),
        Err(LunMapError::NoSuchLun(_))
    ));
    let _sync = filesync::start_syncer(
        master.clone(),
        vec![gw_dir.clone()],
        Duration::from_millis(200),
    );
    let view = Arc::new(RwLock::new(MapView::new(Layout::new("c1").unwrap())));
    let downs = Arc::new(Mutex::new(Vec::new()));
    let _poll = filesync::follow_file(
        gw_dir.clone(),
        Arc::clone(&view),
        Box::new(|_, _| {}),
        Duration::from_millis(20),
    );
    assert_eq!(ed.map("db0", &target(T0), H1).unwrap(), 1);
    wait_for("copy reaches the gateway", WAIT, || {
        view.read().unwrap().check("db0", T0, H1).is_ok()
    });
    // Heartbeats: gw2 beats, then stops; the watcher declares it down.
    let beat = filesync::start_heartbeat(hb.clone(), "gw2".into(), Duration::from_millis(50));
    let d = Arc::clone(&downs);
    let _hbw = filesync::follow_heartbeats(
        hb.clone(),
        Arc::clone(&view),
        Box::new(move |c: &Change, _| d.lock().unwrap().push(c.clone())),
        Duration::from_millis(50),
    );
    wait_for("gw2 up", WAIT, || {
        view.read().unwrap().gateways.contains_key("gw2")
    });
    beat.stop().unwrap();
    wait_for("gw2 declared down", WAIT, || {
        downs
            .lock()
            .unwrap()
            .contains(&Change::GatewayDown { node: "gw2".into() })
    });
    // A corrupt copy is skipped: the gateway keeps its last good map.
    std::fs::write(gw_dir.join(filesync::MAP_FILE), b"{not json").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(view.read().unwrap().check("db0", T0, H1).is_ok());
    let _ = CoordSpec::parse("embedded:/x").unwrap();
}
