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
//! This file is the config half (config → [`ArchSpec`], and the few model-wide numbers the
//! network needs, [`RuntimeConfig`], including each layer type's RoPE frequencies as the
//! reference's `LagunaRotaryEmbedding` computes them); [`model`] is the network.

pub mod model;

use super::config::{
    check_heads, check_len, default_count, dim, layers_count, rope_frequencies, rope_from_params,
    to_u64, RopeFrequencies, TextConfig, MAX_DIM,
};
use super::{ArchSpec, Attention, Family, Ffn, LayerSpec, ParamCounts, Retention};
use crate::layers::output_gate::GateGranularity;
use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use serde_json::{Map, Value};

pub const FAMILY: Family = Family {
    name: "laguna",
    model_types: &["laguna"],
    architectures: &["LagunaForCausalLM"],
    summary: "per-layer query-head counts, softplus output gate, QK norm, sliding + full RoPE, sigmoid MoE + shared expert",
    parse: |text| Ok(parse(text)?.0),
    build: Some(|raw, opts, vb, lm_head| {
        Ok(Box::new(model::LagunaModel::from_config(
            raw, opts, vb, lm_head,
        )?))
    }),
    rename: None,
};

/// `LagunaConfig` with the reference's defaults.
#[derive(Debug, Deserialize)]
struct LagunaConfig {
    #[serde(default = "default_count::<100_352>")]
    vocab_size: usize,
    #[serde(default = "default_count::<2048>")]
    hidden_size: usize,
    #[serde(default = "default_count::<8192>")]
    intermediate_size: usize,
    #[serde(default = "default_count::<40>")]
    num_hidden_layers: usize,
    #[serde(default = "default_count::<48>")]
    num_attention_heads: usize,
    #[serde(default = "default_count::<8>")]
    num_key_value_heads: usize,
    #[serde(default = "default_activation")]
    hidden_act: String,
    #[serde(default = "default_count::<131_072>")]
    max_position_embeddings: usize,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    rope_parameters: Option<Value>,
    /// Legacy name; the reference's setter makes it replace `rope_parameters`.
    rope_scaling: Option<Value>,
    /// Pre-release flat form: the sliding layers' RoPE block.
    swa_rope_parameters: Option<Value>,
    /// Top-level RoPE keys: not read by the reference (kept as plain attributes); defaults for a
    /// flat `rope_parameters` block here.
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    original_max_position_embeddings: Option<Value>,
    #[serde(default = "default_count::<512>")]
    sliding_window: usize,
    #[serde(default = "default_count::<512>")]
    moe_intermediate_size: usize,
    #[serde(default = "default_count::<512>")]
    shared_expert_intermediate_size: usize,
    #[serde(default = "default_count::<8>")]
    num_experts_per_tok: usize,
    #[serde(default = "default_count::<256>")]
    num_experts: usize,
    layer_types: Option<Vec<String>>,
    #[serde(default = "default_count::<128>")]
    head_dim: usize,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default = "default_gating")]
    gating: Value,
    num_attention_heads_per_layer: Option<Vec<usize>>,
    mlp_layer_types: Option<Vec<String>>,
    #[serde(default = "default_routed_scaling_factor")]
    moe_routed_scaling_factor: f64,
    #[serde(default)]
    moe_apply_router_weight_on_input: bool,
    #[serde(default)]
    moe_router_logit_softcapping: f64,
    /// Not a `LagunaConfig` field: the reference always renormalises the top-k weights.
    norm_topk_prob: Option<bool>,
    /// Legacy Qwen-MoE-style keys that transformers ignores (`mlp_layer_types` decides).
    mlp_only_layers: Option<Value>,
    decoder_sparse_step: Option<Value>,
    #[serde(flatten)]
    rest: Map<String, Value>,
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
const HARMLESS: &[&str] = &[];

const SLIDING: &str = "sliding_attention";
const FULL: &str = "full_attention";
const DENSE: &str = "dense";
const SPARSE: &str = "sparse";

/// Where the two layer types' RoPE blocks come from.
struct RopeBlocks {
    full: Option<Value>,
    sliding: Option<Value>,
    /// Nested by layer type: YaRN's `truncate` then comes from the top level (`top_truncate`),
    /// not from the blocks.
    nested: bool,
    top_truncate: Option<Value>,
}

/// Resolve every form of `rope_parameters` the reference's config class accepts into one block
/// per layer type (see the module notes). Only the types in use must be present.
fn resolve_rope(
    c: &LagunaConfig,
    used_full: bool,
    used_sliding: bool,
    warnings: &mut Vec<String>,
) -> Result<RopeBlocks> {
    let mut params = c.rope_parameters.clone().filter(|v| !v.is_null());
    if let Some(rs) = c.rope_scaling.clone().filter(|v| !v.is_null()) {
        warnings.push(
            "legacy key `rope_scaling` replaces `rope_parameters` (as the reference's setter does)"
                .into(),
        );
        params = Some(rs);
    }
    let ignored_top = |warnings: &mut Vec<String>| {
        for (k, present) in [
            ("rope_theta", c.rope_theta.is_some()),
            ("partial_rotary_factor", c.partial_rotary_factor.is_some()),
            (
                "original_max_position_embeddings",
                c.original_max_position_embeddings.is_some(),
            ),
        ] {
            if present {
                warnings.push(format!(
                    "key `{k}` is not read: the reference takes RoPE from `rope_parameters.<layer type>`"
                ));
            }
        }
    };
    let Some(params) = params else {
        // The reference's defaults.
        ignored_top(warnings);
        return Ok(RopeBlocks {
            full: Some(
                serde_json::json!({"rope_type": "default", "rope_theta": 500_000.0, "partial_rotary_factor": 0.5}),
            ),
            sliding: Some(
                serde_json::json!({"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 1.0}),
            ),
            nested: true,
            top_truncate: None,
        });
    };
    let obj = params
        .as_object()
        .ok_or_else(|| anyhow!("key `rope_parameters` is not an object"))?;
    let nested = obj.contains_key(FULL) || obj.contains_key(SLIDING);
    if nested {
        ignored_top(warnings);
        if c.swa_rope_parameters.as_ref().is_some_and(|v| !v.is_null()) {
            warnings.push("key `swa_rope_parameters` is not read: `rope_parameters` is nested by layer type, so sliding layers use `rope_parameters.sliding_attention`".into());
        }
        let is_yarn = |ty: &str| {
            obj.get(ty)
                .and_then(|b| b.get("rope_type").or_else(|| b.get("type")))
                .and_then(|t| t.as_str())
                == Some("yarn")
        };
        let yarn_used = (used_full && is_yarn(FULL)) || (used_sliding && is_yarn(SLIDING));
        for ty in [FULL, SLIDING] {
            let used = if ty == FULL { used_full } else { used_sliding };
            if used && is_yarn(ty) && obj.get(ty).is_some_and(|b| b.get("truncate").is_some()) {
                warnings.push(format!(
                    "key `rope_parameters.{ty}.truncate` is not read: the reference's YaRN takes \
                     `truncate` from the top level of `rope_parameters` (default true)"
                ));
            }
        }
        for k in obj.keys() {
            if k == "truncate" && yarn_used {
                continue; // read by the YaRN blocks, see the module notes
            }
            if k != FULL && k != SLIDING {
                let hint = if k == "original_max_position_embeddings" {
                    " (a YaRN block needs its own `original_max_position_embeddings`)"
                } else {
                    ""
                };
                warnings.push(format!(
                    "key `rope_parameters.{k}` is not read: with per-layer-type blocks the reference reads only `{FULL}` and `{SLIDING}`{hint}"
                ));
            }
        }
        let take = |ty: &str, used: bool| -> Result<Option<Value>> {
            if !used {
                return Ok(None);
            }
            match obj.get(ty) {
                Some(v) => Ok(Some(v.clone())),
                None => bail!(
                    "key `rope_parameters.{ty}` is missing, but some layers are `{ty}` (the reference fails to build the model)"
                ),
            }
        };
        return Ok(RopeBlocks {
            full: take(FULL, used_full)?,
            sliding: take(SLIDING, used_sliding)?,
            nested: true,
            top_truncate: obj.get("truncate").cloned(),
        });
    }
    // Flat form: the full layers' block, with the top-level keys as defaults; the sliding layers
    // read `swa_rope_parameters`.
    let mut full = obj.clone();
    if let Some(t) = c.rope_theta {
        full.entry("rope_theta").or_insert(Value::from(t));
    }
    if let Some(p) = c.partial_rotary_factor {
        full.entry("partial_rotary_factor")
            .or_insert(Value::from(p));
    }
    if c.original_max_position_embeddings.is_some() {
        warnings.push("key `original_max_position_embeddings` is not read: the reference looks for it inside the RoPE block".into());
    }
    let sliding = if used_sliding {
        match c.swa_rope_parameters.clone().filter(|v| !v.is_null()) {
            Some(v) => Some(v),
            None => bail!(
                "key `rope_parameters` is a single flat block, so the sliding layers' RoPE must be in \
                 `swa_rope_parameters`, which is missing (the nested form keys blocks by `{FULL}`/`{SLIDING}`)"
            ),
        }
    } else {
        None
    };
    warnings.push(format!(
        "flat `rope_parameters`{}: read as the pre-release layout (full layers: `rope_parameters`, \
         sliding layers: `swa_rope_parameters`); transformers 5.23 loads this config but cannot build \
         the model from it (it indexes `rope_parameters` by layer type)",
        if used_sliding { " + `swa_rope_parameters`" } else { "" }
    ));
    Ok(RopeBlocks {
        full: Some(Value::Object(full)),
        sliding,
        nested: false,
        top_truncate: None,
    })
}

/// `gating`: true / "per-head" → one gate per head; "per-element" → one per channel. The
/// reference treats every other value as per-element; llmarch accepts `false` with a warning and
/// refuses unknown strings (a typo would silently change the parameter count).
fn read_gating(v: &Value, warnings: &mut Vec<String>) -> Result<bool> {
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
fn legacy_sparse_layers(c: &LagunaConfig, n: usize) -> Option<Vec<bool>> {
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

/// Validate and read the [`RuntimeConfig`] of a Laguna config (part of [`parse`]).
fn runtime_config_of(c: &LagunaConfig) -> Result<RuntimeConfig> {
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

/// Read a Laguna config once into its [`ArchSpec`] and the [`RuntimeConfig`] its network
/// needs, both validated: every command (`inspect`, `kv-budget`, `run`) gives the same verdict.
pub fn parse(text: &TextConfig) -> Result<(ArchSpec, RuntimeConfig)> {
    let c: LagunaConfig = text.parse()?;
    let spec = arch_spec(text, &c)?;
    let runtime = runtime_config_of(&c)?;
    Ok((spec, runtime))
}

/// The [`RuntimeConfig`] alone, for the RoPE checks on configs reduced to their RoPE keys.
pub fn runtime_config(text: &TextConfig) -> Result<RuntimeConfig> {
    runtime_config_of(&text.parse()?)
}

fn arch_spec(text: &TextConfig, c: &LagunaConfig) -> Result<ArchSpec> {
    let mut warnings = text.check_unknown_keys(&c.rest, HARMLESS)?;
    let n = layers_count("num_hidden_layers", c.num_hidden_layers)?;
    let hidden = dim("hidden_size", c.hidden_size)?;
    let vocab = dim("vocab_size", c.vocab_size)?;
    let head_dim = dim("head_dim", c.head_dim)?;
    let kv_heads = dim("num_key_value_heads", c.num_key_value_heads)?;

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
    let per_head_gate = read_gating(&c.gating, &mut warnings)?;
    if c.norm_topk_prob == Some(false) {
        warnings.push(
            "key `norm_topk_prob` = false is not read: the reference always renormalises the top-k router weights".into(),
        );
    }

    // Per-layer lists, with the reference's defaults.
    let types = c
        .layer_types
        .clone()
        .unwrap_or_else(|| vec![FULL.to_string(); n]);
    check_len("layer_types", &types, n)?;
    for (i, t) in types.iter().enumerate() {
        if t != SLIDING && t != FULL {
            bail!("key `layer_types[{i}]` = `{t}`: Laguna layers are `{SLIDING}` or `{FULL}`");
        }
    }
    let mlp_types = c.mlp_layer_types.clone().unwrap_or_else(|| {
        (0..n)
            .map(|i| if i == 0 { DENSE } else { SPARSE }.to_string())
            .collect()
    });
    check_len("mlp_layer_types", &mlp_types, n)?;
    for (i, t) in mlp_types.iter().enumerate() {
        if t != DENSE && t != SPARSE {
            bail!(
                "key `mlp_layer_types[{i}]` = `{t}`: Laguna MLP layers are `{DENSE}` or `{SPARSE}`"
            );
        }
    }
    let heads = c
        .num_attention_heads_per_layer
        .clone()
        .unwrap_or_else(|| vec![c.num_attention_heads; n]);
    check_len("num_attention_heads_per_layer", &heads, n)?;
    for (i, &q) in heads.iter().enumerate() {
        dim(&format!("num_attention_heads_per_layer[{i}]"), q)?;
        check_heads(i, q, kv_heads)?;
    }

    // Legacy keys transformers ignores: harmless unless they disagree with `mlp_layer_types`.
    if let Some(legacy) = legacy_sparse_layers(c, n) {
        let differ: Vec<String> = legacy
            .iter()
            .zip(&mlp_types)
            .enumerate()
            .filter(|(_, (&sparse, t))| sparse != (t.as_str() == SPARSE))
            .map(|(i, _)| i.to_string())
            .collect();
        if !differ.is_empty() {
            warnings.push(format!(
                "legacy keys `mlp_only_layers`/`decoder_sparse_step` disagree with `mlp_layer_types` on \
                 layers {}; transformers ignores them and so does llmarch",
                differ.join(", ")
            ));
        }
    } else if c.mlp_only_layers.is_some() || c.decoder_sparse_step.is_some() {
        warnings.push(
            "legacy keys `mlp_only_layers`/`decoder_sparse_step` are unreadable; transformers ignores them and so does llmarch".into(),
        );
    }

    let any_sparse = mlp_types.iter().any(|t| t == SPARSE);
    let any_dense = mlp_types.iter().any(|t| t == DENSE);
    let any_sliding = types.iter().any(|t| t == SLIDING);
    let any_full = types.iter().any(|t| t == FULL);
    if any_sparse {
        dim("num_experts", c.num_experts)?;
        dim("moe_intermediate_size", c.moe_intermediate_size)?;
        if c.num_experts_per_tok == 0 || c.num_experts_per_tok > c.num_experts {
            bail!(
                "key `num_experts_per_tok` = {} must be between 1 and num_experts ({})",
                c.num_experts_per_tok,
                c.num_experts
            );
        }
        if c.shared_expert_intermediate_size > MAX_DIM {
            bail!(
                "key `shared_expert_intermediate_size` = {} is implausibly large",
                c.shared_expert_intermediate_size
            );
        }
    }
    if any_dense {
        dim("intermediate_size", c.intermediate_size)?;
    }
    if any_sliding {
        dim("sliding_window", c.sliding_window)?;
    }

    let blocks = resolve_rope(c, any_full, any_sliding, &mut warnings)?;
    let rope_full = match &blocks.full {
        Some(b) => Some(rope_from_params(
            b,
            head_dim,
            "rope_parameters.full_attention",
        )?),
        None => None,
    };
    let rope_sliding = match &blocks.sliding {
        Some(b) => Some(rope_from_params(
            b,
            head_dim,
            "rope_parameters.sliding_attention",
        )?),
        None => None,
    };

    // Parameters, tensor by tensor as `LagunaForCausalLM` builds them (in u128: no overflow).
    let (h, v, hd, kvh) = (
        hidden as u128,
        vocab as u128,
        head_dim as u128,
        kv_heads as u128,
    );
    let bias = |n: u128| if c.attention_bias { n } else { 0 };
    let embedding = v * h;
    let lm_head = if c.tie_word_embeddings { 0 } else { v * h };
    let mut routed: u128 = 0;
    let mut other: u128 = h; // final norm

    let mut layers = Vec::with_capacity(n);
    for i in 0..n {
        let sliding = types[i] == SLIDING;
        let q = heads[i];
        let qh = q as u128;

        let mut lp = h * qh * hd + bias(qh * hd); // q_proj
        lp += 2 * (h * kvh * hd + bias(kvh * hd)); // k_proj, v_proj
        lp += qh * hd * h + bias(h); // o_proj
        lp += 2 * hd; // q_norm, k_norm
        lp += h * if per_head_gate { qh } else { qh * hd }; // g_proj (no bias)
        lp += 2 * h; // input / post-attention norms

        let ffn = if mlp_types[i] == SPARSE {
            let (e, w, sw) = (
                c.num_experts as u128,
                c.moe_intermediate_size as u128,
                c.shared_expert_intermediate_size as u128,
            );
            routed += e * 3 * w * h; // experts.gate_up_proj [E, 2w, h] + down_proj [E, h, w]
            lp += e * h + e; // router weight + e_score_correction_bias (a parameter)
            lp += 3 * h * sw; // shared expert
            Ffn::Moe {
                experts: c.num_experts,
                top_k: c.num_experts_per_tok,
                width: c.moe_intermediate_size,
                shared_width: (c.shared_expert_intermediate_size > 0)
                    .then_some(c.shared_expert_intermediate_size),
                dense_width: None,
                routing: "sigmoid".into(),
            }
        } else {
            lp += 3 * h * c.intermediate_size as u128;
            Ffn::Dense {
                width: c.intermediate_size,
            }
        };
        other += lp;

        let (attention, retention, rope) = if sliding {
            (
                Attention::Sliding {
                    window: c.sliding_window,
                },
                Retention::Window {
                    window: c.sliding_window,
                },
                rope_sliding.clone(),
            )
        } else {
            (Attention::Full, Retention::AllTokens, rope_full.clone())
        };
        let rope = rope.ok_or_else(|| anyhow!("internal: layer {i} has no RoPE block"))?;

        layers.push(LayerSpec {
            index: i,
            attention,
            q_heads: q,
            kv_heads,
            head_dim,
            v_head_dim: head_dim,
            kv_source: None,
            k_eq_v: false,
            rope: Some(rope),
            ffn,
            ple_width: None,
            cache: LayerSpec::kv_parts(kv_heads, head_dim, head_dim, false, retention),
            notes: vec![if per_head_gate {
                "gate per-head".to_string()
            } else {
                "gate per-element".to_string()
            }],
        });
    }

    let params = ParamCounts {
        total: to_u64(embedding + lm_head + routed + other)?,
        embedding: to_u64(embedding)?,
        ple: 0,
        lm_head: to_u64(lm_head)?,
        routed_experts: to_u64(routed)?,
        ..Default::default()
    };
    let (top_k, experts) = if any_sparse {
        (c.num_experts_per_tok, c.num_experts)
    } else {
        (0, 0)
    };

    let mut notes = vec![
        format!(
            "softplus output gate ({})",
            if per_head_gate {
                "per head"
            } else {
                "per element"
            }
        ),
        "QK norm (RMS)".to_string(),
    ];
    if any_sparse {
        let mut s = format!(
            "sigmoid router, bias-corrected top-{}, renormalised, routed ×{}",
            c.num_experts_per_tok, c.moe_routed_scaling_factor
        );
        if c.moe_router_logit_softcapping > 0.0 {
            s.push_str(&format!(
                ", router logit softcap {}",
                c.moe_router_logit_softcapping
            ));
        }
        notes.push(s);
    }

    Ok(ArchSpec {
        family: FAMILY.name,
        model_type: text.model_type.clone(),
        hf_class: "LagunaForCausalLM".into(),
        architecture: text.architecture.clone(),
        hidden_size: hidden,
        vocab_size: vocab,
        max_context: c.max_position_embeddings,
        dtype: text.dtype(),
        tie_word_embeddings: c.tie_word_embeddings,
        params: params.finish(top_k, experts),
        layers,
        notes,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{parse_config, ArchSpec, Attention, Ffn};
    use super::runtime_config;
    use crate::arch::config::{ParseOptions, TextConfig};
    use crate::layers::output_gate::GateGranularity;
    use serde_json::{json, Value};

    const XS2: &str = include_str!("../../../configs/Laguna-XS.2/config.json");

    fn real() -> Value {
        serde_json::from_str(XS2).expect("config parses as JSON")
    }

    fn spec(v: &Value) -> anyhow::Result<ArchSpec> {
        parse_config(v, &ParseOptions::default())
    }

    fn err(v: &Value) -> String {
        match spec(v) {
            Ok(_) => panic!("expected an error"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn real_config_layers() {
        let s = spec(&real()).unwrap();
        assert_eq!(s.family, "laguna");
        assert_eq!(s.layers.len(), 40);
        for l in &s.layers {
            assert_eq!(l.kv_heads, 8);
            assert_eq!(l.head_dim, 128);
            if l.index % 4 == 0 {
                assert_eq!(l.attention, Attention::Full);
                assert_eq!(l.q_heads, 48);
                assert_eq!(l.group_size(), 6.0);
                let r = l.rope.as_ref().unwrap();
                assert_eq!(
                    (r.kind.as_str(), r.rotary_dim, r.factor),
                    ("yarn", 64, Some(32.0))
                );
            } else {
                assert_eq!(l.attention, Attention::Sliding { window: 512 });
                assert_eq!(l.q_heads, 64);
                assert_eq!(l.group_size(), 8.0);
                let r = l.rope.as_ref().unwrap();
                assert_eq!(
                    (r.kind.as_str(), r.rotary_dim, r.theta),
                    ("default", 128, 10_000.0)
                );
            }
            // K and V of 8 × 128 per token.
            let elems: u64 = l.cache.iter().map(|p| p.elems_per_entry).sum();
            assert_eq!(elems, 2 * 8 * 128);
            assert_eq!(l.notes, vec!["gate per-head".to_string()]);
        }
        assert_eq!(s.layers[0].ffn, Ffn::Dense { width: 8192 });
        match &s.layers[1].ffn {
            Ffn::Moe {
                experts,
                top_k,
                width,
                shared_width,
                ..
            } => assert_eq!(
                (*experts, *top_k, *width, *shared_width),
                (256, 8, 512, Some(512))
            ),
            f => panic!("layer 1 should be MoE, got {f:?}"),
        }
        // The legacy keys agree with mlp_layer_types: no warning.
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    #[test]
    fn real_config_params_match_reference() {
        let s = spec(&real()).unwrap();
        // tests/fixtures/reference_params.json, "Laguna-XS.2".
        assert_eq!(s.params.total, 33_442_617_088);
        assert_eq!(s.params.embedding, 205_520_896);
        assert_eq!(s.params.lm_head, 205_520_896);
        assert_eq!(s.params.routed_experts, 31_406_948_352);
        let active = s.params.active as f64 / 1e9;
        assert!((active - 3.02).abs() < 0.005, "active {active}");
    }

    #[test]
    fn per_element_gate_changes_params() {
        let mut v = real();
        v["gating"] = json!("per-element");
        let s = spec(&v).unwrap();
        // g_proj grows from q to q × head_dim outputs on every layer.
        let heads: u64 = 10 * 48 + 30 * 64;
        assert_eq!(s.params.total, 33_442_617_088 + 2048 * heads * 127);
        assert_eq!(s.layers[0].notes, vec!["gate per-element".to_string()]);
        v["gating"] = json!(true);
        assert_eq!(spec(&v).unwrap().params.total, 33_442_617_088);
        v["gating"] = json!(false);
        let s = spec(&v).unwrap();
        assert_eq!(s.params.total, 33_442_617_088 + 2048 * heads * 127);
        assert!(s.warnings.iter().any(|w| w.contains("gating")));
        v["gating"] = json!("per_head");
        assert!(err(&v).contains("`gating`"));
    }

    #[test]
    fn tiny_variants_match_reference() {
        // Totals measured with transformers 5.23.0 on the meta device for the real config shrunk.
        let tiny = |f: &dyn Fn(&mut Value)| {
            let mut v = real();
            for (k, x) in [
                ("num_hidden_layers", 4),
                ("hidden_size", 64),
                ("intermediate_size", 128),
                ("num_experts", 4),
                ("num_experts_per_tok", 2),
                ("moe_intermediate_size", 32),
                ("shared_expert_intermediate_size", 32),
                ("vocab_size", 100),
                ("head_dim", 16),
                ("num_attention_heads", 4),
                ("num_key_value_heads", 2),
            ] {
                v[k] = json!(x);
            }
            v["layer_types"] = json!([
                "full_attention",
                "sliding_attention",
                "sliding_attention",
                "sliding_attention"
            ]);
            v["mlp_layer_types"] = json!(["dense", "sparse", "sparse", "sparse"]);
            v["num_attention_heads_per_layer"] = json!([4, 8, 8, 8]);
            f(&mut v);
            spec(&v).unwrap().params.total
        };
        assert_eq!(tiny(&|_| {}), 206_540);
        assert_eq!(tiny(&|v| v["gating"] = json!("per-element")), 233_420);
        assert_eq!(tiny(&|v| v["attention_bias"] = json!(true)), 207_500);
    }

    #[test]
    fn head_list_of_wrong_length() {
        let mut v = real();
        v["num_attention_heads_per_layer"]
            .as_array_mut()
            .unwrap()
            .pop();
        let e = err(&v);
        assert!(e.contains("num_attention_heads_per_layer"), "{e}");
        assert!(e.contains("39") && e.contains("40"), "{e}");
    }

    #[test]
    fn heads_not_divisible() {
        let mut v = real();
        v["num_attention_heads_per_layer"][5] = json!(60);
        let e = err(&v);
        assert!(e.contains("layer 5"), "{e}");
    }

    #[test]
    fn bad_layer_lists() {
        let mut v = real();
        v["layer_types"][3] = json!("chunked_attention");
        assert!(err(&v).contains("layer_types[3]"));
        let mut v = real();
        v["mlp_layer_types"][7] = json!("moe");
        assert!(err(&v).contains("mlp_layer_types[7]"));
        let mut v = real();
        v["mlp_layer_types"]
            .as_array_mut()
            .unwrap()
            .push(json!("dense"));
        assert!(err(&v).contains("mlp_layer_types"));
        let mut v = real();
        v["layer_types"].as_array_mut().unwrap().pop();
        assert!(err(&v).contains("layer_types"));
    }

    #[test]
    fn router_weight_on_input_is_refused() {
        let mut v = real();
        v["moe_apply_router_weight_on_input"] = json!(true);
        assert!(err(&v).contains("moe_apply_router_weight_on_input"));
    }

    #[test]
    fn bad_moe_and_window() {
        let mut v = real();
        v["num_experts_per_tok"] = json!(300);
        assert!(err(&v).contains("num_experts_per_tok"));
        let mut v = real();
        v["sliding_window"] = json!(null);
        assert!(err(&v).contains("sliding_window"));
        let mut v = real();
        v["sliding_window"] = json!(0);
        assert!(err(&v).contains("sliding_window"));
        let mut v = real();
        v["hidden_act"] = json!("gelu");
        assert!(err(&v).contains("hidden_act"));
        let mut v = real();
        v["head_dim"] = json!(null);
        assert!(err(&v).contains("head_dim"));
    }

    #[test]
    fn legacy_keys_contradicting_mlp_layer_types_warn() {
        let mut v = real();
        v["mlp_only_layers"] = json!([0, 1]);
        let s = spec(&v).unwrap();
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("mlp_only_layers") && w.contains("layers 1")),
            "{:?}",
            s.warnings
        );
        let mut v = real();
        v["decoder_sparse_step"] = json!(2);
        let s = spec(&v).unwrap();
        assert!(s.warnings.iter().any(|w| w.contains("decoder_sparse_step")));
        // Parameters follow mlp_layer_types, as in the reference.
        assert_eq!(s.params.total, 33_442_617_088);
    }

    #[test]
    fn unknown_key_is_refused() {
        let mut v = real();
        v["attention_sink"] = json!(true);
        assert!(err(&v).contains("attention_sink"));
    }

    #[test]
    fn rope_defaults_when_absent() {
        let mut v = real();
        v.as_object_mut().unwrap().remove("rope_parameters");
        let s = spec(&v).unwrap();
        let full = s.layers[0].rope.as_ref().unwrap();
        assert_eq!(
            (full.kind.as_str(), full.theta, full.rotary_dim),
            ("default", 500_000.0, 64)
        );
        let sl = s.layers[1].rope.as_ref().unwrap();
        assert_eq!((sl.theta, sl.rotary_dim), (10_000.0, 128));
    }

    #[test]
    fn rope_flat_with_swa_block() {
        let mut v = real();
        let full = v["rope_parameters"]["full_attention"].clone();
        let sliding = v["rope_parameters"]["sliding_attention"].clone();
        v["rope_parameters"] = full;
        v["swa_rope_parameters"] = sliding;
        let s = spec(&v).unwrap();
        assert_eq!(s.layers[0].rope.as_ref().unwrap().kind, "yarn");
        assert_eq!(s.layers[1].rope.as_ref().unwrap().rotary_dim, 128);
        assert!(s.warnings.iter().any(|w| w.contains("flat")));
        // Without the sliding block the sliding layers have no RoPE.
        v.as_object_mut().unwrap().remove("swa_rope_parameters");
        assert!(err(&v).contains("swa_rope_parameters"));
    }

    #[test]
    fn rope_top_level_original_max_is_refused() {
        // Form (c): the reference rejects a YaRN block without its own original_max_position_embeddings.
        let mut v = real();
        let omp = v["rope_parameters"]["full_attention"]
            .as_object_mut()
            .unwrap()
            .remove("original_max_position_embeddings")
            .unwrap();
        v["rope_parameters"]["original_max_position_embeddings"] = omp;
        let e = err(&v);
        assert!(
            e.contains("rope_parameters.full_attention.original_max_position_embeddings"),
            "{e}"
        );
    }

    #[test]
    fn rope_missing_or_bad_blocks() {
        let mut v = real();
        v["rope_parameters"]
            .as_object_mut()
            .unwrap()
            .remove("sliding_attention");
        assert!(err(&v).contains("rope_parameters.sliding_attention"));
        let mut v = real();
        v["rope_parameters"]["sliding_attention"] = json!(null);
        assert!(err(&v).contains("rope_parameters.sliding_attention"));
        let mut v = real();
        v["rope_parameters"]["sliding_attention"]
            .as_object_mut()
            .unwrap()
            .remove("rope_theta");
        assert!(err(&v).contains("rope_parameters.sliding_attention.rope_theta"));
        let mut v = real();
        v["rope_parameters"]["full_attention"]["rope_type"] = json!("foo");
        assert!(err(&v).contains("rope_parameters.full_attention.rope_type"));
        // A missing rope_type means `default`, as in the reference.
        let mut v = real();
        v["rope_parameters"]["sliding_attention"]
            .as_object_mut()
            .unwrap()
            .remove("rope_type");
        assert!(spec(&v).is_ok());
    }

    #[test]
    fn yarn_truncate_is_read_from_the_top_level() {
        let mut v = real();
        v["rope_parameters"]["truncate"] = json!(false);
        let s = spec(&v).unwrap();
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        let text = TextConfig::from_raw(&v, &ParseOptions::default()).unwrap();
        let top = runtime_config(&text).unwrap();
        let mut v = real();
        v["rope_parameters"]["full_attention"]["truncate"] = json!(false);
        let s = spec(&v).unwrap();
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("rope_parameters.full_attention.truncate")),
            "{:?}",
            s.warnings
        );
        let text = TextConfig::from_raw(&v, &ParseOptions::default()).unwrap();
        let block = runtime_config(&text).unwrap();
        let text = TextConfig::from_raw(&real(), &ParseOptions::default()).unwrap();
        let plain = runtime_config(&text).unwrap();
        // The block's own `truncate` changes nothing; the top-level one does.
        assert_eq!(block.rope_full, plain.rope_full);
        assert_ne!(top.rope_full, plain.rope_full);
    }

    #[test]
    fn runtime_config_of_the_real_model() {
        let text = TextConfig::from_raw(&real(), &ParseOptions::default()).unwrap();
        let c = runtime_config(&text).unwrap();
        assert_eq!(c.gate, GateGranularity::PerHead);
        assert_eq!(c.moe_routed_scaling_factor, 2.5);
        assert_eq!(c.moe_router_logit_softcapping, None);
        assert_eq!(c.max_positions_limit(), None);
        let full = c.rope_full.unwrap();
        assert_eq!((full.kind.as_str(), full.inv_freq.len()), ("yarn", 32));
        assert_eq!(full.attention_scaling, 1.0);
        assert_eq!(c.rope_sliding.unwrap().inv_freq.len(), 64);
    }

    #[test]
    fn rope_scaling_replaces_rope_parameters() {
        let mut v = real();
        v["rope_scaling"] = json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4});
        v["swa_rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e4});
        let s = spec(&v).unwrap();
        assert_eq!(s.layers[0].rope.as_ref().unwrap().kind, "linear");
        assert!(s.warnings.iter().any(|w| w.contains("rope_scaling")));
    }

    #[test]
    fn all_full_needs_no_sliding_block() {
        let mut v = real();
        v["layer_types"] = json!(vec!["full_attention"; 40]);
        v["rope_parameters"]
            .as_object_mut()
            .unwrap()
            .remove("sliding_attention");
        let s = spec(&v).unwrap();
        assert!(s.layers.iter().all(|l| l.attention == Attention::Full));
    }
}

#[cfg(test)]
mod bounds_tests {
    use crate::arch::config::bounds_test::{real, refuses_past_bound};

    #[test]
    fn sizes_past_the_bounds_are_refused_by_key() {
        let raw = real("Laguna-XS.2");
        for path in [
            &["num_hidden_layers"][..],
            &["head_dim"],
            &["hidden_size"],
            &["num_attention_heads_per_layer", "3"],
            &["num_experts"],
            &["num_experts_per_tok"],
            &["moe_intermediate_size"],
            &["shared_expert_intermediate_size"],
            &["sliding_window"],
            &["max_position_embeddings"],
        ] {
            refuses_past_bound(&raw, path);
        }
    }
}
