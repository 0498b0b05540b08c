//! Incident bundles end to end: a session recorded through `cloudtapctl proxy` against
//! a live `cloudtapd all`, exported, verified, tampered with, opened in the tools people
//! have (tshark, a HAR 1.2 schema validator, DuckDB), imported into another store, and
//! replayed from the bundle with no server and no data dir.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use common::shop::*;
use common::*;

/// A store with targets `v1` (captured `full`, so stream bytes are stored) and `v2`.
fn config(dir: &Path, v1: &str, v2: &str) -> PathBuf {
    let cfg = format!(
        "[policy]\nadmins = [\"dev-admin\"]\n\n\
         [[targets]]\nname = \"v1\"\nupstream = \"{v1}\"\nprotocol = \"http1\"\ncapture = \"full\"\n\n\
         [[targets]]\nname = \"v2\"\nupstream = \"{v2}\"\nprotocol = \"http1\"\n"
    );
    let p = dir.join("cloudtap.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

struct Recorded {
    data: tempfile::TempDir,
    daemon: Daemon,
    v2: Upstream,
    session: String,
    bundle: PathBuf,
}

/// The replay issue's session: 50 mixed GETs on 5 connections to `v1`, closed, and
/// exported.
fn recorded() -> Recorded {
    let data = tempfile::tempdir().unwrap();
    let (v1, v2) = (upstream(1), upstream(2));
    let cfg = config(data.path(), &v1.addr, &v2.addr);
    let daemon = Daemon::start("all", data.path(), &["--config", cfg.to_str().unwrap()]);
    let session = record_fifty_gets(data.path(), "v1");
    wait_rows(
        data.path(),
        &format!(
            "SELECT session_id FROM sessions WHERE session_id = '{session}' AND status = 'closed'"
        ),
        1,
    );
    let bundle = data.path().join("incident.tar.zst");
    let (code, out, err) = run(cloudtapctl(data.path()).args([
        "export",
        &session,
        "--file",
        bundle.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("\"sessions\":1"), "{out}");
    Recorded {
        data,
        daemon,
        v2,
        session,
        bundle,
    }
}

/// The rows `sql` returns now.
fn rows(data: &Path, sql: &str) -> Vec<serde_json::Value> {
    let (code, out, err) = run(cloudtapctl(data).args(["-o", "json", "query", sql]));
    assert_eq!(code, 0, "{sql}: {err}");
    ndjson(&out)
}

fn verify(data: &Path, bundle: &Path, extra: &[&str]) -> (i32, String, String) {
    run(cloudtapctl(data)
        .args(["-o", "table", "bundle", "verify"])
        .arg(bundle)
        .args(extra))
}

/// The members of a bundle, in archive order.
fn members(bundle: &Path) -> Vec<(String, Vec<u8>)> {
    let f = std::fs::File::open(bundle).unwrap();
    let mut tar = tar::Archive::new(zstd::stream::read::Decoder::new(f).unwrap());
    let mut out = Vec::new();
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        e.read_to_end(&mut bytes).unwrap();
        out.push((name, bytes));
    }
    out
}

fn pack(path: &Path, members: &[(String, Vec<u8>)]) {
    let f = std::fs::File::create(path).unwrap();
    let mut tar = tar::Builder::new(zstd::stream::write::Encoder::new(f, 3).unwrap());
    for (name, bytes) in members {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        tar.append_data(&mut h, name, bytes.as_slice()).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
}

#[test]
fn an_export_verifies_and_every_tampering_is_named() {
    let r = recorded();
    let (code, out, err) = verify(r.data.path(), &r.bundle, &[]);
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        "files      ok",
        "chains     ok",
        "signature  ok",
        "verified",
    ] {
        assert!(out.contains(line), "{line}: {out}");
    }

    // One byte flipped inside any member: verification fails and names that member.
    let original = members(&r.bundle);
    let names: Vec<String> = original.iter().map(|(n, _)| n.clone()).collect();
    for n in [
        "manifest.json",
        "manifest.sig",
        "README.txt",
        "capture.pcapng",
        "events.jsonl",
        "exchanges.har",
        "tables/events.parquet",
        "tables/frames.parquet",
        "tables/http_exchanges.parquet",
        "tables/replay_diffs.parquet",
        "tables/sessions.parquet",
        "tables/streams.parquet",
    ] {
        assert!(names.contains(&n.to_string()), "{n} in {names:?}");
    }
    let tampered = r.data.path().join("tampered.tar.zst");
    for (i, (name, bytes)) in original.iter().enumerate() {
        let mut changed = original.clone();
        changed[i].1[bytes.len() / 2] ^= 0x01;
        pack(&tampered, &changed);
        let (code, out, err) = verify(r.data.path(), &tampered, &[]);
        assert_eq!(code, 1, "{name}: {out}{err}");
        assert!(out.contains("verification FAILED"), "{name}: {out}");
        let named = out
            .lines()
            .filter(|l| l.starts_with("               "))
            .any(|l| l.contains(name.as_str()));
        assert!(named, "{name} is not named: {out}");
        if name.starts_with("tables/") || name.ends_with(".jsonl") || name.ends_with(".har") {
            // A data member changed: its hash says so; the signature still holds.
            assert!(out.contains("signature  ok"), "{name}: {out}");
        }
    }

    // Over the HTTP API when gRPC cannot be reached: the same checks hold.
    let via_http = r.data.path().join("via-http.tar.zst");
    let (code, out, err) = run(cloudtapctl(r.data.path())
        .args(["--server", "127.0.0.1:1", "export", &r.session, "--file"])
        .arg(&via_http));
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("falling back to the HTTP API"), "{err}");
    let (code, out, err) = verify(r.data.path(), &via_http, &[]);
    assert_eq!(code, 0, "{out}{err}");

    // Selected by time and predicate instead of by id: the same session.
    let selected = r.data.path().join("selected.tar.zst");
    let (code, out, err) = run(cloudtapctl(r.data.path())
        .args([
            "-o",
            "json",
            "export",
            "--since",
            "1h",
            "--where",
            "target = 'v1'",
            "--file",
        ])
        .arg(&selected));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("\"sessions\":1"), "{out}");
    let m = members(&selected);
    let manifest: serde_json::Value = serde_json::from_slice(&m[0].1).unwrap();
    assert_eq!(m[0].0, "manifest.json");
    assert_eq!(manifest["sessions"][0]["session_id"], r.session.as_str());
    assert_eq!(manifest["selection"]["where"], "target = 'v1'");
    assert_eq!(manifest["record_counts"]["http_exchanges"], 50);
    let (code, _, err) = run(cloudtapctl(r.data.path())
        .args(["export", "--where", "target = 'v2'", "--file"])
        .arg(&selected)
        .arg("--force"));
    assert_eq!(code, 2);
    assert!(err.contains("no session you may read matches"), "{err}");
    let (code, _, err) = run(cloudtapctl(r.data.path())
        .args(["export", "--where", "no_such_column = 1", "--file"])
        .arg(&selected)
        .arg("--force"));
    assert_eq!(code, 2);
    assert!(err.contains("no_such_column"), "{err}");
    let (code, _, err) = run(cloudtapctl(r.data.path())
        .args(["export", "--since", "yesterday", "--file"])
        .arg(&selected));
    assert_eq!(code, 2);
    assert!(err.contains("neither a duration"), "{err}");

    // Truncated or corrupted archives fail with a clear error, exit 1.
    let whole = std::fs::read(&r.bundle).unwrap();
    std::fs::write(&tampered, &whole[..whole.len() / 2]).unwrap();
    let (code, out, err) = verify(r.data.path(), &tampered, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("is not a complete cloudtap bundle") && err.contains("truncated or corrupted"),
        "{err}"
    );
    let mut corrupt = whole.clone();
    let at = corrupt.len() / 3;
    corrupt[at] ^= 0xff;
    std::fs::write(&tampered, &corrupt).unwrap();
    let (code, out, err) = verify(r.data.path(), &tampered, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("is not a complete cloudtap bundle"), "{err}");
    std::fs::write(&tampered, b"not a bundle").unwrap();
    let (code, _, err) = verify(r.data.path(), &tampered, &[]);
    assert_eq!(code, 1);
    assert!(err.contains("not zstd-compressed"), "{err}");

    // Another server's CLI trusts only its own export key: the signature check alone
    // fails. Trusting the first server's key, all holds.
    let other = tempfile::tempdir().unwrap();
    let b = Daemon::start("all", other.path(), &[]);
    let (code, out, err) = verify(other.path(), &r.bundle, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("files      ok"), "{out}");
    assert!(out.contains("chains     ok"), "{out}");
    assert!(out.contains("signature  FAIL"), "{out}");
    assert!(
        out.contains("not a signature over manifest.json by any trusted export key"),
        "{out}"
    );
    let key = r.data.path().join("pki/export-signing.pub");
    let (code, out, err) = verify(other.path(), &r.bundle, &["--trust", key.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    // The token issuer key is not the export key.
    let token_key = r.data.path().join("pki/token-signing.pub");
    let (code, out, _) = verify(
        other.path(),
        &r.bundle,
        &["--trust", token_key.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{out}");
    b.stop();

    // Each export is an audit record; a session the caller may not name is refused.
    let audits = wait_rows(
        r.data.path(),
        &format!(
            "SELECT detail FROM events WHERE kind = 'audit' AND action = 'export' \
             AND detail LIKE '%sessions={} since=%exported 1 sessions%' ORDER BY seq",
            r.session
        ),
        2,
    );
    assert!(
        audits[0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("via=grpc"),
        "{audits:?}"
    );
    assert!(
        audits[1]["detail"]
            .as_str()
            .unwrap()
            .starts_with("via=http"),
        "{audits:?}"
    );
    let (code, _, err) = run(cloudtapctl(r.data.path()).args([
        "export",
        "01234567-89ab-7def-8123-456789abcdef",
        "--file",
        tampered.to_str().unwrap(),
        "--force",
    ]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no session 01234567-89ab-7def-8123-456789abcdef that you may read"),
        "{err}"
    );
    let (code, _, err) = run(cloudtapctl(r.data.path()).args([
        "export",
        &r.session,
        "--file",
        r.bundle.to_str().unwrap(),
    ]));
    assert_eq!(code, 2);
    assert!(err.contains("pass --force"), "{err}");
    drop(r.daemon);
}

#[test]
fn a_bundle_opens_in_wireshark_devtools_and_duckdb() {
    let r = recorded();
    let dir = r.data.path().join("x");
    std::fs::create_dir_all(dir.join("tables")).unwrap();
    for (name, bytes) in members(&r.bundle) {
        std::fs::write(dir.join(&name), bytes).unwrap();
    }

    // Stream 0 in the capture is the session's first stream: its bytes, each way.
    let first = wait_rows(
        r.data.path(),
        &format!(
            "SELECT stream_id FROM events WHERE chain_id = '{}' AND kind = 'stream_opened' ORDER BY ts LIMIT 1",
            r.session
        ),
        1,
    );
    let stream = first[0]["stream_id"].as_u64().unwrap();
    let frames = rows(
        r.data.path(),
        &format!(
            "SELECT direction, encode(payload, 'hex') AS hex FROM frames WHERE chain_id = '{}' \
             AND stream_id = {stream} ORDER BY seq",
            r.session
        ),
    );
    let (mut up, mut down) = (String::new(), String::new());
    for f in &frames {
        let hex = f["hex"].as_str().expect("payload stored at capture full");
        match f["direction"].as_str().unwrap() {
            "up" => up += hex,
            _ => down += hex,
        }
    }
    assert!(up.len() > 100 && down.len() > 100, "{up} {down}");

    if let Some(tshark) =
        cloudtap_recorder::testenv::service("CLOUDTAP_TEST_TSHARK", "tshark follow check")
    {
        let (code, out, err) = run(std::process::Command::new(tshark).args([
            "-r",
            dir.join("capture.pcapng").to_str().unwrap(),
            "-q",
            "-z",
            "follow,tcp,raw,0",
        ]));
        assert_eq!(code, 0, "{err}");
        let body = out
            .split("Node 1:")
            .nth(1)
            .expect("tshark printed the conversation");
        let (mut client, mut server) = (String::new(), String::new());
        for line in body.lines().skip(1) {
            if line.starts_with('=') {
                break;
            }
            match line.strip_prefix('\t') {
                Some(hex) => server += hex.trim(),
                None => client += line.trim(),
            }
        }
        assert_eq!(client, up, "client → server bytes of stream 0");
        assert_eq!(server, down, "server → client bytes of stream 0");
    }

    if let Some(node_path) =
        cloudtap_recorder::testenv::service("CLOUDTAP_TEST_NODE_PATH", "HAR 1.2 schema check")
    {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/validate-har.js");
        let (code, out, err) = run(std::process::Command::new("node")
            .env("NODE_PATH", node_path)
            .arg(script)
            .arg(dir.join("exchanges.har")));
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("valid HAR 1.2: 50 entries"), "{out}");
    }

    if let Some(python) =
        cloudtap_recorder::testenv::service("CLOUDTAP_TEST_PYTHON", "duckdb bundle check")
    {
        let script = r#"
import duckdb, json, sys
root = sys.argv[1]
out = {}
for t in ["sessions", "streams", "events", "frames", "http_exchanges", "replay_diffs"]:
    out[t] = duckdb.sql(f"SELECT count(*) FROM '{root}/tables/{t}.parquet'").fetchone()[0]
out["chain"] = duckdb.sql(f"SELECT min(seq), max(seq), count(DISTINCT record_hash) FROM (SELECT seq, record_hash FROM '{root}/tables/events.parquet' UNION ALL SELECT seq, record_hash FROM '{root}/tables/frames.parquet' UNION ALL SELECT seq, record_hash FROM '{root}/tables/http_exchanges.parquet')").fetchone()
out["paths"] = duckdb.sql(f"SELECT count(DISTINCT path) FROM '{root}/tables/http_exchanges.parquet'").fetchone()[0]
print(json.dumps(out))
"#;
        let (code, out, err) = run(std::process::Command::new(python)
            .args(["-c", script])
            .arg(&dir));
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["sessions"], 1, "{v}");
        assert_eq!(v["http_exchanges"], 50, "{v}");
        assert_eq!(v["paths"], 42, "{v}");
        // One chain, seq 0 to n - 1, every record once.
        let (min, max, n) = (
            v["chain"][0].as_u64().unwrap(),
            v["chain"][1].as_u64().unwrap(),
            v["chain"][2].as_u64().unwrap(),
        );
        assert_eq!((min, max + 1), (0, n), "{v}");
    }
    drop(r.daemon);
}

#[test]
fn an_imported_bundle_queries_like_its_source_and_replays_with_no_server() {
    let r = recorded();
    let sql = format!(
        "SELECT seq, kind, record_hash FROM events WHERE chain_id = '{}' ORDER BY seq",
        r.session
    );
    let xsql = format!(
        "SELECT method, path, query, status, response_body_sha256 FROM http_exchanges \
         WHERE session_id = '{}' ORDER BY stream_id, exchange_index",
        r.session
    );
    let source_events = rows(r.data.path(), &sql);
    let source_exchanges = wait_rows(r.data.path(), &xsql, 50);
    assert!(source_events.len() > 10);

    // Imported into the store it came from, it adds no row twice (whether the session
    // is archived already or still in the log).
    let (code, out, err) = run(cloudtapctl(r.data.path()).arg("import").arg(&r.bundle));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(rows(r.data.path(), &sql), source_events);
    assert_eq!(rows(r.data.path(), &xsql), source_exchanges);

    // Another machine's store: import, query through its own server.
    let other = tempfile::tempdir().unwrap();
    let c = Daemon::start("all", other.path(), &[]);
    let key = r.data.path().join("pki/export-signing.pub");
    let (code, out, err) = run(cloudtapctl(other.path()).arg("import").arg(&r.bundle));
    assert_eq!(code, 2, "an untrusted signer is refused: {out}{err}");
    assert!(err.contains("--trust"), "{err}");
    let import = |expect: &str| {
        let (code, out, err) = run(cloudtapctl(other.path())
            .args(["-o", "table", "import"])
            .arg(&r.bundle)
            .args(["--trust", key.to_str().unwrap()]));
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains(expect), "{out}");
    };
    let (code, _, err) = run(cloudtapctl(other.path())
        .arg("import")
        .arg(&r.bundle)
        .args(["--archive", "s3://bucket/prefix"]));
    assert_eq!(code, 2);
    assert!(err.contains("local archives only"), "{err}");
    import("imported 1 sessions");
    assert_eq!(rows(other.path(), &sql), source_events);
    assert_eq!(wait_rows(other.path(), &xsql, 50), source_exchanges);
    // Twice changes nothing.
    import("was imported before: nothing changed");
    assert_eq!(rows(other.path(), &sql), source_events);
    let (code, out, err) = run(cloudtapctl(other.path()).args(["-o", "json", "sessions", "list"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&r.session), "{out}");
    c.stop();

    // With no server and no data dir: query and sessions read the bundle itself…
    let nowhere = other.path().join("no-such-dir");
    let tmp = other.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let offline = |args: &[&str]| {
        run(cloudtapctl(&nowhere)
            .env("TMPDIR", &tmp)
            .env("CLOUDTAP_SERVER", "127.0.0.1:1")
            .env("CLOUDTAP_HTTP_URL", "http://127.0.0.1:1")
            .args(args))
    };
    let bundle = r.bundle.to_str().unwrap();
    let (code, out, err) = offline(&["-o", "json", "query", "--from-bundle", bundle, &xsql]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ndjson(&out), source_exchanges);
    assert!(err.contains("signature not checked"), "{err}");
    let (code, out, err) = offline(&[
        "-o",
        "json",
        "sessions",
        "show",
        &r.session,
        "--from-bundle",
        bundle,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("/items/7"), "{out}");

    // … and replay reproduces the replay issue's diff straight against v2.
    let (code, out, err) = offline(&[
        "-o",
        "json",
        "replay",
        &r.session,
        "--from-bundle",
        bundle,
        "--direct",
        &r.v2.addr,
        "--speed",
        "max",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["http_requests"], 50, "{report}");
    assert_eq!(differences(&report), v2_differences(), "{report}");
    assert!(err.contains("findings are not recorded"), "{err}");
    assert!(!nowhere.exists(), "nothing was written to the data dir");
    // The bundle's throw-away copy is gone, also after an exit 1.
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    drop(r.daemon);
}

#[test]
fn the_export_route_is_documented_and_nothing_else() {
    assert_eq!(
        documented_routes("export"),
        served_routes(cloudtap_cli::export_role::HTTP_ROUTES)
    );
}

#[test]
fn a_session_still_open_exports_as_far_as_recorded_and_is_not_imported() {
    let data = tempfile::tempdir().unwrap();
    let (v1, v2) = (upstream(1), upstream(2));
    let cfg = config(data.path(), &v1.addr, &v2.addr);
    let _d = Daemon::start("all", data.path(), &["--config", cfg.to_str().unwrap()]);
    let (mut proxy, _, local, session) = start_proxy_session(data.path(), "v1");
    requests(&local, &[get("/items/1"), get("/items/2")]);
    wait_rows(
        data.path(),
        &format!("SELECT path FROM http_exchanges WHERE session_id = '{session}'"),
        2,
    );
    let bundle = data.path().join("open.tar.zst");
    let (code, out, err) = run(cloudtapctl(data.path())
        .args(["export", &session, "--file"])
        .arg(&bundle));
    assert_eq!(code, 0, "{out}{err}");
    let manifest: serde_json::Value = serde_json::from_slice(&members(&bundle)[0].1).unwrap();
    assert!(
        manifest["sessions"][0].get("closed_at").is_none(),
        "{manifest}"
    );
    assert_eq!(manifest["record_counts"]["sessions"], 0, "{manifest}");
    let (code, out, err) = verify(data.path(), &bundle, &[]);
    assert_eq!(code, 0, "{out}{err}");

    // Read in place, yes; imported as if whole, no.
    let (code, out, err) = run(cloudtapctl(data.path()).args([
        "-o",
        "json",
        "query",
        "--from-bundle",
        bundle.to_str().unwrap(),
        "SELECT path FROM http_exchanges ORDER BY path",
    ]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(ndjson(&out).len(), 2, "{out}");
    let other = tempfile::tempdir().unwrap();
    let key = data.path().join("pki/export-signing.pub");
    let (code, _, err) = run(cloudtapctl(other.path())
        .arg("import")
        .arg(&bundle)
        .args(["--trust", key.to_str().unwrap()]));
    assert_eq!(code, 2);
    assert!(
        err.contains("still open when the bundle was exported"),
        "{err}"
    );
    let _ = proxy.kill();
    let _ = proxy.wait();
}
