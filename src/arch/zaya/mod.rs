//! ZAYA (Zyphra): `ZayaForCausalLM`, transformers-native schema. Reference: transformers 5.23.0
//! `models/zaya/{configuration,modeling}_zaya.py`; cache layers in `cache_utils.py`
//! (`LinearAttentionAndFullAttentionLayer`, `LinearAttentionAndSlidingWindowAttentionLayer`).
//!
//! Notable:
//! - every layer is `hybrid` (CCA over all tokens) or `hybrid_sliding` (CCA over `sliding_window`
//!   tokens); each holds attention and an MoE block;
//! - Compressed Convolutional Attention (`ZayaCCAProjection`): q (`heads × head_dim`) and k
//!   (`kv_heads × head_dim`) are concatenated and mixed along time by a depthwise conv (kernel
//!   `cca_time0`) then a per-head grouped conv (kernel `cca_time1`), plus residual paths; half of
//!   each value head comes from the current token (`v_proj_current`), half from the previous
//!   token (`v_proj_delayed`); q/k are L2-normalised with a learned per-KV-head key scale;
//! - top-1 MoE with an MLP router (`router_hidden_size`): down-projection, RMS norm, two GELU
//!   layers, `num_experts + 1` classes (the extra class skips the experts), and from layer 1 on the
//!   previous layer's router state added in (EDA); `num_experts_per_tok` must be 1;
//! - learned residual scaling (scale + bias on both branches) after attention and after the MoE,
//!   and on the input embedding; optional `lm_head_bias`; tied embeddings by default.
//!
//! Cache, per layer (all in the model dtype):
//! - K and V: `num_key_value_heads × head_dim` per token each. This is CCA's latent size: the
//!   convolutions and the value delay happen before caching, so nothing smaller is stored (ZAYA1-8B:
//!   2 × 128 = 256 per token for K and the same for V, against a hidden size of 2048);
//! - conv state: the last `(cca_time0 − 1) + (cca_time1 − 1)` projected q/k rows,
//!   `(num_attention_heads + num_key_value_heads) × head_dim` each;
//! - delayed-value state: the previous token's `v_proj_delayed` output, `kv_heads × head_dim / 2`.
//!
//! `hybrid_sliding` layers keep `sliding_window` tokens here; the reference's sliding cache layer
//! keeps `sliding_window − 1`. With `cca_time0 = cca_time1 = 1` there is no conv state (the
//! reference's `qk_states[..., -0:]` would keep the whole sequence there; llmarch keeps none).
//!
//! The legacy hub schema (80 alternating attention / MoE layers, `ffn_hidden_size`,
//! `zaya_mlp_expansion`, ...) is refused: transformers 5.23 would build a wrong 80-layer model
//! from it.
//!
//! One reading of the config ([`parse`]) gives the [`ArchSpec`] and the few model-wide numbers
//! the network needs ([`RuntimeConfig`]): `config` holds the schema, what llmarch refuses, the
//! RoPE blocks and the runtime config; `spec` the layer schedule, per-layer table and cache parts;
//! `params` the parameter counts; [`model`] is the network.

mod config;
pub mod model;
mod params;
mod spec;
#[cfg(test)]
mod tests;

pub use config::RuntimeConfig;

use super::config::TextConfig;
use super::{ArchSpec, Family};
use anyhow::Result;

pub const FAMILY: Family = Family {
    name: "zaya",
    model_types: &["zaya"],
    architectures: &["ZayaForCausalLM"],
    summary: "Compressed Convolutional Attention (conv + delayed-value state), top-1 MoE with an MLP router, residual scaling",
    parse: |text| Ok(parse(text)?.0),
    build: Some(crate::arch::build::<model::ZayaModel>),
    rename: None,
};

/// Read a ZAYA config once into its [`ArchSpec`] and the [`RuntimeConfig`] its network
/// needs, both validated: every command (`inspect`, `kv-budget`, `run`) gives the same verdict.
pub fn parse(text: &TextConfig) -> Result<(ArchSpec, RuntimeConfig)> {
    config::check_not_legacy(&text.value)?;
    let c: config::ZayaConfig = text.parse()?;
    let spec = spec::arch_spec(text, &c)?;
    let runtime = config::runtime_config_of(&c)?;
    Ok((spec, runtime))
}
