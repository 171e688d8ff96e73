//! oslo.messaging over a real RabbitMQ with the real Python client and
//! server: the proxy as its VMs' RPC server and client on the broker.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::oslo::*;
use support::*;

fn broker_section(url: &str, exchange: &str) -> String {
    format!(
        "[broker]\ntransport_url = {url:?}\ncontrol_exchange = {exchange:?}\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\nrequeue_grace_ms = 500\n"
    )
}

/// Wait (bounded) until an oslo call to `topic` on `server` is answered:
/// the instance is linked and the proxy consumes its queue.
async fn served(c: &mut OsloClient, topic: &str, server: &str) {
    let t = Instant::now();
    loop {
        let v = c
            .op(
                json!({"op": "call", "topic": topic, "server": server, "method": "echo",
                       "args": {"ping": 1}, "timeout": 1}),
            )
            .await;
        if v["ok"] == true {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{server} never served {topic} over the broker: {v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oslo_call_cast_fanout_errors_timeouts_and_heartbeats() {
    let url = amqp_url();
    let ex = unique("ex");
    let topic = unique("lbaas");
    let w = World::new();
    let _proxy = w.proxy(&broker_section(&url, &ex));
    let (u1, u2) = (uuid(501), uuid(502));
    let _a1 = w.agent(&u1, &w.channels().join(format!("{u1}.sock")), &topic, "");
    let _a2 = w.agent(&u2, &w.channels().join(format!("{u2}.sock")), &topic, "");
    let mut c = OsloClient::start(&url, &ex);
    served(&mut c, &topic, &u1).await;
    served(&mut c, &topic, &u2).await;

    // call: the result, exactly as the sub-agent returned it.
    let v = c
        .op(json!({"op": "call", "topic": topic, "server": u1, "method": "add", "args": {"a": 40, "b": 2}}))
        .await;
    assert_eq!(v, json!({"ok": true, "result": 42}));
    let v = c
        .op(
            json!({"op": "call", "topic": topic, "server": u2, "method": "echo",
                   "args": {"nested": {"x": [1, "two", null]}}}),
        )
        .await;
    assert_eq!(v["result"], json!({"nested": {"x": [1, "two", null]}}));

    // A builtin exception is re-raised as itself; any other is RemoteError.
    let v = c
        .op(json!({"op": "call", "topic": topic, "server": u1, "method": "fail", "args": {"message": "bad input"}}))
        .await;
    assert_eq!(v["class"], "ValueError", "{v}");
    assert!(v["message"].as_str().unwrap().contains("bad input"), "{v}");
    let v = c
        .op(json!({"op": "call", "topic": topic, "server": u1, "method": "fail_custom", "args": {"message": "over"}}))
        .await;
    assert_eq!(v["class"], "RemoteError", "{v}");
    assert_eq!(v["exc_type"], "QuotaExceeded", "{v}");

    // cast: handled once by that instance's sub-agent.
    let v = c
        .op(json!({"op": "cast", "topic": topic, "server": u1, "method": "record", "args": {"k": "cast-1"}}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    // fanout: every local instance serving the topic.
    let v = c
        .op(json!({"op": "cast", "topic": topic, "fanout": true, "method": "record", "args": {"k": "fan-1"}}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    let t = Instant::now();
    loop {
        let (r1, r2) = (w.recorded(&u1), w.recorded(&u2));
        if r1.len() >= 2 && !r2.is_empty() {
            assert_eq!(r1, vec![json!({"k": "cast-1"}), json!({"k": "fan-1"})]);
            assert_eq!(r2, vec![json!({"k": "fan-1"})]);
            break;
        }
        assert!(t.elapsed() < BOUND, "casts not handled: {r1:?} {r2:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Nobody serves this server: the caller times out at its own timeout.
    let t = Instant::now();
    let v = c
        .op(json!({"op": "call", "topic": topic, "server": uuid(599), "method": "echo", "timeout": 2}))
        .await;
    assert_eq!(v["class"], "MessagingTimeout", "{v}");
    assert!(t.elapsed() >= Duration::from_secs(2));

    // A handler slower than the call monitor's interval: the caller gives
    // up after `call_monitor_timeout` without a heartbeat; the proxy's
    // heartbeats (every half interval) keep it waiting, and the reply comes.
    let v = c
        .op(
            json!({"op": "call", "topic": topic, "server": u1, "method": "sleep",
                   "args": {"seconds": 3}, "timeout": 20, "monitor": 1}),
        )
        .await;
    assert_eq!(
        v,
        json!({"ok": true, "result": 3}),
        "heartbeats kept the call alive"
    );
    // Slower than the call's own timeout: a clean timeout.
    let v = c
        .op(
            json!({"op": "call", "topic": topic, "server": u1, "method": "sleep",
                   "args": {"seconds": 3}, "timeout": 2}),
        )
        .await;
    assert_eq!(v["class"], "MessagingTimeout", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_agents_cast_reaches_an_oslo_server_with_the_identity_the_host_stamped() {
    let url = amqp_url();
    let ex = unique("ex");
    let topic = unique("vm");
    let w = World::new();
    let _proxy = w.proxy(&broker_section(&url, &ex));
    let u = uuid(511);
    let _a = w.agent(&u, &w.channels().join(format!("{u}.sock")), &topic, "");
    let mut server = OsloServer::start(&url, &ex, "demo-events", "conductor-1").await;
    let mut c = OsloClient::start(&url, &ex);
    served(&mut c, &topic, &u).await;
    // The sub-agent casts upstream (topic demo-events) when told to; it
    // claims to be another instance in its context — the proxy overrides it.
    let v = c
        .op(
            json!({"op": "call", "topic": topic, "server": u, "method": "tell_host",
                   "args": {"load": 7}}),
        )
        .await;
    assert_eq!(v["ok"], true, "{v}");
    let got: Value = server.next(Duration::from_secs(30)).await;
    assert_eq!(got["method"], "told");
    assert_eq!(got["args"], json!({"load": 7}));
    assert_eq!(got["ctx"]["tether_instance"], json!(u), "{got}");
}
