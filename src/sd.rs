//! systemd notifications, through the `sd-notify` crate: readiness, status,
//! reloads and a watchdog that pings only while the daemon's own loops
//! answer. Harmless when not run by systemd (no `$NOTIFY_SOCKET`: nothing
//! is sent).
//!
//! The notification variables are not inherited by the processes a daemon
//! starts: the agent's supervisor removes [`CHILD_ENV`] from every
//! sub-agent's environment (a sub-agent's `READY=1` must not stand for the
//! agent's). They are not unset in the daemon's own environment: that is
//! only sound before any thread starts, and the crate's `*_and_unset_env`
//! functions are `unsafe` for that reason; removing them per child is the
//! safe way to the same end.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::{mpsc, oneshot};

/// The variables systemd passes its service that a child must not inherit:
/// notification and watchdog, and socket activation's.
pub const CHILD_ENV: [&str; 6] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// Longest `STATUS=` text sent: a status line, not a log (systemd shows it
/// in `systemctl status`).
const MAX_STATUS: usize = 200;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Cut `s` to [`MAX_STATUS`] bytes at a character boundary, one line.
fn status_text(s: &str) -> String {
    let mut out: String = s.replace('\n', " ");
    if out.len() > MAX_STATUS {
        let mut cut = MAX_STATUS;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// Startup finished: the daemon serves. `status` says what it is doing.
pub fn ready(status: &str) {
    send(&[
        NotifyState::Ready,
        NotifyState::Status(&status_text(status)),
    ]);
}

/// A reload ended (`READY=1` again); the status line stays.
pub fn reloaded() {
    send(&[NotifyState::Ready]);
}

/// A new status line (shown by `systemctl status`).
pub fn status(status: &str) {
    send(&[NotifyState::Status(&status_text(status))]);
}

/// A reload started (`RELOADING=1` with the monotonic time systemd 253+
/// requires of `Type=notify-reload` services); end it with [`ready`].
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Shutdown started.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// How often to ping the watchdog systemd asked for: twice per period, as
/// sd_watchdog_enabled(3) advises. None without a watchdog (or when it is
/// meant for another process).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// A loop the watchdog asks before each ping: the loop answers from its
/// own `select!` ([`Probe::answer`]), so a loop that is stuck — or gone —
/// stops the pings and systemd restarts the daemon.
pub struct Probe {
    rx: mpsc::Receiver<oneshot::Sender<()>>,
}

/// The watchdog's side of a [`Probe`].
#[derive(Clone)]
pub struct ProbeHandle {
    name: &'static str,
    tx: mpsc::Sender<oneshot::Sender<()>>,
}

/// A probe for the loop called `name` (for the log when it does not answer).
pub fn probe(name: &'static str) -> (ProbeHandle, Probe) {
    // One question at a time: the watchdog waits for each answer.
    let (tx, rx) = mpsc::channel(1);
    (ProbeHandle { name, tx }, Probe { rx })
}

impl Probe {
    /// The next question; answer it with [`Probe::answer`]. Pending forever
    /// once the watchdog is gone (a `select!` arm that never fires).
    pub async fn asked(&mut self) -> oneshot::Sender<()> {
        match self.rx.recv().await {
            Some(q) => q,
            None => std::future::pending().await,
        }
    }

    /// Answer a question: this loop is alive.
    pub fn answer(q: oneshot::Sender<()>) {
        let _ = q.send(());
    }
}

impl ProbeHandle {
    /// Whether the loop answered within `within`.
    async fn alive(&self, within: Duration) -> bool {
        let (q, a) = oneshot::channel();
        let asked = async { self.tx.send(q).await.is_ok() && a.await.is_ok() };
        tokio::time::timeout(within, asked).await.unwrap_or(false)
    }
}

/// Ping the watchdog every `every` for as long as each of `loops` answers
/// within that time; when one does not, say so (once per lapse) and skip
/// the ping. Run it as a task of the daemon's runtime, so a stalled runtime
/// stops it as well.
pub async fn watchdog(every: Duration, loops: Vec<ProbeHandle>) {
    watch_loops(every, loops, || send(&[NotifyState::Watchdog])).await
}

/// [`watchdog`] with the ping as a parameter (tested without systemd).
async fn watch_loops(every: Duration, loops: Vec<ProbeHandle>, mut ping: impl FnMut()) {
    let mut t = tokio::time::interval(every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lapsed: Option<&'static str> = None;
    loop {
        t.tick().await;
        let mut dead = None;
        for l in &loops {
            if !l.alive(every).await {
                dead = Some(l.name);
                break;
            }
        }
        match dead {
            None => {
                if let Some(name) = lapsed.take() {
                    tracing::info!(r#loop = name, "answering again: watchdog pings resume");
                }
                ping();
            }
            Some(name) => {
                if lapsed.is_none() {
                    tracing::error!(
                        r#loop = name,
                        "not answering: watchdog pings stop (systemd restarts the daemon when its WatchdogSec runs out)"
                    );
                }
                lapsed = Some(name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_one_bounded_line() {
        let long = "é".repeat(300);
        let s = status_text(&long);
        assert!(s.len() <= MAX_STATUS);
        assert!(s.chars().all(|c| c == 'é'));
        assert_eq!(status_text("a\nb"), "a b");
    }

    #[tokio::test]
    async fn a_probe_answers_while_its_loop_runs_and_not_after() {
        let (h, mut p) = probe("test");
        let running = tokio::spawn(async move {
            for _ in 0..2 {
                Probe::answer(p.asked().await);
            }
            p // stops answering but stays alive
        });
        assert!(h.alive(Duration::from_secs(30)).await);
        assert!(h.alive(Duration::from_secs(30)).await);
        let _p = running.await.unwrap();
        assert!(
            !h.alive(Duration::from_millis(50)).await,
            "a loop that stopped answering"
        );
        drop(_p);
        assert!(
            !h.alive(Duration::from_secs(30)).await,
            "a loop that is gone"
        );
    }

    /// The watchdog pings while the loop answers, and stops when it does
    /// not (paused time: the test takes no real time).
    #[tokio::test(start_paused = true)]
    async fn pings_stop_when_a_loop_stops_answering() {
        let every = Duration::from_secs(1);
        let (h, mut p) = probe("test");
        let looping = tokio::spawn(async move {
            for _ in 0..3 {
                Probe::answer(p.asked().await);
            }
            std::future::pending::<()>().await; // stuck, probe held
            drop(p);
        });
        let pings = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = pings.clone();
        let dog = watch_loops(every, vec![h], move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        assert!(tokio::time::timeout(every * 20, dog).await.is_err());
        assert_eq!(pings.load(std::sync::atomic::Ordering::Relaxed), 3);
        looping.abort();
    }
}
