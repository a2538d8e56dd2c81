//! `llmarch kv-budget [MODEL...]`: what the KV cache holds at each context length, against the
//! naive cache, with what each trick saves and the attention budget per layer.

use super::inspect::group_digits;
use super::Ctx;
use crate::arch::budget::{self, Budget, KvDtype};
use crate::arch::{ArchSpec, PartDtype, Retention};
use crate::loader::{self, aliases::ALIASES, ModelRef};
use crate::report::{self, units};
use anyhow::{Context, Result};
use serde_json::json;
use std::io::Write;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Models to compare (aliases, Hub repo ids, local directories); none: every alias.
    pub models: Vec<String>,
    /// Context lengths: a comma-separated list of numbers with an optional k/m suffix
    /// (binary: 128k = 131072, 1m = 1048576).
    #[arg(short, long, default_value = "4k,32k,128k", value_parser = parse_contexts)]
    pub context: Contexts,
    /// Element type of the cached keys and values. States that the config keeps in f32 stay f32.
    #[arg(long, value_enum, default_value = "bf16")]
    pub kv_dtype: KvDtype,
    /// Sequences cached at once (1 to 1048576).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=MAX_BATCH))]
    pub batch: u64,
    /// One row per layer (identical neighbours folded) with bytes and attention FLOPs.
    #[arg(long)]
    pub per_layer: bool,
    /// Show the formula with the numbers filled in, for one layer of each kind.
    #[arg(long)]
    pub explain: bool,
    /// Machine-readable output on stdout: an array, one object per model and context.
    #[arg(long)]
    pub json: bool,
    /// Plan serving on --gpu with vLLM or SGLang: whether each model fits at each context ×
    /// --batch, with which split (tensor, pipeline, expert parallel), weights, KV and headroom
    /// per GPU, and the largest context and batch that fit.
    ///
    /// The engine model: the engine's share of each GPU (vLLM gpu_memory_utilization 0.9;
    /// SGLang mem_fraction_static, 0.85 assumed), minus the weights per GPU, minus the
    /// activation headroom (inside vLLM's share), is what the KV cache may take. TP stays in a
    /// node, is a power of two and divides every layer's query heads; KV heads are split when
    /// TP ≤ KV heads, else replicated one per rank (DeepSeek V4's single KV head is on every
    /// rank); DeltaNet heads are split, never replicated. PP cuts layers across nodes as vLLM's
    /// get_pp_indices does; EP = TP for MoE. vLLM rounds each sequence up to 16-token pages;
    /// fixed-size states are reserved at their largest. Every assumption is printed under the
    /// table and in --json.
    #[arg(long, requires = "gpu", conflicts_with_all = ["per_layer", "explain"])]
    pub fit: bool,
    #[command(flatten)]
    pub fit_args: super::fit::FitArgs,
    /// With one model: a drafter for it (`ngram`, or a Gemma 4 assistant: alias, Hub repo or
    /// folder); its own KV (none: it reads the target's) is added to each figure.
    #[arg(long, value_name = "DRAFTER")]
    pub draft: Option<String>,
}

/// The most sequences `--batch` takes.
pub use budget::MAX_BATCH;

/// Parsed `--context` list.
#[derive(Debug, Clone)]
pub struct Contexts(pub Vec<u64>);

/// `4k,32k,128k,1m` or plain numbers → token counts (see [`super::shared::parse_tokens`]).
pub fn parse_contexts(s: &str) -> std::result::Result<Contexts, String> {
    s.split(',')
        .map(super::shared::parse_tokens)
        .collect::<std::result::Result<_, _>>()
        .map(Contexts)
}

struct Entry {
    name: String,
    repo: Option<String>,
    spec: ArchSpec,
    /// Its `config.json` (how the checkpoint is quantized, for `--fit`).
    raw: serde_json::Value,
}

pub fn run(ctx: &Ctx, args: Args, out: &mut dyn Write) -> Result<()> {
    let names: Vec<String> = if args.models.is_empty() {
        ALIASES.iter().map(|a| a.name.to_string()).collect()
    } else {
        args.models.clone()
    };
    let mut entries = vec![];
    for name in &names {
        let (model, spec, raw) = loader::load_spec_and_config(name, &ctx.parse, ctx.progress())?;
        for w in &spec.warnings {
            ctx.warn(&format!("{}: {w}", model.display_name()));
        }
        let repo = match &model {
            ModelRef::Alias(a) => Some(a.repo.to_string()),
            ModelRef::Repo { id, .. } => Some(id.clone()),
            ModelRef::Local(_) => None,
        };
        entries.push(Entry {
            name: model.display_name(),
            repo,
            spec,
            raw,
        });
    }
    if args.fit {
        let models: Vec<super::fit::Model> = entries
            .iter()
            .map(|e| super::fit::Model {
                name: &e.name,
                repo: e.repo.as_deref(),
                spec: &e.spec,
                raw: &e.raw,
            })
            .collect();
        return super::fit::run(
            &models,
            &args.context.0,
            args.batch,
            args.kv_dtype,
            &args.fit_args,
            args.json,
            out,
        );
    }
    let draft = match &args.draft {
        Some(d) if entries.len() == 1 => Some(super::draft::describe(
            ctx,
            d,
            &entries[0].spec,
            &entries[0].raw,
        )?),
        Some(d) => crate::usage!("--draft {d} goes with one model ({} given)", entries.len()),
        None => None,
    };
    let mut budgets: Vec<(usize, Budget)> = vec![];
    for (i, e) in entries.iter().enumerate() {
        for &c in &args.context.0 {
            let b = budget::compute(&e.spec, c, args.batch, args.kv_dtype)
                .with_context(|| format!("{} at {}", e.name, units::context(c)))?;
            budgets.push((i, b));
        }
    }
    if args.json {
        let v: Vec<_> = budgets
            .iter()
            .map(|(i, b)| {
                let mut v = budget_json(&entries[*i], b);
                if let (Some(d), Some(o)) = (&draft, v.as_object_mut()) {
                    o.insert("draft".into(), d.json());
                }
                v
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    write_summary(&entries, &budgets, &args, out)?;
    if let Some(d) = &draft {
        writeln!(out, "{}", d.line())?;
    }
    if args.per_layer {
        for (i, b) in &budgets {
            write_per_layer(&entries[*i], b, out)?;
        }
    }
    if args.explain {
        // At the last context given: its budget is the last one of each model.
        for (i, e) in entries.iter().enumerate() {
            if let Some((_, b)) = budgets.iter().rev().find(|(j, _)| *j == i) {
                write_explain(e, b, out)?;
            }
        }
    }
    Ok(())
}

fn budget_json(e: &Entry, b: &Budget) -> serde_json::Value {
    let savings: serde_json::Map<String, serde_json::Value> = b
        .savings
        .iter()
        .map(|s| (format!("{:?}", s.trick).to_lowercase(), json!(s.bytes)))
        .collect();
    json!({
        "model": e.name,
        "repo": e.repo,
        "family": e.spec.family,
        "context": b.context,
        "beyond_max_context": b.context > e.spec.max_context as u64,
        "kv_dtype": b.kv_dtype.name(),
        "batch": b.batch,
        "total_bytes": b.total_bytes,
        "naive_bytes": b.naive_bytes,
        "savings": savings,
        "savings_by_trick": b.savings,
        "attention_flops_per_token": b.attention_flops,
        "layers": b.layers,
    })
}

fn write_summary(
    entries: &[Entry],
    budgets: &[(usize, Budget)],
    args: &Args,
    out: &mut dyn Write,
) -> Result<()> {
    writeln!(
        out,
        "KV cache at {} per element{}, batch {}",
        args.kv_dtype.name(),
        match args.kv_dtype {
            KvDtype::Q8_0 => " (34-byte blocks of 32)",
            KvDtype::Q4_0 => " (18-byte blocks of 32)",
            _ => "",
        },
        args.batch
    )?;
    let max = budgets
        .iter()
        .map(|(_, b)| b.total_bytes)
        .max()
        .unwrap_or(0) as f64;
    let mut t = report::table(&[
        "model",
        "context",
        "KV cache",
        "",
        "naive",
        "saved",
        "attn FLOPs/token",
    ]);
    for (i, b) in budgets {
        let e = &entries[*i];
        let saved = b.naive_bytes.saturating_sub(b.total_bytes);
        let pct = if b.naive_bytes > 0 {
            100.0 * saved as f64 / b.naive_bytes as f64
        } else {
            0.0
        };
        let mut ctx_label = units::context(b.context);
        if b.context > e.spec.max_context as u64 {
            ctx_label.push_str(" (>max)");
        }
        t.add_row(vec![
            e.name.clone(),
            ctx_label,
            units::bytes(b.total_bytes),
            report::bar(b.total_bytes as f64, max, 20),
            units::bytes(b.naive_bytes),
            format!("{pct:.1}%"),
            units::flops(b.attention_flops),
        ]);
    }
    report::align_right(&mut t, &[2, 4, 5, 6]);
    writeln!(out, "{t}")?;
    writeln!(
        out,
        "naive: every layer caches full-length K and V for all its query heads."
    )?;
    writeln!(
        out,
        "saved, trick by trick (each credited with what it removes, in this order):"
    )?;
    for (i, b) in budgets {
        let e = &entries[*i];
        let items: Vec<String> = b
            .savings
            .iter()
            .map(|s| format!("{} {}", s.label, units::signed_bytes(s.bytes)))
            .collect();
        writeln!(
            out,
            "  {} @ {}: {}",
            e.name,
            units::context(b.context),
            if items.is_empty() {
                "none".into()
            } else {
                items.join(" · ")
            }
        )?;
    }
    let beyond: Vec<String> = entries
        .iter()
        .filter(|e| {
            args.context
                .0
                .iter()
                .any(|&c| c > e.spec.max_context as u64)
        })
        .map(|e| format!("{} ({})", e.name, units::context(e.spec.max_context as u64)))
        .collect();
    if !beyond.is_empty() {
        writeln!(
            out,
            "(>max): beyond the model's context length: {}",
            beyond.join(", ")
        )?;
    }
    Ok(())
}

fn write_per_layer(e: &Entry, b: &Budget, out: &mut dyn Write) -> Result<()> {
    writeln!(
        out,
        "\n{} @ {} tokens ({}), {} per element",
        e.name,
        group_digits(b.context),
        units::context(b.context),
        b.kv_dtype.name()
    )?;
    let rows = b
        .layers
        .iter()
        .map(|l| {
            let holds = if let Some(src) = l.kv_source {
                format!("reads L{src}")
            } else {
                l.parts
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(" + ")
            };
            (
                l.index,
                vec![
                    l.attention.clone(),
                    format!("{:.3}", l.q_per_kv)
                        .trim_end_matches('0')
                        .trim_end_matches('.')
                        .to_string(),
                    holds,
                    units::bytes(l.bytes),
                    units::bytes(l.naive_bytes),
                    units::flops(l.attention_flops),
                ],
            )
        })
        .collect();
    let mut t = report::table(&[
        "layers",
        "attention",
        "q per kv",
        "holds",
        "bytes/layer",
        "naive/layer",
        "attn FLOPs/token/layer",
    ]);
    for (label, cells) in report::fold_rows(rows) {
        let mut row = vec![label];
        row.extend(cells);
        t.add_row(row);
    }
    report::align_right(&mut t, &[2, 4, 5, 6]);
    writeln!(out, "{t}")?;
    writeln!(
        out,
        "total {} ({} B) · naive {} · attention {} per token",
        units::bytes(b.total_bytes),
        group_digits(b.total_bytes),
        units::bytes(b.naive_bytes),
        units::flops(b.attention_flops)
    )?;
    Ok(())
}

fn write_explain(e: &Entry, b: &Budget, out: &mut dyn Write) -> Result<()> {
    let (context, batch, kv) = (b.context, b.batch, b.kv_dtype);
    writeln!(
        out,
        "\n{}: how the bytes are computed at {} tokens, batch {batch}, {} ({} B/element{})",
        e.name,
        group_digits(context),
        kv.name(),
        match kv {
            KvDtype::F32 => "4",
            KvDtype::Bf16 | KvDtype::F16 => "2",
            KvDtype::Q8_0 => "34/32",
            KvDtype::Q4_0 => "18/32",
        },
        if matches!(kv, KvDtype::Q8_0 | KvDtype::Q4_0) {
            ", whole blocks"
        } else {
            ""
        }
    )?;
    let mut seen: Vec<String> = vec![];
    for l in &e.spec.layers {
        let kind = format!(
            "{}{}",
            l.attention.label(),
            if l.kv_source.is_some() { " shared" } else { "" }
        );
        if seen.contains(&kind) {
            continue;
        }
        seen.push(kind.clone());
        writeln!(out, "  layer {} ({kind}):", l.index)?;
        if let Some(src) = l.kv_source {
            writeln!(out, "    reads layer {src}'s cache = 0 B of its own")?;
        }
        let lb = &b.layers[l.index];
        for (p, (_, bytes)) in l.cache.iter().zip(&lb.parts) {
            let entries = match p.retention {
                Retention::AllTokens => format!("{context} tokens"),
                Retention::Window { window } => format!("min({context}, {window}) tokens"),
                Retention::Compressed { ratio } => format!("⌊{context} / {ratio}⌋ entries"),
                Retention::Fixed { entries } => format!("{entries} (fixed)"),
                Retention::Remainder { ratio } => format!("({context} mod {ratio}) open tokens"),
                Retention::LastBlock { ratio } => format!("{ratio} (last closed block)"),
            };
            let dtype = match p.dtype {
                PartDtype::Kv => kv.name().to_string(),
                PartDtype::F32 => "f32 (state)".to_string(),
            };
            writeln!(
                out,
                "    {:<14} {entries} × {} elems × {batch} × {dtype} = {} B",
                p.name,
                p.elems_per_entry,
                group_digits(*bytes)
            )?;
        }
        writeln!(
            out,
            "    naive          {context} tokens × {} q heads × ({} + {}) dims × {batch} × {} = {} B",
            l.q_heads,
            l.head_dim,
            l.v_head_dim,
            kv.name(),
            group_digits(lb.naive_bytes)
        )?;
        writeln!(
            out,
            "    attention      {} q heads / {} kv heads = {:.2} per KV head; {} FLOPs per token",
            l.q_heads,
            l.kv_heads,
            l.group_size(),
            group_digits(lb.attention_flops)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts() {
        assert_eq!(
            parse_contexts("4k,32K,128k,1m").unwrap().0,
            [4096, 32768, 131072, 1 << 20]
        );
        assert_eq!(parse_contexts("1000").unwrap().0, [1000]);
        assert!(parse_contexts("12q").is_err());
        assert!(parse_contexts("0").is_err());
        assert!(parse_contexts("").is_err());
        assert!(parse_contexts("99999999999999999999m").is_err());
    }
}
