//! The Kafka backend of [`EventLog`], through rdkafka (librdkafka 2.12, built from
//! source with the machine's gcc and make).
//!
//! - One topic (default `cloudtap.records`), created if missing with the configured
//!   partition count. A record's key is its chain id (the 36-character string) and its
//!   partition is chosen here, `crc32c(key) % partitions`, so a chain is totally
//!   ordered in one partition and `read_chain` knows which one to read.
//! - The producer is idempotent with `acks=all` (librdkafka retries without
//!   duplicating or reordering), compresses with lz4 and batches for `linger.ms`.
//!   An append resolves once the broker has acknowledged every record of the batch.
//! - Readers assign partitions directly (no group) for `subscribe`, `read_chain` and
//!   `end`; the recorder reads as a consumer group through [`KafkaLog::group_reader`].
//! - Every librdkafka property can be passed through the URL's query string
//!   (`kafka://host:9092?compression.type=snappy&linger.ms=20`). This build compiles
//!   librdkafka without OpenSSL, zlib, zstd or Cyrus SASL: `security.protocol=ssl`,
//!   `sasl_ssl`, gzip and zstd compression are refused by librdkafka at start
//!   (`sasl_plaintext` with PLAIN works, but sends the password unencrypted).
//! - `single_record_batches=true` makes every produced record a batch of its own. The
//!   tansu 0.6 broker needs it: with multi-record batches it reports a partition's
//!   high watermark as the last batch's base offset + 1, and a fetch from an offset
//!   inside a batch returns nothing — so `end` would fall short and a reader resuming
//!   mid-batch would wait forever. Real Kafka needs no such option.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use cloudtap_schemas::{Record, decode_record, encode_record_owned, peek_kind};

use crate::{EventLog, LogEntry, LogError, Offsets, PartitionReader, Position, ReaderEvent};

type Watermarks = (u32, i64, i64);

/// Default topic name (DESIGN: "The traffic log").
pub const DEFAULT_TOPIC: &str = "cloudtap.records";

/// How long metadata and watermark requests may take before they count as failed.
const META_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the Kafka log, usually parsed from its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaLogConfig {
    /// `host:port[,host:port…]`.
    pub brokers: String,
    pub topic: String,
    /// Partitions of the topic when this log creates it (default 6).
    pub partitions: i32,
    /// Replication factor when this log creates the topic (default 1; use 3 in production).
    pub replication: i32,
    /// librdkafka properties passed through unchanged (they win over the defaults).
    pub properties: BTreeMap<String, String>,
}

impl KafkaLogConfig {
    /// Parses `kafka://host:port[,host:port…][/topic][?partitions=N&replication=N&<librdkafka property>=V…]`.
    pub fn from_url(url: &str) -> Result<Self, LogError> {
        let bad = |reason: &str| LogError::UnsupportedUrl {
            url: redact_url(url),
            reason: reason.into(),
        };
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| bad("a Kafka log URL starts with kafka://"))?;
        let (addr_topic, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (brokers, topic) = addr_topic.split_once('/').unwrap_or((addr_topic, ""));
        if brokers.is_empty() || brokers.split(',').any(|b| !b.contains(':')) {
            return Err(bad(
                "expected kafka://host:port[,host:port…][/topic]; every broker needs a port",
            ));
        }
        let mut cfg = KafkaLogConfig {
            brokers: brokers.into(),
            topic: if topic.is_empty() {
                DEFAULT_TOPIC.into()
            } else {
                topic.into()
            },
            partitions: 6,
            replication: 1,
            properties: BTreeMap::new(),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad("query parameters are key=value"))?;
            match k {
                "partitions" => {
                    cfg.partitions = v
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad("partitions must be a positive integer"))?
                }
                "replication" => {
                    cfg.replication = v
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad("replication must be a positive integer"))?
                }
                "topic" => cfg.topic = v.into(),
                "single_record_batches" => {
                    let on = v
                        .parse::<bool>()
                        .map_err(|_| bad("single_record_batches is true or false"))?;
                    if on {
                        cfg.properties
                            .insert("batch.num.messages".into(), "1".into());
                    }
                }
                k => {
                    cfg.properties.insert(k.into(), v.into());
                }
            }
        }
        Ok(cfg)
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        // Keep librdkafka's own logging at warnings; it goes through `tracing`.
        c.set("log_level", "4");
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

/// A URL fit for logs: the query string (which may carry credentials) is dropped.
fn redact_url(url: &str) -> String {
    match url.split_once('?') {
        Some((head, _)) => format!("{head}?…"),
        None => url.into(),
    }
}

/// The partition of a chain: crc32c of its 36-character id, modulo the partition count.
pub fn partition_for(chain_id: &uuid::Uuid, partitions: u32) -> u32 {
    let key = chain_id.hyphenated().to_string();
    crc32c::crc32c(key.as_bytes()) % partitions.max(1)
}

/// Client context: librdkafka's errors become `tracing` events and feed the health
/// the edge reports.
#[derive(Clone, Default)]
struct Ctx {
    last_error: Arc<Mutex<Option<(Instant, String)>>>,
}

impl ClientContext for Ctx {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(error = %error, reason, "kafka client error");
        *self.last_error.lock().expect("ctx poisoned") = Some((Instant::now(), reason.into()));
    }
}

impl ConsumerContext for Ctx {}

pub struct KafkaLog {
    cfg: KafkaLogConfig,
    partitions: u32,
    producer: FutureProducer<Ctx>,
    ctx: Ctx,
    /// Appends in flight by id, with when each began, for the health report: the
    /// oldest one tells how long the broker has kept us waiting.
    in_flight: Mutex<BTreeMap<u64, Instant>>,
    next_append: AtomicU64,
    /// A consumer for metadata and watermark requests.
    meta: Arc<BaseConsumer<Ctx>>,
}

impl KafkaLog {
    /// Connects, creates the topic if it is missing, and learns its partition count.
    pub async fn open(cfg: KafkaLogConfig) -> Result<Self, LogError> {
        let ctx = Ctx::default();
        let kerr = |what: &'static str| {
            let brokers = cfg.brokers.clone();
            let secrets: Vec<String> = cfg.properties.values().cloned().collect();
            move |e: KafkaError| match e {
                // librdkafka's message for a refused property repeats its value, which
                // may be a password: say which property, never what it was set to.
                KafkaError::ClientCreation(_) | KafkaError::ClientConfig(..) => {
                    let mut msg = match e {
                        KafkaError::ClientConfig(_, desc, key, _) => {
                            format!("{desc} (property {key})")
                        }
                        KafkaError::ClientCreation(m) => m,
                        _ => unreachable!(),
                    };
                    for v in secrets.iter().filter(|v| !v.is_empty()) {
                        msg = msg.replace(v.as_str(), "…");
                    }
                    LogError::Kafka {
                        what: format!("{what} ({brokers})"),
                        source: KafkaError::ClientCreation(msg),
                    }
                }
                e => LogError::Kafka {
                    what: format!("{what} ({brokers})"),
                    source: e,
                },
            }
        };
        let admin: AdminClient<Ctx> = cfg
            .client_config()
            .create_with_context(ctx.clone())
            .map_err(kerr("creating the admin client"))?;
        let topic = NewTopic::new(
            &cfg.topic,
            cfg.partitions,
            TopicReplication::Fixed(cfg.replication),
        );
        let opts = AdminOptions::new().operation_timeout(Some(META_TIMEOUT));
        let created = admin
            .create_topics([&topic], &opts)
            .await
            .map_err(kerr("creating the topic"))?;
        for r in created {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(LogError::Kafka {
                        what: format!("creating topic {t}"),
                        source: KafkaError::AdminOp(code),
                    });
                }
            }
        }
        let mut pc = cfg.client_config();
        for (k, v) in [
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("compression.type", "lz4"),
            ("linger.ms", "5"),
            ("batch.size", "1000000"),
        ] {
            if !cfg.properties.contains_key(k) {
                pc.set(k, v);
            }
        }
        let producer: FutureProducer<Ctx> = pc
            .create_with_context(ctx.clone())
            .map_err(kerr("creating the producer"))?;
        let mut mc = cfg.client_config();
        mc.set(
            "group.id",
            format!("cloudtap-meta-{}", uuid::Uuid::now_v7()),
        );
        mc.set("enable.auto.commit", "false");
        mc.set("isolation.level", "read_uncommitted");
        let meta: Arc<BaseConsumer<Ctx>> = Arc::new(
            mc.create_with_context(ctx.clone())
                .map_err(kerr("creating the metadata client"))?,
        );
        // The topic's metadata may lag its creation for a moment.
        let deadline = Instant::now() + META_TIMEOUT;
        let partitions = loop {
            let m = meta.clone();
            let topic = cfg.topic.clone();
            let found = tokio::task::spawn_blocking(move || {
                m.fetch_metadata(Some(&topic), META_TIMEOUT).map(|md| {
                    md.topics()
                        .first()
                        .map(|t| t.partitions().len() as u32)
                        .unwrap_or(0)
                })
            })
            .await
            .expect("metadata task panicked")
            .map_err(kerr("reading the topic's metadata"))?;
            if found > 0 {
                break found;
            }
            if Instant::now() > deadline {
                return Err(LogError::Kafka {
                    what: format!("topic {} has no partitions after creation", cfg.topic),
                    source: KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Ok(Self {
            cfg,
            partitions,
            producer,
            ctx,
            in_flight: Mutex::default(),
            next_append: AtomicU64::new(0),
            meta,
        })
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    pub fn topic(&self) -> &str {
        &self.cfg.topic
    }

    fn consumer(&self, group: Option<&str>) -> Result<StreamConsumer<Ctx>, LogError> {
        let mut c = self.cfg.client_config();
        match group {
            Some(g) => {
                c.set("group.id", g);
                c.set("auto.offset.reset", "earliest");
            }
            None => {
                c.set(
                    "group.id",
                    format!("cloudtap-reader-{}", uuid::Uuid::now_v7()),
                );
            }
        }
        c.set("enable.auto.commit", "false");
        c.set("enable.auto.offset.store", "false");
        c.set("enable.partition.eof", "false");
        c.create_with_context(self.ctx.clone())
            .map_err(|e| LogError::Kafka {
                what: "creating a consumer".into(),
                source: e,
            })
    }

    /// (partition, low, high) watermarks of every partition.
    fn watermarks(&self) -> BoxFuture<'static, Result<Vec<Watermarks>, LogError>> {
        let meta = self.meta.clone();
        let topic = self.cfg.topic.clone();
        let n = self.partitions;
        async move {
            tokio::task::spawn_blocking(move || {
                (0..n)
                    .map(|p| {
                        meta.fetch_watermarks(&topic, p as i32, META_TIMEOUT)
                            .map(|(lo, hi)| (p, lo, hi))
                            .map_err(|e| LogError::Kafka {
                                what: format!("reading the end of partition {p}"),
                                source: e,
                            })
                    })
                    .collect()
            })
            .await
            .expect("watermark task panicked")
        }
        .boxed()
    }

    /// Reads the topic as member `group` of a consumer group: partitions are shared
    /// among the group's members and move on rebalance.
    pub fn group_reader(&self, group: &str) -> Result<Box<dyn PartitionReader>, LogError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let ctx = GroupCtx {
            inner: self.ctx.clone(),
            events: tx,
        };
        let mut c = self.cfg.client_config();
        c.set("group.id", group);
        c.set("auto.offset.reset", "earliest");
        c.set("enable.auto.commit", "false");
        c.set("enable.auto.offset.store", "false");
        c.set("enable.partition.eof", "false");
        let consumer: StreamConsumer<GroupCtx> =
            c.create_with_context(ctx).map_err(|e| LogError::Kafka {
                what: format!("joining consumer group {group}"),
                source: e,
            })?;
        consumer
            .subscribe(&[&self.cfg.topic])
            .map_err(|e| LogError::Kafka {
                what: format!("subscribing to {}", self.cfg.topic),
                source: e,
            })?;
        Ok(Box::new(GroupReader {
            consumer: Arc::new(consumer),
            topic: self.cfg.topic.clone(),
            events: rx,
        }))
    }

    fn stream_from(
        &self,
        from: Offsets,
        kinds: Option<&'static [&'static str]>,
    ) -> BoxStream<'static, Result<LogEntry, LogError>> {
        let consumer = match self.consumer(None) {
            Ok(c) => c,
            Err(e) => return futures::stream::once(async { Err(e) }).boxed(),
        };
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            let _ = tpl.add_partition_offset(
                &self.cfg.topic,
                p as i32,
                Offset::Offset(from.get(p) as i64),
            );
        }
        if let Err(e) = consumer.assign(&tpl) {
            return futures::stream::once(async move {
                Err(LogError::Kafka {
                    what: "assigning partitions".into(),
                    source: e,
                })
            })
            .boxed();
        }
        let consumer = Arc::new(consumer);
        futures::stream::unfold(consumer, move |consumer| async move {
            loop {
                let item = match consumer.recv().await {
                    Ok(m) => {
                        if let Some(kinds) = kinds
                            && !m
                                .payload()
                                .and_then(peek_kind)
                                .is_some_and(|k| kinds.contains(&k))
                        {
                            continue;
                        }
                        entry_of(&m)
                    }
                    Err(e) => {
                        // librdkafka reports broker outages here and reconnects on its
                        // own; the subscription goes on where it was.
                        tracing::warn!(error = %e, "reading the traffic log topic: transient error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                return Some((item, consumer));
            }
        })
        .boxed()
    }
}

fn entry_of<M: Message>(m: &M) -> Result<LogEntry, LogError> {
    let position = Position {
        partition: m.partition() as u32,
        offset: m.offset() as u64,
    };
    let bytes = m.payload().unwrap_or_default();
    decode_record(bytes)
        .map(|record| LogEntry { position, record })
        .map_err(|source| LogError::Decode { position, source })
}

impl EventLog for KafkaLog {
    fn append(&self, batch: Vec<Record>) -> BoxFuture<'_, Result<Position, LogError>> {
        async move {
            if batch.is_empty() {
                return Ok(Position::default());
            }
            let _guard = InFlight::enter(self);
            let mut deliveries = Vec::with_capacity(batch.len());
            for r in batch {
                let key = r.chain_id.hyphenated().to_string();
                let partition = partition_for(&r.chain_id, self.partitions) as i32;
                let ts_ms = r.ts_unix_nanos / 1_000_000;
                let payload = encode_record_owned(r);
                let mut rec = FutureRecord::to(&self.cfg.topic)
                    .key(&key)
                    .payload(&payload)
                    .partition(partition)
                    .timestamp(ts_ms);
                loop {
                    match self.producer.send_result(rec) {
                        Ok(d) => {
                            deliveries.push(d);
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            // librdkafka's queue is full: let it drain, then retry.
                            rec = back;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        Err((e, _)) => {
                            return Err(LogError::Kafka {
                                what: "queueing a record".into(),
                                source: e,
                            });
                        }
                    }
                }
            }
            let mut last = Position::default();
            for d in deliveries {
                match d.await {
                    Ok(Ok(delivery)) => {
                        last = Position {
                            partition: delivery.partition as u32,
                            offset: delivery.offset as u64,
                        }
                    }
                    Ok(Err((e, _))) => {
                        return Err(LogError::Kafka {
                            what: "delivering a record".into(),
                            source: e,
                        });
                    }
                    Err(_) => return Err(LogError::Closed),
                }
            }
            Ok(last)
        }
        .boxed()
    }

    fn subscribe(&self, from: Offsets) -> BoxStream<'static, Result<LogEntry, LogError>> {
        self.stream_from(from, None)
    }

    fn subscribe_kinds(
        &self,
        from: Offsets,
        kinds: &'static [&'static str],
    ) -> BoxStream<'static, Result<LogEntry, LogError>> {
        self.stream_from(from, Some(kinds))
    }

    fn end(&self) -> BoxFuture<'_, Result<Offsets, LogError>> {
        let marks = self.watermarks();
        async move {
            Ok(Offsets(
                marks
                    .await?
                    .into_iter()
                    .map(|(p, _, hi)| (p, hi.max(0) as u64))
                    .collect(),
            ))
        }
        .boxed()
    }

    fn read_chain(&self, chain_id: uuid::Uuid) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        async move {
            let p = partition_for(&chain_id, self.partitions);
            let marks = self.watermarks().await?;
            let (_, lo, hi) = marks[p as usize];
            if hi <= lo {
                return Ok(Vec::new());
            }
            let key = chain_id.hyphenated().to_string();
            let consumer = self.consumer(None)?;
            let mut tpl = TopicPartitionList::new();
            let _ = tpl.add_partition_offset(&self.cfg.topic, p as i32, Offset::Offset(lo));
            consumer.assign(&tpl).map_err(|e| LogError::Kafka {
                what: "assigning a partition".into(),
                source: e,
            })?;
            let mut out = Vec::new();
            loop {
                let m = tokio::time::timeout(META_TIMEOUT * 3, consumer.recv())
                    .await
                    .map_err(|_| LogError::Kafka {
                        what: format!("reading partition {p} up to offset {hi} timed out"),
                        source: KafkaError::MessageConsumption(RDKafkaErrorCode::RequestTimedOut),
                    })?
                    .map_err(|e| LogError::Kafka {
                        what: "reading a chain".into(),
                        source: e,
                    })?;
                let offset = m.offset();
                if m.key() == Some(key.as_bytes()) {
                    out.push(entry_of(&m)?.record);
                }
                if offset + 1 >= hi {
                    break;
                }
            }
            out.sort_by_key(|r| r.seq);
            out.dedup_by_key(|r| r.seq);
            Ok(out)
        }
        .boxed()
    }

    fn describe(&self) -> String {
        format!(
            "kafka://{}/{} ({} partitions)",
            self.cfg.brokers, self.cfg.topic, self.partitions
        )
    }

    fn health(&self) -> Option<String> {
        let oldest = *self
            .in_flight
            .lock()
            .expect("in-flight poisoned")
            .values()
            .min()?;
        let waited = oldest.elapsed();
        if waited < Duration::from_secs(2) {
            return None;
        }
        let why = self
            .ctx
            .last_error
            .lock()
            .expect("ctx poisoned")
            .as_ref()
            .filter(|(at, _)| at.elapsed() < Duration::from_secs(60))
            .map(|(_, r)| format!(": {r}"))
            .unwrap_or_default();
        Some(format!(
            "the Kafka broker has not acknowledged an append for {:.1} s{why}",
            waited.as_secs_f64()
        ))
    }

    fn group_reader(&self, group: &str) -> Option<Result<Box<dyn PartitionReader>, LogError>> {
        Some(KafkaLog::group_reader(self, group))
    }
}

/// Marks an append in flight for the health report.
struct InFlight<'a> {
    log: &'a KafkaLog,
    id: u64,
}

impl<'a> InFlight<'a> {
    fn enter(log: &'a KafkaLog) -> Self {
        let id = log.next_append.fetch_add(1, Ordering::Relaxed);
        log.in_flight
            .lock()
            .expect("in-flight poisoned")
            .insert(id, Instant::now());
        Self { log, id }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.log
            .in_flight
            .lock()
            .expect("in-flight poisoned")
            .remove(&self.id);
    }
}

/// Consumer-group context: forwards assignments and revocations to the reader.
struct GroupCtx {
    inner: Ctx,
    events: mpsc::UnboundedSender<ReaderEvent>,
}

impl ClientContext for GroupCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        self.inner.error(error, reason)
    }
}

impl ConsumerContext for GroupCtx {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let parts = |tpl: &TopicPartitionList| {
            tpl.elements()
                .iter()
                .map(|e| e.partition() as u32)
                .collect::<Vec<_>>()
        };
        let event = match rebalance {
            Rebalance::Assign(tpl) => ReaderEvent::Assigned(parts(tpl)),
            Rebalance::Revoke(tpl) => ReaderEvent::Revoked(parts(tpl)),
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "consumer group rebalance failed");
                return;
            }
        };
        let _ = self.events.send(event);
    }
}

struct GroupReader {
    consumer: Arc<StreamConsumer<GroupCtx>>,
    topic: String,
    events: mpsc::UnboundedReceiver<ReaderEvent>,
}

impl PartitionReader for GroupReader {
    fn next(&mut self) -> BoxFuture<'_, Result<ReaderEvent, LogError>> {
        async move {
            if let Ok(ev) = self.events.try_recv() {
                return Ok(ev);
            }
            tokio::select! {
                biased;
                ev = self.events.recv() => ev.ok_or(LogError::Closed),
                m = self.consumer.recv() => match m {
                    Ok(m) => entry_of(&m).map(|e| ReaderEvent::Entry(Box::new(e))),
                    Err(e) => Err(LogError::Kafka { what: "reading as a group member".into(), source: e }),
                },
            }
        }
        .boxed()
    }

    fn seek(&mut self, partition: u32, offset: u64) -> BoxFuture<'_, Result<(), LogError>> {
        async move {
            // A partition just assigned may not accept a seek until its fetcher has
            // started; retry for a while.
            let deadline = Instant::now() + META_TIMEOUT;
            loop {
                let c = self.consumer.clone();
                let topic = self.topic.clone();
                let r = tokio::task::spawn_blocking(move || {
                    c.seek(
                        &topic,
                        partition as i32,
                        Offset::Offset(offset as i64),
                        Duration::from_secs(5),
                    )
                })
                .await
                .expect("seek task panicked");
                match r {
                    Ok(()) => return Ok(()),
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!(error = %e, partition, offset, "seek not accepted yet; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        return Err(LogError::Kafka {
                            what: format!("seeking partition {partition} to {offset}"),
                            source: e,
                        });
                    }
                }
            }
        }
        .boxed()
    }

    fn commit(&mut self, partition: u32, next_offset: u64) -> BoxFuture<'_, Result<(), LogError>> {
        let mut tpl = TopicPartitionList::new();
        let r = tpl
            .add_partition_offset(
                &self.topic,
                partition as i32,
                Offset::Offset(next_offset as i64),
            )
            .and_then(|()| self.consumer.commit(&tpl, CommitMode::Async));
        futures::future::ready(r.map_err(|e| LogError::Kafka {
            what: "committing the group's offset".into(),
            source: e,
        }))
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_topic_partitions_and_properties() {
        let c = KafkaLogConfig::from_url(
            "kafka://a:9092,b:9092/my.topic?partitions=3&replication=2&compression.type=zstd",
        )
        .unwrap();
        assert_eq!(c.brokers, "a:9092,b:9092");
        assert_eq!(c.topic, "my.topic");
        assert_eq!((c.partitions, c.replication), (3, 2));
        assert_eq!(c.properties["compression.type"], "zstd");
        let d = KafkaLogConfig::from_url("kafka://127.0.0.1:9092").unwrap();
        assert_eq!((d.topic.as_str(), d.partitions), (DEFAULT_TOPIC, 6));
        for bad in [
            "kafka://",
            "kafka://host",
            "kafka://h:1?partitions=0",
            "kafka://h:1?sasl.password",
        ] {
            assert!(KafkaLogConfig::from_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_never_echo_the_query_string() {
        let e = KafkaLogConfig::from_url("kafka://h:1?sasl.password=hunter2&partitions=x")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[tokio::test]
    async fn a_refused_property_is_named_but_its_value_never_shown() {
        let cfg = KafkaLogConfig::from_url(
            "kafka://127.0.0.1:1/t?sasl.pasword=hunter2-secret&security.protocol=plaintext",
        )
        .unwrap();
        let err = KafkaLog::open(cfg)
            .await
            .err()
            .expect("a bad property fails");
        let msg = format!("{err} {err:?}");
        assert!(!msg.contains("hunter2-secret"), "{msg}");
    }

    #[test]
    fn a_chain_always_maps_to_the_same_partition() {
        let id = uuid::Uuid::now_v7();
        let p = partition_for(&id, 6);
        assert!(p < 6);
        assert_eq!(p, partition_for(&id, 6));
        assert_eq!(partition_for(&id, 1), 0);
    }

    async fn fresh(brokers: &str) -> Arc<KafkaLog> {
        let topic = format!("conformance-{}", uuid::Uuid::now_v7().simple());
        let url = crate::testenv::kafka_url(brokers, &topic, 3);
        Arc::new(
            KafkaLog::open(KafkaLogConfig::from_url(&url).unwrap())
                .await
                .unwrap(),
        )
    }

    /// The same suite as the file and memory logs, against the real broker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_against_the_real_broker() {
        let Some(brokers) = crate::testenv::service("CLOUDTAP_TEST_KAFKA", "kafka conformance")
        else {
            return;
        };
        crate::conformance::run_all(|| fresh(&brokers)).await;
    }
}
