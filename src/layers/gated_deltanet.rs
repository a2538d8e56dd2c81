//! Gated DeltaNet linear attention (Qwen3.5 / Qwen3.6's `linear_attention` layers): a fixed-size
//! state per value head instead of a growing KV cache. Reference: transformers 5.23.0
//! `Qwen3_5GatedDeltaNet` and `torch_recurrent_gated_delta_rule`
//! (`models/qwen3_5/modeling_qwen3_5.py`).
//!
//! Per token `x`:
//! 1. `in_proj_qkv x` → a depthwise causal convolution over time (kernel `K`, no bias, SiLU),
//!    whose last `K − 1` inputs are carried across calls → q, k `[key_heads, dk]`, v
//!    `[value_heads, dv]`; `z = in_proj_z x` (the output gate), `β = sigmoid(in_proj_b x)`,
//!    `g = −exp(A_log) · softplus(in_proj_a x + dt_bias)` per value head;
//! 2. the gated delta rule, per value head `h` (reading key head `h / (value_heads/key_heads)`),
//!    in f32 with q, k L2-normalised and q scaled by `dk^-½`, on the state `S` `[dk, dv]`:
//!    `S ← exp(g)·S`, `S ← S + k ⊗ β(v − Sᵀk)`, `o = Sᵀq`;
//! 3. an RMS norm of `o` per value head (weight `norm`, no offset) times `silu(z)`, then
//!    `out_proj`.
//!
//! The reference runs prefill through a chunked form of step 2 (64 tokens at a time) and decode
//! through this recurrent one; both compute the same rule, to float rounding. llmarch runs the
//! recurrent form for both, heads in parallel. Cache (states by name, as `kv-budget` counts them):
//! `conv state` `[1, conv_dim, K − 1]` in the model dtype, `recurrent state`
//! `[value_heads, dk, dv]` in f32.

use super::causal_conv::{CausalConvStack, ValidConv1d};
use super::kv_store::LayerKv;
use super::linear::Linear;
use super::parallel::parallel_for;
use super::weight;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use std::sync::Mutex;

/// Sizes of a [`GatedDeltaNet`].
#[derive(Debug, Clone, Copy)]
pub struct DeltaNetShape {
    pub hidden: usize,
    pub key_heads: usize,
    pub value_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub conv_kernel: usize,
    pub eps: f64,
}

#[derive(Debug)]
pub struct GatedDeltaNet {
    s: DeltaNetShape,
    in_proj_qkv: Linear,
    in_proj_z: Linear,
    in_proj_b: Linear,
    in_proj_a: Linear,
    conv: CausalConvStack,
    /// `-exp(A_log)` per value head.
    neg_a: Vec<f32>,
    dt_bias: Vec<f32>,
    /// `[dv]`, f32.
    norm_weight: Vec<f32>,
    out_proj: Linear,
}

/// One value head's outputs `[n·dv]` and final state `[dk·dv]`.
type HeadRun = (Vec<f32>, Vec<f32>);

const CONV_STATE: &str = "conv state";
const RECURRENT_STATE: &str = "recurrent state";

impl GatedDeltaNet {
    /// Reads `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`, `conv1d` `[conv_dim, 1, K]`,
    /// `A_log`, `dt_bias` `[value_heads]`, `norm` `[dv]` and `out_proj` under `vb`.
    pub fn load(vb: &VarBuilder, s: DeltaNetShape) -> Result<Self> {
        if s.key_heads == 0 || s.value_heads % s.key_heads != 0 {
            bail!(
                "Gated DeltaNet: {} value heads over {} key heads",
                s.value_heads,
                s.key_heads
            );
        }
        let (kd, vd) = (s.key_heads * s.key_dim, s.value_heads * s.value_dim);
        let conv_dim = 2 * kd + vd;
        let conv = ValidConv1d::load(&vb.pp("conv1d"), conv_dim, conv_dim, s.conv_kernel)?;
        let f32s = |name: &str, n: usize| -> Result<Vec<f32>> {
            Ok(weight::get_f32(vb, n, name)?.to_vec1()?)
        };
        Ok(GatedDeltaNet {
            in_proj_qkv: Linear::load(&vb.pp("in_proj_qkv"), s.hidden, conv_dim, false)?,
            in_proj_z: Linear::load(&vb.pp("in_proj_z"), s.hidden, vd, false)?,
            in_proj_b: Linear::load(&vb.pp("in_proj_b"), s.hidden, s.value_heads, false)?,
            in_proj_a: Linear::load(&vb.pp("in_proj_a"), s.hidden, s.value_heads, false)?,
            conv: CausalConvStack::new(conv_dim, vec![conv])?,
            neg_a: f32s("A_log", s.value_heads)?
                .into_iter()
                .map(|a| -a.exp())
                .collect(),
            dt_bias: f32s("dt_bias", s.value_heads)?,
            norm_weight: weight::get_f32(&vb.pp("norm"), s.value_dim, "weight")?.to_vec1()?,
            out_proj: Linear::load(&vb.pp("out_proj"), vd, s.hidden, false)?,
            s,
        })
    }

    /// x `[n, hidden]` (the tokens after those fed before) → `[n, hidden]`; updates the conv and
    /// recurrent states in `cache`.
    pub fn forward(&self, x: &Tensor, cache: &mut LayerKv) -> Result<Tensor> {
        let s = self.s;
        let n = x.dim(0)?;
        let dtype = x.dtype();
        let (nk, nv, dk, dv) = (s.key_heads, s.value_heads, s.key_dim, s.value_dim);
        let kd = nk * dk;

        // 1. Projections; the causal conv over q, k, v with its carried inputs. [n, conv_dim]
        let qkv = self.in_proj_qkv.forward(x)?.unsqueeze(0)?;
        let (qkv, conv_state) = self.conv.forward(&qkv, cache.state(CONV_STATE))?;
        if let Some(st) = conv_state {
            cache.set_state(CONV_STATE, st);
        }
        let qkv = candle_nn::ops::silu(&qkv.squeeze(0)?.to_dtype(DType::F32)?)?;
        let qkv: Vec<f32> = qkv.flatten_all()?.to_vec1()?;
        let z: Vec<f32> = f32_rows(&self.in_proj_z.forward(x)?)?; // [n, nv·dv]
        let b: Vec<f32> = f32_rows(&self.in_proj_b.forward(x)?)?; // [n, nv]
        let a: Vec<f32> = f32_rows(&self.in_proj_a.forward(x)?)?; // [n, nv]
        let conv_dim = 2 * kd + nv * dv;

        // 2. The gated delta rule, value heads in parallel. out [nv][n·dv], state [nv][dk·dv]
        let prior: Option<Vec<f32>> = cache
            .state(RECURRENT_STATE)
            .map(|t| t.flatten_all()?.to_vec1::<f32>())
            .transpose()?;
        let group = nv / nk;
        let results: Mutex<Vec<Option<HeadRun>>> = Mutex::new(vec![None; nv]);
        parallel_for(nv, |heads| {
            for h in heads {
                let kh = h / group;
                let mut state = match &prior {
                    Some(p) => p[h * dk * dv..(h + 1) * dk * dv].to_vec(),
                    None => vec![0f32; dk * dv],
                };
                let mut out = vec![0f32; n * dv];
                let (mut q, mut k) = (vec![0f32; dk], vec![0f32; dk]);
                let mut kv_mem = vec![0f32; dv];
                for t in 0..n {
                    let row = &qkv[t * conv_dim..(t + 1) * conv_dim];
                    l2_normalise(&row[kh * dk..(kh + 1) * dk], &mut q, (dk as f32).powf(-0.5));
                    l2_normalise(&row[kd + kh * dk..kd + (kh + 1) * dk], &mut k, 1.0);
                    let v = &row[2 * kd + h * dv..2 * kd + (h + 1) * dv];
                    let beta = sigmoid(b[t * nv + h]);
                    let g = self.neg_a[h] * softplus(a[t * nv + h] + self.dt_bias[h]);
                    let decay = g.exp();
                    state.iter_mut().for_each(|x| *x *= decay);
                    // kv_mem = Sᵀk; S += k ⊗ β(v − kv_mem); o = Sᵀq.
                    kv_mem.iter_mut().for_each(|m| *m = 0.0);
                    for (i, &ki) in k.iter().enumerate() {
                        for (m, &sij) in kv_mem.iter_mut().zip(&state[i * dv..(i + 1) * dv]) {
                            *m += sij * ki;
                        }
                    }
                    for (m, &vj) in kv_mem.iter_mut().zip(v) {
                        *m = (vj - *m) * beta; // now the delta
                    }
                    let o = &mut out[t * dv..(t + 1) * dv];
                    for i in 0..dk {
                        let srow = &mut state[i * dv..(i + 1) * dv];
                        for ((sij, &dj), oj) in srow.iter_mut().zip(&kv_mem).zip(o.iter_mut()) {
                            *sij += k[i] * dj;
                            *oj += *sij * q[i];
                        }
                    }
                }
                results.lock().unwrap_or_else(|e| e.into_inner())[h] = Some((out, state));
            }
        });
        let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut new_state = Vec::with_capacity(nv * dk * dv);
        let mut core = vec![0f32; n * nv * dv]; // [n, nv, dv]
        for (h, r) in results.into_iter().enumerate() {
            let (out, state) = r.ok_or_else(|| anyhow::anyhow!("internal: head {h} not run"))?;
            new_state.extend_from_slice(&state);
            for t in 0..n {
                core[(t * nv + h) * dv..(t * nv + h + 1) * dv]
                    .copy_from_slice(&out[t * dv..(t + 1) * dv]);
            }
        }
        cache.set_state(
            RECURRENT_STATE,
            Tensor::from_vec(new_state, (nv, dk, dv), x.device())?,
        );

        // 3. RMS norm per value head (rounded to the model dtype, as the reference), times
        //    silu(z), then the output projection.
        let eps = s.eps as f32;
        let mut y = Vec::with_capacity(n * nv * dv);
        for (o, zs) in core.chunks(dv).zip(z.chunks(dv)) {
            let ms = o.iter().map(|x| x * x).sum::<f32>() / dv as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((&oj, &zj), &wj) in o.iter().zip(zs).zip(&self.norm_weight) {
                let normed = round_to(oj * r, dtype);
                y.push(wj * normed * zj * sigmoid(zj));
            }
        }
        let y = Tensor::from_vec(y, (n, nv * dv), x.device())?.to_dtype(dtype)?;
        self.out_proj.forward(&y)
    }
}

fn f32_rows(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// `x / sqrt(Σx² + 1e-6) · scale` into `out` (the reference's `l2norm`, eps 1e-6).
fn l2_normalise(x: &[f32], out: &mut [f32], scale: f32) {
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() + 1e-6).sqrt() * scale;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * inv;
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// torch's softplus (linear above 20).
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// `x` rounded to `dtype` (the reference casts the normalised values back before the weight).
fn round_to(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_norm_and_softplus() {
        let mut out = [0f32; 2];
        l2_normalise(&[3.0, 4.0], &mut out, 2.0);
        assert!((out[0] - 1.2).abs() < 1e-5 && (out[1] - 1.6).abs() < 1e-5);
        assert!((softplus(0.0) - std::f32::consts::LN_2).abs() < 1e-7);
        assert_eq!(softplus(30.0), 30.0);
    }
}
