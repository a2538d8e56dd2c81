//! Causal attention for a few query rows (decode steps, verify passes) over f32 keys and values
//! on the CPU, in one parallel pass: no score, mask or probability tensor, no per-op dispatch.
//!
//! A decode step's attention through candle is a dozen small ops per layer (scores, scale, mask,
//! softmax, casts, the value product), each allocating and most of them serial: more time than
//! the layer's weight products on a small model. Here (flash-decoding):
//! - The query heads that share a KV head are one group of `g · n` rows, so each key and value
//!   row is read once per group, not once per query head.
//! - A group's visible keys are cut into chunks, one parallel item each, so even one KV head
//!   (MQA) and a short context keep every thread busy; a long context reads its cache once.
//! - Inside a chunk, keys go in blocks of [`KEY_BLOCK`] with an online softmax (running maximum,
//!   running sum, rescaled accumulator): the working set is bounded whatever the context.
//! - The chunks of a row are merged by their maxima (`Σ e^(mᶜ−M)·accᶜ / Σ e^(mᶜ−M)·lᶜ`).
//! - Which keys a row sees comes from positions (causal end, sliding window start), as
//!   [`crate::layers::kv_store::causal_mask`] builds them.

use super::gemv::{Isa, SyncPtr};
use super::parallel::{parallel_for, threads};
use anyhow::{bail, ensure, Result};

/// Keys per online-softmax block inside a chunk.
const KEY_BLOCK: usize = 128;
/// A chunk holds at least this many keys (fewer only when the context is shorter).
const MIN_CHUNK: usize = 32;

/// One head-major f32 buffer `[b, h, rows, width]` as the KV store holds it: each row is
/// `width` contiguous values; heads and batches are `head_stride` / `batch_stride` apart from
/// `offset` (a view of the first `t` rows of a longer buffer is not contiguous across heads).
#[derive(Debug, Clone, Copy)]
pub struct HeadRows<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub batch_stride: usize,
    pub head_stride: usize,
    pub width: usize,
}

impl HeadRows<'_> {
    #[inline(always)]
    pub(super) fn row(&self, b: usize, h: usize, j: usize) -> &[f32] {
        let at = self.offset + b * self.batch_stride + h * self.head_stride + j * self.width;
        &self.data[at..at + self.width]
    }
}

/// The geometry of one call: `q` `[batch, q_heads, rows, d]` at positions `q_start..`, keys and
/// values `[batch, kv_heads, keys, ·]` at positions `k_start..`, an optional sliding window.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub rows: usize,
    pub keys: usize,
    pub q_start: usize,
    pub k_start: usize,
    pub window: Option<usize>,
    pub scale: f32,
}

impl Geometry {
    /// That `q` (`[batch, q_heads, rows, d]`) and `out` (`dv` wide) fit the geometry, the query
    /// heads group evenly over the KV heads, and every query sees at least one key.
    pub(super) fn check(&self, q: &[f32], out: &[f32], d: usize, dv: usize) -> Result<()> {
        let (b, hq, hkv, n) = (self.batch, self.q_heads, self.kv_heads, self.rows);
        ensure!(
            hkv > 0 && hq % hkv == 0,
            "internal: {hq} query heads over {hkv} KV heads"
        );
        ensure!(
            q.len() == b * hq * n * d && out.len() == b * hq * n * dv,
            "internal: attention buffers do not match [{b}, {hq}, {n}, {d}/{dv}]"
        );
        if let Some(i) = (0..n).find(|&i| {
            let (lo, hi) = self.visible(i);
            lo >= hi
        }) {
            bail!(
                "internal: the query at {} sees none of the keys at {}..{}",
                self.q_start + i,
                self.k_start,
                self.k_start + self.keys
            );
        }
        Ok(())
    }

    /// The keys (relative to `k_start`) the query at row `i` sees: `lo..hi`.
    pub(super) fn visible(&self, i: usize) -> (usize, usize) {
        let p = self.q_start + i;
        let first = self.window.map_or(0, |w| (p + 1).saturating_sub(w));
        let lo = first.saturating_sub(self.k_start).min(self.keys);
        let hi = (p + 1).saturating_sub(self.k_start).min(self.keys);
        (lo, hi)
    }
}

/// A chunk's result for one row: running maximum, sum of `e^(s − max)`, and the accumulated
/// values (`dv` wide, stored after the two).
const STATS: usize = 2;

/// `softmax(q·kᵀ·scale, causal)·v` → `out` `[batch, q_heads, rows, dv]` (overwritten); `q`
/// contiguous `[batch, q_heads, rows, d]`. Every query must see at least one key.
pub fn attend_few(
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
    geo.check(q, out, d, dv)?;
    if n == 0 {
        return Ok(());
    }
    let g = q_heads / kv_heads;
    let group_rows = g * n;
    // The keys any row of a group sees (the same for every group; each row sees one, checked).
    let lo = (0..n).map(|i| geo.visible(i).0).min().unwrap_or(0);
    let hi = (0..n).map(|i| geo.visible(i).1).max().unwrap_or(0);
    // Chunks per group: about four items per thread in all, none under MIN_CHUNK keys.
    let groups = batch * kv_heads;
    let span = hi - lo;
    let chunks = (4 * threads())
        .div_ceil(groups)
        .clamp(1, span.div_ceil(MIN_CHUNK));
    let chunk = span.div_ceil(chunks);
    let chunks = span.div_ceil(chunk);
    let slot = STATS + dv;
    let mut partial = vec![0f32; groups * chunks * group_rows * slot];
    let pp = SyncPtr(partial.as_mut_ptr());
    let isa = Isa::get();
    parallel_for(groups * chunks, |items| {
        for item in items {
            let (group, c) = (item / chunks, item % chunks);
            let (bi, h) = (group / kv_heads, group % kv_heads);
            let keys = lo + c * chunk..(lo + (c + 1) * chunk).min(hi);
            // SAFETY: each item writes its own slot range of `partial`, which outlives the call.
            let part = unsafe {
                std::slice::from_raw_parts_mut(
                    pp.get().add(item * group_rows * slot),
                    group_rows * slot,
                )
            };
            let qg = &q[(bi * q_heads + h * g) * n * d..][..group_rows * d];
            let task = Chunk {
                geo,
                q: qg,
                k: &k,
                v: &v,
                bi,
                h,
                keys,
            };
            run_chunk(isa, &task, part);
        }
    });
    // Merge each row's chunks by their maxima.
    for group in 0..groups {
        let (bi, h) = (group / kv_heads, group % kv_heads);
        for r in 0..group_rows {
            let o = &mut out[((bi * q_heads + h * g) * n + r) * dv..][..dv];
            let slots = (0..chunks)
                .map(|c| &partial[((group * chunks + c) * group_rows + r) * slot..][..slot]);
            let m = slots
                .clone()
                .filter(|s| s[1] > 0.0)
                .fold(f32::NEG_INFINITY, |m, s| m.max(s[0]));
            o.fill(0.0);
            let mut l = 0f32;
            for s in slots.filter(|s| s[1] > 0.0) {
                let w = (s[0] - m).exp();
                l += w * s[1];
                for (o, &a) in o.iter_mut().zip(&s[STATS..]) {
                    *o += w * a;
                }
            }
            let inv = 1.0 / l;
            o.iter_mut().for_each(|o| *o *= inv);
        }
    }
    Ok(())
}

/// One parallel item: a group's rows over a range of its keys.
struct Chunk<'a> {
    geo: &'a Geometry,
    /// The group's query rows `[g · n, d]` (head-major, then row).
    q: &'a [f32],
    k: &'a HeadRows<'a>,
    v: &'a HeadRows<'a>,
    bi: usize,
    h: usize,
    keys: std::ops::Range<usize>,
}

fn run_chunk(isa: Isa, c: &Chunk, part: &mut [f32]) {
    match isa {
        // SAFETY: `Isa::get` detected AVX-512F (and AVX2/FMA) or AVX2+FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { chunk_avx512(c, part) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { chunk_avx2(c, part) },
        Isa::Portable => chunk(c, part),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn chunk_avx512(c: &Chunk, part: &mut [f32]) {
    chunk(c, part)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_avx2(c: &Chunk, part: &mut [f32]) {
    chunk(c, part)
}

/// Online softmax over the chunk's keys in blocks; `part` gets `[max, sum, acc[dv]]` per row.
#[inline(always)]
fn chunk(c: &Chunk, part: &mut [f32]) {
    let (d, dv) = (c.k.width, c.v.width);
    let n = c.geo.rows;
    let rows = c.q.len() / d;
    let slot = STATS + dv;
    for s in part.chunks_exact_mut(slot) {
        s[0] = f32::NEG_INFINITY;
        s[1] = 0.0;
        s[STATS..].fill(0.0);
    }
    // Each row's visible keys within this chunk.
    let seen: Vec<(usize, usize)> = (0..rows)
        .map(|r| {
            let (lo, hi) = c.geo.visible(r % n);
            (lo.max(c.keys.start), hi.min(c.keys.end))
        })
        .collect();
    let mut scores = vec![0f32; rows * KEY_BLOCK];
    for j0 in c.keys.clone().step_by(KEY_BLOCK) {
        let j1 = (j0 + KEY_BLOCK).min(c.keys.end);
        // Scores: each key row once, against every row that sees it.
        for j in j0..j1 {
            let kr = c.k.row(c.bi, c.h, j);
            for (r, &(a, b)) in seen.iter().enumerate() {
                if a <= j && j < b {
                    scores[r * KEY_BLOCK + j - j0] =
                        dot(&c.q[r * d..(r + 1) * d], kr) * c.geo.scale;
                }
            }
        }
        // Per row: new maximum, rescale, probabilities in place of the scores.
        for (r, &(a, b)) in seen.iter().enumerate() {
            let (a, b) = (a.max(j0), b.min(j1));
            if a >= b {
                continue;
            }
            let s = &mut scores[r * KEY_BLOCK + a - j0..r * KEY_BLOCK + b - j0];
            let st = &mut part[r * slot..(r + 1) * slot];
            let m = s.iter().fold(st[0], |m, &x| m.max(x));
            let rescale = super::gelu::exp(st[0] - m);
            let mut sum = 0f32;
            for x in s.iter_mut() {
                *x = super::gelu::exp(*x - m);
                sum += *x;
            }
            st[0] = m;
            st[1] = st[1] * rescale + sum;
            if rescale != 1.0 {
                st[STATS..].iter_mut().for_each(|a| *a *= rescale);
            }
        }
        // Values: each value row once, into every row that sees it.
        for j in j0..j1 {
            let vr = c.v.row(c.bi, c.h, j);
            for (r, &(a, b)) in seen.iter().enumerate() {
                if a <= j && j < b {
                    let p = scores[r * KEY_BLOCK + j - j0];
                    axpy(p, vr, &mut part[r * slot + STATS..(r + 1) * slot]);
                }
            }
        }
    }
}

/// `a · b`, sixteen independent lanes (vectorised by the caller's target features).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += p · x`.
#[inline(always)]
fn axpy(p: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = p.mul_add(x, *y);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The plain formula in f64: scores, the causal/window mask, softmax, values.
    pub(in crate::kernels) fn reference(
        geo: &Geometry,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: usize,
        dv: usize,
    ) -> Vec<f32> {
        let g = geo.q_heads / geo.kv_heads;
        let mut out = vec![0f32; geo.batch * geo.q_heads * geo.rows * dv];
        for b in 0..geo.batch {
            for qh in 0..geo.q_heads {
                let h = qh / g;
                for i in 0..geo.rows {
                    let (lo, hi) = geo.visible(i);
                    let qr = &q[((b * geo.q_heads + qh) * geo.rows + i) * d..][..d];
                    let s: Vec<f64> = (lo..hi)
                        .map(|j| {
                            let kr = &k[((b * geo.kv_heads + h) * geo.keys + j) * d..][..d];
                            qr.iter()
                                .zip(kr)
                                .map(|(&a, &b)| a as f64 * b as f64)
                                .sum::<f64>()
                                * geo.scale as f64
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    let o = &mut out[((b * geo.q_heads + qh) * geo.rows + i) * dv..][..dv];
                    for (c, o) in o.iter_mut().enumerate() {
                        *o = (lo..hi)
                            .zip(&e)
                            .map(|(j, p)| {
                                p / z * v[((b * geo.kv_heads + h) * geo.keys + j) * dv + c] as f64
                            })
                            .sum::<f64>() as f32;
                    }
                }
            }
        }
        out
    }

    pub(in crate::kernels) fn rnd(seed: &mut u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// `(batch, q_heads, kv_heads, rows, keys, d, dv, window, k_start)` of a test case.
    pub(in crate::kernels) type Case = (
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        Option<usize>,
        usize,
    );

    /// Packed `[batch, kv_heads, keys, width]` rows as a view.
    pub(in crate::kernels) fn heads<'a>(
        data: &'a [f32],
        geo: &Geometry,
        width: usize,
    ) -> HeadRows<'a> {
        HeadRows {
            data,
            offset: 0,
            batch_stride: geo.kv_heads * geo.keys * width,
            head_stride: geo.keys * width,
            width,
        }
    }

    /// `attend` on random queries, keys and values of `case` (the queries the last `rows`
    /// positions, scale 0.3): its geometry and the largest distance from the f64 formula.
    pub(in crate::kernels) fn error_against_formula(
        seed: &mut u64,
        (batch, q_heads, kv_heads, rows, keys, d, dv, window, k_start): Case,
        attend: impl Fn(&Geometry, &[f32], HeadRows, HeadRows, &mut [f32]) -> Result<()>,
    ) -> (Geometry, f32) {
        let geo = Geometry {
            batch,
            q_heads,
            kv_heads,
            rows,
            keys,
            q_start: k_start + keys - rows,
            k_start,
            window,
            scale: 0.3,
        };
        let q = rnd(seed, batch * q_heads * rows * d);
        let k = rnd(seed, batch * kv_heads * keys * d);
        let v = rnd(seed, batch * kv_heads * keys * dv);
        let mut out = vec![f32::NAN; batch * q_heads * rows * dv];
        attend(&geo, &q, heads(&k, &geo, d), heads(&v, &geo, dv), &mut out).unwrap();
        let want = reference(&geo, &q, &k, &v, d, dv);
        let err = out
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        (geo, err)
    }

    /// Decode and verify shapes (GQA, MQA, one row, several rows), contexts shorter and longer
    /// than a key block and a chunk, sliding windows that cut the keys, and keys that start
    /// after position 0 (a sliding layer's kept window): equal to the f64 formula.
    #[test]
    fn equals_the_formula_for_decode_and_verify_shapes() {
        let mut seed = 7;
        for case in [
            (1, 4, 1, 1, 5, 16, 16, None, 0),
            (1, 8, 2, 1, 300, 64, 32, None, 0),
            (2, 4, 4, 3, 700, 40, 40, None, 0),
            (1, 8, 1, 5, 1000, 32, 32, Some(256), 0),
            (1, 2, 1, 4, 600, 24, 24, Some(512), 100),
            (1, 3, 3, 2, 9, 8, 8, Some(4), 0),
        ] {
            let (geo, err) = error_against_formula(&mut seed, case, attend_few);
            assert!(err < 1e-5, "{geo:?}: max error {err}");
        }
    }

    /// A view of the first rows of a longer buffer (the KV store's room), with an offset.
    #[test]
    fn reads_strided_views() {
        let mut seed = 3;
        let (kv_heads, cap, keys, d) = (2, 50, 20, 16);
        let geo = Geometry {
            batch: 1,
            q_heads: 4,
            kv_heads,
            rows: 1,
            keys,
            q_start: keys - 1,
            k_start: 0,
            window: None,
            scale: 0.25,
        };
        let big_k = rnd(&mut seed, 3 + kv_heads * cap * d);
        let big_v = rnd(&mut seed, 3 + kv_heads * cap * d);
        let packed = |big: &[f32]| -> Vec<f32> {
            (0..kv_heads)
                .flat_map(|h| big[3 + h * cap * d..][..keys * d].to_vec())
                .collect()
        };
        let (k, v) = (packed(&big_k), packed(&big_v));
        let q = rnd(&mut seed, 4 * d);
        let view = |data, head_stride, offset| HeadRows {
            data,
            offset,
            batch_stride: 0,
            head_stride,
            width: d,
        };
        let (mut a, mut b) = (vec![0f32; 4 * d], vec![0f32; 4 * d]);
        attend_few(
            &geo,
            &q,
            view(&big_k, cap * d, 3),
            view(&big_v, cap * d, 3),
            &mut a,
        )
        .unwrap();
        attend_few(
            &geo,
            &q,
            view(&k, keys * d, 0),
            view(&v, keys * d, 0),
            &mut b,
        )
        .unwrap();
        assert_eq!(a, b);
    }

    /// A query that sees no key is an error, not a NaN.
    #[test]
    fn refuses_queries_that_see_no_key() {
        let geo = Geometry {
            batch: 1,
            q_heads: 1,
            kv_heads: 1,
            rows: 1,
            keys: 4,
            q_start: 10,
            k_start: 0,
            window: Some(2),
            scale: 1.0,
        };
        let z = vec![0f32; 16];
        let view = HeadRows {
            data: &z,
            offset: 0,
            batch_stride: 0,
            head_stride: 16,
            width: 4,
        };
        let mut out = vec![0f32; 4];
        assert!(attend_few(&geo, &[0.0; 4], view, view, &mut out).is_err());
    }
}
