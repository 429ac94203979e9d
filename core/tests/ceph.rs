//! A private Ceph cluster on loopback: the monitor comes up, BlueStore OSDs deploy on loop
//! devices by the manual steps (one id alone, two in one session), come up in the
//! monitor's map and report to its config-key store; a device with data or held by a
//! running OSD is refused; teardown leaves no process and no directory.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use blocklab::ceph::{self, osd, CephCluster, CephError, MonClient};
use blocklab::testing::{free_port, require_ceph, scratch, LoopDevices};
use serde_json::json;
use uuid::Uuid;

const GIB: u64 = 1 << 30;

#[test]
fn osds_deploy_come_up_report_and_are_torn_down() {
    if !require_ceph() {
        return;
    }
    let Some(devs) = LoopDevices::provision("ceph", 4, 2 * GIB) else {
        return;
    };
    let devs = devs.paths();
    let dir = scratch();
    let mon = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let cluster = CephCluster::create(&dir.path().join("c"), mon).expect("creating the cluster");
    let conf = cluster.conf().clone();
    let boot = MonClient::bootstrap_osd(&conf);
    let admin = MonClient::admin(&conf);
    let epoch0 = osd::osd_map(&admin).unwrap().epoch;

    // One id alone, then two in one session.
    let plans: Vec<(Uuid, String)> = (0..3)
        .map(|_| (Uuid::new_v4(), osd::gen_secret()))
        .collect();
    let lone = osd::parse_new_id(
        &boot
            .command(osd::new_id_command(plans[0].0, &plans[0].1))
            .unwrap(),
    )
    .unwrap();
    let batch = boot
        .session(&[
            osd::new_id_command(plans[1].0, &plans[1].1),
            osd::new_id_command(plans[2].0, &plans[2].1),
        ])
        .unwrap();
    let mut ids = vec![lone];
    for (a, (u, _)) in batch.answers.into_iter().zip(&plans[1..]) {
        let c = osd::new_id_command(*u, "");
        ids.push(osd::parse_new_id(&a.into_result(&c).unwrap()).unwrap());
    }
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, [0, 1, 2]);
    // `osd new` again with a known uuid gives its id back.
    let again = boot
        .command(osd::new_id_command(plans[0].0, &plans[0].1))
        .unwrap();
    assert_eq!(osd::parse_new_id(&again).unwrap(), lone);

    // The three OSDs deploy at once.
    std::thread::scope(|s| {
        for ((&id, (uuid, secret)), dev) in ids.iter().zip(&plans).zip(&devs) {
            let (conf, admin) = (&conf, &admin);
            s.spawn(move || {
                osd::check_device(dev, false).unwrap();
                osd::prepare_dir(conf, id, dev, secret).unwrap();
                let before = blocklab::dev::io_counters(dev).unwrap();
                osd::mkfs(conf, id, *uuid).unwrap();
                let written = blocklab::dev::io_counters(dev).unwrap().since(&before);
                assert!(
                    written.bytes_written > 0 && written.flushes > 0,
                    "{written:?}"
                );
                osd::start(conf, id).unwrap();
                osd::await_up(conf, id, Duration::from_secs(60)).unwrap();
                admin
                    .command(osd::report_command(id, &json!({"up": true})))
                    .unwrap();
            });
        }
    });
    let map = osd::osd_map(&admin).unwrap();
    assert_eq!(map.up(), 3, "{map:?}");
    assert!(map.epoch > epoch0);
    let reports = osd::reports(&admin).unwrap();
    assert_eq!(
        reports.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_eq!(reports[0].1, json!({"up": true}));

    // A device a running OSD holds is refused, even with force; one with data is refused
    // without force and accepted (zeroed) with it.
    assert!(osd::check_device(&devs[0], true).is_err());
    std::fs::write(&devs[3], b"someone's data").unwrap();
    match osd::check_device(&devs[3], false) {
        Err(CephError::Foreign { found, .. }) => assert!(found.contains("non-zero"), "{found}"),
        other => panic!("{other:?}"),
    }
    osd::check_device(&devs[3], true).unwrap();
    osd::check_device(&devs[3], false).unwrap();
    assert!(matches!(
        osd::check_device(dir.path(), false),
        Err(CephError::NotBlock { .. })
    ));

    assert!(!ceph::processes(&conf.conf_path()).is_empty());
    cluster.teardown().unwrap();
    assert!(ceph::processes(&conf.conf_path()).is_empty());
    assert!(!conf.dir.exists());
}
