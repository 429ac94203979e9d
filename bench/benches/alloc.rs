//! Single-process alloc + free of one block, per strategy (shm: lock-free bitmap in
//! shared memory; mutex: robust process-shared mutex; central: Unix-socket round trip
//! to the leader, here a thread of the same process).

use blocklab::alloc::node::{NodeConfig, NodeProcess};
use blocklab::alloc::{DeviceSpec, Strategy};
use blocklab::testing::{free_port, region_file, scratch_dir, shm_dir};
use criterion::{criterion_group, criterion_main, Criterion};

fn alloc_free(c: &mut Criterion) {
    let mut g = c.benchmark_group("alloc_free");
    for strategy in Strategy::ALL {
        let dir = shm_dir("blocklab-alloc-bench-");
        // Blocks are never written here: a sparse file of 1024 blocks after the first MiB.
        let files = scratch_dir("blocklab-alloc-bench-dev-");
        let dev = region_file(&files.path().join("dev.img"), 1024, 64 << 10);
        let cfg = NodeConfig {
            dir: dir.path().join("node"),
            internal_port: free_port(),
            proc_id: 1,
            strategy,
            block_size: 64 << 10,
            devices: vec![DeviceSpec::path(dev)],
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
