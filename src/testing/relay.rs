//! A fault-injecting UNIX socket relay: put it between any two link peers
//! (driver and driver, proxy and agent) to reset connections at random points,
//! cut frames in half and inject garbage, the way a virtio-serial channel
//! misbehaves at resets and migrations.
//!
//! The relay listens on `listen`; for every client it connects to `upstream`
//! and copies bytes both ways. When a cut comes, bytes not yet forwarded are
//! dropped and both sockets are closed, like QEMU discarding a virtqueue.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::SplitMix64;

/// What faults to inject. Changeable while running ([`FaultRelay::set_faults`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RelayFaults {
    /// Cut each connection after a random number of bytes (per direction) in
    /// this inclusive range; `None` never cuts on its own.
    pub cut_after: Option<(u64, u64)>,
    /// Probability per forwarded chunk of injecting garbage before it.
    pub garbage_chance: f64,
    /// Most garbage bytes per injection.
    pub garbage_max: usize,
    /// Forward in chunks of 1..=max_chunk bytes (fragments frames).
    pub max_chunk: usize,
}

impl RelayFaults {
    /// A transparent relay.
    pub fn none() -> Self {
        Self {
            cut_after: None,
            garbage_chance: 0.0,
            garbage_max: 0,
            max_chunk: 64 * 1024,
        }
    }
}

/// What the relay did so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// Client connections accepted.
    pub connections: u64,
    /// Connections cut by a fault or [`FaultRelay::cut`].
    pub cuts: u64,
    /// Garbage bytes injected.
    pub garbage_bytes: u64,
    /// Bytes forwarded (both directions).
    pub forwarded: u64,
}

/// A running relay; dropping it stops it and closes its connections.
pub struct FaultRelay {
    path: PathBuf,
    faults: Arc<Mutex<RelayFaults>>,
    stats: Arc<Mutex<RelayStats>>,
    cut_tx: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl FaultRelay {
    /// Listen on `listen` and relay every client to `upstream`.
    pub fn start(
        listen: &Path,
        upstream: &Path,
        faults: RelayFaults,
        seed: u64,
    ) -> std::io::Result<Self> {
        let listener = UnixListener::bind(listen)?;
        let faults = Arc::new(Mutex::new(faults));
        let stats = Arc::new(Mutex::new(RelayStats::default()));
        let (cut_tx, cut_rx) = watch::channel(0u64);
        let task = tokio::spawn(accept_loop(
            listener,
            upstream.to_path_buf(),
            faults.clone(),
            stats.clone(),
            cut_rx,
            seed,
        ));
        Ok(Self {
            path: listen.to_path_buf(),
            faults,
            stats,
            cut_tx,
            task,
        })
    }

    /// The path clients connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replace the fault settings (for example, none for a quiet period).
    pub fn set_faults(&self, f: RelayFaults) {
        if let Ok(mut g) = self.faults.lock() {
            *g = f;
        }
    }

    /// Cut every current connection now.
    pub fn cut(&self) {
        self.cut_tx.send_modify(|g| *g += 1);
    }

    /// Counters so far.
    pub fn stats(&self) -> RelayStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }
}

impl Drop for FaultRelay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept_loop(
    listener: UnixListener,
    upstream: PathBuf,
    faults: Arc<Mutex<RelayFaults>>,
    stats: Arc<Mutex<RelayStats>>,
    cut_rx: watch::Receiver<u64>,
    seed: u64,
) {
    let mut rng = SplitMix64::new(seed);
    while let Ok((front, _)) = listener.accept().await {
        let Ok(back) = UnixStream::connect(&upstream).await else {
            // Upstream not there: drop the client, as a dead chardev would.
            continue;
        };
        if let Ok(mut s) = stats.lock() {
            s.connections += 1;
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let (fr, fw) = front.into_split();
        let (br, bw) = back.into_split();
        for (r, w) in [(fr, bw), (br, fw)] {
            let pipe = Pipe {
                faults: faults.clone(),
                stats: stats.clone(),
                rng: SplitMix64::new(rng.next_u64()),
                stop_tx: stop_tx.clone(),
            };
            tokio::spawn(pipe.run(r, w, stop_rx.clone(), cut_rx.clone()));
        }
    }
}

struct Pipe {
    faults: Arc<Mutex<RelayFaults>>,
    stats: Arc<Mutex<RelayStats>>,
    rng: SplitMix64,
    stop_tx: watch::Sender<bool>,
}

impl Pipe {
    fn faults(&self) -> RelayFaults {
        self.faults
            .lock()
            .map(|f| f.clone())
            .unwrap_or_else(|_| RelayFaults::none())
    }

    fn count(&self, f: impl FnOnce(&mut RelayStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }

    async fn run(
        mut self,
        mut r: OwnedReadHalf,
        mut w: OwnedWriteHalf,
        mut stop: watch::Receiver<bool>,
        mut cut: watch::Receiver<u64>,
    ) {
        cut.mark_unchanged();
        let mut budget = self
            .faults()
            .cut_after
            .map(|(lo, hi)| lo + self.rng.below(hi.saturating_sub(lo) + 1));
        let mut buf = vec![0u8; 64 * 1024];
        let cut_by_fault = loop {
            let n = tokio::select! {
                _ = stop.changed() => break false,
                _ = cut.changed() => break true,
                r = r.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break false,
                    Ok(n) => n,
                },
            };
            let f = self.faults();
            let mut data = buf.get(..n).unwrap_or_default();
            let mut cut_now = false;
            while !data.is_empty() {
                let chunk =
                    (1 + self.rng.below(f.max_chunk.max(1) as u64) as usize).min(data.len());
                let (mut piece, rest) = data.split_at(chunk);
                data = rest;
                if let Some(b) = budget.as_mut() {
                    if (piece.len() as u64) >= *b {
                        piece = piece.get(..*b as usize).unwrap_or_default();
                        cut_now = true;
                    } else {
                        *b -= piece.len() as u64;
                    }
                }
                if f.garbage_max > 0 && self.rng.chance(f.garbage_chance) {
                    let len = 1 + self.rng.below(f.garbage_max as u64) as usize;
                    let g = self.rng.bytes(len);
                    self.count(|s| s.garbage_bytes += g.len() as u64);
                    if w.write_all(&g).await.is_err() {
                        break;
                    }
                }
                if w.write_all(piece).await.is_err() {
                    cut_now = false;
                    data = &[];
                    break;
                }
                self.count(|s| s.forwarded += piece.len() as u64);
                if cut_now {
                    break;
                }
            }
            if cut_now {
                break true;
            }
        };
        if cut_by_fault {
            self.count(|s| s.cuts += 1);
        }
        // Both directions end together: a reset closes the whole channel.
        let _ = self.stop_tx.send(true);
    }
}
