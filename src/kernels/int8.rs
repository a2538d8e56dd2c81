//! q8_0 and q4_0 weights times activations as int8 products (AVX512-VNNI `vpdpbusd`), as
//! llama.cpp multiplies its quantized types: `Y = X · Wᵀ` with `X` `[m, k]` f32 activations
//! quantized to q8 first (per row, blocks of 32: `d = amax / 127`, `q = round(x / d)`), `W`
//! `[n, k]` in blocks of 32 with one scale each, `Y` `[m, n]` f32. [`gemm`] serves prompt chunks,
//! [`gemv_rows`] decode steps (one row), so both round the activations alike.
//!
//! Notable:
//! - Lanes hold output columns, not `k`: one `vpdpbusd` adds 4 products into each of 16 outputs,
//!   so a block of 32 costs 8 instructions per 16 outputs and activation row, plus one convert
//!   and two multiply-adds to apply the two scales: ~2× fewer instructions than f32 FMAs, and
//!   weights move 1 byte (q8_0) or ½ byte (q4_0) instead of 4.
//! - `vpdpbusd` multiplies unsigned by signed bytes. The weights go unsigned: q4_0's codes are
//!   already `q ∈ [0, 15]` with `w = d·(q − 8)`; q8_0's get `+ 128`. With `o` that offset,
//!   `Σ w·x = Σ (q)·x − o·Σ x`, and `Σ x` per activation block is kept from the quantization.
//! - A task owns [`NR`] weight rows and repacks each panel of them once (as wide as the f32
//!   GEMM's, `super::gemm::panel_columns`; the stored row-major blocks stay as the decode gemv
//!   reads them): for every block and every 4 columns, the 4 bytes of each of the 32 rows side
//!   by side (two 64-byte registers), then the rows' scales. All `m` activation rows then stream past the packed panel in groups of [`MR`].
//! - The gemv reads the stored blocks as they are, two blocks (64 weights) per register: q4_0's
//!   16 + 16 code bytes unpack to `[lo₀ lo₁ hi₀ hi₁]` (16 bytes each), so the activation codes
//!   are stored in that order once per token; q8_0's signed weights take llama.cpp's sign trick
//!   (`|w|` times `x` with `w`'s sign). The activation scales and q4_0's `8·Σx` corrections are
//!   laid out per register lane once per token too.
//! - Integer sums are exact; what differs from the f32-activation product is the activations'
//!   rounding to 8 bits (relative RMS ~0.5 % per product).

use super::gemv::{SyncPtr, WeightRows, Q8_BLOCK};
use super::parallel::parallel_for;
use std::cell::RefCell;

/// Weight rows per task and per packed panel (two 16-lane registers).
const NR: usize = 32;
/// Activation rows per register tile (2 × MR integer and 2 × MR float accumulators).
const MR: usize = 6;

/// `x` `[m, k]` quantized to q8 per row and block of 32: codes, scales, code sums.
pub(crate) struct QuantRows {
    pub(crate) q: Vec<i8>,
    pub(crate) d: Vec<f32>,
    pub(crate) sum: Vec<i32>,
}

impl QuantRows {
    /// `k` must be a multiple of 32. As GGML's `quantize_row_q8_0`, but the scale stays f32:
    /// rounding to nearest with ties to even, as its AVX version does (`_mm256_round_ps`), which
    /// vectorises (the reference version's `roundf`, ties away from zero, is a libm call per
    /// value: 7 % of a q4_0 prompt's time).
    pub(crate) fn quantize(x: &[f32], k: usize) -> QuantRows {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F detected.
            unsafe { Self::quantize_avx512(x, k) }
        } else {
            Self::quantize_portable(x, k)
        }
    }

    /// [`QuantRows::quantize`] compiled for AVX-512, where the rounding is one instruction.
    #[target_feature(enable = "avx512f")]
    unsafe fn quantize_avx512(x: &[f32], k: usize) -> QuantRows {
        Self::quantize_portable(x, k)
    }

    #[inline(always)]
    fn quantize_portable(x: &[f32], k: usize) -> QuantRows {
        let blocks = x.len() / Q8_BLOCK;
        let mut out = QuantRows {
            q: vec![0; x.len()],
            d: vec![0.0; blocks],
            sum: vec![0; blocks],
        };
        debug_assert!(k.is_multiple_of(Q8_BLOCK));
        for (((x, q), d), sum) in x
            .chunks_exact(Q8_BLOCK)
            .zip(out.q.chunks_exact_mut(Q8_BLOCK))
            .zip(&mut out.d)
            .zip(&mut out.sum)
        {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            *d = amax / 127.0;
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            for (q, &v) in q.iter_mut().zip(x) {
                *q = (v * id).round_ties_even() as i8;
            }
            *sum = q.iter().map(|&v| i32::from(v)).sum();
        }
        out
    }
}

/// One activation row quantized for [`gemv`]: codes in the order the kernel unpacks weights, and
/// per pair of blocks (one register) the lane-wise scales and integer corrections.
pub(crate) struct GemvRow {
    /// q4_0 order within each pair of blocks: `x₀[..16] x₁[..16] x₀[16..] x₁[16..]`; q8_0: as is.
    q: Vec<i8>,
    /// Per pair, 16 lanes: the block's `d` on the lanes that sum that block.
    d: Vec<f32>,
    /// Per pair, 16 lanes (q4_0): `8·Σx` of a block on one lane of its own, else 0.
    corr: Vec<i32>,
}

impl GemvRow {
    /// `x` (`k` a multiple of 32; an odd last block makes a half pair, zero-padded) for weights
    /// of `format` (q8_0 when `q4` is false).
    fn new(x: &[f32], q4: bool) -> GemvRow {
        let r = QuantRows::quantize(x, x.len());
        let pairs = x.len().div_ceil(64);
        let mut padded = r.q;
        padded.resize(pairs * 64, 0);
        let (mut d, mut sum) = (r.d, r.sum);
        d.resize(pairs * 2, 0.0);
        sum.resize(pairs * 2, 0);
        let mut row = GemvRow {
            q: padded.clone(),
            d: vec![0.0; pairs * 16],
            corr: vec![0; pairs * 16],
        };
        for p in 0..pairs {
            let (b0, b1) = (2 * p, 2 * p + 1);
            // Lane → block: q4_0 `[b0 ×4, b1 ×4, b0 ×4, b1 ×4]`, q8_0 `[b0 ×8, b1 ×8]`.
            for lane in 0..16 {
                let b = if q4 {
                    b0 + (lane / 4) % 2
                } else {
                    b0 + lane / 8
                };
                row.d[p * 16 + lane] = d[b];
            }
            if q4 {
                let src = &padded[p * 64..p * 64 + 64];
                let dst = &mut row.q[p * 64..p * 64 + 64];
                dst[..16].copy_from_slice(&src[..16]);
                dst[16..32].copy_from_slice(&src[32..48]);
                dst[32..48].copy_from_slice(&src[16..32]);
                dst[48..].copy_from_slice(&src[48..]);
                row.corr[p * 16] = 8 * sum[b0];
                row.corr[p * 16 + 4] = 8 * sum[b1];
            }
        }
        row
    }
}

/// `y = W · x` for one activation row (decode): rows `rows` of q8_0/q4_0 `w` `[n, k]`, `x` from
/// [`gemv_row`] for the same `w`. The caller checked the CPU features
/// (AVX-512F/BW/VL, AVX512-VNNI).
pub(crate) fn gemv_rows(
    w: WeightRows<'_>,
    rows: std::ops::Range<usize>,
    x: &GemvRow,
    y: &mut [f32],
) {
    // SAFETY: the caller checked AVX-512F/BW/VL and AVX512-VNNI; `rows` are rows of `w`, `y`
    // holds one value per row, `x` is `k` codes with their per-pair lanes.
    unsafe { x86::gemv(w, rows, x, y) }
}

/// `ys[i] = W · xs[i]` for a few activation rows (a verify pass): rows `rows` of `w`, each `xs[i]`
/// from [`gemv_row`], `ys[i]` one value per row. Each weight register is loaded, unpacked and
/// scaled once for every activation row (four at a time), so a few rows cost little more than
/// one; the weights still stream front to back. The caller checked the CPU features.
pub(crate) fn gemv_rows_multi(
    w: WeightRows<'_>,
    rows: std::ops::Range<usize>,
    xs: &[GemvRow],
    ys: &mut [&mut [f32]],
) {
    assert_eq!(xs.len(), ys.len(), "one output per activation row");
    for (xs, ys) in xs.chunks(4).zip(ys.chunks_mut(4)) {
        // SAFETY: as `gemv_rows`, for each row of `xs`.
        unsafe {
            match xs.len() {
                1 => x86::gemv_multi::<1>(w, rows.clone(), xs, ys),
                2 => x86::gemv_multi::<2>(w, rows.clone(), xs, ys),
                3 => x86::gemv_multi::<3>(w, rows.clone(), xs, ys),
                _ => x86::gemv_multi::<4>(w, rows.clone(), xs, ys),
            }
        }
    }
}

/// [`GemvRow::new`] for `w`'s format.
pub(crate) fn gemv_row(w: WeightRows<'_>, x: &[f32]) -> GemvRow {
    GemvRow::new(x, matches!(w, WeightRows::Q4_0(_)))
}

thread_local! {
    /// Per-thread packed panel: `NR × kc` code bytes, then the scales.
    static PANEL: RefCell<(Vec<u8>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `y = x · wᵀ` for q8_0/q4_0 `w` `[n, k]`, `x` `[m, k]`, `y` `[m, n]` (overwritten). The caller
/// checked the shapes and that this CPU has AVX-512F, AVX512-BW and AVX512-VNNI.
pub(crate) fn gemm(w: WeightRows<'_>, x: &[f32], m: usize, y: &mut [f32]) {
    let (k, n) = (x.len() / m, y.len() / m);
    let offset = match w {
        WeightRows::Q8_0(_) => 128,
        WeightRows::Q4_0(_) => 8,
        _ => unreachable!("int8 products are for q8_0 and q4_0 weights"),
    };
    let xq = QuantRows::quantize(x, k);
    let kc = super::gemm::panel_columns(k);
    y.fill(0.0);
    let yp = SyncPtr(y.as_mut_ptr());
    parallel_for(n.div_ceil(NR), |tasks| {
        PANEL.with(|panel| {
            let (codes, scales) = &mut *panel.borrow_mut();
            for t in tasks {
                let (j0, nc) = (t * NR, NR.min(n - t * NR));
                for k0 in (0..k).step_by(kc) {
                    let kl = kc.min(k - k0);
                    pack(w, k, (j0, nc), (k0, kl), codes, scales);
                    // SAFETY: the caller checked the CPU features; `codes`/`scales` hold the
                    // packed panel of `kl / 32` blocks; this task alone writes columns
                    // `j0..j0 + nc` of `y` (`m` rows of `n`), which outlives `parallel_for`.
                    unsafe {
                        x86::panel(
                            (&xq, k, k0, m),
                            (codes, scales, kl / Q8_BLOCK, offset),
                            (yp.get().add(j0), n, nc),
                        )
                    }
                }
            }
        })
    });
}

/// Packs weight rows `j0..j0 + nc` (padded with zero-scale rows to [`NR`]), columns
/// `k0..k0 + kl`: per block, per 4 columns, 4 unsigned code bytes of each row; the rows' scales
/// per block.
fn pack(
    w: WeightRows<'_>,
    k: usize,
    (j0, nc): (usize, usize),
    (k0, kl): (usize, usize),
    codes: &mut Vec<u8>,
    scales: &mut Vec<f32>,
) {
    let blocks = kl / Q8_BLOCK;
    codes.clear();
    codes.resize(blocks * Q8_BLOCK * NR, 0);
    scales.clear();
    scales.resize(blocks * NR, 0.0);
    let (b0, nb) = (k0 / Q8_BLOCK, k / Q8_BLOCK);
    for r in 0..nc {
        let row = j0 + r;
        for b in 0..blocks {
            // The block's 32 unsigned codes in column order.
            let mut u = [0u8; Q8_BLOCK];
            let d = match w {
                WeightRows::Q8_0(m) => {
                    let (q, s) = m.raw();
                    let at = row * k + k0 + b * Q8_BLOCK;
                    for (u, &q) in u.iter_mut().zip(&q[at..at + Q8_BLOCK]) {
                        *u = (q as u8) ^ 0x80; // q + 128
                    }
                    s[row * nb + b0 + b]
                }
                WeightRows::Q4_0(m) => {
                    let (q, s) = m.raw();
                    let at = (row * k + k0 + b * Q8_BLOCK) / 2;
                    let (lo, hi) = u.split_at_mut(Q8_BLOCK / 2);
                    for ((lo, hi), &byte) in lo.iter_mut().zip(hi).zip(&q[at..at + Q8_BLOCK / 2]) {
                        (*lo, *hi) = (byte & 15, byte >> 4);
                    }
                    s[row * nb + b0 + b]
                }
                _ => unreachable!("int8 products are for q8_0 and q4_0 weights"),
            };
            scales[b * NR + r] = d.to_f32();
            let dst = &mut codes[b * Q8_BLOCK * NR..];
            for (quad, u) in u.chunks_exact(4).enumerate() {
                let at = (quad * NR + r) * 4;
                dst[at..at + 4].copy_from_slice(u);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{QuantRows, MR, NR};
    use crate::kernels::gemv::Q8_BLOCK;
    use std::arch::x86_64::*;

    /// `y[i, ..nc] += x[i] · panel` for every activation row `i < m`, in tiles of [`MR`] rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn panel(
        (xq, k, k0, m): (&QuantRows, usize, usize, usize),
        (codes, scales, blocks, offset): (&[u8], &[f32], usize, i32),
        (y, ys, nc): (*mut f32, usize, usize),
    ) {
        let mut i = 0;
        while i < m {
            let args = (xq, k, k0, i, (codes, scales, blocks, offset), (y, ys, nc));
            match MR.min(m - i) {
                6 => tile::<6>(args),
                5 => tile::<5>(args),
                4 => tile::<4>(args),
                3 => tile::<3>(args),
                2 => tile::<2>(args),
                _ => tile::<1>(args),
            }
            i += MR;
        }
    }

    type TileArgs<'a> = (
        &'a QuantRows,
        usize,
        usize,
        usize,
        (&'a [u8], &'a [f32], usize, i32),
        (*mut f32, usize, usize),
    );

    /// Activation rows `i0..i0 + R` against the whole packed panel, added into `y`.
    #[inline(always)]
    unsafe fn tile<const R: usize>(
        (xq, k, k0, i0, (codes, scales, blocks, offset), (y, ys, nc)): TileArgs<'_>,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let kb = k / Q8_BLOCK; // blocks per activation row
        let b0 = k0 / Q8_BLOCK;
        for b in 0..blocks {
            let mut isum = [[_mm512_setzero_si512(); 2]; R];
            let wq = codes.as_ptr().add(b * Q8_BLOCK * NR);
            for quad in 0..Q8_BLOCK / 4 {
                let w0 = _mm512_loadu_si512(wq.add(quad * NR * 4).cast());
                let w1 = _mm512_loadu_si512(wq.add(quad * NR * 4 + 64).cast());
                for (r, isum) in isum.iter_mut().enumerate() {
                    let xp =
                        xq.q.as_ptr()
                            .add((i0 + r) * k + k0 + b * Q8_BLOCK + quad * 4);
                    let xv = _mm512_set1_epi32(xp.cast::<i32>().read_unaligned());
                    isum[0] = _mm512_dpbusd_epi32(isum[0], w0, xv);
                    isum[1] = _mm512_dpbusd_epi32(isum[1], w1, xv);
                }
            }
            let d0 = _mm512_loadu_ps(scales.as_ptr().add(b * NR));
            let d1 = _mm512_loadu_ps(scales.as_ptr().add(b * NR + 16));
            for (r, (isum, acc)) in isum.iter().zip(&mut acc).enumerate() {
                let at = (i0 + r) * kb + b0 + b;
                let corr = _mm512_set1_epi32(offset * xq.sum[at]);
                let dx = _mm512_set1_ps(xq.d[at]);
                for (h, d) in [d0, d1].into_iter().enumerate() {
                    let s = _mm512_cvtepi32_ps(_mm512_sub_epi32(isum[h], corr));
                    acc[h] = _mm512_fmadd_ps(s, _mm512_mul_ps(d, dx), acc[h]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let mut out = [0f32; NR];
            _mm512_storeu_ps(out.as_mut_ptr(), acc[0]);
            _mm512_storeu_ps(out.as_mut_ptr().add(16), acc[1]);
            let yr = y.add((i0 + r) * ys);
            for (c, v) in out[..nc].iter().enumerate() {
                *yr.add(c) += v;
            }
        }
    }

    /// `y[r] = w[r] · x` for the rows `rows`: two blocks per register (an odd last block as a
    /// half pair, read with masked loads), integer sums, the scales and corrections applied per
    /// register.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    pub(super) unsafe fn gemv(
        w: crate::kernels::gemv::WeightRows<'_>,
        rows: std::ops::Range<usize>,
        x: &super::GemvRow,
        y: &mut [f32],
    ) {
        use crate::kernels::gemv::WeightRows;
        let (k, q4) = match w {
            WeightRows::Q8_0(m) => (m.in_dim(), false),
            WeightRows::Q4_0(m) => (m.in_dim(), true),
            _ => unreachable!("int8 products are for q8_0 and q4_0 weights"),
        };
        let (pairs, half) = (k / 64, !k.is_multiple_of(64));
        let (xq, xd, xc) = (x.q.as_ptr(), x.d.as_ptr(), x.corr.as_ptr());
        // Lane → which of the pair's scales: q4_0 `[0 ×4, 1 ×4, 0 ×4, 1 ×4]`, q8_0 `[0 ×8, 1 ×8]`.
        let lanes = if q4 {
            _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)
        } else {
            _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
        };
        let low = _mm256_set1_epi8(0x0f);
        for (r, y) in rows.zip(y.iter_mut()) {
            let sr = match w {
                WeightRows::Q8_0(m) => m.raw().1,
                WeightRows::Q4_0(m) => m.raw().1,
                _ => unreachable!(),
            }
            .as_ptr()
            .add(r * k / Q8_BLOCK);
            let mut acc = _mm512_setzero_ps();
            for p in 0..pairs + usize::from(half) {
                let whole = p < pairs;
                let isum = match w {
                    WeightRows::Q4_0(m) => {
                        let qp = m.raw().0.as_ptr().add(r * k / 2 + p * 32);
                        let packed = if whole {
                            _mm256_loadu_si256(qp.cast())
                        } else {
                            _mm256_maskz_loadu_epi8(0xffff, qp.cast())
                        };
                        let lo = _mm256_and_si256(packed, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
                        let codes = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                        let xv = _mm512_loadu_si512(xq.add(p * 64).cast());
                        let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xv);
                        _mm512_sub_epi32(isum, _mm512_loadu_si512(xc.add(p * 16).cast()))
                    }
                    WeightRows::Q8_0(m) => {
                        let qp = m.raw().0.as_ptr().add(r * k + p * 64);
                        let wv = if whole {
                            _mm512_loadu_si512(qp.cast())
                        } else {
                            _mm512_maskz_loadu_epi8(u64::from(u32::MAX), qp.cast())
                        };
                        let xv = _mm512_loadu_si512(xq.add(p * 64).cast());
                        // |w| times x with w's sign: vpdpbusd wants its first factor unsigned.
                        let neg = _mm512_movepi8_mask(wv);
                        let xs = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);
                        _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(wv), xs)
                    }
                    _ => unreachable!(),
                };
                // The pair's f16 scales (a half pair has one) on the lanes that use them.
                let bits = if whole {
                    sr.add(2 * p).cast::<i32>().read_unaligned()
                } else {
                    i32::from(sr.add(2 * p).cast::<u16>().read_unaligned())
                };
                let ds = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
                let dw = _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(ds));
                let scale = _mm512_mul_ps(dw, _mm512_loadu_ps(xd.add(p * 16)));
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc);
            }
            *y = _mm512_reduce_add_ps(acc);
        }
    }

    /// [`gemv`] for `M` activation rows at once (`xs`, `ys` of length `M`): per pair of blocks
    /// the weights are loaded and unpacked, and their scales converted, once. (`gemv` stays
    /// separate: as `gemv_multi::<1>` the decode step's kernel measured 5-10 % slower on one
    /// thread.)
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    pub(super) unsafe fn gemv_multi<const M: usize>(
        w: crate::kernels::gemv::WeightRows<'_>,
        rows: std::ops::Range<usize>,
        xs: &[super::GemvRow],
        ys: &mut [&mut [f32]],
    ) {
        use crate::kernels::gemv::WeightRows;
        let (k, q4) = match w {
            WeightRows::Q8_0(m) => (m.in_dim(), false),
            WeightRows::Q4_0(m) => (m.in_dim(), true),
            _ => unreachable!("int8 products are for q8_0 and q4_0 weights"),
        };
        let (pairs, half) = (k / 64, !k.is_multiple_of(64));
        let xq: [*const i8; M] = std::array::from_fn(|i| xs[i].q.as_ptr());
        let xd: [*const f32; M] = std::array::from_fn(|i| xs[i].d.as_ptr());
        let xc: [*const i32; M] = std::array::from_fn(|i| xs[i].corr.as_ptr());
        let lanes = if q4 {
            _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)
        } else {
            _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
        };
        let low = _mm256_set1_epi8(0x0f);
        for (j, r) in rows.enumerate() {
            let sr = match w {
                WeightRows::Q8_0(m) => m.raw().1,
                WeightRows::Q4_0(m) => m.raw().1,
                _ => unreachable!(),
            }
            .as_ptr()
            .add(r * k / Q8_BLOCK);
            let mut acc = [_mm512_setzero_ps(); M];
            for p in 0..pairs + usize::from(half) {
                let whole = p < pairs;
                // The pair's weights, as vpdpbusd's unsigned factor, and (q8_0) their signs.
                let (codes, neg) = match w {
                    WeightRows::Q4_0(m) => {
                        let qp = m.raw().0.as_ptr().add(r * k / 2 + p * 32);
                        let packed = if whole {
                            _mm256_loadu_si256(qp.cast())
                        } else {
                            _mm256_maskz_loadu_epi8(0xffff, qp.cast())
                        };
                        let lo = _mm256_and_si256(packed, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
                        (_mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi), 0)
                    }
                    WeightRows::Q8_0(m) => {
                        let qp = m.raw().0.as_ptr().add(r * k + p * 64);
                        let wv = if whole {
                            _mm512_loadu_si512(qp.cast())
                        } else {
                            _mm512_maskz_loadu_epi8(u64::from(u32::MAX), qp.cast())
                        };
                        (_mm512_abs_epi8(wv), _mm512_movepi8_mask(wv))
                    }
                    _ => unreachable!(),
                };
                let bits = if whole {
                    sr.add(2 * p).cast::<i32>().read_unaligned()
                } else {
                    i32::from(sr.add(2 * p).cast::<u16>().read_unaligned())
                };
                let ds = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
                let dw = _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(ds));
                for i in 0..M {
                    let xv = _mm512_loadu_si512(xq[i].add(p * 64).cast());
                    let isum = if q4 {
                        let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xv);
                        _mm512_sub_epi32(isum, _mm512_loadu_si512(xc[i].add(p * 16).cast()))
                    } else {
                        let xs = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);
                        _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xs)
                    };
                    let scale = _mm512_mul_ps(dw, _mm512_loadu_ps(xd[i].add(p * 16)));
                    acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[i]);
                }
            }
            for i in 0..M {
                ys[i][j] = _mm512_reduce_add_ps(acc[i]);
            }
        }
    }
}
