//! The ZAYA layer schedule → [`ArchSpec`]: `hybrid` or `hybrid_sliding` CCA layers, each with
//! its RoPE block, its cache (K, V, the conv state and the delayed-value state) and an MoE block.

use super::config::{check_supported, resolve_rope, ZayaConfig, HARMLESS, HYBRID, HYBRID_SLIDING};
use super::{params, FAMILY};
use crate::arch::config::{check_len, dim, layers_count, rope_from_params, TextConfig};
use crate::arch::{ArchSpec, Attention, CachePart, Ffn, LayerSpec, Retention, Rope, Routing};
use anyhow::{anyhow, bail, Result};

pub(super) fn arch_spec(text: &TextConfig, c: &ZayaConfig) -> Result<ArchSpec> {
    let mut warnings = text.check_unknown_keys(&c.rest, HARMLESS)?;
    let layers = layers_count("num_hidden_layers", c.num_hidden_layers)?;
    let hidden = dim("hidden_size", c.hidden_size)?;
    let vocab = dim("vocab_size", c.vocab_size)?;
    let head_dim = dim("head_dim", c.head_dim)?;
    let q_heads = dim("num_attention_heads", c.num_attention_heads)?;
    let kv_heads = dim("num_key_value_heads", c.num_key_value_heads)?;
    let experts = dim("num_experts", c.num_experts)?;
    let width = dim("moe_intermediate_size", c.moe_intermediate_size)?;
    let router = dim("router_hidden_size", c.router_hidden_size)?;
    let t0 = dim("cca_time0", c.cca_time0)?;
    let t1 = dim("cca_time1", c.cca_time1)?;
    check_supported(c)?;

    let types = layer_types(c, layers)?;
    let window = sliding_window(c, &types)?;

    let mut used: Vec<&str> = vec![];
    for ty in [HYBRID, HYBRID_SLIDING] {
        if types.iter().any(|t| t == ty) {
            used.push(ty);
        }
    }
    let blocks = resolve_rope(c, &used, &mut warnings)?;
    let rope_of = |ty: &str| -> Result<Option<Rope>> {
        if !used.contains(&ty) {
            return Ok(None);
        }
        let b = blocks
            .get(ty)
            .ok_or_else(|| anyhow!("key `rope_parameters.{ty}` is missing"))?;
        rope_from_params(b, head_dim, &format!("rope_parameters.{ty}")).map(Some)
    };
    let rope_hybrid = rope_of(HYBRID)?;
    let rope_sliding = rope_of(HYBRID_SLIDING)?;

    let kv_width = kv_heads * head_dim;
    let conv_channels = (q_heads + kv_heads) * head_dim;
    let conv_rows = (t0 - 1) + (t1 - 1);
    let mut table = Vec::with_capacity(layers);
    for (i, ty) in types.iter().enumerate() {
        let (attention, retention, rope) = if ty == HYBRID_SLIDING {
            let w = window.ok_or_else(|| anyhow!("internal: no sliding window"))?;
            (
                Attention::Cca { window: Some(w) },
                Retention::Window { window: w },
                rope_sliding.clone(),
            )
        } else {
            (
                Attention::Cca { window: None },
                Retention::AllTokens,
                rope_hybrid.clone(),
            )
        };
        let mut cache = LayerSpec::kv_parts(kv_heads, head_dim, head_dim, false, retention);
        if conv_rows > 0 {
            cache.push(CachePart::new(
                "conv state",
                conv_channels,
                Retention::Fixed { entries: conv_rows },
            ));
        }
        cache.push(CachePart::new(
            "delayed V state",
            kv_width / 2,
            Retention::Fixed { entries: 1 },
        ));
        let mut notes = vec![format!("conv {t0}+{t1}")];
        if i > 0 {
            notes.push("router EDA".into());
        }

        table.push(LayerSpec {
            index: i,
            attention,
            q_heads,
            kv_heads,
            head_dim,
            // Each value head is head_dim wide: half from the current token, half delayed.
            v_head_dim: head_dim,
            kv_source: None,
            k_eq_v: false,
            rope,
            ffn: Ffn::Moe {
                experts,
                top_k: 1,
                width,
                shared_width: None,
                dense_width: None,
                routing: Routing::Mlp { hidden: router },
            },
            ple_width: None,
            cache,
            notes,
        });
    }
    let params = params::count(c, &table)?;

    let mut notes = vec![
        format!(
            "CCA: q/k conv {t0}+{t1} over {} channels, value half delayed one token",
            conv_channels
        ),
        "QK L2 norm with a per-KV-head key scale".to_string(),
        format!(
            "MoE router: MLP {router} wide, top-1 of {} classes (one skips the experts), EDA from layer 1",
            experts + 1
        ),
        "residual scaling (scale + bias) on both branches and the embedding".to_string(),
    ];
    if c.lm_head_bias {
        notes.push("lm_head bias".into());
    }

    Ok(ArchSpec {
        family: FAMILY.name,
        model_type: text.model_type.clone(),
        hf_class: "ZayaForCausalLM".into(),
        architecture: text.architecture.clone(),
        hidden_size: hidden,
        vocab_size: vocab,
        max_context: c.max_position_embeddings,
        dtype: text.dtype(),
        tie_word_embeddings: c.tie_word_embeddings,
        params: params.finish(1, experts),
        layers: table,
        notes,
        warnings,
    })
}

/// Each layer's type: `hybrid` (the default) or `hybrid_sliding`.
fn layer_types(c: &ZayaConfig, layers: usize) -> Result<Vec<String>> {
    let types = c
        .layer_types
        .clone()
        .unwrap_or_else(|| vec![HYBRID.to_string(); layers]);
    check_len("layer_types", &types, layers)?;
    for (i, t) in types.iter().enumerate() {
        if t != HYBRID && t != HYBRID_SLIDING {
            let hint = if t == "full_attention" || t == "sliding_attention" {
                format!(" (`{t}` is a pre-release name: write `{HYBRID}` or `{HYBRID_SLIDING}`)")
            } else {
                String::new()
            };
            bail!("key `layer_types[{i}]` = `{t}`: ZAYA layers are `{HYBRID}` or `{HYBRID_SLIDING}`{hint}");
        }
    }
    Ok(types)
}

/// The window of the `hybrid_sliding` layers, required when there are any.
fn sliding_window(c: &ZayaConfig, types: &[String]) -> Result<Option<usize>> {
    if !types.iter().any(|t| t == HYBRID_SLIDING) {
        return Ok(None);
    }
    match c.sliding_window {
        Some(w) => Ok(Some(dim("sliding_window", w)?)),
        None => bail!(
            "key `sliding_window` must be set when `layer_types` contains `{HYBRID_SLIDING}` (the reference refuses it too)"
        ),
    }
}
