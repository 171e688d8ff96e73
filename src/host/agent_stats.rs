//! The guest agents' own numbers, for the metrics endpoint: every
//! `agent_stats_interval_ms` the proxy asks each linked agent for its
//! `tether.agent` `stats` (one call through the link, as `tetherctl call`
//! would make it) and keeps the few gauges below. Asked on a timer of the
//! proxy's, never at scrape time: a scrape reads what is kept and costs the
//! guests nothing, and what a guest costs the proxy is one call per
//! interval, answered or timed out, whatever it sends.
//!
//! What comes back is the guest's word: each value must be a whole number
//! (anything else and the answer is ignored and logged within the
//! instance's log budget), is kept only for that instance, and is exported
//! under `tether_agent_*` with help that says so. It decides nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use tracing::debug;

use super::Proxy;

/// Agents asked at once: a round over many guests, some of them not
/// answering, costs at most this many waiting calls.
pub const MAX_CONCURRENT: usize = 32;
/// The longest an agent may take to answer (or the interval, if shorter).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest interval a config may ask for.
pub const MIN_INTERVAL_MS: u64 = 1_000;

/// One agent's numbers, as it last reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentGauges {
    /// Requests it holds for a topic no sub-agent serves yet.
    pub held: u64,
    /// Requests waiting for a busy sub-agent.
    pub backlog: u64,
    /// Calls handed to sub-agents and not yet answered.
    pub calls_in_flight: u64,
    /// Topics its sub-agents registered.
    pub topics: u64,
    /// Requests it refused since it started.
    pub refused: u64,
}

impl AgentGauges {
    /// Read the `router` section of a `stats` answer; `None` if any field
    /// is missing or not a whole number (the topics: an array).
    pub fn parse(stats: &Value) -> Option<Self> {
        let r = stats.get("router")?;
        let n = |k: &str| r.get(k).and_then(Value::as_u64);
        Some(Self {
            held: n("held")?,
            backlog: n("backlog")?,
            calls_in_flight: n("calls_in_flight")?,
            topics: r.get("topics")?.as_array()?.len() as u64,
            refused: n("refused")?,
        })
    }
}

/// Ask every linked agent, every `every`, until the task is dropped.
pub async fn run(proxy: Arc<Proxy>, every: Duration) {
    let wait = CALL_TIMEOUT.min(every);
    let mut t = tokio::time::interval(every);
    // A round that took longer than the interval (guests timing out) is
    // followed by the next one an interval later, not at once.
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        t.tick().await;
        let linked: Vec<_> = proxy
            .instances()
            .into_iter()
            .filter(|i| i.linked())
            .collect();
        futures_util::stream::iter(linked)
            .for_each_concurrent(MAX_CONCURRENT, |inst| {
                let proxy = proxy.clone();
                async move {
                    match super::control::agent_stats(&proxy, &inst.id, wait).await {
                        Ok(v) => match AgentGauges::parse(&v) {
                            Some(g) => inst.set_agent_gauges(g, Instant::now()),
                            None => inst.log_warn(
                                "the agent's stats are not what tether's agent sends: ignored",
                            ),
                        },
                        Err(e) => debug!(instance = %inst.id, error = %e, "agent stats not read"),
                    }
                }
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_router_section_is_read_and_anything_else_refused() {
        let good = json!({"link": {}, "router": {"held": 1, "backlog": 2, "calls_in_flight": 3,
                          "topics": ["a", "b"], "refused": 4, "cancelled": 0}});
        assert_eq!(
            AgentGauges::parse(&good),
            Some(AgentGauges {
                held: 1,
                backlog: 2,
                calls_in_flight: 3,
                topics: 2,
                refused: 4
            })
        );
        for bad in [
            json!({}),
            json!({"router": {"held": -1, "backlog": 0, "calls_in_flight": 0, "topics": [], "refused": 0}}),
            json!({"router": {"held": 1.5, "backlog": 0, "calls_in_flight": 0, "topics": [], "refused": 0}}),
            json!({"router": {"held": "9", "backlog": 0, "calls_in_flight": 0, "topics": [], "refused": 0}}),
            json!({"router": {"held": 0, "backlog": 0, "calls_in_flight": 0, "topics": 3, "refused": 0}}),
            json!({"router": {"held": 0, "backlog": 0, "calls_in_flight": 0, "topics": []}}),
        ] {
            assert_eq!(AgentGauges::parse(&bad), None, "{bad}");
        }
    }
}
