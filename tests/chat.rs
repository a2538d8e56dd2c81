//! `llmarch chat`: chat templates against transformers' renderings, KV reuse across turns against
//! a fresh run, and the command line driven through a pipe and a pseudo-terminal.
//!
//! The reference renderings under tests/fixtures/chat/ were recorded by
//! tests/oracle/chat_templates.py with transformers 5.23.0 `apply_chat_template`.

mod common;
use common::*;
use llmarch::chat::session::{Resume, Session, Settings};
use llmarch::chat::template::{self, ChatTemplate, RenderRequest, TemplateFailure};
use llmarch::generate::sampler::Sampling;
use llmarch::generate::StopReason;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn gemma(name: &str) -> PathBuf {
    root().join("tests/fixtures/gemma4").join(name)
}

/// Every reference file: (template path under templates/, fixture).
fn reference_files() -> Vec<(String, Value)> {
    let dir = root().join("tests/fixtures/chat");
    let mut out = vec![];
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            out.push((v["template"].as_str().unwrap().to_string(), v));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn sha256_hex(path: &Path) -> String {
    // The fixtures record the hash Python computed; recompute it with `sha256sum` where present,
    // else skip only this comparison (the rendering test below does not depend on it).
    let o = std::process::Command::new("sha256sum").arg(path).output();
    match o {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    }
}

#[test]
fn every_template_renders_like_transformers() {
    let files = reference_files();
    // Every shipped template has a reference, and every reference a shipped template.
    let builtin: Vec<String> = template::BUILTIN
        .iter()
        .map(|(n, _)| format!("{n}.jinja"))
        .collect();
    let referenced: Vec<String> = files.iter().map(|(t, _)| t.clone()).collect();
    let mut b = builtin.clone();
    b.sort();
    assert_eq!(
        b, referenced,
        "templates/ and tests/fixtures/chat/ disagree"
    );
    assert_eq!(files.len(), 6);

    let mut checked = 0;
    let mut raised = 0;
    for (name, fx) in &files {
        let path = root().join("templates").join(name);
        let hash = sha256_hex(&path);
        if !hash.is_empty() {
            assert_eq!(
                hash,
                fx["sha256"].as_str().unwrap(),
                "{name}: not the recorded file"
            );
        }
        let source = std::fs::read_to_string(&path).unwrap();
        let builtin_name = name.trim_end_matches(".jinja");
        assert_eq!(template::builtin(builtin_name), Some(source.as_str()));
        let special: Map<String, Value> = fx["context"].as_object().unwrap().clone();
        let t = ChatTemplate::new(&source, name, special).unwrap();
        for case in fx["cases"].as_array().unwrap() {
            let label = format!(
                "{name} / {} / add_generation_prompt={}",
                case["name"], case["add_generation_prompt"]
            );
            let messages = case["messages"].as_array().unwrap();
            let kwargs = case["kwargs"].as_object().unwrap();
            let got = t.render(&RenderRequest {
                messages,
                tools: case.get("tools"),
                add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
                kwargs,
            });
            match (case.get("rendered"), case.get("error")) {
                (Some(want), _) => {
                    let got = got.unwrap_or_else(|e| panic!("{label}: {e:#}"));
                    assert_eq!(got, want.as_str().unwrap(), "{label}");
                }
                (None, Some(want)) => {
                    let e = got.expect_err(&label);
                    match template::failure(&e) {
                        TemplateFailure::Raised(m) => {
                            assert_eq!(m, want.as_str().unwrap(), "{label}")
                        }
                        other => panic!("{label}: {other:?}: {e:#}"),
                    }
                    raised += 1;
                }
                _ => panic!("{label}: neither rendered nor error"),
            }
            checked += 1;
        }
    }
    assert!(checked >= 200, "{checked} cases");
    assert!(raised >= 2, "{raised} raise_exception cases");
}

#[test]
fn shipped_templates_are_the_shared_ones() {
    // Every built-in template is the file in templates/, whose SHA-256 is the one its provenance
    // table (templates/README.md, copied from the project's shared/templates) records; where a
    // checkout has ../shared beside it, the file equals that copy byte for byte too. The hash
    // check needs nothing outside the repository, so it always runs.
    let readme = std::fs::read_to_string(root().join("templates/README.md")).unwrap();
    let shared = root().join("../shared/templates");
    let mut compared = 0;
    for (name, source) in template::BUILTIN {
        let file = root().join(format!("templates/{name}.jinja"));
        assert_eq!(*source, std::fs::read_to_string(&file).unwrap(), "{name}");
        let sha = sha256_hex(&file);
        assert!(
            sha.len() == 64 && readme.contains(&format!("`{sha}`")),
            "{name}: SHA-256 {sha:?} is not the one templates/README.md records"
        );
        if shared.is_dir() {
            let theirs = std::fs::read_to_string(shared.join(format!("{name}.jinja"))).unwrap();
            assert_eq!(*source, theirs, "{name}");
        }
        compared += 1;
    }
    assert!(compared > 0, "no built-in templates");
}

// ---------------------------------------------------------------------------------------------
// The session on a tiny Gemma 4 checkpoint (random weights: the replies are noise, but token
// counts, cache reuse and logits are exact).

fn session(name: &str, max_tokens: usize) -> Session {
    session_at(&gemma(name), max_tokens)
}

/// [`session`] on the fixture folder `dir`.
fn session_at(dir: &std::path::Path, max_tokens: usize) -> Session {
    use llmarch::cli::{shared, Ctx};
    let ctx = Ctx {
        quiet: true,
        verbose: false,
        parse: Default::default(),
    };
    let name = dir.file_name().unwrap().to_str().unwrap();
    let (model_ref, _spec, build) = shared::runnable_spec(&ctx, dir.to_str().unwrap()).unwrap();
    let (files, tok) = shared::files_and_tokenizer(&ctx, &model_ref).unwrap();
    let special = template::special_tokens(files.tokenizer_config.as_deref()).unwrap();
    let source = tok
        .chat_template
        .clone()
        .expect("the fixture ships a chat template");
    let t = ChatTemplate::new(&source, name, special).unwrap();
    let (model, _) = shared::build_model(
        &files,
        build,
        &ctx,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let settings = Settings {
        sampling: Sampling::default(), // greedy
        max_tokens,
        thinking: None,
    };
    let mut s = Session::new(model, tok, t, settings, 256);
    s.keep_logits = true;
    s
}

/// Reply to `text`; check that the prefill covered exactly the tokens past the reused prefix
/// and that its logits equal a fresh run over the whole rendered conversation.
/// Returns the report and where the generation prompt starts in the rendered tokens.
fn turn_checked(
    s: &mut Session,
    text: Option<&str>,
) -> (llmarch::chat::session::TurnReport, Option<usize>) {
    if let Some(t) = text {
        s.conv.push_user(t);
    }
    let (_, ids, split) = s.prompt_ids().unwrap();
    let r = s
        .reply(&mut |_| {}, &mut |_, _| Ok(()), &AtomicBool::new(false))
        .unwrap();
    assert_eq!(r.prompt_tokens, ids.len());
    assert_eq!(r.reused + r.prefilled, ids.len());
    // A fresh run over everything the template renders.
    let mut fresh = s.model.new_cache();
    let full = s.model.forward(&ids, &mut fresh).unwrap(); // [n, vocab]
    let want = full.narrow(0, r.reused, r.prefilled).unwrap();
    let got = r.prefill_logits.as_ref().expect("kept logits");
    assert_eq!(got.dims(), want.dims());
    let diff: f32 = (got - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    // f32 noise only: chunked and one-shot prefill sum in different orders (the reference
    // itself differs by up to 2.2e-4 between cached and full forwards, tests/oracle/README.md).
    assert!(
        diff < 1e-3,
        "prefill logits differ from a fresh run by {diff}"
    );
    (r, split)
}

#[test]
fn second_turn_prefills_only_its_new_tokens_and_matches_a_fresh_run() {
    // e4b-like, greedy, 3 tokens per reply: the first reply re-tokenizes to the ids the model
    // generated, so the whole cache is a prefix of the second turn's rendering.
    let mut s = session("e4b-like", 3);
    s.engine.max_snapshots = 6;
    let (r1, _) = turn_checked(&mut s, Some("Hello there"));
    assert_eq!((r1.reused, r1.resume), (0, Resume::Live));
    let cached = s.engine.ids().to_vec();
    // The reply's fed tokens are in the cache, past the first prompt.
    assert!(
        cached.len() > r1.prompt_tokens,
        "{} {}",
        cached.len(),
        r1.prompt_tokens
    );

    let (r2, split2) = turn_checked(&mut s, Some("And then?"));
    assert_eq!(r2.resume, Resume::Live);
    assert_eq!(r2.reused, cached.len(), "the whole cache is reused");
    assert_eq!(
        r2.prefilled,
        r2.prompt_tokens - cached.len(),
        "only the new tokens"
    );
    assert!(r2.prefilled < 30, "{}", r2.prefilled);

    // A third turn: whether its reply round-trips or not, the history up to the second
    // generation prompt is never prefilled again.
    let (r3, _) = turn_checked(&mut s, Some("Why?"));
    assert!(r3.reused >= split2.unwrap(), "{r3:?} after {r2:?}");

    // /regen: only the generation prompt is prefilled again (from the snapshot before it).
    assert!(s.conv.pop_reply());
    let (regen, split) = turn_checked(&mut s, None);
    let ids_len = regen.prompt_tokens;
    assert!(matches!(regen.resume, Resume::Snapshot { .. }), "{regen:?}");
    assert_eq!(Some(regen.reused), split);
    assert_eq!(regen.prefilled, ids_len - split.unwrap());
    assert!(regen.prefilled <= 8, "only `<|turn>model\\n`: {regen:?}");

    // /undo takes the cache back at once (so /stats and /kv count what is left) to a snapshot
    // of the second turn (the one before its generation prompt, or the one after its reply
    // when that reply survives rendering); a new message then goes on from there.
    let (before, held_before) = (s.engine.ids().len(), s.engine.cache().bytes());
    assert!(s.undo());
    let (_, left, _) = s.prompt_ids().unwrap();
    let now = s.engine.ids().to_vec();
    assert!(
        now.len() < before && left.starts_with(&now),
        "{} of {before}",
        now.len()
    );
    assert!(now.len() >= split2.unwrap());
    let held: u64 = s.engine.cache().bytes().iter().sum();
    assert!(held < held_before.iter().sum::<u64>());
    let (r4, _) = turn_checked(&mut s, Some("Something else"));
    assert_eq!(r4.resume, Resume::Live, "{r4:?}");
    assert_eq!(r4.reused, now.len(), "{r4:?}");
    assert!(s.engine.snapshot_count() <= s.engine.max_snapshots);
}

#[test]
fn a_reply_that_renders_differently_resumes_from_the_snapshot() {
    // e2b-like, 6 tokens: the noise reply does not survive decode → template → encode, so the
    // cache stops matching at the reply; the turn resumes from the snapshot taken before the
    // generation prompt, and the logits still equal a fresh run.
    let mut s = session("e2b-like", 6);
    s.conv.set_system(Some("Be brief.".into()));
    let (r1, split1) = turn_checked(&mut s, Some("Hello there"));
    let (r2, _) = turn_checked(&mut s, Some("And then?"));
    match r2.resume {
        Resume::Snapshot { from } => {
            assert!(from >= r1.prompt_tokens, "diverged at {from}");
            // The snapshot holds the first turn up to its generation prompt.
            assert_eq!(Some(r2.reused), split1, "{r2:?}");
        }
        other => panic!("expected a snapshot resume, got {other:?}"),
    }
    assert_eq!(s.totals.resumed_from_snapshot, 1);
    // Changing the system prompt changes the very first turn: everything is prefilled again.
    s.conv.set_system(Some("Be verbose.".into()));
    let (r3, _) = turn_checked(&mut s, Some("More"));
    assert!(
        matches!(r3.resume, Resume::Snapshot { .. } | Resume::Fresh { .. }),
        "{r3:?}"
    );
    assert!(
        r3.reused <= 8,
        "only `<bos><|turn>system\\n` can be shared: {r3:?}"
    );
}

#[test]
fn generation_stops_on_the_templates_end_of_turn_token() {
    // Gemma 4: `<turn|>` (106) closes a model turn.
    let s = session("e2b-like", 4);
    assert_eq!(s.template.end_of_turn_ids(&s.tok), vec![106]);
    assert!(s.stop_ids.contains(&106) && s.stop_ids.contains(&1));

    // ChatML and Laguna through a small vocabulary holding their special tokens.
    let dir = tempfile::tempdir().unwrap();
    let tok_json = json!({
        "version": "1.0",
        "added_tokens": [
            {"id": 1, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "<|im_start|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 3, "content": "</assistant>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "<|im_end|>": 1, "<|im_start|>": 2, "</assistant>": 3}, "unk_token": "[UNK]"}
    });
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, tok_json.to_string()).unwrap();
    let bundle = llmarch::loader::tokenizer::TokenizerBundle {
        tokenizer: Some(llmarch::loader::tokenizer::load_tokenizer(&path).unwrap()),
        source: "a test".into(),
        bos_id: None,
        add_bos: false,
        eos_ids: vec![],
        eos_source: "none".into(),
        pad_id: None,
        chat_template: None,
        generation: Default::default(),
    };
    for (name, want) in [("Qwen3.6-27B", 1), ("Laguna-XS.2", 3)] {
        let t = ChatTemplate::new(template::builtin(name).unwrap(), name, Map::new()).unwrap();
        assert_eq!(t.end_of_turn_ids(&bundle), vec![want], "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// The command line.

/// `llmarch chat <fixture> ARGS` with `input` on stdin (a pipe: the scripted mode).
fn chat_piped(fixture: &str, args: &[&str], input: &str, home: &Path) -> std::process::Output {
    use std::io::Write;
    let mut c = llmarch();
    c.arg("chat")
        .arg(gemma(fixture))
        .args(args)
        .env("HOME", home)
        .env("XDG_DATA_HOME", home.join("data"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn meters(err: &str) -> Vec<&str> {
    err.lines().filter(|l| l.starts_with("[ctx ")).collect()
}

/// The `(N cached)` figure of a meter line.
fn cached_of(meter: &str) -> usize {
    let at = meter.find(" cached)").unwrap();
    let head = &meter[..at];
    head[head.rfind('(').unwrap() + 1..].parse().unwrap()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn piped_session_replies_on_stdout_and_saves_and_loads_a_transcript() {
    let home = tempfile::tempdir().unwrap();
    let a = home.path().join("a.json");
    let b = home.path().join("b.json");
    let input = format!(
        "Hello there\nAnd then?\n/set temperature 0.5\n/save {}\n",
        a.display()
    );
    let o = chat_piped(
        "e4b-like",
        &["-n", "3", "--system", "Be brief."],
        &input,
        home.path(),
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("error:"), "{err}");
    let m = meters(&err);
    assert_eq!(m.len(), 2, "{err}");
    assert_eq!(cached_of(m[0]), 0);
    assert!(
        cached_of(m[1]) > 20,
        "the second turn reuses the first: {err}"
    );
    assert!(
        err.contains(&format!("saved 5 messages to {}", a.display())),
        "{err}"
    );
    // Replies (and nothing else) on stdout: one line per reply at least.
    assert!(stdout(&o).lines().count() >= 2, "{}", stdout(&o));
    assert!(!stdout(&o).contains("[ctx"));

    let t = read_json(&a);
    assert_eq!(t["format"], "llmarch-chat/1");
    assert_eq!(t["settings"]["temperature"], 0.5);
    assert_eq!(t["settings"]["max_tokens"], 3);
    let msgs = t["messages"].as_array().unwrap();
    let roles: Vec<&str> = msgs.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user", "assistant"]);
    assert_eq!(msgs[0]["content"], "Be brief.");
    assert_eq!(msgs[3]["content"], "And then?");

    // /load → /save gives the same transcript; a further message continues it.
    let input = format!(
        "/load {}\n/save {}\nOne more\n/save {}\n",
        a.display(),
        b.display(),
        a.display()
    );
    let o = chat_piped("e4b-like", &["-n", "3"], &input, home.path());
    let err = stderr(&o);
    assert!(o.status.success() && !err.contains("error:"), "{err}");
    assert!(err.contains("loaded 5 messages"), "{err}");
    assert_eq!(read_json(&b), t);
    let t2 = read_json(&a);
    let msgs2 = t2["messages"].as_array().unwrap();
    assert_eq!(msgs2.len(), 7);
    assert_eq!(msgs2[..5], msgs[..]);
    assert_eq!(msgs2[5]["content"], "One more");
    // The loaded history was prefilled once, in that turn.
    let m = meters(&err);
    assert_eq!(m.len(), 1, "{err}");
    assert_eq!(cached_of(m[0]), 0);
}

/// A scripted session that hit an error: exit 1, the one `error:` line (naming the input line
/// and containing `want`) is the last thing on stderr, and nothing after it was answered.
fn stopped_at(o: &std::process::Output, want: &str) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains(want), "`{}` lacks `{want}`", errors[0]);
    let after = err.split_once(errors[0]).unwrap().1;
    assert!(
        after
            .lines()
            .all(|l| l.is_empty() || l.starts_with("hint: ")),
        "the session went on after the error: {err}"
    );
    errors[0].to_string()
}

#[test]
fn scripted_errors_are_one_line_and_stop_the_session_with_exit_1() {
    let home = tempfile::tempdir().unwrap();
    let malformed = home.path().join("malformed.json");
    std::fs::write(
        &malformed,
        "{\"format\": \"llmarch-chat/1\", \"messages\": [",
    )
    .unwrap();
    let wrong = home.path().join("wrong.json");
    std::fs::write(
        &wrong,
        r#"{"format": "llmarch-chat/1", "model": "m", "settings": {"temperature": 0, "top_k": null, "top_p": null, "min_p": null, "repeat_penalty": 1, "seed": 1, "max_tokens": 4, "thinking": null}, "messages": [{"content": "no role"}]}"#,
    )
    .unwrap();
    let missing = home.path().join("missing.json");
    let long = "the robot and the boat ".repeat(80);
    let cases = [
        (
            format!("/load {}", missing.display()),
            format!("cannot read {}", missing.display()),
        ),
        (
            format!("/load {}", malformed.display()),
            format!("{} is not a chat transcript", malformed.display()),
        ),
        (
            format!("/load {}", wrong.display()),
            format!(
                "{} is not a chat transcript: message 0 has no `role` string",
                wrong.display()
            ),
        ),
        (
            "/load /dev/zero".to_string(),
            "/dev/zero is larger than 16 MiB".to_string(),
        ),
        (
            "/set temperature banana".into(),
            "/set temperature: `banana` is not a number".into(),
        ),
        ("/frobnicate".into(), "unknown command /frobnicate".into()),
        (long, "the message is too long".into()),
    ];
    for (bad, want) in &cases {
        // One good turn first, then the bad line (line 2), then one that must not be answered.
        let input = format!("Hello\n{bad}\nAgain\n");
        let o = chat_piped("e2b-like", &["-n", "2"], &input, home.path());
        let line = stopped_at(&o, want);
        assert!(line.starts_with("error: stdin line 2: "), "{line}");
        assert_eq!(meters(&stderr(&o)).len(), 1, "{}", stderr(&o));
    }
    // Commands with nothing to act on, as the first line.
    for (bad, want) in [
        ("/regen", "/regen: there is no reply to generate again"),
        ("/undo", "/undo: there is nothing to undo"),
    ] {
        let o = chat_piped(
            "e2b-like",
            &["-n", "2"],
            &format!("{bad}\nHello\n"),
            home.path(),
        );
        let line = stopped_at(&o, want);
        assert!(line.starts_with("error: stdin line 1: "), "{line}");
        assert!(meters(&stderr(&o)).is_empty(), "{}", stderr(&o));
    }
    // Without errors: exit 0 and every line answered.
    let o = chat_piped(
        "e2b-like",
        &["-n", "2"],
        "Hello\n/undo\nAgain\n",
        home.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(meters(&stderr(&o)).len(), 2, "{}", stderr(&o));
}

#[test]
fn scripted_input_is_bounded_and_a_closed_stdout_stops_quietly() {
    let home = tempfile::tempdir().unwrap();
    // --input /dev/zero: refused at startup, before loading anything.
    let o = llmarch()
        .args([
            "chat",
            gemma("e2b-like").to_str().unwrap(),
            "--input",
            "/dev/zero",
        ])
        .output()
        .unwrap();
    let err = expect_error(&o, 1);
    assert!(
        err.contains("--input /dev/zero is larger than 16 MiB"),
        "{err}"
    );
    // A line of 17 MiB on stdin (no newline): refused, naming the line.
    let mut big = "Hello\n".to_string();
    big.push_str(&"a".repeat(17 << 20));
    let o = chat_piped_bytes("e2b-like", &["-n", "2"], big.as_bytes(), home.path());
    let line = stopped_at(&o, "the line is longer than 16 MiB");
    assert!(line.starts_with("error: stdin line 2: "), "{line}");
    // So is a multi-line message that grows past it.
    let mut block = "\"\"\"\n".to_string();
    for _ in 0..20 {
        block.push_str(&"b".repeat(1 << 20));
        block.push('\n');
    }
    let o = chat_piped_bytes("e2b-like", &["-n", "2"], block.as_bytes(), home.path());
    stopped_at(&o, "stdin lines 1-17: the message is longer than 16 MiB");
    // Not UTF-8.
    let o = chat_piped_bytes("e2b-like", &["-n", "2"], b"caf\xe9\n", home.path());
    stopped_at(&o, "stdin line 1: the line is not UTF-8 text");

    // stdout closed at once: no `error: Broken pipe` per line, exit 0.
    use std::io::Write;
    let mut child = llmarch()
        .arg("chat")
        .arg(gemma("e2b-like"))
        .args(["-n", "4"])
        .env("HOME", home.path())
        .env("XDG_DATA_HOME", home.path().join("data"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all("Hello\n".repeat(5).as_bytes());
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(!err.contains("error"), "{err}");
    assert!(
        meters(&err).len() <= 1,
        "it went on after the pipe closed: {err}"
    );
}

/// [`chat_piped`] with raw bytes on stdin, which the session may stop reading early.
fn chat_piped_bytes(
    fixture: &str,
    args: &[&str],
    input: &[u8],
    home: &Path,
) -> std::process::Output {
    use std::io::Write;
    let mut child = llmarch()
        .arg("chat")
        .arg(gemma(fixture))
        .args(args)
        .env("HOME", home)
        .env("XDG_DATA_HOME", home.join("data"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(input);
    child.wait_with_output().unwrap()
}

#[test]
fn a_full_context_says_so_or_shifts_with_context_shift() {
    let home = tempfile::tempdir().unwrap();
    let input = "Hello there\nTell me a story about the river\nAnd the boat?\nWhy?\nAnd then?\n";
    // The suffix form is accepted as the README promises (1k = 1024 is not full here).
    let o = chat_piped(
        "e2b-like",
        &["-n", "2", "--max-context", "1k"],
        "Hello\n",
        home.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = chat_piped(
        "e2b-like",
        &["-n", "12", "--max-context", "80"],
        input,
        home.path(),
    );
    let line = stopped_at(&o, "the context is full");
    assert!(line.contains("/clear"), "{line}");
    assert!(line.starts_with("error: stdin line "), "{line}");

    let o = chat_piped(
        "e2b-like",
        &["-n", "12", "--max-context", "80", "--context-shift"],
        input,
        home.path(),
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("oldest turn"), "{err}");
    assert_eq!(meters(&err).len(), 5, "every message got a reply: {err}");
    // A note about how a turn was prefilled comes before its reply and meter, never after.
    let lines: Vec<&str> = err.lines().collect();
    for (i, l) in lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("note:"))
    {
        let next = lines[i + 1..].iter().find(|l| !l.starts_with("note:"));
        assert!(next.is_some_and(|n| n.starts_with("[ctx ")), "{l}: {err}");
    }
    for m in meters(&err) {
        let used: usize = m["[ctx ".len()..]
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(used <= 80, "{m}");
    }
}

/// Drives `llmarch chat` in a pseudo-terminal, as a person would.
mod pty {
    use super::*;

    #[test]
    fn interactive_session_two_turns_kv_save_exit() {
        let home = tempfile::tempdir().unwrap();
        let save = home.path().join("t.json");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_llmarch"));
        cmd.arg("chat")
            .arg(gemma("e4b-like"))
            .args(["-n", "3"])
            .env("TERM", "xterm")
            .env("NO_COLOR", "1")
            .env("HOME", home.path())
            .env("XDG_DATA_HOME", home.path().join("data"))
            .env_remove("HF_ENDPOINT");
        let mut p = rexpect::session::spawn_command(cmd, Some(60_000)).unwrap();

        let banner = pty_prompt(&mut p);
        assert!(banner.contains("llmarch chat"), "{banner}");
        let first = type_line(&mut p, "Hello there");
        assert!(first.contains("[ctx "), "{first}");
        assert!(first.contains("(0 cached)"), "{first}");
        let second = type_line(&mut p, "And then?");
        let meter = second
            .lines()
            .find(|l| l.contains("[ctx "))
            .unwrap_or_else(|| panic!("{second}"));
        let m = &meter[meter.find("[ctx ").unwrap()..];
        assert!(cached_of(m) > 20, "the second turn reuses the first: {m}");

        let kv = type_line(&mut p, "/kv");
        assert!(
            kv.contains("KV ") && kv.contains("held") && kv.contains("L2"),
            "{kv}"
        );
        let layers = type_line(&mut p, "/layers");
        assert!(layers.contains("sliding"), "{layers}");
        let bad = type_line(&mut p, "/set temperature banana");
        assert!(
            bad.contains("error: /set temperature: `banana` is not a number"),
            "{bad}"
        );
        let saved = type_line(&mut p, &format!("/save {}", save.display()));
        assert!(saved.contains("saved 4 messages"), "{saved}");

        // Ctrl-C at the prompt does not end the session.
        p.send_control('c').unwrap();
        let after = pty_prompt(&mut p);
        assert!(after.contains("Ctrl-D or /exit"), "{after}");

        p.send("/exit\r").unwrap();
        p.flush().unwrap();
        p.exp_eof().unwrap();

        let t = read_json(&save);
        assert_eq!(t["messages"].as_array().unwrap().len(), 4);
        assert_eq!(t["messages"][0]["content"], "Hello there");
        // The input history persists in the data directory.
        let history =
            std::fs::read_to_string(home.path().join("data/llmarch/chat_history")).unwrap();
        assert!(
            history.contains("Hello there") && history.contains("/kv"),
            "{history}"
        );
    }
}

#[test]
fn thinking_is_split_from_the_answer_as_it_streams() {
    use llmarch::chat::thinking::{Markers, Part, Splitter};
    let dir = gemma("e2b-like");
    let files = llmarch::loader::model_files::resolve(
        &llmarch::loader::ModelRef::parse(dir.to_str().unwrap()).unwrap(),
        &llmarch::loader::model_files::ResolveOptions { progress: false },
    )
    .unwrap();
    let tok = llmarch::loader::tokenizer::load(&files).unwrap();
    let markers = Markers::of(&tok);
    // Gemma 4: the thinking channel opens with `<|channel>` (100) and closes with `<channel|>`.
    assert!(!markers.starts_in_thinking("<|turn>model\n"));
    assert!(markers.starts_in_thinking("<|turn>model\n<|channel>thought\n"));
    assert!(!markers.starts_in_thinking("<|channel>thought\n<channel|>"));

    let mut ids = vec![100];
    ids.extend(tok.encode("thought\nThe robot", false).unwrap());
    ids.push(101);
    ids.extend(tok.encode("The boat", false).unwrap());
    let mut s = Splitter::new(&tok, markers, false);
    let mut thinking = String::new();
    let mut answer = String::new();
    for id in ids {
        for (part, text) in s.push(id).unwrap() {
            match part {
                Part::Thinking => thinking.push_str(&text),
                Part::Answer => answer.push_str(&text),
            }
        }
    }
    for (part, text) in s.finish().unwrap() {
        assert_eq!(part, Part::Answer);
        answer.push_str(&text);
    }
    assert_eq!(thinking, "thought\nThe robot");
    assert_eq!(answer, "The boat");
    let (content, reasoning) = s.texts().unwrap();
    assert_eq!(content, "The boat");
    assert_eq!(reasoning.as_deref(), Some("The robot"));
}

#[test]
fn templates_from_a_file_a_name_or_the_built_in_fallback() {
    let home = tempfile::tempdir().unwrap();
    // A built-in template by name.
    let o = chat_piped(
        "e2b-like",
        &["-n", "2", "--chat-template", "gemma-4-31B-it"],
        "Hello\n",
        home.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(meters(&stderr(&o)).len(), 1, "{}", stderr(&o));

    // A name that is neither a file nor built in: a startup error with the list.
    let o = chat_piped("e2b-like", &["--chat-template", "nope"], "", home.path());
    let err = expect_error(&o, 1);
    assert!(
        err.contains("--chat-template nope") && err.contains("gemma-4-E2B-it"),
        "{err}"
    );

    // An untrusted template that never ends: each turn fails with one clear line, fast, and
    // the session goes on to the end of the input.
    let looping = home.path().join("loop.jinja");
    std::fs::write(
        &looping,
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    let o = chat_piped(
        "e2b-like",
        &["--chat-template", looping.to_str().unwrap()],
        "Hello\nAgain\n",
        home.path(),
    );
    assert!(t0.elapsed().as_secs() < 20, "{:?}", t0.elapsed());
    let line = stopped_at(&o, "execution budget");
    assert!(line.starts_with("error: stdin line 1: "), "{line}");

    // A model folder without a chat template gets the built-in one for its family.
    let bare = home.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ] {
        std::fs::copy(gemma("e2b-like").join(f), bare.join(f)).unwrap();
    }
    let mut tc = read_json(&gemma("e2b-like").join("tokenizer_config.json"));
    tc.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(bare.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let input = home.path().join("input.txt");
    std::fs::write(&input, "Hello\n").unwrap();
    let o = llmarch()
        .args(["chat", bare.to_str().unwrap(), "-n", "2", "--input"])
        .arg(&input)
        .env("XDG_DATA_HOME", home.path())
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("ships no chat template: using the built-in gemma-4-E2B-it"),
        "{err}"
    );
    assert_eq!(meters(&err).len(), 1, "{err}");

    // --input that does not exist: a startup error.
    let o = llmarch()
        .args([
            "chat",
            bare.to_str().unwrap(),
            "--input",
            "/nonexistent/in.txt",
        ])
        .output()
        .unwrap();
    let err = expect_error(&o, 1);
    assert!(
        err.contains("cannot read --input /nonexistent/in.txt"),
        "{err}"
    );
}

/// Ctrl-C during a long history's prefill stops between two chunks: no reply, what was fed
/// stays cached, and the next try goes on from there.
#[test]
fn ctrl_c_stops_a_long_prefill_between_chunks() {
    let mut s = session("e2b-like", 2);
    s.max_context = 4096;
    s.conv.push_user(&"word ".repeat(900));
    let (_, ids, split) = s.prompt_ids().unwrap();
    assert!(
        split.unwrap() > llmarch::generate::PREFILL_CHUNK,
        "{}",
        ids.len()
    );
    let r = s
        .reply(&mut |_| {}, &mut |_, _| Ok(()), &AtomicBool::new(true))
        .unwrap();
    assert_eq!(r.stop, Some(StopReason::Interrupted));
    assert_eq!(r.generated, 0);
    assert_eq!(r.prefilled, llmarch::generate::PREFILL_CHUNK);
    assert!(s.conv.awaits_reply(), "the message waits for its reply");
    let r = s
        .reply(&mut |_| {}, &mut |_, _| Ok(()), &AtomicBool::new(false))
        .unwrap();
    assert_eq!(r.reused, llmarch::generate::PREFILL_CHUNK);
    assert_eq!(r.generated, 2);
}

/// Four greedy turns through /regen and /undo: per turn the generated ids, the tokens reused
/// and prefilled, and the drafts made and accepted.
fn drafting_script(s: &mut Session) -> Vec<(Vec<u32>, usize, usize, usize, usize)> {
    let mut out = vec![];
    let mut turn = |s: &mut Session, text: Option<&str>| {
        if let Some(t) = text {
            s.conv.push_user(t);
        }
        let r = s
            .reply(&mut |_| {}, &mut |_, _| Ok(()), &AtomicBool::new(false))
            .unwrap();
        out.push((
            r.generated_ids,
            r.reused,
            r.prefilled,
            r.draft_tokens,
            r.accepted_tokens,
        ));
    };
    turn(s, Some("Hello there, hello there"));
    turn(s, Some("And then? And then?"));
    assert!(s.conv.pop_reply());
    turn(s, None);
    assert!(s.undo());
    turn(s, Some("Something else"));
    out
}

/// Greedy chat turns with `--draft ngram` (any number of drafts) reply with the very tokens of
/// a session without drafting, turn after turn, through /regen and /undo (the per-turn
/// snapshots and the drafts' rollbacks share the cache), reusing and prefilling the same.
#[test]
fn drafting_changes_no_turn_of_a_greedy_chat() {
    let script = drafting_script;
    let plain = script(&mut session("e4b-like", 16));
    let mut accepted = 0;
    for (k, own) in [(1, false), (4, false), (3, true), (6, true)] {
        let mut s = session("e4b-like", 16);
        s.drafter = Some(if own {
            Box::new(OwnGreedy { round: 0 })
        } else {
            Box::new(llmarch::generate::ngram::NgramDrafter)
        });
        s.draft_tokens = k;
        let drafted = script(&mut s);
        for (turn, (a, b)) in plain.iter().zip(&drafted).enumerate() {
            assert_eq!(a.0, b.0, "turn {turn}, {k} drafts: tokens");
            assert_eq!(
                (a.1, a.2),
                (b.1, b.2),
                "turn {turn}, {k} drafts: reused, prefilled"
            );
            accepted += b.4;
        }
    }
    assert!(accepted > 0, "no draft was accepted");
}

/// The same with the Qwen3.5 MTP head (`--draft mtp`), whose cache is a slot of the target's:
/// /regen and /undo restore it with the target's layers, and every turn's prefill is caught
/// up on before the turn's first draft.
#[test]
fn drafting_with_the_mtp_head_changes_no_turn_of_a_greedy_chat() {
    use llmarch::cli::{draft::DraftArgs, shared, Ctx};
    let dir = root().join("tests/fixtures/qwen3_5_mtp/dense");
    let script = drafting_script;
    let plain = script(&mut session_at(&dir, 12));
    let mut drafted = 0;
    let ctx = Ctx {
        quiet: true,
        verbose: false,
        parse: Default::default(),
    };
    let (model_ref, spec, _) = shared::runnable_spec(&ctx, dir.to_str().unwrap()).unwrap();
    let precision = shared::Precision {
        device: candle_core::Device::Cpu,
        dtype: candle_core::DType::F32,
        weights: llmarch::layers::linear::WeightFormat::Loaded,
    };
    for k in [1usize, 3] {
        let args = DraftArgs {
            draft: Some("mtp".into()),
            draft_tokens: Some(k),
        };
        let draft = args
            .build(&ctx, &model_ref, &spec, &precision, false)
            .unwrap()
            .unwrap();
        let mut s = session_at(&dir, 12);
        s.set_drafter(draft.drafter, draft.tokens).unwrap();
        let turns = script(&mut s);
        assert_eq!(plain.len(), turns.len());
        for (turn, (a, b)) in plain.iter().zip(&turns).enumerate() {
            assert_eq!(
                (&a.0, a.1, a.2),
                (&b.0, b.1, b.2),
                "turn {turn}, {k} drafts"
            );
            drafted += b.3;
        }
    }
    assert!(drafted > 0, "the head never drafted");
}

/// Drafts the target's own greedy continuation (on a copy of its cache) with one token wrong
/// per round, at an offset cycling through every position and past the end.
struct OwnGreedy {
    round: usize,
}

impl llmarch::generate::Drafter for OwnGreedy {
    fn name(&self) -> String {
        "own-greedy".into()
    }

    fn draft(
        &mut self,
        ctx: llmarch::generate::speculative::DraftContext,
        n: usize,
    ) -> anyhow::Result<Vec<u32>> {
        let mut cache = ctx.cache.clone();
        let mut last = *ctx.history.last().unwrap();
        let mut d = vec![];
        for _ in 0..n {
            let row = ctx.target.forward(&[last], &mut cache)?.get(0)?;
            last = row.argmax(0)?.to_scalar::<u32>()?;
            d.push(last);
        }
        let wrong = self.round % (n + 1);
        if let Some(t) = d.get_mut(wrong) {
            *t = (*t + 1) % ctx.target.spec().vocab_size as u32;
        }
        self.round += 1;
        Ok(d)
    }
}
