//! The Gemma 4 text config as the reference reads it: the serde schema with transformers'
//! defaults, the per-layer overrides of `per_layer_config`, what llmarch refuses, and the
//! [`RuntimeConfig`] the network reads beyond the per-layer table.

use crate::arch::config::{check_len, default_count, default_true, TextConfig};
use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::{Map, Value};

/// `Gemma4TextConfig` with the reference's defaults.
#[derive(Debug, Deserialize)]
pub(super) struct Gemma4TextConfig {
    #[serde(default = "default_count::<262_144>")]
    pub(super) vocab_size: usize,
    #[serde(default = "default_count::<2304>")]
    pub(super) hidden_size: usize,
    #[serde(default = "default_count::<9216>")]
    pub(super) intermediate_size: usize,
    #[serde(default = "default_count::<30>")]
    pub(super) num_hidden_layers: usize,
    #[serde(default = "default_count::<8>")]
    pub(super) num_attention_heads: usize,
    #[serde(default = "default_count::<4>")]
    pub(super) num_key_value_heads: usize,
    #[serde(default = "default_count::<256>")]
    pub(super) head_dim: usize,
    #[serde(default = "default_activation")]
    pub(super) hidden_activation: String,
    #[serde(default = "default_count::<131_072>")]
    pub(super) max_position_embeddings: usize,
    #[serde(default = "default_rms_eps")]
    pub(super) rms_norm_eps: f64,
    #[serde(default = "default_true")]
    pub(super) tie_word_embeddings: bool,
    pub(super) rope_parameters: Option<Map<String, Value>>,
    #[serde(default)]
    pub(super) attention_bias: bool,
    #[serde(default = "default_count::<512>")]
    pub(super) sliding_window: usize,
    pub(super) layer_types: Option<Vec<String>>,
    pub(super) final_logit_softcapping: Option<f64>,
    pub(super) use_bidirectional_attention: Option<String>,
    #[serde(default = "default_count::<262_144>")]
    pub(super) vocab_size_per_layer_input: usize,
    #[serde(default = "default_count::<256>")]
    pub(super) hidden_size_per_layer_input: usize,
    #[serde(default)]
    pub(super) attention_k_eq_v: bool,
    #[serde(default)]
    pub(super) num_kv_shared_layers: usize,
    #[serde(default)]
    pub(super) enable_moe_block: bool,
    #[serde(default)]
    pub(super) use_double_wide_mlp: bool,
    pub(super) num_experts: Option<usize>,
    pub(super) top_k_experts: Option<usize>,
    pub(super) moe_intermediate_size: Option<usize>,
    /// Older hub files carry this as `null`; a value would be an unknown expert layout.
    pub(super) expert_intermediate_size: Option<usize>,
    /// Pre-5.23 form, folded into `per_layer_config` by the reference.
    pub(super) global_head_dim: Option<usize>,
    pub(super) num_global_key_value_heads: Option<usize>,
    /// 5.23 form: layer index → overrides (`head_dim`, `num_key_value_heads`).
    pub(super) per_layer_config: Option<Value>,
    #[serde(flatten)]
    pub(super) rest: Map<String, Value>,
}

fn default_activation() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_rms_eps() -> f64 {
    1e-6
}

/// Keys Gemma 4 configs carry that do not change the text model.
pub(super) const HARMLESS: &[&str] = &["vision_soft_tokens_per_image"];

pub(super) const SLIDING: &str = "sliding_attention";
pub(super) const FULL: &str = "full_attention";

/// Per-layer overrides from `per_layer_config` (either a map keyed by index or a list).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct LayerOverride {
    pub(super) head_dim: Option<usize>,
    pub(super) num_key_value_heads: Option<usize>,
}

pub(super) fn read_per_layer_config(
    v: &Value,
    layers: usize,
    prefix: &str,
) -> Result<Vec<LayerOverride>> {
    let mut out = vec![LayerOverride::default(); layers];
    let mut set = |idx: usize, o: &Value| -> Result<()> {
        if idx >= layers {
            bail!("key `{prefix}per_layer_config`: layer {idx} does not exist ({layers} layers)");
        }
        let Some(obj) = o.as_object() else {
            if o.is_null() {
                return Ok(());
            }
            bail!("key `{prefix}per_layer_config.{idx}` is not an object");
        };
        for (k, val) in obj {
            let n = || -> Result<usize> {
                val.as_u64().map(|n| n as usize).ok_or_else(|| {
                    anyhow::anyhow!("key `{prefix}per_layer_config.{idx}.{k}` is not a count")
                })
            };
            match k.as_str() {
                "head_dim" => out[idx].head_dim = Some(n()?),
                "num_key_value_heads" => out[idx].num_key_value_heads = Some(n()?),
                other => bail!(
                    "key `{prefix}per_layer_config.{idx}.{other}`: llmarch does not know this per-layer override"
                ),
            }
        }
        Ok(())
    };
    match v {
        Value::Object(map) => {
            for (k, o) in map {
                let idx: usize = k.parse().map_err(|_| {
                    anyhow::anyhow!("key `{prefix}per_layer_config`: `{k}` is not a layer index")
                })?;
                set(idx, o)?;
            }
        }
        Value::Array(list) => {
            check_len(&format!("{prefix}per_layer_config"), list, layers)?;
            for (idx, o) in list.iter().enumerate() {
                set(idx, o)?;
            }
        }
        Value::Null => {}
        _ => bail!("key `{prefix}per_layer_config` is neither an object nor a list"),
    }
    Ok(out)
}

/// Refuse what a Gemma 4 config may say but llmarch does not run.
pub(super) fn check_supported(c: &Gemma4TextConfig, p: &str) -> Result<()> {
    if c.use_bidirectional_attention.as_deref() == Some("all") {
        bail!("key `{p}use_bidirectional_attention` = \"all\" (a bidirectional encoder) is not supported; llmarch runs causal text models");
    }
    if c.expert_intermediate_size.is_some() {
        bail!("key `{p}expert_intermediate_size` is set; the reference reads `moe_intermediate_size` and llmarch does not know this layout");
    }
    if c.hidden_activation != "gelu_pytorch_tanh" {
        bail!(
            "key `{p}hidden_activation` = `{}` is not supported (Gemma 4 uses gelu_pytorch_tanh)",
            c.hidden_activation
        );
    }
    Ok(())
}

/// The model-wide numbers the network needs beyond the per-layer table.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    pub rms_norm_eps: f64,
    /// `tanh` cap on the final logits, if any.
    pub final_logit_softcapping: Option<f64>,
    /// Biases on the q/k/v/o projections.
    pub attention_bias: bool,
    /// Rows of the per-layer-embedding table (PLE models).
    pub vocab_size_per_layer_input: usize,
}

/// Validate and read the [`RuntimeConfig`] of a Gemma 4 text config (part of [`super::parse`]).
pub(super) fn runtime_config_of(c: &Gemma4TextConfig, text: &TextConfig) -> Result<RuntimeConfig> {
    let p = text.key_prefix();
    if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps >= 0.0) {
        bail!(
            "key `{p}rms_norm_eps` = {} must be a number ≥ 0",
            c.rms_norm_eps
        );
    }
    if let Some(cap) = c.final_logit_softcapping {
        if !(cap.is_finite() && cap > 0.0) {
            bail!("key `{p}final_logit_softcapping` = {cap} must be a positive number");
        }
    }
    Ok(RuntimeConfig {
        rms_norm_eps: c.rms_norm_eps,
        final_logit_softcapping: c.final_logit_softcapping,
        attention_bias: c.attention_bias,
        vocab_size_per_layer_input: c.vocab_size_per_layer_input,
    })
}
