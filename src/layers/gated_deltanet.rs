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
//! recurrent form for both, heads in parallel, one pass over each head's state per token (see
//! `HeadInputs::delta_rule`), vectorised for AVX2 where the CPU has it. Cache (states by name,
//! as `kv-budget` counts them): `conv state` `[1, conv_dim, K − 1]` in the model dtype,
//! `recurrent state` `[value_heads, dk, dv]` in f32.

use super::causal_conv::{CausalConvStack, ValidConv1d};
use super::kv_store::LayerKv;
use super::linear::Linear;
use super::weight;
use crate::kernels::parallel::parallel_for;
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
    /// `neg_a`, `dt_bias` `[value_heads]` and `norm_weight` `[dv]` on the device, made on first
    /// use by [`GatedDeltaNet::delta_rule_on_device`].
    device: std::sync::OnceLock<[Tensor; 3]>,
}

const CONV_STATE: &str = "conv state";
const RECURRENT_STATE: &str = "recurrent state";

impl GatedDeltaNet {
    /// Reads `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`, `conv1d` `[conv_dim, 1, K]`,
    /// `A_log`, `dt_bias` `[value_heads]`, `norm` `[dv]` and `out_proj` under `vb`.
    pub fn load(vb: &VarBuilder, s: DeltaNetShape) -> Result<Self> {
        if s.key_heads == 0 || !s.value_heads.is_multiple_of(s.key_heads) {
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
            device: Default::default(),
        })
    }

    /// x `[n, hidden]` (the tokens after those fed before) → `[n, hidden]`; updates the conv and
    /// recurrent states in `cache`.
    pub fn forward(&self, x: &Tensor, cache: &mut LayerKv) -> Result<Tensor> {
        let s = self.s;
        let n = x.dim(0)?;
        let dtype = x.dtype();
        let (nv, dk, dv) = (s.value_heads, s.key_dim, s.value_dim);

        // 1. Projections; the causal conv over q, k, v with its carried inputs. [n, conv_dim]
        let qkv = self.in_proj_qkv.forward(x)?.unsqueeze(0)?;
        let (qkv, conv_state) = self.conv.forward(&qkv, cache.state(CONV_STATE))?;
        if let Some(st) = conv_state {
            cache.set_state(CONV_STATE, st);
        }
        let qkv = candle_nn::ops::silu(&qkv.squeeze(0)?.to_dtype(DType::F32)?)?;
        if crate::layers::is_device_step(x)? {
            let f32s = |t: Tensor| t.to_dtype(DType::F32);
            let y = self.delta_rule_on_device(
                &qkv,
                &f32s(self.in_proj_z.forward(x)?)?,
                &f32s(self.in_proj_b.forward(x)?)?,
                &f32s(self.in_proj_a.forward(x)?)?,
                cache,
                dtype,
            )?;
            return self.out_proj.forward(&y.to_dtype(dtype)?);
        }
        let qkv: Vec<f32> = qkv.flatten_all()?.to_vec1()?;
        let z: Vec<f32> = f32_rows(&self.in_proj_z.forward(x)?)?; // [n, nv·dv]
        let b: Vec<f32> = f32_rows(&self.in_proj_b.forward(x)?)?; // [n, nv]
        let a: Vec<f32> = f32_rows(&self.in_proj_a.forward(x)?)?; // [n, nv]

        // 2. The gated delta rule, then 3.'s norm and gate, value heads in parallel, each on its
        //    slice of the state [nv][dk·dv], updated in place (one copy out of the cache).
        let mut state: Vec<f32> = match cache.state(RECURRENT_STATE) {
            Some(t) => t.flatten_all()?.to_vec1()?,
            None => vec![0f32; nv * dk * dv],
        };
        if state.len() != nv * dk * dv {
            bail!(
                "Gated DeltaNet: cached recurrent state of {} values, expected {nv}·{dk}·{dv}",
                state.len()
            );
        }
        let inputs = HeadInputs {
            qkv: &qkv,
            b: &b,
            a: &a,
            z: &z,
            n,
            shape: s,
            neg_a: &self.neg_a,
            dt_bias: &self.dt_bias,
            norm_weight: &self.norm_weight,
            dtype,
        };
        // Per head: its state slice and its outputs [n·dv].
        let heads: Vec<Mutex<(&mut [f32], Vec<f32>)>> = state
            .chunks_exact_mut(dk * dv)
            .map(|st| Mutex::new((st, Vec::new())))
            .collect();
        parallel_for(nv, |hs| {
            for h in hs {
                let mut guard = heads[h].lock().unwrap_or_else(|e| e.into_inner());
                let (st, out) = &mut *guard;
                *out = vec![0f32; n * dv];
                inputs.run(h, st, out);
            }
        });
        let mut y = vec![0f32; n * nv * dv]; // [n, nv, dv]
        for (h, head) in heads.into_iter().enumerate() {
            let (_, out) = head.into_inner().unwrap_or_else(|e| e.into_inner());
            for (t, o) in out.chunks_exact(dv).enumerate() {
                y[(t * nv + h) * dv..(t * nv + h + 1) * dv].copy_from_slice(o);
            }
        }
        cache.set_state(
            RECURRENT_STATE,
            Tensor::from_vec(state, (nv, dk, dv), x.device())?,
        );
        let y = Tensor::from_vec(y, (n, nv * dv), x.device())?.to_dtype(dtype)?;
        self.out_proj.forward(&y)
    }
}

impl GatedDeltaNet {
    /// Steps 2 and 3 (before `out_proj`) as tensor ops, token by token, every head at once: the
    /// device path's decode steps and verify passes, the state never read back. qkv `[n,
    /// conv_dim]` (after the convolution and SiLU), z `[n, nv·dv]`, b and a `[n, nv]`, all f32 →
    /// `[n, nv·dv]` f32. The same rule as [`HeadInputs::run`], summed in another order.
    fn delta_rule_on_device(
        &self,
        qkv: &Tensor,
        z: &Tensor,
        b: &Tensor,
        a: &Tensor,
        cache: &mut LayerKv,
        dtype: DType,
    ) -> Result<Tensor> {
        let s = self.s;
        let (nk, nv, dk, dv) = (s.key_heads, s.value_heads, s.key_dim, s.value_dim);
        let kd = nk * dk;
        let n = qkv.dim(0)?;
        let dev = qkv.device();
        let [neg_a, dt_bias, norm_weight] = crate::layers::once(&self.device, || {
            Ok([
                Tensor::from_slice(&self.neg_a, nv, dev)?,
                Tensor::from_slice(&self.dt_bias, nv, dev)?,
                Tensor::from_slice(&self.norm_weight, dv, dev)?,
            ])
        })?;
        let mut state = match cache.state(RECURRENT_STATE) {
            Some(t) if t.dims() == [nv, dk, dv] => t.to_dtype(DType::F32)?,
            Some(t) => bail!(
                "Gated DeltaNet: cached recurrent state {:?}, expected [{nv}, {dk}, {dv}]",
                t.dims()
            ),
            None => Tensor::zeros((nv, dk, dv), DType::F32, dev)?,
        };
        // Key heads l2-normalised (times `scale`), each repeated for its value heads. [nv, dk]
        let heads = |t: Tensor, scale: f64| -> Result<Tensor> {
            let t = t.reshape((nk, dk))?;
            let inv = ((t.sqr()?.sum_keepdim(1)? + 1e-6)?.sqrt()?.recip()? * scale)?;
            let t = t.broadcast_mul(&inv)?;
            Ok(t.unsqueeze(1)?
                .broadcast_as((nk, nv / nk, dk))?
                .reshape((nv, dk))?)
        };
        let q_scale = (dk as f64).powf(-0.5);
        let mut outs = Vec::with_capacity(n);
        for t in 0..n {
            let row = qkv.get(t)?; // [conv_dim]
            let q = heads(row.narrow(0, 0, kd)?, q_scale)?.unsqueeze(1)?; // [nv, 1, dk]
            let k = heads(row.narrow(0, kd, kd)?, 1.0)?.unsqueeze(1)?; // [nv, 1, dk]
            let v = row.narrow(0, 2 * kd, nv * dv)?.reshape((nv, 1, dv))?;
            let g = crate::layers::output_gate::softplus(&(a.get(t)? + dt_bias)?)?.mul(neg_a)?;
            let beta = candle_nn::ops::sigmoid(&b.get(t)?)?.reshape((nv, 1, 1))?;
            state = state.broadcast_mul(&g.exp()?.reshape((nv, 1, 1))?)?; // S ← exp(g)·S
            let m = k.matmul(&state)?; // Sᵀk [nv, 1, dv]
            let delta = (v - m)?.broadcast_mul(&beta)?;
            state = (state + k.transpose(1, 2)?.matmul(&delta)?)?; // S + k ⊗ δ
            outs.push(q.matmul(&state)?.squeeze(1)?); // Sᵀq [nv, dv]
        }
        cache.set_state(RECURRENT_STATE, state);
        // 3. RMS norm per head (rounded to the model dtype), times the weight and silu(z).
        let o = Tensor::stack(&outs, 0)?; // [n, nv, dv]
        let r = (o.sqr()?.mean_keepdim(2)? + s.eps)?.sqrt()?.recip()?;
        let normed = o.broadcast_mul(&r)?.to_dtype(dtype)?.to_dtype(DType::F32)?;
        let z = z.reshape((n, nv, dv))?;
        let y = normed
            .broadcast_mul(norm_weight)?
            .mul(&z)?
            .mul(&candle_nn::ops::sigmoid(&z)?)?;
        Ok(y.reshape((n, nv * dv))?)
    }
}

/// What one value head's run reads: the layer's per-token inputs (f32, row-major) and weights.
struct HeadInputs<'a> {
    /// `[n, conv_dim]`: q `[key_heads·dk]`, k `[key_heads·dk]`, v `[value_heads·dv]` per row,
    /// after the convolution and SiLU.
    qkv: &'a [f32],
    /// `[n, value_heads]`.
    b: &'a [f32],
    /// `[n, value_heads]`.
    a: &'a [f32],
    /// `[n, value_heads·dv]`.
    z: &'a [f32],
    n: usize,
    shape: DeltaNetShape,
    neg_a: &'a [f32],
    dt_bias: &'a [f32],
    norm_weight: &'a [f32],
    dtype: DType,
}

impl HeadInputs<'_> {
    /// Value head `h` over the `n` tokens from `state` `[dk·dv]` (updated in place): `out`
    /// `[n·dv]` gets the head's gated, normalised output (step 3 before `out_proj`).
    fn run(&self, h: usize, state: &mut [f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::gemv::Isa::get().has_avx2() {
            // SAFETY: AVX2 and FMA were detected.
            unsafe { self.run_avx2(h, state, out) };
            return;
        }
        self.run_any(h, state, out);
    }

    /// The same code compiled for AVX2 (LLVM vectorises the row loops 8 wide; no FMA is formed,
    /// Rust does not contract `a·b + c`, so the results are those of the portable build).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, h: usize, state: &mut [f32], out: &mut [f32]) {
        self.run_any(h, state, out)
    }

    #[inline(always)]
    fn run_any(&self, h: usize, state: &mut [f32], out: &mut [f32]) {
        self.delta_rule(h, state, out);
        self.norm_gate(h, out);
    }

    /// Step 2 for head `h`. Per token `t`: `S ← exp(g_t)·S`, `m = Sᵀk_t`, `δ = β_t(v_t − m)`,
    /// `S ← S + k_t ⊗ δ`, `o_t = Sᵀq_t`. One pass over the rows of `S` per token: row `i`
    /// finishes token `t − 1` (`S_i += k_i·δ`, `o += S_i·q_i`) and starts token `t`
    /// (`S_i ← exp(g_t)·S_i`, `m += S_i·k_i`): the same operations on every element, in the
    /// same order, as three passes (so the same floats), with `S` read and written once.
    #[inline(always)]
    fn delta_rule(&self, h: usize, state: &mut [f32], out: &mut [f32]) {
        let s = self.shape;
        let (nk, nv, dk, dv) = (s.key_heads, s.value_heads, s.key_dim, s.value_dim);
        let kd = nk * dk;
        let conv_dim = 2 * kd + nv * dv;
        let kh = h / (nv / nk);
        let q_scale = (dk as f32).powf(-0.5);
        if self.n == 0 {
            return; // (the first pass below would scale S by a decay of 0)
        }
        // Token t − 1's q, k, δ ("prev"); token t's q, k, decay and m = Sᵀk ("next").
        let (mut q_prev, mut k_prev, mut delta) = (vec![0f32; dk], vec![0f32; dk], vec![0f32; dv]);
        let (mut q_next, mut k_next, mut m) = (vec![0f32; dk], vec![0f32; dk], vec![0f32; dv]);
        let state = &mut state[..dk * dv];
        for t in 0..=self.n {
            let next = t < self.n;
            let mut decay = 0.0;
            if next {
                let row = &self.qkv[t * conv_dim..(t + 1) * conv_dim];
                l2_normalise(&row[kh * dk..(kh + 1) * dk], &mut q_next, q_scale);
                l2_normalise(&row[kd + kh * dk..kd + (kh + 1) * dk], &mut k_next, 1.0);
                let g = self.neg_a[h] * softplus(self.a[t * nv + h] + self.dt_bias[h]);
                decay = g.exp();
                m.fill(0.0);
            }
            let (mm, dd) = (&mut m[..dv], &delta[..dv]);
            let rows = state.chunks_exact_mut(dv).enumerate();
            if t == 0 {
                for (i, srow) in rows {
                    let kn = k_next[i];
                    for j in 0..dv {
                        let x = srow[j] * decay;
                        mm[j] += x * kn;
                        srow[j] = x;
                    }
                }
            } else {
                let o = &mut out[(t - 1) * dv..t * dv];
                if next {
                    for (i, srow) in rows {
                        let (kp, qp, kn) = (k_prev[i], q_prev[i], k_next[i]);
                        for j in 0..dv {
                            let x = srow[j] + kp * dd[j];
                            o[j] += x * qp;
                            let x = x * decay;
                            mm[j] += x * kn;
                            srow[j] = x;
                        }
                    }
                } else {
                    for (i, srow) in rows {
                        let (kp, qp) = (k_prev[i], q_prev[i]);
                        for j in 0..dv {
                            let x = srow[j] + kp * dd[j];
                            o[j] += x * qp;
                            srow[j] = x;
                        }
                    }
                }
            }
            if next {
                let v = &self.qkv[t * conv_dim + 2 * kd + h * dv..][..dv];
                let beta = sigmoid(self.b[t * nv + h]);
                for ((d, &vj), &mj) in delta.iter_mut().zip(v).zip(m.iter()) {
                    *d = (vj - mj) * beta;
                }
                std::mem::swap(&mut q_prev, &mut q_next);
                std::mem::swap(&mut k_prev, &mut k_next);
            }
        }
    }

    /// Step 3 before `out_proj`, in place on head `h`'s outputs `[n·dv]`: an RMS norm per token
    /// (rounded to the model dtype, as the reference), times the weight and `silu(z)`.
    #[inline(always)]
    fn norm_gate(&self, h: usize, out: &mut [f32]) {
        let (nv, dv) = (self.shape.value_heads, self.shape.value_dim);
        let eps = self.shape.eps as f32;
        for (t, o) in out.chunks_exact_mut(dv).enumerate() {
            let zs = &self.z[(t * nv + h) * dv..][..dv];
            let ms = o.iter().map(|x| x * x).sum::<f32>() / dv as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((oj, &zj), &wj) in o.iter_mut().zip(zs).zip(self.norm_weight) {
                let normed = round_to(*oj * r, self.dtype);
                *oj = wj * normed * zj * sigmoid(zj);
            }
        }
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

    /// The device path's rule (tensor ops, all heads at once) against the host kernel, over two
    /// calls (the second from the state the first left), value heads sharing key heads.
    #[test]
    fn device_rule_equals_the_host_kernel() {
        let dev = candle_core::Device::Cpu;
        let s = DeltaNetShape {
            hidden: 8,
            key_heads: 2,
            value_heads: 4,
            key_dim: 8,
            value_dim: 6,
            conv_kernel: 4,
            eps: 1e-6,
        };
        let (nv, dk, dv) = (s.value_heads, s.key_dim, s.value_dim);
        let conv_dim = 2 * s.key_heads * dk + nv * dv;
        let mut seed = 7u32;
        let mut rand = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * scale
                })
                .collect()
        };
        let unit = |t: Tensor| Linear::from_weight(t, None);
        let w = |o: usize, i: usize| Tensor::zeros((o, i), DType::F32, &dev).unwrap();
        let net = GatedDeltaNet {
            s,
            in_proj_qkv: unit(w(conv_dim, 8)),
            in_proj_z: unit(w(nv * dv, 8)),
            in_proj_b: unit(w(nv, 8)),
            in_proj_a: unit(w(nv, 8)),
            conv: CausalConvStack::new(conv_dim, vec![]).unwrap(),
            neg_a: rand(nv, 2.0).iter().map(|a| -a.exp()).collect(),
            dt_bias: rand(nv, 1.0),
            norm_weight: rand(dv, 1.0).iter().map(|w| 1.0 + w).collect(),
            out_proj: unit(w(8, nv * dv)),
            device: Default::default(),
        };
        let mut host_state = vec![0f32; nv * dk * dv];
        let mut cache = LayerKv::default();
        for n in [3, 2] {
            let (qkv, z) = (rand(n * conv_dim, 4.0), rand(n * nv * dv, 4.0));
            let (b, a) = (rand(n * nv, 4.0), rand(n * nv, 4.0));
            let inputs = HeadInputs {
                qkv: &qkv,
                b: &b,
                a: &a,
                z: &z,
                n,
                shape: s,
                neg_a: &net.neg_a,
                dt_bias: &net.dt_bias,
                norm_weight: &net.norm_weight,
                dtype: DType::F32,
            };
            let mut want = vec![0f32; n * nv * dv]; // [n, nv, dv]
            for (h, st) in host_state.chunks_exact_mut(dk * dv).enumerate() {
                let mut out = vec![0f32; n * dv];
                inputs.run(h, st, &mut out);
                for (t, o) in out.chunks_exact(dv).enumerate() {
                    want[(t * nv + h) * dv..][..dv].copy_from_slice(o);
                }
            }
            let t = |v: &[f32], cols: usize| Tensor::from_slice(v, (n, cols), &dev).unwrap();
            let got = net
                .delta_rule_on_device(
                    &t(&qkv, conv_dim),
                    &t(&z, nv * dv),
                    &t(&b, nv),
                    &t(&a, nv),
                    &mut cache,
                    DType::F32,
                )
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let err = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0f32, f32::max);
            let scale = want.iter().fold(0f32, |m, w| m.max(w.abs()));
            assert!(scale > 0.1, "outputs too small to compare: {scale}");
            assert!(err < 1e-5, "{n} tokens: outputs differ by {err}");
            let state: Vec<f32> = cache
                .state(RECURRENT_STATE)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let err = state
                .iter()
                .zip(&host_state)
                .map(|(g, w)| (g - w).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5, "{n} tokens: states differ by {err}");
        }
    }
}
