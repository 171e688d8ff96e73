//! Containment: what one hostile guest costs the proxy and its neighbours,
//! against the same proxy idle in the same run.
//! - a good guest's call round trip (control socket → tether-proxy → the
//!   guest's link → back) idle, and while a hand-driven neighbour floods
//!   casts, random garbage, or headers announcing long payloads with bad
//!   checksums;
//! - the proxy's CPU seconds per MB of each hostile input;
//! - frames resent per second while the neighbour floods NACKs and HELLOs;
//! - the proxy's log bytes per second while the neighbour sends HELLOs with
//!   a new session id each;
//! - the proxy's RSS with 20 flooding neighbours against none.
//!
//! `cargo bench --bench containment` prints Markdown rows for
//! docs/BENCHMARKS.md; `-- --quick` does a fraction of the work;
//! `-- --only casts|garbage|headers` runs that one flood of the first table
//! and nothing else (to profile it: `TETHER_BENCH_FLOOD_SECS` lengthens it).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{Ctl, Daemon, cpu_secs, stats, wait};
use serde_json::json;
use tether::link::driver::UnixAcceptor;
use tether::link::frame::flags;
use tether::link::{Frame, FrameType, Hello, Link, LinkEvent, LinkOptions};
use tether::rpc::{Kind, LinkMsg, Reply, Request, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GOOD: &str = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";

fn proxy_with_log(dir: &Path) -> Daemon {
    std::fs::create_dir_all(dir.join("ch")).expect("channels dir");
    let log = std::fs::File::create(dir.join("proxy.log")).expect("log");
    // Every guest may serve any topic (the good one serves `good`); what
    // guests originate is denied (no targets): the default rate limits.
    let cfg = dir.join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "channels_dir = {:?}\ncontrol_socket = {:?}\n{}[policy.profiles.default]\ntopics = [\"*\"]\n",
            dir.join("ch"),
            dir.join("ctl.sock"),
            std::env::var("TETHER_BENCH_READ_RATE")
                .map(|r| format!("guest_read_bytes_per_sec = {r}\n"))
                .unwrap_or_default()
        ),
    )
    .expect("config");
    let d = Daemon(
        Command::new(env!("CARGO_BIN_EXE_tether-proxy"))
            .args(["-c", cfg.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tether-proxy"),
    );
    wait(&dir.join("ctl.sock"));
    d
}

fn rss_kib(pid: u32) -> u64 {
    common::status_kib(pid, "VmRSS:")
}

/// A well-behaved guest in this process: announces `good`, answers calls.
fn good_guest(dir: &Path) {
    let l = tokio::net::UnixListener::bind(dir.join("ch").join(format!("{GOOD}.sock"))).unwrap();
    let Link { tx, mut rx, task } = Link::spawn(
        UnixAcceptor::new(l),
        LinkOptions::default(),
        tether::random_session_id(),
    );
    tokio::spawn(async move {
        let _task = task;
        while let Some(ev) = rx.recv().await {
            match ev {
                LinkEvent::Up { .. } | LinkEvent::PeerChanged { .. } => {
                    let m = LinkMsg::Topics {
                        topics: vec!["good".into()],
                    };
                    let _ = tx.send(m.to_bytes()).await;
                }
                LinkEvent::Message(b) => {
                    if let Ok(LinkMsg::Req(r)) = LinkMsg::from_bytes(&b) {
                        let took = LinkMsg::Took {
                            unique_id: r.unique_id.clone(),
                        };
                        let _ = tx.send(took.to_bytes()).await;
                        if let Some(m) = r.msg_id {
                            let rep = LinkMsg::Rep(Reply::new(m, r.reply_to, Ok(json!("pong"))));
                            let _ = tx.send(rep.to_bytes()).await;
                        }
                    }
                }
                _ => {}
            }
        }
    });
}

async fn wait_linked(ctl: &mut Ctl, id: &str, topic: &str) {
    let t = Instant::now();
    loop {
        let v = ctl.req(&json!({"op": "links"})).await;
        let ok = v["result"].as_array().into_iter().flatten().any(|l| {
            l["instance"] == id
                && l["established"] == true
                && l["topics"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|x| x == topic))
        });
        if ok {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{id} never linked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn good_rtt(ctl: &mut Ctl, n: usize) -> Vec<Duration> {
    let req = json!({"op": "call", "instance": GOOD, "topic": "good", "method": "ping", "timeout_ms": 30_000});
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let v = ctl.req(&req).await;
        assert_eq!(v["result"], "pong", "{v}");
        out.push(t.elapsed());
    }
    out
}

/// A hand-driven guest: HELLO, then whatever `flood` writes, until stopped.
struct Hostile {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone, Copy)]
enum Flood {
    Casts,
    Garbage,
    BadHeaders,
    Rewinds,
    NewSessions,
}

fn hello(session: u64) -> Frame {
    let h = Hello {
        version: tether::link::hello::PROTOCOL_VERSION,
        capabilities: 0,
        session,
        peer_session: 0,
        next_expected: 1,
        send_base: 1,
        max_payload: 262_144,
        window_frames: 1024,
        window_bytes: 4 << 20,
    };
    Frame::new(FrameType::Hello, 0, h.encode())
}

/// The hostile guests run on a runtime of their own (one thread): in a
/// cloud a flooding guest is another VM, whose vCPU thread does not share
/// the good guest's task queue. (On this bench's two cores they still
/// compete for CPU with the proxy and the good guest.)
fn flood_runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("flood runtime")
    })
}

async fn hostile(dir: &Path, id: &str, flood: Flood) -> Hostile {
    let path = dir.join("ch").join(format!("{id}.sock"));
    flood_runtime()
        .spawn(hostile_here(path, flood))
        .await
        .expect("hostile guest")
}

async fn hostile_here(path: std::path::PathBuf, flood: Flood) -> Hostile {
    let l = tokio::net::UnixListener::bind(path).unwrap();
    let (s, _) = l.accept().await.expect("the proxy connects");
    let (mut r, mut w) = s.into_split();
    // It reads what the proxy sends and acknowledges it (the ACK rides on
    // its next write), as a real peer does: a flood's refusals then come
    // back to it instead of backing up in its own outbox and receive queue.
    // The rewind flood does not: it needs a window the proxy must resend.
    // It also sends again from where a NACK says (the proxy drops what it
    // cannot take while it waits for this guest's ACKs).
    let acks = !matches!(flood, Flood::Rewinds);
    let acked = Arc::new(AtomicU64::new(0));
    let resume = Arc::new(AtomicU64::new(0));
    let (got, nacked) = (acked.clone(), resume.clone());
    tokio::spawn(async move {
        use tokio_util::codec::Decoder;
        let mut codec = tether::link::FrameCodec::new(262_144);
        let mut b = BytesMut::with_capacity(65536);
        while let Ok(n) = r.read_buf(&mut b).await {
            if n == 0 {
                break;
            }
            while let Ok(Some(f)) = codec.decode(&mut b) {
                if f.kind == FrameType::Data {
                    got.fetch_max(f.seq, Ordering::Relaxed);
                } else if f.kind == FrameType::Ack && f.flags & flags::NACK != 0 {
                    nacked.store(f.ack + 1, Ordering::Relaxed);
                }
            }
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (st, se) = (stop.clone(), sent.clone());
    let session = tether::random_session_id();
    let task = tokio::spawn(async move {
        let mut buf = BytesMut::new();
        hello(session).encode_into(&mut buf);
        let _ = w.write_all(&buf).await;
        let mut seq = 1u64;
        let mut rng = tether::testing::SplitMix64::new(7);
        let long = {
            let mut b = BytesMut::new();
            Frame::new(
                FrameType::Data,
                0,
                bytes::Bytes::from(vec![0u8; 200 * 1024]),
            )
            .encode_into(&mut b);
            b.split_to(36)
        };
        let mut n_session = session;
        while !st.load(Ordering::Relaxed) {
            buf.clear();
            let from = resume.swap(0, Ordering::Relaxed);
            if acks && from != 0 {
                seq = from;
            }
            for _ in 0..64 {
                match flood {
                    Flood::Casts => {
                        let r = Request {
                            kind: Kind::Cast,
                            target: Target {
                                topic: "t".into(),
                                ..Default::default()
                            },
                            method: "m".into(),
                            args: json!({"x": 1}),
                            ctx: json!({}),
                            msg_id: None,
                            unique_id: format!("{seq}"),
                            reply_to: None,
                            timeout_ms: None,
                        };
                        let mut f = Frame::new(FrameType::Data, 0, LinkMsg::Req(r).to_bytes());
                        f.seq = seq;
                        seq += 1;
                        f.encode_into(&mut buf);
                    }
                    Flood::Garbage => {
                        for _ in 0..128 {
                            buf.extend_from_slice(&rng.next_u64().to_le_bytes());
                        }
                    }
                    Flood::BadHeaders => buf.extend_from_slice(&long),
                    Flood::Rewinds => {
                        let mut f = Frame::new(FrameType::Ack, 0, bytes::Bytes::new());
                        f.flags = flags::NACK;
                        f.encode_into(&mut buf);
                        hello(session).encode_into(&mut buf);
                    }
                    Flood::NewSessions => {
                        n_session = n_session.wrapping_add(1).max(1);
                        hello(n_session).encode_into(&mut buf);
                    }
                }
            }
            if acks {
                Frame::new(
                    FrameType::Ack,
                    acked.load(Ordering::Relaxed),
                    bytes::Bytes::new(),
                )
                .encode_into(&mut buf);
            }
            if w.write_all(&buf).await.is_err() {
                break;
            }
            se.fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
    });
    Hostile { stop, sent, task }
}

impl Hostile {
    /// Bytes written so far.
    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.sent.load(Ordering::Relaxed)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let n = if quick { 100 } else { 5000 };
    let rt = tether::daemon::runtime().expect("runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let proxy = proxy_with_log(dir.path());
        let pid = proxy.0.id();
        let mut ctl = Ctl::new(&dir.path().join("ctl.sock")).await;
        good_guest(dir.path());
        wait_linked(&mut ctl, GOOD, "good").await;
        let _ = good_rtt(&mut ctl, n / 10).await; // warm-up
        let idle_rss = rss_kib(pid);
        let flood_secs = std::env::var("TETHER_BENCH_FLOOD_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(if quick { 0.5 } else { 3.0 });
        println!("| neighbour | good guest's call RTT p50 / p99, idle just before | same, under the flood | p99 / idle p99 | proxy CPU per MB of hostile input (flood alone) | hostile input read |");
        println!("|---|---|---|---|---|---|");
        let floods = [
            ("casts", "cast flood (denied by its policy)", Flood::Casts),
            ("garbage", "random garbage", Flood::Garbage),
            ("headers", "long headers with bad checksums", Flood::BadHeaders),
        ];
        for (i, (name, what, f)) in floods.iter().enumerate() {
            if only.as_ref().is_some_and(|o| o != name) {
                continue;
            }
            // The idle baseline right before each flood, so that the
            // machine's state (frequency, other work) is the same.
            let idle = stats(good_rtt(&mut ctl, n).await);
            let id = format!("00000000-0000-4000-8000-00000000000{i}");
            let h = hostile(dir.path(), &id, *f).await;
            let s = stats(good_rtt(&mut ctl, n).await);
            // The proxy's CPU for the flood alone: no good calls meanwhile.
            let l0 = links_of(&mut ctl, &id).await;
            let (cpu0, sent0, t) = (cpu_secs(pid), h.sent(), Instant::now());
            tokio::time::sleep(Duration::from_secs_f64(flood_secs)).await;
            let (cpu, mb) = (cpu_secs(pid) - cpu0, (h.sent() - sent0) as f64 / 1e6);
            let secs = t.elapsed().as_secs_f64();
            let l1 = links_of(&mut ctl, &id).await;
            h.stop().await;
            // What the proxy did with the casts: refused them, or dropped
            // them unread for the guest to resend (which would make the
            // CPU per MB look better than handling them costs).
            let delta = |k: &str| l1[k].as_u64().unwrap_or(0) - l0[k].as_u64().unwrap_or(0);
            eprintln!(
                "{what}: {:.0} denied/s, {:.0} DATA frames/s dropped unread (discarded_full)",
                delta("denied") as f64 / secs,
                delta("discarded_full") as f64 / secs
            );
            println!(
                "| {what} | {:.0} / {:.0} µs | {:.0} / {:.0} µs | {:.2} | {:.4} CPU-s/MB | {:.1} MB/s |",
                idle.1,
                idle.2,
                s.1,
                s.2,
                s.2 / idle.2,
                cpu / mb.max(1e-9),
                mb / secs
            );
        }
        if only.is_some() {
            return;
        }
        // Resends under a NACK + HELLO flood: casts into the hostile guest
        // (never acknowledged) give the proxy a window to resend.
        let id = "00000000-0000-4000-8000-0000000000aa";
        let h = hostile(dir.path(), id, Flood::Rewinds).await;
        let mut casts = Ctl::new(&dir.path().join("ctl.sock")).await;
        for i in 0..64 {
            casts.send(&json!({"id": i, "op": "cast", "instance": id, "topic": "t", "method": "m", "timeout_ms": 1}))
                .await;
        }
        let before = links_of(&mut ctl, id).await["resent"].as_u64().unwrap_or(0);
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(if quick { 1 } else { 5 })).await;
        let after = links_of(&mut ctl, id).await["resent"].as_u64().unwrap_or(0);
        let sent = h.stop().await;
        println!(
            "\nNACK + HELLO flood ({:.1} MB/s of them): {:.0} frames resent per second (window: 64 frames queued)",
            sent as f64 / 1e6 / t.elapsed().as_secs_f64(),
            (after - before) as f64 / t.elapsed().as_secs_f64()
        );
        // Log volume under HELLOs with a new session id each.
        let id = "00000000-0000-4000-8000-0000000000bb";
        let log0 = std::fs::metadata(dir.path().join("proxy.log")).map_or(0, |m| m.len());
        let h = hostile(dir.path(), id, Flood::NewSessions).await;
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(if quick { 1 } else { 5 })).await;
        let sent = h.stop().await;
        let log1 = std::fs::metadata(dir.path().join("proxy.log")).map_or(0, |m| m.len());
        let secs = t.elapsed().as_secs_f64();
        println!(
            "new-session HELLO flood ({:.0} HELLOs/s): the proxy logged {:.0} bytes/s",
            sent as f64 / 88.0 / secs,
            (log1 - log0) as f64 / secs
        );
        // RSS with 20 flooding neighbours.
        let mut hs = vec![];
        for i in 0..20 {
            let id = format!("00000000-0000-4000-8000-0000000001{i:02}");
            hs.push(hostile(dir.path(), &id, Flood::Casts).await);
        }
        tokio::time::sleep(Duration::from_secs(if quick { 1 } else { 5 })).await;
        let busy_rss = rss_kib(pid);
        for h in hs {
            h.stop().await;
        }
        println!(
            "proxy RSS: {idle_rss} KiB with one good guest; {busy_rss} KiB with 20 neighbours flooding casts ({:.0} KiB each)",
            busy_rss.saturating_sub(idle_rss) as f64 / 20.0
        );
        drop(proxy);
    });
}

async fn links_of(ctl: &mut Ctl, id: &str) -> serde_json::Value {
    let v = ctl.req(&json!({"op": "links"})).await;
    v["result"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["instance"] == id)
        .cloned()
        .unwrap_or_default()
}
