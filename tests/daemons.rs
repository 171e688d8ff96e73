//! tether-proxy, tether-agent and tetherctl as real processes over real
//! sockets, with the example Python sub-agent: round trips, errors,
//! tetherctl's output and exit codes, bad input from every side, the
//! control socket's caps and group. The supervisor is in
//! `tests/supervisor.rs`, configuration files in `tests/daemons_config.rs`.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

const U1: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";
const U2: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

#[tokio::test]
async fn call_cast_fanout_and_errors() {
    let w = World::new();
    let (_proxy, _agent, mut ctl) = w.one_guest(U1).await;
    let _agent2 = w.agent(U2, &w.channels().join(format!("{U2}.sock")), "demo", "");
    wait_linked(&mut ctl, U2, "demo").await;

    let v = ctl
        .req(json!({"id": 7, "op": "call", "instance": U1, "topic": "demo", "method": "add", "args": {"a": 2, "b": 40}}))
        .await;
    assert_eq!(v, json!({"id": 7, "ok": true, "result": 42}));

    // A sub-agent exception comes back with its class and module.
    let v = ctl
        .req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "fail", "args": {"message": "boom"}}))
        .await;
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["kind"], "remote");
    assert_eq!(v["error"]["class"], "ValueError");
    assert_eq!(v["error"]["module"], "builtins");
    assert_eq!(v["error"]["message"], "boom");

    // The agent's own topic: `ping` answers its arguments, as they came;
    // other methods are refused by name.
    let v = ctl
        .req(json!({"op": "call", "instance": U1, "topic": "tether.agent", "method": "ping", "args": {"id": 7, "s": "é"}}))
        .await;
    assert_eq!(v["result"], json!({"id": 7, "s": "é"}), "{v}");
    let v = ctl
        .req(json!({"op": "call", "instance": U1, "topic": "tether.agent", "method": "nope"}))
        .await;
    assert_eq!(v["error"]["class"], "NoSuchMethod", "{v}");

    // Unknown method, unknown topic, unknown instance.
    let v = ctl
        .req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "nope"}))
        .await;
    assert_eq!(v["error"]["class"], "NotImplementedError");
    let v = ctl
        .req(json!({"op": "call", "instance": U1, "topic": "nobody", "method": "x"}))
        .await;
    assert_eq!(v["error"]["class"], "NoSuchTopic");
    let v = ctl
        .req(json!({"op": "call", "instance": uuid(9), "topic": "demo", "method": "x"}))
        .await;
    assert_eq!(v["error"]["kind"], "not_connected");
    // A cast to a topic nobody serves waits the agent's grace for a
    // sub-agent to register it (1 s here), then is refused explicitly.
    let v = ctl
        .req(json!({"op": "cast", "instance": U1, "topic": "nobody", "method": "x"}))
        .await;
    assert_eq!(v["error"]["kind"], "refused", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("NoSuchTopic"),
        "{v}"
    );

    // Casts: acknowledged, handled once even when retried with the same unique id.
    for _ in 0..3 {
        let v = ctl
            .req(json!({"op": "cast", "instance": U1, "topic": "demo", "method": "record", "args": {"n": 1}, "unique_id": "fixed-1"}))
            .await;
        assert_eq!(v["ok"], true, "{v}");
    }
    // A call after the casts returns after they were handled (casts run in order).
    ctl.req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "echo"}))
        .await;
    assert_eq!(w.recorded(U1), vec![json!({"n": 1})]);

    // Fanout reaches both instances once.
    let v = ctl
        .req(json!({"op": "fanout", "topic": "demo", "method": "record", "args": {"f": 1}}))
        .await;
    assert_eq!(v["result"]["delivered"].as_array().unwrap().len(), 2, "{v}");
    for u in [U1, U2] {
        ctl.req(json!({"op": "call", "instance": u, "topic": "demo", "method": "echo"}))
            .await;
        assert!(
            w.recorded(u).contains(&json!({"f": 1})),
            "fanout missed {u}"
        );
    }
}

fn tetherctl(w: &World, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(CTL)
        .arg("--socket")
        .arg(w.ctl_sock())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test]
async fn tetherctl_output_and_exit_codes() {
    let w = World::new();
    let (_proxy, _agent, _ctl) = w.one_guest(U1).await;
    let (c, out, _) = tetherctl(
        &w,
        &["call", U1, "demo", "add", "--args", r#"{"a":1,"b":2}"#],
    );
    assert_eq!((c, out.trim()), (0, "3"));
    let (c, out, _) = tetherctl(
        &w,
        &[
            "--json",
            "call",
            U1,
            "demo",
            "add",
            "--args",
            r#"{"a":1,"b":2}"#,
        ],
    );
    assert_eq!(c, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["result"],
        3
    );
    let (c, _, err) = tetherctl(&w, &["call", U1, "demo", "fail"]);
    assert_eq!(c, 1, "remote error");
    assert!(err.contains("ValueError"), "{err}");
    let (c, _, _) = tetherctl(
        &w,
        &[
            "--timeout-ms",
            "300",
            "call",
            U1,
            "demo",
            "sleep",
            "--args",
            r#"{"seconds":5}"#,
        ],
    );
    assert_eq!(c, 3, "timeout");
    let (c, _, err) = tetherctl(&w, &["call", &uuid(5), "demo", "x"]);
    assert_eq!(c, 4, "not connected");
    assert!(
        err.contains("tetherctl links"),
        "says what to do next: {err}"
    );
    let (c, _, err) = tetherctl(&w, &["call", U1, "demo", "x", "--args", "not json"]);
    assert_eq!(c, 2, "bad usage");
    assert!(err.contains("--args"), "{err}");
    let (c, out, _) = tetherctl(&w, &["links"]);
    assert_eq!(c, 0);
    assert!(out.contains(U1) && out.contains("linked"), "{out}");
    let (c, out, _) = tetherctl(&w, &["cast", U1, "demo", "record"]);
    assert_eq!(c, 0);
    assert!(out.contains("delivered"), "{out}");
    // The global options go before or after the subcommand.
    let (c, out, err) = tetherctl(&w, &["links", "--json", "--timeout-ms", "5000"]);
    assert_eq!(c, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["result"][0]["instance"], U1, "{v}");
    // restart-agent: the same sub-agent, a new process, serving again.
    let pid_of = |w: &World| {
        let (c, out, err) = tetherctl(w, &["agents", U1, "--json"]);
        assert_eq!(c, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["result"][0]["pid"].as_u64().unwrap()
    };
    let before = pid_of(&w);
    let (c, out, err) = tetherctl(&w, &["restart-agent", U1, "py"]);
    assert_eq!(c, 0, "{out}{err}");
    assert!(out.contains("running"), "{out}");
    assert_ne!(pid_of(&w), before, "a new process");
    let mut ctl = w.ctl().await;
    wait_linked(&mut ctl, U1, "demo").await;
    let t = std::time::Instant::now();
    loop {
        let (c, out, _) = tetherctl(
            &w,
            &["call", U1, "demo", "add", "--args", r#"{"a":2,"b":2}"#],
        );
        if c == 0 {
            assert_eq!(out.trim(), "4");
            break;
        }
        assert!(t.elapsed() < BOUND, "the restarted sub-agent never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (c, _, err) = tetherctl(&w, &["restart-agent", U1, "nobody-by-this-name"]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("nobody-by-this-name"), "{err}");
    // Exit codes are in --help.
    let (c, out, _) = tetherctl(&w, &["--help"]);
    assert_eq!(c, 0);
    assert!(
        out.contains("Exit codes:") && out.contains("5  the proxy could not be reached"),
        "{out}"
    );
    // No proxy at all.
    let out = std::process::Command::new(CTL)
        .args(["--socket", "/nonexistent/ctl.sock", "links"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is tether-proxy running?"));
}

/// A proxy that takes no connection (out of descriptors: its backlog holds
/// the caller's) does not hang tetherctl: it gives up after its bound and
/// says what to check.
#[tokio::test]
async fn tetherctl_gives_up_on_a_proxy_that_never_answers() {
    let w = World::new();
    let path = w.path("silent.sock");
    // Listening, never accepting.
    let _silent = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let run = tokio::process::Command::new(CTL)
        .arg("--socket")
        .arg(&path)
        .arg("links")
        .kill_on_drop(true)
        .output();
    // tetherctl's own bound for `links` is 30 s; this one only catches a hang.
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("tetherctl hung on a silent proxy")
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("answered nothing in 30 s"), "{err}");
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_hurts_nobody_else() {
    let w = World::new();
    let (_proxy, _agent, mut ctl) = w.one_guest(U1).await;
    let mut other = w.ctl().await;

    // Control socket: not JSON, unknown op, unknown field, wrong type.
    ctl.send_line("{not json").await;
    let v = ctl.read().await;
    assert_eq!(v["error"]["kind"], "bad_request");
    for bad in [
        json!({"op": "explode"}),
        json!({"op": "call", "instance": U1, "topic": "demo", "method": "add", "bogus": 1}),
        json!({"op": "call", "instance": U1, "topic": 5, "method": "add"}),
    ] {
        let v = ctl.req(bad.clone()).await;
        assert_eq!(v["error"]["kind"], "bad_request", "{bad} -> {v}");
    }
    // Oversized request: refused, that connection closed, the other unaffected.
    let huge = format!(
        "{{\"op\":\"links\",\"pad\":\"{}\"}}",
        "x".repeat(2 * 1024 * 1024)
    );
    let _ = ctl.try_send_line(&huge).await;
    let v = ctl.read().await;
    assert_eq!(v["error"]["kind"], "too_large");
    let v = other.req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "add", "args": {"a": 1, "b": 1}})).await;
    assert_eq!(v["result"], 2);
    // Timeouts too large for any clock: served, nothing overflows.
    let v = other
        .req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "add", "args": {"a": 2, "b": 2}, "timeout_ms": u64::MAX}))
        .await;
    assert_eq!(v["result"], 4, "{v}");
    let v = other
        .req(json!({"op": "cast", "instance": U1, "topic": "demo", "method": "record", "args": {"n": 9}, "timeout_ms": u64::MAX}))
        .await;
    assert_eq!(v["ok"], true, "{v}");

    // Sub-agent socket: garbage and unknown ops get an error line; the agent goes on.
    let sock = w.path(&format!("agent-{U1}.sock"));
    let s = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let (r, mut wr) = s.into_split();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(r));
    for bad in [
        "garbage\n",
        "{\"op\":\"fly\"}\n",
        "{\"op\":\"reply\",\"id\":999,\"result\":1}\n",
        "{\"op\":\"register\",\"name\":\"x\",\"topics\":[\"demo\"]}\n",
    ] {
        tokio::io::AsyncWriteExt::write_all(&mut wr, bad.as_bytes())
            .await
            .unwrap();
        let l = tokio::time::timeout(BOUND, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(l.contains("\"op\":\"error\""), "{bad} -> {l}");
    }
    let v = other.req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "add", "args": {"a": 2, "b": 2}})).await;
    assert_eq!(
        v["result"], 4,
        "the topic still belongs to the real sub-agent"
    );
}

/// Regression: replies were charged to the guest's rate limit, so the
/// 1,025th call of a burst got no answer. Replies to our own calls pass;
/// the guest's own casts are still limited.
#[tokio::test]
async fn rate_limits_apply_to_guest_traffic_not_to_answers() {
    let w = World::new();
    // Almost no refill: however long the flood takes on a loaded machine,
    // the guest gets its burst and no more.
    let _proxy = w.proxy(&support::lab_policy(
        "message_burst = 20.0\nmessages_per_sec = 0.001",
    ));
    let _agent = w.agent(U1, &w.channels().join(format!("{U1}.sock")), "demo", "");
    let mut ctl = w.ctl().await;
    wait_linked(&mut ctl, U1, "demo").await;
    for i in 0..100 {
        let v = ctl.req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "add", "args": {"a": i, "b": 0}})).await;
        assert_eq!(v["result"], i, "call {i}: {v}");
    }
    let denied_before = ctl.req(json!({"op": "links"})).await["result"][0]["denied"]
        .as_u64()
        .unwrap();
    let mut watch = w.ctl().await;
    watch.req(json!({"op": "watch"})).await;
    for i in 0..50 {
        ctl.req(json!({"op": "cast", "instance": U1, "topic": "demo", "method": "tell_host", "args": {"i": i}})).await;
    }
    // The sub-agent sends its 50 casts before it answers this call, and the
    // link is ordered: once it returns, every one was decided.
    ctl.req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "echo"}))
        .await;
    let links = ctl.req(json!({"op": "links"})).await;
    let denied = links["result"][0]["denied"].as_u64().unwrap() - denied_before;
    // The burst (20, less the topic announcements it paid for) passed; the
    // rest was denied, and each allowed cast reaches the watchers.
    assert!(denied >= 30, "a guest flood is limited: {links}");
    let allowed = 50 - denied as usize;
    let mut seen = 0;
    while seen < allowed {
        let v = tokio::time::timeout(BOUND, watch.read())
            .await
            .expect("an allowed cast never reached the watchers");
        assert!(v.get("event").is_some());
        seen += 1;
    }
    assert!(seen >= 1, "the burst passes");
}

/// One control connection runs at most 256 requests at once; the rest wait
/// their turn (nothing is refused or lost), and another connection is not
/// held up by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_connection_runs_256_requests_at_once_and_the_rest_wait() {
    const CAP: u64 = 256;
    const SENT: u64 = 300;
    let w = World::new();
    let _proxy = w.proxy("");
    let (_agent, mut sa, _ctl) = w.guest_with_sub_agent(U1, "slow", "slow").await;
    let mut busy = w.ctl().await;
    for n in 0..SENT {
        busy.send_line(
            &json!({"id": n, "op": "call", "instance": U1, "topic": "slow", "method": "m",
                    "args": {"n": n}, "timeout_ms": 120_000})
            .to_string(),
        )
        .await;
    }
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(next_request(&mut sa).await);
    }
    // The cap is reached: a call on another connection goes in next.
    let other = tokio::spawn({
        let sock = w.ctl_sock();
        async move {
            Ctl::connect(&sock)
                .await
                .req(json!({"op": "call", "instance": U1, "topic": "slow", "method": "other"}))
                .await
        }
    });
    let r = next_request(&mut sa).await;
    assert_eq!(r.method, "other", "a request past the cap went in: {r:?}");
    sa.reply(r.id, Ok(json!("other"))).await.unwrap();
    assert_eq!(other.await.unwrap()["result"], "other");
    // Each answer lets one more in, in order; every call is answered once.
    let mut answered = std::collections::BTreeSet::new();
    let mut queue: std::collections::VecDeque<_> = held.into();
    let mut seen = CAP;
    while let Some(r) = queue.pop_front() {
        sa.reply(r.id, Ok(r.args["n"].clone())).await.unwrap();
        if seen < SENT {
            let r = next_request(&mut sa).await;
            assert_eq!(r.args["n"], seen, "out of turn: {r:?}");
            queue.push_back(r);
            seen += 1;
        }
    }
    while answered.len() < SENT as usize {
        let v = busy.read().await;
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["result"], v["id"], "{v}");
        assert!(answered.insert(v["id"].as_u64().unwrap()), "twice: {v}");
    }
}

/// The next request the sub-agent gets, within the bound.
async fn next_request(sa: &mut tether::client::SubAgent) -> tether::client::Incoming {
    tokio::time::timeout(BOUND, sa.next_request())
        .await
        .expect("a request reaches the sub-agent")
        .unwrap()
        .unwrap()
}

/// At most `max_control_clients` control connections: one more is told
/// `overloaded` and closed; once one goes, a new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_connections_are_capped() {
    let w = World::new();
    let _proxy = w.proxy("max_control_clients = 3\n");
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut c = w.ctl().await;
        assert_eq!(c.req(json!({"op": "links"})).await["ok"], true);
        open.push(c);
    }
    let mut extra = w.ctl().await;
    let v = extra.read().await;
    assert_eq!(v["error"]["kind"], "overloaded", "{v}");
    assert!(extra.next().await.is_none(), "and closed");
    drop(open.pop());
    let t = std::time::Instant::now();
    loop {
        let mut c = w.ctl().await;
        match c.next_req(json!({"op": "links"})).await {
            Some(v) if v["ok"] == true => break,
            other => assert!(t.elapsed() < BOUND, "never served again: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An instance whose socket stayed gone for the link's grace period is
/// forgotten: the registry does not grow with every VM the host ever ran,
/// and `max_links` counts those that are here (a channel ignored for it is
/// linked once there is room).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_gone_past_the_grace_are_forgotten() {
    let w = World::new();
    let _proxy = w.proxy("max_links = 1\n[link]\ngrace = 1000\n");
    let mut ctl = w.ctl().await;
    let (a, b) = (random_uuid(), random_uuid());
    let ga = support::guest::FakeGuest::start(&w.channels(), &a);
    ga.topics(&["t"]).await;
    wait_linked(&mut ctl, &a, "t").await;
    let gb = support::guest::FakeGuest::start(&w.channels(), &b);
    gb.topics(&["t"]).await;
    ga.leave().await;
    // b was ignored (max_links); once a is forgotten, b gets its link.
    wait_linked(&mut ctl, &b, "t").await;
    let v = ctl.req(json!({"op": "links"})).await;
    let ids: Vec<&str> = v["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["instance"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![b.as_str()], "{v}");
}

/// `control_socket_group`: operators in that group use `tetherctl` without
/// root — the socket is 0660 of that group, on every start of the proxy —
/// and a user outside it is refused by the file's permissions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_in_the_control_sockets_group_need_no_root() {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    let (w, nobody, nogroup) = World::for_nobody();
    let as_nobody = |gid: u32| {
        std::process::Command::new(CTL)
            .args(["--socket", w.ctl_sock().to_str().unwrap(), "links"])
            .uid(nobody.uid.as_raw())
            .gid(gid)
            .output()
            .unwrap()
    };
    for round in 0..2 {
        let mut proxy = w.proxy("control_socket_group = \"nogroup\"");
        let m = std::fs::metadata(w.ctl_sock()).unwrap();
        assert_eq!(
            (m.mode() & 0o777, m.gid()),
            (0o660, nogroup.gid.as_raw()),
            "start {round}"
        );
        let out = as_nobody(nogroup.gid.as_raw());
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        // Not in the group (here with root's group, gid 0): the socket's
        // permissions refuse it.
        let out = as_nobody(0);
        assert_ne!(out.status.code(), Some(0), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("ermission denied"),
            "{out:?}"
        );
        proxy.terminate();
    }
}
