//! What the benchmarks share: daemons killed on drop, a control-socket
//! client, summary statistics.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

pub struct Daemon(pub Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn proxy(dir: &Path) -> Daemon {
    // The channels directory exists before anything binds in it.
    std::fs::create_dir_all(dir.join("ch")).expect("channels dir");
    let d = Daemon(
        Command::new(env!("CARGO_BIN_EXE_tether-proxy"))
            .args([
                "--channels-dir",
                dir.join("ch").to_str().unwrap(),
                "--control-socket",
                dir.join("ctl.sock").to_str().unwrap(),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tether-proxy"),
    );
    wait(&dir.join("ctl.sock"));
    d
}

pub fn wait(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub struct Ctl {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl Ctl {
    pub async fn new(p: &Path) -> Self {
        let (r, w) = UnixStream::connect(p)
            .await
            .expect("control socket")
            .into_split();
        Self {
            lines: BufReader::new(r).lines(),
            w,
        }
    }
    pub async fn req(&mut self, v: &Value) -> Value {
        self.send(v).await;
        self.recv().await
    }
    /// `n` requests `v` in turn, each timed from its write to its answer;
    /// every answer must be `ok`.
    pub async fn timed(&mut self, v: &Value, n: usize) -> Vec<Duration> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let back = self.req(v).await;
            out.push(t.elapsed());
            assert_eq!(back["ok"], true, "{back}");
        }
        out
    }
    /// Write one request (answers come back in any order, by `id`).
    pub async fn send(&mut self, v: &Value) {
        self.w
            .write_all(format!("{v}\n").as_bytes())
            .await
            .expect("write");
    }
    pub async fn recv(&mut self) -> Value {
        let l = self.lines.next_line().await.expect("read").expect("eof");
        serde_json::from_str(&l).expect("json")
    }
}

/// Mean, median and 99th percentile in microseconds.
pub fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    (us(mean), us(v[v.len() / 2]), us(v[(v.len() * 99) / 100]))
}

/// CPU seconds the process has used (utime + stime, from /proc).
pub fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}

/// A `/proc/PID/status` field in KiB (`VmRSS:`, `VmHWM:`), or 0.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The number after `name` on the bench's command line (`--guests 1000`).
pub fn arg(name: &str) -> Option<usize> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}
