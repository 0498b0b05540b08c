//! cloudtap's log and archive benchmark. Not a test: it prints each figure beside a
//! baseline measured in the same run and asserts nothing. Run it through
//! `scripts/bench-log.sh`, which builds in release and starts the services.
//!
//! Usage: `cloudtap-bench-log --disk DIR [--kafka HOST:PORT] [--s3-endpoint URL
//!         --s3-key K --s3-secret S --s3-bucket B] [--events N] [--frames-mb N]`
//!
//! - **Segment log append**: 100-byte events (audit records with a 100-byte detail)
//!   appended by 8 tasks in batches of 64 through `FileLog` with the default group
//!   commit (fsync per group). Baseline: the same encoded bytes appended to a plain
//!   file in the same groups with `fdatasync` per group (what the disk allows).
//! - **Kafka append**: the same events through `KafkaLog` (idempotent, acks=all).
//!   Baseline: rdkafka's producer sending the same bytes straight to the same broker
//!   with the same settings, without cloudtap's encoding or bookkeeping.
//! - **Parquet**: frames with 16 KiB incompressible payloads drained from the in-memory log into
//!   Parquet on local disk and on the S3 server. Baseline: the same payload bytes
//!   written as one object to the same store.
//! - **Recorder lag**: a writer appending 16 KiB frames to the segment log as fast as
//!   it accepts them (the tap of a full-capture bulk tunnel), the recorder archiving
//!   to local disk beside it; lag in records and seconds, sampled every 500 ms, and
//!   the time from the writer stopping to the lag reaching zero.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use cloudtap_recorder::archive::{Recorder, RecorderSettings};
use cloudtap_recorder::store::{LocalStore, ObjectStore, S3Settings, S3Store};
use cloudtap_recorder::{EventLog, FileLog, FileLogConfig, KafkaLog, KafkaLogConfig, MemoryLog};
use cloudtap_schemas::*;

struct Args {
    disk: PathBuf,
    kafka: Option<String>,
    s3: Option<(S3Settings, String)>,
    events: usize,
    frames_mb: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        disk: std::env::temp_dir(),
        kafka: None,
        s3: None,
        events: 1_000_000,
        frames_mb: 256,
    };
    let mut s3 = S3Settings {
        region: Some("us-east-1".into()),
        path_style: Some(true),
        ..Default::default()
    };
    let mut bucket = String::from("cloudtap");
    let mut args = std::env::args().skip(1);
    while let Some(k) = args.next() {
        let v = args.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--disk" => a.disk = v.into(),
            "--kafka" => a.kafka = Some(v),
            "--s3-endpoint" => s3.endpoint = Some(v),
            "--s3-key" => s3.access_key_id = Some(v),
            "--s3-secret" => s3.secret_access_key = Some(v),
            "--s3-bucket" => bucket = v,
            "--events" => a.events = v.parse().expect("--events N"),
            "--frames-mb" => a.frames_mb = v.parse().expect("--frames-mb N"),
            other => panic!("unknown flag {other}"),
        }
    }
    if s3.endpoint.is_some() {
        a.s3 = Some((s3, bucket));
    }
    a
}

fn events(n: usize) -> Vec<Vec<Record>> {
    // 8 appenders, each its own chain, batches of 64.
    let mut per_task = Vec::new();
    for t in 0..8 {
        let mut w = ChainWriter::new(uuid::Uuid::now_v7());
        per_task.push(
            (0..n / 8)
                .map(|i| {
                    w.seal_now(Body::Audit(Audit {
                        actor: format!("bench-{t}"),
                        action: "event".into(),
                        detail: format!("{i:0>100}"),
                    }))
                })
                .collect(),
        );
    }
    per_task
}

fn rate(n: usize, bytes: u64, took: Duration) -> String {
    format!(
        "{:>9.0} events/s  {:>7.1} MB/s",
        n as f64 / took.as_secs_f64(),
        bytes as f64 / 1e6 / took.as_secs_f64()
    )
}

async fn append_all(log: Arc<dyn EventLog>, per_task: Vec<Vec<Record>>) -> Duration {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for recs in per_task {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut it = recs.into_iter().peekable();
            while it.peek().is_some() {
                let batch: Vec<Record> = it.by_ref().take(64).collect();
                log.append(batch).await.expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

fn encoded_size(per_task: &[Vec<Record>]) -> u64 {
    per_task
        .iter()
        .flatten()
        .map(|r| encode_record(r).len() as u64)
        .sum()
}

/// The disk's rate for the same bytes in the same groups: write + fdatasync.
fn plain_file_baseline(dir: &std::path::Path, per_task: &[Vec<Record>]) -> Duration {
    let path = dir.join("baseline.bin");
    let mut f = std::fs::File::create(&path).unwrap();
    let groups: Vec<Vec<u8>> = per_task
        .iter()
        .flat_map(|recs| recs.chunks(64 * 8)) // one group commit ≈ the 8 appenders' batches
        .map(|c| c.iter().flat_map(encode_record).collect())
        .collect();
    let start = Instant::now();
    for g in &groups {
        f.write_all(g).unwrap();
        f.sync_data().unwrap();
    }
    let took = start.elapsed();
    let _ = std::fs::remove_file(&path);
    took
}

async fn bench_segment_log(a: &Args) {
    let dir = tempfile::tempdir_in(&a.disk).unwrap();
    let per_task = events(a.events);
    let n: usize = per_task.iter().map(Vec::len).sum();
    let bytes = encoded_size(&per_task);
    let base = plain_file_baseline(dir.path(), &per_task);
    let log: Arc<dyn EventLog> = Arc::new(
        FileLog::open(FileLogConfig::new(dir.path().join("log")))
            .await
            .unwrap(),
    );
    eprintln!("appending to the segment log (pid {})", std::process::id());
    let took = append_all(log, per_task).await;
    println!("segment log append, {n} events of 100 bytes (default group commit, fsync per group)");
    println!("  cloudtap FileLog      {}", rate(n, bytes, took));
    println!("  write+fdatasync file  {}", rate(n, bytes, base));
}

async fn bench_kafka(a: &Args, brokers: &str) {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let n_events = (a.events / 10).max(8000);
    let per_task = events(n_events);
    let n: usize = per_task.iter().map(Vec::len).sum();
    let bytes = encoded_size(&per_task);
    let topic = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let url = format!(
        "kafka://{brokers}/{topic}?partitions=6&single_record_batches=true&fetch.wait.max.ms=5"
    );
    let log: Arc<dyn EventLog> = Arc::new(
        KafkaLog::open(KafkaLogConfig::from_url(&url).unwrap())
            .await
            .unwrap(),
    );
    let payloads: Vec<(String, Vec<u8>)> = per_task
        .iter()
        .flatten()
        .map(|r| (r.chain_id.to_string(), encode_record(r)))
        .collect();
    let took = append_all(log, per_task).await;
    // Baseline: rdkafka straight to the broker, same settings, same bytes.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("batch.num.messages", "1")
        .create()
        .unwrap();
    let start = Instant::now();
    let mut pending = Vec::with_capacity(payloads.len());
    for (k, p) in &payloads {
        loop {
            match producer.send_result(FutureRecord::to(&topic).key(k).payload(p)) {
                Ok(d) => {
                    pending.push(d);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
    for d in pending {
        d.await.unwrap().unwrap();
    }
    let base = start.elapsed();
    println!(
        "Kafka append to the local tansu broker, {n} events of 100 bytes (the broker shares the 2 cores; tansu needs one record per batch)"
    );
    println!("  cloudtap KafkaLog     {}", rate(n, bytes, took));
    println!("  rdkafka producer      {}", rate(n, bytes, base));
}

fn frames(mb: usize) -> (Vec<Record>, u64) {
    let mut out = Vec::new();
    let mut w = ChainWriter::new(uuid::Uuid::now_v7());
    // Incompressible payloads (xorshift), as TLS traffic through a tunnel would be:
    // zstd cannot make the recorder look faster than the bytes it must write.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let n = mb * 1024 * 1024 / (16 * 1024);
    for i in 0..n as u64 {
        let payload: Vec<u8> = (0..16 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        out.push(w.seal_now(Body::Frame(Frame {
            stream_id: i % 8,
            direction: Direction::Up,
            offset: i * 16384,
            length: payload.len() as u32,
            payload: Some(payload.clone()),
        })));
    }
    (out, (n * 16 * 1024) as u64)
}

async fn bench_parquet(a: &Args, name: &str, store: Arc<dyn ObjectStore>) {
    let (recs, bytes) = frames(a.frames_mb);
    let log = Arc::new(MemoryLog::new());
    for c in recs.chunks(1024) {
        log.append(c.to_vec()).await.unwrap();
    }
    let settings = RecorderSettings::default();
    eprintln!("archiving frames to {name} (pid {})", std::process::id());
    let start = Instant::now();
    let report = Recorder::new(log, store.clone(), settings)
        .drain(&CancellationToken::new())
        .await
        .unwrap();
    let took = start.elapsed();
    let raw: Vec<u8> = recs
        .iter()
        .filter_map(|r| match &r.body {
            Body::Frame(f) => f.payload.clone(),
            _ => None,
        })
        .flatten()
        .collect();
    let raw = Bytes::from(raw);
    let start = Instant::now();
    store.put("baseline/raw.bin", raw).await.unwrap();
    let base = start.elapsed();
    println!(
        "frames into Parquet on {name}: {} records, {:.0} MB of payload, {} ranges",
        report.records,
        bytes as f64 / 1e6,
        report.ranges
    );
    println!(
        "  recorder (zstd Parquet)  {:>7.1} MB/s",
        bytes as f64 / 1e6 / took.as_secs_f64()
    );
    println!(
        "  one raw object put       {:>7.1} MB/s",
        bytes as f64 / 1e6 / base.as_secs_f64()
    );
}

async fn bench_lag(a: &Args) {
    let dir = tempfile::tempdir_in(&a.disk).unwrap();
    let log = Arc::new(
        FileLog::open(FileLogConfig::new(dir.path().join("log")))
            .await
            .unwrap(),
    );
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path().join("archive")));
    let recorder = Recorder::new(log.clone(), store, RecorderSettings::default());
    let stats = recorder.stats();
    let cancel = CancellationToken::new();
    let run = tokio::spawn(recorder.run(cancel.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let appended_at: Arc<std::sync::Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let writer = {
        let (log, stop, at) = (log.clone(), stop.clone(), appended_at.clone());
        tokio::spawn(async move {
            let mut w = ChainWriter::new(uuid::Uuid::now_v7());
            let payload: Vec<u8> = (0..16 * 1024).map(|i| (i % 251) as u8).collect();
            let mut off = 0u64;
            let mut bytes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<Record> = (0..16)
                    .map(|_| {
                        off += 1;
                        w.seal_now(Body::Frame(Frame {
                            stream_id: 1,
                            direction: Direction::Up,
                            offset: off * 16384,
                            length: 16384,
                            payload: Some(payload.clone()),
                        }))
                    })
                    .collect();
                let pos = log.append(batch).await.unwrap();
                bytes += 16 * 16384;
                at.lock().unwrap().push((pos.offset + 1, Instant::now()));
            }
            bytes
        })
    };
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        samples.push(lag(&log, &stats, &appended_at).await);
    }
    stop.store(true, Ordering::Relaxed);
    let bytes = writer.await.unwrap();
    let stopped = Instant::now();
    let written = start.elapsed();
    let mut below_1s = None;
    let mut zero = None;
    while stopped.elapsed() < Duration::from_secs(30) && zero.is_none() {
        let (records, secs) = lag(&log, &stats, &appended_at).await;
        if below_1s.is_none() && secs < 1.0 {
            below_1s = Some(stopped.elapsed());
        }
        if records == 0 {
            zero = Some(stopped.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    run.await.unwrap().unwrap();
    let max_records = samples.iter().map(|s| s.0).max().unwrap_or(0);
    let max_secs = samples.iter().map(|s| s.1).fold(0.0, f64::max);
    println!(
        "recorder lag while a writer appends 16 KiB frames to the segment log at full speed ({:.0} MB/s for {:.0} s)",
        bytes as f64 / 1e6 / written.as_secs_f64(),
        written.as_secs_f64()
    );
    println!("  max lag while writing   {max_records} records, {max_secs:.2} s");
    println!(
        "  after the writer stops  lag < 1 s after {:?}, zero after {:?}",
        below_1s, zero
    );
}

/// (records appended but not archived, seconds since the oldest of them was appended).
async fn lag(
    log: &FileLog,
    stats: &cloudtap_recorder::archive::RecorderStats,
    appended_at: &std::sync::Mutex<Vec<(u64, Instant)>>,
) -> (u64, f64) {
    let end = log.end().await.unwrap().get(0);
    let archived = stats
        .archived_to
        .lock()
        .unwrap()
        .get(&0)
        .copied()
        .unwrap_or(0);
    let records = end.saturating_sub(archived);
    if records == 0 {
        return (0, 0.0);
    }
    let at = appended_at.lock().unwrap();
    // The first append whose end lies past the archived point.
    let i = at.partition_point(|(end, _)| *end <= archived);
    let secs = at.get(i).map_or(0.0, |(_, t)| t.elapsed().as_secs_f64());
    (records, secs)
}

fn main() {
    let a = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        bench_segment_log(&a).await;
        if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "segment") {
            return;
        }
        if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "parquet") {
            let local = tempfile::tempdir_in(&a.disk).unwrap();
            bench_parquet(&a, "local disk", Arc::new(LocalStore::new(local.path()))).await;
            return;
        }
        if let Some(k) = &a.kafka {
            bench_kafka(&a, k).await;
        } else {
            println!("Kafka append: skipped (no --kafka)");
        }
        let local = tempfile::tempdir_in(&a.disk).unwrap();
        bench_parquet(&a, "local disk", Arc::new(LocalStore::new(local.path()))).await;
        if let Some((s3, bucket)) = &a.s3 {
            let prefix = format!("bench-{}", uuid::Uuid::now_v7().simple());
            bench_parquet(
                &a,
                "the S3 server (s3s-fs on the same disk)",
                Arc::new(S3Store::new(bucket, &prefix, s3).await),
            )
            .await;
        } else {
            println!("Parquet on S3: skipped (no --s3-endpoint)");
        }
        bench_lag(&a).await;
    });
}
