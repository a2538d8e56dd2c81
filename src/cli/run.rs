//! `llmarch run <MODEL> --prompt TEXT`: load, prefill, decode; text streams to stdout while a
//! live panel on stderr shows what each layer's cache holds against the budget.

use super::interrupt::{self, Interrupted};
use super::shared::{self, DeviceArgs, SamplingArgs};
use super::{Ctx, UsageError};
use crate::arch::budget;
use crate::generate::sampler::Sampler;
use crate::generate::{self, Event, Limits, Stats};
use crate::report::output_file::write_whole;
use crate::report::panel::{self, LivePanel, Snapshot};
use crate::report::units;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// An alias (`llmarch models`), a Hub repo id `org/name[@revision]`, or a local directory.
    pub model: String,
    /// The prompt text (BOS is added as the tokenizer config says).
    #[arg(short, long, group = "input")]
    pub prompt: Option<String>,
    /// Read the prompt from a file (`-` for stdin).
    #[arg(long, group = "input")]
    pub prompt_file: Option<PathBuf>,
    /// Raw token ids instead of text, e.g. `2,651,1144`.
    #[arg(long, group = "input", value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub draft: super::draft::DraftArgs,
    /// Context limit for this run and the budget the panel compares against (default: the
    /// model's own).
    /// A number of tokens, `k`/`m` binary suffixes allowed (128k = 131072).
    #[arg(long, value_parser = shared::parse_tokens_usize)]
    pub max_context: Option<usize>,
    /// Stats as one JSON object on the last stdout line.
    #[arg(long)]
    pub json: bool,
    /// Write tensor `logits` [positions, vocab] f32: every prompt position, then each step.
    #[arg(long, conflicts_with = "endpoint")]
    pub logits_out: Option<PathBuf>,
    #[command(flatten)]
    pub endpoint: shared::EndpointArgs,
    /// With an assistant `--draft`: write tensor `logits` [drafted, vocab] f32, the assistant's
    /// logits for every token it drafted, in the order drafted.
    #[arg(long, conflicts_with = "endpoint")]
    pub draft_logits_out: Option<PathBuf>,
}

pub(super) fn read_prompt(args: &Args) -> Result<Option<String>> {
    if let Some(p) = &args.prompt {
        return Ok(Some(p.clone()));
    }
    match &args.prompt_file {
        Some(p) if p.as_os_str() == "-" => {
            let bytes =
                shared::read_limited(std::io::stdin(), shared::INPUT_LIMIT, "--prompt-file -")?;
            String::from_utf8(bytes)
                .map(Some)
                .map_err(|_| anyhow::anyhow!("--prompt-file -: the prompt on stdin is not UTF-8"))
        }
        Some(p) => shared::read_text_limited(
            p,
            shared::INPUT_LIMIT,
            &format!("--prompt-file {}", p.display()),
        )
        .map(Some),
        None => Ok(None),
    }
}

/// Fail before any work if `flag`'s file cannot be written.
fn check_output_path(flag: &str, path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        crate::usage!(
            "{flag} {}: folder {} does not exist",
            path.display(),
            parent.display()
        );
    }
    Ok(())
}

/// Write `rows` as tensor `logits` [positions, vocab] f32, whole (see [`write_whole`]).
fn write_logits(path: &Path, rows: &[Tensor]) -> Result<()> {
    let all = Tensor::cat(rows, 0)?.to_dtype(DType::F32)?;
    write_whole(path, |p| {
        all.save_safetensors("logits", p).map_err(Into::into)
    })
}

pub fn run(ctx: &Ctx, args: Args, out: &mut dyn Write) -> Result<()> {
    if args.endpoint.endpoint.is_some() {
        return super::remote::run(ctx, &args, out);
    }
    // 1. Everything that can be checked before loading anything.
    let precision = args.device.resolve(ctx)?;
    for (flag, p) in [
        ("--logits-out", &args.logits_out),
        ("--draft-logits-out", &args.draft_logits_out),
    ] {
        if let Some(p) = p {
            check_output_path(flag, p)?;
        }
    }
    if args.draft_logits_out.is_some() && args.draft.draft.is_none() {
        crate::usage!(
            "--draft-logits-out needs --draft with a drafter model (a Gemma 4 assistant, or mtp)"
        );
    }
    if args.max_context == Some(0) {
        crate::usage!("--max-context must be at least 1");
    }
    let text = read_prompt(&args)?;
    if text.is_none() && args.prompt_ids.is_none() {
        crate::usage!("no prompt\nhint: give --prompt TEXT, --prompt-file FILE (- for stdin) or --prompt-ids 1,2,3");
    }

    // 2. The spec first (only config.json), so a family that cannot run fails before any
    //    download; then every file, and the tokenizer.
    let (model_ref, spec, family) = shared::runnable_spec(ctx, &args.model)?;
    let draft = args.draft.build(
        ctx,
        &model_ref,
        &spec,
        &precision,
        args.draft_logits_out.is_some(),
    )?;
    if args.draft_logits_out.is_some()
        && draft
            .as_ref()
            .is_some_and(|d| d.drafter.drafted_logits().is_none())
    {
        crate::usage!(
            "--draft-logits-out: `--draft {}` is not a model, it has no logits",
            args.draft.draft.as_deref().unwrap_or("")
        );
    }
    let (files, tok) = shared::files_and_tokenizer(ctx, &model_ref)?;
    let prompt: Vec<u32> = match (&args.prompt_ids, &text) {
        (Some(ids), _) => ids.clone(),
        (None, Some(t)) => {
            if t.is_empty() {
                bail!("the prompt is empty: nothing to continue");
            }
            tok.encode(t, true)?
        }
        (None, None) => unreachable!("checked above"),
    };
    if let Some(bad) = prompt.iter().find(|&&id| id as usize >= spec.vocab_size) {
        match args.prompt_ids {
            Some(_) => bail!(
                "--prompt-ids: token id {bad} is outside the vocabulary ({} tokens)",
                spec.vocab_size
            ),
            None => bail!(
                "the tokenizer turned the prompt into token id {bad}, outside the model's vocabulary ({} tokens in config.json)\nhint: tokenizer.json does not belong to this model",
                spec.vocab_size
            ),
        }
    }
    let max_context = args.max_context.unwrap_or(spec.max_context);
    if prompt.len() > max_context {
        bail!(
            "the prompt has {} tokens but the context limit is {max_context}\nhint: shorten the prompt or raise --max-context (the model allows {})",
            prompt.len(),
            spec.max_context
        );
    }
    let settings = args.sampling.sampling(&tok.generation);
    settings.validate().map_err(|e| UsageError(e.to_string()))?;

    // 3. Weights and the network.
    let shared::Built {
        model,
        load_s,
        weights,
        quant_cache,
    } = shared::build_model_in(&files, family, ctx, &precision)?;

    // 4. Generate, streaming text and the panel.
    interrupt::install();
    let mut cache = model.new_cache();
    let mut sampler = Sampler::new(settings);
    let limits = Limits {
        max_new_tokens: args.sampling.max_new_tokens(&tok.generation),
        max_context,
        stop_ids: tok.eos_ids.clone(),
        all_prompt_logits: args.logits_out.is_some(),
    };
    let kv = shared::kv_dtype_of(precision.dtype);
    let at_max = budget::compute(&spec, max_context as u64, 1, kv)?;
    let show_panel = !ctx.quiet && !args.json && std::io::stderr().is_terminal();
    let mut live = LivePanel::new();
    // The text shares the panel's terminal: the panel follows where it ends.
    let text_on_terminal = std::io::stdout().is_terminal();
    let mut stderr = std::io::stderr();
    let mut decoder = tok.stream_decoder();
    let mut logits_rows: Vec<Tensor> = vec![];
    let mut tokens = prompt.len();
    let t0 = Instant::now();
    let keep_logits = args.logits_out.is_some();
    let (mut drafter, draft_tokens) = match draft {
        Some(d) => (Some(d.drafter), d.tokens),
        None => (None, 0),
    };
    let mut figures = drafter.as_ref().map(|d| panel::DraftFigures {
        name: d.name(),
        reads: d.reads_layers(),
        ..Default::default()
    });

    // A long prompt's prefill shows its progress (chunk by chunk) where the panel would be.
    let prefill_bar = (show_panel && prompt.len() > generate::PREFILL_CHUNK).then(|| {
        let bar =
            ProgressBar::with_draw_target(Some(prompt.len() as u64), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("prefill {bar:30} {pos}/{len} tokens · {per_sec} · {eta}")
        {
            bar.set_style(style);
        }
        bar
    });
    let mut on_event = |ev: Event| -> Result<bool> {
        let (piece, held) = match ev {
            Event::Prefilling { done, .. } => {
                if let Some(bar) = &prefill_bar {
                    bar.set_position(done as u64);
                }
                return Ok(!interrupt::requested());
            }
            Event::Prefilled { logits, cache } => {
                if let Some(bar) = &prefill_bar {
                    bar.finish_and_clear();
                }
                if keep_logits {
                    logits_rows.push(logits.clone());
                }
                (None, cache.bytes())
            }
            Event::Token { id, logits, cache } => {
                // One row per token fed: the first token was chosen from the prompt's last row,
                // which is already there.
                if keep_logits && tokens > prompt.len() {
                    logits_rows.push(logits.unsqueeze(0)?);
                }
                tokens += 1;
                let piece = if tok.eos_ids.contains(&id) {
                    None
                } else {
                    decoder.push(id)?
                };
                (piece, cache.bytes())
            }
            Event::Verified { drafted, accepted } => {
                if let Some(f) = figures.as_mut() {
                    f.verified(drafted, accepted);
                }
                return Ok(!interrupt::requested());
            }
        };
        if show_panel {
            live.erase(&mut stderr)?;
        }
        if let Some(text) = piece {
            if text_on_terminal {
                // No control bytes from the model reach the terminal.
                let text = panel::terminal_safe(&text);
                out.write_all(text.as_bytes())?;
                live.wrote(&text);
            } else {
                out.write_all(text.as_bytes())?;
            }
            out.flush()?;
        }
        if show_panel {
            let snap = Snapshot {
                spec: &spec,
                budget: &at_max,
                held: &held,
                measured: true,
                tokens,
                tok_s: tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
                draft: figures.as_ref(),
            };
            live.draw(&mut stderr, &panel::render(&snap))?;
        }
        Ok(!interrupt::requested())
    };
    let drafting = drafter.as_deref_mut().map(|drafter| generate::Drafting {
        drafter,
        tokens: draft_tokens,
    });
    let stats = generate::generate_with(
        model.as_ref(),
        &mut cache,
        &prompt,
        &mut sampler,
        &limits,
        drafting,
        &mut on_event,
    )?;
    if let Some(bar) = &prefill_bar {
        bar.finish_and_clear();
    }
    if let Some(rest) = decoder.finish()? {
        out.write_all(rest.as_bytes())?;
    }
    if show_panel {
        live.erase(&mut stderr)?;
        let held = cache.bytes();
        let snap = Snapshot {
            spec: &spec,
            budget: &at_max,
            held: &held,
            measured: true,
            tokens,
            tok_s: stats.decode_tok_s,
            draft: figures.as_ref(),
        };
        writeln!(out)?;
        out.flush()?;
        for l in panel::render(&snap) {
            eprintln!("{}", live.fit(&l));
        }
    } else {
        writeln!(out)?;
    }
    if let Some(p) = &args.logits_out {
        write_logits(p, &logits_rows)?;
    }
    if let (Some(p), Some(rows)) = (
        &args.draft_logits_out,
        drafter.as_ref().and_then(|d| d.drafted_logits()),
    ) {
        if rows.is_empty() {
            bail!("--draft-logits-out: the assistant drafted nothing (generation ended first)");
        }
        let rows: Vec<Tensor> = rows
            .iter()
            .map(|r| r.unsqueeze(0))
            .collect::<candle_core::Result<_>>()?;
        write_logits(p, &rows)?;
    }
    if !ctx.quiet {
        let drafter_name = drafter.as_ref().map(|d| d.name());
        eprintln!(
            "{}",
            summary(&stats, &at_max, &weights, load_s, drafter_name.as_deref())
        );
    }
    if args.json {
        let mut v = serde_json::to_value(&stats)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("model".into(), model_ref.display_name().into());
            o.insert(
                "kv_bytes_per_layer".into(),
                serde_json::json!(cache.bytes()),
            );
            o.insert("load_s".into(), load_s.into());
            o.insert("quant_cache".into(), quant_cache.into());
            o.insert("dtype".into(), weights.clone().into());
            o.insert(
                "kernels".into(),
                crate::kernels::path_name(&precision.device).into(),
            );
        }
        writeln!(out, "{}", serde_json::to_string(&v)?)?;
    }
    if stats.stop == Some(generate::StopReason::Interrupted) {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// The one-line summary on stderr; with a drafter, what it drafted and the target accepted.
fn summary(
    s: &Stats,
    at_max: &budget::Budget,
    weights: &str,
    load_s: f64,
    drafter: Option<&str>,
) -> String {
    let draft = drafter
        .map(|name| {
            format!(
                " · draft {name}: {} of {} accepted ({:.0} %), {} target steps",
                s.accepted_tokens,
                s.draft_tokens,
                100.0 * s.acceptance_rate,
                s.target_steps
            )
        })
        .unwrap_or_default();
    format!(
        "{} prompt{} + {} generated tokens{} · TTFT {:.0} ms · prefill {:.1} tok/s · decode {:.1} tok/s{draft} · KV {} (budget {} at {}) · {weights} weights · load {:.1} s{}",
        s.prompt_tokens,
        if s.prefilled_tokens < s.prompt_tokens {
            format!(" ({} fed)", s.prefilled_tokens)
        } else {
            String::new()
        },
        s.generated_tokens,
        match s.stop {
            Some(generate::StopReason::EndOfSequence) => " (end of sequence)",
            Some(generate::StopReason::MaxTokens) => " (the -n limit)",
            Some(generate::StopReason::ContextFull) => " (the context is full)",
            Some(generate::StopReason::Interrupted) => " (interrupted)",
            None => "",
        },
        s.ttft_ms,
        s.prefill_tok_s,
        s.decode_tok_s,
        units::bytes(s.kv_bytes),
        units::bytes(at_max.total_bytes),
        units::context(at_max.context),
        load_s,
        s.peak_rss_bytes
            .map(|b| format!(" · peak RSS {}", units::bytes(b)))
            .unwrap_or_default()
    )
}
