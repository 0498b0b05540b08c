//! The cloudtap event model: the records of the traffic log as Rust types, their
//! conversion to and from the protobuf envelope (`cloudtap.log.v1.Record`), and the
//! hash chain over a canonical encoding.
//!
//! Every record belongs to one **chain** (a session, a replay run, or a writer's own
//! chain), has a gap-free `seq` on it starting at 0, and carries `prev_hash` (the
//! previous record's `record_hash`, zeros for seq 0) and `record_hash` =
//! SHA-256 over [`canonical_encoding`]. The canonical encoding is defined here and not
//! by prost's wire format, so that any reader — a Parquet verifier, a bundle checker
//! in another language — can recompute it from typed columns. Its layout is written
//! down in `docs/log-format.md`; [`SCHEMA_VERSION`] names it, and a verifier refuses a
//! version newer than it knows.

mod canonical;
mod convert;
mod model;
pub mod tables;

pub use canonical::{ZERO_HASH, canonical_encoding, compute_hash};
pub use convert::{decode_record, encode_record, encode_record_owned, peek_kind};
pub use model::*;

/// Version of the canonical encoding (and of the record schema). Bump it when a field
/// is added; old versions stay verifiable.
/// 2: `http_exchange` records.
pub const SCHEMA_VERSION: u32 = 3;

/// Errors of the event model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    #[error("record could not be decoded: {0}; the log may be corrupt or from a newer cloudtap")]
    Decode(#[from] prost::DecodeError),
    #[error("record field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(
        "record schema version {found} is newer than this build knows ({known}); upgrade cloudtap to read it"
    )]
    NewerSchema { found: u32, known: u32 },
    #[error("hash chain broken at chain {chain_id} seq {seq}: {reason}")]
    Chain {
        chain_id: uuid::Uuid,
        seq: u64,
        reason: String,
    },
}

/// Checks that `records` form a valid chain segment: consecutive seqs, each
/// `prev_hash` equal to the previous `record_hash`, and every `record_hash`
/// recomputed from the record's fields. `prev` is the record before the first one
/// (None when the slice must start at seq 0).
pub fn verify_chain<'a>(
    prev: Option<&Record>,
    records: impl IntoIterator<Item = &'a Record>,
) -> Result<u64, SchemaError> {
    let (mut expect_seq, mut expect_prev, mut chain) = match prev {
        Some(p) => (p.seq + 1, p.record_hash, Some(p.chain_id)),
        None => (0, ZERO_HASH, None),
    };
    let mut n = 0;
    for r in records {
        let fail = |reason: String| SchemaError::Chain {
            chain_id: r.chain_id,
            seq: r.seq,
            reason,
        };
        if r.schema_version > SCHEMA_VERSION {
            return Err(SchemaError::NewerSchema {
                found: r.schema_version,
                known: SCHEMA_VERSION,
            });
        }
        if let Some(c) = chain
            && c != r.chain_id
        {
            return Err(fail(format!("record belongs to chain {c}")));
        }
        chain = Some(r.chain_id);
        if r.seq != expect_seq {
            return Err(fail(format!("expected seq {expect_seq}")));
        }
        if r.prev_hash != expect_prev {
            return Err(fail("prev_hash does not match the previous record".into()));
        }
        if compute_hash(r) != r.record_hash {
            return Err(fail(
                "record_hash does not match the record's fields".into(),
            ));
        }
        expect_seq += 1;
        expect_prev = r.record_hash;
        n += 1;
    }
    Ok(n)
}

/// Builds the records of one chain: assigns seq, timestamps and hashes. Exactly one
/// writer owns a chain, so a `ChainWriter` is not shared; it is the only place seqs are
/// assigned.
#[derive(Debug, Clone)]
pub struct ChainWriter {
    chain_id: uuid::Uuid,
    next_seq: u64,
    prev_hash: [u8; 32],
}

impl ChainWriter {
    /// Starts a new chain at seq 0.
    pub fn new(chain_id: uuid::Uuid) -> Self {
        Self {
            chain_id,
            next_seq: 0,
            prev_hash: ZERO_HASH,
        }
    }

    /// Continues a chain after its last record (e.g. an edge closing a session it
    /// held before a restart).
    pub fn resume(last: &Record) -> Self {
        Self {
            chain_id: last.chain_id,
            next_seq: last.seq + 1,
            prev_hash: last.record_hash,
        }
    }

    pub fn chain_id(&self) -> uuid::Uuid {
        self.chain_id
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Seals `body` as the next record of the chain, stamped with `ts_unix_nanos`.
    pub fn seal(&mut self, ts_unix_nanos: i64, body: Body) -> Record {
        let mut r = Record {
            chain_id: self.chain_id,
            seq: self.next_seq,
            ts_unix_nanos,
            prev_hash: self.prev_hash,
            record_hash: ZERO_HASH,
            schema_version: SCHEMA_VERSION,
            body,
        };
        r.record_hash = compute_hash(&r);
        self.prev_hash = r.record_hash;
        self.next_seq += 1;
        r
    }

    /// Seals with the current wall-clock time.
    pub fn seal_now(&mut self, body: Body) -> Record {
        self.seal(now_unix_nanos(), body)
    }
}

/// Wall-clock time in nanoseconds since the Unix epoch.
pub fn now_unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_chain() -> Vec<Record> {
        let mut w = ChainWriter::new(uuid::Uuid::now_v7());
        vec![
            w.seal(
                1,
                Body::Heartbeat(Heartbeat {
                    edge: "e".into(),
                    open_sessions: 0,
                }),
            ),
            w.seal(
                2,
                Body::Frame(Frame {
                    stream_id: 1,
                    direction: Direction::Up,
                    offset: 0,
                    length: 3,
                    payload: Some(b"abc".to_vec()),
                }),
            ),
        ]
    }

    #[test]
    fn chain_verifies_and_detects_tampering() {
        let recs = sample_chain();
        assert_eq!(verify_chain(None, &recs).unwrap(), 2);
        let mut bad = recs.clone();
        if let Body::Frame(f) = &mut bad[1].body {
            f.payload = Some(b"abd".to_vec());
        }
        assert!(matches!(
            verify_chain(None, &bad),
            Err(SchemaError::Chain { seq: 1, .. })
        ));
        assert!(verify_chain(Some(&recs[0]), &recs[1..]).is_ok());
        assert!(verify_chain(None, &recs[1..]).is_err());
    }

    #[test]
    fn newer_schema_is_refused() {
        let mut recs = sample_chain();
        recs[0].schema_version = SCHEMA_VERSION + 1;
        assert!(matches!(
            verify_chain(None, &recs),
            Err(SchemaError::NewerSchema { .. })
        ));
    }
}

/// Test fixtures shared by this crate's unit tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use crate::*;

    /// An exchange record with every field set from the arguments.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn exchange(
        index: u64,
        phase: ExchangePhase,
        method: &str,
        path: &str,
        status: u32,
        t: i64,
        headers: Vec<(String, String)>,
        content: Option<Vec<u8>>,
        truncated: bool,
    ) -> HttpExchange {
        let headers: Vec<Header> = headers
            .into_iter()
            .map(|(name, value)| Header { name, value })
            .collect();
        HttpExchange {
            stream_id: index / 3,
            exchange_index: index,
            phase,
            message_index: index % 5,
            protocol: "HTTP/1.1".into(),
            method: method.into(),
            authority: "api.internal".into(),
            path: path.into(),
            query: "a=1".into(),
            status,
            grpc_service: String::new(),
            grpc_method: String::new(),
            grpc_status: String::new(),
            start_unix_nanos: t,
            end_unix_nanos: t.wrapping_add(5),
            request_headers: headers.clone(),
            response_headers: headers.into_iter().rev().collect(),
            request_body: BodyCapture {
                size: content
                    .as_ref()
                    .map_or(0, |c| c.len() as u64 + truncated as u64),
                sha256: if content.is_some() {
                    vec![7; 32]
                } else {
                    Vec::new()
                },
                content: content.clone(),
                truncated,
                note: if truncated {
                    "larger than 64 bytes".into()
                } else {
                    String::new()
                },
            },
            response_body: BodyCapture {
                size: 0,
                sha256: Vec::new(),
                content: None,
                truncated: false,
                note: "binary body".into(),
            },
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            capture: "exchanges".into(),
            redaction_version: 3,
            note: String::new(),
        }
    }
}
