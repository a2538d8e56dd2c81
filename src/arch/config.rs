//! Stage one of config parsing, shared by every family: unwrap multimodal wrappers
//! (`text_config`), deserialize into a family's serde struct with error paths that name the key,
//! refuse keys nobody understands, and read RoPE parameter blocks.

use super::{Rope, RopeKind};
use crate::layers::rope::{self, Llama3, Yarn};
use anyhow::{anyhow, bail, Result};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// How strict parsing is.
#[derive(Debug, Clone, Default)]
pub struct ParseOptions {
    /// Downgrade unknown config keys from an error to a warning.
    pub allow_unknown_keys: bool,
}

/// The text part of a `config.json`: the file itself for a bare text model, its `text_config`
/// for a multimodal wrapper.
#[derive(Debug, Clone)]
pub struct TextConfig {
    /// `model_type` of the text config (`gemma4_text`, `qwen3_5_moe_text`, `laguna`, ...).
    pub model_type: String,
    /// `model_type` of the wrapper, when there is one (`gemma4`, `qwen3_5`, ...).
    pub wrapper_model_type: Option<String>,
    /// `architectures[0]` of the file.
    pub architecture: Option<String>,
    /// The text config object.
    pub value: Map<String, Value>,
    /// The wrapper's own keys (without `text_config`), when there is one.
    pub wrapper: Option<Map<String, Value>>,
    pub opts: ParseOptions,
}

impl TextConfig {
    pub fn from_raw(raw: &Value, opts: &ParseOptions) -> Result<TextConfig> {
        let obj = raw
            .as_object()
            .ok_or_else(|| anyhow!("the config is not a JSON object"))?;
        let architecture = match obj.get("architectures") {
            Some(Value::Array(a)) => a.first().and_then(|v| v.as_str()).map(String::from),
            _ => None,
        };
        let model_type = |o: &Map<String, Value>| -> Option<String> {
            o.get("model_type")
                .and_then(|v| v.as_str())
                .map(String::from)
        };
        let text = match obj.get("text_config") {
            Some(Value::Object(text)) => {
                let mut wrapper = obj.clone();
                wrapper.remove("text_config");
                let wrapper_type = model_type(obj);
                let text_type = model_type(text)
                    .or_else(|| wrapper_type.as_ref().map(|w| format!("{w}_text")))
                    .unwrap_or_default();
                TextConfig {
                    model_type: text_type,
                    wrapper_model_type: wrapper_type,
                    architecture,
                    value: text.clone(),
                    wrapper: Some(wrapper),
                    opts: opts.clone(),
                }
            }
            Some(other) if !other.is_null() => {
                bail!("key `text_config` is not an object")
            }
            _ => {
                let mt = model_type(obj);
                if mt.is_none() && architecture.is_none() {
                    bail!(
                        "neither `model_type` nor `architectures` is set, so the family is unknown"
                    )
                }
                TextConfig {
                    model_type: mt.unwrap_or_default(),
                    wrapper_model_type: None,
                    architecture,
                    value: obj.clone(),
                    wrapper: None,
                    opts: opts.clone(),
                }
            }
        };
        check_bounds(&text.value, text.key_prefix())?;
        Ok(text)
    }

    /// Where keys live, for error messages: `text_config.` for wrappers.
    pub fn key_prefix(&self) -> &'static str {
        if self.wrapper.is_some() {
            "text_config."
        } else {
            ""
        }
    }

    /// Deserialize the text config into a family's serde struct; errors name the key.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        let v = Value::Object(self.value.clone());
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            anyhow!("key `{}{}`: {}", self.key_prefix(), path, e.inner())
        })
    }

    /// The checkpoint dtype: the text config's `dtype`/`torch_dtype`, else the wrapper's.
    pub fn dtype(&self) -> Option<String> {
        let pick = |o: &Map<String, Value>| {
            o.get("dtype")
                .or_else(|| o.get("torch_dtype"))
                .and_then(|v| v.as_str())
                .map(String::from)
        };
        pick(&self.value).or_else(|| self.wrapper.as_ref().and_then(pick))
    }

    /// Refuse keys that neither the family's struct consumed (`rest`) nor are known not to
    /// change the architecture (`COMMON_HARMLESS_KEYS` + `family_harmless`). Returns warnings
    /// when unknown keys are allowed.
    pub fn check_unknown_keys(
        &self,
        rest: &Map<String, Value>,
        family_harmless: &[&str],
    ) -> Result<Vec<String>> {
        let unknown: Vec<&String> = rest
            .keys()
            .filter(|k| {
                !COMMON_HARMLESS_KEYS.contains(&k.as_str())
                    && !family_harmless.contains(&k.as_str())
            })
            .collect();
        if unknown.is_empty() {
            return Ok(vec![]);
        }
        let list = unknown
            .iter()
            .map(|k| format!("`{}{k}`", self.key_prefix()))
            .collect::<Vec<_>>()
            .join(", ");
        if self.opts.allow_unknown_keys {
            return Ok(vec![format!(
                "ignoring config keys llmarch does not know: {list}; the numbers may be wrong"
            )]);
        }
        Err(anyhow!(
            "config keys llmarch does not know for {}: {list}; a key that may change the \
             architecture is never ignored silently",
            self.model_type
        )
        .context(
            "hint: pass --allow-unknown-keys to treat them as warnings, and report the key if it matters",
        ))
    }
}

/// Keys every `PreTrainedConfig` may carry that do not change what the text model computes.
pub const COMMON_HARMLESS_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "_name_or_path",
    "initializer_range",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "attention_dropout",
    "hidden_dropout",
    "output_router_logits",
    "router_aux_loss_coef",
    "router_jitter_noise",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "is_encoder_decoder",
    "is_decoder",
    "chunk_size_feed_forward",
    "tie_encoder_decoder",
    "use_bfloat16",
    "quantization_config",
    "keys_to_ignore_at_inference",
];

/// Bounds on every size and count a config gives, about 10-100× the largest real model's (in
/// brackets: the largest among the configs under `configs/`). They are checked on the raw JSON
/// before any family reads it, so a hostile or mistyped value cannot make a per-layer table, a
/// RoPE table or an iteration run away; the sizes a family derives from them then fit `usize`
/// products, and parameter and cache totals are computed with checked or 128-bit arithmetic.
/// A bound on a key whose value is a list or an object applies to every number inside it.
pub const BOUNDS: &[(&str, u64)] = &[
    // Layers, and layer counts or indices (64).
    ("num_hidden_layers", LAYERS),
    ("num_kv_shared_layers", LAYERS),
    ("mtp_num_hidden_layers", LAYERS),
    ("num_nextn_predict_layers", LAYERS),
    ("num_hash_layers", LAYERS),
    ("full_attention_interval", LAYERS),
    ("decoder_sparse_step", LAYERS),
    ("mlp_only_layers", LAYERS),
    // Heads and head groups (128).
    ("num_attention_heads", HEADS),
    ("num_attention_heads_per_layer", HEADS),
    ("num_key_value_heads", HEADS),
    ("num_global_key_value_heads", HEADS),
    ("linear_num_key_heads", HEADS),
    ("linear_num_value_heads", HEADS),
    ("index_n_heads", HEADS),
    ("o_groups", HEADS),
    // Head dimensions (512).
    ("head_dim", HEAD_DIM),
    ("global_head_dim", HEAD_DIM),
    ("index_head_dim", HEAD_DIM),
    ("linear_key_head_dim", HEAD_DIM),
    ("linear_value_head_dim", HEAD_DIM),
    ("qk_rope_head_dim", HEAD_DIM),
    ("mrope_section", HEAD_DIM),
    // Model widths (7168).
    ("hidden_size", HIDDEN),
    ("hidden_size_per_layer_input", HIDDEN),
    ("router_hidden_size", HIDDEN),
    // Feed-forward widths and low ranks (21504).
    ("intermediate_size", WIDTH),
    ("moe_intermediate_size", WIDTH),
    ("shared_expert_intermediate_size", WIDTH),
    ("expert_intermediate_size", WIDTH),
    ("q_lora_rank", WIDTH),
    ("o_lora_rank", WIDTH),
    // Vocabularies (262272).
    ("vocab_size", VOCAB),
    ("vocab_size_per_layer_input", VOCAB),
    // Experts and experts per token (384).
    ("num_experts", EXPERTS),
    ("n_routed_experts", EXPERTS),
    ("num_local_experts", EXPERTS),
    ("n_shared_experts", EXPERTS),
    ("num_experts_per_tok", EXPERTS),
    ("top_k_experts", EXPERTS),
    // Positions, windows and top-k over the context (1048576).
    ("max_position_embeddings", POSITIONS),
    ("original_max_position_embeddings", POSITIONS),
    ("sliding_window", POSITIONS),
    ("index_topk", POSITIONS),
    // Convolution kernels (5).
    ("linear_conv_kernel_dim", KERNEL),
    ("cca_time0", KERNEL),
    ("cca_time1", KERNEL),
    // Compression ratios and quantization blocks (128).
    ("compress_ratios", RATIO),
    ("compress_rates", RATIO),
    ("compress_rate_csa", RATIO),
    ("compress_rate_hca", RATIO),
    ("weight_block_size", RATIO),
    // mHC residual streams (4) and Sinkhorn iterations per step (20).
    ("hc_mult", 64),
    ("hc_sinkhorn_iters", 1000),
];
const LAYERS: u64 = 4096;
const HEADS: u64 = 8192;
const HEAD_DIM: u64 = 16_384;
const HIDDEN: u64 = 1 << 18;
const WIDTH: u64 = 1 << 21;
const VOCAB: u64 = 1 << 24;
const EXPERTS: u64 = 1 << 16;
const POSITIONS: u64 = 1 << 27;
const KERNEL: u64 = 1024;
const RATIO: u64 = 1 << 16;

/// The bound [`BOUNDS`] sets for `key`, if any.
pub fn bound_of(key: &str) -> Option<u64> {
    BOUNDS.iter().find(|(k, _)| *k == key).map(|&(_, b)| b)
}

/// Refuse any number in `config` (nested objects and lists included) above the bound
/// [`BOUNDS`] sets for its key; the error names the key as the config spells it.
pub fn check_bounds(config: &Map<String, Value>, prefix: &str) -> Result<()> {
    fn walk(v: &Value, path: &str, bound: Option<u64>) -> Result<()> {
        match v {
            Value::Number(n) => {
                if let Some(b) = bound {
                    // Integers compare exactly; floats (1e30) by value.
                    let over = match n.as_u64() {
                        Some(u) => u > b,
                        None => n.as_f64().is_some_and(|f| f > b as f64),
                    };
                    if over {
                        bail!(
                            "key `{path}` = {n} is larger than any real model's: llmarch accepts at most {b}"
                        );
                    }
                }
                Ok(())
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, &format!("{path}[{i}]"), bound)?;
                }
                Ok(())
            }
            Value::Object(map) => {
                for (k, item) in map {
                    walk(item, &format!("{path}.{k}"), bound_of(k).or(bound))?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
    for (k, v) in config {
        walk(v, &format!("{prefix}{k}"), bound_of(k))?;
    }
    Ok(())
}

/// Upper bound for any single dimension, so that parameter and cache arithmetic cannot overflow.
pub const MAX_DIM: usize = 1 << 24;

/// A positive dimension no larger than [`MAX_DIM`]; names the key when it is not.
pub fn dim(key: &str, v: usize) -> Result<usize> {
    positive(key, v)?;
    if v > MAX_DIM {
        bail!("key `{key}` = {v} is implausibly large (more than {MAX_DIM})");
    }
    Ok(v)
}

/// A layer count: positive and at most 65536.
pub fn layers_count(key: &str, v: usize) -> Result<usize> {
    positive(key, v)?;
    if v > 1 << 16 {
        bail!("key `{key}` = {v} is implausibly large (more than 65536 layers)");
    }
    Ok(v)
}

/// Turn a parameter total computed in u128 into u64.
pub fn to_u64(n: u128) -> Result<u64> {
    u64::try_from(n).map_err(|_| anyhow!("the parameter count does not fit in 64 bits"))
}

/// One RoPE block, validated as the reference does: `rope_type` (or legacy `type`, default
/// `default`), the keys its `_validate_<type>_rope_parameters` requires, `rope_theta` (the model
/// reads it unconditionally), and an even rotary dimension when the whole head rotates.
pub fn rope_from_params(block: &Value, head_dim: usize, what: &str) -> Result<Rope> {
    let obj = match block {
        Value::Object(o) => o,
        Value::Null => bail!(
            "key `{what}` is null: a layer type without RoPE loads in the reference but its \
             forward fails; give it a RoPE block"
        ),
        _ => bail!("key `{what}` is not an object"),
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let required: &[&str] = match kind {
        "yarn" => &["factor", "original_max_position_embeddings"],
        "linear" | "dynamic" => &["factor"],
        "longrope" => &[
            "short_factor",
            "long_factor",
            "original_max_position_embeddings",
        ],
        "llama3" => &[
            "factor",
            "original_max_position_embeddings",
            "low_freq_factor",
            "high_freq_factor",
        ],
        _ => &[],
    };
    for k in required {
        if !obj.contains_key(*k) {
            bail!("key `{what}.{k}` is required for rope_type `{kind}` (the reference refuses the config without it)");
        }
    }
    let rope = rope_basics(obj, kind, head_dim, what)?;
    if head_dim > 4 && head_dim % 2 == 1 && rope.rotary_dim == head_dim {
        bail!("key `{what}`: RoPE needs an even rotary dimension, but the whole head of {head_dim} rotates");
    }
    Ok(rope)
}

/// The fields every RoPE block has: `rope_theta`, `partial_rotary_factor`, `factor`.
fn rope_basics(obj: &Map<String, Value>, kind: &str, head_dim: usize, what: &str) -> Result<Rope> {
    let Some(kind) = RopeKind::parse(kind) else {
        let known: Vec<&str> = RopeKind::ALL.iter().map(|k| k.as_str()).collect();
        bail!(
            "key `{what}.rope_type`: unknown RoPE type `{kind}` (known: {})",
            known.join(", ")
        );
    };
    let theta = obj
        .get("rope_theta")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| anyhow!("key `{what}.rope_theta` is missing or not a number"))?;
    let partial = match obj.get("partial_rotary_factor") {
        None | Some(Value::Null) => 1.0,
        Some(v) => v
            .as_f64()
            .ok_or_else(|| anyhow!("key `{what}.partial_rotary_factor` is not a number"))?,
    };
    if !(0.0..=1.0).contains(&partial) || partial == 0.0 {
        bail!("key `{what}.partial_rotary_factor` = {partial} is outside (0, 1]");
    }
    Ok(Rope {
        kind,
        theta,
        rotary_dim: (head_dim as f64 * partial) as usize,
        factor: obj.get("factor").and_then(|v| v.as_f64()),
    })
}

/// A per-layer list must have one entry per layer.
pub fn check_len<T>(key: &str, list: &[T], layers: usize) -> Result<()> {
    if list.len() != layers {
        bail!(
            "key `{key}` has {} entries but num_hidden_layers is {layers}",
            list.len()
        );
    }
    Ok(())
}

/// Heads must split evenly into KV groups.
pub fn check_heads(layer: usize, q_heads: usize, kv_heads: usize) -> Result<()> {
    if kv_heads == 0 || q_heads == 0 || !q_heads.is_multiple_of(kv_heads) {
        bail!("layer {layer}: {q_heads} query heads do not divide into {kv_heads} KV heads");
    }
    Ok(())
}

/// A number that must be positive; names the key when it is not.
pub fn positive(key: &str, v: usize) -> Result<usize> {
    if v == 0 {
        bail!("key `{key}` must be positive");
    }
    Ok(v)
}

/// A serde default for a size or count: `#[serde(default = "default_count::<512>")]`.
pub fn default_count<const N: usize>() -> usize {
    N
}

/// A serde default of `true`.
pub fn default_true() -> bool {
    true
}

/// One layer type's RoPE as `LagunaRotaryEmbedding` computes it: the frequencies of the leading
/// `2·inv_freq.len()` dims of each head (the rest pass through) and the factor cos/sin are
/// multiplied by.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFrequencies {
    pub kind: RopeKind,
    pub inv_freq: Vec<f32>,
    pub attention_scaling: f64,
    /// Positions at or past this are not implemented for this variant: dynamic NTK recomputes
    /// its frequencies past `max_position_embeddings`, LongRoPE switches to its long factors past
    /// `original_max_position_embeddings` (both for the whole sequence at once, which a cache
    /// cannot follow).
    pub max_positions: Option<usize>,
}

/// A number field of a RoPE block: `None` when absent or null.
fn rope_num(block: &Value, key: &str, what: &str) -> Result<Option<f64>> {
    match block.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| anyhow!("key `{what}.{key}` is not a number")),
    }
}

fn rope_num_req(block: &Value, key: &str, what: &str, kind: RopeKind) -> Result<f64> {
    rope_num(block, key, what)?
        .ok_or_else(|| anyhow!("key `{what}.{key}` is required for rope_type `{kind}`"))
}

fn rope_list(block: &Value, key: &str, what: &str) -> Result<Vec<f64>> {
    block
        .get(key)
        .and_then(|v| v.as_array())
        .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<f64>>>())
        .ok_or_else(|| anyhow!("key `{what}.{key}` must be a list of numbers"))
}

/// The frequencies one RoPE block gives, as the reference's `ROPE_INIT_FUNCTIONS` (and Laguna's
/// own default, which honours `partial_rotary_factor`) compute them, over
/// `dim = ⌊head_dim · partial_rotary_factor⌋` leading dims. `truncate` is the value YaRN reads
/// (see the module notes). Every `rope_type` the config accepts is built; dynamic NTK and LongRoPE
/// only up to the position where the reference would recompute its frequencies.
pub fn rope_frequencies(
    block: &Value,
    truncate: Option<Value>,
    head_dim: usize,
    max_position_embeddings: usize,
    what: &str,
) -> Result<RopeFrequencies> {
    let r = rope_from_params(block, head_dim, what)?;
    let (kind, theta, dim) = (r.kind, r.theta, r.rotary_dim);
    if dim == 0 {
        bail!(
            "key `{what}.partial_rotary_factor`: no dimension of the {head_dim}-wide heads rotates"
        );
    }
    let num = |k: &str| rope_num(block, k, what);
    let req = |k: &str| rope_num_req(block, k, what, kind);
    let mut max_positions = None;
    let (inv_freq, attention_scaling) = match kind {
        RopeKind::Default => (rope::default_inv_freq(theta, dim), 1.0),
        RopeKind::Linear => (rope::linear_inv_freq(theta, dim, req("factor")?), 1.0),
        RopeKind::Dynamic => {
            // At or below `max_position_embeddings` dynamic NTK is the default RoPE.
            req("factor")?;
            max_positions = Some(max_position_embeddings);
            (rope::default_inv_freq(theta, dim), 1.0)
        }
        RopeKind::Yarn => {
            let original = req("original_max_position_embeddings")?;
            let factor = num("factor")?.unwrap_or(max_position_embeddings as f64 / original);
            let nonzero = |k: &str| -> Result<Option<f64>> { Ok(num(k)?.filter(|&v| v != 0.0)) };
            let truncate = match truncate {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => b,
                Some(other) => bail!("key `rope_parameters.truncate` = {other} is not true/false"),
            };
            let yarn = Yarn {
                beta_fast: nonzero("beta_fast")?.unwrap_or(32.0),
                beta_slow: nonzero("beta_slow")?.unwrap_or(1.0),
                truncate,
                attention_factor: num("attention_factor")?,
                mscale: num("mscale")?,
                mscale_all_dim: num("mscale_all_dim")?,
                ..Yarn::new(factor, original)
            };
            let inv = yarn
                .inv_freq(theta, dim)
                .map_err(|e| anyhow!("key `{what}`: {e}"))?;
            (inv, yarn.attention_scaling())
        }
        RopeKind::Llama3 => {
            let l = Llama3 {
                factor: req("factor")?,
                low_freq_factor: req("low_freq_factor")?,
                high_freq_factor: req("high_freq_factor")?,
                original_max_position_embeddings: req("original_max_position_embeddings")?,
            };
            let inv = l
                .inv_freq(theta, dim)
                .map_err(|e| anyhow!("key `{what}`: {e}"))?;
            (inv, 1.0)
        }
        RopeKind::Longrope => {
            let original = req("original_max_position_embeddings")?;
            let factor = num("factor")?.unwrap_or(max_position_embeddings as f64 / original);
            let scaling = match num("attention_factor")? {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / original.ln()).sqrt(),
            };
            let short = rope_list(block, "short_factor", what)?;
            let inv = rope::longrope_inv_freq(theta, dim, &short)
                .map_err(|e| anyhow!("key `{what}.short_factor`: {e}"))?;
            max_positions = Some(original as usize);
            (inv, scaling)
        }
        RopeKind::Proportional => {
            // Gemma-style: the first ⌊partial·d/2⌋ pairs of the whole head rotate with
            // θ^(-2i/d) / factor, the others have frequency 0.
            let factor = num("factor")?.unwrap_or(1.0) as f32;
            let (base, d) = (theta as f32, head_dim as f32);
            let inv = (0..head_dim / 2)
                .map(|i| {
                    if i < dim / 2 {
                        1.0 / base.powf((2 * i) as f32 / d) / factor
                    } else {
                        0.0
                    }
                })
                .collect();
            (inv, 1.0)
        }
    };
    if 2 * inv_freq.len() > head_dim {
        bail!("key `{what}`: {dim} rotated dims do not fit heads of {head_dim}");
    }
    if !(attention_scaling.is_finite() && attention_scaling > 0.0) {
        bail!("key `{what}`: the attention factor {attention_scaling} must be a positive number");
    }
    Ok(RopeFrequencies {
        kind,
        inv_freq,
        attention_scaling,
        max_positions,
    })
}

/// Test helpers for the bounds, shared by the families' tests.
#[cfg(test)]
pub mod bounds_test {
    use super::*;

    /// Every `configs/*/config.json`, by folder name.
    pub const REAL: &[(&str, &str)] = &[
        (
            "DeepSeek-V4-Flash",
            include_str!("../../configs/DeepSeek-V4-Flash/config.json"),
        ),
        (
            "DeepSeek-V4-Pro",
            include_str!("../../configs/DeepSeek-V4-Pro/config.json"),
        ),
        (
            "Laguna-XS.2",
            include_str!("../../configs/Laguna-XS.2/config.json"),
        ),
        (
            "Qwen3.6-27B",
            include_str!("../../configs/Qwen3.6-27B/config.json"),
        ),
        (
            "Qwen3.6-35B-A3B",
            include_str!("../../configs/Qwen3.6-35B-A3B/config.json"),
        ),
        (
            "ZAYA1-8B",
            include_str!("../../configs/ZAYA1-8B/config.json"),
        ),
        (
            "gemma-4-26B-A4B-it",
            include_str!("../../configs/gemma-4-26B-A4B-it/config.json"),
        ),
        (
            "gemma-4-31B-it",
            include_str!("../../configs/gemma-4-31B-it/config.json"),
        ),
        (
            "gemma-4-E2B-it",
            include_str!("../../configs/gemma-4-E2B-it/config.json"),
        ),
        (
            "gemma-4-E4B-it",
            include_str!("../../configs/gemma-4-E4B-it/config.json"),
        ),
    ];

    /// The real config of `name`.
    pub fn real(name: &str) -> Value {
        let (_, text) = REAL
            .iter()
            .find(|(n, _)| *n == name)
            .expect("a known config");
        serde_json::from_str(text).expect("config parses as JSON")
    }

    /// Set the number at `path` (object keys; a list index as a number) in `raw`.
    pub fn set(raw: &mut Value, path: &[&str], v: Value) {
        let mut at = raw;
        for (i, k) in path.iter().enumerate() {
            let next = match k.parse::<usize>() {
                Ok(idx) => at.get_mut(idx),
                Err(_) if i + 1 == path.len() => {
                    at.as_object_mut()
                        .expect("an object")
                        .insert(k.to_string(), Value::Null);
                    at.get_mut(*k)
                }
                Err(_) => at.get_mut(*k),
            };
            at = next.unwrap_or_else(|| panic!("no `{k}` in the config"));
        }
        *at = v;
    }

    /// `raw` with the number at `path` set one past its bound (and to 2^40) is refused, and
    /// the error names the key and the bound.
    pub fn refuses_past_bound(raw: &Value, path: &[&str]) {
        let key = path
            .iter()
            .rev()
            .find(|k| k.parse::<usize>().is_err())
            .unwrap();
        let b = path
            .iter()
            .rev()
            .find_map(|k| bound_of(k))
            .unwrap_or_else(|| panic!("`{key}` has no bound"));
        for v in [b + 1, 1 << 40] {
            let mut cfg = raw.clone();
            set(&mut cfg, path, Value::from(v));
            let e = match crate::arch::parse_config(&cfg, &ParseOptions::default()) {
                Ok(_) => panic!("{path:?} = {v} was accepted"),
                Err(e) => format!("{e:#}"),
            };
            assert!(
                e.contains(key) && e.contains(&format!("= {v} ")),
                "{path:?} = {v}: {e}"
            );
            assert!(e.contains(&format!("at most {b}")), "{path:?} = {v}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bounds_test::REAL;
    use super::*;

    /// Integer keys of the real configs that are no size or count: token ids, labels, RoPE
    /// bases and scaling numbers (read as floats and checked by the RoPE code).
    const NOT_SIZES: &[&str] = &[
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "image_token_id",
        "video_token_id",
        "audio_token_id",
        "boi_token_id",
        "eoi_token_id",
        "boa_token_id",
        "eoa_token_id",
        "eoa_token_index",
        "vision_start_token_id",
        "vision_end_token_id",
        "chunk_size_feed_forward",
        "rope_theta",
        "compress_rope_theta",
        "factor",
        "beta_fast",
        "beta_slow",
        "LABEL_0",
        "LABEL_1",
    ];

    /// Every integer of every real text config is either bounded, with at least a 10× margin,
    /// or known not to be a size: a new config with a new count fails here until it is bounded.
    #[test]
    fn real_configs_are_far_inside_the_bounds() {
        fn walk(v: &Value, key: &str, bound: Option<u64>, at: &str, bad: &mut Vec<String>) {
            match v {
                Value::Number(n) => match (n.as_u64(), bound) {
                    (Some(u), Some(b)) if u.saturating_mul(10) > b => {
                        bad.push(format!("{at}: {key} = {u} is within 10× of the bound {b}"))
                    }
                    (Some(_), Some(_)) => {}
                    (Some(_), None) if NOT_SIZES.contains(&key) => {}
                    (Some(u), None) => bad.push(format!("{at}: {key} = {u} has no bound")),
                    (None, _) => {}
                },
                Value::Array(a) => a.iter().for_each(|x| walk(x, key, bound, at, bad)),
                Value::Object(m) => {
                    for (k, x) in m {
                        walk(x, k, bound_of(k).or(bound), at, bad);
                    }
                }
                _ => {}
            }
        }
        let mut bad = vec![];
        for (name, text) in REAL {
            let raw: Value = serde_json::from_str(text).unwrap();
            let t = TextConfig::from_raw(&raw, &ParseOptions::default())
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            walk(&Value::Object(t.value), "", None, name, &mut bad);
            crate::arch::parse_config(&raw, &ParseOptions::default())
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
        assert_eq!(REAL.len(), 10);
    }

    #[test]
    fn bounds_name_the_nested_key_and_apply_inside_lists_and_objects() {
        let cfg = |v: Value| v.as_object().unwrap().clone();
        let ok = cfg(serde_json::json!({"head_dim": 512, "rope_theta": 1e30,
            "compress_rates": {"csa": 4}, "mlp_only_layers": [0, 3]}));
        check_bounds(&ok, "").unwrap();
        for (v, want) in [
            (serde_json::json!({"head_dim": 1u64 << 40}), "key `text_config.head_dim` = 1099511627776 is larger than any real model's: llmarch accepts at most 16384"),
            (serde_json::json!({"head_dim": 1e300}), "key `text_config.head_dim` = 1e+300 is larger"),
            (serde_json::json!({"compress_rates": {"csa": 100000}}), "key `text_config.compress_rates.csa` = 100000"),
            (serde_json::json!({"rope_parameters": {"full": {"original_max_position_embeddings": 1u64 << 30}}}),
             "key `text_config.rope_parameters.full.original_max_position_embeddings`"),
            (serde_json::json!({"num_attention_heads_per_layer": [8, 9000]}), "key `text_config.num_attention_heads_per_layer[1]` = 9000"),
        ] {
            let e = check_bounds(&cfg(v.clone()), "text_config.").unwrap_err().to_string();
            assert!(e.starts_with(want), "{v}: {e}");
        }
    }
}
