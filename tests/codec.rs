//! Frame codec: every fragmentation case by name, limits, resynchronisation,
//! and property tests over any chunking and any garbage.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tether::link::frame::{HEADER_LEN, MAGIC, flags};
use tether::link::{Frame, FrameCodec, FrameType};
use tokio_util::codec::Decoder;

const MAX: u32 = 4096;

fn data(seq: u64, payload: &[u8]) -> Frame {
    Frame {
        kind: FrameType::Data,
        flags: 0,
        seq,
        ack: seq.saturating_sub(1),
        payload: Bytes::copy_from_slice(payload),
    }
}

fn encode(frames: &[Frame]) -> Vec<u8> {
    let mut b = BytesMut::new();
    for f in frames {
        f.encode_into(&mut b);
    }
    b.to_vec()
}

/// Feed `stream` in the given chunk sizes (cycled) and collect every frame.
fn decode_chunked(codec: &mut FrameCodec, stream: &[u8], chunks: &[usize]) -> Vec<Frame> {
    let mut buf = BytesMut::new();
    let mut out = vec![];
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() {
        let n = chunks[i % chunks.len()].max(1).min(stream.len() - at);
        i += 1;
        buf.extend_from_slice(&stream[at..at + n]);
        at += n;
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            out.push(f);
        }
        // Bounded buffer: never more than one maximal frame plus one chunk.
        assert!(buf.len() <= HEADER_LEN + MAX as usize + n + MAGIC.len());
    }
    out
}

fn three() -> Vec<Frame> {
    vec![data(1, b"one"), data(2, &[7u8; 300]), data(3, b"")]
}

#[test]
fn whole_frames_in_one_read() {
    let fs = three();
    let got = decode_chunked(&mut FrameCodec::new(MAX), &encode(&fs), &[usize::MAX]);
    assert_eq!(got, fs);
}

#[test]
fn header_split_across_reads() {
    let fs = vec![data(1, b"hello")];
    for cut in 1..HEADER_LEN {
        let got = decode_chunked(&mut FrameCodec::new(MAX), &encode(&fs), &[cut, usize::MAX]);
        assert_eq!(got, fs, "cut at {cut}");
    }
}

#[test]
fn payload_split_across_reads() {
    let fs = vec![data(1, &[9u8; 100])];
    for cut in HEADER_LEN + 1..HEADER_LEN + 100 {
        let got = decode_chunked(&mut FrameCodec::new(MAX), &encode(&fs), &[cut, usize::MAX]);
        assert_eq!(got, fs, "cut at {cut}");
    }
}

#[test]
fn one_byte_at_a_time() {
    let fs = three();
    let got = decode_chunked(&mut FrameCodec::new(MAX), &encode(&fs), &[1]);
    assert_eq!(got, fs);
}

#[test]
fn many_frames_in_one_read() {
    let fs: Vec<Frame> = (1..=500).map(|i| data(i, &i.to_be_bytes())).collect();
    let got = decode_chunked(&mut FrameCodec::new(MAX), &encode(&fs), &[usize::MAX]);
    assert_eq!(got, fs);
}

#[test]
fn max_size_payload_is_accepted() {
    let fs = vec![data(1, &vec![0xAB; MAX as usize])];
    let got = decode_chunked(&mut FrameCodec::new(MAX), &encode(&fs), &[1000]);
    assert_eq!(got, fs);
}

#[test]
fn max_plus_one_is_rejected_without_allocation_and_the_next_frame_survives() {
    let big = data(1, &vec![0xAB; MAX as usize + 1]);
    let small = data(2, b"after");
    let mut codec = FrameCodec::new(MAX);
    let mut buf = BytesMut::from(&encode(&[big])[..HEADER_LEN]);
    let cap_before = buf.capacity();
    assert!(codec.decode(&mut buf).unwrap().is_none());
    assert_eq!(codec.stats().oversize, 1);
    assert!(
        buf.capacity() <= cap_before,
        "reserved space for a rejected frame"
    );
    let got = decode_chunked(
        &mut codec,
        &encode(std::slice::from_ref(&small)),
        &[usize::MAX],
    );
    assert_eq!(got, vec![small]);
}

#[test]
fn length_field_of_u32_max_is_harmless() {
    // A hand-made header with a valid checksum and len = u32::MAX.
    let mut f = BytesMut::new();
    data(1, b"").encode_into(&mut f);
    let mut h = f.to_vec();
    h[24..28].copy_from_slice(&u32::MAX.to_be_bytes());
    let crc = crc32c::crc32c(&h[..32]);
    h[32..36].copy_from_slice(&crc.to_be_bytes());
    let mut codec = FrameCodec::new(tether::link::frame::MAX_PAYLOAD_HARD);
    let mut buf = BytesMut::from(&h[..]);
    assert!(codec.decode(&mut buf).unwrap().is_none());
    assert_eq!(codec.stats().oversize, 1);
}

#[test]
fn garbage_before_between_and_after_frames() {
    let fs = three();
    let mut s = b"noise\xE7T".to_vec();
    let enc: Vec<Vec<u8>> = fs.iter().map(|f| encode(std::slice::from_ref(f))).collect();
    s.extend_from_slice(&enc[0]);
    s.extend_from_slice(&MAGIC); // a lone magic
    s.extend_from_slice(b"more noise");
    s.extend_from_slice(&enc[1]);
    s.extend_from_slice(&enc[2]);
    s.extend_from_slice(b"trailing");
    let mut codec = FrameCodec::new(MAX);
    let got = decode_chunked(&mut codec, &s, &[7]);
    assert_eq!(got, fs);
    assert!(codec.stats().skipped_bytes > 0);
}

#[test]
fn truncated_frame_followed_by_a_whole_one() {
    // What a reset mid-write leaves: half a frame, then the resend.
    let a = encode(&[data(1, &[1u8; 200])]);
    let b = encode(&[data(1, &[1u8; 200])]);
    let mut s = a[..120].to_vec();
    s.extend_from_slice(&b);
    // Pad so the truncated frame's claimed length is buffered.
    s.extend_from_slice(&encode(&[data(2, b"pad")]));
    let mut codec = FrameCodec::new(MAX);
    let got = decode_chunked(&mut codec, &s, &[64]);
    assert_eq!(got, vec![data(1, &[1u8; 200]), data(2, b"pad")]);
    assert_eq!(codec.stats().bad_payload, 1);
}

#[test]
fn bad_payload_checksum_is_skipped() {
    let mut s = encode(&[data(1, b"abcdef")]);
    let last = s.len() - 1;
    s[last] ^= 0xFF;
    s.extend_from_slice(&encode(&[data(2, b"ok")]));
    let mut codec = FrameCodec::new(MAX);
    let got = decode_chunked(&mut codec, &s, &[usize::MAX]);
    assert_eq!(got, vec![data(2, b"ok")]);
}

#[test]
fn unknown_type_is_skipped_whole() {
    let mut s = encode(&[data(1, b"x")]);
    s[5] = 99;
    let crc = crc32c::crc32c(&s[..32]);
    s[32..36].copy_from_slice(&crc.to_be_bytes());
    s.extend_from_slice(&encode(&[data(2, b"y")]));
    let mut codec = FrameCodec::new(MAX);
    assert_eq!(decode_chunked(&mut codec, &s, &[3]), vec![data(2, b"y")]);
    assert_eq!(codec.stats().unknown_type, 1);
}

#[test]
fn garbage_without_magic_does_not_accumulate() {
    let mut codec = FrameCodec::new(MAX);
    let mut buf = BytesMut::new();
    for _ in 0..1000 {
        buf.extend_from_slice(&[0x55u8; 1024]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(buf.len() < MAGIC.len());
    }
    assert_eq!(codec.stats().skipped_bytes, 1024 * 1000 - buf.len() as u64);
}

#[test]
fn flags_survive() {
    let mut f = data(0, b"");
    f.kind = FrameType::Ack;
    f.flags = flags::NACK;
    let got = decode_chunked(
        &mut FrameCodec::new(MAX),
        &encode(std::slice::from_ref(&f)),
        &[5],
    );
    assert_eq!(got, vec![f]);
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    (
        prop::sample::select(vec![
            FrameType::Hello,
            FrameType::Data,
            FrameType::Ack,
            FrameType::Ping,
            FrameType::Pong,
            FrameType::Error,
        ]),
        any::<u16>(),
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(kind, flags, seq, ack, p)| Frame {
            kind,
            flags,
            seq,
            ack,
            payload: Bytes::from(p),
        })
}

proptest! {
    #[test]
    fn round_trip(f in arb_frame()) {
        let got = decode_chunked(&mut FrameCodec::new(MAX), &encode(std::slice::from_ref(&f)), &[usize::MAX]);
        prop_assert_eq!(got, vec![f]);
    }

    #[test]
    fn any_chunking_yields_the_same_frames(
        fs in prop::collection::vec(arb_frame(), 1..20),
        chunks in prop::collection::vec(1usize..200, 1..10),
    ) {
        let got = decode_chunked(&mut FrameCodec::new(MAX), &encode(&fs), &chunks);
        prop_assert_eq!(got, fs);
    }

    #[test]
    fn garbage_between_frames_loses_no_intact_frame(
        fs in prop::collection::vec(arb_frame(), 1..20),
        junk in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..100), 20),
        chunks in prop::collection::vec(1usize..300, 1..5),
    ) {
        let mut s = vec![];
        for (f, j) in fs.iter().zip(junk.iter()) {
            s.extend_from_slice(j);
            s.extend_from_slice(&encode(std::slice::from_ref(f)));
        }
        // Trailing bytes flush any false candidate that swallowed the last frame.
        s.extend_from_slice(&[0u8; MAX as usize + HEADER_LEN]);
        let got = decode_chunked(&mut FrameCodec::new(MAX), &s, &chunks);
        prop_assert_eq!(got, fs);
    }

    #[test]
    fn arbitrary_bytes_never_panic(s in prop::collection::vec(any::<u8>(), 0..4000), c in 1usize..100) {
        let _ = decode_chunked(&mut FrameCodec::new(MAX), &s, &[c]);
    }
}

#[test]
fn chained_headers_announcing_long_payloads_cost_a_bounded_number_of_checksums() {
    // A hostile peer: 36-byte headers, each with a valid header checksum and
    // announcing a 64 KiB payload that never matches, one after another.
    // Rescanning after each failure would checksum 64 KiB per 36 bytes.
    let long = encode(&[data(1, &[0u8; 65536])]);
    let header = &long[..HEADER_LEN];
    let mut s = Vec::new();
    for _ in 0..4000 {
        s.extend_from_slice(header);
    }
    s.extend_from_slice(&[0xAAu8; 65536]);
    s.extend_from_slice(&encode(&[data(7, b"after")]));
    let mut codec = FrameCodec::new(1 << 20);
    let mut buf = BytesMut::new();
    let mut got = vec![];
    for chunk in s.chunks(4096) {
        buf.extend_from_slice(chunk);
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            got.push(f);
        }
    }
    assert_eq!(got, vec![data(7, b"after")], "the frame after it is found");
    // 144 KB of headers: a handful of failed checksums, not 4000.
    let bad = codec.stats().bad_payload;
    assert!(bad <= 6, "{bad} payload checksums failed");
}
