//! Gated MLP (GeGLU / SwiGLU): `down(act(gate x) · up x)`.
//!
//! The activation is taken in f32 and cast back, as PyTorch computes it for 16-bit inputs. With a
//! SwiGLU limit (DeepSeek V4's `swiglu_limit`), the gate is clamped to at most `limit` and the up
//! projection to `[-limit, limit]` first ([`swiglu_clamp`]).

use super::linear::{Linear, LinearGroup};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

/// The gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU, tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
    /// SiLU / swish.
    Silu,
}

impl Activation {
    /// The Hugging Face `hidden_act` / `hidden_activation` name.
    pub fn from_hf(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu_pytorch_tanh" | "gelu_new" => Activation::GeluTanh,
            "silu" | "swish" => Activation::Silu,
            other => bail!("activation `{other}` is not supported"),
        })
    }

    /// `act(gate) · up`, the gated MLP's product: one fused kernel for f32 on the CPU, and for
    /// every dtype on CUDA ([`crate::kernels::fused::gated`]).
    pub fn gated(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if crate::kernels::fast_cpu(gate.device())
            && gate.dtype() == DType::F32
            && up.dtype() == DType::F32
            && gate.dims() == up.dims()
        {
            let mut g = gate.flatten_all()?.to_vec1::<f32>()?;
            super::with_f32_slice(up, |u| {
                crate::kernels::gelu::gated_in_place(&mut g, u, self == Activation::Silu)
            })?;
            return Ok(Tensor::from_vec(g, gate.shape(), gate.device())?);
        }
        if let Some(y) = crate::kernels::fused::gated(self == Activation::Silu, gate, up)? {
            return Ok(y);
        }
        Ok((self.apply(gate)? * up)?)
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let y = match self {
            Activation::GeluTanh => crate::kernels::gelu::gelu_tanh(&xf)?,
            Activation::Silu => candle_nn::ops::silu(&xf)?,
        };
        Ok(y.to_dtype(dtype)?)
    }
}

#[derive(Debug)]
pub struct GatedMlp {
    /// `gate_proj` and `up_proj` `[width, hidden]`.
    gate_up: LinearGroup,
    down_proj: Linear,
    act: Activation,
    limit: Option<f64>,
}

/// Clamp a SwiGLU's gate `[.., width]` to at most `limit` and its up projection to
/// `[-limit, limit]` (no-op without a limit).
pub fn swiglu_clamp(gate: Tensor, up: Tensor, limit: Option<f64>) -> Result<(Tensor, Tensor)> {
    Ok(match limit {
        None => (gate, up),
        Some(l) => (gate.minimum(l)?, up.clamp(-l, l)?),
    })
}

impl GatedMlp {
    /// Reads `gate_proj`, `up_proj` `[width, hidden]` and `down_proj` `[hidden, width]`.
    pub fn load(vb: &VarBuilder, hidden: usize, width: usize, act: Activation) -> Result<Self> {
        Ok(GatedMlp {
            gate_up: LinearGroup::new(vec![
                Linear::load(&vb.pp("gate_proj"), hidden, width, false)?,
                Linear::load(&vb.pp("up_proj"), hidden, width, false)?,
            ])?,
            down_proj: Linear::load(&vb.pp("down_proj"), width, hidden, false)?,
            act,
            limit: None,
        })
    }

    /// This MLP with its gate and up projections clamped by `limit` (see [`swiglu_clamp`]).
    pub fn with_swiglu_limit(mut self, limit: f64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// `[.., hidden]` → `[.., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] = self
            .gate_up
            .forward(x)?
            .try_into()
            .expect("two projections");
        let (gate, up) = swiglu_clamp(gate, up, self.limit)?; // [.., width] each
        let h = self.act.gated(&gate, &up)?;
        self.down_proj.forward(&h)
    }
}
