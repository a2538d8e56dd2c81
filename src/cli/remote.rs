//! `run --endpoint` and `chat --endpoint`: generation on an OpenAI-compatible server (vLLM,
//! SGLang, llama-server), with the same per-layer view. The model reference gives the
//! architecture only (config.json; embedded for the aliases, no weights loaded); the KV panel is
//! the ArchSpec's per-layer cache ([`budget::compute`]) for the tokens the server reports
//! (`usage.prompt_tokens + completion_tokens`), computed, not measured. The server keeps its own
//! prefix cache: `chat` sends the whole conversation each turn and reports how much of it the
//! server found cached (`prompt_tokens_details.cached_tokens`).

use super::interrupt::{self, Interrupted};
use super::shared::{EndpointArgs, SamplingArgs};
use super::Ctx;
use crate::arch::budget::{self, Budget, KvDtype};
use crate::arch::ArchSpec;
use crate::endpoint::{Api, Endpoint, Piece, Reply, Usage};
use crate::loader::{self, ModelRef};
use crate::report::{panel, units};
use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use std::io::{IsTerminal, Write};
use std::time::Duration;

/// The hint when a server does not say how many prompt tokens it found cached.
pub const CACHED_HINT: &str = "the server did not report cached prompt tokens (vLLM: start it with --enable-prompt-tokens-details; SGLang: --enable-cache-report; llama-server sends them)";

/// What both commands set up: the spec, the server, the name it serves the model under.
pub struct Remote {
    pub name: String,
    pub spec: ArchSpec,
    pub endpoint: Endpoint,
    pub served: String,
    pub kv: KvDtype,
}

impl Remote {
    pub fn open(ctx: &Ctx, model: &str, e: &EndpointArgs) -> Result<Remote> {
        let url = e.endpoint.as_deref().unwrap_or_default();
        let endpoint = Endpoint::new(
            url,
            e.api_key.clone(),
            Duration::from_secs_f64(e.endpoint_timeout),
        )?;
        let (model_ref, spec) = loader::load_spec(model, &ctx.parse, ctx.progress())?;
        for w in &spec.warnings {
            ctx.warn(w);
        }
        let served = e.served_model.clone().unwrap_or_else(|| match &model_ref {
            ModelRef::Alias(a) => a.repo.to_string(),
            ModelRef::Repo { id, .. } => id.clone(),
            ModelRef::Local(_) => model.to_string(),
        });
        Ok(Remote {
            name: model_ref.display_name(),
            spec,
            endpoint,
            served,
            kv: e.kv_dtype,
        })
    }

    /// The cache per layer the spec gives for `tokens` (computed, not measured).
    pub fn kv_at(&self, tokens: u64) -> Result<Budget> {
        budget::compute(&self.spec, tokens.max(1), 1, self.kv)
            .with_context(|| format!("the KV cache of {} at {tokens} tokens", self.name))
    }

    /// The panel for `tokens`, against the budget `at_max`.
    pub fn panel(&self, at_max: &Budget, tokens: u64, tok_s: f64) -> Result<Vec<String>> {
        let now = self.kv_at(tokens)?;
        let held: Vec<u64> = now.layers.iter().map(|l| l.bytes).collect();
        Ok(panel::render(&panel::Snapshot {
            spec: &self.spec,
            budget: at_max,
            held: &held,
            tokens: tokens as usize,
            tok_s,
            measured: false,
        }))
    }
}

/// The sampling fields of a request from the flags (what a flag leaves open, the server
/// decides; temperature 0 unless given, as `run` is greedy by default).
pub fn sampling_body(s: &SamplingArgs, max_tokens: usize) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("max_tokens".into(), max_tokens.into());
    m.insert("temperature".into(), s.temperature.unwrap_or(0.0).into());
    if let Some(v) = s.top_k {
        m.insert("top_k".into(), v.into());
    }
    if let Some(v) = s.top_p {
        m.insert("top_p".into(), v.into());
    }
    if let Some(v) = s.min_p {
        m.insert("min_p".into(), v.into());
    }
    if let Some(v) = s.repeat_penalty {
        m.insert("repetition_penalty".into(), v.into());
    }
    m.insert("seed".into(), s.seed.into());
    m
}

/// Decode speed from a reply: chunks after the first over the time after the first.
pub fn decode_tok_s(r: &Reply) -> f64 {
    match r.first_s {
        Some(first) if r.total_s > first && r.chunks > 1 => {
            (r.chunks - 1) as f64 / (r.total_s - first)
        }
        _ => 0.0,
    }
}

/// `run --endpoint`.
pub fn run(ctx: &Ctx, args: &super::run::Args, out: &mut dyn Write) -> Result<()> {
    if args.device.dtype.is_some() {
        crate::usage!("--dtype sets how llmarch runs the model here; with --endpoint the server holds the weights\nhint: drop --dtype (--kv-dtype names the server's KV cache type for the panel)");
    }
    if args.max_context == Some(0) {
        crate::usage!("--max-context must be at least 1");
    }
    let text = super::run::read_prompt(args)?;
    if text.is_none() && args.prompt_ids.is_none() {
        crate::usage!("no prompt\nhint: give --prompt TEXT, --prompt-file FILE (- for stdin) or --prompt-ids 1,2,3");
    }
    let remote = Remote::open(ctx, &args.model, &args.endpoint)?;
    let api = remote.endpoint.named.unwrap_or(Api::Completions);
    let mut body = sampling_body(&args.sampling, args.sampling.max_new_tokens.unwrap_or(128));
    body.insert("model".into(), remote.served.clone().into());
    match (api, &args.prompt_ids, &text) {
        (Api::Completions, Some(ids), _) => {
            body.insert("prompt".into(), json!(ids));
        }
        (Api::Chat, Some(_), _) => crate::usage!(
            "--prompt-ids needs /v1/completions; the chat API takes text\nhint: give --endpoint the server's base URL (…/v1) or …/v1/completions"
        ),
        (Api::Completions, None, Some(t)) => {
            body.insert("prompt".into(), t.clone().into());
        }
        (Api::Chat, None, Some(t)) => {
            body.insert("messages".into(), json!([{"role": "user", "content": t}]));
        }
        (_, None, None) => unreachable!("checked above"),
    }
    let max_context = args.max_context.unwrap_or(remote.spec.max_context) as u64;
    let at_max = remote.kv_at(max_context)?;

    interrupt::install();
    let on_terminal = std::io::stdout().is_terminal();
    let mut on_piece = |_: Piece, s: &str| -> Result<bool> {
        if on_terminal {
            out.write_all(panel::terminal_safe(s).as_bytes())?;
        } else {
            out.write_all(s.as_bytes())?;
        }
        out.flush()?;
        Ok(!interrupt::requested())
    };
    let reply = remote
        .endpoint
        .stream(api, Value::Object(body), &mut on_piece)?;
    writeln!(out)?;
    out.flush()?;

    let tokens = reply.usage.map(|u| u.prompt_tokens + u.completion_tokens);
    let now = match tokens {
        Some(t) => Some(remote.kv_at(t)?),
        None => None,
    };
    if !ctx.quiet {
        if let (Some(t), true) = (tokens, !args.json && std::io::stderr().is_terminal()) {
            for l in remote.panel(&at_max, t, decode_tok_s(&reply))? {
                eprintln!("{l}");
            }
        }
        eprintln!("{}", summary(&remote, &reply, now.as_ref(), &at_max));
        match reply.usage {
            None => ctx.warn("the server reported no token usage (stream_options.include_usage): the KV figures cannot be computed"),
            Some(Usage { cached_tokens: None, .. }) => ctx.warn(CACHED_HINT),
            _ => {}
        }
    }
    if args.json {
        let u = reply.usage;
        let v = json!({
            "model": remote.name,
            "endpoint": remote.endpoint.shown(),
            "api": api.name(),
            "served_model": remote.served,
            "prompt_tokens": u.map(|u| u.prompt_tokens),
            "generated_tokens": u.map(|u| u.completion_tokens),
            "cached_tokens": u.and_then(|u| u.cached_tokens),
            "kv_bytes": now.as_ref().map(|b| b.total_bytes),
            "kv_bytes_per_layer": now.as_ref().map(|b| b.layers.iter().map(|l| l.bytes).collect::<Vec<_>>()),
            "kv_dtype": remote.kv.name(),
            "kv_computed": true,
            "finish_reason": reply.finish_reason,
            "stopped": reply.stopped,
            "ttft_ms": reply.first_s.map(|s| s * 1e3),
            "decode_tok_s": decode_tok_s(&reply),
            "total_s": reply.total_s,
        });
        writeln!(out, "{}", serde_json::to_string(&v)?)?;
    }
    if reply.stopped {
        return Err(Interrupted.into());
    }
    Ok(())
}

fn summary(r: &Remote, reply: &Reply, now: Option<&Budget>, at_max: &Budget) -> String {
    let counts = match reply.usage {
        Some(u) => format!(
            "{} prompt{} + {} generated tokens (the server's counts)",
            u.prompt_tokens,
            u.cached_tokens
                .map(|c| format!(" ({c} cached by the server)"))
                .unwrap_or_default(),
            u.completion_tokens
        ),
        None => format!(
            "{} chunks of text (no token counts from the server)",
            reply.chunks
        ),
    };
    format!(
        "{counts}{} · TTFT {:.0} ms · decode {:.1} tok/s · KV {} computed (budget {} at {}) · {} at {}",
        if reply.stopped { " (interrupted)" } else { "" },
        reply.first_s.unwrap_or(0.0) * 1e3,
        decode_tok_s(reply),
        now.map_or("?".into(), |b| units::bytes(b.total_bytes)),
        units::bytes(at_max.total_bytes),
        units::context(at_max.context),
        r.served,
        r.endpoint.shown()
    )
}
