//! `docs/api/openapi.yaml` documents every path the HTTP API serves, and only those:
//! checked against the router's route table and against a live edge, response shapes
//! included (no missing required field, no undocumented field).

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

use serde_json::Value;

use common::*;

fn spec() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/api/openapi.yaml"
    ))
    .unwrap();
    serde_norway::from_str(&text).unwrap()
}

/// The documented routes the edge itself serves: paths marked with another role
/// (`x-cloudtap-role: query`, `replay`) are served by that role and checked in its crate.
fn documented(spec: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        if ops.get("x-cloudtap-role").is_some() {
            continue;
        }
        for method in ops.as_object().unwrap().keys() {
            out.insert((method.to_uppercase(), path.clone()));
        }
    }
    out
}

fn resolve<'a>(spec: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let mut cur = spec;
            for part in r.trim_start_matches("#/").split('/') {
                cur = &cur[part];
            }
            resolve(spec, cur)
        }
        None => v,
    }
}

/// Checks `v` against a schema: types, required and only documented properties, enums.
fn validate(spec: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(spec, schema);
    match schema["type"].as_str() {
        Some("object") => {
            let obj = v
                .as_object()
                .ok_or(format!("{at}: expected an object, got {v}"))?;
            let props = schema["properties"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for req in schema["required"].as_array().into_iter().flatten() {
                let req = req.as_str().unwrap();
                if !obj.contains_key(req) {
                    return Err(format!("{at}: missing required field {req:?}"));
                }
            }
            for (k, val) in obj {
                let p = props
                    .get(k)
                    .ok_or(format!("{at}: field {k:?} is not documented"))?;
                validate(spec, p, val, &format!("{at}.{k}"))?;
            }
            Ok(())
        }
        Some("array") => {
            let arr = v.as_array().ok_or(format!("{at}: expected an array"))?;
            for (i, item) in arr.iter().enumerate() {
                validate(spec, &schema["items"], item, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        Some("string") => {
            let s = v
                .as_str()
                .ok_or(format!("{at}: expected a string, got {v}"))?;
            if let Some(allowed) = schema["enum"].as_array()
                && !allowed.iter().any(|a| a == s)
            {
                return Err(format!("{at}: {s:?} is not one of {allowed:?}"));
            }
            Ok(())
        }
        Some("integer") => v
            .as_i64()
            .or(v.as_u64().map(|u| u as i64))
            .map(|_| ())
            .ok_or(format!("{at}: expected an integer, got {v}")),
        Some("boolean") => v
            .as_bool()
            .map(|_| ())
            .ok_or(format!("{at}: expected a boolean, got {v}")),
        other => Err(format!(
            "{at}: schema type {other:?} not handled by this checker"
        )),
    }
}

struct Resp {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

fn request(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Resp {
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    Resp {
        status,
        content_type,
        body: raw[split + 4..].to_vec(),
    }
}

/// Checks a live response against the documented response of its operation.
fn check(spec: &Value, method: &str, path: &str, r: &Resp) -> Value {
    let op = &spec["paths"][path][method.to_lowercase()];
    let doc = op["responses"]
        .get(r.status.to_string())
        .unwrap_or_else(|| {
            panic!(
                "{method} {path} answered {} which is not documented: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            )
        });
    let doc = resolve(spec, doc);
    let (media, content) = doc["content"].as_object().unwrap().iter().next().unwrap();
    assert!(
        r.content_type.starts_with(media.as_str()),
        "{method} {path}: content-type {} is not {media}",
        r.content_type
    );
    if media == "application/json" {
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        validate(
            spec,
            &content["schema"],
            &v,
            &format!("{method} {path} {}", r.status),
        )
        .unwrap();
        v
    } else {
        Value::Null
    }
}

#[test]
fn every_served_route_is_documented_and_nothing_else() {
    let documented = documented(&spec());
    let served: BTreeSet<(String, String)> = cloudtap_edge::http::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        documented, served,
        "docs/api/openapi.yaml and http::ROUTES differ"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_api_answers_as_documented() {
    let spec = spec();
    let upstream = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap().to_string();
        std::mem::forget(l);
        a
    };
    let edge = TestEdge::start(config(&[("demo-service", upstream)])).await;
    let base = edge.http.clone();
    let token = edge.login(&edge.admin_tls()).await.token;
    let mut exercised = BTreeSet::new();
    let mut call = |method: &str, path: &str, tok: Option<&str>, body: Option<Value>| {
        let b = base.clone();
        let (m, p, t) = (method.to_string(), path.to_string(), tok.map(String::from));
        let r = std::thread::spawn(move || request(&b, &m, &p, t.as_deref(), body.as_ref()))
            .join()
            .unwrap();
        exercised.insert((method.to_string(), path.to_string()));
        let v = check(&spec, method, path, &r);
        (r.status, v)
    };

    // The success path of every operation, in an order that makes each possible.
    for p in ["/v1/targets", "/targets"] {
        let (s, v) = call("GET", p, Some(&token), None);
        assert_eq!(s, 200);
        assert_eq!(v["targets"][0]["name"], "demo-service");
    }
    let (s, opened) = call(
        "POST",
        "/v1/proxy",
        Some(&token),
        Some(serde_json::json!({"target": "demo-service"})),
    );
    assert_eq!(s, 200);
    let (s, renewed) = call(
        "POST",
        "/v1/renew",
        Some(opened["session_token"].as_str().unwrap()),
        Some(serde_json::json!({"session_id": opened["session_id"]})),
    );
    assert_eq!(s, 200, "{renewed}");
    // A replay of that session records its findings on a chain of the run's own.
    let source = opened["session_id"].as_str().unwrap().to_owned();
    let (s, replaying) = call(
        "POST",
        "/v1/proxy",
        Some(&token),
        Some(serde_json::json!({"target": "demo-service", "replay_of": source})),
    );
    assert_eq!(s, 200, "{replaying}");
    let report = |replay_session: &Value| {
        serde_json::json!({
            "source_session": source, "replay_session": replay_session, "target": "demo-service",
            "diffs": [{
                "source_session": "", "replay_session": "", "target": "", "stream_id": 0,
                "exchange_index": 0, "method": "GET", "path": "/", "kind": "status",
                "field": "status", "expected": "200", "actual": "503", "note": ""
            }]
        })
    };
    let (s, recorded) = call(
        "POST",
        "/v1/replays",
        Some(&token),
        Some(report(&replaying["session_id"])),
    );
    assert_eq!(s, 200, "{recorded}");
    assert_eq!(recorded["records"], 1);
    // Findings about a session that is no replay are refused.
    let (s, v) = call(
        "POST",
        "/v1/replays",
        Some(&token),
        Some(report(&opened["session_id"])),
    );
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("invalid_argument")),
        "{v}"
    );
    let (s, v) = call(
        "POST",
        "/v1/close",
        Some(&token),
        Some(serde_json::json!({"selector": opened["session_id"]})),
    );
    assert_eq!(s, 200);
    assert_eq!(v["session_ids"][0], opened["session_id"]);
    let (s, _) = call(
        "POST",
        "/proxy",
        Some(&token),
        Some(serde_json::json!({"target": "demo-service"})),
    );
    assert_eq!(s, 200);
    let (s, _) = call(
        "POST",
        "/close",
        Some(&token),
        Some(serde_json::json!({"selector": "demo-service"})),
    );
    assert_eq!(s, 200);
    let (s, issued) = call(
        "POST",
        "/v1/tokens",
        Some(&token),
        Some(serde_json::json!({"subject": "bob", "ttl_seconds": 60})),
    );
    assert_eq!(s, 200);
    let (s, _) = call(
        "POST",
        "/v1/tokens/revoke",
        Some(&token),
        Some(serde_json::json!({"token_id": issued["token_id"]})),
    );
    assert_eq!(s, 200);
    let (s, h) = call("GET", "/healthz", None, None);
    assert_eq!((s, h["status"].as_str()), (200, Some("ok")));
    let (s, _) = call("GET", "/metrics", None, None);
    assert_eq!(s, 200);

    // Documented errors have the documented shape.
    let (s, v) = call("GET", "/v1/targets", None, None);
    assert_eq!((s, v["code"].as_str()), (401, Some("unauthenticated")));
    let (s, _) = call(
        "POST",
        "/v1/proxy",
        Some(&token),
        Some(serde_json::json!({"target": "nope"})),
    );
    assert_eq!(s, 404);
    let (s, v) = call(
        "POST",
        "/v1/proxy",
        Some(&token),
        Some(serde_json::json!({"wrong": 1})),
    );
    assert_eq!((s, v["code"].as_str()), (400, Some("bad_request")));
    let (s, _) = call(
        "POST",
        "/v1/tokens",
        Some(issued["token"].as_str().unwrap()),
        Some(serde_json::json!({"subject": "x"})),
    );
    assert_eq!(s, 401, "a revoked token is refused");

    // Server-sent events: the stream is documented, and its events have the Event shape.
    let addr = base.trim_start_matches("http://").to_string();
    let tok = token.clone();
    let sse = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "GET /v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {tok}\r\n\r\n"
        )
        .unwrap();
        let mut lines = BufReader::new(s).lines().map_while(Result::ok);
        let status = lines.next().unwrap();
        let mut content_type = String::new();
        for l in lines.by_ref() {
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-type:") {
                content_type = v.trim().to_string();
            }
        }
        let data = lines
            .find_map(|l| l.strip_prefix("data:").map(|d| d.trim().to_string()))
            .unwrap();
        (status, content_type, data)
    });
    // Give the watcher a moment to subscribe, then cause events until one arrives.
    for _ in 0..100 {
        if sse.is_finished() {
            break;
        }
        let _ = edge.open(&token, "demo-service").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, content_type, data) = sse.join().unwrap();
    assert!(status.contains("200"), "{status}");
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let schema = &spec["paths"]["/v1/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]
        ["schema"];
    validate(
        &spec,
        schema,
        &serde_json::from_str(&data).unwrap(),
        "event",
    )
    .unwrap();
    exercised.insert(("GET".into(), "/v1/events".into()));
    // The WebSocket form answers a plain GET with 400, as documented; its upgrade is
    // exercised in tests/http.rs.
    let r = request(&base, "GET", "/v1/events/ws", Some(&token), None);
    assert_eq!(r.status, 400);
    exercised.insert(("GET".into(), "/v1/events/ws".into()));

    assert_eq!(
        exercised,
        documented(&spec),
        "every documented operation was exercised"
    );

    // Nothing undocumented is served: other paths are 404, other methods 405.
    let r = request(&base, "GET", "/v1/nope", Some(&token), None);
    assert_eq!(r.status, 404);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    validate(
        &spec,
        &serde_json::json!({"$ref": "#/components/schemas/ApiError"}),
        &v,
        "404",
    )
    .unwrap();
    for (method, path) in documented(&spec) {
        let other = if method == "GET" { "DELETE" } else { "GET" };
        let r = request(&base, other, &path, Some(&token), None);
        assert_eq!(r.status, 405, "{other} {path} should not be served");
    }
    edge.stop().await;
}
