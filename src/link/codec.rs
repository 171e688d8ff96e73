//! Byte stream ⇄ frames, with resynchronisation after garbage.
//!
//! `tokio_util::codec::Framed` stops at the first decoder error, so this decoder
//! never returns one for bad data: it skips to the next magic and goes on,
//! counting what it skipped. Its buffer never holds more than one maximal frame
//! plus whatever one read added, because bytes with no magic in them are dropped
//! at once (all but the last three, which could be the start of a magic).

use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::frame::{
    Frame, HEADER_LEN, Header, HeaderReject, MAGIC, MAX_PAYLOAD_HARD, parse_header,
};

/// Counters of what the decoder had to skip. They only grow.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecodeStats {
    /// Frames decoded and handed on.
    pub frames: u64,
    /// Bytes skipped while looking for a magic or after a rejected candidate.
    pub skipped_bytes: u64,
    /// Candidates whose header checksum failed.
    pub bad_header: u64,
    /// Candidates with an unsupported header version.
    pub bad_version: u64,
    /// Headers whose payload checksum failed (truncated or corrupted frames).
    pub bad_payload: u64,
    /// Headers announcing a payload above the maximum.
    pub oversize: u64,
    /// Intact frames of an unknown type, skipped whole.
    pub unknown_type: u64,
}

impl DecodeStats {
    /// Everything that was rejected, in candidates (not bytes).
    pub fn rejected(&self) -> u64 {
        self.bad_header + self.bad_version + self.bad_payload + self.oversize + self.unknown_type
    }
}

/// The link frame codec. One per connection: a new connection starts clean.
#[derive(Debug)]
pub struct FrameCodec {
    max_payload: u32,
    pending: Option<Header>,
    stats: DecodeStats,
    /// Bytes left of the last frame whose payload checksum failed, from
    /// the start of the buffer: the region a rescan looks in again.
    failed_left: usize,
}

impl FrameCodec {
    /// A codec that accepts payloads up to `max_payload` bytes (clamped to
    /// [`MAX_PAYLOAD_HARD`]).
    pub fn new(max_payload: u32) -> Self {
        Self {
            max_payload: max_payload.min(MAX_PAYLOAD_HARD),
            pending: None,
            stats: DecodeStats::default(),
            failed_left: 0,
        }
    }

    /// `n` bytes left the front of the buffer.
    fn advanced(&mut self, n: usize) {
        self.failed_left = self.failed_left.saturating_sub(n);
    }

    /// What has been skipped so far.
    pub fn stats(&self) -> DecodeStats {
        self.stats
    }

    /// Drop the first byte of the current candidate and look again.
    fn skip_one(&mut self, buf: &mut BytesMut) {
        buf.advance(1);
        self.advanced(1);
        self.stats.skipped_bytes += 1;
    }

    /// Drop bytes before the next magic. Returns false if none is buffered.
    fn seek_magic(&mut self, buf: &mut BytesMut) -> bool {
        if let Some(pos) = buf.windows(MAGIC.len()).position(|w| w == MAGIC) {
            buf.advance(pos);
            self.advanced(pos);
            self.stats.skipped_bytes += pos as u64;
            return true;
        }
        // Keep a possible magic prefix at the end.
        let keep = buf.len().min(MAGIC.len() - 1);
        let drop = buf.len() - keep;
        buf.advance(drop);
        self.advanced(drop);
        self.stats.skipped_bytes += drop as u64;
        false
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        loop {
            let header = match self.pending {
                Some(h) => h,
                None => {
                    if !self.seek_magic(buf) || buf.len() < HEADER_LEN {
                        return Ok(None);
                    }
                    let mut raw = [0u8; HEADER_LEN];
                    if let Some(src) = buf.get(..HEADER_LEN) {
                        raw.copy_from_slice(src);
                    }
                    match parse_header(&raw) {
                        Err(HeaderReject::Checksum) => {
                            self.stats.bad_header += 1;
                            self.skip_one(buf);
                            continue;
                        }
                        Err(HeaderReject::Version(_)) => {
                            self.stats.bad_version += 1;
                            self.skip_one(buf);
                            continue;
                        }
                        Ok(h) if h.len > self.max_payload => {
                            // Rejected before any allocation for it.
                            self.stats.oversize += 1;
                            self.skip_one(buf);
                            continue;
                        }
                        Ok(h) => {
                            self.pending = Some(h);
                            h
                        }
                    }
                }
            };
            // len <= max_payload <= 16 MiB, so this cannot overflow on any target
            // where usize is at least 32 bits; saturating anyway.
            let total = HEADER_LEN.saturating_add(header.len as usize);
            if buf.len() < total {
                buf.reserve(total - buf.len());
                return Ok(None);
            }
            self.pending = None;
            let payload_ok = buf
                .get(HEADER_LEN..total)
                .map(|p| crc32c::crc32c(p) == header.pcrc)
                .unwrap_or(false);
            if !payload_ok {
                self.stats.bad_payload += 1;
                if self.failed_left > 0 {
                    // A second failure inside a failed frame's bytes: a peer
                    // chaining headers that announce long payloads (each
                    // rescan would checksum a maximum payload for every 36
                    // bytes received). Skip the rest of the first frame, so
                    // each byte is checksummed at most a few times.
                    let n = self.failed_left.min(buf.len());
                    buf.advance(n);
                    self.advanced(n);
                    self.stats.skipped_bytes += n as u64;
                } else {
                    // Most often a frame cut short by a reset, with the next
                    // frames' bytes counted as its payload: rescan from the
                    // byte after the magic, and find them.
                    self.failed_left = total;
                    self.skip_one(buf);
                }
                continue;
            }
            let mut frame_bytes = buf.split_to(total);
            self.advanced(total);
            let Some(kind) = header.kind else {
                self.stats.unknown_type += 1;
                self.stats.skipped_bytes += total as u64;
                continue;
            };
            let payload = frame_bytes.split_off(HEADER_LEN).freeze();
            self.stats.frames += 1;
            return Ok(Some(Frame {
                kind,
                flags: header.flags,
                seq: header.seq,
                ack: header.ack,
                payload,
            }));
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        // A half frame at end of stream is what a reset leaves behind: not an
        // error, just bytes that will be resent on the next connection.
        match self.decode(buf)? {
            Some(f) => Ok(Some(f)),
            None => {
                self.stats.skipped_bytes += buf.len() as u64;
                buf.clear();
                self.pending = None;
                self.failed_left = 0;
                Ok(None)
            }
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), Self::Error> {
        frame.encode_into(dst);
        Ok(())
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), Self::Error> {
        frame.encode_into(dst);
        Ok(())
    }
}
