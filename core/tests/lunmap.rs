//! LUN mapping end to end: editing on a real ZooKeeper started by the test (and on the
//! embedded store), concurrent editors, gateways deciding I/O on a real device, the
//! filesync baseline.

use blocklab::coord::embedded::EmbeddedStore;
use blocklab::coord::zk_server::ZkServer;
use blocklab::coord::{
    connect, ConnectOptions, Coord, CoordSpec, NodeKind, Op, Read, ReadResult,
    Result as CoordResult, Stat, Watch,
};
use blocklab::dev::{AlignedBuf, Device, IoEngine, UringEngine};
use blocklab::lunmap::editor::LunMap;
use blocklab::lunmap::follow::follow_coord;
use blocklab::lunmap::gateway::{GatewayClient, GatewayServer};
use blocklab::lunmap::view::{Change, MapView, NodeEvent};
use blocklab::lunmap::{filesync, Backing, Layout, Lun, LunMapError, Target};
use blocklab::testing::{
    pattern_buf, require_zookeeper, retry, scratch, sparse_file, wait_for, TestDevices,
};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// How long a test waits for a condition before failing.
const WAIT: Duration = Duration::from_secs(30);

const T0: &str = "iqn.2026-11.lab.blocklab:t0";
const H1: &str = "iqn.2026-11.lab.host:h1";
const H2: &str = "iqn.2026-11.lab.host:h2";
const H3: &str = "iqn.2026-11.lab.host:h3";
const T1: &str = "iqn.2026-11.lab.blocklab:t1";

/// A fresh embedded store in a scratch directory (removed when the directory is dropped).
fn embedded() -> (tempfile::TempDir, Arc<EmbeddedStore>) {
    let dir = scratch();
    let store = EmbeddedStore::open(dir.path().join("c.store")).unwrap();
    (dir, store)
}

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
    assert_eq!((a.attempts, a.changed), (1, true));
    let again = m.map("db0", &target(T0), H1).unwrap();
    assert!(!again.changed, "mapping twice is a no-op");
    m.map("db0", &target(T0), H2).unwrap();
    assert_eq!(
        m.query_initiator(H1).unwrap(),
        vec![("db0".to_string(), T0.to_string())]
    );
    assert!(m
        .query_initiator("iqn.2026-11.lab.host:nobody")
        .unwrap()
        .is_empty());
    assert_eq!(m.initiators("db0", T0).unwrap(), vec![H1, H2]);
    let v = m.load().unwrap();
    assert_eq!(v.mapping_count(), 2);
    assert_eq!(
        v.luns["db0"].targets[T0].target.as_ref().unwrap().portal,
        "127.0.0.1:3260"
    );
    // A target's portal is fixed when it is created: another portal is refused, none
    // means "whatever it has"; a new target without a portal gets the default.
    let other_portal = Target {
        iqn: T0.into(),
        portal: "10.0.0.9:3260".into(),
    };
    let e = m.map("db0", &other_portal, H3).unwrap_err();
    assert!(
        matches!(&e, LunMapError::PortalMismatch { portal, wanted, .. }
            if portal == "127.0.0.1:3260" && wanted == "10.0.0.9:3260"),
        "{e}"
    );
    assert!(
        m.initiators("db0", T0).unwrap().len() == 2,
        "nothing mapped"
    );
    m.map_via("db0", T0, None, H3).unwrap();
    m.unmap("db0", T0, H3).unwrap();
    m.map_via("db0", T1, None, H3).unwrap();
    assert_eq!(
        m.load().unwrap().luns["db0"].targets[T1]
            .target
            .as_ref()
            .unwrap()
            .portal,
        blocklab::lunmap::DEFAULT_PORTAL
    );
    m.unmap("db0", T1, H3).unwrap();
    // LUN ids are unique.
    let e = m.create_lun(1, "db9", 4096, range("/d")).unwrap_err();
    assert!(
        matches!(&e, LunMapError::IdInUse { id: 1, lun } if lun == "db0"),
        "{e}"
    );
    assert!(c.exists(&m.layout().lun("db9")).unwrap().is_none());
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
    assert!(matches!(
        m.unmap("nolun", T0, H2),
        Err(LunMapError::NoSuchLun(_))
    ));
    m.delete_lun("db0", true).unwrap();
    assert!(m.load().unwrap().luns.is_empty());
    assert!(c.exists(&l.lun("db0")).unwrap().is_none());
    assert!(
        c.exists(&l.id(1)).unwrap().is_none(),
        "the id claim went too"
    );
    assert!(matches!(
        m.delete_lun("db0", false),
        Err(LunMapError::NoSuchLun(_))
    ));
    // The id is free again.
    m.create_lun(1, "db1", 4096, range("/d")).unwrap();
    m.delete_lun("db1", false).unwrap();
}

#[test]
fn lunmap_operations_on_zookeeper_readable_with_zkcli() {
    if !require_zookeeper() {
        return;
    }
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
    let (_dir, store) = embedded();
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
                    acked.lock().unwrap().push((t, i));
                    // Unmaps race the maps too: every fifth mapping goes again.
                    if k % 5 == 4 {
                        let (t, i) = acked.lock().unwrap().pop().unwrap();
                        assert!(m.unmap("shared", &t, &i).unwrap().changed);
                    }
                }
            });
        }
    });
    let acked = acked.into_inner().unwrap();
    // Nothing acknowledged is lost, nothing unmapped comes back.
    let v = m.load().unwrap();
    assert_eq!(acked.len(), 48);
    assert_eq!(v.mapping_count(), 48);
    for (t, i) in &acked {
        assert!(v.check("shared", t, i).is_ok(), "lost {i}");
    }
}

#[test]
fn concurrent_editors_lose_nothing_on_zookeeper() {
    if !require_zookeeper() {
        return;
    }
    let zk = ZkServer::start().unwrap();
    concurrent_editors(&|| zk_connect(&zk, "/race"));
}

#[test]
fn concurrent_editors_lose_nothing_on_embedded() {
    let (_dir, store) = embedded();
    concurrent_editors(&|| Box::new(store.session()));
}

#[test]
fn gateway_refuses_unmapped_initiator_on_a_real_device() {
    if !require_zookeeper() {
        return;
    }
    // A loop device when root, else a regular file.
    let devs = TestDevices::loop_or_files("lunmap-gw", 1, 64 << 20);
    let dev_path = devs.paths()[0].clone();
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

    let a = pattern_buf(8192, 1);
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
    let b = pattern_buf(8192, 99);
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
    m.map("db0", &target(T0), H2).unwrap();
    wait_for("mapping reaches the gateway", WAIT, || {
        view.read().unwrap().check("db0", T0, H2).is_ok()
    });
    let r = cl.write("db0", T0, H2, 4096, &b).unwrap();
    assert!(r.ok, "{r:?}");
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
    if !require_zookeeper() {
        return;
    }
    let dir = scratch();
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
    let data = pattern_buf(4096, 5);
    let r = cl.write("db0", T0, H1, 0, &data).unwrap();
    assert!(r.ok, "{r:?}");
    let (r, back) = cl.read("db0", T0, H1, 0, 4096).unwrap();
    assert!(r.ok && back[..] == data[..]);
    // An initiator the backend does not map is still refused, with nothing written.
    let r = cl.write("db0", T0, H2, 0, &pattern_buf(4096, 6)).unwrap();
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
    if !require_zookeeper() {
        return;
    }
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
    retry("mapping after the restart", WAIT, || {
        m.map("db0", &target(T0), H2)
    });

    wait_for("change after restart reaches the gateway", WAIT, || {
        view.read().unwrap().check("db0", T0, H2).is_ok()
    });
    let v = m.load().unwrap();
    assert_eq!(v.mapping_count(), 2, "map intact after the restart");
    assert!(!f.finished(), "the follower survived the restart");
}

#[test]
fn filesync_baseline_propagates_by_copy_and_detects_a_silent_gateway() {
    let dir = scratch();
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
    let refused = Arc::new(Mutex::new(Vec::new()));
    let r = Arc::clone(&refused);
    let _poll = filesync::follow_file_reporting(
        gw_dir.clone(),
        Arc::clone(&view),
        Box::new(|_, _| {}),
        Box::new(move |e: &LunMapError| r.lock().unwrap().push(e.to_string())),
        Duration::from_millis(20),
    );
    assert!(ed.map("db0", &target(T0), H1).unwrap());
    assert!(!ed.map("db0", &target(T0), H1).unwrap(), "mapped already");
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
    // A corrupt copy is refused (the follower says so): the gateway keeps its last good
    // map. Written atomically, so the follower reads the whole corrupt file at once.
    assert!(refused.lock().unwrap().is_empty(), "{refused:?}");
    filesync::write_atomic(&gw_dir.join(filesync::MAP_FILE), b"{not json").unwrap();
    wait_for("the follower to refuse the corrupt map", WAIT, || {
        !refused.lock().unwrap().is_empty()
    });
    let why = refused.lock().unwrap().clone();
    assert!(
        why.len() == 1 && why[0].contains(filesync::MAP_FILE),
        "one refusal, naming the file: {why:?}"
    );
    assert!(view.read().unwrap().check("db0", T0, H1).is_ok());
    let _ = CoordSpec::parse("embedded:/x").unwrap();
}

/// A session that runs `hook` (another editor's change, through its own session) right
/// before its first multi-operation: a race between an editor's read and its commit, made
/// deterministic. Everything else goes to the real backend.
struct RaceBeforeCommit<'a> {
    inner: &'a dyn Coord,
    hook: Mutex<Option<Box<dyn FnOnce() + Send + 'a>>>,
}

impl<'a> RaceBeforeCommit<'a> {
    fn new(inner: &'a dyn Coord, hook: impl FnOnce() + Send + 'a) -> Self {
        RaceBeforeCommit {
            inner,
            hook: Mutex::new(Some(Box::new(hook))),
        }
    }
}

impl Coord for RaceBeforeCommit<'_> {
    fn create(&self, path: &str, data: &[u8], kind: NodeKind) -> CoordResult<Stat> {
        self.inner.create(path, data, kind)
    }
    fn get(&self, path: &str) -> CoordResult<(Vec<u8>, Stat)> {
        self.inner.get(path)
    }
    fn exists(&self, path: &str) -> CoordResult<Option<Stat>> {
        self.inner.exists(path)
    }
    fn set(&self, path: &str, data: &[u8], version: Option<i32>) -> CoordResult<Stat> {
        self.inner.set(path, data, version)
    }
    fn delete(&self, path: &str, version: Option<i32>) -> CoordResult<()> {
        self.inner.delete(path, version)
    }
    fn children(&self, path: &str) -> CoordResult<Vec<String>> {
        self.inner.children(path)
    }
    fn multi(&self, ops: &[Op]) -> CoordResult<()> {
        let hook = self.hook.lock().unwrap().take();
        if let Some(h) = hook {
            h();
        }
        self.inner.multi(ops)
    }
    fn read_many(&self, reads: &[Read]) -> CoordResult<Vec<ReadResult>> {
        self.inner.read_many(reads)
    }
    fn watch(&self, path: &str) -> CoordResult<Watch> {
        self.inner.watch(path)
    }
    fn sync(&self, path: &str) -> CoordResult<()> {
        self.inner.sync(path)
    }
    fn session_id(&self) -> u64 {
        self.inner.session_id()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn close(&self) {
        self.inner.close()
    }
}

/// delete_lun racing a map: the map wins, and the delete reports the new mapping (or, when
/// forced, deletes it too); never a raw "has children" error.
fn delete_racing_map(new: &dyn Fn() -> Box<dyn Coord>) {
    let editor = new();
    let other = new();
    let m = LunMap::open(&*editor, "race-del").unwrap();
    let o = LunMap::open(&*other, "race-del").unwrap();
    for (lun, id) in [("a", 1), ("b", 2), ("c", 3)] {
        m.create_lun(id, lun, 1 << 20, range("/d")).unwrap();
        // The target exists with no initiator left.
        m.map(lun, &target(T0), H1).unwrap();
        m.unmap(lun, T0, H1).unwrap();
    }
    // A map through the existing target.
    let racing = RaceBeforeCommit::new(&*editor, || {
        o.map("a", &target(T0), H2).unwrap();
    });
    let e = LunMap::open(&racing, "race-del")
        .unwrap()
        .delete_lun("a", false)
        .unwrap_err();
    assert!(
        matches!(e, LunMapError::StillMapped { initiators: 1, .. }),
        "{e}"
    );
    assert!(
        m.load().unwrap().check("a", T0, H2).is_ok(),
        "the map stands"
    );
    // A map through a new target.
    let racing = RaceBeforeCommit::new(&*editor, || {
        o.map("b", &target(T1), H2).unwrap();
    });
    let e = LunMap::open(&racing, "race-del")
        .unwrap()
        .delete_lun("b", false)
        .unwrap_err();
    assert!(
        matches!(e, LunMapError::StillMapped { initiators: 1, .. }),
        "{e}"
    );
    // Forced: the racing mapping goes with the LUN.
    let racing = RaceBeforeCommit::new(&*editor, || {
        o.map("c", &target(T0), H2).unwrap();
    });
    LunMap::open(&racing, "race-del")
        .unwrap()
        .delete_lun("c", true)
        .unwrap();
    assert!(editor.exists(&m.layout().lun("c")).unwrap().is_none());
    assert!(editor.exists(&m.layout().id(3)).unwrap().is_none());
    // A map racing the LUN's deletion: the map reports the LUN gone.
    let racing = RaceBeforeCommit::new(&*editor, || {
        o.delete_lun("b", true).unwrap();
    });
    let e = LunMap::open(&racing, "race-del")
        .unwrap()
        .map("b", &target(T0), H3)
        .unwrap_err();
    assert!(matches!(e, LunMapError::NoSuchLun(_)), "{e}");
    // Two editors creating the same target: the loser retries and maps through it.
    m.create_lun(4, "d", 1 << 20, range("/d")).unwrap();
    let racing = RaceBeforeCommit::new(&*editor, || {
        o.map("d", &target(T0), H1).unwrap();
    });
    let ack = LunMap::open(&racing, "race-del")
        .unwrap()
        .map("d", &target(T0), H2)
        .unwrap();
    assert_eq!((ack.attempts, ack.changed), (2, true));
    assert_eq!(m.initiators("d", T0).unwrap(), vec![H1, H2]);
}

#[test]
fn delete_racing_a_map_reports_the_mapping_on_embedded() {
    let (_dir, store) = embedded();
    delete_racing_map(&|| Box::new(store.session()));
}

#[test]
fn delete_racing_a_map_reports_the_mapping_on_zookeeper() {
    if !require_zookeeper() {
        return;
    }
    let zk = ZkServer::start().unwrap();
    delete_racing_map(&|| zk_connect(&zk, "/race-del"));
}

#[test]
fn a_layout_edited_by_hand_fails_clearly_instead_of_retrying() {
    let (_dir, store) = embedded();
    let c = store.session();
    let m = LunMap::open(&c, "c1").unwrap();
    m.create_lun(1, "db0", 1 << 20, range("/d")).unwrap();
    m.map("db0", &target(T0), H1).unwrap();
    // A node blocklab does not write under the LUN: the delete cannot empty it.
    let stray = format!("{}/notes", m.layout().lun("db0"));
    c.create(&stray, b"by hand", NodeKind::Persistent).unwrap();
    let e = m.delete_lun("db0", true).unwrap_err();
    assert!(
        matches!(&e, LunMapError::Structural { path, .. } if path == &m.layout().lun("db0")),
        "{e}"
    );
    assert!(e.to_string().contains("edited by hand"), "{e}");
    assert!(
        m.load().unwrap().check("db0", T0, H1).is_ok(),
        "nothing deleted"
    );
    // A target whose initiators directory was removed by hand.
    m.map("db0", &target(T1), H1).unwrap();
    m.unmap("db0", T1, H1).unwrap();
    c.delete(&m.layout().initiators("db0", T1), None).unwrap();
    let e = m.map("db0", &target(T1), H2).unwrap_err();
    assert!(matches!(e, LunMapError::Structural { .. }), "{e}");
}

fn lun_doc(name: &str) -> Vec<u8> {
    serde_json::to_vec(&Lun {
        id: 9,
        name: name.into(),
        size_bytes: 1 << 20,
        backing: range("/d"),
    })
    .unwrap()
}

/// A follower, the view it keeps, and the changes it reported.
type Followed = (
    blocklab::lunmap::follow::Follower,
    Arc<RwLock<MapView>>,
    Arc<Mutex<Vec<Change>>>,
);

/// A follower on the embedded store, recording the changes it reports.
fn follow(store: &Arc<EmbeddedStore>, cluster: &str) -> Followed {
    let layout = Layout::new(cluster).unwrap();
    let view = Arc::new(RwLock::new(MapView::new(layout.clone())));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let f = follow_coord(
        Arc::new(store.session()),
        layout,
        Arc::clone(&view),
        Box::new(move |c: &Change, _| s.lock().unwrap().push(c.clone())),
    )
    .unwrap();
    (f, view, seen)
}

#[test]
fn followers_classify_by_position_so_layout_names_are_fine_as_names() {
    let (_dir, store) = embedded();
    let c = store.session();
    // A cluster named "initiators": new LUNs and their mappings reach the view.
    let (_f, view, _) = follow(&store, "initiators");
    let m = LunMap::open(&c, "initiators").unwrap();
    m.create_lun(1, "db0", 1 << 20, range("/d")).unwrap();
    m.map("db0", &target(T0), H1).unwrap();
    wait_for("the new LUN's mapping", WAIT, || {
        view.read().unwrap().check("db0", T0, H1).is_ok()
    });
    // A LUN named "initiators": its target keeps its portal.
    let (_g, view, _) = follow(&store, "c2");
    let m = LunMap::open(&c, "c2").unwrap();
    m.create_lun(1, "initiators", 1 << 20, range("/d")).unwrap();
    m.map("initiators", &target(T0), H1).unwrap();
    wait_for("the target's portal", WAIT, || {
        let v = view.read().unwrap();
        v.check("initiators", T0, H1).is_ok()
            && v.luns["initiators"].targets[T0]
                .target
                .as_ref()
                .is_some_and(|t| t.portal == "127.0.0.1:3260")
    });
}

#[test]
fn a_corrupt_lun_node_is_reported_and_not_served_while_the_rest_is() {
    let (_dir, store) = embedded();
    let c = store.session();
    let m = LunMap::open(&c, "c1").unwrap();
    for (id, lun) in [(1, "good"), (2, "bad")] {
        m.create_lun(id, lun, 1 << 20, range("/d")).unwrap();
        m.map(lun, &target(T0), H1).unwrap();
    }
    let (f, view, seen) = follow(&store, "c1");
    let bad = m.layout().lun("bad");
    c.set(&bad, b"{not a LUN", None).unwrap();
    wait_for("the corruption is reported", WAIT, || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|ch| matches!(ch, Change::Corrupt { path, .. } if *path == bad))
    });
    {
        let v = view.read().unwrap();
        assert!(matches!(
            v.check("bad", T0, H1),
            Err(LunMapError::Corrupt { .. })
        ));
        assert!(v.check("good", T0, H1).is_ok());
    }
    // A whole load (a gateway starting, or reloading after a reconnect) does not fail on
    // it: the LUN is there as corrupt, the others as they are.
    let v = m.load().unwrap();
    assert!(v.luns["bad"].lun.is_err());
    assert!(v.check("good", T0, H1).is_ok());
    assert_eq!(
        v.mapping_count(),
        2,
        "the corrupt LUN's mappings stay known"
    );
    let (_f2, view2, seen2) = follow(&store, "c1");
    assert!(view2.read().unwrap().check("good", T0, H1).is_ok());
    assert!(seen2
        .lock()
        .unwrap()
        .iter()
        .any(|ch| matches!(ch, Change::Corrupt { path, .. } if *path == bad)));
    // The follower goes on: a new mapping arrives, and a repaired LUN is served again.
    m.map("good", &target(T0), H2).unwrap();
    c.set(&bad, &lun_doc("bad"), None).unwrap();
    wait_for("repair and new mapping", WAIT, || {
        let v = view.read().unwrap();
        v.check("bad", T0, H1).is_ok() && v.check("good", T0, H2).is_ok()
    });
    assert!(!f.finished());
    f.stop().unwrap();
}

#[test]
fn gateway_answers_a_write_of_a_bad_length_and_keeps_the_connection() {
    let dir = scratch();
    let dev = dir.path().join("dev.img");
    sparse_file(&dev, 4 << 20);
    let layout = Layout::new("c1").unwrap();
    let mut v = MapView::new(layout.clone());
    let lun = Lun {
        id: 1,
        name: "db0".into(),
        size_bytes: 1 << 20,
        backing: Backing::Range {
            device: dev.display().to_string(),
            offset: 0,
        },
    };
    v.apply(&NodeEvent::Upsert {
        path: layout.lun("db0"),
        data: serde_json::to_vec(&lun).unwrap(),
    });
    v.apply(&NodeEvent::Upsert {
        path: layout.initiator("db0", T0, H1),
        data: Vec::new(),
    });
    let server =
        GatewayServer::start("127.0.0.1:0".parse().unwrap(), Arc::new(RwLock::new(v))).unwrap();
    let mut cl = GatewayClient::connect(server.addr()).unwrap();
    // Lengths the device cannot take: an error each, nothing written, and the payload is
    // consumed (the next request on the same connection is understood).
    for bad in [100usize, 0, 4097, 8191] {
        let r = cl.write("db0", T0, H1, 0, &vec![0xab; bad]).unwrap();
        assert!(!r.ok && !r.refused, "{bad}: {r:?}");
        assert!(r.error.contains("multiple of 4096"), "{}", r.error);
        let (r, data) = cl.read("db0", T0, H1, 0, 4096).unwrap();
        assert!(r.ok, "{r:?}");
        assert!(data.iter().all(|&b| b == 0), "nothing was written");
    }
    let r = cl.write("db0", T0, H1, 0, &[7u8; 4096]).unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(cl.read("db0", T0, H1, 0, 4096).unwrap().1, vec![7u8; 4096]);
    let s = server.stats();
    assert_eq!(s.failed.load(std::sync::atomic::Ordering::Relaxed), 4);
    assert_eq!(s.served.load(std::sync::atomic::Ordering::Relaxed), 6);
}
