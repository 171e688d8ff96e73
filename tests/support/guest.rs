//! A hostile (or just hand-driven) guest in the test process: it owns an
//! instance's channel socket and speaks the link protocol itself, so a test
//! can send any envelope the real agent never would.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tether::link::driver::{LinkReceiver, LinkSender, LinkTask, UnixAcceptor};
use tether::link::{Link, LinkEvent, LinkOptions};
use tether::rpc::{Kind, LinkMsg, Reply, Request, Target, new_unique_id};

use super::World;

use super::BOUND;

/// Listen on the instance's channel socket `<channels>/<uuid>.sock`, as
/// QEMU's chardev does (replacing a stale one).
fn listen(channels: &Path, uuid: &str) -> (PathBuf, tokio::net::UnixListener) {
    let path = channels.join(format!("{uuid}.sock"));
    let _ = std::fs::remove_file(&path);
    let l = tokio::net::UnixListener::bind(&path).expect("bind the channel socket");
    (path, l)
}

/// [`listen`], then take the proxy's connection (within [`BOUND`]).
async fn accept_proxy(channels: &Path, uuid: &str) -> tokio::net::UnixStream {
    let (_, l) = listen(channels, uuid);
    let (s, _) = tokio::time::timeout(BOUND, l.accept())
        .await
        .expect("the proxy connects")
        .unwrap();
    s
}

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
        Self::start_with(channels, uuid, LinkOptions::default())
    }

    /// [`FakeGuest::start`] with link options of its own (a session with a
    /// small window, say); the name is set here.
    pub fn start_with(channels: &Path, uuid: &str, opts: LinkOptions) -> Self {
        let (path, l) = listen(channels, uuid);
        let Link { tx, rx, task } = Link::spawn(
            UnixAcceptor::new(l),
            LinkOptions {
                name: format!("fake-{uuid}"),
                ..opts
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

/// Wait (bounded) for an audit record matching `ok`; it.
pub async fn audited(path: &Path, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        if let Some(v) = super::jsonl(path).into_iter().find(&ok) {
            return v;
        }
        assert!(
            t.elapsed() < BOUND,
            "no audit record {what}: {:#?}",
            super::jsonl(path)
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

/// The `[policy]` section of these tests: audit file and assignments in
/// the world's directory, `keys` (more `[policy]` keys), then `profiles`.
pub fn policy(w: &World, keys: &str, profiles: &str) -> String {
    std::fs::create_dir_all(w.path("instances")).unwrap();
    format!(
        "[policy]\naudit_log = {:?}\ninstances_dir = {:?}\n{keys}\n{profiles}\n",
        w.path("audit.jsonl"),
        w.path("instances")
    )
}

/// Assign `uuid` its policy (what provisioning writes).
pub fn assign(w: &World, uuid: &str, text: &str) {
    std::fs::write(w.path(&format!("instances/{uuid}.toml")), text).unwrap();
}

pub fn cast(target: Target, method: &str, ctx: Value) -> Request {
    Request {
        kind: Kind::Cast,
        target,
        method: method.into(),
        args: json!({"x": 1}),
        ctx,
        msg_id: None,
        unique_id: new_unique_id(),
        reply_to: None,
        timeout_ms: None,
    }
}

/// A host → guest call: `method` of `topic` with `args`, answered to
/// `msg_id`, given `timeout_ms` in the guest (a fresh unique id).
pub fn call_request(
    topic: &str,
    method: &str,
    args: Value,
    msg_id: &str,
    timeout_ms: u64,
) -> Request {
    Request {
        kind: Kind::Call,
        args,
        msg_id: Some(msg_id.into()),
        timeout_ms: Some(timeout_ms),
        ..cast(target(topic, None, None), method, json!({}))
    }
}

pub fn target(topic: &str, server: Option<&str>, exchange: Option<&str>) -> Target {
    Target {
        topic: topic.into(),
        server: server.map(String::from),
        exchange: exchange.map(String::from),
        ..Default::default()
    }
}

/// A HELLO from a hand-driven guest: its `session`, the `send_base` and
/// `window_frames` it likes (256 KiB payloads and window bytes).
pub fn hello_frame(session: u64, send_base: u64, window_frames: u32) -> tether::link::Frame {
    let h = tether::link::Hello {
        version: tether::link::hello::PROTOCOL_VERSION,
        capabilities: 0,
        session,
        peer_session: 0,
        next_expected: 1,
        send_base,
        max_payload: 262_144,
        window_frames,
        window_bytes: 262_144,
    };
    tether::link::Frame::new(tether::link::FrameType::Hello, 0, h.encode())
}

/// A guest that speaks the link protocol by hand, frame by frame: it says
/// HELLO with the window it likes, sends DATA without waiting for the
/// proxy's window, reads (and discards) whatever the proxy sends, and never
/// acknowledges any of it.
pub struct RawGuest {
    /// Its session id.
    pub session: u64,
    w: tokio::net::unix::OwnedWriteHalf,
    next_seq: u64,
    /// Bytes the proxy sent it.
    pub received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    drain: tokio::task::JoinHandle<()>,
}

impl RawGuest {
    /// Listen on the instance's channel socket, take the proxy's connection
    /// and say HELLO asking for `window_frames`.
    pub async fn start(channels: &Path, uuid: &str, window_frames: u32) -> Self {
        use tokio::io::AsyncReadExt;
        let s = accept_proxy(channels, uuid).await;
        let (mut r, w) = s.into_split();
        let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let got = received.clone();
        let drain = tokio::spawn(async move {
            let mut b = vec![0u8; 65536];
            while let Ok(n) = r.read(&mut b).await {
                if n == 0 {
                    break;
                }
                got.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let session = tether::random_session_id();
        let mut g = Self {
            session,
            w,
            next_seq: 1,
            received,
            drain,
        };
        g.frame(hello_frame(session, 1, window_frames)).await;
        g
    }

    /// Write one frame as it is.
    pub async fn frame(&mut self, f: tether::link::Frame) {
        use tokio::io::AsyncWriteExt;
        let mut b = bytes::BytesMut::new();
        f.encode_into(&mut b);
        self.w.write_all(&b).await.expect("write to the proxy");
    }

    /// Write raw bytes (headers, garbage).
    pub async fn frame_bytes(&mut self, b: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.w.write_all(b).await.expect("write to the proxy");
    }

    /// Send `m` as the next DATA frame (acknowledging nothing).
    pub async fn send(&mut self, m: &LinkMsg) {
        let mut f = tether::link::Frame::new(tether::link::FrameType::Data, 0, m.to_bytes());
        f.seq = self.next_seq;
        self.next_seq += 1;
        self.frame(f).await;
    }
}

impl Drop for RawGuest {
    fn drop(&mut self) {
        self.drain.abort();
    }
}

/// A guest that floods casts as fast as its socket takes them, by hand:
/// pre-encoded DATA frames, as many as the proxy's window (1,024 frames)
/// allows — which the proxy acknowledges on receipt — while it reads what
/// the proxy sends, acknowledges it at once, collects the `refused`
/// notices, and — as a real peer does — sends again from where a NACK
/// says. It plays an agent far faster than the proxy can refuse (a debug
/// build's [`FakeGuest`] is not).
pub struct FloodGuest {
    /// The unique ids of the casts sent.
    pub sent: std::collections::HashSet<String>,
    /// `refused` notices received: (unique_id, reason).
    pub refusals: tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

/// The proxy's default window: what [`FloodGuest`] keeps unacknowledged.
const PROXY_WINDOW: u64 = 1024;

impl FloodGuest {
    /// Take the proxy's connection on the instance's channel socket, say
    /// HELLO asking for `window_frames`, announce `topic`, then send the
    /// casts `make` builds, `n` of them.
    pub async fn start(
        channels: &Path,
        uuid: &str,
        window_frames: u32,
        topic: &str,
        n: usize,
        make: impl Fn() -> Request,
    ) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        use tether::link::{Frame, FrameType, frame::flags};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_util::codec::Decoder;
        let s = accept_proxy(channels, uuid).await;
        let (mut r, mut w) = s.into_split();
        let mut msgs = vec![LinkMsg::Topics {
            topics: vec![topic.into()],
        }];
        let mut sent = std::collections::HashSet::new();
        for _ in 0..n {
            let c = make();
            sent.insert(c.unique_id.clone());
            msgs.push(LinkMsg::Req(c));
        }
        // What it received (to acknowledge), what the proxy acknowledged
        // (its window), where a NACK asks it to resume (0: none); the
        // reader wakes the writer for each.
        let (got, acked, resume) = (
            std::sync::Arc::new(AtomicU64::new(0)),
            std::sync::Arc::new(AtomicU64::new(0)),
            std::sync::Arc::new(AtomicU64::new(0)),
        );
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        let (tx, refusals) = tokio::sync::mpsc::unbounded_channel();
        let reader = {
            let (got, acked, resume, wake) =
                (got.clone(), acked.clone(), resume.clone(), wake.clone());
            tokio::spawn(async move {
                let mut codec = tether::link::FrameCodec::new(262_144);
                let mut b = bytes::BytesMut::with_capacity(65536);
                while let Ok(n) = r.read_buf(&mut b).await {
                    if n == 0 {
                        break;
                    }
                    while let Ok(Some(f)) = codec.decode(&mut b) {
                        acked.fetch_max(f.ack, Ordering::Relaxed);
                        match f.kind {
                            FrameType::Data => {
                                got.fetch_max(f.seq, Ordering::Relaxed);
                                if let Ok(LinkMsg::Refused { unique_id, reason }) =
                                    LinkMsg::from_bytes(&f.payload)
                                {
                                    let _ = tx.send((unique_id, reason));
                                }
                            }
                            FrameType::Ack if f.flags & flags::NACK != 0 => {
                                resume.store(f.ack + 1, Ordering::Relaxed)
                            }
                            _ => {}
                        }
                    }
                    wake.notify_one();
                }
            })
        };
        let session = tether::random_session_id();
        let writer = tokio::spawn(async move {
            let mut b = bytes::BytesMut::new();
            hello_frame(session, 1, window_frames).encode_into(&mut b);
            let frames: Vec<Frame> = msgs
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let mut f = Frame::new(FrameType::Data, 0, m.to_bytes());
                    f.seq = i as u64 + 1;
                    f
                })
                .collect();
            let (mut next, mut ack_sent) = (1u64, 0u64);
            loop {
                let from = resume.swap(0, Ordering::Relaxed);
                if from != 0 {
                    next = next.min(from);
                }
                // Up to 64 frames a write, within the proxy's window, then
                // an ACK of what it got.
                let limit = acked.load(Ordering::Relaxed) + PROXY_WINDOW;
                for f in frames.iter().skip(next as usize - 1).take(64) {
                    if f.seq > limit {
                        break;
                    }
                    f.encode_into(&mut b);
                    next += 1;
                }
                let ack = got.load(Ordering::Relaxed);
                if ack > ack_sent {
                    Frame::new(FrameType::Ack, ack, bytes::Bytes::new()).encode_into(&mut b);
                    ack_sent = ack;
                }
                if b.is_empty() {
                    // Nothing to send: until the proxy sends something.
                    let _ = tokio::time::timeout(Duration::from_millis(50), wake.notified()).await;
                    continue;
                }
                if w.write_all(&b).await.is_err() {
                    break;
                }
                b.clear();
            }
        });
        Self {
            sent,
            refusals,
            reader,
            writer,
        }
    }
}

impl Drop for FloodGuest {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}
