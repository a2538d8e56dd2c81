//! Expert routing by independent per-expert scores, learned top-k or hash-routed (DeepSeek V4's
//! `DeepseekV4TopKRouter` and `DeepseekV4HashRouter`, transformers 5.23.0).
//!
//! Both score every expert from its logit `W x` in f32 (`sqrtsoftplus` = `√softplus`,
//! `sigmoid`, or a softmax over the experts as Qwen3.5's `Qwen3_5MoeTopKRouter` does), and weight
//! the chosen experts by their scores, renormalised to sum to 1 (plus 1e-20) and times
//! `routed_scaling_factor`. They differ in which experts a token gets:
//! - **top-k** (`noaux_tc`): the `k` highest `score + e_score_correction_bias` (ties to the lower
//!   index); the bias only picks, it does not weight;
//! - **hash**: a frozen token-id → experts table, `tid2eid[token]` (`[vocab, k]`): which experts a
//!   token uses never depends on the context.

use super::linear::Linear;
use super::moe::Picks;
use super::weight;
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
        check(top_k, experts)?;
        let correction_bias = if vb.contains_tensor("e_score_correction_bias") {
            weight::get_f32(vb, experts, "e_score_correction_bias")?.to_vec1()?
        } else {
            vec![0.0; experts]
        };
        Ok(ScoreRouter {
            proj: Linear::load_unquantized(vb, hidden, experts, false)?,
            score,
            choice: Choice::TopK { correction_bias },
            top_k,
            routed_scale: routed_scale as f32,
        })
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
        })
    }

    /// x `[tokens, hidden]` (of token ids `ids`) → each token's experts and weights.
    pub fn route(&self, x: &Tensor, ids: &[u32]) -> Result<Vec<Picks>> {
        let logits: Vec<Vec<f32>> = self.proj.forward(x)?.to_dtype(DType::F32)?.to_vec2()?;
        logits
            .iter()
            .zip(ids)
            .map(|(l, &tok)| {
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
                    Choice::Hash { table } => table
                        .get(tok as usize)
                        .ok_or_else(|| anyhow!("token {tok} is outside the hash-routing table"))?
                        .clone(),
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
