//! The query engine: one DataFusion context per query, over a fresh snapshot of the
//! archive (the markers committed so far, cached as they never change) and the log
//! tail after them, scoped to what the reader may see, with the query's own memory
//! pool, deadline and row limit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::{JoinType, ScalarValue};
use datafusion::dataframe::DataFrame;
use datafusion::datasource::MemTable;
use datafusion::datasource::object_store::ObjectStoreUrl;
use datafusion::error::DataFusionError;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::logical_expr::{Expr, col, lit};
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use cloudtap_recorder::EventLog;
use cloudtap_recorder::archive::{IMPORTS_PREFIX, ImportMarker, Marker, read_tail};
use cloudtap_recorder::store::{ObjectStore, S3Settings};
use cloudtap_schemas::tables::TABLES;

use crate::QueryError;
use crate::tables::{
    ArchiveTable, archived_files, nullable_partitions, open_rows, table_schema, tail_rows,
};

/// The tables and views a query can name, for error messages and `cloudtapctl`.
pub const QUERYABLE: [&str; 7] = [
    "sessions",
    "streams",
    "events",
    "frames",
    "http_exchanges",
    "replay_diffs",
    "requests",
];

/// Limits every query runs under; `[query]` in the configuration.
#[derive(Debug, Clone)]
pub struct QuerySettings {
    pub timeout: Duration,
    /// Memory a query may hold (sorts, joins, aggregations); it fails beyond that.
    pub memory_limit: usize,
    /// Rows a query returns at most; the rest are cut and the answer says so.
    pub max_rows: u64,
    /// Log records not yet archived that a query may read into memory.
    pub max_tail_bytes: u64,
    /// Parallelism of one query (DataFusion's target partitions).
    pub target_partitions: usize,
}

impl Default for QuerySettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            memory_limit: 1024 * 1024 * 1024,
            max_rows: 100_000,
            max_tail_bytes: 512 * 1024 * 1024,
            target_partitions: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// What a reader may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Everything, including the records of edges' and services' own chains
    /// (admins and auditors).
    All,
    /// Sessions the reader opened, and sessions of the targets listed (`None`: of
    /// every target). Records that belong to no session are not shown.
    Sessions {
        identity: String,
        targets: Option<Vec<String>>,
    },
}

/// An authenticated reader.
#[derive(Debug, Clone)]
pub struct Reader {
    pub identity: String,
    pub scope: Scope,
}

/// A running query: its schema, and its batches as they are produced.
pub struct QueryOutput {
    pub schema: SchemaRef,
    pub batches: BoxStream<'static, Result<RecordBatch, QueryError>>,
    /// Set once the row limit cut the answer.
    pub truncated: Arc<AtomicBool>,
}

impl std::fmt::Debug for QueryOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryOutput")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

const ARCHIVE_URL: &str = "cloudtap://archive/";

/// SQL over captured traffic.
pub struct QueryEngine {
    archive: Arc<dyn ObjectStore>,
    log: Option<Arc<dyn EventLog>>,
    settings: QuerySettings,
    /// Committed markers by key: a marker never changes once written.
    markers: Mutex<BTreeMap<String, Arc<Marker>>>,
    /// Imported bundles' markers by key, likewise.
    imports: Mutex<BTreeMap<String, Arc<Marker>>>,
    /// Shared by every query: the object store and the Parquet footer cache.
    runtime: Arc<RuntimeEnv>,
}

impl std::fmt::Debug for QueryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryEngine")
            .field("archive", &self.archive.describe())
            .finish_non_exhaustive()
    }
}

/// The object store DataFusion reads the archive's Parquet through, from the same URL
/// and S3 settings the recorder writes with.
pub fn datafusion_store(
    url: &str,
    s3: &S3Settings,
) -> Result<Arc<dyn object_store::ObjectStore>, QueryError> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(e) = &s3.endpoint {
            b = b
                .with_endpoint(e)
                .with_allow_http(e.starts_with("http://"))
                .with_virtual_hosted_style_request(!s3.path_style.unwrap_or(true));
        } else if let Some(p) = s3.path_style {
            b = b.with_virtual_hosted_style_request(!p);
        }
        if let Some(r) = &s3.region {
            b = b.with_region(r);
        }
        if let Some(k) = &s3.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(k) = &s3.secret_access_key {
            b = b.with_secret_access_key(k);
        }
        // The builder's errors name options, never credential values.
        let store = b
            .build()
            .map_err(|e| QueryError::Archive(format!("S3 archive {url}: {e}")))?;
        let prefix = prefix.trim_end_matches('/');
        return Ok(if prefix.is_empty() {
            Arc::new(store)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
        });
    }
    let path = url.strip_prefix("file://").unwrap_or(url);
    std::fs::create_dir_all(path).map_err(|e| {
        QueryError::Archive(format!("cannot create the archive directory {path}: {e}"))
    })?;
    let fs = object_store::local::LocalFileSystem::new_with_prefix(path)
        .map_err(|e| QueryError::Archive(format!("archive directory {path}: {e}")))?;
    Ok(Arc::new(fs))
}

impl QueryEngine {
    /// `archive` is where the recorder commits (markers are read through it);
    /// `files` is the same place as DataFusion reads it ([`datafusion_store`]); `log`
    /// is the traffic log whose unarchived tail queries also see.
    pub fn new(
        archive: Arc<dyn ObjectStore>,
        files: Arc<dyn object_store::ObjectStore>,
        log: Option<Arc<dyn EventLog>>,
        settings: QuerySettings,
    ) -> Result<Self, QueryError> {
        let runtime = RuntimeEnvBuilder::new()
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            .build_arc()
            .map_err(QueryError::internal)?;
        let url = ObjectStoreUrl::parse(ARCHIVE_URL).map_err(QueryError::internal)?;
        runtime.register_object_store(url.as_ref(), files);
        Ok(Self {
            archive,
            log,
            settings,
            markers: Mutex::default(),
            imports: Mutex::default(),
            runtime,
        })
    }

    pub fn settings(&self) -> &QuerySettings {
        &self.settings
    }

    /// The markers under `prefix` now, listed afresh and read only when new (`cache`
    /// holds those read; a marker never changes once written). `parse` turns one into
    /// a marker, or leaves it out (`None`).
    async fn cached_markers(
        &self,
        prefix: &str,
        cache: &Mutex<BTreeMap<String, Arc<Marker>>>,
        parse: impl Fn(&str, &[u8]) -> Result<Option<Marker>, QueryError>,
    ) -> Result<Vec<Arc<Marker>>, QueryError> {
        let listed = self
            .archive
            .list(prefix)
            .await
            .map_err(|e| QueryError::Archive(e.to_string()))?;
        let mut fresh = BTreeMap::new();
        for m in listed.iter().filter(|m| m.key.ends_with(".json")) {
            let known = cache
                .lock()
                .expect("marker cache poisoned")
                .get(&m.key)
                .cloned();
            let marker = match known {
                Some(k) => k,
                None => {
                    let Some(bytes) = self
                        .archive
                        .get(&m.key)
                        .await
                        .map_err(|e| QueryError::Archive(e.to_string()))?
                    else {
                        // Removed since the listing (retention): its files go too.
                        continue;
                    };
                    match parse(&m.key, &bytes)? {
                        Some(parsed) => Arc::new(parsed),
                        None => continue,
                    }
                }
            };
            fresh.insert(m.key.clone(), marker);
        }
        let out = fresh.values().cloned().collect();
        *cache.lock().expect("marker cache poisoned") = fresh;
        Ok(out)
    }

    /// The committed range markers now.
    async fn markers(&self) -> Result<Vec<Arc<Marker>>, QueryError> {
        self.cached_markers("_ranges/", &self.markers, |key, bytes| {
            serde_json::from_slice(bytes)
                .map(Some)
                .map_err(|e| QueryError::Archive(format!("commit marker {key} is unreadable: {e}")))
        })
        .await
    }

    /// The imported bundles now (`_imports/`), as markers of their files. One that does
    /// not parse is left out with a warning, so a damaged import never stops the
    /// store's own queries.
    async fn imports(&self) -> Result<Vec<Marker>, QueryError> {
        let imports = self
            .cached_markers(IMPORTS_PREFIX, &self.imports, |key, bytes| {
                match serde_json::from_slice::<ImportMarker>(bytes) {
                    Ok(i) if i.format > ImportMarker::FORMAT => {
                        tracing::warn!(%key, format = i.format, "an import marker of a newer format is left out of queries");
                        Ok(None)
                    }
                    Ok(i) => Ok(Some(i.as_marker())),
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "an unreadable import marker is left out of queries");
                        Ok(None)
                    }
                }
            })
            .await?;
        Ok(imports.iter().map(|m| (**m).clone()).collect())
    }

    /// A context whose tables are this snapshot, as `reader` may see them.
    pub async fn context(&self, reader: &Reader) -> Result<SessionContext, QueryError> {
        let markers: Vec<Marker> = self
            .markers()
            .await?
            .iter()
            .map(|m| (**m).clone())
            .collect();
        let tail = match &self.log {
            Some(log) => read_tail(log.as_ref(), &markers, self.settings.max_tail_bytes)
                .await
                .map_err(|e| match e {
                    cloudtap_recorder::archive::RecorderError::TailTooLarge { .. } => {
                        QueryError::Limit(e.to_string())
                    }
                    e => QueryError::Log(e.to_string()),
                })?,
            None => Default::default(),
        };
        // Imported bundles add files, and no log range (so not before `read_tail`).
        let imports = self.imports().await?;
        let config = SessionConfig::new()
            .with_target_partitions(self.settings.target_partitions)
            .with_information_schema(true)
            .with_parquet_pruning(true)
            .set_bool("datafusion.execution.parquet.pushdown_filters", true)
            .set_bool("datafusion.execution.parquet.bloom_filter_on_read", true)
            .set_bool("datafusion.execution.parquet.enable_page_index", true)
            .set_usize("datafusion.execution.batch_size", 8192);
        let runtime = Arc::new(RuntimeEnv {
            memory_pool: Arc::new(GreedyMemoryPool::new(self.settings.memory_limit)),
            disk_manager: self.runtime.disk_manager.clone(),
            cache_manager: self.runtime.cache_manager.clone(),
            object_store_registry: self.runtime.object_store_registry.clone(),
        });
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        crate::functions::register(&ctx);
        let url = ObjectStoreUrl::parse(ARCHIVE_URL).map_err(QueryError::internal)?;

        let mut frames: BTreeMap<&str, DataFrame> = BTreeMap::new();
        for table in TABLES {
            let archive = ArchiveTable::new(table, archived_files(&markers, table), url.clone());
            let tail_table = MemTable::try_new(
                nullable_partitions(table_schema(table)),
                vec![tail_rows(&tail, table)?],
            )?;
            let mut df = ctx
                .read_table(Arc::new(archive))?
                .union(ctx.read_table(Arc::new(tail_table))?)?;
            if matches!(table, "sessions" | "streams") {
                df = df.with_column("status", lit("closed"))?;
                let open = MemTable::try_new(
                    nullable_partitions(table_schema(table)),
                    vec![open_rows(&tail, table)?],
                )?;
                let open = ctx
                    .read_table(Arc::new(open))?
                    .with_column("closed_at", null_time())?
                    .with_column("status", lit("open"))?;
                df = df.union(open)?;
            }
            frames.insert(table, df);
        }
        if !imports.is_empty() {
            self.add_imports(&ctx, &mut frames, &imports, &url)?;
        }
        if let Scope::Sessions { identity, targets } = &reader.scope {
            let sessions = frames.remove("sessions").expect("sessions is a table");
            let mine = col("identity").eq(lit(identity.clone()));
            let visible = match targets {
                None => lit(true),
                Some(t) => mine
                    .or(col("target").in_list(t.iter().map(|t| lit(t.clone())).collect(), false)),
            };
            let sessions = sessions.filter(visible)?;
            let ids = sessions
                .clone()
                .select(vec![col("session_id").alias("visible_session_id")])?;
            for (table, df) in frames.iter_mut() {
                // A replay run is not a session: its findings are visible to whoever may
                // read both the session replayed and the session that replayed it (the
                // source is the replayer's word; the answers came from its target).
                let keys: &[&str] = if *table == "replay_diffs" {
                    &["source_session", "replay_session"]
                } else {
                    &["session_id"]
                };
                for key in keys {
                    *df = df.clone().join(
                        ids.clone(),
                        JoinType::LeftSemi,
                        &[key],
                        &["visible_session_id"],
                        None,
                    )?;
                }
            }
            frames.insert("sessions", sessions);
        }
        for (table, df) in frames {
            ctx.register_table(table, df.into_view())?;
        }
        // Exchanges with who sent them: the session's identity, target and edge.
        let requests = ctx
            .sql(
                "SELECT x.*, s.identity, s.target, s.edge, s.status AS session_status \
                 FROM http_exchanges x JOIN sessions s ON x.session_id = s.session_id",
            )
            .await?;
        ctx.register_table("requests", requests.into_view())?;
        Ok(ctx)
    }

    /// Adds imported bundles' rows to the tables, except those of chains this store
    /// holds itself (captured here, or already in its log): a bundle imported into the
    /// store it came from adds no row twice.
    fn add_imports(
        &self,
        ctx: &SessionContext,
        frames: &mut BTreeMap<&str, DataFrame>,
        imports: &[Marker],
        url: &ObjectStoreUrl,
    ) -> Result<(), QueryError> {
        let own = |table: &str, key: &str| -> Result<DataFrame, QueryError> {
            Ok(frames[table]
                .clone()
                .select(vec![col(key).alias("own_key")])?
                .distinct()?)
        };
        let own_chains = own("events", "chain_id")?;
        let own_sessions = own("sessions", "session_id")?;
        let own_runs = own("replay_diffs", "chain_id")?;
        for table in TABLES {
            let files = archived_files(imports, table);
            if files.is_empty() {
                continue;
            }
            let key = ImportMarker::chain_column(table);
            let own = match table {
                "sessions" | "streams" => own_sessions.clone(),
                "replay_diffs" => own_runs.clone(),
                _ => own_chains.clone(),
            };
            let mut imported = ctx
                .read_table(Arc::new(ArchiveTable::new(table, files, url.clone())))?
                .join(own, JoinType::LeftAnti, &[key], &["own_key"], None)?;
            if matches!(table, "sessions" | "streams") {
                imported = imported.with_column("status", lit("closed"))?;
            }
            let df = frames.remove(table).expect("every table has a frame");
            frames.insert(table, df.union(imported)?);
        }
        Ok(())
    }

    /// Plans and starts `sql` for `reader`.
    pub async fn execute(
        &self,
        reader: &Reader,
        sql: &str,
        max_rows: Option<u64>,
    ) -> Result<QueryOutput, QueryError> {
        let limit = match max_rows {
            Some(n) if n > 0 => n.min(self.settings.max_rows),
            _ => self.settings.max_rows,
        };
        self.execute_limited(reader, sql, limit).await
    }

    /// Like [`QueryEngine::execute`], without the row limit: for exports, which must
    /// hold every row of what they select (the deadline and memory limit still hold).
    pub async fn execute_whole(
        &self,
        reader: &Reader,
        sql: &str,
    ) -> Result<QueryOutput, QueryError> {
        self.execute_limited(reader, sql, u64::MAX).await
    }

    /// Runs statements the service builds itself (not a user's SQL) on one snapshot —
    /// one context, so one read of the markers and the log tail — and collects each
    /// answer whole. For exports, whose tables must agree with each other. The deadline
    /// covers them all; the memory limit holds while each is computed.
    pub async fn collect_snapshot(
        &self,
        reader: &Reader,
        statements: &[String],
    ) -> Result<Vec<Vec<RecordBatch>>, QueryError> {
        let work = async {
            let ctx = self.context(reader).await?;
            let mut out = Vec::with_capacity(statements.len());
            for sql in statements {
                let df = ctx
                    .sql(sql)
                    .await
                    .map_err(|e| QueryError::from_planning(e, sql))?;
                out.push(df.collect().await.map_err(QueryError::from_execution)?);
            }
            Ok(out)
        };
        tokio::time::timeout(self.settings.timeout, work)
            .await
            .map_err(|_| QueryError::Timeout(self.settings.timeout))?
    }

    async fn execute_limited(
        &self,
        reader: &Reader,
        sql: &str,
        limit: u64,
    ) -> Result<QueryOutput, QueryError> {
        let started = Instant::now();
        let deadline = started + self.settings.timeout;
        let work = async {
            let ctx = self.context(reader).await?;
            let state = ctx.state();
            let dialect = state.config_options().sql_parser.dialect;
            let statement = state
                .sql_to_statement(sql, &dialect)
                .map_err(|e| QueryError::from_planning(e, sql))?;
            // Refused before planning: planning a write may already fail with a
            // message that does not say the service is read-only.
            if !reads_only(&statement) {
                return Err(QueryError::ReadOnly);
            }
            let plan = state
                .statement_to_plan(statement)
                .await
                .map_err(|e| QueryError::from_planning(e, sql))?;
            SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false)
                .verify_plan(&plan)
                .map_err(|_| QueryError::ReadOnly)?;
            let df = ctx
                .execute_logical_plan(plan)
                .await
                .map_err(|e| QueryError::from_planning(e, sql))?;
            let stream = df
                .execute_stream()
                .await
                .map_err(QueryError::from_execution)?;
            Ok::<_, QueryError>(stream)
        };
        let stream = tokio::time::timeout_at(deadline.into(), work)
            .await
            .map_err(|_| QueryError::Timeout(self.settings.timeout))??;
        let schema = stream.schema();
        let truncated = Arc::new(AtomicBool::new(false));
        let cut = truncated.clone();
        let timeout = self.settings.timeout;
        let batches = stream.map_err(QueryError::from_execution).boxed();
        // State: the stream, the rows still allowed, whether it has ended.
        let batches =
            futures::stream::unfold((batches, limit, false), move |(mut s, left, done)| {
                let cut = cut.clone();
                async move {
                    if done {
                        return None;
                    }
                    let next = match tokio::time::timeout_at(deadline.into(), s.next()).await {
                        Err(_) => return Some((Err(QueryError::Timeout(timeout)), (s, 0, true))),
                        Ok(None) => return None,
                        Ok(Some(n)) => n,
                    };
                    let b = match next {
                        Err(e) => return Some((Err(e), (s, 0, true))),
                        Ok(b) => b,
                    };
                    let rows = b.num_rows() as u64;
                    if rows < left {
                        return Some((Ok(b), (s, left - rows, false)));
                    }
                    // The limit is reached: was anything left out (the rest of this
                    // batch, or a further non-empty batch)?
                    let mut more = rows > left;
                    while !more {
                        match tokio::time::timeout_at(deadline.into(), s.next()).await {
                            Ok(Some(Ok(n))) => more = n.num_rows() > 0,
                            _ => break,
                        }
                    }
                    cut.store(more, Ordering::Release);
                    Some((Ok(b.slice(0, left as usize)), (s, 0, true)))
                }
            })
            .boxed();
        Ok(QueryOutput {
            schema,
            batches,
            truncated,
        })
    }
}

/// Whether a statement only reads: a query, `EXPLAIN` of one, `SHOW …`, `DESCRIBE`.
fn reads_only(s: &DfStatement) -> bool {
    match s {
        DfStatement::Statement(s) => sql_reads_only(s),
        DfStatement::Explain(e) => reads_only(&e.statement),
        DfStatement::CreateExternalTable(_) | DfStatement::CopyTo(_) | DfStatement::Reset(_) => {
            false
        }
    }
}

fn sql_reads_only(s: &SqlStatement) -> bool {
    match s {
        SqlStatement::Query(_)
        | SqlStatement::ShowTables { .. }
        | SqlStatement::ShowColumns { .. }
        | SqlStatement::ShowVariable { .. }
        | SqlStatement::ExplainTable { .. } => true,
        SqlStatement::Explain { statement, .. } => sql_reads_only(statement),
        _ => false,
    }
}

/// `closed_at` of a row still open.
fn null_time() -> Expr {
    lit(ScalarValue::TimestampNanosecond(None, Some("UTC".into())))
}

impl From<DataFusionError> for QueryError {
    fn from(e: DataFusionError) -> Self {
        QueryError::from_execution(e)
    }
}
