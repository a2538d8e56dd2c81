//! llmarch's numbers against what the reference (transformers 5.23.0) builds and allocates.
//! Fixtures come from `tests/oracle/` (see its README); no Python is needed here.

mod common;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use common::reference::runnable_families;
use llmarch::arch::budget::{self, KvDtype};
use llmarch::arch::config::ParseOptions;
use llmarch::arch::{parse_config, ArchSpec, Attention};
use serde_json::Value;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(rel: &str) -> Value {
    let text = std::fs::read_to_string(root().join(rel)).expect(rel);
    serde_json::from_str(&text).expect(rel)
}

fn spec_of(config_path: &Path) -> ArchSpec {
    let raw: Value = serde_json::from_str(&std::fs::read_to_string(config_path).unwrap()).unwrap();
    parse_config(&raw, &ParseOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e:#}", config_path.display()))
}

/// Parameter counts of the ten real configs equal what the reference builds on the meta device.
#[test]
fn parameter_counts_equal_the_reference() {
    let reference = fixture("tests/fixtures/reference_params.json");
    let mut failures = vec![];
    for (folder, r) in reference.as_object().unwrap() {
        let spec = spec_of(&root().join("configs").join(folder).join("config.json"));
        let p = &spec.params;
        let ours = [
            ("total", p.total),
            ("embedding", p.embedding),
            ("ple", p.ple),
            ("lm_head", p.lm_head),
            ("routed_experts", p.routed_experts),
        ];
        for (key, value) in ours {
            let want = r[key].as_u64().unwrap();
            if value != want {
                failures.push(format!("{folder}.{key}: llmarch {value}, reference {want}"));
            }
        }
        assert_eq!(
            spec.layers.len() as u64,
            r["layers"].as_u64().unwrap(),
            "{folder}"
        );
        // Active per token: total − routed × (1 − top_k / experts), as the configs README defines.
        if let (Some(k), Some(n)) = (r["top_k"].as_f64(), r["num_experts"].as_f64()) {
            let want = r["total"].as_f64().unwrap()
                - r["routed_experts"].as_f64().unwrap() * (1.0 - k / n);
            assert!(
                (p.active as f64 - want).abs() <= 1.0,
                "{folder}: active {} vs {want}",
                p.active
            );
        } else {
            assert_eq!(p.active, p.total, "{folder}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The reference's cache tensors, mapped to what llmarch holds by the documented deliberate
/// differences, must equal llmarch's budget and llmarch's real cache for the same tiny config
/// and token count:
///
/// 1. a sliding layer keeps `window` tokens here (a ring the current token is written into before
///    attending), the reference `window − 1` after a forward (plus the current token during it);
/// 2. one tensor serves as K and V where the architecture says K=V (Gemma 4 full layers with
///    `attention_k_eq_v`, every DeepSeek V4 layer); the reference stores a second copy in Gemma 4
///    (normed differently, the norms are recomputed from the one stored tensor here) and in
///    DeepSeek V4's sliding layers (its CSA/HCA layers already alias them);
/// 3. bookkeeping scalars (the window length as a tensor) are not cache;
/// 4. a Gated DeltaNet convolution state keeps `kernel − 1` columns here (all the causal
///    convolution reads, as llama.cpp and vLLM keep it), `kernel` in the reference;
/// 5. DeepSeek V4's CSA overlap gates are f32 here, as in a bf16 checkpoint loaded by the
///    reference's `from_pretrained` (they include `position_bias`, kept in f32); the oracle casts
///    its random model with `.to(bfloat16)`, which casts them too.
///
/// Returns the reference's recorded cache for one entry of `reference_cache.json`, so mapped:
/// bytes per decoder layer.
fn mapped_reference_bytes(entry: &Value, spec: &ArchSpec) -> Vec<u64> {
    let tokens = entry["tokens"].as_u64().unwrap();
    let layers = entry["layers"].as_array().unwrap();
    assert_eq!(layers.len(), spec.layers.len(), "{}", entry["name"]);
    let mut out = vec![0u64; spec.layers.len()];
    for layer in layers {
        let i = layer["decoder_layer"].as_u64().unwrap() as usize;
        let l = &spec.layers[i];
        let mut mapped = 0u64;
        for t in layer["tensors"].as_array().unwrap() {
            let tname = t["name"].as_str().unwrap();
            if t["bookkeeping"] == true || t.get("alias_of").is_some_and(|a| !a.is_null()) {
                continue; // rule 3, and aliases already counted once
            }
            if l.k_eq_v && tname == "values" {
                continue; // rule 2
            }
            let mut bytes = t["bytes"].as_u64().unwrap();
            let window = match l.attention {
                Attention::Sliding { window }
                | Attention::Cca {
                    window: Some(window),
                }
                | Attention::Compressed { window, .. } => Some(window as u64),
                _ => None,
            };
            if let (Some(w), "keys" | "values") = (window, tname) {
                // rule 1: scale from the reference's min(N, w − 1) tokens to min(N, w).
                let theirs = tokens.min(w - 1);
                bytes = bytes / theirs * tokens.min(w);
            }
            if tname.contains("overlap_gate") && t["dtype"] == "bfloat16" {
                bytes *= 2; // rule 5
            }
            if tname == "conv_states[0]" && l.attention == Attention::Linear {
                // rule 4
                let k = t["shape"][2].as_u64().unwrap();
                bytes = bytes / k * (k - 1);
            }
            mapped += bytes;
        }
        out[i] = mapped;
    }
    out
}

fn kv_dtype(entry: &Value) -> KvDtype {
    match entry["dtype"].as_str().unwrap() {
        "float32" => KvDtype::F32,
        "bfloat16" => KvDtype::Bf16,
        other => panic!("{other}"),
    }
}

/// Every entry of `reference_cache.json`, with its spec; every runnable family has entries.
fn cache_entries() -> Vec<(Value, ArchSpec)> {
    let reference = fixture("tests/fixtures/reference_cache.json");
    let entries: Vec<(Value, ArchSpec)> = reference["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let dir = root().join(e["config_dir"].as_str().unwrap());
            (e.clone(), spec_of(&dir.join("config.json")))
        })
        .collect();
    for family in runnable_families() {
        assert!(
            entries.iter().any(|(_, s)| s.family == family.name),
            "reference_cache.json has no entry for the `{}` family (tests/oracle/measure_cache.py)",
            family.name
        );
    }
    entries
}

#[test]
fn kv_budget_equals_the_reference_cache() {
    let mut checked = 0;
    for (entry, spec) in cache_entries() {
        let name = entry["name"].as_str().unwrap();
        let tokens = entry["tokens"].as_u64().unwrap();
        let kv = kv_dtype(&entry);
        let ours = budget::compute(&spec, tokens, entry["batch"].as_u64().unwrap(), kv).unwrap();
        for (i, mapped) in mapped_reference_bytes(&entry, &spec)
            .into_iter()
            .enumerate()
        {
            assert_eq!(
                ours.layers[i].bytes, mapped,
                "{name} ({} tokens, {}) layer {i} ({}): llmarch {} B, reference mapped {} B; reference tensors: {}",
                tokens,
                kv.name(),
                spec.layers[i].attention.label(),
                ours.layers[i].bytes,
                mapped,
                entry["layers"][i]["tensors"]
            );
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} layers checked");
}

/// What llmarch's cache really holds after one forward over N tokens, layer by layer, equals the
/// reference's recorded cache for the same tiny config, N and dtype (mapped by the rules above),
/// for every entry of `reference_cache.json`. The bytes do not depend on the weights' values, so
/// each network is built with zero weights through the registry's `build`.
#[test]
fn the_cache_llmarch_holds_equals_the_reference_cache() {
    let mut checked = 0;
    for (entry, spec) in cache_entries() {
        let name = entry["name"].as_str().unwrap();
        let dir = root().join(entry["config_dir"].as_str().unwrap());
        let raw = fixture(&format!(
            "{}/config.json",
            entry["config_dir"].as_str().unwrap()
        ));
        let family = llmarch::arch::family_of(&spec).unwrap();
        let dtype = match kv_dtype(&entry) {
            KvDtype::F32 => DType::F32,
            _ => DType::BF16,
        };
        let zeros = || VarBuilder::zeros(dtype, &Device::Cpu);
        let model = (family.build.unwrap())(&raw, &ParseOptions::default(), zeros(), Some(zeros()))
            .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
        let tokens = entry["tokens"].as_u64().unwrap() as u32;
        let ids: Vec<u32> = (0..tokens).map(|i| 3 + i % 100).collect();
        let mut cache = model.new_cache();
        model.forward(&ids, &mut cache).unwrap();
        assert_eq!(cache.seen(), tokens as usize);
        let ours = cache.bytes();
        let theirs = mapped_reference_bytes(&entry, &spec);
        assert_eq!(
            ours, theirs,
            "{name} ({tokens} tokens, {}): llmarch's cache per layer vs the reference's (mapped)",
            entry["dtype"]
        );
        checked += ours.len();
    }
    assert!(checked > 100, "only {checked} layers checked");
}

/// Parameter counts of every tiny config the tests use (`tests/fixtures/tiny/*` and the model
/// fixtures) equal what the reference instantiates for them (`measure_params.py --tiny`); every
/// such config has a measured entry, and every runnable family is covered.
#[test]
fn tiny_parameter_counts_equal_the_reference() {
    let reference = fixture("tests/fixtures/reference_params_tiny.json");
    let measured = reference.as_object().unwrap();
    let mut dirs = vec![];
    for top in ["tiny", "gemma4", "laguna", "zaya", "deepseek_v4", "qwen3_5"] {
        for e in std::fs::read_dir(root().join("tests/fixtures").join(top)).unwrap() {
            let p = e.unwrap().path();
            if p.join("config.json").is_file() {
                dirs.push(format!(
                    "{top}/{}",
                    p.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }
    for d in &dirs {
        assert!(
            measured.contains_key(d),
            "{d}: not in reference_params_tiny.json (measure_params.py --tiny)"
        );
    }
    let mut failures = vec![];
    let mut families = vec![];
    for (key, r) in measured {
        let spec = spec_of(&root().join("tests/fixtures").join(key).join("config.json"));
        families.push(spec.family);
        let p = &spec.params;
        for (field, value) in [
            ("total", p.total),
            ("embedding", p.embedding),
            ("ple", p.ple),
            ("lm_head", p.lm_head),
            ("routed_experts", p.routed_experts),
        ] {
            let mut want = r[field].as_u64().unwrap();
            if field == "lm_head" {
                // llmarch counts the head's bias (ZAYA's `lm_head_bias`) with the head.
                want += r["lm_head_bias"].as_u64().unwrap();
            }
            if value != want {
                failures.push(format!("{key}.{field}: llmarch {value}, reference {want}"));
            }
        }
        assert_eq!(
            spec.layers.len() as u64,
            r["layers"].as_u64().unwrap(),
            "{key}"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for family in runnable_families() {
        assert!(
            families.contains(&family.name),
            "{}: no tiny config measured",
            family.name
        );
    }
}
