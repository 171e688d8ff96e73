//! Each instance's share of the bridge: the guest messages one instance may
//! have waiting for the broker at once — queued for the bridge, held while
//! the broker is away, retried while nothing consumes their topic, or (a
//! call) published and waiting for its answer. The
//! bridge's queue and hold are shared by every instance on the host; without
//! a share, one guest's burst would fill them and its neighbours' messages
//! would be refused (`BrokerUnavailable`) with the broker up.
//!
//! A message carries a [`Ticket`] from the moment it is offered until the
//! bridge is done with it (published, refused, answered): the count of its
//! instance goes down when the last copy of the ticket is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::lock;

/// The shares of all instances.
#[derive(Debug)]
pub struct Shares {
    counts: Mutex<HashMap<String, usize>>,
    cap: usize,
}

impl Shares {
    /// Shares of at most `cap` messages per instance.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            counts: Mutex::new(HashMap::new()),
            cap: cap.max(1),
        })
    }

    /// The most one instance may have waiting.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// A ticket for one more message of `instance`, or `None` when its
    /// share is used up.
    pub fn take(self: &Arc<Self>, instance: &str) -> Option<Ticket> {
        let mut c = lock(&self.counts);
        let n = c.entry(instance.to_string()).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(Ticket(Arc::new(Inner {
            shares: self.clone(),
            instance: instance.to_string(),
        })))
    }

    /// How many messages `instance` has waiting.
    pub fn used(&self, instance: &str) -> usize {
        lock(&self.counts).get(instance).copied().unwrap_or(0)
    }
}

/// One message's claim on its instance's share (shared by its copies).
#[derive(Debug, Clone)]
pub struct Ticket(#[allow(dead_code)] Arc<Inner>);

#[derive(Debug)]
struct Inner {
    shares: Arc<Shares>,
    instance: String,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let mut c = lock(&self.shares.counts);
        if let Some(n) = c.get_mut(&self.instance) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.instance);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_is_per_instance_and_comes_back_with_the_last_copy() {
        let s = Shares::new(2);
        let a1 = s.take("a").unwrap();
        let a2 = s.take("a").unwrap();
        assert!(s.take("a").is_none(), "a's share is used up");
        let b = s.take("b").expect("b has its own");
        let copy = a1.clone();
        drop(a1);
        assert_eq!(s.used("a"), 2, "a copy still holds it");
        drop(copy);
        assert_eq!(s.used("a"), 1);
        assert!(s.take("a").is_some());
        drop((a2, b));
        assert_eq!(s.used("b"), 0);
    }
}
