//! Live migration under traffic: QEMU processes and proxies with their own
//! channels directories, as on two hosts — one migration, and back and forth.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::vm::{Vm, free_port, migrate_after};
use support::*;

/// A host: its proxy and a control connection to it.
struct Host {
    world: World,
    _proxy: Proc,
    ctl: Ctl,
}

impl Host {
    /// A proxy holding the cloud's reply `key` (shared by both hosts: the
    /// reply to a call that entered through the source is accepted by the
    /// destination only with the source's sealed handle).
    async fn new(key: &std::path::Path) -> Self {
        let world = World::new();
        let proxy = world.proxy(&format!(
            "[policy]\nreply_keys = [{key:?}]\n{}",
            lab_policy("")
        ));
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
        self.ctl.link(uuid).await
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

/// Casts streamed through the destination once the stream moved there.
const AFTER_MOVE: u64 = 50;

/// Stream casts numbered from `start` (and a call every 25) through `src`;
/// when it stops answering, carry on through `dst` retrying with the same
/// unique ids. At least `min` casts, and on until the stream moved and
/// [`AFTER_MOVE`] more went through the destination — however long the
/// migration takes (bounded). Returns what it saw and the next number.
async fn stream(uuid: &str, start: u64, min: u64, src: &mut Ctl, dst: &mut Ctl) -> (Hop, u64) {
    let mut hop = Hop::default();
    let began = Instant::now();
    let mut moved_at = None;
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
    let mut i = start;
    loop {
        if i >= start + min && moved_at.is_some_and(|m| i >= m + AFTER_MOVE) {
            break;
        }
        assert!(
            began.elapsed() < BOUND * 4,
            "the stream never moved to the destination (did the migration fail?)"
        );
        // Through the source until it stops answering, then through the
        // destination; a cast that failed through one side is tried through
        // the other with the same unique id (the guest runs it once). A
        // slow source is not a moved VM: the stream has moved only once the
        // destination answered.
        let mut via_dst = on_dst;
        loop {
            let timeout_ms = if via_dst { 20_000 } else { 1_500 };
            let cast = json!({"op": "cast", "instance": uuid, "topic": "demo", "method": "record",
                              "unique_id": format!("m-{i}"), "timeout_ms": timeout_ms});
            let v = if via_dst {
                dst.req(cast).await
            } else {
                src.req(cast).await
            };
            if v["ok"] == true {
                if via_dst && !on_dst {
                    on_dst = true;
                    moved_at = Some(i);
                }
                answered(on_dst, &mut first_dst);
                break;
            }
            assert!(!on_dst, "cast {i} failed through the destination: {v}");
            assert!(
                began.elapsed() < BOUND * 4,
                "cast {i} answered by neither side: {v}"
            );
            via_dst = !via_dst;
            hop.retried += 1;
        }
        if i.is_multiple_of(25) {
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
        i += 1;
    }
    hop.gap = first_dst.unwrap_or(last_src).duration_since(last_src);
    (hop, i)
}

/// The agent's own counters (its built-in `tether.agent` target).
async fn guest_stats(ctl: &mut Ctl, uuid: &str) -> Value {
    let v = ctl
        .req(json!({"op": "call", "instance": uuid, "topic": "tether.agent", "method": "stats", "timeout_ms": 20_000}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    v["result"].clone()
}

/// What one migration cost, from both proxies' and the guest's counters.
struct Measured {
    /// From the last frame the source's proxy received to the handshake
    /// through the destination's.
    frame_gap_ms: i64,
    /// DATA frames the guest sent again, and the destination proxy did.
    guest_resent: u64,
    host_resent: u64,
    /// Requests the guest dropped as already seen (the client's retries of
    /// casts that had arrived), and duplicate frames the destination dropped.
    guest_dups_dropped: u64,
    host_dup_frames: u64,
}

impl Measured {
    async fn after(before: Value, src: &mut Host, dst: &mut Host, uuid: &str) -> Self {
        let after = guest_stats(&mut dst.ctl, uuid).await;
        let (s, d) = (src.link(uuid).await, dst.link(uuid).await);
        let delta = |p: &str| {
            after.pointer(p).and_then(Value::as_u64).unwrap_or(0)
                - before.pointer(p).and_then(Value::as_u64).unwrap_or(0)
        };
        let ms = |l: &Value, k: &str| l[k].as_u64().unwrap_or(0) as i64;
        Self {
            frame_gap_ms: ms(&d, "up_since_unix_ms") - ms(&s, "last_frame_unix_ms"),
            guest_resent: delta("/link/resent"),
            host_resent: d["resent"].as_u64().unwrap_or(0),
            guest_dups_dropped: delta("/router/duplicates_dropped"),
            host_dup_frames: d["duplicates"].as_u64().unwrap_or(0),
        }
    }
}

impl std::fmt::Display for Measured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "last frame via source -> first via destination {} ms; re-sent: guest {}, destination proxy {} (cumulative); duplicates dropped: guest {} requests, destination proxy {} frames (cumulative)",
            self.frame_gap_ms,
            self.guest_resent,
            self.host_resent,
            self.guest_dups_dropped,
            self.host_dup_frames
        )
    }
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
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("reply.key");
    support::guest::reply_key(&key);
    let (mut a, mut b) = (Host::new(&key).await, Host::new(&key).await);
    let src = Vm::boot(a.world.dir.path(), "src", &a.chardev(U));
    let port = free_port();
    let dst = Vm::incoming(b.world.dir.path(), "dst", &b.chardev(U), port);
    a.linked(U, &src).await;
    let before = guest_stats(&mut a.ctl, U).await;
    let mut watch_b = b.world.ctl().await;
    assert_eq!(watch_b.req(json!({"op": "watch"})).await["ok"], true);

    // The clock of the call below starts once the destination can take
    // the migration (a loaded machine starts QEMU slowly).
    let t = Instant::now();
    while !support::vm::listening(port) {
        assert!(t.elapsed() < BOUND * 2, "the destination never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A call that enters through the source and is still running in the
    // guest when the VM moves (held there until the test releases it): its
    // reply comes out through the destination.
    let across = {
        let mut c = a.world.ctl().await;
        tokio::spawn(async move {
            c.req(
                json!({"op": "call", "instance": U, "topic": "demo", "method": "hold",
                         "args": {"tag": "across"}, "timeout_ms": 50_000}),
            )
            .await
        })
    };
    // The migration starts once the guest holds the call.
    wait_held(&mut a.ctl, U).await;
    let migrate = migrate_after(
        Duration::from_millis(800),
        Vm::qmp_path(a.world.dir.path(), "src"),
        port,
    );
    let (hop, sent) = stream(U, 0, N, &mut a.ctl, &mut b.ctl).await;
    let took = migrate.await.unwrap();
    b.linked(U, &dst).await;
    let v = b
        .ctl
        .req(json!({"op": "call", "instance": U, "topic": "demo", "method": "release", "timeout_ms": 60_000}))
        .await;
    assert_eq!(v["result"], 1, "one call was held: {v}");
    // The reply's sealed handle lasts as long as the caller waits (50 s: a
    // loaded machine's stream and migration take seconds, and the source's
    // caller must get its answer within the test's read bound, 60 s); read
    // it on the destination first, then the source caller's one answer.
    let reply = loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), watch_b.read())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the reply to the call that entered through the source never came out through the destination; its proxy's log:\n{}",
                    std::fs::read_to_string(b.world.path("proxy.log")).unwrap_or_default()
                )
            });
        // Other calls of the stream may cross the migration too: their
        // replies come out here as well. Wait for this one.
        if ev["event"]["reply"]["result"] == json!({"tag": "across"}) {
            break ev["event"]["reply"].clone();
        }
    };
    assert_eq!(reply["result"], json!({"tag": "across"}), "{reply}");
    let v = across.await.unwrap();
    assert!(
        v["ok"] == true || v["error"]["kind"] == "timeout" || v["error"]["kind"] == "not_connected",
        "the source's caller gets one clean answer: {v}"
    );
    assert_eq!(
        count(&mut b, U).await,
        json!(sent),
        "every cast handled exactly once across the migration\n{}",
        dst.console()
    );
    let m = Measured::after(before, &mut a, &mut b, U).await;
    eprintln!("migration {took:?}; {m}; {hop:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_and_forth_six_times_under_traffic_loses_nothing_and_runs_nothing_twice() {
    const U: &str = "6b0e1d2f-8c3a-4d4e-8f90-2b3c4d5e6f70";
    const HOPS: u64 = 6;
    const PER_HOP: u64 = 400;
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("reply.key");
    support::guest::reply_key(&key);
    let mut hosts = [Host::new(&key).await, Host::new(&key).await];
    let mut vm = Vm::boot(hosts[0].world.dir.path(), "vm0", &hosts[0].chardev(U));
    hosts[0].linked(U, &vm).await;
    let mut sent = 0;
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
        let before = guest_stats(&mut src.ctl, U).await;
        let (hop, next_id) = stream(U, sent, PER_HOP, &mut src.ctl, &mut dst.ctl).await;
        sent = next_id;
        let took = migrate.await.unwrap();
        drop(std::mem::replace(&mut vm, next));
        dst.linked(U, &vm).await;
        let m = Measured::after(before, src, dst, U).await;
        eprintln!("hop {n}: migration {took:?}; {m}; {hop:?}");
    }
    let last = &mut hosts[(HOPS % 2) as usize];
    assert_eq!(
        count(last, U).await,
        json!(sent),
        "every cast handled exactly once across {HOPS} migrations\n{}",
        vm.console()
    );
}
