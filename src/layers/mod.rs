//! HOW models compute: building blocks named for the technique (KV store, attention, RoPE,
//! norms, MLP, MoE, ...), never for a model. Families in `arch/` assemble them from the
//! per-layer table.
//!
//! Every weight matmul goes through [`linear`], so a faster kernel or quantized weights can be
//! swapped in at one place (its CPU kernels, in [`crate::kernels`]: `gemv` for one row, `gemm`
//! for several); every tensor read goes through [`weight`], whose errors name it.

pub mod attention;
pub mod causal_conv;
pub mod cca;
pub mod embedding;
pub mod gated_deltanet;
pub mod hyper_connections;
pub mod kv_store;
pub mod lightning_indexer;
pub mod linear;
pub mod mapped;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod output_gate;
pub mod per_layer_embedding;
pub mod residual_scaling;
pub mod rope;
pub mod token_compressor;
pub mod top_k;
pub mod weight;

use anyhow::Result;
use candle_core::{CpuStorage, DType, Storage, Tensor};

/// The most token rows the device path keeps wholly on the device (a decode step, a verify
/// pass): MoE routing and Gated DeltaNet's rule run there as tensor ops, token by token or
/// gathered per token; a longer prompt chunk reads their inputs back once per layer instead.
pub const DEVICE_STEP_ROWS: usize = 16;

/// Whether `x` `[.., width]` is such a step: on the device path (a GPU, or
/// `LLMARCH_KERNELS=generic` on the CPU) and at most [`DEVICE_STEP_ROWS`] rows.
pub fn is_device_step(x: &Tensor) -> Result<bool> {
    let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
    Ok(!crate::kernels::fast_cpu(x.device()) && rows <= DEVICE_STEP_ROWS)
}

/// The largest absolute difference of two tensors of one shape (0 for empty ones), for tests.
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    if a.elem_count() == 0 {
        return 0.0;
    }
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    d.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// `cell`'s value, made by `make` on first use (the constants a layer keeps on the device).
pub(crate) fn once<T>(
    cell: &std::sync::OnceLock<T>,
    make: impl FnOnce() -> Result<T>,
) -> Result<&T> {
    if let Some(v) = cell.get() {
        return Ok(v);
    }
    let v = make()?;
    Ok(cell.get_or_init(|| v))
}

/// Runs `f` on `x`'s elements as one f32 slice: `x`'s own storage when it is a contiguous f32
/// CPU tensor (no copy: a prompt chunk's activations are megabytes, read by every kernel), else
/// a copy.
pub(crate) fn with_f32_slice<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = x.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&v[a..b]));
        }
    }
    let v = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(f(&v))
}
