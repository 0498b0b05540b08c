//! `exchanges.har`: the mirrored HTTP and gRPC exchanges as HAR 1.2, so browser
//! devtools (Network → import) and HAR tools open them.
//!
//! One entry per exchange. A long-lived exchange (server-sent events) is one entry
//! whose response text is its messages in order. Bodies are what capture stored:
//! UTF-8 as text, anything else base64 (`encoding: "base64"`); a body that was not
//! stored or only in part says so in the `comment`. HAR has no place for gRPC trailers:
//! `grpc-status` and the service/method go in `_cloudtap` fields (custom fields start
//! with `_`, as HAR allows).

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use uuid::Uuid;

use cloudtap_schemas::{Body, BodyCapture, ExchangePhase, Header, HttpExchange, Record};

use super::{BundleError, build_err, rfc3339};

/// The HAR document of every exchange in `records`, ordered by start time.
pub fn har(records: &[Record]) -> Result<Vec<u8>, BundleError> {
    // Exchanges by (session, stream, index): the complete or start record, then the
    // messages and end of a long-lived one.
    let mut exchanges: BTreeMap<(Uuid, u64, u64), Vec<&HttpExchange>> = BTreeMap::new();
    for r in records {
        if let Body::HttpExchange(x) = &r.body {
            exchanges
                .entry((r.chain_id, x.stream_id, x.exchange_index))
                .or_default()
                .push(x);
        }
    }
    let mut entries: Vec<(i64, Value)> = exchanges
        .into_iter()
        .filter_map(|((session, _, _), parts)| entry(session, &parts))
        .collect();
    entries.sort_by_key(|(start, _)| *start);
    let doc = json!({
        "log": {
            "version": "1.2",
            "creator": {"name": "cloudtap", "version": env!("CARGO_PKG_VERSION")},
            "pages": [],
            "entries": entries.into_iter().map(|(_, e)| e).collect::<Vec<_>>(),
        }
    });
    serde_json::to_vec_pretty(&doc).map_err(build_err)
}

fn headers(h: &[Header]) -> Value {
    Value::Array(
        h.iter()
            .map(|h| json!({"name": h.name, "value": h.value}))
            .collect(),
    )
}

fn header<'a>(h: &'a [Header], name: &str) -> Option<&'a str> {
    h.iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

fn http_version(protocol: &str) -> &str {
    if protocol.is_empty() {
        "HTTP/1.1"
    } else {
        protocol
    }
}

/// The body as HAR text (UTF-8 as is, anything else base64), and a comment saying
/// what of it is missing.
fn body_text(b: &BodyCapture) -> (Option<(String, bool)>, String) {
    let mut comment = Vec::new();
    let text = b.content.as_ref().map(|c| match std::str::from_utf8(c) {
        Ok(s) => (s.to_string(), false),
        Err(_) => (B64.encode(c), true),
    });
    if b.content.is_none() && b.size > 0 {
        comment.push(format!("body of {} bytes not stored", b.size));
    }
    if b.truncated {
        let kept = b.content.as_ref().map_or(0, Vec::len);
        comment.push(format!("only the first {kept} of {} bytes stored", b.size));
    }
    if !b.note.is_empty() {
        comment.push(b.note.clone());
    }
    if !b.sha256.is_empty() {
        comment.push(format!("sha256 {}", hex::encode(&b.sha256)));
    }
    (text, comment.join("; "))
}

fn query_string(q: &str) -> Value {
    Value::Array(
        q.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (n, v) = p.split_once('=').unwrap_or((p, ""));
                json!({"name": n, "value": v})
            })
            .collect(),
    )
}

fn entry(session: Uuid, parts: &[&HttpExchange]) -> Option<(i64, Value)> {
    let head = parts
        .iter()
        .find(|x| matches!(x.phase, ExchangePhase::Complete | ExchangePhase::Start))?;
    let end = parts
        .iter()
        .map(|x| x.end_unix_nanos)
        .max()
        .unwrap_or(0)
        .max(head.end_unix_nanos);
    let time_ms = if end > 0 {
        (end - head.start_unix_nanos).max(0) as f64 / 1e6
    } else {
        0.0
    };
    let authority = if head.authority.is_empty() {
        "unknown-host"
    } else {
        &head.authority
    };
    let url = if head.query.is_empty() {
        format!("http://{authority}{}", head.path)
    } else {
        format!("http://{authority}{}?{}", head.path, head.query)
    };
    let version = http_version(&head.protocol);

    let mut request = json!({
        "method": head.method,
        "url": url,
        "httpVersion": version,
        "cookies": [],
        "headers": headers(&head.request_headers),
        "queryString": query_string(&head.query),
        "headersSize": -1,
        "bodySize": head.request_body.size,
    });
    if head.request_body.size > 0 || head.request_body.content.is_some() {
        let (text, comment) = body_text(&head.request_body);
        let mut post = json!({
            "mimeType": header(&head.request_headers, "content-type").unwrap_or(""),
        });
        // HAR's postData has no encoding field: a binary request body is only
        // described.
        let comment = match text {
            Some((t, false)) => {
                post["text"] = Value::String(t);
                comment
            }
            Some((_, true)) if comment.is_empty() => {
                "binary body, see tables/http_exchanges.parquet".to_string()
            }
            Some((_, true)) => format!("{comment}; binary body, see tables/http_exchanges.parquet"),
            None => comment,
        };
        if !comment.is_empty() {
            post["comment"] = Value::String(comment);
        }
        request["postData"] = post;
    }

    // A long-lived exchange's messages are its response body, in order.
    let mut response_body = head.response_body.clone();
    let mut messages: Vec<&&HttpExchange> = parts
        .iter()
        .filter(|x| x.phase == ExchangePhase::Message)
        .collect();
    messages.sort_by_key(|x| x.message_index);
    if !messages.is_empty() {
        let mut all = Vec::new();
        let mut complete = true;
        for m in &messages {
            match &m.response_body.content {
                Some(c) => all.extend_from_slice(c),
                None => complete = false,
            }
            complete &= !m.response_body.truncated;
            response_body.size += m.response_body.size;
        }
        response_body.content = Some(all);
        response_body.truncated = !complete;
        response_body.sha256.clear();
        response_body.note = format!("{} messages of a long-lived response", messages.len());
    }
    let (text, comment) = body_text(&response_body);
    let mut content = json!({
        "size": response_body.size,
        "mimeType": header(&head.response_headers, "content-type").unwrap_or(""),
    });
    if let Some((t, b64)) = text {
        content["text"] = Value::String(t);
        if b64 {
            content["encoding"] = Value::String("base64".into());
        }
    }
    if !comment.is_empty() {
        content["comment"] = Value::String(comment);
    }
    let response = json!({
        "status": head.status,
        "statusText": "",
        "httpVersion": version,
        "cookies": [],
        "headers": headers(&head.response_headers),
        "content": content,
        "redirectURL": header(&head.response_headers, "location").unwrap_or(""),
        "headersSize": -1,
        "bodySize": response_body.size,
    });
    let mut e = json!({
        "startedDateTime": rfc3339(head.start_unix_nanos),
        "time": time_ms,
        "request": request,
        "response": response,
        "cache": {},
        "timings": {"send": 0, "wait": time_ms, "receive": 0},
        "_cloudtap": {
            "session_id": session.hyphenated().to_string(),
            "stream_id": head.stream_id,
            "exchange_index": head.exchange_index,
            "capture": head.capture,
            "redaction_version": head.redaction_version,
        },
    });
    let ct = &mut e["_cloudtap"];
    if !head.grpc_service.is_empty() {
        ct["grpc_service"] = Value::String(head.grpc_service.clone());
        ct["grpc_method"] = Value::String(head.grpc_method.clone());
    }
    if let Some(s) = parts
        .iter()
        .map(|x| x.grpc_status.as_str())
        .rfind(|s| !s.is_empty())
    {
        ct["grpc_status"] = Value::String(s.to_string());
    }
    if !head.traceparent.is_empty() {
        ct["traceparent"] = Value::String(head.traceparent.clone());
    }
    if !head.note.is_empty() {
        e["comment"] = Value::String(head.note.clone());
    }
    Some((head.start_unix_nanos, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudtap_schemas::ChainWriter;

    fn exchange(stream: u64, body: &[u8]) -> HttpExchange {
        HttpExchange {
            stream_id: stream,
            protocol: "HTTP/1.1".into(),
            method: "POST".into(),
            authority: "orders:8080".into(),
            path: "/v1/orders".into(),
            query: "a=1&b=".into(),
            status: 201,
            start_unix_nanos: 1_000_000_000,
            end_unix_nanos: 1_250_000_000,
            request_headers: vec![Header {
                name: "content-type".into(),
                value: "application/json".into(),
            }],
            request_body: BodyCapture {
                size: 9,
                content: Some(b"{\"a\":1}\n\n".to_vec()),
                ..Default::default()
            },
            response_body: BodyCapture {
                size: body.len() as u64 + 10,
                content: Some(body.to_vec()),
                truncated: true,
                ..Default::default()
            },
            capture: "full".into(),
            redaction_version: 2,
            ..Default::default()
        }
    }

    #[test]
    fn entries_carry_what_was_stored_and_say_what_was_not() {
        let mut w = ChainWriter::new(Uuid::now_v7());
        let records = vec![
            w.seal(2, Body::HttpExchange(Box::new(exchange(1, &[0xff, 0x00])))),
            w.seal(1, Body::HttpExchange(Box::new(exchange(0, b"ok")))),
        ];
        let doc: Value = serde_json::from_slice(&har(&records).unwrap()).unwrap();
        let entries = doc["log"]["entries"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        let e = &entries[0];
        assert_eq!(doc["log"]["version"], "1.2");
        assert_eq!(e["request"]["url"], "http://orders:8080/v1/orders?a=1&b=");
        assert_eq!(e["request"]["queryString"][1]["name"], "b");
        assert_eq!(e["request"]["postData"]["text"], "{\"a\":1}\n\n");
        assert_eq!(e["request"]["postData"]["mimeType"], "application/json");
        assert_eq!(e["time"], 250.0);
        assert_eq!(e["response"]["content"]["text"], "ok");
        assert_eq!(
            e["response"]["content"]["comment"],
            "only the first 2 of 12 bytes stored"
        );
        // Binary bodies travel as base64.
        let b = &entries[1]["response"]["content"];
        assert_eq!(b["encoding"], "base64");
        assert_eq!(b["text"], "/wA=");
    }
}
