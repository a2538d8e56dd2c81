//! `--dtype q8_0` and `--dtype q4_0` end to end: weight matrices quantized at load to GGML's
//! q8_0 or q4_0, f32 activations.
//!
//! Two references per format, both made by transformers 5.23.0 (`tests/oracle/q8_0_fixtures.py
//! [--format q4_0]`):
//! - the same checkpoint with exactly the weights llmarch quantizes replaced by their q8_0 (q4_0)
//!   values (`tests/fixtures/<format>/<name>/`): llmarch must equal it as closely as it equals
//!   the f32 reference in f32 (greedy tokens, prefill and decode logits);
//! - the fixture's f32 reference: llmarch's quantized logits may differ from it only by what the
//!   format itself costs, which the oracle measured on the reference. These tiny checkpoints have
//!   random weights that amplify any weight change layer after layer (bf16 weights move their
//!   logits by 7-29 % relative RMS), so that cost is 2-26 % here for q8_0, not the ~0.5 % of one
//!   q8_0 product, and more for q4_0.

mod common;
use candle_core::{Device, Tensor};
use common::reference::{argmax, max_abs_diff};
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Logit tolerance against the reference given the same quantized weights (summation order
/// only; a weight quantized on one side and not the other moves logits by ~1e-2 and more).
/// Measured: Qwen3.6 3.7e-4 (q4_0/qwen3_5-dense; its per-head gated norms amplify f32 rounding,
/// see tests/oracle/README.md) and 7.9e-5 (q8_0); every other family at most 3.6e-5
/// (q8_0/gemma4-e2b-like).
fn tol(family: &str) -> f32 {
    match family {
        "qwen3_5" => 2e-3,
        _ => 2e-4,
    }
}

/// The family of a quantized reference: the fixture folder it was made from.
fn family_of(r: &Value) -> String {
    let src = r["fixture"].as_str().unwrap();
    src.trim_start_matches("tests/fixtures/")
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The formats, as `--dtype` names them and as their fixture folders are named.
const FORMATS: [&str; 2] = ["q8_0", "q4_0"];

/// Every reference of `format`: (name, its reference.json, the checkpoint folder).
fn fixtures(format: &str) -> Vec<(String, Value, PathBuf)> {
    let mut v: Vec<_> = std::fs::read_dir(root().join(format))
        .unwrap()
        .map(|e| {
            let dir = e.unwrap().path();
            let r = reference::read_json(&dir.join("reference.json"));
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(r["fixture"].as_str().unwrap());
            (
                dir.file_name().unwrap().to_string_lossy().into_owned(),
                r,
                src,
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(v.len() >= 6, "{format} fixtures: {}", v.len());
    v
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn csv(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn logits(path: &Path, key: &str) -> Tensor {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .remove(key)
        .unwrap_or_else(|| panic!("{}: no `{key}`", path.display()))
}

/// `llmarch run DIR --dtype FORMAT --prompt-ids IDS -n N` (greedy) with `--json` and
/// `--logits-out`: the stats object, stderr, and the logits `[positions, vocab]`.
///
/// The oracle multiplies in f32, so these runs keep f32 products (`LLMARCH_KERNELS=avx512`): no
/// int8 products for the quantized weights in a prompt, no bf16 ones for what a run leaves
/// unquantized (DeepSeek V4's bf16 `o_a_proj`).
fn run_quantized(format: &str, dir: &Path, prompt: &[u32], n: usize) -> (Value, String, Tensor) {
    run_quantized_with(&[("LLMARCH_KERNELS", "avx512")], format, dir, prompt, n)
}

/// [`run_quantized`] with environment `envs` (e.g. `LLMARCH_KERNELS=""`: what this CPU has).
fn run_quantized_with(
    envs: &[(&str, &str)],
    format: &str,
    dir: &Path,
    prompt: &[u32],
    n: usize,
) -> (Value, String, Tensor) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("logits.safetensors");
    let o = llmarch()
        .envs(envs.iter().copied())
        .args([
            "run",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &csv(prompt),
            "-n",
            &n.to_string(),
            "--temperature",
            "0",
            "--dtype",
            format,
            "--json",
            "--logits-out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}: {}", dir.display(), stderr(&o));
    let so = stdout(&o);
    let stats: Value = serde_json::from_str(so.lines().last().unwrap()).unwrap();
    (stats, stderr(&o), logits(&out, "logits"))
}

/// `‖a − b‖ / ‖b‖`.
fn rel_rms(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let n = b.sqr().unwrap().sum_all().unwrap();
    (d.to_scalar::<f32>().unwrap() as f64 / n.to_scalar::<f32>().unwrap() as f64).sqrt()
}

#[test]
fn quantized_runs_equal_the_reference_given_the_same_quantized_weights() {
    for (format, (name, r, src)) in FORMATS
        .iter()
        .flat_map(|&f| fixtures(f).into_iter().map(move |x| (f, x)))
    {
        let name = format!("{format}/{name}");
        let prompt = ids(&r["prompt_ids"]);
        let want_ids = ids(&r["generated_ids"]);
        let margins: Vec<f64> = r["top2_margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap())
            .collect();
        let want = logits(&root().join(&name).join("reference.safetensors"), "logits");
        let tol = tol(&family_of(&r));
        // A greedy decision counts when the reference's top-2 margin is above twice the bound.
        let clear_margin = 2.0 * tol as f64;

        // Prompt, then greedy decode one token at a time (the gemv path).
        let (stats, err, got) = run_quantized(format, &src, &prompt, want_ids.len());
        assert_eq!(stats["dtype"], format, "{name}");
        assert!(err.contains(&format!("{format} weights")), "{name}: {err}");
        let got_ids = ids(&stats["generated_ids"]);
        // Tokens must agree while the reference's top-2 margin is clear of llmarch's logit error.
        let clear = margins
            .iter()
            .position(|&m| m < clear_margin)
            .unwrap_or(margins.len());
        assert!(clear > 0, "{name}: no clear greedy decision to compare");
        assert_eq!(got_ids[..clear], want_ids[..clear], "{name}: greedy tokens");
        // One row per token fed: the prompt, then each generated token but the last.
        let rows = (prompt.len() + clear).min(got.dim(0).unwrap());
        let d = max_abs_diff(
            &got.narrow(0, 0, rows).unwrap(),
            &want.narrow(0, 0, rows).unwrap(),
        );
        assert!(d < tol, "{name}: decode logits differ by {d} (bound {tol})");

        // The whole sequence as one prompt (the several-row GEMM path).
        let seq: Vec<u32> = prompt.iter().chain(&want_ids).copied().collect();
        let (_, _, got) = run_quantized(format, &src, &seq, 1);
        let d = max_abs_diff(&got.narrow(0, 0, seq.len()).unwrap(), &want);
        assert!(
            d < tol,
            "{name}: prefill logits differ by {d} (bound {tol})"
        );
        eprintln!("{name}: {clear} tokens equal, logits within {d:.1e}");
    }
}

#[test]
fn quantized_differs_from_the_f32_reference_by_what_the_format_costs_the_reference() {
    // The largest cost the oracle may report for a format, so a broken oracle cannot pass.
    let bound = |format: &str| if format == "q8_0" { 0.3 } else { 1.5 };
    for (format, (name, r, src)) in FORMATS
        .iter()
        .flat_map(|&f| fixtures(f).into_iter().map(move |x| (f, x)))
    {
        let name = format!("{format}/{name}");
        assert_eq!(r["format"], format, "{name}");
        let seq = ids(&r["f32_sequence"]);
        let f32_ref = logits(&src.join("reference.safetensors"), "logits");
        assert_eq!(f32_ref.dim(0).unwrap(), seq.len(), "{name}");
        let (_, _, got) = run_quantized(format, &src, &seq, 1);
        let got = got.narrow(0, 0, seq.len()).unwrap();
        let ours = rel_rms(&got, &f32_ref);
        // What the reference itself moves by when given these quantized weights (measured per
        // fixture by the oracle): llmarch may add nothing visible to it.
        let theirs = r["quantized_vs_f32_rel_rms"].as_f64().unwrap();
        assert!(
            (ours - theirs).abs() < 1e-3 && ours < bound(format),
            "{name}: {format} is {ours:.4} (relative RMS) off the f32 reference; it costs the reference {theirs:.4}"
        );
        // Greedy choices agree wherever the f32 reference's top-2 margin exceeds twice the
        // largest logit change of that position.
        let mut checked = 0;
        for p in 0..seq.len() {
            let (a, b) = (got.get(p).unwrap(), f32_ref.get(p).unwrap());
            let mut top: Vec<f32> = b.to_vec1().unwrap();
            top.sort_by(|x, y| y.total_cmp(x));
            if top[0] - top[1] > 2.0 * max_abs_diff(&a, &b) {
                assert_eq!(argmax(&a), argmax(&b), "{name}: position {p}");
                checked += 1;
            }
        }
        eprintln!("{name}: relative RMS {ours:.4} (reference: {theirs:.4}); argmax equal at the {checked} clear positions");
    }
}

/// On a CPU with AVX2 (`vpdpbusd` where it has AVX512-VNNI) q8_0/q4_0 weights multiply as int8
/// products, prompt and decode, the activations quantized to q8 as llama.cpp does (the kernels
/// themselves equal an f64 product of the rounded activations: `src/kernels/gemm.rs`,
/// `gemv.rs`). What that rounding moves the
/// logits by (relative RMS against the same run with f32 products) is of the order of what q8_0
/// rounding of the weights costs the reference on the fixture's family: the activations get the
/// same 8-bit blocks. Random tiny models amplify any rounding unevenly, so the bound is 3× that
/// cost (measured 0.69-2.50×, q4_0/laguna-xs2-like the highest).
#[test]
fn int8_products_cost_what_q8_0_weights_cost_the_reference() {
    let int8 = std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c");
    if !int8 {
        eprintln!("no AVX2 on this machine: q8_0/q4_0 keep f32 products, nothing to test");
        return;
    }
    let q8_cost = |family: &str| -> f64 {
        let (_, r, _) = fixtures("q8_0")
            .into_iter()
            .find(|(_, r, _)| family_of(r) == family)
            .unwrap();
        r["quantized_vs_f32_rel_rms"].as_f64().unwrap()
    };
    let mut failures = vec![];
    for (format, (name, r, src)) in FORMATS
        .iter()
        .flat_map(|&f| fixtures(f).into_iter().map(move |x| (f, x)))
    {
        let name = format!("{format}/{name}");
        let seq = ids(&r["f32_sequence"]);
        let (_, _, f32_products) = run_quantized(format, &src, &seq, 1);
        let (_, _, int8_products) =
            run_quantized_with(&[("LLMARCH_KERNELS", "")], format, &src, &seq, 1);
        let moved = rel_rms(&int8_products, &f32_products);
        let bound = q8_cost(&family_of(&r));
        eprintln!("{name}: int8 products move the logits by {moved:.4} (relative RMS); q8_0 weights cost the reference {bound:.4}");
        if !(moved > 0.0 && moved < 3.0 * bound) {
            failures.push(format!("{name}: int8 products move the logits by {moved:.4}, over 3× what q8_0 weights cost the reference ({bound:.4})"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn quantized_formats_are_in_the_help_and_a_gpu_device_is_a_clear_error() {
    for cmd in ["run", "chat"] {
        let o = run(&[cmd, "--help"]);
        assert!(o.status.success());
        let help = stdout(&o);
        for format in FORMATS {
            assert!(help.contains(format), "{cmd} --help: {help}");
        }
    }
    let fixture = root().join("gemma4/e2b-like");
    for (format, device) in [("q8_0", "cuda"), ("q8_0", "metal"), ("q4_0", "cuda")] {
        let o = run(&[
            "run",
            fixture.to_str().unwrap(),
            "--prompt-ids",
            "2,3",
            "--dtype",
            format,
            "--device",
            device,
        ]);
        // A usage error: flags that cannot go together.
        let err = expect_error(&o, 2);
        assert!(
            err.contains(&format!("{format} runs on the CPU only")) && err.contains("hint:"),
            "{err}"
        );
    }
}

#[test]
fn chat_takes_q8_0_and_says_so() {
    use std::io::Write;
    let home = tempfile::tempdir().unwrap();
    let mut child = llmarch()
        .args(["chat", root().join("gemma4/e2b-like").to_str().unwrap()])
        .args(["--dtype", "q8_0", "-n", "4", "--temperature", "0"])
        .env("HOME", home.path())
        .env("XDG_DATA_HOME", home.path().join("data"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello there\n/stats\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(all.contains("q8_0 weights"), "{all}");
}

/// The quantized-weights cache, end to end: the first `--dtype q4_0` run quantizes and keeps the
/// blocks, the second reads every matrix back and computes exactly the same logits; a
/// truncated file is not trusted but rebuilt, with the same result; `LLMARCH_QUANT_CACHE=off`
/// keeps nothing.
#[test]
fn a_second_quantized_run_reads_the_kept_blocks_and_computes_the_same() {
    let (_, r, src) = fixtures("q4_0").remove(0);
    let prompt = ids(&r["prompt_ids"]);
    let cache = tempfile::tempdir().unwrap();
    let home = cache.path().to_str().unwrap();
    let run = |envs: &[(&str, &str)]| {
        let envs = [&[("XDG_CACHE_HOME", home)], envs].concat();
        let (stats, err, logits) = run_quantized_with(&envs, "q4_0", &src, &prompt, 3);
        let logits = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (stats["quant_cache"].clone(), err, logits)
    };
    let files = || -> Vec<PathBuf> {
        let dir = cache.path().join("llmarch/quantized");
        std::fs::read_dir(&dir).map_or(vec![], |d| {
            d.flat_map(|e| std::fs::read_dir(e.unwrap().path()).unwrap())
                .map(|e| e.unwrap().path())
                .collect()
        })
    };

    let (use1, err1, first) = run(&[]);
    assert_eq!(use1, "written", "{err1}");
    assert!(err1.contains("kept the quantized weights"), "{err1}");
    let kept = files();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].ends_with("q4_0.safetensors"), "{kept:?}");

    let (use2, err2, second) = run(&[]);
    assert_eq!(use2, "read", "{err2}");
    assert_eq!(first, second, "logits from the kept blocks");

    let bytes = std::fs::read(&kept[0]).unwrap();
    std::fs::write(&kept[0], &bytes[..bytes.len() / 2]).unwrap();
    let (use3, err3, third) = run(&[]);
    assert_eq!(use3, "written", "a truncated cache is rebuilt: {err3}");
    assert_eq!(first, third);
    assert_eq!(std::fs::read(&kept[0]).unwrap().len(), bytes.len());

    std::fs::remove_file(&kept[0]).unwrap();
    let (use4, err4, fourth) = run(&[("LLMARCH_QUANT_CACHE", "off")]);
    assert_eq!(use4, Value::Null, "{err4}");
    assert!(files().is_empty(), "{:?}", files());
    assert_eq!(first, fourth);
}
