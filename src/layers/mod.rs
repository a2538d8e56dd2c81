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
pub mod weight;
