//! WHAT a model is: the registry of families and the one per-layer table every command reads.
//!
//! Parsing a `config.json` is two-stage. Each family folder (`gemma4/`, `laguna/`, ...) holds in
//! `config.rs` a serde struct with the Hugging Face field names and the reference's defaults
//! (transformers 5.23.0), and its `parse` reads that struct once into a validated [`ArchSpec`]
//! (`spec.rs`, `params.rs`: model-wide facts plus one [`LayerSpec`] per decoder layer) and the
//! runtime config its network needs, so every command gives a config the same verdict. `inspect`
//! prints that table, `kv-budget` computes from it, and the model builder and the live KV panel
//! read it. Nothing else re-derives per-layer facts from the config.
//!
//! The cache a layer holds is described by [`CachePart`]s (K, V, K=V, compressed entries, indexer
//! keys, convolution and recurrent states), each with how many entries it keeps at a context
//! length. KV sharing is a [`LayerSpec::kv_source`] pointing at the owning layer, which then holds
//! nothing itself.

mod blocks;
pub mod budget;
mod causal_lm;
pub mod config;
pub mod deepseek_v4;
pub mod fit;
pub mod gemma4;
pub mod laguna;
pub mod qwen3_5;
pub mod zaya;

pub use causal_lm::{build, check_tokens, CausalLm, FamilyModel, Rows};

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::Value;

/// One architecture family: how to recognise its configs and how to parse them.
pub struct Family {
    /// Module name, e.g. `gemma4`.
    pub name: &'static str,
    /// `model_type` values (bare text config and multimodal wrapper) this family accepts.
    pub model_types: &'static [&'static str],
    /// `architectures[0]` values this family accepts.
    pub architectures: &'static [&'static str],
    /// One line on what is new in it.
    pub summary: &'static str,
    /// Turns the text config (wrapper already unwrapped) into the spec, validating what the
    /// network reads beyond it too (the family's runtime config), so that every command gives a
    /// config the same verdict.
    pub parse: fn(&config::TextConfig) -> Result<ArchSpec>,
    /// Builds the runnable network from `config.json` and the weights (positioned at the text
    /// model root, plus the untied LM head if any); `None` while only `inspect`/`kv-budget` work.
    pub build: Option<BuildFn>,
    /// Renames a checkpoint tensor to the reference's module name, for families whose Hub
    /// checkpoints use their own names (applied by the loader to every name); `None`: as is.
    pub rename: Option<fn(&str) -> String>,
}

/// See [`Family::build`].
pub type BuildFn = fn(
    &Value,
    &config::ParseOptions,
    candle_nn::VarBuilder<'static>,
    Option<candle_nn::VarBuilder<'static>>,
) -> Result<Box<dyn CausalLm>>;

/// The family a spec belongs to.
pub fn family_of(spec: &ArchSpec) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == spec.family)
}

/// The registry: adding a family is one folder plus one line here.
pub const FAMILIES: &[Family] = &[
    gemma4::FAMILY,
    laguna::FAMILY,
    zaya::FAMILY,
    deepseek_v4::FAMILY,
    qwen3_5::FAMILY,
];

/// Every `model_type` we accept, for error messages.
pub fn supported_model_types() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .flat_map(|f| f.model_types.iter().copied())
        .collect()
}

/// The family whose `model_type` or `architectures[0]` the text config names.
fn family_for(text: &config::TextConfig) -> Result<&'static Family> {
    FAMILIES
        .iter()
        .find(|f| {
            f.model_types.contains(&text.model_type.as_str())
                || text
                    .architecture
                    .as_deref()
                    .is_some_and(|a| f.architectures.contains(&a))
        })
        .ok_or_else(|| {
            let what = if text.model_type.is_empty() {
                format!(
                    "architecture `{}`",
                    text.architecture.as_deref().unwrap_or("?")
                )
            } else {
                format!("model_type `{}`", text.model_type)
            };
            anyhow::anyhow!(
                "unsupported {what}; supported model types: {}",
                supported_model_types().join(", ")
            )
        })
}

/// Parse a whole `config.json` (bare or multimodal wrapper) into an [`ArchSpec`]. The family's
/// runtime config is validated too, so `inspect` and `kv-budget` refuse what `run` refuses, with
/// the same error.
pub fn parse_config(raw: &Value, opts: &config::ParseOptions) -> Result<ArchSpec> {
    let text = config::TextConfig::from_raw(raw, opts)?;
    let spec = (family_for(&text)?.parse)(&text)?;
    spec.check()?;
    Ok(spec)
}

/// The spec of a whole `config.json` and `family`'s runtime config (what its network needs
/// beyond the per-layer table), from one reading of the config by the family's `parse` (the
/// same reading [`parse_config`] makes); a config of another family is refused.
pub fn parse_for_family<C>(
    raw: &Value,
    opts: &config::ParseOptions,
    family: &Family,
    parse: fn(&config::TextConfig) -> Result<(ArchSpec, C)>,
) -> Result<(ArchSpec, C)> {
    let text = config::TextConfig::from_raw(raw, opts)?;
    let found = family_for(&text)?;
    if found.name != family.name {
        bail!("this is a `{}` config, not `{}`", found.name, family.name);
    }
    let (spec, cfg) = parse(&text)?;
    spec.check()?;
    Ok((spec, cfg))
}

/// What attention a layer runs, and so what its cache keeps.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Attention {
    /// Causal attention over every earlier token.
    Full,
    /// Causal attention over the last `window` tokens (the current one included).
    Sliding { window: usize },
    /// ZAYA's Compressed Convolutional Attention; `window` for its `hybrid_sliding` layers.
    Cca { window: Option<usize> },
    /// DeepSeek V4: a sliding window plus entries compressed `ratio`:1. With `index_topk`, a
    /// lightning indexer picks the top-k compressed entries (CSA); without, all of them (HCA).
    Compressed {
        ratio: usize,
        window: usize,
        index_topk: Option<usize>,
    },
    /// Linear attention (Gated DeltaNet): a fixed-size state instead of a growing cache.
    Linear,
}

impl Attention {
    /// Short name for tables: `full`, `sliding 512`, `CSA 4:1`, ...
    pub fn label(&self) -> String {
        match self {
            Attention::Full => "full".into(),
            Attention::Sliding { window } => format!("sliding {window}"),
            Attention::Cca { window: None } => "CCA".into(),
            Attention::Cca { window: Some(w) } => format!("CCA sliding {w}"),
            Attention::Compressed {
                ratio,
                index_topk: Some(_),
                ..
            } => format!("CSA {ratio}:1"),
            Attention::Compressed {
                ratio,
                index_topk: None,
                ..
            } => format!("HCA {ratio}:1"),
            Attention::Linear => "linear (DeltaNet)".into(),
        }
    }

    /// How many cached tokens one query attends at `context` tokens.
    pub fn attended_tokens(&self, context: u64) -> u64 {
        match *self {
            Attention::Full | Attention::Cca { window: None } => context,
            Attention::Sliding { window }
            | Attention::Cca {
                window: Some(window),
            } => context.min(window as u64),
            Attention::Compressed {
                ratio,
                window,
                index_topk,
            } => {
                let entries = context / ratio as u64;
                context.min(window as u64) + index_topk.map_or(entries, |k| entries.min(k as u64))
            }
            Attention::Linear => 0,
        }
    }

    /// The long-context trick this attention kind is, for the savings breakdown.
    pub fn trick(&self) -> Option<Trick> {
        match self {
            Attention::Full => None,
            Attention::Sliding { .. } => Some(Trick::SlidingWindow),
            Attention::Cca { .. } => Some(Trick::ConvolutionalAttention),
            Attention::Compressed { .. } => Some(Trick::Compression),
            Attention::Linear => Some(Trick::LinearAttention),
        }
    }
}

/// The tricks whose savings `kv-budget` reports, in the order they are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trick {
    /// Fewer KV heads than query heads (GQA/MQA).
    GroupedKv,
    /// Layers reading another layer's cache.
    KvSharing,
    /// One tensor serves as both K and V.
    KEqV,
    /// Only the last `window` tokens are kept.
    SlidingWindow,
    /// Compressed entries (DeepSeek V4 CSA/HCA).
    Compression,
    /// A fixed-size state replaces the cache (Gated DeltaNet).
    LinearAttention,
    /// ZAYA's CCA: K/V in a compressed latent space plus a convolution state.
    ConvolutionalAttention,
}

impl Trick {
    pub const ALL: [Trick; 7] = [
        Trick::GroupedKv,
        Trick::KvSharing,
        Trick::KEqV,
        Trick::SlidingWindow,
        Trick::Compression,
        Trick::LinearAttention,
        Trick::ConvolutionalAttention,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Trick::GroupedKv => "GQA/MQA",
            Trick::KvSharing => "cross-layer KV sharing",
            Trick::KEqV => "K=V",
            Trick::SlidingWindow => "sliding window",
            Trick::Compression => "compression",
            Trick::LinearAttention => "linear attention",
            Trick::ConvolutionalAttention => "CCA",
        }
    }
}

/// How many entries of a cache part are held at a given context length.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Retention {
    /// One entry per token.
    AllTokens,
    /// One entry per token, at most `window`.
    Window { window: usize },
    /// One entry per `ratio` complete tokens.
    Compressed { ratio: usize },
    /// A fixed number of entries whatever the context.
    Fixed { entries: usize },
    /// The `context mod ratio` tokens of a compression window still open.
    Remainder { ratio: usize },
    /// The `ratio` entries of the last closed compression window (none before one closes).
    LastBlock { ratio: usize },
}

impl Retention {
    pub fn entries(&self, context: u64) -> u64 {
        match *self {
            Retention::AllTokens => context,
            Retention::Window { window } => context.min(window as u64),
            Retention::Compressed { ratio } => context / ratio as u64,
            Retention::Fixed { entries } => entries as u64,
            Retention::Remainder { ratio } => context % ratio as u64,
            Retention::LastBlock { ratio } => {
                if context >= ratio as u64 {
                    ratio as u64
                } else {
                    0
                }
            }
        }
    }

    /// The most entries this part ever holds, if bounded whatever the context.
    pub fn bound(&self) -> Option<usize> {
        match *self {
            Retention::AllTokens | Retention::Compressed { .. } => None,
            Retention::Window { window } => Some(window),
            Retention::Fixed { entries } => Some(entries),
            Retention::Remainder { ratio } => Some(ratio - 1),
            Retention::LastBlock { ratio } => Some(ratio),
        }
    }
}

/// The element type a cache part is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartDtype {
    /// The KV dtype the user picks (`--kv-dtype`).
    Kv,
    /// A state kept in f32 whatever the KV dtype (the config says so, e.g. `mamba_ssm_dtype`).
    F32,
}

/// One tensor (or group of tensors) of a layer's cache.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CachePart {
    /// What it is: `K`, `V`, `K=V`, `compressed KV`, `indexer keys`, `conv state`, ...
    pub name: &'static str,
    /// Elements per entry (all heads together).
    pub elems_per_entry: u64,
    pub retention: Retention,
    pub dtype: PartDtype,
}

impl CachePart {
    pub fn new(name: &'static str, elems_per_entry: usize, retention: Retention) -> Self {
        CachePart {
            name,
            elems_per_entry: elems_per_entry as u64,
            retention,
            dtype: PartDtype::Kv,
        }
    }

    pub fn f32(mut self) -> Self {
        self.dtype = PartDtype::F32;
        self
    }
}

/// The RoPE variants a config may name (`rope_type`), as the reference spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeKind {
    Default,
    Proportional,
    Linear,
    Dynamic,
    Yarn,
    Longrope,
    Llama3,
}

impl RopeKind {
    pub const ALL: [RopeKind; 7] = [
        RopeKind::Default,
        RopeKind::Proportional,
        RopeKind::Linear,
        RopeKind::Dynamic,
        RopeKind::Yarn,
        RopeKind::Longrope,
        RopeKind::Llama3,
    ];

    /// The name as `rope_type` gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            RopeKind::Default => "default",
            RopeKind::Proportional => "proportional",
            RopeKind::Linear => "linear",
            RopeKind::Dynamic => "dynamic",
            RopeKind::Yarn => "yarn",
            RopeKind::Longrope => "longrope",
            RopeKind::Llama3 => "llama3",
        }
    }

    pub fn parse(name: &str) -> Option<RopeKind> {
        RopeKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for RopeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for RopeKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// How a RoPE variant rotates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rope {
    pub kind: RopeKind,
    pub theta: f64,
    /// How many of the head's dimensions are rotated.
    pub rotary_dim: usize,
    /// YaRN/other scaling factor, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
}

/// The feed-forward block of a layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Ffn {
    Dense {
        width: usize,
    },
    Moe {
        experts: usize,
        top_k: usize,
        width: usize,
        /// Width of an always-on shared expert, if any.
        shared_width: Option<usize>,
        /// Width of a dense MLP running beside the experts (Gemma 4 26B-A4B), if any.
        dense_width: Option<usize>,
        /// How tokens pick experts.
        routing: Routing,
    },
}

/// How a MoE layer's tokens pick their experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// A softmax over the experts, top-k (Gemma 4, Qwen3.6).
    Softmax,
    /// An independent sigmoid per expert, top-k of score + correction bias (Laguna, DeepSeek V4
    /// with `scoring_func: sigmoid`).
    Sigmoid,
    /// √softplus scores, top-k of score + correction bias (DeepSeek V4's default).
    SqrtSoftplus,
    /// A frozen token-id → experts table (DeepSeek V4's first layers).
    Hash,
    /// An MLP router this wide, with a skip class (ZAYA).
    Mlp { hidden: usize },
}

/// A score router's rule, as the per-layer table names it.
impl From<crate::layers::moe::score_routing::ScoreFn> for Routing {
    fn from(f: crate::layers::moe::score_routing::ScoreFn) -> Routing {
        use crate::layers::moe::score_routing::ScoreFn;
        match f {
            ScoreFn::Softmax => Routing::Softmax,
            ScoreFn::Sigmoid => Routing::Sigmoid,
            ScoreFn::SqrtSoftplus => Routing::SqrtSoftplus,
        }
    }
}

impl std::fmt::Display for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Routing::Softmax => f.write_str("softmax"),
            Routing::Sigmoid => f.write_str("sigmoid"),
            Routing::SqrtSoftplus => f.write_str("sqrtsoftplus"),
            Routing::Hash => f.write_str("hash"),
            Routing::Mlp { hidden } => write!(f, "MLP router {hidden}"),
        }
    }
}

/// As its label, as the JSON has always said it.
impl Serialize for Routing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Ffn {
    pub fn label(&self) -> String {
        match self {
            Ffn::Dense { width } => format!("MLP {width}"),
            Ffn::Moe {
                experts,
                top_k,
                width,
                shared_width,
                dense_width,
                routing,
            } => {
                let mut s = format!("MoE {top_k}/{experts}×{width} {routing}");
                if let Some(w) = shared_width {
                    s.push_str(&format!(" +shared {w}"));
                }
                if let Some(w) = dense_width {
                    s.push_str(&format!(" +MLP {w}"));
                }
                s
            }
        }
    }
}

/// Every fact about one decoder layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerSpec {
    pub index: usize,
    pub attention: Attention,
    /// Query heads (for linear attention: value heads).
    pub q_heads: usize,
    /// KV heads (for linear attention: key heads).
    pub kv_heads: usize,
    /// Query/key head dimension.
    pub head_dim: usize,
    /// Value head dimension.
    pub v_head_dim: usize,
    /// `Some(j)`: this layer reads layer `j`'s cache and holds none itself.
    pub kv_source: Option<usize>,
    /// One tensor serves as K and V.
    pub k_eq_v: bool,
    pub rope: Option<Rope>,
    pub ffn: Ffn,
    /// Width of this layer's slice of the per-layer embedding (Gemma 4 E2B/E4B).
    pub ple_width: Option<usize>,
    /// What this layer's own cache holds (empty when `kv_source` is set).
    pub cache: Vec<CachePart>,
    /// Family-specific facts worth a column: `gate per-head`, `o_groups 8`, ...
    pub notes: Vec<String>,
}

impl LayerSpec {
    /// The usual K and V parts for `kv_heads × head_dim` per token, kept as `retention` says; one
    /// part when K=V.
    pub fn kv_parts(
        kv_heads: usize,
        head_dim: usize,
        v_head_dim: usize,
        k_eq_v: bool,
        retention: Retention,
    ) -> Vec<CachePart> {
        if k_eq_v {
            vec![CachePart::new("K=V", kv_heads * head_dim, retention)]
        } else {
            vec![
                CachePart::new("K", kv_heads * head_dim, retention),
                CachePart::new("V", kv_heads * v_head_dim, retention),
            ]
        }
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> f64 {
        self.q_heads as f64 / self.kv_heads.max(1) as f64
    }

    /// Attention FLOPs per generated token at `context` tokens: scores (q·k) and the weighted sum
    /// of values, 2 FLOPs per multiply-add, over the tokens this layer attends. Linear attention
    /// counts its state update and read-out instead.
    /// In u128: [`budget::compute`] checks the totals into u64.
    pub fn attention_flops(&self, context: u64) -> u128 {
        let heads = self.q_heads as u128;
        let (hd, vd) = (self.head_dim as u128, self.v_head_dim as u128);
        match self.attention {
            Attention::Linear => 4 * heads * hd * vd,
            _ => 2 * heads * (hd + vd) * self.attention.attended_tokens(context) as u128,
        }
    }
}

/// Parameter counts of the text model as the reference builds it (`*ForCausalLM`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ParamCounts {
    pub total: u64,
    /// Input embedding table.
    pub embedding: u64,
    /// Gemma 4's per-layer-embedding table (0 when absent).
    pub ple: u64,
    /// Untied output head (0 when tied to the embedding).
    pub lm_head: u64,
    /// Routed expert weights (0 for dense models).
    pub routed_experts: u64,
    /// Total without the PLE table.
    pub effective: u64,
    /// Used per token: total minus the routed experts a token does not use.
    pub active: u64,
}

impl ParamCounts {
    /// Fill `effective` and `active` from the rest; `top_k`/`experts` of the routed MoE.
    pub fn finish(mut self, top_k: usize, experts: usize) -> Self {
        self.effective = self.total - self.ple;
        self.active = if experts == 0 || self.routed_experts == 0 {
            self.total
        } else {
            let unused = self.routed_experts as f64 * (1.0 - top_k as f64 / experts as f64);
            self.total - unused.round() as u64
        };
        self
    }
}

/// A validated model: model-wide facts plus one [`LayerSpec`] per decoder layer.
#[derive(Debug, Clone, Serialize)]
pub struct ArchSpec {
    /// Family module name, e.g. `gemma4`.
    pub family: &'static str,
    /// The `model_type` of the text config.
    pub model_type: String,
    /// The reference class that builds the text model.
    pub hf_class: String,
    /// `architectures[0]` of the file, if different (e.g. the multimodal wrapper).
    pub architecture: Option<String>,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub max_context: usize,
    /// `dtype`/`torch_dtype` of the checkpoint, if given.
    pub dtype: Option<String>,
    pub tie_word_embeddings: bool,
    pub params: ParamCounts,
    pub layers: Vec<LayerSpec>,
    /// Model-wide facts worth printing: `mHC ×4`, `MTP layers: 1 (not run)`, ...
    pub notes: Vec<String>,
    /// Things the user should know: keys ignored under `--allow-unknown-keys`, values the
    /// reference overrides.
    pub warnings: Vec<String>,
}

impl ArchSpec {
    /// Cross-layer invariants every family must satisfy; a failure here is a bug or a bad config.
    fn check(&self) -> Result<()> {
        for (i, l) in self.layers.iter().enumerate() {
            if l.index != i {
                bail!("internal: layer {i} carries index {}", l.index);
            }
            if let Some(src) = l.kv_source {
                if src >= i {
                    bail!(
                        "layer {i}: reads the KV cache of layer {src}, which does not come earlier"
                    );
                }
                let donor = &self.layers[src];
                if donor.kv_source.is_some() || donor.cache.is_empty() {
                    bail!(
                        "layer {i}: reads the KV cache of layer {src}, which holds none of its own"
                    );
                }
                if donor.attention != l.attention {
                    bail!(
                        "layer {i}: reads the KV cache of layer {src} of another type ({} vs {})",
                        l.attention.label(),
                        donor.attention.label()
                    );
                }
                if !l.cache.is_empty() {
                    bail!("internal: layer {i} shares KV but lists cache parts");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::config::bounds_test::{real, set};
    use super::config::ParseOptions;
    use super::*;
    use serde_json::json;

    /// How `run` reads a config: the spec and the family's runtime config.
    type ReadForRun = fn(&Value, &ParseOptions) -> Result<()>;

    /// A config whose per-layer table is fine but whose network could not run (a check only the
    /// runtime config made, so `inspect` used to accept what `run` refused) is refused by every
    /// command with the same error: `inspect` and `kv-budget` read [`parse_config`], `run`
    /// [`parse_for_family`].
    #[test]
    fn every_command_gives_a_config_the_same_verdict() {
        let cases: [(&str, &[&str], Value, &str, ReadForRun); 4] = [
            (
                "gemma-4-E2B-it",
                &["text_config", "final_logit_softcapping"],
                json!(-1.0),
                "must be a positive number",
                |raw, opts| parse_for_family(raw, opts, &gemma4::FAMILY, gemma4::parse).map(drop),
            ),
            (
                "Laguna-XS.2",
                &["moe_router_logit_softcapping"],
                json!(-1.0),
                "must be a number ≥ 0",
                |raw, opts| parse_for_family(raw, opts, &laguna::FAMILY, laguna::parse).map(drop),
            ),
            (
                "Qwen3.6-27B",
                &["text_config", "rms_norm_eps"],
                json!(-1.0),
                "must be a number ≥ 0",
                |raw, opts| parse_for_family(raw, opts, &qwen3_5::FAMILY, qwen3_5::parse).map(drop),
            ),
            (
                "DeepSeek-V4-Flash",
                &["hc_sinkhorn_iters"],
                json!(0),
                "must be at least 1",
                |raw, opts| {
                    parse_for_family(raw, opts, &deepseek_v4::FAMILY, deepseek_v4::parse).map(drop)
                },
            ),
        ];
        let opts = ParseOptions::default();
        for (name, path, value, want, read_for_run) in cases {
            let mut raw = real(name);
            read_for_run(&raw, &opts).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            set(&mut raw, path, value);
            let inspect = match parse_config(&raw, &opts) {
                Ok(_) => panic!("{name} {path:?}: inspect accepts what run refuses"),
                Err(e) => format!("{e:#}"),
            };
            let run = format!("{:#}", read_for_run(&raw, &opts).unwrap_err());
            assert_eq!(inspect, run, "{name} {path:?}");
            assert!(inspect.contains(want), "{name} {path:?}: {inspect}");
        }
    }
}
