//! The task dispatcher's decisions, apart from any I/O: a deterministic state machine driven
//! by [`Dispatcher::step`] with [`Input`]s (a tick of the heartbeat period, the result of
//! the probe of the node's own block-service connection, a heartbeat from a peer) that
//! returns [`Action`]s (send this heartbeat to the peers, take the VIP, give it up).
//!
//! Rules (all counted in ticks of the heartbeat period):
//!
//! * A peer is *reachable* while its last heartbeat is at most `dead_after` ticks old; it is
//!   *healthy* when reachable and its own heartbeat says its block-service probe succeeds.
//!   The node itself is healthy while its last successful probe is at most `dead_after`
//!   ticks old.
//! * The holder keeps the VIP only while it is healthy, sees a majority of the nodes
//!   (itself included) reachable, and has not heard of an epoch newer than its own (a newer
//!   holding epoch or a newer `max_epoch` in any heartbeat); otherwise it gives the VIP up
//!   at once (after `dead_after` ticks of silence).
//! * A non-holder takes the VIP only when no holder has been heard from for
//!   `takeover_after` (> `dead_after`) ticks, it sees a majority, it is healthy, and it is
//!   the smallest healthy node id it can see (deterministic choice). When the holder is cut
//!   off from everyone else, it steps down `takeover_after - dead_after` ticks before anyone
//!   on the other side takes over, so the two never overlap. With one-way loss or a
//!   non-transitive split (A hears C, B hears C, A and B do not hear each other) two nodes
//!   can hold at once for a tick or two, until the older one hears of the newer epoch:
//!   **safety comes from the block service's fencing**, not from the tick model.
//! * Every takeover raises the epoch `(counter, node)` above every epoch seen; the block
//!   service fences submissions (and claims) from older epochs, so even with skewed clocks
//!   or overlapping holders two holders never act on one operation.
//! * A claim the block service fences tells the node the service's current epoch
//!   ([`Dispatcher::acquire_failed`]), so after a restart of every node (all starting at
//!   epoch 0) the next claim is high enough at once. A node whose acquisition failed counts
//!   itself unhealthy for `takeover_after` ticks, so a node that cannot take the VIP (e.g. a
//!   misconfigured interface) does not keep the others from taking it.
//! * A node that starts (or restarts) waits `takeover_after` ticks before taking the VIP, so
//!   it first hears about a holder that already exists (no needless fail-back).

use serde::{Deserialize, Serialize};

/// A node's id (small integers; the smallest healthy id is the deterministic choice).
pub type NodeId = u32;

/// A VIP epoch: a counter and the node that took the VIP; ordered lexicographically so two
/// simultaneous takeovers are still totally ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch {
    pub counter: u64,
    pub node: NodeId,
}

impl Epoch {
    pub const ZERO: Epoch = Epoch {
        counter: 0,
        node: 0,
    };
}

/// Timing of the dispatcher, in ticks of the heartbeat period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A peer (or the node's own block service) silent for more than this many ticks is dead.
    pub dead_after: u64,
    /// A holder silent for more than this many ticks is replaced (must exceed `dead_after`).
    pub takeover_after: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            dead_after: 3,
            takeover_after: 4,
        }
    }
}

/// What a dispatcher tells its peers every tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub from: NodeId,
    /// The sender's own block-service probe is succeeding.
    pub healthy: bool,
    /// The sender holds the VIP with this epoch.
    pub holding: Option<Epoch>,
    /// The highest epoch the sender has seen.
    pub max_epoch: Epoch,
}

/// An input to [`Dispatcher::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// One heartbeat period has passed.
    Tick,
    /// The probe of the node's own block-service connection finished.
    Probe { ok: bool },
    /// A heartbeat arrived from a peer.
    Heartbeat(Heartbeat),
}

/// What the caller must do, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send [`Dispatcher::heartbeat`] to every peer. It is built when this action is
    /// applied, i.e. after the actions before it (a failed `Acquire` is not announced).
    Broadcast,
    /// Take the VIP (bind/add it) with this epoch and announce the epoch to the block service.
    Acquire(Epoch),
    /// Give the VIP up.
    Release,
}

#[derive(Debug, Clone, Copy)]
struct Peer {
    id: NodeId,
    last_heard: Option<u64>,
    healthy: bool,
    holding: Option<Epoch>,
}

/// The dispatcher of one node.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    me: NodeId,
    n_nodes: usize,
    timing: Timing,
    now: u64,
    last_probe_ok: Option<u64>,
    peers: Vec<Peer>,
    holding: Option<Epoch>,
    max_epoch: Epoch,
    /// The tick at which we last heard of any holder (ourselves included).
    last_holder_seen: Option<u64>,
    /// The tick of the last failed acquisition (unhealthy for `takeover_after` ticks after).
    acquire_failed_at: Option<u64>,
}

impl Dispatcher {
    /// `nodes` lists every node of the cluster, `me` included.
    pub fn new(me: NodeId, nodes: &[NodeId], timing: Timing) -> Dispatcher {
        let peers = nodes
            .iter()
            .copied()
            .filter(|&n| n != me)
            .map(|id| Peer {
                id,
                last_heard: None,
                healthy: false,
                holding: None,
            })
            .collect();
        let mut n_nodes = nodes.len();
        if !nodes.contains(&me) {
            n_nodes += 1;
        }
        Dispatcher {
            me,
            n_nodes,
            timing: Timing {
                dead_after: timing.dead_after.max(1),
                takeover_after: timing.takeover_after.max(timing.dead_after.max(1) + 1),
            },
            now: 0,
            last_probe_ok: None,
            peers,
            holding: None,
            max_epoch: Epoch::ZERO,
            last_holder_seen: None,
            acquire_failed_at: None,
        }
    }

    pub fn id(&self) -> NodeId {
        self.me
    }
    /// The epoch with which this node holds the VIP, if it does.
    pub fn holding(&self) -> Option<Epoch> {
        self.holding
    }
    pub fn max_epoch(&self) -> Epoch {
        self.max_epoch
    }
    pub fn now(&self) -> u64 {
        self.now
    }

    fn fresh(&self, t: Option<u64>, limit: u64) -> bool {
        matches!(t, Some(t) if self.now.saturating_sub(t) <= limit)
    }

    /// Whether the node's own block-service probe is recent enough and it did not fail to
    /// take the VIP within the last `takeover_after` ticks.
    pub fn self_healthy(&self) -> bool {
        self.fresh(self.last_probe_ok, self.timing.dead_after)
            && !self.fresh(self.acquire_failed_at, self.timing.takeover_after)
    }

    /// Peers heard from within `dead_after` ticks.
    pub fn reachable_peers(&self) -> Vec<NodeId> {
        self.peers
            .iter()
            .filter(|p| self.fresh(p.last_heard, self.timing.dead_after))
            .map(|p| p.id)
            .collect()
    }

    /// The health table: every node with whether this dispatcher considers it healthy.
    pub fn health_table(&self) -> Vec<(NodeId, bool)> {
        let mut t = vec![(self.me, self.self_healthy())];
        for p in &self.peers {
            t.push((
                p.id,
                p.healthy && self.fresh(p.last_heard, self.timing.dead_after),
            ));
        }
        t.sort();
        t
    }

    fn has_majority(&self) -> bool {
        (self.reachable_peers().len() + 1) * 2 > self.n_nodes
    }

    /// The deterministic choice: the smallest healthy node id this dispatcher can see.
    pub fn choose_holder(&self) -> Option<NodeId> {
        self.health_table()
            .into_iter()
            .filter(|&(_, h)| h)
            .map(|(n, _)| n)
            .min()
    }

    /// The heartbeat to send now (for [`Action::Broadcast`]).
    pub fn heartbeat(&self) -> Heartbeat {
        Heartbeat {
            from: self.me,
            healthy: self.self_healthy(),
            holding: self.holding,
            max_epoch: self.max_epoch,
        }
    }

    /// Feeds one input; returns what to do, in order.
    pub fn step(&mut self, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Probe { ok } => {
                if ok {
                    self.last_probe_ok = Some(self.now);
                }
            }
            Input::Heartbeat(hb) => {
                if hb.from == self.me {
                    return out;
                }
                if let Some(p) = self.peers.iter_mut().find(|p| p.id == hb.from) {
                    p.last_heard = Some(self.now);
                    p.healthy = hb.healthy;
                    p.holding = hb.holding;
                } else {
                    // A node not in the configuration: ignore it, epochs included (a stray
                    // datagram must not make the holder step down).
                    return out;
                }
                self.max_epoch = self.max_epoch.max(hb.max_epoch);
                if let Some(e) = hb.holding {
                    self.max_epoch = self.max_epoch.max(e);
                }
                if hb.holding.is_some() {
                    self.last_holder_seen = Some(self.now);
                }
                // Someone took the VIP with a newer epoch than ours (we may only hear of it
                // through a third node's max_epoch): step down.
                self.step_down_if_superseded(&mut out);
            }
            Input::Tick => {
                self.now += 1;
                self.decide(&mut out);
                out.push(Action::Broadcast);
            }
        }
        out
    }

    fn step_down_if_superseded(&mut self, out: &mut Vec<Action>) {
        if let Some(mine) = self.holding {
            if self.max_epoch > mine {
                self.holding = None;
                self.last_holder_seen = Some(self.now);
                out.push(Action::Release);
            }
        }
    }

    fn decide(&mut self, out: &mut Vec<Action>) {
        self.step_down_if_superseded(out);
        if self.holding.is_some() {
            self.last_holder_seen = Some(self.now);
            if !self.self_healthy() || !self.has_majority() {
                self.holding = None;
                out.push(Action::Release);
            }
            return;
        }
        // Forget peers' holding claims that are too old.
        let holder_alive = self
            .peers
            .iter()
            .any(|p| p.holding.is_some() && self.fresh(p.last_heard, self.timing.takeover_after));
        if holder_alive {
            return;
        }
        // Startup grace and takeover delay: no holder heard of for takeover_after ticks.
        let quiet_since = self.last_holder_seen.unwrap_or(0);
        if self.now.saturating_sub(quiet_since) <= self.timing.takeover_after {
            return;
        }
        if !self.self_healthy() || !self.has_majority() {
            return;
        }
        if self.choose_holder() != Some(self.me) {
            return;
        }
        // An exhausted counter (only a forged heartbeat gets there) is never claimed past.
        let Some(counter) = self.max_epoch.counter.checked_add(1) else {
            return;
        };
        let epoch = Epoch {
            counter,
            node: self.me,
        };
        self.max_epoch = epoch;
        self.holding = Some(epoch);
        self.last_holder_seen = Some(self.now);
        out.push(Action::Acquire(epoch));
    }

    /// The caller could not take the VIP after [`Action::Acquire`]: the block service
    /// fenced the claim (`seen` = the service's current epoch, which raises ours so the next
    /// claim is above it) or the address could not be taken (`seen` = `None`). Forgets the
    /// claim and counts the node unhealthy for `takeover_after` ticks, so a healthy peer
    /// can take the VIP meanwhile; the next ticks decide again.
    pub fn acquire_failed(&mut self, seen: Option<Epoch>) {
        self.holding = None;
        if let Some(e) = seen {
            self.max_epoch = self.max_epoch.max(e);
        }
        self.acquire_failed_at = Some(self.now);
        self.last_holder_seen = Some(self.now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic cluster of dispatchers with a controllable network, per-node
    /// block-service health, and the block service's claim fencing.
    struct Sim {
        nodes: Vec<Dispatcher>,
        alive: Vec<bool>,
        probe_ok: Vec<bool>,
        /// Nodes whose VIP acquisition always fails (e.g. a wrong interface name).
        acquire_breaks: Vec<bool>,
        /// link[i][j]: heartbeats from i reach j.
        link: Vec<Vec<bool>>,
        /// The block service's highest epoch: a claim below it is fenced.
        service_epoch: Epoch,
        /// Every (tick, node, epoch) at which a node started holding.
        acquisitions: Vec<(u64, NodeId, Epoch)>,
        /// Assert "never two holders" also before the tick's heartbeats are delivered
        /// (holds when links are symmetric and transitive); otherwise only bound the
        /// overlap (one-way loss: safety then comes from the service's fencing).
        strict: bool,
        /// Consecutive ticks with two holders after delivery.
        overlap: u64,
    }

    impl Sim {
        /// Three nodes after ten ticks: the smallest, node 0, holds the VIP.
        fn started() -> Sim {
            let mut s = Sim::new(3);
            s.run(10);
            assert_eq!(s.holders(), vec![0]);
            s
        }
        fn new(n: usize) -> Sim {
            let ids: Vec<NodeId> = (0..n as NodeId).collect();
            Sim {
                nodes: ids
                    .iter()
                    .map(|&i| Dispatcher::new(i, &ids, Timing::default()))
                    .collect(),
                alive: vec![true; n],
                probe_ok: vec![true; n],
                acquire_breaks: vec![false; n],
                link: vec![vec![true; n]; n],
                service_epoch: Epoch::ZERO,
                acquisitions: Vec::new(),
                strict: true,
                overlap: 0,
            }
        }
        fn tick(&mut self) {
            let n = self.nodes.len();
            let mut mail: Vec<(usize, Heartbeat)> = Vec::new();
            for i in 0..n {
                if !self.alive[i] {
                    continue;
                }
                let ok = self.probe_ok[i];
                self.nodes[i].step(Input::Probe { ok });
                for a in self.nodes[i].step(Input::Tick) {
                    match a {
                        Action::Broadcast => {
                            let hb = self.nodes[i].heartbeat();
                            for j in 0..n {
                                if j != i && self.link[i][j] {
                                    mail.push((j, hb));
                                }
                            }
                        }
                        Action::Acquire(e) => {
                            // The block service's Claim: fenced below its epoch.
                            if e < self.service_epoch {
                                self.nodes[i].acquire_failed(Some(self.service_epoch));
                            } else if self.acquire_breaks[i] {
                                self.service_epoch = e;
                                self.nodes[i].acquire_failed(None);
                            } else {
                                self.service_epoch = e;
                                self.acquisitions
                                    .push((self.nodes[i].now(), i as NodeId, e));
                            }
                        }
                        Action::Release => {}
                    }
                }
            }
            if self.strict {
                assert!(
                    self.holders().len() <= 1,
                    "two holders at once (before delivery): {:?}",
                    self.holders()
                );
            }
            for (j, hb) in mail {
                if self.alive[j] {
                    self.nodes[j].step(Input::Heartbeat(hb));
                }
            }
            if self.holders().len() > 1 {
                self.overlap += 1;
            } else {
                self.overlap = 0;
            }
            if self.strict {
                assert!(
                    self.holders().is_empty() || self.overlap == 0,
                    "two holders at once: {:?}",
                    self.holders()
                );
            } else {
                // An older holder hears of the newer epoch within two ticks (directly, or
                // through a third node's max_epoch); meanwhile the service fences it.
                assert!(self.overlap <= 2, "two holders for {} ticks", self.overlap);
            }
        }
        fn run(&mut self, ticks: usize) {
            for _ in 0..ticks {
                self.tick();
            }
        }
        fn holders(&self) -> Vec<NodeId> {
            (0..self.nodes.len())
                .filter(|&i| self.alive[i] && self.nodes[i].holding().is_some())
                .map(|i| i as NodeId)
                .collect()
        }
        fn kill(&mut self, i: usize) {
            self.alive[i] = false;
        }
        fn restart(&mut self, i: usize) {
            let ids: Vec<NodeId> = (0..self.nodes.len() as NodeId).collect();
            self.nodes[i] = Dispatcher::new(i as NodeId, &ids, Timing::default());
            self.alive[i] = true;
        }
        fn split(&mut self, groups: &[&[usize]]) {
            let n = self.nodes.len();
            for i in 0..n {
                for j in 0..n {
                    let same = groups.iter().any(|g| g.contains(&i) && g.contains(&j));
                    self.link[i][j] = same;
                }
            }
        }
        fn heal(&mut self) {
            let n = self.nodes.len();
            self.link = vec![vec![true; n]; n];
        }
    }

    #[test]
    fn smallest_healthy_node_takes_the_vip_at_start() {
        let s = Sim::started(); // asserts that node 0 holds
        assert_eq!(s.acquisitions.len(), 1);
    }

    #[test]
    fn holder_dead_next_smallest_takes_over_once() {
        let mut s = Sim::started();
        s.kill(0);
        s.run(10);
        assert_eq!(s.holders(), vec![1]);
        assert_eq!(s.acquisitions.len(), 2);
        let (_, _, e0) = s.acquisitions[0];
        let (_, _, e1) = s.acquisitions[1];
        assert!(e1 > e0, "the new epoch is higher");
        // The dead node comes back: no fail-back, it follows the current holder.
        s.restart(0);
        s.run(20);
        assert_eq!(s.holders(), vec![1]);
        assert_eq!(s.acquisitions.len(), 2);
    }

    #[test]
    fn two_nodes_dead_leaves_no_holder_without_majority() {
        let mut s = Sim::started();
        s.kill(0);
        s.kill(1);
        s.run(20);
        assert!(s.holders().is_empty(), "a lone node must not take the VIP");
        // One comes back: a majority again, and the smallest healthy takes it.
        s.restart(1);
        s.run(20);
        assert_eq!(s.holders(), vec![1]);
    }

    #[test]
    fn node_with_failed_block_service_probe_is_not_chosen_and_gives_up() {
        let mut s = Sim::new(3);
        s.probe_ok[0] = false;
        s.run(10);
        assert_eq!(
            s.holders(),
            vec![1],
            "node 0 cannot reach its block service"
        );
        s.probe_ok[0] = true;
        s.probe_ok[1] = false;
        s.run(20);
        assert_eq!(s.holders(), vec![0]);
    }

    #[test]
    fn network_split_never_gives_two_holders() {
        let mut s = Sim::started();
        // The holder is cut off from both peers: it steps down, the majority side elects 1.
        s.split(&[&[0], &[1, 2]]);
        s.run(20); // Sim::tick asserts "never two holders" at every tick.
        assert_eq!(s.holders(), vec![1]);
        // Heal: 0 learns about the newer holder and stays a follower.
        s.heal();
        s.run(20);
        assert_eq!(s.holders(), vec![1]);
        // Every split of three nodes, repeatedly, in both directions.
        for round in 0..6 {
            let a = round % 3;
            let rest: Vec<usize> = (0..3).filter(|&x| x != a).collect();
            s.split(&[&[a], &rest]);
            s.run(15);
            s.heal();
            s.run(15);
            assert_eq!(s.holders().len(), 1);
        }
        // Epochs of the successive holders strictly increase.
        let epochs: Vec<Epoch> = s.acquisitions.iter().map(|a| a.2).collect();
        assert!(epochs.windows(2).all(|w| w[1] > w[0]), "{epochs:?}");
    }

    #[test]
    fn asymmetric_link_does_not_give_two_holders() {
        let mut s = Sim::started();
        // One-way loss: in the tick 1 takes over, 0 still holds until 1's heartbeat
        // arrives (the service fences 0 meanwhile), so only the overlap is bounded.
        s.strict = false;
        // 0's heartbeats no longer reach 1 and 2, but 0 still hears them (one-way loss).
        s.link[0][1] = false;
        s.link[0][2] = false;
        s.run(20);
        // 0 still sees a majority and holds; 1 takes over because it no longer hears 0.
        // Then 0 hears 1's holding heartbeat with a newer epoch and steps down at once.
        assert_eq!(s.holders().len(), 1);
        assert_eq!(s.holders(), vec![1]);
    }

    #[test]
    fn newer_epoch_makes_a_holder_step_down() {
        let mut d = holding_node_0();
        let mine = d.holding().expect("0 holds");
        let acts = d.step(Input::Heartbeat(Heartbeat {
            from: 2,
            healthy: true,
            holding: Some(Epoch {
                counter: mine.counter + 1,
                node: 2,
            }),
            max_epoch: Epoch::ZERO,
        }));
        assert_eq!(acts, vec![Action::Release]);
        assert_eq!(d.holding(), None);
    }

    #[test]
    fn a_heartbeat_from_outside_the_configuration_changes_nothing() {
        let mut d = holding_node_0();
        let mine = d.holding().unwrap();
        let acts = d.step(Input::Heartbeat(Heartbeat {
            from: 9,
            healthy: true,
            holding: Some(Epoch {
                counter: u64::MAX,
                node: 9,
            }),
            max_epoch: Epoch {
                counter: u64::MAX,
                node: 9,
            },
        }));
        assert!(acts.is_empty(), "{acts:?}");
        assert_eq!(d.holding(), Some(mine));
    }

    /// One tick of node 0 of three: its probe succeeds and both peers, healthy and not
    /// holding, send a heartbeat; the tick's actions.
    fn round(d: &mut Dispatcher) -> Vec<Action> {
        d.step(Input::Probe { ok: true });
        for p in [1, 2] {
            d.step(Input::Heartbeat(Heartbeat {
                from: p,
                healthy: true,
                holding: None,
                max_epoch: Epoch::ZERO,
            }));
        }
        d.step(Input::Tick)
    }

    fn holding_node_0() -> Dispatcher {
        let mut d = Dispatcher::new(0, &[0, 1, 2], Timing::default());
        for _ in 0..10 {
            round(&mut d);
        }
        assert!(d.holding().is_some());
        d
    }

    #[test]
    fn a_newer_max_epoch_relayed_by_a_third_node_makes_a_holder_step_down() {
        let mut d = holding_node_0();
        let mine = d.holding().unwrap();
        // Node 2 does not hold, but has seen a newer epoch (node 1 took over on the other
        // side of a non-transitive split).
        let acts = d.step(Input::Heartbeat(Heartbeat {
            from: 2,
            healthy: true,
            holding: None,
            max_epoch: Epoch {
                counter: mine.counter + 1,
                node: 1,
            },
        }));
        assert_eq!(acts, vec![Action::Release]);
        assert_eq!(d.holding(), None);
    }

    #[test]
    fn a_failed_acquisition_is_not_announced_and_raises_the_epoch() {
        let mut d = Dispatcher::new(0, &[0, 1, 2], Timing::default());
        let mut acquired = None;
        for _ in 0..10 {
            let acts = round(&mut d);
            if let Some(Action::Acquire(e)) = acts.first() {
                acquired = Some(*e);
                let service = Epoch {
                    counter: 50,
                    node: 2,
                };
                d.acquire_failed(Some(service));
                assert_eq!(acts.last(), Some(&Action::Broadcast));
                // The heartbeat built after the failure: not holding, unhealthy, and
                // carrying the service's epoch.
                let hb = d.heartbeat();
                assert_eq!(hb.holding, None);
                assert!(!hb.healthy);
                assert_eq!(hb.max_epoch, service);
                break;
            }
        }
        assert!(acquired.is_some(), "node 0 tried to take the VIP");
    }

    #[test]
    fn every_node_restarting_below_the_service_epoch_gets_a_holder_quickly() {
        let mut s = Sim::started();
        // The journal has seen many takeovers; every management node restarts at epoch 0.
        s.service_epoch = Epoch {
            counter: 50,
            node: 2,
        };
        for i in 0..3 {
            s.kill(i);
        }
        for i in 0..3 {
            s.restart(i);
        }
        let bound = 3 * (Timing::default().takeover_after + 1);
        let mut ticks = 0;
        while s.holders().is_empty() {
            assert!(ticks < bound, "no holder after {ticks} ticks");
            s.tick();
            ticks += 1;
        }
        let (_, _, e) = *s.acquisitions.last().unwrap();
        assert!(
            e.counter > 50,
            "the new holder's epoch passes the fence: {e:?}"
        );
    }

    #[test]
    fn a_node_that_cannot_take_the_vip_does_not_block_the_others() {
        let mut s = Sim::new(3);
        s.acquire_breaks[0] = true;
        s.run(30);
        assert_eq!(s.holders(), vec![1]);
        assert!(s.acquisitions.iter().all(|a| a.1 != 0));
    }

    #[test]
    fn non_transitive_split_leaves_no_lasting_second_holder() {
        let mut s = Sim::started();
        // 0 and 1 no longer hear each other; both still hear 2 (and 2 both of them).
        s.strict = false;
        s.link[0][1] = false;
        s.link[1][0] = false;
        s.run(60); // Sim::tick bounds any overlap to two ticks.
        assert!(s.holders().len() <= 1);
        s.heal();
        s.run(20);
        assert_eq!(s.holders().len(), 1);
        let epochs: Vec<Epoch> = s.acquisitions.iter().map(|a| a.2).collect();
        assert!(epochs.windows(2).all(|w| w[1] > w[0]), "{epochs:?}");
    }
}
