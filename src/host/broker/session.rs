//! One broker connection: declarations, consumers that follow the links,
//! guest messages published upstream, replies routed back into guests.
//!
//! Declarations follow oslo.messaging's exactly (its `impl_rabbit`), so
//! that they match what the deployment's own services declared:
//!
//! | object | kind | durable | arguments |
//! |---|---|---|---|
//! | control exchange | topic | `durable or quorum_queues` | |
//! | `<topic>.<instance>` | queue | `durable or quorum_queues` | quorum: `x-queue-type`; `x-expires` (only tether consumes these) |
//! | `<topic>_fanout` | fanout exchange, auto-delete | `transient_quorum_queues` | |
//! | `<topic>_fanout_<proxy id>` (classic) | queue | `transient_quorum_queues` | quorum, `x-expires` |
//! | `<topic>_fanout` (stream) | queue, shared | yes | `x-queue-type: stream`, `x-max-age` |
//! | `reply_tether_<proxy id>` | queue | `transient_quorum_queues` | quorum, `x-expires` |

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::deliver::{Target, consume};
use super::{
    BridgeError, BrokerConfig, DECLARE_RETRY_AFTER, Names, RECONCILE_EVERY, RETRY_EVERY, RETRY_FOR,
    StreamOffsets, Upstream, props, short, wire,
};
use crate::host::Proxy;
use crate::host::instance::{Instance, answer, refuse_cast};
use crate::rpc::{Failure, Kind, LinkMsg, Request, new_unique_id};

/// One instance's consumers: a channel of its own (prefetch per instance).
struct InstConsumers {
    ch: Channel,
    tags: HashMap<String, ShortString>,
    /// When its served topics last changed on the broker (the most recent
    /// [`TOPIC_CHANGES_BURST`]).
    changes: VecDeque<Instant>,
}

/// Changes of one instance's served topics applied on the broker (queues
/// declared, bound, consumed, cancelled) per [`TOPIC_CHANGES_WINDOW`]; a
/// guest announcing new topics faster has them applied as the window
/// allows (the latest set wins), so topic churn cannot turn into a stream
/// of declarations. An agent restart takes two (its topics forgotten, then
/// announced again).
pub const TOPIC_CHANGES_BURST: usize = 5;
/// See [`TOPIC_CHANGES_BURST`].
pub const TOPIC_CHANGES_WINDOW: Duration = Duration::from_secs(10);

/// Notification queues one connection remembers having declared; past it
/// the set starts again (a declaration of an existing queue is harmless).
pub const MAX_NOTIFY_QUEUES: usize = 1024;

/// One broker connection's worth of state.
pub(super) struct Session<'a> {
    proxy: &'a Arc<Proxy>,
    cfg: &'a BrokerConfig,
    names: &'a Names,
    offsets: &'a StreamOffsets,
    conn: Connection,
    /// Whether this connection got as far as serving (declarations done).
    pub(super) served: bool,
    /// Instances and fanout topics whose declaration the broker refused,
    /// and when: tried again after [`DECLARE_RETRY_AFTER`].
    refused: HashMap<String, Instant>,
    instances: HashMap<String, InstConsumers>,
    fanout: HashMap<String, (Channel, ShortString)>,
    /// Guest calls waiting for their reply, by the msg_id this proxy gave
    /// them upstream (a guest's own ids never reach the broker, so no
    /// guest can collide with another's): (instance, the guest's msg_id,
    /// deadline).
    calls: HashMap<String, PendingCall>,
    /// Unroutable guest casts: (first try, next try, the cast).
    retry: VecDeque<(Instant, Instant, Upstream)>,
    /// Notification queues this connection declared.
    notify_queues: HashSet<String>,
}

impl<'a> Session<'a> {
    pub(super) fn new(
        proxy: &'a Arc<Proxy>,
        cfg: &'a BrokerConfig,
        names: &'a Names,
        offsets: &'a StreamOffsets,
        conn: Connection,
    ) -> Self {
        Self {
            proxy,
            cfg,
            names,
            offsets,
            conn,
            served: false,
            refused: HashMap::new(),
            instances: HashMap::new(),
            fanout: HashMap::new(),
            calls: HashMap::new(),
            retry: VecDeque::new(),
            notify_queues: HashSet::new(),
        }
    }

    pub(super) async fn shutdown(self) {
        let _ = self
            .conn
            .close(200, "tether-proxy reconnecting".into())
            .await;
    }

    /// Arguments of a transient queue (reply, classic fanout), as oslo's
    /// `_get_queue_arguments` makes them.
    fn transient_args(&self) -> FieldTable {
        let mut t = FieldTable::default();
        if self.cfg.transient_quorum_queues {
            t.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        if self.cfg.queue_expires_ms > 0 {
            t.insert(
                "x-expires".into(),
                AMQPValue::LongLongInt(self.cfg.queue_expires_ms as i64),
            );
        }
        t
    }

    /// Declare a queue; a refusal says which queue and what to check.
    async fn declare_queue(
        ch: &Channel,
        what: &'static str,
        name: &ShortString,
        durable: bool,
        args: FieldTable,
    ) -> Result<(), BridgeError> {
        let opts = QueueDeclareOptions {
            durable,
            ..Default::default()
        };
        ch.queue_declare(name.clone(), opts, args)
            .await
            .map(drop)
            .map_err(|source| BridgeError::Declare {
                what,
                name: name.to_string(),
                source,
            })
    }

    /// Declare an exchange; a refusal says which and what to check.
    async fn declare_exchange(
        ch: &Channel,
        what: &'static str,
        name: &ShortString,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
    ) -> Result<(), BridgeError> {
        let opts = ExchangeDeclareOptions {
            durable,
            auto_delete,
            ..Default::default()
        };
        ch.exchange_declare(name.clone(), kind, opts, FieldTable::default())
            .await
            .map_err(|source| BridgeError::Declare {
                what,
                name: name.to_string(),
                source,
            })
    }

    /// Serve until the connection fails; why it ended.
    pub(super) async fn serve(
        &mut self,
        up_rx: &mut mpsc::Receiver<Upstream>,
        held: &mut VecDeque<Upstream>,
    ) -> BridgeError {
        let e = match self.serve_inner(up_rx, held).await {
            Ok(()) => BridgeError::Stopped,
            Err(e) => e,
        };
        // Casts waiting for a route wait for the next connection.
        held.extend(self.retry.drain(..).map(|(_, _, m)| m));
        e
    }

    async fn serve_inner(
        &mut self,
        up_rx: &mut mpsc::Receiver<Upstream>,
        held: &mut VecDeque<Upstream>,
    ) -> Result<(), BridgeError> {
        let mut pub_ch = self.conn.create_channel().await?;
        pub_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Self::declare_exchange(
            &pub_ch,
            "control exchange",
            &short(&self.cfg.control_exchange)?,
            ExchangeKind::Topic,
            self.cfg.server_durable(),
            false,
        )
        .await?;
        let reply_ch = self.conn.create_channel().await?;
        Self::declare_queue(
            &reply_ch,
            "reply queue",
            &short(&self.names.reply_q)?,
            self.cfg.transient_durable(),
            self.transient_args(),
        )
        .await?;
        let mut replies = reply_ch
            .basic_consume(
                short(&self.names.reply_q)?,
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        // Declared and consuming: this is what `connected` means to an
        // operator (and to whoever waits for our declarations).
        self.served = true;
        self.proxy.bridge.update(|s| {
            s.connected = true;
            s.up_since_unix_ms = crate::unix_ms();
        });
        // What waited while the broker was away goes first.
        while let Some(m) = held.pop_front() {
            if let Err(e) = self.upstream(&pub_ch, m.clone(), Instant::now()).await {
                held.push_front(m);
                return Err(e.into());
            }
            self.ensure_pub(&mut pub_ch).await?;
        }
        self.proxy.bridge.update(|s| s.held = 0);
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if !self.conn.status().connected() {
                        return Err(lapin::Error::from(std::io::Error::other("connection closed")).into());
                    }
                    self.reconcile(&pub_ch).await?;
                    let now = Instant::now();
                    self.calls.retain(|_, c| c.deadline > now);
                    while self.retry.front().is_some_and(|(_, next, _)| *next <= now) {
                        let Some((first, _, m)) = self.retry.pop_front() else { break };
                        if let Err(e) = self.upstream(&pub_ch, m.clone(), first).await {
                            self.retry.push_front((first, now, m));
                            return Err(e.into());
                        }
                        self.ensure_pub(&mut pub_ch).await?;
                    }
                }
                d = replies.next() => match d {
                    Some(Ok(d)) => self.route_reply(&d.data).await,
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(lapin::Error::from(std::io::Error::other("reply consumer cancelled")).into()),
                },
                m = up_rx.recv() => match m {
                    Some(m) => {
                        if let Err(e) = self.upstream(&pub_ch, m.clone(), Instant::now()).await {
                            held.push_front(m);
                            return Err(e.into());
                        }
                        self.ensure_pub(&mut pub_ch).await?;
                    }
                    None => return Ok(()),
                },
            }
        }
    }

    /// A reply on our reply queue: back into the guest that called.
    async fn route_reply(&mut self, body: &[u8]) {
        let r = match wire::decode_reply(body) {
            Ok(r) => r,
            Err(e) => {
                return warn!(error = %e, "malformed reply on the proxy's reply queue dropped");
            }
        };
        if !r.ending {
            return; // a heartbeat: the guest's own timeout applies
        }
        let Some(PendingCall {
            instance, guest_id, ..
        }) = self.calls.remove(&r.msg_id)
        else {
            return debug!(msg_id = ?r.msg_id, "reply to an unknown or expired guest call dropped");
        };
        let r = crate::rpc::Reply {
            msg_id: guest_id,
            ..r
        };
        if let Some(inst) = self.proxy.instance(&instance) {
            inst.post(LinkMsg::Rep(r).to_bytes());
        }
    }

    /// A publishing channel the broker closed (because of one message: an
    /// exchange that does not exist, say) is opened again; the connection
    /// stays.
    async fn ensure_pub(&mut self, ch: &mut Channel) -> Result<(), lapin::Error> {
        if ch.status().connected() {
            return Ok(());
        }
        let c = self.conn.create_channel().await?;
        c.confirm_select(ConfirmSelectOptions::default()).await?;
        *ch = c;
        Ok(())
    }

    /// Publish a guest message; what the broker could not route is retried
    /// (casts), answered (calls) or reported (replies); what it refused is
    /// refused to its sender — that message alone. `Err` only when the
    /// connection failed (the message is kept for the next one).
    async fn upstream(
        &mut self,
        ch: &Channel,
        m: Upstream,
        first: Instant,
    ) -> Result<(), lapin::Error> {
        match self.publish_upstream(ch, &m).await? {
            Published::Done => {
                self.proxy.bridge.update(|s| s.published += 1);
                return Ok(());
            }
            Published::Refused(why) => {
                self.refused_by_broker(m, &why);
                return Ok(());
            }
            Published::Unroutable => {}
        }
        match m {
            Upstream::Cast {
                instance,
                request: r,
                ticket,
            } => {
                if first.elapsed() >= RETRY_FOR || self.retry.len() >= self.cfg.upstream_hold {
                    self.proxy.bridge.update(|s| s.refused += 1);
                    error!(target: "audit", instance = %instance, topic = ?r.target.topic, method = ?r.method, unique_id = ?r.unique_id,
                           "guest cast refused: nothing consumed its topic for {} s", RETRY_FOR.as_secs());
                    if let Some(inst) = self.proxy.instance(&instance) {
                        let why = format!(
                            "NoRoute: nothing on the control plane consumed topic '{}' for {} s",
                            r.target.topic,
                            RETRY_FOR.as_secs()
                        );
                        refuse_cast(&inst, r.unique_id, why);
                    }
                } else {
                    if first.elapsed().is_zero() || self.retry.is_empty() {
                        debug!(topic = ?r.target.topic, "guest cast unroutable for now; retrying");
                    }
                    let m = Upstream::Cast {
                        instance,
                        request: r,
                        ticket,
                    };
                    self.retry
                        .push_back((first, Instant::now() + RETRY_EVERY, m));
                }
            }
            Upstream::Call {
                instance, request, ..
            } => {
                self.proxy.bridge.update(|s| s.refused += 1);
                if let Some(msg_id) = &request.msg_id {
                    self.calls
                        .retain(|_, c| !(c.instance == instance && c.guest_id == *msg_id));
                }
                if let (Some(inst), Some(msg_id)) = (self.proxy.instance(&instance), request.msg_id)
                {
                    let f = Failure::tether(
                        "NoRoute",
                        format!(
                            "nothing on the control plane serves topic '{}'",
                            request.target.topic
                        ),
                    );
                    answer(&inst, msg_id, request.reply_to, f);
                }
            }
            Upstream::Reply(r) => {
                self.proxy.bridge.update(|s| s.refused += 1);
                warn!(msg_id = ?r.msg_id, "reply unroutable: its caller's reply queue is gone")
            }
        }
        Ok(())
    }

    /// One message the broker would not take (or a name it could not
    /// carry): refused to the guest that sent it, and audited.
    fn refused_by_broker(&mut self, m: Upstream, why: &str) {
        self.proxy.bridge.update(|s| s.refused += 1);
        match m {
            Upstream::Cast {
                instance,
                request: r,
                ..
            } => {
                error!(target: "audit", instance = %instance, topic = ?r.target.topic, exchange = ?r.target.exchange, unique_id = ?r.unique_id,
                       reason = %why, "guest cast refused by the broker");
                if let Some(inst) = self.proxy.instance(&instance) {
                    refuse_cast(&inst, r.unique_id, format!("BrokerRefused: {why}"));
                }
            }
            Upstream::Call {
                instance, request, ..
            } => {
                error!(target: "audit", instance = %instance, topic = ?request.target.topic, exchange = ?request.target.exchange,
                       reason = %why, "guest call refused by the broker");
                if let Some(msg_id) = &request.msg_id {
                    self.calls
                        .retain(|_, c| !(c.instance == instance && c.guest_id == *msg_id));
                }
                if let (Some(inst), Some(msg_id)) = (self.proxy.instance(&instance), request.msg_id)
                {
                    let f = Failure::tether("BrokerRefused", why);
                    answer(&inst, msg_id, request.reply_to, f);
                }
            }
            Upstream::Reply(r) => {
                warn!(msg_id = ?r.msg_id, reason = %why, "a guest's reply was refused by the broker")
            }
        }
    }

    /// Declare and bind the notification queue `topic` (`<topic>.<priority>`)
    /// on the control exchange, as oslo's notifier does, unless this
    /// connection did already. Durable and quorum as configured; the set
    /// is bounded (the profile's topic patterns times seven priorities in
    /// practice; cleared at [`MAX_NOTIFY_QUEUES`], so declared again).
    async fn ensure_notify_queue(&mut self, ch: &Channel, topic: &str) -> Result<(), lapin::Error> {
        if self.notify_queues.contains(topic) {
            return Ok(());
        }
        let Ok(q) = short(topic) else {
            return Ok(()); // refused at publish, with the reason
        };
        let mut args = FieldTable::default();
        if self.cfg.quorum_queues {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        let opts = QueueDeclareOptions {
            durable: self.cfg.server_durable(),
            ..Default::default()
        };
        ch.queue_declare(q.clone(), opts, args).await?;
        ch.queue_bind(
            q.clone(),
            short(&self.cfg.control_exchange).unwrap_or_default(),
            q,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        if self.notify_queues.len() >= MAX_NOTIFY_QUEUES {
            self.notify_queues.clear();
        }
        self.notify_queues.insert(topic.to_string());
        Ok(())
    }

    /// Publish, and say how it went.
    async fn publish_upstream(
        &mut self,
        ch: &Channel,
        m: &Upstream,
    ) -> Result<Published, lapin::Error> {
        let (exchange, key, body, props, mandatory) = match m {
            Upstream::Cast {
                instance,
                request: r,
                ..
            } if r.kind == Kind::Notify => {
                // As oslo's notifier: the queue named by the routing key is
                // declared (once per connection) so that a notification
                // nobody consumes yet waits for its listener — only for a
                // topic the profile names exactly: a pattern would let the
                // guest create queues on the shared broker at will.
                let declare = self.proxy.instance(instance).is_some_and(|inst| {
                    crate::host::policy::declares_notify_queue(
                        &inst.policy().profile,
                        &r.target.topic,
                    )
                });
                if declare && let Err(e) = self.ensure_notify_queue(ch, &r.target.topic).await {
                    if !self.conn.status().connected() {
                        return Err(e);
                    }
                    return Ok(Published::Refused(format!(
                        "declaring notification queue {}: {e}",
                        r.target.topic
                    )));
                }
                (
                    self.cfg.control_exchange.clone(),
                    r.target.topic.clone(),
                    wire::encode_notification(r),
                    props(),
                    true,
                )
            }
            Upstream::Cast { request: r, .. } => (
                r.target
                    .exchange
                    .clone()
                    .unwrap_or_else(|| self.cfg.control_exchange.clone()),
                routing_key(r),
                wire::encode_request(r, None),
                props(),
                true,
            ),
            Upstream::Call {
                instance,
                request: r,
                ticket,
            } => {
                let t = r
                    .timeout_ms
                    .unwrap_or(self.cfg.upstream_call_timeout_ms)
                    .min(self.cfg.upstream_call_timeout_ms);
                let up_id = new_unique_id();
                if let Some(msg_id) = &r.msg_id {
                    // The ticket stays with the call until its answer comes
                    // or it expires: a guest's calls in flight count
                    // against its share too.
                    let call = PendingCall {
                        instance: instance.clone(),
                        guest_id: msg_id.clone(),
                        deadline: Instant::now() + Duration::from_millis(t),
                        _ticket: ticket.clone(),
                    };
                    self.calls.insert(up_id.clone(), call);
                }
                let upstream = Request {
                    msg_id: Some(up_id),
                    ..r.clone()
                };
                (
                    r.target
                        .exchange
                        .clone()
                        .unwrap_or_else(|| self.cfg.control_exchange.clone()),
                    routing_key(r),
                    wire::encode_request(&upstream, Some(&self.names.reply_q)),
                    props().with_expiration(t.to_string().into()),
                    true,
                )
            }
            Upstream::Reply(r) => match &r.reply_to {
                Some(q) => (
                    String::new(),
                    q.clone(),
                    wire::encode_reply(r),
                    props(),
                    true,
                ),
                None => return Ok(Published::Done),
            },
        };
        let (Ok(exchange), Ok(key)) = (short(&exchange), short(&key)) else {
            // The enforcement point checks guest names; this is the last
            // line: a name AMQP cannot carry fails its message, not the link.
            return Ok(Published::Refused(
                "an exchange or routing key over 255 bytes".into(),
            ));
        };
        let opts = BasicPublishOptions {
            mandatory,
            ..Default::default()
        };
        let res = async {
            ch.basic_publish(exchange, key, opts, &body, props)
                .await?
                .await
        }
        .await;
        match res {
            Ok(lapin::Confirmation::Ack(returned)) if returned.is_none() => Ok(Published::Done),
            Ok(lapin::Confirmation::Ack(_)) | Ok(lapin::Confirmation::Nack(_)) => {
                Ok(Published::Unroutable)
            }
            Ok(lapin::Confirmation::NotRequested) => Ok(Published::Done),
            // The connection is up, so the broker closed the channel over
            // this message (an exchange that does not exist, …).
            Err(e) if self.conn.status().connected() => Ok(Published::Refused(e.to_string())),
            Err(e) => Err(e),
        }
    }

    /// Make the consumers match the established links and their topics.
    async fn reconcile(&mut self, pub_ch: &Channel) -> Result<(), BridgeError> {
        let mut want: HashMap<String, (Arc<Instance>, Vec<String>)> = HashMap::new();
        for inst in self.proxy.instances() {
            if inst.tx.status().established {
                let topics = inst.topics();
                want.insert(inst.id.clone(), (inst, topics));
            }
        }
        // Links that went down: stop consuming at once.
        let gone: Vec<String> = self
            .instances
            .keys()
            .filter(|id| !want.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(c) = self.instances.remove(&id) {
                info!(instance = %id, "link down: consumers cancelled");
                for tag in c.tags.values() {
                    let _ =
                        c.ch.basic_cancel(tag.clone(), BasicCancelOptions::default())
                            .await;
                }
                // Deliveries still waiting for the guest finish or are
                // nacked by their handlers within the grace; then the
                // channel goes, requeueing anything left.
                let grace =
                    Duration::from_millis(self.cfg.requeue_grace_ms) + Duration::from_secs(1);
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    let _ = c.ch.close(200, "instance link down".into()).await;
                });
            }
        }
        self.refused
            .retain(|_, at| at.elapsed() < DECLARE_RETRY_AFTER);
        for (id, (inst, topics)) in &want {
            if self.refused.contains_key(id) {
                continue;
            }
            if let Err(e) = self.consume_instance(id, inst, topics, pub_ch).await {
                // A refused declaration closed the instance's channel (and
                // its other consumers): start it afresh on the next try.
                self.instances.remove(id);
                self.declaration_refused(id.clone(), e)?;
            }
        }
        // Fanout: one queue per proxy and topic served by any local instance.
        let served: HashSet<String> = want.values().flat_map(|(_, t)| t.iter().cloned()).collect();
        let stale: Vec<String> = self
            .fanout
            .keys()
            .filter(|t| !served.contains(*t))
            .cloned()
            .collect();
        for t in stale {
            // A topic no guest serves now keeps its stream offset (a guest's
            // link blip should not skip fanouts), unless too many are kept:
            // topics come from guests.
            {
                let mut offsets = crate::lock(self.offsets);
                if offsets.len() > super::MAX_IDLE_STREAM_OFFSETS {
                    offsets.remove(&t);
                }
            }
            if let Some((ch, tag)) = self.fanout.remove(&t) {
                let _ = ch.basic_cancel(tag, BasicCancelOptions::default()).await;
                let _ = ch.close(200, "topic no longer served here".into()).await;
            }
        }
        for t in served {
            let key = format!("fanout {t}");
            if self.fanout.contains_key(&t) || self.refused.contains_key(&key) {
                continue;
            }
            if let Err(e) = self.consume_fanout(t, pub_ch).await {
                self.declaration_refused(key, e)?;
            }
        }
        // An instance counts once its queues are consumed (a link with no
        // topic yet has a channel and nothing on it).
        let n = self
            .instances
            .values()
            .filter(|c| !c.tags.is_empty())
            .count();
        let q = self.instances.values().map(|c| c.tags.len()).sum();
        let f = self.fanout.len();
        self.proxy.bridge.update(|s| {
            s.instances_consumed = n;
            s.server_queues = q;
            s.fanout_topics = f;
        });
        Ok(())
    }

    /// The broker refused a declaration for one instance or fanout topic
    /// (most often 406: the deployment declared that queue with other
    /// flags): report it and leave that one alone for a while; the other
    /// instances keep being served. Any other error ends the connection.
    fn declaration_refused(&mut self, key: String, e: BridgeError) -> Result<(), BridgeError> {
        if !matches!(e, BridgeError::Declare { .. }) {
            return Err(e);
        }
        let why = crate::error_chain(&e);
        error!(what = ?key, error = %why, retry_in_s = DECLARE_RETRY_AFTER.as_secs(), "the broker refused a declaration; the rest is served");
        self.proxy.bridge.update(|s| s.last_error = Some(why));
        self.refused.insert(key, Instant::now());
        Ok(())
    }

    /// Consume `<topic>.<instance>` for each of the instance's topics.
    async fn consume_instance(
        &mut self,
        id: &str,
        inst: &Arc<Instance>,
        topics: &[String],
        pub_ch: &Channel,
    ) -> Result<(), BridgeError> {
        if !self.instances.contains_key(id) {
            let ch = self.conn.create_channel().await?;
            ch.basic_qos(self.cfg.prefetch, BasicQosOptions::default())
                .await?;
            self.instances.insert(
                id.to_string(),
                InstConsumers {
                    ch,
                    tags: HashMap::new(),
                    changes: VecDeque::new(),
                },
            );
        }
        let Some(c) = self.instances.get_mut(id) else {
            return Ok(());
        };
        let have: Vec<String> = c.tags.keys().cloned().collect();
        let changed = have.len() != topics.len() || have.iter().any(|t| !topics.contains(t));
        if !changed {
            return Ok(());
        }
        let now = Instant::now();
        while c
            .changes
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= TOPIC_CHANGES_WINDOW)
        {
            c.changes.pop_front();
        }
        if c.changes.len() >= TOPIC_CHANGES_BURST {
            return Ok(()); // applied when the window allows
        }
        c.changes.push_back(now);
        for t in have.iter().filter(|t| !topics.contains(t)) {
            if let Some(tag) = c.tags.remove(t) {
                let _ = c.ch.basic_cancel(tag, BasicCancelOptions::default()).await;
            }
        }
        let missing: Vec<&String> = topics.iter().filter(|t| !c.tags.contains_key(*t)).collect();
        for t in missing {
            let queue = format!("{t}.{id}");
            let Ok(q) = short(&queue) else {
                warn!(instance = %id, topic = ?t, "queue name too long for AMQP; topic not served over the broker");
                continue;
            };
            let mut args = FieldTable::default();
            if self.cfg.quorum_queues {
                args.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("quorum".into()),
                );
            }
            // Only tether consumes `<topic>.<instance>`: such a queue goes
            // when unused for queue_expires_ms (the VM went, the topic was
            // dropped), so topic churn does not fill the broker.
            if self.cfg.queue_expires_ms > 0 {
                args.insert(
                    "x-expires".into(),
                    AMQPValue::LongLongInt(self.cfg.queue_expires_ms as i64),
                );
            }
            Self::declare_queue(&c.ch, "server queue", &q, self.cfg.server_durable(), args).await?;
            c.ch.queue_bind(
                q.clone(),
                short(&self.cfg.control_exchange)?,
                q.clone(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
            let consumer =
                c.ch.basic_consume(
                    q,
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            info!(instance = %id, queue = ?queue, "consuming");
            c.tags.insert(t.clone(), consumer.tag());
            tokio::spawn(consume(
                consumer,
                self.proxy.clone(),
                Target::One(inst.clone()),
                t.clone(),
                pub_ch.clone(),
                self.cfg.requeue_grace_ms,
            ));
        }
        Ok(())
    }

    /// Consume the fanout of `topic`: this proxy's own classic queue, or
    /// the topic's shared stream from where this proxy left off.
    async fn consume_fanout(&mut self, t: String, pub_ch: &Channel) -> Result<(), BridgeError> {
        let exchange = format!("{t}_fanout");
        let queue = if self.cfg.stream_fanout {
            exchange.clone()
        } else {
            format!("{exchange}_{}", self.names.proxy_id)
        };
        let (Ok(ex), Ok(q)) = (short(&exchange), short(&queue)) else {
            warn!(topic = ?t, "fanout name too long for AMQP; fanout not served over the broker");
            return Ok(());
        };
        let ch = self.conn.create_channel().await?;
        // Streams need a prefetch too (the broker refuses a consumer without).
        ch.basic_qos(self.cfg.prefetch, BasicQosOptions::default())
            .await?;
        Self::declare_exchange(
            &ch,
            "fanout exchange",
            &ex,
            ExchangeKind::Fanout,
            self.cfg.transient_durable(),
            true,
        )
        .await?;
        let mut consume_args = FieldTable::default();
        let stream = if self.cfg.stream_fanout {
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("stream".into()),
            );
            if self.cfg.queue_expires_ms > 0 {
                let age = format!("{}s", self.cfg.queue_expires_ms / 1000);
                args.insert("x-max-age".into(), AMQPValue::LongString(age.into()));
            }
            Self::declare_queue(&ch, "fanout stream", &q, true, args).await?;
            // A fresh start reads only what comes next (oslo starts at
            // "last", which replays the last chunk: stale fanouts into
            // guests); a reconnect goes on after the last offset seen.
            let next = crate::lock(self.offsets).get(&t).copied();
            let offset = match next {
                Some(n) => AMQPValue::LongLongInt(n),
                None => AMQPValue::LongString("next".into()),
            };
            consume_args.insert("x-stream-offset".into(), offset);
            Some(self.offsets.clone())
        } else {
            Self::declare_queue(
                &ch,
                "fanout queue",
                &q,
                self.cfg.transient_durable(),
                self.transient_args(),
            )
            .await?;
            None
        };
        ch.queue_bind(
            q.clone(),
            ex,
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let consumer = ch
            .basic_consume(q, "".into(), BasicConsumeOptions::default(), consume_args)
            .await?;
        info!(queue = ?queue, stream = self.cfg.stream_fanout, "consuming fanout");
        let tag = consumer.tag();
        tokio::spawn(consume(
            consumer,
            self.proxy.clone(),
            Target::Fanout { stream },
            t.clone(),
            pub_ch.clone(),
            self.cfg.requeue_grace_ms,
        ));
        self.fanout.insert(t, (ch, tag));
        Ok(())
    }
}

fn routing_key(r: &Request) -> String {
    match &r.target.server {
        Some(s) => format!("{}.{s}", r.target.topic),
        None => r.target.topic.clone(),
    }
}

/// How one publish went.
enum Published {
    /// The broker took it.
    Done,
    /// Nothing was bound to take it (mandatory publish returned).
    Unroutable,
    /// The broker would not take it (or AMQP cannot carry its names).
    Refused(String),
}

/// A guest's call published upstream, waiting for its reply.
struct PendingCall {
    instance: String,
    /// The id the guest knows it by.
    guest_id: String,
    deadline: Instant,
    /// Its claim on the instance's share of the bridge.
    _ticket: Option<super::Ticket>,
}
