//! The Laguna config as the reference reads it: the serde schema with transformers' defaults,
//! `gating` and the legacy MoE keys, what llmarch refuses, and the [`RuntimeConfig`] the network
//! reads beyond the per-layer table (each layer type's RoPE frequencies as the reference's
//! `LagunaRotaryEmbedding` computes them).

use super::rope::resolve_rope;
use crate::arch::config::{default_count, rope_frequencies, RopeFrequencies};
use crate::layers::output_gate::GateGranularity;
use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::{Map, Value};

/// `LagunaConfig` with the reference's defaults.
#[derive(Debug, Deserialize)]
pub(super) struct LagunaConfig {
    #[serde(default = "default_count::<100_352>")]
    pub(super) vocab_size: usize,
    #[serde(default = "default_count::<2048>")]
    pub(super) hidden_size: usize,
    #[serde(default = "default_count::<8192>")]
    pub(super) intermediate_size: usize,
    #[serde(default = "default_count::<40>")]
    pub(super) num_hidden_layers: usize,
    #[serde(default = "default_count::<48>")]
    pub(super) num_attention_heads: usize,
    #[serde(default = "default_count::<8>")]
    pub(super) num_key_value_heads: usize,
    #[serde(default = "default_activation")]
    pub(super) hidden_act: String,
    #[serde(default = "default_count::<131_072>")]
    pub(super) max_position_embeddings: usize,
    #[serde(default = "default_rms_eps")]
    pub(super) rms_norm_eps: f64,
    #[serde(default)]
    pub(super) tie_word_embeddings: bool,
    pub(super) rope_parameters: Option<Value>,
    /// Legacy name; the reference's setter makes it replace `rope_parameters`.
    pub(super) rope_scaling: Option<Value>,
    /// Pre-release flat form: the sliding layers' RoPE block.
    pub(super) swa_rope_parameters: Option<Value>,
    /// Top-level RoPE keys: not read by the reference (kept as plain attributes); defaults for a
    /// flat `rope_parameters` block here.
    pub(super) rope_theta: Option<f64>,
    pub(super) partial_rotary_factor: Option<f64>,
    pub(super) original_max_position_embeddings: Option<Value>,
    #[serde(default = "default_count::<512>")]
    pub(super) sliding_window: usize,
    #[serde(default = "default_count::<512>")]
    pub(super) moe_intermediate_size: usize,
    #[serde(default = "default_count::<512>")]
    pub(super) shared_expert_intermediate_size: usize,
    #[serde(default = "default_count::<8>")]
    pub(super) num_experts_per_tok: usize,
    #[serde(default = "default_count::<256>")]
    pub(super) num_experts: usize,
    pub(super) layer_types: Option<Vec<String>>,
    #[serde(default = "default_count::<128>")]
    pub(super) head_dim: usize,
    #[serde(default)]
    pub(super) attention_bias: bool,
    #[serde(default = "default_gating")]
    pub(super) gating: Value,
    pub(super) num_attention_heads_per_layer: Option<Vec<usize>>,
    pub(super) mlp_layer_types: Option<Vec<String>>,
    #[serde(default = "default_routed_scaling_factor")]
    pub(super) moe_routed_scaling_factor: f64,
    #[serde(default)]
    pub(super) moe_apply_router_weight_on_input: bool,
    #[serde(default)]
    pub(super) moe_router_logit_softcapping: f64,
    /// Not a `LagunaConfig` field: the reference always renormalises the top-k weights.
    pub(super) norm_topk_prob: Option<bool>,
    /// Legacy Qwen-MoE-style keys that transformers ignores (`mlp_layer_types` decides).
    pub(super) mlp_only_layers: Option<Value>,
    pub(super) decoder_sparse_step: Option<Value>,
    #[serde(flatten)]
    pub(super) rest: Map<String, Value>,
}

fn default_activation() -> String {
    "silu".into()
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_gating() -> Value {
    Value::Bool(true)
}
fn default_routed_scaling_factor() -> f64 {
    1.0
}

/// No Laguna-specific keys are known to be harmless beyond the common ones.
pub(super) const HARMLESS: &[&str] = &[];

pub(super) const SLIDING: &str = "sliding_attention";
pub(super) const FULL: &str = "full_attention";
pub(super) const DENSE: &str = "dense";
pub(super) const SPARSE: &str = "sparse";

/// `gating`: true / "per-head" → one gate per head; "per-element" → one per channel. The
/// reference treats every other value as per-element; llmarch accepts `false` with a warning and
/// refuses unknown strings (a typo would silently change the parameter count).
pub(super) fn read_gating(v: &Value, warnings: &mut Vec<String>) -> Result<bool> {
    match v {
        Value::Bool(true) => Ok(true),
        Value::Bool(false) => {
            warnings.push(
                "key `gating` = false still builds a per-element output gate in the reference \
                 (only true/\"per-head\" select per-head); counted as per-element"
                    .into(),
            );
            Ok(false)
        }
        Value::String(s) if s == "per-head" => Ok(true),
        Value::String(s) if s == "per-element" => Ok(false),
        Value::String(s) => bail!(
            "key `gating` = \"{s}\" is not a known gate granularity (true, \"per-head\", \"per-element\"); \
             the reference would silently build a per-element gate"
        ),
        other => bail!("key `gating`: expected true/false, \"per-head\" or \"per-element\", got {other}"),
    }
}

/// Which layers the legacy `mlp_only_layers` / `decoder_sparse_step` keys would make sparse
/// (Qwen-MoE convention), when both are readable.
pub(super) fn legacy_sparse_layers(c: &LagunaConfig, n: usize) -> Option<Vec<bool>> {
    if c.mlp_only_layers.is_none() && c.decoder_sparse_step.is_none() {
        return None;
    }
    let only: Vec<u64> = match &c.mlp_only_layers {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a.iter().map(|v| v.as_u64()).collect::<Option<_>>()?,
        Some(_) => return None,
    };
    let step = match &c.decoder_sparse_step {
        None | Some(Value::Null) => 1,
        Some(v) => v.as_u64().filter(|&s| s > 0)?,
    };
    Some(
        (0..n)
            .map(|i| {
                c.num_experts > 0
                    && !only.contains(&(i as u64))
                    && (i as u64 + 1).is_multiple_of(step)
            })
            .collect(),
    )
}

/// Refuse what a Laguna config may say but llmarch does not run.
pub(super) fn check_supported(c: &LagunaConfig) -> Result<()> {
    if c.moe_apply_router_weight_on_input {
        bail!(
            "key `moe_apply_router_weight_on_input` = true is not supported (the reference raises \
             NotImplementedError for it too)"
        );
    }
    if c.hidden_act != "silu" {
        bail!(
            "key `hidden_act` = `{}` is not supported (Laguna uses silu)",
            c.hidden_act
        );
    }
    Ok(())
}

/// The model-wide numbers the network needs beyond the per-layer table.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub rms_norm_eps: f64,
    /// Biases on the q/k/v/o projections.
    pub attention_bias: bool,
    /// The softplus output gate's granularity.
    pub gate: GateGranularity,
    /// Multiplies the routed experts' sum (not the shared expert).
    pub moe_routed_scaling_factor: f64,
    /// `tanh` cap on the router logits; `None` when the config's value is 0 (off).
    pub moe_router_logit_softcapping: Option<f64>,
    /// RoPE of the full layers, when there are any.
    pub rope_full: Option<RopeFrequencies>,
    /// RoPE of the sliding layers, when there are any.
    pub rope_sliding: Option<RopeFrequencies>,
}

impl RuntimeConfig {
    /// The smallest position limit of any layer type's RoPE.
    pub fn max_positions_limit(&self) -> Option<(usize, &str)> {
        [&self.rope_full, &self.rope_sliding]
            .into_iter()
            .flatten()
            .filter_map(|r| r.max_positions.map(|m| (m, r.kind.as_str())))
            .min_by_key(|(m, _)| *m)
    }
}

/// Validate and read the [`RuntimeConfig`] of a Laguna config (part of [`super::parse`]).
pub(super) fn runtime_config_of(c: &LagunaConfig) -> Result<RuntimeConfig> {
    let n = c.num_hidden_layers;
    if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps >= 0.0) {
        bail!(
            "key `rms_norm_eps` = {} must be a number ≥ 0",
            c.rms_norm_eps
        );
    }
    if !c.moe_routed_scaling_factor.is_finite() {
        bail!(
            "key `moe_routed_scaling_factor` = {} is not a number",
            c.moe_routed_scaling_factor
        );
    }
    let cap = c.moe_router_logit_softcapping;
    if !cap.is_finite() || cap < 0.0 {
        bail!("key `moe_router_logit_softcapping` = {cap} must be a number ≥ 0 (0: off)");
    }
    let mut ignored = vec![];
    let gate = if read_gating(&c.gating, &mut ignored)? {
        GateGranularity::PerHead
    } else {
        GateGranularity::PerElement
    };
    let types = c
        .layer_types
        .clone()
        .unwrap_or_else(|| vec![FULL.to_string(); n]);
    let used_full = types.iter().any(|t| t == FULL);
    let used_sliding = types.iter().any(|t| t == SLIDING);
    let blocks = resolve_rope(c, used_full, used_sliding, &mut ignored)?;
    let truncate = |block: &Value| -> Option<Value> {
        if blocks.nested {
            blocks.top_truncate.clone()
        } else {
            block.get("truncate").cloned()
        }
    };
    let freqs = |block: &Option<Value>, ty: &str| -> Result<Option<RopeFrequencies>> {
        block
            .as_ref()
            .map(|b| {
                rope_frequencies(
                    b,
                    truncate(b),
                    c.head_dim,
                    c.max_position_embeddings,
                    &format!("rope_parameters.{ty}"),
                )
            })
            .transpose()
    };
    Ok(RuntimeConfig {
        rms_norm_eps: c.rms_norm_eps,
        attention_bias: c.attention_bias,
        gate,
        moe_routed_scaling_factor: c.moe_routed_scaling_factor,
        moe_router_logit_softcapping: (cap > 0.0).then_some(cap),
        rope_full: freqs(&blocks.full, FULL)?,
        rope_sliding: freqs(&blocks.sliding, SLIDING)?,
    })
}
