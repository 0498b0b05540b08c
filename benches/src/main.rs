//! cloudtap's tunnel benchmark. Not a test: it prints figures beside a baseline
//! measured in the same run and asserts nothing. Run it through `scripts/bench.sh`,
//! which builds release binaries and passes their paths.
//!
//! Usage: `cloudtap-bench --cloudtapd PATH --cloudtapctl PATH --tmpfs DIR --disk DIR
//!         [--bytes N] [--round-trips N] [--idle-streams N]`
//!
//! Each figure compares the same client and server connected directly (plain TCP on
//! loopback) with the same pair through `cloudtapctl proxy` → `cloudtapd` (TLS 1.3,
//! yamux, every chunk recorded in the traffic log):
//!
//! - bulk upload throughput, with the data dir on tmpfs and on disk (and the disk's
//!   sustained write rate from `dd … conv=fdatasync` beside it);
//! - round-trip latency of a 64-byte request/response, p50 and p99;
//! - RSS of cloudtapd and cloudtapctl per idle stream, with N streams open;
//! - HTTP through routes at each capture level (`full`, `exchanges`, `metadata`): one
//!   large POST's throughput and a small GET's round trip on a keep-alive connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Args {
    cloudtapd: PathBuf,
    cloudtapctl: PathBuf,
    tmpfs: PathBuf,
    disk: PathBuf,
    bytes: u64,
    round_trips: usize,
    idle_streams: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        cloudtapd: PathBuf::new(),
        cloudtapctl: PathBuf::new(),
        tmpfs: PathBuf::from("/dev/shm"),
        disk: std::env::temp_dir(),
        bytes: 1 << 30,
        round_trips: 20_000,
        idle_streams: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--cloudtapd" => a.cloudtapd = v.into(),
            "--cloudtapctl" => a.cloudtapctl = v.into(),
            "--tmpfs" => a.tmpfs = v.into(),
            "--disk" => a.disk = v.into(),
            "--bytes" => a.bytes = v.parse().expect("--bytes N"),
            "--round-trips" => a.round_trips = v.parse().expect("--round-trips N"),
            "--idle-streams" => a.idle_streams = v.parse().expect("--idle-streams N"),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(
        a.cloudtapd.exists() && a.cloudtapctl.exists(),
        "--cloudtapd and --cloudtapctl must name the built binaries"
    );
    a
}

/// A sink (reads everything, then answers one byte), an echo server, and an idle
/// server (accepts and holds connections).
fn servers() -> (String, String, String) {
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let idle = TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs = (
        sink.local_addr().unwrap().to_string(),
        echo.local_addr().unwrap().to_string(),
        idle.local_addr().unwrap().to_string(),
    );
    std::thread::spawn(move || {
        for s in sink.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                }
                let _ = s.write_all(b"k");
            });
        }
    });
    std::thread::spawn(move || {
        for s in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let mut buf = [0u8; 64];
                while r.read_exact(&mut buf).is_ok() {
                    if w.write_all(&buf).is_err() {
                        break;
                    }
                }
            });
        }
    });
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in idle.incoming().flatten() {
            held.push(s);
        }
    });
    addrs
}

/// An HTTP/1.1 server (keep-alive): `POST /upload` reads the body and answers `ok`;
/// anything else gets a 64-byte body.
fn http_server() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve_http(s));
        }
    });
    addr
}

fn serve_http(s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::with_capacity(256 * 1024, s);
    let mut line = String::new();
    loop {
        let mut len = 0u64;
        let mut upload = false;
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if l.starts_with("POST /upload") {
                upload = true;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut left = len;
        let mut buf = vec![0u8; 256 * 1024];
        while left > 0 {
            let n = r
                .read(&mut buf[..left.min(256 * 1024) as usize])
                .unwrap_or(0);
            if n == 0 {
                return;
            }
            left -= n as u64;
        }
        let body: &[u8] = if upload {
            b"ok"
        } else {
            b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if w.write_all(&[head.as_bytes(), body].concat()).is_err() {
            return;
        }
    }
}

/// One `POST /upload` of `bytes` in 64 KiB writes on a fresh connection; MB/s.
fn http_upload(addr: &str, bytes: u64) -> f64 {
    let mut s = TcpStream::connect(addr).unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    let start = Instant::now();
    write!(
        s,
        "POST /upload HTTP/1.1\r\nhost: bench\r\ncontent-type: text/plain\r\ncontent-length: {bytes}\r\n\r\n"
    )
    .unwrap();
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        s.write_all(&chunk[..n]).unwrap();
        sent += n as u64;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.ends_with(b"\r\n\r\nok") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the server closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    bytes as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// `GET /small` round trips on one keep-alive connection; (p50, p99) in µs.
fn http_latency(addr: &str, n: usize) -> (f64, f64) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let req = b"GET /small HTTP/1.1\r\nhost: bench\r\n\r\n";
    let mut buf = [0u8; 4096];
    let mut one = || {
        s.write_all(req).unwrap();
        let mut got = 0;
        // The response is 64 bytes of body after a fixed-size head.
        loop {
            got += s.read(&mut buf[got..]).unwrap();
            if buf[..got].ends_with(b"abcdef") {
                break;
            }
        }
    };
    for _ in 0..n / 10 {
        one();
    }
    let mut samples: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            one();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (samples[n / 2], samples[n * 99 / 100])
}

/// Uploads `bytes` in 64 KiB writes, waits for the sink's acknowledgement; MB/s.
fn upload(addr: &str, bytes: u64) -> f64 {
    let mut s = TcpStream::connect(addr).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        s.write_all(&chunk[..n]).unwrap();
        sent += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).unwrap();
    bytes as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// 64-byte ping-pong; returns (p50, p99) in microseconds.
fn latency(addr: &str, n: usize) -> (f64, f64) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    for _ in 0..n / 10 {
        s.write_all(&msg).unwrap();
        s.read_exact(&mut buf).unwrap();
    }
    let mut samples: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            s.write_all(&msg).unwrap();
            s.read_exact(&mut buf).unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (samples[n / 2], samples[n * 99 / 100])
}

struct Stack {
    edge: Child,
    proxies: Vec<(Child, String)>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        for (p, _) in &mut self.proxies {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.edge.id().to_string()])
            .status();
        let _ = self.edge.wait();
    }
}

/// The routes of the benchmark edge, in the order of `Stack::proxies`.
const ROUTES: [&str; 6] = [
    "sink",
    "echo",
    "idle",
    "http-full",
    "http-exchanges",
    "http-metadata",
];

/// Starts cloudtapd (edge) with the targets and one `cloudtapctl proxy` each.
fn stack(a: &Args, data: &Path, targets: &(String, String, String), http: &str) -> Stack {
    let _ = std::fs::remove_dir_all(data);
    std::fs::create_dir_all(data).unwrap();
    let cfg = data.join("bench.toml");
    let mut toml = format!(
        "[[targets]]\nname = \"sink\"\nupstream = \"{}\"\n[[targets]]\nname = \"echo\"\nupstream = \"{}\"\n[[targets]]\nname = \"idle\"\nupstream = \"{}\"\n",
        targets.0, targets.1, targets.2
    );
    for level in ["full", "exchanges", "metadata"] {
        toml.push_str(&format!(
            "[[targets]]\nname = \"http-{level}\"\nupstream = \"{http}\"\ncapture = \"{level}\"\n"
        ));
    }
    toml.push_str("[policy]\nadmins = [\"dev-admin\"]\n");
    std::fs::write(&cfg, toml).unwrap();
    let mut edge = Command::new(&a.cloudtapd)
        .args([
            "edge",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--tunnel-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data)
        .arg("--config")
        .arg(&cfg)
        .env("CLOUDTAP_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = BufReader::new(edge.stdout.take().unwrap());
    for line in out.lines() {
        if line.unwrap().starts_with("ready") {
            break;
        }
    }
    let mut st = Stack {
        edge,
        proxies: Vec::new(),
    };
    for t in ROUTES {
        let mut p = Command::new(&a.cloudtapctl)
            .args(["-o", "json", "proxy", t])
            .env("CLOUDTAP_DATA_DIR", data)
            .env("CLOUDTAP_LOG_LEVEL", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(p.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("proxy said {line:?}: {e}"));
        st.proxies
            .push((p, v["local_addr"].as_str().unwrap().to_string()));
    }
    st
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn dd_rate(dir: &Path) -> f64 {
    let f = dir.join("cloudtap-bench-dd");
    let out = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", f.display()))
        .args(["bs=1M", "count=1024", "conv=fdatasync"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&f);
    // "... copied, 1.234 s, 870 MB/s"
    let text = String::from_utf8_lossy(&out.stderr);
    let secs: f64 = text
        .split(", ")
        .find_map(|p| p.strip_suffix(" s").and_then(|v| v.parse().ok()))
        .expect("dd reports its time");
    (1u64 << 30) as f64 / secs / 1e6
}

fn main() {
    let a = parse_args();
    let targets = servers();
    let http = http_server();
    let mb = a.bytes as f64 / 1e6;
    println!(
        "cloudtap tunnel benchmark ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();

    println!("bulk upload, {mb:.0} MB in 64 KiB writes (MB/s)");
    let direct = upload(&targets.0, a.bytes);
    println!("  direct (TCP loopback)            {direct:>9.1}");
    let tmp = stack(&a, &a.tmpfs.join("cloudtap-bench"), &targets, &http);
    let via_tmpfs = upload(&tmp.proxies[0].1, a.bytes);
    println!(
        "  tunnel, log on tmpfs             {via_tmpfs:>9.1}   {:.3}× direct   (target ≥ 0.35×)",
        via_tmpfs / direct
    );

    println!();
    println!(
        "round trip, 64-byte request/response, {} samples (µs)",
        a.round_trips
    );
    let (d50, d99) = latency(&targets.1, a.round_trips);
    let (t50, t99) = latency(&tmp.proxies[1].1, a.round_trips);
    println!("  direct                           p50 {d50:>7.1}   p99 {d99:>7.1}");
    println!("  tunnel (tmpfs)                   p50 {t50:>7.1}   p99 {t99:>7.1}");
    println!(
        "  added by the tunnel              p50 {:>7.1}   p99 {:>7.1}   (target added p50 ≤ 40 µs)",
        t50 - d50,
        t99 - d99
    );

    println!();
    println!("memory with {} idle streams (RSS)", a.idle_streams);
    let edge_pid = tmp.edge.id();
    let ctl_pid = tmp.proxies[2].0.id();
    let (e0, c0) = (rss_kib(edge_pid), rss_kib(ctl_pid));
    let mut held = Vec::new();
    for _ in 0..a.idle_streams {
        let mut s = TcpStream::connect(&tmp.proxies[2].1).unwrap();
        s.write_all(b"x").unwrap();
        held.push(s);
    }
    // Let every stream be accepted and dialled upstream.
    std::thread::sleep(Duration::from_secs(2));
    let (e1, c1) = (rss_kib(edge_pid), rss_kib(ctl_pid));
    let per = |before: u64, after: u64| {
        after.saturating_sub(before) as f64 * 1024.0 / a.idle_streams as f64 / 1000.0
    };
    println!(
        "  cloudtapd    {e0:>7} KiB → {e1:>7} KiB   {:>6.1} KB per stream   (target ≤ 32 KB)",
        per(e0, e1)
    );
    println!(
        "  cloudtapctl  {c0:>7} KiB → {c1:>7} KiB   {:>6.1} KB per stream   (target ≤ 32 KB)",
        per(c0, c1)
    );
    drop(held);

    println!();
    let http_bytes = a.bytes / 4;
    println!(
        "HTTP/1.1 by capture level, log on tmpfs: one POST of {:.0} MB (MB/s); GET round trip, {} samples (µs)",
        http_bytes as f64 / 1e6,
        a.round_trips
    );
    let direct_up = http_upload(&http, http_bytes);
    let (h50, h99) = http_latency(&http, a.round_trips);
    println!(
        "  direct                  {direct_up:>9.1} MB/s               p50 {h50:>7.1}   p99 {h99:>7.1}"
    );
    for (i, level) in ["full", "exchanges", "metadata"].iter().enumerate() {
        let addr = &tmp.proxies[3 + i].1;
        let up = http_upload(addr, http_bytes);
        let (p50, p99) = http_latency(addr, a.round_trips);
        let goal = if *level == "metadata" {
            "   (target ≥ 0.45× direct)"
        } else {
            ""
        };
        println!(
            "  capture = {level:<10}    {up:>9.1} MB/s  {:.3}× direct   p50 {p50:>7.1}   p99 {p99:>7.1}   added p50 {:>6.1}{goal}",
            up / direct_up,
            p50 - h50
        );
    }
    drop(tmp);

    println!();
    println!("bulk upload with the log on disk ({})", a.disk.display());
    let dd = dd_rate(&a.disk);
    let disk = stack(&a, &a.disk.join("cloudtap-bench"), &targets, &http);
    let via_disk = upload(&disk.proxies[0].1, a.bytes);
    println!("  disk sustained write (dd fdatasync)  {dd:>9.1} MB/s");
    println!(
        "  tunnel, log on disk              {via_disk:>9.1} MB/s   {:.3}× direct, {:.3}× the disk   (target ≥ 0.9× the disk)",
        via_disk / direct,
        via_disk / dd
    );
    drop(disk);
}
