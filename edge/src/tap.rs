//! The tap: the one path from the edge's data plane to the traffic log.
//!
//! Forwarders and the control plane hand record *bodies* to a bounded channel
//! ([`Tap`], bound = `limits.tap_capacity` messages). A single appender task owns
//! every chain writer of this edge, so it alone assigns `seq` and hashes — in
//! channel order, which is each chain's order. It takes whatever is waiting, seals it,
//! appends it as one batch (the log group-commits), then acknowledges `strict`
//! senders and publishes lifecycle events to live watchers.
//!
//! Backpressure, per route (DESIGN): `block` waits for room in the channel; `drop`
//! never waits — a record that finds the channel full is counted in the session's
//! [`GapCounter`] and the appender writes one gap record before the session's next
//! record; `strict` also waits for the record to be durable before the chunk is
//! forwarded. Because the appender seals, a dropped body never consumed a seq, so
//! chains stay gap-free.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::{broadcast, mpsc, oneshot};
use uuid::Uuid;

use cloudtap_recorder::EventLog;
use cloudtap_schemas::{Body, ChainWriter, Gap, Record, now_unix_nanos};

use crate::config::Backpressure;

/// Counts records a `drop` route could not log.
#[derive(Debug, Default)]
pub struct GapCounter {
    records: AtomicU64,
    bytes: AtomicU64,
}

impl GapCounter {
    fn take(&self) -> (u64, u64) {
        (
            self.records.swap(0, Ordering::AcqRel),
            self.bytes.swap(0, Ordering::AcqRel),
        )
    }
}

enum TapMsg {
    /// Start (or, with `resume`, continue) a chain owned by this edge.
    Open {
        chain: Uuid,
        resume: Option<Box<Record>>,
        gaps: Arc<GapCounter>,
        meta: ChainMeta,
    },
    Record {
        chain: Uuid,
        ts: i64,
        body: Body,
        ack: Option<oneshot::Sender<Result<(), String>>>,
    },
    /// Forget the chain after its last record.
    Close { chain: Uuid },
    /// Resolves once everything sent before it is durable.
    Flush(oneshot::Sender<Result<(), String>>),
}

/// What live events say about a chain.
#[derive(Debug, Clone, Default)]
pub struct ChainMeta {
    pub session_id: Option<Uuid>,
    pub target: String,
    pub identity: String,
}

/// A durable record as live watchers see it.
#[derive(Debug, Clone)]
pub struct LiveRecord {
    pub record: Record,
    pub meta: ChainMeta,
}

/// Health of the log as the tap sees it.
#[derive(Debug, Default)]
pub struct TapStats {
    pub appended: AtomicU64,
    pub batches: AtomicU64,
    pub dropped: AtomicU64,
    pub failed: AtomicBool,
}

/// Sending side of the tap; cheap to clone.
#[derive(Clone)]
pub struct Tap {
    tx: mpsc::Sender<TapMsg>,
    live: broadcast::Sender<Arc<LiveRecord>>,
    pub stats: Arc<TapStats>,
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("the traffic log is not accepting records ({0}); the edge cannot record this traffic")]
    Log(String),
    #[error("the edge is shutting down")]
    Closed,
}

impl Tap {
    /// Starts the appender task over `log`.
    pub fn start(log: Arc<dyn EventLog>, capacity: usize) -> (Tap, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity);
        let (live, _) = broadcast::channel(4096);
        let stats = Arc::new(TapStats::default());
        let task = tokio::spawn(appender(log, rx, live.clone(), stats.clone(), capacity));
        (Tap { tx, live, stats }, task)
    }

    pub fn subscribe_live(&self) -> broadcast::Receiver<Arc<LiveRecord>> {
        self.live.subscribe()
    }

    pub async fn open_chain(
        &self,
        chain: Uuid,
        resume: Option<Record>,
        gaps: Arc<GapCounter>,
        meta: ChainMeta,
    ) -> Result<(), TapError> {
        self.tx
            .send(TapMsg::Open {
                chain,
                resume: resume.map(Box::new),
                gaps,
                meta,
            })
            .await
            .map_err(|_| TapError::Closed)
    }

    pub async fn close_chain(&self, chain: Uuid) -> Result<(), TapError> {
        self.tx
            .send(TapMsg::Close { chain })
            .await
            .map_err(|_| TapError::Closed)
    }

    /// Appends a body to `chain` under `mode`. Returns once the mode's promise holds:
    /// queued (`block`), queued or counted as dropped (`drop`), durable (`strict`).
    pub async fn record(
        &self,
        chain: Uuid,
        body: Body,
        mode: Backpressure,
        gaps: &GapCounter,
    ) -> Result<(), TapError> {
        // Once an append failed, nothing more can be recorded faithfully (the chains
        // may have holes): every mode refuses, so forwarding stops instead of carrying
        // traffic that is not captured.
        if self.stats.failed.load(Ordering::Acquire) {
            return Err(TapError::Log("an earlier append failed".into()));
        }
        let ts = now_unix_nanos();
        match mode {
            Backpressure::Block => self
                .tx
                .send(TapMsg::Record {
                    chain,
                    ts,
                    body,
                    ack: None,
                })
                .await
                .map_err(|_| TapError::Closed),
            Backpressure::Drop => {
                let bytes = match &body {
                    Body::Frame(f) => f.length as u64,
                    _ => 0,
                };
                match self.tx.try_send(TapMsg::Record {
                    chain,
                    ts,
                    body,
                    ack: None,
                }) {
                    Ok(()) => Ok(()),
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        gaps.records.fetch_add(1, Ordering::AcqRel);
                        gaps.bytes.fetch_add(bytes, Ordering::AcqRel);
                        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => Err(TapError::Closed),
                }
            }
            Backpressure::Strict => {
                let (ack, done) = oneshot::channel();
                self.tx
                    .send(TapMsg::Record {
                        chain,
                        ts,
                        body,
                        ack: Some(ack),
                    })
                    .await
                    .map_err(|_| TapError::Closed)?;
                done.await
                    .map_err(|_| TapError::Closed)?
                    .map_err(TapError::Log)
            }
        }
    }

    /// Waits until everything sent so far is durable.
    pub async fn flush(&self) -> Result<(), TapError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(TapMsg::Flush(tx))
            .await
            .map_err(|_| TapError::Closed)?;
        rx.await
            .map_err(|_| TapError::Closed)?
            .map_err(TapError::Log)
    }
}

struct ChainState {
    writer: ChainWriter,
    gaps: Arc<GapCounter>,
    meta: ChainMeta,
}

/// Upper bound on one batch, so a flood cannot build an unbounded batch.
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

async fn appender(
    log: Arc<dyn EventLog>,
    mut rx: mpsc::Receiver<TapMsg>,
    live: broadcast::Sender<Arc<LiveRecord>>,
    stats: Arc<TapStats>,
    capacity: usize,
) {
    let mut chains: HashMap<Uuid, ChainState> = HashMap::new();
    let mut msgs = Vec::with_capacity(capacity);
    loop {
        if msgs.is_empty() {
            if rx.recv_many(&mut msgs, capacity).await == 0 {
                break;
            }
        } else {
            // Leftovers of a cut batch come first; top up without waiting.
            while msgs.len() < capacity {
                match rx.try_recv() {
                    Ok(m) => msgs.push(m),
                    Err(_) => break,
                }
            }
        }
        let mut batch: Vec<Record> = Vec::with_capacity(msgs.len());
        let mut metas: Vec<ChainMeta> = Vec::with_capacity(msgs.len());
        let mut acks = Vec::new();
        let mut bytes = 0usize;
        let mut incoming = std::mem::take(&mut msgs);
        let mut pending = incoming.drain(..);
        for msg in pending.by_ref() {
            match msg {
                TapMsg::Open {
                    chain,
                    resume,
                    gaps,
                    meta,
                } => {
                    let writer = match resume {
                        Some(last) => ChainWriter::resume(&last),
                        None => ChainWriter::new(chain),
                    };
                    chains.insert(chain, ChainState { writer, gaps, meta });
                }
                TapMsg::Record {
                    chain,
                    ts,
                    body,
                    ack,
                } => {
                    let Some(state) = chains.get_mut(&chain) else {
                        tracing::error!(chain_id = %chain, "record for a chain the tap does not own; dropped");
                        continue;
                    };
                    let (dropped, dropped_bytes) = state.gaps.take();
                    if dropped > 0 {
                        batch.push(state.writer.seal(
                            ts,
                            Body::Gap(Gap {
                                dropped_records: dropped,
                                dropped_bytes,
                                reason: "tap buffer full (on_log_backpressure = drop)".into(),
                            }),
                        ));
                        metas.push(state.meta.clone());
                    }
                    if let Body::Frame(f) = &body {
                        bytes += f.length as usize;
                    }
                    let closes = matches!(body, Body::SessionClosed(_));
                    batch.push(state.writer.seal(ts, body));
                    metas.push(state.meta.clone());
                    if closes {
                        // Nothing may follow a session's last record: a late stream
                        // record is dropped (and logged) rather than sealed after it.
                        chains.remove(&chain);
                    }
                    if let Some(a) = ack {
                        acks.push(a);
                    }
                }
                TapMsg::Close { chain } => {
                    chains.remove(&chain);
                }
                TapMsg::Flush(a) => acks.push(a),
            }
            if bytes >= MAX_BATCH_BYTES {
                break;
            }
        }
        // Whatever did not fit goes first into the next round, in order.
        msgs.extend(pending);
        drop(incoming);
        let n = batch.len() as u64;
        let live_records: Vec<LiveRecord> = if live.receiver_count() > 0 {
            batch
                .iter()
                .zip(metas)
                .map(|(r, meta)| LiveRecord {
                    record: live_view(r),
                    meta,
                })
                .collect()
        } else {
            Vec::new()
        };
        let result = log.append(batch).await;
        match &result {
            Ok(_) => {
                stats.appended.fetch_add(n, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                for r in live_records {
                    let _ = live.send(Arc::new(r));
                }
            }
            Err(e) => {
                stats.failed.store(true, Ordering::Release);
                tracing::error!(error = %e, records = n, "traffic log append failed");
            }
        }
        let outcome = result.map(|_| ()).map_err(|e| e.to_string());
        for a in acks {
            let _ = a.send(outcome.clone());
        }
    }
}

/// Live watchers get frames without payloads (sizes are what a tail shows).
fn live_view(r: &Record) -> Record {
    r.without_payload()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudtap_recorder::MemoryLog;
    use cloudtap_schemas::{Direction, Frame, verify_chain};

    fn frame(i: u64) -> Body {
        Body::Frame(Frame {
            stream_id: 1,
            direction: Direction::Up,
            offset: i,
            length: 1,
            payload: Some(vec![i as u8]),
        })
    }

    /// A log whose appends always fail (a dead disk).
    struct FailingLog;

    impl EventLog for FailingLog {
        fn append(
            &self,
            _: Vec<Record>,
        ) -> futures::future::BoxFuture<
            '_,
            Result<cloudtap_recorder::Position, cloudtap_recorder::LogError>,
        > {
            Box::pin(async { Err(cloudtap_recorder::LogError::Closed) })
        }
        fn subscribe(
            &self,
            _: cloudtap_recorder::Offsets,
        ) -> futures::stream::BoxStream<
            'static,
            Result<cloudtap_recorder::LogEntry, cloudtap_recorder::LogError>,
        > {
            Box::pin(futures::stream::empty())
        }
        fn end(
            &self,
        ) -> futures::future::BoxFuture<
            '_,
            Result<cloudtap_recorder::Offsets, cloudtap_recorder::LogError>,
        > {
            Box::pin(async { Ok(Default::default()) })
        }
        fn read_chain(
            &self,
            _: Uuid,
        ) -> futures::future::BoxFuture<'_, Result<Vec<Record>, cloudtap_recorder::LogError>>
        {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn describe(&self) -> String {
            "failing".into()
        }
    }

    #[tokio::test]
    async fn after_a_failed_append_every_mode_refuses() {
        let (tap, _task) = Tap::start(Arc::new(FailingLog), 8);
        let chain = Uuid::now_v7();
        let gaps = Arc::new(GapCounter::default());
        tap.open_chain(chain, None, gaps.clone(), ChainMeta::default())
            .await
            .unwrap();
        assert!(
            tap.record(chain, frame(0), Backpressure::Strict, &gaps)
                .await
                .is_err()
        );
        for mode in [
            Backpressure::Block,
            Backpressure::Drop,
            Backpressure::Strict,
        ] {
            assert!(
                matches!(
                    tap.record(chain, frame(1), mode, &gaps).await,
                    Err(TapError::Log(_))
                ),
                "{mode:?}"
            );
        }
    }

    #[tokio::test]
    async fn seals_in_order_and_flushes() {
        let log = Arc::new(MemoryLog::new());
        let (tap, _task) = Tap::start(log.clone(), 8);
        let chain = Uuid::now_v7();
        let gaps = Arc::new(GapCounter::default());
        tap.open_chain(chain, None, gaps.clone(), ChainMeta::default())
            .await
            .unwrap();
        for i in 0..100 {
            tap.record(chain, frame(i), Backpressure::Block, &gaps)
                .await
                .unwrap();
        }
        tap.record(chain, frame(100), Backpressure::Strict, &gaps)
            .await
            .unwrap();
        let recs = log.snapshot();
        assert_eq!(
            recs.len(),
            101,
            "strict returns only after the record is in the log"
        );
        assert_eq!(verify_chain(None, &recs).unwrap(), 101);
    }

    #[tokio::test]
    async fn dropped_records_become_one_gap_record_and_seq_stays_gap_free() {
        let log = Arc::new(MemoryLog::new());
        let (tap, _task) = Tap::start(log.clone(), 1);
        let chain = Uuid::now_v7();
        let gaps = Arc::new(GapCounter::default());
        tap.open_chain(chain, None, gaps.clone(), ChainMeta::default())
            .await
            .unwrap();
        // The channel holds one message; the appender cannot run on this
        // current-thread runtime until we yield, so the rest are dropped.
        for i in 0..10 {
            tap.record(chain, frame(i), Backpressure::Drop, &gaps)
                .await
                .unwrap();
        }
        tap.record(chain, frame(10), Backpressure::Strict, &gaps)
            .await
            .unwrap();
        let recs = log.snapshot();
        verify_chain(None, &recs).unwrap();
        let gap: Vec<_> = recs
            .iter()
            .filter_map(|r| match &r.body {
                Body::Gap(g) => Some(g.clone()),
                _ => None,
            })
            .collect();
        let frames = recs
            .iter()
            .filter(|r| matches!(r.body, Body::Frame(_)))
            .count() as u64;
        assert_eq!(gap.len(), 1);
        assert_eq!(frames + gap[0].dropped_records, 11);
        assert_eq!(gap[0].dropped_bytes, gap[0].dropped_records);
    }
}
