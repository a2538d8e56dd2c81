//! Parameter counts of `Gemma4ForCausalLM`, read off the per-layer table.

use super::config::Gemma4TextConfig;
use crate::arch::config::to_u64;
use crate::arch::{Ffn, LayerSpec, ParamCounts};
use anyhow::Result;

/// The parameters the reference builds (`effective` and `active` are left to
/// [`ParamCounts::finish`]). Summed in u128: the bounds on each key do not keep their products
/// inside u64.
pub(super) fn count(c: &Gemma4TextConfig, layers: &[LayerSpec]) -> Result<ParamCounts> {
    let ple = c.hidden_size_per_layer_input;
    let n_ple = (layers.len() * ple) as u128;
    let (h, v) = (c.hidden_size as u128, c.vocab_size as u128);
    let embedding = v * h;
    let ple_table = c.vocab_size_per_layer_input as u128 * n_ple;
    let lm_head = if c.tie_word_embeddings { 0 } else { v * h };
    // Final norm, and the PLE projection + its norm.
    let mut other = h;
    if ple > 0 {
        other += h * n_ple + ple as u128;
    }
    let mut routed = 0;
    for layer in layers {
        let (own, experts) = layer_params(c, layer);
        other += own;
        routed += experts;
    }
    Ok(ParamCounts {
        total: to_u64(embedding + ple_table + lm_head + routed + other)?,
        embedding: to_u64(embedding)?,
        ple: to_u64(ple_table)?,
        lm_head: to_u64(lm_head)?,
        routed_experts: to_u64(routed)?,
        ..Default::default()
    })
}

/// One decoder layer's parameters as `Gemma4TextDecoderLayer` builds them: its own, and its
/// routed experts'.
fn layer_params(c: &Gemma4TextConfig, layer: &LayerSpec) -> (u128, u128) {
    let h = c.hidden_size as u128;
    let bias = |n: u128| if c.attention_bias { n } else { 0 };
    let (q, kvh, hd) = (
        layer.q_heads as u128,
        layer.kv_heads as u128,
        layer.head_dim as u128,
    );
    let mut own = h * q * hd + bias(q * hd) + hd; // q_proj (+bias), q_norm
    own += q * hd * h + bias(h); // o_proj
    if layer.kv_source.is_none() {
        own += h * kvh * hd + bias(kvh * hd) + hd; // k_proj, k_norm (v_norm has no scale)
        if !layer.k_eq_v {
            own += h * kvh * hd + bias(kvh * hd); // v_proj
        }
    }
    // Gemma 4's experts run beside the dense MLP, never instead of it.
    let (mlp_width, moe) = match layer.ffn {
        Ffn::Dense { width } => (width, None),
        Ffn::Moe {
            experts,
            width,
            dense_width,
            ..
        } => (dense_width.unwrap_or_default(), Some((experts, width))),
    };
    own += 3 * h * mlp_width as u128 + 4 * h; // gate/up/down, four norms
    if let Some(ple) = layer.ple_width {
        own += 2 * h * ple as u128 + h; // gate, projection, norm
    }
    let mut routed = 0;
    if let Some((experts, width)) = moe {
        let (e, w) = (experts as u128, width as u128);
        own += h * e + h + e; // router proj, scale, per-expert scale
        own += 3 * h; // the MoE block's three extra norms
        routed = e * 3 * w * h;
    }
    (own, routed)
}
