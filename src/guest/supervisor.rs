//! The built-in supervisor target (`tether.supervisor`): starts, stops,
//! restarts and lists sub-agent processes.
//!
//! One task per child. Each child runs in its own process group so that a
//! stop reaches everything it started; the task reaps it (tokio waits on
//! every child it spawned), captures stdout and stderr line by line into the
//! agent's log, and restarts it per policy with capped exponential backoff.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::identity::{self, Identity};
use crate::rpc::Failure;

/// The topic of the built-in supervisor target.
pub const SUPERVISOR_TOPIC: &str = "tether.supervisor";

/// A child that ran at least this long restarts from the shortest backoff again.
const STABLE_RUN: Duration = Duration::from_secs(30);

/// What start requests may set in a sub-agent's environment by default.
pub const DEFAULT_ALLOWED_ENV: &[&str] = &["SUBAGENT_*", "LANG", "LC_*", "TZ", "RUST_LOG"];

/// Variables no start request may set: they make an allowed program load or
/// run other code (the dynamic loader's, and the start-up hooks of common
/// interpreters and shells).
pub const NEVER_ENV: &[&str] = &[
    "LD_*",
    "GCONV_PATH",
    "GETCONF_DIR",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "MALLOC_*",
    "NLSPATH",
    "RESOLV_HOST_CONF",
    "TMPDIR",
    "PATH",
    "PYTHON*",
    "PERL*",
    "RUBY*",
    "NODE_*",
    "BASH_ENV",
    "ENV",
    "IFS",
    "SHELLOPTS",
    "TETHER_*",
];

/// Whether `name` matches `pattern` (a name, or a prefix ending in `*`).
fn env_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

/// Supervisor limits, from the agent's config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisorConfig {
    /// Executables that start requests may run (absolute paths). Empty: none.
    pub allowed_executables: Vec<PathBuf>,
    /// Environment variables a start request may set: names, or prefixes
    /// ending in `*`. Dynamic-loader and interpreter start-up variables
    /// (`LD_*`, …: [`NEVER_ENV`]) are refused whatever this says.
    pub allowed_env: Vec<String>,
    /// Users a start request may ask a sub-agent to run as. Empty: start
    /// requests may not name a user (their sub-agents run as the agent).
    pub allowed_users: Vec<String>,
    /// Groups a start request may ask for (besides the named user's own
    /// primary group). Empty: none.
    pub allowed_groups: Vec<String>,
    /// Grace between SIGTERM and SIGKILL on stop (ms).
    pub stop_grace_ms: u64,
    /// First restart delay (ms).
    pub backoff_min_ms: u64,
    /// Restart delay cap (ms).
    pub backoff_max_ms: u64,
    /// Most sub-agents at once: each is a process and a task.
    pub max_children: usize,
    /// Output lines longer than this are cut (bytes).
    pub max_output_line: usize,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            allowed_executables: vec![],
            allowed_env: DEFAULT_ALLOWED_ENV.iter().map(|s| s.to_string()).collect(),
            allowed_users: vec![],
            allowed_groups: vec![],
            stop_grace_ms: 5_000,
            backoff_min_ms: 500,
            backoff_max_ms: 30_000,
            max_children: 64,
            max_output_line: 4096,
        }
    }
}

/// When a child is started again after it exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Always.
    Always,
    /// When it exited with a failure or a signal.
    #[default]
    OnFailure,
    /// Never.
    Never,
}

/// What to start.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StartSpec {
    /// Unique name.
    pub name: String,
    /// Program and arguments; the program must be on the allow-list.
    pub argv: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Restart policy.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// The user to run as (a name; default: the agent's user). A start
    /// request may name only users in `allowed_users`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The group to run as (a name; default: the user's primary group, or
    /// the agent's). A start request may name only groups in
    /// `allowed_groups`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// Where a child stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildState {
    /// Its process is running.
    Running,
    /// Waiting to be restarted.
    Backoff,
    /// Exited and will not be restarted.
    Exited,
    /// Stopped on request.
    Stopped,
}

#[derive(Debug, Clone)]
struct Status {
    pid: Option<u32>,
    state: ChildState,
    started: Option<Instant>,
    restarts: u32,
    last_exit: Option<String>,
}

struct Child {
    spec: StartSpec,
    status: Arc<Mutex<Status>>,
    stop: watch::Sender<Option<Duration>>,
    task: JoinHandle<()>,
}

/// The supervisor; cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    /// Swapped whole on reload (SIGHUP); each child keeps the one it started with.
    cfg: Arc<std::sync::RwLock<Arc<SupervisorConfig>>>,
    /// The sub-agent socket path, passed to children as `TETHER_AGENT_SOCKET`.
    socket: PathBuf,
    children: Arc<tokio::sync::Mutex<BTreeMap<String, Child>>>,
}

fn bad(message: impl Into<String>) -> Failure {
    Failure::tether("SupervisorError", message)
}

use crate::lock;

impl Supervisor {
    /// A supervisor with no children.
    pub fn new(cfg: SupervisorConfig, socket: PathBuf) -> Self {
        Self {
            cfg: Arc::new(std::sync::RwLock::new(Arc::new(cfg))),
            socket,
            children: Default::default(),
        }
    }

    fn cfg(&self) -> Arc<SupervisorConfig> {
        self.cfg
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Replace the configuration (allow-list, limits) for later requests.
    pub fn set_config(&self, cfg: SupervisorConfig) {
        match self.cfg.write() {
            Ok(mut c) => *c = Arc::new(cfg),
            Err(p) => *p.into_inner() = Arc::new(cfg),
        }
    }

    /// Handle a request to the supervisor target.
    pub async fn handle(&self, method: &str, args: &Value) -> Result<Value, Failure> {
        let name = || {
            args.get("name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad("missing string argument 'name'"))
        };
        match method {
            "start" => {
                let spec: StartSpec = serde_json::from_value(args.clone())
                    .map_err(|e| bad(format!("bad start request: {e}")))?;
                self.start(spec).await
            }
            "stop" => {
                let grace = args
                    .get("grace_ms")
                    .and_then(Value::as_u64)
                    .map(Duration::from_millis);
                self.stop(&name()?, grace).await
            }
            "restart" => {
                let n = name()?;
                let spec = {
                    let c = self.children.lock().await;
                    c.get(&n).map(|c| c.spec.clone())
                }
                .ok_or_else(|| bad(format!("no sub-agent named '{n}'")))?;
                self.stop(&n, None).await?;
                self.start(spec).await
            }
            "list" => Ok(self.list().await),
            other => Err(Failure::tether(
                "NoSuchMethod",
                format!("the supervisor has no method '{other}' (start, stop, restart, list)"),
            )),
        }
    }

    fn check_allowed(&self, program: &str) -> Result<PathBuf, Failure> {
        allowed_program(&self.cfg(), program)
    }

    fn check_env(&self, env: &BTreeMap<String, String>) -> Result<(), Failure> {
        let cfg = self.cfg();
        for name in env.keys() {
            if NEVER_ENV.iter().any(|p| env_matches(p, name)) {
                return Err(bad(format!(
                    "environment variable {name:?} may not be set by a start request"
                )));
            }
            if !cfg.allowed_env.iter().any(|p| env_matches(p, name)) {
                return Err(bad(format!(
                    "environment variable {name:?} is not in allowed_env of the agent's config"
                )));
            }
        }
        Ok(())
    }

    fn check_identity(&self, spec: &StartSpec) -> Result<(), Failure> {
        let cfg = self.cfg();
        if let Some(u) = spec
            .user
            .as_ref()
            .filter(|u| !cfg.allowed_users.contains(u))
        {
            return Err(bad(format!(
                "user '{u}' is not in allowed_users of the agent's config"
            )));
        }
        if let Some(g) = spec
            .group
            .as_ref()
            .filter(|g| !cfg.allowed_groups.contains(g))
        {
            return Err(bad(format!(
                "group '{g}' is not in allowed_groups of the agent's config"
            )));
        }
        Ok(())
    }

    /// Start a sub-agent on a request (from the host): its program must be
    /// allowed, and so must each variable of its environment and the user
    /// and group it asks for.
    pub async fn start(&self, spec: StartSpec) -> Result<Value, Failure> {
        self.check_env(&spec.env)?;
        self.check_identity(&spec)?;
        self.start_checked(spec).await
    }

    /// Start a sub-agent the agent's own config file names (written by
    /// whoever built the guest image: its environment is not checked; its
    /// program must still be allowed).
    pub async fn start_configured(&self, spec: StartSpec) -> Result<Value, Failure> {
        self.start_checked(spec).await
    }

    async fn start_checked(&self, spec: StartSpec) -> Result<Value, Failure> {
        if spec.name.is_empty() || spec.name.len() > 64 {
            return Err(bad("name must be 1 to 64 characters"));
        }
        let program = spec.argv.first().ok_or_else(|| bad("argv is empty"))?;
        let program = self.check_allowed(program)?;
        // Names that do not resolve are refused now, with the reason (each
        // start resolves them again).
        identity::resolve(spec.user.as_deref(), spec.group.as_deref()).map_err(bad)?;
        let mut children = self.children.lock().await;
        if let Some(c) = children.get(&spec.name) {
            let st = lock(&c.status).state;
            if matches!(st, ChildState::Running | ChildState::Backoff) {
                return Err(bad(format!("sub-agent '{}' is already running", spec.name)));
            }
        }
        let live = children
            .values()
            .filter(|c| {
                matches!(
                    lock(&c.status).state,
                    ChildState::Running | ChildState::Backoff
                )
            })
            .count();
        if live >= self.cfg().max_children {
            return Err(bad(format!(
                "already {live} sub-agents running (max_children)"
            )));
        }
        let status = Arc::new(Mutex::new(Status {
            pid: None,
            state: ChildState::Backoff,
            started: None,
            restarts: 0,
            last_exit: None,
        }));
        let (stop_tx, stop_rx) = watch::channel(None);
        let task = tokio::spawn(run_child(
            spec.clone(),
            program,
            self.socket.clone(),
            self.cfg.clone(),
            status.clone(),
            stop_rx,
        ));
        // Wait briefly for the first spawn so the answer says whether it ran.
        for _ in 0..50 {
            if lock(&status).pid.is_some() || lock(&status).last_exit.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let reply = status_json(&spec.name, &lock(&status));
        children.insert(
            spec.name.clone(),
            Child {
                spec,
                status,
                stop: stop_tx,
                task,
            },
        );
        Ok(reply)
    }

    /// Stop a sub-agent: SIGTERM to its process group, SIGKILL after the grace.
    pub async fn stop(&self, name: &str, grace: Option<Duration>) -> Result<Value, Failure> {
        let grace = grace.unwrap_or(Duration::from_millis(self.cfg().stop_grace_ms));
        let mut children = self.children.lock().await;
        let c = children
            .get_mut(name)
            .ok_or_else(|| bad(format!("no sub-agent named '{name}'")))?;
        let _ = c.stop.send(Some(grace));
        // The task ends within the grace plus the time SIGKILL takes.
        let _ = tokio::time::timeout(grace + Duration::from_secs(5), &mut c.task).await;
        Ok(status_json(name, &lock(&c.status)))
    }

    /// Stop every sub-agent (shutdown).
    pub async fn stop_all(&self, grace: Duration) {
        let names: Vec<String> = self.children.lock().await.keys().cloned().collect();
        let stops = names.iter().map(|n| self.stop(n, Some(grace)));
        futures_util::future::join_all(stops).await;
    }

    /// Every sub-agent with its state.
    pub async fn list(&self) -> Value {
        let c = self.children.lock().await;
        Value::Array(
            c.iter()
                .map(|(n, c)| status_json(n, &lock(&c.status)))
                .collect(),
        )
    }
}

fn status_json(name: &str, s: &Status) -> Value {
    json!({
        "name": name,
        "pid": s.pid,
        "state": s.state,
        "uptime_ms": s.started.filter(|_| s.state == ChildState::Running)
            .map(|t| t.elapsed().as_millis() as u64),
        "restarts": s.restarts,
        "last_exit": s.last_exit,
    })
}

/// A sub-agent the supervisor started dies with the agent (SIGKILL when
/// the agent's thread that started it ends — a tokio worker, which lives as
/// long as the agent): one killed with requests it had not confirmed must
/// not go on handling them while the restarted agent hands them to a new
/// sub-agent. systemd's control-group kill does the same on a restart.
/// It first takes the credentials it runs with, if any (the kernel clears
/// the parent-death signal on a change of credentials).
#[allow(unsafe_code)]
fn prepare_child(cmd: &mut Command, who: Option<Identity>) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only setgroups(2), setgid(2), setuid(2), prctl(2) and getppid(2), all
    // async-signal-safe; it allocates nothing (the group list was built
    // before the fork) and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(who) = &who {
                who.assume()?;
            }
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // The agent died before the prctl: go no further.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                return Err(std::io::Error::other("the agent is gone"));
            }
            Ok(())
        });
    }
}

/// `program` is the resolved path that was checked against the allow-list:
/// that file runs, not whatever a symlink in the request points to later;
/// each restart checks it against the allow-list in force then.
async fn run_child(
    spec: StartSpec,
    program: PathBuf,
    socket: PathBuf,
    live: Arc<std::sync::RwLock<Arc<SupervisorConfig>>>,
    status: Arc<Mutex<Status>>,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    let current = || {
        live.read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    };
    let cfg = current();
    let name = spec.name.clone();
    let mut backoff = crate::backoff::Backoff::new(
        Duration::from_millis(cfg.backoff_min_ms),
        Duration::from_millis(cfg.backoff_max_ms),
    );
    loop {
        let mut cmd = Command::new(&program);
        // The checked file runs under the name it was asked by (a
        // multi-call binary behind a symlink goes by its argv[0]).
        if let Some(a0) = spec.argv.first() {
            cmd.arg0(a0);
        }
        cmd.args(spec.argv.iter().skip(1))
            .envs(&spec.env)
            .env("TETHER_AGENT_SOCKET", &socket)
            .env("TETHER_SUBAGENT_NAME", &name);
        // systemd's variables are the agent's, not the sub-agent's.
        for v in crate::sd::CHILD_ENV {
            cmd.env_remove(v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let who = identity::resolve(spec.user.as_deref(), spec.group.as_deref());
        let who = match who {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(subagent = %name, reason = %e, "cannot start the sub-agent");
                None
            }
        };
        prepare_child(&mut cmd, who.clone().flatten());
        if let Some(d) = &spec.cwd {
            cmd.current_dir(d);
        }
        let started = Instant::now();
        let spawned = match who {
            Some(_) => cmd.spawn(),
            None => Err(std::io::Error::other(
                "its user or group no longer resolves",
            )),
        };
        let (failed, exit) = match spawned {
            Err(e) => (true, format!("spawn failed: {e}")),
            Ok(mut child) => {
                let pid = child.id();
                {
                    let mut s = lock(&status);
                    s.pid = pid;
                    s.state = ChildState::Running;
                    s.started = Some(started);
                }
                info!(subagent = %name, pid, "sub-agent started");
                if let Some(o) = child.stdout.take() {
                    tokio::spawn(pump_lines(o, name.clone(), "stdout", cfg.max_output_line));
                }
                if let Some(e) = child.stderr.take() {
                    tokio::spawn(pump_lines(e, name.clone(), "stderr", cfg.max_output_line));
                }
                let result = tokio::select! {
                    r = child.wait() => Some(r),
                    _ = stop.wait_for(Option::is_some) => None,
                };
                match result {
                    Some(Ok(st)) => (!st.success(), st.to_string()),
                    Some(Err(e)) => (true, format!("wait failed: {e}")),
                    None => {
                        let grace = (*stop.borrow()).unwrap_or_default();
                        let st = terminate(&mut child, pid, grace, &name).await;
                        let mut s = lock(&status);
                        s.pid = None;
                        s.state = ChildState::Stopped;
                        s.last_exit = Some(st);
                        info!(subagent = %name, "sub-agent stopped");
                        return;
                    }
                }
            }
        };
        let restart = match spec.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Never => false,
        };
        {
            let mut s = lock(&status);
            s.pid = None;
            s.last_exit = Some(exit.clone());
            s.state = if restart {
                ChildState::Backoff
            } else {
                ChildState::Exited
            };
        }
        if failed {
            warn!(subagent = %name, exit = %exit, restart, "sub-agent exited");
        } else {
            info!(subagent = %name, exit = %exit, restart, "sub-agent exited");
        }
        if !restart {
            return;
        }
        if started.elapsed() >= STABLE_RUN {
            backoff.reset();
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.wait()) => {}
            _ = stop.wait_for(Option::is_some) => {
                lock(&status).state = ChildState::Stopped;
                return;
            }
        }
        backoff.grow();
        lock(&status).restarts += 1;
        if let Err(f) = allowed_program(&current(), &program.to_string_lossy()) {
            warn!(subagent = %name, reason = %f.message, "sub-agent not restarted: no longer allowed");
            let mut s = lock(&status);
            s.state = ChildState::Exited;
            s.last_exit = Some(format!("not restarted: {}", f.message));
            return;
        }
    }
}

/// The resolved path of `program` if the allow-list of `cfg` has it.
fn allowed_program(cfg: &SupervisorConfig, program: &str) -> Result<PathBuf, Failure> {
    let p = Path::new(program);
    if !p.is_absolute() {
        return Err(bad(format!("'{program}' is not an absolute path")));
    }
    let real = p
        .canonicalize()
        .map_err(|e| bad(format!("cannot run '{program}': {e}")))?;
    let allowed = cfg
        .allowed_executables
        .iter()
        .any(|a| a.canonicalize().is_ok_and(|a| a == real));
    if allowed {
        Ok(real)
    } else {
        Err(bad(format!(
            "'{program}' is not in allowed_executables of the agent's config"
        )))
    }
}

/// SIGTERM the group, SIGKILL it after `grace`; reap the child.
async fn terminate(
    child: &mut tokio::process::Child,
    pid: Option<u32>,
    grace: Duration,
    name: &str,
) -> String {
    let group = pid.and_then(|p| i32::try_from(p).ok()).map(Pid::from_raw);
    if let Some(g) = group {
        let _ = killpg(g, Signal::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(st)) => {
            // The leader is gone; make sure nothing it started lingers.
            if let Some(g) = group {
                let _ = killpg(g, Signal::SIGKILL);
            }
            st.to_string()
        }
        _ => {
            warn!(subagent = %name, "sub-agent ignored SIGTERM; killing its process group");
            if let Some(g) = group {
                let _ = killpg(g, Signal::SIGKILL);
            }
            let _ = child.start_kill();
            match child.wait().await {
                Ok(st) => st.to_string(),
                Err(e) => format!("wait failed: {e}"),
            }
        }
    }
}

/// Copy a child's output into the log, line by line, cutting long lines.
async fn pump_lines(r: impl AsyncRead + Unpin, name: String, stream: &'static str, max: usize) {
    let mut r = BufReader::new(r);
    let mut line: Vec<u8> = Vec::new();
    let mut cut = false;
    loop {
        let (used, done) = match r.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(buf) => match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            },
        };
        if let Ok(buf) = r.fill_buf().await {
            let take = buf.get(..used).unwrap_or_default();
            let take = take.strip_suffix(b"\n").unwrap_or(take);
            let room = max.saturating_sub(line.len());
            cut |= take.len() > room;
            line.extend_from_slice(take.get(..room.min(take.len())).unwrap_or_default());
        }
        r.consume(used);
        if done {
            let text = String::from_utf8_lossy(&line);
            info!(subagent = %name, stream, truncated = cut, "{text}");
            line.clear();
            cut = false;
        }
    }
    if !line.is_empty() {
        info!(subagent = %name, stream, truncated = cut, "{}", String::from_utf8_lossy(&line));
    }
}
