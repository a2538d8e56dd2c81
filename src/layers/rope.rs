//! Rotary position embeddings (RoPE), rotate-half layout.
//!
//! A rotated span of `r` dims is turned as `r/2` pairs `(i, i + r/2)`, pair `i` by angle
//! `position · inv_freq[i]`, exactly as the reference's `rotate_half`. Two layouts of the span:
//!
//! - **whole head** (`r = d`): [`Rotary::default_rope`] (`inv_freq[i] = θ^(-2i/d)`) and
//!   [`Rotary::proportional`] (Gemma 4's full-attention layers, `modeling_rope_utils.py`
//!   `_compute_proportional_rope_parameters`): only the first `⌊partial·d/2⌋` pairs rotate, with
//!   `inv_freq[i] = θ^(-2i/d) / factor` (the exponent's denominator is the *whole* head dim, not
//!   the rotated part); the other pairs get frequency 0, i.e. they pass through unchanged. The
//!   rotated dims are thus `0..k` and `d/2..d/2+k`, not the first `partial·d` dims.
//! - **leading dims** ([`Rotary::leading`], Llama-style partial rotary as in Laguna's
//!   `apply_rotary_pos_emb`): the first `r = 2·inv_freq.len()` dims rotate as pairs
//!   `(i, i + r/2)`, the rest pass through. The frequencies come from the reference's
//!   `ROPE_INIT_FUNCTIONS` over `dim = ⌊partial·d⌋`: [`default_inv_freq`], [`linear_inv_freq`],
//!   [`Yarn`], [`Llama3`], [`longrope_inv_freq`].
//!
//! cos/sin are computed in f32 (`position as f32 · inv_freq`), times the variant's attention
//! scaling (YaRN's `mscale`, LongRoPE's factor; 1 otherwise) as the reference multiplies them,
//! kept in a table that grows with the positions asked for, and cast to the input dtype when
//! applied.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::{Arc, RwLock};

/// RoPE tables shared by the layers that rotate alike: one per distinct `K` (in practice one
/// per layer type), built the first time a layer asks for it.
pub struct SharedTables<K> {
    tables: Vec<(K, Arc<Rotary>)>,
}

impl<K: PartialEq> SharedTables<K> {
    pub fn new() -> Self {
        SharedTables { tables: vec![] }
    }

    /// The table for `key`, built by `build` if no layer asked for it before.
    pub fn get_or_build(
        &mut self,
        key: K,
        build: impl FnOnce() -> Result<Rotary>,
    ) -> Result<Arc<Rotary>> {
        if let Some((_, r)) = self.tables.iter().find(|(k, _)| *k == key) {
            return Ok(r.clone());
        }
        let r = Arc::new(build()?);
        self.tables.push((key, r.clone()));
        Ok(r)
    }
}

impl<K: PartialEq> Default for SharedTables<K> {
    fn default() -> Self {
        Self::new()
    }
}

/// Positions per block of a [`CosSinTable`]: a prompt chunk's worth
/// ([`crate::generate::PREFILL_CHUNK`]), so an aligned chunk reads one block.
const BLOCK: usize = 512;

/// cos and sin of `position · inv_freq[i]` (times `scaling`) in f32, built on the device in
/// blocks of [`BLOCK`] positions as positions are asked for: a forward reads rows of a block
/// instead of computing and uploading angles on every call. Blocks are never rebuilt, so the
/// table grows by one block's work per 512 tokens; a table that doubled and was built whole
/// again cost the first decode step after an 8192-token prompt 80 ms (the bench model's two
/// tables, 16384 positions each), eight steps' worth.
#[derive(Debug)]
struct CosSinTable {
    inv_freq: Vec<f32>,
    scaling: f32,
    device: Device,
    /// Block `b` holds positions `b·BLOCK..(b + 1)·BLOCK`.
    blocks: RwLock<Vec<Block>>,
}

/// cos and sin `[BLOCK, inv_freq.len()]` in f32, and a copy in each other dtype asked for
/// (made once per block, not cast on every call).
#[derive(Debug)]
struct Block {
    cos: Tensor,
    sin: Tensor,
    casts: Vec<(DType, Tensor, Tensor)>,
}

impl Block {
    fn get(&self, dtype: DType) -> Option<(Tensor, Tensor)> {
        if dtype == DType::F32 {
            return Some((self.cos.clone(), self.sin.clone()));
        }
        self.casts
            .iter()
            .find(|(d, ..)| *d == dtype)
            .map(|(_, c, s)| (c.clone(), s.clone()))
    }
}

impl CosSinTable {
    fn new(inv_freq: Vec<f32>, scaling: f32, device: &Device) -> Self {
        CosSinTable {
            inv_freq,
            scaling,
            device: device.clone(),
            blocks: RwLock::new(Vec::new()),
        }
    }

    /// cos and sin `[positions.len(), inv_freq.len()]` in f32 on the device, computed here.
    /// Pairs of frequency 0 (Gemma 4's full layers turn a quarter of theirs) take no call.
    fn angles(&self, positions: &[usize]) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let (c, s) = if f == 0.0 {
                    (1.0, 0.0)
                } else {
                    let a = p as f32 * f;
                    (a.cos(), a.sin())
                };
                if self.scaling == 1.0 {
                    cos.push(c);
                    sin.push(s);
                } else {
                    cos.push(c * self.scaling);
                    sin.push(s * self.scaling);
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (positions.len(), half), &self.device)?,
            Tensor::from_vec(sin, (positions.len(), half), &self.device)?,
        ))
    }

    /// Block `b` in `dtype`, built (with every block before it) if not yet.
    fn block(&self, b: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        let poisoned = || anyhow::anyhow!("RoPE table lock poisoned");
        if let Some(t) = self
            .blocks
            .read()
            .map_err(|_| poisoned())?
            .get(b)
            .and_then(|bl| bl.get(dtype))
        {
            return Ok(t);
        }
        let mut blocks = self.blocks.write().map_err(|_| poisoned())?;
        while blocks.len() <= b {
            let first = blocks.len() * BLOCK;
            let positions: Vec<usize> = (first..first + BLOCK).collect();
            let (cos, sin) = self.angles(&positions)?;
            blocks.push(Block {
                cos,
                sin,
                casts: vec![],
            });
        }
        let block = &mut blocks[b];
        if let Some(t) = block.get(dtype) {
            return Ok(t);
        }
        let t = (block.cos.to_dtype(dtype)?, block.sin.to_dtype(dtype)?);
        block.casts.push((dtype, t.0.clone(), t.1.clone()));
        Ok(t)
    }

    /// cos and sin `[len, half]` for positions `start..start + len`, in `dtype`: a view of one
    /// block, or the blocks' rows joined where the range crosses a block's end.
    fn range(&self, start: usize, len: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        if len == 0 {
            let (c, s) = self.angles(&[])?;
            return Ok((c.to_dtype(dtype)?, s.to_dtype(dtype)?));
        }
        let (mut cos, mut sin) = (vec![], vec![]);
        for b in start / BLOCK..=(start + len - 1) / BLOCK {
            let (c, s) = self.block(b, dtype)?;
            let lo = start.max(b * BLOCK) - b * BLOCK;
            let hi = (start + len).min((b + 1) * BLOCK) - b * BLOCK;
            cos.push(c.narrow(0, lo, hi - lo)?);
            sin.push(s.narrow(0, lo, hi - lo)?);
        }
        if cos.len() == 1 {
            return Ok((cos.remove(0), sin.remove(0)));
        }
        Ok((Tensor::cat(&cos, 0)?, Tensor::cat(&sin, 0)?))
    }

    /// cos and sin `[positions.len(), half]` for the given positions, in `dtype`: from the
    /// blocks where they are consecutive, else computed for those positions alone (one upload,
    /// as an index tensor into the table would be).
    fn rows(&self, positions: &[usize], dtype: DType) -> Result<(Tensor, Tensor)> {
        let Some(&first) = positions.first() else {
            bail!("internal: RoPE for no position");
        };
        if positions.iter().enumerate().all(|(i, &p)| p == first + i) {
            return self.range(first, positions.len(), dtype);
        }
        let (cos, sin) = self.angles(positions)?;
        Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
    }
}

#[derive(Debug)]
pub struct Rotary {
    head_dim: usize,
    /// The leading dims that rotate (`head_dim` for the whole-head layouts).
    rotary_dim: usize,
    /// `[rotary_dim / 2]` angular frequencies (0 for pairs that do not rotate), times a scaling
    /// of cos and sin (YaRN's attention factor; 1 for most variants).
    table: CosSinTable,
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
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
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
            rotary_dim: head_dim,
            table: CosSinTable::new(inv_freq, 1.0, device),
        })
    }

    /// The first `2·inv_freq.len()` dims of each head rotate with `inv_freq`; the rest pass
    /// through. cos and sin are multiplied by `scaling` (the reference's `attention_scaling`).
    pub fn leading(
        inv_freq: Vec<f32>,
        head_dim: usize,
        scaling: f64,
        device: &Device,
    ) -> Result<Self> {
        let rotary_dim = 2 * inv_freq.len();
        if rotary_dim == 0 || rotary_dim > head_dim {
            bail!("RoPE: {rotary_dim} rotated dims do not fit a head of {head_dim}");
        }
        if inv_freq.iter().any(|f| !f.is_finite()) {
            bail!("RoPE: the frequencies are not finite numbers");
        }
        if !(scaling.is_finite() && scaling > 0.0) {
            bail!("RoPE: attention scaling {scaling} must be a positive number");
        }
        Ok(Rotary {
            head_dim,
            rotary_dim,
            table: CosSinTable::new(inv_freq, scaling as f32, device),
        })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The leading dims of each head that rotate (pairs `i`, `i + rotary_dim / 2`).
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }

    /// The angular frequency of each rotated pair.
    pub fn inv_freq(&self) -> &[f32] {
        &self.table.inv_freq
    }

    /// What cos and sin are multiplied by.
    pub fn attention_scaling(&self) -> f32 {
        self.table.scaling
    }

    /// cos and sin `[len, rotary_dim / 2]` for positions `start..start + len`, in `dtype`.
    pub fn cos_sin(&self, start: usize, len: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        self.table.range(start, len, dtype)
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
        let (cos, sin) = self.cos_sin(start, t, x.dtype())?; // [t, r/2]
        let r = self.rotary_dim;
        if r == d {
            return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?);
        }
        // Leading dims only: rotate x[.., :r], pass x[.., r:] through.
        let rot = x.narrow(3, 0, r)?.contiguous()?; // [b, h, t, r]
        let rot = candle_nn::rotary_emb::rope(&rot, &cos, &sin)?;
        Ok(Tensor::cat(&[&rot, &x.narrow(3, r, d - r)?], 3)?)
    }
}

/// DeepSeek V4's RoPE: interleaved pairs `(2i, 2i + 1)` over the *trailing* `2·inv_freq.len()`
/// dims of each head (the leading ones pass through), angles `position · inv_freq[i]` in f32,
/// cos and sin times the attention scaling, as `DeepseekV4RotaryEmbedding` and its
/// `apply_rotary_pos_emb` compute them. Positions are given one by one (compressed entries sit
/// every `ratio` tokens), and [`InterleavedRope::apply`] can also rotate backwards (`-sin`), which
/// V4 uses to undo the keys' rotation on the attention output.
#[derive(Debug)]
pub struct InterleavedRope {
    /// Built on the device of the first tensor it rotates.
    table: std::sync::OnceLock<CosSinTable>,
    inv_freq: Vec<f32>,
    scaling: f32,
}

impl InterleavedRope {
    pub fn new(inv_freq: Vec<f32>, scaling: f64) -> Result<Self> {
        if inv_freq.is_empty() || inv_freq.iter().any(|f| !f.is_finite()) {
            bail!("RoPE: no rotated dims, or frequencies that are not finite numbers");
        }
        if !(scaling.is_finite() && scaling > 0.0) {
            bail!("RoPE: attention scaling {scaling} must be a positive number");
        }
        Ok(InterleavedRope {
            table: std::sync::OnceLock::new(),
            inv_freq,
            scaling: scaling as f32,
        })
    }

    /// How many trailing dims rotate.
    pub fn rotary_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// Rotate `x` `[b, h, t, d]` whose `t` tokens sit at `positions`; `inverse` turns by `-angle`.
    pub fn apply(&self, x: &Tensor, positions: &[usize], inverse: bool) -> Result<Tensor> {
        let (_b, _h, t, d) = x.dims4()?;
        let r = self.rotary_dim();
        if t != positions.len() || r > d {
            bail!(
                "internal: RoPE over {r} dims of {d}-wide heads for {t} tokens at {} positions",
                positions.len()
            );
        }
        let table = self
            .table
            .get_or_init(|| CosSinTable::new(self.inv_freq.clone(), self.scaling, x.device()));
        let (cos, sin) = table.rows(positions, x.dtype())?; // [t, r/2]
        let sin = if inverse { sin.neg()? } else { sin };
        let rot = x.narrow(3, d - r, r)?.contiguous()?;
        let rot = candle_nn::rotary_emb::rope_i(&rot, &cos, &sin)?;
        if r == d {
            return Ok(rot);
        }
        Ok(Tensor::cat(&[&x.narrow(3, 0, d - r)?, &rot], 3)?)
    }
}

/// `1 / θ^(2i/dim)` for `i < ⌈dim/2⌉`, in f32 as the reference computes it (`_compute_default_rope_parameters`).
pub fn default_inv_freq(theta: f64, dim: usize) -> Vec<f32> {
    pos_freqs(theta, dim).map(|p| 1.0 / p).collect()
}

/// `θ^(2i/dim)` for `i < ⌈dim/2⌉`, in f32.
fn pos_freqs(theta: f64, dim: usize) -> impl Iterator<Item = f32> {
    let (base, d) = (theta as f32, dim as f32);
    (0..dim.div_ceil(2)).map(move |i| base.powf((2 * i) as f32 / d))
}

/// Linear scaling (position interpolation): the default frequencies divided by `factor`.
pub fn linear_inv_freq(theta: f64, dim: usize, factor: f64) -> Vec<f32> {
    let f = factor as f32;
    default_inv_freq(theta, dim)
        .into_iter()
        .map(|x| x / f)
        .collect()
}

/// LongRoPE's frequencies for one set of per-pair extension factors (`short_factor` or
/// `long_factor`): `1 / (ext[i] · θ^(2i/dim))`.
pub fn longrope_inv_freq(theta: f64, dim: usize, ext: &[f64]) -> Result<Vec<f32>> {
    let pairs = dim.div_ceil(2);
    if ext.len() != pairs {
        bail!(
            "LongRoPE: {} extension factors for {pairs} rotated pairs",
            ext.len()
        );
    }
    Ok(pos_freqs(theta, dim)
        .zip(ext)
        .map(|(p, &e)| 1.0 / (e as f32 * p))
        .collect())
}

/// YaRN (`_compute_yarn_parameters`): frequencies blended between interpolation (÷ `factor`)
/// for the slow pairs and extrapolation (unchanged) for the fast ones, with a linear ramp between
/// the pairs that turn `beta_slow` and `beta_fast` times over `original_max_position_embeddings`;
/// cos and sin are scaled by the attention factor.
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: f64,
    /// Default 32.
    pub beta_fast: f64,
    /// Default 1.
    pub beta_slow: f64,
    /// Round the ramp's ends outwards to whole pairs (default true).
    pub truncate: bool,
    /// Given outright; else derived from `mscale`/`mscale_all_dim` or `factor`.
    pub attention_factor: Option<f64>,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
}

impl Yarn {
    /// The reference's defaults for everything but `factor` and the original context.
    pub fn new(factor: f64, original_max_position_embeddings: f64) -> Self {
        Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: true,
            attention_factor: None,
            mscale: None,
            mscale_all_dim: None,
        }
    }

    /// What cos and sin are multiplied by: `attention_factor` if given, else
    /// `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` when both are set (non-zero),
    /// else `0.1·ln(factor) + 1` (1 for `factor ≤ 1`).
    pub fn attention_scaling(&self) -> f64 {
        let get_mscale = |scale: f64, m: f64| {
            if scale <= 1.0 {
                1.0
            } else {
                0.1 * m * scale.ln() + 1.0
            }
        };
        if let Some(a) = self.attention_factor {
            return a;
        }
        match (self.mscale, self.mscale_all_dim) {
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                get_mscale(self.factor, m) / get_mscale(self.factor, all)
            }
            _ => get_mscale(self.factor, 1.0),
        }
    }

    /// The `⌈dim/2⌉` frequencies for `dim = ⌊partial·head_dim⌋` rotated dims.
    pub fn inv_freq(&self, theta: f64, dim: usize) -> Result<Vec<f32>> {
        if dim < 2 || !dim.is_multiple_of(2) {
            bail!("YaRN needs an even rotary dimension, got {dim}");
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !(positive(self.factor)
            && positive(self.original_max_position_embeddings)
            && positive(theta)
            && theta > 1.0)
        {
            bail!(
                "YaRN: factor {}, original_max_position_embeddings {} and rope_theta {theta} must be positive (θ > 1)",
                self.factor,
                self.original_max_position_embeddings
            );
        }
        // The pair index that turns `rotations` times over the original context, as a float.
        let correction_dim = |rotations: f64| {
            (dim as f64
                * (self.original_max_position_embeddings
                    / (rotations * 2.0 * std::f64::consts::PI))
                    .ln())
                / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (
            correction_dim(self.beta_fast),
            correction_dim(self.beta_slow),
        );
        if self.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let mut high = high.min((dim - 1) as f64);
        if low == high {
            high += 0.001; // as the reference: no division by zero
        }
        let span = (high - low) as f32;
        let factor = self.factor as f32;
        Ok(pos_freqs(theta, dim)
            .enumerate()
            .map(|(i, pos_freq)| {
                let extrapolation = 1.0 / pos_freq;
                let interpolation = 1.0 / (factor * pos_freq);
                let ramp = ((i as f32 - low as f32) / span).clamp(0.0, 1.0);
                let extrapolation_factor = 1.0 - ramp;
                interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
            })
            .collect())
    }
}

/// Llama 3.1's frequency-dependent scaling (`_compute_llama3_parameters`): pairs whose
/// wavelength exceeds `original / low_freq_factor` are divided by `factor`, those shorter than
/// `original / high_freq_factor` are kept, and the band between is interpolated smoothly.
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3 {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

impl Llama3 {
    pub fn inv_freq(&self, theta: f64, dim: usize) -> Result<Vec<f32>> {
        if self.high_freq_factor == self.low_freq_factor {
            bail!("llama3 RoPE: high_freq_factor equals low_freq_factor");
        }
        let old = self.original_max_position_embeddings;
        let low_wavelen = (old / self.low_freq_factor) as f32;
        let high_wavelen = (old / self.high_freq_factor) as f32;
        let factor = self.factor as f32;
        let (lf, hf) = (self.low_freq_factor as f32, self.high_freq_factor as f32);
        Ok(default_inv_freq(theta, dim)
            .into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                let scaled = if wavelen > low_wavelen { f / factor } else { f };
                if wavelen < high_wavelen || wavelen > low_wavelen {
                    scaled
                } else {
                    let smooth = (old as f32 / wavelen - lf) / (hf - lf);
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                }
            })
            .collect())
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
        assert_eq!(r.inv_freq(), vec![1.0, 0.0, 0.0, 0.0]);
        let r = Rotary::proportional(1e6, 16, 2, 2.0, &dev).unwrap();
        let want1 = 1.0 / 1e6f32.powf(2.0 / 16.0) / 2.0;
        assert_eq!(r.inv_freq()[0], 0.5);
        assert!((r.inv_freq()[1] - want1).abs() < 1e-9);
        assert!(r.inv_freq()[2..].iter().all(|&f| f == 0.0));

        let x: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
        let xt = Tensor::from_vec(x.clone(), (1, 1, 1, 16), &dev).unwrap();
        let y: Vec<f32> = r
            .apply(&xt, 5)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = reference(&x, 5.0, r.inv_freq());
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
        }
        // Dims 2..8 and 10..16 do not move.
        assert_eq!(&y[2..8], &x[2..8]);
        assert_eq!(&y[10..], &x[10..]);
    }

    /// Ranges are read from blocks of the table: within one block, across block ends, far
    /// past what was built, in f32 and bf16, and scattered positions, all equal the angles
    /// computed for those positions alone.
    #[test]
    fn table_blocks_give_every_range_the_angles_of_its_positions() {
        let dev = Device::Cpu;
        let t = CosSinTable::new(vec![1.0, 0.25, 0.0, 1e-3], 1.5, &dev);
        let rows =
            |c: Tensor| -> Vec<Vec<f32>> { c.to_dtype(DType::F32).unwrap().to_vec2().unwrap() };
        for (start, len) in [(0, 1), (3, 7), (500, 30), (1020, 600), (5000, 1), (0, 0)] {
            let positions: Vec<usize> = (start..start + len).collect();
            let (want_c, want_s) = t.angles(&positions).unwrap();
            for dtype in [DType::F32, DType::BF16] {
                let (c, s) = t.range(start, len, dtype).unwrap();
                assert_eq!(c.dtype(), dtype);
                let cast = |w: &Tensor| rows(w.to_dtype(dtype).unwrap());
                assert_eq!(rows(c), cast(&want_c), "cos {start}+{len} {dtype:?}");
                assert_eq!(rows(s), cast(&want_s), "sin {start}+{len} {dtype:?}");
            }
        }
        assert_eq!(t.blocks.read().unwrap().len(), 5000 / BLOCK + 1);
        let scattered = [7, 3, 4000, 3];
        let (c, _) = t.rows(&scattered, DType::F32).unwrap();
        assert_eq!(rows(c), rows(t.angles(&scattered).unwrap().0));
        // Frequency 0 turns nothing; the others turn by position · frequency, times 1.5.
        let (c, s) = t.range(700, 1, DType::F32).unwrap();
        let (c, s) = (rows(c)[0].clone(), rows(s)[0].clone());
        assert_eq!((c[2], s[2]), (1.5, 0.0));
        assert_eq!((c[1], s[1]), (175f32.cos() * 1.5, 175f32.sin() * 1.5));
    }

    #[test]
    fn leading_rotates_the_first_dims_and_scales_cos_sin() {
        let dev = Device::Cpu;
        let inv = default_inv_freq(10_000.0, 4);
        let r = Rotary::leading(inv.clone(), 8, 1.5, &dev).unwrap();
        let x: Vec<f32> = (0..8).map(|i| (i as f32 * 0.61).cos()).collect();
        let xt = Tensor::from_vec(x.clone(), (1, 1, 1, 8), &dev).unwrap();
        let y: Vec<f32> = r
            .apply(&xt, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // The first 4 dims rotate as pairs (0, 2), (1, 3), cos/sin times 1.5; dims 4..8 pass.
        let want: Vec<f32> = reference(&x[..4], 3.0, &inv)
            .iter()
            .map(|v| v * 1.5)
            .collect();
        for (a, b) in y[..4].iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
        }
        assert_eq!(&y[4..], &x[4..]);
        assert!(Rotary::leading(vec![1.0; 5], 8, 1.0, &dev).is_err());
        assert!(Rotary::leading(vec![1.0; 2], 8, 0.0, &dev).is_err());
    }

    #[test]
    fn yarn_blends_interpolation_and_extrapolation() {
        // XS.2-like over 8 rotated dims: ramp from pair 0 (kept) to pair 2 (÷ factor).
        let mut y = Yarn::new(32.0, 4096.0);
        y.beta_fast = 64.0;
        let f = y.inv_freq(500_000.0, 8).unwrap();
        let d = default_inv_freq(500_000.0, 8);
        assert_eq!(f[0], d[0]);
        assert!((f[1] - (d[1] / 32.0 * 0.5 + d[1] * 0.5)).abs() < 1e-9);
        assert!((f[3] - d[3] / 32.0).abs() < 1e-12);
        assert!((y.attention_scaling() - (0.1 * 32f64.ln() + 1.0)).abs() < 1e-12);
        y.attention_factor = Some(1.0);
        assert_eq!(y.attention_scaling(), 1.0);
        assert!(y.inv_freq(500_000.0, 7).is_err());
    }

    #[test]
    fn default_rotates_every_pair_and_tables_grow() {
        let dev = Device::Cpu;
        let r = Rotary::default_rope(10_000.0, 4, &dev).unwrap();
        assert_eq!(r.inv_freq(), vec![1.0, 0.01]);
        let (c, _) = r.cos_sin(100, 3, DType::F32).unwrap();
        let c: Vec<Vec<f32>> = c.to_vec2().unwrap();
        assert_eq!(c[2][0], 102f32.cos());
        assert!(Rotary::default_rope(1e4, 5, &dev).is_err());
    }

    /// Interleaved pairs over the trailing dims, rows of the cached table at any positions
    /// (ascending, gapped, out of order), as the formula says; the inverse undoes it.
    #[test]
    fn interleaved_rows_at_any_positions_equal_the_formula() {
        let dev = Device::Cpu;
        let (inv, scaling) = (vec![0.9f32, 0.05], 1.25f32);
        let rope = InterleavedRope::new(inv.clone(), scaling as f64).unwrap();
        let d = 6; // 2 leading dims pass through, 4 rotate in pairs (2,3), (4,5)
        for positions in [vec![0usize, 1, 2], vec![0, 4, 8], vec![130, 3, 77]] {
            let t = positions.len();
            let x: Vec<f32> = (0..t * d).map(|i| (i as f32 * 0.37).sin()).collect();
            let xt = Tensor::from_vec(x.clone(), (1, 1, t, d), &dev).unwrap();
            let y: Vec<f32> = rope
                .apply(&xt, &positions, false)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (j, &p) in positions.iter().enumerate() {
                let row = &x[j * d..(j + 1) * d];
                assert_eq!(&y[j * d..j * d + 2], &row[..2], "pass-through at {p}");
                for (i, &f) in inv.iter().enumerate() {
                    let a = p as f32 * f;
                    let (c, s) = (a.cos() * scaling, a.sin() * scaling);
                    let (x0, x1) = (row[2 + 2 * i], row[3 + 2 * i]);
                    let want = [x0 * c - x1 * s, x1 * c + x0 * s];
                    for (k, w) in want.iter().enumerate() {
                        let got = y[j * d + 2 + 2 * i + k];
                        assert!((got - w).abs() < 1e-5, "{p}/{i}: {got} vs {w}");
                    }
                }
            }
            // Back again: the inverse of a unit-scaled rotation restores x.
            let unit = InterleavedRope::new(inv.clone(), 1.0).unwrap();
            let there = unit.apply(&xt, &positions, false).unwrap();
            let back: Vec<f32> = unit
                .apply(&there, &positions, true)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in back.iter().zip(&x) {
                assert!((a - b).abs() < 1e-5);
            }
        }
    }
}
