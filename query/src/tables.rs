//! The tables a query sees, assembled from one consistent snapshot: the Parquet files
//! the recorder's commit markers list, plus the log records after those markers.
//!
//! Files no marker lists (an upload whose marker was never written, or one in flight)
//! are never read, and the log tail starts exactly where each partition's last marker
//! ends, so every record is in exactly one of the two.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use datafusion::catalog::Session;
use datafusion::common::stats::Precision;
use datafusion::common::{ColumnStatistics, Result, ScalarValue, Statistics};
use datafusion::datasource::TableProvider;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::object_store::ObjectStoreUrl;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder};
use datafusion::datasource::table_schema::TableSchemaBuilder;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;

use cloudtap_recorder::archive::{Marker, RangeValue, Tail, hive_partition};
use cloudtap_schemas::tables;

/// The Hive partition columns every archived table has (`date=YYYY-MM-DD/hour=HH`).
pub const PARTITION_COLS: [&str; 2] = ["date", "hour"];

fn partition_fields() -> Vec<FieldRef> {
    PARTITION_COLS
        .iter()
        .map(|c| Arc::new(Field::new(*c, DataType::Utf8, false)))
        .collect()
}

/// A table's stored columns followed by the partition columns.
pub fn table_schema(table: &str) -> SchemaRef {
    let file = tables::schema_of(table).expect("a known table");
    let mut fields: Vec<FieldRef> = file.fields().iter().cloned().collect();
    fields.extend(partition_fields());
    Arc::new(Schema::new(fields))
}

/// `date=2026-11-25/hour=03/…` → `["2026-11-25", "03"]`.
fn partition_values(key: &str) -> Option<Vec<ScalarValue>> {
    let mut out = Vec::with_capacity(2);
    for col in PARTITION_COLS {
        let prefix = format!("{col}=");
        let v = key
            .split('/')
            .find_map(|seg| seg.strip_prefix(prefix.as_str()))?;
        out.push(ScalarValue::Utf8(Some(v.to_string())));
    }
    Some(out)
}

/// The archived files of `table` that `markers` list, with what each marker says of
/// its rows and key-column ranges, so whole files are skipped on those columns.
pub fn archived_files(markers: &[Marker], table: &str) -> Vec<PartitionedFile> {
    let file_schema = tables::schema_of(table).expect("a known table");
    let mut out = Vec::new();
    for m in markers {
        for f in m.files.iter().filter(|f| f.table == table) {
            let Some(values) = partition_values(&f.key) else {
                tracing::warn!(key = %f.key, "an archived file without date/hour partitions is left out");
                continue;
            };
            let mut pf = PartitionedFile::new(f.key.clone(), f.bytes);
            pf.partition_values = values;
            let mut stats = Statistics::new_unknown(&file_schema);
            stats.num_rows = Precision::Exact(f.rows as usize);
            stats.total_byte_size = Precision::Inexact(f.bytes as usize);
            for r in &f.ranges {
                let Ok(i) = file_schema.index_of(&r.column) else {
                    continue;
                };
                let scalar = |v: &RangeValue| match v {
                    RangeValue::Text(s) => ScalarValue::Utf8(Some(s.clone())),
                    RangeValue::Time(t) => {
                        ScalarValue::TimestampNanosecond(Some(*t), Some("UTC".into()))
                    }
                };
                stats.column_statistics[i] = ColumnStatistics {
                    min_value: Precision::Exact(scalar(&r.min)),
                    max_value: Precision::Exact(scalar(&r.max)),
                    ..ColumnStatistics::new_unknown()
                };
            }
            out.push(pf.with_statistics(Arc::new(stats)));
        }
    }
    out
}

/// One table's archived Parquet files, as the markers of a snapshot list them.
#[derive(Debug)]
pub struct ArchiveTable {
    table: String,
    schema: SchemaRef,
    files: Vec<PartitionedFile>,
    store: ObjectStoreUrl,
}

impl ArchiveTable {
    pub fn new(table: &str, files: Vec<PartitionedFile>, store: ObjectStoreUrl) -> Self {
        Self {
            table: table.to_string(),
            schema: table_schema(table),
            files,
            store,
        }
    }
}

#[async_trait]
impl TableProvider for ArchiveTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // The Parquet scan uses every filter to skip files (from the markers' column
        // ranges), row groups (statistics, bloom filters) and pages; the rows it
        // returns are still filtered above it.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if self.files.is_empty() {
            let schema = match projection {
                Some(p) => Arc::new(self.schema.project(p)?),
                None => self.schema.clone(),
            };
            return Ok(Arc::new(EmptyExec::new(schema)));
        }
        let file_schema = tables::schema_of(&self.table).expect("a known table");
        let table_schema = TableSchemaBuilder::from(&file_schema)
            .with_table_partition_cols(partition_fields())
            .build();
        let format = ParquetFormat::default().with_options(state.table_options().parquet.clone());
        let source = format.file_source(table_schema);
        let groups = FileGroup::new(self.files.clone())
            .split_files(state.config().target_partitions().max(1));
        let conf = FileScanConfigBuilder::new(self.store.clone(), source)
            .with_file_groups(groups)
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        format.create_physical_plan(state, conf).await
    }
}

/// `date` and `hour` columns for rows with the given timestamps (ns).
fn partition_columns(ts: impl Iterator<Item = Option<i64>>) -> [ArrayRef; 2] {
    let (dates, hours): (Vec<Option<String>>, Vec<Option<String>>) = ts
        .map(|t| match t {
            Some(t) => {
                let p = hive_partition(t);
                let (d, h) = p.split_once('/').expect("date=…/hour=…");
                (
                    Some(d.trim_start_matches("date=").to_string()),
                    Some(h.trim_start_matches("hour=").to_string()),
                )
            }
            None => (None, None),
        })
        .unzip();
    [
        Arc::new(StringArray::from(dates)),
        Arc::new(StringArray::from(hours)),
    ]
}

fn with_partitions(
    batch: RecordBatch,
    ts: impl Iterator<Item = Option<i64>>,
    schema: SchemaRef,
) -> Result<RecordBatch> {
    let mut cols = batch.columns().to_vec();
    cols.extend(partition_columns(ts));
    Ok(RecordBatch::try_new(schema, cols)?)
}

/// Rows of the log tail for `table`, shaped like [`table_schema`] (partition columns
/// from the same timestamp the recorder will file them under). Open sessions and
/// streams are left out here; see [`open_rows`].
pub fn tail_rows(tail: &Tail, table: &str) -> Result<Vec<RecordBatch>> {
    // The tail table's partition columns may be null (open rows); the archive's never.
    let schema = nullable_partitions(table_schema(table));
    let batch = match table {
        "sessions" => {
            let b = tables::sessions_batch(&tail.sessions)?;
            with_partitions(b, tail.sessions.iter().map(|s| Some(s.closed_at)), schema)?
        }
        "streams" => {
            let b = tables::streams_batch(&tail.streams)?;
            with_partitions(b, tail.streams.iter().map(|s| Some(s.closed_at)), schema)?
        }
        _ => {
            let rows: Vec<_> = tail
                .records
                .iter()
                .filter(|(r, _)| tables::table_of(r) == table)
                .collect();
            let b = tables::records_batch(table, rows.iter().map(|(r, s)| (r, *s)))?;
            with_partitions(b, rows.iter().map(|(r, _)| Some(r.ts_unix_nanos)), schema)?
        }
    };
    Ok(vec![batch])
}

/// Sessions or streams still open at the end of the log: no partition (they are
/// filed when they close).
pub fn open_rows(tail: &Tail, table: &str) -> Result<Vec<RecordBatch>> {
    let schema = nullable_partitions(table_schema(table));
    let batch = match table {
        "sessions" => {
            let b = tables::sessions_batch(&tail.open_sessions)?;
            with_partitions(b, tail.open_sessions.iter().map(|_| None), schema)?
        }
        "streams" => {
            let b = tables::streams_batch(&tail.open_streams)?;
            with_partitions(b, tail.open_streams.iter().map(|_| None), schema)?
        }
        other => {
            return Err(datafusion::error::DataFusionError::Internal(format!(
                "{other} has no open rows"
            )));
        }
    };
    Ok(vec![batch])
}

pub fn nullable_partitions(schema: SchemaRef) -> SchemaRef {
    let fields: Vec<FieldRef> = schema
        .fields()
        .iter()
        .map(|f| {
            if PARTITION_COLS.contains(&f.name().as_str()) {
                Arc::new(f.as_ref().clone().with_nullable(true))
            } else {
                f.clone()
            }
        })
        .collect();
    Arc::new(Schema::new(fields))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_values_come_from_the_key() {
        assert_eq!(
            partition_values("frames/date=2026-11-25/hour=03/p00000-1-2.parquet"),
            Some(vec![
                ScalarValue::Utf8(Some("2026-11-25".into())),
                ScalarValue::Utf8(Some("03".into()))
            ])
        );
        assert_eq!(partition_values("frames/p00000-1-2.parquet"), None);
    }
}
