//! KV-cache arithmetic over the per-layer table: what the cache holds at a context length, the
//! naive figure, and what each trick saves.
//!
//! Per layer, bytes = Σ over its [`CachePart`]s of `entries(context) × elems_per_entry × dtype
//! bytes × batch`. The naive figure caches full-length K and V for every query head of every
//! layer (plain multi-head attention, no tricks). The savings are a waterfall, applied per layer
//! in this order, each trick credited with what it removes from what is left:
//!
//! 1. GQA/MQA: K and V for the layer's KV heads instead of its query heads;
//! 2. cross-layer KV sharing: a layer reading another layer's cache holds nothing;
//! 3. K=V: one tensor instead of two;
//! 4. the layer's own attention kind takes it to what it really holds: sliding window, DeepSeek
//!    compression (window + compressed entries + indexer keys), linear attention (a fixed state),
//!    CCA (latent K/V plus convolution state). This step can be negative at short contexts,
//!    where a fixed state outweighs the few tokens it replaces.
//!
//! With this order, Gemma 4 E2B's sharing is credited with full-length caches of its 20 shared
//! layers (24,576 B/token at bf16), the figure published for it.
//!
//! The arithmetic runs in u128 and every figure is then checked into u64 (bytes, FLOPs) or i64
//! (savings): a context, batch or config whose cache would not fit is an error, never a wrapped
//! number.

use super::{ArchSpec, Attention, LayerSpec, PartDtype, Retention, Trick};
use anyhow::{bail, Result};
use serde::Serialize;

/// The most sequences a budget counts (`--batch`): far beyond any real batch, and small enough
/// that cache figures stay well inside the 128-bit arithmetic of [`compute`].
pub const MAX_BATCH: u64 = 1 << 20;

/// Element types the KV cache can be stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvDtype {
    F32,
    Bf16,
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

impl KvDtype {
    /// Bytes for `elems` elements. The block formats store 32 values per block with one f16
    /// scale (q8_0: 34 bytes, q4_0: 18 bytes), as llama.cpp does; a partial block counts whole.
    pub fn bytes(self, elems: u128) -> u128 {
        match self {
            KvDtype::F32 => elems * 4,
            KvDtype::Bf16 | KvDtype::F16 => elems * 2,
            KvDtype::Q8_0 => elems.div_ceil(32) * 34,
            KvDtype::Q4_0 => elems.div_ceil(32) * 18,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
            KvDtype::F16 => "f16",
            KvDtype::Q8_0 => "q8_0",
            KvDtype::Q4_0 => "q4_0",
        }
    }
}

/// One layer's figures at a context length.
#[derive(Debug, Clone, Serialize)]
pub struct LayerBudget {
    pub index: usize,
    pub attention: String,
    /// What the layer's own cache holds.
    pub bytes: u64,
    /// Bytes per part, by part name.
    pub parts: Vec<(String, u64)>,
    pub naive_bytes: u64,
    pub kv_source: Option<usize>,
    /// Query heads per KV head.
    pub q_per_kv: f64,
    /// Attention FLOPs for one new token at this context.
    pub attention_flops: u64,
}

/// One model at one context length.
#[derive(Debug, Clone, Serialize)]
pub struct Budget {
    pub context: u64,
    pub batch: u64,
    pub kv_dtype: KvDtype,
    pub total_bytes: u64,
    pub naive_bytes: u64,
    /// Bytes saved by each trick, in waterfall order; only tricks the model uses.
    pub savings: Vec<Saving>,
    pub attention_flops: u64,
    pub layers: Vec<LayerBudget>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Saving {
    pub trick: Trick,
    pub label: &'static str,
    pub bytes: i64,
}

/// A figure computed in u128, as u64 (at most 2^63 − 1); too large is an error naming the
/// context and batch.
pub fn checked(v: u128, context: u64, batch: u64) -> Result<u64> {
    match u64::try_from(v) {
        Ok(v) if v <= i64::MAX as u64 => Ok(v),
        _ => bail!(
            "the KV cache at {context} tokens × batch {batch} is beyond what llmarch counts \
             (more than 8 EiB or 2^63 FLOPs)\nhint: give a smaller --context or --batch"
        ),
    }
}

/// Bytes of `layer`'s own cache at `context` tokens, per part, in u128.
fn part_bytes(layer: &LayerSpec, context: u64, batch: u64, kv: KvDtype) -> Vec<(String, u128)> {
    parts_holding(layer, batch, kv, |r| r.entries(context))
}

/// Bytes of each of `layer`'s cache parts when each part holds `entries(retention)` entries per
/// sequence, in u128.
fn parts_holding(
    layer: &LayerSpec,
    batch: u64,
    kv: KvDtype,
    entries: impl Fn(&Retention) -> u64,
) -> Vec<(String, u128)> {
    layer
        .cache
        .iter()
        .map(|p| {
            let elems = entries(&p.retention) as u128 * p.elems_per_entry as u128 * batch as u128;
            let bytes = match p.dtype {
                PartDtype::Kv => kv.bytes(elems),
                PartDtype::F32 => elems * 4,
            };
            (p.name.to_string(), bytes)
        })
        .collect()
}

/// Bytes of `layer`'s own cache at `context` tokens, per part.
pub fn layer_bytes(
    layer: &LayerSpec,
    context: u64,
    batch: u64,
    kv: KvDtype,
) -> Result<Vec<(String, u64)>> {
    part_bytes(layer, context, batch, kv)
        .into_iter()
        .map(|(name, b)| Ok((name, checked(b, context, batch)?)))
        .collect()
}

/// What an engine that sets memory aside ahead of time reserves for `layer`'s own cache: `batch`
/// sequences of `context` tokens, each rounded up to whole pages of `page` tokens, with the parts
/// whose size depends on where a compression window stands (the open window, the last closed
/// block) at their largest. Unlike the exact figure this never shrinks as the context grows, so
/// a search for the largest context that fits can bisect it. In u128.
pub fn reserved_layer_bytes(
    layer: &LayerSpec,
    context: u64,
    page: u64,
    batch: u64,
    kv: KvDtype,
) -> u128 {
    let paged = context.div_ceil(page.max(1)).saturating_mul(page.max(1));
    parts_holding(layer, batch, kv, |r| match *r {
        Retention::Remainder { .. } | Retention::LastBlock { .. } => r.bound().unwrap_or(0) as u64,
        _ => r.entries(paged),
    })
    .into_iter()
    .map(|(_, b)| b)
    .sum()
}

/// What an estimator that knows GQA but not the layer's other tricks counts for `layer`: full
/// length K and V for its KV heads, a cache of its own even where it shares one, no window, no
/// compression, no K=V (vLLM before v0.21 counted every Gemma 4 layer this way). A linear-attention
/// layer counts its real state: estimators know it is not a growing cache. In u128.
pub fn window_and_sharing_blind_bytes(
    layer: &LayerSpec,
    context: u64,
    batch: u64,
    kv: KvDtype,
) -> u128 {
    if layer.attention == Attention::Linear {
        return part_bytes(layer, context, batch, kv)
            .into_iter()
            .map(|(_, b)| b)
            .sum();
    }
    kv.bytes(waterfall_elems(layer)[1] * context as u128 * batch as u128)
}

/// The naive per-layer figure and the waterfall stages; returns (naive, after GQA, after
/// sharing, after K=V), all in elements per token.
fn waterfall_elems(l: &LayerSpec) -> [u128; 4] {
    let (q, kv, hd, vd) = (
        l.q_heads as u128,
        l.kv_heads as u128,
        l.head_dim as u128,
        l.v_head_dim as u128,
    );
    let naive = q * (hd + vd);
    if l.attention == Attention::Linear {
        // Linear attention replaces the whole cache; no GQA, sharing or K=V step applies.
        return [naive; 4];
    }
    let gqa = kv * (hd + vd);
    let shared = if l.kv_source.is_some() { 0 } else { gqa };
    let keqv = if l.k_eq_v && l.kv_source.is_none() {
        kv * hd
    } else {
        shared
    };
    [naive, gqa, shared, keqv]
}

/// The budget of `spec` at `context` tokens; an error when a figure does not fit 63 bits.
pub fn compute(spec: &ArchSpec, context: u64, batch: u64, kv: KvDtype) -> Result<Budget> {
    let fits = |v: u128| checked(v, context, batch);
    let mut savings = std::collections::BTreeMap::<Trick, i128>::new();
    let mut layers = Vec::with_capacity(spec.layers.len());
    let (mut total, mut naive, mut flops) = (0u128, 0u128, 0u128);
    for l in &spec.layers {
        let parts = part_bytes(l, context, batch, kv);
        let bytes: u128 = parts.iter().map(|(_, b)| b).sum();
        let stage = waterfall_elems(l).map(|e| kv.bytes(e * context as u128 * batch as u128));
        let mut credit = |t: Trick, v: i128| {
            if v != 0 {
                *savings.entry(t).or_default() += v;
            }
        };
        let signed = |v: u128| v as i128; // < 2^100: products of u64s and small factors
        credit(Trick::GroupedKv, signed(stage[0]) - signed(stage[1]));
        credit(Trick::KvSharing, signed(stage[1]) - signed(stage[2]));
        credit(Trick::KEqV, signed(stage[2]) - signed(stage[3]));
        if let Some(t) = l.attention.trick() {
            if l.kv_source.is_none() {
                credit(t, signed(stage[3]) - signed(bytes));
            }
        }
        let layer_flops = l.attention_flops(context) * batch as u128;
        total += bytes;
        naive += stage[0];
        flops += layer_flops;
        layers.push(LayerBudget {
            index: l.index,
            attention: l.attention.label(),
            bytes: fits(bytes)?,
            parts: parts
                .into_iter()
                .map(|(n, b)| Ok((n, fits(b)?)))
                .collect::<Result<_>>()?,
            naive_bytes: fits(stage[0])?,
            kv_source: l.kv_source,
            q_per_kv: l.group_size(),
            attention_flops: fits(layer_flops)?,
        });
    }
    Ok(Budget {
        context,
        batch,
        kv_dtype: kv,
        total_bytes: fits(total)?,
        naive_bytes: fits(naive)?,
        savings: savings
            .into_iter()
            .map(|(trick, bytes)| {
                Ok(Saving {
                    trick,
                    label: trick.label(),
                    bytes: fits(bytes.unsigned_abs())? as i64 * bytes.signum() as i64,
                })
            })
            .collect::<Result<_>>()?,
        attention_flops: fits(flops)?,
        layers,
    })
}
