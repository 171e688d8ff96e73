//! The `[broker]` section of the proxy's config, in oslo.messaging terms.

use serde::{Deserialize, Serialize};

use super::url::TransportUrl;

/// `url` with its passwords replaced by `***` (for messages and status).
pub fn redacted(url: &str) -> String {
    // user:password@ in each host of the netloc.
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (netloc, tail) = rest.split_at(end);
    let hosts: Vec<String> = netloc
        .split(',')
        .map(|h| match h.rsplit_once('@') {
            Some((cred, host)) => match cred.split_once(':') {
                Some((user, _)) => format!("{user}:***@{host}"),
                None => h.to_string(),
            },
            None => h.to_string(),
        })
        .collect();
    format!("{scheme}://{}{tail}", hosts.join(","))
}

/// How the proxy meets RabbitMQ. An empty `transport_url` means no broker:
/// the proxy serves its control socket only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// oslo's `transport_url`: `rabbit://user:pass@host:port[,user:pass@host2:port2]/vhost`.
    /// Several hosts: tried in turn (failover).
    pub transport_url: String,
    /// oslo's `ssl`: TLS to the broker (rustls: TLS 1.2 or 1.3). The TLS
    /// port (usually 5671) goes in the URL: as in oslo, a host without a
    /// port is 5672.
    pub ssl: bool,
    /// oslo's `ssl_ca_file`: the CA certificates (PEM) the broker's
    /// certificate must chain to; none: the system's
    /// ([`SYSTEM_CA_FILE`]).
    pub ssl_ca_file: Option<std::path::PathBuf>,
    /// oslo's `ssl_cert_file`: this proxy's client certificate chain (PEM),
    /// for brokers that ask for one (`verify_peer`); with `ssl_key_file`.
    pub ssl_cert_file: Option<std::path::PathBuf>,
    /// oslo's `ssl_key_file`: the client certificate's private key (PEM,
    /// PKCS#8, PKCS#1 or SEC1).
    pub ssl_key_file: Option<std::path::PathBuf>,
    /// oslo's `ssl_version`: unset (negotiate the highest), `tlsv1_2` or
    /// `sslv23` (both: TLS 1.2 or 1.3, whichever is highest); the versions
    /// before TLS 1.2 are refused (rustls does not speak them).
    pub ssl_version: Option<String>,
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
    /// AMQP channels the proxy's connection may open (0: as many as the
    /// broker allows — RabbitMQ's `channel_max`, 2047 by default). Each
    /// linked instance serving topics takes one (its prefetch is its own),
    /// each fanout topic one, the proxy three more; instances past it are
    /// not consumed (reported, retried) while the others are served.
    pub channel_max: u16,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            transport_url: String::new(),
            ssl: false,
            ssl_ca_file: None,
            ssl_cert_file: None,
            ssl_key_file: None,
            ssl_version: None,
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
            channel_max: 0,
        }
    }
}

/// The least `channel_max` that leaves room for an instance and a fanout
/// topic beside the proxy's own three channels (publishing, answers,
/// replies), and one to spare.
pub const MIN_CHANNEL_MAX: u16 = 6;

impl BrokerConfig {
    /// Whether a broker is configured.
    pub fn enabled(&self) -> bool {
        !self.transport_url.trim().is_empty()
    }

    /// The transport URL, parsed as oslo parses it.
    pub fn url(&self) -> Result<TransportUrl, String> {
        let u = TransportUrl::parse(self.transport_url.trim()).map_err(|e| {
            format!(
                "broker.transport_url {:?}: {e}",
                redacted(&self.transport_url)
            )
        })?;
        if !matches!(u.transport.as_str(), "rabbit" | "amqp") {
            return Err(format!(
                "broker.transport_url: the transport is {:?}; tether-proxy speaks rabbit:// (AMQP 0-9-1)",
                u.transport
            ));
        }
        Ok(u)
    }

    /// The AMQP URIs to try, in order (`amqps://` with `ssl`).
    pub fn amqp_uris(&self) -> Result<Vec<String>, String> {
        let uris = self.url()?.amqp_uris(self.ssl);
        if self.channel_max == 0 {
            return Ok(uris);
        }
        // The AMQP client takes the lower of this and the broker's.
        Ok(uris
            .into_iter()
            .map(|u| format!("{u}?channel_max={}", self.channel_max))
            .collect())
    }

    /// The TLS settings for the AMQP client, the files read now (so that
    /// renewed certificates are picked up at the next connection); `None`
    /// without `ssl`. `Err` names the file and what is wrong with it.
    pub fn tls(&self) -> Result<Option<lapin::tcp::OwnedTLSConfig>, String> {
        if !self.ssl {
            return Ok(None);
        }
        let read = |what: &str, p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| format!("broker.{what} {}: {e}", p.display()))
        };
        let pem_has = |what: &str, p: &std::path::Path, text: &str, kind: &str| {
            if text.contains(&format!("-----BEGIN {kind}")) {
                Ok(())
            } else {
                Err(format!(
                    "broker.{what} {}: no PEM \"{kind}\" in it",
                    p.display()
                ))
            }
        };
        let ca_path = self
            .ssl_ca_file
            .clone()
            .unwrap_or_else(|| SYSTEM_CA_FILE.into());
        let ca = read("ssl_ca_file", &ca_path)?;
        pem_has("ssl_ca_file", &ca_path, &ca, "CERTIFICATE")?;
        let identity = match (&self.ssl_cert_file, &self.ssl_key_file) {
            (Some(c), Some(k)) => {
                let pem = read("ssl_cert_file", c)?;
                pem_has("ssl_cert_file", c, &pem, "CERTIFICATE")?;
                let key = read("ssl_key_file", k)?;
                if !key.contains("PRIVATE KEY-----") {
                    return Err(format!(
                        "broker.ssl_key_file {}: no PEM private key in it",
                        k.display()
                    ));
                }
                Some(lapin::tcp::OwnedIdentity::PKCS8 {
                    pem: pem.into_bytes(),
                    key: key.into_bytes(),
                })
            }
            (None, None) => None,
            _ => {
                return Err(
                    "broker.ssl_cert_file and broker.ssl_key_file go together (a client certificate and its key)"
                        .into(),
                );
            }
        };
        Ok(Some(lapin::tcp::OwnedTLSConfig {
            identity,
            cert_chain: Some(ca),
        }))
    }

    /// This section with the transport URL's query options applied over
    /// it, as oslo.messaging lets them override `[oslo_messaging_rabbit]`:
    /// the options in [`URL_OPTIONS`] are honoured; any other is refused
    /// (a URL carrying an option tether ignored would declare queues
    /// differently from the deployment's services, or quietly not do what
    /// it says).
    pub fn with_url_options(&self) -> Result<BrokerConfig, String> {
        let mut c = self.clone();
        if !self.enabled() {
            return Ok(c);
        }
        for (k, v) in &self.url()?.query {
            match k.as_str() {
                "ssl" => c.ssl = oslo_bool(k, v)?,
                "ssl_ca_file" => c.ssl_ca_file = Some(v.into()),
                "ssl_cert_file" => c.ssl_cert_file = Some(v.into()),
                "ssl_key_file" => c.ssl_key_file = Some(v.into()),
                "ssl_version" => c.ssl_version = Some(v.clone()),
                "amqp_durable_queues" => c.durable = oslo_bool(k, v)?,
                "rabbit_quorum_queue" => c.quorum_queues = oslo_bool(k, v)?,
                "rabbit_transient_quorum_queue" => c.transient_quorum_queues = oslo_bool(k, v)?,
                "rabbit_stream_fanout" => c.stream_fanout = oslo_bool(k, v)?,
                "rabbit_transient_queues_ttl" => {
                    c.queue_expires_ms = oslo_int(k, v, 0)?.saturating_mul(1000)
                }
                "rabbit_qos_prefetch_count" => {
                    c.prefetch = u16::try_from(oslo_int(k, v, 1)?).map_err(|_| {
                        format!("broker.transport_url option {k}={v:?} must be at most 65535")
                    })?
                }
                "rabbit_retry_interval" => {
                    c.reconnect_min_ms = oslo_int(k, v, 1)?.saturating_mul(1000)
                }
                "rabbit_interval_max" => {
                    c.reconnect_max_ms = oslo_int(k, v, 1)?.saturating_mul(1000)
                }
                other => {
                    return Err(format!(
                        "broker.transport_url option {other:?} is not one tether-proxy honours ({}); remove it, or set its [broker] equivalent (docs/configuration.md)",
                        URL_OPTIONS.join(", ")
                    ));
                }
            }
        }
        Ok(c)
    }

    /// Check the section, with the URL's options applied; `Err` says what
    /// is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        let c = self.with_url_options()?;
        c.check()
    }

    fn check(&self) -> Result<(), String> {
        if !self.ssl
            && (self.ssl_ca_file.is_some()
                || self.ssl_cert_file.is_some()
                || self.ssl_key_file.is_some()
                || self.ssl_version.is_some())
        {
            return Err(
                "broker.ssl_ca_file, ssl_cert_file, ssl_key_file and ssl_version need broker.ssl = true (or ssl=true in transport_url): without it they would do nothing"
                    .into(),
            );
        }
        if let Some(v) = &self.ssl_version {
            match v.to_ascii_lowercase().as_str() {
                "tlsv1_2" | "sslv23" => {}
                "tlsv1" | "tlsv1_1" | "sslv2" | "sslv3" => {
                    return Err(format!(
                        "broker.ssl_version {v:?}: versions before TLS 1.2 are refused (insecure; rustls does not speak them)"
                    ));
                }
                _ => {
                    return Err(format!(
                        "broker.ssl_version {v:?}: not an ssl_version oslo.messaging knows (tlsv1_2, sslv23)"
                    ));
                }
            }
        }
        self.tls()?;
        if self.control_exchange.is_empty() || self.control_exchange.len() > 200 {
            return Err("broker.control_exchange must be 1-200 characters".into());
        }
        if self.prefetch == 0 {
            return Err("broker.prefetch must be at least 1".into());
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return Err("broker.reconnect_min_ms must be > 0 and <= reconnect_max_ms".into());
        }
        if self.channel_max != 0 && self.channel_max < MIN_CHANNEL_MAX {
            return Err(format!(
                "broker.channel_max must be 0 (the broker's limit) or at least {MIN_CHANNEL_MAX}: the proxy itself uses 3 channels"
            ));
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

/// The CA certificates trusted when `ssl_ca_file` is not set: Debian's
/// bundle of the system's CAs (the `ca-certificates` package).
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The transport URL's query options tether honours, and where each goes.
pub const URL_OPTIONS: [&str; 13] = [
    "ssl",
    "ssl_ca_file",
    "ssl_cert_file",
    "ssl_key_file",
    "ssl_version",
    "amqp_durable_queues",
    "rabbit_quorum_queue",
    "rabbit_transient_quorum_queue",
    "rabbit_stream_fanout",
    "rabbit_transient_queues_ttl",
    "rabbit_qos_prefetch_count",
    "rabbit_retry_interval",
    "rabbit_interval_max",
];

/// oslo.config's boolean: `true`, `1`, `on`, `yes` or their opposites,
/// any case.
fn oslo_bool(k: &str, v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "on" | "yes" => Ok(true),
        "false" | "0" | "off" | "no" => Ok(false),
        _ => Err(format!(
            "broker.transport_url option {k}={v:?} is not a boolean (true/false, 1/0, on/off, yes/no)"
        )),
    }
}

/// oslo.config's integer, at least `min`.
fn oslo_int(k: &str, v: &str, min: u64) -> Result<u64, String> {
    match v.trim().parse::<u64>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(format!(
            "broker.transport_url option {k}={v:?} must be a whole number of at least {min}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_options_override_the_section_or_are_refused() {
        let c = BrokerConfig {
            transport_url: "rabbit://u:secret@h/?rabbit_quorum_queue=true&rabbit_transient_queues_ttl=60&rabbit_qos_prefetch_count=7&amqp_durable_queues=Off&ssl=no".into(),
            durable: true,
            ..Default::default()
        };
        let e = c.with_url_options().unwrap();
        assert!(e.quorum_queues && !e.durable);
        assert_eq!((e.queue_expires_ms, e.prefetch), (60_000, 7));
        assert!(c.validate().is_ok());
        for (url, says) in [
            ("rabbit://h/?ssl=true&ssl_version=tlsv1_1", "before TLS 1.2"),
            (
                "rabbit://h/?ssl=true&ssl_version=tls9",
                "not an ssl_version",
            ),
            (
                "rabbit://h/?ssl_ca_file=/etc/hostname",
                "need broker.ssl = true",
            ),
            ("rabbit://h/?ssl=1&ssl_ca_file=/nonexistent", "/nonexistent"),
            ("rabbit://h/?ssl=1&ssl_ca_file=/etc/hostname", "no PEM"),
            (
                "rabbit://h/?ssl=1&ssl_cert_file=/etc/hostname",
                "go together",
            ),
            (
                "rabbit://h/?heartbeat_rate=3",
                "not one tether-proxy honours",
            ),
            ("rabbit://h/?rabbit_quorum_queue=maybe", "not a boolean"),
            ("rabbit://h/?rabbit_qos_prefetch_count=0", "at least 1"),
            (
                "rabbit://h/?rabbit_qos_prefetch_count=70000",
                "at most 65535",
            ),
            ("kafka://h/", "rabbit://"),
            ("rabbit://u:secret@h:port/", "port"),
        ] {
            let c = BrokerConfig {
                transport_url: url.into(),
                ..Default::default()
            };
            let err = c.validate().unwrap_err();
            assert!(err.contains(says), "{url}: {err}");
            assert!(!err.contains("secret"), "the password is not shown: {err}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redacted("rabbit://u:p@h1:1,v:q@h2/x?y=1"),
            "rabbit://u:***@h1:1,v:***@h2/x?y=1"
        );
        assert_eq!(redacted("rabbit://h/"), "rabbit://h/");
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
            channel_max: 5,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("channel_max"));
        let c = BrokerConfig {
            transport_url: "rabbit://h/".into(),
            channel_max: 6,
            ..Default::default()
        };
        assert!(c.validate().is_ok());
        assert_eq!(
            c.amqp_uris().unwrap(),
            vec!["amqp://guest:guest@h:5672/%2F?channel_max=6"]
        );
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
