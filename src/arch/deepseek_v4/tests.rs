//! Unit tests of the DeepSeek V4 config half: the real Flash and Pro configs, both config
//! forms, the cache parts against the reference, checkpoint names, the bounds.

use super::checkpoint_name;
use super::config::{Kind, CSA, HASH_MOE, HCA, MOE, SLIDING};
use crate::arch::budget::{layer_bytes, KvDtype};
use crate::arch::{config::ParseOptions, parse_config};
use crate::arch::{ArchSpec, Attention, Ffn, Routing};
use anyhow::Result;
use serde_json::{json, Map, Value};

const FLASH: &str = include_str!("../../../configs/DeepSeek-V4-Flash/config.json");
const PRO: &str = include_str!("../../../configs/DeepSeek-V4-Pro/config.json");
/// The tiny config transformers 5.23 saves (copy of `tests/fixtures/tiny/deepseek-v4`): the
/// transformers form, with `qk_rope_head_dim` written out beside `partial_rotary_factor`.
const TINY: &str = r#"{
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 0,
  "compress_rates": {
"compressed_sparse_attention": 4,
"heavily_compressed_attention": 8
  },
  "compress_rope_theta": 160000.0,
  "eos_token_id": 1,
  "hc_eps": 1e-06,
  "hc_mult": 2,
  "hc_sinkhorn_iters": 3,
  "head_dim": 32,
  "hidden_act": "silu",
  "hidden_size": 64,
  "index_head_dim": 16,
  "index_n_heads": 2,
  "index_topk": 3,
  "initializer_range": 0.02,
  "layer_types": [
"sliding_attention",
"compressed_sparse_attention",
"heavily_compressed_attention",
"compressed_sparse_attention",
"heavily_compressed_attention"
  ],
  "max_position_embeddings": 512,
  "mlp_bias": false,
  "mlp_layer_types": [
"hash_moe",
"hash_moe",
"moe",
"moe",
"moe"
  ],
  "model_type": "deepseek_v4",
  "moe_intermediate_size": 32,
  "n_routed_experts": 4,
  "n_shared_experts": 1,
  "norm_topk_prob": true,
  "num_attention_heads": 4,
  "num_experts_per_tok": 2,
  "num_hidden_layers": 5,
  "num_key_value_heads": 1,
  "num_nextn_predict_layers": 1,
  "o_groups": 2,
  "o_lora_rank": 16,
  "output_router_logits": false,
  "pad_token_id": null,
  "partial_rotary_factor": 0.25,
  "q_lora_rank": 32,
  "qk_rope_head_dim": 8,
  "rms_norm_eps": 1e-06,
  "rope_parameters": {
"compress": {
  "attention_factor": 1.0,
  "beta_fast": 32,
  "beta_slow": 1,
  "factor": 4.0,
  "original_max_position_embeddings": 128,
  "partial_rotary_factor": 0.25,
  "rope_theta": 160000.0,
  "rope_type": "yarn"
},
"main": {
  "partial_rotary_factor": 0.25,
  "rope_theta": 10000.0,
  "rope_type": "default"
}
  },
  "rope_theta": 10000.0,
  "routed_scaling_factor": 1.5,
  "router_aux_loss_coef": 0.001,
  "router_jitter_noise": 0.0,
  "scoring_func": "sqrtsoftplus",
  "sliding_window": 8,
  "swiglu_limit": 10.0,
  "tie_word_embeddings": false,
  "transformers_version": "5.23.0",
  "use_cache": true,
  "vocab_size": 256
}"#;

fn raw(s: &str) -> Value {
    serde_json::from_str(s).expect("config is JSON")
}

fn spec(v: &Value) -> Result<ArchSpec> {
    parse_config(v, &ParseOptions::default())
}

fn err(v: &Value) -> String {
    match spec(v) {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn with(base: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> Value {
    let mut v = raw(base);
    if let Some(o) = v.as_object_mut() {
        edit(o);
    }
    v
}

fn kinds(s: &ArchSpec) -> Vec<Kind> {
    s.layers
        .iter()
        .map(|l| match l.attention {
            Attention::Sliding { .. } => Kind::Sliding,
            Attention::Compressed {
                index_topk: Some(_),
                ..
            } => Kind::Csa,
            _ => Kind::Hca,
        })
        .collect()
}

fn tiny() -> Value {
    raw(TINY)
}

#[test]
fn checkpoint_names_become_the_reference_modules() {
    for (from, to) in [
        // The Hub's own names.
        ("embed.weight", "model.embed_tokens.weight"),
        ("head.weight", "lm_head.weight"),
        ("norm.weight", "model.norm.weight"),
        ("hc_head_fn", "model.hc_head.hc_fn"),
        (
            "layers.3.attn.wq_a.weight",
            "model.layers.3.self_attn.q_a_proj.weight",
        ),
        (
            "layers.3.attn.wq_a.weight_scale_inv",
            "model.layers.3.self_attn.q_a_proj.weight_scale_inv",
        ),
        (
            "layers.3.attn.wq_b.weight",
            "model.layers.3.self_attn.q_b_proj.weight",
        ),
        (
            "layers.3.attn.q_norm.weight",
            "model.layers.3.self_attn.q_a_norm.weight",
        ),
        (
            "layers.3.attn.norm.weight",
            "model.layers.3.self_attn.kv_norm.weight",
        ),
        (
            "layers.3.attn.kv_norm.weight",
            "model.layers.3.self_attn.kv_norm.weight",
        ),
        ("layers.3.attn.attn_sink", "model.layers.3.self_attn.sinks"),
        (
            "layers.3.attn.compressor.ape",
            "model.layers.3.self_attn.compressor.position_bias",
        ),
        (
            "layers.3.attn.compressor.wgate.weight",
            "model.layers.3.self_attn.compressor.gate_proj.weight",
        ),
        (
            "layers.3.attn.indexer.compressor.wkv.weight",
            "model.layers.3.self_attn.compressor.indexer.kv_proj.weight",
        ),
        (
            "layers.3.attn.indexer.compressor.norm.weight",
            "model.layers.3.self_attn.compressor.indexer.kv_norm.weight",
        ),
        (
            "layers.3.attn.indexer.wq_b.weight",
            "model.layers.3.self_attn.compressor.indexer.q_b_proj.weight",
        ),
        (
            "layers.3.attn.indexer.weights_proj.weight",
            "model.layers.3.self_attn.compressor.indexer.scorer.weights_proj.weight",
        ),
        ("layers.3.hc_attn_fn", "model.layers.3.attn_hc.fn"),
        ("layers.3.hc_ffn_scale", "model.layers.3.ffn_hc.scale"),
        (
            "layers.3.attn_norm.weight",
            "model.layers.3.input_layernorm.weight",
        ),
        (
            "layers.3.ffn_norm.weight",
            "model.layers.3.post_attention_layernorm.weight",
        ),
        (
            "layers.3.ffn.gate.bias",
            "model.layers.3.mlp.gate.e_score_correction_bias",
        ),
        (
            "layers.3.ffn.gate.tid2eid",
            "model.layers.3.mlp.gate.tid2eid",
        ),
        (
            "layers.3.ffn.experts.7.w1.weight",
            "model.layers.3.mlp.experts.7.gate_proj.weight",
        ),
        (
            "layers.3.ffn.experts.7.w2.weight_scale_inv",
            "model.layers.3.mlp.experts.7.down_proj.weight_scale_inv",
        ),
        (
            "layers.3.ffn.experts.7.w3.weight",
            "model.layers.3.mlp.experts.7.up_proj.weight",
        ),
        (
            "layers.3.ffn.shared_experts.w2.weight",
            "model.layers.3.mlp.shared_experts.down_proj.weight",
        ),
        // What transformers' save_pretrained writes: the prefix with the Hub's leaves.
        ("model.embed_tokens.weight", "model.embed_tokens.weight"),
        ("model.hc_head.hc_base", "model.hc_head.hc_base"),
        (
            "model.layers.1.attn.wo_a.weight",
            "model.layers.1.self_attn.o_a_proj.weight",
        ),
        // The reference's own names stay.
        (
            "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight",
            "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight",
        ),
        (
            "model.layers.1.mlp.experts.gate_up_proj",
            "model.layers.1.mlp.experts.gate_up_proj",
        ),
        ("model.norm.weight", "model.norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ] {
        assert_eq!(checkpoint_name(from), to, "{from}");
    }
}

#[test]
fn flash_layers_and_params() {
    let s = spec(&raw(FLASH)).unwrap();
    assert_eq!(
        s.layers.len(),
        43,
        "the 44th compress_ratios entry (MTP) is dropped"
    );
    let k = kinds(&s);
    assert_eq!(&k[..3], &[Kind::Sliding, Kind::Sliding, Kind::Csa]);
    for (i, kind) in k.iter().enumerate().skip(2) {
        let want = if i % 2 == 0 { Kind::Csa } else { Kind::Hca };
        assert_eq!(*kind, want, "layer {i}");
    }
    assert_eq!(k.iter().filter(|&&x| x == Kind::Sliding).count(), 2);
    assert_eq!(k.iter().filter(|&&x| x == Kind::Csa).count(), 21);
    assert_eq!(k.iter().filter(|&&x| x == Kind::Hca).count(), 20);
    assert_eq!(
        s.layers[2].attention,
        Attention::Compressed {
            ratio: 4,
            window: 128,
            index_topk: Some(512)
        }
    );
    assert_eq!(
        s.layers[3].attention,
        Attention::Compressed {
            ratio: 128,
            window: 128,
            index_topk: None
        }
    );
    assert_eq!(s.layers[0].attention, Attention::Sliding { window: 128 });
    // RoPE: sliding layers plain θ10000, compressed layers YaRN θ160000; 64 rotated dims.
    let main = s.layers[0].rope.clone().unwrap();
    assert_eq!(
        (main.kind.as_str(), main.theta, main.rotary_dim),
        ("default", 10_000.0, 64)
    );
    let comp = s.layers[2].rope.clone().unwrap();
    assert_eq!(
        (comp.kind.as_str(), comp.theta, comp.rotary_dim, comp.factor),
        ("yarn", 160_000.0, 64, Some(16.0))
    );
    // Hash routing on the first 3 layers.
    let routing = |i: usize| match &s.layers[i].ffn {
        Ffn::Moe { routing, .. } => *routing,
        _ => panic!("MoE everywhere"),
    };
    assert_eq!(routing(2), Routing::Hash);
    assert_eq!(routing(3), Routing::SqrtSoftplus);
    for l in &s.layers {
        assert!(l.k_eq_v && l.kv_heads == 1 && l.head_dim == 512 && l.q_heads == 64);
    }
    // Exact counts of transformers 5.23.0 on the meta device (tests/fixtures/reference_params.json).
    assert_eq!(s.params.total, 284_332_230_231);
    assert_eq!(s.params.embedding, 529_530_880);
    assert_eq!(s.params.lm_head, 529_530_880);
    assert_eq!(s.params.routed_experts, 277_025_390_592);
    assert!(
        (s.params.active as f64 / 1e9 - 13.80).abs() < 0.005,
        "{}",
        s.params.active
    );
    assert!(s.notes.iter().any(|n| n.contains("MTP layers: 1")));
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

#[test]
fn pro_layers_and_params() {
    let s = spec(&raw(PRO)).unwrap();
    assert_eq!(s.layers.len(), 61);
    let k = kinds(&s);
    assert_eq!(&k[..3], &[Kind::Hca, Kind::Hca, Kind::Csa]);
    assert_eq!(k.iter().filter(|&&x| x == Kind::Sliding).count(), 0);
    assert_eq!(k.iter().filter(|&&x| x == Kind::Csa).count(), 30);
    assert_eq!(k.iter().filter(|&&x| x == Kind::Hca).count(), 31);
    assert_eq!(s.params.total, 1_572_997_179_491);
    assert_eq!(s.params.embedding, 926_679_040);
    assert_eq!(s.params.lm_head, 926_679_040);
    assert_eq!(s.params.routed_experts, 1_547_396_186_112);
    assert!(
        (s.params.active as f64 / 1e9 - 49.78).abs() < 0.005,
        "{}",
        s.params.active
    );
}

#[test]
fn transformers_form_parses_like_hub_form() {
    let hub = spec(&raw(FLASH)).unwrap();
    let types: Vec<&str> = [SLIDING, SLIDING]
        .into_iter()
        .chain((0..41).map(|i| if i % 2 == 0 { CSA } else { HCA }))
        .collect();
    let mlp: Vec<&str> = (0..43)
        .map(|i| if i < 3 { HASH_MOE } else { MOE })
        .collect();
    let tf = with(FLASH, |o| {
        for k in [
            "compress_ratios",
            "num_hash_layers",
            "qk_rope_head_dim",
            "rope_scaling",
            "compress_rope_theta",
        ] {
            o.remove(k);
        }
        o.insert("layer_types".into(), json!(types));
        o.insert("mlp_layer_types".into(), json!(mlp));
        o.insert("compress_rates".into(), json!({CSA: 4, HCA: 128}));
        o.insert("partial_rotary_factor".into(), json!(0.125));
        o.insert(
            "rope_parameters".into(),
            json!({
                "main": {"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.125},
                "compress": {"rope_type": "yarn", "rope_theta": 160000, "factor": 16,
                    "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1,
                    "partial_rotary_factor": 0.125, "attention_factor": 1.0}
            }),
        );
    });
    let tf = spec(&tf).unwrap();
    assert_eq!(tf.layers, hub.layers);
    assert_eq!(tf.params, hub.params);
    assert!(tf.warnings.is_empty(), "{:?}", tf.warnings);
}

#[test]
fn tiny_reference_config_params_and_cache() {
    let s = spec(&tiny()).unwrap();
    assert_eq!(
        kinds(&s),
        vec![Kind::Sliding, Kind::Csa, Kind::Hca, Kind::Csa, Kind::Hca]
    );
    // DeepseekV4ForCausalLM(config) on the meta device: 297,253 parameters.
    assert_eq!(s.params.total, 297_253);
    assert_eq!(s.params.routed_experts, 5 * 4 * 3 * 32 * 64);
    assert_eq!(s.layers[0].rope.as_ref().unwrap().rotary_dim, 8);
    // Cache at 43 tokens, f32 (tests/fixtures/reference_cache.json): compressed entries, indexer
    // keys, overlap state and the 3 open tokens (43 mod 4) of CSA layers match the reference
    // element for element; the window is 8 here (the reference keeps 7).
    let csa: Vec<(String, u64)> = layer_bytes(&s.layers[1], 43, 1, KvDtype::F32).unwrap();
    let want = [
        ("K=V", 8 * 32 * 4),
        ("compressed KV", 1280),
        ("indexer keys", 640),
        ("compressor carry", 768 + 768),
        ("compressor overlap kv", 512),
        ("compressor overlap gate", 512),
        ("indexer carry", 384 + 384),
        ("indexer overlap kv", 256),
        ("indexer overlap gate", 256),
    ];
    assert_eq!(csa.len(), want.len());
    for ((name, bytes), (wn, wb)) in csa.iter().zip(want) {
        assert_eq!((name.as_str(), *bytes), (wn, wb as u64));
    }
    // HCA (ratio 8): compressed entries (5 × 32) and the 43 mod 8 = 3 open tokens.
    let hca = layer_bytes(&s.layers[2], 43, 1, KvDtype::F32).unwrap();
    assert_eq!(hca[1], ("compressed KV".to_string(), 640));
    assert_eq!(hca[2], ("compressor carry".to_string(), 3 * 2 * 32 * 4));
}

#[test]
fn flash_cache_at_one_million() {
    let s = spec(&raw(FLASH)).unwrap();
    let ctx = 1_048_576u64;
    let bytes = |i: usize| -> u64 {
        layer_bytes(&s.layers[i], ctx, 1, KvDtype::Bf16)
            .unwrap()
            .iter()
            .map(|(_, b)| b)
            .sum()
    };
    assert_eq!(bytes(0), 128 * 512 * 2);
    // bf16 for all but the two overlap gates (f32); 2^20 is a multiple of both ratios, so no
    // window is open.
    let csa = 128 * 512 + (ctx / 4) * (512 + 128) + 4 * (512 + 128);
    assert_eq!(bytes(2), csa * 2 + 4 * (512 + 128) * 4);
    let hca = 128 * 512 + (ctx / 128) * 512;
    assert_eq!(bytes(3), hca * 2);
}

#[test]
fn default_config_is_v4_pro_schedule() {
    let s = spec(&json!({"model_type": "deepseek_v4"})).unwrap();
    assert_eq!(s.layers.len(), 43);
    let k = kinds(&s);
    assert_eq!(&k[..4], &[Kind::Hca, Kind::Hca, Kind::Hca, Kind::Csa]);
    assert_eq!(s.layers[0].rope.as_ref().unwrap().rotary_dim, 64);
    assert_eq!(s.layers[0].rope.as_ref().unwrap().kind, "default");
}

#[test]
fn bad_compress_ratio_names_the_layer() {
    let v = with(FLASH, |o| {
        let mut r = vec![json!(0); 44];
        r[2] = json!(7);
        o.insert("compress_ratios".into(), json!(r));
    });
    let e = err(&v);
    assert!(
        e.contains("compress_ratios[2]") && e.contains("layer 2") && e.contains('7'),
        "{e}"
    );
    // The MTP entry is mapped too (a KeyError in the reference).
    let v = with(FLASH, |o| {
        let mut r = vec![json!(4); 44];
        r[43] = json!(64);
        o.insert("compress_ratios".into(), json!(r));
    });
    let e = err(&v);
    assert!(
        e.contains("compress_ratios[43]") && e.contains("MTP"),
        "{e}"
    );
    let v = with(FLASH, |o| {
        o.insert("compress_ratios".into(), json!([0, 4]));
    });
    let e = err(&v);
    assert!(e.contains("`compress_ratios` has 2 entries"), "{e}");
}

#[test]
fn bad_layer_types() {
    let v = with(FLASH, |o| {
        o.remove("compress_ratios");
        o.insert("layer_types".into(), json!(vec![SLIDING; 42]));
    });
    let e = err(&v);
    assert!(e.contains("`layer_types` has 42 entries"), "{e}");
    // Longer lists are cut, as the reference does, with a warning.
    let v = with(FLASH, |o| {
        o.insert("layer_types".into(), json!(vec![HCA; 44]));
    });
    let s = spec(&v).unwrap();
    assert_eq!(s.layers.len(), 43);
    assert!(s.warnings.iter().any(|w| w.contains("compress_ratios")));
    let v = with(FLASH, |o| {
        let mut t = vec![SLIDING; 43];
        t[5] = "full_attention";
        o.insert("layer_types".into(), json!(t));
    });
    let e = err(&v);
    assert!(e.contains("layer_types[5]") && e.contains("layer 5"), "{e}");
}

#[test]
fn bad_mlp_layer_types() {
    let e = err(&with(FLASH, |o| {
        o.insert("mlp_layer_types".into(), json!(vec![MOE; 40]));
    }));
    assert!(e.contains("`mlp_layer_types` has 40 entries"), "{e}");
    let e = err(&with(FLASH, |o| {
        let mut t = vec![MOE; 43];
        t[1] = "dense";
        o.insert("mlp_layer_types".into(), json!(t));
    }));
    assert!(
        e.contains("mlp_layer_types[1]") && e.contains("layer 1"),
        "{e}"
    );
}

#[test]
fn num_hash_layers_is_capped() {
    let s = spec(&with(FLASH, |o| {
        o.insert("num_hash_layers".into(), json!(50));
    }))
    .unwrap();
    assert!(s
        .layers
        .iter()
        .all(|l| matches!(&l.ffn, Ffn::Moe { routing, .. } if *routing == Routing::Hash)));
}

#[test]
fn compress_rates() {
    // Legacy scalar override.
    let s = spec(&with(FLASH, |o| {
        o.insert("compress_rate_csa".into(), json!(8));
    }))
    .unwrap();
    assert!(matches!(
        s.layers[2].attention,
        Attention::Compressed { ratio: 8, .. }
    ));
    let e = err(&with(FLASH, |o| {
        o.insert("compress_rates".into(), json!({CSA: 4}));
    }));
    assert!(e.contains("compress_rates") && e.contains(HCA), "{e}");
    let e = err(&with(FLASH, |o| {
        o.insert("compress_rates".into(), json!({CSA: 0, HCA: 128}));
    }));
    assert!(
        e.contains("layer 2") && e.contains("compress_rates.compressed_sparse_attention"),
        "{e}"
    );
    let e = err(&with(FLASH, |o| {
        o.insert(
            "compress_rates".into(),
            json!({CSA: 4, HCA: 128, SLIDING: 1}),
        );
    }));
    assert!(e.contains("compress_rates.sliding_attention"), "{e}");
}

#[test]
fn norm_topk_prob_false_is_ignored_with_a_warning() {
    let s = spec(&with(FLASH, |o| {
        o.insert("norm_topk_prob".into(), json!(false));
    }))
    .unwrap();
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("`norm_topk_prob` = false is ignored")),
        "{:?}",
        s.warnings
    );
}

#[test]
fn keys_the_reference_ignores_are_refused() {
    let cases: &[(&str, Value)] = &[
        ("num_key_value_heads", json!(2)),
        ("n_shared_experts", json!(2)),
        ("attention_bias", json!(true)),
        ("topk_method", json!("greedy")),
        ("hidden_act", json!("gelu")),
        ("scoring_func", json!("softmax")),
        ("o_groups", json!(7)),
        ("num_experts_per_tok", json!(300)),
        ("head_dim", json!(0)),
        ("kv_lora_rank", json!(512)),
    ];
    for (k, val) in cases {
        let e = err(&with(FLASH, |o| {
            o.insert(k.to_string(), val.clone());
        }));
        assert!(e.contains(&format!("`{k}`")), "{k}: {e}");
    }
}

#[test]
fn rope_validation() {
    // 63 rotated dims: the interleaved RoPE needs pairs.
    let e = err(&with(FLASH, |o| {
        o.insert("qk_rope_head_dim".into(), json!(63));
    }));
    assert!(
        e.contains("partial_rotary_factor") && e.contains("63"),
        "{e}"
    );
    // `partial_rotary_factor` wins over `qk_rope_head_dim`, with a warning when they differ.
    let s = spec(&with(FLASH, |o| {
        o.insert("partial_rotary_factor".into(), json!(0.25));
    }))
    .unwrap();
    assert_eq!(s.layers[0].rope.as_ref().unwrap().rotary_dim, 128);
    assert!(s.warnings.iter().any(|w| w.contains("qk_rope_head_dim")));
    // Nested blocks without a factor rotate the whole head: more than the indexer's 128 dims.
    let e = err(&with(FLASH, |o| {
        o.remove("rope_scaling");
        o.insert(
            "rope_parameters".into(),
            json!({"main": {"rope_type": "default"}, "compress": {"rope_type": "default"}}),
        );
    }));
    assert!(e.contains("index_head_dim"), "{e}");
    // Without `rope_scaling`, compressed layers use plain RoPE at compress_rope_theta.
    let s = spec(&with(FLASH, |o| {
        o.remove("rope_scaling");
    }))
    .unwrap();
    let r = s.layers[2].rope.clone().unwrap();
    assert_eq!(
        (r.kind.as_str(), r.theta, r.factor),
        ("default", 160_000.0, None)
    );
}

#[test]
fn tied_embeddings_counted_once() {
    let a = spec(&tiny()).unwrap();
    let mut t = tiny();
    t["tie_word_embeddings"] = json!(true);
    let b = spec(&t).unwrap();
    assert_eq!(a.params.total - b.params.total, 256 * 64);
    assert_eq!(b.params.lm_head, 0);
}

#[test]
fn aliases_of_the_attribute_map() {
    let mut t = tiny();
    if let Some(o) = t.as_object_mut() {
        o.remove("moe_intermediate_size");
        o.insert("intermediate_size".into(), json!(48));
    }
    // 374,053 on the meta device with intermediate_size 48.
    assert_eq!(spec(&t).unwrap().params.total, 374_053);
    let mut t = tiny();
    if let Some(o) = t.as_object_mut() {
        o.remove("n_routed_experts");
        o.insert("num_local_experts".into(), json!(8));
    }
    assert_eq!(spec(&t).unwrap().params.total, 421_413);
    let mut t = tiny();
    t["mlp_bias"] = json!(true);
    assert_eq!(spec(&t).unwrap().params.total, 297_893);
}

#[test]
fn no_panic_on_huge_dims() {
    let e = err(&with(FLASH, |o| {
        o.insert("vocab_size".into(), json!(u64::MAX));
    }));
    assert!(e.contains("vocab_size"), "{e}");
}

mod bounds_tests {
    use crate::arch::config::bounds_test::{real, refuses_past_bound};

    /// Iteration counts and ratios too: `hc_sinkhorn_iters: 1e9` would run without end.
    #[test]
    fn sizes_counts_and_iterations_past_the_bounds_are_refused_by_key() {
        let raw = real("DeepSeek-V4-Pro");
        for path in [
            &["num_hidden_layers"][..],
            &["hc_sinkhorn_iters"],
            &["hc_mult"],
            &["head_dim"],
            &["q_lora_rank"],
            &["o_lora_rank"],
            &["o_groups"],
            &["index_topk"],
            &["index_n_heads"],
            &["n_routed_experts"],
            &["num_hash_layers"],
            &["compress_ratios", "2"],
            &["sliding_window"],
            &["rope_scaling", "original_max_position_embeddings"],
            &["quantization_config", "weight_block_size", "0"],
        ] {
            refuses_past_bound(&raw, path);
        }
    }
}
