//! Fuzzing the parsers that read untrusted bytes, on stable Rust: seeded mutations of real
//! inputs fed to the same functions the commands call, each under `catch_unwind`.
//! - `config.json` → ArchSpec, then what `inspect` and `kv-budget` compute from it (the real
//!   configs under `configs/`);
//! - a safetensors file (header JSON, length prefix, bytes) and `model.safetensors.index.json`;
//! - chat templates (`templates/`, compiled and rendered with fuel) and `tokenizer_config.json`;
//! - the Hub's file-list JSON.
//!
//! `cargo test` runs a short round with fixed seeds and replays every kept crasher under
//! `tests/fuzz/` (file name = target). `scripts/fuzz.sh [SECONDS]` runs long rounds with fresh
//! seeds (`LLMARCH_FUZZ_SECS`, `LLMARCH_FUZZ_SEED`); an input that panics fails the round and
//! is printed; one that aborts the process (an allocation no bound stopped) is left in
//! `target/fuzz-last-input.<target>` for the script to keep.

use candle_core::{DType, Device};
use llmarch::arch::{self, budget, config::ParseOptions};
use llmarch::chat::template::{self, ChatTemplate, RenderRequest};
use llmarch::loader::hub;
use llmarch::loader::weights::Weights;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Numbers and values that break arithmetic and allocation.
fn interesting(rng: &mut StdRng) -> Value {
    let numbers = [
        json!(0),
        json!(1),
        json!(-1),
        json!(2),
        json!(3),
        json!(7),
        json!(255),
        json!(65536),
        json!(1u64 << 31),
        json!(1u64 << 32),
        json!(1u64 << 40),
        json!(1u64 << 53),
        json!(1u64 << 63),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1e308),
        json!(-1e308),
        json!(0.5),
        json!(1e-300),
        json!(-0.0),
        json!(""),
        json!("x"),
        json!("{%}"),
        json!(null),
        json!(true),
        json!([]),
        json!({}),
        json!([1, 2, 3]),
        json!("sliding_attention"),
        json!("full_attention"),
        json!("linear_attention"),
    ];
    numbers[rng.random_range(0..numbers.len())].clone()
}

/// Every node's path (object keys and array indices) under `v`.
fn paths(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                at.push(k.clone());
                paths(c, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                at.push(i.to_string());
                paths(c, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn node<'v>(v: &'v mut Value, path: &[String]) -> Option<&'v mut Value> {
    path.iter().try_fold(v, |v, k| match v {
        Value::Object(m) => m.get_mut(k),
        Value::Array(a) => a.get_mut(k.parse::<usize>().ok()?),
        _ => None,
    })
}

/// One to four structural mutations of a JSON document.
fn mutate_json(v: &mut Value, rng: &mut StdRng) {
    for _ in 0..rng.random_range(1..=4) {
        let mut all = vec![];
        paths(v, &mut vec![], &mut all);
        let path = all[rng.random_range(0..all.len())].clone();
        let Some(n) = node(v, &path) else { continue };
        match rng.random_range(0..6) {
            0 | 1 => *n = interesting(rng),
            2 => {
                if let Some(x) = n.as_f64() {
                    let f = [0.0, -1.0, 2.0, 1000.0, 1e9, 1e-9][rng.random_range(0..6)];
                    *n = json!(x * f);
                }
            }
            3 => match n {
                Value::Object(m) if !m.is_empty() => {
                    let k = m.keys().nth(rng.random_range(0..m.len())).cloned();
                    if let Some(k) = k {
                        m.remove(&k);
                    }
                }
                Value::Array(a) if !a.is_empty() => {
                    let keep = rng.random_range(0..a.len());
                    a.truncate(keep);
                }
                _ => *n = Value::Null,
            },
            4 => {
                if let Value::Array(a) = n {
                    if let Some(x) = a.first().cloned() {
                        for _ in 0..rng.random_range(1..40) {
                            a.push(x.clone());
                        }
                    }
                }
            }
            _ => {
                if let Value::Object(m) = n {
                    let keys = [
                        "layer_types",
                        "head_dim",
                        "num_hidden_layers",
                        "sliding_window",
                    ];
                    m.insert(keys[rng.random_range(0..4)].into(), interesting(rng));
                }
            }
        }
    }
}

/// Byte-level mutations of text: tag fragments in, ranges out or doubled.
fn mutate_text(s: &str, rng: &mut StdRng) -> String {
    let mut b = s.as_bytes().to_vec();
    let frags: [&[u8]; 12] = [
        b"{%",
        b"%}",
        b"{{",
        b"}}",
        b"{#",
        b"#}",
        b"{%-",
        b"-%}",
        b"{%}",
        b"\xc3\xa9",
        b"\0",
        b"|",
    ];
    for _ in 0..rng.random_range(1..=4) {
        let at = rng.random_range(0..=b.len());
        match rng.random_range(0..4) {
            0 => {
                let f = frags[rng.random_range(0..frags.len())];
                b.splice(at..at, f.iter().copied());
            }
            1 => {
                let end = (at + rng.random_range(0..64)).min(b.len());
                b.drain(at..end);
            }
            2 => {
                let end = (at + rng.random_range(0..64)).min(b.len());
                let copy = b[at..end].to_vec();
                b.splice(at..at, copy);
            }
            _ => b.insert(at, rng.random()),
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// Run `f` on an input, keeping the input on disk while it runs (for a process abort).
fn guarded(target: &str, input: &[u8], f: impl FnOnce()) -> Result<(), String> {
    let last = root().join(format!("target/fuzz-last-input.{target}"));
    let _ = std::fs::write(&last, input);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

fn config(bytes: &[u8]) {
    let Ok(raw) = serde_json::from_slice::<Value>(bytes) else {
        return;
    };
    let Ok(spec) = arch::parse_config(&raw, &ParseOptions::default()) else {
        return;
    };
    let model = llmarch::loader::ModelRef::Local(PathBuf::from("fuzz"));
    let _ = llmarch::cli::inspect::to_json(&model, &spec);
    let _ = llmarch::cli::inspect::layer_table(&spec).to_string();
    for context in [1u64, 4096, 1 << 20, 1 << 40] {
        let _ = budget::compute(&spec, context, 1, budget::KvDtype::F32);
    }
}

fn safetensors(bytes: &[u8], dir: &Path) {
    let path = dir.join("model.safetensors");
    std::fs::write(&path, bytes).unwrap();
    if let Ok(w) = Weights::open(&[path], None, DType::F32, &Device::Cpu) {
        for (name, e) in w.tensors().map(|(n, e)| (n.to_string(), e.shape.clone())) {
            let _ = w.root_vb().get(e.as_slice(), &name);
        }
        let _ = w.unused();
    }
}

fn index(bytes: &[u8], dir: &Path, shard: &Path) {
    let path = dir.join("model.safetensors.index.json");
    std::fs::write(&path, bytes).unwrap();
    let _ = Weights::open(
        &[shard.to_path_buf()],
        Some(&path),
        DType::F32,
        &Device::Cpu,
    );
}

fn chat_template(bytes: &[u8]) {
    let source = String::from_utf8_lossy(bytes);
    let Ok(t) = ChatTemplate::new(&source, "fuzz", Default::default()) else {
        return;
    };
    let messages = [
        json!({"role": "system", "content": "Be brief."}),
        json!({"role": "user", "content": "Hi {{ there }} {% x %}"}),
        json!({"role": "assistant", "content": "Hello."}),
        json!({"role": "user", "content": ""}),
    ];
    let kwargs = Default::default();
    let _ = t.with_fuel(200_000).render(&RenderRequest {
        messages: &messages,
        tools: None,
        add_generation_prompt: true,
        kwargs: &kwargs,
    });
}

fn tokenizer_config(bytes: &[u8], dir: &Path) {
    let path = dir.join("tokenizer_config.json");
    std::fs::write(&path, bytes).unwrap();
    let _ = template::special_tokens(Some(&path));
}

fn listing(bytes: &[u8]) {
    let _ = hub::parse_listing(bytes);
}

/// The seeds of one target: real inputs.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let read_dir = |d: &str, name: &str| -> Vec<Vec<u8>> {
        let mut v: Vec<_> = std::fs::read_dir(root().join(d))
            .unwrap_or_else(|e| panic!("{d}: {e}"))
            .flatten()
            .map(|e| e.path().join(name))
            .filter(|p| p.is_file())
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        v.sort();
        assert!(!v.is_empty(), "no seeds for {target} in {d}");
        v
    };
    match target {
        "config" => read_dir("configs", "config.json"),
        "safetensors" => {
            vec![
                std::fs::read(root().join("tests/fixtures/zaya/sliding/reference.safetensors"))
                    .unwrap(),
            ]
        }
        "index" => vec![
            json!({"metadata": {"total_size": 64}, "weight_map": {"t": "model.safetensors"}})
                .to_string()
                .into_bytes(),
        ],
        "template" => {
            let mut v: Vec<Vec<u8>> = std::fs::read_dir(root().join("templates"))
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "jinja"))
                .map(|p| std::fs::read(p).unwrap())
                .collect();
            v.sort();
            assert!(!v.is_empty(), "no template seeds");
            v
        }
        "tokenizer_config" => read_dir("tests/fixtures/gemma4", "tokenizer_config.json"),
        "listing" => vec![
            json!({"sha": "a".repeat(40), "siblings": [{"rfilename": "config.json"}]})
                .to_string()
                .into_bytes(),
        ],
        other => panic!("no target {other}"),
    }
}

/// A mutation of `seed` for `target`.
fn mutate(target: &str, seed: &[u8], rng: &mut StdRng) -> Vec<u8> {
    match target {
        "template" => mutate_text(&String::from_utf8_lossy(seed), rng).into_bytes(),
        "safetensors" => mutate_safetensors(seed, rng),
        _ => match serde_json::from_slice::<Value>(seed) {
            Ok(mut v) if rng.random_range(0..8) > 0 => {
                mutate_json(&mut v, rng);
                serde_json::to_vec(&v).unwrap()
            }
            _ => mutate_text(&String::from_utf8_lossy(seed), rng).into_bytes(),
        },
    }
}

/// The header as JSON mutated and re-framed, or the length prefix or bytes changed.
fn mutate_safetensors(seed: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let n = seed
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
        .filter(|&n| n <= seed.len() - 8);
    let header = n.and_then(|n| serde_json::from_slice::<Value>(&seed[8..8 + n]).ok());
    let mut out = seed.to_vec();
    match (rng.random_range(0..4), n, header) {
        (0 | 1, Some(n), Some(mut v)) => {
            mutate_json(&mut v, rng);
            let h = serde_json::to_vec(&v).unwrap();
            out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&h);
            out.extend_from_slice(&seed[8 + n..]);
        }
        (2, Some(n), _) => {
            let lens = [
                0,
                1,
                7,
                (n as u64).saturating_sub(1),
                n as u64 + 1,
                u64::MAX,
                1 << 40,
            ];
            out[..8].copy_from_slice(&lens[rng.random_range(0..lens.len())].to_le_bytes());
        }
        _ if !out.is_empty() => {
            let span = n.map_or(out.len(), |n| (8 + n).min(out.len()));
            for _ in 0..rng.random_range(1..8) {
                let at = rng.random_range(0..span);
                out[at] = rng.random();
            }
            if rng.random_range(0..4) == 0 {
                let keep = rng.random_range(0..out.len());
                out.truncate(keep);
            }
        }
        _ => {}
    }
    out
}

fn call(target: &str, input: &[u8], dir: &Path, shard: &Path) -> Result<(), String> {
    guarded(target, input, || match target {
        "config" => config(input),
        "safetensors" => safetensors(input, dir),
        "index" => index(input, dir, shard),
        "template" => chat_template(input),
        "tokenizer_config" => tokenizer_config(input, dir),
        "listing" => listing(input),
        other => panic!("no target {other}"),
    })
}

const TARGETS: [&str; 6] = [
    "config",
    "safetensors",
    "index",
    "template",
    "tokenizer_config",
    "listing",
];

/// Every kept crasher still runs clean.
#[test]
fn kept_crashers_stay_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let shard = root().join("tests/fixtures/zaya/sliding/reference.safetensors");
    let kept = root().join("tests/fuzz");
    let mut n = 0;
    for e in std::fs::read_dir(&kept).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(target) = TARGETS.iter().find(|t| name.starts_with(&format!("{t}-"))) else {
            continue;
        };
        let input = std::fs::read(e.path()).unwrap();
        if let Err(p) = call(target, &input, dir.path(), &shard) {
            panic!("tests/fuzz/{name} panics again: {p}");
        }
        n += 1;
    }
    assert!(n > 0, "no crashers under tests/fuzz");
}

/// Mutated inputs for every target: none may panic. Short and fixed-seeded under `cargo
/// test`; `LLMARCH_FUZZ_SECS` / `LLMARCH_FUZZ_SEED` for long rounds.
#[test]
fn mutated_inputs_never_panic() {
    let secs: Option<u64> = std::env::var("LLMARCH_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok());
    let seed: u64 = std::env::var("LLMARCH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2026);
    let dir = tempfile::tempdir().unwrap();
    let shard = root().join("tests/fixtures/zaya/sliding/reference.safetensors");
    let mut crashes = vec![];
    for (t, target) in TARGETS.iter().enumerate() {
        let seeds = seeds(target);
        let mut rng = StdRng::seed_from_u64(seed ^ (t as u64) << 32);
        let deadline = secs.map(|s| Instant::now() + Duration::from_secs(s / TARGETS.len() as u64));
        let mut tried = 0u64;
        loop {
            match deadline {
                Some(d) if Instant::now() >= d => break,
                None if tried >= 150 => break,
                _ => {}
            }
            let mut input = seeds[rng.random_range(0..seeds.len())].clone();
            for _ in 0..rng.random_range(1..=3) {
                input = mutate(target, &input, &mut rng);
            }
            if let Err(p) = call(target, &input, dir.path(), &shard) {
                crashes.push(format!(
                    "{target}: {p}\n  input: {}",
                    String::from_utf8_lossy(&input[..input.len().min(400)])
                ));
                let keep = root().join(format!("target/fuzz-crash-{target}-{tried}"));
                let _ = std::fs::write(keep, &input);
            }
            tried += 1;
        }
        eprintln!("fuzz {target}: {tried} inputs");
    }
    assert!(
        crashes.is_empty(),
        "{} crashes:\n{}",
        crashes.len(),
        crashes.join("\n")
    );
}
