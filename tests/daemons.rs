//! tether-proxy, tether-agent and tetherctl as real processes over real
//! sockets, with the example Python sub-agent: round trips, errors, the
//! supervisor, and bad input from every side.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const U1: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";
const U2: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

async fn one_guest(w: &World) -> (Proc, Proc, Ctl) {
    let proxy = w.proxy("");
    let agent = w.agent(U1, &w.channels().join(format!("{U1}.sock")), "demo", "");
    let mut ctl = w.ctl().await;
    wait_linked(&mut ctl, U1, "demo").await;
    (proxy, agent, ctl)
}

#[tokio::test]
async fn call_cast_fanout_and_errors() {
    let w = World::new();
    let (_proxy, _agent, mut ctl) = one_guest(&w).await;
    let _agent2 = w.agent(U2, &w.channels().join(format!("{U2}.sock")), "demo", "");
    wait_linked(&mut ctl, U2, "demo").await;

    let v = ctl
        .req(json!({"id": 7, "op": "call", "instance": U1, "topic": "demo", "method": "add", "args": {"a": 2, "b": 40}}))
        .await;
    assert_eq!(v, json!({"id": 7, "ok": true, "result": 42}));

    // A sub-agent exception comes back with its class and module.
    let v = ctl
        .req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "fail", "args": {"message": "boom"}}))
        .await;
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["kind"], "remote");
    assert_eq!(v["error"]["class"], "ValueError");
    assert_eq!(v["error"]["module"], "builtins");
    assert_eq!(v["error"]["message"], "boom");

    // The agent's own topic: `ping` answers its arguments, as they came;
    // other methods are refused by name.
    let v = ctl
        .req(json!({"op": "call", "instance": U1, "topic": "tether.agent", "method": "ping", "args": {"id": 7, "s": "é"}}))
        .await;
    assert_eq!(v["result"], json!({"id": 7, "s": "é"}), "{v}");
    let v = ctl
        .req(json!({"op": "call", "instance": U1, "topic": "tether.agent", "method": "nope"}))
        .await;
    assert_eq!(v["error"]["class"], "NoSuchMethod", "{v}");

    // Unknown method, unknown topic, unknown instance.
    let v = ctl
        .req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "nope"}))
        .await;
    assert_eq!(v["error"]["class"], "NotImplementedError");
    let v = ctl
        .req(json!({"op": "call", "instance": U1, "topic": "nobody", "method": "x"}))
        .await;
    assert_eq!(v["error"]["class"], "NoSuchTopic");
    let v = ctl
        .req(json!({"op": "call", "instance": uuid(9), "topic": "demo", "method": "x"}))
        .await;
    assert_eq!(v["error"]["kind"], "not_connected");
    // A cast to a topic nobody serves waits the agent's grace for a
    // sub-agent to register it (1 s here), then is refused explicitly.
    let v = ctl
        .req(json!({"op": "cast", "instance": U1, "topic": "nobody", "method": "x"}))
        .await;
    assert_eq!(v["error"]["kind"], "refused", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("NoSuchTopic"),
        "{v}"
    );

    // Casts: acknowledged, handled once even when retried with the same unique id.
    for _ in 0..3 {
        let v = ctl
            .req(json!({"op": "cast", "instance": U1, "topic": "demo", "method": "record", "args": {"n": 1}, "unique_id": "fixed-1"}))
            .await;
        assert_eq!(v["ok"], true, "{v}");
    }
    // A call after the casts returns after they were handled (casts run in order).
    ctl.req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "echo"}))
        .await;
    assert_eq!(w.recorded(U1), vec![json!({"n": 1})]);

    // Fanout reaches both instances once.
    let v = ctl
        .req(json!({"op": "fanout", "topic": "demo", "method": "record", "args": {"f": 1}}))
        .await;
    assert_eq!(v["result"]["delivered"].as_array().unwrap().len(), 2, "{v}");
    for u in [U1, U2] {
        ctl.req(json!({"op": "call", "instance": u, "topic": "demo", "method": "echo"}))
            .await;
        assert!(
            w.recorded(u).contains(&json!({"f": 1})),
            "fanout missed {u}"
        );
    }
}

fn tetherctl(w: &World, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(CTL)
        .arg("--socket")
        .arg(w.ctl_sock())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test]
async fn tetherctl_output_and_exit_codes() {
    let w = World::new();
    let (_proxy, _agent, _ctl) = one_guest(&w).await;
    let (c, out, _) = tetherctl(
        &w,
        &["call", U1, "demo", "add", "--args", r#"{"a":1,"b":2}"#],
    );
    assert_eq!((c, out.trim()), (0, "3"));
    let (c, out, _) = tetherctl(
        &w,
        &[
            "--json",
            "call",
            U1,
            "demo",
            "add",
            "--args",
            r#"{"a":1,"b":2}"#,
        ],
    );
    assert_eq!(c, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["result"],
        3
    );
    let (c, _, err) = tetherctl(&w, &["call", U1, "demo", "fail"]);
    assert_eq!(c, 1, "remote error");
    assert!(err.contains("ValueError"), "{err}");
    let (c, _, _) = tetherctl(
        &w,
        &[
            "--timeout-ms",
            "300",
            "call",
            U1,
            "demo",
            "sleep",
            "--args",
            r#"{"seconds":5}"#,
        ],
    );
    assert_eq!(c, 3, "timeout");
    let (c, _, err) = tetherctl(&w, &["call", &uuid(5), "demo", "x"]);
    assert_eq!(c, 4, "not connected");
    assert!(
        err.contains("tetherctl links"),
        "says what to do next: {err}"
    );
    let (c, _, err) = tetherctl(&w, &["call", U1, "demo", "x", "--args", "not json"]);
    assert_eq!(c, 2, "bad usage");
    assert!(err.contains("--args"), "{err}");
    let (c, out, _) = tetherctl(&w, &["links"]);
    assert_eq!(c, 0);
    assert!(out.contains(U1) && out.contains("linked"), "{out}");
    let (c, out, _) = tetherctl(&w, &["cast", U1, "demo", "record"]);
    assert_eq!(c, 0);
    assert!(out.contains("delivered"), "{out}");
    // The global options go before or after the subcommand.
    let (c, out, err) = tetherctl(&w, &["links", "--json", "--timeout-ms", "5000"]);
    assert_eq!(c, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["result"][0]["instance"], U1, "{v}");
    // restart-agent: the same sub-agent, a new process, serving again.
    let pid_of = |w: &World| {
        let (c, out, err) = tetherctl(w, &["agents", U1, "--json"]);
        assert_eq!(c, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["result"][0]["pid"].as_u64().unwrap()
    };
    let before = pid_of(&w);
    let (c, out, err) = tetherctl(&w, &["restart-agent", U1, "py"]);
    assert_eq!(c, 0, "{out}{err}");
    assert!(out.contains("running"), "{out}");
    assert_ne!(pid_of(&w), before, "a new process");
    let mut ctl = w.ctl().await;
    wait_linked(&mut ctl, U1, "demo").await;
    let t = std::time::Instant::now();
    loop {
        let (c, out, _) = tetherctl(
            &w,
            &["call", U1, "demo", "add", "--args", r#"{"a":2,"b":2}"#],
        );
        if c == 0 {
            assert_eq!(out.trim(), "4");
            break;
        }
        assert!(t.elapsed() < BOUND, "the restarted sub-agent never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (c, _, err) = tetherctl(&w, &["restart-agent", U1, "nobody-by-this-name"]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("nobody-by-this-name"), "{err}");
    // Exit codes are in --help.
    let (c, out, _) = tetherctl(&w, &["--help"]);
    assert_eq!(c, 0);
    assert!(
        out.contains("Exit codes:") && out.contains("5  the proxy could not be reached"),
        "{out}"
    );
    // No proxy at all.
    let out = std::process::Command::new(CTL)
        .args(["--socket", "/nonexistent/ctl.sock", "links"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is tether-proxy running?"));
}

/// A proxy that takes no connection (out of descriptors: its backlog holds
/// the caller's) does not hang tetherctl: it gives up after its bound and
/// says what to check.
#[tokio::test]
async fn tetherctl_gives_up_on_a_proxy_that_never_answers() {
    let w = World::new();
    let path = w.path("silent.sock");
    // Listening, never accepting.
    let _silent = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let run = tokio::process::Command::new(CTL)
        .arg("--socket")
        .arg(&path)
        .arg("links")
        .kill_on_drop(true)
        .output();
    // tetherctl's own bound for `links` is 30 s; this one only catches a hang.
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("tetherctl hung on a silent proxy")
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("answered nothing in 30 s"), "{err}");
}

fn zombies_of(pid: u32) -> Vec<String> {
    let mut z = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(after) = stat.rsplit_once(") ").map(|x| x.1) else {
            continue;
        };
        let f: Vec<&str> = after.split(' ').collect();
        if f.len() > 1 && f[0] == "Z" && f[1] == pid.to_string() {
            z.push(stat);
        }
    }
    z
}

#[tokio::test]
async fn supervisor_start_stop_crash_restart_without_zombies() {
    let w = World::new();
    let (_proxy, agent, mut ctl) = one_guest(&w).await;
    let py = python3();
    let sub = example_subagent();

    // Start a second sub-agent serving another topic, use it, stop it.
    let v = ctl
        .req(
            json!({"op": "start_agent", "instance": U1, "name": "second", "argv": [py, sub],
                    "env": {"SUBAGENT_TOPICS": "second"}, "restart": "never"}),
        )
        .await;
    assert_eq!(v["result"]["state"], "running", "{v}");
    wait_linked(&mut ctl, U1, "second").await;
    let v = ctl.req(json!({"op": "call", "instance": U1, "topic": "second", "method": "add", "args": {"a": 1, "b": 1}})).await;
    assert_eq!(v["result"], 2);
    let v = ctl
        .req(json!({"op": "stop_agent", "instance": U1, "name": "second"}))
        .await;
    assert_eq!(v["result"]["state"], "stopped", "{v}");
    let v = ctl.req(json!({"op": "call", "instance": U1, "topic": "second", "method": "add", "args": {"a": 1, "b": 1}})).await;
    assert_eq!(
        v["error"]["class"], "NoSuchTopic",
        "stopped sub-agent unregistered: {v}"
    );

    // Not on the allow-list.
    let v = ctl.req(json!({"op": "start_agent", "instance": U1, "name": "evil", "argv": ["/bin/sh", "-c", "true"]})).await;
    assert_eq!(v["error"]["class"], "SupervisorError");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("allowed_executables"),
        "{v}"
    );
    // Duplicate name while running.
    let v = ctl.req(json!({"op": "start_agent", "instance": U1, "name": "py", "argv": [python3(), example_subagent()]})).await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already running"),
        "{v}"
    );

    // Crash: the configured sub-agent (on-failure) exits with 3, is restarted
    // after its backoff, and serves again.
    let v = ctl.req(json!({"op": "cast", "instance": U1, "topic": "demo", "method": "exit", "args": {"code": 3}})).await;
    assert_eq!(v["ok"], true);
    let t = std::time::Instant::now();
    loop {
        let v = ctl.req(json!({"op": "agents", "instance": U1})).await;
        let py = v["result"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "py")
            .cloned()
            .unwrap();
        if py["restarts"].as_u64() >= Some(1) && py["state"] == "running" {
            assert!(py["last_exit"].as_str().unwrap().contains('3'), "{py}");
            break;
        }
        assert!(t.elapsed() < BOUND, "not restarted: {py}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_linked(&mut ctl, U1, "demo").await;
    let v = ctl.req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "add", "args": {"a": 5, "b": 5}})).await;
    assert_eq!(v["result"], 10);
    assert!(
        zombies_of(agent.pid()).is_empty(),
        "zombies: {:?}",
        zombies_of(agent.pid())
    );
}

#[tokio::test]
async fn a_slow_sub_agent_does_not_delay_another() {
    let w = World::new();
    let (_proxy, _agent, mut ctl) = one_guest(&w).await;
    let v = ctl
        .req(json!({"op": "start_agent", "instance": U1, "name": "fast", "argv": [python3(), example_subagent()],
                    "env": {"SUBAGENT_TOPICS": "fast"}}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    wait_linked(&mut ctl, U1, "fast").await;
    // The slow call goes first on the same connection; the fast one must come back first.
    ctl.send_line(&json!({"id": "slow", "op": "call", "instance": U1, "topic": "demo", "method": "sleep", "args": {"seconds": 5}}).to_string()).await;
    ctl.send_line(&json!({"id": "slow-same-agent", "op": "call", "instance": U1, "topic": "demo", "method": "add", "args": {"a": 1, "b": 2}}).to_string()).await;
    ctl.send_line(&json!({"id": "fast", "op": "call", "instance": U1, "topic": "fast", "method": "add", "args": {"a": 1, "b": 2}}).to_string()).await;
    let mut order = vec![];
    for _ in 0..3 {
        order.push(ctl.read().await["id"].as_str().unwrap().to_string());
    }
    assert_eq!(
        order.last().unwrap(),
        "slow",
        "replies came in order {order:?}"
    );
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_hurts_nobody_else() {
    let w = World::new();
    let (_proxy, _agent, mut ctl) = one_guest(&w).await;
    let mut other = w.ctl().await;

    // Control socket: not JSON, unknown op, unknown field, wrong type.
    ctl.send_line("{not json").await;
    let v = ctl.read().await;
    assert_eq!(v["error"]["kind"], "bad_request");
    for bad in [
        json!({"op": "explode"}),
        json!({"op": "call", "instance": U1, "topic": "demo", "method": "add", "bogus": 1}),
        json!({"op": "call", "instance": U1, "topic": 5, "method": "add"}),
    ] {
        let v = ctl.req(bad.clone()).await;
        assert_eq!(v["error"]["kind"], "bad_request", "{bad} -> {v}");
    }
    // Oversized request: refused, that connection closed, the other unaffected.
    let huge = format!(
        "{{\"op\":\"links\",\"pad\":\"{}\"}}",
        "x".repeat(2 * 1024 * 1024)
    );
    let _ = ctl.try_send_line(&huge).await;
    let v = ctl.read().await;
    assert_eq!(v["error"]["kind"], "too_large");
    let v = other.req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "add", "args": {"a": 1, "b": 1}})).await;
    assert_eq!(v["result"], 2);
    // Timeouts too large for any clock: served, nothing overflows.
    let v = other
        .req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "add", "args": {"a": 2, "b": 2}, "timeout_ms": u64::MAX}))
        .await;
    assert_eq!(v["result"], 4, "{v}");
    let v = other
        .req(json!({"op": "cast", "instance": U1, "topic": "demo", "method": "record", "args": {"n": 9}, "timeout_ms": u64::MAX}))
        .await;
    assert_eq!(v["ok"], true, "{v}");

    // Sub-agent socket: garbage and unknown ops get an error line; the agent goes on.
    let sock = w.path(&format!("agent-{U1}.sock"));
    let s = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let (r, mut wr) = s.into_split();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(r));
    for bad in [
        "garbage\n",
        "{\"op\":\"fly\"}\n",
        "{\"op\":\"reply\",\"id\":999,\"result\":1}\n",
        "{\"op\":\"register\",\"name\":\"x\",\"topics\":[\"demo\"]}\n",
    ] {
        tokio::io::AsyncWriteExt::write_all(&mut wr, bad.as_bytes())
            .await
            .unwrap();
        let l = tokio::time::timeout(BOUND, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(l.contains("\"op\":\"error\""), "{bad} -> {l}");
    }
    let v = other.req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "add", "args": {"a": 2, "b": 2}})).await;
    assert_eq!(
        v["result"], 4,
        "the topic still belongs to the real sub-agent"
    );
}

#[test]
fn bad_config_files_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (AGENT, "port = 5\n", "invalid"),
        (AGENT, "colour = \"blue\"\n", "unknown field"),
        (AGENT, "[link]\nwindow_bytes = 10\n", "window_bytes"),
        (
            AGENT,
            "[supervisor]\nallowed_executables = [\"python3\"]\n",
            "absolute",
        ),
        (
            PROXY,
            "[policy.profiles.default]\nmessages_per_sec = -1\n",
            "messages_per_sec",
        ),
        (PROXY, "max_links = 0\n", "max_links"),
        (PROXY, "this is not toml", "invalid"),
    ];
    for (bin, text, needle) in cases {
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        let out = std::process::Command::new(bin)
            .args(["--check-config", "-c", p.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text:?} accepted");
        assert!(err.contains(needle), "{text:?}: {err}");
    }
    let out = std::process::Command::new(AGENT)
        .args(["--check-config"])
        .output()
        .unwrap();
    assert!(out.status.success(), "defaults are valid");
}

#[test]
fn example_config_files_are_valid() {
    let root = env!("CARGO_MANIFEST_DIR");
    for (bin, f) in [
        (AGENT, "config/agent.example.toml"),
        (PROXY, "config/proxy.example.toml"),
        (PROXY, "config/policy/one-way.toml"),
        (PROXY, "config/policy/reply-only.toml"),
        (PROXY, "config/policy/cast.toml"),
        (PROXY, "config/policy/call.toml"),
    ] {
        let out = std::process::Command::new(bin)
            .args(["--check-config", "-c", &format!("{root}/{f}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The assignment example passes `--check-config` as an instance's file
/// under the cast example's profiles; a broken one is refused by name.
#[test]
fn the_instance_assignment_example_is_valid() {
    let root = env!("CARGO_MANIFEST_DIR");
    let d = tempfile::tempdir().unwrap();
    let inst = d.path().join("instances");
    std::fs::create_dir_all(&inst).unwrap();
    let cast = std::fs::read_to_string(format!("{root}/config/policy/cast.toml")).unwrap();
    let cfg = d.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        cast.replace(
            "[policy]\n",
            &format!("[policy]\ninstances_dir = {inst:?}\n"),
        ),
    )
    .unwrap();
    let example =
        std::fs::read_to_string(format!("{root}/config/policy/instance.example.toml")).unwrap();
    std::fs::write(inst.join(format!("{U1}.toml")), &example).unwrap();
    let check = || {
        std::process::Command::new(PROXY)
            .args(["--check-config", "-c", cfg.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 instance assignments"));
    std::fs::write(inst.join(format!("{U1}.toml")), "profile = \"nope\"\n").unwrap();
    let out = check();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(U1) && err.contains("\"nope\" is not defined"),
        "{err}"
    );
}

#[tokio::test]
async fn sighup_reloads_the_allow_list_and_ready_is_notified() {
    let w = World::new();
    let _proxy = w.proxy("");
    let cfg = w.path("agent.toml");
    let sock = w.path("agent.sock");
    let write_cfg = |allowed: &str| {
        std::fs::write(
            &cfg,
            format!(
                "port = \"unix-listen:{}\"\nsubagent_socket = {:?}\nstate_dir = {:?}\n[supervisor]\nallowed_executables = [{allowed}]\n",
                w.channels().join(format!("{U1}.sock")).display(),
                sock,
                w.path("state")
            ),
        )
        .unwrap()
    };
    write_cfg("");
    // systemd's notification socket, played by the test.
    let notify_path = w.path("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(BOUND)).unwrap();
    let log = std::fs::File::create(w.path("agent.log")).unwrap();
    let agent = Proc {
        child: std::process::Command::new(AGENT)
            .args(["-c", cfg.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &notify_path)
            .stderr(log)
            .spawn()
            .unwrap(),
        name: "agent".into(),
        log: w.path("agent.log"),
    };
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));

    let mut ctl = w.ctl().await;
    let t = std::time::Instant::now();
    while ctl.req(json!({"op": "agents", "instance": U1})).await["ok"] != true {
        assert!(t.elapsed() < BOUND, "agent never linked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start = json!({"op": "start_agent", "instance": U1, "name": "py", "argv": [python3(), example_subagent()]});
    let v = ctl.req(start.clone()).await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("allowed_executables"),
        "{v}"
    );

    // A broken file on reload is refused; the running config stays.
    std::fs::write(&cfg, "port = [").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let t = std::time::Instant::now();
    while !agent.log_text().contains("config reload refused") {
        assert!(
            t.elapsed() < BOUND,
            "no refusal logged: {}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Now allow python3 and reload: the same request succeeds.
    write_cfg(&format!("{:?}", python3()));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let t = std::time::Instant::now();
    loop {
        let v = ctl.req(start.clone()).await;
        if v["ok"] == true {
            assert_eq!(v["result"]["state"], "running");
            break;
        }
        assert!(t.elapsed() < BOUND, "reload not applied: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Regression: replies were charged to the guest's rate limit, so the
/// 1,025th call of a burst got no answer. Replies to our own calls pass;
/// the guest's own casts are still limited.
#[tokio::test]
async fn rate_limits_apply_to_guest_traffic_not_to_answers() {
    let w = World::new();
    // Almost no refill: however long the flood takes on a loaded machine,
    // the guest gets its burst and no more.
    let _proxy = w.proxy(&support::lab_policy(
        "message_burst = 20.0\nmessages_per_sec = 0.001",
    ));
    let _agent = w.agent(U1, &w.channels().join(format!("{U1}.sock")), "demo", "");
    let mut ctl = w.ctl().await;
    wait_linked(&mut ctl, U1, "demo").await;
    for i in 0..100 {
        let v = ctl.req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "add", "args": {"a": i, "b": 0}})).await;
        assert_eq!(v["result"], i, "call {i}: {v}");
    }
    let denied_before = ctl.req(json!({"op": "links"})).await["result"][0]["denied"]
        .as_u64()
        .unwrap();
    let mut watch = w.ctl().await;
    watch.req(json!({"op": "watch"})).await;
    for i in 0..50 {
        ctl.req(json!({"op": "cast", "instance": U1, "topic": "demo", "method": "tell_host", "args": {"i": i}})).await;
    }
    // The sub-agent sends its 50 casts before it answers this call, and the
    // link is ordered: once it returns, every one was decided.
    ctl.req(json!({"op": "call", "instance": U1, "topic": "demo", "method": "echo"}))
        .await;
    let links = ctl.req(json!({"op": "links"})).await;
    let denied = links["result"][0]["denied"].as_u64().unwrap() - denied_before;
    // The burst (20, less the topic announcements it paid for) passed; the
    // rest was denied, and each allowed cast reaches the watchers.
    assert!(denied >= 30, "a guest flood is limited: {links}");
    let allowed = 50 - denied as usize;
    let mut seen = 0;
    while seen < allowed {
        let v = tokio::time::timeout(BOUND, watch.read())
            .await
            .expect("an allowed cast never reached the watchers");
        assert!(v.get("event").is_some());
        seen += 1;
    }
    assert!(seen >= 1, "the burst passes");
}

#[tokio::test]
async fn watchdog_pings_and_sigterm_stops_sub_agents_and_exits_cleanly() {
    let w = World::new();
    let _proxy = w.proxy("");
    let notify_path = w.path("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(BOUND)).unwrap();
    let cfg = w.path("agent.toml");
    let py = python3();
    std::fs::write(
        &cfg,
        format!(
            "port = \"unix-listen:{}\"\nsubagent_socket = {:?}\nstate_dir = {:?}\n[supervisor]\nallowed_executables = [\"{py}\"]\n\
             [[subagents]]\nname = \"py\"\nargv = [\"{py}\", \"{}\"]\n",
            w.channels().join(format!("{U1}.sock")).display(),
            w.path("agent.sock"),
            w.path("state"),
            example_subagent()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(w.path("agent.log")).unwrap();
    let mut agent = Proc {
        child: std::process::Command::new(AGENT)
            .args(["-c", cfg.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "100000")
            .stderr(log)
            .spawn()
            .unwrap(),
        name: "agent".into(),
        log: w.path("agent.log"),
    };
    // READY first, then watchdog pings (every 50 ms for a 100 ms watchdog).
    let mut got = vec![];
    let mut buf = [0u8; 256];
    while got
        .iter()
        .filter(|m: &&String| m.contains("WATCHDOG=1"))
        .count()
        < 3
    {
        let n = notify.recv(&mut buf).expect("no notification in time");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(got[0].contains("READY=1"), "{got:?}");

    let mut ctl = w.ctl().await;
    wait_linked(&mut ctl, U1, "demo").await;
    let v = ctl.req(json!({"op": "agents", "instance": U1})).await;
    let sub_pid = v["result"][0]["pid"].as_u64().unwrap() as i32;
    assert_eq!(
        agent.terminate(),
        Some(0),
        "clean exit on SIGTERM: {}",
        agent.log_text()
    );
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(sub_pid), None).is_err(),
        "the sub-agent outlived the agent"
    );
    assert!(
        !w.path("agent.sock").exists(),
        "the sub-agent socket is removed"
    );
}

/// Requests for a topic nobody serves yet wait for a sub-agent to register
/// it (the agent's grace), and go to it in order once it does; a call whose
/// caller gave up meanwhile is never run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_for_their_sub_agent_and_a_call_given_up_never_runs() {
    let w = World::new();
    let _proxy = w.proxy("");
    let _agent = w.agent(
        U1,
        &w.channels().join(format!("{U1}.sock")),
        "demo",
        "unserved_grace_ms = 30000\n",
    );
    let mut ctl = w.ctl().await;
    wait_linked(&mut ctl, U1, "demo").await;
    // The caller gives up after 300 ms: never run, even once a sub-agent
    // serves its topic.
    let v = ctl
        .req(
            json!({"op": "call", "instance": U1, "topic": "late", "method": "record",
                    "args": {"n": "given-up"}, "timeout_ms": 300}),
        )
        .await;
    assert_eq!(v["error"]["kind"], "timeout", "{v}");
    assert_eq!(v["error"]["outcome"], "withdrawn", "{v}");
    // These wait (the cast's caller, for its confirmation).
    let cast = tokio::spawn({
        let sock = w.ctl_sock();
        async move {
            Ctl::connect(&sock).await
                .req(json!({"op": "cast", "instance": U1, "topic": "late", "method": "record", "args": {"n": "held"}}))
                .await
        }
    });
    let call = tokio::spawn({
        let sock = w.ctl_sock();
        async move {
            Ctl::connect(&sock).await
                .req(json!({"op": "call", "instance": U1, "topic": "late", "method": "add", "args": {"a": 2, "b": 3}}))
                .await
        }
    });
    // Both are held in the agent (its own stats say so), then the
    // sub-agent comes.
    let t = std::time::Instant::now();
    loop {
        let v = ctl
            .req(json!({"op": "call", "instance": U1, "topic": "tether.agent", "method": "stats"}))
            .await;
        if v["result"]["router"]["held"] == 2 {
            break;
        }
        assert!(t.elapsed() < BOUND, "not held: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let record = w.path("late.jsonl");
    let v = ctl
        .req(json!({"op": "start_agent", "instance": U1, "name": "late", "argv": [python3(), example_subagent()],
                    "env": {"SUBAGENT_TOPICS": "late", "SUBAGENT_RECORD": record}}))
        .await;
    assert_eq!(v["result"]["state"], "running", "{v}");
    let v = cast.await.unwrap();
    assert_eq!(v["ok"], true, "the held cast is confirmed once taken: {v}");
    let v = call.await.unwrap();
    assert_eq!(v["result"], 5, "the held call is answered: {v}");
    let lines: Vec<Value> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(
        lines[0]["n"], "held",
        "the given-up call never ran: {lines:?}"
    );
}

/// `restart` gives a sub-agent a new process; `stop` SIGKILLs one that
/// ignores SIGTERM once its grace is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisor_restart_and_sigkill_after_the_grace() {
    let w = World::new();
    let (_proxy, agent, mut ctl) = one_guest(&w).await;
    let pid = |v: &Value| v["result"]["pid"].as_u64();
    let sup = |method: &str, args: Value| json!({"op": "call", "instance": U1, "topic": "tether.supervisor", "method": method, "args": args});
    let v = ctl.req(sup("list", json!({}))).await;
    let before = v["result"][0]["pid"].as_u64().expect("py runs");
    let v = ctl.req(sup("restart", json!({"name": "py"}))).await;
    assert_eq!(v["result"]["state"], "running", "{v}");
    assert_ne!(pid(&v), Some(before), "a new process: {v}");
    wait_linked(&mut ctl, U1, "demo").await;

    let stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('stubborn-ready', flush=True)\ntime.sleep(600)\n";
    let v = ctl
        .req(
            json!({"op": "start_agent", "instance": U1, "name": "stubborn",
                    "argv": [python3(), "-c", stubborn], "restart": "never"}),
        )
        .await;
    assert_eq!(v["result"]["state"], "running", "{v}");
    // It ignores SIGTERM once it said so.
    let t = std::time::Instant::now();
    while !agent.log_text().contains("stubborn-ready") {
        assert!(t.elapsed() < BOUND, "{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = ctl
        .req(json!({"op": "stop_agent", "instance": U1, "name": "stubborn", "grace_ms": 300}))
        .await;
    assert_eq!(v["result"]["state"], "stopped", "{v}");
    let exit = v["result"]["last_exit"].as_str().unwrap_or_default();
    assert!(
        exit.contains("SIGKILL") || exit.contains("signal: 9"),
        "{v}"
    );
}

/// One control connection runs at most 256 requests at once; the rest wait
/// their turn (nothing is refused or lost), and another connection is not
/// held up by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_connection_runs_256_requests_at_once_and_the_rest_wait() {
    const CAP: u64 = 256;
    const SENT: u64 = 300;
    let w = World::new();
    let _proxy = w.proxy("");
    let (_agent, mut sa, _ctl) = w.guest_with_sub_agent(U1, "slow", "slow").await;
    let mut busy = w.ctl().await;
    for n in 0..SENT {
        busy.send_line(
            &json!({"id": n, "op": "call", "instance": U1, "topic": "slow", "method": "m",
                    "args": {"n": n}, "timeout_ms": 120_000})
            .to_string(),
        )
        .await;
    }
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(next_request(&mut sa).await);
    }
    // The cap is reached: a call on another connection goes in next.
    let other = tokio::spawn({
        let sock = w.ctl_sock();
        async move {
            Ctl::connect(&sock)
                .await
                .req(json!({"op": "call", "instance": U1, "topic": "slow", "method": "other"}))
                .await
        }
    });
    let r = next_request(&mut sa).await;
    assert_eq!(r.method, "other", "a request past the cap went in: {r:?}");
    sa.reply(r.id, Ok(json!("other"))).await.unwrap();
    assert_eq!(other.await.unwrap()["result"], "other");
    // Each answer lets one more in, in order; every call is answered once.
    let mut answered = std::collections::BTreeSet::new();
    let mut queue: std::collections::VecDeque<_> = held.into();
    let mut seen = CAP;
    while let Some(r) = queue.pop_front() {
        sa.reply(r.id, Ok(r.args["n"].clone())).await.unwrap();
        if seen < SENT {
            let r = next_request(&mut sa).await;
            assert_eq!(r.args["n"], seen, "out of turn: {r:?}");
            queue.push_back(r);
            seen += 1;
        }
    }
    while answered.len() < SENT as usize {
        let v = busy.read().await;
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["result"], v["id"], "{v}");
        assert!(answered.insert(v["id"].as_u64().unwrap()), "twice: {v}");
    }
}

/// The next request the sub-agent gets, within the bound.
async fn next_request(sa: &mut tether::client::SubAgent) -> tether::client::Incoming {
    tokio::time::timeout(BOUND, sa.next_request())
        .await
        .expect("a request reaches the sub-agent")
        .unwrap()
        .unwrap()
}

/// At most `max_control_clients` control connections: one more is told
/// `overloaded` and closed; once one goes, a new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_connections_are_capped() {
    let w = World::new();
    let _proxy = w.proxy("max_control_clients = 3\n");
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut c = w.ctl().await;
        assert_eq!(c.req(json!({"op": "links"})).await["ok"], true);
        open.push(c);
    }
    let mut extra = w.ctl().await;
    let v = extra.read().await;
    assert_eq!(v["error"]["kind"], "overloaded", "{v}");
    assert!(extra.next().await.is_none(), "and closed");
    drop(open.pop());
    let t = std::time::Instant::now();
    loop {
        let mut c = w.ctl().await;
        match c.next_req(json!({"op": "links"})).await {
            Some(v) if v["ok"] == true => break,
            other => assert!(t.elapsed() < BOUND, "never served again: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An instance whose socket stayed gone for the link's grace period is
/// forgotten: the registry does not grow with every VM the host ever ran,
/// and `max_links` counts those that are here (a channel ignored for it is
/// linked once there is room).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_gone_past_the_grace_are_forgotten() {
    let w = World::new();
    let _proxy = w.proxy("max_links = 1\n[link]\ngrace = 1000\n");
    let mut ctl = w.ctl().await;
    let (a, b) = (random_uuid(), random_uuid());
    let ga = support::guest::FakeGuest::start(&w.channels(), &a);
    ga.topics(&["t"]).await;
    wait_linked(&mut ctl, &a, "t").await;
    let gb = support::guest::FakeGuest::start(&w.channels(), &b);
    gb.topics(&["t"]).await;
    ga.leave().await;
    // b was ignored (max_links); once a is forgotten, b gets its link.
    wait_linked(&mut ctl, &b, "t").await;
    let v = ctl.req(json!({"op": "links"})).await;
    let ids: Vec<&str> = v["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["instance"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![b.as_str()], "{v}");
}

/// The supervisor's allow-lists mean what they say: a start request cannot
/// set the dynamic loader's variables (or any the agent's `allowed_env`
/// does not list), and the file it checked is the file it runs — also on
/// every restart, after the symlink it was asked by points elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_requests_cannot_swap_the_program_or_preload_code() {
    let w = World::new();
    let (_proxy, _agent, mut ctl) = one_guest(&w).await;
    let (py, sub) = (python3(), example_subagent());
    for (env, says) in [
        (json!({"LD_PRELOAD": "/tmp/evil.so"}), "may not be set"),
        (json!({"PYTHONSTARTUP": "/tmp/evil.py"}), "may not be set"),
        (json!({"SOMETHING_ELSE": "1"}), "allowed_env"),
    ] {
        let v = ctl
            .req(json!({"op": "start_agent", "instance": U1, "name": "x", "argv": [py, sub], "env": env}))
            .await;
        assert_eq!(v["error"]["class"], "SupervisorError", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{v}"
        );
    }
    // Asked by a symlink to the allowed interpreter.
    let link = w.path("runner");
    std::os::unix::fs::symlink(&py, &link).unwrap();
    let v = ctl
        .req(
            json!({"op": "start_agent", "instance": U1, "name": "swapped", "argv": [link, sub],
                    "env": {"SUBAGENT_TOPICS": "swapped"}, "restart": "always"}),
        )
        .await;
    assert_eq!(v["result"]["state"], "running", "{v}");
    let first = v["result"]["pid"].as_u64().unwrap();
    wait_linked(&mut ctl, U1, "swapped").await;
    // The link now points to a shell; the sub-agent dies and is restarted.
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink("/bin/sh", &link).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = std::time::Instant::now();
    let pid = loop {
        let v = ctl.req(json!({"op": "agents", "instance": U1})).await;
        let me = v["result"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["name"] == "swapped")
            .cloned()
            .unwrap_or_default();
        if let Some(p) = me["pid"].as_u64().filter(|p| *p != first) {
            break p;
        }
        assert!(t.elapsed() < BOUND, "never restarted: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        exe,
        std::fs::canonicalize(&py).unwrap(),
        "the restart ran what was checked"
    );
    wait_linked(&mut ctl, U1, "swapped").await;
}

/// A test directory `nobody` can reach its sockets in, and the user
/// `nobody` and group `nogroup` the tests run clients as.
fn world_for_nobody() -> (World, nix::unistd::User, nix::unistd::Group) {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new();
    std::fs::set_permissions(w.path(""), std::fs::Permissions::from_mode(0o711)).unwrap();
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    let nogroup = nix::unistd::Group::from_name("nogroup")
        .unwrap()
        .expect("group nogroup");
    (w, nobody, nogroup)
}

/// A sub-agent runs as the user and group its start request names when the
/// agent's config allows them: its process has exactly those credentials
/// (supplementary groups included), it reaches the sub-agent socket
/// through the socket's group, and it still dies with the agent. Users and
/// groups the config does not list are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_agent_runs_as_the_user_it_is_allowed() {
    use std::os::unix::fs::MetadataExt;
    let (w, nobody, nogroup) = world_for_nobody();
    let _proxy = w.proxy("");
    let (py, sub) = (python3(), example_subagent());
    let sock = w.path("agent.sock");
    let cfg = w.path("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"port = "unix-listen:{}"
subagent_socket = {sock:?}
subagent_socket_group = "nogroup"
state_dir = {:?}
[supervisor]
allowed_executables = ["{py}"]
allowed_users = ["nobody"]
allowed_groups = ["nogroup"]
[[subagents]]
name = "demo"
argv = ["{py}", "{sub}"]
env = {{ SUBAGENT_TOPICS = "demo" }}
"#,
            w.channels().join(format!("{U1}.sock")).display(),
            w.path("state"),
        ),
    )
    .unwrap();
    let mut agent = spawn("agent", AGENT, &["-c", cfg.to_str().unwrap()], &w.path(""));
    let mut ctl = w.ctl().await;
    wait_linked(&mut ctl, U1, "demo").await;
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!(m.mode() & 0o777, 0o660);
    assert_eq!(m.gid(), nogroup.gid.as_raw());

    let start = |name: &str, who: Value| {
        let mut r = json!({"op": "start_agent", "instance": U1, "name": name, "argv": [py, sub],
                           "env": {"SUBAGENT_TOPICS": name}, "restart": "never"});
        for (k, v) in who.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    };
    for (who, says) in [
        (json!({"user": "root"}), "not in allowed_users"),
        (json!({"group": "root"}), "not in allowed_groups"),
        (
            json!({"user": "nobody", "group": "root"}),
            "not in allowed_groups",
        ),
    ] {
        let v = ctl.req(start("refused", who)).await;
        assert_eq!(v["error"]["class"], "SupervisorError", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{v}"
        );
    }
    let v = ctl.req(start("nobodys", json!({"user": "nobody"}))).await;
    assert_eq!(v["result"]["state"], "running", "{v}");
    let pid = v["result"]["pid"].as_u64().unwrap();
    // It registered: it connected to the socket through its group.
    wait_linked(&mut ctl, U1, "nobodys").await;
    let v = ctl
        .req(json!({"op": "call", "instance": U1, "topic": "nobodys", "method": "add", "args": {"a": 2, "b": 40}}))
        .await;
    assert_eq!(v["result"], 42, "{v}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_whitespace()
            .skip(1)
            .map(|n| n.parse().unwrap())
            .collect()
    };
    assert_eq!(ids("Uid:"), vec![nobody.uid.as_raw(); 4], "{status}");
    assert_eq!(ids("Gid:"), vec![nobody.gid.as_raw(); 4], "{status}");
    assert_eq!(ids("Groups:"), vec![nogroup.gid.as_raw()], "{status}");
    // The parent-death signal survived the change of credentials (the
    // kernel clears it on one): a sub-agent that would not notice the agent
    // is gone (this one only sleeps) dies with it.
    let mut sleeper = start("sleeper", json!({"user": "nobody"}));
    sleeper["argv"] = json!([py, "-c", "import time; time.sleep(600)"]);
    let v = ctl.req(sleeper).await;
    assert_eq!(v["result"]["state"], "running", "{v}");
    let pid = v["result"]["pid"].as_u64().unwrap();
    agent.kill9();
    let t = std::time::Instant::now();
    loop {
        let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = st
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        if matches!(state, None | Some("Z") | Some("X")) {
            break;
        }
        assert!(
            t.elapsed() < BOUND,
            "the sub-agent outlived the agent: {st}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `control_socket_group`: operators in that group use `tetherctl` without
/// root — the socket is 0660 of that group, on every start of the proxy —
/// and a user outside it is refused by the file's permissions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_in_the_control_sockets_group_need_no_root() {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    let (w, nobody, nogroup) = world_for_nobody();
    let as_nobody = |gid: u32| {
        std::process::Command::new(CTL)
            .args(["--socket", w.ctl_sock().to_str().unwrap(), "links"])
            .uid(nobody.uid.as_raw())
            .gid(gid)
            .output()
            .unwrap()
    };
    for round in 0..2 {
        let mut proxy = w.proxy("control_socket_group = \"nogroup\"");
        let m = std::fs::metadata(w.ctl_sock()).unwrap();
        assert_eq!(
            (m.mode() & 0o777, m.gid()),
            (0o660, nogroup.gid.as_raw()),
            "start {round}"
        );
        let out = as_nobody(nogroup.gid.as_raw());
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        // Not in the group (here with root's group, gid 0): the socket's
        // permissions refuse it.
        let out = as_nobody(0);
        assert_ne!(out.status.code(), Some(0), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("ermission denied"),
            "{out:?}"
        );
        proxy.terminate();
    }
}
