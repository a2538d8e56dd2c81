//! Mixture of experts, every kind in one place: the experts ([`PackedExperts`], shared by all)
//! and the routers that pick them: this file's softmax top-k router (Gemma 4), the score
//! routers ([`score_routing`]: sigmoid / √softplus / softmax scores, learned top-k or a token
//! hash; DeepSeek V4, Laguna, Qwen3.6), the MLP router with a skip class ([`mlp_router`]:
//! ZAYA), and the sigmoid-routed block with an always-on shared expert ([`sigmoid`]: Laguna).
//!
//! Mixture of experts: a softmax top-k router with per-expert scales, and experts read packed as
//! 3-D tensors (`gate_up_proj` `[experts, 2·width, hidden]`, `down_proj` `[experts, hidden, width]`;
//! a checkpoint with one `gate_proj`/`up_proj`/`down_proj` per expert is packed at load). Each
//! expert's two matrices are [`Linear`]s (views of the packed tensors), so they take the same
//! kernels and quantize at load like every projection; routers never do (a rounding error would
//! change which experts run).
//!
//! Routing (Gemma 4's `Gemma4TextRouter`): scale-less RMS norm of the input, times a learned
//! `[hidden]` scale and `hidden^-½`, a linear map to expert scores, softmax in f32, the top k,
//! renormalised to sum to 1, each times its expert's `per_expert_scale`. The experts run on the
//! tokens routed to them, in expert order, and their outputs are added weighted.

pub mod mlp_router;
pub mod routed;
pub mod score_routing;
pub mod sigmoid;

use super::linear::Linear;
use super::mlp::{swiglu_clamp, Activation};
use super::norm::RmsNorm;
use super::weight;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

/// Which experts a token uses, with their weights.
pub type Picks = Vec<(usize, f32)>;

#[derive(Debug)]
pub struct SoftmaxTopKRouter {
    norm: RmsNorm,
    /// `[hidden]`, model dtype.
    scale: Tensor,
    root: f64,
    proj: Linear,
    per_expert_scale: Vec<f32>,
    top_k: usize,
}

impl SoftmaxTopKRouter {
    /// Reads `proj` `[experts, hidden]`, `scale` `[hidden]`, `per_expert_scale` `[experts]`.
    pub fn load(
        vb: &VarBuilder,
        hidden: usize,
        experts: usize,
        top_k: usize,
        eps: f64,
    ) -> Result<Self> {
        if top_k == 0 || top_k > experts {
            bail!("router: top-{top_k} of {experts} experts");
        }
        Ok(SoftmaxTopKRouter {
            norm: RmsNorm::plain(eps),
            scale: weight::get(vb, hidden, "scale")?,
            root: (hidden as f64).powf(-0.5),
            proj: Linear::load_unquantized(&vb.pp("proj"), hidden, experts, false)?,
            per_expert_scale: weight::get(vb, experts, "per_expert_scale")?
                .to_dtype(DType::F32)?
                .to_vec1()?,
            top_k,
        })
    }

    /// x `[tokens, hidden]` → each token's experts and weights.
    pub fn route(&self, x: &Tensor) -> Result<Vec<Picks>> {
        let h = self.norm.forward(x)?.broadcast_mul(&self.scale)?;
        let h = (h * self.root)?;
        let scores = self.proj.forward(&h)?.to_dtype(DType::F32)?; // [tokens, experts]
        let probs: Vec<Vec<f32>> = candle_nn::ops::softmax_last_dim(&scores)?.to_vec2()?;
        Ok(probs
            .iter()
            .map(|p| {
                let mut idx: Vec<usize> = (0..p.len()).collect();
                // Highest first; ties to the lower index.
                idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
                idx.truncate(self.top_k);
                let sum: f32 = idx.iter().map(|&e| p[e]).sum();
                idx.iter()
                    .map(|&e| (e, p[e] / sum * self.per_expert_scale[e]))
                    .collect()
            })
            .collect())
    }
}

#[derive(Debug)]
pub struct PackedExperts {
    /// Per expert `[2·width, hidden]`: gate rows then up rows.
    gate_up: Vec<Linear>,
    /// Per expert `[hidden, width]`.
    down: Vec<Linear>,
    width: usize,
    act: Activation,
    limit: Option<f64>,
}

impl PackedExperts {
    /// These experts with their gate and up projections clamped by `limit` (DeepSeek V4's
    /// `swiglu_limit`; see [`swiglu_clamp`]).
    pub fn with_swiglu_limit(mut self, limit: f64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Reads `gate_up_proj` and `down_proj` under `vb`.
    pub fn load(
        vb: &VarBuilder,
        hidden: usize,
        experts: usize,
        width: usize,
        act: Activation,
    ) -> Result<Self> {
        let gate_up = weight::get(vb, (experts, 2 * width, hidden), "gate_up_proj")?;
        let down = weight::get(vb, (experts, hidden, width), "down_proj")?;
        let per_expert = |t: &Tensor| -> Result<Vec<Linear>> {
            (0..experts)
                .map(|e| Linear::quantized_from_weight(t.get(e)?, None))
                .collect()
        };
        Ok(PackedExperts {
            gate_up: per_expert(&gate_up)?,
            down: per_expert(&down)?,
            width,
            act,
            limit: None,
        })
    }

    /// Reads either layout: packed (`gate_up_proj`, the reference's modules) or one MLP per
    /// expert (what the Hub's checkpoints hold; see [`PackedExperts::load_per_expert`]).
    pub fn load_any(
        vb: &VarBuilder,
        hidden: usize,
        experts: usize,
        width: usize,
        act: Activation,
    ) -> Result<Self> {
        if vb.contains_tensor("gate_up_proj") {
            Self::load(vb, hidden, experts, width, act)
        } else {
            Self::load_per_expert(vb, hidden, experts, width, act)
        }
    }

    /// Reads the per-expert layout many checkpoints use (`{e}.gate_proj.weight`,
    /// `{e}.up_proj.weight` `[width, hidden]`, `{e}.down_proj.weight` `[hidden, width]` for
    /// `e < experts`) and packs it.
    pub fn load_per_expert(
        vb: &VarBuilder,
        hidden: usize,
        experts: usize,
        width: usize,
        act: Activation,
    ) -> Result<Self> {
        let mut gate_up = Vec::with_capacity(experts);
        let mut down = Vec::with_capacity(experts);
        for e in 0..experts {
            let vb = vb.pp(e);
            let gate = weight::get(&vb.pp("gate_proj"), (width, hidden), "weight")?;
            let up = weight::get(&vb.pp("up_proj"), (width, hidden), "weight")?;
            let gu = Tensor::cat(&[gate, up], 0)?; // [2·width, hidden]
            gate_up.push(Linear::quantized_from_weight(gu, None)?);
            let d = weight::get(&vb.pp("down_proj"), (hidden, width), "weight")?;
            down.push(Linear::quantized_from_weight(d, None)?);
        }
        Ok(PackedExperts {
            gate_up,
            down,
            width,
            act,
            limit: None,
        })
    }

    /// x `[tokens, hidden]` with each token's picks → `[tokens, hidden]`.
    pub fn forward(&self, x: &Tensor, picks: &[Picks]) -> Result<Tensor> {
        let experts = self.gate_up.len();
        let mut routed: Vec<(Vec<u32>, Vec<f32>)> = vec![(vec![], vec![]); experts];
        for (t, p) in picks.iter().enumerate() {
            for &(e, w) in p {
                let slot = routed
                    .get_mut(e)
                    .ok_or_else(|| anyhow::anyhow!("internal: expert {e} of {experts}"))?;
                slot.0.push(t as u32);
                slot.1.push(w);
            }
        }
        let dev = x.device();
        let mut out = x.zeros_like()?;
        for (e, (tokens, weights)) in routed.into_iter().enumerate() {
            if tokens.is_empty() {
                continue;
            }
            let n = tokens.len();
            let idx = Tensor::from_vec(tokens, n, dev)?;
            let w = Tensor::from_vec(weights, (n, 1), dev)?;
            let xs = x.index_select(&idx, 0)?; // [n, hidden]
            let gu = self.gate_up[e].forward(&xs)?; // [n, 2·width]
            let (gate, up) = swiglu_clamp(
                gu.narrow(1, 0, self.width)?,
                gu.narrow(1, self.width, self.width)?,
                self.limit,
            )?;
            let h = self.act.gated(&gate, &up)?; // [n, width]
            let y = self.down[e].forward(&h)?; // [n, hidden]
            let y = y
                .to_dtype(DType::F32)?
                .broadcast_mul(&w)?
                .to_dtype(x.dtype())?;
            out = out.index_add(&idx, &y, 0)?;
        }
        Ok(out)
    }
}
