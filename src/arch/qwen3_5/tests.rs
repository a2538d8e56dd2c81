//! Unit tests of the Qwen3.5 config half: the real dense and MoE configs, parameter counts
//! against the reference, the variants, the keys the reference ignores, the bounds.

use crate::arch::budget::{layer_bytes, KvDtype};
use crate::arch::config::ParseOptions;
use crate::arch::{parse_config, PartDtype};
use crate::arch::{ArchSpec, Attention, Ffn, Retention, Routing};
use anyhow::Result;
use serde_json::{Map, Value};

const DENSE_27B: &str = include_str!("../../../configs/Qwen3.6-27B/config.json");
const MOE_35B: &str = include_str!("../../../configs/Qwen3.6-35B-A3B/config.json");
const PARAMS: &str = include_str!("../../../tests/fixtures/reference_params.json");
const CACHE: &str = include_str!("../../../tests/fixtures/reference_cache.json");
const TINY: &[(&str, &str)] = &[
    (
        "qwen3_5",
        include_str!("../../../tests/fixtures/tiny/qwen3_5/config.json"),
    ),
    (
        "qwen3_5-moe",
        include_str!("../../../tests/fixtures/tiny/qwen3_5-moe/config.json"),
    ),
    (
        "qwen3_5-wrapper",
        include_str!("../../../tests/fixtures/tiny/qwen3_5-wrapper/config.json"),
    ),
];

fn json(s: &str) -> Value {
    serde_json::from_str(s).expect("valid JSON")
}

fn spec(v: &Value) -> Result<ArchSpec> {
    parse_config(v, &ParseOptions::default())
}

/// Apply `f` to the `text_config` of a wrapper file.
fn edit(src: &str, f: impl FnOnce(&mut Map<String, Value>)) -> Value {
    let mut v = json(src);
    f(v["text_config"].as_object_mut().expect("text_config"));
    v
}

fn err(v: &Value) -> String {
    format!("{:#}", spec(v).expect_err("must fail"))
}

fn reference(folder: &str) -> Value {
    json(PARAMS)[folder].clone()
}

fn count(s: &ArchSpec, a: Attention) -> usize {
    s.layers.iter().filter(|l| l.attention == a).count()
}

#[test]
fn qwen36_27b_layers() {
    let s = spec(&json(DENSE_27B)).unwrap();
    assert_eq!(s.hf_class, "Qwen3_5ForCausalLM");
    assert_eq!(s.layers.len(), 64);
    assert_eq!(count(&s, Attention::Full), 16);
    assert_eq!(count(&s, Attention::Linear), 48);
    for l in &s.layers {
        assert_eq!(
            l.attention == Attention::Full,
            l.index % 4 == 3,
            "layer {}",
            l.index
        );
        assert_eq!(l.ffn, Ffn::Dense { width: 17408 });
    }
    let lin = &s.layers[0];
    assert_eq!(
        (lin.q_heads, lin.kv_heads, lin.head_dim, lin.v_head_dim),
        (48, 16, 128, 128)
    );
    assert!(lin.rope.is_none());
    // conv_dim = 2 × 16 × 128 + 48 × 128 = 10240; kernel 4 → 3 columns kept.
    assert_eq!(lin.cache[0].elems_per_entry, 10240);
    assert_eq!(lin.cache[0].retention, Retention::Fixed { entries: 3 });
    assert_eq!(lin.cache[0].dtype, PartDtype::Kv);
    assert_eq!(lin.cache[1].elems_per_entry, 48 * 128 * 128);
    assert_eq!(lin.cache[1].retention, Retention::Fixed { entries: 1 });
    assert_eq!(lin.cache[1].dtype, PartDtype::F32);
    let full = &s.layers[3];
    assert_eq!(
        (full.q_heads, full.kv_heads, full.head_dim, full.v_head_dim),
        (24, 4, 256, 256)
    );
    let rope = full.rope.as_ref().unwrap();
    assert_eq!(
        (rope.kind.as_str(), rope.theta, rope.rotary_dim),
        ("default", 1e7, 64)
    );
    assert_eq!(full.cache.len(), 2);
    assert!(full
        .cache
        .iter()
        .all(|p| p.elems_per_entry == 4 * 256 && p.retention == Retention::AllTokens));
    assert!(s.notes.iter().any(|n| n.starts_with("MTP layers: 1")));
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

#[test]
fn qwen36_27b_params_match_reference() {
    let s = spec(&json(DENSE_27B)).unwrap();
    let r = reference("Qwen3.6-27B");
    assert_eq!(s.params.total, r["total"].as_u64().unwrap());
    assert_eq!(s.params.total, 26_895_998_464);
    assert_eq!(s.params.embedding, r["embedding"].as_u64().unwrap());
    assert_eq!(s.params.lm_head, r["lm_head"].as_u64().unwrap());
    assert_eq!(
        s.params.routed_experts,
        r["routed_experts"].as_u64().unwrap()
    );
    assert_eq!(s.params.active, s.params.total);
}

#[test]
fn qwen36_35b_a3b_layers_and_params() {
    let s = spec(&json(MOE_35B)).unwrap();
    assert_eq!(s.hf_class, "Qwen3_5MoeForCausalLM");
    assert_eq!(s.layers.len(), 40);
    assert_eq!(count(&s, Attention::Full), 10);
    assert_eq!(count(&s, Attention::Linear), 30);
    let lin = &s.layers[0];
    assert_eq!(
        (lin.q_heads, lin.kv_heads, lin.head_dim, lin.v_head_dim),
        (32, 16, 128, 128)
    );
    let full = &s.layers[39];
    assert_eq!(
        (
            full.attention.clone(),
            full.q_heads,
            full.kv_heads,
            full.head_dim
        ),
        (Attention::Full, 16, 2, 256)
    );
    assert_eq!(
        full.ffn,
        Ffn::Moe {
            experts: 256,
            top_k: 8,
            width: 512,
            shared_width: Some(512),
            dense_width: None,
            routing: Routing::Softmax
        }
    );
    let r = reference("Qwen3.6-35B-A3B");
    assert_eq!(s.params.total, r["total"].as_u64().unwrap());
    assert_eq!(s.params.total, 34_660_610_688);
    assert_eq!(s.params.embedding, r["embedding"].as_u64().unwrap());
    assert_eq!(s.params.lm_head, r["lm_head"].as_u64().unwrap());
    assert_eq!(
        s.params.routed_experts,
        r["routed_experts"].as_u64().unwrap()
    );
    // total − routed × (1 − 8/256) = 3.455 B (README: ≈3.46 B).
    assert_eq!(s.params.active, 3_454_988_928);
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

#[test]
fn interval_form_parses_like_the_list() {
    for src in [DENSE_27B, MOE_35B] {
        let listed = spec(&json(src)).unwrap();
        let by_interval = spec(&edit(src, |t| {
            t.remove("layer_types");
        }))
        .unwrap();
        assert_eq!(listed.layers, by_interval.layers);
        assert_eq!(listed.params, by_interval.params);
        // Neither key: the default interval is 4 too.
        let default = spec(&edit(src, |t| {
            t.remove("layer_types");
            t.remove("full_attention_interval");
        }))
        .unwrap();
        assert_eq!(listed.layers, default.layers);
    }
    let every_other = spec(&edit(DENSE_27B, |t| {
        t.remove("layer_types");
        t.insert("full_attention_interval".into(), 2.into());
    }))
    .unwrap();
    assert_eq!(count(&every_other, Attention::Full), 32);
    assert_eq!(every_other.layers[1].attention, Attention::Full);
    assert_eq!(every_other.layers[0].attention, Attention::Linear);
}

#[test]
fn interval_disagreeing_with_the_list_warns() {
    let s = spec(&edit(DENSE_27B, |t| {
        t.insert("full_attention_interval".into(), 2.into());
    }))
    .unwrap();
    assert_eq!(count(&s, Attention::Full), 16);
    assert!(s
        .warnings
        .iter()
        .any(|w| w.contains("full_attention_interval")));
}

#[test]
fn bad_layer_types() {
    let e = err(&edit(DENSE_27B, |t| {
        t["layer_types"][5] = "sliding_attention".into();
    }));
    assert!(
        e.contains("text_config.layer_types[5]") && e.contains("layer 5"),
        "{e}"
    );
    let e = err(&edit(DENSE_27B, |t| {
        t["layer_types"].as_array_mut().unwrap().pop();
    }));
    assert!(
        e.contains("text_config.layer_types") && e.contains("63 entries"),
        "{e}"
    );
    let e = err(&edit(DENSE_27B, |t| {
        t["layer_types"][2] = 7.into();
    }));
    assert!(e.contains("text_config.layer_types[2]"), "{e}");
    let e = err(&edit(DENSE_27B, |t| {
        t.remove("layer_types");
        t.insert("full_attention_interval".into(), 0.into());
    }));
    assert!(e.contains("text_config.full_attention_interval"), "{e}");
}

#[test]
fn gate_keys() {
    let e = err(&edit(DENSE_27B, |t| {
        t.insert("output_gate_type".into(), "sigmoid".into());
    }));
    assert!(e.contains("text_config.output_gate_type"), "{e}");
    let e = err(&edit(MOE_35B, |t| {
        t.insert("attn_output_gate".into(), false.into());
    }));
    assert!(e.contains("text_config.attn_output_gate"), "{e}");
    // The 35B file has no output_gate_type: same architecture.
    assert!(json(MOE_35B)["text_config"]
        .get("output_gate_type")
        .is_none());
}

#[test]
fn ssm_dtype_and_activation() {
    let s = spec(&edit(DENSE_27B, |t| {
        t.insert("mamba_ssm_dtype".into(), "bfloat16".into());
    }))
    .unwrap();
    assert!(s.warnings.iter().any(|w| w.contains("mamba_ssm_dtype")));
    assert_eq!(s.layers[0].cache[1].dtype, PartDtype::F32);
    let e = err(&edit(DENSE_27B, |t| {
        t.insert("hidden_act".into(), "gelu".into());
    }));
    assert!(e.contains("text_config.hidden_act"), "{e}");
}

#[test]
fn head_validation() {
    let e = err(&edit(DENSE_27B, |t| {
        t.insert("linear_num_value_heads".into(), 40.into());
    }));
    assert!(e.contains("text_config.linear_num_value_heads"), "{e}");
    let e = err(&edit(DENSE_27B, |t| {
        t.insert("num_key_value_heads".into(), 5.into());
    }));
    assert!(e.contains("layer 3"), "{e}");
    let e = err(&edit(DENSE_27B, |t| {
        t.insert("linear_conv_kernel_dim".into(), 0.into());
    }));
    assert!(e.contains("text_config.linear_conv_kernel_dim"), "{e}");
    let e = err(&edit(DENSE_27B, |t| {
        t.insert("head_dim".into(), Value::Null);
    }));
    assert!(e.contains("text_config.head_dim"), "{e}");
    let e = err(&edit(DENSE_27B, |t| {
        t.remove("layer_types");
        t.insert("num_hidden_layers".into(), 1_000_000_000_000u64.into());
    }));
    assert!(e.contains("text_config.num_hidden_layers"), "{e}");
    let e = err(&edit(DENSE_27B, |t| {
        t.insert("hidden_size".into(), (u64::MAX / 2).into());
    }));
    assert!(
        e.contains("text_config.hidden_size") && e.contains("at most 262144"),
        "{e}"
    );
}

#[test]
fn moe_validation() {
    let e = err(&edit(MOE_35B, |t| {
        t.insert("num_experts_per_tok".into(), 300.into());
    }));
    assert!(e.contains("text_config.num_experts_per_tok"), "{e}");
    let e = err(&edit(MOE_35B, |t| {
        t.insert("norm_topk_prob".into(), false.into());
    }));
    assert!(e.contains("text_config.norm_topk_prob"), "{e}");
    assert!(spec(&edit(MOE_35B, |t| {
        t.insert("norm_topk_prob".into(), true.into());
        t.insert("decoder_sparse_step".into(), 1.into());
        t.insert("mlp_only_layers".into(), serde_json::json!([]));
    }))
    .is_ok());
    let e = err(&edit(MOE_35B, |t| {
        t.insert("decoder_sparse_step".into(), 2.into());
    }));
    assert!(e.contains("text_config.decoder_sparse_step"), "{e}");
    let e = err(&edit(MOE_35B, |t| {
        t.insert("mlp_only_layers".into(), serde_json::json!([0, 5]));
    }));
    assert!(e.contains("text_config.mlp_only_layers"), "{e}");
    let e = err(&edit(DENSE_27B, |t| {
        t.insert("num_experts".into(), 64.into());
    }));
    assert!(e.contains("text_config.num_experts"), "{e}");
}

#[test]
fn variant_and_key_checks() {
    let e = err(&edit(DENSE_27B, |t| {
        t.insert("some_new_gate".into(), true.into());
    }));
    assert!(e.contains("text_config.some_new_gate"), "{e}");
    let e = err(&edit(DENSE_27B, |t| {
        t.insert("model_type".into(), "qwen3_5_moe_text".into());
    }));
    assert!(
        e.contains("architectures") || e.contains("model_type"),
        "{e}"
    );
    let mut bare = json(DENSE_27B);
    bare.as_object_mut().unwrap().remove("text_config");
    let e = err(&bare);
    assert!(e.contains("text_config"), "{e}");
}

#[test]
fn rope_checks() {
    let e = err(&edit(DENSE_27B, |t| {
        t["rope_parameters"]["mrope_section"] = serde_json::json!([11, 11]);
    }));
    assert!(
        e.contains("text_config.rope_parameters.mrope_section"),
        "{e}"
    );
    let e = err(&edit(DENSE_27B, |t| {
        t["rope_parameters"]["rope_type"] = "warp".into();
    }));
    assert!(e.contains("text_config.rope_parameters.rope_type"), "{e}");
    let e = err(&edit(DENSE_27B, |t| {
        t["rope_parameters"] = serde_json::json!({"full_attention": {"rope_theta": 1e7}});
    }));
    assert!(
        e.contains("text_config.rope_parameters.full_attention"),
        "{e}"
    );
    // Legacy top-level fields fill a missing block.
    let s = spec(&edit(DENSE_27B, |t| {
        t.remove("rope_parameters");
        t.insert("rope_theta".into(), 1e7.into());
    }))
    .unwrap();
    let rope = s.layers[3].rope.as_ref().unwrap();
    assert_eq!((rope.theta, rope.rotary_dim), (1e7, 64));
}

/// The tiny oracle configs, counted on the meta device with transformers 5.23.0
/// (`sum(p.numel() for p in Qwen3_5(Moe)ForCausalLM(cfg).parameters())`).
#[test]
fn tiny_params_match_reference() {
    for ((name, src), want) in TINY.iter().zip([363_040u64, 414_752, 363_040]) {
        let s = spec(&json(src)).unwrap();
        assert_eq!(s.params.total, want, "{name}");
        assert!(s.warnings.is_empty(), "{name}: {:?}", s.warnings);
    }
}

/// The tiny oracle configs: our cache equals what the reference measured, except that the
/// conv state keeps `kernel − 1` columns instead of the reference's `kernel`.
#[test]
fn tiny_cache_matches_reference() {
    let cache = json(CACHE);
    let entries = cache["entries"].as_array().unwrap();
    for (name, src) in TINY {
        let s = spec(&json(src)).unwrap();
        let mut checked = 0;
        for e in entries.iter().filter(|e| e["name"] == *name) {
            let tokens = e["tokens"].as_u64().unwrap();
            let kv = match e["dtype"].as_str().unwrap() {
                "float32" => KvDtype::F32,
                "bfloat16" => KvDtype::Bf16,
                other => panic!("dtype {other}"),
            };
            for rl in e["layers"].as_array().unwrap() {
                let i = rl["decoder_layer"].as_u64().unwrap() as usize;
                let ours = layer_bytes(&s.layers[i], tokens, 1, kv).unwrap();
                let theirs: u64 = rl["bytes"].as_u64().unwrap();
                let ours_total: u64 = ours.iter().map(|(_, b)| b).sum();
                if s.layers[i].attention == Attention::Linear {
                    let conv = &rl["tensors"][0];
                    assert_eq!(conv["name"], "conv_states[0]");
                    let shape: Vec<u64> = conv["shape"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|d| d.as_u64().unwrap())
                        .collect();
                    let column = conv["bytes"].as_u64().unwrap() / shape[2];
                    assert_eq!(ours_total + column, theirs, "{name} layer {i}");
                    assert_eq!(ours[1].1, rl["tensors"][1]["bytes"].as_u64().unwrap());
                } else {
                    assert_eq!(ours_total, theirs, "{name} layer {i}");
                }
                checked += 1;
            }
        }
        assert!(checked > 0, "{name}: no reference entries");
    }
}

mod bounds_tests {
    use crate::arch::config::bounds_test::{real, refuses_past_bound};

    #[test]
    fn sizes_past_the_bounds_are_refused_by_key() {
        for name in ["Qwen3.6-27B", "Qwen3.6-35B-A3B"] {
            let raw = real(name);
            for key in [
                "num_hidden_layers",
                "head_dim",
                "hidden_size",
                "linear_conv_kernel_dim",
                "linear_key_head_dim",
                "linear_num_value_heads",
                "full_attention_interval",
                "vocab_size",
            ] {
                refuses_past_bound(&raw, &["text_config", key]);
            }
        }
        let moe = real("Qwen3.6-35B-A3B");
        for key in [
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
        ] {
            refuses_past_bound(&moe, &["text_config", key]);
        }
    }
}
