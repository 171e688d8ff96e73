//! One VM instance on the host: its link, what its guest serves, its calls
//! in flight. Every message from the guest passes the enforcement point
//! ([`super::policy`]) first, and each decision is audited; the instance id
//! comes from the channel's file name.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{broadcast, oneshot};
use tracing::{debug, info, warn};

use super::broker::share::ShareUsed;
use super::broker::{NotTaken, Outlet, Upstream};
use super::policy::audit::{Record, clip};
use super::policy::enforcer::{TopicsDecision, topics_for};
use super::policy::store::PolicyHub;
use super::policy::{Decision, Effective, Enforcer, Mode};
use super::receipts::{Inserted, Outcome, Receipts};
use crate::link::SendError;
use crate::link::driver::{LinkReceiver, LinkSender, LinkTask, UnixConnector};
use crate::link::{Link, LinkEvent, LinkOptions, SessionConfig};
use crate::lock;
use crate::rpc::{Failure, Kind, LinkMsg, Reply, Request};

/// A guest-originated cast, as shown to `watch` clients.
pub type WatchEvent = Value;

/// Messages shared code (the broker bridge, the enforcement point) may queue
/// for one guest — answers to its calls, refusals of its casts — without
/// waiting on that guest's link window. A guest that does not read its link
/// cannot hold up the bridge for everyone: past this, what it would have got
/// is dropped and counted (`outbox_dropped`); its own calls then time out in
/// the guest.
pub const OUTBOX_CAP: usize = 1024;

/// How long an instance's own task waits for room in the guest's window for
/// the answers it makes itself (refusals at the enforcement point): a guest
/// that reads its link gets every refusal however fast it sends — its
/// sending slows to the pace it takes them — while one that does not read
/// cannot hold up its own task for longer: when the window takes nothing
/// for this long, what that task owes is dropped and counted like any other
/// answer (`outbox_dropped`).
const OWN_POST_WAIT: Duration = Duration::from_secs(5);

/// The most answers the instance's task makes itself (refusals) before it
/// sends them: those of one read of the link go together — one lock of
/// the link and one wake-up of its task for all, not one each — up to this
/// many (as many as the outbox holds: the same bound on memory).
const OWN_BATCH: usize = OUTBOX_CAP;

/// A call delivered into the guest, waiting for its reply.
struct Pending {
    tx: oneshot::Sender<Reply>,
    /// It came from the broker (its reply is published) rather than from
    /// the control socket (its reply stays on this host).
    to_broker: bool,
    /// The sealed handle the guest got with it: spent when the call is
    /// answered, so the guest answers each call once.
    handle: Option<String>,
}

/// One instance's numbers for the metrics endpoint (`docs/control.md`,
/// "Metrics", says what each means).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct InstanceMetrics {
    pub up: bool,
    pub unacked: u64,
    pub connects: u64,
    pub sent: u64,
    pub resent: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub pings: u64,
    pub probes: u64,
    pub peer_changes: u64,
    pub protocol_errors: u64,
    pub discarded_full: u64,
    pub garbage_bytes: u64,
    pub denied: u64,
    pub outbox_dropped: u64,
    pub calls_in_flight: u64,
    pub outstanding: u64,
    pub topics: u64,
    pub rtt: Option<std::time::Duration>,
    /// The agent's own numbers and their age ([`super::agent_stats`]).
    pub agent: Option<(super::agent_stats::AgentGauges, std::time::Duration)>,
}

/// One instance.
pub struct Instance {
    /// The instance uuid (the channel socket's file stem).
    pub id: String,
    /// [`Self::id`] for audit records (shared, not copied per record).
    audit_id: Arc<str>,
    /// Sends to the guest.
    pub tx: LinkSender,
    topics: Mutex<Vec<String>>,
    /// The guest's last topic announcement, kept to re-apply a changed
    /// policy without waiting for the guest to announce again.
    announced: Mutex<Vec<String>>,
    policy: Mutex<Arc<Effective>>,
    hub: Arc<PolicyHub>,
    pending: Mutex<HashMap<String, Pending>>,
    /// Requests sent into the guest that no sub-agent has taken yet.
    receipts: Receipts,
    /// Requests sent again to a new guest session.
    resent: AtomicU64,
    /// `took` messages for no outstanding request.
    unknown_receipts: AtomicU64,
    denied: AtomicU64,
    /// Replies to calls not pending here (they entered through another
    /// host's proxy before a migration), forwarded by their sealed handle.
    rerouted: AtomicU64,
    /// See [`OUTBOX_CAP`].
    outbox: tokio::sync::mpsc::Sender<bytes::Bytes>,
    outbox_dropped: AtomicU64,
    /// What this guest may make the proxy log ([`crate::logbudget`]).
    log: Mutex<crate::logbudget::LogBudget>,
    task: Mutex<Option<LinkTask>>,
    /// The agent's last reported numbers, and when ([`super::agent_stats`]).
    agent: Mutex<Option<(super::agent_stats::AgentGauges, std::time::Instant)>>,
}

impl Instance {
    /// Start the link to `socket` and the task that reads from it.
    pub fn spawn(
        id: String,
        socket: std::path::PathBuf,
        session: SessionConfig,
        hub: Arc<PolicyHub>,
        watch: broadcast::Sender<WatchEvent>,
        upstream: Option<Outlet>,
        read_bytes_per_sec: u64,
    ) -> Arc<Self> {
        let link = Link::spawn(
            UnixConnector { path: socket },
            LinkOptions {
                name: id.clone(),
                session,
                read_bytes_per_sec,
                ..LinkOptions::default()
            },
            crate::random_session_id(),
        );
        let Link { tx, rx, task } = link;
        let policy = hub.for_new(&id);
        let (outbox, mut out_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(OUTBOX_CAP);
        {
            // Ends when the instance (the outbox's sender) is dropped.
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(b) = out_rx.recv().await {
                    if tx.send(b).await.is_err() {
                        break;
                    }
                }
            });
        }
        let inst = Arc::new(Self {
            audit_id: id.as_str().into(),
            id,
            tx,
            topics: Mutex::new(vec![]),
            announced: Mutex::new(vec![]),
            policy: Mutex::new(policy.clone()),
            hub,
            pending: Mutex::new(HashMap::new()),
            receipts: Receipts::default(),
            resent: AtomicU64::new(0),
            unknown_receipts: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            rerouted: AtomicU64::new(0),
            outbox,
            outbox_dropped: AtomicU64::new(0),
            log: Mutex::default(),
            task: Mutex::new(Some(task)),
            agent: Mutex::new(None),
        });
        inst.apply_topics(&policy);
        let out = Outlets { watch, upstream };
        tokio::spawn(read_loop(inst.clone(), rx, Enforcer::new(policy), out));
        inst
    }

    /// Topics the guest's sub-agents serve (as the policy allows).
    pub fn topics(&self) -> Vec<String> {
        lock(&self.topics).clone()
    }

    /// The policy enforced for this instance.
    pub fn policy(&self) -> Arc<Effective> {
        lock(&self.policy).clone()
    }

    /// Enforce `p` from now on (a reload): the served topics follow at once.
    pub fn set_policy(&self, p: Arc<Effective>) {
        *lock(&self.policy) = p.clone();
        self.apply_topics(&p);
    }

    /// The topics served under `p`: its own in `one-way` mode, else those of
    /// the guest's last announcement that `p` allows.
    fn apply_topics(&self, p: &Effective) {
        let topics = if p.profile.mode == Mode::OneWay {
            p.profile.topics.clone()
        } else {
            topics_for(p, lock(&self.announced).clone()).0
        };
        *lock(&self.topics) = topics;
    }

    /// Register a call delivered into the guest under `local`, the only id
    /// the guest sees. Returns the sealed handle the guest gets with it in
    /// `reply_to` (none without reply keys) and the receiver of its reply.
    /// `reply_q` and `msg_id` are where the reply goes (`""` for a
    /// control-socket call, whose caller is on this host); `ttl`, how long
    /// the caller waits. `to_broker`: the call came from the broker (see
    /// [`Mode::OneWay`]).
    pub fn expect_call(
        &self,
        local: &str,
        to_broker: bool,
        (reply_q, msg_id): (&str, &str),
        ttl: std::time::Duration,
    ) -> (Option<String>, oneshot::Receiver<Reply>) {
        let expires = crate::unix_ms().saturating_add(ttl.as_millis() as u64);
        let handle = self
            .hub
            .store()
            .sealer
            .seal(&self.id, reply_q, msg_id, expires);
        let (tx, rx) = oneshot::channel();
        let p = Pending {
            tx,
            to_broker,
            handle: handle.clone(),
        };
        lock(&self.pending).insert(local.to_string(), p);
        (handle, rx)
    }

    /// Forget a call (timed out or failed to send).
    pub fn forget(&self, msg_id: &str) {
        lock(&self.pending).remove(msg_id);
    }

    /// Send `req` into the guest and keep it until the agent says a
    /// sub-agent took it (or refused it): the receiver learns which. Waits
    /// while [`super::receipts::MAX_OUTSTANDING_BYTES`] are outstanding
    /// and while the link's window is full; cancelled before it returns,
    /// nothing was queued. `call`: the local msg_id when `req` is a call
    /// (see [`Self::expect_call`]). A request whose unique id is already
    /// outstanding (a caller's retry) is not sent again.
    pub async fn send_request(
        &self,
        req: &Request,
        call: Option<&str>,
    ) -> Result<oneshot::Receiver<Outcome>, SendError> {
        let bytes = LinkMsg::Req(req.clone()).to_bytes();
        let Some(slot) = self.receipts.slot(bytes.len()).await else {
            return Err(SendError::Closed);
        };
        let rx =
            match self
                .receipts
                .insert(&req.unique_id, bytes.clone(), call.map(String::from), slot)
            {
                Inserted::Existing(rx) => return Ok(rx),
                Inserted::New(rx) => rx,
            };
        // Cancelled or failed before the link took it: nothing is kept.
        struct Unsent<'a>(&'a Receipts, &'a str, bool);
        impl Drop for Unsent<'_> {
            fn drop(&mut self) {
                if self.2 {
                    self.0.withdraw(self.1);
                }
            }
        }
        let mut guard = Unsent(&self.receipts, &req.unique_id, true);
        self.tx.send(bytes).await?;
        guard.2 = false;
        Ok(rx)
    }

    /// Stop keeping `unique_id` for a new session: its caller gave up, or
    /// the broker will deliver it again.
    pub fn withdraw(&self, unique_id: &str) {
        self.receipts.withdraw(unique_id);
    }

    /// The caller of call `msg_id` (request `unique_id`) gave up: its late
    /// answer is dropped and, if no sub-agent has taken it yet, the agent
    /// is told to withdraw it (`cancel`: queued on the link at once, and
    /// sent instead of the request to a new guest session). The receiver
    /// learns how that ended: `Refused` (reason `Cancelled: …`: it will
    /// never run) or `Taken` (too late). `None`: nothing was outstanding
    /// (a sub-agent took it already, or it was never queued).
    pub fn cancel_call(&self, msg_id: &str, unique_id: &str) -> Option<oneshot::Receiver<Outcome>> {
        self.forget(msg_id);
        let bytes = LinkMsg::Cancel {
            unique_id: unique_id.to_string(),
        }
        .to_bytes();
        let rx = self.receipts.cancel(unique_id, bytes.clone())?;
        // Not tied to the caller: a cancel must reach the link even if the
        // caller stops waiting for its outcome (bounded: one per entry of
        // the receipts table).
        let tx = self.tx.clone();
        tokio::spawn(async move {
            if let Err(e) = tx.send(bytes).await {
                debug!(error = %e, "a cancel could not be queued (the link closed)");
            }
        });
        Some(rx)
    }

    /// May a line this guest caused be logged now? (`Some(n)`: yes, `n`
    /// were suppressed before it.)
    fn may_log(&self) -> Option<u64> {
        lock(&self.log).allow(std::time::Instant::now())
    }

    /// A warning about this guest, within its log budget.
    pub fn log_warn(&self, what: &str) {
        if let Some(suppressed) = self.may_log() {
            warn!(instance = %self.id, suppressed, "{what}");
        }
    }

    /// Keep the agent's numbers, read at `at`.
    pub fn set_agent_gauges(&self, g: super::agent_stats::AgentGauges, at: std::time::Instant) {
        *lock(&self.agent) = Some((g, at));
    }

    /// Queue `bytes` for the guest without waiting (see [`OUTBOX_CAP`]).
    pub fn post(&self, bytes: bytes::Bytes) {
        if self.outbox.try_send(bytes).is_err() {
            let n = self.outbox_dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                warn!(instance = %self.id, dropped = n + 1, "the guest does not read its link: answers and refusals for it are dropped");
            }
        }
    }

    /// Send what this instance's own task owes the guest (see
    /// [`OWN_BATCH`]), waiting for its window as long as it takes some
    /// within [`OWN_POST_WAIT`]; what it does not take is dropped and
    /// counted.
    async fn post_own(&self, owed: &mut VecDeque<bytes::Bytes>) {
        while !owed.is_empty() {
            match tokio::time::timeout(OWN_POST_WAIT, self.tx.send_some(owed)).await {
                Ok(Ok(_)) => {}
                _ => {
                    let k = owed.len() as u64;
                    owed.clear();
                    let n = self.outbox_dropped.fetch_add(k, Ordering::Relaxed);
                    if (n + 1..=n + k).any(u64::is_power_of_two) {
                        warn!(instance = %self.id, dropped = n + k, "the guest does not read its link: answers and refusals for it are dropped");
                    }
                }
            }
        }
    }

    /// Whether the link is up (connected and past its handshake).
    pub fn linked(&self) -> bool {
        let s = self.tx.status();
        s.connected && s.established
    }

    /// The numbers the metrics endpoint exports for this instance.
    pub fn metrics(&self) -> InstanceMetrics {
        let s = self.tx.status();
        InstanceMetrics {
            up: s.connected && s.established,
            unacked: s.unacked as u64,
            connects: s.connects,
            sent: s.stats.sent,
            resent: s.stats.resent,
            delivered: s.stats.delivered,
            duplicates: s.stats.duplicates,
            pings: s.stats.pings,
            probes: s.stats.probes,
            peer_changes: s.stats.peer_changes,
            protocol_errors: s.stats.protocol_errors,
            discarded_full: s.stats.discarded_full,
            garbage_bytes: s.decode.skipped_bytes,
            denied: self.denied.load(Ordering::Relaxed),
            outbox_dropped: self.outbox_dropped.load(Ordering::Relaxed),
            calls_in_flight: lock(&self.pending).len() as u64,
            outstanding: self.receipts.len() as u64,
            topics: self.topics().len() as u64,
            rtt: s.stats.last_rtt,
            agent: lock(&self.agent).map(|(g, at)| (g, at.elapsed())),
        }
    }

    /// Status for `links`.
    pub fn status_json(&self) -> Value {
        let s = self.tx.status();
        let p = self.policy();
        json!({
            "instance": self.id,
            "connected": s.connected,
            "established": s.established,
            "session": format!("{:016x}", s.local),
            "peer_session": format!("{:016x}", s.peer),
            "next_seq": s.next_seq,
            "acked": s.acked,
            "expected": s.expected,
            "unacked": s.unacked,
            "connects": s.connects,
            "resent": s.stats.resent,
            "duplicates": s.stats.duplicates,
            "rewinds_deferred": s.stats.rewinds_deferred,
            "discarded_full": s.stats.discarded_full,
            "pings": s.stats.pings,
            "probes": s.stats.probes,
            "rtt_us": s.stats.last_rtt.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            "peer_changes": s.stats.peer_changes,
            "delivered": s.stats.delivered,
            "denied": self.denied.load(Ordering::Relaxed),
            "replies_rerouted": self.rerouted.load(Ordering::Relaxed),
            "garbage_bytes": s.decode.skipped_bytes,
            "last_frame_unix_ms": s.last_frame_unix_ms,
            "up_since_unix_ms": s.up_since_unix_ms,
            "topics": self.topics(),
            "profile": p.profile_name,
            "mode": p.profile.mode.name(),
            "calls_in_flight": lock(&self.pending).len(),
            "outstanding": self.receipts.len(),
            "resent_to_new_session": self.resent.load(Ordering::Relaxed),
            "unknown_receipts": self.unknown_receipts.load(Ordering::Relaxed),
            "outbox_dropped": self.outbox_dropped.load(Ordering::Relaxed),
        })
    }

    /// Stop the link.
    pub async fn close(&self) {
        let t = lock(&self.task).take();
        if let Some(t) = t {
            t.close().await;
        }
    }

    /// Fail the calls waiting for the guest, except `keep` (calls no
    /// sub-agent has taken yet: they go to the new session).
    fn fail_pending(&self, why: &str, keep: &HashSet<String>) {
        let pending: Vec<_> = lock(&self.pending)
            .extract_if(|k, _| !keep.contains(k))
            .collect();
        for (msg_id, p) in pending {
            let _ = p.tx.send(Reply::new(
                msg_id,
                None,
                Err(Failure::tether("GuestRestarted", why)),
            ));
        }
    }

    /// Audit one decision about a guest message of `bytes` bytes.
    fn audit(&self, mut r: Record, bytes: usize) {
        if r.decision == "deny" {
            self.denied.fetch_add(1, Ordering::Relaxed);
        }
        r.instance = self.audit_id.clone();
        r.profile = self.policy().profile_name.clone();
        self.hub.audit.record(r, bytes);
    }
}

/// An audit record for a guest request.
fn request_record(r: &Request, decision: &'static str, reason: Option<String>) -> Record {
    Record {
        kind: match r.kind {
            Kind::Call => "call",
            Kind::Cast => "cast",
            Kind::Fanout => "fanout",
            Kind::Notify => "notify",
        },
        exchange: r.target.exchange.as_deref().map(clip),
        topic: Some(clip(&r.target.topic)),
        server: r.target.server.as_deref().map(clip),
        method: Some(clip(&r.method)),
        decision,
        reason,
        ..Default::default()
    }
}

fn record(kind: &'static str, decision: &'static str, reason: Option<String>) -> Record {
    Record {
        kind,
        decision,
        reason,
        ..Default::default()
    }
}

/// Where guest messages go once allowed: `watch` clients always, the broker
/// bridge when one is configured.
struct Outlets {
    watch: broadcast::Sender<WatchEvent>,
    upstream: Option<Outlet>,
}

async fn read_loop(
    inst: Arc<Instance>,
    mut rx: LinkReceiver,
    mut enforcer: Enforcer,
    out: Outlets,
) {
    let mut owed = VecDeque::new();
    let mut next = rx.recv().await;
    while let Some(ev) = next {
        // Refusals go out before news of the link (a new guest session
        // must not get the old one's), and at most OWN_BATCH wait.
        if !matches!(ev, LinkEvent::Message(_)) || owed.len() >= OWN_BATCH {
            inst.post_own(&mut owed).await;
        }
        on_event(&inst, ev, &mut enforcer, &out, &mut owed);
        // The rest of what the same read brought, then the refusals they
        // earned, together.
        next = match rx.try_recv() {
            Some(ev) => Some(ev),
            None => {
                inst.post_own(&mut owed).await;
                rx.recv().await
            }
        };
    }
}

/// One event of the guest's link; refusals it earns go to `owed`.
fn on_event(
    inst: &Arc<Instance>,
    ev: LinkEvent,
    enforcer: &mut Enforcer,
    out: &Outlets,
    owed: &mut VecDeque<bytes::Bytes>,
) {
    match ev {
        LinkEvent::Message(b) => {
            enforcer.refresh(inst.policy());
            on_message(inst, &b, enforcer, out, owed)
        }
        LinkEvent::Up { peer } => {
            if let Some(suppressed) = inst.may_log() {
                info!(instance = %inst.id, peer = format_args!("{peer:016x}"), suppressed, "guest linked")
            }
        }
        LinkEvent::Down => {
            if let Some(suppressed) = inst.may_log() {
                info!(instance = %inst.id, suppressed, "guest link down")
            }
        }
        LinkEvent::PeerChanged {
            previous: Some(_), ..
        } => new_guest_session(inst),
        LinkEvent::PeerChanged { previous: None, .. } => {}
        LinkEvent::Expired { unacked } => {
            const WHY: &str = "the guest was unreachable for longer than the grace period";
            warn!(instance = %inst.id, lost = unacked.len(), "guest link expired after the grace period");
            inst.receipts.lose_all(WHY);
            inst.fail_pending(WHY, &HashSet::new());
        }
    }
}

/// The guest's agent restarted (a new session): what the old one served and
/// took died with it. Its topics are forgotten until the new one announces
/// its own; calls a sub-agent had taken fail (they may have run); every
/// request no sub-agent took yet — calls included — goes to the new session,
/// whose journal drops those the old one had taken.
fn new_guest_session(inst: &Arc<Instance>) {
    let p = inst.policy();
    lock(&inst.announced).clear();
    inst.apply_topics(&p);
    inst.fail_pending(
        "the guest agent restarted after a sub-agent took the call; it may or may not have run",
        &inst.receipts.calls(),
    );
    let again = inst.receipts.to_resend();
    if again.is_empty() {
        return;
    }
    if let Some(suppressed) = inst.may_log() {
        info!(instance = %inst.id, requests = again.len(), suppressed, "new guest session: sending the requests no sub-agent took again");
    }
    let inst = inst.clone();
    tokio::spawn(async move {
        for b in again {
            if inst.tx.send(b).await.is_err() {
                break;
            }
            inst.resent.fetch_add(1, Ordering::Relaxed);
        }
    });
}

/// The enforcement point: every guest message passes here first. Refusals
/// it makes itself go to `owed`.
fn on_message(
    inst: &Instance,
    b: &[u8],
    enforcer: &mut Enforcer,
    out: &Outlets,
    owed: &mut VecDeque<bytes::Bytes>,
) {
    let size = b.len();
    let msg = match LinkMsg::from_bytes(b) {
        Ok(m) => m,
        Err(e) => {
            enforcer.charge_only(size);
            debug!(instance = %inst.id, error = ?e.to_string(), "malformed guest message");
            return inst.audit(
                record("malformed", "deny", Some(clip(&e.to_string()))),
                size,
            );
        }
    };
    match msg {
        LinkMsg::Rep(r) => on_reply(inst, r, size, enforcer, out),
        LinkMsg::Topics { topics } => on_topics(inst, topics, size, enforcer),
        // Receipts for our own requests are not charged to the guest's
        // limits (like replies to our calls: bounded by what we sent);
        // those for nothing outstanding are.
        // A taken call leaves the receipts table, so a new guest session
        // fails it rather than sending it again.
        LinkMsg::Took { unique_id } => {
            if inst.receipts.settle(&unique_id, Outcome::Taken).is_none() {
                // Late (already settled, withdrawn) or invented: either way
                // it changes nothing. Counted, not logged per message.
                enforcer.charge_only(size);
                inst.unknown_receipts.fetch_add(1, Ordering::Relaxed);
            }
        }
        LinkMsg::Refused { unique_id, reason } => {
            let reason = clip(&reason);
            let settled = inst
                .receipts
                .settle(&unique_id, Outcome::Refused(reason.clone()));
            if let Some(Some(call)) = &settled {
                // A call the agent would not run (expired, no sub-agent):
                // its caller, if still waiting, learns why.
                let p = lock(&inst.pending).remove(call);
                if let Some(p) = p {
                    let (class, message) = reason.split_once(": ").unwrap_or(("Refused", &reason));
                    let f = Failure::tether(&clip(class), message);
                    let _ = p.tx.send(Reply::new(call.clone(), None, Err(f)));
                }
            }
            let decision = if settled.is_some() {
                "allow"
            } else {
                enforcer.charge_only(size);
                "ignore"
            };
            let r = Record {
                unique_id: Some(clip(&unique_id)),
                ..record("refused", decision, Some(reason))
            };
            inst.audit(r, size);
        }
        LinkMsg::Req(r) => on_request(inst, r, size, enforcer, out, owed),
        LinkMsg::Cancel { unique_id } => {
            // Only the host cancels (its callers' requests).
            enforcer.charge_only(size);
            let r = Record {
                unique_id: Some(clip(&unique_id)),
                ..record(
                    "cancel",
                    "deny",
                    Some("a guest cannot cancel requests".into()),
                )
            };
            inst.audit(r, size);
        }
    }
}

fn on_reply(inst: &Instance, mut r: Reply, size: usize, enforcer: &mut Enforcer, out: &Outlets) {
    let pending = lock(&inst.pending).get(&r.msg_id).map(|p| p.to_broker);
    if let Some(to_broker) = pending {
        if !r.ending {
            // The proxy sends the caller its own heartbeats.
            return inst.audit(record("heartbeat", "ignore", None), size);
        }
        match enforcer.pending_reply(to_broker) {
            Decision::Allow => {
                inst.receipts.settle_call(&r.msg_id);
                let p = lock(&inst.pending).remove(&r.msg_id);
                if let Some(p) = p {
                    if let Some(h) = &p.handle {
                        enforcer.spend(h, &inst.hub.store().sealer);
                    }
                    let _ = p.tx.send(r);
                }
                inst.audit(record("reply", "allow", None), size);
            }
            Decision::Deny(why) => inst.audit(record("reply", "deny", Some(why)), size),
        }
        return;
    }
    // Not pending here: the call entered through another host's proxy
    // before a migration (its sealed handle says where it goes), or the
    // reply is forged, replayed, expired or late.
    if !r.ending {
        enforcer.charge_only(size);
        return inst.audit(record("heartbeat", "ignore", None), size);
    }
    let sealer = &inst.hub.store().sealer;
    match enforcer.unsolicited_reply(&r, size, sealer, crate::unix_ms()) {
        Ok(o) => {
            // Its call is pending here after all (the guest named another
            // id): answered through the pending path, once.
            let mut pending = lock(&inst.pending);
            let local = pending
                .iter()
                .find(|(_, p)| p.handle.is_some() && p.handle == r.reply_to)
                .map(|(k, _)| k.clone());
            if let Some(p) = local.and_then(|k| pending.remove(&k)) {
                drop(pending);
                let _ = p.tx.send(r);
                return inst.audit(record("reply", "allow", None), size);
            }
            drop(pending);
            r.msg_id = o.msg_id;
            if o.reply_q.is_empty() {
                // A control-socket call of another host's proxy: its caller
                // is there; here it is shown to watchers, never published.
                r.reply_to = None;
                let _ = out.watch.send(json!({"instance": inst.id, "reply": r}));
                inst.rerouted.fetch_add(1, Ordering::Relaxed);
                let why = "sealed handle of a control-socket call: shown to watchers".to_string();
                return inst.audit(record("reply", "allow", Some(why)), size);
            }
            r.reply_to = Some(o.reply_q);
            let _ = out.watch.send(json!({"instance": inst.id, "reply": r}));
            match &out.upstream {
                Some(up) if up.offer(Upstream::Reply(r), size).is_ok() => {
                    inst.rerouted.fetch_add(1, Ordering::Relaxed);
                    inst.audit(record("reply", "allow", Some("sealed handle".into())), size);
                }
                Some(_) => {
                    let why = "the broker bridge's queue is full".to_string();
                    inst.audit(record("reply", "deny", Some(why)), size);
                }
                None => {
                    let why = "no broker configured".to_string();
                    inst.audit(record("reply", "deny", Some(why)), size);
                }
            }
        }
        Err(why) => {
            debug!(instance = %inst.id, reason = ?why, "guest reply refused");
            inst.audit(record("reply", "deny", Some(why)), size);
        }
    }
}

fn on_topics(inst: &Instance, topics: Vec<String>, size: usize, enforcer: &mut Enforcer) {
    match enforcer.topics(topics.clone(), size) {
        TopicsDecision::Ignore => {
            let why = "one-way: the instance's topics come from its host-side policy".to_string();
            inst.audit(record("topics", "ignore", Some(why)), size);
        }
        TopicsDecision::Deny(why) => inst.audit(record("topics", "deny", Some(why)), size),
        TopicsDecision::Allow { allowed, refused } => {
            for (t, why) in refused {
                let r = Record {
                    topic: Some(clip(&t)),
                    ..record("topics", "deny", Some(why))
                };
                inst.audit(r, size);
            }
            if let Some(suppressed) = inst.may_log() {
                info!(instance = %inst.id, topics = ?allowed, suppressed, "guest topics");
            }
            let r = Record {
                topic: Some(clip(&allowed.join(","))),
                ..record("topics", "allow", None)
            };
            inst.audit(r, size);
            *lock(&inst.announced) = topics;
            *lock(&inst.topics) = allowed;
        }
    }
}

fn on_request(
    inst: &Instance,
    mut r: Request,
    size: usize,
    enforcer: &mut Enforcer,
    out: &Outlets,
    owed: &mut VecDeque<bytes::Bytes>,
) {
    if let Decision::Deny(reason) = enforcer.request(&r, size) {
        debug!(instance = %inst.id, reason = ?reason, "guest request refused");
        // A refused call still gets its one answer; a refused cast a
        // notice, so the sub-agent that cast learns why.
        let m = match &r.msg_id {
            Some(msg_id) if r.kind == Kind::Call => LinkMsg::Rep(Reply::new(
                msg_id.clone(),
                r.reply_to.clone(),
                Err(Failure::tether("Denied", &reason)),
            )),
            _ => LinkMsg::Refused {
                unique_id: std::mem::take(&mut r.unique_id),
                reason: format!("Denied: {reason}"),
            },
        };
        owed.push_back(m.to_bytes());
        return inst.audit(request_record(&r, "deny", Some(reason)), size);
    }
    // Context is the host's: allowed guest keys, static context, identity.
    r.ctx = enforcer.context(&r.ctx);
    if r.kind == Kind::Notify {
        enforcer.stamp_notification(&mut r, &inst.id);
    }
    inst.audit(request_record(&r, "allow", None), size);
    if r.kind != Kind::Call {
        let _ = out.watch.send(json!({
            "instance": inst.id,
            "target": r.target,
            "method": r.method,
            "args": r.args,
            "ctx": r.ctx,
            "unique_id": r.unique_id,
        }));
    }
    let Some(up) = &out.upstream else {
        // No broker: a call has nowhere to go; answer it rather
        // than leave it hanging. Casts went to watchers.
        if let Some(msg_id) = r.msg_id {
            let f = Failure::tether(
                "NoRoute",
                "no control-plane route for guest calls on this proxy (no broker configured)",
            );
            answer(inst, msg_id, r.reply_to, f);
        }
        return;
    };
    let (msg_id, reply_to, unique_id) = (r.msg_id.clone(), r.reply_to.clone(), r.unique_id.clone());
    let m = if r.kind == Kind::Call {
        Upstream::Call {
            instance: inst.id.clone(),
            request: r,
            ticket: None,
        }
    } else {
        Upstream::Cast {
            instance: inst.id.clone(),
            request: r,
            ticket: None,
        }
    };
    if let Err(not) = up.offer(m, size) {
        let why = match not {
            NotTaken::ShareUsed(ShareUsed::Messages(n)) => {
                format!("this instance already has {n} messages waiting for the broker")
            }
            NotTaken::ShareUsed(ShareUsed::Bytes(n)) => {
                format!("this instance already has {n} bytes of messages waiting for the broker")
            }
            NotTaken::Full => "too many guest messages wait for the broker".to_string(),
        };
        debug!(instance = %inst.id, reason = %why, "guest request refused");
        let m = match msg_id {
            Some(msg_id) => LinkMsg::Rep(Reply::new(
                msg_id,
                reply_to,
                Err(Failure::tether("BrokerUnavailable", why)),
            )),
            None => LinkMsg::Refused {
                unique_id,
                reason: format!("BrokerUnavailable: {why}"),
            },
        };
        owed.push_back(m.to_bytes());
    }
}

/// Tell the guest that its cast `unique_id` went no further, and why
/// (queued without waiting: [`Instance::post`]).
pub(crate) fn refuse_cast(inst: &Instance, unique_id: String, reason: String) {
    inst.post(LinkMsg::Refused { unique_id, reason }.to_bytes());
}

/// Answer a guest's call with a failure (queued without waiting).
pub(crate) fn answer(inst: &Instance, msg_id: String, reply_to: Option<String>, f: Failure) {
    let rep = LinkMsg::Rep(Reply::new(msg_id, reply_to, Err(f)));
    inst.post(rep.to_bytes());
}
