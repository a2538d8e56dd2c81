//! Speculative decoding over every registered family (`llmarch::arch::FAMILIES`): drafting
//! never changes greedy output, a rolled-back cache is byte-identical to one that never saw the
//! rejected tokens, and sampled output keeps the target's distribution.

mod common;

use candle_core::{DType, Tensor};
use common::reference::{build_any, family_fixtures, fixture_name, runnable_families};
use llmarch::arch::CausalLm;
use llmarch::generate::ngram::NgramDrafter;
use llmarch::generate::sampler::{Sampler, Sampling};
use llmarch::generate::speculative::DraftContext;
use llmarch::generate::{generate_with, Drafter, Drafting, Limits, Stats};
use llmarch::layers::kv_store::KvStore;
use std::collections::BTreeMap;

/// A prompt of `n` tokens that repeats a 7-token phrase among pseudo-random ones, so prompt
/// lookup finds matches.
fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| {
            if (i / 7) % 3 == 1 {
                (i % 7 * 31 + 5) as u32 % vocab as u32
            } else {
                ((i * 7919 + 13) % vocab as u64) as u32
            }
        })
        .collect()
}

/// Run the generation loop; greedy unless `sampling` says otherwise.
fn run(
    model: &dyn CausalLm,
    prompt: &[u32],
    n: usize,
    sampling: Sampling,
    drafting: Option<Drafting>,
) -> (Stats, KvStore) {
    let mut cache = model.new_cache();
    let limits = Limits {
        max_new_tokens: n,
        max_context: 4096,
        stop_ids: vec![],
        all_prompt_logits: false,
    };
    let stats = generate_with(
        model,
        &mut cache,
        prompt,
        &mut Sampler::new(sampling),
        &limits,
        drafting,
        &mut |_| Ok(true),
    )
    .unwrap();
    (stats, cache)
}

/// Drafts the true continuation (from a plain run) with one token wrong per round, at an offset
/// that cycles through every position (and past the end: a fully right draft).
struct Scripted {
    truth: Vec<u32>,
    round: usize,
    vocab: u32,
}

impl Drafter for Scripted {
    fn name(&self) -> String {
        "scripted".into()
    }

    fn draft(&mut self, ctx: DraftContext, n: usize) -> anyhow::Result<Vec<u32>> {
        let at = ctx.history.len();
        assert_eq!(
            &self.truth[..at],
            ctx.history,
            "the history is the plain run's"
        );
        assert_eq!(
            ctx.cache.seen(),
            at - 1,
            "every token but the last is cached"
        );
        let mut d: Vec<u32> = self.truth[at..(at + n).min(self.truth.len())].to_vec();
        let wrong = self.round % (n + 1);
        if let Some(t) = d.get_mut(wrong) {
            *t = (*t + 1) % self.vocab;
        }
        self.round += 1;
        Ok(d)
    }
}

/// With `--temperature 0`, any drafter and any number of drafts give exactly the plain greedy
/// tokens, for every fixture of every family: 40 tokens after a 60-token prompt cross sliding
/// windows (8 here), compression boundaries and DeltaNet/CCA state updates many times; a
/// 530-token prompt also crosses a prefill chunk.
#[test]
fn greedy_output_is_the_same_with_any_drafter_for_every_family() {
    for family in runnable_families() {
        let mut accepted = 0;
        for (i, dir) in family_fixtures(family.name).into_iter().enumerate() {
            let name = fixture_name(&dir);
            let model = build_any(&dir, DType::F32);
            let vocab = model.spec().vocab_size;
            for (len, n) in [(60usize, 40usize), (530, 12)] {
                if len > 100 && i > 0 {
                    continue; // the long prompt once per family
                }
                let p = prompt(len, vocab);
                let (plain, plain_cache) = run(model.as_ref(), &p, n, Sampling::default(), None);
                assert_eq!(plain.target_steps, n - 1);
                let truth: Vec<u32> = p.iter().chain(&plain.generated_ids).copied().collect();
                for k in [1usize, 3, 8] {
                    let mut ngram = NgramDrafter;
                    let mut scripted = Scripted {
                        truth: truth.clone(),
                        round: 0,
                        vocab: vocab as u32,
                    };
                    let drafters: [&mut dyn Drafter; 2] = [&mut ngram, &mut scripted];
                    for drafter in drafters {
                        let who = format!("{name}, prompt {len}, {} ×{k}", drafter.name());
                        let (s, cache) = run(
                            model.as_ref(),
                            &p,
                            n,
                            Sampling::default(),
                            Some(Drafting { drafter, tokens: k }),
                        );
                        assert_eq!(s.generated_ids, plain.generated_ids, "{who}");
                        assert_eq!(cache.seen(), plain_cache.seen(), "{who}");
                        assert_eq!(cache.bytes(), plain_cache.bytes(), "{who}");
                        assert!(s.accepted_tokens <= s.draft_tokens, "{who}");
                        assert!(s.target_steps < n, "{who}");
                        accepted += s.accepted_tokens;
                    }
                }
            }
        }
        assert!(accepted > 0, "{}: no draft was ever accepted", family.name);
    }
}

/// Each layer's tensors (K, V, states), named, as bits.
type LayerBits = Vec<(String, Vec<u32>)>;

/// Every tensor a store holds, as bits, layer by layer; and how many tokens it has seen.
fn dump(cache: &KvStore, layers: usize) -> (usize, Vec<LayerBits>) {
    let bits = |t: &Tensor| -> Vec<u32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    };
    let per_layer = (0..layers)
        .map(|i| {
            let Some(l) = cache.layer(i) else {
                return vec![];
            };
            let mut v = vec![];
            if let Some(k) = &l.k {
                v.push(("k".to_string(), bits(k)));
            }
            if let Some(t) = &l.v {
                v.push(("v".to_string(), bits(t)));
            }
            for (name, t) in &l.states {
                v.push((name.to_string(), bits(t)));
            }
            v
        })
        .collect();
    (cache.seen(), per_layer)
}

/// After a verify pass, a rollback gives back the store as it was, byte for byte, whatever the
/// family keeps (full rows in a growing buffer, sliding windows that evicted rows, DeltaNet,
/// convolution and delayed-value states, DeepSeek V4's open compression window and indexer
/// entries); feeding the accepted tokens then gives exactly the store of a run that never saw
/// the rejected ones, and the next steps' logits are the same bits. A snapshot taken before
/// (chat keeps one per turn) is untouched throughout.
#[test]
fn a_rolled_back_cache_is_byte_identical_to_one_that_never_drafted() {
    for family in runnable_families() {
        for dir in family_fixtures(family.name) {
            let name = fixture_name(&dir);
            let model = build_any(&dir, DType::F32);
            let (vocab, layers) = (model.spec().vocab_size, model.spec().layers.len());
            // 37 tokens: past the sliding windows, mid compression group.
            let p = prompt(37, vocab);
            let mut base = model.new_cache();
            model.forward(&p, &mut base).unwrap();
            let snapshot = base.clone();
            let snapshot_bits = dump(&snapshot, layers);
            let input: Vec<u32> = prompt(80, vocab)[70..79].to_vec(); // t, d1..d8
            for keep in [1usize, 2, 5, 9] {
                let who = format!("{name}, keep {keep} of 9");
                let mut live = base.clone();
                let before = dump(&live, layers);
                let cp = live.checkpoint();
                model.forward(&input, &mut live).unwrap();
                live.rollback(&cp).unwrap();
                assert!(dump(&live, layers) == before, "{who}: rollback");
                model
                    .forward_logits(&input[..keep], &mut live, llmarch::arch::Rows::None)
                    .unwrap();
                let mut never = base.clone();
                model
                    .forward_logits(&input[..keep], &mut never, llmarch::arch::Rows::None)
                    .unwrap();
                assert!(dump(&live, layers) == dump(&never, layers), "{who}: refed");
                for t in [3u32, 9, 4] {
                    let a = model.forward(&[t], &mut live).unwrap();
                    let b = model.forward(&[t], &mut never).unwrap();
                    assert_eq!(
                        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        "{who}: next logits"
                    );
                }
                assert!(dump(&snapshot, layers) == snapshot_bits, "{who}: snapshot");
            }
        }
    }
}

/// Where a family's cache is only rows (no states), a verify pass's accepted rows are kept
/// (`KvStore::keep_prefix`) instead of fed again: a verify pass computes each row as a decode
/// step does (`as_decode_steps`), so the store, the last hidden state and the next steps'
/// logits are the same bits as those of a run that decoded only the accepted tokens, one at a
/// time. Families with states take the rollback above (`keep_prefix` declines, changing nothing).
#[test]
fn kept_rows_of_a_verify_pass_equal_a_refeed() {
    for family in runnable_families() {
        let mut kept = 0;
        for dir in family_fixtures(family.name) {
            let name = fixture_name(&dir);
            let model = build_any(&dir, DType::F32);
            let (vocab, layers) = (model.spec().vocab_size, model.spec().layers.len());
            let p = prompt(37, vocab);
            let mut base = model.new_cache();
            model.forward(&p, &mut base).unwrap();
            // t, d1..d4: within the fixtures' 8-token sliding windows.
            let input: Vec<u32> = prompt(80, vocab)[70..75].to_vec();
            for keep in [1usize, 2, 4, 5] {
                let who = format!("{name}, keep {keep} of 5");
                let mut live = base.clone();
                let before = dump(&live, layers);
                let cp = live.checkpoint();
                llmarch::kernels::as_decode_steps(|| model.forward(&input, &mut live)).unwrap();
                if !live.keep_prefix(&cp, keep).unwrap() {
                    live.rollback(&cp).unwrap();
                    assert!(
                        dump(&live, layers) == before,
                        "{who}: declined, then rolled back"
                    );
                    continue;
                }
                kept += 1;
                let mut never = base.clone();
                for &t in &input[..keep] {
                    model.forward(&[t], &mut never).unwrap();
                }
                assert!(
                    dump(&live, layers) == dump(&never, layers),
                    "{who}: kept rows"
                );
                let last = |c: &KvStore| {
                    c.last_hidden().unwrap().map(|h| {
                        assert_eq!(h.dims(), [1, 1, h.elem_count()], "{who}");
                        h.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                    })
                };
                assert_eq!(last(&live), last(&never), "{who}: last hidden state");
                for t in [3u32, 9, 4] {
                    let a = model.forward(&[t], &mut live).unwrap();
                    let b = model.forward(&[t], &mut never).unwrap();
                    assert_eq!(
                        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        "{who}: next logits"
                    );
                }
            }
        }
        let rows_only = ["gemma4", "laguna"].contains(&family.name);
        assert_eq!(
            kept > 0,
            rows_only,
            "{}: kept rows {kept} times",
            family.name
        );
    }
}

/// Proposes what the target itself ranks second at each step (computed on a copy of its
/// cache): drafts with 0 < p < 1 under top-k 3, so both acceptance and the residual draw run.
struct SecondBest;

impl Drafter for SecondBest {
    fn name(&self) -> String {
        "second-best".into()
    }

    fn draft(&mut self, ctx: DraftContext, n: usize) -> anyhow::Result<Vec<u32>> {
        let mut cache = ctx.cache.clone();
        let mut last = *ctx.history.last().unwrap();
        let mut d = vec![];
        for _ in 0..n {
            let row: Vec<f32> = ctx.target.forward(&[last], &mut cache)?.get(0)?.to_vec1()?;
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            last = idx[1] as u32;
            d.push(last);
        }
        Ok(d)
    }
}

/// Sampling (temperature 1, top-k 3: a three-token vocabulary at each step) with drafts: the
/// joint distribution of the three generated tokens over 3000 seeds equals the target's (the
/// product of its step distributions, computed by forwards over each prefix). Pearson's χ²
/// over the cells (those expected below 5 merged) is compared with its 0.999 quantile: a
/// correct sampler fails with probability 0.001 (the seeds are fixed, so it passes or fails
/// the same way every run).
#[test]
fn sampling_with_drafts_keeps_the_targets_distribution() {
    let dir = &family_fixtures("gemma4")[0];
    let model = build_any(dir, DType::F32);
    let p = prompt(20, model.spec().vocab_size);
    let sampling = |seed| Sampling {
        temperature: 1.0,
        top_k: Some(3),
        seed,
        ..Default::default()
    };
    let sampler = Sampler::new(sampling(0));
    // The target's step distribution after `prefix`.
    let dist = |prefix: &[u32]| -> Vec<(u32, f64)> {
        let row: Vec<f32> = model
            .forward(prefix, &mut model.new_cache())
            .unwrap()
            .get(prefix.len() - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let d = sampler.distribution(&row, prefix);
        let total: f32 = d.p.iter().sum();
        d.ids
            .iter()
            .zip(&d.p)
            .map(|(&i, &x)| (i, (x / total) as f64))
            .collect()
    };
    let mut want: BTreeMap<Vec<u32>, f64> = BTreeMap::new();
    let grow = |seq: &[u32]| -> Vec<(Vec<u32>, f64)> {
        dist(seq)
            .into_iter()
            .map(|(t, q)| {
                let mut s = seq.to_vec();
                s.push(t);
                (s, q)
            })
            .collect()
    };
    for (s1, q1) in grow(&p) {
        for (s2, q2) in grow(&s1) {
            for (s3, q3) in grow(&s2) {
                want.insert(s3[p.len()..].to_vec(), q1 * q2 * q3);
            }
        }
    }
    let runs = 3000;
    let mut got: BTreeMap<Vec<u32>, usize> = BTreeMap::new();
    let (mut drafted, mut accepted) = (0, 0);
    for seed in 0..runs {
        let mut d = SecondBest;
        let (s, _) = run(
            model.as_ref(),
            &p,
            3,
            sampling(seed as u64),
            Some(Drafting {
                drafter: &mut d,
                tokens: 2,
            }),
        );
        drafted += s.draft_tokens;
        accepted += s.accepted_tokens;
        *got.entry(s.generated_ids).or_default() += 1;
    }
    assert!(
        got.keys().all(|k| want.contains_key(k)),
        "a sequence the target gives probability 0"
    );
    assert!(
        accepted > 0 && accepted < drafted,
        "{accepted} of {drafted}"
    );
    // Pearson's χ², cells expected below 5 pooled into one.
    let (mut chi2, mut cells) = (0.0, 0usize);
    let (mut pool_e, mut pool_o) = (0.0, 0.0);
    for (k, &q) in &want {
        let e = q * runs as f64;
        let o = *got.get(k).unwrap_or(&0) as f64;
        if e < 5.0 {
            pool_e += e;
            pool_o += o;
        } else {
            chi2 += (o - e).powi(2) / e;
            cells += 1;
        }
    }
    if pool_e > 0.0 {
        chi2 += (pool_o - pool_e).powi(2) / pool_e;
        cells += 1;
    }
    let dof = (cells - 1) as f64;
    // The 0.999 quantile of χ²(dof), Wilson–Hilferty (z = 3.090).
    let a = 2.0 / (9.0 * dof);
    let q999 = dof * (1.0 - a + 3.090 * a.sqrt()).powi(3);
    eprintln!("χ² = {chi2:.1} over {cells} cells (0.999 quantile {q999:.1}); accepted {accepted} of {drafted} drafts");
    assert!(chi2 < q999, "χ² = {chi2:.1} ≥ {q999:.1}: {got:?}");
}

/// Runs llmarch with `args`, which must succeed, and parses its last stdout line (`--json`).
fn run_stats(args: &[&str]) -> serde_json::Value {
    let o = common::run(args);
    assert!(o.status.success(), "{args:?}: {}", common::stderr(&o));
    serde_json::from_str(common::stdout(&o).lines().last().unwrap()).unwrap()
}

/// Runs `target` on the prompt of `fixture`'s reference.json with `--draft draft` (and
/// `extra` flags) for as many drafts as the reference has, and checks the first round: the
/// target's first token, the drafted logits within 5e-3 of reference.safetensors' `logits`
/// (one row per drafted token) and the drafted ids. Returns the run's `--json` stats.
fn first_round_matches(
    target: &std::path::Path,
    fixture: &std::path::Path,
    draft: &str,
    extra: &[&str],
) -> serde_json::Value {
    let name = fixture_name(fixture);
    let r = common::reference::read_json(&fixture.join("reference.json"));
    let ids = |k: &str| -> Vec<u64> {
        r[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    let (prompt, drafted) = (ids("prompt_ids"), ids("drafted_ids"));
    let want = candle_core::safetensors::load(
        fixture.join("reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .remove("logits")
    .unwrap(); // [drafts, vocab]
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("draft.safetensors");
    let p: Vec<String> = prompt.iter().map(u64::to_string).collect();
    let p = p.join(",");
    let k = drafted.len().to_string();
    let n = (drafted.len() + 2).to_string();
    let mut args = vec![
        "run",
        target.to_str().unwrap(),
        "--prompt-ids",
        &p,
        "-n",
        &n,
        "--temperature",
        "0",
        "--draft",
        draft,
        "--draft-tokens",
        &k,
        "--draft-logits-out",
        out.to_str().unwrap(),
        "--json",
    ];
    args.extend(extra);
    let o = common::run(&args);
    assert!(o.status.success(), "{name}: {}", common::stderr(&o));
    let s: serde_json::Value =
        serde_json::from_str(common::stdout(&o).lines().last().unwrap()).unwrap();
    assert_eq!(s["generated_ids"][0], r["first_token"], "{name}");
    // The summary line says what was drafted and accepted.
    let said = format!("{} of {} accepted", s["accepted_tokens"], s["draft_tokens"]);
    assert!(
        common::stderr(&o).contains(&said),
        "{name}: no `{said}` in {}",
        common::stderr(&o)
    );
    let got = candle_core::safetensors::load(&out, &candle_core::Device::Cpu)
        .unwrap()
        .remove("logits")
        .unwrap();
    let first = got.narrow(0, 0, drafted.len()).unwrap();
    let err = common::reference::max_abs_diff(&first, &want);
    eprintln!("{name}: drafted logits within {err:.2e} of the reference");
    assert!(err < 5e-3, "{name}: drafted logits differ by {err}");
    let got_ids: Vec<u64> = (0..drafted.len())
        .map(|i| common::reference::argmax(&first.get(i).unwrap()) as u64)
        .collect();
    assert_eq!(got_ids, drafted, "{name}: drafted ids");
    s
}

/// Gemma 4's assistant drafters (`tests/fixtures/gemma4_assistant/`, transformers 5.25.0; the
/// target is `gemma4/e2b-like`): the first round's logits, drafted from the prompt's prefill and
/// the target's first token at position = prompt length, equal the reference's within 5e-3 and
/// give its drafted ids, with ordered embeddings off and on.
#[test]
fn the_gemma4_assistant_drafts_as_the_reference_does() {
    let root = common::reference::fixtures_root();
    let target = root.join("gemma4/e2b-like");
    for variant in ["plain", "ordered"] {
        let dir = root.join("gemma4_assistant").join(variant);
        let s = first_round_matches(&target, &dir, dir.to_str().unwrap(), &[]);
        // The assistant holds no cache: the target's 6 layers only.
        assert_eq!(s["kv_bytes_per_layer"].as_array().unwrap().len(), 6);
    }
}

/// Greedy output with an assistant drafter is the target's own, over a prompt past the
/// target's window and generations that cross it again; the cache holds what a plain run's
/// does (the assistant owns none), and its default draft count is its generation_config's.
#[test]
fn greedy_output_is_the_same_with_the_gemma4_assistant() {
    let root = common::reference::fixtures_root();
    let target = root.join("gemma4/e2b-like");
    let t = target.to_str().unwrap();
    let p: Vec<String> = prompt(40, 512).iter().map(u32::to_string).collect();
    let p = p.join(",");
    let base = [
        "run",
        t,
        "--prompt-ids",
        &p,
        "-n",
        "30",
        "--temperature",
        "0",
        "--json",
    ];
    let stats = |extra: &[&str]| run_stats(&[&base[..], extra].concat());
    let plain = stats(&[]);
    for variant in ["plain", "ordered"] {
        let d = root.join("gemma4_assistant").join(variant);
        let d = d.to_str().unwrap();
        for k in [None, Some("1"), Some("6")] {
            let mut extra = vec!["--draft", d];
            if let Some(k) = k {
                extra.extend(["--draft-tokens", k]);
            }
            let s = stats(&extra);
            assert_eq!(
                s["generated_ids"], plain["generated_ids"],
                "{variant} {k:?}"
            );
            assert_eq!(
                s["kv_bytes_per_layer"], plain["kv_bytes_per_layer"],
                "{variant} {k:?}"
            );
            assert!(s["draft_tokens"].as_u64().unwrap() > 0, "{variant} {k:?}");
            if k.is_none() {
                // generation_config.json: 3 (plain) and 5 (ordered) per step.
                let per = if variant == "plain" { 3 } else { 5 };
                let steps = s["target_steps"].as_u64().unwrap();
                assert!(s["draft_tokens"].as_u64().unwrap() <= per * steps, "{s}");
                assert!(
                    s["draft_tokens"].as_u64().unwrap() > (per - 1) * steps / 2,
                    "{s}"
                );
            }
        }
    }
}

/// The Qwen3.5 MTP head's fixtures (`tests/fixtures/qwen3_5_mtp/`, tests/oracle/qwen3_5_mtp_fixtures.py:
/// the head assembled from transformers 5.23.0's layers as vLLM wires it).
fn mtp_fixtures() -> Vec<std::path::PathBuf> {
    let root = common::reference::fixtures_root().join("qwen3_5_mtp");
    ["dense", "moe"].iter().map(|v| root.join(v)).collect()
}

/// The MTP head's first round (drafted from the prompt's prefill and the target's first token)
/// equals the reference's logits within 5e-3 and gives its drafted ids, dense and MoE (f32
/// weights: the MoE checkpoint is bf16, which the reference upcasts).
#[test]
fn the_mtp_head_drafts_as_the_reference_does() {
    for dir in mtp_fixtures() {
        first_round_matches(&dir, &dir, "mtp", &["--dtype", "f32"]);
    }
}

/// Greedy output with the MTP head is the target's own, for any number of drafts, after a
/// short prompt and one that crosses a prefill chunk (the head catches up on both chunks);
/// the cache holds the target's layers as a plain run does, plus the head's full-attention
/// slot (one K and V row per position).
#[test]
fn greedy_output_is_the_same_with_the_mtp_head() {
    for dir in mtp_fixtures() {
        let name = fixture_name(&dir);
        let d = dir.to_str().unwrap();
        for (len, n) in [(40usize, 30usize), (530, 8)] {
            let p: Vec<String> = prompt(len, 512).iter().map(u32::to_string).collect();
            let p = p.join(",");
            let n = n.to_string();
            let base = [
                "run",
                d,
                "--prompt-ids",
                &p,
                "-n",
                &n,
                "--temperature",
                "0",
                "--max-context",
                "1024",
                "--json",
            ];
            let stats = |extra: &[&str]| run_stats(&[&base[..], extra].concat());
            let plain = stats(&[]);
            let layers = plain["kv_bytes_per_layer"].as_array().unwrap().clone();
            for k in [None, Some("1"), Some("3"), Some("8")] {
                let mut extra = vec!["--draft", "mtp"];
                if let Some(k) = k {
                    extra.extend(["--draft-tokens", k]);
                }
                let s = stats(&extra);
                let who = format!("{name}, prompt {len}, {k:?} drafts");
                assert_eq!(s["generated_ids"], plain["generated_ids"], "{who}");
                let per_layer = s["kv_bytes_per_layer"].as_array().unwrap();
                assert_eq!(per_layer[..layers.len()], layers[..], "{who}");
                // The head's slot: K and V of 2 heads × 32 dims, f32 (the MoE's bf16 weights
                // run with f32 activations), for every position but the last token fed.
                let fed = s["prompt_tokens"].as_u64().unwrap()
                    + s["generated_tokens"].as_u64().unwrap()
                    - 1;
                assert!(per_layer.len() == layers.len() + 1, "{who}");
                let rows = per_layer[layers.len()].as_u64().unwrap() / (2 * 2 * 32 * 4);
                assert!(
                    rows <= fed && rows + 8 >= fed,
                    "{who}: {rows} rows, {fed} fed"
                );
                assert!(s["draft_tokens"].as_u64().unwrap() > 0, "{who}");
                if k.is_none() {
                    let steps = s["target_steps"].as_u64().unwrap();
                    assert!(s["draft_tokens"].as_u64().unwrap() <= 2 * steps, "{s}");
                }
            }
        }
    }
}

/// `inspect` and `kv-budget` say what a drafter holds (nothing) and reads; bad drafters and
/// flags are one clear error each.
#[test]
fn drafters_are_reported_and_refused_clearly() {
    use common::{expect_error, run as cli, run_json};
    let root = common::reference::fixtures_root();
    let target = root.join("gemma4/e2b-like");
    let t = target.to_str().unwrap();
    let a = root.join("gemma4_assistant/ordered");
    let a = a.to_str().unwrap();
    let v = run_json(&["inspect", t, "--draft", a, "--json"]);
    assert_eq!(v["draft"]["kv_bytes"], 0, "{v}");
    assert_eq!(v["draft"]["reads_target_layers"], serde_json::json!([1, 2]));
    assert_eq!(v["draft"]["layers"], 3);
    let with = run_json(&["kv-budget", t, "-c", "100", "--json", "--draft", a]);
    let without = run_json(&["kv-budget", t, "-c", "100", "--json"]);
    assert_eq!(with[0]["total_bytes"], without[0]["total_bytes"]);
    assert_eq!(with[0]["draft"]["kv_bytes"], 0);

    let mtp = root.join("qwen3_5_mtp/dense");
    let m = mtp.to_str().unwrap();
    let v = run_json(&["inspect", m, "--draft", "mtp", "--json"]);
    assert_eq!(v["draft"]["layers"], 1, "{v}");
    assert_eq!(v["draft"]["kv_values_per_token"], 2 * 2 * 32, "{v}");
    let o = cli(&["kv-budget", m, "-c", "100", "--draft", "mtp"]);
    assert!(
        common::stdout(&o).contains("128 more K/V values per token"),
        "{}",
        common::stdout(&o)
    );
    let no_head = root.join("qwen3_5/dense");
    let deepseek = common::reference::family_fixtures("deepseek_v4")[0].clone();

    let laguna = common::reference::family_fixtures("laguna")[0].clone();
    let l = laguna.to_str().unwrap();
    for (args, needle, code) in [
        (
            vec!["run", t, "--prompt-ids", "2,3", "--draft", t],
            "model_type `gemma4_text` is not a Gemma 4 assistant",
            1,
        ),
        (
            vec!["run", l, "--prompt-ids", "2,3", "--draft", a],
            "a Gemma 4 assistant drafts for a Gemma 4 target, not for laguna",
            1,
        ),
        (
            vec!["inspect", l, "--draft", a],
            "drafts for a Gemma 4 target",
            1,
        ),
        (
            vec![
                "run",
                t,
                "--prompt-ids",
                "2,3",
                "--draft",
                "ngram",
                "--draft-logits-out",
                "/tmp/x.safetensors",
            ],
            "--draft-logits-out: `--draft ngram` is not a model",
            2,
        ),
        (
            vec![
                "run",
                t,
                "--prompt-ids",
                "2,3",
                "--draft-logits-out",
                "/tmp/x.safetensors",
            ],
            "--draft-logits-out needs --draft",
            2,
        ),
        (
            vec!["kv-budget", t, l, "--draft", "ngram"],
            "--draft ngram goes with one model (2 given)",
            2,
        ),
        (
            vec!["run", l, "--prompt-ids", "2,3", "--draft", "mtp"],
            "laguna has no runnable multi-token-prediction head in llmarch (the family has no multi-token-prediction layers)",
            2,
        ),
        (
            vec!["run", deepseek.to_str().unwrap(), "--prompt-ids", "2,3", "--draft", "mtp"],
            "DeepSeek V4's MTP layers are listed, not run",
            2,
        ),
        (
            vec!["run", no_head.to_str().unwrap(), "--prompt-ids", "2,3", "--draft", "mtp"],
            "has no `mtp.*` tensors",
            1,
        ),
        (
            vec!["run", t, "--prompt-ids", "2,3", "--draft", "/no/such/dir"],
            "--draft /no/such/dir: directory `/no/such/dir` does not exist",
            1,
        ),
    ] {
        let err = expect_error(&cli(&args), code);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
