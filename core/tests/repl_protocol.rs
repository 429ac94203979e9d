//! The replication protocol driven deterministically: a simulated network that can drop,
//! reorder and duplicate messages, and simulated durable logs (a `Vec` that only grows when
//! the driver "flushes" a Ready's entries, and can be made full). No threads, no clocks.

use std::collections::BTreeMap;

use blocklab::repl::{AppendOutcome, Config, Entry, Message, Node, NodeId, Policy, ProtocolError};
use rand::{rngs::StdRng, Rng, SeedableRng};

struct SimNode {
    node: Node,
    /// What is durable on this node's "device".
    disk: Vec<Entry>,
    applied: Vec<Entry>,
    flushes: u64,
    /// The term this node's "device" holds (a secondary persists what it adopts).
    term_on_disk: u64,
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
    /// These nodes' logs are full: persisting fails.
    full: Vec<NodeId>,
    /// Empty appends delivered.
    empty_delivered: u64,
    /// Messages delivered, per receiver: (with entries, empty).
    delivered: BTreeMap<NodeId, (u64, u64)>,
    /// What `step` reported, per receiver.
    errors: Vec<(NodeId, ProtocolError)>,
}

const PRIMARY: NodeId = 0;

impl Sim {
    fn new(n: u32, policy: Policy, seed: u64) -> Sim {
        Sim::with(n, policy, seed, |_| {})
    }

    fn with(n: u32, policy: Policy, seed: u64, tune: impl Fn(&mut Config)) -> Sim {
        let members: Vec<NodeId> = (0..n).collect();
        let mut nodes = BTreeMap::new();
        for id in 0..n {
            let mut cfg = Config::new(id, PRIMARY, members.clone(), policy);
            cfg.retransmit_ticks = 20;
            cfg.max_batch_entries = 4;
            tune(&mut cfg);
            let node = if id == PRIMARY {
                Node::new_primary(cfg, 1, Vec::new()).unwrap()
            } else {
                Node::new_secondary(cfg, 0, Vec::new()).unwrap()
            };
            nodes.insert(
                id,
                SimNode {
                    node,
                    disk: Vec::new(),
                    applied: Vec::new(),
                    flushes: 0,
                    term_on_disk: if id == PRIMARY { 1 } else { 0 },
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
            full: Vec::new(),
            empty_delivered: 0,
            delivered: BTreeMap::new(),
            errors: Vec::new(),
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
            if let Some(t) = rd.persist_term {
                assert!(t > sn.term_on_disk, "node {id}: term {t} handed out again");
                sn.term_on_disk = t;
            }
            self.net.extend(rd.messages);
            if let Some(t) = rd.truncate_from {
                assert!(
                    t as usize > sn.applied.len(),
                    "node {id}: truncating applied entry {t}"
                );
                sn.disk.truncate(t as usize - 1);
            }
            let mut durable = true;
            if let Some(last) = rd.persist.last().map(|e| e.index) {
                assert_eq!(rd.persist[0].index as usize, sn.disk.len() + 1);
                if self.full.contains(&id) {
                    // Nothing written; the acknowledgements of this Ready are dropped.
                    sn.node.persist_failed(100, 0);
                    durable = false;
                } else {
                    sn.disk.extend(rd.persist.iter().cloned());
                    sn.flushes += 1;
                    sn.node.persisted(last);
                }
            }
            if durable {
                for (_, m) in &rd.persisted_messages {
                    if let Message::AppendResp { term, .. } = m {
                        assert!(
                            *term <= sn.term_on_disk,
                            "node {id} answered in term {term}, its device holds {}",
                            sn.term_on_disk
                        );
                    }
                }
                self.net.extend(rd.persisted_messages);
            }
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
        let d = self.delivered.entry(to).or_default();
        match &m {
            Message::Append { entries, .. } if !entries.is_empty() => d.0 += 1,
            Message::Append { .. } => d.1 += 1,
            Message::AppendResp { .. } => {}
        }
        if let Err(e) = self.nodes.get_mut(&to).unwrap().node.step(m) {
            self.errors.push((to, e));
        }
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

    fn applied(&self, id: NodeId) -> usize {
        self.nodes[&id].applied.len()
    }
}

fn all_policies() -> Vec<Policy> {
    vec![
        Policy::Piggyback,
        Policy::Periodic { every: 10 },
        Policy::Eager,
        Policy::IdleAck,
        Policy::IdleCommit,
        Policy::IdleDelayed { delay: 3 },
    ]
}

#[test]
fn commit_only_on_a_majority_that_includes_the_primary() {
    let mut s = Sim::new(5, Policy::IdleCommit, 1);
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
    let mut s = Sim::new(3, Policy::IdleCommit, 2);
    s.deliver_all();
    s.primary().propose(b"x".to_vec()).unwrap();
    let rd = s.primary().ready();
    assert_eq!(rd.persist.len(), 1);
    for (to, m) in rd.messages {
        s.nodes.get_mut(&to).unwrap().node.step(m).unwrap();
        s.process(to);
    }
    // Both secondaries persisted and acknowledged; the primary has not flushed yet.
    let acks = std::mem::take(&mut s.net);
    assert_eq!(acks.len(), 2);
    for (_, m) in acks {
        s.primary().step(m).unwrap();
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
    let mut sec = Node::new_secondary(
        Config::new(1, 0, members, Policy::IdleCommit),
        0,
        Vec::new(),
    )
    .unwrap();
    let e = |i: u64| Entry {
        term: 1,
        index: i,
        payload: vec![i as u8].into(),
    };
    // Told commit 100 with entries 1..=3 only.
    sec.step(Message::Append {
        term: 1,
        from: 0,
        prev_index: 0,
        prev_term: 0,
        commit: 100,
        entries: vec![e(1), e(2), e(3)],
    })
    .unwrap();
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
    })
    .unwrap();
    assert_eq!(sec.commit(), 3);
    // Appends from anyone but the primary (a non-member, or another member) are refused.
    for from in [9, 2] {
        let err = sec
            .step(Message::Append {
                term: 5,
                from,
                prev_index: 3,
                prev_term: 1,
                commit: 3,
                entries: vec![e(4)],
            })
            .unwrap_err();
        assert_eq!(err, ProtocolError::NotFromPrimary { from, primary: 0 });
    }
    assert_eq!(sec.last_index(), 3);
    assert_eq!(sec.term(), 1, "a refused append does not move the term");
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
            assert!(
                s.errors.is_empty(),
                "{policy:?} seed {seed}: {:?}",
                s.errors
            );
            // Every replica's log agrees on what was applied.
            let reference = s.nodes[&PRIMARY].disk.clone();
            for sn in s.nodes.values() {
                assert_eq!(&reference[..sn.applied.len()], &sn.applied[..]);
            }
        }
    }
}

impl Sim {
    /// Idle period `period`: a burst of `period` writes, delivered, then `ticks` quiet
    /// ticks, and what they sent delivered.
    fn burst_then_quiet(&mut self, period: u64, ticks: u32) {
        for i in 0..period {
            self.propose(format!("p{period}-{i}").as_bytes());
        }
        self.deliver_all();
        self.tick(ticks);
        self.deliver_all();
    }

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
    let mut s = Sim::new(3, Policy::IdleCommit, 7);
    let probes = s.empty_delivered; // start-up probes are not notifications
    s.deliver_all();
    let base = s.empty_sent();
    for period in 1..=5u64 {
        s.burst_then_quiet(period, 3);
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
fn idle_notifies_every_secondary_at_the_commit_without_waiting_for_the_slow_one() {
    let mut s = Sim::new(3, Policy::IdleCommit, 11);
    s.deliver_all();
    let base = s.empty_sent();
    s.propose(b"x");
    // Secondary 2 is slow: it receives messages but persists nothing yet, so it does not
    // acknowledge; everything else is delivered and processed.
    while let Some(i) = s.net.iter().position(|(to, _)| *to != 2) {
        let (to, m) = s.net.remove(i);
        s.nodes.get_mut(&to).unwrap().node.step(m).unwrap();
        s.process(to);
    }
    assert_eq!(
        s.nodes[&PRIMARY].node.commit(),
        1,
        "committed with secondary 1"
    );
    assert_eq!(
        s.empty_sent() - base,
        2,
        "both secondaries notified at the commit"
    );
    assert_eq!(s.applied(1), 1);
    // The slow one gets the entry and the notification, still without persisting.
    while let Some(i) = s.net.iter().position(|(to, _)| *to == 2) {
        let (_, m) = s.net.remove(i);
        s.nodes.get_mut(&2).unwrap().node.step(m).unwrap();
    }
    assert_eq!(s.nodes[&2].node.commit(), 1, "it learned the commit");
    assert_eq!(s.applied(2), 0, "nothing applied before it is durable");
    // It persists: it applies at once, with no further message.
    s.process(2);
    assert_eq!(s.applied(2), 1);
    s.deliver_all();
    s.tick(100);
    s.deliver_all();
    assert_eq!(s.empty_sent() - base, 2, "nothing more while idle");
}

#[test]
fn idle_sends_nothing_while_writes_keep_coming() {
    // Closed loop: a new write is proposed as soon as one commits, before the primary
    // decides it is idle (as the replica loop does).
    let mut s = Sim::new(3, Policy::IdleCommit, 8);
    s.deliver_all();
    let base = s.empty_sent();
    s.propose(b"c0");
    let mut seen = 0;
    for i in 1..200 {
        loop {
            assert!(!s.net.is_empty(), "stalled before write {i} committed");
            let (to, m) = s.net.remove(0);
            s.nodes.get_mut(&to).unwrap().node.step(m).unwrap();
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
        let mut s = Sim::new(3, Policy::IdleCommit, 100 + seed);
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
        let mut cfg = Config::new(PRIMARY, PRIMARY, vec![0, 1, 2], Policy::IdleCommit);
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

fn entry(term: u64, index: u64) -> Entry {
    Entry {
        term,
        index,
        payload: vec![index as u8, term as u8].into(),
    }
}

fn append(term: u64, prev_index: u64, prev_term: u64, commit: u64, entries: Vec<Entry>) -> Message {
    Message::Append {
        term,
        from: PRIMARY,
        prev_index,
        prev_term,
        commit,
        entries,
    }
}

fn resp(from: NodeId, term: u64, outcome: AppendOutcome, match_index: u64) -> Message {
    Message::AppendResp {
        term,
        from,
        outcome,
        match_index,
        commit: 0,
        last_index: match_index,
    }
}

/// Appends (with entries, empty) in `rd.messages` to `id`.
fn sent_to(msgs: &[(NodeId, Message)], id: NodeId) -> Vec<(u64, usize)> {
    msgs.iter()
        .filter(|(to, _)| *to == id)
        .map(|(_, m)| match m {
            Message::Append {
                prev_index,
                entries,
                ..
            } => (*prev_index, entries.len()),
            Message::AppendResp { .. } => panic!("a response from the primary"),
        })
        .collect()
}

#[test]
fn a_secondary_never_truncates_a_committed_entry() {
    let mut sec = Node::new_secondary(
        Config::new(1, 0, vec![0, 1, 2], Policy::IdleCommit),
        0,
        Vec::new(),
    )
    .unwrap();
    sec.step(append(
        1,
        0,
        0,
        3,
        vec![entry(1, 1), entry(1, 2), entry(1, 3)],
    ))
    .unwrap();
    sec.ready();
    sec.persisted(3);
    assert_eq!(sec.ready().apply.len(), 3);
    assert_eq!(sec.commit(), 3);
    // A newer term's append conflicting with committed entry 2: refused, nothing changes.
    let err = sec.step(append(2, 1, 1, 3, vec![entry(2, 2)])).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::TruncateCommitted {
            index: 2,
            commit: 3
        }
    );
    assert!(!sec.has_ready(), "a refused append leaves nothing to do");
    assert_eq!(sec.entry(2), Some(&entry(1, 2)));
    assert_eq!(sec.term(), 1);
    // Past the commit a conflict truncates, as it must.
    sec.step(append(1, 3, 1, 3, vec![entry(1, 4)])).unwrap();
    sec.ready();
    sec.persisted(4);
    sec.ready();
    sec.step(append(2, 3, 1, 3, vec![entry(2, 4)])).unwrap();
    let rd = sec.ready();
    assert_eq!(rd.truncate_from, Some(4));
    assert_eq!(rd.persist, vec![entry(2, 4)]);
    assert_eq!(sec.term(), 2);
}

#[test]
fn the_primary_reports_a_secondary_in_a_higher_term() {
    let mut p = Node::new_primary(
        Config::new(0, 0, vec![0, 1, 2], Policy::IdleCommit),
        1,
        Vec::new(),
    )
    .unwrap();
    let err = p.step(resp(1, 5, AppendOutcome::Mismatch, 0)).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::PeerTermAhead {
            peer: 1,
            term: 5,
            ours: 1
        }
    );
    assert!(err
        .to_string()
        .contains("secondary 1 is in term 5 > ours (1)"));
    assert!(
        p.step(resp(1, 5, AppendOutcome::Mismatch, 0)).is_ok(),
        "reported once per term"
    );
    assert!(matches!(
        p.step(resp(1, 6, AppendOutcome::Mismatch, 0)),
        Err(ProtocolError::PeerTermAhead { term: 6, .. })
    ));
    assert_eq!(p.term(), 1, "the primary does not adopt it");
    // A node configured as a secondary cannot start as the primary, nor the reverse.
    assert!(matches!(
        Node::new_primary(
            Config::new(1, 0, vec![0, 1], Policy::IdleCommit),
            1,
            Vec::new()
        ),
        Err(ProtocolError::WrongRole { .. })
    ));
    assert!(matches!(
        Node::new_secondary(
            Config::new(0, 0, vec![0, 1], Policy::IdleCommit),
            0,
            Vec::new()
        ),
        Err(ProtocolError::WrongRole { .. })
    ));
}

#[test]
fn idle_notifies_the_live_secondaries_while_one_is_unreachable() {
    // Unreachable as the driver sees it (disconnected), or only silent (no answer for
    // retransmit_ticks): either way it must not hold back the live secondary.
    for disconnected in [true, false] {
        let mut s = Sim::new(3, Policy::IdleCommit, 30);
        s.cut = vec![2];
        if disconnected {
            s.primary().peer_disconnected(2);
        }
        s.deliver_all();
        let base = s.empty_sent();
        for period in 1..=4u64 {
            s.burst_then_quiet(period, 25);
            let last = s.nodes[&PRIMARY].node.last_index();
            assert_eq!(
                s.applied(1) as u64,
                last,
                "disconnected {disconnected}, period {period}: the live secondary applied"
            );
            assert_eq!(
                s.empty_sent() - base,
                period,
                "disconnected {disconnected}: one notification per idle period, to the live one"
            );
            s.tick(100);
            s.deliver_all();
            assert_eq!(s.empty_sent() - base, period);
        }
        assert_eq!(s.applied(2), 0);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
    }
}

#[test]
fn a_secondary_with_a_full_log_keeps_serving_and_the_primary_reports_it() {
    let mut s = Sim::new(3, Policy::IdleCommit, 31);
    s.deliver_all();
    s.full = vec![2];
    for i in 0..5 {
        s.propose(format!("f{i}").as_bytes());
        s.deliver_all();
    }
    s.tick(25);
    s.deliver_all();
    // Committed with the other secondary, which applied everything (idle did not wait for
    // the full one).
    assert_eq!(s.nodes[&PRIMARY].node.commit(), 5);
    assert_eq!(s.applied(1), 5);
    assert!(s.nodes[&2].disk.is_empty());
    assert_eq!(
        s.nodes[&2].node.last_index(),
        0,
        "nothing kept past its durable index"
    );
    let reports: Vec<_> = s
        .errors
        .iter()
        .filter(|(to, e)| *to == PRIMARY && matches!(e, ProtocolError::PeerLogFull { peer: 2, .. }))
        .collect();
    assert_eq!(reports.len(), 1, "reported once: {:?}", s.errors);
    // Retried once per retransmit period (a probe, then what fits the window), not in a
    // loop.
    let before = s.delivered[&2].0;
    s.tick(200);
    s.deliver_all();
    let retries = s.delivered[&2].0 - before;
    assert!(
        (1..=2 * (200 / 20 + 1)).contains(&retries),
        "{retries} appends in 10 retransmit periods"
    );
    // Room again: it catches up.
    s.full.clear();
    s.settle(5, 1_000);
    assert_eq!(s.nodes[&2].disk, s.nodes[&PRIMARY].disk);
}

#[test]
fn a_crashed_primary_whose_appends_reached_the_secondaries_is_overruled_in_its_next_term() {
    let mut s = Sim::new(3, Policy::IdleCommit, 40);
    s.deliver_all();
    for i in 0..3 {
        s.propose(format!("a{i}").as_bytes());
    }
    s.settle(3, 100);
    // x goes out to the secondaries, which persist it; the primary crashes before its own
    // flush (and before hearing back).
    s.primary().propose(b"x".to_vec()).unwrap();
    let rd = s.primary().ready();
    assert_eq!(rd.persist.len(), 1);
    s.net.extend(rd.messages);
    s.cut = vec![PRIMARY];
    s.deliver_all();
    for id in [1, 2] {
        assert_eq!(s.nodes[&id].disk.len(), 4, "secondary {id} holds x");
        assert_eq!(&s.nodes[&id].disk[3].payload[..], b"x");
        assert!(s.applied(id) <= 3, "x was never committed");
    }
    // Restart from the durable log (without x) in term 2; a new write takes index 4.
    let disk = s.nodes[&PRIMARY].disk.clone();
    assert_eq!(disk.len(), 3);
    let mut cfg = Config::new(PRIMARY, PRIMARY, vec![0, 1, 2], Policy::IdleCommit);
    cfg.retransmit_ticks = 20;
    let sn = s.nodes.get_mut(&PRIMARY).unwrap();
    sn.node = Node::new_primary(cfg, 2, disk).unwrap();
    sn.applied.clear();
    s.net.clear();
    s.cut.clear();
    s.process(PRIMARY);
    s.propose(b"y");
    s.settle(4, 1_000);
    for (id, sn) in &s.nodes {
        assert_eq!(sn.disk, s.nodes[&PRIMARY].disk, "node {id}");
        assert_eq!(&sn.disk[3].payload[..], b"y", "node {id}: x was truncated");
        assert_eq!(sn.disk[3].term, 2);
        assert_eq!(sn.applied, sn.disk, "node {id}");
    }
    assert!(s.errors.is_empty(), "{:?}", s.errors);
}

#[test]
fn appends_respect_the_byte_limit_and_oversized_proposals_are_refused() {
    let mut cfg = Config::new(0, 0, vec![0, 1], Policy::Piggyback);
    cfg.max_batch_bytes = 10;
    let mut p = Node::new_primary(cfg, 1, Vec::new()).unwrap();
    p.ready();
    p.step(resp(1, 1, AppendOutcome::Ok, 0)).unwrap();
    assert_eq!(
        p.propose(vec![0u8; 11]).unwrap_err(),
        ProtocolError::PayloadTooLarge { len: 11, max: 10 }
    );
    assert_eq!(p.last_index(), 0);
    for _ in 0..5 {
        p.propose(vec![1u8; 4]).unwrap();
    }
    let rd = p.ready();
    assert_eq!(sent_to(&rd.messages, 1), [(0, 2), (2, 2), (4, 1)]);
}

#[test]
fn an_unanswering_secondary_gets_a_bounded_window_then_one_probe_per_period() {
    let mut cfg = Config::new(0, 0, vec![0, 1, 2], Policy::IdleCommit);
    cfg.retransmit_ticks = 20;
    cfg.max_batch_entries = 4;
    cfg.max_inflight_entries = 8;
    let mut p = Node::new_primary(cfg, 1, Vec::new()).unwrap();
    p.ready();
    p.step(resp(1, 1, AppendOutcome::Ok, 0)).unwrap();
    p.step(resp(2, 1, AppendOutcome::Ok, 0)).unwrap();
    p.peer_disconnected(2);
    for i in 0..100u64 {
        p.propose(vec![i as u8]).unwrap();
    }
    let rd = p.ready();
    // At most 8 entries beyond the match index in flight; nothing to the disconnected one.
    assert_eq!(sent_to(&rd.messages, 1), [(0, 4), (4, 4)]);
    assert!(sent_to(&rd.messages, 2).is_empty());
    assert!(!p.has_ready(), "the window is full: nothing more to send");
    // No answer for retransmit_ticks: one probe from the last match, not the window again.
    p.advance_to(20);
    let rd = p.ready();
    assert_eq!(sent_to(&rd.messages, 1), [(0, 0)]);
    assert!(sent_to(&rd.messages, 2).is_empty());
    assert_eq!(p.stats().retransmits, 1);
    p.advance_to(39);
    assert!(!p.has_ready(), "nothing before the next period");
    // The probe is answered: replication resumes from the match.
    p.step(resp(1, 1, AppendOutcome::Ok, 0)).unwrap();
    assert_eq!(sent_to(&p.ready().messages, 1), [(0, 4), (4, 4)]);
    // Reconnected: probed at the end of the log.
    p.peer_reconnected(2);
    assert_eq!(sent_to(&p.ready().messages, 2), [(100, 0)]);
}

#[test]
fn advance_to_runs_each_timer_once_however_many_ticks_passed() {
    let mut s = Sim::new(3, Policy::Periodic { every: 10 }, 50);
    s.deliver_all();
    let base = s.empty_sent();
    s.primary().advance_to(1_000);
    s.process(PRIMARY);
    assert_eq!(
        s.empty_sent() - base,
        2,
        "one heartbeat per secondary, not 100"
    );
    s.deliver_all();
    assert!(s.errors.is_empty());
}

#[test]
fn idle_ack_sends_exactly_one_empty_message_per_secondary_and_idle_period() {
    let mut s = Sim::new(3, Policy::IdleAck, 17);
    s.deliver_all();
    let base = s.empty_sent();
    for period in 1..=5u64 {
        s.burst_then_quiet(period, 3);
        assert_eq!(s.empty_sent() - base, 2 * period, "period {period}");
        let last = s.nodes[&PRIMARY].node.last_index();
        for sn in s.nodes.values() {
            assert_eq!(sn.applied.len() as u64, last, "applied once notified");
        }
        s.tick(100);
        s.deliver_all();
        assert_eq!(s.empty_sent() - base, 2 * period, "nothing more while idle");
    }
}

#[test]
fn idle_ack_notifies_a_secondary_only_after_its_own_acknowledgement() {
    let mut s = Sim::new(3, Policy::IdleAck, 12);
    s.deliver_all();
    let base = s.empty_sent();
    s.propose(b"x");
    // Secondary 2 is slow: it neither receives nor acknowledges yet.
    while let Some(i) = s.net.iter().position(|(to, _)| *to != 2) {
        let (to, m) = s.net.remove(i);
        s.nodes.get_mut(&to).unwrap().node.step(m).unwrap();
        s.process(to);
    }
    assert_eq!(
        s.nodes[&PRIMARY].node.commit(),
        1,
        "committed with secondary 1"
    );
    assert_eq!(
        s.empty_sent() - base,
        1,
        "only secondary 1, which acknowledged the last entry, is notified"
    );
    assert_eq!(s.applied(1), 1);
    assert_eq!(s.applied(2), 0);
    // The slow one gets the entry, persists and acknowledges: now it is notified.
    s.deliver_all();
    assert_eq!(s.empty_sent() - base, 2);
    assert_eq!(s.applied(2), 1);
    s.tick(100);
    s.deliver_all();
    assert_eq!(s.empty_sent() - base, 2, "nothing more while idle");
}

#[test]
fn idle_ack_sends_nothing_while_a_write_is_in_flight() {
    let mut s = Sim::new(3, Policy::IdleAck, 13);
    s.deliver_all();
    let base = s.empty_sent();
    s.propose(b"a");
    // A second write arrives before anything is delivered: no secondary has acknowledged
    // the last entry until both are delivered, so nothing is sent for entry 1 alone.
    s.propose(b"b");
    s.deliver_all();
    s.tick(3);
    s.deliver_all();
    // Once both are acknowledged, each secondary gets exactly one notification.
    assert_eq!(s.empty_sent() - base, 2);
}

/// The kill runs' checker catches a secondary that applies on receipt: timelines from a
/// simulated run in which secondaries apply an append's entries when it arrives, and the
/// acknowledgements are lost, so the primary never commits.
#[test]
fn the_checker_catches_a_policy_that_applies_on_receipt() {
    use blocklab::repl::check::{applied_uncommitted, Life, Violation};
    use blocklab::repl::events::Event;

    for broken in [false, true] {
        let mut s = Sim::new(3, Policy::IdleAck, 21);
        s.deliver_all();
        let mut t = 0i64;
        let mut primary: Vec<(Event, i64)> = Vec::new();
        let mut secondaries: Vec<(NodeId, Vec<Life>)> =
            vec![(1, vec![Vec::new()]), (2, vec![Vec::new()])];
        s.propose(b"x");
        if !broken {
            // The correct protocol: everything delivered, applies from Ready.apply.
            s.deliver_all();
        }
        while let Some((to, m)) = (!s.net.is_empty()).then(|| s.net.remove(0)) {
            t += 1;
            if let Message::Append { entries, .. } = &m {
                if broken && !entries.is_empty() && to != PRIMARY {
                    let (f, l) = (entries[0].index, entries[entries.len() - 1].index);
                    secondaries[to as usize - 1].1[0].push((Event::Apply { first: f, last: l }, t));
                }
            }
            if to == PRIMARY {
                continue; // the acknowledgements are lost
            }
            s.nodes.get_mut(&to).unwrap().node.step(m).unwrap();
            s.process(to);
        }
        let c = s.nodes[&PRIMARY].node.commit();
        if c > 0 {
            primary.push((Event::Commit { commit: c }, 0));
        }
        for (id, lives) in secondaries.iter_mut() {
            let n = s.applied(*id) as u64;
            if n > 0 {
                lives[0].push((Event::Apply { first: 1, last: n }, t + 1));
            }
        }
        let v = applied_uncommitted(&[primary], &secondaries);
        if broken {
            assert_eq!(
                v.len(),
                2,
                "both secondaries applied entry 1 uncommitted: {v:?}"
            );
            assert!(v
                .iter()
                .all(|x| matches!(x, Violation::AppliedUncommitted { index: 1, .. })));
        } else {
            assert!(v.is_empty(), "{v:?}");
        }
    }
}

/// A secondary that adopts a higher term hands it out once, in the Ready whose
/// acknowledgement carries it (the driver makes it durable before sending that), and a
/// restarted secondary starts in the term it persisted.
#[test]
fn a_secondary_hands_out_each_term_it_adopts_once_to_persist_before_answering() {
    let cfg = || Config::new(1, 0, vec![0, 1, 2], Policy::IdleCommit);
    let mut sec = Node::new_secondary(cfg(), 2, Vec::new()).unwrap();
    assert_eq!(sec.term(), 2, "restarted in the persisted term");
    assert!(!sec.has_ready());
    // An append of a higher term: the term comes with the acknowledgement that needs it.
    sec.step(append(3, 0, 0, 0, vec![entry(3, 1)])).unwrap();
    assert!(sec.has_ready());
    let rd = sec.ready();
    assert_eq!(rd.persist_term, Some(3));
    assert_eq!(rd.persist, vec![entry(3, 1)]);
    assert!(
        rd.messages.is_empty(),
        "nothing goes out before the persist"
    );
    assert!(
        matches!(
            rd.persisted_messages[..],
            [(0, Message::AppendResp { term: 3, .. })]
        ),
        "{:?}",
        rd.persisted_messages
    );
    sec.persisted(1);
    assert_eq!(sec.ready().persist_term, None, "handed out once");
    // More appends in the same term, and one from an older incarnation: nothing to persist.
    sec.step(append(3, 1, 3, 1, vec![entry(3, 2)])).unwrap();
    assert_eq!(sec.ready().persist_term, None);
    sec.persisted(2);
    sec.step(append(2, 0, 0, 0, Vec::new())).unwrap();
    let rd = sec.ready();
    assert_eq!(rd.persist_term, None);
    assert!(matches!(
        rd.persisted_messages[..],
        [(
            0,
            Message::AppendResp {
                term: 3,
                outcome: AppendOutcome::Mismatch,
                ..
            }
        )]
    ));
    // A newer term on an append that does not match is adopted all the same.
    sec.step(append(5, 9, 5, 0, Vec::new())).unwrap();
    let rd = sec.ready();
    assert_eq!(rd.persist_term, Some(5));
    assert!(matches!(
        rd.persisted_messages[..],
        [(
            0,
            Message::AppendResp {
                term: 5,
                outcome: AppendOutcome::Mismatch,
                ..
            }
        )]
    ));
    // A log whose header lags its entries (written before headers kept a secondary's
    // term): the entries' term.
    let sec = Node::new_secondary(cfg(), 1, vec![entry(1, 1), entry(4, 2)]).unwrap();
    assert_eq!(sec.term(), 4);
    // The primary never hands one out.
    let mut s = Sim::new(3, Policy::IdleCommit, 60);
    s.propose(b"x");
    let rd = s.primary().ready();
    assert_eq!(rd.persist_term, None);
}

/// Every secondary of the simulated cluster answers only in a term its device holds (the
/// simulation checks it on every answer), across primary restarts in higher terms.
#[test]
fn secondaries_answer_only_in_persisted_terms_across_primary_restarts() {
    let mut s = Sim::new(3, Policy::IdleCommit, 61);
    s.drop_p = 0.05;
    s.reorder = true;
    for term in 2..=4u64 {
        for i in 0..10 {
            s.propose(format!("t{term}-{i}").as_bytes());
        }
        let last = s.nodes[&PRIMARY].node.last_index();
        s.settle(last, 5_000);
        // Restart the primary from its durable log in the next term.
        let disk = s.nodes[&PRIMARY].disk.clone();
        let mut cfg = Config::new(PRIMARY, PRIMARY, vec![0, 1, 2], Policy::IdleCommit);
        cfg.retransmit_ticks = 20;
        let sn = s.nodes.get_mut(&PRIMARY).unwrap();
        sn.node = Node::new_primary(cfg, term, disk).unwrap();
        sn.applied.clear();
        s.net.retain(|(to, _)| *to != PRIMARY);
        s.process(PRIMARY);
    }
    s.propose(b"last");
    let last = s.nodes[&PRIMARY].node.last_index();
    s.settle(last, 5_000);
    for id in [1, 2] {
        assert_eq!(s.nodes[&id].term_on_disk, 4, "secondary {id}");
        assert_eq!(s.nodes[&id].node.term(), 4, "secondary {id}");
    }
}

#[test]
fn a_write_after_a_long_idle_period_sends_no_probe() {
    for policy in all_policies() {
        let mut s = Sim::new(3, policy, 41);
        s.deliver_all();
        s.propose(b"a");
        s.settle_primary_commit(1);
        s.deliver_all();
        let probes = s.nodes[&PRIMARY].node.stats().probes;
        // Quiet for ten retransmission periods, then a write, and time advances before the
        // driver asks for the Ready (as the replica loop does: inputs, then ticks, then
        // ready).
        s.tick(200);
        s.deliver_all();
        s.primary().propose(b"b".to_vec()).unwrap();
        s.tick(1);
        s.deliver_all();
        s.tick(1);
        s.deliver_all();
        let st = s.nodes[&PRIMARY].node.stats();
        assert_eq!(
            st.probes, probes,
            "{policy:?}: a probe after an idle period"
        );
        assert_eq!(st.retransmits, 0, "{policy:?}");
    }
}
