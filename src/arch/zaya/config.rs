//! The ZAYA config as the reference reads it: the serde schema with transformers' defaults, the
//! legacy hub schema it refuses, the per-layer-type RoPE blocks, and the [`RuntimeConfig`] the
//! network reads beyond the per-layer table.

use crate::arch::config::{default_count, default_true, dim};
use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use serde_json::{Map, Value};

/// `ZayaConfig` with the reference's defaults.
#[derive(Debug, Deserialize)]
pub(super) struct ZayaConfig {
    #[serde(default = "default_count::<262_272>")]
    pub(super) vocab_size: usize,
    #[serde(default = "default_count::<2048>")]
    pub(super) hidden_size: usize,
    #[serde(default = "default_count::<40>")]
    pub(super) num_hidden_layers: usize,
    #[serde(default = "default_count::<8>")]
    pub(super) num_attention_heads: usize,
    #[serde(default = "default_count::<2>")]
    pub(super) num_key_value_heads: usize,
    #[serde(default = "default_activation")]
    pub(super) hidden_act: String,
    #[serde(default = "default_count::<131_072>")]
    pub(super) max_position_embeddings: usize,
    #[serde(default = "default_rms_eps")]
    pub(super) rms_norm_eps: f64,
    #[serde(default = "default_true")]
    pub(super) tie_word_embeddings: bool,
    pub(super) rope_parameters: Option<Value>,
    /// Legacy; must be absent or null.
    pub(super) rope_scaling: Option<Value>,
    /// Top-level RoPE keys are not read by the reference (plain attributes).
    pub(super) rope_theta: Option<f64>,
    pub(super) partial_rotary_factor: Option<f64>,
    pub(super) sliding_window: Option<usize>,
    #[serde(default = "default_count::<2048>")]
    pub(super) moe_intermediate_size: usize,
    #[serde(default = "default_count::<1>")]
    pub(super) num_experts_per_tok: usize,
    #[serde(default = "default_count::<16>")]
    pub(super) num_experts: usize,
    pub(super) layer_types: Option<Vec<String>>,
    #[serde(default = "default_count::<128>")]
    pub(super) head_dim: usize,
    #[serde(default)]
    pub(super) attention_bias: bool,
    #[serde(default)]
    pub(super) lm_head_bias: bool,
    #[serde(default = "default_count::<256>")]
    pub(super) router_hidden_size: usize,
    #[serde(default = "default_count::<2>")]
    pub(super) cca_time0: usize,
    #[serde(default = "default_count::<2>")]
    pub(super) cca_time1: usize,
    #[serde(flatten)]
    pub(super) rest: Map<String, Value>,
}

fn default_activation() -> String {
    "silu".into()
}
fn default_rms_eps() -> f64 {
    1e-5
}

/// No ZAYA-specific keys are known to be harmless beyond the common ones.
pub(super) const HARMLESS: &[&str] = &[];

pub(super) const HYBRID: &str = "hybrid";
pub(super) const HYBRID_SLIDING: &str = "hybrid_sliding";

/// Keys only the legacy (80-layer, alternating attention/MoE) hub schema carries.
const LEGACY_KEYS: &[&str] = &[
    "ffn_hidden_size",
    "zaya_mlp_expansion",
    "num_query_groups",
    "moe_router_topk",
    "kv_channels",
    "zaya_use_mod",
    "zaya_use_eda",
    "zaya_high_prec",
    "swa_layers",
    "swa_rotary_base",
    "scale_residual_merge",
    "clamp_temp",
    "cca",
    "activation_func",
    "gated_linear_unit",
    "add_bias_linear",
    "normalization",
    "fused_add_norm",
    "residual_in_fp32",
    "mamba_cache_dtype",
    "apply_rope_fusion",
    "bias_activation_fusion",
];

/// Refuse the legacy hub schema with a pointer to the native one.
pub(super) fn check_not_legacy(obj: &Map<String, Value>) -> Result<()> {
    let found: Vec<String> = LEGACY_KEYS
        .iter()
        .filter(|k| obj.contains_key(**k))
        .map(|k| format!("`{k}`"))
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    let layers = obj
        .get("num_hidden_layers")
        .and_then(|v| v.as_u64())
        .map_or(String::new(), |n| format!(", num_hidden_layers {n}"));
    Err(anyhow!(
        "this is the legacy ZAYA hub schema (alternating attention / MoE layers{layers}; keys {}), \
         not the transformers-native one that ZayaForCausalLM reads; transformers 5.23 would build \
         a wrong model from it",
        found.join(", ")
    )
    .context(
        "hint: use the transformers-native config (40 `hybrid` layers, `moe_intermediate_size`, \
         `router_hidden_size`, per-layer-type `rope_parameters`) from the native Zyphra/ZAYA1-8B \
         repo, or convert the checkpoint with convert_zaya_weights_to_hf.py from the transformers \
         source tree (src/transformers/models/zaya/; it is not in the 5.23.0 wheel)",
    ))
}

/// Per-layer-type RoPE blocks (`hybrid`, `hybrid_sliding`), as the reference reads them.
pub(super) fn resolve_rope(
    c: &ZayaConfig,
    used: &[&str],
    warnings: &mut Vec<String>,
) -> Result<Map<String, Value>> {
    if c.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        bail!(
            "key `rope_scaling` is set: the reference would replace `rope_parameters` with it and \
             then fail to build the model; write one block per layer type in `rope_parameters`"
        );
    }
    for (k, present) in [
        ("rope_theta", c.rope_theta.is_some()),
        ("partial_rotary_factor", c.partial_rotary_factor.is_some()),
    ] {
        if present {
            warnings.push(format!(
                "key `{k}` is not read: the reference takes RoPE from `rope_parameters.<layer type>`"
            ));
        }
    }
    let mut obj = match c.rope_parameters.clone() {
        None | Some(Value::Null) => serde_json::json!({
            HYBRID: {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
            HYBRID_SLIDING: {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
        })
        .as_object()
        .cloned()
        .unwrap_or_default(),
        Some(Value::Object(o)) => o,
        Some(_) => bail!("key `rope_parameters` is not an object"),
    };
    // The hub file carries a stray `rope_type` beside the nested blocks; the reference deletes it.
    obj.remove("rope_type");
    if !obj.contains_key(HYBRID) && !obj.contains_key(HYBRID_SLIDING) {
        bail!(
            "key `rope_parameters` is a single flat block, but ZAYA reads one block per layer type \
             (`{HYBRID}`, `{HYBRID_SLIDING}`); the reference drops a flat block's `rope_type` and then \
             cannot build the model"
        );
    }
    for k in obj.keys() {
        if k != HYBRID && k != HYBRID_SLIDING {
            warnings.push(format!(
                "key `rope_parameters.{k}` is not read: the reference reads only `{HYBRID}` and `{HYBRID_SLIDING}`"
            ));
        }
    }
    for ty in used {
        if !obj.contains_key(*ty) {
            bail!("key `rope_parameters.{ty}` is missing, but some layers are `{ty}` (the reference fails to build the model)");
        }
    }
    Ok(obj)
}

/// Refuse what a ZAYA config may say but llmarch (or the reference) does not run; the sizes
/// are checked positive before.
pub(super) fn check_supported(c: &ZayaConfig) -> Result<()> {
    if c.num_experts_per_tok != 1 {
        bail!(
            "key `num_experts_per_tok` = {}: ZAYA routes each token to exactly one expert (the \
             reference accepts only 1)",
            c.num_experts_per_tok
        );
    }
    let (q_heads, kv_heads) = (c.num_attention_heads, c.num_key_value_heads);
    if q_heads % kv_heads != 0 {
        bail!("key `num_attention_heads` ({q_heads}) must be a multiple of `num_key_value_heads` ({kv_heads})");
    }
    let kv_width = kv_heads * c.head_dim;
    if !kv_width.is_multiple_of(2) {
        bail!(
            "keys `num_key_value_heads` × `head_dim` = {kv_width} must be even: each value head is half \
             current, half delayed"
        );
    }
    if c.hidden_act != "silu" {
        bail!(
            "key `hidden_act` = `{}` is not supported (ZAYA uses silu)",
            c.hidden_act
        );
    }
    Ok(())
}

/// What the network needs beyond the per-layer table.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    pub rms_norm_eps: f64,
    /// Biases on q/k/v/o and the value halves.
    pub attention_bias: bool,
    /// A bias on the output head.
    pub lm_head_bias: bool,
    pub router_hidden_size: usize,
    /// Depthwise conv kernel.
    pub cca_time0: usize,
    /// Grouped conv kernel.
    pub cca_time1: usize,
}

/// Validate and read the [`RuntimeConfig`] of a ZAYA config (part of [`super::parse`]).
pub(super) fn runtime_config_of(c: &ZayaConfig) -> Result<RuntimeConfig> {
    Ok(RuntimeConfig {
        rms_norm_eps: c.rms_norm_eps,
        attention_bias: c.attention_bias,
        lm_head_bias: c.lm_head_bias,
        router_hidden_size: dim("router_hidden_size", c.router_hidden_size)?,
        cca_time0: dim("cca_time0", c.cca_time0)?,
        cca_time1: dim("cca_time1", c.cca_time1)?,
    })
}
