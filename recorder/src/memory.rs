//! In-memory [`EventLog`] for unit tests of other modules. Same semantics as the file
//! log, nothing on disk.

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;

use cloudtap_schemas::Record;

use crate::{EventLog, LogEntry, LogError, Offsets, Position};

#[derive(Clone)]
pub struct MemoryLog {
    records: Arc<Mutex<Vec<Record>>>,
    end: watch::Sender<u64>,
}

impl Default for MemoryLog {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryLog {
    pub fn new() -> Self {
        Self {
            records: Arc::default(),
            end: watch::Sender::new(0),
        }
    }

    /// A copy of everything appended so far.
    pub fn snapshot(&self) -> Vec<Record> {
        self.records.lock().expect("memory log poisoned").clone()
    }
}

impl EventLog for MemoryLog {
    fn append(&self, batch: Vec<Record>) -> BoxFuture<'_, Result<Position, LogError>> {
        let mut recs = self.records.lock().expect("memory log poisoned");
        recs.extend(batch);
        let end = recs.len() as u64;
        drop(recs);
        self.end.send_replace(end);
        futures::future::ready(Ok(Position {
            partition: 0,
            offset: end.saturating_sub(1),
        }))
        .boxed()
    }

    fn subscribe(&self, from: Offsets) -> BoxStream<'static, Result<LogEntry, LogError>> {
        let records = self.records.clone();
        let end = self.end.subscribe();
        futures::stream::unfold((from.get(0), end), move |(next, mut end)| {
            let records = records.clone();
            async move {
                loop {
                    if let Some(r) = records
                        .lock()
                        .expect("memory log poisoned")
                        .get(next as usize)
                    {
                        let entry = LogEntry {
                            position: Position {
                                partition: 0,
                                offset: next,
                            },
                            record: r.clone(),
                        };
                        return Some((Ok(entry), (next + 1, end)));
                    }
                    if end.changed().await.is_err() {
                        return None;
                    }
                }
            }
        })
        .boxed()
    }

    fn end(&self) -> BoxFuture<'_, Result<Offsets, LogError>> {
        futures::future::ready(Ok(Offsets([(0, *self.end.borrow())].into()))).boxed()
    }

    fn read_chain(&self, chain_id: uuid::Uuid) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        let mut out: Vec<Record> = self
            .snapshot()
            .into_iter()
            .filter(|r| r.chain_id == chain_id)
            .collect();
        out.sort_by_key(|r| r.seq);
        out.dedup_by_key(|r| r.seq);
        futures::future::ready(Ok(out)).boxed()
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn conformance() {
        crate::conformance::run_all(|| async { std::sync::Arc::new(super::MemoryLog::new()) })
            .await;
    }
}
