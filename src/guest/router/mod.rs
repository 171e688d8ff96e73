//! The agent's router: link messages in, sub-agent requests out, replies
//! back. It owns all routing state and never waits on a sub-agent: requests
//! go into each sub-agent's bounded queue, then its backlog, and replies
//! come back as events, so a slow handler delays nobody else.
//!
//! Nothing is dropped here. A request for a topic no sub-agent serves yet
//! is held ([`super::holding`]) until one registers it, or refused
//! explicitly when the grace is over; a sub-agent that does not keep up gets
//! its requests as it reads them. A request is *taken* when it was written
//! to a sub-agent's socket (journaled just before: [`super::journal`]); the
//! host then gets `took` and confirms it to its caller.
//!
//! Here: the state, the link's events and the agent's counters. By concern:
//! `intake` (requests from the host: the agent's own methods, dispatch to
//! sub-agents, refusals), `subs` (the sub-agents' events and what they
//! send), `upstream` (their calls, casts and notifications to the control
//! plane, and the replies back).

mod intake;
mod subs;
mod upstream;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::holding::{Holding, time_left};
use super::journal::{Journal, State};
use super::subagent::{ConnId, FromSub, SubEvent, ToSub};
use super::supervisor::{SUPERVISOR_TOPIC, Supervisor};
use crate::link::LinkEvent;
use crate::link::driver::{LinkReceiver, LinkSender};
use crate::rpc::{
    DEDUP_WINDOW, DedupWindow, Failure, Kind, LinkMsg, Reply, Request, Target, new_unique_id,
};

/// `STATUS=` lines for the host link (`systemctl status tether-agent`).
pub const STATUS_WAITING: &str = "waiting for the host";
/// The link is up.
const STATUS_LINKED: &str = "linked to the host";
/// The link dropped; its session waits out the grace period.
const STATUS_DOWN: &str = "host link down: reconnecting (nothing is lost within the grace period)";
/// The grace period ran out.
const STATUS_EXPIRED: &str =
    "host link expired: waiting for the host (unacknowledged messages were lost)";

/// Calls waiting for a sub-agent's answer, across all sub-agents: past this,
/// new calls are refused with an error reply instead of growing the table.
pub const MAX_INFLIGHT: usize = 4096;
/// Calls a sub-agent sent upstream and that wait for an answer.
pub const MAX_UPSTREAM: usize = 1024;
/// Upstream casts remembered (unique id → the sub-agent that cast), so a
/// host's refusal reaches the right sub-agent: more than a send window's
/// worth of casts (1024 frames by default) is ample; older refusals are
/// only logged.
pub const RECENT_CASTS: usize = 4096;
/// Upstream calls without a timeout wait this long.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// Calls without a deadline are forgotten after this long (the caller gave up).
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Sub-agents (with `ack`) that may go away holding one request before it
/// is refused: a request that kills whoever handles it must not crash the
/// restarted sub-agent for ever.
pub const MAX_HANDOVERS: u32 = 3;
/// How often expired entries are swept (and held requests refused).
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Requests waiting for one sub-agent to read them, past its socket queue
/// ([`super::subagent::SUB_QUEUE`]); past this, new ones are refused (a
/// sub-agent that stopped reading must not fill the agent).
pub const SUB_BACKLOG: usize = 4096;
/// Link messages read at once when more are waiting: the `cancel`s among
/// them are handled first, so a request and the cancel right behind it
/// (its caller gave up while both waited in the channel) never run.
pub const LINK_BATCH: usize = 64;
/// The `refused` reason for a request the host cancelled.
const CANCELLED: &str = "Cancelled: its caller gave up before a sub-agent took it";

struct Sub {
    name: String,
    topics: Vec<String>,
    tx: mpsc::Sender<ToSub>,
    /// Requests its socket queue had no room for, oldest first.
    backlog: VecDeque<ToSub>,
    /// It confirms what it took (`took`, or a call's reply).
    ack: bool,
    /// With `ack`: what it got and has not confirmed, by request id (to
    /// hand to the next sub-agent of the topic if it goes away).
    /// With the time its `timeout_ms` counts from.
    unconfirmed: BTreeMap<u64, (Request, Instant)>,
}

struct InFlight {
    msg_id: String,
    reply_to: Option<String>,
    expires: Instant,
}

type Room = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = (
                    ConnId,
                    Result<mpsc::OwnedPermit<ToSub>, mpsc::error::SendError<()>>,
                ),
            > + Send
            + Sync,
    >,
>;

struct Upstream {
    conn: ConnId,
    id: u64,
    expires: Instant,
}

/// The router state.
pub struct Router {
    link: LinkSender,
    supervisor: Supervisor,
    subs: HashMap<ConnId, Sub>,
    topics: BTreeMap<String, ConnId>,
    inflight: HashMap<(ConnId, u64), InFlight>,
    upstream: HashMap<String, Upstream>,
    /// Recent upstream casts: unique id → (sub-agent, topic, method), and
    /// their order for the bound [`RECENT_CASTS`].
    casts: HashMap<String, (ConnId, Target, String)>,
    cast_order: VecDeque<String>,
    next_req: u64,
    dedup: DedupWindow,
    /// Requests dropped because their unique id was seen before.
    duplicates_dropped: u64,
    /// Requests taken by a sub-agent, this run and recent earlier ones.
    journal: Arc<Mutex<Journal>>,
    /// Requests for topics nobody serves yet.
    holding: Holding,
    /// How long a topic may stay unserved before its requests are refused.
    grace: Duration,
    /// Waits for room in a sub-agent's queue, one per sub-agent with a
    /// backlog.
    room: FuturesUnordered<Room>,
    /// Requests refused (no sub-agent in time, queues full, expired).
    refused: u64,
    /// Requests the host cancelled before a sub-agent took them.
    cancelled: u64,
    /// Requests handed again because a sub-agent went away without
    /// confirming them: unique id → sub-agents gone so far.
    handovers: HashMap<String, u32>,
}

/// The agent's own target: `stats` answers with the link's and the router's
/// counters (what a migration re-sent and what duplicates were dropped).
pub const AGENT_TOPIC: &str = "tether.agent";

impl Router {
    /// A router sending to the host through `link`, journaling taken
    /// requests in `journal`; requests wait `grace` for a sub-agent.
    pub fn new(
        link: LinkSender,
        supervisor: Supervisor,
        journal: Arc<Mutex<Journal>>,
        grace: Duration,
    ) -> Self {
        Self {
            link,
            supervisor,
            subs: HashMap::new(),
            topics: BTreeMap::new(),
            inflight: HashMap::new(),
            upstream: HashMap::new(),
            casts: HashMap::new(),
            cast_order: VecDeque::new(),
            next_req: 1,
            dedup: DedupWindow::new(DEDUP_WINDOW),
            duplicates_dropped: 0,
            journal,
            holding: Holding::default(),
            grace,
            room: FuturesUnordered::new(),
            refused: 0,
            cancelled: 0,
            handovers: HashMap::new(),
        }
    }

    /// Route until `shutdown` resolves or the link ends.
    pub async fn run(
        mut self,
        mut link_rx: LinkReceiver,
        mut subs: mpsc::Receiver<SubEvent>,
        shutdown: impl std::future::Future<Output = ()>,
        mut probe: crate::sd::Probe,
    ) {
        tokio::pin!(shutdown);
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                ev = link_rx.recv() => match ev {
                    Some(ev) => self.on_link_batch(ev, &mut link_rx).await,
                    None => break,
                },
                Some(ev) = subs.recv() => self.on_sub(ev).await,
                Some((conn, permit)) = self.room.next(), if !self.room.is_empty() => {
                    self.on_room(conn, permit.ok())
                }
                _ = sweep.tick() => self.sweep().await,
                q = probe.asked() => crate::sd::Probe::answer(q),
            }
        }
    }

    async fn send(&self, m: &LinkMsg) {
        if let Err(e) = self.link.send(m.to_bytes()).await {
            error!(error = %e, "could not queue a message to the host");
        }
    }

    async fn reply(&self, msg_id: String, reply_to: Option<String>, res: Result<Value, Failure>) {
        send_reply(&self.link, msg_id, reply_to, res).await;
    }

    async fn topics_changed(&self) {
        let topics = self.topics.keys().cloned().collect();
        self.send(&LinkMsg::Topics { topics }).await;
    }

    /// `first` and what else the link has ready (up to [`LINK_BATCH`]):
    /// cancels first, then the rest in order; a request cancelled in the
    /// same batch is dropped without a second answer.
    async fn on_link_batch(&mut self, first: LinkEvent, rx: &mut LinkReceiver) {
        let mut batch = vec![first];
        while batch.len() < LINK_BATCH {
            match rx.try_recv() {
                Some(ev) => batch.push(ev),
                None => break,
            }
        }
        let mut decoded = Vec::with_capacity(batch.len());
        let mut cancelled = std::collections::HashSet::new();
        for ev in batch {
            match ev {
                LinkEvent::Message(b) => match LinkMsg::from_bytes(&b) {
                    Ok(LinkMsg::Cancel { unique_id }) => {
                        self.on_cancel(unique_id.clone()).await;
                        cancelled.insert(unique_id);
                    }
                    Ok(m) => decoded.push(Ok(m)),
                    Err(e) => decoded.push(Err((b, e.to_string()))),
                },
                other => self.on_link(other).await,
            }
        }
        for m in decoded {
            match m {
                Ok(LinkMsg::Req(r)) if cancelled.contains(&r.unique_id) => {
                    debug!(unique_id = %r.unique_id, "request cancelled right behind it dropped");
                }
                Ok(m) => self.on_msg(m).await,
                Err((b, e)) => self.on_malformed(&b, &e).await,
            }
        }
    }

    async fn on_msg(&mut self, m: LinkMsg) {
        match m {
            LinkMsg::Req(r) => self.on_request(r).await,
            LinkMsg::Rep(r) => self.on_upstream_reply(r).await,
            LinkMsg::Topics { .. } => debug!("ignoring a topics message from the host"),
            LinkMsg::Refused { unique_id, reason } => self.on_refused(unique_id, reason),
            LinkMsg::Took { .. } => debug!("ignoring a receipt from the host"),
            LinkMsg::Cancel { unique_id } => self.on_cancel(unique_id).await,
        }
    }

    /// The host cancelled `unique_id` (its caller gave up). Withdrawn unless
    /// a sub-agent took it: then the cancel is too late, and the host gets
    /// (or already got) `took`.
    async fn on_cancel(&mut self, unique_id: String) {
        let handed = self.subs.values().any(|s| {
            s.unconfirmed
                .values()
                .any(|(r, _)| r.unique_id == unique_id)
        });
        if handed {
            // A sub-agent with `ack` has it (or will read it next): its
            // confirmation is the answer.
            return debug!(unique_id = %unique_id, "cancel too late: a sub-agent has the request");
        }
        let before = crate::lock(&self.journal).cancel(&unique_id);
        match before {
            Some(State::Taken) => {
                debug!(unique_id = %unique_id, "cancel too late: a sub-agent took the request")
            }
            Some(State::TakenEarlier) => self.took(unique_id).await,
            Some(State::Cancelled) | None => {
                if before.is_none() {
                    self.cancelled += 1;
                    let held = self.holding.remove(&unique_id);
                    info!(unique_id = %unique_id, held, "request cancelled by the host: it will not run");
                }
                let m = LinkMsg::Refused {
                    unique_id,
                    reason: CANCELLED.into(),
                };
                self.send(&m).await;
            }
        }
    }

    async fn on_link(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Message(b) => match LinkMsg::from_bytes(&b) {
                Ok(m) => self.on_msg(m).await,
                Err(e) => self.on_malformed(&b, &e.to_string()).await,
            },
            // A new connection, or a new host proxy on the same connection (a
            // migration whose destination was connected beforehand: the guest
            // sees no disconnect): either way the host must learn our topics.
            LinkEvent::Up { .. } | LinkEvent::PeerChanged { .. } => {
                crate::sd::status(STATUS_LINKED);
                self.topics_changed().await
            }
            LinkEvent::Expired { unacked } => {
                crate::sd::status(STATUS_EXPIRED);
                error!(
                    lost = unacked.len(),
                    "host link expired: messages to the host were not delivered"
                )
            }
            LinkEvent::Down => crate::sd::status(STATUS_DOWN),
        }
    }

    /// A message that is not a valid envelope: dropped, but a call among
    /// them (a `req` with `kind: "call"` and a string `msg_id`) is answered
    /// `Malformed`, and a request with a string `unique_id` is settled with
    /// the host (`refused`), so nobody waits for it.
    async fn on_malformed(&mut self, b: &[u8], why: &str) {
        warn!(error = %why, "malformed message from the host dropped");
        let Ok(v) = serde_json::from_slice::<Value>(b) else {
            return;
        };
        let field = |k: &str| v.get(k).and_then(Value::as_str);
        if field("t") != Some("req") {
            return;
        }
        let why = format!("malformed request: {why}");
        if let Some(uid) = field("unique_id") {
            let m = LinkMsg::Refused {
                unique_id: uid.to_string(),
                reason: format!("Malformed: {why}"),
            };
            self.send(&m).await;
        }
        if field("kind") == Some("call")
            && let Some(m) = field("msg_id")
        {
            let reply_to = field("reply_to").map(String::from);
            let f = Failure::tether("Malformed", why);
            self.reply(m.to_string(), reply_to, Err(f)).await;
        }
    }

    fn stats(&self) -> Value {
        let s = self.link.status();
        json!({
            "link": {
                "session": format!("{:016x}", s.local),
                "peer_session": format!("{:016x}", s.peer),
                "connects": s.connects,
                "sent": s.stats.sent,
                "resent": s.stats.resent,
                "delivered": s.stats.delivered,
                "duplicates": s.stats.duplicates,
                "out_of_order": s.stats.out_of_order,
                "discarded_full": s.stats.discarded_full,
                "before_hello": s.stats.before_hello,
                "established": s.stats.established,
                "peer_changes": s.stats.peer_changes,
                "pings": s.stats.pings,
                "probes": s.stats.probes,
                "rtt_us": s.stats.last_rtt.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                "garbage_bytes": s.decode.skipped_bytes,
            },
            "router": {
                "duplicates_dropped": self.duplicates_dropped,
                "calls_in_flight": self.inflight.len(),
                "held": self.holding.len(),
                "backlog": self.subs.values().map(|s| s.backlog.len()).sum::<usize>(),
                "refused": self.refused,
                "cancelled": self.cancelled,
                "topics": self.topics.keys().collect::<Vec<_>>(),
            },
        })
    }

    /// Refuse held requests whose grace (or own time) is over, forget calls
    /// whose caller has given up, and fail upstream calls that got no
    /// answer in time.
    async fn sweep(&mut self) {
        let now = Instant::now();
        for h in self.holding.expired(now) {
            if time_left(&h.req, h.arrived, now) == Some(0) {
                self.expired(h.req).await;
            } else {
                self.unserved(h.req).await;
            }
        }
        self.inflight.retain(|_, f| f.expires > now);
        let expired: Vec<String> = self
            .upstream
            .iter()
            .filter(|(_, u)| u.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            if let Some(u) = self.upstream.remove(&k)
                && let Some(s) = self.subs.get(&u.conn)
            {
                let e = Failure::tether(
                    "MessagingTimeout",
                    "no reply from the control plane in time",
                );
                let _ = s.tx.try_send(ToSub::Result {
                    id: u.id,
                    result: None,
                    error: Some(e),
                });
            }
        }
    }
}

/// `at + d`, or `at + FORGET_AFTER` when a peer's duration does not fit
/// (an `Instant` overflow would panic).
fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d).unwrap_or(at + FORGET_AFTER)
}

/// Send the one reply a call gets; if it cannot be sent (most likely too
/// large), send a failure in its place so the caller is never left waiting.
async fn send_reply(
    link: &LinkSender,
    msg_id: String,
    reply_to: Option<String>,
    res: Result<Value, Failure>,
) {
    let m = LinkMsg::Rep(Reply::new(msg_id.clone(), reply_to.clone(), res));
    if let Err(e) = link.send(m.to_bytes()).await {
        let f = Failure::tether("ReplyTooLarge", format!("the reply could not be sent: {e}"));
        let m = LinkMsg::Rep(Reply::new(msg_id, reply_to, Err(f)));
        if let Err(e) = link.send(m.to_bytes()).await {
            error!(error = %e, "could not queue a reply to the host");
        }
    }
}
