//! Qwen3.5 / Qwen3.6's multi-token-prediction (MTP) head, run as a drafter (`--draft mtp`).
//!
//! transformers 5.23.0 does not build it (it drops the `mtp.*` weights on load), so the
//! semantics are pinned to vLLM's `model_executor/models/qwen3_5_mtp.py`
//! (`Qwen3_5MultiTokenPredictor`) and its MTP proposer (`v1/spec_decode/eagle.py`); SGLang's
//! `qwen3_5_mtp.py` computes the same. One MTP step, for position `p`:
//!
//! ```text
//! e = pre_fc_norm_embedding(embed(x[p+1]))      the target's embedding of the NEXT token
//! h = pre_fc_norm_hidden(hidden[p])             the target's final-normed hidden state at p
//! y = layer(fc([e ; h]), position p)            one gated full-attention decoder layer
//! out = norm(y)  →  the target's output head → logits for x[p+2]
//! ```
//!
//! Notable:
//! - The layer is a full-attention layer of the target's kind (gated attention, QK norms,
//!   partial RoPE at position `p`, the target's dense or MoE feed-forward), with a KV cache of
//!   its own: slot `num_hidden_layers` of the target's [`KvStore`], so checkpoints, chat
//!   snapshots and `clear` cover it. Its entry at `p` pairs `hidden[p]` with `x[p+1]`.
//! - Embeddings and the output head are the target's (`mtp_use_dedicated_embeddings: false`,
//!   the value of every Qwen3.6 checkpoint; `true` is refused).
//! - Drafting a second token feeds `out` back as the hidden state, at position `p + 1`.
//! - Every norm is zero-centred (`1 + weight`), like the target's.

use super::model::{rotary, DecoderLayer};
use super::RuntimeConfig;
use crate::arch::config::ParseOptions;
use crate::arch::{ArchSpec, Attention, LayerSpec};
use crate::layers::kv_store::KvStore;
use crate::layers::linear::Linear;
use crate::layers::norm::RmsNorm;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

/// The MTP head of a Qwen3.5 / Qwen3.6 checkpoint.
#[derive(Debug)]
pub struct Qwen3_5Mtp {
    pre_fc_norm_embedding: RmsNorm,
    pre_fc_norm_hidden: RmsNorm,
    /// `[hidden, 2·hidden]`: `[embedding ; hidden state]` → hidden.
    fc: Linear,
    layer: DecoderLayer,
    norm: RmsNorm,
    /// The layer's slot in the target's cache.
    slot: usize,
}

/// What `config.json` says of the head: the target's table and runtime config, and the MTP
/// layer's row (the target's first full-attention layer, in slot `num_hidden_layers`).
pub struct MtpPlan {
    spec: ArchSpec,
    cfg: RuntimeConfig,
    pub layer: LayerSpec,
}

impl MtpPlan {
    /// Read a Qwen3.5 `config.json`; refuses checkpoints whose MTP this head does not run.
    pub fn of(config: &Value, opts: &ParseOptions) -> Result<Self> {
        let (spec, cfg) =
            crate::arch::parse_for_family(config, opts, &super::FAMILY, super::parse)?;
        match cfg.mtp_layers {
            0 => bail!("config.json declares no MTP layers (`mtp_num_hidden_layers` is 0 or absent)\nhint: --draft ngram drafts without a model"),
            1 => {}
            n => bail!("`mtp_num_hidden_layers` = {n}: llmarch runs an MTP head of one layer (every Qwen3.6 checkpoint has one)"),
        }
        if cfg.mtp_dedicated_embeddings {
            bail!("`mtp_use_dedicated_embeddings` = true is not supported: llmarch's MTP head reads the target's embeddings");
        }
        let full = spec
            .layers
            .iter()
            .find(|l| l.attention == Attention::Full)
            .ok_or_else(|| {
                anyhow!("the model has no full-attention layer for its MTP layer to copy")
            })?;
        let layer = LayerSpec {
            index: spec.layers.len(),
            ..full.clone()
        };
        Ok(MtpPlan { spec, cfg, layer })
    }
}

impl Qwen3_5Mtp {
    /// Build the head `plan` describes from `vb`, positioned at the checkpoint's `mtp.`.
    pub fn load(plan: &MtpPlan, vb: VarBuilder) -> Result<Self> {
        let (hidden, eps) = (plan.spec.hidden_size, plan.cfg.rms_norm_eps);
        let rope = rotary(&plan.spec, &plan.cfg, vb.device())?;
        let norm = |name: &str| RmsNorm::load_zero_centred(&vb.pp(name), hidden, eps);
        let layer = DecoderLayer::load(
            &vb.pp("layers").pp(0),
            &plan.layer,
            hidden,
            &plan.cfg,
            &rope,
        )
        .context("MTP layer 0 (`mtp.layers.0`)")?;
        Ok(Qwen3_5Mtp {
            pre_fc_norm_embedding: norm("pre_fc_norm_embedding")?,
            pre_fc_norm_hidden: norm("pre_fc_norm_hidden")?,
            fc: Linear::load(&vb.pp("fc"), 2 * hidden, hidden, false)?,
            layer,
            norm: norm("norm")?,
            slot: plan.layer.index,
        })
    }

    /// The head's slot in the target's cache.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// MTP steps for positions `start..start + n`: `e` `[n, hidden]` the embeddings of the
    /// tokens that follow them, `h` `[n, hidden]` their hidden states. Appends to the head's
    /// cache; returns the normed outputs `[n, hidden]` (the next step's hidden states).
    pub fn forward(
        &self,
        e: &Tensor,
        h: &Tensor,
        start: usize,
        cache: &mut KvStore,
    ) -> Result<Tensor> {
        let dtype = e.dtype();
        let e = self.pre_fc_norm_embedding.forward(e)?;
        let h = self.pre_fc_norm_hidden.forward(&h.to_dtype(dtype)?)?;
        let x = self.fc.forward(&Tensor::cat(&[&e, &h], 1)?)?; // [n, hidden]
        let y = self.layer.forward(&x, self.slot, start, cache)?;
        Ok(self.norm.forward(&y)?.to_dtype(DType::F32)?)
    }
}
