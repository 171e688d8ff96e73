//! The untrusted guest against a real RabbitMQ and the real Python
//! oslo.messaging: each attack a hostile guest could make on the control
//! plane, refused at the proxy's enforcement point with its audit record.
//! The guest is played by the test ([`FakeGuest`]): it sends envelopes the
//! real agent never would.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::guest::{FakeGuest, assign, audited, cast, policy, reply_key, target};
use support::oslo::*;
use support::*;
use tether::rpc::{Kind, LinkMsg, Request, new_unique_id};

const FORGED: &str = r#"{"is_admin": true, "roles": ["admin"], "user_id": "admin", "project_id": "other-tenant", "request_id": "req-1", "tether_instance": "someone-else"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_casts_reach_neither_another_instance_nor_another_service_and_the_context_is_the_hosts()
 {
    let url = amqp_url();
    let ex = unique("ex");
    let svc = unique("svc");
    let w = World::new();
    let profiles = format!(
        r#"[policy.profiles.default]
topics = ["*"]
[policy.profiles.reporter]
mode = "cast"
topics = ["good"]
context_keys = ["request_id"]
static_context = {{ user_id = "svc-user", project_id = "service", is_admin = false, roles = ["service"] }}
[[policy.profiles.reporter.targets]]
topics = ["good", "{svc}"]
methods = ["*"]
"#
    );
    let (hostile, victim) = (random_uuid(), random_uuid());
    let _ = policy(&w, "", "");
    assign(&w, &hostile, "profile = \"reporter\"\n");
    let _proxy = w.proxy(&format!(
        "{}{}",
        broker_section(&url, &ex),
        policy(&w, "", &profiles)
    ));
    let mut ctl = w.ctl().await;
    broker_status_until(&mut ctl, "connected", |v| v["connected"] == true).await;
    let mut server = OsloServer::start(&url, &ex, &svc, "conductor-1").await;
    let mut a = FakeGuest::start(&w.channels(), &hostile);
    let b = FakeGuest::start(&w.channels(), &victim);
    a.topics(&["good"]).await;
    b.topics(&["good"]).await;
    wait_linked(&mut ctl, &hostile, "good").await;
    wait_linked(&mut ctl, &victim, "good").await;
    broker_status_until(&mut ctl, "both instances consumed", |v| {
        v["instances_consumed"] == 2
    })
    .await;
    let ctx: Value = serde_json::from_str(FORGED).unwrap();

    // Each attack is refused back to the guest with the reason.
    let attacks = [
        (
            "another instance by server",
            cast(target("good", Some(&victim), None), "pwn", ctx.clone()),
        ),
        (
            "a fanout exchange",
            cast(
                target("good", None, Some("good_fanout")),
                "pwn",
                ctx.clone(),
            ),
        ),
        (
            "another service's topic with forged admin",
            cast(
                target("compute", Some("host1"), None),
                "run_instance",
                ctx.clone(),
            ),
        ),
        (
            "another exchange",
            cast(target(&svc, None, Some("nova")), "told", ctx.clone()),
        ),
        (
            "a fanout",
            Request {
                kind: Kind::Fanout,
                ..cast(target("good", None, None), "pwn", ctx.clone())
            },
        ),
    ];
    for (what, r) in &attacks {
        a.send(LinkMsg::Req(r.clone())).await;
        let (uid, reason) = a.next_refusal().await;
        assert_eq!(uid, r.unique_id, "{what}");
        assert!(reason.starts_with("Denied:"), "{what}: {reason}");
    }
    // The one target the profile allows: the control-side oslo server sees
    // only the context the host stamps (plus the allowed request_id).
    a.send(LinkMsg::Req(cast(
        target(&svc, None, None),
        "told",
        ctx.clone(),
    )))
    .await;
    let mut got = server.next(Duration::from_secs(30)).await;
    assert_eq!(got["method"], "told");
    // oslo's server adds the call's client_timeout (null for a cast) itself.
    got["ctx"].as_object_mut().unwrap().remove("client_timeout");
    assert_eq!(
        got["ctx"],
        json!({"tether_instance": hostile, "user_id": "svc-user", "project_id": "service",
               "is_admin": false, "roles": ["service"], "request_id": "req-1"}),
        "{got}"
    );
    let st = broker_status(&mut ctl).await;
    assert_eq!(
        st["published"], 1,
        "only the allowed cast was published: {st}"
    );
    let l = ctl.link(&victim).await;
    assert_eq!(
        l["delivered"], 1,
        "the victim received nothing but its own link traffic: {l}"
    );

    // Every decision is audited, as JSON.
    let audit = w.path("audit.jsonl");
    let denied = |pred: fn(&Value) -> bool| {
        jsonl(&audit)
            .into_iter()
            .any(|v| v["instance"] == json!(hostile) && v["decision"] == "deny" && pred(&v))
    };
    audited(&audit, "of the allowed cast", |v| {
        v["instance"] == json!(hostile) && v["decision"] == "allow" && v["kind"] == "cast"
    })
    .await;
    assert!(denied(
        |v| v["kind"] == "cast" && v["server"].as_str().is_some_and(|s| s.len() == 36)
    ));
    assert!(denied(|v| v["exchange"] == "good_fanout"));
    assert!(denied(
        |v| v["topic"] == "compute" && v["method"] == "run_instance"
    ));
    assert!(denied(|v| v["exchange"] == "nova"));
    assert!(denied(|v| v["kind"] == "fanout"));
    for v in jsonl(&audit) {
        assert!(v["time"].is_string() && v["instance"].is_string(), "{v}");
    }
    let out = std::process::Command::new(CTL)
        .args(["-s", w.ctl_sock().to_str().unwrap(), "policy", &hostile])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("profile \"reporter\"") && text.contains("mode cast"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_answers_only_calls_delivered_into_it_and_never_learns_reply_queues() {
    let url = amqp_url();
    let ex = unique("ex");
    let w = World::new();
    reply_key(&w.path("reply.key"));
    let keys = format!("reply_keys = [{:?}]", w.path("reply.key"));
    let _proxy = w.proxy(&format!(
        "{}{}",
        broker_section(&url, &ex),
        policy(&w, &keys, "[policy.profiles.default]\ntopics = [\"*\"]\n")
    ));
    let mut ctl = w.ctl().await;
    broker_status_until(&mut ctl, "connected", |v| v["connected"] == true).await;
    let victim_q = Spy::start(&url, None).await;
    let u = random_uuid();
    let mut g = FakeGuest::start(&w.channels(), &u);
    g.topics(&["t"]).await;
    wait_linked(&mut ctl, &u, "t").await;
    broker_status_until(&mut ctl, "consumed", |v| v["instances_consumed"] == 1).await;

    // Reply-only by default: the guest's own cast is refused.
    g.send(LinkMsg::Req(cast(target("t", None, None), "m", json!({}))))
        .await;
    let (_, reason) = g.next_refusal().await;
    assert!(reason.contains("mode reply-only"), "{reason}");

    // A real oslo call into the guest: it sees a local id and a sealed handle.
    let mut c = OsloClient::start(&url, &ex);
    let uu = u.clone();
    let call = tokio::spawn(async move {
        c.op(json!({"op": "call", "topic": "t", "server": uu, "method": "m", "timeout": 60}))
            .await
    });
    let req = g.next_request().await;
    assert_eq!(req.kind, Kind::Call);
    let local = req.msg_id.clone().unwrap();
    let handle = req.reply_to.clone().unwrap();
    assert!(
        handle.starts_with("th1.") && !handle.contains("reply_"),
        "{handle}"
    );

    // Forged: a reply aimed at a queue by name, and a reply to no call.
    g.reply(
        &new_unique_id(),
        Some(victim_q.queue.clone()),
        json!("forged"),
    )
    .await;
    g.reply(&new_unique_id(), None, json!("forged")).await;
    let audit = w.path("audit.jsonl");
    audited(&audit, "of the reply aimed at a queue", |v| {
        v["kind"] == "reply"
            && v["decision"] == "deny"
            && v["reason"]
                .as_str()
                .unwrap_or("")
                .contains("not a reply handle")
    })
    .await;
    audited(&audit, "of the reply to no call", |v| {
        v["kind"] == "reply"
            && v["decision"] == "deny"
            && v["reason"]
                .as_str()
                .unwrap_or("")
                .contains("without a reply handle")
    })
    .await;

    // The genuine answer reaches the caller, once; a replay is refused.
    g.reply(&local, Some(handle.clone()), json!({"answer": 42}))
        .await;
    let v = tokio::time::timeout(BOUND, call).await.unwrap().unwrap();
    assert_eq!(v, json!({"ok": true, "result": {"answer": 42}}));
    g.reply(&new_unique_id(), Some(handle.clone()), json!("replayed"))
        .await;
    audited(&audit, "of the replayed handle", |v| {
        v["decision"] == "deny" && v["reason"].as_str().unwrap_or("").contains("used already")
    })
    .await;
    assert_eq!(
        victim_q.drain().await,
        Vec::<Value>::new(),
        "nothing reached the named queue"
    );
    let st = broker_status(&mut ctl).await;
    assert_eq!(st["published"], 0, "no guest message was published: {st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_instance_moved_a_reply_needs_a_valid_unexpired_handle() {
    let url = amqp_url();
    let ex = unique("ex");
    let (wa, wb) = (World::new(), World::new());
    let key = wa.path("reply.key");
    reply_key(&key);
    let keys = format!("reply_keys = [{key:?}]");
    let prof = "[policy.profiles.default]\ntopics = [\"*\"]\n";
    let _pa = wa.proxy(&format!(
        "{}{}",
        broker_section(&url, &ex),
        policy(&wa, &keys, prof)
    ));
    let _pb = wb.proxy(&format!(
        "{}{}",
        broker_section(&url, &ex),
        policy(&wb, &keys, prof)
    ));
    let (mut ca, mut cb) = (wa.ctl().await, wb.ctl().await);
    let u = random_uuid();
    let mut g = FakeGuest::start(&wa.channels(), &u);
    g.topics(&["t"]).await;
    wait_linked(&mut ca, &u, "t").await;
    broker_status_until(&mut ca, "consumed", |v| v["instances_consumed"] == 1).await;

    // Two calls delivered through proxy A: one patient, one that expires.
    let mut c1 = OsloClient::start(&url, &ex);
    let mut c2 = OsloClient::start(&url, &ex);
    let uu = u.clone();
    let patient = tokio::spawn(async move {
        c1.op(json!({"op": "call", "topic": "t", "server": uu, "method": "slow", "timeout": 90}))
            .await
    });
    let first = g.next_request().await;
    let uu = u.clone();
    let brief = tokio::spawn(async move {
        c2.op(json!({"op": "call", "topic": "t", "server": uu, "method": "brief", "timeout": 2}))
            .await
    });
    let second = g.next_request().await;
    let (patient_req, brief_req) = if first.method == "slow" {
        (first, second)
    } else {
        (second, first)
    };

    // The VM moves: its channel leaves A's host and appears on B's.
    g.leave().await;
    let g = FakeGuest::start(&wb.channels(), &u);
    g.topics(&["t"]).await;
    wait_linked(&mut cb, &u, "t").await;
    let audit_b = wb.path("audit.jsonl");

    // Tampered: one character of the sealed part changed.
    let h = patient_req.reply_to.clone().unwrap();
    let mut t = h.clone().into_bytes();
    let i = t.len() - 5;
    t[i] = if t[i] == b'A' { b'B' } else { b'A' };
    g.reply(
        patient_req.msg_id.as_ref().unwrap(),
        Some(String::from_utf8(t).unwrap()),
        json!("tampered"),
    )
    .await;
    audited(&audit_b, "of the tampered handle", |v| {
        v["decision"] == "deny" && v["reason"].as_str().unwrap_or("").contains("not sealed by")
    })
    .await;

    // Expired: wait until the handle's own expiry has passed (the test
    // holds the key, so it reads the expiry rather than guess it).
    let hb = brief_req.reply_to.clone().unwrap();
    let sealer = tether::host::policy::handle::Sealer::load(std::slice::from_ref(&key)).unwrap();
    let exp = sealer.open(&u, &hb, 0).unwrap().expires_unix_ms;
    let t0 = Instant::now();
    while tether::unix_ms() <= exp {
        assert!(t0.elapsed() < BOUND, "the handle never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    g.reply(brief_req.msg_id.as_ref().unwrap(), Some(hb), json!("late"))
        .await;
    audited(&audit_b, "of the expired handle", |v| {
        v["decision"] == "deny" && v["reason"].as_str().unwrap_or("").contains("expired")
    })
    .await;
    let v = tokio::time::timeout(BOUND, brief).await.unwrap().unwrap();
    assert_eq!(v["class"], "MessagingTimeout", "{v}");

    // The genuine one goes out through B to the caller that called via A.
    g.reply(
        patient_req.msg_id.as_ref().unwrap(),
        Some(h),
        json!({"via": "b"}),
    )
    .await;
    let v = tokio::time::timeout(BOUND, patient).await.unwrap().unwrap();
    assert_eq!(v, json!({"ok": true, "result": {"via": "b"}}));
    assert_eq!(cb.link(&u).await["replies_rerouted"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_way_guest_publishes_nothing_while_casts_and_calls_into_it_work() {
    let url = amqp_url();
    let ex = unique("ex");
    let w = World::new();
    let u = random_uuid();
    let _ = policy(&w, "", "");
    assign(&w, &u, "profile = \"appliance\"\n");
    let profiles = "[policy.profiles.appliance]\nmode = \"one-way\"\ntopics = [\"fw-rules\"]\n";
    let _proxy = w.proxy(&format!(
        "{}{}",
        broker_section(&url, &ex),
        policy(&w, "", profiles)
    ));
    let mut ctl = w.ctl().await;
    broker_status_until(&mut ctl, "connected", |v| v["connected"] == true).await;
    let spy = Spy::start(&url, Some((&ex, "#"))).await;
    let mut g = FakeGuest::start(&w.channels(), &u);
    // Its announcement is ignored: it serves what its host-side policy says.
    g.topics(&["evil", "fw-rules"]).await;
    wait_linked(&mut ctl, &u, "fw-rules").await;
    let audit = w.path("audit.jsonl");
    audited(&audit, "of the ignored announcement", |v| {
        v["kind"] == "topics" && v["decision"] == "ignore"
    })
    .await;
    assert_eq!(ctl.link(&u).await["topics"], json!(["fw-rules"]));
    broker_status_until(&mut ctl, "consumed", |v| v["instances_consumed"] == 1).await;

    // Nothing from the guest goes out: casts, calls, replies.
    g.send(LinkMsg::Req(cast(
        target("fw-rules", None, None),
        "m",
        json!({}),
    )))
    .await;
    let (_, reason) = g.next_refusal().await;
    assert!(reason.contains("mode one-way"), "{reason}");
    let call = Request {
        kind: Kind::Call,
        msg_id: Some(new_unique_id()),
        ..cast(target("x", None, None), "m", json!({}))
    };
    g.send(LinkMsg::Req(call)).await;
    match g.next().await {
        LinkMsg::Rep(r) => assert_eq!(r.failure.unwrap().class, "Denied"),
        m => panic!("{m:?}"),
    }
    g.reply(&new_unique_id(), Some("reply_x".into()), json!(1))
        .await;
    audited(&audit, "of the refused reply", |v| {
        v["kind"] == "reply" && v["decision"] == "deny"
    })
    .await;

    // Host → guest: an oslo cast arrives; an oslo call is answered Denied
    // by the proxy (the guest could not answer it); a control-socket call
    // (local to this host) is answered by the guest.
    let mut c = OsloClient::start(&url, &ex);
    let v = c.op(json!({"op": "cast", "topic": "fw-rules", "server": u, "method": "apply", "args": {"rule": 1}})).await;
    assert_eq!(v["ok"], true);
    let r = g.next_request().await;
    assert_eq!((r.kind, r.method.as_str()), (Kind::Cast, "apply"));
    let v = c
        .op(json!({"op": "call", "topic": "fw-rules", "server": u, "method": "get", "timeout": 30}))
        .await;
    assert!(
        v["message"].as_str().unwrap_or("").contains("one-way"),
        "{v}"
    );
    let (uu, mut ctl2) = (u.clone(), w.ctl().await);
    let local = tokio::spawn(async move {
        ctl2.req(json!({"op": "call", "instance": uu, "topic": "fw-rules", "method": "status"}))
            .await
    });
    let r = g.next_request().await;
    g.reply(
        r.msg_id.as_ref().unwrap(),
        r.reply_to.clone(),
        json!("fine"),
    )
    .await;
    let v = tokio::time::timeout(BOUND, local).await.unwrap().unwrap();
    assert_eq!(v["result"], "fine", "{v}");

    // A consumer bound to '#' on the control exchange saw the host's own
    // traffic only; the proxy published nothing of the guest's.
    let seen = spy.drain().await;
    assert!(!seen.is_empty(), "the spy is bound");
    assert!(
        seen.iter()
            .all(|m| m.get("_context_tether_instance").is_none()),
        "{seen:?}"
    );
    assert_eq!(broker_status(&mut ctl).await["published"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_topic_names_are_refused_and_nothing_is_declared_for_them() {
    let url = amqp_url();
    let ex = unique("ex");
    let w = World::new();
    let _proxy = w.proxy(&format!(
        "{}{}",
        broker_section(&url, &ex),
        policy(&w, "", "[policy.profiles.default]\ntopics = [\"*\"]\n")
    ));
    let mut ctl = w.ctl().await;
    let u = random_uuid();
    let other = random_uuid();
    let long = "x".repeat(200_000);
    let bad = [
        "",
        "#",
        "a\0b",
        "../x",
        other.as_str(),
        "tether.supervisor",
        long.as_str(),
    ];
    let g = FakeGuest::start(&w.channels(), &u);
    let mut all = vec!["good"];
    all.extend(bad);
    g.topics(&all).await;
    wait_linked(&mut ctl, &u, "good").await;
    assert_eq!(ctl.link(&u).await["topics"], json!(["good"]));
    let audit = w.path("audit.jsonl");
    audited(&audit, "of the allowed topic", |v| {
        v["kind"] == "topics" && v["decision"] == "allow"
    })
    .await;
    let refused: Vec<Value> = jsonl(&audit)
        .into_iter()
        .filter(|v| v["kind"] == "topics" && v["decision"] == "deny")
        .collect();
    assert_eq!(refused.len(), bad.len(), "{refused:#?}");
    assert!(
        refused
            .iter()
            .all(|v| v["topic"].as_str().unwrap().len() < 400),
        "clipped"
    );
    // On the broker, only good.<uuid> exists for this instance.
    broker_status_until(&mut ctl, "consumed", |v| v["instances_consumed"] == 1).await;
    let out = std::process::Command::new(format!("{}/scripts/broker", env!("CARGO_MANIFEST_DIR")))
        .args(["ctl", "list_queues", "name"])
        .env(
            "TETHER_BROKER_PORT",
            url.rsplit(':').next().unwrap().trim_end_matches('/'),
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let ours: Vec<&str> = text.lines().filter(|l| l.contains(&u)).collect();
    assert_eq!(ours, vec![format!("good.{u}")], "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_a_running_instances_profile_without_dropping_its_link() {
    let w = World::new();
    let u = random_uuid();
    let profiles = "[policy.profiles.default]\ntopics = [\"*\"]\n\
                    [policy.profiles.caster]\nmode = \"cast\"\ntopics = [\"*\"]\n\
                    [[policy.profiles.caster.targets]]\ntopics = [\"events\"]\nmethods = [\"*\"]\n";
    let proxy = w.proxy(&policy(&w, "", profiles));
    let mut ctl = w.ctl().await;
    let mut g = FakeGuest::start(&w.channels(), &u);
    g.topics(&["t"]).await;
    wait_linked(&mut ctl, &u, "t").await;
    let mut watch = w.ctl().await;
    watch.req(json!({"op": "watch"})).await;
    g.send(LinkMsg::Req(cast(
        target("events", None, None),
        "up",
        json!({}),
    )))
    .await;
    let (_, reason) = g.next_refusal().await;
    assert!(reason.contains("mode reply-only"), "{reason}");
    let before = ctl.link(&u).await;

    let hup = |p: &Proc| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };
    let profile_is = |want: &'static str| {
        let sock = w.ctl_sock();
        let u = u.clone();
        async move {
            let mut c = Ctl::connect(&sock).await;
            let t = Instant::now();
            loop {
                let v = c.req(json!({"op": "policy", "instance": u})).await;
                if v["result"]["policy"]["profile_name"] == want {
                    return v;
                }
                assert!(t.elapsed() < BOUND, "profile never became {want}: {v}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assign(&w, &u, "profile = \"caster\"\n");
    hup(&proxy);
    profile_is("caster").await;
    g.send(LinkMsg::Req(cast(
        target("events", None, None),
        "up",
        json!({}),
    )))
    .await;
    let ev = watch.read().await;
    assert_eq!(ev["event"]["method"], "up", "{ev}");

    // A bad file is refused; the running policy stays; the proxy lives.
    assign(&w, &u, "profile = \"no-such\"\n");
    hup(&proxy);
    let t = Instant::now();
    while !proxy.log_text().contains("bad instance policy refused") {
        assert!(
            t.elapsed() < BOUND,
            "the bad file was not reported: {}",
            proxy.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = profile_is("caster").await;
    assert_eq!(v["result"]["linked"], true);
    let after = ctl.link(&u).await;
    assert_eq!(
        after["connects"], before["connects"],
        "the link was not dropped"
    );
    assert_eq!(after["peer_changes"], before["peer_changes"]);
    assert!(after["established"] == true);
}

/// A watcher that reads nothing while a guest floods casts: the proxy keeps
/// a bounded buffer for it (`WATCH_BUFFER`) and then tells it how many it
/// missed, instead of growing or blocking the guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_falls_behind_is_told_how_many_it_missed() {
    const CASTS: usize = 12_000;
    let w = World::new();
    let u = random_uuid();
    let _proxy = w.proxy(&lab_policy(
        "message_burst = 1000000.0\nmessages_per_sec = 1000000.0\nbyte_burst = 1000000000.0\nbytes_per_sec = 1000000000.0",
    ));
    let g = FakeGuest::start(&w.channels(), &u);
    g.topics(&["demo"]).await;
    let mut ctl = w.ctl().await;
    wait_linked(&mut ctl, &u, "demo").await;
    let mut watch = w.ctl().await;
    assert_eq!(watch.req(json!({"op": "watch"})).await["ok"], true);
    for _ in 0..CASTS {
        g.send(LinkMsg::Req(cast(
            target("demo-events", None, None),
            "told",
            json!({}),
        )))
        .await;
    }
    g.tx.flush().await.unwrap();
    // Every cast reached the proxy (the guest's link saw them all taken
    // off the wire); now the watcher reads: a `lagged` notice comes before
    // it has read them all.
    let t = Instant::now();
    let mut read = 0;
    let missed = loop {
        let v = tokio::time::timeout(BOUND, watch.read())
            .await
            .expect("the watch went quiet before saying it lagged");
        if let Some(n) = v["event"]["lagged"].as_u64().or(v["lagged"].as_u64()) {
            break n;
        }
        read += 1;
        assert!(
            read < CASTS,
            "read every cast: nothing was dropped for a slow watcher"
        );
        assert!(t.elapsed() < BOUND * 2);
    };
    assert!(missed > 0);
    eprintln!("watcher read {read} casts, then was told it missed {missed}");
}

/// A call that timed out before the guest took it is cancelled in the
/// guest, and a new guest session gets the cancel, never the request; the
/// caller learns the outcome from the guest's answer. A guest cannot
/// cancel anything itself (denied and audited).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_call_is_cancelled_and_a_new_guest_session_gets_the_cancel() {
    let w = World::new();
    let _proxy = w.proxy(&policy(
        &w,
        "",
        "[policy.profiles.default]\ntopics = [\"*\"]\n",
    ));
    let mut ctl = w.ctl().await;
    let u = random_uuid();
    let mut g = FakeGuest::start(&w.channels(), &u);
    g.topics(&["work"]).await;
    wait_linked(&mut ctl, &u, "work").await;
    let sock = w.ctl_sock();
    let uu = u.clone();
    let call = tokio::spawn(async move {
        Ctl::connect(&sock)
            .await
            .req(json!({"op": "call", "instance": uu, "topic": "work", "method": "m", "timeout_ms": 300}))
            .await
    });
    let req = g.next_request().await;
    // Not taken: after the caller's timeout the host cancels it.
    match g.next().await {
        LinkMsg::Cancel { unique_id } => assert_eq!(unique_id, req.unique_id),
        m => panic!("expected a cancel, got {m:?}"),
    }
    // The guest's agent restarts before answering: the new session gets
    // the cancel again, not the request.
    g.leave().await;
    let mut g = FakeGuest::start(&w.channels(), &u);
    g.topics(&["work"]).await;
    match g.next().await {
        LinkMsg::Cancel { unique_id } => assert_eq!(unique_id, req.unique_id),
        m => panic!("a new session got {m:?} instead of the cancel"),
    }
    g.send(LinkMsg::Refused {
        unique_id: req.unique_id.clone(),
        reason: "Cancelled: its caller gave up".into(),
    })
    .await;
    let v = call.await.unwrap();
    assert_eq!(v["error"]["kind"], "timeout", "{v}");
    assert_eq!(v["error"]["outcome"], "withdrawn", "{v}");
    assert_eq!(ctl.link(&u).await["outstanding"], 0);
    // A guest's own cancel.
    g.send(LinkMsg::Cancel {
        unique_id: new_unique_id(),
    })
    .await;
    audited(&w.path("audit.jsonl"), "of the guest's cancel", |v| {
        v["kind"] == "cancel" && v["decision"] == "deny"
    })
    .await;
}
