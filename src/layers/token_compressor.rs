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
    /// `position_bias` `[ratio, width]` on the device, made on first use.
    device_bias: std::sync::OnceLock<Tensor>,
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
            device_bias: Default::default(),
        })
    }

    pub fn ratio(&self) -> usize {
        self.ratio
    }

    /// Feed the chunk `x` `[n, hidden]` (the tokens after those fed before); close every window
    /// it completes and return all entries made so far, `[entries, d]` (possibly 0 rows).
    pub fn forward(&self, x: &Tensor, cache: &mut LayerKv) -> Result<Tensor> {
        self.forward_on(x, cache, !crate::kernels::fast_cpu(x.device()))
    }

    /// [`Self::forward`], pooling with tensor ops (`on_device`) or on the host.
    fn forward_on(&self, x: &Tensor, cache: &mut LayerKv, on_device: bool) -> Result<Tensor> {
        let s = self.state;
        let (r, d) = (self.ratio, self.dim);
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
        let (kv, gate) = (kv.narrow(0, 0, usable)?, gate.narrow(0, 0, usable)?);
        let pooled = if on_device {
            self.pool_on_device(&kv, &gate, windows, cache)?
        } else {
            self.pool_on_host(&kv, &gate, windows, cache)?
        }; // [windows, d] f32

        // 4. Norm, then RoPE at each window's first position. [windows, d]
        let entries = self.norm.forward(&pooled.to_dtype(dtype)?)?;
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

    /// Step 3 as tensor ops (the device path: nothing read back): kv and gate `[windows·r,
    /// width]` → each window's pooled entry `[windows, d]` (f32); keeps the last window's Ca for
    /// the next forward. The same softmax-weighted sums as [`Self::pool_on_host`], in candle's
    /// order.
    fn pool_on_device(
        &self,
        kv: &Tensor,
        gate: &Tensor,
        windows: usize,
        cache: &mut LayerKv,
    ) -> Result<Tensor> {
        let (s, r, d) = (self.state, self.ratio, self.dim);
        let width = if self.overlap { 2 * d } else { d };
        let (dev, dtype) = (kv.device(), kv.dtype());
        let bias = crate::layers::once(&self.device_bias, || {
            Ok(Tensor::from_slice(&self.position_bias, (r, width), dev)?)
        })?;
        let kv = kv.to_dtype(DType::F32)?.reshape((windows, r, width))?;
        let gate = gate
            .to_dtype(DType::F32)?
            .reshape((windows, r, width))?
            .broadcast_add(bias)?;
        let (logits, values) = if self.overlap {
            let (ca_g, cb_g) = (gate.narrow(2, 0, d)?, gate.narrow(2, d, d)?);
            let (ca_v, cb_v) = (kv.narrow(2, 0, d)?, kv.narrow(2, d, d)?);
            // Window w's first slots: window w − 1's Ca; for the first, the carried one, or
            // none (logits −∞: weight 0).
            let (first_g, first_v) = match (cache.state(s.overlap_gate), cache.state(s.overlap_kv))
            {
                (Some(g), Some(v)) => (g.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?),
                _ => (
                    Tensor::full(f32::NEG_INFINITY, (r, d), dev)?,
                    Tensor::zeros((r, d), DType::F32, dev)?,
                ),
            };
            let before = |first: Tensor, ca: &Tensor| -> Result<Tensor> {
                let first = first.unsqueeze(0)?;
                Ok(if windows > 1 {
                    Tensor::cat(&[&first, &ca.narrow(0, 0, windows - 1)?], 0)?
                } else {
                    first
                })
            };
            let logits = Tensor::cat(&[&before(first_g, &ca_g)?, &cb_g], 1)?; // [windows, 2r, d]
            let values = Tensor::cat(&[&before(first_v, &ca_v)?, &cb_v], 1)?;
            cache.set_state(s.overlap_kv, ca_v.get(windows - 1)?.to_dtype(dtype)?);
            cache.set_state(s.overlap_gate, ca_g.get(windows - 1)?.contiguous()?);
            (logits, values)
        } else {
            (gate, kv)
        };
        let weights = candle_nn::ops::softmax(&logits, 1)?;
        Ok((weights * values)?.sum(1)?)
    }

    /// Step 3 on the host, channel by channel.
    fn pool_on_host(
        &self,
        kv: &Tensor,
        gate: &Tensor,
        windows: usize,
        cache: &mut LayerKv,
    ) -> Result<Tensor> {
        let (s, r, d) = (self.state, self.ratio, self.dim);
        let width = if self.overlap { 2 * d } else { d };
        let dtype = kv.dtype();
        let dev = kv.device().clone();
        let kv: Vec<f32> = f32_rows(kv)?;
        let mut gate: Vec<f32> = f32_rows(gate)?;
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
        Ok(Tensor::from_vec(pooled, (windows, d), &dev)?)
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
            let diff = crate::layers::max_abs_diff(&a, &b.unwrap());
            assert!(diff < 1e-6, "overlap {overlap}: {diff}");
            // Two tokens of the open window are carried.
            let carried = steps.state("compressor carry kv").unwrap();
            assert_eq!(carried.dims()[0], 2);
            assert_eq!(steps.state("compressor overlap gate").is_some(), overlap);
        }
    }

    /// The device path's pooling against the host's, chunk by chunk from an empty cache: a first
    /// chunk that closes no window (zero entries), then chunks that close one window and several,
    /// with and without overlapping series (the carried Ca of the window before).
    #[test]
    fn device_pooling_equals_the_host() {
        let x: Vec<f32> = (0..14 * 3).map(|i| (i as f32 * 0.53).sin()).collect();
        let x = Tensor::from_vec(x, (14, 3), &Device::Cpu).unwrap();
        let max_diff = crate::layers::max_abs_diff;
        for overlap in [false, true] {
            let c = compressor(overlap, 3);
            let (mut host, mut device) = (LayerKv::default(), LayerKv::default());
            for (at, n, entries) in [(0, 2, 0), (2, 2, 1), (4, 7, 3), (11, 3, 4)] {
                let chunk = x.narrow(0, at, n).unwrap();
                let a = c.forward_on(&chunk, &mut host, false).unwrap();
                let b = c.forward_on(&chunk, &mut device, true).unwrap();
                assert_eq!(a.dim(0).unwrap(), entries, "tokens {at}..{}", at + n);
                let diff = max_diff(&a, &b);
                assert!(
                    diff < 1e-6,
                    "overlap {overlap}, tokens {at}..{}: {diff}",
                    at + n
                );
                for name in [c.state.overlap_kv, c.state.overlap_gate] {
                    match (host.state(name), device.state(name)) {
                        (None, None) => {}
                        (Some(h), Some(d)) => assert!(max_diff(h, d) < 1e-6, "{name}"),
                        _ => panic!("{name}: held by one path only"),
                    }
                }
            }
            assert_eq!(host.state(c.state.overlap_kv).is_some(), overlap);
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
