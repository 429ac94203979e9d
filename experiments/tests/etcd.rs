//! The etcd reference harness: a 3-member cluster behind delay proxies, RTT 0 and 1 ms;
//! every follower's watch reports every put; teardown leaves no etcd process and no
//! directory. Skips (or fails under BLOCKLAB_REQUIRE_ROOT=1) when etcd is not installed.

use std::path::Path;
use std::time::Duration;

use blocklab::testing::require_program;
use harness::etcd::{self, EtcdCluster, EtcdOptions, SparseWorkload};

/// Processes whose command line mentions `dir` (the cluster's data directories are in it).
fn processes_using(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue; // gone meanwhile
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(&needle) {
            out.push(format!("{name}: {cmd}"));
        }
    }
    out
}

#[test]
fn every_follower_sees_every_put_at_rtt_0_and_1ms_and_teardown_leaves_nothing() {
    if !require_program(&etcd::program().to_string_lossy(), etcd::PACKAGE) {
        return;
    }
    assert!(etcd::version(&etcd::program()).is_some_and(|v| v.starts_with('3')));
    for rtt in [Duration::ZERO, Duration::from_millis(1)] {
        let mut cluster = EtcdCluster::start(EtcdOptions::with_rtt(rtt))
            .unwrap_or_else(|e| panic!("starting etcd with RTT {rtt:?}: {e:#}"));
        assert_eq!(cluster.len(), 3);
        let followers = cluster.followers();
        assert_eq!(followers.len(), 2);
        let samples = cluster
            .run_sparse(&SparseWorkload::new(5, Duration::from_millis(50)))
            .unwrap_or_else(|e| panic!("RTT {rtt:?}: {e:#}"));
        assert_eq!(samples.len(), 5);
        for s in &samples {
            let lags: Vec<i64> = s.lags.iter().map(|l| l.lag_ns / 1000).collect();
            eprintln!(
                "RTT {rtt:?} put {}: latency {} us, follower lags {lags:?} us",
                s.index,
                s.put_latency_ns / 1000
            );
        }
        let mut revisions = Vec::new();
        for (k, s) in samples.iter().enumerate() {
            assert_eq!(s.index, k);
            revisions.push(s.revision);
            // A member on every lag, each follower once, the leader never.
            let members: Vec<usize> = s.lags.iter().map(|l| l.member).collect();
            assert_eq!(members, cluster.followers(), "put {k}: {s:?}");
            // A put commits only after a round trip to a follower, through the proxies.
            assert!(
                s.put_latency_ns >= rtt.as_nanos() as u64,
                "put {k} answered after {} ns, less than the RTT {rtt:?}",
                s.put_latency_ns
            );
        }
        assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
        // Peer traffic passed every member's proxy, both ways.
        for (i, s) in cluster.proxy_stats().iter().enumerate() {
            assert!(
                s.connections > 0 && s.to_target.bytes > 0 && s.to_client.bytes > 0,
                "member {i}'s proxy: {s:?}"
            );
        }
        let dir = cluster.dir().to_path_buf();
        assert_eq!(cluster.pids().len(), 3);
        assert_eq!(
            processes_using(&dir).len(),
            3,
            "{:?}",
            processes_using(&dir)
        );
        drop(cluster);
        assert!(!dir.exists(), "{} is left", dir.display());
        let left = processes_using(&dir);
        assert!(left.is_empty(), "etcd processes left: {left:?}");
    }
}

#[test]
fn a_member_that_exits_fails_the_start_with_its_log_and_leaves_nothing() {
    let dir = blocklab::testing::scratch();
    let fake = dir.path().join("etcd");
    std::fs::write(&fake, "#!/bin/sh\necho \"no such flag: $1\" >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let opts = EtcdOptions {
        program: fake,
        base_dir: dir.path().to_path_buf(),
        ..EtcdOptions::default()
    };
    let e = format!("{:#}", EtcdCluster::start(opts).unwrap_err());
    assert!(
        e.contains("exited") && e.contains("no such flag: --name"),
        "{e}"
    );
    // Only the fake program is left: the cluster's scratch directory is gone.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, ["etcd"], "{left:?}");
}
