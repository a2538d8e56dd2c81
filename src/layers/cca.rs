//! Compressed Convolutional Attention (CCA, ZAYA; arXiv 2510.04476): softmax attention whose
//! q/k/v come from a convolutional projection with carried state. Reference: transformers 5.23.0
//! `models/zaya/modeling_zaya.py` (`ZayaCCAProjection`, `ZayaQKNorm`, `ZayaAttention`).
//!
//! Per chunk of tokens x `[b, n, hidden]`:
//! 1. `q = q_proj x` (`heads × d`), `k = k_proj x` (`kv_heads × d`);
//! 2. residual paths: `q_res = (q + k repeated per query head) / 2` per head, and `k_res` = the
//!    mean of `q_res` over each KV head's query group;
//! 3. `[q, k]` (`(heads + kv_heads) × d` channels) mixed along time by a depthwise causal conv
//!    (kernel `cca_time0`) then a per-head grouped one (kernel `cca_time1`), see
//!    [`super::causal_conv`]; the last `(t0 − 1) + (t1 − 1)` input rows are the **conv state**;
//!    `q = conv(..)[q part] + q_res`, `k = conv(..)[k part] + k_res`;
//! 4. values: `[v_proj_current x_t, v_proj_delayed x_{t−1}]` (each `kv_heads × d / 2`, the
//!    concatenation viewed as `kv_heads` heads of `d`); before the first token the delayed half
//!    is `v_proj_delayed 0` (its bias); the last token's `v_proj_delayed x` is the **delayed-V
//!    state**;
//! 5. QK norm: q and k L2-normalised to length `√d` (norm clamped at the dtype's epsilon), keys
//!    then times a learned per-KV-head temperature `temp`;
//! 6. RoPE of the layer's type (leading dims), keys and values into the [`KvStore`], causal
//!    (or sliding-window) softmax attention scaled by `d^-½`, `o_proj`.
//!
//! The store holds exactly K, V (`kv_heads × d` each per token) and the two fixed states, so its
//! measured bytes equal `kv-budget`'s.

use super::attention::{attend_causal, CausalSpan, ForwardCtx};
use super::causal_conv::{CausalConvStack, ValidConv1d};
use super::kv_store::KvStore;
use super::linear::Linear;
use super::rope::Rotary;
use super::weight;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;
use std::sync::Arc;

/// Name of the carried conv input rows in the [`KvStore`] (`[b, C, history]`).
pub const CONV_STATE: &str = "conv state";
/// Name of the previous token's delayed value projection in the [`KvStore`] (`[b, kv·d/2]`).
pub const DELAYED_V_STATE: &str = "delayed V state";

/// Shape of one CCA layer.
#[derive(Debug, Clone, Copy)]
pub struct CcaShape {
    pub hidden: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Depthwise kernel (`cca_time0`).
    pub time0: usize,
    /// Grouped kernel (`cca_time1`).
    pub time1: usize,
    /// Biases on the linear projections.
    pub bias: bool,
    /// `Some(w)`: attend to the last `w` tokens only.
    pub window: Option<usize>,
}

/// q, k, v of a chunk, before QK norm and RoPE.
struct Qkv {
    /// `[b, n, hq, d]`.
    q: Tensor,
    /// `[b, n, hkv, d]`.
    k: Tensor,
    /// `[b, n, hkv, d]`.
    v: Tensor,
}

/// One CCA attention layer.
#[derive(Debug)]
pub struct CcaAttention {
    layer: usize,
    shape: CcaShape,
    q_proj: Linear,
    k_proj: Linear,
    v_proj_current: Linear,
    v_proj_delayed: Linear,
    conv: CausalConvStack,
    o_proj: Linear,
    /// `[1, 1, hkv, 1]` in f32.
    temp: Tensor,
    rope: Arc<Rotary>,
}

impl CcaAttention {
    /// Layer `layer` from `vb` positioned at its `self_attn` (projections under `qkv_proj`,
    /// `qk_norm.temp`, `o_proj`).
    pub fn load(vb: &VarBuilder, layer: usize, shape: CcaShape, rope: Arc<Rotary>) -> Result<Self> {
        let CcaShape {
            hidden,
            q_heads: hq,
            kv_heads: hkv,
            head_dim: d,
            ..
        } = shape;
        if hkv == 0 || hq % hkv != 0 || (hkv * d) % 2 != 0 {
            bail!("layer {layer}: CCA with {hq} query heads over {hkv} KV heads of {d}");
        }
        if rope.head_dim() != d {
            bail!(
                "internal: layer {layer}: RoPE for heads of {}",
                rope.head_dim()
            );
        }
        let p = vb.pp("qkv_proj");
        let channels = (hq + hkv) * d;
        let conv = CausalConvStack::new(
            channels,
            vec![
                ValidConv1d::load(&p.pp("conv_qk_depthwise"), channels, channels, shape.time0)?,
                ValidConv1d::load(&p.pp("conv_qk_grouped"), channels, hq + hkv, shape.time1)?,
            ],
        )?;
        let half = hkv * d / 2;
        let temp = weight::get(&vb.pp("qk_norm"), hkv, "temp")?
            .to_dtype(DType::F32)?
            .reshape((1, 1, hkv, 1))?;
        Ok(CcaAttention {
            layer,
            shape,
            q_proj: Linear::load(&p.pp("q_proj"), hidden, hq * d, shape.bias)?,
            k_proj: Linear::load(&p.pp("k_proj"), hidden, hkv * d, shape.bias)?,
            v_proj_current: Linear::load(&p.pp("v_proj_current"), hidden, half, shape.bias)?,
            v_proj_delayed: Linear::load(&p.pp("v_proj_delayed"), hidden, half, shape.bias)?,
            conv,
            o_proj: Linear::load(&vb.pp("o_proj"), hq * d, hidden, shape.bias)?,
            temp,
            rope,
        })
    }

    /// x `[b, n, hidden]` → `[b, n, hidden]`; updates this layer's K/V and states in the store.
    pub fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let (hq, d) = (self.shape.q_heads, self.shape.head_dim);

        // 1-4. The convolutional projection, with the states carried in the store.
        let Qkv { q, k, v } = self.project(x, ctx.cache)?;

        // 5. QK norm, heads first. [b, h, n, d]
        let q = l2_to_sqrt_dim(&q)?;
        let k = l2_to_sqrt_dim(&k)?;
        let k = k
            .to_dtype(DType::F32)?
            .broadcast_mul(&self.temp)?
            .to_dtype(x.dtype())?;
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;

        // 6. RoPE, cache, attention.
        let q = self.rope.apply(&q, ctx.pos)?;
        let k = self.rope.apply(&k, ctx.pos)?;
        let view = ctx.cache.append(self.layer, k, Some(v))?;
        let vv = view
            .v
            .ok_or_else(|| anyhow::anyhow!("internal: layer {} stored no values", self.layer))?;
        let span = CausalSpan {
            q_start: ctx.pos,
            k_start: view.start,
            window: self.shape.window,
        };
        let scale = (d as f64).powf(-0.5);
        let y = attend_causal(&q, &view.k, &vv, span, scale)?; // [b, hq, n, d]
        let y = y.transpose(1, 2)?.reshape((b, n, hq * d))?;
        self.o_proj.forward(&y)
    }

    /// Steps 1-4: q `[b, n, hq, d]`, k and v `[b, n, hkv, d]`; stores the new states.
    fn project(&self, x: &Tensor, cache: &mut KvStore) -> Result<Qkv> {
        let (b, n, hidden) = x.dims3()?;
        let (hq, hkv, d) = (self.shape.q_heads, self.shape.kv_heads, self.shape.head_dim);
        let g = hq / hkv;
        let (conv_state, v_state) = {
            let l = cache.layer_mut(self.layer)?;
            (
                l.state(CONV_STATE).cloned(),
                l.state(DELAYED_V_STATE).cloned(),
            )
        };

        // 1. Projections.
        let pq = self.q_proj.forward(x)?; // [b, n, hq·d]
        let pk = self.k_proj.forward(x)?; // [b, n, hkv·d]

        // 2. Residual paths: each query head averaged with its KV head, keys the group mean.
        let q4 = pq.reshape((b, n, hkv, g, d))?;
        let k4 = pk.reshape((b, n, hkv, 1, d))?;
        let q_res = (q4.broadcast_add(&k4)? * 0.5)?; // [b, n, hkv, g, d]
        let k_res = q_res.mean(3)?; // [b, n, hkv, d]
        let q_res = q_res.reshape((b, n, hq, d))?;

        // 3. Causal convs over [q, k] with the carried rows.
        let qk = Tensor::cat(&[&pq, &pk], 2)?; // [b, n, (hq + hkv)·d]
        let (mixed, new_conv) = self.conv.forward(&qk, conv_state.as_ref())?;
        let q = (mixed.narrow(2, 0, hq * d)?.reshape((b, n, hq, d))? + q_res)?;
        let k = (mixed.narrow(2, hq * d, hkv * d)?.reshape((b, n, hkv, d))? + k_res)?;

        // 4. Values: current half, and the previous token's delayed half.
        let half = hkv * d / 2;
        let current = self.v_proj_current.forward(x)?; // [b, n, half]
        let delayed = self.v_proj_delayed.forward(x)?; // [b, n, half]
        let prev = match v_state {
            Some(s) => s.reshape((b, 1, half))?.to_dtype(x.dtype())?,
            None => self.v_proj_delayed.forward(&Tensor::zeros(
                (b, 1, hidden),
                x.dtype(),
                x.device(),
            )?)?,
        }; // [b, 1, half]
        let shifted = if n > 1 {
            Tensor::cat(&[&prev, &delayed.narrow(1, 0, n - 1)?], 1)?
        } else {
            prev
        }; // [b, n, half]
        let v = Tensor::cat(&[&current, &shifted], 2)?.reshape((b, n, hkv, d))?;
        let new_v = delayed
            .narrow(1, n - 1, 1)?
            .reshape((b, half))?
            .contiguous()?;

        let l = cache.layer_mut(self.layer)?;
        if let Some(s) = new_conv {
            l.set_state(CONV_STATE, s);
        }
        l.set_state(DELAYED_V_STATE, new_v);
        Ok(Qkv { q, k, v })
    }
}

/// Scale each head (last dim) to L2 length `√d`: `x · √d / max(‖x‖, eps)`, eps the dtype's
/// machine epsilon as in `ZayaQKNorm`; computed in f32, returned in x's dtype.
pub fn l2_to_sqrt_dim(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let eps = match x.dtype() {
        DType::BF16 => 0.0078125,
        DType::F16 => 0.000_976_562_5,
        DType::F64 => f64::EPSILON,
        _ => f32::EPSILON as f64,
    };
    let xf = x.to_dtype(DType::F32)?;
    let norm = xf.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(eps)?; // [.., 1]
    let y = xf.broadcast_div(&norm)? * (d as f64).sqrt();
    Ok(y?.to_dtype(x.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn heads_get_length_sqrt_d() {
        let x = Tensor::new(&[[[3f32, 4.0, 0.0, 0.0]]], &Device::Cpu).unwrap();
        let y: Vec<f32> = l2_to_sqrt_dim(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            (y[0] - 1.2).abs() < 1e-6 && (y[1] - 1.6).abs() < 1e-6,
            "{y:?}"
        );
        let z = Tensor::zeros((1, 1, 4), DType::F32, &Device::Cpu).unwrap();
        let y: Vec<f32> = l2_to_sqrt_dim(&z)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(y.iter().all(|v| *v == 0.0));
    }
}
