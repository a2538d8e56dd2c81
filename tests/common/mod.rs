//! Helpers for the binary tests: run `llmarch`, and a local HTTP server that serves files the
//! way the Hugging Face Hub does (`/{repo}/resolve/{revision}/{file}` with etag, commit and
//! range headers), so the real Hub client is exercised without a network.
#![allow(dead_code)]

pub mod reference;

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
        .env_remove("LLMARCH_QUANT_CACHE")
        // Quantized runs keep their blocks here, not in the user's cache folder.
        .env(
            "XDG_CACHE_HOME",
            concat!(env!("CARGO_TARGET_TMPDIR"), "/xdg-cache"),
        )
        .env("NO_COLOR", "1");
    c
}

/// Type `line` and Enter into chat in a pseudo-terminal; what it printed up to the next prompt.
pub fn type_line(p: &mut rexpect::session::PtySession, line: &str) -> String {
    p.send(line).unwrap();
    p.send("\r").unwrap();
    p.flush().unwrap();
    pty_prompt(p)
}

/// Wait for chat's `>>> ` prompt in a pseudo-terminal, answering a cursor-position query should
/// the line editor send one (a real terminal answers it; the pty does not); what came before it.
pub fn pty_prompt(p: &mut rexpect::session::PtySession) -> String {
    use rexpect::reader::ReadUntil;
    let mut seen = String::new();
    loop {
        let (before, hit) = p
            .exp_any(vec![
                ReadUntil::String("\x1b[6n".into()),
                ReadUntil::String(">>> ".into()),
            ])
            .unwrap_or_else(|e| panic!("no prompt: {e}; after: {seen}"));
        seen.push_str(&before);
        if hit == ">>> " {
            return seen;
        }
        p.send("\x1b[1;1R").unwrap();
        p.flush().unwrap();
    }
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

/// The commit a [`Reply::File`] reports in `X-Repo-Commit`.
pub const DEFAULT_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// What the fake Hub answers for a path (matched without its query string).
#[derive(Clone)]
pub enum Reply {
    /// A file served the way the Hub serves it (ETag, X-Repo-Commit, Content-Range, ranges),
    /// at [`DEFAULT_COMMIT`].
    File(Vec<u8>),
    /// The same at a given commit.
    FileAt(Vec<u8>, String),
    /// An empty answer with this status.
    Status(u16),
    /// These bytes, as they are (a malformed or hostile server).
    Raw(Vec<u8>),
    /// `200` with a JSON body (the `/api/models/...` endpoints).
    Json(String),
    /// `401` unless the request carries `Authorization: Bearer <token>`, else the inner reply.
    Gated(String, Box<Reply>),
    /// The inner file, but a body request (not the `bytes=0-0` probe) announces its full
    /// length and closes the connection after `n` bytes of the file: an interrupted download.
    Cut(Box<Reply>, usize),
    /// The inner file, but a body request gets only its first `n` bytes, honestly sized,
    /// while `Content-Range` still announces the whole file: a server that loses data.
    Short(Box<Reply>, usize),
}

/// One request the fake Hub saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

/// A fake Hub on 127.0.0.1; stops when dropped.
pub struct FakeHub {
    pub url: String,
    stop: Arc<AtomicBool>,
    /// The path of every request, in order.
    pub hits: Arc<std::sync::Mutex<Vec<String>>>,
    /// Every request with its range and authorization headers.
    pub seen: Arc<std::sync::Mutex<Vec<Seen>>>,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = std::net::TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

/// The routes of a model repo at one revision: `resolve/{revision}/{file}` for each file
/// (gated behind `token` when given) and the `GET /api/models/{id}/revision/{revision}` file
/// list that hf-hub's `info()` reads.
pub fn repo_routes(
    id: &str,
    revision: &str,
    commit: &str,
    files: &[(&str, Vec<u8>)],
    token: Option<&str>,
) -> HashMap<String, Reply> {
    let rev = revision.replace('/', "%2F");
    let mut routes = HashMap::new();
    for (name, body) in files {
        let mut reply = Reply::FileAt(body.clone(), commit.to_string());
        if let Some(t) = token {
            reply = Reply::Gated(t.to_string(), Box::new(reply));
        }
        routes.insert(format!("/{id}/resolve/{rev}/{name}"), reply);
    }
    let siblings: Vec<serde_json::Value> = files
        .iter()
        .map(|(n, _)| serde_json::json!({ "rfilename": n }))
        .collect();
    let info = serde_json::json!({ "id": id, "modelId": id, "sha": commit, "siblings": siblings });
    routes.insert(
        format!("/api/models/{id}/revision/{rev}"),
        Reply::Json(info.to_string()),
    );
    routes
}

fn status_line(code: u16) -> Vec<u8> {
    format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes()
}

/// The bytes to write for `reply`, given the request's range and authorization.
fn respond(reply: &Reply, range: Option<(usize, Option<usize>)>, auth: Option<&str>) -> Vec<u8> {
    let probe = range == Some((0, Some(0)));
    match reply {
        Reply::Status(code) => status_line(*code),
        Reply::Raw(bytes) => bytes.clone(),
        Reply::Json(body) => {
            let mut head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            head.extend_from_slice(body.as_bytes());
            head
        }
        Reply::Gated(token, inner) => {
            if auth == Some(format!("Bearer {token}").as_str()) {
                respond(inner, range, auth)
            } else {
                status_line(401)
            }
        }
        Reply::File(body) => file_response(body, DEFAULT_COMMIT, range, None),
        Reply::FileAt(body, commit) => file_response(body, commit, range, None),
        Reply::Cut(inner, n) | Reply::Short(inner, n) => {
            let (body, commit) = match inner.as_ref() {
                Reply::File(b) => (b, DEFAULT_COMMIT),
                Reply::FileAt(b, c) => (b, c.as_str()),
                other => return respond(other, range, auth),
            };
            if probe {
                return file_response(body, commit, range, None);
            }
            let fault = match reply {
                Reply::Cut(..) => Fault::Close(*n),
                _ => Fault::Short(*n),
            };
            file_response(body, commit, range, Some(fault))
        }
    }
}

enum Fault {
    Close(usize),
    Short(usize),
}

fn file_response(
    body: &[u8],
    commit: &str,
    range: Option<(usize, Option<usize>)>,
    fault: Option<Fault>,
) -> Vec<u8> {
    let last = body.len().saturating_sub(1);
    let (start, end) = match range {
        Some((a, Some(b))) => (a, b.min(last)),
        Some((a, None)) => (a, last),
        None => (0, last),
    };
    let slice = &body[start.min(body.len())..(end + 1).min(body.len())];
    let (announced, sent) = match fault {
        None => (slice.len(), slice),
        // Promise the whole range, deliver up to byte `n` of the file.
        Some(Fault::Close(n)) => (
            slice.len(),
            &slice[..n.saturating_sub(start).min(slice.len())],
        ),
        // Deliver up to byte `n`, and say so in Content-Length.
        Some(Fault::Short(n)) => {
            let s = &slice[..n.saturating_sub(start).min(slice.len())];
            (s.len(), s)
        }
    };
    let etag = format!("{:016x}", fxhash(body));
    let mut head = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Length: {announced}\r\nContent-Range: bytes {start}-{end}/{}\r\n\
         ETag: \"{etag}\"\r\nX-Repo-Commit: {commit}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    head.extend_from_slice(sent);
    head
}

impl FakeHub {
    /// Serve `routes` (URL path → reply) until dropped; anything else is a 404.
    pub fn start(routes: HashMap<String, Reply>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(std::sync::Mutex::new(vec![]));
        let seen = Arc::new(std::sync::Mutex::new(vec![]));
        let (stop2, hits2, seen2) = (stop.clone(), hits.clone(), seen.clone());
        std::thread::spawn(move || {
            // Bounded: a test makes a few dozen requests.
            for stream in listener.incoming().take(512) {
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
                let (mut range_text, mut auth) = (None, None);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(r) = lower.strip_prefix("range: bytes=") {
                        let r = r.trim();
                        range_text = Some(r.to_string());
                        let (a, b) = r.split_once('-').unwrap_or((r, ""));
                        range = Some((a.parse().unwrap_or(0), b.parse().ok()));
                    }
                    if lower.starts_with("authorization:") {
                        auth = Some(line["authorization:".len()..].trim().to_string());
                    }
                }
                let full = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .to_string();
                let path = full.split('?').next().unwrap_or("/").to_string();
                hits2.lock().unwrap().push(path.clone());
                seen2.lock().unwrap().push(Seen {
                    path: path.clone(),
                    range: range_text,
                    authorization: auth.clone(),
                });
                let reply = routes.get(&path).cloned().unwrap_or(Reply::Status(404));
                let response = respond(&reply, range, auth.as_deref());
                let _ = stream.write_all(&response);
            }
        });
        FakeHub {
            url,
            stop,
            hits,
            seen,
        }
    }

    /// How many requests the server has answered.
    pub fn hit_count(&self) -> usize {
        self.hits.lock().unwrap().len()
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
