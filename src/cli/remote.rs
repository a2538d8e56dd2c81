//! `run --endpoint` and `chat --endpoint`: generation on an OpenAI-compatible server (vLLM,
//! SGLang, llama-server), with the same per-layer view. The model reference gives the
//! architecture only (config.json; embedded for the aliases, no weights loaded); the KV panel is
//! the ArchSpec's per-layer cache ([`budget::compute`]) for the tokens the server reports
//! (`usage.prompt_tokens + completion_tokens`), computed, not measured. The server keeps its own
//! prefix cache: `chat` sends the whole conversation each turn and reports how much of it the
//! server found cached (`prompt_tokens_details.cached_tokens`).

use super::interrupt::{self, Interrupted};
use super::shared::{DeviceArgs, EndpointArgs, SamplingArgs};
use super::Ctx;
use crate::arch::budget::{self, Budget, KvDtype};
use crate::arch::ArchSpec;
use crate::chat::session::{Conversation, Settings};
use crate::chat::thinking::Part;
use crate::endpoint::{Api, Endpoint, Piece, Reply, Usage};
use crate::generate::sampler::Sampling;
use crate::loader::generation_config::GenerationDefaults;
use crate::loader::{self, ModelRef};
use crate::report::{panel, units};
use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
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
            draft: None,
        }))
    }
}

/// The sampling fields of a request (what `run` and `chat` send alike). Temperature is always
/// sent (0 unless given: greedy, as `run` is by default); the others only where set, so a server
/// that does not know them (`top_k`, `min_p`, `repetition_penalty` are vLLM/SGLang extensions)
/// is not sent them unasked.
pub fn sampling_body(s: &Sampling, max_tokens: usize) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("max_tokens".into(), max_tokens.into());
    m.insert("temperature".into(), decimal(s.temperature));
    if let Some(v) = s.top_k {
        m.insert("top_k".into(), v.into());
    }
    if let Some(v) = s.top_p {
        m.insert("top_p".into(), decimal(v));
    }
    if let Some(v) = s.min_p {
        m.insert("min_p".into(), decimal(v));
    }
    if s.repeat_penalty != 1.0 {
        m.insert("repetition_penalty".into(), decimal(s.repeat_penalty));
    }
    m.insert("seed".into(), s.seed.into());
    m
}

/// An f32 setting as the decimal it was given as (0.3, not 0.30000001192092896).
fn decimal(v: f32) -> Value {
    v.to_string()
        .parse::<f64>()
        .map_or_else(|_| v.into(), Value::from)
}

/// Sampling from the flags alone: with `--endpoint` no generation_config.json is read, so what
/// a flag leaves open is greedy (temperature 0) or the server's default.
pub fn sampling_of(s: &SamplingArgs) -> Result<(Sampling, usize)> {
    let none = GenerationDefaults::default();
    let sampling = s.sampling(&none);
    sampling
        .validate()
        .map_err(|e| super::UsageError(e.to_string()))?;
    Ok((sampling, s.max_new_tokens(&none)))
}

/// `--dtype` with `--endpoint`: a usage error (`--device` and the other local flags conflict in
/// clap).
pub fn refuse_local_flags(device: &DeviceArgs) -> Result<()> {
    if device.dtype.is_some() {
        crate::usage!("--dtype sets how llmarch runs the model here; with --endpoint the server holds the weights\nhint: drop --dtype (--kv-dtype names the server's KV cache type for the panel)");
    }
    Ok(())
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
    refuse_local_flags(&args.device)?;
    if args.max_context == Some(0) {
        crate::usage!("--max-context must be at least 1");
    }
    let text = super::run::read_prompt(args)?;
    if text.is_none() && args.prompt_ids.is_none() {
        crate::usage!("no prompt\nhint: give --prompt TEXT, --prompt-file FILE (- for stdin) or --prompt-ids 1,2,3");
    }
    let (sampling, max_tokens) = sampling_of(&args.sampling)?;
    let remote = Remote::open(ctx, &args.model, &args.endpoint)?;
    let api = remote.endpoint.named.unwrap_or(Api::Completions);
    let mut body = sampling_body(&sampling, max_tokens);
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

/// `chat --endpoint`: the conversation is kept here and sent whole every turn to
/// `/v1/chat/completions` (the server renders it with its own chat template); the server's
/// prefix cache does the reuse and says how much it found (`cached_tokens`). The KV figures are
/// the ArchSpec's for the tokens the server reports.
pub struct RemoteChat {
    pub remote: Remote,
    pub conv: Conversation,
    pub settings: Settings,
    /// The budget the meter and `/kv` compare against (`--max-context`, else the model's).
    pub max_context: u64,
    /// What the server said after each reply: (messages the conversation held then, prompt +
    /// completion tokens). Only entries that are still a prefix of the conversation are kept,
    /// so after `/undo` the counts of what is left are known again.
    known: Vec<(usize, u64)>,
    pub totals: RemoteTotals,
}

/// Totals over a remote chat, for `/stats`.
#[derive(Debug, Clone, Default)]
pub struct RemoteTotals {
    pub turns: usize,
    pub prompt: u64,
    pub cached: u64,
    pub generated: u64,
    /// Text chunks after the first of each reply, and the seconds they took (decode speed).
    pub decoded: u64,
    pub decode_s: f64,
}

impl RemoteChat {
    pub fn new(remote: Remote, settings: Settings, max_context: u64) -> Result<RemoteChat> {
        if remote.endpoint.named == Some(Api::Completions) {
            crate::usage!(
                "chat --endpoint talks to /v1/chat/completions (the server renders the conversation with its chat template), not /v1/completions\nhint: give the server's base URL (…/v1) or …/v1/chat/completions"
            );
        }
        Ok(RemoteChat {
            remote,
            conv: Conversation::default(),
            settings,
            max_context,
            known: vec![],
            totals: RemoteTotals::default(),
        })
    }

    /// The request for the conversation as it stands. Reasoning kept from earlier replies is
    /// not sent back (servers render past turns without it, and some refuse it).
    pub fn body(&self) -> Value {
        let s = &self.settings;
        let mut body = sampling_body(&s.sampling, s.max_tokens);
        body.insert("model".into(), self.remote.served.clone().into());
        let messages: Vec<Value> = self
            .conv
            .messages
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if let Some(o) = m.as_object_mut() {
                    o.remove("reasoning_content");
                }
                m
            })
            .collect();
        body.insert("messages".into(), messages.into());
        if let Some(t) = s.thinking {
            // vLLM and SGLang pass these to the chat template.
            body.insert(
                "chat_template_kwargs".into(),
                json!({ "enable_thinking": t }),
            );
        }
        Value::Object(body)
    }

    /// Stream the reply to the last user message; `stop` set (Ctrl-C) ends it within 50 ms,
    /// keeping what was said, even while the server is silent. The reply joins the conversation when anything was said;
    /// on an error the conversation is left as it was.
    pub fn reply(
        &mut self,
        on_text: &mut dyn FnMut(Part, &str) -> Result<()>,
        stop: &AtomicBool,
    ) -> Result<Reply> {
        if !self.conv.awaits_reply() {
            anyhow::bail!("there is no user message to answer");
        }
        // The request runs on a thread of its own, so that Ctrl-C is heard while the server is
        // silent (a long prefill, a stall) and not only when the next chunk comes. A request
        // left behind ends at its next chunk (nobody listens) or at the timeout.
        enum Msg {
            Piece(Piece, String),
            Done(Result<Reply>),
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (endpoint, body) = (self.remote.endpoint.clone(), self.body());
        std::thread::spawn(move || {
            let pieces = tx.clone();
            let mut on_piece = |p: Piece, s: &str| -> Result<bool> {
                Ok(pieces.send(Msg::Piece(p, s.to_string())).is_ok())
            };
            let _ = tx.send(Msg::Done(endpoint.stream(Api::Chat, body, &mut on_piece)));
        });
        let t0 = std::time::Instant::now();
        let mut so_far = Reply::default();
        let reply = loop {
            if stop.load(Ordering::SeqCst) {
                so_far.stopped = true;
                so_far.total_s = t0.elapsed().as_secs_f64();
                break so_far;
            }
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Msg::Piece(p, s)) => {
                    so_far.chunks += 1;
                    so_far.first_s.get_or_insert(t0.elapsed().as_secs_f64());
                    match p {
                        Piece::Reasoning => so_far.reasoning.push_str(&s),
                        Piece::Answer => so_far.text.push_str(&s),
                    }
                    let part = match p {
                        Piece::Reasoning => Part::Thinking,
                        Piece::Answer => Part::Answer,
                    };
                    on_text(part, &s)?;
                }
                Ok(Msg::Done(r)) => break r?,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    anyhow::bail!("internal: the request to the server ended without a reply")
                }
            }
        };
        if reply.text.is_empty() && reply.reasoning.is_empty() && reply.stopped {
            return Ok(reply);
        }
        let reasoning = (!reply.reasoning.is_empty()).then_some(reply.reasoning.as_str());
        self.conv.push_assistant(&reply.text, reasoning);
        let t = &mut self.totals;
        t.turns += 1;
        if let Some(u) = reply.usage {
            t.prompt += u.prompt_tokens;
            t.cached += u.cached_tokens.unwrap_or(0);
            t.generated += u.completion_tokens;
            let len = self.conv.messages.len();
            self.known.retain(|(n, _)| *n < len);
            self.known
                .push((len, u.prompt_tokens + u.completion_tokens));
        }
        if let Some(first) = reply.first_s {
            if reply.chunks > 1 && reply.total_s > first {
                t.decoded += reply.chunks - 1;
                t.decode_s += reply.total_s - first;
            }
        }
        Ok(reply)
    }

    /// The tokens the server holds for the conversation as it stands, when it has said.
    pub fn context_tokens(&self) -> Option<u64> {
        let len = self.conv.messages.len();
        self.known.iter().find(|(n, _)| *n == len).map(|k| k.1)
    }

    /// Remove the last exchange; false if there is none.
    pub fn undo(&mut self) -> bool {
        let done = self.conv.undo();
        let len = self.conv.messages.len();
        self.known.retain(|(n, _)| *n <= len);
        done
    }

    /// The conversation changed from its start (`/clear`, `/system`, `/load`): no count holds.
    pub fn forget_counts(&mut self) {
        self.known.clear();
    }
}
