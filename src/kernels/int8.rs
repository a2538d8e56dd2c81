//! q8_0 and q4_0 weights times activations as int8 products (AVX512-VNNI `vpdpbusd`), as
//! llama.cpp multiplies its quantized types: `Y = X · Wᵀ` with `X` `[m, k]` f32 activations
//! quantized to q8 first (per row, blocks of 32: `d = amax / 127`, `q = round(x / d)`), `W`
//! `[n, k]` in blocks of 32 with one scale each, `Y` `[m, n]` f32. [`gemm`] serves prompt chunks,
//! [`gemv_rows`] decode steps (one row), so both round the activations alike.
//!
//! Notable:
//! - Lanes hold output rows, not `k`: one `vpdpbusd` adds 4 products into each of 16 outputs,
//!   so a block of 32 costs 8 instructions per 16 outputs and activation row, plus one convert
//!   and two multiply-adds to apply the two scales: ~2× fewer instructions than f32 FMAs, and
//!   weights move 1 byte (q8_0) or ½ byte (q4_0) instead of 4.
//! - `vpdpbusd` multiplies unsigned by signed bytes. The weights go unsigned: q4_0's codes are
//!   already `q ∈ [0, 15]` with `w = d·(q − 8)`; q8_0's get `+ 128`. With `o` that offset,
//!   `Σ w·x = Σ (q)·x − o·Σ x`, and `Σ x` per activation block is kept from the quantization.
//! - q4_0 is stored with its rows interleaved in groups of 16 ([`super::gemv::Q4_0Matrix`]), so
//!   decode, a verify pass's few rows and the prompt GEMM all read the blocks as stored: per
//!   block and group, 4 loads and 3 instructions each to split the nibbles give 16 rows × 32
//!   codes, then 8 `vpdpbusd` per activation row with its codes broadcast ([`x86::q4_group`]).
//! - q8_0 is stored as GGML's rows. Its GEMM has a task own [`NR`] weight rows and repack each
//!   panel of them once (as wide as the f32 GEMM's, `super::gemm::panel_columns`): for every
//!   block and every 4 columns, the 4 bytes of each of the 32 rows side by side (two 64-byte
//!   registers), then the rows' scales. All `m` activation rows then stream past the packed
//!   panel in groups of [`MR`]. Its gemv reads the rows as they are, two blocks (64 weights)
//!   per register, with llama.cpp's sign trick (`|w|` times `x` with `w`'s sign); the
//!   activation scales are laid out per register lane once per token.
//! - Integer sums are exact; what differs from the f32-activation product is the activations'
//!   rounding to 8 bits (relative RMS ~0.5 % per product).

use super::gemv::{SyncPtr, WeightRows, Q4_GROUP, Q8_BLOCK};
use super::parallel::parallel_for;
use std::cell::RefCell;

/// Weight rows per task and per packed panel (two 16-lane registers).
const NR: usize = 32;
/// Activation rows per register tile (2 × MR integer and 2 × MR float accumulators).
const MR: usize = 6;
/// Activation rows per q4_0 tile (2 × MR4 integer and MR4 float accumulators).
const MR4: usize = 8;

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

/// One activation row quantized for the gemv of one weight format.
pub(crate) enum GemvRow {
    /// For q8_0 weights: codes as is, and per pair of blocks (one register) the block's `d` on
    /// the 8 lanes that sum that block.
    Pairs { q: Vec<i8>, d: Vec<f32> },
    /// For q4_0 weights: the row as quantized.
    Blocks(QuantRows),
}

impl GemvRow {
    /// `x` (`k` a multiple of 32) for weights of q4_0 (`q4`) or q8_0. For q8_0 an odd last block
    /// makes a half pair, zero-padded.
    fn new(x: &[f32], q4: bool) -> GemvRow {
        let r = QuantRows::quantize(x, x.len());
        if q4 {
            return GemvRow::Blocks(r);
        }
        let pairs = x.len().div_ceil(64);
        let mut q = r.q;
        q.resize(pairs * 64, 0);
        // Lane → block: `[b0 ×8, b1 ×8]`.
        let d = (0..pairs * 16)
            .map(|l| r.d.get(l / 16 * 2 + l % 16 / 8).copied().unwrap_or(0.0))
            .collect();
        GemvRow::Pairs { q, d }
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
    match (w, x) {
        // SAFETY: as in `gemv_rows_multi`.
        (WeightRows::Q8_0(m), GemvRow::Pairs { q, d }) => unsafe {
            x86::gemv_q8_one(m, rows, q, d, y)
        },
        _ => gemv_rows_multi(w, rows, std::slice::from_ref(x), &mut [y]),
    }
}

/// `ys[i] = W · xs[i]` for a few activation rows (a verify pass): rows `rows` of `w`, each `xs[i]`
/// from [`gemv_row`], `ys[i]` one value per row. Each weight register is loaded, unpacked and
/// scaled once for every activation row (up to 8 at a time for q4_0, 4 for q8_0), so a few rows
/// cost little more than one; the weights still stream front to back. The caller checked the
/// CPU features.
pub(crate) fn gemv_rows_multi(
    w: WeightRows<'_>,
    rows: std::ops::Range<usize>,
    xs: &[GemvRow],
    ys: &mut [&mut [f32]],
) {
    assert_eq!(xs.len(), ys.len(), "one output per activation row");
    // SAFETY (every call below): the caller checked AVX-512F/BW/VL and AVX512-VNNI; `rows` are
    // rows of `w`, each `ys[i]` holds one value per row, each `xs[i]` is a row of `k` quantized
    // for `w`'s format.
    match w {
        WeightRows::Q4_0(m) => {
            let xs: Vec<x86::XRow> = xs.iter().map(x86::XRow::of).collect();
            for (xs, ys) in xs.chunks(8).zip(ys.chunks_mut(8)) {
                unsafe {
                    match xs.len() {
                        1 => x86::gemv_q4::<1>(m, rows.clone(), xs, ys),
                        2 => x86::gemv_q4::<2>(m, rows.clone(), xs, ys),
                        3 => x86::gemv_q4::<3>(m, rows.clone(), xs, ys),
                        4 => x86::gemv_q4::<4>(m, rows.clone(), xs, ys),
                        5 => x86::gemv_q4::<5>(m, rows.clone(), xs, ys),
                        6 => x86::gemv_q4::<6>(m, rows.clone(), xs, ys),
                        7 => x86::gemv_q4::<7>(m, rows.clone(), xs, ys),
                        _ => x86::gemv_q4::<8>(m, rows.clone(), xs, ys),
                    }
                }
            }
        }
        WeightRows::Q8_0(m) => {
            for (xs, ys) in xs.chunks(4).zip(ys.chunks_mut(4)) {
                unsafe {
                    match xs.len() {
                        1 => x86::gemv_q8::<1>(m, rows.clone(), xs, ys),
                        2 => x86::gemv_q8::<2>(m, rows.clone(), xs, ys),
                        3 => x86::gemv_q8::<3>(m, rows.clone(), xs, ys),
                        _ => x86::gemv_q8::<4>(m, rows.clone(), xs, ys),
                    }
                }
            }
        }
        _ => unreachable!("int8 products are for q8_0 and q4_0 weights"),
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
    let xq = QuantRows::quantize(x, k);
    let kc = super::gemm::panel_columns(k);
    y.fill(0.0);
    let yp = SyncPtr(y.as_mut_ptr());
    if let WeightRows::Q4_0(w) = w {
        // One group of 16 weight rows per task, read as stored, a panel of `kc` columns at a
        // time for every tile of activation rows.
        return parallel_for(n.div_ceil(Q4_GROUP), |groups| {
            for g in groups {
                for k0 in (0..k).step_by(kc) {
                    let blocks = k0 / Q8_BLOCK..(k0 + kc).min(k) / Q8_BLOCK;
                    // SAFETY: the caller checked the CPU features and shapes; this task alone
                    // writes columns `16g..16g + 16` of `y` (`m` rows of `n`), which outlives
                    // `parallel_for`.
                    unsafe { x86::q4_panel(w, g, blocks, (&xq, m), (yp.get(), n)) }
                }
            }
        });
    }
    let offset = match w {
        WeightRows::Q8_0(_) => 128,
        _ => unreachable!("int8 products are for q8_0 and q4_0 weights"),
    };
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

/// Packs q8_0 weight rows `j0..j0 + nc` (padded with zero-scale rows to [`NR`]), columns
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
    let WeightRows::Q8_0(m) = w else {
        unreachable!("the packed GEMM is for q8_0 weights")
    };
    let (q, s) = m.raw();
    let blocks = kl / Q8_BLOCK;
    codes.clear();
    codes.resize(blocks * Q8_BLOCK * NR, 0);
    scales.clear();
    scales.resize(blocks * NR, 0.0);
    let (b0, nb) = (k0 / Q8_BLOCK, k / Q8_BLOCK);
    for r in 0..nc {
        let row = j0 + r;
        for b in 0..blocks {
            let at = row * k + k0 + b * Q8_BLOCK;
            scales[b * NR + r] = s[row * nb + b0 + b].to_f32();
            let dst = &mut codes[b * Q8_BLOCK * NR..];
            for (quad, q) in q[at..at + Q8_BLOCK].chunks_exact(4).enumerate() {
                let at = (quad * NR + r) * 4;
                for (u, &q) in dst[at..at + 4].iter_mut().zip(q) {
                    *u = (q as u8) ^ 0x80; // q + 128
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{GemvRow, QuantRows, MR, MR4, NR};
    use crate::kernels::gemv::{Q4_0Matrix, Q8_0Matrix, Q4_GROUP, Q8_BLOCK};
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

    /// `y[r] = w[r] · x` for q8_0 rows `rows`, `x` its codes `q` and per-lane scales `d`: two
    /// blocks per register (an odd last block as a half pair, read with masked loads), integer
    /// sums, the scales applied per register. (Not `gemv_q8::<1>`: the decode step's kernel
    /// measured 5-10 % slower that way on one thread.)
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    pub(super) unsafe fn gemv_q8_one(
        m: &Q8_0Matrix,
        rows: std::ops::Range<usize>,
        x: &[i8],
        d: &[f32],
        y: &mut [f32],
    ) {
        let k = m.in_dim();
        let (pairs, half) = (k / 64, !k.is_multiple_of(64));
        let (qs, s) = m.raw();
        let (xq, xd) = (x.as_ptr(), d.as_ptr());
        for (r, y) in rows.zip(y.iter_mut()) {
            let sr = s.as_ptr().add(r * k / Q8_BLOCK);
            let mut acc = _mm512_setzero_ps();
            for p in 0..pairs + usize::from(half) {
                let whole = p < pairs;
                let (codes, neg) = q8_pair(qs.as_ptr().add(r * k + p * 64), whole);
                let xv = _mm512_loadu_si512(xq.add(p * 64).cast());
                let xs = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);
                let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xs);
                let scale =
                    _mm512_mul_ps(pair_scales(sr, p, whole), _mm512_loadu_ps(xd.add(p * 16)));
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc);
            }
            *y = _mm512_reduce_add_ps(acc);
        }
    }

    /// Two q8_0 blocks (one, zero-padded, if not `whole`) at `qp` as `vpdpbusd`'s unsigned
    /// factor `|w|`, and the mask of negative weights.
    #[inline(always)]
    unsafe fn q8_pair(qp: *const i8, whole: bool) -> (__m512i, __mmask64) {
        let wv = if whole {
            _mm512_loadu_si512(qp.cast())
        } else {
            _mm512_maskz_loadu_epi8(u64::from(u32::MAX), qp.cast())
        };
        (_mm512_abs_epi8(wv), _mm512_movepi8_mask(wv))
    }

    /// The f16 scales of pair `p` of a row's blocks at `sr` (one if not `whole`) on the lanes
    /// that sum them: `[d₀ ×8, d₁ ×8]`.
    #[inline(always)]
    unsafe fn pair_scales(sr: *const half::f16, p: usize, whole: bool) -> __m512 {
        let bits = if whole {
            sr.add(2 * p).cast::<i32>().read_unaligned()
        } else {
            i32::from(sr.add(2 * p).cast::<u16>().read_unaligned())
        };
        let lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let ds = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
        _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(ds))
    }

    /// [`gemv_q8_one`] for `M` activation rows at once (`xs`, `ys` of length `M`): per pair of
    /// blocks the weights are loaded and their scales converted once.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    pub(super) unsafe fn gemv_q8<const M: usize>(
        m: &Q8_0Matrix,
        rows: std::ops::Range<usize>,
        xs: &[GemvRow],
        ys: &mut [&mut [f32]],
    ) {
        let k = m.in_dim();
        let (pairs, half) = (k / 64, !k.is_multiple_of(64));
        let (qs, s) = m.raw();
        let (xq, xd): ([*const i8; M], [*const f32; M]) = (
            std::array::from_fn(|i| match &xs[i] {
                GemvRow::Pairs { q, .. } => q.as_ptr(),
                GemvRow::Blocks(_) => unreachable!("q8_0 weights take pair rows"),
            }),
            std::array::from_fn(|i| match &xs[i] {
                GemvRow::Pairs { d, .. } => d.as_ptr(),
                GemvRow::Blocks(_) => unreachable!("q8_0 weights take pair rows"),
            }),
        );
        for (j, r) in rows.enumerate() {
            let sr = s.as_ptr().add(r * k / Q8_BLOCK);
            let mut acc = [_mm512_setzero_ps(); M];
            for p in 0..pairs + usize::from(half) {
                let whole = p < pairs;
                let (codes, neg) = q8_pair(qs.as_ptr().add(r * k + p * 64), whole);
                let dw = pair_scales(sr, p, whole);
                for i in 0..M {
                    let xv = _mm512_loadu_si512(xq[i].add(p * 64).cast());
                    let xs = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);
                    let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xs);
                    let scale = _mm512_mul_ps(dw, _mm512_loadu_ps(xd[i].add(p * 16)));
                    acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[i]);
                }
            }
            for i in 0..M {
                ys[i][j] = _mm512_reduce_add_ps(acc[i]);
            }
        }
    }

    /// One activation row as [`q4_group`] reads it: from its first code, block scale and block
    /// code sum.
    #[derive(Clone, Copy)]
    pub(super) struct XRow {
        q: *const i8,
        d: *const f32,
        sum: *const i32,
    }

    impl XRow {
        /// A row quantized for q4_0 weights.
        pub(super) fn of(x: &GemvRow) -> XRow {
            match x {
                GemvRow::Blocks(r) => XRow::at(r, 0, r.q.len()),
                GemvRow::Pairs { .. } => unreachable!("q4_0 weights take block rows"),
            }
        }

        /// Row `i` of `x`, rows of `k`.
        fn at(x: &QuantRows, i: usize, k: usize) -> XRow {
            XRow {
                q: x.q[i * k..].as_ptr(),
                d: x.d[i * k / Q8_BLOCK..].as_ptr(),
                sum: x.sum[i * k / Q8_BLOCK..].as_ptr(),
            }
        }
    }

    /// Group `g` (rows `16g..16g + 16`) of q4_0 `m` times each of `R` activation rows over the
    /// blocks `blocks`: one register of 16 row sums per activation row. Per block, the group's
    /// 4 registers of codes split into low and high nibbles (columns `4t..4t + 4` and
    /// `16 + 4t..16 + 4t + 4` of every row) meet each activation row's matching 4 codes,
    /// broadcast; the sums, less `8·Σx`, are scaled by the 16 rows' scales times the row's.
    #[inline(always)]
    unsafe fn q4_group<const R: usize>(
        m: &Q4_0Matrix,
        g: usize,
        blocks: std::ops::Range<usize>,
        xs: &[XRow; R],
    ) -> [__m512; R] {
        let nb = m.in_dim() / Q8_BLOCK;
        let (qs, s) = m.raw();
        let low = _mm512_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in blocks {
            let at = g * nb + b;
            let wq = qs.as_ptr().add(at * Q4_GROUP * Q8_BLOCK / 2);
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(s.as_ptr().add(at * Q4_GROUP).cast()));
            let (mut lo_sum, mut hi_sum) =
                ([_mm512_setzero_si512(); R], [_mm512_setzero_si512(); R]);
            for t in 0..4 {
                let v = _mm512_loadu_si512(wq.add(t * 64).cast());
                let lo = _mm512_and_si512(v, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                for (r, x) in xs.iter().enumerate() {
                    let xp = x.q.add(b * Q8_BLOCK + 4 * t).cast::<i32>();
                    let xl = _mm512_set1_epi32(xp.read_unaligned());
                    let xh = _mm512_set1_epi32(xp.add(4).read_unaligned());
                    lo_sum[r] = _mm512_dpbusd_epi32(lo_sum[r], lo, xl);
                    hi_sum[r] = _mm512_dpbusd_epi32(hi_sum[r], hi, xh);
                }
            }
            for (r, x) in xs.iter().enumerate() {
                let corr = _mm512_set1_epi32(8 * *x.sum.add(b));
                let isum = _mm512_sub_epi32(_mm512_add_epi32(lo_sum[r], hi_sum[r]), corr);
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.add(b)));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[r]);
            }
        }
        acc
    }

    /// `ys[i][j] = m[rows.start + j] · xs[i]` for `R` activation rows: whole groups, each over
    /// every block, the rows of a group outside `rows` computed and dropped.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    pub(super) unsafe fn gemv_q4<const R: usize>(
        m: &Q4_0Matrix,
        rows: std::ops::Range<usize>,
        xs: &[XRow],
        ys: &mut [&mut [f32]],
    ) {
        let xs: &[XRow; R] = xs.try_into().expect("R activation rows");
        let nb = m.in_dim() / Q8_BLOCK;
        for g in rows.start / Q4_GROUP..rows.end.div_ceil(Q4_GROUP) {
            let acc = q4_group(m, g, 0..nb, xs);
            let (r0, r1) = (
                (g * Q4_GROUP).max(rows.start),
                ((g + 1) * Q4_GROUP).min(rows.end),
            );
            for (acc, y) in acc.iter().zip(ys.iter_mut()) {
                let mut out = [0f32; Q4_GROUP];
                _mm512_storeu_ps(out.as_mut_ptr(), *acc);
                let lanes = r0 - g * Q4_GROUP..r1 - g * Q4_GROUP;
                y[r0 - rows.start..r1 - rows.start].copy_from_slice(&out[lanes]);
            }
        }
    }

    /// `y[i, 16g..16g + 16] += x[i] · m[16g..16g + 16]ᵀ` over the blocks `blocks`, for every
    /// row `i < m` of `x` (`y` with rows of `n`; columns past `n` dropped), [`MR4`] at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    pub(super) unsafe fn q4_panel(
        w: &Q4_0Matrix,
        g: usize,
        blocks: std::ops::Range<usize>,
        (x, m): (&QuantRows, usize),
        (y, n): (*mut f32, usize),
    ) {
        let k = x.q.len() / m;
        let cols = Q4_GROUP.min(n - g * Q4_GROUP);
        let mut i = 0;
        while i < m {
            let r = MR4.min(m - i);
            macro_rules! tile {
                ($r:literal) => {{
                    let xs: [XRow; $r] = std::array::from_fn(|j| XRow::at(x, i + j, k));
                    let acc = q4_group::<$r>(w, g, blocks.clone(), &xs);
                    for (j, acc) in acc.iter().enumerate() {
                        let mut out = [0f32; Q4_GROUP];
                        _mm512_storeu_ps(out.as_mut_ptr(), *acc);
                        let yr = y.add((i + j) * n + g * Q4_GROUP);
                        for (c, v) in out[..cols].iter().enumerate() {
                            *yr.add(c) += v;
                        }
                    }
                }};
            }
            match r {
                8 => tile!(8),
                7 => tile!(7),
                6 => tile!(6),
                5 => tile!(5),
                4 => tile!(4),
                3 => tile!(3),
                2 => tile!(2),
                _ => tile!(1),
            }
            i += r;
        }
    }
}
