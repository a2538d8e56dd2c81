//! The loader on tiny local folders built in a tempdir: which files a model folder resolves to,
//! safetensors validation (headers that lie, dtypes we do not load, shard names that escape,
//! wrong prefixes), the `VarBuilder` the model builder reads (layouts, dtype conversion, shape
//! errors), and the tokenizer bundle with its streaming detokenizer.

use candle_core::{DType, Device, Tensor};
use llmarch::loader::generation_config::GenerationDefaults;
use llmarch::loader::model_files::{self, Layout, ModelFiles, ResolveOptions};
use llmarch::loader::tokenizer::{self, StreamDecoder};
use llmarch::loader::weights::{self, Weights};
use llmarch::loader::ModelRef;
use safetensors::Dtype;
use serde_json::json;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Helpers: folders, safetensors files (through the safetensors crate, or raw bytes by hand).

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// bf16 is the top half of an f32: exact for the values the tests use.
fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
        .collect()
}

/// A safetensors file of `(name, dtype, shape, raw bytes)` written by the safetensors crate.
fn save_raw(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

/// A safetensors file from a header written by hand and the data bytes after it.
fn handmade(header: serde_json::Value, data: &[u8]) -> Vec<u8> {
    let h = header.to_string();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out
}

fn seq(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 * 0.25 - 1.0).collect()
}

/// A tiny model folder: config, tokenizer files and one safetensors with an embedding
/// `[8, 4]`, one q_proj `[4, 4]`, a norm `[4]`, under `root` (and a vision tensor in I64 for
/// the wrapper layout, which must be skipped).
fn tiny_model(dir: &Path, root: &str, dtype: Dtype, lm_head: bool) {
    write(
        dir,
        "config.json",
        json!({"model_type": "gemma4_text"}).to_string(),
    );
    let enc = |v: &[f32]| match dtype {
        Dtype::BF16 => bf16_bytes(v),
        _ => f32_bytes(v),
    };
    let mut t = vec![
        (
            format!("{root}embed_tokens.weight"),
            dtype,
            vec![8, 4],
            enc(&seq(32)),
        ),
        (
            format!("{root}layers.0.self_attn.q_proj.weight"),
            dtype,
            vec![4, 4],
            enc(&seq(16)),
        ),
        (format!("{root}norm.weight"), dtype, vec![4], enc(&seq(4))),
    ];
    if root == Layout::WRAPPER.root {
        t.push((
            "model.vision_tower.patch.weight".into(),
            Dtype::I64,
            vec![2],
            vec![0; 16],
        ));
    }
    if lm_head {
        t.push(("lm_head.weight".into(), dtype, vec![8, 4], enc(&seq(32))));
    }
    let refs: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = t
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
        .collect();
    save_raw(&dir.join("model.safetensors"), &refs);
}

fn resolve_dir(dir: &Path) -> anyhow::Result<ModelFiles> {
    model_files::resolve(
        &ModelRef::Local(dir.to_path_buf()),
        &ResolveOptions::default(),
    )
}

fn open_one(path: &Path) -> anyhow::Result<Weights> {
    Weights::open(&[path.to_path_buf()], None, DType::F32, &Device::Cpu)
}

fn err_of<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

// ---------------------------------------------------------------------------------------------
// Which files a folder resolves to.

#[test]
fn a_folder_resolves_to_its_files_and_only_hf_safetensors() {
    let d = tempfile::tempdir().unwrap();
    tiny_model(d.path(), "model.", Dtype::F32, false);
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
        "consolidated.safetensors",
        "model.gguf",
        "pytorch_model.bin",
    ] {
        write(d.path(), f, "{}");
    }
    let files = resolve_dir(d.path()).unwrap();
    assert_eq!(files.config, d.path().join("config.json"));
    assert_eq!(files.tokenizer, Some(d.path().join("tokenizer.json")));
    assert_eq!(
        files.tokenizer_config,
        Some(d.path().join("tokenizer_config.json"))
    );
    assert_eq!(
        files.generation_config,
        Some(d.path().join("generation_config.json"))
    );
    assert_eq!(
        files.chat_template,
        Some(d.path().join("chat_template.jinja"))
    );
    assert_eq!(files.weights, vec![d.path().join("model.safetensors")]);
    assert!(files.index.is_none());

    // The optional files are optional.
    let d = tempfile::tempdir().unwrap();
    tiny_model(d.path(), "model.", Dtype::F32, false);
    let files = resolve_dir(d.path()).unwrap();
    assert!(files.tokenizer.is_none() && files.chat_template.is_none());
    // Without tokenizer.json the bundle loads (raw ids still run); text in or out fails.
    let tok = tokenizer::load(&files).unwrap();
    let e = format!("{:#}", tok.encode("hi", true).unwrap_err());
    assert!(
        e.contains("has no tokenizer.json") && e.contains("--prompt-ids"),
        "{e}"
    );
    assert_eq!(tok.vocab_size(), None);
}

#[test]
fn a_folder_without_hf_weights_says_what_it_has() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "config.json", "{}");
    write(d.path(), "consolidated.safetensors", "x");
    write(d.path(), "model-q4.gguf", "x");
    let e = err_of(resolve_dir(d.path()));
    assert!(
        e.contains("has no model.safetensors or model.safetensors.index.json"),
        "{e}"
    );
    assert!(
        e.contains("consolidated.safetensors") && e.contains("model-q4.gguf"),
        "{e}"
    );

    let d = tempfile::tempdir().unwrap();
    write(d.path(), "model.safetensors", "x");
    let e = err_of(resolve_dir(d.path()));
    assert!(e.contains("has no config.json"), "{e}");
}

/// A wrapper checkpoint sharded in three: text layers, vision tower only, text + head.
fn sharded_wrapper(dir: &Path) {
    write(dir, "config.json", "{}");
    let lm = "model.language_model.";
    save_raw(
        &dir.join("model-00001-of-00003.safetensors"),
        &[
            (
                &format!("{lm}embed_tokens.weight"),
                Dtype::BF16,
                vec![8, 4],
                bf16_bytes(&seq(32)),
            ),
            (
                &format!("{lm}layers.0.self_attn.q_proj.weight"),
                Dtype::F32,
                vec![4, 4],
                f32_bytes(&seq(16)),
            ),
        ],
    );
    save_raw(
        &dir.join("model-00002-of-00003.safetensors"),
        &[(
            "model.vision_tower.patch.weight",
            Dtype::F32,
            vec![2, 2],
            f32_bytes(&seq(4)),
        )],
    );
    save_raw(
        &dir.join("model-00003-of-00003.safetensors"),
        &[
            (
                &format!("{lm}norm.weight"),
                Dtype::F16,
                vec![4],
                vec![0, 60, 0, 56, 0, 0, 0, 188],
            ),
            ("model.audio_tower.x", Dtype::I64, vec![1], vec![0; 8]),
        ],
    );
    let index = json!({
        "metadata": {"total_size": 0},
        "weight_map": {
            format!("{lm}embed_tokens.weight"): "model-00001-of-00003.safetensors",
            format!("{lm}layers.0.self_attn.q_proj.weight"): "model-00001-of-00003.safetensors",
            "model.vision_tower.patch.weight": "model-00002-of-00003.safetensors",
            format!("{lm}norm.weight"): "model-00003-of-00003.safetensors",
            "model.audio_tower.x": "model-00003-of-00003.safetensors",
        }
    });
    write(dir, "model.safetensors.index.json", index.to_string());
}

#[test]
fn a_sharded_wrapper_loads_only_the_text_shards_in_mixed_dtypes() {
    let d = tempfile::tempdir().unwrap();
    sharded_wrapper(d.path());
    let files = resolve_dir(d.path()).unwrap();
    let names: Vec<_> = files
        .weights
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "model-00001-of-00003.safetensors",
            "model-00003-of-00003.safetensors"
        ]
    );
    assert_eq!(
        files.index,
        Some(d.path().join("model.safetensors.index.json"))
    );

    // bf16, f32 and f16 files all arrive in the chosen dtype, from the text root.
    let w = weights::load(&files, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(w.layout(), Layout::WRAPPER);
    let vb = w.text_vb();
    let emb = vb.get((8, 4), "embed_tokens.weight").unwrap();
    assert_eq!(emb.dtype(), DType::F32);
    assert_eq!(
        emb.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        seq(32)
    );
    let norm = vb.get(4, "norm.weight").unwrap();
    // f16 bytes 0x3c00 = 1.0, 0x3800 = 0.5, 0 = 0, 0xbc00 = -1.0.
    assert_eq!(norm.to_vec1::<f32>().unwrap(), [1.0, 0.5, 0.0, -1.0]);
    // No head in the checkpoint: tied.
    assert!(w.lm_head_vb().is_none());
    // Vision and audio tensors are not part of the text model.
    assert!(w
        .tensors()
        .all(|(n, _)| n.starts_with("model.language_model.")));
    assert_eq!(w.tensors().count(), 3);
    assert_eq!(w.loaded_bytes(), (32 + 4) * 4);
    assert_eq!(
        w.unused(),
        ["model.language_model.layers.0.self_attn.q_proj.weight"]
    );
    assert_eq!(w.text_bytes(), (32 + 16 + 4) * 4);

    // The same into bf16: loaded bytes halve.
    let w = weights::load(&files, DType::BF16, &Device::Cpu).unwrap();
    let q = w.text_vb().pp("layers").pp(0).pp("self_attn");
    let t = q.get((4, 4), "q_proj.weight").unwrap();
    assert_eq!(t.dtype(), DType::BF16);
    let back = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    assert_eq!(back.to_vec1::<f32>().unwrap(), seq(16));
    assert_eq!(w.loaded_bytes(), 16 * 2);
}

#[test]
fn both_layouts_and_the_lm_head() {
    for (root, layout) in [
        ("model.", Layout::CAUSAL_LM),
        ("model.language_model.", Layout::WRAPPER),
    ] {
        for head in [false, true] {
            let d = tempfile::tempdir().unwrap();
            tiny_model(d.path(), root, Dtype::F32, head);
            let files = resolve_dir(d.path()).unwrap();
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let w = weights::load(&files, dtype, &Device::Cpu).unwrap();
                assert_eq!(w.layout(), layout);
                let emb = w.text_vb().get((8, 4), "embed_tokens.weight").unwrap();
                assert_eq!(emb.dtype(), dtype);
                let emb = emb.to_dtype(DType::F32).unwrap();
                assert_eq!(
                    emb.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    seq(32)
                );
                assert!(w.has_text_tensor("norm.weight"));
                match w.lm_head(8, 4).unwrap() {
                    Some(h) => {
                        assert!(head, "{root}: a head appeared from nowhere");
                        assert_eq!(h.dims(), [8, 4]);
                    }
                    None => assert!(!head, "{root}: the checkpoint's lm_head was missed"),
                }
            }
        }
    }
}

#[test]
fn transformers_4_wrapper_layout() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "config.json", "{}");
    save_raw(
        &d.path().join("model.safetensors"),
        &[
            (
                "language_model.model.embed_tokens.weight",
                Dtype::F32,
                vec![2, 2],
                f32_bytes(&seq(4)),
            ),
            (
                "language_model.lm_head.weight",
                Dtype::F32,
                vec![2, 2],
                f32_bytes(&seq(4)),
            ),
            ("vision_tower.x", Dtype::F32, vec![1], f32_bytes(&[1.0])),
        ],
    );
    let w = weights::load(&resolve_dir(d.path()).unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(w.layout(), Layout::WRAPPER_V4);
    w.text_vb().get((2, 2), "embed_tokens.weight").unwrap();
    assert!(w.lm_head(2, 2).unwrap().is_some());
}

#[test]
fn shape_and_name_errors_name_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    tiny_model(d.path(), "model.", Dtype::F32, false);
    let w = weights::load(&resolve_dir(d.path()).unwrap(), DType::F32, &Device::Cpu).unwrap();
    let vb = w.text_vb();
    let e = vb
        .pp("layers.0.self_attn")
        .get((4, 8), "q_proj.weight")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tensor model.layers.0.self_attn.q_proj.weight has shape [4, 4] but the model needs [4, 8]"),
        "{e}"
    );
    assert!(e.contains("model.safetensors"), "{e}");
    let e = vb
        .get((4, 4), "layers.1.self_attn.q_proj.weight")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tensor model.layers.1.self_attn.q_proj.weight is missing from"),
        "{e}"
    );
    // Names outside the text root: a hint where the text tensors are.
    let e = w.root_vb().get(4, "norm.weight").unwrap_err().to_string();
    assert!(e.contains("under `model.`"), "{e}");
    // The loaded-bytes count only moved for nothing: no tensor was handed out.
    assert_eq!(w.loaded_bytes(), 0);
}

#[test]
fn a_checkpoint_with_foreign_names_is_refused() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "config.json", "{}");
    save_raw(
        &d.path().join("model.safetensors"),
        &[(
            "transformer.h.0.attn.c_attn.weight",
            Dtype::F32,
            vec![2],
            f32_bytes(&[1.0, 2.0]),
        )],
    );
    let e = err_of(weights::load(
        &resolve_dir(d.path()).unwrap(),
        DType::F32,
        &Device::Cpu,
    ));
    assert!(e.contains("no tensor under `model.language_model.`"), "{e}");

    // A wrapper whose text part is absent (vision only) holds nothing to run.
    save_raw(
        &d.path().join("model.safetensors"),
        &[(
            "model.vision_tower.x",
            Dtype::F32,
            vec![2],
            f32_bytes(&[1.0, 2.0]),
        )],
    );
    // `model.` matches, but the only tensor is a vision one... which is under `model.`: a
    // bare CausalLM layout. What matters: nothing breaks and it is visible as a tensor name.
    let w = weights::load(&resolve_dir(d.path()).unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(w.layout(), Layout::CAUSAL_LM);
}

#[test]
fn dtypes_we_do_not_load_are_refused_by_name() {
    // `None`: opening fails with the message; `Some`: opening works, reading it as a weight fails.
    for (dtype, bytes, needle) in [
        (
            Dtype::F64,
            8,
            "has dtype F64; llmarch loads F32, BF16 and F16",
        ),
        (Dtype::F8_E4M3, 1, "is quantized (Fp8E4m3) but its scales"),
        (Dtype::U8, 1, "is quantized (Fp4Packed) but its scales"),
        (Dtype::I64, 8, "holds integers (I64)"),
    ] {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "config.json", "{}");
        save_raw(
            &d.path().join("model.safetensors"),
            &[
                (
                    "model.embed_tokens.weight",
                    Dtype::F32,
                    vec![2],
                    f32_bytes(&[1.0, 2.0]),
                ),
                (
                    "model.layers.0.mlp.up_proj.weight",
                    dtype,
                    vec![4],
                    vec![0; 4 * bytes],
                ),
            ],
        );
        let w = weights::load(&resolve_dir(d.path()).unwrap(), DType::F32, &Device::Cpu);
        let e = match w {
            Err(e) => format!("{e:#}"),
            // Integer tables (DeepSeek's `tid2eid`) are indexed, but are not float weights.
            Ok(w) => {
                assert_eq!(dtype, Dtype::I64);
                let r = w.text_vb().get(4, "layers.0.mlp.up_proj.weight");
                format!("{:#}", r.unwrap_err())
            }
        };
        assert!(
            e.contains("model.layers.0.mlp.up_proj.weight") && e.contains(needle),
            "{dtype:?}: {e}"
        );
    }
    // And the compute dtype must be a float we run in.
    let d = tempfile::tempdir().unwrap();
    tiny_model(d.path(), "model.", Dtype::F32, false);
    let files = resolve_dir(d.path()).unwrap();
    let e = err_of(weights::load(&files, DType::U32, &Device::Cpu));
    assert!(e.contains("cannot load weights as U32"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Headers that lie.

#[test]
fn headers_that_lie_are_refused_with_the_file_and_tensor() {
    let d = tempfile::tempdir().unwrap();
    let data = f32_bytes(&seq(4)); // 16 bytes
    let t = |dtype: &str, shape: serde_json::Value, a: u64, b: u64| json!({"dtype": dtype, "shape": shape, "data_offsets": [a, b]});
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "past the end",
            handmade(json!({"model.a": t("F32", json!([8]), 0, 32)}), &data),
            vec![
                "tensor model.a",
                "data_offsets [0, 32] pass the end of the data (16 bytes)",
            ],
        ),
        (
            "size mismatch",
            handmade(json!({"model.a": t("F32", json!([2, 3]), 0, 16)}), &data),
            vec![
                "tensor model.a",
                "F32 [2, 3] needs 24 bytes but data_offsets [0, 16] hold 16",
            ],
        ),
        (
            "overlap",
            handmade(
                json!({"model.a": t("F32", json!([2]), 0, 8), "model.b": t("F32", json!([2]), 4, 12)}),
                &data,
            ),
            vec!["tensor model.b starts at byte 4", "overlaps"],
        ),
        (
            "hole",
            handmade(
                json!({"model.a": t("F32", json!([2]), 0, 8), "model.b": t("F32", json!([1]), 12, 16)}),
                &data,
            ),
            vec!["tensor model.b starts at byte 12", "leaves a hole"],
        ),
        (
            "trailing bytes",
            handmade(json!({"model.a": t("F32", json!([2]), 0, 8)}), &data),
            vec![
                "accounts for 8 data bytes but the file holds 16",
                "trailing bytes",
            ],
        ),
        (
            "backwards",
            handmade(json!({"model.a": t("F32", json!([0]), 8, 4)}), &data),
            vec!["tensor model.a", "run backwards"],
        ),
        (
            "overflowing shape",
            handmade(
                json!({"model.a": t("F32", json!([u64::MAX / 2, 4]), 0, 16)}),
                &data,
            ),
            vec!["tensor model.a", "overflows"],
        ),
        (
            "unknown dtype",
            handmade(json!({"model.a": t("Q4_K", json!([4]), 0, 16)}), &data),
            vec!["tensor model.a", "unknown dtype Q4_K"],
        ),
        (
            "negative dimension",
            handmade(json!({"model.a": t("F32", json!([-4]), 0, 16)}), &data),
            vec!["tensor model.a", "not a non-negative integer"],
        ),
        (
            "header longer than the file",
            {
                let mut b = handmade(json!({"model.a": t("F32", json!([4]), 0, 16)}), &data);
                b[..8].copy_from_slice(&10_000u64.to_le_bytes());
                b
            },
            vec!["header claims 10000 bytes but the file has only"],
        ),
        (
            "absurd header length",
            {
                let mut b = handmade(json!({}), &[]);
                b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                b
            },
            vec!["the header claims 18446744073709551615 bytes"],
        ),
        (
            "not JSON",
            {
                let mut b = 5u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"{oops");
                b
            },
            vec!["the header is not a JSON object"],
        ),
        (
            "too short",
            vec![1, 2, 3],
            vec!["too short for a safetensors file"],
        ),
    ];
    for (what, bytes, needles) in cases {
        let p = write(d.path(), "model.safetensors", &bytes);
        let e = err_of(open_one(&p));
        assert!(e.contains("model.safetensors"), "{what}: {e}");
        for n in needles {
            assert!(e.contains(n), "{what}: `{n}` not in: {e}");
        }
    }
}

#[test]
fn a_truncated_shard_is_refused() {
    let d = tempfile::tempdir().unwrap();
    tiny_model(d.path(), "model.", Dtype::F32, false);
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.truncate(bytes.len() - 5);
    std::fs::write(&p, &bytes).unwrap();
    let e = err_of(open_one(&p));
    assert!(e.contains("model.safetensors"), "{e}");
    assert!(e.contains("truncated"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Index files that point outside the snapshot, or disagree with the shards.

#[test]
fn index_shard_names_must_be_plain_file_names() {
    let d = tempfile::tempdir().unwrap();
    let outside = d.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let model = d.path().join("m");
    std::fs::create_dir(&model).unwrap();
    // A valid safetensors file just outside the model folder: it must never be opened.
    save_raw(
        &outside.join("x.safetensors"),
        &[(
            "model.embed_tokens.weight",
            Dtype::F32,
            vec![1],
            f32_bytes(&[1.0]),
        )],
    );
    write(&model, "config.json", "{}");
    let abs = outside.join("x.safetensors").display().to_string();
    for (name, why) in [
        ("../outside/x.safetensors", "is a path"),
        ("../../x.safetensors", "is a path"),
        (abs.as_str(), "is a path"),
        ("sub\\x.safetensors", "is a path"),
        ("..", "points outside"),
        ("..x.safetensors", "points outside"),
        ("", "is empty"),
        ("c:x.safetensors", "drive separator"),
        ("model.bin", "not a .safetensors file"),
    ] {
        let index = json!({"weight_map": {"model.embed_tokens.weight": name}});
        write(&model, "model.safetensors.index.json", index.to_string());
        let e = err_of(resolve_dir(&model));
        assert!(
            e.contains("refusing to read outside the model folder"),
            "{name}: {e}"
        );
        assert!(e.contains(why), "{name}: {e}");
        // Straight to the weights loader with the index: refused there too.
        let e = err_of(Weights::open(
            &[model.join(name)],
            Some(&model.join("model.safetensors.index.json")),
            DType::F32,
            &Device::Cpu,
        ));
        assert!(
            e.contains("refusing") || e.contains("opening"),
            "{name}: {e}"
        );
    }
    // A vision-only entry is untrusted too: the whole index is refused.
    let index = json!({"weight_map": {
        "model.language_model.norm.weight": "model.safetensors",
        "model.vision_tower.x": "../x.safetensors"}});
    write(&model, "model.safetensors.index.json", index.to_string());
    assert!(err_of(resolve_dir(&model)).contains("`../x.safetensors`"));
}

#[test]
fn index_and_shards_must_agree() {
    let d = tempfile::tempdir().unwrap();
    sharded_wrapper(d.path());
    let files = resolve_dir(d.path()).unwrap();
    // The index moves the norm to shard 1, which does not hold it.
    let index_path = files.index.clone().unwrap();
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["weight_map"]["model.language_model.norm.weight"] =
        json!("model-00001-of-00003.safetensors");
    std::fs::write(&index_path, index.to_string()).unwrap();
    let e = err_of(weights::load(&files, DType::F32, &Device::Cpu));
    assert!(
        e.contains("puts tensor model.language_model.norm.weight in model-00001-of-00003.safetensors, but model-00003-of-00003.safetensors holds it"),
        "{e}"
    );
    // A tensor the index lists that no shard holds.
    index["weight_map"]["model.language_model.norm.weight"] =
        json!("model-00003-of-00003.safetensors");
    index["weight_map"]["model.language_model.extra.weight"] =
        json!("model-00003-of-00003.safetensors");
    std::fs::write(&index_path, index.to_string()).unwrap();
    let e = err_of(weights::load(&files, DType::F32, &Device::Cpu));
    assert!(
        e.contains("lists tensor model.language_model.extra.weight"),
        "{e}"
    );

    // The same tensor in two shards.
    let dup = d.path().join("dup.safetensors");
    save_raw(
        &dup,
        &[(
            "model.language_model.norm.weight",
            Dtype::F32,
            vec![4],
            f32_bytes(&seq(4)),
        )],
    );
    let e = err_of(Weights::open(
        &[files.weights[1].clone(), dup],
        None,
        DType::F32,
        &Device::Cpu,
    ));
    assert!(
        e.contains("tensor model.language_model.norm.weight is in both"),
        "{e}"
    );
    // An index shard missing from the folder.
    std::fs::remove_file(d.path().join("model-00003-of-00003.safetensors")).unwrap();
    let e = err_of(resolve_dir(d.path()));
    assert!(
        e.contains("names shard model-00003-of-00003.safetensors"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Tokenizer bundle and streaming detokenization.

/// A tiny SentencePiece-style tokenizer (BPE with byte fallback, `▁` for spaces), built as
/// `tokenizer.json` the way the `tokenizers` library writes it.
fn tiny_tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<pad>", "<eos>", "<bos>", "<end_of_turn>"]
        .iter()
        .enumerate()
    {
        vocab.insert(t.to_string(), json!(i));
    }
    for b in 0..=255u32 {
        vocab.insert(format!("<0x{b:02X}>"), json!(4 + b));
    }
    let pieces = [
        "▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello", "▁w", "▁wor", "or",
    ];
    for (i, p) in pieces.iter().enumerate() {
        vocab.insert(p.to_string(), json!(260 + i));
    }
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<pad>"), special(1, "<eos>"), special(2, "<bos>"), special(3, "<end_of_turn>")],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"}
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab,
            "merges": [["h", "e"], ["l", "l"], ["he", "ll"], ["hell", "o"], ["▁", "w"], ["o", "r"], ["▁w", "or"]]
        }
    })
}

/// The tokenizer.json files the oracle committed, when present.
fn fixture_tokenizers() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4");
    let mut out = vec![];
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            let p = e.path().join("tokenizer.json");
            if p.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn tiny_tokenizer_folder(dir: &Path) -> ModelFiles {
    tiny_model(dir, "model.", Dtype::F32, false);
    write(dir, "tokenizer.json", tiny_tokenizer_json().to_string());
    resolve_dir(dir).unwrap()
}

/// Feed ids one at a time; return the pieces, checking none carries a broken character.
fn stream(dec: &mut StreamDecoder, ids: &[u32]) -> Vec<String> {
    stream_checked(dec, ids, true)
}

/// The same; `strict: false` for ids whose bytes are invalid UTF-8 anyway (random output).
fn stream_checked(dec: &mut StreamDecoder, ids: &[u32], strict: bool) -> Vec<String> {
    let mut pieces = vec![];
    for &id in ids {
        if let Some(p) = dec.push(id).unwrap() {
            assert!(
                !strict || !p.contains('\u{FFFD}'),
                "a broken character was emitted: {p:?}"
            );
            pieces.push(p);
        }
    }
    if let Some(p) = dec.finish().unwrap() {
        pieces.push(p);
    }
    pieces
}

#[test]
fn streaming_detokenization_never_splits_a_character() {
    let d = tempfile::tempdir().unwrap();
    let files = tiny_tokenizer_folder(d.path());
    let bundle = tokenizer::load(&files).unwrap();
    let text = "hello wor€d é 🦀 hello";
    let ids = bundle.encode(text, false).unwrap();
    // The multi-byte characters are not in the vocabulary: they go through byte fallback.
    let byte_tokens = ids.iter().filter(|&&i| (4..260).contains(&i)).count();
    assert_eq!(byte_tokens, 3 + 2 + 4, "{ids:?}");
    assert_eq!(bundle.decode(&ids, true).unwrap(), text);
    let mut dec = bundle.stream_decoder();
    let pieces = stream(&mut dec, &ids);
    assert_eq!(pieces.concat(), text);
    assert!(pieces.iter().any(|p| p == "€"), "{pieces:?}");
    assert!(pieces.iter().any(|p| p == "🦀"), "{pieces:?}");

    // Mid-character, nothing comes out; the last byte releases the whole character.
    let euro = bundle.encode("€", false).unwrap();
    assert_eq!(euro.len(), 3);
    let mut dec = bundle.stream_decoder();
    assert_eq!(dec.push(euro[0]).unwrap(), None);
    assert_eq!(dec.push(euro[1]).unwrap(), None);
    assert_eq!(dec.push(euro[2]).unwrap().as_deref(), Some("€"));

    // A sequence that never completes is flushed at the end, as U+FFFD.
    let mut dec = bundle.stream_decoder();
    assert_eq!(dec.push(euro[0]).unwrap(), None);
    assert_eq!(dec.finish().unwrap().as_deref(), Some("\u{FFFD}"));

    // Special tokens are skipped in the stream.
    let mut dec = bundle.stream_decoder();
    let mut ids = vec![2];
    ids.extend(bundle.encode("hello", false).unwrap());
    ids.push(1);
    assert_eq!(stream(&mut dec, &ids).concat(), "hello");

    // The oracle's real tokenizers, when committed.
    for path in fixture_tokenizers() {
        let tok = tokenizer::load_tokenizer(&path).unwrap();
        let text = "Hello, wörld! 日本語のテキスト — ∑ 🦀🦀 ok";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let whole = tok.decode(&ids, true).unwrap();
        let mut dec = StreamDecoder::new(Some(&tok), true);
        let streamed = stream(&mut dec, &ids).concat();
        assert_eq!(streamed, whole, "{}", path.display());
    }
}

#[test]
fn the_bundle_reads_special_tokens_stop_ids_template_and_defaults() {
    let d = tempfile::tempdir().unwrap();
    let files = tiny_tokenizer_folder(d.path());

    // Nothing but tokenizer.json and a config without ids: no stop ids, no template.
    let b = tokenizer::load(&files).unwrap();
    assert_eq!(b.eos_ids, Vec::<u32>::new());
    assert_eq!(b.chat_template, None);
    assert_eq!(b.generation, GenerationDefaults::default());
    assert_eq!(
        b.encode("hello", true).unwrap(),
        b.encode("hello", false).unwrap()
    );

    // config.json's ids (here under text_config, as a wrapper writes them).
    write(
        d.path(),
        "config.json",
        json!({"model_type": "gemma4", "text_config": {"eos_token_id": 1, "bos_token_id": 2}})
            .to_string(),
    );
    let b = tokenizer::load(&files).unwrap();
    assert_eq!(
        (b.eos_ids.clone(), b.eos_source.as_str()),
        (vec![1], "config.json")
    );
    assert_eq!(b.bos_id, Some(2));

    // tokenizer_config.json: AddedToken objects and strings, add_bos_token, a template list.
    write(
        d.path(),
        "tokenizer_config.json",
        json!({
            "bos_token": {"content": "<bos>", "special": true},
            "eos_token": "<end_of_turn>",
            "pad_token": "<pad>",
            "add_bos_token": true,
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}]
        })
        .to_string(),
    );
    let files = resolve_dir(d.path()).unwrap();
    let b = tokenizer::load(&files).unwrap();
    assert_eq!(b.bos_id, Some(2));
    assert_eq!(b.pad_id, Some(0));
    assert!(b.add_bos);
    // config.json still names eos before tokenizer_config.json does.
    assert_eq!(b.eos_ids, [1]);
    assert_eq!(b.chat_template.as_deref(), Some("{{ bos_token }}D"));
    let with = b.encode("hello", true).unwrap();
    assert_eq!(with[0], 2);
    assert_eq!(&with[1..], b.encode("hello", false).unwrap());

    // generation_config.json wins for stop ids and brings the sampling defaults.
    write(
        d.path(),
        "generation_config.json",
        json!({"eos_token_id": [1, 3], "do_sample": true, "temperature": 0.7, "top_k": 64,
               "top_p": 0.95, "min_p": null, "repetition_penalty": 1.1, "max_new_tokens": 99,
               "cache_implementation": "hybrid", "transformers_version": "5.23.0"})
        .to_string(),
    );
    // chat_template.jinja wins over tokenizer_config.json.
    write(d.path(), "chat_template.jinja", "J");
    let files = resolve_dir(d.path()).unwrap();
    let b = tokenizer::load(&files).unwrap();
    assert_eq!(
        (b.eos_ids.clone(), b.eos_source.as_str()),
        (vec![1, 3], "generation_config.json")
    );
    assert!(b.is_eos(3) && !b.is_eos(2));
    assert_eq!(b.chat_template.as_deref(), Some("J"));
    let g = &b.generation;
    assert_eq!(g.temperature, Some(0.7));
    assert_eq!(g.top_k, Some(64));
    assert_eq!(g.top_p, Some(0.95));
    assert_eq!(g.min_p, None);
    assert_eq!(g.repetition_penalty, Some(1.1));
    assert_eq!(g.max_new_tokens, Some(99));
    assert!(!g.greedy());

    // Without the config's ids, tokenizer_config.json's eos_token answers.
    write(
        d.path(),
        "config.json",
        json!({"model_type": "gemma4_text"}).to_string(),
    );
    std::fs::remove_file(d.path().join("generation_config.json")).unwrap();
    let files = resolve_dir(d.path()).unwrap();
    let b = tokenizer::load(&files).unwrap();
    assert_eq!(
        (b.eos_ids.clone(), b.eos_source.as_str()),
        (vec![3], "tokenizer_config.json")
    );
    assert!(b.generation.greedy());

    // A special token that is not in the vocabulary is an error naming it.
    write(
        d.path(),
        "tokenizer_config.json",
        json!({"eos_token": "<nope>"}).to_string(),
    );
    let e = err_of(tokenizer::load(&files));
    assert!(
        e.contains("eos_token `<nope>` is not in the vocabulary"),
        "{e}"
    );
    // A broken tokenizer.json names the file.
    write(d.path(), "tokenizer.json", "{\"model\": 3}");
    let e = err_of(tokenizer::load(&files));
    assert!(
        e.contains("cannot load") && e.contains("tokenizer.json"),
        "{e}"
    );
}

#[test]
fn generation_config_errors_name_the_key() {
    let g = GenerationDefaults::from_json(&json!({"eos_token_id": 7})).unwrap();
    assert_eq!(g.eos_token_ids, [7]);
    assert!(g.greedy());
    for (raw, needle) in [
        (json!({"temperature": "hot"}), "key `temperature`"),
        (json!({"eos_token_id": [1, "x"]}), "key `eos_token_id`"),
        (json!({"temperature": -1.0}), "key `temperature` is -1"),
        (json!({"top_p": 0.0}), "key `top_p` is 0"),
        (json!({"min_p": 2.0}), "key `min_p` is 2"),
        (
            json!({"repetition_penalty": 0.0}),
            "key `repetition_penalty` is 0",
        ),
        (json!({"top_k": -3}), "key `top_k`"),
    ] {
        let e = format!("{:#}", GenerationDefaults::from_json(&raw).unwrap_err());
        assert!(e.contains(needle), "{raw}: {e}");
    }
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "generation_config.json",
        json!({"top_k": "many"}).to_string(),
    );
    let e = format!("{:#}", GenerationDefaults::read(&p).unwrap_err());
    assert!(
        e.contains("generation_config.json") && e.contains("key `top_k`"),
        "{e}"
    );
}

#[test]
fn tensors_load_through_the_public_api_with_candle_ops() {
    // The VarBuilder hands out ordinary tensors the model can compute with.
    let d = tempfile::tempdir().unwrap();
    tiny_model(d.path(), "model.", Dtype::BF16, true);
    let files = resolve_dir(d.path()).unwrap();
    let w = weights::load(&files, DType::F32, &Device::Cpu).unwrap();
    let emb = candle_nn::Embedding::new(w.text_vb().get((8, 4), "embed_tokens.weight").unwrap(), 4);
    use candle_core::Module;
    let x = emb
        .forward(&Tensor::new(&[3u32], &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(x.to_vec2::<f32>().unwrap(), [seq(32)[12..16].to_vec()]);
    let head = candle_nn::linear_no_bias(4, 8, w.lm_head_vb().unwrap()).unwrap();
    assert_eq!(head.forward(&x).unwrap().dims(), [1, 8]);
}

// ---------------------------------------------------------------------------------------------
// Resident memory: loading holds one copy of the weights, not the copy plus the mapped file.

/// A number from `/proc/self/status`, in bytes.
#[cfg(target_os = "linux")]
fn proc_status(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Runs in a child process of its own (other tests allocate in parallel threads): loads 32 MB
/// of f32 weights and prints how much the resident set grew.
#[cfg(target_os = "linux")]
#[test]
fn memory_probe_child() {
    if std::env::var_os("LLMARCH_MEMORY_PROBE").is_none() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let n = 1024 * 1024; // 4 MB per tensor
                         // Written in small chunks: no large allocation may warm the allocator before measuring.
    let mut header = serde_json::Map::new();
    for i in 0..8 {
        let at = (i * n * 4) as u64;
        header.insert(
            format!("model.layers.{i}.w"),
            json!({"dtype": "F32", "shape": [n], "data_offsets": [at, at + (n * 4) as u64]}),
        );
    }
    let p = d.path().join("model.safetensors");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&p).unwrap());
        let h = serde_json::Value::Object(header).to_string();
        f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
        f.write_all(h.as_bytes()).unwrap();
        for i in 0..8 * n {
            f.write_all(&(i as f32).to_le_bytes()).unwrap();
        }
    }
    let base = proc_status("VmRSS:");
    let w = open_one(&p).unwrap();
    let vb = w.text_vb();
    let held: Vec<Tensor> = (0..8)
        .map(|i| vb.get(n, &format!("layers.{i}.w")).unwrap())
        .collect();
    let grew = proc_status("VmRSS:").saturating_sub(base);
    println!("PROBE loaded={} grew={grew}", w.loaded_bytes());
    drop(held);
}

#[cfg(target_os = "linux")]
#[test]
fn loading_keeps_one_copy_of_the_weights_resident() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "memory_probe_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LLMARCH_MEMORY_PROBE", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.split_once("PROBE ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no probe output: {text}"));
    let nums: Vec<f64> = line
        .split_whitespace()
        .map(|kv| kv.split_once('=').unwrap().1.parse().unwrap())
        .collect();
    let (loaded, grew) = (nums[0], nums[1]);
    assert_eq!(loaded, 32.0 * 1024.0 * 1024.0);
    // The mapped pages are released as each tensor is copied: without that, growth is 2x.
    assert!(
        grew <= 1.3 * loaded,
        "resident set grew {grew} bytes for {loaded} loaded"
    );
}

// ---------------------------------------------------------------------------------------------
// The oracle's checkpoints (tests/oracle/gemma4_fixtures.py) through the whole loader.

#[test]
fn oracle_fixtures_load_and_tokenize_like_the_reference() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4");
    let entries = std::fs::read_dir(&root).unwrap_or_else(|e| panic!("{}: {e}", root.display()));
    let mut checked = 0;
    for dir in entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
        let reference = std::fs::read(dir.join("reference.json"))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join("reference.json").display()));
        checked += 1;
        let reference: serde_json::Value = serde_json::from_slice(&reference).unwrap();
        let what = dir.display().to_string();
        let files = resolve_dir(&dir).unwrap();
        // The weight files the reference saved, and only those the text model needs.
        let names: Vec<String> = files
            .weights
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let saved: Vec<String> = serde_json::from_value(reference["weight_files"].clone()).unwrap();
        assert!(names.iter().all(|n| saved.contains(n)), "{what}: {names:?}");
        // Every text tensor loads, finite, in f32.
        let w = weights::load(&files, DType::F32, &Device::Cpu).unwrap();
        let is_wrapper = reference["class"] == "Gemma4ForConditionalGeneration";
        assert_eq!(
            w.layout(),
            if is_wrapper {
                Layout::WRAPPER
            } else {
                Layout::CAUSAL_LM
            },
            "{what}"
        );
        let vb = w.root_vb();
        let names: Vec<String> = w.tensors().map(|(n, _)| n.to_string()).collect();
        for n in &names {
            let t = vb.get_unchecked(n).unwrap();
            let sum = t
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(sum.is_finite(), "{what}: {n}");
        }
        assert_eq!(w.loaded_bytes(), w.text_bytes(), "{what}");
        // The tokenizer: the reference's prompt ids and stop ids.
        let b = tokenizer::load(&files).unwrap();
        let text = reference["prompt_text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(reference["prompt_ids"].clone()).unwrap();
        assert_eq!(b.encode(text, true).unwrap(), ids, "{what}");
        let eos: Vec<u32> = serde_json::from_value(reference["eos_ids"].clone()).unwrap();
        assert_eq!(b.eos_ids, eos, "{what}");
        // Streaming the prompt gives back its text exactly (BOS is special: skipped).
        let mut dec = b.stream_decoder();
        assert_eq!(stream(&mut dec, &ids).concat(), text, "{what}");
        // A random model's output need not be valid UTF-8: the stream equals the whole decode
        // when that is valid; otherwise the one-shot decode turns a whole run of byte tokens
        // into U+FFFD while the stream keeps the characters that were already complete.
        let generated: Vec<u32> =
            serde_json::from_value(reference["generated_ids"].clone()).unwrap();
        let whole = b.decode(&generated, true).unwrap();
        let mut dec = b.stream_decoder();
        let streamed = stream_checked(&mut dec, &generated, false).concat();
        if !whole.contains('\u{FFFD}') {
            assert_eq!(streamed, whole, "{what}");
        }
    }
    assert!(checked >= 5, "only {checked} Gemma 4 fixtures");
}
