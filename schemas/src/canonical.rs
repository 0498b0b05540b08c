//! The canonical encoding the record hash is computed over.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! "cloudtap.record" (15 bytes, domain separator)
//! u32 schema_version
//! 16  chain_id (UUID bytes)
//! u64 seq
//! i64 ts_unix_nanos
//! 32  prev_hash
//! u8  body tag (1 session_opened … 12 replay_diff, see Body::tag)
//! body fields in declaration order:
//!   string / bytes  → u32 length + bytes
//!   u64 / u32       → u64
//!   bool            → u8 (0 or 1)
//!   uuid            → 16 bytes
//!   enum            → its snake_case name as a string
//!   optional bytes  → u8 0 (absent) | u8 1 + u32 length + bytes
//!   i64             → 8 bytes
//!   list            → u64 count + each element's fields
//!   nested message  → its fields in declaration order
//! ```
//!
//! `record_hash` = SHA-256 of those bytes. The hash itself is not part of the input.

use sha2::{Digest, Sha256};

use crate::model::*;

pub const ZERO_HASH: [u8; 32] = [0; 32];

const DOMAIN: &[u8] = b"cloudtap.record";

struct Enc(Vec<u8>);

impl Enc {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(&(b.len() as u32).to_be_bytes());
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn bool(&mut self, b: bool) {
        self.0.push(b as u8);
    }
}

/// The canonical bytes of `r` (everything but `record_hash`).
pub fn canonical_encoding(r: &Record) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(128));
    e.0.extend_from_slice(DOMAIN);
    e.0.extend_from_slice(&r.schema_version.to_be_bytes());
    e.0.extend_from_slice(r.chain_id.as_bytes());
    e.u64(r.seq);
    e.0.extend_from_slice(&r.ts_unix_nanos.to_be_bytes());
    e.0.extend_from_slice(&r.prev_hash);
    e.0.push(r.body.tag());
    match &r.body {
        Body::SessionOpened(b) => {
            e.str(&b.edge);
            e.0.extend_from_slice(b.edge_chain_id.as_bytes());
            e.str(&b.identity);
            e.str(&b.target);
            e.str(&b.upstream);
            e.str(&b.client_cert_sha256);
            e.str(&b.token_id);
            e.str(&b.on_log_backpressure);
            // Added in schema 3; older records are hashed as they were written.
            if r.schema_version >= 3 {
                e.str(&b.replay_of);
            }
        }
        Body::SessionClosed(b) => {
            e.str(b.reason.as_str());
            e.str(&b.detail);
            e.u64(b.bytes_up);
            e.u64(b.bytes_down);
            e.u64(b.streams);
        }
        Body::StreamOpened(b) => {
            e.u64(b.stream_id);
            e.str(&b.target);
            e.str(&b.protocol_hint);
            e.str(&b.client_addr);
            e.str(&b.upstream_addr);
        }
        Body::StreamClosed(b) => {
            e.u64(b.stream_id);
            e.u64(b.bytes_up);
            e.u64(b.bytes_down);
            e.str(&b.error);
        }
        Body::Frame(b) => {
            e.u64(b.stream_id);
            e.str(b.direction.as_str());
            e.u64(b.offset);
            e.u64(b.length as u64);
            match &b.payload {
                None => e.0.push(0),
                Some(p) => {
                    e.0.push(1);
                    e.bytes(p);
                }
            }
        }
        Body::Gap(b) => {
            e.u64(b.dropped_records);
            e.u64(b.dropped_bytes);
            e.str(&b.reason);
        }
        Body::PolicyDecision(b) => {
            e.str(&b.identity);
            e.str(&b.target);
            e.str(&b.action);
            e.bool(b.allowed);
            e.str(&b.code);
            e.str(&b.reason);
            e.str(&b.token_id);
            e.str(&b.client_cert_sha256);
        }
        Body::Heartbeat(b) => {
            e.str(&b.edge);
            e.u64(b.open_sessions);
        }
        Body::Control(b) => {
            e.str(b.action.as_str());
            e.str(&b.subject);
            e.str(&b.reason);
            e.str(&b.actor);
        }
        Body::Audit(b) => {
            e.str(&b.actor);
            e.str(&b.action);
            e.str(&b.detail);
        }
        Body::HttpExchange(b) => {
            e.u64(b.stream_id);
            e.u64(b.exchange_index);
            e.str(b.phase.as_str());
            e.u64(b.message_index);
            for s in [&b.protocol, &b.method, &b.authority, &b.path, &b.query] {
                e.str(s);
            }
            e.u64(b.status as u64);
            e.str(&b.grpc_service);
            e.str(&b.grpc_method);
            e.str(&b.grpc_status);
            e.0.extend_from_slice(&b.start_unix_nanos.to_be_bytes());
            e.0.extend_from_slice(&b.end_unix_nanos.to_be_bytes());
            for headers in [&b.request_headers, &b.response_headers] {
                e.u64(headers.len() as u64);
                for h in headers {
                    e.str(&h.name);
                    e.str(&h.value);
                }
            }
            for body in [&b.request_body, &b.response_body] {
                e.u64(body.size);
                e.bytes(&body.sha256);
                match &body.content {
                    None => e.0.push(0),
                    Some(c) => {
                        e.0.push(1);
                        e.bytes(c);
                    }
                }
                e.bool(body.truncated);
                e.str(&body.note);
            }
            e.str(&b.traceparent);
            e.str(&b.capture);
            e.u64(b.redaction_version as u64);
            e.str(&b.note);
        }
        Body::ReplayDiff(b) => {
            for s in [&b.source_session, &b.replay_session, &b.target] {
                e.str(s);
            }
            e.u64(b.stream_id);
            e.u64(b.exchange_index);
            for s in [
                &b.method,
                &b.path,
                &b.kind,
                &b.field,
                &b.expected,
                &b.actual,
                &b.note,
            ] {
                e.str(s);
            }
        }
    }
    e.0
}

/// SHA-256 of the canonical encoding.
pub fn compute_hash(r: &Record) -> [u8; 32] {
    // Frames dominate the log; hash them without copying the payload: encode the rest,
    // then feed the payload bytes straight into the hasher.
    let mut h = Sha256::new();
    if let Body::Frame(f) = &r.body
        && let Some(p) = &f.payload
    {
        let head = canonical_encoding(&r.without_payload());
        // Replace the trailing "absent" marker with "present + length", then the bytes.
        h.update(&head[..head.len() - 1]);
        h.update([1u8]);
        h.update((p.len() as u32).to_be_bytes());
        h.update(p);
        return h.finalize().into();
    }
    h.update(canonical_encoding(r));
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn frame_fast_path_equals_full_encoding() {
        let r = Record {
            chain_id: Uuid::now_v7(),
            seq: 7,
            ts_unix_nanos: 42,
            prev_hash: [3; 32],
            record_hash: ZERO_HASH,
            schema_version: crate::SCHEMA_VERSION,
            body: Body::Frame(Frame {
                stream_id: 9,
                direction: Direction::Down,
                offset: 100,
                length: 4,
                payload: Some(b"data".to_vec()),
            }),
        };
        let full: [u8; 32] = Sha256::digest(canonical_encoding(&r)).into();
        assert_eq!(compute_hash(&r), full);
    }

    #[test]
    fn layout_is_stable() {
        // A fixed record must keep its hash forever: readers of old logs depend on it.
        let r = Record {
            chain_id: Uuid::from_bytes([1; 16]),
            seq: 1,
            ts_unix_nanos: 2,
            prev_hash: ZERO_HASH,
            record_hash: ZERO_HASH,
            schema_version: 1,
            body: Body::Audit(Audit {
                actor: "a".into(),
                action: "b".into(),
                detail: String::new(),
            }),
        };
        let enc = canonical_encoding(&r);
        assert_eq!(&enc[..15], b"cloudtap.record");
        assert_eq!(enc.len(), 15 + 4 + 16 + 8 + 8 + 32 + 1 + (4 + 1) * 2 + 4);
        // Computed independently from the layout in docs/log-format.md (in Python):
        // sha256(b"cloudtap.record" + u32 1 + 16×0x01 + u64 1 + i64 2 + 32×0 + u8 10
        //        + str "a" + str "b" + str "")
        assert_eq!(
            hex::encode(compute_hash(&r)),
            "507d0f7c95b4a5371106521b9b686c426c32a57e895eadc8d4e2966fa3062510"
        );
    }
}
