//! The CPU kernels, apart from the blocks that use them: the matrix-vector product for one row
//! ([`gemv`]: dense f32/bf16/f16 and the q8_0/q4_0 block formats), the tiled GEMM for several
//! ([`gemm`]), attention over the KV store's rows for a few query rows ([`attention`]) and for a
//! prompt chunk ([`flash_attention`]), tanh-GELU ([`gelu`]), the thread pool they share
//! ([`parallel`]), and the 2 MB-page buffers quantized weights live in ([`hugepages`]).
//!
//! Notable: the instruction set is detected once per process at run time (AVX-512, AVX2+FMA,
//! portable; `LLMARCH_KERNELS` overrides it for comparisons), so one binary runs well on every
//! x86-64 machine. `LLMARCH_KERNELS=generic` turns every kernel here off, so the CPU runs the
//! same candle ops a GPU does (tested against the reference and the CPU path). These files know
//! matrices and rows, no layer and no model.

pub mod attention;
pub mod flash_attention;
pub mod fused;
pub mod gelu;
pub mod gemm;
pub mod gemv;
pub mod hugepages;
#[cfg(target_arch = "x86_64")]
mod int8;
pub mod parallel;

use candle_core::Device;
use std::sync::OnceLock;

/// Which path a process computes with, as `run --json` reports it (`"kernels"`).
pub fn path_name(device: &Device) -> &'static str {
    match device {
        Device::Cpu if generic() => "generic",
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

/// `LLMARCH_KERNELS=generic`: the device path on the CPU: the candle ops a GPU runs, weights
/// loaded as tensors, none of the CPU kernels here. For testing that path where no GPU is.
pub fn generic() -> bool {
    static GENERIC: OnceLock<bool> = OnceLock::new();
    *GENERIC.get_or_init(|| std::env::var("LLMARCH_KERNELS").is_ok_and(|v| v == "generic"))
}

thread_local! {
    static AS_DECODE_STEPS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` computing every row as a decode step at its position would, bit for bit, whatever
/// the number of rows: weight products through the one-row gemv's arithmetic
/// ([`gemv::gemv_rows`], not the GEMM), attention row by row. A verify pass over drafted tokens
/// runs so: each draft is judged by the logits plain decoding would give, and the rows it
/// accepts are a decode step's.
pub fn as_decode_steps<T>(f: impl FnOnce() -> T) -> T {
    let before = AS_DECODE_STEPS.with(|c| c.replace(true));
    let out = f();
    AS_DECODE_STEPS.with(|c| c.set(before));
    out
}

/// Whether [`as_decode_steps`] is in force on this thread.
pub(crate) fn in_decode_steps() -> bool {
    AS_DECODE_STEPS.with(|c| c.get())
}

/// Whether the CPU kernels here may run on `device`: the CPU, unless the generic path is asked.
pub fn fast_cpu(device: &Device) -> bool {
    device.is_cpu() && !generic()
}
