//! Unit tests of the ZAYA config half.

use super::super::budget::{layer_bytes, KvDtype};
use super::super::{parse_config, ArchSpec, Attention, Retention};
use crate::arch::config::ParseOptions;
use serde_json::{json, Value};

const ZAYA1_8B: &str = include_str!("../../../configs/ZAYA1-8B/config.json");

fn real() -> Value {
    serde_json::from_str(ZAYA1_8B).expect("config parses as JSON")
}

/// tests/fixtures/tiny/zaya-sliding/config.json (written by the reference's config class).
fn tiny() -> Value {
    json!({
        "attention_bias": false, "bos_token_id": 2, "cca_time0": 2, "cca_time1": 2,
        "eos_token_id": 106, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64,
        "initializer_range": 0.02,
        "layer_types": ["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"],
        "lm_head_bias": false, "max_position_embeddings": 512, "model_type": "zaya",
        "moe_intermediate_size": 32, "num_attention_heads": 4, "num_experts": 4,
        "num_experts_per_tok": 1, "num_hidden_layers": 4, "num_key_value_heads": 2,
        "output_router_logits": false, "pad_token_id": 0, "rms_norm_eps": 1e-05,
        "rope_parameters": {
            "hybrid": {"partial_rotary_factor": 0.5, "rope_theta": 5000000.0, "rope_type": "default"},
            "hybrid_sliding": {"partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rope_type": "default"}
        },
        "router_hidden_size": 16, "sliding_window": 8, "tie_word_embeddings": true,
        "transformers_version": "5.23.0", "use_cache": true, "vocab_size": 256
    })
}

fn spec(v: &Value) -> anyhow::Result<ArchSpec> {
    parse_config(v, &ParseOptions::default())
}

fn err(v: &Value) -> String {
    match spec(v) {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn real_config_layers() {
    let s = spec(&real()).unwrap();
    assert_eq!(s.family, "zaya");
    assert_eq!(s.layers.len(), 40);
    assert!(s.tie_word_embeddings);
    for l in &s.layers {
        assert_eq!(l.attention, Attention::Cca { window: None });
        assert_eq!(
            (l.q_heads, l.kv_heads, l.head_dim, l.v_head_dim),
            (8, 2, 128, 128)
        );
        let r = l.rope.as_ref().unwrap();
        assert_eq!(
            (r.kind.as_str(), r.theta, r.rotary_dim),
            ("default", 5e6, 64)
        );
        let parts: Vec<(&str, u64, Retention)> = l
            .cache
            .iter()
            .map(|p| (p.name, p.elems_per_entry, p.retention))
            .collect();
        assert_eq!(
            parts,
            vec![
                ("K", 256, Retention::AllTokens),
                ("V", 256, Retention::AllTokens),
                ("conv state", 1280, Retention::Fixed { entries: 2 }),
                ("delayed V state", 128, Retention::Fixed { entries: 1 }),
            ]
        );
    }
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

#[test]
fn real_config_params_match_reference() {
    let s = spec(&real()).unwrap();
    // tests/fixtures/reference_params.json, "ZAYA1-8B".
    assert_eq!(s.params.total, 8_840_488_784);
    assert_eq!(s.params.embedding, 537_133_056);
    assert_eq!(s.params.lm_head, 0);
    assert_eq!(s.params.routed_experts, 8_053_063_680);
    let active = s.params.active as f64 / 1e9;
    assert!((active - 1.29).abs() < 0.005, "active {active}");
}

#[test]
fn tiny_params_and_cache_match_reference() {
    // Totals measured with transformers 5.23.0 on the meta device.
    let s = spec(&tiny()).unwrap();
    assert_eq!(s.params.total, 187_192);
    assert_eq!(s.layers[0].attention, Attention::Cca { window: Some(8) });
    assert_eq!(s.layers[1].attention, Attention::Cca { window: None });
    // reference_cache.json, zaya-sliding, 43 tokens, f32: conv [1, 96, 2], recurrent [1, 16],
    // K/V [1, 2, T, 16] with T = 43 (hybrid) or window − 1 = 7 there, window = 8 here.
    let parts = layer_bytes(&s.layers[1], 43, 1, KvDtype::F32).unwrap();
    let bytes: Vec<u64> = parts.iter().map(|(_, b)| *b).collect();
    assert_eq!(bytes, vec![5504, 5504, 768, 64]);
    let parts = layer_bytes(&s.layers[0], 43, 1, KvDtype::F32).unwrap();
    let bytes: Vec<u64> = parts.iter().map(|(_, b)| *b).collect();
    assert_eq!(bytes, vec![8 * 128, 8 * 128, 768, 64]);

    let variant = |f: &dyn Fn(&mut Value)| {
        let mut v = tiny();
        f(&mut v);
        spec(&v).unwrap().params.total
    };
    assert_eq!(
        variant(&|v| {
            v["cca_time0"] = json!(3);
            v["cca_time1"] = json!(4);
        }),
        199_864
    );
    assert_eq!(
        variant(&|v| {
            v["cca_time0"] = json!(1);
            v["cca_time1"] = json!(1);
        }),
        180_664
    );
    assert_eq!(variant(&|v| v["attention_bias"] = json!(true)), 187_960);
    assert_eq!(variant(&|v| v["lm_head_bias"] = json!(true)), 187_448);
    assert_eq!(
        variant(&|v| {
            v["lm_head_bias"] = json!(true);
            v["tie_word_embeddings"] = json!(false);
        }),
        203_832
    );
    // No conv state without conv history.
    let mut v = tiny();
    v["cca_time0"] = json!(1);
    v["cca_time1"] = json!(1);
    let s = spec(&v).unwrap();
    assert!(s.layers[0].cache.iter().all(|p| p.name != "conv state"));
}

#[test]
fn top_k_other_than_one_is_refused() {
    let mut v = real();
    v["num_experts_per_tok"] = json!(2);
    let e = err(&v);
    assert!(e.contains("num_experts_per_tok"), "{e}");
}

#[test]
fn sliding_layers_need_a_window() {
    let mut v = real();
    v["layer_types"][3] = json!("hybrid_sliding");
    let e = err(&v);
    assert!(
        e.contains("sliding_window") && e.contains("hybrid_sliding"),
        "{e}"
    );
    v["sliding_window"] = json!(4096);
    let s = spec(&v).unwrap();
    assert_eq!(s.layers[3].attention, Attention::Cca { window: Some(4096) });
    assert_eq!(
        s.layers[3].cache[0].retention,
        Retention::Window { window: 4096 }
    );
    let r = s.layers[3].rope.as_ref().unwrap();
    assert_eq!((r.theta, r.rotary_dim), (10_000.0, 64));
    v["sliding_window"] = json!(0);
    assert!(err(&v).contains("sliding_window"));
}

#[test]
fn legacy_schema_is_refused() {
    let legacy = json!({
        "architectures": ["ZayaForCausalLM"], "model_type": "zaya",
        "num_hidden_layers": 80, "hidden_size": 2048, "ffn_hidden_size": 4096,
        "zaya_mlp_expansion": 256, "num_attention_heads": 8, "num_query_groups": 2,
        "rope_theta": 5000000, "partial_rotary_factor": 0.5, "num_experts": 16
    });
    let e = err(&legacy);
    assert!(e.contains("legacy ZAYA hub schema"), "{e}");
    assert!(
        e.contains("ffn_hidden_size") && e.contains("zaya_mlp_expansion"),
        "{e}"
    );
    assert!(
        e.contains("hint:") && e.contains("convert_zaya_weights_to_hf"),
        "{e}"
    );
}

#[test]
fn bad_inputs_name_the_key() {
    let mut v = real();
    v["num_key_value_heads"] = json!(3);
    assert!(err(&v).contains("num_key_value_heads"));
    let mut v = real();
    v["cca_time0"] = json!(0);
    assert!(err(&v).contains("cca_time0"));
    let mut v = real();
    v["layer_types"].as_array_mut().unwrap().pop();
    let e = err(&v);
    assert!(e.contains("layer_types") && e.contains("39"), "{e}");
    let mut v = real();
    v["layer_types"][0] = json!("full_attention");
    assert!(err(&v).contains("layer_types[0]"));
    let mut v = real();
    v["head_dim"] = json!(15);
    v["num_key_value_heads"] = json!(1);
    assert!(err(&v).contains("head_dim"));
    let mut v = real();
    v["hidden_act"] = json!("gelu");
    assert!(err(&v).contains("hidden_act"));
    let mut v = real();
    v["some_new_switch"] = json!(true);
    assert!(err(&v).contains("some_new_switch"));
}

#[test]
fn rope_forms() {
    // The hub's stray `rope_type` beside the nested blocks is dropped, as in the reference.
    let mut v = real();
    v["rope_parameters"]["rope_type"] = json!("default");
    assert!(spec(&v).unwrap().warnings.is_empty());
    // A flat block cannot be built by the reference.
    let mut v = real();
    v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e4});
    assert!(err(&v).contains("flat"));
    // A used layer type needs its block.
    let mut v = real();
    v["rope_parameters"]
        .as_object_mut()
        .unwrap()
        .remove("hybrid");
    assert!(err(&v).contains("rope_parameters.hybrid"));
    // Absent: the reference's defaults.
    let mut v = real();
    v.as_object_mut().unwrap().remove("rope_parameters");
    let r = spec(&v).unwrap().layers[0].rope.clone().unwrap();
    assert_eq!((r.theta, r.rotary_dim), (5e6, 64));
    // Legacy rope_scaling is refused.
    let mut v = real();
    v["rope_scaling"] = json!({"rope_type": "linear", "factor": 2.0});
    assert!(err(&v).contains("rope_scaling"));
    // YaRN without original_max_position_embeddings is refused, as by the reference.
    let mut v = real();
    v["rope_parameters"]["hybrid"] = json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e6});
    assert!(err(&v).contains("rope_parameters.hybrid.original_max_position_embeddings"));
}

mod bounds_tests {
    use crate::arch::config::bounds_test::{real, refuses_past_bound};

    #[test]
    fn sizes_past_the_bounds_are_refused_by_key() {
        let raw = real("ZAYA1-8B");
        for key in [
            "num_hidden_layers",
            "head_dim",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "cca_time0",
            "cca_time1",
            "router_hidden_size",
            "num_experts",
            "moe_intermediate_size",
            "vocab_size",
        ] {
            refuses_past_bound(&raw, &[key]);
        }
    }
}
