//! `run --endpoint` and `chat --endpoint` against a small scripted OpenAI-compatible server
//! (server-sent events as vLLM, SGLang and llama-server stream them: text chunks, the usage in
//! the last chunk, `data: [DONE]`): the text, the server's token counts, the KV figures computed
//! from the architecture (equal to `kv-budget`'s), cached tokens, a 401, a dropped connection,
//! a stalled server. The API key never appears in any output. `chat --endpoint`: the whole
//! conversation sent every turn (shortened after `/undo`), the server's counts in the meter,
//! errors as `error:` lines that stop a script at the line that failed and leave an interactive
//! session open.
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
    within_input(cmd, "", secs)
}

/// The same with `input` on stdin (a pipe: chat's scripted mode).
fn within_input(cmd: &mut std::process::Command, input: &str, secs: u64) -> std::process::Output {
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    // A writer of its own: a session that stops early closes the pipe.
    std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
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

// ---------------------------------------------------------------------------------------------
// chat --endpoint

fn reasoning_chunk(s: &str) -> Value {
    json!({"choices": [{"index": 0, "delta": {"reasoning_content": s}, "finish_reason": null}]})
}

fn finish(reason: &str) -> Value {
    json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
}

fn meters(err: &str) -> Vec<&str> {
    err.lines().filter(|l| l.starts_with("[ctx ")).collect()
}

fn roles_and_contents(messages: &Value) -> Vec<(String, String)> {
    messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(
                m.as_object().unwrap().len(),
                2,
                "only role and content go to the server: {m}"
            );
            (
                m["role"].as_str().unwrap().to_string(),
                m["content"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn msgs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(r, c)| (r.to_string(), c.to_string()))
        .collect()
}

/// `chat MODEL --endpoint URL ARGS` with `input` piped in.
fn chat(url: &str, args: &[&str], input: &str) -> std::process::Output {
    within_input(
        llmarch()
            .args(["chat", "gemma4-e2b", "--endpoint", url])
            .args(args)
            .env("OPENAI_API_KEY", KEY),
        input,
        60,
    )
}

#[test]
fn chat_sends_the_whole_conversation_each_turn_and_shows_the_servers_counts() {
    let s = serve(vec![
        Script::Events(
            vec![
                reasoning_chunk("They greet me."),
                chat_chunk("Hi"),
                chat_chunk(" there"),
                finish("stop"),
                usage(20, 2, Some(0)),
            ],
            true,
        ),
        Script::Events(
            vec![chat_chunk("Fine"), finish("length"), usage(31, 1, Some(22))],
            true,
        ),
        Script::Events(vec![chat_chunk("Again"), usage(29, 1, Some(22))], true),
    ]);
    let home = tempfile::tempdir().unwrap();
    let saved = home.path().join("t.json");
    let input = format!(
        "Hello\nHow are you?\n/undo\n/kv\nSomething else\n/kv\n/stats\n/save {}\n",
        saved.display()
    );
    let o = chat(
        &s.url,
        &["--system", "Be brief.", "-n", "5", "--temperature", "0.3"],
        &input,
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("error:"), "{err}");
    no_key(&o);
    // Replies, and only replies, on stdout; the thinking on stderr (stdout is not a terminal).
    assert_eq!(stdout(&o), "Hi there\nFine\nAgain\n");
    assert!(err.contains("They greet me."), "{err}");

    // The meter: the server's counts, the KV computed from the ArchSpec for them.
    let m = meters(&err);
    assert_eq!(m.len(), 3, "{err}");
    assert!(m[0].starts_with("[ctx 22/131072 tokens · KV "), "{}", m[0]);
    assert!(m[0].contains("computed · prompt 20 (0 cached) · generated 2"));
    assert!(
        m[1].contains("prompt 31 (22 cached) · generated 1"),
        "{}",
        m[1]
    );
    assert!(m[1].contains("cut at max_tokens"), "{}", m[1]);
    assert!(m[2].starts_with("[ctx 30/"), "{}", m[2]);
    for (meter, tokens) in [(m[0], 22), (m[1], 32), (m[2], 30)] {
        let kv = llmarch::report::units::bytes(kv_budget_total("gemma4-e2b", tokens));
        assert!(meter.contains(&format!(" · KV {kv} / ")), "{meter} ≠ {kv}");
    }
    // /kv after /undo: the counts of what is left (the first reply's), computed.
    let kv: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("computed from the architecture (not measured)"))
        .collect();
    assert_eq!(kv.len(), 2, "{err}");
    assert!(
        kv[0].contains(" · 22 tokens · "),
        "/kv after /undo: {}",
        kv[0]
    );
    assert!(
        kv[1].contains(" · 30 tokens · "),
        "/kv after a turn: {}",
        kv[1]
    );
    assert!(err.contains("removed the last exchange"), "{err}");
    assert!(
        err.contains("prompt tokens sent 80, 44 of them cached by the server"),
        "/stats: {err}"
    );

    // What the server got: every turn the whole history, after /undo the shortened one.
    let seen = s.seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    for r in seen.iter() {
        assert_eq!(r.path, "/v1/chat/completions");
        assert_eq!(r.auth.as_deref(), Some(format!("Bearer {KEY}").as_str()));
        assert_eq!(r.body["model"], "google/gemma-4-E2B-it");
        assert_eq!(r.body["stream"], true);
        assert_eq!(r.body["stream_options"]["include_usage"], true);
        assert_eq!(r.body["max_tokens"], 5);
        assert_eq!(r.body["temperature"], 0.3);
    }
    assert_eq!(
        roles_and_contents(&seen[0].body["messages"]),
        msgs(&[("system", "Be brief."), ("user", "Hello")])
    );
    // The reasoning stays here: it is not sent back.
    assert_eq!(
        roles_and_contents(&seen[1].body["messages"]),
        msgs(&[
            ("system", "Be brief."),
            ("user", "Hello"),
            ("assistant", "Hi there"),
            ("user", "How are you?"),
        ])
    );
    assert_eq!(
        roles_and_contents(&seen[2].body["messages"]),
        msgs(&[
            ("system", "Be brief."),
            ("user", "Hello"),
            ("assistant", "Hi there"),
            ("user", "Something else"),
        ])
    );

    // The transcript: the same format as a local chat, the reasoning kept.
    let t: Value = serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert_eq!(t["format"], "llmarch-chat/1");
    assert_eq!(t["settings"]["temperature"], 0.3);
    assert_eq!(t["settings"]["max_tokens"], 5);
    let m = t["messages"].as_array().unwrap();
    assert_eq!(m.len(), 5);
    assert_eq!(m[2]["reasoning_content"], "They greet me.");
    assert_eq!(m[4]["content"], "Again");
    assert!(!std::fs::read_to_string(&saved).unwrap().contains(KEY));
}

#[test]
fn chat_loads_a_transcript_and_sends_it_with_settings_and_thinking() {
    let s = serve(vec![
        Script::Events(vec![chat_chunk("Yes"), usage(40, 1, None)], true),
        Script::Events(vec![chat_chunk("No"), usage(45, 1, None)], true),
    ]);
    let home = tempfile::tempdir().unwrap();
    let t = home.path().join("t.json");
    std::fs::write(
        &t,
        json!({"format": "llmarch-chat/1", "model": "gemma4-e2b", "settings": {"temperature": 0.0,
            "top_k": 20, "top_p": null, "min_p": null, "repeat_penalty": 1.0, "seed": 7,
            "max_tokens": 9, "thinking": null},
            "messages": [{"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1", "reasoning_content": "r"},
                {"role": "user", "content": "Q2"}]})
        .to_string(),
    )
    .unwrap();
    let input = format!("/load {}\n/regen\n/set thinking off\nQ3\n", t.display());
    let o = chat(&s.url, &[], &input);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(stdout(&o), "Yes\nNo\n");
    assert!(err.contains("loaded 3 messages"), "{err}");
    assert!(err.contains("(? cached)"), "{err}");
    // The hint about cached counts comes once.
    assert_eq!(
        err.matches("--enable-prompt-tokens-details").count(),
        1,
        "{err}"
    );
    let seen = s.seen.lock().unwrap();
    assert_eq!(
        roles_and_contents(&seen[0].body["messages"]),
        msgs(&[("user", "Q1"), ("assistant", "A1"), ("user", "Q2")])
    );
    assert_eq!(seen[0].body["top_k"], 20);
    assert_eq!(seen[0].body["seed"], 7);
    assert_eq!(seen[0].body["max_tokens"], 9);
    assert!(seen[0].body.get("chat_template_kwargs").is_none());
    assert_eq!(
        seen[1].body["chat_template_kwargs"],
        json!({"enable_thinking": false})
    );
    assert_eq!(seen[1].body["messages"].as_array().unwrap().len(), 5);
}

/// A scripted chat that hit a server error: exit 1, one `error:` line naming the input line,
/// nothing answered after it, the key nowhere.
fn chat_stopped_at(o: &std::process::Output, at: &str, want: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    no_key(o);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].starts_with(&format!("error: {at}: ")), "{err}");
    assert!(errors[0].contains(want), "{err}");
}

#[test]
fn chat_server_errors_stop_a_script_at_the_line_that_failed() {
    // A 401 on the second turn.
    let s = serve(vec![
        Script::Events(vec![chat_chunk("Hi"), usage(5, 1, Some(0))], true),
        Script::Status(
            401,
            json!({"error": {"message": "Unauthorized", "type": "invalid_api_key"}}),
        ),
    ]);
    let o = chat(&s.url, &["--api-key", KEY], "Hello\nAgain\nNever\n");
    chat_stopped_at(
        &o,
        "stdin line 2",
        "HTTP 401 (not authorised): Unauthorized",
    );
    assert!(stderr(&o).contains("hint: the server refused the API key"));
    assert_eq!(stdout(&o), "Hi\n");
    assert_eq!(s.seen.lock().unwrap().len(), 2);

    // A stream dropped mid-reply, from --input: the text so far, then the error.
    let home = tempfile::tempdir().unwrap();
    let input = home.path().join("in.txt");
    std::fs::write(&input, "Hello\nNever\n").unwrap();
    let s = serve(vec![Script::Events(
        vec![chat_chunk("part"), chat_chunk("ial")],
        false,
    )]);
    let o = chat(&s.url, &["--input", input.to_str().unwrap()], "");
    chat_stopped_at(
        &o,
        &format!("--input {} line 1", input.display()),
        "closed the stream before it finished (no `data: [DONE]`): 2 chunks of text had arrived",
    );
    assert_eq!(stdout(&o), "partial\n");

    // A server that stalls: the timeout, not a hang.
    let s = serve(vec![Script::Stall(chat_chunk("slow"), 8)]);
    let t0 = std::time::Instant::now();
    let o = within_input(
        llmarch()
            .args(["chat", "gemma4-e2b", "--endpoint", &s.url])
            .env("OPENAI_API_KEY", KEY)
            .env("LLMARCH_ENDPOINT_TIMEOUT", "1"),
        "Hello\nNever\n",
        30,
    );
    assert!(t0.elapsed() < Duration::from_secs(7), "{:?}", t0.elapsed());
    chat_stopped_at(&o, "stdin line 1", "no data within 1 s");
    assert_eq!(stdout(&o), "slow\n");
}

#[test]
fn chat_endpoint_flags_that_mean_nothing_remotely_are_usage_errors() {
    let cases: [(&[&str], &str); 6] = [
        (&["--dtype", "bf16"], "the server holds the weights"),
        (&["--device", "cpu"], "'--device <DEVICE>'"),
        (&["--snapshots", "2"], "'--snapshots <SNAPSHOTS>'"),
        (&["--context-shift"], "'--context-shift'"),
        (&["--chat-template", "gemma-4-E2B-it"], "'--chat-template"),
        (
            &["--max-context", "0"],
            "invalid value '0' for '--max-context",
        ),
    ];
    for (args, want) in cases {
        let o = chat("http://127.0.0.1:9", args, "Hello\n");
        let err = expect_error(&o, 2);
        no_key(&o);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            err.contains("--endpoint") || want.contains("max-context"),
            "{args:?}: {err}"
        );
    }
    let o = chat("http://127.0.0.1:9/v1/completions", &[], "Hello\n");
    let err = expect_error(&o, 2);
    assert!(err.contains("not /v1/completions"), "{err}");
}

fn pty_chat(url: &str, home: &std::path::Path) -> rexpect::session::PtySession {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_llmarch"));
    cmd.args(["chat", "gemma4-e2b", "--endpoint", url, "--no-history"])
        .env("OPENAI_API_KEY", KEY)
        .env("TERM", "xterm")
        .env("NO_COLOR", "1")
        .env("HOME", home)
        .env_remove("HF_ENDPOINT");
    rexpect::session::spawn_command(cmd, Some(60_000)).unwrap()
}

/// Ctrl-C while the server is silent stops the reply at once, keeping what was said.
#[test]
fn interactive_ctrl_c_stops_a_silent_server() {
    let s = serve(vec![
        Script::Stall(chat_chunk("slow"), 4),
        Script::Events(vec![chat_chunk("Fast"), usage(12, 1, Some(6))], true),
    ]);
    let home = tempfile::tempdir().unwrap();
    let mut p = pty_chat(&s.url, home.path());
    pty_prompt(&mut p);
    p.send("Hello\r").unwrap();
    p.flush().unwrap();
    p.exp_string("slow").unwrap();
    let t0 = std::time::Instant::now();
    p.send_control('c').unwrap();
    let after = pty_prompt(&mut p);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(after.contains("interrupted"), "{after}");
    let second = type_line(&mut p, "Again");
    assert!(second.contains("Fast"), "{second}");
    p.send("/exit\r").unwrap();
    p.flush().unwrap();
    p.exp_eof().unwrap();
    let seen = s.seen.lock().unwrap();
    assert_eq!(
        roles_and_contents(&seen[1].body["messages"]),
        msgs(&[("user", "Hello"), ("assistant", "slow"), ("user", "Again")])
    );
}

/// Interactively a server error drops the turn and the chat goes on.
#[test]
fn interactive_chat_survives_a_server_error() {
    let s = serve(vec![
        Script::Status(401, json!({"error": {"message": "Unauthorized"}})),
        Script::Events(vec![chat_chunk("Welcome"), usage(9, 1, Some(4))], true),
    ]);
    let home = tempfile::tempdir().unwrap();
    let mut p = pty_chat(&s.url, home.path());
    let banner = pty_prompt(&mut p);
    assert!(banner.contains("the server's chat template"), "{banner}");
    let first = type_line(&mut p, "Hello");
    assert!(first.contains("error: "), "{first}");
    assert!(first.contains("HTTP 401"), "{first}");
    assert!(!first.contains(KEY), "{first}");
    let second = type_line(&mut p, "Again");
    assert!(second.contains("Welcome"), "{second}");
    assert!(second.contains("(4 cached)"), "{second}");
    p.send("/exit\r").unwrap();
    p.flush().unwrap();
    p.exp_eof().unwrap();
    // The failed turn was dropped: the second request holds only the second message.
    let seen = s.seen.lock().unwrap();
    assert_eq!(
        roles_and_contents(&seen[1].body["messages"]),
        msgs(&[("user", "Again")])
    );
}
