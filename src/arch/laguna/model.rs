//! The Laguna network (`LagunaModel` + the causal-LM head of `LagunaForCausalLM`), built from the
//! per-layer table. Reference: transformers 5.23.0 `models/laguna/modeling_laguna.py`; weight
//! names mirror it under the text-model root (`model.`, applied by the loader).
//!
//! Per token: embedding (unscaled) → decoder layers → RMS norm → output head (untied unless the
//! config ties it). A decoder layer, pre-norm with plain residuals:
//!
//! 1. `h += attn(input_norm(h))`: this layer's own query-head count over the shared KV heads
//!    (`num_attention_heads_per_layer`), RMS norms on q and k heads (not v), RoPE of the layer's
//!    type (full: e.g. YaRN over the leading half of each head; sliding: default over the whole
//!    head), scale `head_dim^-½`, a sliding window or full causal mask, then the merged heads times
//!    `softplus(g_proj x)` (per head or per channel) before `o_proj`;
//! 2. `h += mlp(post_attn_norm(h))`: a dense SwiGLU MLP, or (`mlp_layer_types` = `sparse`) the
//!    sigmoid-routed experts, scaled by `moe_routed_scaling_factor`, plus the shared expert
//!    (see [`crate::layers::moe::sigmoid`]).
//!
//! Weights may come in the Hub layout (one MLP per expert, `shared_expert`, the router's
//! score-correction bias under the experts: what transformers' `save_pretrained` writes) or in the
//! reference's module layout (packed experts, `shared_experts`, the bias under `gate`); see
//! [`crate::layers::moe::sigmoid`].
//!
//! The cache holds K and V of every layer (`num_key_value_heads × head_dim` per token, whatever
//! the query heads), the last `sliding_window` tokens on sliding layers.

use super::RuntimeConfig;
use crate::arch::config::RopeFrequencies;
use crate::arch::config::TextConfig;
use crate::arch::{ArchSpec, Attention as AttnKind, Ffn, LayerSpec};
use crate::arch::{CausalLm, Family, FamilyModel, Rows};
use crate::layers::attention::{Attention, AttentionOptions, ForwardCtx};
use crate::layers::embedding::ScaledEmbedding;
use crate::layers::kv_store::KvStore;
use crate::layers::linear::{output_head, Linear};
use crate::layers::mlp::{Activation, GatedMlp};
use crate::layers::moe::sigmoid::{SharedExpertMoe, SharedExpertMoeShape};
use crate::layers::norm::{residual_then_norm, RmsNorm};
use crate::layers::output_gate::SoftplusOutputGate;
use crate::layers::rope::{Rotary, SharedTables};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

/// A layer's feed-forward block.
#[derive(Debug)]
enum FeedForward {
    Dense(GatedMlp),
    Sparse(Box<SharedExpertMoe>),
}

#[derive(Debug)]
struct DecoderLayer {
    attn: Attention,
    input_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    ffn: FeedForward,
}

impl DecoderLayer {
    fn load(
        vb: &VarBuilder,
        spec: &LayerSpec,
        hidden: usize,
        rope: Arc<Rotary>,
        cfg: &RuntimeConfig,
    ) -> Result<Self> {
        let eps = cfg.rms_norm_eps;
        let act = Activation::Silu;
        let norm = |name: &str| RmsNorm::load(&vb.pp(name), hidden, eps);
        let attn_opts = AttentionOptions {
            bias: cfg.attention_bias,
            qkv_norms: true,
            eps,
            scale: (spec.head_dim as f64).powf(-0.5),
        };
        let vb_attn = vb.pp("self_attn");
        let gate = SoftplusOutputGate::load(
            &vb_attn.pp("g_proj"),
            hidden,
            spec.q_heads,
            spec.head_dim,
            cfg.gate,
        )?;
        let attn = Attention::load(
            &vb_attn,
            &spec.softmax_geometry()?,
            hidden,
            rope,
            &attn_opts,
        )?
        .without_value_norm()
        .with_output_gate(gate);
        let ffn = match &spec.ffn {
            Ffn::Dense { width } => {
                FeedForward::Dense(GatedMlp::load(&vb.pp("mlp"), hidden, *width, act)?)
            }
            Ffn::Moe {
                experts,
                top_k,
                width,
                shared_width,
                dense_width: None,
                ..
            } => FeedForward::Sparse(Box::new(SharedExpertMoe::load(
                &vb.pp("mlp"),
                &SharedExpertMoeShape {
                    hidden,
                    experts: *experts,
                    top_k: *top_k,
                    width: *width,
                    shared_width: *shared_width,
                },
                act,
                cfg.moe_routed_scaling_factor,
                cfg.moe_router_logit_softcapping,
            )?)),
            Ffn::Moe { .. } => bail!(
                "internal: layer {}: Laguna has no dense MLP beside its experts",
                spec.index
            ),
        };
        Ok(DecoderLayer {
            attn,
            input_norm: norm("input_layernorm")?,
            post_attn_norm: norm("post_attention_layernorm")?,
            ffn,
        })
    }

    /// h `[b, n, hidden]` → `[b, n, hidden]`.
    fn forward(&self, h: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        // 1. Attention (gated output), residual.
        let x = self.attn.forward(&self.input_norm.forward(h)?, ctx)?;
        let (h, x) = residual_then_norm(h, &x, None, &self.post_attn_norm)?;

        // 2. Dense MLP or sigmoid-routed experts + shared expert, residual.
        let x = match &self.ffn {
            FeedForward::Dense(mlp) => mlp.forward(&x)?,
            FeedForward::Sparse(moe) => moe.forward(&x)?,
        };
        Ok((h + x)?)
    }
}

/// The Laguna model with its output head.
#[derive(Debug)]
pub struct LagunaModel {
    spec: ArchSpec,
    cfg: RuntimeConfig,
    embed: ScaledEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    device: Device,
}

/// The RoPE table of one layer, from its type's frequencies.
fn rotary_for(spec: &LayerSpec, cfg: &RuntimeConfig, device: &Device) -> Result<Rotary> {
    let (freqs, ty): (&Option<RopeFrequencies>, &str) = match spec.attention {
        AttnKind::Full => (&cfg.rope_full, "full_attention"),
        AttnKind::Sliding { .. } => (&cfg.rope_sliding, "sliding_attention"),
        ref other => bail!(
            "layer {}: Laguna layers are full or sliding, not {}",
            spec.index,
            other.label()
        ),
    };
    let f = freqs
        .as_ref()
        .ok_or_else(|| anyhow!("layer {}: no RoPE parameters for `{ty}`", spec.index))?;
    Rotary::leading(
        f.inv_freq.clone(),
        spec.head_dim,
        f.attention_scaling,
        device,
    )
    .with_context(|| format!("layer {} (`rope_parameters.{ty}`)", spec.index))
}

impl LagunaModel {
    pub fn runtime_config(&self) -> &RuntimeConfig {
        &self.cfg
    }
}

impl FamilyModel for LagunaModel {
    type Config = RuntimeConfig;

    fn family() -> &'static Family {
        &super::FAMILY
    }

    fn parse(text: &TextConfig) -> Result<(ArchSpec, RuntimeConfig)> {
        super::parse(text)
    }

    fn new(
        spec: ArchSpec,
        cfg: RuntimeConfig,
        vb: VarBuilder,
        lm_head: Option<VarBuilder>,
    ) -> Result<Self> {
        let device = vb.device().clone();
        let hidden = spec.hidden_size;
        let embed = ScaledEmbedding::load(&vb.pp("embed_tokens"), spec.vocab_size, hidden, 1.0)?;

        // One RoPE table per layer type (the head dim is model-wide).
        // One table per layer type (and head width).
        let mut ropes = SharedTables::new();
        let vb_layers = vb.pp("layers");
        let mut layers = Vec::with_capacity(spec.layers.len());
        for l in &spec.layers {
            let key = (matches!(l.attention, AttnKind::Sliding { .. }), l.head_dim);
            let rope = ropes.get_or_build(key, || rotary_for(l, &cfg, &device))?;
            layers.push(
                DecoderLayer::load(&vb_layers.pp(l.index), l, hidden, rope, &cfg)
                    .with_context(|| format!("layer {}", l.index))?,
            );
        }

        let lm_head = output_head(
            spec.tie_word_embeddings,
            &embed,
            lm_head,
            hidden,
            spec.vocab_size,
        )?;
        Ok(LagunaModel {
            norm: RmsNorm::load(&vb.pp("norm"), hidden, cfg.rms_norm_eps)?,
            spec,
            cfg,
            embed,
            layers,
            lm_head,
            device,
        })
    }
}

impl CausalLm for LagunaModel {
    fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    /// Feeds `tokens` at positions `cache.seen()..`. On error the cache may hold part of the
    /// chunk: clear it before reusing it.
    fn forward_logits(&self, tokens: &[u32], cache: &mut KvStore, rows: Rows) -> Result<Tensor> {
        crate::arch::check_tokens(tokens, self.spec.vocab_size)?;
        let n = tokens.len();
        if let Some((limit, kind)) = self.cfg.max_positions_limit() {
            if cache.seen() + n > limit {
                bail!(
                    "`{kind}` RoPE past position {limit} is not implemented (the reference recomputes \
                     its frequencies for the whole sequence there)"
                );
            }
        }
        let ids = Tensor::from_slice(tokens, (1, n), &self.device)?; // [1, n]

        // 1. Token embeddings. [1, n, hidden]
        let mut h = self.embed.forward_tokens(tokens, &ids)?;

        // 2. Decoder layers, sharing one forward context.
        {
            let mut ctx = ForwardCtx::new(cache, n, self.layers.len());
            for (i, layer) in self.layers.iter().enumerate() {
                h = layer
                    .forward(&h, &mut ctx)
                    .with_context(|| format!("layer {i}"))?;
            }
        }
        cache.advance(n);

        // 3. Final norm, output head. [rows, vocab]
        rows.logits(&h, self.spec.vocab_size, |h| {
            self.lm_head.forward(&self.norm.forward(h)?)
        })
    }
}
