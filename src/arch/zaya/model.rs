//! The ZAYA network (`ZayaModel` + the causal-LM head of `ZayaForCausalLM`), built from the
//! per-layer table. Reference: transformers 5.23.0 `models/zaya/modeling_zaya.py`; weight names
//! mirror it under the text-model root (`model.`, applied by the loader).
//!
//! Per token: embedding (unscaled), then `(e + input_hidden_states_bias) ·
//! input_hidden_states_scale`, kept in f32 as the residual stream → decoder layers → RMS norm →
//! output head (tied to the embedding by default, optional bias). A decoder layer:
//!
//! 1. `h = post_attention_residual_scale(cca(input_norm(h)), h)`: Compressed Convolutional
//!    Attention ([`crate::layers::cca`]) with the layer type's RoPE (`hybrid`: all tokens,
//!    `hybrid_sliding`: the last `sliding_window`);
//! 2. `h = post_mlp_residual_scale(experts(x), h)` with `x = post_attention_norm(h)`: the MLP
//!    router ([`crate::layers::moe::mlp_router`]) picks one expert (or the skip class, no expert) per
//!    token, weighted by its softmax probability; the router's hidden state is handed on to the
//!    next layer's router (EDA) within the forward.
//!
//! Both residual scalings are `(branch + b) · s + (h + b') · s'`
//! ([`crate::layers::residual_scaling`]).
//!
//! The cache holds, per layer, K and V (`num_key_value_heads × head_dim` per token; the last
//! `sliding_window` tokens on sliding layers), the conv state (the last `(t0 − 1) + (t1 − 1)`
//! q/k projection rows) and the delayed-V state (the previous token's `v_proj_delayed`).

use super::RuntimeConfig;
use crate::arch::config::TextConfig;
use crate::arch::{ArchSpec, Attention as AttnKind, Ffn, LayerSpec};
use crate::arch::{CausalLm, Family, FamilyModel, Rows};
use crate::layers::attention::ForwardCtx;
use crate::layers::cca::{CcaAttention, CcaShape};
use crate::layers::embedding::ScaledEmbedding;
use crate::layers::kv_store::KvStore;
use crate::layers::linear::Linear;
use crate::layers::mlp::Activation;
use crate::layers::moe::mlp_router::MlpRouter;
use crate::layers::moe::PackedExperts;
use crate::layers::norm::RmsNorm;
use crate::layers::residual_scaling::{ResidualScaling, ShiftScale};
use crate::layers::rope::{self, Rotary, SharedTables};
use crate::layers::weight;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

#[derive(Debug)]
struct DecoderLayer {
    attn: CcaAttention,
    input_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    post_attn_scale: ResidualScaling,
    post_mlp_scale: ResidualScaling,
    router: MlpRouter,
    experts: PackedExperts,
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
        let window = match spec.attention {
            AttnKind::Cca { window } => window,
            ref other => bail!(
                "layer {}: ZAYA layers use CCA, not {}",
                spec.index,
                other.label()
            ),
        };
        let shape = CcaShape {
            hidden,
            q_heads: spec.q_heads,
            kv_heads: spec.kv_heads,
            head_dim: spec.head_dim,
            time0: cfg.cca_time0,
            time1: cfg.cca_time1,
            bias: cfg.attention_bias,
            window,
        };
        let (experts, top_k, width) = match &spec.ffn {
            Ffn::Moe {
                experts,
                top_k,
                width,
                ..
            } => (*experts, *top_k, *width),
            _ => bail!("internal: layer {}: ZAYA layers are MoE", spec.index),
        };
        let mlp = vb.pp("mlp");
        let experts_block =
            PackedExperts::load_any(&mlp.pp("experts"), hidden, experts, width, Activation::Silu)?;
        let norm = |name: &str| RmsNorm::load(&vb.pp(name), hidden, eps);
        Ok(DecoderLayer {
            attn: CcaAttention::load(&vb.pp("self_attn"), spec.index, shape, rope)?,
            input_norm: norm("input_layernorm")?,
            post_attn_norm: norm("post_attention_layernorm")?,
            post_attn_scale: ResidualScaling::load(
                &vb.pp("post_attention_residual_scale"),
                hidden,
            )?,
            post_mlp_scale: ResidualScaling::load(&vb.pp("post_mlp_residual_scale"), hidden)?,
            router: MlpRouter::load(
                &mlp.pp("gate"),
                hidden,
                cfg.router_hidden_size,
                experts,
                top_k,
                spec.index > 0,
                eps,
            )?,
            experts: experts_block,
        })
    }

    /// h `[b, n, hidden]` (f32) and the previous layer's router state → (h, this layer's state).
    fn forward(
        &self,
        h: &Tensor,
        router_state: Option<&Tensor>,
        dtype: DType,
        ctx: &mut ForwardCtx,
    ) -> Result<(Tensor, Tensor)> {
        let (b, n, hidden) = h.dims3()?;
        // 1. CCA, scaled residual.
        let x = self.input_norm.forward(&h.to_dtype(dtype)?)?;
        let a = self.attn.forward(&x, ctx)?;
        let h = self.post_attn_scale.forward(&a, h)?;

        // 2. Top-1 experts (or none), scaled residual.
        let x = self.post_attn_norm.forward(&h.to_dtype(dtype)?)?;
        let (picks, state) = self.router.pick(&x, router_state)?;
        let y = self
            .experts
            .forward(&x.reshape((b * n, hidden))?, &picks)?
            .reshape((b, n, hidden))?;
        let h = self.post_mlp_scale.forward(&y, &h)?;
        Ok((h, state))
    }
}

/// The ZAYA model with its output head.
#[derive(Debug)]
pub struct ZayaModel {
    spec: ArchSpec,
    cfg: RuntimeConfig,
    embed: ScaledEmbedding,
    input_scale: ShiftScale,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    dtype: DType,
    device: Device,
}

/// The RoPE table of one layer: default RoPE over the leading `rotary_dim` dims of each head.
fn rotary_for(spec: &LayerSpec, device: &Device) -> Result<Rotary> {
    let r = spec
        .rope
        .as_ref()
        .ok_or_else(|| anyhow!("layer {}: no RoPE parameters", spec.index))?;
    if r.kind != crate::arch::RopeKind::Default {
        bail!(
            "layer {}: `rope_type` `{}` is not implemented for ZAYA (only `default`)",
            spec.index,
            r.kind
        );
    }
    if r.rotary_dim == 0 {
        bail!(
            "layer {}: `partial_rotary_factor` leaves no dimension of the {}-wide heads to rotate",
            spec.index,
            spec.head_dim
        );
    }
    Rotary::leading(
        rope::default_inv_freq(r.theta, r.rotary_dim),
        spec.head_dim,
        1.0,
        device,
    )
    .with_context(|| format!("layer {}", spec.index))
}

impl ZayaModel {
    pub fn runtime_config(&self) -> &RuntimeConfig {
        &self.cfg
    }
}

impl FamilyModel for ZayaModel {
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
        for l in &spec.layers {
            if let Ffn::Moe { top_k, .. } = l.ffn {
                if top_k != 1 {
                    bail!(
                        "layer {}: key `num_experts_per_tok` = {top_k}: ZAYA routes each token to exactly one expert",
                        l.index
                    );
                }
            }
        }
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let hidden = spec.hidden_size;
        let embed = ScaledEmbedding::load(&vb.pp("embed_tokens"), spec.vocab_size, hidden, 1.0)?;
        let input_scale = ShiftScale::load(
            &vb,
            hidden,
            "input_hidden_states_scale",
            "input_hidden_states_bias",
        )?;

        // One RoPE table per layer type.
        // One table for the full layers, one for the sliding ones.
        let mut ropes = SharedTables::new();
        let vb_layers = vb.pp("layers");
        let mut layers = Vec::with_capacity(spec.layers.len());
        for l in &spec.layers {
            let sliding = matches!(l.attention, AttnKind::Cca { window: Some(_) });
            let rope = ropes.get_or_build(sliding, || rotary_for(l, &device))?;
            layers.push(
                DecoderLayer::load(&vb_layers.pp(l.index), l, hidden, rope, &cfg)
                    .with_context(|| format!("layer {}", l.index))?,
            );
        }

        let missing_head = || {
            anyhow!(
                "the config unties the output head (`tie_word_embeddings` is false) or gives it a \
                 bias (`lm_head_bias`), but the checkpoint has no `lm_head`"
            )
        };
        let bias = if cfg.lm_head_bias {
            let vb = lm_head.as_ref().ok_or_else(missing_head)?;
            Some(weight::get(vb, spec.vocab_size, "bias")?)
        } else {
            None
        };
        // Held like every projection (mapped or quantized as the load says).
        let lm_head = if spec.tie_word_embeddings {
            embed.as_linear(bias)?
        } else {
            let vb = lm_head.ok_or_else(missing_head)?;
            let w = Linear::load(&vb, hidden, spec.vocab_size, false)?;
            w.with_bias(bias)
        };
        Ok(ZayaModel {
            norm: RmsNorm::load(&vb.pp("norm"), hidden, cfg.rms_norm_eps)?,
            spec,
            cfg,
            embed,
            input_scale,
            layers,
            lm_head,
            dtype,
            device,
        })
    }
}

impl CausalLm for ZayaModel {
    fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    /// Feeds `tokens` at positions `cache.seen()..`. On error the cache may hold part of the
    /// chunk: clear it before reusing it.
    fn forward_logits(&self, tokens: &[u32], cache: &mut KvStore, rows: Rows) -> Result<Tensor> {
        crate::arch::check_tokens(tokens, self.spec.vocab_size)?;
        let n = tokens.len();
        let ids = Tensor::from_slice(tokens, (1, n), &self.device)?; // [1, n]

        // 1. Token embeddings, shifted and scaled, as the f32 residual stream. [1, n, hidden]
        let e = self.embed.forward_tokens(tokens, &ids)?;
        let mut h = self.input_scale.forward(&e)?.to_dtype(DType::F32)?;

        // 2. Decoder layers, sharing one forward context and handing on the router state.
        {
            let mut ctx = ForwardCtx::new(cache, n, self.layers.len());
            let mut state: Option<Tensor> = None;
            for (i, layer) in self.layers.iter().enumerate() {
                let (next_h, next_state) = layer
                    .forward(&h, state.as_ref(), self.dtype, &mut ctx)
                    .with_context(|| format!("layer {i}"))?;
                h = next_h;
                state = Some(next_state);
            }
        }
        cache.advance(n);

        // 3. Final norm, output head. [rows, vocab]
        rows.logits(&h, self.spec.vocab_size, |h| {
            self.lm_head
                .forward(&self.norm.forward(&h.to_dtype(self.dtype)?)?)
        })
    }
}
