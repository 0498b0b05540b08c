//! The seam between archive and log tail while both move: a writer appends sessions,
//! the recorder commits small ranges as they come, and queries run throughout. Every
//! answer must hold each chain gap-free from seq 0 with no (chain, seq) twice, and
//! never fewer records than the answer before.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cloudtap_query::{QueryEngine, QuerySettings, Reader, Scope};
use cloudtap_recorder::archive::{Recorder, RecorderSettings, read_markers};
use cloudtap_recorder::store::{LocalStore, ObjectStore};
use cloudtap_schemas::{
    Body, ChainWriter, CloseReason, Direction, Frame, SessionClosed, SessionOpened,
};
use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::UInt64Type;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

fn session(n: u64) -> Vec<cloudtap_schemas::Record> {
    let mut w = ChainWriter::new(uuid::Uuid::now_v7());
    let mut out = vec![w.seal_now(Body::SessionOpened(SessionOpened {
        edge: "edge-1".into(),
        edge_chain_id: uuid::Uuid::nil(),
        identity: "alice".into(),
        target: "db".into(),
        upstream: "db:5432".into(),
        client_cert_sha256: String::new(),
        token_id: String::new(),
        on_log_backpressure: "block".into(),
        replay_of: String::new(),
    }))];
    for i in 0..(n % 7 + 1) {
        out.push(w.seal_now(Body::Frame(Frame {
            stream_id: 1,
            direction: Direction::Up,
            offset: i * 4,
            length: 4,
            payload: Some(b"ping".to_vec()),
        })));
    }
    out.push(w.seal_now(Body::SessionClosed(SessionClosed {
        reason: CloseReason::Normal,
        detail: String::new(),
        bytes_up: (n % 7 + 1) * 4,
        bytes_down: 0,
        streams: 0,
    })));
    out
}

async fn rows(engine: &QueryEngine, sql: &str) -> Vec<RecordBatch> {
    let reader = Reader {
        identity: "auditor".into(),
        scope: Scope::All,
    };
    let out = engine.execute(&reader, sql, None).await.unwrap();
    out.batches.map(|b| b.unwrap()).collect().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_see_every_record_once_while_the_recorder_commits() {
    let dir = tempfile::tempdir().unwrap();
    let log = cloudtap_recorder::open_log(
        dir.path().join("log").to_str().unwrap(),
        cloudtap_recorder::FsyncPolicy::Never,
        0,
    )
    .await
    .unwrap();
    let archive = dir.path().join("archive");
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(&archive));
    let cancel = CancellationToken::new();
    let recorder = tokio::spawn(
        Recorder::new(
            log.clone(),
            store.clone(),
            RecorderSettings {
                range_records: 40,
                flush_idle: Duration::from_millis(20),
                ..RecorderSettings::default()
            },
        )
        .run(cancel.clone()),
    );
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let log = log.clone();
        let writing = writing.clone();
        tokio::spawn(async move {
            let mut appended = 0u64;
            for n in 0..400u64 {
                let batch = session(n);
                appended += batch.len() as u64;
                log.append(batch).await.unwrap();
                if n % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            writing.store(false, Ordering::Release);
            appended
        })
    };
    let files =
        cloudtap_query::engine::datafusion_store(archive.to_str().unwrap(), &Default::default())
            .unwrap();
    let engine = QueryEngine::new(
        store.clone(),
        files,
        Some(log.clone()),
        QuerySettings::default(),
    )
    .unwrap();
    let sql = "SELECT chain_id, count(*) AS n, count(DISTINCT seq) AS d, min(seq) AS lo, max(seq) AS hi FROM \
               (SELECT chain_id, seq FROM frames UNION ALL SELECT chain_id, seq FROM events) \
               GROUP BY chain_id";
    let mut last_total = 0u64;
    let mut queries = 0;
    let mut markers_seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let still_writing = writing.load(Ordering::Acquire);
        let mut total = 0u64;
        for b in rows(&engine, sql).await {
            let (n, d, lo, hi) = (
                b.column(1)
                    .as_primitive::<datafusion::arrow::datatypes::Int64Type>(),
                b.column(2)
                    .as_primitive::<datafusion::arrow::datatypes::Int64Type>(),
                b.column(3).as_primitive::<UInt64Type>(),
                b.column(4).as_primitive::<UInt64Type>(),
            );
            for i in 0..b.num_rows() {
                let chain = b.column(0).as_string::<i32>().value(i);
                assert_eq!(n.value(i), d.value(i), "chain {chain}: a seq twice");
                assert_eq!(lo.value(i), 0, "chain {chain}: does not start at 0");
                assert_eq!(hi.value(i) + 1, n.value(i) as u64, "chain {chain}: a gap");
                total += n.value(i) as u64;
            }
        }
        assert!(
            total >= last_total,
            "records went from {last_total} to {total}"
        );
        last_total = total;
        queries += 1;
        markers_seen.push(read_markers(store.as_ref()).await.unwrap().len());
        if !still_writing {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the writer did not finish in 60 s"
        );
    }
    let appended = writer.await.unwrap();
    // After the writer: everything, once, whatever the recorder has committed by now.
    let end: u64 = rows(
        &engine,
        "SELECT count(*) AS n FROM (SELECT seq FROM frames UNION ALL SELECT seq FROM events)",
    )
    .await
    .iter()
    .map(|b| {
        b.column(0)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
            .value(0) as u64
    })
    .sum();
    assert_eq!(end, appended);
    cancel.cancel();
    recorder.await.unwrap().unwrap();
    // The test only means something if ranges were committed while queries ran.
    let first = markers_seen.first().copied().unwrap_or(0);
    let last = markers_seen.last().copied().unwrap_or(0);
    assert!(
        queries >= 3 && last > first,
        "{queries} queries; markers {markers_seen:?}"
    );
    println!(
        "{queries} queries while the recorder went from {first} to {last} ranges; {appended} records"
    );
}
