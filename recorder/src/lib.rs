//! Everything that writes cloudtap's traffic down.
//!
//! The [`EventLog`] trait is the one way records reach the traffic log. Backends:
//!
//! - [`FileLog`] — append-only segment files on local disk (the embedded default),
//!   built on the synchronous [`segment`] store with a group-commit writer thread;
//! - [`MemoryLog`] — in memory, for unit tests of other modules;
//! - Kafka — arrives with the "log at scale" issue; asking for it today is a clear error.
//!
//! Both backends here pass the same conformance suite (`conformance.rs`).

use std::fmt;
use std::path::PathBuf;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

use cloudtap_schemas::Record;

#[cfg(test)]
mod conformance;
mod file;
mod memory;
pub mod segment;

pub use file::{FileLog, FileLogConfig, FsyncPolicy};
pub use memory::MemoryLog;

/// Position of a record in the log: a partition (always 0 for the local log) and an
/// offset within it. Offsets are gap-free per partition.
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
    /// An empty batch resolves with the current end.
    fn append(&self, batch: Vec<Record>) -> BoxFuture<'_, Result<Position, LogError>>;

    /// Every record from `from` on (inclusive), in order; waits for new records at the end.
    fn subscribe(&self, from: Position) -> BoxStream<'static, Result<LogEntry, LogError>>;

    /// Like [`subscribe`](Self::subscribe), but yields only records of the given kinds
    /// (`"control"`, `"session_opened"`, …). Backends that can tell a record's kind
    /// without decoding it skip the others cheaply; the default filters after decoding.
    fn subscribe_kinds(
        &self,
        from: Position,
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

    /// The position the next record will get (the end of the durable log).
    fn end(&self) -> Position;

    /// All records of one chain currently in the log, in seq order.
    fn read_chain(&self, chain_id: uuid::Uuid) -> BoxFuture<'_, Result<Vec<Record>, LogError>>;

    /// Human-readable description for logs and `/healthz` (never includes secrets).
    fn describe(&self) -> String;
}

/// Opens the log named by a URL: `file:///path` or a plain path (segment files),
/// `memory://` (tests), `kafka://host:port` (not yet part of this build).
pub async fn open_log(
    url: &str,
    fsync: FsyncPolicy,
) -> Result<std::sync::Arc<dyn EventLog>, LogError> {
    if url == "memory://" {
        return Ok(std::sync::Arc::new(MemoryLog::new()));
    }
    if url.starts_with("kafka://") {
        return Err(LogError::UnsupportedUrl {
            url: url.into(),
            reason: "the Kafka backend is not in this build yet; use file:///path (the default)"
                .into(),
        });
    }
    let path = match url.strip_prefix("file://") {
        Some(p) => p,
        None if url.contains("://") => {
            return Err(LogError::UnsupportedUrl {
                url: url.into(),
                reason: "expected file:///path or a directory path".into(),
            });
        }
        None => url,
    };
    let mut cfg = FileLogConfig::new(path);
    cfg.fsync = fsync;
    Ok(std::sync::Arc::new(FileLog::open(cfg).await?))
}
