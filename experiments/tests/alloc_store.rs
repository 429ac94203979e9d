//! The store path end to end with real processes and sockets: an index server process,
//! two storage nodes of two processes each (`blocklab alloc node`), the client library
//! storing and fetching channels, a full cluster, a device coming online through the
//! index server, the audit of both nodes against the index's records; and node processes
//! that die or restart on another port while clients store.

use std::path::{Path, PathBuf};
use std::process::Command;

use blocklab::alloc::attached::Attached;
use blocklab::alloc::audit::{audit, Record};
use blocklab::alloc::index::records;
use blocklab::alloc::store::{client_fetch, client_store};
use blocklab::alloc::wire::Location;
use blocklab::alloc::{AllocError, BlockRef, DeviceRegion, DeviceSpec};
use blocklab::testing::{
    free_port, scratch_dir, shm_dir, sparse_file, spawn_announcing, KillOnDrop, LoopDevices,
};

const BLOCK: u64 = 64 << 10;

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blocklab"))
}

/// Spawns `blocklab ARGS` and returns it with its first stdout line.
fn spawn(args: &[String]) -> (KillOnDrop, String) {
    spawn_announcing(Command::new(exe()).args(args))
}

fn region(p: &Path, blocks: u64) -> DeviceRegion {
    blocklab::testing::region(p, blocks, BLOCK)
}

fn node_args(
    dir: &Path,
    port: u16,
    id: u16,
    name: &str,
    index: &str,
    devs: &[DeviceRegion],
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "alloc".into(),
        "node".into(),
        "--dir".into(),
        dir.display().to_string(),
        "--proc-id".into(),
        id.to_string(),
        "--internal-port".into(),
        port.to_string(),
        "--node-name".into(),
        name.into(),
        "--index".into(),
        index.into(),
        "--block-size".into(),
        BLOCK.to_string(),
    ];
    if !devs.is_empty() {
        let specs: Vec<String> = devs
            .iter()
            .map(|d| DeviceSpec::region(d).to_string())
            .collect();
        a.push("--devices".into());
        a.push(specs.join(","));
    }
    a
}

#[test]
fn channels_are_stored_and_fetched_end_to_end_until_the_cluster_is_full() {
    let Some(g) = LoopDevices::provision("t-alloc-store", 3, 16 << 20) else {
        return;
    };
    let paths = g.paths();
    let (_ix, line) = spawn(&[
        "index".into(),
        "serve".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ]);
    let index = line.strip_prefix("listening ").unwrap().to_string();

    let dirs = [
        shm_dir("blocklab-alloc-test-"),
        shm_dir("blocklab-alloc-test-"),
    ];
    let mut procs = Vec::new();
    for (n, name) in ["node-a", "node-b"].iter().enumerate() {
        let port = free_port();
        let devs = [region(&paths[n], 6)];
        for id in 1..=2u16 {
            let (c, l) = spawn(&node_args(dirs[n].path(), port, id, name, &index, &devs));
            assert!(l.starts_with("ready "), "{l}");
            procs.push(c);
        }
    }

    // Bad input: a channel never stored, a request larger than a block.
    let e = client_fetch(&index, 424242).unwrap_err();
    assert!(matches!(e, AllocError::NotFound { channel: 424242 }), "{e}");
    let e = client_store(&index, 1, &vec![7u8; BLOCK as usize + 1]).unwrap_err();
    assert!(e.to_string().contains("larger than a block"), "{e}");

    // Store pieces of 1..=5 units until the cluster is full.
    let mut stored: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut full = None;
    for ch in 0..200u64 {
        let len = 1000 + (ch as usize % 5) * 4096;
        let data: Vec<u8> = (0..len).map(|i| (ch as usize * 31 + i) as u8).collect();
        match client_store(&index, ch, &data) {
            Ok(loc) => {
                assert_eq!(loc.len, len as u64);
                stored.push((ch, data));
            }
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let e = full.expect("12 blocks of 64 KiB must fill up");
    assert!(matches!(e, AllocError::ClusterFull { .. }), "{e}");
    assert!(e.to_string().contains("cluster is full"));
    assert!(stored.len() > 20, "only {} stored", stored.len());
    // Every acknowledged piece reads back.
    for (ch, data) in &stored {
        let got = client_fetch(&index, *ch).unwrap();
        assert_eq!(got, vec![data.clone()], "channel {ch}");
    }
    // Both nodes took data (the index moved on when one was full).
    let recs = records(&index).unwrap();
    for name in ["node-a", "node-b"] {
        assert!(
            recs.iter().any(|(_, l)| l.node == name),
            "{name} stored nothing"
        );
    }

    // A new device on node-a, announced through the index server by path: room again
    // (the node's leader puts its blocks after the first MiB of the raw device).
    let st = Command::new(exe())
        .args([
            "index",
            "device-online",
            "--index",
            &index,
            "--node",
            "node-a",
            "--device",
        ])
        .arg(&paths[2])
        .status()
        .unwrap();
    assert!(st.success());
    // A whole block: no unfilled block has that much room, only the new device does.
    let big: Vec<u8> = (0..BLOCK as usize).map(|i| (i / 7) as u8).collect();
    let loc = client_store(&index, 999, &big).unwrap();
    assert_eq!(loc.node, "node-a");
    assert_eq!(loc.device, paths[2]);
    assert_eq!(client_fetch(&index, 999).unwrap(), vec![big]);

    // The audit of each node against the index's records: nothing leaked or doubled.
    let recs = records(&index).unwrap();
    for (n, name) in ["node-a", "node-b"].iter().enumerate() {
        assert_audit_clean(dirs[n].path(), &recs, name);
    }
    drop(procs);
}

/// Audits the node attached at `dir` against the index's records of node `name`: no
/// block leaked, none allocated twice.
fn assert_audit_clean(dir: &Path, recs: &[(u64, Location)], name: &str) {
    let at = Attached::open(dir).unwrap();
    let mine: Vec<Record> = recs
        .iter()
        .filter(|(_, l)| l.node == name)
        .map(|(_, l)| Record {
            block: BlockRef {
                dev: l.dev,
                block: l.block,
            },
            offset: l.offset_in_block,
            len: l.len,
        })
        .collect();
    let rep = audit(&at, &mine).unwrap();
    assert_eq!(rep.leaked_blocks, 0, "{name}: {rep:?}");
    assert_eq!(rep.double_allocated, 0, "{name}: {rep:?}");
}

/// Spawns an index server; returns it and its address.
fn index_server() -> (KillOnDrop, String) {
    let (ix, line) = spawn(&[
        "index".into(),
        "serve".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ]);
    let addr = line.strip_prefix("listening ").unwrap().to_string();
    (ix, addr)
}

#[test]
fn stores_go_on_when_a_node_process_dies_or_restarts_on_another_port() {
    let files = scratch_dir("blocklab-alloc-store-");
    let dev = sparse_file(&files.path().join("a.img"), 32 << 20);
    let (_ix, index) = index_server();
    // Nothing registered yet: no node, rather than a full cluster.
    let e = client_store(&index, 1, b"x").unwrap_err();
    assert!(matches!(e, AllocError::NoNode), "{e}");
    assert!(e.to_string().contains("no node"), "{e}");

    let dir = shm_dir("blocklab-alloc-test-");
    let port = free_port();
    let args = |id: u16| {
        let mut a = node_args(dir.path(), port, id, "node-a", &index, &[]);
        a.push("--devices".into());
        a.push(dev.display().to_string());
        a
    };
    let (leader, l) = spawn(&args(1));
    assert!(l.ends_with(" leader"), "{l}");
    let (follower, l) = spawn(&args(2));
    assert!(l.ends_with(" follower"), "{l}");
    let store_all = |from: u64| {
        for ch in from..from + 8 {
            let data = vec![ch as u8; 3000];
            client_store(&index, ch, &data).unwrap_or_else(|e| panic!("channel {ch}: {e}"));
            assert_eq!(client_fetch(&index, ch).unwrap(), vec![data]);
        }
    };
    // Both processes take channels (by channel number).
    store_all(0);

    // Process 2 restarts: it listens on a new port and replaces its old endpoint.
    drop(follower);
    let (follower, l) = spawn(&args(2));
    assert!(l.starts_with("ready "), "{l}");
    store_all(100);

    // Process 2 dies for good: clients report its endpoint and go to process 1.
    drop(follower);
    store_all(200);

    let recs = records(&index).unwrap();
    assert_eq!(recs.len(), 24);
    assert_audit_clean(dir.path(), &recs, "node-a");
    drop(leader);
}
