//! The frame decoder fed arbitrary bytes in arbitrary chunks: it must never
//! panic, never error, and never buffer more than one maximal frame plus a read.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tether::link::FrameCodec;
use tether::link::frame::HEADER_LEN;
use tokio_util::codec::Decoder;

const MAX: u32 = 4096;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, the rest is the stream.
    let Some((&chunk, stream)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let mut codec = FrameCodec::new(MAX);
    let mut buf = BytesMut::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        while let Some(f) = codec.decode(&mut buf).expect("decoder never errs") {
            assert!(f.payload.len() <= MAX as usize);
        }
        assert!(buf.len() <= HEADER_LEN + MAX as usize + chunk);
    }
    let _ = codec.decode_eof(&mut buf).expect("decoder never errs at EOF");
    let st = codec.stats();
    assert!(st.skipped_bytes <= stream.len() as u64);
});
