//! What an operator's tools see of the daemons: systemd's notifications
//! (played by a datagram socket of the test's) and the log's format on a
//! file, a terminal, the journal and in JSON.

mod support;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

const U1: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

fn proxy_config(w: &World, channels: &Path, ctl: &Path) -> String {
    let cfg = w.path("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "channels_dir = {channels:?}\ncontrol_socket = {ctl:?}\n{}",
            lab_policy("")
        ),
    )
    .unwrap();
    cfg.to_str().unwrap().to_owned()
}

fn signal(p: &Proc, s: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid() as i32), s).unwrap();
}

/// READY=1 only once the proxy serves (its control socket answers the
/// moment READY arrives), STATUS= following its links, watchdog pings
/// while its main loop answers, RELOADING=1 then READY=1 around a SIGHUP,
/// STOPPING=1 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_is_ready_only_when_serving_and_tells_systemd_what_it_does() {
    let w = World::new();
    let notify = Notify::bind(&w.path("notify.sock"));
    let cfg = proxy_config(&w, &w.channels(), &w.ctl_sock());
    let mut proxy = spawn_env(
        "proxy",
        PROXY,
        &["-c", &cfg],
        w.dir.path(),
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let first = notify.next();
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    assert!(
        first
            .lines()
            .any(|l| l == "STATUS=0 of 0 instances linked; no broker"),
        "{first:?}"
    );
    // READY means serving: the control socket is there and answers.
    let mut ctl = Ctl::connect(&w.ctl_sock()).await;
    assert_eq!(ctl.req(json!({"op": "links"})).await["ok"], true);

    // STATUS follows the links.
    let _agent = w.agent(U1, &w.channels().join(format!("{U1}.sock")), "demo", "");
    notify.until("STATUS=1 of 1 instances linked; no broker");
    notify.until("WATCHDOG=1");

    signal(&proxy, nix::sys::signal::Signal::SIGHUP);
    let r = notify.until("RELOADING=1");
    assert!(r.contains("MONOTONIC_USEC="), "{r:?}");
    notify.until("READY=1");

    assert_eq!(proxy.terminate(), Some(0), "{}", proxy.log_text());
    notify.until("STOPPING=1");
}

/// A proxy that cannot watch its channels directory (it would serve no
/// VM) says why and exits, and never tells systemd it is ready.
#[test]
fn a_proxy_that_cannot_watch_its_channels_directory_does_not_start() {
    let w = World::new();
    let notify = Notify::bind(&w.path("notify.sock"));
    let not_a_dir = w.path("channels-is-a-file");
    std::fs::write(&not_a_dir, "").unwrap();
    let cfg = proxy_config(&w, &not_a_dir, &w.ctl_sock());
    let mut proxy = spawn_env(
        "proxy",
        PROXY,
        &["-c", &cfg],
        w.dir.path(),
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())],
    );
    let t = Instant::now();
    let status = loop {
        if let Some(st) = proxy.child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < BOUND, "it kept running: {}", proxy.log_text());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let log = proxy.log_text();
    assert!(
        log.contains("cannot watch the channels directory") && log.contains("channels-is-a-file"),
        "{log}"
    );
    assert!(notify.none_waiting(), "it told systemd something");
}

/// A proxy whose open-file limit is below what `max_links` needs says so
/// at start (systemd's default soft limit, 1024, against 10,000 links),
/// and still serves: a small host may never run that many VMs. With
/// `max_links` the same limit holds (100), it says nothing. (Only lowered
/// limits: raising one may be refused where the test runs.)
#[test]
fn a_proxy_warns_when_its_open_file_limit_cannot_hold_max_links() {
    let w = World::new();
    let cfg = proxy_config(&w, &w.channels(), &w.ctl_sock());
    let low = spawn(
        "proxy-low",
        "prlimit",
        &["--nofile=1024:1024", PROXY, "-c", &cfg],
        w.dir.path(),
    );
    wait_for_log(&low, "tether-proxy ready");
    let log = low.log_text();
    assert!(
        log.contains("open-file limit is below what max_links needs")
            && log.contains("limit=1024")
            && log.contains("links past about 704 VMs"),
        "{log}"
    );
    drop(low);
    let _ = std::fs::remove_file(w.ctl_sock());
    let small = w.path("proxy-small.toml");
    std::fs::write(
        &small,
        format!(
            "max_links = 100\n{}",
            std::fs::read_to_string(&cfg).unwrap()
        ),
    )
    .unwrap();
    let enough = spawn(
        "proxy-enough",
        "prlimit",
        &["--nofile=1024:1024", PROXY, "-c", small.to_str().unwrap()],
        w.dir.path(),
    );
    wait_for_log(&enough, "tether-proxy ready");
    assert!(
        !enough.log_text().contains("open-file limit"),
        "{}",
        enough.log_text()
    );
}

/// The agent: READY=1 with "waiting for the host", STATUS= as its host link
/// comes and goes, RELOADING=1 then READY=1 around a SIGHUP — and none of
/// systemd's variables in a sub-agent's environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_tells_systemd_about_its_host_link_and_keeps_its_variables_from_sub_agents() {
    let w = World::new();
    let notify = Notify::bind(&w.path("notify.sock"));
    let py = python3();
    let env_out = w.path("subagent-env.json");
    let cfg = w.path("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"port = "unix-listen:{}"
subagent_socket = {:?}
state_dir = {:?}
[supervisor]
allowed_executables = ["{py}"]
[[subagents]]
name = "envdump"
argv = ["{py}", "-c", "import json, os, sys, time; open(sys.argv[1] + '.tmp', 'w').write(json.dumps(dict(os.environ))); os.rename(sys.argv[1] + '.tmp', sys.argv[1]); time.sleep(600)", "{}"]
"#,
            w.channels().join(format!("{U1}.sock")).display(),
            w.path("agent.sock"),
            w.path("state"),
            env_out.display()
        ),
    )
    .unwrap();
    let agent = spawn_env(
        "agent",
        AGENT,
        &["-c", cfg.to_str().unwrap()],
        w.dir.path(),
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
            ("LISTEN_FDS", "0"),
        ],
    );
    let first = notify.next();
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    assert!(
        first.lines().any(|l| l == "STATUS=waiting for the host"),
        "{first:?}"
    );

    wait_for_path(&env_out);
    let env: Value = serde_json::from_str(&std::fs::read_to_string(&env_out).unwrap()).unwrap();
    assert!(env.get("TETHER_AGENT_SOCKET").is_some(), "{env}");
    for v in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
    ] {
        assert!(env.get(v).is_none(), "{v} reached the sub-agent: {env}");
    }

    let mut proxy = w.proxy("");
    notify.until("STATUS=linked to the host");
    notify.until("WATCHDOG=1");
    proxy.kill9();
    notify.until("STATUS=host link down: reconnecting (nothing is lost within the grace period)");

    signal(&agent, nix::sys::signal::Signal::SIGHUP);
    let r = notify.until("RELOADING=1");
    assert!(r.contains("MONOTONIC_USEC="), "{r:?}");
    notify.until("READY=1");
}

fn wait_for_log(p: &Proc, want: &str) {
    let t = Instant::now();
    while !p.log_text().contains(want) {
        assert!(t.elapsed() < BOUND, "no {want:?} in {}", p.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Read `f` until `want` is in what was read or it ends; bounded by BOUND.
fn read_until(mut f: std::fs::File, want: &'static str) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the other side of a terminal closes.
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&all).contains(want) {
                break;
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&all).into_owned());
    });
    rx.recv_timeout(BOUND).expect("nothing read in time")
}

/// Start a proxy with its stderr on a new terminal; what it wrote there
/// up to "tether-proxy ready".
fn proxy_on_a_terminal(w: &World, n: u32, env: &[(&str, &str)]) -> String {
    let pty = nix::pty::openpty(None, None).unwrap();
    let dir = w.path(&format!("tty{n}"));
    let cfg = proxy_config(w, &dir.join("channels"), &dir.join("ctl.sock"));
    let mut cmd = Command::new(PROXY);
    cmd.args(["-c", &cfg])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::from(pty.slave));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let _p = Proc {
        child: cmd.spawn().unwrap(),
        name: "proxy-tty".into(),
        log: w.path("none"),
    };
    drop(cmd); // our copy of the terminal's other side
    read_until(std::fs::File::from(pty.master), "tether-proxy ready")
}

/// Logs name their targets and carry no escape bytes off a terminal (a
/// file here, the journal in production; colours stay on a terminal unless
/// NO_COLOR); under journald (JOURNAL_STREAM names stderr) no timestamps;
/// with `--log-format json` / TETHER_LOG_FORMAT one JSON object per line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_name_targets_colour_only_terminals_leave_timestamps_to_journald_and_do_json() {
    use std::os::unix::fs::MetadataExt;
    let w = World::new();
    // To files: the linked pair's logs.
    let mut proxy = w.proxy("");
    let mut agent = w.agent(U1, &w.channels().join(format!("{U1}.sock")), "demo", "");
    let mut ctl = w.ctl().await;
    wait_linked(&mut ctl, U1, "demo").await;
    proxy.terminate();
    agent.terminate();
    // Who used the control socket, by the kernel's account (SO_PEERCRED).
    let log = proxy.log_text();
    let me = format!(
        "uid={} gid={}",
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    assert!(
        log.lines()
            .any(|l| l.contains("control client connected") && l.contains(&me)),
        "{log}"
    );
    for (p, target) in [(&proxy, "tether::host"), (&agent, "tether::guest")] {
        let log = p.log_text();
        assert!(
            !log.contains('\u{1b}'),
            "escape bytes in {}: {log:?}",
            p.name
        );
        assert!(
            log.contains(target),
            "no {target} target in {}: {log}",
            p.name
        );
        // A timestamp leads each line (RFC 3339, this century).
        let ready = log
            .lines()
            .find(|l| l.contains("ready"))
            .unwrap_or_default();
        assert!(ready.starts_with("20"), "{log}");
    }

    // On a terminal: colours, unless NO_COLOR.
    assert!(proxy_on_a_terminal(&w, 1, &[]).contains("\u{1b}["));
    let plain = proxy_on_a_terminal(&w, 2, &[("NO_COLOR", "1")]);
    assert!(
        !plain.contains('\u{1b}') && plain.contains("tether-proxy ready"),
        "{plain:?}"
    );

    // Under journald: the journal stamps each line, so the lines do not.
    let dir = w.path("journal");
    let log = w.path("journal.log");
    std::fs::File::create(&log).unwrap();
    let m = std::fs::metadata(&log).unwrap();
    let stream = format!("{}:{}", m.dev(), m.ino());
    let cfg = proxy_config(&w, &dir.join("channels"), &dir.join("ctl.sock"));
    // spawn_env truncates journal.log: the same inode, so the stream matches.
    let args = ["-c", cfg.as_str()];
    let mut p = spawn_env(
        "journal",
        PROXY,
        &args,
        w.dir.path(),
        &[("JOURNAL_STREAM", &stream)],
    );
    wait_for_log(&p, "tether-proxy ready");
    p.terminate();
    let text = p.log_text();
    assert!(text.contains("tether-proxy ready"), "{text}");
    assert!(
        text.lines().all(|l| l.trim_start().starts_with("INFO")
            || l.trim_start().starts_with("WARN")
            || l.trim_start().starts_with("ERROR")),
        "{text}"
    );

    // JSON, one object per line.
    let mut p = spawn_env(
        "json",
        PROXY,
        &args,
        w.dir.path(),
        &[("TETHER_LOG_FORMAT", "json")],
    );
    wait_for_log(&p, "tether-proxy ready");
    p.terminate();
    let text = p.log_text();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|v| v["fields"]["message"] == "tether-proxy ready"
                && v["level"] == "INFO"
                && v["target"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("tether::host"))
                && v["timestamp"].is_string()),
        "{text}"
    );
}

/// GET `path` from `addr`; the status line and the body.
async fn http(addr: &str, request: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut all = String::new();
    tokio::time::timeout(BOUND, s.read_to_string(&mut all))
        .await
        .expect("no response in time")
        .unwrap();
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// The Prometheus endpoint: links, the guest's counters and the broker's
/// state, in a format `promtool check metrics` (Debian's prometheus
/// package) passes without a lint; other paths and methods refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_is_scraped_and_passes_promtool() {
    let w = World::new();
    // PINGs every 100 ms of silence (default 5 s): the link's RTT is
    // measured soon after the call; the agent is asked for its numbers
    // every second (default a minute).
    let proxy = w.proxy(&format!(
        "metrics_listen = \"127.0.0.1:0\"\nagent_stats_interval_ms = 1000\n[link]\nping_interval = 100\n[broker]\ntransport_url = {:?}\ncontrol_exchange = \"{}\"\n",
        support::oslo::amqp_url(),
        support::oslo::unique("ex")
    ));
    let _agent = w.agent(U1, &w.channels().join(format!("{U1}.sock")), "demo", "");
    let mut ctl = w.ctl().await;
    wait_linked(&mut ctl, U1, "demo").await;
    support::oslo::broker_status_until(&mut ctl, "the broker", |v| v["connected"] == true).await;
    let v = ctl
        .req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "add", "args": {"a": 1, "b": 2}}))
        .await;
    assert_eq!(v["result"], 3, "{v}");
    let log = proxy.log_text();
    let addr = log
        .lines()
        .find(|l| l.contains("serving Prometheus metrics"))
        .and_then(|l| l.split("addr=").nth(1))
        .map(|a| a.split_whitespace().next().unwrap_or_default().to_string())
        .unwrap_or_else(|| panic!("no metrics address logged: {log}"));

    // The link's round trip, once a PING was answered (the first after
    // 100 ms of silence), and the agent's own numbers, once it was asked.
    let rtt_line = format!("tether_link_rtt_seconds{{instance=\"{U1}\"}} ");
    let agent_line = format!("tether_agent_topics{{instance=\"{U1}\"}} 1\n");
    let t = std::time::Instant::now();
    let body = loop {
        let (status, body) = http(&addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
        if body.contains(&rtt_line) && body.contains(&agent_line) {
            break body;
        }
        assert!(t.elapsed() < BOUND, "no RTT or agent numbers: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let rtt: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix(&rtt_line))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("RTT not a number: {body}"));
    assert!(rtt > 0.0 && rtt < BOUND.as_secs_f64(), "{rtt}");
    let links = ctl.req(json!({"op": "links"})).await;
    assert!(links["result"][0]["rtt_us"].as_u64().is_some(), "{links}");
    for want in [
        format!("tether_link_up{{instance=\"{U1}\"}} 1"),
        format!("tether_guest_topics{{instance=\"{U1}\"}} 1"),
        format!("tether_agent_requests_held{{instance=\"{U1}\"}} 0"),
        format!("tether_agent_calls_in_flight{{instance=\"{U1}\"}} 0"),
        format!("tether_agent_stats_age_seconds{{instance=\"{U1}\"}} "),
        "tether_instances 1".to_string(),
        "tether_broker_connected 1".to_string(),
        "tether_build_info{version=".to_string(),
    ] {
        assert!(body.contains(&want), "no {want:?} in {body}");
    }
    let sent = body
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "tether_link_frames_sent_total{{instance=\"{U1}\"}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no frames sent: {body}"));
    assert!(sent >= 1, "the call went out as a frame: {body}");

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test installs it)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let (status, _) = http(&addr, "GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _) = http(&addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
}
