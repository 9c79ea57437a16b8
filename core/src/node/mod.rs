//! [`Node`]: every rule one relay applies to a link or a message, as a pure
//! state machine.
//!
//! The shell (sockets, tasks, queues, metrics, logs) turns what happens into
//! events, each with the time it read ([`Now`]), and carries out the
//! [`Action`]s the node appends to a buffer the caller owns and clears. The
//! node never waits, reads a clock, touches a socket or draws OS randomness:
//! the same seed and the same events give the same actions, in the same
//! order, so a simulation can drive many relays in one process and replay a
//! run exactly.
//!
//! | event | what the node decides |
//! |---|---|
//! | [`link_up`](Node::link_up) | admission (version, role, shutdown, `max_links`), Welcome, replacing an older link of the key, presence |
//! | [`peer_dialed`](Node::peer_dialed) | a relay link this relay dialed: the same admission as a relay's Hello, no Welcome (relay links: [`crate::mesh`]) |
//! | [`batch`](Node::batch) | source, signatures, TTL, freshness, dedup, route, forward whole or message by message, drops and their notices |
//! | [`undelivered`](Node::undelivered) | a drop only the shell sees (a full or closed queue): counted and noticed |
//! | [`control`](Node::control) | Announce (with its limit), Discover, WatchPresence, the peer's Close, anything else |
//! | [`protocol_error`](Node::protocol_error) | bytes the shell could not decode: counted, link closed |
//! | [`finish`](Node::finish) | the end of an orderly close: last notices, then Close |
//! | [`tick`](Node::tick) | notices that fell due ([`poll_timeout`](Node::poll_timeout) says when) |
//! | [`link_down`](Node::link_down) | detach, presence, release of the link's state |
//! | [`shut_down`](Node::shut_down), [`close_all`](Node::close_all) | refuse new links; close the open ones |
//!
//! and one query, [`may_wait`](Node::may_wait): whether a sender may be
//! paused for a backlogged receiver.

use crate::dedup::{DedupVerdict, DedupWindow};
use crate::durable::{DurableConfig, DurableQueues};
use crate::freshness::{FreshnessWindow, Staleness};
use crate::mesh::{Mesh, MeshConfig, MeshConfigError, RouteOutcome};
use crate::notices::{NO_SUBJECT, Notice, NoticeAggregator};
use crate::reason::{CloseReason, DropReason};
use crate::router::{LinkId, PresenceReport, Router};
use crate::stall::StallGate;
use crate::ttl;
use relay_codec::frame::{
    CloseCode, DurableStatus, MAX_DISCOVER_ENTRIES, NoticeCode, PROTOCOL_VERSION, Role,
};
use relay_codec::id_table::IdKey;
use relay_codec::verify::verify_each;
use relay_codec::{BatchFrame, Destination, Envelope, Frame, Limits, MessageId, PublicKey, Qos};
use std::collections::{BTreeMap, BTreeSet};

mod durable;
#[cfg(test)]
mod mesh_tests;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

/// Largest batch forwarded whole, as it arrived: what a cell accepts by
/// default, so a relay configured for larger frames never hands a cell
/// more than that. A larger batch goes message by message.
pub const FORWARD_WHOLE_MAX: usize = 4 << 20;

/// The time of an event, read once by the shell and passed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// A monotonic clock in milliseconds (any origin): what measures
    /// intervals (the dedup window, notice intervals, the stall gate,
    /// [`Node::poll_timeout`]). It should not go backwards.
    pub mono_ms: u64,
    /// The wall clock, milliseconds since the Unix epoch: what message
    /// timestamps are compared with (freshness) and Welcome reports.
    pub unix_ms: u64,
}

/// Which incoming messages from cells get their ed25519 signature checked
/// (`security.verify`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verify {
    /// None: receivers verify end to end.
    Off,
    /// Each message with probability `rate` (in `(0, 1]`), drawn from the
    /// node's seeded generator, so a sender cannot tell which ones. A
    /// sampled message that fails closes its link: a cell that sends one
    /// forgery is likely to send more.
    Sampled {
        /// The fraction checked.
        rate: f64,
    },
    /// Every message; those that fail are dropped, each counted and
    /// noticed, and the link stays up.
    All,
}

/// What a [`Node`] needs of the relay's configuration (config/relay.toml
/// documents each setting and its bounds).
#[derive(Clone, Debug, PartialEq)]
pub struct NodeConfig {
    /// The relay's own key, sent in Welcome.
    pub key: PublicKey,
    /// The relay's decoding limits: `max_payload` and `max_frame` go into
    /// Welcome, `max_services` bounds an Announce
    /// (`limits.max_services_per_cell`).
    pub limits: Limits,
    /// Most links up at once, at least 1 (`limits.max_links`); a link
    /// replaced by a newer one of its key counts until it is down.
    pub max_links: usize,
    /// The timestamp window (`security.timestamp_past_ms`,
    /// `security.timestamp_future_ms`).
    pub freshness: FreshnessWindow,
    /// How long, in ms, a message id is remembered
    /// (`security.dedup_window_ms`).
    pub dedup_window_ms: u64,
    /// Most ids remembered, at least 1 (`security.dedup_capacity`).
    pub dedup_capacity: usize,
    /// The signature policy (`security.verify`, `security.sample_rate`).
    pub verify: Verify,
    /// At most one notice per (code, subject) per this many ms, per link
    /// (`link.notice_interval_ms`).
    pub notice_interval_ms: u64,
    /// The longest a sender is paused for a receiver, in ms; 0 never
    /// pauses (`link.max_stall_ms`). The node only decides whether a pause
    /// may happen ([`Node::may_wait`]); the shell times it.
    pub max_stall_ms: u64,
    /// Durable store-and-forward: time to live and retry timing
    /// (`storage.*`).
    pub durable: DurableConfig,
}

impl NodeConfig {
    /// The settings of config/relay.toml's defaults, for the relay `key`.
    pub fn new(key: PublicKey) -> Self {
        Self {
            key,
            limits: Limits::default(),
            max_links: 16_384,
            freshness: FreshnessWindow::new(300_000, 30_000),
            dedup_window_ms: 300_000,
            dedup_capacity: 1_000_000,
            verify: Verify::Off,
            notice_interval_ms: 100,
            max_stall_ms: 20,
            durable: DurableConfig::default(),
        }
    }
}

/// A [`NodeConfig`] no node can run with.
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
pub enum NodeConfigError {
    /// `dedup_capacity` is 0: every replay would pass.
    #[error("the dedup capacity is 0; it must be at least 1 (security.dedup_capacity)")]
    DedupCapacity,
    /// `max_links` is 0: no link could ever be admitted.
    #[error("max_links is 0; it must be at least 1 (limits.max_links)")]
    MaxLinks,
    /// The sample rate is not in `(0, 1]`.
    #[error("the signature sample rate is {0}; it must be in (0, 1] (security.sample_rate)")]
    SampleRate(f64),
}

/// What the shell learnt of a new link before it is admitted: its proven
/// key and its Hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// The key the peer proved in the TLS handshake.
    pub key: PublicKey,
    /// Cell or relay, from Hello.
    pub role: Role,
    /// The protocol version from Hello.
    pub version: u16,
    /// Whether Hello asked for notices about dropped messages.
    pub notices: bool,
}

/// Whether a link was admitted by [`Node::link_up`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "a refused link must be closed with its code and reason"]
pub enum Admission {
    /// Up: its Welcome is the first action.
    Admitted,
    /// Refused: the shell closes it with this code and reason (and logs
    /// it); the node keeps nothing of it.
    Refused {
        /// The close code.
        code: CloseCode,
        /// Why, for people.
        reason: String,
    },
}

/// What [`Node::link_down`] reports of a link that was up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Departed {
    /// Its key.
    pub key: PublicKey,
    /// Its role.
    pub role: Role,
    /// Why the node closed it, if it did (the first [`Action::Close`], or
    /// [`Node::finish`]); otherwise the shell knows from the transport.
    pub closed_by_node: Option<CloseReason>,
}

/// Why the shell could not queue what an action asked it to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRefusal {
    /// The receiver's lane queue was full: it reads too slowly.
    Full,
    /// The receiver's queue was closed: its link is ending.
    Closed,
}

/// Messages the shell could not queue, for [`Node::undelivered`]: from one
/// sender to one receiver, for one reason. The shell may merge a run of
/// refusals into one (count them, keep the first id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Undelivered {
    /// The sender's link.
    pub from: LinkId,
    /// The receiver's key (its link may be down by now).
    pub to: PublicKey,
    /// Why.
    pub why: QueueRefusal,
    /// The id of the first of them.
    pub first: MessageId,
    /// How many.
    pub count: u64,
}

/// What the shell must do, in the order the node appended them.
///
/// Every action that names a link names one that was up when the event
/// came in, or that the event brought up. Bounds: one event appends at most a few actions per message of
/// its batch (one per receiver for broadcast and service messages), plus
/// one per watcher for presence and one per pending notice of the link.
#[derive(Clone, Debug, PartialEq)]
pub enum Action<H> {
    /// Queue this batch on `to`, as it is: the batch as it arrived with its
    /// hop count one higher (every message's TTL one lower, its bytes
    /// untouched). Its messages are the whole batch, `batch.count` of
    /// them.
    Forward {
        /// The receiver.
        to: H,
        /// What to queue.
        batch: BatchFrame,
        /// The id of its first message, for [`Undelivered::first`].
        first: MessageId,
    },
    /// Queue one message on `to`.
    Deliver {
        /// The receiver.
        to: H,
        /// Its index in the batch.
        index: u32,
        /// Its id, for [`Undelivered::first`].
        id: MessageId,
        /// The message, with its TTL already lowered for this hop.
        env: Envelope,
    },
    /// The batch just ingested queued cell-addressed messages on `to`: if
    /// that leaves `to`'s lane backlogged, the shell may pause the sender
    /// for it, when [`Node::may_wait`] allows. Broadcast and service
    /// receivers never pause a sender. One per receiver per batch.
    MayPause {
        /// The receiver's link.
        link: LinkId,
        /// The receiver.
        to: H,
    },
    /// Send a control frame on `to`'s control stream: Welcome,
    /// DiscoverReply, Presence, Notice, or the Close of an orderly close.
    Control {
        /// The link.
        to: H,
        /// The frame.
        frame: Frame,
    },
    /// Close this link now with `code` and `reason`, and log why. At most
    /// one per link.
    Close {
        /// The link.
        link: LinkId,
        /// Its handle.
        to: H,
        /// The close code.
        code: CloseCode,
        /// Why, for people (and the Close frame).
        reason: String,
        /// What to count it as.
        why: CloseReason,
    },
    /// Append this durable message to the log (a message record: its id,
    /// lane, destination, expiry and the message's bytes as they are,
    /// TTL already lowered), then report the outcome with `token` to
    /// [`Node::durable_logged`], after the record is synced and never
    /// before.
    DurableLog {
        /// Echoed in [`Node::durable_logged`].
        token: u64,
        /// The message id.
        id: MessageId,
        /// Its destination cell.
        dest: PublicKey,
        /// Its lane (0 first).
        lane: u8,
        /// When it expires, ms since the Unix epoch.
        expires_unix_ms: u64,
        /// The message.
        env: Envelope,
    },
    /// Queue this logged durable message (log sequence `seq`) on `to`. A
    /// full or closed queue is not a drop: the node retries it.
    DurableDeliver {
        /// The receiver.
        to: H,
        /// Its log sequence number.
        seq: u64,
        /// The message.
        env: Envelope,
    },
    /// Read the logged durable message `seq` back from the log and queue
    /// it on `to`, as [`Action::DurableDeliver`]; these come in the order
    /// the receiver must get them (lane by lane, oldest first).
    DurableRead {
        /// The receiver.
        to: H,
        /// Its log sequence number.
        seq: u64,
    },
    /// The durable message `seq` leaves the log: its destination
    /// acknowledged it, or (`expired`) its time to live ran out. The shell
    /// logs an acknowledgement record, so a restart does not bring it
    /// back, and counts it.
    DurableRelease {
        /// Its log sequence number.
        seq: u64,
        /// Whether it expired (not acknowledged).
        expired: bool,
    },
    /// A durable message from `key` was refused (its sender was told,
    /// with a [`Frame::DurableAck`]): count and log it.
    DurableRefused {
        /// The sender.
        key: PublicKey,
        /// The message id.
        id: MessageId,
        /// Why.
        status: DurableStatus,
    },
    /// The peer sent Close: the shell reads its data streams to their end
    /// (their messages are still ingested), then calls [`Node::finish`].
    PeerClosing {
        /// The link.
        link: LinkId,
        /// The peer's code.
        code: CloseCode,
        /// The peer's reason.
        reason: String,
    },
    /// Count `count` dropped messages (metrics). One per reason per event.
    Drop {
        /// Why.
        reason: DropReason,
        /// How many (at least 1).
        count: u64,
    },
    /// Signatures were checked: count them (metrics).
    Verified {
        /// How many were checked.
        checked: u64,
        /// How many of them failed.
        bad: u64,
    },
    /// A batch from `link` had messages refused as replayed, expired or
    /// future-dated: log it (once per batch).
    Refused {
        /// The sender's link.
        link: LinkId,
        /// The sender.
        key: PublicKey,
        /// How many.
        count: u64,
    },
    /// A batch from `link` had messages whose signature did not verify
    /// (`Verify::All`): log it (once per batch).
    BadSignatures {
        /// The sender's link.
        link: LinkId,
        /// The sender.
        key: PublicKey,
        /// How many.
        count: u64,
    },
}

/// What the node keeps per link that is up.
struct LinkState<H> {
    handle: H,
    key: PublicKey,
    role: Role,
    /// The link's drops not yet noticed, if it asked for notices.
    notices: Option<NoticeAggregator>,
    /// The time this link is scheduled at in [`Node::timers`], if it is.
    due: Option<u64>,
    stall: StallGate,
    /// Why the node closed it, once it has.
    closed: Option<CloseReason>,
}

/// Buffers one batch needs, kept between batches so ingest allocates
/// nothing per message. Each holds at most one batch's worth
/// (`limits.max_batch_messages`).
struct Scratch<H> {
    ids: Vec<MessageId>,
    /// Verdicts of `Verify::All`, per message.
    good: Vec<bool>,
    /// Messages held for the batch's first cell receiver: (index, TTL).
    held: Vec<(u32, u8)>,
    /// Receivers of cell-addressed messages, each once, in first-seen order.
    unicast: Vec<(LinkId, H)>,
    /// Drops to notice the sender of: (code, subject, first id, count),
    /// consecutive ones of one (code, subject) merged.
    noticed: Vec<(NoticeCode, PublicKey, MessageId, u64)>,
    notices: Vec<Notice>,
    /// Durable messages of the batch, taken aside: (index, TTL).
    durable: Vec<(u32, u8)>,
}

/// One relay's decisions; see the [module documentation](self).
///
/// `H` is the shell's handle of a link (an `Arc` of its queues, a plain id
/// in a simulation); actions carry it, so the shell acts on them without a
/// lookup. Cloned once per action that names it.
///
/// Bounded: at most `max_links` links, each with one notice aggregator
/// (bounded by [`crate::notices::MAX_SUBJECTS`]) and one timer; the dedup
/// window holds at most `dedup_capacity` ids; the router at most one entry
/// per link.
pub struct Node<H> {
    cfg: NodeConfig,
    router: Router<H>,
    dedup: DedupWindow,
    links: BTreeMap<LinkId, LinkState<H>>,
    /// (due time, link): when each link's next notice falls due.
    timers: BTreeSet<(u64, LinkId)>,
    rng: fastrand::Rng,
    /// `Verify::Sampled`: a draw below this is checked (`None`: every one).
    sample_below: Option<u64>,
    shutting_down: bool,
    scratch: Scratch<H>,
    durable: DurableQueues,
    /// Relay peering (crate::mesh): off until [`Node::with_mesh`].
    mesh: Mesh<H>,
}

impl<H: Clone> Node<H> {
    /// A node with no links, whose every random choice (the dedup table's
    /// hash key, the messages `Verify::Sampled` checks) comes from `seed`.
    /// The shell seeds it from the OS; a simulation from its run's seed.
    ///
    /// # Errors
    ///
    /// A setting no node can run with ([`NodeConfigError`]).
    pub fn new(cfg: NodeConfig, seed: u64) -> Result<Self, NodeConfigError> {
        if cfg.dedup_capacity == 0 {
            return Err(NodeConfigError::DedupCapacity);
        }
        if cfg.max_links == 0 {
            return Err(NodeConfigError::MaxLinks);
        }
        let sample_below = match cfg.verify {
            Verify::Sampled { rate } if !(rate > 0.0 && rate <= 1.0) => {
                return Err(NodeConfigError::SampleRate(rate));
            }
            // 2^64 × rate, rounded down; a rate of 1 checks every message.
            Verify::Sampled { rate } if rate < 1.0 => {
                Some((rate * 18_446_744_073_709_551_616.0) as u64)
            }
            _ => None,
        };
        let mut rng = fastrand::Rng::with_seed(seed);
        let key = IdKey::new(rng.u64(..), rng.u64(..));
        Ok(Self {
            router: Router::new(cfg.max_links),
            dedup: DedupWindow::new(cfg.dedup_window_ms, cfg.dedup_capacity, key),
            links: BTreeMap::new(),
            timers: BTreeSet::new(),
            rng,
            sample_below,
            shutting_down: false,
            scratch: Scratch {
                ids: Vec::new(),
                good: Vec::new(),
                held: Vec::new(),
                unicast: Vec::new(),
                noticed: Vec::new(),
                notices: Vec::new(),
                durable: Vec::new(),
            },
            durable: DurableQueues::new(cfg.durable),
            mesh: Mesh::new(cfg.key, MeshConfig::new()),
            cfg,
        })
    }

    /// The node with relay peering set up as `mesh` says (trusted relays,
    /// `max_peers`, the mesh's timers and bounds); see [`crate::mesh`].
    /// Without it, every relay-role link is refused. Call before any link
    /// is up.
    ///
    /// # Errors
    ///
    /// A mesh setting out of its range ([`MeshConfig::validate`]).
    pub fn with_mesh(mut self, mesh: MeshConfig) -> Result<Self, MeshConfigError> {
        mesh.validate()?;
        self.mesh = Mesh::new(self.cfg.key, mesh);
        Ok(self)
    }

    /// The mesh state: relay links, routes, directory, counters.
    pub fn mesh(&self) -> &Mesh<H> {
        &self.mesh
    }

    /// The mesh state, for views that compute shortest paths on demand.
    pub fn mesh_mut(&mut self) -> &mut Mesh<H> {
        &mut self.mesh
    }

    /// A relay link this relay dialed came up (its peer's Welcome read):
    /// admitted as [`link_up`](Self::link_up) admits a relay link, but with
    /// no Welcome of its own.
    pub fn peer_dialed(
        &mut self,
        now: Now,
        link: LinkId,
        handle: H,
        key: PublicKey,
        out: &mut Vec<Action<H>>,
    ) -> Admission {
        let info = LinkInfo {
            key,
            role: Role::Relay,
            version: PROTOCOL_VERSION,
            notices: false,
        };
        self.admit(now, link, handle, info, false, out)
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// Links up (at most `max_links`).
    pub fn links(&self) -> usize {
        self.links.len()
    }

    /// Whether `link` is up.
    pub fn is_up(&self, link: LinkId) -> bool {
        self.links.contains_key(&link)
    }

    /// The routing table: attached cells, services, watchers.
    pub fn router(&self) -> &Router<H> {
        &self.router
    }

    /// The dedup window (for its size and early evictions).
    pub fn dedup(&self) -> &DedupWindow {
        &self.dedup
    }

    /// The durable messages this node answers for.
    pub fn durable(&self) -> &DurableQueues {
        &self.durable
    }

    /// Whether [`shut_down`](Self::shut_down) was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// A link proved `info.key` and sent its Hello. Admitted unless, in this
    /// order: its version is not [`PROTOCOL_VERSION`] (`Version`), it is a
    /// relay whose key is not trusted (`Unauthorized`; with no mesh set up,
    /// peering is not enabled), the relay is shutting down (`Shutdown`),
    /// `max_links` links are up (`TooManyLinks`, and a
    /// [`DropReason::TooManyLinks`] drop), or it is a relay and `max_peers`
    /// relay links are up (`TooManyLinks`).
    ///
    /// A relay link is not routed to as a cell: the mesh takes it (its
    /// link-state database goes to it, the own LinkState to the other
    /// relays; see [`crate::mesh`]).
    ///
    /// Admitted, the actions are: its Welcome; the [`Action::Close`] of an
    /// older link of the same key, which it replaces (`Normal`, counted as
    /// [`CloseReason::Replaced`]); the presence reports to watchers (by
    /// watcher link id). A cell is routed to from here on.
    ///
    /// `link` must not be up; if it is, it goes down first.
    pub fn link_up(
        &mut self,
        now: Now,
        link: LinkId,
        handle: H,
        info: LinkInfo,
        out: &mut Vec<Action<H>>,
    ) -> Admission {
        self.admit(now, link, handle, info, true, out)
    }

    /// [`link_up`](Self::link_up) and [`peer_dialed`](Self::peer_dialed):
    /// `welcome` says whether this side sends Welcome.
    fn admit(
        &mut self,
        now: Now,
        link: LinkId,
        handle: H,
        info: LinkInfo,
        welcome: bool,
        out: &mut Vec<Action<H>>,
    ) -> Admission {
        let refuse = |code, reason| Admission::Refused { code, reason };
        if info.version != PROTOCOL_VERSION {
            return refuse(
                CloseCode::Version,
                format!(
                    "this relay speaks link protocol version {PROTOCOL_VERSION}; the peer sent version {}",
                    info.version
                ),
            );
        }
        if info.role == Role::Relay
            && let Err(reason) = self.mesh.admit(&info.key)
        {
            return refuse(CloseCode::Unauthorized, reason);
        }
        if self.shutting_down {
            return refuse(CloseCode::Shutdown, "relay shutting down".to_owned());
        }
        if self.links.contains_key(&link) {
            let _ = self.link_down(now, link, out);
        }
        if self.links.len() >= self.cfg.max_links {
            out.push(Action::Drop {
                reason: DropReason::TooManyLinks,
                count: 1,
            });
            return refuse(
                CloseCode::TooManyLinks,
                format!(
                    "relay has {} links, its limit (limits.max_links)",
                    self.cfg.max_links
                ),
            );
        }
        if info.role == Role::Relay && !self.mesh.has_room(&info.key) {
            return refuse(
                CloseCode::TooManyLinks,
                format!(
                    "relay has {} relay links, its limit (max_peers)",
                    self.mesh.config().max_peers
                ),
            );
        }
        if welcome {
            out.push(Action::Control {
                to: handle.clone(),
                frame: Frame::Welcome {
                    version: PROTOCOL_VERSION,
                    node: self.cfg.key,
                    time_ms: now.unix_ms,
                    max_payload: self.cfg.limits.max_payload as u32,
                    max_frame: self.cfg.limits.max_frame as u32,
                },
            });
        }
        self.links.insert(
            link,
            LinkState {
                handle: handle.clone(),
                key: info.key,
                role: info.role,
                notices: info
                    .notices
                    .then(|| NoticeAggregator::new(self.cfg.notice_interval_ms)),
                due: None,
                stall: StallGate::default(),
                closed: None,
            },
        );
        if info.role == Role::Relay {
            if let Some(old) = self.mesh.peer_up(now, link, handle, info.key, out) {
                self.close(
                    old,
                    CloseCode::Normal,
                    "replaced by a newer link of the same relay".to_owned(),
                    CloseReason::Replaced,
                    out,
                );
            }
            return Admission::Admitted;
        }
        let (attach, reports) = self.router.attach(info.key, link, handle.clone());
        if let Some(old) = attach.replaced_link {
            self.close(
                old,
                CloseCode::Normal,
                "replaced by a newer link of the same key".to_owned(),
                CloseReason::Replaced,
                out,
            );
        }
        push_reports(reports, out);
        if info.role == Role::Cell {
            for seq in self.durable.queued_seqs(&info.key) {
                self.durable.delivering(now.mono_ms, seq, &mut self.rng);
                out.push(Action::DurableRead {
                    to: handle.clone(),
                    seq,
                });
            }
        }
        self.mesh.cell_attached(now, info.key, handle, out);
        Admission::Admitted
    }

    /// `link` ended, however it ended. Its cell is detached (if this was
    /// its current link) and watchers hear of it; it stops being a watcher;
    /// its pending notices are discarded (there is no link left to send
    /// them on; an orderly close sent them in [`finish`](Self::finish)),
    /// and its timer and stall gate go. `None` if it was not up.
    pub fn link_down(
        &mut self,
        now: Now,
        link: LinkId,
        out: &mut Vec<Action<H>>,
    ) -> Option<Departed> {
        let state = self.links.remove(&link)?;
        if let Some(due) = state.due {
            self.timers.remove(&(due, link));
        }
        if state.role == Role::Relay {
            self.mesh.peer_down(link, out);
        } else {
            push_reports(self.router.detach(state.key, link), out);
            if self.router.cell(&state.key).is_none() {
                self.mesh.cell_detached(now, state.key, out);
            }
        }
        Some(Departed {
            key: state.key,
            role: state.role,
            closed_by_node: state.closed,
        })
    }

    /// A batch arrived on `link`: `envs` are its messages, decoded, all of
    /// one lane. The rules, in order:
    ///
    /// 1. **Source**: a cell sends only as itself. One message with
    ///    another source refuses the whole batch ([`DropReason::ForgedSource`]
    ///    for each message) and closes the link (`ForgedSource`).
    /// 2. **Signatures** ([`Verify`]): `Sampled`, a failed check refuses
    ///    the batch ([`DropReason::BadSignature`] for each) and closes the
    ///    link (`BadSignature`); `All`, each message that fails is dropped.
    /// 3. **TTL** ([`ttl::next_ttl`]): a message with none left is dropped.
    /// 4. **Freshness**: a timestamp outside the window is dropped
    ///    (expired or from the future).
    /// 5. **Dedup**: a message seen before is dropped, without a notice (a
    ///    retransmitted copy is not the sender's loss).
    /// 6. **Route**: to the attached cell (unknown: dropped), to every
    ///    attached cell but the sender (broadcast), or to the cells offering
    ///    the service but the sender, each in key order.
    ///
    /// What passes leaves with its TTL one lower. When every message passed
    /// and all go to one cell, on a cell link, and the batch is at most
    /// [`FORWARD_WHOLE_MAX`] bytes, it is forwarded whole
    /// ([`Action::Forward`], no re-encoding); otherwise message by message
    /// ([`Action::Deliver`]).
    ///
    /// Actions, in this order: [`Action::Verified`] (if signatures were
    /// checked); the Deliver actions to receivers other than the batch's
    /// first cell receiver, in message order; that receiver's Forward or
    /// Delivers; [`Action::MayPause`] per cell receiver; [`Action::Drop`]
    /// per reason ([`DropReason::ALL`] order); [`Action::BadSignatures`]
    /// and [`Action::Refused`] for the log; the notices now due to the
    /// sender (only if it asked for notices). Or, for a refused batch: Drop,
    /// Verified, Close.
    ///
    /// A batch on a link that is not up is ignored; on a link the node
    /// closed, it is still ingested (its messages were on their way).
    /// Allocates nothing per message, but for a copy of the service name
    /// per service-addressed message; `Verify::All` costs the batch
    /// verifier's few dozen allocations per batch.
    pub fn batch(
        &mut self,
        now: Now,
        link: LinkId,
        envs: &[Envelope],
        batch: &BatchFrame,
        out: &mut Vec<Action<H>>,
    ) {
        let Some(from) = self.links.get(&link) else {
            return;
        };
        let (from_key, from_role) = (from.key, from.role);
        let n = envs.len() as u64;
        if from_role == Role::Relay
            && let Err(reason) = self.mesh.received_batch(now, link, batch.lane, n, out)
        {
            self.close(
                link,
                CloseCode::RateLimited,
                reason,
                CloseReason::RateLimited,
                out,
            );
            return;
        }
        if from_role == Role::Cell
            && let Some(e) = envs.iter().find(|e| e.source() != from_key)
        {
            out.push(Action::Drop {
                reason: DropReason::ForgedSource,
                count: n,
            });
            let reason = format!(
                "message source {} is not this link's key {}",
                e.source(),
                from_key
            );
            self.close(
                link,
                CloseCode::ForgedSource,
                reason,
                CloseReason::ForgedSource,
                out,
            );
            return;
        }
        let checked = match self.check_signatures(envs, out) {
            Ok(checked) => checked,
            Err(reason) => {
                self.close(
                    link,
                    CloseCode::BadSignature,
                    reason,
                    CloseReason::BadSignature,
                    out,
                );
                return;
            }
        };
        let mut drops = [0u64; DropReason::ALL.len()];
        if checked {
            drops[DropReason::BadSignature as usize] =
                self.scratch.good.iter().filter(|g| !**g).count() as u64;
        }
        let durable_ok = from_role == Role::Cell;
        self.route_batch(now, link, durable_ok, envs, batch, checked, &mut drops, out);
        self.durable_ingest(now, link, from_key, envs, out);
        for (reason, count) in DropReason::ALL.into_iter().zip(drops) {
            if count > 0 {
                out.push(Action::Drop { reason, count });
            }
        }
        let bad = drops[DropReason::BadSignature as usize];
        if bad > 0 {
            out.push(Action::BadSignatures {
                link,
                key: from_key,
                count: bad,
            });
        }
        let refused = drops[DropReason::Expired as usize]
            + drops[DropReason::FromFuture as usize]
            + drops[DropReason::Duplicate as usize];
        if refused > 0 {
            out.push(Action::Refused {
                link,
                key: from_key,
                count: refused,
            });
        }
        let mut noticed = std::mem::take(&mut self.scratch.noticed);
        self.notice(now, link, noticed.drain(..), out);
        self.scratch.noticed = noticed;
    }

    /// Applies the signature policy to a batch: `Ok(true)` when every
    /// message was checked (verdicts in `scratch.good`), `Ok(false)` when
    /// every message passes unchecked, `Err(reason)` when a sampled message
    /// failed (the batch is refused, its drops already appended).
    fn check_signatures(
        &mut self,
        envs: &[Envelope],
        out: &mut Vec<Action<H>>,
    ) -> Result<bool, String> {
        match self.cfg.verify {
            Verify::Off => Ok(false),
            Verify::All => {
                let refs: Vec<&Envelope> = envs.iter().collect();
                self.scratch.good.clear();
                self.scratch
                    .good
                    .extend(verify_each(&refs).iter().map(Result::is_ok));
                let bad = self.scratch.good.iter().filter(|g| !**g).count() as u64;
                out.push(Action::Verified {
                    checked: envs.len() as u64,
                    bad,
                });
                Ok(true)
            }
            Verify::Sampled { .. } => {
                let mut checked = 0;
                for e in envs {
                    if self
                        .sample_below
                        .is_some_and(|below| self.rng.u64(..) >= below)
                    {
                        continue;
                    }
                    checked += 1;
                    if e.verify().is_err() {
                        out.push(Action::Drop {
                            reason: DropReason::BadSignature,
                            count: envs.len() as u64,
                        });
                        out.push(Action::Verified { checked, bad: 1 });
                        return Err(format!(
                            "a sampled message {} failed signature verification",
                            e.id()
                        ));
                    }
                }
                if checked > 0 {
                    out.push(Action::Verified { checked, bad: 0 });
                }
                Ok(false)
            }
        }
    }

    /// Rules 3 to 6 of [`batch`](Self::batch) and the choice between
    /// forwarding whole and message by message. Drops go into `drops` (by
    /// reason) and `scratch.noticed`.
    #[allow(clippy::too_many_arguments)]
    fn route_batch(
        &mut self,
        now: Now,
        from_link: LinkId,
        durable_ok: bool,
        envs: &[Envelope],
        batch: &BatchFrame,
        checked: bool,
        drops: &mut [u64; DropReason::ALL.len()],
        out: &mut Vec<Action<H>>,
    ) {
        let Node {
            cfg,
            router,
            dedup,
            links,
            scratch,
            mesh,
            ..
        } = self;
        let Scratch {
            ids,
            good,
            held,
            unicast,
            noticed,
            durable,
            ..
        } = scratch;
        durable.clear();
        ids.clear();
        ids.extend(envs.iter().map(Envelope::id));
        // The lookups are random accesses to tables of tens of MiB: start
        // them all before the first check so their misses overlap.
        for id in ids.iter() {
            dedup.prefetch(id.as_u128());
        }
        held.clear();
        noticed.clear();
        // The batch's first cell receiver, whose messages are held back in
        // case the batch can go whole.
        let mut single: Option<(LinkId, &H)> = None;
        // Batches mostly go to one cell: its route is looked up once per
        // run of messages to it (a hit or a miss), not per message.
        let mut last: Option<(PublicKey, Option<(LinkId, &H)>)> = None;
        for (i, e) in envs.iter().enumerate() {
            let id = ids[i];
            if checked && !good[i] {
                add_notice(noticed, NoticeCode::BadSignature, dest_subject(e), id, 1);
                continue;
            }
            let Some(ttl) = ttl::next_ttl(e.ttl()) else {
                drops[DropReason::TtlExpired as usize] += 1;
                add_notice(noticed, NoticeCode::TtlExpired, dest_subject(e), id, 1);
                continue;
            };
            if let Err(s) = cfg.freshness.check(e.timestamp_ms(), now.unix_ms) {
                let (reason, code) = match s {
                    Staleness::Expired { .. } => (DropReason::Expired, NoticeCode::Expired),
                    Staleness::FromFuture { .. } => {
                        (DropReason::FromFuture, NoticeCode::FromFuture)
                    }
                };
                drops[reason as usize] += 1;
                add_notice(noticed, code, dest_subject(e), id, 1);
                continue;
            }
            // Durable cell-to-cell messages go through the log, with their
            // own dedup (a resend is acknowledged again, not dropped).
            if durable_ok && e.qos() == Qos::Durable && e.dest_cell().is_some() {
                durable.push((i as u32, ttl));
                continue;
            }
            if dedup.check_and_insert(id.as_u128(), now.mono_ms) == DedupVerdict::Duplicate {
                drops[DropReason::Duplicate as usize] += 1;
                continue;
            }
            let index = i as u32;
            // Built only where a message is queued on its own: a clone
            // costs an atomic on the batch's buffer.
            let deliver = |to: &H| Action::Deliver {
                to: to.clone(),
                index,
                id,
                env: e.clone().with_ttl(ttl),
            };
            match e.destination() {
                Destination::Cell(dest) => {
                    let route = match last {
                        Some((k, r)) if k == dest => r,
                        _ => {
                            let r = router.cell(&dest);
                            if let Some((l, h)) = r
                                && !unicast.iter().any(|(u, _)| *u == l)
                            {
                                unicast.push((l, h.clone()));
                            }
                            last = Some((dest, r));
                            r
                        }
                    };
                    // The last hop, delivered here: reported to the source
                    // directly if it is attached here (with or without a
                    // mesh), else routed to its home through the mesh.
                    if e.trace() && route.is_some() {
                        let env = e.clone().with_ttl(ttl);
                        if let Some((_, to)) = router.cell(&e.source()) {
                            out.push(Action::Control {
                                to: to.clone(),
                                frame: Frame::Mesh(mesh.trace_frame(&env, id, dest, 0)),
                            });
                        } else if mesh.enabled() {
                            mesh.trace(now, &env, id, dest, 0, out);
                        }
                    }
                    match (route, single) {
                        (None, _) => {
                            // Without a relay link the mesh has nothing to
                            // offer: no clone, the drop as before.
                            let outcome = if mesh.active() {
                                let env = e.clone().with_ttl(ttl);
                                mesh.route_cell(now, from_link, dest, index, id, env, out)
                            } else {
                                RouteOutcome::NoRoute
                            };
                            match outcome {
                                RouteOutcome::Sent | RouteOutcome::Held => {}
                                RouteOutcome::Dropped(reason) => {
                                    drops[reason as usize] += 1;
                                    if reason == DropReason::SlowReceiver {
                                        add_notice(
                                            noticed,
                                            NoticeCode::DroppedSlowReceiver,
                                            dest,
                                            id,
                                            1,
                                        );
                                    }
                                }
                                RouteOutcome::NoRoute => {
                                    drops[DropReason::UnknownDestination as usize] += 1;
                                    add_notice(
                                        noticed,
                                        NoticeCode::UnknownDestination,
                                        dest,
                                        id,
                                        1,
                                    );
                                }
                            }
                        }
                        (Some(r), None) => {
                            single = Some(r);
                            held.push((index, ttl));
                        }
                        (Some((l, _)), Some((s, _))) if l == s => held.push((index, ttl)),
                        (Some((_, h)), Some(_)) => out.push(deliver(h)),
                    }
                }
                // Never back to its source: on a cell link that is the
                // link's key (checked above); from a relay, the cell that
                // sent it, which may have moved here since.
                Destination::Broadcast => {
                    out.extend(router.broadcast(e.source()).map(deliver));
                    if mesh.active() {
                        let env = e.clone().with_ttl(ttl);
                        drops[DropReason::SlowReceiver as usize] +=
                            mesh.flood(from_link, index, id, &env, out);
                    }
                }
                Destination::Service(s) => {
                    out.extend(router.service_members(&s, e.source()).map(deliver));
                    if mesh.active() {
                        let env = e.clone().with_ttl(ttl);
                        drops[DropReason::SlowReceiver as usize] +=
                            mesh.flood(from_link, index, id, &env, out);
                    }
                }
            }
        }
        if let Some((to_link, to)) = single {
            let whole = (held.len() == envs.len()
                && links.get(&to_link).is_some_and(|l| l.role == Role::Cell))
            .then(|| ttl::forwarded_batch(batch, envs))
            .flatten()
            .filter(|b| b.frame_len() <= FORWARD_WHOLE_MAX);
            match whole {
                Some(batch) => out.push(Action::Forward {
                    to: to.clone(),
                    batch,
                    first: ids[0],
                }),
                None => out.extend(held.iter().map(|&(index, ttl)| Action::Deliver {
                    to: to.clone(),
                    index,
                    id: ids[index as usize],
                    env: envs[index as usize].clone().with_ttl(ttl),
                })),
            }
        }
        out.extend(
            unicast
                .drain(..)
                .map(|(link, to)| Action::MayPause { link, to }),
        );
    }

    /// The shell could not queue messages an action asked for (a full or
    /// closed queue): they are counted ([`DropReason::SlowReceiver`] or
    /// [`DropReason::Shutdown`]) and noticed to the sender if it is up and
    /// asked for notices (actions: the Drop, then the notices now due).
    pub fn undelivered(&mut self, now: Now, u: Undelivered, out: &mut Vec<Action<H>>) {
        if u.count == 0 {
            return;
        }
        let (reason, code) = match u.why {
            QueueRefusal::Full => (DropReason::SlowReceiver, NoticeCode::DroppedSlowReceiver),
            QueueRefusal::Closed => (DropReason::Shutdown, NoticeCode::ReceiverClosing),
        };
        out.push(Action::Drop {
            reason,
            count: u.count,
        });
        self.notice(
            now,
            u.from,
            std::iter::once((code, u.to, u.first, u.count)),
            out,
        );
    }

    /// A control frame arrived on `link`:
    ///
    /// - Announce: more services than `limits.max_services` closes the link
    ///   (`Oversize`); otherwise the cell's services and version are
    ///   replaced and watchers hear of it.
    /// - Discover: a DiscoverReply with the cells offering the service, by
    ///   key, at most [`MAX_DISCOVER_ENTRIES`].
    /// - WatchPresence: starts or stops presence reports to the link.
    /// - Close: [`Action::PeerClosing`].
    /// - A mesh frame ([`Frame::Mesh`]) on a relay link: the mesh's
    ///   (liveness, link state, credit, routed frames; [`crate::mesh`]).
    /// - Anything else closes the link (`Malformed`), a mesh frame on a
    ///   cell link included.
    ///
    /// Ignored on a link that is not up, or that the node closed.
    pub fn control(&mut self, now: Now, link: LinkId, frame: Frame, out: &mut Vec<Action<H>>) {
        let Some(state) = self.links.get(&link).filter(|s| s.closed.is_none()) else {
            return;
        };
        if state.role == Role::Relay {
            self.mesh.heard(now, link);
        }
        match frame {
            Frame::Announce {
                app_version,
                services,
            } => {
                let max = self.cfg.limits.max_services;
                if services.len() > max {
                    let reason =
                        format!("{} services announced; the limit is {max}", services.len());
                    self.close(
                        link,
                        CloseCode::Oversize,
                        reason,
                        CloseReason::Oversize,
                        out,
                    );
                    return;
                }
                let key = state.key;
                push_reports(self.router.announce(key, link, app_version, services), out);
            }
            Frame::Discover { request, service } => out.push(Action::Control {
                to: state.handle.clone(),
                frame: Frame::DiscoverReply {
                    request,
                    cells: self.router.discover(&service, MAX_DISCOVER_ENTRIES),
                },
            }),
            Frame::WatchPresence(on) => {
                let handle = state.handle.clone();
                self.router.watch(link, handle, on);
            }
            Frame::Close { code, reason } => out.push(Action::PeerClosing { link, code, reason }),
            Frame::DurableAck {
                status: DurableStatus::Acked,
                ids,
            } if state.role == Role::Cell => {
                let key = state.key;
                self.durable_acked(key, &ids, out);
            }
            Frame::Mesh(m) if state.role == Role::Relay => {
                self.mesh.control(now, link, m, out);
                self.mesh_events(now, out);
            }
            other => {
                let reason = format!("unexpected {:?} frame on the control stream", other.name());
                self.close(
                    link,
                    CloseCode::Malformed,
                    reason,
                    CloseReason::Malformed,
                    out,
                );
            }
        }
    }

    /// The shell could not decode what `link` sent (a frame, a batch, a
    /// data stream): `code` and `reason` say why. The link is closed with
    /// them, and one message counted as [`DropReason::Oversize`] or
    /// [`DropReason::Malformed`] (a `Version` error counts as malformed).
    /// Ignored on a link that is not up.
    pub fn protocol_error(
        &mut self,
        _now: Now,
        link: LinkId,
        code: CloseCode,
        reason: String,
        out: &mut Vec<Action<H>>,
    ) {
        if !self.links.contains_key(&link) {
            return;
        }
        let dropped = match code {
            CloseCode::Oversize => Some(DropReason::Oversize),
            CloseCode::Malformed | CloseCode::Version => Some(DropReason::Malformed),
            _ => None,
        };
        if let Some(reason) = dropped {
            out.push(Action::Drop { reason, count: 1 });
        }
        self.close(link, code, reason, CloseReason::from(code), out);
    }

    /// Ends an orderly close of `link`, once every message it sent was
    /// ingested (after [`Action::PeerClosing`], its data streams read to
    /// the end): every pending notice, due or not, then the relay's own
    /// Close (`Normal`) as [`Action::Control`] frames. The shell ends the
    /// control stream after them and lets the peer close the connection.
    /// Ignored on a link that is not up.
    pub fn finish(&mut self, _now: Now, link: LinkId, out: &mut Vec<Action<H>>) {
        let Some(state) = self.links.get_mut(&link) else {
            return;
        };
        if let Some(agg) = &mut state.notices {
            agg.take_all(&mut self.scratch.notices);
        }
        if let Some(due) = state.due.take() {
            self.timers.remove(&(due, link));
        }
        state.closed.get_or_insert(CloseReason::Normal);
        for n in self.scratch.notices.drain(..) {
            out.push(Action::Control {
                to: state.handle.clone(),
                frame: n.into_frame(),
            });
        }
        out.push(Action::Control {
            to: state.handle.clone(),
            frame: Frame::Close {
                code: CloseCode::Normal,
                reason: "closed at the peer's request".into(),
            },
        });
    }

    /// The relay is stopping: every later [`link_up`](Self::link_up) is
    /// refused (`Shutdown`). The links up stay up until
    /// [`close_all`](Self::close_all).
    pub fn shut_down(&mut self, _now: Now) {
        self.shutting_down = true;
    }

    /// Closes every link up that the node has not closed yet (`Shutdown`),
    /// by link id: the end of a shutdown, after the shell flushed the
    /// queues.
    pub fn close_all(&mut self, _now: Now, out: &mut Vec<Action<H>>) {
        let open: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, s)| s.closed.is_none())
            .map(|(l, _)| *l)
            .collect();
        for link in open {
            self.close(
                link,
                CloseCode::Shutdown,
                "relay shutting down".to_owned(),
                CloseReason::Shutdown,
                out,
            );
        }
    }

    /// The time has come: the notices due by `now.mono_ms` go out, as
    /// [`Action::Control`] frames, by link id; the dedup window forgets
    /// what expired.
    pub fn tick(&mut self, now: Now, out: &mut Vec<Action<H>>) {
        self.dedup.expire(now.mono_ms);
        self.durable_tick(now, out);
        if self.mesh.enabled() {
            self.mesh.tick(now, out);
            self.mesh_events(now, out);
        }
        let due: Vec<LinkId> = self
            .timers
            .iter()
            .take_while(|&&(due, _)| due <= now.mono_ms)
            .map(|&(_, link)| link)
            .collect();
        for link in due {
            self.notice(now, link, std::iter::empty(), out);
        }
    }

    /// When [`tick`](Self::tick) next has something to do (on the
    /// [`Now::mono_ms`] clock), if anything is pending.
    pub fn poll_timeout(&self) -> Option<u64> {
        let notices = self.timers.first().map(|&(due, _)| due);
        let durable = self.durable.next_due();
        [notices, self.mesh.next_due(), durable]
            .into_iter()
            .flatten()
            .min()
    }

    /// Carries out what the mesh asked for: closes (idle relay links) and
    /// notices of held messages dropped for an unknown destination.
    fn mesh_events(&mut self, now: Now, out: &mut Vec<Action<H>>) {
        for (link, code, reason, why) in std::mem::take(&mut self.mesh.events.close) {
            self.close(link, code, reason, why, out);
        }
        let unknown = std::mem::take(&mut self.mesh.events.unknown);
        if !unknown.is_empty() {
            out.push(Action::Drop {
                reason: DropReason::UnknownDestination,
                count: unknown.len() as u64,
            });
        }
        for (from, dest, id) in unknown {
            self.notice(
                now,
                from,
                std::iter::once((NoticeCode::UnknownDestination, dest, id, 1)),
                out,
            );
        }
    }

    /// Whether a sender may be paused, at `now`, for the receiver on
    /// `link`, whose lane queue the shell found backlogged after an
    /// [`Action::MayPause`], its writer having taken `taken` messages so
    /// far. No when pauses are off (`max_stall_ms` 0), when the receiver is
    /// not up, or when it has taken nothing for
    /// [`STUCK_AFTER_MS`](crate::STUCK_AFTER_MS) ([`StallGate`]).
    pub fn may_wait(&self, now: Now, link: LinkId, taken: u64) -> bool {
        self.cfg.max_stall_ms > 0
            && self
                .links
                .get(&link)
                .is_some_and(|l| l.stall.may_wait(taken, now.mono_ms))
    }

    /// Closes `link` if the node has not already: one [`Action::Close`].
    fn close(
        &mut self,
        link: LinkId,
        code: CloseCode,
        reason: String,
        why: CloseReason,
        out: &mut Vec<Action<H>>,
    ) {
        let Some(state) = self.links.get_mut(&link) else {
            return;
        };
        if state.closed.is_some() {
            return;
        }
        state.closed = Some(why);
        out.push(Action::Close {
            link,
            to: state.handle.clone(),
            code,
            reason,
            why,
        });
        if state.role == Role::Relay {
            self.mesh.peer_down(link, out);
        }
    }

    /// Records `drops` for `link`'s notices (if it is up and asked for
    /// them), appends the notices due at `now`, and reschedules its timer.
    fn notice(
        &mut self,
        now: Now,
        link: LinkId,
        drops: impl Iterator<Item = (NoticeCode, PublicKey, MessageId, u64)>,
        out: &mut Vec<Action<H>>,
    ) {
        let Some(state) = self.links.get_mut(&link) else {
            return;
        };
        let Some(agg) = &mut state.notices else {
            return;
        };
        for (code, subject, id, n) in drops {
            agg.record(code, subject, id, n, now.mono_ms);
        }
        agg.take_due(now.mono_ms, &mut self.scratch.notices);
        let next = agg.next_due();
        for n in self.scratch.notices.drain(..) {
            out.push(Action::Control {
                to: state.handle.clone(),
                frame: n.into_frame(),
            });
        }
        if state.due != next {
            if let Some(due) = state.due {
                self.timers.remove(&(due, link));
            }
            if let Some(due) = next {
                self.timers.insert((due, link));
            }
            state.due = next;
        }
    }
}

fn push_reports<H>(reports: Vec<PresenceReport<H>>, out: &mut Vec<Action<H>>) {
    out.extend(reports.into_iter().map(|r| Action::Control {
        to: r.to,
        frame: Frame::Presence {
            up: r.up,
            info: r.info,
        },
    }));
}

fn dest_subject(e: &Envelope) -> PublicKey {
    e.dest_cell().unwrap_or(NO_SUBJECT)
}

/// Adds `n` drops to `noticed`, merged with the last entry when it is for
/// the same code and subject (a batch mostly goes to one cell); the notice
/// aggregator sums the rest.
fn add_notice(
    noticed: &mut Vec<(NoticeCode, PublicKey, MessageId, u64)>,
    code: NoticeCode,
    subject: PublicKey,
    id: MessageId,
    n: u64,
) {
    match noticed.last_mut() {
        Some((c, s, _, count)) if *c == code && *s == subject => *count += n,
        _ => noticed.push((code, subject, id, n)),
    }
}
