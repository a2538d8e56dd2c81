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

pub mod device_routing;
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
pub use device_routing::{DevicePicks, Routing};

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
    /// The top-k and `per_expert_scale` `[experts]` on the device, made on first use.
    device: std::sync::OnceLock<(device_routing::TopK, Tensor)>,
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
            device: Default::default(),
        })
    }

    /// x `[tokens, hidden]` → the expert probabilities `[tokens, experts]` (f32).
    fn probs(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm.forward(x)?.broadcast_mul(&self.scale)?;
        let h = (h * self.root)?;
        let scores = self.proj.forward(&h)?.to_dtype(DType::F32)?; // [tokens, experts]
        Ok(candle_nn::ops::softmax_last_dim(&scores)?)
    }

    /// x `[tokens, hidden]` → the choice, on the device where [`crate::layers::is_device_step`]
    /// says so (the same experts and weights as [`Self::route`]).
    pub fn pick(&self, x: &Tensor) -> Result<Routing> {
        if !crate::layers::is_device_step(x)? {
            return Ok(Routing::Host(self.route(x)?));
        }
        let (top, scale) = crate::layers::once(&self.device, || {
            let experts = self.per_expert_scale.len();
            Ok((
                device_routing::TopK::new(self.top_k, experts, x.device())?,
                Tensor::from_slice(&self.per_expert_scale, experts, x.device())?,
            ))
        })?;
        let probs = self.probs(x)?; // [n, E]
        let onehot = top.choose(&probs)?;
        let p = top.take(&onehot, &probs)?; // [n, k]
        let scale = top.take(&onehot, &scale.broadcast_as(probs.shape())?)?;
        Ok(Routing::Device(DevicePicks {
            ids: top.ids(&onehot)?,
            weights: p.broadcast_div(&p.sum_keepdim(1)?)?.mul(&scale)?,
        }))
    }

    /// x `[tokens, hidden]` → each token's experts and weights.
    pub fn route(&self, x: &Tensor) -> Result<Vec<Picks>> {
        let probs: Vec<Vec<f32>> = self.probs(x)?.to_vec2()?;
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
    /// On the device path, the packed `[experts, 2·width, hidden]` and `[experts, hidden,
    /// width]` the per-expert matrices are views of: what [`Routing::Device`] gathers from.
    packed: Option<(Tensor, Tensor)>,
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
        Self::from_packed(gate_up, down, width, act)
    }

    /// Experts from the packed tensors (`[experts, 2·width, hidden]`, `[experts, hidden,
    /// width]`), kept for gathering on the device path.
    fn from_packed(gate_up: Tensor, down: Tensor, width: usize, act: Activation) -> Result<Self> {
        let per_expert = |t: &Tensor| -> Result<Vec<Linear>> {
            (0..t.dim(0)?)
                .map(|e| Linear::quantized_from_weight(t.get(e)?, None))
                .collect()
        };
        let (gu, dn) = (per_expert(&gate_up)?, per_expert(&down)?);
        // Gathered only where the experts run as the packed tensors hold them (not quantized).
        let dense = gu
            .iter()
            .chain(&dn)
            .all(|l| l.weight().is_some_and(|w| w.dtype() == gate_up.dtype()));
        let gather = dense && !crate::kernels::fast_cpu(gate_up.device());
        Ok(PackedExperts {
            gate_up: gu,
            down: dn,
            packed: gather.then_some((gate_up, down)),
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
            gate_up.push(Tensor::cat(&[gate, up], 0)?); // [2·width, hidden]
            down.push(weight::get(&vb.pp("down_proj"), (hidden, width), "weight")?);
        }
        if !crate::kernels::fast_cpu(vb.device()) {
            // Packed once, the per-expert matrices views of it (not a second copy).
            return Self::from_packed(
                Tensor::stack(&gate_up, 0)?,
                Tensor::stack(&down, 0)?,
                width,
                act,
            );
        }
        let linears = |ws: Vec<Tensor>| -> Result<Vec<Linear>> {
            ws.into_iter()
                .map(|w| Linear::quantized_from_weight(w, None))
                .collect()
        };
        Ok(PackedExperts {
            gate_up: linears(gate_up)?,
            down: linears(down)?,
            packed: None,
            width,
            act,
            limit: None,
        })
    }

    /// x `[tokens, hidden]` with the router's choice → `[tokens, hidden]`.
    pub fn forward(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        match routing {
            Routing::Host(picks) => self.forward_picks(x, picks),
            Routing::Device(picks) if self.packed.is_some() => self.forward_gathered(x, picks),
            // Quantized experts (`LLMARCH_KERNELS=generic` with q8_0/q4_0) run expert by expert.
            Routing::Device(picks) => self.forward_picks(x, &picks.to_host()?),
        }
    }

    /// [`Self::forward`] on the device: each token's k experts gathered from the packed tensors
    /// and multiplied as one batched product per projection.
    fn forward_gathered(&self, x: &Tensor, picks: &DevicePicks) -> Result<Tensor> {
        let Some((gate_up, down)) = &self.packed else {
            bail!("internal: gathering experts that are not packed");
        };
        let (n, hidden) = x.dims2()?;
        let k = picks.ids.dim(1)?;
        let ids = picks.ids.flatten_all()?; // [n·k]
        let xs = x
            .unsqueeze(1)?
            .broadcast_as((n, k, hidden))?
            .reshape((n * k, 1, hidden))?; // [n·k, 1, hidden]
        let gu = xs.matmul(&gate_up.index_select(&ids, 0)?.transpose(1, 2)?)?; // [n·k, 1, 2·width]
        let (gate, up) = swiglu_clamp(
            gu.narrow(2, 0, self.width)?,
            gu.narrow(2, self.width, self.width)?,
            self.limit,
        )?;
        let h = self.act.gated(&gate, &up)?; // [n·k, 1, width]
        let y = h.matmul(&down.index_select(&ids, 0)?.transpose(1, 2)?)?; // [n·k, 1, hidden]
        let y = y
            .to_dtype(DType::F32)?
            .reshape((n, k, hidden))?
            .broadcast_mul(&picks.weights.unsqueeze(2)?)?
            .sum(1)?; // [n, hidden]
        Ok(y.to_dtype(x.dtype())?)
    }

    /// [`Self::forward`] from picks on the host: each expert runs on the tokens routed to it.
    fn forward_picks(&self, x: &Tensor, picks: &[Picks]) -> Result<Tensor> {
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
