//! `kv-budget --fit` through the binary: every alias on 8 × H200 against arithmetic written out
//! here from the config values (weights ÷ TP, KV per TP rank with heads split or replicated,
//! Gemma 4 31B's K=V full layers, DeepSeek V4's compressed layers), the largest batch, pipeline
//! stages across nodes, and the errors: zero GPUs, unknown GPUs, splits a model cannot take,
//! figures too large to count.

mod common;
use common::*;
use serde_json::Value;

/// 32K tokens: a whole number of vLLM's 16-token pages and of DeepSeek V4's compression
/// windows (4 and 128), so the exact cache has no open window.
const C: u64 = 32_768;
const BF16: u64 = 2;
const F32: u64 = 4;
/// H200 as nvidia-smi reports it: 143,771 MiB.
const H200: u64 = 143_771 << 20;

const ALIASES: [&str; 10] = [
    "gemma4-e2b",
    "gemma4-e4b",
    "gemma4-26b-a4b",
    "gemma4-31b",
    "laguna-xs.2",
    "zaya1-8b",
    "deepseek-v4-flash",
    "deepseek-v4-pro",
    "qwen3.6-27b",
    "qwen3.6-35b-a3b",
];

fn fit(args: &[&str]) -> Vec<Value> {
    let mut all = vec!["kv-budget", "--fit", "--json"];
    all.extend_from_slice(args);
    run_json(&all).as_array().unwrap().clone()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a u64: {v}"))
}

/// The parameter count the tests divide (equal to the reference's, `tests/reference.rs`).
fn params(alias: &str) -> u64 {
    u(&run_json(&["inspect", alias, "--json"])["params"]["total"])
}

/// Per TP rank at 32K tokens, bf16, TP 8 (every alias takes TP 8: its query heads, 8 to 128,
/// are multiples of 8). A layer with kv ≥ 8 KV heads holds kv/8 of them; with fewer, one.
fn kv_per_rank(alias: &str) -> u64 {
    match alias {
        // 15 own caches (layers 15-34 read 13 and 14), 1 KV head → one per rank, whole.
        // 12 sliding: 256 d × (K, V) × min(C, 512); 3 full: 512 d × (K, V) × C.
        "gemma4-e2b" => 12 * 256 * 2 * 512 * BF16 + 3 * 512 * 2 * C * BF16,
        // 24 own caches, 2 KV heads → one per rank: 20 sliding, 4 full.
        "gemma4-e4b" => 20 * 256 * 2 * 512 * BF16 + 4 * 512 * 2 * C * BF16,
        // 25 sliding (window 1024, 8 KV heads → 1 per rank), 5 full K=V (2 heads → 1, one
        // tensor of 512 d).
        "gemma4-26b-a4b" => 25 * 256 * 2 * 1024 * BF16 + 5 * 512 * C * BF16,
        // 50 sliding (16 KV heads → 2 per rank), 10 full K=V (4 heads → 1 per rank, replicated).
        "gemma4-31b" => 50 * 2 * 256 * 2 * 1024 * BF16 + 10 * 512 * C * BF16,
        // 10 full + 30 sliding 512, 8 KV heads of 128 d → 1 per rank.
        "laguna-xs.2" => 10 * 128 * 2 * C * BF16 + 30 * 128 * 2 * 512 * BF16,
        // 40 CCA layers, 2 KV heads → half each: latent K and V 256 per token, conv state
        // 1280 × 2, delayed V 128.
        "zaya1-8b" => 40 * (2 * 256 * C * BF16 + 1280 * 2 * BF16 + 128 * BF16) / 2,
        // 1 KV head: the whole cache on every rank (see `deepseek_layers`).
        "deepseek-v4-flash" => 2 * SLIDING + 21 * CSA + 20 * HCA,
        "deepseek-v4-pro" => 30 * CSA + 31 * HCA,
        // 16 full (4 KV heads → 1 of 256 d per rank); 48 DeltaNet layers split 8 ways: conv
        // state 10240 × 3 in bf16, recurrent state 48 × 128 × 128 in f32.
        "qwen3.6-27b" => 16 * 256 * 2 * C * BF16 + 48 * (10240 * 3 * BF16 + 786_432 * F32) / 8,
        "qwen3.6-35b-a3b" => 10 * 256 * 2 * C * BF16 + 30 * (8192 * 3 * BF16 + 524_288 * F32) / 8,
        other => panic!("no arithmetic for {other}"),
    }
}

// DeepSeek V4's layers at 32K tokens (K=V of 512 d, one KV head, window 128):
/// Sliding: the window's 128 rows.
const SLIDING: u64 = 512 * 128 * BF16;
/// CSA 4:1: window + C/4 compressed entries + C/4 indexer keys of 128 d + the last closed
/// block (4 entries) of the compressor (512 kv, 512 f32 gate) and indexer (128 kv, 128 f32
/// gate); no open window at C.
const CSA: u64 = SLIDING
    + 512 * (C / 4) * BF16
    + 128 * (C / 4) * BF16
    + 4 * (512 * BF16 + 512 * F32)
    + 4 * (128 * BF16 + 128 * F32);
/// HCA 128:1: window + C/128 compressed entries.
const HCA: u64 = SLIDING + 512 * (C / 128) * BF16;
/// What an engine reserves on top for the open windows at their largest: CSA carries of 2048
/// (compressor) and 512 (indexer) × 3 tokens, HCA's of 1024 × 127.
const CSA_OPEN: u64 = 3 * (2048 + 512) * BF16;
const HCA_OPEN: u64 = 127 * 1024 * BF16;

#[test]
fn every_alias_on_8_h200_matches_the_arithmetic() {
    let usable = H200 * 9 / 10; // gpu_memory_utilization 0.9, rounded down
    let headroom = 2u64 << 30;
    let ctx = C.to_string();
    for alias in ALIASES {
        let rows = fit(&[
            alias,
            "--gpu",
            "h200:8",
            "--context",
            &ctx,
            "--weights",
            "bf16",
        ]);
        let r = &rows[0];
        let g = &r["per_gpu"];
        assert_eq!(r["split"]["tp"], 8, "{alias}");
        assert_eq!(r["split"]["pp"], 1, "{alias}");
        assert_eq!(u(&g["memory"]), H200, "{alias}");
        assert_eq!(u(&g["usable"]), usable, "{alias}");
        // bf16: 2 bytes a parameter, an eighth on each rank.
        let weights = (params(alias) * BF16).div_ceil(8);
        assert_eq!(u(&g["weights"]), weights, "{alias}");
        assert_eq!(u(&g["kv_exact"]), kv_per_rank(alias), "{alias}");
        let open = match alias {
            "deepseek-v4-flash" => 21 * CSA_OPEN + 20 * HCA_OPEN,
            "deepseek-v4-pro" => 30 * CSA_OPEN + 31 * HCA_OPEN,
            _ => 0,
        };
        assert_eq!(u(&g["kv"]), kv_per_rank(alias) + open, "{alias}");
        let free = usable as i64 - (weights + kv_per_rank(alias) + open + headroom) as i64;
        assert_eq!(g["free"].as_i64().unwrap(), free, "{alias}");
        assert_eq!(r["fits"], free >= 0, "{alias}");
        assert!(
            !r["assumptions"].as_array().unwrap().is_empty(),
            "{alias}: no assumptions stated"
        );
    }
}

#[test]
fn the_largest_batch_is_the_one_before_memory_runs_out() {
    // Dense attention without fixed states: KV grows linearly with the batch, so the largest
    // batch is ⌊(usable − weights − headroom) / KV of one sequence⌋.
    let r = &fit(&[
        "gemma4-31b",
        "--gpu",
        "h200:8",
        "--context",
        "32k",
        "--weights",
        "bf16",
    ])[0];
    let g = &r["per_gpu"];
    let room = u(&g["usable"]) - u(&g["weights"]) - u(&g["headroom"]);
    assert_eq!(u(&r["max_batch"]), room / kv_per_rank("gemma4-31b"));
    // The whole 256K context fits at batch 1.
    assert_eq!(u(&r["max_context"]), 262_144);
    // vLLM before v0.21 (every layer global and unshared): K and V at full length for every
    // layer, per rank: 50 × 2 heads × 256 d and 10 × 1 head × 512 d, each × 2 × C.
    let blind = (50 * 2 * 256 * 2 + 10 * 512 * 2) * C * BF16;
    assert_eq!(u(&g["kv_blind"]), blind);
    let notes = r["accounting_notes"].to_string();
    assert!(notes.contains("vLLM before v0.21"), "{notes}");
}

#[test]
fn deepseek_v4_as_shipped_and_the_pro_across_nodes() {
    // Flash as shipped: FP4 routed experts (17/32 byte: e2m1 + a 1-byte scale per 32), FP8
    // for the rest, the embedding and untied head in bf16.
    let p = run_json(&["inspect", "deepseek-v4-flash", "--json"])["params"].clone();
    let (total, emb, head, experts) = (
        u(&p["total"]),
        u(&p["embedding"]),
        u(&p["lm_head"]),
        u(&p["routed_experts"]),
    );
    let shipped = (experts * 17).div_ceil(32) + (total - emb - head - experts) + (emb + head) * 2;
    let r = &fit(&["deepseek-v4-flash", "--gpu", "h200:8", "--context", "1m"])[0];
    assert_eq!(u(&r["weights"]["total_bytes"]), shipped);
    assert_eq!(u(&r["per_gpu"]["weights"]), shipped.div_ceil(8));
    assert_eq!(r["split"]["ep"], 8);
    assert_eq!(r["split"]["experts_per_gpu"], 256 / 8);
    assert_eq!(r["fits"], true);
    assert_eq!(u(&r["max_context"]), 1 << 20);
    // The single KV head is on every rank: the exact per-rank cache is kv-budget's total.
    let kv = run_json(&[
        "kv-budget",
        "deepseek-v4-flash",
        "--context",
        "1m",
        "--json",
    ]);
    assert_eq!(r["per_gpu"]["kv_exact"], kv[0]["total_bytes"]);
    assert_eq!(u(&r["split"]["replicated_kv_layers"]), 43);

    // Pro (about 850 GB as shipped) does not fit one node of 8 H100s; on two it takes TP 8 ×
    // PP 2, its 61 layers cut 31 + 30.
    let one = &fit(&["deepseek-v4-pro", "--gpu", "h100:8", "--context", "128k"])[0];
    assert_eq!(one["fits"], false);
    assert_eq!(one["max_context"], 0);
    assert_eq!(one["max_batch"], 0);
    let two = &fit(&["deepseek-v4-pro", "--gpu", "h100:8x2", "--context", "128k"])[0];
    assert_eq!((u(&two["split"]["tp"]), u(&two["split"]["pp"])), (8, 2));
    assert_eq!(
        two["split"]["stages"],
        serde_json::json!([[0, 31], [31, 61]])
    );
    assert_eq!(two["fits"], true);
    // The first stage: 31 of 61 layers' body plus the embedding, an eighth each.
    let p = run_json(&["inspect", "deepseek-v4-pro", "--json"])["params"].clone();
    let (total, emb, head, experts) = (
        u(&p["total"]),
        u(&p["embedding"]),
        u(&p["lm_head"]),
        u(&p["routed_experts"]),
    );
    let body = (experts * 17).div_ceil(32) + (total - emb - head - experts);
    let first = ((body * 31).div_ceil(61) + emb * 2).div_ceil(8);
    let last = ((body * 30).div_ceil(61) + head * 2).div_ceil(8);
    let tight = u(&two["tightest_stage"]);
    let want = if tight == 0 { first } else { last };
    assert_eq!(u(&two["per_gpu"]["weights"]), want);
    assert!(first >= last, "the first stage has one layer more");
}

#[test]
fn sglang_takes_its_static_fraction_and_no_pages() {
    let r = &fit(&[
        "qwen3.6-35b-a3b",
        "--gpu",
        "96GiB:2",
        "--engine",
        "sglang",
        "--context",
        "1000",
        "--weights",
        "bf16",
    ])[0];
    let g = &r["per_gpu"];
    assert_eq!(u(&g["usable"]), (96u64 << 30) * 85 / 100);
    // 1000 tokens, no page rounding: 10 full layers, 2 KV heads over TP 2 → 1 each.
    let kv = 10 * 256 * 2 * 1000 * BF16 + 30 * (8192 * 3 * BF16 + 524_288 * F32) / 2;
    assert_eq!(u(&g["kv"]), kv);
    // The headroom is not taken out of SGLang's static fraction.
    assert_eq!(
        g["free"].as_i64().unwrap(),
        (u(&g["usable"]) - u(&g["weights"]) - kv) as i64
    );
}

#[test]
fn text_view_states_its_assumptions() {
    let o = run(&[
        "kv-budget",
        "gemma4-31b",
        "--fit",
        "--gpu",
        "a100-80g:4x2",
        "--context",
        "256k",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for want in [
        "Fit on 8 × a100-80g",
        "TP 4 × PP 2",
        "gpu_memory_utilization = 0.90",
        "KV pages of 16 tokens",
        "replicated one per rank",
        "vLLM before v0.21",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
}

#[test]
fn bad_gpus_and_impossible_splits_are_clear_errors() {
    let cases: [(&[&str], &str); 7] = [
        (&["gemma4-e2b", "--gpu", "h200:0"], "must be at least 1"),
        (&["gemma4-e2b", "--gpu", "h300:8"], "known GPUs: h100"),
        (&["gemma4-e2b", "--gpu", "80:8"], "a size with a unit"),
        // Gemma 4 E2B has 8 query heads: TP 16 cannot split them.
        (
            &["gemma4-e2b", "--gpu", "h100:16", "--tp", "16"],
            "tensor parallel 16 does not divide layer 0's 8 query heads",
        ),
        // Qwen3.6's DeltaNet layers have 16 key heads, which the engines never replicate.
        (
            &["qwen3.6-35b-a3b", "--gpu", "h100:32", "--tp", "32"],
            "does not divide layer 0's 16 DeltaNet key heads",
        ),
        (
            &["gemma4-31b", "--gpu", "h100:8", "--tp", "3"],
            "does not use the 8 GPUs",
        ),
        (
            &["gemma4-31b", "--gpu", "h100:4x2", "--tp", "8"],
            "more than the 4 GPUs of one node",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["kv-budget", "--fit"];
        all.extend_from_slice(args);
        let err = expect_error(&run(&all), 2);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // --fit without --gpu, and --gpu without --fit: usage errors.
    expect_error(&run(&["kv-budget", "gemma4-e2b", "--fit"]), 2);
    expect_error(&run(&["kv-budget", "gemma4-e2b", "--gpu", "h100"]), 2);
    // A model no split of the GPUs suits: 1 GPU per node over 64 nodes is 64 stages of 35 layers.
    let err = expect_error(
        &run(&["kv-budget", "gemma4-e2b", "--fit", "--gpu", "h100:1x64"]),
        1,
    );
    assert!(err.contains("more stages than its 35 layers"), "{err}");
}

#[test]
fn figures_too_large_to_count_are_errors() {
    let o = run(&[
        "kv-budget",
        "gemma4-31b",
        "--fit",
        "--gpu",
        "h200:8",
        "--context",
        "1048576m",
        "--batch",
        "1048576",
    ]);
    let err = expect_error(&o, 1);
    assert!(err.contains("beyond what llmarch counts"), "{err}");
}
