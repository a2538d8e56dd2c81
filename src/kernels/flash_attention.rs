//! Causal attention for a prompt chunk (many query rows) over f32 keys and values, flash-attention
//! style, on CPUs with AVX2 or AVX-512: no score, mask or probability tensor beyond one key block.
//!
//! Notable:
//! - Query rows sit in SIMD lanes: a row tile is 48 rows of one KV head's group (three 16-lane
//!   registers, six AVX2 ones; rows ordered by position, then query head, so a tile's rows see
//!   nearly the same keys), its queries transposed once to `Qᵀ` `[d, 48]` and pre-scaled. One
//!   body serves both widths (the `Simd` trait); only the register tiles differ (AVX-512: 8
//!   keys or value columns × 3 registers of rows; AVX2, 16 registers: 4 × 2).
//! - Per key block (64 keys): scores `Sᵀ` `[64, 48]` by outer products (`Qᵀ` registers times
//!   one broadcast key element per key: no horizontal sums, however short the head
//!   dimension), the causal/window mask from each lane's visible range, the online softmax
//!   (running maximum and sum per lane, all lane-wise), then `Oᵀ` `[dv, 48]` rescaled and
//!   accumulated by outer products of probability registers and broadcast value elements.
//! - A parallel item is up to four row tiles, which share each key block: its values are packed
//!   once (contiguous per value tile) and the block is read from memory once for 192 rows; one
//!   tile alone streamed every key and value once per 32 rows, bound by memory at 8K contexts.
//! - Key blocks sit at multiples of 64 positions whatever the item, and a key a row cannot see
//!   adds exactly zero, so a row's result depends on its own keys only: not on the other rows of
//!   its item, the chunk it came in, or the thread count.
//! - Items go to the pool latest rows first (they see the most keys), so the end of a call is
//!   not one thread finishing a long item.
//!
//! [`super::attention::attend_few`] serves decode steps and verify passes (a few rows, keys split
//! among threads); this serves prompt chunks, where rows are many and each item's keys stay on
//! one thread.

// Off x86-64 nothing here runs (`applies` is false): the kernels compile, unused.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use super::attention::{Geometry, HeadRows};
use super::gemv::{Isa, SyncPtr};
use super::parallel::{parallel_for, threads};
use anyhow::{ensure, Result};
use std::cell::RefCell;

/// Query rows per row tile: three AVX-512 registers, or three times two AVX2 ones.
const ROWS: usize = 48;
/// Most row tiles per item: each key block's keys and values are read once per item, so
/// `MAX_TILES · ROWS` query rows share them.
const MAX_TILES: usize = 4;
/// Keys per online-softmax block: the block's scores are `BLOCK × ROWS` f32 (12 KB).
const BLOCK: usize = 64;

thread_local! {
    /// Per-thread `Qᵀ`, `Oᵀ`, the block's scores and its packed values.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`attend_many`] runs for values `dv` wide on this CPU (AVX2 or AVX-512).
pub fn applies(dv: usize) -> bool {
    applies_on(Isa::get(), dv)
}

fn applies_on(isa: Isa, dv: usize) -> bool {
    isa.has_avx2() && dv > 0 && dv.is_multiple_of(8)
}

/// `softmax(q·kᵀ·scale, causal)·v` → `out` `[batch, q_heads, rows, dv]` (overwritten); `q`
/// contiguous `[batch, q_heads, rows, d]`. Every query must see at least one key; the caller
/// checks [`applies`] first.
pub fn attend_many(
    geo: &Geometry,
    q: &[f32],
    k: HeadRows<'_>,
    v: HeadRows<'_>,
    out: &mut [f32],
) -> Result<()> {
    attend_many_on(Isa::get(), geo, q, k, v, out)
}

/// [`attend_many`] with the kernels of `isa` (which this CPU must have).
fn attend_many_on(
    isa: Isa,
    geo: &Geometry,
    q: &[f32],
    k: HeadRows<'_>,
    v: HeadRows<'_>,
    out: &mut [f32],
) -> Result<()> {
    let Geometry {
        batch,
        q_heads,
        kv_heads,
        rows: n,
        ..
    } = *geo;
    let (d, dv) = (k.width, v.width);
    ensure!(
        applies_on(isa, dv),
        "internal: flash attention does not apply here"
    );
    geo.check(q, out, d, dv)?;
    let g = q_heads / kv_heads;
    let groups = batch * kv_heads;
    // Row tiles per item: up to MAX_TILES (each key block read once for all of them), fewer
    // where that would leave a thread without two items.
    let row_tiles = (g * n).div_ceil(ROWS);
    let per_item = (groups * row_tiles)
        .div_ceil(2 * threads())
        .clamp(1, MAX_TILES);
    let per_group = row_tiles.div_ceil(per_item);
    let op = SyncPtr(out.as_mut_ptr());
    parallel_for(groups * per_group, |items| {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            s.resize(MAX_TILES * (d + dv) * ROWS + BLOCK * (ROWS + dv), 0.0);
            for item in items {
                // Latest rows first.
                let (block, group) = (per_group - 1 - item / groups, item % groups);
                let task = Item {
                    geo,
                    q,
                    k: &k,
                    v: &v,
                    bi: group / kv_heads,
                    h: group % kv_heads,
                    g,
                    first: block * per_item * ROWS,
                    count: (per_item * ROWS).min(g * n - block * per_item * ROWS),
                };
                run_item(isa, &task, &mut s, op);
            }
        })
    });
    Ok(())
}

/// One parallel item: rows `first..first + count` of group `(bi, h)`, in position-major order
/// (row `ρ` is position `ρ / g`, query head `h·g + ρ % g`), as tiles of [`ROWS`] rows that
/// share each key block's values.
struct Item<'a> {
    geo: &'a Geometry,
    q: &'a [f32],
    k: &'a HeadRows<'a>,
    v: &'a HeadRows<'a>,
    bi: usize,
    h: usize,
    g: usize,
    first: usize,
    count: usize,
}

impl Item<'_> {
    /// Offset of tile `tile`'s lane `r` in `q` (width `d`) or `out` (width `dv`), and its
    /// position index. Lanes past the item's rows repeat its last row (computed, never written).
    fn row(&self, tile: usize, r: usize, width: usize) -> (usize, usize) {
        let rho = self.first + (tile * ROWS + r).min(self.count - 1);
        let (i, head) = (rho / self.g, self.h * self.g + rho % self.g);
        let n = self.geo.rows;
        (((self.bi * self.geo.q_heads + head) * n + i) * width, i)
    }
}

/// Runs one item with `isa`'s kernels.
fn run_item(isa: Isa, t: &Item, scratch: &mut [f32], out: SyncPtr<f32>) {
    match isa {
        // SAFETY: `Isa::get` detected these features (`applies_on` checked AVX2 at least). Each
        // item writes only its own rows of `out` (checked to hold every row), which outlives
        // the call.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { item_avx512(t, scratch, out.get()) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { item_avx2(t, scratch, out.get()) },
        Isa::Portable => unreachable!("flash attention runs with AVX2 or AVX-512"),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn item_avx512(t: &Item, scratch: &mut [f32], out: *mut f32) {
    item::<x86::Avx512, 3, 8>(t, scratch, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn item_avx2(t: &Item, scratch: &mut [f32], out: *mut f32) {
    // AVX2 has 16 registers: 4 keys × 2 registers of accumulators, 2 of queries and the
    // broadcast fit (with 3 registers of queries one accumulator went to the stack every step).
    item::<x86::Avx2, 2, 4>(t, scratch, out)
}

/// The vector operations the kernels use, for one register width.
trait Simd {
    type V: Copy;
    /// f32 lanes per register.
    const LANES: usize;
    unsafe fn zero() -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn splat(x: f32) -> Self::V;
    /// `a · b + c`.
    unsafe fn mul_add(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
    use std::arch::x86_64::*;

    pub(super) struct Avx512;
    impl Simd for Avx512 {
        type V = __m512;
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn mul_add(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
    }

    pub(super) struct Avx2;
    impl Simd for Avx2 {
        type V = __m256;
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn mul_add(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
    }
}

/// One item: every row tile over every key block it sees, then each real row normalised into
/// `out`.
#[inline(always)]
unsafe fn item<S: Simd, const VECS: usize, const TILE: usize>(
    t: &Item,
    scratch: &mut [f32],
    out: *mut f32,
) {
    let (d, dv) = (t.k.width, t.v.width);
    let tiles = t.count.div_ceil(ROWS);
    let (qts, rest) = scratch.split_at_mut(MAX_TILES * d * ROWS);
    let (ots, rest) = rest.split_at_mut(MAX_TILES * dv * ROWS);
    let (s, vp) = rest.split_at_mut(BLOCK * ROWS);
    // Per tile: each lane's visible keys `lo..hi` (relative to `k_start`), `Qᵀ` pre-scaled,
    // `Oᵀ` zeroed, the running maxima and sums.
    let mut lo = [[0usize; ROWS]; MAX_TILES];
    let mut hi = [[0usize; ROWS]; MAX_TILES];
    for tile in 0..tiles {
        let qt = &mut qts[tile * d * ROWS..][..d * ROWS];
        for r in 0..ROWS {
            let (off, i) = t.row(tile, r, d);
            (lo[tile][r], hi[tile][r]) = t.geo.visible(i);
            for (c, &x) in t.q[off..off + d].iter().enumerate() {
                qt[c * ROWS + r] = x * t.geo.scale;
            }
        }
    }
    ots[..tiles * dv * ROWS].fill(0.0);
    let mut m = [[f32::NEG_INFINITY; ROWS]; MAX_TILES];
    let mut l = [[0f32; ROWS]; MAX_TILES];
    // The keys each tile sees at all, and the item's.
    let seen: [(usize, usize); MAX_TILES] = std::array::from_fn(|tile| {
        let lo = lo[tile].iter().min().copied().unwrap_or(0);
        (lo, hi[tile].iter().max().copied().unwrap_or(0))
    });
    let first = seen[..tiles].iter().map(|s| s.0).min().unwrap_or(0);
    let end = seen[..tiles].iter().map(|s| s.1).max().unwrap_or(0);
    // Blocks at multiples of BLOCK in positions (not in this call's key indices).
    let base = t.geo.k_start;
    let mut j0 = (base + first) / BLOCK * BLOCK;
    while j0 < base + end {
        let (ja, jb) = (
            j0.max(base + first) - base,
            (j0 + BLOCK).min(base + end) - base,
        );
        let nb = jb - ja;
        j0 += BLOCK;
        // Values, packed per tile of TILE columns (`vp[c / TILE][j][c % TILE]`: the products
        // below stream one contiguous run per column tile instead of a line from each of `nb`
        // rows), once for all the item's row tiles.
        for j in 0..nb {
            let vr = t.v.row(t.bi, t.h, ja + j);
            for (c0, part) in vr.chunks_exact(TILE).enumerate() {
                vp[(c0 * nb + j) * TILE..][..TILE].copy_from_slice(part);
            }
        }
        for tile in 0..tiles {
            // A block none of the tile's lanes sees would leave it exactly as it is.
            if seen[tile].1 <= ja || seen[tile].0 >= jb {
                continue;
            }
            let ot = &mut ots[tile * dv * ROWS..][..dv * ROWS];
            scores::<S, VECS, TILE>(t, &qts[tile * d * ROWS..][..d * ROWS], (ja, nb), s);
            let alpha = online_softmax(
                (&lo[tile], &hi[tile]),
                (ja, nb),
                s,
                &mut m[tile],
                &mut l[tile],
            );
            add_values::<S, VECS, TILE>(ot, &s[..nb * ROWS], &vp[..nb * dv], &alpha);
        }
    }
    // Normalise and write each real lane's row.
    for tile in 0..tiles {
        let ot = &ots[tile * dv * ROWS..][..dv * ROWS];
        for r in 0..ROWS.min(t.count - tile * ROWS) {
            let (off, _) = t.row(tile, r, dv);
            let inv = 1.0 / l[tile][r];
            for c in 0..dv {
                *out.add(off + c) = ot[c * ROWS + r] * inv;
            }
        }
    }
}

/// Scores of a row tile against the keys `ja..ja + nb`: `s[j·ROWS + r] = Qᵀ[·, r] · K[ja + j]`,
/// tiles of TILE keys (the last one repeats its last key; those columns are never stored).
#[inline(always)]
unsafe fn scores<S: Simd, const VECS: usize, const TILE: usize>(
    t: &Item,
    qt: &[f32],
    (ja, nb): (usize, usize),
    s: &mut [f32],
) {
    for r0 in (0..ROWS).step_by(VECS * S::LANES) {
        for jt in (0..nb).step_by(TILE) {
            let kp: [*const f32; TILE] =
                std::array::from_fn(|x| t.k.row(t.bi, t.h, ja + (jt + x).min(nb - 1)).as_ptr());
            let mut acc = [[S::zero(); VECS]; TILE];
            for c in 0..t.k.width {
                let at = qt.as_ptr().add(c * ROWS + r0);
                let qv: [S::V; VECS] = std::array::from_fn(|u| S::load(at.add(u * S::LANES)));
                for x in 0..TILE {
                    let kb = S::splat(*kp[x].add(c));
                    for u in 0..VECS {
                        acc[x][u] = S::mul_add(qv[u], kb, acc[x][u]);
                    }
                }
            }
            for (x, acc) in acc.iter().enumerate().take(nb - jt) {
                let at = s.as_mut_ptr().add((jt + x) * ROWS + r0);
                for (u, acc) in acc.iter().enumerate() {
                    S::store(at.add(u * S::LANES), *acc);
                }
            }
        }
    }
}

/// The mask (keys outside a lane's `lo..hi` score −∞), then the online softmax of the block's
/// scores, lane-wise: the new maxima `m`, the sums `l`, probabilities in place of the scores;
/// returns the factor each lane's earlier values are rescaled by. A lane that has seen no key
/// yet keeps −∞ and exponentiates against 0 (its probabilities, sum and values stay exactly 0).
#[inline(always)]
fn online_softmax(
    (lo, hi): (&[usize; ROWS], &[usize; ROWS]),
    (ja, nb): (usize, usize),
    s: &mut [f32],
    m: &mut [f32; ROWS],
    l: &mut [f32; ROWS],
) -> [f32; ROWS] {
    let s = &mut s[..nb * ROWS];
    if lo.iter().any(|&a| a > ja) || hi.iter().any(|&b| b < ja + nb) {
        for (j, row) in s.chunks_exact_mut(ROWS).enumerate() {
            for r in 0..ROWS {
                let visible = lo[r] <= ja + j && ja + j < hi[r];
                row[r] = if visible { row[r] } else { f32::NEG_INFINITY };
            }
        }
    }
    let mut top = *m;
    for row in s.chunks_exact(ROWS) {
        for r in 0..ROWS {
            top[r] = top[r].max(row[r]);
        }
    }
    let safe: [f32; ROWS] = std::array::from_fn(|r| {
        if top[r] == f32::NEG_INFINITY {
            0.0
        } else {
            top[r]
        }
    });
    let alpha: [f32; ROWS] = std::array::from_fn(|r| super::gelu::exp(m[r] - safe[r]));
    let mut sum = [0f32; ROWS];
    for row in s.chunks_exact_mut(ROWS) {
        for r in 0..ROWS {
            let x = row[r];
            let p = super::gelu::exp(x - safe[r]);
            let p = if x == f32::NEG_INFINITY { 0.0 } else { p };
            row[r] = p;
            sum[r] += p;
        }
    }
    for r in 0..ROWS {
        l[r] = l[r] * alpha[r] + sum[r];
    }
    *m = top;
    alpha
}

/// `Oᵀ[c, r] = α[r]·Oᵀ[c, r] + Σ_j P[j, r]·V[j, c]` for the block's probabilities `p` and its
/// packed values `vp` (`[dv / TILE][nb][TILE]`), tiles of TILE columns.
#[inline(always)]
unsafe fn add_values<S: Simd, const VECS: usize, const TILE: usize>(
    ot: &mut [f32],
    p: &[f32],
    vp: &[f32],
    alpha: &[f32; ROWS],
) {
    let (nb, dv) = (p.len() / ROWS, ot.len() / ROWS);
    for r0 in (0..ROWS).step_by(VECS * S::LANES) {
        let av: [S::V; VECS] =
            std::array::from_fn(|u| S::load(alpha.as_ptr().add(r0 + u * S::LANES)));
        for c0 in (0..dv).step_by(TILE) {
            let mut acc = [[S::zero(); VECS]; TILE];
            for (x, acc) in acc.iter_mut().enumerate() {
                let at = ot.as_ptr().add((c0 + x) * ROWS + r0);
                for (u, acc) in acc.iter_mut().enumerate() {
                    *acc = S::mul(S::load(at.add(u * S::LANES)), av[u]);
                }
            }
            let vt = vp.as_ptr().add(c0 / TILE * nb * TILE);
            for j in 0..nb {
                let at = p.as_ptr().add(j * ROWS + r0);
                let pv: [S::V; VECS] = std::array::from_fn(|u| S::load(at.add(u * S::LANES)));
                for (x, acc) in acc.iter_mut().enumerate() {
                    let vb = S::splat(*vt.add(j * TILE + x));
                    for u in 0..VECS {
                        acc[u] = S::mul_add(pv[u], vb, acc[u]);
                    }
                }
            }
            for (x, acc) in acc.iter().enumerate() {
                let at = ot.as_mut_ptr().add((c0 + x) * ROWS + r0);
                for (u, acc) in acc.iter().enumerate() {
                    S::store(at.add(u * S::LANES), *acc);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::attention::tests::{error_against_formula, heads, rnd};
    use crate::kernels::gemv::tests::isas;

    /// The instruction sets flash attention runs with on this machine.
    fn flash_isas() -> Vec<Isa> {
        let isas: Vec<Isa> = isas().into_iter().filter(|&i| applies_on(i, 8)).collect();
        if isas.is_empty() {
            eprintln!("no AVX2 on this machine: flash attention is not used, nothing to test");
        }
        isas
    }

    /// Prompt-chunk shapes (GQA, MQA, rows not a multiple of an item, several key blocks, a
    /// head dimension that is no multiple of 16), sliding windows that cut the keys inside a
    /// block, keys that start after position 0 (a sliding layer's kept window, a later chunk):
    /// equal to the f64 formula.
    #[test]
    fn equals_the_formula_for_prompt_chunks() {
        let mut seed = 11;
        for isa in flash_isas() {
            for case in [
                (1, 4, 1, 17, 17, 16, 16, None, 0),
                (1, 8, 2, 100, 300, 64, 32, None, 0),
                (2, 4, 4, 33, 700, 40, 40, None, 0),
                (1, 8, 1, 64, 1000, 32, 32, Some(100), 0),
                (1, 2, 1, 40, 600, 24, 24, Some(512), 100),
                (1, 3, 3, 50, 50, 8, 8, Some(4), 0),
                (1, 1, 1, 129, 200, 72, 80, None, 61),
            ] {
                let attend = |g: &_, q: &_, k: HeadRows<'_>, v: HeadRows<'_>, o: &mut _| {
                    attend_many_on(isa, g, q, k, v, o)
                };
                let (geo, err) = error_against_formula(&mut seed, case, attend);
                assert!(err < 1e-5, "{isa:?} {geo:?}: max error {err}");
            }
        }
    }

    /// A row's result is its own: the last rows of a chunk, attended as a chunk of their own
    /// (other items, other key indices), equal the same rows of the whole chunk bit for bit.
    #[test]
    fn a_row_does_not_depend_on_its_chunk() {
        for isa in flash_isas() {
            let mut seed = 5;
            let (q_heads, kv_heads, rows, keys, d, window) = (4, 1, 90, 400, 32, Some(150));
            let whole = Geometry {
                batch: 1,
                q_heads,
                kv_heads,
                rows,
                keys,
                q_start: keys - rows,
                k_start: 0,
                window,
                scale: 0.2,
            };
            let q = rnd(&mut seed, q_heads * rows * d);
            let k = rnd(&mut seed, keys * d);
            let v = rnd(&mut seed, keys * d);
            let mut out = vec![0f32; q_heads * rows * d];
            attend_many(
                &whole,
                &q,
                heads(&k, &whole, d),
                heads(&v, &whole, d),
                &mut out,
            )
            .unwrap();
            // The last 37 rows, their keys starting at 21 (as a later chunk's kept window would).
            let (tail, skip) = (37, 21);
            let part = Geometry {
                rows: tail,
                keys: keys - skip,
                q_start: keys - tail,
                k_start: skip,
                ..whole
            };
            let qt: Vec<f32> = (0..q_heads)
                .flat_map(|h| q[(h * rows + rows - tail) * d..][..tail * d].to_vec())
                .collect();
            let mut got = vec![0f32; q_heads * tail * d];
            attend_many_on(
                isa,
                &part,
                &qt,
                heads(&k[skip * d..], &part, d),
                heads(&v[skip * d..], &part, d),
                &mut got,
            )
            .unwrap();
            for h in 0..q_heads {
                assert_eq!(
                    got[h * tail * d..][..tail * d],
                    out[(h * rows + rows - tail) * d..][..tail * d],
                    "{isa:?} head {h}"
                );
            }
        }
    }
}
