//! A Gemma 4 assistant as a [`Drafter`]: it reads the target's cache and last hidden state
//! through the [`DraftContext`] (see `arch::gemma4::assistant`), drafts greedily, and can keep
//! the logits of every token it drafted (`--draft-logits-out`).

use super::speculative::{DraftContext, Drafter};
use crate::arch::gemma4::assistant::Gemma4Assistant;
use anyhow::{anyhow, Result};
use candle_core::Tensor;

pub struct AssistantDrafter {
    pub model: Gemma4Assistant,
    /// For reports: the alias, repo or folder it came from.
    pub name: String,
    /// With `Some`: every drafted token's logits `[vocab]`, in the order drafted.
    pub logits: Option<Vec<Tensor>>,
}

impl Drafter for AssistantDrafter {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn reads_layers(&self) -> Vec<usize> {
        self.model.reads()
    }

    fn draft(&mut self, ctx: DraftContext, n: usize) -> Result<Vec<u32>> {
        let last = *ctx
            .history
            .last()
            .ok_or_else(|| anyhow!("internal: nothing to draft after"))?;
        let drafted = self.model.draft(ctx.target, ctx.cache, last, n)?;
        let ids = drafted.iter().map(|d| d.id).collect();
        if let Some(rows) = self.logits.as_mut() {
            rows.extend(drafted.into_iter().map(|d| d.logits));
        }
        Ok(ids)
    }

    fn drafted_logits(&self) -> Option<&[Tensor]> {
        self.logits.as_deref()
    }
}
