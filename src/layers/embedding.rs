//! Token embeddings scaled by a constant (Gemma: `sqrt(hidden)`).
//!
//! The table is either a candle tensor (the GPU path, `--dtype f32`) or read straight from the
//! checkpoint's mapping one row per token ([`MappedTensor::gather_rows`]): a 262,144-row table
//! costs the rows a prompt uses, not the whole table, and is never widened. A tied output head
//! reads the same table ([`ScaledEmbedding::as_linear`]).
//!
//! The reference keeps the scale as an f32 scalar and casts it to the weight dtype before
//! multiplying (`embed_scale.to(weight.dtype)`), so in bf16 `sqrt(3072) = 55.4256` becomes `55.5`;
//! a tensor table does the same, so bf16 runs round like the reference. A mapped table feeds f32
//! activations, and scales in f32.

use super::linear::{mapped_in_scope, Linear};
use super::mapped::MappedTensor;
use super::weight;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
enum Table {
    /// `[vocab, dim]`, with the scale as a 0-d tensor in its dtype.
    Tensor { weight: Tensor, scale: Tensor },
    /// `[vocab, dim]` in the mapping; rows come out in `dtype` (the activations').
    Mapped {
        table: MappedTensor,
        scale: f32,
        dtype: DType,
    },
}

#[derive(Debug, Clone)]
pub struct ScaledEmbedding {
    table: Table,
    vocab: usize,
}

impl ScaledEmbedding {
    /// Reads `weight` `[vocab, dim]` under `vb`: from the mapping when the enclosing
    /// `with_weight_format` serves weights from one, else as a tensor in `vb`'s dtype.
    pub fn load(vb: &VarBuilder, vocab: usize, dim: usize, scale: f64) -> Result<Self> {
        let name = weight::full_name(vb, "weight");
        if let Some(table) = mapped_in_scope(&name, &[vocab, dim])? {
            return Ok(ScaledEmbedding {
                table: Table::Mapped {
                    table,
                    scale: scale as f32,
                    dtype: vb.dtype(),
                },
                vocab,
            });
        }
        let weight = weight::get(vb, (vocab, dim), "weight")?;
        ScaledEmbedding::from_tensor(weight, scale)
    }

    /// A table held as a tensor `[vocab, dim]`.
    pub fn from_tensor(weight: Tensor, scale: f64) -> Result<Self> {
        let scale = Tensor::new(scale as f32, weight.device())?.to_dtype(weight.dtype())?;
        Ok(ScaledEmbedding {
            vocab: weight.dims()[0],
            table: Table::Tensor { weight, scale },
        })
    }

    /// The table as a projection `[vocab, dim]` (+ `bias`), for a tied output head: held as the
    /// enclosing `with_weight_format` says (the mapping itself, or a quantized copy beside it).
    pub fn as_linear(&self, bias: Option<Tensor>) -> Result<Linear> {
        match &self.table {
            Table::Tensor { weight, .. } => Linear::quantized_from_weight(weight.clone(), bias),
            Table::Mapped { table, .. } => Linear::from_mapped(table.clone(), bias),
        }
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// `tokens` → `[1, n, dim]` on `device` (what a drafter takes in from its target).
    pub fn lookup(&self, tokens: &[u32], device: &Device) -> Result<Tensor> {
        self.forward_tokens(
            tokens,
            &Tensor::from_slice(tokens, (1, tokens.len()), device)?,
        )
    }

    /// ids `[b, n]` (u32) → `[b, n, dim]`; the ids are read back to be checked.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let flat = ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
        self.forward_tokens(&flat, ids)
    }

    /// `tokens` (checked here, on the host) and the same ids as `ids` `[b, n]` (u32) on the
    /// model's device → `[b, n, dim]`: nothing read back from a GPU.
    pub fn forward_tokens(&self, tokens: &[u32], ids: &Tensor) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        if tokens.len() != b * n {
            bail!("internal: {} tokens for ids {:?}", tokens.len(), ids.dims());
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= self.vocab) {
            bail!(
                "token id {bad} is outside the embedding table ({} rows)",
                self.vocab
            );
        }
        match &self.table {
            Table::Tensor { weight, scale } => {
                let rows = weight.embedding(&ids.flatten_all()?)?; // [b·n, dim]
                let dim = rows.dim(1)?;
                Ok(rows.broadcast_mul(scale)?.reshape((b, n, dim))?)
            }
            Table::Mapped {
                table,
                scale,
                dtype,
            } => {
                let dim = table.dims2().1;
                let rows = table.gather_rows(tokens, *scale)?; // [b·n·dim]
                Ok(Tensor::from_vec(rows, (b, n, dim), ids.device())?.to_dtype(*dtype)?)
            }
        }
    }
}

/// `cap · tanh(x / cap)`: soft-caps logits to (−cap, cap). f32 on the CPU takes the
/// vectorised kernel ([`crate::kernels::gelu::softcap_in_place`]).
pub fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    if crate::kernels::fast_cpu(x.device()) && x.dtype() == DType::F32 {
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        crate::kernels::gelu::softcap_in_place(&mut v, cap as f32);
        return Ok(Tensor::from_vec(v, x.shape(), x.device())?);
    }
    Ok(((x / cap)?.tanh()? * cap)?)
}
