//! The physical lower bound of a deploy: the least time a strategy can take on given
//! devices with a given propose interval, whatever the machine does otherwise.
//!
//! # Derivation
//!
//! A daemon needs three committed changes in order: its id `A` (for `parallel`: one batch
//! for every daemon), its registration `R` (sent after its mkfs, which starts once `A` is
//! answered) and its report `U` (sent once `R` is answered). The monitor commits one
//! proposal at a time, the next no earlier than `I` (the propose interval) after the last
//! commit ended; the first commit of a monitor that has committed nothing may happen at
//! once (`min_wait` = 0, as in `exp-init`, where every strategy gets a fresh monitor).
//! Commit fsyncs and round trips only add time, so they are left out.
//!
//! The daemons a strategy runs one after another form a *chain* of *waves*; the daemons
//! of a wave run together, a wave starts once the previous one has reported:
//!
//! | strategy | chains | waves per chain | daemons per wave |
//! |---|---|---|---|
//! | `sequential` | 1 | nodes × daemons per node | 1 |
//! | `parallel_nodes` | one per node | daemons per node | 1 |
//! | `parallel_daemons` | 1 | nodes | daemons per node |
//! | `parallel` | 1 | 1 | all |
//!
//! For a wave starting at `s` (0 for a chain's first wave), with `m` the time its slowest
//! mkfs needs:
//!
//! * every `A` of the wave commits at or after `s`;
//! * the slowest daemon's `R` commits no earlier than its `A` plus its mkfs (`≥ s + m`)
//!   and, being a later commit than that `A`, no earlier than `A + I` (`≥ s + I`);
//! * its `U` commits no earlier than `I` after its `R`;
//!
//! so the wave takes at least `max(m, I) + I`. The next wave's first `A` is a later
//! commit than this wave's last `U`, so it comes at least `I` later. A chain of `W` waves
//! takes at least `(2W − 1)·I + Σ_waves max(m_wave, I)`, and the bound of a strategy is its
//! longest chain. With every `m ≤ I` this is `(3W − 1)·I`: one interval per committed
//! change except the first (`min_proposals − 1` intervals), and the mkfs hides inside
//! the registration's wait.
//!
//! `m` of a wave is at least the slowest *lone* mkfs (one device at a time) of its
//! devices; for the wave of `parallel`, which writes every measured device at once, it is
//! also at least every device's mkfs bytes at the aggregate write bandwidth of the set.
//! Both are measured in the same run (`exp-init`).
//!
//! The unit tests below check the bound against the monitor's own proposal logic
//! ([`crate::monitor::MonitorState`]) on a virtual clock, for the four strategies: no
//! schedule beats it, and without fsyncs and with equal mkfs times it is met exactly.

use std::time::Duration;

use super::Strategy;

/// What the bound of a configuration is computed from.
#[derive(Debug, Clone, Copy)]
pub struct BoundInput<'a> {
    /// Each device's mkfs time alone (one device at a time), node by node, device by
    /// device (every node has at least one device).
    pub lone_mkfs: &'a [Vec<Duration>],
    /// Every device's mkfs bytes written at once at the devices' aggregate write
    /// bandwidth.
    pub all_at_once: Duration,
    pub propose_interval: Duration,
}

impl Strategy {
    /// The least time this strategy can take (see the module docs for the derivation).
    pub fn lower_bound(self, b: &BoundInput<'_>) -> Duration {
        let i = b.propose_interval;
        let slowest = |devs: &mut dyn Iterator<Item = &Duration>| -> Duration {
            devs.copied().max().unwrap_or_default()
        };
        // A chain of waves, each given by its slowest mkfs.
        let chain = |waves: Vec<Duration>| -> Duration {
            let n = waves.len() as u32;
            if n == 0 {
                return Duration::ZERO;
            }
            i * (2 * n - 1) + waves.into_iter().map(|m| m.max(i)).sum::<Duration>()
        };
        match self {
            Strategy::Sequential => chain(b.lone_mkfs.iter().flatten().copied().collect()),
            Strategy::ParallelNodes => b
                .lone_mkfs
                .iter()
                .map(|node| chain(node.clone()))
                .max()
                .unwrap_or_default(),
            Strategy::ParallelDaemons => chain(
                b.lone_mkfs
                    .iter()
                    .map(|node| slowest(&mut node.iter()))
                    .collect(),
            ),
            // Without the batch the ids are still requested all at once, so they can
            // share the first proposal: the same bound.
            Strategy::Parallel | Strategy::ParallelNobatch => {
                chain(vec![
                    slowest(&mut b.lone_mkfs.iter().flatten()).max(b.all_at_once)
                ])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! A discrete-event run of the four strategies against the monitor's proposal logic
    //! on a virtual clock: zero-latency network, mkfs of a fixed duration per device,
    //! each commit taking `fsync`.

    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    use std::time::Instant;

    use uuid::Uuid;

    use super::*;
    use crate::monitor::{
        ClusterMap, MonitorState, Outcome, ProposeConfig, Request, Response, Slot,
    };

    const MS: Duration = Duration::from_millis(1);

    /// Who waits for an answer: a daemon, or the orchestrator's batch allocation.
    const ORCH: usize = usize::MAX;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum Step {
        Alloc,
        Register,
        Report,
    }

    struct Sim {
        t0: Instant,
        state: MonitorState<usize>,
        /// (time, sequence, daemon, step) of requests to submit.
        queue: BinaryHeap<Reverse<(Duration, u64, usize, Step)>>,
        seq: u64,
        /// A commit in progress: when it ends, and its answers.
        committing: Option<(Duration, Vec<(usize, Response)>)>,
        ids: Vec<Option<u32>>,
        mkfs: Vec<Duration>,
        /// Each daemon's (chain, wave); waves[chain] = list of waves = list of daemons.
        waves: Vec<Vec<Vec<usize>>>,
        /// Per chain: the wave running and how many of its daemons have reported.
        progress: Vec<(usize, usize)>,
        chain_of: Vec<usize>,
        slots: Vec<Slot>,
        done_at: Duration,
    }

    impl Sim {
        fn submit(&mut self, at: Duration, d: usize, step: Step) {
            self.seq += 1;
            self.queue.push(Reverse((at, self.seq, d, step)));
        }

        fn start_wave(&mut self, chain: usize, at: Duration) {
            let (w, _) = self.progress[chain];
            for d in self.waves[chain][w].clone() {
                match self.ids[d] {
                    None => self.submit(at, d, Step::Alloc),
                    Some(_) => self.submit(at + self.mkfs[d], d, Step::Register),
                }
            }
        }

        fn request(&self, d: usize, step: Step) -> Request {
            let id = self.ids[d].unwrap_or(u32::MAX);
            match step {
                Step::Alloc => Request::Alloc {
                    slots: vec![self.slots[d].clone()],
                },
                // With the uuid the allocation gave the daemon, as a node agent does.
                Step::Register => Request::Register {
                    id,
                    uuid: self
                        .state
                        .committed_map()
                        .daemons
                        .get(&id)
                        .and_then(|e| e.uuid)
                        .unwrap_or(Uuid::from_u128(d as u128 + 1)),
                    key: "k".into(),
                },
                Step::Report => Request::Report {
                    id,
                    outcome: Outcome::Up,
                },
            }
        }

        /// A daemon's (or the orchestrator's) request was committed at `t`.
        fn answered(&mut self, t: Duration, w: usize, resp: Response, step: Step) {
            if w == ORCH {
                let Response::Ids { ids, .. } = resp else {
                    panic!("{resp:?}")
                };
                for (d, id) in ids.into_iter().enumerate() {
                    self.ids[d] = Some(id);
                }
                self.start_wave(0, t);
                return;
            }
            match step {
                Step::Alloc => {
                    let Response::Ids { ids, .. } = resp else {
                        panic!("{resp:?}")
                    };
                    self.ids[w] = Some(ids[0]);
                    self.submit(t + self.mkfs[w], w, Step::Register);
                }
                Step::Register => self.submit(t, w, Step::Report),
                Step::Report => {
                    let c = self.chain_of[w];
                    self.progress[c].1 += 1;
                    let (wave, n) = self.progress[c];
                    if n == self.waves[c][wave].len() {
                        self.done_at = self.done_at.max(t);
                        if wave + 1 < self.waves[c].len() {
                            self.progress[c] = (wave + 1, 0);
                            self.start_wave(c, t);
                        }
                    }
                }
            }
        }
    }

    /// Runs `strategy` on `mkfs[node][device]` durations; returns the total time and the
    /// proposals committed.
    fn simulate(
        strategy: Strategy,
        mkfs: &[Vec<Duration>],
        interval: Duration,
        fsync: Duration,
    ) -> (Duration, u64) {
        let dpn = mkfs[0].len();
        let n = mkfs.len() * dpn;
        let waves: Vec<Vec<Vec<usize>>> = match strategy {
            Strategy::Sequential => vec![(0..n).map(|d| vec![d]).collect()],
            Strategy::ParallelNodes => (0..mkfs.len())
                .map(|k| (0..dpn).map(|j| vec![k * dpn + j]).collect())
                .collect(),
            Strategy::ParallelDaemons => {
                vec![(0..mkfs.len())
                    .map(|k| (k * dpn..(k + 1) * dpn).collect())
                    .collect()]
            }
            Strategy::Parallel | Strategy::ParallelNobatch => vec![vec![(0..n).collect()]],
        };
        let mut chain_of = vec![0; n];
        for (c, ws) in waves.iter().enumerate() {
            for d in ws.iter().flatten() {
                chain_of[*d] = c;
            }
        }
        let slots: Vec<Slot> = (0..n)
            .map(|d| Slot {
                node: format!("n{}", d / dpn),
                device: format!("/dev/d{}", d % dpn),
                host: String::new(),
            })
            .collect();
        let mut sim = Sim {
            t0: Instant::now(),
            state: MonitorState::new(
                ClusterMap::new(Uuid::from_u128(7)),
                ProposeConfig::with_interval(interval),
            ),
            queue: BinaryHeap::new(),
            seq: 0,
            committing: None,
            ids: vec![None; n],
            mkfs: mkfs.iter().flatten().copied().collect(),
            progress: vec![(0, 0); waves.len()],
            waves,
            chain_of,
            slots,
            done_at: Duration::ZERO,
        };
        // The step each waiter waits for (answers do not say).
        let mut waiting_for = vec![Step::Alloc; n];
        if strategy.batch() {
            let r = sim
                .state
                .submit(
                    Request::Alloc {
                        slots: sim.slots.clone(),
                    },
                    ORCH,
                    sim.t0,
                )
                .unwrap();
            assert!(r.is_none());
        } else {
            for c in 0..sim.waves.len() {
                sim.start_wave(c, Duration::ZERO);
            }
        }
        loop {
            let next_req = sim.queue.peek().map(|Reverse((t, ..))| *t);
            let commit_end = sim.committing.as_ref().map(|(t, _)| *t);
            let deadline = sim.state.deadline().map(|d| d - sim.t0);
            // Requests first at equal times (the best case for the strategy).
            let t = [next_req, commit_end, deadline].into_iter().flatten().min();
            let Some(t) = t else { break };
            if next_req == Some(t) {
                let Some(Reverse((_, _, d, step))) = sim.queue.pop() else {
                    unreachable!()
                };
                waiting_for[d] = step;
                let req = sim.request(d, step);
                let r = sim.state.submit(req, d, sim.t0 + t).unwrap();
                assert!(r.is_none());
            } else if commit_end == Some(t) {
                let (_, replies) = sim.committing.take().unwrap();
                sim.state.committed(sim.t0 + t);
                for (w, resp) in replies {
                    let step = if w == ORCH {
                        Step::Alloc
                    } else {
                        waiting_for[w]
                    };
                    assert!(!matches!(resp, Response::Error { .. }), "{resp:?}");
                    sim.answered(t, w, resp, step);
                }
            } else {
                let p = sim.state.take_proposal(sim.t0 + t).unwrap();
                sim.committing = Some((t + fsync, p.replies));
            }
        }
        let map = sim.state.committed_map();
        assert_eq!(map.daemons.len(), n);
        assert!(map
            .daemons
            .values()
            .all(|d| d.state == crate::monitor::DaemonState::Up));
        (sim.done_at, map.epoch)
    }

    fn mkfs_set(nodes: usize, dpn: usize, f: impl Fn(usize) -> Duration) -> Vec<Vec<Duration>> {
        (0..nodes)
            .map(|k| (0..dpn).map(|j| f(k * dpn + j)).collect())
            .collect()
    }

    #[test]
    fn no_strategy_beats_the_bound_and_it_is_met_when_nothing_else_costs() {
        let shapes = [(1, 1), (3, 1), (1, 4), (3, 4), (2, 3)];
        let intervals = [Duration::ZERO, 10 * MS, 50 * MS];
        // Equal fast mkfs, equal slow mkfs, and uneven ones around the interval.
        let mkfs_kinds: [&dyn Fn(usize) -> Duration; 3] = [&|_| 5 * MS, &|_| 80 * MS, &|d| {
            MS * (3 + 37 * (d as u32 % 3))
        }];
        for (nodes, dpn) in shapes {
            for interval in intervals {
                for (kind, f) in mkfs_kinds.iter().enumerate() {
                    let mkfs = mkfs_set(nodes, dpn, f);
                    for fsync in [Duration::ZERO, 2 * MS] {
                        for strategy in Strategy::ALL {
                            let (total, proposals) = simulate(strategy, &mkfs, interval, fsync);
                            let bound = strategy.lower_bound(&BoundInput {
                                lone_mkfs: &mkfs,
                                all_at_once: Duration::ZERO,
                                propose_interval: interval,
                            });
                            let what = format!(
                                "{strategy} {nodes}x{dpn} interval {interval:?} mkfs kind {kind} \
                                 fsync {fsync:?}: total {total:?}, bound {bound:?}"
                            );
                            assert!(total >= bound, "{what}");
                            assert!(
                                proposals >= strategy.min_proposals(nodes as u64, dpn as u64),
                                "{what}: {proposals} proposals"
                            );
                            // Equal mkfs times and free commits: the bound is met.
                            if kind < 2 && fsync.is_zero() {
                                assert_eq!(total, bound, "{what}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_aggregate_bandwidth_counts_for_parallel_only_and_io_hides_in_the_interval() {
        let lone = vec![vec![5 * MS; 8]; 3];
        let b = |all_at_once, interval| BoundInput {
            lone_mkfs: &lone,
            all_at_once,
            propose_interval: interval,
        };
        // I/O shorter than the interval: 2 intervals for parallel (not 3, and no I/O).
        assert_eq!(
            Strategy::Parallel.lower_bound(&b(30 * MS, 50 * MS)),
            100 * MS
        );
        // Longer: the I/O replaces the registration's wait.
        assert_eq!(
            Strategy::Parallel.lower_bound(&b(120 * MS, 50 * MS)),
            170 * MS
        );
        // The others do not write every device at once.
        assert_eq!(
            Strategy::ParallelDaemons.lower_bound(&b(120 * MS, 50 * MS)),
            (2 * 3 - 1) * 50 * MS + 3 * 50 * MS
        );
        assert_eq!(
            Strategy::Sequential.lower_bound(&b(120 * MS, 50 * MS)),
            (3 * 24 - 1) * 50 * MS
        );
        assert_eq!(
            Strategy::ParallelNodes.lower_bound(&b(120 * MS, 50 * MS)),
            (3 * 8 - 1) * 50 * MS
        );
    }
}
