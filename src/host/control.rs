//! The control socket: JSON lines from operators and tools (`tetherctl`),
//! specified in `docs/control.md`. Each request may carry an `id`, echoed in
//! its response; requests on one connection run concurrently.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_util::codec::{Framed, LinesCodec, LinesCodecError};
use tracing::{debug, info, warn};

use super::Proxy;
use super::receipts::Outcome;
use crate::guest::supervisor::SUPERVISOR_TOPIC;
use crate::link::SendError;
use crate::link::driver::QuietUnixStream;
use crate::rpc::{Kind, Request, Target, new_unique_id};

/// Requests in progress per control connection; more wait their turn.
pub const MAX_CLIENT_INFLIGHT: usize = 256;

/// A call or cast into one instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Invoke {
    instance: String,
    topic: String,
    method: String,
    #[serde(default)]
    args: Value,
    #[serde(default)]
    ctx: Value,
    timeout_ms: Option<u64>,
    unique_id: Option<String>,
}

impl Invoke {
    /// The link request for instance `server`.
    fn into_request(
        self,
        server: &str,
        kind: Kind,
        msg_id: Option<String>,
        timeout_ms: Option<u64>,
    ) -> Request {
        Request {
            kind,
            target: Target {
                topic: self.topic,
                server: Some(server.to_string()),
                ..Default::default()
            },
            method: self.method,
            args: self.args,
            ctx: self.ctx,
            msg_id,
            unique_id: self.unique_id.unwrap_or_else(new_unique_id),
            reply_to: None,
            timeout_ms,
        }
    }

    /// A call to the guest's built-in supervisor.
    fn supervisor(instance: String, method: &str, args: Value, timeout_ms: Option<u64>) -> Self {
        Self {
            instance,
            topic: SUPERVISOR_TOPIC.into(),
            method: method.into(),
            args,
            ctx: json!({}),
            timeout_ms,
            unique_id: None,
        }
    }
}

/// A control request (the `id` field is handled around it).
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum CtlRequest {
    Call(Invoke),
    Cast(Invoke),
    Fanout {
        topic: String,
        method: String,
        #[serde(default)]
        args: Value,
        #[serde(default)]
        ctx: Value,
        timeout_ms: Option<u64>,
    },
    Links,
    Broker,
    Policy {
        instance: String,
    },
    Agents {
        instance: String,
        timeout_ms: Option<u64>,
    },
    StartAgent {
        instance: String,
        name: String,
        argv: Vec<String>,
        #[serde(default)]
        env: Map<String, Value>,
        cwd: Option<String>,
        restart: Option<String>,
        user: Option<String>,
        group: Option<String>,
        timeout_ms: Option<u64>,
    },
    StopAgent {
        instance: String,
        name: String,
        grace_ms: Option<u64>,
        timeout_ms: Option<u64>,
    },
    RestartAgent {
        instance: String,
        name: String,
        timeout_ms: Option<u64>,
    },
    Watch,
}

/// A failed request, as the client sees it.
#[derive(Debug)]
struct CtlError {
    kind: &'static str,
    message: String,
    extra: Option<Value>,
}

fn err(kind: &'static str, message: impl Into<String>) -> CtlError {
    CtlError {
        kind,
        message: message.into(),
        extra: None,
    }
}

impl CtlError {
    fn to_json(&self) -> Value {
        let mut e = json!({"kind": self.kind, "message": self.message});
        if let (Some(Value::Object(x)), Value::Object(m)) = (&self.extra, &mut e) {
            for (k, v) in x {
                m.insert(k.clone(), v.clone());
            }
        }
        e
    }
}

/// Bind the socket with mode 0600, or 0660 for `group`
/// ([`crate::daemon::bind_unix_for`]).
pub fn bind(path: &Path, group: Option<&str>) -> std::io::Result<UnixListener> {
    crate::daemon::bind_unix_for(path, group)
}

/// Serve control clients forever: at most `max_control_clients` at once,
/// with `max_control_bytes` of requests in progress between them.
pub async fn serve(listener: UnixListener, proxy: Arc<Proxy>) {
    let clients = Arc::new(Semaphore::new(proxy.cfg.max_control_clients));
    let bytes = Arc::new(Semaphore::new(proxy.cfg.max_control_bytes));
    // Who connects is logged (the kernel's word for it: SO_PEERCRED), within
    // a log budget: a client connecting in a loop does not decide the log's
    // volume (the lines it costs past the budget are counted in the next).
    let mut log = crate::logbudget::LogBudget::new();
    let mut accept_failures = AcceptFailures::default();
    loop {
        match listener.accept().await {
            Ok((s, _)) => match clients.clone().try_acquire_owned() {
                Ok(permit) => {
                    if let Some(suppressed) = log.allow(std::time::Instant::now()) {
                        match s.peer_cred() {
                            Ok(c) => info!(
                                uid = c.uid(),
                                gid = c.gid(),
                                pid = c.pid(),
                                suppressed,
                                "control client connected"
                            ),
                            Err(e) => {
                                warn!(error = %e, suppressed, "control client connected; its credentials are unknown")
                            }
                        }
                    }
                    let (p, b) = (proxy.clone(), bytes.clone());
                    tokio::spawn(async move {
                        client(s, p, b).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    let n = proxy.cfg.max_control_clients;
                    tokio::spawn(async move {
                        let e = err(
                            "overloaded",
                            format!(
                                "the proxy serves {n} control connections at once (max_control_clients); try again"
                            ),
                        );
                        let mut f = Framed::new(s, LinesCodec::new());
                        let line =
                            json!({"id": null, "ok": false, "error": e.to_json()}).to_string();
                        let _ = tokio::time::timeout(Duration::from_secs(1), f.send(line)).await;
                    });
                }
            },
            Err(e) => {
                if let Some(n) = accept_failures.failed(std::time::Instant::now()) {
                    let hint = if e.raw_os_error() == Some(nix::libc::EMFILE) {
                        "; the proxy is out of file descriptors: raise its open-file limit (LimitNOFILE) above max_links"
                    } else {
                        ""
                    };
                    warn!(error = %e, failures = n, "control socket accept failed{hint} (retried every 100 ms; logged again once a minute while it lasts)");
                }
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        }
        if let Some(n) = accept_failures.recovered() {
            info!(failures = n, "control socket accepting again");
        }
    }
}

/// Wait before accepting again after a failed accept (out of descriptors).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// While accepts keep failing, one log line per this long.
const ACCEPT_FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Failed accepts in a row: logged when they start, then once per
/// [`ACCEPT_FAILURE_LOG_EVERY`] with their count, and once when they end —
/// an exhausted descriptor table does not fill the log ten lines a second.
#[derive(Default)]
struct AcceptFailures {
    count: u64,
    logged: Option<std::time::Instant>,
}

impl AcceptFailures {
    /// One more failure at `now`: `Some(count)` if it is to be logged.
    fn failed(&mut self, now: std::time::Instant) -> Option<u64> {
        self.count = self.count.saturating_add(1);
        let due = self
            .logged
            .is_none_or(|t| now.saturating_duration_since(t) >= ACCEPT_FAILURE_LOG_EVERY);
        due.then(|| {
            self.logged = Some(now);
            self.count
        })
    }

    /// An accept succeeded: `Some(count)` if failures came before it.
    fn recovered(&mut self) -> Option<u64> {
        self.logged = None;
        (self.count > 0).then(|| std::mem::take(&mut self.count))
    }
}

async fn client(s: UnixStream, proxy: Arc<Proxy>, bytes: Arc<Semaphore>) {
    // Woken to read only, not each time the client reads an answer
    // (QuietUnixStream).
    let s = match QuietUnixStream::from_tokio(s) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "control client dropped: its socket could not be registered");
            return;
        }
    };
    let mut framed = Framed::new(s, LinesCodec::new_with_max_length(proxy.cfg.max_line));
    let (out_tx, mut out_rx) = mpsc::channel::<Value>(MAX_CLIENT_INFLIGHT);
    let slots = Arc::new(Semaphore::new(MAX_CLIENT_INFLIGHT));
    let mut watching: Option<(Value, broadcast::Receiver<Value>)> = None;
    loop {
        tokio::select! {
            Some(v) = out_rx.recv() => {
                if framed.send(v.to_string()).await.is_err() {
                    break;
                }
            }
            ev = async {
                match &mut watching {
                    Some((_, rx)) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let line = match ev {
                    Ok(e) => json!({"event": e}),
                    Err(broadcast::error::RecvError::Lagged(n)) => json!({"lagged": n}),
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if framed.send(line.to_string()).await.is_err() {
                    break;
                }
            }
            line = framed.next() => match line {
                Some(Ok(line)) if line.trim().is_empty() => {}
                Some(Ok(line)) => {
                    let (id, req) = parse(&line);
                    match req {
                        Err(e) => {
                            let _ = out_tx.send(json!({"id": id, "ok": false, "error": e.to_json()})).await;
                        }
                        Ok(CtlRequest::Watch) => {
                            watching = Some((id.clone(), proxy.subscribe()));
                            let _ = out_tx.send(json!({"id": id, "ok": true, "result": "watching"})).await;
                        }
                        Ok(req) => {
                            let Ok(permit) = slots.clone().acquire_owned().await else { break };
                            // Bounded by max_control_bytes ≥ max_line ≥ this line.
                            let cost = u32::try_from(line.len().max(1)).unwrap_or(u32::MAX);
                            let Ok(held) = bytes.clone().acquire_many_owned(cost).await else { break };
                            let (p, tx) = (proxy.clone(), out_tx.clone());
                            tokio::spawn(async move {
                                let resp = match handle(&p, req).await {
                                    Ok(r) => json!({"id": id, "ok": true, "result": r}),
                                    Err(e) => json!({"id": id, "ok": false, "error": e.to_json()}),
                                };
                                let _ = tx.send(resp).await;
                                drop((permit, held));
                            });
                        }
                    }
                }
                Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                    let e = err("too_large", format!("request longer than {} bytes; connection closed", proxy.cfg.max_line));
                    let _ = framed.send(json!({"id": null, "ok": false, "error": e.to_json()}).to_string()).await;
                    break;
                }
                Some(Err(e)) => {
                    debug!(error = %e, "control client failed");
                    break;
                }
                None => break,
            },
        }
    }
}

fn parse(line: &str) -> (Value, Result<CtlRequest, CtlError>) {
    let mut v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return (
                Value::Null,
                Err(err("bad_request", format!("not JSON: {e}"))),
            );
        }
    };
    let id = v
        .as_object_mut()
        .and_then(|m| m.remove("id"))
        .unwrap_or(Value::Null);
    let req = serde_json::from_value(v).map_err(|e| err("bad_request", e.to_string()));
    (id, req)
}

fn timeout(p: &Proxy, ms: Option<u64>) -> Duration {
    Duration::from_millis(ms.unwrap_or(p.cfg.default_timeout_ms).max(1))
}

async fn handle(p: &Proxy, req: CtlRequest) -> Result<Value, CtlError> {
    match req {
        CtlRequest::Call(inv) => call(p, inv).await,
        CtlRequest::Cast(inv) => cast(p, inv, Kind::Cast).await,
        CtlRequest::Fanout {
            topic,
            method,
            args,
            ctx,
            timeout_ms,
        } => {
            let targets: Vec<String> = p
                .instances()
                .into_iter()
                .filter(|i| i.topics().contains(&topic))
                .map(|i| i.id.clone())
                .collect();
            // One unique id for the whole fanout: each guest sees it once.
            let uid = new_unique_id();
            let sends = targets.iter().map(|i| {
                let inv = Invoke {
                    instance: i.clone(),
                    topic: topic.clone(),
                    method: method.clone(),
                    args: args.clone(),
                    ctx: ctx.clone(),
                    timeout_ms,
                    unique_id: Some(uid.clone()),
                };
                cast(p, inv, Kind::Fanout)
            });
            let results = futures_util::future::join_all(sends).await;
            let mut delivered = vec![];
            let mut failed = vec![];
            for (i, r) in targets.into_iter().zip(results) {
                match r {
                    Ok(_) => delivered.push(json!(i)),
                    Err(e) => failed.push(json!({"instance": i, "error": e.to_json()})),
                }
            }
            Ok(json!({"delivered": delivered, "failed": failed}))
        }
        CtlRequest::Links => Ok(Value::Array(
            p.instances().iter().map(|i| i.status_json()).collect(),
        )),
        CtlRequest::Broker => {
            let mut v = serde_json::to_value(p.bridge.get()).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert("configured".into(), json!(p.cfg.broker.enabled()));
            }
            Ok(v)
        }
        CtlRequest::Policy { instance } => {
            if !super::channels::is_uuid(&instance) {
                return Err(err("bad_request", "instance must be a uuid"));
            }
            let (linked, e) = p.policy_of(&instance);
            Ok(json!({"linked": linked, "policy": *e}))
        }
        CtlRequest::Agents {
            instance,
            timeout_ms,
        } => {
            call(
                p,
                Invoke::supervisor(instance, "list", json!({}), timeout_ms),
            )
            .await
        }
        CtlRequest::StartAgent {
            instance,
            name,
            argv,
            env,
            cwd,
            restart,
            user,
            group,
            timeout_ms,
        } => {
            let mut args = json!({"name": name, "argv": argv, "env": env});
            if let Value::Object(m) = &mut args {
                let optional = [
                    ("cwd", cwd),
                    ("restart", restart),
                    ("user", user),
                    ("group", group),
                ];
                for (k, v) in optional {
                    if let Some(v) = v {
                        m.insert(k.into(), json!(v));
                    }
                }
            }
            call(p, Invoke::supervisor(instance, "start", args, timeout_ms)).await
        }
        CtlRequest::StopAgent {
            instance,
            name,
            grace_ms,
            timeout_ms,
        } => {
            let args = json!({"name": name, "grace_ms": grace_ms});
            call(p, Invoke::supervisor(instance, "stop", args, timeout_ms)).await
        }
        CtlRequest::RestartAgent {
            instance,
            name,
            timeout_ms,
        } => {
            let args = json!({ "name": name });
            call(p, Invoke::supervisor(instance, "restart", args, timeout_ms)).await
        }
        CtlRequest::Watch => Err(err("bad_request", "watch is handled per connection")),
    }
}

fn not_connected(instance: &str) -> CtlError {
    err(
        "not_connected",
        format!(
            "no channel for instance {instance}: is the VM running on this host, with its socket in the channels directory?"
        ),
    )
}

fn send_error(e: SendError) -> CtlError {
    match e {
        SendError::TooLarge { .. } => err("too_large", e.to_string()),
        _ => err("not_connected", e.to_string()),
    }
}

fn lookup(p: &Proxy, instance: &str) -> Result<Arc<super::instance::Instance>, CtlError> {
    p.instance(instance).ok_or_else(|| not_connected(instance))
}

async fn call(p: &Proxy, inv: Invoke) -> Result<Value, CtlError> {
    let t = timeout(p, inv.timeout_ms);
    let inst = lookup(p, &inv.instance)?;
    let msg_id = new_unique_id();
    // Sealed with no reply queue: if the VM moves before answering, the
    // destination's proxy can tell a genuine answer (shown to its
    // watchers; there is no caller there) from a forged one.
    let (handle, rx) = inst.expect_call(&msg_id, false, ("", &msg_id), t);
    let mut req = inv.into_request(
        &inst.id,
        Kind::Call,
        Some(msg_id.clone()),
        Some(t.as_millis() as u64),
    );
    req.reply_to = handle;
    let uid = req.unique_id.clone();
    let queued = std::sync::atomic::AtomicBool::new(false);
    let res = tokio::time::timeout(t, async {
        // The receipt matters to the proxy (an untaken call goes to a new
        // guest session); the caller waits for the reply.
        let _taken = inst
            .send_request(&req, Some(&msg_id))
            .await
            .map_err(send_error)?;
        queued.store(true, std::sync::atomic::Ordering::Relaxed);
        rx.await
            .map_err(|_| err("not_connected", "the instance's link closed"))
    })
    .await;
    let reply = match res {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            inst.forget(&msg_id);
            inst.withdraw(&uid);
            return Err(e);
        }
        Err(_) => return Err(call_timed_out(&inst, &msg_id, &uid, t, queued.into_inner()).await),
    };
    match reply.failure {
        Some(f) => Err(CtlError {
            kind: "remote",
            message: f.message.clone(),
            extra: Some(json!({"class": f.class, "module": f.module})),
        }),
        None => Ok(reply.result.unwrap_or(Value::Null)),
    }
}

/// The agent's own `stats` (`tether.agent`), for [`super::agent_stats`]:
/// a call like any control call, answered within `wait`; an error says why
/// not.
pub(crate) async fn agent_stats(
    p: &Proxy,
    instance: &str,
    wait: Duration,
) -> Result<Value, String> {
    let inv = Invoke {
        instance: instance.to_string(),
        topic: crate::guest::router::AGENT_TOPIC.into(),
        method: "stats".into(),
        args: json!({}),
        ctx: json!({}),
        timeout_ms: Some(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
        unique_id: None,
    };
    call(p, inv)
        .await
        .map_err(|e| format!("{}: {}", e.kind, e.message))
}

/// How long a timed-out call's caller waits, at most, for the agent to say
/// whether it withdrew the call (one link round trip, normally well under
/// a second; longer only when the guest is not reading).
pub const CANCEL_WAIT: Duration = Duration::from_secs(5);

/// The answer to a caller whose call got no reply within `t`: the call is
/// withdrawn if no sub-agent took it yet, and the caller is told which way
/// it went (`outcome`: `not_queued`, `withdrawn`, `taken` or `unknown`).
async fn call_timed_out(
    inst: &super::instance::Instance,
    msg_id: &str,
    uid: &str,
    t: Duration,
    queued: bool,
) -> CtlError {
    let established = inst.tx.status().established;
    let kind = if established {
        "timeout"
    } else {
        "not_connected"
    };
    let head = if established {
        format!("no reply within {} ms", t.as_millis())
    } else {
        format!(
            "the agent of instance {} is not connected (no reply within {} ms)",
            inst.id,
            t.as_millis()
        )
    };
    if !queued {
        // Never handed to the link (the guest was not taking its
        // requests): nothing was kept.
        inst.forget(msg_id);
        let m = format!("{head}; the call was not queued: it will not run");
        return outcome(kind, m, "not_queued");
    }
    let taken = |head: &str| {
        let m = format!(
            "{head}; a sub-agent took the call: it may have run or still be running (its answer is dropped)"
        );
        outcome(kind, m, "taken")
    };
    let Some(rx) = inst.cancel_call(msg_id, uid) else {
        return taken(&head);
    };
    let waited = if established {
        tokio::time::timeout(CANCEL_WAIT, rx).await.ok()
    } else {
        None
    };
    match waited {
        Some(Ok(Outcome::Taken)) => taken(&head),
        Some(Ok(Outcome::Refused(reason))) => {
            let m = format!(
                "{head}; the agent withdrew the call before a sub-agent took it: it will not run ({reason})"
            );
            outcome(kind, m, "withdrawn")
        }
        Some(Ok(Outcome::Lost(why))) => {
            let m = format!("{head}; the call will not be delivered: {why}");
            outcome(kind, m, "withdrawn")
        }
        Some(Err(_)) | None => {
            let m = format!(
                "{head}; the proxy told the agent to withdraw the call and has no answer yet: it runs only if a sub-agent took it before that reaches the agent"
            );
            outcome(kind, m, "unknown")
        }
    }
}

fn outcome(kind: &'static str, message: String, outcome: &str) -> CtlError {
    CtlError {
        kind,
        message,
        extra: Some(json!({ "outcome": outcome })),
    }
}

async fn cast(p: &Proxy, inv: Invoke, kind: Kind) -> Result<Value, CtlError> {
    let t = timeout(p, inv.timeout_ms);
    let inst = lookup(p, &inv.instance)?;
    let req = inv.into_request(&inst.id, kind, None, None);
    let uid = req.unique_id.clone();
    // A caller's timeout too large for the clock waits as long as one can.
    let now = tokio::time::Instant::now();
    let deadline = now
        .checked_add(t)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365));
    let kind_now = |inst: &super::instance::Instance| {
        if inst.tx.status().established {
            "timeout"
        } else {
            "not_connected"
        }
    };
    // Two steps, so the caller learns which: not queued (the proxy keeps
    // nothing; it will not be delivered), or queued and not yet taken (the
    // proxy keeps it and delivers it, to a new guest session if need be).
    let taken = match tokio::time::timeout_at(deadline, inst.send_request(&req, None)).await {
        Ok(Ok(rx)) => rx,
        Ok(Err(e)) => return Err(send_error(e)),
        Err(_) => {
            return Err(err(
                kind_now(&inst),
                format!(
                    "the cast was not queued within {} ms (the guest is not taking its requests): it will not be delivered; retry with unique_id {uid}",
                    t.as_millis()
                ),
            ));
        }
    };
    match tokio::time::timeout_at(deadline, taken).await {
        Ok(Ok(Outcome::Taken)) => Ok(json!({"unique_id": uid})),
        Ok(Ok(Outcome::Refused(reason))) => Err(err(
            "refused",
            format!("the guest refused the cast: {reason}"),
        )),
        Ok(Ok(Outcome::Lost(why))) => Err(err(
            "not_delivered",
            format!("the cast will not be delivered: {why}"),
        )),
        Ok(Err(_)) => Err(err("not_connected", "the instance's link closed")),
        Err(_) => Err(err(
            kind_now(&inst),
            format!(
                "no sub-agent took the cast within {} ms; while the instance's channel is on this host the proxy keeps it and delivers it when a sub-agent takes it (retrying with unique_id {uid} is safe: it is not sent twice)",
                t.as_millis()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_accepts_are_logged_when_they_start_once_a_minute_and_when_they_end() {
        let mut f = AcceptFailures::default();
        let t = std::time::Instant::now();
        assert_eq!(f.recovered(), None, "nothing failed");
        assert_eq!(f.failed(t), Some(1));
        // Ten a second for a minute: nothing more logged.
        let quiet = (1..600)
            .filter(|i| f.failed(t + ACCEPT_RETRY * *i).is_some())
            .count();
        assert_eq!(quiet, 0);
        assert_eq!(f.failed(t + ACCEPT_FAILURE_LOG_EVERY), Some(601));
        assert_eq!(f.recovered(), Some(601));
        assert_eq!(f.recovered(), None);
        assert_eq!(
            f.failed(t + ACCEPT_FAILURE_LOG_EVERY),
            Some(1),
            "a new run is logged at once"
        );
    }
}
