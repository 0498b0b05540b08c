//! Redaction: removes secrets from what the HTTP mirror records, before anything is
//! appended (DESIGN: "Capture levels and redaction"). Nothing here touches the
//! forwarded bytes.
//!
//! Four kinds of rule, each built in and extendable from `[redaction]`:
//! - **header names**: the whole value goes;
//! - **field names**, matched anywhere in JSON bodies, form bodies and query strings
//!   (case-insensitive; `-`, `_`, `.`, `[`, `]` ignored; a built-in word also matches
//!   inside a longer name, so `x_access_token` and `user[password]` go too), and header
//!   names the same rules call secret;
//! - **JSON paths** (`$.a.b`, `$.list[*].c`, `$.*.d`, `$.list[0]`);
//! - **patterns** (regular expressions) over header values, paths, queries and text
//!   bodies: card numbers (Luhn-checked), e-mail addresses, bearer and JWT tokens, AWS
//!   access key ids.
//!
//! A removed value becomes [`REDACTED`]. A body is stored only when it could be
//! inspected: text (UTF-8) in a known encoding. JSON that does not parse (a truncated
//! body) is redacted by field name over its text; when JSON paths are configured such
//! a body is not stored at all, as its paths cannot be checked.

use std::borrow::Cow;

use regex::Regex;
use serde_json::Value;

use crate::config::RedactionConfig;

/// What replaces a removed value.
pub use cloudtap_schemas::REDACTED;

const BUILTIN_HEADERS: [&str; 12] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-access-token",
    "x-csrf-token",
    "x-xsrf-token",
    "x-amz-security-token",
    "x-goog-api-key",
];

/// Built-in field names, normalized (lowercase, no `-`, `_`, `.`, `[`, `]`); a key
/// matches when its normalized form contains one of these (`password_confirmation`,
/// `SecretAccessKey`, `user[password]`).
const BUILTIN_FIELD_SUFFIXES: [&str; 10] = [
    "password",
    "passwd",
    "secret",
    "token",
    "apikey",
    "privatekey",
    "accesskey",
    "sessionid",
    "credential",
    "signature",
];
/// Built-in field names that match only whole.
const BUILTIN_FIELDS: [&str; 8] = [
    "authorization",
    "ssn",
    "cardnumber",
    "creditcard",
    "cvv",
    "cvc",
    "pin",
    "otp",
];

/// (name, regex, Luhn-check the digits of a match before removing it)
const BUILTIN_PATTERNS: [(&str, &str, bool); 5] = [
    ("card", r"\b\d(?:[ -]?\d){12,18}\b", true),
    (
        "email",
        r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
        false,
    ),
    ("bearer", r"(?i)\bbearer\s+[A-Za-z0-9\-._~+/]+=*", false),
    (
        "jwt",
        r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+",
        false,
    ),
    ("aws_key_id", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", false),
];

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("pattern {pattern:?} is not a valid regular expression: {reason}")]
    Pattern { pattern: String, reason: String },
    #[error(
        "JSON path {0:?} is not understood: write `$` followed by `.name`, `.*`, `[*]` or `[N]` steps"
    )]
    JsonPath(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    AnyKey,
    AnyIndex,
    Index(usize),
}

struct Pattern {
    re: Regex,
    luhn: bool,
}

/// The compiled rules of one `[redaction]` version.
pub struct Redactor {
    pub version: u32,
    headers: Vec<String>,
    field_suffixes: Vec<String>,
    fields: Vec<String>,
    paths: Vec<Vec<Step>>,
    patterns: Vec<Pattern>,
    /// `"key": value` pairs in JSON text that does not parse.
    json_pair: Regex,
    /// `"key": {` or `"key": [` in such text.
    json_nested: Regex,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("version", &self.version)
            .field("headers", &self.headers.len())
            .field("patterns", &self.patterns.len())
            .finish()
    }
}

fn normalize(name: &str) -> String {
    name.chars()
        .filter(|c| !matches!(c, '-' | '_' | '.' | '[' | ']' | ' '))
        .flat_map(char::to_lowercase)
        .collect()
}

fn parse_path(p: &str) -> Result<Vec<Step>, RuleError> {
    let bad = || RuleError::JsonPath(p.to_owned());
    let mut rest = p.strip_prefix('$').ok_or_else(bad)?;
    let mut steps = Vec::new();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let key = &r[..end];
            if key.is_empty() {
                return Err(bad());
            }
            steps.push(if key == "*" {
                Step::AnyKey
            } else {
                Step::Key(key.to_owned())
            });
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']').ok_or_else(bad)?;
            let inner = &r[..end];
            steps.push(if inner == "*" {
                Step::AnyIndex
            } else {
                Step::Index(inner.parse().map_err(|_| bad())?)
            });
            rest = &r[end + 1..];
        } else {
            return Err(bad());
        }
    }
    if steps.is_empty() {
        return Err(bad());
    }
    Ok(steps)
}

fn luhn_ok(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let d2 = d * 2;
                if d2 > 9 { d2 - 9 } else { d2 }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

impl Redactor {
    /// Compiles the rules; pure (no IO), so config validation calls it too.
    pub fn new(cfg: &RedactionConfig) -> Result<Self, RuleError> {
        let mut headers: Vec<String> = cfg.headers.iter().map(|h| h.to_ascii_lowercase()).collect();
        let mut field_suffixes = Vec::new();
        let mut fields: Vec<String> = cfg.fields.iter().map(|f| normalize(f)).collect();
        let mut patterns = Vec::new();
        if cfg.builtin {
            headers.extend(BUILTIN_HEADERS.iter().map(|h| h.to_string()));
            field_suffixes.extend(BUILTIN_FIELD_SUFFIXES.iter().map(|f| f.to_string()));
            fields.extend(BUILTIN_FIELDS.iter().map(|f| f.to_string()));
            for (_, re, luhn) in BUILTIN_PATTERNS {
                patterns.push(Pattern {
                    re: Regex::new(re).expect("built-in patterns compile"),
                    luhn,
                });
            }
        }
        for p in &cfg.patterns {
            patterns.push(Pattern {
                re: Regex::new(p).map_err(|e| RuleError::Pattern {
                    pattern: p.clone(),
                    reason: e.to_string(),
                })?,
                luhn: false,
            });
        }
        let paths = cfg
            .json_paths
            .iter()
            .map(|p| parse_path(p))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            version: cfg.version,
            headers,
            field_suffixes,
            fields,
            paths,
            patterns,
            json_nested: Regex::new(r#""((?:[^"\\]|\\.){1,128})"\s*:\s*[\[{]"#)
                .expect("the nested pattern compiles"),
            json_pair: Regex::new(
                r#""((?:[^"\\]|\\.){1,128})"\s*:\s*("(?:[^"\\]|\\.)*"?|[^,}\]\s]+)"#,
            )
            .expect("the pair pattern compiles"),
        })
    }

    /// Whether a header's whole value is removed: a listed header name, or a name the
    /// field rules call secret (`private-token`, `x-session-token`, …).
    pub fn header_is_secret(&self, name: &str) -> bool {
        self.headers.iter().any(|h| h.eq_ignore_ascii_case(name)) || self.field_is_secret(name)
    }

    /// Whether a JSON / form / query field's value is removed.
    pub fn field_is_secret(&self, name: &str) -> bool {
        let n = normalize(name);
        self.fields.contains(&n) || self.field_suffixes.iter().any(|s| n.contains(s.as_str()))
    }

    /// Removes pattern matches from free text.
    pub fn text<'a>(&self, s: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(s);
        for p in &self.patterns {
            if !p.re.is_match(&out) {
                continue;
            }
            let replaced =
                p.re.replace_all(&out, |c: &regex::Captures| {
                    if p.luhn && !luhn_ok(&c[0]) {
                        c[0].to_owned()
                    } else {
                        REDACTED.to_owned()
                    }
                })
                .into_owned();
            out = Cow::Owned(replaced);
        }
        out
    }

    /// A header value as recorded.
    pub fn header_value(&self, name: &str, value: &str) -> String {
        if self.header_is_secret(name) {
            REDACTED.to_owned()
        } else {
            self.text(value).into_owned()
        }
    }

    /// A query string or form body (`a=1&b=2`): secret fields lose their values and
    /// patterns apply to the rest. Percent-encoding is kept as sent.
    pub fn form(&self, q: &str) -> String {
        q.split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if self.field_is_secret(&percent_decode(k)) => {
                    format!("{k}={REDACTED}")
                }
                Some((k, v)) => {
                    let decoded = percent_decode(v);
                    let red = self.text(&decoded);
                    if red == decoded {
                        pair.to_owned()
                    } else {
                        format!("{k}={REDACTED}")
                    }
                }
                None => self.text(pair).into_owned(),
            })
            .collect::<Vec<_>>()
            .join("&")
    }

    /// A path: patterns only (a token in a path segment, an e-mail address).
    pub fn path(&self, p: &str) -> String {
        let decoded = percent_decode(p);
        match self.text(&decoded) {
            Cow::Borrowed(_) => p.to_owned(),
            Cow::Owned(r) => r,
        }
    }

    /// A JSON value, in place.
    pub fn json(&self, v: &mut Value) {
        for path in &self.paths {
            apply_path(v, path);
        }
        self.json_walk(v);
    }

    fn json_walk(&self, v: &mut Value) {
        match v {
            Value::Object(map) => {
                for (k, val) in map.iter_mut() {
                    if self.field_is_secret(k) {
                        *val = Value::String(REDACTED.into());
                    } else {
                        self.json_walk(val);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|i| self.json_walk(i)),
            Value::String(s) => {
                if let Cow::Owned(r) = self.text(s) {
                    *s = r;
                }
            }
            // A card number sent as a JSON number.
            Value::Number(n) => {
                let t = n.to_string();
                if let Cow::Owned(_) = self.text(&t) {
                    *v = Value::String(REDACTED.into());
                }
            }
            _ => {}
        }
    }

    /// JSON text that does not parse (a truncated body): secret fields' values are
    /// removed by matching `"key": value` pairs, then patterns apply. `None` when JSON
    /// paths are configured, which cannot be checked on such text.
    pub fn json_text(&self, s: &str) -> Option<String> {
        if !self.paths.is_empty() {
            return None;
        }
        // A secret field whose value is an object or array cannot be cut out of text
        // reliably: then the body is not stored.
        if self
            .json_nested
            .captures_iter(s)
            .any(|c| self.field_is_secret(&c[1]))
        {
            return None;
        }
        let pairs = self.json_pair.replace_all(s, |c: &regex::Captures| {
            if self.field_is_secret(&c[1]) {
                format!("\"{}\": \"{REDACTED}\"", &c[1])
            } else {
                c[0].to_owned()
            }
        });
        Some(self.text(&pairs).into_owned())
    }
}

fn apply_path(v: &mut Value, path: &[Step]) {
    let Some((step, rest)) = path.split_first() else {
        *v = Value::String(REDACTED.into());
        return;
    };
    match (step, v) {
        (Step::Key(k), Value::Object(map)) => {
            if let Some(child) = map.get_mut(k) {
                apply_path(child, rest);
            }
        }
        (Step::AnyKey, Value::Object(map)) => {
            map.values_mut().for_each(|c| apply_path(c, rest));
        }
        (Step::AnyIndex, Value::Array(items)) => {
            items.iter_mut().for_each(|c| apply_path(c, rest));
        }
        (Step::Index(i), Value::Array(items)) => {
            if let Some(child) = items.get_mut(*i) {
                apply_path(child, rest);
            }
        }
        _ => {}
    }
}

/// `%XX` and `+` decoded; invalid sequences kept as they are.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Redactor {
        Redactor::new(&RedactionConfig {
            json_paths: vec!["$.user.ssn_like".into(), "$.cards[*].num".into()],
            fields: vec!["x-internal".into()],
            patterns: vec![r"sk_live_[A-Za-z0-9]+".into()],
            ..RedactionConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn headers_by_name_and_by_pattern() {
        let r = r();
        assert_eq!(r.header_value("Authorization", "Basic abc"), REDACTED);
        assert_eq!(
            r.header_value("x-note", "mail me at a.b@example.com"),
            "mail me at [REDACTED]"
        );
        assert_eq!(r.header_value("accept", "text/html"), "text/html");
    }

    #[test]
    fn json_fields_paths_and_patterns() {
        let r = r();
        let mut v: Value = serde_json::from_str(
            r#"{"user":{"name":"ann","ssn_like":"123","Access-Token":"t0k"},
                "cards":[{"num":"x1","ok":1},{"num":"x2"}],
                "note":"key sk_live_abc123 and card 4111 1111 1111 1111 but not 1234567890123",
                "X_Internal":"hidden","count":3}"#,
        )
        .unwrap();
        r.json(&mut v);
        assert_eq!(v["user"]["name"], "ann");
        assert_eq!(v["user"]["ssn_like"], REDACTED);
        assert_eq!(v["user"]["Access-Token"], REDACTED);
        assert_eq!(v["cards"][0]["num"], REDACTED);
        assert_eq!(v["cards"][1]["num"], REDACTED);
        assert_eq!(v["cards"][0]["ok"], 1);
        assert_eq!(v["X_Internal"], REDACTED);
        assert_eq!(
            v["note"],
            "key [REDACTED] and card [REDACTED] but not 1234567890123"
        );
        assert_eq!(v["count"], 3);
    }

    #[test]
    fn truncated_json_is_redacted_by_field_name_unless_paths_are_set() {
        let plain = Redactor::new(&RedactionConfig::default()).unwrap();
        let t = plain
            .json_text(r#"{"a":"keep","password":"hunter2","api_key": 42, "b":"bearer abc.def"#)
            .unwrap();
        assert!(
            !t.contains("hunter2") && !t.contains("42") && !t.contains("abc.def"),
            "{t}"
        );
        assert!(t.contains("keep"));
        assert!(r().json_text("{").is_none());
    }

    #[test]
    fn forms_and_queries() {
        let r = r();
        assert_eq!(
            r.form("a=1&access_token=xyz&mail=a%40example.com&flag"),
            "a=1&access_token=[REDACTED]&mail=[REDACTED]&flag"
        );
        assert_eq!(r.path("/users/a%40example.com/x"), "/users/[REDACTED]/x");
        assert_eq!(r.path("/plain/path"), "/plain/path");
    }

    #[test]
    fn numbers_nested_values_and_secret_sounding_names() {
        let r = Redactor::new(&RedactionConfig::default()).unwrap();
        let mut v: Value = serde_json::from_str(
            r#"{"card":4111111111111111,"count":12,"password_confirmation":"p","SecretAccessKey":"s"}"#,
        )
        .unwrap();
        r.json(&mut v);
        assert_eq!(v["card"], REDACTED);
        assert_eq!(v["count"], 12);
        assert_eq!(v["password_confirmation"], REDACTED);
        assert_eq!(v["SecretAccessKey"], REDACTED);
        assert!(r.json_text(r#"{"tokens": ["a", "b"], "x"#).is_none());
        assert_eq!(
            r.form("user[password]=p&a=1"),
            "user[password]=[REDACTED]&a=1"
        );
        assert!(r.header_is_secret("PRIVATE-TOKEN"));
        assert!(!r.header_is_secret("content-type"));
    }

    #[test]
    fn bad_rules_are_refused_with_a_hint() {
        let e = Redactor::new(&RedactionConfig {
            patterns: vec!["(".into()],
            ..RedactionConfig::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("not a valid regular expression"));
        let e = Redactor::new(&RedactionConfig {
            json_paths: vec!["user.name".into()],
            ..RedactionConfig::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("`$` followed by"));
    }

    #[test]
    fn builtin_rules_can_be_turned_off() {
        let r = Redactor::new(&RedactionConfig {
            builtin: false,
            ..RedactionConfig::default()
        })
        .unwrap();
        assert_eq!(r.header_value("authorization", "x"), "x");
    }
}
