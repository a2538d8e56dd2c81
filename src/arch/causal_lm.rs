//! The contract a family fulfils: [`CausalLm`], what the generation loop (`generate/`), chat
//! and the tests drive. It lives with the families so the arrows run one way: `generate`
//! depends on `arch`, never the reverse.

use super::ArchSpec;
use crate::layers::kv_store::KvStore;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// A causal language model the generation loop can drive. Families implement it.
pub trait CausalLm {
    /// The per-layer table the model was built from.
    fn spec(&self) -> &ArchSpec;

    /// An empty cache shaped for this model (as its per-layer table says).
    fn new_cache(&self) -> KvStore {
        super::blocks::kv_store_for(self.spec())
    }

    /// Feed `tokens` (batch 1) at positions `cache.seen()..`, update `cache`, and return the
    /// logits of the fed positions `rows` asks for, `[rows, vocab]` in f32.
    fn forward_logits(&self, tokens: &[u32], cache: &mut KvStore, rows: Rows) -> Result<Tensor>;

    /// The logits of every fed position, `[tokens.len(), vocab]`.
    fn forward(&self, tokens: &[u32], cache: &mut KvStore) -> Result<Tensor> {
        self.forward_logits(tokens, cache, Rows::All)
    }

    /// Only the last position's logits, `[1, vocab]`: all generation needs, and it skips the
    /// output head for the rest of a prompt.
    fn forward_last(&self, tokens: &[u32], cache: &mut KvStore) -> Result<Tensor> {
        self.forward_logits(tokens, cache, Rows::Last)
    }
}

/// Refuse a chunk no model can take: empty, or with an id outside the `vocab`-row embedding.
pub fn check_tokens(tokens: &[u32], vocab: usize) -> Result<()> {
    if tokens.is_empty() {
        bail!("no tokens to feed the model");
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary ({vocab} tokens)");
    }
    Ok(())
}

/// Which positions' logits a forward returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    All,
    Last,
    /// None: the forward only fills the cache (a prefill chunk before the last).
    None,
}

impl Rows {
    /// Narrow hidden states `[b, n, hidden]` to the rows wanted.
    pub fn select(self, h: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Rows::All => h.clone(),
            Rows::Last => {
                let n = h.dim(1)?;
                h.narrow(1, n - 1, 1)?
            }
            Rows::None => h.narrow(1, 0, 0)?,
        })
    }
}
