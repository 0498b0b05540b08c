//! The recorder: reads the traffic log and writes the Parquet tables to an object
//! store, exactly once (DESIGN: "Parquet tables").
//!
//! Each log partition is cut into **ranges** of consecutive offsets. A range ends
//!
//! - after `range_records` records or `range_bytes` payload bytes, or before the first
//!   record whose timestamp falls in a later `range_seconds` bucket than the range's
//!   first record — all decided by the records alone, so any recorder cuts the same
//!   ranges; or
//! - when the recorder has caught up and nothing arrived for `flush_idle` (and at the
//!   end of a `--once` drain), so that recent traffic reaches the tables promptly.
//!
//! A range's Parquet files are uploaded first; then its **commit marker**
//! `_ranges/<partition>/<first offset>.json` is created with a conditional put. The
//! marker lists the range's files and `last` offset, and carries the recorder's
//! checkpoint (open sessions and streams, the last seq archived per chain). The marker
//! is keyed by the range's *first* offset, so ranges of a partition form one chain
//! `0..=a, a+1..=b, …` and two recorders can never both commit a range starting at
//! the same offset — whatever their cut. Readers use only files a marker lists; a
//! recorder resumes after the last marker, with its checkpoint, and deletes files of
//! its partition that no marker lists (an upload that never got its marker). Consumer
//! offsets are committed after each marker, as a hint only. Records whose (chain, seq)
//! was already archived are dropped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::array::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::{KeyValue, SortingColumn};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use cloudtap_schemas::tables::{self, SessionRow, StreamRow, TABLES_VERSION, VERSION_KEY};
use cloudtap_schemas::{Body, Direction, Record};

use crate::store::{ObjectStore, StoreError};
use crate::{EventLog, LogEntry, LogError, PartitionReader, ReaderEvent, SoloReader};

/// Version of the commit marker's JSON layout.
pub const MARKER_FORMAT: u32 = 1;
/// Closed session chains remembered per partition for dropping late duplicates (an
/// edge resends only what it sent moments before; every marker carries this list).
const RECENTLY_CLOSED: usize = 1024;

#[derive(Debug, Clone)]
pub struct RecorderSettings {
    /// Consumer group of the recorders (Kafka).
    pub group: String,
    pub range_records: u64,
    pub range_bytes: u64,
    pub range_seconds: u64,
    /// Caught up and idle this long: commit what is pending.
    pub flush_idle: Duration,
    /// Longest wait between retries of a failing upload.
    pub max_backoff: Duration,
    /// Archived ranges whose newest record is older than this are removed.
    pub retention: Option<Duration>,
    /// Heartbeats of an edge silent this long: its open sessions are lost.
    pub edge_lost_after: Duration,
    /// Test hook: stop this process (SIGSTOP) after uploading the files of the Nth
    /// range, before its marker, so a test can SIGKILL it there.
    pub stop_before_marker: Option<u64>,
}

/// The `[recorder]` section of the cloudtapd configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecorderConfig {
    /// Where Parquet goes: `file:///dir` (default `<data dir>/archive`) or `s3://bucket/prefix`.
    #[serde(default)]
    pub archive: Option<String>,
    /// S3 endpoint, region, path style and credentials (else the AWS environment).
    #[serde(default)]
    pub s3: crate::store::S3Settings,
    /// Consumer group shared by the recorders of one log (default `cloudtap-recorder`).
    #[serde(default)]
    pub group: Option<String>,
    /// Cut a range after this many records (default 100000).
    #[serde(default)]
    pub range_records: Option<u64>,
    /// … or after this many payload bytes (default 64 MiB).
    #[serde(default)]
    pub range_bytes: Option<u64>,
    /// … or when records enter a later bucket of this many seconds (default 30).
    #[serde(default)]
    pub range_seconds: Option<u64>,
    /// Commit what is pending after this long with nothing new (default 1000 ms).
    #[serde(default)]
    pub flush_idle_ms: Option<u64>,
    /// Remove archived ranges whose newest record is older than this many days
    /// (default: keep everything).
    #[serde(default)]
    pub retention_days: Option<u64>,
    /// An edge whose heartbeats stop for this many seconds is lost: its open sessions
    /// get a `sessions` row closed with `edge_lost` (default 60).
    #[serde(default)]
    pub edge_lost_after_secs: Option<u64>,
}

impl RecorderConfig {
    pub fn settings(&self) -> RecorderSettings {
        let d = RecorderSettings::default();
        RecorderSettings {
            group: self.group.clone().unwrap_or(d.group),
            range_records: self.range_records.unwrap_or(d.range_records).max(1),
            range_bytes: self.range_bytes.unwrap_or(d.range_bytes).max(1),
            range_seconds: self.range_seconds.unwrap_or(d.range_seconds).max(1),
            flush_idle: self
                .flush_idle_ms
                .map_or(d.flush_idle, Duration::from_millis),
            max_backoff: d.max_backoff,
            edge_lost_after: Duration::from_secs(self.edge_lost_after_secs.unwrap_or(60).max(1)),
            retention: self
                .retention_days
                .filter(|d| *d > 0)
                .map(|d| Duration::from_secs(d * 86_400)),
            stop_before_marker: std::env::var("CLOUDTAP_FAULT_STOP_BEFORE_MARKER")
                .ok()
                .and_then(|v| v.parse().ok()),
        }
    }
}

impl Default for RecorderSettings {
    fn default() -> Self {
        Self {
            group: "cloudtap-recorder".into(),
            range_records: 100_000,
            range_bytes: 64 * 1024 * 1024,
            range_seconds: 30,
            flush_idle: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            retention: None,
            edge_lost_after: Duration::from_secs(60),
            stop_before_marker: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "commit marker {key} is unreadable: {reason}; it was not written by this cloudtap version"
    )]
    BadMarker { key: String, reason: String },
    #[error("encoding Parquet failed: {0}")]
    Parquet(String),
    #[error(
        "the traffic log holds more than {limit} bytes the recorder has not archived yet; is the recorder running? (`cloudtapd all` runs one; `cloudtapctl status` shows its lag)"
    )]
    TailTooLarge { limit: u64 },
}

/// Counters for `/metrics`, `/healthz` and tests.
#[derive(Debug, Default)]
pub struct RecorderStats {
    pub records_archived: AtomicU64,
    pub duplicates_dropped: AtomicU64,
    pub ranges_committed: AtomicU64,
    pub ranges_lost_to_others: AtomicU64,
    pub bytes_written: AtomicU64,
    pub last_commit_unix_ms: AtomicU64,
    /// Per partition: the next offset not yet archived.
    pub archived_to: std::sync::Mutex<BTreeMap<u32, u64>>,
    pub store_failing: std::sync::atomic::AtomicBool,
}

/// One file of a committed range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkedFile {
    pub key: String,
    pub table: String,
    pub rows: u64,
    pub bytes: u64,
    /// Value ranges of the file's key columns, so readers can skip the whole file
    /// without opening it (absent in markers written before they were kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<ColumnRange>,
}

/// The smallest and largest value of one column in a file (nulls left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnRange {
    pub column: String,
    pub min: RangeValue,
    pub max: RangeValue,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RangeValue {
    Text(String),
    /// Nanoseconds since the Unix epoch (a `ts`, `opened_at` or `closed_at` column).
    Time(i64),
}

/// The ranges of the id and time columns of `batch` that are present.
fn column_ranges(batch: &RecordBatch) -> Vec<ColumnRange> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::TimestampNanosecondType;
    let mut out = Vec::new();
    for name in ["chain_id", "session_id"] {
        let Some(col) = batch.column_by_name(name) else {
            continue;
        };
        let Some(a) = col.as_string_opt::<i32>() else {
            continue;
        };
        if let (Some(lo), Some(hi)) = (arrow::compute::min_string(a), arrow::compute::max_string(a))
        {
            out.push(ColumnRange {
                column: name.into(),
                min: RangeValue::Text(lo.into()),
                max: RangeValue::Text(hi.into()),
            });
        }
    }
    for name in ["ts", "opened_at", "closed_at"] {
        let Some(col) = batch.column_by_name(name) else {
            continue;
        };
        let Some(a) = col.as_primitive_opt::<TimestampNanosecondType>() else {
            continue;
        };
        if a.null_count() == a.len() {
            continue;
        }
        if let (Some(lo), Some(hi)) = (arrow::compute::min(a), arrow::compute::max(a)) {
            out.push(ColumnRange {
                column: name.into(),
                min: RangeValue::Time(lo),
                max: RangeValue::Time(hi),
            });
        }
    }
    out
}

/// A committed range (`_ranges/<partition>/<first>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Marker {
    pub format: u32,
    pub partition: u32,
    pub first: u64,
    pub last: u64,
    pub records: u64,
    pub duplicates_dropped: u64,
    pub min_ts: i64,
    pub max_ts: i64,
    pub tables_version: u32,
    pub files: Vec<MarkedFile>,
    pub checkpoint: Checkpoint,
    pub committed_by: String,
    pub committed_unix_ms: u64,
}

/// The recorder's state after a range: what it needs to go on from the next offset.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Checkpoint {
    pub open_sessions: Vec<OpenSession>,
    pub open_streams: Vec<OpenStream>,
    /// Last seq archived of every chain still live in this partition.
    pub chains: Vec<(Uuid, u64)>,
    /// Last seq of recently closed session chains, oldest first.
    pub recently_closed: Vec<(Uuid, u64)>,
    /// Newest heartbeat seen per edge process, by the edge's own chain id (ns).
    #[serde(default)]
    pub edge_heartbeats: Vec<(Uuid, i64)>,
    /// The edge chain of each open session (`SessionOpened.edge_chain_id`).
    #[serde(default)]
    pub session_edges: Vec<(Uuid, Uuid)>,
    /// Newest record timestamp seen in the partition: the log's own clock (ns).
    #[serde(default)]
    pub log_time: i64,
    /// Sessions already reported `edge_lost`: a late close record adds no second row.
    #[serde(default)]
    pub lost: Vec<Uuid>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenSession {
    pub row: SessionRow,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenStream {
    pub row: StreamRow,
}

/// Where imported bundles' markers live (`cloudtapctl import`): apart from the
/// ranges, so the log's archived offsets and retention never see them.
pub const IMPORTS_PREFIX: &str = "_imports/";

/// One imported bundle: the files it added. Written after them, so readers see all of
/// a bundle or none of it; its key is the bundle's manifest hash, so importing the same
/// bundle again finds it and changes nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportMarker {
    pub format: u32,
    /// Hex SHA-256 of the bundle's `manifest.json`.
    pub manifest_sha256: String,
    pub sessions: Vec<String>,
    pub files: Vec<MarkedFile>,
    pub imported_unix_ms: u64,
}

impl ImportMarker {
    /// The format this build writes and reads.
    pub const FORMAT: u32 = 1;

    /// The column that names a row's chain in `table` (for `sessions` and `streams`, the
    /// session's): imports are kept apart from the store's own rows by it.
    pub fn chain_column(table: &str) -> &'static str {
        match table {
            "sessions" | "streams" => "session_id",
            _ => "chain_id",
        }
    }

    pub fn key(manifest_sha256: &str) -> String {
        format!("{IMPORTS_PREFIX}{manifest_sha256}.json")
    }

    /// As a committed range's marker, for readers that list files by marker. It names
    /// no log range: pass it to nothing that reads the log.
    pub fn as_marker(&self) -> Marker {
        Marker {
            format: MARKER_FORMAT,
            partition: u32::MAX,
            first: 0,
            last: 0,
            records: 0,
            duplicates_dropped: 0,
            min_ts: 0,
            max_ts: 0,
            tables_version: tables::TABLES_VERSION,
            files: self.files.clone(),
            checkpoint: Checkpoint::default(),
            committed_by: format!("import {}", self.manifest_sha256),
            committed_unix_ms: self.imported_unix_ms,
        }
    }
}

pub fn marker_prefix(partition: u32) -> String {
    format!("_ranges/{partition:05}/")
}

pub fn marker_key(partition: u32, first: u64) -> String {
    format!("{}{first:020}.json", marker_prefix(partition))
}

/// Lists every committed marker (all partitions), sorted by partition and offset.
pub async fn read_markers(store: &dyn ObjectStore) -> Result<Vec<Marker>, RecorderError> {
    let mut out = Vec::new();
    for m in store.list("_ranges/").await? {
        if !m.key.ends_with(".json") {
            continue;
        }
        out.push(load_marker(store, &m.key).await?);
    }
    Ok(out)
}

async fn load_marker(store: &dyn ObjectStore, key: &str) -> Result<Marker, RecorderError> {
    let bytes = store.get(key).await?.ok_or_else(|| {
        // Listed a moment ago, gone now (archive retention): worth another look.
        RecorderError::Store(StoreError::Failed {
            store: store.describe(),
            op: "get",
            key: key.into(),
            detail: "the commit marker vanished while being read".into(),
        })
    })?;
    let m: Marker = serde_json::from_slice(&bytes).map_err(|e| RecorderError::BadMarker {
        key: key.into(),
        reason: e.to_string(),
    })?;
    if m.format > MARKER_FORMAT {
        return Err(RecorderError::BadMarker {
            key: key.into(),
            reason: format!(
                "format {} is newer than this build's {MARKER_FORMAT}",
                m.format
            ),
        });
    }
    Ok(m)
}

/// Removes every committed range whose newest record is older than `older_than`,
/// except the last range of each partition (recorders resume from it). The marker
/// goes first, so readers stop using the files before they disappear; a crash between
/// the two leaves files no marker lists, which readers ignore. Returns the ranges
/// removed.
pub async fn expire_ranges(
    store: &dyn ObjectStore,
    older_than: Duration,
) -> Result<u64, RecorderError> {
    let cutoff = SystemTime::now()
        .checked_sub(older_than)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(i64::MIN, |d| d.as_nanos() as i64);
    let keys: Vec<String> = store
        .list("_ranges/")
        .await?
        .into_iter()
        .map(|m| m.key)
        .filter(|k| k.ends_with(".json"))
        .collect();
    let mut removed = 0;
    for (i, key) in keys.iter().enumerate() {
        let partition_dir = key.rsplit_once('/').map(|(d, _)| d);
        let last_of_partition = keys
            .get(i + 1)
            .is_none_or(|next| next.rsplit_once('/').map(|(d, _)| d) != partition_dir);
        if last_of_partition {
            continue;
        }
        let m = load_marker(store, key).await?;
        if m.records == 0 || m.max_ts >= cutoff {
            continue;
        }
        store.delete(key).await?;
        for f in &m.files {
            store.delete(&f.key).await?;
        }
        removed += 1;
    }
    if removed > 0 {
        tracing::info!(ranges = removed, "archive retention removed expired ranges");
    }
    Ok(removed)
}

/// The state of one partition between ranges, rebuilt from a checkpoint.
struct ChainState {
    heartbeats: HashMap<Uuid, i64>,
    session_edges: HashMap<Uuid, Uuid>,
    log_time: i64,
    lost: std::collections::HashSet<Uuid>,
    sessions: HashMap<Uuid, SessionRow>,
    streams: HashMap<(Uuid, u64), StreamRow>,
    chains: HashMap<Uuid, u64>,
    recently_closed: VecDeque<(Uuid, u64)>,
    closed_index: HashMap<Uuid, u64>,
}

impl ChainState {
    fn from_checkpoint(c: Checkpoint) -> Self {
        Self {
            heartbeats: c.edge_heartbeats.into_iter().collect(),
            session_edges: c.session_edges.into_iter().collect(),
            log_time: c.log_time,
            lost: c.lost.into_iter().collect(),
            sessions: c
                .open_sessions
                .into_iter()
                .map(|s| (s.row.session_id, s.row))
                .collect(),
            streams: c
                .open_streams
                .into_iter()
                .map(|s| ((s.row.session_id, s.row.stream_id), s.row))
                .collect(),
            chains: c.chains.into_iter().collect(),
            closed_index: c.recently_closed.iter().copied().collect(),
            recently_closed: c.recently_closed.into(),
        }
    }

    fn checkpoint(&self) -> Checkpoint {
        let mut c = Checkpoint {
            open_sessions: self
                .sessions
                .values()
                .map(|r| OpenSession { row: r.clone() })
                .collect(),
            open_streams: self
                .streams
                .values()
                .map(|r| OpenStream { row: r.clone() })
                .collect(),
            chains: self.chains.iter().map(|(k, v)| (*k, *v)).collect(),
            recently_closed: self.recently_closed.iter().copied().collect(),
            edge_heartbeats: self.heartbeats.iter().map(|(k, v)| (*k, *v)).collect(),
            session_edges: self.session_edges.iter().map(|(k, v)| (*k, *v)).collect(),
            log_time: self.log_time,
            lost: self.lost.iter().copied().collect(),
        };
        c.edge_heartbeats.sort();
        c.session_edges.sort();
        c.lost.sort();
        // Deterministic bytes for the same state.
        c.open_sessions.sort_by_key(|s| s.row.session_id);
        c.open_streams
            .sort_by_key(|s| (s.row.session_id, s.row.stream_id));
        c.chains.sort();
        c
    }

    /// Sessions whose edge process (its chain, from `SessionOpened.edge_chain_id`) last
    /// beat — or which opened — before `now - after`, where `now` is the log's own
    /// clock (the newest record timestamp this recorder has seen), so a recorder that is
    /// catching up or an idle log never declares anything lost. Closed `edge_lost` at
    /// that time. Edges never seen beating are left alone: their heartbeats may live in
    /// a partition another recorder owns.
    fn take_lost(
        &mut self,
        heartbeats: &HashMap<Uuid, i64>,
        now: i64,
        after: Duration,
    ) -> Vec<SessionRow> {
        let limit = now.saturating_sub(after.as_nanos() as i64);
        let lost: Vec<Uuid> = self
            .sessions
            .values()
            .filter(|s| {
                self.session_edges
                    .get(&s.session_id)
                    .and_then(|edge| heartbeats.get(edge))
                    .is_some_and(|hb| (*hb).max(s.opened_at) < limit)
            })
            .map(|s| s.session_id)
            .collect();
        let mut rows = Vec::new();
        for id in lost {
            if let Some(mut s) = self.sessions.remove(&id) {
                let edge = self.session_edges.remove(&id).expect("filtered on it");
                s.closed_at = heartbeats[&edge].max(s.opened_at);
                s.close_reason = cloudtap_schemas::CloseReason::EdgeLost.as_str().into();
                s.close_detail = format!(
                    "no heartbeat from edge {:?} for over {} s",
                    s.edge,
                    after.as_secs()
                );
                s.records = self.chains.get(&id).map_or(0, |seq| seq + 1);
                self.lost.insert(id);
                rows.push(s);
            }
        }
        rows
    }

    /// `r` ended its chain: later copies of it are duplicates, found through the
    /// bounded `recently_closed` window instead of the live chains.
    fn end_chain(&mut self, r: &Record) {
        self.chains.remove(&r.chain_id);
        self.recently_closed.push_back((r.chain_id, r.seq));
        self.closed_index.insert(r.chain_id, r.seq);
        while self.recently_closed.len() > RECENTLY_CLOSED {
            if let Some((c, _)) = self.recently_closed.pop_front() {
                self.closed_index.remove(&c);
            }
        }
    }

    /// Whether `r` was already archived (same chain, seq not newer).
    fn is_duplicate(&self, r: &Record) -> bool {
        self.chains
            .get(&r.chain_id)
            .or_else(|| self.closed_index.get(&r.chain_id))
            .is_some_and(|last| r.seq <= *last)
    }

    /// Applies `r`; returns whether it belongs to a session chain, and the summary
    /// rows it completes.
    fn apply(&mut self, r: &Record, out: &mut PendingRange) -> bool {
        self.chains.insert(r.chain_id, r.seq);
        self.log_time = self.log_time.max(r.ts_unix_nanos);
        match &r.body {
            Body::SessionOpened(o) => {
                self.session_edges.insert(r.chain_id, o.edge_chain_id);
                self.sessions.insert(
                    r.chain_id,
                    SessionRow {
                        session_id: r.chain_id,
                        edge: o.edge.clone(),
                        identity: o.identity.clone(),
                        target: o.target.clone(),
                        upstream: o.upstream.clone(),
                        token_id: o.token_id.clone(),
                        client_cert_sha256: o.client_cert_sha256.clone(),
                        on_log_backpressure: o.on_log_backpressure.clone(),
                        opened_at: r.ts_unix_nanos,
                        closed_at: 0,
                        close_reason: String::new(),
                        close_detail: String::new(),
                        bytes_up: 0,
                        bytes_down: 0,
                        streams: 0,
                        frames: 0,
                        records: 0,
                        replay_of: o.replay_of.clone(),
                    },
                );
                true
            }
            Body::Frame(f) => {
                // Byte counts so far, for readers of open sessions; the close record
                // sets the final ones.
                let len = u64::from(f.length);
                if let Some(s) = self.sessions.get_mut(&r.chain_id) {
                    s.frames += 1;
                    match f.direction {
                        Direction::Up => s.bytes_up += len,
                        Direction::Down => s.bytes_down += len,
                    }
                }
                if let Some(st) = self.streams.get_mut(&(r.chain_id, f.stream_id)) {
                    match f.direction {
                        Direction::Up => {
                            st.frames_up += 1;
                            st.bytes_up += len;
                        }
                        Direction::Down => {
                            st.frames_down += 1;
                            st.bytes_down += len;
                        }
                    }
                }
                true
            }
            Body::StreamOpened(o) => {
                self.streams.insert(
                    (r.chain_id, o.stream_id),
                    StreamRow {
                        session_id: r.chain_id,
                        stream_id: o.stream_id,
                        target: o.target.clone(),
                        protocol_hint: o.protocol_hint.clone(),
                        client_addr: o.client_addr.clone(),
                        upstream_addr: o.upstream_addr.clone(),
                        opened_at: r.ts_unix_nanos,
                        closed_at: 0,
                        bytes_up: 0,
                        bytes_down: 0,
                        frames_up: 0,
                        frames_down: 0,
                        error: String::new(),
                    },
                );
                true
            }
            Body::StreamClosed(c) => {
                if let Some(mut st) = self.streams.remove(&(r.chain_id, c.stream_id)) {
                    st.closed_at = r.ts_unix_nanos;
                    st.bytes_up = c.bytes_up;
                    st.bytes_down = c.bytes_down;
                    st.error = c.error.clone();
                    out.streams.push(st);
                }
                true
            }
            Body::SessionClosed(c) => {
                // Already reported edge_lost: the events table has the close, the
                // sessions table keeps its one row.
                self.lost.remove(&r.chain_id);
                self.session_edges.remove(&r.chain_id);
                if let Some(mut s) = self.sessions.remove(&r.chain_id) {
                    s.closed_at = r.ts_unix_nanos;
                    s.close_reason = c.reason.as_str().into();
                    s.close_detail = c.detail.clone();
                    s.bytes_up = c.bytes_up;
                    s.bytes_down = c.bytes_down;
                    s.streams = c.streams;
                    s.records = r.seq + 1;
                    out.sessions.push(s);
                }
                // Streams the session never closed end with it.
                let orphans: Vec<_> = self
                    .streams
                    .keys()
                    .filter(|(s, _)| *s == r.chain_id)
                    .copied()
                    .collect();
                for k in orphans {
                    if let Some(mut st) = self.streams.remove(&k) {
                        st.closed_at = r.ts_unix_nanos;
                        st.error = "the session closed with the stream open".into();
                        out.streams.push(st);
                    }
                }
                self.end_chain(r);
                true
            }
            // A replay run's summary is its last record: forget the chain as a
            // session's close does, or every run would stay in the state for good.
            Body::ReplayDiff(d) if d.kind == "summary" => {
                self.end_chain(r);
                false
            }
            Body::Gap(_) => true,
            Body::Heartbeat(_) => {
                let seen = self.heartbeats.entry(r.chain_id).or_insert(i64::MIN);
                *seen = (*seen).max(r.ts_unix_nanos);
                false
            }
            _ => self.sessions.contains_key(&r.chain_id),
        }
    }
}

/// What the log holds beyond the archive: the records after each partition's last
/// committed range, as the recorder will archive them, plus the sessions and streams
/// still open. Readers combine it with the Parquet files the same markers list, so a
/// record is in exactly one of the two.
#[derive(Debug, Default)]
pub struct Tail {
    /// Records not yet archived (with whether each is on a session chain), in log
    /// order within a partition; records the archive already holds are left out.
    pub records: Vec<(Record, bool)>,
    /// Sessions and streams that closed in the tail: the rows the recorder will write.
    pub sessions: Vec<SessionRow>,
    pub streams: Vec<StreamRow>,
    /// Sessions and streams open at the end of the log; `closed_at` is 0, and byte
    /// counts are those of the frames seen so far.
    pub open_sessions: Vec<SessionRow>,
    pub open_streams: Vec<StreamRow>,
    /// Encoded size of `records`, for callers that bound their memory.
    pub bytes: u64,
}

/// Reads the log past the ranges `markers` commit (each partition from its last
/// marker's checkpoint) up to the log's current end. Stops with
/// [`RecorderError::TailTooLarge`] once the records exceed `max_bytes`.
pub async fn read_tail(
    log: &dyn EventLog,
    markers: &[Marker],
    max_bytes: u64,
) -> Result<Tail, RecorderError> {
    use futures::StreamExt;
    let end = log.end().await?;
    let mut from = crate::Offsets::default();
    let mut states: BTreeMap<u32, ChainState> = BTreeMap::new();
    for (&p, &e) in &end.0 {
        let last = markers
            .iter()
            .filter(|m| m.partition == p)
            .max_by_key(|m| m.first);
        let (next, checkpoint) = last.map_or((0, Checkpoint::default()), |m| {
            (m.last + 1, m.checkpoint.clone())
        });
        if next < e {
            from.0.insert(p, next);
            states.insert(p, ChainState::from_checkpoint(checkpoint));
        } else {
            // Nothing beyond the archive; its open sessions are still open.
            states.insert(p, ChainState::from_checkpoint(checkpoint));
        }
    }
    let mut tail = Tail::default();
    let mut pending = PendingRange::default();
    let mut pending_parts: BTreeMap<u32, u64> = from
        .0
        .iter()
        .filter(|(p, o)| end.0.get(p).is_some_and(|e| e > o))
        .map(|(p, _)| (*p, end.0[p]))
        .collect();
    if !pending_parts.is_empty() {
        let mut sub = log.subscribe(from);
        while !pending_parts.is_empty() {
            let Some(entry) = sub.next().await else { break };
            let entry = entry?;
            let p = entry.position.partition;
            let Some(&stop) = pending_parts.get(&p) else {
                continue;
            };
            if entry.position.offset >= stop {
                pending_parts.remove(&p);
                continue;
            }
            if entry.position.offset + 1 >= stop {
                pending_parts.remove(&p);
            }
            let state = states.get_mut(&p).expect("a state per partition read");
            let r = entry.record;
            if state.is_duplicate(&r) {
                continue;
            }
            let on_session = state.apply(&r, &mut pending);
            tail.bytes += approx_size(&r);
            if tail.bytes > max_bytes {
                return Err(RecorderError::TailTooLarge { limit: max_bytes });
            }
            tail.records.push((r, on_session));
        }
    }
    tail.sessions = pending.sessions;
    tail.streams = pending.streams;
    for state in states.into_values() {
        for mut s in state.sessions.into_values() {
            s.records = state.chains.get(&s.session_id).map_or(0, |seq| seq + 1);
            tail.open_sessions.push(s);
        }
        tail.open_streams.extend(state.streams.into_values());
    }
    tail.open_sessions.sort_by_key(|s| s.session_id);
    tail.open_streams
        .sort_by_key(|s| (s.session_id, s.stream_id));
    Ok(tail)
}

/// Roughly what a record takes in memory: its payloads plus a fixed envelope.
fn approx_size(r: &Record) -> u64 {
    let payload = match &r.body {
        Body::Frame(f) => f.payload.as_ref().map_or(0, Vec::len),
        Body::HttpExchange(x) => [&x.request_body, &x.response_body]
            .iter()
            .map(|b| b.content.as_ref().map_or(0, Vec::len))
            .sum(),
        _ => 0,
    };
    payload as u64 + 256
}

/// Records gathered for the range being built.
#[derive(Default)]
struct PendingRange {
    first: Option<u64>,
    last: u64,
    bucket: i64,
    bytes: u64,
    records: Vec<(Record, bool)>,
    duplicates: u64,
    sessions: Vec<SessionRow>,
    streams: Vec<StreamRow>,
}

impl PendingRange {
    fn is_empty(&self) -> bool {
        self.first.is_none()
    }
}

/// One partition this recorder owns.
struct PartitionWork {
    partition: u32,
    /// When this partition last received a record (for the per-partition idle flush).
    last_push: std::time::Instant,
    /// Next offset to archive.
    next: u64,
    state: ChainState,
    pending: PendingRange,
}

fn bucket_of(ts: i64, seconds: u64) -> i64 {
    ts.div_euclid(seconds.max(1) as i64 * 1_000_000_000)
}

pub struct Recorder {
    log: Arc<dyn EventLog>,
    store: Arc<dyn ObjectStore>,
    cfg: RecorderSettings,
    stats: Arc<RecorderStats>,
    id: String,
    ranges_started: u64,
}

/// What a drain did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainReport {
    pub records: u64,
    pub duplicates: u64,
    pub ranges: u64,
}

impl Recorder {
    pub fn new(log: Arc<dyn EventLog>, store: Arc<dyn ObjectStore>, cfg: RecorderSettings) -> Self {
        Self {
            log,
            store,
            cfg,
            stats: Arc::default(),
            id: format!(
                "{}-{}",
                std::process::id(),
                Uuid::now_v7()
                    .simple()
                    .to_string()
                    .get(..12)
                    .unwrap_or_default()
            ),
            ranges_started: 0,
        }
    }

    pub fn stats(&self) -> Arc<RecorderStats> {
        self.stats.clone()
    }

    /// Shares `stats` with an earlier recorder (a restart keeps one set of counters).
    pub fn with_stats(mut self, stats: Arc<RecorderStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Archives everything in the log now and returns (`cloudtapd recorder --once`).
    pub async fn drain(mut self, cancel: &CancellationToken) -> Result<DrainReport, RecorderError> {
        let end = self.log.end().await?;
        let before = self.snapshot();
        let mut reader = SoloReader::new(self.log.clone()).await?;
        let mut parts: BTreeMap<u32, PartitionWork> = BTreeMap::new();
        loop {
            let done = end
                .0
                .iter()
                .all(|(p, e)| parts.get(p).is_some_and(|w| w.next >= *e));
            if done && !end.0.is_empty() {
                break;
            }
            if end.0.values().all(|e| *e == 0) {
                break;
            }
            let ev = tokio::select! {
                ev = reader.next() => ev?,
                _ = cancel.cancelled() => return Err(LogError::Closed.into()),
            };
            match ev {
                ReaderEvent::Assigned(ps) => {
                    for p in ps {
                        let w = self.resume(p, cancel).await?;
                        reader.seek(p, w.next).await?;
                        parts.insert(p, w);
                    }
                }
                ReaderEvent::Revoked(_) => {}
                ReaderEvent::Entry(e) => {
                    if let Some(w) = parts.get_mut(&e.position.partition) {
                        // Records appended after the drain began wait for the next run.
                        if e.position.offset < end.get(e.position.partition) {
                            self.push(w, *e, &mut reader, cancel).await?;
                        }
                    }
                }
            }
        }
        for w in parts.values_mut() {
            self.commit(w, &mut reader, cancel).await?;
        }
        if let Some(age) = self.cfg.retention {
            expire_ranges(self.store.as_ref(), age).await?;
        }
        let after = self.snapshot();
        Ok(DrainReport {
            records: after.records - before.records,
            duplicates: after.duplicates - before.duplicates,
            ranges: after.ranges - before.ranges,
        })
    }

    fn snapshot(&self) -> DrainReport {
        DrainReport {
            records: self.stats.records_archived.load(Ordering::Relaxed),
            duplicates: self.stats.duplicates_dropped.load(Ordering::Relaxed),
            ranges: self.stats.ranges_committed.load(Ordering::Relaxed),
        }
    }

    /// Runs until `cancel`: reads the log (as a member of the recorders' consumer
    /// group where the backend has groups), cutting and committing ranges.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), RecorderError> {
        let mut reader: Box<dyn PartitionReader> = match self.log.group_reader(&self.cfg.group) {
            Some(r) => r?,
            None => Box::new(SoloReader::new(self.log.clone()).await?),
        };
        let mut parts: BTreeMap<u32, PartitionWork> = BTreeMap::new();
        let mut last_expiry: Option<std::time::Instant> = None;
        loop {
            let ev = tokio::select! {
                ev = tokio::time::timeout(self.cfg.flush_idle, reader.next()) => ev,
                _ = cancel.cancelled() => break,
            };
            if let Some(age) = self.cfg.retention
                && last_expiry.is_none_or(|t| t.elapsed() > Duration::from_secs(600))
            {
                last_expiry = Some(std::time::Instant::now());
                if let Err(e) = expire_ranges(self.store.as_ref(), age).await {
                    tracing::warn!(error = %e, "archive retention failed; retrying in 10 minutes");
                }
            }
            match ev {
                Err(_idle) => {
                    self.mark_lost(&mut parts);
                    for w in parts.values_mut() {
                        if !w.pending.is_empty() {
                            self.commit(w, reader.as_mut(), &cancel).await?;
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "reading the traffic log failed; retrying in 1 s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = cancel.cancelled() => break,
                    }
                }
                Ok(Ok(ReaderEvent::Assigned(ps))) => {
                    for p in ps {
                        let w = self.resume(p, &cancel).await?;
                        tracing::info!(partition = p, from = w.next, "recorder took partition");
                        reader.seek(p, w.next).await?;
                        parts.insert(p, w);
                    }
                }
                Ok(Ok(ReaderEvent::Revoked(ps))) => {
                    for p in ps {
                        // Uncommitted records are simply read again by the next owner.
                        parts.remove(&p);
                        tracing::info!(partition = p, "recorder gave up partition");
                    }
                }
                Ok(Ok(ReaderEvent::Entry(e))) => {
                    if let Some(w) = parts.get_mut(&e.position.partition) {
                        w.last_push = std::time::Instant::now();
                        self.push(w, *e, reader.as_mut(), &cancel).await?;
                    }
                    // A quiet partition's pending range is committed even while
                    // others stay busy.
                    for w in parts.values_mut() {
                        if !w.pending.is_empty() && w.last_push.elapsed() >= self.cfg.flush_idle {
                            self.commit(w, reader.as_mut(), &cancel).await?;
                        }
                    }
                }
            }
        }
        // Shutting down: commit what is pending so a restart has nothing to redo.
        let done = CancellationToken::new();
        for w in parts.values_mut() {
            if !w.pending.is_empty() {
                tokio::select! {
                    r = self.commit(w, reader.as_mut(), &done) => { r?; }
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {
                        tracing::warn!(partition = w.partition, "gave up committing at shutdown; the next run redoes the range");
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves sessions of edges that stopped beating into their partition's pending
    /// range as `edge_lost` rows (they are written with that partition's next range).
    fn mark_lost(&self, parts: &mut BTreeMap<u32, PartitionWork>) {
        let mut beats: HashMap<Uuid, i64> = HashMap::new();
        let mut now = i64::MIN;
        for w in parts.values() {
            now = now.max(w.state.log_time);
            for (edge, ts) in &w.state.heartbeats {
                let e = beats.entry(*edge).or_insert(i64::MIN);
                *e = (*e).max(*ts);
            }
        }
        for w in parts.values_mut() {
            let rows = w.state.take_lost(&beats, now, self.cfg.edge_lost_after);
            for r in &rows {
                tracing::warn!(session_id = %r.session_id, edge = %r.edge, "edge lost: session marked closed (edge_lost)");
            }
            w.pending.sessions.extend(rows);
        }
    }

    /// Where partition `p` continues: after its last marker, with that checkpoint.
    /// Files of `p` that no marker lists are removed.
    async fn resume(
        &self,
        p: u32,
        cancel: &CancellationToken,
    ) -> Result<PartitionWork, RecorderError> {
        let store = self.store.clone();
        let (next, checkpoint) = retry(
            "reading commit markers",
            self.cfg.max_backoff,
            cancel,
            &self.stats,
            || {
                let store = store.clone();
                async move {
                    let keys = store.list(&marker_prefix(p)).await?;
                    let Some(last) = keys.iter().rfind(|k| k.key.ends_with(".json")) else {
                        return Ok((0, Checkpoint::default()));
                    };
                    let m = load_marker(store.as_ref(), &last.key).await?;
                    Ok::<_, RecorderError>((m.last + 1, m.checkpoint))
                }
            },
        )
        .await?;
        self.remove_leftovers(p, next, cancel).await?;
        self.stats
            .archived_to
            .lock()
            .expect("stats poisoned")
            .insert(p, next);
        Ok(PartitionWork {
            partition: p,
            last_push: std::time::Instant::now(),
            next,
            state: ChainState::from_checkpoint(checkpoint),
            pending: PendingRange::default(),
        })
    }

    /// Deletes files of partition `p` starting at or after `from` (uploads whose
    /// marker was never created).
    async fn remove_leftovers(
        &self,
        p: u32,
        from: u64,
        cancel: &CancellationToken,
    ) -> Result<(), RecorderError> {
        let store = self.store.clone();
        let tag = format!("p{p:05}-");
        retry("removing unmarked files", self.cfg.max_backoff, cancel, &self.stats, || {
            let store = store.clone();
            let tag = tag.clone();
            async move {
                for t in tables::TABLES {
                    for f in store.list(&format!("{t}/")).await? {
                        let name = f.key.rsplit('/').next().unwrap_or_default();
                        let Some(rest) = name.strip_prefix(&tag) else { continue };
                        let first = rest.split('-').next().and_then(|s| s.parse::<u64>().ok());
                        if first.is_some_and(|f| f >= from) {
                            tracing::info!(key = %f.key, "removing a file no commit marker lists");
                            store.delete(&f.key).await?;
                        }
                    }
                }
                Ok::<_, RecorderError>(())
            }
        })
        .await
    }

    async fn push(
        &mut self,
        w: &mut PartitionWork,
        e: LogEntry,
        reader: &mut (impl PartitionReader + ?Sized),
        cancel: &CancellationToken,
    ) -> Result<(), RecorderError> {
        let offset = e.position.offset;
        if offset < w.next {
            return Ok(()); // already archived (a replay after seek or rebalance)
        }
        let r = e.record;
        let bucket = bucket_of(r.ts_unix_nanos, self.cfg.range_seconds);
        if !w.pending.is_empty()
            && bucket > w.pending.bucket
            && !self.commit(w, reader, cancel).await?
        {
            // Another recorder committed first: `w` now continues after its range and
            // the reader was sought there, so this record comes again if it is ours.
            return Ok(());
        }
        if w.pending.is_empty() {
            w.pending.first = Some(offset);
            w.pending.bucket = bucket;
        }
        w.pending.last = offset;
        w.next = offset + 1;
        if w.state.is_duplicate(&r) {
            w.pending.duplicates += 1;
        } else {
            let on_session = w.state.apply(&r, &mut w.pending);
            if let Body::Frame(f) = &r.body {
                w.pending.bytes += f.payload.as_ref().map_or(0, |p| p.len() as u64);
            }
            w.pending.records.push((r, on_session));
        }
        let n = w.pending.records.len() as u64 + w.pending.duplicates;
        if n >= self.cfg.range_records || w.pending.bytes >= self.cfg.range_bytes {
            self.commit(w, reader, cancel).await?;
        }
        Ok(())
    }

    /// Writes the pending range's files, then its marker. If another recorder already
    /// committed a range starting at the same offset, ours is discarded and the
    /// partition continues after theirs.
    async fn commit(
        &mut self,
        w: &mut PartitionWork,
        reader: &mut (impl PartitionReader + ?Sized),
        cancel: &CancellationToken,
    ) -> Result<bool, RecorderError> {
        let Some(first) = w.pending.first else {
            return Ok(true);
        };
        let range = std::mem::take(&mut w.pending);
        let last = range.last;
        let p = w.partition;
        // Sorting and encoding is CPU work: off the async workers.
        let (range, files) = tokio::task::spawn_blocking(move || {
            let mut range = range;
            let files = build_files(p, first, last, &mut range);
            (range, files)
        })
        .await
        .expect("encoding task panicked");
        let files = files?;
        let checkpoint = w.state.checkpoint();
        let mut marked = Vec::with_capacity(files.len());
        for (key, table, rows, data, ranges) in files {
            let store = self.store.clone();
            let len = data.len() as u64;
            retry(
                "uploading Parquet",
                self.cfg.max_backoff,
                cancel,
                &self.stats,
                || {
                    let store = store.clone();
                    let key = key.clone();
                    let data = data.clone();
                    async move { store.put(&key, data).await }
                },
            )
            .await?;
            self.stats.bytes_written.fetch_add(len, Ordering::Relaxed);
            marked.push(MarkedFile {
                key,
                table: table.into(),
                rows,
                bytes: len,
                ranges,
            });
        }
        self.ranges_started += 1;
        if self.cfg.stop_before_marker == Some(self.ranges_started) {
            stop_self(p, first, last);
        }
        let (min_ts, max_ts) = range
            .records
            .iter()
            .fold((i64::MAX, i64::MIN), |(lo, hi), (r, _)| {
                (lo.min(r.ts_unix_nanos), hi.max(r.ts_unix_nanos))
            });
        let marker = Marker {
            format: MARKER_FORMAT,
            partition: p,
            first,
            last,
            records: range.records.len() as u64,
            duplicates_dropped: range.duplicates,
            min_ts: if range.records.is_empty() { 0 } else { min_ts },
            max_ts: if range.records.is_empty() { 0 } else { max_ts },
            tables_version: TABLES_VERSION,
            files: marked,
            checkpoint,
            committed_by: self.id.clone(),
            committed_unix_ms: unix_ms(),
        };
        let body = Bytes::from(serde_json::to_vec(&marker).expect("markers serialize"));
        let key = marker_key(p, first);
        let store = self.store.clone();
        let created = retry(
            "creating a commit marker",
            self.cfg.max_backoff,
            cancel,
            &self.stats,
            || {
                let store = store.clone();
                let key = key.clone();
                let body = body.clone();
                async move { store.put_if_absent(&key, body).await }
            },
        )
        .await?;
        if created {
            self.stats
                .records_archived
                .fetch_add(marker.records, Ordering::Relaxed);
            self.stats
                .duplicates_dropped
                .fetch_add(marker.duplicates_dropped, Ordering::Relaxed);
            self.stats.ranges_committed.fetch_add(1, Ordering::Relaxed);
            self.stats
                .last_commit_unix_ms
                .store(marker.committed_unix_ms, Ordering::Relaxed);
            self.stats
                .archived_to
                .lock()
                .expect("stats poisoned")
                .insert(p, last + 1);
            tracing::debug!(
                partition = p,
                first,
                last,
                records = marker.records,
                "range committed"
            );
            if let Err(e) = reader.commit(p, last + 1).await {
                tracing::debug!(error = %e, "committing the consumer offset failed (a hint only)");
            }
            return Ok(true);
        }
        // Another recorder committed a range starting here first: drop ours (files it
        // does not list), and continue after its range from its checkpoint.
        self.stats
            .ranges_lost_to_others
            .fetch_add(1, Ordering::Relaxed);
        let theirs = load_marker(self.store.as_ref(), &key).await?;
        tracing::info!(
            partition = p,
            first,
            ours = last,
            theirs = theirs.last,
            "another recorder committed this range first"
        );
        for f in &marker.files {
            if !theirs.files.iter().any(|t| t.key == f.key) {
                self.store.delete(&f.key).await?;
            }
        }
        let mut again = self.resume(p, cancel).await?;
        std::mem::swap(w, &mut again);
        reader.seek(p, w.next).await?;
        Ok(false)
    }
}

/// Retries `op` with exponential backoff until it succeeds or `cancel` fires.
async fn retry<T, E, F, Fut>(
    what: &str,
    max_delay: Duration,
    cancel: &CancellationToken,
    stats: &RecorderStats,
    mut op: F,
) -> Result<T, RecorderError>
where
    E: Into<RecorderError>,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match op().await.map_err(Into::into) {
            Ok(v) => {
                stats.store_failing.store(false, Ordering::Relaxed);
                return Ok(v);
            }
            Err(e @ RecorderError::BadMarker { .. }) | Err(e @ RecorderError::Parquet(_)) => {
                return Err(e);
            }
            Err(e) => {
                stats.store_failing.store(true, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "{what} failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return Err(e),
                }
                delay = (delay * 2).min(max_delay);
            }
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Test hook: SIGSTOP this process so a test can SIGKILL it between upload and marker.
fn stop_self(p: u32, first: u64, last: u64) {
    eprintln!(
        "fault injection: files of range {p}:{first}-{last} uploaded; stopping before its commit marker"
    );
    let _ = std::process::Command::new("kill")
        .args(["-STOP", &std::process::id().to_string()])
        .status();
}

/// `date=YYYY-MM-DD/hour=HH` of a UTC timestamp in nanoseconds.
pub fn hive_partition(ts_nanos: i64) -> String {
    let secs = ts_nanos.div_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let hour = secs.rem_euclid(86_400) / 3600;
    let (y, m, d) = civil_from_days(days);
    format!("date={y:04}-{m:02}-{d:02}/hour={hour:02}")
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

type FileOut = (String, &'static str, u64, Bytes, Vec<ColumnRange>);

/// Encodes a range's rows: one file per table and Hive partition.
fn build_files(
    p: u32,
    first: u64,
    last: u64,
    range: &mut PendingRange,
) -> Result<Vec<FileOut>, RecorderError> {
    let name = format!("p{p:05}-{first:020}-{last:020}.parquet");
    let range_tag = format!("{p}:{first}-{last}");
    // Rows sorted by (chain_id, seq) within each file.
    // A UUID's byte order is the order of its lowercase hyphenated text (the
    // `chain_id` column), so this sorts the files by that column without formatting
    // two strings per comparison.
    range.records.sort_by_key(|(r, _)| (r.chain_id, r.seq));
    let mut groups: BTreeMap<(&'static str, String), Vec<usize>> = BTreeMap::new();
    for (i, (r, _)) in range.records.iter().enumerate() {
        groups
            .entry((tables::table_of(r), hive_partition(r.ts_unix_nanos)))
            .or_default()
            .push(i);
    }
    let mut out = Vec::new();
    for ((table, part), idx) in groups {
        let rows = idx
            .iter()
            .map(|i| (&range.records[*i].0, range.records[*i].1));
        let batch = tables::records_batch(table, rows)
            .map_err(|e| RecorderError::Parquet(e.to_string()))?;
        out.push((
            format!("{table}/{part}/{name}"),
            table,
            idx.len() as u64,
            encode(&batch, table, &range_tag)?,
            column_ranges(&batch),
        ));
    }
    let mut by_part: BTreeMap<String, Vec<SessionRow>> = BTreeMap::new();
    for s in range.sessions.drain(..) {
        by_part
            .entry(hive_partition(s.closed_at))
            .or_default()
            .push(s);
    }
    for (part, mut rows) in by_part {
        rows.sort_by_key(|r| r.session_id.hyphenated().to_string());
        let batch =
            tables::sessions_batch(&rows).map_err(|e| RecorderError::Parquet(e.to_string()))?;
        out.push((
            format!("sessions/{part}/{name}"),
            "sessions",
            rows.len() as u64,
            encode(&batch, "sessions", &range_tag)?,
            column_ranges(&batch),
        ));
    }
    let mut by_part: BTreeMap<String, Vec<StreamRow>> = BTreeMap::new();
    for s in range.streams.drain(..) {
        by_part
            .entry(hive_partition(s.closed_at))
            .or_default()
            .push(s);
    }
    for (part, mut rows) in by_part {
        rows.sort_by_key(|r| (r.session_id.hyphenated().to_string(), r.stream_id));
        let batch =
            tables::streams_batch(&rows).map_err(|e| RecorderError::Parquet(e.to_string()))?;
        out.push((
            format!("streams/{part}/{name}"),
            "streams",
            rows.len() as u64,
            encode(&batch, "streams", &range_tag)?,
            column_ranges(&batch),
        ));
    }
    Ok(out)
}

/// One Parquet file: zstd, row groups of at most 16 Ki rows, statistics, a bloom
/// filter on the id columns, sorting declared, the schema version in the metadata.
fn encode(batch: &RecordBatch, table: &str, range_tag: &str) -> Result<Bytes, RecorderError> {
    let err = |e: parquet::errors::ParquetError| RecorderError::Parquet(e.to_string());
    let schema = batch.schema();
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).map_err(err)?))
        .set_max_row_group_row_count(Some(16 * 1024))
        .set_key_value_metadata(Some(vec![
            KeyValue::new(VERSION_KEY.into(), TABLES_VERSION.to_string()),
            KeyValue::new("cloudtap.table".into(), table.to_string()),
            KeyValue::new("cloudtap.range".into(), range_tag.to_string()),
        ]));
    for col in ["chain_id", "session_id"] {
        if schema.index_of(col).is_ok() {
            props = props.set_column_bloom_filter_enabled(ColumnPath::from(col), true);
        }
    }
    if let (Ok(c), Ok(s)) = (schema.index_of("chain_id"), schema.index_of("seq")) {
        props = props.set_sorting_columns(Some(vec![
            SortingColumn {
                column_idx: c as i32,
                descending: false,
                nulls_first: false,
            },
            SortingColumn {
                column_idx: s as i32,
                descending: false,
                nulls_first: false,
            },
        ]));
    }
    let mut w = ArrowWriter::try_new(Vec::new(), schema, Some(props.build())).map_err(err)?;
    w.write(batch).map_err(err)?;
    Ok(Bytes::from(w.into_inner().map_err(err)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryLog;
    use crate::store::LocalStore;
    use cloudtap_schemas::{Audit, ChainWriter};
    use futures::future::BoxFuture;

    fn audit(w: &mut ChainWriter, ts: i64, i: u64) -> Record {
        w.seal(
            ts,
            Body::Audit(Audit {
                actor: "t".into(),
                action: format!("a{i}"),
                detail: String::new(),
            }),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_of_an_edge_that_stopped_beating_are_closed_edge_lost_once() {
        use cloudtap_schemas::{Heartbeat, SessionClosed, SessionOpened};
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path()));
        let log = Arc::new(MemoryLog::new());
        let now = cloudtap_schemas::now_unix_nanos();
        let s = 1_000_000_000i64;
        let beat = |w: &mut ChainWriter, edge: &str, ts| {
            w.seal(
                ts,
                Body::Heartbeat(Heartbeat {
                    edge: edge.into(),
                    open_sessions: 1,
                }),
            )
        };
        let open = |w: &mut ChainWriter, edge: &str, edge_chain: Uuid, ts| {
            w.seal(
                ts,
                Body::SessionOpened(SessionOpened {
                    edge: edge.into(),
                    edge_chain_id: edge_chain,
                    target: "db".into(),
                    ..Default::default()
                }),
            )
        };
        let (mut e1, mut e2) = (
            ChainWriter::new(Uuid::now_v7()),
            ChainWriter::new(Uuid::now_v7()),
        );
        let (mut s1, mut s2) = (
            ChainWriter::new(Uuid::now_v7()),
            ChainWriter::new(Uuid::now_v7()),
        );
        let (c1, c2) = (e1.chain_id(), e2.chain_id());
        log.append(vec![
            beat(&mut e1, "e1", now - 120 * s),
            open(&mut s1, "e1", c1, now - 119 * s),
            beat(&mut e2, "e2", now - 1),
            open(&mut s2, "e2", c2, now),
        ])
        .await
        .unwrap();
        let settings = RecorderSettings {
            flush_idle: Duration::from_millis(50),
            edge_lost_after: Duration::from_secs(60),
            ..RecorderSettings::default()
        };
        let rec = Recorder::new(log.clone(), store.clone(), settings);
        let stats = rec.stats();
        let cancel = CancellationToken::new();
        let run = tokio::spawn(rec.run(cancel.clone()));
        let wait_ranges = |n: u64| {
            let stats = stats.clone();
            async move {
                for _ in 0..200 {
                    if stats.ranges_committed.load(Ordering::Relaxed) >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                panic!("waited 5 s for {n} committed ranges");
            }
        };
        wait_ranges(1).await;
        // The lost row rides with the partition's next range.
        tokio::time::sleep(Duration::from_millis(200)).await;
        log.append(vec![beat(
            &mut e2,
            "e2",
            cloudtap_schemas::now_unix_nanos(),
        )])
        .await
        .unwrap();
        wait_ranges(2).await;
        // A late close of the lost session adds no second row.
        log.append(vec![s1.seal_now(Body::SessionClosed(SessionClosed {
            reason: cloudtap_schemas::CloseReason::EdgeRestart,
            detail: String::new(),
            bytes_up: 0,
            bytes_down: 0,
            streams: 0,
        }))])
        .await
        .unwrap();
        wait_ranges(3).await;
        cancel.cancel();
        run.await.unwrap().unwrap();

        let mut rows = Vec::new();
        for m in read_markers(store.as_ref()).await.unwrap() {
            for f in m.files.iter().filter(|f| f.table == "sessions") {
                let data = store.get(&f.key).await.unwrap().unwrap();
                for b in
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(data)
                        .unwrap()
                        .build()
                        .unwrap()
                {
                    let b = b.unwrap();
                    let col = |n: &str| {
                        b.column_by_name(n)
                            .unwrap()
                            .as_any()
                            .downcast_ref::<arrow::array::StringArray>()
                            .unwrap()
                            .clone()
                    };
                    let (ids, reasons) = (col("session_id"), col("close_reason"));
                    for i in 0..b.num_rows() {
                        rows.push((ids.value(i).to_owned(), reasons.value(i).to_owned()));
                    }
                }
            }
        }
        assert_eq!(
            rows,
            vec![(s1.chain_id().to_string(), "edge_lost".to_string())]
        );
    }

    /// A store that lets another recorder drain everything just before the first
    /// commit marker of the recorder under test is created, so that one loses the race
    /// with a range shorter than the winner's.
    struct RacedStore {
        inner: LocalStore,
        winner: std::sync::Mutex<Option<Recorder>>,
    }

    impl ObjectStore for RacedStore {
        fn put(&self, key: &str, data: Bytes) -> BoxFuture<'_, Result<(), StoreError>> {
            self.inner.put(key, data)
        }
        fn put_if_absent(&self, key: &str, data: Bytes) -> BoxFuture<'_, Result<bool, StoreError>> {
            use futures::FutureExt;
            let key = key.to_owned();
            async move {
                let winner = self.winner.lock().unwrap().take();
                if let Some(w) = winner {
                    w.drain(&CancellationToken::new()).await.unwrap();
                }
                self.inner.put_if_absent(&key, data).await
            }
            .boxed()
        }
        fn get(&self, key: &str) -> BoxFuture<'_, Result<Option<Bytes>, StoreError>> {
            self.inner.get(key)
        }
        fn list(
            &self,
            prefix: &str,
        ) -> BoxFuture<'_, Result<Vec<crate::store::ObjectMeta>, StoreError>> {
            self.inner.list(prefix)
        }
        fn delete(&self, key: &str) -> BoxFuture<'_, Result<(), StoreError>> {
            self.inner.delete(key)
        }
        fn describe(&self) -> String {
            self.inner.describe()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_recorder_that_loses_the_marker_race_archives_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(MemoryLog::new());
        let mut w = ChainWriter::new(Uuid::now_v7());
        let now = cloudtap_schemas::now_unix_nanos();
        // Two 30 s buckets: the loser cuts at the bucket change; the winner (one day per
        // bucket) does not, so the winner's range reaches past the loser's cut.
        let recs: Vec<Record> = (0..20)
            .map(|i| {
                let ts = now - 120_000_000_000 + if i < 10 { 0 } else { 60_000_000_000 };
                audit(&mut w, ts, i)
            })
            .collect();
        log.append(recs).await.unwrap();
        let winner = Recorder::new(
            log.clone(),
            Arc::new(LocalStore::new(dir.path())),
            RecorderSettings {
                range_seconds: 86_400,
                ..RecorderSettings::default()
            },
        );
        let store: Arc<dyn ObjectStore> = Arc::new(RacedStore {
            inner: LocalStore::new(dir.path()),
            winner: std::sync::Mutex::new(Some(winner)),
        });
        let loser = Recorder::new(log.clone(), store.clone(), RecorderSettings::default());
        let stats = loser.stats();
        tokio::time::timeout(
            Duration::from_secs(20),
            loser.drain(&CancellationToken::new()),
        )
        .await
        .expect("the loser must finish its drain")
        .unwrap();
        assert_eq!(stats.ranges_lost_to_others.load(Ordering::Relaxed), 1);
        let markers = read_markers(store.as_ref()).await.unwrap();
        let ranges: Vec<(u64, u64)> = markers.iter().map(|m| (m.first, m.last)).collect();
        assert_eq!(
            ranges,
            vec![(0, 19)],
            "only the winner's range is committed"
        );
    }

    #[tokio::test]
    async fn expired_ranges_go_marker_first_and_the_last_range_stays() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path()));
        let log = Arc::new(MemoryLog::new());
        let mut w = ChainWriter::new(Uuid::now_v7());
        let day = 86_400 * 1_000_000_000i64;
        let now = cloudtap_schemas::now_unix_nanos();
        // Three old ranges (ten days ago, cut by their 30 s buckets), then a new one.
        let mut recs = Vec::new();
        for (k, ts) in [
            now - 10 * day,
            now - 10 * day + 60_000_000_000,
            now - 9 * day,
            now,
        ]
        .into_iter()
        .enumerate()
        {
            for i in 0..5 {
                recs.push(audit(&mut w, ts, (k * 5 + i) as u64));
            }
        }
        log.append(recs).await.unwrap();
        let rec = Recorder::new(log.clone(), store.clone(), RecorderSettings::default());
        let report = rec.drain(&CancellationToken::new()).await.unwrap();
        assert_eq!((report.records, report.ranges), (20, 4));
        let before = store.list("").await.unwrap().len();
        // Nothing is a week old yet but the first three ranges.
        let removed = expire_ranges(store.as_ref(), Duration::from_secs(7 * 86_400))
            .await
            .unwrap();
        assert_eq!(removed, 3);
        let markers = read_markers(store.as_ref()).await.unwrap();
        assert_eq!(markers.len(), 1);
        assert_eq!(markers[0].first, 15);
        // Their files are gone too; the last range's remain.
        let left: Vec<String> = store
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(left.len(), before - 3 * 2, "{left:?}");
        // The last range of a partition is kept even when old: recorders resume from it.
        assert_eq!(
            expire_ranges(store.as_ref(), Duration::ZERO).await.unwrap(),
            0
        );
    }

    #[test]
    fn hive_partitions_are_utc_dates_and_hours() {
        assert_eq!(hive_partition(0), "date=1970-01-01/hour=00");
        // 2024-02-29T23:59:59Z
        assert_eq!(
            hive_partition(1_709_251_199 * 1_000_000_000),
            "date=2024-02-29/hour=23"
        );
        // 2026-11-25T22:30:00Z
        assert_eq!(
            hive_partition(1_795_645_800 * 1_000_000_000 + 5),
            "date=2026-11-25/hour=22"
        );
    }
}
