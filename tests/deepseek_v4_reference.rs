//! The DeepSeek V4 network against the reference (transformers 5.23.0), on the tiny random
//! checkpoints under `tests/fixtures/deepseek_v4/<variant>/` made by
//! `tests/oracle/deepseek_v4_fixtures.py` (sliding, CSA and HCA layers, hash and score-routed MoE
//! layers, `hc_mult` 4 and 2, both config forms, prompts past the window and several compression
//! boundaries, weights as `save_pretrained` names them, FP8/FP4 as DeepSeek ships them).
//!
//! Weights load through llmarch's own loader (the family's renaming, FP8/FP4 dequantization), in
//! f32. For every self-consistent variant the shared checks run: full forward and cached greedy
//! decoding within `logit_tol("deepseek_v4")` of the reference at every position, the same greedy tokens, and the
//! bytes the cache holds equal `kv-budget`'s figure layer by layer. Where the indexer drops
//! entries, llmarch's cached decoding equals its own forward over each prefix, and every
//! selection equals a brute-force top-k of the indexer's scores.

mod common;

use candle_core::{DType, Device, Tensor};
use common::reference::{
    check_against_reference, chunked_vs_one_forward, logit_tol, long_prompt_chunked_vs_one_forward,
    max_abs_diff, Fixture,
};
use llmarch::arch::budget::{self, KvDtype};
use llmarch::arch::config::ParseOptions;
use llmarch::arch::deepseek_v4::{checkpoint_name, model::DeepseekV4Model};
use llmarch::arch::Attention;
use llmarch::arch::{CausalLm, FamilyModel, Rows};
use llmarch::loader::quantized::fp8_block;
use llmarch::loader::weights::{LoadOptions, Weights};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepseek_v4")
}

fn load(dir: &Path, config: &serde_json::Value, dtype: DType) -> anyhow::Result<DeepseekV4Model> {
    let opts = LoadOptions {
        rename: Some(checkpoint_name),
        fp8_block: fp8_block(config)?,
        whole: false,
    };
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "safetensors")
                && p.file_name().is_some_and(|n| n != "reference.safetensors")
        })
        .collect();
    shards.sort();
    let w = Weights::open_with(&shards, None, dtype, &Device::Cpu, opts)?;
    let model = DeepseekV4Model::from_config(
        config,
        &ParseOptions::default(),
        w.text_vb(),
        w.lm_head_vb(),
    )?;
    let unused = w.unused();
    anyhow::ensure!(unused.is_empty(), "tensors never read: {unused:?}");
    Ok(model)
}

fn build(f: &Fixture) -> DeepseekV4Model {
    load(&f.dir, &f.config, DType::F32).unwrap_or_else(|e| panic!("{}: {e:#}", f.dir.display()))
}

fn check_variant(variant: &str) -> f32 {
    let f = Fixture::load(root().join(variant));
    let model = build(&f);
    let spec = model.spec();
    let total = f.sequence().len() as u64;
    // The run passes the window and closes several windows of every compressed layer.
    for l in &spec.layers {
        match l.attention {
            Attention::Sliding { window } => assert!(total > 2 * window as u64),
            Attention::Compressed { ratio, window, .. } => {
                assert!(
                    total > 2 * window as u64 && total / ratio as u64 >= 3,
                    "{variant}"
                )
            }
            ref other => panic!("{variant}: {other:?}"),
        }
    }
    check_against_reference(variant, &model, &f).1
}

#[test]
fn flash_like_matches_the_reference() {
    check_variant("flash-like");
}

#[test]
fn transformers_form_matches_the_reference() {
    check_variant("transformers-form");
}

#[test]
fn dequantized_twin_matches_the_reference() {
    check_variant("fp8-fp4-dequantized");
}

/// In bf16 the cache holds what `kv-budget` says for bf16: everything in bf16 but the
/// compressors' overlap gates, which stay f32 as in the reference.
#[test]
fn bf16_cache_bytes_equal_kv_budget() {
    let f = Fixture::load(root().join("flash-like"));
    let model = load(&f.dir, &f.config, DType::BF16).unwrap();
    let mut cache = model.new_cache();
    let seq = f.sequence();
    model.forward(&seq[..f.prompt.len()], &mut cache).unwrap();
    for &t in &seq[f.prompt.len()..] {
        model.forward(&[t], &mut cache).unwrap();
    }
    let want = budget::compute(model.spec(), seq.len() as u64, 1, KvDtype::Bf16).unwrap();
    for (i, (got, w)) in cache.bytes().iter().zip(&want.layers).enumerate() {
        assert_eq!(*got, w.bytes, "layer {i}");
    }
}

/// The FP8 block-scaled / FP4-packed checkpoint gives the logits of its dequantized twin.
#[test]
fn fp8_fp4_checkpoint_matches_its_dequantized_twin() {
    let f = Fixture::load(root().join("fp8-fp4"));
    let twin = Fixture::load(root().join("fp8-fp4-dequantized"));
    assert!(f.config.get("quantization_config").is_some());
    check_against_reference("fp8-fp4", &build(&f), &f);
    let a = build(&f)
        .forward(&f.sequence(), &mut build(&f).new_cache())
        .unwrap();
    let b = build(&twin)
        .forward(&twin.sequence(), &mut build(&twin).new_cache())
        .unwrap();
    let d = max_abs_diff(&a, &b);
    assert!(d < 1e-4, "quantized vs dequantized twin: {d}");
}

#[test]
fn indexer_drops_matches_the_reference() {
    check_variant("indexer-drops");
}

/// Index scores tie at the top-k boundary: the unpatched reference disagrees with itself there
/// (recorded in the fixture); llmarch equals the reference with the selection by definition.
#[test]
fn indexer_ties_match_the_reference_by_definition() {
    let f = Fixture::load(root().join("indexer-ties"));
    let zero_ties = f.reference["indexer"]["boundary_zero_ties"]
        .as_u64()
        .unwrap();
    let plain = f.reference["reference_without_definition"]["cached_vs_full_max_abs_diff"]
        .as_f64()
        .unwrap();
    assert!(zero_ties > 0 && plain > 1e-2, "the fixture must hold ties");
    check_variant("indexer-ties");
}

/// Where the indexer drops entries: every query's selection is the brute-force top-k of the
/// scores among the entries it may see, decoding picks what the full forward picks, and equals
/// the forward over each prefix.
#[test]
fn indexer_selection_is_the_top_k_and_prefill_equals_decode() {
    for variant in ["indexer-drops", "indexer-ties"] {
        check_selection(variant);
    }
}

fn check_selection(variant: &str) {
    let f = Fixture::load(root().join(variant));
    let model = build(&f);
    let seq = f.sequence();
    let top_k = model.runtime_config().index_topk;

    // One forward over everything, with the selections.
    let (full, trace) = model
        .forward_traced(&seq, &mut model.new_cache(), Rows::All)
        .unwrap();
    let mut dropped = 0;
    for (layer, sel) in &trace {
        let ratio = match model.spec().layers[*layer].attention {
            Attention::Compressed { ratio, .. } => ratio,
            ref other => panic!("layer {layer}: {other:?}"),
        };
        for (pos, (picks, scores)) in sel.picks.iter().zip(&sel.scores).enumerate() {
            let visible = (pos + 1) / ratio;
            // Brute force: every visible entry ranked by (score desc, index asc).
            let mut all: Vec<(f32, usize)> = (0..visible).map(|e| (scores[e], e)).collect();
            all.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
            let mut want: Vec<usize> = all.iter().take(top_k).map(|&(_, e)| e).collect();
            want.sort();
            assert_eq!(picks, &want, "{variant}: layer {layer}, position {pos}");
            dropped += visible.saturating_sub(top_k);
        }
    }
    assert!(
        dropped > 0,
        "the fixture must make the indexer drop entries"
    );

    // Decoding token by token equals the full forward (and each prefix forward).
    let mut cache = model.new_cache();
    let mut rows = vec![];
    for (t, &tok) in seq.iter().enumerate() {
        let (row, steps) = model.forward_traced(&[tok], &mut cache, Rows::All).unwrap();
        for ((layer, step), (_, whole)) in steps.iter().zip(&trace) {
            assert_eq!(
                step.picks[0], whole.picks[t],
                "{variant}: layer {layer}, position {t}"
            );
        }
        rows.push(row);
    }
    let stepped = Tensor::cat(&rows, 0).unwrap();
    let d = max_abs_diff(&stepped, &full);
    assert!(d < 1e-4, "{variant}: decode vs full forward: {d}");
    for p in [f.prompt.len(), seq.len() - 3] {
        let prefix = model.forward(&seq[..p], &mut model.new_cache()).unwrap();
        let d = max_abs_diff(&prefix, &full.narrow(0, 0, p).unwrap());
        assert!(d < 1e-4, "{variant}: prefix {p} vs full forward: {d}");
    }
}

/// A quantized weight without its scales is refused, naming the tensor.
#[test]
fn missing_scales_are_an_error() {
    let src = root().join("fp8-fp4");
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    let victim = names
        .iter()
        .filter(|k| {
            k.ends_with("_scale_inv")
                || k.strip_suffix(".scale")
                    .is_some_and(|b| names.iter().any(|n| **n == format!("{b}.weight")))
        })
        .min()
        .expect("the fixture has scales")
        .to_string();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| *n != victim)
        .collect();
    safetensors::serialize_to_file(kept, None, &dir.path().join("model.safetensors")).unwrap();
    let config = common::reference::read_json(&src.join("config.json"));
    let e = format!("{:#}", load(dir.path(), &config, DType::F32).unwrap_err());
    let base = victim
        .strip_suffix(".weight_scale_inv")
        .or_else(|| victim.strip_suffix(".scale"))
        .unwrap();
    let weight = checkpoint_name(&format!("{base}.weight"));
    assert!(
        e.contains(&weight) && e.contains("scales") && e.contains("missing"),
        "{e}"
    );
}

/// The layout of the Hub repositories: DeepSeek's own names without the `model.` prefix,
/// `.scale` beside FP8/FP4 weights, several shards and an index naming them the same way.
#[test]
fn hub_layout_sharded_checkpoint_loads() {
    let f = Fixture::load(root().join("fp8-fp4"));
    let bytes = std::fs::read(f.dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // save_pretrained's names → the Hub's.
    let hub = |n: &str| -> String {
        let n = n.strip_prefix("model.").unwrap_or(n);
        match n {
            "embed_tokens.weight" => "embed.weight".into(),
            "hc_head.hc_fn" => "hc_head_fn".into(),
            "hc_head.hc_base" => "hc_head_base".into(),
            "hc_head.hc_scale" => "hc_head_scale".into(),
            other => other.replace(".weight_scale_inv", ".scale"),
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let mut shards: [Vec<(String, safetensors::tensor::TensorView)>; 2] = [vec![], vec![]];
    let mut weight_map = serde_json::Map::new();
    let mut names = st.names();
    names.sort();
    for (i, name) in names.into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert(hub(name), file.into());
        shards[i % 2].push((hub(name), st.tensor(name).unwrap()));
    }
    assert!(weight_map.contains_key("embed.weight") && weight_map.contains_key("head.weight"));
    let mut paths = vec![];
    for (i, tensors) in shards.into_iter().enumerate() {
        let p = dir
            .path()
            .join(format!("model-0000{}-of-00002.safetensors", i + 1));
        safetensors::serialize_to_file(tensors, None, &p).unwrap();
        paths.push(p);
    }
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(
        &index,
        serde_json::json!({ "weight_map": weight_map }).to_string(),
    )
    .unwrap();
    let opts = LoadOptions {
        rename: Some(checkpoint_name),
        fp8_block: fp8_block(&f.config).unwrap(),
        whole: false,
    };
    let w = Weights::open_with(&paths, Some(&index), DType::F32, &Device::Cpu, opts).unwrap();
    let model = DeepseekV4Model::from_config(
        &f.config,
        &ParseOptions::default(),
        w.text_vb(),
        w.lm_head_vb(),
    )
    .unwrap();
    assert!(w.unused().is_empty(), "{:?}", w.unused());
    let logits = model
        .forward(&f.sequence(), &mut model.new_cache())
        .unwrap();
    let d = max_abs_diff(&logits, &f.logits);
    assert!(d < logit_tol("deepseek_v4"), "Hub layout vs reference: {d}");
}

/// Feeding the sequence in uneven chunks (as `chat` does turn by turn) gives the logits of one
/// forward: the compressors' carried windows and overlap state pick up where they left off.
#[test]
fn chunked_prefill_equals_one_forward() {
    for variant in ["flash-like", "indexer-ties", "transformers-form"] {
        let f = Fixture::load(root().join(variant));
        let d = chunked_vs_one_forward(&build(&f), &f.sequence());
        assert!(d < 1e-4, "{variant}: chunked vs one forward: {d}");
    }
}

/// A prompt longer than the blocks attention and the indexer score queries in: one forward
/// equals feeding the tokens one by one, selections included.
#[test]
fn long_prompt_in_query_blocks_equals_decode() {
    let f = Fixture::load(root().join("indexer-ties"));
    let model = build(&f);
    let seq: Vec<u32> = (0..300u32).map(|i| (i * 7919 + 13) % 512).collect();
    let (full, trace) = model
        .forward_traced(&seq, &mut model.new_cache(), Rows::All)
        .unwrap();
    let mut cache = model.new_cache();
    let mut rows = vec![];
    for (t, &tok) in seq.iter().enumerate() {
        let (row, steps) = model.forward_traced(&[tok], &mut cache, Rows::All).unwrap();
        for ((layer, step), (_, whole)) in steps.iter().zip(&trace) {
            assert_eq!(step.picks[0], whole.picks[t], "layer {layer}, position {t}");
        }
        rows.push(row);
    }
    let d = max_abs_diff(&Tensor::cat(&rows, 0).unwrap(), &full);
    assert!(d < 1e-3, "one forward vs decode over 300 tokens: {d}");
}

/// A prompt past one prefill chunk, fed in chunks as `run` and `chat` feed it, equals one forward
/// over it (compressor windows, indexer selections and the sliding window crossing the chunk
/// boundary). `transformers-form` is left out: at 1100 tokens one of its indexer selections is a
/// near-tie (two entries 1e-6 apart at position 771 of layer 3) that summation order decides.
#[test]
fn long_prompt_prefill_in_chunks_equals_one_forward() {
    for v in ["flash-like", "indexer-drops"] {
        let f = Fixture::load(root().join(v));
        let d = long_prompt_chunked_vs_one_forward(&build(&f), 1100);
        assert!(d < 1e-3, "{v}: chunked prefill vs one forward: {d}");
    }
}
