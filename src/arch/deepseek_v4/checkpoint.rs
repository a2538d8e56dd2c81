//! DeepSeek V4 checkpoint tensor names: the Hub checkpoints' own names mapped to the reference's
//! module names.

/// The reference's module name of a checkpoint tensor. The Hub checkpoints use DeepSeek's own
/// names without the `model.` prefix (`layers.0.attn.wq_a.weight`, `embed.weight`,
/// `head.weight`, `hc_head_fn`, `layers.0.ffn.experts.3.w1.weight`, ...); transformers 5.23.0
/// maps them with the renames of `conversion_mapping.py` (`"deepseek_v4"`), applied here in the
/// same order, and its `save_pretrained` writes a mix (the `model.` prefix with DeepSeek's leaf
/// names). Names already in the reference's form come out unchanged. Per-expert weights keep one
/// tensor per expert (`mlp.experts.{e}.gate_proj.weight`: w1 → gate, w3 → up, w2 → down); FP8
/// scales follow their weight (`*.weight_scale_inv`).
pub fn checkpoint_name(name: &str) -> String {
    const LEAF_TOP: [(&str, &str); 5] = [
        ("embed.weight", "embed_tokens.weight"),
        ("head.weight", "lm_head.weight"),
        ("hc_head_fn", "hc_head.hc_fn"),
        ("hc_head_base", "hc_head.hc_base"),
        ("hc_head_scale", "hc_head.hc_scale"),
    ];
    const MIDDLE: [(&str, &str); 26] = [
        (".attn.", ".self_attn."),
        (".ffn.", ".mlp."),
        (".indexer.compressor.", ".compressor.indexer."),
        (".attn_norm.", ".input_layernorm."),
        (".ffn_norm.", ".post_attention_layernorm."),
        (".hc_attn_fn", ".attn_hc.fn"),
        (".hc_attn_base", ".attn_hc.base"),
        (".hc_attn_scale", ".attn_hc.scale"),
        (".hc_ffn_fn", ".ffn_hc.fn"),
        (".hc_ffn_base", ".ffn_hc.base"),
        (".hc_ffn_scale", ".ffn_hc.scale"),
        (".attn_sink", ".sinks"),
        (
            ".indexer.weights_proj.",
            ".compressor.indexer.scorer.weights_proj.",
        ),
        (".indexer.wq_b.", ".compressor.indexer.q_b_proj."),
        (".norm.", ".kv_norm."),
        (".ape", ".position_bias"),
        (".wq_a.", ".q_a_proj."),
        (".self_attn.wq_b.", ".self_attn.q_b_proj."),
        (".wkv.", ".kv_proj."),
        (".wgate.", ".gate_proj."),
        (".wo_a.", ".o_a_proj."),
        (".wo_b.", ".o_b_proj."),
        (".q_norm.", ".q_a_norm."),
        (".gate.bias", ".gate.e_score_correction_bias"),
        (".w1.", ".gate_proj."),
        (".w3.", ".up_proj."),
    ];
    let bare = name.strip_prefix("model.").unwrap_or(name);
    for (from, to) in LEAF_TOP {
        if let Some(rest) = bare.strip_prefix(from) {
            let renamed = format!("{to}{rest}");
            return if to.starts_with("lm_head") {
                renamed
            } else {
                format!("model.{renamed}")
            };
        }
    }
    if bare.starts_with("lm_head.") {
        return bare.to_string();
    }
    let mut s = bare.to_string();
    for (from, to) in MIDDLE {
        s = s.replace(from, to);
    }
    // w2 is the down projection (of routed and shared experts alike).
    s = s.replace(".w2.", ".down_proj.");
    format!("model.{s}")
}
