//! An incremental HTTP/2 (prior knowledge, RFC 9113) parser over both directions of
//! one stream, producing the same [`Event`]s as the HTTP/1 parser. Frames are read,
//! header blocks (with CONTINUATION) decoded with one HPACK decoder per direction, and
//! each HTTP/2 stream becomes one exchange.
//!
//! gRPC (`content-type: application/grpc…`) is understood on top: the service and
//! method come from `:path`, the status from `grpc-status` (trailers, or a trailers-only
//! response), and the length-prefixed messages are counted. A call with at most one
//! message each way is one `complete` exchange; once a second message shows up in
//! either direction the call is a stream, recorded as it goes: `start`, one `message`
//! per gRPC message (those already seen first), `end`.
//!
//! Anything it does not understand stops it for good ([`Event::Stopped`]), as in HTTP/1.

use std::collections::BTreeMap;

use bytes::{Buf, BytesMut};

use crate::Direction;

use crate::http1::{Event, RawBody, RawExchange, RawHead};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Largest frame payload accepted (the protocol's own maximum).
const MAX_FRAME: usize = (1 << 24) - 1;
/// Largest header block (HEADERS + CONTINUATION) accepted.
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// Largest HPACK dynamic table the decoders allow.
const MAX_TABLE: usize = 64 * 1024;
/// Largest decoded header list (name + value + 32 per field, as RFC 9113 counts it).
const MAX_HEADER_LIST: usize = 256 * 1024;
/// Most HTTP/2 streams followed at once.
const MAX_STREAMS: usize = 1024;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const PUSH_PROMISE: u8 = 5;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Length-prefixed gRPC messages of one direction. Messages are protobuf, never
/// stored: only their sizes and hashes are kept, so nothing is buffered but a 5-byte
/// prefix.
#[derive(Default)]
struct GrpcFramer {
    prefix: Vec<u8>,
    /// The message being read and the bytes it still lacks.
    current: Option<(RawBody, u64)>,
    /// Messages seen so far.
    count: u64,
    /// Messages not yet emitted (held while the call may still be unary).
    held: Vec<(RawBody, i64)>,
}

impl GrpcFramer {
    /// Takes DATA bytes; returns the messages completed by them.
    fn push(&mut self, mut b: &[u8], ts: i64) -> Vec<(RawBody, i64)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            match &mut self.current {
                None => {
                    let take = (5 - self.prefix.len()).min(b.len());
                    self.prefix.extend_from_slice(&b[..take]);
                    b = &b[take..];
                    if self.prefix.len() == 5 {
                        let len =
                            u32::from_be_bytes(self.prefix[1..5].try_into().expect("4 bytes"));
                        self.prefix.clear();
                        self.current = Some((RawBody::new(0), u64::from(len)));
                    }
                }
                Some((body, left)) => {
                    let take = (*left).min(b.len() as u64) as usize;
                    body.push(&b[..take]);
                    b = &b[take..];
                    *left -= take as u64;
                }
            }
            if let Some((_, 0)) = &self.current {
                let (body, _) = self.current.take().expect("checked");
                self.count += 1;
                out.push((body, ts));
            }
        }
        out
    }
}

struct H2Stream {
    ex: RawExchange,
    request_done: bool,
    response_done: bool,
    grpc: bool,
    /// Up, down.
    framers: [GrpcFramer; 2],
    /// A `start` was emitted: the call is recorded as a stream.
    streaming: bool,
    /// Messages emitted so far, both directions together (the call's message numbering;
    /// held ones are numbered client messages first).
    emitted: u64,
}

/// Parser state of one HTTP/2 connection (one tunnel stream).
pub struct Http2 {
    up: BytesMut,
    down: BytesMut,
    preface_seen: bool,
    decoders: [loona_hpack::Decoder<'static>; 2],
    /// A header block waiting for CONTINUATION: (stream, flags of its HEADERS, bytes).
    pending_block: [Option<(u32, u8, Vec<u8>)>; 2],
    streams: BTreeMap<u32, H2Stream>,
    next_index: u64,
    max_body: usize,
    done: bool,
}

impl std::fmt::Debug for Http2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http2")
            .field("streams", &self.streams.len())
            .field("done", &self.done)
            .finish()
    }
}

fn side(dir: Direction) -> usize {
    match dir {
        Direction::Up => 0,
        Direction::Down => 1,
    }
}

impl Http2 {
    pub fn new(max_body: usize) -> Self {
        let decoder = || {
            let mut d = loona_hpack::Decoder::new();
            d.set_max_allowed_table_size(MAX_TABLE);
            d
        };
        Self {
            up: BytesMut::new(),
            down: BytesMut::new(),
            preface_seen: false,
            decoders: [decoder(), decoder()],
            pending_block: [None, None],
            streams: BTreeMap::new(),
            next_index: 0,
            max_body,
            done: false,
        }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    pub fn feed(&mut self, dir: Direction, bytes: &[u8], ts: i64, out: &mut Vec<Event>) {
        if self.done {
            return;
        }
        match dir {
            Direction::Up => self.up.extend_from_slice(bytes),
            Direction::Down => self.down.extend_from_slice(bytes),
        }
        if let Err(reason) = self.drive(dir, ts, out) {
            self.done = true;
            self.up.clear();
            self.down.clear();
            for (_, mut s) in std::mem::take(&mut self.streams) {
                s.ex.note = format!("incomplete: HTTP/2 parsing stopped ({reason})");
                out.push(if s.streaming {
                    Event::StreamEnd(s.ex)
                } else {
                    Event::Exchange(s.ex)
                });
            }
            out.push(Event::Stopped(reason));
        }
    }

    /// The connection ended: open streams are emitted as they stand.
    pub fn finish(&mut self, ts: i64, out: &mut Vec<Event>) {
        for (_, mut s) in std::mem::take(&mut self.streams) {
            if s.ex.response.is_none() {
                s.ex.note = "no response: the connection ended".into();
            } else {
                s.ex.note = "the connection ended before the exchange was complete".into();
                s.ex.end_ts = ts;
            }
            Self::emit(s, out);
        }
    }

    fn drive(&mut self, dir: Direction, ts: i64, out: &mut Vec<Event>) -> Result<(), String> {
        if dir == Direction::Up && !self.preface_seen {
            if self.up.len() < PREFACE.len() {
                if !PREFACE.starts_with(&self.up) {
                    return Err("the client did not send the HTTP/2 preface".into());
                }
                return Ok(());
            }
            if !self.up.starts_with(PREFACE) {
                return Err("the client did not send the HTTP/2 preface".into());
            }
            self.up.advance(PREFACE.len());
            self.preface_seen = true;
        }
        loop {
            let buf = match dir {
                Direction::Up => &mut self.up,
                Direction::Down => &mut self.down,
            };
            if buf.len() < 9 {
                return Ok(());
            }
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if len > MAX_FRAME {
                return Err(format!("frame of {len} bytes"));
            }
            if buf.len() < 9 + len {
                return Ok(());
            }
            let kind = buf[3];
            let flags = buf[4];
            let stream = u32::from_be_bytes(buf[5..9].try_into().expect("4 bytes")) & 0x7fff_ffff;
            buf.advance(9);
            let payload = buf.split_to(len);
            self.frame(dir, kind, flags, stream, &payload, ts, out)?;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn frame(
        &mut self,
        dir: Direction,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        ts: i64,
        out: &mut Vec<Event>,
    ) -> Result<(), String> {
        let s = side(dir);
        if let Some((pending, _, _)) = &self.pending_block[s]
            && (kind != CONTINUATION || stream != *pending)
        {
            return Err("a header block was interrupted by another frame".into());
        }
        match kind {
            DATA => {
                let data = unpad(flags, payload)?;
                self.data(dir, stream, data, flags & END_STREAM != 0, ts, out)?;
            }
            HEADERS => {
                if payload.len() > MAX_HEADER_BLOCK {
                    return Err(format!("header block larger than {MAX_HEADER_BLOCK} bytes"));
                }
                let mut block = unpad(flags, payload)?;
                if flags & PRIORITY != 0 {
                    block = block
                        .get(5..)
                        .ok_or("HEADERS frame too short for its priority")?;
                }
                self.pending_block[s] = Some((stream, flags, block.to_vec()));
                if flags & END_HEADERS != 0 {
                    self.header_block(dir, ts, out)?;
                }
            }
            CONTINUATION => {
                let Some((_, _, block)) = &mut self.pending_block[s] else {
                    return Err("CONTINUATION without a header block".into());
                };
                block.extend_from_slice(payload);
                if block.len() > MAX_HEADER_BLOCK {
                    return Err(format!("header block larger than {MAX_HEADER_BLOCK} bytes"));
                }
                if flags & END_HEADERS != 0 {
                    self.header_block(dir, ts, out)?;
                }
            }
            PUSH_PROMISE => {
                // Its header block must go through the decoder to keep HPACK in step;
                // pushed responses themselves are not recorded.
                if payload.len() > MAX_HEADER_BLOCK {
                    return Err(format!("header block larger than {MAX_HEADER_BLOCK} bytes"));
                }
                let block = unpad(flags, payload)?;
                let block = block.get(4..).ok_or("PUSH_PROMISE frame too short")?;
                if flags & END_HEADERS == 0 {
                    return Err("PUSH_PROMISE with CONTINUATION is not followed".into());
                }
                self.decode(dir, block)?;
            }
            RST_STREAM => {
                if let Some(mut st) = self.streams.remove(&stream) {
                    let code = payload
                        .get(..4)
                        .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")))
                        .unwrap_or(0);
                    let by = match dir {
                        Direction::Up => "client",
                        Direction::Down => "server",
                    };
                    st.ex.note = format!("stream reset by the {by} (error code {code})");
                    st.ex.end_ts = ts;
                    Self::emit(st, out);
                }
            }
            _ => {} // SETTINGS, PING, WINDOW_UPDATE, PRIORITY, GOAWAY: nothing to record
        }
        Ok(())
    }

    fn decode(&mut self, dir: Direction, block: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
        // A small block can reference one large table entry many times: count what it
        // decodes to, and copy nothing beyond the limit.
        let mut fields = Vec::new();
        let mut size = 0usize;
        self.decoders[side(dir)]
            .decode_with_cb(block, |name, value| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= MAX_HEADER_LIST {
                    fields.push((
                        String::from_utf8_lossy(&name).to_ascii_lowercase(),
                        value.into_owned(),
                    ));
                }
            })
            .map_err(|e| format!("HPACK: {e:?}"))?;
        if size > MAX_HEADER_LIST {
            return Err(format!(
                "decoded header list larger than {MAX_HEADER_LIST} bytes"
            ));
        }
        Ok(fields)
    }

    fn header_block(
        &mut self,
        dir: Direction,
        ts: i64,
        out: &mut Vec<Event>,
    ) -> Result<(), String> {
        let (stream, flags, block) = self.pending_block[side(dir)]
            .take()
            .expect("a pending block");
        let fields = self.decode(dir, &block)?;
        let end = flags & END_STREAM != 0;
        let pseudo = |n: &str| {
            fields
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let regular: Vec<(String, Vec<u8>)> = fields
            .iter()
            .filter(|(k, _)| !k.starts_with(':'))
            .cloned()
            .collect();
        match dir {
            Direction::Up => match self.streams.get_mut(&stream) {
                None => {
                    if self.streams.len() >= MAX_STREAMS {
                        return Err(format!("more than {MAX_STREAMS} concurrent streams"));
                    }
                    let mut headers = regular;
                    if let Some(a) = pseudo(":authority") {
                        headers.insert(0, ("host".into(), a.into_bytes()));
                    }
                    let grpc = fields
                        .iter()
                        .any(|(k, v)| k == "content-type" && v.starts_with(b"application/grpc"));
                    let index = self.next_index;
                    self.next_index += 1;
                    let st = H2Stream {
                        ex: RawExchange {
                            index,
                            request: RawHead {
                                method: pseudo(":method").unwrap_or_default(),
                                target: pseudo(":path").unwrap_or_default(),
                                status: 0,
                                version: "HTTP/2",
                                headers,
                            },
                            request_body: RawBody::new(self.max_body),
                            response: None,
                            response_body: RawBody::new(self.max_body),
                            start_ts: ts,
                            end_ts: 0,
                            note: String::new(),
                            trailers: Vec::new(),
                        },
                        request_done: end,
                        response_done: false,
                        grpc,
                        framers: Default::default(),
                        streaming: false,
                        emitted: 0,
                    };
                    self.streams.insert(stream, st);
                }
                Some(st) => {
                    // Request trailers.
                    st.ex.trailers.extend(regular);
                    st.request_done |= end;
                }
            },
            Direction::Down => {
                let Some(st) = self.streams.get_mut(&stream) else {
                    return Ok(()); // a pushed stream, or one reset already
                };
                if st.ex.response.is_none() {
                    let status: u16 = pseudo(":status")
                        .and_then(|s| s.parse().ok())
                        .ok_or("response headers without a valid :status")?;
                    if (100..200).contains(&status) {
                        return Ok(()); // interim
                    }
                    st.ex.response = Some(RawHead {
                        method: String::new(),
                        target: String::new(),
                        status,
                        version: "HTTP/2",
                        headers: regular,
                    });
                } else {
                    st.ex.trailers.extend(regular);
                }
                st.ex.end_ts = ts;
                st.response_done |= end;
            }
        }
        self.complete(stream, out);
        Ok(())
    }

    fn data(
        &mut self,
        dir: Direction,
        stream: u32,
        data: &[u8],
        end: bool,
        ts: i64,
        out: &mut Vec<Event>,
    ) -> Result<(), String> {
        let Some(st) = self.streams.get_mut(&stream) else {
            return Ok(());
        };
        let s = side(dir);
        match dir {
            Direction::Up => {
                st.ex.request_body.push(data);
                st.request_done |= end;
            }
            Direction::Down => {
                st.ex.response_body.push(data);
                st.ex.end_ts = ts;
                st.response_done |= end;
            }
        }
        if st.grpc {
            let done = st.framers[s].push(data, ts);
            st.framers[s].held.extend(done);
            let total = st.framers[0].count + st.framers[1].count;
            let either_many = st.framers[0].count > 1 || st.framers[1].count > 1;
            if !st.streaming && (either_many || total > 2) {
                st.streaming = true;
                out.push(Event::StreamStart(st.ex.clone()));
            }
            if st.streaming {
                for (i, d) in [Direction::Up, Direction::Down].into_iter().enumerate() {
                    for (body, ts) in st.framers[i].held.drain(..) {
                        out.push(Event::StreamMessage {
                            index: st.ex.index,
                            dir: d,
                            grpc: true,
                            message: st.emitted,
                            body,
                            ts,
                        });
                        st.emitted += 1;
                    }
                }
            }
        }
        self.complete(stream, out);
        Ok(())
    }

    fn complete(&mut self, stream: u32, out: &mut Vec<Event>) {
        if self
            .streams
            .get(&stream)
            .is_some_and(|s| s.request_done && s.response_done)
        {
            let st = self.streams.remove(&stream).expect("checked");
            Self::emit(st, out);
        }
    }

    fn emit(st: H2Stream, out: &mut Vec<Event>) {
        if st.streaming {
            out.push(Event::StreamEnd(st.ex));
        } else {
            out.push(Event::Exchange(st.ex));
        }
    }
}

/// A frame's payload without its padding.
fn unpad(flags: u8, payload: &[u8]) -> Result<&[u8], String> {
    if flags & PADDED == 0 {
        return Ok(payload);
    }
    let (&pad, rest) = payload
        .split_first()
        .ok_or("padded frame without a pad length")?;
    rest.len()
        .checked_sub(usize::from(pad))
        .map(|n| &rest[..n])
        .ok_or_else(|| "padding longer than the frame".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use Direction::{Down, Up};
    use proptest::prelude::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn block(headers: &[(&str, &str)]) -> Vec<u8> {
        let mut e = loona_hpack::Encoder::new();
        e.encode(headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
    }

    fn grpc_msg(b: &[u8]) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&(b.len() as u32).to_be_bytes());
        m.extend_from_slice(b);
        m
    }

    fn run(chunks: &[(Direction, Vec<u8>)]) -> Vec<Event> {
        let mut p = Http2::new(1024);
        let mut out = Vec::new();
        for (i, (d, b)) in chunks.iter().enumerate() {
            p.feed(*d, b, i as i64, &mut out);
        }
        p.finish(99, &mut out);
        out
    }

    #[test]
    fn requests_on_two_streams_become_two_exchanges() {
        let mut up = PREFACE.to_vec();
        up.extend(frame(4, 0, 0, &[]));
        let get = block(&[
            (":method", "GET"),
            (":path", "/a?x=1"),
            (":authority", "api"),
            (":scheme", "http"),
        ]);
        // The first header block is split by a CONTINUATION.
        up.extend(frame(HEADERS, END_STREAM, 1, &get[..3]));
        up.extend(frame(CONTINUATION, END_HEADERS, 1, &get[3..]));
        up.extend(frame(
            HEADERS,
            END_HEADERS,
            3,
            &block(&[(":method", "POST"), (":path", "/b"), (":authority", "api")]),
        ));
        up.extend(frame(DATA, END_STREAM | PADDED, 3, &[2, b'h', b'i', 0, 0]));
        let mut down = frame(4, 0, 0, &[]);
        down.extend(frame(
            HEADERS,
            END_HEADERS,
            3,
            &block(&[(":status", "201")]),
        ));
        down.extend(frame(DATA, END_STREAM, 3, b"made"));
        down.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &block(&[(":status", "404")]),
        ));
        let ev = run(&[(Up, up), (Down, down)]);
        let xs: Vec<&RawExchange> = ev
            .iter()
            .filter_map(|e| match e {
                Event::Exchange(x) => Some(x),
                _ => None,
            })
            .collect();
        assert_eq!(xs.len(), 2, "{ev:?}");
        assert_eq!(
            (
                xs[0].request.method.as_str(),
                xs[0].response.as_ref().unwrap().status
            ),
            ("POST", 201)
        );
        assert_eq!(xs[0].request_body.kept, b"hi");
        assert_eq!(xs[0].response_body.kept, b"made");
        assert_eq!(xs[1].request.target, "/a?x=1");
        assert_eq!(xs[1].request.header("host"), Some(&b"api"[..]));
        assert_eq!(xs[1].response.as_ref().unwrap().status, 404);
    }

    #[test]
    fn a_streaming_grpc_call_is_recorded_message_by_message() {
        let mut up = PREFACE.to_vec();
        up.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &block(&[
                (":method", "POST"),
                (":path", "/pkg.Svc/Watch"),
                ("content-type", "application/grpc"),
            ]),
        ));
        up.extend(frame(DATA, END_STREAM, 1, &grpc_msg(b"req")));
        let mut down = frame(
            HEADERS,
            END_HEADERS,
            1,
            &block(&[(":status", "200"), ("content-type", "application/grpc")]),
        );
        let mut two = grpc_msg(b"one");
        two.extend(grpc_msg(b"two"));
        down.extend(frame(DATA, 0, 1, &two[..4]));
        let rest = frame(DATA, 0, 1, &two[4..]);
        let trailers = frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &block(&[("grpc-status", "0")]),
        );
        let ev = run(&[(Up, up), (Down, down), (Down, rest), (Down, trailers)]);
        let kinds: Vec<String> = ev
            .iter()
            .map(|e| match e {
                Event::StreamStart(_) => "start".into(),
                // gRPC messages keep only size and hash.
                Event::StreamMessage { dir, body, .. } => {
                    format!("{}:{}", dir.as_str(), body.size)
                }
                Event::StreamEnd(x) => format!("end {:?}", x.trailers),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "start",
                "up:3",
                "down:3",
                "down:3",
                "end [(\"grpc-status\", [48])]"
            ]
        );
    }

    #[test]
    fn a_missing_preface_or_a_bad_header_block_stops_the_parser() {
        let ev = run(&[(Up, b"GET / HTTP/1.1\r\n\r\n".to_vec())]);
        assert!(
            matches!(&ev[..], [Event::Stopped(r)] if r.contains("preface")),
            "{ev:?}"
        );
        let mut up = PREFACE.to_vec();
        up.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]));
        let ev = run(&[(Up, up)]);
        assert!(
            matches!(ev.last(), Some(Event::Stopped(r)) if r.contains("HPACK")),
            "{ev:?}"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_frames_never_panic(
            chunks in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..200)), 0..20)
        ) {
            let mut p = Http2::new(64);
            let mut out = Vec::new();
            p.feed(Up, PREFACE, 0, &mut out);
            for (i, (up, b)) in chunks.iter().enumerate() {
                p.feed(if *up { Up } else { Down }, b, i as i64, &mut out);
            }
            p.finish(0, &mut out);
        }
    }
}
