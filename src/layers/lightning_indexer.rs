//! The lightning indexer of DeepSeek V4's compressed sparse attention (CSA): it picks, for each
//! query, the `top_k` compressed entries the query attends. Reference: transformers 5.23.0
//! `DeepseekV4Indexer` and `DeepseekV4IndexerScorer`.
//!
//! The indexer keeps its own compressed keys (a [`TokenCompressor`] with overlapping series at
//! `index_head_dim`), and scores entry `s` for the query at token `t` as
//! `Σ_h w_{t,h} · ReLU(q_{t,h} · k_s) · index_head_dim^-½`, with `q_t` = `q_b_proj` of the
//! attention's low-rank query (rotated by the compress RoPE at the token's position) and
//! `w_t` = `weights_proj(x_t) · index_n_heads^-½`.
//!
//! **The selection, by definition**: a query at position `p` may see the entries whose window is
//! complete by then (`s < (p + 1) / ratio`); it attends the `top_k` of those by score, ties to
//! the lower index. Prefill and decode both select this way, so they agree. On the CPU the
//! scores are read and sorted ([`top_k_visible`]); on a GPU (and the generic path) the same set
//! is found where the scores lie ([`LightningIndexer::select_mask`], [`top_k`]): no read-back.
//!
//! The reference does not quite: it takes `torch.topk` over *all* entries (those not yet visible
//! masked to −∞). The ReLU makes every entry whose head scores are all negative score exactly 0,
//! so once there are more visible entries than `top_k` the k-th place is often a tie among 0.0
//! scores, and `torch.topk` breaks ties in an order that depends on the row length. A full
//! forward, a forward over a prefix and cached decoding see rows of different lengths, so they
//! can pick different entries for the same query and give different logits. With `top_k` ≥ the
//! visible entries there is nothing to choose and the reference agrees with itself (and llmarch).

use super::kv_store::LayerKv;
use super::linear::Linear;
use super::rope::InterleavedRope;
use super::token_compressor::TokenCompressor;
use super::top_k;
use anyhow::Result;
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

/// Queries scored at once.
const QUERY_BLOCK: usize = 256;

#[derive(Debug)]
pub struct LightningIndexer {
    keys: TokenCompressor,
    q_b_proj: Linear,
    weights_proj: Linear,
    heads: usize,
    head_dim: usize,
    top_k: usize,
    rope: Arc<InterleavedRope>,
    /// [`top_k::triangle`] on the model's device, made on first use by [`Self::select_mask`].
    triangle: std::sync::OnceLock<Tensor>,
}

/// What the indexer chose for a chunk's queries, with the scores it chose by.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Per query, the entries it attends, ascending.
    pub picks: Vec<Vec<usize>>,
    /// Per query, the score of every entry made so far (visible or not).
    pub scores: Vec<Vec<f32>>,
}

impl LightningIndexer {
    /// Reads under `vb` (the reference's `compressor.indexer`): the key compressor (`kv_proj`,
    /// `gate_proj`, `position_bias`, `kv_norm`), `q_b_proj` `[heads·head_dim, q_lora_rank]` and
    /// `scorer.weights_proj` `[heads, hidden]`.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        vb: &VarBuilder,
        keys: TokenCompressor,
        hidden: usize,
        q_lora_rank: usize,
        heads: usize,
        head_dim: usize,
        top_k: usize,
        rope: Arc<InterleavedRope>,
    ) -> Result<Self> {
        Ok(LightningIndexer {
            keys,
            q_b_proj: Linear::load(&vb.pp("q_b_proj"), q_lora_rank, heads * head_dim, false)?,
            weights_proj: Linear::load_unquantized(
                &vb.pp("scorer").pp("weights_proj"),
                hidden,
                heads,
                false,
            )?,
            heads,
            head_dim,
            top_k,
            rope,
            triangle: Default::default(),
        })
    }

    /// For the chunk `x` `[n, hidden]` (low-rank queries `q_residual` `[n, q_lora_rank]`) at
    /// `positions`: update the indexer's keys in `cache` and choose each query's entries, on the
    /// host (the scores are read back).
    pub fn select(
        &self,
        x: &Tensor,
        q_residual: &Tensor,
        positions: &[usize],
        cache: &mut LayerKv,
    ) -> Result<Selection> {
        let n = x.dim(0)?;
        let Some(scores) = self.scores(x, q_residual, positions, cache)? else {
            return Ok(Selection {
                picks: vec![vec![]; n],
                scores: vec![vec![]; n],
            });
        };
        let scores: Vec<Vec<f32>> = scores.to_vec2()?;
        let ratio = self.keys.ratio();
        let picks = scores
            .iter()
            .zip(positions)
            .map(|(row, &p)| top_k_visible(row, (p + 1) / ratio, self.top_k))
            .collect();
        Ok(Selection { picks, scores })
    }

    /// [`Self::select`] where the scores lie, nothing read back ([`crate::layers::top_k`]): the
    /// additive mask `[n, entries]` (f32: 0 where a query attends an entry, −∞ elsewhere);
    /// `None` before the first entry.
    pub fn select_mask(
        &self,
        x: &Tensor,
        q_residual: &Tensor,
        positions: &[usize],
        cache: &mut LayerKv,
    ) -> Result<Option<Tensor>> {
        let Some(scores) = self.scores(x, q_residual, positions, cache)? else {
            return Ok(None);
        };
        let ratio = self.keys.ratio();
        let visible: Vec<usize> = positions.iter().map(|&p| (p + 1) / ratio).collect();
        let triangle = super::once(&self.triangle, || top_k::triangle(x.device()))?;
        let picked = top_k::top_k_visible(&scores, &visible, self.top_k, triangle)?;
        let hidden = Tensor::full(f32::NEG_INFINITY, picked.shape(), x.device())?;
        Ok(Some(
            picked.ge(0.5)?.where_cond(&picked.zeros_like()?, &hidden)?,
        ))
    }

    /// Update the indexer's keys in `cache` with the chunk and score every entry made so far
    /// for each query: `[n, entries]` f32; `None` before the first entry.
    fn scores(
        &self,
        x: &Tensor,
        q_residual: &Tensor,
        positions: &[usize],
        cache: &mut LayerKv,
    ) -> Result<Option<Tensor>> {
        let n = x.dim(0)?;
        let keys = self.keys.forward(x, cache)?.to_dtype(DType::F32)?; // [T, hd]
        let entries = keys.dim(0)?;
        if entries == 0 {
            return Ok(None);
        }
        // 1. Queries, rotated at the tokens' positions. [n, heads, hd]
        let q = self
            .q_b_proj
            .forward(q_residual)?
            .reshape((1, n, self.heads, self.head_dim))?
            .transpose(1, 2)?;
        let q = self.rope.apply(&q, positions, false)?; // [1, heads, n, hd]
        let q = q.squeeze(0)?.transpose(0, 1)?.to_dtype(DType::F32)?;
        let w =
            (self.weights_proj.forward(x)?.to_dtype(DType::F32)? * (self.heads as f64).powf(-0.5))?; // [n, heads]

        // 2. Scores: Σ_h w_h · ReLU(q_h·k) · hd^-½, queries in blocks (the per-head scores of a
        //    long prompt would be large). [n, T]
        let keys_t = keys.t()?;
        let mut blocks = Vec::with_capacity(n.div_ceil(QUERY_BLOCK));
        for start in (0..n).step_by(QUERY_BLOCK) {
            let m = QUERY_BLOCK.min(n - start);
            let qb = q
                .narrow(0, start, m)?
                .contiguous()?
                .reshape((m * self.heads, self.head_dim))?;
            let s = qb.matmul(&keys_t)?.relu()?; // [m·heads, T]
            let s = (s * (self.head_dim as f64).powf(-0.5))?.reshape((m, self.heads, entries))?;
            let wb = w.narrow(0, start, m)?.unsqueeze(2)?;
            blocks.push(s.broadcast_mul(&wb)?.sum(1)?);
        }
        Ok(Some(if blocks.len() == 1 {
            blocks.pop().expect("one block")
        } else {
            Tensor::cat(&blocks, 0)?
        }))
    }
}

/// The `k` highest of `scores[..visible]` (ties to the lower index; −0.0 ties with 0.0),
/// ascending.
pub fn top_k_visible(scores: &[f32], visible: usize, k: usize) -> Vec<usize> {
    let visible = visible.min(scores.len());
    let mut idx: Vec<usize> = (0..visible).collect();
    if k < visible {
        // `+ 0.0` turns −0.0 (a negative head weight times a zero ReLU) into 0.0.
        let key = |i: usize| scores[i] + 0.0;
        idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
        idx.truncate(k);
        idx.sort_unstable();
    }
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_among_visible_ties_to_lower_index() {
        let s = [0.0, 2.0, -0.0, 0.0, 5.0, 9.0];
        assert_eq!(top_k_visible(&s, 5, 2), vec![1, 4]);
        assert_eq!(top_k_visible(&s, 5, 3), vec![0, 1, 4]);
        assert_eq!(top_k_visible(&[-0.0, 0.0, 1.0], 3, 2), vec![0, 2]);
        assert_eq!(top_k_visible(&s, 2, 3), vec![0, 1]);
        assert_eq!(top_k_visible(&s, 0, 3), Vec::<usize>::new());
        assert_eq!(top_k_visible(&s, 6, 1), vec![5]);
    }
}
