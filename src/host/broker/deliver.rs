//! Deliveries from RabbitMQ into guests: acknowledged to the broker only
//! once a sub-agent took them (the agent's `took`, not the link's ACK);
//! replies and heartbeats back.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions, BasicRejectOptions};
use lapin::types::AMQPValue;
use tracing::{debug, warn};

use super::{DEFAULT_CALL_TIMEOUT, GUEST_ACK_BOUND, StreamOffsets, props, short, wire};
use crate::host::Proxy;
use crate::host::instance::Instance;
use crate::host::policy::Mode;
use crate::host::receipts::Outcome;
use crate::lock;
use crate::rpc::{Failure, Kind, Reply, Request, new_unique_id};

/// Who a consumer's deliveries go to.
#[derive(Clone)]
pub(super) enum Target {
    /// One instance (its `<topic>.<instance>` queue).
    One(Arc<Instance>),
    /// Every local instance serving the topic, at delivery time.
    Fanout {
        /// A stream fanout: where to record the offset of what was handled.
        stream: Option<StreamOffsets>,
    },
}

/// What every delivery of one consumer needs.
#[derive(Clone)]
struct Route {
    proxy: Arc<Proxy>,
    target: Target,
    topic: String,
    answers_ch: Channel,
    grace: Duration,
}

/// Queue each delivery of `consumer` into its guest in order, then wait for
/// it in a task of its own (calls run concurrently; prefetch bounds how
/// many).
pub(super) async fn consume(
    mut consumer: lapin::Consumer,
    proxy: Arc<Proxy>,
    target: Target,
    topic: String,
    answers_ch: Channel,
    grace_ms: u64,
) {
    let route = Route {
        proxy,
        target,
        topic,
        answers_ch,
        grace: Duration::from_millis(grace_ms),
    };
    while let Some(d) = consumer.next().await {
        match d {
            Ok(d) => {
                // Into the guest in the queue's order; the waits for the
                // sub-agents run concurrently.
                if let Some(rest) = deliver(d, route.clone()).await {
                    tokio::spawn(rest);
                }
            }
            Err(e) => {
                debug!(topic = ?route.topic, error = %e, "consumer ended");
                break;
            }
        }
    }
}

/// Wait until a sub-agent took (or the agent refused) what `taken` stands
/// for, or decide it will not be: `false` when the link stayed down for
/// `grace`, the guest took nothing for [`GUEST_ACK_BOUND`], or the link
/// expired.
async fn guest_took(inst: &Instance, taken: Taken, grace: Duration) -> bool {
    let down_too_long = async {
        let mut st = inst.tx.watch_status();
        loop {
            if st.borrow_and_update().established {
                if st.changed().await.is_err() {
                    return;
                }
                continue;
            }
            if tokio::time::timeout(grace, async {
                while !st.borrow_and_update().established {
                    if st.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            })
            .await
            .is_err()
            {
                return;
            }
        }
    };
    tokio::select! {
        r = taken => match r {
            Ok(Outcome::Taken) => true,
            // Refused by the agent (audited): handled, as a refusal.
            Ok(Outcome::Refused(why)) => {
                warn!(instance = %inst.id, reason = %why, "the guest refused a delivery");
                true
            }
            Ok(Outcome::Lost(_)) | Err(_) => false,
        },
        _ = down_too_long => false,
        _ = tokio::time::sleep(GUEST_ACK_BOUND) => false,
    }
}

type Taken = tokio::sync::oneshot::Receiver<Outcome>;

/// How long a fanout waits to enter one guest's link (room in its table of
/// untaken requests): a guest that takes nothing misses the fanout rather
/// than hold it up for the others.
pub const FANOUT_QUEUE_BOUND: Duration = Duration::from_secs(2);
/// How long a fanout's acknowledgement waits for one guest to take it;
/// past that the proxy keeps it for that guest (and gives it to a
/// restarted agent) and acknowledges it for the others.
pub const FANOUT_TAKE_BOUND: Duration = Duration::from_secs(5);

/// One guest missed a fanout or was slow to take it: counted, and logged
/// within the instance's log budget.
fn missed(proxy: &Proxy, inst: &Instance, why: &str) {
    proxy.bridge.update(|s| s.fanouts_missed += 1);
    inst.log_warn(&format!("fanout: {why}"));
}

/// Queue `req` into `inst`'s link, in the order of the deliveries; bounded
/// by [`GUEST_ACK_BOUND`] (a guest that takes nothing does not hold its
/// consumer for ever).
async fn queue_to(inst: &Instance, req: &Request, call: Option<&str>) -> Option<Taken> {
    match tokio::time::timeout(GUEST_ACK_BOUND, inst.send_request(req, call)).await {
        Ok(Ok(t)) => Some(t),
        Ok(Err(e)) => {
            warn!(instance = %inst.id, error = %e, "cannot queue a delivery for the guest");
            None
        }
        Err(_) => {
            warn!(instance = %inst.id, "the guest took no request for too long: delivery not queued");
            None
        }
    }
}

/// Give `d` back to the broker for another try (another proxy, later).
async fn requeue(d: &lapin::message::Delivery, proxy: &Proxy) {
    let opts = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    // One that cannot go (the connection is gone) requeues it all the same.
    if let Ok(true) = d.acker.nack(opts).await {
        proxy.bridge.update(|s| s.requeued += 1);
    }
}

/// Acknowledge `d` to the broker: a sub-agent took it.
/// Counted once the broker has the ack: one that cannot go (the connection
/// is gone) leaves the message with the broker, which delivers it again.
async fn ack(d: &lapin::message::Delivery, proxy: &Proxy) {
    match d.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => proxy.bridge.update(|s| s.delivered += 1),
        Ok(false) => debug!("an ack could not go: the broker delivers the message again"),
        Err(e) => debug!(error = %e, "an ack could not go: the broker delivers the message again"),
    }
}

/// What is left of a delivery once it is queued into the guest(s).
type Rest = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Queue `d` into its guest(s) — in the order the broker delivered — and
/// return the rest (waiting for the sub-agents to take it, acknowledging,
/// relaying a call's reply), which runs concurrently with later deliveries.
async fn deliver(d: lapin::message::Delivery, route: Route) -> Option<Rest> {
    let Route {
        proxy,
        target,
        topic,
        answers_ch,
        grace,
    } = route;
    let expiration = d
        .properties
        .expiration()
        .as_ref()
        .and_then(|s| s.as_str().parse::<u64>().ok());
    let (server, fanout) = match &target {
        Target::One(i) => (Some(i.id.as_str()), false),
        Target::Fanout { .. } => (None, true),
    };
    let inc = match wire::decode_request(&d.data, &topic, server, expiration, fanout) {
        Ok(i) => i,
        Err(e) => {
            warn!(topic = ?topic, error = %e, "malformed oslo message rejected");
            let _ = d.acker.reject(BasicRejectOptions { requeue: false }).await;
            return None;
        }
    };
    let inst = match target {
        Target::Fanout { stream } => {
            let targets: Vec<_> = proxy
                .instances()
                .into_iter()
                .filter(|i| i.tx.status().established && i.topics().contains(&topic))
                .collect();
            // Into every guest at once, each bounded: one guest that takes
            // nothing does not hold the fanout up for the others.
            let queued = futures_util::future::join_all(targets.into_iter().map(|i| {
                let req = &inc.request;
                async move {
                    let t =
                        tokio::time::timeout(FANOUT_QUEUE_BOUND, i.send_request(req, None)).await;
                    (i, t)
                }
            }))
            .await;
            let uid = inc.request.unique_id;
            return Some(Box::pin(async move {
                let waits = queued.into_iter().map(|(i, t)| {
                    let uid = uid.clone();
                    let proxy = proxy.clone();
                    async move {
                        let fate = match t {
                            Ok(Ok(rx)) => match tokio::time::timeout(
                                FANOUT_TAKE_BOUND,
                                guest_took(&i, rx, grace),
                            )
                            .await
                            {
                                Ok(true) => true,
                                Ok(false) => false,
                                // Queued, not yet taken: the proxy keeps it
                                // for that guest (receipts); the others'
                                // delivery is not held up by it.
                                Err(_) => {
                                    missed(&proxy, &i, "not taken in time; kept for it");
                                    true
                                }
                            },
                            Ok(Err(_)) => false,
                            // Its table of untaken requests stayed full: it
                            // misses this fanout (as an oslo server whose
                            // fanout queue overflowed).
                            Err(_) => {
                                missed(&proxy, &i, "the guest takes nothing; not delivered to it");
                                true
                            }
                        };
                        if !fate {
                            // The broker gives it again (or, from a stream,
                            // it is missed): not kept for a new session.
                            i.withdraw(&uid);
                        }
                        fate
                    }
                });
                let ok = futures_util::future::join_all(waits).await;
                if let Some(offsets) = stream {
                    // A stream keeps every message for every reader: nothing
                    // to requeue. Go on after this offset on a reconnect.
                    if let Some(AMQPValue::LongLongInt(o)) = d
                        .properties
                        .headers()
                        .as_ref()
                        .and_then(|h| h.inner().get("x-stream-offset"))
                    {
                        let mut m = lock(&offsets);
                        let next = m.entry(topic.clone()).or_insert(0);
                        *next = (*next).max(o.saturating_add(1));
                    }
                    if !ok.iter().all(|x| *x) {
                        warn!(topic = ?topic, unique_id = ?uid, "a fanout from the stream did not reach every guest serving its topic");
                    }
                    ack(&d, &proxy).await;
                } else if ok.iter().all(|x| *x) {
                    ack(&d, &proxy).await;
                } else {
                    // Some guests did not take it: those that did drop the
                    // redelivery by its unique id.
                    requeue(&d, &proxy).await;
                }
            }));
        }
        Target::One(i) => i,
    };
    let mut req = inc.request;
    let limit = expiration.map_or(DEFAULT_CALL_TIMEOUT, Duration::from_millis);
    // A call: the guest gets a local id and, with reply keys, a sealed
    // handle — never the caller's msg_id or reply queue.
    let waiter = match (req.kind, req.msg_id.take(), &inc.reply_q) {
        (Kind::Call, Some(oslo_id), Some(reply_q)) => {
            if inst.policy().profile.mode == Mode::OneWay {
                // The guest may not answer: refuse here rather than run a
                // request whose answer cannot come back.
                let f = Failure::tether(
                    "Denied",
                    format!(
                        "instance {} is one-way: it answers no calls from the broker",
                        inst.id
                    ),
                );
                let r = Reply::new(oslo_id, None, Err(f));
                publish_reply(&answers_ch, reply_q, wire::encode_reply(&r)).await;
                ack(&d, &proxy).await;
                return None;
            }
            let local = new_unique_id();
            let (handle, rx) = inst.expect_call(&local, true, (reply_q, &oslo_id), limit);
            req.reply_to = handle;
            req.msg_id = Some(local.clone());
            Some((oslo_id, local, rx))
        }
        // A call without a reply queue cannot be answered: delivered as a cast.
        (Kind::Call, _, _) => {
            req.kind = Kind::Cast;
            None
        }
        _ => None,
    };
    let started = tokio::time::Instant::now();
    let queued = queue_to(&inst, &req, waiter.as_ref().map(|w| w.1.as_str())).await;
    // A monitored call gets heartbeats from the moment the proxy has it
    // (oslo's server heartbeats once it received the message) until it is
    // answered or given back: a guest slow to take it is no reason for its
    // caller to give up.
    let beat = match (&waiter, &inc.reply_q) {
        (Some((msg_id, _, _)), Some(reply_q)) => inc.monitor_secs.filter(|s| *s > 0.0).map(|s| {
            (
                Duration::from_secs_f64(s / 2.0),
                msg_id.clone(),
                reply_q.clone(),
            )
        }),
        _ => None,
    };
    let hb_ch = answers_ch.clone();
    let work = async move {
        let ok = match queued {
            Some(t) => guest_took(&inst, t, grace).await,
            None => false,
        };
        if !ok {
            match &waiter {
                // Its caller has given up by now (the broker drops the
                // requeued, expired message): it must not run later.
                Some((_, local, _)) if started.elapsed() >= limit => {
                    let _ = inst.cancel_call(local, &req.unique_id);
                }
                Some((_, local, _)) => {
                    inst.forget(local);
                    inst.withdraw(&req.unique_id);
                }
                None => inst.withdraw(&req.unique_id),
            }
            debug!(instance = %inst.id, topic = ?topic, "delivery requeued: no sub-agent took it");
            requeue(&d, &proxy).await;
            return;
        }
        let (Some((msg_id, local, rx)), Some(reply_q)) = (waiter, inc.reply_q) else {
            return ack(&d, &proxy).await;
        };
        // The reply does not wait for the broker ack's write (a quarter of a
        // millisecond on the call's round trip, measured).
        let call = Call {
            inst: &inst,
            answers_ch: &answers_ch,
            msg_id,
            local,
            reply_q,
            limit,
        };
        tokio::join!(ack(&d, &proxy), call.relay(rx));
    };
    Some(match beat {
        None => Box::pin(work),
        Some((every, msg_id, reply_q)) => Box::pin(async move {
            let beats = async {
                let start = tokio::time::Instant::now() + every;
                let mut hb = tokio::time::interval_at(start, every);
                loop {
                    hb.tick().await;
                    publish_reply(&hb_ch, &reply_q, wire::encode_heartbeat(&msg_id)).await;
                }
            };
            tokio::select! {
                () = work => {}
                () = beats => {}
            }
        }),
    })
}

/// A call the guest has: its reply (and heartbeats) go to the caller.
struct Call<'a> {
    inst: &'a Instance,
    answers_ch: &'a Channel,
    /// The caller's msg_id.
    msg_id: String,
    /// The id the guest knows the call by.
    local: String,
    reply_q: String,
    /// The caller's timeout (the AMQP `expiration`).
    limit: Duration,
}

impl Call<'_> {
    async fn relay(self, rx: tokio::sync::oneshot::Receiver<crate::rpc::Reply>) {
        let Self {
            inst,
            answers_ch,
            msg_id,
            local,
            reply_q,
            limit,
        } = self;
        let reply = tokio::time::timeout(limit, async { rx.await.ok() }).await;
        match reply {
            Ok(Some(r)) => {
                let r = Reply { msg_id, ..r };
                publish_reply(answers_ch, &reply_q, wire::encode_reply(&r)).await
            }
            // The caller times out by itself; if the guest answers later (or
            // through another proxy after a migration), that reply is routed
            // by its sealed handle.
            _ => inst.forget(&local),
        }
    }
}

pub(super) async fn publish_reply(ch: &Channel, reply_q: &str, body: Vec<u8>) {
    let Ok(key) = short(reply_q) else {
        return warn!(reply_q, "reply queue name too long; reply dropped");
    };
    let res = async {
        ch.basic_publish(
            "".into(),
            key,
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &body,
            props(),
        )
        .await?
        .await
    }
    .await;
    match res {
        Ok(c) if c.is_ack() => {}
        Ok(_) => warn!(
            reply_q,
            "the broker did not take a reply (its caller's queue is gone?)"
        ),
        Err(e) => warn!(reply_q, error = %e, "publishing a reply failed"),
    }
}
