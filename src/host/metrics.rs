//! The Prometheus endpoint: `GET /metrics` on `metrics_listen` (off by
//! default), in Prometheus' text exposition format (0.0.4), written by the
//! `prometheus` crate (its encoder writes the format `promtool check
//! metrics` reads; `prometheus-client`'s writes OpenMetrics, whose counter
//! families promtool 2.42 reads as untyped).
//!
//! Nothing is counted twice: at each scrape the numbers are read from what
//! the proxy already keeps (each link's status, each instance's counters,
//! the broker bridge's status), so the endpoint costs nothing between
//! scrapes and cannot drift from `tetherctl links` / `tetherctl broker`.
//!
//! The HTTP side is a few lines over tokio rather than a web framework: one
//! read-only path, a request head of at most [`MAX_REQUEST`] bytes read
//! within [`REQUEST_TIMEOUT`], one response, the connection closed; at most
//! [`MAX_SCRAPERS`] at once (more are closed at once). A scraper is a host
//! process, but it still cannot hold the proxy's memory or tasks.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::warn;

use super::Proxy;
use super::instance::InstanceMetrics;

/// Longest request head read (a scraper's GET is a few hundred bytes).
pub const MAX_REQUEST: usize = 8 * 1024;
/// Longest a scraper may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once.
pub const MAX_SCRAPERS: usize = 4;

type PerInstance = Vec<(String, u64)>;

/// Register what `f` builds; a failure (a name used twice: a bug) is
/// logged and that metric left out.
fn add<C: prometheus::core::Collector + 'static>(
    reg: &Registry,
    f: impl FnOnce() -> prometheus::Result<C>,
) {
    if let Err(e) = f().and_then(|c| reg.register(Box::new(c))) {
        warn!(error = %e, "a metric could not be registered");
    }
}

/// A counter per instance, from a snapshot (`name` ends in `_total`).
fn counters(reg: &Registry, name: &str, help: &str, values: &PerInstance) {
    add(reg, || {
        let c = IntCounterVec::new(Opts::new(name, help), &["instance"])?;
        for (id, v) in values {
            c.with_label_values(&[id.as_str()]).inc_by(*v);
        }
        Ok(c)
    });
}

/// A gauge per instance, from a snapshot.
fn gauges(reg: &Registry, name: &str, help: &str, values: &PerInstance) {
    add(reg, || {
        let g = IntGaugeVec::new(Opts::new(name, help), &["instance"])?;
        for (id, v) in values {
            g.with_label_values(&[id.as_str()]).set(signed(*v));
        }
        Ok(g)
    });
}

/// A gauge in seconds per instance, for the instances that have a value.
fn seconds<'a>(
    reg: &Registry,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (&'a String, std::time::Duration)>,
) {
    add(reg, || {
        let g = GaugeVec::new(Opts::new(name, help), &["instance"])?;
        for (id, d) in values {
            g.with_label_values(&[id.as_str()]).set(d.as_secs_f64());
        }
        Ok(g)
    });
}

fn gauge(reg: &Registry, name: &str, help: &str, v: u64) {
    add(reg, || {
        let g = IntGauge::new(name, help)?;
        g.set(signed(v));
        Ok(g)
    });
}

fn counter(reg: &Registry, name: &str, help: &str, v: u64) {
    add(reg, || {
        let c = IntCounter::new(name, help)?;
        c.inc_by(v);
        Ok(c)
    });
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The metrics now, in the text exposition format.
pub fn render(proxy: &Proxy) -> String {
    let reg = match Registry::new_custom(Some("tether".into()), None) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "metrics registry");
            return String::new();
        }
    };
    let all: Vec<(String, InstanceMetrics)> = proxy
        .instances()
        .iter()
        .map(|i| (i.id.clone(), i.metrics()))
        .collect();
    let per = |f: fn(&InstanceMetrics) -> u64| -> PerInstance {
        all.iter().map(|(id, m)| (id.clone(), f(m))).collect()
    };
    add(&reg, || {
        let g = IntGaugeVec::new(
            Opts::new("build_info", "tether-proxy's version (always 1)"),
            &["version"],
        )?;
        g.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Ok(g)
    });
    gauge(
        &reg,
        "instances",
        "Instances known (a channel socket seen, not yet forgotten)",
        all.len() as u64,
    );
    gauges(
        &reg,
        "link_up",
        "1 when the instance's link is connected and past its handshake",
        &per(|m| u64::from(m.up)),
    );
    gauges(
        &reg,
        "link_unacked",
        "Messages sent to the guest and not yet acknowledged by its link",
        &per(|m| m.unacked),
    );
    counters(
        &reg,
        "link_connects_total",
        "Connections made to the instance's channel socket",
        &per(|m| m.connects),
    );
    counters(
        &reg,
        "link_frames_sent_total",
        "DATA frames sent to the guest for the first time",
        &per(|m| m.sent),
    );
    counters(
        &reg,
        "link_frames_resent_total",
        "DATA frames sent to the guest again (reconnect, NACK, lost ACK)",
        &per(|m| m.resent),
    );
    counters(
        &reg,
        "link_messages_received_total",
        "Messages received from the guest, in order, once",
        &per(|m| m.delivered),
    );
    counters(
        &reg,
        "link_duplicates_total",
        "DATA frames from the guest dropped as already received",
        &per(|m| m.duplicates),
    );
    seconds(
        &reg,
        "link_rtt_seconds",
        "The link's last PING round trip, the guest's reading included (instances with one only)",
        all.iter().filter_map(|(id, m)| Some((id, m.rtt?))),
    );
    // The agents' own numbers: the guest's word, kept per instance.
    let agent = |f: fn(&super::agent_stats::AgentGauges) -> u64| -> PerInstance {
        all.iter()
            .filter_map(|(id, m)| m.agent.as_ref().map(|(g, _)| (id.clone(), f(g))))
            .collect()
    };
    gauges(
        &reg,
        "agent_requests_held",
        "Requests the guest's agent holds for a topic no sub-agent serves yet, as the agent reports it",
        &agent(|g| g.held),
    );
    gauges(
        &reg,
        "agent_backlog",
        "Requests waiting in the guest's agent for a busy sub-agent, as the agent reports it",
        &agent(|g| g.backlog),
    );
    gauges(
        &reg,
        "agent_calls_in_flight",
        "Calls the guest's agent handed to sub-agents and has no answer for, as the agent reports it",
        &agent(|g| g.calls_in_flight),
    );
    gauges(
        &reg,
        "agent_topics",
        "Topics the guest's sub-agents registered, as the agent reports it",
        &agent(|g| g.topics),
    );
    gauges(
        &reg,
        "agent_requests_refused",
        "Requests the guest's agent refused since it started (resets with it), as the agent reports it",
        &agent(|g| g.refused),
    );
    seconds(
        &reg,
        "agent_stats_age_seconds",
        "Time since the guest's agent last reported the tether_agent_* numbers",
        all.iter().filter_map(|(id, m)| Some((id, m.agent?.1))),
    );
    counters(
        &reg,
        "link_pings_total",
        "PINGs sent (idle keep-alives and loss probes)",
        &per(|m| m.pings),
    );
    counters(
        &reg,
        "link_probes_total",
        "Loss probes among those PINGs: DATA to the guest unacknowledged for probe_after",
        &per(|m| m.probes),
    );
    counters(
        &reg,
        "link_peer_changes_total",
        "Times the guest's agent turned out to be a new session (restarted, or a migration)",
        &per(|m| m.peer_changes),
    );
    counters(
        &reg,
        "link_protocol_errors_total",
        "Protocol errors from the guest",
        &per(|m| m.protocol_errors),
    );
    counters(
        &reg,
        "link_discarded_full_total",
        "DATA frames from the guest dropped for resending because its receive queue was full",
        &per(|m| m.discarded_full),
    );
    counters(
        &reg,
        "link_garbage_bytes_total",
        "Bytes from the guest that were not frames (skipped while resynchronising)",
        &per(|m| m.garbage_bytes),
    );
    counters(
        &reg,
        "guest_denied_total",
        "Guest messages the policy denied",
        &per(|m| m.denied),
    );
    counters(
        &reg,
        "guest_outbox_dropped_total",
        "Answers and refusals dropped because the guest does not read its link",
        &per(|m| m.outbox_dropped),
    );
    gauges(
        &reg,
        "calls_in_flight",
        "Calls into the guest waiting for their answer",
        &per(|m| m.calls_in_flight),
    );
    gauges(
        &reg,
        "requests_outstanding",
        "Requests sent into the guest that no sub-agent has taken yet",
        &per(|m| m.outstanding),
    );
    gauges(
        &reg,
        "guest_topics",
        "Topics the guest's sub-agents serve (as the policy lets them)",
        &per(|m| m.topics),
    );
    let b = proxy.bridge.get();
    gauge(
        &reg,
        "broker_configured",
        "1 when a broker is configured",
        u64::from(proxy.cfg.broker.enabled()),
    );
    gauge(
        &reg,
        "broker_connected",
        "1 when connected to the broker and serving",
        u64::from(b.connected),
    );
    gauge(
        &reg,
        "broker_held",
        "Guest messages waiting for the broker",
        b.held as u64,
    );
    gauge(
        &reg,
        "broker_server_queues",
        "<topic>.<instance> queues consumed",
        b.server_queues as u64,
    );
    gauge(
        &reg,
        "broker_instances_consumed",
        "Instances with at least one queue consumed",
        b.instances_consumed as u64,
    );
    counter(
        &reg,
        "broker_connects_total",
        "AMQP connections opened",
        b.connects,
    );
    counter(
        &reg,
        "broker_delivered_total",
        "Broker deliveries a sub-agent took (or the agent refused), acknowledged",
        b.delivered,
    );
    counter(
        &reg,
        "broker_requeued_total",
        "Broker deliveries given back",
        b.requeued,
    );
    counter(
        &reg,
        "broker_published_total",
        "Guest messages published to the broker",
        b.published,
    );
    counter(
        &reg,
        "broker_refused_total",
        "Guest messages refused on the way to the broker",
        b.refused,
    );
    counter(
        &reg,
        "broker_published_again_total",
        "Guest messages published again after the broker closed the publishing channel over another",
        b.published_again,
    );
    counter(
        &reg,
        "broker_fanouts_missed_total",
        "Fanouts a guest did not take in time",
        b.fanouts_missed,
    );
    let mut out = Vec::new();
    if let Err(e) = prometheus::TextEncoder::new().encode(&reg.gather(), &mut out) {
        warn!(error = %e, "metrics could not be encoded");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Serve `GET /metrics` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
    loop {
        let (mut s, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed at once
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut s)).await;
            let response = match head {
                Ok(Some(h)) => respond(&h, &proxy),
                _ => return,
            };
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, s.write_all(response.as_bytes())).await;
            let _ = s.shutdown().await;
        });
    }
}

/// The request head (up to the blank line), at most [`MAX_REQUEST`] bytes.
async fn read_head(s: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return None;
        }
        buf.extend_from_slice(chunk.get(..n)?);
    }
    String::from_utf8(buf).ok()
}

/// The whole HTTP response to a request head.
fn respond(head: &str, proxy: &Proxy) -> String {
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (status, ctype, body) = match (method, path.split('?').next().unwrap_or_default()) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(proxy),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "only /metrics here\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        ),
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
