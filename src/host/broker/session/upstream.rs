//! Guest messages published upstream, pipelined: up to
//! [`PUBLISH_PIPELINE`] publishes wait for the broker's confirms at once,
//! and their outcomes are taken in the order they were published (the
//! confirms of one channel come in that order too). One broker round trip
//! per guest message capped what a guest could send the control plane.
//!
//! What the pipeline must not do is let one guest's bad message cost its
//! neighbours theirs. The broker closes the publishing channel over a
//! message it will not take (an exchange that does not exist or that the
//! proxy's user may not write), and every publish still waiting on that
//! channel fails with it, whose ever it was. So:
//! - a message goes out alone (the pipeline drained before and after it)
//!   unless its exchange already took a message on this connection, and a
//!   notification alone until its queue is declared: a guest naming an
//!   exchange that does not exist fails by itself, as before pipelining;
//! - a publish that fails in company (an exchange deleted under us, a
//!   declaration that closed the channel) is not refused: it goes out
//!   again, alone, once the channel is open again — only the message that
//!   fails alone is refused to its guest. At most [`PUBLISH_PIPELINE`]
//!   messages are sent again per closed channel.

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use futures_util::stream::FuturesOrdered;
use lapin::Channel;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Confirmation, PublisherConfirm};
use tracing::{debug, error, warn};

use super::super::{RETRY_EVERY, RETRY_FOR, Upstream, props, short, wire};
use super::{MAX_NOTIFY_QUEUES, Session};
use crate::host::instance::{answer, refuse_cast};
use crate::rpc::{Failure, Kind, Request, new_unique_id};
use std::time::Duration;

/// Publishes that may wait for their confirms at once. Each holds its
/// guest's share of the bridge meanwhile (`upstream_per_instance`), so
/// this bounds nothing new per guest; 64 covers a loopback or LAN broker's
/// round trip at the rates a control plane takes (about 1 ms × 64k/s),
/// and is what the proxy's consumers use as a prefetch.
pub const PUBLISH_PIPELINE: usize = 64;

/// Exchanges remembered as taking messages on one connection; past it the
/// set starts again (the next message to each goes out alone once).
pub const MAX_KNOWN_EXCHANGES: usize = 1024;

/// A publish waiting for its confirm.
pub(super) struct InFlight {
    m: Upstream,
    /// When it was first tried (unroutable casts retry for a while).
    first: Instant,
    /// Whether it went out with no other publish waiting.
    alone: bool,
}

/// The publishes in flight and what waits to be published.
#[derive(Default)]
pub(super) struct Pipeline {
    /// Oldest first; `confirms` holds their confirms in the same order.
    inflight: VecDeque<InFlight>,
    confirms: FuturesOrdered<PublisherConfirm>,
    /// Failed in company on a channel the broker closed: sent again,
    /// alone, before anything newer.
    again: VecDeque<(Instant, Upstream)>,
    /// Not sent yet (one message at most, past `again`).
    queue: VecDeque<(Instant, Upstream)>,
    /// Exchanges that took a message on this connection.
    known: HashSet<String>,
}

impl Pipeline {
    /// Everything not yet confirmed, oldest first, for the next connection.
    pub(super) fn take_unconfirmed(&mut self) -> Vec<Upstream> {
        self.confirms = FuturesOrdered::new();
        let mut v: Vec<Upstream> = self.inflight.drain(..).map(|f| f.m).collect();
        v.extend(self.again.drain(..).map(|(_, m)| m));
        v.extend(self.queue.drain(..).map(|(_, m)| m));
        v
    }

    /// Whether a confirm is awaited.
    pub(super) fn waiting(&self) -> bool {
        !self.inflight.is_empty()
    }

    /// The next confirm, in publish order.
    pub(super) async fn next_confirm(&mut self) -> Option<Result<Confirmation, lapin::Error>> {
        use futures_util::StreamExt;
        self.confirms.next().await
    }
}

/// Times in a row the publishing channel may be found closed again right
/// after it was opened before the connection is started afresh (with its
/// backoff): a broker that closes every channel must not spin the bridge.
const REOPENS_IN_A_ROW: u32 = 3;

impl Session<'_> {
    /// Publish a guest message, in the pipeline or alone (see the module
    /// doc); return once it is sent (alone: confirmed). `Err` only when the
    /// connection failed: it and everything not yet confirmed are kept for
    /// the next one ([`Pipeline::take_unconfirmed`]).
    pub(super) async fn submit(
        &mut self,
        ch: &mut Channel,
        m: Upstream,
        first: Instant,
    ) -> Result<(), lapin::Error> {
        self.pipe.queue.push_back((first, m));
        self.pump(ch).await
    }

    /// Send what `again` and `queue` hold, oldest first.
    pub(super) async fn pump(&mut self, ch: &mut Channel) -> Result<(), lapin::Error> {
        let mut reopens = 0;
        loop {
            let (from_again, alone) = match (self.pipe.again.front(), self.pipe.queue.front()) {
                (Some(_), _) => (true, true),
                (None, Some((_, m))) => (false, !self.may_pipeline(m)),
                (None, None) => return Ok(()),
            };
            let room = if alone { 0 } else { PUBLISH_PIPELINE - 1 };
            if self.pipe.inflight.len() > room {
                // A confirm may send something back to `again`: look again.
                self.settle(room).await?;
                continue;
            }
            if !ch.status().connected() {
                // The broker closed it over one message: what waited on
                // it has failed (and is in `again`); open a new one.
                reopens += 1;
                if reopens > REOPENS_IN_A_ROW {
                    return Err(lapin::Error::from(std::io::Error::other(
                        "the broker closed the publishing channel again at once",
                    )));
                }
                let c = self.conn.create_channel().await?;
                c.confirm_select(ConfirmSelectOptions::default()).await?;
                *ch = c;
                continue;
            }
            let deque = if from_again {
                &mut self.pipe.again
            } else {
                &mut self.pipe.queue
            };
            let Some((first, m)) = deque.pop_front() else {
                continue;
            };
            let begun = match self.begin(ch, &m).await {
                Ok(b) => b,
                Err(e) => {
                    self.put_back(from_again, first, m);
                    return Err(e);
                }
            };
            match begun {
                Begun::Settled(outcome) => self.settled(m, first, outcome),
                Begun::Waiting(confirm) => {
                    self.pipe.inflight.push_back(InFlight { m, first, alone });
                    self.pipe.confirms.push_back(confirm);
                    if alone {
                        self.settle(0).await?;
                    }
                    reopens = 0;
                }
                // The channel closed under it: it goes once one is open.
                Begun::Again => self.put_back(from_again, first, m),
            }
        }
    }

    fn put_back(&mut self, to_again: bool, first: Instant, m: Upstream) {
        if to_again {
            self.pipe.again.push_front((first, m));
        } else {
            self.pipe.queue.push_front((first, m));
        }
    }

    /// Take confirms until at most `room` wait.
    async fn settle(&mut self, room: usize) -> Result<(), lapin::Error> {
        while self.pipe.inflight.len() > room {
            match self.pipe.next_confirm().await {
                Some(res) => self.confirmed(res)?,
                None => break,
            }
        }
        Ok(())
    }

    /// The confirm of the oldest publish in flight.
    pub(super) fn confirmed(
        &mut self,
        res: Result<Confirmation, lapin::Error>,
    ) -> Result<(), lapin::Error> {
        let Some(f) = self.pipe.inflight.pop_front() else {
            return Ok(());
        };
        let outcome = match res {
            Ok(Confirmation::Ack(returned)) if returned.is_none() => Published::Done,
            Ok(Confirmation::Ack(_)) | Ok(Confirmation::Nack(_)) => Published::Unroutable,
            Ok(Confirmation::NotRequested) => Published::Done,
            Err(e) if !self.conn.status().connected() => {
                self.pipe.inflight.push_front(f);
                return Err(e);
            }
            // The connection is up, so the broker closed the channel over
            // this message (an exchange that does not exist, …) …
            Err(e) if f.alone => Published::Refused(e.to_string()),
            // … or over another one: this one goes again, alone.
            Err(_) => {
                self.pipe.known.clear();
                if let Upstream::Call {
                    instance, request, ..
                } = &f.m
                    && let Some(msg_id) = &request.msg_id
                {
                    self.calls
                        .retain(|_, c| !(c.instance == *instance && c.guest_id == *msg_id));
                }
                self.proxy.bridge.update(|s| s.published_again += 1);
                debug!("a guest message waiting on a closed publishing channel goes again, alone");
                self.pipe.again.push_back((f.first, f.m));
                return Ok(());
            }
        };
        if matches!(outcome, Published::Done) {
            if self.pipe.known.len() >= MAX_KNOWN_EXCHANGES {
                self.pipe.known.clear();
            }
            let ex = self.exchange_of(&f.m);
            self.pipe.known.insert(ex);
        }
        self.settled(f.m, f.first, outcome);
        Ok(())
    }

    /// The exchange `m` is published to (notifications: the control
    /// exchange, as oslo's notifier; replies: the default exchange).
    fn exchange_of(&self, m: &Upstream) -> String {
        match m {
            Upstream::Cast { request: r, .. } | Upstream::Call { request: r, .. } => r
                .target
                .exchange
                .clone()
                .filter(|_| r.kind != Kind::Notify)
                .unwrap_or_else(|| self.cfg.control_exchange.clone()),
            Upstream::Reply(_) => String::new(), // the default exchange
        }
    }

    /// Whether `m` may go out while other publishes wait: its exchange
    /// took a message on this connection, and it declares nothing.
    fn may_pipeline(&self, m: &Upstream) -> bool {
        if let Upstream::Reply(_) = m {
            return true; // the default exchange: it cannot be missing
        }
        if let Upstream::Cast { request: r, .. } = m
            && r.kind == Kind::Notify
            && self.declares_notify_queue(m)
            && !self.notify_queues.contains(&r.target.topic)
        {
            return false;
        }
        self.pipe.known.contains(&self.exchange_of(m))
    }

    /// Whether publishing the notification `m` declares its queue first.
    fn declares_notify_queue(&self, m: &Upstream) -> bool {
        let Upstream::Cast {
            instance,
            request: r,
            ..
        } = m
        else {
            return false;
        };
        // As oslo's notifier: the queue named by the routing key is
        // declared (once per connection) so that a notification nobody
        // consumes yet waits for its listener — only for a topic the
        // profile names exactly: a pattern would let the guest create
        // queues on the shared broker at will.
        r.kind == Kind::Notify
            && self.proxy.instance(instance).is_some_and(|inst| {
                crate::host::policy::declares_notify_queue(&inst.policy().profile, &r.target.topic)
            })
    }

    /// What the broker made of a message: what it could not route is
    /// retried (casts), answered (calls) or reported (replies); what it
    /// refused is refused to its sender — that message alone.
    fn settled(&mut self, m: Upstream, first: Instant, outcome: Published) {
        match outcome {
            Published::Done => {
                self.proxy.bridge.update(|s| s.published += 1);
                return;
            }
            Published::Refused(why) => {
                self.refused_by_broker(m, &why);
                return;
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

    /// Publish: settled at once (nothing to send, or refused before
    /// sending), or waiting for the broker's confirm.
    async fn begin(&mut self, ch: &Channel, m: &Upstream) -> Result<Begun, lapin::Error> {
        let exchange = self.exchange_of(m);
        let (key, body, props) = match m {
            Upstream::Cast { request: r, .. } if r.kind == Kind::Notify => {
                if self.declares_notify_queue(m)
                    && let Err(e) = self.ensure_notify_queue(ch, &r.target.topic).await
                {
                    if !self.conn.status().connected() {
                        return Err(e);
                    }
                    return Ok(Begun::Settled(Published::Refused(format!(
                        "declaring notification queue {}: {e}",
                        r.target.topic
                    ))));
                }
                (
                    r.target.topic.clone(),
                    wire::encode_notification(r),
                    props(),
                )
            }
            Upstream::Cast { request: r, .. } => {
                (routing_key(r), wire::encode_request(r, None), props())
            }
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
                    routing_key(r),
                    wire::encode_request(&upstream, Some(&self.names.reply_q)),
                    props().with_expiration(t.to_string().into()),
                )
            }
            Upstream::Reply(r) => match &r.reply_to {
                Some(q) => (q.clone(), wire::encode_reply(r), props()),
                None => return Ok(Begun::Settled(Published::Done)),
            },
        };
        let (Ok(exchange), Ok(key)) = (short(&exchange), short(&key)) else {
            // The enforcement point checks guest names; this is the last
            // line: a name AMQP cannot carry fails its message, not the link.
            return Ok(Begun::Settled(Published::Refused(
                "an exchange or routing key over 255 bytes".into(),
            )));
        };
        // Mandatory: what nothing is bound to take comes back (unroutable).
        let opts = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        match ch.basic_publish(exchange, key, opts, &body, props).await {
            Ok(confirm) => Ok(Begun::Waiting(confirm)),
            // The connection is up, so the broker closed the channel (over
            // this message or an earlier one): it goes again, alone.
            Err(_) if self.conn.status().connected() => Ok(Begun::Again),
            Err(e) => Err(e),
        }
    }
}

pub(super) fn routing_key(r: &Request) -> String {
    match &r.target.server {
        Some(s) => format!("{}.{s}", r.target.topic),
        None => r.target.topic.clone(),
    }
}

/// How a publish began.
enum Begun {
    /// Nothing waits: nothing to send, or refused before sending.
    Settled(Published),
    /// Sent; the broker's confirm says how it went.
    Waiting(PublisherConfirm),
    /// The channel was closed under it: send it again, alone.
    Again,
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
pub(super) struct PendingCall {
    pub(super) instance: String,
    /// The id the guest knows it by.
    pub(super) guest_id: String,
    pub(super) deadline: Instant,
    /// Its claim on the instance's share of the bridge.
    pub(super) _ticket: Option<super::super::Ticket>,
}
