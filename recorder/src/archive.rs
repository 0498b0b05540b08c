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
/// Closed session chains remembered per partition for dropping late duplicates.
const RECENTLY_CLOSED: usize = 10_000;

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenSession {
    pub row: SessionRow,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenStream {
    pub row: StreamRow,
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
    let bytes = store
        .get(key)
        .await?
        .ok_or_else(|| RecorderError::BadMarker {
            key: key.into(),
            reason: "it vanished while being read".into(),
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

/// The state of one partition between ranges, rebuilt from a checkpoint.
struct ChainState {
    sessions: HashMap<Uuid, SessionRow>,
    streams: HashMap<(Uuid, u64), StreamRow>,
    chains: HashMap<Uuid, u64>,
    recently_closed: VecDeque<(Uuid, u64)>,
    closed_index: HashMap<Uuid, u64>,
}

impl ChainState {
    fn from_checkpoint(c: Checkpoint) -> Self {
        Self {
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
        };
        // Deterministic bytes for the same state.
        c.open_sessions.sort_by_key(|s| s.row.session_id);
        c.open_streams
            .sort_by_key(|s| (s.row.session_id, s.row.stream_id));
        c.chains.sort();
        c
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
        match &r.body {
            Body::SessionOpened(o) => {
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
                    },
                );
                true
            }
            Body::Frame(f) => {
                if let Some(s) = self.sessions.get_mut(&r.chain_id) {
                    s.frames += 1;
                }
                if let Some(st) = self.streams.get_mut(&(r.chain_id, f.stream_id)) {
                    match f.direction {
                        Direction::Up => st.frames_up += 1,
                        Direction::Down => st.frames_down += 1,
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
                self.chains.remove(&r.chain_id);
                self.recently_closed.push_back((r.chain_id, r.seq));
                self.closed_index.insert(r.chain_id, r.seq);
                while self.recently_closed.len() > RECENTLY_CLOSED {
                    if let Some((c, _)) = self.recently_closed.pop_front() {
                        self.closed_index.remove(&c);
                    }
                }
                true
            }
            Body::Gap(_) => true,
            _ => self.sessions.contains_key(&r.chain_id),
        }
    }
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
        loop {
            let ev = tokio::select! {
                ev = tokio::time::timeout(self.cfg.flush_idle, reader.next()) => ev,
                _ = cancel.cancelled() => break,
            };
            match ev {
                Err(_idle) => {
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
                        self.push(w, *e, reader.as_mut(), &cancel).await?;
                    }
                }
            }
        }
        // Shutting down: commit what is pending so a restart has nothing to redo.
        let done = CancellationToken::new();
        for w in parts.values_mut() {
            if !w.pending.is_empty() {
                tokio::select! {
                    r = self.commit(w, reader.as_mut(), &done) => r?,
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {
                        tracing::warn!(partition = w.partition, "gave up committing at shutdown; the next run redoes the range");
                    }
                }
            }
        }
        Ok(())
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
        if !w.pending.is_empty() && bucket > w.pending.bucket {
            self.commit(w, reader, cancel).await?;
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
    ) -> Result<(), RecorderError> {
        let Some(first) = w.pending.first else {
            return Ok(());
        };
        let mut range = std::mem::take(&mut w.pending);
        let last = range.last;
        let p = w.partition;
        let files = build_files(p, first, last, &mut range)?;
        let checkpoint = w.state.checkpoint();
        let mut marked = Vec::with_capacity(files.len());
        for (key, table, rows, data) in files {
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
            return Ok(());
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
        Ok(())
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

type FileOut = (String, &'static str, u64, Bytes);

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
    range.records.sort_by(|(a, _), (b, _)| {
        (a.chain_id.hyphenated().to_string(), a.seq)
            .cmp(&(b.chain_id.hyphenated().to_string(), b.seq))
    });
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
        let batch = if table == "frames" {
            tables::frames_batch(rows)
        } else {
            tables::events_batch(rows)
        }
        .map_err(|e| RecorderError::Parquet(e.to_string()))?;
        out.push((
            format!("{table}/{part}/{name}"),
            table,
            idx.len() as u64,
            encode(&batch, table, &range_tag)?,
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
