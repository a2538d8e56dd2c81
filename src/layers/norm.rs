//! RMS normalisation, computed in f32 whatever the model dtype.
//!
//! `y = x · (mean(x²) + eps)^-½ · w`, with the weight used as stored (no `1 + w` offset: Gemma 4's
//! `Gemma4RMSNorm` multiplies by the weight itself, unlike Gemma 1-3). Without a weight it is a
//! plain normalisation (Gemma 4's `v_norm` and the MoE router's norm). The result is cast back to
//! the input dtype, as the reference does.

use super::weight;
use anyhow::Result;
use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// `[dim]` in f32, or `None` for the scale-less variant.
    weight: Option<Tensor>,
    /// The same scale as host values when it lives on the CPU, read once for [`Self::fused`].
    host: Option<Arc<[f32]>>,
    /// On the device path, the scale in bf16 where bf16 holds it exactly (a bf16 checkpoint's):
    /// bf16 activations are then normalised in one kernel that computes in f32 and rounds once,
    /// with no casts to f32 and back around it.
    bf16: Option<Tensor>,
    /// The scale-less variant's unit scale in bf16 on the device path, made on first use (the
    /// fused kernel wants one).
    unit: std::sync::OnceLock<Tensor>,
    eps: f64,
}

/// `Σ x²` in f64, where each square is exact, so the order of the sum does not show once it
/// is rounded to f32 (candle's chain sums in its own order; both round to f32). Eight
/// independent sums, so it vectorises and does not wait on one add chain (a 1024-wide row:
/// 1024 dependent adds before).
fn sum_of_squares(x: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f64::from(v) * f64::from(v);
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum();
    lanes.iter().sum::<f64>() + tail
}

impl RmsNorm {
    /// With a learned scale: reads `weight` `[dim]` under `vb`.
    pub fn load(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        // Read in the model dtype, then widen: the reference rounds the weight to the model
        // dtype and computes with `weight.float()`.
        let w = weight::get(vb, dim, "weight")?.to_dtype(DType::F32)?;
        RmsNorm::with_weight(w, eps)
    }

    /// With a learned scale kept in f32 as stored, whatever the model dtype (DeepSeek V4 keeps
    /// its norm weights in f32: `_keep_in_fp32_modules_strict`).
    pub fn load_f32(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        RmsNorm::with_weight(weight::get_f32(vb, dim, "weight")?, eps)
    }

    /// With a zero-centred learned scale: multiplies by `1 + weight` (Qwen3.5's
    /// `Qwen3_5RMSNorm`, in f32 as the reference computes it).
    pub fn load_zero_centred(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let w = weight::get(vb, dim, "weight")?.to_dtype(DType::F32)?;
        RmsNorm::with_weight((w + 1.0)?, eps)
    }

    /// Without a scale.
    pub fn plain(eps: f64) -> Self {
        RmsNorm {
            weight: None,
            host: None,
            bf16: None,
            unit: Default::default(),
            eps,
        }
    }

    /// With the f32 scale `w` `[dim]`.
    fn with_weight(w: Tensor, eps: f64) -> Result<Self> {
        let host = match w.device() {
            candle_core::Device::Cpu => Some(w.to_vec1::<f32>()?.into()),
            _ => None,
        };
        // The device path (a GPU, or the generic path on the CPU).
        let bf16 = if crate::kernels::fast_cpu(w.device()) {
            None
        } else {
            let b = w.to_dtype(DType::BF16)?;
            let exact = b
                .to_dtype(DType::F32)?
                .eq(&w)?
                .min_all()?
                .to_scalar::<u8>()?
                == 1;
            exact.then_some(b)
        };
        Ok(RmsNorm {
            weight: Some(w),
            host,
            bf16,
            unit: Default::default(),
            eps,
        })
    }

    /// The scale in f32, if any.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// Normalise `x` over its last dimension, in f32, without casting back.
    pub fn forward_f32(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        if crate::kernels::fast_cpu(x.device()) && self.weight.is_some() == self.host.is_some() {
            return self.fused(&x);
        }
        let ms = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?; // [.., 1]
        let y = x.broadcast_mul(&ms.powf(-0.5)?)?;
        Ok(match &self.weight {
            Some(w) => y.broadcast_mul(w)?,
            None => y,
        })
    }

    /// [`Self::forward_f32`] for an f32 CPU tensor in one pass per row, read from `x`'s own
    /// storage, rows shared out among the threads (candle's chain is six allocating ops, a few
    /// hundred per decode step); the same arithmetic: the mean of squares in f32,
    /// `x · (ms + eps)^-½ · w`.
    fn fused(&self, x: &Tensor) -> Result<Tensor> {
        /// Elements per parallel task.
        const TASK: usize = 1 << 14;
        let dim = x.dim(D::Minus1)?.max(1);
        let w = self.host.as_deref();
        let eps = self.eps as f32;
        let len = x.elem_count();
        // Written once, row by row, by the tasks (no zeroed buffer first).
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let rows_per_task = (TASK / dim).max(1);
        let tasks = (len / dim).div_ceil(rows_per_task);
        let y = crate::kernels::gemv::SyncPtr(out.spare_capacity_mut().as_mut_ptr());
        super::with_f32_slice(x, |xs| {
            crate::kernels::parallel::parallel_for(tasks, |range| {
                let a = range.start * rows_per_task * dim;
                let b = (range.end * rows_per_task * dim).min(len);
                // SAFETY: tasks cover disjoint rows of `out`'s capacity, which outlives
                // `parallel_for`.
                let ys = unsafe { std::slice::from_raw_parts_mut(y.get().add(a), b - a) };
                for (row, x) in ys.chunks_exact_mut(dim).zip(xs[a..b].chunks_exact(dim)) {
                    let ms = (sum_of_squares(x) / dim as f64) as f32;
                    let r = (ms + eps).powf(-0.5);
                    match w {
                        Some(w) => row.iter_mut().zip(x.iter().zip(w)).for_each(|(y, (x, w))| {
                            y.write(*x * r * w);
                        }),
                        None => row.iter_mut().zip(x).for_each(|(y, x)| {
                            y.write(*x * r);
                        }),
                    }
                }
            })
        })?;
        // SAFETY: the tasks wrote all `len` elements (every row, `len` a multiple of `dim`).
        unsafe { out.set_len(len) };
        Ok(Tensor::from_vec(out, x.shape(), x.device())?)
    }

    /// Normalise `x` over its last dimension; same dtype out as in.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(w) = self.bf16_scale(x)? {
            return Ok(candle_nn::ops::rms_norm(
                &x.contiguous()?,
                w,
                self.eps as f32,
            )?);
        }
        Ok(self.forward_f32(x)?.to_dtype(x.dtype())?)
    }

    /// `(scale, eps)` for a fused kernel that normalises `x` as [`Self::forward`] does, the scale
    /// in `x`'s dtype: bf16 activations where [`Self::bf16_scale`] gives one, f32 ones with a
    /// learned scale; `None` otherwise.
    pub fn fused_scale(&self, x: &Tensor) -> Result<Option<(&Tensor, f64)>> {
        Ok(match x.dtype() {
            DType::BF16 => self.bf16_scale(x)?.map(|w| (w, self.eps)),
            DType::F32 if !crate::kernels::fast_cpu(x.device()) => {
                self.weight.as_ref().map(|w| (w, self.eps))
            }
            _ => None,
        })
    }

    /// The bf16 scale `[dim]` for normalising `x` in one bf16 kernel (the device path, bf16
    /// activations, a scale bf16 holds exactly or none); `None` where the f32 chain runs.
    fn bf16_scale(&self, x: &Tensor) -> Result<Option<&Tensor>> {
        if x.dtype() != DType::BF16 || crate::kernels::fast_cpu(x.device()) {
            return Ok(None);
        }
        let dim = x.dim(D::Minus1)?;
        let w = match (&self.bf16, &self.weight) {
            (Some(w), _) => Some(w),
            (None, None) => Some(crate::layers::once(&self.unit, || {
                Ok(Tensor::ones(dim, DType::BF16, x.device())?)
            })?),
            (None, Some(_)) => None, // a scale bf16 does not hold exactly
        };
        Ok(w.filter(|w| w.dims() == [dim]))
    }
}

/// The residual step before a norm: `h + post(x)` (`h + x` without `post`) and `next` of that
/// sum, both returned. On CUDA, where each norm is one bf16 kernel, it is one kernel
/// ([`crate::kernels::fused::residual_norm`]: two or three launches become one); elsewhere the
/// ops one by one, with the same roundings.
pub fn residual_then_norm(
    h: &Tensor,
    x: &Tensor,
    post: Option<&RmsNorm>,
    next: &RmsNorm,
) -> Result<(Tensor, Tensor)> {
    let (h, y) = residual(h, x, post, None, Some(next))?;
    let y = match y {
        Some(y) => y,
        None => next.forward(&h)?,
    };
    Ok((h, y))
}

/// `h + post(x)`: one kernel on CUDA where the norm is one bf16 kernel (see
/// [`residual_then_norm`]).
pub fn residual_normed(h: &Tensor, x: &Tensor, post: &RmsNorm) -> Result<Tensor> {
    Ok(residual(h, x, Some(post), None, None)?.0)
}

/// `h' = (h + post(x)) · scale` (`scale` `[1]`, e.g. Gemma 4's layer scalar; `h + x` without
/// `post`) and, with `next`, `next(h')`: [`residual_then_norm`] with a scale, one kernel on
/// CUDA where the norms are one bf16 kernel each.
pub fn residual(
    h: &Tensor,
    x: &Tensor,
    post: Option<&RmsNorm>,
    scale: Option<&Tensor>,
    next: Option<&RmsNorm>,
) -> Result<(Tensor, Option<Tensor>)> {
    /// `Some(None)` for no norm, `Some(Some((scale, eps)))` for one bf16 kernel, else `None`.
    fn fusable<'a>(
        n: Option<&'a RmsNorm>,
        t: &Tensor,
    ) -> Result<Option<Option<(&'a Tensor, f64)>>> {
        Ok(match n {
            None => Some(None),
            Some(n) => n.bf16_scale(t)?.map(|w| Some((w, n.eps))),
        })
    }
    let scale_ok = scale.is_none_or(|s| s.dims() == [1] && s.dtype() == h.dtype());
    if let (Some(w1), Some(w2), true) = (fusable(post, x)?, fusable(next, h)?, scale_ok) {
        if let Some(out) = crate::kernels::fused::residual_norm(h, x, w1, scale, w2)? {
            return Ok(out);
        }
    }
    let mut h = match post {
        Some(p) => (h + p.forward(x)?)?,
        None => (h + x)?,
    };
    if let Some(s) = scale {
        h = h.broadcast_mul(s)?;
    }
    let y = next.map(|n| n.forward(&h)).transpose()?;
    Ok((h, y))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn normalises_then_scales_without_offset() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[3f32, 4.0]], &dev).unwrap();
        let n = RmsNorm::with_weight(Tensor::new(&[2f32, 0.5], &dev).unwrap(), 0.0).unwrap();
        let y: Vec<Vec<f32>> = n.forward(&x).unwrap().to_vec2().unwrap();
        let r = (12.5f32).sqrt();
        assert!((y[0][0] - 2.0 * 3.0 / r).abs() < 1e-6);
        assert!((y[0][1] - 0.5 * 4.0 / r).abs() < 1e-6);
        let y: Vec<Vec<f32>> = RmsNorm::plain(0.0).forward(&x).unwrap().to_vec2().unwrap();
        assert!((y[0][1] - 4.0 / r).abs() < 1e-6);
    }
}
