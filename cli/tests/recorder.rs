//! The recorder binary against faults: stopped between upload and commit marker and
//! SIGKILLed there, SIGKILLed at random points, and the archive read by DuckDB. Every
//! scenario ends by reading the archive through the markers with the Parquet reader
//! and checking each record is there exactly once.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use cloudtap_recorder::{EventLog, FileLog, FileLogConfig};
use cloudtap_schemas::*;
use common::*;

/// Writes `sessions` complete sessions (open, streams with frames, close) and an
/// audit chain into a fresh segment log at `dir/log`; returns every record.
fn fill_log(dir: &Path, sessions: usize) -> Vec<Record> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let log = FileLog::open(FileLogConfig::new(dir.join("log")))
            .await
            .unwrap();
        let mut all = Vec::new();
        let mut audit = ChainWriter::new(uuid::Uuid::now_v7());
        for s in 0..sessions {
            let mut w = ChainWriter::new(uuid::Uuid::now_v7());
            let mut batch = vec![w.seal_now(Body::SessionOpened(SessionOpened {
                edge: "edge".into(),
                identity: format!("user-{}", s % 5),
                target: "db".into(),
                ..Default::default()
            }))];
            for k in 0..(s % 3) as u64 {
                batch.push(w.seal_now(Body::StreamOpened(StreamOpened {
                    stream_id: k,
                    target: "db".into(),
                    ..Default::default()
                })));
                for f in 0..5u64 {
                    let payload = vec![(s + f as usize) as u8; 100 + f as usize * 10];
                    batch.push(w.seal_now(Body::Frame(Frame {
                        stream_id: k,
                        direction: if f % 2 == 0 {
                            Direction::Up
                        } else {
                            Direction::Down
                        },
                        offset: f * 1000,
                        length: payload.len() as u32,
                        payload: Some(payload),
                    })));
                }
                batch.push(w.seal_now(Body::StreamClosed(StreamClosed {
                    stream_id: k,
                    bytes_up: 1,
                    bytes_down: 2,
                    error: String::new(),
                })));
            }
            batch.push(w.seal_now(Body::SessionClosed(SessionClosed {
                reason: CloseReason::Normal,
                detail: String::new(),
                bytes_up: 1,
                bytes_down: 2,
                streams: (s % 3) as u64,
            })));
            batch.push(audit.seal_now(Body::Audit(Audit {
                actor: "test".into(),
                action: format!("session-{s}"),
                detail: String::new(),
            })));
            log.append(batch.clone()).await.unwrap();
            all.extend(batch);
        }
        all
    })
}

fn write_config(dir: &Path, range_records: u64) -> PathBuf {
    let p = dir.join("cloudtapd.toml");
    std::fs::write(
        &p,
        format!("[recorder]\nrange_records = {range_records}\nflush_idle_ms = 100\n"),
    )
    .unwrap();
    p
}

fn recorder(dir: &Path, cfg: &Path, once: bool) -> Command {
    let mut c = cloudtapd();
    c.arg("recorder")
        .arg("--data-dir")
        .arg(dir)
        .arg("--config")
        .arg(cfg)
        .env_remove("CLOUDTAP_LOG")
        .env_remove("CLOUDTAP_ARCHIVE")
        .env_remove("CLOUDTAP_FAULT_STOP_BEFORE_MARKER");
    if once {
        c.arg("--once");
    }
    c
}

/// Every file under `root`, as keys relative to it.
fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

/// (records read through the markers, Parquet files on disk that no marker lists).
fn read_archive(archive: &Path) -> (Vec<Record>, Vec<String>) {
    let mut listed = HashSet::new();
    let mut records = Vec::new();
    for key in walk(archive).iter().filter(|k| k.starts_with("_ranges/")) {
        let marker: serde_json::Value =
            serde_json::from_slice(&std::fs::read(archive.join(key)).unwrap()).unwrap();
        for f in marker["files"].as_array().unwrap() {
            let key = f["key"].as_str().unwrap().to_owned();
            let file = std::fs::File::open(archive.join(&key)).unwrap();
            let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                .unwrap()
                .build()
                .unwrap();
            if matches!(f["table"].as_str(), Some("frames" | "events")) {
                for b in reader {
                    records.extend(tables::records_from_batch(&b.unwrap()).unwrap());
                }
            }
            listed.insert(key);
        }
    }
    let unlisted = walk(archive)
        .into_iter()
        .filter(|k| k.ends_with(".parquet") && !listed.contains(k))
        .collect();
    (records, unlisted)
}

/// The archive holds exactly `expected`: same count, no (chain, seq) twice, every
/// chain gap-free with hashes that recompute.
fn assert_exactly_once(archive: &Path, expected: &[Record]) {
    let (records, unlisted) = read_archive(archive);
    assert!(
        unlisted.is_empty(),
        "files no marker lists remain: {unlisted:?}"
    );
    let distinct: HashSet<_> = records.iter().map(|r| (r.chain_id, r.seq)).collect();
    assert_eq!(
        distinct.len(),
        records.len(),
        "duplicated (chain, seq) in the archive"
    );
    assert_eq!(records.len(), expected.len(), "records lost");
    let mut chains: BTreeMap<uuid::Uuid, Vec<Record>> = BTreeMap::new();
    for r in records {
        chains.entry(r.chain_id).or_default().push(r);
    }
    for (id, mut c) in chains {
        c.sort_by_key(|r| r.seq);
        verify_chain(None, &c).unwrap_or_else(|e| panic!("chain {id}: {e}"));
    }
    let mut want: Vec<_> = expected.iter().map(|r| (r.chain_id, r.seq)).collect();
    want.sort();
    let mut got: Vec<_> = distinct.into_iter().collect();
    got.sort();
    assert_eq!(got, want);
}

fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S …": the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

#[test]
fn stopped_between_upload_and_marker_then_killed_leaves_no_gap_or_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let records = fill_log(dir.path(), 40);
    let cfg = write_config(dir.path(), 40);
    let archive = dir.path().join("archive");

    let mut child = recorder(dir.path(), &cfg, true)
        .env("CLOUDTAP_FAULT_STOP_BEFORE_MARKER", "3")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while process_state(child.id()) != Some('T') {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the recorder exited before reaching the injected stop"
        );
        assert!(
            Instant::now() < deadline,
            "waited 60 s for the recorder to stop itself before the third marker"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Stopped right after uploading range 3's files: they exist, unlisted.
    let (before, unlisted) = read_archive(&archive);
    assert!(!unlisted.is_empty(), "range 3's files should be uploaded");
    assert!(
        !before.is_empty() && before.len() < records.len(),
        "two ranges committed before the stop, got {} records",
        before.len()
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let (code, out, err) = run(&mut recorder(dir.path(), &cfg, true));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("archived"), "{out}");
    assert_exactly_once(&archive, &records);
}

#[test]
fn killed_at_random_points_and_restarted_resumes_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let records = fill_log(dir.path(), 250);
    let cfg = write_config(dir.path(), 15);
    let archive = dir.path().join("archive");
    // A seed from the clock, printed, so a failure can be replayed with KILL_SEED.
    let mut seed: u64 = std::env::var("KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("KILL_SEED={seed}");
    let mut committed = Vec::new();
    for _ in 0..6 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let after = Duration::from_millis(50 + (seed >> 33) % 400);
        let mut child = recorder(dir.path(), &cfg, false)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(after);
        child.kill().unwrap(); // SIGKILL at an arbitrary point
        child.wait().unwrap();
        committed.push(walk(&archive.join("_ranges")).len());
    }
    eprintln!("markers after each kill: {committed:?}");
    let (code, out, err) = run(&mut recorder(dir.path(), &cfg, true));
    assert_eq!(code, 0, "{out}{err}");
    assert_exactly_once(&archive, &records);
}

#[test]
fn the_archive_opens_in_duckdb_with_the_documented_schema() {
    let Some(python) =
        cloudtap_recorder::testenv::service("CLOUDTAP_TEST_PYTHON", "duckdb reader check")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let records = fill_log(dir.path(), 30);
    let cfg = write_config(dir.path(), 1000);
    let (code, out, err) = run(&mut recorder(dir.path(), &cfg, true));
    assert_eq!(code, 0, "{out}{err}");
    let archive = dir.path().join("archive");
    let script = r#"
import duckdb, json, sys
root = sys.argv[1]
out = {}
for t in ["frames", "events", "sessions", "streams"]:
    # The partition values are zero-padded ("hour=07"): declare their types, as
    # docs/log-format.md tells readers to; inferred, "07" would be a VARCHAR.
    rel = duckdb.sql(f"SELECT * FROM read_parquet('{root}/{t}/**/*.parquet', hive_partitioning = true, hive_types = {{'date': DATE, 'hour': INTEGER}})")
    out[t] = {"columns": [[c, str(ty)] for c, ty in zip(rel.columns, rel.types)],
              "rows": rel.count("*").fetchone()[0]}
out["bytes"] = duckdb.sql(f"SELECT sum(octet_length(payload)) FROM read_parquet('{root}/frames/**/*.parquet')").fetchone()[0]
print(json.dumps(out))
"#;
    let (code, out, err) = run(Command::new(&python).args(["-c", script]).arg(&archive));
    assert_eq!(code, 0, "duckdb failed: {err}");
    let got: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let frames = records
        .iter()
        .filter(|r| matches!(r.body, Body::Frame(_)))
        .count();
    assert_eq!(got["frames"]["rows"], frames);
    assert_eq!(got["events"]["rows"], records.len() - frames);
    assert_eq!(got["sessions"]["rows"], 30);
    let payload: usize = records
        .iter()
        .filter_map(|r| match &r.body {
            Body::Frame(f) => f.payload.as_ref().map(Vec::len),
            _ => None,
        })
        .sum();
    assert_eq!(got["bytes"], payload);
    // The documented schema (docs/log-format.md, "Parquet tables"), as DuckDB types.
    let cols = |t: &str| -> Vec<(String, String)> {
        got[t]["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c[0].as_str().unwrap().into(), c[1].as_str().unwrap().into()))
            .collect()
    };
    let envelope = [
        ("chain_id", "VARCHAR"),
        ("session_id", "VARCHAR"),
        ("seq", "UBIGINT"),
        ("ts", "TIMESTAMP WITH TIME ZONE"),
        ("prev_hash", "BLOB"),
        ("record_hash", "BLOB"),
        ("schema_version", "UINTEGER"),
    ];
    let want_frames: Vec<(String, String)> = envelope
        .iter()
        .chain(&[
            ("stream_id", "UBIGINT"),
            ("direction", "VARCHAR"),
            ("byte_offset", "UBIGINT"),
            ("length", "UINTEGER"),
            ("payload", "BLOB"),
            ("date", "DATE"),
            ("hour", "INTEGER"),
        ])
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(cols("frames"), want_frames);
    let events = cols("events");
    assert_eq!(&events[..7], &want_frames[..7]);
    assert_eq!(events[7], ("kind".into(), "VARCHAR".into()));
    let sessions: Vec<String> = cols("sessions").into_iter().map(|c| c.0).collect();
    for c in [
        "session_id",
        "identity",
        "target",
        "opened_at",
        "closed_at",
        "close_reason",
    ] {
        assert!(sessions.contains(&c.to_string()), "sessions lacks {c}");
    }
}
