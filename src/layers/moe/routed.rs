//! Score-routed experts beside an always-on shared expert: the block DeepSeek V4, Laguna and
//! Qwen3.6 share (each family builds its router; the sum is written once, here).
//!
//! `y = routed_scale · Σ_picked w_e · expert_e(x) + g(x) · shared(x)`, where the picks and their
//! weights come from the [`ScoreRouter`] (DeepSeek V4 folds its `routed_scaling_factor` into the
//! router's weights, Laguna scales here), and `g = sigmoid(shared_gate · x)` where the family
//! gates its shared expert (Qwen3.6), else 1.

use super::score_routing::ScoreRouter;
use super::PackedExperts;
use crate::layers::linear::Linear;
use crate::layers::mlp::GatedMlp;
use anyhow::{bail, Result};
use candle_core::Tensor;

#[derive(Debug)]
pub struct RoutedMoe {
    router: ScoreRouter,
    experts: PackedExperts,
    /// `None` when the shared expert has width 0.
    shared: Option<GatedMlp>,
    /// `[1, hidden]`: a sigmoid gate on the shared expert's output.
    shared_gate: Option<Linear>,
    routed_scale: f64,
}

impl RoutedMoe {
    pub fn new(router: ScoreRouter, experts: PackedExperts, shared: Option<GatedMlp>) -> Self {
        RoutedMoe {
            router,
            experts,
            shared,
            shared_gate: None,
            routed_scale: 1.0,
        }
    }

    /// The shared expert's output times `sigmoid(gate · x)`.
    pub fn with_shared_gate(mut self, gate: Linear) -> Self {
        self.shared_gate = Some(gate);
        self
    }

    /// The routed experts' sum times `scale`.
    pub fn with_routed_scale(mut self, scale: f64) -> Result<Self> {
        if !scale.is_finite() {
            bail!("MoE: routed scaling factor {scale} is not a number");
        }
        self.routed_scale = scale;
        Ok(self)
    }

    /// x `[tokens, hidden]` of tokens `ids` (read by hash routers only) → `[tokens, hidden]`.
    pub fn forward(&self, x: &Tensor, ids: &[u32]) -> Result<Tensor> {
        let picks = self.router.pick(x, ids)?;
        let mut y = self.experts.forward(x, &picks)?;
        if self.routed_scale != 1.0 {
            y = (y * self.routed_scale)?;
        }
        if let Some(shared) = &self.shared {
            let s = shared.forward(x)?;
            let s = match &self.shared_gate {
                Some(g) => s.broadcast_mul(&candle_nn::ops::sigmoid(&g.forward(x)?)?)?, // [n, 1]
                None => s,
            };
            y = (y + s)?;
        }
        Ok(y)
    }
}
