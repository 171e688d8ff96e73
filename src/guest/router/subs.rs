//! Sub-agents' events: registration and topics, a sub-agent gone (its
//! requests handed to another or refused), and what a sub-agent sends —
//! replies, confirmations of what it took, and its own calls, casts and
//! notifications to the control plane.

use super::upstream::upstream_request;
use super::*;

impl Router {
    pub(super) async fn on_sub(&mut self, ev: SubEvent) {
        match ev {
            SubEvent::Connected(conn, tx) => {
                self.subs.insert(
                    conn,
                    Sub {
                        name: format!("conn-{conn}"),
                        topics: vec![],
                        tx,
                        backlog: VecDeque::new(),
                        ack: false,
                        unconfirmed: BTreeMap::new(),
                    },
                );
            }
            SubEvent::Gone(conn, unsent) => self.sub_gone(conn, unsent).await,
            SubEvent::Message(conn, m) => self.on_sub_message(conn, *m).await,
            SubEvent::Skipped(conn, id) => {
                self.inflight.remove(&(conn, id));
            }
        }
    }

    pub(super) async fn sub_gone(&mut self, conn: ConnId, unsent: Vec<ToSub>) {
        let Some(mut sub) = self.subs.remove(&conn) else {
            return;
        };
        info!(subagent = %sub.name, "sub-agent disconnected");
        for t in &sub.topics {
            self.topics.remove(t);
        }
        // What it never read is held for the sub-agent that registers its
        // topic next (the supervisor restarting it), oldest first.
        let now = Instant::now();
        let back: Vec<ToSub> = if sub.ack {
            // Everything it did not confirm, in the order it got it.
            let n = sub.unconfirmed.len();
            for (id, (r, since)) in std::mem::take(&mut sub.unconfirmed) {
                self.inflight.remove(&(conn, id));
                let n = self.handovers.entry(r.unique_id.clone()).or_insert(0);
                *n += 1;
                if *n >= MAX_HANDOVERS {
                    let why = format!(
                        "{MAX_HANDOVERS} sub-agents went away while holding it; not handed over again"
                    );
                    self.refuse_request(r, "SubAgentGone", why).await;
                } else {
                    self.dispatch(r, since).await;
                }
            }
            if n > 0 {
                info!(subagent = %sub.name, requests = n, "requests it never confirmed wait for its topic's next sub-agent");
            }
            vec![]
        } else {
            unsent.into_iter().chain(sub.backlog.drain(..)).collect()
        };
        let n_back = back.len();
        for m in back {
            let ToSub::Request {
                id,
                unique_id,
                kind,
                target,
                method,
                args,
                ctx,
                timeout_ms,
                ..
            } = m
            else {
                continue;
            };
            let f = self.inflight.remove(&(conn, id));
            let r = Request {
                kind,
                target,
                method,
                args,
                ctx,
                msg_id: f.as_ref().map(|f| f.msg_id.clone()),
                unique_id,
                reply_to: f.and_then(|f| f.reply_to),
                timeout_ms,
            };
            self.dispatch(r, now).await;
        }
        if n_back > 0 {
            info!(subagent = %sub.name, requests = n_back, "requests it never read wait for its topic's next sub-agent");
        }
        let lost: Vec<(ConnId, u64)> = self
            .inflight
            .keys()
            .filter(|k| k.0 == conn)
            .copied()
            .collect();
        for k in lost {
            if let Some(f) = self.inflight.remove(&k) {
                let e = Failure::tether(
                    "SubAgentGone",
                    format!("sub-agent '{}' went away", sub.name),
                );
                self.reply(f.msg_id, f.reply_to, Err(e)).await;
            }
        }
        self.upstream.retain(|_, u| u.conn != conn);
        if !sub.topics.is_empty() {
            self.topics_changed().await;
        }
    }

    pub(super) fn refuse(&self, conn: ConnId, message: String) {
        if let Some(s) = self.subs.get(&conn) {
            let _ = s.tx.try_send(ToSub::Error { message });
        }
    }

    pub(super) async fn on_sub_message(&mut self, conn: ConnId, m: FromSub) {
        match m {
            FromSub::Register { name, topics, ack } => {
                for t in &topics {
                    if t.is_empty() || t == SUPERVISOR_TOPIC || t == AGENT_TOPIC || t.len() > 255 {
                        return self.refuse(conn, format!("topic '{t}' cannot be registered"));
                    }
                    if let Some(&owner) = self.topics.get(t)
                        && owner != conn
                    {
                        let who = self
                            .subs
                            .get(&owner)
                            .map_or("another sub-agent", |s| s.name.as_str());
                        return self
                            .refuse(conn, format!("topic '{t}' is already served by {who}"));
                    }
                }
                let Some(sub) = self.subs.get_mut(&conn) else {
                    return;
                };
                for t in &sub.topics {
                    self.topics.remove(t);
                }
                for t in &topics {
                    self.topics.insert(t.clone(), conn);
                }
                info!(subagent = %name, ?topics, ack, "sub-agent registered");
                sub.ack = ack;
                sub.name = name;
                sub.topics = topics.clone();
                let _ = sub.tx.try_send(ToSub::Registered {
                    topics: topics.clone(),
                });
                self.topics_changed().await;
                // What waited for these topics goes to it now, in order.
                for t in &topics {
                    for h in self.holding.take(t) {
                        self.dispatch(h.req, h.arrived).await;
                    }
                }
            }
            FromSub::Took { id } => {
                if !self.confirmed(conn, id).await {
                    self.refuse(conn, format!("took for unknown request {id}"));
                }
            }
            FromSub::Reply { id, result, error } => {
                // A call's reply confirms it (and comes after its receipt).
                self.confirmed(conn, id).await;
                match self.inflight.remove(&(conn, id)) {
                    Some(f) => {
                        let res = crate::rpc::join_result(result, error);
                        self.reply(f.msg_id, f.reply_to, res).await;
                    }
                    // A late reply: the call expired (its caller gave up)
                    // while the sub-agent worked. A normal race, not the
                    // sub-agent's fault: dropped without a refusal.
                    None if id < self.next_req => {
                        debug!(request = id, "late reply to an expired request dropped")
                    }
                    None => self.refuse(conn, format!("reply to unknown request {id}")),
                }
            }
            FromSub::Cast {
                target,
                method,
                args,
                ctx,
            } => {
                let r = upstream_request(Kind::Cast, target, method, args, ctx, None, None);
                self.cast_upstream(conn, r).await;
            }
            FromSub::Notify {
                target,
                message,
                ctx,
            } => {
                // The host checks the notification; the agent names it by
                // its event type for refusals and logs.
                let event_type = message
                    .get("event_type")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let r =
                    upstream_request(Kind::Notify, target, event_type, message, ctx, None, None);
                self.cast_upstream(conn, r).await;
            }
            FromSub::Call {
                id,
                target,
                method,
                args,
                ctx,
                timeout_ms,
            } => {
                if self.upstream.len() >= MAX_UPSTREAM {
                    if let Some(s) = self.subs.get(&conn) {
                        let e = Failure::tether(
                            "Overloaded",
                            format!("{MAX_UPSTREAM} upstream calls in progress"),
                        );
                        let _ = s.tx.try_send(ToSub::Result {
                            id,
                            result: None,
                            error: Some(e),
                        });
                    }
                    return;
                }
                let timeout = timeout_ms.map_or(DEFAULT_UPSTREAM_TIMEOUT, Duration::from_millis);
                let msg_id = new_unique_id();
                self.upstream.insert(
                    msg_id.clone(),
                    Upstream {
                        conn,
                        id,
                        expires: later(Instant::now(), timeout),
                    },
                );
                let ms = timeout.as_millis() as u64;
                let r = upstream_request(
                    Kind::Call,
                    target,
                    method,
                    args,
                    ctx,
                    Some(msg_id),
                    Some(ms),
                );
                self.send(&LinkMsg::Req(r)).await;
            }
        }
    }

    /// A sub-agent with `ack` confirmed request `id`: journal it, tell the
    /// host. False if it was not waiting for confirmation.
    pub(super) async fn confirmed(&mut self, conn: ConnId, id: u64) -> bool {
        let Some((r, _)) = self
            .subs
            .get_mut(&conn)
            .and_then(|s| s.unconfirmed.remove(&id))
        else {
            return false;
        };
        crate::lock(&self.journal).record(&r.unique_id);
        self.handovers.remove(&r.unique_id);
        self.took(r.unique_id).await;
        true
    }

    /// The host did not pass a cast on: tell the sub-agent that sent it.
    pub(super) fn on_refused(&mut self, unique_id: String, reason: String) {
        let Some((conn, target, method)) = self.casts.remove(&unique_id) else {
            return warn!(unique_id = %unique_id, reason = %reason, "the host refused a cast this agent no longer remembers");
        };
        warn!(topic = %target.topic, method = %method, reason = %reason, "the host refused a sub-agent's cast");
        if let Some(s) = self.subs.get(&conn) {
            let m = ToSub::CastRefused {
                target,
                method,
                reason,
            };
            if s.tx.try_send(m).is_err() {
                warn!(sub = %s.name, "sub-agent queue full: a cast refusal was only logged");
            }
        }
    }
}
