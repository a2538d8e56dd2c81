//! Causal self-attention with grouped KV heads, per-head RMS norms on q/k/v, K=V, sliding windows
//! and cross-layer KV sharing; the cache lives in the [`KvStore`], outside the layer.
//!
//! One forward of the model runs every layer over the same chunk of tokens; the layers share a
//! [`ForwardCtx`]: the KV store, the chunk's positions, the masks built so far, and what each
//! owning layer attended ([`AttendedKv`]). A layer whose `kv_source` is `j` computes no K/V: it
//! attends layer `j`'s keys and values from this same forward (the owner's view, cached tokens
//! then the chunk's), as the reference's `shared_kv_states` does.
//!
//! K=V layers (Gemma 4's full layers with `attention_k_eq_v`) project once: values are the
//! scale-less norm of `k_proj x`, keys are `rope(k_norm(k_proj x))`. Since `k_norm` is that same
//! normalisation times a weight, the store holds only the normalised projection (one tensor, so
//! its bytes equal `kv-budget`'s `K=V` part) and keys are derived from it on every read: scale by
//! the `k_norm` weight, rotate at the cached positions.
//!
//! Attention itself ([`attend_causal`]) groups query heads by KV head instead of copying K/V per
//! query head and takes the softmax in f32. It runs the queries in blocks sized so that one
//! block's scores stay under [`SCORE_BLOCK_ELEMS`], and each block reads only the keys it can see
//! (its causal end, its window's start) with a mask built for that block alone: a long prompt
//! never materialises an `[n, t]` score or mask tensor, and a sliding layer never scores keys
//! outside its window. [`attend`] is the plain one-shot formula it is tested against. On the CPU
//! in f32, decode steps and verify passes take [`crate::kernels::attention`] (a few rows, keys
//! split among threads) and prompt chunks, where the CPU has AVX2 or AVX-512, take
//! [`crate::kernels::flash_attention`] (online softmax over key blocks, no score tensor).
//!
//! Family options beyond [`AttentionOptions`] are builder calls on a loaded layer: QK norm without
//! the value norm ([`Attention::without_value_norm`]) and a gate on the merged heads before the
//! output projection ([`Attention::with_output_gate`], Laguna's softplus `g_proj`).

use super::kv_store::{causal_mask, KvStore};
use super::linear::{matmul_t, Linear, LinearGroup};
use super::norm::RmsNorm;
use super::output_gate::SoftplusOutputGate;
use super::rope::Rotary;
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

/// Keys and values one layer attended in this forward, ready for a layer that shares them.
#[derive(Debug, Clone)]
pub struct AttendedKv {
    /// `[b, kv_heads, t, head_dim]`, rotated.
    pub k: Tensor,
    /// `[b, kv_heads, t, v_head_dim]`.
    pub v: Tensor,
    /// Position of the first of the `t` tokens.
    pub start: usize,
}

/// State the layers of one forward share.
pub struct ForwardCtx<'a> {
    pub cache: &'a mut KvStore,
    /// Position of the first token of the chunk.
    pub pos: usize,
    /// Tokens in the chunk.
    pub len: usize,
    /// What each layer attended in this forward, by layer index (owners only).
    pub attended: Vec<Option<AttendedKv>>,
}

impl<'a> ForwardCtx<'a> {
    /// A chunk of `len` tokens at positions `cache.seen()..` for a model of `layers` layers.
    pub fn new(cache: &'a mut KvStore, len: usize, layers: usize) -> Self {
        let pos = cache.seen();
        ForwardCtx {
            cache,
            pos,
            len,
            attended: vec![None; layers],
        }
    }
}

/// Where a chunk's queries and its attended keys sit in the sequence, and the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CausalSpan {
    /// Position of the first query.
    pub q_start: usize,
    /// Position of the first key.
    pub k_start: usize,
    /// Sliding window: a query at `p` sees keys at `p - window + 1 ..= p`.
    pub window: Option<usize>,
}

/// Score elements (f32) one query block may hold: 4 Mi (16 MB), so a block's scores, mask and
/// probabilities stay within a few tens of MB whatever the context.
pub const SCORE_BLOCK_ELEMS: usize = 4 << 20;

/// Causal (windowed) attention of queries `q` `[b, hq, n, d]` over keys `k` `[b, hkv, t, d]` and
/// values `v` `[b, hkv, t, dv]` placed by `span`: `[b, hq, n, dv]` in q's dtype. Equal to
/// [`attend`] with the full [`causal_mask`], computed in query blocks that each read only the
/// keys they can see.
pub fn attend_causal(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    span: CausalSpan,
    scale: f64,
) -> Result<Tensor> {
    if let Some(y) = attend_on_cpu(q, k, v, span, scale)? {
        return Ok(y);
    }
    attend_in_blocks(q, k, v, span, scale, SCORE_BLOCK_ELEMS)
}

/// Query rows up to which [`attend_causal`] takes the few-rows CPU kernel (decode steps and
/// verify passes, keys split among threads); longer chunks take flash attention where the CPU
/// has it, else the blocked path.
const FEW_ROWS: usize = 16;

/// [`attend_causal`] through the CPU kernels for f32 rows: [`kernels::attention::attend_few`]
/// for a few query rows, [`kernels::flash_attention::attend_many`] for a prompt chunk; `None`
/// where neither applies (another device or dtype, a prompt chunk on a CPU without AVX2, a
/// layout whose rows are not contiguous).
fn attend_on_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    span: CausalSpan,
    scale: f64,
) -> Result<Option<Tensor>> {
    use crate::kernels::attention::{attend_few, Geometry, HeadRows};
    use crate::kernels::flash_attention;
    use candle_core::{CpuStorage, Storage};
    let (b, hq, n, _) = q.dims4()?;
    let (_, hkv, t, _) = k.dims4()?;
    let dv = v.dim(3)?;
    let per_row = n > 1 && crate::kernels::in_decode_steps();
    // A prompt chunk: flash attention where this CPU has it, else the blocked path.
    let many = n > FEW_ROWS && !per_row;
    if (many && !flash_attention::applies(dv))
        || !crate::kernels::fast_cpu(q.device())
        || [q, k, v].iter().any(|x| x.dtype() != DType::F32)
    {
        return Ok(None);
    }
    let q = q.contiguous()?;
    let qs = q.flatten_all()?.to_vec1::<f32>()?;
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(kd)), Storage::Cpu(CpuStorage::F32(vd))) = (&*ks, &*vs)
    else {
        return Ok(None);
    };
    // Rows contiguous: `[.., .., t, width]` with unit stride and row stride `width`.
    fn view<'a>(data: &'a [f32], l: &candle_core::Layout, width: usize) -> Option<HeadRows<'a>> {
        let (s, t) = (l.stride(), l.dims()[2]);
        (s[3] == 1 && (s[2] == width || t == 1)).then_some(HeadRows {
            data,
            offset: l.start_offset(),
            batch_stride: s[0],
            head_stride: s[1],
            width,
        })
    }
    let (Some(kr), Some(vr)) = (view(kd, kl, k.dim(3)?), view(vd, vl, dv)) else {
        return Ok(None);
    };
    let geo = Geometry {
        batch: b,
        q_heads: hq,
        kv_heads: hkv,
        rows: n,
        keys: t,
        q_start: span.q_start,
        k_start: span.k_start,
        window: span.window,
        scale: scale as f32,
    };
    let mut out = vec![0f32; b * hq * n * dv]; // [b, hq, n, dv]
    if per_row {
        // A verify pass: each row on its own, as the decode step at its position computes it
        // (how a call splits its keys among threads depends on all its rows), so the rows a
        // verify pass keeps are a decode step's, bit for bit.
        let (d, heads) = (qs.len() / (b * hq * n), b * hq);
        let (mut q1, mut o1) = (vec![0f32; heads * d], vec![0f32; heads * dv]); // [b, hq, 1, ·]
        for i in 0..n {
            for h in 0..heads {
                q1[h * d..][..d].copy_from_slice(&qs[(h * n + i) * d..][..d]);
            }
            let one = Geometry {
                rows: 1,
                q_start: geo.q_start + i,
                ..geo
            };
            attend_few(&one, &q1, kr, vr, &mut o1)?;
            for h in 0..heads {
                out[(h * n + i) * dv..][..dv].copy_from_slice(&o1[h * dv..][..dv]);
            }
        }
    } else if many {
        flash_attention::attend_many(&geo, &qs, kr, vr, &mut out)?;
    } else {
        attend_few(&geo, &qs, kr, vr, &mut out)?;
    }
    Ok(Some(Tensor::from_vec(out, (b, hq, n, dv), q.device())?))
}

/// [`attend_causal`] with blocks of at most `budget` score elements (at least one query row).
fn attend_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    span: CausalSpan,
    scale: f64,
    budget: usize,
) -> Result<Tensor> {
    let (b, hq, n, _) = q.dims4()?;
    let t = k.dim(2)?;
    let CausalSpan {
        q_start,
        k_start,
        window,
    } = span;
    if n == 0 {
        return attend(q, k, v, None, scale);
    }
    // Rows per block: the scores of a block over every key fit the budget.
    let rows = (budget / (b * hq * t.max(1))).clamp(1, n);
    let mut blocks = Vec::with_capacity(n.div_ceil(rows));
    for i0 in (0..n).step_by(rows) {
        let m = rows.min(n - i0);
        // Positions of the block's first and last query, and the keys either can see.
        let (p0, p1) = (q_start + i0, q_start + i0 + m - 1);
        let first = window.map_or(0, |w| (p0 + 1).saturating_sub(w));
        let lo = first.saturating_sub(k_start).min(t);
        let hi = (p1 + 1).saturating_sub(k_start).min(t);
        if hi <= lo {
            bail!(
                "internal: queries at {p0}..={p1} see none of the keys at {k_start}..{}",
                k_start + t
            );
        }
        let (kb, vb) = (k.narrow(2, lo, hi - lo)?, v.narrow(2, lo, hi - lo)?);
        // No mask when every query sees every key of the block.
        let all_visible = k_start + hi - 1 <= p0 && window.is_none_or(|w| p1 - (k_start + lo) < w);
        let mask = if all_visible {
            None
        } else {
            Some(causal_mask(
                m,
                p0,
                k_start + lo,
                hi - lo,
                window,
                q.device(),
            )?)
        };
        blocks.push(attend(
            &q.narrow(2, i0, m)?,
            &kb,
            &vb,
            mask.as_ref(),
            scale,
        )?);
    }
    Ok(if blocks.len() == 1 {
        blocks.pop().expect("one block")
    } else {
        Tensor::cat(&blocks, 2)?
    })
}

/// `softmax(q·kᵀ·scale + mask)·v` with `hq / hkv` query heads per KV head.
/// q `[b, hq, n, d]`, k `[b, hkv, t, d]`, v `[b, hkv, t, dv]`, mask `[n, t]` (f32, additive);
/// returns `[b, hq, n, dv]` in q's dtype.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, hq, n, d) = q.dims4()?;
    let (_, hkv, t, _) = k.dims4()?;
    let dv = v.dim(3)?;
    if hkv == 0 || hq % hkv != 0 {
        bail!("internal: {hq} query heads over {hkv} KV heads");
    }
    let g = hq / hkv;
    let dtype = q.dtype();
    // Query heads h·g..(h+1)·g read KV head h: fold them into the row dimension.
    let q = q.contiguous()?.reshape((b, hkv, g * n, d))?;
    // On CUDA, a decode step's few rows over a window or a short context: one kernel.
    if let Some(y) = crate::kernels::fused::attention(&q, k, v, mask, n, scale)? {
        return Ok(y.reshape((b, hq, n, dv))?);
    }
    let scores = scores_qkt(&q, k)?.reshape((b, hkv, g, n, t))?; // in q's dtype
    let p = match crate::kernels::fused::softmax(&scores, scale, mask)? {
        Some(p) => p,
        None => {
            // Narrow types are scaled in their own dtype, then the softmax runs in f32.
            let (scores, scale) = match (dtype, scale) {
                (DType::F32, _) => (scores, scale),
                (_, 1.0) => (scores.to_dtype(DType::F32)?, 1.0), // (Gemma 4: no op to scale by 1)
                _ => ((scores * scale)?.to_dtype(DType::F32)?, 1.0),
            };
            crate::kernels::gelu::scaled_masked_softmax(&scores, scale, mask)?.to_dtype(dtype)?
        }
    }
    .reshape((b, hkv, g * n, t))?;
    let y = probs_times_values(&p, v)?; // [b, hkv, g·n, dv]
    Ok(y.reshape((b, hq, n, dv))?)
}

/// `q · kᵀ` per batch and KV head: q `[b, hkv, m, d]`, k `[b, hkv, t, d]` → `[b, hkv, m, t]`. On the
/// CPU in f32 each head's product goes through the weight kernels ([`matmul_t`]: the keys are the
/// "weight" rows, read once by a parallel gemv or GEMM), which at long contexts is several times
/// candle's batched matmul for these shapes (a few query rows against thousands of keys).
fn scores_qkt(q: &Tensor, k: &Tensor) -> Result<Tensor> {
    let (b, hkv, m, _) = q.dims4()?;
    let t = k.dim(2)?;
    if !(crate::kernels::fast_cpu(q.device()) && q.dtype() == DType::F32 && k.dtype() == DType::F32)
    {
        return Ok(q.matmul(&gemm_ready(k)?.t()?)?);
    }
    let mut heads = Vec::with_capacity(b * hkv);
    for bi in 0..b {
        for h in 0..hkv {
            heads.push(matmul_t(&q.get(bi)?.get(h)?, &k.get(bi)?.get(h)?)?); // [m, t]
        }
    }
    Ok(Tensor::stack(&heads, 0)?.reshape((b, hkv, m, t))?)
}

/// `p · v` per batch and KV head: p `[b, hkv, m, t]`, v `[b, hkv, t, dv]` → `[b, hkv, m, dv]`.
/// Values that are the first rows of the KV store's growing buffer are not contiguous across
/// heads; each head's rows are, so they are multiplied where they lie instead of copied.
fn probs_times_values(p: &Tensor, v: &Tensor) -> Result<Tensor> {
    if v.is_contiguous() {
        return Ok(p.matmul(v)?);
    }
    if !v.device().is_cpu() {
        // cuBLAS takes the heads as strided batches in place: one product, not one per head.
        return Ok(p.matmul(&gemm_ready(v)?)?);
    }
    let (b, hkv, m, _) = p.dims4()?;
    let dv = v.dim(3)?;
    let mut heads = Vec::with_capacity(b * hkv);
    for bi in 0..b {
        for h in 0..hkv {
            heads.push(p.get(bi)?.get(h)?.matmul(&v.get(bi)?.get(h)?)?); // [m, dv]
        }
    }
    Ok(Tensor::stack(&heads, 0)?.reshape((b, hkv, m, dv))?)
}

/// `t` `[b, h, rows, cols]` as a GPU's batched product takes it (candle's cuBLAS call): rows
/// dense (unit column stride, row stride `cols`), batches strided as they lie; otherwise a
/// contiguous copy (keys a window or a view left interleaved across heads).
fn gemm_ready(t: &Tensor) -> Result<Tensor> {
    let s = t.stride();
    Ok(if s[3] == 1 && s[2] == t.dim(3)? {
        t.clone()
    } else {
        t.contiguous()?
    })
}

/// The shape of one softmax attention layer as this block needs it; families make it from their
/// per-layer table (`arch::blocks`), so this file knows no model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionGeometry {
    pub layer: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    /// Of keys and values alike.
    pub head_dim: usize,
    /// Sliding window (the current token included); `None`: full causal attention.
    pub window: Option<usize>,
    /// KV sharing: the earlier layer whose cache this one reads (it computes no k/v).
    pub kv_source: Option<usize>,
    /// The values are the keys (no `v_proj`).
    pub k_eq_v: bool,
}

/// Options the family decides, beyond the per-layer table.
#[derive(Debug, Clone)]
pub struct AttentionOptions {
    /// Biases on q/k/v/o.
    pub bias: bool,
    /// RMS norms on q and k heads (with a scale) and v heads (without).
    pub qkv_norms: bool,
    pub eps: f64,
    /// Multiplies q·kᵀ (Gemma 4: 1.0, the q/k norms set the scale).
    pub scale: f64,
}

/// One attention layer.
#[derive(Debug)]
pub struct Attention {
    layer: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
    kv_source: Option<usize>,
    k_eq_v: bool,
    scale: f64,
    /// `q_proj`, then (owners of their KV) `k_proj` and, unless K=V, `v_proj`.
    qkv: LinearGroup,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    v_norm: Option<RmsNorm>,
    rope: Arc<Rotary>,
    /// Multiplies the merged heads before `o_proj`.
    output_gate: Option<SoftplusOutputGate>,
}

impl Attention {
    /// Build layer `g.layer` from `vb` (positioned at its `self_attn`). A KV-sharing layer
    /// reads no k/v projections or norms, even when the checkpoint carries them.
    pub fn load(
        vb: &VarBuilder,
        g: &AttentionGeometry,
        hidden: usize,
        rope: Arc<Rotary>,
        opts: &AttentionOptions,
    ) -> Result<Self> {
        let (hq, hkv, d) = (g.q_heads, g.kv_heads, g.head_dim);
        if rope.head_dim() != d {
            bail!(
                "internal: layer {}: RoPE for heads of {}",
                g.layer,
                rope.head_dim()
            );
        }
        let owns = g.kv_source.is_none();
        let norm = |name: &str| -> Result<Option<RmsNorm>> {
            Ok(if opts.qkv_norms {
                Some(RmsNorm::load(&vb.pp(name), d, opts.eps)?)
            } else {
                None
            })
        };
        Ok(Attention {
            layer: g.layer,
            q_heads: hq,
            kv_heads: hkv,
            head_dim: d,
            window: g.window,
            kv_source: g.kv_source,
            k_eq_v: g.k_eq_v,
            scale: opts.scale,
            qkv: {
                let mut p = vec![Linear::load(&vb.pp("q_proj"), hidden, hq * d, opts.bias)?];
                if owns {
                    p.push(Linear::load(&vb.pp("k_proj"), hidden, hkv * d, opts.bias)?);
                    if !g.k_eq_v {
                        p.push(Linear::load(&vb.pp("v_proj"), hidden, hkv * d, opts.bias)?);
                    }
                }
                LinearGroup::new(p)?
            },
            o_proj: Linear::load(&vb.pp("o_proj"), hq * d, hidden, opts.bias)?,
            q_norm: norm("q_norm")?,
            k_norm: if owns { norm("k_norm")? } else { None },
            v_norm: (owns && opts.qkv_norms).then(|| RmsNorm::plain(opts.eps)),
            rope,
            output_gate: None,
        })
    }

    /// QK norm only: values are not normalised (Laguna, most QK-norm models).
    pub fn without_value_norm(mut self) -> Self {
        self.v_norm = None;
        self
    }

    /// Gate the merged heads with `gate(x)` before the output projection.
    pub fn with_output_gate(mut self, gate: SoftplusOutputGate) -> Self {
        self.output_gate = Some(gate);
        self
    }

    /// x `[b, n, hidden]` → `[b, n, hidden]`; appends this layer's K/V to the store (owners).
    pub fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let (hq, d) = (self.q_heads, self.head_dim);

        // 1. Projections: the queries, and a layer's own keys (and values), in one pass.
        let mut projected = self.qkv.forward(x)?.into_iter();
        let mut next = || projected.next().expect("one output per projection");

        // 2. Queries: norm per head, rotate. [b, hq, n, d]
        let q = self.norm_rope(&self.q_norm, &next().reshape((b, n, hq, d))?, ctx.pos)?;

        // 3. Keys and values: own (appended to the store), or the owner's from this forward.
        let kv = match self.kv_source {
            Some(j) => ctx.attended.get(j).cloned().flatten().ok_or_else(|| {
                anyhow!(
                    "internal: layer {} reads layer {j}'s KV, which has not run in this forward",
                    self.layer
                )
            })?,
            None => {
                let k = next();
                let v = (!self.k_eq_v).then(&mut next);
                let kv = self.own_kv(k, v, ctx)?;
                if let Some(slot) = ctx.attended.get_mut(self.layer) {
                    *slot = Some(kv.clone());
                }
                kv
            }
        };

        // 4. Attend causally (in query blocks), merge heads, gate (if any), project out.
        let span = CausalSpan {
            q_start: ctx.pos,
            k_start: kv.start,
            window: self.window,
        };
        let y = attend_causal(&q, &kv.k, &kv.v, span, self.scale)?; // [b, hq, n, d]
        let y = y.transpose(1, 2)?.reshape((b, n, hq * d))?;
        let y = match &self.output_gate {
            Some(g) => g.forward(x, &y)?,
            None => y,
        };
        self.o_proj.forward(&y)
    }

    /// `rope(norm(x))` at positions from `start`, the heads moved before the positions: x
    /// `[b, n, h, d]` → `[b, h, n, d]`; one kernel on CUDA ([`crate::kernels::fused::norm_rope`]).
    fn norm_rope(&self, norm: &Option<RmsNorm>, x: &Tensor, start: usize) -> Result<Tensor> {
        if x.device().is_cuda() {
            let scale = match norm {
                None => Some(None),
                Some(n) => n.fused_scale(x)?.map(Some),
            };
            if let Some(scale) = scale {
                let (cos, sin) = self.rope.cos_sin(start, x.dim(1)?, x.dtype())?;
                let r = self.rope.rotary_dim();
                if let Some(y) = crate::kernels::fused::norm_rope(x, scale, &cos, &sin, r)? {
                    return Ok(y);
                }
            }
        }
        let x = norm_opt(norm, x)?.transpose(1, 2)?.contiguous()?;
        self.rope.apply(&x, start)
    }

    /// Store this chunk's projected keys `k` and values `v` (`[b, n, hkv·d]`; none for K=V) and
    /// return everything the chunk attends.
    fn own_kv(&self, k: Tensor, v: Option<Tensor>, ctx: &mut ForwardCtx) -> Result<AttendedKv> {
        let (b, n, _) = k.dims3()?;
        let (hkv, d) = (self.kv_heads, self.head_dim);
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n, hkv, d))?.transpose(1, 2)?.contiguous()?) // [b, hkv, n, d]
        };
        if self.k_eq_v {
            let k = heads(k)?;
            // Store the normalised projection once; values are it, keys derive from it.
            let kv = norm_opt(&self.v_norm, &k)?;
            let view = ctx.cache.append(self.layer, kv, None)?;
            let v = view.k; // [b, hkv, t, d]
            let k = match self.k_norm.as_ref().and_then(|n| n.weight()) {
                Some(w) => v
                    .to_dtype(DType::F32)?
                    .broadcast_mul(w)?
                    .to_dtype(v.dtype())?,
                None => v.clone(),
            };
            let k = self.rope.apply(&k, view.start)?;
            return Ok(AttendedKv {
                k,
                v,
                start: view.start,
            });
        }
        let v = v.ok_or_else(|| anyhow!("internal: layer {} projected no values", self.layer))?;
        let v = norm_opt(&self.v_norm, &heads(v)?)?;
        let k = self.norm_rope(&self.k_norm, &k.reshape((b, n, hkv, d))?, ctx.pos)?;
        let view = ctx.cache.append(self.layer, k, Some(v))?;
        let v = view
            .v
            .ok_or_else(|| anyhow!("internal: layer {} stored no values", self.layer))?;
        Ok(AttendedKv {
            k: view.k,
            v,
            start: view.start,
        })
    }
}

fn norm_opt(n: &Option<RmsNorm>, x: &Tensor) -> Result<Tensor> {
    match n {
        Some(n) => n.forward(x),
        None => Ok(x.clone()),
    }
}

/// Queries per block in [`attend_shared_kv_with_sinks`]: bounds the scores of a long prompt.
const QUERY_BLOCK: usize = 256;

/// Attention over one shared KV head whose keys are also its values (K=V MQA), with one learned
/// sink logit per head in each softmax (DeepSeek V4, gpt-oss): `softmax([q·kᵀ·scale + mask,
/// sink_h])` without the sink's column, times the keys. q `[h, n, d]`, kv `[t, d]`, mask
/// `[n, t]` (f32, additive), sinks `[h]` (f32) → `[h, n, d]` in q's dtype. The softmax runs in
/// f32; queries go in blocks of [`QUERY_BLOCK`] so a long prompt's scores stay small.
pub fn attend_shared_kv_with_sinks(
    q: &Tensor,
    kv: &Tensor,
    mask: &Tensor,
    sinks: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (h, n, d) = q.dims3()?;
    let t = kv.dim(0)?;
    let dtype = q.dtype();
    let kv_t = kv.t()?; // [d, t]
    let mut blocks = vec![];
    for start in (0..n).step_by(QUERY_BLOCK) {
        let m = QUERY_BLOCK.min(n - start);
        let qb = q.narrow(1, start, m)?.contiguous()?.reshape((h * m, d))?;
        let scores = (qb.matmul(&kv_t)?.to_dtype(DType::F32)? * scale)?
            .reshape((h, m, t))?
            .broadcast_add(&mask.narrow(0, start, m)?)?; // [h, m, t]
        let sink = sinks.reshape((h, 1, 1))?.broadcast_as((h, m, 1))?;
        let logits = Tensor::cat(&[&scores, &sink], 2)?.contiguous()?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?
            .narrow(2, 0, t)? // the sink's share is dropped
            .to_dtype(dtype)?;
        blocks.push(probs.reshape((h * m, t))?.matmul(kv)?.reshape((h, m, d))?);
    }
    Ok(Tensor::cat(&blocks, 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Sink attention, queries in blocks, equals the formula computed element by element.
    #[test]
    fn sink_attention_matches_the_formula() {
        let dev = Device::Cpu;
        let (h, n, t, d) = (2, QUERY_BLOCK + 44, QUERY_BLOCK + 50, 4);
        let q = Tensor::randn(0f32, 1.0, (h, n, d), &dev).unwrap();
        let kv = Tensor::randn(0f32, 1.0, (t, d), &dev).unwrap();
        let sinks = Tensor::new(&[0.5f32, -1.0], &dev).unwrap();
        let mask = causal_mask(n, t - n, 0, t, Some(7), &dev).unwrap();
        let y: Vec<Vec<Vec<f32>>> = attend_shared_kv_with_sinks(&q, &kv, &mask, &sinks, 0.5)
            .unwrap()
            .to_vec3()
            .unwrap();
        let (qv, kvv): (Vec<Vec<Vec<f32>>>, Vec<Vec<f32>>) =
            (q.to_vec3().unwrap(), kv.to_vec2().unwrap());
        let (mv, sv): (Vec<Vec<f32>>, Vec<f32>) =
            (mask.to_vec2().unwrap(), sinks.to_vec1().unwrap());
        let mut worst = 0f32;
        for a in 0..h {
            for i in 0..n {
                let logits: Vec<f32> = (0..t)
                    .map(|j| {
                        let dot: f32 = (0..d).map(|c| qv[a][i][c] * kvv[j][c]).sum();
                        dot * 0.5 + mv[i][j]
                    })
                    .collect();
                let max = logits.iter().copied().fold(sv[a], f32::max);
                let den: f32 =
                    logits.iter().map(|l| (l - max).exp()).sum::<f32>() + (sv[a] - max).exp();
                for c in 0..d {
                    let want: f32 = (0..t)
                        .map(|j| (logits[j] - max).exp() / den * kvv[j][c])
                        .sum();
                    worst = worst.max((want - y[a][i][c]).abs());
                }
            }
        }
        assert!(worst < 1e-5, "{worst}");
    }

    /// Blocked causal attention equals the one-shot formula with the full mask: queries in one
    /// block or many, windows narrower and wider than a block, keys starting before the queries
    /// (a cache) and a window that has already dropped old keys.
    #[test]
    fn blocked_causal_attention_equals_the_full_mask() {
        let dev = Device::Cpu;
        // (n queries, cached keys before them, window)
        for &(n, cached, window) in &[
            (1, 0, None),
            (1, 9, None),
            (1, 9, Some(4)),
            (7, 0, None),
            (13, 5, None),
            (13, 5, Some(3)),
            (13, 5, Some(6)),
            (40, 3, Some(9)),
            (40, 0, Some(64)),
        ] {
            let t = n + cached;
            let q = Tensor::randn(0f32, 1.0, (1, 4, n, 8), &dev).unwrap();
            // The first rows of longer buffers, as the KV store's full layers hand them out.
            let k = Tensor::randn(0f32, 1.0, (1, 2, t + 3, 8), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (1, 2, t + 3, 6), &dev).unwrap();
            let (k, v) = (k.narrow(2, 0, t).unwrap(), v.narrow(2, 0, t).unwrap());
            // Keys from position 100 on, queries after the cached ones.
            let k_start = 100;
            let span = CausalSpan {
                q_start: k_start + cached,
                k_start,
                window,
            };
            let mask = causal_mask(n, span.q_start, k_start, t, window, &dev).unwrap();
            let want = attend(&q, &k, &v, Some(&mask), 0.3).unwrap();
            // `None`: attend_causal itself (the CPU kernels: few rows, flash attention).
            for budget in [
                None,
                Some(1),
                Some(4 * 2 * t),
                Some(4 * 5 * t),
                Some(usize::MAX / 2),
            ] {
                let got = match budget {
                    Some(budget) => attend_in_blocks(&q, &k, &v, span, 0.3, budget),
                    None => attend_causal(&q, &k, &v, span, 0.3),
                }
                .unwrap();
                assert_eq!(got.dims(), &[1, 4, n, 6]);
                let diff = crate::layers::max_abs_diff(&got, &want);
                assert!(
                    diff < 1e-5,
                    "n {n}, cached {cached}, window {window:?}, budget {budget:?}: {diff}"
                );
            }
        }
    }

    /// Grouped attention equals plain attention with K/V repeated per query head.
    #[test]
    fn grouped_heads_match_repeated_kv() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 4, 3, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev).unwrap();
        let mask = causal_mask(3, 2, 0, 5, Some(3), &dev).unwrap();
        let y = attend(&q, &k, &v, Some(&mask), 0.5).unwrap();
        for h in 0..4 {
            let qh = q.narrow(1, h, 1).unwrap();
            let kh = k.narrow(1, h / 2, 1).unwrap();
            let vh = v.narrow(1, h / 2, 1).unwrap();
            let s = (qh.matmul(&kh.t().unwrap()).unwrap() * 0.5)
                .unwrap()
                .broadcast_add(&mask)
                .unwrap();
            let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
            let want = p.matmul(&vh).unwrap();
            let got = y.narrow(1, h, 1).unwrap();
            let diff: f32 = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff < 1e-5, "head {h}: {diff}");
        }
    }
}
