//! `cloudtapctl query` / `sessions` against a live `cloudtapd all`, and a Flight SQL
//! client that is not cloudtap's (ADBC's Python driver) getting the same rows.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn query(data: &std::path::Path, extra: &[&str], sql: &str) -> (i32, String, String) {
    run(cloudtapctl(data)
        .args(["-o", "json"])
        .args(extra)
        .args(["query", sql]))
}

/// Runs `sql` until `done` holds for its rows, for at most 20 s.
fn wait_for(
    data: &std::path::Path,
    sql: &str,
    what: &str,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = query(data, &[], sql);
        assert_eq!(code, 0, "{sql}: {err}");
        let rows = ndjson(&out);
        if done(&rows) {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "waited 20 s for {what}; last answer to {sql}: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const REQUESTS: &str =
    "SELECT method, path, query, status, identity, target FROM requests ORDER BY start_ts";

#[test]
fn query_sessions_and_flight_sql_over_a_live_capture() {
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start("all", data.path(), &[]);

    let (mut proxy, _, local) = start_proxy(data.path(), "demo-service");
    assert!(http_get(&local, "/").starts_with("HTTP/1.1 200"));
    assert!(http_get(&local, "/status/503").starts_with("HTTP/1.1 503"));
    assert!(http_get(&local, "/echo?token=query-secret&x=1").starts_with("HTTP/1.1 200"));

    // The exchanges are in the log tail (the recorder may not have archived them yet)
    // and the session is open.
    let rows = wait_for(data.path(), REQUESTS, "three exchanges", |r| r.len() == 3);
    let got: Vec<(String, String, u64)> = rows
        .iter()
        .map(|r| {
            assert_eq!(r["target"], "demo-service", "{r}");
            assert_eq!(r["identity"], "dev-admin", "{r}");
            (
                r["path"].as_str().unwrap().to_owned(),
                r["query"].as_str().unwrap().to_owned(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("/".to_owned(), String::new(), 200),
            ("/status/503".into(), String::new(), 503),
            ("/echo".into(), "token=[REDACTED]&x=1".into(), 200),
        ]
    );
    let session = wait_for(
        data.path(),
        "SELECT session_id, status FROM sessions",
        "the open session",
        |r| r.len() == 1,
    );
    assert_eq!(session[0]["status"], "open");
    let sid = session[0]["session_id"].as_str().unwrap().to_owned();

    // `sessions list` and `show`.
    let (code, list, err) = run(cloudtapctl(data.path()).args([
        "-o",
        "json",
        "sessions",
        "list",
        "--target",
        "demo-service",
        "--status",
        "open",
        "--since",
        "1h",
    ]));
    assert_eq!(code, 0, "{err}");
    let list = ndjson(&list);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["session_id"], sid.as_str());
    let (code, show, err) =
        run(cloudtapctl(data.path()).args(["-o", "json", "sessions", "show", &sid]));
    assert_eq!(code, 0, "{err}");
    let show: serde_json::Value = serde_json::from_str(show.trim()).unwrap();
    assert_eq!(show["session"][0]["target"], "demo-service");
    assert_eq!(show["exchanges"].as_array().unwrap().len(), 3, "{show}");
    let kinds: Vec<&str> = show["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"session_opened"), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "http_exchange").count(),
        3,
        "{kinds:?}"
    );
    let (code, table, _) =
        run(cloudtapctl(data.path()).args(["-o", "table", "sessions", "show", &sid]));
    assert_eq!(code, 0);
    assert!(
        table.contains("TIMELINE") && table.contains("/status/503"),
        "{table}"
    );

    // CSV, and the HTTP fallback when gRPC cannot be reached.
    let (code, csv, _) = run(cloudtapctl(data.path()).args(["-o", "csv", "query", REQUESTS]));
    assert_eq!(code, 0);
    assert!(
        csv.starts_with("method,path,query,status,identity,target\n"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 4, "{csv}");
    let (code, via_http, err) = query(data.path(), &["--server", "http://127.0.0.1:1"], REQUESTS);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("falling back to the HTTP API"), "{err}");
    assert_eq!(ndjson(&via_http), rows);

    // Errors: exit 2 and a message that says what to do.
    let (code, _, err) = query(data.path(), &[], "SELECT * FROM framez");
    assert_eq!(code, 2);
    assert!(
        err.contains("the tables are: sessions, streams, events, frames"),
        "{err}"
    );
    let (code, _, err) = query(data.path(), &[], "SELEC 1");
    assert_eq!(code, 2);
    assert!(
        err.contains("syntax error") && err.contains("Line: 1, Column: 1"),
        "{err}"
    );
    let (code, _, err) = query(data.path(), &[], "DELETE FROM frames");
    assert_eq!(code, 2);
    assert!(err.contains("read-only"), "{err}");

    // The row limit cuts and says so.
    let (code, out, err) =
        run(cloudtapctl(data.path()).args(["-o", "json", "query", "--max-rows", "2", REQUESTS]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(ndjson(&out).len(), 2);
    assert!(err.contains("cut at 2 rows"), "{err}");

    // A user whose policy reads no target sees no session.
    let (code, token, err) = run(cloudtapctl(data.path()).args([
        "-o",
        "json",
        "token",
        "issue",
        "--subject",
        "eve",
        "--ttl",
        "5m",
    ]));
    assert_eq!(code, 0, "{err}");
    let eve: serde_json::Value = serde_json::from_str(token.trim()).unwrap();
    let eve = eve["token"].as_str().unwrap().to_owned();
    let (code, out, err) = query(
        data.path(),
        &["--token", &eve],
        "SELECT (SELECT count(*) FROM sessions) + (SELECT count(*) FROM frames) AS n",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(ndjson(&out), vec![serde_json::json!({"n": 0})]);

    // ADBC's Flight SQL driver, on the gRPC port, with the same bearer token.
    if let Some(python) =
        cloudtap_recorder::testenv::service("CLOUDTAP_TEST_PYTHON", "ADBC Flight SQL client")
    {
        let (code, admin, err) = run(cloudtapctl(data.path()).args([
            "-o",
            "json",
            "token",
            "issue",
            "--subject",
            "dev-admin",
            "--ttl",
            "5m",
        ]));
        assert_eq!(code, 0, "{err}");
        let admin: serde_json::Value = serde_json::from_str(admin.trim()).unwrap();
        let script = r#"
import json, sys
import adbc_driver_flightsql.dbapi as flight_sql
from adbc_driver_flightsql import DatabaseOptions
uri, token, sql = sys.argv[1], sys.argv[2], sys.argv[3]
with flight_sql.connect(uri, db_kwargs={DatabaseOptions.AUTHORIZATION_HEADER.value: "Bearer " + token}, autocommit=True) as conn:
    with conn.cursor() as cur:
        cur.execute(sql)
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
print(json.dumps(rows))
"#;
        let (code, out, err) = run(Command::new(&python)
            .args(["-c", script])
            .arg(format!("grpc://{}", d.endpoints.grpc))
            .arg(admin["token"].as_str().unwrap())
            .arg(REQUESTS));
        assert_eq!(code, 0, "ADBC client failed: {err}");
        let via_flight: Vec<serde_json::Value> = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(via_flight, rows, "Flight SQL and cloudtapctl disagree");
        // A wrong token is refused, as everywhere else.
        let (code, _, err) = run(Command::new(&python)
            .args(["-c", script])
            .arg(format!("grpc://{}", d.endpoints.grpc))
            .arg("not-a-token")
            .arg("SELECT 1"));
        assert_ne!(code, 0);
        assert!(err.to_lowercase().contains("unauthenticated"), "{err}");
    }

    // Every query is an audit record on the service's chain.
    let audits = wait_for(
        data.path(),
        "SELECT actor, detail FROM events WHERE kind = 'audit' AND action = 'query'",
        "query audit records",
        |r| r.len() >= 10,
    );
    assert!(
        audits.iter().any(|a| a["actor"] == "eve"),
        "eve's query is audited: {audits:?}"
    );
    assert!(
        audits
            .iter()
            .any(|a| a["detail"].as_str().unwrap().contains("via=http"))
    );

    // After the tunnel ends the session is closed, and the archive and tail still
    // agree on every exchange.
    let _ = proxy.kill();
    let _ = proxy.wait();
    let closed = wait_for(
        data.path(),
        "SELECT status FROM sessions",
        "the session to close",
        |r| r.len() == 1 && r[0]["status"] == "closed",
    );
    assert_eq!(closed.len(), 1);
    let (code, again, _) = query(data.path(), &[], REQUESTS);
    assert_eq!(code, 0);
    assert_eq!(ndjson(&again), rows);
    d.stop();
}

/// `cloudtapd query` alone, on the data dir an edge left behind: the same tables,
/// authenticated with the same tokens, and its own audit chain.
#[test]
fn the_query_role_runs_alone_on_what_an_edge_left() {
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start("all", data.path(), &[]);
    let (mut proxy, _, local) = start_proxy(data.path(), "demo-service");
    assert!(http_get(&local, "/status/502").starts_with("HTTP/1.1 502"));
    wait_for(data.path(), REQUESTS, "the exchange", |r| r.len() == 1);
    let (code, token, err) = run(cloudtapctl(data.path()).args([
        "-o",
        "json",
        "token",
        "issue",
        "--subject",
        "dev-admin",
        "--ttl",
        "10m",
    ]));
    assert_eq!(code, 0, "{err}");
    let token: serde_json::Value = serde_json::from_str(token.trim()).unwrap();
    let token = token["token"].as_str().unwrap().to_owned();
    let _ = proxy.kill();
    let _ = proxy.wait();
    d.stop();

    let _ = std::fs::remove_file(data.path().join("query-endpoints.json"));
    let mut node = cloudtapd()
        .args([
            "query",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let node_out = lines(node.stdout.take().unwrap());
    let node_err = lines(node.stderr.take().unwrap());
    loop {
        let l = node_out
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                let err: Vec<String> = node_err.try_iter().collect();
                panic!("cloudtapd query did not say ready: {err:?}")
            });
        if l.starts_with("ready") {
            break;
        }
    }
    let eps: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.path().join("query-endpoints.json")).unwrap())
            .unwrap();
    let grpc = format!("http://{}", eps["grpc"].as_str().unwrap());
    let http = format!("http://{}", eps["http"].as_str().unwrap());
    let (code, out, err) = query(
        data.path(),
        &["--server", &grpc, "--token", &token],
        "SELECT path, status, session_status FROM requests",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        ndjson(&out),
        vec![serde_json::json!({"path": "/status/502", "status": 502, "session_status": "closed"})]
    );
    // Over its HTTP port too, and a wrong token is refused there as well.
    let (code, _, err) = query(
        data.path(),
        &[
            "--server",
            "http://127.0.0.1:1",
            "--http-url",
            &http,
            "--token",
            "forged",
        ],
        "SELECT 1",
    );
    assert_eq!(code, 2);
    assert!(err.contains("token"), "{err}");
    // Not an edge: no tunnels here.
    let health = http_get(eps["http"].as_str().unwrap(), "/v1/targets");
    assert!(health.starts_with("HTTP/1.1 404"), "{health}");
    Command::new("kill")
        .args(["-TERM", &node.id().to_string()])
        .status()
        .unwrap();
    let status = node.wait().unwrap();
    assert!(status.success(), "cloudtapd query exited with {status}");
}
