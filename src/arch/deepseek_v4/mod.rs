//! DeepSeek V4 (`DeepseekV4ForCausalLM`: DeepSeek-V4-Flash, DeepSeek-V4-Pro). Reference:
//! transformers 5.23.0 `models/deepseek_v4/{configuration,modeling}_deepseek_v4.py`, cache layers
//! `DeepseekV4HCACache` / `DeepseekV4CSACache` (in the modeling file) on top of
//! `cache_utils.DynamicSlidingWindowLayer`.
//!
//! Notable:
//! - three attention kinds, every one with a sliding window of `sliding_window` tokens over a
//!   single shared KV head (MQA, `head_dim` 512) whose one tensor serves as keys and values (K=V):
//!   `sliding_attention` (window only, plain RoPE θ`rope_theta`), `compressed_sparse_attention`
//!   (CSA: plus one compressed entry per `compress_rates.csa` tokens, built from two overlapping
//!   series, of which a lightning indexer picks the top `index_topk` per query) and
//!   `heavily_compressed_attention` (HCA: plus one entry per `compress_rates.hca` tokens, all
//!   attended). Compressed layers use the "compress" RoPE (θ`compress_rope_theta`, YaRN);
//! - low-rank queries (`q_lora_rank`), grouped low-rank output projection (`o_groups` ×
//!   `o_lora_rank`), per-head attention sinks;
//! - mHC: the residual is `hc_mult` streams, mixed around attention and MoE by two
//!   hyper-connections per layer (Sinkhorn-projected), collapsed by a final `hc_head`;
//! - every layer is MoE (+1 shared expert); the first `num_hash_layers` route by a frozen
//!   `tid2eid[token]` table (a persistent buffer, not a parameter, so not counted);
//! - configs come in two forms, both read exactly as `DeepseekV4Config.__post_init__` does: the
//!   hub form (`compress_ratios` per layer 0/4/128, with one extra entry for the MTP layer that is
//!   dropped; `num_hash_layers`; `qk_rope_head_dim`; top-level `rope_scaling` + `compress_rope_theta`)
//!   and the transformers form (`layer_types`, `compress_rates`, `mlp_layer_types`,
//!   `partial_rotary_factor`, nested `rope_parameters` {main, compress}).
//!
//! Running it: the network is [`model`]; Hub checkpoints (DeepSeek's own tensor names, FP8
//! block-scaled weights and FP4 experts with `.scale`) load through [`checkpoint_name`] and
//! `loader::quantized`. Where the lightning indexer must choose, llmarch selects by the
//! definition (ties to the lower index) in prefill and decode alike; the reference's `torch.topk`
//! does not, see `layers::lightning_indexer`.
//!
//! Cache, what llmarch holds vs what the reference holds (per layer, batch 1):
//! - window: llmarch keeps `sliding_window` K=V rows of `head_dim`. The reference keeps
//!   `sliding_window − 1` rows after each step; on sliding layers (plain
//!   `DynamicSlidingWindowLayer`) it stores them twice (`keys` and `values` are separate copies of
//!   the same tensor), on CSA/HCA layers once (`values` aliases `keys`);
//! - compressed entries (`compressed_kv`): `context / ratio` rows of `head_dim`; CSA also keeps the
//!   indexer's compressed keys, `context / ratio` rows of `index_head_dim`;
//! - compressor carry: the projected kv and gate of the `context mod ratio` tokens of the window
//!   still open (`buffer_kv`/`buffer_gate`; CSA: 2 series each, so 4 × `head_dim` per token, and
//!   4 × `index_head_dim` for the indexer; HCA: 2 × `head_dim`), as the reference;
//! - CSA overlap carry (`overlap_kv`/`overlap_gate`): the last closed window's first series (Ca),
//!   kv and gate, `ratio` rows of `head_dim` (and of `index_head_dim` for the indexer), from the moment the
//!   first window closes, as the reference.
//!
//! Dtypes: everything is in the KV dtype except the overlap gates, which are f32: they hold the
//! gate logits plus `position_bias`, a parameter the reference keeps in f32
//! (`_keep_in_fp32_modules_strict`), so a bf16 `from_pretrained` model holds them in f32 (checked
//! on transformers 5.23.0). A model cast with `.to(bf16)` instead, as
//! `tests/oracle/measure_cache.py` does, holds them in bf16. The carry buffers hold the raw
//! projections (no bias yet) and are in the model dtype either way.
//!
//! One reading of the config ([`parse`]) gives the [`ArchSpec`] and the model-wide numbers the
//! network needs ([`RuntimeConfig`]): `config` holds the schema, its `__post_init__` resolution,
//! what llmarch refuses and the runtime config; `spec` the layer schedule, per-layer table and
//! cache parts; `params` the parameter counts; `checkpoint` the tensor renames; [`model`] is the
//! network.

mod checkpoint;
mod config;
pub mod model;
mod params;
mod spec;
#[cfg(test)]
mod tests;

pub use checkpoint::checkpoint_name;
pub use config::RuntimeConfig;

use super::config::TextConfig;
use super::{ArchSpec, Family};
use anyhow::Result;

pub const FAMILY: Family = Family {
    name: "deepseek_v4",
    model_types: &["deepseek_v4"],
    architectures: &["DeepseekV4ForCausalLM"],
    summary: "mHC hyper-connections, compressed sparse (CSA, lightning indexer) + heavily compressed (HCA) attention beside a sliding window, shared-KV MQA with K=V, grouped output projection, hash-routed MoE",
    parse: |text| Ok(parse(text)?.0),
    build: Some(crate::arch::build::<model::DeepseekV4Model>),
    rename: Some(checkpoint_name),
};

/// Read a DeepSeek V4 config once into its [`ArchSpec`] and the [`RuntimeConfig`] its network
/// needs, both validated: every command (`inspect`, `kv-budget`, `run`) gives the same verdict.
pub fn parse(text: &TextConfig) -> Result<(ArchSpec, RuntimeConfig)> {
    let c: config::DeepseekV4Config = text.parse()?;
    let spec = spec::arch_spec(text, &c)?;
    let runtime = config::runtime_config_of(&c, text)?;
    Ok((spec, runtime))
}
