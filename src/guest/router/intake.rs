//! Requests from the host: the agent's own methods (`tether.agent`, the
//! supervisor's), dispatch to the sub-agent serving the topic, its queue
//! and backlog, and the answers when no sub-agent can take a request
//! (refused, held past the grace, expired).

use super::*;

impl Router {
    pub(super) async fn on_request(&mut self, r: Request) {
        let known = crate::lock(&self.journal).state(&r.unique_id);
        if known == Some(State::Cancelled) {
            // Sent again after the host cancelled it (a broker redelivery):
            // never run; the host learns so again.
            self.duplicates_dropped += 1;
            let m = LinkMsg::Refused {
                unique_id: r.unique_id,
                reason: CANCELLED.into(),
            };
            return self.send(&m).await;
        }
        if r.kind == Kind::Call && r.msg_id.is_none() {
            warn!("call without msg_id refused: it could not be answered");
            return self
                .refuse_request(
                    r,
                    "Malformed",
                    "a call without msg_id cannot be answered".into(),
                )
                .await;
        }
        if matches!(r.kind, Kind::Notify) {
            return self
                .refuse_request(
                    r,
                    "Malformed",
                    "notifications go from guests to the control plane, not into a guest".into(),
                )
                .await;
        }
        if r.target.topic == AGENT_TOPIC {
            return self.agent_method(r).await;
        }
        if known.is_some() {
            // Taken before (by this run, or by one that was killed before
            // the host got its receipt): confirmed again, never run again.
            self.duplicates_dropped += 1;
            debug!(unique_id = %r.unique_id, "request taken before: receipt sent again");
            self.took(r.unique_id.clone()).await;
            if let (Kind::Call, Some(m)) = (r.kind, r.msg_id) {
                let f = Failure::tether(
                    "GuestRestarted",
                    "the agent took this call before it restarted; it may or may not have run",
                );
                self.reply(m, r.reply_to, Err(f)).await;
            }
            return;
        }
        if !self.dedup.first_sight(&r.unique_id) {
            // Still here, not yet taken: its receipt comes when it is.
            self.duplicates_dropped += 1;
            debug!(unique_id = %r.unique_id, "duplicate request dropped");
            return;
        }
        if r.target.topic == SUPERVISOR_TOPIC {
            return self.builtin(r).await;
        }
        self.dispatch(r, Instant::now()).await;
    }

    /// The agent's own topic: methods that only read, answered every time
    /// they arrive — never journaled, never taken for a duplicate (asking
    /// again, or after a restart, gets a fresh answer). A call's reply is
    /// its receipt (the host settles a call on its reply); a cast (which
    /// does nothing here) gets `took`. A request the host cancelled was
    /// refused before this.
    pub(super) async fn agent_method(&mut self, r: Request) {
        if r.timeout_ms == Some(0) {
            return self.expired(r).await;
        }
        let Some(m) = r.msg_id.filter(|_| r.kind == Kind::Call) else {
            return self.took(r.unique_id).await;
        };
        let res = match r.method.as_str() {
            "stats" => Ok(self.stats()),
            "ping" => Ok(r.args),
            other => Err(Failure::tether(
                "NoSuchMethod",
                format!("{AGENT_TOPIC} has no method '{other}' (stats, ping)"),
            )),
        };
        self.reply(m, r.reply_to, res).await;
    }

    /// The supervisor's targets: taken at once.
    pub(super) async fn builtin(&mut self, r: Request) {
        if r.timeout_ms == Some(0) {
            return self.expired(r).await;
        }
        crate::lock(&self.journal).record(&r.unique_id);
        self.took(r.unique_id.clone()).await;
        let msg_id = r.msg_id.clone().filter(|_| r.kind == Kind::Call);
        let sup = self.supervisor.clone();
        let link = self.link.clone();
        let router_reply = msg_id.map(|m| (m, r.reply_to.clone()));
        tokio::spawn(async move {
            let res = sup.handle(&r.method, &r.args).await;
            match router_reply {
                Some((msg_id, reply_to)) => send_reply(&link, msg_id, reply_to, res).await,
                None => {
                    if let Err(f) = res {
                        warn!(error = %f.message, "supervisor cast failed");
                    }
                }
            }
        });
    }

    /// To the sub-agent serving its topic, or held until one does.
    pub(super) async fn dispatch(&mut self, mut r: Request, arrived: Instant) {
        if crate::lock(&self.journal).state(&r.unique_id) == Some(State::Cancelled) {
            // Cancelled while it waited (the cancel was answered then).
            return debug!(unique_id = %r.unique_id, "cancelled request not dispatched");
        }
        let now = Instant::now();
        if r.timeout_ms.is_some() {
            r.timeout_ms = time_left(&r, arrived, now);
            if r.timeout_ms == Some(0) {
                return self.expired(r).await;
            }
        }
        let Some(&conn) = self.topics.get(&r.target.topic) else {
            let until = arrived + self.grace;
            if until <= now {
                return self.unserved(r).await;
            }
            if let Err(r) = self.holding.hold(r, now, until) {
                let why = format!(
                    "too many requests wait for topic '{}' to get a sub-agent",
                    r.target.topic
                );
                self.refuse_request(*r, "Overloaded", why).await;
            }
            return;
        };
        let is_call = r.kind == Kind::Call;
        if is_call && self.inflight.len() >= MAX_INFLIGHT {
            let why = format!("{MAX_INFLIGHT} calls already in progress");
            return self.refuse_request(r, "Overloaded", why).await;
        }
        let Some(sub) = self.subs.get_mut(&conn) else {
            return;
        };
        if sub.backlog.len() >= SUB_BACKLOG || sub.unconfirmed.len() >= SUB_BACKLOG {
            let why = format!(
                "sub-agent '{}' is not keeping up: {SUB_BACKLOG} requests wait for it",
                sub.name
            );
            return self.refuse_request(r, "SubAgentBusy", why).await;
        }
        let id = self.next_req;
        self.next_req += 1;
        if sub.ack {
            sub.unconfirmed.insert(id, (r.clone(), now));
        }
        let out = ToSub::Request {
            id,
            taken_on_write: !sub.ack,
            unique_id: r.unique_id.clone(),
            kind: if is_call { Kind::Call } else { Kind::Cast },
            target: r.target.clone(),
            method: r.method.clone(),
            args: r.args,
            ctx: r.ctx,
            timeout_ms: r.timeout_ms,
        };
        if is_call && let Some(m) = &r.msg_id {
            let ttl = r.timeout_ms.map_or(FORGET_AFTER, Duration::from_millis);
            self.inflight.insert(
                (conn, id),
                InFlight {
                    msg_id: m.clone(),
                    reply_to: r.reply_to.clone(),
                    expires: later(now, ttl),
                },
            );
        }
        if sub.backlog.is_empty() {
            match sub.tx.try_send(out) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(out)) => sub.backlog.push_back(out),
                // Its connection is ending: the Gone event brings it back.
                Err(mpsc::error::TrySendError::Closed(out)) => {
                    sub.backlog.push_back(out);
                    return;
                }
            }
            let tx = sub.tx.clone();
            self.room
                .push(Box::pin(async move { (conn, tx.reserve_owned().await) }));
        } else {
            sub.backlog.push_back(out);
        }
    }

    /// Room in `conn`'s queue: hand over the oldest of its backlog.
    pub(super) fn on_room(&mut self, conn: ConnId, permit: Option<mpsc::OwnedPermit<ToSub>>) {
        let Some(sub) = self.subs.get_mut(&conn) else {
            return;
        };
        let Some(permit) = permit else {
            return; // the connection ends; Gone brings the backlog back
        };
        let Some(out) = sub.backlog.pop_front() else {
            return;
        };
        let tx = permit.send(out);
        if !sub.backlog.is_empty() {
            self.room
                .push(Box::pin(async move { (conn, tx.reserve_owned().await) }));
        }
    }

    /// Tell the host a sub-agent (or the agent) took `unique_id`.
    pub(super) async fn took(&self, unique_id: String) {
        self.send(&LinkMsg::Took { unique_id }).await;
    }

    /// Refuse `r` explicitly: a call gets an error answer, a cast a
    /// `refused` to the host (which settles it and audits it).
    pub(super) async fn refuse_request(&mut self, r: Request, class: &str, why: String) {
        self.refused += 1;
        self.handovers.remove(&r.unique_id);
        warn!(topic = %r.target.topic, method = %r.method, class, reason = %why, "request refused");
        match (r.kind, r.msg_id) {
            (Kind::Call, Some(m)) => {
                self.reply(m, r.reply_to, Err(Failure::tether(class, why)))
                    .await
            }
            _ => {
                let m = LinkMsg::Refused {
                    unique_id: r.unique_id,
                    reason: format!("{class}: {why}"),
                };
                self.send(&m).await;
            }
        }
    }

    pub(super) async fn unserved(&mut self, r: Request) {
        let why = format!(
            "no sub-agent serves topic '{}' in this instance (waited {} ms for one)",
            r.target.topic,
            self.grace.as_millis()
        );
        self.refuse_request(r, "NoSuchTopic", why).await
    }

    /// Its caller's time ran out before a sub-agent could take it: never
    /// run. The host is told (`refused`), so it stops keeping it.
    pub(super) async fn expired(&mut self, r: Request) {
        info!(method = %r.method, topic = %r.target.topic, "expired request not run");
        self.refused += 1;
        self.handovers.remove(&r.unique_id);
        let m = LinkMsg::Refused {
            unique_id: r.unique_id,
            reason: "Expired: its caller's timeout ran out before a sub-agent took it".into(),
        };
        self.send(&m).await;
    }
}
