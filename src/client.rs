//! A client for sub-agents written in Rust: connect to the super-agent's
//! socket, register topics, receive requests, reply, and cast or call
//! upstream. The wire protocol is in `docs/subagent.md`.
//!
//! ```no_run
//! # async fn example() -> Result<(), tether::client::ClientError> {
//! use tether::client::{Incoming, SubAgent};
//! let mut sa = SubAgent::connect_default("my-agent", &["lbaas"]).await?;
//! while let Some(req) = sa.next_request().await? {
//!     if req.is_call() {
//!         sa.reply(req.id, Ok(req.args.clone())).await?;
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::Path;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_util::codec::{Framed, LinesCodec};

use crate::guest::subagent::{FromSub, ToSub};
use crate::link::driver::QuietUnixStream;
use crate::rpc::{Failure, Kind, Target};

/// Longest line the client accepts from the agent.
pub const MAX_LINE: usize = 1024 * 1024;
/// Cast refusals kept until [`SubAgent::next_refusal`] takes them; older
/// ones are dropped (they are in the agent's log too).
pub const MAX_REFUSALS_KEPT: usize = 1024;

/// A cast of ours that the host did not pass on.
#[derive(Debug, Clone, PartialEq)]
pub struct CastRefused {
    /// Where it was going.
    pub target: Target,
    /// Its method.
    pub method: String,
    /// Why (`Denied: ...`, `BrokerUnavailable: ...`, `NoRoute: ...`).
    pub reason: String,
}

/// What can go wrong in a sub-agent client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting to the socket.
    #[error("cannot connect to the agent socket {path}")]
    Connect {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed or closed.
    #[error("agent connection failed: {0}")]
    Io(String),
    /// The agent refused something.
    #[error("the agent refused: {0}")]
    Refused(String),
    /// The agent sent something this client does not understand.
    #[error("unexpected message from the agent: {0}")]
    Protocol(String),
}

/// A request for this sub-agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// Request id (reply with it).
    pub id: u64,
    /// Stable across resends: for handlers that want their own idempotency.
    pub unique_id: String,
    /// Call or cast.
    pub kind: Kind,
    /// Target topic etc.
    pub target: Target,
    /// Method name.
    pub method: String,
    /// Arguments.
    pub args: Value,
    /// Context (the host stamps identity in it).
    pub ctx: Value,
    /// Time left to answer, if set.
    pub timeout_ms: Option<u64>,
}

impl Incoming {
    /// Whether an answer is expected.
    pub fn is_call(&self) -> bool {
        self.kind == Kind::Call
    }
}

/// A connected sub-agent.
pub struct SubAgent {
    framed: Framed<QuietUnixStream, LinesCodec>,
    /// Answers to our upstream calls that arrived while waiting for other things.
    results: HashMap<u64, Result<Value, Failure>>,
    /// Requests that arrived while waiting for a call result.
    queued: std::collections::VecDeque<Incoming>,
    /// Cast refusals not taken yet (at most [`MAX_REFUSALS_KEPT`]).
    refused: std::collections::VecDeque<CastRefused>,
    next_call: u64,
}

impl SubAgent {
    /// Connect to `$TETHER_AGENT_SOCKET` (set by the supervisor) or the
    /// default socket, and register `topics`.
    pub async fn connect_default(name: &str, topics: &[&str]) -> Result<Self, ClientError> {
        let path = std::env::var("TETHER_AGENT_SOCKET")
            .unwrap_or_else(|_| crate::guest::config::DEFAULT_SUBAGENT_SOCKET.into());
        Self::connect(Path::new(&path), name, topics).await
    }

    /// Connect to `path` and register `topics`.
    pub async fn connect(path: &Path, name: &str, topics: &[&str]) -> Result<Self, ClientError> {
        Self::connect_opts(path, name, topics, false).await
    }

    /// Like [`Self::connect_default`], registered with `ack`: confirm each
    /// request with [`Self::took`] (or a call's reply) once you have it
    /// safely; what you did not confirm goes to the next sub-agent of its
    /// topic if this one goes away (see `docs/subagent.md`).
    pub async fn connect_default_ack(name: &str, topics: &[&str]) -> Result<Self, ClientError> {
        let path = std::env::var("TETHER_AGENT_SOCKET")
            .unwrap_or_else(|_| crate::guest::config::DEFAULT_SUBAGENT_SOCKET.into());
        Self::connect_opts(Path::new(&path), name, topics, true).await
    }

    /// Connect to `path` and register `topics`, with or without `ack`.
    pub async fn connect_opts(
        path: &Path,
        name: &str,
        topics: &[&str],
        ack: bool,
    ) -> Result<Self, ClientError> {
        let s = QuietUnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let mut me = Self {
            framed: Framed::new(s, LinesCodec::new_with_max_length(MAX_LINE)),
            results: HashMap::new(),
            queued: Default::default(),
            refused: Default::default(),
            next_call: 1,
        };
        me.send(&FromSub::Register {
            ack,
            name: name.into(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
        })
        .await?;
        loop {
            match me.read().await? {
                ToSub::Registered { .. } => return Ok(me),
                ToSub::Error { message } => return Err(ClientError::Refused(message)),
                other => me.stash(other)?,
            }
        }
    }

    async fn send(&mut self, m: &FromSub) -> Result<(), ClientError> {
        let line = serde_json::to_string(m).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.framed
            .send(line)
            .await
            .map_err(|e| ClientError::Io(e.to_string()))
    }

    async fn read(&mut self) -> Result<ToSub, ClientError> {
        match self.framed.next().await {
            Some(Ok(line)) => serde_json::from_str(&line)
                .map_err(|e| ClientError::Protocol(format!("{e}: {line}"))),
            Some(Err(e)) => Err(ClientError::Io(e.to_string())),
            None => Err(ClientError::Io("the agent closed the connection".into())),
        }
    }

    fn stash(&mut self, m: ToSub) -> Result<(), ClientError> {
        match m {
            ToSub::Request {
                id,
                unique_id,
                kind,
                target,
                method,
                args,
                ctx,
                timeout_ms,
                ..
            } => {
                self.queued.push_back(Incoming {
                    id,
                    unique_id,
                    kind,
                    target,
                    method,
                    args,
                    ctx,
                    timeout_ms,
                });
                Ok(())
            }
            ToSub::Result { id, result, error } => {
                self.results
                    .insert(id, crate::rpc::join_result(result, error));
                Ok(())
            }
            ToSub::CastRefused {
                target,
                method,
                reason,
            } => {
                tracing::warn!(topic = %target.topic, method = %method, reason = %reason, "a cast was refused by the host");
                if self.refused.len() >= MAX_REFUSALS_KEPT {
                    self.refused.pop_front();
                }
                self.refused.push_back(CastRefused {
                    target,
                    method,
                    reason,
                });
                Ok(())
            }
            ToSub::Error { message } => Err(ClientError::Refused(message)),
            ToSub::Registered { .. } => Ok(()),
        }
    }

    /// The next refusal of one of our casts (requests that arrive meanwhile
    /// are kept for [`Self::next_request`]).
    pub async fn next_refusal(&mut self) -> Result<CastRefused, ClientError> {
        loop {
            if let Some(r) = self.refused.pop_front() {
                return Ok(r);
            }
            let m = self.read().await?;
            self.stash(m)?;
        }
    }

    /// The next request; `Ok(None)` when the agent closed the connection.
    pub async fn next_request(&mut self) -> Result<Option<Incoming>, ClientError> {
        loop {
            if let Some(r) = self.queued.pop_front() {
                return Ok(Some(r));
            }
            match self.read().await {
                Ok(m) => self.stash(m)?,
                Err(ClientError::Io(_)) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Confirm request `id` (registered with `ack`).
    pub async fn took(&mut self, id: u64) -> Result<(), ClientError> {
        self.send(&FromSub::Took { id }).await
    }

    /// Answer a call.
    pub async fn reply(
        &mut self,
        id: u64,
        result: Result<Value, Failure>,
    ) -> Result<(), ClientError> {
        let (result, error) = crate::rpc::split_result(result);
        self.send(&FromSub::Reply { id, result, error }).await
    }

    /// Cast to the control plane.
    pub async fn cast(
        &mut self,
        target: Target,
        method: &str,
        args: Value,
    ) -> Result<(), ClientError> {
        self.cast_with_ctx(target, method, args, Value::Null).await
    }

    /// Cast with a request context. The host overwrites any identity in it.
    pub async fn cast_with_ctx(
        &mut self,
        target: Target,
        method: &str,
        args: Value,
        ctx: Value,
    ) -> Result<(), ClientError> {
        self.send(&FromSub::Cast {
            target,
            method: method.into(),
            args,
            ctx,
        })
        .await
    }

    /// Call the control plane and wait for the answer (requests that arrive
    /// meanwhile are kept for [`Self::next_request`]).
    pub async fn call(
        &mut self,
        target: Target,
        method: &str,
        args: Value,
        timeout_ms: Option<u64>,
    ) -> Result<Result<Value, Failure>, ClientError> {
        let id = self.next_call;
        self.next_call += 1;
        self.send(&FromSub::Call {
            id,
            target,
            method: method.into(),
            args,
            ctx: Value::Null,
            timeout_ms,
        })
        .await?;
        loop {
            if let Some(r) = self.results.remove(&id) {
                return Ok(r);
            }
            let m = self.read().await?;
            self.stash(m)?;
        }
    }
}
