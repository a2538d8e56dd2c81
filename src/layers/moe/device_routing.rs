//! Routing that stays on the device: each token's top-k experts chosen, weighed and dispatched
//! with tensor ops only, so a GPU decode step reads nothing back per MoE layer.
//!
//! **Top-k without a sort.** candle's GPU sort is a bitonic sort (not stable), and the CPU rule is
//! "highest first, ties to the lower index". Here an expert's *rank* is the number of experts that
//! beat it (a higher key, or an equal key at a lower index), computed by comparing all pairs
//! (`[tokens, E, E]`: 64 K comparisons a token for 256 experts); the expert of rank `s` fills slot
//! `s`, picked out by a one-hot product. The ranks are exact integers in f32, so the choice is
//! the CPU's, ties included.
//!
//! **Experts gathered.** Each token's k experts' matrices are gathered (`index_select` on the
//! packed `[E, out, in]` tensors) and multiplied as one batched product: no per-expert token
//! lists built on the host. Gathering copies the chosen experts' weights, so it serves decode
//! steps and verify passes ([`crate::layers::DEVICE_STEP_ROWS`] rows); longer prompt chunks route on the host, one
//! read-back per layer per chunk.

use super::Picks;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// Each token's experts and weights as device tensors.
#[derive(Debug, Clone)]
pub struct DevicePicks {
    /// `[tokens, k]` u32: expert ids, every one a valid expert.
    pub ids: Tensor,
    /// `[tokens, k]` f32: the weights (0 for a dropped pick, such as ZAYA's skip class).
    pub weights: Tensor,
}

impl DevicePicks {
    /// The picks read back, a zero-weight pick (a dropped one) left out.
    pub fn to_host(&self) -> Result<Vec<Picks>> {
        let ids: Vec<Vec<u32>> = self.ids.to_vec2()?;
        let weights: Vec<Vec<f32>> = self.weights.to_vec2()?;
        Ok(ids
            .iter()
            .zip(&weights)
            .map(|(ids, ws)| {
                ids.iter()
                    .zip(ws)
                    .filter(|(_, &w)| w != 0.0)
                    .map(|(&e, &w)| (e as usize, w))
                    .collect()
            })
            .collect())
    }
}

/// A router's choice: read back to the host (expert by expert dispatch), or kept on the device.
#[derive(Debug, Clone)]
pub enum Routing {
    Host(Vec<Picks>),
    Device(DevicePicks),
}

/// The constants of a top-k over `experts` keys, made once on the device.
#[derive(Debug)]
pub struct TopK {
    k: usize,
    experts: usize,
    /// `[E, E]` f32: 1 where `y < x` (expert y wins a tie against expert x).
    lower: Tensor,
    /// `[1, 1, E]` f32: 0, 1, …, E-1.
    iota: Tensor,
    /// `[1, k, 1]` f32: 0, 1, …, k-1.
    slots: Tensor,
}

impl TopK {
    pub fn new(k: usize, experts: usize, device: &Device) -> Result<Self> {
        let lower: Vec<f32> = (0..experts * experts)
            .map(|i| f32::from(u8::from(i % experts < i / experts)))
            .collect();
        Ok(TopK {
            k,
            experts,
            lower: Tensor::from_vec(lower, (experts, experts), device)?,
            iota: Tensor::arange(0u32, experts as u32, device)?
                .to_dtype(DType::F32)?
                .reshape((1, 1, experts))?,
            slots: Tensor::arange(0u32, k as u32, device)?
                .to_dtype(DType::F32)?
                .reshape((1, k, 1))?,
        })
    }

    /// `key` `[tokens, E]` (f32) → the one-hot choice `[tokens, k, E]` (f32): slot `s` marks the
    /// expert ranked `s` (highest key first, ties to the lower index).
    pub fn choose(&self, key: &Tensor) -> Result<Tensor> {
        let (n, e) = key.dims2()?;
        if e != self.experts {
            anyhow::bail!("internal: top-k over {e} keys, built for {}", self.experts);
        }
        let mine = key.unsqueeze(2)?.broadcast_as((n, e, e))?; // [n, x, y] = key[x]
        let theirs = key.unsqueeze(1)?.broadcast_as((n, e, e))?; // [n, x, y] = key[y]
        let higher = theirs.gt(&mine)?.to_dtype(DType::F32)?;
        let tie_won = theirs
            .eq(&mine)?
            .to_dtype(DType::F32)?
            .broadcast_mul(&self.lower)?;
        let rank = (higher + tie_won)?.sum(2)?; // [n, E]: how many beat each expert
        Ok(rank
            .unsqueeze(1)?
            .broadcast_eq(&self.slots)?
            .to_dtype(DType::F32)?) // [n, k, E]
    }

    /// The chosen experts' ids `[tokens, k]` (u32) from [`Self::choose`]'s one-hot.
    pub fn ids(&self, onehot: &Tensor) -> Result<Tensor> {
        Ok(onehot
            .broadcast_mul(&self.iota)?
            .sum(2)?
            .to_dtype(DType::U32)?)
    }

    /// `values` `[tokens, E]` (f32) at the chosen experts → `[tokens, k]`: exact (one term of
    /// each sum is not zero).
    pub fn take(&self, onehot: &Tensor, values: &Tensor) -> Result<Tensor> {
        Ok(onehot.broadcast_mul(&values.unsqueeze(1)?)?.sum(2)?)
    }

    pub fn k(&self) -> usize {
        self.k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU routers' rule: indices by key, highest first, ties to the lower index.
    fn host_top_k(key: &[f32], k: usize) -> Vec<u32> {
        let mut idx: Vec<usize> = (0..key.len()).collect();
        idx.sort_by(|&a, &b| key[b].total_cmp(&key[a]).then(a.cmp(&b)));
        idx.into_iter().take(k).map(|i| i as u32).collect()
    }

    #[test]
    fn top_k_equals_the_host_rule_with_ties() {
        let dev = Device::Cpu;
        let (n, e, k) = (7, 12, 4);
        // Few distinct values: most rows hold ties, some across the k-th place.
        let mut state = 0x2545_f491u32;
        let keys: Vec<f32> = (0..n * e)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                ((state >> 16) % 5) as f32 * 0.25 - 0.5
            })
            .collect();
        let key = Tensor::from_vec(keys.clone(), (n, e), &dev).unwrap();
        let top = TopK::new(k, e, &dev).unwrap();
        let onehot = top.choose(&key).unwrap();
        let ids: Vec<Vec<u32>> = top.ids(&onehot).unwrap().to_vec2().unwrap();
        let taken: Vec<Vec<f32>> = top.take(&onehot, &key).unwrap().to_vec2().unwrap();
        let mut tied_rows = 0;
        for (r, row) in keys.chunks(e).enumerate() {
            let want = host_top_k(row, k);
            assert_eq!(ids[r], want, "row {r}: {row:?}");
            let values: Vec<f32> = want.iter().map(|&i| row[i as usize]).collect();
            assert_eq!(taken[r], values, "row {r}");
            tied_rows += usize::from(row.iter().filter(|&&v| v == values[k - 1]).count() > 1);
        }
        assert!(
            tied_rows >= 3,
            "only {tied_rows} rows tie at the k-th place"
        );
    }
}
