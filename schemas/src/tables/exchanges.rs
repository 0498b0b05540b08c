//! The `http_exchanges` table: one row per `http_exchange` record, every field of the
//! record as a typed column (so the hash recomputes from the row), plus `duration_ms`,
//! derived for queries. Empty strings of optional fields (`grpc_*`, `traceparent`,
//! notes, a body's `sha256`) and an `end_unix_nanos` of 0 are stored as null.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, BinaryBuilder, BooleanArray, BooleanBuilder, Float64Builder,
    ListArray, ListBuilder, RecordBatch, StringArray, StringBuilder, StructArray, StructBuilder,
    TimestampNanosecondArray, TimestampNanosecondBuilder, UInt32Array, UInt32Builder, UInt64Array,
    UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use arrow::error::ArrowError;

use super::{EnvelopeCols, envelope, ts};
use crate::model::*;

fn header_fields() -> Fields {
    Fields::from(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("value", DataType::Utf8, false),
    ])
}

fn header_item() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Struct(header_fields()), false))
}

fn headers_type() -> DataType {
    DataType::List(header_item())
}

/// String columns before the status, in schema order.
const HEAD_STR: [&str; 6] = ["phase", "protocol", "method", "authority", "path", "query"];
/// Optional string columns ("" is null).
const GRPC_STR: [&str; 3] = ["grpc_service", "grpc_method", "grpc_status"];

pub fn http_exchanges_schema() -> SchemaRef {
    let mut f = envelope();
    f.push(Field::new("stream_id", DataType::UInt64, false));
    f.push(Field::new("exchange_index", DataType::UInt64, false));
    f.push(Field::new("message_index", DataType::UInt64, false));
    for c in HEAD_STR {
        f.push(Field::new(c, DataType::Utf8, false));
    }
    f.push(Field::new("status", DataType::UInt32, false));
    for c in GRPC_STR {
        f.push(Field::new(c, DataType::Utf8, true));
    }
    f.push(Field::new("start_ts", ts(), false));
    f.push(Field::new("end_ts", ts(), true));
    f.push(Field::new("duration_ms", DataType::Float64, true));
    f.push(Field::new("request_headers", headers_type(), false));
    f.push(Field::new("response_headers", headers_type(), false));
    for side in ["request", "response"] {
        f.push(Field::new(
            format!("{side}_body_size"),
            DataType::UInt64,
            false,
        ));
        f.push(Field::new(
            format!("{side}_body_sha256"),
            DataType::Binary,
            true,
        ));
        f.push(Field::new(format!("{side}_body"), DataType::Binary, true));
        f.push(Field::new(
            format!("{side}_body_truncated"),
            DataType::Boolean,
            false,
        ));
        f.push(Field::new(
            format!("{side}_body_note"),
            DataType::Utf8,
            true,
        ));
    }
    f.push(Field::new("traceparent", DataType::Utf8, true));
    f.push(Field::new("capture", DataType::Utf8, false));
    f.push(Field::new("redaction_version", DataType::UInt32, false));
    f.push(Field::new("note", DataType::Utf8, true));
    Arc::new(Schema::new(f))
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

struct BodyCols {
    size: UInt64Builder,
    sha: BinaryBuilder,
    content: BinaryBuilder,
    truncated: BooleanBuilder,
    note: StringBuilder,
}

impl BodyCols {
    fn new(n: usize) -> Self {
        Self {
            size: UInt64Builder::with_capacity(n),
            sha: BinaryBuilder::with_capacity(n, n * 32),
            content: BinaryBuilder::with_capacity(n, 0),
            truncated: BooleanBuilder::with_capacity(n),
            note: StringBuilder::new(),
        }
    }

    fn push(&mut self, b: &BodyCapture) {
        self.size.append_value(b.size);
        self.sha
            .append_option((!b.sha256.is_empty()).then_some(&b.sha256));
        self.content.append_option(b.content.as_deref());
        self.truncated.append_value(b.truncated);
        self.note.append_option(non_empty(&b.note));
    }

    fn finish(mut self, cols: &mut Vec<ArrayRef>) {
        cols.push(Arc::new(self.size.finish()));
        cols.push(Arc::new(self.sha.finish()));
        cols.push(Arc::new(self.content.finish()));
        cols.push(Arc::new(self.truncated.finish()));
        cols.push(Arc::new(self.note.finish()));
    }
}

fn headers_builder() -> ListBuilder<StructBuilder> {
    ListBuilder::new(StructBuilder::from_fields(header_fields(), 0)).with_field(header_item())
}

fn push_headers(b: &mut ListBuilder<StructBuilder>, headers: &[Header]) {
    let values = b.values();
    for h in headers {
        values
            .field_builder::<StringBuilder>(0)
            .expect("name column")
            .append_value(&h.name);
        values
            .field_builder::<StringBuilder>(1)
            .expect("value column")
            .append_value(&h.value);
        values.append(true);
    }
    b.append(true);
}

/// Builds one `http_exchanges` batch; every record must be an `http_exchange`.
pub fn http_exchanges_batch<'a>(
    records: impl ExactSizeIterator<Item = (&'a Record, bool)>,
) -> Result<RecordBatch, ArrowError> {
    let n = records.len();
    let mut env = EnvelopeCols::new(n);
    let mut stream = UInt64Builder::with_capacity(n);
    let mut index = UInt64Builder::with_capacity(n);
    let mut message = UInt64Builder::with_capacity(n);
    let mut head: Vec<StringBuilder> = HEAD_STR.iter().map(|_| StringBuilder::new()).collect();
    let mut status = UInt32Builder::with_capacity(n);
    let mut grpc: Vec<StringBuilder> = GRPC_STR.iter().map(|_| StringBuilder::new()).collect();
    let mut start = TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut end = TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut duration = Float64Builder::with_capacity(n);
    let mut req_h = headers_builder();
    let mut resp_h = headers_builder();
    let mut req_b = BodyCols::new(n);
    let mut resp_b = BodyCols::new(n);
    let mut traceparent = StringBuilder::new();
    let mut capture = StringBuilder::new();
    let mut redaction = UInt32Builder::with_capacity(n);
    let mut note = StringBuilder::new();
    for (r, on_session) in records {
        let Body::HttpExchange(x) = &r.body else {
            return Err(ArrowError::InvalidArgumentError(format!(
                "record {}:{} is a {}, not an http_exchange",
                r.chain_id,
                r.seq,
                r.kind()
            )));
        };
        env.push(r, on_session);
        stream.append_value(x.stream_id);
        index.append_value(x.exchange_index);
        message.append_value(x.message_index);
        for (b, v) in head.iter_mut().zip([
            x.phase.as_str(),
            &x.protocol,
            &x.method,
            &x.authority,
            &x.path,
            &x.query,
        ]) {
            b.append_value(v);
        }
        status.append_value(x.status);
        for (b, v) in grpc
            .iter_mut()
            .zip([&x.grpc_service, &x.grpc_method, &x.grpc_status])
        {
            b.append_option(non_empty(v));
        }
        start.append_value(x.start_unix_nanos);
        let ended = x.end_unix_nanos != 0;
        end.append_option(ended.then_some(x.end_unix_nanos));
        duration.append_option(
            ended.then(|| x.end_unix_nanos.saturating_sub(x.start_unix_nanos) as f64 / 1e6),
        );
        push_headers(&mut req_h, &x.request_headers);
        push_headers(&mut resp_h, &x.response_headers);
        req_b.push(&x.request_body);
        resp_b.push(&x.response_body);
        traceparent.append_option(non_empty(&x.traceparent));
        capture.append_value(&x.capture);
        redaction.append_value(x.redaction_version);
        note.append_option(non_empty(&x.note));
    }
    let mut cols = env.finish();
    cols.push(Arc::new(stream.finish()));
    cols.push(Arc::new(index.finish()));
    cols.push(Arc::new(message.finish()));
    for mut b in head {
        cols.push(Arc::new(b.finish()));
    }
    cols.push(Arc::new(status.finish()));
    for mut b in grpc {
        cols.push(Arc::new(b.finish()));
    }
    cols.push(Arc::new(start.finish()));
    cols.push(Arc::new(end.finish()));
    cols.push(Arc::new(duration.finish()));
    cols.push(Arc::new(req_h.finish()));
    cols.push(Arc::new(resp_h.finish()));
    req_b.finish(&mut cols);
    resp_b.finish(&mut cols);
    cols.push(Arc::new(traceparent.finish()));
    cols.push(Arc::new(capture.finish()));
    cols.push(Arc::new(redaction.finish()));
    cols.push(Arc::new(note.finish()));
    RecordBatch::try_new(http_exchanges_schema(), cols)
}

/// Columns of an `http_exchanges` batch, found by name once per batch.
pub(super) struct ExchangeCols<'a> {
    batch: &'a RecordBatch,
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T, ArrowError> {
    batch
        .column_by_name(name)
        .ok_or_else(|| ArrowError::SchemaError(format!("column {name} is missing")))?
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| ArrowError::SchemaError(format!("column {name} has the wrong type")))
}

impl<'a> ExchangeCols<'a> {
    /// Some when `batch` is an `http_exchanges` batch.
    pub(super) fn of(batch: &'a RecordBatch) -> Option<Self> {
        batch
            .column_by_name("exchange_index")
            .map(|_| Self { batch })
    }

    fn str(&self, name: &str, i: usize) -> Result<String, ArrowError> {
        let a = column::<StringArray>(self.batch, name)?;
        Ok(if a.is_null(i) {
            String::new()
        } else {
            a.value(i).to_owned()
        })
    }

    fn u64(&self, name: &str, i: usize) -> Result<u64, ArrowError> {
        Ok(column::<UInt64Array>(self.batch, name)?.value(i))
    }

    fn headers(&self, name: &str, i: usize) -> Result<Vec<Header>, ArrowError> {
        let list = column::<ListArray>(self.batch, name)?;
        let item = list.value(i);
        let s = item.as_any().downcast_ref::<StructArray>().ok_or_else(|| {
            ArrowError::SchemaError(format!("column {name} is not a list of structs"))
        })?;
        let part = |k: &str| {
            s.column_by_name(k)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .ok_or_else(|| ArrowError::SchemaError(format!("{name}.{k} is missing")))
        };
        let (names, values) = (part("name")?, part("value")?);
        Ok((0..s.len())
            .map(|j| Header {
                name: names.value(j).to_owned(),
                value: values.value(j).to_owned(),
            })
            .collect())
    }

    fn body(&self, side: &str, i: usize) -> Result<BodyCapture, ArrowError> {
        let bin = |suffix: &str| -> Result<Option<Vec<u8>>, ArrowError> {
            let a = column::<BinaryArray>(self.batch, &format!("{side}_body{suffix}"))?;
            Ok((!a.is_null(i)).then(|| a.value(i).to_vec()))
        };
        Ok(BodyCapture {
            size: self.u64(&format!("{side}_body_size"), i)?,
            sha256: bin("_sha256")?.unwrap_or_default(),
            content: bin("")?,
            truncated: column::<BooleanArray>(self.batch, &format!("{side}_body_truncated"))?
                .value(i),
            note: self.str(&format!("{side}_body_note"), i)?,
        })
    }

    pub(super) fn body_of(&self, i: usize) -> Result<Body, ArrowError> {
        let phase = self.str("phase", i)?;
        let end = column::<TimestampNanosecondArray>(self.batch, "end_ts")?;
        Ok(Body::HttpExchange(Box::new(HttpExchange {
            stream_id: self.u64("stream_id", i)?,
            exchange_index: self.u64("exchange_index", i)?,
            phase: ExchangePhase::parse(&phase).ok_or_else(|| {
                ArrowError::InvalidArgumentError(format!("row {i}: phase {phase:?}"))
            })?,
            message_index: self.u64("message_index", i)?,
            protocol: self.str("protocol", i)?,
            method: self.str("method", i)?,
            authority: self.str("authority", i)?,
            path: self.str("path", i)?,
            query: self.str("query", i)?,
            status: column::<UInt32Array>(self.batch, "status")?.value(i),
            grpc_service: self.str("grpc_service", i)?,
            grpc_method: self.str("grpc_method", i)?,
            grpc_status: self.str("grpc_status", i)?,
            start_unix_nanos: column::<TimestampNanosecondArray>(self.batch, "start_ts")?.value(i),
            end_unix_nanos: if end.is_null(i) { 0 } else { end.value(i) },
            request_headers: self.headers("request_headers", i)?,
            response_headers: self.headers("response_headers", i)?,
            request_body: self.body("request", i)?,
            response_body: self.body("response", i)?,
            traceparent: self.str("traceparent", i)?,
            capture: self.str("capture", i)?,
            redaction_version: column::<UInt32Array>(self.batch, "redaction_version")?.value(i),
            note: self.str("note", i)?,
        })))
    }
}
