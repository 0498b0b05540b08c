//! The log at scale, end to end against the real services: an edge appending to the
//! Kafka broker, the recorder archiving to the S3 server, and the Parquet read back
//! with the `parquet`/`arrow` readers to prove that every record is there exactly once.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, BinaryArray, StringArray, UInt64Array};
use bytes::Bytes;
use futures::StreamExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use cloudtap_recorder::archive::{Recorder, RecorderSettings};
use cloudtap_recorder::store::{ObjectStore, S3Store};
use cloudtap_recorder::{EventLog, KafkaLog, KafkaLogConfig, testenv};
use cloudtap_schemas::{Body, Record, tables, verify_chain};
use common::*;

/// Deterministic bytes of a session's stream.
fn bytes_for(session: usize, stream: usize) -> Vec<u8> {
    let len = (session * 7919 + stream * 104_729) % 40_000;
    (0..len)
        .map(|i| (i * 31 + session + stream) as u8)
        .collect()
}

/// Everything the archive holds, read only through the commit markers' file lists and
/// the Parquet reader: `(table, batch)` pairs.
async fn read_archive(store: &dyn ObjectStore) -> Vec<(String, arrow::array::RecordBatch)> {
    let mut out = Vec::new();
    let markers = store.list("_ranges/").await.unwrap();
    assert!(!markers.is_empty(), "no commit marker in the archive");
    for m in markers {
        let body = store.get(&m.key).await.unwrap().unwrap();
        let marker: serde_json::Value = serde_json::from_slice(&body).unwrap();
        for f in marker["files"].as_array().unwrap() {
            let key = f["key"].as_str().unwrap();
            let table = f["table"].as_str().unwrap().to_owned();
            let data: Bytes = store.get(key).await.unwrap().expect("a marked file exists");
            let reader = ParquetRecordBatchReaderBuilder::try_new(data)
                .unwrap()
                .build()
                .unwrap();
            for b in reader {
                out.push((table.clone(), b.unwrap()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_sessions_through_kafka_land_in_parquet_on_s3_exactly_once() {
    let test = "kafka + s3 end to end";
    let (Some(brokers), Some(s3)) = (
        testenv::service("CLOUDTAP_TEST_KAFKA", test),
        testenv::s3(test),
    ) else {
        return;
    };
    let topic = format!("e2e-{}", uuid::Uuid::now_v7().simple());
    let log = Arc::new(
        KafkaLog::open(KafkaLogConfig::from_url(&testenv::kafka_url(&brokers, &topic, 3)).unwrap())
            .await
            .unwrap(),
    );
    let upstream = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = TestEdge::start_with_log(dir, config(&[("echo", upstream)]), log.clone()).await;
    let admin = edge.admin_tls();
    let token = edge.login(&admin).await.token;

    // 200 sessions, 16 at a time: 0–3 streams each, each echoing up to 40 KB.
    let sessions: usize = std::env::var("ARCHIVE_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let started = std::time::Instant::now();
    let sent: Arc<std::sync::Mutex<HashMap<String, (u64, u64)>>> = Arc::default();
    futures::stream::iter(0..sessions)
        .for_each_concurrent(16, |i| {
            let (edge, admin, token, sent) = (&edge, admin.clone(), token.clone(), sent.clone());
            async move {
                let open = edge.open(&token, "echo").await.unwrap();
                let tunnel = cloudtap_edge::client::Tunnel::attach(
                    &admin,
                    &open.tunnel_addr,
                    &open.session_token,
                    "echo",
                )
                .await
                .unwrap();
                let (mut up, mut down) = (0u64, 0u64);
                for k in 0..(i % 4) {
                    let s = tunnel.open_stream(&format!("s{k}")).await.unwrap();
                    let (mut r, mut w) = tokio::io::split(s);
                    let data = bytes_for(i, k);
                    let mut back = Vec::new();
                    let (wr, rr) = tokio::join!(
                        async {
                            w.write_all(&data).await?;
                            w.shutdown().await
                        },
                        r.read_to_end(&mut back)
                    );
                    wr.unwrap();
                    rr.unwrap();
                    assert_eq!(back, data, "session {i} stream {k} echoed");
                    up += data.len() as u64;
                    down += back.len() as u64;
                }
                tunnel.close();
                sent.lock().unwrap().insert(open.session_id, (up, down));
            }
        })
        .await;
    eprintln!("{sessions} sessions done in {:?}", started.elapsed());
    // Stopping the edge closes every session and flushes the log.
    let (_dir, _) = edge.stop().await;

    eprintln!("edge stopped");
    // Ground truth: everything in the topic.
    let end = log.end().await.unwrap();
    let in_log: Vec<Record> = cloudtap_recorder::read_to(log.as_ref(), end)
        .map(|e| e.unwrap().record)
        .collect()
        .await;

    eprintln!(
        "{} records in the log ({:?})",
        in_log.len(),
        started.elapsed()
    );
    let bucket = std::env::var("CLOUDTAP_TEST_S3_BUCKET").unwrap_or("cloudtap".into());
    let store: Arc<dyn ObjectStore> = Arc::new(S3Store::new(&bucket, &topic, &s3).await);
    let settings = RecorderSettings {
        // several ranges per partition
        range_records: (in_log.len() as u64 / 12).max(1),
        ..RecorderSettings::default()
    };
    let report = Recorder::new(log.clone(), store.clone(), settings)
        .drain(&CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.records, in_log.len() as u64);
    assert!(report.ranges > 3, "expected several ranges, got {report:?}");

    eprintln!("drained {report:?} ({:?})", started.elapsed());
    let batches = read_archive(store.as_ref()).await;
    eprintln!("read back ({:?})", started.elapsed());
    let mut records = Vec::new();
    let mut payload_bytes: BTreeMap<(String, u64, String), u64> = BTreeMap::new();
    let mut session_rows = Vec::new();
    for (table, b) in &batches {
        match table.as_str() {
            "frames" | "events" => {
                if table == "frames" {
                    let sid = b.column_by_name("session_id").unwrap();
                    let sid = sid.as_any().downcast_ref::<StringArray>().unwrap();
                    let stream = b.column_by_name("stream_id").unwrap();
                    let stream = stream.as_any().downcast_ref::<UInt64Array>().unwrap();
                    let dir = b.column_by_name("direction").unwrap();
                    let dir = dir.as_any().downcast_ref::<StringArray>().unwrap();
                    let payload = b.column_by_name("payload").unwrap();
                    let payload = payload.as_any().downcast_ref::<BinaryArray>().unwrap();
                    for i in 0..b.num_rows() {
                        *payload_bytes
                            .entry((sid.value(i).into(), stream.value(i), dir.value(i).into()))
                            .or_default() += payload.value(i).len() as u64;
                    }
                }
                records.extend(tables::records_from_batch(b).unwrap());
            }
            "sessions" => {
                let ids = b.column_by_name("session_id").unwrap();
                let ids = ids.as_any().downcast_ref::<StringArray>().unwrap();
                for i in 0..b.num_rows() {
                    session_rows.push(ids.value(i).to_owned());
                }
            }
            "streams" => {}
            other => panic!("unexpected table {other}"),
        }
    }

    // Row count equals the records sent and the distinct (chain, seq) pairs.
    assert_eq!(records.len(), in_log.len());
    let distinct: HashSet<_> = records.iter().map(|r| (r.chain_id, r.seq)).collect();
    assert_eq!(
        distinct.len(),
        records.len(),
        "a (chain, seq) appears twice"
    );

    // Every chain is gap-free from seq 0 and its hashes recompute from the columns.
    let mut chains: BTreeMap<uuid::Uuid, Vec<Record>> = BTreeMap::new();
    for r in records {
        chains.entry(r.chain_id).or_default().push(r);
    }
    for (id, mut chain) in chains {
        chain.sort_by_key(|r| r.seq);
        verify_chain(None, &chain).unwrap_or_else(|e| panic!("chain {id}: {e}"));
    }

    // Payload bytes per (session, stream, direction) match the log, and per session
    // what the clients sent and got back.
    let mut from_log: BTreeMap<(String, u64, String), u64> = BTreeMap::new();
    for r in &in_log {
        if let Body::Frame(f) = &r.body {
            *from_log
                .entry((
                    r.chain_id.to_string(),
                    f.stream_id,
                    f.direction.as_str().into(),
                ))
                .or_default() += f.payload.as_ref().map_or(0, |p| p.len() as u64);
        }
    }
    assert_eq!(payload_bytes, from_log);
    let sent = sent.lock().unwrap().clone();
    assert_eq!(sent.len(), sessions);
    for (sid, (up, down)) in &sent {
        let sum = |d: &str| -> u64 {
            payload_bytes
                .iter()
                .filter(|((s, _, dir), _)| s == sid && dir == d)
                .map(|(_, n)| n)
                .sum()
        };
        assert_eq!((sum("up"), sum("down")), (*up, *down), "session {sid}");
    }

    // One `sessions` row per session, none twice.
    let rows: HashSet<_> = session_rows.iter().cloned().collect();
    assert_eq!(rows.len(), session_rows.len());
    for sid in sent.keys() {
        assert!(rows.contains(sid), "session {sid} has no sessions row");
    }

    // A second drain finds nothing new and writes nothing.
    let again = Recorder::new(log.clone(), store.clone(), RecorderSettings::default())
        .drain(&CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(again.records, 0);
}

/// Two recorders in one consumer group share a 3-partition topic while records keep
/// arriving; together they archive every record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_recorders_in_one_consumer_group_archive_everything_once() {
    use cloudtap_recorder::store::LocalStore;
    use cloudtap_schemas::{Audit, ChainWriter};
    let Some(brokers) = testenv::service("CLOUDTAP_TEST_KAFKA", "recorder consumer group") else {
        return;
    };
    let topic = format!("group-{}", uuid::Uuid::now_v7().simple());
    let log = Arc::new(
        KafkaLog::open(KafkaLogConfig::from_url(&testenv::kafka_url(&brokers, &topic, 3)).unwrap())
            .await
            .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path()));
    let settings = RecorderSettings {
        group: format!("recorders-{topic}"),
        range_records: 40,
        flush_idle: std::time::Duration::from_millis(200),
        ..RecorderSettings::default()
    };
    let cancel = CancellationToken::new();
    let mut stats = Vec::new();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let r = Recorder::new(log.clone(), store.clone(), settings.clone());
        stats.push(r.stats());
        runs.push(tokio::spawn(r.run(cancel.clone())));
    }
    let mut chains: Vec<ChainWriter> = (0..9)
        .map(|_| ChainWriter::new(uuid::Uuid::now_v7()))
        .collect();
    let mut sent = Vec::new();
    for round in 0..30 {
        for (i, w) in chains.iter_mut().enumerate() {
            let batch: Vec<Record> = (0..3)
                .map(|k| {
                    w.seal_now(Body::Audit(Audit {
                        actor: format!("chain-{i}"),
                        action: format!("{round}-{k}"),
                        detail: String::new(),
                    }))
                })
                .collect();
            log.append(batch.clone()).await.unwrap();
            sent.extend(batch);
        }
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    let total = sent.len() as u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let archived: u64 = stats
            .iter()
            .map(|s| {
                s.records_archived
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum();
        if archived >= total {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited 90 s for the group to archive {total} records, got {archived}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    cancel.cancel();
    for r in runs {
        r.await.unwrap().unwrap();
    }
    let mut got = Vec::new();
    for (table, b) in read_archive(store.as_ref()).await {
        if table == "events" {
            got.extend(tables::records_from_batch(&b).unwrap());
        }
    }
    let distinct: HashSet<_> = got.iter().map(|r| (r.chain_id, r.seq)).collect();
    assert_eq!(distinct.len(), got.len(), "a record was archived twice");
    assert_eq!(got.len(), sent.len(), "records missing from the archive");
    let shares: Vec<u64> = stats
        .iter()
        .map(|s| {
            s.records_archived
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .collect();
    eprintln!("records archived per recorder: {shares:?}");
}
