//! Learned residual scaling (ZAYA's `ZayaResidualScaling` and its input scaling): each branch is
//! shifted by a learned bias and scaled by a learned vector before the two are added,
//! `(h + b_h) · s_h + (r + b_r) · s_r`. The residual stream is kept in f32 (the reference's
//! `residual_in_fp32`): the block branch is computed in its own dtype, the residual one in f32.

use super::weight;
use anyhow::Result;
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

/// `(x + bias) · scale`, over the last dimension.
#[derive(Debug)]
pub struct ShiftScale {
    /// `[dim]`, in the checkpoint dtype.
    bias: Tensor,
    scale: Tensor,
}

impl ShiftScale {
    /// Reads `{scale}` and `{bias}` `[dim]` under `vb`.
    pub fn load(vb: &VarBuilder, dim: usize, scale: &str, bias: &str) -> Result<Self> {
        Ok(ShiftScale {
            bias: weight::get(vb, dim, bias)?,
            scale: weight::get(vb, dim, scale)?,
        })
    }

    /// `(x + bias) · scale` in x's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        Ok(x.broadcast_add(&self.bias.to_dtype(dt)?)?
            .broadcast_mul(&self.scale.to_dtype(dt)?)?)
    }
}

/// `(h + b_h) · s_h + (r + b_r) · s_r`, the result in f32.
#[derive(Debug)]
pub struct ResidualScaling {
    branch: ShiftScale,
    residual: ShiftScale,
}

impl ResidualScaling {
    /// Reads `hidden_states_{scale,bias}` and `residual_{scale,bias}` `[dim]` under `vb`.
    pub fn load(vb: &VarBuilder, dim: usize) -> Result<Self> {
        Ok(ResidualScaling {
            branch: ShiftScale::load(vb, dim, "hidden_states_scale", "hidden_states_bias")?,
            residual: ShiftScale::load(vb, dim, "residual_scale", "residual_bias")?,
        })
    }

    /// h (block output, any dtype) and residual `[.., dim]` → the new residual in f32.
    pub fn forward(&self, h: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = self.branch.forward(h)?.to_dtype(DType::F32)?;
        let r = self.residual.forward(&residual.to_dtype(DType::F32)?)?;
        Ok((h + r)?)
    }
}
