//! Expert routing by per-expert scores, learned top-k or hash-routed: DeepSeek V4's
//! `DeepseekV4TopKRouter` and `DeepseekV4HashRouter`, Laguna's sigmoid router (with its logit
//! soft-cap) and Qwen3.5's softmax router (transformers 5.23.0).
//!
//! Both score every expert from its logit `W x` in f32 (`sqrtsoftplus` = `√softplus`,
//! `sigmoid`, or a softmax over the experts as Qwen3.5's `Qwen3_5MoeTopKRouter` does), and weight
//! the chosen experts by their scores, renormalised to sum to 1 (plus 1e-20) and times
//! `routed_scaling_factor`. They differ in which experts a token gets:
//! - **top-k** (`noaux_tc`): the `k` highest `score + e_score_correction_bias` (ties to the lower
//!   index); the bias only picks, it does not weight;
//! - **hash**: a frozen token-id → experts table, `tid2eid[token]` (`[vocab, k]`): which experts a
//!   token uses never depends on the context.

use super::device_routing::{DevicePicks, Routing, TopK};
use super::Picks;
use crate::layers::embedding::softcap;
use crate::layers::linear::Linear;
use crate::layers::weight;
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};

/// The per-expert score of a router logit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreFn {
    /// `√softplus(x)` (`sqrtsoftplus`).
    SqrtSoftplus,
    Sigmoid,
    /// A softmax over the experts' logits.
    Softmax,
}

impl ScoreFn {
    /// The config's `scoring_func`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "sqrtsoftplus" => Ok(ScoreFn::SqrtSoftplus),
            "sigmoid" => Ok(ScoreFn::Sigmoid),
            "softmax" => Ok(ScoreFn::Softmax),
            other => bail!(
                "scoring function `{other}` is not supported (sqrtsoftplus, sigmoid, softmax)"
            ),
        }
    }

    /// [`Self::apply`] as tensor ops: logits `[tokens, experts]` (f32) → scores.
    fn apply_tensor(self, logits: &Tensor) -> Result<Tensor> {
        Ok(match self {
            ScoreFn::SqrtSoftplus => crate::layers::output_gate::softplus(logits)?.sqrt()?,
            ScoreFn::Sigmoid => candle_nn::ops::sigmoid(logits)?,
            ScoreFn::Softmax => candle_nn::ops::softmax_last_dim(logits)?,
        })
    }

    /// The scores of one token's logits.
    fn apply(self, logits: &[f32]) -> Vec<f32> {
        match self {
            // softplus as torch computes it: linear above 20.
            ScoreFn::SqrtSoftplus => logits
                .iter()
                .map(|&x| {
                    if x > 20.0 {
                        x.sqrt()
                    } else {
                        x.exp().ln_1p().sqrt()
                    }
                })
                .collect(),
            ScoreFn::Sigmoid => logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
            ScoreFn::Softmax => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                e.into_iter().map(|x| x / sum).collect()
            }
        }
    }
}

/// How the experts are chosen.
#[derive(Debug)]
enum Choice {
    /// The top-k of score + correction bias.
    TopK { correction_bias: Vec<f32> },
    /// `tid2eid[token]`, `[vocab][k]`.
    Hash { table: Vec<Vec<usize>> },
}

#[derive(Debug)]
pub struct ScoreRouter {
    /// `[experts, hidden]`.
    proj: Linear,
    score: ScoreFn,
    choice: Choice,
    top_k: usize,
    routed_scale: f32,
    /// `cap · tanh(logit / cap)` before scoring (Laguna's `moe_router_logit_softcapping`).
    logit_softcap: Option<f64>,
    /// The choice's constants on the device, made on first use.
    device: std::sync::OnceLock<DeviceChoice>,
}

/// [`Choice`] on the device.
#[derive(Debug)]
enum DeviceChoice {
    /// The top-k, and the correction bias `[experts]`.
    TopK { top: TopK, bias: Tensor },
    /// The table `[vocab, k]` (u32).
    Hash { table: Tensor },
}

impl ScoreRouter {
    /// Learned top-k: reads `weight` `[experts, hidden]` and `e_score_correction_bias`
    /// `[experts]` (zeros when absent, as the reference's buffer starts) under `vb`.
    pub fn top_k(
        vb: &VarBuilder,
        hidden: usize,
        experts: usize,
        top_k: usize,
        score: ScoreFn,
        routed_scale: f64,
    ) -> Result<Self> {
        let bias = if vb.contains_tensor("e_score_correction_bias") {
            Some(weight::get_f32(vb, experts, "e_score_correction_bias")?)
        } else {
            None
        };
        Self::top_k_with_bias(vb, hidden, experts, top_k, score, routed_scale, bias)
    }

    /// Learned top-k with the correction bias `[experts]` given (any dtype; zeros when `None`),
    /// for checkpoints that keep it elsewhere (Laguna's Hub layout: under the experts).
    pub fn top_k_with_bias(
        vb: &VarBuilder,
        hidden: usize,
        experts: usize,
        top_k: usize,
        score: ScoreFn,
        routed_scale: f64,
        bias: Option<Tensor>,
    ) -> Result<Self> {
        check(top_k, experts)?;
        let correction_bias = match bias {
            Some(b) if b.dims() == [experts] => b.to_dtype(DType::F32)?.to_vec1()?,
            Some(b) => bail!(
                "router: score-correction bias of shape {:?} for {experts} experts",
                b.dims()
            ),
            None => vec![0.0; experts],
        };
        Ok(ScoreRouter {
            proj: Linear::load_unquantized(vb, hidden, experts, false)?,
            score,
            choice: Choice::TopK { correction_bias },
            top_k,
            routed_scale: routed_scale as f32,
            logit_softcap: None,
            device: Default::default(),
        })
    }

    /// This router with its logits soft-capped at `cap` before scoring.
    pub fn with_logit_softcap(mut self, cap: f64) -> Result<Self> {
        if !(cap.is_finite() && cap > 0.0) {
            bail!("router: logit soft-cap {cap} must be a positive number");
        }
        self.logit_softcap = Some(cap);
        Ok(self)
    }

    /// Hash routing: reads `weight` `[experts, hidden]` and the integer table `tid2eid`
    /// `[vocab, top_k]` under `vb`; every entry must name an expert.
    pub fn hash(
        vb: &VarBuilder,
        hidden: usize,
        experts: usize,
        top_k: usize,
        vocab: usize,
        score: ScoreFn,
        routed_scale: f64,
    ) -> Result<Self> {
        check(top_k, experts)?;
        let name = weight::full_name(vb, "tid2eid");
        if !vb.contains_tensor("tid2eid") {
            bail!("tensor `{name}` (the hash-routing table) is missing from the checkpoint");
        }
        let table = vb
            .get_with_hints_dtype((vocab, top_k), "tid2eid", Init::Const(0.0), DType::I64)
            .map_err(|e| anyhow!("tensor `{name}`: {e}"))?;
        let table: Vec<Vec<i64>> = table.to_vec2()?;
        let table = table
            .into_iter()
            .enumerate()
            .map(|(tok, row)| {
                row.into_iter()
                    .map(|e| {
                        usize::try_from(e).ok().filter(|&e| e < experts).ok_or_else(|| {
                            anyhow!("tensor `{name}`: token {tok} routes to expert {e}, but there are {experts}")
                        })
                    })
                    .collect::<Result<Vec<usize>>>()
            })
            .collect::<Result<_>>()?;
        Ok(ScoreRouter {
            proj: Linear::load_unquantized(vb, hidden, experts, false)?,
            score,
            choice: Choice::Hash { table },
            top_k,
            routed_scale: routed_scale as f32,
            logit_softcap: None,
            device: Default::default(),
        })
    }

    /// x `[tokens, hidden]` → the router logits `[tokens, experts]` (f32), soft-capped.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let logits = self.proj.forward(x)?.to_dtype(DType::F32)?;
        match self.logit_softcap {
            Some(cap) => softcap(&logits, cap),
            None => Ok(logits),
        }
    }

    /// [`Self::route`] as a [`Routing`]: on the device where [`crate::layers::is_device_step`] says
    /// so (the same experts; the scores through tensor ops, equal within an f32 rounding).
    pub fn pick(&self, x: &Tensor, ids: &[u32]) -> Result<Routing> {
        if !crate::layers::is_device_step(x)? {
            return Ok(Routing::Host(self.route(x, ids)?));
        }
        let dev = x.device();
        let choice = crate::layers::once(&self.device, || {
            Ok(match &self.choice {
                Choice::TopK { correction_bias } => DeviceChoice::TopK {
                    top: TopK::new(self.top_k, correction_bias.len(), dev)?,
                    bias: Tensor::from_slice(correction_bias, correction_bias.len(), dev)?,
                },
                Choice::Hash { table } => {
                    let flat: Vec<u32> = table.iter().flatten().map(|&e| e as u32).collect();
                    DeviceChoice::Hash {
                        table: Tensor::from_vec(flat, (table.len(), self.top_k), dev)?,
                    }
                }
            })
        })?;
        let s = self.score.apply_tensor(&self.logits(x)?)?; // [n, E]
        let (chosen, picked) = match choice {
            DeviceChoice::TopK { top, bias } => {
                let onehot = top.choose(&s.broadcast_add(bias)?)?;
                (top.ids(&onehot)?, top.take(&onehot, &s)?)
            }
            DeviceChoice::Hash { table } => {
                let n = x.dim(0)?;
                if ids.len() != n {
                    bail!(
                        "internal: hash routing of {n} tokens given {} ids",
                        ids.len()
                    );
                }
                let vocab = table.dim(0)?;
                if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                    bail!("token {bad} is outside the hash-routing table");
                }
                let chosen = table.index_select(&Tensor::from_slice(ids, n, dev)?, 0)?; // [n, k]
                let picked = s.gather(&chosen.contiguous()?, 1)?;
                (chosen, picked)
            }
        };
        let sum = (picked.sum_keepdim(1)? + 1e-20)?;
        Ok(Routing::Device(DevicePicks {
            ids: chosen,
            weights: (picked.broadcast_div(&sum)? * f64::from(self.routed_scale))?,
        }))
    }

    /// x `[tokens, hidden]` → each token's experts and weights. `ids` (the tokens' ids) are
    /// read by hash routing only; top-k routers take `&[]`.
    pub fn route(&self, x: &Tensor, ids: &[u32]) -> Result<Vec<Picks>> {
        let logits: Vec<Vec<f32>> = self.logits(x)?.to_vec2()?;
        logits
            .iter()
            .enumerate()
            .map(|(t, l)| {
                let s = self.score.apply(l);
                let chosen: Vec<usize> = match &self.choice {
                    Choice::TopK { correction_bias } => {
                        let key: Vec<f32> =
                            s.iter().zip(correction_bias).map(|(a, b)| a + b).collect();
                        let mut idx: Vec<usize> = (0..s.len()).collect();
                        idx.sort_by(|&a, &b| key[b].total_cmp(&key[a]).then(a.cmp(&b)));
                        idx.truncate(self.top_k);
                        idx
                    }
                    Choice::Hash { table } => {
                        let tok = *ids.get(t).ok_or_else(|| {
                            anyhow!("internal: hash routing without the token ids")
                        })?;
                        table
                            .get(tok as usize)
                            .ok_or_else(|| {
                                anyhow!("token {tok} is outside the hash-routing table")
                            })?
                            .clone()
                    }
                };
                let sum: f32 = chosen.iter().map(|&e| s[e]).sum::<f32>() + 1e-20;
                Ok(chosen
                    .into_iter()
                    .map(|e| (e, s[e] / sum * self.routed_scale))
                    .collect())
            })
            .collect()
    }
}

fn check(top_k: usize, experts: usize) -> Result<()> {
    if top_k == 0 || top_k > experts {
        bail!("router: top-{top_k} of {experts} experts");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sigmoid_router(w: &[[f32; 2]; 3], bias: Vec<f32>, cap: Option<f64>) -> ScoreRouter {
        ScoreRouter {
            proj: Linear::from_weight(Tensor::new(w, &candle_core::Device::Cpu).unwrap(), None),
            score: ScoreFn::Sigmoid,
            choice: Choice::TopK {
                correction_bias: bias,
            },
            top_k: 2,
            routed_scale: 1.0,
            logit_softcap: cap,
            device: Default::default(),
        }
    }

    #[test]
    fn bias_picks_but_scores_weigh() {
        // Logits for x = [1, 0]: [2, 1, 0]. Without the bias experts 0, 1 win; a bias of +1 on
        // expert 2 picks it over expert 1, but its weight comes from its own plain score.
        let w = [[2f32, 0.0], [1.0, 0.0], [0.0, 0.0]];
        let x = Tensor::new(&[[1f32, 0.0]], &candle_core::Device::Cpu).unwrap();
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        let p = &sigmoid_router(&w, vec![0.0; 3], None)
            .route(&x, &[])
            .unwrap()[0];
        assert_eq!((p[0].0, p[1].0), (0, 1));
        assert!((p[0].1 - sig(2.0) / (sig(2.0) + sig(1.0))).abs() < 1e-6);
        let p = &sigmoid_router(&w, vec![0.0, 0.0, 1.0], None)
            .route(&x, &[])
            .unwrap()[0];
        assert_eq!((p[0].0, p[1].0), (2, 0));
        assert!((p[0].1 - sig(0.0) / (sig(0.0) + sig(2.0))).abs() < 1e-6);
        assert!((p[0].1 + p[1].1 - 1.0).abs() < 1e-6);
        // A soft-cap of 1 squeezes the logits to tanh(2), tanh(1).
        let p = &sigmoid_router(&w, vec![0.0; 3], Some(1.0))
            .route(&x, &[])
            .unwrap()[0];
        let (a, b) = (sig(2f32.tanh()), sig(1f32.tanh()));
        assert!((p[0].1 - a / (a + b)).abs() < 1e-6);
    }

    #[test]
    fn scores_match_torch() {
        // torch: F.softplus(x).sqrt() at -3, 0, 2, 25.
        let f = ScoreFn::SqrtSoftplus;
        for (x, want) in [
            (-3.0f32, 0.220_425_4),
            (0.0, 0.832_554_6),
            (2.0, 1.458_399_2),
            (25.0, 5.0),
        ] {
            let got = f.apply(&[x])[0];
            assert!((got - want).abs() < 1e-5, "{x}: {got}");
        }
        assert!((ScoreFn::Sigmoid.apply(&[0.0])[0] - 0.5).abs() < 1e-7);
        let p = ScoreFn::Softmax.apply(&[0.0, 2f32.ln()]);
        assert!((p[0] - 1.0 / 3.0).abs() < 1e-6 && (p[1] - 2.0 / 3.0).abs() < 1e-6);
        assert!(ScoreFn::from_name("relu").is_err());
    }
}
