//! Linear projections: the one door every weight matmul goes through.
//!
//! Weights are kept as Hugging Face stores them, `[out, in]`, and applied as `x · Wᵀ (+ b)`. The
//! plain path is candle's matmul; a faster batch-1 kernel or a quantized weight can replace
//! [`matmul_t`] / [`Linear`] without touching the blocks that use them.

use super::weight;
use anyhow::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// `x · wᵀ` for `x` `[.., in]` and `w` `[out, in]`: `[.., out]`.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / in_dim.max(1);
    let out_dim = w.dim(0)?;
    let y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?; // [rows, out]
    let mut shape = dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = out_dim;
    }
    Ok(y.reshape(shape)?)
}

/// A `[out, in]` weight and an optional `[out]` bias.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Read `weight` `[out, in]` (and `bias` `[out]` when `bias`) under `vb`.
    pub fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = weight::get(vb, (out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(weight::get(vb, out_dim, "bias")?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// A projection over an existing weight (a tied output head).
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `[.., in]` → `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = matmul_t(x, &self.weight)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn applies_the_transposed_weight_and_bias() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &dev).unwrap(); // [3, 2]
        let b = Tensor::new(&[0.5f32, 0.0, -1.0], &dev).unwrap();
        let x = Tensor::new(&[[[1f32, 1.0], [0.0, 2.0]]], &dev).unwrap(); // [1, 2, 2]
        let y = Linear::from_weight(w, Some(b)).forward(&x).unwrap();
        let y: Vec<Vec<Vec<f32>>> = y.to_vec3().unwrap();
        assert_eq!(y, vec![vec![vec![3.5, 7.0, 10.0], vec![4.5, 8.0, 11.0]]]);
    }
}
