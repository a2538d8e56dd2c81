//! Rotary position embeddings (RoPE), rotate-half layout, over the whole head.
//!
//! A head of `d` dims is rotated as `d/2` pairs `(i, i + d/2)`, pair `i` by angle
//! `position · inv_freq[i]`, exactly as the reference's `rotate_half`. Two frequency layouts:
//!
//! - **default**: `inv_freq[i] = θ^(-2i/d)` for every pair.
//! - **proportional** (Gemma 4's full-attention layers, `modeling_rope_utils.py`
//!   `_compute_proportional_rope_parameters`): only the first `⌊partial·d/2⌋` pairs rotate, with
//!   `inv_freq[i] = θ^(-2i/d) / factor` (the exponent's denominator is the *whole* head dim, not
//!   the rotated part); the other pairs get frequency 0, i.e. they pass through unchanged. The
//!   rotated dims are thus `0..k` and `d/2..d/2+k`, not the first `partial·d` dims.
//!
//! cos/sin are computed in f32 (`position as f32 · inv_freq`), kept in a table that grows with the
//! positions asked for, and cast to the input dtype when applied.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::RwLock;

#[derive(Debug)]
pub struct Rotary {
    head_dim: usize,
    /// `[head_dim / 2]` angular frequencies, 0 for pairs that do not rotate.
    inv_freq: Vec<f32>,
    device: Device,
    /// cos and sin `[positions, head_dim / 2]` in f32 for positions `0..positions`.
    table: RwLock<Option<(Tensor, Tensor)>>,
}

impl Rotary {
    /// Every pair rotates: `inv_freq[i] = θ^(-2i/d)`.
    pub fn default_rope(theta: f64, head_dim: usize, device: &Device) -> Result<Self> {
        Self::proportional(theta, head_dim, head_dim / 2, 1.0, device)
    }

    /// The first `rotated_pairs` pairs rotate with `θ^(-2i/d) / factor`; the rest stay put.
    pub fn proportional(
        theta: f64,
        head_dim: usize,
        rotated_pairs: usize,
        factor: f64,
        device: &Device,
    ) -> Result<Self> {
        if head_dim == 0 || head_dim % 2 != 0 {
            bail!("RoPE needs an even head dimension, got {head_dim}");
        }
        if rotated_pairs > head_dim / 2 {
            bail!("RoPE: {rotated_pairs} rotated pairs do not fit a head of {head_dim}");
        }
        if !(theta.is_finite() && theta > 0.0 && factor.is_finite() && factor > 0.0) {
            bail!("RoPE: theta {theta} and factor {factor} must be positive numbers");
        }
        let (base, d, factor) = (theta as f32, head_dim as f32, factor as f32);
        let inv_freq = (0..head_dim / 2)
            .map(|i| {
                if i < rotated_pairs {
                    1.0 / base.powf((2 * i) as f32 / d) / factor
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Rotary {
            head_dim,
            inv_freq,
            device: device.clone(),
            table: RwLock::new(None),
        })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// cos and sin `[len, head_dim / 2]` for positions `start..start + len`, in `dtype`.
    pub fn cos_sin(&self, start: usize, len: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        let end = start + len;
        let have = |t: &Option<(Tensor, Tensor)>| t.as_ref().map_or(0, |(c, _)| c.dims()[0]);
        let need_grow = {
            let t = self
                .table
                .read()
                .map_err(|_| anyhow::anyhow!("RoPE table lock poisoned"))?;
            have(&t) < end
        };
        if need_grow {
            let mut t = self
                .table
                .write()
                .map_err(|_| anyhow::anyhow!("RoPE table lock poisoned"))?;
            if have(&t) < end {
                let cap = end.next_power_of_two().max(64);
                *t = Some(self.build(cap)?);
            }
        }
        let t = self
            .table
            .read()
            .map_err(|_| anyhow::anyhow!("RoPE table lock poisoned"))?;
        let (cos, sin) = t
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("internal: RoPE table missing"))?;
        Ok((
            cos.narrow(0, start, len)?.to_dtype(dtype)?,
            sin.narrow(0, start, len)?.to_dtype(dtype)?,
        ))
    }

    fn build(&self, positions: usize) -> Result<(Tensor, Tensor)> {
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (positions, half), &self.device)?,
            Tensor::from_vec(sin, (positions, half), &self.device)?,
        ))
    }

    /// Rotate `x` `[b, h, t, head_dim]` whose tokens sit at positions `start..start + t`.
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (_b, _h, t, d) = x.dims4()?;
        if d != self.head_dim {
            bail!(
                "internal: RoPE for head dim {} applied to heads of {d}",
                self.head_dim
            );
        }
        let (cos, sin) = self.cos_sin(start, t, x.dtype())?; // [t, d/2]
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference's formula, written out: `x·cos + rotate_half(x)·sin` with `emb = [f, f]`.
    fn reference(x: &[f32], pos: f32, inv_freq: &[f32]) -> Vec<f32> {
        let h = x.len() / 2;
        (0..x.len())
            .map(|i| {
                let a = pos * inv_freq[i % h];
                let rot = if i < h { -x[i + h] } else { x[i - h] };
                x[i] * a.cos() + rot * a.sin()
            })
            .collect()
    }

    #[test]
    fn proportional_rotates_the_leading_pairs_of_each_half() {
        let dev = Device::Cpu;
        let r = Rotary::proportional(10_000.0, 8, 1, 1.0, &dev).unwrap();
        assert_eq!(r.inv_freq, vec![1.0, 0.0, 0.0, 0.0]);
        let r = Rotary::proportional(1e6, 16, 2, 2.0, &dev).unwrap();
        let want1 = 1.0 / 1e6f32.powf(2.0 / 16.0) / 2.0;
        assert_eq!(r.inv_freq[0], 0.5);
        assert!((r.inv_freq[1] - want1).abs() < 1e-9);
        assert!(r.inv_freq[2..].iter().all(|&f| f == 0.0));

        let x: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
        let xt = Tensor::from_vec(x.clone(), (1, 1, 1, 16), &dev).unwrap();
        let y: Vec<f32> = r
            .apply(&xt, 5)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = reference(&x, 5.0, &r.inv_freq);
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
        }
        // Dims 2..8 and 10..16 do not move.
        assert_eq!(&y[2..8], &x[2..8]);
        assert_eq!(&y[10..], &x[10..]);
    }

    #[test]
    fn default_rotates_every_pair_and_tables_grow() {
        let dev = Device::Cpu;
        let r = Rotary::default_rope(10_000.0, 4, &dev).unwrap();
        assert_eq!(r.inv_freq, vec![1.0, 0.01]);
        let (c, _) = r.cos_sin(100, 3, DType::F32).unwrap();
        let c: Vec<Vec<f32>> = c.to_vec2().unwrap();
        assert_eq!(c[2][0], 102f32.cos());
        assert!(Rotary::default_rope(1e4, 5, &dev).is_err());
    }
}
