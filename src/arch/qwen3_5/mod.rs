//! Qwen3.5 / Qwen3.6 (text part), dense and MoE: `Qwen3_5ForCausalLM`,
//! `Qwen3_5MoeForCausalLM`, and the text model inside `Qwen3_5ForConditionalGeneration` /
//! `Qwen3_5MoeForConditionalGeneration`. Reference: transformers 5.23.0
//! `models/qwen3_5/{configuration,modeling}_qwen3_5.py` and
//! `models/qwen3_5_moe/{configuration,modeling}_qwen3_5_moe.py`; cache classes in
//! `cache_utils.py` (`LinearAttentionLayer`, `DynamicLayer`).
//!
//! Notable:
//! - a hybrid of Gated DeltaNet linear attention and gated full attention, from `layer_types`
//!   (`linear_attention` / `full_attention`) or, when that is absent, `full_attention_interval`
//!   (default 4: layer i is full iff (i + 1) % 4 == 0, so 3 linear : 1 full). When both are
//!   given the reference uses `layer_types` and ignores the interval.
//! - Gated DeltaNet layers: `in_proj_qkv` → a depthwise causal conv (`linear_conv_kernel_dim`,
//!   SiLU) over q, k, v → the gated delta rule with `linear_num_key_heads` q/k heads shared by
//!   `linear_num_value_heads` value heads, then an RMSNorm gated by SiLU(`in_proj_z`). In the
//!   table: `q_heads` = value heads, `kv_heads` = key heads, `head_dim` = key head dim,
//!   `v_head_dim` = value head dim.
//! - full-attention layers: `q_proj` is twice as wide (query + a per-element output gate,
//!   applied as `sigmoid(gate)` before `o_proj`), per-head QK RMSNorm, partial RoPE (0.25 of
//!   256 = 64 dims). The reference always builds the gate: it never reads `attn_output_gate`
//!   or `output_gate_type`. We accept `attn_output_gate: true` and `output_gate_type: "swish"`
//!   (the 27B hub value: it matches the SiLU gate of the DeltaNet norm; the attention gate is
//!   sigmoid whatever it says) and reject other values, whose meaning the reference does not
//!   define.
//! - mRoPE (`mrope_section`, `mrope_interleaved`): the reference expands text positions to three
//!   identical rows (T = H = W), so the interleaved recomposition picks every frequency from
//!   equal rows and the result is plain 1-D RoPE over the rotated dims. The reference also
//!   interleaves whatever `mrope_interleaved` says. Only images/video would differ.
//! - MoE (35B-A3B): every layer is sparse: softmax router, top-k renormalised (hard-coded, so
//!   `norm_topk_prob: false` is rejected), routed experts as packed `gate_up_proj` /
//!   `down_proj`, plus one shared expert scaled by `sigmoid(shared_expert_gate(x))`.
//!   `decoder_sparse_step` / `mlp_only_layers` are not read by the reference; values other than
//!   "every layer sparse" are rejected.
//! - MTP (`mtp_num_hidden_layers`, `mtp_use_dedicated_embeddings`): not built by the reference
//!   (`mtp.*` weights are ignored on load), so listed in the notes and not counted.
//!
//! Cache, per linear layer (what the reference keeps, and what llmarch models):
//! - conv state: `conv_dim = 2 × key_heads × key_dim + value_heads × value_dim` channels in the
//!   model dtype. The reference keeps `kernel` columns (`[batch, conv_dim, kernel]`), but the
//!   causal conv only ever reads the last `kernel − 1` earlier inputs beside the new token (its
//!   oldest column is overwritten unread, as in llama.cpp and vLLM, which keep `kernel − 1`), so
//!   llmarch models `kernel − 1` columns: `conv_dim` elements fewer per layer than the reference.
//! - recurrent state: `[batch, value_heads, key_dim, value_dim]` in float32. The reference's
//!   delta-rule kernels compute the state in float32 and the cache stores it as returned, so it
//!   stays float32 even for a bf16 model; `mamba_ssm_dtype` is never read (other values only
//!   warn).
//!
//! Full layers keep K and V `[batch, kv_heads, tokens, head_dim]` each (`DynamicLayer`).

pub mod model;

use super::config::{
    check_heads, check_len, default_count, positive, rope_frequencies, rope_from_params,
    RopeFrequencies, TextConfig,
};
use super::{ArchSpec, Attention, CachePart, Family, Ffn, LayerSpec, ParamCounts, Retention};
use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use serde_json::{Map, Value};

pub const FAMILY: Family = Family {
    name: "qwen3_5",
    model_types: &["qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "qwen3_5_moe"],
    architectures: &[
        "Qwen3_5ForCausalLM",
        "Qwen3_5ForConditionalGeneration",
        "Qwen3_5MoeForCausalLM",
        "Qwen3_5MoeForConditionalGeneration",
    ],
    summary: "Gated DeltaNet linear attention (fixed-size state) in a 3:1 hybrid with gated full attention; dense or MoE + shared expert",
    parse: |text| Ok(parse(text)?.0),
    build: Some(|raw, opts, vb, lm_head| {
        Ok(Box::new(model::Qwen3_5Model::from_config(
            raw, opts, vb, lm_head,
        )?))
    }),
    rename: None,
};

/// `Qwen3_5TextConfig` / `Qwen3_5MoeTextConfig`. Fields whose default differs between the two
/// are `Option`s, resolved by [`Variant`].
#[derive(Debug, Deserialize)]
struct Qwen3_5TextConfig {
    #[serde(default = "default_count::<248_320>")]
    vocab_size: usize,
    hidden_size: Option<usize>,
    /// Dense only (default 12288); the MoE config has no such field.
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    #[serde(default = "default_count::<16>")]
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    #[serde(default = "default_activation")]
    hidden_act: String,
    #[serde(default = "default_count::<32_768>")]
    max_position_embeddings: usize,
    #[serde(default = "default_rms_eps")]
    #[allow(dead_code)]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    rope_parameters: Option<Map<String, Value>>,
    /// Legacy name; the reference prefers it over `rope_parameters` when non-empty.
    rope_scaling: Option<Map<String, Value>>,
    /// Legacy top-level RoPE fields, moved into `rope_parameters` when missing there.
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default = "default_count::<256>")]
    head_dim: usize,
    #[serde(default = "default_count::<4>")]
    linear_conv_kernel_dim: usize,
    #[serde(default = "default_count::<128>")]
    linear_key_head_dim: usize,
    #[serde(default = "default_count::<128>")]
    linear_value_head_dim: usize,
    #[serde(default = "default_count::<16>")]
    linear_num_key_heads: usize,
    #[serde(default = "default_count::<32>")]
    linear_num_value_heads: usize,
    layer_types: Option<Vec<String>>,
    /// Only read when `layer_types` is absent.
    full_attention_interval: Option<usize>,
    /// Not read by the reference (it always builds the gate).
    attn_output_gate: Option<bool>,
    /// Not read by the reference.
    output_gate_type: Option<String>,
    /// Not read by the reference; its recurrent state is float32 anyway.
    mamba_ssm_dtype: Option<String>,
    /// MTP: not built by the reference.
    mtp_num_hidden_layers: Option<usize>,
    mtp_use_dedicated_embeddings: Option<bool>,
    // MoE.
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    /// Not read by the reference, which always renormalises the top-k weights.
    norm_topk_prob: Option<bool>,
    /// Legacy Qwen-MoE keys the reference does not read: every layer is sparse.
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

fn default_activation() -> String {
    "silu".into()
}
fn default_rms_eps() -> f64 {
    1e-6
}

/// Keys Qwen3.5 text configs carry that do not change the text model.
const HARMLESS: &[&str] = &[];

const LINEAR: &str = "linear_attention";
/// Sanity bound on `num_hidden_layers`.
const MAX_LAYERS: usize = 1 << 16;
const FULL: &str = "full_attention";

/// Dense (`Qwen3_5TextConfig`) or MoE (`Qwen3_5MoeTextConfig`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    Dense,
    Moe,
}

impl Variant {
    fn of_model_type(t: &str) -> Option<Variant> {
        match t {
            "qwen3_5_text" | "qwen3_5" => Some(Variant::Dense),
            "qwen3_5_moe_text" | "qwen3_5_moe" => Some(Variant::Moe),
            _ => None,
        }
    }

    fn of_architecture(a: &str) -> Option<Variant> {
        match a {
            "Qwen3_5ForCausalLM" | "Qwen3_5ForConditionalGeneration" => Some(Variant::Dense),
            "Qwen3_5MoeForCausalLM" | "Qwen3_5MoeForConditionalGeneration" => Some(Variant::Moe),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Variant::Dense => "dense",
            Variant::Moe => "MoE",
        }
    }

    fn hf_class(self) -> &'static str {
        match self {
            Variant::Dense => "Qwen3_5ForCausalLM",
            Variant::Moe => "Qwen3_5MoeForCausalLM",
        }
    }
}

/// Which variant the file describes; the text `model_type`, the wrapper's and `architectures[0]`
/// must agree.
fn variant(text: &TextConfig) -> Result<Variant> {
    let from_type = Variant::of_model_type(&text.model_type);
    if !text.model_type.is_empty() && from_type.is_none() {
        bail!(
            "key `{}model_type` = `{}` is not a Qwen3.5 text model type (qwen3_5_text, qwen3_5_moe_text)",
            text.key_prefix(),
            text.model_type
        );
    }
    if text.wrapper.is_none() && matches!(text.model_type.as_str(), "qwen3_5" | "qwen3_5_moe") {
        bail!(
            "model_type `{}` is the multimodal wrapper, but the file has no `text_config`",
            text.model_type
        );
    }
    let from_arch = text
        .architecture
        .as_deref()
        .and_then(Variant::of_architecture);
    let from_wrapper = text
        .wrapper_model_type
        .as_deref()
        .and_then(Variant::of_model_type);
    let v = from_type.or(from_arch).ok_or_else(|| {
        anyhow!("cannot tell the Qwen3.5 variant: no model_type and an unknown architecture")
    })?;
    if let Some(a) = from_arch.filter(|&a| a != v) {
        bail!(
            "key `architectures`: `{}` is the {} variant but model_type `{}` is the {} one",
            text.architecture.as_deref().unwrap_or("?"),
            a.name(),
            text.model_type,
            v.name()
        );
    }
    if let Some(w) = from_wrapper.filter(|&w| w != v) {
        bail!(
            "key `model_type` = `{}` is the {} wrapper but `text_config.model_type` = `{}` is the {} text model",
            text.wrapper_model_type.as_deref().unwrap_or("?"),
            w.name(),
            text.model_type,
            v.name()
        );
    }
    Ok(v)
}

/// Checked products and sums for parameter and cache sizes, so absurd configs give an error
/// instead of an overflow.
fn prod(factors: &[usize]) -> Result<u64> {
    factors
        .iter()
        .try_fold(1u64, |acc, &f| acc.checked_mul(f as u64))
        .ok_or_else(|| anyhow!("the config's sizes overflow a 64-bit count ({factors:?})"))
}

fn sum(terms: &[u64]) -> Result<u64> {
    terms
        .iter()
        .try_fold(0u64, |acc, &t| acc.checked_add(t))
        .ok_or_else(|| anyhow!("the config's sizes overflow a 64-bit parameter count"))
}

fn usize_of(n: u64) -> Result<usize> {
    usize::try_from(n).map_err(|_| anyhow!("the config's sizes overflow this platform's usize"))
}

/// The MoE block's sizes.
#[derive(Debug, Clone, Copy)]
struct Moe {
    experts: usize,
    top_k: usize,
    width: usize,
    shared_width: usize,
}

/// The single RoPE block the reference builds its rotary embedding from: `rope_scaling` if
/// non-empty, else `rope_parameters`, with `rope_theta` (default 10000) and
/// `partial_rotary_factor` (default 0.25) filled from the top level when missing.
fn rope_block(
    c: &Qwen3_5TextConfig,
    p: &str,
    warnings: &mut Vec<String>,
) -> Result<(Map<String, Value>, &'static str)> {
    let (mut block, key) = match &c.rope_scaling {
        Some(s) if !s.is_empty() => (s.clone(), "rope_scaling"),
        _ => (
            c.rope_parameters.clone().unwrap_or_default(),
            "rope_parameters",
        ),
    };
    for nested in [LINEAR, FULL] {
        if block.contains_key(nested) {
            bail!(
                "key `{p}{key}.{nested}`: per-layer-type RoPE blocks are not supported; the \
                 reference reads one flat block for every full-attention layer"
            );
        }
    }
    if !block.contains_key("rope_theta") {
        block.insert(
            "rope_theta".into(),
            serde_json::json!(c.rope_theta.unwrap_or(10_000.0)),
        );
    }
    match block.get("partial_rotary_factor") {
        None => {
            block.insert(
                "partial_rotary_factor".into(),
                serde_json::json!(c.partial_rotary_factor.unwrap_or(0.25)),
            );
        }
        Some(v) => {
            if let (Some(inner), Some(top)) = (v.as_f64(), c.partial_rotary_factor) {
                if inner != top {
                    warnings.push(format!(
                        "`{p}partial_rotary_factor` = {top} differs from `{p}{key}.partial_rotary_factor` = {inner}; \
                         the reference uses the latter"
                    ));
                }
            }
        }
    }
    Ok((block, key))
}

/// Checks the mRoPE fields; returns the sections (default `[11, 11, 10]`).
fn mrope_sections(block: &Map<String, Value>, what: &str) -> Result<[usize; 3]> {
    let sections = match block.get("mrope_section") {
        None | Some(Value::Null) => [11, 11, 10],
        Some(Value::Array(list)) => {
            let nums: Option<Vec<usize>> = list
                .iter()
                .map(|v| v.as_u64().map(|n| n as usize))
                .collect();
            match nums.as_deref() {
                Some(&[t, h, w]) => [t, h, w],
                _ => bail!(
                    "key `{what}.mrope_section` must be 3 non-negative integers (temporal, height, width)"
                ),
            }
        }
        Some(_) => bail!("key `{what}.mrope_section` is not a list"),
    };
    match block.get("mrope_interleaved") {
        None | Some(Value::Null) | Some(Value::Bool(_)) => {}
        Some(_) => bail!("key `{what}.mrope_interleaved` is not a boolean"),
    }
    Ok(sections)
}

/// What the network needs beyond the per-layer table.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub rms_norm_eps: f64,
    pub attention_bias: bool,
    pub conv_kernel: usize,
    /// The full-attention layers' RoPE (text positions: plain 1-D RoPE over the leading dims).
    pub rope: RopeFrequencies,
}

/// Validate and read the [`RuntimeConfig`] of a Qwen3.5 config (part of [`parse`]).
fn runtime_config_of(c: &Qwen3_5TextConfig, text: &TextConfig) -> Result<RuntimeConfig> {
    let p = text.key_prefix();
    let (block, key) = rope_block(c, p, &mut vec![])?;
    let block = Value::Object(block);
    if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps >= 0.0) {
        bail!(
            "key `{p}rms_norm_eps` = {} must be a number ≥ 0",
            c.rms_norm_eps
        );
    }
    Ok(RuntimeConfig {
        rms_norm_eps: c.rms_norm_eps,
        attention_bias: c.attention_bias,
        conv_kernel: c.linear_conv_kernel_dim,
        rope: rope_frequencies(
            &block,
            block.get("truncate").cloned(),
            c.head_dim,
            c.max_position_embeddings,
            &format!("{p}{key}"),
        )?,
    })
}

/// Read a Qwen3.5 text config once into its [`ArchSpec`] and the [`RuntimeConfig`] its network
/// needs, both validated: every command (`inspect`, `kv-budget`, `run`) gives the same verdict.
pub fn parse(text: &TextConfig) -> Result<(ArchSpec, RuntimeConfig)> {
    let variant = variant(text)?;
    let c: Qwen3_5TextConfig = text.parse()?;
    let spec = arch_spec(text, variant, &c)?;
    let runtime = runtime_config_of(&c, text)?;
    Ok((spec, runtime))
}

fn arch_spec(text: &TextConfig, variant: Variant, c: &Qwen3_5TextConfig) -> Result<ArchSpec> {
    let p = text.key_prefix();
    let key = |k: &str| format!("{p}{k}");
    let mut warnings = text.check_unknown_keys(&c.rest, HARMLESS)?;

    let (dense_hidden, dense_layers, dense_kv) = match variant {
        Variant::Dense => (4096, 32, 4),
        Variant::Moe => (2048, 40, 2),
    };
    let n = positive(
        &key("num_hidden_layers"),
        c.num_hidden_layers.unwrap_or(dense_layers),
    )?;
    // Per-layer tables are built eagerly: refuse counts no model has rather than abort on an
    // allocation of that size.
    if n > MAX_LAYERS {
        bail!(
            "key `{}` = {n} is implausibly large (more than {MAX_LAYERS} layers)",
            key("num_hidden_layers")
        );
    }
    let hidden = positive(&key("hidden_size"), c.hidden_size.unwrap_or(dense_hidden))?;
    let vocab = positive(&key("vocab_size"), c.vocab_size)?;
    let kv_heads = c.num_key_value_heads.unwrap_or(dense_kv);

    // 1. Keys the reference ignores: accept what it computes, reject the rest.
    if c.hidden_act != "silu" {
        bail!(
            "key `{}` = `{}` is not supported: Qwen3.5 uses silu (in the MLPs and the DeltaNet conv)",
            key("hidden_act"),
            c.hidden_act
        );
    }
    if c.attn_output_gate == Some(false) {
        bail!(
            "key `{}` = false is not supported: the reference always builds the gated attention \
             (q_proj twice as wide, sigmoid output gate) and would not load an ungated checkpoint",
            key("attn_output_gate")
        );
    }
    if let Some(t) = c.output_gate_type.as_deref() {
        if t != "swish" {
            bail!(
                "key `{}` = `{t}` is not supported: the reference ignores this key and always \
                 computes a sigmoid attention output gate and a swish (SiLU) gated norm in the \
                 DeltaNet layers, which is what `swish` (the Qwen3.6 hub value) describes",
                key("output_gate_type")
            );
        }
    }
    if let Some(d) = c.mamba_ssm_dtype.as_deref() {
        if d != "float32" {
            warnings.push(format!(
                "`{}` = `{d}` is ignored: the reference keeps the DeltaNet recurrent state in float32",
                key("mamba_ssm_dtype")
            ));
        }
    }

    // 2. Layer types: the explicit list, else every `full_attention_interval`-th layer is full.
    let types: Vec<String> = match &c.layer_types {
        Some(list) => {
            check_len(&key("layer_types"), list, n)?;
            list.clone()
        }
        None => {
            let interval = c.full_attention_interval.unwrap_or(4);
            if interval == 0 {
                bail!("key `{}` must be positive", key("full_attention_interval"));
            }
            (0..n)
                .map(|i| {
                    if (i + 1) % interval != 0 {
                        LINEAR
                    } else {
                        FULL
                    }
                    .to_string()
                })
                .collect()
        }
    };
    for (i, t) in types.iter().enumerate() {
        if t != LINEAR && t != FULL {
            bail!(
                "key `{}[{i}]` = `{t}` (layer {i}): Qwen3.5 layers are `{LINEAR}` or `{FULL}`",
                key("layer_types")
            );
        }
    }
    if let (Some(_), Some(interval)) = (&c.layer_types, c.full_attention_interval) {
        let agrees = interval > 0
            && types
                .iter()
                .enumerate()
                .all(|(i, t)| (t == FULL) == ((i + 1) % interval == 0));
        if !agrees {
            warnings.push(format!(
                "`{}` = {interval} disagrees with `{}`; the reference uses `layer_types`",
                key("full_attention_interval"),
                key("layer_types")
            ));
        }
    }
    let n_full = types.iter().filter(|t| *t == FULL).count();
    let n_linear = n - n_full;

    // 3. Gated DeltaNet geometry.
    let (nk, nv) = (
        positive(&key("linear_num_key_heads"), c.linear_num_key_heads)?,
        positive(&key("linear_num_value_heads"), c.linear_num_value_heads)?,
    );
    let (dk, dv) = (
        positive(&key("linear_key_head_dim"), c.linear_key_head_dim)?,
        positive(&key("linear_value_head_dim"), c.linear_value_head_dim)?,
    );
    let kernel = positive(&key("linear_conv_kernel_dim"), c.linear_conv_kernel_dim)?;
    if n_linear > 0 && nv % nk != 0 {
        bail!(
            "key `{}` = {nv} is not a multiple of `{}` = {nk}: each key head serves a whole group of value heads",
            key("linear_num_value_heads"),
            key("linear_num_key_heads")
        );
    }
    let key_dim = usize_of(prod(&[nk, dk])?)?;
    let value_dim = usize_of(prod(&[nv, dv])?)?;
    let conv_dim = usize_of(sum(&[key_dim as u64, key_dim as u64, value_dim as u64])?)?;
    let recurrent = usize_of(prod(&[nv, dk, dv])?)?;

    // 4. Full-attention geometry and RoPE.
    let head_dim = positive(&key("head_dim"), c.head_dim)?;
    let q_heads = c.num_attention_heads;
    let (rope_map, rope_key) = rope_block(c, p, &mut warnings)?;
    let rope_what = key(rope_key);
    let rope = rope_from_params(&Value::Object(rope_map.clone()), head_dim, &rope_what)?;
    let sections = mrope_sections(&rope_map, &rope_what)?;
    let section_sum = sum(&sections.map(|x| x as u64))?.saturating_mul(2);
    if n_full > 0 && section_sum != rope.rotary_dim as u64 {
        warnings.push(format!(
            "`{rope_what}.mrope_section` {sections:?} covers {} dims but {} are rotated; \
             text-only positions are unaffected",
            section_sum, rope.rotary_dim
        ));
    }

    // 5. Feed-forward.
    let moe = match variant {
        Variant::Dense => {
            for (k, set) in [
                ("num_experts", c.num_experts.is_some()),
                ("num_experts_per_tok", c.num_experts_per_tok.is_some()),
                ("moe_intermediate_size", c.moe_intermediate_size.is_some()),
                (
                    "shared_expert_intermediate_size",
                    c.shared_expert_intermediate_size.is_some(),
                ),
                ("norm_topk_prob", c.norm_topk_prob.is_some()),
                ("decoder_sparse_step", c.decoder_sparse_step.is_some()),
                ("mlp_only_layers", c.mlp_only_layers.is_some()),
            ] {
                if set {
                    bail!(
                        "key `{}` is an MoE setting, but model_type `{}` is the dense Qwen3.5 \
                         (use qwen3_5_moe_text for the MoE model)",
                        key(k),
                        text.model_type
                    );
                }
            }
            None
        }
        Variant::Moe => {
            let experts = positive(&key("num_experts"), c.num_experts.unwrap_or(256))?;
            let top_k = c.num_experts_per_tok.unwrap_or(8);
            if top_k == 0 || top_k > experts {
                bail!(
                    "key `{}` = {top_k} must be between 1 and num_experts ({experts})",
                    key("num_experts_per_tok")
                );
            }
            let width = positive(
                &key("moe_intermediate_size"),
                c.moe_intermediate_size.unwrap_or(512),
            )?;
            let shared_width = c.shared_expert_intermediate_size.unwrap_or(512);
            if c.norm_topk_prob == Some(false) {
                bail!(
                    "key `{}` = false is not supported: the reference always renormalises the top-k routing weights",
                    key("norm_topk_prob")
                );
            }
            if let Some(step) = c.decoder_sparse_step.filter(|&s| s != 1) {
                bail!(
                    "key `{}` = {step} is not supported: the reference makes every layer sparse (step 1)",
                    key("decoder_sparse_step")
                );
            }
            if let Some(first) = c.mlp_only_layers.as_ref().and_then(|l| l.first()) {
                bail!(
                    "key `{}` lists layer {first}: the reference has no dense-MLP layers in the MoE model",
                    key("mlp_only_layers")
                );
            }
            if let Some(w) = c.intermediate_size {
                warnings.push(format!(
                    "`{}` = {w} is ignored: every layer of the MoE model is sparse",
                    key("intermediate_size")
                ));
            }
            Some(Moe {
                experts,
                top_k,
                width,
                shared_width,
            })
        }
    };
    let dense_width = match variant {
        Variant::Dense => positive(
            &key("intermediate_size"),
            c.intermediate_size.unwrap_or(12_288),
        )?,
        Variant::Moe => 0,
    };

    // 6. Parameters, tensor by tensor as `Qwen3_5(Moe)ForCausalLM` builds them.
    let h = hidden;
    let bias = |n: usize| if c.attention_bias { n as u64 } else { 0 };
    let mut params = ParamCounts {
        embedding: prod(&[vocab, h])?,
        lm_head: if c.tie_word_embeddings {
            0
        } else {
            prod(&[vocab, h])?
        },
        ..Default::default()
    };
    // model.norm
    let mut other = h as u64;
    // Per layer kind, excluding routed experts.
    let linear_params = sum(&[
        prod(&[h, conv_dim])?,      // in_proj_qkv
        prod(&[h, value_dim])?,     // in_proj_z
        prod(&[h, nv, 2])?,         // in_proj_b, in_proj_a
        prod(&[conv_dim, kernel])?, // conv1d (depthwise, no bias)
        prod(&[nv, 2])?,            // dt_bias, A_log
        dv as u64,                  // norm (gated RMSNorm over one value head)
        prod(&[value_dim, h])?,     // out_proj
    ])?;
    let q_width = usize_of(prod(&[q_heads, head_dim])?)?;
    let kv_width = usize_of(prod(&[kv_heads, head_dim])?)?;
    let full_params = sum(&[
        prod(&[h, q_width, 2])?, // q_proj: query + gate
        bias(2 * q_width),
        prod(&[h, kv_width, 2])?, // k_proj, v_proj
        bias(2 * kv_width),
        prod(&[q_width, h])?, // o_proj
        bias(h),
        prod(&[head_dim, 2])?, // q_norm, k_norm
    ])?;
    let ffn_params = match moe {
        None => prod(&[3, h, dense_width])?,
        Some(m) => sum(&[
            prod(&[m.experts, h])?,         // router (mlp.gate.weight)
            prod(&[3, h, m.shared_width])?, // shared expert gate/up/down
            h as u64,                       // shared_expert_gate
        ])?,
    };
    let routed_per_layer = match moe {
        None => 0,
        Some(m) => prod(&[m.experts, 3, m.width, h])?, // gate_up_proj + down_proj
    };
    let norms = prod(&[2, h])?; // input_layernorm, post_attention_layernorm
    let ffn = match moe {
        None => Ffn::Dense { width: dense_width },
        Some(m) => Ffn::Moe {
            experts: m.experts,
            top_k: m.top_k,
            width: m.width,
            shared_width: (m.shared_width > 0).then_some(m.shared_width),
            dense_width: None,
            routing: "softmax".into(),
        },
    };

    let mut layers = Vec::with_capacity(n);
    for (i, ty) in types.iter().enumerate() {
        let layer = if ty == LINEAR {
            other = sum(&[other, linear_params])?;
            // q_heads/kv_heads: the DeltaNet's value heads / key heads (the q/k heads);
            // head_dim/v_head_dim: its key / value head dims. Naive per-token K+V for the
            // budget's waterfall is then value_heads × (key_dim + value_dim).
            LayerSpec {
                index: i,
                attention: Attention::Linear,
                q_heads: nv,
                kv_heads: nk,
                head_dim: dk,
                v_head_dim: dv,
                kv_source: None,
                k_eq_v: false,
                rope: None,
                ffn: ffn.clone(),
                ple_width: None,
                cache: vec![
                    CachePart::new(
                        "conv state",
                        conv_dim,
                        Retention::Fixed {
                            entries: kernel - 1,
                        },
                    ),
                    CachePart::new(
                        "recurrent state",
                        recurrent,
                        Retention::Fixed { entries: 1 },
                    )
                    .f32(),
                ],
                notes: vec![format!("conv {kernel}"), "gated norm silu".into()],
            }
        } else {
            check_heads(i, q_heads, kv_heads)?;
            other = sum(&[other, full_params])?;
            LayerSpec {
                index: i,
                attention: Attention::Full,
                q_heads,
                kv_heads,
                head_dim,
                v_head_dim: head_dim,
                kv_source: None,
                k_eq_v: false,
                rope: Some(rope.clone()),
                ffn: ffn.clone(),
                ple_width: None,
                cache: LayerSpec::kv_parts(
                    kv_heads,
                    head_dim,
                    head_dim,
                    false,
                    Retention::AllTokens,
                ),
                notes: vec!["out gate sigmoid".into(), "QK norm".into()],
            }
        };
        // Make sure the budget's per-token products stay in range.
        let dims = sum(&[layer.head_dim as u64, layer.v_head_dim as u64])?;
        prod(&[layer.q_heads, usize_of(dims)?])?;
        other = sum(&[other, ffn_params, norms])?;
        params.routed_experts = sum(&[params.routed_experts, routed_per_layer])?;
        layers.push(layer);
    }
    params.total = sum(&[
        params.embedding,
        params.lm_head,
        params.routed_experts,
        other,
    ])?;
    let (top_k, experts) = moe.map_or((0, 0), |m| (m.top_k, m.experts));

    // 7. Model-wide notes.
    let mut notes = vec![format!(
        "Gated DeltaNet : full attention = {n_linear} : {n_full}"
    )];
    if n_linear > 0 {
        notes.push(format!(
            "DeltaNet: {nk} q/k heads × {dk}, {nv} v heads × {dv}; state f32 {nv}×{dk}×{dv}, conv {kernel} over {conv_dim} channels"
        ));
    }
    if n_full > 0 {
        notes.push(format!(
            "mRoPE {sections:?}: text-only positions reduce it to 1-D RoPE on {} of {head_dim} dims",
            rope.rotary_dim
        ));
    }
    if let Some(m) = moe {
        notes.push(format!(
            "MoE: softmax top-{} of {}, renormalised; shared expert {} with sigmoid gate",
            m.top_k, m.experts, m.shared_width
        ));
    }
    if let Some(mtp) = c.mtp_num_hidden_layers.filter(|&m| m > 0) {
        let dedicated = if c.mtp_use_dedicated_embeddings == Some(true) {
            ", dedicated embeddings"
        } else {
            ""
        };
        notes.push(format!(
            "MTP layers: {mtp}{dedicated} (listed, not run; not built by the reference, not counted)"
        ));
    }
    if let Some(wrapper) = &text.wrapper {
        if let Some(Value::Bool(tie)) = wrapper.get("tie_word_embeddings") {
            if *tie != c.tie_word_embeddings {
                warnings.push(format!(
                    "`tie_word_embeddings` = {tie} but `{p}tie_word_embeddings` = {}; the text model \
                     follows the latter, the reference's multimodal class the former",
                    c.tie_word_embeddings
                ));
            }
        }
    }

    Ok(ArchSpec {
        family: FAMILY.name,
        model_type: text.model_type.clone(),
        hf_class: variant.hf_class().into(),
        architecture: text.architecture.clone(),
        hidden_size: hidden,
        vocab_size: vocab,
        max_context: c.max_position_embeddings,
        dtype: text.dtype(),
        tie_word_embeddings: c.tie_word_embeddings,
        params: params.finish(top_k, experts),
        layers,
        notes,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::budget::{layer_bytes, KvDtype};
    use crate::arch::config::ParseOptions;
    use crate::arch::{parse_config, PartDtype};

    const DENSE_27B: &str = include_str!("../../../configs/Qwen3.6-27B/config.json");
    const MOE_35B: &str = include_str!("../../../configs/Qwen3.6-35B-A3B/config.json");
    const PARAMS: &str = include_str!("../../../tests/fixtures/reference_params.json");
    const CACHE: &str = include_str!("../../../tests/fixtures/reference_cache.json");
    const TINY: &[(&str, &str)] = &[
        (
            "qwen3_5",
            include_str!("../../../tests/fixtures/tiny/qwen3_5/config.json"),
        ),
        (
            "qwen3_5-moe",
            include_str!("../../../tests/fixtures/tiny/qwen3_5-moe/config.json"),
        ),
        (
            "qwen3_5-wrapper",
            include_str!("../../../tests/fixtures/tiny/qwen3_5-wrapper/config.json"),
        ),
    ];

    fn json(s: &str) -> Value {
        serde_json::from_str(s).expect("valid JSON")
    }

    fn spec(v: &Value) -> Result<ArchSpec> {
        parse_config(v, &ParseOptions::default())
    }

    /// Apply `f` to the `text_config` of a wrapper file.
    fn edit(src: &str, f: impl FnOnce(&mut Map<String, Value>)) -> Value {
        let mut v = json(src);
        f(v["text_config"].as_object_mut().expect("text_config"));
        v
    }

    fn err(v: &Value) -> String {
        format!("{:#}", spec(v).expect_err("must fail"))
    }

    fn reference(folder: &str) -> Value {
        json(PARAMS)[folder].clone()
    }

    fn count(s: &ArchSpec, a: Attention) -> usize {
        s.layers.iter().filter(|l| l.attention == a).count()
    }

    #[test]
    fn qwen36_27b_layers() {
        let s = spec(&json(DENSE_27B)).unwrap();
        assert_eq!(s.hf_class, "Qwen3_5ForCausalLM");
        assert_eq!(s.layers.len(), 64);
        assert_eq!(count(&s, Attention::Full), 16);
        assert_eq!(count(&s, Attention::Linear), 48);
        for l in &s.layers {
            assert_eq!(
                l.attention == Attention::Full,
                l.index % 4 == 3,
                "layer {}",
                l.index
            );
            assert_eq!(l.ffn, Ffn::Dense { width: 17408 });
        }
        let lin = &s.layers[0];
        assert_eq!(
            (lin.q_heads, lin.kv_heads, lin.head_dim, lin.v_head_dim),
            (48, 16, 128, 128)
        );
        assert!(lin.rope.is_none());
        // conv_dim = 2 × 16 × 128 + 48 × 128 = 10240; kernel 4 → 3 columns kept.
        assert_eq!(lin.cache[0].elems_per_entry, 10240);
        assert_eq!(lin.cache[0].retention, Retention::Fixed { entries: 3 });
        assert_eq!(lin.cache[0].dtype, PartDtype::Kv);
        assert_eq!(lin.cache[1].elems_per_entry, 48 * 128 * 128);
        assert_eq!(lin.cache[1].retention, Retention::Fixed { entries: 1 });
        assert_eq!(lin.cache[1].dtype, PartDtype::F32);
        let full = &s.layers[3];
        assert_eq!(
            (full.q_heads, full.kv_heads, full.head_dim, full.v_head_dim),
            (24, 4, 256, 256)
        );
        let rope = full.rope.as_ref().unwrap();
        assert_eq!(
            (rope.kind.as_str(), rope.theta, rope.rotary_dim),
            ("default", 1e7, 64)
        );
        assert_eq!(full.cache.len(), 2);
        assert!(full
            .cache
            .iter()
            .all(|p| p.elems_per_entry == 4 * 256 && p.retention == Retention::AllTokens));
        assert!(s.notes.iter().any(|n| n.starts_with("MTP layers: 1")));
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    #[test]
    fn qwen36_27b_params_match_reference() {
        let s = spec(&json(DENSE_27B)).unwrap();
        let r = reference("Qwen3.6-27B");
        assert_eq!(s.params.total, r["total"].as_u64().unwrap());
        assert_eq!(s.params.total, 26_895_998_464);
        assert_eq!(s.params.embedding, r["embedding"].as_u64().unwrap());
        assert_eq!(s.params.lm_head, r["lm_head"].as_u64().unwrap());
        assert_eq!(
            s.params.routed_experts,
            r["routed_experts"].as_u64().unwrap()
        );
        assert_eq!(s.params.active, s.params.total);
    }

    #[test]
    fn qwen36_35b_a3b_layers_and_params() {
        let s = spec(&json(MOE_35B)).unwrap();
        assert_eq!(s.hf_class, "Qwen3_5MoeForCausalLM");
        assert_eq!(s.layers.len(), 40);
        assert_eq!(count(&s, Attention::Full), 10);
        assert_eq!(count(&s, Attention::Linear), 30);
        let lin = &s.layers[0];
        assert_eq!(
            (lin.q_heads, lin.kv_heads, lin.head_dim, lin.v_head_dim),
            (32, 16, 128, 128)
        );
        let full = &s.layers[39];
        assert_eq!(
            (
                full.attention.clone(),
                full.q_heads,
                full.kv_heads,
                full.head_dim
            ),
            (Attention::Full, 16, 2, 256)
        );
        assert_eq!(
            full.ffn,
            Ffn::Moe {
                experts: 256,
                top_k: 8,
                width: 512,
                shared_width: Some(512),
                dense_width: None,
                routing: "softmax".into()
            }
        );
        let r = reference("Qwen3.6-35B-A3B");
        assert_eq!(s.params.total, r["total"].as_u64().unwrap());
        assert_eq!(s.params.total, 34_660_610_688);
        assert_eq!(s.params.embedding, r["embedding"].as_u64().unwrap());
        assert_eq!(s.params.lm_head, r["lm_head"].as_u64().unwrap());
        assert_eq!(
            s.params.routed_experts,
            r["routed_experts"].as_u64().unwrap()
        );
        // total − routed × (1 − 8/256) = 3.455 B (README: ≈3.46 B).
        assert_eq!(s.params.active, 3_454_988_928);
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    #[test]
    fn interval_form_parses_like_the_list() {
        for src in [DENSE_27B, MOE_35B] {
            let listed = spec(&json(src)).unwrap();
            let by_interval = spec(&edit(src, |t| {
                t.remove("layer_types");
            }))
            .unwrap();
            assert_eq!(listed.layers, by_interval.layers);
            assert_eq!(listed.params, by_interval.params);
            // Neither key: the default interval is 4 too.
            let default = spec(&edit(src, |t| {
                t.remove("layer_types");
                t.remove("full_attention_interval");
            }))
            .unwrap();
            assert_eq!(listed.layers, default.layers);
        }
        let every_other = spec(&edit(DENSE_27B, |t| {
            t.remove("layer_types");
            t.insert("full_attention_interval".into(), 2.into());
        }))
        .unwrap();
        assert_eq!(count(&every_other, Attention::Full), 32);
        assert_eq!(every_other.layers[1].attention, Attention::Full);
        assert_eq!(every_other.layers[0].attention, Attention::Linear);
    }

    #[test]
    fn interval_disagreeing_with_the_list_warns() {
        let s = spec(&edit(DENSE_27B, |t| {
            t.insert("full_attention_interval".into(), 2.into());
        }))
        .unwrap();
        assert_eq!(count(&s, Attention::Full), 16);
        assert!(s
            .warnings
            .iter()
            .any(|w| w.contains("full_attention_interval")));
    }

    #[test]
    fn bad_layer_types() {
        let e = err(&edit(DENSE_27B, |t| {
            t["layer_types"][5] = "sliding_attention".into();
        }));
        assert!(
            e.contains("text_config.layer_types[5]") && e.contains("layer 5"),
            "{e}"
        );
        let e = err(&edit(DENSE_27B, |t| {
            t["layer_types"].as_array_mut().unwrap().pop();
        }));
        assert!(
            e.contains("text_config.layer_types") && e.contains("63 entries"),
            "{e}"
        );
        let e = err(&edit(DENSE_27B, |t| {
            t["layer_types"][2] = 7.into();
        }));
        assert!(e.contains("text_config.layer_types[2]"), "{e}");
        let e = err(&edit(DENSE_27B, |t| {
            t.remove("layer_types");
            t.insert("full_attention_interval".into(), 0.into());
        }));
        assert!(e.contains("text_config.full_attention_interval"), "{e}");
    }

    #[test]
    fn gate_keys() {
        let e = err(&edit(DENSE_27B, |t| {
            t.insert("output_gate_type".into(), "sigmoid".into());
        }));
        assert!(e.contains("text_config.output_gate_type"), "{e}");
        let e = err(&edit(MOE_35B, |t| {
            t.insert("attn_output_gate".into(), false.into());
        }));
        assert!(e.contains("text_config.attn_output_gate"), "{e}");
        // The 35B file has no output_gate_type: same architecture.
        assert!(json(MOE_35B)["text_config"]
            .get("output_gate_type")
            .is_none());
    }

    #[test]
    fn ssm_dtype_and_activation() {
        let s = spec(&edit(DENSE_27B, |t| {
            t.insert("mamba_ssm_dtype".into(), "bfloat16".into());
        }))
        .unwrap();
        assert!(s.warnings.iter().any(|w| w.contains("mamba_ssm_dtype")));
        assert_eq!(s.layers[0].cache[1].dtype, PartDtype::F32);
        let e = err(&edit(DENSE_27B, |t| {
            t.insert("hidden_act".into(), "gelu".into());
        }));
        assert!(e.contains("text_config.hidden_act"), "{e}");
    }

    #[test]
    fn head_validation() {
        let e = err(&edit(DENSE_27B, |t| {
            t.insert("linear_num_value_heads".into(), 40.into());
        }));
        assert!(e.contains("text_config.linear_num_value_heads"), "{e}");
        let e = err(&edit(DENSE_27B, |t| {
            t.insert("num_key_value_heads".into(), 5.into());
        }));
        assert!(e.contains("layer 3"), "{e}");
        let e = err(&edit(DENSE_27B, |t| {
            t.insert("linear_conv_kernel_dim".into(), 0.into());
        }));
        assert!(e.contains("text_config.linear_conv_kernel_dim"), "{e}");
        let e = err(&edit(DENSE_27B, |t| {
            t.insert("head_dim".into(), Value::Null);
        }));
        assert!(e.contains("text_config.head_dim"), "{e}");
        let e = err(&edit(DENSE_27B, |t| {
            t.remove("layer_types");
            t.insert("num_hidden_layers".into(), 1_000_000_000_000u64.into());
        }));
        assert!(e.contains("text_config.num_hidden_layers"), "{e}");
        let e = err(&edit(DENSE_27B, |t| {
            t.insert("hidden_size".into(), (u64::MAX / 2).into());
        }));
        assert!(
            e.contains("text_config.hidden_size") && e.contains("at most 262144"),
            "{e}"
        );
    }

    #[test]
    fn moe_validation() {
        let e = err(&edit(MOE_35B, |t| {
            t.insert("num_experts_per_tok".into(), 300.into());
        }));
        assert!(e.contains("text_config.num_experts_per_tok"), "{e}");
        let e = err(&edit(MOE_35B, |t| {
            t.insert("norm_topk_prob".into(), false.into());
        }));
        assert!(e.contains("text_config.norm_topk_prob"), "{e}");
        assert!(spec(&edit(MOE_35B, |t| {
            t.insert("norm_topk_prob".into(), true.into());
            t.insert("decoder_sparse_step".into(), 1.into());
            t.insert("mlp_only_layers".into(), serde_json::json!([]));
        }))
        .is_ok());
        let e = err(&edit(MOE_35B, |t| {
            t.insert("decoder_sparse_step".into(), 2.into());
        }));
        assert!(e.contains("text_config.decoder_sparse_step"), "{e}");
        let e = err(&edit(MOE_35B, |t| {
            t.insert("mlp_only_layers".into(), serde_json::json!([0, 5]));
        }));
        assert!(e.contains("text_config.mlp_only_layers"), "{e}");
        let e = err(&edit(DENSE_27B, |t| {
            t.insert("num_experts".into(), 64.into());
        }));
        assert!(e.contains("text_config.num_experts"), "{e}");
    }

    #[test]
    fn variant_and_key_checks() {
        let e = err(&edit(DENSE_27B, |t| {
            t.insert("some_new_gate".into(), true.into());
        }));
        assert!(e.contains("text_config.some_new_gate"), "{e}");
        let e = err(&edit(DENSE_27B, |t| {
            t.insert("model_type".into(), "qwen3_5_moe_text".into());
        }));
        assert!(
            e.contains("architectures") || e.contains("model_type"),
            "{e}"
        );
        let mut bare = json(DENSE_27B);
        bare.as_object_mut().unwrap().remove("text_config");
        let e = err(&bare);
        assert!(e.contains("text_config"), "{e}");
    }

    #[test]
    fn rope_checks() {
        let e = err(&edit(DENSE_27B, |t| {
            t["rope_parameters"]["mrope_section"] = serde_json::json!([11, 11]);
        }));
        assert!(
            e.contains("text_config.rope_parameters.mrope_section"),
            "{e}"
        );
        let e = err(&edit(DENSE_27B, |t| {
            t["rope_parameters"]["rope_type"] = "warp".into();
        }));
        assert!(e.contains("text_config.rope_parameters.rope_type"), "{e}");
        let e = err(&edit(DENSE_27B, |t| {
            t["rope_parameters"] = serde_json::json!({"full_attention": {"rope_theta": 1e7}});
        }));
        assert!(
            e.contains("text_config.rope_parameters.full_attention"),
            "{e}"
        );
        // Legacy top-level fields fill a missing block.
        let s = spec(&edit(DENSE_27B, |t| {
            t.remove("rope_parameters");
            t.insert("rope_theta".into(), 1e7.into());
        }))
        .unwrap();
        let rope = s.layers[3].rope.as_ref().unwrap();
        assert_eq!((rope.theta, rope.rotary_dim), (1e7, 64));
    }

    /// The tiny oracle configs, counted on the meta device with transformers 5.23.0
    /// (`sum(p.numel() for p in Qwen3_5(Moe)ForCausalLM(cfg).parameters())`).
    #[test]
    fn tiny_params_match_reference() {
        for ((name, src), want) in TINY.iter().zip([363_040u64, 414_752, 363_040]) {
            let s = spec(&json(src)).unwrap();
            assert_eq!(s.params.total, want, "{name}");
            assert!(s.warnings.is_empty(), "{name}: {:?}", s.warnings);
        }
    }

    /// The tiny oracle configs: our cache equals what the reference measured, except that the
    /// conv state keeps `kernel − 1` columns instead of the reference's `kernel`.
    #[test]
    fn tiny_cache_matches_reference() {
        let cache = json(CACHE);
        let entries = cache["entries"].as_array().unwrap();
        for (name, src) in TINY {
            let s = spec(&json(src)).unwrap();
            let mut checked = 0;
            for e in entries.iter().filter(|e| e["name"] == *name) {
                let tokens = e["tokens"].as_u64().unwrap();
                let kv = match e["dtype"].as_str().unwrap() {
                    "float32" => KvDtype::F32,
                    "bfloat16" => KvDtype::Bf16,
                    other => panic!("dtype {other}"),
                };
                for rl in e["layers"].as_array().unwrap() {
                    let i = rl["decoder_layer"].as_u64().unwrap() as usize;
                    let ours = layer_bytes(&s.layers[i], tokens, 1, kv).unwrap();
                    let theirs: u64 = rl["bytes"].as_u64().unwrap();
                    let ours_total: u64 = ours.iter().map(|(_, b)| b).sum();
                    if s.layers[i].attention == Attention::Linear {
                        let conv = &rl["tensors"][0];
                        assert_eq!(conv["name"], "conv_states[0]");
                        let shape: Vec<u64> = conv["shape"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|d| d.as_u64().unwrap())
                            .collect();
                        let column = conv["bytes"].as_u64().unwrap() / shape[2];
                        assert_eq!(ours_total + column, theirs, "{name} layer {i}");
                        assert_eq!(ours[1].1, rl["tensors"][1]["bytes"].as_u64().unwrap());
                    } else {
                        assert_eq!(ours_total, theirs, "{name} layer {i}");
                    }
                    checked += 1;
                }
            }
            assert!(checked > 0, "{name}: no reference entries");
        }
    }
}

#[cfg(test)]
mod bounds_tests {
    use crate::arch::config::bounds_test::{real, refuses_past_bound};

    #[test]
    fn sizes_past_the_bounds_are_refused_by_key() {
        for name in ["Qwen3.6-27B", "Qwen3.6-35B-A3B"] {
            let raw = real(name);
            for key in [
                "num_hidden_layers",
                "head_dim",
                "hidden_size",
                "linear_conv_kernel_dim",
                "linear_key_head_dim",
                "linear_num_value_heads",
                "full_attention_interval",
                "vocab_size",
            ] {
                refuses_past_bound(&raw, &["text_config", key]);
            }
        }
        let moe = real("Qwen3.6-35B-A3B");
        for key in [
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
        ] {
            refuses_past_bound(&moe, &["text_config", key]);
        }
    }
}
