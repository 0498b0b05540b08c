//! Conversion between the model and the protobuf envelope stored in the log.

use cloudtap_proto::log::v1 as pb;
use prost::Message;
use uuid::Uuid;

use crate::SchemaError;
use crate::model::*;

fn uuid(field: &'static str, b: &[u8]) -> Result<Uuid, SchemaError> {
    Uuid::from_slice(b).map_err(|_| SchemaError::Invalid {
        field,
        reason: format!("expected 16 bytes, got {}", b.len()),
    })
}

fn hash(field: &'static str, b: &[u8]) -> Result<[u8; 32], SchemaError> {
    b.try_into().map_err(|_| SchemaError::Invalid {
        field,
        reason: format!("expected 32 bytes, got {}", b.len()),
    })
}

impl From<Record> for pb::Record {
    fn from(r: Record) -> Self {
        use pb::record::Body as B;
        let body = match r.body {
            Body::SessionOpened(b) => B::SessionOpened(pb::SessionOpened {
                edge: b.edge,
                edge_chain_id: b.edge_chain_id.as_bytes().to_vec(),
                identity: b.identity,
                target: b.target,
                upstream: b.upstream,
                client_cert_sha256: b.client_cert_sha256.clone(),
                token_id: b.token_id,
                on_log_backpressure: b.on_log_backpressure,
                replay_of: b.replay_of,
            }),
            Body::SessionClosed(b) => B::SessionClosed(pb::SessionClosed {
                reason: b.reason.as_str().into(),
                detail: b.detail,
                bytes_up: b.bytes_up,
                bytes_down: b.bytes_down,
                streams: b.streams,
            }),
            Body::StreamOpened(b) => B::StreamOpened(pb::StreamOpened {
                stream_id: b.stream_id,
                target: b.target,
                protocol_hint: b.protocol_hint,
                client_addr: b.client_addr,
                upstream_addr: b.upstream_addr,
            }),
            Body::StreamClosed(b) => B::StreamClosed(pb::StreamClosed {
                stream_id: b.stream_id,
                bytes_up: b.bytes_up,
                bytes_down: b.bytes_down,
                error: b.error,
            }),
            Body::Frame(b) => B::Frame(pb::Frame {
                stream_id: b.stream_id,
                direction: b.direction.as_str().into(),
                offset: b.offset,
                length: b.length,
                payload: b.payload,
            }),
            Body::Gap(b) => B::Gap(pb::Gap {
                dropped_records: b.dropped_records,
                dropped_bytes: b.dropped_bytes,
                reason: b.reason,
            }),
            Body::PolicyDecision(b) => B::PolicyDecision(pb::PolicyDecision {
                identity: b.identity,
                target: b.target,
                action: b.action,
                allowed: b.allowed,
                code: b.code,
                reason: b.reason,
                token_id: b.token_id,
                client_cert_sha256: b.client_cert_sha256.clone(),
            }),
            Body::Heartbeat(b) => B::Heartbeat(pb::Heartbeat {
                edge: b.edge,
                open_sessions: b.open_sessions,
            }),
            Body::Control(b) => B::Control(pb::Control {
                action: b.action.as_str().into(),
                subject: b.subject,
                reason: b.reason,
                actor: b.actor,
            }),
            Body::HttpExchange(b) => B::HttpExchange(exchange_to_pb(*b)),
            Body::Audit(b) => B::Audit(pb::Audit {
                actor: b.actor,
                action: b.action,
                detail: b.detail,
            }),
            Body::ReplayDiff(b) => B::ReplayDiff((*b).into()),
        };
        pb::Record {
            chain_id: r.chain_id.as_bytes().to_vec(),
            seq: r.seq,
            ts_unix_nanos: r.ts_unix_nanos,
            prev_hash: r.prev_hash.to_vec(),
            record_hash: r.record_hash.to_vec(),
            schema_version: r.schema_version,
            body: Some(body),
        }
    }
}

impl From<&Record> for pb::Record {
    fn from(r: &Record) -> Self {
        Self::from(r.clone())
    }
}

impl TryFrom<pb::Record> for Record {
    type Error = SchemaError;

    fn try_from(p: pb::Record) -> Result<Self, SchemaError> {
        use pb::record::Body as B;
        let invalid = |field: &'static str, v: &str| SchemaError::Invalid {
            field,
            reason: format!("unknown value {v:?}"),
        };
        let body = match p.body.ok_or(SchemaError::Invalid {
            field: "body",
            reason: "missing".into(),
        })? {
            B::SessionOpened(b) => Body::SessionOpened(SessionOpened {
                edge: b.edge,
                edge_chain_id: uuid("edge_chain_id", &b.edge_chain_id)?,
                identity: b.identity,
                target: b.target,
                upstream: b.upstream,
                client_cert_sha256: b.client_cert_sha256,
                token_id: b.token_id,
                on_log_backpressure: b.on_log_backpressure,
                replay_of: b.replay_of,
            }),
            B::SessionClosed(b) => Body::SessionClosed(SessionClosed {
                reason: CloseReason::parse(&b.reason)
                    .ok_or_else(|| invalid("reason", &b.reason))?,
                detail: b.detail,
                bytes_up: b.bytes_up,
                bytes_down: b.bytes_down,
                streams: b.streams,
            }),
            B::StreamOpened(b) => Body::StreamOpened(StreamOpened {
                stream_id: b.stream_id,
                target: b.target,
                protocol_hint: b.protocol_hint,
                client_addr: b.client_addr,
                upstream_addr: b.upstream_addr,
            }),
            B::StreamClosed(b) => Body::StreamClosed(StreamClosed {
                stream_id: b.stream_id,
                bytes_up: b.bytes_up,
                bytes_down: b.bytes_down,
                error: b.error,
            }),
            B::Frame(b) => Body::Frame(Frame {
                stream_id: b.stream_id,
                direction: Direction::parse(&b.direction)
                    .ok_or_else(|| invalid("direction", &b.direction))?,
                offset: b.offset,
                length: b.length,
                payload: b.payload,
            }),
            B::Gap(b) => Body::Gap(Gap {
                dropped_records: b.dropped_records,
                dropped_bytes: b.dropped_bytes,
                reason: b.reason,
            }),
            B::PolicyDecision(b) => Body::PolicyDecision(PolicyDecision {
                identity: b.identity,
                target: b.target,
                action: b.action,
                allowed: b.allowed,
                code: b.code,
                reason: b.reason,
                token_id: b.token_id,
                client_cert_sha256: b.client_cert_sha256,
            }),
            B::Heartbeat(b) => Body::Heartbeat(Heartbeat {
                edge: b.edge,
                open_sessions: b.open_sessions,
            }),
            B::Control(b) => Body::Control(Control {
                action: ControlAction::parse(&b.action)
                    .ok_or_else(|| invalid("action", &b.action))?,
                subject: b.subject,
                reason: b.reason,
                actor: b.actor,
            }),
            B::HttpExchange(b) => Body::HttpExchange(Box::new(exchange_from_pb(b)?)),
            B::Audit(b) => Body::Audit(Audit {
                actor: b.actor,
                action: b.action,
                detail: b.detail,
            }),
            B::ReplayDiff(b) => Body::ReplayDiff(Box::new(b.into())),
        };
        Ok(Record {
            chain_id: uuid("chain_id", &p.chain_id)?,
            seq: p.seq,
            ts_unix_nanos: p.ts_unix_nanos,
            prev_hash: hash("prev_hash", &p.prev_hash)?,
            record_hash: hash("record_hash", &p.record_hash)?,
            schema_version: p.schema_version,
            body,
        })
    }
}

impl From<ReplayDiff> for pb::ReplayDiff {
    fn from(b: ReplayDiff) -> Self {
        pb::ReplayDiff {
            source_session: b.source_session,
            replay_session: b.replay_session,
            target: b.target,
            stream_id: b.stream_id,
            exchange_index: b.exchange_index,
            method: b.method,
            path: b.path,
            kind: b.kind,
            field: b.field,
            expected: b.expected,
            actual: b.actual,
            note: b.note,
        }
    }
}

impl From<pb::ReplayDiff> for ReplayDiff {
    fn from(b: pb::ReplayDiff) -> Self {
        ReplayDiff {
            source_session: b.source_session,
            replay_session: b.replay_session,
            target: b.target,
            stream_id: b.stream_id,
            exchange_index: b.exchange_index,
            method: b.method,
            path: b.path,
            kind: b.kind,
            field: b.field,
            expected: b.expected,
            actual: b.actual,
            note: b.note,
        }
    }
}

/// Encodes a record as the protobuf bytes stored in the log.
pub fn encode_record(r: &Record) -> Vec<u8> {
    pb::Record::from(r).encode_to_vec()
}

/// Like [`encode_record`], moving the record's payload instead of copying it.
pub fn encode_record_owned(r: Record) -> Vec<u8> {
    pb::Record::from(r).encode_to_vec()
}

/// The record kind of encoded log bytes, read from the envelope's body field number
/// without decoding (or copying) the body: lets a reader that wants only some kinds
/// skip frames cheaply. `None` for bytes that are not a well-formed envelope.
pub fn peek_kind(bytes: &[u8]) -> Option<&'static str> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut b = bytes;
    let mut kind = None;
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let (field, wire) = (key >> 3, key & 7);
        let skip = match wire {
            0 => {
                varint(&mut b)?;
                0
            }
            1 => 8,
            2 => usize::try_from(varint(&mut b)?).ok()?,
            5 => 4,
            _ => return None,
        };
        b = b.get(skip..)?;
        kind = match field {
            10 => Some("session_opened"),
            11 => Some("session_closed"),
            12 => Some("stream_opened"),
            13 => Some("stream_closed"),
            14 => Some("frame"),
            15 => Some("gap"),
            16 => Some("policy_decision"),
            17 => Some("heartbeat"),
            18 => Some("control"),
            19 => Some("audit"),
            20 => Some("http_exchange"),
            21 => Some("replay_diff"),
            _ => kind,
        };
    }
    kind
}

fn exchange_to_pb(b: HttpExchange) -> pb::HttpExchange {
    let headers = |h: Vec<Header>| {
        h.into_iter()
            .map(|h| pb::Header {
                name: h.name,
                value: h.value,
            })
            .collect()
    };
    let body = |c: BodyCapture| pb::BodyCapture {
        size: c.size,
        sha256: c.sha256,
        content: c.content,
        truncated: c.truncated,
        note: c.note,
    };
    pb::HttpExchange {
        stream_id: b.stream_id,
        exchange_index: b.exchange_index,
        phase: b.phase.as_str().into(),
        message_index: b.message_index,
        protocol: b.protocol,
        method: b.method,
        authority: b.authority,
        path: b.path,
        query: b.query,
        status: b.status,
        grpc_service: b.grpc_service,
        grpc_method: b.grpc_method,
        grpc_status: b.grpc_status,
        start_unix_nanos: b.start_unix_nanos,
        end_unix_nanos: b.end_unix_nanos,
        request_headers: headers(b.request_headers),
        response_headers: headers(b.response_headers),
        request_body: Some(body(b.request_body)),
        response_body: Some(body(b.response_body)),
        traceparent: b.traceparent,
        capture: b.capture,
        redaction_version: b.redaction_version,
        note: b.note,
    }
}

fn exchange_from_pb(b: pb::HttpExchange) -> Result<HttpExchange, SchemaError> {
    let headers = |h: Vec<pb::Header>| {
        h.into_iter()
            .map(|h| Header {
                name: h.name,
                value: h.value,
            })
            .collect()
    };
    let body = |c: Option<pb::BodyCapture>| {
        let c = c.unwrap_or_default();
        BodyCapture {
            size: c.size,
            sha256: c.sha256,
            content: c.content,
            truncated: c.truncated,
            note: c.note,
        }
    };
    Ok(HttpExchange {
        stream_id: b.stream_id,
        exchange_index: b.exchange_index,
        phase: ExchangePhase::parse(&b.phase).ok_or_else(|| SchemaError::Invalid {
            field: "http_exchange.phase",
            reason: format!("unknown phase {:?}", b.phase),
        })?,
        message_index: b.message_index,
        protocol: b.protocol,
        method: b.method,
        authority: b.authority,
        path: b.path,
        query: b.query,
        status: b.status,
        grpc_service: b.grpc_service,
        grpc_method: b.grpc_method,
        grpc_status: b.grpc_status,
        start_unix_nanos: b.start_unix_nanos,
        end_unix_nanos: b.end_unix_nanos,
        request_headers: headers(b.request_headers),
        response_headers: headers(b.response_headers),
        request_body: body(b.request_body),
        response_body: body(b.response_body),
        traceparent: b.traceparent,
        capture: b.capture,
        redaction_version: b.redaction_version,
        note: b.note,
    })
}

/// Decodes log bytes into a record (the hash is not checked here; see
/// [`crate::verify_chain`]).
pub fn decode_record(bytes: &[u8]) -> Result<Record, SchemaError> {
    Record::try_from(pb::Record::decode(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChainWriter;
    use proptest::prelude::*;

    fn arb_body() -> impl Strategy<Value = Body> {
        let s = || "[a-z0-9_.:-]{0,12}";
        prop_oneof![
            (s(), s(), s(), s(), s(), s(), s(), s()).prop_map(|(a, b, c, d, e, f, g, h)| {
                Body::SessionOpened(SessionOpened {
                    edge: a,
                    edge_chain_id: Uuid::now_v7(),
                    identity: b,
                    target: c,
                    upstream: d,
                    client_cert_sha256: e,
                    token_id: f,
                    on_log_backpressure: g,
                    replay_of: h,
                })
            }),
            (s(), s(), s(), s(), s(), any::<u64>(), any::<u64>()).prop_map(
                |(a, b, c, d, e, n, m)| {
                    Body::ReplayDiff(Box::new(ReplayDiff {
                        source_session: a,
                        replay_session: b.clone(),
                        target: c,
                        stream_id: n,
                        exchange_index: m,
                        method: d.clone(),
                        path: e.clone(),
                        kind: b,
                        field: d,
                        expected: e,
                        actual: String::new(),
                        note: "n".into(),
                    }))
                }
            ),
            (
                0..CloseReason::ALL.len(),
                s(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(|(i, d, u, w, n)| Body::SessionClosed(SessionClosed {
                    reason: CloseReason::ALL[i],
                    detail: d,
                    bytes_up: u,
                    bytes_down: w,
                    streams: n,
                })),
            (
                any::<u64>(),
                any::<bool>(),
                any::<u64>(),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64))
            )
                .prop_map(|(id, up, off, payload)| Body::Frame(Frame {
                    stream_id: id,
                    direction: if up { Direction::Up } else { Direction::Down },
                    offset: off,
                    length: payload.as_ref().map_or(0, |p| p.len() as u32),
                    payload,
                })),
            (s(), s(), any::<bool>()).prop_map(|(a, b, allowed)| Body::PolicyDecision(
                PolicyDecision {
                    identity: a,
                    target: b,
                    action: "attach".into(),
                    allowed,
                    ..Default::default()
                }
            )),
            (s(), any::<bool>()).prop_map(|(subject, revoke)| Body::Control(Control {
                action: if revoke {
                    ControlAction::Revoke
                } else {
                    ControlAction::Close
                },
                subject,
                reason: String::new(),
                actor: "admin".into(),
            })),
            (
                (
                    any::<u64>(),
                    0..4usize,
                    s(),
                    s(),
                    any::<u32>(),
                    any::<i64>()
                ),
                proptest::collection::vec((s(), s()), 0..4),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
                any::<bool>(),
            )
                .prop_map(
                    |((idx, phase, method, path, status, t), headers, content, trunc)| {
                        Body::HttpExchange(Box::new(crate::fixtures::exchange(
                            idx,
                            ExchangePhase::ALL[phase],
                            &method,
                            &path,
                            status,
                            t,
                            headers,
                            content,
                            trunc,
                        )))
                    }
                ),
        ]
    }

    proptest! {
        #[test]
        fn proto_round_trip_keeps_hash(bodies in proptest::collection::vec(arb_body(), 1..8)) {
            let mut w = ChainWriter::new(Uuid::now_v7());
            let recs: Vec<Record> = bodies.into_iter().map(|b| w.seal_now(b)).collect();
            let decoded: Vec<Record> = recs
                .iter()
                .map(|r| decode_record(&encode_record(r)).unwrap())
                .collect();
            prop_assert_eq!(&decoded, &recs);
            for r in &recs {
                prop_assert_eq!(peek_kind(&encode_record(r)), Some(r.kind()));
            }
            prop_assert!(crate::verify_chain(None, &decoded).is_ok());
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_record(&bytes);
            let _ = peek_kind(&bytes);
        }
    }
}
