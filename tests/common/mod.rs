//! Helpers for the binary tests: run `llmarch`, and a local HTTP server that serves files the
//! way the Hugging Face Hub does (`/{repo}/resolve/{revision}/{file}` with etag, commit and
//! range headers), so the real hf-hub code path is exercised without a network.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub fn llmarch() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_llmarch"));
    c.env_remove("HF_ENDPOINT")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env("NO_COLOR", "1");
    c
}

pub fn run(args: &[&str]) -> Output {
    llmarch().args(args).output().expect("spawn llmarch")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Run and parse stdout as JSON, failing with stderr if the command failed.
pub fn run_json(args: &[&str]) -> serde_json::Value {
    let o = run(args);
    assert!(o.status.success(), "{args:?} failed: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("stdout is JSON")
}

/// The command failed cleanly: exit code `code`, exactly one `error:` line first on stderr,
/// no panic, nothing on stdout. Returns stderr.
pub fn expect_error(o: &Output, code: i32) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(err.starts_with("error: "), "stderr: {err}");
    assert_eq!(err.matches("error:").count(), 1, "stderr: {err}");
    assert!(!err.contains("panicked"), "stderr: {err}");
    assert!(o.stdout.is_empty(), "stdout: {}", stdout(o));
    err
}

/// What the fake Hub answers for a path.
#[derive(Clone)]
pub enum Reply {
    File(Vec<u8>),
    Status(u16),
}

/// A fake Hub on 127.0.0.1; stops when dropped.
pub struct FakeHub {
    pub url: String,
    stop: Arc<AtomicBool>,
    pub hits: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = std::net::TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

impl FakeHub {
    /// Serve `routes` (URL path → reply) until dropped; anything else is a 404.
    pub fn start(routes: HashMap<String, Reply>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(std::sync::Mutex::new(vec![]));
        let (stop2, hits2) = (stop.clone(), hits.clone());
        std::thread::spawn(move || {
            // Bounded: a test makes a handful of requests.
            for stream in listener.incoming().take(64) {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let mut range: Option<(usize, Option<usize>)> = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(r) = lower.strip_prefix("range: bytes=") {
                        let r = r.trim();
                        let (a, b) = r.split_once('-').unwrap_or((r, ""));
                        range = Some((a.parse().unwrap_or(0), b.parse().ok()));
                    }
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .to_string();
                hits2.lock().unwrap().push(path.clone());
                let reply = routes.get(&path).cloned().unwrap_or(Reply::Status(404));
                let response = match reply {
                    Reply::Status(code) => format!(
                        "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    .into_bytes(),
                    Reply::File(body) => {
                        let (start, end) = match range {
                            Some((a, Some(b))) => (a, b.min(body.len().saturating_sub(1))),
                            Some((a, None)) => (a, body.len().saturating_sub(1)),
                            None => (0, body.len().saturating_sub(1)),
                        };
                        let slice = &body[start.min(body.len())..(end + 1).min(body.len())];
                        let etag = format!("{:016x}", fxhash(&body));
                        let mut head = format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{}\r\n\
                             ETag: \"{etag}\"\r\nX-Repo-Commit: 0123456789abcdef0123456789abcdef01234567\r\nConnection: close\r\n\r\n",
                            slice.len(),
                            body.len()
                        )
                        .into_bytes();
                        head.extend_from_slice(slice);
                        head
                    }
                };
                let _ = stream.write_all(&response);
            }
        });
        FakeHub { url, stop, hits }
    }
}

fn fxhash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100000001b3)
    })
}

/// Read a file under the crate root.
pub fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).expect(rel)
}
