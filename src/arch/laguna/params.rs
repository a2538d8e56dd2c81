//! Parameter counts of `LagunaForCausalLM`, tensor by tensor as the reference builds them, read
//! off the per-layer table.

use super::config::LagunaConfig;
use crate::arch::config::to_u64;
use crate::arch::{Ffn, LayerSpec, ParamCounts};
use anyhow::Result;

/// The parameters the reference builds (`effective` and `active` are left to
/// [`ParamCounts::finish`]). Summed in u128: no overflow.
pub(super) fn count(
    c: &LagunaConfig,
    layers: &[LayerSpec],
    per_head_gate: bool,
) -> Result<ParamCounts> {
    let (h, v) = (c.hidden_size as u128, c.vocab_size as u128);
    let embedding = v * h;
    let lm_head = if c.tie_word_embeddings { 0 } else { v * h };
    let mut routed: u128 = 0;
    let mut other: u128 = h; // final norm
    for layer in layers {
        let (own, experts) = layer_params(c, layer, per_head_gate);
        other += own;
        routed += experts;
    }
    Ok(ParamCounts {
        total: to_u64(embedding + lm_head + routed + other)?,
        embedding: to_u64(embedding)?,
        ple: 0,
        lm_head: to_u64(lm_head)?,
        routed_experts: to_u64(routed)?,
        ..Default::default()
    })
}

/// One decoder layer's parameters: its own, and its routed experts'.
fn layer_params(c: &LagunaConfig, layer: &LayerSpec, per_head_gate: bool) -> (u128, u128) {
    let h = c.hidden_size as u128;
    let bias = |n: u128| if c.attention_bias { n } else { 0 };
    let (qh, kvh, hd) = (
        layer.q_heads as u128,
        layer.kv_heads as u128,
        layer.head_dim as u128,
    );
    let mut own = h * qh * hd + bias(qh * hd); // q_proj
    own += 2 * (h * kvh * hd + bias(kvh * hd)); // k_proj, v_proj
    own += qh * hd * h + bias(h); // o_proj
    own += 2 * hd; // q_norm, k_norm
    own += h * if per_head_gate { qh } else { qh * hd }; // g_proj (no bias)
    own += 2 * h; // input / post-attention norms

    let mut routed = 0;
    match layer.ffn {
        Ffn::Moe {
            experts,
            width,
            shared_width,
            ..
        } => {
            let (e, w) = (experts as u128, width as u128);
            routed = e * 3 * w * h; // experts.gate_up_proj [E, 2w, h] + down_proj [E, h, w]
            own += e * h + e; // router weight + e_score_correction_bias (a parameter)
            own += 3 * h * shared_width.unwrap_or(0) as u128; // shared expert
        }
        Ffn::Dense { width } => own += 3 * h * width as u128,
    }
    (own, routed)
}
