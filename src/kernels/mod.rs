//! The CPU kernels, apart from the blocks that use them: the matrix-vector product for one row
//! ([`gemv`]: dense f32/bf16/f16 and the q8_0/q4_0 block formats), the tiled GEMM for several
//! ([`gemm`]), tanh-GELU ([`gelu`]), and the thread pool they share ([`parallel`]).
//!
//! Notable: the instruction set is detected once per process at run time (AVX-512, AVX2+FMA,
//! portable; `LLMARCH_KERNELS` overrides it for comparisons), so one binary runs well on every
//! x86-64 machine. These files know matrices and rows, no layer and no model.

pub mod gelu;
pub mod gemm;
pub mod gemv;
pub mod parallel;
