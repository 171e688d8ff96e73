//! Many guests on one proxy, and what a guest may and may not claim.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;
use tether::client::SubAgent;
use tether::rpc::Target;

const GUESTS: u32 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fanout_reaches_every_one_of_200_guests() {
    let w = World::new();
    let _proxy = w.proxy("");
    let mut agents = vec![];
    for n in 0..GUESTS {
        agents.push(w.bare_agent(&uuid(n)));
    }
    // The test plays each guest's sub-agent, through the Rust client API.
    let mut subs = vec![];
    for (n, (_, sock)) in agents.iter().enumerate() {
        wait_for_path(sock);
        let sa = SubAgent::connect(sock, &format!("fleet-{n}"), &["fleet"])
            .await
            .unwrap();
        subs.push(sa);
    }
    let mut ctl = w.ctl().await;
    for n in 0..GUESTS {
        wait_linked(&mut ctl, &uuid(n), "fleet").await;
    }
    let v = ctl
        .req(json!({"op": "fanout", "topic": "fleet", "method": "hello", "args": {"k": 1}}))
        .await;
    assert_eq!(
        v["result"]["delivered"].as_array().unwrap().len(),
        GUESTS as usize,
        "{v}"
    );
    assert!(v["result"]["failed"].as_array().unwrap().is_empty());
    // Every sub-agent got it, once.
    for (n, sa) in subs.iter_mut().enumerate() {
        let r = tokio::time::timeout(BOUND, sa.next_request())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.method.as_str(), &r.args),
            ("hello", &json!({"k": 1})),
            "guest {n}"
        );
        assert!(!r.is_call());
    }
    for sa in subs.iter_mut() {
        let more = tokio::time::timeout(Duration::from_millis(50), sa.next_request()).await;
        assert!(more.is_err(), "a guest got the fanout twice");
    }
    // And a call to one of them through its Rust sub-agent.
    let task = {
        let mut sa = subs.remove(7);
        tokio::spawn(async move {
            let r = sa.next_request().await.unwrap().unwrap();
            sa.reply(r.id, Ok(json!({"got": r.args}))).await.unwrap();
        })
    };
    let v = ctl.req(json!({"op": "call", "instance": uuid(7), "topic": "fleet", "method": "m", "args": {"x": 7}})).await;
    assert_eq!(v["result"], json!({"got": {"x": 7}}));
    task.await.unwrap();
}

#[tokio::test]
async fn guest_identity_comes_from_the_host_and_guest_calls_are_refused() {
    let w = World::new();
    // Casts allowed anywhere, calls not (mode cast).
    let _proxy = w.proxy(
        "[policy.profiles.default]\nmode = \"cast\"\ntopics = [\"*\"]\n\
         [[policy.profiles.default.targets]]\ntopics = [\"*\"]\nmethods = [\"*\"]\n",
    );
    let (_a, mut sa, mut ctl) = w.guest_with_sub_agent(&uuid(1), "liar", "x").await;
    let mut watch = w.ctl().await;
    let v = watch.req(json!({"op": "watch"})).await;
    assert_eq!(v["ok"], true);

    // The guest claims to be another instance; the proxy stamps the truth.
    sa.cast_with_ctx(
        Target {
            topic: "events".into(),
            ..Default::default()
        },
        "claim",
        json!({}),
        json!({"tether_instance": uuid(99), "user": "admin"}),
    )
    .await
    .unwrap();
    let ev = watch.read().await;
    assert_eq!(ev["event"]["instance"], json!(uuid(1)));
    assert_eq!(
        ev["event"]["ctx"],
        json!({"tether_instance": uuid(1)}),
        "the guest's other keys are dropped: {ev}"
    );

    // Guest calls are refused by default, with an answer (not silence).
    let r = sa
        .call(
            Target {
                topic: "conductor".into(),
                ..Default::default()
            },
            "get",
            json!({}),
            Some(5_000),
        )
        .await
        .unwrap();
    let f = r.unwrap_err();
    assert_eq!(f.class, "Denied");
    let v = ctl.req(json!({"op": "links"})).await;
    assert_eq!(v["result"][0]["denied"], 1, "{v}");
}

#[tokio::test]
async fn a_cast_the_policy_denies_is_refused_back_to_the_sub_agent_that_sent_it() {
    let w = World::new();
    let _proxy = w.proxy("[policy.profiles.default]\ntopics = [\"*\"]\n");
    let (_a, mut sa, mut ctl) = w.guest_with_sub_agent(&uuid(2), "caster", "y").await;
    let target = Target {
        topic: "events".into(),
        ..Default::default()
    };
    sa.cast(target.clone(), "pool_down", json!({"pool": "p1"}))
        .await
        .unwrap();
    let r = tokio::time::timeout(BOUND, sa.next_refusal())
        .await
        .expect("no refusal came back")
        .unwrap();
    assert_eq!(r.target, target);
    assert_eq!(r.method, "pool_down");
    assert!(
        r.reason.starts_with("Denied: guest casts are not allowed"),
        "{r:?}"
    );
    // The sub-agent keeps serving after the refusal.
    let v = ctl
        .req(json!({"op": "cast", "instance": uuid(2), "topic": "y", "method": "m"}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    let req = tokio::time::timeout(BOUND, sa.next_request())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(req.method, "m");
}

#[tokio::test]
async fn topics_outside_the_allow_list_are_not_served_and_do_not_take_the_others_away() {
    let w = World::new();
    let _proxy = w.proxy("[policy.profiles.default]\ntopics = [\"lbaas*\"]\n");
    let (_a, sock) = w.bare_agent(&uuid(3));
    wait_for_path(&sock);
    let _good = SubAgent::connect(&sock, "good", &["lbaas-agent"])
        .await
        .unwrap();
    let _bad = SubAgent::connect(&sock, "greedy", &["nova-compute"])
        .await
        .unwrap();
    let mut ctl = w.ctl().await;
    wait_linked(&mut ctl, &uuid(3), "lbaas-agent").await;
    // The guest registered both; the proxy serves only the allowed one.
    let t = std::time::Instant::now();
    loop {
        let l = ctl.link(&uuid(3)).await;
        if l["denied"].as_u64().unwrap_or(0) >= 1 {
            assert_eq!(l["topics"], json!(["lbaas-agent"]), "{l}");
            break;
        }
        assert!(
            t.elapsed() < BOUND,
            "the refused topic was never counted: {l}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let log = std::fs::read_to_string(w.path("proxy.log")).unwrap();
    assert!(
        log.contains("nova-compute") && log.contains("not among the topics profile"),
        "the audit record names it"
    );
}

/// A sub-agent that stops reading: what its socket takes is taken, the rest
/// waits in the agent (its queue, then its backlog) and reaches it as it
/// reads; past the backlog, new casts are refused `SubAgentBusy` — told to
/// their callers, never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_agent_that_stops_reading_gets_backpressure_then_refusals_not_drops() {
    /// More than the socket's buffer, the agent's queue (256) and backlog
    /// (4096) for one sub-agent together.
    const CONNS: usize = 24;
    const PER_CONN: usize = 250;
    let w = World::new();
    let _proxy = w.proxy("[policy.profiles.default]\ntopics = [\"*\"]\n");
    // Its sub-agent registers, then never reads.
    let (_a, _stuck, mut ctl) = w.guest_with_sub_agent(&uuid(4), "stuck", "stuck").await;
    let mut tasks = vec![];
    for c in 0..CONNS {
        let path = w.ctl_sock();
        tasks.push(tokio::spawn(async move {
            let mut ctl = Ctl::connect(&path).await;
            for n in 0..PER_CONN {
                let r = json!({"id": n, "op": "cast", "instance": uuid(4), "topic": "stuck",
                               "method": "m", "args": {"c": c, "n": n}, "timeout_ms": 15_000});
                ctl.try_send_line(&r.to_string()).await.unwrap();
            }
            let mut out = vec![];
            for _ in 0..PER_CONN {
                out.push(ctl.read().await);
            }
            out
        }));
    }
    let (mut taken, mut waiting, mut busy) = (0, 0, 0);
    for t in tasks {
        for v in t.await.unwrap() {
            if v["ok"] == true {
                taken += 1;
            } else if v["error"]["kind"] == "timeout" {
                // Queued, not yet taken: the proxy keeps it.
                assert!(
                    v["error"]["message"].as_str().unwrap().contains("keeps it"),
                    "{v}"
                );
                waiting += 1;
            } else {
                assert_eq!(v["error"]["kind"], "refused", "{v}");
                assert!(
                    v["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("SubAgentBusy"),
                    "{v}"
                );
                busy += 1;
            }
        }
    }
    eprintln!(
        "stuck sub-agent: {taken} taken by its socket, {waiting} waiting, {busy} refused busy"
    );
    assert!(taken >= 1 && waiting >= 4096 && busy >= 1);
    let v = ctl
        .req(json!({"op": "call", "instance": uuid(4), "topic": "tether.agent", "method": "stats"}))
        .await;
    assert_eq!(v["result"]["router"]["backlog"], 4096, "{v}");
}
