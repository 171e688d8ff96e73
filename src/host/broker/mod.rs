//! The broker bridge: the proxy as its VMs' oslo.messaging RPC server (and
//! client) on RabbitMQ.
//!
//! - Host → guest: for every established instance and every topic its
//!   sub-agents registered, a consumer on `<topic>.<instance-uuid>` bound to
//!   the control exchange; one fanout queue per proxy and topic bound to
//!   `<topic>_fanout`. A delivery is acknowledged to RabbitMQ only once the
//!   guest's link acknowledged it; prefetch bounds deliveries in flight per
//!   instance. When a link drops its consumers are cancelled at once, and
//!   what the guest has not acknowledged within `requeue_grace_ms` is
//!   requeued for whichever proxy links the instance next.
//! - Replies go to the default exchange, routing key `_reply_q`, mandatory,
//!   in the shape the Python client accepts ([`wire`]); a call with a
//!   call-monitor `_timeout` gets `ending: false` heartbeats meanwhile.
//! - Guest → host ([`Upstream`], after the enforcement point): casts and
//!   calls published in oslo format; calls use this proxy's reply queue and
//!   their replies are routed back into the guest.
//! - The broker going away leaves links up: reconnect with capped backoff,
//!   over every host of the `transport_url`; consumers are restored.

pub mod config;
pub mod wire;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

pub use config::BrokerConfig;

use super::Proxy;
use super::instance::Instance;
use crate::link::driver::SendReceipt;
use crate::rpc::{Failure, Kind, LinkMsg, Reply, Request};

/// How often consumers are reconciled with the instances' links and topics.
const RECONCILE_EVERY: Duration = Duration::from_millis(200);
/// A connect attempt that takes longer than this is abandoned.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A delivery whose guest acknowledgement takes longer than this while the
/// link stays up is requeued (the guest is stuck; another try may land).
const GUEST_ACK_BOUND: Duration = Duration::from_secs(120);
/// A call without an `expiration` waits this long for the guest's reply.
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// An unroutable guest cast (no queue bound for its topic yet: the
/// consumer may be restarting, or its queue was lost with a broker restart)
/// is published again every [`RETRY_EVERY`] for this long, then refused.
const RETRY_FOR: Duration = Duration::from_secs(30);
/// How often an unroutable guest cast is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// A guest message for the control plane, past the enforcement point.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// A cast (identity already stamped into its context).
    Cast(Request),
    /// A call from `instance`; its reply goes back into that guest.
    Call {
        /// Who asked.
        instance: String,
        /// The call.
        request: Request,
    },
    /// A reply to a call this proxy did not deliver (it entered through
    /// another host's proxy before a migration): routed by its `reply_to`.
    Reply(Reply),
}

fn props() -> BasicProperties {
    BasicProperties::default()
        .with_content_type(wire::CONTENT_TYPE.into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(2)
        .with_priority(0)
        .with_headers(FieldTable::default())
}

fn short(s: &str) -> Result<ShortString, lapin::Error> {
    ShortString::try_new(s).map_err(|e| {
        lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("AMQP name {s:?}: {e}"),
        ))
    })
}

/// Run the bridge until the proxy stops (the task is aborted).
pub async fn run(proxy: Arc<Proxy>, cfg: BrokerConfig, mut up_rx: mpsc::Receiver<Upstream>) {
    let uris = match cfg.amqp_uris() {
        Ok(u) => u,
        Err(e) => {
            error!(error = %e, "broker disabled");
            return;
        }
    };
    let id = crate::random_u64();
    let names = Names {
        reply_q: format!("reply_tether_{id:016x}"),
        proxy_id: format!("{id:016x}"),
    };
    let mut held: VecDeque<Upstream> = VecDeque::new();
    let mut backoff = Duration::from_millis(cfg.reconnect_min_ms);
    let mut attempt = 0usize;
    if uris.is_empty() {
        return error!("broker disabled: the transport_url names no host");
    }
    loop {
        let Some(uri) = uris.get(attempt % uris.len()) else {
            return;
        };
        attempt += 1;
        let shown = redact(uri);
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(uri, ConnectionProperties::default()),
        )
        .await
        {
            Ok(Ok(conn)) => {
                info!(broker = %shown, "connected to the broker");
                backoff = Duration::from_millis(cfg.reconnect_min_ms);
                let mut s = Session::new(&proxy, &cfg, &names, conn);
                let why = s.serve(&mut up_rx, &mut held).await;
                warn!(broker = %shown, error = %why, held = held.len(), "broker connection lost; links stay up, reconnecting");
                s.shutdown().await;
            }
            Ok(Err(e)) => warn!(broker = %shown, error = %e, "cannot connect to the broker"),
            Err(_) => warn!(broker = %shown, "broker connect timed out"),
        }
        // While away: hold guest messages within the bound, refuse beyond.
        let until = tokio::time::Instant::now() + backoff;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                m = up_rx.recv() => match m {
                    Some(m) => hold(&proxy, &cfg, &mut held, m).await,
                    None => return,
                },
            }
        }
        backoff = (backoff * 2).min(Duration::from_millis(cfg.reconnect_max_ms));
    }
}

/// Keep `m` for when the broker is back, or refuse it clearly.
async fn hold(proxy: &Proxy, cfg: &BrokerConfig, held: &mut VecDeque<Upstream>, m: Upstream) {
    if held.len() < cfg.upstream_hold {
        held.push_back(m);
        return;
    }
    match m {
        Upstream::Call { instance, request } => {
            warn!(target: "audit", instance = %instance, method = %request.method, "guest call refused: broker unreachable and the hold is full");
            if let (Some(inst), Some(msg_id)) = (proxy.instance(&instance), request.msg_id) {
                let f = Failure::tether(
                    "BrokerUnavailable",
                    format!(
                        "the control plane's broker is unreachable and {} messages already wait",
                        cfg.upstream_hold
                    ),
                );
                let rep = LinkMsg::Rep(Reply::new(msg_id, request.reply_to, Err(f)));
                let _ = inst.tx.send(rep.to_bytes()).await;
            }
        }
        Upstream::Cast(r) => {
            error!(target: "audit", method = %r.method, topic = %r.target.topic, unique_id = %r.unique_id, "guest cast refused: broker unreachable and the hold is full")
        }
        Upstream::Reply(r) => {
            error!(msg_id = %r.msg_id, "reply refused: broker unreachable and the hold is full")
        }
    }
}

fn redact(uri: &str) -> String {
    match (uri.find("://"), uri.rfind('@')) {
        (Some(s), Some(a)) if a > s => format!(
            "{}***{}",
            uri.get(..s + 3).unwrap_or_default(),
            uri.get(a..).unwrap_or_default()
        ),
        _ => uri.to_string(),
    }
}

struct Names {
    reply_q: String,
    proxy_id: String,
}

/// One instance's consumers: a channel of its own (prefetch per instance).
struct InstConsumers {
    ch: Channel,
    tags: HashMap<String, ShortString>,
}

/// One broker connection's worth of state.
struct Session<'a> {
    proxy: &'a Arc<Proxy>,
    cfg: &'a BrokerConfig,
    names: &'a Names,
    conn: Connection,
    instances: HashMap<String, InstConsumers>,
    fanout: HashMap<String, (Channel, ShortString)>,
    /// Guest calls waiting for their reply: msg_id → (instance, deadline).
    calls: HashMap<String, (String, Instant)>,
    /// Unroutable guest casts: (first try, next try, the cast).
    retry: VecDeque<(Instant, Instant, Upstream)>,
}

impl<'a> Session<'a> {
    fn new(
        proxy: &'a Arc<Proxy>,
        cfg: &'a BrokerConfig,
        names: &'a Names,
        conn: Connection,
    ) -> Self {
        Self {
            proxy,
            cfg,
            names,
            conn,
            instances: HashMap::new(),
            fanout: HashMap::new(),
            calls: HashMap::new(),
            retry: VecDeque::new(),
        }
    }

    async fn shutdown(self) {
        let _ = self
            .conn
            .close(200, "tether-proxy reconnecting".into())
            .await;
    }

    fn queue_args(&self, server_queue: bool) -> FieldTable {
        let mut t = FieldTable::default();
        if server_queue {
            if self.cfg.quorum_queues {
                t.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("quorum".into()),
                );
            }
        } else {
            t.insert(
                "x-expires".into(),
                AMQPValue::LongLongInt(self.cfg.queue_expires_ms as i64),
            );
        }
        t
    }

    async fn serve(
        &mut self,
        up_rx: &mut mpsc::Receiver<Upstream>,
        held: &mut VecDeque<Upstream>,
    ) -> lapin::Error {
        let e = match self.serve_inner(up_rx, held).await {
            Ok(()) => lapin::Error::from(std::io::Error::other("the bridge stopped")),
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
    ) -> Result<(), lapin::Error> {
        let pub_ch = self.conn.create_channel().await?;
        pub_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        pub_ch
            .exchange_declare(
                short(&self.cfg.control_exchange)?,
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: self.cfg.durable,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .inspect_err(|e| error!(exchange = %self.cfg.control_exchange, error = %e, "declaring the control exchange failed: do broker.durable / quorum_queues match the deployment's own declarations?"))?;
        let reply_ch = self.conn.create_channel().await?;
        reply_ch
            .queue_declare(
                short(&self.names.reply_q)?,
                QueueDeclareOptions::default(),
                self.queue_args(false),
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
        // What waited while the broker was away goes first.
        while let Some(m) = held.pop_front() {
            if let Err(e) = self.upstream(&pub_ch, m.clone(), Instant::now()).await {
                held.push_front(m);
                return Err(e);
            }
        }
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if !self.conn.status().connected() {
                        return Err(std::io::Error::other("connection closed").into());
                    }
                    self.reconcile(&pub_ch).await?;
                    let now = Instant::now();
                    self.calls.retain(|_, (_, d)| *d > now);
                    while self.retry.front().is_some_and(|(_, next, _)| *next <= now) {
                        let Some((first, _, m)) = self.retry.pop_front() else { break };
                        if let Err(e) = self.upstream(&pub_ch, m.clone(), first).await {
                            self.retry.push_front((first, now, m));
                            return Err(e);
                        }
                    }
                }
                d = replies.next() => match d {
                    Some(Ok(d)) => self.route_reply(&d.data).await,
                    Some(Err(e)) => return Err(e),
                    None => return Err(std::io::Error::other("reply consumer cancelled").into()),
                },
                m = up_rx.recv() => match m {
                    Some(m) => if let Err(e) = self.upstream(&pub_ch, m.clone(), Instant::now()).await {
                        held.push_front(m);
                        return Err(e);
                    },
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
        let Some((instance, _)) = self.calls.remove(&r.msg_id) else {
            return debug!(msg_id = %r.msg_id, "reply to an unknown or expired guest call dropped");
        };
        if let Some(inst) = self.proxy.instance(&instance) {
            let _ = inst.tx.send(LinkMsg::Rep(r).to_bytes()).await;
        }
    }

    /// Publish a guest message; what the broker could not route is retried
    /// (casts), answered (calls) or reported (replies).
    async fn upstream(
        &mut self,
        ch: &Channel,
        m: Upstream,
        first: Instant,
    ) -> Result<(), lapin::Error> {
        if self.publish_upstream(ch, &m).await? {
            return Ok(());
        }
        match m {
            Upstream::Cast(r) => {
                if first.elapsed() >= RETRY_FOR || self.retry.len() >= self.cfg.upstream_hold {
                    error!(target: "audit", topic = %r.target.topic, method = %r.method, unique_id = %r.unique_id,
                           "guest cast dropped: nothing consumed its topic for {} s", RETRY_FOR.as_secs());
                } else {
                    if first.elapsed().is_zero() || self.retry.is_empty() {
                        debug!(topic = %r.target.topic, "guest cast unroutable for now; retrying");
                    }
                    self.retry
                        .push_back((first, Instant::now() + RETRY_EVERY, Upstream::Cast(r)));
                }
            }
            Upstream::Call { instance, request } => {
                if let Some(msg_id) = &request.msg_id {
                    self.calls.remove(msg_id);
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
                    let rep = LinkMsg::Rep(Reply::new(msg_id, request.reply_to, Err(f)));
                    let _ = inst.tx.send(rep.to_bytes()).await;
                }
            }
            Upstream::Reply(r) => {
                warn!(msg_id = %r.msg_id, "reply unroutable: its caller's reply queue is gone")
            }
        }
        Ok(())
    }

    /// Publish; `Ok(false)` when the broker returned it as unroutable.
    async fn publish_upstream(&mut self, ch: &Channel, m: &Upstream) -> Result<bool, lapin::Error> {
        let (exchange, key, body, props, mandatory) = match m {
            Upstream::Cast(r) => (
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
            } => {
                let t = r
                    .timeout_ms
                    .unwrap_or(self.cfg.upstream_call_timeout_ms)
                    .min(self.cfg.upstream_call_timeout_ms);
                if let Some(msg_id) = &r.msg_id {
                    self.calls.insert(
                        msg_id.clone(),
                        (instance.clone(), Instant::now() + Duration::from_millis(t)),
                    );
                }
                (
                    r.target
                        .exchange
                        .clone()
                        .unwrap_or_else(|| self.cfg.control_exchange.clone()),
                    routing_key(r),
                    wire::encode_request(r, Some(&self.names.reply_q)),
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
                None => return Ok(true),
            },
        };
        let c = ch
            .basic_publish(
                short(&exchange)?,
                short(&key)?,
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                &body,
                props,
            )
            .await?
            .await?;
        Ok(match c {
            lapin::Confirmation::Ack(returned) => returned.is_none(),
            lapin::Confirmation::Nack(_) => false,
            lapin::Confirmation::NotRequested => true,
        })
    }

    /// Make the consumers match the established links and their topics.
    async fn reconcile(&mut self, pub_ch: &Channel) -> Result<(), lapin::Error> {
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
        for (id, (inst, topics)) in &want {
            if !self.instances.contains_key(id) {
                let ch = self.conn.create_channel().await?;
                ch.basic_qos(self.cfg.prefetch, BasicQosOptions::default())
                    .await?;
                self.instances.insert(
                    id.clone(),
                    InstConsumers {
                        ch,
                        tags: HashMap::new(),
                    },
                );
            }
            let Some(c) = self.instances.get_mut(id) else {
                continue;
            };
            let have: Vec<String> = c.tags.keys().cloned().collect();
            for t in have.iter().filter(|t| !topics.contains(t)) {
                if let Some(tag) = c.tags.remove(t) {
                    let _ = c.ch.basic_cancel(tag, BasicCancelOptions::default()).await;
                }
            }
            let missing: Vec<&String> =
                topics.iter().filter(|t| !c.tags.contains_key(*t)).collect();
            for t in missing {
                let queue = format!("{t}.{id}");
                let Ok(q) = short(&queue) else {
                    warn!(instance = %id, topic = %t, "queue name too long for AMQP; topic not served over the broker");
                    continue;
                };
                let mut args = FieldTable::default();
                if self.cfg.quorum_queues {
                    args.insert(
                        "x-queue-type".into(),
                        AMQPValue::LongString("quorum".into()),
                    );
                }
                c.ch.queue_declare(
                    q.clone(),
                    QueueDeclareOptions {
                        durable: self.cfg.durable,
                        ..Default::default()
                    },
                    args,
                )
                .await?;
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
                info!(instance = %id, queue = %queue, "consuming");
                c.tags.insert(t.clone(), consumer.tag());
                tokio::spawn(consume(
                    consumer,
                    Target::One(inst.clone()),
                    t.clone(),
                    pub_ch.clone(),
                    self.cfg.requeue_grace_ms,
                ));
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
            if let Some((ch, tag)) = self.fanout.remove(&t) {
                let _ = ch.basic_cancel(tag, BasicCancelOptions::default()).await;
                let _ = ch.close(200, "topic no longer served here".into()).await;
            }
        }
        for t in served {
            if self.fanout.contains_key(&t) {
                continue;
            }
            let exchange = format!("{t}_fanout");
            let queue = format!("{exchange}_{}", self.names.proxy_id);
            let (Ok(ex), Ok(q)) = (short(&exchange), short(&queue)) else {
                continue;
            };
            let ch = self.conn.create_channel().await?;
            ch.basic_qos(self.cfg.prefetch, BasicQosOptions::default())
                .await?;
            ch.exchange_declare(
                ex.clone(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: self.cfg.durable,
                    auto_delete: !self.cfg.durable,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
            ch.queue_declare(
                q.clone(),
                QueueDeclareOptions::default(),
                self.queue_args(false),
            )
            .await?;
            ch.queue_bind(
                q.clone(),
                ex,
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
            let consumer = ch
                .basic_consume(
                    q,
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            info!(queue = %queue, "consuming fanout");
            let tag = consumer.tag();
            tokio::spawn(consume(
                consumer,
                Target::Fanout(self.proxy.clone()),
                t.clone(),
                pub_ch.clone(),
                self.cfg.requeue_grace_ms,
            ));
            self.fanout.insert(t, (ch, tag));
        }
        Ok(())
    }
}

fn routing_key(r: &Request) -> String {
    match &r.target.server {
        Some(s) => format!("{}.{s}", r.target.topic),
        None => r.target.topic.clone(),
    }
}

/// Who a consumer's deliveries go to.
#[derive(Clone)]
enum Target {
    One(Arc<Instance>),
    /// Every local instance serving the topic, at delivery time.
    Fanout(Arc<Proxy>),
}

async fn consume(
    mut consumer: lapin::Consumer,
    target: Target,
    topic: String,
    pub_ch: Channel,
    grace_ms: u64,
) {
    while let Some(d) = consumer.next().await {
        match d {
            Ok(d) => {
                tokio::spawn(deliver(
                    d,
                    target.clone(),
                    topic.clone(),
                    pub_ch.clone(),
                    grace_ms,
                ));
            }
            Err(e) => {
                debug!(topic = %topic, error = %e, "consumer ended");
                break;
            }
        }
    }
}

/// Wait until the guest acknowledged `r`, or decide it will not: `false`
/// when the link stayed down for `grace` or the guest never acknowledged.
async fn guest_acked(inst: &Instance, r: SendReceipt, grace: Duration) -> bool {
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
        r = inst.tx.wait_acked(r) => r.is_ok(),
        _ = down_too_long => false,
        _ = tokio::time::sleep(GUEST_ACK_BOUND) => false,
    }
}

async fn send_to(inst: &Instance, req: &Request, grace: Duration) -> bool {
    match inst.tx.send(LinkMsg::Req(req.clone()).to_bytes()).await {
        Ok(r) => guest_acked(inst, r, grace).await,
        Err(e) => {
            warn!(instance = %inst.id, error = %e, "cannot queue a delivery for the guest");
            false
        }
    }
}

async fn deliver(
    d: lapin::message::Delivery,
    target: Target,
    topic: String,
    pub_ch: Channel,
    grace_ms: u64,
) {
    let grace = Duration::from_millis(grace_ms);
    let expiration = d
        .properties
        .expiration()
        .as_ref()
        .and_then(|s| s.as_str().parse::<u64>().ok());
    let (server, fanout) = match &target {
        Target::One(i) => (Some(i.id.as_str()), false),
        Target::Fanout(_) => (None, true),
    };
    let inc = match wire::decode_request(&d.data, &topic, server, expiration, fanout) {
        Ok(i) => i,
        Err(e) => {
            warn!(topic = %topic, error = %e, "malformed oslo message rejected");
            let _ = d.acker.reject(BasicRejectOptions { requeue: false }).await;
            return;
        }
    };
    let inst = match target {
        Target::Fanout(p) => {
            let targets: Vec<_> = p
                .instances()
                .into_iter()
                .filter(|i| i.tx.status().established && i.topics().contains(&topic))
                .collect();
            let sends = targets.iter().map(|i| send_to(i, &inc.request, grace));
            let ok = futures_util::future::join_all(sends).await;
            if ok.iter().all(|x| *x) {
                let _ = d.acker.ack(BasicAckOptions::default()).await;
            } else {
                // Some guests did not take it: those that did drop the
                // redelivery by its unique id.
                let _ = d
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
            }
            return;
        }
        Target::One(i) => i,
    };
    let req = inc.request;
    let call = req.kind == Kind::Call;
    let waiter = match (&req.msg_id, call) {
        (Some(m), true) => Some((m.clone(), inst.expect_reply(m))),
        _ => None,
    };
    if !send_to(&inst, &req, grace).await {
        if let Some((m, _)) = &waiter {
            inst.forget(m);
        }
        debug!(instance = %inst.id, topic = %topic, "delivery requeued: the guest did not take it");
        let _ = d
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await;
        return;
    }
    let _ = d.acker.ack(BasicAckOptions::default()).await;
    let (Some((msg_id, rx)), Some(reply_q)) = (waiter, inc.reply_q) else {
        return;
    };
    let limit = expiration.map_or(DEFAULT_CALL_TIMEOUT, Duration::from_millis);
    let beat = inc
        .monitor_secs
        .filter(|s| *s > 0.0)
        .map(|s| Duration::from_secs_f64(s / 2.0));
    let reply = tokio::time::timeout(limit, async {
        tokio::pin!(rx);
        let mut hb = beat.map(|b| tokio::time::interval_at(tokio::time::Instant::now() + b, b));
        loop {
            tokio::select! {
                r = &mut rx => return r.ok(),
                _ = async { match &mut hb { Some(h) => { h.tick().await; } None => std::future::pending().await } } => {
                    publish_reply(&pub_ch, &reply_q, wire::encode_heartbeat(&msg_id)).await;
                }
            }
        }
    })
    .await;
    match reply {
        Ok(Some(r)) => publish_reply(&pub_ch, &reply_q, wire::encode_reply(&r)).await,
        // The caller times out by itself; if the guest answers later (or
        // through another proxy after a migration), that reply is routed
        // by its reply_to.
        _ => inst.forget(&msg_id),
    }
}

async fn publish_reply(ch: &Channel, reply_q: &str, body: Vec<u8>) {
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
