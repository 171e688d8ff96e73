//! Guest → host: what the sub-agents send the control plane (their calls,
//! casts and notifications, as link requests) and the replies to their
//! calls.

use super::*;

impl Router {
    /// Send a sub-agent's cast or notification upstream, remembered (the
    /// last [`RECENT_CASTS`]) to route the host's refusal back to it.
    pub(super) async fn cast_upstream(&mut self, conn: ConnId, r: Request) {
        if self.cast_order.len() >= RECENT_CASTS
            && let Some(old) = self.cast_order.pop_front()
        {
            self.casts.remove(&old);
        }
        self.cast_order.push_back(r.unique_id.clone());
        self.casts.insert(
            r.unique_id.clone(),
            (conn, r.target.clone(), r.method.clone()),
        );
        self.send(&LinkMsg::Req(r)).await;
    }

    pub(super) async fn on_upstream_reply(&mut self, r: Reply) {
        if !r.ending {
            return; // a heartbeat: the answer is still coming
        }
        let Some(u) = self.upstream.remove(&r.msg_id) else {
            debug!(msg_id = %r.msg_id, "reply to an unknown or expired upstream call dropped");
            return;
        };
        if let Some(sub) = self.subs.get(&u.conn) {
            let _ = sub.tx.try_send(ToSub::Result {
                id: u.id,
                result: r.result,
                error: r.failure,
            });
        }
    }
}

/// A request of a sub-agent's to the control plane, with an id of its own.
pub(super) fn upstream_request(
    kind: Kind,
    target: Target,
    method: String,
    args: Value,
    ctx: Value,
    msg_id: Option<String>,
    timeout_ms: Option<u64>,
) -> Request {
    Request {
        kind,
        target,
        method,
        args,
        ctx,
        msg_id,
        unique_id: new_unique_id(),
        reply_to: None,
        timeout_ms,
    }
}
