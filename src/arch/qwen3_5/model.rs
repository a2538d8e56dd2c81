//! The Qwen3.5 / Qwen3.6 text network (`Qwen3_5TextModel` + head, dense or MoE), built from the
//! per-layer table. Reference: transformers 5.23.0 `models/qwen3_5/modeling_qwen3_5.py` and
//! `models/qwen3_5_moe/modeling_qwen3_5_moe.py`; weight names mirror them under the text-model
//! root (`model.` or the wrapper's `model.language_model.`, applied by the loader).
//!
//! Per token: embedding (unscaled) → decoder layers → RMS norm → output head. A decoder layer,
//! pre-norm with plain residuals:
//!
//! 1. `h += mixer(input_layernorm(h))`, the mixer being the layer's kind:
//!    - `linear_attention`: Gated DeltaNet ([`GatedDeltaNet`]), a fixed-size state;
//!    - `full_attention`: gated attention (`GatedAttention`): `q_proj` gives each head its query
//!      and a per-element gate side by side (`[.., heads, 2·head_dim]`), RMS norms on q and k
//!      heads, RoPE over the leading `partial_rotary_factor` of each head (text positions: the
//!      mRoPE sections all see the same position, so it is plain RoPE), causal attention over
//!      the GQA heads, then `sigmoid(gate) ·` the merged heads before `o_proj`;
//! 2. `h += mlp(post_attention_layernorm(h))`: a SwiGLU MLP, or (MoE) the softmax-routed top-k
//!    experts (renormalised) plus the shared expert times `sigmoid(shared_expert_gate x)`.
//!
//! Every RMS norm here but the DeltaNet's gated one scales by `1 + weight` (zero-centred
//! weights, `Qwen3_5RMSNorm`).

use super::RuntimeConfig;
use crate::arch::config::TextConfig;
use crate::arch::{ArchSpec, Attention as AttnKind, Ffn, LayerSpec};
use crate::arch::{CausalLm, Family, FamilyModel, Rows};
use crate::layers::attention::{attend_causal, CausalSpan};
use crate::layers::embedding::ScaledEmbedding;
use crate::layers::gated_deltanet::{DeltaNetShape, GatedDeltaNet};
use crate::layers::kv_store::KvStore;
use crate::layers::linear::{output_head, Linear};
use crate::layers::mlp::{Activation, GatedMlp};
use crate::layers::moe::routed::RoutedMoe;
use crate::layers::moe::score_routing::{ScoreFn, ScoreRouter};
use crate::layers::moe::PackedExperts;
use crate::layers::norm::{residual_then_norm, RmsNorm};
use crate::layers::rope::Rotary;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

/// The full-attention layers' attention with its sigmoid output gate.
#[derive(Debug)]
struct GatedAttention {
    index: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// `[heads · 2 · head_dim, hidden]`: per head, the query then its gate.
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    rope: Arc<Rotary>,
}

impl GatedAttention {
    fn load(
        vb: &VarBuilder,
        spec: &LayerSpec,
        hidden: usize,
        cfg: &RuntimeConfig,
        rope: Arc<Rotary>,
    ) -> Result<Self> {
        let (h, kvh, hd, bias) = (
            spec.q_heads,
            spec.kv_heads,
            spec.head_dim,
            cfg.attention_bias,
        );
        let norm = |name: &str| RmsNorm::load_zero_centred(&vb.pp(name), hd, cfg.rms_norm_eps);
        Ok(GatedAttention {
            index: spec.index,
            heads: h,
            kv_heads: kvh,
            head_dim: hd,
            q_proj: Linear::load(&vb.pp("q_proj"), hidden, 2 * h * hd, bias)?,
            k_proj: Linear::load(&vb.pp("k_proj"), hidden, kvh * hd, bias)?,
            v_proj: Linear::load(&vb.pp("v_proj"), hidden, kvh * hd, bias)?,
            o_proj: Linear::load(&vb.pp("o_proj"), h * hd, hidden, bias)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            rope,
        })
    }

    /// x `[n, hidden]` at positions `start..` → `[n, hidden]`.
    fn forward(&self, x: &Tensor, start: usize, cache: &mut KvStore) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);

        // 1. Query and gate side by side per head; QK norms; RoPE. q [1, h, n, hd]
        let qg = self.q_proj.forward(x)?.reshape((n, h, 2 * hd))?;
        let q = self.q_norm.forward(&qg.narrow(2, 0, hd)?)?;
        let gate = qg.narrow(2, hd, hd)?.contiguous()?.reshape((n, h * hd))?;
        let q = self.rope.apply(&q.unsqueeze(0)?.transpose(1, 2)?, start)?;
        let k = self
            .k_norm
            .forward(&self.k_proj.forward(x)?.reshape((n, kvh, hd))?)?;
        let k = self.rope.apply(&k.unsqueeze(0)?.transpose(1, 2)?, start)?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((1, n, kvh, hd))?
            .transpose(1, 2)?
            .contiguous()?;

        // 2. Causal attention over everything cached. [1, h, n, hd]
        let view = cache.append(self.index, k, Some(v))?;
        let span = CausalSpan {
            q_start: start,
            k_start: view.start, // 0: a full layer holds every position
            window: None,
        };
        let v = view
            .v
            .ok_or_else(|| anyhow::anyhow!("internal: no values cached"))?;
        let out = attend_causal(&q, &view.k, &v, span, (hd as f64).powf(-0.5))?;

        // 3. Merge the heads, gate, project.
        let out = out.transpose(1, 2)?.contiguous()?.reshape((n, h * hd))?;
        let out = (out * candle_nn::ops::sigmoid(&gate)?)?;
        self.o_proj.forward(&out)
    }
}

/// The token mixer of a layer.
#[derive(Debug)]
enum Mixer {
    Linear(GatedDeltaNet),
    Full(GatedAttention),
}

/// The feed-forward block of a layer.
#[derive(Debug)]
enum FeedForward {
    Dense(GatedMlp),
    /// Softmax-routed experts plus the shared expert times `sigmoid(shared_expert_gate x)`.
    Sparse(Box<RoutedMoe>),
}

impl FeedForward {
    fn load(vb: &VarBuilder, ffn: &Ffn, hidden: usize) -> Result<Self> {
        let act = Activation::Silu;
        Ok(match *ffn {
            Ffn::Dense { width } => FeedForward::Dense(GatedMlp::load(vb, hidden, width, act)?),
            Ffn::Moe {
                experts,
                top_k,
                width,
                shared_width: Some(shared_width),
                dense_width: None,
                ..
            } => {
                let router = ScoreRouter::top_k(
                    &vb.pp("gate"),
                    hidden,
                    experts,
                    top_k,
                    ScoreFn::Softmax,
                    1.0,
                )?;
                let packed =
                    PackedExperts::load_any(&vb.pp("experts"), hidden, experts, width, act)?;
                let shared = GatedMlp::load(&vb.pp("shared_expert"), hidden, shared_width, act)?;
                let gate =
                    Linear::load_unquantized(&vb.pp("shared_expert_gate"), hidden, 1, false)?;
                FeedForward::Sparse(Box::new(
                    RoutedMoe::new(router, packed, Some(shared)).with_shared_gate(gate),
                ))
            }
            ref other => bail!("Qwen3.5 has no `{}` feed-forward", other.label()),
        })
    }

    /// x `[n, hidden]` → `[n, hidden]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Dense(mlp) => mlp.forward(x),
            FeedForward::Sparse(moe) => moe.forward(x, &[]),
        }
    }
}

#[derive(Debug)]
pub(super) struct DecoderLayer {
    input_norm: RmsNorm,
    mixer: Mixer,
    post_attn_norm: RmsNorm,
    ffn: FeedForward,
}

impl DecoderLayer {
    pub(super) fn load(
        vb: &VarBuilder,
        spec: &LayerSpec,
        hidden: usize,
        cfg: &RuntimeConfig,
        rope: &Arc<Rotary>,
    ) -> Result<Self> {
        let eps = cfg.rms_norm_eps;
        let mixer = match spec.attention {
            AttnKind::Linear => Mixer::Linear(GatedDeltaNet::load(
                &vb.pp("linear_attn"),
                DeltaNetShape {
                    hidden,
                    key_heads: spec.kv_heads,
                    value_heads: spec.q_heads,
                    key_dim: spec.head_dim,
                    value_dim: spec.v_head_dim,
                    conv_kernel: cfg.conv_kernel,
                    eps,
                },
            )?),
            AttnKind::Full => Mixer::Full(GatedAttention::load(
                &vb.pp("self_attn"),
                spec,
                hidden,
                cfg,
                rope.clone(),
            )?),
            ref other => bail!("Qwen3.5 has no `{}` layers", other.label()),
        };
        Ok(DecoderLayer {
            input_norm: RmsNorm::load_zero_centred(&vb.pp("input_layernorm"), hidden, eps)?,
            mixer,
            post_attn_norm: RmsNorm::load_zero_centred(
                &vb.pp("post_attention_layernorm"),
                hidden,
                eps,
            )?,
            ffn: FeedForward::load(&vb.pp("mlp"), &spec.ffn, hidden)?,
        })
    }

    /// h `[n, hidden]` at positions `start..` → `[n, hidden]`; the layer's cache is slot
    /// `index`.
    pub(super) fn forward(
        &self,
        h: &Tensor,
        index: usize,
        start: usize,
        cache: &mut KvStore,
    ) -> Result<Tensor> {
        let x = self.input_norm.forward(h)?;
        let x = match &self.mixer {
            Mixer::Linear(net) => net.forward(&x, cache.layer_mut(index)?)?,
            Mixer::Full(attn) => attn.forward(&x, start, cache)?,
        };
        let (h, x) = residual_then_norm(h, &x, None, &self.post_attn_norm)?;
        let x = self.ffn.forward(&x)?;
        Ok((h + x)?)
    }
}

/// The full-attention layers' RoPE table.
pub(super) fn rotary(spec: &ArchSpec, cfg: &RuntimeConfig, device: &Device) -> Result<Arc<Rotary>> {
    let head_dim = spec
        .layers
        .iter()
        .find(|l| l.attention == AttnKind::Full)
        .map_or(2 * cfg.rope.inv_freq.len(), |l| l.head_dim);
    Ok(Arc::new(
        Rotary::leading(
            cfg.rope.inv_freq.clone(),
            head_dim,
            cfg.rope.attention_scaling,
            device,
        )
        .context("`rope_parameters`")?,
    ))
}

/// The Qwen3.5 text model with its output head.
#[derive(Debug)]
pub struct Qwen3_5Model {
    spec: ArchSpec,
    embed: ScaledEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    device: Device,
}

impl FamilyModel for Qwen3_5Model {
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
        let rope = rotary(&spec, &cfg, &device)?;
        let vb_layers = vb.pp("layers");
        let layers = spec
            .layers
            .iter()
            .map(|l| {
                DecoderLayer::load(&vb_layers.pp(l.index), l, hidden, &cfg, &rope)
                    .with_context(|| format!("layer {}", l.index))
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = output_head(
            spec.tie_word_embeddings,
            &embed,
            lm_head,
            hidden,
            spec.vocab_size,
        )?;
        Ok(Qwen3_5Model {
            norm: RmsNorm::load_zero_centred(&vb.pp("norm"), hidden, cfg.rms_norm_eps)?,
            spec,
            embed,
            layers,
            lm_head,
            device,
        })
    }
}

impl CausalLm for Qwen3_5Model {
    fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    /// Feeds `tokens` at positions `cache.seen()..`. On error the cache may hold part of the
    /// chunk: clear it before reusing it.
    fn forward_logits(&self, tokens: &[u32], cache: &mut KvStore, rows: Rows) -> Result<Tensor> {
        crate::arch::check_tokens(tokens, self.spec.vocab_size)?;
        let n = tokens.len();
        let start = cache.seen();
        let ids = Tensor::from_slice(tokens, (1, n), &self.device)?;

        // 1. Token embeddings. [n, hidden]
        let mut h = self.embed.forward_tokens(tokens, &ids)?.squeeze(0)?;

        // 2. Decoder layers.
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer
                .forward(&h, i, start, cache)
                .with_context(|| format!("layer {i}"))?;
        }
        cache.advance(n);

        // 3. Final norm (every row when a drafter keeps them: an MTP head), output head.
        //    [rows, vocab]
        let vocab = self.spec.vocab_size;
        if cache.wants_hidden_rows() {
            let normed = self.norm.forward(&h)?; // [n, hidden]
            cache.push_hidden_rows(tokens, normed.clone());
            rows.logits(&normed.unsqueeze(0)?, vocab, |h| self.lm_head.forward(h))
        } else {
            rows.logits(&h.unsqueeze(0)?, vocab, |h| {
                self.lm_head.forward(&self.norm.forward(h)?)
            })
        }
    }

    fn input_embedding(&self, tokens: &[u32]) -> Result<Tensor> {
        self.embed.lookup(tokens, &self.device)
    }

    fn output_head(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(h)?.to_dtype(DType::F32)?)
    }
}
