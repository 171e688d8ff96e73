//! The sub-agent socket: JSON lines between the super-agent and its
//! sub-agents (specified in `docs/subagent.md`).
//!
//! One task per connection reads lines and hands parsed messages to the
//! router; the router writes back through a bounded queue per connection, so
//! a slow or stuck sub-agent never blocks the router or other sub-agents.

use std::path::Path;

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LinesCodec, LinesCodecError};
use tracing::{debug, warn};

use crate::rpc::{Failure, Kind, Target};

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
    /// It disconnected.
    Gone(ConnId),
}

/// Per-connection outgoing queue: requests beyond this many unread by the
/// sub-agent are refused (calls get an error reply) instead of queuing without
/// bound.
pub const SUB_QUEUE: usize = 1024;

/// Bind the socket with mode 0600 (see [`crate::daemon::bind_unix`]).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    crate::daemon::bind_unix(path, 0o600)
}

/// Accept sub-agents forever, one task each.
pub async fn serve(listener: UnixListener, max_line: usize, events: mpsc::Sender<SubEvent>) {
    let mut next: ConnId = 1;
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let id = next;
                next += 1;
                tokio::spawn(connection(id, s, max_line, events.clone()));
            }
            Err(e) => {
                warn!(error = %e, "sub-agent socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(id: ConnId, s: UnixStream, max_line: usize, events: mpsc::Sender<SubEvent>) {
    let (tx, mut rx) = mpsc::channel::<ToSub>(SUB_QUEUE);
    if events.send(SubEvent::Connected(id, tx)).await.is_err() {
        return;
    }
    let mut framed = Framed::new(s, LinesCodec::new_with_max_length(max_line));
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(m) => {
                    let line = serde_json::to_string(&m).unwrap_or_default();
                    if framed.send(line).await.is_err() {
                        break;
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
    let _ = events.send(SubEvent::Gone(id)).await;
}
