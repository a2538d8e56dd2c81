//! Unit tests of the Gemma 4 config half.

use crate::arch::config::bounds_test::{real, refuses_past_bound};

/// Sizes past the bounds are refused with the key named, before any per-layer table or
/// RoPE table is built (2^40 layers or a 2^40-wide head would abort on the allocation).
#[test]
fn sizes_past_the_bounds_are_refused_by_key() {
    for name in ["gemma-4-E2B-it", "gemma-4-26B-A4B-it"] {
        let raw = real(name);
        for key in [
            "num_hidden_layers",
            "head_dim",
            "global_head_dim",
            "hidden_size",
            "vocab_size",
            "sliding_window",
            "max_position_embeddings",
            "num_key_value_heads",
            "hidden_size_per_layer_input",
        ] {
            refuses_past_bound(&raw, &["text_config", key]);
        }
    }
    let moe = real("gemma-4-26B-A4B-it");
    for key in ["num_experts", "top_k_experts", "moe_intermediate_size"] {
        refuses_past_bound(&moe, &["text_config", key]);
    }
}
