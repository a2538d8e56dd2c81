//! `run --endpoint` and `chat --endpoint` against a small scripted OpenAI-compatible server
//! (server-sent events as vLLM, SGLang and llama-server stream them: text chunks, the usage in
//! the last chunk, `data: [DONE]`): the text, the server's token counts, the KV figures computed
//! from the architecture (equal to `kv-budget`'s), cached tokens, a 401, a dropped connection,
//! a stalled server. The API key never appears in any output.
//! (llama.cpp's llama-server was not run here: it is not built on this machine.)

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEY: &str = "sk-llmarchTestKey7c1d9e";

/// What the scripted server answers to one request.
#[derive(Clone)]
enum Script {
    /// `200` with these events (each a `data:` line), then `data: [DONE]` when `done`; the
    /// connection is closed after them either way.
    Events(Vec<Value>, bool),
    /// This status with a JSON error body.
    Status(u16, Value),
    /// Accept, read the request, send the headers and one event, then say nothing for `secs`.
    Stall(Value, u64),
}

/// One request the server saw: path, headers (lower-case names), JSON body.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    auth: Option<String>,
    body: Value,
}

struct Server {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// Serve `scripts` in order, one per connection (then stop).
fn serve(scripts: Vec<Script>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(vec![]));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for (script, stream) in scripts.into_iter().zip(listener.incoming()) {
            let Ok(mut stream) = stream else { return };
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let (mut len, mut auth) = (0usize, None);
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                let lower = h.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if lower.starts_with("authorization:") {
                    auth = Some(h["authorization:".len()..].trim().to_string());
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
            seen2.lock().unwrap().push(Seen { path, auth, body });
            let head =
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
            let event = |v: &Value| format!("data: {v}\n\n");
            match script {
                Script::Events(events, done) => {
                    let mut out = head.to_string();
                    for e in &events {
                        out.push_str(&event(e));
                    }
                    if done {
                        out.push_str("data: [DONE]\n\n");
                    }
                    let _ = stream.write_all(out.as_bytes());
                }
                Script::Status(code, body) => {
                    let b = body.to_string();
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                        b.len()
                    );
                }
                Script::Stall(first, secs) => {
                    let _ = write!(stream, "{head}{}", event(&first));
                    let _ = stream.flush();
                    std::thread::sleep(Duration::from_secs(secs));
                }
            }
        }
    });
    Server { url, seen }
}

fn text_chunk(s: &str) -> Value {
    json!({"choices": [{"index": 0, "text": s, "finish_reason": null}]})
}

fn chat_chunk(s: &str) -> Value {
    json!({"choices": [{"index": 0, "delta": {"content": s}, "finish_reason": null}]})
}

fn usage(prompt: u64, completion: u64, cached: Option<u64>) -> Value {
    let mut u = json!({"prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion});
    if let Some(c) = cached {
        u["prompt_tokens_details"] = json!({"cached_tokens": c});
    }
    json!({"choices": [], "usage": u})
}

fn kv_budget_total(alias: &str, tokens: u64) -> u64 {
    let v = run_json(&[
        "kv-budget",
        alias,
        "--context",
        &tokens.to_string(),
        "--json",
    ]);
    v[0]["total_bytes"].as_u64().unwrap()
}

/// The binary with a deadline: a hang is a failure.
fn within(cmd: &mut std::process::Command, secs: u64) -> std::process::Output {
    let child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
            panic!("still running after {secs} s");
        }
    }
}

fn no_key(o: &std::process::Output) {
    assert!(!stdout(o).contains(KEY), "the key is on stdout");
    assert!(!stderr(o).contains(KEY), "the key is on stderr");
}

#[test]
fn run_streams_text_and_reports_the_servers_counts_with_computed_kv() {
    let s = serve(vec![Script::Events(
        vec![
            text_chunk("Hello"),
            text_chunk(","),
            text_chunk(" world"),
            usage(12, 3, Some(8)),
        ],
        true,
    )]);
    let o = within(
        llmarch()
            .args([
                "run",
                "gemma4-e2b",
                "--prompt",
                "Say hello",
                "-n",
                "3",
                "--json",
            ])
            .args([
                "--endpoint",
                &s.url,
                "--temperature",
                "0.5",
                "--top-k",
                "40",
            ])
            .env("OPENAI_API_KEY", KEY),
        30,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    no_key(&o);
    let out = stdout(&o);
    let (text, json_line) = out.trim_end().rsplit_once('\n').unwrap();
    assert_eq!(text, "Hello, world");
    let v: Value = serde_json::from_str(json_line).unwrap();
    assert_eq!(v["prompt_tokens"], 12);
    assert_eq!(v["generated_tokens"], 3);
    assert_eq!(v["cached_tokens"], 8);
    assert_eq!(v["kv_computed"], true);
    // kv_bytes is what kv-budget gives for prompt + generated tokens.
    assert_eq!(
        v["kv_bytes"].as_u64().unwrap(),
        kv_budget_total("gemma4-e2b", 15)
    );
    let per_layer: u64 = v["kv_bytes_per_layer"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .sum();
    assert_eq!(per_layer, v["kv_bytes"].as_u64().unwrap());
    // What was sent: the completions API, streaming with usage, the alias's repo as the model.
    let seen = s.seen.lock().unwrap();
    assert_eq!(seen[0].path, "/v1/completions");
    assert_eq!(
        seen[0].auth.as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );
    let b = &seen[0].body;
    assert_eq!(b["model"], "google/gemma-4-E2B-it");
    assert_eq!(b["prompt"], "Say hello");
    assert_eq!(b["stream"], true);
    assert_eq!(b["stream_options"]["include_usage"], true);
    assert_eq!(b["max_tokens"], 3);
    assert_eq!(b["temperature"], 0.5);
    assert_eq!(b["top_k"], 40);
}

#[test]
fn run_on_the_chat_api_and_a_server_without_cached_counts() {
    let s = serve(vec![Script::Events(
        vec![chat_chunk("Hi"), chat_chunk("!"), usage(20, 2, None)],
        true,
    )]);
    let url = format!("{}/v1/chat/completions", s.url);
    let o = within(
        llmarch().args([
            "run",
            "deepseek-v4-flash",
            "--prompt",
            "Hello",
            "--endpoint",
            &url,
            "--served-model",
            "dsv4",
            "--json",
        ]),
        30,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("Hi!\n"), "{out}");
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["cached_tokens"], Value::Null);
    assert_eq!(
        v["kv_bytes"].as_u64().unwrap(),
        kv_budget_total("deepseek-v4-flash", 22)
    );
    assert!(
        stderr(&o).contains("--enable-prompt-tokens-details"),
        "{}",
        stderr(&o)
    );
    let seen = s.seen.lock().unwrap();
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(seen[0].auth, None);
    assert_eq!(seen[0].body["model"], "dsv4");
    assert_eq!(
        seen[0].body["messages"],
        json!([{"role": "user", "content": "Hello"}])
    );
}

#[test]
fn a_401_names_the_problem_without_the_key() {
    let s = serve(vec![Script::Status(
        401,
        json!({"error": {"message": "Unauthorized", "type": "invalid_api_key"}}),
    )]);
    let o = within(
        llmarch()
            .args(["run", "gemma4-e2b", "--prompt", "x", "--endpoint", &s.url])
            .args(["--api-key", KEY]),
        30,
    );
    let err = expect_error(&o, 1);
    no_key(&o);
    assert!(
        err.contains("HTTP 401 (not authorised): Unauthorized"),
        "{err}"
    );
    assert!(
        err.contains("hint: the server refused the API key"),
        "{err}"
    );
}

#[test]
fn a_dropped_connection_mid_stream_is_an_error_after_the_text_so_far() {
    let s = serve(vec![Script::Events(
        vec![text_chunk("partial"), text_chunk(" text")],
        false,
    )]);
    let o = within(
        llmarch()
            .args(["run", "gemma4-e2b", "--prompt", "x", "--endpoint", &s.url])
            .env("OPENAI_API_KEY", KEY),
        30,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    no_key(&o);
    assert_eq!(stdout(&o), "partial text");
    let err = stderr(&o);
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains("closed the stream before it finished"),
        "{err}"
    );
    assert!(err.contains("2 chunks of text had arrived"), "{err}");
}

#[test]
fn a_stalled_server_times_out() {
    let s = serve(vec![Script::Stall(text_chunk("slow"), 8)]);
    let t0 = std::time::Instant::now();
    let o = within(
        llmarch()
            .args(["run", "gemma4-e2b", "--prompt", "x", "--endpoint", &s.url])
            .env("LLMARCH_ENDPOINT_TIMEOUT", "1"),
        30,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(t0.elapsed() < Duration::from_secs(7), "{:?}", t0.elapsed());
    let err = stderr(&o);
    assert!(err.contains("no data within 1 s"), "{err}");
    // Nothing listening at all: named, not a panic.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let o = within(
        llmarch().args(["run", "gemma4-e2b", "--prompt", "x", "--endpoint", &dead]),
        30,
    );
    let err = expect_error(&o, 1);
    assert!(err.contains(&format!("cannot reach {dead}/v1")), "{err}");
}

#[test]
fn bad_endpoint_flags_are_clear_errors() {
    let cases: [(&[&str], i32, &str); 4] = [
        (
            &["--endpoint", "localhost:8000"],
            1,
            "not an http:// or https:// URL",
        ),
        (
            &["--endpoint", "http://h", "--dtype", "bf16"],
            2,
            "the server holds the weights",
        ),
        (
            &[
                "--endpoint",
                "http://h/v1/chat/completions",
                "--prompt-ids",
                "1,2",
            ],
            2,
            "--prompt-ids needs /v1/completions",
        ),
        (
            &["--endpoint", "http://h", "--logits-out", "x.st"],
            2,
            "cannot be used with",
        ),
    ];
    for (args, code, want) in cases {
        let mut all = vec!["run", "gemma4-e2b"];
        if !args.contains(&"--prompt-ids") {
            all.extend(["--prompt", "x"]);
        }
        all.extend_from_slice(args);
        let o = within(llmarch().args(&all).env("OPENAI_API_KEY", KEY), 30);
        let err = expect_error(&o, code);
        no_key(&o);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
