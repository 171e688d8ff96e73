//! One VM instance on the host: its link, what its guest serves, its calls
//! in flight. Every message from the guest passes the enforcement point
//! first; the instance id comes from the channel's file name.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::sync::{broadcast, oneshot};
use tracing::{debug, info, warn};

use super::broker::{Outlet, Upstream};
use super::policy::{Decision, Enforcer, PolicyConfig};
use crate::link::driver::{LinkReceiver, LinkSender, LinkTask, UnixConnector};
use crate::link::{Link, LinkEvent, LinkOptions, SessionConfig};
use crate::lock;
use crate::rpc::{Failure, Kind, LinkMsg, Reply};

/// A guest-originated cast, as shown to `watch` clients.
pub type WatchEvent = Value;

/// One instance.
pub struct Instance {
    /// The instance uuid (the channel socket's file stem).
    pub id: String,
    /// Sends to the guest.
    pub tx: LinkSender,
    topics: Mutex<Vec<String>>,
    pending: Mutex<HashMap<String, oneshot::Sender<Reply>>>,
    denied: AtomicU64,
    /// Replies to calls not pending here (they entered through another
    /// host's proxy before a migration), forwarded by their `reply_to`.
    rerouted: AtomicU64,
    task: Mutex<Option<LinkTask>>,
}

impl Instance {
    /// Start the link to `socket` and the task that reads from it.
    pub fn spawn(
        id: String,
        socket: std::path::PathBuf,
        session: SessionConfig,
        policy: PolicyConfig,
        watch: broadcast::Sender<WatchEvent>,
        upstream: Option<Outlet>,
    ) -> Arc<Self> {
        let link = Link::spawn(
            UnixConnector { path: socket },
            LinkOptions {
                name: id.clone(),
                session,
                ..LinkOptions::default()
            },
            crate::random_session_id(),
        );
        let Link { tx, rx, task } = link;
        let inst = Arc::new(Self {
            id,
            tx,
            topics: Mutex::new(vec![]),
            pending: Mutex::new(HashMap::new()),
            denied: AtomicU64::new(0),
            rerouted: AtomicU64::new(0),
            task: Mutex::new(Some(task)),
        });
        let out = Outlets { watch, upstream };
        tokio::spawn(read_loop(inst.clone(), rx, Enforcer::new(policy), out));
        inst
    }

    /// Topics the guest's sub-agents serve.
    pub fn topics(&self) -> Vec<String> {
        lock(&self.topics).clone()
    }

    /// Register a call; its reply will come through the returned receiver.
    pub fn expect_reply(&self, msg_id: &str) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(msg_id.to_string(), tx);
        rx
    }

    /// Forget a call (timed out or failed to send).
    pub fn forget(&self, msg_id: &str) {
        lock(&self.pending).remove(msg_id);
    }

    /// Status for `links`.
    pub fn status_json(&self) -> Value {
        let s = self.tx.status();
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
            "pings": s.stats.pings,
            "peer_changes": s.stats.peer_changes,
            "delivered": s.stats.delivered,
            "denied": self.denied.load(Ordering::Relaxed),
            "replies_rerouted": self.rerouted.load(Ordering::Relaxed),
            "garbage_bytes": s.decode.skipped_bytes,
            "last_frame_unix_ms": s.last_frame_unix_ms,
            "up_since_unix_ms": s.up_since_unix_ms,
            "topics": self.topics(),
            "calls_in_flight": lock(&self.pending).len(),
        })
    }

    /// Stop the link.
    pub async fn close(&self) {
        let t = lock(&self.task).take();
        if let Some(t) = t {
            t.close().await;
        }
    }

    fn fail_pending(&self, why: &str) {
        let pending: Vec<_> = lock(&self.pending).drain().collect();
        for (msg_id, tx) in pending {
            let _ = tx.send(Reply::new(
                msg_id,
                None,
                Err(Failure::tether("GuestRestarted", why)),
            ));
        }
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
    while let Some(ev) = rx.recv().await {
        match ev {
            LinkEvent::Message(b) => on_message(&inst, &b, &mut enforcer, &out).await,
            LinkEvent::Up { peer } => {
                info!(instance = %inst.id, peer = format_args!("{peer:016x}"), "guest linked")
            }
            LinkEvent::Down => info!(instance = %inst.id, "guest link down"),
            LinkEvent::PeerChanged {
                previous: Some(_), ..
            } => {
                // Calls the old agent had accepted died with it.
                inst.fail_pending("the guest agent restarted; the call may or may not have run");
            }
            LinkEvent::PeerChanged { previous: None, .. } => {}
            LinkEvent::Expired { unacked } => {
                warn!(instance = %inst.id, lost = unacked.len(), "guest link expired after the grace period");
                inst.fail_pending("the guest was unreachable for longer than the grace period");
            }
        }
    }
}

/// The enforcement point: every guest message passes here first.
async fn on_message(inst: &Instance, b: &[u8], enforcer: &mut Enforcer, out: &Outlets) {
    let msg = match LinkMsg::from_bytes(b) {
        Ok(m) => m,
        Err(e) => {
            inst.denied.fetch_add(1, Ordering::Relaxed);
            warn!(target: "audit", instance = %inst.id, decision = "deny", reason = %e, "malformed guest message");
            return;
        }
    };
    let answers_call =
        matches!(&msg, LinkMsg::Rep(r) if lock(&inst.pending).contains_key(&r.msg_id));
    if let Decision::Deny(reason) = enforcer.check(&msg, b.len(), answers_call) {
        inst.denied.fetch_add(1, Ordering::Relaxed);
        warn!(target: "audit", instance = %inst.id, decision = "deny", reason = %reason, "guest message refused");
        // A refused call still gets its one answer; a refused cast a
        // notice, so the sub-agent that cast learns why.
        if let LinkMsg::Req(r) = &msg {
            match &r.msg_id {
                Some(msg_id) if r.kind == Kind::Call => {
                    let f = Failure::tether("Denied", reason);
                    answer(inst, msg_id.clone(), r.reply_to.clone(), f).await;
                }
                _ => refuse_cast(inst, r.unique_id.clone(), format!("Denied: {reason}")).await,
            }
        }
        return;
    }
    match msg {
        LinkMsg::Rep(r) => {
            let waiter = lock(&inst.pending).remove(&r.msg_id);
            match waiter {
                Some(tx) => {
                    let _ = tx.send(r);
                }
                None => {
                    // A call this proxy did not send (it entered through
                    // another host's proxy before a migration) or one whose
                    // caller gave up: routed by its reply_to when a broker is
                    // there, and shown to watchers rather than dropped.
                    debug!(instance = %inst.id, msg_id = %r.msg_id, "reply to a call not pending here");
                    let _ = out.watch.send(json!({
                        "instance": inst.id,
                        "reply": r,
                    }));
                    if let (Some(up), Some(_)) = (&out.upstream, &r.reply_to) {
                        if up.offer(Upstream::Reply(r)) {
                            inst.rerouted.fetch_add(1, Ordering::Relaxed);
                        } else {
                            warn!(instance = %inst.id, "reply for the broker refused: the bridge's queue is full");
                        }
                    }
                }
            }
        }
        LinkMsg::Topics { topics } => {
            let (topics, refused) = enforcer.allowed_topics(topics);
            if !refused.is_empty() {
                inst.denied.fetch_add(1, Ordering::Relaxed);
                warn!(target: "audit", instance = %inst.id, decision = "deny", ?refused, "guest topics not in policy.allowed_topics refused");
            }
            info!(instance = %inst.id, ?topics, "guest topics");
            *lock(&inst.topics) = topics;
        }
        // Host → guest only: the enforcement point above denied it.
        LinkMsg::Refused { .. } => {}
        LinkMsg::Req(mut r) => {
            // Identity is stamped here, whatever the guest claims.
            if let Value::Object(m) = &mut r.ctx {
                m.insert("tether_instance".into(), json!(inst.id));
            } else {
                r.ctx = json!({"tether_instance": inst.id});
            }
            debug!(target: "audit", instance = %inst.id, decision = "allow", kind = ?r.kind, method = %r.method, "guest request");
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
                    answer(inst, msg_id, r.reply_to, f).await;
                }
                return;
            };
            let (msg_id, reply_to, method, unique_id) = (
                r.msg_id.clone(),
                r.reply_to.clone(),
                r.method.clone(),
                r.unique_id.clone(),
            );
            let m = if r.kind == Kind::Call {
                Upstream::Call {
                    instance: inst.id.clone(),
                    request: r,
                }
            } else {
                Upstream::Cast {
                    instance: inst.id.clone(),
                    request: r,
                }
            };
            if !up.offer(m) {
                warn!(target: "audit", instance = %inst.id, method = %method, "guest request refused: the broker bridge's queue is full");
                const WHY: &str = "BrokerUnavailable: too many guest messages wait for the broker";
                match msg_id {
                    Some(msg_id) => {
                        let f = Failure::tether("BrokerUnavailable", WHY);
                        answer(inst, msg_id, reply_to, f).await;
                    }
                    None => refuse_cast(inst, unique_id, WHY.into()).await,
                }
            }
        }
    }
}

/// Tell the guest that its cast `unique_id` went no further, and why.
pub(crate) async fn refuse_cast(inst: &Instance, unique_id: String, reason: String) {
    let _ = inst
        .tx
        .send(LinkMsg::Refused { unique_id, reason }.to_bytes())
        .await;
}

/// Answer a guest's call with a failure.
pub(crate) async fn answer(inst: &Instance, msg_id: String, reply_to: Option<String>, f: Failure) {
    let rep = LinkMsg::Rep(Reply::new(msg_id, reply_to, Err(f)));
    let _ = inst.tx.send(rep.to_bytes()).await;
}
