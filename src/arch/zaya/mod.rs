//! ZAYA (Zyphra): `ZayaForCausalLM`, transformers-native schema. Reference: transformers 5.23.0
//! `models/zaya/{configuration,modeling}_zaya.py`; cache layers in `cache_utils.py`
//! (`LinearAttentionAndFullAttentionLayer`, `LinearAttentionAndSlidingWindowAttentionLayer`).
//!
//! Notable:
//! - every layer is `hybrid` (CCA over all tokens) or `hybrid_sliding` (CCA over `sliding_window`
//!   tokens); each holds attention and an MoE block;
//! - Compressed Convolutional Attention (`ZayaCCAProjection`): q (`heads × head_dim`) and k
//!   (`kv_heads × head_dim`) are concatenated and mixed along time by a depthwise conv (kernel
//!   `cca_time0`) then a per-head grouped conv (kernel `cca_time1`), plus residual paths; half of
//!   each value head comes from the current token (`v_proj_current`), half from the previous
//!   token (`v_proj_delayed`); q/k are L2-normalised with a learned per-KV-head key scale;
//! - top-1 MoE with an MLP router (`router_hidden_size`): down-projection, RMS norm, two GELU
//!   layers, `num_experts + 1` classes (the extra class skips the experts), and from layer 1 on the
//!   previous layer's router state added in (EDA); `num_experts_per_tok` must be 1;
//! - learned residual scaling (scale + bias on both branches) after attention and after the MoE,
//!   and on the input embedding; optional `lm_head_bias`; tied embeddings by default.
//!
//! Cache, per layer (all in the model dtype):
//! - K and V: `num_key_value_heads × head_dim` per token each. This is CCA's latent size: the
//!   convolutions and the value delay happen before caching, so nothing smaller is stored (ZAYA1-8B:
//!   2 × 128 = 256 per token for K and the same for V, against a hidden size of 2048);
//! - conv state: the last `(cca_time0 − 1) + (cca_time1 − 1)` projected q/k rows,
//!   `(num_attention_heads + num_key_value_heads) × head_dim` each;
//! - delayed-value state: the previous token's `v_proj_delayed` output, `kv_heads × head_dim / 2`.
//!
//! `hybrid_sliding` layers keep `sliding_window` tokens here; the reference's sliding cache layer
//! keeps `sliding_window − 1`. With `cca_time0 = cca_time1 = 1` there is no conv state (the
//! reference's `qk_states[..., -0:]` would keep the whole sequence there; llmarch keeps none).
//!
//! This file is the config half (config → [`ArchSpec`], and the few model-wide numbers the
//! network needs, [`RuntimeConfig`]); [`model`] is the network.
//!
//! The legacy hub schema (80 alternating attention / MoE layers, `ffn_hidden_size`,
//! `zaya_mlp_expansion`, ...) is refused: transformers 5.23 would build a wrong 80-layer model
//! from it.

pub mod model;

use super::config::{check_len, default_count, default_true, TextConfig};
use super::config::{dim, layers_count, rope_from_params, to_u64};
use super::{ArchSpec, Attention, CachePart, Family, Ffn, LayerSpec, ParamCounts, Retention};
use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use serde_json::{Map, Value};

pub const FAMILY: Family = Family {
    name: "zaya",
    model_types: &["zaya"],
    architectures: &["ZayaForCausalLM"],
    summary: "Compressed Convolutional Attention (conv + delayed-value state), top-1 MoE with an MLP router, residual scaling",
    parse: |text| Ok(parse(text)?.0),
    build: Some(|raw, opts, vb, lm_head| {
        Ok(Box::new(model::ZayaModel::from_config(
            raw, opts, vb, lm_head,
        )?))
    }),
    rename: None,
};

/// What the network needs beyond the per-layer table.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    pub rms_norm_eps: f64,
    /// Biases on q/k/v/o and the value halves.
    pub attention_bias: bool,
    /// A bias on the output head.
    pub lm_head_bias: bool,
    pub router_hidden_size: usize,
    /// Depthwise conv kernel.
    pub cca_time0: usize,
    /// Grouped conv kernel.
    pub cca_time1: usize,
}

/// Validate and read the [`RuntimeConfig`] of a ZAYA config (part of [`parse`]).
fn runtime_config_of(c: &ZayaConfig) -> Result<RuntimeConfig> {
    Ok(RuntimeConfig {
        rms_norm_eps: c.rms_norm_eps,
        attention_bias: c.attention_bias,
        lm_head_bias: c.lm_head_bias,
        router_hidden_size: dim("router_hidden_size", c.router_hidden_size)?,
        cca_time0: dim("cca_time0", c.cca_time0)?,
        cca_time1: dim("cca_time1", c.cca_time1)?,
    })
}

/// `ZayaConfig` with the reference's defaults.
#[derive(Debug, Deserialize)]
struct ZayaConfig {
    #[serde(default = "default_count::<262_272>")]
    vocab_size: usize,
    #[serde(default = "default_count::<2048>")]
    hidden_size: usize,
    #[serde(default = "default_count::<40>")]
    num_hidden_layers: usize,
    #[serde(default = "default_count::<8>")]
    num_attention_heads: usize,
    #[serde(default = "default_count::<2>")]
    num_key_value_heads: usize,
    #[serde(default = "default_activation")]
    hidden_act: String,
    #[serde(default = "default_count::<131_072>")]
    max_position_embeddings: usize,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_true")]
    tie_word_embeddings: bool,
    rope_parameters: Option<Value>,
    /// Legacy; must be absent or null.
    rope_scaling: Option<Value>,
    /// Top-level RoPE keys are not read by the reference (plain attributes).
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    sliding_window: Option<usize>,
    #[serde(default = "default_count::<2048>")]
    moe_intermediate_size: usize,
    #[serde(default = "default_count::<1>")]
    num_experts_per_tok: usize,
    #[serde(default = "default_count::<16>")]
    num_experts: usize,
    layer_types: Option<Vec<String>>,
    #[serde(default = "default_count::<128>")]
    head_dim: usize,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    lm_head_bias: bool,
    #[serde(default = "default_count::<256>")]
    router_hidden_size: usize,
    #[serde(default = "default_count::<2>")]
    cca_time0: usize,
    #[serde(default = "default_count::<2>")]
    cca_time1: usize,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

fn default_activation() -> String {
    "silu".into()
}
fn default_rms_eps() -> f64 {
    1e-5
}

/// No ZAYA-specific keys are known to be harmless beyond the common ones.
const HARMLESS: &[&str] = &[];

const HYBRID: &str = "hybrid";
const HYBRID_SLIDING: &str = "hybrid_sliding";

/// Keys only the legacy (80-layer, alternating attention/MoE) hub schema carries.
const LEGACY_KEYS: &[&str] = &[
    "ffn_hidden_size",
    "zaya_mlp_expansion",
    "num_query_groups",
    "moe_router_topk",
    "kv_channels",
    "zaya_use_mod",
    "zaya_use_eda",
    "zaya_high_prec",
    "swa_layers",
    "swa_rotary_base",
    "scale_residual_merge",
    "clamp_temp",
    "cca",
    "activation_func",
    "gated_linear_unit",
    "add_bias_linear",
    "normalization",
    "fused_add_norm",
    "residual_in_fp32",
    "mamba_cache_dtype",
    "apply_rope_fusion",
    "bias_activation_fusion",
];

/// Refuse the legacy hub schema with a pointer to the native one.
fn check_not_legacy(obj: &Map<String, Value>) -> Result<()> {
    let found: Vec<String> = LEGACY_KEYS
        .iter()
        .filter(|k| obj.contains_key(**k))
        .map(|k| format!("`{k}`"))
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    let layers = obj
        .get("num_hidden_layers")
        .and_then(|v| v.as_u64())
        .map_or(String::new(), |n| format!(", num_hidden_layers {n}"));
    Err(anyhow!(
        "this is the legacy ZAYA hub schema (alternating attention / MoE layers{layers}; keys {}), \
         not the transformers-native one that ZayaForCausalLM reads; transformers 5.23 would build \
         a wrong model from it",
        found.join(", ")
    )
    .context(
        "hint: use the transformers-native config (40 `hybrid` layers, `moe_intermediate_size`, \
         `router_hidden_size`, per-layer-type `rope_parameters`) from the native Zyphra/ZAYA1-8B \
         repo, or convert the checkpoint with convert_zaya_weights_to_hf.py from the transformers \
         source tree (src/transformers/models/zaya/; it is not in the 5.23.0 wheel)",
    ))
}

/// Per-layer-type RoPE blocks (`hybrid`, `hybrid_sliding`), as the reference reads them.
fn resolve_rope(
    c: &ZayaConfig,
    used: &[&str],
    warnings: &mut Vec<String>,
) -> Result<Map<String, Value>> {
    if c.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        bail!(
            "key `rope_scaling` is set: the reference would replace `rope_parameters` with it and \
             then fail to build the model; write one block per layer type in `rope_parameters`"
        );
    }
    for (k, present) in [
        ("rope_theta", c.rope_theta.is_some()),
        ("partial_rotary_factor", c.partial_rotary_factor.is_some()),
    ] {
        if present {
            warnings.push(format!(
                "key `{k}` is not read: the reference takes RoPE from `rope_parameters.<layer type>`"
            ));
        }
    }
    let mut obj = match c.rope_parameters.clone() {
        None | Some(Value::Null) => serde_json::json!({
            HYBRID: {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
            HYBRID_SLIDING: {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
        })
        .as_object()
        .cloned()
        .unwrap_or_default(),
        Some(Value::Object(o)) => o,
        Some(_) => bail!("key `rope_parameters` is not an object"),
    };
    // The hub file carries a stray `rope_type` beside the nested blocks; the reference deletes it.
    obj.remove("rope_type");
    if !obj.contains_key(HYBRID) && !obj.contains_key(HYBRID_SLIDING) {
        bail!(
            "key `rope_parameters` is a single flat block, but ZAYA reads one block per layer type \
             (`{HYBRID}`, `{HYBRID_SLIDING}`); the reference drops a flat block's `rope_type` and then \
             cannot build the model"
        );
    }
    for k in obj.keys() {
        if k != HYBRID && k != HYBRID_SLIDING {
            warnings.push(format!(
                "key `rope_parameters.{k}` is not read: the reference reads only `{HYBRID}` and `{HYBRID_SLIDING}`"
            ));
        }
    }
    for ty in used {
        if !obj.contains_key(*ty) {
            bail!("key `rope_parameters.{ty}` is missing, but some layers are `{ty}` (the reference fails to build the model)");
        }
    }
    Ok(obj)
}

/// Read a ZAYA config once into its [`ArchSpec`] and the [`RuntimeConfig`] its network
/// needs, both validated: every command (`inspect`, `kv-budget`, `run`) gives the same verdict.
pub fn parse(text: &TextConfig) -> Result<(ArchSpec, RuntimeConfig)> {
    check_not_legacy(&text.value)?;
    let c: ZayaConfig = text.parse()?;
    let spec = arch_spec(text, &c)?;
    let runtime = runtime_config_of(&c)?;
    Ok((spec, runtime))
}

fn arch_spec(text: &TextConfig, c: &ZayaConfig) -> Result<ArchSpec> {
    let mut warnings = text.check_unknown_keys(&c.rest, HARMLESS)?;
    let n = layers_count("num_hidden_layers", c.num_hidden_layers)?;
    let hidden = dim("hidden_size", c.hidden_size)?;
    let vocab = dim("vocab_size", c.vocab_size)?;
    let head_dim = dim("head_dim", c.head_dim)?;
    let q_heads = dim("num_attention_heads", c.num_attention_heads)?;
    let kv_heads = dim("num_key_value_heads", c.num_key_value_heads)?;
    let experts = dim("num_experts", c.num_experts)?;
    let width = dim("moe_intermediate_size", c.moe_intermediate_size)?;
    let router = dim("router_hidden_size", c.router_hidden_size)?;
    let t0 = dim("cca_time0", c.cca_time0)?;
    let t1 = dim("cca_time1", c.cca_time1)?;

    if c.num_experts_per_tok != 1 {
        bail!(
            "key `num_experts_per_tok` = {}: ZAYA routes each token to exactly one expert (the \
             reference accepts only 1)",
            c.num_experts_per_tok
        );
    }
    if q_heads % kv_heads != 0 {
        bail!("key `num_attention_heads` ({q_heads}) must be a multiple of `num_key_value_heads` ({kv_heads})");
    }
    let kv_width = kv_heads * head_dim;
    if kv_width % 2 != 0 {
        bail!(
            "keys `num_key_value_heads` × `head_dim` = {kv_width} must be even: each value head is half \
             current, half delayed"
        );
    }
    if c.hidden_act != "silu" {
        bail!(
            "key `hidden_act` = `{}` is not supported (ZAYA uses silu)",
            c.hidden_act
        );
    }

    let types = c
        .layer_types
        .clone()
        .unwrap_or_else(|| vec![HYBRID.to_string(); n]);
    check_len("layer_types", &types, n)?;
    for (i, t) in types.iter().enumerate() {
        if t != HYBRID && t != HYBRID_SLIDING {
            let hint = if t == "full_attention" || t == "sliding_attention" {
                format!(" (`{t}` is a pre-release name: write `{HYBRID}` or `{HYBRID_SLIDING}`)")
            } else {
                String::new()
            };
            bail!("key `layer_types[{i}]` = `{t}`: ZAYA layers are `{HYBRID}` or `{HYBRID_SLIDING}`{hint}");
        }
    }
    let any_sliding = types.iter().any(|t| t == HYBRID_SLIDING);
    let window = if any_sliding {
        match c.sliding_window {
            Some(w) => Some(dim("sliding_window", w)?),
            None => bail!(
                "key `sliding_window` must be set when `layer_types` contains `{HYBRID_SLIDING}` (the reference refuses it too)"
            ),
        }
    } else {
        None
    };

    let mut used: Vec<&str> = vec![];
    for ty in [HYBRID, HYBRID_SLIDING] {
        if types.iter().any(|t| t == ty) {
            used.push(ty);
        }
    }
    let blocks = resolve_rope(c, &used, &mut warnings)?;
    let rope_of = |ty: &str| -> Result<super::Rope> {
        let b = blocks
            .get(ty)
            .ok_or_else(|| anyhow!("key `rope_parameters.{ty}` is missing"))?;
        rope_from_params(b, head_dim, &format!("rope_parameters.{ty}"))
    };
    let rope_hybrid = if used.contains(&HYBRID) {
        Some(rope_of(HYBRID)?)
    } else {
        None
    };
    let rope_sliding = if used.contains(&HYBRID_SLIDING) {
        Some(rope_of(HYBRID_SLIDING)?)
    } else {
        None
    };

    // Parameters, tensor by tensor as `ZayaForCausalLM` builds them (in u128: no overflow).
    let (h, v, hd) = (hidden as u128, vocab as u128, head_dim as u128);
    let (qh, kvh, e, w, r) = (
        q_heads as u128,
        kv_heads as u128,
        experts as u128,
        width as u128,
        router as u128,
    );
    let bias = |n: u128| if c.attention_bias { n } else { 0 };
    let embedding = v * h;
    let lm_head =
        if c.tie_word_embeddings { 0 } else { v * h } + if c.lm_head_bias { v } else { 0 };
    let mut routed: u128 = 0;
    let mut other: u128 = 2 * h + h; // input_hidden_states_scale/bias, final norm
    let conv_channels = (q_heads + kv_heads) * head_dim;
    let conv_rows = (t0 - 1) + (t1 - 1);

    let mut layers = Vec::with_capacity(n);
    for (i, ty) in types.iter().enumerate() {
        let cc = conv_channels as u128;
        // Attention: q, k, the two value halves, o; the two convs (bias on); the key scale.
        let mut lp = h * qh * hd + bias(qh * hd);
        lp += h * kvh * hd + bias(kvh * hd);
        lp += 2 * (h * (kvh * hd / 2) + bias(kvh * hd / 2));
        lp += qh * hd * h + bias(h);
        lp += cc * t0 as u128 + cc; // conv_qk_depthwise [C, 1, t0] + bias
        lp += cc * hd * t1 as u128 + cc; // conv_qk_grouped [C, C / (heads + kv_heads), t1] + bias
        lp += kvh; // qk_norm.temp
                   // Router: down_proj (+bias), EDA scale from layer 1 on, router MLP over E + 1 classes.
        lp += h * r + r;
        if i > 0 {
            lp += r;
        }
        lp += r + 2 * (r * r + r) + r * (e + 1);
        routed += e * 3 * w * h; // experts.gate_up_proj [E, 2w, h] + down_proj [E, h, w]
        lp += 2 * h + 8 * h; // two RMS norms, two residual scalings (4 vectors each)
        other += lp;

        let sliding = ty == HYBRID_SLIDING;
        let (attention, retention, rope) = if sliding {
            let w = window.ok_or_else(|| anyhow!("internal: no sliding window"))?;
            (
                Attention::Cca { window: Some(w) },
                Retention::Window { window: w },
                rope_sliding.clone(),
            )
        } else {
            (
                Attention::Cca { window: None },
                Retention::AllTokens,
                rope_hybrid.clone(),
            )
        };
        let mut cache = LayerSpec::kv_parts(kv_heads, head_dim, head_dim, false, retention);
        if conv_rows > 0 {
            cache.push(CachePart::new(
                "conv state",
                conv_channels,
                Retention::Fixed { entries: conv_rows },
            ));
        }
        cache.push(CachePart::new(
            "delayed V state",
            kv_width / 2,
            Retention::Fixed { entries: 1 },
        ));
        let mut notes = vec![format!("conv {t0}+{t1}")];
        if i > 0 {
            notes.push("router EDA".into());
        }

        layers.push(LayerSpec {
            index: i,
            attention,
            q_heads,
            kv_heads,
            head_dim,
            // Each value head is head_dim wide: half from the current token, half delayed.
            v_head_dim: head_dim,
            kv_source: None,
            k_eq_v: false,
            rope,
            ffn: Ffn::Moe {
                experts,
                top_k: 1,
                width,
                shared_width: None,
                dense_width: None,
                routing: format!("MLP router {router}"),
            },
            ple_width: None,
            cache,
            notes,
        });
    }

    let params = ParamCounts {
        total: to_u64(embedding + lm_head + routed + other)?,
        embedding: to_u64(embedding)?,
        ple: 0,
        lm_head: to_u64(lm_head)?,
        routed_experts: to_u64(routed)?,
        ..Default::default()
    };

    let mut notes = vec![
        format!(
            "CCA: q/k conv {t0}+{t1} over {} channels, value half delayed one token",
            conv_channels
        ),
        "QK L2 norm with a per-KV-head key scale".to_string(),
        format!(
            "MoE router: MLP {router} wide, top-1 of {} classes (one skips the experts), EDA from layer 1",
            experts + 1
        ),
        "residual scaling (scale + bias) on both branches and the embedding".to_string(),
    ];
    if c.lm_head_bias {
        notes.push("lm_head bias".into());
    }

    Ok(ArchSpec {
        family: FAMILY.name,
        model_type: text.model_type.clone(),
        hf_class: "ZayaForCausalLM".into(),
        architecture: text.architecture.clone(),
        hidden_size: hidden,
        vocab_size: vocab,
        max_context: c.max_position_embeddings,
        dtype: text.dtype(),
        tie_word_embeddings: c.tie_word_embeddings,
        params: params.finish(1, experts),
        layers,
        notes,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::super::budget::{layer_bytes, KvDtype};
    use super::super::{parse_config, ArchSpec, Attention, Retention};
    use crate::arch::config::ParseOptions;
    use serde_json::{json, Value};

    const ZAYA1_8B: &str = include_str!("../../../configs/ZAYA1-8B/config.json");

    fn real() -> Value {
        serde_json::from_str(ZAYA1_8B).expect("config parses as JSON")
    }

    /// tests/fixtures/tiny/zaya-sliding/config.json (written by the reference's config class).
    fn tiny() -> Value {
        json!({
            "attention_bias": false, "bos_token_id": 2, "cca_time0": 2, "cca_time1": 2,
            "eos_token_id": 106, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64,
            "initializer_range": 0.02,
            "layer_types": ["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"],
            "lm_head_bias": false, "max_position_embeddings": 512, "model_type": "zaya",
            "moe_intermediate_size": 32, "num_attention_heads": 4, "num_experts": 4,
            "num_experts_per_tok": 1, "num_hidden_layers": 4, "num_key_value_heads": 2,
            "output_router_logits": false, "pad_token_id": 0, "rms_norm_eps": 1e-05,
            "rope_parameters": {
                "hybrid": {"partial_rotary_factor": 0.5, "rope_theta": 5000000.0, "rope_type": "default"},
                "hybrid_sliding": {"partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rope_type": "default"}
            },
            "router_hidden_size": 16, "sliding_window": 8, "tie_word_embeddings": true,
            "transformers_version": "5.23.0", "use_cache": true, "vocab_size": 256
        })
    }

    fn spec(v: &Value) -> anyhow::Result<ArchSpec> {
        parse_config(v, &ParseOptions::default())
    }

    fn err(v: &Value) -> String {
        match spec(v) {
            Ok(_) => panic!("expected an error"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn real_config_layers() {
        let s = spec(&real()).unwrap();
        assert_eq!(s.family, "zaya");
        assert_eq!(s.layers.len(), 40);
        assert!(s.tie_word_embeddings);
        for l in &s.layers {
            assert_eq!(l.attention, Attention::Cca { window: None });
            assert_eq!(
                (l.q_heads, l.kv_heads, l.head_dim, l.v_head_dim),
                (8, 2, 128, 128)
            );
            let r = l.rope.as_ref().unwrap();
            assert_eq!(
                (r.kind.as_str(), r.theta, r.rotary_dim),
                ("default", 5e6, 64)
            );
            let parts: Vec<(&str, u64, Retention)> = l
                .cache
                .iter()
                .map(|p| (p.name, p.elems_per_entry, p.retention))
                .collect();
            assert_eq!(
                parts,
                vec![
                    ("K", 256, Retention::AllTokens),
                    ("V", 256, Retention::AllTokens),
                    ("conv state", 1280, Retention::Fixed { entries: 2 }),
                    ("delayed V state", 128, Retention::Fixed { entries: 1 }),
                ]
            );
        }
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    #[test]
    fn real_config_params_match_reference() {
        let s = spec(&real()).unwrap();
        // tests/fixtures/reference_params.json, "ZAYA1-8B".
        assert_eq!(s.params.total, 8_840_488_784);
        assert_eq!(s.params.embedding, 537_133_056);
        assert_eq!(s.params.lm_head, 0);
        assert_eq!(s.params.routed_experts, 8_053_063_680);
        let active = s.params.active as f64 / 1e9;
        assert!((active - 1.29).abs() < 0.005, "active {active}");
    }

    #[test]
    fn tiny_params_and_cache_match_reference() {
        // Totals measured with transformers 5.23.0 on the meta device.
        let s = spec(&tiny()).unwrap();
        assert_eq!(s.params.total, 187_192);
        assert_eq!(s.layers[0].attention, Attention::Cca { window: Some(8) });
        assert_eq!(s.layers[1].attention, Attention::Cca { window: None });
        // reference_cache.json, zaya-sliding, 43 tokens, f32: conv [1, 96, 2], recurrent [1, 16],
        // K/V [1, 2, T, 16] with T = 43 (hybrid) or window − 1 = 7 there, window = 8 here.
        let parts = layer_bytes(&s.layers[1], 43, 1, KvDtype::F32).unwrap();
        let bytes: Vec<u64> = parts.iter().map(|(_, b)| *b).collect();
        assert_eq!(bytes, vec![5504, 5504, 768, 64]);
        let parts = layer_bytes(&s.layers[0], 43, 1, KvDtype::F32).unwrap();
        let bytes: Vec<u64> = parts.iter().map(|(_, b)| *b).collect();
        assert_eq!(bytes, vec![8 * 128, 8 * 128, 768, 64]);

        let variant = |f: &dyn Fn(&mut Value)| {
            let mut v = tiny();
            f(&mut v);
            spec(&v).unwrap().params.total
        };
        assert_eq!(
            variant(&|v| {
                v["cca_time0"] = json!(3);
                v["cca_time1"] = json!(4);
            }),
            199_864
        );
        assert_eq!(
            variant(&|v| {
                v["cca_time0"] = json!(1);
                v["cca_time1"] = json!(1);
            }),
            180_664
        );
        assert_eq!(variant(&|v| v["attention_bias"] = json!(true)), 187_960);
        assert_eq!(variant(&|v| v["lm_head_bias"] = json!(true)), 187_448);
        assert_eq!(
            variant(&|v| {
                v["lm_head_bias"] = json!(true);
                v["tie_word_embeddings"] = json!(false);
            }),
            203_832
        );
        // No conv state without conv history.
        let mut v = tiny();
        v["cca_time0"] = json!(1);
        v["cca_time1"] = json!(1);
        let s = spec(&v).unwrap();
        assert!(s.layers[0].cache.iter().all(|p| p.name != "conv state"));
    }

    #[test]
    fn top_k_other_than_one_is_refused() {
        let mut v = real();
        v["num_experts_per_tok"] = json!(2);
        let e = err(&v);
        assert!(e.contains("num_experts_per_tok"), "{e}");
    }

    #[test]
    fn sliding_layers_need_a_window() {
        let mut v = real();
        v["layer_types"][3] = json!("hybrid_sliding");
        let e = err(&v);
        assert!(
            e.contains("sliding_window") && e.contains("hybrid_sliding"),
            "{e}"
        );
        v["sliding_window"] = json!(4096);
        let s = spec(&v).unwrap();
        assert_eq!(s.layers[3].attention, Attention::Cca { window: Some(4096) });
        assert_eq!(
            s.layers[3].cache[0].retention,
            Retention::Window { window: 4096 }
        );
        let r = s.layers[3].rope.as_ref().unwrap();
        assert_eq!((r.theta, r.rotary_dim), (10_000.0, 64));
        v["sliding_window"] = json!(0);
        assert!(err(&v).contains("sliding_window"));
    }

    #[test]
    fn legacy_schema_is_refused() {
        let legacy = json!({
            "architectures": ["ZayaForCausalLM"], "model_type": "zaya",
            "num_hidden_layers": 80, "hidden_size": 2048, "ffn_hidden_size": 4096,
            "zaya_mlp_expansion": 256, "num_attention_heads": 8, "num_query_groups": 2,
            "rope_theta": 5000000, "partial_rotary_factor": 0.5, "num_experts": 16
        });
        let e = err(&legacy);
        assert!(e.contains("legacy ZAYA hub schema"), "{e}");
        assert!(
            e.contains("ffn_hidden_size") && e.contains("zaya_mlp_expansion"),
            "{e}"
        );
        assert!(
            e.contains("hint:") && e.contains("convert_zaya_weights_to_hf"),
            "{e}"
        );
    }

    #[test]
    fn bad_inputs_name_the_key() {
        let mut v = real();
        v["num_key_value_heads"] = json!(3);
        assert!(err(&v).contains("num_key_value_heads"));
        let mut v = real();
        v["cca_time0"] = json!(0);
        assert!(err(&v).contains("cca_time0"));
        let mut v = real();
        v["layer_types"].as_array_mut().unwrap().pop();
        let e = err(&v);
        assert!(e.contains("layer_types") && e.contains("39"), "{e}");
        let mut v = real();
        v["layer_types"][0] = json!("full_attention");
        assert!(err(&v).contains("layer_types[0]"));
        let mut v = real();
        v["head_dim"] = json!(15);
        v["num_key_value_heads"] = json!(1);
        assert!(err(&v).contains("head_dim"));
        let mut v = real();
        v["hidden_act"] = json!("gelu");
        assert!(err(&v).contains("hidden_act"));
        let mut v = real();
        v["some_new_switch"] = json!(true);
        assert!(err(&v).contains("some_new_switch"));
    }

    #[test]
    fn rope_forms() {
        // The hub's stray `rope_type` beside the nested blocks is dropped, as in the reference.
        let mut v = real();
        v["rope_parameters"]["rope_type"] = json!("default");
        assert!(spec(&v).unwrap().warnings.is_empty());
        // A flat block cannot be built by the reference.
        let mut v = real();
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e4});
        assert!(err(&v).contains("flat"));
        // A used layer type needs its block.
        let mut v = real();
        v["rope_parameters"]
            .as_object_mut()
            .unwrap()
            .remove("hybrid");
        assert!(err(&v).contains("rope_parameters.hybrid"));
        // Absent: the reference's defaults.
        let mut v = real();
        v.as_object_mut().unwrap().remove("rope_parameters");
        let r = spec(&v).unwrap().layers[0].rope.clone().unwrap();
        assert_eq!((r.theta, r.rotary_dim), (5e6, 64));
        // Legacy rope_scaling is refused.
        let mut v = real();
        v["rope_scaling"] = json!({"rope_type": "linear", "factor": 2.0});
        assert!(err(&v).contains("rope_scaling"));
        // YaRN without original_max_position_embeddings is refused, as by the reference.
        let mut v = real();
        v["rope_parameters"]["hybrid"] =
            json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e6});
        assert!(err(&v).contains("rope_parameters.hybrid.original_max_position_embeddings"));
    }
}

#[cfg(test)]
mod bounds_tests {
    use crate::arch::config::bounds_test::{real, refuses_past_bound};

    #[test]
    fn sizes_past_the_bounds_are_refused_by_key() {
        let raw = real("ZAYA1-8B");
        for key in [
            "num_hidden_layers",
            "head_dim",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "cca_time0",
            "cca_time1",
            "router_hidden_size",
            "num_experts",
            "moe_intermediate_size",
            "vocab_size",
        ] {
            refuses_past_bound(&raw, &[key]);
        }
    }
}
