//! The Gemma 4 text network (`Gemma4TextModel` + the causal-LM head of `Gemma4ForCausalLM`),
//! every variant, built from the per-layer table. Reference: transformers 5.23.0
//! `models/gemma4/modeling_gemma4.py`; weight names mirror it under the text-model root
//! (`model.` or `model.language_model.`, applied by the loader).
//!
//! Per token: scaled embedding (`sqrt(hidden)` cast to the weight dtype) → per-layer embeddings
//! (E2B/E4B) → decoder layers → RMS norm → output head (tied to the embedding unless the config
//! unties it) → `tanh` soft-cap. A decoder layer:
//!
//! 1. `h += post_attn_norm(attn(input_norm(h)))`: q/k/v head norms, attention scale 1.0, RoPE per
//!    layer type (sliding: default; full: proportional partial), a sliding window or full
//!    causal mask; KV-shared layers attend their owner's K/V from this forward; K=V full layers
//!    store one tensor (see [`crate::layers::attention`]);
//! 2. `h += post_ffn_norm(mlp(pre_ffn_norm(h)))`; with the MoE block (26B-A4B) the MLP output is
//!    `post_ffn_norm_1(mlp(..)) + post_ffn_norm_2(experts(pre_ffn_norm_2(h)))`, routed from `h`
//!    before the MLP's norm; KV-shared layers may have a double-wide MLP;
//! 3. with PLE: `h += norm(proj(gelu(gate h) · ple_i))`;
//! 4. `h *= layer_scalar`.

use super::RuntimeConfig;
use crate::arch::config::TextConfig;
use crate::arch::{ArchSpec, Ffn, LayerSpec};
use crate::arch::{CausalLm, Family, FamilyModel, Rows};
use crate::layers::attention::{Attention, AttentionOptions, ForwardCtx};
use crate::layers::embedding::{softcap, ScaledEmbedding};
use crate::layers::kv_store::KvStore;
use crate::layers::linear::{output_head, Linear};
use crate::layers::mlp::{Activation, GatedMlp};
use crate::layers::moe::{PackedExperts, SoftmaxTopKRouter};
use crate::layers::norm::{residual, residual_normed, residual_then_norm, RmsNorm};
use crate::layers::per_layer_embedding::{PerLayerEmbedding, PerLayerGate};
use crate::layers::rope::{Rotary, SharedTables};
use crate::layers::weight;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

/// The MoE branch beside the dense MLP (26B-A4B).
#[derive(Debug)]
struct MoeBranch {
    router: SoftmaxTopKRouter,
    experts: PackedExperts,
    pre_norm: RmsNorm,
    post_norm_mlp: RmsNorm,
    post_norm_experts: RmsNorm,
}

#[derive(Debug)]
struct DecoderLayer {
    attn: Attention,
    input_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    pre_ffn_norm: RmsNorm,
    post_ffn_norm: RmsNorm,
    mlp: GatedMlp,
    moe: Option<MoeBranch>,
    ple: Option<PerLayerGate>,
    /// `[1]`, model dtype.
    layer_scalar: Tensor,
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
        let act = Activation::GeluTanh;
        let norm = |name: &str| RmsNorm::load(&vb.pp(name), hidden, eps);
        let attn_opts = AttentionOptions {
            bias: cfg.attention_bias,
            qkv_norms: true,
            eps,
            scale: 1.0,
        };
        let (mlp_width, moe) = match &spec.ffn {
            Ffn::Dense { width } => (*width, None),
            Ffn::Moe {
                experts,
                top_k,
                width,
                dense_width: Some(dense),
                ..
            } => {
                let branch = MoeBranch {
                    router: SoftmaxTopKRouter::load(
                        &vb.pp("router"),
                        hidden,
                        *experts,
                        *top_k,
                        eps,
                    )?,
                    experts: PackedExperts::load(&vb.pp("experts"), hidden, *experts, *width, act)?,
                    pre_norm: norm("pre_feedforward_layernorm_2")?,
                    post_norm_mlp: norm("post_feedforward_layernorm_1")?,
                    post_norm_experts: norm("post_feedforward_layernorm_2")?,
                };
                (*dense, Some(branch))
            }
            Ffn::Moe {
                dense_width: None, ..
            } => bail!(
                "layer {}: Gemma 4 runs its experts beside a dense MLP, but the table has none",
                spec.index
            ),
        };
        Ok(DecoderLayer {
            attn: Attention::load(
                &vb.pp("self_attn"),
                &spec.softmax_geometry()?,
                hidden,
                rope,
                &attn_opts,
            )?,
            input_norm: norm("input_layernorm")?,
            post_attn_norm: norm("post_attention_layernorm")?,
            pre_ffn_norm: norm("pre_feedforward_layernorm")?,
            post_ffn_norm: norm("post_feedforward_layernorm")?,
            mlp: GatedMlp::load(&vb.pp("mlp"), hidden, mlp_width, act)?,
            moe,
            ple: match spec.ple_width {
                Some(w) => Some(PerLayerGate::load(vb, hidden, w, eps, act)?),
                None => None,
            },
            layer_scalar: weight::get(vb, 1, "layer_scalar")?,
        })
    }

    /// h `[b, n, hidden]`, this layer's per-layer embedding `[b, n, width]` → `[b, n, hidden]`,
    /// and `next(h)` where asked (the next layer's input norm, computed with this layer's last
    /// residual: one kernel on CUDA). `normed` is `input_norm(h)` where the layer before made it.
    fn forward(
        &self,
        h: &Tensor,
        normed: Option<Tensor>,
        ple: Option<&Tensor>,
        ctx: &mut ForwardCtx,
        next: Option<&RmsNorm>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let normed = match normed {
            Some(x) => x,
            None => self.input_norm.forward(h)?,
        };
        // 1. Attention, with its own pre- and post-norm.
        let x = self.attn.forward(&normed, ctx)?;
        let (h, normed) =
            residual_then_norm(h, &x, Some(&self.post_attn_norm), &self.pre_ffn_norm)?;

        // 2. Feed-forward: the dense MLP, and the experts beside it (routed from `h`).
        let x = self.mlp.forward(&normed)?;
        let x = match &self.moe {
            Some(m) => {
                let (b, n, d) = h.dims3()?;
                let flat = h.reshape((b * n, d))?; // [tokens, hidden]
                let picks = m.router.pick(&flat)?;
                let y = m.experts.forward(&m.pre_norm.forward(&flat)?, &picks)?;
                let y = m.post_norm_experts.forward(&y.reshape((b, n, d))?)?;
                (m.post_norm_mlp.forward(&x)? + y)?
            }
            None => x,
        };
        // 3. Per-layer embedding, through a gated residual; 4. the layer scalar, with the last
        //    residual (and the next layer's input norm).
        let scalar = Some(&self.layer_scalar);
        match (&self.ple, ple) {
            (Some(gate), Some(e)) => {
                let h = residual_normed(&h, &x, &self.post_ffn_norm)?;
                gate.forward(&h, e, scalar, next)
            }
            (None, None) => residual(&h, &x, Some(&self.post_ffn_norm), scalar, next),
            _ => bail!("internal: per-layer embedding given to a layer without its gate, or not"),
        }
    }
}

/// The Gemma 4 text model with its output head.
#[derive(Debug)]
pub struct Gemma4Model {
    spec: ArchSpec,
    cfg: RuntimeConfig,
    embed: ScaledEmbedding,
    ple: Option<PerLayerEmbedding>,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    device: Device,
}

/// RoPE for one layer as `Gemma4TextRotaryEmbedding` builds it. Its `default` uses the whole
/// head (it ignores `partial_rotary_factor`); `proportional` rotates `⌊partial·d/2⌋` pairs with
/// frequencies over the whole head dim.
fn rotary_for(spec: &LayerSpec, device: &Device) -> Result<Rotary> {
    let rope = spec
        .rope
        .as_ref()
        .ok_or_else(|| anyhow!("layer {}: no RoPE parameters", spec.index))?;
    rotary_from(rope, spec.head_dim, spec.index, device)
}

/// [`rotary_for`] from the RoPE parameters and head dim of layer `index` (the assistant's layers
/// have no table row).
pub(super) fn rotary_from(
    rope: &crate::arch::Rope,
    d: usize,
    index: usize,
    device: &Device,
) -> Result<Rotary> {
    match rope.kind {
        crate::arch::RopeKind::Default => Rotary::default_rope(rope.theta, d, device),
        crate::arch::RopeKind::Proportional => Rotary::proportional(
            rope.theta,
            d,
            rope.rotary_dim / 2,
            rope.factor.unwrap_or(1.0),
            device,
        ),
        other => bail!(
            "layer {index}: rope_type `{other}` is not implemented for Gemma 4 (default and proportional are)"
        ),
    }
    .with_context(|| format!("layer {index}"))
}

impl Gemma4Model {
    pub fn runtime_config(&self) -> &RuntimeConfig {
        &self.cfg
    }
}

/// What makes two layers' RoPE tables identical.
#[derive(Debug, PartialEq)]
struct LayerKey {
    rope: Option<crate::arch::Rope>,
    head_dim: usize,
}

impl LayerKey {
    fn of(l: &LayerSpec) -> Self {
        LayerKey {
            rope: l.rope.clone(),
            head_dim: l.head_dim,
        }
    }
}

impl FamilyModel for Gemma4Model {
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
        let n = spec.layers.len();
        let eps = cfg.rms_norm_eps;
        let embed = ScaledEmbedding::load(
            &vb.pp("embed_tokens"),
            spec.vocab_size,
            hidden,
            (hidden as f64).sqrt(),
        )?;

        let ple_width = spec.layers.first().and_then(|l| l.ple_width);
        if spec.layers.iter().any(|l| l.ple_width != ple_width) {
            bail!("internal: Gemma 4 layers disagree on the per-layer embedding width");
        }
        let ple = match ple_width {
            Some(w) => Some(PerLayerEmbedding::load(
                &vb,
                cfg.vocab_size_per_layer_input,
                hidden,
                n,
                w,
                eps,
            )?),
            None => None,
        };

        // One RoPE table per distinct (parameters, head dim): in practice one per layer type.
        let mut ropes = SharedTables::new();
        let vb_layers = vb.pp("layers");
        let mut layers = Vec::with_capacity(n);
        for l in &spec.layers {
            let rope = ropes.get_or_build(LayerKey::of(l), || rotary_for(l, &device))?;
            layers.push(DecoderLayer::load(
                &vb_layers.pp(l.index),
                l,
                hidden,
                rope,
                &cfg,
            )?);
        }

        let lm_head = output_head(
            spec.tie_word_embeddings,
            &embed,
            lm_head,
            hidden,
            spec.vocab_size,
        )?;
        Ok(Gemma4Model {
            norm: RmsNorm::load(&vb.pp("norm"), hidden, eps)?,
            spec,
            cfg,
            embed,
            ple,
            layers,
            lm_head,
            device,
        })
    }
}

impl CausalLm for Gemma4Model {
    fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    fn input_embedding(&self, tokens: &[u32]) -> Result<Tensor> {
        self.embed.lookup(tokens, &self.device)
    }

    /// Feeds `tokens` at positions `cache.seen()..`. On error the cache may hold part of the
    /// chunk: clear it before reusing it.
    fn forward_logits(&self, tokens: &[u32], cache: &mut KvStore, rows: Rows) -> Result<Tensor> {
        crate::arch::check_tokens(tokens, self.spec.vocab_size)?;
        let n = tokens.len();
        let ids = Tensor::from_slice(tokens, (1, n), &self.device)?; // [1, n]

        // 1. Token embeddings [1, n, hidden] and per-layer embeddings [1, n, layers, width].
        let mut h = self.embed.forward_tokens(tokens, &ids)?;
        let ple = match &self.ple {
            Some(p) => Some(p.forward(tokens, &ids, &h)?),
            None => None,
        };

        // 2. Decoder layers, sharing one forward context (KV views for cross-layer sharing).
        {
            let mut ctx = ForwardCtx::new(cache, n, self.layers.len());
            let mut normed = None;
            for (i, layer) in self.layers.iter().enumerate() {
                let e = match &ple {
                    Some(p) => Some(p.narrow(2, i, 1)?.squeeze(2)?), // [1, n, width]
                    None => None,
                };
                let next = self.layers.get(i + 1).map(|l| &l.input_norm);
                (h, normed) = layer
                    .forward(&h, normed, e.as_ref(), &mut ctx, next)
                    .with_context(|| format!("layer {i}"))?;
            }
        }
        cache.advance(n);
        // The normed states a drafter reads (an assistant): every row where all are wanted (a
        // verify pass, of which only some may be kept), else the last. [1, n or 1, hidden]
        let normed = match rows {
            Rows::All => self.norm.forward(&h)?,
            _ => self.norm.forward(&h.narrow(1, n - 1, 1)?)?,
        };
        cache.set_last_hidden(normed.clone());

        // 3. Output head, soft-cap. [rows, vocab]
        rows.logits(&normed, self.spec.vocab_size, |h| {
            let logits = self.lm_head.forward(h)?;
            match self.cfg.final_logit_softcapping {
                Some(cap) => softcap(&logits, cap),
                None => Ok(logits),
            }
        })
    }
}
