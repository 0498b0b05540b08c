//! Loading a bundle into an archive (`cloudtapctl import`, and the throw-away archive
//! behind `--from-bundle`): its rows become Parquet files filed like the recorder's
//! (`<table>/date=…/hour=…/import-<manifest hash>.parquet`), listed by one marker under
//! `_imports/` written last. The query engine reads them like any other file.
//!
//! Importing the same bundle again finds its marker and writes nothing. Sessions the
//! archive already holds (the bundle came from here, or was imported in another bundle)
//! are left out, so no row is there twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{Array, RecordBatch, StringArray, TimestampNanosecondArray, UInt32Array};
use arrow::compute::take;
use bytes::Bytes;

use cloudtap_query::{QueryEngine, QuerySettings, Reader, Scope};
use cloudtap_recorder::archive::{ImportMarker, MarkedFile, hive_partition};
use cloudtap_recorder::store::{ObjectStore, S3Settings, open_store};
use cloudtap_schemas::tables::{self, TABLES};
use uuid::Uuid;

use super::{Bundle, parquet_bytes, table_member};

/// What an import did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Imported {
    /// Sessions whose rows were written.
    pub sessions: Vec<String>,
    /// Sessions left out: the archive had them already.
    pub already_present: Vec<String>,
    /// The same bundle was imported before: nothing was written.
    pub bundle_already_imported: bool,
    pub files: usize,
    pub rows: u64,
}

/// The reader behind local queries of an archive: sees everything.
pub fn local_reader() -> Reader {
    Reader {
        identity: "local".into(),
        scope: Scope::All,
    }
}

/// The archive at `url` (a directory, `file://…`, or `s3://…` with the S3 settings
/// given), and a query engine over it alone (no log).
pub async fn local_archive(
    url: &str,
    s3: &S3Settings,
) -> anyhow::Result<(Arc<dyn ObjectStore>, Arc<QueryEngine>)> {
    let store = open_store(url, s3).await?;
    let files = cloudtap_query::engine::datafusion_store(url, s3)?;
    let settings = QuerySettings {
        max_rows: u64::MAX,
        ..QuerySettings::default()
    };
    let engine = QueryEngine::new(store.clone(), files, None, settings)?;
    Ok((store, Arc::new(engine)))
}

/// The chains of `ids` (sessions, replay runs) `engine` already holds.
async fn present(engine: &QueryEngine, ids: &[Uuid]) -> anyhow::Result<BTreeSet<String>> {
    if ids.is_empty() {
        return Ok(BTreeSet::new());
    }
    let list = ids
        .iter()
        .map(|i| format!("'{}'", i.hyphenated()))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT chain_id FROM events WHERE chain_id IN ({list}) \
         UNION SELECT chain_id FROM replay_diffs WHERE chain_id IN ({list})"
    );
    let out = engine.execute_whole(&local_reader(), &sql).await?;
    let (_, batches, _) = cloudtap_query::service::collect(out).await?;
    let mut found = BTreeSet::new();
    for b in batches {
        if let Some(c) = b.column(0).as_any().downcast_ref::<StringArray>() {
            found.extend(c.iter().flatten().map(str::to_string));
        }
    }
    Ok(found)
}

/// The column a row is filed by (its hive partition).
fn time_column(table: &str) -> &'static str {
    match table {
        "sessions" | "streams" => "closed_at",
        _ => "ts",
    }
}

/// `batch`'s rows of kept sessions, by hive partition.
fn split(
    table: &str,
    batch: &RecordBatch,
    skip: &BTreeSet<String>,
) -> anyhow::Result<BTreeMap<String, RecordBatch>> {
    let (time_col, session_col) = (time_column(table), ImportMarker::chain_column(table));
    let times = batch
        .column_by_name(time_col)
        .and_then(|c| c.as_any().downcast_ref::<TimestampNanosecondArray>())
        .ok_or_else(|| anyhow::anyhow!("{}: no {time_col} column", table_member(table)))?;
    let sessions = batch
        .column_by_name(session_col)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| anyhow::anyhow!("{}: no {session_col} column", table_member(table)))?;
    let mut rows: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for i in 0..batch.num_rows() {
        if sessions.is_valid(i) && skip.contains(sessions.value(i)) {
            continue;
        }
        rows.entry(hive_partition(times.value(i)))
            .or_default()
            .push(i as u32);
    }
    let mut out = BTreeMap::new();
    for (part, idx) in rows {
        let idx = UInt32Array::from(idx);
        let cols = batch
            .columns()
            .iter()
            .map(|c| take(c.as_ref(), &idx, None))
            .collect::<Result<Vec<_>, _>>()?;
        out.insert(part, RecordBatch::try_new(batch.schema(), cols)?);
    }
    Ok(out)
}

/// Loads `bundle` (verified by the caller) into `archive`; `engine` reads the same
/// archive and finds the sessions it already holds. A session that was still open at
/// export is only part of itself: refused unless `partial` (a throw-away archive), as a
/// later bundle of the whole session could not replace it.
pub async fn import(
    bundle: &Bundle,
    archive: &dyn ObjectStore,
    engine: &QueryEngine,
    partial: bool,
) -> anyhow::Result<Imported> {
    let manifest = bundle.manifest().map_err(|e| anyhow::anyhow!(e))?;
    let open: Vec<&str> = manifest
        .sessions
        .iter()
        .filter(|s| s.closed_at.is_none())
        .map(|s| s.session_id.as_str())
        .collect();
    if !open.is_empty() && !partial {
        anyhow::bail!(
            "session {} was still open when the bundle was exported, so it holds only part of it; import a bundle exported after it closed, or read this one with --from-bundle",
            open.join(", ")
        );
    }
    let manifest_sha = super::sha256_hex(&bundle.members[super::MANIFEST]);
    let marker_key = ImportMarker::key(&manifest_sha);
    let mut done = Imported::default();
    if archive.get(&marker_key).await?.is_some() {
        done.bundle_already_imported = true;
        return Ok(done);
    }
    let ids = manifest
        .sessions
        .iter()
        .map(|s| s.session_id.as_str())
        .chain(manifest.other_chains.iter().map(|c| c.chain_id.as_str()))
        .map(|id| {
            Uuid::parse_str(id).map_err(|_| anyhow::anyhow!("the manifest names chain {id:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let skip = present(engine, &ids).await?;
    done.already_present = manifest
        .sessions
        .iter()
        .filter(|s| skip.contains(&s.session_id))
        .map(|s| s.session_id.clone())
        .collect();
    done.sessions = manifest
        .sessions
        .iter()
        .filter(|s| !skip.contains(&s.session_id))
        .map(|s| s.session_id.clone())
        .collect();
    let name = format!("import-{}.parquet", &manifest_sha[..32]);
    let mut files = Vec::new();
    for table in TABLES {
        let schema = tables::schema_of(table).expect("a known table");
        let mut parts: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
        for b in bundle.table(table).map_err(|e| anyhow::anyhow!(e))? {
            for (part, rows) in split(table, &b, &skip)? {
                parts.entry(part).or_default().push(rows);
            }
        }
        for (part, batches) in parts {
            let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
            if rows == 0 {
                continue;
            }
            let bytes = parquet_bytes(&schema, &batches)?;
            let key = format!("{table}/{part}/{name}");
            let len = bytes.len() as u64;
            archive.put(&key, Bytes::from(bytes)).await?;
            files.push(MarkedFile {
                key,
                table: table.to_string(),
                rows,
                bytes: len,
                ranges: Vec::new(),
            });
            done.rows += rows;
        }
    }
    done.files = files.len();
    let marker = ImportMarker {
        format: ImportMarker::FORMAT,
        manifest_sha256: manifest_sha,
        sessions: done.sessions.clone(),
        files,
        imported_unix_ms: (cloudtap_schemas::now_unix_nanos() / 1_000_000) as u64,
    };
    let json = serde_json::to_vec_pretty(&marker)?;
    if !archive
        .put_if_absent(&marker_key, Bytes::from(json))
        .await?
    {
        // Another import of the same bundle won the race; its files are the same.
        done.bundle_already_imported = true;
    }
    Ok(done)
}
