//! oslo.messaging call RTT through tether against the path it replaces, in
//! the same run, with the real Python oslo.messaging client:
//! - tether: oslo client → RabbitMQ → tether-proxy → link (emulated port) →
//!   tether-agent → sub-agent (Rust client API, echo) → and back;
//! - baseline: oslo client → RabbitMQ → a Python oslo.messaging RPC server
//!   (what an agent inside the VM would run if it spoke AMQP itself).
//!
//! Needs the test broker and venv (`scripts/test` provides both; or
//! `scripts/broker start` and `TETHER_AMQP_URL`). `-- --quick` for CI.

#[path = "../tests/support/mod.rs"]
mod support;

use serde_json::json;
use support::oslo::*;
use support::*;
use tether::client::SubAgent;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let n = if quick { 50 } else { 2000 };
        let url = amqp_url();
        let ex = unique("bench");
        let topic = unique("bench");
        let w = World::new();
        let _proxy = w.proxy(&broker_section(&url, &ex));
        let u = uuid(900);
        let (_agent, sock) = w.bare_agent(&u);
        wait_for_path(&sock);
        let mut sa = SubAgent::connect(&sock, "bench", &[topic.as_str()])
            .await
            .expect("sub-agent");
        tokio::spawn(async move {
            while let Ok(Some(r)) = sa.next_request().await {
                let _ = sa.reply(r.id, Ok(r.args)).await;
            }
        });
        let py_topic = unique("pybench");
        let _server = OsloServer::start(&url, &ex, &py_topic, "pyserver").await;
        let mut c = OsloClient::start(&url, &ex);
        served(&mut c, &topic, &u).await;
        let bench = |topic: &str, server: &str, n: usize| {
            json!({"op": "bench", "topic": topic, "server": server, "method": "echo",
                   "args": {"x": 1}, "n": n, "timeout": 30})
        };
        // Warm up both paths, then measure them alternately, twice each.
        c.op(bench(&topic, &u, n / 10 + 1)).await;
        c.op(bench(&py_topic, "pyserver", n / 10 + 1)).await;
        let mut rows = vec![];
        for _ in 0..2 {
            let t = c.op(bench(&topic, &u, n)).await;
            let p = c.op(bench(&py_topic, "pyserver", n)).await;
            assert_eq!(t["ok"], true, "{t}");
            assert_eq!(p["ok"], true, "{p}");
            rows.push((t, p));
        }
        println!("| oslo call RTT, {n} sequential calls | Python oslo server | tether → sub-agent | tether / Python |");
        println!("|---|---|---|---|");
        for (t, p) in rows {
            let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0) / 1000.0;
            println!(
                "| mean / p50 / p99 | {:.2} / {:.2} / {:.2} ms | {:.2} / {:.2} / {:.2} ms | {:.2} (mean), {:.2} (p50) |",
                f(&p, "mean_us"), f(&p, "p50_us"), f(&p, "p99_us"),
                f(&t, "mean_us"), f(&t, "p50_us"), f(&t, "p99_us"),
                f(&t, "mean_us") / f(&p, "mean_us"),
                f(&t, "p50_us") / f(&p, "p50_us"),
            );
        }
    });
}
