//! Several-row kernel for `Y = X · Wᵀ` (prefill): `X` `[m, k]` activations, `W` `[n, k]` weights
//! as Hugging Face stores them, `Y` `[m, n]`.
//!
//! Notable:
//! - No packing: in this "NT" form both operands are contiguous along `k`, so every output is a
//!   dot product of two contiguous rows. The register tile is 4 rows of `X` × 3 rows of `W`:
//!   per 8 columns, 7 loads feed 12 FMAs into 12 independent 8-lane accumulators (16 ymm
//!   registers in all), reduced across lanes once per tile. candle's GEMM instead repacks the
//!   transposed weight on every call, which on these shapes costs about as much as the
//!   arithmetic.
//! - Cache blocking: a task owns 48 weight rows (an L2-sized panel of ≤ 1024 columns, ~192 KB
//!   in f32) and walks every 4-row group of `X` (16 KB, stays in L1) across it, so each weight
//!   byte comes from memory once per call and `X` from L2/L3. Tasks go to [`super::parallel`]; `k` above 1024 is split into equal panels.
//! - Prefetch: the first 4- or 8-row group of `X` meets each weight tile straight from memory
//!   (a prompt's forward reads every weight once), so it asks for the next tile's rows while
//!   it works on this one: 64-token bf16 forwards of the bench model 11 % faster, f32 2-5 %.
//! - f16 panels (and bf16, q8_0, q4_0 ones where the faster forms below do not apply) are
//!   widened to f32 into a per-thread buffer first, once per panel and reused by all `m` rows, so
//!   one f32 micro-kernel serves every weight format.
//! - AVX-512F where the CPU has it (8 × 3 tiles of 16-lane accumulators: twice the arithmetic
//!   per instruction), else AVX2+FMA; elsewhere [`gemm`] returns `false` and the caller keeps
//!   candle's GEMM. The AVX-512 tile is generic over its lane format: f32 FMAs, or with
//!   AVX512-BF16 bf16 pairs (`vdpbf16ps`) that read bf16 weights as stored, the activations of a
//!   prompt chunk rounded to bf16 as llama.cpp rounds them ([`BF16_MIN_ROWS`]).
//! - q8_0/q4_0 weights on AVX512-VNNI go to int8 products instead ([`super::int8`]).
//! - Several weights that read the same `x` (q/k/v, gate/up) run in one call ([`gemm_many`]):
//!   `x` rounded to bf16, quantized to q8 or padded once, all their tasks in one dispatch.

use super::gemv::{Isa, WeightRows};
#[cfg(target_arch = "x86_64")]
use super::gemv::{SyncPtr, Q8_BLOCK};
#[cfg(target_arch = "x86_64")]
use super::parallel::parallel_for;
use anyhow::{ensure, Result};
#[cfg(target_arch = "x86_64")]
use std::cell::RefCell;

#[cfg(target_arch = "x86_64")]
/// Activation rows per register tile.
const MR: usize = 4;
#[cfg(target_arch = "x86_64")]
/// Weight rows per register tile.
const NR: usize = 3;
#[cfg(target_arch = "x86_64")]
/// Weight rows per task (a multiple of `NR`).
const NC: usize = 48;
#[cfg(target_arch = "x86_64")]
/// Most columns per panel (a multiple of 32, so q8_0 panels start on a block).
const KC: usize = 1024;
/// Fewest activation rows for the GEMM's bf16 products, which round the activations to bf16 as
/// llama.cpp does (as the gemv does too on these CPUs); fewer rows go to the gemv
/// ([`super::gemv::few_rows`]).
pub(crate) const BF16_MIN_ROWS: usize = 16;

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Per-thread f32 panel for narrow and quantized weights (`NC × KC`, 192 KB at most).
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `y = x · wᵀ` for `x` `[m, k]`, `w` `[n, k]`, `y` `[m, n]` (row-major, `n = y.len() / m`).
/// `Ok(false)` (and `y` untouched) when this CPU has no fast kernel.
pub fn gemm(w: WeightRows<'_>, x: &[f32], m: usize, y: &mut [f32]) -> Result<bool> {
    gemm_many_on(Isa::get(), &[w], x, m, &mut [y])
}

/// [`gemm`] for several weights that read the same `x` (a layer's q/k/v, an MLP's gate and
/// up): `x` rounded to bf16 (or padded) once, and every matrix's tasks shared out in one
/// parallel call. `Ok(false)` (and every `y` untouched) when this CPU has no fast kernel.
pub fn gemm_many(
    ws: &[WeightRows<'_>],
    x: &[f32],
    m: usize,
    ys: &mut [&mut [f32]],
) -> Result<bool> {
    gemm_many_on(Isa::get(), ws, x, m, ys)
}

/// [`gemm_many`] with the kernels of `isa` (which this CPU must have).
fn gemm_many_on(
    isa: Isa,
    ws: &[WeightRows<'_>],
    x: &[f32],
    m: usize,
    ys: &mut [&mut [f32]],
) -> Result<bool> {
    ensure!(
        m > 0 && x.len().is_multiple_of(m) && ws.len() == ys.len(),
        "gemm: {m} rows do not divide x ({}), or {} weights for {} outputs",
        x.len(),
        ws.len(),
        ys.len()
    );
    let k = x.len() / m;
    for (w, y) in ws.iter().zip(ys.iter()) {
        ensure!(
            y.len().is_multiple_of(m),
            "gemm: {m} rows do not divide y ({})",
            y.len()
        );
        w.check(y.len() / m, k, "gemm")?;
    }
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        let bf16 = |w: &WeightRows<'_>| matches!(w, WeightRows::Bf16(_)) && bf16_products(isa, m);
        let int8 = |w: &WeightRows<'_>| {
            matches!(w, WeightRows::Q8_0(_) | WeightRows::Q4_0(_)) && int8_products(isa)
        };
        if ws.iter().all(int8) {
            super::int8::gemm(isa, ws, x, m, ys);
            return Ok(true);
        }
        let mixed =
            |form: &dyn Fn(&WeightRows<'_>) -> bool| ws.iter().any(form) && !ws.iter().all(form);
        if mixed(&int8) || mixed(&bf16) {
            // Forms that prepare `x` differently: one weight at a time.
            for (w, y) in ws.iter().zip(ys.iter_mut()) {
                gemm_many_on(isa, &[*w], x, m, &mut [&mut **y])?;
            }
            return Ok(true);
        }
        let ns: Vec<usize> = ys.iter().map(|y| y.len() / m).collect();
        let yps: Vec<SyncPtr<f32>> = ys.iter_mut().map(|y| SyncPtr(y.as_mut_ptr())).collect();
        let kc = panel_columns(k);
        if ws.iter().all(bf16) {
            let xs = padded_stride(k, 2);
            let xb = to_bf16_bits(x, k, xs);
            for_each_panel(&ns, k, kc, |i, (j0, nc), (k0, kl), _| {
                let WeightRows::Bf16(wb) = ws[i] else {
                    unreachable!("every weight is bf16 here")
                };
                // SAFETY: `bf16` is a `u16` underneath (`repr(transparent)`).
                let wb = unsafe { std::slice::from_raw_parts(wb.as_ptr().cast::<u16>(), wb.len()) };
                // SAFETY: AVX-512F/BW/BF16 detected; as `panel` below.
                unsafe {
                    x86::avx512::panel_bf16((
                        xb[k0..].as_ptr(),
                        xs,
                        m,
                        (wb[j0 * k + k0..].as_ptr(), k, nc),
                        kl,
                        (yps[i].get().add(j0), ns[i], k0 > 0),
                    ))
                }
            });
            return Ok(true);
        }
        // Rows a multiple of 1 KB apart go to a padded copy (see `padded_stride`).
        let xs = padded_stride(k, 4);
        let padded: Vec<f32>;
        let x = if xs == k {
            x
        } else {
            padded = pad_rows(x, k, xs);
            &padded
        };
        for_each_panel(&ns, k, kc, |i, (j0, nc), (k0, kl), buf| {
            let (wp, ws) = match ws[i] {
                WeightRows::F32(w) => (w[j0 * k + k0..].as_ptr(), k),
                w => {
                    buf.resize(nc * kl, 0.0);
                    w.widen_block(k, (j0, nc), (k0, kl), buf);
                    (buf.as_ptr(), kl)
                }
            };
            // SAFETY: AVX2+FMA (and AVX-512F for `Avx512`) detected; `wp` holds `nc` rows
            // of `kl` at stride `ws`, `x` `m` rows of `k` at stride `xs` from column `k0`;
            // this task alone writes columns `j0..j0 + nc` of output `i` (`m` rows of
            // `ns[i]`), which outlives the call.
            unsafe {
                let args = (
                    x[k0..].as_ptr(),
                    xs,
                    m,
                    (wp, ws, nc),
                    kl,
                    (yps[i].get().add(j0), ns[i], k0 > 0),
                );
                match isa {
                    Isa::Avx512 => x86::avx512::panel(args),
                    _ => x86::panel(args),
                }
            };
        });
        return Ok(true);
    }
    Ok(false)
}

/// Columns per panel for rows of `k`: equal panels of at most [`KC`] columns, multiples of 32
/// (whole q8_0/q4_0 blocks) except the last.
#[cfg(target_arch = "x86_64")]
pub(super) fn panel_columns(k: usize) -> usize {
    let panels = k.div_ceil(KC);
    (k.div_ceil(panels).div_ceil(Q8_BLOCK) * Q8_BLOCK).min(k)
}

/// Runs `f(i, (j0, nc), (k0, kl), panel_buffer)` for every task of `NC` rows of weight `i`
/// (`ns[i]` rows of `k`) and every `kc`-column panel of it, the tasks of all weights shared out
/// among the threads in one call.
#[cfg(target_arch = "x86_64")]
fn for_each_panel(
    ns: &[usize],
    k: usize,
    kc: usize,
    f: impl Fn(usize, (usize, usize), (usize, usize), &mut Vec<f32>) + Sync,
) {
    // Task `t` belongs to weight `i` where `starts[i] <= t < starts[i + 1]`.
    let starts: Vec<usize> = std::iter::once(0)
        .chain(ns.iter().scan(0, |acc, n| {
            *acc += n.div_ceil(NC);
            Some(*acc)
        }))
        .collect();
    parallel_for(starts[ns.len()], |tasks| {
        PANEL.with(|buf| {
            let mut buf = buf.borrow_mut();
            for t in tasks {
                let i = starts.partition_point(|&s| s <= t) - 1;
                let j0 = (t - starts[i]) * NC;
                let nc = NC.min(ns[i] - j0);
                for k0 in (0..k).step_by(kc) {
                    f(i, (j0, nc), (k0, kc.min(k - k0)), &mut buf);
                }
            }
        })
    });
}

/// Whether bf16 weights times `m` activation rows run as bf16 products (`vdpbf16ps`), the
/// activations rounded to bf16: a prefill chunk on a CPU with AVX512-BF16.
fn bf16_products(isa: Isa, m: usize) -> bool {
    m >= BF16_MIN_ROWS && isa.has_avx512_bf16()
}

/// Whether q8_0/q4_0 weights run as int8 products, the activations quantized to q8
/// ([`super::int8`]): on every CPU with AVX2 (`vpdpbusd` where it has AVX512-VNNI), as the
/// decode gemv does.
fn int8_products(isa: Isa) -> bool {
    isa.has_int8_products()
}

/// Elements per row for rows of `k` elements of `size` bytes that a register tile reads
/// together: `k`, plus a cache line where rows would start a multiple of 1 KB apart (at 4 KB
/// apart, the 8 rows of a tile and its weight rows all fall in one L1 set and evict each other
/// every step; measured: f32 products +50-60 %, bf16 ones on 2048-wide rows +25 %).
#[cfg(target_arch = "x86_64")]
fn padded_stride(k: usize, size: usize) -> usize {
    if (k * size).is_multiple_of(1024) {
        k + 64 / size
    } else {
        k
    }
}

/// `x` (`[m, k]`) with its rows `stride` apart.
#[cfg(target_arch = "x86_64")]
fn pad_rows(x: &[f32], k: usize, stride: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len() / k * stride];
    for (o, x) in out.chunks_exact_mut(stride).zip(x.chunks_exact(k)) {
        o[..k].copy_from_slice(x);
    }
    out
}

/// `x` (`[m, k]`) rounded to bf16 (to nearest, ties to even, as torch rounds), as bits, rows
/// `stride` apart (the padding zero). Branch-free, so it vectorises, and written once (no
/// zeroed buffer first): it runs on every prefill matmul's activations.
#[cfg(target_arch = "x86_64")]
pub(super) fn to_bf16_bits(x: &[f32], k: usize, stride: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(x.len() / k * stride);
    for row in x.chunks_exact(k) {
        out.extend(row.iter().map(|&v| bf16_bits(v)));
        out.extend(std::iter::repeat_n(0, stride - k));
    }
    out
}

/// `v` rounded to bf16, as bits: to nearest, ties to even; a NaN stays a (quiet) NaN. The same
/// bits as `half::bf16::from_f32`.
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x40;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

/// Weight rows of the next tile that the tile at row `i`, weight row `j` of an `nc`-row panel
/// prefetches (tiles of `nr` weight rows): the first row group reads the panel from memory, so
/// it asks for the next tile's rows while it works on this one; later groups find the panel in
/// L2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn rows_ahead(i: usize, j: usize, nc: usize, nr: usize) -> usize {
    if i == 0 && j + nr < nc {
        nr.min(nc - j - nr)
    } else {
        0
    }
}

/// `*y = s`, or `*y += s` when `add` (a panel after a row's first).
///
/// # Safety
/// `y` is valid for writes (and reads when `add`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn put(y: *mut f32, s: f32, add: bool) {
    if add {
        *y += s;
    } else {
        *y = s;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use crate::kernels::gemv::x86::hsum8;
    use std::arch::x86_64::*;

    /// What a panel call gets: `x` and its row stride, `m` rows; the panel `w`, its row stride
    /// and `nc` rows; `kc` columns; `y`, its row stride, and whether the panel adds into `y`
    /// (every panel but a row's first, which stores: `y` need not be zeroed first).
    pub(super) type PanelArgs<E = f32> = (
        *const E,
        usize,
        usize,
        (*const E, usize, usize),
        usize,
        (*mut f32, usize, bool),
    );

    /// `y[i, j] += x[i, ..kc] · w[j, ..kc]` for `i < m`, `j < nc`: 4-row groups of `x` (kept in
    /// L1) against every 3-row group of the panel.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn panel((x, xs, m, (w, ws, nc), kc, (y, ys, add)): PanelArgs) {
        let mut i = 0;
        while i < m {
            let (xi, yi) = (x.add(i * xs), y.add(i * ys));
            let mut j = 0;
            while j < nc {
                let (wj, yij) = (w.add(j * ws), yi.add(j));
                let ahead = super::rows_ahead(i, j, nc, NR);
                macro_rules! tiles {
                    ($($r:literal, $c:literal);*) => {
                        match (MR.min(m - i), NR.min(nc - j), ahead > 0) {
                            $(($r, $c, false) => tile::<$r, $c, false>(xi, xs, (wj, ahead), ws, kc, (yij, ys, add)),
                              ($r, $c, true) => tile::<$r, $c, true>(xi, xs, (wj, ahead), ws, kc, (yij, ys, add)),)*
                            _ => unreachable!("tile sizes are at most MR × NR"),
                        }
                    };
                }
                tiles!(4, 3; 4, 2; 4, 1; 3, 3; 3, 2; 3, 1; 2, 3; 2, 2; 2, 1; 1, 3; 1, 2; 1, 1);
                j += NR;
            }
            i += MR;
        }
    }

    /// One `R × C` register tile over `kc` columns, added into `y`.
    #[inline(always)]
    unsafe fn tile<const R: usize, const C: usize, const AHEAD: bool>(
        x: *const f32,
        xs: usize,
        (w, ahead): (*const f32, usize),
        ws: usize,
        kc: usize,
        (y, ys, add): (*mut f32, usize, bool),
    ) {
        let k8 = kc / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut k = 0;
        while k < k8 {
            if AHEAD && k % 16 == 0 {
                // One cache line of each of the next tile's rows per 16 columns.
                for c in 0..ahead {
                    _mm_prefetch::<_MM_HINT_T1>(w.add((C + c) * ws + k).cast());
                }
            }
            let mut wv = [_mm256_setzero_ps(); C];
            for (c, wv) in wv.iter_mut().enumerate() {
                *wv = _mm256_loadu_ps(w.add(c * ws + k));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.add(r * xs + k));
                for (acc, wv) in acc.iter_mut().zip(&wv) {
                    *acc = _mm256_fmadd_ps(xv, *wv, *acc);
                }
            }
            k += 8;
        }
        for (r, acc) in acc.iter().enumerate() {
            for (c, acc) in acc.iter().enumerate() {
                let mut s = hsum8(*acc);
                for kk in k8..kc {
                    s = (*x.add(r * xs + kk)).mul_add(*w.add(c * ws + kk), s);
                }
                super::put(y.add(r * ys + c), s, add);
            }
        }
    }

    /// The same with AVX-512: 16-lane accumulators, and on CPUs with AVX512-BF16 a bf16 form
    /// (`vdpbf16ps`: 32 bf16 products per instruction, twice the f32 rate, half the bytes).
    pub(super) mod avx512 {
        use super::PanelArgs;
        use std::arch::x86_64::*;

        /// Weight rows per register tile.
        const NR: usize = 3;
        /// Activation rows per register tile.
        const MR: usize = 8;

        /// How a tile reads and multiplies its operands: one `STEP`-column slice of a row per
        /// register, multiplied into 16 f32 lanes.
        pub(in super::super) trait Lanes {
            type E;
            /// Columns per register.
            const STEP: usize;
            /// `STEP` columns from `p`.
            unsafe fn load(p: *const Self::E) -> __m512i;
            /// One column as f32 (for the `k` tail).
            unsafe fn widen(p: *const Self::E) -> f32;
            /// `acc + Σ a·b` over the columns of one register, lane-wise in f32.
            unsafe fn mul_add(acc: __m512, a: __m512i, b: __m512i) -> __m512;
        }

        /// f32 operands, FMA.
        pub(in super::super) struct F32;
        impl Lanes for F32 {
            type E = f32;
            const STEP: usize = 16;
            #[inline(always)]
            unsafe fn load(p: *const f32) -> __m512i {
                _mm512_castps_si512(_mm512_loadu_ps(p))
            }
            #[inline(always)]
            unsafe fn widen(p: *const f32) -> f32 {
                *p
            }
            #[inline(always)]
            unsafe fn mul_add(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
                _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc)
            }
        }

        /// bf16 operands (as `u16` bits), `vdpbf16ps`: each lane adds the products of two
        /// adjacent columns, so a dot product along `k` needs no reordering.
        pub(in super::super) struct Bf16;
        impl Lanes for Bf16 {
            type E = u16;
            const STEP: usize = 32;
            #[inline(always)]
            unsafe fn load(p: *const u16) -> __m512i {
                _mm512_loadu_si512(p.cast())
            }
            #[inline(always)]
            unsafe fn widen(p: *const u16) -> f32 {
                f32::from_bits(u32::from(*p) << 16)
            }
            #[inline(always)]
            unsafe fn mul_add(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
                let bh = |v| std::mem::transmute::<__m512i, __m512bh>(v);
                _mm512_dpbf16_ps(acc, bh(a), bh(b))
            }
        }

        /// `y[i, j] += x[i, ..kc] · w[j, ..kc]`: 8-row groups of `x` (32 KB, kept in L1)
        /// against every 3-row group of the panel.
        #[target_feature(enable = "avx512f,avx2,fma")]
        pub(in super::super) unsafe fn panel(args: PanelArgs<f32>) {
            panel_with::<F32>(args)
        }

        /// [`panel`] in bf16: `x` and `w` both bf16 bits.
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
        pub(in super::super) unsafe fn panel_bf16(args: PanelArgs<u16>) {
            panel_with::<Bf16>(args)
        }

        #[inline(always)]
        unsafe fn panel_with<L: Lanes>((x, xs, m, (w, ws, nc), kc, (y, ys, add)): PanelArgs<L::E>) {
            let mut i = 0;
            while i < m {
                let (xi, yi) = (x.add(i * xs), y.add(i * ys));
                let mut j = 0;
                while j < nc {
                    let (wj, yij) = (w.add(j * ws), yi.add(j));
                    let ahead = super::super::rows_ahead(i, j, nc, NR);
                    macro_rules! tiles {
                        ($($r:literal, $c:literal);*) => {
                            match (MR.min(m - i), NR.min(nc - j), ahead > 0) {
                                $(($r, $c, false) => tile::<L, $r, $c, false>(xi, xs, (wj, ahead), ws, kc, (yij, ys, add)),
                                  ($r, $c, true) => tile::<L, $r, $c, true>(xi, xs, (wj, ahead), ws, kc, (yij, ys, add)),)*
                                _ => unreachable!("tile sizes are at most MR × NR"),
                            }
                        };
                    }
                    tiles!(8, 3; 8, 2; 8, 1; 7, 3; 7, 2; 7, 1; 6, 3; 6, 2; 6, 1; 5, 3; 5, 2; 5, 1; 4, 3; 4, 2; 4, 1; 3, 3; 3, 2; 3, 1; 2, 3; 2, 2; 2, 1; 1, 3; 1, 2; 1, 1);
                    j += NR;
                }
                i += MR;
            }
        }

        /// One `R × C` register tile over `kc` columns, added into `y`: whole registers, then
        /// the last `kc % STEP` columns one by one onto the lane sums.
        #[inline(always)]
        unsafe fn tile<L: Lanes, const R: usize, const C: usize, const AHEAD: bool>(
            x: *const L::E,
            xs: usize,
            (w, ahead): (*const L::E, usize),
            ws: usize,
            kc: usize,
            (y, ys, add): (*mut f32, usize, bool),
        ) {
            let full = kc / L::STEP * L::STEP;
            let mut acc = [[_mm512_setzero_ps(); C]; R];
            for k in (0..full).step_by(L::STEP) {
                if AHEAD {
                    // One cache line (a register's worth) of each of the next tile's rows.
                    for c in 0..ahead {
                        _mm_prefetch::<_MM_HINT_T1>(w.add((C + c) * ws + k).cast());
                    }
                }
                let mut wv = [_mm512_setzero_si512(); C];
                for (c, wv) in wv.iter_mut().enumerate() {
                    *wv = L::load(w.add(c * ws + k));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xv = L::load(x.add(r * xs + k));
                    for (acc, wv) in acc.iter_mut().zip(&wv) {
                        *acc = L::mul_add(*acc, xv, *wv);
                    }
                }
            }
            // The accumulators leave their registers through stores the compiler unrolls whole;
            // summed in place (a loop with the column tail inside), they were kept on the stack
            // and zeroed by a `memset` per tile (5 % of a bf16 prompt).
            let mut lanes = [[std::mem::MaybeUninit::<__m512>::uninit(); C]; R];
            for r in 0..R {
                for c in 0..C {
                    lanes[r][c].write(acc[r][c]);
                }
            }
            for (r, lanes) in lanes.iter().enumerate() {
                for (c, lane) in lanes.iter().enumerate() {
                    let mut s = _mm512_reduce_add_ps(lane.assume_init());
                    for kk in full..kc {
                        s = L::widen(x.add(r * xs + kk)).mul_add(L::widen(w.add(c * ws + kk)), s);
                    }
                    super::super::put(y.add(r * ys + c), s, add);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemv::tests::isas;
    use crate::kernels::gemv::tests::{activations_as_multiplied, check, random, reference};
    use crate::kernels::gemv::{Q4_0Matrix, Q8_0Matrix};
    use half::{bf16, f16};

    /// Per output `(i, j)`: the f64 reference of row `i` of `x` against row `j` of `w`.
    fn reference_mm(w: &[f32], x: &[f32], m: usize) -> Vec<(f64, f64)> {
        let k = x.len() / m;
        let per_row: Vec<Vec<(f64, f64)>> = x.chunks_exact(k).map(|xr| reference(w, xr)).collect();
        per_row.into_iter().flatten().collect()
    }

    /// Several weights over one `x` in one call give each weight's own GEMM, bit for bit: all
    /// bf16 (one rounding of `x`), all f32, widened and mixed forms, all int8 (one quantized
    /// `x`).
    #[test]
    fn gemm_many_equals_one_gemm_per_weight() {
        let (m, k) = (20, 96);
        let x = random(m * k, 7);
        let ns = [50, 7, 130];
        let f32s: Vec<Vec<f32>> = ns
            .iter()
            .enumerate()
            .map(|(i, &n)| random(n * k, 20 + i as u64))
            .collect();
        let bf16s: Vec<Vec<bf16>> = f32s
            .iter()
            .map(|w| w.iter().map(|&v| bf16::from_f32(v)).collect())
            .collect();
        let f16s: Vec<f16> = f32s[1].iter().map(|&v| f16::from_f32(v)).collect();
        let q8 = Q8_0Matrix::quantize(&f32s[0], ns[0], k).unwrap();
        let q4 = Q4_0Matrix::quantize(&f32s[2], ns[2], k).unwrap();
        let q8b = Q8_0Matrix::quantize(&f32s[1], ns[1], k).unwrap();
        let groups: Vec<Vec<WeightRows>> = vec![
            bf16s.iter().map(|w| WeightRows::Bf16(w)).collect(),
            f32s.iter().map(|w| WeightRows::F32(w)).collect(),
            vec![WeightRows::F32(&f32s[0]), WeightRows::F16(&f16s)],
            vec![WeightRows::Bf16(&bf16s[0]), WeightRows::F32(&f32s[1])],
            vec![
                WeightRows::Q8_0(&q8),
                WeightRows::F16(&f16s),
                WeightRows::Q4_0(&q4),
            ],
            vec![
                WeightRows::Q8_0(&q8),
                WeightRows::Q4_0(&q4),
                WeightRows::Q8_0(&q8b),
            ],
        ];
        for isa in isas().into_iter().filter(|i| i.has_avx2()) {
            for ws in &groups {
                let n_of = |w: &WeightRows| match w {
                    WeightRows::F32(v) => v.len() / k,
                    WeightRows::Bf16(v) => v.len() / k,
                    WeightRows::F16(v) => v.len() / k,
                    WeightRows::Q8_0(q) => q.out_dim(),
                    WeightRows::Q4_0(q) => q.out_dim(),
                };
                let mut together: Vec<Vec<f32>> =
                    ws.iter().map(|w| vec![0.0; m * n_of(w)]).collect();
                let mut ys: Vec<&mut [f32]> =
                    together.iter_mut().map(|y| y.as_mut_slice()).collect();
                assert!(gemm_many_on(isa, ws, &x, m, &mut ys).unwrap());
                for (w, got) in ws.iter().zip(&together) {
                    let mut alone = vec![0.0; got.len()];
                    assert!(gemm_many_on(isa, &[*w], &x, m, &mut [&mut alone]).unwrap());
                    assert_eq!(got, &alone, "{isa:?}: {} weights", ws.len());
                }
            }
        }
    }

    #[test]
    fn gemm_matches_an_f64_reference_on_odd_shapes() {
        if Isa::get() == Isa::Portable {
            eprintln!("no AVX2 on this machine: the GEMM kernel is not used, nothing to test");
            return;
        }
        // (m, n, k): remainders in every tile dimension, k tails, several panels, several tasks.
        let shapes = [
            (2, 1, 1),
            (5, 7, 9),
            (4, 3, 8),
            (7, 50, 33),
            (9, 97, 1023),
            (3, 5, 2100),
            (64, 130, 256),
            (13, 49, 64),
            (6, 50, 2080), // q8_0 over three panels of 704, 704 and 672 columns
            (16, 7, 33),   // the bf16 product's masked tail: one column, odd
            (19, 50, 2085),
            (17, 33, 2080), // int8 products: three panels, a 1-row tile, a 1-row last group
            (18, 20, 1024), // rows 4 KB apart: padded copies (f32 and bf16 products)
        ];
        for (isa, (s, &(m, n, k))) in isas()
            .into_iter()
            .filter(|i| i.has_avx2())
            .flat_map(|i| shapes.iter().enumerate().map(move |s| (i, s)))
        {
            let gemm = |w, x: &[f32], m, y: &mut [f32]| gemm_many_on(isa, &[w], x, m, &mut [y]);
            let w = random(n * k, s as u64);
            let x = random(m * k, 50 + s as u64);
            let mut y = vec![f32::NAN; m * n];
            assert!(gemm(WeightRows::F32(&w), &x, m, &mut y).unwrap());
            check(
                &y,
                &reference_mm(&w, &x, m),
                1e-6,
                &format!("{isa:?} f32 {m}×{n}×{k}"),
            );

            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wbf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            assert!(gemm(WeightRows::Bf16(&wb), &x, m, &mut y).unwrap());
            // bf16 products round the activations as a bf16 reference does.
            let xb: Vec<f32> = if bf16_products(isa, m) {
                x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
            } else {
                x.clone()
            };
            check(
                &y,
                &reference_mm(&wbf, &xb, m),
                1e-6,
                &format!("{isa:?} bf16 {m}×{n}×{k}"),
            );

            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let whf: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
            assert!(gemm(WeightRows::F16(&wh), &x, m, &mut y).unwrap());
            check(
                &y,
                &reference_mm(&whf, &x, m),
                1e-6,
                &format!("{isa:?} f16 {m}×{n}×{k}"),
            );

            if k % 32 == 0 {
                // int8 products quantize the activations to q8 first.
                let xq: Vec<f32> = x
                    .chunks(k)
                    .flat_map(|r| activations_as_multiplied(isa, r))
                    .collect();
                let q = Q8_0Matrix::quantize(&w, n, k).unwrap();
                assert!(gemm(WeightRows::Q8_0(&q), &x, m, &mut y).unwrap());
                let want = reference_mm(&q.dequantize(), &xq, m);
                check(&y, &want, 1e-6, &format!("{isa:?} q8_0 {m}×{n}×{k}"));
                let q = Q4_0Matrix::quantize(&w, n, k).unwrap();
                assert!(gemm(WeightRows::Q4_0(&q), &x, m, &mut y).unwrap());
                let want = reference_mm(&q.dequantize(), &xq, m);
                check(&y, &want, 1e-6, &format!("{isa:?} q4_0 {m}×{n}×{k}"));
            }
        }
    }

    #[test]
    fn bf16_rounding_is_half_s() {
        let mut specials = vec![0.0f32, -0.0, 1.0, f32::MAX, f32::MIN, f32::INFINITY];
        specials.extend([
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MIN_POSITIVE,
            1e-40,
        ]);
        // Ties both ways, and values just around them.
        for b in [
            0x3f80_8000u32,
            0x3f81_8000,
            0x3f80_7fff,
            0x3f81_8001,
            0x7f7f_ffff,
            0xff7f_8000,
        ] {
            specials.push(f32::from_bits(b));
        }
        let mut seed = 1u64;
        let randoms = (0..100_000).map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            f32::from_bits((seed >> 32) as u32)
        });
        for v in specials.into_iter().chain(randoms) {
            assert_eq!(
                bf16_bits(v),
                bf16::from_f32(v).to_bits(),
                "{v:e} ({:#x})",
                v.to_bits()
            );
        }
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        let w = [0f32; 6];
        let mut y = [0f32; 8];
        assert!(gemm(WeightRows::F32(&w), &[0.0; 4], 2, &mut y).is_err()); // n = 4, k = 2
        assert!(gemm(WeightRows::F32(&w), &[0.0; 5], 2, &mut y[..6]).is_err());
        assert!(gemm(WeightRows::F32(&w), &[0.0; 4], 0, &mut y[..6]).is_err());
        assert!(gemm(WeightRows::F32(&w), &[0.0; 4], 2, &mut y[..6]).is_ok()); // n = 3, k = 2
    }
}
