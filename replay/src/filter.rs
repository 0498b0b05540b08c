//! `--only`: which recorded items a replay sends.
//!
//! A filter is terms separated by spaces or commas, all of which must hold; a term is
//! `key=value`, with `|` between alternatives:
//!
//! | key | matches | example |
//! | --- | --- | --- |
//! | `method` | the request method, any case | `method=GET\|HEAD` |
//! | `path` | the request path, `*` any run of characters, `?` one | `path=/api/*/items` |
//! | `status` | the recorded status: a code or a class | `status=5xx\|404` |
//! | `kind` | `http` (exchanges) or `tcp` (opaque streams) | `kind=tcp` |
//! | `stream` | the recorded stream id | `stream=3` |
//!
//! `method`, `path` and `status` only match HTTP exchanges.

use crate::ReplayError;
use crate::rebuild::Item;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Method(Vec<String>),
    Path(Vec<String>),
    Status(Vec<(u32, u32)>),
    Kind(Vec<bool>),
    Stream(Vec<u64>),
}

/// A parsed `--only` filter; the empty filter matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    terms: Vec<Term>,
}

impl Filter {
    pub fn parse(text: &str) -> Result<Self, ReplayError> {
        let bad = |reason: String| ReplayError::Filter {
            filter: text.into(),
            reason,
        };
        let mut terms = Vec::new();
        for term in text.split([' ', ',']).filter(|t| !t.is_empty()) {
            let (key, value) = term
                .split_once('=')
                .ok_or_else(|| bad(format!("{term:?} is not key=value")))?;
            let alts: Vec<&str> = value.split('|').filter(|v| !v.is_empty()).collect();
            if alts.is_empty() {
                return Err(bad(format!("{key} has no value")));
            }
            terms.push(match key {
                "method" => Term::Method(alts.iter().map(|m| m.to_ascii_uppercase()).collect()),
                "path" => Term::Path(alts.iter().map(|p| p.to_string()).collect()),
                "status" => Term::Status(
                    alts.iter()
                        .map(|s| {
                            status_range(s).ok_or_else(|| {
                                bad(format!("status {s:?}: use a code (404) or a class (5xx)"))
                            })
                        })
                        .collect::<Result<_, _>>()?,
                ),
                "kind" => Term::Kind(
                    alts.iter()
                        .map(|k| match *k {
                            "http" => Ok(true),
                            "tcp" => Ok(false),
                            other => Err(bad(format!("kind {other:?}: use http or tcp"))),
                        })
                        .collect::<Result<_, _>>()?,
                ),
                "stream" => Term::Stream(
                    alts.iter()
                        .map(|s| {
                            s.parse()
                                .map_err(|_| bad(format!("stream {s:?} is not a number")))
                        })
                        .collect::<Result<_, _>>()?,
                ),
                other => {
                    return Err(bad(format!(
                        "unknown key {other:?}; use method, path, status, kind or stream"
                    )));
                }
            });
        }
        Ok(Filter { terms })
    }

    pub fn matches(&self, item: &Item) -> bool {
        self.terms.iter().all(|t| match (t, item) {
            (Term::Kind(k), Item::Http(_)) => k.contains(&true),
            (Term::Kind(k), Item::Stream(_)) => k.contains(&false),
            (Term::Stream(ids), Item::Http(x)) => ids.contains(&x.stream_id),
            (Term::Stream(ids), Item::Stream(s)) => ids.contains(&s.stream_id),
            (Term::Method(m), Item::Http(x)) => m.iter().any(|m| m.eq_ignore_ascii_case(&x.method)),
            (Term::Path(p), Item::Http(x)) => {
                p.iter().any(|p| glob(p.as_bytes(), x.path.as_bytes()))
            }
            (Term::Status(r), Item::Http(x)) => {
                r.iter().any(|(lo, hi)| (*lo..=*hi).contains(&x.status))
            }
            (Term::Method(_) | Term::Path(_) | Term::Status(_), Item::Stream(_)) => false,
        })
    }
}

fn status_range(s: &str) -> Option<(u32, u32)> {
    let b = s.as_bytes();
    if b.len() == 3 && b[1..].eq_ignore_ascii_case(b"xx") && (b'1'..=b'5').contains(&b[0]) {
        let lo = u32::from(b[0] - b'0') * 100;
        return Some((lo, lo + 99));
    }
    let n: u32 = s.parse().ok()?;
    (100..=599).contains(&n).then_some((n, n))
}

/// `*` matches any run of bytes (slashes included), `?` one byte.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rebuild::OpaqueStream;
    use cloudtap_schemas::HttpExchange;

    fn get(method: &str, path: &str, status: u32) -> Item {
        Item::Http(Box::new(HttpExchange {
            method: method.into(),
            path: path.into(),
            status,
            ..Default::default()
        }))
    }

    #[test]
    fn terms_all_hold_and_alternatives_any() {
        let f = Filter::parse("method=get|head, path=/api/*/items status=2xx").unwrap();
        assert!(f.matches(&get("GET", "/api/v1/items", 200)));
        assert!(f.matches(&get("HEAD", "/api/a/b/items", 204)));
        assert!(!f.matches(&get("POST", "/api/v1/items", 200)));
        assert!(!f.matches(&get("GET", "/api/v1/items", 500)));
        assert!(!f.matches(&get("GET", "/other", 200)));
        assert!(!f.matches(&Item::Stream(OpaqueStream::default())));
        assert!(Filter::parse("").unwrap().matches(&get("PUT", "/", 0)));
        let tcp = Filter::parse("kind=tcp").unwrap();
        assert!(tcp.matches(&Item::Stream(OpaqueStream::default())));
        assert!(!tcp.matches(&get("GET", "/", 200)));
        assert!(
            Filter::parse("status=404")
                .unwrap()
                .matches(&get("GET", "/", 404))
        );
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        for (f, says) in [
            ("method", "key=value"),
            ("colour=red", "unknown key"),
            ("status=6xx", "status"),
            ("kind=udp", "http or tcp"),
            ("stream=x", "number"),
            ("path=", "no value"),
        ] {
            let e = Filter::parse(f).unwrap_err().to_string();
            assert!(e.contains(says), "{f}: {e}");
        }
    }

    #[test]
    fn globs() {
        assert!(glob(b"/a/*", b"/a/b/c"));
        assert!(glob(b"*.json", b"/x/y.json"));
        assert!(glob(b"/?", b"/a"));
        assert!(!glob(b"/?", b"/ab"));
        assert!(glob(b"*", b""));
        assert!(!glob(b"/a", b"/a/"));
    }
}
