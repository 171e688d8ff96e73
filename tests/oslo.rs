//! oslo.messaging over a real RabbitMQ with the real Python client and
//! server: the proxy as its VMs' RPC server and client on the broker.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::oslo::*;
use support::*;

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
    fanout_consumed(&mut w.ctl().await, 1).await;
    let v = c
        .op(json!({"op": "cast", "topic": topic, "fanout": true, "method": "record", "args": {"k": "fan-1"}}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    let t = Instant::now();
    loop {
        let (r1, r2) = (w.recorded(&u1), w.recorded(&u2));
        if r1.len() >= 2 && !r2.is_empty() {
            // Two queues (the server's and the fanout's): no order between them.
            let mut r1 = r1;
            r1.sort_by_key(|v| v["k"].as_str().map(String::from));
            assert_eq!(r1, vec![json!({"k": "cast-1"}), json!({"k": "fan-1"})]);
            assert_eq!(r2, vec![json!({"k": "fan-1"})]);
            break;
        }
        assert!(t.elapsed() < BOUND, "casts not handled: {r1:?} {r2:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Nobody serves this server: the caller times out at its own timeout.
    let v = c
        .op(json!({"op": "call", "topic": topic, "server": uuid(599), "method": "echo", "timeout": 2}))
        .await;
    assert_eq!(v["class"], "MessagingTimeout", "{v}");

    // A handler slower than the call monitor's interval: the caller gives
    // up after `call_monitor_timeout` without a heartbeat; the proxy's
    // heartbeats (every half interval, from the moment it has the call)
    // keep it waiting, and the reply comes.
    let v = c
        .op(
            json!({"op": "call", "topic": topic, "server": u1, "method": "sleep",
                   "args": {"seconds": 5}, "timeout": 30, "monitor": 2}),
        )
        .await;
    assert_eq!(
        v,
        json!({"ok": true, "result": 5}),
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
async fn a_sub_agents_cast_and_call_reach_an_oslo_server_with_the_identity_the_host_stamped() {
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
    // The sub-agent casts upstream (topic demo-events) when told to.
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
    // And calls: oslo client -> guest sub-agent -> oslo server and back.
    // The sub-agent claims to be "not-me"; the proxy stamps the real id.
    let v = c
        .op(
            json!({"op": "call", "topic": topic, "server": u, "method": "ask_host",
                   "args": {"q": "capacity?"}, "timeout": 30}),
        )
        .await;
    assert_eq!(
        v,
        json!({"ok": true, "result": {"args": {"q": "capacity?"}, "instance": u}})
    );
    let got: Value = server.next(Duration::from_secs(30)).await;
    assert_eq!(got["method"], "answer");
    assert_eq!(got["ctx"]["tether_instance"], json!(u), "{got}");
    assert_eq!(
        got["ctx"]["request_id"], "req-guest",
        "context keys the profile allows pass"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_calls_are_refused_by_default_and_the_caller_learns_why() {
    let url = amqp_url();
    let ex = unique("ex");
    let topic = unique("vm");
    let w = World::new();
    // The default profile (reply-only), allowed to serve its topic.
    let _proxy = w.proxy(&format!(
        "{}[policy.profiles.default]\ntopics = [\"*\"]\n",
        broker_section(&url, &ex)
    ));
    let u = uuid(512);
    let _a = w.agent(&u, &w.channels().join(format!("{u}.sock")), &topic, "");
    let mut c = OsloClient::start(&url, &ex);
    served(&mut c, &topic, &u).await;
    let v = c
        .op(
            json!({"op": "call", "topic": topic, "server": u, "method": "ask_host",
                   "args": {"q": 1}, "timeout": 30}),
        )
        .await;
    assert_eq!(v["class"], "RemoteError", "{v}");
    let m = v["message"].as_str().unwrap();
    assert!(m.contains("Denied") && m.contains("mode reply-only"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_killed_during_a_stream_of_oslo_casts_every_cast_handled_exactly_once() {
    const N: u64 = 3000;
    let url = amqp_url();
    let ex = unique("ex");
    let topic = unique("k9");
    let w = World::new();
    let section = broker_section(&url, &ex);
    let mut proxy = w.proxy(&section);
    let u = uuid(521);
    let _a = w.agent(&u, &w.channels().join(format!("{u}.sock")), &topic, "");
    let mut c = OsloClient::start(&url, &ex);
    served(&mut c, &topic, &u).await;
    let stream = {
        let (topic, u) = (topic.clone(), u.clone());
        tokio::spawn(async move {
            c.op(json!({"op": "casts", "topic": topic, "server": u, "method": "record", "n": N}))
                .await
        })
    };
    // kill -9 while casts still stream in and the proxy works through them.
    let t = Instant::now();
    while (w.recorded(&u).len() as u64) < N / 10 {
        assert!(t.elapsed() < BOUND, "no cast handled");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    proxy.kill9();
    let at_kill = w.recorded(&u).len();
    let _proxy = w.proxy(&section);
    let v = stream.await.unwrap();
    assert_eq!(v["ok"], true, "{v}");
    recorded_exactly_once(&w, &u, N, Duration::from_secs(60)).await;
    eprintln!("killed the proxy with {at_kill} of {N} casts handled");
    assert!(
        (at_kill as u64) < N,
        "the kill came too late to prove anything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_sub_agent_killed_during_a_stream_of_oslo_casts_every_cast_handled_exactly_once()
{
    const N: u64 = 3000;
    // The restarted agent's sub-agent must register within this.
    const GRACE: &str = "unserved_grace_ms = 30000\n";
    let url = amqp_url();
    let ex = unique("ex");
    let topic = unique("ak9");
    let w = World::new();
    let _proxy = w.proxy(&broker_section(&url, &ex));
    let u = uuid(523);
    let port = w.channels().join(format!("{u}.sock"));
    let mut agent = w.agent(&u, &port, &topic, GRACE);
    let mut c = OsloClient::start(&url, &ex);
    served(&mut c, &topic, &u).await;
    let stream = {
        let (topic, u) = (topic.clone(), u.clone());
        tokio::spawn(async move {
            c.op(json!({"op": "casts", "topic": topic, "server": u, "method": "record", "n": N}))
                .await
        })
    };
    let handled = |at: u64| {
        let (w, u) = (&w, &u);
        async move {
            let t = Instant::now();
            while (w.recorded(u).len() as u64) < at {
                assert!(
                    t.elapsed() < BOUND,
                    "casts stopped at {}",
                    w.recorded(u).len()
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            w.recorded(u).len()
        }
    };
    // kill -9 of the agent; the guest's init starts it again (same port,
    // same state directory).
    handled(N / 10).await;
    agent.kill9();
    let at_agent_kill = w.recorded(&u).len();
    let _agent = w.agent(&u, &port, &topic, GRACE);
    // Then kill -9 of its sub-agent; the supervisor restarts it.
    handled(N / 2).await;
    let mut ctl = w.ctl().await;
    let v = ctl.req(json!({"op": "agents", "instance": u})).await;
    let pid = v["result"][0]["pid"].as_i64().expect("the sub-agent's pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let at_sub_kill = w.recorded(&u).len();
    let v = stream.await.unwrap();
    assert_eq!(v["ok"], true, "{v}");
    recorded_exactly_once(&w, &u, N, Duration::from_secs(60)).await;
    eprintln!(
        "killed the agent with {at_agent_kill} and its sub-agent with {at_sub_kill} of {N} oslo casts handled"
    );
    assert!(
        (at_sub_kill as u64) < N,
        "the kills came too late to prove anything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_moving_between_two_proxies_under_oslo_traffic_loses_nothing() {
    const ROUNDS: u64 = 10;
    const PER: u64 = 60;
    let url = amqp_url();
    let ex = unique("ex");
    let topic = unique("mv");
    let (wa, wb) = (World::new(), World::new());
    let section = broker_section(&url, &ex);
    let (_pa, _pb) = (wa.proxy(&section), wb.proxy(&section));
    let u = uuid(531);
    // The agent stays up; its channel socket moves from host A's channels
    // directory to host B's (as a migration does), mid-stream.
    let _agent = wa.agent(&u, &wa.channels().join(format!("{u}.sock")), &topic, "");
    let mut c = OsloClient::start(&url, &ex);
    served(&mut c, &topic, &u).await;
    let (mut ok, mut timed_out) = (0, 0);
    for round in 0..ROUNDS {
        if round == ROUNDS / 3 {
            std::fs::rename(
                wa.channels().join(format!("{u}.sock")),
                wb.channels().join(format!("{u}.sock")),
            )
            .unwrap();
        }
        let v = c
            .op(
                json!({"op": "casts", "topic": topic, "server": u, "method": "record",
                       "n": PER, "start": round * PER}),
            )
            .await;
        assert_eq!(v["ok"], true, "{v}");
        let v = c
            .op(
                json!({"op": "call", "topic": topic, "server": u, "method": "add",
                       "args": {"a": round, "b": 1}, "timeout": 10}),
            )
            .await;
        if v["ok"] == true {
            assert_eq!(v["result"], json!(round + 1));
            ok += 1;
        } else {
            assert_eq!(v["class"], "MessagingTimeout", "{v}");
            timed_out += 1;
        }
    }
    // The agent writes its record file in host A's world (its config).
    recorded_exactly_once(&wa, &u, ROUNDS * PER, Duration::from_secs(60)).await;
    // Host B serves the instance now; host A's link to it is down.
    let b = wb.ctl().await.req(json!({"op": "links"})).await;
    assert_eq!(b["result"][0]["established"], true, "{b}");
    assert!(b["result"][0]["delivered"].as_u64().unwrap() > 0, "{b}");
    let a = wa.ctl().await.req(json!({"op": "links"})).await;
    assert_eq!(a["result"][0]["established"], false, "{a}");
    eprintln!("calls answered {ok}, timed out {timed_out}");
    assert!(
        ok >= ROUNDS - 2,
        "most calls are answered: {ok} of {ROUNDS}"
    );
}

/// oslo's quorum and stream options, in the transport_url query where the
/// Python side reads them (the proxy takes them from `[broker]`).
const QUORUM_AND_STREAMS: &str = "rabbit_quorum_queue=true&rabbit_transient_quorum_queue=true&rabbit_stream_fanout=true&rabbit_qos_prefetch_count=10";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_and_stream_fanout_as_a_modern_deployment_declares_them() {
    let url = amqp_url();
    let py_url = format!("{url}?{QUORUM_AND_STREAMS}");
    let ex = unique("ex");
    let topic = unique("q");
    let w = World::new();
    let _proxy = w.proxy(&format!(
        "{}quorum_queues = true\ntransient_quorum_queues = true\nstream_fanout = true\n",
        broker_section(&url, &ex)
    ));
    let (u1, u2) = (random_uuid(), random_uuid());
    let _a1 = w.agent(&u1, &w.channels().join(format!("{u1}.sock")), &topic, "");
    let _a2 = w.agent(&u2, &w.channels().join(format!("{u2}.sock")), &topic, "");
    // A Python oslo server on the same topic: it shares the topic's fanout
    // stream with the proxy (one stream, every reader gets everything).
    let mut server = OsloServer::start(&py_url, &ex, &topic, "pyserver").await;
    let mut c = OsloClient::start(&py_url, &ex);
    served(&mut c, &topic, &u1).await;
    served(&mut c, &topic, &u2).await;

    let v = c
        .op(json!({"op": "call", "topic": topic, "server": u1, "method": "add", "args": {"a": 2, "b": 3}}))
        .await;
    assert_eq!(
        v,
        json!({"ok": true, "result": 5}),
        "a call over a quorum queue"
    );
    let v = c
        .op(json!({"op": "cast", "topic": topic, "server": u2, "method": "record", "args": {"k": "one"}}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    fanout_consumed(&mut w.ctl().await, 1).await;
    for k in ["fan-1", "fan-2"] {
        let v = c
            .op(json!({"op": "cast", "topic": topic, "fanout": true, "method": "record", "args": {"k": k}}))
            .await;
        assert_eq!(v["ok"], true, "{v}");
    }
    // Every reader of the stream got both fanouts, each once.
    let t = Instant::now();
    loop {
        let (r1, r2) = (w.recorded(&u1), w.recorded(&u2));
        if r1.len() >= 2 && r2.len() >= 3 {
            assert_eq!(r1, vec![json!({"k": "fan-1"}), json!({"k": "fan-2"})]);
            assert_eq!(
                r2,
                vec![
                    json!({"k": "one"}),
                    json!({"k": "fan-1"}),
                    json!({"k": "fan-2"})
                ]
            );
            break;
        }
        assert!(t.elapsed() < BOUND, "fanouts not handled: {r1:?} {r2:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for k in ["fan-1", "fan-2"] {
        let got = server.next(Duration::from_secs(30)).await;
        assert_eq!(got["args"], json!({"k": k}), "{got}");
    }
    let b = broker_status(&mut w.ctl().await).await;
    assert_eq!(b["connected"], true, "{b}");
    assert_eq!(b["fanout_topics"], 1, "{b}");
    assert_eq!(b["last_error"], Value::Null, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declaration_that_does_not_match_the_deployment_is_reported_clearly() {
    let url = amqp_url();
    let ex = unique("ex");
    let (wa, wb) = (World::new(), World::new());
    // The deployment declared its control exchange non-durable (oslo's
    // default); a proxy configured durable is refused by the broker.
    let _pa = wa.proxy(&broker_section(&url, &ex));
    let mut ca = wa.ctl().await;
    broker_status_until(&mut ca, "proxy A connected", |v| v["connected"] == true).await;
    let _pb = wb.proxy(&format!("{}durable = true\n", broker_section(&url, &ex)));
    let mut cb = wb.ctl().await;
    let status = broker_status_until(&mut cb, "an error", |v| v["last_error"].is_string()).await;
    let e = status["last_error"].as_str().unwrap();
    for part in [
        "declaring the control exchange",
        &ex,
        "PRECONDITION_FAILED",
        "durable",
        "broker.durable",
    ] {
        assert!(e.contains(part), "{part:?} not in {e:?}");
    }
    assert_eq!(status["connected"], false, "{status}");
    let out = std::process::Command::new(CTL)
        .args(["-s", wb.ctl_sock().to_str().unwrap(), "broker"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("NOT connected") && text.contains("PRECONDITION_FAILED"),
        "{text}"
    );
    let log = std::fs::read_to_string(wb.path("proxy.log")).unwrap();
    assert!(log.contains("PRECONDITION_FAILED"), "the log says why too");
}

/// A loopback port nothing listens on (bound, then released).
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_the_next_host_of_the_transport_url() {
    let url = amqp_url();
    let ex = unique("ex");
    let topic = unique("fo");
    // The first host is down; the second is the test broker.
    let both = url.replacen(
        "rabbit://",
        &format!("rabbit://guest:guest@127.0.0.1:{},", dead_port()),
        1,
    );
    let w = World::new();
    let _proxy = w.proxy(&broker_section(&both, &ex));
    let u = random_uuid();
    let _a = w.agent(&u, &w.channels().join(format!("{u}.sock")), &topic, "");
    let mut c = OsloClient::start(&url, &ex);
    served(&mut c, &topic, &u).await;
    let v = c
        .op(json!({"op": "call", "topic": topic, "server": u, "method": "add", "args": {"a": 1, "b": 1}}))
        .await;
    assert_eq!(v, json!({"ok": true, "result": 2}));
    let b = broker_status(&mut w.ctl().await).await;
    let port = url.rsplit(':').next().unwrap().trim_end_matches('/');
    assert!(
        b["broker"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{port}/%2F")),
        "{b}"
    );
    assert_eq!(b["connected"], true, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_away_guest_casts_beyond_the_hold_are_refused_to_the_sub_agent() {
    const HOLD: usize = 2;
    const CASTS: usize = 12;
    let w = World::new();
    let _proxy = w.proxy(&format!(
        "[broker]\ntransport_url = \"rabbit://guest:guest@127.0.0.1:{}/\"\nreconnect_min_ms = 100\nreconnect_max_ms = 200\nupstream_hold = {HOLD}\n",
        dead_port()
    ));
    let u = random_uuid();
    let (_a, mut sa, mut ctl) = w.guest_with_sub_agent(&u, "caster", "z").await;
    let target = tether::rpc::Target {
        topic: "events".into(),
        ..Default::default()
    };
    for i in 0..CASTS {
        sa.cast(target.clone(), "tick", json!({"i": i}))
            .await
            .unwrap();
    }
    // Each cast is either held (up to the hold, plus what sits in the
    // bridge's queue) or refused back: at least the excess comes back.
    let mut refused = 0;
    while refused < CASTS - 2 * HOLD - 1 {
        let r = tokio::time::timeout(BOUND, sa.next_refusal())
            .await
            .expect("too few refusals came back")
            .unwrap();
        assert!(r.reason.starts_with("BrokerUnavailable"), "{r:?}");
        assert_eq!(r.method, "tick");
        refused += 1;
    }
    let b = broker_status(&mut ctl).await;
    assert_eq!(b["connected"], false, "{b}");
    assert!(b["refused"].as_u64().unwrap() >= refused as u64, "{b}");
    assert!(b["held"].as_u64().unwrap() <= HOLD as u64, "{b}");
    assert!(
        b["last_error"].as_str().unwrap().contains("cannot connect"),
        "{b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_away_guest_calls_beyond_the_hold_are_answered_broker_unavailable() {
    const HOLD: usize = 2;
    const CALLS: usize = 10;
    let w = World::new();
    let _proxy = w.proxy(&format!(
        "[broker]\ntransport_url = \"rabbit://guest:guest@127.0.0.1:{}/\"\nreconnect_min_ms = 100\nreconnect_max_ms = 200\nupstream_hold = {HOLD}\n{}",
        dead_port(),
        lab_policy("")
    ));
    let u = random_uuid();
    let (_a, sock) = w.bare_agent(&u);
    wait_for_path(&sock);
    let target = tether::rpc::Target {
        topic: "events".into(),
        ..Default::default()
    };
    // One sub-agent per call, all at once (a sub-agent's call waits for its
    // answer).
    let mut calls = vec![];
    for i in 0..CALLS {
        let (sock, target) = (sock.clone(), target.clone());
        let mut sa =
            tether::client::SubAgent::connect(&sock, &format!("c{i}"), &[&format!("t{i}")])
                .await
                .unwrap();
        calls.push(tokio::spawn(async move {
            sa.call(target, "ask", json!({"i": i}), Some(5_000))
                .await
                .unwrap()
        }));
    }
    let mut unavailable = 0;
    for c in calls {
        match c.await.unwrap() {
            Err(f) if f.class == "BrokerUnavailable" => unavailable += 1,
            // Held while the broker is away, until the caller's timeout.
            Err(f) => assert_eq!(f.class, "MessagingTimeout", "{f:?}"),
            Ok(v) => panic!("answered with the broker away: {v}"),
        }
    }
    assert!(
        unavailable >= CALLS - 2 * HOLD - 1,
        "only {unavailable} of {CALLS} calls were refused beyond a hold of {HOLD}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_messages_nothing_consumes_are_refused_no_route() {
    let url = amqp_url();
    let ex = unique("ex");
    let w = World::new();
    // A retry queue of two unroutable casts: the next is refused at once
    // (otherwise after RETRY_FOR, 30 s). The bridge's queue holds two too.
    let _proxy = w.proxy(&format!(
        "{}upstream_hold = 2\n{}",
        broker_section(&url, &ex),
        lab_policy("")
    ));
    let u = random_uuid();
    let (_a, mut sa, _ctl) = w.guest_with_sub_agent(&u, "caster", "z").await;
    let target = tether::rpc::Target {
        topic: unique("nobody"),
        ..Default::default()
    };
    // Each unroutable cast goes to the retry queue; the call after it (the
    // same bridge queue, in order) is answered NoRoute at once, so when it
    // returns the cast is waiting, and at most two were ever queued.
    for i in 0..2 {
        sa.cast(target.clone(), "tick", json!({"i": i}))
            .await
            .unwrap();
        let f = sa
            .call(target.clone(), "ask", json!({}), Some(20_000))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(f.class, "NoRoute", "{f:?}");
    }
    // The retry queue is full: the next unroutable cast is refused NoRoute.
    sa.cast(target.clone(), "tick", json!({"i": 2}))
        .await
        .unwrap();
    let r = tokio::time::timeout(BOUND, sa.next_refusal())
        .await
        .expect("no refusal came back")
        .unwrap();
    assert!(r.reason.starts_with("NoRoute"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_queue_declaration_is_reported_and_the_other_instances_are_served() {
    let url = amqp_url();
    let topic = unique("mix");
    let (u_bad, u_ok) = (random_uuid(), random_uuid());
    // The deployment already has `<topic>.<u_bad>` as a classic queue (a
    // proxy with oslo's defaults declared it, then went away).
    {
        let w0 = World::new();
        let _p0 = w0.proxy(&broker_section(&url, &unique("ex")));
        let _a0 = w0.agent(
            &u_bad,
            &w0.channels().join(format!("{u_bad}.sock")),
            &topic,
            "",
        );
        let mut ctl0 = w0.ctl().await;
        broker_status_until(&mut ctl0, "the first proxy consuming", |v| {
            v["instances_consumed"] == 1
        })
        .await;
    }
    // A proxy configured for quorum queues meets it.
    let ex = unique("ex");
    let w = World::new();
    let _p = w.proxy(&format!(
        "{}quorum_queues = true\n",
        broker_section(&url, &ex)
    ));
    let _bad = w.agent(
        &u_bad,
        &w.channels().join(format!("{u_bad}.sock")),
        &topic,
        "",
    );
    let _ok = w.agent(
        &u_ok,
        &w.channels().join(format!("{u_ok}.sock")),
        &topic,
        "",
    );
    let mut c = OsloClient::start(&format!("{url}?rabbit_quorum_queue=true"), &ex);
    // The other instance is served all the same.
    served(&mut c, &topic, &u_ok).await;
    let mut ctl = w.ctl().await;
    let status = broker_status_until(&mut ctl, "an error", |v| v["last_error"].is_string()).await;
    let e = status["last_error"].as_str().unwrap();
    let queue = format!("{topic}.{u_bad}");
    for part in [
        "server queue",
        queue.as_str(),
        "PRECONDITION_FAILED",
        "quorum_queues",
    ] {
        assert!(e.contains(part), "{part:?} not in {e:?}");
    }
    assert_eq!(
        status["connected"], true,
        "the connection stays up: {status}"
    );
    assert_eq!(status["instances_consumed"], 1, "{status}");
    let v = c
        .op(json!({"op": "call", "topic": topic, "server": u_ok, "method": "add", "args": {"a": 1, "b": 2}}))
        .await;
    assert_eq!(v, json!({"ok": true, "result": 3}));
}

/// Each linked instance serving topics takes an AMQP channel of its own;
/// past the connection's channel limit (`broker.channel_max` here, the
/// broker's `channel_max` — 2047 by default — in a real cloud) an instance
/// is not consumed, and said so, while the others are served: one more VM
/// linking does not end the connection for all. A channel freed by an
/// instance that went serves a waiting one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_past_the_channel_limit_wait_and_the_others_are_served() {
    use support::guest::FakeGuest;
    let url = amqp_url();
    let ex = unique("ex");
    let topic = unique("cm");
    let w = World::new();
    // 8 channels: the proxy's 3, one fanout topic, room for 4 instances.
    let _proxy = w.proxy(&format!("{}channel_max = 8\n", broker_section(&url, &ex)));
    let mut ctl = w.ctl().await;
    let link = |n: u32| {
        let id = uuid(560 + n);
        let g = FakeGuest::start(&w.channels(), &id);
        (id, g)
    };
    let mut guests = vec![];
    for n in 0..4 {
        let (id, g) = link(n);
        g.topics(&[&topic]).await;
        wait_linked(&mut ctl, &id, &topic).await;
        guests.push((id, g));
    }
    broker_status_until(&mut ctl, "four instances and the fanout consumed", |v| {
        v["instances_consumed"] == 4 && v["fanout_topics"] == 1
    })
    .await;
    // Two more: no channel left for them.
    for n in 4..6 {
        let (id, g) = link(n);
        g.topics(&[&topic]).await;
        wait_linked(&mut ctl, &id, &topic).await;
        guests.push((id, g));
    }
    let v = broker_status_until(&mut ctl, "the channel limit reported", |v| {
        v["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("channel limit"))
    })
    .await;
    assert_eq!(v["instances_consumed"], 4, "{v}");
    // Two of the first go: their channels serve the two that waited — an
    // oslo call reaches each of them over the broker.
    guests.drain(0..2);
    let mut c = OsloClient::start(&url, &ex);
    for (id, g) in guests.iter_mut().skip(2) {
        let t = Instant::now();
        loop {
            let call = {
                let (topic, id) = (topic.clone(), id.clone());
                tokio::spawn(async move {
                    let v = c
                        .op(
                            json!({"op": "call", "topic": topic, "server": id, "method": "ping",
                                   "args": {}, "timeout": 2}),
                        )
                        .await;
                    (c, v)
                })
            };
            let answered = tokio::time::timeout(Duration::from_secs(3), g.next_request()).await;
            if let Ok(r) = &answered {
                g.reply(
                    r.msg_id.as_deref().unwrap(),
                    r.reply_to.clone(),
                    json!("pong"),
                )
                .await;
            }
            let (back, v) = call.await.unwrap();
            c = back;
            if v["ok"] == true {
                assert_eq!(v["result"], "pong", "{v}");
                break;
            }
            assert!(t.elapsed() < BOUND, "{id} never consumed: {v}");
        }
    }
    let v = broker_status(&mut ctl).await;
    assert_eq!(v["connects"], 1, "the connection never went down: {v}");
    assert_eq!(v["connected"], true, "{v}");
}
