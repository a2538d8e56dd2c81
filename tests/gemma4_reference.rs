//! The Gemma 4 network against the reference (transformers 5.23.0), on the tiny random
//! checkpoints under `tests/fixtures/gemma4/<variant>/` made by `tests/oracle/`.
//!
//! Each fixture holds `config.json`, the weights (`*.safetensors`, maybe sharded, maybe bf16,
//! maybe in the multimodal wrapper layout), `reference.json` (`prompt_ids`, `generated_ids`: the
//! reference's greedy continuation) and `reference.safetensors` (`logits` `[positions, vocab]` of
//! one full forward over prompt + continuation). For every variant:
//!
//! - (a) one forward over the whole sequence matches the reference logits at every position;
//! - (b) prefill the prompt, then decode token by token through the cache: the greedy tokens are
//!   the reference's and every step's logits match (prompt + continuation run past the sliding
//!   window, so the window ring and cross-layer sharing are exercised);
//! - (c) the bytes the cache holds then equal `kv-budget`'s figure for that context, per layer.
//!
//! Weights are loaded in f32 (the bf16 fixture too), within `logit_tol("gemma4")`; bf16 and bad
//! token ids for every family: tests/families.rs.
//! `LLMARCH_GEMMA4_FIXTURES` points the tests at another fixture folder.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::reference::{
    check_against_reference, check_bad_token_ids, long_prompt_chunked_vs_one_forward, max_abs_diff,
    Fixture,
};
use llmarch::arch::config::ParseOptions;
use llmarch::arch::gemma4::model::Gemma4Model;
use llmarch::arch::Attention;
use llmarch::arch::{CausalLm, FamilyModel};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture_dir(variant: &str) -> PathBuf {
    let root = std::env::var_os("LLMARCH_GEMMA4_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4"));
    root.join(variant)
}

fn load_fixture(variant: &str) -> Fixture {
    Fixture::load(fixture_dir(variant))
}

/// The text-model root: `model.language_model` in the multimodal wrapper, else `model`.
fn text_root(config: &serde_json::Value) -> &'static str {
    if config.get("text_config").is_some_and(|t| t.is_object()) {
        "model.language_model"
    } else {
        "model"
    }
}

fn build_from(vb: VarBuilder, config: &serde_json::Value) -> anyhow::Result<Gemma4Model> {
    let lm_head = vb
        .contains_tensor("lm_head.weight")
        .then(|| vb.pp("lm_head"));
    let root = vb.pp(text_root(config));
    Gemma4Model::from_config(config, &ParseOptions::default(), root, lm_head)
}

fn build(f: &Fixture, dtype: DType) -> Gemma4Model {
    // SAFETY: the fixture files are not modified while mapped.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&f.weights, dtype, &Device::Cpu) }.unwrap();
    build_from(vb, &f.config).unwrap_or_else(|e| panic!("{}: {e:#}", f.dir.display()))
}

/// Runs (a), (b), (c) for one variant; returns the largest logit error seen.
fn check_variant(variant: &str) -> f32 {
    let f = load_fixture(variant);
    let model = build(&f, DType::F32);
    let total = f.sequence().len();
    let smallest_window = model
        .spec()
        .layers
        .iter()
        .filter_map(|l| match l.attention {
            Attention::Sliding { window } => Some(window),
            _ => None,
        })
        .min();
    if let Some(w) = smallest_window {
        assert!(
            total > w,
            "{variant}: {total} tokens do not run past the sliding window of {w}"
        );
    }
    check_against_reference(variant, &model, &f).1
}

#[test]
fn e2b_like_matches_the_reference() {
    check_variant("e2b-like");
}

#[test]
fn e4b_like_matches_the_reference() {
    check_variant("e4b-like");
}

#[test]
fn moe_keqv_matches_the_reference() {
    check_variant("moe-keqv");
}

#[test]
fn dense_keqv_matches_the_reference() {
    check_variant("dense-keqv");
}

#[test]
fn wrapper_bf16_sharded_matches_the_reference() {
    check_variant("wrapper-bf16-sharded");
}

/// All of a fixture's weight tensors, by name, in f32.
fn tensors(f: &Fixture) -> HashMap<String, Tensor> {
    let mut all = HashMap::new();
    for p in &f.weights {
        for (k, t) in candle_core::safetensors::load(p, &Device::Cpu).unwrap() {
            all.insert(k, t.to_dtype(DType::F32).unwrap());
        }
    }
    all
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named_with_both_shapes() {
    let f = load_fixture("e2b-like");
    let mut all = tensors(&f);
    let root = text_root(&f.config);
    let name = format!("{root}.layers.0.self_attn.q_proj.weight");
    let dims = all[&name].dims().to_vec();
    all.insert(
        name.clone(),
        Tensor::zeros((dims[0] + 1, dims[1]), DType::F32, &Device::Cpu).unwrap(),
    );
    let vb = VarBuilder::from_tensors(all, DType::F32, &Device::Cpu);
    let err = format!("{:#}", build_from(vb, &f.config).unwrap_err());
    assert!(err.contains(&name), "{err}");
    assert!(
        err.contains(&format!("{:?}", [dims[0] + 1, dims[1]])),
        "{err}"
    );
    assert!(err.contains(&format!("{dims:?}")), "{err}");
}

#[test]
fn a_missing_tensor_is_named() {
    let f = load_fixture("e2b-like");
    let mut all = tensors(&f);
    let name = format!("{}.layers.1.layer_scalar", text_root(&f.config));
    assert!(all.remove(&name).is_some());
    let vb = VarBuilder::from_tensors(all, DType::F32, &Device::Cpu);
    let err = format!("{:#}", build_from(vb, &f.config).unwrap_err());
    assert!(err.contains(&name) && err.contains("missing"), "{err}");
}

/// Some checkpoints carry k/v projections and norms on KV-shared layers: they are not read, so
/// neither their presence nor their shape matters.
#[test]
fn kv_projections_on_shared_layers_are_ignored() {
    let f = load_fixture("e2b-like");
    let mut all = tensors(&f);
    let root = text_root(&f.config);
    let base = build_from(
        VarBuilder::from_tensors(all.clone(), DType::F32, &Device::Cpu),
        &f.config,
    )
    .unwrap();
    let shared: Vec<usize> = base
        .spec()
        .layers
        .iter()
        .filter(|l| l.kv_source.is_some())
        .map(|l| l.index)
        .collect();
    assert!(!shared.is_empty(), "the e2b-like fixture shares KV");
    for i in &shared {
        for name in ["k_proj.weight", "v_proj.weight", "k_norm.weight"] {
            all.insert(
                format!("{root}.layers.{i}.self_attn.{name}"),
                Tensor::ones((3, 5), DType::F32, &Device::Cpu).unwrap(),
            );
        }
    }
    let extra = build_from(
        VarBuilder::from_tensors(all, DType::F32, &Device::Cpu),
        &f.config,
    )
    .unwrap();
    let ids: Vec<u32> = f.prompt.clone();
    let a = base.forward(&ids, &mut base.new_cache()).unwrap();
    let b = extra.forward(&ids, &mut extra.new_cache()).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn bad_token_ids_are_refused() {
    let f = load_fixture("e2b-like");
    let model = build(&f, DType::F32);
    check_bad_token_ids(&model);
}

/// A prompt past one prefill chunk, fed in chunks as `run` and `chat` feed it, equals one forward
/// over it (sliding windows, KV sharing and K=V crossing the chunk boundary).
#[test]
fn long_prompt_prefill_in_chunks_equals_one_forward() {
    for v in ["e2b-like", "moe-keqv"] {
        let d = long_prompt_chunked_vs_one_forward(&build(&load_fixture(v), DType::F32), 1100);
        assert!(d < 1e-3, "{v}: chunked prefill vs one forward: {d}");
    }
}
