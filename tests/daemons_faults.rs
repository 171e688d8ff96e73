//! Real daemons under faults: the fault relay between proxy and agent,
//! kill -9 of the agent and of the proxy mid-stream.

mod support;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use tether::testing::{FaultRelay, RelayFaults};

const U: &str = "3f2504e0-4f89-41d3-9a0c-0305e82c3301";

/// Send every request pipelined (at most `window` outstanding) on one control
/// connection. Requests whose answer is an error are retried when `retry`
/// says so (same request, so casts keep their unique id). Returns the final
/// answer per id; panics if some never finish within the bound.
async fn pipelined(
    w: &World,
    reqs: Vec<(String, Value)>,
    window: usize,
    retry: impl Fn(&Value) -> bool,
) -> BTreeMap<String, Value> {
    let mut ctl = w.ctl().await;
    let by_id: BTreeMap<String, Value> = reqs.iter().cloned().collect();
    let mut todo: VecDeque<String> = reqs.into_iter().map(|(id, _)| id).collect();
    let mut out = BTreeMap::new();
    let mut inflight = 0usize;
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while out.len() < by_id.len() {
        while inflight < window
            && let Some(id) = todo.pop_front()
        {
            let mut r = by_id[&id].clone();
            r["id"] = json!(id);
            ctl.send_line(&r.to_string()).await;
            inflight += 1;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} unanswered",
            by_id.len() - out.len(),
            by_id.len()
        );
        let v = ctl.read().await;
        inflight -= 1;
        let id = v["id"].as_str().unwrap().to_string();
        if v["ok"] != true && retry(&v) {
            todo.push_back(id);
            continue;
        }
        assert!(
            out.insert(id.clone(), v).is_none(),
            "two final answers for {id}"
        );
    }
    out
}

fn recorded_ns(w: &World) -> Vec<u64> {
    w.recorded(U)
        .iter()
        .map(|v| v["n"].as_u64().unwrap())
        .collect()
}

fn assert_each_once(ns: &[u64], expected: impl Iterator<Item = u64>) {
    let set: BTreeSet<u64> = ns.iter().copied().collect();
    assert_eq!(
        set.len(),
        ns.len(),
        "duplicates handled: {} records, {} distinct",
        ns.len(),
        set.len()
    );
    let want: BTreeSet<u64> = expected.collect();
    let missing: Vec<_> = want.difference(&set).take(10).collect();
    assert!(missing.is_empty(), "never handled: {missing:?}...");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_casts_and_a_thousand_calls_through_random_resets() {
    let w = World::new();
    let port = w.path("port.sock");
    let _proxy = w.proxy("[link]\nprobe_after = 200\nhello_retry = 200\n");
    let _agent = w.agent(
        U,
        &port,
        "demo",
        "[link]\nprobe_after = 200\nhello_retry = 200\n",
    );
    wait_for_path(&port);
    let relay = FaultRelay::start(
        &w.channels().join(format!("{U}.sock")),
        &port,
        RelayFaults {
            cut_after: Some((30_000, 300_000)),
            garbage_chance: 0.002,
            garbage_max: 64,
            max_chunk: 8192,
        },
        0xfeed,
    )
    .unwrap();
    let mut ctl = w.ctl().await;
    wait_linked(&mut ctl, U, "demo").await;

    let reqs = casts_and_calls(10_000, 10, 20_000, |n| ("add", json!({"a": n, "b": 1})));
    // Casts that were not acknowledged in time are retried with the same
    // unique id (the guest drops the duplicate); calls are not retried.
    let answers = pipelined(&w, reqs, 128, |v| {
        v["id"].as_str().unwrap().starts_with("cast-")
    })
    .await;
    let mut calls_ok = 0;
    for (id, v) in &answers {
        if let Some(n) = id.strip_prefix("call-") {
            let n: u64 = n.parse().unwrap();
            if v["ok"] == true {
                assert_eq!(v["result"], json!(n + 1), "{id}");
                calls_ok += 1;
            } else {
                assert!(
                    ["timeout", "not_connected"].contains(&v["error"]["kind"].as_str().unwrap()),
                    "{v}"
                );
            }
        }
    }
    // Everything acknowledged has been handled once the last call returns.
    let v = ctl.req(json!({"op": "call", "instance": U, "topic": "demo", "method": "echo", "timeout_ms": 60_000})).await;
    assert_eq!(v["ok"], true, "{v}");
    assert_each_once(&recorded_ns(&w), 0..10_000);
    let st = relay.stats();
    eprintln!("relay: {st:?}; calls answered ok: {calls_ok}/1000");
    assert!(st.cuts >= 5, "only {} resets", st.cuts);
    assert!(calls_ok >= 900, "only {calls_ok} calls succeeded");
}

/// Wait (bounded) until the proxy keeps no request for `uuid` that a
/// sub-agent has not taken.
async fn wait_all_taken(ctl: &mut support::Ctl, uuid: &str) {
    let t = Instant::now();
    loop {
        let v = ctl.req(json!({"op": "links"})).await;
        let l = v["result"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["instance"] == uuid);
        if l.is_some_and(|l| l["outstanding"] == 0) {
            return;
        }
        assert!(t.elapsed() < BOUND, "requests never taken: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The agent's grace for a topic to get its sub-agent again: long enough
/// for a restarted agent's Python sub-agent on a loaded machine.
const RESTART_GRACE: &str = "unserved_grace_ms = 30000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_agent_mid_stream() {
    let w = World::new();
    let port = w.channels().join(format!("{U}.sock"));
    let _proxy = w.proxy("");
    let mut agent = w.agent(U, &port, "demo", RESTART_GRACE);
    let mut ctl = w.ctl().await;
    wait_linked(&mut ctl, U, "demo").await;

    let pipe = pipelined(&w, stream_around_a_kill(), 64, |_| false);
    let killer = async {
        // Mid-stream: once a quarter of the casts were handled.
        let t = Instant::now();
        while recorded_ns(&w).len() < 500 {
            assert!(t.elapsed() < BOUND, "the stream never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        agent.kill9();
        let at_kill = recorded_ns(&w).len();
        // The guest's init restarts it: same port, same state directory,
        // new process, new session.
        (w.agent(U, &port, "demo", RESTART_GRACE), at_kill)
    };
    let (answers, (agent2, at_kill)) = tokio::join!(pipe, killer);
    // Every request got exactly one answer (pipelined asserts that). A cast
    // is confirmed, or its caller is told the proxy keeps it; a call
    // succeeded or failed cleanly, none hung.
    let mut failed_calls = 0;
    let mut unconfirmed = 0;
    for (id, v) in &answers {
        if v["ok"] == true {
            continue;
        }
        let kind = v["error"]["kind"].as_str().unwrap();
        if id.starts_with("cast-") {
            unconfirmed += 1;
            assert!(kind == "timeout" || kind == "not_connected", "{v}");
            continue;
        }
        failed_calls += 1;
        let class = v["error"]["class"].as_str().unwrap_or("");
        assert!(
            kind == "timeout"
                || kind == "not_connected"
                || class == "GuestRestarted"
                || class == "SubAgentGone",
            "{v}"
        );
    }
    wait_linked(&mut ctl, U, "demo").await;
    let v = ctl.req(json!({"op": "links"})).await;
    assert!(
        v["result"][0]["peer_changes"].as_u64().unwrap() >= 2,
        "new guest session seen: {v}"
    );
    // After the restart the stream goes on.
    for n in 10_000..10_100u64 {
        let v = ctl
            .req(json!({"op": "cast", "instance": U, "topic": "demo", "method": "record", "args": {"n": n}}))
            .await;
        assert_eq!(v["ok"], true, "{v}");
    }
    // Every cast — confirmed or still kept by the proxy when its caller
    // stopped waiting — is handled exactly once: nothing the killed agent
    // held is lost, nothing it had handed over runs again.
    wait_all_taken(&mut ctl, U).await;
    ctl.req(json!({"op": "call", "instance": U, "topic": "demo", "method": "echo"}))
        .await;
    let ns = recorded_ns(&w);
    assert_each_once(&ns, (0..2000).chain(10_000..10_100));
    eprintln!(
        "kill -9 agent: 2000 casts around the kill each handled once ({unconfirmed} confirmed only after their caller's timeout), {failed_calls} of 50 calls failed cleanly, {at_kill} handled before the kill"
    );
    drop(agent2);
}

/// Control-socket requests: `casts` `record` casts numbered 0.., each with
/// a unique id `u-<n>`, and after every `every`-th the call `call(n)`
/// (method, args); all with `timeout_ms`. Ids `cast-<n>` and `call-<n>`.
fn casts_and_calls(
    casts: u64,
    every: u64,
    timeout_ms: u64,
    call: impl Fn(u64) -> (&'static str, Value),
) -> Vec<(String, Value)> {
    let mut reqs = vec![];
    for n in 0..casts {
        reqs.push((
            format!("cast-{n}"),
            json!({"op": "cast", "instance": U, "topic": "demo", "method": "record", "args": {"n": n},
                   "unique_id": format!("u-{n}"), "timeout_ms": timeout_ms}),
        ));
        if n.is_multiple_of(every) {
            let (method, args) = call(n);
            reqs.push((
                format!("call-{n}"),
                json!({"op": "call", "instance": U, "topic": "demo", "method": method, "args": args, "timeout_ms": timeout_ms}),
            ));
        }
    }
    reqs
}

/// The stream around the kills below: 2000 casts with a short call after
/// every 40th.
fn stream_around_a_kill() -> Vec<(String, Value)> {
    casts_and_calls(2000, 40, 3_000, |_| ("sleep", json!({"seconds": 0.05})))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_sub_agent_mid_stream_the_supervisor_restarts_it() {
    let w = World::new();
    let port = w.channels().join(format!("{U}.sock"));
    let _proxy = w.proxy("");
    let _agent = w.agent(U, &port, "demo", RESTART_GRACE);
    let mut ctl = w.ctl().await;
    wait_linked(&mut ctl, U, "demo").await;
    let v = ctl.req(json!({"op": "agents", "instance": U})).await;
    let pid = v["result"][0]["pid"].as_i64().expect("the sub-agent's pid");

    let pipe = pipelined(&w, stream_around_a_kill(), 64, |_| false);
    let killer = async {
        let t = Instant::now();
        while recorded_ns(&w).len() < 500 {
            assert!(t.elapsed() < BOUND, "the stream never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        recorded_ns(&w).len()
    };
    let (answers, at_kill) = tokio::join!(pipe, killer);
    // Calls running in the killed sub-agent fail cleanly; those that came
    // while it was away wait for the restarted one (within the grace).
    let mut failed_calls = 0;
    let mut unconfirmed = 0;
    for (id, v) in &answers {
        if v["ok"] == true {
            continue;
        }
        let kind = v["error"]["kind"].as_str().unwrap();
        if id.starts_with("cast-") {
            unconfirmed += 1;
            assert!(kind == "timeout", "{v}");
            continue;
        }
        failed_calls += 1;
        assert!(
            kind == "timeout" || v["error"]["class"] == "SubAgentGone",
            "{v}"
        );
    }
    let v = ctl.req(json!({"op": "agents", "instance": U})).await;
    assert!(
        v["result"][0]["restarts"].as_u64().unwrap() >= 1,
        "the supervisor restarted it: {v}"
    );
    wait_all_taken(&mut ctl, U).await;
    let ns = recorded_ns(&w);
    assert_each_once(&ns, 0..2000);
    eprintln!(
        "kill -9 sub-agent: 2000 casts each handled once ({unconfirmed} confirmed after their caller's timeout), {failed_calls} of 50 calls failed cleanly, {at_kill} handled before the kill"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_proxy_loses_no_acknowledged_cast() {
    let w = World::new();
    let port = w.channels().join(format!("{U}.sock"));
    let mut proxy = w.proxy("");
    let _agent = w.agent(U, &port, "demo", "");
    let mut ctl = w.ctl().await;
    wait_linked(&mut ctl, U, "demo").await;

    // Stream casts on one connection; kill -9 the proxy in the middle.
    let mut acked = BTreeSet::new();
    let mut sent = 0u64;
    let mut alive = true;
    let mut c2 = w.ctl().await;
    let mut outstanding = 0;
    let mut killed = false;
    while sent < 3000 && alive {
        while outstanding < 64 && sent < 3000 {
            let r = json!({"id": sent, "op": "cast", "instance": U, "topic": "demo", "method": "record",
                           "args": {"n": sent}, "unique_id": format!("u-{sent}")});
            if c2.try_send_line(&r.to_string()).await.is_err() {
                alive = false;
                break;
            }
            sent += 1;
            outstanding += 1;
        }
        if sent >= 1000 && !killed {
            proxy.kill9();
            killed = true;
        }
        match tokio::time::timeout(BOUND, c2.next()).await {
            Ok(Some(v)) => {
                outstanding -= 1;
                if v["ok"] == true {
                    acked.insert(v["id"].as_u64().unwrap());
                }
            }
            _ => alive = false,
        }
    }
    assert!(
        !acked.is_empty() && (acked.len() as u64) < 3000,
        "the kill came mid-stream ({} acked)",
        acked.len()
    );
    // A new proxy links the same guest (a new session for the agent) and
    // the client retries everything not confirmed, with the same unique ids.
    drop(ctl);
    let _proxy2 = w.proxy("");
    let mut ctl = w.ctl().await;
    wait_linked(&mut ctl, U, "demo").await;
    let retry: Vec<_> = (0..3000u64)
        .filter(|n| !acked.contains(n))
        .map(|n| {
            (
                format!("cast-{n}"),
                json!({"op": "cast", "instance": U, "topic": "demo", "method": "record", "args": {"n": n}, "unique_id": format!("u-{n}")}),
            )
        })
        .collect();
    let answers = pipelined(&w, retry, 64, |_| true).await;
    assert!(answers.values().all(|v| v["ok"] == true));
    ctl.req(json!({"op": "call", "instance": U, "topic": "demo", "method": "echo"}))
        .await;
    // Every cast the client was told was delivered, was; with the retries,
    // every cast was handled exactly once.
    let ns = recorded_ns(&w);
    for n in &acked {
        assert!(ns.contains(n), "cast {n} was confirmed but never handled");
    }
    assert_each_once(&ns, 0..3000);
    eprintln!(
        "kill -9 proxy: {} confirmed before the kill, {} retried",
        acked.len(),
        3000 - acked.len()
    );
}

/// The agent's own counters (`tether.agent` `stats`).
async fn agent_stats(ctl: &mut support::Ctl, uuid: &str) -> Value {
    let v = ctl
        .req(json!({"op": "call", "instance": uuid, "topic": "tether.agent", "method": "stats"}))
        .await;
    v["result"].clone()
}

fn signal(p: &Proc, s: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid() as i32), s).unwrap();
}

/// A caller whose call timed out is told which way it went, and a call the
/// agent had not handed to a sub-agent is withdrawn: it never runs, even
/// when it reaches the agent after its caller gave up (here the agent was
/// stopped with the request and its cancel waiting in the channel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_caller_gave_up_never_runs_later() {
    let w = World::new();
    let _proxy = w.proxy("");
    let (agent, mut sa, mut ctl) = w.guest_with_sub_agent(U, "work", "work").await;
    let call = |method: &str, ms: u64| json!({"op": "call", "instance": U, "topic": "work", "method": method, "args": {}, "timeout_ms": ms});
    // Taken, never answered: too late to withdraw, and the caller hears so.
    let sock = w.ctl_sock();
    let held = tokio::spawn({
        let req = call("hold", 500);
        async move { Ctl::connect(&sock).await.req(req).await }
    });
    let r = tokio::time::timeout(BOUND, sa.next_request())
        .await
        .expect("the call reaches the sub-agent")
        .unwrap()
        .unwrap();
    assert_eq!(r.method, "hold");
    let v = held.await.unwrap();
    assert_eq!(v["error"]["kind"], "timeout", "{v}");
    assert_eq!(v["error"]["outcome"], "taken", "{v}");

    // The agent stops reading; the call and, after its timeout, its cancel
    // wait in the channel. The agent cannot answer: the outcome is unknown.
    signal(&agent, nix::sys::signal::Signal::SIGSTOP);
    struct Cont<'a>(&'a Proc);
    impl Drop for Cont<'_> {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0.pid() as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
    }
    let cont = Cont(&agent);
    let before = ctl.link(U).await;
    let v = ctl.req(call("late", 300)).await;
    assert!(
        v["error"]["kind"] == "timeout" || v["error"]["kind"] == "not_connected",
        "{v}"
    );
    assert_eq!(v["error"]["outcome"], "unknown", "{v}");
    // Both the call and its cancel wait in the agent's channel before it
    // resumes: the proxy numbered both (next_seq up by two), and a PING it
    // made after them (a loss probe: the stopped agent acknowledges
    // nothing) has gone out behind them — frames leave in order. (Resuming
    // the agent as soon as the caller was answered let it read the call
    // before the cancel was written, on a loaded machine: then a sub-agent
    // takes it, as the "unknown" outcome says it may.)
    let seq0 = before["next_seq"].as_u64().unwrap();
    let t = Instant::now();
    let mut pings_then = None;
    loop {
        let l = ctl.link(U).await;
        let pings = l["pings"].as_u64().unwrap();
        if pings_then.is_none() && l["next_seq"].as_u64().unwrap() >= seq0 + 2 {
            pings_then = Some(pings);
        }
        if pings_then.is_some_and(|p| pings > p) {
            break;
        }
        assert!(t.elapsed() < BOUND, "the cancel never went out: {l}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(cont);
    // The agent reads both: the cancel wins, the call never runs.
    let t = Instant::now();
    loop {
        let s = agent_stats(&mut ctl, U).await;
        if s["router"]["cancelled"] == 1 {
            break;
        }
        assert!(t.elapsed() < BOUND, "never cancelled: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_all_taken(&mut ctl, U).await;
    // The next request the sub-agent gets is the one after it.
    let sock = w.ctl_sock();
    let probe = tokio::spawn({
        let req = call("probe", 30_000);
        async move { Ctl::connect(&sock).await.req(req).await }
    });
    let r = tokio::time::timeout(BOUND, sa.next_request())
        .await
        .expect("the probe reaches the sub-agent")
        .unwrap()
        .unwrap();
    assert_eq!(r.method, "probe", "the given-up call ran: {r:?}");
    sa.reply(r.id, Ok(json!("ok"))).await.unwrap();
    let v = probe.await.unwrap();
    assert_eq!(v["result"], "ok", "{v}");
}
