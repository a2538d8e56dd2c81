//! An MLP expert router with a skip class and a router state carried from layer to layer (ZAYA's
//! `ZayaRouter`; reference: transformers 5.23.0 `models/zaya/modeling_zaya.py`).
//! Its matrices are never quantized at load: they decide which experts run.
//!
//! Per token x `[hidden]`:
//! 1. `r = down_proj x` (`router_hidden_size`, with bias); from the second layer on (EDA), plus
//!    the previous layer's `r` times a learned `router_states_scale`. This `r` is the state handed
//!    to the next layer's router (within one forward, token by token: nothing is cached across
//!    forwards);
//! 2. logits over `experts + 1` classes: RMS norm, `GELU(fc1 ·)`, `GELU(fc2 ·)` (exact erf GELU),
//!    `out_proj`;
//! 3. `p = softmax(logits)`; the top k of `p + balancing_biases` (ties to the lower index) are
//!    picked, each weighted by its **unbiased, unrenormalised** `p`;
//! 4. the extra last class is the skip class: a token routed there gets no expert output.
//!
//! Surprising: the reference's `from_pretrained` loads `balancing_biases` from the checkpoint and
//! then its `_init_weights` overwrites the skip-class entry with −1 unconditionally, so whatever
//! the file holds there, transformers routes with −1. This router does the same (and uses the
//! reference's init, zeros and −1, when the checkpoint has no `balancing_biases`).

use super::device_routing::{DevicePicks, Routing, TopK};
use super::Picks;
use crate::layers::linear::Linear;
use crate::layers::norm::RmsNorm;
use crate::layers::weight;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

/// What the skip-class balancing bias always is in the reference.
pub const SKIP_CLASS_BIAS: f32 = -1.0;

#[derive(Debug)]
pub struct MlpRouter {
    down_proj: Linear,
    /// `[router_hidden]`: scales the previous layer's router state (EDA); `None` on the first layer.
    state_scale: Option<Tensor>,
    norm: RmsNorm,
    fc1: Linear,
    fc2: Linear,
    out_proj: Linear,
    /// `[experts + 1]`, the skip class last.
    balancing: Vec<f32>,
    experts: usize,
    top_k: usize,
    /// The top-k over the classes and `balancing` on the device, made on first use.
    device: std::sync::OnceLock<(TopK, Tensor)>,
}

impl MlpRouter {
    /// Reads `down_proj`, `router_states_scale` (when `eda`), `router_mlp.{norm,fc1,fc2,out_proj}`
    /// and `balancing_biases` under `vb`.
    pub fn load(
        vb: &VarBuilder,
        hidden: usize,
        router_hidden: usize,
        experts: usize,
        top_k: usize,
        eda: bool,
        eps: f64,
    ) -> Result<Self> {
        let classes = experts + 1;
        if top_k == 0 || top_k > classes {
            bail!("router: top-{top_k} of {classes} classes");
        }
        let m = vb.pp("router_mlp");
        let mut balancing = match weight::get_opt(vb, classes, "balancing_biases")? {
            Some(t) => t.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            None => vec![0.0; classes],
        };
        balancing[experts] = SKIP_CLASS_BIAS;
        Ok(MlpRouter {
            down_proj: Linear::load_unquantized(&vb.pp("down_proj"), hidden, router_hidden, true)?,
            state_scale: if eda {
                Some(weight::get(vb, router_hidden, "router_states_scale")?)
            } else {
                None
            },
            norm: RmsNorm::load(&m.pp("norm"), router_hidden, eps)?,
            fc1: Linear::load_unquantized(&m.pp("fc1"), router_hidden, router_hidden, true)?,
            fc2: Linear::load_unquantized(&m.pp("fc2"), router_hidden, router_hidden, true)?,
            out_proj: Linear::load_unquantized(&m.pp("out_proj"), router_hidden, classes, false)?,
            balancing,
            experts,
            top_k,
            device: Default::default(),
        })
    }

    /// [`Self::route`] as a [`Routing`]: on the device where [`crate::layers::is_device_step`] says
    /// so, a skip-class pick weighing 0 (on expert 0) instead of dropped.
    pub fn pick(&self, x: &Tensor, prev: Option<&Tensor>) -> Result<(Routing, Tensor)> {
        if !crate::layers::is_device_step(x)? {
            let (picks, state) = self.route(x, prev)?;
            return Ok((Routing::Host(picks), state));
        }
        let (top, balancing) = crate::layers::once(&self.device, || {
            let classes = self.balancing.len();
            Ok((
                TopK::new(self.top_k, classes, x.device())?,
                Tensor::from_slice(&self.balancing, classes, x.device())?,
            ))
        })?;
        let (probs, state) = self.probs(x, prev)?; // [tokens, E + 1]
        let onehot = top.choose(&probs.broadcast_add(balancing)?)?;
        let ids = top.ids(&onehot)?; // [tokens, k]
        let expert = ids.lt(self.experts as u32)?; // the skip class is the last
        let weights = (top.take(&onehot, &probs)? * expert.to_dtype(DType::F32)?)?;
        let ids = expert.where_cond(&ids, &ids.zeros_like()?)?;
        Ok((Routing::Device(DevicePicks { ids, weights }), state))
    }

    /// The class probabilities `[tokens, E + 1]` (f32, rounded through the model dtype) and this
    /// layer's state `[b, n, router_hidden]`.
    fn probs(&self, x: &Tensor, prev: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let mut r = self.down_proj.forward(x)?; // [b, n, rh]
        if let (Some(scale), Some(prev)) = (&self.state_scale, prev) {
            r = (r + prev.broadcast_mul(scale)?)?;
        }
        let h = self.norm.forward(&r)?;
        let h = self.fc1.forward(&h)?.gelu_erf()?;
        let h = self.fc2.forward(&h)?.gelu_erf()?;
        let logits = self.out_proj.forward(&h)?.to_dtype(DType::F32)?; // [b, n, E + 1]
        let classes = self.experts + 1;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?
            .to_dtype(x.dtype())? // the reference's softmax runs in the model dtype
            .to_dtype(DType::F32)?
            .reshape(((), classes))?;
        Ok((probs, r))
    }

    /// x `[b, n, hidden]` and the previous layer's state `[b, n, router_hidden]` → each token's
    /// expert picks (skip-class picks dropped) and this layer's state `[b, n, router_hidden]`.
    pub fn route(&self, x: &Tensor, prev: Option<&Tensor>) -> Result<(Vec<Picks>, Tensor)> {
        let classes = self.experts + 1;
        let (probs, r) = self.probs(x, prev)?;
        let probs: Vec<Vec<f32>> = probs.to_vec2()?;
        let picks = probs
            .iter()
            .map(|p| {
                let biased: Vec<f32> = p.iter().zip(&self.balancing).map(|(a, b)| a + b).collect();
                let mut idx: Vec<usize> = (0..classes).collect();
                idx.sort_by(|&a, &b| biased[b].total_cmp(&biased[a]).then(a.cmp(&b)));
                idx.truncate(self.top_k);
                idx.into_iter()
                    .filter(|&e| e < self.experts)
                    .map(|e| (e, p[e]))
                    .collect()
            })
            .collect();
        Ok((picks, r))
    }
}
