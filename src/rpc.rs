//! The RPC envelope carried in link messages, and the guest's duplicate window.
//!
//! Every link message is one JSON object with a `t` tag:
//! - `req`: a call, cast or fanout (host → guest; guest → host for casts and
//!   calls a sub-agent sends upstream);
//! - `rep`: the reply to a call, carrying everything needed to route it (so a
//!   reply can leave through another host's proxy after a migration);
//! - `topics`: the topics the guest's sub-agents serve (guest → host);
//! - `refused`: a guest cast the host did not pass on — its policy denied
//!   it, or the broker is away and the hold is full, or nothing consumed its
//!   topic in time (host → guest, so the sub-agent that cast learns why).
//!
//! The format is documented in `docs/subagent.md` (what sub-agents see) and
//! here (what crosses the link).

use std::collections::{HashSet, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How many unique ids the guest remembers to drop redeliveries: a proxy
/// restart or a migration redelivers at most a send window's worth (1024
/// frames by default), so four windows is ample.
pub const DEDUP_WINDOW: usize = 4096;

/// Where a request goes, in oslo.messaging terms.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// The topic a sub-agent registered (`tether.supervisor` is built in).
    pub topic: String,
    /// The server (the instance uuid on the host side); informational here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// oslo namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// oslo version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// oslo exchange (guest → host only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange: Option<String>,
}

/// What kind of request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Expects exactly one reply.
    Call,
    /// No reply.
    Cast,
    /// A cast to every instance serving the topic.
    Fanout,
    /// Guest → host only: an oslo notification. `target.topic` is its
    /// routing key (`<topic>.<priority>`), `method` its event type, `args`
    /// the notification (`event_type`, `priority`, `payload`, …).
    Notify,
}

/// A request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Call, cast or fanout.
    pub kind: Kind,
    /// Where to.
    pub target: Target,
    /// The method name.
    pub method: String,
    /// Keyword arguments (a JSON object).
    #[serde(default)]
    pub args: Value,
    /// The request context (a JSON object). On guest → host traffic the proxy
    /// overwrites the identity in it.
    #[serde(default)]
    pub ctx: Value,
    /// Call id: the reply carries it back (calls only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    /// End-to-end id for duplicate suppression; stable across resends.
    pub unique_id: String,
    /// Where the reply goes (an opaque routing string of the host side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Time left for a call when it was sent, in milliseconds (clocks of host
    /// and guest differ, so remaining time travels, not a deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// An error raised by the remote side, oslo-style.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Exception class name (`ValueError`, `NoSuchMethod`...).
    pub class: String,
    /// Module of the class (`builtins` for Python builtins).
    pub module: String,
    /// The message.
    pub message: String,
}

impl Failure {
    /// A failure of class `class` in the `tether` module.
    pub fn tether(class: &str, message: impl Into<String>) -> Self {
        Self {
            class: class.into(),
            module: "tether".into(),
            message: message.into(),
        }
    }
}

/// The reply to a call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The call's id.
    pub msg_id: String,
    /// The call's reply routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// The result on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// False for a heartbeat ("still working"), true for the final reply.
    #[serde(default = "yes")]
    pub ending: bool,
}

fn yes() -> bool {
    true
}

/// Split a handler's outcome into the `result` / `failure` pair of the wire.
pub fn split_result(res: Result<Value, Failure>) -> (Option<Value>, Option<Failure>) {
    match res {
        Ok(v) => (Some(v), None),
        Err(f) => (None, Some(f)),
    }
}

/// The inverse of [`split_result`]: an error wins; no result is `null`.
pub fn join_result(result: Option<Value>, failure: Option<Failure>) -> Result<Value, Failure> {
    match failure {
        Some(f) => Err(f),
        None => Ok(result.unwrap_or(Value::Null)),
    }
}

impl Reply {
    /// The final reply to call `msg_id`.
    pub fn new(msg_id: String, reply_to: Option<String>, res: Result<Value, Failure>) -> Self {
        let (result, failure) = split_result(res);
        Self {
            msg_id,
            reply_to,
            result,
            failure,
            ending: true,
        }
    }
}

/// One link message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum LinkMsg {
    /// A request.
    Req(Request),
    /// A reply.
    Rep(Reply),
    /// The topics the guest serves.
    Topics {
        /// Sorted topic names.
        topics: Vec<String>,
    },
    /// A cast that went no further: host → guest, a guest cast the host did
    /// not pass on; guest → host, a host cast no sub-agent could take
    /// (nobody registered its topic within the grace, or the agent's queues
    /// are full).
    Refused {
        /// The cast's unique id.
        unique_id: String,
        /// Why, for the sub-agent, the caller and the logs.
        reason: String,
    },
    /// Guest → host: a sub-agent took request `unique_id` (it was written to
    /// the sub-agent's socket, or handled by the agent itself). Sent again
    /// for a request the agent had already taken, so a resend after a reset
    /// is confirmed without running twice.
    Took {
        /// The request's unique id.
        unique_id: String,
    },
    /// Host → guest: the caller of request `unique_id` gave up (its call
    /// timed out): withdraw it unless a sub-agent already took it. The
    /// agent answers `refused` (reason `Cancelled: …`: it will never run,
    /// even if the request arrives again) or, when a sub-agent took it,
    /// `took` (sent again if an earlier run of the agent took it).
    Cancel {
        /// The request's unique id.
        unique_id: String,
    },
}

/// Why a link message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Not JSON of the expected shape.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

impl LinkMsg {
    /// Encode as JSON bytes.
    pub fn to_bytes(&self) -> bytes::Bytes {
        // Serialising these types cannot fail: no maps with non-string keys.
        bytes::Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Decode from JSON bytes.
    ///
    /// The bytes are checked to be UTF-8 once, as a whole, and parsed as a
    /// `str`: parsed from bytes, serde_json checks each string (every key
    /// and value) on its own, which cost a request some twenty checks.
    pub fn from_bytes(b: &[u8]) -> Result<Self, EnvelopeError> {
        let s = std::str::from_utf8(b).map_err(|e| {
            EnvelopeError::Malformed(serde::de::Error::custom(format_args!("not UTF-8: {e}")))
        })?;
        if let Some(m) = Self::from_tag_first(s) {
            return m;
        }
        Ok(serde_json::from_str(s)?)
    }

    /// The shape every encoder of ours writes, the tag first
    /// (`{"t":"req",…}`), for the messages that come in floods (requests,
    /// replies, receipts): parsed straight into their type. The generic
    /// path for an internally tagged enum buffers the whole message into
    /// an intermediate tree first, which doubled the proxy's cost per
    /// message a hostile guest sends. Any other shape (another key order,
    /// white space) takes the generic path; both accept the same messages.
    fn from_tag_first(b: &str) -> Option<Result<Self, EnvelopeError>> {
        #[derive(Deserialize)]
        struct Took {
            unique_id: String,
        }
        let rest = b.strip_prefix(r#"{"t":""#)?;
        let (tag, rest) = rest.split_once('"')?;
        let fields = rest.strip_prefix(',')?;
        let mut obj = String::with_capacity(fields.len() + 1);
        obj.push('{');
        obj.push_str(fields);
        let m = match tag {
            "req" => serde_json::from_str(&obj).map(LinkMsg::Req),
            "rep" => serde_json::from_str(&obj).map(LinkMsg::Rep),
            "took" => serde_json::from_str::<Took>(&obj).map(|t| LinkMsg::Took {
                unique_id: t.unique_id,
            }),
            _ => return None,
        };
        Some(m.map_err(EnvelopeError::from))
    }
}

/// Remembers the last [`DEDUP_WINDOW`] unique ids; first sight wins.
#[derive(Debug, Default)]
pub struct DedupWindow {
    seen: HashSet<String>,
    order: VecDeque<String>,
    cap: usize,
}

impl DedupWindow {
    /// A window of `cap` ids.
    pub fn new(cap: usize) -> Self {
        Self {
            seen: HashSet::with_capacity(cap),
            order: VecDeque::with_capacity(cap),
            cap: cap.max(1),
        }
    }

    /// True the first time `id` is seen (within the window).
    pub fn first_sight(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() >= self.cap
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        self.seen.insert(id.to_string());
        self.order.push_back(id.to_string());
        true
    }
}

/// A fresh unique id (32 hex digits, like oslo's uuid4().hex).
pub fn new_unique_id() -> String {
    format!("{:016x}{:016x}", crate::random_u64(), crate::random_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_shape() {
        let m = LinkMsg::Req(Request {
            kind: Kind::Call,
            target: Target {
                topic: "demo".into(),
                ..Default::default()
            },
            method: "echo".into(),
            args: serde_json::json!({"x": 1}),
            ctx: serde_json::json!({}),
            msg_id: Some("m1".into()),
            unique_id: "u1".into(),
            reply_to: Some("ctl:1".into()),
            timeout_ms: Some(500),
        });
        let b = m.to_bytes();
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["t"], "req");
        assert_eq!(v["kind"], "call");
        assert_eq!(LinkMsg::from_bytes(&b).unwrap(), m);
    }

    /// The tag-first fast path and the generic path agree on every kind of
    /// message, in our encoder's shape and in others, valid or not.
    #[test]
    fn the_fast_path_reads_what_the_generic_one_reads() {
        let generic = |b: &[u8]| serde_json::from_slice::<LinkMsg>(b).ok();
        let req = LinkMsg::Req(Request {
            kind: Kind::Cast,
            target: Target {
                topic: "t".into(),
                ..Default::default()
            },
            method: "m".into(),
            args: serde_json::json!({"t": "rep"}),
            ctx: Value::Null,
            msg_id: None,
            unique_id: "u".into(),
            reply_to: Some("r".into()),
            timeout_ms: None,
        });
        let rep = LinkMsg::Rep(Reply::new("m".into(), None, Ok(serde_json::json!([1]))));
        let took = LinkMsg::Took {
            unique_id: "u".into(),
        };
        let refused = LinkMsg::Refused {
            unique_id: "u".into(),
            reason: "r".into(),
        };
        for m in [req, rep, took, refused] {
            let b = m.to_bytes();
            assert!(
                b.starts_with(br#"{"t":""#),
                "the encoder writes the tag first"
            );
            assert_eq!(LinkMsg::from_bytes(&b).unwrap(), m);
            assert_eq!(generic(&b), Some(m));
        }
        let odd: &[&[u8]] = &[
            br#"{"t":"took"}"#,
            br#"{"t":"took","unique_id":7}"#,
            br#"{"t":"took","unique_id":"a","x":1}"#,
            br#"{"t":"took","unique_id":"a"}  "#,
            br#"{"t":"took","unique_id":"a"}}"#,
            br#"{"t":"took","unique_id":"a"},{"#,
            br#"{"t":"took","#,
            br#"{"t":"took"#,
            br#"{"t":"req","kind":"cast"}"#,
            br#"{"t":"rep","msg_id":"m","ending":false}"#,
            br#"{"t":"rep","msg_id":"m","result":1,"failure":null}"#,
            br#"{ "t":"took","unique_id":"a"}"#,
            br#"{"unique_id":"a","t":"took"}"#,
            br#"{"t":"nope","unique_id":"a"}"#,
            br#"{"t":"","unique_id":"a"}"#,
        ];
        for b in odd {
            assert_eq!(
                LinkMsg::from_bytes(b).ok(),
                generic(b),
                "{}",
                String::from_utf8_lossy(b)
            );
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(LinkMsg::from_bytes(b"{\"t\":\"nope\"}").is_err());
        assert!(LinkMsg::from_bytes(b"\xff").is_err());
    }

    #[test]
    fn dedup_window_forgets_the_oldest() {
        let mut d = DedupWindow::new(2);
        assert!(d.first_sight("a"));
        assert!(!d.first_sight("a"));
        assert!(d.first_sight("b"));
        assert!(d.first_sight("c"));
        assert!(d.first_sight("a"), "a fell out of the window");
        assert!(!d.first_sight("c"));
    }

    #[test]
    fn unique_ids_are_hex_and_differ() {
        let (a, b) = (new_unique_id(), new_unique_id());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
