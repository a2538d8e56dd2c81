//! Laguna (poolside): `LagunaForCausalLM`. Reference: transformers 5.23.0
//! `models/laguna/{configuration,modeling}_laguna.py`.
//!
//! Notable:
//! - per-layer query-head counts (`num_attention_heads_per_layer`: Laguna-XS.2 has 48 on its full
//!   layers and 64 on its sliding ones) over a fixed `num_key_value_heads` (8), so the GQA group is
//!   6 on full layers and 8 on sliding ones; the KV cache does not depend on the query heads;
//! - sliding (`sliding_window`) and full layers, each with its own RoPE block (XS.2: YaRN ×32 with
//!   half the head rotated on full layers, plain θ10000 over the whole head on sliding ones);
//! - RMS QK norm, and a softplus output gate `g_proj` on the attention output: one gate per head
//!   (`gating: true` / `"per-head"`) or one per channel (`"per-element"`, and — surprisingly —
//!   also `false` and any other string: the reference only tests for the per-head spellings);
//! - sigmoid-routed MoE (bias-corrected top-k, weights renormalised, ×`moe_routed_scaling_factor`)
//!   plus an always-on shared expert; `mlp_layer_types` picks dense or sparse per layer.
//!
//! Cache: K and V of `num_key_value_heads × head_dim` per token on every layer; sliding layers keep
//! `sliding_window` tokens here. The reference's `DynamicSlidingWindowLayer` keeps
//! `sliding_window − 1` (it appends the current token before attending), one token fewer.
//!
//! RoPE forms: the reference's config class does not standardise `rope_parameters` (its
//! `convert_rope_params_to_dict` is a no-op), so it accepts (a) the nested per-layer-type form
//! (used), (b) a flat block plus `swa_rope_parameters` (the pre-release layout: read here as
//! full = flat, sliding = `swa_rope_parameters`; transformers 5.23 loads such a config but cannot
//! build the model from it, so llmarch warns), and rejects (c) a nested form whose YaRN block lacks
//! `original_max_position_embeddings` (a copy beside the blocks is not read). A legacy
//! `rope_scaling` replaces `rope_parameters` wholesale, as the reference's property setter does.
//! YaRN's `truncate` is read from the top level of `rope_parameters` (`config.rope_parameters
//! .get("truncate", True)`), so in the nested form a `truncate` inside the YaRN block is ignored
//! by the reference, and one beside the blocks is what counts; llmarch does the same and warns.
//!
//! One reading of the config ([`parse`]) gives the [`ArchSpec`] and the few model-wide numbers
//! the network needs ([`RuntimeConfig`], including each layer type's RoPE frequencies as the
//! reference's `LagunaRotaryEmbedding` computes them): `config` holds the schema, what llmarch
//! refuses and the runtime config; `rope` the RoPE forms above; `spec` the layer schedule and
//! per-layer table; `params` the parameter counts; [`model`] is the network.

mod config;
pub mod model;
mod params;
mod rope;
mod spec;
#[cfg(test)]
mod tests;

pub use config::RuntimeConfig;

use super::config::TextConfig;
use super::{ArchSpec, Family};
use anyhow::Result;

pub const FAMILY: Family = Family {
    name: "laguna",
    model_types: &["laguna"],
    architectures: &["LagunaForCausalLM"],
    summary: "per-layer query-head counts, softplus output gate, QK norm, sliding + full RoPE, sigmoid MoE + shared expert",
    parse: |text| Ok(parse(text)?.0),
    build: Some(crate::arch::build::<model::LagunaModel>),
    rename: None,
};

/// Read a Laguna config once into its [`ArchSpec`] and the [`RuntimeConfig`] its network
/// needs, both validated: every command (`inspect`, `kv-budget`, `run`) gives the same verdict.
pub fn parse(text: &TextConfig) -> Result<(ArchSpec, RuntimeConfig)> {
    let c: config::LagunaConfig = text.parse()?;
    let spec = spec::arch_spec(text, &c)?;
    let runtime = config::runtime_config_of(&c)?;
    Ok((spec, runtime))
}

/// The [`RuntimeConfig`] alone, for the RoPE checks on configs reduced to their RoPE keys.
pub fn runtime_config(text: &TextConfig) -> Result<RuntimeConfig> {
    config::runtime_config_of(&text.parse()?)
}
