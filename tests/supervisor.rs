//! The guest agent's supervisor as real processes: sub-agents started,
//! stopped, restarted and crashed without zombies, requests that wait for
//! their sub-agent, the watchdog and SIGTERM, the allow-lists a start
//! request cannot get round, and the user and group a sub-agent runs as.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const U1: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

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
    let (_proxy, agent, mut ctl) = w.one_guest(U1).await;
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
    let (_proxy, _agent, mut ctl) = w.one_guest(U1).await;
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
async fn watchdog_pings_and_sigterm_stops_sub_agents_and_exits_cleanly() {
    let w = World::new();
    let _proxy = w.proxy("");
    let notify = Notify::bind(&w.path("notify.sock"));
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
            .env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", "100000")
            .stderr(log)
            .spawn()
            .unwrap(),
        name: "agent".into(),
        log: w.path("agent.log"),
    };
    // READY first, then watchdog pings (every 50 ms for a 100 ms watchdog).
    let mut got = vec![];
    while got
        .iter()
        .filter(|m: &&String| m.contains("WATCHDOG=1"))
        .count()
        < 3
    {
        got.push(notify.next());
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
    let (_proxy, agent, mut ctl) = w.one_guest(U1).await;
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

/// The supervisor's allow-lists mean what they say: a start request cannot
/// set the dynamic loader's variables (or any the agent's `allowed_env`
/// does not list), and the file it checked is the file it runs — also on
/// every restart, after the symlink it was asked by points elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_requests_cannot_swap_the_program_or_preload_code() {
    let w = World::new();
    let (_proxy, _agent, mut ctl) = w.one_guest(U1).await;
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

/// A sub-agent runs as the user and group its start request names when the
/// agent's config allows them: its process has exactly those credentials
/// (supplementary groups included), it reaches the sub-agent socket
/// through the socket's group, and it still dies with the agent. Users and
/// groups the config does not list are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_agent_runs_as_the_user_it_is_allowed() {
    use std::os::unix::fs::MetadataExt;
    let (w, nobody, nogroup) = World::for_nobody();
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
