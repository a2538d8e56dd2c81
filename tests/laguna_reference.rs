//! The Laguna network against the reference (transformers 5.23.0), on the tiny random checkpoints
//! under `tests/fixtures/laguna/<variant>/` made by `tests/oracle/laguna_fixtures.py`.
//!
//! Each fixture holds `config.json`, `model.safetensors` (the Hub layout `save_pretrained` writes:
//! one MLP per expert, `shared_expert`, the bias under the experts), `reference.json`
//! (`prompt_ids`, `generated_ids`: the reference's greedy continuation) and
//! `reference.safetensors` (`logits` `[positions, vocab]` of one full forward over prompt +
//! continuation). For every variant:
//!
//! - (a) one forward over the whole sequence matches the reference logits at every position;
//! - (b) prefill the prompt, then decode token by token through the cache: the greedy tokens are
//!   the reference's and every step's logits match (33 tokens run past the window of 8);
//! - (c) the bytes the cache holds then equal `kv-budget`'s figure for that context, per layer.
//!
//! Also: the RoPE frequencies of every `rope_type` and form against the reference's
//! `LagunaRotaryEmbedding` (`rope_reference.json`), the packed in-memory layout loading to the same
//! network, errors naming bad tensors and configs. Weights are loaded in f32, within `logit_tol("laguna")`.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::reference::{
    check_against_reference, check_bad_token_ids, long_prompt_chunked_vs_one_forward, max_abs_diff,
    read_json, Fixture,
};
use llmarch::arch::config::{ParseOptions, TextConfig};
use llmarch::arch::laguna::model::LagunaModel;
use llmarch::arch::laguna::runtime_config;
use llmarch::arch::Attention;
use llmarch::arch::{CausalLm, FamilyModel};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const VARIANTS: [&str; 3] = ["xs2-like", "default-rope", "yarn-llama3"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/laguna")
}

fn load_fixture(variant: &str) -> Fixture {
    Fixture::load(root().join(variant))
}

fn build_from(vb: VarBuilder, config: &Value) -> anyhow::Result<LagunaModel> {
    let lm_head = vb
        .contains_tensor("lm_head.weight")
        .then(|| vb.pp("lm_head"));
    LagunaModel::from_config(config, &ParseOptions::default(), vb.pp("model"), lm_head)
}

fn build(f: &Fixture, dtype: DType) -> LagunaModel {
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
    let window = model
        .spec()
        .layers
        .iter()
        .filter_map(|l| match l.attention {
            Attention::Sliding { window } => Some(window),
            _ => None,
        })
        .min()
        .expect("every Laguna fixture has sliding layers");
    assert!(
        total > 2 * window,
        "{variant}: {total} tokens, window {window}"
    );
    check_against_reference(variant, &model, &f).1
}

#[test]
fn xs2_like_matches_the_reference() {
    check_variant("xs2-like");
}

#[test]
fn default_rope_matches_the_reference() {
    check_variant("default-rope");
}

#[test]
fn yarn_llama3_matches_the_reference() {
    check_variant("yarn-llama3");
}

/// The fixtures cover what they claim (so a regenerated fixture cannot silently drop a case).
#[test]
fn fixtures_cover_the_variants() {
    let cfg = |v: &str| load_fixture(v).config;
    let (a, b, c) = (cfg("xs2-like"), cfg("default-rope"), cfg("yarn-llama3"));
    assert_eq!(a["rope_parameters"]["full_attention"]["rope_type"], "yarn");
    assert_eq!(a["gating"], "per-head");
    assert!(b.get("rope_parameters").is_none());
    assert_eq!(b["gating"], "per-element");
    assert!(b["moe_router_logit_softcapping"].as_f64().unwrap() > 0.0);
    assert_eq!(c["gating"], true);
    assert_eq!(c["rope_parameters"]["truncate"], false);
    assert_eq!(
        c["rope_parameters"]["sliding_attention"]["rope_type"],
        "llama3"
    );
    for v in [&a, &c] {
        assert_ne!(v["moe_routed_scaling_factor"].as_f64(), Some(1.0));
    }
    let names = |v: &str| -> Vec<String> {
        let f = load_fixture(v);
        candle_core::safetensors::load(&f.weights[0], &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect()
    };
    let has_bias = |v: &str| {
        names(v)
            .iter()
            .any(|n| n.ends_with("e_score_correction_bias"))
    };
    assert!(has_bias("xs2-like") && has_bias("default-rope") && !has_bias("yarn-llama3"));
    for v in VARIANTS {
        let heads = load_fixture(v).config["num_attention_heads_per_layer"].clone();
        let heads: Vec<u64> = heads
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_u64().unwrap())
            .collect();
        assert!(heads.iter().any(|&h| h != heads[0]), "{v}: {heads:?}");
    }
}

/// Each layer type's frequencies and attention scaling equal what `LagunaRotaryEmbedding`
/// computes, for every `rope_type` and form the config accepts.
#[test]
fn rope_frequencies_match_the_reference() {
    let doc = read_json(&root().join("rope_reference.json"));
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let mut kinds = std::collections::BTreeSet::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let text = TextConfig::from_raw(&case["config"], &ParseOptions::default()).unwrap();
        let cfg = runtime_config(&text).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        for (ty, ours) in [
            ("full_attention", &cfg.rope_full),
            ("sliding_attention", &cfg.rope_sliding),
        ] {
            let Some(want) = case.get(ty) else {
                assert!(
                    ours.is_none(),
                    "{name}: {ty} has RoPE but no layer of that type"
                );
                continue;
            };
            let ours = ours
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: no {ty} RoPE"));
            kinds.insert(ours.kind);
            let inv: Vec<f64> = want["inv_freq"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(ours.inv_freq.len(), inv.len(), "{name} {ty}");
            for (i, (a, b)) in ours.inv_freq.iter().zip(&inv).enumerate() {
                let rel = (*a as f64 - b).abs() / b.abs().max(1e-30);
                assert!(
                    rel < 1e-6 || (*a as f64 - b).abs() < 1e-12,
                    "{name} {ty}: inv_freq[{i}] {a} vs {b}"
                );
            }
            let s = want["attention_scaling"].as_f64().unwrap();
            assert!(
                (ours.attention_scaling - s).abs() < 1e-12,
                "{name} {ty}: attention scaling {} vs {s}",
                ours.attention_scaling
            );
        }
    }
    for k in llmarch::arch::RopeKind::ALL {
        assert!(kinds.contains(&k), "no case for rope_type `{k}`");
    }
}

/// The reference's own module layout (packed experts, bias under the router, `shared_experts`)
/// builds the same network as the Hub layout the fixtures use.
#[test]
fn packed_module_layout_loads_to_the_same_network() {
    let f = load_fixture("xs2-like");
    let spec = build(&f, DType::F32).spec().clone();
    let mut all: HashMap<String, Tensor> =
        candle_core::safetensors::load(&f.weights[0], &Device::Cpu).unwrap();
    let mut packed = 0;
    for l in &spec.layers {
        let llmarch::arch::Ffn::Moe { experts, .. } = l.ffn else {
            continue;
        };
        let pre = format!("model.layers.{}.mlp.", l.index);
        let take = |all: &mut HashMap<String, Tensor>, k: String| {
            all.remove(&k).unwrap_or_else(|| panic!("{k}"))
        };
        let (mut gu, mut down) = (vec![], vec![]);
        for e in 0..experts {
            let g = take(&mut all, format!("{pre}experts.{e}.gate_proj.weight"));
            let u = take(&mut all, format!("{pre}experts.{e}.up_proj.weight"));
            gu.push(Tensor::cat(&[g, u], 0).unwrap());
            down.push(take(&mut all, format!("{pre}experts.{e}.down_proj.weight")));
        }
        all.insert(
            format!("{pre}experts.gate_up_proj"),
            Tensor::stack(&gu, 0).unwrap(),
        );
        all.insert(
            format!("{pre}experts.down_proj"),
            Tensor::stack(&down, 0).unwrap(),
        );
        let b = take(&mut all, format!("{pre}experts.e_score_correction_bias"));
        all.insert(format!("{pre}gate.e_score_correction_bias"), b);
        for p in ["gate_proj", "up_proj", "down_proj"] {
            let t = take(&mut all, format!("{pre}shared_expert.{p}.weight"));
            all.insert(format!("{pre}shared_experts.{p}.weight"), t);
        }
        packed += 1;
    }
    assert!(packed > 0);
    let a = build(&f, DType::F32);
    let b = build_from(
        VarBuilder::from_tensors(all, DType::F32, &Device::Cpu),
        &f.config,
    )
    .unwrap();
    let x = a.forward(&f.prompt, &mut a.new_cache()).unwrap();
    let y = b.forward(&f.prompt, &mut b.new_cache()).unwrap();
    assert_eq!(max_abs_diff(&x, &y), 0.0);
}

fn tensors(f: &Fixture) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(&f.weights[0], &Device::Cpu).unwrap()
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named_with_both_shapes() {
    let f = load_fixture("xs2-like");
    for name in [
        "model.layers.1.self_attn.g_proj.weight",
        "model.layers.2.mlp.experts.3.up_proj.weight",
    ] {
        let mut all = tensors(&f);
        let dims = all[name].dims().to_vec();
        all.insert(
            name.to_string(),
            Tensor::zeros((dims[0] + 1, dims[1]), DType::F32, &Device::Cpu).unwrap(),
        );
        let vb = VarBuilder::from_tensors(all, DType::F32, &Device::Cpu);
        let err = format!("{:#}", build_from(vb, &f.config).unwrap_err());
        assert!(err.contains(name), "{err}");
        assert!(
            err.contains(&format!("{:?}", [dims[0] + 1, dims[1]])),
            "{err}"
        );
        assert!(err.contains(&format!("{dims:?}")), "{err}");
    }
}

#[test]
fn a_missing_tensor_is_named() {
    let f = load_fixture("xs2-like");
    for name in [
        "model.layers.3.self_attn.q_norm.weight",
        "model.layers.1.mlp.experts.2.down_proj.weight",
        "model.layers.1.mlp.gate.weight",
        "lm_head.weight",
    ] {
        let mut all = tensors(&f);
        assert!(all.remove(name).is_some(), "{name}");
        let vb = VarBuilder::from_tensors(all, DType::F32, &Device::Cpu);
        let err = format!("{:#}", build_from(vb, &f.config).unwrap_err());
        assert!(
            err.contains(name) || err.contains("lm_head.weight"),
            "{name}: {err}"
        );
    }
}

#[test]
fn bad_token_ids_are_refused() {
    let f = load_fixture("xs2-like");
    let model = build(&f, DType::F32);
    check_bad_token_ids(&model);
}

/// A per-layer head list of the wrong length is one clear error at build time and from `run`.
#[test]
fn head_list_of_the_wrong_length_is_a_clear_error() {
    let f = load_fixture("xs2-like");
    let mut config = f.config.clone();
    config["num_attention_heads_per_layer"]
        .as_array_mut()
        .unwrap()
        .pop();
    let vb = VarBuilder::from_tensors(tensors(&f), DType::F32, &Device::Cpu);
    let err = format!("{:#}", build_from(vb, &config).unwrap_err());
    assert!(
        err.contains("num_attention_heads_per_layer") && err.contains('3') && err.contains('4'),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&f.dir).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    let o = common::run(&[
        "run",
        dir.path().to_str().unwrap(),
        "--prompt-ids",
        "2,5,6",
        "-n",
        "2",
    ]);
    let err = common::expect_error(&o, 1);
    assert!(err.contains("num_attention_heads_per_layer"), "{err}");
}

/// Dynamic NTK and LongRoPE recompute their frequencies for the whole sequence past a position;
/// the model refuses to go there instead of silently differing from the reference.
#[test]
fn position_limited_rope_is_refused_past_its_limit() {
    let f = load_fixture("xs2-like");
    let mut config = f.config.clone();
    config["max_position_embeddings"] = serde_json::json!(16);
    config["rope_parameters"]["sliding_attention"] =
        serde_json::json!({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0});
    let vb = VarBuilder::from_tensors(tensors(&f), DType::F32, &Device::Cpu);
    let model = build_from(vb, &config).unwrap();
    let mut cache = model.new_cache();
    model.forward(&f.prompt, &mut cache).unwrap();
    model.forward(&[5, 6, 7], &mut cache).unwrap();
    let err = model.forward(&[5], &mut cache).unwrap_err().to_string();
    assert!(err.contains("dynamic") && err.contains("16"), "{err}");
}

/// A prompt past one prefill chunk, fed in chunks as `run` and `chat` feed it, equals one forward
/// over it (sliding and full layers crossing the chunk boundary).
#[test]
fn long_prompt_prefill_in_chunks_equals_one_forward() {
    let f = Fixture::load(root().join("xs2-like"));
    let d = long_prompt_chunked_vs_one_forward(&build(&f, DType::F32), 1100);
    assert!(d < 1e-3, "chunked prefill vs one forward: {d}");
}
