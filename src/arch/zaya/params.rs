//! Parameter counts of `ZayaForCausalLM`, tensor by tensor as the reference builds them, read
//! off the per-layer table.

use super::config::ZayaConfig;
use crate::arch::config::to_u64;
use crate::arch::{Ffn, LayerSpec, ParamCounts};
use anyhow::Result;

/// The parameters the reference builds (`effective` and `active` are left to
/// [`ParamCounts::finish`]). Summed in u128: no overflow.
pub(super) fn count(c: &ZayaConfig, layers: &[LayerSpec]) -> Result<ParamCounts> {
    let (h, v) = (c.hidden_size as u128, c.vocab_size as u128);
    let embedding = v * h;
    let lm_head =
        if c.tie_word_embeddings { 0 } else { v * h } + if c.lm_head_bias { v } else { 0 };
    let mut routed: u128 = 0;
    let mut other: u128 = 2 * h + h; // input_hidden_states_scale/bias, final norm
    for layer in layers {
        let (own, experts) = layer_params(c, layer);
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
fn layer_params(c: &ZayaConfig, layer: &LayerSpec) -> (u128, u128) {
    let h = c.hidden_size as u128;
    let (qh, kvh, hd) = (
        layer.q_heads as u128,
        layer.kv_heads as u128,
        layer.head_dim as u128,
    );
    let (t0, t1, r) = (
        c.cca_time0 as u128,
        c.cca_time1 as u128,
        c.router_hidden_size as u128,
    );
    let bias = |n: u128| if c.attention_bias { n } else { 0 };
    let cc = (qh + kvh) * hd; // conv channels
                              // Attention: q, k, the two value halves, o; the two convs (bias on); the key scale.
    let mut own = h * qh * hd + bias(qh * hd);
    own += h * kvh * hd + bias(kvh * hd);
    own += 2 * (h * (kvh * hd / 2) + bias(kvh * hd / 2));
    own += qh * hd * h + bias(h);
    own += cc * t0 + cc; // conv_qk_depthwise [C, 1, t0] + bias
    own += cc * hd * t1 + cc; // conv_qk_grouped [C, C / (heads + kv_heads), t1] + bias
    own += kvh; // qk_norm.temp

    // Router: down_proj (+bias), EDA scale from layer 1 on, router MLP over E + 1 classes.
    let Ffn::Moe { experts, width, .. } = layer.ffn else {
        unreachable!("every ZAYA layer holds an MoE block")
    };
    let (e, w) = (experts as u128, width as u128);
    own += h * r + r;
    if layer.index > 0 {
        own += r;
    }
    own += r + 2 * (r * r + r) + r * (e + 1);
    let routed = e * 3 * w * h; // experts.gate_up_proj [E, 2w, h] + down_proj [E, h, w]
    own += 2 * h + 8 * h; // two RMS norms, two residual scalings (4 vectors each)
    (own, routed)
}
