//! Requests for a topic no sub-agent serves yet: held (bounded per topic and
//! in total) for the grace a sub-agent has to register — the agent just
//! booted, the supervisor restarting a sub-agent — then refused explicitly.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::rpc::Request;

/// Requests held for one topic; past it, new ones are refused at once (a
/// stream to a topic nobody will serve must not fill the agent).
pub const MAX_HELD_PER_TOPIC: usize = 1024;
/// Requests held for all topics together.
pub const MAX_HELD: usize = 4096;
/// Default grace for a topic to get a sub-agent (`unserved_grace_ms`):
/// twice the supervisor's default longest restart backoff (30 s), so a
/// sub-agent that the supervisor is restarting gets the requests that came
/// meanwhile; a call still ends at its caller's own timeout.
pub const DEFAULT_UNSERVED_GRACE: Duration = Duration::from_secs(60);

/// A held request.
#[derive(Debug)]
pub struct Held {
    /// The request.
    pub req: Request,
    /// When the agent received it (its `timeout_ms` counts from then).
    pub arrived: Instant,
    /// When it is refused if no sub-agent registered its topic.
    pub until: Instant,
}

/// The held requests.
#[derive(Debug, Default)]
pub struct Holding {
    by_topic: HashMap<String, VecDeque<Held>>,
    total: usize,
}

impl Holding {
    /// Hold `req` until `until` at the latest; gives it back when a bound is
    /// reached.
    pub fn hold(
        &mut self,
        req: Request,
        arrived: Instant,
        until: Instant,
    ) -> Result<(), Box<Request>> {
        if self.total >= MAX_HELD {
            return Err(Box::new(req));
        }
        let q = self.by_topic.entry(req.target.topic.clone()).or_default();
        if q.len() >= MAX_HELD_PER_TOPIC {
            return Err(Box::new(req));
        }
        q.push_back(Held {
            req,
            arrived,
            until,
        });
        self.total += 1;
        Ok(())
    }

    /// Everything held for `topic`, oldest first.
    pub fn take(&mut self, topic: &str) -> VecDeque<Held> {
        let q = self.by_topic.remove(topic).unwrap_or_default();
        self.total = self.total.saturating_sub(q.len());
        q
    }

    /// Those whose grace or own deadline is over at `now`.
    pub fn expired(&mut self, now: Instant) -> Vec<Held> {
        let mut out = vec![];
        for q in self.by_topic.values_mut() {
            let (keep, gone): (VecDeque<Held>, VecDeque<Held>) = q
                .drain(..)
                .partition(|h| h.until > now && !timed_out(h, now));
            *q = keep;
            out.extend(gone);
        }
        self.by_topic.retain(|_, q| !q.is_empty());
        self.total = self.total.saturating_sub(out.len());
        out
    }

    /// Stop holding the request `unique_id` (the host cancelled it); true
    /// if it was held. A scan: at most [`MAX_HELD`] entries, once per
    /// cancel the host sends.
    pub fn remove(&mut self, unique_id: &str) -> bool {
        let mut found = false;
        for q in self.by_topic.values_mut() {
            if let Some(i) = q.iter().position(|h| h.req.unique_id == unique_id) {
                q.remove(i);
                found = true;
                break;
            }
        }
        if found {
            self.by_topic.retain(|_, q| !q.is_empty());
            self.total = self.total.saturating_sub(1);
        }
        found
    }

    /// How many are held.
    pub fn len(&self) -> usize {
        self.total
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// Time left of `req`'s own timeout, received at `arrived`: `None` without
/// one, `Some(0)` once it is over.
pub fn time_left(req: &Request, arrived: Instant, now: Instant) -> Option<u64> {
    req.timeout_ms.map(|t| {
        let spent = now.saturating_duration_since(arrived).as_millis();
        u64::try_from(u128::from(t).saturating_sub(spent)).unwrap_or(0)
    })
}

fn timed_out(h: &Held, now: Instant) -> bool {
    time_left(&h.req, h.arrived, now) == Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::{Kind, Target};

    fn req(topic: &str, timeout_ms: Option<u64>) -> Request {
        Request {
            kind: Kind::Cast,
            target: Target {
                topic: topic.into(),
                ..Default::default()
            },
            method: "m".into(),
            args: serde_json::Value::Null,
            ctx: serde_json::Value::Null,
            msg_id: None,
            unique_id: crate::rpc::new_unique_id(),
            reply_to: None,
            timeout_ms,
        }
    }

    #[test]
    fn bounded_per_topic_and_released_in_order() {
        let mut h = Holding::default();
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(30);
        for _ in 0..MAX_HELD_PER_TOPIC {
            h.hold(req("a", None), t0, until).unwrap();
        }
        assert!(h.hold(req("a", None), t0, until).is_err(), "per topic");
        h.hold(req("b", None), t0, until).unwrap();
        assert_eq!(h.len(), MAX_HELD_PER_TOPIC + 1);
        assert_eq!(h.take("a").len(), MAX_HELD_PER_TOPIC);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn grace_and_own_timeouts_expire() {
        let mut h = Holding::default();
        let t0 = Instant::now();
        h.hold(req("a", None), t0, t0 + Duration::from_secs(30))
            .unwrap();
        h.hold(req("a", Some(100)), t0, t0 + Duration::from_secs(30))
            .unwrap();
        h.hold(req("b", None), t0, t0 + Duration::from_secs(1))
            .unwrap();
        let gone = h.expired(t0 + Duration::from_secs(2));
        assert_eq!(gone.len(), 2);
        assert_eq!(h.len(), 1);
        assert!(h.expired(t0 + Duration::from_secs(29)).is_empty());
        assert_eq!(h.expired(t0 + Duration::from_secs(30)).len(), 1);
        assert!(h.is_empty());
    }
}
