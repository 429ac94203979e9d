//! Benches of the failover mechanism's CPU-side parts: the dispatcher's decision step (a
//! three-node cluster ticking, with one holder failure per round) and the volume copy
//! pipeline (32 MiB between regular files with O_DIRECT through io_uring).

use std::hint::black_box;

use blocklab::failover::dispatcher::{Action, Dispatcher, Input, Timing};
use blocklab::testing::{scratch_dir, sparse_files};
use blocklab::volume::{StoreConfig, VolumeStore};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// 50 ticks of a 3-node cluster where the holder stops after tick 20.
fn ticks_with_failover() -> usize {
    let ids = [0u32, 1, 2];
    let mut nodes: Vec<Dispatcher> = ids
        .iter()
        .map(|&i| Dispatcher::new(i, &ids, Timing::default()))
        .collect();
    let mut acquisitions = 0;
    for t in 0..50 {
        let mut mail = Vec::new();
        for (i, d) in nodes.iter_mut().enumerate() {
            if t >= 20 && i == 0 {
                continue;
            }
            d.step(Input::Probe { ok: true });
            for a in d.step(Input::Tick) {
                match a {
                    Action::Broadcast => mail.push(d.heartbeat()),
                    Action::Acquire(_) => acquisitions += 1,
                    Action::Release => {}
                }
            }
        }
        for hb in mail {
            for (j, d) in nodes.iter_mut().enumerate() {
                if j as u32 != hb.from && !(t >= 20 && j == 0) {
                    d.step(Input::Heartbeat(hb));
                }
            }
        }
    }
    acquisitions
}

fn dispatcher(c: &mut Criterion) {
    c.bench_function("dispatcher/3 nodes, 50 ticks, one failover", |b| {
        b.iter(|| black_box(ticks_with_failover()))
    });
}

fn volume_copy(c: &mut Criterion) {
    let dir = scratch_dir("bench-failover-");
    let devs = sparse_files(dir.path(), 2, 128 << 20);
    let mut st = VolumeStore::open(
        &dir.path().join("meta"),
        &devs,
        StoreConfig::default(),
        false,
    )
    .unwrap();
    let size = 32u64 << 20;
    st.create("src", size, None).unwrap();
    st.write("src", 0, &vec![0x5a; size as usize]).unwrap();
    let mut g = c.benchmark_group("volume");
    g.throughput(Throughput::Bytes(size));
    g.sample_size(10);
    g.bench_function("copy 32 MiB (8 x 1 MiB in flight)", |b| {
        b.iter(|| {
            st.copy("src", "dst", None, &mut |_| true).unwrap();
            st.delete("dst", None).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, dispatcher, volume_copy);
criterion_main!(benches);
