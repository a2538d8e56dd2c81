//! Manifold-constrained hyper-connections (mHC, DeepSeek V4): the residual stream widened to
//! `M` parallel streams. Reference: transformers 5.23.0 `DeepseekV4HyperConnection` and
//! `DeepseekV4HyperHead` (`models/deepseek_v4/modeling_deepseek_v4.py`).
//!
//! Around every attention and MLP block, one [`HyperConnection`] reads the `M` streams of a token
//! (flattened, scale-less RMS norm, one linear map `fn` to `(2 + M)·M` numbers, each third scaled
//! and biased) and returns three mixing weights:
//! - `pre` `[M]` = `sigmoid(·) + eps`: collapses the streams into the block input, `Σ_j pre_j s_j`;
//! - `post` `[M]` = `2·sigmoid(·)`: spreads the block output back over the streams;
//! - `comb` `[M, M]` = `softmax(·) + eps` over each row, then made doubly stochastic by
//!   Sinkhorn-Knopp (`iters` rounds: columns first, then rows and columns `iters − 1` times), so
//!   mixing the streams cannot blow up their norm.
//!
//! The block's output then becomes `s'_k = post_k · out + Σ_j comb[j, k] · s_j` (comb is read
//! transposed: the sum runs over its *first* index). All weights are computed in f32, cast to the
//! model dtype for the mixing, as the reference does; the parameters are read in f32 as stored
//! (the reference keeps them in f32 in a 16-bit model). The final [`HyperHead`] collapses the
//! streams once more (`pre` only) before the model's last norm.

use super::norm::RmsNorm;
use super::weight;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

/// The mixing weights of one hyper-connection for a chunk of `n` tokens.
#[derive(Debug)]
pub struct Mix {
    /// `[n, M]`, model dtype.
    pub post: Tensor,
    /// `[n, M, M]`, model dtype, already transposed: `comb_t[t, k, j] = comb[t, j, k]`.
    pub comb_t: Tensor,
}

impl Mix {
    /// streams `[n, M, H]`, block output `[n, H]` → the new streams `[n, M, H]`.
    pub fn apply(&self, streams: &Tensor, out: &Tensor) -> Result<Tensor> {
        let spread = self.post.unsqueeze(2)?.broadcast_mul(&out.unsqueeze(1)?)?; // [n, M, H]
        let mixed = self.comb_t.matmul(&streams.contiguous()?)?; // [n, M, H]
        Ok((spread + mixed)?)
    }
}

#[derive(Debug)]
pub struct HyperConnection {
    streams: usize,
    sinkhorn_iters: usize,
    eps: f32,
    norm: RmsNorm,
    /// `[(2 + M)·M, M·H]`, f32.
    proj: Tensor,
    /// `[(2 + M)·M]`.
    base: Vec<f32>,
    /// pre, post and comb scales.
    scale: [f32; 3],
    /// On the device: each mixing logit's scale and `base`, `[(2 + M)·M]` f32, made on first use.
    device: std::sync::OnceLock<(Tensor, Tensor)>,
}

impl HyperConnection {
    /// Reads `fn` `[(2+M)M, M·H]`, `base` `[(2+M)M]` and `scale` `[3]` under `vb`.
    pub fn load(
        vb: &VarBuilder,
        streams: usize,
        hidden: usize,
        sinkhorn_iters: usize,
        hc_eps: f64,
        norm_eps: f64,
    ) -> Result<Self> {
        let m = streams;
        let width = (2 + m) * m;
        let scale: Vec<f32> = f32_vec(weight::get_f32(vb, 3, "scale")?)?;
        Ok(HyperConnection {
            streams: m,
            sinkhorn_iters,
            eps: hc_eps as f32,
            norm: RmsNorm::plain(norm_eps),
            proj: weight::get_f32(vb, (width, m * hidden), "fn")?,
            base: f32_vec(weight::get_f32(vb, width, "base")?)?,
            scale: [scale[0], scale[1], scale[2]],
            device: Default::default(),
        })
    }

    /// streams `[n, M, H]` → (the block input `[n, H]`, the weights to mix its output back).
    /// On the device path the weights never leave the device (`collapse_on_device`).
    pub fn collapse(&self, streams: &Tensor) -> Result<(Tensor, Mix)> {
        let (_, m, _) = streams.dims3()?;
        if m != self.streams {
            bail!(
                "internal: {m} residual streams for a hyper-connection of {}",
                self.streams
            );
        }
        if crate::kernels::fast_cpu(streams.device()) {
            self.collapse_on_host(streams)
        } else {
            self.collapse_on_device(streams)
        }
    }

    /// [`Self::collapse`] as tensor ops: the same weights (Sinkhorn included), summed in
    /// candle's order.
    fn collapse_on_device(&self, streams: &Tensor) -> Result<(Tensor, Mix)> {
        let (n, m, h) = streams.dims3()?;
        let (scale, base) = crate::layers::once(&self.device, || {
            let [s_pre, s_post, s_comb] = self.scale;
            let scales: Vec<f32> = [(s_pre, m), (s_post, m), (s_comb, m * m)]
                .iter()
                .flat_map(|&(s, k)| std::iter::repeat_n(s, k))
                .collect();
            let dev = streams.device();
            Ok((
                Tensor::from_vec(scales, self.base.len(), dev)?,
                Tensor::from_slice(&self.base, self.base.len(), dev)?,
            ))
        })?;
        let dtype = streams.dtype();
        let eps = f64::from(self.eps);
        // 1. Flatten, normalise, project, scale and bias: [n, (2+M)M] in f32.
        let flat = self.norm.forward_f32(&streams.reshape((n, m * h))?)?;
        let z = flat
            .matmul(&self.proj.t()?)?
            .broadcast_mul(scale)?
            .broadcast_add(base)?;
        // 2. pre, post, and comb made doubly stochastic (columns: the sum over dim 1).
        let pre = (candle_nn::ops::sigmoid(&z.narrow(1, 0, m)?)? + eps)?; // [n, M]
        let post = (candle_nn::ops::sigmoid(&z.narrow(1, m, m)?)? * 2.0)?;
        let c = z.narrow(1, 2 * m, m * m)?.reshape((n, m, m))?;
        let mut c = (candle_nn::ops::softmax_last_dim(&c)? + eps)?;
        let normalise = |c: &Tensor, dim: usize| -> Result<Tensor> {
            Ok(c.broadcast_div(&(c.sum_keepdim(dim)? + eps)?)?)
        };
        c = normalise(&c, 1)?;
        for _ in 1..self.sinkhorn_iters {
            c = normalise(&normalise(&c, 2)?, 1)?;
        }
        // 3. Collapse with pre (f32, then the model dtype), as the reference.
        let collapsed = streams
            .to_dtype(DType::F32)?
            .broadcast_mul(&pre.unsqueeze(2)?)?
            .sum(1)?
            .to_dtype(dtype)?; // [n, H]
        let mix = Mix {
            post: post.to_dtype(dtype)?,
            comb_t: c.transpose(1, 2)?.contiguous()?.to_dtype(dtype)?,
        };
        Ok((collapsed, mix))
    }

    /// [`Self::collapse`] with the weights computed on the host, token by token.
    fn collapse_on_host(&self, streams: &Tensor) -> Result<(Tensor, Mix)> {
        let (n, m, h) = streams.dims3()?;
        let dtype = streams.dtype();
        let dev = streams.device().clone();
        // 1. Flatten, normalise, project: [n, (2+M)M] in f32.
        let flat = self.norm.forward_f32(&streams.reshape((n, m * h))?)?;
        let mixes: Vec<Vec<f32>> = flat.matmul(&self.proj.t()?)?.to_vec2()?;

        // 2. Per token: pre, post, and comb made doubly stochastic.
        let (mut pre, mut post, mut comb) = (
            Vec::with_capacity(n * m),
            Vec::with_capacity(n * m),
            Vec::with_capacity(n * m * m),
        );
        let [s_pre, s_post, s_comb] = self.scale;
        for row in &mixes {
            for j in 0..m {
                pre.push(sigmoid(row[j] * s_pre + self.base[j]) + self.eps);
                post.push(2.0 * sigmoid(row[m + j] * s_post + self.base[m + j]));
            }
            let mut c: Vec<f32> = (0..m * m)
                .map(|x| row[2 * m + x] * s_comb + self.base[2 * m + x])
                .collect();
            for r in c.chunks_mut(m) {
                softmax_in_place(r);
                r.iter_mut().for_each(|v| *v += self.eps);
            }
            sinkhorn(&mut c, m, self.sinkhorn_iters, self.eps);
            // Transposed, so that `comb_t @ streams` sums over comb's first index.
            comb.extend((0..m * m).map(|x| c[(x % m) * m + x / m]));
        }

        // 3. Collapse with pre (f32, then the model dtype), as the reference.
        let pre = Tensor::from_vec(pre, (n, m, 1), &dev)?;
        let collapsed = streams
            .to_dtype(DType::F32)?
            .broadcast_mul(&pre)?
            .sum(1)?
            .to_dtype(dtype)?; // [n, H]
        let mix = Mix {
            post: Tensor::from_vec(post, (n, m), &dev)?.to_dtype(dtype)?,
            comb_t: Tensor::from_vec(comb, (n, m, m), &dev)?.to_dtype(dtype)?,
        };
        Ok((collapsed, mix))
    }
}

/// The final collapse of the streams (`hc_head`): `pre` weights only.
#[derive(Debug)]
pub struct HyperHead {
    eps: f32,
    norm: RmsNorm,
    /// `[M, M·H]`, f32.
    proj: Tensor,
    base: Tensor,
    scale: f32,
}

impl HyperHead {
    /// Reads `hc_fn` `[M, M·H]`, `hc_base` `[M]` and `hc_scale` `[1]` under `vb`.
    pub fn load(
        vb: &VarBuilder,
        streams: usize,
        hidden: usize,
        hc_eps: f64,
        norm_eps: f64,
    ) -> Result<Self> {
        Ok(HyperHead {
            eps: hc_eps as f32,
            norm: RmsNorm::plain(norm_eps),
            proj: weight::get_f32(vb, (streams, streams * hidden), "hc_fn")?,
            base: weight::get_f32(vb, streams, "hc_base")?,
            scale: f32_vec(weight::get_f32(vb, 1, "hc_scale")?)?[0],
        })
    }

    /// streams `[n, M, H]` → `[n, H]`.
    pub fn collapse(&self, streams: &Tensor) -> Result<Tensor> {
        let (n, m, h) = streams.dims3()?;
        let flat = self.norm.forward_f32(&streams.reshape((n, m * h))?)?;
        let mixes =
            (flat.matmul(&self.proj.t()?)? * self.scale as f64)?.broadcast_add(&self.base)?;
        let pre = (candle_nn::ops::sigmoid(&mixes)? + self.eps as f64)?; // [n, M]
        Ok(streams
            .to_dtype(DType::F32)?
            .broadcast_mul(&pre.unsqueeze(D::Minus1)?)?
            .sum(1)?
            .to_dtype(streams.dtype())?)
    }
}

fn f32_vec(t: Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn softmax_in_place(r: &mut [f32]) {
    let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in r.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    r.iter_mut().for_each(|v| *v /= sum);
}

/// Sinkhorn-Knopp on a row-major `m × m` matrix as the reference runs it: normalise the columns,
/// then `iters − 1` times the rows and the columns, each sum offset by `eps`.
fn sinkhorn(c: &mut [f32], m: usize, iters: usize, eps: f32) {
    let cols = |c: &mut [f32]| {
        for j in 0..m {
            let s: f32 = (0..m).map(|i| c[i * m + j]).sum::<f32>() + eps;
            (0..m).for_each(|i| c[i * m + j] /= s);
        }
    };
    cols(c);
    for _ in 1..iters {
        for r in c.chunks_mut(m) {
            let s: f32 = r.iter().sum::<f32>() + eps;
            r.iter_mut().for_each(|v| *v /= s);
        }
        cols(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinkhorn_makes_rows_and_columns_sum_to_one() {
        let mut c = vec![0.7, 0.2, 0.1, 0.1, 0.8, 0.3, 0.2, 0.3, 0.9];
        sinkhorn(&mut c, 3, 30, 0.0);
        for i in 0..3 {
            let row: f32 = c[i * 3..i * 3 + 3].iter().sum();
            let col: f32 = (0..3).map(|r| c[r * 3 + i]).sum();
            assert!(
                (row - 1.0).abs() < 1e-4 && (col - 1.0).abs() < 1e-4,
                "{c:?}"
            );
        }
    }

    /// The device path's weights and collapse against the host's, on random parameters.
    #[test]
    fn device_collapse_equals_the_host() {
        let dev = candle_core::Device::Cpu;
        let (n, m, h) = (3, 4, 8);
        let width = (2 + m) * m;
        let mut seed = 11u32;
        let mut rand = |k: usize| -> Vec<f32> {
            (0..k)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        };
        let hc = HyperConnection {
            streams: m,
            sinkhorn_iters: 5,
            eps: 1e-6,
            norm: RmsNorm::plain(1e-6),
            proj: Tensor::from_vec(rand(width * m * h), (width, m * h), &dev).unwrap(),
            base: rand(width),
            scale: [0.7, 1.3, 2.0],
            device: Default::default(),
        };
        let streams = (Tensor::from_vec(rand(n * m * h), (n, m, h), &dev).unwrap() * 4.0).unwrap();
        let (a, mix_a) = hc.collapse_on_host(&streams).unwrap();
        let (b, mix_b) = hc.collapse_on_device(&streams).unwrap();
        let max = crate::layers::max_abs_diff;
        assert!(max(&a, &b) < 1e-5, "collapsed: {}", max(&a, &b));
        assert!(max(&mix_a.post, &mix_b.post) < 1e-5);
        assert!(
            max(&mix_a.comb_t, &mix_b.comb_t) < 1e-5,
            "comb: {}",
            max(&mix_a.comb_t, &mix_b.comb_t)
        );
        // comb's columns (comb_t's rows) sum to 1 after the last round.
        let sums: Vec<f32> = mix_b
            .comb_t
            .sum(2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-3), "{sums:?}");
    }

    #[test]
    fn one_round_normalises_columns_only() {
        let mut c = vec![1.0, 3.0, 1.0, 1.0];
        sinkhorn(&mut c, 2, 1, 0.0);
        assert_eq!(c, vec![0.5, 0.75, 0.5, 0.25]);
    }
}
