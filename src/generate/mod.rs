//! ONE prefill/decode loop and sampler for every family: prefill the prompt in chunks of
//! [`PREFILL_CHUNK`] tokens, then decode a token at a time, stopping on an end-of-sequence id,
//! the token budget, the context limit, or the caller (Ctrl-C, heard between chunks too). Stats
//! are measured here, the same way for every model.
//!
//! Chunking bounds what a long prompt costs beside the weights and the cache: one chunk's
//! activations (its MLP intermediate, its per-layer embeddings) and one block of attention
//! scores, whatever the prompt length; only the last chunk runs the output head.
//!
//! With a drafter ([`speculative`]) each decode step feeds the chosen token and the draft in
//! one verify pass and keeps what the target accepts; without one, one token per step.

pub mod assistant;
pub mod mtp;
pub mod ngram;
pub mod sampler;
pub mod speculative;

use crate::arch::{CausalLm, Rows};
use crate::layers::kv_store::KvStore;
use crate::layers::top_k;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use sampler::Sampler;
use serde::Serialize;
use speculative::Verdict;
pub use speculative::{Drafter, Drafting};
use std::time::Instant;

/// Tokens per prefill forward: large enough that the weight matmuls run as GEMMs at full speed,
/// small enough that a chunk's activations stay a few tens of MB at the real models' widths.
pub const PREFILL_CHUNK: usize = 512;

/// What the loop does besides sampling.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_new_tokens: usize,
    /// Stop before the sequence (cached + new) would pass this many tokens.
    pub max_context: usize,
    /// End-of-sequence ids: generation stops after producing one (it is reported, not fed).
    pub stop_ids: Vec<u32>,
    /// Return the logits of every prompt position in [`Event::Prefilled`] (for `--logits-out`);
    /// otherwise only the last one is computed.
    pub all_prompt_logits: bool,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndOfSequence,
    MaxTokens,
    ContextFull,
    Interrupted,
}

/// What the caller hears about: prefill progress, a new token (with its logits row), and
/// whether to go on.
pub enum Event<'a> {
    /// `done` of the prompt's `total` tokens are in the cache (sent after each chunk but the
    /// last); returning `false` stops before the next chunk.
    Prefilling { done: usize, total: usize },
    /// The prompt was prefilled; `logits` holds one row per prompt position, or only the last
    /// one unless [`Limits::all_prompt_logits`].
    Prefilled {
        logits: &'a Tensor,
        cache: &'a KvStore,
    },
    /// A token was chosen from `logits` (one row).
    Token {
        id: u32,
        logits: &'a Tensor,
        cache: &'a KvStore,
    },
    /// A verify pass judged `drafted` tokens and accepted the first `accepted` (the accepted
    /// ones were sent as [`Event::Token`] before this).
    Verified { drafted: usize, accepted: usize },
}

/// Measured figures of one generation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub prompt_tokens: usize,
    /// How many of them were fed: all, unless Ctrl-C stopped the prefill.
    pub prefilled_tokens: usize,
    pub generated_tokens: usize,
    /// The generated ids, the stop token included.
    pub generated_ids: Vec<u32>,
    pub ttft_ms: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// Bytes the cache tensors really hold at the end, measured from them.
    pub kv_bytes: u64,
    /// Peak resident memory of the process, where the OS tells.
    pub peak_rss_bytes: Option<u64>,
    pub stop: Option<StopReason>,
    /// Speculative decoding (zero without a drafter): tokens drafted and accepted, the share
    /// accepted, and the target's decode forwards (verify passes and single steps).
    pub draft_tokens: usize,
    pub accepted_tokens: usize,
    pub acceptance_rate: f64,
    pub target_steps: usize,
    /// Tokens fed again after a rollback (the accepted part of a rejected draft).
    pub recomputed_tokens: usize,
}

/// Prefill `prompt` after what `cache` already holds, then decode. `on_event` returns `false`
/// to stop (Ctrl-C). The stop token is counted as generated but not fed back.
pub fn generate(
    model: &dyn CausalLm,
    cache: &mut KvStore,
    prompt: &[u32],
    sampler: &mut Sampler,
    limits: &Limits,
    on_event: &mut dyn FnMut(Event) -> Result<bool>,
) -> Result<Stats> {
    generate_with(model, cache, prompt, sampler, limits, None, on_event)
}

/// The next token: to be drawn from a logits row, or already chosen (a rejected draft's
/// replacement) from that row.
enum Next {
    Row(Tensor),
    Chosen(u32, Tensor),
}

/// A logits row `[vocab]` as f32 values, refused when it holds NaN or +∞.
fn row_values(row: &Tensor, position: usize) -> Result<Vec<f32>> {
    let row: Vec<f32> = row.to_dtype(DType::F32)?.to_vec1()?;
    if row.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
        return Err(meaningless_row(position));
    }
    Ok(row)
}

fn meaningless_row(position: usize) -> anyhow::Error {
    anyhow::anyhow!(
        "the model's scores for token {position} hold NaN or infinity: its output would be meaningless\n\
         hint: the checkpoint may hold NaN/Inf weights, or a half-precision type overflowed (try --dtype f32)"
    )
}

/// Tensors [`choose`] makes once on the model's device, on first use.
#[derive(Default)]
struct OnDevice {
    /// `0, 1, …, vocab − 1` in f32 ([`sampler::argmax_on_device`]).
    iota: std::sync::OnceLock<Tensor>,
    /// [`top_k::triangle`].
    triangle: std::sync::OnceLock<Tensor>,
}

/// The sampler's choice from `row` `[vocab]`. On a GPU (or the generic path) a plain greedy
/// choice is taken where the row lies ([`sampler::argmax_on_device`]: two numbers read back), and
/// a draw from a top-k reads back only the k candidates ([`top_k::top_k_entries`], then
/// [`Sampler::next_among`]: the same draw as from the whole row); otherwise the row is read back.
fn choose(
    sampler: &mut Sampler,
    row: &Tensor,
    history: &[u32],
    position: usize,
    on_device: &OnDevice,
) -> Result<u32> {
    if crate::kernels::fast_cpu(row.device()) {
        return Ok(sampler.next(&row_values(row, position)?, history));
    }
    let vocab = row.dim(0)?;
    let row = row.to_dtype(DType::F32)?;
    if sampler.is_plain_greedy() {
        let iota = crate::layers::once(&on_device.iota, || {
            Ok(Tensor::arange(0u32, vocab as u32, row.device())?.to_dtype(DType::F32)?)
        })?;
        let (id, bad) = sampler::argmax_on_device(&row, iota)?;
        if bad {
            return Err(meaningless_row(position));
        }
        return Ok(id);
    }
    if let Some(k) = sampler.top_k_draw(vocab) {
        let triangle = crate::layers::once(&on_device.triangle, || top_k::triangle(row.device()))?;
        let (values, ids) = top_k::top_k_entries(&row, k, triangle)?;
        let bad = sampler::holds_nan_or_infinity(&row)?;
        let got: Vec<f32> = Tensor::cat(&[values, ids, bad], 0)?.to_vec1()?;
        if got[2 * k] > 0.0 {
            return Err(meaningless_row(position));
        }
        let ids: Vec<u32> = got[k..2 * k].iter().map(|&i| i as u32).collect();
        return Ok(sampler.next_among(&got[..k], &ids));
    }
    Ok(sampler.next(&row_values(&row, position)?, history))
}

/// What the decode loop has produced so far.
struct Out<'l> {
    stats: Stats,
    history: Vec<u32>,
    go_on: bool,
    t0: Instant,
    limits: &'l Limits,
}

/// Record `id`, chosen from `row`, and tell the caller; `false` when generation ends with it.
fn emit(
    out: &mut Out,
    id: u32,
    row: &Tensor,
    cache: &KvStore,
    on_event: &mut dyn FnMut(Event) -> Result<bool>,
) -> Result<bool> {
    let stats = &mut out.stats;
    if stats.generated_tokens == 0 {
        stats.ttft_ms = out.t0.elapsed().as_secs_f64() * 1e3;
    }
    stats.generated_tokens += 1;
    stats.generated_ids.push(id);
    out.history.push(id);
    out.go_on = on_event(Event::Token {
        id,
        logits: row,
        cache,
    })?;
    if out.limits.stop_ids.contains(&id) {
        stats.stop = Some(StopReason::EndOfSequence);
        return Ok(false);
    }
    if !out.go_on {
        return Ok(false);
    }
    if stats.generated_tokens >= out.limits.max_new_tokens {
        stats.stop = Some(StopReason::MaxTokens);
        return Ok(false);
    }
    Ok(true)
}

/// [`generate`], drafting with `drafting` when given (see [`speculative`]).
pub fn generate_with(
    model: &dyn CausalLm,
    cache: &mut KvStore,
    prompt: &[u32],
    sampler: &mut Sampler,
    limits: &Limits,
    mut drafting: Option<Drafting>,
    on_event: &mut dyn FnMut(Event) -> Result<bool>,
) -> Result<Stats> {
    if prompt.is_empty() {
        bail!("the prompt is empty: nothing to continue");
    }
    let start_len = cache.seen();
    if start_len + prompt.len() > limits.max_context {
        bail!(
            "the prompt has {} tokens{} but the context limit is {} (--max-context)",
            prompt.len(),
            if start_len > 0 {
                format!(" after {start_len} already in the cache")
            } else {
                String::new()
            },
            limits.max_context
        );
    }
    let history: Vec<u32> = prompt.to_vec();
    let mut stats = Stats {
        prompt_tokens: prompt.len(),
        prefilled_tokens: prompt.len(),
        ..Default::default()
    };

    if let Some(d) = drafting.as_mut() {
        d.drafter.prepare(cache)?;
    }
    cache.reserve((start_len + prompt.len() + limits.max_new_tokens).min(limits.max_context));
    let t0 = Instant::now();
    let Some(logits) = prefill(model, cache, prompt, limits.all_prompt_logits, on_event)? else {
        stats.stop = Some(StopReason::Interrupted);
        stats.prefilled_tokens = cache.seen() - start_len;
        stats.prefill_tok_s = stats.prefilled_tokens as f64 / t0.elapsed().as_secs_f64();
        stats.kv_bytes = cache.bytes().iter().sum();
        stats.peak_rss_bytes = peak_rss_bytes();
        return Ok(stats);
    }; // [n or 1, vocab]
    let prefill = t0.elapsed().as_secs_f64();
    stats.prefill_tok_s = prompt.len() as f64 / prefill.max(1e-9);
    let go_on = on_event(Event::Prefilled {
        logits: &logits,
        cache,
    })?;
    let mut next = Next::Row(logits.get(logits.dim(0)? - 1)?); // [vocab]

    let t_decode = Instant::now();
    let decode_start = cache.seen();
    let on_device = OnDevice::default();
    let mut out = Out {
        stats,
        history,
        go_on,
        t0,
        limits,
    };
    while out.go_on {
        if out.stats.generated_tokens >= limits.max_new_tokens {
            out.stats.stop = Some(StopReason::MaxTokens);
            break;
        }
        let (id, row) = match next {
            Next::Row(row) => {
                let id = choose(sampler, &row, &out.history, cache.seen() + 1, &on_device)?;
                (id, row)
            }
            Next::Chosen(id, row) => (id, row),
        };
        if !emit(&mut out, id, &row, cache, on_event)? {
            break;
        }
        if cache.seen() + 1 > limits.max_context {
            out.stats.stop = Some(StopReason::ContextFull);
            break;
        }
        // Draft at most what the token budget and the context leave room to verify.
        let room = (limits.max_new_tokens - out.stats.generated_tokens - 1)
            .min(limits.max_context - cache.seen() - 1);
        let drafts = match drafting.as_mut() {
            Some(d) if d.tokens > 0 && room > 0 => {
                let ctx = speculative::DraftContext {
                    history: &out.history,
                    target: model,
                    cache,
                };
                let mut v = d.drafter.draft(ctx, d.tokens.min(room))?;
                v.truncate(d.tokens.min(room));
                v
            }
            _ => vec![],
        };
        out.stats.target_steps += 1;
        if drafts.is_empty() {
            next = Next::Row(model.forward_last(&[id], cache)?.get(0)?);
            continue;
        }

        // Verify `[id, d1..dk]` in one pass; row j judges d(j+1).
        let k = drafts.len();
        let input: Vec<u32> = std::iter::once(id).chain(drafts.iter().copied()).collect();
        let checkpoint = cache.checkpoint();
        // As decode steps compute (no bf16 products for a long draft): the rows judge the drafts
        // by the logits plain decoding would have given.
        let rows = crate::kernels::as_decode_steps(|| model.forward(&input, cache))?; // [k + 1, vocab]
        out.stats.draft_tokens += k;
        let mut keep = k + 1; // tokens of `input` the cache keeps
        let mut accepted = 0;
        let mut stopped = false;
        next = Next::Row(rows.get(k)?);
        for (j, &d) in drafts.iter().enumerate() {
            let row = rows.get(j)?;
            let values = row_values(&row, cache.seen() - k + j)?;
            match speculative::judge(sampler, &values, &out.history, d) {
                Verdict::Accept => {
                    accepted += 1;
                    if !emit(&mut out, d, &row, cache, on_event)? {
                        // `d` ends generation: it is not fed.
                        keep = j + 1;
                        stopped = true;
                        break;
                    }
                }
                Verdict::Reject(t) => {
                    keep = j + 1;
                    next = Next::Chosen(t, row);
                    break;
                }
            }
        }
        out.stats.accepted_tokens += accepted;
        // Keep the accepted rows of the pass where the cache is only rows; else roll back and
        // feed the accepted tokens again.
        if keep < k + 1 && !cache.keep_prefix(&checkpoint, keep)? {
            cache.rollback(&checkpoint)?;
            crate::kernels::as_decode_steps(|| {
                model.forward_logits(&input[..keep], cache, Rows::None)
            })?;
            out.stats.recomputed_tokens += keep;
        }
        out.go_on &= on_event(Event::Verified {
            drafted: k,
            accepted,
        })?;
        if stopped {
            break;
        }
    }
    if !out.go_on && out.stats.stop.is_none() {
        out.stats.stop = Some(StopReason::Interrupted);
    }
    let mut stats = out.stats;
    let decode = t_decode.elapsed().as_secs_f64();
    let fed_in_decode = cache.seen() - decode_start;
    stats.decode_tok_s = if fed_in_decode > 0 {
        fed_in_decode as f64 / decode.max(1e-9)
    } else {
        0.0
    };
    stats.acceptance_rate = if stats.draft_tokens > 0 {
        stats.accepted_tokens as f64 / stats.draft_tokens as f64
    } else {
        0.0
    };
    stats.kv_bytes = cache.bytes().iter().sum();
    stats.peak_rss_bytes = peak_rss_bytes();
    Ok(stats)
}

/// Feed `prompt` in chunks of [`PREFILL_CHUNK`]; the logits of every position (`all`) or of the
/// last, or `None` when `on_event` stopped it between chunks.
pub fn prefill(
    model: &dyn CausalLm,
    cache: &mut KvStore,
    prompt: &[u32],
    all: bool,
    on_event: &mut dyn FnMut(Event) -> Result<bool>,
) -> Result<Option<Tensor>> {
    let total = prompt.len();
    let mut rows = vec![];
    for (i, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
        let done = i * PREFILL_CHUNK;
        if done > 0 && !on_event(Event::Prefilling { done, total })? {
            return Ok(None);
        }
        let last = done + chunk.len() == total;
        let want = match (all, last) {
            (true, _) => Rows::All,
            (false, true) => Rows::Last,
            (false, false) => Rows::None,
        };
        let logits = model.forward_logits(chunk, cache, want)?; // [chunk, 1 or 0 rows, vocab]
        if want != Rows::None {
            rows.push(logits);
        }
    }
    Ok(Some(if rows.len() == 1 {
        rows.pop().expect("one chunk")
    } else {
        Tensor::cat(&rows, 0)?
    }))
}

/// Peak resident set size of this process (`VmHWM` on Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
