//! Parameter counts of `Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM`, tensor by tensor as the
//! reference builds them, read off the per-layer table; and the checked arithmetic the sizes
//! are computed in, so that absurd configs give an error instead of an overflow.

use super::config::Qwen3_5TextConfig;
use crate::arch::{Attention, Ffn, LayerSpec, ParamCounts};
use anyhow::{anyhow, Result};

/// A checked product of sizes.
pub(super) fn prod(factors: &[usize]) -> Result<u64> {
    factors
        .iter()
        .try_fold(1u64, |acc, &f| acc.checked_mul(f as u64))
        .ok_or_else(|| anyhow!("the config's sizes overflow a 64-bit count ({factors:?})"))
}

/// A checked sum of sizes.
pub(super) fn sum(terms: &[u64]) -> Result<u64> {
    terms
        .iter()
        .try_fold(0u64, |acc, &t| acc.checked_add(t))
        .ok_or_else(|| anyhow!("the config's sizes overflow a 64-bit parameter count"))
}

pub(super) fn usize_of(n: u64) -> Result<usize> {
    usize::try_from(n).map_err(|_| anyhow!("the config's sizes overflow this platform's usize"))
}

/// The parameters the reference builds (`effective` and `active` are left to
/// [`ParamCounts::finish`]).
pub(super) fn count(
    c: &Qwen3_5TextConfig,
    hidden: usize,
    layers: &[LayerSpec],
) -> Result<ParamCounts> {
    let (h, vocab) = (hidden, c.vocab_size);
    let mut params = ParamCounts {
        embedding: prod(&[vocab, h])?,
        lm_head: if c.tie_word_embeddings {
            0
        } else {
            prod(&[vocab, h])?
        },
        ..Default::default()
    };
    // model.norm
    let mut other = h as u64;
    for layer in layers {
        let mixer = match layer.attention {
            Attention::Linear => delta_net_params(c, h, layer)?,
            _ => attention_params(c, h, layer)?,
        };
        let norms = prod(&[2, h])?; // input_layernorm, post_attention_layernorm
        other = sum(&[other, mixer, ffn_params(h, &layer.ffn)?, norms])?;
        params.routed_experts = sum(&[params.routed_experts, routed_params(h, &layer.ffn)?])?;
    }
    params.total = sum(&[
        params.embedding,
        params.lm_head,
        params.routed_experts,
        other,
    ])?;
    Ok(params)
}

/// A Gated DeltaNet layer (`q_heads`/`kv_heads`: its value/key heads, `head_dim`/`v_head_dim`:
/// its key/value head dims).
fn delta_net_params(c: &Qwen3_5TextConfig, h: usize, layer: &LayerSpec) -> Result<u64> {
    let (nv, nk, dk, dv) = (
        layer.q_heads,
        layer.kv_heads,
        layer.head_dim,
        layer.v_head_dim,
    );
    let key_dim = usize_of(prod(&[nk, dk])?)?;
    let value_dim = usize_of(prod(&[nv, dv])?)?;
    let conv_dim = usize_of(sum(&[key_dim as u64, key_dim as u64, value_dim as u64])?)?;
    sum(&[
        prod(&[h, conv_dim])?,                        // in_proj_qkv
        prod(&[h, value_dim])?,                       // in_proj_z
        prod(&[h, nv, 2])?,                           // in_proj_b, in_proj_a
        prod(&[conv_dim, c.linear_conv_kernel_dim])?, // conv1d (depthwise, no bias)
        prod(&[nv, 2])?,                              // dt_bias, A_log
        dv as u64,                                    // norm (gated RMSNorm over one value head)
        prod(&[value_dim, h])?,                       // out_proj
    ])
}

/// A gated full-attention layer.
fn attention_params(c: &Qwen3_5TextConfig, h: usize, layer: &LayerSpec) -> Result<u64> {
    let bias = |n: usize| if c.attention_bias { n as u64 } else { 0 };
    let head_dim = layer.head_dim;
    let q_width = usize_of(prod(&[layer.q_heads, head_dim])?)?;
    let kv_width = usize_of(prod(&[layer.kv_heads, head_dim])?)?;
    sum(&[
        prod(&[h, q_width, 2])?, // q_proj: query + gate
        bias(2 * q_width),
        prod(&[h, kv_width, 2])?, // k_proj, v_proj
        bias(2 * kv_width),
        prod(&[q_width, h])?, // o_proj
        bias(h),
        prod(&[head_dim, 2])?, // q_norm, k_norm
    ])
}

/// The feed-forward block, without the routed experts.
fn ffn_params(h: usize, ffn: &Ffn) -> Result<u64> {
    match *ffn {
        Ffn::Dense { width } => prod(&[3, h, width]),
        Ffn::Moe {
            experts,
            shared_width,
            ..
        } => sum(&[
            prod(&[experts, h])?,                      // router (mlp.gate.weight)
            prod(&[3, h, shared_width.unwrap_or(0)])?, // shared expert gate/up/down
            h as u64,                                  // shared_expert_gate
        ]),
    }
}

/// The routed experts of one layer.
fn routed_params(h: usize, ffn: &Ffn) -> Result<u64> {
    match *ffn {
        Ffn::Dense { .. } => Ok(0),
        Ffn::Moe { experts, width, .. } => prod(&[experts, 3, width, h]), // gate_up_proj + down_proj
    }
}
