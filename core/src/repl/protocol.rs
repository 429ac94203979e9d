//! The replication protocol without I/O, in the tick/step/ready style of tikv/raft-rs.
//!
//! A [`Node`] is fed inputs — [`Node::propose`] (primary), [`Node::step`] (a message from
//! a peer), [`Node::tick`] (one unit of logical time) — and hands out what the driver must
//! do in a [`Ready`]: entries to persist (after an optional truncation), messages to send
//! at once, messages to send only after the persist is durable, committed entries to apply
//! and, on the primary, how far client writes may be answered. The driver persists the
//! Ready's entries (append, then flush) and then calls [`Node::persisted`]. Nothing here
//! reads a clock, a socket or a device, so tests drive it deterministically.
//!
//! Rules kept here:
//! * an entry is committed once a majority of the members (the primary always among them)
//!   has it durable; the primary counts itself only after its own flush, so a restarted
//!   primary, whose log is recovered from its device, still holds every committed entry;
//! * a secondary learns the commit index from messages, caps it at the index it verified
//!   against the primary's log, and applies only up to its own durable index, in order;
//! * empty messages (no entries) carry the commit index and cause no persist.

use std::collections::BTreeMap;

/// A replica's id.
pub type NodeId = u32;

/// One log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub term: u64,
    pub index: u64,
    pub payload: Vec<u8>,
}

/// A protocol message between replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Primary → secondary: entries following `prev_index` (possibly none) and the commit index.
    Append {
        term: u64,
        from: NodeId,
        prev_index: u64,
        prev_term: u64,
        commit: u64,
        entries: Vec<Entry>,
    },
    /// Secondary → primary, sent after the appended entries are durable.
    AppendResp {
        term: u64,
        from: NodeId,
        success: bool,
        /// On success: the last index verified to match the primary's log.
        match_index: u64,
        /// The commit index the secondary now knows.
        commit: u64,
        /// The secondary's last log index (where to resume after a rejection).
        last_index: u64,
    },
}

impl Message {
    /// An `Append` without entries: a pure commit notification (or heartbeat/probe).
    pub fn is_empty_append(&self) -> bool {
        matches!(self, Message::Append { entries, .. } if entries.is_empty())
    }
}

/// How the primary tells secondaries about the commit index when no write carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Only on the next append (raft-rs/TiKV default, Kafka after KAFKA-9952).
    Piggyback,
    /// An empty append to every secondary every `every` ticks (etcd, hashicorp, braft).
    Periodic { every: u64 },
    /// An empty append on every commit advance (etcd `bcastAppend`, openraft).
    Eager,
    /// The mechanism: one empty message once every secondary acknowledged the last entry
    /// and nothing is in flight.
    Idle,
    /// [`Policy::Idle`] after `delay` ticks, cancelled by a new write (Ceph `pct_update_delay`).
    IdleDelayed { delay: u64 },
}

impl Policy {
    /// Short name used on the command line and in CSVs.
    pub fn name(&self) -> &'static str {
        match self {
            Policy::Piggyback => "piggyback",
            Policy::Periodic { .. } => "periodic",
            Policy::Eager => "eager",
            Policy::Idle => "idle",
            Policy::IdleDelayed { .. } => "idle_delayed",
        }
    }
}

/// What a node is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    pub id: NodeId,
    /// Every member, this node included.
    pub members: Vec<NodeId>,
    pub policy: Policy,
    /// Ticks without an answer after which unacknowledged entries or commit notifications
    /// are sent again (only matters when messages are lost).
    pub retransmit_ticks: u64,
    /// Most entries in one append.
    pub max_batch_entries: usize,
}

impl Config {
    pub fn new(id: NodeId, members: Vec<NodeId>, policy: Policy) -> Config {
        Config {
            id,
            members,
            policy,
            retransmit_ticks: 2000,
            max_batch_entries: 256,
        }
    }
}

/// Protocol errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("node {0} is not the primary")]
    NotPrimary(NodeId),
    #[error("node {id} is not a member of {members:?}")]
    NotMember { id: NodeId, members: Vec<NodeId> },
    #[error("recovered log is not contiguous at index {0}")]
    Gap(u64),
}

/// What the driver must do; see the module docs.
#[derive(Debug, Default)]
pub struct Ready {
    /// Before persisting, drop the durable entries with index ≥ this.
    pub truncate_from: Option<u64>,
    /// Append these, then flush, then call [`Node::persisted`].
    pub persist: Vec<Entry>,
    /// Send now.
    pub messages: Vec<(NodeId, Message)>,
    /// Send only after `persist` is durable.
    pub persisted_messages: Vec<(NodeId, Message)>,
    /// Committed, durable entries to apply, in order.
    pub apply: Vec<Entry>,
    /// Primary: the commit index advanced to this; client writes up to it may be answered.
    pub committed: Option<u64>,
}

impl Ready {
    pub fn is_empty(&self) -> bool {
        self.truncate_from.is_none()
            && self.persist.is_empty()
            && self.messages.is_empty()
            && self.persisted_messages.is_empty()
            && self.apply.is_empty()
            && self.committed.is_none()
    }
}

/// Counters of what the node sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Appends carrying entries (first sends and retransmits).
    pub appends_with_entries: u64,
    /// Appends without entries: commit notifications, heartbeats, probes.
    pub empty_appends: u64,
    /// Entry retransmissions after `retransmit_ticks` without an answer.
    pub retransmits: u64,
    /// Empty appends probing where a secondary's log ends (at start and on reconnect);
    /// not counted in `empty_appends`.
    pub probes: u64,
}

#[derive(Debug, Clone)]
struct Progress {
    match_index: u64,
    next_index: u64,
    /// Largest commit index sent to this peer.
    sent_commit: u64,
    /// When an empty commit notification was last sent.
    notify_tick: u64,
    /// Largest commit the peer reported knowing.
    known_commit: u64,
    last_heard: u64,
    last_resend: u64,
}

/// A replica: the primary or a secondary.
#[derive(Debug)]
pub struct Node {
    cfg: Config,
    primary: bool,
    term: u64,
    entries: Vec<Entry>,
    durable: u64,
    handed: u64,
    truncate_from: Option<u64>,
    commit: u64,
    applied: u64,
    now: u64,
    msgs: Vec<(NodeId, Message)>,
    persisted_msgs: Vec<(NodeId, Message)>,
    // primary
    peers: BTreeMap<NodeId, Progress>,
    reported_commit: u64,
    next_heartbeat: u64,
    idle_deadline: Option<u64>,
    // secondary
    matched: u64,
    stats: Stats,
}

impl Node {
    /// A primary in `term` (larger than any term it used before) over its recovered log.
    pub fn new_primary(cfg: Config, term: u64, log: Vec<Entry>) -> Result<Node, ProtocolError> {
        let mut n = Node::new(cfg, true, term, log)?;
        // Probe every secondary at the end of our log: learns where each one is.
        let ids: Vec<NodeId> = n.peers.keys().copied().collect();
        for id in ids {
            let prev = n.last_index();
            n.send_append(id, prev, Vec::new());
        }
        if let Policy::Periodic { every } = n.cfg.policy {
            n.next_heartbeat = every;
        }
        Ok(n)
    }

    /// A secondary over its recovered log.
    pub fn new_secondary(cfg: Config, log: Vec<Entry>) -> Result<Node, ProtocolError> {
        let term = log.last().map_or(0, |e| e.term);
        Node::new(cfg, false, term, log)
    }

    fn new(cfg: Config, primary: bool, term: u64, log: Vec<Entry>) -> Result<Node, ProtocolError> {
        if !cfg.members.contains(&cfg.id) {
            return Err(ProtocolError::NotMember {
                id: cfg.id,
                members: cfg.members.clone(),
            });
        }
        for (i, e) in log.iter().enumerate() {
            if e.index != i as u64 + 1 {
                return Err(ProtocolError::Gap(i as u64 + 1));
            }
        }
        let last = log.len() as u64;
        let peers = if primary {
            cfg.members
                .iter()
                .filter(|&&m| m != cfg.id)
                .map(|&m| {
                    (
                        m,
                        Progress {
                            match_index: 0,
                            next_index: last + 1,
                            sent_commit: 0,
                            notify_tick: 0,
                            known_commit: 0,
                            last_heard: 0,
                            last_resend: 0,
                        },
                    )
                })
                .collect()
        } else {
            BTreeMap::new()
        };
        Ok(Node {
            cfg,
            primary,
            term,
            entries: log,
            durable: last,
            handed: last,
            truncate_from: None,
            commit: 0,
            applied: 0,
            now: 0,
            msgs: Vec::new(),
            persisted_msgs: Vec::new(),
            peers,
            reported_commit: 0,
            next_heartbeat: 0,
            idle_deadline: None,
            matched: 0,
            stats: Stats::default(),
        })
    }

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }
    pub fn is_primary(&self) -> bool {
        self.primary
    }
    pub fn term(&self) -> u64 {
        self.term
    }
    pub fn last_index(&self) -> u64 {
        self.entries.len() as u64
    }
    pub fn durable_index(&self) -> u64 {
        self.durable
    }
    pub fn commit(&self) -> u64 {
        self.commit
    }
    /// Last index handed out for applying.
    pub fn applied(&self) -> u64 {
        self.applied
    }
    pub fn stats(&self) -> Stats {
        self.stats
    }
    pub fn policy(&self) -> Policy {
        self.cfg.policy
    }
    /// The entry at `index`, if the log has it.
    pub fn entry(&self, index: u64) -> Option<&Entry> {
        if index == 0 {
            return None;
        }
        self.entries.get(index as usize - 1)
    }
    /// Primary: the match index of a secondary.
    pub fn match_index(&self, peer: NodeId) -> Option<u64> {
        self.peers.get(&peer).map(|p| p.match_index)
    }

    fn term_at(&self, index: u64) -> u64 {
        self.entry(index).map_or(0, |e| e.term)
    }

    /// Primary: appends a client write to the log; returns its index.
    pub fn propose(&mut self, payload: Vec<u8>) -> Result<u64, ProtocolError> {
        if !self.primary {
            return Err(ProtocolError::NotPrimary(self.cfg.id));
        }
        let index = self.last_index() + 1;
        self.entries.push(Entry {
            term: self.term,
            index,
            payload,
        });
        // A new write cancels a pending delayed idle notification.
        self.idle_deadline = None;
        Ok(index)
    }

    /// Primary: the connection to `peer` was (re)established; whatever was in flight on the
    /// old one is lost. Probes the end of the peer's log.
    pub fn peer_reconnected(&mut self, peer: NodeId) {
        if !self.primary || !self.peers.contains_key(&peer) {
            return;
        }
        let last = self.last_index();
        self.peers.get_mut(&peer).expect("peer").next_index = last + 1;
        self.send_append(peer, last, Vec::new());
    }

    /// One unit of logical time.
    pub fn tick(&mut self) {
        self.now += 1;
        if !self.primary {
            return;
        }
        let now = self.now;
        if let Policy::Periodic { every } = self.cfg.policy {
            if now >= self.next_heartbeat {
                self.next_heartbeat = now + every.max(1);
                let ids: Vec<NodeId> = self.peers.keys().copied().collect();
                for id in ids {
                    self.send_notification(id, true);
                }
            }
        }
        if let Some(d) = self.idle_deadline {
            if now >= d {
                self.idle_deadline = None;
                if self.is_idle() {
                    self.notify_idle();
                }
            }
        }
        let rt = self.cfg.retransmit_ticks.max(1);
        let last = self.last_index();
        let commit = self.commit;
        let piggyback = self.cfg.policy == Policy::Piggyback;
        let mut notify = Vec::new();
        for (&id, p) in self.peers.iter_mut() {
            let quiet = now.saturating_sub(p.last_heard.max(p.last_resend)) >= rt;
            if p.match_index < last && quiet {
                // Unacknowledged entries: send again from the last known match.
                p.next_index = p.match_index + 1;
                p.last_resend = now;
                self.stats.retransmits += 1;
            } else if !piggyback
                && p.match_index == last
                && p.known_commit < commit.min(p.match_index)
                && p.sent_commit >= commit.min(p.match_index)
                && now.saturating_sub(p.notify_tick.max(p.last_heard)) >= rt
            {
                // A commit notification that was not acknowledged: send it again.
                notify.push(id);
            }
        }
        for id in notify {
            self.send_notification(id, false);
        }
    }

    /// Ticks until the next timer of this node fires (`None`: no timer armed). The
    /// driver may sleep that long when no input arrives.
    pub fn ticks_to_next_timer(&self) -> Option<u64> {
        if !self.primary {
            return None;
        }
        let mut best: Option<u64> = None;
        let mut consider = |at: u64| {
            let d = at.saturating_sub(self.now).max(1);
            best = Some(best.map_or(d, |b: u64| b.min(d)));
        };
        if let Policy::Periodic { .. } = self.cfg.policy {
            consider(self.next_heartbeat);
        }
        if let Some(d) = self.idle_deadline {
            consider(d);
        }
        let rt = self.cfg.retransmit_ticks.max(1);
        let last = self.last_index();
        for p in self.peers.values() {
            if p.match_index < last {
                consider(p.last_heard.max(p.last_resend) + rt);
            } else if self.cfg.policy != Policy::Piggyback
                && p.known_commit < self.commit.min(p.match_index)
                && p.sent_commit >= self.commit.min(p.match_index)
            {
                // Only a notification that was sent can be due for a resend (as in `tick`);
                // otherwise this timer would stay due and the driver would spin.
                consider(p.notify_tick.max(p.last_heard) + rt);
            }
        }
        best
    }

    /// A message from a peer.
    pub fn step(&mut self, msg: Message) {
        match msg {
            Message::Append {
                term,
                from,
                prev_index,
                prev_term,
                commit,
                entries,
            } => self.on_append(term, from, prev_index, prev_term, commit, entries),
            Message::AppendResp {
                term,
                from,
                success,
                match_index,
                commit,
                last_index,
            } => self.on_append_resp(term, from, success, match_index, commit, last_index),
        }
    }

    fn on_append(
        &mut self,
        term: u64,
        from: NodeId,
        prev_index: u64,
        prev_term: u64,
        commit: u64,
        entries: Vec<Entry>,
    ) {
        if self.primary || !self.cfg.members.contains(&from) {
            return;
        }
        if term < self.term {
            // From a primary incarnation that has since restarted.
            self.respond(from, false, 0);
            return;
        }
        if term > self.term {
            self.term = term;
            self.matched = 0;
        }
        if prev_index > self.last_index() || self.term_at(prev_index) != prev_term {
            self.respond(from, false, 0);
            return;
        }
        // Entries must follow prev_index consecutively (the decoder checks this for frames
        // from the wire; a bad in-process message is dropped).
        if entries
            .iter()
            .enumerate()
            .any(|(i, e)| e.index != prev_index + 1 + i as u64)
        {
            return;
        }
        let n = entries.len() as u64;
        for e in entries {
            if e.index <= self.last_index() {
                if self.term_at(e.index) == e.term {
                    continue; // a duplicate
                }
                self.truncate(e.index);
            }
            self.entries.push(e);
        }
        let verified = prev_index + n;
        self.matched = self.matched.max(verified);
        let learned = commit.min(self.matched);
        if learned > self.commit {
            self.commit = learned;
        }
        self.respond(from, true, verified);
    }

    fn truncate(&mut self, from: u64) {
        debug_assert!(from > self.commit, "a committed entry is never truncated");
        self.entries.truncate(from as usize - 1);
        self.durable = self.durable.min(from - 1);
        self.handed = self.handed.min(from - 1);
        self.truncate_from = Some(self.truncate_from.map_or(from, |t| t.min(from)));
    }

    fn respond(&mut self, to: NodeId, success: bool, match_index: u64) {
        let m = Message::AppendResp {
            term: self.term,
            from: self.cfg.id,
            success,
            match_index,
            commit: self.commit,
            last_index: self.last_index(),
        };
        self.persisted_msgs.push((to, m));
    }

    fn on_append_resp(
        &mut self,
        term: u64,
        from: NodeId,
        success: bool,
        match_index: u64,
        commit: u64,
        last_index: u64,
    ) {
        if !self.primary || term > self.term {
            return;
        }
        let now = self.now;
        let my_last = self.last_index();
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        p.last_heard = now;
        if term < self.term {
            return;
        }
        p.known_commit = p.known_commit.max(commit);
        if success {
            let m = match_index.min(my_last);
            if m > p.match_index {
                p.match_index = m;
            }
            p.next_index = p.next_index.max(p.match_index + 1);
        } else {
            // Resume after what the secondary has (or one before the mismatch).
            let resume = last_index.min(p.next_index.saturating_sub(2)) + 1;
            p.next_index = resume.max(p.match_index + 1);
        }
        self.advance_commit();
    }

    /// The driver made every entry up to `index` durable (append + flush completed).
    pub fn persisted(&mut self, index: u64) {
        let index = index.min(self.last_index());
        if index > self.durable {
            self.durable = index;
        }
        if self.primary {
            self.advance_commit();
        }
    }

    fn advance_commit(&mut self) {
        let mut m: Vec<u64> = self.peers.values().map(|p| p.match_index).collect();
        m.push(self.durable);
        m.sort_unstable_by(|a, b| b.cmp(a));
        let quorum = self.cfg.members.len() / 2 + 1;
        let c = m[quorum - 1].min(self.durable);
        if c > self.commit {
            self.commit = c;
            if self.cfg.policy == Policy::Eager {
                // etcd's bcastAppend at the commit advance: a peer with entries still to
                // send gets them (carrying the commit) from `ready`; every other peer gets
                // an empty append now, before any later write arrives.
                let last = self.last_index();
                let ids: Vec<NodeId> = self
                    .peers
                    .iter()
                    .filter(|(_, p)| p.next_index > last && p.sent_commit < c)
                    .map(|(&id, _)| id)
                    .collect();
                for id in ids {
                    self.send_notification(id, false);
                }
            }
        }
    }

    /// Every secondary acknowledged the last entry and nothing is in flight.
    fn is_idle(&self) -> bool {
        let last = self.last_index();
        last > 0
            && self.commit == last
            && self.durable == last
            && self.peers.values().all(|p| p.match_index == last)
            && self.peers.values().any(|p| p.sent_commit < self.commit)
    }

    fn notify_idle(&mut self) {
        let ids: Vec<NodeId> = self.peers.keys().copied().collect();
        for id in ids {
            if self.peers[&id].sent_commit < self.commit {
                self.send_notification(id, false);
            }
        }
    }

    /// An empty append carrying the commit index, anchored at the peer's match index (so it
    /// never causes a rejection while entries are in flight). `cap` limits the commit to the
    /// peer's match index (etcd's heartbeats).
    fn send_notification(&mut self, to: NodeId, cap: bool) {
        let p = &self.peers[&to];
        let prev = p.match_index;
        let commit = if cap {
            self.commit.min(prev)
        } else {
            self.commit
        };
        let m = Message::Append {
            term: self.term,
            from: self.cfg.id,
            prev_index: prev,
            prev_term: self.term_at(prev),
            commit,
            entries: Vec::new(),
        };
        let now = self.now;
        let p = self.peers.get_mut(&to).expect("peer exists");
        p.sent_commit = p.sent_commit.max(commit);
        p.notify_tick = now;
        self.stats.empty_appends += 1;
        self.msgs.push((to, m));
    }

    fn send_append(&mut self, to: NodeId, prev: u64, entries: Vec<Entry>) {
        let m = Message::Append {
            term: self.term,
            from: self.cfg.id,
            prev_index: prev,
            prev_term: self.term_at(prev),
            commit: self.commit,
            entries,
        };
        let p = self.peers.get_mut(&to).expect("peer exists");
        p.sent_commit = p.sent_commit.max(self.commit);
        if m.is_empty_append() {
            self.stats.probes += 1;
        } else {
            self.stats.appends_with_entries += 1;
        }
        self.msgs.push((to, m));
    }

    /// Is there anything for [`Node::ready`] to hand out?
    pub fn has_ready(&self) -> bool {
        !self.msgs.is_empty()
            || !self.persisted_msgs.is_empty()
            || self.truncate_from.is_some()
            || self.handed < self.last_index()
            || self.applied < self.commit.min(self.durable)
            || (self.primary && self.commit > self.reported_commit)
            || (self.primary
                && self
                    .peers
                    .values()
                    .any(|p| p.next_index <= self.last_index()))
            || self.wants_notification()
    }

    fn wants_notification(&self) -> bool {
        if !self.primary {
            return false;
        }
        match self.cfg.policy {
            Policy::Eager => self.peers.values().any(|p| p.sent_commit < self.commit),
            Policy::Idle => self.is_idle(),
            Policy::IdleDelayed { .. } => self.idle_deadline.is_none() && self.is_idle(),
            Policy::Piggyback | Policy::Periodic { .. } => false,
        }
    }

    /// Hands out what the driver must do now (see [`Ready`]).
    pub fn ready(&mut self) -> Ready {
        if self.primary {
            // New entries to every secondary that has not been sent them (pipelined).
            let last = self.last_index();
            let ids: Vec<NodeId> = self.peers.keys().copied().collect();
            for id in ids {
                while self.peers[&id].next_index <= last {
                    let from = self.peers[&id].next_index;
                    let to = last.min(from + self.cfg.max_batch_entries.max(1) as u64 - 1);
                    let batch = self.entries[from as usize - 1..to as usize].to_vec();
                    self.peers.get_mut(&id).expect("peer").next_index = to + 1;
                    self.send_append(id, from - 1, batch);
                }
            }
            match self.cfg.policy {
                Policy::Eager => {
                    let ids: Vec<NodeId> = self
                        .peers
                        .iter()
                        .filter(|(_, p)| p.sent_commit < self.commit)
                        .map(|(&id, _)| id)
                        .collect();
                    for id in ids {
                        self.send_notification(id, false);
                    }
                }
                Policy::Idle => {
                    if self.is_idle() {
                        self.notify_idle();
                    }
                }
                Policy::IdleDelayed { delay } => {
                    if self.idle_deadline.is_none() && self.is_idle() {
                        if delay == 0 {
                            self.notify_idle();
                        } else {
                            self.idle_deadline = Some(self.now + delay);
                        }
                    }
                }
                Policy::Piggyback | Policy::Periodic { .. } => {}
            }
        }
        let mut rd = Ready {
            truncate_from: self.truncate_from.take(),
            messages: std::mem::take(&mut self.msgs),
            persisted_messages: std::mem::take(&mut self.persisted_msgs),
            ..Ready::default()
        };
        let last = self.last_index();
        if self.handed < last {
            rd.persist = self.entries[self.handed as usize..].to_vec();
            self.handed = last;
        }
        let upto = self.commit.min(self.durable);
        if self.applied < upto {
            rd.apply = self.entries[self.applied as usize..upto as usize].to_vec();
            self.applied = upto;
        }
        if self.primary && self.commit > self.reported_commit {
            rd.committed = Some(self.commit);
            self.reported_commit = self.commit;
        }
        rd
    }
}
