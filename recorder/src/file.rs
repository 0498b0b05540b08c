//! The embedded default log: [`segment`](crate::segment) files on local disk.
//!
//! One dedicated writer thread owns the [`SegmentLog`]. Appenders send batches over a
//! bounded channel; the thread takes every batch that is waiting (optionally waiting up
//! to the group-commit window for more), writes them, issues **one** fsync for all of
//! them, publishes the new durable end and only then answers each appender. While one
//! fsync runs, the next group forms, so concurrent appenders share fsyncs instead of
//! queueing behind one each.
//!
//! Readers open their own file handles (`SegmentReader`) on blocking threads and read
//! only up to the published durable end, so they never see a record the writer could
//! still lose.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};

use cloudtap_schemas::{Record, decode_record, encode_record_owned, peek_kind};

use crate::segment::{SegmentConfig, SegmentLog, SegmentReader};
use crate::{EventLog, LogEntry, LogError, Offsets, Position};

/// When the writer thread fsyncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fsync after every group of batches; wait up to `window` after the first batch
    /// of a group for more to arrive (zero: groups form only while an fsync runs).
    Group { window: Duration },
    /// Never fsync: "durable" means handed to the OS. For tmpfs and benchmarks only —
    /// a machine crash can lose acknowledged records.
    Never,
}

impl Default for FsyncPolicy {
    fn default() -> Self {
        FsyncPolicy::Group {
            window: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FileLogConfig {
    pub dir: PathBuf,
    pub fsync: FsyncPolicy,
    pub segment_bytes: u64,
    /// Bound of the appenders → writer channel, in batches.
    pub queue_batches: usize,
    /// Below this much free space on the log's filesystem, [`EventLog::disk_low`]
    /// says so and the edge takes no new sessions (default 512 MiB).
    pub min_free_bytes: u64,
}

impl FileLogConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            fsync: FsyncPolicy::default(),
            segment_bytes: 64 * 1024 * 1024,
            queue_batches: 256,
            min_free_bytes: 512 * 1024 * 1024,
        }
    }
}

struct AppendReq {
    /// The batch's records, already encoded by the appender (encoding runs on the
    /// appenders' threads, in parallel; the writer thread only writes and syncs).
    encoded: Vec<Vec<u8>>,
    reply: oneshot::Sender<Result<Position, LogError>>,
}

/// Retention asked of the writer thread (which owns the segments).
struct RetainReq {
    archived: u64,
    policy: crate::Retention,
    reply: oneshot::Sender<Result<u64, LogError>>,
}

enum WriterMsg {
    Append(AppendReq),
    Retain(RetainReq),
}

/// Segment-file [`EventLog`]. Cheap to clone? No: share it behind an `Arc`.
pub struct FileLog {
    dir: PathBuf,
    tx: mpsc::Sender<WriterMsg>,
    durable: watch::Receiver<u64>,
    min_free_bytes: u64,
}

impl FileLog {
    /// Opens (and recovers) the log in `config.dir` and starts its writer thread.
    pub async fn open(config: FileLogConfig) -> Result<Self, LogError> {
        let seg_cfg = SegmentConfig {
            segment_bytes: config.segment_bytes,
            ..SegmentConfig::new(config.dir.clone())
        };
        let (log, report) = tokio::task::spawn_blocking(move || SegmentLog::open(seg_cfg))
            .await
            .expect("segment open panicked")?;
        if report.truncated_bytes > 0 {
            tracing::warn!(
                dir = %config.dir.display(),
                truncated_bytes = report.truncated_bytes,
                "traffic log had a torn tail; truncated to the last intact record"
            );
        }
        tracing::info!(
            dir = %config.dir.display(),
            segments = report.segments,
            records = report.entries,
            "traffic log opened"
        );
        let (tx, rx) = mpsc::channel(config.queue_batches);
        let (durable_tx, durable) = watch::channel(log.durable_offset());
        let fsync = config.fsync;
        std::thread::Builder::new()
            .name("cloudtap-log-writer".into())
            .spawn(move || writer_thread(log, rx, durable_tx, fsync))
            .map_err(|source| LogError::Io {
                path: config.dir.clone(),
                source,
            })?;
        Ok(Self {
            dir: config.dir,
            tx,
            durable,
            min_free_bytes: config.min_free_bytes,
        })
    }
}

fn writer_thread(
    mut log: SegmentLog,
    mut rx: mpsc::Receiver<WriterMsg>,
    durable: watch::Sender<u64>,
    fsync: FsyncPolicy,
) {
    let mut group: Vec<AppendReq> = Vec::new();
    let mut retains: Vec<RetainReq> = Vec::new();
    let take = |m: WriterMsg, group: &mut Vec<AppendReq>, retains: &mut Vec<RetainReq>| match m {
        WriterMsg::Append(r) => group.push(r),
        WriterMsg::Retain(r) => retains.push(r),
    };
    while let Some(first) = rx.blocking_recv() {
        take(first, &mut group, &mut retains);
        if let FsyncPolicy::Group { window } = fsync
            && !window.is_zero()
        {
            let deadline = Instant::now() + window;
            while Instant::now() < deadline {
                match rx.try_recv() {
                    Ok(r) => take(r, &mut group, &mut retains),
                    Err(mpsc::error::TryRecvError::Empty) => {
                        std::thread::sleep(Duration::from_micros(100))
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            }
        }
        while let Ok(r) = rx.try_recv() {
            take(r, &mut group, &mut retains);
        }
        for r in retains.drain(..) {
            let cutoff = log.retention_cutoff(r.archived, r.policy.max_age, r.policy.max_bytes);
            let res = log
                .remove_segments_below(cutoff)
                .map(|n| n as u64)
                .map_err(LogError::from);
            if let Ok(n) = &res
                && *n > 0
            {
                tracing::info!(
                    segments = n,
                    below = cutoff,
                    "log retention removed archived segments"
                );
            }
            let _ = r.reply.send(res);
        }
        if group.is_empty() {
            continue;
        }

        // Write every batch of the group, remembering each one's last offset.
        let mut results: Vec<Result<u64, LogError>> = Vec::with_capacity(group.len());
        let mut failed = false;
        for req in &mut group {
            if failed {
                results.push(Err(LogError::Closed));
                continue;
            }
            let refs: Vec<&[u8]> = req.encoded.iter().map(Vec::as_slice).collect();
            match log.append(&refs) {
                Ok(range) => results.push(Ok(range.end.saturating_sub(1))),
                Err(e) => {
                    tracing::error!(error = %e, "traffic log append failed");
                    failed = true;
                    results.push(Err(e.into()));
                }
            }
        }
        let synced = match fsync {
            FsyncPolicy::Never => Ok(log.next_offset()),
            FsyncPolicy::Group { .. } => log.sync().map_err(LogError::from),
        };
        match synced {
            Ok(end) => {
                durable.send_replace(end);
                for (req, res) in group.drain(..).zip(results) {
                    let _ = req.reply.send(res.map(|offset| Position {
                        partition: 0,
                        offset,
                    }));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "traffic log fsync failed");
                let msg = e.to_string();
                for req in group.drain(..) {
                    let _ = req.reply.send(Err(LogError::Io {
                        path: log.dir().to_path_buf(),
                        source: std::io::Error::other(msg.clone()),
                    }));
                }
            }
        }
        if failed {
            // A failed write leaves the segment in an unknown state: stop accepting
            // appends rather than build chains on top of it. Recovery on the next
            // open truncates whatever is torn.
            break;
        }
    }
    if let Err(e) = log.sync() {
        tracing::error!(error = %e, "final traffic log fsync failed");
    }
}

impl FileLog {
    /// Reads durable records on a blocking thread; with `kinds`, records of other kinds
    /// are skipped by their envelope's field number, without being decoded.
    fn subscribe_filtered(
        &self,
        from: Offsets,
        kinds: Option<&'static [&'static str]>,
    ) -> BoxStream<'static, Result<LogEntry, LogError>> {
        let (tx, rx) = mpsc::channel::<Result<LogEntry, LogError>>(1024);
        let dir = self.dir.clone();
        let mut durable = self.durable.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            // Retention may have removed the start; begin at the oldest record kept.
            let mut next = from.get(0).max(first_offset(&dir));
            // One reader for the whole subscription: it keeps its file and position,
            // and is only told how far the durable end has moved.
            let mut reader: Option<SegmentReader> = None;
            loop {
                let end = *durable.borrow_and_update();
                if next < end {
                    let r = match &mut reader {
                        Some(r) => {
                            r.extend_end(end);
                            r
                        }
                        None => match SegmentReader::open(&dir, next, end) {
                            Ok(r) => reader.insert(r),
                            Err(e) => {
                                let _ = tx.blocking_send(Err(e.into()));
                                return;
                            }
                        },
                    };
                    for item in r.by_ref() {
                        if let (Ok((offset, bytes)), Some(kinds)) = (&item, kinds)
                            && !peek_kind(bytes).is_some_and(|k| kinds.contains(&k))
                        {
                            next = offset + 1;
                            continue;
                        }
                        let entry = item.map_err(LogError::from).and_then(|(offset, bytes)| {
                            let position = Position {
                                partition: 0,
                                offset,
                            };
                            decode_record(&bytes)
                                .map(|record| LogEntry { position, record })
                                .map_err(|source| LogError::Decode { position, source })
                        });
                        let stop = entry.is_err();
                        if let Ok(e) = &entry {
                            next = e.position.offset + 1;
                        }
                        if tx.blocking_send(entry).is_err() || stop {
                            return;
                        }
                    }
                    if next < end {
                        // The reader stopped short of the durable end: it failed and
                        // reported why; start over from where it stopped.
                        reader = None;
                    }
                    continue;
                }
                // Caught up: wait for the writer to publish more (or go away).
                let changed = handle.block_on(async {
                    tokio::select! {
                        r = durable.changed() => r.is_ok(),
                        _ = tx.closed() => false,
                    }
                });
                if !changed {
                    return;
                }
            }
        });
        tokio_stream_from(rx)
    }
}

impl EventLog for FileLog {
    fn append(&self, batch: Vec<Record>) -> BoxFuture<'_, Result<Position, LogError>> {
        async move {
            if batch.is_empty() {
                return Ok(Position {
                    partition: 0,
                    offset: self.durable.borrow().saturating_sub(1),
                });
            }
            let (reply, rx) = oneshot::channel();
            self.tx
                .send(WriterMsg::Append(AppendReq {
                    encoded: batch.into_iter().map(encode_record_owned).collect(),
                    reply,
                }))
                .await
                .map_err(|_| LogError::Closed)?;
            rx.await.map_err(|_| LogError::Closed)?
        }
        .boxed()
    }

    fn subscribe(&self, from: Offsets) -> BoxStream<'static, Result<LogEntry, LogError>> {
        self.subscribe_filtered(from, None)
    }

    fn subscribe_kinds(
        &self,
        from: Offsets,
        kinds: &'static [&'static str],
    ) -> BoxStream<'static, Result<LogEntry, LogError>> {
        self.subscribe_filtered(from, Some(kinds))
    }

    fn end(&self) -> BoxFuture<'_, Result<Offsets, LogError>> {
        futures::future::ready(Ok(Offsets([(0, *self.durable.borrow())].into()))).boxed()
    }

    fn read_chain(&self, chain_id: uuid::Uuid) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        let dir = self.dir.clone();
        let end = *self.durable.borrow();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                for item in SegmentReader::open(&dir, first_offset(&dir), end)? {
                    let (offset, bytes) = item?;
                    let record = decode_record(&bytes).map_err(|source| LogError::Decode {
                        position: Position {
                            partition: 0,
                            offset,
                        },
                        source,
                    })?;
                    if record.chain_id == chain_id {
                        out.push(record);
                    }
                }
                out.sort_by_key(|r: &Record| r.seq);
                out.dedup_by_key(|r| r.seq);
                Ok(out)
            })
            .await
            .expect("read_chain panicked")
        }
        .boxed()
    }

    fn describe(&self) -> String {
        format!("file://{}", self.dir.display())
    }

    fn disk_low(&self) -> Option<String> {
        let st = rustix::fs::statvfs(&self.dir).ok()?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        (free < self.min_free_bytes).then(|| {
            format!(
                "the traffic log's disk has {} MiB free, below the {} MiB minimum (log_min_free_mb)",
                free / (1024 * 1024),
                self.min_free_bytes / (1024 * 1024)
            )
        })
    }

    fn health(&self) -> Option<String> {
        self.disk_low()
    }

    fn retain(
        &self,
        archived: &Offsets,
        policy: crate::Retention,
    ) -> BoxFuture<'_, Result<u64, LogError>> {
        let archived = archived.get(0);
        async move {
            let (reply, rx) = oneshot::channel();
            self.tx
                .send(WriterMsg::Retain(RetainReq {
                    archived,
                    policy,
                    reply,
                }))
                .await
                .map_err(|_| LogError::Closed)?;
            rx.await.map_err(|_| LogError::Closed)?
        }
        .boxed()
    }
}

/// The first offset still on disk (segment files are named by their first offset).
fn first_offset(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".log")?.parse::<u64>().ok()
        })
        .min()
        .unwrap_or(0)
}

fn tokio_stream_from<T: Send + 'static>(rx: mpsc::Receiver<T>) -> BoxStream<'static, T> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) }).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudtap_schemas::{Audit, Body, ChainWriter};
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let dirs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let d2 = dirs.clone();
        crate::conformance::run_all(move || {
            let dirs = d2.clone();
            async move {
                let dir = tempfile::tempdir().unwrap();
                let log = FileLog::open(FileLogConfig::new(dir.path())).await.unwrap();
                dirs.lock().unwrap().push(dir);
                Arc::new(log)
            }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_keeps_everything_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = cloudtap_schemas::ChainWriter::new(uuid::Uuid::now_v7());
        let recs: Vec<Record> = (0..50)
            .map(|i| {
                w.seal_now(cloudtap_schemas::Body::Audit(cloudtap_schemas::Audit {
                    actor: "t".into(),
                    action: format!("a{i}"),
                    detail: String::new(),
                }))
            })
            .collect();
        {
            let log = FileLog::open(FileLogConfig::new(dir.path())).await.unwrap();
            let pos = log.append(recs.clone()).await.unwrap();
            assert_eq!(pos.offset, 49);
        }
        let log = FileLog::open(FileLogConfig::new(dir.path())).await.unwrap();
        assert_eq!(log.end().await.unwrap().get(0), 50);
        assert_eq!(log.read_chain(w.chain_id()).await.unwrap(), recs);
    }

    #[tokio::test]
    async fn retention_removes_only_archived_segments_past_the_policy() {
        use crate::{Offsets, Retention};
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = FileLogConfig::new(dir.path());
        cfg.segment_bytes = 4096; // many small segments
        let log = FileLog::open(cfg).await.unwrap();
        let mut w = ChainWriter::new(uuid::Uuid::now_v7());
        for i in 0..400 {
            log.append(vec![w.seal_now(Body::Audit(Audit {
                actor: "t".into(),
                action: format!("a{i}"),
                detail: "x".repeat(64),
            }))])
            .await
            .unwrap();
        }
        let segments = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "log")
                })
                .count()
        };
        let before = segments();
        assert!(before > 5);
        let archived = |n: u64| Offsets([(0, n)].into());
        // No policy reason: nothing goes, archived or not.
        assert_eq!(
            log.retain(&archived(400), Retention::default())
                .await
                .unwrap(),
            0
        );
        // A size bound of 0 would remove everything, but only what is archived may go.
        let size_zero = Retention {
            max_age: None,
            max_bytes: Some(0),
        };
        let removed = log.retain(&archived(150), size_zero).await.unwrap();
        assert!(removed > 0);
        assert_eq!(segments(), before - removed as usize);
        // Everything not archived is still there, and reads start at the new oldest.
        let all: Vec<Record> = crate::read_to(&log, log.end().await.unwrap())
            .map(|e| e.unwrap().record)
            .collect()
            .await;
        let first = all.first().unwrap().seq;
        assert!(first <= 150 && first > 0, "oldest kept seq {first}");
        assert_eq!(all.last().unwrap().seq, 399);
        // An age bound removes archived segments older than it.
        let age = Retention {
            max_age: Some(Duration::ZERO),
            max_bytes: None,
        };
        log.retain(&archived(400), age).await.unwrap();
        assert!(
            segments() <= 2,
            "only the active segment (and maybe one) stays"
        );
    }
}
