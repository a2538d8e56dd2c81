//! Per-layer embeddings (PLE, Gemma 4 E2B/E4B): every decoder layer gets its own small embedding
//! of the token, added through a gated residual after the MLP.
//!
//! Model side ([`PerLayerEmbedding`]): a packed table `[vocab, layers × width]` scaled by
//! `sqrt(width)`, plus a projection of the (already scaled) token embedding
//! `[hidden → layers × width]` times `hidden^-½`, split per layer and RMS-normed; the two are
//! summed and scaled by `2^-½`. Layer side ([`PerLayerGate`]): `h + norm(proj(act(gate h) · e_i))`.

use super::embedding::ScaledEmbedding;
use super::linear::Linear;
use super::mlp::Activation;
use super::norm::RmsNorm;
use anyhow::{bail, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;

#[derive(Debug)]
pub struct PerLayerEmbedding {
    table: ScaledEmbedding,
    projection: Linear,
    projection_scale: f64,
    norm: RmsNorm,
    layers: usize,
    width: usize,
}

impl PerLayerEmbedding {
    /// Reads `embed_tokens_per_layer`, `per_layer_model_projection` and
    /// `per_layer_projection_norm` under `vb` (the text model root).
    pub fn load(
        vb: &VarBuilder,
        vocab: usize,
        hidden: usize,
        layers: usize,
        width: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(PerLayerEmbedding {
            table: ScaledEmbedding::load(
                &vb.pp("embed_tokens_per_layer"),
                vocab,
                layers * width,
                (width as f64).sqrt(),
            )?,
            projection: Linear::load(
                &vb.pp("per_layer_model_projection"),
                hidden,
                layers * width,
                false,
            )?,
            projection_scale: (hidden as f64).powf(-0.5),
            norm: RmsNorm::load(&vb.pp("per_layer_projection_norm"), width, eps)?,
            layers,
            width,
        })
    }

    /// `tokens` (on the host) as ids `[b, n]` on the device, and their scaled embeddings
    /// `[b, n, hidden]` → `[b, n, layers, width]`. The ids are checked against the table on the
    /// host: no read-back from the device.
    pub fn forward(&self, tokens: &[u32], ids: &Tensor, embeds: &Tensor) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        let (l, w) = (self.layers, self.width);
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.table.vocab()) {
            bail!(
                "token id {bad} is outside the per-layer embedding table ({} rows, key \
                 `vocab_size_per_layer_input`)",
                self.table.vocab()
            );
        }
        let tok = self
            .table
            .forward_tokens(tokens, ids)?
            .reshape((b, n, l, w))?;
        let proj = (self.projection.forward(embeds)? * self.projection_scale)?;
        let proj = self.norm.forward(&proj.reshape((b, n, l, w))?)?;
        Ok(((proj + tok)? * std::f64::consts::FRAC_1_SQRT_2)?)
    }
}

#[derive(Debug)]
pub struct PerLayerGate {
    gate: Linear,
    projection: Linear,
    norm: RmsNorm,
    act: Activation,
}

impl PerLayerGate {
    /// Reads `per_layer_input_gate`, `per_layer_projection` and `post_per_layer_input_norm`
    /// under `vb` (the decoder layer).
    pub fn load(
        vb: &VarBuilder,
        hidden: usize,
        width: usize,
        eps: f64,
        act: Activation,
    ) -> Result<Self> {
        Ok(PerLayerGate {
            gate: Linear::load(&vb.pp("per_layer_input_gate"), hidden, width, false)?,
            projection: Linear::load(&vb.pp("per_layer_projection"), width, hidden, false)?,
            norm: RmsNorm::load(&vb.pp("post_per_layer_input_norm"), hidden, eps)?,
            act,
        })
    }

    /// h `[b, n, hidden]` plus this layer's embedding `[b, n, width]` → `[b, n, hidden]`, times
    /// `scale` `[1]` where given, and `next` of that (see [`super::norm::residual`]: one kernel
    /// on CUDA).
    pub fn forward(
        &self,
        h: &Tensor,
        e: &Tensor,
        scale: Option<&Tensor>,
        next: Option<&RmsNorm>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let g = self.act.gated(&self.gate.forward(h)?, e)?; // [b, n, width]
        let y = self.projection.forward(&g)?;
        super::norm::residual(h, &y, Some(&self.norm), scale, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    /// An id past the per-layer table (smaller than the model's vocabulary) is refused, checked
    /// on the host, naming the key; ids inside it embed.
    #[test]
    fn ids_past_the_table_are_refused_on_the_host() {
        let dev = Device::Cpu;
        let (vocab, hidden, layers, width) = (5, 4, 2, 3);
        let t = |shape: &[usize]| Tensor::ones(shape, DType::F32, &dev).unwrap();
        let tensors = HashMap::from([
            (
                "embed_tokens_per_layer.weight".to_string(),
                t(&[vocab, layers * width]),
            ),
            (
                "per_layer_model_projection.weight".to_string(),
                t(&[layers * width, hidden]),
            ),
            ("per_layer_projection_norm.weight".to_string(), t(&[width])),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let ple = PerLayerEmbedding::load(&vb, vocab, hidden, layers, width, 1e-6).unwrap();
        let embeds = t(&[1, 2, hidden]);
        let ok = Tensor::new(&[[1u32, 4]], &dev).unwrap();
        let y = ple.forward(&[1, 4], &ok, &embeds).unwrap();
        assert_eq!(y.dims(), [1, 2, layers, width]);
        let bad = Tensor::new(&[[1u32, 5]], &dev).unwrap();
        let e = ple.forward(&[1, 5], &bad, &embeds).unwrap_err().to_string();
        assert!(
            e.contains("token id 5") && e.contains("vocab_size_per_layer_input"),
            "{e}"
        );
    }
}
