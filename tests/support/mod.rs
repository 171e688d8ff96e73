//! Real daemons for integration tests: each process is killed by PID when
//! its guard drops, also when a test fails; every wait is bounded.
#![allow(dead_code)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Generous bound for anything that should take well under a second.
pub const BOUND: Duration = Duration::from_secs(30);

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL now (as `kill -9`), and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (bounded) for a clean exit; returns its status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t = Instant::now();
        while t.elapsed() < BOUND {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The most memory the process has held at once so far (VmHWM), KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn(name: &str, bin: &str, args: &[&str], dir: &Path) -> Proc {
    spawn_env(name, bin, args, dir, &[])
}

/// [`spawn`] with extra environment variables. The log file is created (or
/// truncated: same inode) as `dir/name.log`.
pub fn spawn_env(name: &str, bin: &str, args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("TETHER_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    Proc {
        child,
        name: name.into(),
        log,
    }
}

pub const PROXY: &str = env!("CARGO_BIN_EXE_tether-proxy");
pub const AGENT: &str = env!("CARGO_BIN_EXE_tether-agent");
pub const CTL: &str = env!("CARGO_BIN_EXE_tetherctl");

pub fn example_subagent() -> String {
    format!("{}/examples/subagent.py", env!("CARGO_MANIFEST_DIR"))
}

/// python3, required: a missing interpreter fails the test rather than skip it.
pub fn python3() -> String {
    let p = "/usr/bin/python3";
    assert!(
        Path::new(p).exists(),
        "python3 is required at {p} (apt-get install python3)"
    );
    p.into()
}

/// The policy of tests that are not about policy (the proxy's default is
/// `reply-only` with nothing allowed): every instance may register any
/// topic and cast or call any topic, server and method on the control
/// exchange; `request_id` passes from the guest's context. `extra` adds
/// keys to that profile.
pub fn lab_policy(extra: &str) -> String {
    format!(
        "[policy.profiles.default]\nmode = \"call\"\ntopics = [\"*\"]\ncontext_keys = [\"request_id\"]\n{extra}\n\
         [[policy.profiles.default.targets]]\ntopics = [\"*\"]\nservers = [\"*\"]\nmethods = [\"*\"]\n"
    )
}

/// A test world: a temp dir with a channels directory and a control socket.
pub struct World {
    pub dir: tempfile::TempDir,
}

/// A failed test keeps its directory — the daemons' logs, configs, records
/// — and says where.
impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "test failed: its files and daemon logs are kept in {}",
                self.dir.path().display()
            );
        }
    }
}

impl World {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("channels")).unwrap();
        Self { dir }
    }

    /// A world whose directory the user `nobody` can reach sockets in, with
    /// that user and the group `nogroup` (for clients run as them).
    pub fn for_nobody() -> (Self, nix::unistd::User, nix::unistd::Group) {
        use std::os::unix::fs::PermissionsExt;
        let w = Self::new();
        std::fs::set_permissions(w.path(""), std::fs::Permissions::from_mode(0o711)).unwrap();
        let nobody = nix::unistd::User::from_name("nobody")
            .unwrap()
            .expect("user nobody");
        let nogroup = nix::unistd::Group::from_name("nogroup")
            .unwrap()
            .expect("group nogroup");
        (w, nobody, nogroup)
    }

    /// A proxy (defaults) and an agent for `uuid` running the example
    /// sub-agent (topic `demo`), linked: the proxy, the agent and a control
    /// connection.
    pub async fn one_guest(&self, uuid: &str) -> (Proc, Proc, Ctl) {
        let proxy = self.proxy("");
        let port = self.channels().join(format!("{uuid}.sock"));
        let agent = self.agent(uuid, &port, "demo", "");
        let mut ctl = self.ctl().await;
        wait_linked(&mut ctl, uuid, "demo").await;
        (proxy, agent, ctl)
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn channels(&self) -> PathBuf {
        self.path("channels")
    }

    pub fn ctl_sock(&self) -> PathBuf {
        self.path("ctl.sock")
    }

    /// Start a proxy with `extra` config; [`lab_policy`] unless `extra`
    /// has a `[policy` section of its own.
    pub fn proxy(&self, extra: &str) -> Proc {
        let cfg = self.path("proxy.toml");
        let policy = if extra.contains("[policy") {
            String::new()
        } else {
            lab_policy("")
        };
        std::fs::write(
            &cfg,
            format!(
                "channels_dir = {:?}\ncontrol_socket = {:?}\n{extra}\n{policy}",
                self.channels(),
                self.ctl_sock()
            ),
        )
        .unwrap();
        // A proxy killed with -9 leaves its socket file behind.
        let _ = std::fs::remove_file(self.ctl_sock());
        let p = spawn(
            "proxy",
            PROXY,
            &["-c", cfg.to_str().unwrap()],
            self.dir.path(),
        );
        wait_for_path(&self.ctl_sock());
        p
    }

    /// Start an agent for `uuid` whose emulated port is at `port_path`, with
    /// the example sub-agent configured (topics `topics`).
    pub fn agent(&self, uuid: &str, port_path: &Path, topics: &str, extra: &str) -> Proc {
        let py = python3();
        let sock = self.path(&format!("agent-{uuid}.sock"));
        let cfg = self.path(&format!("agent-{uuid}.toml"));
        let record = self.record_path(uuid);
        // A topic nobody serves is refused after this grace (the product's
        // default, 30 s, would make such tests slow); a test that restarts
        // sub-agents under load sets its own in `extra`.
        let grace = if extra.contains("unserved_grace_ms") {
            ""
        } else {
            "unserved_grace_ms = 1000\n"
        };
        std::fs::write(
            &cfg,
            format!(
                r#"port = "unix-listen:{}"
subagent_socket = {:?}
state_dir = {:?}
{grace}{extra}
[supervisor]
allowed_executables = ["{py}"]
backoff_min_ms = 100
backoff_max_ms = 400
stop_grace_ms = 2000
[[subagents]]
name = "py"
argv = ["{py}", "{}"]
env = {{ SUBAGENT_TOPICS = "{topics}", SUBAGENT_RECORD = "{}" }}
"#,
                port_path.display(),
                sock,
                self.path(&format!("state-{uuid}")),
                example_subagent(),
                record.display()
            ),
        )
        .unwrap();
        spawn(
            &format!("agent-{uuid}"),
            AGENT,
            &["-c", cfg.to_str().unwrap()],
            self.dir.path(),
        )
    }

    /// An agent with no sub-agents of its own; returns it and its sub-agent socket.
    pub fn bare_agent(&self, uuid: &str) -> (Proc, PathBuf) {
        let sock = self.path(&format!("agent-{uuid}.sock"));
        let port = format!(
            "unix-listen:{}",
            self.channels().join(format!("{uuid}.sock")).display()
        );
        let p = spawn(
            &format!("agent-{uuid}"),
            AGENT,
            &[
                "--port",
                &port,
                "--subagent-socket",
                sock.to_str().unwrap(),
                "--state-dir",
                self.path(&format!("state-{uuid}")).to_str().unwrap(),
            ],
            self.dir.path(),
        );
        (p, sock)
    }

    /// A bare agent for `uuid` with one sub-agent connected through the
    /// client API (`name`, serving `topic`), linked to the proxy: returns
    /// the agent, the sub-agent and a control connection.
    pub async fn guest_with_sub_agent(
        &self,
        uuid: &str,
        name: &str,
        topic: &str,
    ) -> (Proc, tether::client::SubAgent, Ctl) {
        let (agent, sock) = self.bare_agent(uuid);
        wait_for_path(&sock);
        let sa = tether::client::SubAgent::connect(&sock, name, &[topic])
            .await
            .unwrap();
        let mut ctl = self.ctl().await;
        wait_linked(&mut ctl, uuid, topic).await;
        (agent, sa, ctl)
    }

    pub fn record_path(&self, uuid: &str) -> PathBuf {
        self.path(&format!("record-{uuid}.jsonl"))
    }

    /// The lines the example sub-agent recorded for `record` casts.
    /// (Without the `_uid` the sub-agent keeps its idempotency by.)
    pub fn recorded(&self, uuid: &str) -> Vec<Value> {
        jsonl(&self.record_path(uuid))
            .into_iter()
            .map(|mut v| {
                if let Some(o) = v.as_object_mut() {
                    o.remove("_uid");
                }
                v
            })
            .collect()
    }

    pub async fn ctl(&self) -> Ctl {
        Ctl::connect(&self.ctl_sock()).await
    }
}

/// systemd's notification socket, played by the test.
pub struct Notify {
    pub sock: UnixDatagram,
    pub path: PathBuf,
}

impl Notify {
    pub fn bind(path: &Path) -> Self {
        let sock = UnixDatagram::bind(path).unwrap();
        sock.set_read_timeout(Some(BOUND)).unwrap();
        Notify {
            sock,
            path: path.to_owned(),
        }
    }

    pub fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).expect("no notification in time");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Messages until one has `line` as a whole line; returns that one.
    pub fn until(&self, line: &str) -> String {
        let t = Instant::now();
        let mut seen = vec![];
        loop {
            assert!(t.elapsed() < BOUND, "no {line:?} among {seen:?}");
            let m = self.next();
            if m.lines().any(|l| l == line) {
                return m;
            }
            seen.push(m);
        }
    }

    /// Nothing waiting now.
    pub fn none_waiting(&self) -> bool {
        self.sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        let r = self.sock.recv(&mut buf);
        self.sock.set_nonblocking(false).unwrap();
        matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

pub fn wait_for_path(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(t.elapsed() < BOUND, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A control-socket client.
pub struct Ctl {
    r: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl Ctl {
    pub async fn connect(p: &Path) -> Self {
        let s = UnixStream::connect(p).await.unwrap();
        let (r, w) = s.into_split();
        Self {
            r: BufReader::new(r).lines(),
            w,
        }
    }

    pub async fn send_line(&mut self, line: &str) {
        self.w.write_all(line.as_bytes()).await.unwrap();
        self.w.write_all(b"\n").await.unwrap();
    }

    /// Write a line that the proxy may refuse mid-way (it closes the
    /// connection on an oversized request).
    pub async fn try_send_line(&mut self, line: &str) -> std::io::Result<()> {
        self.w.write_all(line.as_bytes()).await?;
        self.w.write_all(b"\n").await
    }

    pub async fn read(&mut self) -> Value {
        let l = tokio::time::timeout(BOUND * 2, self.r.next_line())
            .await
            .expect("no answer from the proxy")
            .unwrap()
            .expect("proxy closed the control connection");
        serde_json::from_str(&l).unwrap()
    }

    /// The next line, or None once the proxy closed the connection.
    pub async fn next(&mut self) -> Option<Value> {
        match self.r.next_line().await {
            Ok(Some(l)) => serde_json::from_str(&l).ok(),
            _ => None,
        }
    }

    /// Send `v`; its answer, or `None` if the proxy closed the connection.
    pub async fn next_req(&mut self, v: Value) -> Option<Value> {
        self.try_send_line(&v.to_string()).await.ok()?;
        self.next().await
    }

    pub async fn req(&mut self, v: Value) -> Value {
        self.send_line(&v.to_string()).await;
        self.read().await
    }

    /// The proxy's `links` entry for `uuid` (null if it has none).
    pub async fn link(&mut self, uuid: &str) -> Value {
        let v = self.req(json!({"op": "links"})).await;
        v["result"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["instance"] == uuid)
            .cloned()
            .unwrap_or(Value::Null)
    }
}

/// Wait (bounded) until the instance is linked with `topic` registered.
pub async fn wait_linked(ctl: &mut Ctl, uuid: &str, topic: &str) {
    wait_linked_for(ctl, uuid, topic, BOUND, String::new).await
}

/// Wait (bounded) until the echo sub-agent (`examples/echo_subagent.rs`)
/// of `instance`, asked through `ctl`, holds one call (its `hold` method):
/// the call that is to cross a migration has reached the guest.
pub async fn wait_held(ctl: &mut Ctl, instance: &str) {
    let t = Instant::now();
    loop {
        let v = ctl
            .req(json!({"op": "call", "instance": instance, "topic": "demo", "method": "held"}))
            .await;
        if v["result"] == 1 {
            return;
        }
        assert!(
            t.elapsed() < BOUND,
            "the call never reached the guest through this proxy: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`wait_linked`] with its own bound, and `context` added to the failure.
pub async fn wait_linked_for(
    ctl: &mut Ctl,
    uuid: &str,
    topic: &str,
    bound: Duration,
    context: impl Fn() -> String,
) {
    let t = Instant::now();
    loop {
        let v = ctl.req(json!({"op": "links"})).await;
        let ok = v["result"].as_array().into_iter().flatten().any(|l| {
            l["instance"] == uuid
                && l["established"] == true
                && l["topics"]
                    .as_array()
                    .is_some_and(|t| t.contains(&json!(topic)))
        });
        if ok {
            return;
        }
        assert!(
            t.elapsed() < bound,
            "instance {uuid} never linked with topic {topic}: {v}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a record of numbered requests shows against the `n` sent (each
/// `i` in 0..n): those handled more than once (with their count) and those
/// never handled.
pub fn twice_and_missing(
    handled: impl IntoIterator<Item = u64>,
    n: u64,
) -> (Vec<(u64, u32)>, Vec<u64>) {
    let mut seen = std::collections::BTreeMap::new();
    for i in handled {
        *seen.entry(i).or_insert(0u32) += 1;
    }
    let twice = seen
        .iter()
        .filter(|(_, k)| **k > 1)
        .map(|(i, k)| (*i, *k))
        .collect();
    let missing = (0..n).filter(|i| !seen.contains_key(i)).collect();
    (twice, missing)
}

/// The JSON lines of a file another process appends to while we read it
/// (a sub-agent's records, the proxy's audit), each complete line parsed;
/// none yet if the file is not there. A line counts once its newline is
/// written: a read can land in the middle of an append (one `write(2)` of a
/// line that crosses a page boundary is copied page by page, the file's
/// size growing after each), so what follows the last newline is a line
/// still being written and is left for the next read. A complete line that
/// is not JSON fails the test.
pub fn jsonl(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}) in {}: {l}", path.display()))
        })
        .collect()
}

pub mod guest;
pub mod image;
pub mod oslo;
pub mod vm;

pub fn uuid(n: u32) -> String {
    format!("{n:08x}-0000-4000-8000-000000000000")
}

/// A fresh random (version 4 shaped) instance uuid: tests that share the
/// broker never share an instance's queues, also across runs.
pub fn random_uuid() -> String {
    let (a, b) = (tether::random_u64(), tether::random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}
