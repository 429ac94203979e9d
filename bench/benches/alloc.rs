//! Single-process alloc + free of one block, per strategy (shm: lock-free bitmap in
//! shared memory; mutex: robust process-shared mutex; central: Unix-socket round trip
//! to the leader, here a thread of the same process).

use blocklab::alloc::node::{NodeConfig, NodeProcess};
use blocklab::alloc::{DeviceRegion, Strategy};
use blocklab::testing::free_port;
use criterion::{criterion_group, criterion_main, Criterion};

fn alloc_free(c: &mut Criterion) {
    let mut g = c.benchmark_group("alloc_free");
    for strategy in Strategy::ALL {
        let dir = tempfile::Builder::new()
            .prefix("blocklab-alloc-bench-")
            .tempdir_in("/dev/shm")
            .unwrap();
        // Blocks are never written here, so the region needs no real device behind it.
        let cfg = NodeConfig {
            dir: dir.path().join("node"),
            internal_port: free_port(),
            proc_id: 1,
            strategy,
            block_size: 64 << 10,
            devices: vec![DeviceRegion {
                path: "/dev/null".into(),
                offset: 0,
                len: 1024 * (64 << 10),
            }],
            unfilled_capacity: 16,
        };
        let p = NodeProcess::start(cfg).unwrap();
        let mut a = p.allocator().unwrap();
        g.bench_function(strategy.name(), |b| {
            b.iter(|| {
                let blk = a.alloc(0).unwrap();
                a.free(std::hint::black_box(blk)).unwrap();
            })
        });
        p.shutdown();
    }
    g.finish();
}

criterion_group!(benches, alloc_free);
criterion_main!(benches);
