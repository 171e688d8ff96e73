//! Each instance's share of the bridge: the guest messages one instance may
//! have waiting for the broker at once — queued for the bridge, held while
//! the broker is away, retried while nothing consumes their topic, or (a
//! call) published and waiting for its answer. The
//! bridge's queue and hold are shared by every instance on the host; without
//! a share, one guest's burst would fill them and its neighbours' messages
//! would be refused (`BrokerUnavailable`) with the broker up.
//!
//! A share has two bounds: messages (`upstream_per_instance`) and bytes
//! (`upstream_bytes_per_instance`, the guest messages' sizes on the link):
//! a hundred maximal messages would otherwise be 25 MiB per instance.
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
    /// Per instance: messages and bytes waiting.
    counts: Mutex<HashMap<String, (usize, usize)>>,
    cap: usize,
    byte_cap: usize,
}

/// Which bound of a share is used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareUsed {
    /// This many messages wait.
    Messages(usize),
    /// This many bytes wait.
    Bytes(usize),
}

impl Shares {
    /// Shares of at most `cap` messages and `byte_cap` bytes per instance
    /// (a message alone is always taken, whatever its size: the link's
    /// maximum payload bounds it).
    pub fn new(cap: usize, byte_cap: usize) -> Arc<Self> {
        Arc::new(Self {
            counts: Mutex::new(HashMap::new()),
            cap: cap.max(1),
            byte_cap,
        })
    }

    /// A ticket for one more message of `instance`, `bytes` long, or which
    /// bound of its share is used up.
    pub fn take(self: &Arc<Self>, instance: &str, bytes: usize) -> Result<Ticket, ShareUsed> {
        let mut c = lock(&self.counts);
        let (n, b) = c.entry(instance.to_string()).or_insert((0, 0));
        if *n >= self.cap {
            return Err(ShareUsed::Messages(self.cap));
        }
        let after = b.saturating_add(bytes);
        if *n > 0 && after > self.byte_cap {
            return Err(ShareUsed::Bytes(self.byte_cap));
        }
        *n += 1;
        *b = after;
        Ok(Ticket(Arc::new(Inner {
            shares: self.clone(),
            instance: instance.to_string(),
            bytes,
        })))
    }

    /// How many messages `instance` has waiting, and their bytes.
    pub fn used(&self, instance: &str) -> (usize, usize) {
        lock(&self.counts).get(instance).copied().unwrap_or((0, 0))
    }
}

/// One message's claim on its instance's share (shared by its copies).
#[derive(Debug, Clone)]
pub struct Ticket(#[allow(dead_code)] Arc<Inner>);

#[derive(Debug)]
struct Inner {
    shares: Arc<Shares>,
    instance: String,
    bytes: usize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let mut c = lock(&self.shares.counts);
        if let Some((n, b)) = c.get_mut(&self.instance) {
            *n = n.saturating_sub(1);
            *b = b.saturating_sub(self.bytes);
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
        let s = Shares::new(2, 1 << 20);
        let a1 = s.take("a", 10).unwrap();
        let a2 = s.take("a", 10).unwrap();
        assert_eq!(s.take("a", 10).unwrap_err(), ShareUsed::Messages(2));
        let b = s.take("b", 10).expect("b has its own");
        let copy = a1.clone();
        drop(a1);
        assert_eq!(s.used("a"), (2, 20), "a copy still holds it");
        drop(copy);
        assert_eq!(s.used("a"), (1, 10));
        assert!(s.take("a", 10).is_ok());
        drop((a2, b));
        assert_eq!(s.used("b"), (0, 0));
    }

    #[test]
    fn a_share_is_bounded_in_bytes_too() {
        let s = Shares::new(100, 1000);
        // One message alone is taken whatever its size.
        let big = s.take("a", 5000).unwrap();
        assert_eq!(s.take("a", 1).unwrap_err(), ShareUsed::Bytes(1000));
        drop(big);
        let t: Vec<_> = (0..10).map(|_| s.take("a", 100).unwrap()).collect();
        assert_eq!(s.take("a", 1).unwrap_err(), ShareUsed::Bytes(1000));
        assert!(s.take("b", 1000).is_ok(), "b has its own");
        drop(t);
        assert_eq!(s.used("a"), (0, 0));
    }
}
