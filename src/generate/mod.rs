//! ONE prefill/decode loop and sampler for every family: prefill the prompt in chunks of
//! [`PREFILL_CHUNK`] tokens, then decode a token at a time, stopping on an end-of-sequence id,
//! the token budget, the context limit, or the caller (Ctrl-C, heard between chunks too). Stats
//! are measured here, the same way for every model.
//!
//! Chunking bounds what a long prompt costs beside the weights and the cache: one chunk's
//! activations (its MLP intermediate, its per-layer embeddings) and one block of attention
//! scores, whatever the prompt length; only the last chunk runs the output head.

pub mod sampler;

use crate::arch::{CausalLm, Rows};
use crate::layers::kv_store::KvStore;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use sampler::Sampler;
use serde::Serialize;
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
    let mut history: Vec<u32> = prompt.to_vec();
    let mut stats = Stats {
        prompt_tokens: prompt.len(),
        prefilled_tokens: prompt.len(),
        ..Default::default()
    };

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
    let mut go_on = on_event(Event::Prefilled {
        logits: &logits,
        cache,
    })?;
    let mut last = logits.get(logits.dim(0)? - 1)?; // [vocab]

    let t_decode = Instant::now();
    let mut fed_in_decode = 0usize;
    while go_on {
        if stats.generated_tokens >= limits.max_new_tokens {
            stats.stop = Some(StopReason::MaxTokens);
            break;
        }
        let row: Vec<f32> = last.to_dtype(DType::F32)?.to_vec1()?;
        if row.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
            bail!(
                "the model's scores for token {} hold NaN or infinity: its output would be meaningless\n\
                 hint: the checkpoint may hold NaN/Inf weights, or a half-precision type overflowed (try --dtype f32)",
                cache.seen() + 1
            );
        }
        let id = sampler.next(&row, &history);
        if stats.generated_tokens == 0 {
            stats.ttft_ms = t0.elapsed().as_secs_f64() * 1e3;
        }
        stats.generated_tokens += 1;
        stats.generated_ids.push(id);
        history.push(id);
        go_on = on_event(Event::Token {
            id,
            logits: &last,
            cache,
        })?;
        if limits.stop_ids.contains(&id) {
            stats.stop = Some(StopReason::EndOfSequence);
            break;
        }
        if !go_on {
            break;
        }
        if stats.generated_tokens >= limits.max_new_tokens {
            stats.stop = Some(StopReason::MaxTokens);
            break;
        }
        if cache.seen() + 1 > limits.max_context {
            stats.stop = Some(StopReason::ContextFull);
            break;
        }
        last = model.forward_last(&[id], cache)?.get(0)?;
        fed_in_decode += 1;
    }
    if !go_on && stats.stop.is_none() {
        stats.stop = Some(StopReason::Interrupted);
    }
    let decode = t_decode.elapsed().as_secs_f64();
    stats.decode_tok_s = if fed_in_decode > 0 {
        fed_in_decode as f64 / decode.max(1e-9)
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
