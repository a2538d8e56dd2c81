//! Batch-1 kernels for `y = x · Wᵀ` ("gemv"), the decode step's weight matmuls, and the weight
//! formats the CPU kernels read. Each decoded token multiplies one activation row by every weight
//! matrix, so decode is bound by how fast the weights stream from memory, not by arithmetic.
//!
//! Notable:
//! - Row-parallel, each weight byte read once: the `[out, in]` rows are cut into ~1 MB tasks
//!   that the threads share out (work stealing), each read front to back by one thread, so the
//!   prefetcher sees long sequential streams and a thread slowed by a neighbour hands its share
//!   to the other ([`super::parallel`]).
//! - One row at a time, so each thread's weights stream strictly sequentially: the prefetcher
//!   handles one long stream far better than several short interleaved ones (measured 2.5× for
//!   bf16 and q8_0 rows of 1-2 KB, 10 % for f32); several accumulators keep FMAs independent,
//!   and `x` (a few KB) stays in L1.
//! - Explicit AVX2+FMA+F16C intrinsics, and AVX-512 ones (16 lanes: half the instructions per
//!   weight, which matters once two cores stream bf16 or q8_0 faster than 8-lane widening keeps
//!   up), picked at run time with `is_x86_feature_detected!` (no nightly features, no
//!   `-C target-cpu`, one binary for every x86-64); elsewhere a portable version written so LLVM
//!   vectorises it (16-lane accumulator arrays), which is also the reference the tests compare.
//! - Narrow weights widen in registers and accumulate in f32, so they move 2 (bf16, f16) or 1.06
//!   (q8_0) bytes per weight instead of 4: bf16 is the top half of an f32 (a shift, what
//!   `half::bf16::to_f32` does), f16 uses `vcvtph2ps` (portable: a branch-free exponent rebias,
//!   checked against `half` on every bit pattern), q8_0 is `d · Σ q·x` per block of 32
//!   ([`Q8_0Matrix`]).
//! - bf16 weights on AVX512-BF16 multiply bf16 pairs (`vdpbf16ps`, f32 sums) against the
//!   activations rounded to bf16, as llama.cpp does and as the prompt's GEMM does: half the
//!   arithmetic, which a verify pass's few rows and weights from L3 feel (decode from DRAM is
//!   bound by memory either way).
//! - [`gemv_rows`] gives each of several activation rows the bits [`gemv`] gives it alone (the
//!   same per-row order, several rows per pass over the weights): a verify pass then computes
//!   as decode steps do ([`super::as_decode_steps`]).
//! - q8_0 and q4_0 are stored with their rows interleaved in groups of 16 ([`BlockMatrix`]) for
//!   the int8 kernels (`super::int8`: AVX512-VNNI or AVX2), which compute whole groups, so their
//!   tasks start on a group; the portable one-row kernels here (no AVX2, or
//!   `LLMARCH_KERNELS=avx512`'s f32 products) read each group regrouped into GGML's row-major
//!   blocks first.
//! - Results differ from candle's GEMM only by summation order: agreement is to f32 rounding
//!   (~1e-6 of `Σ|w·x|`), not bit for bit.

use super::hugepages::{WeightBuf, Zeroable};
use super::parallel::{parallel_for, threads};
use anyhow::{ensure, Result};
use half::{bf16, f16};

/// Lanes per portable accumulator.
const LANES: usize = 16;
/// Weight bytes per parallel task: long sequential streams for the prefetcher (1 MB tasks decode
/// the real-size E2B ~10 % faster than 64 KB ones), while [`gemv`] keeps at least two tasks per
/// thread so threads still balance.
const TASK_BYTES: usize = 1 << 20;
/// Weight bytes per task of [`gemv_rows`]: small enough to stay in L2 while every activation row
/// passes over it, so the weights still come from memory once.
const ROWS_TASK_BYTES: usize = 256 << 10;
/// The most activation rows [`few_rows`] sends to [`gemv_rows`] for f16/q8_0/q4_0 weights:
/// measured faster than the GEMM up to 9 rows for q8_0 (2 threads, `examples/few_rows.rs`).
pub const MAX_GEMV_ROWS: usize = 8;

/// Whether `rows` activation rows (more than one) of `w` go to [`gemv_rows`] rather than the
/// GEMM: a few rows of narrow weights, nothing widened to f32; bf16 ones up to where the GEMM's
/// bf16 products start (at 9 rows of `[8192, 2048]`, 3.0 ms against 5.1, `examples/few_rows.rs`).
/// f32 weights stay with the GEMM, which reads them once and sums in tiles.
pub fn few_rows(w: WeightRows<'_>, rows: usize) -> bool {
    match w {
        WeightRows::F32(_) => false,
        WeightRows::Bf16(_) => rows < super::gemm::BF16_MIN_ROWS,
        _ => rows <= MAX_GEMV_ROWS,
    }
}
/// Elements per q8_0 block (one scale each), as in GGML.
pub const Q8_BLOCK: usize = 32;

/// A row-major `[out, in]` weight matrix, borrowed.
#[derive(Debug, Clone, Copy)]
pub enum WeightRows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    Q8_0(&'a Q8_0Matrix),
    Q4_0(&'a Q4_0Matrix),
}

impl WeightRows<'_> {
    /// Bytes per weight, for sizing tasks.
    pub(crate) fn bytes_per_weight(&self) -> usize {
        match self {
            WeightRows::F32(_) => 4,
            WeightRows::Bf16(_) | WeightRows::F16(_) => 2,
            WeightRows::Q8_0(_) | WeightRows::Q4_0(_) => 1,
        }
    }

    /// Rows a task should start on a multiple of: [`ROW_GROUP`] for q8_0/q4_0 (the int8 kernels
    /// compute whole groups), else 1.
    pub(crate) fn row_group(&self) -> usize {
        match self {
            WeightRows::Q8_0(_) | WeightRows::Q4_0(_) => ROW_GROUP,
            _ => 1,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            WeightRows::F32(w) => w.len(),
            WeightRows::Bf16(w) => w.len(),
            WeightRows::F16(w) => w.len(),
            WeightRows::Q8_0(m) => m.out * m.in_dim,
            WeightRows::Q4_0(m) => m.out * m.in_dim,
        }
    }

    /// Checks that the weights form `[out, in]`.
    pub(crate) fn check(&self, out: usize, in_dim: usize, what: &str) -> Result<()> {
        ensure!(
            in_dim > 0 && self.len() == out * in_dim,
            "{what}: {} weights do not form [{out}, {in_dim}]",
            self.len()
        );
        if let WeightRows::Q8_0(m) = self {
            ensure!(
                m.in_dim == in_dim && m.out == out,
                "{what}: q8_0 matrix [{}, {}] used as [{out}, {in_dim}]",
                m.out,
                m.in_dim
            );
        }
        if let WeightRows::Q4_0(m) = self {
            ensure!(
                m.in_dim == in_dim && m.out == out,
                "{what}: q4_0 matrix [{}, {}] used as [{out}, {in_dim}]",
                m.out,
                m.in_dim
            );
        }
        Ok(())
    }

    /// Rows `r0..r0 + rows`, columns `c0..c0 + cols` of the matrix with rows of `n`, widened to
    /// f32 into `dst` (`rows × cols`, row-major). For q8_0 and q4_0, `c0` is a multiple of 32.
    pub(crate) fn widen_block(
        &self,
        n: usize,
        (r0, rows): (usize, usize),
        (c0, cols): (usize, usize),
        dst: &mut [f32],
    ) {
        fn copy<E: Widen>(w: &[E], n: usize, r0: usize, c0: usize, cols: usize, dst: &mut [f32]) {
            for (r, d) in dst.chunks_exact_mut(cols).enumerate() {
                let at = (r0 + r) * n + c0;
                for (d, s) in d.iter_mut().zip(&w[at..at + cols]) {
                    *d = s.widen();
                }
            }
        }
        let dst = &mut dst[..rows * cols];
        match self {
            WeightRows::F32(w) => copy(w, n, r0, c0, cols, dst),
            WeightRows::Bf16(w) => copy(w, n, r0, c0, cols, dst),
            WeightRows::F16(w) => copy(w, n, r0, c0, cols, dst),
            WeightRows::Q8_0(m) => {
                for (r, d) in dst.chunks_exact_mut(cols).enumerate() {
                    for (b, d) in d.chunks_mut(Q8_BLOCK).enumerate() {
                        let (q, s) = m.block(r0 + r, c0 / Q8_BLOCK + b);
                        let s = widen_f16(s.to_bits());
                        for (d, &q) in d.iter_mut().zip(&q) {
                            *d = s * q as f32;
                        }
                    }
                }
            }
            WeightRows::Q4_0(m) => {
                for (r, d) in dst.chunks_exact_mut(cols).enumerate() {
                    for (b, d) in d.chunks_mut(Q8_BLOCK).enumerate() {
                        let (q, s) = m.block(r0 + r, c0 / Q8_BLOCK + b);
                        let s = widen_f16(s.to_bits());
                        let (lo, hi) = d.split_at_mut(Q8_BLOCK / 2);
                        for ((lo, hi), &b) in lo.iter_mut().zip(hi).zip(&q) {
                            *lo = s * ((b & 0x0f) as i32 - 8) as f32;
                            *hi = s * ((b >> 4) as i32 - 8) as f32;
                        }
                    }
                }
            }
        }
    }
}

/// Rows per interleaved group of a [`BlockMatrix`]: one 16-lane register of outputs.
pub const ROW_GROUP: usize = 16;

/// An `[out, in]` matrix in one of GGML's block formats: each row is cut into blocks of 32
/// weights, each stored as `QB` codes of type `T` and one f16 scale ([`Q8_0Matrix`],
/// [`Q4_0Matrix`]).
///
/// The blocks are stored interleaved, as llama.cpp repacks its quantized types for its int8
/// kernels: rows in groups of [`ROW_GROUP`] (the last padded with zero rows), and per group and
/// block the 16 rows' codes 4 bytes at a time. `qs` is `[groups, in / 32, QB / 4, 16, 4]`:
/// element `[g, b, t, r, j]` is code byte `4t + j` of block `b` of row `16g + r`; `scales` is
/// `[groups, in / 32, 16]`. One 64-byte load thus gives 16 rows × 4 code bytes, so the int8
/// kernels keep one output row per register lane and read the blocks as stored for decode, a
/// verify pass and the prompt alike, with no repacking per call.
#[derive(Debug, Clone)]
pub struct BlockMatrix<T: Zeroable, const QB: usize> {
    out: usize,
    in_dim: usize,
    qs: WeightBuf<T>,
    scales: WeightBuf<f16>,
}

/// GGML's q8_0: per block of 32 weights, 32 `i8` codes and one f16 scale `d = max|w| / 127`, so
/// `w ≈ d · q` (34 bytes per 32 weights). As GGML's `quantize_row_q8_0_ref`: `q = round(w / d)`
/// (half away from zero).
pub type Q8_0Matrix = BlockMatrix<i8, Q8_BLOCK>;

/// GGML's q4_0: per block of 32 weights, 32 4-bit codes and one f16 scale (18 bytes per 32
/// weights, 0.56 bytes per weight). As GGML's `quantize_row_q4_0_ref`: `d = m / −8` where `m` is
/// the block's value of largest magnitude (sign kept), `q = min(15, trunc(w / d + 8.5))`,
/// `w ≈ d · (q − 8)`; byte `j` of a block holds code `j` in its low nibble and code `j + 16` in
/// its high one.
pub type Q4_0Matrix = BlockMatrix<u8, { Q8_BLOCK / 2 }>;

impl Q8_0Matrix {
    /// Quantizes `[out, in]` rows of f32, bf16 or f16 (widened a block at a time: no f32 copy
    /// is made); `in` must be a multiple of 32.
    pub fn quantize<E: Widen>(w: &[E], out: usize, in_dim: usize) -> Result<Self> {
        Self::quantize_with(w, out, in_dim, &mut |_| {})
    }

    /// [`Q8_0Matrix::quantize`], telling `done` of each slab of rows finished (see
    /// [`quantize_blocks`]).
    pub fn quantize_with<E: Widen>(
        w: &[E],
        out: usize,
        in_dim: usize,
        done: &mut dyn FnMut(std::ops::Range<usize>),
    ) -> Result<Self> {
        Self::quantize_blocks(w, out, in_dim, done, |w, q| {
            let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            for (q, &v) in q.iter_mut().zip(w) {
                *q = (v * id).round() as i8; // |v · id| ≤ 127
            }
            d
        })
    }

    /// The whole matrix as f32 `[out, in]` (tests, checks).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut d = vec![0f32; self.out * self.in_dim];
        WeightRows::Q8_0(self).widen_block(self.in_dim, (0, self.out), (0, self.in_dim), &mut d);
        d
    }
}

impl Q4_0Matrix {
    /// Quantizes `[out, in]` rows of f32, bf16 or f16 (widened a block at a time); `in` must be
    /// a multiple of 32.
    pub fn quantize<E: Widen>(w: &[E], out: usize, in_dim: usize) -> Result<Self> {
        Self::quantize_with(w, out, in_dim, &mut |_| {})
    }

    /// [`Q4_0Matrix::quantize`], telling `done` of each slab of rows finished (see
    /// [`quantize_blocks`]).
    pub fn quantize_with<E: Widen>(
        w: &[E],
        out: usize,
        in_dim: usize,
        done: &mut dyn FnMut(std::ops::Range<usize>),
    ) -> Result<Self> {
        const H: usize = Q8_BLOCK / 2;
        Self::quantize_blocks(w, out, in_dim, done, |w, q| {
            let m = w
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = m / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let code = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
            for (j, q) in q.iter_mut().enumerate() {
                *q = code(w[j]) | (code(w[j + H]) << 4);
            }
            d
        })
    }

    /// The whole matrix as f32 `[out, in]` (tests, checks).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut d = vec![0f32; self.out * self.in_dim];
        WeightRows::Q4_0(self).widen_block(self.in_dim, (0, self.out), (0, self.in_dim), &mut d);
        d
    }
}

impl<T: Zeroable + Default, const QB: usize> BlockMatrix<T, QB> {
    /// The format's name, for messages.
    const FORMAT: &str = if QB == Q8_BLOCK { "q8_0" } else { "q4_0" };

    /// A matrix from its interleaved codes (`[stored_rows(out), in / 32 · QB]`) and scales
    /// (`[stored_rows(out), in / 32]`), e.g. as an earlier run stored them; the lengths are
    /// checked.
    pub fn from_parts(
        out: usize,
        in_dim: usize,
        qs: WeightBuf<T>,
        scales: WeightBuf<f16>,
    ) -> Result<Self> {
        let (rows, nb) = (Self::stored_rows(out), in_dim / Q8_BLOCK);
        ensure!(
            in_dim.is_multiple_of(Q8_BLOCK)
                && qs.len() == rows * nb * QB
                && scales.len() == rows * nb,
            "{}: {} codes and {} scales do not make a [{out}, {in_dim}] matrix",
            Self::FORMAT,
            qs.len(),
            scales.len()
        );
        Ok(BlockMatrix {
            out,
            in_dim,
            qs,
            scales,
        })
    }

    /// Rows stored for `out` rows: whole groups.
    pub fn stored_rows(out: usize) -> usize {
        out.next_multiple_of(ROW_GROUP)
    }

    /// The codes and the scales as bytes (native order), to store.
    pub fn bytes_stored(&self) -> (&[u8], &[u8]) {
        (self.qs.as_bytes(), self.scales.as_bytes())
    }

    /// The interleaved codes (`[groups, in / 32, QB / 4, 16, 4]`) and scales
    /// (`[groups, in / 32, 16]`).
    pub(crate) fn raw(&self) -> (&[T], &[f16]) {
        (&self.qs, &self.scales)
    }

    pub fn out_dim(&self) -> usize {
        self.out
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Bytes held (the last group's padding included).
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(&self.qs[..]) + 2 * self.scales.len()
    }

    /// Block `b` of row `row` as GGML stores it: the codes and the scale.
    pub(crate) fn block(&self, row: usize, b: usize) -> ([T; QB], f16) {
        let nb = self.in_dim / Q8_BLOCK;
        let codes = std::array::from_fn(|i| self.qs[Self::code_at(nb, row, b, i)]);
        (codes, self.scales[Self::scale_at(nb, row, b)])
    }

    /// Group `g`'s 16 rows in GGML's row-major layout (`q` `[16, in / 32 · QB]`, `s`
    /// `[16, in / 32]`), for the kernels that read one row at a time (f32 products):
    /// the stored words read front to back, each 64 bytes (one word of each row) spread over
    /// the 16 rows, which stay in L1/L2 for the kernel that follows.
    fn ungroup(&self, g: usize, q: &mut Vec<T>, s: &mut Vec<f16>) {
        let nb = self.in_dim / Q8_BLOCK;
        let words = nb * QB / 4; // 4-byte words per row
        q.clear();
        q.resize(ROW_GROUP * nb * QB, T::default());
        s.clear();
        s.resize(ROW_GROUP * nb, f16::ZERO);
        let (src, dst) = (self.qs.as_ptr().cast::<u32>(), q.as_mut_ptr().cast::<u32>());
        for w in 0..words {
            for r in 0..ROW_GROUP {
                // SAFETY: word `w` of the group's row `r` is stored word `(g·words + w)·16 + r`
                // (group `g` is stored whole), and `q` holds 16 rows of `words` words; both
                // are plain bytes, read and written unaligned.
                unsafe {
                    let v = src.add((g * words + w) * ROW_GROUP + r).read_unaligned();
                    dst.add(r * words + w).write_unaligned(v);
                }
            }
        }
        for b in 0..nb {
            for r in 0..ROW_GROUP {
                s[r * nb + b] = self.scales[(g * nb + b) * ROW_GROUP + r];
            }
        }
    }

    /// Index in `qs` of code `i` of block `b` of `row`, with `nb` blocks per row.
    #[inline(always)]
    fn code_at(nb: usize, row: usize, b: usize, i: usize) -> usize {
        let (g, r) = (row / ROW_GROUP, row % ROW_GROUP);
        (((g * nb + b) * (QB / 4) + i / 4) * ROW_GROUP + r) * 4 + i % 4
    }

    /// Index in `scales` of the scale of block `b` of `row`.
    #[inline(always)]
    fn scale_at(nb: usize, row: usize, b: usize) -> usize {
        (row / ROW_GROUP * nb + b) * ROW_GROUP + row % ROW_GROUP
    }

    /// Quantizes `[out, in]` rows of `w` (f32, bf16 or f16, widened a block at a time):
    /// `block(weights, codes)` fills a block's codes and returns its scale. Blocks go in
    /// parallel, rows in slabs of about [`QUANTIZE_SLAB_BYTES`] of `w`, and `done(rows)` hears
    /// of each finished slab, so a caller reading `w` from a mapping can give those pages back
    /// as it goes (peak memory: one slab, not the matrix). Padding rows keep zero codes and
    /// scales.
    fn quantize_blocks<E: Widen>(
        w: &[E],
        out: usize,
        in_dim: usize,
        done: &mut dyn FnMut(std::ops::Range<usize>),
        block: impl Fn(&[f32; Q8_BLOCK], &mut [T; QB]) -> f32 + Sync,
    ) -> Result<Self> {
        let what = Self::FORMAT;
        ensure!(
            in_dim > 0 && in_dim.is_multiple_of(Q8_BLOCK),
            "{what} needs rows whose length is a multiple of {Q8_BLOCK}, got {in_dim}"
        );
        ensure!(
            w.len() == out * in_dim,
            "{what}: {} weights for a [{out}, {in_dim}] matrix",
            w.len()
        );
        let nb = in_dim / Q8_BLOCK; // blocks per row
        let stored = Self::stored_rows(out);
        let mut qs = WeightBuf::<T>::zeroed(stored * nb * QB)?;
        let mut scales = WeightBuf::<f16>::zeroed(stored * nb)?;
        let slab = (QUANTIZE_SLAB_BYTES / (in_dim * std::mem::size_of::<E>())).max(1);
        const PER_TASK: usize = 2048; // blocks
        let (qp, sp) = (SyncPtr(qs.as_mut_ptr()), SyncPtr(scales.as_mut_ptr()));
        for r0 in (0..out).step_by(slab) {
            let r1 = (r0 + slab).min(out);
            let (first, blocks) = (r0 * nb, (r1 - r0) * nb);
            parallel_for(blocks.div_ceil(PER_TASK), |tasks| {
                let b0 = first + tasks.start * PER_TASK;
                let b1 = first + (tasks.end * PER_TASK).min(blocks);
                let w = &w[b0 * Q8_BLOCK..b1 * Q8_BLOCK];
                for (at, w) in (b0..b1).zip(w.chunks_exact(Q8_BLOCK)) {
                    let (row, b) = (at / nb, at % nb);
                    let w: [f32; Q8_BLOCK] = std::array::from_fn(|j| w[j].widen());
                    let mut q = [T::default(); QB];
                    let d = f16::from_f32(block(&w, &mut q));
                    // SAFETY: each block has its own places in `qs` and `scales` (within the
                    // `stored` rows they were sized for), and tasks cover disjoint blocks; both
                    // buffers outlive `parallel_for`.
                    unsafe {
                        for (i, q) in q.into_iter().enumerate() {
                            qp.get().add(Self::code_at(nb, row, b, i)).write(q);
                        }
                        sp.get().add(Self::scale_at(nb, row, b)).write(d);
                    }
                }
            });
            done(r0..r1);
        }
        Ok(BlockMatrix {
            out,
            in_dim,
            qs,
            scales,
        })
    }
}

/// Source bytes per slab of rows in [`BlockMatrix::quantize_blocks`]: what a caller may release
/// at a time.
const QUANTIZE_SLAB_BYTES: usize = 16 << 20;

/// A raw pointer handed to the pool's threads, each of which writes a disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub(crate) *mut T);
// SAFETY: only used to give threads disjoint parts of one buffer (see each use).
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// `y = W · x` for `W` `[out, in]` and `x` `[in]`: `y` `[out]`, f32 accumulation.
pub fn gemv(w: WeightRows<'_>, x: &[f32], y: &mut [f32]) -> Result<()> {
    gemv_many(&[w], x, &mut [y])
}

/// `ys[i] = ws[i] · x` for weights that read the same `x` (a layer's q/k/v projections, an MLP's
/// gate and up) in one parallel pass: one dispatch instead of one per matrix, `x` quantized once
/// per int8 format, and every matrix's tasks shared out together, so a small matrix does not
/// leave a thread waiting at its end.
pub fn gemv_many(ws: &[WeightRows<'_>], x: &[f32], ys: &mut [&mut [f32]]) -> Result<()> {
    ensure!(
        ws.len() == ys.len(),
        "gemv_many: {} weights for {} outputs",
        ws.len(),
        ys.len()
    );
    for (w, y) in ws.iter().zip(ys.iter()) {
        w.check(y.len(), x.len(), "gemv")?;
    }
    let (isa, n) = (Isa::get(), x.len());
    // About TASK_BYTES of weights per task (long sequential streams), at least two per thread.
    let mut tasks = vec![];
    for (i, (w, y)) in ws.iter().zip(ys.iter()).enumerate() {
        let out = y.len();
        let per_task = (TASK_BYTES / (n * w.bytes_per_weight()))
            .min(out.div_ceil(2 * threads()))
            .max(1)
            .next_multiple_of(w.row_group());
        tasks.extend(
            (0..out)
                .step_by(per_task)
                .map(|r| (i, r..(r + per_task).min(out))),
        );
    }
    // The last tasks, cut in four: a thread that finishes early takes a small piece rather
    // than waiting while the other runs a whole task (up to ~70 µs at 1 MB, per call, ~80
    // calls per decode step).
    let tail = threads().min(tasks.len());
    let pieces: Vec<_> = tasks
        .drain(tasks.len() - tail..)
        .flat_map(|(i, rows)| {
            let piece = rows.len().div_ceil(4).next_multiple_of(ws[i].row_group());
            let end = rows.end;
            rows.step_by(piece)
                .map(move |r| (i, r..(r + piece).min(end)))
        })
        .collect();
    tasks.extend(pieces);
    let prepared = Prepared::new(isa, ws, x);
    let yp: Vec<SyncPtr<f32>> = ys.iter_mut().map(|y| SyncPtr(y.as_mut_ptr())).collect();
    parallel_for(tasks.len(), |range| {
        for (i, rows) in tasks[range].iter().cloned() {
            // SAFETY: tasks cover disjoint row ranges of each output, which outlive the call.
            let y =
                unsafe { std::slice::from_raw_parts_mut(yp[i].get().add(rows.start), rows.len()) };
            row_kernel(isa, ws[i], rows, x, &prepared, y);
        }
    });
    Ok(())
}

/// `y = x · Wᵀ` for a few activation rows: `x` `[m, in]`, `y` `[m, out]`. The one-row kernels of
/// [`gemv`] run over each task's slice of `W` once per row while the slice is in cache, so the
/// weights stream from memory once and no panel is widened (the GEMM widens q8_0/bf16 panels
/// to f32 first, which at a few rows costs more than the arithmetic); int8 products take up to
/// eight rows per pass, loading and unpacking each weight block once for all of them. For
/// speculative decoding's verify pass: a few rows cost little more than one.
pub fn gemv_rows(w: WeightRows<'_>, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
    ensure!(
        m > 0 && x.len().is_multiple_of(m) && y.len().is_multiple_of(m),
        "gemv_rows: {m} rows do not divide x ({}) and y ({})",
        x.len(),
        y.len()
    );
    w.check(y.len() / m, x.len() / m, "gemv_rows")?;
    rows_pass(w, x, m, y, ROWS_TASK_BYTES);
    Ok(())
}

/// The one-row kernels over `m` rows of `x` (`[m, in]` → `y` `[m, out]`, shapes checked): whole
/// weight rows per task, about `task_bytes` of them but at least two tasks per thread (a thread
/// slowed by a neighbour hands work over); each task runs every row of `x` over its slice.
fn rows_pass(w: WeightRows<'_>, x: &[f32], m: usize, y: &mut [f32], task_bytes: usize) {
    let (n, out) = (x.len() / m, y.len() / m);
    let isa = Isa::get();
    let per_task = (task_bytes / (n * w.bytes_per_weight()))
        .min(out.div_ceil(2 * threads()))
        .max(1)
        .next_multiple_of(w.row_group());
    let prepared = Prepared::new_rows(isa, w, x, m);
    let yp = SyncPtr(y.as_mut_ptr());
    parallel_for(out.div_ceil(per_task), |tasks| {
        let rows = tasks.start * per_task..(tasks.end * per_task).min(out);
        // Int8 products: every row of `x` per pass over the task's weights.
        #[cfg(target_arch = "x86_64")]
        if let Some(xq) = prepared.rows_for(w) {
            let mut ys: Vec<&mut [f32]> = (0..m)
                // SAFETY: as below; each row of `y` once.
                .map(|r| unsafe {
                    std::slice::from_raw_parts_mut(yp.get().add(r * out + rows.start), rows.len())
                })
                .collect();
            super::int8::gemv_rows(isa, w, rows.clone(), xq, &mut ys);
            return;
        }
        // f32, f16 and bf16 weights on AVX-512: up to four rows of `x` per pass over each
        // weight row.
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512
            && matches!(
                w,
                WeightRows::F32(_) | WeightRows::F16(_) | WeightRows::Bf16(_)
            )
        {
            let mut ys: Vec<&mut [f32]> = (0..m)
                // SAFETY: as below; each row of `y` once.
                .map(|r| unsafe {
                    std::slice::from_raw_parts_mut(yp.get().add(r * out + rows.start), rows.len())
                })
                .collect();
            let xs: Vec<&[f32]> = x.chunks(n).collect();
            let xb = prepared.bf16_for(w);
            let part = rows.start * n..rows.end * n;
            for (t, (xs, ys)) in xs.chunks(4).zip(ys.chunks_mut(4)).enumerate() {
                // SAFETY: AVX-512F detected (`Isa::Avx512`), AVX512-BF16 where bf16 rows were
                // prepared; `part` holds `rows.len()` rows of `n`, each `ys[j]` one value per
                // row.
                unsafe {
                    match (w, &xb) {
                        (WeightRows::Bf16(w), Some(xb)) => x86::avx512::gemv_bf16_products(
                            &w[part.clone()],
                            &xb[4 * t..4 * t + xs.len()],
                            ys,
                        ),
                        (WeightRows::F32(w), _) => {
                            x86::avx512::gemv_dense_rows(&w[part.clone()], xs, ys)
                        }
                        (WeightRows::F16(w), _) => {
                            x86::avx512::gemv_dense_rows(&w[part.clone()], xs, ys)
                        }
                        (WeightRows::Bf16(w), None) => {
                            x86::avx512::gemv_bf16_rows(&w[part.clone()], xs, ys)
                        }
                        _ => unreachable!("matched above"),
                    }
                }
            }
            return;
        }
        for r in 0..m {
            // SAFETY: tasks cover disjoint column ranges of each row of `y`, which outlives
            // `parallel_for`.
            let y = unsafe {
                std::slice::from_raw_parts_mut(yp.get().add(r * out + rows.start), rows.len())
            };
            let xr = &x[r * n..(r + 1) * n];
            row_kernel(isa, w, rows.clone(), xr, &Prepared::default(), y);
        }
    });
}

/// Activation rows prepared for products that do not take f32: quantized to q8 for the int8
/// products (q8_0/q4_0 weights where the CPU has them), rounded to bf16 for the bf16 products
/// (bf16 weights on AVX512-BF16); once per row for every matrix of a call. Empty where neither
/// runs.
#[derive(Default)]
struct Prepared {
    #[cfg(target_arch = "x86_64")]
    rows: Vec<super::int8::QuantRows>,
    /// The rows rounded to bf16 (bits), `[m, k]`, and `k`.
    bf16: (Vec<u16>, usize),
}

impl Prepared {
    /// For one row `x`, for whichever of `ws` take int8 or bf16 products.
    fn new(isa: Isa, ws: &[WeightRows<'_>], x: &[f32]) -> Prepared {
        let mut p = match ws.iter().find(|w| w.row_group() > 1) {
            Some(&w) => Prepared::new_rows(isa, w, x, 1),
            None => Prepared::default(),
        };
        if let Some(&w) = ws.iter().find(|w| matches!(w, WeightRows::Bf16(_))) {
            p.bf16 = Prepared::new_rows(isa, w, x, 1).bf16;
        }
        p
    }

    /// For the `m` rows of `x`, if `w` takes int8 or bf16 products.
    #[allow(unused_variables)]
    fn new_rows(isa: Isa, w: WeightRows<'_>, x: &[f32], m: usize) -> Prepared {
        let k = x.len() / m;
        #[cfg(target_arch = "x86_64")]
        if isa.has_int8_products() && matches!(w, WeightRows::Q8_0(_) | WeightRows::Q4_0(_)) {
            let rows = x.chunks(k).map(|x| super::int8::QuantRows::quantize(x, k));
            return Prepared {
                rows: rows.collect(),
                ..Default::default()
            };
        }
        #[cfg(target_arch = "x86_64")]
        if isa.has_avx512_bf16() && matches!(w, WeightRows::Bf16(_)) {
            return Prepared {
                bf16: (super::gemm::to_bf16_bits(x, k, k), k),
                ..Default::default()
            };
        }
        Prepared::default()
    }

    /// The quantized rows, if the int8 products run for `w`.
    #[cfg(target_arch = "x86_64")]
    fn rows_for(&self, w: WeightRows<'_>) -> Option<&[super::int8::QuantRows]> {
        let int8 = matches!(w, WeightRows::Q8_0(_) | WeightRows::Q4_0(_));
        (int8 && !self.rows.is_empty()).then_some(self.rows.as_slice())
    }

    /// The rows rounded to bf16, if the bf16 products run for `w`.
    fn bf16_for(&self, w: WeightRows<'_>) -> Option<Vec<&[u16]>> {
        let (bits, k) = &self.bf16;
        (matches!(w, WeightRows::Bf16(_)) && !bits.is_empty()).then(|| bits.chunks(*k).collect())
    }
}

/// `y = w[rows] · x`: int8 or bf16 products where `prepared` holds `x` for them, else the
/// kernels of `isa`.
#[allow(unused_variables)]
fn row_kernel(
    isa: Isa,
    w: WeightRows<'_>,
    rows: std::ops::Range<usize>,
    x: &[f32],
    prepared: &Prepared,
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(xq) = prepared.rows_for(w) {
            super::int8::gemv_rows(isa, w, rows, xq, &mut [y]);
            return;
        }
    }
    let n = x.len();
    match w {
        WeightRows::F32(w) => isa.dense(&w[rows.start * n..rows.end * n], x, y),
        WeightRows::Bf16(w) => {
            let w = &w[rows.start * n..rows.end * n];
            match prepared.bf16_for(WeightRows::Bf16(w)) {
                // SAFETY: bf16 rows are prepared only where AVX512-BF16 was detected.
                #[cfg(target_arch = "x86_64")]
                Some(xb) => unsafe { x86::avx512::gemv_bf16_products(w, &xb, &mut [y]) },
                _ => isa.dense_bf16(w, x, y),
            }
        }
        WeightRows::F16(w) => isa.dense(&w[rows.start * n..rows.end * n], x, y),
        WeightRows::Q8_0(m) => UNGROUPED_Q8.with(|buf| {
            let (q, s) = &mut *buf.borrow_mut();
            by_group(rows, y, |g, r, y| {
                m.ungroup(g, q, s);
                isa.q8_0(
                    &q[r.start * n..r.end * n],
                    &s[r.start * n / 32..r.end * n / 32],
                    x,
                    y,
                )
            })
        }),
        WeightRows::Q4_0(m) => UNGROUPED_Q4.with(|buf| {
            let (q, s) = &mut *buf.borrow_mut();
            by_group(rows, y, |g, r, y| {
                m.ungroup(g, q, s);
                let (qr, sr) = (
                    r.start * n / 2..r.end * n / 2,
                    r.start * n / 32..r.end * n / 32,
                );
                isa.q4_0(&q[qr], &s[sr], x, y)
            })
        }),
    }
}

/// Runs `f(g, rows in g, y part)` for each 16-row group `g` that `rows` touch, `rows in g`
/// counted from the group's first row, `y part` their outputs (`y` holds one per row of `rows`).
fn by_group(
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    mut f: impl FnMut(usize, std::ops::Range<usize>, &mut [f32]),
) {
    for g in rows.start / ROW_GROUP..rows.end.div_ceil(ROW_GROUP) {
        let (r0, r1) = (
            (g * ROW_GROUP).max(rows.start),
            ((g + 1) * ROW_GROUP).min(rows.end),
        );
        let base = g * ROW_GROUP;
        f(
            g,
            r0 - base..r1 - base,
            &mut y[r0 - rows.start..r1 - rows.start],
        );
    }
}

thread_local! {
    /// Per-thread q8_0 and q4_0 rows of one group in GGML's row-major layout, for the f32
    /// products (16 rows, in L1/L2).
    static UNGROUPED_Q8: std::cell::RefCell<(Vec<i8>, Vec<f16>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    static UNGROUPED_Q4: std::cell::RefCell<(Vec<u8>, Vec<f16>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Whether `LLMARCH_KERNELS=avx512`: AVX-512F kernels without the extensions or int8 products.
fn avx512_only() -> bool {
    use std::sync::OnceLock;
    static ONLY: OnceLock<bool> = OnceLock::new();
    *ONLY.get_or_init(|| std::env::var("LLMARCH_KERNELS").is_ok_and(|v| v == "avx512"))
}

/// (AVX512-BF16, AVX512-VNNI), each with AVX512-BW, where the CPU has them and
/// `LLMARCH_KERNELS` is not `avx512`; detected once.
fn avx512_extensions() -> (bool, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static EXT: OnceLock<(bool, bool)> = OnceLock::new();
        *EXT.get_or_init(|| {
            let on = !avx512_only() && is_x86_feature_detected!("avx512bw");
            (
                on && is_x86_feature_detected!("avx512bf16"),
                on && is_x86_feature_detected!("avx512vnni"),
            )
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    (false, false)
}

/// The instruction set the kernels run with, chosen once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512F on top of everything `Avx2` needs.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Isa {
    /// Whether AVX2+FMA+F16C kernels may run (on `Avx512` too).
    pub(crate) fn has_avx2(self) -> bool {
        self != Isa::Portable
    }

    /// AVX-512F (+ AVX2, FMA, F16C) when the CPU has them, else AVX2+FMA+F16C, unless
    /// `LLMARCH_KERNELS=portable` or `generic` (or `avx2`: no AVX-512; `avx512`: AVX-512F
    /// without its extensions, see [`Isa::has_avx512_bf16`]).
    pub(crate) fn get() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::sync::OnceLock;
            static ISA: OnceLock<Isa> = OnceLock::new();
            *ISA.get_or_init(|| {
                let choice = std::env::var("LLMARCH_KERNELS").unwrap_or_default();
                let avx2 = !matches!(choice.as_str(), "portable" | "generic")
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c");
                if avx2 && choice != "avx2" && is_x86_feature_detected!("avx512f") {
                    Isa::Avx512
                } else if avx2 {
                    Isa::Avx2
                } else {
                    Isa::Portable
                }
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Portable
    }

    /// Whether AVX512-BF16 (`vdpbf16ps`) may run: `Avx512` on a CPU that has it (and AVX512-BW),
    /// unless `LLMARCH_KERNELS=avx512`.
    pub(crate) fn has_avx512_bf16(self) -> bool {
        self == Isa::Avx512 && avx512_extensions().0
    }

    /// Whether AVX512-VNNI (`vpdpbusd`) may run: as [`Isa::has_avx512_bf16`].
    pub(crate) fn has_avx512_vnni(self) -> bool {
        self == Isa::Avx512 && avx512_extensions().1
    }

    /// Whether q8_0/q4_0 weights take int8 products (`super::int8`) on activations quantized to
    /// q8: with AVX512-VNNI, or AVX2's `vpmaddubsw` on every other x86-64 CPU with AVX2, unless
    /// `LLMARCH_KERNELS=avx512` (f32 products, as the reference multiplies: what the tests
    /// compare with the oracle).
    pub(crate) fn has_int8_products(self) -> bool {
        cfg!(target_arch = "x86_64") && self.has_avx2() && !avx512_only()
    }

    fn dense<E: Widen>(self, w: &[E], x: &[f32], y: &mut [f32]) {
        debug_assert_eq!(w.len(), x.len() * y.len());
        match self {
            // SAFETY: `Isa::get` chose Avx2 only after detecting AVX2, FMA and F16C; `w` holds
            // `y.len()` rows of `x.len()` (checked by `gemv`).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::avx512::gemv_dense(w, x, y) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::gemv_dense(w, x, y) },
            Isa::Portable => dense(w, x, y),
        }
    }

    /// [`Self::dense`] for bf16 rows: with AVX-512, pairs widened by a shift and a mask
    /// ([`x86::avx512::gemv_bf16`]).
    fn dense_bf16(self, w: &[bf16], x: &[f32], y: &mut [f32]) {
        match self {
            // SAFETY: as `dense`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::avx512::gemv_bf16(w, x, y) },
            _ => self.dense(w, x, y),
        }
    }

    fn q8_0(self, q: &[i8], s: &[f16], x: &[f32], y: &mut [f32]) {
        debug_assert_eq!(q.len(), x.len() * y.len());
        debug_assert_eq!(s.len() * Q8_BLOCK, q.len());
        match self {
            // SAFETY: as above, and `s` holds one scale per 32 weights of `q`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::avx512::gemv_q8_0(q, s, x, y) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::gemv_q8_0(q, s, x, y) },
            Isa::Portable => q8_0(q, s, x, y),
        }
    }

    fn q4_0(self, q: &[u8], s: &[f16], x: &[f32], y: &mut [f32]) {
        debug_assert_eq!(q.len() * 2, x.len() * y.len());
        debug_assert_eq!(s.len() * Q8_BLOCK, q.len() * 2);
        match self {
            // SAFETY: as above, and `s` holds one scale per 32 weights (16 bytes) of `q`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::avx512::gemv_q4_0(q, s, x, y) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::gemv_q4_0(q, s, x, y) },
            Isa::Portable => q4_0(q, s, x, y),
        }
    }
}

/// A weight element that widens to f32 exactly.
pub trait Widen: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;
    #[cfg(target_arch = "x86_64")]
    /// Eight elements at `p` widened into a vector.
    ///
    /// # Safety
    /// `p..p + 8` is readable and the caller runs with AVX2 and F16C.
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    #[cfg(target_arch = "x86_64")]
    /// Sixteen elements at `p` widened into a vector.
    ///
    /// # Safety
    /// `p..p + 16` is readable and the caller runs with AVX-512F.
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

impl Widen for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        widen_f16(self.to_bits())
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// IEEE half → single, branch-free so it vectorises: move exponent and mantissa into place and
/// rebias by multiplying by 2¹¹² (which also normalises subnormals exactly); inf/NaN keep an
/// all-ones exponent.
#[inline(always)]
pub(crate) fn widen_f16(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    let scaled = f32::from_bits(em << 13) * f32::from_bits(0x7780_0000); // × 2^112
    let mag = if em >= 0x7c00 {
        (em << 13) | 0x7f80_0000
    } else {
        scaled.to_bits()
    };
    f32::from_bits(mag | sign)
}

/// Pairwise sum of the lanes.
#[inline(always)]
fn hsum(mut a: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for j in 0..w {
            a[j] += a[j + w];
        }
        w /= 2;
    }
    a[0]
}

/// Portable: `y[r] = w[r] · x` for the rows of `w` (`y.len()` rows of `x.len()`), one row
/// at a time.
fn dense<E: Widen>(w: &[E], x: &[f32], y: &mut [f32]) {
    let n = x.len();
    let n16 = n / LANES * LANES;
    for (y, r) in y.iter_mut().zip(w.chunks_exact(n)) {
        let mut acc = [0f32; LANES];
        for (ws, xs) in r[..n16]
            .chunks_exact(LANES)
            .zip(x[..n16].chunks_exact(LANES))
        {
            for j in 0..LANES {
                acc[j] += ws[j].widen() * xs[j];
            }
        }
        let tail = r[n16..].iter().zip(&x[n16..]);
        *y = tail.fold(hsum(acc), |s, (w, x)| s + w.widen() * x);
    }
}

/// Portable q8_0 rows (`q` `[rows, n]`, `s` `[rows, n / 32]`) against `x`: `Σ_b d_b · Σ_j q·x`.
fn q8_0(q: &[i8], s: &[f16], x: &[f32], y: &mut [f32]) {
    let n = x.len();
    let nb = n / Q8_BLOCK;
    for ((y, qr), sr) in y.iter_mut().zip(q.chunks_exact(n)).zip(s.chunks_exact(nb)) {
        let mut acc = [0f32; LANES];
        for ((qb, xb), d) in qr
            .chunks_exact(Q8_BLOCK)
            .zip(x.chunks_exact(Q8_BLOCK))
            .zip(sr)
        {
            let d = widen_f16(d.to_bits());
            let mut t = [0f32; LANES];
            for h in 0..Q8_BLOCK / LANES {
                for j in 0..LANES {
                    t[j] += qb[h * LANES + j] as f32 * xb[h * LANES + j];
                }
            }
            for j in 0..LANES {
                acc[j] += d * t[j];
            }
        }
        *y = hsum(acc);
    }
}

/// Portable q4_0 rows (`q` `[rows, n / 2]`, `s` `[rows, n / 32]`) against `x`:
/// `Σ_b d_b · Σ_j (q_j − 8)·x_j`.
fn q4_0(q: &[u8], s: &[f16], x: &[f32], y: &mut [f32]) {
    let n = x.len();
    let nb = n / Q8_BLOCK;
    const H: usize = Q8_BLOCK / 2; // = LANES
    for ((y, qr), sr) in y
        .iter_mut()
        .zip(q.chunks_exact(n / 2))
        .zip(s.chunks_exact(nb))
    {
        let mut acc = [0f32; H];
        for ((qb, xb), d) in qr.chunks_exact(H).zip(x.chunks_exact(Q8_BLOCK)).zip(sr) {
            let d = widen_f16(d.to_bits());
            for j in 0..H {
                let lo = (qb[j] & 0x0f) as i32 - 8;
                let hi = (qb[j] >> 4) as i32 - 8;
                acc[j] += d * (lo as f32 * xb[j] + hi as f32 * xb[j + H]);
            }
        }
        *y = hsum(acc);
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! AVX2+FMA+F16C versions. Every function here requires those features (the callers check
    //! with `Isa::get`) and trusts the slice sizes its caller checked.
    use super::{Widen, Q8_BLOCK};
    use half::f16;
    use std::arch::x86_64::*;

    /// Sum of the 8 lanes.
    #[inline(always)]
    pub(crate) unsafe fn hsum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// `y[r] = w[r] · x`, one row at a time so the weights stream strictly sequentially (the
    /// prefetcher handles one long stream far better than several short interleaved ones: 2.5×
    /// for bf16 rows of 2 KB); four accumulators over 32 columns per step.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemv_dense<E: Widen>(w: &[E], x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let (n32, n8) = (n / 32 * 32, n / 8 * 8);
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        for (r, y) in y.iter_mut().enumerate() {
            let p = wp.add(r * n);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c < n32 {
                for (i, acc) in acc.iter_mut().enumerate() {
                    let o = c + 8 * i;
                    *acc = _mm256_fmadd_ps(E::load8(p.add(o)), _mm256_loadu_ps(xp.add(o)), *acc);
                }
                c += 32;
            }
            while c < n8 {
                acc[0] = _mm256_fmadd_ps(E::load8(p.add(c)), _mm256_loadu_ps(xp.add(c)), acc[0]);
                c += 8;
            }
            let acc = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut s = hsum8(acc);
            for j in n8..n {
                s = (*p.add(j)).widen().mul_add(*xp.add(j), s);
            }
            *y = s;
        }
    }

    /// Eight int8 at `p` as f32.
    #[inline(always)]
    unsafe fn q8x8(p: *const i8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }

    /// One f16 scale as f32.
    #[inline(always)]
    unsafe fn scale(s: f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(s.to_bits() as i32)))
    }

    /// q8_0 rows, one at a time (sequential stream, as above): per block, `t = Σ q·x` in two
    /// 8-lane halves, then `acc += d · t`; two blocks in flight.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemv_q8_0(q: &[i8], s: &[f16], x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let nb = n / Q8_BLOCK;
        let (qp, sp, xp) = (q.as_ptr(), s.as_ptr(), x.as_ptr());
        for (r, y) in y.iter_mut().enumerate() {
            let (qr, sr) = (qp.add(r * n), sp.add(r * nb));
            let block = |b: usize, acc: __m256| {
                let o = b * Q8_BLOCK;
                let (qb, xb) = (qr.add(o), xp.add(o));
                let t0 = _mm256_mul_ps(q8x8(qb), _mm256_loadu_ps(xb));
                let t1 = _mm256_mul_ps(q8x8(qb.add(8)), _mm256_loadu_ps(xb.add(8)));
                let t0 = _mm256_fmadd_ps(q8x8(qb.add(16)), _mm256_loadu_ps(xb.add(16)), t0);
                let t1 = _mm256_fmadd_ps(q8x8(qb.add(24)), _mm256_loadu_ps(xb.add(24)), t1);
                let d = _mm256_set1_ps(scale(*sr.add(b)));
                _mm256_fmadd_ps(d, _mm256_add_ps(t0, t1), acc)
            };
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut b = 0;
            while b + 2 <= nb {
                a0 = block(b, a0);
                a1 = block(b + 1, a1);
                b += 2;
            }
            if b < nb {
                a0 = block(b, a0);
            }
            *y = hsum8(_mm256_add_ps(a0, a1));
        }
    }

    /// q4_0 rows, one at a time: per block the 16 bytes split into low and high nibbles (codes
    /// 0-15 and 16-31), less 8, widened to f32 in four groups of 8; `acc += d · Σ (q − 8)·x`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemv_q4_0(q: &[u8], s: &[f16], x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let nb = n / Q8_BLOCK;
        let (qp, sp, xp) = (q.as_ptr(), s.as_ptr(), x.as_ptr());
        let (low, eight) = (_mm_set1_epi8(0x0f), _mm_set1_epi8(8));
        let i8x8 = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        for (r, y) in y.iter_mut().enumerate() {
            let (qr, sr) = (qp.add(r * n / 2), sp.add(r * nb));
            let block = |b: usize, acc: __m256| {
                let bytes = _mm_loadu_si128(qr.add(b * Q8_BLOCK / 2) as *const __m128i);
                let lo = _mm_sub_epi8(_mm_and_si128(bytes, low), eight); // codes 0-15
                let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), eight);
                let xb = xp.add(b * Q8_BLOCK);
                let t0 = _mm256_mul_ps(i8x8(lo), _mm256_loadu_ps(xb));
                let t1 = _mm256_mul_ps(i8x8(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xb.add(8)));
                let t0 = _mm256_fmadd_ps(i8x8(hi), _mm256_loadu_ps(xb.add(16)), t0);
                let t1 =
                    _mm256_fmadd_ps(i8x8(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xb.add(24)), t1);
                let d = _mm256_set1_ps(scale(*sr.add(b)));
                _mm256_fmadd_ps(d, _mm256_add_ps(t0, t1), acc)
            };
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut b = 0;
            while b + 2 <= nb {
                a0 = block(b, a0);
                a1 = block(b + 1, a1);
                b += 2;
            }
            if b < nb {
                a0 = block(b, a0);
            }
            *y = hsum8(_mm256_add_ps(a0, a1));
        }
    }

    /// AVX-512F versions of the row kernels above: 16 lanes, so half the widening and FMA
    /// instructions per weight. Every function requires AVX-512F besides AVX2+FMA+F16C.
    pub(crate) mod avx512 {
        use super::super::{Widen, Q8_BLOCK};
        use super::scale;
        use half::{bf16, f16};
        use std::arch::x86_64::*;

        std::thread_local! {
            /// `x` split into its even and odd elements, for [`gemv_bf16`].
            static SPLIT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }

        /// bf16 rows without a widening shuffle: 32 weights load as 16 32-bit lanes of two
        /// bf16 each, the even element (low half) widened by a shift, the odd one (high half)
        /// by a mask, each multiplied by `x`'s even or odd elements (split once per call). The
        /// products are those of [`gemv_dense`] (f32 activations); only the order of the sums
        /// differs. Two cheap single-cycle ops per 16 weights instead of a cross-lane widening,
        /// which made the bf16 gemv compute-bound below memory speed (16.8 GB/s per core from
        /// L3, where q8_0 ran at 28).
        #[target_feature(enable = "avx512f,avx2,fma")]
        pub(crate) unsafe fn gemv_bf16(w: &[bf16], x: &[f32], y: &mut [f32]) {
            let n = x.len();
            let n64 = n / 64 * 64;
            SPLIT.with(|split| {
                let mut split = split.borrow_mut();
                split.clear();
                split.extend(x[..n64].iter().step_by(2));
                split.extend(x[..n64].iter().skip(1).step_by(2));
                let (xe, xo) = split.split_at(n64 / 2);
                let hi = _mm512_set1_epi32(0xffff_0000u32 as i32);
                let wp = w.as_ptr();
                for (r, y) in y.iter_mut().enumerate() {
                    let p = wp.add(r * n);
                    let mut acc = [_mm512_setzero_ps(); 4];
                    let mut c = 0;
                    while c < n64 {
                        let ahead = (p.add(c) as *const i8).add(PREFETCH_BYTES);
                        _mm_prefetch::<_MM_HINT_T0>(ahead);
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(64));
                        for h in 0..2 {
                            let v = _mm512_loadu_si512(p.add(c + 32 * h) as *const _);
                            let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                            let odd = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
                            let o = c / 2 + 16 * h;
                            acc[2 * h] = _mm512_fmadd_ps(
                                even,
                                _mm512_loadu_ps(xe.as_ptr().add(o)),
                                acc[2 * h],
                            );
                            acc[2 * h + 1] = _mm512_fmadd_ps(
                                odd,
                                _mm512_loadu_ps(xo.as_ptr().add(o)),
                                acc[2 * h + 1],
                            );
                        }
                        c += 64;
                    }
                    let acc =
                        _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
                    let mut s = _mm512_reduce_add_ps(acc);
                    for (j, &xj) in x.iter().enumerate().skip(n64) {
                        s = (*p.add(j)).widen().mul_add(xj, s);
                    }
                    *y = s;
                }
            })
        }

        /// [`gemv_bf16`] for up to four activation rows `xs` at once (`ys[j]` gets `w · xs[j]`):
        /// each weight vector is loaded and widened once for all of them, and every row's sums
        /// run in [`gemv_bf16`]'s order, so each row gets its one-row bits.
        #[target_feature(enable = "avx512f,avx2,fma")]
        pub(crate) unsafe fn gemv_bf16_rows(w: &[bf16], xs: &[&[f32]], ys: &mut [&mut [f32]]) {
            match xs.len() {
                1 => bf16_tile::<1>(w, xs, ys),
                2 => bf16_tile::<2>(w, xs, ys),
                3 => bf16_tile::<3>(w, xs, ys),
                _ => bf16_tile::<4>(w, xs, ys),
            }
        }

        /// [`gemv_bf16_rows`] for `R` rows (`xs.len() == R`).
        #[inline(always)]
        #[allow(clippy::needless_range_loop)] // register tiles: `acc[j]` by row
        unsafe fn bf16_tile<const R: usize>(w: &[bf16], xs: &[&[f32]], ys: &mut [&mut [f32]]) {
            let n = xs[0].len();
            let n64 = n / 64 * 64;
            // Each row split into its even and odd elements, as `gemv_bf16` splits it.
            let split: Vec<Vec<f32>> = xs
                .iter()
                .map(|x| {
                    let mut s = Vec::with_capacity(n64);
                    s.extend(x[..n64].iter().step_by(2));
                    s.extend(x[..n64].iter().skip(1).step_by(2));
                    s
                })
                .collect();
            let xe: [*const f32; R] = std::array::from_fn(|j| split[j].as_ptr());
            let xo: [*const f32; R] = std::array::from_fn(|j| split[j].as_ptr().add(n64 / 2));
            let hi = _mm512_set1_epi32(0xffff_0000u32 as i32);
            let wp = w.as_ptr();
            for r in 0..ys[0].len() {
                let p = wp.add(r * n);
                let mut acc = [[_mm512_setzero_ps(); 4]; R];
                let mut c = 0;
                while c < n64 {
                    let ahead = (p.add(c) as *const i8).add(PREFETCH_BYTES);
                    _mm_prefetch::<_MM_HINT_T0>(ahead);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.add(64));
                    for h in 0..2 {
                        let v = _mm512_loadu_si512(p.add(c + 32 * h) as *const _);
                        let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                        let odd = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
                        let o = c / 2 + 16 * h;
                        for j in 0..R {
                            let a = &mut acc[j];
                            a[2 * h] =
                                _mm512_fmadd_ps(even, _mm512_loadu_ps(xe[j].add(o)), a[2 * h]);
                            a[2 * h + 1] =
                                _mm512_fmadd_ps(odd, _mm512_loadu_ps(xo[j].add(o)), a[2 * h + 1]);
                        }
                    }
                    c += 64;
                }
                for j in 0..R {
                    let a = &acc[j];
                    let a = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
                    let mut s = _mm512_reduce_add_ps(a);
                    for (t, &xt) in xs[j].iter().enumerate().skip(n64) {
                        s = (*p.add(t)).widen().mul_add(xt, s);
                    }
                    ys[j][r] = s;
                }
            }
        }

        /// bf16 rows against activation rows rounded to bf16 (`xs[j]`, bits): `vdpbf16ps` adds
        /// the products of 32 bf16 pairs per instruction into 16 f32 lanes, half the
        /// arithmetic of widening to f32, as llama.cpp's bf16 dot products run on these CPUs
        /// (and as the GEMM runs a prompt chunk). Up to four rows per pass over each weight
        /// row, every row summed in the same order, so each row gets its one-row bits.
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
        pub(crate) unsafe fn gemv_bf16_products(w: &[bf16], xs: &[&[u16]], ys: &mut [&mut [f32]]) {
            match xs.len() {
                1 => products_tile::<1>(w, xs, ys),
                2 => products_tile::<2>(w, xs, ys),
                3 => products_tile::<3>(w, xs, ys),
                _ => products_tile::<4>(w, xs, ys),
            }
        }

        /// [`gemv_bf16_products`] for `R` rows (`xs.len() == R`).
        #[inline(always)]
        #[allow(clippy::needless_range_loop)] // register tiles: `acc[j][i]` by row and lane group
        unsafe fn products_tile<const R: usize>(w: &[bf16], xs: &[&[u16]], ys: &mut [&mut [f32]]) {
            let bh = |v| std::mem::transmute::<__m512i, __m512bh>(v);
            let n = xs[0].len();
            let (n128, n32) = (n / 128 * 128, n / 32 * 32);
            let wp = w.as_ptr().cast::<u16>();
            let xp: [*const u16; R] = std::array::from_fn(|j| xs[j].as_ptr());
            for r in 0..ys[0].len() {
                let p = wp.add(r * n);
                let mut acc = [[_mm512_setzero_ps(); 4]; R];
                let mut c = 0;
                while c < n128 {
                    let ahead = (p.add(c) as *const i8).add(PREFETCH_BYTES);
                    for line in 0..4 {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(64 * line));
                    }
                    for i in 0..4 {
                        let o = c + 32 * i;
                        let wv = bh(_mm512_loadu_si512(p.add(o).cast()));
                        for j in 0..R {
                            let xv = bh(_mm512_loadu_si512(xp[j].add(o).cast()));
                            acc[j][i] = _mm512_dpbf16_ps(acc[j][i], wv, xv);
                        }
                    }
                    c += 128;
                }
                while c < n32 {
                    let wv = bh(_mm512_loadu_si512(p.add(c).cast()));
                    for j in 0..R {
                        let xv = bh(_mm512_loadu_si512(xp[j].add(c).cast()));
                        acc[j][0] = _mm512_dpbf16_ps(acc[j][0], wv, xv);
                    }
                    c += 32;
                }
                for j in 0..R {
                    let a = &acc[j];
                    let a = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
                    let mut s = _mm512_reduce_add_ps(a);
                    for t in n32..n {
                        let (wt, xt) = (u32::from(*p.add(t)) << 16, u32::from(*xp[j].add(t)) << 16);
                        s = f32::from_bits(wt).mul_add(f32::from_bits(xt), s);
                    }
                    ys[j][r] = s;
                }
            }
        }

        /// How far ahead of the loads the weight stream is prefetched: two 4 KB pages, so a
        /// page's translation is fetched well before its data is needed (measured: 2 KB gave
        /// +5 % decode on the real-size E2B in bf16; 8 KB +5-8 % more than 2 KB on the bench
        /// model in bf16 and f32, 4 and 16 KB in between).
        const PREFETCH_BYTES: usize = 8192;

        /// `y[r] = w[r] · x`, one row at a time; four accumulators over 64 columns per step.
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        pub(in super::super) unsafe fn gemv_dense<E: Widen>(w: &[E], x: &[f32], y: &mut [f32]) {
            let n = x.len();
            let (n64, n16) = (n / 64 * 64, n / 16 * 16);
            let (wp, xp) = (w.as_ptr(), x.as_ptr());
            for (r, y) in y.iter_mut().enumerate() {
                let p = wp.add(r * n);
                let mut acc = [_mm512_setzero_ps(); 4];
                let mut c = 0;
                let size = std::mem::size_of::<E>();
                while c < n64 {
                    // Prefetch PREFETCH_BYTES ahead in the weight stream, which runs across 4 KB
                    // pages that the hardware prefetcher does not cross.
                    let ahead = (p.add(c) as *const i8).add(PREFETCH_BYTES);
                    for line in (0..64 * size).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(line));
                    }
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let o = c + 16 * i;
                        *acc =
                            _mm512_fmadd_ps(E::load16(p.add(o)), _mm512_loadu_ps(xp.add(o)), *acc);
                    }
                    c += 64;
                }
                while c < n16 {
                    acc[0] =
                        _mm512_fmadd_ps(E::load16(p.add(c)), _mm512_loadu_ps(xp.add(c)), acc[0]);
                    c += 16;
                }
                let acc =
                    _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
                let mut s = _mm512_reduce_add_ps(acc);
                for j in n16..n {
                    s = (*p.add(j)).widen().mul_add(*xp.add(j), s);
                }
                *y = s;
            }
        }

        /// [`gemv_dense`] for up to four activation rows `xs` at once (`ys[j]` gets `w · xs[j]`):
        /// each weight vector is loaded once for all of them, and every row's sums run in
        /// [`gemv_dense`]'s order, so each row gets its one-row bits.
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        pub(in super::super) unsafe fn gemv_dense_rows<E: Widen>(
            w: &[E],
            xs: &[&[f32]],
            ys: &mut [&mut [f32]],
        ) {
            match xs.len() {
                1 => dense_tile::<E, 1>(w, xs, ys),
                2 => dense_tile::<E, 2>(w, xs, ys),
                3 => dense_tile::<E, 3>(w, xs, ys),
                _ => dense_tile::<E, 4>(w, xs, ys),
            }
        }

        /// [`gemv_dense_rows`] for `R` rows (`xs.len() == R`).
        #[inline(always)]
        #[allow(clippy::needless_range_loop)] // register tiles: `acc[j][i]` by row and lane group
        unsafe fn dense_tile<E: Widen, const R: usize>(
            w: &[E],
            xs: &[&[f32]],
            ys: &mut [&mut [f32]],
        ) {
            let n = xs[0].len();
            let (n64, n16) = (n / 64 * 64, n / 16 * 16);
            let wp = w.as_ptr();
            let xp: [*const f32; R] = std::array::from_fn(|j| xs[j].as_ptr());
            let size = std::mem::size_of::<E>();
            for r in 0..ys[0].len() {
                let p = wp.add(r * n);
                let mut acc = [[_mm512_setzero_ps(); 4]; R];
                let mut c = 0;
                while c < n64 {
                    let ahead = (p.add(c) as *const i8).add(PREFETCH_BYTES);
                    for line in (0..64 * size).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(line));
                    }
                    for i in 0..4 {
                        let o = c + 16 * i;
                        let wv = E::load16(p.add(o));
                        for j in 0..R {
                            acc[j][i] =
                                _mm512_fmadd_ps(wv, _mm512_loadu_ps(xp[j].add(o)), acc[j][i]);
                        }
                    }
                    c += 64;
                }
                while c < n16 {
                    let wv = E::load16(p.add(c));
                    for j in 0..R {
                        acc[j][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xp[j].add(c)), acc[j][0]);
                    }
                    c += 16;
                }
                for j in 0..R {
                    let a = &acc[j];
                    let a = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
                    let mut s = _mm512_reduce_add_ps(a);
                    for t in n16..n {
                        s = (*p.add(t)).widen().mul_add(*xp[j].add(t), s);
                    }
                    ys[j][r] = s;
                }
            }
        }

        /// Sixteen int8 (in an xmm) as f32.
        #[inline(always)]
        unsafe fn i8x16(v: __m128i) -> __m512 {
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))
        }

        /// Sums `block(b, acc)` over the `nb` blocks of a row, two blocks in flight.
        #[inline(always)]
        unsafe fn row_blocks(nb: usize, block: impl Fn(usize, __m512) -> __m512) -> f32 {
            let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut b = 0;
            while b + 2 <= nb {
                a0 = block(b, a0);
                a1 = block(b + 1, a1);
                b += 2;
            }
            if b < nb {
                a0 = block(b, a0);
            }
            _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
        }

        /// q8_0 rows, one at a time: per block `acc += d · Σ q·x` in two 16-lane halves.
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        pub(in super::super) unsafe fn gemv_q8_0(q: &[i8], s: &[f16], x: &[f32], y: &mut [f32]) {
            let n = x.len();
            let nb = n / Q8_BLOCK;
            let (qp, sp, xp) = (q.as_ptr(), s.as_ptr(), x.as_ptr());
            for (r, y) in y.iter_mut().enumerate() {
                let (qr, sr) = (qp.add(r * n), sp.add(r * nb));
                *y = row_blocks(nb, |b, acc| {
                    let o = b * Q8_BLOCK;
                    let (qb, xb) = (qr.add(o), xp.add(o));
                    let lo = i8x16(_mm_loadu_si128(qb as *const __m128i));
                    let hi = i8x16(_mm_loadu_si128(qb.add(16) as *const __m128i));
                    let t = _mm512_mul_ps(lo, _mm512_loadu_ps(xb));
                    let t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb.add(16)), t);
                    _mm512_fmadd_ps(_mm512_set1_ps(scale(*sr.add(b))), t, acc)
                });
            }
        }

        /// q4_0 rows, one at a time: per block the low nibbles are codes 0-15 and the high ones
        /// 16-31; `acc += d · Σ (q − 8)·x` in two 16-lane halves.
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        pub(in super::super) unsafe fn gemv_q4_0(q: &[u8], s: &[f16], x: &[f32], y: &mut [f32]) {
            let n = x.len();
            let nb = n / Q8_BLOCK;
            let (qp, sp, xp) = (q.as_ptr(), s.as_ptr(), x.as_ptr());
            let (low, eight) = (_mm_set1_epi8(0x0f), _mm_set1_epi8(8));
            for (r, y) in y.iter_mut().enumerate() {
                let (qr, sr) = (qp.add(r * n / 2), sp.add(r * nb));
                *y = row_blocks(nb, |b, acc| {
                    let bytes = _mm_loadu_si128(qr.add(b * Q8_BLOCK / 2) as *const __m128i);
                    let lo = _mm_sub_epi8(_mm_and_si128(bytes, low), eight);
                    let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16::<4>(bytes), low), eight);
                    let xb = xp.add(b * Q8_BLOCK);
                    let t = _mm512_mul_ps(i8x16(lo), _mm512_loadu_ps(xb));
                    let t = _mm512_fmadd_ps(i8x16(hi), _mm512_loadu_ps(xb.add(16)), t);
                    _mm512_fmadd_ps(_mm512_set1_ps(scale(*sr.add(b))), t, acc)
                });
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    pub(crate) fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// `n` values of N(0, std²), reproducibly (Box-Muller).
    pub(crate) fn normal(n: usize, std: f32, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let (u, v): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
                std * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect()
    }

    /// `‖a − b‖ / ‖b‖`.
    pub(crate) fn rel_rms(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        let (mut e, mut n) = (0f64, 0f64);
        for (&a, &b) in a.iter().zip(b) {
            e += (a as f64 - b as f64).powi(2);
            n += (b as f64).powi(2);
        }
        (e / n.max(1e-300)).sqrt()
    }

    /// `Σ w·x` in f64 per row of `w`, and the scale `Σ|w·x|` errors are measured against.
    pub(crate) fn reference(w: &[f32], x: &[f32]) -> Vec<(f64, f64)> {
        w.chunks_exact(x.len())
            .map(|r| {
                r.iter().zip(x).fold((0f64, 0f64), |(s, a), (&w, &x)| {
                    let p = w as f64 * x as f64;
                    (s + p, a + p.abs())
                })
            })
            .collect()
    }

    pub(crate) fn check(y: &[f32], want: &[(f64, f64)], tol: f64, what: &str) {
        assert_eq!(y.len(), want.len(), "{what}");
        for (i, (&y, &(w, scale))) in y.iter().zip(want).enumerate() {
            let err = (y as f64 - w).abs() / scale.max(1e-30);
            assert!(
                err <= tol,
                "{what}: element {i}: {y} vs {w} (error {err:e} of Σ|w·x|)"
            );
        }
    }

    const SHAPES: &[(usize, usize)] = &[
        (1, 1),
        (3, 5),
        (4, 16),
        (7, 33),
        (13, 100),
        (37, 1023),
        (260, 64),
        (5, 4099),
        (3000, 24),
    ];

    /// Every ISA this machine can run.
    pub(crate) fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if Isa::get().has_avx2() {
                v.push(Isa::Avx2);
            }
            if Isa::get() == Isa::Avx512 {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    /// The activations a q8_0/q4_0 gemv on `isa` multiplies: `x`, or with int8 products
    /// (AVX512-VNNI) `x` rounded to q8 per block.
    pub(crate) fn activations_as_multiplied(isa: Isa, x: &[f32]) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if isa.has_int8_products() {
            let q = crate::kernels::int8::QuantRows::quantize(x, x.len());
            return q
                .q
                .iter()
                .enumerate()
                .map(|(i, &c)| c as f32 * q.d[i / Q8_BLOCK])
                .collect();
        }
        let _ = isa;
        x.to_vec()
    }

    /// `gemv` on one ISA (the parallel driver for the detected one, the row kernel otherwise).
    fn gemv_on(isa: Isa, w: WeightRows<'_>, x: &[f32], y: &mut [f32]) {
        if isa == Isa::get() {
            return gemv(w, x, y).unwrap();
        }
        match w {
            WeightRows::F32(w) => isa.dense(w, x, y),
            WeightRows::Bf16(w) => isa.dense(w, x, y),
            WeightRows::F16(w) => isa.dense(w, x, y),
            WeightRows::Q8_0(_) | WeightRows::Q4_0(_) => {
                let int8 = Prepared::new_rows(isa, w, x, 1);
                row_kernel(isa, w, 0..y.len(), x, &int8, y)
            }
        }
    }

    #[test]
    fn dense_gemv_matches_an_f64_reference_on_odd_shapes() {
        for isa in isas() {
            for (k, &(out, n)) in SHAPES.iter().enumerate() {
                let w = random(out * n, k as u64);
                let x = random(n, 100 + k as u64);
                let mut y = vec![f32::NAN; out];
                gemv_on(isa, WeightRows::F32(&w), &x, &mut y);
                check(
                    &y,
                    &reference(&w, &x),
                    1e-6,
                    &format!("{isa:?} f32 [{out}, {n}]"),
                );

                // bf16/f16 widen exactly, so compare with the widened weights; where the bf16
                // products run, with the activations rounded to bf16 as they are.
                let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                let wbf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
                let xb: Vec<f32> = if isa == Isa::get() && isa.has_avx512_bf16() {
                    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
                } else {
                    x.clone()
                };
                y.fill(f32::NAN);
                gemv_on(isa, WeightRows::Bf16(&wb), &x, &mut y);
                check(
                    &y,
                    &reference(&wbf, &xb),
                    1e-6,
                    &format!("{isa:?} bf16 [{out}, {n}]"),
                );

                let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                let whf: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
                y.fill(f32::NAN);
                gemv_on(isa, WeightRows::F16(&wh), &x, &mut y);
                check(
                    &y,
                    &reference(&whf, &x),
                    1e-6,
                    &format!("{isa:?} f16 [{out}, {n}]"),
                );
            }
        }
    }

    #[test]
    fn f16_widening_is_exact_for_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            let (a, b) = (widen_f16(bits), f16::from_bits(bits).to_f32());
            if b.is_nan() {
                assert!(a.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(a.to_bits(), b.to_bits(), "{bits:#06x}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn q8_0_quantizes_like_ggml_and_its_gemv_is_the_dequantized_product() {
        for (out, n) in [(37, 96), (4, 32), (3001, 64), (5, 320)] {
            let mut w = random(out * n, 7);
            w[..32].fill(0.0); // an all-zero block: scale 0, no division by zero
            w[40] = 3.0; // one large weight sets its block's scale
            let m = Q8_0Matrix::quantize(&w, out, n).unwrap();
            assert_eq!(m.bytes(), out.next_multiple_of(ROW_GROUP) * n / 32 * 34);
            let deq = m.dequantize();
            for (b, (wb, db)) in w.chunks(32).zip(deq.chunks(32)).enumerate() {
                let amax = wb.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = m.block(b / (n / 32), b % (n / 32)).1.to_f32();
                if amax == 0.0 {
                    assert!(d == 0.0 && db.iter().all(|&v| v == 0.0), "block {b}");
                    continue;
                }
                assert!(
                    (d - amax / 127.0).abs() <= 1e-3 * amax / 127.0,
                    "block {b}: scale {d}"
                );
                for (&a, &v) in wb.iter().zip(db) {
                    // half a step, plus the f16 rounding of the scale over up to 127 steps
                    assert!(
                        (a - v).abs() <= 0.5 * d + 127.0 * 1e-3 * d,
                        "block {b}: {a} vs {v}"
                    );
                    let q = (v / d).round();
                    assert!(
                        q.abs() <= 127.0 && v == d * q,
                        "block {b}: {v} is not a step of {d}"
                    );
                }
            }
            let x = random(n, 8);
            for isa in isas() {
                let want = reference(&deq, &activations_as_multiplied(isa, &x));
                let mut y = vec![f32::NAN; out];
                gemv_on(isa, WeightRows::Q8_0(&m), &x, &mut y);
                check(&y, &want, 1e-6, &format!("{isa:?} q8_0 [{out}, {n}]"));
            }
        }
        assert!(Q8_0Matrix::quantize(&[0.0; 66], 2, 33).is_err());
        assert!(Q8_0Matrix::quantize(&[0.0; 64], 3, 32).is_err());
    }

    /// Against the f32 weights it was made from (not its own dequantized copy): q8_0 of N(0, σ²)
    /// weights costs ~0.5 % relative RMS per product; a misplaced scale, block or row costs tens
    /// of percent. Every ISA, row counts that cut into several parallel tasks unevenly.
    #[test]
    fn q8_0_gemv_on_every_isa_stays_within_quantization_error_of_f32() {
        for (s, &(out, n)) in [(61, 32), (129, 96), (257, 1536), (9, 6144), (3001, 64)]
            .iter()
            .enumerate()
        {
            let w = normal(out * n, 0.02, s as u64);
            let m = Q8_0Matrix::quantize(&w, out, n).unwrap();
            let x = normal(n, 1.0, 50 + s as u64);
            let want: Vec<f32> = reference(&w, &x).iter().map(|r| r.0 as f32).collect();
            for isa in isas() {
                let mut y = vec![f32::NAN; out];
                gemv_on(isa, WeightRows::Q8_0(&m), &x, &mut y);
                let e = rel_rms(&y, &want);
                assert!(
                    e < 0.01,
                    "{isa:?} q8_0 [{out}, {n}]: {:.2} % off the f32 product",
                    100.0 * e
                );
            }
        }
    }

    /// GGML's `quantize_row_q4_0_ref`, written out for one block: (scale, 32 codes 0-15).
    fn ggml_q4_0_block(w: &[f32]) -> (f32, Vec<u8>) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in w {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = w
            .iter()
            .map(|&v| 15i8.min((v * id + 8.5) as i8) as u8)
            .collect();
        (d, q)
    }

    #[test]
    fn q4_0_quantizes_like_ggml_and_its_gemv_is_the_dequantized_product() {
        for (out, n) in [(37, 96), (4, 32), (3001, 64), (5, 320)] {
            let mut w = random(out * n, 9);
            w[..32].fill(0.0); // an all-zero block: scale 0, no division by zero
            w[40] = -3.0; // one large weight sets its block's scale (negative: d > 0)
            w[70] = 2.5; // and a positive one (d < 0)
            let m = Q4_0Matrix::quantize(&w, out, n).unwrap();
            assert_eq!(m.bytes(), out.next_multiple_of(ROW_GROUP) * n / 32 * 18);
            let deq = m.dequantize();
            for (b, (wb, db)) in w.chunks(32).zip(deq.chunks(32)).enumerate() {
                let (d, codes) = ggml_q4_0_block(wb);
                let (bytes, scale) = m.block(b / (n / 32), b % (n / 32));
                assert_eq!(scale, f16::from_f32(d), "block {b}: scale");
                for j in 0..16 {
                    assert_eq!(bytes[j] & 0x0f, codes[j], "block {b}, code {j}");
                    assert_eq!(bytes[j] >> 4, codes[j + 16], "block {b}, code {}", j + 16);
                }
                let d = scale.to_f32();
                for (j, &v) in db.iter().enumerate() {
                    assert_eq!(v, d * (codes[j] as f32 - 8.0), "block {b}, value {j}");
                }
            }
            let x = random(n, 10);
            for isa in isas() {
                let want = reference(&deq, &activations_as_multiplied(isa, &x));
                let mut y = vec![f32::NAN; out];
                gemv_on(isa, WeightRows::Q4_0(&m), &x, &mut y);
                check(&y, &want, 1e-6, &format!("{isa:?} q4_0 [{out}, {n}]"));
            }
        }
        assert!(Q4_0Matrix::quantize(&[0.0; 66], 2, 33).is_err());
        assert!(Q4_0Matrix::quantize(&[0.0; 64], 3, 32).is_err());
    }

    /// Against the f32 weights it was made from: q4_0 of N(0, σ²) weights costs ~7-9 % relative
    /// RMS per product (a step of max/8 per block); a misplaced nibble, scale or block costs far
    /// more. Quantizing bf16 weights gives the blocks of the same weights widened to f32.
    #[test]
    fn q4_0_gemv_on_every_isa_stays_within_quantization_error_of_f32() {
        for (s, &(out, n)) in [(61, 32), (129, 96), (257, 1536), (9, 6144), (3001, 64)]
            .iter()
            .enumerate()
        {
            let w = normal(out * n, 0.02, s as u64);
            let m = Q4_0Matrix::quantize(&w, out, n).unwrap();
            let x = normal(n, 1.0, 60 + s as u64);
            let want: Vec<f32> = reference(&w, &x).iter().map(|r| r.0 as f32).collect();
            for isa in isas() {
                let mut y = vec![f32::NAN; out];
                gemv_on(isa, WeightRows::Q4_0(&m), &x, &mut y);
                let e = rel_rms(&y, &want);
                assert!(
                    e < 0.12,
                    "{isa:?} q4_0 [{out}, {n}]: {:.2} % off the f32 product",
                    100.0 * e
                );
            }
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wbf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let (a, b) = (
                Q4_0Matrix::quantize(&wb, out, n).unwrap(),
                Q4_0Matrix::quantize(&wbf, out, n).unwrap(),
            );
            assert_eq!((&a.qs[..], &a.scales[..]), (&b.qs[..], &b.scales[..]));
            let (a, b) = (
                Q8_0Matrix::quantize(&wb, out, n).unwrap(),
                Q8_0Matrix::quantize(&wbf, out, n).unwrap(),
            );
            assert_eq!((&a.qs[..], &a.scales[..]), (&b.qs[..], &b.scales[..]));
        }
    }

    /// A matrix larger than one slab is quantized slab by slab: `done` hears of every row once,
    /// in order, and each slab's blocks are those of the same rows quantized on their own.
    #[test]
    fn quantization_in_slabs_reports_every_row_and_matches_per_slab() {
        let (out, n) = (4200, 1024); // 16.4 MB of f32: two slabs
        let w = normal(out * n, 0.02, 3);
        let mut seen = vec![];
        let m = Q4_0Matrix::quantize_with(&w, out, n, &mut |r| seen.push(r)).unwrap();
        assert!(seen.len() >= 2, "{seen:?}");
        assert_eq!(seen.first().unwrap().start, 0);
        assert_eq!(seen.last().unwrap().end, out);
        assert!(seen.windows(2).all(|p| p[0].end == p[1].start), "{seen:?}");
        let r = seen[1].clone();
        let part = Q4_0Matrix::quantize(&w[r.start * n..r.end * n], r.len(), n).unwrap();
        for row in 0..r.len() {
            for b in 0..n / 32 {
                assert_eq!(part.block(row, b), m.block(r.start + row, b), "row {row}");
            }
        }
        let mut rows = 0;
        let q8 = Q8_0Matrix::quantize_with(&w, out, n, &mut |r| rows += r.len()).unwrap();
        assert_eq!((rows, q8.dequantize().len()), (out, out * n));
    }

    /// A few rows at once give each row's one-row gemv result bit for bit (the same kernel over
    /// the same weights, in other task slices), for every weight format, with shapes that leave
    /// partial tasks, and more rows than a verify pass usually has: what lets a verify pass keep
    /// its rows as a decode step's ([`crate::kernels::as_decode_steps`]).
    #[test]
    fn a_few_rows_at_once_equal_one_row_at_a_time() {
        for (out, n) in [(1001, 96), (515, 1536)] {
            let w32 = random(out * n, 5);
            let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
            let q8 = Q8_0Matrix::quantize(&w32, out, n).unwrap();
            let q4 = Q4_0Matrix::quantize(&w32, out, n).unwrap();
            for m in [2usize, 3, 5, MAX_GEMV_ROWS, MAX_GEMV_ROWS + 3] {
                let x = random(m * n, 7 + m as u64);
                for w in [
                    WeightRows::F32(&w32),
                    WeightRows::F16(&wh),
                    WeightRows::Bf16(&wb),
                    WeightRows::Q8_0(&q8),
                    WeightRows::Q4_0(&q4),
                ] {
                    let mut y = vec![0f32; m * out];
                    gemv_rows(w, &x, m, &mut y).unwrap();
                    for r in 0..m {
                        let mut one = vec![0f32; out];
                        gemv(w, &x[r * n..(r + 1) * n], &mut one).unwrap();
                        let got = &y[r * out..(r + 1) * out];
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert!(bits(got) == bits(&one), "{out}x{n}, {m} rows, row {r}");
                    }
                }
            }
        }
        assert!(gemv_rows(WeightRows::F32(&[0.0; 192]), &[0.0; 95], 2, &mut [0.0; 4]).is_err());
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        let w = [0f32; 6];
        let mut y = [0f32; 4];
        assert!(gemv(WeightRows::F32(&w), &[0.0; 2], &mut y).is_err());
        assert!(gemv(WeightRows::F32(&w), &[], &mut y[..0]).is_err());
        let m = Q8_0Matrix::quantize(&[0.5; 64], 2, 32).unwrap();
        assert!(gemv(WeightRows::Q8_0(&m), &[0.0; 16], &mut y).is_err());
    }
}
