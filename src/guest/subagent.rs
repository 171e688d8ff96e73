//! The sub-agent socket: JSON lines between the super-agent and its
//! sub-agents (specified in `docs/subagent.md`).
//!
//! One task per connection reads lines and hands parsed messages to the
//! router; the router writes back through a bounded queue per connection, so
//! a slow or stuck sub-agent never blocks the router or other sub-agents.

use std::path::Path;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LinesCodec, LinesCodecError};
use tracing::{debug, warn};

use super::journal::Journal;
use crate::link::driver::{LinkSender, QuietUnixStream};
use crate::rpc::{Failure, Kind, LinkMsg, Target};

/// Messages a sub-agent sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum FromSub {
    /// Serve these topics (replaces what this connection registered before).
    Register {
        /// A name for logs.
        name: String,
        /// Topics to serve.
        topics: Vec<String>,
        /// This sub-agent confirms each request with [`FromSub::Took`] (or,
        /// for a call, its reply) once it has it safely; until then a
        /// request it got is not taken, and goes to the next sub-agent of
        /// its topic if this one goes away. Without it, a request is taken
        /// once written to the socket.
        #[serde(default)]
        ack: bool,
    },
    /// The request `id` is taken (sub-agents that registered with `ack`).
    Took {
        /// The request id.
        id: u64,
    },
    /// The answer to a request (`id` from [`ToSub::Request`]).
    Reply {
        /// The request id.
        id: u64,
        /// The result on success.
        #[serde(default)]
        result: Option<Value>,
        /// The error on failure.
        #[serde(default)]
        error: Option<Failure>,
    },
    /// A cast to the control plane.
    Cast {
        /// Where to.
        target: Target,
        /// Method name.
        method: String,
        /// Arguments.
        #[serde(default)]
        args: Value,
        /// Context.
        #[serde(default)]
        ctx: Value,
    },
    /// An oslo notification to the control plane (what oslo's `Notifier`
    /// sends): `target.topic` is `<topic>.<priority>`; `message` holds
    /// `event_type`, `priority`, `payload` and, optionally, `publisher_id`,
    /// `message_id` and `timestamp`. Refusals come back as
    /// [`ToSub::CastRefused`] with the event type as `method`.
    Notify {
        /// Where to (`exchange` only if the profile allows it).
        target: Target,
        /// The notification.
        message: Value,
        /// Context.
        #[serde(default)]
        ctx: Value,
    },
    /// A call to the control plane; the answer comes as [`ToSub::Result`].
    Call {
        /// The sub-agent's own id for this call.
        id: u64,
        /// Where to.
        target: Target,
        /// Method name.
        method: String,
        /// Arguments.
        #[serde(default)]
        args: Value,
        /// Context.
        #[serde(default)]
        ctx: Value,
        /// How long to wait for the answer (default 60 s).
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
}

/// Messages the super-agent sends to a sub-agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToSub {
    /// Registration accepted.
    Registered {
        /// The topics now served by this connection.
        topics: Vec<String>,
    },
    /// A request to handle. Answer calls with [`FromSub::Reply`]; casts need
    /// no answer.
    Request {
        /// Request id, unique per connection.
        id: u64,
        /// The request's unique id, stable across resends: the agent runs
        /// each once, but a sub-agent with effects outside the VM may use it
        /// to make its own handling idempotent.
        unique_id: String,
        /// Call or cast (fanouts arrive as casts).
        kind: Kind,
        /// The target it was sent to.
        target: Target,
        /// Method name.
        method: String,
        /// Arguments.
        args: Value,
        /// Context.
        ctx: Value,
        /// Time left to answer, if the caller set one.
        #[serde(skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
        /// Agent-internal: taken once written (a sub-agent without `ack`):
        /// the writer journals it and sends the receipt.
        #[serde(skip)]
        taken_on_write: bool,
    },
    /// The answer to a [`FromSub::Call`].
    Result {
        /// The sub-agent's call id.
        id: u64,
        /// The result on success.
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<Value>,
        /// The error on failure.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<Failure>,
    },
    /// A cast this sub-agent sent went no further than the host: its policy
    /// denied it, or the control plane could not be reached in time.
    CastRefused {
        /// Where the cast was going.
        target: Target,
        /// Its method.
        method: String,
        /// Why (starts with a class-like word: `Denied`, `BrokerUnavailable`,
        /// `NoRoute`).
        reason: String,
    },
    /// Something the sub-agent sent was refused.
    Error {
        /// What and why.
        message: String,
    },
}

/// Identifies one sub-agent connection.
pub type ConnId = u64;

/// What a connection task tells the router.
#[derive(Debug)]
pub enum SubEvent {
    /// A sub-agent connected; write to it through `tx`.
    Connected(ConnId, mpsc::Sender<ToSub>),
    /// It sent a message.
    Message(ConnId, Box<FromSub>),
    /// It disconnected. With it, the requests queued for it that it never
    /// got (nothing was written, nothing journaled): the router holds them
    /// for the sub-agent that registers their topic next.
    Gone(ConnId, Vec<ToSub>),
    /// Request `id` was not written: the host cancelled it while it waited
    /// in the queue (the agent already answered the cancel).
    Skipped(ConnId, u64),
}

/// What the connection tasks do when a request is handed over: journal it
/// before writing it to the sub-agent's socket, tell the host after.
#[derive(Clone)]
pub struct Handover {
    /// The journal of taken requests.
    pub journal: Arc<Mutex<Journal>>,
    /// To the host, for `took`.
    pub link: LinkSender,
}

impl Handover {
    /// Record `unique_id` as taken (before it is handed over); false if
    /// the host cancelled it: it must not be handed over.
    pub fn take(&self, unique_id: &str) -> bool {
        crate::lock(&self.journal).take(unique_id)
    }

    /// Tell the host that a sub-agent took `unique_id`.
    pub async fn took(&self, unique_id: String) {
        let m = LinkMsg::Took { unique_id };
        if let Err(e) = self.link.send(m.to_bytes()).await {
            debug!(error = %e, "could not queue a receipt to the host");
        }
    }
}

/// Per-connection outgoing queue to the socket writer. Past it the router
/// keeps a sub-agent's requests in its backlog
/// ([`super::router::SUB_BACKLOG`]) and hands them over as the sub-agent
/// reads: backpressure, not drops.
pub const SUB_QUEUE: usize = 256;

/// Bind the socket with mode 0600, or 0660 for `group`
/// ([`crate::daemon::bind_unix_for`]).
pub fn bind(path: &Path, group: Option<&str>) -> std::io::Result<UnixListener> {
    crate::daemon::bind_unix_for(path, group)
}

/// Accept sub-agents forever, one task each.
pub async fn serve(
    listener: UnixListener,
    max_line: usize,
    events: mpsc::Sender<SubEvent>,
    handover: Handover,
) {
    let mut next: ConnId = 1;
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let id = next;
                next += 1;
                tokio::spawn(connection(
                    id,
                    s,
                    max_line,
                    events.clone(),
                    handover.clone(),
                ));
            }
            Err(e) => {
                warn!(error = %e, "sub-agent socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(
    id: ConnId,
    s: UnixStream,
    max_line: usize,
    events: mpsc::Sender<SubEvent>,
    handover: Handover,
) {
    // Woken to read only, not each time the sub-agent reads what the agent
    // wrote (QuietUnixStream).
    let s = match QuietUnixStream::from_tokio(s) {
        Ok(s) => s,
        Err(e) => {
            warn!(conn = id, error = %e, "sub-agent connection dropped: its socket could not be registered");
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<ToSub>(SUB_QUEUE);
    if events.send(SubEvent::Connected(id, tx)).await.is_err() {
        return;
    }
    let mut framed = Framed::new(s, LinesCodec::new_with_max_length(max_line));
    let mut unsent = vec![];
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(m) => {
                    let line = serde_json::to_string(&m).unwrap_or_default();
                    let uid = match &m {
                        ToSub::Request { id: req, unique_id, taken_on_write: true, .. } => {
                            if !handover.take(unique_id) {
                                debug!(conn = id, unique_id = %unique_id, "cancelled request not handed over");
                                if events.send(SubEvent::Skipped(id, *req)).await.is_err() {
                                    break;
                                }
                                continue;
                            }
                            Some(unique_id.clone())
                        }
                        _ => None,
                    };
                    if framed.send(line).await.is_err() {
                        // Not taken: held again for the next sub-agent (it
                        // may have reached the socket; the journal keeps
                        // it from running a third time).
                        unsent.push(m);
                        break;
                    }
                    if let Some(uid) = uid {
                        handover.took(uid).await;
                    }
                }
                None => break,
            },
            line = framed.next() => match line {
                Some(Ok(line)) => {
                    if line.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<FromSub>(&line) {
                        Ok(m) => {
                            if events.send(SubEvent::Message(id, Box::new(m))).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            debug!(conn = id, error = %e, "malformed line from sub-agent");
                            let m = ToSub::Error { message: format!("malformed message: {e}") };
                            let _ = framed.send(serde_json::to_string(&m).unwrap_or_default()).await;
                        }
                    }
                }
                Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                    warn!(conn = id, max_line, "sub-agent sent an oversized line; closing its connection");
                    let m = ToSub::Error {
                        message: format!("line longer than {max_line} bytes; connection closed"),
                    };
                    let _ = framed.send(serde_json::to_string(&m).unwrap_or_default()).await;
                    break;
                }
                Some(Err(e)) => {
                    debug!(conn = id, error = %e, "sub-agent connection failed");
                    break;
                }
                None => break,
            },
        }
    }
    rx.close();
    while let Ok(m) = rx.try_recv() {
        unsent.push(m);
    }
    let _ = events.send(SubEvent::Gone(id, unsent)).await;
}
