//! The tether demo on the embedded default: no broker, the VM's port emulated
//! by a UNIX socket, everything on this machine. Run it with `scripts/demo`.
//!
//! It starts tether-proxy and tether-agent as real processes, starts a
//! sample sub-agent inside the "VM" through the supervisor, and drives
//! everything with tetherctl, printing each command and its output. In the
//! middle of a stream of casts it forces a channel reset (as a host-side
//! reconnect or a migration would) and shows that nothing was lost.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tether::testing::{FaultRelay, RelayFaults};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const VM: &str = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";
const CASTS: u64 = 2000;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bins() -> anyhow::Result<PathBuf> {
    // target/<profile>/examples/demo -> target/<profile>
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot locate the build directory")?;
    for b in ["tether-proxy", "tether-agent", "tetherctl"] {
        if !dir.join(b).exists() {
            bail!("{} not built: run scripts/demo", dir.join(b).display());
        }
    }
    Ok(dir.to_path_buf())
}

fn say(s: &str) {
    println!("\n\x1b[1m# {s}\x1b[0m");
}

fn ctl(bin: &Path, sock: &Path, args: &[&str]) -> anyhow::Result<String> {
    println!("$ tetherctl {}", args.join(" "));
    let out = Command::new(bin.join("tetherctl"))
        .arg("--socket")
        .arg(sock)
        .args(args)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for l in text.lines() {
        println!("  {l}");
    }
    Ok(text)
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn links(bin: &Path, sock: &Path) -> Value {
    Command::new(bin.join("tetherctl"))
        .arg("--socket")
        .arg(sock)
        .args(["--json", "links"])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .map(|v| v["result"][0].clone())
        .unwrap_or(Value::Null)
}

/// Send `CASTS` casts pipelined on the control socket, cutting the channel
/// after half of them; returns how many were acknowledged.
async fn stream_with_reset(sock: &Path, relay: &FaultRelay) -> anyhow::Result<u64> {
    let s = tokio::net::UnixStream::connect(sock).await?;
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r).lines();
    let (mut sent, mut acked, mut inflight) = (0u64, 0u64, 0u64);
    while acked < CASTS {
        while inflight < 64 && sent < CASTS {
            let req = json!({"id": sent, "op": "cast", "instance": VM, "topic": "demo", "method": "record",
                             "args": {"n": sent}, "unique_id": format!("demo-{sent}")});
            w.write_all(format!("{req}\n").as_bytes()).await?;
            sent += 1;
            inflight += 1;
            if sent == CASTS / 2 {
                // From here the channel is cut every few KB, mid-frame, with
                // whatever was in flight dropped, as QEMU does at a reset.
                relay.set_faults(RelayFaults {
                    cut_after: Some((2_000, 12_000)),
                    ..RelayFaults::none()
                });
                relay.cut();
                println!(
                    "  ... {sent} casts sent: now resetting the channel every few KB, mid-frame ..."
                );
            }
            if sent == CASTS / 2 + CASTS / 4 {
                relay.set_faults(RelayFaults::none());
                relay.cut();
                println!("  ... {sent} casts sent: channel healthy again ...");
            }
        }
        let line = lines
            .next_line()
            .await?
            .context("proxy closed the connection")?;
        let v: Value = serde_json::from_str(&line)?;
        inflight -= 1;
        if v["ok"] != true {
            bail!("cast failed: {v}");
        }
        acked += 1;
    }
    Ok(acked)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bin = bins()?;
    let python = "/usr/bin/python3";
    if !Path::new(python).exists() {
        bail!("the demo's sample sub-agent needs {python}");
    }
    let subagent = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/subagent.py");
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (channels, sock, port) = (
        d.join("channels"),
        d.join("proxy.sock"),
        d.join("vm-port.sock"),
    );
    std::fs::create_dir_all(&channels)?;
    let record = d.join("handled.jsonl");
    println!("tether demo: a host proxy and a guest agent on this machine, no broker.");
    println!(
        "Work dir {}; logs in proxy.log and agent.log there.",
        d.display()
    );

    say("Start the host proxy; it watches a channels directory for VM sockets");
    // Deny by default: guests may only answer calls. Provisioning assigns
    // this VM a profile that lets its sub-agents serve topic "demo".
    let policies = d.join("instances");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(
        policies.join(format!("{VM}.toml")),
        "profile = \"demo-service\"\n",
    )?;
    let proxy_cfg = d.join("proxy.toml");
    std::fs::write(
        &proxy_cfg,
        format!(
            "[policy]\ninstances_dir = {policies:?}\naudit_log = {:?}\n\
             [policy.profiles.demo-service]\nmode = \"reply-only\"\ntopics = [\"demo\"]\n",
            d.join("audit.jsonl")
        ),
    )?;
    println!("Its policy: {VM} is assigned profile demo-service (reply-only, topic demo);");
    println!("every guest decision is audited to audit.jsonl (`tetherctl policy {VM}`).");
    let proxy_log = std::fs::File::create(d.join("proxy.log"))?;
    let _proxy = Daemon(
        Command::new(bin.join("tether-proxy"))
            .arg("-c")
            .arg(&proxy_cfg)
            .args([
                "--channels-dir",
                channels.to_str().unwrap_or_default(),
                "--control-socket",
                sock.to_str().unwrap_or_default(),
            ])
            .stdout(Stdio::null())
            .stderr(proxy_log)
            .spawn()?,
    );
    wait_until("the control socket", || sock.exists())?;

    say("Start the guest agent on an emulated virtio-serial port (a UNIX socket)");
    let cfg = d.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "port = \"unix-listen:{}\"\nsubagent_socket = {:?}\nstate_dir = {:?}\nunserved_grace_ms = 2000\n[supervisor]\nallowed_executables = [\"{python}\"]\n",
            port.display(),
            d.join("agent.sock"),
            d.join("state")
        ),
    )?;
    let agent_log = std::fs::File::create(d.join("agent.log"))?;
    let _agent = Daemon(
        Command::new(bin.join("tether-agent"))
            .arg("-c")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(agent_log)
            .spawn()?,
    );
    wait_until("the agent's port", || port.exists())?;
    println!("The VM's channel appears as {VM}.sock in the channels directory");
    println!("(through a relay that lets this demo reset the channel on demand).");
    let relay = FaultRelay::start(
        &channels.join(format!("{VM}.sock")),
        &port,
        RelayFaults::none(),
        1,
    )?;
    wait_until("the link", || links(&bin, &sock)["established"] == true)?;
    ctl(&bin, &sock, &["links"])?;

    say("Start a sample sub-agent inside the VM through the agent's supervisor");
    let env = format!("SUBAGENT_RECORD={}", record.display());
    ctl(
        &bin,
        &sock,
        &[
            "start-agent",
            VM,
            "sample",
            "--env",
            "SUBAGENT_TOPICS=demo",
            "--env",
            &env,
            "--",
            python,
            subagent.to_str().unwrap_or_default(),
        ],
    )?;
    wait_until("the sub-agent's topic", || {
        links(&bin, &sock)["topics"] == json!(["demo"])
    })?;
    ctl(&bin, &sock, &["agents", VM])?;

    say("A call: the answer comes back from the sub-agent");
    ctl(
        &bin,
        &sock,
        &["call", VM, "demo", "add", "--args", r#"{"a": 20, "b": 22}"#],
    )?;
    say("A call that fails inside the VM: the caller gets the exception's class");
    ctl(
        &bin,
        &sock,
        &[
            "call",
            VM,
            "demo",
            "fail",
            "--args",
            r#"{"message": "pool p1 does not exist"}"#,
        ],
    )?;
    say(
        "A cast: confirmed once the guest acknowledged it; a fanout reaches every VM serving the topic",
    );
    ctl(
        &bin,
        &sock,
        &["cast", VM, "demo", "record", "--args", r#"{"n": -1}"#],
    )?;
    ctl(
        &bin,
        &sock,
        &["fanout", "demo", "record", "--args", r#"{"n": -2}"#],
    )?;

    say(&format!(
        "{CASTS} casts in a stream, with channel resets in the middle"
    ));
    let before = links(&bin, &sock);
    let acked = stream_with_reset(&sock, &relay).await?;
    ctl(&bin, &sock, &["call", VM, "demo", "echo"])?;
    let handled: Vec<i64> = std::fs::read_to_string(&record)?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["n"].as_i64())
        .filter(|n| *n >= 0)
        .collect();
    let distinct: std::collections::BTreeSet<i64> = handled.iter().copied().collect();
    let after = links(&bin, &sock);
    println!(
        "  {acked} casts acknowledged; the sub-agent handled {} of them, {} distinct: {}",
        handled.len(),
        distinct.len(),
        if handled.len() as u64 == CASTS && distinct.len() as u64 == CASTS {
            "every one exactly once"
        } else {
            "SOMETHING WAS LOST OR DUPLICATED"
        }
    );
    println!(
        "  the link reconnected {} time(s); the proxy resent {} frame(s) that resets had dropped",
        after["connects"].as_u64().unwrap_or(0) - before["connects"].as_u64().unwrap_or(0),
        after["resent"].as_u64().unwrap_or(0) - before["resent"].as_u64().unwrap_or(0)
    );

    say(
        "Stop the sub-agent; a call to its topic waits the agent's grace for a new one (2 s here, 60 s by default), then gets a clear error",
    );
    ctl(&bin, &sock, &["stop-agent", VM, "sample"])?;
    ctl(
        &bin,
        &sock,
        &["call", VM, "demo", "add", "--args", r#"{"a": 1, "b": 1}"#],
    )?;
    ctl(&bin, &sock, &["agents", VM])?;
    if handled.len() as u64 != CASTS || distinct.len() as u64 != CASTS {
        bail!("the stream was not delivered exactly once");
    }
    println!("\nDone. Next: `scripts/test` runs the whole test suite.");
    Ok(())
}
