//! The per-instance decision: rate limits, mode, names, targets, context.
//! Deny by default: a guest message is allowed only when the instance's
//! mode permits its kind and, for casts and calls, a target rule of its
//! profile matches every part of its target; for notifications, its
//! `notifications` topics.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value, json};

use super::handle::{Opened, Sealer};
use super::names::{self, NameKind, any_matches};
use super::{Effective, IDENTITY_KEY, Mode, Profile};
use crate::rpc::{Kind, Reply, Request};

/// Reply handles remembered per instance to refuse a second reply through
/// the same handle on this proxy: a guest has at most a window's worth of
/// calls in flight (1024 frames by default), so four windows is ample.
pub const USED_HANDLES: usize = 4096;

/// oslo's notification priorities (the lower-case suffix of the topic).
pub const NOTIFY_PRIORITIES: [&str; 7] = [
    "audit", "debug", "info", "warn", "error", "critical", "sample",
];

/// Longest `publisher_id`, `message_id` or `timestamp` a guest may send
/// (oslo's are a host name, a uuid and a date; the bound keeps the audit
/// and the control plane's logs sane).
pub const MAX_NOTIFY_FIELD: usize = 255;

/// A guest's notifications are published as `tether.<instance uuid>`:
/// identity is the host's word, never the guest's.
pub const NOTIFY_PUBLISHER_PREFIX: &str = "tether.";

/// What the enforcement point decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let it through.
    Allow,
    /// Refuse it, for this reason.
    Deny(String),
}

/// What becomes of a guest's topic announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicsDecision {
    /// `one-way`: the instance's topics come from its profile.
    Ignore,
    /// Refused whole (too many, or over the rate limit).
    Deny(String),
    /// These may be served; those may not (with why).
    Allow {
        /// Allowed topics.
        allowed: Vec<String>,
        /// Refused topics and why.
        refused: Vec<(String, String)>,
    },
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
    policy: Arc<Effective>,
    msgs: Bucket,
    bytes: Bucket,
    used: HashSet<[u8; 24]>,
    used_order: VecDeque<[u8; 24]>,
}

fn buckets(p: &Profile) -> (Bucket, Bucket) {
    (
        Bucket::new(p.messages_per_sec, p.message_burst),
        Bucket::new(p.bytes_per_sec, p.byte_burst),
    )
}

impl Enforcer {
    /// A fresh enforcer for one instance.
    pub fn new(policy: Arc<Effective>) -> Self {
        let (msgs, bytes) = buckets(&policy.profile);
        Self {
            policy,
            msgs,
            bytes,
            used: HashSet::new(),
            used_order: VecDeque::new(),
        }
    }

    /// The policy enforced.
    pub fn policy(&self) -> &Arc<Effective> {
        &self.policy
    }

    /// Enforce `p` from now on (a reload); the rate buckets start afresh
    /// only if the rates changed.
    pub fn refresh(&mut self, p: Arc<Effective>) {
        if Arc::ptr_eq(&p, &self.policy) {
            return;
        }
        let (a, b) = (&self.policy.profile, &p.profile);
        if (
            a.messages_per_sec,
            a.message_burst,
            a.bytes_per_sec,
            a.byte_burst,
        ) != (
            b.messages_per_sec,
            b.message_burst,
            b.bytes_per_sec,
            b.byte_burst,
        ) {
            (self.msgs, self.bytes) = buckets(b);
        }
        self.policy = p;
    }

    /// Charge one message of `size` bytes to the rate limits.
    fn charge(&mut self, size: usize) -> Result<(), String> {
        let now = Instant::now();
        if !self.msgs.take(1.0, now) {
            return Err("message rate limit exceeded".into());
        }
        if !self.bytes.take(size as f64, now) {
            return Err("byte rate limit exceeded".into());
        }
        Ok(())
    }

    /// A message that is refused or ignored whatever the limits (malformed,
    /// a heartbeat) still costs its sender, so a flood of them drains the
    /// same buckets as anything else.
    pub fn charge_only(&mut self, size: usize) {
        let _ = self.charge(size);
    }

    /// The decision for a guest's cast or call of `size` bytes.
    pub fn request(&mut self, r: &Request, size: usize) -> Decision {
        if let Err(e) = self.charge(size) {
            return Decision::Deny(e);
        }
        match self.target(r) {
            Ok(()) => Decision::Allow,
            Err(e) => Decision::Deny(e),
        }
    }

    fn target(&self, r: &Request) -> Result<(), String> {
        let p = &self.policy.profile;
        let mode = p.mode.name();
        match r.kind {
            Kind::Notify => return self.notification(r),
            Kind::Fanout => return Err("guests may not fan out".into()),
            Kind::Cast if p.mode < Mode::Cast => {
                return Err(format!("guest casts are not allowed (mode {mode})"));
            }
            Kind::Call if p.mode < Mode::Call => {
                return Err(format!("guest calls are not allowed (mode {mode})"));
            }
            Kind::Call if r.msg_id.is_none() => return Err("a call without msg_id".into()),
            _ => {}
        }
        let t = &r.target;
        names::check(NameKind::Method, &r.method).map_err(|e| e.to_string())?;
        names::check(NameKind::Topic, &t.topic).map_err(|e| e.to_string())?;
        if let Some(s) = &t.server {
            names::check(NameKind::Server, s).map_err(|e| e.to_string())?;
            // The routing key `<topic>.<server>` is an AMQP short string.
            if t.topic.len().saturating_add(1).saturating_add(s.len()) > names::MAX_NAME {
                return Err("the routing key <topic>.<server> is over 255 bytes".into());
            }
        }
        let exchange = match &t.exchange {
            Some(x) => {
                names::check(NameKind::Exchange, x).map_err(|e| e.to_string())?;
                x.as_str()
            }
            None => self.policy.control_exchange.as_str(),
        };
        let ok = p.targets.iter().any(|rule| {
            let ex_ok = if rule.exchanges.is_empty() {
                exchange == self.policy.control_exchange
            } else {
                any_matches(&rule.exchanges, exchange)
            };
            let server_ok = match &t.server {
                None => true,
                Some(s) => any_matches(&rule.servers, s),
            };
            ex_ok
                && server_ok
                && any_matches(&rule.topics, &t.topic)
                && any_matches(&rule.methods, &r.method)
        });
        if ok {
            Ok(())
        } else {
            Err(format!(
                "no target rule of profile {:?} allows exchange {}, topic {}, server {}, method {}",
                self.policy.profile_name,
                names::shown(exchange),
                names::shown(&t.topic),
                t.server.as_deref().map_or("(none)".into(), names::shown),
                names::shown(&r.method)
            ))
        }
    }

    /// A guest's oslo notification: its topic `<topic>.<priority>` with a
    /// topic the profile's `notifications` allow and an oslo priority, the
    /// control exchange only, and a body of oslo's notification fields
    /// whose event type and priority agree with the rest.
    fn notification(&self, r: &Request) -> Result<(), String> {
        let p = &self.policy.profile;
        if p.notifications.is_empty() {
            return Err(format!(
                "guest notifications are not allowed (profile {:?} lists no notification topics)",
                self.policy.profile_name
            ));
        }
        let t = &r.target;
        if t.server.is_some() {
            return Err("a notification has no server".into());
        }
        if let Some(x) = &t.exchange
            && *x != self.policy.control_exchange
        {
            return Err(format!(
                "notifications go to the control exchange only, not {}",
                names::shown(x)
            ));
        }
        let Some((topic, priority)) = t.topic.rsplit_once('.') else {
            return Err(format!(
                "notification topic {} is not <topic>.<priority>",
                names::shown(&t.topic)
            ));
        };
        names::check(NameKind::Topic, topic).map_err(|e| e.to_string())?;
        if !NOTIFY_PRIORITIES.contains(&priority) {
            return Err(format!(
                "notification priority {} is not one of {}",
                names::shown(priority),
                NOTIFY_PRIORITIES.join(", ")
            ));
        }
        if !any_matches(&p.notifications, topic) {
            return Err(format!(
                "profile {:?} does not allow notification topic {}",
                self.policy.profile_name,
                names::shown(topic)
            ));
        }
        names::check(NameKind::EventType, &r.method).map_err(|e| e.to_string())?;
        let Some(body) = r.args.as_object() else {
            return Err("a notification's message is not an object".into());
        };
        for (k, v) in body {
            let ok = match k.as_str() {
                "event_type" => v.as_str() == Some(r.method.as_str()),
                "priority" => v.as_str().is_some_and(|v| v.eq_ignore_ascii_case(priority)),
                "payload" => true,
                "publisher_id" | "message_id" | "timestamp" => {
                    v.as_str().is_some_and(|s| s.len() <= MAX_NOTIFY_FIELD)
                }
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "notification field {} is not one of oslo's or does not agree with the topic (event_type, priority, payload; publisher_id, message_id, timestamp: strings up to {MAX_NOTIFY_FIELD} bytes)",
                    names::shown(k)
                ));
            }
        }
        Ok(())
    }

    /// An allowed notification as it goes upstream: the publisher is the
    /// instance (`tether.<uuid>`, whatever the guest said), the priority
    /// oslo's upper-case word for its topic's.
    pub fn stamp_notification(&self, r: &mut Request, instance: &str) {
        let priority = r
            .target
            .topic
            .rsplit_once('.')
            .map(|(_, p)| p.to_ascii_uppercase())
            .unwrap_or_default();
        if let Some(body) = r.args.as_object_mut() {
            body.insert(
                "publisher_id".into(),
                Value::String(format!("{NOTIFY_PUBLISHER_PREFIX}{instance}")),
            );
            body.insert("priority".into(), Value::String(priority));
            body.insert("event_type".into(), Value::String(r.method.clone()));
            body.entry("payload").or_insert(Value::Null);
        }
    }

    /// The context a guest request carries upstream: the guest's keys the
    /// profile allows, then the profile's static context, then the
    /// identity — the host's words always win.
    pub fn context(&self, guest: &Value) -> Value {
        let p = &self.policy.profile;
        let mut m = Map::new();
        if let Value::Object(g) = guest {
            for k in &p.context_keys {
                if let Some(v) = g.get(k) {
                    m.insert(k.clone(), v.clone());
                }
            }
        }
        for (k, v) in &p.static_context {
            m.insert(k.clone(), v.clone());
        }
        m.insert(IDENTITY_KEY.into(), json!(self.policy.instance));
        Value::Object(m)
    }

    /// The decision for a reply to a call that is not pending on this
    /// proxy: it must carry a handle this cloud's proxies sealed for this
    /// instance, unexpired and not used before here. Charged to the rate
    /// limits (replies to pending calls are not: the host chose that rate).
    pub fn unsolicited_reply(
        &mut self,
        r: &Reply,
        size: usize,
        sealer: &Sealer,
        now_unix_ms: u64,
    ) -> Result<Opened, String> {
        self.charge(size)?;
        if self.policy.profile.mode == Mode::OneWay {
            return Err("replies are not allowed (mode one-way)".into());
        }
        let Some(h) = &r.reply_to else {
            return Err("a reply to no call pending on this proxy, without a reply handle".into());
        };
        let o = sealer
            .open(&self.policy.instance, h, now_unix_ms)
            .map_err(|e| format!("a reply to no call pending on this proxy: {e}"))?;
        if !self.remember(o.nonce) {
            return Err("the reply handle was used already".into());
        }
        Ok(o)
    }

    /// Mark `handle` used (its call was answered through the pending path),
    /// so a second reply through it is refused.
    pub fn spend(&mut self, handle: &str, sealer: &Sealer) {
        if let Ok(o) = sealer.open(&self.policy.instance, handle, 0) {
            self.remember(o.nonce);
        }
    }

    /// Remember a handle's nonce; false if it was already.
    fn remember(&mut self, nonce: [u8; 24]) -> bool {
        if self.used.contains(&nonce) {
            return false;
        }
        if self.used_order.len() >= USED_HANDLES
            && let Some(old) = self.used_order.pop_front()
        {
            self.used.remove(&old);
        }
        self.used.insert(nonce);
        self.used_order.push_back(nonce);
        true
    }

    /// A reply to a call pending here: allowed unless the mode is
    /// `one-way` and the call came from the broker (the caller decides
    /// by passing `to_broker`). Not charged.
    pub fn pending_reply(&self, to_broker: bool) -> Decision {
        if to_broker && self.policy.profile.mode == Mode::OneWay {
            Decision::Deny("replies are not allowed (mode one-way)".into())
        } else {
            Decision::Allow
        }
    }

    /// The decision for a topic announcement of `size` bytes.
    pub fn topics(&mut self, topics: Vec<String>, size: usize) -> TopicsDecision {
        if self.policy.profile.mode == Mode::OneWay {
            return TopicsDecision::Ignore;
        }
        if let Err(e) = self.charge(size) {
            return TopicsDecision::Deny(e);
        }
        let p = &self.policy.profile;
        if topics.len() > p.max_topics {
            return TopicsDecision::Deny(format!("more than {} topics", p.max_topics));
        }
        let (allowed, refused) = topics_for(&self.policy, topics);
        TopicsDecision::Allow { allowed, refused }
    }
}

/// Which of `topics` the policy `e` lets a guest register, and which not
/// (with why). A pure function: a reload re-applies it to the guest's last
/// announcement.
pub fn topics_for(e: &Effective, topics: Vec<String>) -> (Vec<String>, Vec<(String, String)>) {
    let mut allowed = vec![];
    let mut refused = vec![];
    for t in topics.into_iter().take(e.profile.max_topics) {
        match names::check(NameKind::Topic, &t) {
            Err(err) => refused.push((t, err.to_string())),
            Ok(()) if any_matches(&e.profile.topics, &t) => allowed.push(t),
            Ok(()) => refused.push((
                t,
                format!("not among the topics profile {:?} allows", e.profile_name),
            )),
        }
    }
    (allowed, refused)
}

#[cfg(test)]
mod tests {
    use super::super::store::Source;
    use super::super::{PolicyConfig, TargetRule};
    use super::*;
    use crate::rpc::Target;

    const I: &str = "0000aaaa-0000-4000-8000-000000000001";

    fn eff(p: Profile) -> Arc<Effective> {
        Arc::new(Effective {
            instance: I.into(),
            profile_name: "t".into(),
            source: Source::Default,
            profile: p,
            control_exchange: "openstack".into(),
            reply_handles: true,
        })
    }

    fn req(kind: Kind, topic: &str, server: Option<&str>, exchange: Option<&str>) -> Request {
        Request {
            kind,
            target: Target {
                topic: topic.into(),
                server: server.map(String::from),
                exchange: exchange.map(String::from),
                ..Default::default()
            },
            method: "update_status".into(),
            args: Value::Null,
            ctx: json!({"is_admin": true, "roles": ["admin"], "request_id": "r1", "tether_instance": "forged"}),
            msg_id: (kind == Kind::Call).then(|| "m".into()),
            unique_id: "u".into(),
            reply_to: None,
            timeout_ms: None,
        }
    }

    fn caster() -> Profile {
        Profile {
            mode: Mode::Cast,
            topics: vec!["lbaas*".into()],
            targets: vec![TargetRule {
                exchanges: vec![],
                topics: vec!["good".into()],
                servers: vec![],
                methods: vec!["update_*".into()],
            }],
            context_keys: vec!["request_id".into()],
            static_context: json!({"user_id": "svc", "is_admin": false})
                .as_object()
                .unwrap()
                .clone(),
            ..Profile::default()
        }
    }

    #[test]
    fn the_default_is_reply_only_with_nothing_allowed() {
        let c = PolicyConfig::default();
        let mut e = Enforcer::new(eff(c.profiles()["default"].clone()));
        assert_eq!(e.policy().profile.mode, Mode::ReplyOnly);
        for k in [Kind::Cast, Kind::Call, Kind::Fanout] {
            assert!(matches!(
                e.request(&req(k, "good", None, None), 10),
                Decision::Deny(_)
            ));
        }
        assert_eq!(
            e.topics(vec!["anything".into()], 10),
            TopicsDecision::Allow {
                allowed: vec![],
                refused: vec![(
                    "anything".into(),
                    "not among the topics profile \"t\" allows".into()
                )]
            }
        );
    }

    #[test]
    fn cross_instance_and_foreign_exchange_targets_are_denied() {
        let mut e = Enforcer::new(eff(caster()));
        assert_eq!(
            e.request(&req(Kind::Cast, "good", None, None), 10),
            Decision::Allow
        );
        assert_eq!(
            e.request(&req(Kind::Cast, "good", None, Some("openstack")), 10),
            Decision::Allow
        );
        let other = "0000aaaa-0000-4000-8000-000000000002";
        for (t, s, x) in [
            ("good", Some(other), None),
            ("good", None, Some("good_fanout")),
            ("good", None, Some("nova")),
            ("compute", Some("host1"), None),
            ("good.0000aaaa-0000-4000-8000-000000000002", None, None),
            ("good", None, Some("")),
        ] {
            assert!(
                matches!(e.request(&req(Kind::Cast, t, s, x), 10), Decision::Deny(_)),
                "{t} {s:?} {x:?}"
            );
        }
        assert!(
            matches!(e.request(&req(Kind::Call, "good", None, None), 10), Decision::Deny(r) if r.contains("mode cast"))
        );
    }

    #[test]
    fn context_is_the_hosts() {
        let e = Enforcer::new(eff(caster()));
        let r = req(Kind::Cast, "good", None, None);
        assert_eq!(
            e.context(&r.ctx),
            json!({"request_id": "r1", "user_id": "svc", "is_admin": false, "tether_instance": I})
        );
        assert_eq!(
            e.context(&Value::Null),
            json!({"user_id": "svc", "is_admin": false, "tether_instance": I})
        );
    }

    #[test]
    fn unsolicited_replies_need_a_fresh_handle_of_this_instance() {
        let s = Sealer::from_secrets(&[&[3u8; 32]]);
        let mut e = Enforcer::new(eff(caster()));
        let h = s.seal(I, "reply_q", "mid", 10_000).unwrap();
        let rep = |h: Option<String>| Reply::new("local".into(), h, Ok(Value::Null));
        let o = e
            .unsolicited_reply(&rep(Some(h.clone())), 10, &s, 5_000)
            .unwrap();
        assert_eq!((o.reply_q.as_str(), o.msg_id.as_str()), ("reply_q", "mid"));
        assert!(
            e.unsolicited_reply(&rep(Some(h)), 10, &s, 5_000)
                .unwrap_err()
                .contains("used already")
        );
        assert!(e.unsolicited_reply(&rep(None), 10, &s, 5_000).is_err());
        assert!(
            e.unsolicited_reply(&rep(Some("reply_q".into())), 10, &s, 5_000)
                .is_err()
        );
        let h = s.seal(I, "reply_q", "mid", 10_000).unwrap();
        assert!(
            e.unsolicited_reply(&rep(Some(h)), 10, &s, 10_001)
                .unwrap_err()
                .contains("expired")
        );
        let mut oneway = Enforcer::new(eff(Profile {
            mode: Mode::OneWay,
            ..caster()
        }));
        let h = s.seal(I, "reply_q", "mid", 10_000).unwrap();
        assert!(oneway.unsolicited_reply(&rep(Some(h)), 10, &s, 0).is_err());
        assert!(matches!(oneway.pending_reply(true), Decision::Deny(_)));
        assert_eq!(oneway.pending_reply(false), Decision::Allow);
    }

    #[test]
    fn topics_are_checked_and_one_way_ignores_them() {
        let mut e = Enforcer::new(eff(caster()));
        let TopicsDecision::Allow { allowed, refused } = e.topics(
            vec!["lbaas-agent".into(), "nova".into(), "lbaas#".into()],
            10,
        ) else {
            panic!()
        };
        assert_eq!(allowed, vec!["lbaas-agent".to_string()]);
        assert_eq!(refused.len(), 2);
        let mut o = Enforcer::new(eff(Profile {
            mode: Mode::OneWay,
            ..caster()
        }));
        assert_eq!(
            o.topics(vec!["lbaas-agent".into()], 10),
            TopicsDecision::Ignore
        );
    }

    #[test]
    fn a_flood_hits_the_rate_limit() {
        let mut e = Enforcer::new(eff(Profile {
            message_burst: 5.0,
            messages_per_sec: 1.0,
            ..caster()
        }));
        let allowed = (0..100)
            .filter(|_| e.request(&req(Kind::Cast, "good", None, None), 1) == Decision::Allow)
            .count();
        assert_eq!(allowed, 5);
    }

    fn notification(topic: &str, exchange: Option<&str>, body: Value) -> Request {
        let event = body["event_type"]
            .as_str()
            .unwrap_or("lbaas.pool.update")
            .to_string();
        Request {
            method: event,
            args: body,
            msg_id: None,
            ..req(Kind::Notify, topic, None, exchange)
        }
    }

    #[test]
    fn notifications_need_a_listed_topic_an_oslo_priority_and_oslo_fields() {
        let body = || json!({"event_type": "lbaas.pool.update", "priority": "INFO", "payload": {"p": 1}, "publisher_id": "lbaas.vm", "message_id": "m-1", "timestamp": "2026-12-06 13:00:00.000000"});
        // Deny by default: no notification topics, whatever the mode.
        let mut e = Enforcer::new(eff(Profile {
            mode: Mode::Call,
            ..caster()
        }));
        assert!(
            matches!(e.request(&notification("notifications.info", None, body()), 10),
            Decision::Deny(r) if r.contains("lists no notification topics"))
        );
        let mut e = Enforcer::new(eff(Profile {
            notifications: vec!["notifications".into(), "lbaas-*".into()],
            ..Profile::default()
        }));
        assert_eq!(
            e.request(&notification("notifications.info", None, body()), 10),
            Decision::Allow
        );
        assert_eq!(
            e.request(
                &notification("lbaas-events.info", Some("openstack"), body()),
                10
            ),
            Decision::Allow
        );
        let denied = |e: &mut Enforcer, r: Request, why: &str| {
            assert!(
                matches!(e.request(&r, 10), Decision::Deny(ref d) if d.contains(why)),
                "{why}: {:?}",
                e.request(&r, 10)
            );
        };
        denied(
            &mut e,
            notification("other.info", None, body()),
            "does not allow notification topic",
        );
        denied(
            &mut e,
            notification("notifications.loud", None, body()),
            "priority",
        );
        denied(
            &mut e,
            notification("notifications", None, body()),
            "<topic>.<priority>",
        );
        denied(
            &mut e,
            notification("notifications.info", Some("nova"), body()),
            "control exchange only",
        );
        denied(&mut e, notification("a.b.info", None, body()), "character");
        let mut b = body();
        b["priority"] = json!("ERROR");
        denied(
            &mut e,
            notification("notifications.info", None, b),
            "priority",
        );
        let mut b = body();
        b["extra"] = json!(1);
        denied(&mut e, notification("notifications.info", None, b), "extra");
        let mut b = body();
        b["publisher_id"] = json!("x".repeat(MAX_NOTIFY_FIELD + 1));
        denied(
            &mut e,
            notification("notifications.info", None, b),
            "publisher_id",
        );
        let mut r = notification("notifications.info", None, body());
        r.method = "other.event".into();
        denied(&mut e, r, "event_type");
        let mut r = notification("notifications.info", None, body());
        r.method = "bad event".into();
        r.args["event_type"] = json!("bad event");
        denied(&mut e, r, "event type");
        let mut r = notification("notifications.info", None, body());
        r.target.server = Some("s".into());
        denied(&mut e, r, "no server");
    }

    #[test]
    fn only_exactly_listed_notification_topics_get_their_queue_declared() {
        let p = Profile {
            notifications: vec!["notifications".into(), "lbaas-*".into(), "*".into()],
            ..Profile::default()
        };
        assert!(super::super::declares_notify_queue(
            &p,
            "notifications.info"
        ));
        assert!(!super::super::declares_notify_queue(&p, "lbaas-x.info"));
        assert!(!super::super::declares_notify_queue(&p, "anything.error"));
        assert!(!super::super::declares_notify_queue(&p, "notifications"));
    }

    #[test]
    fn an_allowed_notification_is_published_as_the_instance() {
        let e = Enforcer::new(eff(Profile {
            notifications: vec!["*".into()],
            ..Profile::default()
        }));
        let mut r = notification(
            "notifications.warn",
            None,
            json!({"event_type": "lbaas.pool.update", "priority": "warn", "payload": 1, "publisher_id": "nova-compute.host1"}),
        );
        e.stamp_notification(&mut r, I);
        assert_eq!(r.args["publisher_id"], format!("tether.{I}"));
        assert_eq!(r.args["priority"], "WARN");
        assert_eq!(r.args["event_type"], "lbaas.pool.update");
    }
}
