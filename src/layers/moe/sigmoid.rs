//! Sigmoid-routed mixture of experts with an always-on shared expert (DeepSeek-V3 style routing,
//! as Laguna's `LagunaSparseMoeBlock` runs it).
//!
//! Routing ([`ScoreRouter`] with sigmoid scores): router logits `W x` (no norm, no bias) in f32,
//! optionally soft-capped (`cap · tanh(logits / cap)`), then an independent sigmoid per expert
//! (not a softmax over them). The experts are *picked* by `sigmoid + e_score_correction_bias` (a
//! load-balancing bias learned outside the gradient), but *weighted* by the plain sigmoid scores of
//! the picked ones, renormalised to sum to 1. A checkpoint without the bias routes with zeros, as
//! the reference initialises a missing one.
//!
//! The block ([`SharedExpertMoe`]): `routed_scale · Σ_picked w_e · expert_e(x) + shared(x)`, the
//! experts packed as in [`super::PackedExperts`], the shared expert a plain gated MLP (no
//! gate of its own on its output).
//!
//! Two weight layouts are read. Checkpoints on the Hub (and what transformers' `save_pretrained`
//! writes, through its conversion mapping) keep one MLP per expert (`experts.{e}.gate_proj`, ...),
//! the bias under the experts (`experts.e_score_correction_bias`) and the shared expert as
//! `shared_expert`; the reference's modules hold them packed (`experts.gate_up_proj`), the bias
//! under the router (`gate.e_score_correction_bias`) and `shared_experts`. Either is accepted.

use super::routed::RoutedMoe;
use super::score_routing::{ScoreFn, ScoreRouter};
use super::PackedExperts;
use crate::layers::mlp::{Activation, GatedMlp};
use crate::layers::weight;
use anyhow::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// Sigmoid scores picked by score + correction bias (see [`ScoreRouter`]), routed experts scaled,
/// plus the shared expert (see [`RoutedMoe`]).
#[derive(Debug)]
pub struct SharedExpertMoe(RoutedMoe);

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
        let (h, e) = (shape.hidden, shape.experts);
        let vb_experts = vb.pp("experts");
        let experts = PackedExperts::load_any(&vb_experts, h, e, shape.width, act)?;
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
        let router = ScoreRouter::top_k_with_bias(
            &vb.pp("gate"),
            h,
            e,
            shape.top_k,
            ScoreFn::Sigmoid,
            1.0,
            bias,
        )?;
        let router = match router_logit_softcap {
            Some(cap) => router.with_logit_softcap(cap)?,
            None => router,
        };
        Ok(SharedExpertMoe(
            RoutedMoe::new(router, experts, shared).with_routed_scale(routed_scale)?,
        ))
    }

    /// x `[b, n, hidden]` → `[b, n, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let flat = x.reshape((b * n, d))?; // [tokens, hidden]
        Ok(self.0.forward(&flat, &[])?.reshape((b, n, d))?)
    }
}
