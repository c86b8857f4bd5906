//! Node RPC decoder: arbitrary bytes, as a socket would deliver them, through the frame decoder and
//! every message decoder. Must never panic; the frame decoder refuses bodies over the frame limit
//! before buffering them, so memory stays bounded by one frame.
#![no_main]

use bytes::BytesMut;
use cairn_proto::frame::{FRAME_BODY_MAX_BYTES, FRAME_HEADER_BYTES};
use cairn_proto::message::decode;
use cairn_proto::{Frame, Hello, HelloReply, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    // Bounded: every successful decode consumes at least a header.
    for _ in 0..=data.len() / FRAME_HEADER_BYTES {
        match Frame::decode(&mut buf) {
            Ok(Some(frame)) => {
                assert!(frame.body.len() <= FRAME_BODY_MAX_BYTES as usize);
                let _ = decode::<Request>(&frame.body);
                let _ = decode::<Response>(&frame.body);
                let _ = decode::<Hello>(&frame.body);
                let _ = decode::<HelloReply>(&frame.body);
            }
            Ok(None) | Err(_) => break,
        }
    }
    // Bodies are also decoded directly, without a valid frame around them.
    let _ = decode::<Request>(data);
    let _ = decode::<Response>(data);
});
