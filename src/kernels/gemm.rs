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
//! - bf16, f16 and q8_0 panels are widened to f32 into a per-thread buffer first, once per panel
//!   and reused by all `m` rows, so one f32 micro-kernel serves every weight format.
//! - AVX-512F where the CPU has it (8 × 3 tiles of 16-lane accumulators: twice the arithmetic
//!   per instruction), else AVX2+FMA; elsewhere [`gemm`] returns `false` and the caller keeps
//!   candle's GEMM.

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

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Per-thread f32 panel for narrow and quantized weights (`NC × KC`, 192 KB at most).
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `y = x · wᵀ` for `x` `[m, k]`, `w` `[n, k]`, `y` `[m, n]` (row-major, `n = y.len() / m`).
/// `Ok(false)` (and `y` untouched) when this CPU has no fast kernel.
pub fn gemm(w: WeightRows<'_>, x: &[f32], m: usize, y: &mut [f32]) -> Result<bool> {
    gemm_on(Isa::get(), w, x, m, y)
}

/// [`gemm`] with the kernels of `isa` (which this CPU must have).
fn gemm_on(isa: Isa, w: WeightRows<'_>, x: &[f32], m: usize, y: &mut [f32]) -> Result<bool> {
    ensure!(
        m > 0 && x.len().is_multiple_of(m) && y.len().is_multiple_of(m),
        "gemm: {m} rows do not divide x ({}) and y ({})",
        x.len(),
        y.len()
    );
    let (k, n) = (x.len() / m, y.len() / m);
    w.check(n, k, "gemm")?;
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // Equal panels of at most KC columns, multiples of 32 except the last.
        let panels = k.div_ceil(KC);
        let kc = (k.div_ceil(panels).div_ceil(Q8_BLOCK) * Q8_BLOCK).min(k);
        y.fill(0.0);
        let yp = SyncPtr(y.as_mut_ptr());
        parallel_for(n.div_ceil(NC), |tasks| {
            PANEL.with(|buf| {
                let mut buf = buf.borrow_mut();
                for t in tasks {
                    let (j0, nc) = (t * NC, NC.min(n - t * NC));
                    for k0 in (0..k).step_by(kc) {
                        let kl = kc.min(k - k0);
                        let (wp, ws) = match w {
                            WeightRows::F32(w) => (w[j0 * k + k0..].as_ptr(), k),
                            _ => {
                                buf.resize(nc * kl, 0.0);
                                w.widen_block(k, (j0, nc), (k0, kl), &mut buf);
                                (buf.as_ptr(), kl)
                            }
                        };
                        // SAFETY: AVX2+FMA (and AVX-512F for `Avx512`) detected; `wp` holds
                        // `nc` rows of `kl` at stride `ws`, `x` `m` rows of `k` from column
                        // `k0`; this task alone writes columns `j0..j0 + nc` of `y` (`m` rows
                        // of `n`), which outlives `parallel_for`.
                        unsafe {
                            let args = (
                                x[k0..].as_ptr(),
                                k,
                                m,
                                (wp, ws, nc),
                                kl,
                                yp.get().add(j0),
                                n,
                            );
                            match isa {
                                Isa::Avx512 => x86::avx512::panel(args),
                                _ => x86::panel(args),
                            }
                        };
                    }
                }
            })
        });
        return Ok(true);
    }
    Ok(false)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use crate::kernels::gemv::x86::hsum8;
    use std::arch::x86_64::*;

    /// What a panel call gets: `x` and its row stride, `m` rows; the panel `w`, its row stride
    /// and `nc` rows; `kc` columns; `y` and its row stride.
    pub(super) type PanelArgs = (
        *const f32,
        usize,
        usize,
        (*const f32, usize, usize),
        usize,
        *mut f32,
        usize,
    );

    /// `y[i, j] += x[i, ..kc] · w[j, ..kc]` for `i < m`, `j < nc`: 4-row groups of `x` (kept in
    /// L1) against every 3-row group of the panel.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn panel((x, xs, m, (w, ws, nc), kc, y, ys): PanelArgs) {
        let mut i = 0;
        while i < m {
            let (xi, yi) = (x.add(i * xs), y.add(i * ys));
            let mut j = 0;
            while j < nc {
                let (wj, yij) = (w.add(j * ws), yi.add(j));
                macro_rules! tiles {
                    ($($r:literal, $c:literal);*) => {
                        match (MR.min(m - i), NR.min(nc - j)) {
                            $(($r, $c) => tile::<$r, $c>(xi, xs, wj, ws, kc, yij, ys),)*
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
    unsafe fn tile<const R: usize, const C: usize>(
        x: *const f32,
        xs: usize,
        w: *const f32,
        ws: usize,
        kc: usize,
        y: *mut f32,
        ys: usize,
    ) {
        let k8 = kc / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut k = 0;
        while k < k8 {
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
                *y.add(r * ys + c) += s;
            }
        }
    }

    /// The same with AVX-512F: 8 × 3 tiles of 16-lane accumulators (24 of the 32 zmm
    /// registers). Eight activation rows per tile halve how often the weight panel streams from
    /// L2 (which bounds a 4-row tile at 16 lanes).
    pub(super) mod avx512 {
        use super::PanelArgs;
        use std::arch::x86_64::*;

        /// Weight rows per register tile.
        const NR: usize = 3;
        /// Activation rows per register tile.
        const MR: usize = 8;

        /// `y[i, j] += x[i, ..kc] · w[j, ..kc]`: 8-row groups of `x` (32 KB, kept in L1)
        /// against every 3-row group of the panel.
        #[target_feature(enable = "avx512f,avx2,fma")]
        pub(in super::super) unsafe fn panel((x, xs, m, (w, ws, nc), kc, y, ys): PanelArgs) {
            let mut i = 0;
            while i < m {
                let (xi, yi) = (x.add(i * xs), y.add(i * ys));
                let mut j = 0;
                while j < nc {
                    let (wj, yij) = (w.add(j * ws), yi.add(j));
                    macro_rules! tiles {
                        ($($r:literal, $c:literal);*) => {
                            match (MR.min(m - i), NR.min(nc - j)) {
                                $(($r, $c) => tile::<$r, $c>(xi, xs, wj, ws, kc, yij, ys),)*
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

        /// One `R × C` register tile over `kc` columns, added into `y`.
        #[inline(always)]
        unsafe fn tile<const R: usize, const C: usize>(
            x: *const f32,
            xs: usize,
            w: *const f32,
            ws: usize,
            kc: usize,
            y: *mut f32,
            ys: usize,
        ) {
            let k16 = kc / 16 * 16;
            let mut acc = [[_mm512_setzero_ps(); C]; R];
            let mut k = 0;
            while k < k16 {
                let mut wv = [_mm512_setzero_ps(); C];
                for (c, wv) in wv.iter_mut().enumerate() {
                    *wv = _mm512_loadu_ps(w.add(c * ws + k));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(x.add(r * xs + k));
                    for (acc, wv) in acc.iter_mut().zip(&wv) {
                        *acc = _mm512_fmadd_ps(xv, *wv, *acc);
                    }
                }
                k += 16;
            }
            for (r, acc) in acc.iter().enumerate() {
                for (c, acc) in acc.iter().enumerate() {
                    let mut s = _mm512_reduce_add_ps(*acc);
                    for kk in k16..kc {
                        s = (*x.add(r * xs + kk)).mul_add(*w.add(c * ws + kk), s);
                    }
                    *y.add(r * ys + c) += s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemv::tests::isas;
    use crate::kernels::gemv::tests::{check, random, reference};
    use crate::kernels::gemv::{Q4_0Matrix, Q8_0Matrix};
    use half::{bf16, f16};

    /// Per output `(i, j)`: the f64 reference of row `i` of `x` against row `j` of `w`.
    fn reference_mm(w: &[f32], x: &[f32], m: usize) -> Vec<(f64, f64)> {
        let k = x.len() / m;
        let per_row: Vec<Vec<(f64, f64)>> = x.chunks_exact(k).map(|xr| reference(w, xr)).collect();
        per_row.into_iter().flatten().collect()
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
        ];
        for (isa, (s, &(m, n, k))) in isas()
            .into_iter()
            .filter(|i| i.has_avx2())
            .flat_map(|i| shapes.iter().enumerate().map(move |s| (i, s)))
        {
            let gemm = |w, x: &[f32], m, y: &mut [f32]| gemm_on(isa, w, x, m, y);
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
            check(
                &y,
                &reference_mm(&wbf, &x, m),
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
                let q = Q8_0Matrix::quantize(&w, n, k).unwrap();
                assert!(gemm(WeightRows::Q8_0(&q), &x, m, &mut y).unwrap());
                let want = reference_mm(&q.dequantize(), &x, m);
                check(&y, &want, 1e-6, &format!("{isa:?} q8_0 {m}×{n}×{k}"));
                let q = Q4_0Matrix::quantize(&w, n, k).unwrap();
                assert!(gemm(WeightRows::Q4_0(&q), &x, m, &mut y).unwrap());
                let want = reference_mm(&q.dequantize(), &x, m);
                check(&y, &want, 1e-6, &format!("{isa:?} q4_0 {m}×{n}×{k}"));
            }
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
