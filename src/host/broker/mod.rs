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
mod deliver;
mod session;
pub mod share;
pub mod url;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

pub use config::BrokerConfig;

use super::Proxy;
use super::instance::{answer, refuse_cast};
use crate::lock;
use crate::rpc::{Failure, Reply, Request};
use session::Session;
use share::{ShareUsed, Shares, Ticket};

/// How often consumers are reconciled with the instances' links and topics.
const RECONCILE_EVERY: Duration = Duration::from_millis(200);
/// An instance's or fanout topic's declaration the broker refused is tried
/// again after this long (a deployment fixing its queues is an operator's
/// action: seconds are soon enough, and the broker is not hammered).
const DECLARE_RETRY_AFTER: Duration = Duration::from_secs(10);
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

/// Why a broker connection ended.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The AMQP connection or a channel failed.
    #[error("AMQP")]
    Amqp(#[from] lapin::Error),
    /// The broker refused a declaration: most often 406 PRECONDITION_FAILED
    /// because the deployment declared the object with other flags.
    #[error(
        "declaring the {what} {name:?} failed; do broker.durable, quorum_queues, transient_quorum_queues and stream_fanout match how the deployment's services declare it?"
    )]
    Declare {
        /// Exchange or queue, and its role.
        what: &'static str,
        /// Its name.
        name: String,
        /// What the broker said.
        #[source]
        source: lapin::Error,
    },
    /// No channel could be opened for one instance or fanout topic while
    /// the connection is up: the connection's channel limit is reached.
    #[error(
        "no AMQP channel for {what}: the connection's channel limit is reached (each linked instance serving topics takes one, each fanout topic one; see broker.channel_max and the broker's channel_max)"
    )]
    Channel {
        /// The instance or fanout topic.
        what: String,
        /// What the AMQP client said.
        #[source]
        source: lapin::Error,
    },
    /// The bridge was told to stop.
    #[error("the bridge stopped")]
    Stopped,
}

/// The bridge's state, for the control socket's `broker` op.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BridgeStatus {
    /// Connected and serving: the declarations were accepted and the reply
    /// queue is consumed.
    pub connected: bool,
    /// The broker connected to, or last tried (credentials redacted).
    pub broker: String,
    /// When the current connection came up (Unix ms), or 0.
    pub up_since_unix_ms: u64,
    /// AMQP connections opened since start (also those whose declarations
    /// were then refused).
    pub connects: u64,
    /// Why the last connection attempt or connection ended, or the last
    /// declaration the broker refused.
    pub last_error: Option<String>,
    /// Guest messages waiting for the broker.
    pub held: usize,
    /// Instances with at least one `<topic>.<instance>` queue consumed.
    pub instances_consumed: usize,
    /// `<topic>.<instance>` queues consumed, all instances together.
    pub server_queues: usize,
    /// Topics whose fanout queue is consumed.
    pub fanout_topics: usize,
    /// Deliveries handed to guests and acknowledged to the broker.
    pub delivered: u64,
    /// Deliveries given back to the broker (the guest did not take them).
    pub requeued: u64,
    /// Guest messages published upstream.
    pub published: u64,
    /// Guest messages refused or dropped (each logged on the `audit` target).
    pub refused: u64,
    /// Guest messages published again, alone, because the broker closed
    /// the publishing channel over another message while they waited for
    /// their confirms (they may reach the control plane twice; oslo drops
    /// the duplicates it still remembers).
    pub published_again: u64,
    /// Fanouts a guest did not take in time (`FANOUT_QUEUE_BOUND`: not
    /// delivered to it; `FANOUT_TAKE_BOUND`: kept for it, acknowledged for
    /// the others).
    pub fanouts_missed: u64,
}

/// Shared handle on the bridge's status.
#[derive(Debug, Default)]
pub struct StatusCell(Mutex<BridgeStatus>);

impl StatusCell {
    /// Change it.
    pub fn update(&self, f: impl FnOnce(&mut BridgeStatus)) {
        f(&mut lock(&self.0))
    }

    /// A copy.
    pub fn get(&self) -> BridgeStatus {
        lock(&self.0).clone()
    }
}

/// Where instances hand guest messages to the bridge (a bounded queue of
/// `upstream_hold`, of which each instance may use its share,
/// `upstream_per_instance` messages and `upstream_bytes_per_instance`
/// bytes); what does not fit is counted as refused.
#[derive(Clone)]
pub struct Outlet {
    tx: mpsc::Sender<Upstream>,
    status: Arc<StatusCell>,
    shares: Arc<Shares>,
}

/// Why [`Outlet::offer`] did not take a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotTaken {
    /// The instance already has its share waiting.
    ShareUsed(ShareUsed),
    /// The bridge's queue is full.
    Full,
}

impl Outlet {
    /// An outlet into `tx`, counting refusals in `status`, with shares of
    /// `per_instance` messages and `bytes_per_instance` bytes.
    pub fn new(
        tx: mpsc::Sender<Upstream>,
        status: Arc<StatusCell>,
        per_instance: usize,
        bytes_per_instance: usize,
    ) -> Self {
        Self {
            tx,
            status,
            shares: Shares::new(per_instance, bytes_per_instance),
        }
    }

    /// Queue `m` (`bytes` long on the link) for the bridge, charged to its
    /// instance's share.
    pub fn offer(&self, mut m: Upstream, bytes: usize) -> Result<(), NotTaken> {
        let res = match &mut m {
            Upstream::Cast {
                instance, ticket, ..
            }
            | Upstream::Call {
                instance, ticket, ..
            } => match self.shares.take(instance, bytes) {
                Ok(t) => {
                    *ticket = Some(t);
                    Ok(())
                }
                Err(used) => Err(NotTaken::ShareUsed(used)),
            },
            Upstream::Reply(_) => Ok(()),
        };
        let res = res.and_then(|()| self.tx.try_send(m).map_err(|_| NotTaken::Full));
        if res.is_err() {
            self.status.update(|s| s.refused += 1);
        }
        res
    }
}

/// A guest message for the control plane, past the enforcement point.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// A cast from `instance` (identity already stamped into its context).
    Cast {
        /// Who cast.
        instance: String,
        /// The cast.
        request: Request,
        /// Its claim on the instance's share (set by [`Outlet::offer`]).
        ticket: Option<Ticket>,
    },
    /// A call from `instance`; its reply goes back into that guest.
    Call {
        /// Who asked.
        instance: String,
        /// The call.
        request: Request,
        /// Its claim on the instance's share (set by [`Outlet::offer`]).
        ticket: Option<Ticket>,
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

/// Stream offsets kept for topics no local guest serves at the moment
/// (beyond this, such a topic's offset is forgotten and it restarts at
/// `next`): guests choose topic names, so the map needs a bound; a proxy's
/// guests serve far fewer topics.
const MAX_IDLE_STREAM_OFFSETS: usize = 4096;

/// Where each stream fanout consumer goes on after a reconnect: the
/// offset after the last delivery it saw, per topic (as oslo.messaging
/// keeps it), so a broker blip neither replays nor skips fanouts.
pub(crate) type StreamOffsets = Arc<Mutex<HashMap<String, i64>>>;

/// Run the bridge until the proxy stops (the task is aborted).
pub async fn run(proxy: Arc<Proxy>, cfg: BrokerConfig, mut up_rx: mpsc::Receiver<Upstream>) {
    let uris = match cfg.amqp_uris() {
        Ok(u) if !u.is_empty() => u,
        Ok(_) => return error!("broker disabled: the transport_url names no host"),
        Err(e) => return error!(error = %e, "broker disabled"),
    };
    let id = crate::random_u64();
    let names = Names {
        reply_q: format!("reply_tether_{id:016x}"),
        proxy_id: format!("{id:016x}"),
    };
    let offsets = StreamOffsets::default();
    let mut held: VecDeque<Upstream> = VecDeque::new();
    let mut backoff = crate::backoff::Backoff::new(
        Duration::from_millis(cfg.reconnect_min_ms),
        Duration::from_millis(cfg.reconnect_max_ms),
    );
    let status = &proxy.bridge;
    for attempt in 0usize.. {
        let Some(uri) = uris.get(attempt % uris.len()) else {
            return;
        };
        let shown = config::redacted(uri);
        status.update(|s| s.broker = shown.clone());
        match connect(uri, &cfg).await {
            Ok(conn) => {
                info!(broker = %shown, "connected to the broker");
                status.update(|s| s.connects += 1);
                let mut s = Session::new(&proxy, &cfg, &names, &offsets, conn);
                let why = crate::error_chain(&s.serve(&mut up_rx, &mut held).await);
                // A connection that never got to serve (a refused
                // declaration) keeps backing off rather than hammering.
                if s.served {
                    backoff.reset();
                }
                warn!(broker = %shown, error = %why, held = held.len(), "broker connection lost; links stay up, reconnecting");
                s.shutdown().await;
                status.update(|s| {
                    s.connected = false;
                    s.up_since_unix_ms = 0;
                    s.instances_consumed = 0;
                    s.server_queues = 0;
                    s.fanout_topics = 0;
                    s.last_error = Some(why);
                });
            }
            Err(why) => {
                warn!(broker = %shown, error = %why, "cannot connect to the broker");
                status.update(|s| s.last_error = Some(format!("cannot connect: {why}")));
            }
        }
        // While away: hold guest messages within the bound, refuse beyond.
        let until = tokio::time::Instant::now() + backoff.wait();
        loop {
            status.update(|s| s.held = held.len());
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                m = up_rx.recv() => match m {
                    Some(m) => hold(&proxy, &cfg, &mut held, m).await,
                    None => return,
                },
            }
        }
        backoff.grow();
    }
}

/// Open an AMQP connection to `uri` (over TLS with `ssl`, its certificate
/// files read now, so renewed ones are used from the next connection on),
/// within [`CONNECT_TIMEOUT`]. `Err` is the reason, worded for the operator.
async fn connect(uri: &str, cfg: &BrokerConfig) -> Result<Connection, String> {
    let tls = cfg.tls()?;
    let props = ConnectionProperties::default();
    let attempt = async {
        match tls {
            Some(tls) => {
                let rt = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
                Connection::connect_with_config(uri, props, tls, rt).await
            }
            None => Connection::connect(uri, props).await,
        }
        .map_err(|e| explain_connect_error(&crate::error_chain(&e), cfg.ssl))
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err("connect timed out".into()))
}

/// The AMQP client's reason, with what to check when it is about TLS.
fn explain_connect_error(e: &str, tls: bool) -> String {
    let l = e.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| l.contains(w));
    if tls && has(&["certificaterequired"]) {
        format!(
            "TLS: the broker asks for a client certificate ({e}); set broker.ssl_cert_file and broker.ssl_key_file"
        )
    } else if tls && has(&["notvalidforname"]) {
        format!(
            "TLS: the broker's certificate does not name the host in transport_url ({e}); connect by a name or address it was issued for"
        )
    } else if tls
        && has(&[
            "invalid peer certificate",
            "unknownissuer",
            "badsignature",
            "expired",
        ])
    {
        format!(
            "TLS: the broker's certificate was not accepted ({e}); check broker.ssl_ca_file (the CA that signed it)"
        )
    } else if tls && has(&["alert", "handshake", "corrupt message", "tls"]) {
        format!("TLS handshake failed ({e}); is this port the broker's TLS listener?")
    } else if !tls
        && has(&[
            "connection reset",
            "unexpected end",
            "eof",
            "closed",
            "broken pipe",
        ])
    {
        format!(
            "{e}; if this port is the broker's TLS listener, set broker.ssl = true (or ssl=true in transport_url)"
        )
    } else {
        e.to_string()
    }
}

/// Keep `m` for when the broker is back, or refuse it clearly.
async fn hold(proxy: &Proxy, cfg: &BrokerConfig, held: &mut VecDeque<Upstream>, m: Upstream) {
    if held.len() < cfg.upstream_hold {
        held.push_back(m);
        return;
    }
    proxy.bridge.update(|s| s.refused += 1);
    match m {
        Upstream::Call {
            instance, request, ..
        } => {
            warn!(target: "audit", instance = %instance, method = ?request.method, "guest call refused: broker unreachable and the hold is full");
            if let (Some(inst), Some(msg_id)) = (proxy.instance(&instance), request.msg_id) {
                let f = Failure::tether(
                    "BrokerUnavailable",
                    format!(
                        "the control plane's broker is unreachable and {} messages already wait",
                        cfg.upstream_hold
                    ),
                );
                answer(&inst, msg_id, request.reply_to, f);
            }
        }
        Upstream::Cast {
            instance,
            request: r,
            ..
        } => {
            error!(target: "audit", instance = %instance, method = ?r.method, topic = ?r.target.topic, unique_id = ?r.unique_id, "guest cast refused: broker unreachable and the hold is full");
            if let Some(inst) = proxy.instance(&instance) {
                let why = format!(
                    "BrokerUnavailable: the control plane's broker is unreachable and {} messages already wait",
                    cfg.upstream_hold
                );
                refuse_cast(&inst, r.unique_id, why);
            }
        }
        Upstream::Reply(r) => {
            error!(msg_id = ?r.msg_id, "reply refused: broker unreachable and the hold is full")
        }
    }
}

struct Names {
    reply_q: String,
    proxy_id: String,
}

#[cfg(test)]
mod tests {
    use super::explain_connect_error as explain;

    #[test]
    fn tls_failures_say_what_to_check() {
        // The AMQP client's words, as seen against RabbitMQ (tests/tls.rs).
        let e = "IO error: received fatal alert: CertificateRequired";
        assert!(explain(e, true).contains("broker.ssl_cert_file"));
        let e = "IO error: invalid peer certificate: UnknownIssuer";
        assert!(explain(e, true).contains("broker.ssl_ca_file"));
        let e = "IO error: invalid peer certificate: NotValidForName";
        assert!(explain(e, true).contains("does not name the host"));
        let e = "IO error: Connection reset by peer (os error 104)";
        assert!(explain(e, false).contains("set broker.ssl = true"));
        assert_eq!(explain("connection refused", false), "connection refused");
    }
}
