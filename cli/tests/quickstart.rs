//! The README's quickstart, with the real binaries: `cloudtapd all`, then from another
//! directory `cloudtapctl proxy demo-service`, curl-like requests through it,
//! `list-targets` and `close` over gRPC and, with gRPC unreachable, over HTTP.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::*;

#[test]
fn quickstart_proxy_list_close_over_grpc_and_http_fallback() {
    let data = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let d = Daemon::start("all", data.path(), &[]);
    assert!(
        d.stderr().contains("created development CA"),
        "{}",
        d.stderr()
    );

    // Proxy from an unrelated working directory, with no flags but the data dir.
    let mut proxy = cloudtapctl(data.path())
        .current_dir(elsewhere.path())
        .args(["-o", "json", "proxy", "demo-service"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(proxy.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let first: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let local = first["local_addr"].as_str().unwrap().to_string();
    let session = first["session_id"].as_str().unwrap().to_string();

    let resp = http_get(&local, "/");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("hello from cloudtap demo-service"), "{resp}");
    // Several connections share the tunnel.
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let local = local.clone();
            std::thread::spawn(move || http_get(&local, &format!("/bytes/{}", 1000 + i)))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let r = h.join().unwrap();
        assert!(r.contains(&format!("content-length: {}", 1000 + i)), "{r}");
    }
    assert!(http_get(&local, "/status/418").starts_with("HTTP/1.1 418"));

    // list-targets over gRPC.
    let (code, stdout, stderr) = run(cloudtapctl(data.path())
        .current_dir(elsewhere.path())
        .args(["-o", "json", "list-targets"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("falling back"), "{stderr}");
    let targets: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(targets[0]["name"], "demo-service");
    assert_eq!(targets[0]["live_sessions"], 1);

    // gRPC unreachable: the same answer over HTTP, and the fallback is announced.
    let dead = "127.0.0.1:1";
    let (code, stdout2, stderr) =
        run(cloudtapctl(data.path()).args(["--server", dead, "-o", "json", "list-targets"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("falling back to the HTTP API"), "{stderr}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stdout2).unwrap(),
        targets
    );

    // close over the HTTP fallback ends the proxy, which says why and does not reconnect.
    let (code, stdout, stderr) = run(cloudtapctl(data.path()).args([
        "--server",
        dead,
        "-o",
        "json",
        "close",
        "demo-service",
    ]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(&session), "{stdout}");
    let status = wait_exit(&mut proxy, Duration::from_secs(30));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut proxy.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("user_close"), "{err}");

    // Closing what is not open is an error (exit 2) that says what to pass.
    let (code, _, stderr) = run(cloudtapctl(data.path()).args(["close", "demo-service"]));
    assert_eq!(code, 2);
    assert!(stderr.contains("a target name or a session id"), "{stderr}");
    d.stop();
}

#[test]
fn expired_cached_token_logs_in_again_by_itself() {
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start("all", data.path(), &[]);
    let (code, _, stderr) = run(cloudtapctl(data.path()).args(["login"]));
    assert_eq!(code, 0, "{stderr}");
    // Pretend an hour went by: the cached token has expired.
    let cache = data.path().join("cli/token.json");
    let mut t: serde_json::Value = serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    let old_id = t["token_id"].as_str().unwrap().to_string();
    t["expires_unix"] = 0.into();
    std::fs::write(&cache, serde_json::to_vec(&t).unwrap()).unwrap();
    let (code, _, stderr) = run(cloudtapctl(data.path()).args(["-o", "json", "list-targets"]));
    assert_eq!(code, 0, "{stderr}");
    let t: serde_json::Value = serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    assert_ne!(
        t["token_id"].as_str().unwrap(),
        old_id,
        "a new token was cached"
    );
    d.stop();
}

#[test]
fn unreachable_edge_and_bad_input_fail_with_exit_2_and_a_next_step() {
    let data = tempfile::tempdir().unwrap();
    // No cloudtapd at all: credentials are missing.
    let (code, _, stderr) = run(cloudtapctl(data.path()).args(["list-targets"]));
    assert_eq!(code, 2);
    assert!(stderr.contains("cloudtapd all"), "{stderr}");
    // Usage errors are exit 2 as well.
    let (code, _, _) = run(cloudtapctl(data.path()).args(["proxy"]));
    assert_eq!(code, 2);
    // A bad --target flag stops cloudtapd before it binds anything.
    let (code, _, stderr) = run(cloudtapd()
        .args(["all", "--target", "nonsense"])
        .arg("--data-dir")
        .arg(data.path()));
    assert_eq!(code, 2);
    assert!(stderr.contains("NAME=HOST:PORT"), "{stderr}");
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn proxy_reconnects_on_the_same_local_port_after_the_edge_restarts() {
    let data = tempfile::tempdir().unwrap();
    let ports: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let fixed = [
        "--grpc-addr",
        &ports[0],
        "--http-addr",
        &ports[1],
        "--tunnel-addr",
        &ports[2],
    ];
    let d = Daemon::start("all", data.path(), &fixed);
    let mut proxy = cloudtapctl(data.path())
        .args(["-o", "json", "proxy", "demo-service"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(proxy.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let local = serde_json::from_str::<serde_json::Value>(&line).unwrap()["local_addr"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(http_get(&local, "/").contains("hello from cloudtap"));
    let mut err = BufReader::new(proxy.stderr.take().unwrap());

    d.stop();
    let mut said = String::new();
    err.read_line(&mut said).unwrap();
    assert!(
        said.contains("tunnel dropped (edge_shutdown); reconnecting"),
        "{said}"
    );
    let d = Daemon::start("all", data.path(), &fixed);
    // The proxy keeps its port and comes back by itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut l = String::new();
        err.read_line(&mut l).unwrap();
        if l.contains("tunnel re-established") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline && !l.is_empty(),
            "proxy did not reconnect: {l}"
        );
    }
    assert!(http_get(&local, "/").contains("hello from cloudtap"));

    // Ctrl-C closes the tunnel cleanly: exit 0, and the edge no longer holds it.
    std::process::Command::new("kill")
        .args(["-INT", &proxy.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(wait_exit(&mut proxy, Duration::from_secs(20)), Some(0));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert!(rest.contains("tunnel closed"), "{rest}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, stderr) =
            run(cloudtapctl(data.path()).args(["-o", "json", "list-targets"]));
        assert_eq!(code, 0, "{stderr}");
        if serde_json::from_str::<serde_json::Value>(&out).unwrap()[0]["live_sessions"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the session was not closed after Ctrl-C: {out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d.stop();
}
