//! HOW models compute: building blocks named for the technique (KV store, attention, RoPE,
//! norms, MLP, MoE, ...), never for a model. Families in `arch/` assemble them from the
//! per-layer table.
//!
//! Every weight matmul goes through [`linear`], so a faster kernel or quantized weights can be
//! swapped in at one place; every tensor read goes through [`weight`], whose errors name it.

pub mod attention;
pub mod embedding;
pub mod kv_store;
pub mod linear;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod per_layer_embedding;
pub mod rope;
pub mod weight;
