//! The DeepSeek V4 layer schedule → [`ArchSpec`]: the sizes, each layer's attention kind
//! (sliding, CSA, HCA) and compress rate, the two RoPE blocks, and each layer's cache parts (see
//! the family notes for what is held and why).

use super::config::{
    check_hard_coded, partial_rotary, resolve_layer_types, resolve_mlp_types, resolve_rates,
    resolve_rope, DeepseekV4Config, Kind, CSA, HARMLESS, HCA, MAX_DIM,
};
use super::{params, FAMILY};
use crate::arch::config::{positive, rope_from_params, TextConfig};
use crate::arch::{ArchSpec, Attention, CachePart, Ffn, LayerSpec, Retention, Rope, Routing};
use crate::layers::moe::score_routing::ScoreFn;
use anyhow::{anyhow, bail, Result};

pub(super) fn arch_spec(text: &TextConfig, c: &DeepseekV4Config) -> Result<ArchSpec> {
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
    check_hard_coded(c, p, &mut warnings)?;

    // 3. Per-layer schedules.
    let kinds = resolve_layer_types(c, n, p, &mut warnings)?;
    let hashed = resolve_mlp_types(c, n, p, &mut warnings)?;
    let (csa_rate, hca_rate) = resolve_rates(c, p)?;
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

    // 5. The per-layer table.
    let (v, ql, e, iw) = (
        c.vocab_size,
        c.q_lora_rank,
        c.n_routed_experts,
        c.moe_intermediate_size,
    );
    let m = c.hc_mult;
    let window = c.sliding_window;
    let mut layers = Vec::with_capacity(n);
    for (i, (&kind, &hash)) in kinds.iter().zip(&hashed).enumerate() {
        let rate = compress_rate(i, kind, csa_rate, hca_rate, p)?;

        let (attention, cache, notes) = attention_and_cache(c, kind, rate);
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
                    Routing::Hash
                } else {
                    Routing::from(ScoreFn::from_name(&c.scoring_func)?)
                },
            },
            ple_width: None,
            cache,
            notes,
        });
    }
    let params = params::count(c, &layers)?;

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

/// The compress rate of a CSA/HCA layer (`None` for a sliding one), which must be set and a
/// plausible ratio.
fn compress_rate(
    i: usize,
    kind: Kind,
    csa_rate: Option<usize>,
    hca_rate: Option<usize>,
    p: &str,
) -> Result<Option<usize>> {
    let (rate, ty) = match kind {
        Kind::Sliding => return Ok(None),
        Kind::Csa => (csa_rate, CSA),
        Kind::Hca => (hca_rate, HCA),
    };
    let r =
        rate.ok_or_else(|| anyhow!("layer {i}: `{ty}` has no rate in key `{p}compress_rates`"))?;
    if r == 0 || r > MAX_DIM {
        bail!("layer {i}: key `{p}compress_rates.{ty}` = {r} must be a positive ratio");
    }
    Ok(Some(r))
}

/// A layer's attention and what its cache holds (see the family notes): the K=V window, and for
/// CSA/HCA layers the compressed entries, the indexer keys and the state carried between steps.
fn attention_and_cache(
    c: &DeepseekV4Config,
    kind: Kind,
    rate: Option<usize>,
) -> (Attention, Vec<CachePart>, Vec<String>) {
    let (hd, ihd, inh, window) = (
        c.head_dim,
        c.index_head_dim,
        c.index_n_heads,
        c.sliding_window,
    );
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
    (attention, cache, notes)
}
