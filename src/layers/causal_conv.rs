//! Causal 1-D convolutions along time, with the input history carried across calls.
//!
//! A [`CausalConvStack`] runs "valid" (unpadded) convolutions one after another over the channels
//! of a `[b, n, C]` sequence. To stay causal and keep `n` outputs, the input is preceded by the
//! last `history = Σ (kernel − 1)` input rows: zeros before the first token, then whatever the
//! previous call left (the carried state, `[b, C, history]`). So prefill followed by decode steps
//! computes exactly what one forward over the whole sequence does — the reference's
//! `ZayaCCAProjection` pads `qk_states` on the left and keeps `qk_states[..., -history:]` the same
//! way.
//!
//! Each conv ([`ValidConv1d`], PyTorch `nn.Conv1d` with `padding=0`, `stride=1`) has a kernel of
//! `k` taps, `groups` groups and a bias. Depthwise (`groups = C`) is a sum of `k` per-channel
//! scaled shifts; grouped convs are `k` batched matmuls of `[groups, C/g, C/g]` taps over
//! `[b, groups, C/g, t]` slices. No padding-mask is applied (batch 1, no padding tokens).

use super::weight;
use anyhow::{bail, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// `nn.Conv1d(C, C, kernel, groups)` without padding: `[b, C, t]` → `[b, C, t − kernel + 1]`.
#[derive(Debug)]
pub struct ValidConv1d {
    channels: usize,
    kernel: usize,
    groups: usize,
    /// One `[groups, C/g, C/g]` matrix per tap (grouped), or one `[1, C, 1]` scale per tap
    /// (depthwise).
    taps: Vec<Tensor>,
    /// `[1, C, 1]`.
    bias: Option<Tensor>,
}

impl ValidConv1d {
    /// Reads `weight` `[C, C/groups, kernel]` and `bias` `[C]` (if present) under `vb`.
    pub fn load(vb: &VarBuilder, channels: usize, groups: usize, kernel: usize) -> Result<Self> {
        if kernel == 0 || groups == 0 || !channels.is_multiple_of(groups) {
            bail!(
                "conv `{}`: {channels} channels in {groups} groups, kernel {kernel}",
                vb.prefix()
            );
        }
        let per = channels / groups;
        let w = weight::get(vb, (channels, per, kernel), "weight")?; // [C, C/g, k]
        let bias = weight::get_opt(vb, channels, "bias")?
            .map(|b| b.reshape((1, channels, 1)))
            .transpose()?;
        let mut taps = Vec::with_capacity(kernel);
        for j in 0..kernel {
            let tap = w.narrow(2, j, 1)?.squeeze(2)?; // [C, C/g]
            taps.push(if per == 1 {
                tap.reshape((1, channels, 1))?
            } else {
                tap.reshape((groups, per, per))?.contiguous()? // [g, out, in]
            });
        }
        Ok(ValidConv1d {
            channels,
            kernel,
            groups,
            taps,
            bias,
        })
    }

    pub fn kernel(&self) -> usize {
        self.kernel
    }

    /// x `[b, C, t]` → `[b, C, t − kernel + 1]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, t) = x.dims3()?;
        if c != self.channels || t < self.kernel {
            bail!(
                "internal: conv over {c} channels × {t} steps, built for {} × kernel {}",
                self.channels,
                self.kernel
            );
        }
        let out_t = t - self.kernel + 1;
        let per = self.channels / self.groups;
        let mut y: Option<Tensor> = None;
        for (j, tap) in self.taps.iter().enumerate() {
            let xs = x.narrow(2, j, out_t)?; // [b, C, out_t]
            let term = if per == 1 {
                xs.broadcast_mul(tap)?
            } else {
                let xs = xs.contiguous()?.reshape((b, self.groups, per, out_t))?;
                tap.broadcast_matmul(&xs)?.reshape((b, c, out_t))? // [b, C, out_t]
            };
            y = Some(match y {
                Some(acc) => (acc + term)?,
                None => term,
            });
        }
        let y = y.ok_or_else(|| anyhow::anyhow!("internal: conv without taps"))?;
        Ok(match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        })
    }
}

/// Valid convolutions in sequence, made causal by the carried input history.
#[derive(Debug)]
pub struct CausalConvStack {
    channels: usize,
    convs: Vec<ValidConv1d>,
}

impl CausalConvStack {
    pub fn new(channels: usize, convs: Vec<ValidConv1d>) -> Result<Self> {
        if convs.iter().any(|c| c.channels != channels) {
            bail!("internal: convs of a stack differ in channels");
        }
        Ok(CausalConvStack { channels, convs })
    }

    /// Input rows carried between calls: `Σ (kernel − 1)`.
    pub fn history(&self) -> usize {
        self.convs.iter().map(|c| c.kernel - 1).sum()
    }

    /// x `[b, n, C]` after the inputs held in `state` `[b, C, history]` (zeros when `None`: the
    /// start of the sequence) → (`[b, n, C]`, the new state `[b, C, history]`, `None` when
    /// nothing is carried).
    pub fn forward(&self, x: &Tensor, state: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        let (b, n, c) = x.dims3()?;
        if c != self.channels {
            bail!("internal: conv stack of {} channels fed {c}", self.channels);
        }
        let r = self.history();
        let xt = x.transpose(1, 2)?; // [b, C, n]
        let padded = if r == 0 {
            xt.contiguous()?
        } else {
            let prev = match state {
                Some(s) => {
                    if s.dims() != [b, c, r] {
                        bail!(
                            "internal: conv state {:?}, expected {:?}",
                            s.dims(),
                            [b, c, r]
                        );
                    }
                    s.to_dtype(x.dtype())?
                }
                None => Tensor::zeros((b, c, r), x.dtype(), x.device())?,
            };
            Tensor::cat(&[&prev, &xt], 2)? // [b, C, r + n]
        };
        let new_state = if r == 0 {
            None
        } else {
            Some(padded.narrow(2, n, r)?.contiguous()?) // the last r input rows
        };
        let mut y = padded;
        for conv in &self.convs {
            y = conv.forward(&y)?;
        }
        Ok((y.transpose(1, 2)?.contiguous()?, new_state)) // [b, n, C]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    fn stack(dev: &Device) -> CausalConvStack {
        let c = 6;
        let mut ts = HashMap::new();
        ts.insert(
            "a.weight".into(),
            Tensor::randn(0f32, 1.0, (c, 1, 3), dev).unwrap(),
        );
        ts.insert("a.bias".into(), Tensor::randn(0f32, 1.0, c, dev).unwrap());
        ts.insert(
            "b.weight".into(),
            Tensor::randn(0f32, 1.0, (c, 2, 2), dev).unwrap(),
        );
        ts.insert("b.bias".into(), Tensor::randn(0f32, 1.0, c, dev).unwrap());
        let vb = VarBuilder::from_tensors(ts, DType::F32, dev);
        let a = ValidConv1d::load(&vb.pp("a"), c, c, 3).unwrap();
        let b = ValidConv1d::load(&vb.pp("b"), c, 3, 2).unwrap();
        CausalConvStack::new(c, vec![a, b]).unwrap()
    }

    /// Chunked calls with the carried state equal one call over the whole sequence.
    #[test]
    fn carried_state_equals_one_pass() {
        let dev = Device::Cpu;
        let s = stack(&dev);
        assert_eq!(s.history(), 3);
        let x = Tensor::randn(0f32, 1.0, (1, 7, 6), &dev).unwrap();
        let (full, _) = s.forward(&x, None).unwrap();
        let (a, st) = s.forward(&x.narrow(1, 0, 2).unwrap(), None).unwrap();
        let mut parts = vec![a];
        let mut st = st;
        for i in 2..7 {
            let (y, next) = s.forward(&x.narrow(1, i, 1).unwrap(), st.as_ref()).unwrap();
            parts.push(y);
            st = next;
        }
        let stepped = Tensor::cat(&parts, 1).unwrap();
        let d = crate::layers::max_abs_diff(&full, &stepped);
        assert!(d < 1e-5, "{d}");
    }

    /// A grouped conv equals the per-channel sum it stands for.
    #[test]
    fn grouped_conv_matches_the_definition() {
        let dev = Device::Cpu;
        let (c, g, k, t) = (4, 2, 2, 5);
        let w = Tensor::randn(0f32, 1.0, (c, c / g, k), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, c, t), &dev).unwrap();
        let mut ts = HashMap::new();
        ts.insert("weight".into(), w.clone());
        let vb = VarBuilder::from_tensors(ts, DType::F32, &dev);
        let y: Vec<Vec<f32>> = ValidConv1d::load(&vb, c, g, k)
            .unwrap()
            .forward(&x)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let w: Vec<Vec<Vec<f32>>> = w.to_vec3().unwrap();
        let x: Vec<Vec<f32>> = x.squeeze(0).unwrap().to_vec2().unwrap();
        let per = c / g;
        for o in 0..c {
            let grp = o / per;
            for s in 0..t - k + 1 {
                let mut want = 0f32;
                for i in 0..per {
                    for j in 0..k {
                        want += w[o][i][j] * x[grp * per + i][s + j];
                    }
                }
                assert!((y[o][s] - want).abs() < 1e-5, "{o} {s}");
            }
        }
    }
}
