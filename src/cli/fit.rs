//! `kv-budget --fit`: the plan for serving each model with vLLM or SGLang on `--gpu`, as a table
//! (or `--json`), with every assumption and where engines' own KV accounting differs from the
//! exact one as footnotes. The arithmetic is `arch::fit`'s; this file holds the flags and the
//! words.

use super::inspect::group_digits;
use crate::arch::budget::KvDtype;
use crate::arch::fit::{self, Cluster, Engine, Plan, Request, Weights, WeightsArg};
use crate::arch::ArchSpec;
use crate::report::{self, units};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::io::Write;

/// The flags of `--fit`.
#[derive(Debug, Clone, clap::Args)]
pub struct FitArgs {
    /// GPUs for --fit: NAME[:N[xNODES]] (`h200:8`, `a100-80g:4x2` = 4 per node × 2 nodes) or a
    /// memory size (`96GiB:4`, `80GB`). Names: h100 (h100-80g), h100-nvl, h200, b200, a100-40g,
    /// a100-80g, l40s, l4, rtx4090, rtx5090, rtx6000-ada, mi300x, mi325x, with the memory the
    /// driver reports (AMD: nominal).
    #[arg(long, requires = "fit", value_parser = Cluster::parse)]
    pub gpu: Option<Cluster>,
    /// The engine whose plan --fit makes.
    #[arg(long, requires = "fit", value_enum, default_value = "vllm")]
    pub engine: Engine,
    /// The format the engine holds the weights in (--fit). Embedding tables and the output head
    /// stay bf16 in the quantized formats.
    #[arg(long, requires = "fit", value_enum, default_value = "as-shipped")]
    pub weights: WeightsArg,
    /// Pin the tensor-parallel size (--fit); default: the largest the model and a node take.
    #[arg(long, requires = "fit", value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub tp: Option<u64>,
    /// Pin the pipeline-parallel size (--fit); default: the GPUs TP leaves.
    #[arg(long, requires = "fit", value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub pp: Option<u64>,
    /// The engine's share of each GPU (--fit): vLLM's --gpu-memory-utilization (default 0.9),
    /// SGLang's --mem-fraction-static (default 0.85 here; SGLang picks its own at start).
    #[arg(long, requires = "fit", value_parser = parse_fraction)]
    pub mem_fraction: Option<f64>,
    /// Activation headroom per GPU (--fit): a size such as 2GiB or 500MB.
    #[arg(long, requires = "fit", default_value = "2GiB", value_parser = parse_size)]
    pub headroom: u64,
}

fn parse_fraction(s: &str) -> std::result::Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|f| *f > 0.0 && *f <= 1.0)
        .ok_or_else(|| format!("`{s}` is not a fraction between 0 and 1 (e.g. 0.9)"))
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    fit::memory_size(s).map_err(|why| format!("`{s}` is {why}"))
}

/// One model to plan: its name, its table and its `config.json`.
pub struct Model<'a> {
    pub name: &'a str,
    pub repo: Option<&'a str>,
    pub spec: &'a ArchSpec,
    pub raw: &'a Value,
}

/// The pinned split, checked against the GPUs given: `None` to search.
fn pinned(args: &FitArgs, cluster: &Cluster) -> Result<Option<(u64, u64)>> {
    let gpus = cluster.gpus();
    let (tp, pp) = match (args.tp, args.pp) {
        (None, None) => return Ok(None),
        (Some(tp), Some(pp)) => (tp, pp),
        (Some(tp), None) => (tp, gpus / tp.max(1)),
        (None, Some(pp)) => (gpus / pp.max(1), pp),
    };
    if tp.checked_mul(pp) != Some(gpus) {
        crate::usage!(
            "--tp {} × --pp {} does not use the {gpus} GPUs of --gpu {}\nhint: TP × PP must equal the GPUs (per node × nodes)",
            args.tp.map_or(tp.to_string(), |t| t.to_string()),
            args.pp.map_or(pp.to_string(), |p| p.to_string()),
            cluster.gpu
        );
    }
    if tp > cluster.per_node {
        crate::usage!(
            "--tp {tp} is more than the {} GPUs of one node\nhint: tensor parallel stays inside a node; give PP across nodes (--pp)",
            cluster.per_node
        );
    }
    Ok(Some((tp, pp)))
}

/// Plan every model at every context; print the table and footnotes, or the JSON array.
pub fn run(
    models: &[Model],
    contexts: &[u64],
    batch: u64,
    kv: KvDtype,
    args: &FitArgs,
    json: bool,
    out: &mut dyn Write,
) -> Result<()> {
    let Some(cluster) = args.gpu.clone() else {
        crate::usage!("--fit needs --gpu, e.g. --gpu h200:8");
    };
    let split = pinned(args, &cluster)?;
    let mut rows: Vec<(&Model, Request, Plan)> = vec![];
    for m in models {
        if let Some((tp, pp)) = split {
            // A pinned split the model cannot take: the flags are wrong for it.
            if let Err(why) = fit::check_split(m.spec, tp, pp) {
                crate::usage!(
                    "--tp {tp} --pp {pp}: {}: {why}\nhint: leave out --tp and --pp, and llmarch picks a split the model takes",
                    m.name
                );
            }
        }
        let weights =
            Weights::of(args.weights, m.spec, m.raw).with_context(|| m.name.to_string())?;
        for &context in contexts {
            let req = Request {
                cluster: cluster.clone(),
                engine: args.engine,
                weights: weights.clone(),
                kv,
                context,
                batch,
                fraction_ppm: args
                    .mem_fraction
                    .map_or(args.engine.default_fraction_ppm(), |f| {
                        (f * 1e6).round() as u64
                    }),
                headroom: args.headroom,
                split,
            };
            let plan = fit::plan(m.spec, &req)
                .with_context(|| format!("{} on {} × {}", m.name, cluster.gpus(), cluster.gpu))?;
            rows.push((m, req, plan));
        }
    }
    if json {
        let v: Vec<Value> = rows.iter().map(|(m, r, p)| plan_json(m, r, p)).collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    write_text(&rows, &cluster, out)
}

/// Which way the split goes, in a few words: `TP 8 · EP 8`, `TP 4 × PP 2`.
fn split_label(p: &Plan) -> String {
    let s = &p.split;
    let mut label = format!("TP {}", s.tp);
    if s.pp > 1 {
        label.push_str(&format!(" × PP {}", s.pp));
    }
    if let Some(ep) = s.ep {
        label.push_str(&format!(" · EP {ep}"));
    }
    label
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Where engines and estimators count the KV cache differently from the exact figure.
fn accounting_notes(m: &Model, r: &Request, p: &Plan) -> Vec<String> {
    let g = &p.per_gpu;
    let mut notes = vec![];
    if g.kv != g.kv_exact {
        notes.push(format!(
            "{} reserves {} per GPU where the cache holds exactly {} (kv-budget's figure, per rank): whole pages, states at their largest",
            r.engine.name(),
            units::bytes(g.kv),
            units::bytes(g.kv_exact)
        ));
    }
    if g.kv_blind as f64 > g.kv_exact as f64 * 1.05 {
        let who = if m.spec.family == "gemma4" {
            "vLLM before v0.21 counted every Gemma 4 layer as global and unshared, as do estimators that ignore sliding windows, K=V and KV sharing"
        } else {
            "estimators that ignore sliding windows, compression, K=V and KV sharing count every layer full-length with its own K and V"
        };
        notes.push(format!(
            "{who}: {} per GPU, {:.1}× the exact figure",
            units::bytes(g.kv_blind),
            g.kv_blind as f64 / g.kv_exact.max(1) as f64
        ));
    }
    notes
}

fn plan_json(m: &Model, r: &Request, p: &Plan) -> Value {
    json!({
        "model": m.name,
        "repo": m.repo,
        "family": m.spec.family,
        "engine": r.engine,
        "context": r.context,
        "batch": r.batch,
        "kv_dtype": r.kv.name(),
        "gpus": {
            "name": r.cluster.gpu,
            "memory_bytes": r.cluster.memory,
            "per_node": r.cluster.per_node,
            "nodes": r.cluster.nodes,
        },
        "weights": {"format": r.weights.label, "total_bytes": p.weights_total},
        "fits": p.fits,
        "split": p.split,
        "tightest_stage": p.tightest_stage,
        "per_gpu": p.per_gpu,
        "max_context": p.max_context,
        "max_batch": p.max_batch,
        "refused_splits": p.refused,
        "assumptions": assumptions(r),
        "accounting_notes": accounting_notes(m, r, p),
    })
}

fn write_text(rows: &[(&Model, Request, Plan)], c: &Cluster, out: &mut dyn Write) -> Result<()> {
    let Some((_, first, _)) = rows.first() else {
        return Ok(());
    };
    writeln!(
        out,
        "Fit on {} × {} ({} = {} B each; {} per node × {} node{}) · {} · KV {} · batch {}",
        c.gpus(),
        c.gpu,
        gib(c.memory),
        group_digits(c.memory),
        c.per_node,
        c.nodes,
        if c.nodes == 1 { "" } else { "s" },
        first.engine.name(),
        first.kv.name(),
        first.batch
    )?;
    let mut t = report::table(&[
        "model",
        "context",
        "split",
        "usable/GPU",
        "weights/GPU",
        "KV/GPU",
        "headroom",
        "free",
        "fits",
        "max context",
        "max batch",
    ]);
    for (m, r, p) in rows {
        let g = &p.per_gpu;
        t.add_row(vec![
            m.name.to_string(),
            if r.context > m.spec.max_context as u64 {
                format!("{} (>max)", units::context(r.context))
            } else {
                units::context(r.context)
            },
            split_label(p),
            units::bytes(g.usable),
            units::bytes(g.weights),
            units::bytes(g.kv),
            units::bytes(g.headroom),
            units::signed_bytes(g.free),
            if p.fits { "yes" } else { "NO" }.to_string(),
            match p.max_context {
                0 => "none".into(),
                n if n == m.spec.max_context as u64 => format!("{} (all)", units::context(n)),
                n => units::context(n),
            },
            p.max_batch.to_string(),
        ]);
    }
    report::align_right(&mut t, &[3, 4, 5, 6, 7, 9, 10]);
    writeln!(out, "{t}")?;
    writeln!(
        out,
        "max context: at batch {}; max batch: at the context of the row. free: usable − weights − KV{}.",
        first.batch,
        if first.engine == Engine::Vllm { " − headroom" } else { "" }
    )?;
    let mut seen: Vec<&str> = vec![];
    for (m, r, p) in rows {
        if seen.contains(&m.name) {
            continue;
        }
        seen.push(m.name);
        let s = &p.split;
        let mut facts = vec![format!(
            "weights {} in all ({})",
            units::bytes(p.weights_total),
            r.weights.label
        )];
        if let Some(e) = s.experts_per_gpu {
            facts.push(format!("{e} routed experts per GPU"));
        }
        if s.pp > 1 {
            let stages: Vec<String> = s
                .stages
                .iter()
                .map(|[a, b]| format!("{a}-{}", b - 1))
                .collect();
            facts.push(format!(
                "stages: layers {} (stage {} is the tightest)",
                stages.join(", "),
                p.tightest_stage
            ));
        }
        if s.replicated_kv_layers > 0 {
            facts.push(format!(
                "{} layer{} with fewer KV heads than TP {}: one head per rank, replicated",
                s.replicated_kv_layers,
                if s.replicated_kv_layers == 1 { "" } else { "s" },
                s.tp
            ));
        }
        writeln!(out, "{}: {}", m.name, facts.join(" · "))?;
        for why in &p.refused {
            writeln!(out, "  not possible: {why}")?;
        }
    }
    let notes: Vec<String> = rows
        .iter()
        .flat_map(|(m, r, p)| {
            accounting_notes(m, r, p)
                .into_iter()
                .map(move |n| format!("  {} @ {}: {n}", m.name, units::context(r.context)))
        })
        .collect();
    if !notes.is_empty() {
        writeln!(out, "KV accounting:")?;
        for n in notes {
            writeln!(out, "{n}")?;
        }
    }
    writeln!(out, "assumptions ({}):", first.engine.name())?;
    for a in assumptions(first) {
        writeln!(out, "  - {a}")?;
    }
    Ok(())
}
/// What the plan assumes, one line each, for the footnotes and `--json`.
pub fn assumptions(req: &Request) -> Vec<String> {
    let e = req.engine;
    let fraction = req.fraction_ppm as f64 / 1e6;
    let share = match e {
        Engine::Vllm => format!(
            "vLLM takes gpu_memory_utilization = {fraction:.2} of each GPU (its default 0.90) for weights, activations and the KV cache"
        ),
        Engine::Sglang => format!(
            "SGLang takes mem_fraction_static = {fraction:.2} of each GPU for weights and the KV cache (it picks its default from the GPU's memory and TP size at start; 0.85 assumed: --mem-fraction sets yours)"
        ),
    };
    let headroom = match e {
        Engine::Vllm => format!(
            "activation headroom {} per GPU out of that share (vLLM's profile run of one max_num_batched_tokens chunk, CUDA graphs, the sampler): --headroom",
            units::bytes(req.headroom)
        ),
        Engine::Sglang => format!(
            "activations, CUDA graphs and the sampler live in what the static fraction leaves ({} headroom wanted: --headroom)",
            units::bytes(req.headroom)
        ),
    };
    let page = match e.page_tokens() {
        1 => "KV pages of 1 token (SGLang's default page_size): no rounding".to_string(),
        n => format!(
            "KV pages of {n} tokens (vLLM's block_size): each sequence rounded up to whole pages"
        ),
    };
    vec![
        share,
        headroom,
        page,
        "fixed-size states (DeltaNet, convolution, open compression windows) reserved at their largest".into(),
        "TP inside a node: a power of two dividing the GPUs per node and every layer's query heads; KV heads split when TP ≤ KV heads, else replicated one per rank (both engines; DeepSeek V4's single KV head is on every rank unless SGLang's --enable-dp-attention); DeltaNet heads split, never replicated".into(),
        "PP across nodes: stages cut as vLLM's get_pp_indices does; layer weights counted equal (body ÷ layers); embedding on the first stage, output head on the last (a tied one copied there when PP > 1); the tightest stage counts".into(),
        "EP = TP for MoE (--enable-expert-parallel): routed experts divided over the ranks, the same bytes per GPU as TP-sharded experts".into(),
        format!(
            "weights {}; norms and routers, replicated on every rank, counted split (under 0.1 %); MTP layers not loaded",
            req.weights.label
        ),
        "one replica over all the GPUs (no data parallel)".into(),
    ]
}
