//! Parameter counts of `DeepseekV4ForCausalLM`, tensor by tensor as the reference builds them,
//! read off the per-layer table. Buffers (`tid2eid`, `e_score_correction_bias`, RoPE tables) are
//! not parameters.

use super::config::DeepseekV4Config;
use crate::arch::{Attention, LayerSpec, ParamCounts};
use anyhow::{anyhow, Result};

/// Parameter arithmetic that reports overflow instead of panicking.
#[derive(Default)]
struct Count(u64);

impl Count {
    /// Add the product of `dims`.
    fn add(&mut self, dims: &[usize]) -> Result<()> {
        let term = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        self.0 = term.and_then(|t| self.0.checked_add(t)).ok_or_else(|| {
            anyhow!(
                "the parameter count overflows 64 bits; the config's dimensions are not plausible"
            )
        })?;
        Ok(())
    }
}

/// The parameters the reference builds, `effective` and `active` included.
pub(super) fn count(c: &DeepseekV4Config, layers: &[LayerSpec]) -> Result<ParamCounts> {
    let (h, m) = (c.hidden_size, c.hc_mult);
    let mut other = Count::default();
    let mut routed = Count::default();
    other.add(&[h])?; // model.norm
    other.add(&[m, m, h])?; // hc_head.hc_fn
    other.add(&[m])?; // hc_head.hc_base
    other.add(&[1])?; // hc_head.hc_scale
    for layer in layers {
        add_layer(c, layer, &mut other, &mut routed)?;
    }

    let mut top = Count::default();
    top.add(&[c.vocab_size, h])?;
    let embedding = top.0;
    let lm_head = if c.tie_word_embeddings { 0 } else { embedding };
    let total = [embedding, lm_head, routed.0]
        .into_iter()
        .try_fold(other.0, |acc, x| acc.checked_add(x))
        .ok_or_else(|| anyhow!("the parameter count overflows 64 bits"))?;
    Ok(ParamCounts {
        total,
        embedding,
        lm_head,
        routed_experts: routed.0,
        ..Default::default()
    }
    .finish(c.num_experts_per_tok, c.n_routed_experts))
}

/// One decoder layer's parameters: into `other`, and its routed experts into `routed`.
fn add_layer(
    c: &DeepseekV4Config,
    layer: &LayerSpec,
    other: &mut Count,
    routed: &mut Count,
) -> Result<()> {
    let (h, nh, hd, ql) = (c.hidden_size, layer.q_heads, layer.head_dim, c.q_lora_rank);
    let (e, iw) = (c.n_routed_experts, c.moe_intermediate_size);
    let (ihd, inh, m) = (c.index_head_dim, c.index_n_heads, c.hc_mult);

    // Attention: low-rank q, one shared KV head, grouped low-rank output, sinks.
    other.add(&[h, ql])?; // q_a_proj
    other.add(&[ql])?; // q_a_norm
    other.add(&[ql, nh, hd])?; // q_b_proj
    other.add(&[h, hd])?; // kv_proj
    other.add(&[hd])?; // kv_norm
    other.add(&[c.o_lora_rank, nh, hd])?; // o_a_proj: [groups × o_lora, nh × hd / groups]
    other.add(&[c.o_groups, c.o_lora_rank, h])?; // o_b_proj
    other.add(&[nh])?; // sinks
    match layer.attention {
        // CSA.
        Attention::Compressed {
            ratio: r,
            index_topk: Some(_),
            ..
        } => {
            // Two overlapping series (Ca, Cb): kv/gate project to 2 × head_dim.
            other.add(&[2, h, 2, hd])?; // compressor.kv_proj, gate_proj
            other.add(&[r, 2, hd])?; // compressor.position_bias
            other.add(&[hd])?; // compressor.kv_norm
            other.add(&[2, h, 2, ihd])?; // indexer.kv_proj, gate_proj
            other.add(&[r, 2, ihd])?; // indexer.position_bias
            other.add(&[ihd])?; // indexer.kv_norm
            other.add(&[ql, inh, ihd])?; // indexer.q_b_proj
            other.add(&[h, inh])?; // indexer.scorer.weights_proj
        }
        // HCA.
        Attention::Compressed {
            ratio: r,
            index_topk: None,
            ..
        } => {
            other.add(&[2, h, hd])?; // compressor.kv_proj, gate_proj
            other.add(&[r, hd])?; // compressor.position_bias
            other.add(&[hd])?; // compressor.kv_norm
        }
        _ => {}
    }
    // MoE: router, routed experts (gate_up + down), one shared expert.
    other.add(&[e, h])?; // gate.weight
    routed.add(&[e, 3, iw, h])?;
    other.add(&[3, h, iw])?; // shared_experts gate/up/down
    if c.mlp_bias {
        other.add(&[2 * iw + h])?;
    }
    other.add(&[2, h])?; // input_layernorm, post_attention_layernorm
                         // Two hyper-connections: fn [(2+m)m, m·h], base [(2+m)m], scale [3].
    other.add(&[2, 2 + m, m, m, h])?;
    other.add(&[2, 2 + m, m])?;
    other.add(&[2, 3])?;
    Ok(())
}
