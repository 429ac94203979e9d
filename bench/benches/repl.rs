//! Replication benches: wire encode/decode, and the primary's protocol step throughput
//! without any I/O (propose → ready → persisted → two acknowledgements → ready).

use blocklab::repl::wire::{decode, encode, Frame};
use blocklab::repl::{AppendOutcome, Config, Entry, Message, Node, Policy};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

fn append(entries: usize, payload: usize) -> Frame {
    Frame::Repl(Message::Append {
        term: 3,
        from: 0,
        prev_index: 1000,
        prev_term: 3,
        commit: 999,
        entries: (0..entries as u64)
            .map(|i| Entry {
                term: 3,
                index: 1001 + i,
                payload: vec![0x5a; payload].into(),
            })
            .collect(),
    })
}

fn wire(c: &mut Criterion) {
    let mut g = c.benchmark_group("repl_wire");
    for (n, p) in [(0usize, 0usize), (1, 64), (16, 64), (64, 4096)] {
        let f = append(n, p);
        let mut buf = Vec::new();
        encode(&f, &mut buf).unwrap();
        g.throughput(Throughput::Bytes(buf.len() as u64));
        g.bench_function(format!("encode_append_{n}x{p}B"), |b| {
            let mut out = Vec::with_capacity(buf.len());
            b.iter(|| {
                out.clear();
                encode(std::hint::black_box(&f), &mut out).unwrap();
            })
        });
        g.bench_function(format!("decode_append_{n}x{p}B"), |b| {
            b.iter(|| decode(std::hint::black_box(&buf)).unwrap())
        });
    }
    g.finish();
}

fn ack(from: u32, term: u64, index: u64) -> Message {
    Message::AppendResp {
        term,
        from,
        outcome: AppendOutcome::Ok,
        match_index: index,
        commit: index.saturating_sub(1),
        last_index: index,
    }
}

fn primary_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("repl_primary_step");
    // One iteration = 64 write rounds.
    g.throughput(Throughput::Elements(64));
    for policy in [Policy::Piggyback, Policy::Eager, Policy::IdleCommit] {
        g.bench_function(format!("write_round_{}", policy.name()), |b| {
            b.iter_batched_ref(
                || {
                    let cfg = Config::new(0, 0, vec![0, 1, 2], policy);
                    let mut node = Node::new_primary(cfg, 1, Vec::new()).unwrap();
                    // Both secondaries answer the start-up probe.
                    node.ready();
                    node.step(ack(1, 1, 0)).unwrap();
                    node.step(ack(2, 1, 0)).unwrap();
                    node
                },
                |node| {
                    for _ in 0..64 {
                        let i = node.propose(vec![0u8; 64]).unwrap();
                        let rd = node.ready();
                        node.persisted(rd.persist.last().map_or(i, |e| e.index));
                        node.step(ack(1, 1, i)).unwrap();
                        node.step(ack(2, 1, i)).unwrap();
                        std::hint::black_box(node.ready());
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, wire, primary_step);
criterion_main!(benches);
