//! An incremental HTTP/1.x parser over both directions of one stream, as the mirror
//! sees them: it never touches the forwarded bytes, only copies of them, and turns them
//! into [`Event`]s — whole exchanges, or the start, messages and end of a server-sent
//! event stream. Pipelined requests pair with responses in order.
//!
//! On anything it does not understand (a malformed head, a bad chunk size, a response
//! without a request, a head over [`MAX_HEAD`]) it stops for good with
//! [`Event::Stopped`]: the stream goes on being forwarded, unparsed.

use std::collections::VecDeque;

use bytes::{Buf, BytesMut};
use sha2::{Digest, Sha256};

use crate::Direction;

/// Largest request or response head the parser buffers.
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 8 * 1024;
/// Largest server-sent event buffered.
const MAX_EVENT: usize = 1024 * 1024;
/// Most requests waiting for their responses (pipelining).
const MAX_PENDING: usize = 1024;

/// A body as it went by: its size and hash, and its first `cap` bytes.
#[derive(Debug, Clone)]
pub struct RawBody {
    pub size: u64,
    hasher: Sha256,
    pub kept: Vec<u8>,
    cap: usize,
}

impl RawBody {
    pub fn new(cap: usize) -> Self {
        Self {
            size: 0,
            hasher: Sha256::new(),
            kept: Vec::new(),
            cap,
        }
    }

    pub fn push(&mut self, b: &[u8]) {
        self.size += b.len() as u64;
        self.hasher.update(b);
        let room = self.cap.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&b[..room.min(b.len())]);
    }

    /// SHA-256 of every byte pushed; empty when there were none.
    pub fn sha256(&self) -> Vec<u8> {
        if self.size == 0 {
            Vec::new()
        } else {
            self.hasher.clone().finalize().to_vec()
        }
    }

    /// Whether bytes were cut off at `cap`.
    pub fn cut(&self) -> bool {
        self.size > self.kept.len() as u64
    }
}

/// A request line or status line with its headers.
#[derive(Debug, Clone, Default)]
pub struct RawHead {
    /// Request: method. Response: empty.
    pub method: String,
    /// Request: the request target as sent.
    pub target: String,
    /// Response: the status code.
    pub status: u16,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: &'static str,
    /// Names lowercased; values as sent.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl RawHead {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .any(|(_, v)| {
                String::from_utf8_lossy(v)
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case(token))
            })
    }
}

/// One request and (once it came) its response.
#[derive(Debug, Clone)]
pub struct RawExchange {
    pub index: u64,
    pub request: RawHead,
    pub request_body: RawBody,
    pub response: Option<RawHead>,
    pub response_body: RawBody,
    pub start_ts: i64,
    pub end_ts: i64,
    /// Something the record should say (upgrade, no response, cut short).
    pub note: String,
    /// HTTP/2 trailers (gRPC's `grpc-status`), names lowercased.
    pub trailers: Vec<(String, Vec<u8>)>,
}

#[derive(Debug)]
pub enum Event {
    /// A request and its response, whole (or ended by the stream's end).
    Exchange(RawExchange),
    /// The head of a server-sent event stream (the exchange goes on).
    StreamStart(RawExchange),
    /// One message of exchange `index`: a server-sent event, or a gRPC message (either
    /// direction).
    StreamMessage {
        index: u64,
        dir: Direction,
        /// A gRPC message (protobuf, never stored) rather than an event (text).
        grpc: bool,
        message: u64,
        /// The message: size and hash, and (events) its first bytes.
        body: RawBody,
        ts: i64,
    },
    /// The end of the server-sent event stream started as exchange `index`.
    StreamEnd(RawExchange),
    /// The stream switched protocols (or became a CONNECT tunnel): nothing more to
    /// parse, and nothing went wrong.
    Upgraded,
    /// Parsing stopped for good: the reason.
    Stopped(String),
}

#[derive(Debug, Clone, Copy)]
pub enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailer,
}

#[derive(Debug, Clone, Copy)]
pub enum BodyLen {
    Fixed(u64),
    Chunked(Chunk),
    UntilClose,
}

#[derive(Debug)]
enum Side {
    Head,
    Body(BodyLen),
}

struct Slot {
    ex: RawExchange,
    request_done: bool,
    response_done: bool,
    /// Server-sent events: bytes of the current event, and events so far.
    sse: Option<(Vec<u8>, u64)>,
}

/// Parser state of one stream.
pub struct Http1 {
    up: BytesMut,
    down: BytesMut,
    up_side: Side,
    down_side: Side,
    /// Exchanges not yet emitted, oldest first; `slots[0].ex.index == base`.
    slots: VecDeque<Slot>,
    base: u64,
    next_index: u64,
    /// Index of the exchange whose response comes next.
    response_for: u64,
    max_body: usize,
    done: bool,
}

impl std::fmt::Debug for Http1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1")
            .field("pending", &self.slots.len())
            .field("done", &self.done)
            .finish()
    }
}

fn version(v: Option<u8>) -> &'static str {
    match v {
        Some(0) => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

fn headers_of(h: &[httparse::Header<'_>]) -> Vec<(String, Vec<u8>)> {
    h.iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect()
}

/// The body framing a head declares (RFC 9112 §6.3), or why it is unusable.
pub fn framing(head: &RawHead) -> Result<Option<BodyLen>, String> {
    if head.header_has_token("transfer-encoding", "chunked") {
        return Ok(Some(BodyLen::Chunked(Chunk::Size)));
    }
    if head.header("transfer-encoding").is_some() {
        return Ok(Some(BodyLen::UntilClose));
    }
    let lens: Vec<&[u8]> = head
        .headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.as_slice())
        .collect();
    match lens.as_slice() {
        [] => Ok(None),
        [first, rest @ ..] if rest.iter().all(|v| v == first) => std::str::from_utf8(first)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|n| Some(BodyLen::Fixed(n)))
            .ok_or_else(|| "invalid content-length".to_owned()),
        _ => Err("conflicting content-length headers".into()),
    }
}

impl Http1 {
    pub fn new(max_body: usize) -> Self {
        Self {
            up: BytesMut::new(),
            down: BytesMut::new(),
            up_side: Side::Head,
            down_side: Side::Head,
            slots: VecDeque::new(),
            base: 0,
            next_index: 0,
            response_for: 0,
            max_body,
            done: false,
        }
    }

    /// Whether the parser has stopped (upgrade or failure): feed nothing more.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Takes the next bytes of one direction, seen at `ts`.
    pub fn feed(&mut self, dir: Direction, bytes: &[u8], ts: i64, out: &mut Vec<Event>) {
        if self.done {
            return;
        }
        let result = match dir {
            Direction::Up => {
                self.up.extend_from_slice(bytes);
                self.drive_up(ts, out)
            }
            Direction::Down => {
                self.down.extend_from_slice(bytes);
                self.drive_down(ts, out)
            }
        };
        if let Err(reason) = result {
            self.done = true;
            self.up.clear();
            self.down.clear();
            // What was understood so far is still recorded, marked unfinished.
            while let Some(mut slot) = self.slots.pop_front() {
                slot.ex.note = format!("incomplete: HTTP parsing stopped ({reason})");
                out.push(if slot.sse.is_some() {
                    Event::StreamEnd(slot.ex)
                } else {
                    Event::Exchange(slot.ex)
                });
            }
            out.push(Event::Stopped(reason));
        }
    }

    /// The stream ended: what is still open is emitted as it stands.
    pub fn finish(&mut self, ts: i64, out: &mut Vec<Event>) {
        if let Side::Body(BodyLen::UntilClose) = self.down_side
            && !self.done
        {
            self.down_side = Side::Head;
            self.response_complete(ts, out);
        }
        while let Some(mut slot) = self.slots.pop_front() {
            if slot.ex.response.is_none() {
                slot.ex.note = "no response: the stream ended".into();
            } else if !slot.response_done || !slot.request_done {
                slot.ex.note = "the stream ended before the exchange was complete".into();
                slot.ex.end_ts = ts;
            }
            if slot.sse.is_some() {
                out.push(Event::StreamEnd(slot.ex));
            } else {
                out.push(Event::Exchange(slot.ex));
            }
        }
    }

    fn slot(&mut self, index: u64) -> Option<&mut Slot> {
        let i = index.checked_sub(self.base)? as usize;
        self.slots.get_mut(i)
    }

    fn drive_up(&mut self, ts: i64, out: &mut Vec<Event>) -> Result<(), String> {
        loop {
            match self.up_side {
                Side::Head => {
                    if self.up.is_empty() {
                        return Ok(());
                    }
                    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let mut req = httparse::Request::new(&mut hs);
                    let n = match req.parse(&self.up) {
                        Ok(httparse::Status::Complete(n)) => n,
                        Ok(httparse::Status::Partial) if self.up.len() > MAX_HEAD => {
                            return Err(format!("request head larger than {MAX_HEAD} bytes"));
                        }
                        Ok(httparse::Status::Partial) => return Ok(()),
                        Err(e) => return Err(format!("malformed request head: {e}")),
                    };
                    let head = RawHead {
                        method: req.method.unwrap_or_default().to_owned(),
                        target: req.path.unwrap_or_default().to_owned(),
                        status: 0,
                        version: version(req.version),
                        headers: headers_of(req.headers),
                    };
                    self.up.advance(n);
                    let body = match framing(&head)? {
                        Some(BodyLen::UntilClose) => {
                            return Err(
                                "request with a transfer-encoding other than chunked".into()
                            );
                        }
                        b => b,
                    };
                    if self.slots.len() >= MAX_PENDING {
                        return Err(format!(
                            "more than {MAX_PENDING} requests waiting for responses"
                        ));
                    }
                    let index = self.next_index;
                    self.next_index += 1;
                    self.slots.push_back(Slot {
                        ex: RawExchange {
                            index,
                            request: head,
                            request_body: RawBody::new(self.max_body),
                            response: None,
                            response_body: RawBody::new(self.max_body),
                            start_ts: ts,
                            end_ts: 0,
                            note: String::new(),
                            trailers: Vec::new(),
                        },
                        request_done: false,
                        response_done: false,
                        sse: None,
                    });
                    match body {
                        None | Some(BodyLen::Fixed(0)) => self.request_complete(index, out),
                        Some(b) => self.up_side = Side::Body(b),
                    }
                }
                Side::Body(len) => {
                    let index = self.next_index - 1;
                    let slot = self.slots.back_mut().expect("a request in progress");
                    let (next, done) =
                        body_step(len, &mut self.up, |b| slot.ex.request_body.push(b))?;
                    if !done {
                        self.up_side = Side::Body(next);
                        return Ok(());
                    }
                    self.up_side = Side::Head;
                    self.request_complete(index, out);
                }
            }
        }
    }

    fn request_complete(&mut self, index: u64, out: &mut Vec<Event>) {
        if let Some(s) = self.slot(index) {
            s.request_done = true;
        }
        self.emit_ready(out);
    }

    fn drive_down(&mut self, ts: i64, out: &mut Vec<Event>) -> Result<(), String> {
        loop {
            match self.down_side {
                Side::Head => {
                    if self.down.is_empty() {
                        return Ok(());
                    }
                    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let mut resp = httparse::Response::new(&mut hs);
                    let n = match resp.parse(&self.down) {
                        Ok(httparse::Status::Complete(n)) => n,
                        Ok(httparse::Status::Partial) if self.down.len() > MAX_HEAD => {
                            return Err(format!("response head larger than {MAX_HEAD} bytes"));
                        }
                        Ok(httparse::Status::Partial) => return Ok(()),
                        Err(e) => return Err(format!("malformed response head: {e}")),
                    };
                    let head = RawHead {
                        method: String::new(),
                        target: String::new(),
                        status: resp.code.unwrap_or_default(),
                        version: version(resp.version),
                        headers: headers_of(resp.headers),
                    };
                    self.down.advance(n);
                    let index = self.response_for;
                    let Some(slot) = self.slot(index) else {
                        return Err("a response arrived without a request".into());
                    };
                    let status = head.status;
                    if (100..200).contains(&status) && status != 101 {
                        continue; // interim (100 Continue, 103 Early Hints)
                    }
                    let method = slot.ex.request.method.clone();
                    let upgraded =
                        status == 101 || (method == "CONNECT" && (200..300).contains(&status));
                    let sse = status == 200
                        && head.header("content-type").is_some_and(|v| {
                            String::from_utf8_lossy(v)
                                .to_ascii_lowercase()
                                .starts_with("text/event-stream")
                        });
                    let body = if upgraded || method == "HEAD" || status == 204 || status == 304 {
                        None
                    } else {
                        match framing(&head)? {
                            None => Some(BodyLen::UntilClose),
                            b => b,
                        }
                    };
                    slot.ex.response = Some(head);
                    slot.ex.end_ts = ts;
                    if upgraded {
                        slot.ex.note = if status == 101 {
                            let to = slot
                                .ex
                                .response
                                .as_ref()
                                .and_then(|h| h.header("upgrade"))
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                                .unwrap_or_default();
                            format!(
                                "switched protocols to {to:?}; the stream is not parsed further"
                            )
                        } else {
                            "CONNECT tunnel established; the stream is not parsed further".into()
                        };
                        slot.response_done = true;
                        slot.request_done = true;
                        self.response_for += 1;
                        self.emit_ready(out);
                        self.done = true;
                        out.push(Event::Upgraded);
                        return Ok(());
                    }
                    if sse {
                        slot.sse = Some((Vec::new(), 0));
                        out.push(Event::StreamStart(slot.ex.clone()));
                    }
                    match body {
                        None | Some(BodyLen::Fixed(0)) => self.response_complete(ts, out),
                        Some(b) => self.down_side = Side::Body(b),
                    }
                }
                Side::Body(len) => {
                    let index = self.response_for;
                    let at = (index - self.base) as usize;
                    let slot = &mut self.slots[at];
                    let mut messages = Vec::new();
                    let (next, done) = body_step(len, &mut self.down, |b| {
                        slot.ex.response_body.push(b);
                        if let Some((buf, n)) = &mut slot.sse {
                            buf.extend_from_slice(b);
                            while let Some((end, sep)) = event_end(buf) {
                                let data: Vec<u8> = buf.drain(..end + sep).take(end).collect();
                                messages.push((*n, data));
                                *n += 1;
                            }
                        }
                    })?;
                    if slot
                        .sse
                        .as_ref()
                        .is_some_and(|(buf, _)| buf.len() > MAX_EVENT)
                    {
                        return Err(format!("server-sent event larger than {MAX_EVENT} bytes"));
                    }
                    for (message, data) in messages {
                        let mut body = RawBody::new(self.max_body);
                        body.push(&data);
                        out.push(Event::StreamMessage {
                            index,
                            dir: Direction::Down,
                            grpc: false,
                            message,
                            body,
                            ts,
                        });
                    }
                    if !done {
                        self.down_side = Side::Body(next);
                        return Ok(());
                    }
                    self.down_side = Side::Head;
                    self.response_complete(ts, out);
                }
            }
        }
    }

    fn response_complete(&mut self, ts: i64, out: &mut Vec<Event>) {
        let index = self.response_for;
        self.response_for += 1;
        if let Some(s) = self.slot(index) {
            s.response_done = true;
            s.ex.end_ts = ts;
        }
        self.emit_ready(out);
    }

    /// Emits finished exchanges, oldest first.
    fn emit_ready(&mut self, out: &mut Vec<Event>) {
        while self
            .slots
            .front()
            .is_some_and(|s| s.request_done && s.response_done)
        {
            let slot = self.slots.pop_front().expect("checked");
            self.base += 1;
            if slot.sse.is_some() {
                out.push(Event::StreamEnd(slot.ex));
            } else {
                out.push(Event::Exchange(slot.ex));
            }
        }
    }
}

/// Where the first server-sent event in `buf` ends: (length of the event, length of the
/// blank-line separator).
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Consumes body bytes from `buf` under `len`, handing the body's bytes (de-chunked) to
/// `sink`. Returns the framing state to continue with and whether the body ended.
pub fn body_step(
    len: BodyLen,
    buf: &mut BytesMut,
    sink: impl FnMut(&[u8]),
) -> Result<(BodyLen, bool), String> {
    let (next, done, used) = body_scan(len, buf, sink)?;
    buf.advance(used);
    Ok((next, done))
}

/// [`body_step`] over a slice: also returns how many bytes of `buf` it consumed.
pub fn body_scan(
    len: BodyLen,
    buf: &[u8],
    mut sink: impl FnMut(&[u8]),
) -> Result<(BodyLen, bool, usize), String> {
    let mut b = buf;
    let used = |b: &[u8]| buf.len() - b.len();
    match len {
        BodyLen::UntilClose => {
            sink(b);
            Ok((len, false, buf.len()))
        }
        BodyLen::Fixed(left) => {
            let take = (left.min(b.len() as u64)) as usize;
            sink(&b[..take]);
            let left = left - take as u64;
            Ok((BodyLen::Fixed(left), left == 0, take))
        }
        BodyLen::Chunked(mut state) => loop {
            match state {
                Chunk::Size => {
                    let Some(nl) = b.iter().position(|c| *c == b'\n') else {
                        if b.len() > MAX_LINE {
                            return Err("chunk-size line too long".into());
                        }
                        return Ok((BodyLen::Chunked(state), false, used(b)));
                    };
                    // CRLF only: a server that accepts a bare LF frames differently.
                    if nl == 0 || b[nl - 1] != b'\r' {
                        return Err("chunk-size line not ended by CRLF".into());
                    }
                    let line = String::from_utf8_lossy(&b[..nl]).into_owned();
                    b = &b[nl + 1..];
                    let hex = line
                        .trim_end_matches('\r')
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .trim();
                    // Hex digits only ("+a" parses, and must not); the line's content
                    // stays out of the message (it may be body bytes).
                    if hex.is_empty()
                        || hex.len() > 15
                        || !hex.bytes().all(|c| c.is_ascii_hexdigit())
                    {
                        return Err("invalid chunk size line".into());
                    }
                    let size = u64::from_str_radix(hex, 16)
                        .map_err(|_| "invalid chunk size line".to_owned())?;
                    state = if size == 0 {
                        Chunk::Trailer
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    if b.is_empty() {
                        return Ok((BodyLen::Chunked(state), false, used(b)));
                    }
                    let take = (left.min(b.len() as u64)) as usize;
                    sink(&b[..take]);
                    b = &b[take..];
                    let left = left - take as u64;
                    state = if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    };
                }
                Chunk::DataEnd => {
                    if b.starts_with(b"\r\n") {
                        b = &b[2..];
                    } else if b.is_empty() || b == b"\r" {
                        return Ok((BodyLen::Chunked(state), false, used(b)));
                    } else {
                        return Err("chunk data not followed by CRLF".into());
                    }
                    state = Chunk::Size;
                }
                Chunk::Trailer => {
                    let Some(nl) = b.iter().position(|c| *c == b'\n') else {
                        if b.len() > MAX_LINE {
                            return Err("trailer line too long".into());
                        }
                        return Ok((BodyLen::Chunked(state), false, used(b)));
                    };
                    let line = &b[..nl];
                    if line.last() != Some(&b'\r') {
                        return Err("trailer line not ended by CRLF".into());
                    }
                    let line = &line[..line.len() - 1];
                    b = &b[nl + 1..];
                    if line.is_empty() {
                        return Ok((BodyLen::Fixed(0), true, used(b)));
                    }
                    // A trailer is a header field: `name: value`, name a token.
                    let name_ok = line.iter().position(|c| *c == b':').is_some_and(|colon| {
                        colon > 0
                            && line[..colon].iter().all(|c| {
                                c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(c)
                            })
                    });
                    if !name_ok {
                        return Err("malformed trailer line".into());
                    }
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(chunks: &[(Direction, &[u8])]) -> Vec<Event> {
        let mut p = Http1::new(1024);
        let mut out = Vec::new();
        for (i, (d, b)) in chunks.iter().enumerate() {
            p.feed(*d, b, i as i64, &mut out);
        }
        p.finish(99, &mut out);
        out
    }

    fn exchanges(ev: &[Event]) -> Vec<&RawExchange> {
        ev.iter()
            .filter_map(|e| match e {
                Event::Exchange(x) => Some(x),
                _ => None,
            })
            .collect()
    }

    use Direction::{Down, Up};

    #[test]
    fn keep_alive_pipelined_requests_pair_with_responses_in_order() {
        let ev = run(&[
            (Up, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b?q=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel"),
            (Up, b"lo"),
            (Down, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"),
            (Down, b"2;ext=1\r\nde\r\n0\r\nX-T: 1\r\n\r\n"),
        ]);
        let xs = exchanges(&ev);
        assert_eq!(xs.len(), 2, "{ev:?}");
        assert_eq!(
            (
                xs[0].index,
                xs[0].request.method.as_str(),
                xs[0].request.target.as_str()
            ),
            (0, "GET", "/a")
        );
        assert_eq!(xs[0].response.as_ref().unwrap().status, 200);
        assert_eq!(xs[0].response_body.kept, b"ok");
        assert_eq!(xs[1].request_body.kept, b"hello");
        assert_eq!(xs[1].response_body.kept, b"abcde");
        assert_eq!(xs[1].response.as_ref().unwrap().status, 201);
        assert_eq!((xs[1].start_ts, xs[1].end_ts), (0, 3));
    }

    #[test]
    fn interim_responses_head_requests_and_close_delimited_bodies() {
        let ev = run(&[
            (Up, b"HEAD /h HTTP/1.1\r\n\r\nGET /c HTTP/1.0\r\n\r\n"),
            (
                Down,
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
            ),
            (Down, b"HTTP/1.0 200 OK\r\n\r\nuntil close"),
        ]);
        let xs = exchanges(&ev);
        assert_eq!(xs.len(), 2, "{ev:?}");
        assert_eq!(xs[0].response_body.size, 0);
        assert_eq!(xs[1].response_body.kept, b"until close");
        assert_eq!(xs[1].end_ts, 99);
    }

    #[test]
    fn bodies_beyond_the_cap_keep_size_and_hash() {
        let mut p = Http1::new(4);
        let mut out = Vec::new();
        p.feed(
            Up,
            b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789",
            0,
            &mut out,
        );
        p.feed(Down, b"HTTP/1.1 204 No Content\r\n\r\n", 1, &mut out);
        let xs = exchanges(&out);
        assert_eq!(xs[0].request_body.kept, b"0123");
        assert_eq!(xs[0].request_body.size, 10);
        assert!(xs[0].request_body.cut());
        assert_eq!(
            xs[0].request_body.sha256(),
            Sha256::digest(b"0123456789").to_vec()
        );
    }

    #[test]
    fn server_sent_events_are_recorded_as_they_go() {
        let ev = run(&[
            (Up, b"GET /events HTTP/1.1\r\n\r\n"),
            (
                Down,
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: one\n\nda",
            ),
            (Down, b"ta: two\r\n\r\n"),
        ]);
        let kinds: Vec<String> = ev
            .iter()
            .map(|e| match e {
                Event::StreamStart(_) => "start".into(),
                Event::StreamMessage { body, .. } => {
                    String::from_utf8_lossy(&body.kept).into_owned()
                }
                Event::StreamEnd(_) => "end".into(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["start", "data: one", "data: two", "end"]);
    }

    #[test]
    fn upgrades_stop_parsing_without_an_error() {
        let ev = run(&[
            (
                Up,
                b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            ),
            (
                Down,
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
            ),
            (Up, b"\x81\x85garbage"),
        ]);
        assert!(matches!(ev.last(), Some(Event::Upgraded)), "{ev:?}");
        let xs = exchanges(&ev);
        assert!(xs[0].note.contains("websocket"));
    }

    #[test]
    fn garbage_stops_the_parser_with_a_reason_and_requests_without_answers_are_kept() {
        let ev = run(&[
            (Up, b"GET / HTTP/1.1\r\n\r\n"),
            (Down, b"\x00\x01 not http\r\n\r\n"),
        ]);
        assert!(
            matches!(&ev[0], Event::Exchange(x) if x.note.starts_with("incomplete")),
            "{ev:?}"
        );
        assert!(
            matches!(&ev[1], Event::Stopped(r) if r.contains("malformed response")),
            "{ev:?}"
        );
        let ev = run(&[(Up, b"GET /lonely HTTP/1.1\r\n\r\n")]);
        assert_eq!(exchanges(&ev)[0].note, "no response: the stream ended");
    }

    #[test]
    fn a_head_over_the_limit_stops_the_parser() {
        let mut p = Http1::new(16);
        let mut out = Vec::new();
        p.feed(Up, b"GET / HTTP/1.1\r\nX-Big: ", 0, &mut out);
        for _ in 0..(MAX_HEAD / 1024 + 1) {
            p.feed(Up, &[b'a'; 1024], 0, &mut out);
        }
        assert!(
            matches!(&out[..], [Event::Stopped(r)] if r.contains("larger than")),
            "{out:?}"
        );
        assert!(p.is_done());
    }

    proptest! {
        /// Whatever the bytes and however they are split, the parser neither panics nor
        /// grows without bound, and stops or emits.
        #[test]
        fn arbitrary_bytes_never_panic(
            chunks in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..20)
        ) {
            let mut p = Http1::new(64);
            let mut out = Vec::new();
            for (i, (up, b)) in chunks.iter().enumerate() {
                p.feed(if *up { Up } else { Down }, b, i as i64, &mut out);
                prop_assert!(p.up.len() <= MAX_HEAD + 300 && p.down.len() <= MAX_HEAD + 300);
            }
            p.finish(0, &mut out);
        }

        /// A valid exchange split at any two points parses the same as whole.
        #[test]
        fn splitting_never_changes_the_result(a in 0usize..120, b in 0usize..120) {
            let req: &[u8] = b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n";
            let (a, b) = (a.min(req.len()), b.min(req.len()));
            let (lo, hi) = (a.min(b), a.max(b));
            let ev = run(&[
                (Up, &req[..lo]),
                (Up, &req[lo..hi]),
                (Up, &req[hi..]),
                (Down, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            ]);
            let xs = exchanges(&ev);
            prop_assert_eq!(xs.len(), 1);
            prop_assert_eq!(&xs[0].request_body.kept, b"abcd");
        }
    }
}
