//! Everything that writes cloudtap's traffic down.
//!
//! The [`EventLog`] trait is the one way records reach the traffic log. Backends:
//!
//! - [`FileLog`] — append-only segment files on local disk (the embedded default),
//!   built on the synchronous [`segment`] store with a group-commit writer thread;
//! - [`MemoryLog`] — in memory, for unit tests of other modules;
//! - [`KafkaLog`] — a Kafka topic through rdkafka, for fleets of edges.
//!
//! All three pass the same conformance suite (`conformance.rs`; Kafka's against the
//! real broker, in `kafka.rs`'s tests).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

use cloudtap_schemas::Record;

pub mod archive;
#[cfg(test)]
mod conformance;
mod file;
pub mod kafka;
mod memory;
pub mod segment;
pub mod store;
#[doc(hidden)]
pub mod testenv;

pub use file::{FileLog, FileLogConfig, FsyncPolicy};
pub use kafka::{KafkaLog, KafkaLogConfig};
pub use memory::MemoryLog;

/// Position of a record in the log: a partition (always 0 for the local log) and an
/// offset within it. Offsets grow within a partition; the local log's are gap-free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub partition: u32,
    pub offset: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.partition, self.offset)
    }
}

/// Where a reader stands: the next offset to read in each partition. A partition not
/// listed starts at 0 (its beginning).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offsets(pub BTreeMap<u32, u64>);

impl Offsets {
    /// The next offset to read in `partition`.
    pub fn get(&self, partition: u32) -> u64 {
        self.0.get(&partition).copied().unwrap_or(0)
    }

    /// Moves past `position` (never backwards).
    pub fn advance(&mut self, position: Position) {
        let next = self.0.entry(position.partition).or_insert(0);
        *next = (*next).max(position.offset + 1);
    }

    /// Whether `position` lies before these offsets (already read).
    pub fn covers(&self, position: Position) -> bool {
        position.offset < self.get(position.partition)
    }

    /// Sum over partitions: the number of records before these offsets when every
    /// partition starts at 0 and has no gaps (the local log).
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

impl fmt::Display for Offsets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(p, o)| format!("{p}:{o}")).collect();
        write!(f, "[{}]", parts.join(" "))
    }
}

/// A record read back from the log, with where it sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub position: Position,
    pub record: Record,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    #[error(
        "traffic log I/O failed at {path}: {source}; check the disk and the data dir's permissions"
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Segment(#[from] segment::SegmentError),
    #[error("traffic log record at {position} is unreadable: {source}")]
    Decode {
        position: Position,
        #[source]
        source: cloudtap_schemas::SchemaError,
    },
    #[error("the traffic log is closed (the edge is shutting down)")]
    Closed,
    #[error(
        "Kafka: {what} failed: {source}; check that the brokers are reachable and the log URL's properties"
    )]
    Kafka {
        what: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("log URL {url:?} is not supported: {reason}")]
    UnsupportedUrl { url: String, reason: String },
    #[error(
        "position {requested} is no longer in the log (retention removed it); the oldest is {oldest}"
    )]
    Truncated {
        requested: Position,
        oldest: Position,
    },
}

/// The append-only traffic log.
///
/// Guarantees every backend gives (checked by the conformance suite):
///
/// - **Order:** records of one `append` call, and of successive calls from one task,
///   are stored in the order given; each gets the next position of its partition.
/// - **Durability:** the future of `append` resolves only once every record of the
///   batch is durable under the backend's policy (for [`FileLog`]: written and, unless
///   `FsyncPolicy::Never`, fsynced); a resolved position is never lost by a process
///   crash. An error means none, some or all of the batch may be stored; the caller
///   must treat its chains as broken from there on.
/// - **Integrity:** a reader never sees a partially written or corrupt record.
/// - **Readers:** `subscribe` yields every durable record from a position on, in order,
///   then waits for new ones; `read_chain` returns one chain's records in seq order.
pub trait EventLog: Send + Sync + 'static {
    /// Appends a batch and resolves with the position of its last record once durable.
    /// An empty batch stores nothing and resolves at once.
    fn append(&self, batch: Vec<Record>) -> BoxFuture<'_, Result<Position, LogError>>;

    /// Every record at or after `from` in every partition, in order within a partition;
    /// waits for new records at the end.
    fn subscribe(&self, from: Offsets) -> BoxStream<'static, Result<LogEntry, LogError>>;

    /// Like [`subscribe`](Self::subscribe), but yields only records of the given kinds
    /// (`"control"`, `"session_opened"`, …). Backends that can tell a record's kind
    /// without decoding it skip the others cheaply; the default filters after decoding.
    fn subscribe_kinds(
        &self,
        from: Offsets,
        kinds: &'static [&'static str],
    ) -> BoxStream<'static, Result<LogEntry, LogError>> {
        use futures::StreamExt;
        self.subscribe(from)
            .filter(move |e| {
                let keep = e
                    .as_ref()
                    .map_or(true, |e| kinds.contains(&e.record.kind()));
                futures::future::ready(keep)
            })
            .boxed()
    }

    /// The end of the durable log: per partition, the offset the next record will get.
    fn end(&self) -> BoxFuture<'_, Result<Offsets, LogError>>;

    /// All records of one chain currently in the log, in seq order.
    fn read_chain(&self, chain_id: uuid::Uuid) -> BoxFuture<'_, Result<Vec<Record>, LogError>>;

    /// Human-readable description for logs and `/healthz` (never includes secrets).
    fn describe(&self) -> String;

    /// `None` while the log accepts appends normally; otherwise why it is degraded
    /// (for `/healthz` and the CLI). Appends still queue while degraded.
    fn health(&self) -> Option<String> {
        None
    }

    /// Why the log's disk is too full to take new sessions, if it is (local log only).
    fn disk_low(&self) -> Option<String> {
        None
    }

    /// Removes records that are both archived (before `archived`) and past `policy`;
    /// returns how many segments went. Backends whose storage has its own retention
    /// (Kafka's topic settings) do nothing.
    fn retain(
        &self,
        _archived: &Offsets,
        _policy: Retention,
    ) -> BoxFuture<'_, Result<u64, LogError>> {
        use futures::FutureExt;
        futures::future::ready(Ok(0)).boxed()
    }

    /// A reader that shares partitions with the other members of consumer group
    /// `group`, when the backend has groups (Kafka); `None` otherwise, and the caller
    /// reads every partition itself with [`SoloReader`].
    fn group_reader(&self, _group: &str) -> Option<Result<Box<dyn PartitionReader>, LogError>> {
        None
    }
}

/// Retention of the local log: archived records go once older than `max_age` or
/// while the log is larger than `max_bytes`; records not yet archived never do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Option<std::time::Duration>,
    pub max_bytes: Option<u64>,
}

/// What a [`PartitionReader`] yields.
#[derive(Debug)]
pub enum ReaderEvent {
    /// These partitions are now this reader's; records of them follow.
    Assigned(Vec<u32>),
    /// These partitions went to another member; stop working on them.
    Revoked(Vec<u32>),
    Entry(Box<LogEntry>),
}

/// Reads partitions that may be assigned and revoked (a consumer group member), with
/// the offsets it works from chosen by its user: `seek` after `Assigned`.
pub trait PartitionReader: Send {
    fn next(&mut self) -> BoxFuture<'_, Result<ReaderEvent, LogError>>;
    /// Continue `partition` from `offset`.
    fn seek(&mut self, partition: u32, offset: u64) -> BoxFuture<'_, Result<(), LogError>>;
    /// Records how far `partition` has been processed (a hint for the next member).
    fn commit(&mut self, partition: u32, next_offset: u64) -> BoxFuture<'_, Result<(), LogError>>;
}

/// A [`PartitionReader`] that owns every partition of a log, for backends without
/// consumer groups and for one-shot drains.
pub struct SoloReader {
    log: std::sync::Arc<dyn EventLog>,
    from: Offsets,
    announce: Option<Vec<u32>>,
    sub: Option<BoxStream<'static, Result<LogEntry, LogError>>>,
}

impl SoloReader {
    /// Reads every partition that `log.end()` reports.
    pub async fn new(log: std::sync::Arc<dyn EventLog>) -> Result<Self, LogError> {
        let parts = log.end().await?.0.into_keys().collect::<Vec<_>>();
        Ok(Self {
            log,
            from: Offsets::default(),
            announce: Some(parts),
            sub: None,
        })
    }
}

impl PartitionReader for SoloReader {
    fn next(&mut self) -> BoxFuture<'_, Result<ReaderEvent, LogError>> {
        use futures::{FutureExt, StreamExt};
        async move {
            if let Some(parts) = self.announce.take() {
                return Ok(ReaderEvent::Assigned(parts));
            }
            let from = self.from.clone();
            let log = self.log.clone();
            let sub = self.sub.get_or_insert_with(|| log.subscribe(from));
            match sub.next().await {
                Some(Ok(e)) => {
                    self.from.advance(e.position);
                    Ok(ReaderEvent::Entry(Box::new(e)))
                }
                Some(Err(e)) => {
                    self.sub = None;
                    Err(e)
                }
                None => Err(LogError::Closed),
            }
        }
        .boxed()
    }

    fn seek(&mut self, partition: u32, offset: u64) -> BoxFuture<'_, Result<(), LogError>> {
        use futures::FutureExt;
        self.from.0.insert(partition, offset);
        self.sub = None;
        futures::future::ready(Ok(())).boxed()
    }

    fn commit(&mut self, _: u32, _: u64) -> BoxFuture<'_, Result<(), LogError>> {
        use futures::FutureExt;
        futures::future::ready(Ok(())).boxed()
    }
}

/// Every record before `end` (typically a recent [`EventLog::end`]), in order within
/// each partition; the stream finishes once every partition has reached its end.
pub fn read_to(log: &dyn EventLog, end: Offsets) -> BoxStream<'static, Result<LogEntry, LogError>> {
    use futures::StreamExt;
    let pending: BTreeMap<u32, u64> = end.0.into_iter().filter(|(_, o)| *o > 0).collect();
    let sub = log.subscribe(Offsets::default());
    futures::stream::unfold((sub, pending), |(mut sub, mut pending)| async move {
        loop {
            if pending.is_empty() {
                return None;
            }
            let entry = match sub.next().await? {
                Ok(e) => e,
                Err(e) => return Some((Err(e), (sub, pending))),
            };
            let p = entry.position.partition;
            let Some(&end) = pending.get(&p) else {
                continue; // a partition already read to its end
            };
            if entry.position.offset >= end {
                pending.remove(&p);
                continue;
            }
            if entry.position.offset + 1 >= end {
                pending.remove(&p);
            }
            return Some((Ok(entry), (sub, pending)));
        }
    })
    .boxed()
}

/// Opens the log named by a URL: `file:///path` or a plain path (segment files),
/// `memory://` (tests), `kafka://host:port[/topic][?options]` (see [`KafkaLogConfig::from_url`]).
pub async fn open_log(
    url: &str,
    fsync: FsyncPolicy,
    min_free_bytes: u64,
) -> Result<std::sync::Arc<dyn EventLog>, LogError> {
    if url == "memory://" {
        return Ok(std::sync::Arc::new(MemoryLog::new()));
    }
    if url.starts_with("kafka://") {
        let cfg = KafkaLogConfig::from_url(url)?;
        return Ok(std::sync::Arc::new(KafkaLog::open(cfg).await?));
    }
    let path = match url.strip_prefix("file://") {
        Some(p) => p,
        None if url.contains("://") => {
            return Err(LogError::UnsupportedUrl {
                // The query string may carry credentials: never echoed.
                url: url
                    .split_once('?')
                    .map_or(url.to_owned(), |(h, _)| format!("{h}?…")),
                reason: "expected file:///path, a directory path or kafka://host:port".into(),
            });
        }
        None => url,
    };
    let mut cfg = FileLogConfig::new(path);
    cfg.fsync = fsync;
    cfg.min_free_bytes = min_free_bytes;
    Ok(std::sync::Arc::new(FileLog::open(cfg).await?))
}
