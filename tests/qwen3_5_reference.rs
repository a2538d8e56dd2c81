//! The Qwen3.5 / Qwen3.6 network against the reference (transformers 5.23.0), on the tiny random
//! checkpoints under `tests/fixtures/qwen3_5/<variant>/` made by
//! `tests/oracle/qwen3_5_fixtures.py`: the dense text model, the MoE text model, and the
//! multimodal wrapper as the Hub ships it (bf16, sharded, vision tower skipped).
//!
//! Weights load through llmarch's own loader, in f32. For every variant: full forward and cached
//! greedy decoding within `logit_tol("qwen3_5")` of the reference at every position, the same greedy tokens, and
//! the bytes the cache holds (conv and recurrent states, K and V of the full layers) equal
//! `kv-budget`'s figure layer by layer. The reference runs prefill through its chunked gated
//! delta rule and decode through the recurrent one; llmarch runs the recurrent rule for both.

mod common;

use candle_core::{DType, Device};
use common::reference::{
    check_against_reference, chunked_vs_one_forward, long_prompt_chunked_vs_one_forward,
    max_abs_diff, Fixture,
};
use llmarch::arch::config::ParseOptions;
use llmarch::arch::qwen3_5::model::Qwen3_5Model;
use llmarch::arch::Attention;
use llmarch::arch::{CausalLm, FamilyModel};
use llmarch::loader::model_files::{resolve, ResolveOptions};
use llmarch::loader::{weights, ModelRef};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3_5")
}

fn build(f: &Fixture) -> Qwen3_5Model {
    let files = resolve(&ModelRef::Local(f.dir.clone()), &ResolveOptions::default()).unwrap();
    let w = weights::load(&files, DType::F32, &Device::Cpu).unwrap();
    let model = Qwen3_5Model::from_config(
        &f.config,
        &ParseOptions::default(),
        w.text_vb(),
        w.lm_head_vb(),
    )
    .unwrap_or_else(|e| panic!("{}: {e:#}", f.dir.display()));
    assert!(w.unused().is_empty(), "never read: {:?}", w.unused());
    model
}

fn check_variant(variant: &str) {
    let f = Fixture::load(root().join(variant));
    let model = build(&f);
    let kinds: Vec<&Attention> = model.spec().layers.iter().map(|l| &l.attention).collect();
    assert!(kinds.contains(&&Attention::Linear) && kinds.contains(&&Attention::Full));
    check_against_reference(variant, &model, &f);
}

#[test]
fn dense_matches_the_reference() {
    check_variant("dense");
}

#[test]
fn moe_matches_the_reference() {
    check_variant("moe");
}

#[test]
fn wrapper_matches_the_reference() {
    check_variant("wrapper");
}

/// Feeding the sequence in uneven chunks (as `chat` does turn by turn) gives the logits of one
/// forward: the conv and recurrent states pick up where they left off.
#[test]
fn chunked_prefill_equals_one_forward() {
    let f = Fixture::load(root().join("moe"));
    let d = chunked_vs_one_forward(&build(&f), &f.sequence());
    assert!(d < 1e-4, "chunked vs one forward: {d}");
}

/// 80 tokens: the reference's prefill runs two 64-token chunks of its chunked rule; llmarch's
/// recurrent rule gives the same logits.
#[test]
fn two_chunks_of_the_reference_prefill() {
    let f = Fixture::load(root().join("dense"));
    let model = build(&f);
    let r =
        candle_core::safetensors::load(f.dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids: Vec<u32> = r["long_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    assert!(ids.len() > 64);
    let got = model.forward(&ids, &mut model.new_cache()).unwrap();
    let d = max_abs_diff(&got, &r["long_logits"]);
    assert!(
        d < common::reference::logit_tol("qwen3_5"),
        "80-token forward vs reference: {d}"
    );
}

/// A prompt past one prefill chunk, fed in chunks as `run` and `chat` feed it, equals one forward
/// over it (DeltaNet states and full attention crossing the chunk boundary).
#[test]
fn long_prompt_prefill_in_chunks_equals_one_forward() {
    for v in ["dense", "moe"] {
        let f = Fixture::load(root().join(v));
        let d = long_prompt_chunked_vs_one_forward(&build(&f), 1100);
        assert!(d < 1e-3, "{v}: chunked prefill vs one forward: {d}");
    }
}
