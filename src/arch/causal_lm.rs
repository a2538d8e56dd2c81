//! The contract a family fulfils: [`CausalLm`], what the generation loop (`generate/`), chat
//! and the tests drive. It lives with the families so the arrows run one way: `generate`
//! depends on `arch`, never the reverse.

use super::config::{ParseOptions, TextConfig};
use super::{ArchSpec, Family};
use crate::layers::kv_store::KvStore;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

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

    /// The input embeddings of `tokens` as the first layer sees them, `[1, n, hidden]`: what a
    /// drafter that reads this model takes in (a Gemma 4 assistant, an MTP head). Families
    /// whose drafters need none refuse.
    fn input_embedding(&self, _tokens: &[u32]) -> Result<Tensor> {
        bail!(
            "the {} family gives no input embeddings to a drafter",
            self.spec().family
        )
    }

    /// The output head over normed hidden states `[n, hidden]` → logits `[n, vocab]` in f32:
    /// for a drafter that shares the target's head (an MTP head).
    fn output_head(&self, _h: &Tensor) -> Result<Tensor> {
        bail!(
            "the {} family lends its output head to no drafter",
            self.spec().family
        )
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

    /// Hidden states `[1, n, hidden]` → f32 logits `[rows, vocab]` through `head` (what the
    /// family applies: final norm, output head, soft-cap). `Rows::None` runs nothing and gives an
    /// empty host tensor: a prefill chunk before the last needs no logits, and a GPU refuses a
    /// kernel launched over no elements (`CUDA_ERROR_INVALID_VALUE`).
    pub fn logits(
        self,
        h: &Tensor,
        vocab: usize,
        head: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if self == Rows::None {
            return Ok(Tensor::zeros((0, vocab), DType::F32, &Device::Cpu)?);
        }
        Ok(head(&self.select(h)?)?.squeeze(0)?.to_dtype(DType::F32)?)
    }
}

/// A family's network as the registry builds it: from the family's one parse (the per-layer
/// table and the runtime config) and the weights. `from_config` and the registry's `build` are
/// written once, here.
pub trait FamilyModel: CausalLm + Sized + 'static {
    /// What the network needs beyond the per-layer table.
    type Config;

    /// The family it belongs to.
    fn family() -> &'static Family;

    /// The family's parse: the text config into the table and the runtime config.
    fn parse(text: &TextConfig) -> Result<(ArchSpec, Self::Config)>;

    /// Build the network for `spec` and `cfg` (what [`Self::parse`] gave: the family's own
    /// types, so no other family's table arrives here) from `vb`, positioned at the text-model
    /// root, in `vb`'s dtype and device; `lm_head` is positioned at the untied output head (read
    /// only when the config unties it).
    fn new(
        spec: ArchSpec,
        cfg: Self::Config,
        vb: VarBuilder,
        lm_head: Option<VarBuilder>,
    ) -> Result<Self>;

    /// Parse `config.json` (bare or multimodal wrapper) and build from `vb` as [`Self::new`]
    /// does; a config of another family is refused.
    fn from_config(
        raw: &Value,
        opts: &ParseOptions,
        vb: VarBuilder,
        lm_head: Option<VarBuilder>,
    ) -> Result<Self> {
        let (spec, cfg) = super::parse_for_family(raw, opts, Self::family(), Self::parse)?;
        Self::new(spec, cfg, vb, lm_head)
    }
}

/// The registry's [`Family::build`] for the network `M`.
pub fn build<M: FamilyModel>(
    raw: &Value,
    opts: &ParseOptions,
    vb: VarBuilder<'static>,
    lm_head: Option<VarBuilder<'static>>,
) -> Result<Box<dyn CausalLm>> {
    Ok(Box::new(M::from_config(raw, opts, vb, lm_head)?))
}
