//! `--draft` and `--draft-tokens` (on `run` and `chat`): which drafter proposes tokens for the
//! target to verify (see `generate::speculative`), and how many per step.

use super::Ctx;
use crate::arch::ArchSpec;
use crate::generate::ngram::NgramDrafter;
use crate::generate::Drafter;
use anyhow::Result;

/// Drafts per step for `--draft ngram` when `--draft-tokens` is not given.
pub const NGRAM_DEFAULT_TOKENS: usize = 4;

/// The most drafts one verify pass may judge.
pub const MAX_DRAFT_TOKENS: usize = 64;

/// Speculative-decoding flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DraftArgs {
    /// Speculative decoding: `ngram` (prompt lookup: the continuation of the latest earlier
    /// match of the last tokens), `mtp` (the checkpoint's own multi-token-prediction layers),
    /// or a Gemma 4 assistant drafter (alias such as `gemma4-e2b-assistant`, Hub repo or
    /// folder). The output is the target's either way; only the speed changes.
    #[arg(long, value_name = "DRAFTER")]
    pub draft: Option<String>,
    /// Tokens drafted per verify step (default: the assistant's `num_assistant_tokens` from
    /// its generation_config.json; 4 for ngram).
    #[arg(long, value_name = "N")]
    pub draft_tokens: Option<usize>,
}

/// A drafter ready to run and the tokens it drafts per step.
pub struct Draft {
    pub drafter: Box<dyn Drafter>,
    pub tokens: usize,
}

impl DraftArgs {
    /// The drafter the flags ask for (`None` without `--draft`), checked against `target`.
    pub fn build(&self, _ctx: &Ctx, target: &ArchSpec) -> Result<Option<Draft>> {
        let tokens = match self.draft_tokens {
            Some(n) if self.draft.is_none() => {
                crate::usage!("--draft-tokens {n} needs --draft (ngram, mtp or an assistant model)")
            }
            Some(0) => crate::usage!("--draft-tokens must be at least 1"),
            Some(n) if n > MAX_DRAFT_TOKENS => {
                crate::usage!("--draft-tokens {n}: at most {MAX_DRAFT_TOKENS}")
            }
            n => n,
        };
        let Some(which) = self.draft.as_deref() else {
            return Ok(None);
        };
        match which {
            "ngram" => Ok(Some(Draft {
                drafter: Box::new(NgramDrafter),
                tokens: tokens.unwrap_or(NGRAM_DEFAULT_TOKENS),
            })),
            "mtp" => crate::usage!(
                "--draft mtp: {} has no runnable multi-token-prediction head in llmarch (its MTP layers are listed, not run)\nhint: --draft ngram works for every model",
                target.family
            ),
            other => crate::usage!(
                "--draft {other}: not a drafter llmarch knows\nhint: --draft ngram, or a Gemma 4 assistant (gemma4-e2b-assistant, a Hub repo or a folder)"
            ),
        }
    }
}
