//! A checkpoint's own multi-token-prediction head as a [`Drafter`] (`--draft mtp`; Qwen3.5 /
//! Qwen3.6, see `arch::qwen3_5::mtp`).
//!
//! Notable:
//! - The head's cache is a slot of the target's [`KvStore`], and the target leaves the normed
//!   hidden state and token of every position it is fed ([`KvStore::keep_hidden_rows`]).
//! - Each draft first catches the head's cache up, in one forward, on every position fed since
//!   the last draft (the prompt, then each verified step), pairing position `p`'s hidden state
//!   with the token at `p + 1`: the last of those is the token about to be verified. Its output
//!   gives the first draft, as vLLM's proposer does.
//! - Further drafts feed the head its own output at the next positions; their cache rows are
//!   rolled back before returning, so the head's cache only ever holds rows made from the
//!   target's own hidden states. Drafting is greedy (a point mass for the acceptance rule).

use super::speculative::{DraftContext, Drafter};
use crate::arch::qwen3_5::mtp::Qwen3_5Mtp;
use crate::layers::kv_store::KvStore;
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Tensor};

pub struct MtpDrafter {
    pub head: Qwen3_5Mtp,
    /// With `Some`: every drafted token's logits `[vocab]`, in the order drafted.
    pub logits: Option<Vec<Tensor>>,
}

impl MtpDrafter {
    /// Rows the head's cache holds.
    fn cached(&self, cache: &KvStore) -> Result<usize> {
        Ok(
            match cache.layer(self.head.slot()).and_then(|l| l.k.as_ref()) {
                Some(k) => k.dim(2)?,
                None => 0,
            },
        )
    }
}

impl Drafter for MtpDrafter {
    fn name(&self) -> String {
        "mtp".into()
    }

    fn prepare(&mut self, cache: &mut KvStore) -> Result<()> {
        if cache.layer(self.head.slot()).is_none() {
            if cache.seen() > 0 {
                bail!("internal: the MTP head joined a cache that already holds tokens");
            }
            cache.add_full_layer(self.head.slot());
        }
        cache.keep_hidden_rows();
        Ok(())
    }

    fn drafted_logits(&self) -> Option<&[Tensor]> {
        self.logits.as_deref()
    }

    fn draft(&mut self, ctx: DraftContext, n: usize) -> Result<Vec<u32>> {
        let (target, cache) = (ctx.target, ctx.cache);
        let last = *ctx
            .history
            .last()
            .ok_or_else(|| anyhow!("internal: nothing to draft after"))?;
        let seen = cache.seen();
        let from = self.cached(cache)?;
        let rows = cache
            .take_hidden_rows()?
            .filter(|r| !r.ids.is_empty())
            .ok_or_else(|| {
                anyhow!("internal: the target left no hidden states for the MTP head")
            })?;
        if from + rows.ids.len() != seen {
            bail!(
                "internal: the MTP head holds {from} positions and got {} more, but the target has seen {seen}",
                rows.ids.len()
            );
        }
        // 1. Catch up on positions from..seen: hidden[p] with the token at p + 1. [t, hidden]
        let next: Vec<u32> = rows.ids[1..].iter().copied().chain([last]).collect();
        let e = target.input_embedding(&next)?.squeeze(0)?;
        let out = self.head.forward(&e, &rows.h, from, cache)?;
        let mut h = out.narrow(0, out.dim(0)? - 1, 1)?; // [1, hidden]
                                                        // 2. Draft; the rows of drafted positions are dropped afterwards.
        let checkpoint = cache.checkpoint();
        let mut drafted = Vec::with_capacity(n);
        for j in 0..n {
            if j > 0 {
                let e = target.input_embedding(&drafted[j - 1..j])?.squeeze(0)?;
                h = self.head.forward(&e, &h, seen - 1 + j, cache)?;
            }
            let logits = target
                .output_head(&h)?
                .flatten_all()?
                .to_dtype(DType::F32)?;
            drafted.push(logits.argmax(0)?.to_scalar::<u32>()?);
            if let Some(kept) = self.logits.as_mut() {
                kept.push(logits);
            }
        }
        cache.rollback(&checkpoint)?;
        Ok(drafted)
    }
}
