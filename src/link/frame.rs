//! The wire form of one link frame.
//!
//! Every frame is a fixed 36-byte header followed by `len` payload bytes. All
//! integers are big-endian. The header checksum covers the header (including the
//! payload checksum field), so a false magic inside garbage is rejected as soon
//! as 36 bytes are buffered, without waiting for a payload that may never come.
//!
//! ```text
//!  0       4   5   6       8               16              24      28      32      36
//!  +-------+---+---+-------+---------------+---------------+-------+-------+-------+
//!  | magic |ver|typ| flags |      seq      |      ack      |  len  | pcrc  | hcrc  |
//!  +-------+---+---+-------+---------------+---------------+-------+-------+-------+
//! ```
//! The full description, with the exchanges, is in `docs/protocol.md`.

use bytes::{BufMut, Bytes, BytesMut};

/// Four bytes that start every frame: `0xE7 'T' 'H' 'R'`. The first byte is not
/// ASCII so that text noise on a serial line rarely looks like a frame start.
pub const MAGIC: [u8; 4] = [0xE7, b'T', b'H', b'R'];

/// Version of the frame header layout. A frame with another value in the
/// version byte is not parsed (the layout could differ) and is skipped as garbage.
pub const FRAME_VERSION: u8 = 1;

/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 36;

/// Byte offset of the header checksum (the last header field).
const HCRC_OFFSET: usize = 32;

/// Hard upper bound on a payload, whatever the configuration says: 16 MiB.
/// A length field above the configured maximum (itself at most this) is
/// rejected before anything is allocated for it.
pub const MAX_PAYLOAD_HARD: u32 = 16 * 1024 * 1024;

/// Frame types. The numeric values are part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Handshake, sent first on every connection (payload: [`crate::link::Hello`]).
    Hello = 1,
    /// An application message with a sequence number.
    Data = 2,
    /// A standalone cumulative acknowledgement (flag [`flags::NACK`]: "resend from ack+1").
    Ack = 3,
    /// Liveness and loss probe (payload: 8-byte nonce).
    Ping = 4,
    /// Answer to a PING, echoing its payload.
    Pong = 5,
    /// A fatal protocol complaint (payload: UTF-8 reason), sent before giving up.
    Error = 6,
}

impl FrameType {
    /// The type for a wire value, if known.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::Data,
            3 => Self::Ack,
            4 => Self::Ping,
            5 => Self::Pong,
            6 => Self::Error,
            _ => return None,
        })
    }
}

/// Flag bits in the header's `flags` field.
pub mod flags {
    /// On HELLO: this HELLO answers the peer's HELLO (do not answer it again).
    pub const REPLY: u16 = 0x0001;
    /// On ACK: a gap was seen; the sender should resend from `ack + 1`.
    pub const NACK: u16 = 0x0002;
}

/// One decoded or to-be-encoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What kind of frame this is.
    pub kind: FrameType,
    /// Flag bits, see [`flags`].
    pub flags: u16,
    /// Sequence number (DATA only; 0 on other types).
    pub seq: u64,
    /// Cumulative acknowledgement: every DATA up to and including this sequence
    /// number of the peer's current session has been received.
    pub ack: u64,
    /// Payload bytes.
    pub payload: Bytes,
}

impl Frame {
    /// A frame of `kind` with no flags, seq 0 and the given ack and payload.
    pub fn new(kind: FrameType, ack: u64, payload: Bytes) -> Self {
        Self {
            kind,
            flags: 0,
            seq: 0,
            ack,
            payload,
        }
    }

    /// Size of this frame on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN.saturating_add(self.payload.len())
    }

    /// Append the encoded frame to `dst`. The caller guarantees that the payload
    /// fits the negotiated maximum (the session never builds a larger one).
    pub fn encode_into(&self, dst: &mut BytesMut) {
        let len = u32::try_from(self.payload.len()).unwrap_or(u32::MAX);
        dst.reserve(self.wire_len());
        let start = dst.len();
        dst.put_slice(&MAGIC);
        dst.put_u8(FRAME_VERSION);
        dst.put_u8(self.kind as u8);
        dst.put_u16(self.flags);
        dst.put_u64(self.seq);
        dst.put_u64(self.ack);
        dst.put_u32(len);
        dst.put_u32(crc32c::crc32c(&self.payload));
        let hcrc = dst.get(start..).map(crc32c::crc32c).unwrap_or_default();
        dst.put_u32(hcrc);
        dst.put_slice(&self.payload);
    }
}

/// A header that passed its checksum, magic and version checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: Option<FrameType>,
    pub raw_kind: u8,
    pub flags: u16,
    pub seq: u64,
    pub ack: u64,
    pub len: u32,
    pub pcrc: u32,
}

/// Why a candidate header at a magic position was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderReject {
    Checksum,
    Version(u8),
}

fn be_u16(b: &[u8; HEADER_LEN], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}

fn be_u32(b: &[u8; HEADER_LEN], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

/// Parse a header that starts with [`MAGIC`]. The checksum is verified first,
/// then the version; the type may be unknown (the caller skips such frames).
pub(crate) fn parse_header(b: &[u8; HEADER_LEN]) -> Result<Header, HeaderReject> {
    let want = be_u32(b, HCRC_OFFSET);
    let got = b.get(..HCRC_OFFSET).map(crc32c::crc32c).unwrap_or_default();
    if want != got {
        return Err(HeaderReject::Checksum);
    }
    let version = b[4];
    if version != FRAME_VERSION {
        return Err(HeaderReject::Version(version));
    }
    let raw_kind = b[5];
    Ok(Header {
        kind: FrameType::from_u8(raw_kind),
        raw_kind,
        flags: be_u16(b, 6),
        seq: be_u64(b, 8),
        ack: be_u64(b, 16),
        len: be_u32(b, 24),
        pcrc: be_u32(b, 28),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let f = Frame {
            kind: FrameType::Data,
            flags: flags::NACK,
            seq: 7,
            ack: u64::MAX,
            payload: Bytes::from_static(b"abc"),
        };
        let mut buf = BytesMut::new();
        f.encode_into(&mut buf);
        assert_eq!(buf.len(), HEADER_LEN + 3);
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&buf[..HEADER_LEN]);
        let hdr = parse_header(&h).unwrap();
        assert_eq!(hdr.kind, Some(FrameType::Data));
        assert_eq!(
            (hdr.flags, hdr.seq, hdr.ack, hdr.len),
            (flags::NACK, 7, u64::MAX, 3)
        );
        assert_eq!(hdr.pcrc, crc32c::crc32c(b"abc"));
    }

    #[test]
    fn any_flipped_header_bit_is_caught() {
        let mut buf = BytesMut::new();
        Frame::new(FrameType::Ping, 3, Bytes::from_static(b"12345678")).encode_into(&mut buf);
        for bit in 0..(HEADER_LEN * 8) {
            let mut h = [0u8; HEADER_LEN];
            h.copy_from_slice(&buf[..HEADER_LEN]);
            h[bit / 8] ^= 1 << (bit % 8);
            assert!(parse_header(&h).is_err(), "bit {bit} flip accepted");
        }
    }
}
