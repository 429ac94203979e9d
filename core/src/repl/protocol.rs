//! The replication protocol without I/O, in the tick/step/ready style of tikv/raft-rs.
//!
//! A [`Node`] is fed inputs — [`Node::propose`] (primary), [`Node::step`] (a message from
//! a peer), [`Node::advance_to`] / [`Node::tick`] (logical time), and on the primary
//! [`Node::peer_reconnected`] / [`Node::peer_disconnected`] (what the driver knows about
//! its connections) — and hands out what the driver must do in a [`Ready`]: entries to
//! persist (after an optional truncation), messages to send at once, messages to send only
//! after the persist is durable, committed entries to apply and, on the primary, how far
//! client writes may be answered. The driver persists the Ready's entries (append, then
//! flush) and then calls [`Node::persisted`] (or, when the log region is full,
//! [`Node::persist_failed`]). Nothing here reads a clock, a socket or a device, so tests
//! drive it deterministically.
//!
//! Rules kept here:
//! * an entry is committed once a majority of the members (the primary always among them)
//!   has it durable; the primary counts itself only after its own flush, so a restarted
//!   primary, whose log is recovered from its device, still holds every committed entry;
//! * a secondary accepts appends only from the configured primary, never truncates an
//!   entry it knows is committed, learns the commit index from messages, caps it at the
//!   index it verified against the primary's log, and applies only up to its own durable
//!   index, in order;
//! * a secondary that adopts a higher term hands it out once in [`Ready::persist_term`],
//!   to be made durable before that Ready's acknowledgements go out, and restarts in the
//!   term it persisted ([`Node::new_secondary`]);
//! * empty messages (no entries) carry the commit index and cause no persist;
//! * per secondary the primary is either *probing* (at most one append in flight, after a
//!   (re)connection, a rejection or a retransmission timeout) or *replicating* (appends
//!   pipelined, at most `max_inflight_entries` beyond the secondary's match index), and
//!   sends nothing to a secondary the driver reported disconnected.

use std::collections::BTreeMap;
use std::sync::Arc;

/// A replica's id.
pub type NodeId = u32;

/// Default of [`Config::max_batch_entries`].
pub const DEFAULT_MAX_BATCH_ENTRIES: usize = 256;
/// Default of [`Config::max_batch_bytes`] (1 MiB, well under the wire's 16 MiB frames).
pub const DEFAULT_MAX_BATCH_BYTES: usize = 1 << 20;

/// One log entry. The payload is shared: the log, the messages to every secondary, the
/// persist and apply lists all hold the same bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub term: u64,
    pub index: u64,
    pub payload: Arc<[u8]>,
}

/// What a secondary did with an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The entries are durable and `match_index` is verified against the primary's log.
    Ok,
    /// `prev_index`/`prev_term` did not match the secondary's log, or the append came from
    /// an older term: resume after `last_index`.
    Mismatch,
    /// The secondary's log region has no room for the entries (`need` bytes, `left`
    /// left); nothing past `match_index` was kept.
    LogFull { need: u64, left: u64 },
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
    /// Secondary → primary, sent after the appended entries are durable (or could not be).
    AppendResp {
        term: u64,
        from: NodeId,
        outcome: AppendOutcome,
        /// The last index verified to match the primary's log and durable (0 when
        /// `outcome` is [`AppendOutcome::Mismatch`]).
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
    /// The sender.
    pub fn from(&self) -> NodeId {
        match self {
            Message::Append { from, .. } | Message::AppendResp { from, .. } => *from,
        }
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
    /// The patent's mechanism as written: per secondary, once it has acknowledged the
    /// primary's last entry and no write is pending or in flight (the commit index is the
    /// last entry), one empty message carrying the commit index.
    IdleAck,
    /// A variant: once writes stop (the commit caught up with the last entry), one empty
    /// message at the commit to each live secondary that was sent every entry, without
    /// waiting for its acknowledgement.
    IdleCommit,
    /// [`Policy::IdleCommit`] after `delay` ticks, cancelled by a new write (Ceph
    /// `pct_update_delay`); `delay` 0 is [`Policy::IdleCommit`].
    IdleDelayed { delay: u64 },
}

impl Policy {
    /// Short name used on the command line and in CSVs.
    pub fn name(&self) -> &'static str {
        match self {
            Policy::Piggyback => "piggyback",
            Policy::Periodic { .. } => "periodic",
            Policy::Eager => "eager",
            Policy::IdleAck => "idle_ack",
            Policy::IdleCommit => "idle_commit",
            Policy::IdleDelayed { .. } => "idle_delayed",
        }
    }
}

/// What a node is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    pub id: NodeId,
    /// The primary (appends from anyone else are refused).
    pub primary: NodeId,
    /// Every member, this node included.
    pub members: Vec<NodeId>,
    pub policy: Policy,
    /// Ticks without an answer after which a secondary that owes one is probed again, and
    /// a commit notification that was not acknowledged is sent again (only matters when
    /// messages are lost or a secondary stalls). A secondary that owes an answer for this
    /// long does not count as live for the idle policies.
    pub retransmit_ticks: u64,
    /// Most entries in one append.
    pub max_batch_entries: usize,
    /// Most payload bytes in one append (an append holds at least one entry); a proposal
    /// larger than this is refused, so every entry fits a frame.
    pub max_batch_bytes: usize,
    /// Most entries sent to a secondary beyond its match index.
    pub max_inflight_entries: u64,
}

impl Config {
    pub fn new(id: NodeId, primary: NodeId, members: Vec<NodeId>, policy: Policy) -> Config {
        Config {
            id,
            primary,
            members,
            policy,
            retransmit_ticks: 2000,
            max_batch_entries: DEFAULT_MAX_BATCH_ENTRIES,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_inflight_entries: 4096,
        }
    }
}

/// Protocol errors. Those returned by [`Node::step`] mean the message was refused (the
/// node is unchanged) or report a problem of a peer the operator must see; the node stays
/// consistent and keeps running either way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("node {0} is not the primary")]
    NotPrimary(NodeId),
    #[error("node {id} is not a member of {members:?}")]
    NotMember { id: NodeId, members: Vec<NodeId> },
    #[error("node {id} started as {role}, but the configured primary is {primary}")]
    WrongRole {
        id: NodeId,
        role: &'static str,
        primary: NodeId,
    },
    #[error("recovered log is not contiguous at index {0}")]
    Gap(u64),
    #[error("a payload of {len} bytes exceeds the largest append payload of {max} bytes")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("append from replica {from} refused: the primary is {primary}")]
    NotFromPrimary { from: NodeId, primary: NodeId },
    #[error(
        "append refused: it would truncate entry {index}, which is committed (commit {commit})"
    )]
    TruncateCommitted { index: u64, commit: u64 },
    #[error("append refused: its entries do not follow prev_index {prev_index}")]
    NotConsecutive { prev_index: u64 },
    #[error(
        "secondary {peer} is in term {term} > ours ({ours}): another primary ran after this \
         one, or this primary's log was replaced; it refuses our appends"
    )]
    PeerTermAhead { peer: NodeId, term: u64, ours: u64 },
    #[error(
        "secondary {peer}: log region full ({need} bytes needed, {left} left); it keeps \
         serving, the primary retries every retransmit period and commits with the others"
    )]
    PeerLogFull { peer: NodeId, need: u64, left: u64 },
}

/// What the driver must do; see the module docs.
#[derive(Debug, Default)]
pub struct Ready {
    /// Secondary: it adopted this higher term; make it durable before sending any of
    /// `persisted_messages` (handed out once per adoption).
    pub persist_term: Option<u64>,
    /// Before persisting, drop the durable entries with index ≥ this.
    pub truncate_from: Option<u64>,
    /// Append these, then flush, then call [`Node::persisted`].
    pub persist: Vec<Entry>,
    /// Send now.
    pub messages: Vec<(NodeId, Message)>,
    /// Send only after `persist` is durable (drop them when it failed).
    pub persisted_messages: Vec<(NodeId, Message)>,
    /// Committed, durable entries to apply, in order.
    pub apply: Vec<Entry>,
    /// Primary: the commit index advanced to this; client writes up to it may be answered.
    pub committed: Option<u64>,
}

/// Counters of what the node sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Appends carrying entries.
    pub appends_with_entries: u64,
    /// Appends without entries: commit notifications and heartbeats.
    pub empty_appends: u64,
    /// Retransmission timeouts: a secondary owed an answer for `retransmit_ticks` and
    /// was probed again.
    pub retransmits: u64,
    /// Empty appends probing where a secondary's log ends (at start, on reconnect, after a
    /// retransmission timeout); not counted in `empty_appends`.
    pub probes: u64,
    /// Secondary: answers to appends without entries (commit notifications, heartbeats and
    /// probes alike: the answer does not know why the append was sent).
    pub empty_responses: u64,
}

/// How the primary sends to a secondary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// One append at a time; `paused` while it is unanswered.
    Probe { paused: bool },
    /// Appends pipelined up to `max_inflight_entries`.
    Replicate,
}

#[derive(Debug, Clone)]
struct Progress {
    match_index: u64,
    next_index: u64,
    flow: Flow,
    /// The driver has a connection to this peer.
    connected: bool,
    /// Largest commit index sent to this peer.
    sent_commit: u64,
    /// When an empty commit notification was last sent.
    notify_tick: u64,
    /// Largest commit the peer reported knowing.
    known_commit: u64,
    last_heard: u64,
    /// When an append expecting an answer (entries or probe) was last sent.
    last_sent: u64,
    /// Since when the peer owes an answer (`None`: it answered everything sent).
    owes_since: Option<u64>,
    /// The peer's last answer was "log full".
    full: bool,
    /// A term above ours the peer reported (reported once per term).
    term_ahead: Option<u64>,
}

/// When a secondary's timer fires and what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerTimer {
    /// It owes an answer: probe it again.
    Retransmit,
    /// A commit notification it did not acknowledge: send it again.
    Renotify,
}

/// What the notification policy wants done now.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    Notify(Vec<NodeId>),
    Arm(u64),
}

/// A replica: the primary or a secondary.
#[derive(Debug)]
pub struct Node {
    cfg: Config,
    primary: bool,
    term: u64,
    /// A term adopted but not handed out in [`Ready::persist_term`] yet.
    term_to_persist: Option<u64>,
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
        if cfg.id != cfg.primary {
            return Err(ProtocolError::WrongRole {
                id: cfg.id,
                role: "the primary",
                primary: cfg.primary,
            });
        }
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

    /// A secondary over its recovered log, in the term it persisted last (or its last
    /// entry's, when higher).
    pub fn new_secondary(cfg: Config, term: u64, log: Vec<Entry>) -> Result<Node, ProtocolError> {
        if cfg.id == cfg.primary {
            return Err(ProtocolError::WrongRole {
                id: cfg.id,
                role: "a secondary",
                primary: cfg.primary,
            });
        }
        let term = term.max(log.last().map_or(0, |e| e.term));
        Node::new(cfg, false, term, log)
    }

    fn new(cfg: Config, primary: bool, term: u64, log: Vec<Entry>) -> Result<Node, ProtocolError> {
        for id in [cfg.id, cfg.primary] {
            if !cfg.members.contains(&id) {
                return Err(ProtocolError::NotMember {
                    id,
                    members: cfg.members.clone(),
                });
            }
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
                            flow: Flow::Probe { paused: false },
                            connected: true,
                            sent_commit: 0,
                            notify_tick: 0,
                            known_commit: 0,
                            last_heard: 0,
                            last_sent: 0,
                            owes_since: None,
                            full: false,
                            term_ahead: None,
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
            term_to_persist: None,
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
    /// The entry at `index`, if the log has it.
    pub fn entry(&self, index: u64) -> Option<&Entry> {
        if index == 0 {
            return None;
        }
        self.entries.get(index as usize - 1)
    }

    fn term_at(&self, index: u64) -> u64 {
        self.entry(index).map_or(0, |e| e.term)
    }

    /// Primary: appends a client write to the log; returns its index.
    pub fn propose(&mut self, payload: impl Into<Arc<[u8]>>) -> Result<u64, ProtocolError> {
        if !self.primary {
            return Err(ProtocolError::NotPrimary(self.cfg.id));
        }
        let payload = payload.into();
        if payload.len() > self.cfg.max_batch_bytes {
            return Err(ProtocolError::PayloadTooLarge {
                len: payload.len(),
                max: self.cfg.max_batch_bytes,
            });
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
        if !self.primary {
            return;
        }
        let last = self.last_index();
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.connected = true;
        p.next_index = last + 1;
        p.flow = Flow::Probe { paused: false };
        // Notifications sent on the old connection may be lost.
        p.sent_commit = p.known_commit;
        p.owes_since = None;
        self.send_append(peer, last, Vec::new());
    }

    /// Primary: the connection to `peer` is gone; nothing is sent to it (and it does not
    /// count for the idle policies) until [`Node::peer_reconnected`].
    pub fn peer_disconnected(&mut self, peer: NodeId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.connected = false;
            p.owes_since = None;
            self.msgs.retain(|(to, _)| *to != peer);
        }
    }

    /// One unit of logical time.
    pub fn tick(&mut self) {
        self.advance_to(self.now + 1);
    }

    /// Logical time is now `now` (ticks since start); runs every timer that is due once,
    /// however many ticks passed.
    pub fn advance_to(&mut self, now: u64) {
        if now <= self.now {
            return;
        }
        self.now = now;
        if !self.primary {
            return;
        }
        if let Policy::Periodic { every } = self.cfg.policy {
            if now >= self.next_heartbeat {
                self.next_heartbeat = now + every.max(1);
                let ids: Vec<NodeId> = self.connected_peers().collect();
                for id in ids {
                    self.send_notification(id, true);
                }
            }
        }
        if let Some(d) = self.idle_deadline {
            if now >= d {
                self.idle_deadline = None;
                for id in self.idle_targets() {
                    self.send_notification(id, false);
                }
            }
        }
        let due: Vec<(NodeId, PeerTimer)> = self
            .peers
            .keys()
            .filter_map(|&id| match self.peer_deadline(id) {
                Some((at, t)) if at <= now => Some((id, t)),
                _ => None,
            })
            .collect();
        for (id, t) in due {
            match t {
                PeerTimer::Retransmit => {
                    // Probe from the last known match instead of resending the window.
                    let p = self.peers.get_mut(&id).expect("peer");
                    p.next_index = p.match_index + 1;
                    p.flow = Flow::Probe { paused: false };
                    let prev = p.match_index;
                    self.stats.retransmits += 1;
                    self.send_append(id, prev, Vec::new());
                }
                PeerTimer::Renotify => self.send_notification(id, false),
            }
        }
    }

    /// The next timer of secondary `id` (tick and kind), if one is armed. The one place
    /// that says when a peer's timer fires: [`Node::advance_to`] runs what is due,
    /// [`Node::ticks_to_next_timer`] sleeps until the earliest.
    fn peer_deadline(&self, id: NodeId) -> Option<(u64, PeerTimer)> {
        let p = &self.peers[&id];
        if !p.connected {
            return None;
        }
        let rt = self.cfg.retransmit_ticks.max(1);
        if p.match_index < self.last_index() {
            // A secondary out of room is retried one retransmission period after it last
            // answered; any other is probed again once it has owed an answer that long
            // since the last append to it (a probe restarts the period). One
            // that owes nothing is about to be sent the entries: a write after a long idle
            // period must not look like a lost answer.
            if p.full {
                return Some((p.last_heard.max(p.last_sent) + rt, PeerTimer::Retransmit));
            }
            if let Some(since) = p.owes_since {
                return Some((since.max(p.last_sent) + rt, PeerTimer::Retransmit));
            }
            return None;
        }
        let want = self.commit.min(p.match_index);
        // Only a notification that was sent can be due for a resend; otherwise this timer
        // would stay due and the driver would spin.
        if self.cfg.policy != Policy::Piggyback && p.known_commit < want && p.sent_commit >= want {
            return Some((p.notify_tick.max(p.last_heard) + rt, PeerTimer::Renotify));
        }
        None
    }

    /// Ticks until the next timer of this node fires (`None`: no timer armed). The
    /// driver may sleep that long when no input arrives.
    pub fn ticks_to_next_timer(&self) -> Option<u64> {
        if !self.primary {
            return None;
        }
        let mut at: Vec<u64> = self
            .peers
            .keys()
            .filter_map(|&id| self.peer_deadline(id).map(|(t, _)| t))
            .collect();
        if let Policy::Periodic { .. } = self.cfg.policy {
            at.push(self.next_heartbeat);
        }
        at.extend(self.idle_deadline);
        at.into_iter()
            .map(|t| t.saturating_sub(self.now).max(1))
            .min()
    }

    /// A message from a peer. See [`ProtocolError`] for what an error means.
    pub fn step(&mut self, msg: Message) -> Result<(), ProtocolError> {
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
                outcome,
                match_index,
                commit,
                last_index,
            } => self.on_append_resp(term, from, outcome, match_index, commit, last_index),
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
    ) -> Result<(), ProtocolError> {
        if self.primary || from != self.cfg.primary {
            return Err(ProtocolError::NotFromPrimary {
                from,
                primary: self.cfg.primary,
            });
        }
        if term < self.term {
            // From a primary incarnation that has since restarted.
            self.respond(from, AppendOutcome::Mismatch, 0);
            return Ok(());
        }
        // Entries must follow prev_index consecutively (the decoder checks this for frames
        // from the wire).
        if entries
            .iter()
            .enumerate()
            .any(|(i, e)| Some(e.index) != prev_index.checked_add(1 + i as u64))
        {
            return Err(ProtocolError::NotConsecutive { prev_index });
        }
        if prev_index > self.last_index() || self.term_at(prev_index) != prev_term {
            self.adopt_term(term);
            self.respond(from, AppendOutcome::Mismatch, 0);
            return Ok(());
        }
        // The first entry that is not already in the log (a duplicate has the same term).
        let skip = entries
            .iter()
            .take_while(|e| e.index <= self.last_index() && self.term_at(e.index) == e.term)
            .count();
        if let Some(e) = entries.get(skip) {
            if e.index <= self.last_index() && e.index <= self.commit {
                return Err(ProtocolError::TruncateCommitted {
                    index: e.index,
                    commit: self.commit,
                });
            }
        }
        self.adopt_term(term);
        if entries.is_empty() {
            self.stats.empty_responses += 1;
        }
        let n = entries.len() as u64;
        let mut new = entries.into_iter().skip(skip).peekable();
        if let Some(first) = new.peek() {
            if first.index <= self.last_index() {
                self.truncate(first.index);
            }
        }
        self.entries.extend(new);
        let verified = prev_index + n;
        self.matched = self.matched.max(verified);
        let learned = commit.min(self.matched);
        if learned > self.commit {
            self.commit = learned;
        }
        self.respond(from, AppendOutcome::Ok, verified);
        Ok(())
    }

    fn adopt_term(&mut self, term: u64) {
        if term > self.term {
            self.term = term;
            self.term_to_persist = Some(term);
            self.matched = 0;
        }
    }

    fn truncate(&mut self, from: u64) {
        self.entries.truncate(from as usize - 1);
        self.durable = self.durable.min(from - 1);
        self.handed = self.handed.min(from - 1);
        self.truncate_from = Some(self.truncate_from.map_or(from, |t| t.min(from)));
    }

    fn respond(&mut self, to: NodeId, outcome: AppendOutcome, match_index: u64) {
        let m = Message::AppendResp {
            term: self.term,
            from: self.cfg.id,
            outcome,
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
        outcome: AppendOutcome,
        match_index: u64,
        commit: u64,
        last_index: u64,
    ) -> Result<(), ProtocolError> {
        if !self.primary {
            return Ok(());
        }
        let now = self.now;
        let ours = self.term;
        let my_last = self.last_index();
        let Some(p) = self.peers.get_mut(&from) else {
            return Ok(());
        };
        if term > ours {
            if p.term_ahead == Some(term) {
                return Ok(());
            }
            p.term_ahead = Some(term);
            return Err(ProtocolError::PeerTermAhead {
                peer: from,
                term,
                ours,
            });
        }
        p.last_heard = now;
        if term < ours {
            return Ok(());
        }
        p.known_commit = p.known_commit.max(commit);
        let mut report = None;
        match outcome {
            AppendOutcome::Ok | AppendOutcome::LogFull { .. } => {
                let m = match_index.min(my_last);
                let advanced = m > p.match_index;
                if advanced {
                    p.match_index = m;
                }
                p.next_index = p.next_index.max(p.match_index + 1);
                if let AppendOutcome::LogFull { need, left } = outcome {
                    // Wait for the retransmission timeout before trying again.
                    p.next_index = p.match_index + 1;
                    p.flow = Flow::Probe { paused: true };
                    if !p.full {
                        report = Some(ProtocolError::PeerLogFull {
                            peer: from,
                            need,
                            left,
                        });
                    }
                    p.full = true;
                } else {
                    // Room again once entries are taken (a probe without entries says
                    // nothing): until then one batch per retransmission period, not a
                    // whole in-flight window it would refuse again.
                    if advanced {
                        p.full = false;
                    }
                    p.flow = if p.full {
                        Flow::Probe { paused: false }
                    } else {
                        Flow::Replicate
                    };
                }
            }
            AppendOutcome::Mismatch => {
                // Resume after what the secondary has (or one before the mismatch).
                let resume = last_index.min(p.next_index.saturating_sub(2)) + 1;
                p.next_index = resume.max(p.match_index + 1);
                // A secondary without room waits for the retransmission timeout.
                p.flow = Flow::Probe { paused: p.full };
            }
        }
        // It answered; it still owes answers for whatever else is in flight.
        p.owes_since = (p.next_index > p.match_index + 1).then_some(now);
        self.advance_commit();
        report.map_or(Ok(()), Err)
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

    /// Secondary: the driver could not persist the last Ready's entries because the log
    /// region is full (`need` bytes, `left` left); it dropped that Ready's
    /// `persisted_messages`. The entries past the durable index are forgotten and the
    /// primary is told, with what is durable and verified.
    pub fn persist_failed(&mut self, need: u64, left: u64) {
        if self.primary {
            return;
        }
        self.entries.truncate(self.durable as usize);
        self.handed = self.durable;
        self.matched = self.matched.min(self.durable);
        self.commit = self.commit.min(self.durable);
        self.persisted_msgs.clear();
        let primary = self.cfg.primary;
        let matched = self.matched;
        self.respond(primary, AppendOutcome::LogFull { need, left }, matched);
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
                // send gets the commit with them from `ready`; every other peer gets an
                // empty append now, before any later write arrives.
                let ids = self.awaiting_commit(|p| p.connected);
                for id in ids {
                    self.send_notification(id, false);
                }
            }
        }
    }

    fn connected_peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.peers
            .iter()
            .filter(|(_, p)| p.connected)
            .map(|(&id, _)| id)
    }

    /// Connected, not refusing entries for lack of room, and not owing an answer for
    /// `retransmit_ticks` or more.
    fn is_live(&self, p: &Progress) -> bool {
        let rt = self.cfg.retransmit_ticks.max(1);
        p.connected && !p.full && p.owes_since.is_none_or(|s| self.now < s + rt)
    }

    /// The secondaries an idle notification goes to now: none until the commit index has
    /// caught up with the last entry (the primary then holds it durably too, and the
    /// driver has admitted whatever writes were waiting); then every live secondary that
    /// was sent every entry and not yet the commit.
    ///
    /// The commit cannot advance again before a new write arrives, so this is the moment
    /// writes have stopped. It does not wait for the remaining secondaries to acknowledge
    /// the last entry: the message count would be the same (one per secondary per idle
    /// period, carrying a commit that covers everything sent to it), but the slowest
    /// secondary would learn the commit only after its own acknowledgement's round trip,
    /// i.e. its persist delay behind the quorum plus a one-way delay after the commit,
    /// where an eager notification sent at the commit reaches it one one-way delay after
    /// the commit and is used as soon as it persisted. A secondary caps the commit at the
    /// entries it verified and applies only what is durable, so an early notification is
    /// safe. A dead or slow secondary holds nothing back.
    fn idle_targets(&self) -> Vec<NodeId> {
        let last = self.last_index();
        if last == 0 || self.commit != last {
            return Vec::new();
        }
        self.awaiting_commit(|p| self.is_live(p))
    }

    /// [`Policy::IdleAck`]: the live secondaries that acknowledged the last entry, once no
    /// write is pending or in flight (the commit index is the last entry; the driver has
    /// admitted whatever writes were waiting), and that neither were sent nor reported
    /// knowing the current commit. Each gets one notification per idle period: the first
    /// at the commit (its acknowledgement completed the quorum), the others as their
    /// acknowledgements arrive.
    fn idle_ack_targets(&self) -> Vec<NodeId> {
        let last = self.last_index();
        if last == 0 || self.commit != last {
            return Vec::new();
        }
        self.peers
            .iter()
            .filter(|(_, p)| {
                self.is_live(p)
                    && p.match_index == last
                    && p.sent_commit < self.commit
                    && p.known_commit < self.commit
            })
            .map(|(&id, _)| id)
            .collect()
    }

    /// The secondaries matching `pick` that were sent every entry but not the current
    /// commit: the ones a commit notification ([`Policy::Eager`], [`Policy::IdleCommit`]) goes
    /// to (a secondary with entries still to send gets the commit with them).
    fn awaiting_commit(&self, pick: impl Fn(&Progress) -> bool) -> Vec<NodeId> {
        let last = self.last_index();
        self.peers
            .iter()
            .filter(|(_, p)| pick(p) && p.next_index > last && p.sent_commit < self.commit)
            .map(|(&id, _)| id)
            .collect()
    }

    /// What the notification policy wants done now: the one place [`Node::has_ready`] and
    /// [`Node::ready`] ask. (Eager notifies in `advance_commit`, periodic heartbeats and
    /// the delayed idle notification fire in [`Node::advance_to`].)
    fn due_notifications(&self) -> Option<Due> {
        if !self.primary {
            return None;
        }
        match self.cfg.policy {
            Policy::IdleAck => {
                let ids = self.idle_ack_targets();
                (!ids.is_empty()).then_some(Due::Notify(ids))
            }
            Policy::IdleCommit | Policy::IdleDelayed { delay: 0 } => {
                let ids = self.idle_targets();
                (!ids.is_empty()).then_some(Due::Notify(ids))
            }
            Policy::IdleDelayed { delay } => (self.idle_deadline.is_none()
                && !self.idle_targets().is_empty())
            .then_some(Due::Arm(self.now + delay)),
            Policy::Piggyback | Policy::Periodic { .. } | Policy::Eager => None,
        }
    }

    /// The entries to send to `id` in its next append (`(from, to)` inclusive), if any.
    fn next_batch(&self, id: NodeId) -> Option<(u64, u64)> {
        let p = &self.peers[&id];
        let last = self.last_index();
        if !p.connected || p.next_index > last {
            return None;
        }
        let limit = match p.flow {
            Flow::Probe { paused: true } => return None,
            Flow::Probe { paused: false } => last,
            Flow::Replicate => last.min(p.match_index + self.cfg.max_inflight_entries.max(1)),
        };
        let from = p.next_index;
        if from > limit {
            return None;
        }
        let mut to = from;
        let mut bytes = self.entries[from as usize - 1].payload.len();
        while to < limit && ((to - from + 1) as usize) < self.cfg.max_batch_entries.max(1) {
            let next = self.entries[to as usize].payload.len();
            if bytes + next > self.cfg.max_batch_bytes {
                break;
            }
            bytes += next;
            to += 1;
        }
        Some((from, to))
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

    /// An append expecting an answer: entries, or a probe when `entries` is empty.
    fn send_append(&mut self, to: NodeId, prev: u64, entries: Vec<Entry>) {
        let m = Message::Append {
            term: self.term,
            from: self.cfg.id,
            prev_index: prev,
            prev_term: self.term_at(prev),
            commit: self.commit,
            entries,
        };
        let now = self.now;
        let p = self.peers.get_mut(&to).expect("peer exists");
        p.sent_commit = p.sent_commit.max(self.commit);
        p.last_sent = now;
        p.owes_since.get_or_insert(now);
        if let Flow::Probe { paused } = &mut p.flow {
            *paused = true;
        }
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
            || self.term_to_persist.is_some()
            || self.truncate_from.is_some()
            || self.handed < self.last_index()
            || self.applied < self.commit.min(self.durable)
            || (self.primary && self.commit > self.reported_commit)
            || (self.primary && self.peers.keys().any(|&id| self.next_batch(id).is_some()))
            || self.due_notifications().is_some()
    }

    /// Hands out what the driver must do now (see [`Ready`]).
    pub fn ready(&mut self) -> Ready {
        if self.primary {
            // New entries to every secondary that may be sent them.
            let ids: Vec<NodeId> = self.peers.keys().copied().collect();
            for id in ids {
                while let Some((from, to)) = self.next_batch(id) {
                    let batch = self.entries[from as usize - 1..to as usize].to_vec();
                    self.peers.get_mut(&id).expect("peer").next_index = to + 1;
                    self.send_append(id, from - 1, batch);
                }
            }
            match self.due_notifications() {
                Some(Due::Notify(ids)) => {
                    for id in ids {
                        self.send_notification(id, false);
                    }
                }
                Some(Due::Arm(at)) => self.idle_deadline = Some(at),
                None => {}
            }
        }
        let mut rd = Ready {
            persist_term: self.term_to_persist.take(),
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
