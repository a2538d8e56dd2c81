//! Gemma 4 (text part): `Gemma4ForCausalLM`, and the text model inside
//! `Gemma4ForConditionalGeneration`. Reference: transformers 5.23.0
//! `models/gemma4/{configuration,modeling}_gemma4.py`.
//!
//! Notable:
//! - sliding (512/1024) and full layers; full layers have their own head dim (`global_head_dim`,
//!   512) and, with `attention_k_eq_v`, their own KV-head count (`num_global_key_value_heads`)
//!   and no `v_proj`: the keys serve as values (K=V, stored once here);
//! - cross-layer KV sharing: the last `num_kv_shared_layers` layers compute no K/V and read the
//!   cache of the last earlier non-shared layer of the same type (E2B: layers 15-34 read 13 if
//!   sliding, 14 if full); `use_double_wide_mlp` doubles their MLP width;
//! - per-layer embeddings (PLE, E2B/E4B): a packed `[vocab, layers × 256]` table plus a
//!   projection of the token embedding, one 256-wide slice per layer;
//! - 26B-A4B: an MoE block (128 experts, top-8) beside the dense MLP in every layer;
//! - transformers 5.23 folds `global_head_dim`/`num_global_key_value_heads` into a sparse
//!   `per_layer_config` keyed by layer index; both forms are read.
//!
//! One reading of the config ([`parse`]) gives the [`ArchSpec`] and the few model-wide numbers
//! the network needs ([`RuntimeConfig`]): `config` holds the schema, what llmarch refuses and the
//! runtime config; `spec` the layer schedule and per-layer table; `params` the parameter counts;
//! [`model`] is the network built from them.

pub mod assistant;
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
    name: "gemma4",
    model_types: &["gemma4_text", "gemma4"],
    architectures: &["Gemma4ForCausalLM", "Gemma4ForConditionalGeneration"],
    summary: "cross-layer KV sharing, per-layer embeddings, sliding + 512-d full layers, K=V, MoE beside a dense MLP",
    parse: |text| Ok(parse(text)?.0),
    build: Some(crate::arch::build::<model::Gemma4Model>),
    rename: None,
};

/// Read a Gemma 4 text config once into its [`ArchSpec`] and the [`RuntimeConfig`] its network
/// needs, both validated: every command (`inspect`, `kv-budget`, `run`) gives the same verdict.
pub fn parse(text: &TextConfig) -> Result<(ArchSpec, RuntimeConfig)> {
    let c: config::Gemma4TextConfig = text.parse()?;
    let spec = spec::arch_spec(text, &c)?;
    let runtime = config::runtime_config_of(&c, text)?;
    Ok((spec, runtime))
}
