//! What one tensor op costs on a device, its launch included (a benchmark, not a test):
//! `op_cost [--device cuda] [--iters N]` runs each op N times on decode-sized tensors (one token
//! of Gemma 4 E2B: hidden 1536, 8 heads) and prints microseconds per op, the queue drained at the
//! end. On CUDA it runs the list twice, with cudarc's event tracking as candle leaves it and then
//! off (as `llmarch` runs), and checks each fused kernel against the chain of ops it replaces.

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use llmarch::cli::shared::DeviceArg;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    #[arg(long, default_value_t = 2000)]
    iters: usize,
}

/// One op to time.
type Op<'a> = Box<dyn Fn() -> anyhow::Result<Tensor> + 'a>;

fn time(
    dev: &Device,
    iters: usize,
    mut f: impl FnMut() -> anyhow::Result<Tensor>,
) -> anyhow::Result<f64> {
    for _ in 0..20 {
        f()?;
    }
    dev.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e6 / iters as f64)
}

fn max_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?;
    Ok(d.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn list(dev: &Device, dtype: DType, iters: usize) -> anyhow::Result<()> {
    let x = Tensor::randn(0f32, 1.0, (1, 1536), dev)?.to_dtype(dtype)?;
    let w = Tensor::randn(0f32, 0.02, (1536, 1536), dev)?.to_dtype(dtype)?;
    let heads = Tensor::randn(0f32, 1.0, (8, 256), dev)?.to_dtype(dtype)?;
    let scale = Tensor::randn(0f32, 1.0, 256, dev)?.to_dtype(dtype)?;
    let alpha = Tensor::ones(1536, dtype, dev)?;
    let gate = Tensor::randn(0f32, 1.0, (1, 6144), dev)?.to_dtype(dtype)?;
    let up = Tensor::randn(0f32, 1.0, (1, 6144), dev)?.to_dtype(dtype)?;
    let scores = Tensor::randn(0f32, 3.0, (1, 1, 8, 1, 512), dev)?.to_dtype(dtype)?;
    let mask = Tensor::zeros((1, 512), DType::F32, dev)?;
    let ops: Vec<(&str, Op)> = vec![
        ("add, contiguous [1, 1536]", Box::new(|| Ok((&x + &x)?))),
        (
            "broadcast mul [8, 256] · [256]",
            Box::new(|| Ok(heads.broadcast_mul(&scale)?)),
        ),
        ("cast to f32", Box::new(|| Ok(x.to_dtype(DType::F32)?))),
        (
            "rms_norm (candle-nn)",
            Box::new(|| Ok(candle_nn::ops::rms_norm(&x, &alpha, 1e-6)?)),
        ),
        (
            "matmul [1, 1536] · [1536, 1536]ᵀ",
            Box::new(|| Ok(x.matmul(&w.t()?)?)),
        ),
        (
            "gelu(gate) · up as 4 ops",
            Box::new(|| {
                let g = gate.to_dtype(DType::F32)?.gelu()?.to_dtype(dtype)?;
                Ok((g * &up)?)
            }),
        ),
        (
            "gelu(gate) · up fused",
            Box::new(|| {
                Ok(llmarch::kernels::fused::gated(false, &gate, &up)?
                    .unwrap_or_else(|| gate.clone()))
            }),
        ),
        (
            "softmax as 4 ops [8, 512]",
            Box::new(|| {
                let s = scores.to_dtype(DType::F32)?.broadcast_add(&mask)?;
                Ok(candle_nn::ops::softmax_last_dim(&s)?.to_dtype(dtype)?)
            }),
        ),
        (
            "softmax fused [8, 512]",
            Box::new(|| {
                Ok(llmarch::kernels::fused::softmax(&scores, 1.0, Some(&mask))?
                    .unwrap_or_else(|| scores.clone()))
            }),
        ),
    ];
    let w1 = (Tensor::randn(0f32, 1.0, 1536, dev)?.to_dtype(dtype)?, 1e-6);
    let w2 = (Tensor::randn(0f32, 1.0, 1536, dev)?.to_dtype(dtype)?, 1e-5);
    let h = Tensor::randn(0f32, 1.0, (1, 1536), dev)?.to_dtype(dtype)?;
    let norm = |x: &Tensor, (w, e): &(Tensor, f64)| -> anyhow::Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, w, *e as f32)?)
    };
    let chain = |with1: bool| -> anyhow::Result<(Tensor, Tensor)> {
        let h2 = if with1 {
            (&h + norm(&x, &w1)?)?
        } else {
            (&h + &x)?
        };
        let y = norm(&h2, &w2)?;
        Ok((h2, y))
    };
    let fused = |with1: bool| -> anyhow::Result<Option<(Tensor, Option<Tensor>)>> {
        let n1 = with1.then_some((&w1.0, w1.1));
        llmarch::kernels::fused::residual_norm(&h, &x, n1, None, Some((&w2.0, w2.1)))
    };
    // Attention of one position's 8 query heads over 300 keys of one KV head, the keys and
    // values views of a longer buffer (as the KV store hands them out).
    let kbuf = Tensor::randn(0f32, 1.0, (1, 1, 1024, 256), dev)?.to_dtype(dtype)?;
    let vbuf = Tensor::randn(0f32, 1.0, (1, 1, 1024, 256), dev)?.to_dtype(dtype)?;
    let (k, v) = (kbuf.narrow(2, 100, 300)?, vbuf.narrow(2, 100, 300)?);
    let q = Tensor::randn(0f32, 1.0, (1, 1, 8, 256), dev)?.to_dtype(dtype)?;
    let attn_chain = |mask: Option<&Tensor>, scale: f64| -> anyhow::Result<Tensor> {
        let s = q.matmul(&k.t()?)?;
        let s = if scale == 1.0 { s } else { (s * scale)? };
        let mut s = s.to_dtype(DType::F32)?;
        if let Some(m) = mask {
            s = s.broadcast_add(m)?;
        }
        let p = candle_nn::ops::softmax_last_dim(&s)?.to_dtype(dtype)?;
        Ok(p.matmul(&v.contiguous()?)?)
    };
    let attn_fused = |mask: Option<&Tensor>, scale: f64| -> anyhow::Result<Option<Tensor>> {
        llmarch::kernels::fused::attention(&q, &k, &v, mask, 1, scale)
    };
    // Per-head norm and RoPE of one position's 8 heads of 256 (all rotated, or the first 64).
    let heads_x = Tensor::randn(0f32, 1.0, (1, 1, 8, 256), dev)?.to_dtype(dtype)?;
    let head_w = Tensor::randn(0f32, 1.0, 256, dev)?.to_dtype(dtype)?;
    let angles = Tensor::randn(0f32, 3.0, (1, 128), dev)?;
    let (cos_all, sin_all) = (
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    );
    let nr_chain = |r: usize| -> anyhow::Result<Tensor> {
        let (cos, sin) = (cos_all.narrow(1, 0, r / 2)?, sin_all.narrow(1, 0, r / 2)?);
        let x = candle_nn::ops::rms_norm(&heads_x, &head_w, 1e-6)?
            .transpose(1, 2)?
            .contiguous()?;
        if r == 256 {
            return Ok(candle_nn::rotary_emb::rope(&x, &cos, &sin)?);
        }
        let rot = candle_nn::rotary_emb::rope(&x.narrow(3, 0, r)?.contiguous()?, &cos, &sin)?;
        Ok(Tensor::cat(&[&rot, &x.narrow(3, r, 256 - r)?], 3)?)
    };
    let nr_fused = |r: usize| -> anyhow::Result<Option<Tensor>> {
        let (cos, sin) = (cos_all.narrow(1, 0, r / 2)?, sin_all.narrow(1, 0, r / 2)?);
        llmarch::kernels::fused::norm_rope(&heads_x, Some((&head_w, 1e-6)), &cos, &sin, r)
    };
    let mut ops = ops;
    ops.push((
        "norm, transpose, rope [8, 256] as 3 ops",
        Box::new(|| nr_chain(256)),
    ));
    ops.push((
        "norm, transpose, rope [8, 256] fused",
        Box::new(|| Ok(nr_fused(256)?.unwrap_or_else(|| heads_x.clone()))),
    ));
    ops.push((
        "attention [8 heads, 300 keys] as 6 ops",
        Box::new(|| attn_chain(None, 1.0)),
    ));
    ops.push((
        "attention [8 heads, 300 keys] fused",
        Box::new(|| Ok(attn_fused(None, 1.0)?.unwrap_or_else(|| q.clone()))),
    ));
    ops.push((
        "h + norm(x), then norm, as 3 ops",
        Box::new(|| Ok(chain(true)?.1)),
    ));
    ops.push((
        "h + norm(x), then norm, fused",
        Box::new(|| Ok(fused(true)?.map_or_else(|| h.clone(), |f| f.0))),
    ));
    for (name, f) in &ops {
        println!("  {:>8.2} µs  {name}", time(dev, iters, f)?);
    }
    if let Some(fused) = llmarch::kernels::fused::gated(false, &gate, &up)? {
        let chain = (gate.to_dtype(DType::F32)?.gelu()?.to_dtype(dtype)? * &up)?;
        println!(
            "  fused gated vs chain: max |diff| {}",
            max_diff(&fused, &chain)?
        );
        let fused = llmarch::kernels::fused::gated(true, &gate, &up)?.expect("cuda");
        let chain = (candle_nn::ops::silu(&gate.to_dtype(DType::F32)?)?.to_dtype(dtype)? * &up)?;
        println!(
            "  fused silu vs chain: max |diff| {}",
            max_diff(&fused, &chain)?
        );
    }
    for with1 in [true, false] {
        if let Some((h2, y)) = fused(with1)? {
            let (ch, cy) = chain(with1)?;
            let y = y.expect("asked");
            println!(
                "  fused residual norm vs chain (norm of x: {with1}): max |diff| {} (sum), {} (norm)",
                max_diff(&h2, &ch)?,
                max_diff(&y, &cy)?
            );
        }
    }
    let layer_scalar = Tensor::new(&[0.375f32], dev)?.to_dtype(dtype)?;
    let scaled = llmarch::kernels::fused::residual_norm(
        &h,
        &x,
        Some((&w1.0, w1.1)),
        Some(&layer_scalar),
        Some((&w2.0, w2.1)),
    )?;
    if let Some((h2, y)) = scaled {
        let ch = (&h + norm(&x, &w1)?)?.broadcast_mul(&layer_scalar)?;
        let cy = norm(&ch, &w2)?;
        println!(
            "  fused residual norm with a scale vs chain: max |diff| {} (sum), {} (norm)",
            max_diff(&h2, &ch)?,
            max_diff(&y.expect("asked"), &cy)?
        );
    }
    for r in [256, 64] {
        if let Some(fused) = nr_fused(r)? {
            println!(
                "  fused norm and rope vs chain (rotary dims {r}): max |diff| {}",
                max_diff(&fused, &nr_chain(r)?)?
            );
        }
    }
    let window = Tensor::from_vec(
        (0..300)
            .map(|i| if i < 40 { f32::NEG_INFINITY } else { 0.0 })
            .collect::<Vec<_>>(),
        (1, 300),
        dev,
    )?;
    for (mask, scale) in [(None, 1.0), (Some(&window), 1.0), (Some(&window), 0.0625)] {
        if let Some(fused) = attn_fused(mask, scale)? {
            let chain = attn_chain(mask, scale)?;
            println!(
                "  fused attention vs chain (mask: {}, scale {scale}): max |diff| {}, max |chain| {}",
                mask.is_some(),
                max_diff(&fused, &chain)?,
                chain.to_dtype(DType::F32)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?
            );
        }
    }
    let causal = Tensor::from_vec(
        (0..512)
            .map(|i| if i % 3 == 0 { f32::NEG_INFINITY } else { 0.0 })
            .collect::<Vec<_>>(),
        (1, 512),
        dev,
    )?;
    for (m, what) in [(None, "no mask"), (Some(&causal), "a mask")] {
        if let Some(fused) = llmarch::kernels::fused::softmax(&scores, 0.5, m)? {
            let mut s = (&scores * 0.5)?.to_dtype(DType::F32)?;
            if let Some(m) = m {
                s = s.broadcast_add(m)?;
            }
            let chain = candle_nn::ops::softmax_last_dim(&s)?.to_dtype(dtype)?;
            println!(
                "  fused softmax vs chain, {what}: max |diff| {}",
                max_diff(&fused, &chain)?
            );
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dev = match args.device {
        #[cfg(feature = "cuda")]
        DeviceArg::Cuda => Device::new_cuda(0)?,
        other => llmarch::cli::shared::device(other)?,
    };
    let dtypes: &[DType] = if dev.is_cpu() {
        &[DType::F32]
    } else {
        &[DType::BF16, DType::F32]
    };
    for &dtype in dtypes {
        println!("{dtype:?}, {:?}", dev.location());
        list(&dev, dtype, args.iters)?;
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &dev {
        // SAFETY: one stream, as in `llmarch` (cli::shared).
        unsafe { d.disable_event_tracking() };
        for &dtype in dtypes {
            println!("{dtype:?}, event tracking off");
            list(&dev, dtype, args.iters)?;
        }
    }
    Ok(())
}
