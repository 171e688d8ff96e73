//! An oslo fanout reaching many guests on one proxy: 1,000 guests (each a
//! real `tether-agent` on an emulated port, its sub-agent in this process
//! through the Rust client API) serve one topic; the real Python oslo
//! client fans out to it, 100 times in turn. For each fanout: the time from
//! the client's cast to the last of the 1,000 sub-agents — and, the
//! baseline in the same run, to a Python oslo server bound to the same
//! fanout (what one control-plane service takes to get it). And the
//! proxy's resident memory (idle with every guest linked, and its peak)
//! and CPU per fanout.
//!
//! Needs the test broker and venv (as `benches/oslo.rs`). `-- --quick`
//! (50 guests, 5 fanouts) for CI; `-- --guests N --fanouts M` to choose.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{arg, cpu_secs, status_kib};
use serde_json::json;
use support::oslo::*;
use support::*;
use tether::client::SubAgent;
use tokio::sync::mpsc;

/// The topic every guest serves.
const TOPIC: &str = "fanbench";

fn percentile(v: &[Duration], p: usize) -> f64 {
    let mut v = v.to_vec();
    v.sort();
    let i = (v.len() * p / 100).min(v.len().saturating_sub(1));
    v.get(i).map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let guests = arg("--guests").unwrap_or(if quick { 50 } else { 1000 });
    let fanouts = arg("--fanouts").unwrap_or(if quick { 5 } else { 100 });
    let rt = tether::daemon::runtime().expect("runtime");
    rt.block_on(async {
        let url = amqp_url();
        let ex = unique("fanbench");
        let w = World::new();
        let proxy = w.proxy(&broker_section(&url, &ex));
        let mut ctl = w.ctl().await;
        let t = Instant::now();
        let mut agents = Vec::with_capacity(guests);
        for n in 0..guests {
            agents.push(w.bare_agent(&uuid(n as u32)));
        }
        // Each sub-agent reports which fanout it got, in this process.
        let (tx, mut rx) = mpsc::unbounded_channel::<u64>();
        for (n, (_, sock)) in agents.iter().enumerate() {
            wait_for_path(sock);
            let mut sa = SubAgent::connect(sock, &format!("fan-{n}"), &[TOPIC])
                .await
                .expect("sub-agent");
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Ok(Some(r)) = sa.next_request().await {
                    let k = r.args["k"].as_u64().unwrap_or(u64::MAX);
                    if tx.send(k).is_err() {
                        break;
                    }
                }
            });
        }
        all_linked(&mut ctl, guests).await;
        fanout_consumed(&mut ctl, 1).await;
        let linked_in = t.elapsed();
        let mut py = OsloServer::start(&url, &ex, TOPIC, "control-plane-service").await;
        let mut c = OsloClient::start(&url, &ex);
        // The Python server's fanout queue is bound once it answers a call.
        served(&mut c, TOPIC, "control-plane-service").await;
        let pid = proxy.pid();
        let idle_rss = status_kib(pid, "VmRSS:");
        let cpu0 = cpu_secs(pid);
        let mut to_last = vec![];
        let mut to_python = vec![];
        let mut seen: HashMap<u64, usize> = HashMap::new();
        for k in 0..fanouts as u64 {
            let t = Instant::now();
            let v = c
                .op(json!({"op": "cast", "topic": TOPIC, "fanout": true, "method": "record",
                           "args": {"k": k}}))
                .await;
            assert_eq!(v["ok"], true, "{v}");
            let mut python_at = None;
            let mut last_at = None;
            while python_at.is_none() || last_at.is_none() {
                tokio::select! {
                    got = rx.recv() => {
                        let got = got.expect("sub-agents");
                        assert!(got <= k, "fanout {got} arrived before {k} was sent");
                        let e = seen.entry(got).or_default();
                        *e += 1;
                        assert!(*e <= guests, "fanout {got} reached a guest twice");
                        if got == k && *e == guests {
                            last_at = Some(t.elapsed());
                        }
                    }
                    line = py.next(Duration::from_secs(60)) => {
                        assert_eq!(line["args"]["k"], k, "{line}");
                        python_at = Some(t.elapsed());
                    }
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {
                        panic!("fanout {k} reached {} of {guests} guests in 60 s", seen.get(&k).copied().unwrap_or(0));
                    }
                }
            }
            to_last.extend(last_at);
            to_python.extend(python_at);
        }
        let cpu = cpu_secs(pid) - cpu0;
        let peak_rss = status_kib(pid, "VmHWM:");
        println!("{guests} guests linked and consumed in {:.1} s", linked_in.as_secs_f64());
        println!();
        println!("| {fanouts} oslo fanouts, {guests} guests on one proxy | p50 | p99 | max |");
        println!("|---|---|---|---|");
        println!(
            "| client's cast → the last of {guests} sub-agents | {:.1} ms | {:.1} ms | {:.1} ms |",
            percentile(&to_last, 50),
            percentile(&to_last, 99),
            percentile(&to_last, 100),
        );
        println!(
            "| client's cast → one Python oslo server on the same fanout (baseline) | {:.1} ms | {:.1} ms | {:.1} ms |",
            percentile(&to_python, 50),
            percentile(&to_python, 99),
            percentile(&to_python, 100),
        );
        println!();
        println!(
            "proxy: RSS {:.1} MiB idle with {guests} links, peak {:.1} MiB; CPU {:.1} ms per fanout ({:.1} µs per guest)",
            idle_rss as f64 / 1024.0,
            peak_rss as f64 / 1024.0,
            cpu * 1e3 / fanouts as f64,
            cpu * 1e6 / (fanouts * guests) as f64,
        );
    });
}

/// Wait (bounded) until `n` instances are linked with [`TOPIC`] registered.
async fn all_linked(ctl: &mut Ctl, n: usize) {
    let t = Instant::now();
    loop {
        let v = ctl.req(json!({"op": "links"})).await;
        let up = v["result"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|l| {
                        l["established"] == true
                            && l["topics"]
                                .as_array()
                                .is_some_and(|t| t.iter().any(|t| t == TOPIC))
                    })
                    .count()
            })
            .unwrap_or(0);
        if up >= n {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "{up} of {n} guests linked with {TOPIC}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
