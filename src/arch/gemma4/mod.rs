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
//! This file is the config half (config → [`ArchSpec`] and the few model-wide numbers the
//! network needs, [`RuntimeConfig`]); [`model`] is the network built from them.

pub mod model;

use super::config::{
    check_heads, check_len, default_count, default_true, positive, rope_from_params, to_u64,
    TextConfig,
};
use super::{ArchSpec, Attention, Family, Ffn, LayerSpec, ParamCounts, Retention};
use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::{Map, Value};

pub const FAMILY: Family = Family {
    name: "gemma4",
    model_types: &["gemma4_text", "gemma4"],
    architectures: &["Gemma4ForCausalLM", "Gemma4ForConditionalGeneration"],
    summary: "cross-layer KV sharing, per-layer embeddings, sliding + 512-d full layers, K=V, MoE beside a dense MLP",
    parse: |text| Ok(parse(text)?.0),
    build: Some(|raw, opts, vb, lm_head| {
        Ok(Box::new(model::Gemma4Model::from_config(
            raw, opts, vb, lm_head,
        )?))
    }),
    rename: None,
};

/// `Gemma4TextConfig` with the reference's defaults.
#[derive(Debug, Deserialize)]
struct Gemma4TextConfig {
    #[serde(default = "default_count::<262_144>")]
    vocab_size: usize,
    #[serde(default = "default_count::<2304>")]
    hidden_size: usize,
    #[serde(default = "default_count::<9216>")]
    intermediate_size: usize,
    #[serde(default = "default_count::<30>")]
    num_hidden_layers: usize,
    #[serde(default = "default_count::<8>")]
    num_attention_heads: usize,
    #[serde(default = "default_count::<4>")]
    num_key_value_heads: usize,
    #[serde(default = "default_count::<256>")]
    head_dim: usize,
    #[serde(default = "default_activation")]
    hidden_activation: String,
    #[serde(default = "default_count::<131_072>")]
    max_position_embeddings: usize,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_true")]
    tie_word_embeddings: bool,
    rope_parameters: Option<Map<String, Value>>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default = "default_count::<512>")]
    sliding_window: usize,
    layer_types: Option<Vec<String>>,
    final_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<String>,
    #[serde(default = "default_count::<262_144>")]
    vocab_size_per_layer_input: usize,
    #[serde(default = "default_count::<256>")]
    hidden_size_per_layer_input: usize,
    #[serde(default)]
    attention_k_eq_v: bool,
    #[serde(default)]
    num_kv_shared_layers: usize,
    #[serde(default)]
    enable_moe_block: bool,
    #[serde(default)]
    use_double_wide_mlp: bool,
    num_experts: Option<usize>,
    top_k_experts: Option<usize>,
    moe_intermediate_size: Option<usize>,
    /// Older hub files carry this as `null`; a value would be an unknown expert layout.
    expert_intermediate_size: Option<usize>,
    /// Pre-5.23 form, folded into `per_layer_config` by the reference.
    global_head_dim: Option<usize>,
    num_global_key_value_heads: Option<usize>,
    /// 5.23 form: layer index → overrides (`head_dim`, `num_key_value_heads`).
    per_layer_config: Option<Value>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

fn default_activation() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_rms_eps() -> f64 {
    1e-6
}

/// Keys Gemma 4 configs carry that do not change the text model.
const HARMLESS: &[&str] = &["vision_soft_tokens_per_image"];

const SLIDING: &str = "sliding_attention";
const FULL: &str = "full_attention";

/// Per-layer overrides from `per_layer_config` (either a map keyed by index or a list).
#[derive(Debug, Default, Clone, Copy)]
struct LayerOverride {
    head_dim: Option<usize>,
    num_key_value_heads: Option<usize>,
}

fn read_per_layer_config(v: &Value, layers: usize, prefix: &str) -> Result<Vec<LayerOverride>> {
    let mut out = vec![LayerOverride::default(); layers];
    let mut set = |idx: usize, o: &Value| -> Result<()> {
        if idx >= layers {
            bail!("key `{prefix}per_layer_config`: layer {idx} does not exist ({layers} layers)");
        }
        let Some(obj) = o.as_object() else {
            if o.is_null() {
                return Ok(());
            }
            bail!("key `{prefix}per_layer_config.{idx}` is not an object");
        };
        for (k, val) in obj {
            let n = || -> Result<usize> {
                val.as_u64().map(|n| n as usize).ok_or_else(|| {
                    anyhow::anyhow!("key `{prefix}per_layer_config.{idx}.{k}` is not a count")
                })
            };
            match k.as_str() {
                "head_dim" => out[idx].head_dim = Some(n()?),
                "num_key_value_heads" => out[idx].num_key_value_heads = Some(n()?),
                other => bail!(
                    "key `{prefix}per_layer_config.{idx}.{other}`: llmarch does not know this per-layer override"
                ),
            }
        }
        Ok(())
    };
    match v {
        Value::Object(map) => {
            for (k, o) in map {
                let idx: usize = k.parse().map_err(|_| {
                    anyhow::anyhow!("key `{prefix}per_layer_config`: `{k}` is not a layer index")
                })?;
                set(idx, o)?;
            }
        }
        Value::Array(list) => {
            check_len(&format!("{prefix}per_layer_config"), list, layers)?;
            for (idx, o) in list.iter().enumerate() {
                set(idx, o)?;
            }
        }
        Value::Null => {}
        _ => bail!("key `{prefix}per_layer_config` is neither an object nor a list"),
    }
    Ok(out)
}

/// The model-wide numbers the network needs beyond the per-layer table.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    pub rms_norm_eps: f64,
    /// `tanh` cap on the final logits, if any.
    pub final_logit_softcapping: Option<f64>,
    /// Biases on the q/k/v/o projections.
    pub attention_bias: bool,
    /// Rows of the per-layer-embedding table (PLE models).
    pub vocab_size_per_layer_input: usize,
}

/// Validate and read the [`RuntimeConfig`] of a Gemma 4 text config (part of [`parse`]).
fn runtime_config_of(c: &Gemma4TextConfig, text: &TextConfig) -> Result<RuntimeConfig> {
    let p = text.key_prefix();
    if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps >= 0.0) {
        bail!(
            "key `{p}rms_norm_eps` = {} must be a number ≥ 0",
            c.rms_norm_eps
        );
    }
    if let Some(cap) = c.final_logit_softcapping {
        if !(cap.is_finite() && cap > 0.0) {
            bail!("key `{p}final_logit_softcapping` = {cap} must be a positive number");
        }
    }
    Ok(RuntimeConfig {
        rms_norm_eps: c.rms_norm_eps,
        final_logit_softcapping: c.final_logit_softcapping,
        attention_bias: c.attention_bias,
        vocab_size_per_layer_input: c.vocab_size_per_layer_input,
    })
}

/// Read a Gemma 4 text config once into its [`ArchSpec`] and the [`RuntimeConfig`] its network
/// needs, both validated: every command (`inspect`, `kv-budget`, `run`) gives the same verdict.
pub fn parse(text: &TextConfig) -> Result<(ArchSpec, RuntimeConfig)> {
    let c: Gemma4TextConfig = text.parse()?;
    let spec = arch_spec(text, &c)?;
    let runtime = runtime_config_of(&c, text)?;
    Ok((spec, runtime))
}

fn arch_spec(text: &TextConfig, c: &Gemma4TextConfig) -> Result<ArchSpec> {
    let p = text.key_prefix();
    let mut warnings = text.check_unknown_keys(&c.rest, HARMLESS)?;
    let n = positive(&format!("{p}num_hidden_layers"), c.num_hidden_layers)?;
    let hidden = positive(&format!("{p}hidden_size"), c.hidden_size)?;

    if c.use_bidirectional_attention.as_deref() == Some("all") {
        bail!("key `{p}use_bidirectional_attention` = \"all\" (a bidirectional encoder) is not supported; llmarch runs causal text models");
    }
    if c.expert_intermediate_size.is_some() {
        bail!("key `{p}expert_intermediate_size` is set; the reference reads `moe_intermediate_size` and llmarch does not know this layout");
    }
    if c.hidden_activation != "gelu_pytorch_tanh" {
        bail!(
            "key `{p}hidden_activation` = `{}` is not supported (Gemma 4 uses gelu_pytorch_tanh)",
            c.hidden_activation
        );
    }

    // Layer types: default 5 sliding : 1 full; the reference forces the last layer to full.
    let mut types = c.layer_types.clone().unwrap_or_else(|| {
        (0..n)
            .map(|i| if (i + 1) % 6 != 0 { SLIDING } else { FULL }.to_string())
            .collect()
    });
    check_len(&format!("{p}layer_types"), &types, n)?;
    for (i, t) in types.iter().enumerate() {
        if t != SLIDING && t != FULL {
            bail!("key `{p}layer_types[{i}]` = `{t}`: Gemma 4 layers are `{SLIDING}` or `{FULL}`");
        }
    }
    if types[n - 1] != FULL {
        warnings.push(format!(
            "layer {}: the reference forces the last layer to full attention (config says `{}`)",
            n - 1,
            types[n - 1]
        ));
        types[n - 1] = FULL.to_string();
    }

    // Full-layer geometry: `per_layer_config` (5.23) or the pre-5.23 keys.
    let overrides = match &c.per_layer_config {
        Some(v) => read_per_layer_config(v, n, p)?,
        None => {
            let global_kv = if c.attention_k_eq_v {
                c.num_global_key_value_heads
            } else {
                None
            };
            (0..n)
                .map(|i| {
                    if types[i] == FULL {
                        LayerOverride {
                            head_dim: Some(c.global_head_dim.unwrap_or(512)),
                            num_key_value_heads: global_kv,
                        }
                    } else {
                        LayerOverride::default()
                    }
                })
                .collect()
        }
    };

    // KV sharing: the last `num_kv_shared_layers` layers read the last earlier non-shared layer
    // of the same type.
    if c.num_kv_shared_layers >= n {
        bail!(
            "key `{p}num_kv_shared_layers` = {} leaves no layer to own a KV cache ({n} layers)",
            c.num_kv_shared_layers
        );
    }
    let first_shared = n - c.num_kv_shared_layers;
    let donor_of = |i: usize| -> Result<Option<usize>> {
        if i < first_shared {
            return Ok(None);
        }
        match (0..first_shared).rev().find(|&j| types[j] == types[i]) {
            Some(j) => Ok(Some(j)),
            None => bail!(
                "layer {i}: shares KV with an earlier `{}` layer, but layers 0-{} have none \
                 (key `{p}num_kv_shared_layers` = {} is too large)",
                types[i],
                first_shared - 1,
                c.num_kv_shared_layers
            ),
        }
    };

    let rope_params = c.rope_parameters.clone().unwrap_or_else(|| {
        serde_json::json!({
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        })
        .as_object()
        .cloned()
        .unwrap_or_default()
    });

    let moe = if c.enable_moe_block {
        let key = |k: &str| format!("{p}{k}");
        let experts = c.num_experts.ok_or_else(|| {
            anyhow::anyhow!(
                "key `{}` is required when enable_moe_block is true",
                key("num_experts")
            )
        })?;
        let top_k = c.top_k_experts.ok_or_else(|| {
            anyhow::anyhow!(
                "key `{}` is required when enable_moe_block is true",
                key("top_k_experts")
            )
        })?;
        let width = c.moe_intermediate_size.ok_or_else(|| {
            anyhow::anyhow!(
                "key `{}` is required when enable_moe_block is true",
                key("moe_intermediate_size")
            )
        })?;
        if top_k == 0 || top_k > experts {
            bail!(
                "key `{}` = {top_k} must be between 1 and num_experts ({experts})",
                key("top_k_experts")
            );
        }
        Some((experts, top_k, width))
    } else {
        None
    };

    // Parameters in u128: the bounds on each key do not keep their products inside u64.
    let ple = c.hidden_size_per_layer_input;
    let bias = |n: u128| if c.attention_bias { n } else { 0 };
    let (h, v) = (hidden as u128, c.vocab_size as u128);
    let embedding = v * h;
    let ple_table = c.vocab_size_per_layer_input as u128 * (n * ple) as u128;
    let lm_head = if c.tie_word_embeddings { 0 } else { v * h };
    let mut routed: u128 = 0;
    // Final norm, and the PLE projection + its norm.
    let mut other = h;
    if ple > 0 {
        other += h * (n * ple) as u128 + ple as u128;
    }

    let mut layers = Vec::with_capacity(n);
    for (i, ty) in types.iter().enumerate() {
        let sliding = ty == SLIDING;
        let o = overrides[i];
        let head_dim = o.head_dim.unwrap_or(c.head_dim);
        let kv_heads = o.num_key_value_heads.unwrap_or(c.num_key_value_heads);
        check_heads(i, c.num_attention_heads, kv_heads)?;
        let k_eq_v = c.attention_k_eq_v && !sliding;
        let kv_source = donor_of(i)?;
        let attention = if sliding {
            Attention::Sliding {
                window: positive(&format!("{p}sliding_window"), c.sliding_window)?,
            }
        } else {
            Attention::Full
        };
        let retention = if sliding {
            Retention::Window {
                window: c.sliding_window,
            }
        } else {
            Retention::AllTokens
        };
        let rope_block = rope_params
            .get(ty.as_str())
            .ok_or_else(|| anyhow::anyhow!("key `{p}rope_parameters.{ty}` is missing"))?;
        let rope = rope_from_params(rope_block, head_dim, &format!("{p}rope_parameters.{ty}"))?;
        let double = c.use_double_wide_mlp && kv_source.is_some();
        let width = c.intermediate_size * if double { 2 } else { 1 };
        let ffn = match moe {
            Some((experts, top_k, w)) => Ffn::Moe {
                experts,
                top_k,
                width: w,
                shared_width: None,
                dense_width: Some(width),
                routing: "softmax".into(),
            },
            None => Ffn::Dense { width },
        };

        // Parameters, as `Gemma4TextDecoderLayer` builds them.
        let (q, kvh, hd) = (
            c.num_attention_heads as u128,
            kv_heads as u128,
            head_dim as u128,
        );
        let mut lp = h * q * hd + bias(q * hd) + hd; // q_proj (+bias), q_norm
        lp += q * hd * h + bias(h); // o_proj
        if kv_source.is_none() {
            lp += h * kvh * hd + bias(kvh * hd) + hd; // k_proj, k_norm (v_norm has no scale)
            if !k_eq_v {
                lp += h * kvh * hd + bias(kvh * hd); // v_proj
            }
        }
        lp += 3 * h * width as u128 + 4 * h; // gate/up/down, four norms
        if ple > 0 {
            lp += 2 * h * ple as u128 + h; // gate, projection, norm
        }
        if let Some((experts, _, w)) = moe {
            let (e, w) = (experts as u128, w as u128);
            lp += h * e + h + e; // router proj, scale, per-expert scale
            lp += 3 * h; // the MoE block's three extra norms
            routed += e * 3 * w * h;
        }
        other += lp;

        layers.push(LayerSpec {
            index: i,
            attention,
            q_heads: c.num_attention_heads,
            kv_heads,
            head_dim,
            v_head_dim: head_dim,
            kv_source,
            k_eq_v,
            rope: Some(rope),
            ffn,
            ple_width: (ple > 0).then_some(ple),
            cache: if kv_source.is_some() {
                vec![]
            } else {
                LayerSpec::kv_parts(kv_heads, head_dim, head_dim, k_eq_v, retention)
            },
            notes: vec![],
        });
    }
    let params = ParamCounts {
        total: to_u64(embedding + ple_table + lm_head + routed + other)?,
        embedding: to_u64(embedding)?,
        ple: to_u64(ple_table)?,
        lm_head: to_u64(lm_head)?,
        routed_experts: to_u64(routed)?,
        ..Default::default()
    };
    let (top_k, experts) = moe.map_or((0, 0), |(e, k, _)| (k, e));

    let mut notes = vec![];
    if let Some(cap) = c.final_logit_softcapping {
        notes.push(format!("final logit softcap {cap}"));
    }
    if ple > 0 {
        notes.push(format!("per-layer embeddings: {ple} per layer"));
    }
    if c.num_kv_shared_layers > 0 {
        notes.push(format!(
            "KV sharing: layers {first_shared}-{} read earlier layers' caches",
            n - 1
        ));
    }

    Ok(ArchSpec {
        family: FAMILY.name,
        model_type: text.model_type.clone(),
        hf_class: "Gemma4ForCausalLM".into(),
        architecture: text.architecture.clone(),
        hidden_size: hidden,
        vocab_size: c.vocab_size,
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
    use crate::arch::config::bounds_test::{real, refuses_past_bound};

    /// Sizes past the bounds are refused with the key named, before any per-layer table or
    /// RoPE table is built (2^40 layers or a 2^40-wide head would abort on the allocation).
    #[test]
    fn sizes_past_the_bounds_are_refused_by_key() {
        for name in ["gemma-4-E2B-it", "gemma-4-26B-A4B-it"] {
            let raw = real(name);
            for key in [
                "num_hidden_layers",
                "head_dim",
                "global_head_dim",
                "hidden_size",
                "vocab_size",
                "sliding_window",
                "max_position_embeddings",
                "num_key_value_heads",
                "hidden_size_per_layer_input",
            ] {
                refuses_past_bound(&raw, &["text_config", key]);
            }
        }
        let moe = real("gemma-4-26B-A4B-it");
        for key in ["num_experts", "top_k_experts", "moe_intermediate_size"] {
            refuses_past_bound(&moe, &["text_config", key]);
        }
    }
}
