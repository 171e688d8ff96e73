//! oslo.messaging call RTT through tether against the path it replaces, in
//! the same run, with the real Python oslo.messaging client:
//! - tether: oslo client → RabbitMQ → tether-proxy → link (emulated port) →
//!   tether-agent → sub-agent (Rust client API, echo) → and back;
//! - baseline: oslo client → RabbitMQ → a Python oslo.messaging RPC server
//!   (what an agent inside the VM would run if it spoke AMQP itself);
//! - floor: oslo client → RabbitMQ → a bare lapin responder in this process
//!   (decode, answer at once, publish the reply): what the client and the
//!   broker cost any responder, however fast.
//!
//! A second table: an unmodified oslo.messaging server program
//! (`python/tests/guest_oslo_program.py`) reached over tether through the
//! `tether://` driver, against the same program run straight on RabbitMQ.
//!
//! A third: guest → control plane, casts per second reaching a Python oslo
//! server — cast by the guest's sub-agent through tether (published
//! pipelined by the proxy), against the Python oslo client alone casting
//! to the same server.
//!
//! Needs the test broker and venv (`scripts/test` provides both; or
//! `scripts/broker start` and `TETHER_AMQP_URL`). `-- --quick` for CI;
//! `-- --calls N --casts M` to choose the counts.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use common::arg;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;
use support::oslo::*;
use support::*;
use tether::client::SubAgent;
use tether::host::broker::{BrokerConfig, wire};
use tether::rpc::Reply;

/// The floor: a responder that does nothing but decode and answer, on the
/// same lapin client, on the same runtime.
async fn lapin_responder(url: &str, exchange: &str, topic: &str, server: &str) {
    let cfg = BrokerConfig {
        transport_url: url.into(),
        ..Default::default()
    };
    let uri = cfg.amqp_uris().expect("url").remove(0);
    let conn = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    let q = format!("{topic}.{server}");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue");
    ch.queue_bind(
        q.as_str().into(),
        exchange.into(),
        q.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let (topic, server) = (topic.to_string(), server.to_string());
    tokio::spawn(async move {
        let _conn = conn;
        while let Some(Ok(d)) = consumer.next().await {
            let Ok(inc) = wire::decode_request(&d.data, &topic, Some(&server), None, false) else {
                continue;
            };
            let _ = d.acker.ack(BasicAckOptions::default()).await;
            let (Some(msg_id), Some(rq)) = (inc.request.msg_id, inc.reply_q) else {
                continue;
            };
            let body = wire::encode_reply(&Reply::new(msg_id, None, Ok(inc.request.args)));
            let props = BasicProperties::default()
                .with_content_type(wire::CONTENT_TYPE.into())
                .with_content_encoding("utf-8".into());
            let _ = ch
                .basic_publish(
                    "".into(),
                    rq.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await;
        }
    });
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tether::daemon::runtime().expect("runtime");
    rt.block_on(async {
        let n = arg("--calls").unwrap_or(if quick { 50 } else { 2000 });
        let url = amqp_url();
        let ex = unique("bench");
        let topic = unique("bench");
        let w = World::new();
        // The guest's share of the bridge raised (100 messages waiting by
        // default): the upstream table measures the bridge's throughput,
        // not how a burst past the share is refused.
        // So are its profile's rate limits (100 messages/s, bursts of
        // 1,000, by default): a guest casting faster is refused by policy.
        let _proxy = w.proxy(&format!(
            "{}upstream_per_instance = 100000\nupstream_hold = 100000\nupstream_bytes_per_instance = 104857600\n{}",
            broker_section(&url, &ex),
            lab_policy(
                "messages_per_sec = 1000000.0\nmessage_burst = 1000000.0\nbytes_per_sec = 1e12\nbyte_burst = 1e12\n"
            )
        ));
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
        let floor_topic = unique("floor");
        lapin_responder(&url, &ex, &floor_topic, "floor").await;
        // The same oslo server program twice: behind a second agent on the
        // tether:// driver, and straight on RabbitMQ.
        let program = format!(
            "{}/python/tests/guest_oslo_program.py",
            env!("CARGO_MANIFEST_DIR")
        );
        let pypath = format!("{}/python/src", env!("CARGO_MANIFEST_DIR"));
        let u2 = uuid(901);
        let (_agent2, sock2) = w.bare_agent(&u2);
        wait_for_path(&sock2);
        let drv_topic = unique("drvbench");
        let direct_topic = unique("directbench");
        let py = oslo_python();
        let py = py.to_str().expect("venv path");
        let record = w.path("record.jsonl");
        let record = record.to_str().expect("temp path");
        let tether_url = format!("tether://{}", sock2.display());
        let _via_tether = spawn_env(
            "oslo-over-tether",
            py,
            &[&program, &tether_url, &drv_topic, "unused", record, "unused"],
            w.dir.path(),
            &[("PYTHONPATH", &pypath)],
        );
        let _direct = spawn_env(
            "oslo-direct",
            py,
            &[&program, &url, &direct_topic, "unused", record, "unused", &ex],
            w.dir.path(),
            &[("PYTHONPATH", &pypath)],
        );
        let mut c = OsloClient::start(&url, &ex);
        served(&mut c, &topic, &u).await;
        served(&mut c, &drv_topic, &u2).await;
        served(&mut c, &direct_topic, "whatever-the-guest-says").await;
        let bench = |topic: &str, server: &str, n: usize| {
            json!({"op": "bench", "topic": topic, "server": server, "method": "echo",
                   "args": {"x": 1}, "n": n, "timeout": 30})
        };
        // Warm up every path, then measure them in turn, twice each.
        let paths = [
            (topic.as_str(), u.as_str()),
            (py_topic.as_str(), "pyserver"),
            (floor_topic.as_str(), "floor"),
        ];
        for (t, s) in paths {
            let v = c.op(bench(t, s, n / 10 + 1)).await;
            assert_eq!(v["ok"], true, "{v}");
        }
        let mut rows = vec![];
        for _ in 0..2 {
            let mut row = vec![];
            for (t, s) in paths {
                let v = c.op(bench(t, s, n)).await;
                assert_eq!(v["ok"], true, "{v}");
                row.push(v);
            }
            rows.push(row);
        }
        let programs = [
            (direct_topic.as_str(), "whatever-the-guest-says"),
            (drv_topic.as_str(), u2.as_str()),
        ];
        for (t, s) in programs {
            let v = c.op(bench(t, s, n / 10 + 1)).await;
            assert_eq!(v["ok"], true, "{v}");
        }
        let mut program_rows = vec![];
        for _ in 0..2 {
            let mut row = vec![];
            for (t, s) in programs {
                let v = c.op(bench(t, s, n)).await;
                assert_eq!(v["ok"], true, "{v}");
                row.push(v);
            }
            program_rows.push(row);
        }
        // Guest → control plane: casts per second reaching an oslo server.
        let up_topic = unique("upbench");
        let mut collector = OsloServer::start(&url, &ex, &up_topic, "collector").await;
        served(&mut c, &up_topic, "collector").await;
        let mut pub_sa = SubAgent::connect(&sock, "publisher", &["publisher"])
            .await
            .expect("sub-agent");
        let casts = arg("--casts").unwrap_or(if quick { 200 } else { 5000 });
        let mut ctl = w.ctl().await;
        let mut up_rows = vec![];
        for _ in 0..2 {
            let t = std::time::Instant::now();
            let v = c
                .op(json!({"op": "casts", "topic": up_topic, "method": "record", "n": casts}))
                .await;
            assert_eq!(v["ok"], true, "{v}");
            collected(&mut collector, casts).await;
            let py = casts as f64 / t.elapsed().as_secs_f64();
            let published0 = broker_status(&mut ctl).await["published"]
                .as_u64()
                .unwrap_or(0);
            let t = std::time::Instant::now();
            let target = tether::rpc::Target {
                topic: up_topic.clone(),
                ..Default::default()
            };
            for i in 0..casts {
                pub_sa
                    .cast(target.clone(), "record", json!({"i": i}))
                    .await
                    .expect("cast");
            }
            // The bridge's own pace: every cast confirmed by the broker
            // (the server may still be taking them).
            let goal = published0 + casts as u64;
            broker_status_until(&mut ctl, "every guest cast published", |v| {
                v["published"].as_u64() >= Some(goal)
            })
            .await;
            let bridge = casts as f64 / t.elapsed().as_secs_f64();
            collected(&mut collector, casts).await;
            let tether = casts as f64 / t.elapsed().as_secs_f64();
            let b = broker_status(&mut ctl).await;
            assert_eq!(b["refused"], 0, "{b}");
            up_rows.push((py, tether, bridge));
        }
        println!("| oslo call RTT, {n} sequential calls, mean / p50 / p99 | Python oslo server | tether → sub-agent | bare lapin responder (floor) | tether / Python | tether − floor vs Python − floor (p50) |");
        println!("|---|---|---|---|---|---|");
        let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0) / 1000.0;
        let cell = |v: &serde_json::Value| {
            format!("{:.2} / {:.2} / {:.2} ms", f(v, "mean_us"), f(v, "p50_us"), f(v, "p99_us"))
        };
        for row in rows {
            let (t, p, fl) = (&row[0], &row[1], &row[2]);
            println!(
                "| | {} | {} | {} | {:.2} (mean), {:.2} (p50) | {:.2} vs {:.2} ms |",
                cell(p),
                cell(t),
                cell(fl),
                f(t, "mean_us") / f(p, "mean_us"),
                f(t, "p50_us") / f(p, "p50_us"),
                f(t, "p50_us") - f(fl, "p50_us"),
                f(p, "p50_us") - f(fl, "p50_us"),
            );
        }
        println!();
        println!("| the same unmodified oslo server program, {n} sequential calls, mean / p50 / p99 | straight on RabbitMQ | behind tether-agent (tether:// driver) | tether / direct |");
        println!("|---|---|---|---|");
        for row in program_rows {
            let (d, t) = (&row[0], &row[1]);
            println!(
                "| | {} | {} | {:.2} (mean), {:.2} (p50) |",
                cell(d),
                cell(t),
                f(t, "mean_us") / f(d, "mean_us"),
                f(t, "p50_us") / f(d, "p50_us"),
            );
        }
        println!();
        println!("| {casts} casts to a Python oslo server, as fast as they go | the Python oslo client alone | a guest's sub-agent through tether (to the server) | tether / Python | tether: published by the proxy (broker confirms) |");
        println!("|---|---|---|---|---|");
        for (py, tether, bridge) in up_rows {
            println!(
                "| | {py:.0} casts/s | {tether:.0} casts/s | {:.2} | {bridge:.0} casts/s |",
                tether / py
            );
        }
    });
}

/// Wait (bounded) until the oslo server printed `n` more casts.
async fn collected(server: &mut OsloServer, n: usize) {
    for _ in 0..n {
        let v = server.next(std::time::Duration::from_secs(60)).await;
        assert_eq!(v["method"], "record", "{v}");
    }
}
