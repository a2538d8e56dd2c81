//! Token embeddings scaled by a constant (Gemma: `sqrt(hidden)`).
//!
//! The reference keeps the scale as an f32 scalar and casts it to the weight dtype before
//! multiplying (`embed_scale.to(weight.dtype)`), so in bf16 `sqrt(3072) = 55.4256` becomes `55.5`;
//! this does the same, so bf16 runs round like the reference.

use super::weight;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct ScaledEmbedding {
    /// `[vocab, dim]`.
    weight: Tensor,
    /// The scale as a 0-d tensor in the weight dtype.
    scale: Tensor,
}

impl ScaledEmbedding {
    /// Reads `weight` `[vocab, dim]` under `vb`.
    pub fn load(vb: &VarBuilder, vocab: usize, dim: usize, scale: f64) -> Result<Self> {
        let weight = weight::get(vb, (vocab, dim), "weight")?;
        let scale = Tensor::new(scale as f32, weight.device())?.to_dtype(weight.dtype())?;
        Ok(ScaledEmbedding { weight, scale })
    }

    /// The table, for a tied output head.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn vocab(&self) -> usize {
        self.weight.dims()[0]
    }

    /// ids `[b, n]` (u32) → `[b, n, dim]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        let vocab = self.vocab();
        let max = ids
            .to_dtype(DType::U32)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<u32>()?;
        if max as usize >= vocab {
            bail!("token id {max} is outside the embedding table ({vocab} rows)");
        }
        let rows = self.weight.embedding(&ids.flatten_all()?)?; // [b·n, dim]
        let dim = rows.dim(1)?;
        Ok(rows.broadcast_mul(&self.scale)?.reshape((b, n, dim))?)
    }
}

/// `cap · tanh(x / cap)`: soft-caps logits to (−cap, cap).
pub fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    Ok(((x / cap)?.tanh()? * cap)?)
}
