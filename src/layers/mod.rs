//! HOW models compute: building blocks named for the technique (KV store, attention, RoPE,
//! norms, MLP, MoE, ...), never for a model. Families in `arch/` assemble them from the
//! per-layer table.

pub mod kv_store;
