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
//! Cache, what llmarch holds vs what the reference holds (per layer, batch 1):
//! - window: llmarch keeps `sliding_window` K=V rows of `head_dim`. The reference keeps
//!   `sliding_window − 1` rows after each step; on sliding layers (plain
//!   `DynamicSlidingWindowLayer`) it stores them twice (`keys` and `values` are separate copies of
//!   the same tensor), on CSA/HCA layers once (`values` aliases `keys`);
//! - compressed entries (`compressed_kv`): `context / ratio` rows of `head_dim`; CSA also keeps the
//!   indexer's compressed keys, `context / ratio` rows of `index_head_dim`;
//! - compressor carry: the projected kv and gate of the `context mod ratio` tokens of the window
//!   still open (`buffer_kv`/`buffer_gate`; CSA: 2 series each, so 4 × `head_dim` per token, and
//!   4 × `index_head_dim` for the indexer; HCA: 2 × `head_dim`). The interface has no
//!   "context mod ratio" retention, so it is budgeted at its maximum, `ratio − 1` tokens; the
//!   reference holds fewer whenever `context mod ratio < ratio − 1` (none at multiples of ratio);
//! - CSA overlap carry (`overlap_kv`/`overlap_gate`): the last closed window's first series (Ca),
//!   kv and gate, `ratio` rows of `head_dim` (and of `index_head_dim` for the indexer). The
//!   reference creates it once the first window closes; it is budgeted from the start.
//!   All parts are in the model (KV) dtype. (Loaded with `from_pretrained` in bf16, the
//!   reference keeps `position_bias` in f32, so its `overlap_gate` tensors come out f32.)

use super::config::{check_len, positive, rope_from_params, TextConfig};
use super::{ArchSpec, Attention, CachePart, Family, Ffn, LayerSpec, ParamCounts, Retention, Rope};
use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use serde_json::{json, Map, Value};

pub const FAMILY: Family = Family {
    name: "deepseek_v4",
    model_types: &["deepseek_v4"],
    architectures: &["DeepseekV4ForCausalLM"],
    summary: "mHC hyper-connections, compressed sparse (CSA, lightning indexer) + heavily compressed (HCA) attention beside a sliding window, shared-KV MQA with K=V, grouped output projection, hash-routed MoE",
    parse,
};

/// `DeepseekV4Config` with the reference's defaults, plus the legacy hub keys its `__post_init__`
/// folds in.
#[derive(Debug, Deserialize)]
struct DeepseekV4Config {
    #[serde(default = "d_vocab")]
    vocab_size: usize,
    #[serde(default = "d_hidden")]
    hidden_size: usize,
    /// `intermediate_size` is mapped onto it by the reference's `attribute_map`.
    #[serde(default = "d_moe_inter", alias = "intermediate_size")]
    moe_intermediate_size: usize,
    #[serde(default = "d_layers")]
    num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    num_attention_heads: usize,
    #[serde(default = "d_one")]
    num_key_value_heads: usize,
    #[serde(default = "d_head_dim")]
    head_dim: usize,
    #[serde(default = "d_q_lora")]
    q_lora_rank: usize,
    #[serde(default = "d_top_k")]
    num_experts_per_tok: usize,
    /// `num_local_experts` is mapped onto it by the reference's `attribute_map`.
    #[serde(default = "d_experts", alias = "num_local_experts")]
    n_routed_experts: usize,
    #[serde(default = "d_one")]
    n_shared_experts: usize,
    #[serde(default = "d_scoring")]
    scoring_func: String,
    #[serde(default = "d_true")]
    norm_topk_prob: bool,
    #[serde(default = "d_routed_scale")]
    routed_scaling_factor: f64,
    #[serde(default = "d_ctx")]
    max_position_embeddings: usize,
    #[serde(default = "d_rope_theta")]
    rope_theta: f64,
    layer_types: Option<Vec<String>>,
    compress_rates: Option<Map<String, Value>>,
    #[serde(default = "d_compress_theta")]
    compress_rope_theta: f64,
    #[serde(default = "d_hc_mult")]
    hc_mult: usize,
    #[serde(default = "d_sinkhorn")]
    hc_sinkhorn_iters: usize,
    #[serde(default = "d_eps")]
    hc_eps: f64,
    mlp_layer_types: Option<Vec<String>>,
    #[serde(default = "d_swiglu")]
    swiglu_limit: f64,
    #[serde(default = "d_window")]
    sliding_window: usize,
    #[serde(default = "d_o_groups")]
    o_groups: usize,
    #[serde(default = "d_o_lora")]
    o_lora_rank: usize,
    #[serde(default = "d_index_heads")]
    index_n_heads: usize,
    #[serde(default = "d_index_head_dim")]
    index_head_dim: usize,
    #[serde(default = "d_index_topk")]
    index_topk: usize,
    #[serde(default = "d_one")]
    num_nextn_predict_layers: usize,
    #[serde(default = "d_act")]
    hidden_act: String,
    #[serde(default = "d_eps")]
    #[allow(dead_code)]
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

fn d_vocab() -> usize {
    129_280
}
fn d_hidden() -> usize {
    4096
}
fn d_moe_inter() -> usize {
    2048
}
fn d_layers() -> usize {
    43
}
fn d_heads() -> usize {
    64
}
fn d_one() -> usize {
    1
}
fn d_head_dim() -> usize {
    512
}
fn d_q_lora() -> usize {
    1024
}
fn d_top_k() -> usize {
    6
}
fn d_experts() -> usize {
    256
}
fn d_scoring() -> String {
    "sqrtsoftplus".into()
}
fn d_true() -> bool {
    true
}
fn d_routed_scale() -> f64 {
    1.5
}
fn d_ctx() -> usize {
    1_048_576
}
fn d_rope_theta() -> f64 {
    10_000.0
}
fn d_compress_theta() -> f64 {
    160_000.0
}
fn d_hc_mult() -> usize {
    4
}
fn d_sinkhorn() -> usize {
    20
}
fn d_eps() -> f64 {
    1e-6
}
fn d_swiglu() -> f64 {
    10.0
}
fn d_window() -> usize {
    128
}
fn d_o_groups() -> usize {
    8
}
fn d_o_lora() -> usize {
    1024
}
fn d_index_heads() -> usize {
    64
}
fn d_index_head_dim() -> usize {
    128
}
fn d_index_topk() -> usize {
    512
}
fn d_act() -> String {
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

fn parse(text: &TextConfig) -> Result<ArchSpec> {
    let c: DeepseekV4Config = text.parse()?;
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
        bail!(
            "key `{}` = false: the reference always renormalises the top-k routing weights (it ignores this key); llmarch does not run un-normalised routing",
            key("norm_topk_prob")
        );
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
    let kinds = resolve_layer_types(&c, n, p, &mut warnings)?;
    let hashed = resolve_mlp_types(&c, n, p, &mut warnings)?;
    let (csa_rate, hca_rate) = resolve_rates(&c, p)?;
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
    let partial = match (c.partial_rotary_factor, c.qk_rope_head_dim) {
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
    };
    let (main_block, compress_block) = resolve_rope(&c, partial, p, &mut warnings)?;
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
                        Retention::Fixed { entries: r - 1 },
                    ),
                    // kv + gate of the last closed window's Ca series.
                    CachePart::new(
                        "compressor overlap",
                        2 * hd,
                        Retention::Fixed { entries: r },
                    ),
                    CachePart::new(
                        "indexer carry",
                        4 * ihd,
                        Retention::Fixed { entries: r - 1 },
                    ),
                    CachePart::new("indexer overlap", 2 * ihd, Retention::Fixed { entries: r }),
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
                        Retention::Fixed { entries: r - 1 },
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
