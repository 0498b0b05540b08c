//! Replay rate at `--speed max` against the original capture rate, in the same run.
//!
//! Usage: `cloudtap-bench-replay --cloudtapd PATH --cloudtapctl PATH --dir DIR
//!         [--requests N] [--concurrency C]`
//!
//! Starts a fast HTTP/1.1 upstream here (one fixed JSON answer per request, keep-alive),
//! `cloudtapd all` with it as target `fast`, and `cloudtapctl proxy fast`; sends N GETs
//! on C keep-alive connections straight to the upstream (the baseline), then the same
//! through the tunnel (the capture rate); then runs
//! `cloudtapctl replay <session> --speed max --concurrency C` against the same target
//! and reads its own rate (sending and diffing) and the wall-clock time of the whole
//! command (which also rebuilds the session through the query service).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Args {
    cloudtapd: PathBuf,
    cloudtapctl: PathBuf,
    dir: PathBuf,
    requests: usize,
    concurrency: usize,
}

fn args() -> Args {
    let mut a = Args {
        cloudtapd: PathBuf::new(),
        cloudtapctl: PathBuf::new(),
        dir: std::env::temp_dir().join("cloudtap-bench-replay"),
        requests: 20_000,
        concurrency: 8,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let v = pair.get(1).expect("every flag takes a value");
        match pair[0].as_str() {
            "--cloudtapd" => a.cloudtapd = v.into(),
            "--cloudtapctl" => a.cloudtapctl = v.into(),
            "--dir" => a.dir = v.into(),
            "--requests" => a.requests = v.parse().expect("--requests N"),
            "--concurrency" => a.concurrency = v.parse().expect("--concurrency C"),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// Answers every request with the same small JSON document, keep-alive.
fn upstream() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let _ = conn.set_nodelay(true);
                let mut rd = BufReader::new(conn.try_clone().unwrap());
                let mut wr = conn;
                let body = br#"{"id":1,"name":"item","price":10,"tags":["a","b"]}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let mut line = String::new();
                loop {
                    line.clear();
                    if rd.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line.trim_end().is_empty() {
                        // End of a head (GETs have no body).
                        let mut out = head.clone().into_bytes();
                        out.extend_from_slice(body);
                        if wr.write_all(&out).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn per_conn(a: &Args) -> usize {
    a.requests / a.concurrency
}

/// `conc` keep-alive connections to `addr`, `per` GETs one after another on each;
/// how long it took.
fn drive(addr: &str, per: usize, conc: usize) -> Duration {
    let started = Instant::now();
    let clients: Vec<_> = (0..conc)
        .map(|c| {
            let addr = addr.to_owned();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).unwrap();
                let _ = s.set_nodelay(true);
                let mut rd = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                for i in 0..per {
                    write!(s, "GET /items/{c}/{i} HTTP/1.1\r\nhost: fast\r\n\r\n").unwrap();
                    let mut len = 0;
                    loop {
                        line.clear();
                        rd.read_line(&mut line).unwrap();
                        if line.trim_end().is_empty() {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    rd.read_exact(&mut body).unwrap();
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    started.elapsed()
}

fn ctl(a: &Args) -> Command {
    let mut c = Command::new(&a.cloudtapctl);
    c.env("CLOUDTAP_DATA_DIR", &a.dir)
        .env("CLOUDTAP_LOG_LEVEL", "error");
    c
}

fn main() {
    let a = args();
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir).unwrap();
    let cfg = a.dir.join("bench.toml");
    let upstream_addr = upstream();
    std::fs::write(
        &cfg,
        format!(
            "[[targets]]\nname = \"fast\"\nupstream = \"{}\"\nprotocol = \"http1\"\n[policy]\nadmins = [\"dev-admin\"]\n",
            upstream_addr
        ),
    )
    .unwrap();
    let mut d = Command::new(&a.cloudtapd)
        .args([
            "all",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--tunnel-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&a.dir)
        .arg("--config")
        .arg(&cfg)
        .env("CLOUDTAP_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    for line in BufReader::new(d.stdout.take().unwrap()).lines() {
        if line.unwrap().starts_with("ready") {
            break;
        }
    }
    let mut proxy = ctl(&a)
        .args(["-o", "json", "proxy", "fast"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(proxy.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let local = v["local_addr"].as_str().unwrap().to_owned();
    let session = v["session_id"].as_str().unwrap().to_owned();

    // Baseline: the same client straight to the upstream, no tunnel.
    let direct = drive(&upstream_addr, per_conn(&a), a.concurrency);
    // Capture: the same client through the tunnel.
    let capture = drive(&local, per_conn(&a), a.concurrency);
    let sent = per_conn(&a) * a.concurrency;
    let _ = proxy.kill();
    let _ = proxy.wait();

    // Wait until every exchange is readable.
    let count = format!("SELECT count(*) AS n FROM http_exchanges WHERE session_id = '{session}'");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = ctl(&a)
            .args(["-o", "json", "query", &count])
            .output()
            .unwrap();
        let n = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["n"].as_u64())
            .unwrap_or(0);
        if n as usize >= sent {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of {sent} exchanges readable after 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let t = Instant::now();
    let out = ctl(&a)
        .args([
            "-o",
            "json",
            "replay",
            &session,
            "--speed",
            "max",
            "--concurrency",
        ])
        .arg(a.concurrency.to_string())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let wall = t.elapsed();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "replay said {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let _ = d.kill();
    let _ = d.wait();

    let capture_rate = sent as f64 / capture.as_secs_f64();
    let direct_rate = sent as f64 / direct.as_secs_f64();
    let replay_rate = report["rate"].as_f64().unwrap();
    println!(
        "requests                         {sent} on {} connections",
        a.concurrency
    );
    println!(
        "direct (same client, no tunnel)  {direct_rate:>10.0} req/s  ({:.2} s)",
        direct.as_secs_f64()
    );
    println!(
        "capture (proxy, same client)     {capture_rate:>10.0} req/s  ({:.2} s)",
        capture.as_secs_f64()
    );
    println!(
        "replay --speed max (send+diff)   {replay_rate:>10.0} req/s  ({:.2} s)  = {:.2}x capture",
        report["elapsed_ms"].as_f64().unwrap() / 1e3,
        replay_rate / capture_rate
    );
    println!(
        "replay command, wall clock       {:>10.0} req/s  ({:.2} s, incl. rebuild through the query service)",
        sent as f64 / wall.as_secs_f64(),
        wall.as_secs_f64()
    );
    println!("differences found                {}", report["differing"]);
    println!(
        "target (issue 7)                 >= 5000 req/s at --speed max with the diff computed"
    );
}
