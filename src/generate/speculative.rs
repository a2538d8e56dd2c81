//! Speculative decoding: a drafter proposes tokens, the target verifies them all in one
//! forward, and the cache rolls back to what was accepted.
//!
//! Notable:
//! - One verify pass feeds `[last token, d1..dN]` and returns N+1 rows of logits: row j is the
//!   target's distribution for the token after `d1..dj`, so a fully accepted draft also yields
//!   the next token's distribution for free.
//! - Acceptance keeps the target's distribution exactly. Drafters here propose deterministically
//!   (a point mass q on each drafted token d), so the speculative-sampling rule
//!   accept-with-min(1, p/q) becomes accept with probability p(d), where p is the distribution
//!   the sampler would draw from (penalty, temperature, truncations applied); a rejection draws
//!   from the normalised residual max(0, p − q), which is p with d removed. Greedy (p a point
//!   mass) is then an exact prefix match, with the target's argmax after the first mismatch.
//! - The pass runs under [`crate::kernels::as_decode_steps`]: every row gets the bits a decode
//!   step at its position would give (weight products in the one-row gemv's order, attention
//!   row by row), so the drafts are judged by plain decoding's logits.
//! - After a rejection, where the cache is only rows (Gemma 4, Laguna),
//!   [`KvStore::keep_prefix`] keeps the accepted rows of the pass: byte-identical to decoding
//!   the accepted tokens one at a time, for free. Where a layer keeps states (DeltaNet and
//!   convolution states, CCA's delayed values, DeepSeek V4's open compression window and
//!   indexer entries), [`KvStore::checkpoint`] before the pass and [`KvStore::rollback`] after
//!   it, then the accepted tokens are fed again in one chunk: a state cannot be cut back to an
//!   earlier position.

use super::sampler::Sampler;
use crate::arch::CausalLm;
use crate::layers::kv_store::KvStore;
use anyhow::Result;

/// What a drafter sees when asked for a draft.
pub struct DraftContext<'a> {
    /// Every token of the sequence; the last one is not yet fed to the target.
    pub history: &'a [u32],
    /// The target and its cache (which holds every token of `history` but the last). A
    /// drafter may add to the cache while it drafts but must leave the target's layers and
    /// `seen` as they were.
    pub target: &'a dyn CausalLm,
    pub cache: &'a mut KvStore,
}

/// Proposes tokens for the target to verify.
pub trait Drafter {
    /// A short name for reports (`ngram`, the assistant's name).
    fn name(&self) -> String;

    /// Target layers whose caches the drafter reads (none for a drafter without a network).
    fn reads_layers(&self) -> Vec<usize> {
        vec![]
    }

    /// The logits of every token drafted so far, when the drafter keeps them (an assistant
    /// asked for `--draft-logits-out`).
    fn drafted_logits(&self) -> Option<&[candle_core::Tensor]> {
        None
    }

    /// Called before the prompt is fed (every turn of a chat): a drafter that needs more of the
    /// cache than the target keeps asks for it here.
    fn prepare(&mut self, _cache: &mut KvStore) -> Result<()> {
        Ok(())
    }

    /// Up to `n` tokens to follow `ctx.history` (fewer or none when it has no guess).
    fn draft(&mut self, ctx: DraftContext, n: usize) -> Result<Vec<u32>>;
}

/// The drafter and how many tokens it proposes per target step.
pub struct Drafting<'d> {
    pub drafter: &'d mut dyn Drafter,
    pub tokens: usize,
}

/// The verdict on one drafted token `d` given the target's logits row for its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Rejected: this token (drawn from the residual) comes instead.
    Reject(u32),
}

/// Accept `d` with probability p(d) under the sampler's distribution for `logits` after
/// `history`; else draw from p with `d` removed (renormalised).
pub fn judge(sampler: &mut Sampler, logits: &[f32], history: &[u32], d: u32) -> Verdict {
    let p = sampler.distribution(logits, history);
    let pd = p.prob(d);
    if pd >= 1.0 || (pd > 0.0 && sampler.uniform() < pd) {
        return Verdict::Accept;
    }
    match p.without(d) {
        Some(rest) => Verdict::Reject(sampler.draw(&rest)),
        // Nothing but d has weight (p(d) rounded below 1): d it is.
        None => Verdict::Accept,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::sampler::Sampling;

    #[test]
    fn greedy_accepts_exactly_the_argmax() {
        let mut s = Sampler::new(Sampling::default());
        let row = [0.1, 2.0, 1.9];
        assert_eq!(judge(&mut s, &row, &[], 1), Verdict::Accept);
        assert_eq!(judge(&mut s, &row, &[], 2), Verdict::Reject(1));
        assert_eq!(judge(&mut s, &row, &[], 0), Verdict::Reject(1));
    }

    /// Whatever the draft, accepted-or-resampled tokens follow p: here p = softmax([0, ln 2,
    /// ln 3, −∞...]) = (1/6, 2/6, 3/6), with every draft token tried (a bad drafter too). 60 000
    /// draws per draft; the χ² statistic with 2 degrees of freedom exceeds 13.8 with
    /// probability 0.001 when the rule is right (a fixed seed: it either always passes or not).
    #[test]
    fn accept_or_resample_keeps_the_targets_distribution() {
        let row = [0.0, 2f32.ln(), 3f32.ln(), f32::NEG_INFINITY];
        let want = [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0, 0.0];
        for d in 0..4u32 {
            let mut s = Sampler::new(Sampling {
                temperature: 1.0,
                seed: 11 + d as u64,
                ..Default::default()
            });
            let n = 60_000;
            let mut counts = [0usize; 4];
            for _ in 0..n {
                let t = match judge(&mut s, &row, &[], d) {
                    Verdict::Accept => d,
                    Verdict::Reject(t) => t,
                };
                counts[t as usize] += 1;
            }
            assert_eq!(counts[3], 0, "draft {d}: a zero-probability token came out");
            let chi2: f64 = (0..3)
                .map(|i| {
                    let e = want[i] * n as f64;
                    (counts[i] as f64 - e).powi(2) / e
                })
                .sum();
            assert!(chi2 < 13.8, "draft {d}: {counts:?}, χ² = {chi2:.1}");
        }
    }
}
