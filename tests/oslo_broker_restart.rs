//! RabbitMQ stopped and started under traffic. In a test binary of its own:
//! it restarts the suite's shared broker, and cargo runs test binaries one
//! after another, so no other broker test is running meanwhile.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::oslo::*;
use support::*;

fn broker(cmd: &str) {
    let st = Command::new(format!("{}/scripts/broker", env!("CARGO_MANIFEST_DIR")))
        .arg(cmd)
        .status()
        .expect("scripts/broker");
    assert!(st.success(), "scripts/broker {cmd} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_and_started_under_traffic_nothing_lost_everything_resumes() {
    const N: u64 = 200;
    const TOLD: u64 = 20;
    let url = amqp_url();
    let ex = unique("ex");
    let topic = unique("rs");
    let w = World::new();
    let _proxy = w.proxy(&broker_section(&url, &ex));
    let u = uuid(541);
    let _a = w.agent(&u, &w.channels().join(format!("{u}.sock")), &topic, "");
    let mut server = OsloServer::start(&url, &ex, "demo-events", "conductor-1").await;
    let mut c = OsloClient::start(&url, &ex);
    served(&mut c, &topic, &u).await;
    let v = c
        .op(json!({"op": "casts", "topic": topic, "server": u, "method": "record", "n": N}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    recorded_exactly_once(&w, &u, N, Duration::from_secs(30)).await;

    broker("stop");
    // Links stay up; the control socket still reaches the guest; what the
    // guest sends upstream meanwhile is held.
    let mut ctl = w.ctl().await;
    let links = ctl.req(json!({"op": "links"})).await;
    assert_eq!(links["result"][0]["established"], true, "{links}");
    for k in 0..TOLD {
        let v = ctl
            .req(json!({"op": "call", "instance": u, "topic": topic, "method": "tell_host", "args": {"k": k}}))
            .await;
        assert_eq!(v["ok"], true, "{v}");
    }
    broker("start");

    // Everything resumes: oslo casts reach the guest again (the proxy
    // restored its consumers), and the held casts reach the oslo server.
    served(&mut c, &topic, &u).await;
    let v = c
        .op(json!({"op": "casts", "topic": topic, "server": u, "method": "record", "n": N, "start": N}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    recorded_exactly_once(&w, &u, 2 * N, Duration::from_secs(60)).await;
    let t = Instant::now();
    let mut told = std::collections::BTreeSet::new();
    while (told.len() as u64) < TOLD {
        let got = server.next(Duration::from_secs(60)).await;
        assert_eq!(got["method"], "told", "{got}");
        assert!(
            told.insert(got["args"]["k"].as_u64().unwrap()),
            "told twice: {got}"
        );
        assert!(t.elapsed() < Duration::from_secs(90));
    }
}
