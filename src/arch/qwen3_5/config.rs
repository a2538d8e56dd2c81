//! The Qwen3.5 text config as the reference reads it: the serde schema (dense and MoE defaults,
//! resolved by [`Variant`]), the keys the reference ignores, the one RoPE block and its mRoPE
//! fields, and the [`RuntimeConfig`] the network reads beyond the per-layer table.

use crate::arch::config::{default_count, rope_frequencies, RopeFrequencies, TextConfig};
use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use serde_json::{Map, Value};

/// `Qwen3_5TextConfig` / `Qwen3_5MoeTextConfig`. Fields whose default differs between the two
/// are `Option`s, resolved by [`Variant`].
#[derive(Debug, Deserialize)]
pub(super) struct Qwen3_5TextConfig {
    #[serde(default = "default_count::<248_320>")]
    pub(super) vocab_size: usize,
    pub(super) hidden_size: Option<usize>,
    /// Dense only (default 12288); the MoE config has no such field.
    pub(super) intermediate_size: Option<usize>,
    pub(super) num_hidden_layers: Option<usize>,
    #[serde(default = "default_count::<16>")]
    pub(super) num_attention_heads: usize,
    pub(super) num_key_value_heads: Option<usize>,
    #[serde(default = "default_activation")]
    pub(super) hidden_act: String,
    #[serde(default = "default_count::<32_768>")]
    pub(super) max_position_embeddings: usize,
    #[serde(default = "default_rms_eps")]
    pub(super) rms_norm_eps: f64,
    #[serde(default)]
    pub(super) tie_word_embeddings: bool,
    pub(super) rope_parameters: Option<Map<String, Value>>,
    /// Legacy name; the reference prefers it over `rope_parameters` when non-empty.
    pub(super) rope_scaling: Option<Map<String, Value>>,
    /// Legacy top-level RoPE fields, moved into `rope_parameters` when missing there.
    pub(super) rope_theta: Option<f64>,
    pub(super) partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub(super) attention_bias: bool,
    #[serde(default = "default_count::<256>")]
    pub(super) head_dim: usize,
    #[serde(default = "default_count::<4>")]
    pub(super) linear_conv_kernel_dim: usize,
    #[serde(default = "default_count::<128>")]
    pub(super) linear_key_head_dim: usize,
    #[serde(default = "default_count::<128>")]
    pub(super) linear_value_head_dim: usize,
    #[serde(default = "default_count::<16>")]
    pub(super) linear_num_key_heads: usize,
    #[serde(default = "default_count::<32>")]
    pub(super) linear_num_value_heads: usize,
    pub(super) layer_types: Option<Vec<String>>,
    /// Only read when `layer_types` is absent.
    pub(super) full_attention_interval: Option<usize>,
    /// Not read by the reference (it always builds the gate).
    pub(super) attn_output_gate: Option<bool>,
    /// Not read by the reference.
    pub(super) output_gate_type: Option<String>,
    /// Not read by the reference; its recurrent state is float32 anyway.
    pub(super) mamba_ssm_dtype: Option<String>,
    /// MTP: not built by the reference.
    pub(super) mtp_num_hidden_layers: Option<usize>,
    pub(super) mtp_use_dedicated_embeddings: Option<bool>,
    // MoE.
    pub(super) num_experts: Option<usize>,
    pub(super) num_experts_per_tok: Option<usize>,
    pub(super) moe_intermediate_size: Option<usize>,
    pub(super) shared_expert_intermediate_size: Option<usize>,
    /// Not read by the reference, which always renormalises the top-k weights.
    pub(super) norm_topk_prob: Option<bool>,
    /// Legacy Qwen-MoE keys the reference does not read: every layer is sparse.
    pub(super) decoder_sparse_step: Option<usize>,
    pub(super) mlp_only_layers: Option<Vec<usize>>,
    #[serde(flatten)]
    pub(super) rest: Map<String, Value>,
}

fn default_activation() -> String {
    "silu".into()
}
fn default_rms_eps() -> f64 {
    1e-6
}

/// Keys Qwen3.5 text configs carry that do not change the text model.
pub(super) const HARMLESS: &[&str] = &[];

pub(super) const LINEAR: &str = "linear_attention";
/// Sanity bound on `num_hidden_layers`.
pub(super) const MAX_LAYERS: usize = 1 << 16;
pub(super) const FULL: &str = "full_attention";

/// Dense (`Qwen3_5TextConfig`) or MoE (`Qwen3_5MoeTextConfig`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Variant {
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

    pub(super) fn name(self) -> &'static str {
        match self {
            Variant::Dense => "dense",
            Variant::Moe => "MoE",
        }
    }

    pub(super) fn hf_class(self) -> &'static str {
        match self {
            Variant::Dense => "Qwen3_5ForCausalLM",
            Variant::Moe => "Qwen3_5MoeForCausalLM",
        }
    }
}

/// Which variant the file describes; the text `model_type`, the wrapper's and `architectures[0]`
/// must agree.
pub(super) fn variant(text: &TextConfig) -> Result<Variant> {
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

/// The single RoPE block the reference builds its rotary embedding from: `rope_scaling` if
/// non-empty, else `rope_parameters`, with `rope_theta` (default 10000) and
/// `partial_rotary_factor` (default 0.25) filled from the top level when missing.
pub(super) fn rope_block(
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
pub(super) fn mrope_sections(block: &Map<String, Value>, what: &str) -> Result<[usize; 3]> {
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

/// Keys the reference ignores: accept what it computes, reject the rest.
pub(super) fn check_ignored_keys(
    c: &Qwen3_5TextConfig,
    p: &str,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let key = |k: &str| format!("{p}{k}");
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
    Ok(())
}

/// What the network needs beyond the per-layer table.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub rms_norm_eps: f64,
    pub attention_bias: bool,
    pub conv_kernel: usize,
    /// The full-attention layers' RoPE (text positions: plain 1-D RoPE over the leading dims).
    pub rope: RopeFrequencies,
    /// MTP layers in the checkpoint (`mtp_num_hidden_layers`, 0 when absent) and whether they
    /// bring their own embeddings (`mtp_use_dedicated_embeddings`): what `--draft mtp` runs.
    pub mtp_layers: usize,
    pub mtp_dedicated_embeddings: bool,
}

/// Validate and read the [`RuntimeConfig`] of a Qwen3.5 config (part of [`super::parse`]).
pub(super) fn runtime_config_of(c: &Qwen3_5TextConfig, text: &TextConfig) -> Result<RuntimeConfig> {
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
        mtp_layers: c.mtp_num_hidden_layers.unwrap_or(0),
        mtp_dedicated_embeddings: c.mtp_use_dedicated_embeddings == Some(true),
        rope: rope_frequencies(
            &block,
            block.get("truncate").cloned(),
            c.head_dim,
            c.max_position_embeddings,
            &format!("{p}{key}"),
        )?,
    })
}
