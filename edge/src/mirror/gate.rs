//! Method and path rules, checked inline (DESIGN: "Security model"): on a route with
//! `http_rules`, the client's bytes of an HTTP/1.x stream pass through a [`Gate`] before
//! they are forwarded. The gate holds back a request head until it is complete, checks
//! it against the rules, and then forwards it — or denies it: the request is never
//! forwarded, the client gets `403` and the stream ends. Bodies are skipped by their
//! framing (Content-Length, chunked) so the next head on a keep-alive stream is found.
//!
//! Paths are matched after percent-decoding and removing dot segments, so `/a/../admin`
//! and `/%61dmin` are `/admin` to the rules. The gate fails closed: a head it cannot
//! parse, or one over 64 KiB, is denied.

use bytes::{Bytes, BytesMut};

use super::http1::{BodyLen, MAX_HEAD, RawHead, body_scan, framing};
use super::redact::percent_decode;
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
    held: BytesMut,
    state: State,
}

/// `/a/./b/../c` → `/a/c`, after percent-decoding; `//` collapses.
pub fn normalize_path(raw: &str) -> String {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    let decoded = percent_decode(path).replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
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
    p
}

/// `*` matches within one segment, `**` across segments; everything else literally.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p {
            [] => s.is_empty(),
            [b'*', b'*', rest @ ..] => (0..=s.len()).any(|i| go(rest, &s[i..])),
            [b'*', rest @ ..] => (0..=s.len())
                .take_while(|&i| i == 0 || s[i - 1] != b'/')
                .any(|i| go(rest, &s[i..])),
            [c, rest @ ..] => s.first() == Some(c) && go(rest, &s[1..]),
        }
    }
    go(pattern.as_bytes(), path.as_bytes())
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

impl Gate {
    pub fn new(rules: Vec<HttpRule>) -> Self {
        Self {
            rules,
            held: BytesMut::new(),
            state: State::Head,
        }
    }

    /// Takes the next client bytes.
    pub fn admit(&mut self, chunk: &Bytes) -> Verdict {
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
                    let path = normalize_path(req.path.unwrap_or_default());
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
                    if let Err(reason) = check(&self.rules, &method, &path) {
                        return Verdict::Deny(
                            pass.freeze(),
                            Denied {
                                method,
                                path,
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
        assert_eq!(normalize_path("/a/./b/../c?x=1"), "/a/c");
        assert_eq!(normalize_path("/%61dmin//x"), "/admin/x");
        assert_eq!(normalize_path("/../../etc"), "/etc");
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
            check(&r, "GET", &normalize_path("/x/../%61dmin/keys"))
                .unwrap_err()
                .contains("http_rules[0]")
        );
    }

    #[test]
    fn heads_are_held_until_complete_and_bodies_are_skipped() {
        let mut g = Gate::new(rules());
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
    fn garbage_and_chunked_bodies() {
        let mut g = Gate::new(rules());
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
        let mut g = Gate::new(rules());
        assert!(matches!(
            g.admit(&Bytes::from_static(b"\x16\x03\x01 tls?\r\n\r\n")),
            Verdict::Deny(..)
        ));
    }
}
