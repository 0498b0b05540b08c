//! Method and path rules, checked inline (DESIGN: "Security model"): on a route with
//! `http_rules`, the client's bytes of an HTTP/1.x stream pass through a [`Gate`] before
//! they are forwarded. The gate holds back a request head until it is complete, checks
//! it against the rules, and then forwards it — or denies it: the request is never
//! forwarded, the client gets `403` and the stream ends. Bodies are skipped by their
//! framing (Content-Length, chunked) so the next head on a keep-alive stream is found.
//!
//! Paths are matched after percent-decoding, removing dot segments and `;` parameters,
//! and in lowercase, so `/a/../admin`, `/%61dmin`, `/admin;x` and `/ADMIN` are all
//! `/admin` to the rules; absolute-form targets (`GET http://h/admin`) are matched by
//! their path. The gate fails closed. It denies:
//! - a head it cannot parse, or one over 64 KiB;
//! - paths with an encoded `/`, `\`, `%` or NUL, a `#`, or a backslash — forms
//!   upstreams disagree about;
//! - ambiguous framing: `Transfer-Encoding` with `Content-Length`, any transfer coding
//!   but exactly `chunked`, `Transfer-Encoding` on HTTP/1.0, a malformed length, and a
//!   body on `GET`, `HEAD`, `OPTIONS` or `DELETE` (a body the upstream may ignore could
//!   hide a request the gate never checked);
//! - method-override headers (`X-HTTP-Method-Override`, …), protocol upgrades and
//!   `CONNECT`: the gate could not follow what comes after.

use bytes::{Bytes, BytesMut};

use std::sync::Arc;

use super::http1::{BodyLen, MAX_HEAD, RawHead, body_scan, framing};
use super::redact::{Redactor, percent_decode};
use crate::config::{HttpRule, RuleAction};

/// A request the rules refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub method: String,
    /// The normalized path the rules saw.
    pub path: String,
    pub reason: String,
}

/// What to do with a chunk of client bytes.
#[derive(Debug)]
pub enum Verdict {
    /// Forward these bytes (possibly fewer than came in: a head is still incomplete).
    Forward(Bytes),
    /// Forward these bytes (requests before the denied one), then answer 403 and end.
    Deny(Bytes, Denied),
}

#[derive(Debug)]
enum State {
    Head,
    Body(BodyLen),
}

/// The inline checker of one stream's requests.
#[derive(Debug)]
pub struct Gate {
    rules: Vec<HttpRule>,
    /// Paths in denial reasons are redacted (they are recorded).
    redactor: Arc<Redactor>,
    held: BytesMut,
    state: State,
}

/// The path the rules see: from an absolute-form target its path, without the query,
/// percent-decoded, `;` parameters dropped, `.`/`..` resolved, `//` collapsed,
/// lowercase. `Err` for forms upstreams disagree about.
pub fn normalize_path(raw: &str) -> Result<String, &'static str> {
    let lower = raw.to_ascii_lowercase();
    if ["%2f", "%5c", "%25", "%00"]
        .iter()
        .any(|e| lower.contains(e))
        || raw.contains(['#', '\\', '\0'])
    {
        return Err("the path has an encoded '/', '\\', '%' or NUL, a '#' or a backslash");
    }
    // Absolute form: `http://host[:port]/path`.
    let raw = match lower.find("://") {
        Some(i) if !raw[..i].contains('/') => {
            let after = &raw[i + 3..];
            after.find('/').map_or("/", |p| &after[p..])
        }
        _ => raw,
    };
    let path = raw.split('?').next().unwrap_or("");
    let decoded = percent_decode(path).to_ascii_lowercase();
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        // `;` parameters (`/admin;jsessionid=…`) are dropped by many servers.
        let seg = seg.split(';').next().unwrap_or("");
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut p = format!("/{}", out.join("/"));
    if decoded.ends_with('/') && p.len() > 1 {
        p.push('/');
    }
    Ok(p)
}

/// `*` matches within one segment, `**` across segments; everything else literally,
/// case-insensitively. Dynamic programming over positions: linear in pattern × path
/// whatever the pattern (no backtracking blow-up on a long path).
pub fn glob_match(pattern: &str, path: &str) -> bool {
    #[derive(Clone, Copy)]
    enum Tok {
        Byte(u8),
        Star,
        DoubleStar,
    }
    let p = pattern.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < p.len() {
        if p[i] == b'*' && p.get(i + 1) == Some(&b'*') {
            toks.push(Tok::DoubleStar);
            i += 2;
        } else if p[i] == b'*' {
            toks.push(Tok::Star);
            i += 1;
        } else {
            toks.push(Tok::Byte(p[i].to_ascii_lowercase()));
            i += 1;
        }
    }
    let s = path.as_bytes();
    // can[j]: the tokens so far match s[..j].
    let mut can = vec![false; s.len() + 1];
    can[0] = true;
    for t in toks {
        let mut next = vec![false; s.len() + 1];
        match t {
            Tok::Byte(c) => {
                for j in 0..s.len() {
                    next[j + 1] = can[j] && s[j].to_ascii_lowercase() == c;
                }
            }
            Tok::DoubleStar => {
                let mut any = false;
                for j in 0..=s.len() {
                    any |= can[j];
                    next[j] = any;
                }
            }
            Tok::Star => {
                let mut run = false;
                for j in 0..=s.len() {
                    run = can[j] || (run && s[j - 1] != b'/');
                    next[j] = run;
                }
            }
        }
        can = next;
    }
    can[s.len()]
}

/// The first rule matching `method` and `path` decides; no match denies.
pub fn check(rules: &[HttpRule], method: &str, path: &str) -> Result<(), String> {
    for (i, r) in rules.iter().enumerate() {
        let method_ok =
            r.methods.is_empty() || r.methods.iter().any(|m| m.eq_ignore_ascii_case(method));
        let path_ok = r.paths.is_empty() || r.paths.iter().any(|p| glob_match(p, path));
        if method_ok && path_ok {
            return match r.action {
                RuleAction::Allow => Ok(()),
                RuleAction::Deny => Err(format!("{method} {path} is denied by http_rules[{i}]")),
            };
        }
    }
    Err(format!(
        "{method} {path} matches no allow rule in http_rules"
    ))
}

const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Refuses framing that two HTTP implementations could read differently.
fn strict_framing(head: &RawHead, version: u8) -> Result<(), &'static str> {
    let te: Vec<&[u8]> = head
        .headers
        .iter()
        .filter(|(n, _)| n == "transfer-encoding")
        .map(|(_, v)| v.as_slice())
        .collect();
    let cl: Vec<&[u8]> = head
        .headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.as_slice())
        .collect();
    if !te.is_empty() && !cl.is_empty() {
        return Err("both Transfer-Encoding and Content-Length");
    }
    if !te.is_empty() && (version == 0 || te.len() > 1 || !te[0].eq_ignore_ascii_case(b"chunked")) {
        return Err("a Transfer-Encoding other than exactly `chunked` (or on HTTP/1.0)");
    }
    if cl
        .iter()
        .any(|v| v.is_empty() || !v.iter().all(u8::is_ascii_digit))
        || cl.windows(2).any(|w| w[0] != w[1])
    {
        return Err("a malformed or repeated Content-Length");
    }
    let has_body = !te.is_empty() || cl.iter().any(|v| v.iter().any(|d| *d != b'0'));
    if has_body && matches!(head.method.as_str(), "GET" | "HEAD" | "OPTIONS" | "DELETE") {
        return Err("a body on a GET, HEAD, OPTIONS or DELETE request");
    }
    Ok(())
}

impl Gate {
    pub fn new(rules: Vec<HttpRule>, redactor: Arc<Redactor>) -> Self {
        Self {
            rules,
            redactor,
            held: BytesMut::new(),
            state: State::Head,
        }
    }

    /// Takes the next client bytes.
    pub fn admit(&mut self, chunk: &Bytes) -> Verdict {
        // The common case on an upload: nothing held and the whole chunk is body. It
        // passes as it came, without being copied in and out of `held`.
        if self.held.is_empty()
            && let State::Body(len) = self.state
            && let Ok((next, done, used)) = body_scan(len, chunk, |_| {})
            && used == chunk.len()
        {
            self.state = if done { State::Head } else { State::Body(next) };
            return Verdict::Forward(chunk.clone());
        }
        self.held.extend_from_slice(chunk);
        let mut pass = BytesMut::new();
        loop {
            match self.state {
                State::Body(len) => match body_scan(len, &self.held, |_| {}) {
                    Ok((next, done, used)) => {
                        pass.extend_from_slice(&self.held.split_to(used));
                        if !done {
                            self.state = State::Body(next);
                            return Verdict::Forward(pass.freeze());
                        }
                        self.state = State::Head;
                    }
                    Err(e) => {
                        return self
                            .refuse(pass, &format!("request body framing not understood ({e})"));
                    }
                },
                State::Head => {
                    if self.held.is_empty() {
                        return Verdict::Forward(pass.freeze());
                    }
                    let mut hs = [httparse::EMPTY_HEADER; 128];
                    let mut req = httparse::Request::new(&mut hs);
                    let n = match req.parse(&self.held) {
                        Ok(httparse::Status::Complete(n)) => n,
                        Ok(httparse::Status::Partial) if self.held.len() <= MAX_HEAD => {
                            return Verdict::Forward(pass.freeze());
                        }
                        Ok(httparse::Status::Partial) => {
                            return self.refuse(pass, "request head larger than 64 KiB");
                        }
                        Err(e) => {
                            return self.refuse(pass, &format!("malformed request head: {e}"));
                        }
                    };
                    let method = req.method.unwrap_or_default().to_owned();
                    let version = req.version.unwrap_or(1);
                    let path = match normalize_path(req.path.unwrap_or_default()) {
                        Ok(p) => p,
                        Err(why) => return self.refuse(pass, why),
                    };
                    let head = RawHead {
                        method: method.clone(),
                        target: String::new(),
                        status: 0,
                        version: "HTTP/1.1",
                        headers: req
                            .headers
                            .iter()
                            .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                            .collect(),
                    };
                    if let Err(why) = strict_framing(&head, version) {
                        return self.refuse(pass, &format!("{method} request with {why}"));
                    }
                    if head
                        .headers
                        .iter()
                        .any(|(n, _)| METHOD_OVERRIDES.contains(&n.as_str()))
                    {
                        return self.refuse(
                            pass,
                            "method-override headers are refused on routes with http_rules",
                        );
                    }
                    if method == "CONNECT" || head.header("upgrade").is_some() {
                        return self.refuse(
                            pass,
                            "CONNECT and protocol upgrades are refused on routes with http_rules",
                        );
                    }
                    if let Err(reason) = check(&self.rules, &method, &path) {
                        // Recorded: the path goes through redaction first.
                        let shown = self.redactor.path(&path);
                        let reason = reason.replace(&path, &shown);
                        return Verdict::Deny(
                            pass.freeze(),
                            Denied {
                                method,
                                path: shown,
                                reason,
                            },
                        );
                    }
                    let body = match framing(&head) {
                        Ok(None) | Ok(Some(BodyLen::Fixed(0))) => None,
                        Ok(Some(BodyLen::UntilClose)) | Err(_) => {
                            return self.refuse(pass, "request body framing not understood");
                        }
                        Ok(b) => b,
                    };
                    pass.extend_from_slice(&self.held.split_to(n));
                    if let Some(b) = body {
                        self.state = State::Body(b);
                    }
                }
            }
        }
    }

    fn refuse(&mut self, pass: BytesMut, why: &str) -> Verdict {
        self.held.clear();
        Verdict::Deny(
            pass.freeze(),
            Denied {
                method: String::new(),
                path: String::new(),
                reason: why.to_owned(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Vec<HttpRule> {
        vec![
            HttpRule {
                action: RuleAction::Deny,
                methods: vec![],
                paths: vec!["/admin/**".into(), "/admin".into()],
            },
            HttpRule {
                action: RuleAction::Allow,
                methods: vec!["GET".into(), "HEAD".into()],
                paths: vec!["/**".into()],
            },
            HttpRule {
                action: RuleAction::Allow,
                methods: vec!["POST".into()],
                paths: vec!["/users/*/notes".into()],
            },
        ]
    }

    #[test]
    fn paths_are_normalized_before_matching() {
        let n = |p: &str| normalize_path(p).unwrap();
        assert_eq!(n("/a/./b/../c?x=1"), "/a/c");
        assert_eq!(n("/%61dmin//x"), "/admin/x");
        assert_eq!(n("/../../etc"), "/etc");
        assert_eq!(n("/ADMIN;jsessionid=1/keys"), "/admin/keys");
        assert_eq!(n("http://h:8080/admin/x?y"), "/admin/x");
        for bad in [
            "/a%2fb",
            "/a%5Cb",
            "/%252e%252e/admin",
            "/a\\b",
            "/pub#/../admin",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
        let long = format!("/{}", "a/".repeat(20_000));
        assert!(!glob_match("/**/x/**/y/**", &long));
        assert!(glob_match("/users/*/notes", "/users/7/notes"));
        assert!(!glob_match("/users/*/notes", "/users/7/x/notes"));
        assert!(glob_match("/admin/**", "/admin/a/b"));
        let r = rules();
        assert!(check(&r, "GET", "/users/1").is_ok());
        assert!(check(&r, "POST", "/users/1/notes").is_ok());
        assert!(
            check(&r, "DELETE", "/users/1")
                .unwrap_err()
                .contains("no allow rule")
        );
        assert!(
            check(&r, "GET", &n("/x/../%61dmin/keys"))
                .unwrap_err()
                .contains("http_rules[0]")
        );
    }

    #[test]
    fn heads_are_held_until_complete_and_bodies_are_skipped() {
        let mut g = Gate::new(
            rules(),
            Arc::new(Redactor::new(&Default::default()).unwrap()),
        );
        let Verdict::Forward(b) = g.admit(&Bytes::from_static(
            b"POST /users/1/notes HTTP/1.1\r\nContent-",
        )) else {
            panic!("nothing to deny yet")
        };
        assert!(b.is_empty(), "an incomplete head is held back");
        let Verdict::Forward(b) = g.admit(&Bytes::from_static(b"Length: 4\r\n\r\nbodyGET ")) else {
            panic!("allowed")
        };
        assert!(b.ends_with(b"\r\n\r\nbody"), "head and body pass: {b:?}");
        let Verdict::Forward(b) = g.admit(&Bytes::from_static(b"/ok HTTP/1.1\r\n\r\nDELE")) else {
            panic!("allowed")
        };
        // The next head, once whole; "DELE" is held.
        assert_eq!(&b[..], b"GET /ok HTTP/1.1\r\n\r\n");
        match g.admit(&Bytes::from_static(b"TE /users/1 HTTP/1.1\r\n\r\n")) {
            Verdict::Deny(b, d) => {
                assert!(b.is_empty());
                assert_eq!((d.method.as_str(), d.path.as_str()), ("DELETE", "/users/1"));
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn body_only_chunks_pass_whole_and_the_next_head_is_still_checked() {
        let mut g = Gate::new(
            rules(),
            Arc::new(Redactor::new(&Default::default()).unwrap()),
        );
        let head = Bytes::from_static(b"POST /users/1/notes HTTP/1.1\r\nContent-Length: 8\r\n\r\n");
        assert!(matches!(g.admit(&head), Verdict::Forward(b) if b == head));
        let body = Bytes::from_static(b"abcd");
        assert!(matches!(g.admit(&body), Verdict::Forward(b) if b == body));
        // The rest of the body and a refused request in one chunk.
        match g.admit(&Bytes::from_static(b"efghDELETE /users/1 HTTP/1.1\r\n\r\n")) {
            Verdict::Deny(b, d) => {
                assert_eq!(&b[..], b"efgh");
                assert_eq!(d.method, "DELETE");
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let deny = |req: &'static [u8]| {
            let mut g = Gate::new(
                rules(),
                Arc::new(Redactor::new(&Default::default()).unwrap()),
            );
            matches!(g.admit(&Bytes::from_static(req)), Verdict::Deny(..))
        };
        for (what, req) in [
            ("TE and CL", &b"POST /users/1/notes HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..]),
            ("TE not exactly chunked", b"POST /users/1/notes HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n"),
            ("TE on 1.0", b"POST /users/1/notes HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            ("signed length", b"POST /users/1/notes HTTP/1.1\r\nContent-Length: +4\r\n\r\n"),
            ("GET with a body", b"GET /users/1 HTTP/1.1\r\nContent-Length: 30\r\n\r\n"),
            ("method override", b"GET /users/1 HTTP/1.1\r\nX-HTTP-Method-Override: DELETE\r\n\r\n"),
            ("upgrade", b"GET /users/1 HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"),
            ("absolute form", b"GET http://h/admin/x HTTP/1.1\r\n\r\n"),
            ("encoded slash", b"GET /admin%2fx HTTP/1.1\r\n\r\n"),
            ("request in a trailer", b"POST /users/1/notes HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nGET /admin HTTP/1.1\r\n\r\n"),
            ("bare LF chunk", b"POST /users/1/notes HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n"),
        ] {
            assert!(deny(req), "{what} must be refused");
        }
        assert!(!deny(b"GET /users/1 HTTP/1.1\r\nHost: a\r\n\r\n"));
    }

    #[test]
    fn garbage_and_chunked_bodies() {
        let mut g = Gate::new(
            rules(),
            Arc::new(Redactor::new(&Default::default()).unwrap()),
        );
        let chunked = b"POST /users/2/notes HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n";
        match g.admit(&Bytes::from_static(chunked)) {
            Verdict::Deny(b, d) => {
                assert!(
                    b.ends_with(b"0\r\n\r\n"),
                    "the allowed request passes whole"
                );
                assert_eq!(d.path, "/admin");
            }
            v => panic!("{v:?}"),
        }
        let mut g = Gate::new(
            rules(),
            Arc::new(Redactor::new(&Default::default()).unwrap()),
        );
        assert!(matches!(
            g.admit(&Bytes::from_static(b"\x16\x03\x01 tls?\r\n\r\n")),
            Verdict::Deny(..)
        ));
    }
}
