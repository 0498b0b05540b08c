#![no_main]
//! The HTTP/2 + gRPC parser (frames, HPACK, CONTINUATION, padding) never panics on
//! anything after a valid client preface.

use cloudtap_parsers::Direction;
use cloudtap_parsers::http2::{Http2, PREFACE};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mut p = Http2::new(256);
    let mut out = Vec::new();
    p.feed(Direction::Up, PREFACE, 0, &mut out);
    for (i, (dir, bytes)) in common::chunks(data).into_iter().enumerate() {
        p.feed(dir, bytes, i as i64, &mut out);
    }
    p.finish(i64::MAX, &mut out);
});
