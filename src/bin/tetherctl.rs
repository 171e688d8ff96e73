//! tetherctl: the operator's CLI, over the proxy's control socket. Exit
//! codes: [`EXIT_CODES`] (printed by `--help` and in the manual page).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// What each exit status means (for `--help` and the manual page).
const EXIT_CODES: &str = "Exit codes:
  0  ok
  1  the guest's side failed: a sub-agent raised, or the request was refused or not delivered
  2  bad usage, or a request the proxy refused as malformed
  3  timeout: no answer in time (--timeout-ms)
  4  the instance is not connected
  5  the proxy could not be reached, has too many clients, or took no request
     (nothing answered within 30 s for links, broker and policy, or within
     --timeout-ms + 30 s, 10 min without it, for what goes to a guest)";

/// How long the proxy may take to answer what involves no guest.
const LOCAL_ANSWER: std::time::Duration = std::time::Duration::from_secs(30);
/// Beyond a request's own timeout, how long its answer may take to come.
const ANSWER_MARGIN: std::time::Duration = std::time::Duration::from_secs(30);
/// The wait for an answer to a guest request without `--timeout-ms` (the
/// proxy's own `default_timeout_ms` bounds it there; this bounds a proxy
/// that never took the request, e.g. out of file descriptors).
const GUEST_ANSWER_DEFAULT: std::time::Duration = std::time::Duration::from_secs(600);

/// Talk to tether-proxy: call, cast and fan out into VMs, list links and
/// sub-agents, start, stop and restart sub-agents, watch what guests send.
#[derive(Parser)]
#[command(name = "tetherctl", version, after_help = EXIT_CODES)]
struct Args {
    /// The proxy's control socket.
    #[arg(long, short, global = true, default_value = tether::host::config::DEFAULT_CONTROL_SOCKET, env = "TETHER_CONTROL_SOCKET")]
    socket: PathBuf,
    /// Print the raw JSON response (for scripts).
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for an answer (ms); the proxy's default if unset.
    #[arg(long, global = true)]
    timeout_ms: Option<u64>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List instance links and their state.
    Links,
    /// The broker bridge: connected or not, why not, what it consumes.
    Broker,
    /// The policy an instance is held to: profile, mode, topics, targets,
    /// context rules (the running one if linked, else what it would get).
    Policy {
        /// Instance uuid.
        instance: String,
    },
    /// Call a method in an instance and print the result.
    Call {
        /// Instance uuid.
        instance: String,
        /// Topic a sub-agent serves.
        topic: String,
        /// Method name.
        method: String,
        /// Arguments as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
    },
    /// Cast to an instance; returns once the guest acknowledged it.
    Cast {
        /// Instance uuid.
        instance: String,
        /// Topic.
        topic: String,
        /// Method name.
        method: String,
        /// Arguments as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
        /// Your own unique id, so that a retry is dropped as a duplicate.
        #[arg(long)]
        unique_id: Option<String>,
    },
    /// Cast to every instance whose sub-agents serve the topic.
    Fanout {
        /// Topic.
        topic: String,
        /// Method name.
        method: String,
        /// Arguments as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
    },
    /// List the sub-agents of an instance.
    Agents {
        /// Instance uuid.
        instance: String,
    },
    /// Start a sub-agent in an instance (the program must be allowed there).
    StartAgent {
        /// Instance uuid.
        instance: String,
        /// A name for it.
        name: String,
        /// Restart policy: always, on-failure, never.
        #[arg(long)]
        restart: Option<String>,
        /// Environment, KEY=VALUE (repeatable).
        #[arg(long = "env")]
        env: Vec<String>,
        /// Run it as this user (the agent's allowed_users must list it).
        #[arg(long)]
        user: Option<String>,
        /// Run it with this group (the agent's allowed_groups must list it).
        #[arg(long)]
        group: Option<String>,
        /// Program and arguments (after --).
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Stop a sub-agent in an instance.
    StopAgent {
        /// Instance uuid.
        instance: String,
        /// Its name.
        name: String,
        /// SIGTERM-to-SIGKILL grace (ms).
        #[arg(long)]
        grace_ms: Option<u64>,
    },
    /// Restart a sub-agent in an instance: stop it (its grace), then start
    /// it again as it was started.
    RestartAgent {
        /// Instance uuid.
        instance: String,
        /// Its name.
        name: String,
    },
    /// Print every guest-originated cast as it arrives (until interrupted).
    Watch,
    /// Print a completion script for a shell (bash, zsh, fish, elvish,
    /// powershell), e.g. `tetherctl completions bash > /etc/bash_completion.d/tetherctl`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (tetherctl.1 and one per subcommand,
    /// tetherctl-links.1 …) into a directory.
    Man {
        /// The directory (created if missing).
        dir: PathBuf,
    },
}

const EXIT_REMOTE: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_TIMEOUT: u8 = 3;
const EXIT_NOT_CONNECTED: u8 = 4;
const EXIT_UNREACHABLE: u8 = 5;

fn json_arg(s: &str) -> Result<Value, String> {
    match serde_json::from_str::<Value>(s) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("--args must be a JSON object, like '{\"key\": 1}'".into()),
        Err(e) => Err(format!("--args is not valid JSON: {e}")),
    }
}

fn request(args: &Args) -> Result<Value, String> {
    let mut r = match &args.cmd {
        Cmd::Links => json!({"op": "links"}),
        Cmd::Broker => json!({"op": "broker"}),
        Cmd::Policy { instance } => json!({"op": "policy", "instance": instance}),
        Cmd::Call {
            instance,
            topic,
            method,
            args: a,
        } => {
            json!({"op": "call", "instance": instance, "topic": topic, "method": method, "args": json_arg(a)?})
        }
        Cmd::Cast {
            instance,
            topic,
            method,
            args: a,
            unique_id,
        } => {
            let mut r = json!({"op": "cast", "instance": instance, "topic": topic, "method": method, "args": json_arg(a)?});
            if let Some(u) = unique_id {
                r["unique_id"] = json!(u);
            }
            r
        }
        Cmd::Fanout {
            topic,
            method,
            args: a,
        } => {
            json!({"op": "fanout", "topic": topic, "method": method, "args": json_arg(a)?})
        }
        Cmd::Agents { instance } => json!({"op": "agents", "instance": instance}),
        Cmd::StartAgent {
            instance,
            name,
            restart,
            env,
            user,
            group,
            argv,
        } => {
            let mut envs = serde_json::Map::new();
            for kv in env {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("--env {kv}: expected KEY=VALUE"))?;
                envs.insert(k.into(), json!(v));
            }
            let mut r = json!({"op": "start_agent", "instance": instance, "name": name, "argv": argv, "env": envs});
            for (k, v) in [("restart", restart), ("user", user), ("group", group)] {
                if let Some(v) = v {
                    r[k] = json!(v);
                }
            }
            r
        }
        Cmd::StopAgent {
            instance,
            name,
            grace_ms,
        } => {
            json!({"op": "stop_agent", "instance": instance, "name": name, "grace_ms": grace_ms})
        }
        Cmd::RestartAgent { instance, name } => {
            json!({"op": "restart_agent", "instance": instance, "name": name})
        }
        Cmd::Watch => json!({"op": "watch"}),
        Cmd::Completions { .. } | Cmd::Man { .. } => {
            return Err("completions and man need no proxy".into());
        }
    };
    if let (Some(t), false) = (
        args.timeout_ms,
        matches!(
            args.cmd,
            Cmd::Links | Cmd::Broker | Cmd::Policy { .. } | Cmd::Watch
        ),
    ) {
        r["timeout_ms"] = json!(t);
    }
    Ok(r)
}

fn human(cmd: &Cmd, result: &Value) -> String {
    match cmd {
        Cmd::Policy { .. } => {
            let p = &result["policy"];
            let list = |v: &Value| {
                let items: Vec<String> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| x.as_str().map_or(x.to_string(), String::from))
                    .collect();
                if items.is_empty() {
                    "(none)".to_string()
                } else {
                    items.join(", ")
                }
            };
            let mut out = format!(
                "instance {} ({})
profile {} from {}
mode {}
topics {}
context keys passed {}
static context {}
reply handles {}",
                p["instance"].as_str().unwrap_or("?"),
                if result["linked"] == true {
                    "linked"
                } else {
                    "not linked here"
                },
                p["profile_name"],
                match p["source"]["from"].as_str() {
                    Some("file") => p["source"]["path"].to_string(),
                    Some("failed_closed") =>
                        format!("NOTHING (fail-closed: {})", p["source"]["error"]),
                    _ => "the default profile".into(),
                },
                p["profile"]["mode"].as_str().unwrap_or("?"),
                list(&p["profile"]["topics"]),
                list(&p["profile"]["context_keys"]),
                p["profile"]["static_context"],
                if p["reply_handles"] == true {
                    "sealed"
                } else {
                    "off (replies only to calls pending on this proxy)"
                },
            );
            for t in p["profile"]["targets"].as_array().into_iter().flatten() {
                out += &format!(
                    "
target exchanges {} topics {} servers {} methods {}",
                    if t["exchanges"].as_array().is_some_and(|a| a.is_empty()) {
                        format!("{} (control)", p["control_exchange"])
                    } else {
                        list(&t["exchanges"])
                    },
                    list(&t["topics"]),
                    list(&t["servers"]),
                    list(&t["methods"]),
                );
            }
            out
        }
        Cmd::Broker if result["configured"] != true => {
            "no broker configured ([broker] transport_url is empty)".into()
        }
        Cmd::Broker => {
            let state = if result["connected"] == true {
                "connected"
            } else {
                "NOT connected"
            };
            let mut out = format!(
                "{state} to {}; {} connects; consuming for {} instances, {} fanout topics\n\
                 delivered {}, requeued {}, published {} ({} again), refused {}, held {}",
                result["broker"].as_str().unwrap_or("?"),
                result["connects"],
                result["instances_consumed"],
                result["fanout_topics"],
                result["delivered"],
                result["requeued"],
                result["published"],
                result["published_again"],
                result["refused"],
                result["held"],
            );
            if let Some(e) = result["last_error"].as_str() {
                out += &format!("\nlast error: {e}");
            }
            out
        }
        Cmd::Links => {
            let mut out = String::from(
                "INSTANCE                              STATE        UNACKED RESENT TOPICS\n",
            );
            for l in result.as_array().into_iter().flatten() {
                let state = if l["established"] == true {
                    "linked"
                } else if l["connected"] == true {
                    "handshake"
                } else {
                    "disconnected"
                };
                let topics: Vec<&str> = l["topics"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                out += &format!(
                    "{:<37} {:<12} {:>7} {:>6} {}\n",
                    l["instance"].as_str().unwrap_or("?"),
                    state,
                    l["unacked"],
                    l["resent"],
                    topics.join(",")
                );
            }
            out.trim_end().to_string()
        }
        Cmd::Agents { .. } => {
            let mut out =
                String::from("NAME                 STATE      PID      RESTARTS LAST EXIT\n");
            for a in result.as_array().into_iter().flatten() {
                out += &format!(
                    "{:<20} {:<10} {:<8} {:>8} {}\n",
                    a["name"].as_str().unwrap_or("?"),
                    a["state"].as_str().unwrap_or("?"),
                    a["pid"].as_u64().map_or("-".into(), |p| p.to_string()),
                    a["restarts"],
                    a["last_exit"].as_str().unwrap_or("-")
                );
            }
            out.trim_end().to_string()
        }
        Cmd::Cast { .. } => format!(
            "delivered (unique id {})",
            result["unique_id"].as_str().unwrap_or("?")
        ),
        Cmd::Fanout { .. } => {
            let d = result["delivered"].as_array().map_or(0, Vec::len);
            let f = result["failed"].as_array().map_or(0, Vec::len);
            let mut s = format!("delivered to {d} instance(s), failed for {f}");
            for x in result["failed"].as_array().into_iter().flatten() {
                s += &format!(
                    "\n  {}: {}",
                    x["instance"].as_str().unwrap_or("?"),
                    x["error"]["message"].as_str().unwrap_or("?")
                );
            }
            s
        }
        _ => serde_json::to_string_pretty(result).unwrap_or_default(),
    }
}

fn exit_for(kind: &str) -> u8 {
    match kind {
        "remote" | "refused" | "not_delivered" => EXIT_REMOTE,
        "timeout" => EXIT_TIMEOUT,
        "not_connected" => EXIT_NOT_CONNECTED,
        // Too many control connections: as good as unreachable, for now.
        "overloaded" => EXIT_UNREACHABLE,
        _ => EXIT_USAGE,
    }
}

async fn run(args: Args) -> u8 {
    let req = match request(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tetherctl: {e}");
            return EXIT_USAGE;
        }
    };
    let s = match UnixStream::connect(&args.socket).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "tetherctl: cannot reach tether-proxy at {}: {e}\n  is tether-proxy running? pass --socket or set TETHER_CONTROL_SOCKET if it listens elsewhere",
                args.socket.display()
            );
            return EXIT_UNREACHABLE;
        }
    };
    let (r, mut w) = s.into_split();
    let line = format!("{req}\n");
    if let Err(e) = w.write_all(line.as_bytes()).await {
        eprintln!("tetherctl: the proxy closed the connection: {e}");
        return EXIT_UNREACHABLE;
    }
    let mut lines = BufReader::new(r).lines();
    let watch = matches!(args.cmd, Cmd::Watch);
    // The first answer is waited for within a bound: a proxy that accepted
    // nothing (its backlog took the connection) must not hang the caller.
    let mut bound = Some(
        if matches!(
            args.cmd,
            Cmd::Links | Cmd::Broker | Cmd::Policy { .. } | Cmd::Watch
        ) {
            LOCAL_ANSWER
        } else {
            args.timeout_ms.map_or(GUEST_ANSWER_DEFAULT, |t| {
                std::time::Duration::from_millis(t).saturating_add(ANSWER_MARGIN)
            })
        },
    );
    loop {
        let next = match bound.take() {
            Some(b) => match tokio::time::timeout(b, lines.next_line()).await {
                Ok(r) => r,
                Err(_) => {
                    eprintln!(
                        "tetherctl: tether-proxy at {} took the connection but answered nothing in {} s\n  it may be out of file descriptors or stuck: check its log",
                        args.socket.display(),
                        b.as_secs()
                    );
                    return EXIT_UNREACHABLE;
                }
            },
            None => lines.next_line().await,
        };
        let line = match next {
            Ok(Some(l)) => l,
            Ok(None) => {
                eprintln!("tetherctl: the proxy closed the connection");
                return EXIT_UNREACHABLE;
            }
            Err(e) => {
                eprintln!("tetherctl: reading from the proxy failed: {e}");
                return EXIT_UNREACHABLE;
            }
        };
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            eprintln!("tetherctl: the proxy sent something that is not JSON: {line}");
            return EXIT_UNREACHABLE;
        };
        if watch && (v.get("event").is_some() || v.get("lagged").is_some()) {
            if args.json {
                println!("{v}");
            } else if let Some(n) = v.get("lagged") {
                println!("(missed {n} casts: this client fell behind)");
            } else {
                let e = &v["event"];
                println!(
                    "{} {}.{} {}",
                    e["instance"].as_str().unwrap_or("?"),
                    e["target"]["topic"].as_str().unwrap_or("?"),
                    e["method"].as_str().unwrap_or("?"),
                    e["args"]
                );
            }
            continue;
        }
        if args.json {
            println!("{v}");
        }
        if v["ok"] == true {
            if watch {
                if !args.json {
                    eprintln!("watching guest casts (Ctrl-C to stop)");
                }
                continue;
            }
            if !args.json {
                println!("{}", human(&args.cmd, &v["result"]));
            }
            return 0;
        }
        let e = &v["error"];
        let kind = e["kind"].as_str().unwrap_or("unknown");
        if !args.json {
            let class = e["class"]
                .as_str()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            let hint = match kind {
                "not_connected" => {
                    "\n  check `tetherctl links`: the instance must be listed and linked"
                }
                "timeout" => {
                    "\n  the guest answered nothing in time; raise --timeout-ms or check its sub-agents with `tetherctl agents`"
                }
                _ => "",
            };
            eprintln!(
                "tetherctl: {kind}{class}: {}{hint}",
                e["message"].as_str().unwrap_or("?")
            );
        }
        return exit_for(kind);
    }
}

/// `tetherctl completions` (to stdout) and `tetherctl man` (to files).
fn generate(cmd: &Cmd) -> Option<ExitCode> {
    let mut out = std::io::stdout();
    let written = match cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(*shell, &mut Args::command(), "tetherctl", &mut out);
            Ok(())
        }
        Cmd::Man { dir } => std::fs::create_dir_all(dir)
            .and_then(|()| clap_mangen::generate_to(Args::command(), dir)),
        _ => return None,
    };
    Some(match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tetherctl: cannot write: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(code) = generate(&args.cmd) {
        return code;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tetherctl: cannot start: {e}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    ExitCode::from(rt.block_on(run(args)))
}
