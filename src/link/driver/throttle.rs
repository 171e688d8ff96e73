//! A read rate limit for one link: what a peer sends is read at most at
//! `rate` bytes per second (bursts of a tenth of a second), so one peer —
//! a hostile guest flooding garbage or frames — costs the process a bounded
//! share of CPU however fast it writes. Past the rate the link simply reads
//! later: the peer's writes block on its full socket, nothing is lost.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The smallest burst: a maximal frame of the default size and its header.
const MIN_BURST: f64 = 256.0 * 1024.0 + 64.0;
/// Scratch for one limited read.
const SCRATCH: usize = 64 * 1024;

/// `inner`, read at most at `rate` bytes per second (0: no limit).
pub struct Throttled<R> {
    inner: R,
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    sleep: Pin<Box<Sleep>>,
    scratch: Vec<u8>,
}

impl<R> Throttled<R> {
    /// Wrap `inner`.
    pub fn new(inner: R, rate: u64) -> Self {
        let rate = rate as f64;
        let burst = (rate / 10.0).max(MIN_BURST);
        Self {
            inner,
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            scratch: Vec::new(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Throttled<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.rate <= 0.0 {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        this.refill();
        // Out of tokens, wait for a whole scratch's worth rather than a
        // byte: a flooding peer is then read in few large reads (each read,
        // wake-up and decode round costs far more than its bytes; small
        // reads made a 32 MiB/s flood cost a whole core). A peer within its
        // rate always has the burst and never waits here.
        let chunk = (SCRATCH as f64).min(this.burst);
        if this.tokens < chunk {
            let wait = Duration::from_secs_f64((chunk - this.tokens) / this.rate)
                .max(Duration::from_millis(1));
            this.sleep.as_mut().reset(Instant::now() + wait);
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.refill();
        }
        let allow = (this.tokens as usize)
            .clamp(1, SCRATCH)
            .min(buf.remaining());
        if this.scratch.len() < allow {
            this.scratch.resize(allow, 0);
        }
        let Some(scratch) = this.scratch.get_mut(..allow) else {
            return Poll::Ready(Ok(()));
        };
        let mut sub = ReadBuf::new(scratch);
        match Pin::new(&mut this.inner).poll_read(cx, &mut sub) {
            Poll::Ready(Ok(())) => {
                let n = sub.filled().len();
                buf.put_slice(sub.filled());
                this.tokens -= n as f64;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn reads_at_most_the_rate() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let data = vec![7u8; 1 << 20];
        tokio::spawn(async move { a.write_all(&data).await });
        // 1 MiB at 2 MiB/s (a 256 KiB burst first): about 0.375 s.
        let mut t = Throttled::new(b, 2 << 20);
        let start = Instant::now();
        let mut got = vec![0u8; 1 << 20];
        t.read_exact(&mut got).await.unwrap();
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(350), "{took:?}");
        assert!(got.iter().all(|b| *b == 7));
    }

    /// A peer writing faster than the rate is read in whole scratch-sized
    /// reads once its burst is spent, not a few bytes per timer tick (each
    /// read and wake-up costs far more than its bytes: small reads made a
    /// 32 MiB/s flood cost the proxy a whole core).
    #[tokio::test(start_paused = true)]
    async fn a_flood_is_read_in_large_reads() {
        let (mut a, b) = tokio::io::duplex(4 << 20);
        tokio::spawn(async move {
            let chunk = vec![1u8; 4096];
            while a.write_all(&chunk).await.is_ok() {}
        });
        let mut t = Throttled::new(b, 1 << 20);
        let mut buf = vec![0u8; 1 << 20];
        // The burst first (at least MIN_BURST, in reads of up to SCRATCH).
        let mut burst = 0usize;
        while burst < MIN_BURST as usize - SCRATCH {
            burst += t.read(&mut buf).await.unwrap();
        }
        let mut sizes = vec![];
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            sizes.push(t.read(&mut buf).await.unwrap());
        }
        let small = sizes.iter().filter(|n| **n < SCRATCH / 2).count();
        assert!(
            small <= 2,
            "{small} small reads of {}: {sizes:?}",
            sizes.len()
        );
        // And still at the rate: about 2 MiB in 2 s.
        let total: usize = sizes.iter().sum();
        assert!(total <= (2 << 20) + 2 * SCRATCH, "{total}");
    }
}
