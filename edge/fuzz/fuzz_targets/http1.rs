#![no_main]
//! The HTTP/1 parser never panics, and what it buffers stays bounded, whatever both
//! sides send and however it is split.

use cloudtap_parsers::http1::Http1;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mut p = Http1::new(256);
    let mut out = Vec::new();
    for (i, (dir, bytes)) in common::chunks(data).into_iter().enumerate() {
        p.feed(dir, bytes, i as i64, &mut out);
    }
    p.finish(i64::MAX, &mut out);
});
