//! Unit tests of the Laguna config half: the spec of the real model, every RoPE form, gating,
//! the legacy keys, the bounds.

use super::super::{parse_config, ArchSpec, Attention, Ffn};
use super::runtime_config;
use crate::arch::config::{ParseOptions, TextConfig};
use crate::layers::output_gate::GateGranularity;
use serde_json::{json, Value};

const XS2: &str = include_str!("../../../configs/Laguna-XS.2/config.json");

fn real() -> Value {
    serde_json::from_str(XS2).expect("config parses as JSON")
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
    assert_eq!(s.family, "laguna");
    assert_eq!(s.layers.len(), 40);
    for l in &s.layers {
        assert_eq!(l.kv_heads, 8);
        assert_eq!(l.head_dim, 128);
        if l.index % 4 == 0 {
            assert_eq!(l.attention, Attention::Full);
            assert_eq!(l.q_heads, 48);
            assert_eq!(l.group_size(), 6.0);
            let r = l.rope.as_ref().unwrap();
            assert_eq!(
                (r.kind.as_str(), r.rotary_dim, r.factor),
                ("yarn", 64, Some(32.0))
            );
        } else {
            assert_eq!(l.attention, Attention::Sliding { window: 512 });
            assert_eq!(l.q_heads, 64);
            assert_eq!(l.group_size(), 8.0);
            let r = l.rope.as_ref().unwrap();
            assert_eq!(
                (r.kind.as_str(), r.rotary_dim, r.theta),
                ("default", 128, 10_000.0)
            );
        }
        // K and V of 8 × 128 per token.
        let elems: u64 = l.cache.iter().map(|p| p.elems_per_entry).sum();
        assert_eq!(elems, 2 * 8 * 128);
        assert_eq!(l.notes, vec!["gate per-head".to_string()]);
    }
    assert_eq!(s.layers[0].ffn, Ffn::Dense { width: 8192 });
    match &s.layers[1].ffn {
        Ffn::Moe {
            experts,
            top_k,
            width,
            shared_width,
            ..
        } => assert_eq!(
            (*experts, *top_k, *width, *shared_width),
            (256, 8, 512, Some(512))
        ),
        f => panic!("layer 1 should be MoE, got {f:?}"),
    }
    // The legacy keys agree with mlp_layer_types: no warning.
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

#[test]
fn real_config_params_match_reference() {
    let s = spec(&real()).unwrap();
    // tests/fixtures/reference_params.json, "Laguna-XS.2".
    assert_eq!(s.params.total, 33_442_617_088);
    assert_eq!(s.params.embedding, 205_520_896);
    assert_eq!(s.params.lm_head, 205_520_896);
    assert_eq!(s.params.routed_experts, 31_406_948_352);
    let active = s.params.active as f64 / 1e9;
    assert!((active - 3.02).abs() < 0.005, "active {active}");
}

#[test]
fn per_element_gate_changes_params() {
    let mut v = real();
    v["gating"] = json!("per-element");
    let s = spec(&v).unwrap();
    // g_proj grows from q to q × head_dim outputs on every layer.
    let heads: u64 = 10 * 48 + 30 * 64;
    assert_eq!(s.params.total, 33_442_617_088 + 2048 * heads * 127);
    assert_eq!(s.layers[0].notes, vec!["gate per-element".to_string()]);
    v["gating"] = json!(true);
    assert_eq!(spec(&v).unwrap().params.total, 33_442_617_088);
    v["gating"] = json!(false);
    let s = spec(&v).unwrap();
    assert_eq!(s.params.total, 33_442_617_088 + 2048 * heads * 127);
    assert!(s.warnings.iter().any(|w| w.contains("gating")));
    v["gating"] = json!("per_head");
    assert!(err(&v).contains("`gating`"));
}

#[test]
fn tiny_variants_match_reference() {
    // Totals measured with transformers 5.23.0 on the meta device for the real config shrunk.
    let tiny = |f: &dyn Fn(&mut Value)| {
        let mut v = real();
        for (k, x) in [
            ("num_hidden_layers", 4),
            ("hidden_size", 64),
            ("intermediate_size", 128),
            ("num_experts", 4),
            ("num_experts_per_tok", 2),
            ("moe_intermediate_size", 32),
            ("shared_expert_intermediate_size", 32),
            ("vocab_size", 100),
            ("head_dim", 16),
            ("num_attention_heads", 4),
            ("num_key_value_heads", 2),
        ] {
            v[k] = json!(x);
        }
        v["layer_types"] = json!([
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "sliding_attention"
        ]);
        v["mlp_layer_types"] = json!(["dense", "sparse", "sparse", "sparse"]);
        v["num_attention_heads_per_layer"] = json!([4, 8, 8, 8]);
        f(&mut v);
        spec(&v).unwrap().params.total
    };
    assert_eq!(tiny(&|_| {}), 206_540);
    assert_eq!(tiny(&|v| v["gating"] = json!("per-element")), 233_420);
    assert_eq!(tiny(&|v| v["attention_bias"] = json!(true)), 207_500);
}

#[test]
fn head_list_of_wrong_length() {
    let mut v = real();
    v["num_attention_heads_per_layer"]
        .as_array_mut()
        .unwrap()
        .pop();
    let e = err(&v);
    assert!(e.contains("num_attention_heads_per_layer"), "{e}");
    assert!(e.contains("39") && e.contains("40"), "{e}");
}

#[test]
fn heads_not_divisible() {
    let mut v = real();
    v["num_attention_heads_per_layer"][5] = json!(60);
    let e = err(&v);
    assert!(e.contains("layer 5"), "{e}");
}

#[test]
fn bad_layer_lists() {
    let mut v = real();
    v["layer_types"][3] = json!("chunked_attention");
    assert!(err(&v).contains("layer_types[3]"));
    let mut v = real();
    v["mlp_layer_types"][7] = json!("moe");
    assert!(err(&v).contains("mlp_layer_types[7]"));
    let mut v = real();
    v["mlp_layer_types"]
        .as_array_mut()
        .unwrap()
        .push(json!("dense"));
    assert!(err(&v).contains("mlp_layer_types"));
    let mut v = real();
    v["layer_types"].as_array_mut().unwrap().pop();
    assert!(err(&v).contains("layer_types"));
}

#[test]
fn router_weight_on_input_is_refused() {
    let mut v = real();
    v["moe_apply_router_weight_on_input"] = json!(true);
    assert!(err(&v).contains("moe_apply_router_weight_on_input"));
}

#[test]
fn bad_moe_and_window() {
    let mut v = real();
    v["num_experts_per_tok"] = json!(300);
    assert!(err(&v).contains("num_experts_per_tok"));
    let mut v = real();
    v["sliding_window"] = json!(null);
    assert!(err(&v).contains("sliding_window"));
    let mut v = real();
    v["sliding_window"] = json!(0);
    assert!(err(&v).contains("sliding_window"));
    let mut v = real();
    v["hidden_act"] = json!("gelu");
    assert!(err(&v).contains("hidden_act"));
    let mut v = real();
    v["head_dim"] = json!(null);
    assert!(err(&v).contains("head_dim"));
}

#[test]
fn legacy_keys_contradicting_mlp_layer_types_warn() {
    let mut v = real();
    v["mlp_only_layers"] = json!([0, 1]);
    let s = spec(&v).unwrap();
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("mlp_only_layers") && w.contains("layers 1")),
        "{:?}",
        s.warnings
    );
    let mut v = real();
    v["decoder_sparse_step"] = json!(2);
    let s = spec(&v).unwrap();
    assert!(s.warnings.iter().any(|w| w.contains("decoder_sparse_step")));
    // Parameters follow mlp_layer_types, as in the reference.
    assert_eq!(s.params.total, 33_442_617_088);
}

#[test]
fn unknown_key_is_refused() {
    let mut v = real();
    v["attention_sink"] = json!(true);
    assert!(err(&v).contains("attention_sink"));
}

#[test]
fn rope_defaults_when_absent() {
    let mut v = real();
    v.as_object_mut().unwrap().remove("rope_parameters");
    let s = spec(&v).unwrap();
    let full = s.layers[0].rope.as_ref().unwrap();
    assert_eq!(
        (full.kind.as_str(), full.theta, full.rotary_dim),
        ("default", 500_000.0, 64)
    );
    let sl = s.layers[1].rope.as_ref().unwrap();
    assert_eq!((sl.theta, sl.rotary_dim), (10_000.0, 128));
}

#[test]
fn rope_flat_with_swa_block() {
    let mut v = real();
    let full = v["rope_parameters"]["full_attention"].clone();
    let sliding = v["rope_parameters"]["sliding_attention"].clone();
    v["rope_parameters"] = full;
    v["swa_rope_parameters"] = sliding;
    let s = spec(&v).unwrap();
    assert_eq!(s.layers[0].rope.as_ref().unwrap().kind, "yarn");
    assert_eq!(s.layers[1].rope.as_ref().unwrap().rotary_dim, 128);
    assert!(s.warnings.iter().any(|w| w.contains("flat")));
    // Without the sliding block the sliding layers have no RoPE.
    v.as_object_mut().unwrap().remove("swa_rope_parameters");
    assert!(err(&v).contains("swa_rope_parameters"));
}

#[test]
fn rope_top_level_original_max_is_refused() {
    // Form (c): the reference rejects a YaRN block without its own original_max_position_embeddings.
    let mut v = real();
    let omp = v["rope_parameters"]["full_attention"]
        .as_object_mut()
        .unwrap()
        .remove("original_max_position_embeddings")
        .unwrap();
    v["rope_parameters"]["original_max_position_embeddings"] = omp;
    let e = err(&v);
    assert!(
        e.contains("rope_parameters.full_attention.original_max_position_embeddings"),
        "{e}"
    );
}

#[test]
fn rope_missing_or_bad_blocks() {
    let mut v = real();
    v["rope_parameters"]
        .as_object_mut()
        .unwrap()
        .remove("sliding_attention");
    assert!(err(&v).contains("rope_parameters.sliding_attention"));
    let mut v = real();
    v["rope_parameters"]["sliding_attention"] = json!(null);
    assert!(err(&v).contains("rope_parameters.sliding_attention"));
    let mut v = real();
    v["rope_parameters"]["sliding_attention"]
        .as_object_mut()
        .unwrap()
        .remove("rope_theta");
    assert!(err(&v).contains("rope_parameters.sliding_attention.rope_theta"));
    let mut v = real();
    v["rope_parameters"]["full_attention"]["rope_type"] = json!("foo");
    assert!(err(&v).contains("rope_parameters.full_attention.rope_type"));
    // A missing rope_type means `default`, as in the reference.
    let mut v = real();
    v["rope_parameters"]["sliding_attention"]
        .as_object_mut()
        .unwrap()
        .remove("rope_type");
    assert!(spec(&v).is_ok());
}

#[test]
fn yarn_truncate_is_read_from_the_top_level() {
    let mut v = real();
    v["rope_parameters"]["truncate"] = json!(false);
    let s = spec(&v).unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    let text = TextConfig::from_raw(&v, &ParseOptions::default()).unwrap();
    let top = runtime_config(&text).unwrap();
    let mut v = real();
    v["rope_parameters"]["full_attention"]["truncate"] = json!(false);
    let s = spec(&v).unwrap();
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("rope_parameters.full_attention.truncate")),
        "{:?}",
        s.warnings
    );
    let text = TextConfig::from_raw(&v, &ParseOptions::default()).unwrap();
    let block = runtime_config(&text).unwrap();
    let text = TextConfig::from_raw(&real(), &ParseOptions::default()).unwrap();
    let plain = runtime_config(&text).unwrap();
    // The block's own `truncate` changes nothing; the top-level one does.
    assert_eq!(block.rope_full, plain.rope_full);
    assert_ne!(top.rope_full, plain.rope_full);
}

#[test]
fn runtime_config_of_the_real_model() {
    let text = TextConfig::from_raw(&real(), &ParseOptions::default()).unwrap();
    let c = runtime_config(&text).unwrap();
    assert_eq!(c.gate, GateGranularity::PerHead);
    assert_eq!(c.moe_routed_scaling_factor, 2.5);
    assert_eq!(c.moe_router_logit_softcapping, None);
    assert_eq!(c.max_positions_limit(), None);
    let full = c.rope_full.unwrap();
    assert_eq!((full.kind.as_str(), full.inv_freq.len()), ("yarn", 32));
    assert_eq!(full.attention_scaling, 1.0);
    assert_eq!(c.rope_sliding.unwrap().inv_freq.len(), 64);
}

#[test]
fn rope_scaling_replaces_rope_parameters() {
    let mut v = real();
    v["rope_scaling"] = json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4});
    v["swa_rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e4});
    let s = spec(&v).unwrap();
    assert_eq!(s.layers[0].rope.as_ref().unwrap().kind, "linear");
    assert!(s.warnings.iter().any(|w| w.contains("rope_scaling")));
}

#[test]
fn all_full_needs_no_sliding_block() {
    let mut v = real();
    v["layer_types"] = json!(vec!["full_attention"; 40]);
    v["rope_parameters"]
        .as_object_mut()
        .unwrap()
        .remove("sliding_attention");
    let s = spec(&v).unwrap();
    assert!(s.layers.iter().all(|l| l.attention == Attention::Full));
}

mod bounds_tests {
    use crate::arch::config::bounds_test::{real, refuses_past_bound};

    #[test]
    fn sizes_past_the_bounds_are_refused_by_key() {
        let raw = real("Laguna-XS.2");
        for path in [
            &["num_hidden_layers"][..],
            &["head_dim"],
            &["hidden_size"],
            &["num_attention_heads_per_layer", "3"],
            &["num_experts"],
            &["num_experts_per_tok"],
            &["moe_intermediate_size"],
            &["shared_expert_intermediate_size"],
            &["sliding_window"],
            &["max_position_embeddings"],
        ] {
            refuses_past_bound(&raw, path);
        }
    }
}
