//! The `replay_diffs` table: one row per `replay_diff` record (the findings of replay
//! runs, each run on its own chain). Every field of the record is a column, so the
//! hash recomputes from the row; `chain_id` is the replay run.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, StringBuilder, UInt64Array, UInt64Builder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;

use super::{EnvelopeCols, envelope};
use crate::model::*;

/// String columns, in schema order.
const STR: [&str; 10] = [
    "source_session",
    "replay_session",
    "target",
    "method",
    "path",
    "kind",
    "field",
    "expected",
    "actual",
    "note",
];

pub fn replay_diffs_schema() -> SchemaRef {
    let mut f = envelope();
    for c in STR {
        f.push(Field::new(c, DataType::Utf8, false));
    }
    f.push(Field::new("stream_id", DataType::UInt64, false));
    f.push(Field::new("exchange_index", DataType::UInt64, false));
    Arc::new(Schema::new(f))
}

fn strings(d: &ReplayDiff) -> [&str; STR.len()] {
    [
        &d.source_session,
        &d.replay_session,
        &d.target,
        &d.method,
        &d.path,
        &d.kind,
        &d.field,
        &d.expected,
        &d.actual,
        &d.note,
    ]
}

/// Builds one `replay_diffs` batch; every record must be a `replay_diff`.
pub fn replay_diffs_batch<'a>(
    records: impl ExactSizeIterator<Item = (&'a Record, bool)>,
) -> Result<RecordBatch, ArrowError> {
    let n = records.len();
    let mut env = EnvelopeCols::new(n);
    let mut strs: Vec<StringBuilder> = STR
        .iter()
        .map(|_| StringBuilder::with_capacity(n, n * 16))
        .collect();
    let mut stream = UInt64Builder::with_capacity(n);
    let mut exchange = UInt64Builder::with_capacity(n);
    for (r, on_session) in records {
        let Body::ReplayDiff(d) = &r.body else {
            return Err(ArrowError::InvalidArgumentError(format!(
                "record {}:{} is a {}, not a replay_diff",
                r.chain_id,
                r.seq,
                r.kind()
            )));
        };
        env.push(r, on_session);
        for (b, v) in strs.iter_mut().zip(strings(d)) {
            b.append_value(v);
        }
        stream.append_value(d.stream_id);
        exchange.append_value(d.exchange_index);
    }
    let mut cols = env.finish();
    for mut b in strs {
        cols.push(Arc::new(b.finish()) as ArrayRef);
    }
    cols.push(Arc::new(stream.finish()));
    cols.push(Arc::new(exchange.finish()));
    RecordBatch::try_new(replay_diffs_schema(), cols)
}

/// Columns of a `replay_diffs` batch, found by name once per batch.
pub(super) struct DiffCols<'a> {
    strs: Vec<&'a StringArray>,
    stream: &'a UInt64Array,
    exchange: &'a UInt64Array,
}

impl<'a> DiffCols<'a> {
    /// Some when `batch` is a `replay_diffs` batch.
    pub(super) fn of(batch: &'a RecordBatch) -> Result<Option<Self>, ArrowError> {
        if batch.column_by_name("replay_session").is_none() {
            return Ok(None);
        }
        fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T, ArrowError> {
            b.column_by_name(name)
                .ok_or_else(|| ArrowError::SchemaError(format!("column {name} is missing")))?
                .as_any()
                .downcast_ref::<T>()
                .ok_or_else(|| ArrowError::SchemaError(format!("column {name} has the wrong type")))
        }
        Ok(Some(Self {
            strs: STR
                .iter()
                .map(|c| col::<StringArray>(batch, c))
                .collect::<Result<_, _>>()?,
            stream: col(batch, "stream_id")?,
            exchange: col(batch, "exchange_index")?,
        }))
    }

    pub(super) fn body_of(&self, i: usize) -> Body {
        let s = |k: usize| self.strs[k].value(i).to_owned();
        Body::ReplayDiff(Box::new(ReplayDiff {
            source_session: s(0),
            replay_session: s(1),
            target: s(2),
            method: s(3),
            path: s(4),
            kind: s(5),
            field: s(6),
            expected: s(7),
            actual: s(8),
            note: s(9),
            stream_id: self.stream.value(i),
            exchange_index: self.exchange.value(i),
        }))
    }
}
