//! The binary end to end: output contracts, the published Gemma 4 figures, bad input, the Hub.

mod common;
use common::*;
use serde_json::Value;
use std::collections::HashMap;

#[test]
fn kv_budget_reproduces_the_gemma4_sharing_figures() {
    // Published: E2B's KV sharing saves 24,576 B/token (3.22 GB at 128K bf16) with the real
    // 512-d full-attention heads; E4B 43,008 B/token (5.6 GB).
    let v = run_json(&[
        "kv-budget",
        "gemma4-e2b",
        "gemma4-e4b",
        "--context",
        "128k",
        "--json",
    ]);
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, per_token) in rows.iter().zip([24_576u64, 43_008]) {
        assert_eq!(row["context"], 131_072);
        assert_eq!(row["kv_dtype"], "bf16");
        assert_eq!(
            row["savings"]["kvsharing"],
            per_token * 131_072,
            "{}",
            row["model"]
        );
        // The waterfall adds up: naive − Σ savings = what the cache holds.
        let saved: i64 = row["savings"]
            .as_object()
            .unwrap()
            .values()
            .map(|s| s.as_i64().unwrap())
            .sum();
        let total = row["total_bytes"].as_i64().unwrap();
        assert_eq!(row["naive_bytes"].as_i64().unwrap() - saved, total);
        let layers: i64 = row["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["bytes"].as_i64().unwrap())
            .sum();
        assert_eq!(layers, total);
    }
    // The article's ~2.7 GB assumes all 20 shared layers at head_dim 256 with 1 KV head:
    // 20 × 1 × 256 × 2 (K,V) × 2 B × 131072 = 2.68 GB; the real figure is larger.
    assert!(rows[0]["savings"]["kvsharing"].as_u64().unwrap() > 20 * 256 * 2 * 2 * 131_072);
}

#[test]
fn e2b_and_e4b_sharing_maps() {
    for (alias, layers, first_shared) in [("gemma4-e2b", 35, 15), ("gemma4-e4b", 42, 24)] {
        let v = run_json(&["inspect", alias, "--json"]);
        let ls = v["layers"].as_array().unwrap();
        assert_eq!(ls.len(), layers);
        // The owners: the last non-shared layer of each type.
        let last_of = |kind: &str| {
            (0..first_shared)
                .rev()
                .find(|&j| ls[j]["attention"]["kind"] == kind)
                .unwrap()
        };
        let (sliding_owner, full_owner) = (last_of("sliding"), last_of("full"));
        for (i, l) in ls.iter().enumerate() {
            let expected = if i < first_shared {
                Value::Null
            } else if l["attention"]["kind"] == "sliding" {
                sliding_owner.into()
            } else {
                full_owner.into()
            };
            assert_eq!(l["kv_source"], expected, "{alias} layer {i}");
        }
        if alias == "gemma4-e2b" {
            assert_eq!((sliding_owner, full_owner), (13, 14));
        }
    }
}

#[test]
fn inspect_json_has_the_contract_fields() {
    let v = run_json(&["inspect", "gemma4-26b-a4b", "--json"]);
    assert!(v["params"]["total"].as_u64().unwrap() > v["params"]["active"].as_u64().unwrap());
    let l5 = &v["layers"][5];
    assert_eq!(l5["attention"]["kind"], "full");
    assert_eq!(l5["q_heads"], 16);
    assert_eq!(l5["kv_heads"], 2);
    assert_eq!(l5["head_dim"], 512);
    assert_eq!(l5["k_eq_v"], true);
    assert_eq!(l5["ffn"]["kind"], "moe");
    assert_eq!(v["layers"][0]["attention"]["window"], 1024);
}

#[test]
fn inspect_text_folds_layers() {
    let o = run(&["inspect", "gemma4-e2b"]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("15-18"), "{out}");
    assert!(out.contains("→ L13"), "{out}");
    assert!(out.contains("4,628,569,344"), "{out}");
}

#[test]
fn every_alias_works_offline() {
    let v = run_json(&["models", "--json"]);
    let aliases: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["alias"].as_str().unwrap())
        .collect();
    assert_eq!(aliases.len(), 10);
    // kv-budget with no model: every alias, one row per context.
    let all = run_json(&["kv-budget", "--context", "4k,1m", "--json"]);
    assert_eq!(all.as_array().unwrap().len(), 20);
    for a in aliases {
        let o = run(&["inspect", a]);
        assert!(o.status.success(), "{a}: {}", stderr(&o));
    }
}

#[test]
fn kv_budget_text_views() {
    let o = run(&[
        "kv-budget",
        "gemma4-e2b",
        "--context",
        "4k,128k",
        "--per-layer",
        "--explain",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("cross-layer KV sharing 3.22 GB"), "{out}");
    assert!(out.contains("min(131072, 512) tokens"), "{out}");
    assert!(out.contains("reads L13"), "{out}");
    // q8_0 uses 34-byte blocks of 32 elements.
    let q8 = run_json(&[
        "kv-budget",
        "gemma4-31b",
        "--kv-dtype",
        "q8_0",
        "--context",
        "1000",
        "--json",
    ]);
    let bf = run_json(&[
        "kv-budget",
        "gemma4-31b",
        "--kv-dtype",
        "bf16",
        "--context",
        "1000",
        "--json",
    ]);
    let (q8, bf) = (
        q8[0]["total_bytes"].as_f64().unwrap(),
        bf[0]["total_bytes"].as_f64().unwrap(),
    );
    assert!((q8 / bf - 34.0 / 64.0).abs() < 1e-3, "{q8} {bf}");
    let b2 = run_json(&[
        "kv-budget",
        "gemma4-31b",
        "--batch",
        "2",
        "--context",
        "1000",
        "--json",
    ]);
    assert_eq!(b2[0]["total_bytes"].as_f64().unwrap(), 2.0 * bf);
}

#[test]
fn bad_input_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str, content: Option<&str>| {
        let p = dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        if let Some(c) = content {
            std::fs::write(p.join("config.json"), c).unwrap();
        }
        p.to_str().unwrap().to_string()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["gemma9-e2b".into()], "unknown model `gemma9-e2b`"),
        (vec![d("missing", None)], "config.json not found"),
        (vec![d("empty", Some("  \n"))], "is empty"),
        (vec![d("garbage", Some("{not json"))], "is not valid JSON"),
        (vec![d("array", Some("[1,2]"))], "not a JSON object"),
        (
            vec![d(
                "llama",
                Some(r#"{"model_type": "llama", "hidden_size": 8}"#),
            )],
            "unsupported model_type `llama`; supported model types: gemma4_text",
        ),
        (
            vec![d(
                "shared",
                Some(
                    r#"{"model_type": "gemma4_text", "num_hidden_layers": 4, "num_kv_shared_layers": 4}"#,
                ),
            )],
            "num_kv_shared_layers` = 4 leaves no layer to own a KV cache",
        ),
        (
            vec![d(
                "types",
                Some(
                    r#"{"model_type": "gemma4_text", "num_hidden_layers": 3, "layer_types": ["full_attention"]}"#,
                ),
            )],
            "key `layer_types` has 1 entries but num_hidden_layers is 3",
        ),
        (
            vec![d(
                "wrongtype",
                Some(r#"{"model_type": "gemma4_text", "hidden_size": "big"}"#),
            )],
            "key `hidden_size`: invalid type",
        ),
        (
            vec![d(
                "unknown",
                Some(r#"{"model_type": "gemma4_text", "use_magic_attention": true}"#),
            )],
            "config keys llmarch does not know for gemma4_text: `use_magic_attention`",
        ),
    ];
    for (model, needle) in cases {
        for cmd in ["inspect", "kv-budget"] {
            let mut args = vec![cmd.to_string()];
            args.extend(model.iter().cloned());
            let o = llmarch().args(&args).output().unwrap();
            let err = expect_error(&o, 1);
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
    // Unknown keys become warnings on request.
    let p = d(
        "unknown2",
        Some(r#"{"model_type": "gemma4_text", "use_magic_attention": true}"#),
    );
    let o = run(&["inspect", &p, "--allow-unknown-keys"]);
    assert!(o.status.success());
    assert!(
        stderr(&o).contains("warning: ignoring config keys"),
        "{}",
        stderr(&o)
    );
    // A hint comes on its own line.
    let err = expect_error(&run(&["inspect", "gemma4-e2"]), 1);
    assert!(err.contains("\nhint: did you mean `gemma4-e2b`?"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec!["kv-budget", "--context", "12q"],
        vec!["kv-budget", "--context", "0"],
        vec!["kv-budget", "--kv-dtype", "f8"],
        vec!["kv-budget", "--batch", "0"],
        vec!["frobnicate"],
        vec!["inspect"],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"));
    }
    assert!(
        stderr(&run(&["kv-budget", "--context", "12q"])).contains("`12q` is not a context length")
    );
    assert_eq!(run(&["--help"]).status.code(), Some(0));
}

#[test]
fn closed_stdout_pipe_exits_0() {
    use std::process::Stdio;
    let mut child = llmarch()
        .args([
            "kv-budget",
            "--context",
            "1k,2k,4k,8k,16k,32k,64k,128k",
            "--per-layer",
            "--explain",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away at once, like `| head -0`
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
}

#[test]
fn hub_download_then_offline_from_cache() {
    let config = read("configs/Laguna-XS.2/config.json");
    let routes = HashMap::from([
        (
            "/acme/laguna-copy/resolve/main/config.json".to_string(),
            Reply::File(config.into_bytes()),
        ),
        (
            "/acme/gated/resolve/main/config.json".to_string(),
            Reply::Status(401),
        ),
    ]);
    let hub = FakeHub::start(routes);
    let home = tempfile::tempdir().unwrap();
    let with_hub = |args: &[&str]| {
        llmarch()
            .args(args)
            .env("HF_ENDPOINT", &hub.url)
            .env("HF_HOME", home.path())
            .output()
            .unwrap()
    };
    let o = with_hub(&["inspect", "acme/laguna-copy", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["family"], "laguna");
    assert_eq!(v["model"], "acme/laguna-copy");
    assert!(hub
        .hits
        .lock()
        .unwrap()
        .iter()
        .any(|h| h.ends_with("config.json")));

    // Gated and missing repos.
    let err = expect_error(&with_hub(&["inspect", "acme/gated"]), 1);
    assert!(err.contains("acme/gated is gated"), "{err}");
    assert!(
        err.contains("hint: accept the licence on the model page and set HF_TOKEN"),
        "{err}"
    );
    let err = expect_error(&with_hub(&["inspect", "acme/nothing@v2"]), 1);
    assert!(
        err.contains("config.json of acme/nothing@v2 not found"),
        "{err}"
    );

    // Offline: served from the cache, no request made.
    drop(hub);
    let offline = |args: &[&str]| {
        llmarch()
            .args(args)
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", home.path())
            .output()
            .unwrap()
    };
    let o = offline(&["kv-budget", "acme/laguna-copy", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = expect_error(&offline(&["inspect", "acme/other"]), 1);
    assert!(err.contains("HF_HUB_OFFLINE is set"), "{err}");
}

#[test]
fn completions_are_committed_and_fresh() {
    for (shell, file) in [
        ("bash", "llmarch.bash"),
        ("zsh", "_llmarch"),
        ("fish", "llmarch.fish"),
        ("powershell", "_llmarch.ps1"),
        ("elvish", "llmarch.elv"),
    ] {
        let o = run(&["completions", shell]);
        assert!(o.status.success());
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("completions")
            .join(file);
        if std::env::var_os("LLMARCH_UPDATE_COMPLETIONS").is_some() {
            std::fs::write(&path, &o.stdout).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == o.stdout,
            "completions/{file} is stale: regenerate with `LLMARCH_UPDATE_COMPLETIONS=1 cargo test --test cli completions`"
        );
    }
}

/// A copy of the real `configs/NAME/config.json` with `edit` applied, in its own folder.
fn edited_config(dir: &std::path::Path, name: &str, edit: impl FnOnce(&mut Value)) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("configs").join(name).join("config.json"))
        .expect("the real config");
    let mut v: Value = serde_json::from_str(&text).unwrap();
    edit(&mut v);
    let out = dir.join(format!("{name}-{}", std::process::id()));
    let out = (0..)
        .map(|i| out.with_extension(i.to_string()))
        .find(|p| !p.exists())
        .unwrap();
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("config.json"), v.to_string()).unwrap();
    out.to_str().unwrap().to_string()
}

#[test]
fn hostile_sizes_are_refused_by_key_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let huge = Value::from(1u64 << 40);
    let cases = [
        ("gemma-4-E2B-it", "text_config", "head_dim"),
        ("gemma-4-E2B-it", "text_config", "num_hidden_layers"),
        ("gemma-4-31B-it", "text_config", "hidden_size"),
        ("DeepSeek-V4-Pro", "", "num_hidden_layers"),
        ("DeepSeek-V4-Pro", "", "hc_sinkhorn_iters"),
        ("Laguna-XS.2", "", "head_dim"),
        ("ZAYA1-8B", "", "hidden_size"),
        ("Qwen3.6-27B", "text_config", "linear_conv_kernel_dim"),
    ];
    for (name, wrapper, key) in cases {
        let d = edited_config(dir.path(), name, |v| {
            let at = if wrapper.is_empty() {
                v
            } else {
                &mut v[wrapper]
            };
            at[key] = huge.clone();
        });
        let prefix = if wrapper.is_empty() {
            String::new()
        } else {
            format!("{wrapper}.")
        };
        for cmd in ["inspect", "kv-budget"] {
            let o = run(&[cmd, &d]);
            let err = expect_error(&o, 1);
            assert!(
                err.contains(&format!(
                    "key `{prefix}{key}` = 1099511627776 is larger than any real model's: llmarch accepts at most "
                )),
                "{name} {key} {cmd}: {err}"
            );
        }
    }
    // An iteration count that would run without end: refused at a bound 50× the real one.
    let d = edited_config(dir.path(), "DeepSeek-V4-Flash", |v| {
        v["hc_sinkhorn_iters"] = 1_000_000_000u64.into();
    });
    let err = expect_error(&run(&["inspect", &d]), 1);
    assert!(err.contains("`hc_sinkhorn_iters` = 1000000000"), "{err}");
    assert!(err.contains("at most 1000"), "{err}");

    // `run` on a tiny checkpoint whose config claims 2^40-wide heads: the error, not an abort on
    // a 2 TB RoPE table.
    let tiny = dir.path().join("tiny");
    std::fs::create_dir(&tiny).unwrap();
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4/e2b-like");
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tiny.join(p.file_name().unwrap())).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("config.json")).unwrap()).unwrap();
    cfg["head_dim"] = huge.clone();
    std::fs::write(tiny.join("config.json"), cfg.to_string()).unwrap();
    let o = run(&[
        "run",
        tiny.to_str().unwrap(),
        "--prompt-ids",
        "2,3",
        "-n",
        "1",
    ]);
    let err = expect_error(&o, 1);
    assert!(err.contains("key `head_dim` = 1099511627776"), "{err}");
}

#[test]
fn huge_numbers_are_errors_not_wrapped_figures() {
    // 1M tokens × batch 600000 at f32 used to print 1674 PB with negative savings.
    let o = run(&[
        "kv-budget",
        "deepseek-v4-pro",
        "--context",
        "1m",
        "--batch",
        "600000",
        "--kv-dtype",
        "f32",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error: deepseek-v4-pro at 1M: the KV cache at 1048576 tokens × batch 600000 is beyond what llmarch counts"),
        "{err}"
    );
    assert!(
        err.contains("\nhint: give a smaller --context or --batch"),
        "{err}"
    );
    assert!(
        !stdout(&o).contains("PB"),
        "nothing half-written: {}",
        stdout(&o)
    );
    // Just below: every figure is positive and the waterfall adds up.
    let v = run_json(&[
        "kv-budget",
        "deepseek-v4-pro",
        "--context",
        "1m",
        "--batch",
        "6000",
        "--kv-dtype",
        "f32",
        "--json",
    ]);
    let row = &v[0];
    let saved: i64 = row["savings"]
        .as_object()
        .unwrap()
        .values()
        .map(|s| s.as_i64().unwrap())
        .sum();
    for s in row["savings"].as_object().unwrap().values() {
        assert!(s.as_i64().unwrap() > 0, "{s}");
    }
    assert_eq!(
        row["naive_bytes"].as_i64().unwrap() - saved,
        row["total_bytes"].as_i64().unwrap()
    );

    // Flags: out-of-range numbers are usage errors (exit 2) naming the value.
    for (args, needle) in [
        (
            vec!["kv-budget", "--batch", "2000000"],
            "2000000 is not in 1..=1048576",
        ),
        (
            vec!["kv-budget", "--context", "18446744073709551615"],
            "is out of range",
        ),
        (
            vec![
                "run",
                "x",
                "--prompt",
                "a",
                "--max-context",
                "18446744073709551615",
            ],
            "is out of range",
        ),
        (
            vec!["chat", "x", "--max-context", "2000000m"],
            "is out of range",
        ),
        (
            vec!["run", "x", "--prompt", "a", "--max-context", "12q"],
            "`12q` is not a context length",
        ),
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
    // Suffixes as the README promises (`--max-context 1k` runs in tests/chat.rs).
    let v = run_json(&["kv-budget", "gemma4-e2b", "--context", "1k", "--json"]);
    assert_eq!(v[0]["context"], 1024);
}
