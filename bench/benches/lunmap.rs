//! LUN mapping: the gateway's per-request decision on its in-memory map, applying a watch
//! event to the map, and an atomic versioned map edit on the embedded store (fsynced file).

use blocklab::coord::embedded::EmbeddedStore;
use blocklab::lunmap::editor::LunMap;
use blocklab::lunmap::view::{MapView, NodeEvent};
use blocklab::lunmap::{Backing, Layout, Lun, Target};
use blocklab::testing::scratch_dir;
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

const T: &str = "iqn.2026-11.lab.blocklab:t0";

fn lun_bytes(name: &str) -> Vec<u8> {
    serde_json::to_vec(&Lun {
        id: 0,
        name: name.into(),
        size_bytes: 1 << 30,
        backing: Backing::Range {
            device: "/dev/loop0".into(),
            offset: 0,
        },
    })
    .unwrap()
}

/// A map of 16 LUNs with 64 initiators each.
fn big_view() -> MapView {
    let mut v = MapView::new(Layout::new("bench").unwrap());
    for l in 0..16 {
        let lun = format!("lun{l}");
        let lp = format!("/blocklab/bench/lunmap/luns/{lun}");
        v.apply(&NodeEvent::Upsert {
            path: lp.clone(),
            data: lun_bytes(&lun),
        });
        for i in 0..64 {
            v.apply(&NodeEvent::Upsert {
                path: format!("{lp}/targets/{T}/initiators/iqn.2026-11.lab.host:h{i}"),
                data: Vec::new(),
            });
        }
    }
    v
}

fn bench(c: &mut Criterion) {
    let v = big_view();
    c.bench_function("lunmap/decide_mapped", |b| {
        b.iter(|| black_box(v.check("lun7", T, "iqn.2026-11.lab.host:h33").is_ok()))
    });
    c.bench_function("lunmap/decide_refused", |b| {
        b.iter(|| black_box(v.check("lun7", T, "iqn.2026-11.lab.host:nobody").is_err()))
    });
    c.bench_function("lunmap/apply_map_and_unmap_event", |b| {
        let mut v = big_view();
        let p = format!(
            "/blocklab/bench/lunmap/luns/lun3/targets/{T}/initiators/iqn.2026-11.lab.host:new"
        );
        b.iter(|| {
            black_box(v.apply(&NodeEvent::Upsert {
                path: p.clone(),
                data: Vec::new(),
            }));
            black_box(v.apply(&NodeEvent::Remove { path: p.clone() }));
        })
    });
    let dir = scratch_dir("blocklab-bench-lunmap-");
    let store = EmbeddedStore::open(dir.path().join("coord.store")).unwrap();
    let s = store.session();
    let m = LunMap::open(&s, "bench").unwrap();
    m.create_lun(
        0,
        "db0",
        1 << 20,
        Backing::Range {
            device: "/dev/loop0".into(),
            offset: 0,
        },
    )
    .unwrap();
    let target = Target {
        iqn: T.into(),
        portal: "127.0.0.1:3260".into(),
    };
    let mut k = 0u64;
    c.bench_function("lunmap/embedded_map_unmap_fsynced", |b| {
        b.iter(|| {
            k += 1;
            let i = format!("iqn.2026-11.lab.host:b{k}");
            m.map("db0", &target, &i).unwrap();
            m.unmap("db0", T, &i).unwrap();
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
