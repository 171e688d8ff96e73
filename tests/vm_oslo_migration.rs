//! oslo.messaging into a real QEMU guest: the Python oslo client calls and
//! casts to the sub-agent inside a TCG guest whose VM moves from host A (its
//! proxy and channels directory) to host B while the traffic flows, and
//! whose agent is killed mid-stream. RabbitMQ carries the requests to
//! whichever proxy links the instance; nothing is re-sent by the client.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::oslo::*;
use support::vm::{Vm, free_port, migrate_after};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oslo_casts_and_calls_through_a_live_migration_lose_nothing_and_run_nothing_twice() {
    /// Casts per round; each round ends with a call.
    const PER: u64 = 100;
    /// At least this many rounds, and on until the migration is over.
    const MIN_ROUNDS: u64 = 12;
    /// Bound on the rounds (the migration normally ends within a few).
    const MAX_ROUNDS: u64 = 200;
    let url = amqp_url();
    let ex = unique("ex");
    let u = random_uuid();
    let (wa, wb) = (World::new(), World::new());
    // Both proxies hold the cloud's reply key: the reply to a call that
    // entered through A is accepted by B only with A's sealed handle.
    let key = wa.path("reply.key");
    support::guest::reply_key(&key);
    let section = format!(
        "{}[policy]\nreply_keys = [{key:?}]\n{}",
        broker_section(&url, &ex),
        lab_policy("")
    );
    let (_pa, _pb) = (wa.proxy(&section), wb.proxy(&section));
    let src = Vm::boot(
        wa.dir.path(),
        "src",
        &wa.channels().join(format!("{u}.sock")),
    );
    let port = free_port();
    let dst = Vm::incoming(
        wb.dir.path(),
        "dst",
        &wb.channels().join(format!("{u}.sock")),
        port,
    );
    let mut c = OsloClient::start(&url, &ex);
    served(&mut c, "demo", &u).await;
    let (mut ca, mut cb) = (wa.ctl().await, wb.ctl().await);

    // A call that enters through the source and is still running in the
    // guest when the VM moves: its reply must come out through B.
    let across = {
        let mut c2 = OsloClient::start(&url, &ex);
        let u = u.clone();
        tokio::spawn(async move {
            c2.op(
                json!({"op": "call", "topic": "demo", "server": u, "method": "hold",
                         "args": {"tag": "across"}, "timeout": 120}),
            )
            .await
        })
    };
    // The migration starts once the guest holds the call.
    wait_held(&mut ca, &u).await;
    let migrate = migrate_after(
        Duration::from_millis(300),
        Vm::qmp_path(wa.dir.path(), "src"),
        port,
    );

    let Rounds {
        rounds: round,
        answered: ok,
        timed_out,
    } = cast_rounds_until(
        &mut c,
        ("demo", &u),
        (PER, MIN_ROUNDS, MAX_ROUNDS),
        &migrate,
        |r| {
            json!({"op": "call", "topic": "demo", "server": u, "method": "add",
                   "args": {"a": r, "b": 1}, "timeout": 20})
        },
        |r, v| assert_eq!(v, &json!(r + 1)),
    )
    .await;
    let took = migrate.await.unwrap();
    drop(src);
    let n = round * PER;

    // The call that entered through A is still held in the guest; released
    // now (through B: the VM runs there), its reply comes out through B.
    let v = c
        .op(json!({"op": "call", "topic": "demo", "server": u, "method": "release", "timeout": 60}))
        .await;
    assert_eq!(v, json!({"ok": true, "result": 1}), "one call was held");
    let v = across.await.unwrap();
    assert_eq!(
        v,
        json!({"ok": true, "result": {"tag": "across"}}),
        "the call that entered through the source gets its reply\n{}",
        dst.console()
    );
    let b = cb.link(&u).await;
    assert!(
        b["replies_rerouted"].as_u64().unwrap_or(0) >= 1,
        "B forwarded the reply to a call it never delivered: {b}"
    );
    assert_eq!(ca.link(&u).await["established"], false);

    // Every cast handled exactly once: `tally` counts handled casts and
    // distinct `i`s; with every i in 0..n, both equal to n means each once.
    let t = Instant::now();
    let tally = loop {
        let v = c
            .op(json!({"op": "call", "topic": "demo", "server": u, "method": "tally", "timeout": 20}))
            .await;
        assert_eq!(v["ok"], true, "{v}");
        if v["result"]["handled"].as_u64().unwrap_or(0) >= n
            || t.elapsed() > Duration::from_secs(60)
        {
            break v["result"].clone();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        tally,
        json!({"handled": n, "distinct": n}),
        "every oslo cast handled exactly once across the migration\n{}",
        dst.console()
    );
    assert!(
        ok + timed_out == round && ok >= round - 2,
        "calls answered {ok}, timed out {timed_out} of {round}"
    );
    // The guest's own counters: redeliveries (A requeued what the guest
    // had not acknowledged when the link dropped) that it dropped.
    let g = cb
        .req(json!({"op": "call", "instance": u, "topic": "tether.agent", "method": "stats", "timeout_ms": 20_000}))
        .await;
    eprintln!(
        "migration {took:?}; {n} casts, {round} calls ({ok} answered, {timed_out} timed out); B: resent {}, duplicates {}, replies rerouted {}; guest dropped {} duplicate requests",
        b["resent"],
        b["duplicates"],
        b["replies_rerouted"],
        g["result"]["router"]["duplicates_dropped"]
    );
}

/// The echo sub-agent's `tally` of `record` casts, through the control socket.
async fn tally(ctl: &mut Ctl, u: &str) -> serde_json::Value {
    let v = ctl
        .req(json!({"op": "call", "instance": u, "topic": "demo", "method": "tally", "timeout_ms": 5_000}))
        .await;
    v["result"].clone()
}

/// A TCG guest boots, and streams, slowly on a loaded machine.
const BOOT_BOUND: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oslo_casts_into_a_vm_whose_agent_is_killed_mid_stream_are_each_handled_once() {
    const N: u64 = 1500;
    let url = amqp_url();
    let ex = unique("ex");
    let u = random_uuid();
    let w = World::new();
    let _proxy = w.proxy(&format!("{}{}", broker_section(&url, &ex), lab_policy("")));
    let vm = Vm::boot(w.dir.path(), "vm", &w.channels().join(format!("{u}.sock")));
    let mut c = OsloClient::start(&url, &ex);
    served(&mut c, "demo", &u).await;
    let mut ctl = w.ctl().await;
    let v = c
        .op(json!({"op": "casts", "topic": "demo", "server": u, "method": "record", "n": N}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    // kill -9 of the agent from inside the guest once a fifth is handled;
    // the guest's init starts it again (its journal and the echo
    // sub-agent's records are in /run, the VM's memory).
    let t = Instant::now();
    let at_kill = loop {
        let h = tally(&mut ctl, &u).await["handled"].as_u64().unwrap_or(0);
        if h >= N / 5 {
            break h;
        }
        assert!(
            t.elapsed() < BOOT_BOUND,
            "casts not handled\n{}",
            vm.console()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v = ctl
        .req(json!({"op": "start_agent", "instance": u, "name": "killer", "restart": "never", "timeout_ms": 5000,
                    "argv": ["/bin/busybox", "sh", "-c", "kill -9 $PPID"]}))
        .await;
    assert!(v.get("ok").is_some(), "{v}");
    vm.wait_console("agent exited with 137", BOOT_BOUND).await;
    let t = Instant::now();
    let last = loop {
        let v = tally(&mut ctl, &u).await;
        if v["handled"].as_u64().unwrap_or(0) >= N {
            break v;
        }
        assert!(
            t.elapsed() < BOOT_BOUND * 2,
            "not every cast handled after the restart: {v}\n{}",
            vm.console()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        last,
        json!({"handled": N, "distinct": N}),
        "every oslo cast handled exactly once across the agent's restart\n{}",
        vm.console()
    );
    let l = ctl.link(&u).await;
    assert!(l["peer_changes"].as_u64().unwrap() >= 2, "{l}");
    eprintln!("agent killed in the guest with {at_kill} of {N} oslo casts handled; {l}");
}
