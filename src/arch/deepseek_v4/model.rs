//! The DeepSeek V4 network (`DeepseekV4Model` + the head of `DeepseekV4ForCausalLM`), built from
//! the per-layer table. Reference: transformers 5.23.0 `models/deepseek_v4/modeling_deepseek_v4.py`;
//! weight names are the reference's module names under the text-model root (checkpoints in the
//! Hub's own naming are renamed at load, see `checkpoint_name` in the family module).
//!
//! Per token: embedding → copied into `hc_mult` residual streams → decoder layers → the hyper
//! head collapses the streams → RMS norm → output head. A decoder layer:
//!
//! 1. `attn_hc` collapses the streams ([`HyperConnection`]); attention runs on
//!    `input_layernorm` of that; its output is mixed back into the streams;
//! 2. the same with `ffn_hc`, `post_attention_layernorm` and the MoE.
//!
//! Attention (`V4Attention`): low-rank queries (`q_a_proj` → `q_a_norm` → `q_b_proj`, then a
//! scale-less RMS norm per head), one shared K=V head (`kv_proj` → `kv_norm`), both rotated on
//! their trailing `qk_rope_head_dim` dims (interleaved pairs; sliding layers the "main" RoPE,
//! compressed layers the "compress" one). Each query attends, in one softmax with a per-head
//! sink logit: the last `sliding_window` tokens, plus on CSA/HCA layers compressed entries
//! ([`TokenCompressor`]) whose window is complete by the query's position — all of them (HCA), or
//! the lightning indexer's top-k ([`LightningIndexer`], CSA). Keys are values, so the output's
//! rope dims carry the keys' rotation: it is turned back at the query's position (−sin). The
//! heads then go through the grouped low-rank output projection: `o_groups` groups of heads, each
//! projected to `o_lora_rank` by its own block of `o_a_proj`, then `o_b_proj` to the hidden size.
//!
//! MoE: `routed_scaling_factor · Σ w_e · expert_e(x) + shared(x)`, experts chosen by the score
//! router or by the token-id hash table ([`ScoreRouter`]), SwiGLU with the `swiglu_limit` clamp
//! on routed and shared experts alike.
//!
//! As the reference (`_keep_in_fp32_modules_strict`), the hyper-connections, norms, sinks,
//! compressor position biases and the router's correction bias are read in f32 whatever the model
//! dtype.
//!
//! Cache per layer (in the [`KvStore`]): the window's K=V rows, and on compressed layers the
//! compressor's entries and carry (and the indexer's) as named states; their bytes equal
//! `kv-budget`'s parts.

use super::RuntimeConfig;
use crate::arch::config::{RopeFrequencies, TextConfig};
use crate::arch::{ArchSpec, Attention as AttnKind, LayerSpec};
use crate::arch::{CausalLm, Family, FamilyModel, Rows};
use crate::layers::attention::attend_shared_kv_with_sinks;
use crate::layers::embedding::ScaledEmbedding;
use crate::layers::hyper_connections::{HyperConnection, HyperHead};
use crate::layers::kv_store::{causal_mask, KvStore};
use crate::layers::lightning_indexer::{LightningIndexer, Selection};
use crate::layers::linear::{output_head, Linear};
use crate::layers::mlp::{Activation, GatedMlp};
use crate::layers::moe::routed::RoutedMoe;
use crate::layers::moe::score_routing::ScoreRouter;
use crate::layers::moe::PackedExperts;
use crate::layers::norm::RmsNorm;
use crate::layers::rope::InterleavedRope;
use crate::layers::token_compressor::{CompressorState, TokenCompressor};
use crate::layers::weight;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

/// The attention of one layer.
#[derive(Debug)]
struct V4Attention {
    index: usize,
    heads: usize,
    head_dim: usize,
    window: usize,
    q_a_proj: Linear,
    q_a_norm: RmsNorm,
    q_b_proj: Linear,
    /// Scale-less, per head.
    q_b_norm: RmsNorm,
    kv_proj: Linear,
    kv_norm: RmsNorm,
    /// `[groups, o_lora_rank, heads·head_dim / groups]`.
    o_a: Tensor,
    o_b_proj: Linear,
    /// `[heads]`, f32.
    sinks: Tensor,
    rope: Arc<InterleavedRope>,
    compressor: Option<TokenCompressor>,
    indexer: Option<LightningIndexer>,
}

/// The RoPE of one kind of layer.
fn rope_of(f: &RopeFrequencies) -> Result<Arc<InterleavedRope>> {
    Ok(Arc::new(InterleavedRope::new(
        f.inv_freq.clone(),
        f.attention_scaling,
    )?))
}

impl V4Attention {
    fn load(
        vb: &VarBuilder,
        spec: &LayerSpec,
        hidden: usize,
        cfg: &RuntimeConfig,
        ropes: &Ropes,
    ) -> Result<Self> {
        let (heads, hd, eps) = (spec.q_heads, spec.head_dim, cfg.rms_norm_eps);
        let (window, ratio, top_k) = match spec.attention {
            AttnKind::Sliding { window } => (window, None, None),
            AttnKind::Compressed {
                ratio,
                window,
                index_topk,
            } => (window, Some(ratio), index_topk),
            ref other => bail!("DeepSeek V4 has no `{}` layers", other.label()),
        };
        let rope = if ratio.is_some() {
            ropes.compress.clone()
        } else {
            ropes.main.clone()
        };
        let (ql, groups, olr) = (cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank);
        let per_group = heads * hd / groups;
        let compressor = ratio
            .map(|r| {
                TokenCompressor::load(
                    &vb.pp("compressor"),
                    hidden,
                    hd,
                    r,
                    top_k.is_some(),
                    eps,
                    ropes.compress.clone(),
                    CompressorState::ATTENTION,
                )
            })
            .transpose()?;
        let indexer = match (ratio, top_k) {
            (Some(r), Some(k)) => {
                let vb = vb.pp("compressor").pp("indexer");
                let keys = TokenCompressor::load(
                    &vb,
                    hidden,
                    cfg.index_head_dim,
                    r,
                    true,
                    eps,
                    ropes.compress.clone(),
                    CompressorState::INDEXER,
                )?;
                Some(LightningIndexer::load(
                    &vb,
                    keys,
                    hidden,
                    ql,
                    cfg.index_n_heads,
                    cfg.index_head_dim,
                    k,
                    ropes.compress.clone(),
                )?)
            }
            _ => None,
        };
        Ok(V4Attention {
            index: spec.index,
            heads,
            head_dim: hd,
            window,
            q_a_proj: Linear::load(&vb.pp("q_a_proj"), hidden, ql, false)?,
            q_a_norm: RmsNorm::load_f32(&vb.pp("q_a_norm"), ql, eps)?,
            q_b_proj: Linear::load(&vb.pp("q_b_proj"), ql, heads * hd, false)?,
            q_b_norm: RmsNorm::plain(eps),
            kv_proj: Linear::load(&vb.pp("kv_proj"), hidden, hd, false)?,
            kv_norm: RmsNorm::load_f32(&vb.pp("kv_norm"), hd, eps)?,
            o_a: weight::get(&vb.pp("o_a_proj"), (groups * olr, per_group), "weight")?
                .reshape((groups, olr, per_group))?,
            o_b_proj: Linear::load(&vb.pp("o_b_proj"), groups * olr, hidden, false)?,
            sinks: weight::get_f32(vb, heads, "sinks")?,
            rope,
            compressor,
            indexer,
        })
    }

    /// x `[n, hidden]` at `positions` → `[n, hidden]`.
    fn forward(
        &self,
        x: &Tensor,
        positions: &[usize],
        cache: &mut KvStore,
        trace: Option<&mut Vec<(usize, Selection)>>,
    ) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (h, hd) = (self.heads, self.head_dim);
        let dev = x.device().clone();

        // 1. Low-rank queries, normed per head, rotated. [1, h, n, hd]
        let q_residual = self.q_a_norm.forward(&self.q_a_proj.forward(x)?)?; // [n, ql]
        let q = self.q_b_proj.forward(&q_residual)?.reshape((1, n, h, hd))?;
        let q = self.q_b_norm.forward(&q)?.transpose(1, 2)?;
        let q = self.rope.apply(&q, positions, false)?;

        // 2. The shared K=V head, rotated, into the window cache. [1, 1, t, hd]
        let kv = self.kv_norm.forward(&self.kv_proj.forward(x)?)?;
        let kv = self
            .rope
            .apply(&kv.reshape((1, 1, n, hd))?, positions, false)?;
        let view = cache.append(self.index, kv, None)?;
        let window_kv = view.k.squeeze(0)?.squeeze(0)?; // [t, hd]
        let t = window_kv.dim(0)?;
        let window_mask = causal_mask(n, positions[0], view.start, t, Some(self.window), &dev)?;

        // 3. Compressed entries and which of them each query sees. [T, hd], mask [n, T]
        let layer = cache.layer_mut(self.index)?;
        let entries = match &self.compressor {
            None => None,
            Some(c) => {
                let entries = c.forward(x, layer)?;
                let count = entries.dim(0)?;
                let mask = match &self.indexer {
                    // On a GPU (and the generic path) the indexer's choice is made where its
                    // scores lie, as a mask: nothing read back.
                    Some(ix) if trace.is_none() && !crate::kernels::fast_cpu(&dev) => {
                        match ix.select_mask(x, &q_residual, positions, layer)? {
                            Some(m) => m,
                            None => Tensor::full(f32::NEG_INFINITY, (n, count), &dev)?,
                        }
                    }
                    Some(ix) => {
                        let sel = ix.select(x, &q_residual, positions, layer)?;
                        let mask = picks_mask(&sel.picks, count, &dev)?;
                        if let Some(trace) = trace {
                            trace.push((self.index, sel));
                        }
                        mask
                    }
                    None => {
                        let visible: Vec<Vec<usize>> = positions
                            .iter()
                            .map(|&p| (0..((p + 1) / c.ratio()).min(count)).collect())
                            .collect();
                        picks_mask(&visible, count, &dev)?
                    }
                };
                if mask.dims() != [n, count] {
                    bail!(
                        "internal: layer {}: a mask of {:?} over {count} compressed entries",
                        self.index,
                        mask.dims()
                    );
                }
                Some((entries, mask))
            }
        };
        let entries = entries.as_ref().map(|(e, m)| (e, m));
        self.attend_out(&q, &window_kv, &window_mask, entries, positions)
    }

    /// Steps 4-6 of [`Self::forward`]: queries `q` `[1, h, n, hd]` attend the window `[t, hd]`
    /// (mask `[n, t]`) and the compressed entries with their mask (`[T, hd]`, `[n, T]`); the
    /// output, unrotated and projected. `[n, hidden]`
    fn attend_out(
        &self,
        q: &Tensor,
        window_kv: &Tensor,
        window_mask: &Tensor,
        entries: Option<(&Tensor, &Tensor)>,
        positions: &[usize],
    ) -> Result<Tensor> {
        let n = positions.len();
        // 4. One softmax over window keys, compressed entries and the per-head sink.
        let (keys, mask) = match entries {
            Some((e, m)) => (
                Tensor::cat(&[window_kv, e], 0)?,   // [t + T, hd]
                Tensor::cat(&[window_mask, m], 1)?, // [n, t + T]
            ),
            None => (window_kv.clone(), window_mask.clone()),
        };
        let out = attend_shared_kv_with_sinks(
            &q.squeeze(0)?,
            &keys,
            &mask,
            &self.sinks,
            (self.head_dim as f64).powf(-0.5),
        )?
        .unsqueeze(0)?; // [1, h, n, hd]

        // 5. Undo the keys' rotation on the output's rope dims, at the query positions.
        let out = self.rope.apply(&out, positions, true)?;

        // 6. Grouped low-rank output projection. [n, hidden]
        let (groups, _, per_group) = self.o_a.dims3()?;
        let out = out
            .squeeze(0)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((n, groups, per_group))?
            .transpose(0, 1)?
            .contiguous()?; // [groups, n, per_group]
        let grouped = out.matmul(&self.o_a.transpose(1, 2)?)?; // [groups, n, o_lora]
        let grouped = grouped.transpose(0, 1)?.contiguous()?.reshape((n, ()))?;
        self.o_b_proj.forward(&grouped)
    }
}

/// The additive mask `[queries, count]` (f32) of each query's picked entries: 0 there, −∞
/// elsewhere.
fn picks_mask(picks: &[Vec<usize>], count: usize, dev: &Device) -> Result<Tensor> {
    let mut m = vec![f32::NEG_INFINITY; picks.len() * count];
    for (qi, picks) in picks.iter().enumerate() {
        for &e in picks {
            m[qi * count + e] = 0.0;
        }
    }
    Ok(Tensor::from_vec(m, (picks.len(), count), dev)?)
}

/// The MoE block of one layer: score- or hash-routed experts plus the shared expert, SwiGLU
/// clamped on both.
#[derive(Debug)]
struct V4Moe(RoutedMoe);

impl V4Moe {
    fn load(
        vb: &VarBuilder,
        spec: &LayerSpec,
        hidden: usize,
        vocab: usize,
        cfg: &RuntimeConfig,
    ) -> Result<Self> {
        let crate::arch::Ffn::Moe {
            experts,
            top_k,
            width,
            ..
        } = spec.ffn
        else {
            bail!("internal: DeepSeek V4 layers are MoE");
        };
        let act = Activation::Silu;
        let gate = vb.pp("gate");
        let router = if cfg.hashed[spec.index] {
            ScoreRouter::hash(
                &gate,
                hidden,
                experts,
                top_k,
                vocab,
                cfg.scoring,
                cfg.routed_scaling_factor,
            )?
        } else {
            ScoreRouter::top_k(
                &gate,
                hidden,
                experts,
                top_k,
                cfg.scoring,
                cfg.routed_scaling_factor,
            )?
        };
        let experts = PackedExperts::load_any(&vb.pp("experts"), hidden, experts, width, act)?
            .with_swiglu_limit(cfg.swiglu_limit);
        let shared = GatedMlp::load(&vb.pp("shared_experts"), hidden, width, act)?
            .with_swiglu_limit(cfg.swiglu_limit);
        Ok(V4Moe(RoutedMoe::new(router, experts, Some(shared))))
    }

    /// x `[n, hidden]` of tokens `ids` → `[n, hidden]`.
    fn forward(&self, x: &Tensor, ids: &[u32]) -> Result<Tensor> {
        self.0.forward(x, ids)
    }
}

#[derive(Debug)]
struct DecoderLayer {
    attn_hc: HyperConnection,
    input_norm: RmsNorm,
    attn: V4Attention,
    ffn_hc: HyperConnection,
    post_attn_norm: RmsNorm,
    moe: V4Moe,
}

/// The two RoPE tables, shared by every layer.
struct Ropes {
    main: Arc<InterleavedRope>,
    compress: Arc<InterleavedRope>,
}

impl DecoderLayer {
    fn load(
        vb: &VarBuilder,
        spec: &LayerSpec,
        arch: &ArchSpec,
        cfg: &RuntimeConfig,
        ropes: &Ropes,
    ) -> Result<Self> {
        let (hidden, eps) = (arch.hidden_size, cfg.rms_norm_eps);
        let hc = |name: &str| {
            HyperConnection::load(
                &vb.pp(name),
                cfg.hc_mult,
                hidden,
                cfg.hc_sinkhorn_iters,
                cfg.hc_eps,
                eps,
            )
        };
        Ok(DecoderLayer {
            attn_hc: hc("attn_hc")?,
            input_norm: RmsNorm::load_f32(&vb.pp("input_layernorm"), hidden, eps)?,
            attn: V4Attention::load(&vb.pp("self_attn"), spec, hidden, cfg, ropes)?,
            ffn_hc: hc("ffn_hc")?,
            post_attn_norm: RmsNorm::load_f32(&vb.pp("post_attention_layernorm"), hidden, eps)?,
            moe: V4Moe::load(&vb.pp("mlp"), spec, hidden, arch.vocab_size, cfg)?,
        })
    }

    /// streams `[n, M, hidden]` → `[n, M, hidden]`.
    fn forward(
        &self,
        streams: &Tensor,
        ids: &[u32],
        positions: &[usize],
        cache: &mut KvStore,
        trace: Option<&mut Vec<(usize, Selection)>>,
    ) -> Result<Tensor> {
        // 1. Attention between the streams' collapse and the mix back.
        let (x, mix) = self.attn_hc.collapse(streams)?;
        let out = self
            .attn
            .forward(&self.input_norm.forward(&x)?, positions, cache, trace)?;
        let streams = mix.apply(streams, &out)?;

        // 2. The same around the MoE.
        let (x, mix) = self.ffn_hc.collapse(&streams)?;
        let out = self.moe.forward(&self.post_attn_norm.forward(&x)?, ids)?;
        mix.apply(&streams, &out)
    }
}

/// The DeepSeek V4 model with its output head.
#[derive(Debug)]
pub struct DeepseekV4Model {
    spec: ArchSpec,
    cfg: RuntimeConfig,
    embed: ScaledEmbedding,
    layers: Vec<DecoderLayer>,
    hc_head: HyperHead,
    norm: RmsNorm,
    lm_head: Linear,
    device: Device,
}

impl DeepseekV4Model {
    pub fn runtime_config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    /// [`CausalLm::forward_logits`], also returning what every CSA layer's indexer selected
    /// (by layer), for tests and diagnostics.
    pub fn forward_traced(
        &self,
        tokens: &[u32],
        cache: &mut KvStore,
        rows: Rows,
    ) -> Result<(Tensor, Vec<(usize, Selection)>)> {
        let mut trace = vec![];
        let logits = self.run(tokens, cache, rows, Some(&mut trace))?;
        Ok((logits, trace))
    }

    fn run(
        &self,
        tokens: &[u32],
        cache: &mut KvStore,
        rows: Rows,
        mut trace: Option<&mut Vec<(usize, Selection)>>,
    ) -> Result<Tensor> {
        crate::arch::check_tokens(tokens, self.spec.vocab_size)?;
        let n = tokens.len();
        let start = cache.seen();
        let positions: Vec<usize> = (start..start + n).collect();
        let ids = Tensor::from_slice(tokens, (1, n), &self.device)?;

        // 1. Embeddings, copied into the residual streams. [n, M, hidden]
        let h = self.embed.forward_tokens(tokens, &ids)?.squeeze(0)?; // [n, hidden]
        let m = self.cfg.hc_mult;
        let mut streams = h
            .unsqueeze(1)?
            .broadcast_as((n, m, self.spec.hidden_size))?
            .contiguous()?;

        // 2. Decoder layers.
        for (i, layer) in self.layers.iter().enumerate() {
            streams = layer
                .forward(&streams, tokens, &positions, cache, trace.as_deref_mut())
                .with_context(|| format!("layer {i}"))?;
        }
        cache.advance(n);

        // 3. Collapse the streams, norm, output head. [rows, vocab]
        let h = self.hc_head.collapse(&streams)?.unsqueeze(0)?; // [1, n, hidden]
        rows.logits(&h, self.spec.vocab_size, |h| {
            self.lm_head.forward(&self.norm.forward(h)?)
        })
    }
}

impl FamilyModel for DeepseekV4Model {
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
        let ropes = Ropes {
            main: rope_of(&cfg.rope_main).context("`rope_parameters.main`")?,
            compress: rope_of(&cfg.rope_compress).context("`rope_parameters.compress`")?,
        };
        let vb_layers = vb.pp("layers");
        let layers = spec
            .layers
            .iter()
            .map(|l| {
                DecoderLayer::load(&vb_layers.pp(l.index), l, &spec, &cfg, &ropes)
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
        Ok(DeepseekV4Model {
            hc_head: HyperHead::load(
                &vb.pp("hc_head"),
                cfg.hc_mult,
                hidden,
                cfg.hc_eps,
                cfg.rms_norm_eps,
            )?,
            norm: RmsNorm::load_f32(&vb.pp("norm"), hidden, cfg.rms_norm_eps)?,
            spec,
            cfg,
            embed,
            layers,
            lm_head,
            device,
        })
    }
}

impl CausalLm for DeepseekV4Model {
    fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    /// Feeds `tokens` at positions `cache.seen()..`. On error the cache may hold part of the
    /// chunk: clear it before reusing it.
    fn forward_logits(&self, tokens: &[u32], cache: &mut KvStore, rows: Rows) -> Result<Tensor> {
        self.run(tokens, cache, rows, None)
    }
}
