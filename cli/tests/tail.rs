//! `cloudtapctl tail` and `cloudtapctl proxy` show the requests of a running tunnel,
//! in order, with the right content, against the real binaries.

mod common;

use std::process::Stdio;
use std::sync::mpsc;

use common::*;

/// (method, path, query, status) of the next `n` exchange lines.
fn exchanges(rx: &mpsc::Receiver<String>, n: usize) -> Vec<(String, String, String, u64)> {
    (0..n)
        .map(|_| {
            let line = next(rx, "exchange line");
            let v: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
            assert_eq!(v["kind"], "http_exchange", "{v}");
            assert_eq!(v["target"], "demo-service", "{v}");
            let x = &v["exchange"];
            assert_eq!(x["phase"], "complete", "{v}");
            assert!(x["duration_ms"].as_f64().unwrap() > 0.0, "{v}");
            (
                x["method"].as_str().unwrap().to_owned(),
                x["path"].as_str().unwrap().to_owned(),
                x["query"].as_str().unwrap().to_owned(),
                x["status"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn tail_and_proxy_print_the_requests_of_a_running_tunnel_in_order() {
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start("all", data.path(), &[]);

    let mut tail = cloudtapctl(data.path())
        .args(["-o", "json", "tail", "--target", "demo-service"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tail_out = lines(tail.stdout.take().unwrap());
    let tail_err = lines(tail.stderr.take().unwrap());
    // Subscribed once it says so: nothing after this point can be missed.
    loop {
        let l = next(&tail_err, "tail's start line");
        if l.contains("following") {
            break;
        }
    }

    let (mut proxy, proxy_out, local) = start_proxy(data.path(), "demo-service");

    assert!(http_get(&local, "/").starts_with("HTTP/1.1 200"));
    assert!(http_get(&local, "/status/418").starts_with("HTTP/1.1 418"));
    assert!(http_get(&local, "/echo?token=tail-secret&x=1").starts_with("HTTP/1.1 200"));

    let want = vec![
        ("GET".to_owned(), "/".to_owned(), String::new(), 200),
        ("GET".into(), "/status/418".into(), String::new(), 418),
        (
            "GET".into(),
            "/echo".into(),
            "token=[REDACTED]&x=1".into(),
            200,
        ),
    ];
    assert_eq!(exchanges(&tail_out, 3), want, "cloudtapctl tail");
    assert_eq!(exchanges(&proxy_out, 3), want, "cloudtapctl proxy");

    let _ = tail.kill();
    let _ = tail.wait();
    let _ = proxy.kill();
    let _ = proxy.wait();
    d.stop();
}
