//! Configuration files of the daemons: bad ones refused with the reason,
//! the shipped examples valid, and SIGHUP reloading the proxy's
//! allow-list (a broken file on reload refused, the running one kept).

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

const U1: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

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
    let notify = Notify::bind(&w.path("notify.sock"));
    let log = std::fs::File::create(w.path("agent.log")).unwrap();
    let agent = Proc {
        child: std::process::Command::new(AGENT)
            .args(["-c", cfg.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &notify.path)
            .stderr(log)
            .spawn()
            .unwrap(),
        name: "agent".into(),
        log: w.path("agent.log"),
    };
    assert!(notify.next().contains("READY=1"));

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
