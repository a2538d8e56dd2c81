//! `--draft` and `--draft-tokens` (on `run` and `chat`): which drafter proposes tokens for the
//! target to verify (see `generate::speculative`), and how many per step.

use super::shared::Precision;
use super::Ctx;
use crate::arch::gemma4::assistant::{self, is_assistant_config, Gemma4Assistant};
use crate::arch::qwen3_5::mtp::{MtpPlan, Qwen3_5Mtp};
use crate::arch::ArchSpec;
use crate::generate::assistant::AssistantDrafter;
use crate::generate::mtp::MtpDrafter;
use crate::generate::ngram::NgramDrafter;
use crate::generate::Drafter;
use crate::loader::model_files::{self, ResolveOptions};
use crate::loader::{weights, ModelRef};
use anyhow::{bail, Context, Result};

/// `--draft` aliases: Gemma 4's assistant drafters on the Hub, one per Gemma 4 model.
pub const ASSISTANT_ALIASES: &[(&str, &str)] = &[
    ("gemma4-e2b-assistant", "google/gemma-4-E2B-it-assistant"),
    ("gemma4-e4b-assistant", "google/gemma-4-E4B-it-assistant"),
    (
        "gemma4-26b-a4b-assistant",
        "google/gemma-4-26B-A4B-it-assistant",
    ),
    ("gemma4-31b-assistant", "google/gemma-4-31B-it-assistant"),
];

/// Drafts per step when the assistant's generation_config.json gives no
/// `num_assistant_tokens` (transformers' `GenerationConfig` default).
pub const ASSISTANT_DEFAULT_TOKENS: usize = 20;

/// Drafts per step for `--draft ngram` when `--draft-tokens` is not given.
pub const NGRAM_DEFAULT_TOKENS: usize = 4;

/// The most drafts one verify pass may judge.
pub const MAX_DRAFT_TOKENS: usize = 64;

/// Speculative-decoding flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DraftArgs {
    /// Speculative decoding: `ngram` (prompt lookup: the continuation of the latest earlier
    /// match of the last tokens), `mtp` (the checkpoint's own multi-token-prediction layers),
    /// or a Gemma 4 assistant drafter (alias such as `gemma4-e2b-assistant`, Hub repo or
    /// folder). The output is the target's either way; only the speed changes.
    #[arg(long, value_name = "DRAFTER", conflicts_with = "endpoint")]
    pub draft: Option<String>,
    /// Tokens drafted per verify step (default: the assistant's `num_assistant_tokens` from
    /// its generation_config.json; 4 for ngram).
    #[arg(long, value_name = "N", conflicts_with = "endpoint")]
    pub draft_tokens: Option<usize>,
}

/// A drafter ready to run and the tokens it drafts per step.
pub struct Draft {
    pub drafter: Box<dyn Drafter>,
    pub tokens: usize,
}

impl DraftArgs {
    /// The drafter the flags ask for (`None` without `--draft`), checked against `target`
    /// (loaded from `target_ref`). `keep_logits`: a drafter model keeps every drafted token's
    /// logits (`--draft-logits-out`).
    pub fn build(
        &self,
        ctx: &Ctx,
        target_ref: &ModelRef,
        target: &ArchSpec,
        precision: &Precision,
        keep_logits: bool,
    ) -> Result<Option<Draft>> {
        let tokens = match self.draft_tokens {
            Some(n) if self.draft.is_none() => {
                crate::usage!("--draft-tokens {n} needs --draft (ngram, mtp or an assistant model)")
            }
            Some(0) => crate::usage!("--draft-tokens must be at least 1"),
            Some(n) if n > MAX_DRAFT_TOKENS => {
                crate::usage!("--draft-tokens {n}: at most {MAX_DRAFT_TOKENS}")
            }
            n => n,
        };
        let Some(which) = self.draft.as_deref() else {
            return Ok(None);
        };
        match which {
            "ngram" => Ok(Some(Draft {
                drafter: Box::new(NgramDrafter),
                tokens: tokens.unwrap_or(NGRAM_DEFAULT_TOKENS),
            })),
            "mtp" => Ok(Some(Draft {
                drafter: Box::new(
                    mtp(ctx, target_ref, target, precision, keep_logits).context("--draft mtp")?,
                ),
                tokens: tokens.unwrap_or(MTP_DEFAULT_TOKENS),
            })),
            other => {
                let (drafter, default) = assistant(ctx, other, target, precision, keep_logits)
                    .with_context(|| format!("--draft {other}"))?;
                Ok(Some(Draft {
                    drafter: Box::new(drafter),
                    tokens: tokens.unwrap_or(default).min(MAX_DRAFT_TOKENS),
                }))
            }
        }
    }
}

/// `--draft mtp` on a family whose MTP head llmarch does not run: refused, saying why.
fn no_mtp<T>(target: &ArchSpec) -> Result<T> {
    let why = match target.family {
        "deepseek_v4" => "DeepSeek V4's MTP layers are listed, not run: each is a whole V4 block, and no public implementation found pins how it carries V4's hyper-connection streams and compressed attention (the MTP files of vLLM and SGLang follow V3)",
        _ => "the family has no multi-token-prediction layers",
    };
    crate::usage!(
        "--draft mtp: {} has no runnable multi-token-prediction head in llmarch ({why})\nhint: --draft ngram works for every model",
        target.family
    )
}

/// Drafts per step for `--draft mtp` when `--draft-tokens` is not given: the head is trained
/// to predict one token ahead, and its later drafts (fed its own output) are accepted less.
pub const MTP_DEFAULT_TOKENS: usize = 2;

/// The MTP head of the target checkpoint (Qwen3.5 / Qwen3.6), read from the target's own files.
fn mtp(
    ctx: &Ctx,
    target_ref: &ModelRef,
    target: &ArchSpec,
    precision: &Precision,
    keep_logits: bool,
) -> Result<MtpDrafter> {
    if target.family != "qwen3_5" {
        return no_mtp(target);
    }
    let files = model_files::resolve(
        target_ref,
        &ResolveOptions {
            progress: ctx.progress(),
        },
    )?;
    // The config is checked before any weight is read.
    let plan = MtpPlan::of(&files.config_json()?, &ctx.parse)?;
    let opts = weights::LoadOptions {
        whole: true,
        ..Default::default()
    };
    let w = weights::load_with(&files, precision.dtype, &precision.device, opts)?;
    if !w.has_prefix("mtp.") {
        bail!(
            "{} has no `mtp.*` tensors: this checkpoint was saved without its MTP head (transformers drops it)\nhint: --draft ngram drafts without a model",
            files.source
        );
    }
    let source = crate::kernels::fast_cpu(&precision.device).then(|| w.mapped_source());
    let head = crate::layers::linear::with_weight_format(precision.weights, source, || {
        Qwen3_5Mtp::load(&plan, w.root_vb().pp("mtp"))
    })
    .with_context(|| format!("building the MTP head from {}", files.source))?;
    Ok(MtpDrafter {
        head,
        logits: keep_logits.then(Vec::new),
    })
}

/// What `inspect --draft` and `kv-budget --draft` say about a drafter, from its config alone.
pub struct DraftInfo {
    pub name: String,
    /// Layers of the drafter's own network (0: prompt lookup).
    pub layers: usize,
    /// Target layers whose caches it reads.
    pub reads: Vec<usize>,
    /// Values its own cache holds per token (an MTP head's full-attention K and V; else 0).
    pub own_kv_values_per_token: u64,
}

impl DraftInfo {
    /// One line: what the drafter runs and what cache of its own it holds.
    pub fn line(&self) -> String {
        if self.own_kv_values_per_token > 0 {
            return format!(
                "draft {}: {} layer{} with a full-attention cache of its own: {} more K/V values per token (one more full layer)",
                self.name,
                self.layers,
                if self.layers == 1 { "" } else { "s" },
                self.own_kv_values_per_token
            );
        }
        if self.layers == 0 {
            return format!(
                "draft {}: no network, no cache: own KV 0 B at any context",
                self.name
            );
        }
        let reads: Vec<String> = self.reads.iter().map(|l| format!("L{l}")).collect();
        format!(
            "draft {}: {} layers, every one reading the target's cache ({}): own KV 0 B at any context",
            self.name,
            self.layers,
            reads.join(" and ")
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "layers": self.layers,
            "reads_target_layers": self.reads,
            "kv_bytes": if self.own_kv_values_per_token == 0 { Some(0) } else { None },
            "kv_values_per_token": self.own_kv_values_per_token,
        })
    }
}

/// [`DraftInfo`] for `--draft which` on `target` (whose config.json is `target_config`), from
/// config files only.
pub fn describe(
    ctx: &Ctx,
    which: &str,
    target: &ArchSpec,
    target_config: &serde_json::Value,
) -> Result<DraftInfo> {
    match which {
        "ngram" => Ok(DraftInfo {
            name: "ngram".into(),
            layers: 0,
            reads: vec![],
            own_kv_values_per_token: 0,
        }),
        "mtp" if target.family == "qwen3_5" => {
            let l = MtpPlan::of(target_config, &ctx.parse)
                .context("--draft mtp")?
                .layer;
            Ok(DraftInfo {
                name: "mtp".into(),
                layers: 1,
                reads: vec![],
                own_kv_values_per_token: 2 * (l.kv_heads * l.head_dim) as u64,
            })
        }
        "mtp" => no_mtp(target),
        other => {
            let model_ref = assistant_ref(other)?;
            let config = crate::loader::load_config_json(&model_ref, ctx.progress())
                .with_context(|| format!("--draft {other}"))?;
            if !is_assistant_config(&config) {
                bail!("--draft {other}: not a Gemma 4 assistant (model_type `gemma4_assistant`)");
            }
            let plan =
                assistant::plan(&config, target).with_context(|| format!("--draft {other}"))?;
            Ok(DraftInfo {
                name: model_ref.display_name(),
                layers: plan.layers.len(),
                reads: plan.reads(),
                own_kv_values_per_token: 0,
            })
        }
    }
}

/// The model an assistant alias, repo or folder names.
fn assistant_ref(which: &str) -> Result<ModelRef> {
    match ASSISTANT_ALIASES.iter().find(|(a, _)| *a == which) {
        Some((_, repo)) => ModelRef::parse(repo),
        None => ModelRef::parse(which).map_err(|e| {
            anyhow::anyhow!(
                "{e:#}\nhint: --draft ngram, or a Gemma 4 assistant ({}, a Hub repo or a folder)",
                ASSISTANT_ALIASES
                    .iter()
                    .map(|a| a.0)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }),
    }
}

/// Load the Gemma 4 assistant `which` (alias, repo or folder) for `target`, with the drafts per
/// step its generation_config.json gives.
fn assistant(
    ctx: &Ctx,
    which: &str,
    target: &ArchSpec,
    precision: &Precision,
    keep_logits: bool,
) -> Result<(AssistantDrafter, usize)> {
    let model_ref = assistant_ref(which)?;
    let files = model_files::resolve(
        &model_ref,
        &ResolveOptions {
            progress: ctx.progress(),
        },
    )?;
    for n in &files.notes {
        ctx.warn(n);
    }
    let config = files.config_json()?;
    if !is_assistant_config(&config) {
        bail!(
            "{}: model_type `{}` is not a Gemma 4 assistant (`gemma4_assistant`)\nhint: --draft ngram drafts without a model",
            files.source,
            config.get("model_type").and_then(|v| v.as_str()).unwrap_or("?")
        );
    }
    let opts = weights::LoadOptions {
        whole: true,
        ..Default::default()
    };
    let w = weights::load_with(&files, precision.dtype, &precision.device, opts)?;
    let model = Gemma4Assistant::new(&config, w.root_vb(), target)
        .with_context(|| format!("building the assistant from {}", files.source))?;
    let default = match &files.generation_config {
        Some(p) => {
            let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p)?)
                .with_context(|| format!("{}", p.display()))?;
            match g.get("num_assistant_tokens") {
                None | Some(serde_json::Value::Null) => ASSISTANT_DEFAULT_TOKENS,
                Some(v) => match v.as_u64() {
                    Some(n) if n >= 1 => n as usize,
                    _ => bail!(
                        "{}: `num_assistant_tokens` = {v} is not a positive number",
                        p.display()
                    ),
                },
            }
        }
        None => ASSISTANT_DEFAULT_TOKENS,
    };
    Ok((
        AssistantDrafter {
            model,
            name: model_ref.display_name(),
            logits: keep_logits.then(Vec::new),
        },
        default,
    ))
}
