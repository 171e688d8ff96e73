//! The one enforcement point for guest-originated traffic. Every message a
//! guest sends passes [`Enforcer::check`] before anything else looks at it;
//! identity comes from the channel's file name, never from the message.

use std::time::Instant;

use serde::Deserialize;

use crate::rpc::{Kind, LinkMsg};

/// What guests may send. The defaults: replies and casts allowed, guest
/// calls refused, 100 messages/s and 1 MB/s per instance.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Guests may cast to the control plane.
    pub allow_guest_casts: bool,
    /// Guests may call the control plane.
    pub allow_guest_calls: bool,
    /// Sustained messages per second per instance (token bucket rate).
    pub messages_per_sec: f64,
    /// Burst of messages per instance (token bucket size).
    pub message_burst: f64,
    /// Sustained payload bytes per second per instance.
    pub bytes_per_sec: f64,
    /// Burst of payload bytes per instance.
    pub byte_burst: f64,
    /// Most topics one instance may register.
    pub max_topics: usize,
    /// Topics a guest's sub-agents may register (and so have the proxy
    /// consume for over the broker): exact names, or prefixes ending in
    /// `*`. Empty: any topic. A guest that registers others is refused
    /// (its earlier registration stays).
    pub allowed_topics: Vec<String>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            allow_guest_casts: true,
            allow_guest_calls: false,
            messages_per_sec: 100.0,
            message_burst: 1000.0,
            bytes_per_sec: 1_000_000.0,
            byte_burst: 4_000_000.0,
            max_topics: 64,
            allowed_topics: vec![],
        }
    }
}

impl PolicyConfig {
    /// Check the values.
    pub fn validate(&self) -> Result<(), String> {
        for (k, v) in [
            ("messages_per_sec", self.messages_per_sec),
            ("message_burst", self.message_burst),
            ("bytes_per_sec", self.bytes_per_sec),
            ("byte_burst", self.byte_burst),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("policy.{k} must be a positive number"));
            }
        }
        for p in &self.allowed_topics {
            let stem = p.strip_suffix('*').unwrap_or(p);
            if p.is_empty() || stem.contains('*') {
                return Err(format!(
                    "policy.allowed_topics: {p:?} must be a topic name, or a prefix followed by one '*' at the end"
                ));
            }
        }
        Ok(())
    }

    /// Whether a guest may register `topic`.
    pub fn topic_allowed(&self, topic: &str) -> bool {
        self.allowed_topics.is_empty()
            || self
                .allowed_topics
                .iter()
                .any(|p| match p.strip_suffix('*') {
                    Some(prefix) => topic.starts_with(prefix),
                    None => topic == p,
                })
    }
}

/// What the enforcement point decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let it through.
    Allow,
    /// Refuse it, for this reason.
    Deny(String),
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Self {
        Self {
            tokens: burst,
            rate,
            burst,
            at: Instant::now(),
        }
    }

    fn take(&mut self, n: f64, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// Per-instance enforcement state.
#[derive(Debug)]
pub struct Enforcer {
    cfg: PolicyConfig,
    msgs: Bucket,
    bytes: Bucket,
    /// Messages denied so far.
    pub denied: u64,
}

impl Enforcer {
    /// A fresh enforcer for one instance.
    pub fn new(cfg: PolicyConfig) -> Self {
        Self {
            msgs: Bucket::new(cfg.messages_per_sec, cfg.message_burst),
            bytes: Bucket::new(cfg.bytes_per_sec, cfg.byte_burst),
            cfg,
            denied: 0,
        }
    }

    /// The decision for one guest message of `size` bytes. `answers_call`:
    /// the message is the reply to a call this host made and still waits for.
    /// Such replies are not charged to the guest's rate limits: the host
    /// chose that rate, and refusing a reply would only make the caller time
    /// out. Unsolicited replies are charged like anything else.
    pub fn check(&mut self, msg: &LinkMsg, size: usize, answers_call: bool) -> Decision {
        if answers_call && matches!(msg, LinkMsg::Rep(_)) {
            return Decision::Allow;
        }
        let d = self.decide(msg, size);
        if d != Decision::Allow {
            self.denied += 1;
        }
        d
    }

    /// The topics of a guest's registration that it may serve, and those
    /// it may not (`policy.allowed_topics`): one sub-agent asking for a
    /// topic it may not have does not take the others' away.
    pub fn allowed_topics(&self, topics: Vec<String>) -> (Vec<String>, Vec<String>) {
        topics.into_iter().partition(|t| self.cfg.topic_allowed(t))
    }

    fn decide(&mut self, msg: &LinkMsg, size: usize) -> Decision {
        let now = Instant::now();
        if !self.msgs.take(1.0, now) {
            return Decision::Deny("message rate limit exceeded".into());
        }
        if !self.bytes.take(size as f64, now) {
            return Decision::Deny("byte rate limit exceeded".into());
        }
        match msg {
            LinkMsg::Rep(_) => Decision::Allow,
            LinkMsg::Topics { topics } if topics.len() > self.cfg.max_topics => {
                Decision::Deny(format!("more than {} topics", self.cfg.max_topics))
            }
            // Which of them may be served: [`Enforcer::allowed_topics`].
            LinkMsg::Topics { .. } => Decision::Allow,
            LinkMsg::Refused { .. } => Decision::Deny("'refused' goes host → guest only".into()),
            LinkMsg::Req(r) => match r.kind {
                Kind::Cast if self.cfg.allow_guest_casts => Decision::Allow,
                Kind::Call if self.cfg.allow_guest_calls => Decision::Allow,
                Kind::Cast => Decision::Deny("guest casts are not allowed".into()),
                Kind::Call => Decision::Deny("guest calls are not allowed".into()),
                Kind::Fanout => Decision::Deny("guests may not fan out".into()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::{Request, Target};

    fn req(kind: Kind) -> LinkMsg {
        LinkMsg::Req(Request {
            kind,
            target: Target::default(),
            method: "m".into(),
            args: serde_json::Value::Null,
            ctx: serde_json::Value::Null,
            msg_id: None,
            unique_id: "u".into(),
            reply_to: None,
            timeout_ms: None,
        })
    }

    #[test]
    fn defaults_allow_casts_refuse_calls() {
        let mut e = Enforcer::new(PolicyConfig::default());
        assert_eq!(e.check(&req(Kind::Cast), 10, false), Decision::Allow);
        assert!(matches!(
            e.check(&req(Kind::Call), 10, false),
            Decision::Deny(_)
        ));
        assert!(matches!(
            e.check(&req(Kind::Fanout), 10, false),
            Decision::Deny(_)
        ));
        assert_eq!(e.denied, 2);
    }

    #[test]
    fn only_allowed_topics_may_be_registered() {
        let cfg = PolicyConfig {
            allowed_topics: vec!["lbaas*".into(), "octavia".into()],
            ..Default::default()
        };
        assert!(cfg.validate().is_ok());
        let e = Enforcer::new(cfg);
        let v = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            e.allowed_topics(v(&["lbaas-agent", "nova", "octavia", "octavia-x"])),
            (v(&["lbaas-agent", "octavia"]), v(&["nova", "octavia-x"]))
        );
        let any = Enforcer::new(PolicyConfig::default());
        assert_eq!(any.allowed_topics(v(&["x"])), (v(&["x"]), vec![]));
        for bad in ["", "a*b*", "*x"] {
            let cfg = PolicyConfig {
                allowed_topics: vec![bad.into()],
                ..Default::default()
            };
            assert!(cfg.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_flood_hits_the_rate_limit() {
        let mut e = Enforcer::new(PolicyConfig {
            message_burst: 5.0,
            messages_per_sec: 1.0,
            ..Default::default()
        });
        let allowed = (0..100)
            .filter(|_| e.check(&req(Kind::Cast), 1, false) == Decision::Allow)
            .count();
        assert_eq!(allowed, 5);
    }

    /// Regression: the 1,025th reply in a burst of host calls was refused
    /// by the guest rate limit and its caller timed out.
    #[test]
    fn replies_to_our_calls_are_not_rate_limited_but_unsolicited_ones_are() {
        let rep = LinkMsg::Rep(crate::rpc::Reply {
            msg_id: "m".into(),
            reply_to: None,
            result: None,
            failure: None,
            ending: true,
        });
        let mut e = Enforcer::new(PolicyConfig {
            message_burst: 5.0,
            messages_per_sec: 1.0,
            ..Default::default()
        });
        assert!((0..10_000).all(|_| e.check(&rep, 100, true) == Decision::Allow));
        let unsolicited = (0..100)
            .filter(|_| e.check(&rep, 100, false) == Decision::Allow)
            .count();
        assert_eq!(unsolicited, 5);
    }
}
