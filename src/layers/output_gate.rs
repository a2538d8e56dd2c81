//! Softplus attention-output gate (Laguna's `g_proj`): the merged attention heads are multiplied,
//! before the output projection, by `softplus(g_proj x)` of the layer's (normed) input `x`.
//!
//! Two granularities: one gate per head, broadcast over its `head_dim` channels (`g_proj` has
//! `heads` outputs), or one per channel (`heads × head_dim` outputs). The softplus is taken in f32
//! and cast back to the activation dtype, as the reference does
//! (`F.softplus(g_proj(x).float()).to(dtype)`). Unlike a sigmoid gate it is unbounded above, so it
//! can amplify a head as well as silence it.

use super::linear::Linear;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

/// How many gate values a token gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateGranularity {
    /// One per head, shared by its channels.
    PerHead,
    /// One per channel of every head.
    PerElement,
}

#[derive(Debug)]
pub struct SoftplusOutputGate {
    proj: Linear,
    heads: usize,
    head_dim: usize,
    granularity: GateGranularity,
}

/// `log(1 + eˣ)`, computed as `max(x, 0) + log(1 + e^-|x|)` so it does not overflow for large
/// `x`, and as `eˣ` below −15, where `1 + eˣ` rounds to 1 in f32 (what `log1p` gives). In f32.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let pos = x.relu()?;
    let tail = ((x.abs()?.neg()?.exp()? + 1.0)?).log()?;
    Ok(x.lt(-15f32)?.where_cond(&x.exp()?, &(pos + tail)?)?)
}

impl SoftplusOutputGate {
    /// Reads `weight` `[heads (· head_dim), hidden]` under `vb` (the `g_proj`; no bias).
    pub fn load(
        vb: &VarBuilder,
        hidden: usize,
        heads: usize,
        head_dim: usize,
        granularity: GateGranularity,
    ) -> Result<Self> {
        let outputs = match granularity {
            GateGranularity::PerHead => heads,
            GateGranularity::PerElement => heads * head_dim,
        };
        Ok(SoftplusOutputGate {
            proj: Linear::load(vb, hidden, outputs, false)?,
            heads,
            head_dim,
            granularity,
        })
    }

    /// x `[b, n, hidden]` (the attention input), y `[b, n, heads · head_dim]` (the merged heads)
    /// → `y · softplus(g_proj x)`, `[b, n, heads · head_dim]` in y's dtype.
    pub fn forward(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let (b, n, width) = y.dims3()?;
        if width != self.heads * self.head_dim {
            bail!(
                "internal: output gate for {} heads of {} applied to {width} channels",
                self.heads,
                self.head_dim
            );
        }
        let gate = softplus(&self.proj.forward(x)?)?.to_dtype(y.dtype())?; // [b, n, g]
        Ok(match self.granularity {
            GateGranularity::PerElement => (y * gate)?,
            GateGranularity::PerHead => {
                let y = y.reshape((b, n, self.heads, self.head_dim))?;
                let gate = gate.reshape((b, n, self.heads, 1))?;
                y.broadcast_mul(&gate)?.reshape((b, n, width))?
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn softplus_is_stable_at_both_ends() {
        let x = Tensor::new(&[-100f32, -5.0, 0.0, 3.0, 100.0], &Device::Cpu).unwrap();
        let y: Vec<f32> = softplus(&x).unwrap().to_vec1().unwrap();
        let want = [
            (-100f64).exp(),
            (1.0 + (-5f64).exp()).ln(),
            2f64.ln(),
            (1.0 + 3f64.exp()).ln(),
            100.0,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((*a as f64 - b).abs() <= 1e-6 * b.abs().max(1e-30), "{y:?}");
        }
    }

    #[test]
    fn per_head_gate_scales_whole_heads() {
        let dev = Device::Cpu;
        // Two heads of 2 channels; g_proj maps x = [1, 0] to logits [0, ln(e - 1)], i.e. gates
        // softplus(0) = ln 2 and softplus(ln(e - 1)) = 1.
        let w = Tensor::new(
            &[[0f32, 0.0], [(std::f32::consts::E - 1.0).ln(), 0.0]],
            &dev,
        )
        .unwrap();
        let gate = SoftplusOutputGate {
            proj: Linear::from_weight(w, None),
            heads: 2,
            head_dim: 2,
            granularity: GateGranularity::PerHead,
        };
        let x = Tensor::new(&[[[1f32, 0.0]]], &dev).unwrap();
        let y = Tensor::new(&[[[1f32, 2.0, 3.0, 4.0]]], &dev).unwrap();
        let out: Vec<f32> = gate
            .forward(&x, &y)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let l2 = 2f32.ln();
        let want = [l2, 2.0 * l2, 3.0, 4.0];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{out:?}");
        }
    }
}
