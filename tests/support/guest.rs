//! A hostile (or just hand-driven) guest in the test process: it owns an
//! instance's channel socket and speaks the link protocol itself, so a test
//! can send any envelope the real agent never would.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tether::link::driver::{LinkReceiver, LinkSender, LinkTask, UnixAcceptor};
use tether::link::{Link, LinkEvent, LinkOptions};
use tether::rpc::{LinkMsg, Reply, Request};

use super::BOUND;

/// A guest whose "virtio port" is `<channels>/<uuid>.sock`.
pub struct FakeGuest {
    pub tx: LinkSender,
    rx: LinkReceiver,
    task: Option<LinkTask>,
    path: PathBuf,
}

impl FakeGuest {
    /// Listen on the instance's channel socket, as QEMU's chardev does.
    pub fn start(channels: &Path, uuid: &str) -> Self {
        let path = channels.join(format!("{uuid}.sock"));
        let _ = std::fs::remove_file(&path);
        let l = tokio::net::UnixListener::bind(&path).expect("bind the channel socket");
        let Link { tx, rx, task } = Link::spawn(
            UnixAcceptor::new(l),
            LinkOptions {
                name: format!("fake-{uuid}"),
                ..LinkOptions::default()
            },
            tether::random_session_id(),
        );
        Self {
            tx,
            rx,
            task: Some(task),
            path,
        }
    }

    /// Send one link message (queued; the link delivers it).
    pub async fn send(&self, m: LinkMsg) {
        self.tx.send(m.to_bytes()).await.expect("send");
    }

    /// Announce topics.
    pub async fn topics(&self, topics: &[&str]) {
        let topics = topics.iter().map(|s| s.to_string()).collect();
        self.send(LinkMsg::Topics { topics }).await;
    }

    /// The next message from the host, within [`BOUND`].
    pub async fn next(&mut self) -> LinkMsg {
        let t = Instant::now();
        loop {
            let left = BOUND.saturating_sub(t.elapsed());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(LinkEvent::Message(b))) => {
                    return LinkMsg::from_bytes(&b).expect("the host sent a well-formed message");
                }
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the fake guest's link ended"),
                Err(_) => panic!("the host sent nothing within {BOUND:?}"),
            }
        }
    }

    /// The next request from the host.
    pub async fn next_request(&mut self) -> Request {
        match self.next().await {
            LinkMsg::Req(r) => r,
            m => panic!("expected a request, got {m:?}"),
        }
    }

    /// The next `refused` notice: (unique_id, reason).
    pub async fn next_refusal(&mut self) -> (String, String) {
        match self.next().await {
            LinkMsg::Refused { unique_id, reason } => (unique_id, reason),
            m => panic!("expected a refusal, got {m:?}"),
        }
    }

    /// Reply `result` to call `msg_id` with routing `reply_to`.
    pub async fn reply(&self, msg_id: &str, reply_to: Option<String>, result: Value) {
        self.send(LinkMsg::Rep(Reply::new(
            msg_id.into(),
            reply_to,
            Ok(result),
        )))
        .await;
    }

    /// Stop the link and remove the socket (the VM left this host).
    pub async fn leave(mut self) {
        if let Some(t) = self.task.take() {
            t.close().await;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Every line of an audit log, each parsed as JSON (a line that is not
/// JSON fails the test).
pub fn audit_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line not JSON ({e}): {l}"))
        })
        .collect()
}

/// Wait (bounded) for an audit record matching `ok`; it.
pub async fn audited(path: &Path, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        if let Some(v) = audit_lines(path).into_iter().find(&ok) {
            return v;
        }
        assert!(
            t.elapsed() < BOUND,
            "no audit record {what}: {:#?}",
            audit_lines(path)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A reply key file (32 random-enough bytes, mode 0600) at `path`.
pub fn reply_key(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let k: Vec<u8> = (0..4)
        .flat_map(|_| tether::random_u64().to_le_bytes())
        .collect();
    std::fs::write(path, k).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
