//! `llmarch inspect <MODEL>`: model-wide facts, parameter counts and the per-layer table, folded
//! into ranges of identical consecutive layers.

use super::Ctx;
use crate::arch::{ArchSpec, LayerSpec, Retention};
use crate::loader::{self, ModelRef};
use crate::report::{self, units};
use anyhow::Result;
use serde_json::json;
use std::io::Write;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// An alias (`llmarch models`), a Hub repo id `org/name[@revision]`, or a local directory.
    pub model: String,
    /// Machine-readable output on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also describe a drafter for this model (`ngram`, or a Gemma 4 assistant: alias, Hub repo
    /// or folder): what it reads of the target's cache, and its own KV (none).
    #[arg(long, value_name = "DRAFTER")]
    pub draft: Option<String>,
}

pub fn run(ctx: &Ctx, args: Args, out: &mut dyn Write) -> Result<()> {
    let (model, spec) = loader::load_spec(&args.model, &ctx.parse, ctx.progress())?;
    for w in &spec.warnings {
        ctx.warn(w);
    }
    let draft = match &args.draft {
        Some(d) => {
            let raw = loader::load_config_json(&model, ctx.progress())?;
            Some(super::draft::describe(ctx, d, &spec, &raw)?)
        }
        None => None,
    };
    if args.json {
        let mut v = to_json(&model, &spec);
        if let (Some(d), Some(o)) = (&draft, v.as_object_mut()) {
            o.insert("draft".into(), d.json());
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    write_text(&model, &spec, out)?;
    if let Some(d) = draft {
        writeln!(out, "{}", d.line())?;
    }
    Ok(())
}

fn repo_of(model: &ModelRef) -> Option<String> {
    match model {
        ModelRef::Alias(a) => Some(a.repo.to_string()),
        ModelRef::Repo { id, .. } => Some(id.clone()),
        ModelRef::Local(_) => None,
    }
}

pub fn to_json(model: &ModelRef, spec: &ArchSpec) -> serde_json::Value {
    let mut v = serde_json::to_value(spec).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        obj.insert("model".into(), json!(model.display_name()));
        obj.insert("repo".into(), json!(repo_of(model)));
        obj.insert("num_layers".into(), json!(spec.layers.len()));
    }
    v
}

/// `proportional θ1M rot 128 ×8`: kind, base, rotated dimensions, scaling factor.
fn rope_label(r: &crate::arch::Rope) -> String {
    let mut s = format!(
        "{} θ{} rot {}",
        r.kind,
        units::compact_number(r.theta),
        r.rotary_dim
    );
    if let Some(f) = r.factor {
        s.push_str(&format!(" ×{f}"));
    }
    s
}

/// The per-layer cells, everything but the index (used for folding and for `chat /layers`).
pub fn layer_cells(l: &LayerSpec) -> Vec<String> {
    let heads = format!("{}q/{}kv", l.q_heads, l.kv_heads);
    let dims = if l.head_dim == l.v_head_dim {
        format!("{}d", l.head_dim)
    } else {
        format!("{}d/{}d", l.head_dim, l.v_head_dim)
    };
    let kv = match (l.kv_source, l.k_eq_v) {
        (Some(src), _) => format!("→ L{src}"),
        (None, true) => "own, K=V".into(),
        (None, false) if l.cache.is_empty() => "none".into(),
        (None, false) => "own".into(),
    };
    // Elements per cached token for parts that grow with the context (a window counts as
    // growing), and the bounded states (convolution, recurrent, compressor carry) at most.
    let grows = |p: &&crate::arch::CachePart| {
        matches!(
            p.retention,
            Retention::AllTokens | Retention::Window { .. } | Retention::Compressed { .. }
        )
    };
    let per_token: u64 = l
        .cache
        .iter()
        .filter(grows)
        .map(|p| p.elems_per_entry)
        .sum();
    let state: u64 = l
        .cache
        .iter()
        .filter(|p| !grows(p))
        .filter_map(|p| p.retention.bound().map(|b| b as u64 * p.elems_per_entry))
        .sum();
    let mut holds = vec![];
    if per_token > 0 {
        holds.push(format!("{per_token}/tok"));
    }
    if state > 0 {
        holds.push(format!("≤{state} state"));
    }
    vec![
        l.attention.label(),
        heads,
        dims,
        kv,
        if holds.is_empty() {
            "-".into()
        } else {
            holds.join(" + ")
        },
        l.rope.as_ref().map_or("-".into(), rope_label),
        l.ffn.label(),
        l.ple_width.map_or("-".into(), |w| w.to_string()),
        l.notes.join(", "),
    ]
}

pub const LAYER_HEADER: [&str; 10] = [
    "layers",
    "attention",
    "heads",
    "head dim",
    "KV",
    "cache elems",
    "RoPE",
    "FFN",
    "PLE",
    "notes",
];

/// The folded per-layer table; columns empty for every layer (no PLE, no notes) are left out.
pub fn layer_table(spec: &ArchSpec) -> comfy_table::Table {
    let rows: Vec<(usize, Vec<String>)> = spec
        .layers
        .iter()
        .map(|l| (l.index, layer_cells(l)))
        .collect();
    let keep: Vec<bool> = (0..LAYER_HEADER.len() - 1)
        .map(|c| {
            rows.iter()
                .any(|(_, cells)| !matches!(cells[c].as_str(), "" | "-"))
        })
        .collect();
    let pick = |cells: Vec<String>| -> Vec<String> {
        cells
            .into_iter()
            .zip(&keep)
            .filter_map(|(c, k)| k.then_some(c))
            .collect()
    };
    let header: Vec<&str> = std::iter::once(LAYER_HEADER[0])
        .chain(
            LAYER_HEADER[1..]
                .iter()
                .zip(&keep)
                .filter_map(|(h, k)| k.then_some(*h)),
        )
        .collect();
    let mut t = report::table(&header);
    for (label, cells) in report::fold_rows(rows) {
        let mut row = vec![label];
        row.extend(pick(cells));
        t.add_row(row);
    }
    t
}

fn write_text(model: &ModelRef, spec: &ArchSpec, out: &mut dyn Write) -> Result<()> {
    let name = model.display_name();
    match repo_of(model) {
        Some(repo) if repo != name => writeln!(out, "{name}  ({repo})")?,
        _ => writeln!(out, "{name}")?,
    }
    let class = match &spec.architecture {
        Some(a) if *a != spec.hf_class => format!("{} (file: {a})", spec.hf_class),
        _ => spec.hf_class.clone(),
    };
    writeln!(
        out,
        "  family      {} · {class} · model_type {}",
        spec.family, spec.model_type
    )?;
    writeln!(
        out,
        "  shape       hidden {} · {} layers · vocab {} · context {} ({}) · dtype {}{}",
        spec.hidden_size,
        spec.layers.len(),
        spec.vocab_size,
        units::context(spec.max_context as u64),
        spec.max_context,
        spec.dtype.as_deref().unwrap_or("unspecified"),
        if spec.tie_word_embeddings {
            " · tied embeddings"
        } else {
            ""
        }
    )?;
    let p = &spec.params;
    let mut parts = vec![
        format!("total {}", units::params(p.total)),
        format!("embedding {}", units::params(p.embedding)),
    ];
    if p.lm_head > 0 {
        parts.push(format!("lm_head {}", units::params(p.lm_head)));
    }
    if p.ple > 0 {
        parts.push(format!("PLE table {}", units::params(p.ple)));
        parts.push(format!("effective {}", units::params(p.effective)));
    }
    if p.routed_experts > 0 {
        parts.push(format!(
            "routed experts {}",
            units::params(p.routed_experts)
        ));
        parts.push(format!("active {}", units::params(p.active)));
    }
    writeln!(out, "  parameters  {}", parts.join(" · "))?;
    writeln!(out, "              ({} exactly)", group_digits(p.total))?;
    for n in &spec.notes {
        writeln!(out, "  note        {n}")?;
    }
    writeln!(out)?;
    writeln!(out, "{}", layer_table(spec))?;
    Ok(())
}

/// `4629000000` → `4,629,000,000`.
pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
