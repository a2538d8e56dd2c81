//! Top-k selection where the scores lie (a GPU, or the generic path), in candle ops, with no
//! read-back: which entries of each row are its `k` highest, ties at the k-th place going to the
//! lower index, as the host's sort (`lightning_indexer::top_k_visible`) picks them.
//!
//! 1. The k-th largest value of each row ([`kth_largest`]): candle sorts one row per block of GPU
//!    threads (a few thousand columns at most), so rows are cut into chunks of at least `2k`,
//!    each chunk sorted and cut to its best `k`, until one chunk is left: each round halves the
//!    candidates or better. Sorting is not stable, but the k-th value does not depend on how
//!    ties are ordered.
//! 2. Every entry above that value is taken; of those equal to it, the first `k − above` by
//!    index, counted by a running count along the row ([`running_count`]: blocks of
//!    [`BLOCK`] by a product with a triangle of ones, then the blocks' totals carried).

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

/// Columns a running count takes per block (the triangle of ones is `BLOCK × BLOCK`).
pub const BLOCK: usize = 1024;

/// `[BLOCK, BLOCK]` f32, ones on and above the diagonal: `x · triangle` sums each row's entries
/// up to each column.
pub fn triangle(device: &Device) -> Result<Tensor> {
    Ok(Tensor::triu2(BLOCK, DType::F32, device)?)
}

/// `x` `[rows, n]` with `extra` columns of `value` after its own.
fn pad(x: &Tensor, extra: usize, value: f32) -> Result<Tensor> {
    if extra == 0 {
        return Ok(x.clone());
    }
    let rows = x.dim(0)?;
    let fill = Tensor::full(value, (rows, extra), x.device())?.to_dtype(x.dtype())?;
    Ok(Tensor::cat(&[x, &fill], 1)?)
}

/// The k-th largest value of each row of `x` `[rows, n]` (f32; −∞ counts as a value), `[rows, 1]`;
/// −∞ for a row of fewer than `k` entries. `k ≥ 1`.
pub fn kth_largest(x: &Tensor, k: usize) -> Result<Tensor> {
    let (rows, n) = x.dims2()?;
    if n < k {
        return Ok(Tensor::full(f32::NEG_INFINITY, (rows, 1), x.device())?);
    }
    let (best, _) = best_by_chunks(x, None, k)?;
    Ok(best.narrow(1, k - 1, 1)?.contiguous()?)
}

/// The `k` largest values of each row of `x` `[rows, n]` (f32, `n ≥ k`), highest first
/// (`[rows, k]`), with the matching entries of `ids` `[rows, n]` where given: rows cut into
/// chunks of at least `2k`, each sorted and cut to its best `k`, until one chunk is left. Which
/// of equal values come with which ids is not defined (the sort is not stable).
fn best_by_chunks(x: &Tensor, ids: Option<&Tensor>, k: usize) -> Result<(Tensor, Option<Tensor>)> {
    let (rows, mut n) = x.dims2()?;
    let chunk = 1024usize.max((2 * k).next_power_of_two());
    let (mut x, mut ids) = (x.contiguous()?, ids.cloned());
    loop {
        let width = if n > chunk {
            n.div_ceil(chunk) * chunk
        } else {
            n
        };
        let chunks = width / chunk.min(width);
        let shape = (rows * chunks, width / chunks);
        let (sorted, order) = pad(&x, width - n, f32::NEG_INFINITY)?
            .reshape(shape)?
            .sort_last_dim(false)?;
        let best = |t: Tensor| -> Result<Tensor> {
            Ok(t.narrow(1, 0, k)?
                .contiguous()?
                .reshape((rows, chunks * k))?)
        };
        x = best(sorted)?;
        ids = match ids {
            Some(i) => Some(best(
                pad(&i, width - n, 0.0)?.reshape(shape)?.gather(&order, 1)?,
            )?),
            None => None,
        };
        if chunks == 1 {
            return Ok((x, ids));
        }
        n = chunks * k;
    }
}

/// For `x` `[rows, n]` of 0s and 1s (f32), how many 1s each row holds up to and including each
/// column, `[rows, n]` (exact: counts below 2²⁴). `triangle` is [`triangle`]'s.
pub fn running_count(x: &Tensor, triangle: &Tensor) -> Result<Tensor> {
    let (rows, n) = x.dims2()?;
    let width = n.div_ceil(BLOCK) * BLOCK;
    let blocks = width / BLOCK;
    let within = pad(x, width - n, 0.0)?
        .reshape((rows * blocks, BLOCK))?
        .matmul(triangle)?
        .reshape((rows, blocks, BLOCK))?;
    let counts = if blocks == 1 {
        within
    } else {
        // Each block's total, carried into every later block.
        let totals = within.narrow(2, BLOCK - 1, 1)?.squeeze(2)?.contiguous()?; // [rows, blocks]
        let before = (totals.cumsum(1)? - &totals)?;
        within.broadcast_add(&before.unsqueeze(2)?)?
    };
    Ok(counts.reshape((rows, width))?.narrow(1, 0, n)?)
}

/// Which entries of each row of `scores` `[rows, n]` (f32) are its `k` highest among the first
/// `visible[r]` (ties to the lower index, −0.0 equal to 0.0): `[rows, n]`, 1.0 where taken and
/// 0.0 elsewhere (f32). `triangle` is [`triangle`]'s.
pub fn top_k_visible(
    scores: &Tensor,
    visible: &[usize],
    k: usize,
    triangle: &Tensor,
) -> Result<Tensor> {
    let (rows, n) = scores.dims2()?;
    let dev = scores.device();
    let limit = Tensor::new(
        visible.iter().map(|&v| v.min(n) as f32).collect::<Vec<_>>(),
        dev,
    )?
    .reshape((rows, 1))?;
    let iota = Tensor::arange(0u32, n as u32, dev)?
        .to_dtype(DType::F32)?
        .reshape((1, n))?;
    let seen = iota.broadcast_lt(&limit)?; // [rows, n] u8
    let seen_f = seen.to_dtype(DType::F32)?;
    if k == 0 {
        return Ok(seen_f.zeros_like()?);
    }
    // `+ 0.0` turns −0.0 (a negative head weight times a zero ReLU) into 0.0.
    let hidden = Tensor::full(f32::NEG_INFINITY, (rows, n), dev)?;
    let s = seen.where_cond(&(scores.to_dtype(DType::F32)? + 0.0)?, &hidden)?;
    let kth = kth_largest(&s, k)?; // [rows, 1]
    let above = s.broadcast_gt(&kth)?.to_dtype(DType::F32)?;
    let at = (s.broadcast_eq(&kth)?.to_dtype(DType::F32)? * &seen_f)?;
    // Of the entries at the k-th value, the first `k − above` of the row.
    let room = (above.sum_keepdim(D::Minus1)?.affine(-1.0, k as f64))?; // [rows, 1]
    let first = running_count(&at, triangle)?
        .broadcast_le(&room)?
        .to_dtype(DType::F32)?;
    Ok((above + (at * first)?)?)
}

/// The `k` entries [`top_k_visible`] picks from the row `x` `[n]` (f32), as their values and
/// their indices (f32, exact below 2²⁴), `[k]` each, highest first: the picked entries are kept
/// and every other made −∞, then rounds of chunk sorts carry the indices along with the values
/// down to the best `k`. (Where fewer than `k` entries exceed −∞, the −∞ ones that
/// fill the count may be others than the pick; their value is the same.) `k ≤ n`.
pub fn top_k_entries(x: &Tensor, k: usize, triangle: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = x.dim(0)?;
    let dev = x.device();
    let row = x.reshape((1, n))?;
    let picked = top_k_visible(&row, &[n], k, triangle)?;
    let hidden = Tensor::full(f32::NEG_INFINITY, (1, n), dev)?;
    let values = picked.ge(0.5)?.where_cond(&row, &hidden)?;
    let ids = Tensor::arange(0u32, n as u32, dev)?
        .to_dtype(DType::F32)?
        .reshape((1, n))?;
    let (values, ids) = best_by_chunks(&values, Some(&ids), k)?;
    let ids = ids.ok_or_else(|| anyhow::anyhow!("internal: the chunk sorts dropped the ids"))?;
    Ok((values.squeeze(0)?, ids.squeeze(0)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::lightning_indexer::top_k_visible as on_host;

    /// Against the host's sort, on rows with many ties (few distinct values, zeros of both
    /// signs), for k around the row lengths, the chunk size and the counting block.
    #[test]
    fn picks_what_the_host_sort_picks() {
        let dev = Device::Cpu;
        let tri = triangle(&dev).unwrap();
        for (n, ks) in [
            (7usize, vec![1, 3, 7, 9]),
            (1500, vec![1, 5, 512, 700, 1499]),
            (5000, vec![1, 64, 512, 1024, 3000]),
        ] {
            let rows: Vec<Vec<f32>> = (0..3u32)
                .map(|r| {
                    (0..n as u32)
                        .map(|i| match (i * 7919 + r * 13) % 11 {
                            0 => -0.0,
                            v if v < 4 => 0.0,
                            v => (v as f32 - 6.0) * 0.5,
                        })
                        .collect()
                })
                .collect();
            let visible = [n, n / 2 + 1, n.saturating_sub(3)];
            let flat: Vec<f32> = rows.concat();
            let scores = Tensor::from_vec(flat, (3, n), &dev).unwrap();
            for k in ks {
                let got = top_k_visible(&scores, &visible, k, &tri).unwrap();
                let got: Vec<Vec<f32>> = got.to_vec2().unwrap();
                for r in 0..3 {
                    let want = on_host(&rows[r], visible[r], k);
                    let picked: Vec<usize> = (0..n).filter(|&i| got[r][i] == 1.0).collect();
                    assert_eq!(picked, want, "n {n}, k {k}, row {r}");
                    assert!(got[r].iter().all(|&v| v == 0.0 || v == 1.0));
                }
            }
        }
    }

    /// The entries picked, with their ids: the host's top-k, ties to the lower id, values
    /// alongside, for rows shorter and longer than a chunk.
    #[test]
    fn entries_are_the_host_top_k_with_their_values() {
        let dev = Device::Cpu;
        let tri = triangle(&dev).unwrap();
        for (n, k) in [(50usize, 7usize), (3000, 64), (70_000, 64), (5000, 1000)] {
            let row: Vec<f32> = (0..n as u32)
                .map(|i| ((i * 7919) % 97) as f32 * 0.25 - 3.0)
                .collect();
            let x = Tensor::from_vec(row.clone(), n, &dev).unwrap();
            let (values, ids) = top_k_entries(&x, k, &tri).unwrap();
            let (values, ids): (Vec<f32>, Vec<f32>) =
                (values.to_vec1().unwrap(), ids.to_vec1().unwrap());
            let mut got: Vec<(usize, f32)> = ids.iter().map(|&i| i as usize).zip(values).collect();
            got.sort_by_key(|p| p.0);
            let want: Vec<(usize, f32)> = on_host(&row, n, k)
                .into_iter()
                .map(|i| (i, row[i]))
                .collect();
            assert_eq!(got, want, "n {n}, k {k}");
        }
    }

    #[test]
    fn running_count_carries_across_blocks() {
        let dev = Device::Cpu;
        let n = 2 * BLOCK + 5;
        let x: Vec<f32> = (0..n).map(|i| ((i % 3) == 0) as u8 as f32).collect();
        let got: Vec<Vec<f32>> = running_count(
            &Tensor::from_vec(x.clone(), (1, n), &dev).unwrap(),
            &triangle(&dev).unwrap(),
        )
        .unwrap()
        .to_vec2()
        .unwrap();
        let mut sum = 0.0;
        for (i, v) in x.iter().enumerate() {
            sum += v;
            assert_eq!(got[0][i], sum, "column {i}");
        }
    }
}
