//! An unmodified oslo.messaging program in the real Debian guest image, and
//! that guest's live migration under oslo traffic: the image
//! (`scripts/guest-image`) with cloud-init installing this checkout's agent
//! package and writing the program (`python/tests/guest_oslo_program.py`, on
//! Debian's own oslo.messaging) as a sub-agent. The control plane's oslo
//! client, server and notification listener reach it through RabbitMQ;
//! then QMP moves the VM from host A (its proxy and channels directory) to
//! host B while the oslo client casts to it. Every cast is handled exactly
//! once.
//!
//! QEMU 10 from bookworm-backports, unpacked by `scripts/qemu10`: Debian
//! 12's QEMU 7.2 crashed a busy TCG guest's kernel on 7 of 8 live
//! migrations (`docs/deployment.md`). Both QEMUs share a qcow2 overlay of
//! the image (same host; the source hands the disk over).

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::image::{
    ImageOpts, ImageVm, OSLO_RECORD, deb, image_dir, overlay, qemu10_dir, seed, shipped_user_data,
    user_data_with_oslo_program,
};
use support::oslo::*;
use support::vm::{free_port, migrate_after};
use support::*;

/// First boot to the first call (cloud-init installing the package): a
/// hang detector, as in tests/image.rs.
const BOOT: Duration = Duration::from_secs(600);
/// A step after the migration; a hang detector too.
const STEP: Duration = Duration::from_secs(180);
/// An oslo call's own timeout (s): within the test's oslo client's 120 s
/// wait for each answer.
const CALL_TIMEOUT: u64 = 100;

/// The oslo program in the guest, from the control plane's oslo.messaging
/// over RabbitMQ: calls (results, errors as their classes, timeouts,
/// `call_monitor_timeout`), a cast and a fanout handled; its own
/// `RPCClient` reaches the control plane's server, and its `Notifier` the
/// control plane's listener, each with the identity the host stamps.
/// (The guest is linked and its queues consumed.)
async fn the_oslo_program_serves_and_calls_the_control_plane(
    sh: &mut support::image::Shell,
    (url, ex, id, notify_topic): (&str, &str, &str, &str),
) {
    let mut c = OsloClient::start(url, ex);
    let call = |method: &str, args: serde_json::Value| {
        json!({"op": "call", "topic": "lbaas", "server": id, "method": method,
               "args": args, "timeout": CALL_TIMEOUT, "ctx": {"user": "u-1"}})
    };
    let v = c.op(call("echo", json!({"pool": "p1"}))).await;
    assert_eq!(
        v,
        json!({"ok": true, "result": {"args": {"pool": "p1"}, "ctxt_user": "u-1"}})
    );
    let v = c.op(call("fail", json!({"message": "bad pool"}))).await;
    assert_eq!(v["class"], "ValueError", "{v}");
    let v = c.op(call("fail_custom", json!({}))).await;
    assert_eq!(
        (v["class"].as_str(), v["exc_type"].as_str()),
        (Some("RemoteError"), Some("QuotaExceeded")),
        "{v}"
    );
    let mut slow = call("slow", json!({"seconds": 3}));
    slow["timeout"] = json!(1);
    let v = c.op(slow).await;
    assert_eq!(v["class"], "MessagingTimeout", "{v}");
    // The proxy's heartbeats keep a call past its monitor timeout.
    let mut slow = call("slow", json!({"seconds": 5}));
    slow["monitor"] = json!(3);
    let v = c.op(slow).await;
    assert_eq!(v, json!({"ok": true, "result": 5}));

    // A cast and a fanout: each handled once.
    let v = c
        .op(json!({"op": "cast", "topic": "lbaas", "server": id, "method": "record", "args": {"k": "cast"}}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    let v = c
        .op(json!({"op": "cast", "topic": "lbaas", "fanout": true, "method": "record", "args": {"k": "fanout"}}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    sh.until(
        &format!("cat {OSLO_RECORD} | sort"),
        "{\"k\": \"cast\"}\n{\"k\": \"fanout\"}",
        STEP,
    )
    .await;

    // Its own RPCClient, to a control-plane oslo server: the context's
    // identity is the host's, whatever the program put there.
    let mut plugin = OsloServer::start(url, ex, "lbaas-plugin", "control-1").await;
    let v = c.op(call("ask_control", json!({"x": 1}))).await;
    assert_eq!(
        v["result"],
        json!({"args": {"x": 1}, "instance": id}),
        "{v}"
    );
    let seen = plugin.next(STEP).await;
    assert_eq!(seen["ctx"]["tether_instance"], id, "{seen}");
    assert_eq!(seen["ctx"]["request_id"], "req-guest", "{seen}");

    // Its Notifier, to a control-plane listener: the publisher is the host's.
    let mut listener = OsloListener::start(url, ex, notify_topic).await;
    let v = c
        .op(call(
            "notify",
            json!({"event_type": "lbaas.pool.update.end", "payload": {"pool": "p1"}}),
        ))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    let n = listener.next(STEP).await;
    assert_eq!(n["publisher_id"], format!("tether.{id}"), "{n}");
    assert_eq!(n["ctxt"]["tether_instance"], id, "{n}");
    assert_eq!(
        (&n["priority"], &n["event_type"], &n["payload"]),
        (
            &json!("info"),
            &json!("lbaas.pool.update.end"),
            &json!({"pool": "p1"})
        ),
        "{n}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_guest_migrates_under_oslo_casts_and_handles_each_once() {
    /// Casts per round; each round ends with a call.
    const PER: u64 = 50;
    /// At least this many rounds, and on until the migration is over.
    const MIN_ROUNDS: u64 = 4;
    /// Bound on the rounds (the migration normally ends within a few).
    const MAX_ROUNDS: u64 = 400;
    let (url, ex, notify) = (amqp_url(), unique("ex"), unique("notif"));
    let id = random_uuid();
    let (wa, wb) = (World::new(), World::new());
    // Both proxies hold the cloud's reply key (as in vm_oslo_migration.rs).
    let key = wa.path("reply.key");
    support::guest::reply_key(&key);
    let section = format!(
        "{}[policy]\nreply_keys = [{key:?}]\n{}",
        broker_section(&url, &ex),
        lab_policy(&format!("notifications = [{notify:?}]"))
    );
    let (_pa, _pb) = (wa.proxy(&section), wb.proxy(&section));
    let image = image_dir();
    let qemu = qemu10_dir();
    let iso = seed(
        &wa.path(""),
        &id,
        &user_data_with_oslo_program(&shipped_user_data(), &notify),
        &[deb("tether-agent")],
    );
    let disk = overlay(&wa.path(""), &image, &qemu);
    let src = ImageVm::start(
        &wa.path(""),
        &image,
        &iso,
        &wa.channels().join(format!("{id}.sock")),
        &ImageOpts {
            name: "src",
            qemu: Some(&qemu),
            disk: Some(&disk),
            incoming: None,
        },
    );
    let mut ca = wa.ctl().await;
    wait_linked_for(&mut ca, &id, "lbaas", BOOT, || src.console()).await;
    broker_status_until(&mut ca, "consuming the guest's queues", |v| {
        v["instances_consumed"].as_u64().unwrap_or(0) >= 1
            && v["fanout_topics"].as_u64().unwrap_or(0) >= 2
    })
    .await;
    the_oslo_program_serves_and_calls_the_control_plane(
        &mut src.shell(BOOT).await,
        (&url, &ex, &id, &notify),
    )
    .await;
    let mut c = OsloClient::start(&url, &ex);
    let echo = |n: u64| {
        json!({"op": "call", "topic": "lbaas", "server": id, "method": "echo",
               "args": {"n": n}, "timeout": 30})
    };
    let v = c.op(echo(0)).await;
    assert_eq!(v["ok"], true, "{v}\n{}", src.console());

    let port = free_port();
    let dst = ImageVm::start(
        &wb.path(""),
        &image,
        &iso,
        &wb.channels().join(format!("{id}.sock")),
        &ImageOpts {
            name: "dst",
            qemu: Some(&qemu),
            disk: Some(&disk),
            incoming: Some(port),
        },
    );
    let migrate = migrate_after(
        Duration::from_millis(500),
        ImageVm::qmp(&wa.path(""), "src"),
        port,
    );
    let Rounds {
        rounds: round,
        answered: ok,
        timed_out,
    } = cast_rounds_until(
        &mut c,
        ("lbaas", &id),
        (PER, MIN_ROUNDS, MAX_ROUNDS),
        &migrate,
        |r| echo(r + 1),
        |r, v| assert_eq!(v["args"], json!({"n": r + 1}), "{v}"),
    )
    .await;
    let took = migrate.await.unwrap();
    drop(src);
    let n = round * PER;

    // The guest runs at B: linked there, and every cast handled once.
    let mut cb = wb.ctl().await;
    wait_linked_for(&mut cb, &id, "lbaas", STEP, || dst.console()).await;
    let mut sh = dst.shell(STEP).await;
    let t = Instant::now();
    let record = loop {
        let lines = sh.complete_lines(OSLO_RECORD, STEP).await;
        if lines.len() as u64 >= n + 2 || t.elapsed() > STEP {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (mut numbered, mut before) = (vec![], vec![]);
    for l in &record {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
        match v["i"].as_u64() {
            Some(i) => numbered.push(i),
            None => before.push(v),
        }
    }
    // The cast and the fanout from before the move, still once each (in
    // either order: they came through different queues).
    before.sort_by_key(|v| v.to_string());
    assert_eq!(before, [json!({"k": "cast"}), json!({"k": "fanout"})]);
    let (twice, lost) = twice_and_missing(numbered, n);
    assert!(
        twice.is_empty() && lost.is_empty(),
        "of {n} casts: handled twice {twice:?}, never {lost:?}\n{}",
        dst.console()
    );
    // Calls were answered throughout, but for the moment of the move.
    assert!(
        ok + timed_out == round && ok + 2 >= round,
        "calls answered {ok}, timed out {timed_out} of {round}"
    );
    assert_eq!(ca.link(&id).await["established"], false);
    let v = c.op(echo(u64::MAX)).await;
    assert_eq!(v["ok"], true, "B serves the guest: {v}");
    eprintln!(
        "image guest migrated in {took:?}: {n} casts in {round} rounds, calls {ok} answered, {timed_out} timed out"
    );
}
