//! The Gemma 4 layer schedule → [`ArchSpec`]: which layers slide and which attend in full, the
//! full layers' own geometry, which layers read an earlier layer's cache, RoPE per layer type,
//! the MoE block and the per-layer embeddings.

use super::config::{
    check_supported, read_per_layer_config, Gemma4TextConfig, LayerOverride, FULL, HARMLESS,
    SLIDING,
};
use super::{params, FAMILY};
use crate::arch::config::{check_heads, check_len, positive, rope_from_params, TextConfig};
use crate::arch::{ArchSpec, Attention, Ffn, LayerSpec, Retention, Routing};
use anyhow::{bail, Result};
use serde_json::{Map, Value};

/// The MoE block beside the dense MLP (26B-A4B), the same in every layer.
#[derive(Debug, Clone, Copy)]
struct MoeBlock {
    experts: usize,
    top_k: usize,
    width: usize,
}

pub(super) fn arch_spec(text: &TextConfig, c: &Gemma4TextConfig) -> Result<ArchSpec> {
    let p = text.key_prefix();
    let mut warnings = text.check_unknown_keys(&c.rest, HARMLESS)?;
    let layers = positive(&format!("{p}num_hidden_layers"), c.num_hidden_layers)?;
    let hidden = positive(&format!("{p}hidden_size"), c.hidden_size)?;
    check_supported(c, p)?;

    let types = layer_types(c, layers, p, &mut warnings)?;
    let overrides = full_layer_overrides(c, &types, p)?;
    if c.num_kv_shared_layers >= layers {
        bail!(
            "key `{p}num_kv_shared_layers` = {} leaves no layer to own a KV cache ({layers} layers)",
            c.num_kv_shared_layers
        );
    }
    let rope_params = rope_parameters(c);
    let moe = moe_block(c, p)?;

    let mut table = Vec::with_capacity(layers);
    for (i, ty) in types.iter().enumerate() {
        let sliding = ty == SLIDING;
        let o = overrides[i];
        let head_dim = o.head_dim.unwrap_or(c.head_dim);
        let kv_heads = o.num_key_value_heads.unwrap_or(c.num_key_value_heads);
        check_heads(i, c.num_attention_heads, kv_heads)?;
        let k_eq_v = c.attention_k_eq_v && !sliding;
        let kv_source = kv_donor(c, &types, i, p)?;
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
            Some(m) => Ffn::Moe {
                experts: m.experts,
                top_k: m.top_k,
                width: m.width,
                shared_width: None,
                dense_width: Some(width),
                routing: Routing::Softmax,
            },
            None => Ffn::Dense { width },
        };
        let ple = c.hidden_size_per_layer_input;
        table.push(LayerSpec {
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
    let params = params::count(c, &table)?;
    let (top_k, experts) = moe.map_or((0, 0), |m| (m.top_k, m.experts));

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
        layers: table,
        notes: model_notes(c, layers),
        warnings,
    })
}

/// Each layer's type: default 5 sliding : 1 full; the reference forces the last layer to full.
fn layer_types(
    c: &Gemma4TextConfig,
    layers: usize,
    p: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<String>> {
    let mut types = c.layer_types.clone().unwrap_or_else(|| {
        (0..layers)
            .map(|i| if (i + 1) % 6 != 0 { SLIDING } else { FULL }.to_string())
            .collect()
    });
    check_len(&format!("{p}layer_types"), &types, layers)?;
    for (i, t) in types.iter().enumerate() {
        if t != SLIDING && t != FULL {
            bail!("key `{p}layer_types[{i}]` = `{t}`: Gemma 4 layers are `{SLIDING}` or `{FULL}`");
        }
    }
    let last = layers - 1;
    if types[last] != FULL {
        warnings.push(format!(
            "layer {last}: the reference forces the last layer to full attention (config says `{}`)",
            types[last]
        ));
        types[last] = FULL.to_string();
    }
    Ok(types)
}

/// Full-layer geometry: `per_layer_config` (5.23) or the pre-5.23 keys.
fn full_layer_overrides(
    c: &Gemma4TextConfig,
    types: &[String],
    p: &str,
) -> Result<Vec<LayerOverride>> {
    if let Some(v) = &c.per_layer_config {
        return read_per_layer_config(v, types.len(), p);
    }
    let global_kv = if c.attention_k_eq_v {
        c.num_global_key_value_heads
    } else {
        None
    };
    Ok(types
        .iter()
        .map(|ty| {
            if ty == FULL {
                LayerOverride {
                    head_dim: Some(c.global_head_dim.unwrap_or(512)),
                    num_key_value_heads: global_kv,
                }
            } else {
                LayerOverride::default()
            }
        })
        .collect())
}

/// KV sharing: the last `num_kv_shared_layers` layers read the last earlier non-shared layer of
/// the same type; `None` for a layer that owns its cache.
fn kv_donor(c: &Gemma4TextConfig, types: &[String], i: usize, p: &str) -> Result<Option<usize>> {
    let first_shared = types.len() - c.num_kv_shared_layers;
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
}

/// `rope_parameters` keyed by layer type, or the reference's default blocks.
fn rope_parameters(c: &Gemma4TextConfig) -> Map<String, Value> {
    c.rope_parameters.clone().unwrap_or_else(|| {
        serde_json::json!({
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        })
        .as_object()
        .cloned()
        .unwrap_or_default()
    })
}

/// The MoE block, when `enable_moe_block` is set: its three keys are then required.
fn moe_block(c: &Gemma4TextConfig, p: &str) -> Result<Option<MoeBlock>> {
    if !c.enable_moe_block {
        return Ok(None);
    }
    let required = |value: Option<usize>, k: &str| {
        value.ok_or_else(|| {
            anyhow::anyhow!("key `{p}{k}` is required when enable_moe_block is true")
        })
    };
    let experts = required(c.num_experts, "num_experts")?;
    let top_k = required(c.top_k_experts, "top_k_experts")?;
    let width = required(c.moe_intermediate_size, "moe_intermediate_size")?;
    if top_k == 0 || top_k > experts {
        bail!("key `{p}top_k_experts` = {top_k} must be between 1 and num_experts ({experts})");
    }
    Ok(Some(MoeBlock {
        experts,
        top_k,
        width,
    }))
}

/// Model-wide facts worth printing.
fn model_notes(c: &Gemma4TextConfig, layers: usize) -> Vec<String> {
    let mut notes = vec![];
    if let Some(cap) = c.final_logit_softcapping {
        notes.push(format!("final logit softcap {cap}"));
    }
    let ple = c.hidden_size_per_layer_input;
    if ple > 0 {
        notes.push(format!("per-layer embeddings: {ple} per layer"));
    }
    if c.num_kv_shared_layers > 0 {
        notes.push(format!(
            "KV sharing: layers {}-{} read earlier layers' caches",
            layers - c.num_kv_shared_layers,
            layers - 1
        ));
    }
    notes
}
