//! init's Ceph backend against a private Ceph cluster: the batch and the sequential
//! strategy deploy every OSD (up in the monitor's map, reported to its config-key store),
//! and a device with someone's data fails its own slot, not the batch.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use blocklab::ceph::{osd, CephCluster, MonClient};
use blocklab::init::{release_stranded, run_ceph, CephNodeAgent, DaemonKey, Node, Strategy};
use blocklab::testing::{free_port, require_ceph, scratch, LoopDevices};

const GIB: u64 = 1 << 30;

fn cluster(dir: &std::path::Path) -> CephCluster {
    let mon = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    CephCluster::create(&dir.join(format!("c{}", mon.port())), mon).expect("creating the cluster")
}

fn agents(c: &CephCluster, devs: &[PathBuf]) -> Vec<CephNodeAgent> {
    devs.chunks(2)
        .enumerate()
        .map(|(k, d)| CephNodeAgent::new(&format!("node{k}"), d, c.conf().clone()).unwrap())
        .collect()
}

#[test]
fn batch_and_sequential_deploy_every_osd_and_a_foreign_device_fails_alone() {
    if !require_ceph() {
        return;
    }
    let Some(devs) = LoopDevices::provision("initceph", 4, 2 * GIB) else {
        return;
    };
    let devs = devs.paths();
    let dir = scratch();

    for (strategy, force) in [(Strategy::Parallel, false), (Strategy::Sequential, true)] {
        let c = cluster(dir.path());
        let agents = agents(&c, &devs);
        let nodes: Vec<&dyn Node> = agents.iter().map(|a| a as &dyn Node).collect();
        let run = run_ceph(strategy, c.conf(), &nodes, force).unwrap();
        assert_eq!(run.failed().count(), 0, "{strategy}: {:?}", run.daemons);
        let mut ids: Vec<u32> = run.daemons.iter().map(|d| d.id.unwrap()).collect();
        ids.sort();
        assert_eq!(ids, [0, 1, 2, 3]);
        assert!(run.monitor_proposals.unwrap() >= 4);
        for d in &run.daemons {
            let steps: Vec<&str> = d.steps.iter().map(|s| s.step.as_str()).collect();
            let want: &[&str] = if strategy.batch() {
                &["alloc", "check", "prepare", "mkfs", "up", "report"]
            } else {
                &["check", "alloc", "prepare", "mkfs", "up", "report"]
            };
            assert_eq!(steps, want);
            assert!(d.bytes_written > 0 && d.flushes > 0, "{d:?}");
        }
        assert_eq!(osd::osd_map(&MonClient::admin(c.conf())).unwrap().up(), 4);
        c.teardown().unwrap();
    }

    // The devices hold BlueStore OSDs now: without force each is refused in its own slot.
    std::fs::write(&devs[1], vec![0u8; 1 << 20]).unwrap();
    let c = cluster(dir.path());
    let agents = agents(&c, &devs);
    let nodes: Vec<&dyn Node> = agents.iter().map(|a| a as &dyn Node).collect();
    let run = run_ceph(Strategy::Parallel, c.conf(), &nodes, false).unwrap();
    let up: Vec<&str> = run
        .daemons
        .iter()
        .filter(|d| d.is_up())
        .map(|d| d.device.as_str())
        .collect();
    assert_eq!(
        up,
        [std::fs::canonicalize(&devs[1]).unwrap().to_str().unwrap()]
    );
    for d in run.failed() {
        assert!(
            d.error.as_deref().unwrap().contains("BlueStore"),
            "{:?}",
            d.error
        );
    }
    let reports = osd::reports(&MonClient::admin(c.conf())).unwrap();
    assert_eq!(reports.iter().filter(|(_, v)| v["up"] == false).count(), 3);
    c.teardown().unwrap();
}

/// Ids an attempt allocated and never started (its node agent died) are released before
/// the next run, so none is stranded in the map.
#[test]
fn ids_a_dead_attempt_left_new_are_released() {
    if !require_ceph() {
        return;
    }
    let dir = scratch();
    let c = cluster(dir.path());
    let boot = MonClient::bootstrap_osd(c.conf());
    let admin = MonClient::admin(c.conf());
    for _ in 0..2 {
        let k = DaemonKey::generate();
        boot.command(osd::new_id_command(k.uuid, &k.secret))
            .unwrap();
    }
    assert_eq!(osd::osd_map(&admin).unwrap().osds.len(), 2);
    assert_eq!(release_stranded(&admin).unwrap(), [0, 1]);
    assert!(osd::osd_map(&admin).unwrap().osds.is_empty());
    let reports = osd::reports(&admin).unwrap();
    assert!(
        reports.iter().all(|(_, v)| v["released"] == true),
        "{reports:?}"
    );
    assert!(release_stranded(&admin).unwrap().is_empty());
    c.teardown().unwrap();
}
