//! `blocklab gateway` and `blocklab lunmap` as real processes against a private ZooKeeper:
//! a SIGKILLed gateway's ephemeral node disappears after its session timeout and watchers
//! (`blocklab lunmap watch` among them) learn it; CLI errors are one clear line.

use std::process::{Command, Stdio};
use std::time::Duration;

use blocklab::coord::zk_server::ZkServer;
use blocklab::coord::{connect, ConnectOptions, WatchEvent};
use blocklab::lunmap::gateway::GatewayClient;
use blocklab::testing::{
    assert_success, free_port, next_event, next_line_where, require_zookeeper, scratch,
    sparse_file, spawn_lines,
};

const BIN: &str = env!("CARGO_BIN_EXE_blocklab");
const T0: &str = "iqn.2026-11.lab.blocklab:t0";
const H1: &str = "iqn.2026-11.lab.host:h1";

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

#[test]
fn sigkilled_gateway_disappears_and_cli_edits_reach_it() {
    if !require_zookeeper() {
        return;
    }
    let zk = ZkServer::start().unwrap();
    let spec = zk.spec("/cli").to_string();
    let dir = scratch();
    let dev = dir.path().join("dev.img");
    sparse_file(&dev, 8 << 20);
    let dev_s = dev.display().to_string();
    let common = ["--coord", spec.as_str(), "--cluster", "c1"];
    let out = cli(&[
        &["lunmap", "create-lun"][..],
        &common,
        &["db0", "--id", "0", "--size", "1M", "--device", &dev_s],
    ]
    .concat());
    assert_success(&out);

    // `lunmap watch` follows the map from the start.
    let (_watcher, mut watched) = spawn_lines(
        Command::new(BIN)
            .args(["lunmap", "watch"])
            .args(common)
            .stderr(Stdio::null()),
    );
    assert!(
        watched
            .next()
            .expect("watch exited")
            .unwrap()
            .starts_with("lun db0 "),
        "the existing LUN comes first"
    );

    let (mut gw, mut lines) = spawn_lines(
        Command::new(BIN)
            .args(["gateway", "--node", "gw1", "--events"])
            .args(["--session-timeout", "2s"])
            .args(common)
            .stderr(Stdio::null()),
    );
    let ready = next_line_where(&mut lines, "the gateway", |l| l.starts_with("ready "));
    let addr = ready["ready ".len()..].parse().unwrap();
    let mut client = GatewayClient::connect(addr).unwrap();
    assert!(client.read("db0", T0, H1, 0, 4096).unwrap().0.refused);
    let out = cli(&[
        &["lunmap", "map"][..],
        &common,
        &["db0", "--target", T0, "--initiator", H1],
    ]
    .concat());
    assert_success(&out);
    // The gateway reports the change it applied; then it serves the initiator.
    let mapped = format!("mapped db0 {T0} {H1} ");
    next_line_where(&mut lines, "the gateway", |l| l.starts_with(&mapped));
    let (r, _) = client.read("db0", T0, H1, 0, 4096).unwrap();
    assert!(r.ok, "{r:?}");
    let out = cli(&[&["lunmap", "gateways"][..], &common].concat());
    assert!(String::from_utf8_lossy(&out.stdout).contains("gw1"));
    // The watcher saw the gateway come and the mapping arrive.
    let mut want = vec![
        "gateway-up gw1 ".to_string(),
        format!("mapped db0 {T0} {H1} "),
    ];
    while !want.is_empty() {
        let l = next_line_where(&mut watched, "lunmap watch", |_| true);
        want.retain(|w| !l.starts_with(w.as_str()));
    }

    // SIGKILL: no clean close, the session expires, the ephemeral node goes.
    let observer = connect(&zk.spec("/cli"), &ConnectOptions::default()).unwrap();
    let w = observer.watch("/blocklab/c1/gateways").unwrap();
    assert!(observer
        .exists("/blocklab/c1/gateways/gw1")
        .unwrap()
        .is_some());
    gw.kill();
    next_event(
        &w,
        "the dead gateway's removal",
        Duration::from_secs(30),
        |e| *e == WatchEvent::Deleted("/blocklab/c1/gateways/gw1".into()),
    );
    assert!(observer
        .exists("/blocklab/c1/gateways/gw1")
        .unwrap()
        .is_none());
    next_line_where(&mut watched, "lunmap watch", |l| {
        l.starts_with("gateway-down gw1 ")
    });
}

#[test]
fn cli_errors_are_one_clear_line() {
    let free = free_port();
    let zk = format!("zk://127.0.0.1:{free}/x");
    let dir = scratch();
    let bad_store = dir.path().join("bad.store");
    std::fs::write(&bad_store, b"not a store").unwrap();
    let bad_store_spec = format!("embedded:{}", bad_store.display());
    let store_spec = format!("embedded:{}", dir.path().join("ok.store").display());
    // Mapping a LUN that does not exist, for `initiator`.
    let map_nolun = |initiator: &'static str| {
        vec![
            "lunmap",
            "map",
            "--coord",
            &store_spec,
            "nolun",
            "--target",
            T0,
            "--initiator",
            initiator,
        ]
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["lunmap", "list", "--coord", &zk, "--connect-timeout", "1s"],
            "unreachable",
        ),
        (
            vec!["lunmap", "list", "--coord", &bad_store_spec],
            "corrupt",
        ),
        (
            vec!["lunmap", "list", "--coord", "etcd://x"],
            "expected embedded:PATH",
        ),
        (map_nolun(H1), "does not exist"),
        (map_nolun("bogus"), "invalid initiator"),
        // Gateways and watchers need a backend other processes reach.
        (
            vec!["gateway", "--node", "gw1", "--coord", &store_spec],
            "embedded store",
        ),
        (vec!["gateway", "--node", "gw1"], "embedded store"),
        (
            vec!["lunmap", "watch", "--coord", &store_spec],
            "embedded store",
        ),
    ];
    for (args, want) in cases {
        let out = cli(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        // The first line says what is wrong (clap adds a hint line for argument errors).
        let first = err.lines().next().unwrap_or("");
        assert!(first.contains(want), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read(&bad_store).unwrap(), b"not a store");
}
