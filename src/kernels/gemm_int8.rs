//! Prompt chunks against q8_0 and q4_0 weights as int8 products (AVX512-VNNI `vpdpbusd`), as
//! llama.cpp multiplies its quantized types: `Y = X · Wᵀ` with `X` `[m, k]` f32 activations
//! quantized to q8 first (per row, blocks of 32: `d = amax / 127`, `q = round(x / d)`), `W`
//! `[n, k]` in blocks of 32 with one scale each, `Y` `[m, n]` f32.
//!
//! Notable:
//! - Lanes hold output columns, not `k`: one `vpdpbusd` adds 4 products into each of 16 outputs,
//!   so a block of 32 costs 8 instructions per 16 outputs and activation row, plus one convert
//!   and two multiply-adds to apply the two scales: ~2× fewer instructions than f32 FMAs, and
//!   weights move 1 byte (q8_0) or ½ byte (q4_0) instead of 4.
//! - `vpdpbusd` multiplies unsigned by signed bytes. The weights go unsigned: q4_0's codes are
//!   already `q ∈ [0, 15]` with `w = d·(q − 8)`; q8_0's get `+ 128`. With `o` that offset,
//!   `Σ w·x = Σ (q)·x − o·Σ x`, and `Σ x` per activation block is kept from the quantization.
//! - A task owns [`NR`] weight rows and repacks each `kc`-column panel of them once (the stored
//!   row-major blocks stay as the decode gemv reads them): for every block and every 4 columns,
//!   the 4 bytes of each of the 32 rows side by side (two 64-byte registers), then the rows'
//!   scales. All `m` activation rows then stream past the packed panel in groups of [`MR`].
//! - Integer sums are exact; what differs from the f32-activation product is the activations'
//!   rounding to 8 bits (relative RMS ~0.5 % per product), which is why only prompt chunks take
//!   this path (see `super::gemm::QUANT_MIN_ROWS`).

use super::gemv::{SyncPtr, WeightRows, Q8_BLOCK};
use super::parallel::parallel_for;
use std::cell::RefCell;

/// Weight rows per task and per packed panel (two 16-lane registers).
const NR: usize = 32;
/// Activation rows per register tile (2 × MR integer and 2 × MR float accumulators).
const MR: usize = 6;
/// Most columns per packed panel (a multiple of 32).
const KC: usize = 1024;

/// `x` `[m, k]` quantized to q8 per row and block of 32: codes, scales, code sums.
pub(crate) struct QuantRows {
    pub(crate) q: Vec<i8>,
    pub(crate) d: Vec<f32>,
    pub(crate) sum: Vec<i32>,
}

impl QuantRows {
    /// `k` must be a multiple of 32. As GGML's `quantize_row_q8_0_ref`, but the scale stays f32.
    pub(crate) fn quantize(x: &[f32], k: usize) -> QuantRows {
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
                *q = (v * id).round() as i8;
            }
            *sum = q.iter().map(|&v| i32::from(v)).sum();
        }
        out
    }
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
    let panels = k.div_ceil(KC);
    let kc = (k.div_ceil(panels).div_ceil(Q8_BLOCK) * Q8_BLOCK).min(k);
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
}
