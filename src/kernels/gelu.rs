//! GELU, tanh approximation (`gelu_pytorch_tanh`), tanh soft-capping and the attention softmax,
//! as vectorised CPU kernels built on one branch-free exponential.
//!
//! candle's `Tensor::gelu` calls libm's scalar `tanhf` once per element, about a tenth of a
//! prefill on a small model. Here:
//! - `0.5·x·(1 + tanh(u))` is rewritten as the equal `x · σ(2u) = x / (1 + e^(−2u))`, with
//!   `u = √(2/π)·(x + 0.044715·x³)`: one exponential and one division, no cancellation near 0
//!   and the right limits at both ends (the far negative tail is 0).
//! - `e^t` by range reduction `t = n·ln 2 + r` (round-to-nearest with the 1.5·2²³ trick,
//!   `ln 2` split in two parts) and a degree-6 Taylor polynomial for `e^r`, `|r| ≤ ln2/2`
//!   (truncation < 2e-8 relative), scaled by `2ⁿ` built in the exponent bits. Branch-free, so
//!   LLVM vectorises the loop; compiled for AVX2+FMA when the CPU has them.
//! - Accuracy: within 2e-6 of the f64 formula over ±20 (tested on a dense grid), at least as
//!   close as candle's f32 version, whose `1 + tanh` cancels in the negative tail.
//! - The attention softmax ([`scaled_masked_softmax`]) scales, masks, exponentiates and
//!   normalises each row in one parallel pass instead of candle's four ops with libm's scalar
//!   `expf` (a tenth of an 8K-token prefill); keys the mask hides get exactly 0.

use super::gemv::SyncPtr;
use super::parallel::parallel_for;
use anyhow::Result;
use candle_core::{DType, Tensor};

/// Elements per parallel task.
const TASK: usize = 16 * 1024;

/// GELU (tanh approximation) of `x`, any shape. f32 CPU tensors take the vectorised kernel;
/// others fall back to candle's `gelu`.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if !super::fast_cpu(x.device()) || x.dtype() != DType::F32 {
        return Ok(x.gelu()?);
    }
    let mut v = x.flatten_all()?.to_vec1::<f32>()?;
    gelu_tanh_in_place(&mut v);
    Ok(Tensor::from_vec(v, x.shape(), x.device())?)
}

/// GELU (tanh approximation) of every element, in place, in parallel.
pub fn gelu_tanh_in_place(v: &mut [f32]) {
    in_parallel(v, |part, _| run(part));
}

/// Runs `f` over disjoint parts of `v` (at most [`TASK`] elements each) in parallel, with each
/// part's element range in `v`.
fn in_parallel(v: &mut [f32], f: impl Fn(&mut [f32], std::ops::Range<usize>) + Sync) {
    let n = v.len();
    let p = SyncPtr(v.as_mut_ptr());
    parallel_for(n.div_ceil(TASK), |tasks| {
        let (a, b) = (tasks.start * TASK, (tasks.end * TASK).min(n));
        // SAFETY: tasks cover disjoint ranges of `v`, which outlives `parallel_for`.
        let part = unsafe { std::slice::from_raw_parts_mut(p.get().add(a), b - a) };
        f(part, a..b);
    });
}

/// A gated MLP's product `act(gate) · up` into `gate`, in parallel, in one pass (GeGLU with
/// tanh-GELU, SwiGLU with SiLU `x / (1 + e^(−x))`): no activation tensor, no second
/// element-wise op.
pub fn gated_in_place(gate: &mut [f32], up: &[f32], silu: bool) {
    assert_eq!(gate.len(), up.len(), "gate and up widths");
    in_parallel(gate, |part, range| {
        #[cfg(target_arch = "x86_64")]
        if super::gemv::Isa::get().has_avx2() {
            // SAFETY: AVX2 and FMA were detected.
            unsafe { gated_avx2(part, &up[range], silu) };
            return;
        }
        gated_slice(part, &up[range], silu);
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gated_avx2(g: &mut [f32], u: &[f32], silu: bool) {
    gated_slice(g, u, silu)
}

#[inline(always)]
fn gated_slice(g: &mut [f32], u: &[f32], silu: bool) {
    if silu {
        for (g, &u) in g.iter_mut().zip(u) {
            *g = *g / (1.0 + exp(-*g)) * u;
        }
    } else {
        for (g, &u) in g.iter_mut().zip(u) {
            *g = gelu(*g) * u;
        }
    }
}

/// `cap · tanh(x / cap)` of every element, in place, in parallel (Gemma's logit soft-cap):
/// `tanh(y) = 1 − 2 / (e^(2y) + 1)`, and below `|y| = 1/4` (where that cancels) its Taylor series
/// to `y⁹`; within 1e-6 of the result relatively (a few f32 ulps), exact ±cap in the tails.
pub fn softcap_in_place(v: &mut [f32], cap: f32) {
    in_parallel(v, |part, _| {
        #[cfg(target_arch = "x86_64")]
        if super::gemv::Isa::get().has_avx2() {
            // SAFETY: AVX2 and FMA were detected.
            unsafe { softcap_avx2(part, cap) };
            return;
        }
        softcap_slice(part, cap);
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softcap_avx2(v: &mut [f32], cap: f32) {
    softcap_slice(v, cap)
}

#[inline(always)]
fn softcap_slice(v: &mut [f32], cap: f32) {
    let inv = 1.0 / cap;
    for x in v.iter_mut() {
        let y = inv * *x;
        let far = 1.0 - 2.0 / (exp(2.0 * y) + 1.0);
        let y2 = y * y;
        // y − y³/3 + 2y⁵/15 − 17y⁷/315 + 62y⁹/2835 (next term < 1e-8 relative at 1/4)
        let p = 62.0 / 2835.0;
        let p = p * y2 - 17.0 / 315.0;
        let p = p * y2 + 2.0 / 15.0;
        let p = p * y2 - 1.0 / 3.0;
        let near = y + y * y2 * p;
        *x = cap * if y.abs() < 0.25 { near } else { far };
    }
}

fn run(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::gemv::Isa::get().has_avx2() {
        // SAFETY: AVX2 and FMA were detected.
        unsafe { run_avx2(v) };
        return;
    }
    gelu_slice(v);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(v: &mut [f32]) {
    gelu_slice(v)
}

#[inline(always)]
fn gelu_slice(v: &mut [f32]) {
    for x in v.iter_mut() {
        *x = gelu(*x);
    }
}

/// `x · σ(2u)`, `u = √(2/π)·(x + 0.044715·x³)`; 0 once `σ(2u) < e⁻⁸⁶` (`x` below about −8.5,
/// where the true value is under 1e-36 in size).
#[inline(always)]
fn gelu(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    let g = x / (1.0 + exp(-2.0 * u));
    if u < -43.0 {
        0.0
    } else {
        g
    }
}

/// `softmax(scores · scale + mask)` over the last dimension: `scores` `[.., n, t]`, `mask`
/// `[n, t]` (additive: 0, or −∞ for a hidden key), broadcast over the leading dimensions. f32 CPU
/// tensors take one fused pass per row; others candle's ops.
pub fn scaled_masked_softmax(scores: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let fused = super::fast_cpu(scores.device())
        && scores.dtype() == DType::F32
        && scores.rank() >= 2
        && mask.is_none_or(|m| m.dtype() == DType::F32);
    if !fused {
        let mut s = scores.clone();
        if scale != 1.0 {
            s = (s * scale)?;
        }
        if let Some(m) = mask {
            s = s.broadcast_add(m)?;
        }
        return Ok(candle_nn::ops::softmax_last_dim(&s)?);
    }
    let d = scores.dims();
    let (n, t) = (d[d.len() - 2], d[d.len() - 1]);
    let mut v = scores.flatten_all()?.to_vec1::<f32>()?;
    let mask = match mask {
        Some(m) => Some(m.broadcast_as((n, t))?.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    if let Some(rows_per_task) = TASK.checked_div(t) {
        let rows_per_task = rows_per_task.max(1);
        let p = SyncPtr(v.as_mut_ptr());
        let rows = v.len() / t;
        parallel_for(rows.div_ceil(rows_per_task), |tasks| {
            let (a, b) = (
                tasks.start * rows_per_task,
                (tasks.end * rows_per_task).min(rows),
            );
            for r in a..b {
                // SAFETY: tasks cover disjoint rows of `v`, which outlives `parallel_for`.
                let row = unsafe { std::slice::from_raw_parts_mut(p.get().add(r * t), t) };
                let m = mask.as_ref().map(|m| &m[(r % n) * t..(r % n + 1) * t]);
                softmax_row(row, scale as f32, m);
            }
        });
    }
    Ok(Tensor::from_vec(v, scores.shape(), scores.device())?)
}

/// [`softmax_row_slice`], compiled for AVX2+FMA where the CPU has them.
fn softmax_row(x: &mut [f32], scale: f32, mask: Option<&[f32]>) {
    #[cfg(target_arch = "x86_64")]
    if super::gemv::Isa::get().has_avx2() {
        // SAFETY: AVX2 and FMA were detected.
        unsafe { softmax_row_avx2(x, scale, mask) };
        return;
    }
    softmax_row_slice(x, scale, mask);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(x: &mut [f32], scale: f32, mask: Option<&[f32]>) {
    softmax_row_slice(x, scale, mask)
}

/// One row in place: `x·scale + mask`, then `e^(x − max)` (exactly 0 more than 87 below the
/// maximum, which covers hidden keys), then divided by the sum. Lane-wise maxima and sums
/// (16 lanes) so LLVM vectorises every pass.
#[inline(always)]
fn softmax_row_slice(x: &mut [f32], scale: f32, mask: Option<&[f32]>) {
    const L: usize = 16;
    match mask {
        Some(m) => x.iter_mut().zip(m).for_each(|(x, m)| *x = *x * scale + m),
        None => x.iter_mut().for_each(|x| *x *= scale),
    }
    let mut lanes = [f32::NEG_INFINITY; L];
    let mut chunks = x.chunks_exact(L);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
    let mut sums = [0f32; L];
    let mut chunks = x.chunks_exact_mut(L);
    for c in &mut chunks {
        for (s, v) in sums.iter_mut().zip(c) {
            let d = *v - max;
            *v = if d < -87.0 { 0.0 } else { exp(d) };
            *s += *v;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        let d = *v - max;
        *v = if d < -87.0 { 0.0 } else { exp(d) };
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `e^t`, branch-free; `t` clamped to `[−87, 88]` (no overflow, no subnormals).
#[inline(always)]
pub(crate) fn exp(t: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75; // ln 2 to 16 bits, so n·LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6; // ln 2 − LN2_HI
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting rounds to an integer
    let t = t.clamp(-87.0, 88.0);
    let n = (t * LOG2E + ROUND) - ROUND;
    let r = (t - n * LN2_HI) - n * LN2_LO;
    // e^r, Horner: 1 + r(1 + r/2(1 + r/3(1 + r/4(1 + r/5(1 + r/6)))))
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    p * f32::from_bits((((n as i32) + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gated_products_equal_the_activation_times_up() {
        let g: Vec<f32> = (-40_000..40_000).map(|i| i as f32 * 5e-4).collect(); // ±20
        let u: Vec<f32> = g.iter().map(|x| 1.5 - x.abs() * 0.1).collect();
        for silu in [false, true] {
            let mut y = g.clone();
            gated_in_place(&mut y, &u, silu);
            for ((&x, &u), &y) in g.iter().zip(&u).zip(&y) {
                let x64 = x as f64;
                let act = if silu {
                    x64 / (1.0 + (-x64).exp())
                } else {
                    reference(x)
                };
                let want = act * u as f64;
                assert!(
                    (y as f64 - want).abs() <= 2e-6 * want.abs() + 1e-7,
                    "silu {silu}, x {x}: {y} vs {want}"
                );
            }
        }
    }

    /// The fused softmax equals candle's scale, mask add and softmax (to f32 rounding), hidden
    /// keys get exactly 0, rows of any length (not only multiples of 16) and leading dimensions
    /// broadcast the mask.
    #[test]
    fn the_fused_softmax_equals_scale_mask_and_softmax() {
        let dev = Device::Cpu;
        for (lead, n, t) in [
            (vec![1usize], 1usize, 1usize),
            (vec![2, 3], 5, 37),
            (vec![2], 4, 64),
        ] {
            let mut dims = lead.clone();
            dims.extend([n, t]);
            let len: usize = dims.iter().product();
            let s: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 40.0)
                .collect();
            let scores = Tensor::from_vec(s, dims.as_slice(), &dev).unwrap();
            // Causal with an offset: query i sees keys 0..=i + t - n.
            let m: Vec<f32> = (0..n * t)
                .map(|a| {
                    if a % t > a / t + t - n {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Tensor::from_vec(m.clone(), (n, t), &dev).unwrap();
            for (scale, mask) in [(0.125, Some(&mask)), (1.0, None)] {
                let got = scaled_masked_softmax(&scores, scale, mask).unwrap();
                let mut want = (&scores * scale).unwrap();
                if let Some(mask) = mask {
                    want = want.broadcast_add(mask).unwrap();
                }
                let want = candle_nn::ops::softmax_last_dim(&want).unwrap();
                let (got, want) = (
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 2e-6 * w.max(1e-3),
                        "{dims:?} [{i}]: {g} vs {w}"
                    );
                    if mask.is_some() && m[i % (n * t)].is_infinite() {
                        assert_eq!(*g, 0.0, "{dims:?} [{i}]: a hidden key");
                    }
                }
            }
        }
    }

    #[test]
    fn softcap_is_cap_times_tanh() {
        let mut xs: Vec<f32> = (-100_000..=100_000).map(|i| i as f32 * 1e-3).collect(); // ±100
        xs.extend([-1e30, 1e30, 0.0, -0.0, 1e-30]);
        let mut ys = xs.clone();
        softcap_in_place(&mut ys, 30.0);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = 30.0 * (x as f64 / 30.0).tanh();
            // 1e-6 relative: a few f32 ulps of the result.
            assert!(
                (y as f64 - want).abs() < 1e-30 + 1e-6 * want.abs(),
                "x {x}: {y} vs {want}"
            );
        }
    }

    /// candle's (libm) formula in f64: the reference.
    fn reference(x: f32) -> f64 {
        let x = x as f64;
        0.5 * x * (1.0 + (0.797_884_560_802_865_4 * (x + 0.044715 * x * x * x)).tanh())
    }

    /// Error against the f64 formula: relative, with an absolute floor of 1e-6·|x| where the
    /// negative tail vanishes (f32 cannot place `u` closer than that).
    fn error(x: f32, y: f32) -> f64 {
        let want = reference(x);
        (y as f64 - want).abs() / (want.abs() + 1e-6 * (x.abs() as f64).max(1.0))
    }

    #[test]
    fn is_as_accurate_as_candles_scalar_gelu() {
        let mut xs: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 1e-4).collect(); // ±20
        xs.extend([
            -1e4, -100.0, -30.0, 1e-30, -1e-30, 0.0, 30.0, 100.0, 1e4, 3e38, -3e38,
        ]);
        let mut ys = xs.clone();
        gelu_tanh_in_place(&mut ys);
        let mut portable = xs.clone();
        gelu_slice(&mut portable);
        let candle: Vec<f32> = Tensor::new(xs.as_slice(), &Device::Cpu)
            .unwrap()
            .gelu()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (mut ours, mut theirs) = (0f64, 0f64);
        for (((&x, &y), &p), &c) in xs.iter().zip(&ys).zip(&portable).zip(&candle) {
            let e = error(x, y);
            assert!(e < 2e-6, "gelu({x}) = {y}, want {}", reference(x));
            assert!(error(x, p) < 2e-6, "portable gelu({x}) = {p}");
            ours = ours.max(e);
            if c.is_finite() {
                theirs = theirs.max(error(x, c));
            }
        }
        assert!(
            ours > 0.0 && ours <= theirs,
            "worst error {ours:e}, candle's {theirs:e}"
        );
        let t = Tensor::new(&[[-1f32, 0.5], [2.0, -3.0]], &Device::Cpu).unwrap();
        let (a, b) = (gelu_tanh(&t).unwrap(), t.gelu().unwrap());
        assert_eq!(a.dims(), &[2, 2]);
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
