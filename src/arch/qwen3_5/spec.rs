//! The Qwen3.5 layer schedule → [`ArchSpec`]: which layers are Gated DeltaNet and which gated
//! full attention, the DeltaNet geometry and its fixed-size cache, the full layers' RoPE, and
//! the feed-forward block (dense MLP, or MoE + shared expert in every layer).

use super::config::{
    check_ignored_keys, mrope_sections, rope_block, Qwen3_5TextConfig, Variant, FULL, HARMLESS,
    LINEAR, MAX_LAYERS,
};
use super::params::{self, prod, sum, usize_of};
use super::FAMILY;
use crate::arch::config::{check_heads, check_len, positive, rope_from_params, TextConfig};
use crate::arch::{ArchSpec, Attention, CachePart, Ffn, LayerSpec, Retention, Rope, Routing};
use anyhow::{bail, Result};
use serde_json::Value;

/// The MoE block's sizes.
#[derive(Debug, Clone, Copy)]
struct Moe {
    experts: usize,
    top_k: usize,
    width: usize,
    shared_width: usize,
}

/// The Gated DeltaNet geometry, the same in every linear layer.
#[derive(Debug, Clone, Copy)]
struct DeltaNet {
    /// Key (q/k) heads and value heads.
    nk: usize,
    nv: usize,
    /// Key and value head dims.
    dk: usize,
    dv: usize,
    /// The causal conv's kernel.
    kernel: usize,
    /// Channels of the conv: q, k and v together.
    conv_dim: usize,
    /// Elements of the recurrent state, `nv × dk × dv`.
    recurrent: usize,
}

pub(super) fn arch_spec(
    text: &TextConfig,
    variant: Variant,
    c: &Qwen3_5TextConfig,
) -> Result<ArchSpec> {
    let p = text.key_prefix();
    let key = |k: &str| format!("{p}{k}");
    let mut warnings = text.check_unknown_keys(&c.rest, HARMLESS)?;

    let (dense_hidden, dense_layers, dense_kv) = match variant {
        Variant::Dense => (4096, 32, 4),
        Variant::Moe => (2048, 40, 2),
    };
    let n = positive(
        &key("num_hidden_layers"),
        c.num_hidden_layers.unwrap_or(dense_layers),
    )?;
    // Per-layer tables are built eagerly: refuse counts no model has rather than abort on an
    // allocation of that size.
    if n > MAX_LAYERS {
        bail!(
            "key `{}` = {n} is implausibly large (more than {MAX_LAYERS} layers)",
            key("num_hidden_layers")
        );
    }
    let hidden = positive(&key("hidden_size"), c.hidden_size.unwrap_or(dense_hidden))?;
    let vocab = positive(&key("vocab_size"), c.vocab_size)?;
    let kv_heads = c.num_key_value_heads.unwrap_or(dense_kv);

    // 1. Keys the reference ignores: accept what it computes, reject the rest.
    check_ignored_keys(c, p, &mut warnings)?;

    // 2. Layer types.
    let types = layer_types(c, n, p, &mut warnings)?;
    let n_full = types.iter().filter(|t| *t == FULL).count();
    let n_linear = n - n_full;

    // 3. Gated DeltaNet geometry.
    let DeltaNet {
        nk,
        nv,
        dk,
        dv,
        kernel,
        conv_dim,
        recurrent,
    } = delta_net(c, p, n_linear)?;

    // 4. Full-attention geometry and RoPE.
    let head_dim = positive(&key("head_dim"), c.head_dim)?;
    let q_heads = c.num_attention_heads;
    let (rope, sections) = full_attention_rope(c, p, head_dim, n_full, &mut warnings)?;

    // 5. Feed-forward.
    let moe = moe_block(text, variant, c, &mut warnings)?;
    let dense_width = match variant {
        Variant::Dense => positive(
            &key("intermediate_size"),
            c.intermediate_size.unwrap_or(12_288),
        )?,
        Variant::Moe => 0,
    };
    let ffn = match moe {
        None => Ffn::Dense { width: dense_width },
        Some(m) => Ffn::Moe {
            experts: m.experts,
            top_k: m.top_k,
            width: m.width,
            shared_width: (m.shared_width > 0).then_some(m.shared_width),
            dense_width: None,
            routing: Routing::Softmax,
        },
    };

    // 6. The per-layer table.
    let mut layers = Vec::with_capacity(n);
    for (i, ty) in types.iter().enumerate() {
        let layer = if ty == LINEAR {
            // q_heads/kv_heads: the DeltaNet's value heads / key heads (the q/k heads);
            // head_dim/v_head_dim: its key / value head dims. Naive per-token K+V for the
            // budget's waterfall is then value_heads × (key_dim + value_dim).
            LayerSpec {
                index: i,
                attention: Attention::Linear,
                q_heads: nv,
                kv_heads: nk,
                head_dim: dk,
                v_head_dim: dv,
                kv_source: None,
                k_eq_v: false,
                rope: None,
                ffn: ffn.clone(),
                ple_width: None,
                cache: vec![
                    CachePart::new(
                        "conv state",
                        conv_dim,
                        Retention::Fixed {
                            entries: kernel - 1,
                        },
                    ),
                    CachePart::new(
                        "recurrent state",
                        recurrent,
                        Retention::Fixed { entries: 1 },
                    )
                    .f32(),
                ],
                notes: vec![format!("conv {kernel}"), "gated norm silu".into()],
            }
        } else {
            check_heads(i, q_heads, kv_heads)?;
            LayerSpec {
                index: i,
                attention: Attention::Full,
                q_heads,
                kv_heads,
                head_dim,
                v_head_dim: head_dim,
                kv_source: None,
                k_eq_v: false,
                rope: Some(rope.clone()),
                ffn: ffn.clone(),
                ple_width: None,
                cache: LayerSpec::kv_parts(
                    kv_heads,
                    head_dim,
                    head_dim,
                    false,
                    Retention::AllTokens,
                ),
                notes: vec!["out gate sigmoid".into(), "QK norm".into()],
            }
        };
        // Make sure the budget's per-token products stay in range.
        let dims = sum(&[layer.head_dim as u64, layer.v_head_dim as u64])?;
        prod(&[layer.q_heads, usize_of(dims)?])?;
        layers.push(layer);
    }

    // 7. Parameters, tensor by tensor as `Qwen3_5(Moe)ForCausalLM` builds them.
    let params = params::count(c, hidden, &layers)?;
    let (top_k, experts) = moe.map_or((0, 0), |m| (m.top_k, m.experts));

    // 8. Model-wide notes.
    let mut notes = vec![format!(
        "Gated DeltaNet : full attention = {n_linear} : {n_full}"
    )];
    if n_linear > 0 {
        notes.push(format!(
            "DeltaNet: {nk} q/k heads × {dk}, {nv} v heads × {dv}; state f32 {nv}×{dk}×{dv}, conv {kernel} over {conv_dim} channels"
        ));
    }
    if n_full > 0 {
        notes.push(format!(
            "mRoPE {sections:?}: text-only positions reduce it to 1-D RoPE on {} of {head_dim} dims",
            rope.rotary_dim
        ));
    }
    if let Some(m) = moe {
        notes.push(format!(
            "MoE: softmax top-{} of {}, renormalised; shared expert {} with sigmoid gate",
            m.top_k, m.experts, m.shared_width
        ));
    }
    if let Some(mtp) = c.mtp_num_hidden_layers.filter(|&m| m > 0) {
        let dedicated = if c.mtp_use_dedicated_embeddings == Some(true) {
            ", dedicated embeddings"
        } else {
            ""
        };
        notes.push(format!(
            "MTP layers: {mtp}{dedicated} (run only as a drafter, `--draft mtp`; not counted)"
        ));
    }
    if let Some(wrapper) = &text.wrapper {
        if let Some(Value::Bool(tie)) = wrapper.get("tie_word_embeddings") {
            if *tie != c.tie_word_embeddings {
                warnings.push(format!(
                    "`tie_word_embeddings` = {tie} but `{p}tie_word_embeddings` = {}; the text model \
                     follows the latter, the reference's multimodal class the former",
                    c.tie_word_embeddings
                ));
            }
        }
    }

    Ok(ArchSpec {
        family: FAMILY.name,
        model_type: text.model_type.clone(),
        hf_class: variant.hf_class().into(),
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

/// Each layer's type: the explicit list, else every `full_attention_interval`-th layer is full.
fn layer_types(
    c: &Qwen3_5TextConfig,
    n: usize,
    p: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<String>> {
    let key = |k: &str| format!("{p}{k}");
    let types: Vec<String> = match &c.layer_types {
        Some(list) => {
            check_len(&key("layer_types"), list, n)?;
            list.clone()
        }
        None => {
            let interval = c.full_attention_interval.unwrap_or(4);
            if interval == 0 {
                bail!("key `{}` must be positive", key("full_attention_interval"));
            }
            (0..n)
                .map(|i| {
                    if (i + 1) % interval != 0 {
                        LINEAR
                    } else {
                        FULL
                    }
                    .to_string()
                })
                .collect()
        }
    };
    for (i, t) in types.iter().enumerate() {
        if t != LINEAR && t != FULL {
            bail!(
                "key `{}[{i}]` = `{t}` (layer {i}): Qwen3.5 layers are `{LINEAR}` or `{FULL}`",
                key("layer_types")
            );
        }
    }
    if let (Some(_), Some(interval)) = (&c.layer_types, c.full_attention_interval) {
        let agrees = interval > 0
            && types
                .iter()
                .enumerate()
                .all(|(i, t)| (t == FULL) == ((i + 1) % interval == 0));
        if !agrees {
            warnings.push(format!(
                "`{}` = {interval} disagrees with `{}`; the reference uses `layer_types`",
                key("full_attention_interval"),
                key("layer_types")
            ));
        }
    }
    Ok(types)
}

/// The Gated DeltaNet geometry, checked when there are linear layers.
fn delta_net(c: &Qwen3_5TextConfig, p: &str, n_linear: usize) -> Result<DeltaNet> {
    let key = |k: &str| format!("{p}{k}");
    let (nk, nv) = (
        positive(&key("linear_num_key_heads"), c.linear_num_key_heads)?,
        positive(&key("linear_num_value_heads"), c.linear_num_value_heads)?,
    );
    let (dk, dv) = (
        positive(&key("linear_key_head_dim"), c.linear_key_head_dim)?,
        positive(&key("linear_value_head_dim"), c.linear_value_head_dim)?,
    );
    let kernel = positive(&key("linear_conv_kernel_dim"), c.linear_conv_kernel_dim)?;
    if n_linear > 0 && nv % nk != 0 {
        bail!(
            "key `{}` = {nv} is not a multiple of `{}` = {nk}: each key head serves a whole group of value heads",
            key("linear_num_value_heads"),
            key("linear_num_key_heads")
        );
    }
    let key_dim = usize_of(prod(&[nk, dk])?)?;
    let value_dim = usize_of(prod(&[nv, dv])?)?;
    let conv_dim = usize_of(sum(&[key_dim as u64, key_dim as u64, value_dim as u64])?)?;
    let recurrent = usize_of(prod(&[nv, dk, dv])?)?;
    Ok(DeltaNet {
        nk,
        nv,
        dk,
        dv,
        kernel,
        conv_dim,
        recurrent,
    })
}

/// The full layers' RoPE and mRoPE sections (text positions reduce mRoPE to 1-D RoPE).
fn full_attention_rope(
    c: &Qwen3_5TextConfig,
    p: &str,
    head_dim: usize,
    n_full: usize,
    warnings: &mut Vec<String>,
) -> Result<(Rope, [usize; 3])> {
    let key = |k: &str| format!("{p}{k}");
    let (rope_map, rope_key) = rope_block(c, p, warnings)?;
    let rope_what = key(rope_key);
    let rope = rope_from_params(&Value::Object(rope_map.clone()), head_dim, &rope_what)?;
    let sections = mrope_sections(&rope_map, &rope_what)?;
    let section_sum = sum(&sections.map(|x| x as u64))?.saturating_mul(2);
    if n_full > 0 && section_sum != rope.rotary_dim as u64 {
        warnings.push(format!(
            "`{rope_what}.mrope_section` {sections:?} covers {} dims but {} are rotated; \
             text-only positions are unaffected",
            section_sum, rope.rotary_dim
        ));
    }
    Ok((rope, sections))
}

/// The MoE block of the MoE variant; the dense variant refuses MoE keys.
fn moe_block(
    text: &TextConfig,
    variant: Variant,
    c: &Qwen3_5TextConfig,
    warnings: &mut Vec<String>,
) -> Result<Option<Moe>> {
    let key = |k: &str| format!("{}{k}", text.key_prefix());
    Ok(match variant {
        Variant::Dense => {
            for (k, set) in [
                ("num_experts", c.num_experts.is_some()),
                ("num_experts_per_tok", c.num_experts_per_tok.is_some()),
                ("moe_intermediate_size", c.moe_intermediate_size.is_some()),
                (
                    "shared_expert_intermediate_size",
                    c.shared_expert_intermediate_size.is_some(),
                ),
                ("norm_topk_prob", c.norm_topk_prob.is_some()),
                ("decoder_sparse_step", c.decoder_sparse_step.is_some()),
                ("mlp_only_layers", c.mlp_only_layers.is_some()),
            ] {
                if set {
                    bail!(
                        "key `{}` is an MoE setting, but model_type `{}` is the dense Qwen3.5 \
                         (use qwen3_5_moe_text for the MoE model)",
                        key(k),
                        text.model_type
                    );
                }
            }
            None
        }
        Variant::Moe => {
            let experts = positive(&key("num_experts"), c.num_experts.unwrap_or(256))?;
            let top_k = c.num_experts_per_tok.unwrap_or(8);
            if top_k == 0 || top_k > experts {
                bail!(
                    "key `{}` = {top_k} must be between 1 and num_experts ({experts})",
                    key("num_experts_per_tok")
                );
            }
            let width = positive(
                &key("moe_intermediate_size"),
                c.moe_intermediate_size.unwrap_or(512),
            )?;
            let shared_width = c.shared_expert_intermediate_size.unwrap_or(512);
            if c.norm_topk_prob == Some(false) {
                bail!(
                    "key `{}` = false is not supported: the reference always renormalises the top-k routing weights",
                    key("norm_topk_prob")
                );
            }
            if let Some(step) = c.decoder_sparse_step.filter(|&s| s != 1) {
                bail!(
                    "key `{}` = {step} is not supported: the reference makes every layer sparse (step 1)",
                    key("decoder_sparse_step")
                );
            }
            if let Some(first) = c.mlp_only_layers.as_ref().and_then(|l| l.first()) {
                bail!(
                    "key `{}` lists layer {first}: the reference has no dense-MLP layers in the MoE model",
                    key("mlp_only_layers")
                );
            }
            if let Some(w) = c.intermediate_size {
                warnings.push(format!(
                    "`{}` = {w} is ignored: every layer of the MoE model is sparse",
                    key("intermediate_size")
                ));
            }
            Some(Moe {
                experts,
                top_k,
                width,
                shared_width,
            })
        }
    })
}
