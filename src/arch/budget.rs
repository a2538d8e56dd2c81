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

use super::{ArchSpec, Attention, LayerSpec, PartDtype, Trick};
use serde::Serialize;

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
    pub fn bytes(self, elems: u64) -> u64 {
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

/// Bytes of `layer`'s own cache at `context` tokens.
pub fn layer_bytes(layer: &LayerSpec, context: u64, batch: u64, kv: KvDtype) -> Vec<(String, u64)> {
    layer
        .cache
        .iter()
        .map(|p| {
            let elems = p.retention.entries(context) * p.elems_per_entry * batch;
            let bytes = match p.dtype {
                PartDtype::Kv => kv.bytes(elems),
                PartDtype::F32 => elems * 4,
            };
            (p.name.to_string(), bytes)
        })
        .collect()
}

/// The naive per-layer figure and the waterfall stages; returns (naive, after GQA, after
/// sharing, after K=V), all in elements per token.
fn waterfall_elems(l: &LayerSpec) -> [u64; 4] {
    let naive = (l.q_heads * (l.head_dim + l.v_head_dim)) as u64;
    if l.attention == Attention::Linear {
        // Linear attention replaces the whole cache; no GQA, sharing or K=V step applies.
        return [naive; 4];
    }
    let gqa = (l.kv_heads * (l.head_dim + l.v_head_dim)) as u64;
    let shared = if l.kv_source.is_some() { 0 } else { gqa };
    let keqv = if l.k_eq_v && l.kv_source.is_none() {
        (l.kv_heads * l.head_dim) as u64
    } else {
        shared
    };
    [naive, gqa, shared, keqv]
}

pub fn compute(spec: &ArchSpec, context: u64, batch: u64, kv: KvDtype) -> Budget {
    let mut savings = std::collections::BTreeMap::<Trick, i64>::new();
    let mut layers = Vec::with_capacity(spec.layers.len());
    for l in &spec.layers {
        let parts = layer_bytes(l, context, batch, kv);
        let bytes: u64 = parts.iter().map(|(_, b)| b).sum();
        let stage = waterfall_elems(l).map(|e| kv.bytes(e * context * batch) as i64);
        let mut credit = |t: Trick, v: i64| {
            if v != 0 {
                *savings.entry(t).or_default() += v;
            }
        };
        credit(Trick::GroupedKv, stage[0] - stage[1]);
        credit(Trick::KvSharing, stage[1] - stage[2]);
        credit(Trick::KEqV, stage[2] - stage[3]);
        if let Some(t) = l.attention.trick() {
            if l.kv_source.is_none() {
                credit(t, stage[3] - bytes as i64);
            }
        }
        layers.push(LayerBudget {
            index: l.index,
            attention: l.attention.label(),
            bytes,
            parts,
            naive_bytes: stage[0] as u64,
            kv_source: l.kv_source,
            q_per_kv: l.group_size(),
            attention_flops: l.attention_flops(context) * batch,
        });
    }
    Budget {
        context,
        batch,
        kv_dtype: kv,
        total_bytes: layers.iter().map(|l| l.bytes).sum(),
        naive_bytes: layers.iter().map(|l| l.naive_bytes).sum(),
        savings: savings
            .into_iter()
            .map(|(trick, bytes)| Saving {
                trick,
                label: trick.label(),
                bytes,
            })
            .collect(),
        attention_flops: layers.iter().map(|l| l.attention_flops).sum(),
        layers,
    }
}
