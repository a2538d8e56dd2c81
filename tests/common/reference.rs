//! What the reference-equality tests of every family share: a tiny checkpoint made by
//! `tests/oracle/` (`config.json`, weights, `reference.json` with `prompt_ids`/`generated_ids`,
//! `reference.safetensors` with the `logits` of one full forward over prompt + continuation), and
//! the three checks each family runs on it.

use candle_core::{DType, Device, Tensor};
use llmarch::arch::budget::{self, KvDtype};
use llmarch::arch::CausalLm;
use llmarch::arch::{self, config::ParseOptions};
use llmarch::layers::kv_store::KvStore;
use llmarch::loader::model_files::{resolve, ResolveOptions};
use llmarch::loader::ModelRef;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The f32 logit tolerance against the reference for a family's fixtures: a small multiple
/// (5-7×) of the largest error measured over all its fixtures (full forward and cached decode,
/// `check_against_reference` prints both), so a real change in the numbers cannot hide in it.
/// A family without a measured bound fails here: measure it and add a line.
pub fn logit_tol(family: &str) -> f32 {
    match family {
        // Measured 1.83e-4 (e4b-like, cached decode); the other variants 2e-5 to 7e-5.
        "gemma4" => 1e-3,
        // Measured 9.5e-6 (yarn-llama3).
        "laguna" => 5e-5,
        // Measured 9.1e-6 (hybrid, cached decode).
        "zaya" => 5e-5,
        // Measured 1.43e-5 (transformers-form); the 80-token Hub-layout forward 8.8e-6.
        "deepseek_v4" => 1e-4,
        // Measured 9.5e-5 (dense, cached decode). The reference agrees with itself only to
        // ~1e-4 here (chunked vs recurrent rule, prefix lengths: tests/oracle/README.md).
        "qwen3_5" => 5e-4,
        other => panic!("no measured logit bound for the `{other}` family: measure it and add one"),
    }
}

/// llmarch's bf16 logits may differ from the f32 reference by at most this multiple of what the
/// reference's own bf16 run (`logits_bf16`) differs by. Both round weights to bf16; the
/// reference also runs its activations in bf16, llmarch keeps them f32 on the CPU (but for the
/// bf16 products of a long prompt's matmuls), so its error is comparable: measured 0.72-1.47× over every fixture but one (`BF16_EXCEPTIONS`) with
/// `tests/oracle/bf16_logits.py`'s `logits_bf16` (`tests/families.rs` prints each).
pub const BF16_FACTOR: f32 = 1.5;

/// Fixtures measured above [`BF16_FACTOR`], each with its own bound and the measurement.
const BF16_EXCEPTIONS: &[(&str, f32)] = &[
    // Measured 2.66× (max error 4.37 vs the reference's 1.65; relative RMS 1.95×) where every
    // other fixture is at most 1.47× (max) and 1.29× (RMS), its bf16-stored MoE twin
    // `qwen3_5/moe` 1.02×. Not explained yet; bounded so that it cannot grow unnoticed.
    ("qwen3_5/wrapper", 3.0),
];

/// Every family that can run (the registry in `src/arch/mod.rs`).
pub fn runnable_families() -> Vec<&'static arch::Family> {
    let v: Vec<_> = arch::FAMILIES
        .iter()
        .filter(|f| f.build.is_some())
        .collect();
    assert!(v.len() >= 5, "{} runnable families", v.len());
    v
}

/// `tests/fixtures`.
pub fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A family's model fixtures, `tests/fixtures/<family>/<variant>/` (those with a
/// `reference.json`), sorted. Fails when there are none: every family must have one.
pub fn family_fixtures(family: &str) -> Vec<PathBuf> {
    let root = fixtures_root().join(family);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e} (every family needs fixtures)", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference.json").is_file())
        .collect();
    v.sort();
    assert!(!v.is_empty(), "{}: no fixtures", root.display());
    v
}

/// `family/variant` of a fixture folder.
pub fn fixture_name(dir: &Path) -> String {
    dir.strip_prefix(fixtures_root())
        .unwrap_or(dir)
        .to_string_lossy()
        .into_owned()
}

/// Builds any fixture as `llmarch run` does (the registry picks the family), weights in `dtype`.
pub fn build_any(dir: &Path, dtype: DType) -> Box<dyn CausalLm> {
    let config = read_json(&dir.join("config.json"));
    let spec = arch::parse_config(&config, &ParseOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
    let family = arch::family_of(&spec).expect("a registered family");
    let files = resolve(
        &ModelRef::Local(dir.to_path_buf()),
        &ResolveOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
    let ctx = llmarch::cli::Ctx {
        quiet: true,
        verbose: false,
        parse: ParseOptions::default(),
    };
    llmarch::cli::shared::build_model(&files, family, &ctx, dtype, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
        .0
}

pub struct Fixture {
    pub dir: PathBuf,
    pub config: Value,
    pub reference: Value,
    /// Every `*.safetensors` of the folder but `reference.safetensors`, sorted.
    pub weights: Vec<PathBuf>,
    pub prompt: Vec<u32>,
    pub generated: Vec<u32>,
    /// `[positions, vocab]`.
    pub logits: Tensor,
    /// The reference's own bf16 run over the same sequence (`tests/oracle/bf16_logits.py`), in
    /// f32, when the fixture has it.
    pub logits_bf16: Option<Tensor>,
}

pub fn read_json(p: &Path) -> Value {
    let s = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

impl Fixture {
    pub fn load(dir: PathBuf) -> Fixture {
        let config = read_json(&dir.join("config.json"));
        let reference = read_json(&dir.join("reference.json"));
        let ids = |key: &str| -> Vec<u32> {
            reference[key]
                .as_array()
                .unwrap_or_else(|| panic!("reference.json: `{key}` is not a list"))
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        };
        let mut weights: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "safetensors")
                    && p.file_name().is_some_and(|n| n != "reference.safetensors")
            })
            .collect();
        weights.sort();
        assert!(!weights.is_empty(), "{}: no weights", dir.display());
        let mut tensors =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let logits = tensors
            .remove("logits")
            .expect("reference.safetensors holds `logits`");
        let logits_bf16 = tensors
            .remove("logits_bf16")
            .map(|t| t.to_dtype(DType::F32).unwrap());
        Fixture {
            prompt: ids("prompt_ids"),
            generated: ids("generated_ids"),
            dir,
            config,
            reference,
            weights,
            logits,
            logits_bf16,
        }
    }

    /// Prompt then continuation.
    pub fn sequence(&self) -> Vec<u32> {
        self.prompt.iter().chain(&self.generated).copied().collect()
    }
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

pub fn argmax(row: &Tensor) -> u32 {
    row.argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

/// The checks every family runs on a fixture; returns the cache after decoding (for
/// family-specific checks) and the largest logit error seen.
///
/// - (a) one forward over the whole sequence matches the reference logits at every position;
/// - (b) prefill the prompt, then greedy decode through the cache: the tokens are the
///   reference's and every position's logits match;
/// - (c) the bytes the cache then holds equal `kv-budget`'s figure for that context, per layer.
pub fn check_against_reference(variant: &str, model: &dyn CausalLm, f: &Fixture) -> (KvStore, f32) {
    let spec = model.spec();
    let tol = logit_tol(spec.family);
    let seq = f.sequence();
    let (p, total) = (f.prompt.len(), seq.len());
    assert!(p > 0 && !f.generated.is_empty(), "{variant}: empty run");
    assert_eq!(
        f.logits.dims(),
        &[total, spec.vocab_size],
        "{variant}: reference logits"
    );

    // (a) One forward over the whole sequence.
    let full = model.forward(&seq, &mut model.new_cache()).unwrap();
    let err_full = max_abs_diff(&full, &f.logits);
    assert!(
        err_full < tol,
        "{variant}: full forward differs by {err_full}"
    );

    // (b) Prefill the prompt, then greedy decode through the cache.
    let mut cache = model.new_cache();
    let mut rows = vec![model.forward(&f.prompt, &mut cache).unwrap()]; // [p, vocab]
    let mut next = argmax(&rows[0].get(p - 1).unwrap());
    for (step, &want) in f.generated.iter().enumerate() {
        assert_eq!(next, want, "{variant}: greedy token {step} differs");
        let out = model.forward(&[next], &mut cache).unwrap(); // [1, vocab]
        next = argmax(&out.get(0).unwrap());
        rows.push(out);
    }
    let stepped = Tensor::cat(&rows, 0).unwrap();
    let err_steps = max_abs_diff(&stepped, &f.logits);
    for r in 0..total {
        let e = max_abs_diff(&stepped.get(r).unwrap(), &f.logits.get(r).unwrap());
        assert!(
            e < tol,
            "{variant}: position {r} differs by {e} (bound {tol})"
        );
    }

    // (c) What the cache holds equals kv-budget at this context, layer by layer.
    assert_eq!(cache.seen(), total);
    let want = budget::compute(spec, total as u64, 1, KvDtype::F32).unwrap();
    let got = cache.bytes();
    assert_eq!(got.len(), spec.layers.len());
    for (i, (g, w)) in got.iter().zip(&want.layers).enumerate() {
        assert_eq!(
            *g, w.bytes,
            "{variant}: layer {i} holds {g} B, kv-budget says {}",
            w.bytes
        );
    }
    eprintln!("{variant}: max logit error full {err_full:.2e}, stepped {err_steps:.2e}");
    (cache, err_full.max(err_steps))
}

/// Feed `seq` in uneven chunks (as `chat` does turn by turn) and compare with one forward over
/// it; returns the largest logit difference.
#[allow(dead_code)]
pub fn chunked_vs_one_forward(model: &dyn CausalLm, seq: &[u32]) -> f32 {
    let full = model.forward(seq, &mut model.new_cache()).unwrap();
    let mut cache = model.new_cache();
    let (mut at, mut rows) = (0, vec![]);
    for n in [5, 3, 1, 9, 2, 7].iter().cycle() {
        if at == seq.len() {
            break;
        }
        let end = (at + n).min(seq.len());
        rows.push(model.forward(&seq[at..end], &mut cache).unwrap());
        at = end;
    }
    max_abs_diff(&Tensor::cat(&rows, 0).unwrap(), &full)
}

/// A prompt of `n` pseudo-random tokens fed as the generation loop feeds it (chunks of
/// `PREFILL_CHUNK`, attention in query blocks) against one forward over all of it; returns the
/// largest logit difference. With `n` past a chunk, windows, compression and the chunk boundary
/// are all crossed. Only summation order differs (GEMM tiles, attention blocks), which over
/// 1100 positions of these random models reaches ~1e-4; a misplaced position, window or state
/// costs far more.
#[allow(dead_code)]
pub fn long_prompt_chunked_vs_one_forward(model: &dyn CausalLm, n: usize) -> f32 {
    use llmarch::generate::{prefill, PREFILL_CHUNK};
    assert!(n > PREFILL_CHUNK);
    let vocab = model.spec().vocab_size as u64;
    let seq: Vec<u32> = (0..n as u64)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect();
    let full = model.forward(&seq, &mut model.new_cache()).unwrap();
    let mut cache = model.new_cache();
    let mut chunks = 0;
    let chunked = prefill(model, &mut cache, &seq, true, &mut |_| {
        chunks += 1;
        Ok(true)
    })
    .unwrap()
    .expect("not stopped");
    assert_eq!(
        chunks,
        n.div_ceil(PREFILL_CHUNK) - 1,
        "progress between chunks"
    );
    assert_eq!(cache.seen(), n);
    // Only the last row when the caller wants the last: the same numbers.
    let last = prefill(model, &mut model.new_cache(), &seq, false, &mut |_| {
        Ok(true)
    })
    .unwrap()
    .expect("not stopped");
    assert_eq!(last.dims(), &[1, model.spec().vocab_size]);
    let d_last = max_abs_diff(&last, &full.narrow(0, n - 1, 1).unwrap());
    max_abs_diff(&chunked, &full).max(d_last)
}

/// The model refuses an id outside its vocabulary (naming the vocabulary size) and an empty chunk.
#[allow(dead_code)]
pub fn check_bad_token_ids(model: &dyn CausalLm) {
    let vocab = model.spec().vocab_size as u32;
    let err = model
        .forward(&[1, vocab], &mut model.new_cache())
        .unwrap_err()
        .to_string();
    assert!(err.contains(&vocab.to_string()), "{err}");
    assert!(model.forward(&[], &mut model.new_cache()).is_err());
}

/// A bf16 model's logits over the fixture's sequence: f32, finite, and no further from the f32
/// reference than [`BF16_FACTOR`] × the reference's own bf16 run (`logits_bf16`, required);
/// returns (llmarch's error, the reference's).
pub fn check_bf16_near_reference(what: &str, model: &dyn CausalLm, f: &Fixture) -> (f32, f32) {
    let theirs = f
        .logits_bf16
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no `logits_bf16` (tests/oracle/bf16_logits.py)"));
    let logits = model
        .forward(&f.sequence(), &mut model.new_cache())
        .unwrap();
    assert_eq!(logits.dtype(), DType::F32);
    let err = max_abs_diff(&logits, &f.logits);
    let ref_err = max_abs_diff(theirs, &f.logits);
    let rms = |a: &Tensor| -> f32 {
        let d = (a - &f.logits).unwrap().sqr().unwrap().sum_all().unwrap();
        let n = f.logits.sqr().unwrap().sum_all().unwrap();
        (d.to_scalar::<f32>().unwrap() / n.to_scalar::<f32>().unwrap()).sqrt()
    };
    eprintln!(
        "{what}: bf16 max logit error {err:.3e}, the reference's bf16 run {ref_err:.3e} ({:.2}×); rel RMS {:.3e} vs {:.3e} ({:.2}×)",
        err / ref_err, rms(&logits), rms(theirs), rms(&logits)/rms(theirs)
    );
    assert!(
        ref_err > 0.0,
        "{what}: the reference's bf16 run equals its f32 run"
    );
    let factor = BF16_EXCEPTIONS
        .iter()
        .find(|(name, _)| *name == what)
        .map_or(BF16_FACTOR, |&(_, k)| k);
    assert!(
        err.is_finite() && err <= factor * ref_err,
        "{what}: bf16 logits differ from the f32 reference by {err}, the reference's bf16 run by {ref_err}"
    );
    (err, ref_err)
}
