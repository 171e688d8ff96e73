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

    async fn on_request(&mut self, r: Request) {
        let known = crate::lock(&self.journal).state(&r.unique_id);
        if known == Some(State::Cancelled) {
            // Sent again after the host cancelled it (a broker redelivery):
            // never run; the host learns so again.
            self.duplicates_dropped += 1;
            let m = LinkMsg::Refused {
                unique_id: r.unique_id,
                reason: CANCELLED.into(),
            };
            return self.send(&m).await;
        }
        if r.kind == Kind::Call && r.msg_id.is_none() {
            warn!("call without msg_id refused: it could not be answered");
            return self
                .refuse_request(
                    r,
                    "Malformed",
                    "a call without msg_id cannot be answered".into(),
                )
                .await;
        }
        if matches!(r.kind, Kind::Notify) {
            return self
                .refuse_request(
                    r,
                    "Malformed",
                    "notifications go from guests to the control plane, not into a guest".into(),
                )
                .await;
        }
        if r.target.topic == AGENT_TOPIC {
            return self.agent_method(r).await;
        }
        if known.is_some() {
            // Taken before (by this run, or by one that was killed before
            // the host got its receipt): confirmed again, never run again.
            self.duplicates_dropped += 1;
            debug!(unique_id = %r.unique_id, "request taken before: receipt sent again");
            self.took(r.unique_id.clone()).await;
            if let (Kind::Call, Some(m)) = (r.kind, r.msg_id) {
                let f = Failure::tether(
                    "GuestRestarted",
                    "the agent took this call before it restarted; it may or may not have run",
                );
                self.reply(m, r.reply_to, Err(f)).await;
            }
            return;
        }
        if !self.dedup.first_sight(&r.unique_id) {
            // Still here, not yet taken: its receipt comes when it is.
            self.duplicates_dropped += 1;
            debug!(unique_id = %r.unique_id, "duplicate request dropped");
            return;
        }
        if r.target.topic == SUPERVISOR_TOPIC {
            return self.builtin(r).await;
        }
        self.dispatch(r, Instant::now()).await;
    }

    /// The agent's own topic: methods that only read, answered every time
    /// they arrive — never journaled, never taken for a duplicate (asking
    /// again, or after a restart, gets a fresh answer). A call's reply is
    /// its receipt (the host settles a call on its reply); a cast (which
    /// does nothing here) gets `took`. A request the host cancelled was
    /// refused before this.
    async fn agent_method(&mut self, r: Request) {
        if r.timeout_ms == Some(0) {
            return self.expired(r).await;
        }
        let Some(m) = r.msg_id.filter(|_| r.kind == Kind::Call) else {
            return self.took(r.unique_id).await;
        };
        let res = match r.method.as_str() {
            "stats" => Ok(self.stats()),
            "ping" => Ok(r.args),
            other => Err(Failure::tether(
                "NoSuchMethod",
                format!("{AGENT_TOPIC} has no method '{other}' (stats, ping)"),
            )),
        };
        self.reply(m, r.reply_to, res).await;
    }

    /// The supervisor's targets: taken at once.
    async fn builtin(&mut self, r: Request) {
        if r.timeout_ms == Some(0) {
            return self.expired(r).await;
        }
        crate::lock(&self.journal).record(&r.unique_id);
        self.took(r.unique_id.clone()).await;
        let msg_id = r.msg_id.clone().filter(|_| r.kind == Kind::Call);
        let sup = self.supervisor.clone();
        let link = self.link.clone();
        let router_reply = msg_id.map(|m| (m, r.reply_to.clone()));
        tokio::spawn(async move {
            let res = sup.handle(&r.method, &r.args).await;
            match router_reply {
                Some((msg_id, reply_to)) => send_reply(&link, msg_id, reply_to, res).await,
                None => {
                    if let Err(f) = res {
                        warn!(error = %f.message, "supervisor cast failed");
                    }
                }
            }
        });
    }

    /// To the sub-agent serving its topic, or held until one does.
    async fn dispatch(&mut self, mut r: Request, arrived: Instant) {
        if crate::lock(&self.journal).state(&r.unique_id) == Some(State::Cancelled) {
            // Cancelled while it waited (the cancel was answered then).
            return debug!(unique_id = %r.unique_id, "cancelled request not dispatched");
        }
        let now = Instant::now();
        if r.timeout_ms.is_some() {
            r.timeout_ms = time_left(&r, arrived, now);
            if r.timeout_ms == Some(0) {
                return self.expired(r).await;
            }
        }
        let Some(&conn) = self.topics.get(&r.target.topic) else {
            let until = arrived + self.grace;
            if until <= now {
                return self.unserved(r).await;
            }
            if let Err(r) = self.holding.hold(r, now, until) {
                let why = format!(
                    "too many requests wait for topic '{}' to get a sub-agent",
                    r.target.topic
                );
                self.refuse_request(*r, "Overloaded", why).await;
            }
            return;
        };
        let is_call = r.kind == Kind::Call;
        if is_call && self.inflight.len() >= MAX_INFLIGHT {
            let why = format!("{MAX_INFLIGHT} calls already in progress");
            return self.refuse_request(r, "Overloaded", why).await;
        }
        let Some(sub) = self.subs.get_mut(&conn) else {
            return;
        };
        if sub.backlog.len() >= SUB_BACKLOG || sub.unconfirmed.len() >= SUB_BACKLOG {
            let why = format!(
                "sub-agent '{}' is not keeping up: {SUB_BACKLOG} requests wait for it",
                sub.name
            );
            return self.refuse_request(r, "SubAgentBusy", why).await;
        }
        let id = self.next_req;
        self.next_req += 1;
        if sub.ack {
            sub.unconfirmed.insert(id, (r.clone(), now));
        }
        let out = ToSub::Request {
            id,
            taken_on_write: !sub.ack,
            unique_id: r.unique_id.clone(),
            kind: if is_call { Kind::Call } else { Kind::Cast },
            target: r.target.clone(),
            method: r.method.clone(),
            args: r.args,
            ctx: r.ctx,
            timeout_ms: r.timeout_ms,
        };
        if is_call && let Some(m) = &r.msg_id {
            let ttl = r.timeout_ms.map_or(FORGET_AFTER, Duration::from_millis);
            self.inflight.insert(
                (conn, id),
                InFlight {
                    msg_id: m.clone(),
                    reply_to: r.reply_to.clone(),
                    expires: later(now, ttl),
                },
            );
        }
        if sub.backlog.is_empty() {
            match sub.tx.try_send(out) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(out)) => sub.backlog.push_back(out),
                // Its connection is ending: the Gone event brings it back.
                Err(mpsc::error::TrySendError::Closed(out)) => {
                    sub.backlog.push_back(out);
                    return;
                }
            }
            let tx = sub.tx.clone();
            self.room
                .push(Box::pin(async move { (conn, tx.reserve_owned().await) }));
        } else {
            sub.backlog.push_back(out);
        }
    }

    /// Room in `conn`'s queue: hand over the oldest of its backlog.
    fn on_room(&mut self, conn: ConnId, permit: Option<mpsc::OwnedPermit<ToSub>>) {
        let Some(sub) = self.subs.get_mut(&conn) else {
            return;
        };
        let Some(permit) = permit else {
            return; // the connection ends; Gone brings the backlog back
        };
        let Some(out) = sub.backlog.pop_front() else {
            return;
        };
        let tx = permit.send(out);
        if !sub.backlog.is_empty() {
            self.room
                .push(Box::pin(async move { (conn, tx.reserve_owned().await) }));
        }
    }

    /// Send a sub-agent's cast or notification upstream, remembered (the
    /// last [`RECENT_CASTS`]) to route the host's refusal back to it.
    async fn cast_upstream(&mut self, conn: ConnId, r: Request) {
        if self.cast_order.len() >= RECENT_CASTS
            && let Some(old) = self.cast_order.pop_front()
        {
            self.casts.remove(&old);
        }
        self.cast_order.push_back(r.unique_id.clone());
        self.casts.insert(
            r.unique_id.clone(),
            (conn, r.target.clone(), r.method.clone()),
        );
        self.send(&LinkMsg::Req(r)).await;
    }

    /// Tell the host a sub-agent (or the agent) took `unique_id`.
    async fn took(&self, unique_id: String) {
        self.send(&LinkMsg::Took { unique_id }).await;
    }

    /// Refuse `r` explicitly: a call gets an error answer, a cast a
    /// `refused` to the host (which settles it and audits it).
    async fn refuse_request(&mut self, r: Request, class: &str, why: String) {
        self.refused += 1;
        self.handovers.remove(&r.unique_id);
        warn!(topic = %r.target.topic, method = %r.method, class, reason = %why, "request refused");
        match (r.kind, r.msg_id) {
            (Kind::Call, Some(m)) => {
                self.reply(m, r.reply_to, Err(Failure::tether(class, why)))
                    .await
            }
            _ => {
                let m = LinkMsg::Refused {
                    unique_id: r.unique_id,
                    reason: format!("{class}: {why}"),
                };
                self.send(&m).await;
            }
        }
    }

    async fn unserved(&mut self, r: Request) {
        let why = format!(
            "no sub-agent serves topic '{}' in this instance (waited {} ms for one)",
            r.target.topic,
            self.grace.as_millis()
        );
        self.refuse_request(r, "NoSuchTopic", why).await
    }

    /// Its caller's time ran out before a sub-agent could take it: never
    /// run. The host is told (`refused`), so it stops keeping it.
    async fn expired(&mut self, r: Request) {
        info!(method = %r.method, topic = %r.target.topic, "expired request not run");
        self.refused += 1;
        self.handovers.remove(&r.unique_id);
        let m = LinkMsg::Refused {
            unique_id: r.unique_id,
            reason: "Expired: its caller's timeout ran out before a sub-agent took it".into(),
        };
        self.send(&m).await;
    }

    async fn on_upstream_reply(&mut self, r: Reply) {
        if !r.ending {
            return; // a heartbeat: the answer is still coming
        }
        let Some(u) = self.upstream.remove(&r.msg_id) else {
            debug!(msg_id = %r.msg_id, "reply to an unknown or expired upstream call dropped");
            return;
        };
        if let Some(sub) = self.subs.get(&u.conn) {
            let _ = sub.tx.try_send(ToSub::Result {
                id: u.id,
                result: r.result,
                error: r.failure,
            });
        }
    }

    async fn on_sub(&mut self, ev: SubEvent) {
        match ev {
            SubEvent::Connected(conn, tx) => {
                self.subs.insert(
                    conn,
                    Sub {
                        name: format!("conn-{conn}"),
                        topics: vec![],
                        tx,
                        backlog: VecDeque::new(),
                        ack: false,
                        unconfirmed: BTreeMap::new(),
                    },
                );
            }
            SubEvent::Gone(conn, unsent) => self.sub_gone(conn, unsent).await,
            SubEvent::Message(conn, m) => self.on_sub_message(conn, *m).await,
            SubEvent::Skipped(conn, id) => {
                self.inflight.remove(&(conn, id));
            }
        }
    }

    async fn sub_gone(&mut self, conn: ConnId, unsent: Vec<ToSub>) {
        let Some(mut sub) = self.subs.remove(&conn) else {
            return;
        };
        info!(subagent = %sub.name, "sub-agent disconnected");
        for t in &sub.topics {
            self.topics.remove(t);
        }
        // What it never read is held for the sub-agent that registers its
        // topic next (the supervisor restarting it), oldest first.
        let now = Instant::now();
        let back: Vec<ToSub> = if sub.ack {
            // Everything it did not confirm, in the order it got it.
            let n = sub.unconfirmed.len();
            for (id, (r, since)) in std::mem::take(&mut sub.unconfirmed) {
                self.inflight.remove(&(conn, id));
                let n = self.handovers.entry(r.unique_id.clone()).or_insert(0);
                *n += 1;
                if *n >= MAX_HANDOVERS {
                    let why = format!(
                        "{MAX_HANDOVERS} sub-agents went away while holding it; not handed over again"
                    );
                    self.refuse_request(r, "SubAgentGone", why).await;
                } else {
                    self.dispatch(r, since).await;
                }
            }
            if n > 0 {
                info!(subagent = %sub.name, requests = n, "requests it never confirmed wait for its topic's next sub-agent");
            }
            vec![]
        } else {
            unsent.into_iter().chain(sub.backlog.drain(..)).collect()
        };
        let n_back = back.len();
        for m in back {
            let ToSub::Request {
                id,
                unique_id,
                kind,
                target,
                method,
                args,
                ctx,
                timeout_ms,
                ..
            } = m
            else {
                continue;
            };
            let f = self.inflight.remove(&(conn, id));
            let r = Request {
                kind,
                target,
                method,
                args,
                ctx,
                msg_id: f.as_ref().map(|f| f.msg_id.clone()),
                unique_id,
                reply_to: f.and_then(|f| f.reply_to),
                timeout_ms,
            };
            self.dispatch(r, now).await;
        }
        if n_back > 0 {
            info!(subagent = %sub.name, requests = n_back, "requests it never read wait for its topic's next sub-agent");
        }
        let lost: Vec<(ConnId, u64)> = self
            .inflight
            .keys()
            .filter(|k| k.0 == conn)
            .copied()
            .collect();
        for k in lost {
            if let Some(f) = self.inflight.remove(&k) {
                let e = Failure::tether(
                    "SubAgentGone",
                    format!("sub-agent '{}' went away", sub.name),
                );
                self.reply(f.msg_id, f.reply_to, Err(e)).await;
            }
        }
        self.upstream.retain(|_, u| u.conn != conn);
        if !sub.topics.is_empty() {
            self.topics_changed().await;
        }
    }

    fn refuse(&self, conn: ConnId, message: String) {
        if let Some(s) = self.subs.get(&conn) {
            let _ = s.tx.try_send(ToSub::Error { message });
        }
    }

    async fn on_sub_message(&mut self, conn: ConnId, m: FromSub) {
        match m {
            FromSub::Register { name, topics, ack } => {
                for t in &topics {
                    if t.is_empty() || t == SUPERVISOR_TOPIC || t == AGENT_TOPIC || t.len() > 255 {
                        return self.refuse(conn, format!("topic '{t}' cannot be registered"));
                    }
                    if let Some(&owner) = self.topics.get(t)
                        && owner != conn
                    {
                        let who = self
                            .subs
                            .get(&owner)
                            .map_or("another sub-agent", |s| s.name.as_str());
                        return self
                            .refuse(conn, format!("topic '{t}' is already served by {who}"));
                    }
                }
                let Some(sub) = self.subs.get_mut(&conn) else {
                    return;
                };
                for t in &sub.topics {
                    self.topics.remove(t);
                }
                for t in &topics {
                    self.topics.insert(t.clone(), conn);
                }
                info!(subagent = %name, ?topics, ack, "sub-agent registered");
                sub.ack = ack;
                sub.name = name;
                sub.topics = topics.clone();
                let _ = sub.tx.try_send(ToSub::Registered {
                    topics: topics.clone(),
                });
                self.topics_changed().await;
                // What waited for these topics goes to it now, in order.
                for t in &topics {
                    for h in self.holding.take(t) {
                        self.dispatch(h.req, h.arrived).await;
                    }
                }
            }
            FromSub::Took { id } => {
                if !self.confirmed(conn, id).await {
                    self.refuse(conn, format!("took for unknown request {id}"));
                }
            }
            FromSub::Reply { id, result, error } => {
                // A call's reply confirms it (and comes after its receipt).
                self.confirmed(conn, id).await;
                match self.inflight.remove(&(conn, id)) {
                    Some(f) => {
                        let res = crate::rpc::join_result(result, error);
                        self.reply(f.msg_id, f.reply_to, res).await;
                    }
                    // A late reply: the call expired (its caller gave up)
                    // while the sub-agent worked. A normal race, not the
                    // sub-agent's fault: dropped without a refusal.
                    None if id < self.next_req => {
                        debug!(request = id, "late reply to an expired request dropped")
                    }
                    None => self.refuse(conn, format!("reply to unknown request {id}")),
                }
            }
            FromSub::Cast {
                target,
                method,
                args,
                ctx,
            } => {
                let r = upstream_request(Kind::Cast, target, method, args, ctx, None, None);
                self.cast_upstream(conn, r).await;
            }
            FromSub::Notify {
                target,
                message,
                ctx,
            } => {
                // The host checks the notification; the agent names it by
                // its event type for refusals and logs.
                let event_type = message
                    .get("event_type")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let r =
                    upstream_request(Kind::Notify, target, event_type, message, ctx, None, None);
                self.cast_upstream(conn, r).await;
            }
            FromSub::Call {
                id,
                target,
                method,
                args,
                ctx,
                timeout_ms,
            } => {
                if self.upstream.len() >= MAX_UPSTREAM {
                    if let Some(s) = self.subs.get(&conn) {
                        let e = Failure::tether(
                            "Overloaded",
                            format!("{MAX_UPSTREAM} upstream calls in progress"),
                        );
                        let _ = s.tx.try_send(ToSub::Result {
                            id,
                            result: None,
                            error: Some(e),
                        });
                    }
                    return;
                }
                let timeout = timeout_ms.map_or(DEFAULT_UPSTREAM_TIMEOUT, Duration::from_millis);
                let msg_id = new_unique_id();
                self.upstream.insert(
                    msg_id.clone(),
                    Upstream {
                        conn,
                        id,
                        expires: later(Instant::now(), timeout),
                    },
                );
                let ms = timeout.as_millis() as u64;
                let r = upstream_request(
                    Kind::Call,
                    target,
                    method,
                    args,
                    ctx,
                    Some(msg_id),
                    Some(ms),
                );
                self.send(&LinkMsg::Req(r)).await;
            }
        }
    }

    /// A sub-agent with `ack` confirmed request `id`: journal it, tell the
    /// host. False if it was not waiting for confirmation.
    async fn confirmed(&mut self, conn: ConnId, id: u64) -> bool {
        let Some((r, _)) = self
            .subs
            .get_mut(&conn)
            .and_then(|s| s.unconfirmed.remove(&id))
        else {
            return false;
        };
        crate::lock(&self.journal).record(&r.unique_id);
        self.handovers.remove(&r.unique_id);
        self.took(r.unique_id).await;
        true
    }

    /// The host did not pass a cast on: tell the sub-agent that sent it.
    fn on_refused(&mut self, unique_id: String, reason: String) {
        let Some((conn, target, method)) = self.casts.remove(&unique_id) else {
            return warn!(unique_id = %unique_id, reason = %reason, "the host refused a cast this agent no longer remembers");
        };
        warn!(topic = %target.topic, method = %method, reason = %reason, "the host refused a sub-agent's cast");
        if let Some(s) = self.subs.get(&conn) {
            let m = ToSub::CastRefused {
                target,
                method,
                reason,
            };
            if s.tx.try_send(m).is_err() {
                warn!(sub = %s.name, "sub-agent queue full: a cast refusal was only logged");
            }
        }
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

fn upstream_request(
    kind: Kind,
    target: Target,
    method: String,
    args: Value,
    ctx: Value,
    msg_id: Option<String>,
    timeout_ms: Option<u64>,
) -> Request {
    Request {
        kind,
        target,
        method,
        args,
        ctx,
        msg_id,
        unique_id: new_unique_id(),
        reply_to: None,
        timeout_ms,
    }
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
