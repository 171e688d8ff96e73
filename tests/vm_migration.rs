//! Live migration under traffic: QEMU processes and proxies with their own
//! channels directories, as on two hosts — one migration, and back and forth.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::vm::{Qmp, Vm};
use support::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A host: its proxy and a control connection to it.
struct Host {
    world: World,
    _proxy: Proc,
    ctl: Ctl,
}

impl Host {
    async fn new() -> Self {
        let world = World::new();
        let proxy = world.proxy("");
        let ctl = world.ctl().await;
        Self {
            world,
            _proxy: proxy,
            ctl,
        }
    }

    fn chardev(&self, uuid: &str) -> PathBuf {
        self.world.channels().join(format!("{uuid}.sock"))
    }

    /// This proxy's view of the instance.
    async fn link(&mut self, uuid: &str) -> Value {
        let v = self.ctl.req(json!({"op": "links"})).await;
        v["result"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["instance"] == uuid)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Wait (bounded) until the instance is linked here with exactly the
    /// example sub-agent's topic registered.
    async fn linked(&mut self, uuid: &str, vm: &Vm) {
        let t = Instant::now();
        loop {
            let l = self.link(uuid).await;
            if l["established"] == true && l["topics"] == json!(["demo"]) {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "{l}\n{}\n{}",
                self.world.path("proxy.log").display(),
                vm.console()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Migrate the VM whose QMP socket is `qmp` to `port`; returns how long the
/// migration took once started. Quits the source when done.
fn migrate_after(delay: Duration, qmp: PathBuf, port: u16) -> tokio::task::JoinHandle<Duration> {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let mut q = Qmp::connect(&qmp).await;
        let v = q
            .cmd(json!({"execute": "migrate", "arguments": {"uri": format!("tcp:127.0.0.1:{port}")}}))
            .await;
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
        let took = t.elapsed();
        let _ = q.cmd(json!({"execute": "quit"})).await;
        took
    })
}

/// What one hop's stream saw.
#[derive(Debug, Default)]
struct Hop {
    /// Casts retried through the destination with the same unique id.
    retried: u64,
    calls_ok: u64,
    calls_failed: u64,
    /// From the last request answered through the source to the first
    /// answered through the destination, as the client saw it.
    gap: Duration,
}

/// Stream casts `ids` (and a call every 25) through `src`; when it stops
/// answering, carry on through `dst` retrying with the same unique ids.
async fn stream(uuid: &str, ids: std::ops::Range<u64>, src: &mut Ctl, dst: &mut Ctl) -> Hop {
    let mut hop = Hop::default();
    let mut on_dst = false;
    let mut last_src = Instant::now();
    let mut first_dst = None;
    let mut answered = |on_dst: bool, first_dst: &mut Option<Instant>| {
        if on_dst {
            first_dst.get_or_insert_with(Instant::now);
        } else {
            last_src = Instant::now();
        }
    };
    for i in ids {
        let timeout_ms = if on_dst { 20_000 } else { 1_500 };
        let cast = json!({"op": "cast", "instance": uuid, "topic": "demo", "method": "record",
                          "unique_id": format!("m-{i}"), "timeout_ms": timeout_ms});
        loop {
            let v = if on_dst {
                dst.req(cast.clone()).await
            } else {
                src.req(cast.clone()).await
            };
            if v["ok"] == true {
                answered(on_dst, &mut first_dst);
                break;
            }
            assert!(!on_dst, "cast {i} failed through the destination: {v}");
            eprintln!("cast {i} through the source: {v}; moving to the destination");
            on_dst = true;
            hop.retried += 1;
        }
        if i % 25 == 0 {
            let timeout_ms = if on_dst { 20_000 } else { 1_500 };
            let call = json!({"op": "call", "instance": uuid, "topic": "demo", "method": "add",
                              "args": {"a": i, "b": 1}, "timeout_ms": timeout_ms});
            let v = if on_dst {
                dst.req(call).await
            } else {
                src.req(call).await
            };
            if v["ok"] == true {
                assert_eq!(v["result"], json!(i + 1));
                answered(on_dst, &mut first_dst);
                hop.calls_ok += 1;
            } else {
                let k = v["error"]["kind"].as_str().unwrap();
                assert!(k == "timeout" || k == "not_connected", "{v}");
                hop.calls_failed += 1;
            }
        }
    }
    assert!(
        on_dst,
        "the stream never moved to the destination (migration too late?)"
    );
    hop.gap = first_dst.unwrap_or(last_src).duration_since(last_src);
    hop
}

async fn count(host: &mut Host, uuid: &str) -> Value {
    let v = host
        .ctl
        .req(json!({"op": "call", "instance": uuid, "topic": "demo", "method": "count", "timeout_ms": 20_000}))
        .await;
    v["result"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_migration_under_traffic_loses_nothing_and_runs_nothing_twice() {
    const U: &str = "5a9d0c1e-7b2f-4c3d-9e8f-1a2b3c4d5e6f";
    const N: u64 = 1500;
    let (mut a, mut b) = (Host::new().await, Host::new().await);
    let src = Vm::boot(a.world.dir.path(), "src", &a.chardev(U));
    let port = free_port();
    let dst = Vm::incoming(b.world.dir.path(), "dst", &b.chardev(U), port);
    a.linked(U, &src).await;

    let migrate = migrate_after(
        Duration::from_millis(800),
        Vm::qmp_path(a.world.dir.path(), "src"),
        port,
    );
    let hop = stream(U, 0..N, &mut a.ctl, &mut b.ctl).await;
    let took = migrate.await.unwrap();
    b.linked(U, &dst).await;
    assert_eq!(
        count(&mut b, U).await,
        json!(N),
        "every cast handled exactly once across the migration\n{}",
        dst.console()
    );
    eprintln!("migration took {took:?}; {hop:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_and_forth_six_times_under_traffic_loses_nothing_and_runs_nothing_twice() {
    const U: &str = "6b0e1d2f-8c3a-4d4e-8f90-2b3c4d5e6f70";
    const HOPS: u64 = 6;
    const PER_HOP: u64 = 400;
    let mut hosts = [Host::new().await, Host::new().await];
    let t0 = Instant::now();
    let mut vm = Vm::boot(hosts[0].world.dir.path(), "vm0", &hosts[0].chardev(U));
    hosts[0].linked(U, &vm).await;
    for n in 0..HOPS {
        let (s, d) = ((n % 2) as usize, ((n + 1) % 2) as usize);
        let port = free_port();
        let name = format!("vm{}", n + 1);
        let next = Vm::incoming(hosts[d].world.dir.path(), &name, &hosts[d].chardev(U), port);
        let migrate = migrate_after(
            Duration::from_millis(600),
            Vm::qmp_path(hosts[s].world.dir.path(), &format!("vm{n}")),
            port,
        );
        let [h0, h1] = &mut hosts;
        let (src, dst) = if s == 0 { (h0, h1) } else { (h1, h0) };
        let hop = stream(
            U,
            n * PER_HOP..(n + 1) * PER_HOP,
            &mut src.ctl,
            &mut dst.ctl,
        )
        .await;
        eprintln!("hop {n}: stream done at {:?}", t0.elapsed());
        let took = migrate.await.unwrap();
        eprintln!("hop {n}: migrated at {:?}", t0.elapsed());
        drop(std::mem::replace(&mut vm, next));
        dst.linked(U, &vm).await;
        eprintln!(
            "hop {n} at {:?}: migration took {took:?}; {hop:?}",
            t0.elapsed()
        );
    }
    let last = &mut hosts[(HOPS % 2) as usize];
    assert_eq!(
        count(last, U).await,
        json!(HOPS * PER_HOP),
        "every cast handled exactly once across {HOPS} migrations\n{}",
        vm.console()
    );
}
