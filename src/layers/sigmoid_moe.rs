//! Sigmoid-routed mixture of experts with an always-on shared expert (DeepSeek-V3 style routing,
//! as Laguna's `LagunaSparseMoeBlock` runs it).
//!
//! Routing ([`SigmoidTopKRouter`]): router logits `W x` (no norm, no bias) in f32, optionally
//! soft-capped (`cap · tanh(logits / cap)`), then an independent sigmoid per expert (not a
//! softmax over them). The experts are *picked* by `sigmoid + e_score_correction_bias` (a
//! load-balancing bias learned outside the gradient), but *weighted* by the plain sigmoid scores of
//! the picked ones, renormalised to sum to 1. A checkpoint without the bias routes with zeros, as
//! the reference initialises a missing one.
//!
//! The block ([`SharedExpertMoe`]): `routed_scale · Σ_picked w_e · expert_e(x) + shared(x)`, the
//! experts packed as in [`super::moe::PackedExperts`], the shared expert a plain gated MLP (no
//! gate of its own on its output).
//!
//! Two weight layouts are read. Checkpoints on the Hub (and what transformers' `save_pretrained`
//! writes, through its conversion mapping) keep one MLP per expert (`experts.{e}.gate_proj`, ...),
//! the bias under the experts (`experts.e_score_correction_bias`) and the shared expert as
//! `shared_expert`; the reference's modules hold them packed (`experts.gate_up_proj`), the bias
//! under the router (`gate.e_score_correction_bias`) and `shared_experts`. Either is accepted.

use super::embedding::softcap;
use super::linear::Linear;
use super::mlp::{Activation, GatedMlp};
use super::moe::{PackedExperts, Picks};
use super::weight;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug)]
pub struct SigmoidTopKRouter {
    /// `[experts, hidden]`.
    proj: Linear,
    /// Added to the scores for picking only; zeros when the checkpoint has none.
    correction_bias: Vec<f32>,
    /// `tanh` cap on the logits; `None` when off (the config's 0).
    logit_softcap: Option<f64>,
    top_k: usize,
}

impl SigmoidTopKRouter {
    /// Reads `weight` `[experts, hidden]` under `vb`; `correction_bias` `[experts]` (any dtype),
    /// zeros when `None`.
    pub fn load(
        vb: &VarBuilder,
        hidden: usize,
        experts: usize,
        top_k: usize,
        logit_softcap: Option<f64>,
        correction_bias: Option<Tensor>,
    ) -> Result<Self> {
        if top_k == 0 || top_k > experts {
            bail!("router: top-{top_k} of {experts} experts");
        }
        if let Some(cap) = logit_softcap {
            if !(cap.is_finite() && cap > 0.0) {
                bail!("router: logit soft-cap {cap} must be a positive number");
            }
        }
        let correction_bias = match correction_bias {
            Some(b) if b.dims() == [experts] => b.to_dtype(DType::F32)?.to_vec1()?,
            Some(b) => bail!(
                "router: score-correction bias of shape {:?} for {experts} experts",
                b.dims()
            ),
            None => vec![0.0; experts],
        };
        Ok(SigmoidTopKRouter {
            proj: Linear::load_unquantized(vb, hidden, experts, false)?,
            correction_bias,
            logit_softcap,
            top_k,
        })
    }

    /// x `[tokens, hidden]` → each token's experts and weights (highest selection score first).
    pub fn route(&self, x: &Tensor) -> Result<Vec<Picks>> {
        // 1. Logits in f32, soft-capped, through the sigmoid. [tokens, experts]
        let mut logits = self.proj.forward(x)?.to_dtype(DType::F32)?;
        if let Some(cap) = self.logit_softcap {
            logits = softcap(&logits, cap)?;
        }
        let scores: Vec<Vec<f32>> = candle_nn::ops::sigmoid(&logits)?.to_vec2()?;

        // 2. Pick by score + bias, weight by the picked scores, renormalised.
        Ok(scores
            .iter()
            .map(|s| {
                let select: Vec<f32> = s
                    .iter()
                    .zip(&self.correction_bias)
                    .map(|(a, b)| a + b)
                    .collect();
                let mut idx: Vec<usize> = (0..s.len()).collect();
                // Highest first; ties to the lower index.
                idx.sort_by(|&a, &b| select[b].total_cmp(&select[a]).then(a.cmp(&b)));
                idx.truncate(self.top_k);
                let sum: f32 = idx.iter().map(|&e| s[e]).sum();
                idx.iter().map(|&e| (e, s[e] / sum)).collect()
            })
            .collect())
    }
}

#[derive(Debug)]
pub struct SharedExpertMoe {
    router: SigmoidTopKRouter,
    experts: PackedExperts,
    /// `None` when the shared expert has width 0.
    shared: Option<GatedMlp>,
    routed_scale: f64,
}

/// Sizes of a [`SharedExpertMoe`].
#[derive(Debug, Clone)]
pub struct SharedExpertMoeShape {
    pub hidden: usize,
    pub experts: usize,
    pub top_k: usize,
    /// Width of each routed expert.
    pub width: usize,
    /// Width of the shared expert, if any.
    pub shared_width: Option<usize>,
}

impl SharedExpertMoe {
    /// Reads the router (`gate.weight`), the experts, the score-correction bias (if any) and the
    /// shared expert under `vb`, in either layout (see the module notes).
    pub fn load(
        vb: &VarBuilder,
        shape: &SharedExpertMoeShape,
        act: Activation,
        routed_scale: f64,
        router_logit_softcap: Option<f64>,
    ) -> Result<Self> {
        if !routed_scale.is_finite() {
            bail!("MoE: routed scaling factor {routed_scale} is not a number");
        }
        let (h, e) = (shape.hidden, shape.experts);
        let vb_experts = vb.pp("experts");
        let experts = if vb_experts.contains_tensor("0.gate_proj.weight") {
            PackedExperts::load_per_expert(&vb_experts, h, e, shape.width, act)?
        } else {
            PackedExperts::load(&vb_experts, h, e, shape.width, act)?
        };
        let bias = match weight::get_opt(&vb_experts, e, "e_score_correction_bias")? {
            Some(b) => Some(b),
            None => weight::get_opt(&vb.pp("gate"), e, "e_score_correction_bias")?,
        };
        let shared = match shape.shared_width {
            Some(w) if w > 0 => {
                let name = if vb.pp("shared_expert").contains_tensor("gate_proj.weight") {
                    "shared_expert"
                } else {
                    "shared_experts"
                };
                Some(GatedMlp::load(&vb.pp(name), h, w, act)?)
            }
            _ => None,
        };
        Ok(SharedExpertMoe {
            router: SigmoidTopKRouter::load(
                &vb.pp("gate"),
                h,
                e,
                shape.top_k,
                router_logit_softcap,
                bias,
            )?,
            experts,
            shared,
            routed_scale,
        })
    }

    /// x `[b, n, hidden]` → `[b, n, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let flat = x.reshape((b * n, d))?; // [tokens, hidden]
        let picks = self.router.route(&flat)?;
        let mut y = self.experts.forward(&flat, &picks)?;
        if self.routed_scale != 1.0 {
            y = (y * self.routed_scale)?;
        }
        if let Some(shared) = &self.shared {
            y = (y + shared.forward(&flat)?)?;
        }
        Ok(y.reshape((b, n, d))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn router(
        w: &[[f32; 2]; 3],
        bias: Vec<f32>,
        top_k: usize,
        cap: Option<f64>,
    ) -> SigmoidTopKRouter {
        SigmoidTopKRouter {
            proj: Linear::from_weight(Tensor::new(w, &Device::Cpu).unwrap(), None),
            correction_bias: bias,
            logit_softcap: cap,
            top_k,
        }
    }

    #[test]
    fn bias_picks_but_scores_weigh() {
        // Logits for x = [1, 0]: [2, 1, 0]. Without the bias experts 0, 1 win; a bias of +1 on
        // expert 2 picks it over expert 1, but its weight comes from its own plain score.
        let w = [[2f32, 0.0], [1.0, 0.0], [0.0, 0.0]];
        let x = Tensor::new(&[[1f32, 0.0]], &Device::Cpu).unwrap();
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        let r = router(&w, vec![0.0; 3], 2, None);
        let p = &r.route(&x).unwrap()[0];
        assert_eq!((p[0].0, p[1].0), (0, 1));
        assert!((p[0].1 - sig(2.0) / (sig(2.0) + sig(1.0))).abs() < 1e-6);
        let r = router(&w, vec![0.0, 0.0, 1.0], 2, None);
        let p = &r.route(&x).unwrap()[0];
        assert_eq!((p[0].0, p[1].0), (2, 0));
        assert!((p[0].1 - sig(0.0) / (sig(0.0) + sig(2.0))).abs() < 1e-6);
        assert!((p[0].1 + p[1].1 - 1.0).abs() < 1e-6);
        // A soft-cap of 1 squeezes the logits to tanh(2), tanh(1).
        let r = router(&w, vec![0.0; 3], 2, Some(1.0));
        let p = &r.route(&x).unwrap()[0];
        let (a, b) = (sig(2f32.tanh()), sig(1f32.tanh()));
        assert!((p[0].1 - a / (a + b)).abs() < 1e-6);
    }
}
