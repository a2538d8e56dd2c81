//! q8_0 and q4_0 weights times activations as int8 products (AVX512-VNNI `vpdpbusd`), as
//! llama.cpp multiplies its quantized types: `Y = X · Wᵀ` with `X` `[m, k]` f32 activations
//! quantized to q8 first (per row, blocks of 32: `d = amax / 127`, `q = round(x / d)`), `W`
//! `[n, k]` in blocks of 32 with one scale each, `Y` `[m, n]` f32. [`gemm`] serves prompt chunks,
//! [`gemv_rows`] decode steps and verify passes (a few rows), so all round the activations alike.
//!
//! Notable:
//! - The weights are stored with their rows interleaved in groups of 16
//!   ([`super::gemv::BlockMatrix`]), as llama.cpp repacks them, so every kernel reads the blocks
//!   as stored: one 64-byte load is 16 rows × 4 code bytes. Lanes hold output rows: one
//!   `vpdpbusd` adds 4 products into each of 16 outputs, with the activation row's matching 4
//!   codes broadcast. A block of 32 costs 8 of them per 16 outputs and activation row, plus a
//!   convert and two multiply-adds for the scales, and its weights are loaded (and q4_0's
//!   nibbles split) once for all the activation rows of a tile ([`x86::group`]).
//! - CPUs with AVX2 but not AVX512-VNNI run the same kernels in an AVX2 form
//!   ([`x86::group_avx2`]: 8 rows per register, `vpmaddubsw` then `vpmaddwd`, 2 activation rows
//!   per tile for AVX2's 16 registers), whose integer sums, and so results, are the same.
//! - `vpdpbusd` multiplies unsigned by signed bytes. The weights go unsigned: q4_0's codes are
//!   already `q ∈ [0, 15]` with `w = d·(q − 8)`; q8_0's get `+ 128` as they load (one `xor`).
//!   With `o` that offset, `Σ w·x = Σ q·x − o·Σ x`, and `Σ x` per activation block is kept from
//!   the quantization.
//! - Decode is bound by memory, not instructions: per 512 weights q4_0 takes 4 loads, 12 to
//!   split nibbles, 8 `vpdpbusd` and ~6 for the scales, where a layout with `k` in the lanes took
//!   ~130 (measured: +27 % q4_0 gemv, +40 % q4_0 decode and +50 % prompt on the bench model).
//! - Integer sums are exact; what differs from the f32-activation product is the activations'
//!   rounding to 8 bits (relative RMS ~0.5 % per product).

use super::gemv::{Isa, SyncPtr, WeightRows, Q8_BLOCK, ROW_GROUP};
use super::parallel::parallel_for;
use half::f16;

/// Activation rows per register tile: 2 × MR integer and MR float accumulators.
const MR: usize = 8;

/// `x` `[m, k]` quantized to q8 per row and block of 32: codes, scales, code sums.
pub(crate) struct QuantRows {
    /// Values per row.
    k: usize,
    pub(crate) q: Vec<i8>,
    pub(crate) d: Vec<f32>,
    pub(crate) sum: Vec<i32>,
}

impl QuantRows {
    /// `k` must be a multiple of 32. As GGML's `quantize_row_q8_0`, but the scale stays f32:
    /// rounding to nearest with ties to even, as its AVX version does (`_mm256_round_ps`): one
    /// instruction (the reference version's `roundf`, ties away from zero, is a libm call per
    /// value: 7 % of a q4_0 prompt's time).
    pub(crate) fn quantize(x: &[f32], k: usize) -> QuantRows {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F detected.
            unsafe { Self::quantize_avx512(x, k) }
        } else {
            Self::quantize_portable(x, k)
        }
    }

    /// [`QuantRows::quantize`] with AVX-512 intrinsics: a block is two registers, its codes one
    /// `vcvtps2dq` (the default rounding: to nearest, ties to even) and one saturating narrow
    /// each. (The portable loop compiled for AVX-512 stayed scalar: `as i8` saturates per
    /// value, and `f32::max` does not vectorise.)
    #[target_feature(enable = "avx512f")]
    unsafe fn quantize_avx512(x: &[f32], k: usize) -> QuantRows {
        use std::arch::x86_64::*;
        let blocks = x.len() / Q8_BLOCK;
        let mut out = QuantRows {
            k,
            q: vec![0; blocks * Q8_BLOCK],
            d: vec![0.0; blocks],
            sum: vec![0; blocks],
        };
        for b in 0..blocks {
            let p = x.as_ptr().add(b * Q8_BLOCK);
            let (v0, v1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            out.d[b] = amax / 127.0;
            let id = _mm512_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
            let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
            let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
            let qp = out.q.as_mut_ptr().add(b * Q8_BLOCK);
            _mm_storeu_si128(qp.cast(), _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128(qp.add(16).cast(), _mm512_cvtsepi32_epi8(q1));
            out.sum[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        }
        out
    }

    #[inline(always)]
    fn quantize_portable(x: &[f32], k: usize) -> QuantRows {
        let blocks = x.len() / Q8_BLOCK;
        let mut out = QuantRows {
            k,
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

/// A q8_0 or q4_0 matrix as the kernels read it.
#[derive(Clone, Copy)]
struct Groups<'a> {
    /// Interleaved code bytes, `[groups, blocks, QB / 4, 16, 4]`.
    qs: &'a [u8],
    /// Scales, `[groups, blocks, 16]`.
    scales: &'a [f16],
    /// Blocks per row.
    nb: usize,
    q4: bool,
}

impl<'a> Groups<'a> {
    fn of(w: WeightRows<'a>) -> Groups<'a> {
        let (qs, scales, k, q4) = match w {
            WeightRows::Q8_0(m) => (m.bytes_stored().0, m.raw().1, m.in_dim(), false),
            WeightRows::Q4_0(m) => (m.bytes_stored().0, m.raw().1, m.in_dim(), true),
            _ => unreachable!("int8 products are for q8_0 and q4_0 weights"),
        };
        Groups {
            qs,
            scales,
            nb: k / Q8_BLOCK,
            q4,
        }
    }
}

/// Runs `$f::<Q4, R>` (or `$f::<V, Q4, R>` for `$f[V]`) with `R` = `$r` (1 to [`MR`]) and
/// `Q4` = `$q4` as constants.
macro_rules! with_tile {
    ($q4:expr, $r:expr, $f:ident $([$v:expr])? ($($arg:expr),*)) => {
        match ($q4, $r) {
            (true, 1) => $f::<$({$v},)? true, 1>($($arg),*),
            (true, 2) => $f::<$({$v},)? true, 2>($($arg),*),
            (true, 3) => $f::<$({$v},)? true, 3>($($arg),*),
            (true, 4) => $f::<$({$v},)? true, 4>($($arg),*),
            (true, 5) => $f::<$({$v},)? true, 5>($($arg),*),
            (true, 6) => $f::<$({$v},)? true, 6>($($arg),*),
            (true, 7) => $f::<$({$v},)? true, 7>($($arg),*),
            (true, _) => $f::<$({$v},)? true, 8>($($arg),*),
            (false, 1) => $f::<$({$v},)? false, 1>($($arg),*),
            (false, 2) => $f::<$({$v},)? false, 2>($($arg),*),
            (false, 3) => $f::<$({$v},)? false, 3>($($arg),*),
            (false, 4) => $f::<$({$v},)? false, 4>($($arg),*),
            (false, 5) => $f::<$({$v},)? false, 5>($($arg),*),
            (false, 6) => $f::<$({$v},)? false, 6>($($arg),*),
            (false, 7) => $f::<$({$v},)? false, 7>($($arg),*),
            (false, _) => $f::<$({$v},)? false, 8>($($arg),*),
        }
    };
}

/// `ys[i] = W · xs[i]` for one activation row (decode) or a few (a verify pass): rows `rows` of
/// q8_0/q4_0 `w` `[n, k]`, each `xs[i]` one row of `k` quantized by [`QuantRows::quantize`],
/// `ys[i]` one value per row. The weights are loaded (and q4_0's unpacked) once for up to
/// [`MR`] activation rows, so a few rows cost little more than one; they still stream front to
/// back. The caller checked the CPU features `isa` says (see [`gemm`]).
pub(crate) fn gemv_rows(
    isa: Isa,
    w: WeightRows<'_>,
    rows: std::ops::Range<usize>,
    xs: &[QuantRows],
    ys: &mut [&mut [f32]],
) {
    assert_eq!(xs.len(), ys.len(), "one output per activation row");
    let w = Groups::of(w);
    let xs: Vec<x86::XRow> = xs.iter().map(|x| x86::XRow::at(x, 0)).collect();
    let vnni = isa.has_avx512_vnni();
    for (xs, ys) in xs
        .chunks(tile_rows(vnni))
        .zip(ys.chunks_mut(tile_rows(vnni)))
    {
        use x86::{gemv, gemv_avx2};
        // SAFETY: the caller checked AVX-512F/BW/VL and AVX512-VNNI (`vnni`) or AVX2, FMA and
        // F16C; `rows` are rows of `w`, each `ys[i]` holds one value per row, each `xs[i]` is a
        // row of `k`.
        unsafe {
            if vnni {
                with_tile!(w.q4, xs.len(), gemv(w, rows.clone(), xs, ys))
            } else {
                with_tile!(w.q4, xs.len(), gemv_avx2(w, rows.clone(), xs, ys))
            }
        }
    }
}

/// Activation rows per register tile: [`MR`] with AVX-512's 32 registers, 2 with AVX2's 16.
fn tile_rows(vnni: bool) -> usize {
    if vnni {
        MR
    } else {
        2
    }
}

/// `ys[i] = x · wᵢᵀ` for q8_0/q4_0 weights `ws[i]` `[nᵢ, k]` that read the same `x` `[m, k]`
/// (q/k/v, gate/up), `ys[i]` `[m, nᵢ]` (overwritten): `x` quantized once, every weight's row
/// groups shared out in one parallel call. The caller checked the shapes and that this CPU has
/// what `isa` says: AVX-512F/BW/VL and AVX512-VNNI where it has VNNI, else AVX2, FMA and F16C.
pub(crate) fn gemm(isa: Isa, ws: &[WeightRows<'_>], x: &[f32], m: usize, ys: &mut [&mut [f32]]) {
    let k = x.len() / m;
    let xq = QuantRows::quantize(x, k);
    let kc = super::gemm::panel_columns(k);
    let ws: Vec<Groups> = ws.iter().map(|&w| Groups::of(w)).collect();
    let ns: Vec<usize> = ys.iter().map(|y| y.len() / m).collect();
    let yps: Vec<SyncPtr<f32>> = ys.iter_mut().map(|y| SyncPtr(y.as_mut_ptr())).collect();
    // Task `t` is row group `t - starts[i]` of weight `i`, where `starts[i] <= t < starts[i + 1]`.
    let starts: Vec<usize> = std::iter::once(0)
        .chain(ns.iter().scan(0, |acc, n| {
            *acc += n.div_ceil(ROW_GROUP);
            Some(*acc)
        }))
        .collect();
    let vnni = isa.has_avx512_vnni();
    // One group of 16 weight rows per task, read as stored, a panel of `kc` columns (in L1 with
    // a tile's activation rows) at a time for every tile of activation rows.
    parallel_for(starts[ns.len()], |tasks| {
        for t in tasks {
            let i = starts.partition_point(|&s| s <= t) - 1;
            let (w, g, n, y) = (ws[i], t - starts[i], ns[i], yps[i]);
            for k0 in (0..k).step_by(kc) {
                let blocks = k0 / Q8_BLOCK..(k0 + kc).min(k) / Q8_BLOCK;
                // SAFETY: the caller checked the CPU features and shapes; this task alone writes
                // columns `16g..16g + 16` of output `i` (`m` rows of `n`), which outlives
                // `parallel_for`.
                unsafe {
                    if vnni {
                        x86::panel(w, g, blocks, (&xq, m), (y.get(), n))
                    } else {
                        x86::panel_avx2(w, g, blocks, (&xq, m), (y.get(), n))
                    }
                }
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Groups, QuantRows};
    use crate::kernels::gemv::{Q8_BLOCK, ROW_GROUP};
    use std::arch::x86_64::*;

    /// One activation row as [`group`] reads it: from its first code, block scale and block
    /// code sum.
    #[derive(Clone, Copy)]
    pub(super) struct XRow {
        q: *const i8,
        d: *const f32,
        sum: *const i32,
    }

    impl XRow {
        /// Row `i` of `x`.
        pub(super) fn at(x: &QuantRows, i: usize) -> XRow {
            let k = x.k;
            XRow {
                q: x.q[i * k..].as_ptr(),
                d: x.d[i * k / Q8_BLOCK..].as_ptr(),
                sum: x.sum[i * k / Q8_BLOCK..].as_ptr(),
            }
        }
    }

    /// Group `g` (rows `16g..16g + 16`) of `w` times each of `R` activation rows over the blocks
    /// `blocks`: one register of 16 row sums per activation row. Per block, the group's codes
    /// come as 8 registers of 16 rows × 4 columns (q4_0: 4 loads, each split into low and high
    /// nibbles, columns `4t..` and `16 + 4t..`; q8_0: 8 loads, columns `4t..`), each meeting
    /// every activation row's matching 4 codes, broadcast; the sums, less `o·Σx`, are scaled by
    /// the 16 rows' scales times the activation block's.
    #[inline(always)]
    unsafe fn group<const Q4: bool, const R: usize>(
        w: Groups<'_>,
        g: usize,
        blocks: std::ops::Range<usize>,
        xs: &[XRow; R],
    ) -> [__m512; R] {
        let (low, flip) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(i8::MIN));
        let (block_bytes, offset) = if Q4 {
            (ROW_GROUP * Q8_BLOCK / 2, 8)
        } else {
            (ROW_GROUP * Q8_BLOCK, 128)
        };
        let mut acc = [_mm512_setzero_ps(); R];
        for b in blocks {
            let at = g * w.nb + b;
            let wq = w.qs.as_ptr().add(at * block_bytes);
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(
                w.scales.as_ptr().add(at * ROW_GROUP).cast(),
            ));
            let mut sums = [[_mm512_setzero_si512(); R]; 2];
            for t in 0..4 {
                // Two registers of codes and the first column each covers.
                let (w0, c0, w1, c1) = if Q4 {
                    let v = _mm512_loadu_si512(wq.add(t * 64).cast());
                    let hi = _mm512_srli_epi16::<4>(v);
                    (
                        _mm512_and_si512(v, low),
                        4 * t,
                        _mm512_and_si512(hi, low),
                        16 + 4 * t,
                    )
                } else {
                    let v0 = _mm512_loadu_si512(wq.add(2 * t * 64).cast());
                    let v1 = _mm512_loadu_si512(wq.add((2 * t + 1) * 64).cast());
                    (
                        _mm512_xor_si512(v0, flip),
                        8 * t,
                        _mm512_xor_si512(v1, flip),
                        8 * t + 4,
                    )
                };
                for (r, x) in xs.iter().enumerate() {
                    let xb = x.q.add(b * Q8_BLOCK);
                    let x0 = _mm512_set1_epi32(xb.add(c0).cast::<i32>().read_unaligned());
                    let x1 = _mm512_set1_epi32(xb.add(c1).cast::<i32>().read_unaligned());
                    sums[0][r] = _mm512_dpbusd_epi32(sums[0][r], w0, x0);
                    sums[1][r] = _mm512_dpbusd_epi32(sums[1][r], w1, x1);
                }
            }
            for (r, x) in xs.iter().enumerate() {
                let corr = _mm512_set1_epi32(offset * *x.sum.add(b));
                let isum = _mm512_sub_epi32(_mm512_add_epi32(sums[0][r], sums[1][r]), corr);
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.add(b)));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[r]);
            }
        }
        acc
    }

    /// The 16 row sums of group `g` for each of `R` activation rows: [`group`] with
    /// AVX512-VNNI (`VNNI`), else [`group_avx2`].
    #[inline(always)]
    unsafe fn sums<const VNNI: bool, const Q4: bool, const R: usize>(
        w: Groups<'_>,
        g: usize,
        blocks: std::ops::Range<usize>,
        xs: &[XRow; R],
    ) -> [[f32; ROW_GROUP]; R] {
        if VNNI {
            group::<Q4, R>(w, g, blocks, xs).map(|acc| {
                let mut out = [0f32; ROW_GROUP];
                _mm512_storeu_ps(out.as_mut_ptr(), acc);
                out
            })
        } else {
            group_avx2::<Q4, R>(w, g, blocks, xs).map(|acc| {
                let mut out = [0f32; ROW_GROUP];
                _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[1]);
                out
            })
        }
    }

    /// `ys[i][j] = w[rows.start + j] · xs[i]` for `R` activation rows: whole groups over every
    /// block, the rows of a group outside `rows` computed and dropped.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    pub(super) unsafe fn gemv<const Q4: bool, const R: usize>(
        w: Groups<'_>,
        rows: std::ops::Range<usize>,
        xs: &[XRow],
        ys: &mut [&mut [f32]],
    ) {
        gemv_with::<true, Q4, R>(w, rows, xs, ys)
    }

    /// [`gemv`] with [`group_avx2`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemv_avx2<const Q4: bool, const R: usize>(
        w: Groups<'_>,
        rows: std::ops::Range<usize>,
        xs: &[XRow],
        ys: &mut [&mut [f32]],
    ) {
        gemv_with::<false, Q4, R>(w, rows, xs, ys)
    }

    #[inline(always)]
    unsafe fn gemv_with<const VNNI: bool, const Q4: bool, const R: usize>(
        w: Groups<'_>,
        rows: std::ops::Range<usize>,
        xs: &[XRow],
        ys: &mut [&mut [f32]],
    ) {
        let xs: &[XRow; R] = xs.try_into().expect("R activation rows");
        for g in rows.start / ROW_GROUP..rows.end.div_ceil(ROW_GROUP) {
            let out = sums::<VNNI, Q4, R>(w, g, 0..w.nb, xs);
            let (r0, r1) = (
                (g * ROW_GROUP).max(rows.start),
                ((g + 1) * ROW_GROUP).min(rows.end),
            );
            for (out, y) in out.iter().zip(ys.iter_mut()) {
                let lanes = r0 - g * ROW_GROUP..r1 - g * ROW_GROUP;
                y[r0 - rows.start..r1 - rows.start].copy_from_slice(&out[lanes]);
            }
        }
    }

    /// `y[i, 16g..16g + 16] += x[i] · w[16g..16g + 16]ᵀ` over the blocks `blocks`, for every
    /// row `i < m` of `x` (`y` with rows of `n`; columns past `n` dropped), [`super::MR`] at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    pub(super) unsafe fn panel(
        w: Groups<'_>,
        g: usize,
        blocks: std::ops::Range<usize>,
        x: (&QuantRows, usize),
        y: (*mut f32, usize),
    ) {
        panel_with::<true>(w, g, blocks, x, y)
    }

    /// [`panel`] with [`group_avx2`], 2 activation rows at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn panel_avx2(
        w: Groups<'_>,
        g: usize,
        blocks: std::ops::Range<usize>,
        x: (&QuantRows, usize),
        y: (*mut f32, usize),
    ) {
        panel_with::<false>(w, g, blocks, x, y)
    }

    #[inline(always)]
    unsafe fn panel_with<const VNNI: bool>(
        w: Groups<'_>,
        g: usize,
        blocks: std::ops::Range<usize>,
        (x, m): (&QuantRows, usize),
        (y, n): (*mut f32, usize),
    ) {
        let cols = ROW_GROUP.min(n - g * ROW_GROUP);
        let mut i = 0;
        while i < m {
            let r = super::tile_rows(VNNI).min(m - i);
            let yi = y.add(i * n + g * ROW_GROUP);
            with_tile!(
                w.q4,
                r,
                tile[VNNI](w, g, blocks.clone(), x, i, (yi, n, cols))
            );
            i += r;
        }
    }

    /// [`panel`] for activation rows `i..i + R`, added into `y` (their first row, at the group's
    /// first column), rows `n` apart, `cols` columns.
    #[inline(always)]
    unsafe fn tile<const VNNI: bool, const Q4: bool, const R: usize>(
        w: Groups<'_>,
        g: usize,
        blocks: std::ops::Range<usize>,
        x: &QuantRows,
        i: usize,
        (y, n, cols): (*mut f32, usize, usize),
    ) {
        let xs: [XRow; R] = std::array::from_fn(|j| XRow::at(x, i + j));
        // A row's first panel stores (`y` is not zeroed first), the others add.
        let add = blocks.start > 0;
        for (j, out) in sums::<VNNI, Q4, R>(w, g, blocks, &xs).iter().enumerate() {
            let yr = y.add(j * n);
            for (c, &v) in out[..cols].iter().enumerate() {
                crate::kernels::gemm::put(yr.add(c), v, add);
            }
        }
    }

    /// [`group`] with AVX2 (CPUs without AVX512-VNNI): the group's rows in two halves of 8
    /// lanes. `vpmaddubsw` multiplies unsigned by signed bytes into pairs of 16-bit sums and
    /// `vpmaddwd` by ones adds the pairs into 32 bits. The 16-bit sums cannot saturate: q4_0
    /// codes are at most 15, so a whole block's eight stay under 8 · 2 · 15 · 128; q8_0 goes as
    /// `|w|` times `x` with `w`'s sign (|w| ≤ 127), each product widened on its own. The integer
    /// sums, and so the results, equal the VNNI kernel's.
    #[inline(always)]
    unsafe fn group_avx2<const Q4: bool, const R: usize>(
        w: Groups<'_>,
        g: usize,
        blocks: std::ops::Range<usize>,
        xs: &[XRow; R],
    ) -> [[__m256; 2]; R] {
        let (low, ones) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi16(1));
        let block_bytes = ROW_GROUP * if Q4 { Q8_BLOCK / 2 } else { Q8_BLOCK };
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for b in blocks {
            let at = g * w.nb + b;
            let wq = w.qs.as_ptr().add(at * block_bytes);
            let sp = w.scales.as_ptr().add(at * ROW_GROUP);
            for (h, half) in [0, 32].into_iter().enumerate() {
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(sp.add(8 * h).cast()));
                let mut sums = [_mm256_setzero_si256(); R];
                for t in 0..4 {
                    let (w0, c0, w1, c1) = if Q4 {
                        let v = _mm256_loadu_si256(wq.add(t * 64 + half).cast());
                        let hi = _mm256_srli_epi16::<4>(v);
                        (
                            _mm256_and_si256(v, low),
                            4 * t,
                            _mm256_and_si256(hi, low),
                            16 + 4 * t,
                        )
                    } else {
                        let v0 = _mm256_loadu_si256(wq.add(2 * t * 64 + half).cast());
                        let v1 = _mm256_loadu_si256(wq.add((2 * t + 1) * 64 + half).cast());
                        (v0, 8 * t, v1, 8 * t + 4)
                    };
                    let (a0, a1) = if Q4 {
                        (w0, w1)
                    } else {
                        (_mm256_abs_epi8(w0), _mm256_abs_epi8(w1))
                    };
                    for (r, x) in xs.iter().enumerate() {
                        let xb = x.q.add(b * Q8_BLOCK);
                        let mut x0 = _mm256_set1_epi32(xb.add(c0).cast::<i32>().read_unaligned());
                        let mut x1 = _mm256_set1_epi32(xb.add(c1).cast::<i32>().read_unaligned());
                        if Q4 {
                            // Summed in 16 bits over the block, widened once below.
                            let p = _mm256_add_epi16(
                                _mm256_maddubs_epi16(a0, x0),
                                _mm256_maddubs_epi16(a1, x1),
                            );
                            sums[r] = _mm256_add_epi16(sums[r], p);
                        } else {
                            x0 = _mm256_sign_epi8(x0, w0);
                            x1 = _mm256_sign_epi8(x1, w1);
                            let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(a0, x0), ones);
                            let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(a1, x1), ones);
                            sums[r] = _mm256_add_epi32(sums[r], _mm256_add_epi32(p0, p1));
                        }
                    }
                }
                for (r, x) in xs.iter().enumerate() {
                    let isum = if Q4 {
                        let s = _mm256_madd_epi16(sums[r], ones);
                        _mm256_sub_epi32(s, _mm256_set1_epi32(8 * *x.sum.add(b)))
                    } else {
                        sums[r]
                    };
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*x.d.add(b)));
                    acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[r][h]);
                }
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 quantization equals the portable one code for code (ties to even, an
    /// all-zero block, the largest value at ±127), where the CPU has AVX-512.
    #[test]
    fn avx512_activation_quantization_equals_the_portable_one() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let k = 96;
        let mut x: Vec<f32> = (0..2 * k)
            .map(|i| ((i * 7919 % 997) as f32 - 498.0) / 37.0)
            .collect();
        x[32..64].fill(0.0);
        x[64..96].copy_from_slice(&[0.5, 1.5, -0.5, -2.5, 127.0].repeat(7)[..32]);
        let a = QuantRows::quantize_portable(&x, k);
        // SAFETY: AVX-512F detected.
        let b = unsafe { QuantRows::quantize_avx512(&x, k) };
        assert_eq!((a.q, a.d, a.sum), (b.q, b.d, b.sum));
    }
}
