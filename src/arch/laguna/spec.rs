//! The Laguna layer schedule → [`ArchSpec`]: each layer's attention type, query heads and MLP
//! type (dense or sparse), the sizes the layers in use need, and each layer type's RoPE.

use super::config::{
    check_supported, legacy_sparse_layers, read_gating, LagunaConfig, DENSE, FULL, HARMLESS,
    SLIDING, SPARSE,
};
use super::rope::resolve_rope;
use super::{params, FAMILY};
use crate::arch::config::{
    check_heads, check_len, dim, layers_count, rope_from_params, TextConfig, MAX_DIM,
};
use crate::arch::{ArchSpec, Attention, Ffn, LayerSpec, Retention, Rope, Routing};
use anyhow::{anyhow, bail, Result};

/// The per-layer lists, with the reference's defaults.
struct Schedule {
    /// `sliding_attention` or `full_attention`.
    types: Vec<String>,
    /// `dense` or `sparse`.
    mlp_types: Vec<String>,
    /// Query heads.
    heads: Vec<usize>,
}

pub(super) fn arch_spec(text: &TextConfig, c: &LagunaConfig) -> Result<ArchSpec> {
    let mut warnings = text.check_unknown_keys(&c.rest, HARMLESS)?;
    let layers = layers_count("num_hidden_layers", c.num_hidden_layers)?;
    let hidden = dim("hidden_size", c.hidden_size)?;
    let vocab = dim("vocab_size", c.vocab_size)?;
    let head_dim = dim("head_dim", c.head_dim)?;
    let kv_heads = dim("num_key_value_heads", c.num_key_value_heads)?;

    check_supported(c)?;
    let per_head_gate = read_gating(&c.gating, &mut warnings)?;
    if c.norm_topk_prob == Some(false) {
        warnings.push(
            "key `norm_topk_prob` = false is not read: the reference always renormalises the top-k router weights".into(),
        );
    }

    let schedule = schedule(c, layers, kv_heads)?;
    warn_on_legacy_keys(c, &schedule.mlp_types, &mut warnings);

    let any_sparse = schedule.mlp_types.iter().any(|t| t == SPARSE);
    let any_dense = schedule.mlp_types.iter().any(|t| t == DENSE);
    let any_sliding = schedule.types.iter().any(|t| t == SLIDING);
    let any_full = schedule.types.iter().any(|t| t == FULL);
    check_sizes_in_use(c, any_sparse, any_dense, any_sliding)?;

    let blocks = resolve_rope(c, any_full, any_sliding, &mut warnings)?;
    let rope_of = |block: &Option<serde_json::Value>, ty: &str| -> Result<Option<Rope>> {
        block
            .as_ref()
            .map(|b| rope_from_params(b, head_dim, &format!("rope_parameters.{ty}")))
            .transpose()
    };
    let rope_full = rope_of(&blocks.full, FULL)?;
    let rope_sliding = rope_of(&blocks.sliding, SLIDING)?;

    let mut table = Vec::with_capacity(layers);
    for i in 0..layers {
        let ffn = if schedule.mlp_types[i] == SPARSE {
            Ffn::Moe {
                experts: c.num_experts,
                top_k: c.num_experts_per_tok,
                width: c.moe_intermediate_size,
                shared_width: (c.shared_expert_intermediate_size > 0)
                    .then_some(c.shared_expert_intermediate_size),
                dense_width: None,
                routing: Routing::Sigmoid,
            }
        } else {
            Ffn::Dense {
                width: c.intermediate_size,
            }
        };
        let (attention, retention, rope) = if schedule.types[i] == SLIDING {
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

        table.push(LayerSpec {
            index: i,
            attention,
            q_heads: schedule.heads[i],
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

    let params = params::count(c, &table, per_head_gate)?;
    let (top_k, experts) = if any_sparse {
        (c.num_experts_per_tok, c.num_experts)
    } else {
        (0, 0)
    };

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
        layers: table,
        notes: model_notes(c, per_head_gate, any_sparse),
        warnings,
    })
}

/// The per-layer lists, checked: one entry per layer, known types, heads that divide into the
/// KV heads.
fn schedule(c: &LagunaConfig, layers: usize, kv_heads: usize) -> Result<Schedule> {
    let types = c
        .layer_types
        .clone()
        .unwrap_or_else(|| vec![FULL.to_string(); layers]);
    check_len("layer_types", &types, layers)?;
    for (i, t) in types.iter().enumerate() {
        if t != SLIDING && t != FULL {
            bail!("key `layer_types[{i}]` = `{t}`: Laguna layers are `{SLIDING}` or `{FULL}`");
        }
    }
    let mlp_types = c.mlp_layer_types.clone().unwrap_or_else(|| {
        (0..layers)
            .map(|i| if i == 0 { DENSE } else { SPARSE }.to_string())
            .collect()
    });
    check_len("mlp_layer_types", &mlp_types, layers)?;
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
        .unwrap_or_else(|| vec![c.num_attention_heads; layers]);
    check_len("num_attention_heads_per_layer", &heads, layers)?;
    for (i, &q) in heads.iter().enumerate() {
        dim(&format!("num_attention_heads_per_layer[{i}]"), q)?;
        check_heads(i, q, kv_heads)?;
    }
    Ok(Schedule {
        types,
        mlp_types,
        heads,
    })
}

/// Legacy keys transformers ignores: harmless unless they disagree with `mlp_layer_types`.
fn warn_on_legacy_keys(c: &LagunaConfig, mlp_types: &[String], warnings: &mut Vec<String>) {
    if let Some(legacy) = legacy_sparse_layers(c, mlp_types.len()) {
        let differ: Vec<String> = legacy
            .iter()
            .zip(mlp_types)
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
}

/// The sizes only some layers read must be valid when such a layer exists.
fn check_sizes_in_use(
    c: &LagunaConfig,
    any_sparse: bool,
    any_dense: bool,
    any_sliding: bool,
) -> Result<()> {
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
    Ok(())
}

/// Model-wide facts worth printing.
fn model_notes(c: &LagunaConfig, per_head_gate: bool, any_sparse: bool) -> Vec<String> {
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
    notes
}
