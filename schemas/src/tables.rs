//! Arrow schemas of the Parquet tables (DESIGN: "Parquet tables"), and the one
//! conversion between records and rows that writers and readers share.
//!
//! - `frames`: one row per frame record.
//! - `events`: one row per record of any other kind; the body's fields are typed
//!   columns shared across kinds (`target`, `reason`, …), null where a kind has no
//!   such field. Together with the envelope columns they hold every field the record
//!   hash covers, so a reader recomputes `record_hash` from the row alone
//!   ([`records_from_batch`]).
//! - `http_exchanges`: one row per `http_exchange` record ([`exchanges`]).
//! - `sessions` and `streams`: one row per closed session / stream, derived summaries.
//!
//! Readers find columns by name, never by position. A schema change only adds nullable
//! columns at the end and bumps [`TABLES_VERSION`], which every file carries in its
//! key-value metadata under [`VERSION_KEY`].

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, BinaryBuilder, BooleanArray, FixedSizeBinaryArray,
    FixedSizeBinaryBuilder, RecordBatch, StringArray, StringBuilder, TimestampNanosecondArray,
    TimestampNanosecondBuilder, UInt32Array, UInt32Builder, UInt64Array, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use uuid::Uuid;

use crate::model::*;

mod exchanges;
mod replay_diffs;
pub use exchanges::{http_exchanges_batch, http_exchanges_schema};
pub use replay_diffs::{replay_diffs_batch, replay_diffs_schema};

/// Version of the table schemas; bumped when a column is added.
/// 2: the `http_exchanges` table.
/// 3: the `replay_diffs` table; `replay_of` on `events` and `sessions`.
pub const TABLES_VERSION: u32 = 3;
/// Key of the schema version in each Parquet file's key-value metadata.
pub const VERSION_KEY: &str = "cloudtap.tables_version";

/// The tables the recorder writes.
pub const TABLES: [&str; 6] = [
    "sessions",
    "streams",
    "events",
    "frames",
    "http_exchanges",
    "replay_diffs",
];

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

fn hash() -> DataType {
    DataType::FixedSizeBinary(32)
}

fn envelope() -> Vec<Field> {
    vec![
        Field::new("chain_id", DataType::Utf8, false),
        Field::new("session_id", DataType::Utf8, true),
        Field::new("seq", DataType::UInt64, false),
        Field::new("ts", ts(), false),
        Field::new("prev_hash", hash(), false),
        Field::new("record_hash", hash(), false),
        Field::new("schema_version", DataType::UInt32, false),
    ]
}

pub fn frames_schema() -> SchemaRef {
    let mut f = envelope();
    f.extend([
        Field::new("stream_id", DataType::UInt64, false),
        Field::new("direction", DataType::Utf8, false),
        Field::new("byte_offset", DataType::UInt64, false),
        Field::new("length", DataType::UInt32, false),
        Field::new("payload", DataType::Binary, true),
    ]);
    Arc::new(Schema::new(f))
}

/// String body columns of `events`, in schema order.
const EVENT_STR: [&str; 18] = [
    "edge",
    "edge_chain_id",
    "identity",
    "target",
    "upstream",
    "client_cert_sha256",
    "token_id",
    "on_log_backpressure",
    "reason",
    "detail",
    "protocol_hint",
    "client_addr",
    "upstream_addr",
    "error",
    "action",
    "code",
    "subject",
    "actor",
];
/// Integer body columns of `events`, in schema order.
const EVENT_U64: [&str; 7] = [
    "bytes_up",
    "bytes_down",
    "streams",
    "stream_id",
    "dropped_records",
    "dropped_bytes",
    "open_sessions",
];

pub fn events_schema() -> SchemaRef {
    let mut f = envelope();
    f.push(Field::new("kind", DataType::Utf8, false));
    for c in EVENT_STR {
        f.push(Field::new(c, DataType::Utf8, true));
    }
    for c in EVENT_U64 {
        f.push(Field::new(c, DataType::UInt64, true));
    }
    f.push(Field::new("allowed", DataType::Boolean, true));
    // Table schema 3.
    f.push(Field::new("replay_of", DataType::Utf8, true));
    Arc::new(Schema::new(f))
}

pub fn sessions_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("session_id", DataType::Utf8, false),
        Field::new("edge", DataType::Utf8, false),
        Field::new("identity", DataType::Utf8, false),
        Field::new("target", DataType::Utf8, false),
        Field::new("upstream", DataType::Utf8, false),
        Field::new("token_id", DataType::Utf8, false),
        Field::new("client_cert_sha256", DataType::Utf8, false),
        Field::new("on_log_backpressure", DataType::Utf8, false),
        Field::new("opened_at", ts(), false),
        Field::new("closed_at", ts(), false),
        Field::new("close_reason", DataType::Utf8, false),
        Field::new("close_detail", DataType::Utf8, false),
        Field::new("bytes_up", DataType::UInt64, false),
        Field::new("bytes_down", DataType::UInt64, false),
        Field::new("streams", DataType::UInt64, false),
        Field::new("frames", DataType::UInt64, false),
        Field::new("records", DataType::UInt64, false),
        // Table schema 3: the session this one replays, null when it is no replay.
        Field::new("replay_of", DataType::Utf8, true),
    ]))
}

pub fn streams_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("session_id", DataType::Utf8, false),
        Field::new("stream_id", DataType::UInt64, false),
        Field::new("target", DataType::Utf8, false),
        Field::new("protocol_hint", DataType::Utf8, false),
        Field::new("client_addr", DataType::Utf8, false),
        Field::new("upstream_addr", DataType::Utf8, false),
        Field::new("opened_at", ts(), false),
        Field::new("closed_at", ts(), false),
        Field::new("bytes_up", DataType::UInt64, false),
        Field::new("bytes_down", DataType::UInt64, false),
        Field::new("frames_up", DataType::UInt64, false),
        Field::new("frames_down", DataType::UInt64, false),
        Field::new("error", DataType::Utf8, false),
    ]))
}

pub fn schema_of(table: &str) -> Option<SchemaRef> {
    match table {
        "sessions" => Some(sessions_schema()),
        "streams" => Some(streams_schema()),
        "events" => Some(events_schema()),
        "frames" => Some(frames_schema()),
        "http_exchanges" => Some(http_exchanges_schema()),
        "replay_diffs" => Some(replay_diffs_schema()),
        _ => None,
    }
}

/// The table a record's row goes to.
pub fn table_of(r: &Record) -> &'static str {
    match r.body {
        Body::Frame(_) => "frames",
        Body::HttpExchange(_) => "http_exchanges",
        Body::ReplayDiff(_) => "replay_diffs",
        _ => "events",
    }
}

/// Envelope columns, shared by `frames` and `events`.
struct EnvelopeCols {
    chain: StringBuilder,
    session: StringBuilder,
    seq: UInt64Builder,
    ts: TimestampNanosecondBuilder,
    prev: FixedSizeBinaryBuilder,
    hash: FixedSizeBinaryBuilder,
    version: UInt32Builder,
}

impl EnvelopeCols {
    fn new(n: usize) -> Self {
        Self {
            chain: StringBuilder::with_capacity(n, n * 36),
            session: StringBuilder::with_capacity(n, n * 36),
            seq: UInt64Builder::with_capacity(n),
            ts: TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC"),
            prev: FixedSizeBinaryBuilder::with_capacity(n, 32),
            hash: FixedSizeBinaryBuilder::with_capacity(n, 32),
            version: UInt32Builder::with_capacity(n),
        }
    }

    fn push(&mut self, r: &Record, on_session: bool) {
        let id = r.chain_id.hyphenated().to_string();
        self.chain.append_value(&id);
        self.session.append_option(on_session.then_some(&id));
        self.seq.append_value(r.seq);
        self.ts.append_value(r.ts_unix_nanos);
        self.prev
            .append_value(r.prev_hash)
            .expect("hashes are 32 bytes");
        self.hash
            .append_value(r.record_hash)
            .expect("hashes are 32 bytes");
        self.version.append_value(r.schema_version);
    }

    fn finish(mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.chain.finish()),
            Arc::new(self.session.finish()),
            Arc::new(self.seq.finish()),
            Arc::new(self.ts.finish()),
            Arc::new(self.prev.finish()),
            Arc::new(self.hash.finish()),
            Arc::new(self.version.finish()),
        ]
    }
}

/// Builds one `frames` batch. `on_session(r)` tells whether the record's chain is a
/// session (then `session_id` is set).
pub fn frames_batch<'a>(
    records: impl ExactSizeIterator<Item = (&'a Record, bool)>,
) -> Result<RecordBatch, ArrowError> {
    let n = records.len();
    let mut env = EnvelopeCols::new(n);
    let mut stream = UInt64Builder::with_capacity(n);
    let mut dir = StringBuilder::with_capacity(n, n * 4);
    let mut offset = UInt64Builder::with_capacity(n);
    let mut len = UInt32Builder::with_capacity(n);
    let mut payload = BinaryBuilder::with_capacity(n, 0);
    for (r, on_session) in records {
        let Body::Frame(f) = &r.body else {
            return Err(ArrowError::InvalidArgumentError(format!(
                "record {}:{} is a {}, not a frame",
                r.chain_id,
                r.seq,
                r.kind()
            )));
        };
        env.push(r, on_session);
        stream.append_value(f.stream_id);
        dir.append_value(f.direction.as_str());
        offset.append_value(f.offset);
        len.append_value(f.length);
        payload.append_option(f.payload.as_deref());
    }
    let mut cols = env.finish();
    cols.push(Arc::new(stream.finish()));
    cols.push(Arc::new(dir.finish()));
    cols.push(Arc::new(offset.finish()));
    cols.push(Arc::new(len.finish()));
    cols.push(Arc::new(payload.finish()));
    RecordBatch::try_new(frames_schema(), cols)
}

/// One event row's body columns, by name (unset: null).
#[derive(Default)]
struct EventRow<'a> {
    s: [Option<&'a str>; EVENT_STR.len()],
    n: [Option<u64>; EVENT_U64.len()],
    allowed: Option<bool>,
    replay_of: Option<&'a str>,
}

impl<'a> EventRow<'a> {
    fn s(&mut self, col: &str, v: &'a str) {
        let i = EVENT_STR
            .iter()
            .position(|c| *c == col)
            .expect("known column");
        self.s[i] = Some(v);
    }
    fn n(&mut self, col: &str, v: u64) {
        let i = EVENT_U64
            .iter()
            .position(|c| *c == col)
            .expect("known column");
        self.n[i] = Some(v);
    }
}

fn event_row<'a>(body: &'a Body, edge_chain: &'a str) -> EventRow<'a> {
    let mut row = EventRow::default();
    match body {
        Body::SessionOpened(b) => {
            row.s("edge", &b.edge);
            row.s("edge_chain_id", edge_chain);
            row.s("identity", &b.identity);
            row.s("target", &b.target);
            row.s("upstream", &b.upstream);
            row.s("client_cert_sha256", &b.client_cert_sha256);
            row.s("token_id", &b.token_id);
            row.s("on_log_backpressure", &b.on_log_backpressure);
            row.replay_of = (!b.replay_of.is_empty()).then_some(b.replay_of.as_str());
        }
        Body::SessionClosed(b) => {
            row.s("reason", b.reason.as_str());
            row.s("detail", &b.detail);
            row.n("bytes_up", b.bytes_up);
            row.n("bytes_down", b.bytes_down);
            row.n("streams", b.streams);
        }
        Body::StreamOpened(b) => {
            row.n("stream_id", b.stream_id);
            row.s("target", &b.target);
            row.s("protocol_hint", &b.protocol_hint);
            row.s("client_addr", &b.client_addr);
            row.s("upstream_addr", &b.upstream_addr);
        }
        Body::StreamClosed(b) => {
            row.n("stream_id", b.stream_id);
            row.n("bytes_up", b.bytes_up);
            row.n("bytes_down", b.bytes_down);
            row.s("error", &b.error);
        }
        Body::Gap(b) => {
            row.n("dropped_records", b.dropped_records);
            row.n("dropped_bytes", b.dropped_bytes);
            row.s("reason", &b.reason);
        }
        Body::PolicyDecision(b) => {
            row.s("identity", &b.identity);
            row.s("target", &b.target);
            row.s("action", &b.action);
            row.allowed = Some(b.allowed);
            row.s("code", &b.code);
            row.s("reason", &b.reason);
            row.s("token_id", &b.token_id);
            row.s("client_cert_sha256", &b.client_cert_sha256);
        }
        Body::Heartbeat(b) => {
            row.s("edge", &b.edge);
            row.n("open_sessions", b.open_sessions);
        }
        Body::Control(b) => {
            row.s("action", b.action.as_str());
            row.s("subject", &b.subject);
            row.s("reason", &b.reason);
            row.s("actor", &b.actor);
        }
        Body::Audit(b) => {
            row.s("actor", &b.actor);
            row.s("action", &b.action);
            row.s("detail", &b.detail);
        }
        Body::Frame(_) | Body::HttpExchange(_) | Body::ReplayDiff(_) => {
            unreachable!("events_batch refuses frames, exchanges and replay diffs")
        }
    }
    row
}

/// Builds one `events` batch (every record must be a non-frame).
pub fn events_batch<'a>(
    records: impl ExactSizeIterator<Item = (&'a Record, bool)>,
) -> Result<RecordBatch, ArrowError> {
    let n = records.len();
    let mut env = EnvelopeCols::new(n);
    let mut kind = StringBuilder::with_capacity(n, n * 12);
    let mut strs: Vec<StringBuilder> = EVENT_STR
        .iter()
        .map(|_| StringBuilder::with_capacity(n, 0))
        .collect();
    let mut nums: Vec<UInt64Builder> = EVENT_U64
        .iter()
        .map(|_| UInt64Builder::with_capacity(n))
        .collect();
    let mut allowed = arrow::array::BooleanBuilder::with_capacity(n);
    let mut replay_of = StringBuilder::with_capacity(n, 0);
    for (r, on_session) in records {
        if table_of(r) != "events" {
            return Err(ArrowError::InvalidArgumentError(format!(
                "record {}:{} is a {}; it goes to the {} table",
                r.chain_id,
                r.seq,
                r.kind(),
                table_of(r)
            )));
        }
        env.push(r, on_session);
        kind.append_value(r.kind());
        let edge_chain = match &r.body {
            Body::SessionOpened(b) => b.edge_chain_id.hyphenated().to_string(),
            _ => String::new(),
        };
        let row = event_row(&r.body, &edge_chain);
        for (b, v) in strs.iter_mut().zip(row.s) {
            b.append_option(v);
        }
        for (b, v) in nums.iter_mut().zip(row.n) {
            b.append_option(v);
        }
        allowed.append_option(row.allowed);
        replay_of.append_option(row.replay_of);
    }
    let mut cols = env.finish();
    cols.push(Arc::new(kind.finish()));
    for mut b in strs {
        cols.push(Arc::new(b.finish()));
    }
    for mut b in nums {
        cols.push(Arc::new(b.finish()));
    }
    cols.push(Arc::new(allowed.finish()));
    cols.push(Arc::new(replay_of.finish()));
    RecordBatch::try_new(events_schema(), cols)
}

/// A closed session's summary row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionRow {
    pub session_id: Uuid,
    pub edge: String,
    pub identity: String,
    pub target: String,
    pub upstream: String,
    pub token_id: String,
    pub client_cert_sha256: String,
    pub on_log_backpressure: String,
    pub opened_at: i64,
    pub closed_at: i64,
    pub close_reason: String,
    pub close_detail: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub streams: u64,
    pub frames: u64,
    pub records: u64,
    /// Empty when the session is no replay. Defaulted: checkpoints written before
    /// table schema 3 lack it.
    #[serde(default)]
    pub replay_of: String,
}

/// A closed stream's summary row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamRow {
    pub session_id: Uuid,
    pub stream_id: u64,
    pub target: String,
    pub protocol_hint: String,
    pub client_addr: String,
    pub upstream_addr: String,
    pub opened_at: i64,
    pub closed_at: i64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub frames_up: u64,
    pub frames_down: u64,
    pub error: String,
}

fn strings<'a, T: 'a>(rows: &'a [T], f: impl Fn(&'a T) -> &'a str) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
}

fn u64s<T>(rows: &[T], f: impl Fn(&T) -> u64) -> ArrayRef {
    Arc::new(UInt64Array::from_iter_values(rows.iter().map(f)))
}

fn times<T>(rows: &[T], f: impl Fn(&T) -> i64) -> ArrayRef {
    Arc::new(TimestampNanosecondArray::from_iter_values(rows.iter().map(f)).with_timezone("UTC"))
}

pub fn sessions_batch(rows: &[SessionRow]) -> Result<RecordBatch, ArrowError> {
    let ids: Vec<String> = rows
        .iter()
        .map(|r| r.session_id.hyphenated().to_string())
        .collect();
    RecordBatch::try_new(
        sessions_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(ids)),
            strings(rows, |r| &r.edge),
            strings(rows, |r| &r.identity),
            strings(rows, |r| &r.target),
            strings(rows, |r| &r.upstream),
            strings(rows, |r| &r.token_id),
            strings(rows, |r| &r.client_cert_sha256),
            strings(rows, |r| &r.on_log_backpressure),
            times(rows, |r| r.opened_at),
            times(rows, |r| r.closed_at),
            strings(rows, |r| &r.close_reason),
            strings(rows, |r| &r.close_detail),
            u64s(rows, |r| r.bytes_up),
            u64s(rows, |r| r.bytes_down),
            u64s(rows, |r| r.streams),
            u64s(rows, |r| r.frames),
            u64s(rows, |r| r.records),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| {
                (!r.replay_of.is_empty()).then_some(r.replay_of.as_str())
            }))),
        ],
    )
}

pub fn streams_batch(rows: &[StreamRow]) -> Result<RecordBatch, ArrowError> {
    let ids: Vec<String> = rows
        .iter()
        .map(|r| r.session_id.hyphenated().to_string())
        .collect();
    RecordBatch::try_new(
        streams_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(ids)),
            u64s(rows, |r| r.stream_id),
            strings(rows, |r| &r.target),
            strings(rows, |r| &r.protocol_hint),
            strings(rows, |r| &r.client_addr),
            strings(rows, |r| &r.upstream_addr),
            times(rows, |r| r.opened_at),
            times(rows, |r| r.closed_at),
            u64s(rows, |r| r.bytes_up),
            u64s(rows, |r| r.bytes_down),
            u64s(rows, |r| r.frames_up),
            u64s(rows, |r| r.frames_down),
            strings(rows, |r| &r.error),
        ],
    )
}

/// Builds a batch of `table` (`frames`, `events` or `http_exchanges`, as [`table_of`]
/// says) from its records.
pub fn records_batch<'a>(
    table: &str,
    records: impl ExactSizeIterator<Item = (&'a Record, bool)>,
) -> Result<RecordBatch, ArrowError> {
    match table {
        "frames" => frames_batch(records),
        "http_exchanges" => http_exchanges_batch(records),
        "replay_diffs" => replay_diffs_batch(records),
        "events" => events_batch(records),
        other => Err(ArrowError::InvalidArgumentError(format!(
            "{other} is not a table of records"
        ))),
    }
}

/// Reads records back from a `frames`, `events`, `http_exchanges` or `replay_diffs`
/// batch, finding columns by name.
/// Hashes are read, not recomputed: pass the result to [`crate::verify_chain`] to
/// check them.
pub fn records_from_batch(batch: &RecordBatch) -> Result<Vec<Record>, ArrowError> {
    let col = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| ArrowError::SchemaError(format!("column {name} is missing")))
    };
    fn cast<'a, T: 'static>(a: &'a ArrayRef, name: &str) -> Result<&'a T, ArrowError> {
        a.as_any()
            .downcast_ref::<T>()
            .ok_or_else(|| ArrowError::SchemaError(format!("column {name} has the wrong type")))
    }
    let chain = col("chain_id")?;
    let chain = cast::<StringArray>(chain, "chain_id")?;
    let seq_a = col("seq")?;
    let seq = cast::<UInt64Array>(seq_a, "seq")?;
    let ts_a = col("ts")?;
    let ts = cast::<TimestampNanosecondArray>(ts_a, "ts")?;
    let prev_a = col("prev_hash")?;
    let prev = cast::<FixedSizeBinaryArray>(prev_a, "prev_hash")?;
    let hash_a = col("record_hash")?;
    let hash = cast::<FixedSizeBinaryArray>(hash_a, "record_hash")?;
    let ver_a = col("schema_version")?;
    let ver = cast::<UInt32Array>(ver_a, "schema_version")?;
    let bad = |what: String| ArrowError::InvalidArgumentError(what);

    // The frame columns, found once for the whole batch (None: an events batch).
    let frame_cols = match batch.column_by_name("payload") {
        None => None,
        Some(_) => Some((
            cast::<UInt64Array>(col("stream_id")?, "stream_id")?,
            cast::<StringArray>(col("direction")?, "direction")?,
            cast::<UInt64Array>(col("byte_offset")?, "byte_offset")?,
            cast::<UInt32Array>(col("length")?, "length")?,
            cast::<BinaryArray>(col("payload")?, "payload")?,
        )),
    };
    let exchange_cols = exchanges::ExchangeCols::of(batch);
    let diff_cols = replay_diffs::DiffCols::of(batch)?;
    let mut out = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        // Replay diffs first: they have an `exchange_index` column too.
        let body = if let Some(d) = &diff_cols {
            d.body_of(i)
        } else if let Some(x) = &exchange_cols {
            x.body_of(i)?
        } else if let Some((stream, dir, off, len, payload)) = frame_cols {
            Body::Frame(Frame {
                stream_id: stream.value(i),
                direction: Direction::parse(dir.value(i))
                    .ok_or_else(|| bad(format!("row {i}: direction {:?}", dir.value(i))))?,
                offset: off.value(i),
                length: len.value(i),
                payload: (!payload.is_null(i)).then(|| payload.value(i).to_vec()),
            })
        } else {
            event_body(batch, i)?
        };
        out.push(Record {
            chain_id: Uuid::parse_str(chain.value(i))
                .map_err(|e| bad(format!("row {i}: chain_id: {e}")))?,
            seq: seq.value(i),
            ts_unix_nanos: ts.value(i),
            prev_hash: prev.value(i).try_into().expect("32-byte column"),
            record_hash: hash.value(i).try_into().expect("32-byte column"),
            schema_version: ver.value(i),
            body,
        });
    }
    Ok(out)
}

fn event_body(batch: &RecordBatch, i: usize) -> Result<Body, ArrowError> {
    let bad = |what: String| ArrowError::InvalidArgumentError(what);
    let s = |name: &str| -> Result<String, ArrowError> {
        let a = batch
            .column_by_name(name)
            .ok_or_else(|| ArrowError::SchemaError(format!("column {name} is missing")))?;
        let a = a
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| ArrowError::SchemaError(format!("column {name} is not a string")))?;
        if a.is_null(i) {
            return Err(bad(format!("row {i}: {name} is null")));
        }
        Ok(a.value(i).to_owned())
    };
    let n = |name: &str| -> Result<u64, ArrowError> {
        let a = batch
            .column_by_name(name)
            .ok_or_else(|| ArrowError::SchemaError(format!("column {name} is missing")))?;
        let a = a
            .as_any()
            .downcast_ref::<UInt64Array>()
            .ok_or_else(|| ArrowError::SchemaError(format!("column {name} is not a u64")))?;
        if a.is_null(i) {
            return Err(bad(format!("row {i}: {name} is null")));
        }
        Ok(a.value(i))
    };
    let kind = s("kind")?;
    Ok(match kind.as_str() {
        "session_opened" => Body::SessionOpened(SessionOpened {
            edge: s("edge")?,
            edge_chain_id: Uuid::parse_str(&s("edge_chain_id")?)
                .map_err(|e| bad(format!("row {i}: edge_chain_id: {e}")))?,
            identity: s("identity")?,
            target: s("target")?,
            upstream: s("upstream")?,
            client_cert_sha256: s("client_cert_sha256")?,
            token_id: s("token_id")?,
            on_log_backpressure: s("on_log_backpressure")?,
            // Absent from files written before table schema 3, null when no replay.
            replay_of: match batch.column_by_name("replay_of") {
                None => String::new(),
                Some(a) => {
                    let a = a.as_any().downcast_ref::<StringArray>().ok_or_else(|| {
                        ArrowError::SchemaError("column replay_of is not a string".into())
                    })?;
                    if a.is_null(i) {
                        String::new()
                    } else {
                        a.value(i).to_owned()
                    }
                }
            },
        }),
        "session_closed" => Body::SessionClosed(SessionClosed {
            reason: CloseReason::parse(&s("reason")?)
                .ok_or_else(|| bad(format!("row {i}: unknown close reason")))?,
            detail: s("detail")?,
            bytes_up: n("bytes_up")?,
            bytes_down: n("bytes_down")?,
            streams: n("streams")?,
        }),
        "stream_opened" => Body::StreamOpened(StreamOpened {
            stream_id: n("stream_id")?,
            target: s("target")?,
            protocol_hint: s("protocol_hint")?,
            client_addr: s("client_addr")?,
            upstream_addr: s("upstream_addr")?,
        }),
        "stream_closed" => Body::StreamClosed(StreamClosed {
            stream_id: n("stream_id")?,
            bytes_up: n("bytes_up")?,
            bytes_down: n("bytes_down")?,
            error: s("error")?,
        }),
        "gap" => Body::Gap(Gap {
            dropped_records: n("dropped_records")?,
            dropped_bytes: n("dropped_bytes")?,
            reason: s("reason")?,
        }),
        "policy_decision" => Body::PolicyDecision(PolicyDecision {
            identity: s("identity")?,
            target: s("target")?,
            action: s("action")?,
            allowed: batch
                .column_by_name("allowed")
                .and_then(|a| a.as_any().downcast_ref::<BooleanArray>())
                .filter(|a| !a.is_null(i))
                .map(|a| a.value(i))
                .ok_or_else(|| bad(format!("row {i}: allowed is null")))?,
            code: s("code")?,
            reason: s("reason")?,
            token_id: s("token_id")?,
            client_cert_sha256: s("client_cert_sha256")?,
        }),
        "heartbeat" => Body::Heartbeat(Heartbeat {
            edge: s("edge")?,
            open_sessions: n("open_sessions")?,
        }),
        "control" => Body::Control(Control {
            action: ControlAction::parse(&s("action")?)
                .ok_or_else(|| bad(format!("row {i}: unknown control action")))?,
            subject: s("subject")?,
            reason: s("reason")?,
            actor: s("actor")?,
        }),
        "audit" => Body::Audit(Audit {
            actor: s("actor")?,
            action: s("action")?,
            detail: s("detail")?,
        }),
        other => {
            return Err(bad(format!(
                "row {i}: kind {other:?} is unknown to this build; upgrade cloudtap"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChainWriter;

    fn sample() -> Vec<Record> {
        let mut w = ChainWriter::new(Uuid::now_v7());
        let bodies = vec![
            Body::SessionOpened(SessionOpened {
                edge: "e".into(),
                edge_chain_id: Uuid::now_v7(),
                identity: "alice".into(),
                target: "db".into(),
                upstream: "127.0.0.1:5432".into(),
                client_cert_sha256: "ab".into(),
                token_id: "t".into(),
                on_log_backpressure: "block".into(),
                replay_of: "0190b9a4-0000-7000-8000-000000000001".into(),
            }),
            Body::StreamOpened(StreamOpened {
                stream_id: 1,
                target: "db".into(),
                protocol_hint: String::new(),
                client_addr: "127.0.0.1:1".into(),
                upstream_addr: "127.0.0.1:2".into(),
            }),
            Body::Frame(Frame {
                stream_id: 1,
                direction: Direction::Up,
                offset: 0,
                length: 3,
                payload: Some(b"abc".to_vec()),
            }),
            Body::Frame(Frame {
                stream_id: 1,
                direction: Direction::Down,
                offset: 0,
                length: 2,
                payload: None,
            }),
            Body::Gap(Gap {
                dropped_records: 1,
                dropped_bytes: 2,
                reason: "full".into(),
            }),
            Body::PolicyDecision(PolicyDecision {
                identity: "alice".into(),
                target: "db".into(),
                action: "stream".into(),
                allowed: false,
                code: "forbidden".into(),
                reason: "no".into(),
                token_id: "t".into(),
                client_cert_sha256: "ab".into(),
            }),
            Body::Heartbeat(Heartbeat {
                edge: "e".into(),
                open_sessions: 3,
            }),
            Body::Control(Control {
                action: ControlAction::Revoke,
                subject: "t".into(),
                reason: "r".into(),
                actor: "admin".into(),
            }),
            Body::Audit(Audit {
                actor: "a".into(),
                action: "b".into(),
                detail: String::new(),
            }),
            Body::HttpExchange(Box::new(crate::fixtures::exchange(
                0,
                ExchangePhase::Complete,
                "GET",
                "/a",
                200,
                1_700_000_000_000_000_000,
                vec![("content-type".into(), "application/json".into())],
                Some(b"{}".to_vec()),
                false,
            ))),
            Body::HttpExchange(Box::new(crate::fixtures::exchange(
                1,
                ExchangePhase::Start,
                "POST",
                "/b",
                0,
                1_700_000_000_000_000_000,
                vec![],
                None,
                true,
            ))),
            Body::StreamClosed(StreamClosed {
                stream_id: 1,
                bytes_up: 3,
                bytes_down: 2,
                error: String::new(),
            }),
            Body::ReplayDiff(Box::new(ReplayDiff {
                source_session: "0190b9a4-0000-7000-8000-000000000001".into(),
                replay_session: String::new(),
                target: "api".into(),
                stream_id: 1,
                exchange_index: 0,
                method: "GET".into(),
                path: "/a".into(),
                kind: "body".into(),
                field: "$.price".into(),
                expected: "1".into(),
                actual: "2".into(),
                note: String::new(),
            })),
            Body::SessionClosed(SessionClosed {
                reason: CloseReason::Normal,
                detail: String::new(),
                bytes_up: 3,
                bytes_down: 2,
                streams: 1,
            }),
        ];
        bodies.into_iter().map(|b| w.seal_now(b)).collect()
    }

    #[test]
    fn every_kind_round_trips_through_its_table_and_keeps_its_hash() {
        let recs = sample();
        let mut back = Vec::new();
        for table in ["frames", "events", "http_exchanges", "replay_diffs"] {
            let rows: Vec<_> = recs.iter().filter(|r| table_of(r) == table).collect();
            assert!(!rows.is_empty(), "the sample has no {table} row");
            let b = records_batch(table, rows.iter().map(|r| (*r, true))).unwrap();
            assert_eq!(b.schema(), schema_of(table).unwrap());
            back.extend(records_from_batch(&b).unwrap());
        }
        back.sort_by_key(|r| r.seq);
        assert_eq!(back, recs);
        assert_eq!(crate::verify_chain(None, &back).unwrap(), recs.len() as u64);
    }

    #[test]
    fn a_frame_in_the_events_table_is_refused() {
        let recs = sample();
        assert!(events_batch(recs.iter().map(|r| (r, true))).is_err());
        assert!(frames_batch(recs.iter().map(|r| (r, true))).is_err());
        assert!(http_exchanges_batch(recs.iter().map(|r| (r, true))).is_err());
    }
}
