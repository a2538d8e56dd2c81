//! DeepSeek V4 (`DeepseekV4ForCausalLM`: DeepSeek-V4-Flash, DeepSeek-V4-Pro). Reference:
//! transformers 5.23.0 `models/deepseek_v4/{configuration,modeling}_deepseek_v4.py`, cache layers
//! `DeepseekV4HCACache` / `DeepseekV4CSACache` (in the modeling file) on top of
//! `cache_utils.DynamicSlidingWindowLayer`.
//!
//! Notable:
//! - three attention kinds, every one with a sliding window of `sliding_window` tokens over a
//!   single shared KV head (MQA, `head_dim` 512) whose one tensor serves as keys and values (K=V):
//!   `sliding_attention` (window only, plain RoPE θ`rope_theta`), `compressed_sparse_attention`
//!   (CSA: plus one compressed entry per `compress_rates.csa` tokens, built from two overlapping
//!   series, of which a lightning indexer picks the top `index_topk` per query) and
//!   `heavily_compressed_attention` (HCA: plus one entry per `compress_rates.hca` tokens, all
//!   attended). Compressed layers use the "compress" RoPE (θ`compress_rope_theta`, YaRN);
//! - low-rank queries (`q_lora_rank`), grouped low-rank output projection (`o_groups` ×
//!   `o_lora_rank`), per-head attention sinks;
//! - mHC: the residual is `hc_mult` streams, mixed around attention and MoE by two
//!   hyper-connections per layer (Sinkhorn-projected), collapsed by a final `hc_head`;
//! - every layer is MoE (+1 shared expert); the first `num_hash_layers` route by a frozen
//!   `tid2eid[token]` table (a persistent buffer, not a parameter, so not counted);
//! - configs come in two forms, both read exactly as `DeepseekV4Config.__post_init__` does: the
//!   hub form (`compress_ratios` per layer 0/4/128, with one extra entry for the MTP layer that is
//!   dropped; `num_hash_layers`; `qk_rope_head_dim`; top-level `rope_scaling` + `compress_rope_theta`)
//!   and the transformers form (`layer_types`, `compress_rates`, `mlp_layer_types`,
//!   `partial_rotary_factor`, nested `rope_parameters` {main, compress}).
//!
//! Running it: the network is [`model`]; Hub checkpoints (DeepSeek's own tensor names, FP8
//! block-scaled weights and FP4 experts with `.scale`) load through [`checkpoint_name`] and
//! `loader::quantized`. Where the lightning indexer must choose, llmarch selects by the
//! definition (ties to the lower index) in prefill and decode alike; the reference's `torch.topk`
//! does not, see `layers::lightning_indexer`.
//!
//! Cache, what llmarch holds vs what the reference holds (per layer, batch 1):
//! - window: llmarch keeps `sliding_window` K=V rows of `head_dim`. The reference keeps
//!   `sliding_window − 1` rows after each step; on sliding layers (plain
//!   `DynamicSlidingWindowLayer`) it stores them twice (`keys` and `values` are separate copies of
//!   the same tensor), on CSA/HCA layers once (`values` aliases `keys`);
//! - compressed entries (`compressed_kv`): `context / ratio` rows of `head_dim`; CSA also keeps the
//!   indexer's compressed keys, `context / ratio` rows of `index_head_dim`;
//! - compressor carry: the projected kv and gate of the `context mod ratio` tokens of the window
//!   still open (`buffer_kv`/`buffer_gate`; CSA: 2 series each, so 4 × `head_dim` per token, and
//!   4 × `index_head_dim` for the indexer; HCA: 2 × `head_dim`), as the reference;
//! - CSA overlap carry (`overlap_kv`/`overlap_gate`): the last closed window's first series (Ca),
//!   kv and gate, `ratio` rows of `head_dim` (and of `index_head_dim` for the indexer), from the moment the
//!   first window closes, as the reference.
//!
//! Dtypes: everything is in the KV dtype except the overlap gates, which are f32: they hold the
//! gate logits plus `position_bias`, a parameter the reference keeps in f32
//! (`_keep_in_fp32_modules_strict`), so a bf16 `from_pretrained` model holds them in f32 (checked
//! on transformers 5.23.0). A model cast with `.to(bf16)` instead, as
//! `tests/oracle/measure_cache.py` does, holds them in bf16. The carry buffers hold the raw
//! projections (no bias yet) and are in the model dtype either way.

pub mod model;

use super::config::{
    check_len, default_count, default_true, positive, rope_frequencies, rope_from_params,
    RopeFrequencies, TextConfig,
};
use super::{ArchSpec, Attention, CachePart, Family, Ffn, LayerSpec, ParamCounts, Retention, Rope};
use crate::layers::score_routing::ScoreFn;
use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use serde_json::{json, Map, Value};

pub const FAMILY: Family = Family {
    name: "deepseek_v4",
    model_types: &["deepseek_v4"],
    architectures: &["DeepseekV4ForCausalLM"],
    summary: "mHC hyper-connections, compressed sparse (CSA, lightning indexer) + heavily compressed (HCA) attention beside a sliding window, shared-KV MQA with K=V, grouped output projection, hash-routed MoE",
    parse: |text| Ok(parse(text)?.0),
    build: Some(|raw, opts, vb, lm_head| {
        Ok(Box::new(model::DeepseekV4Model::from_config(
            raw, opts, vb, lm_head,
        )?))
    }),
    rename: Some(checkpoint_name),
};

/// The reference's module name of a checkpoint tensor. The Hub checkpoints use DeepSeek's own
/// names without the `model.` prefix (`layers.0.attn.wq_a.weight`, `embed.weight`,
/// `head.weight`, `hc_head_fn`, `layers.0.ffn.experts.3.w1.weight`, ...); transformers 5.23.0
/// maps them with the renames of `conversion_mapping.py` (`"deepseek_v4"`), applied here in the
/// same order, and its `save_pretrained` writes a mix (the `model.` prefix with DeepSeek's leaf
/// names). Names already in the reference's form come out unchanged. Per-expert weights keep one
/// tensor per expert (`mlp.experts.{e}.gate_proj.weight`: w1 → gate, w3 → up, w2 → down); FP8
/// scales follow their weight (`*.weight_scale_inv`).
pub fn checkpoint_name(name: &str) -> String {
    const LEAF_TOP: [(&str, &str); 5] = [
        ("embed.weight", "embed_tokens.weight"),
        ("head.weight", "lm_head.weight"),
        ("hc_head_fn", "hc_head.hc_fn"),
        ("hc_head_base", "hc_head.hc_base"),
        ("hc_head_scale", "hc_head.hc_scale"),
    ];
    const MIDDLE: [(&str, &str); 26] = [
        (".attn.", ".self_attn."),
        (".ffn.", ".mlp."),
        (".indexer.compressor.", ".compressor.indexer."),
        (".attn_norm.", ".input_layernorm."),
        (".ffn_norm.", ".post_attention_layernorm."),
        (".hc_attn_fn", ".attn_hc.fn"),
        (".hc_attn_base", ".attn_hc.base"),
        (".hc_attn_scale", ".attn_hc.scale"),
        (".hc_ffn_fn", ".ffn_hc.fn"),
        (".hc_ffn_base", ".ffn_hc.base"),
        (".hc_ffn_scale", ".ffn_hc.scale"),
        (".attn_sink", ".sinks"),
        (
            ".indexer.weights_proj.",
            ".compressor.indexer.scorer.weights_proj.",
        ),
        (".indexer.wq_b.", ".compressor.indexer.q_b_proj."),
        (".norm.", ".kv_norm."),
        (".ape", ".position_bias"),
        (".wq_a.", ".q_a_proj."),
        (".self_attn.wq_b.", ".self_attn.q_b_proj."),
        (".wkv.", ".kv_proj."),
        (".wgate.", ".gate_proj."),
        (".wo_a.", ".o_a_proj."),
        (".wo_b.", ".o_b_proj."),
        (".q_norm.", ".q_a_norm."),
        (".gate.bias", ".gate.e_score_correction_bias"),
        (".w1.", ".gate_proj."),
        (".w3.", ".up_proj."),
    ];
    let bare = name.strip_prefix("model.").unwrap_or(name);
    for (from, to) in LEAF_TOP {
        if let Some(rest) = bare.strip_prefix(from) {
            let renamed = format!("{to}{rest}");
            return if to.starts_with("lm_head") {
                renamed
            } else {
                format!("model.{renamed}")
            };
        }
    }
    if bare.starts_with("lm_head.") {
        return bare.to_string();
    }
    let mut s = bare.to_string();
    for (from, to) in MIDDLE {
        s = s.replace(from, to);
    }
    // w2 is the down projection (of routed and shared experts alike).
    s = s.replace(".w2.", ".down_proj.");
    format!("model.{s}")
}

/// `DeepseekV4Config` with the reference's defaults, plus the legacy hub keys its `__post_init__`
/// folds in.
#[derive(Debug, Deserialize)]
struct DeepseekV4Config {
    #[serde(default = "default_count::<129_280>")]
    vocab_size: usize,
    #[serde(default = "default_count::<4096>")]
    hidden_size: usize,
    /// `intermediate_size` is mapped onto it by the reference's `attribute_map`.
    #[serde(default = "default_count::<2048>", alias = "intermediate_size")]
    moe_intermediate_size: usize,
    #[serde(default = "default_count::<43>")]
    num_hidden_layers: usize,
    #[serde(default = "default_count::<64>")]
    num_attention_heads: usize,
    #[serde(default = "default_count::<1>")]
    num_key_value_heads: usize,
    #[serde(default = "default_count::<512>")]
    head_dim: usize,
    #[serde(default = "default_count::<1024>")]
    q_lora_rank: usize,
    #[serde(default = "default_count::<6>")]
    num_experts_per_tok: usize,
    /// `num_local_experts` is mapped onto it by the reference's `attribute_map`.
    #[serde(default = "default_count::<256>", alias = "num_local_experts")]
    n_routed_experts: usize,
    #[serde(default = "default_count::<1>")]
    n_shared_experts: usize,
    #[serde(default = "default_scoring_func")]
    scoring_func: String,
    #[serde(default = "default_true")]
    norm_topk_prob: bool,
    #[serde(default = "default_routed_scaling_factor")]
    routed_scaling_factor: f64,
    #[serde(default = "default_count::<1_048_576>")]
    max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    layer_types: Option<Vec<String>>,
    compress_rates: Option<Map<String, Value>>,
    #[serde(default = "default_compress_rope_theta")]
    compress_rope_theta: f64,
    #[serde(default = "default_count::<4>")]
    hc_mult: usize,
    #[serde(default = "default_count::<20>")]
    hc_sinkhorn_iters: usize,
    #[serde(default = "default_eps")]
    hc_eps: f64,
    mlp_layer_types: Option<Vec<String>>,
    #[serde(default = "default_swiglu_limit")]
    swiglu_limit: f64,
    #[serde(default = "default_count::<128>")]
    sliding_window: usize,
    #[serde(default = "default_count::<8>")]
    o_groups: usize,
    #[serde(default = "default_count::<1024>")]
    o_lora_rank: usize,
    #[serde(default = "default_count::<64>")]
    index_n_heads: usize,
    #[serde(default = "default_count::<128>")]
    index_head_dim: usize,
    #[serde(default = "default_count::<512>")]
    index_topk: usize,
    #[serde(default = "default_count::<1>")]
    num_nextn_predict_layers: usize,
    #[serde(default = "default_activation")]
    hidden_act: String,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    rope_parameters: Option<Value>,
    partial_rotary_factor: Option<f64>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    /// Not a field of the reference config (it stays an unused attribute); the reference's
    /// router always adds `e_score_correction_bias` before top-k, which is `noaux_tc`.
    topk_method: Option<String>,
    // Legacy hub keys, popped and folded in by `__post_init__`.
    compress_ratios: Option<Vec<Value>>,
    compress_rate_csa: Option<usize>,
    compress_rate_hca: Option<usize>,
    num_hash_layers: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    rope_scaling: Option<Value>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

fn default_scoring_func() -> String {
    "sqrtsoftplus".into()
}
fn default_routed_scaling_factor() -> f64 {
    1.5
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_compress_rope_theta() -> f64 {
    160_000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_swiglu_limit() -> f64 {
    10.0
}
fn default_activation() -> String {
    "silu".into()
}

/// Keys DeepSeek V4 configs carry that do not change the text model. `expert_dtype` is folded
/// into `quantization_config` (weight storage only).
const HARMLESS: &[&str] = &["expert_dtype"];

const SLIDING: &str = "sliding_attention";
const CSA: &str = "compressed_sparse_attention";
const HCA: &str = "heavily_compressed_attention";
const HASH_MOE: &str = "hash_moe";
const MOE: &str = "moe";
/// The reference's `_COMPRESS_RATIO_TO_LAYER_TYPE`.
const RATIO_TO_KIND: [(u64, Kind); 3] = [(0, Kind::Sliding), (4, Kind::Csa), (128, Kind::Hca)];
/// The reference's `default_num_hash_layers`.
const DEFAULT_HASH_LAYERS: usize = 3;
/// The reference's `default_partial_rotary_factor` (`qk_rope_head_dim` 64 / `head_dim` 512).
const DEFAULT_PARTIAL_ROTARY: f64 = 64.0 / 512.0;
/// Dimensions above this are refused, so that no product below can overflow.
const MAX_DIM: usize = 1 << 31;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Sliding,
    Csa,
    Hca,
}

impl Kind {
    fn from_name(s: &str) -> Option<Kind> {
        match s {
            SLIDING => Some(Kind::Sliding),
            CSA => Some(Kind::Csa),
            HCA => Some(Kind::Hca),
            _ => None,
        }
    }
}

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

/// `layer_types` as `__post_init__` resolves it: explicit list, else the legacy per-layer
/// `compress_ratios` (every entry mapped, MTP entry included, then cut to the layer count), else
/// the V4-Pro default (2 HCA, then CSA/HCA interleaved).
fn resolve_layer_types(
    c: &DeepseekV4Config,
    n: usize,
    p: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<Kind>> {
    if let Some(types) = &c.layer_types {
        if c.compress_ratios.is_some() {
            warnings.push(format!(
                "key `{p}compress_ratios` is ignored because `{p}layer_types` is set (as the reference does)"
            ));
        }
        if types.len() > n {
            warnings.push(format!(
                "key `{p}layer_types` has {} entries; the reference keeps the first {n} (num_hidden_layers)",
                types.len()
            ));
        }
        let types = &types[..types.len().min(n)];
        check_len(&format!("{p}layer_types"), types, n)?;
        return types
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Kind::from_name(t).ok_or_else(|| {
                    anyhow!(
                        "key `{p}layer_types[{i}]` = `{t}` (layer {i}): DeepSeek V4 layers are `{SLIDING}`, `{CSA}` or `{HCA}`"
                    )
                })
            })
            .collect();
    }
    if let Some(ratios) = &c.compress_ratios {
        let mut kinds = Vec::with_capacity(ratios.len());
        for (i, r) in ratios.iter().enumerate() {
            let whose = if i < n {
                format!("layer {i}")
            } else {
                format!(
                    "entry {i}, beyond num_hidden_layers {n} (an MTP layer's; the reference maps every entry before dropping the extra ones)"
                )
            };
            let kind = r
                .as_f64()
                .and_then(|v| RATIO_TO_KIND.iter().find(|(k, _)| *k as f64 == v))
                .map(|(_, kind)| *kind)
                .ok_or_else(|| {
                    anyhow!(
                        "key `{p}compress_ratios[{i}]` = {r} ({whose}): not a known compress ratio; the reference maps 0 → {SLIDING}, 4 → {CSA}, 128 → {HCA}"
                    )
                })?;
            kinds.push(kind);
        }
        if ratios.len() > n + c.num_nextn_predict_layers {
            warnings.push(format!(
                "key `{p}compress_ratios` has {} entries for {n} layers and {} MTP layer(s); the reference keeps the first {n}",
                ratios.len(),
                c.num_nextn_predict_layers
            ));
        }
        kinds.truncate(n);
        check_len(&format!("{p}compress_ratios"), &kinds, n)?;
        return Ok(kinds);
    }
    let mut kinds = vec![Kind::Hca; n.min(2)];
    kinds.extend((0..n.saturating_sub(2)).map(|i| if i % 2 == 1 { Kind::Csa } else { Kind::Hca }));
    Ok(kinds)
}

/// `mlp_layer_types` as `__post_init__` resolves it: explicit list, else the first
/// `num_hash_layers` (default 3) `hash_moe` and the rest `moe`. `true` = hash-routed.
fn resolve_mlp_types(
    c: &DeepseekV4Config,
    n: usize,
    p: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<bool>> {
    if let Some(types) = &c.mlp_layer_types {
        if c.num_hash_layers.is_some() {
            warnings.push(format!(
                "key `{p}num_hash_layers` is ignored because `{p}mlp_layer_types` is set (as the reference does)"
            ));
        }
        if types.len() > n {
            warnings.push(format!(
                "key `{p}mlp_layer_types` has {} entries; the reference keeps the first {n} (num_hidden_layers)",
                types.len()
            ));
        }
        let types = &types[..types.len().min(n)];
        check_len(&format!("{p}mlp_layer_types"), types, n)?;
        return types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                HASH_MOE => Ok(true),
                MOE => Ok(false),
                _ => Err(anyhow!(
                    "key `{p}mlp_layer_types[{i}]` = `{t}` (layer {i}): DeepSeek V4 MLP layers are `{HASH_MOE}` or `{MOE}`"
                )),
            })
            .collect();
    }
    let n_hash = c.num_hash_layers.unwrap_or(DEFAULT_HASH_LAYERS);
    Ok((0..n).map(|i| i < n_hash).collect())
}

/// `compress_rates` as `__post_init__` resolves it: the dict (default CSA 4, HCA 128), with the
/// legacy scalar `compress_rate_csa`/`compress_rate_hca` folded in. Returns (CSA, HCA) rates,
/// `None` where absent.
fn resolve_rates(c: &DeepseekV4Config, p: &str) -> Result<(Option<usize>, Option<usize>)> {
    let (mut csa, mut hca) = (None, None);
    match &c.compress_rates {
        None => {
            csa = Some(4);
            hca = Some(128);
        }
        Some(map) => {
            for (k, v) in map {
                let rate = v
                    .as_u64()
                    .map(|r| r as usize)
                    .ok_or_else(|| anyhow!("key `{p}compress_rates.{k}` = {v} is not a count"))?;
                match k.as_str() {
                    CSA => csa = Some(rate),
                    HCA => hca = Some(rate),
                    _ => bail!(
                        "key `{p}compress_rates.{k}`: only `{CSA}` and `{HCA}` layers are compressed"
                    ),
                }
            }
        }
    }
    if let Some(r) = c.compress_rate_csa {
        csa = Some(r);
    }
    if let Some(r) = c.compress_rate_hca {
        hca = Some(r);
    }
    Ok((csa, hca))
}

/// The `main` (sliding layers) and `compress` (CSA/HCA layers, their compressors and indexer)
/// RoPE blocks, as `__post_init__` builds them: a nested `{main, compress}` dict is taken as is
/// (each missing `rope_theta` filled from `rope_theta`, each missing `partial_rotary_factor`
/// from an explicit top-level `partial_rotary_factor`, else none: the whole head rotates);
/// otherwise `main` is plain RoPE at `rope_theta` and `compress` is the flat `rope_scaling` (it
/// wins over `rope_parameters`) at `compress_rope_theta`, YaRN with attention factor 1.
fn resolve_rope(
    c: &DeepseekV4Config,
    partial: f64,
    p: &str,
    warnings: &mut Vec<String>,
) -> Result<(Value, Value)> {
    let non_empty = |v: &Option<Value>| match v {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) if m.is_empty() => None,
        Some(v) => Some(v.clone()),
    };
    let (rp, rp_key) = match (non_empty(&c.rope_scaling), non_empty(&c.rope_parameters)) {
        (Some(s), other) => {
            if other.is_some() {
                warnings.push(format!(
                    "keys `{p}rope_scaling` and `{p}rope_parameters` are both set; the reference uses `rope_scaling`"
                ));
            }
            (s, "rope_scaling")
        }
        (None, Some(r)) => (r, "rope_parameters"),
        (None, None) => (json!({}), "rope_parameters"),
    };
    let rp = rp
        .as_object()
        .ok_or_else(|| anyhow!("key `{p}{rp_key}` is not an object"))?
        .clone();
    let nested = matches!(
        (rp.get("main"), rp.get("compress")),
        (Some(Value::Object(_)), Some(Value::Object(_)))
    );
    if nested {
        let fill = |label: &str| -> Value {
            let mut b = rp
                .get(label)
                .and_then(|v| v.as_object())
                .cloned()
                .unwrap_or_default();
            b.entry("rope_theta").or_insert(json!(c.rope_theta));
            if let Some(f) = c.partial_rotary_factor {
                b.entry("partial_rotary_factor").or_insert(json!(f));
            }
            let kind = b
                .get("rope_type")
                .or_else(|| b.get("type"))
                .cloned()
                .unwrap_or(json!("default"));
            b.insert("rope_type".into(), kind);
            Value::Object(b)
        };
        return Ok((fill("main"), fill("compress")));
    }
    let main = json!({
        "rope_type": "default",
        "rope_theta": c.rope_theta,
        "partial_rotary_factor": partial,
    });
    let mut compress: Map<String, Value> = rp
        .into_iter()
        .filter(|(k, _)| k != "main" && k != "compress")
        .collect();
    let kind = compress
        .get("rope_type")
        .or_else(|| compress.get("type"))
        .cloned()
        .unwrap_or(json!("default"));
    compress.insert("rope_type".into(), kind.clone());
    compress.insert("rope_theta".into(), json!(c.compress_rope_theta));
    compress.insert("partial_rotary_factor".into(), json!(partial));
    if kind == json!("yarn") {
        compress.entry("attention_factor").or_insert(json!(1.0));
    }
    Ok((main, Value::Object(compress)))
}

/// The rotated share of each head: `partial_rotary_factor`, else the legacy
/// `qk_rope_head_dim / head_dim`, else the reference's default.
fn partial_rotary(c: &DeepseekV4Config, p: &str, warnings: &mut Vec<String>) -> f64 {
    let hd = c.head_dim;
    match (c.partial_rotary_factor, c.qk_rope_head_dim) {
        (Some(f), Some(q)) => {
            if (hd as f64 * f) as usize != q {
                warnings.push(format!(
                    "key `{p}qk_rope_head_dim` = {q} is ignored: `{p}partial_rotary_factor` = {f} gives {} rotated dims",
                    (hd as f64 * f) as usize
                ));
            }
            f
        }
        (Some(f), None) => f,
        (None, Some(q)) => q as f64 / hd as f64,
        (None, None) => DEFAULT_PARTIAL_ROTARY,
    }
}

/// What the network needs beyond the per-layer table.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub rms_norm_eps: f64,
    pub q_lora_rank: usize,
    pub o_groups: usize,
    pub o_lora_rank: usize,
    pub index_n_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    pub hc_mult: usize,
    pub hc_sinkhorn_iters: usize,
    pub hc_eps: f64,
    pub swiglu_limit: f64,
    pub routed_scaling_factor: f64,
    pub scoring: ScoreFn,
    /// Per layer: routed by the `tid2eid` table.
    pub hashed: Vec<bool>,
    /// Sliding layers' RoPE.
    pub rope_main: RopeFrequencies,
    /// CSA/HCA layers', their compressors' and the indexer's RoPE.
    pub rope_compress: RopeFrequencies,
}

/// Validate and read the [`RuntimeConfig`] of a DeepSeek V4 config (part of [`parse`]).
fn runtime_config_of(c: &DeepseekV4Config, text: &TextConfig) -> Result<RuntimeConfig> {
    let p = text.key_prefix();
    let mut ignored = vec![];
    let n = c.num_hidden_layers;
    for (k, v) in [
        ("rms_norm_eps", c.rms_norm_eps),
        ("hc_eps", c.hc_eps),
        ("swiglu_limit", c.swiglu_limit),
        ("routed_scaling_factor", c.routed_scaling_factor),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            bail!("key `{p}{k}` = {v} must be a number ≥ 0");
        }
    }
    if c.hc_sinkhorn_iters == 0 {
        bail!("key `{p}hc_sinkhorn_iters` must be at least 1");
    }
    let partial = partial_rotary(c, p, &mut ignored);
    let (main, compress) = resolve_rope(c, partial, p, &mut ignored)?;
    let freqs = |block: &Value, label: &str| {
        rope_frequencies(
            block,
            block.get("truncate").cloned(),
            c.head_dim,
            c.max_position_embeddings,
            &format!("{p}rope_parameters.{label}"),
        )
    };
    Ok(RuntimeConfig {
        rms_norm_eps: c.rms_norm_eps,
        q_lora_rank: c.q_lora_rank,
        o_groups: c.o_groups,
        o_lora_rank: c.o_lora_rank,
        index_n_heads: c.index_n_heads,
        index_head_dim: c.index_head_dim,
        index_topk: c.index_topk,
        hc_mult: c.hc_mult,
        hc_sinkhorn_iters: c.hc_sinkhorn_iters,
        hc_eps: c.hc_eps,
        swiglu_limit: c.swiglu_limit,
        routed_scaling_factor: c.routed_scaling_factor,
        scoring: ScoreFn::from_name(&c.scoring_func)?,
        hashed: resolve_mlp_types(c, n, p, &mut ignored)?,
        rope_main: freqs(&main, "main")?,
        rope_compress: freqs(&compress, "compress")?,
    })
}

/// Read a DeepSeek V4 config once into its [`ArchSpec`] and the [`RuntimeConfig`] its network
/// needs, both validated: every command (`inspect`, `kv-budget`, `run`) gives the same verdict.
pub fn parse(text: &TextConfig) -> Result<(ArchSpec, RuntimeConfig)> {
    let c: DeepseekV4Config = text.parse()?;
    let spec = arch_spec(text, &c)?;
    let runtime = runtime_config_of(&c, text)?;
    Ok((spec, runtime))
}

fn arch_spec(text: &TextConfig, c: &DeepseekV4Config) -> Result<ArchSpec> {
    let p = text.key_prefix();
    let key = |k: &str| format!("{p}{k}");
    let mut warnings = text.check_unknown_keys(&c.rest, HARMLESS)?;

    // 1. Dimensions.
    let n = positive(&key("num_hidden_layers"), c.num_hidden_layers)?;
    for (k, v) in [
        ("vocab_size", c.vocab_size),
        ("hidden_size", c.hidden_size),
        ("moe_intermediate_size", c.moe_intermediate_size),
        ("num_attention_heads", c.num_attention_heads),
        ("head_dim", c.head_dim),
        ("q_lora_rank", c.q_lora_rank),
        ("n_routed_experts", c.n_routed_experts),
        ("num_experts_per_tok", c.num_experts_per_tok),
        ("hc_mult", c.hc_mult),
        ("sliding_window", c.sliding_window),
        ("o_groups", c.o_groups),
        ("o_lora_rank", c.o_lora_rank),
        ("index_n_heads", c.index_n_heads),
        ("index_head_dim", c.index_head_dim),
        ("index_topk", c.index_topk),
    ] {
        positive(&key(k), v)?;
        if v > MAX_DIM {
            bail!("key `{}` = {v} is implausibly large", key(k));
        }
    }
    let (h, nh, hd) = (c.hidden_size, c.num_attention_heads, c.head_dim);

    // 2. What the reference hard-codes, so that other values would be silently ignored by it.
    if c.num_key_value_heads != 1 {
        bail!(
            "key `{}` = {}: DeepSeek V4 attention has one shared KV head (the reference builds `kv_proj` to a single head_dim whatever this says)",
            key("num_key_value_heads"),
            c.num_key_value_heads
        );
    }
    if c.n_shared_experts != 1 {
        bail!(
            "key `{}` = {}: the reference builds exactly one shared expert of width moe_intermediate_size whatever this says; llmarch does not know another layout",
            key("n_shared_experts"),
            c.n_shared_experts
        );
    }
    if c.attention_bias {
        bail!(
            "key `{}` = true: the reference builds no attention biases (it ignores this key); a checkpoint with them is not a DeepSeek V4 llmarch knows",
            key("attention_bias")
        );
    }
    if !c.norm_topk_prob {
        // transformers' own configs may say false (its default elsewhere); the reference's routers
        // renormalise anyway, so the model is the same: say so rather than refuse it.
        warnings.push(format!(
            "key `{}` = false is ignored, as the reference does: DeepSeek V4 routers always renormalise the top-k weights",
            key("norm_topk_prob")
        ));
    }
    if let Some(m) = c.topk_method.as_deref() {
        if m != "noaux_tc" {
            bail!(
                "key `{}` = `{m}`: the reference always routes with the `e_score_correction_bias` (noaux_tc); llmarch does not know `{m}`",
                key("topk_method")
            );
        }
    }
    if c.hidden_act != "silu" {
        bail!(
            "key `{}` = `{}` is not supported (DeepSeek V4 uses silu)",
            key("hidden_act"),
            c.hidden_act
        );
    }
    if !matches!(c.scoring_func.as_str(), "sqrtsoftplus" | "sigmoid") {
        bail!(
            "key `{}` = `{}` is not supported: routers score with `sqrtsoftplus` or `sigmoid` (the reference looks the name up in ACT2FN, which has no `softmax`)",
            key("scoring_func"),
            c.scoring_func
        );
    }
    if c.num_experts_per_tok > c.n_routed_experts {
        bail!(
            "key `{}` = {} must be between 1 and n_routed_experts ({})",
            key("num_experts_per_tok"),
            c.num_experts_per_tok,
            c.n_routed_experts
        );
    }
    if (nh * hd) % c.o_groups != 0 {
        bail!(
            "key `{}` = {}: num_attention_heads × head_dim ({}) does not split into that many output groups",
            key("o_groups"),
            c.o_groups,
            nh * hd
        );
    }

    // 3. Per-layer schedules.
    let kinds = resolve_layer_types(c, n, p, &mut warnings)?;
    let hashed = resolve_mlp_types(c, n, p, &mut warnings)?;
    let (csa_rate, hca_rate) = resolve_rates(c, p)?;
    let rate_of = |i: usize, kind: Kind| -> Result<Option<usize>> {
        let (rate, ty) = match kind {
            Kind::Sliding => return Ok(None),
            Kind::Csa => (csa_rate, CSA),
            Kind::Hca => (hca_rate, HCA),
        };
        let r = rate
            .ok_or_else(|| anyhow!("layer {i}: `{ty}` has no rate in key `{p}compress_rates`"))?;
        if r == 0 || r > MAX_DIM {
            bail!("layer {i}: key `{p}compress_rates.{ty}` = {r} must be a positive ratio");
        }
        Ok(Some(r))
    };
    if kinds.contains(&Kind::Csa) && hca_rate.is_none() {
        bail!(
            "key `{p}compress_rates` has no `{HCA}` rate; the reference's CSA cache layer reads it too"
        );
    }

    // 4. RoPE: `partial_rotary_factor` wins over the legacy `qk_rope_head_dim`.
    let partial = partial_rotary(c, p, &mut warnings);
    let (main_block, compress_block) = resolve_rope(c, partial, p, &mut warnings)?;
    let main_rope = rope_from_params(&main_block, hd, &key("rope_parameters.main"))?;
    let compress_rope = rope_from_params(&compress_block, hd, &key("rope_parameters.compress"))?;
    for (rope, what) in [(&main_rope, "main"), (&compress_rope, "compress")] {
        if rope.rotary_dim == 0 || rope.rotary_dim % 2 != 0 || rope.rotary_dim > hd {
            bail!(
                "key `{}`: {} rotated dims; V4's interleaved RoPE needs an even count between 2 and head_dim ({hd})",
                key(&format!("rope_parameters.{what}.partial_rotary_factor")),
                rope.rotary_dim
            );
        }
    }
    if kinds.contains(&Kind::Csa) && compress_rope.rotary_dim > c.index_head_dim {
        bail!(
            "key `{}` = {}: the indexer rotates {} dims of its keys with the compress RoPE, more than it has",
            key("index_head_dim"),
            c.index_head_dim,
            compress_rope.rotary_dim
        );
    }

    // 5. Parameters, tensor by tensor as `DeepseekV4ForCausalLM` builds them. Buffers
    //    (`tid2eid`, `e_score_correction_bias`, RoPE tables) are not parameters.
    let (v, ql, e, iw) = (
        c.vocab_size,
        c.q_lora_rank,
        c.n_routed_experts,
        c.moe_intermediate_size,
    );
    let (ihd, inh, m) = (c.index_head_dim, c.index_n_heads, c.hc_mult);
    let mut other = Count::default();
    let mut routed = Count::default();
    other.add(&[h])?; // model.norm
    other.add(&[m, m, h])?; // hc_head.hc_fn
    other.add(&[m])?; // hc_head.hc_base
    other.add(&[1])?; // hc_head.hc_scale

    let window = c.sliding_window;
    let mut layers = Vec::with_capacity(n);
    for (i, (&kind, &hash)) in kinds.iter().zip(&hashed).enumerate() {
        let rate = rate_of(i, kind)?;

        // Attention: low-rank q, one shared KV head, grouped low-rank output, sinks.
        other.add(&[h, ql])?; // q_a_proj
        other.add(&[ql])?; // q_a_norm
        other.add(&[ql, nh, hd])?; // q_b_proj
        other.add(&[h, hd])?; // kv_proj
        other.add(&[hd])?; // kv_norm
        other.add(&[c.o_lora_rank, nh, hd])?; // o_a_proj: [groups × o_lora, nh × hd / groups]
        other.add(&[c.o_groups, c.o_lora_rank, h])?; // o_b_proj
        other.add(&[nh])?; // sinks
        match (kind, rate) {
            (Kind::Csa, Some(r)) => {
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
            (Kind::Hca, Some(r)) => {
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

        // Cache (see the header): K=V window, compressed entries, indexer keys, carried state.
        let mut cache = vec![CachePart::new("K=V", hd, Retention::Window { window })];
        let mut notes = vec![];
        let attention = match (kind, rate) {
            (Kind::Csa, Some(r)) => {
                cache.extend([
                    CachePart::new("compressed KV", hd, Retention::Compressed { ratio: r }),
                    CachePart::new("indexer keys", ihd, Retention::Compressed { ratio: r }),
                    // kv + gate of the open window's tokens, two series each.
                    CachePart::new(
                        "compressor carry",
                        4 * hd,
                        Retention::Remainder { ratio: r },
                    ),
                    // kv and gate of the last closed window's Ca series; the gate has
                    // `position_bias` (kept f32 by the reference) added, so it is f32.
                    CachePart::new(
                        "compressor overlap kv",
                        hd,
                        Retention::LastBlock { ratio: r },
                    ),
                    CachePart::new(
                        "compressor overlap gate",
                        hd,
                        Retention::LastBlock { ratio: r },
                    )
                    .f32(),
                    CachePart::new("indexer carry", 4 * ihd, Retention::Remainder { ratio: r }),
                    CachePart::new("indexer overlap kv", ihd, Retention::LastBlock { ratio: r }),
                    CachePart::new(
                        "indexer overlap gate",
                        ihd,
                        Retention::LastBlock { ratio: r },
                    )
                    .f32(),
                ]);
                notes.push(format!("indexer {inh}×{ihd} top-{}", c.index_topk));
                Attention::Compressed {
                    ratio: r,
                    window,
                    index_topk: Some(c.index_topk),
                }
            }
            (Kind::Hca, Some(r)) => {
                cache.extend([
                    CachePart::new("compressed KV", hd, Retention::Compressed { ratio: r }),
                    CachePart::new(
                        "compressor carry",
                        2 * hd,
                        Retention::Remainder { ratio: r },
                    ),
                ]);
                Attention::Compressed {
                    ratio: r,
                    window,
                    index_topk: None,
                }
            }
            _ => Attention::Sliding { window },
        };
        let rope: Rope = if kind == Kind::Sliding {
            main_rope.clone()
        } else {
            compress_rope.clone()
        };

        layers.push(LayerSpec {
            index: i,
            attention,
            // One shared KV head, keys = values, both head_dim wide: the naive figure is
            // q_heads × 2 × head_dim per token, GQA/MQA takes it to 2 × head_dim, K=V to head_dim.
            q_heads: nh,
            kv_heads: 1,
            head_dim: hd,
            v_head_dim: hd,
            kv_source: None,
            k_eq_v: true,
            rope: Some(rope),
            ffn: Ffn::Moe {
                experts: e,
                top_k: c.num_experts_per_tok,
                width: iw,
                shared_width: Some(iw),
                dense_width: None,
                routing: if hash {
                    "hash".into()
                } else {
                    c.scoring_func.clone()
                },
            },
            ple_width: None,
            cache,
            notes,
        });
    }

    let mut top = Count::default();
    top.add(&[v, h])?;
    let embedding = top.0;
    let lm_head = if c.tie_word_embeddings { 0 } else { embedding };
    let total = [embedding, lm_head, routed.0]
        .into_iter()
        .try_fold(other.0, |acc, x| acc.checked_add(x))
        .ok_or_else(|| anyhow!("the parameter count overflows 64 bits"))?;
    let params = ParamCounts {
        total,
        embedding,
        lm_head,
        routed_experts: routed.0,
        ..Default::default()
    }
    .finish(c.num_experts_per_tok, e);

    // 6. Model-wide notes.
    let count = |k: Kind| kinds.iter().filter(|&&x| x == k).count();
    let mut notes = vec![
        format!(
            "mHC ×{m} (Sinkhorn {}, eps {})",
            c.hc_sinkhorn_iters, c.hc_eps
        ),
        format!(
            "attention: {} sliding, {} CSA, {} HCA; window {window}; one shared KV head × {hd} (K=V); per-head sinks",
            count(Kind::Sliding),
            count(Kind::Csa),
            count(Kind::Hca)
        ),
        format!(
            "q LoRA rank {ql}; grouped output projection {} groups × {}",
            c.o_groups, c.o_lora_rank
        ),
        format!(
            "MoE: {e} experts top-{} × {iw} + 1 shared; {} scores, noaux_tc, routed scale {}, SwiGLU limit {}",
            c.num_experts_per_tok, c.scoring_func, c.routed_scaling_factor, c.swiglu_limit
        ),
    ];
    let n_hash = hashed.iter().filter(|&&x| x).count();
    if n_hash > 0 {
        notes.push(format!(
            "hash routing on {n_hash} layer(s): frozen tid2eid [{v} × {}] buffer, not a parameter",
            c.num_experts_per_tok
        ));
    }
    if c.num_nextn_predict_layers > 0 {
        notes.push(format!(
            "MTP layers: {} (listed, not built, not counted)",
            c.num_nextn_predict_layers
        ));
    }
    if let Some(q) = text
        .value
        .get("quantization_config")
        .and_then(|q| q.as_object())
    {
        let method = q
            .get("quant_method")
            .and_then(|x| x.as_str())
            .unwrap_or("?");
        notes.push(format!(
            "checkpoint quantized ({method}); counts are of the dequantized model"
        ));
    }

    Ok(ArchSpec {
        family: FAMILY.name,
        model_type: text.model_type.clone(),
        hf_class: "DeepseekV4ForCausalLM".into(),
        architecture: text.architecture.clone(),
        hidden_size: h,
        vocab_size: v,
        max_context: c.max_position_embeddings,
        dtype: text.dtype(),
        tie_word_embeddings: c.tie_word_embeddings,
        params,
        layers,
        notes,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::budget::{layer_bytes, KvDtype};
    use crate::arch::{config::ParseOptions, parse_config};

    const FLASH: &str = include_str!("../../../configs/DeepSeek-V4-Flash/config.json");
    const PRO: &str = include_str!("../../../configs/DeepSeek-V4-Pro/config.json");
    /// The tiny config transformers 5.23 saves (copy of `tests/fixtures/tiny/deepseek-v4`): the
    /// transformers form, with `qk_rope_head_dim` written out beside `partial_rotary_factor`.
    const TINY: &str = r#"{
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 0,
  "compress_rates": {
    "compressed_sparse_attention": 4,
    "heavily_compressed_attention": 8
  },
  "compress_rope_theta": 160000.0,
  "eos_token_id": 1,
  "hc_eps": 1e-06,
  "hc_mult": 2,
  "hc_sinkhorn_iters": 3,
  "head_dim": 32,
  "hidden_act": "silu",
  "hidden_size": 64,
  "index_head_dim": 16,
  "index_n_heads": 2,
  "index_topk": 3,
  "initializer_range": 0.02,
  "layer_types": [
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention"
  ],
  "max_position_embeddings": 512,
  "mlp_bias": false,
  "mlp_layer_types": [
    "hash_moe",
    "hash_moe",
    "moe",
    "moe",
    "moe"
  ],
  "model_type": "deepseek_v4",
  "moe_intermediate_size": 32,
  "n_routed_experts": 4,
  "n_shared_experts": 1,
  "norm_topk_prob": true,
  "num_attention_heads": 4,
  "num_experts_per_tok": 2,
  "num_hidden_layers": 5,
  "num_key_value_heads": 1,
  "num_nextn_predict_layers": 1,
  "o_groups": 2,
  "o_lora_rank": 16,
  "output_router_logits": false,
  "pad_token_id": null,
  "partial_rotary_factor": 0.25,
  "q_lora_rank": 32,
  "qk_rope_head_dim": 8,
  "rms_norm_eps": 1e-06,
  "rope_parameters": {
    "compress": {
      "attention_factor": 1.0,
      "beta_fast": 32,
      "beta_slow": 1,
      "factor": 4.0,
      "original_max_position_embeddings": 128,
      "partial_rotary_factor": 0.25,
      "rope_theta": 160000.0,
      "rope_type": "yarn"
    },
    "main": {
      "partial_rotary_factor": 0.25,
      "rope_theta": 10000.0,
      "rope_type": "default"
    }
  },
  "rope_theta": 10000.0,
  "routed_scaling_factor": 1.5,
  "router_aux_loss_coef": 0.001,
  "router_jitter_noise": 0.0,
  "scoring_func": "sqrtsoftplus",
  "sliding_window": 8,
  "swiglu_limit": 10.0,
  "tie_word_embeddings": false,
  "transformers_version": "5.23.0",
  "use_cache": true,
  "vocab_size": 256
}"#;

    fn raw(s: &str) -> Value {
        serde_json::from_str(s).expect("config is JSON")
    }

    fn spec(v: &Value) -> Result<ArchSpec> {
        parse_config(v, &ParseOptions::default())
    }

    fn err(v: &Value) -> String {
        match spec(v) {
            Ok(_) => panic!("expected an error"),
            Err(e) => format!("{e:#}"),
        }
    }

    fn with(base: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> Value {
        let mut v = raw(base);
        if let Some(o) = v.as_object_mut() {
            edit(o);
        }
        v
    }

    fn kinds(s: &ArchSpec) -> Vec<Kind> {
        s.layers
            .iter()
            .map(|l| match l.attention {
                Attention::Sliding { .. } => Kind::Sliding,
                Attention::Compressed {
                    index_topk: Some(_),
                    ..
                } => Kind::Csa,
                _ => Kind::Hca,
            })
            .collect()
    }

    fn tiny() -> Value {
        raw(TINY)
    }

    #[test]
    fn checkpoint_names_become_the_reference_modules() {
        for (from, to) in [
            // The Hub's own names.
            ("embed.weight", "model.embed_tokens.weight"),
            ("head.weight", "lm_head.weight"),
            ("norm.weight", "model.norm.weight"),
            ("hc_head_fn", "model.hc_head.hc_fn"),
            (
                "layers.3.attn.wq_a.weight",
                "model.layers.3.self_attn.q_a_proj.weight",
            ),
            (
                "layers.3.attn.wq_a.weight_scale_inv",
                "model.layers.3.self_attn.q_a_proj.weight_scale_inv",
            ),
            (
                "layers.3.attn.wq_b.weight",
                "model.layers.3.self_attn.q_b_proj.weight",
            ),
            (
                "layers.3.attn.q_norm.weight",
                "model.layers.3.self_attn.q_a_norm.weight",
            ),
            (
                "layers.3.attn.norm.weight",
                "model.layers.3.self_attn.kv_norm.weight",
            ),
            (
                "layers.3.attn.kv_norm.weight",
                "model.layers.3.self_attn.kv_norm.weight",
            ),
            ("layers.3.attn.attn_sink", "model.layers.3.self_attn.sinks"),
            (
                "layers.3.attn.compressor.ape",
                "model.layers.3.self_attn.compressor.position_bias",
            ),
            (
                "layers.3.attn.compressor.wgate.weight",
                "model.layers.3.self_attn.compressor.gate_proj.weight",
            ),
            (
                "layers.3.attn.indexer.compressor.wkv.weight",
                "model.layers.3.self_attn.compressor.indexer.kv_proj.weight",
            ),
            (
                "layers.3.attn.indexer.compressor.norm.weight",
                "model.layers.3.self_attn.compressor.indexer.kv_norm.weight",
            ),
            (
                "layers.3.attn.indexer.wq_b.weight",
                "model.layers.3.self_attn.compressor.indexer.q_b_proj.weight",
            ),
            (
                "layers.3.attn.indexer.weights_proj.weight",
                "model.layers.3.self_attn.compressor.indexer.scorer.weights_proj.weight",
            ),
            ("layers.3.hc_attn_fn", "model.layers.3.attn_hc.fn"),
            ("layers.3.hc_ffn_scale", "model.layers.3.ffn_hc.scale"),
            (
                "layers.3.attn_norm.weight",
                "model.layers.3.input_layernorm.weight",
            ),
            (
                "layers.3.ffn_norm.weight",
                "model.layers.3.post_attention_layernorm.weight",
            ),
            (
                "layers.3.ffn.gate.bias",
                "model.layers.3.mlp.gate.e_score_correction_bias",
            ),
            (
                "layers.3.ffn.gate.tid2eid",
                "model.layers.3.mlp.gate.tid2eid",
            ),
            (
                "layers.3.ffn.experts.7.w1.weight",
                "model.layers.3.mlp.experts.7.gate_proj.weight",
            ),
            (
                "layers.3.ffn.experts.7.w2.weight_scale_inv",
                "model.layers.3.mlp.experts.7.down_proj.weight_scale_inv",
            ),
            (
                "layers.3.ffn.experts.7.w3.weight",
                "model.layers.3.mlp.experts.7.up_proj.weight",
            ),
            (
                "layers.3.ffn.shared_experts.w2.weight",
                "model.layers.3.mlp.shared_experts.down_proj.weight",
            ),
            // What transformers' save_pretrained writes: the prefix with the Hub's leaves.
            ("model.embed_tokens.weight", "model.embed_tokens.weight"),
            ("model.hc_head.hc_base", "model.hc_head.hc_base"),
            (
                "model.layers.1.attn.wo_a.weight",
                "model.layers.1.self_attn.o_a_proj.weight",
            ),
            // The reference's own names stay.
            (
                "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight",
                "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight",
            ),
            (
                "model.layers.1.mlp.experts.gate_up_proj",
                "model.layers.1.mlp.experts.gate_up_proj",
            ),
            ("model.norm.weight", "model.norm.weight"),
            ("lm_head.weight", "lm_head.weight"),
        ] {
            assert_eq!(checkpoint_name(from), to, "{from}");
        }
    }

    #[test]
    fn flash_layers_and_params() {
        let s = spec(&raw(FLASH)).unwrap();
        assert_eq!(
            s.layers.len(),
            43,
            "the 44th compress_ratios entry (MTP) is dropped"
        );
        let k = kinds(&s);
        assert_eq!(&k[..3], &[Kind::Sliding, Kind::Sliding, Kind::Csa]);
        for (i, kind) in k.iter().enumerate().skip(2) {
            let want = if i % 2 == 0 { Kind::Csa } else { Kind::Hca };
            assert_eq!(*kind, want, "layer {i}");
        }
        assert_eq!(k.iter().filter(|&&x| x == Kind::Sliding).count(), 2);
        assert_eq!(k.iter().filter(|&&x| x == Kind::Csa).count(), 21);
        assert_eq!(k.iter().filter(|&&x| x == Kind::Hca).count(), 20);
        assert_eq!(
            s.layers[2].attention,
            Attention::Compressed {
                ratio: 4,
                window: 128,
                index_topk: Some(512)
            }
        );
        assert_eq!(
            s.layers[3].attention,
            Attention::Compressed {
                ratio: 128,
                window: 128,
                index_topk: None
            }
        );
        assert_eq!(s.layers[0].attention, Attention::Sliding { window: 128 });
        // RoPE: sliding layers plain θ10000, compressed layers YaRN θ160000; 64 rotated dims.
        let main = s.layers[0].rope.clone().unwrap();
        assert_eq!(
            (main.kind.as_str(), main.theta, main.rotary_dim),
            ("default", 10_000.0, 64)
        );
        let comp = s.layers[2].rope.clone().unwrap();
        assert_eq!(
            (comp.kind.as_str(), comp.theta, comp.rotary_dim, comp.factor),
            ("yarn", 160_000.0, 64, Some(16.0))
        );
        // Hash routing on the first 3 layers.
        let routing = |i: usize| match &s.layers[i].ffn {
            Ffn::Moe { routing, .. } => routing.clone(),
            _ => panic!("MoE everywhere"),
        };
        assert_eq!(routing(2), "hash");
        assert_eq!(routing(3), "sqrtsoftplus");
        for l in &s.layers {
            assert!(l.k_eq_v && l.kv_heads == 1 && l.head_dim == 512 && l.q_heads == 64);
        }
        // Exact counts of transformers 5.23.0 on the meta device (tests/fixtures/reference_params.json).
        assert_eq!(s.params.total, 284_332_230_231);
        assert_eq!(s.params.embedding, 529_530_880);
        assert_eq!(s.params.lm_head, 529_530_880);
        assert_eq!(s.params.routed_experts, 277_025_390_592);
        assert!(
            (s.params.active as f64 / 1e9 - 13.80).abs() < 0.005,
            "{}",
            s.params.active
        );
        assert!(s.notes.iter().any(|n| n.contains("MTP layers: 1")));
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    #[test]
    fn pro_layers_and_params() {
        let s = spec(&raw(PRO)).unwrap();
        assert_eq!(s.layers.len(), 61);
        let k = kinds(&s);
        assert_eq!(&k[..3], &[Kind::Hca, Kind::Hca, Kind::Csa]);
        assert_eq!(k.iter().filter(|&&x| x == Kind::Sliding).count(), 0);
        assert_eq!(k.iter().filter(|&&x| x == Kind::Csa).count(), 30);
        assert_eq!(k.iter().filter(|&&x| x == Kind::Hca).count(), 31);
        assert_eq!(s.params.total, 1_572_997_179_491);
        assert_eq!(s.params.embedding, 926_679_040);
        assert_eq!(s.params.lm_head, 926_679_040);
        assert_eq!(s.params.routed_experts, 1_547_396_186_112);
        assert!(
            (s.params.active as f64 / 1e9 - 49.78).abs() < 0.005,
            "{}",
            s.params.active
        );
    }

    #[test]
    fn transformers_form_parses_like_hub_form() {
        let hub = spec(&raw(FLASH)).unwrap();
        let types: Vec<&str> = [SLIDING, SLIDING]
            .into_iter()
            .chain((0..41).map(|i| if i % 2 == 0 { CSA } else { HCA }))
            .collect();
        let mlp: Vec<&str> = (0..43)
            .map(|i| if i < 3 { HASH_MOE } else { MOE })
            .collect();
        let tf = with(FLASH, |o| {
            for k in [
                "compress_ratios",
                "num_hash_layers",
                "qk_rope_head_dim",
                "rope_scaling",
                "compress_rope_theta",
            ] {
                o.remove(k);
            }
            o.insert("layer_types".into(), json!(types));
            o.insert("mlp_layer_types".into(), json!(mlp));
            o.insert("compress_rates".into(), json!({CSA: 4, HCA: 128}));
            o.insert("partial_rotary_factor".into(), json!(0.125));
            o.insert(
                "rope_parameters".into(),
                json!({
                    "main": {"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.125},
                    "compress": {"rope_type": "yarn", "rope_theta": 160000, "factor": 16,
                        "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1,
                        "partial_rotary_factor": 0.125, "attention_factor": 1.0}
                }),
            );
        });
        let tf = spec(&tf).unwrap();
        assert_eq!(tf.layers, hub.layers);
        assert_eq!(tf.params, hub.params);
        assert!(tf.warnings.is_empty(), "{:?}", tf.warnings);
    }

    #[test]
    fn tiny_reference_config_params_and_cache() {
        let s = spec(&tiny()).unwrap();
        assert_eq!(
            kinds(&s),
            vec![Kind::Sliding, Kind::Csa, Kind::Hca, Kind::Csa, Kind::Hca]
        );
        // DeepseekV4ForCausalLM(config) on the meta device: 297,253 parameters.
        assert_eq!(s.params.total, 297_253);
        assert_eq!(s.params.routed_experts, 5 * 4 * 3 * 32 * 64);
        assert_eq!(s.layers[0].rope.as_ref().unwrap().rotary_dim, 8);
        // Cache at 43 tokens, f32 (tests/fixtures/reference_cache.json): compressed entries, indexer
        // keys, overlap state and the 3 open tokens (43 mod 4) of CSA layers match the reference
        // element for element; the window is 8 here (the reference keeps 7).
        let csa: Vec<(String, u64)> = layer_bytes(&s.layers[1], 43, 1, KvDtype::F32).unwrap();
        let want = [
            ("K=V", 8 * 32 * 4),
            ("compressed KV", 1280),
            ("indexer keys", 640),
            ("compressor carry", 768 + 768),
            ("compressor overlap kv", 512),
            ("compressor overlap gate", 512),
            ("indexer carry", 384 + 384),
            ("indexer overlap kv", 256),
            ("indexer overlap gate", 256),
        ];
        assert_eq!(csa.len(), want.len());
        for ((name, bytes), (wn, wb)) in csa.iter().zip(want) {
            assert_eq!((name.as_str(), *bytes), (wn, wb as u64));
        }
        // HCA (ratio 8): compressed entries (5 × 32) and the 43 mod 8 = 3 open tokens.
        let hca = layer_bytes(&s.layers[2], 43, 1, KvDtype::F32).unwrap();
        assert_eq!(hca[1], ("compressed KV".to_string(), 640));
        assert_eq!(hca[2], ("compressor carry".to_string(), 3 * 2 * 32 * 4));
    }

    #[test]
    fn flash_cache_at_one_million() {
        let s = spec(&raw(FLASH)).unwrap();
        let ctx = 1_048_576u64;
        let bytes = |i: usize| -> u64 {
            layer_bytes(&s.layers[i], ctx, 1, KvDtype::Bf16)
                .unwrap()
                .iter()
                .map(|(_, b)| b)
                .sum()
        };
        assert_eq!(bytes(0), 128 * 512 * 2);
        // bf16 for all but the two overlap gates (f32); 2^20 is a multiple of both ratios, so no
        // window is open.
        let csa = 128 * 512 + (ctx / 4) * (512 + 128) + 4 * (512 + 128);
        assert_eq!(bytes(2), csa * 2 + 4 * (512 + 128) * 4);
        let hca = 128 * 512 + (ctx / 128) * 512;
        assert_eq!(bytes(3), hca * 2);
    }

    #[test]
    fn default_config_is_v4_pro_schedule() {
        let s = spec(&json!({"model_type": "deepseek_v4"})).unwrap();
        assert_eq!(s.layers.len(), 43);
        let k = kinds(&s);
        assert_eq!(&k[..4], &[Kind::Hca, Kind::Hca, Kind::Hca, Kind::Csa]);
        assert_eq!(s.layers[0].rope.as_ref().unwrap().rotary_dim, 64);
        assert_eq!(s.layers[0].rope.as_ref().unwrap().kind, "default");
    }

    #[test]
    fn bad_compress_ratio_names_the_layer() {
        let v = with(FLASH, |o| {
            let mut r = vec![json!(0); 44];
            r[2] = json!(7);
            o.insert("compress_ratios".into(), json!(r));
        });
        let e = err(&v);
        assert!(
            e.contains("compress_ratios[2]") && e.contains("layer 2") && e.contains('7'),
            "{e}"
        );
        // The MTP entry is mapped too (a KeyError in the reference).
        let v = with(FLASH, |o| {
            let mut r = vec![json!(4); 44];
            r[43] = json!(64);
            o.insert("compress_ratios".into(), json!(r));
        });
        let e = err(&v);
        assert!(
            e.contains("compress_ratios[43]") && e.contains("MTP"),
            "{e}"
        );
        let v = with(FLASH, |o| {
            o.insert("compress_ratios".into(), json!([0, 4]));
        });
        let e = err(&v);
        assert!(e.contains("`compress_ratios` has 2 entries"), "{e}");
    }

    #[test]
    fn bad_layer_types() {
        let v = with(FLASH, |o| {
            o.remove("compress_ratios");
            o.insert("layer_types".into(), json!(vec![SLIDING; 42]));
        });
        let e = err(&v);
        assert!(e.contains("`layer_types` has 42 entries"), "{e}");
        // Longer lists are cut, as the reference does, with a warning.
        let v = with(FLASH, |o| {
            o.insert("layer_types".into(), json!(vec![HCA; 44]));
        });
        let s = spec(&v).unwrap();
        assert_eq!(s.layers.len(), 43);
        assert!(s.warnings.iter().any(|w| w.contains("compress_ratios")));
        let v = with(FLASH, |o| {
            let mut t = vec![SLIDING; 43];
            t[5] = "full_attention";
            o.insert("layer_types".into(), json!(t));
        });
        let e = err(&v);
        assert!(e.contains("layer_types[5]") && e.contains("layer 5"), "{e}");
    }

    #[test]
    fn bad_mlp_layer_types() {
        let e = err(&with(FLASH, |o| {
            o.insert("mlp_layer_types".into(), json!(vec![MOE; 40]));
        }));
        assert!(e.contains("`mlp_layer_types` has 40 entries"), "{e}");
        let e = err(&with(FLASH, |o| {
            let mut t = vec![MOE; 43];
            t[1] = "dense";
            o.insert("mlp_layer_types".into(), json!(t));
        }));
        assert!(
            e.contains("mlp_layer_types[1]") && e.contains("layer 1"),
            "{e}"
        );
    }

    #[test]
    fn num_hash_layers_is_capped() {
        let s = spec(&with(FLASH, |o| {
            o.insert("num_hash_layers".into(), json!(50));
        }))
        .unwrap();
        assert!(s
            .layers
            .iter()
            .all(|l| matches!(&l.ffn, Ffn::Moe { routing, .. } if routing == "hash")));
    }

    #[test]
    fn compress_rates() {
        // Legacy scalar override.
        let s = spec(&with(FLASH, |o| {
            o.insert("compress_rate_csa".into(), json!(8));
        }))
        .unwrap();
        assert!(matches!(
            s.layers[2].attention,
            Attention::Compressed { ratio: 8, .. }
        ));
        let e = err(&with(FLASH, |o| {
            o.insert("compress_rates".into(), json!({CSA: 4}));
        }));
        assert!(e.contains("compress_rates") && e.contains(HCA), "{e}");
        let e = err(&with(FLASH, |o| {
            o.insert("compress_rates".into(), json!({CSA: 0, HCA: 128}));
        }));
        assert!(
            e.contains("layer 2") && e.contains("compress_rates.compressed_sparse_attention"),
            "{e}"
        );
        let e = err(&with(FLASH, |o| {
            o.insert(
                "compress_rates".into(),
                json!({CSA: 4, HCA: 128, SLIDING: 1}),
            );
        }));
        assert!(e.contains("compress_rates.sliding_attention"), "{e}");
    }

    #[test]
    fn norm_topk_prob_false_is_ignored_with_a_warning() {
        let s = spec(&with(FLASH, |o| {
            o.insert("norm_topk_prob".into(), json!(false));
        }))
        .unwrap();
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("`norm_topk_prob` = false is ignored")),
            "{:?}",
            s.warnings
        );
    }

    #[test]
    fn keys_the_reference_ignores_are_refused() {
        let cases: &[(&str, Value)] = &[
            ("num_key_value_heads", json!(2)),
            ("n_shared_experts", json!(2)),
            ("attention_bias", json!(true)),
            ("topk_method", json!("greedy")),
            ("hidden_act", json!("gelu")),
            ("scoring_func", json!("softmax")),
            ("o_groups", json!(7)),
            ("num_experts_per_tok", json!(300)),
            ("head_dim", json!(0)),
            ("kv_lora_rank", json!(512)),
        ];
        for (k, val) in cases {
            let e = err(&with(FLASH, |o| {
                o.insert(k.to_string(), val.clone());
            }));
            assert!(e.contains(&format!("`{k}`")), "{k}: {e}");
        }
    }

    #[test]
    fn rope_validation() {
        // 63 rotated dims: the interleaved RoPE needs pairs.
        let e = err(&with(FLASH, |o| {
            o.insert("qk_rope_head_dim".into(), json!(63));
        }));
        assert!(
            e.contains("partial_rotary_factor") && e.contains("63"),
            "{e}"
        );
        // `partial_rotary_factor` wins over `qk_rope_head_dim`, with a warning when they differ.
        let s = spec(&with(FLASH, |o| {
            o.insert("partial_rotary_factor".into(), json!(0.25));
        }))
        .unwrap();
        assert_eq!(s.layers[0].rope.as_ref().unwrap().rotary_dim, 128);
        assert!(s.warnings.iter().any(|w| w.contains("qk_rope_head_dim")));
        // Nested blocks without a factor rotate the whole head: more than the indexer's 128 dims.
        let e = err(&with(FLASH, |o| {
            o.remove("rope_scaling");
            o.insert(
                "rope_parameters".into(),
                json!({"main": {"rope_type": "default"}, "compress": {"rope_type": "default"}}),
            );
        }));
        assert!(e.contains("index_head_dim"), "{e}");
        // Without `rope_scaling`, compressed layers use plain RoPE at compress_rope_theta.
        let s = spec(&with(FLASH, |o| {
            o.remove("rope_scaling");
        }))
        .unwrap();
        let r = s.layers[2].rope.clone().unwrap();
        assert_eq!(
            (r.kind.as_str(), r.theta, r.factor),
            ("default", 160_000.0, None)
        );
    }

    #[test]
    fn tied_embeddings_counted_once() {
        let a = spec(&tiny()).unwrap();
        let mut t = tiny();
        t["tie_word_embeddings"] = json!(true);
        let b = spec(&t).unwrap();
        assert_eq!(a.params.total - b.params.total, 256 * 64);
        assert_eq!(b.params.lm_head, 0);
    }

    #[test]
    fn aliases_of_the_attribute_map() {
        let mut t = tiny();
        if let Some(o) = t.as_object_mut() {
            o.remove("moe_intermediate_size");
            o.insert("intermediate_size".into(), json!(48));
        }
        // 374,053 on the meta device with intermediate_size 48.
        assert_eq!(spec(&t).unwrap().params.total, 374_053);
        let mut t = tiny();
        if let Some(o) = t.as_object_mut() {
            o.remove("n_routed_experts");
            o.insert("num_local_experts".into(), json!(8));
        }
        assert_eq!(spec(&t).unwrap().params.total, 421_413);
        let mut t = tiny();
        t["mlp_bias"] = json!(true);
        assert_eq!(spec(&t).unwrap().params.total, 297_893);
    }

    #[test]
    fn no_panic_on_huge_dims() {
        let e = err(&with(FLASH, |o| {
            o.insert("vocab_size".into(), json!(u64::MAX));
        }));
        assert!(e.contains("vocab_size"), "{e}");
    }
}

#[cfg(test)]
mod bounds_tests {
    use crate::arch::config::bounds_test::{real, refuses_past_bound};

    /// Iteration counts and ratios too: `hc_sinkhorn_iters: 1e9` would run without end.
    #[test]
    fn sizes_counts_and_iterations_past_the_bounds_are_refused_by_key() {
        let raw = real("DeepSeek-V4-Pro");
        for path in [
            &["num_hidden_layers"][..],
            &["hc_sinkhorn_iters"],
            &["hc_mult"],
            &["head_dim"],
            &["q_lora_rank"],
            &["o_lora_rank"],
            &["o_groups"],
            &["index_topk"],
            &["index_n_heads"],
            &["n_routed_experts"],
            &["num_hash_layers"],
            &["compress_ratios", "2"],
            &["sliding_window"],
            &["rope_scaling", "original_max_position_embeddings"],
            &["quantization_config", "weight_block_size", "0"],
        ] {
            refuses_past_bound(&raw, path);
        }
    }
}
