//! A chat session: the conversation, the KV cache kept across turns, and one turn of generation.
//!
//! **Prefix reuse.** Every turn renders the whole conversation with the model's template and
//! tokenizes it, exactly as a fresh run would see it. The tokens the cache already holds are
//! compared with that sequence: when they are its prefix, only the rest is prefilled. When they
//! are not (a template that rewrites earlier turns, e.g. drops old thinking; an `/undo`; a new
//! system prompt; a reply that tokenizes differently once rendered), the cache goes back to the
//! longest *snapshot* that is a prefix and prefills from there, and the turn reports it.
//!
//! **Snapshots** are clones of the [`KvStore`] (cheap: the tensors are shared) taken at turn
//! boundaries: after the conversation up to the new user message is prefilled (before the
//! generation prompt) and after each reply. The first is where a template that renders past
//! turns differently from the generation prompt (Gemma 4 31B's empty thought channel, Qwen's
//! dropped `<think>` blocks) resumes; the second is where `/undo` resumes. Only the newest
//! [`Engine::max_snapshots`] are kept, so memory stays bounded.
//!
//! At least one token is always left to prefill (the loop needs the logits of the last one), so
//! `/regen` resumes from the snapshot before the generation prompt and prefills only that.

use super::template::{ChatTemplate, RenderRequest};
use super::thinking::{Markers, Part, Splitter};
use crate::arch::ArchSpec;
use crate::arch::CausalLm;
use crate::generate::sampler::{Sampler, Sampling};
use crate::generate::{self, Drafter, Drafting, Event, Limits, StopReason};
use crate::layers::kv_store::KvStore;
use crate::loader::tokenizer::TokenizerBundle;
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// The messages of a conversation, in the form chat templates read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conversation {
    pub messages: Vec<Value>,
}

fn role(m: &Value) -> &str {
    m.get("role").and_then(Value::as_str).unwrap_or("")
}

impl Conversation {
    /// The system prompt, if the conversation starts with one.
    pub fn system(&self) -> Option<&str> {
        self.messages
            .first()
            .filter(|m| role(m) == "system")
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str)
    }

    /// Set (or with `None` remove) the system prompt.
    pub fn set_system(&mut self, text: Option<String>) {
        if self.messages.first().is_some_and(|m| role(m) == "system") {
            self.messages.remove(0);
        }
        if let Some(t) = text {
            self.messages
                .insert(0, json!({"role": "system", "content": t}));
        }
    }

    pub fn push_user(&mut self, text: &str) {
        self.messages.push(json!({"role": "user", "content": text}));
    }

    pub fn push_assistant(&mut self, content: &str, reasoning: Option<&str>) {
        let mut m = json!({"role": "assistant", "content": content});
        if let (Some(r), Some(o)) = (reasoning, m.as_object_mut()) {
            o.insert("reasoning_content".into(), r.into());
        }
        self.messages.push(m);
    }

    /// The last message is the user's (a reply is due).
    pub fn awaits_reply(&self) -> bool {
        self.messages.last().is_some_and(|m| role(m) == "user")
    }

    /// Remove the last reply, so it can be generated again; false if the last message is not
    /// a reply to a user message.
    pub fn pop_reply(&mut self) -> bool {
        let n = self.messages.len();
        if n >= 2
            && role(&self.messages[n - 1]) == "assistant"
            && role(&self.messages[n - 2]) == "user"
        {
            self.messages.pop();
            true
        } else {
            false
        }
    }

    /// Remove the last exchange (the last user message and everything after it); false if
    /// there is none.
    pub fn undo(&mut self) -> bool {
        match self.messages.iter().rposition(|m| role(m) == "user") {
            Some(i) => {
                self.messages.truncate(i);
                true
            }
            None => false,
        }
    }

    /// Forget everything but the system prompt.
    pub fn clear(&mut self) {
        let system = self.system().map(str::to_string);
        self.messages.clear();
        self.set_system(system);
    }

    /// Drop the oldest exchange (its user message and the replies up to the next user
    /// message), keeping the system prompt and the last user message; false if nothing is left
    /// to drop.
    pub fn drop_oldest_turn(&mut self) -> bool {
        let start = usize::from(self.messages.first().is_some_and(|m| role(m) == "system"));
        let last_user = self.messages.iter().rposition(|m| role(m) == "user");
        let next_user = self.messages[start..]
            .iter()
            .enumerate()
            .skip(1)
            .find(|(_, m)| role(m) == "user")
            .map(|(i, _)| start + i);
        match (next_user, last_user) {
            (Some(next), Some(last)) if next <= last => {
                self.messages.drain(start..next);
                true
            }
            _ => false,
        }
    }

    /// User turns so far.
    pub fn turns(&self) -> usize {
        self.messages.iter().filter(|m| role(m) == "user").count()
    }
}

/// A cache state: the tokens it holds and the store.
#[derive(Debug, Clone)]
struct State {
    ids: Vec<u32>,
    cache: KvStore,
}

/// Where a turn's cache came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The cache held a prefix of the new sequence: nothing was thrown away.
    Live,
    /// The cache did not match from token `from`; a snapshot of `reused` tokens was taken up.
    Snapshot { from: usize },
    /// No snapshot matched: everything is prefilled again.
    Fresh { from: usize },
}

/// The KV cache across turns, with its snapshots.
pub struct Engine {
    live: State,
    snapshots: Vec<State>,
    empty: KvStore,
    /// How many snapshots are kept (oldest dropped first).
    pub max_snapshots: usize,
}

fn is_prefix(a: &[u32], b: &[u32]) -> bool {
    a.len() <= b.len() && b[..a.len()] == *a
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Engine {
    pub fn new(model: &dyn CausalLm) -> Engine {
        let empty = model.new_cache();
        Engine {
            live: State {
                ids: vec![],
                cache: empty.clone(),
            },
            snapshots: vec![],
            empty,
            max_snapshots: 4,
        }
    }

    /// The tokens the cache holds.
    pub fn ids(&self) -> &[u32] {
        &self.live.ids
    }

    /// Let `drafter` prepare the caches every turn starts from (an MTP head keeps a slot in
    /// them); before any token is fed.
    pub fn prepare(&mut self, drafter: &mut dyn Drafter) -> Result<()> {
        drafter.prepare(&mut self.empty)?;
        drafter.prepare(&mut self.live.cache)
    }

    pub fn cache(&self) -> &KvStore {
        &self.live.cache
    }

    pub fn snapshot_count(&self) -> usize {
        self.snapshots.len()
    }

    /// Forget the cache and every snapshot.
    pub fn clear(&mut self) {
        self.live = State {
            ids: vec![],
            cache: self.empty.clone(),
        };
        self.snapshots.clear();
    }

    /// Keep the current state as a snapshot.
    pub fn snapshot(&mut self) {
        if self.live.ids.is_empty()
            || self
                .snapshots
                .last()
                .is_some_and(|s| s.ids == self.live.ids)
        {
            return;
        }
        self.snapshots.push(self.live.clone());
        let excess = self.snapshots.len().saturating_sub(self.max_snapshots);
        self.snapshots.drain(..excess);
    }

    /// Make the cache hold the longest reusable prefix of `target`, leaving at least one token
    /// to feed.
    pub fn resume_for(&mut self, target: &[u32]) -> Resume {
        let fits = |ids: &[u32]| ids.len() < target.len() && is_prefix(ids, target);
        if fits(&self.live.ids) {
            return Resume::Live;
        }
        let from = common_prefix(&self.live.ids, target);
        let best = self
            .snapshots
            .iter()
            .filter(|s| fits(&s.ids))
            .max_by_key(|s| s.ids.len())
            .cloned();
        match best {
            Some(s) => {
                self.live = s;
                Resume::Snapshot { from }
            }
            None => {
                self.live = State {
                    ids: vec![],
                    cache: self.empty.clone(),
                };
                Resume::Fresh { from }
            }
        }
    }

    /// Feed `tokens` without generating, in prefill chunks; returns the logits of every
    /// position `[n, vocab]` when `all`, else of the last; `None` when `stop` was set (Ctrl-C)
    /// between two chunks, the chunks fed so far kept.
    pub fn prefill(
        &mut self,
        model: &dyn CausalLm,
        tokens: &[u32],
        all: bool,
        stop: &AtomicBool,
    ) -> Result<Option<Tensor>> {
        let start = self.live.cache.seen();
        let fed = generate::prefill(model, &mut self.live.cache, tokens, all, &mut |_| {
            Ok(!stop.load(Ordering::SeqCst))
        });
        match fed {
            Ok(logits) => {
                let done = self.live.cache.seen() - start;
                self.live.ids.extend_from_slice(&tokens[..done]);
                Ok(logits)
            }
            Err(e) => {
                // The cache may hold part of the chunk: start again from nothing.
                self.clear();
                Err(e)
            }
        }
    }

    /// Run the generation loop after what the cache holds, keeping track of the tokens fed.
    pub fn generate(
        &mut self,
        model: &dyn CausalLm,
        prompt: &[u32],
        sampler: &mut Sampler,
        limits: &Limits,
        drafting: Option<Drafting>,
        on_event: &mut dyn FnMut(Event) -> Result<bool>,
    ) -> Result<generate::Stats> {
        let before = self.live.ids.len();
        match generate::generate_with(
            model,
            &mut self.live.cache,
            prompt,
            sampler,
            limits,
            drafting,
            on_event,
        ) {
            Ok(stats) if self.live.cache.seen() < before + prompt.len() => {
                // Stopped during the prefill: the cache holds part of the prompt. Start again
                // from nothing; the next turn prefills the history.
                self.clear();
                Ok(stats)
            }
            Ok(stats) => {
                self.live.ids.extend_from_slice(prompt);
                // The last generated token (the stop token, or the one the budget ended on) is
                // not fed; the cache says how many were.
                let fed = self.live.cache.seen().saturating_sub(before + prompt.len());
                self.live
                    .ids
                    .extend_from_slice(&stats.generated_ids[..fed.min(stats.generated_ids.len())]);
                if self.live.ids.len() != self.live.cache.seen() {
                    self.clear();
                    bail!("internal: the cache and its token list disagree; cache cleared");
                }
                Ok(stats)
            }
            Err(e) => {
                self.clear();
                Err(e)
            }
        }
    }
}

/// Settings a user can change during the session.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub sampling: Sampling,
    pub max_tokens: usize,
    /// `enable_thinking` for templates that read it; `None`: the template's default.
    pub thinking: Option<bool>,
}

/// Totals over the session, for `/stats`.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub turns: usize,
    pub prefilled: usize,
    pub reused: usize,
    pub generated: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub decoded: usize,
    pub resumed_from_snapshot: usize,
    pub refilled_from_scratch: usize,
    /// Speculative decoding over the session: tokens drafted and accepted.
    pub draft_tokens: usize,
    pub accepted_tokens: usize,
}

/// What a turn tells before its reply about how it is prefilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The oldest turns were dropped to fit the context (`--context-shift`).
    DroppedTurns(usize),
    /// The rendered conversation differs from the cache (not at its start): `reused` tokens
    /// are kept.
    Resumed { resume: Resume, reused: usize },
}

/// What one turn did.
#[derive(Debug, Clone)]
pub struct TurnReport {
    /// Tokens of the rendered conversation (with the generation prompt).
    pub prompt_tokens: usize,
    /// Of those, the ones already in the cache.
    pub reused: usize,
    /// Of those, the ones prefilled this turn.
    pub prefilled: usize,
    pub resume: Resume,
    /// Oldest exchanges dropped to fit the context (`--context-shift`).
    pub dropped_turns: usize,
    pub prefill_s: f64,
    pub generated: usize,
    /// The generated ids, the stop token included.
    pub generated_ids: Vec<u32>,
    pub decode_tok_s: f64,
    pub stop: Option<StopReason>,
    /// With a drafter: tokens drafted and accepted this turn.
    pub draft_tokens: usize,
    pub accepted_tokens: usize,
    /// Tokens the cache holds after the turn.
    pub context_used: usize,
    /// With [`Session::keep_logits`]: the logits of every prefilled position, `[prefilled,
    /// vocab]`.
    pub prefill_logits: Option<Tensor>,
}

/// Why a turn could not start.
#[derive(Debug)]
pub enum ContextError {
    /// The conversation no longer fits: `/clear` or `--context-shift`.
    Full { needed: usize, max: usize },
    /// Even alone (with the system prompt) the message does not fit.
    MessageTooLong { needed: usize, max: usize },
}

impl std::fmt::Display for ContextError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ContextError::Full { needed, max } => write!(
                f,
                "the context is full: the conversation needs {needed} tokens and the context holds {max}; /clear starts over, /undo drops the last exchange, --context-shift drops the oldest turns"
            ),
            ContextError::MessageTooLong { needed, max } => write!(
                f,
                "the message is too long: with the chat template (and the system prompt) it needs {needed} tokens and the context holds {max} (--max-context)"
            ),
        }
    }
}

impl std::error::Error for ContextError {}

/// Everything a chat needs besides the terminal.
pub struct Session {
    pub model: Box<dyn CausalLm>,
    pub tok: TokenizerBundle,
    pub template: ChatTemplate,
    pub conv: Conversation,
    pub engine: Engine,
    pub settings: Settings,
    sampler: Sampler,
    pub max_context: usize,
    pub context_shift: bool,
    /// EOS ids and the template's end-of-turn token.
    pub stop_ids: Vec<u32>,
    pub markers: Markers,
    pub totals: Totals,
    /// Return the prefill logits in each [`TurnReport`] (tests).
    pub keep_logits: bool,
    /// Speculative decoding: the drafter and how many tokens it drafts per step.
    pub drafter: Option<Box<dyn Drafter>>,
    pub draft_tokens: usize,
}

impl Session {
    /// Draft with `drafter`, `tokens` per step (set before the first turn).
    pub fn set_drafter(&mut self, mut drafter: Box<dyn Drafter>, tokens: usize) -> Result<()> {
        self.engine.prepare(drafter.as_mut())?;
        self.drafter = Some(drafter);
        self.draft_tokens = tokens;
        Ok(())
    }

    pub fn new(
        model: Box<dyn CausalLm>,
        tok: TokenizerBundle,
        template: ChatTemplate,
        settings: Settings,
        max_context: usize,
    ) -> Session {
        let mut stop_ids = tok.eos_ids.clone();
        for id in template.end_of_turn_ids(&tok) {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        let markers = Markers::of(&tok);
        let engine = Engine::new(model.as_ref());
        Session {
            sampler: Sampler::new(settings.sampling.clone()),
            model,
            tok,
            template,
            conv: Conversation::default(),
            engine,
            settings,
            max_context,
            context_shift: false,
            stop_ids,
            markers,
            totals: Totals::default(),
            keep_logits: false,
            drafter: None,
            draft_tokens: 0,
        }
    }

    pub fn spec(&self) -> &ArchSpec {
        self.model.spec()
    }

    /// Change the settings; a new seed restarts the random stream.
    pub fn set_settings(&mut self, s: Settings) {
        if s.sampling.seed != self.settings.sampling.seed {
            self.sampler = Sampler::new(s.sampling.clone());
        } else {
            self.sampler.settings = s.sampling.clone();
        }
        self.settings = s;
    }

    fn kwargs(&self) -> Map<String, Value> {
        let mut kw = Map::new();
        if let Some(t) = self.settings.thinking {
            kw.insert("enable_thinking".into(), t.into());
        }
        kw
    }

    /// Render the conversation with and without the generation prompt.
    pub fn render(&self) -> Result<(String, String)> {
        let kw = self.kwargs();
        let req = |gen| RenderRequest {
            messages: &self.conv.messages,
            tools: None,
            add_generation_prompt: gen,
            kwargs: &kw,
        };
        Ok((
            self.template.render(&req(true))?,
            self.template.render(&req(false))?,
        ))
    }

    /// The token ids a fresh run would feed for the conversation so far, and where the
    /// generation prompt starts in them (when rendering without it gives a prefix).
    pub fn prompt_ids(&self) -> Result<(String, Vec<u32>, Option<usize>)> {
        let (with, without) = self.render()?;
        let ids = self.tok.encode(&with, false)?;
        let split = if with.starts_with(&without) && without.len() < with.len() {
            let head = self.tok.encode(&without, false)?;
            (is_prefix(&head, &ids) && head.len() < ids.len()).then_some(head.len())
        } else {
            None
        };
        Ok((with, ids, split))
    }

    /// Whether the system prompt and the last user message alone fit the context (else no
    /// `/clear` or shift can help).
    fn message_alone_fits(&self) -> Result<bool> {
        let mut alone = Conversation::default();
        alone.set_system(self.conv.system().map(str::to_string));
        if let Some(last) = self.conv.messages.last() {
            alone.messages.push(last.clone());
        }
        let kw = self.kwargs();
        let text = self.template.render(&RenderRequest {
            messages: &alone.messages,
            tools: None,
            add_generation_prompt: true,
            kwargs: &kw,
        })?;
        Ok(self.tok.encode(&text, false)?.len() < self.max_context)
    }

    /// Remove the last exchange and take the cache back to what the conversation now holds
    /// (a snapshot, as the next turn would), so `/stats`, `/kv` and the meter count only what
    /// is left. False if there was nothing to undo.
    pub fn undo(&mut self) -> bool {
        if !self.conv.undo() {
            return false;
        }
        match self.prompt_ids() {
            Ok((_, ids, _)) if !self.conv.messages.is_empty() => {
                self.engine.resume_for(&ids);
            }
            // Nothing left, or a template that cannot render the rest: start clean.
            _ => self.engine.clear(),
        }
        true
    }

    /// Generate the reply to the last user message. `on_notice` hears how the turn is
    /// prefilled before it starts, `on_text` gets the reply as it streams; `stop` set (Ctrl-C)
    /// ends it early, keeping what was said. On an error before generation the conversation is
    /// left as it was.
    pub fn reply(
        &mut self,
        on_notice: &mut dyn FnMut(Notice),
        on_text: &mut dyn FnMut(Part, &str) -> Result<()>,
        stop: &AtomicBool,
    ) -> Result<TurnReport> {
        if !self.conv.awaits_reply() {
            bail!("there is no user message to answer");
        }
        // 1. Render and fit the context (dropping the oldest turns with --context-shift).
        let saved = self.conv.clone();
        let mut dropped_turns = 0;
        let (prompt_text, ids, split) = loop {
            let (text, ids, split) = match self.prompt_ids() {
                Ok(p) => p,
                Err(e) => {
                    self.conv = saved;
                    return Err(e);
                }
            };
            if ids.len() < self.max_context {
                break (text, ids, split);
            }
            if self.context_shift && self.conv.drop_oldest_turn() {
                dropped_turns += 1;
                continue;
            }
            let needed = ids.len() + 1;
            let alone_fits = self.message_alone_fits().unwrap_or(false);
            self.conv = saved;
            return Err(if !alone_fits {
                ContextError::MessageTooLong {
                    needed,
                    max: self.max_context,
                }
            } else {
                ContextError::Full {
                    needed,
                    max: self.max_context,
                }
            }
            .into());
        };

        // 2. Take up the longest cached prefix, then prefill up to the generation prompt and
        //    keep a snapshot there.
        let resume = self.engine.resume_for(&ids);
        match resume {
            Resume::Live => {}
            Resume::Snapshot { .. } => self.totals.resumed_from_snapshot += 1,
            Resume::Fresh { from } if from > 0 => self.totals.refilled_from_scratch += 1,
            Resume::Fresh { .. } => {}
        }
        let reused = self.engine.ids().len();
        if dropped_turns > 0 {
            on_notice(Notice::DroppedTurns(dropped_turns));
        }
        if !matches!(resume, Resume::Live | Resume::Fresh { from: 0 }) {
            on_notice(Notice::Resumed { resume, reused });
        }
        let t0 = Instant::now();
        let mut logit_rows: Vec<Tensor> = vec![];
        if let Some(s) = split.filter(|&s| s > reused) {
            let logits = self.engine.prefill(
                self.model.as_ref(),
                &ids[reused..s],
                self.keep_logits,
                stop,
            )?;
            let Some(logits) = logits else {
                // Ctrl-C during a long history: no reply; what was fed stays cached.
                return Ok(TurnReport {
                    prompt_tokens: ids.len(),
                    reused,
                    prefilled: self.engine.ids().len() - reused,
                    resume,
                    dropped_turns,
                    prefill_s: t0.elapsed().as_secs_f64(),
                    generated: 0,
                    generated_ids: vec![],
                    decode_tok_s: 0.0,
                    stop: Some(StopReason::Interrupted),
                    draft_tokens: 0,
                    accepted_tokens: 0,
                    context_used: self.engine.ids().len(),
                    prefill_logits: None,
                });
            };
            if self.keep_logits {
                logit_rows.push(logits);
            }
            self.engine.snapshot();
        }
        let head_s = t0.elapsed().as_secs_f64();

        // 3. Generate from the rest, splitting thinking from the answer as it streams.
        let rest = ids[self.engine.ids().len()..].to_vec();
        let starts_thinking = self.markers.starts_in_thinking(&prompt_text);
        let mut splitter = Splitter::new(&self.tok, self.markers.clone(), starts_thinking);
        let limits = Limits {
            max_new_tokens: self.settings.max_tokens,
            max_context: self.max_context,
            stop_ids: self.stop_ids.clone(),
            all_prompt_logits: self.keep_logits,
        };
        let keep = self.keep_logits;
        let stop_ids = self.stop_ids.clone();
        let mut prefill_rest_s = 0.0;
        let t_rest = Instant::now();
        let mut on_event = |ev: Event| -> Result<bool> {
            match ev {
                Event::Prefilled { logits, .. } => {
                    prefill_rest_s = t_rest.elapsed().as_secs_f64();
                    if keep {
                        logit_rows.push(logits.clone());
                    }
                }
                Event::Token { id, .. } => {
                    if !stop_ids.contains(&id) {
                        for (part, text) in splitter.push(id)? {
                            on_text(part, &text)?;
                        }
                    }
                }
                Event::Prefilling { .. } | Event::Verified { .. } => {}
            }
            Ok(!stop.load(Ordering::SeqCst))
        };
        let drafting = self.drafter.as_deref_mut().map(|drafter| Drafting {
            drafter,
            tokens: self.draft_tokens,
        });
        let stats = self.engine.generate(
            self.model.as_ref(),
            &rest,
            &mut self.sampler,
            &limits,
            drafting,
            &mut on_event,
        )?;
        for (part, text) in splitter.finish()? {
            on_text(part, &text)?;
        }
        let (answer, thinking) = splitter.texts()?;
        self.conv.push_assistant(&answer, thinking.as_deref());
        self.engine.snapshot();

        // 4. Account.
        let prefilled = ids.len() - reused;
        let prefill_s = head_s + prefill_rest_s;
        let decoded = stats.generated_tokens.saturating_sub(1);
        let decode_s = if stats.decode_tok_s > 0.0 {
            decoded as f64 / stats.decode_tok_s
        } else {
            0.0
        };
        self.totals.turns += 1;
        self.totals.prefilled += prefilled;
        self.totals.reused += reused;
        self.totals.generated += stats.generated_tokens;
        self.totals.prefill_s += prefill_s;
        self.totals.decode_s += decode_s;
        self.totals.decoded += decoded;
        self.totals.draft_tokens += stats.draft_tokens;
        self.totals.accepted_tokens += stats.accepted_tokens;
        let prefill_logits = if keep && !logit_rows.is_empty() {
            Some(Tensor::cat(&logit_rows, 0)?)
        } else {
            None
        };
        Ok(TurnReport {
            prompt_tokens: ids.len(),
            reused,
            prefilled,
            resume,
            dropped_turns,
            prefill_s,
            generated: stats.generated_tokens,
            generated_ids: stats.generated_ids,
            decode_tok_s: stats.decode_tok_s,
            stop: stats.stop,
            draft_tokens: stats.draft_tokens,
            accepted_tokens: stats.accepted_tokens,
            context_used: self.engine.ids().len(),
            prefill_logits,
        })
    }
}
