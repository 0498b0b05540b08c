//! Drives the built binaries the way a user does.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudtap_edge::Endpoints;

pub mod shop;

pub fn cloudtapd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cloudtapd"))
}

pub fn cloudtapctl(data_dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cloudtapctl"));
    c.env("CLOUDTAP_DATA_DIR", data_dir)
        .env_remove("CLOUDTAP_SERVER")
        .env_remove("CLOUDTAP_TOKEN");
    c
}

/// A running cloudtapd; killed (SIGKILL) on drop unless stopped.
pub struct Daemon {
    pub child: Child,
    pub data_dir: PathBuf,
    pub endpoints: Endpoints,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Daemon {
    /// Starts `cloudtapd ROLE` on loopback port 0 and waits until it says it is ready.
    pub fn start(role: &str, data_dir: &Path, extra: &[&str]) -> Daemon {
        let _ = std::fs::remove_file(data_dir.join("endpoints.json"));
        // Port 0 everywhere unless the caller fixes the addresses (restart tests).
        let ports: &[&str] = if extra.contains(&"--grpc-addr") {
            &[]
        } else {
            &[
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--tunnel-addr",
                "127.0.0.1:0",
            ]
        };
        let mut child = cloudtapd()
            .arg(role)
            .args(ports)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cloudtapd starts");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.starts_with("ready") => break,
                Ok(_) => {}
                Err(_) => {
                    if let Some(status) = child.try_wait().unwrap() {
                        panic!("cloudtapd exited with {status}: {}", stderr.lock().unwrap());
                    }
                    assert!(
                        Instant::now() < deadline,
                        "cloudtapd not ready within 30 s: {}",
                        stderr.lock().unwrap()
                    );
                }
            }
        }
        let endpoints: Endpoints =
            serde_json::from_slice(&std::fs::read(data_dir.join("endpoints.json")).unwrap())
                .unwrap();
        Daemon {
            child,
            data_dir: data_dir.to_path_buf(),
            endpoints,
            stderr,
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "cloudtapd exited with {status}: {}",
                    self.stderr()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cloudtapd did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command to completion with a deadline; returns (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.stdin(Stdio::null()).output().expect("command runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A minimal HTTP/1.1 GET over a fresh TCP connection; returns the whole response.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The lines a child prints, on a channel (so a test can wait with a deadline).
pub fn lines<R: std::io::Read + Send + 'static>(r: R) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

pub fn next(rx: &std::sync::mpsc::Receiver<String>, what: &str) -> String {
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("no {what} within 20 s"))
}

/// `cloudtapctl -o json proxy TARGET`, started and past its first line: the child,
/// its further stdout lines, and the local address it forwards.
pub fn start_proxy(
    data_dir: &Path,
    target: &str,
) -> (Child, std::sync::mpsc::Receiver<String>, String) {
    let (child, out, local, _) = start_proxy_session(data_dir, target);
    (child, out, local)
}

/// [`start_proxy`], and the id of the session the tunnel opened.
pub fn start_proxy_session(
    data_dir: &Path,
    target: &str,
) -> (Child, std::sync::mpsc::Receiver<String>, String, String) {
    let mut proxy = cloudtapctl(data_dir)
        .args(["-o", "json", "proxy", target])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines(proxy.stdout.take().unwrap());
    let first: serde_json::Value = serde_json::from_str(&next(&out, "proxy's first line")).unwrap();
    let local = first["local_addr"].as_str().unwrap().to_owned();
    let session = first["session_id"].as_str().unwrap().to_owned();
    (proxy, out, local, session)
}

/// NDJSON lines (`-o json` of `query`) → JSON values.
pub fn ndjson(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

/// The (method, path) pairs `docs/api/openapi.yaml` marks `x-cloudtap-role: role`.
pub fn documented_routes(role: &str) -> std::collections::BTreeSet<(String, String)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/api/openapi.yaml"
    ))
    .unwrap();
    let spec: serde_json::Value = serde_norway::from_str(&text).unwrap();
    let mut documented = std::collections::BTreeSet::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        if ops.get("x-cloudtap-role").and_then(|r| r.as_str()) != Some(role) {
            continue;
        }
        for method in ops.as_object().unwrap().keys() {
            if !method.starts_with("x-") {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    documented
}

/// `routes` as [`documented_routes`] gives them.
pub fn served_routes(routes: &[(&str, &str)]) -> std::collections::BTreeSet<(String, String)> {
    routes
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect()
}
