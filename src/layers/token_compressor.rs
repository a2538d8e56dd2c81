//! The token compressor of DeepSeek V4's compressed attention: every `ratio` tokens become one
//! cache entry. Reference: transformers 5.23.0 `DeepseekV4HCACompressor`,
//! `DeepseekV4CSACompressor` and the compressor inside `DeepseekV4Indexer`, with their cache
//! layers `DeepseekV4HCACache` / `DeepseekV4CSACache`.
//!
//! Each token is projected to a value `kv` and a gate logit `gate` per channel. A window of
//! `ratio` tokens closes into one entry: per channel, the softmax (over the window's slots) of
//! `gate + position_bias[slot]` weights the slots' values; the sum is RMS-normed (`kv_norm`) and
//! RoPE-rotated (the "compress" RoPE, trailing dims, interleaved) at the window's first position.
//!
//! - **single series** (HCA, ratio 128): the window's own `ratio` tokens.
//! - **overlapping series** (CSA, ratio 4, and the lightning indexer's keys): tokens project to
//!   two series, Ca (`[.., :d]`) and Cb (`[.., d:]`); entry `w` pools the `2·ratio` slots of
//!   window `w − 1`'s Ca and window `w`'s Cb, so each entry sees two windows. Window 0 has no
//!   predecessor: its Ca slots get weight 0.
//!
//! What the compressor carries in the layer's cache between forwards (states by name, see
//! [`CompressorState`]): the entries made so far; the raw `kv`/`gate` of the tokens of the window
//! still open (`context mod ratio` of them); with overlapping series, the last closed window's Ca
//! values and biased gate logits (the latter f32: `position_bias` is an f32 parameter). Feeding a
//! sequence in one forward or token by token gives the same entries.
//!
//! Pooling runs in f32; the entries are cast to the model dtype before the norm.

use super::kv_store::LayerKv;
use super::linear::Linear;
use super::norm::RmsNorm;
use super::rope::InterleavedRope;
use super::weight;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

/// The names of one compressor's states in the layer's cache (they match the `kv-budget` parts).
#[derive(Debug, Clone, Copy)]
pub struct CompressorState {
    /// The entries `[entries, d]`, model dtype.
    pub entries: &'static str,
    /// Open window's projected values `[tokens, width]`, model dtype.
    pub carry_kv: &'static str,
    /// Open window's gate logits `[tokens, width]`, model dtype.
    pub carry_gate: &'static str,
    /// Last closed window's Ca values `[ratio, d]` (overlapping series only).
    pub overlap_kv: &'static str,
    /// Last closed window's Ca gate logits plus `position_bias`, f32.
    pub overlap_gate: &'static str,
}

impl CompressorState {
    /// The attention's own compressor (CSA and HCA layers).
    pub const ATTENTION: CompressorState = CompressorState {
        entries: "compressed KV",
        carry_kv: "compressor carry kv",
        carry_gate: "compressor carry gate",
        overlap_kv: "compressor overlap kv",
        overlap_gate: "compressor overlap gate",
    };
    /// The lightning indexer's key compressor (CSA layers).
    pub const INDEXER: CompressorState = CompressorState {
        entries: "indexer keys",
        carry_kv: "indexer carry kv",
        carry_gate: "indexer carry gate",
        overlap_kv: "indexer overlap kv",
        overlap_gate: "indexer overlap gate",
    };
}

#[derive(Debug)]
pub struct TokenCompressor {
    ratio: usize,
    /// Entry width `d`.
    dim: usize,
    /// Two overlapping series (projections `2·d` wide) or one.
    overlap: bool,
    kv_proj: Linear,
    gate_proj: Linear,
    /// `[ratio · width]`, f32.
    position_bias: Vec<f32>,
    norm: RmsNorm,
    rope: Arc<InterleavedRope>,
    state: CompressorState,
}

impl TokenCompressor {
    /// Reads `kv_proj`, `gate_proj` `[width, hidden]`, `position_bias` `[ratio, width]` and
    /// `kv_norm` `[d]` under `vb`, `width` = `2·d` with `overlap`, else `d`.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        vb: &VarBuilder,
        hidden: usize,
        dim: usize,
        ratio: usize,
        overlap: bool,
        eps: f64,
        rope: Arc<InterleavedRope>,
        state: CompressorState,
    ) -> Result<Self> {
        if ratio == 0 {
            bail!("internal: a compressor of ratio 0");
        }
        let width = if overlap { 2 * dim } else { dim };
        Ok(TokenCompressor {
            ratio,
            dim,
            overlap,
            kv_proj: Linear::load(&vb.pp("kv_proj"), hidden, width, false)?,
            gate_proj: Linear::load(&vb.pp("gate_proj"), hidden, width, false)?,
            position_bias: weight::get_f32(vb, (ratio, width), "position_bias")?
                .flatten_all()?
                .to_vec1()?,
            norm: RmsNorm::load_f32(&vb.pp("kv_norm"), dim, eps)?,
            rope,
            state,
        })
    }

    pub fn ratio(&self) -> usize {
        self.ratio
    }

    /// Feed the chunk `x` `[n, hidden]` (the tokens after those fed before); close every window
    /// it completes and return all entries made so far, `[entries, d]` (possibly 0 rows).
    pub fn forward(&self, x: &Tensor, cache: &mut LayerKv) -> Result<Tensor> {
        let s = self.state;
        let (r, d) = (self.ratio, self.dim);
        let width = if self.overlap { 2 * d } else { d };
        let dtype = x.dtype();
        let dev = x.device().clone();

        // 1. Project, after the open window's tokens. [c + n, width] each
        let mut kv = self.kv_proj.forward(x)?;
        let mut gate = self.gate_proj.forward(x)?;
        if let (Some(ckv), Some(cg)) = (cache.state(s.carry_kv), cache.state(s.carry_gate)) {
            kv = Tensor::cat(&[ckv, &kv], 0)?;
            gate = Tensor::cat(&[cg, &gate], 0)?;
        }
        let total = kv.dim(0)?;
        let usable = total / r * r;
        let made = cache.state(s.entries).map_or(Ok(0), |e| e.dim(0))?;

        // 2. Keep the tokens of the window still open.
        if usable < total {
            cache.set_state(s.carry_kv, kv.narrow(0, usable, total - usable)?);
            cache.set_state(s.carry_gate, gate.narrow(0, usable, total - usable)?);
        } else {
            cache.remove_state(s.carry_kv);
            cache.remove_state(s.carry_gate);
        }
        if usable == 0 {
            return self.entries_or_empty(cache, dtype, &dev);
        }

        // 3. Pool each closed window, in f32. kv, gate: [windows · r, width]
        let windows = usable / r;
        let kv: Vec<f32> = f32_rows(&kv.narrow(0, 0, usable)?)?;
        let mut gate: Vec<f32> = f32_rows(&gate.narrow(0, 0, usable)?)?;
        for (i, g) in gate.iter_mut().enumerate() {
            *g += self.position_bias[i % (r * width)];
        }
        let prior: Option<(Vec<f32>, Vec<f32>)> =
            match (cache.state(s.overlap_kv), cache.state(s.overlap_gate)) {
                (Some(k), Some(g)) if self.overlap => Some((f32_rows(k)?, f32_rows(g)?)),
                _ => None,
            };
        let mut pooled = vec![0f32; windows * d];
        let mut logits = Vec::with_capacity(2 * r);
        let mut values = Vec::with_capacity(2 * r);
        for w in 0..windows {
            for c in 0..d {
                logits.clear();
                values.clear();
                if self.overlap {
                    // Ca of the previous window: this chunk's, or the one carried over.
                    if w > 0 {
                        for j in 0..r {
                            let row = ((w - 1) * r + j) * width;
                            logits.push(gate[row + c]);
                            values.push(kv[row + c]);
                        }
                    } else if let Some((pk, pg)) = &prior {
                        for j in 0..r {
                            logits.push(pg[j * d + c]);
                            values.push(pk[j * d + c]);
                        }
                    }
                }
                // The window's own slots: Cb with overlapping series, else the only series.
                let off = if self.overlap { d } else { 0 };
                for j in 0..r {
                    let row = (w * r + j) * width;
                    logits.push(gate[row + off + c]);
                    values.push(kv[row + off + c]);
                }
                pooled[w * d + c] = softmax_weighted_sum(&logits, &values);
            }
        }
        if self.overlap {
            // The last closed window's Ca, for the next forward's first window.
            let last = (windows - 1) * r;
            let (mut ok, mut og) = (Vec::with_capacity(r * d), Vec::with_capacity(r * d));
            for j in 0..r {
                let row = (last + j) * width;
                ok.extend_from_slice(&kv[row..row + d]);
                og.extend_from_slice(&gate[row..row + d]);
            }
            cache.set_state(
                s.overlap_kv,
                Tensor::from_vec(ok, (r, d), &dev)?.to_dtype(dtype)?,
            );
            cache.set_state(s.overlap_gate, Tensor::from_vec(og, (r, d), &dev)?);
        }

        // 4. Norm, then RoPE at each window's first position. [windows, d]
        let entries = self
            .norm
            .forward(&Tensor::from_vec(pooled, (windows, d), &dev)?.to_dtype(dtype)?)?;
        let positions: Vec<usize> = (made..made + windows).map(|w| w * r).collect();
        let entries = self
            .rope
            .apply(&entries.reshape((1, 1, windows, d))?, &positions, false)?
            .reshape((windows, d))?;
        let all = match cache.state(s.entries) {
            Some(old) => Tensor::cat(&[old, &entries], 0)?,
            None => entries,
        };
        cache.set_state(s.entries, all.clone());
        Ok(all)
    }

    fn entries_or_empty(
        &self,
        cache: &LayerKv,
        dtype: DType,
        dev: &candle_core::Device,
    ) -> Result<Tensor> {
        Ok(match cache.state(self.state.entries) {
            Some(e) => e.clone(),
            None => Tensor::zeros((0, self.dim), dtype, dev)?,
        })
    }
}

fn f32_rows(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// `Σ softmax(logits)_j · values_j`.
fn softmax_weighted_sum(logits: &[f32], values: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (mut num, mut den) = (0f32, 0f32);
    for (&l, &v) in logits.iter().zip(values) {
        let e = (l - max).exp();
        num += e * v;
        den += e;
    }
    num / den
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    /// A compressor over hidden 3 with random-ish weights.
    fn compressor(overlap: bool, ratio: usize) -> TokenCompressor {
        let (h, d) = (3, 4);
        let width = if overlap { 2 * d } else { d };
        let dev = Device::Cpu;
        let fill = |n: usize, k: f32| -> Vec<f32> {
            (0..n).map(|i| ((i as f32 + k) * 0.37).sin()).collect()
        };
        let mut ts = HashMap::new();
        let mut put = |name: &str, v: Vec<f32>, shape: &[usize]| {
            ts.insert(name.to_string(), Tensor::from_vec(v, shape, &dev).unwrap());
        };
        put("kv_proj.weight", fill(width * h, 1.0), &[width, h]);
        put("gate_proj.weight", fill(width * h, 2.0), &[width, h]);
        put("position_bias", fill(ratio * width, 3.0), &[ratio, width]);
        put("kv_norm.weight", fill(d, 4.0), &[d]);
        let vb = VarBuilder::from_tensors(ts, DType::F32, &dev);
        let rope = Arc::new(InterleavedRope::new(vec![1.0, 0.1], 1.0).unwrap());
        let state = CompressorState::ATTENTION;
        TokenCompressor::load(&vb, h, d, ratio, overlap, 1e-6, rope, state).unwrap()
    }

    #[test]
    fn one_forward_equals_token_by_token() {
        let x: Vec<f32> = (0..11 * 3).map(|i| (i as f32 * 0.71).cos()).collect();
        let x = Tensor::from_vec(x, (11, 3), &Device::Cpu).unwrap();
        for overlap in [false, true] {
            let c = compressor(overlap, 3);
            let mut whole = LayerKv::default();
            let a = c.forward(&x, &mut whole).unwrap();
            assert_eq!(a.dims(), &[3, 4]);
            let mut steps = LayerKv::default();
            let mut b = None;
            for t in 0..11 {
                b = Some(c.forward(&x.narrow(0, t, 1).unwrap(), &mut steps).unwrap());
            }
            let diff: f32 = (a - b.unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff < 1e-6, "overlap {overlap}: {diff}");
            // Two tokens of the open window are carried.
            let carried = steps.state("compressor carry kv").unwrap();
            assert_eq!(carried.dims()[0], 2);
            assert_eq!(steps.state("compressor overlap gate").is_some(), overlap);
        }
    }

    #[test]
    fn single_window_pools_by_softmax_of_the_gates() {
        assert!((softmax_weighted_sum(&[0.0, 0.0], &[1.0, 3.0]) - 2.0).abs() < 1e-6);
        let w = 1.0 / (1.0 + (-1f32).exp());
        let y = softmax_weighted_sum(&[1.0, 0.0], &[1.0, 0.0]);
        assert!((y - w).abs() < 1e-6);
    }
}
