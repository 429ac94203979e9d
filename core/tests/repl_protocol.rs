//! The replication protocol driven deterministically: a simulated network that can drop,
//! reorder and duplicate messages, and simulated durable logs (a `Vec` that only grows when
//! the driver "flushes" a Ready's entries). No threads, no clocks.

use std::collections::BTreeMap;

use blocklab::repl::{Config, Entry, Message, Node, NodeId, Policy};
use rand::{rngs::StdRng, Rng, SeedableRng};

struct SimNode {
    node: Node,
    /// What is durable on this node's "device".
    disk: Vec<Entry>,
    applied: Vec<Entry>,
    flushes: u64,
}

struct Sim {
    nodes: BTreeMap<NodeId, SimNode>,
    net: Vec<(NodeId, Message)>,
    rng: StdRng,
    drop_p: f64,
    dup_p: f64,
    reorder: bool,
    /// Messages to these nodes are dropped.
    cut: Vec<NodeId>,
    /// Empty appends delivered.
    empty_delivered: u64,
}

const PRIMARY: NodeId = 0;

impl Sim {
    fn new(n: u32, policy: Policy, seed: u64) -> Sim {
        let members: Vec<NodeId> = (0..n).collect();
        let mut nodes = BTreeMap::new();
        for id in 0..n {
            let mut cfg = Config::new(id, members.clone(), policy);
            cfg.retransmit_ticks = 20;
            cfg.max_batch_entries = 4;
            let node = if id == PRIMARY {
                Node::new_primary(cfg, 1, Vec::new()).unwrap()
            } else {
                Node::new_secondary(cfg, Vec::new()).unwrap()
            };
            nodes.insert(
                id,
                SimNode {
                    node,
                    disk: Vec::new(),
                    applied: Vec::new(),
                    flushes: 0,
                },
            );
        }
        let mut s = Sim {
            nodes,
            net: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            drop_p: 0.0,
            dup_p: 0.0,
            reorder: false,
            cut: Vec::new(),
            empty_delivered: 0,
        };
        for id in 0..n {
            s.process(id);
        }
        s
    }

    fn primary(&mut self) -> &mut Node {
        &mut self.nodes.get_mut(&PRIMARY).unwrap().node
    }

    /// Runs a node's Ready loop: persist (append + "flush"), send, apply — checking that
    /// nothing is applied beyond what is durable, out of order, or different from the log.
    fn process(&mut self, id: NodeId) {
        let sn = self.nodes.get_mut(&id).unwrap();
        while sn.node.has_ready() {
            let rd = sn.node.ready();
            self.net.extend(rd.messages);
            if let Some(t) = rd.truncate_from {
                assert!(
                    t as usize > sn.applied.len(),
                    "node {id}: truncating applied entry {t}"
                );
                sn.disk.truncate(t as usize - 1);
            }
            if let Some(last) = rd.persist.last().map(|e| e.index) {
                assert_eq!(rd.persist[0].index as usize, sn.disk.len() + 1);
                sn.disk.extend(rd.persist.iter().cloned());
                sn.flushes += 1;
                sn.node.persisted(last);
            }
            self.net.extend(rd.persisted_messages);
            for e in rd.apply {
                assert_eq!(
                    e.index as usize,
                    sn.applied.len() + 1,
                    "node {id}: applied out of order"
                );
                assert!(
                    e.index as usize <= sn.disk.len(),
                    "node {id}: applied {} beyond its durable index {}",
                    e.index,
                    sn.disk.len()
                );
                assert_eq!(
                    sn.disk[e.index as usize - 1],
                    e,
                    "node {id}: applied != log"
                );
                sn.applied.push(e);
            }
        }
    }

    fn propose(&mut self, payload: &[u8]) -> u64 {
        let i = self.primary().propose(payload.to_vec()).unwrap();
        self.process(PRIMARY);
        i
    }

    /// Delivers one message (or drops / duplicates it). False when the network is empty.
    fn deliver_one(&mut self) -> bool {
        if self.net.is_empty() {
            return false;
        }
        let i = if self.reorder {
            self.rng.random_range(0..self.net.len())
        } else {
            0
        };
        let (to, m) = self.net.remove(i);
        if self.cut.contains(&to) || self.rng.random_bool(self.drop_p) {
            return true;
        }
        if self.rng.random_bool(self.dup_p) {
            self.net.push((to, m.clone()));
        }
        if m.is_empty_append() {
            self.empty_delivered += 1;
        }
        self.nodes.get_mut(&to).unwrap().node.step(m);
        self.process(to);
        true
    }

    fn deliver_all(&mut self) {
        let mut n = 0;
        while self.deliver_one() {
            n += 1;
            assert!(n < 1_000_000, "network never quiesces");
        }
    }

    fn tick(&mut self, n: u32) {
        for _ in 0..n {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                self.nodes.get_mut(&id).unwrap().node.tick();
                self.process(id);
            }
        }
    }

    /// Ticks and delivers until every node applied `upto`, or panics after `max_ticks`.
    fn settle(&mut self, upto: u64, max_ticks: u32) {
        for _ in 0..max_ticks {
            self.deliver_all();
            if self.nodes.values().all(|n| n.applied.len() as u64 >= upto) {
                return;
            }
            self.tick(1);
        }
        let got: Vec<usize> = self.nodes.values().map(|n| n.applied.len()).collect();
        panic!("not everything applied after {max_ticks} ticks: applied {got:?}, want {upto}");
    }

    fn empty_sent(&self) -> u64 {
        self.nodes[&PRIMARY].node.stats().empty_appends
    }
}

fn all_policies() -> Vec<Policy> {
    vec![
        Policy::Piggyback,
        Policy::Periodic { every: 10 },
        Policy::Eager,
        Policy::Idle,
        Policy::IdleDelayed { delay: 3 },
    ]
}

#[test]
fn commit_only_on_a_majority_that_includes_the_primary() {
    let mut s = Sim::new(5, Policy::Idle, 1);
    // Only one secondary reachable: 2 of 5 have the entry, no commit.
    s.cut = vec![2, 3, 4];
    s.propose(b"a");
    s.deliver_all();
    assert_eq!(s.nodes[&PRIMARY].node.commit(), 0);
    assert_eq!(s.nodes[&1].disk.len(), 1);
    // A second secondary: 3 of 5, committed.
    s.cut = vec![3, 4];
    s.tick(25); // retransmit to the now reachable node 2
    s.deliver_all();
    assert_eq!(s.nodes[&PRIMARY].node.commit(), 1);

    // Secondaries alone are not enough: the primary counts only after its own flush.
    let mut s = Sim::new(3, Policy::Idle, 2);
    s.deliver_all();
    s.primary().propose(b"x".to_vec()).unwrap();
    let rd = s.primary().ready();
    assert_eq!(rd.persist.len(), 1);
    for (to, m) in rd.messages {
        s.nodes.get_mut(&to).unwrap().node.step(m);
        s.process(to);
    }
    // Both secondaries persisted and acknowledged; the primary has not flushed yet.
    let acks = std::mem::take(&mut s.net);
    assert_eq!(acks.len(), 2);
    for (_, m) in acks {
        s.primary().step(m);
    }
    assert_eq!(
        s.primary().commit(),
        0,
        "committed before the primary's own flush"
    );
    s.primary().persisted(1);
    assert_eq!(s.primary().commit(), 1);
}

#[test]
fn a_secondary_caps_the_commit_at_its_verified_durable_index() {
    let members = vec![0, 1, 2];
    let mut sec = Node::new_secondary(Config::new(1, members, Policy::Idle), Vec::new()).unwrap();
    let e = |i: u64| Entry {
        term: 1,
        index: i,
        payload: vec![i as u8],
    };
    // Told commit 100 with entries 1..=3 only.
    sec.step(Message::Append {
        term: 1,
        from: 0,
        prev_index: 0,
        prev_term: 0,
        commit: 100,
        entries: vec![e(1), e(2), e(3)],
    });
    assert_eq!(sec.commit(), 3);
    let rd = sec.ready();
    assert_eq!(rd.persist.len(), 3);
    assert!(
        rd.apply.is_empty(),
        "applied before the entries were durable"
    );
    assert!(rd.messages.is_empty());
    assert_eq!(rd.persisted_messages.len(), 1, "ack only after the flush");
    sec.persisted(2); // only two durable so far
    let rd = sec.ready();
    assert_eq!(rd.apply.iter().map(|e| e.index).collect::<Vec<_>>(), [1, 2]);
    sec.persisted(3);
    assert_eq!(sec.ready().apply.len(), 1);
    // An empty message anchored at 0 says commit 50: nothing beyond what was verified.
    sec.step(Message::Append {
        term: 1,
        from: 0,
        prev_index: 0,
        prev_term: 0,
        commit: 50,
        entries: vec![],
    });
    assert_eq!(sec.commit(), 3);
    // A message from a node that is not a member is ignored.
    sec.step(Message::Append {
        term: 1,
        from: 9,
        prev_index: 3,
        prev_term: 1,
        commit: 3,
        entries: vec![e(4)],
    });
    assert_eq!(sec.last_index(), 3);
}

#[test]
fn every_policy_applies_everything_despite_drops_reordering_and_duplicates() {
    for policy in all_policies() {
        for seed in 0..12u64 {
            let mut s = Sim::new(3, policy, seed);
            s.drop_p = 0.2;
            s.dup_p = 0.2;
            s.reorder = true;
            let n = 40;
            for i in 0..n {
                s.propose(format!("w{i}").as_bytes());
                if s.rng.random_bool(0.5) {
                    s.deliver_one();
                }
                if i % 7 == 0 {
                    s.tick(1);
                }
            }
            if policy == Policy::Piggyback {
                // The commit only travels on the next write: one more write carries it.
                s.drop_p = 0.0;
                s.settle_primary_commit(n);
                s.propose(b"carrier");
                s.deliver_all();
                s.tick(25);
                s.deliver_all();
                for (id, sn) in &s.nodes {
                    assert!(
                        sn.applied.len() as u64 >= n,
                        "{policy:?} seed {seed}: node {id} applied {}",
                        sn.applied.len()
                    );
                }
            } else {
                s.settle(n, 5_000);
            }
            // Every replica's log agrees on what was applied.
            let reference = s.nodes[&PRIMARY].disk.clone();
            for sn in s.nodes.values() {
                assert_eq!(&reference[..sn.applied.len()], &sn.applied[..]);
            }
        }
    }
}

impl Sim {
    fn settle_primary_commit(&mut self, upto: u64) {
        for _ in 0..5_000 {
            self.deliver_all();
            if self.nodes[&PRIMARY].node.commit() >= upto {
                return;
            }
            self.tick(1);
        }
        panic!("primary never committed {upto}");
    }
}

#[test]
fn idle_sends_exactly_one_empty_message_per_idle_period() {
    let mut s = Sim::new(3, Policy::Idle, 7);
    let probes = s.empty_delivered; // start-up probes are not notifications
    s.deliver_all();
    let base = s.empty_sent();
    for period in 1..=5u64 {
        // A burst of writes, then quiet.
        for i in 0..period {
            s.propose(format!("p{period}-{i}").as_bytes());
        }
        s.deliver_all();
        s.tick(3);
        s.deliver_all();
        // Exactly one empty message to each of the 2 secondaries per idle period.
        assert_eq!(s.empty_sent() - base, 2 * period, "period {period}");
        let last = s.nodes[&PRIMARY].node.last_index();
        for sn in s.nodes.values() {
            assert_eq!(sn.applied.len() as u64, last, "applied at once when idle");
        }
        // Staying idle sends nothing more.
        s.tick(100);
        s.deliver_all();
        assert_eq!(s.empty_sent() - base, 2 * period);
    }
    assert!(s.empty_delivered > probes);
}

#[test]
fn idle_sends_nothing_while_writes_keep_coming() {
    // Closed loop: a new write is proposed as soon as one commits, before the primary
    // decides it is idle (as the replica loop does).
    let mut s = Sim::new(3, Policy::Idle, 8);
    s.deliver_all();
    let base = s.empty_sent();
    s.propose(b"c0");
    let mut seen = 0;
    for i in 1..200 {
        loop {
            assert!(!s.net.is_empty(), "stalled before write {i} committed");
            let (to, m) = s.net.remove(0);
            s.nodes.get_mut(&to).unwrap().node.step(m);
            if to == PRIMARY && s.nodes[&PRIMARY].node.commit() > seen {
                break; // the client learns of the commit and writes again at once
            }
            s.process(to);
        }
        seen = s.nodes[&PRIMARY].node.commit();
        s.propose(format!("c{i}").as_bytes());
    }
    assert_eq!(
        s.empty_sent(),
        base,
        "idle notified while writes were in flight"
    );
    // Piggybacked commit still got everything but the tail applied.
    assert!(s.nodes[&1].applied.len() > 150);
}

#[test]
fn idle_delayed_is_cancelled_by_a_new_write() {
    let mut s = Sim::new(3, Policy::IdleDelayed { delay: 10 }, 9);
    s.deliver_all();
    let base = s.empty_sent();
    s.propose(b"a");
    s.deliver_all();
    s.tick(5);
    s.deliver_all();
    assert_eq!(s.empty_sent(), base, "sent before the delay");
    s.propose(b"b"); // cancels the pending notification
    s.deliver_all();
    s.tick(9);
    s.deliver_all();
    assert_eq!(s.empty_sent(), base, "the cancelled notification was sent");
    s.tick(2);
    s.deliver_all();
    assert_eq!(s.empty_sent(), base + 2);
    for sn in s.nodes.values() {
        assert_eq!(sn.applied.len(), 2);
    }
}

#[test]
fn periodic_sends_heartbeats_and_eager_notifies_every_advance_and_piggyback_never() {
    let mut s = Sim::new(3, Policy::Periodic { every: 10 }, 10);
    s.deliver_all();
    let base = s.empty_sent();
    s.tick(100);
    s.deliver_all();
    assert_eq!(
        s.empty_sent() - base,
        2 * 10,
        "one heartbeat per secondary per 10 ticks"
    );

    let mut s = Sim::new(3, Policy::Eager, 11);
    s.deliver_all();
    let base = s.empty_sent();
    for i in 0..10 {
        s.propose(format!("e{i}").as_bytes());
        s.deliver_all();
    }
    assert_eq!(
        s.empty_sent() - base,
        2 * 10,
        "one per secondary per commit advance"
    );

    let mut s = Sim::new(3, Policy::Piggyback, 12);
    s.deliver_all();
    for i in 0..10 {
        s.propose(format!("p{i}").as_bytes());
        s.deliver_all();
        s.tick(50);
    }
    s.deliver_all();
    assert_eq!(s.empty_sent(), 0);
    // The last write's commit never reached the secondaries.
    assert_eq!(s.nodes[&1].applied.len(), 9);
}

#[test]
fn log_flushes_are_equal_across_policies_and_empty_messages_cause_none() {
    let mut counts = Vec::new();
    for policy in all_policies() {
        let mut s = Sim::new(3, policy, 13);
        s.deliver_all();
        for burst in 0..5 {
            for i in 0..3 {
                s.primary()
                    .propose(format!("{burst}-{i}").into_bytes())
                    .unwrap();
            }
            s.process(PRIMARY);
            s.deliver_all();
            s.tick(30);
            s.deliver_all();
        }
        let flushes: Vec<u64> = s.nodes.values().map(|n| n.flushes).collect();
        counts.push((policy, flushes, s.empty_sent()));
    }
    let first = counts[0].1.clone();
    for (p, f, _) in &counts {
        assert_eq!(f, &first, "{p:?} flushed differently");
    }
    // Some policies sent many empty messages; none of them added a flush.
    assert!(counts.iter().any(|(_, _, e)| *e >= 10));
}

#[test]
fn restarted_primary_keeps_every_committed_entry() {
    for seed in 0..10u64 {
        let mut s = Sim::new(3, Policy::Idle, 100 + seed);
        s.drop_p = 0.1;
        s.reorder = true;
        for i in 0..30 {
            s.propose(format!("a{i}").as_bytes());
            if i % 3 == 0 {
                s.deliver_one();
            }
        }
        // Some entries are in the primary's Ready but not flushed: propose without processing.
        let committed = s.nodes[&PRIMARY].node.commit();
        let committed_entries: Vec<Entry> = s.nodes[&PRIMARY].disk[..committed as usize].to_vec();
        s.primary().propose(b"lost".to_vec()).unwrap();
        // Crash: the primary restarts from its durable log with a new term.
        let disk = s.nodes[&PRIMARY].disk.clone();
        let term = s.nodes[&PRIMARY].node.term() + 1;
        let mut cfg = Config::new(PRIMARY, vec![0, 1, 2], Policy::Idle);
        cfg.retransmit_ticks = 20;
        let node = Node::new_primary(cfg, term, disk.clone()).unwrap();
        let sn = s.nodes.get_mut(&PRIMARY).unwrap();
        sn.node = node;
        sn.applied.clear(); // the storage engine re-applies from the log
        s.net.retain(|(to, _)| *to != PRIMARY);
        s.drop_p = 0.0;
        s.process(PRIMARY);
        for i in 0..5 {
            s.propose(format!("b{i}").as_bytes());
        }
        let last = s.nodes[&PRIMARY].node.last_index();
        s.settle(last, 5_000);
        for (id, sn) in &s.nodes {
            assert_eq!(
                &sn.applied[..committed_entries.len()],
                &committed_entries[..],
                "seed {seed}: node {id} lost or changed a committed entry"
            );
            assert_eq!(sn.applied, s.nodes[&PRIMARY].disk, "seed {seed}: node {id}");
        }
    }
}

#[test]
fn no_timer_stays_due_while_waiting() {
    // A driver sleeps ticks_to_next_timer(); a timer that stays due would make it spin.
    for policy in all_policies() {
        let mut s = Sim::new(3, policy, 21);
        s.deliver_all();
        s.propose(b"x");
        s.deliver_all();
        // Whatever is armed now, ticking up to it disarms or re-arms it in the future.
        for _ in 0..50 {
            let Some(t) = s.nodes[&PRIMARY].node.ticks_to_next_timer() else {
                break;
            };
            s.tick(t as u32);
            s.deliver_all();
            if let Some(next) = s.nodes[&PRIMARY].node.ticks_to_next_timer() {
                assert!(
                    next > 1 || matches!(policy, Policy::Periodic { every: 1 }),
                    "{policy:?}: a timer stays due"
                );
            }
        }
    }
}
