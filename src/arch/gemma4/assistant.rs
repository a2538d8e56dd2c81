//! Gemma 4's assistant drafter (`Gemma4AssistantForCausalLM`, model_type `gemma4_assistant`):
//! a small Gemma 4 text model that drafts tokens for its target and owns no KV cache. Reference:
//! transformers 5.25.0 `models/gemma4_assistant/modeling_gemma4_assistant.py`, driven by
//! `SinglePositionMultiTokenCandidateGenerator` (`generation/candidate_generator.py`); 5.23.0
//! cannot build it (every layer KV-shared), its code is otherwise the same.
//!
//! Notable:
//! - Every layer is KV-shared with the *target*: a sliding layer attends the target's last
//!   sliding cache owner, a full layer its last full one, read from the target's [`KvStore`]
//!   through the owner index the target uses (no copy, no cache of its own: zero KV bytes).
//!   The query sees every cached key (a bidirectional mask; on sliding layers the last
//!   `sliding_window + 1` keys, as the reference's flipped bidirectional window does).
//! - All drafts of a round sit at one position, the target's next one (`cache.seen()`), so the
//!   query's RoPE is the same each step.
//! - Input: `pre_projection([target embedding of the last token, target's last normed hidden
//!   state])` (`[1, 1, 2·backbone] → [1, 1, hidden]`); after a step `post_projection` of the
//!   assistant's own normed hidden state replaces the target's for the next step.
//! - Where this differs from the reference, on purpose: after a rejected draft the reference
//!   hands the assistant the verify pass's K/V cut to the sequence length, which still holds the
//!   rejected token's entry at the last token's position (and, on sliding layers, every row of
//!   the pass); here the assistant reads the rolled-back cache, i.e. only accepted tokens. The
//!   first round (from the prompt's prefill) is the same in both, and is what the fixtures test.
//!   The sliding layers see the last `min(window + 1, target window)` keys: an assistant window
//!   at least the target's would see one key fewer here than in the reference's first round.
//! - Head: the (tied) embedding, no soft-cap; with `use_ordered_embeddings` only the
//!   `centroid_intermediate_top_k` best of `num_centroids` clusters of `token_ordering` are
//!   scored, every other id gets `min(selected) − 1` (`Gemma4AssistantMaskedEmbedder`).

use super::model::rotary_from;
use crate::arch::config::rope_from_params;
use crate::arch::{Attention as Kind, CausalLm};
use crate::layers::attention::attend;
use crate::layers::embedding::ScaledEmbedding;
use crate::layers::kv_store::KvStore;
use crate::layers::linear::{output_head, Linear};
use crate::layers::mlp::{Activation, GatedMlp};
use crate::layers::norm::RmsNorm;
use crate::layers::rope::Rotary;
use crate::layers::weight;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::{Map, Value};

/// `config.json` of a Gemma 4 assistant (the keys the reference reads).
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: String,
    text_config: Value,
    #[serde(default = "default_backbone")]
    backbone_hidden_size: usize,
    #[serde(default)]
    use_ordered_embeddings: bool,
    #[serde(default = "default_centroids")]
    num_centroids: usize,
    #[serde(default = "default_centroid_top_k")]
    centroid_intermediate_top_k: usize,
    #[serde(default = "default_true")]
    tie_word_embeddings: bool,
}

fn default_backbone() -> usize {
    1536
}
fn default_centroids() -> usize {
    2048
}
fn default_centroid_top_k() -> usize {
    32
}
fn default_true() -> bool {
    true
}

/// The assistant's `text_config` (a `gemma4_text` config whose layers all share KV).
#[derive(Debug, Deserialize)]
struct RawText {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    head_dim: usize,
    #[serde(default)]
    global_head_dim: Option<usize>,
    #[serde(default)]
    per_layer_config: Option<Map<String, Value>>,
    layer_types: Vec<String>,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    sliding_window: usize,
    rope_parameters: Map<String, Value>,
    #[serde(default)]
    num_kv_shared_layers: usize,
    #[serde(default)]
    hidden_size_per_layer_input: usize,
    #[serde(default)]
    enable_moe_block: bool,
    #[serde(default)]
    use_double_wide_mlp: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    use_bidirectional_attention: Option<String>,
    #[serde(default = "default_act")]
    hidden_activation: String,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "gelu_pytorch_tanh".into()
}

/// One assistant layer: queries of its own, keys and values from a target layer's cache.
#[derive(Debug)]
struct Layer {
    q_proj: Linear,
    q_norm: RmsNorm,
    o_proj: Linear,
    rope: Rotary,
    q_heads: usize,
    head_dim: usize,
    /// The target layer whose cache it reads, and the keys it sees there (sliding: the last
    /// `window + 1`).
    reads: usize,
    window: Option<usize>,
    input_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    pre_ffn_norm: RmsNorm,
    post_ffn_norm: RmsNorm,
    mlp: GatedMlp,
    /// `[1]`.
    layer_scalar: Tensor,
}

/// The ordered-embedding head (`Gemma4AssistantMaskedEmbedder`).
#[derive(Debug)]
struct MaskedHead {
    centroids: Linear,
    /// `token_ordering` as `[num_centroids][vocab / num_centroids]` ids.
    clusters: Vec<Vec<u32>>,
    top_k: usize,
}

/// A Gemma 4 assistant, checked against the target it drafts for.
#[derive(Debug)]
pub struct Gemma4Assistant {
    hidden: usize,
    backbone: usize,
    vocab: usize,
    pre_projection: Linear,
    post_projection: Linear,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    masked: Option<MaskedHead>,
    device: Device,
}

/// One drafted token: the id (the head's argmax) and the head's logits `[vocab]` (f32).
pub struct Drafted {
    pub id: u32,
    pub logits: Tensor,
}

/// Whether `config` is a Gemma 4 assistant's.
pub fn is_assistant_config(config: &Value) -> bool {
    config.get("model_type").and_then(Value::as_str) == Some("gemma4_assistant")
}

/// What an assistant's config says, checked against its target: no weights needed (`inspect`,
/// `kv-budget`), and what [`Gemma4Assistant::new`] builds from.
#[derive(Debug, Clone)]
pub struct Plan {
    pub hidden: usize,
    pub backbone: usize,
    pub vocab: usize,
    pub intermediate: usize,
    pub q_heads: usize,
    pub eps: f64,
    pub layers: Vec<PlannedLayer>,
    pub ordered: Option<(usize, usize)>,
    tie_word_embeddings: bool,
}

/// One assistant layer as planned: its type, head dim, RoPE and the target layer it reads.
#[derive(Debug, Clone)]
pub struct PlannedLayer {
    pub sliding: bool,
    pub head_dim: usize,
    pub rope: crate::arch::Rope,
    /// The target layer whose cache it reads.
    pub reads: usize,
    /// Sliding layers: the reference's `sliding_window` (it sees the last `window + 1` keys).
    pub window: Option<usize>,
}

impl Plan {
    /// The target layers whose caches the assistant reads.
    pub fn reads(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.layers.iter().map(|l| l.reads).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Read an assistant's `config.json` for `target`: every key the reference reads, refused where
/// the reference refuses it or llmarch does not implement it; the target's hidden size,
/// vocabulary and cache owners must fit.
pub fn plan(config: &Value, target: &crate::arch::ArchSpec) -> Result<Plan> {
    let c: RawConfig = serde_json::from_value(config.clone())
        .context("config.json is not a Gemma 4 assistant config")?;
    if c.model_type != "gemma4_assistant" {
        bail!(
            "config.json: model_type `{}` is not a Gemma 4 assistant (`gemma4_assistant`)",
            c.model_type
        );
    }
    let t: RawText =
        serde_json::from_value(c.text_config.clone()).context("config.json: key `text_config`")?;
    let p = "text_config.";
    for (key, bad) in [
        (
            "hidden_size_per_layer_input",
            t.hidden_size_per_layer_input != 0,
        ),
        ("enable_moe_block", t.enable_moe_block),
        ("use_double_wide_mlp", t.use_double_wide_mlp),
        ("attention_bias", t.attention_bias),
    ] {
        if bad {
            bail!("key `{p}{key}`: a Gemma 4 assistant has none (the reference refuses it)");
        }
    }
    if t.use_bidirectional_attention.is_some() {
        bail!("key `{p}use_bidirectional_attention` is not implemented for assistants");
    }
    if t.hidden_activation != "gelu_pytorch_tanh" {
        bail!(
            "key `{p}hidden_activation` = `{}`: only gelu_pytorch_tanh is implemented",
            t.hidden_activation
        );
    }
    let owners = last_owners(target)?;
    let n = t.num_hidden_layers;
    if n == 0
        || t.layer_types.len() != n
        || (t.num_kv_shared_layers != 0 && t.num_kv_shared_layers != n)
    {
        bail!("keys `{p}num_hidden_layers`/`num_kv_shared_layers`/`layer_types`: every one of the {n} layers of an assistant reads the target's cache");
    }
    if c.backbone_hidden_size != target.hidden_size {
        bail!(
            "the assistant was trained for a target of hidden size {} (backbone_hidden_size), this target has {}",
            c.backbone_hidden_size,
            target.hidden_size
        );
    }
    if t.vocab_size != target.vocab_size {
        bail!(
            "the assistant's vocabulary ({} tokens) is not the target's ({})",
            t.vocab_size,
            target.vocab_size
        );
    }
    let ordered = if c.use_ordered_embeddings {
        let per = t.vocab_size / c.num_centroids.max(1);
        if c.num_centroids == 0
            || per * c.num_centroids != t.vocab_size
            || c.centroid_intermediate_top_k == 0
            || c.centroid_intermediate_top_k > c.num_centroids
        {
            bail!(
                "keys `num_centroids` = {} / `centroid_intermediate_top_k` = {}: the vocabulary ({}) must split into that many equal clusters, of which at least one and at most all are scored",
                c.num_centroids,
                c.centroid_intermediate_top_k,
                t.vocab_size
            );
        }
        Some((c.num_centroids, c.centroid_intermediate_top_k))
    } else {
        None
    };
    let mut layers = Vec::with_capacity(n);
    for (i, ty) in t.layer_types.iter().enumerate() {
        let sliding = match ty.as_str() {
            "sliding_attention" => true,
            "full_attention" => false,
            other => bail!("key `{p}layer_types[{i}]` = `{other}` is not a Gemma 4 layer type"),
        };
        let head_dim = t
            .per_layer_config
            .as_ref()
            .and_then(|m| m.get(&i.to_string()))
            .and_then(|o| o.get("head_dim"))
            .and_then(Value::as_u64)
            .map(|d| d as usize)
            .or(if sliding { None } else { t.global_head_dim })
            .unwrap_or(t.head_dim);
        let reads = if sliding { owners.0 } else { owners.1 };
        let owner = &target.layers[reads];
        if owner.head_dim != head_dim || owner.k_eq_v {
            bail!(
                "assistant layer {i} ({ty}, head_dim {head_dim}) cannot read target layer {reads} (head_dim {}{})",
                owner.head_dim,
                if owner.k_eq_v { ", K=V: not implemented for assistants" } else { "" }
            );
        }
        if t.num_attention_heads == 0 || !t.num_attention_heads.is_multiple_of(owner.kv_heads) {
            bail!(
                "key `{p}num_attention_heads` = {}: not a multiple of target layer {reads}'s {} KV heads",
                t.num_attention_heads,
                owner.kv_heads
            );
        }
        let block = t
            .rope_parameters
            .get(ty)
            .ok_or_else(|| anyhow!("key `{p}rope_parameters.{ty}` is missing"))?;
        layers.push(PlannedLayer {
            sliding,
            head_dim,
            rope: rope_from_params(block, head_dim, &format!("{p}rope_parameters.{ty}"))?,
            reads,
            window: sliding.then_some(t.sliding_window),
        });
    }
    Ok(Plan {
        hidden: t.hidden_size,
        backbone: c.backbone_hidden_size,
        vocab: t.vocab_size,
        intermediate: t.intermediate_size,
        q_heads: t.num_attention_heads,
        eps: t.rms_norm_eps,
        layers,
        ordered,
        tie_word_embeddings: c.tie_word_embeddings,
    })
}

impl Gemma4Assistant {
    /// Build from the assistant's `config.json` and weights (`vb` at the checkpoint root), for
    /// `target` (see [`plan`]).
    pub fn new(config: &Value, vb: VarBuilder, target: &crate::arch::ArchSpec) -> Result<Self> {
        let plan = plan(config, target)?;
        let device = vb.device().clone();
        let (h, eps, hq) = (plan.hidden, plan.eps, plan.q_heads);
        let vbm = vb.pp("model");
        let mut layers = Vec::with_capacity(plan.layers.len());
        for (i, l) in plan.layers.iter().enumerate() {
            let d = l.head_dim;
            let vbl = vbm.pp("layers").pp(i);
            let norm = |name: &str| RmsNorm::load(&vbl.pp(name), h, eps);
            layers.push(Layer {
                q_proj: Linear::load(&vbl.pp("self_attn.q_proj"), h, hq * d, false)?,
                q_norm: RmsNorm::load(&vbl.pp("self_attn.q_norm"), d, eps)?,
                o_proj: Linear::load(&vbl.pp("self_attn.o_proj"), hq * d, h, false)?,
                rope: rotary_from(&l.rope, d, i, &device)?,
                q_heads: hq,
                head_dim: d,
                reads: l.reads,
                window: l.window,
                input_norm: norm("input_layernorm")?,
                post_attn_norm: norm("post_attention_layernorm")?,
                pre_ffn_norm: norm("pre_feedforward_layernorm")?,
                post_ffn_norm: norm("post_feedforward_layernorm")?,
                mlp: GatedMlp::load(&vbl.pp("mlp"), h, plan.intermediate, Activation::GeluTanh)?,
                layer_scalar: weight::get(&vbl, 1, "layer_scalar")?,
            });
        }
        let embed = ScaledEmbedding::load(&vbm.pp("embed_tokens"), plan.vocab, h, 1.0)?;
        let lm_head = output_head(
            plan.tie_word_embeddings,
            &embed,
            Some(vb.pp("lm_head")),
            h,
            plan.vocab,
        )?;
        let masked = match plan.ordered {
            Some((centroids, top_k)) => {
                let vbe = vb.pp("masked_embedding");
                let order: Vec<i64> = vbe
                    .get_with_hints_dtype(
                        plan.vocab,
                        "token_ordering",
                        Default::default(),
                        DType::I64,
                    )
                    .context("tensor `masked_embedding.token_ordering`")?
                    .to_vec1()?;
                if let Some(bad) = order.iter().find(|&&x| x < 0 || x as usize >= plan.vocab) {
                    bail!("tensor `masked_embedding.token_ordering` holds {bad}, outside the vocabulary");
                }
                Some(MaskedHead {
                    centroids: Linear::load(&vbe.pp("centroids"), h, centroids, false)?,
                    clusters: order
                        .chunks(plan.vocab / centroids)
                        .map(|c| c.iter().map(|&x| x as u32).collect())
                        .collect(),
                    top_k,
                })
            }
            None => None,
        };
        Ok(Gemma4Assistant {
            hidden: h,
            backbone: plan.backbone,
            vocab: plan.vocab,
            pre_projection: Linear::load(&vb.pp("pre_projection"), 2 * plan.backbone, h, false)?,
            post_projection: Linear::load(&vb.pp("post_projection"), h, plan.backbone, false)?,
            norm: RmsNorm::load(&vbm.pp("norm"), h, eps)?,
            layers,
            lm_head,
            masked,
            device,
        })
    }

    /// The target layers whose caches the assistant reads (sliding owner, full owner).
    pub fn reads(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.layers.iter().map(|l| l.reads).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Draft `n` tokens after `last` (not yet fed to `target`, whose `cache` holds everything
    /// before it and the normed hidden state of its last position), greedily, as one round of
    /// `SinglePositionMultiTokenCandidateGenerator` does.
    pub fn draft(
        &self,
        target: &dyn CausalLm,
        cache: &KvStore,
        last: u32,
        n: usize,
    ) -> Result<Vec<Drafted>> {
        let pos = cache.seen();
        let mut state = cache
            .last_hidden()?
            .ok_or_else(|| anyhow!("internal: the target left no hidden state for the drafter"))?
            .to_dtype(DType::F32)?
            .reshape((1, 1, self.backbone))?; // [1, 1, backbone]
        let mut token = last;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            // 1. [target embedding ; state] → hidden. [1, 1, hidden]
            let e = target.input_embedding(&[token])?.to_dtype(DType::F32)?; // [1, 1, backbone]
            let x = Tensor::cat(&[&e, &state], 2)?;
            let mut h = self.pre_projection.forward(&x)?;
            // 2. The layers, attending the target's cache.
            for (i, l) in self.layers.iter().enumerate() {
                h = l
                    .forward(&h, cache, pos)
                    .with_context(|| format!("assistant layer {i}"))?;
            }
            // 3. Norm, head (masked or not), the next state. logits [vocab]
            let h = self.norm.forward(&h)?;
            let logits = match &self.masked {
                Some(m) => m.logits(&h, &self.lm_head, self.vocab)?,
                None => self.lm_head.forward(&h)?.flatten_all()?,
            }
            .to_dtype(DType::F32)?;
            token = logits.argmax(0)?.to_scalar::<u32>()?;
            state = self.post_projection.forward(&h)?;
            out.push(Drafted { id: token, logits });
        }
        Ok(out)
    }

    /// The assistant's hidden size.
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

impl Layer {
    /// h `[1, 1, hidden]` at position `pos` → `[1, 1, hidden]`.
    fn forward(&self, h: &Tensor, cache: &KvStore, pos: usize) -> Result<Tensor> {
        let (hq, d) = (self.q_heads, self.head_dim);
        // 1. Query: project, norm per head, rotate. [1, hq, 1, d]
        let x = self.input_norm.forward(h)?;
        let q = self.q_proj.forward(&x)?.reshape((1, 1, hq, d))?;
        let q = self.q_norm.forward(&q)?.transpose(1, 2)?.contiguous()?;
        let q = self.rope.apply(&q, pos)?;
        // 2. The target layer's cached keys and values (sliding: the last window + 1).
        let kv = cache
            .layer(self.reads)
            .ok_or_else(|| anyhow!("target layer {} holds no cache", self.reads))?;
        let k =
            kv.k.as_ref()
                .ok_or_else(|| anyhow!("target layer {} has cached nothing yet", self.reads))?;
        let v = kv.v.as_ref().unwrap_or(k);
        let t = k.dim(2)?;
        let keep = self.window.map_or(t, |w| t.min(w + 1));
        let (k, v) = (k.narrow(2, t - keep, keep)?, v.narrow(2, t - keep, keep)?);
        // 3. Attend every key (no mask), merge heads, project out. [1, 1, hidden]
        let y = attend(&q, &k, &v, None, 1.0)?; // [1, hq, 1, d]
        let y = self
            .o_proj
            .forward(&y.transpose(1, 2)?.reshape((1, 1, hq * d))?)?;
        let h = (h + self.post_attn_norm.forward(&y)?)?;
        // 4. MLP, residual, layer scalar.
        let m = self.mlp.forward(&self.pre_ffn_norm.forward(&h)?)?;
        let h = (&h + self.post_ffn_norm.forward(&m)?)?;
        Ok(h.broadcast_mul(&self.layer_scalar)?)
    }
}

impl MaskedHead {
    /// Scores of the ids in the best `top_k` clusters; every other id gets their minimum − 1.
    /// h `[1, 1, hidden]` → `[vocab]`.
    fn logits(&self, h: &Tensor, head: &Linear, vocab: usize) -> Result<Tensor> {
        let c: Vec<f32> = self
            .centroids
            .forward(h)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let mut order: Vec<usize> = (0..c.len()).collect();
        order.sort_by(|&a, &b| c[b].total_cmp(&c[a]));
        let ids: Vec<u32> = order[..self.top_k]
            .iter()
            .flat_map(|&k| self.clusters[k].iter().copied())
            .collect();
        let idx = Tensor::from_slice(&ids, ids.len(), h.device())?;
        // Only the selected rows of the head when it is a tensor; else all of it, then select.
        let scores = match head.weight() {
            Some(w) => h
                .flatten_all()?
                .unsqueeze(0)?
                .matmul(&w.index_select(&idx, 0)?.t()?)?
                .flatten_all()?,
            None => head.forward(h)?.flatten_all()?.index_select(&idx, 0)?,
        }
        .to_dtype(DType::F32)?;
        let s: Vec<f32> = scores.to_vec1()?;
        let floor = s.iter().copied().fold(f32::INFINITY, f32::min) - 1.0;
        let mut out = vec![floor; vocab];
        for (&id, &x) in ids.iter().zip(&s) {
            out[id as usize] = x;
        }
        Ok(Tensor::from_vec(out, vocab, h.device())?)
    }
}

/// The target's last sliding and last full cache owners before its first KV-shared layer: what
/// the reference's `shared_kv_states` hands an assistant.
fn last_owners(target: &crate::arch::ArchSpec) -> Result<(usize, usize)> {
    if target.family != "gemma4" {
        bail!(
            "a Gemma 4 assistant drafts for a Gemma 4 target, not for {}",
            target.family
        );
    }
    let first_shared = target
        .layers
        .iter()
        .position(|l| l.kv_source.is_some())
        .unwrap_or(target.layers.len());
    let last = |sliding: bool| {
        target.layers[..first_shared]
            .iter()
            .rev()
            .find(|l| matches!(l.attention, Kind::Sliding { .. }) == sliding)
            .map(|l| l.index)
    };
    match (last(true), last(false)) {
        (Some(s), Some(f)) => Ok((s, f)),
        _ => bail!(
            "the target has no sliding or no full layer owning a cache for the assistant to read"
        ),
    }
}
