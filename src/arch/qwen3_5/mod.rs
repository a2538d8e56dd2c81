//! Qwen3.5 / Qwen3.6 (text part), dense and MoE: `Qwen3_5ForCausalLM`,
//! `Qwen3_5MoeForCausalLM`, and the text model inside `Qwen3_5ForConditionalGeneration` /
//! `Qwen3_5MoeForConditionalGeneration`. Reference: transformers 5.23.0
//! `models/qwen3_5/{configuration,modeling}_qwen3_5.py` and
//! `models/qwen3_5_moe/{configuration,modeling}_qwen3_5_moe.py`; cache classes in
//! `cache_utils.py` (`LinearAttentionLayer`, `DynamicLayer`).
//!
//! Notable:
//! - a hybrid of Gated DeltaNet linear attention and gated full attention, from `layer_types`
//!   (`linear_attention` / `full_attention`) or, when that is absent, `full_attention_interval`
//!   (default 4: layer i is full iff (i + 1) % 4 == 0, so 3 linear : 1 full). When both are
//!   given the reference uses `layer_types` and ignores the interval.
//! - Gated DeltaNet layers: `in_proj_qkv` → a depthwise causal conv (`linear_conv_kernel_dim`,
//!   SiLU) over q, k, v → the gated delta rule with `linear_num_key_heads` q/k heads shared by
//!   `linear_num_value_heads` value heads, then an RMSNorm gated by SiLU(`in_proj_z`). In the
//!   table: `q_heads` = value heads, `kv_heads` = key heads, `head_dim` = key head dim,
//!   `v_head_dim` = value head dim.
//! - full-attention layers: `q_proj` is twice as wide (query + a per-element output gate,
//!   applied as `sigmoid(gate)` before `o_proj`), per-head QK RMSNorm, partial RoPE (0.25 of
//!   256 = 64 dims). The reference always builds the gate: it never reads `attn_output_gate`
//!   or `output_gate_type`. We accept `attn_output_gate: true` and `output_gate_type: "swish"`
//!   (the 27B hub value: it matches the SiLU gate of the DeltaNet norm; the attention gate is
//!   sigmoid whatever it says) and reject other values, whose meaning the reference does not
//!   define.
//! - mRoPE (`mrope_section`, `mrope_interleaved`): the reference expands text positions to three
//!   identical rows (T = H = W), so the interleaved recomposition picks every frequency from
//!   equal rows and the result is plain 1-D RoPE over the rotated dims. The reference also
//!   interleaves whatever `mrope_interleaved` says. Only images/video would differ.
//! - MoE (35B-A3B): every layer is sparse: softmax router, top-k renormalised (hard-coded, so
//!   `norm_topk_prob: false` is rejected), routed experts as packed `gate_up_proj` /
//!   `down_proj`, plus one shared expert scaled by `sigmoid(shared_expert_gate(x))`.
//!   `decoder_sparse_step` / `mlp_only_layers` are not read by the reference; values other than
//!   "every layer sparse" are rejected.
//! - MTP (`mtp_num_hidden_layers`, `mtp_use_dedicated_embeddings`): not built by the reference
//!   (`mtp.*` weights are ignored on load), so not counted; run only as a drafter
//!   (`--draft mtp`, [`mtp`], semantics pinned to vLLM's).
//!
//! Cache, per linear layer (what the reference keeps, and what llmarch models):
//! - conv state: `conv_dim = 2 × key_heads × key_dim + value_heads × value_dim` channels in the
//!   model dtype. The reference keeps `kernel` columns (`[batch, conv_dim, kernel]`), but the
//!   causal conv only ever reads the last `kernel − 1` earlier inputs beside the new token (its
//!   oldest column is overwritten unread, as in llama.cpp and vLLM, which keep `kernel − 1`), so
//!   llmarch models `kernel − 1` columns: `conv_dim` elements fewer per layer than the reference.
//! - recurrent state: `[batch, value_heads, key_dim, value_dim]` in float32. The reference's
//!   delta-rule kernels compute the state in float32 and the cache stores it as returned, so it
//!   stays float32 even for a bf16 model; `mamba_ssm_dtype` is never read (other values only
//!   warn).
//!
//! Full layers keep K and V `[batch, kv_heads, tokens, head_dim]` each (`DynamicLayer`).
//!
//! One reading of the config ([`parse`]) gives the [`ArchSpec`] and the few model-wide numbers
//! the network needs ([`RuntimeConfig`]): `config` holds the schema, the variant, what llmarch
//! refuses, the RoPE block and the runtime config; `spec` the layer schedule, per-layer table and
//! cache parts; `params` the parameter counts (checked arithmetic); [`model`] is the network.

mod config;
pub mod model;
pub mod mtp;
mod params;
mod spec;
#[cfg(test)]
mod tests;

pub use config::RuntimeConfig;

use super::config::TextConfig;
use super::{ArchSpec, Family};
use anyhow::Result;

pub const FAMILY: Family = Family {
    name: "qwen3_5",
    model_types: &["qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "qwen3_5_moe"],
    architectures: &[
        "Qwen3_5ForCausalLM",
        "Qwen3_5ForConditionalGeneration",
        "Qwen3_5MoeForCausalLM",
        "Qwen3_5MoeForConditionalGeneration",
    ],
    summary: "Gated DeltaNet linear attention (fixed-size state) in a 3:1 hybrid with gated full attention; dense or MoE + shared expert",
    parse: |text| Ok(parse(text)?.0),
    build: Some(crate::arch::build::<model::Qwen3_5Model>),
    rename: None,
};

/// Read a Qwen3.5 text config once into its [`ArchSpec`] and the [`RuntimeConfig`] its network
/// needs, both validated: every command (`inspect`, `kv-budget`, `run`) gives the same verdict.
pub fn parse(text: &TextConfig) -> Result<(ArchSpec, RuntimeConfig)> {
    let variant = config::variant(text)?;
    let c: config::Qwen3_5TextConfig = text.parse()?;
    let spec = spec::arch_spec(text, variant, &c)?;
    let runtime = config::runtime_config_of(&c, text)?;
    Ok((spec, runtime))
}
