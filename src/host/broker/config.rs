//! The `[broker]` section of the proxy's config, in oslo.messaging terms.

use serde::{Deserialize, Serialize};

/// How the proxy meets RabbitMQ. An empty `transport_url` means no broker:
/// the proxy serves its control socket only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// oslo's `transport_url`: `rabbit://user:pass@host:port[,user:pass@host2:port2]/vhost`.
    /// Several hosts: tried in turn (failover).
    pub transport_url: String,
    /// oslo's `control_exchange`.
    pub control_exchange: String,
    /// oslo's `amqp_durable_queues`: the control exchange and the
    /// `<topic>.<server>` queues are durable. The declaration flags below
    /// must match what the deployment's own services declared, or the broker
    /// refuses with 406 PRECONDITION_FAILED (reported by `tetherctl broker`).
    pub durable: bool,
    /// oslo's `rabbit_quorum_queue`: `<topic>.<server>` queues are quorum
    /// queues (and, as in oslo, the control exchange and they are durable).
    pub quorum_queues: bool,
    /// oslo's `rabbit_transient_quorum_queue`: the reply and fanout queues
    /// are durable quorum queues and the `<topic>_fanout` exchanges durable.
    pub transient_quorum_queues: bool,
    /// oslo's `rabbit_stream_fanout`: fanout goes through one shared stream
    /// queue `<topic>_fanout` per topic (needs `transient_quorum_queues`, as
    /// in oslo), read from this proxy's last offset after a reconnect.
    pub stream_fanout: bool,
    /// oslo's `rabbit_transient_queues_ttl`, in ms (oslo: 1800 s): `x-expires`
    /// of the proxy's reply and fanout queues, or the stream's `x-max-age`
    /// (whole seconds). 0: none.
    pub queue_expires_ms: u64,
    /// Deliveries in flight per instance (AMQP prefetch): unacknowledged
    /// messages the broker hands this proxy for one VM.
    pub prefetch: u16,
    /// After an instance's link drops, its unacknowledged deliveries are
    /// requeued after this long unless the guest acknowledged them
    /// meanwhile (a link blip should not cause redeliveries), ms.
    pub requeue_grace_ms: u64,
    /// Reconnect backoff bounds, ms.
    pub reconnect_min_ms: u64,
    /// Reconnect backoff cap, ms.
    pub reconnect_max_ms: u64,
    /// Guest messages for the broker held while it is unreachable; beyond
    /// this they are refused (calls get a `BrokerUnavailable` failure).
    pub upstream_hold: usize,
    /// Of those, the most one instance may have waiting at once (queued for
    /// the bridge, held, or retried): one guest's burst cannot use up the
    /// hold its neighbours need (`BrokerUnavailable` for the guest past it).
    pub upstream_per_instance: usize,
    /// And the most bytes (of guest messages, as sent on the link) one
    /// instance may have waiting: a hundred maximal messages would be 25 MiB.
    pub upstream_bytes_per_instance: usize,
    /// Longest a guest's call to the control plane may wait for its reply
    /// when the guest did not say, ms.
    pub upstream_call_timeout_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            transport_url: String::new(),
            control_exchange: "openstack".into(),
            durable: false,
            quorum_queues: false,
            transient_quorum_queues: false,
            stream_fanout: false,
            queue_expires_ms: 1_800_000,
            prefetch: 64,
            requeue_grace_ms: 2_000,
            reconnect_min_ms: 200,
            reconnect_max_ms: 10_000,
            upstream_hold: 1_000,
            upstream_per_instance: 100,
            upstream_bytes_per_instance: 4 << 20,
            upstream_call_timeout_ms: 60_000,
        }
    }
}

impl BrokerConfig {
    /// Whether a broker is configured.
    pub fn enabled(&self) -> bool {
        !self.transport_url.trim().is_empty()
    }

    /// The AMQP URIs to try, in order.
    pub fn amqp_uris(&self) -> Result<Vec<String>, String> {
        parse_transport_url(&self.transport_url)
    }

    /// Check the section; `Err` says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        self.amqp_uris()?;
        if self.control_exchange.is_empty() || self.control_exchange.len() > 200 {
            return Err("broker.control_exchange must be 1-200 characters".into());
        }
        if self.prefetch == 0 {
            return Err("broker.prefetch must be at least 1".into());
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return Err("broker.reconnect_min_ms must be > 0 and <= reconnect_max_ms".into());
        }
        if self.upstream_hold == 0 {
            return Err("broker.upstream_hold must be at least 1".into());
        }
        if self.upstream_per_instance == 0 {
            return Err("broker.upstream_per_instance must be at least 1".into());
        }
        if self.upstream_bytes_per_instance < 1 << 20 {
            return Err(
                "broker.upstream_bytes_per_instance must be at least 1048576 (1 MiB)".into(),
            );
        }
        if self.stream_fanout && !self.transient_quorum_queues {
            return Err(
                "broker.stream_fanout needs broker.transient_quorum_queues = true (as oslo.messaging's rabbit_stream_fanout needs rabbit_transient_quorum_queue)"
                    .into(),
            );
        }
        if self.stream_fanout && !self.queue_expires_ms.is_multiple_of(1000) {
            return Err(
                "broker.queue_expires_ms must be whole seconds with stream_fanout (it becomes the stream's x-max-age)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Whether the control exchange and the `<topic>.<server>` queues are
    /// durable (oslo: `amqp_durable_queues or rabbit_quorum_queue`).
    pub fn server_durable(&self) -> bool {
        self.durable || self.quorum_queues
    }

    /// Whether the fanout exchanges and the reply and fanout queues are
    /// durable (oslo: `rabbit_transient_quorum_queue`, or a stream).
    pub fn transient_durable(&self) -> bool {
        self.transient_quorum_queues || self.stream_fanout
    }
}

/// `rabbit://u:p@h1:5672,u:p@h2:5672/vhost` → one `amqp://` URI per host.
pub fn parse_transport_url(url: &str) -> Result<Vec<String>, String> {
    let bad = |why: &str| format!("broker.transport_url {url:?}: {why}");
    let rest = url
        .strip_prefix("rabbit://")
        .or_else(|| url.strip_prefix("amqp://"))
        .ok_or_else(|| bad("must start with rabbit:// or amqp://"))?;
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    // oslo reads driver options from the query; this proxy takes its
    // declaration flags from [broker]. TLS it cannot do yet: refusing is
    // better than connecting in clear text to a broker meant for TLS.
    for kv in query.split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if k == "ssl" && matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on") {
            return Err(bad("TLS (ssl=...) is not supported by tether-proxy yet"));
        }
    }
    let (hosts, vhost) = match rest.split_once('/') {
        Some((h, v)) => (h, v),
        None => (rest, ""),
    };
    let vhost = if vhost.is_empty() { "/" } else { vhost };
    let vhost = vhost.replace('%', "%25").replace('/', "%2f");
    let mut out = vec![];
    for h in hosts.split(',') {
        let h = h.trim();
        if h.is_empty() {
            return Err(bad("an empty host"));
        }
        let (cred, addr) = match h.rsplit_once('@') {
            Some((c, a)) => (Some(c), a),
            None => (None, h),
        };
        if addr.is_empty() {
            return Err(bad("a host without an address"));
        }
        let addr = if addr.contains(':') {
            addr.to_string()
        } else {
            format!("{addr}:5672")
        };
        let cred = cred.unwrap_or("guest:guest");
        out.push(format!("amqp://{cred}@{addr}/{vhost}"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oslo_transport_urls() {
        assert_eq!(
            parse_transport_url("rabbit://u:p@h1:5673,v:q@h2/").unwrap(),
            vec!["amqp://u:p@h1:5673/%2f", "amqp://v:q@h2:5672/%2f"]
        );
        assert_eq!(
            parse_transport_url("rabbit://h/nova?ssl=0").unwrap(),
            vec!["amqp://guest:guest@h:5672/nova"]
        );
        for bad in [
            "http://h/",
            "rabbit://",
            "rabbit://a,,b/",
            "rabbit://u:p@/",
            "rabbit://h/?ssl=true",
        ] {
            assert!(parse_transport_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation() {
        assert!(
            BrokerConfig::default().validate().is_ok(),
            "no broker is fine"
        );
        let c = BrokerConfig {
            transport_url: "rabbit://h/".into(),
            prefetch: 0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("prefetch"));
        let c = BrokerConfig {
            transport_url: "rabbit://h/".into(),
            stream_fanout: true,
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .contains("transient_quorum_queues")
        );
        let c = BrokerConfig {
            transient_quorum_queues: true,
            queue_expires_ms: 1500,
            ..c
        };
        assert!(c.validate().unwrap_err().contains("whole seconds"));
    }
}
