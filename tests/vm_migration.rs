//! Live migration under traffic: two QEMU processes and two proxies with
//! their own channels directories, as on two hosts.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::vm::{Qmp, Vm};
use support::*;

const U: &str = "5a9d0c1e-7b2f-4c3d-9e8f-1a2b3c4d5e6f";
const N: u64 = 1500;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn linked(ctl: &mut Ctl, vm: &Vm) {
    let t = Instant::now();
    loop {
        let v = ctl.req(json!({"op": "links"})).await;
        if v["result"][0]["established"] == true && v["result"][0]["topics"] == json!(["demo"]) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{v}\n{}",
            vm.console()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_migration_under_traffic_loses_nothing_and_runs_nothing_twice() {
    let (host_a, host_b) = (World::new(), World::new());
    let _proxy_a = host_a.proxy("");
    let _proxy_b = host_b.proxy("");
    let src = Vm::boot(
        host_a.dir.path(),
        "src",
        &host_a.channels().join(format!("{U}.sock")),
    );
    let port = free_port();
    let dst = Vm::incoming(
        host_b.dir.path(),
        "dst",
        &host_b.channels().join(format!("{U}.sock")),
        port,
    );
    let mut a = host_a.ctl().await;
    linked(&mut a, &src).await;
    let mut b = host_b.ctl().await;

    let migrate = {
        let qmp = Vm::qmp_path(host_a.dir.path(), "src");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            let mut q = Qmp::connect(&qmp).await;
            let v = q.cmd(json!({"execute": "migrate", "arguments": {"uri": format!("tcp:127.0.0.1:{port}")}})).await;
            assert!(v.get("return").is_some(), "{v}");
            let t = Instant::now();
            loop {
                let v = q.cmd(json!({"execute": "query-migrate"})).await;
                match v["return"]["status"].as_str() {
                    Some("completed") => break,
                    Some("failed") | Some("cancelled") => panic!("migration {v}"),
                    _ => {}
                }
                assert!(
                    t.elapsed() < Duration::from_secs(120),
                    "migration did not complete"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = q.cmd(json!({"execute": "quit"})).await;
            t.elapsed()
        })
    };

    // Stream casts (and some calls) through host A; when A stops answering,
    // carry on through host B, retrying with the same unique ids.
    let mut on_b = false;
    let (mut calls_ok, mut calls_failed, mut retried) = (0, 0, 0);
    for i in 0..N {
        let cast = json!({"op": "cast", "instance": U, "topic": "demo", "method": "record",
                          "unique_id": format!("m-{i}"), "timeout_ms": if on_b { 20_000 } else { 1_500 }});
        loop {
            let v = if on_b {
                b.req(cast.clone()).await
            } else {
                a.req(cast.clone()).await
            };
            if v["ok"] == true {
                break;
            }
            assert!(!on_b, "cast {i} failed through the destination: {v}");
            on_b = true;
            retried += 1;
        }
        if i % 25 == 0 {
            let call = json!({"op": "call", "instance": U, "topic": "demo", "method": "add",
                              "args": {"a": i, "b": 1}, "timeout_ms": if on_b { 20_000 } else { 1_500 }});
            let v = if on_b {
                b.req(call).await
            } else {
                a.req(call).await
            };
            if v["ok"] == true {
                assert_eq!(v["result"], json!(i + 1));
                calls_ok += 1;
            } else {
                let k = v["error"]["kind"].as_str().unwrap();
                assert!(k == "timeout" || k == "not_connected", "{v}");
                calls_failed += 1;
            }
        }
    }
    let took = migrate.await.unwrap();
    assert!(
        on_b,
        "the stream never moved to the destination (migration too late?)"
    );
    linked(&mut b, &dst).await;
    let v = b.req(json!({"op": "call", "instance": U, "topic": "demo", "method": "count", "timeout_ms": 20_000})).await;
    assert_eq!(
        v["result"],
        json!(N),
        "every cast handled exactly once across the migration: {v}\n{}",
        dst.console()
    );
    eprintln!(
        "migration took {took:?}; {retried} cast(s) retried through the destination; calls ok {calls_ok}, failed cleanly {calls_failed}"
    );
}
