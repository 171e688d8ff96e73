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
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

mod upstream;

use upstream::{PendingCall, Pipeline};

use super::deliver::{Target, consume};
use super::{
    BridgeError, BrokerConfig, DECLARE_RETRY_AFTER, Names, RECONCILE_EVERY, StreamOffsets,
    Upstream, short, wire,
};
use crate::host::Proxy;
use crate::host::instance::Instance;
use crate::rpc::LinkMsg;

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
    /// Guest messages published and waiting for their confirms.
    pipe: Pipeline,
    /// When the channel limit was last reported, and how many were not
    /// served for it since.
    channel_warned: Option<Instant>,
    channel_limited: u64,
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
            pipe: Pipeline::default(),
            channel_warned: None,
            channel_limited: 0,
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
        // What was not confirmed goes first on the next connection, in
        // order; casts waiting for a route wait for it too.
        for m in self.pipe.take_unconfirmed().into_iter().rev() {
            held.push_front(m);
        }
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
        // The answers of guests to the control plane's calls (and their
        // heartbeats) go out on a channel of their own, to the default
        // exchange only: no guest message can make the broker close it.
        // (They shared the guests' publishing channel, which a guest's
        // message to an exchange that does not exist closes; the consumers
        // then published every answer on the closed channel.)
        let answers_ch = self.conn.create_channel().await?;
        answers_ch
            .confirm_select(ConfirmSelectOptions::default())
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
            self.submit(&mut pub_ch, m, Instant::now()).await?;
        }
        self.proxy.bridge.update(|s| s.held = 0);
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if !self.conn.status().connected() {
                        return Err(lapin::Error::from(std::io::Error::other("connection closed")).into());
                    }
                    self.reconcile(&answers_ch).await?;
                    let now = Instant::now();
                    self.calls.retain(|_, c| c.deadline > now);
                    while self.retry.front().is_some_and(|(_, next, _)| *next <= now) {
                        let Some((first, _, m)) = self.retry.pop_front() else { break };
                        self.submit(&mut pub_ch, m, first).await?;
                    }
                }
                d = replies.next() => match d {
                    Some(Ok(d)) => self.route_reply(&d.data).await,
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(lapin::Error::from(std::io::Error::other("reply consumer cancelled")).into()),
                },
                c = self.pipe.next_confirm(), if self.pipe.waiting() => {
                    if let Some(c) = c {
                        self.confirmed(c)?;
                    }
                    // A message that failed in company goes again, alone.
                    self.pump(&mut pub_ch).await?;
                }
                m = up_rx.recv() => match m {
                    Some(m) => self.submit(&mut pub_ch, m, Instant::now()).await?,
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

    /// Make the consumers match the established links and their topics.
    async fn reconcile(&mut self, answers_ch: &Channel) -> Result<(), BridgeError> {
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
            if let Err(e) = self.consume_instance(id, inst, topics, answers_ch).await {
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
            if let Err(e) = self.consume_fanout(t, answers_ch).await {
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

    /// A channel of its own for `what` (an instance, a fanout topic). One
    /// that cannot be opened while the connection is up hit the channel
    /// limit: that one is not served (and tried again later), not the
    /// connection ended — which would stop the bridge for every instance
    /// each time one more VM links past the limit.
    async fn channel_for(&self, what: String) -> Result<Channel, BridgeError> {
        match self.conn.create_channel().await {
            Ok(ch) => Ok(ch),
            Err(source) if self.conn.status().connected() => {
                Err(BridgeError::Channel { what, source })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The broker refused a declaration for one instance or fanout topic
    /// (most often 406: the deployment declared that queue with other
    /// flags), or no channel was left for it: report it and leave that one
    /// alone for a while; the other instances keep being served. Any other
    /// error ends the connection.
    fn declaration_refused(&mut self, key: String, e: BridgeError) -> Result<(), BridgeError> {
        if !matches!(e, BridgeError::Declare { .. } | BridgeError::Channel { .. }) {
            return Err(e);
        }
        let why = crate::error_chain(&e);
        if matches!(e, BridgeError::Channel { .. }) {
            // One line per retry period however many VMs are past the
            // limit (each is tried again every period).
            self.channel_limited += 1;
            if self
                .channel_warned
                .is_none_or(|t| t.elapsed() >= DECLARE_RETRY_AFTER)
            {
                error!(what = ?key, error = %why, not_served = self.channel_limited, retry_in_s = DECLARE_RETRY_AFTER.as_secs(),
                       "no AMQP channel left: instances and fanout topics past the limit are not consumed; the rest is served");
                self.channel_warned = Some(Instant::now());
                self.channel_limited = 0;
            }
        } else {
            error!(what = ?key, error = %why, retry_in_s = DECLARE_RETRY_AFTER.as_secs(), "the broker refused a declaration; the rest is served");
        }
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
        answers_ch: &Channel,
    ) -> Result<(), BridgeError> {
        if !self.instances.contains_key(id) {
            let ch = self.channel_for(format!("instance {id}")).await?;
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
                answers_ch.clone(),
                self.cfg.requeue_grace_ms,
            ));
        }
        Ok(())
    }

    /// Consume the fanout of `topic`: this proxy's own classic queue, or
    /// the topic's shared stream from where this proxy left off.
    async fn consume_fanout(&mut self, t: String, answers_ch: &Channel) -> Result<(), BridgeError> {
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
        let ch = self.channel_for(format!("the fanout of {t}")).await?;
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
            answers_ch.clone(),
            self.cfg.requeue_grace_ms,
        ));
        self.fanout.insert(t, (ch, tag));
        Ok(())
    }
}
