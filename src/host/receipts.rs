//! Requests sent into one guest and not yet taken by a sub-agent.
//!
//! The link's ACK says a frame reached the agent's memory; a request counts
//! as delivered only when the agent says a sub-agent took it (`took`), or
//! that none could (`refused`). Until then the proxy keeps the request here:
//! a new guest session (the agent restarted) gets every request still here
//! again, in order, and the agent's journal drops those it had taken before
//! (answering `took` again). The table is bounded per instance: a sender
//! waits for room, which is the backpressure a guest that does not take its
//! requests puts on the control socket and the broker consumers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::lock;

/// Bytes of requests kept per instance until taken (8 MiB: twice the link's
/// default send window, plus what the agent may hold for a sub-agent that
/// is (re)starting or slow); a sender past it waits.
pub const MAX_OUTSTANDING_BYTES: usize = 8 << 20;
/// What a request costs at least against [`MAX_OUTSTANDING_BYTES`] (its
/// table entry), which bounds the count too: at most 8192 requests, no
/// more than the agent's journal remembers.
pub const MIN_REQUEST_COST: usize = 1024;
/// The most requests kept per instance.
pub const MAX_OUTSTANDING: usize = MAX_OUTSTANDING_BYTES / MIN_REQUEST_COST;

/// How a request ended, as far as the proxy can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A sub-agent took it.
    Taken,
    /// The agent refused it (the reason starts with a class-like word).
    Refused(String),
    /// It will not be delivered: the link expired (the guest was away for
    /// longer than the grace period).
    Lost(String),
}

struct Entry {
    order: u64,
    bytes: Bytes,
    waiters: Vec<oneshot::Sender<Outcome>>,
    /// The local msg_id when the request is a call.
    call: Option<String>,
    _slot: OwnedSemaphorePermit,
}

#[derive(Default)]
struct Table {
    by_id: HashMap<String, Entry>,
    order: BTreeMap<u64, String>,
    /// Local msg_id → unique id, for the calls among them.
    calls: HashMap<String, String>,
    next: u64,
}

/// What [`Receipts::insert`] did.
pub enum Inserted {
    /// A new entry: send the request.
    New(oneshot::Receiver<Outcome>),
    /// The same unique id is already waiting (a caller's retry): it is not
    /// sent again; the receiver learns the same outcome.
    Existing(oneshot::Receiver<Outcome>),
}

/// The outstanding requests of one instance.
pub struct Receipts {
    table: Mutex<Table>,
    slots: Arc<Semaphore>,
}

impl Default for Receipts {
    fn default() -> Self {
        Self {
            table: Mutex::default(),
            slots: Arc::new(Semaphore::new(MAX_OUTSTANDING_BYTES)),
        }
    }
}

impl Receipts {
    /// Wait for room for one more request of `len` bytes (a single request
    /// is at most the link's hard payload limit, 16 MiB; one larger than
    /// the whole bound waits for an empty table and takes all of it).
    pub async fn slot(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        let cost = len.clamp(MIN_REQUEST_COST, MAX_OUTSTANDING_BYTES);
        let cost = u32::try_from(cost).unwrap_or(u32::MAX);
        self.slots.clone().acquire_many_owned(cost).await.ok()
    }

    /// Keep `bytes` (the encoded request) until `unique_id` is settled.
    pub fn insert(
        &self,
        unique_id: &str,
        bytes: Bytes,
        call: Option<String>,
        slot: OwnedSemaphorePermit,
    ) -> Inserted {
        let (tx, rx) = oneshot::channel();
        let mut t = lock(&self.table);
        if let Some(e) = t.by_id.get_mut(unique_id) {
            e.waiters.push(tx);
            return Inserted::Existing(rx);
        }
        let order = t.next;
        t.next = t.next.wrapping_add(1);
        t.order.insert(order, unique_id.to_string());
        if let Some(c) = &call {
            t.calls.insert(c.clone(), unique_id.to_string());
        }
        t.by_id.insert(
            unique_id.to_string(),
            Entry {
                order,
                bytes,
                waiters: vec![tx],
                call,
                _slot: slot,
            },
        );
        Inserted::New(rx)
    }

    /// Settle `unique_id`: its waiters learn `outcome`. Returns `None` when it
    /// was not outstanding, else the local msg_id if it was a call.
    pub fn settle(&self, unique_id: &str, outcome: Outcome) -> Option<Option<String>> {
        let e = self.remove(unique_id)?;
        for w in e.waiters {
            let _ = w.send(outcome.clone());
        }
        Some(e.call)
    }

    /// Forget `unique_id` without telling anyone (its caller gave up, or the
    /// broker will deliver it again): it is not sent to a new session.
    pub fn withdraw(&self, unique_id: &str) {
        self.remove(unique_id);
    }

    /// The caller of `unique_id` gave up: a new session gets `cancel`
    /// (encoded in `bytes`) instead of the request, the call is no longer
    /// one a reply settles, and the returned receiver learns the outcome.
    /// `None` when it is not outstanding.
    pub fn cancel(&self, unique_id: &str, bytes: Bytes) -> Option<oneshot::Receiver<Outcome>> {
        let mut t = lock(&self.table);
        let e = t.by_id.get_mut(unique_id)?;
        let (tx, rx) = oneshot::channel();
        e.waiters.push(tx);
        e.bytes = bytes;
        if let Some(c) = e.call.take() {
            t.calls.remove(&c);
        }
        Some(rx)
    }

    /// Settle the call known locally as `msg_id` (its answer came, so a
    /// sub-agent took it): `Taken` for its waiters.
    pub fn settle_call(&self, msg_id: &str) {
        let uid = lock(&self.table).calls.get(msg_id).cloned();
        if let Some(uid) = uid {
            self.settle(&uid, Outcome::Taken);
        }
    }

    fn remove(&self, unique_id: &str) -> Option<Entry> {
        let mut t = lock(&self.table);
        let e = t.by_id.remove(unique_id)?;
        t.order.remove(&e.order);
        if let Some(c) = &e.call {
            t.calls.remove(c);
        }
        Some(e)
    }

    /// Every outstanding request, oldest first, to send to a new session.
    pub fn to_resend(&self) -> Vec<Bytes> {
        let t = lock(&self.table);
        t.order
            .values()
            .filter_map(|id| t.by_id.get(id).map(|e| e.bytes.clone()))
            .collect()
    }

    /// The outstanding calls (their local msg_ids).
    pub fn calls(&self) -> HashSet<String> {
        lock(&self.table).calls.keys().cloned().collect()
    }

    /// Settle everything as [`Outcome::Lost`].
    pub fn lose_all(&self, why: &str) {
        let all: Vec<Entry> = {
            let mut t = lock(&self.table);
            t.order.clear();
            t.calls.clear();
            t.by_id.drain().map(|(_, e)| e).collect()
        };
        for e in all {
            for w in e.waiters {
                let _ = w.send(Outcome::Lost(why.to_string()));
            }
        }
    }

    /// How many are outstanding.
    pub fn len(&self) -> usize {
        lock(&self.table).by_id.len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn put(r: &Receipts, id: &str, call: Option<&str>) -> Inserted {
        let s = r.slot(id.len()).await.unwrap();
        r.insert(id, Bytes::from(id.to_string()), call.map(String::from), s)
    }

    #[tokio::test]
    async fn settled_once_resent_in_order_and_bounded() {
        let r = Receipts::default();
        let Inserted::New(a) = put(&r, "a", None).await else {
            panic!("a is new")
        };
        let Inserted::New(_b) = put(&r, "b", Some("m-b")).await else {
            panic!("b is new")
        };
        let Inserted::Existing(a2) = put(&r, "a", None).await else {
            panic!("a retried is not sent again")
        };
        assert_eq!(r.to_resend(), vec![Bytes::from("a"), Bytes::from("b")]);
        assert_eq!(r.calls(), HashSet::from(["m-b".to_string()]));
        assert_eq!(r.settle("a", Outcome::Taken), Some(None));
        assert_eq!(a.await.unwrap(), Outcome::Taken);
        assert_eq!(a2.await.unwrap(), Outcome::Taken);
        assert_eq!(r.settle("a", Outcome::Taken), None, "settled once");
        r.settle_call("m-b");
        assert_eq!(r.settle("b", Outcome::Taken), None, "settled by its answer");
        assert!(r.is_empty());
        // The slots come back as entries settle.
        assert_eq!(r.slots.available_permits(), MAX_OUTSTANDING_BYTES);
    }

    #[tokio::test]
    async fn a_cancelled_call_is_resent_as_its_cancel() {
        let r = Receipts::default();
        let _ = put(&r, "a", Some("m-a")).await;
        let _ = put(&r, "b", None).await;
        let rx = r.cancel("a", Bytes::from("cancel a")).unwrap();
        assert!(r.cancel("nothing", Bytes::new()).is_none());
        assert!(r.calls().is_empty(), "no longer a call a reply settles");
        assert_eq!(
            r.to_resend(),
            vec![Bytes::from("cancel a"), Bytes::from("b")]
        );
        r.settle("a", Outcome::Refused("Cancelled: gone".into()));
        assert_eq!(
            rx.await.unwrap(),
            Outcome::Refused("Cancelled: gone".into())
        );
    }

    #[tokio::test]
    async fn lost_and_withdrawn() {
        let r = Receipts::default();
        let Inserted::New(a) = put(&r, "a", None).await else {
            panic!()
        };
        let _ = put(&r, "b", None).await;
        r.withdraw("b");
        assert_eq!(r.len(), 1);
        r.lose_all("expired");
        assert_eq!(a.await.unwrap(), Outcome::Lost("expired".into()));
        assert!(r.to_resend().is_empty());
    }
}
