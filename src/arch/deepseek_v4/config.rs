//! The DeepSeek V4 config as the reference reads it: the serde schema with transformers'
//! defaults, the legacy hub keys `DeepseekV4Config.__post_init__` folds in (layer kinds, MLP
//! kinds, compress rates, RoPE blocks, resolved here the same way), what the reference
//! hard-codes, and the [`RuntimeConfig`] the network reads beyond the per-layer table.

use crate::arch::config::{
    check_len, default_count, default_true, rope_frequencies, RopeFrequencies, TextConfig,
};
use crate::layers::moe::score_routing::ScoreFn;
use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// `DeepseekV4Config` with the reference's defaults, plus the legacy hub keys its `__post_init__`
/// folds in.
#[derive(Debug, Deserialize)]
pub(super) struct DeepseekV4Config {
    #[serde(default = "default_count::<129_280>")]
    pub(super) vocab_size: usize,
    #[serde(default = "default_count::<4096>")]
    pub(super) hidden_size: usize,
    /// `intermediate_size` is mapped onto it by the reference's `attribute_map`.
    #[serde(default = "default_count::<2048>", alias = "intermediate_size")]
    pub(super) moe_intermediate_size: usize,
    #[serde(default = "default_count::<43>")]
    pub(super) num_hidden_layers: usize,
    #[serde(default = "default_count::<64>")]
    pub(super) num_attention_heads: usize,
    #[serde(default = "default_count::<1>")]
    pub(super) num_key_value_heads: usize,
    #[serde(default = "default_count::<512>")]
    pub(super) head_dim: usize,
    #[serde(default = "default_count::<1024>")]
    pub(super) q_lora_rank: usize,
    #[serde(default = "default_count::<6>")]
    pub(super) num_experts_per_tok: usize,
    /// `num_local_experts` is mapped onto it by the reference's `attribute_map`.
    #[serde(default = "default_count::<256>", alias = "num_local_experts")]
    pub(super) n_routed_experts: usize,
    #[serde(default = "default_count::<1>")]
    pub(super) n_shared_experts: usize,
    #[serde(default = "default_scoring_func")]
    pub(super) scoring_func: String,
    #[serde(default = "default_true")]
    pub(super) norm_topk_prob: bool,
    #[serde(default = "default_routed_scaling_factor")]
    pub(super) routed_scaling_factor: f64,
    #[serde(default = "default_count::<1_048_576>")]
    pub(super) max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    pub(super) rope_theta: f64,
    pub(super) layer_types: Option<Vec<String>>,
    pub(super) compress_rates: Option<Map<String, Value>>,
    #[serde(default = "default_compress_rope_theta")]
    pub(super) compress_rope_theta: f64,
    #[serde(default = "default_count::<4>")]
    pub(super) hc_mult: usize,
    #[serde(default = "default_count::<20>")]
    pub(super) hc_sinkhorn_iters: usize,
    #[serde(default = "default_eps")]
    pub(super) hc_eps: f64,
    pub(super) mlp_layer_types: Option<Vec<String>>,
    #[serde(default = "default_swiglu_limit")]
    pub(super) swiglu_limit: f64,
    #[serde(default = "default_count::<128>")]
    pub(super) sliding_window: usize,
    #[serde(default = "default_count::<8>")]
    pub(super) o_groups: usize,
    #[serde(default = "default_count::<1024>")]
    pub(super) o_lora_rank: usize,
    #[serde(default = "default_count::<64>")]
    pub(super) index_n_heads: usize,
    #[serde(default = "default_count::<128>")]
    pub(super) index_head_dim: usize,
    #[serde(default = "default_count::<512>")]
    pub(super) index_topk: usize,
    #[serde(default = "default_count::<1>")]
    pub(super) num_nextn_predict_layers: usize,
    #[serde(default = "default_activation")]
    pub(super) hidden_act: String,
    #[serde(default = "default_eps")]
    pub(super) rms_norm_eps: f64,
    #[serde(default)]
    pub(super) tie_word_embeddings: bool,
    pub(super) rope_parameters: Option<Value>,
    pub(super) partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub(super) attention_bias: bool,
    #[serde(default)]
    pub(super) mlp_bias: bool,
    /// Not a field of the reference config (it stays an unused attribute); the reference's
    /// router always adds `e_score_correction_bias` before top-k, which is `noaux_tc`.
    pub(super) topk_method: Option<String>,
    // Legacy hub keys, popped and folded in by `__post_init__`.
    pub(super) compress_ratios: Option<Vec<Value>>,
    pub(super) compress_rate_csa: Option<usize>,
    pub(super) compress_rate_hca: Option<usize>,
    pub(super) num_hash_layers: Option<usize>,
    pub(super) qk_rope_head_dim: Option<usize>,
    pub(super) rope_scaling: Option<Value>,
    #[serde(flatten)]
    pub(super) rest: Map<String, Value>,
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
pub(super) const HARMLESS: &[&str] = &["expert_dtype"];

pub(super) const SLIDING: &str = "sliding_attention";
pub(super) const CSA: &str = "compressed_sparse_attention";
pub(super) const HCA: &str = "heavily_compressed_attention";
pub(super) const HASH_MOE: &str = "hash_moe";
pub(super) const MOE: &str = "moe";
/// The reference's `_COMPRESS_RATIO_TO_LAYER_TYPE`.
pub(super) const RATIO_TO_KIND: [(u64, Kind); 3] =
    [(0, Kind::Sliding), (4, Kind::Csa), (128, Kind::Hca)];
/// The reference's `default_num_hash_layers`.
pub(super) const DEFAULT_HASH_LAYERS: usize = 3;
/// The reference's `default_partial_rotary_factor` (`qk_rope_head_dim` 64 / `head_dim` 512).
pub(super) const DEFAULT_PARTIAL_ROTARY: f64 = 64.0 / 512.0;
/// Dimensions above this are refused, so that no product below can overflow.
pub(super) const MAX_DIM: usize = 1 << 31;

/// The attention kind of a layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Kind {
    Sliding,
    Csa,
    Hca,
}

impl Kind {
    pub(super) fn from_name(s: &str) -> Option<Kind> {
        match s {
            SLIDING => Some(Kind::Sliding),
            CSA => Some(Kind::Csa),
            HCA => Some(Kind::Hca),
            _ => None,
        }
    }
}

/// `layer_types` as `__post_init__` resolves it: explicit list, else the legacy per-layer
/// `compress_ratios` (every entry mapped, MTP entry included, then cut to the layer count), else
/// the V4-Pro default (2 HCA, then CSA/HCA interleaved).
pub(super) fn resolve_layer_types(
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
pub(super) fn resolve_mlp_types(
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
pub(super) fn resolve_rates(
    c: &DeepseekV4Config,
    p: &str,
) -> Result<(Option<usize>, Option<usize>)> {
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
pub(super) fn resolve_rope(
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
pub(super) fn partial_rotary(c: &DeepseekV4Config, p: &str, warnings: &mut Vec<String>) -> f64 {
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

/// What the reference hard-codes, so that other values would be silently ignored by it;
/// called once the sizes are known positive.
pub(super) fn check_hard_coded(
    c: &DeepseekV4Config,
    p: &str,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let key = |k: &str| format!("{p}{k}");
    let (nh, hd) = (c.num_attention_heads, c.head_dim);
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
    Ok(())
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

/// Validate and read the [`RuntimeConfig`] of a DeepSeek V4 config (part of [`super::parse`]).
pub(super) fn runtime_config_of(c: &DeepseekV4Config, text: &TextConfig) -> Result<RuntimeConfig> {
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
