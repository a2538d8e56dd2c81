//! `llmarch chat <MODEL>`: a multi-turn conversation in the terminal with the model's own chat
//! template, the KV cache kept across turns, and a context meter after every reply.
//!
//! Two modes:
//! - **Interactive** (stdin is a terminal): line editing and persistent history (rustyline;
//!   the file is `llmarch/chat_history` in the user's data directory), multi-line input,
//!   replies streamed with thinking dimmed, Ctrl-C stops a reply but not the session, Ctrl-D or
//!   `/exit` ends it.
//! - **Scripted** (stdin is not a terminal, or `--input FILE`): each line is one user message
//!   (slash commands and multi-line input work the same), replies go to stdout one after the
//!   other, everything else to stderr; exit 0 at the end of input.
//!
//! A bad command, a bad value, a missing file, a template error or a message that does not fit
//! is one `error:` line on stderr. Interactively the session goes on. Scripted, it stops there
//! and exits 1, the error naming the input line: the replies on stdout are then those of the
//! lines before it, in order, and a script can trust that exit 0 means every line was
//! answered. A closed stdout (`llmarch chat ... | head -1`) stops a scripted session quietly.
//! Input is bounded: `--input` and `/load` read at most [`shared::INPUT_LIMIT`] bytes, and a
//! line (or a multi-line message) from stdin may be no longer than that.
//!
//! With `--endpoint URL` an OpenAI-compatible server generates instead ([`RemoteChat`]): the
//! same modes, commands, errors and transcripts; the conversation is sent whole every turn, the
//! server's prefix cache does the reuse, and the meter shows its token counts with the KV
//! computed from the ArchSpec. [`Backend`] is where the two differ.

use super::remote::{self, Remote, RemoteChat};
use super::shared::{self, DeviceArgs, SamplingArgs};
use super::Ctx;
use crate::arch::budget;
use crate::chat::commands::{self, Command, LineAssembler, Setting, HELP};
use crate::chat::session::{
    ContextError, Conversation, Notice, Resume, Session, Settings, TurnReport,
};
use crate::chat::template::{self, ChatTemplate};
use crate::chat::thinking::Part;
use crate::chat::transcript::{self, Transcript};
use crate::endpoint::Reply;
use crate::generate::StopReason;
use crate::report::{self, panel, units};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// An alias (`llmarch models`), a Hub repo id `org/name[@revision]`, or a local directory.
    pub model: String,
    /// The system prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Read the user messages from a file, one per line, instead of the terminal.
    #[arg(long)]
    pub input: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub draft: super::draft::DraftArgs,
    /// Context limit of the conversation (default: the model's own).
    /// A number of tokens, `k`/`m` binary suffixes allowed (128k = 131072).
    #[arg(long, value_parser = shared::parse_tokens_usize)]
    pub max_context: Option<usize>,
    /// When the context is full, drop the oldest turns instead of stopping.
    #[arg(long, conflicts_with = "endpoint")]
    pub context_shift: bool,
    /// Do not show the model's thinking (it is still kept in the transcript).
    #[arg(long)]
    pub hide_thinking: bool,
    /// `enable_thinking` for templates that take it (default: the template's own).
    #[arg(long, value_enum)]
    pub thinking: Option<OnOff>,
    /// A chat template file, or a built-in one by name (`gemma-4-E2B-it`, `gemma-4-31B-it`,
    /// `Qwen3.6-27B`, `Laguna-XS.2`), instead of the model's own.
    #[arg(long, conflicts_with = "endpoint")]
    pub chat_template: Option<String>,
    /// KV-cache snapshots kept at turn boundaries for /undo, /regen and templates that rewrite
    /// earlier turns (each holds a copy of the cache as it was).
    #[arg(long, default_value_t = 4, conflicts_with = "endpoint")]
    pub snapshots: usize,
    /// Do not read or write the input history file.
    #[arg(long)]
    pub no_history: bool,
    #[command(flatten)]
    pub endpoint: shared::EndpointArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// The template to use and where it came from.
fn pick_template(
    args: &Args,
    tok: &crate::loader::tokenizer::TokenizerBundle,
    files: &crate::loader::model_files::ModelFiles,
    spec: &crate::arch::ArchSpec,
    ctx: &Ctx,
) -> Result<(String, String)> {
    if let Some(t) = &args.chat_template {
        if let Some(src) = template::builtin(t) {
            return Ok((src.to_string(), format!("built-in {t}")));
        }
        let path = PathBuf::from(t);
        if !path.exists() {
            let names: Vec<&str> = template::BUILTIN.iter().map(|(n, _)| *n).collect();
            bail!(
                "--chat-template {t}: no such file and no built-in template of that name\nhint: built-in templates: {}",
                names.join(", ")
            );
        }
        let src = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the chat template {}", path.display()))?;
        return Ok((src, path.display().to_string()));
    }
    if let Some(src) = &tok.chat_template {
        let origin = files
            .chat_template
            .as_ref()
            .or(files.tokenizer_config.as_ref())
            .map_or_else(|| files.source.clone(), |p| p.display().to_string());
        return Ok((src.clone(), origin));
    }
    match template::fallback_for(spec) {
        Some(name) => {
            ctx.warn(&format!(
                "{} ships no chat template: using the built-in {name}",
                files.source
            ));
            let src = template::builtin(name).unwrap_or_default();
            Ok((src.to_string(), format!("built-in {name}")))
        }
        None => bail!(
            "{} ships no chat template and llmarch has none built in for the `{}` family\nhint: give one with --chat-template FILE",
            files.source,
            spec.family
        ),
    }
}

/// Terminal styling of the non-reply lines.
#[derive(Clone, Copy)]
struct Style {
    /// Colour stdout (replies, thinking).
    out: bool,
    /// Colour stderr (meter, notes).
    err: bool,
}

impl Style {
    fn dim(&self, on: bool, s: &str) -> String {
        if on {
            format!("\x1b[2m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
}

/// Model text made safe for a terminal: control characters other than newline and tab (an
/// escape sequence in a reply could move the cursor, retitle the window or worse) become `�`.
fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| (c.is_control() && c != '\n' && c != '\t') || c == '\u{7f}';
    if text.chars().any(bad) {
        text.chars()
            .map(|c| if bad(c) { '\u{FFFD}' } else { c })
            .collect::<String>()
            .into()
    } else {
        text.into()
    }
}

/// The error chain on one line (hints folded in).
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = vec![];
    for cause in e.chain() {
        for line in cause.to_string().lines() {
            let line = line.trim();
            if !line.is_empty() && !parts.iter().any(|p| p == line) {
                parts.push(line.to_string());
            }
        }
    }
    parts.join(": ")
}

fn error_line(e: &str) {
    eprintln!("{} {e}", report::prefix("error"));
}

/// The note line for how a turn is prefilled.
fn notice_text(n: Notice) -> String {
    match n {
        Notice::DroppedTurns(k) => format!(
            "note: dropped the {k} oldest turn{} to fit the context (--context-shift)",
            if k == 1 { "" } else { "s" }
        ),
        Notice::Resumed {
            resume: Resume::Snapshot { from },
            reused,
        } => format!(
            "note: the rendered conversation differs from the cache at token {from} (the template renders earlier turns differently from how they were generated, or the history changed): resumed from a snapshot of {reused} tokens"
        ),
        Notice::Resumed { resume, .. } => {
            let from = match resume {
                Resume::Fresh { from } | Resume::Snapshot { from } => from,
                Resume::Live => 0,
            };
            format!(
                "note: the rendered conversation differs from the cache at token {from} and no snapshot matches: prefilled it again"
            )
        }
    }
}

fn note(style: &Style, quiet: bool, s: &str) {
    if !quiet {
        eprintln!("{}", style.dim(style.err, s));
    }
}

/// The whole `--input` file, read before anything is loaded so that a file too large or not
/// text fails first.
fn read_input(args: &Args) -> Result<Option<String>> {
    match &args.input {
        Some(p) => Ok(Some(shared::read_text_limited(
            p,
            shared::INPUT_LIMIT,
            &format!("--input {}", p.display()),
        )?)),
        None => Ok(None),
    }
}

pub fn run(ctx: &Ctx, args: Args, out: &mut dyn Write) -> Result<()> {
    if args.endpoint.endpoint.is_some() {
        return run_remote(ctx, args, out);
    }
    // 1. Everything that can be checked before loading anything.
    let precision = args.device.resolve(ctx)?;
    if args.max_context == Some(0) {
        bail!("--max-context must be at least 1");
    }
    let input_file = read_input(&args)?;

    // 2. Spec, files, tokenizer, template; then the weights.
    let (model_ref, spec, family) = shared::runnable_spec(ctx, &args.model)?;
    let draft = args
        .draft
        .build(ctx, &model_ref, &spec, &precision, false)?;
    let (files, tok) = shared::files_and_tokenizer(ctx, &model_ref)?;
    if tok.tokenizer().is_err() {
        bail!(
            "{} has no tokenizer.json: chat needs one to turn messages into tokens\nhint: `llmarch run --prompt-ids` runs a model on raw token ids",
            files.source
        );
    }
    let (source, origin) = pick_template(&args, &tok, &files, &spec, ctx)?;
    let special = template::special_tokens(files.tokenizer_config.as_deref())?;
    let template = ChatTemplate::new(&source, &origin, special)?;
    if args.thinking.is_some() && !template.takes_thinking {
        ctx.warn(&format!(
            "the chat template ({origin}) has no enable_thinking switch: --thinking has no effect"
        ));
    }
    let sampling = args.sampling.sampling(&tok.generation);
    sampling
        .validate()
        .map_err(|e| super::UsageError(e.to_string()))?;
    let settings = Settings {
        sampling,
        max_tokens: args.sampling.max_new_tokens(&tok.generation),
        thinking: args.thinking.map(|t| t == OnOff::On),
    };
    let max_context = args.max_context.unwrap_or(spec.max_context);
    let kv = shared::kv_dtype_of(precision.dtype);
    let at_max = budget::compute(&spec, max_context as u64, 1, kv)
        .context("the KV budget at --max-context")?;
    let shared::Built {
        model,
        load_s,
        weights,
        quant_cache: _,
    } = shared::build_model_in(&files, family, ctx, &precision)?;
    let mut session = Session::new(model, tok, template, settings, max_context);
    session.context_shift = args.context_shift;
    if let Some(d) = draft {
        session.set_drafter(d.drafter, d.tokens)?;
    }
    session.engine.max_snapshots = args.snapshots;
    if let Some(s) = &args.system {
        session.conv.set_system(Some(s.clone()));
    }
    if session.stop_ids.is_empty() {
        ctx.warn(
            "no end-of-sequence or end-of-turn token is known: replies end at --max-new-tokens",
        );
    }

    let backend = Backend::Local {
        session: Box::new(session),
        weights,
        load_s,
    };
    drive(
        ctx,
        &args,
        input_file,
        backend,
        model_ref.display_name(),
        at_max,
        out,
    )
}

/// `chat --endpoint`: the same session on an OpenAI-compatible server. MODEL gives the
/// architecture only (config.json); no tokenizer, template or weights are read here.
fn run_remote(ctx: &Ctx, args: Args, out: &mut dyn Write) -> Result<()> {
    remote::refuse_local_flags(&args.device)?;
    if args.max_context == Some(0) {
        crate::usage!("--max-context must be at least 1");
    }
    let (sampling, max_tokens) = remote::sampling_of(&args.sampling)?;
    let input_file = read_input(&args)?;
    let r = Remote::open(ctx, &args.model, &args.endpoint)?;
    let max_context = args.max_context.unwrap_or(r.spec.max_context) as u64;
    let at_max = r.kv_at(max_context)?;
    let name = r.name.clone();
    let settings = Settings {
        sampling,
        max_tokens,
        thinking: args.thinking.map(|t| t == OnOff::On),
    };
    let mut chat = RemoteChat::new(r, settings, max_context)?;
    if let Some(s) = &args.system {
        chat.conv.set_system(Some(s.clone()));
    }
    let backend = Backend::Remote(Box::new(chat));
    drive(ctx, &args, input_file, backend, name, at_max, out)
}

/// Run a session, interactive or scripted, whoever generates.
fn drive(
    ctx: &Ctx,
    args: &Args,
    input_file: Option<String>,
    backend: Backend,
    model_name: String,
    at_max: budget::Budget,
    out: &mut dyn Write,
) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let flag = stop.clone();
        // A second handler cannot be installed (tests calling `run` twice): not fatal.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    let interactive = input_file.is_none() && std::io::stdin().is_terminal();
    let style = Style {
        out: report::colour(std::io::stdout().is_terminal()),
        err: report::colour(report::stderr_is_terminal()),
    };
    let mut chat = Chat {
        backend,
        style,
        quiet: ctx.quiet,
        interactive,
        hide_thinking: args.hide_thinking,
        model_name,
        at_max,
        stop,
        warned: Warned::default(),
    };
    if interactive {
        chat.interactive(out, args.no_history)
    } else {
        let (reader, source): (Box<dyn BufRead>, String) = match (input_file, &args.input) {
            (Some(text), Some(p)) => (
                Box::new(std::io::Cursor::new(text.into_bytes())),
                format!("--input {}", p.display()),
            ),
            _ => (Box::new(std::io::stdin().lock()), "stdin".into()),
        };
        chat.scripted(reader, &source, out)
    }
}

/// The next line of `reader` without its line ending, at most `limit` bytes; `None` at the end.
fn read_line_limited(reader: &mut dyn BufRead, limit: u64) -> Result<Option<String>> {
    let mut buf = vec![];
    reader
        .take(limit.saturating_add(2))
        .read_until(b'\n', &mut buf)?;
    if buf.is_empty() {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    if buf.len() as u64 > limit {
        bail!(
            "the line is longer than {} MiB, the most llmarch takes in one message",
            limit >> 20
        );
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| anyhow::anyhow!("the line is not UTF-8 text"))
}

/// What a turn gave, by backend.
enum Done {
    Local(TurnReport),
    Remote(Reply),
}

/// What to do after an input.
enum Flow {
    Go,
    Exit,
}

struct Chat {
    backend: Backend,
    style: Style,
    quiet: bool,
    interactive: bool,
    hide_thinking: bool,
    model_name: String,
    /// The budget at `max_context`, for the meter and `/kv` (computed, for a server).
    at_max: budget::Budget,
    stop: Arc<AtomicBool>,
    warned: Warned,
}

/// Who generates the replies.
enum Backend {
    /// The model runs here, its KV cache kept across turns.
    Local {
        session: Box<Session>,
        /// The weights' format (`--dtype`): f32, bf16, f16 or q8_0.
        weights: String,
        load_s: f64,
    },
    /// An OpenAI-compatible server runs it (`--endpoint`) and keeps its own prefix cache.
    Remote(Box<RemoteChat>),
}

/// Warnings given once a session (a server that never sends a count says so once).
#[derive(Default)]
struct Warned {
    no_cached: bool,
    no_usage: bool,
}

/// The history file: `<data dir>/llmarch/chat_history`.
fn history_path() -> Option<PathBuf> {
    dirs::data_dir().map(|d| d.join("llmarch").join("chat_history"))
}

impl Chat {
    fn conv(&self) -> &Conversation {
        match &self.backend {
            Backend::Local { session, .. } => &session.conv,
            Backend::Remote(r) => &r.conv,
        }
    }

    fn conv_mut(&mut self) -> &mut Conversation {
        match &mut self.backend {
            Backend::Local { session, .. } => &mut session.conv,
            Backend::Remote(r) => &mut r.conv,
        }
    }

    fn settings(&self) -> &Settings {
        match &self.backend {
            Backend::Local { session, .. } => &session.settings,
            Backend::Remote(r) => &r.settings,
        }
    }

    fn set_settings(&mut self, new: Settings) {
        match &mut self.backend {
            Backend::Local { session, .. } => session.set_settings(new),
            Backend::Remote(r) => r.settings = new,
        }
    }

    fn spec(&self) -> &crate::arch::ArchSpec {
        match &self.backend {
            Backend::Local { session, .. } => session.spec(),
            Backend::Remote(r) => &r.remote.spec,
        }
    }

    /// The first line of an interactive session.
    fn banner(&self) -> String {
        let spec = self.spec();
        let what = match &self.backend {
            Backend::Local {
                session, weights, ..
            } => format!(
                "{weights} weights) · template: {} · context {}",
                session.template.origin,
                units::context(session.max_context as u64)
            ),
            Backend::Remote(r) => format!(
                "on {} as {}) · the server's chat template · KV computed for context {}",
                r.remote.endpoint.shown(),
                r.remote.served,
                units::context(r.max_context)
            ),
        };
        format!(
            "llmarch chat · {} ({}, {} layers, {what} · /help for commands, Ctrl-D to quit",
            self.model_name,
            spec.family,
            spec.layers.len(),
        )
    }

    fn interactive(&mut self, out: &mut dyn Write, no_history: bool) -> Result<()> {
        use rustyline::error::ReadlineError;
        let config = rustyline::Config::builder()
            .auto_add_history(false)
            // Every reply and message ends with a newline, so the prompt starts a line: no
            // need to ask the terminal where the cursor is.
            .check_cursor_position(false)
            .max_history_size(1000)
            .map_err(|e| anyhow::anyhow!("line editor: {e}"))?
            .build();
        let mut rl = rustyline::DefaultEditor::with_config(config)
            .map_err(|e| anyhow::anyhow!("cannot start the line editor: {e}"))?;
        let history = if no_history { None } else { history_path() };
        if let Some(h) = &history {
            if h.exists() {
                if let Err(e) = rl.load_history(h) {
                    eprintln!(
                        "{} cannot read the history {}: {e}",
                        report::prefix("warning"),
                        h.display()
                    );
                }
            }
        }
        eprintln!("{}", self.style.dim(self.style.err, &self.banner()));
        let mut lines = LineAssembler::default();
        loop {
            let prompt = if lines.pending() { "... " } else { ">>> " };
            match rl.readline(prompt) {
                Ok(line) => {
                    let Some(text) = lines.feed(&line) else {
                        continue;
                    };
                    if text.trim().is_empty() {
                        continue;
                    }
                    if let Some(h) = &history {
                        let _ = rl.add_history_entry(text.as_str());
                        if let Some(dir) = h.parent() {
                            let _ = std::fs::create_dir_all(dir);
                        }
                        if let Err(e) = rl.save_history(h) {
                            eprintln!(
                                "{} cannot write the history {}: {e}",
                                report::prefix("warning"),
                                h.display()
                            );
                        }
                    }
                    if let Flow::Exit = self.input(&text, out)? {
                        break;
                    }
                }
                Err(ReadlineError::Interrupted) => {
                    lines.reset();
                    eprintln!(
                        "{}",
                        self.style.dim(self.style.err, "(Ctrl-D or /exit to quit)")
                    );
                }
                Err(ReadlineError::Eof) => break,
                Err(e) => bail!("reading the terminal: {e}"),
            }
        }
        Ok(())
    }

    /// Answer the lines of `reader` (`source` names it in errors); the first error ends it.
    fn scripted(
        &mut self,
        mut reader: Box<dyn BufRead>,
        source: &str,
        out: &mut dyn Write,
    ) -> Result<()> {
        let limit = shared::INPUT_LIMIT;
        let mut lines = LineAssembler::default();
        let (mut number, mut first, mut pending) = (0usize, 1usize, 0u64);
        loop {
            number += 1;
            let at = || format!("{source} line {number}");
            let Some(line) = read_line_limited(reader.as_mut(), limit).with_context(at)? else {
                break;
            };
            // A message continued over lines is bounded as a whole.
            pending += line.len() as u64 + 1;
            if pending > limit {
                bail!(
                    "{source} lines {first}-{number}: the message is longer than {} MiB, the most llmarch takes in one message",
                    limit >> 20
                );
            }
            let Some(text) = lines.feed(&line) else {
                continue;
            };
            let at = if first == number {
                at()
            } else {
                format!("{source} lines {first}-{number}")
            };
            (first, pending) = (number + 1, 0);
            if text.trim().is_empty() {
                continue;
            }
            if let Flow::Exit = self.input(&text, out).with_context(|| at)? {
                return Ok(());
            }
        }
        if let Some(text) = lines.finish() {
            let at = format!("{source} lines {first}-{}", number - 1);
            self.input(&text, out).with_context(|| at)?;
        }
        Ok(())
    }

    /// An error in a turn or a command: one line, and the session goes on when interactive;
    /// scripted, the error ends the session (`main` prints it and exits 1). A closed stdout
    /// ends any session, quietly.
    fn fail(&self, e: anyhow::Error) -> Result<()> {
        if !self.interactive || shared::is_broken_pipe(&e) {
            return Err(e);
        }
        let msg = match e.downcast_ref::<ContextError>() {
            Some(c) => c.to_string(),
            None => one_line(&e),
        };
        error_line(&msg);
        Ok(())
    }

    /// One complete input: a command or a user message.
    fn input(&mut self, text: &str, out: &mut dyn Write) -> Result<Flow> {
        match commands::parse(text) {
            Some(Ok(c)) => self.command(c, out),
            Some(Err(e)) => {
                self.fail(anyhow::anyhow!(e))?;
                Ok(Flow::Go)
            }
            None => {
                self.conv_mut().push_user(text);
                self.turn(out, true)?;
                Ok(Flow::Go)
            }
        }
    }

    /// Generate the reply to the last user message and print it with the meter. `fresh`: the
    /// user message was just added (remove it again if the turn cannot start).
    fn turn(&mut self, out: &mut dyn Write, fresh: bool) -> Result<()> {
        self.stop.store(false, Ordering::SeqCst);
        let show_thinking = !self.hide_thinking;
        let stdout_tty = std::io::stdout().is_terminal();
        let thinking_to_stdout = self.interactive || stdout_tty;
        let colour = self.style.out;
        let stderr_tty = report::stderr_is_terminal();
        let clean = |text: &str, tty: bool| -> String {
            if tty {
                terminal_safe(text).into_owned()
            } else {
                text.to_string()
            }
        };
        let mut in_thinking = false;
        let mut thinking_on_stderr = false;
        let mut wrote = false;
        let (style, quiet) = (self.style, self.quiet);
        let mut on_text = |part: Part, text: &str| -> Result<()> {
            match part {
                Part::Thinking if !show_thinking => {}
                Part::Thinking if thinking_to_stdout => {
                    if !in_thinking && colour {
                        out.write_all(b"\x1b[2m")?;
                    }
                    in_thinking = true;
                    out.write_all(clean(text, stdout_tty).as_bytes())?;
                    out.flush()?;
                    wrote = true;
                }
                Part::Thinking => {
                    eprint!("{}", clean(text, stderr_tty));
                    thinking_on_stderr = true;
                }
                Part::Answer => {
                    if std::mem::take(&mut thinking_on_stderr) {
                        // The thinking on stderr ends its line, so the meter starts one.
                        eprintln!();
                    }
                    if in_thinking {
                        if colour {
                            out.write_all(b"\x1b[0m")?;
                        }
                        in_thinking = false;
                        if wrote {
                            out.write_all(b"\n")?;
                        }
                    }
                    out.write_all(clean(text, stdout_tty).as_bytes())?;
                    out.flush()?;
                    wrote = true;
                }
            }
            Ok(())
        };
        let result = match &mut self.backend {
            Backend::Local { session, .. } => {
                let mut on_notice = |n: Notice| note(&style, quiet, &notice_text(n));
                session
                    .reply(&mut on_notice, &mut on_text, &self.stop)
                    .map(Done::Local)
            }
            Backend::Remote(r) => r.reply(&mut on_text, &self.stop).map(Done::Remote),
        };
        if in_thinking && colour {
            out.write_all(b"\x1b[0m")?;
        }
        if thinking_on_stderr {
            eprintln!();
        }
        let said_nothing = match result {
            Ok(Done::Local(report)) => {
                writeln!(out)?;
                out.flush()?;
                self.after_turn(&report);
                // Stopped during prefill: nothing was said.
                report.stop == Some(StopReason::Interrupted) && report.generated == 0
            }
            Ok(Done::Remote(reply)) => {
                writeln!(out)?;
                out.flush()?;
                self.after_remote_turn(&reply);
                // Stopped before the server sent any text.
                reply.stopped && reply.text.is_empty() && reply.reasoning.is_empty()
            }
            Err(e) => {
                if wrote {
                    // A reply cut off mid-stream (a server that dropped it) ends its line.
                    let _ = writeln!(out).and_then(|_| out.flush());
                }
                if fresh && self.conv().awaits_reply() {
                    self.conv_mut().undo();
                }
                return self.fail(e);
            }
        };
        if said_nothing {
            self.conv_mut().undo();
            note(
                &self.style,
                false,
                "note: interrupted before the reply started: the message was dropped",
            );
        }
        Ok(())
    }

    /// The meter after a reply from a server: its token counts, and the KV the ArchSpec gives
    /// for them (computed, not measured).
    fn after_remote_turn(&mut self, reply: &Reply) {
        let Backend::Remote(r) = &self.backend else {
            return;
        };
        let tokens = reply.usage.map(|u| u.prompt_tokens + u.completion_tokens);
        let kv = tokens.map(|t| r.remote.kv_at(t).map(|b| b.total_bytes));
        let mut meter = match (reply.usage, &kv) {
            (Some(u), Some(Ok(bytes))) => format!(
                "[ctx {}/{} tokens · KV {} / {} computed · prompt {} ({} cached) · generated {}",
                u.prompt_tokens + u.completion_tokens,
                r.max_context,
                units::bytes(*bytes),
                units::bytes(self.at_max.total_bytes),
                u.prompt_tokens,
                u.cached_tokens.map_or("?".into(), |c| c.to_string()),
                u.completion_tokens,
            ),
            _ => format!(
                "[no token counts from the server · {} chunk{} of text",
                reply.chunks,
                if reply.chunks == 1 { "" } else { "s" }
            ),
        };
        meter.push_str(&format!(
            " · TTFT {:.0} ms · decode {:.1} tok/s (the server's)",
            reply.first_s.unwrap_or(0.0) * 1e3,
            remote::decode_tok_s(reply)
        ));
        if reply.stopped {
            meter.push_str(" · interrupted");
        } else if reply.finish_reason.as_deref() == Some("length") {
            meter.push_str(" · cut at max_tokens (/set max_tokens N)");
        }
        meter.push(']');
        if self.interactive || !self.quiet {
            eprintln!("{}", self.style.dim(self.style.err, &meter));
        }
        if let Some(Err(e)) = kv {
            eprintln!("{} {}", report::prefix("warning"), one_line(&e));
        }
        if !self.quiet {
            match reply.usage {
                None if !reply.stopped && !self.warned.no_usage => {
                    self.warned.no_usage = true;
                    eprintln!(
                        "{} the server reported no token usage (stream_options.include_usage): the KV figures cannot be computed",
                        report::prefix("warning")
                    );
                }
                Some(u) if u.cached_tokens.is_none() && !self.warned.no_cached => {
                    self.warned.no_cached = true;
                    eprintln!("{} {}", report::prefix("warning"), remote::CACHED_HINT);
                }
                _ => {}
            }
        }
    }

    fn after_turn(&self, r: &TurnReport) {
        let Backend::Local { session: s, .. } = &self.backend else {
            return;
        };
        let held: u64 = s.engine.cache().bytes().iter().sum();
        let at_max = &self.at_max;
        let prefill_tok_s = if r.prefill_s > 0.0 {
            r.prefilled as f64 / r.prefill_s
        } else {
            0.0
        };
        let mut meter = format!(
            "[ctx {}/{} tokens · KV {} / {} · prefill {} new ({} cached) {:.1} tok/s · decode {} tok {:.1} tok/s",
            r.context_used,
            s.max_context,
            units::bytes(held),
            units::bytes(at_max.total_bytes),
            r.prefilled,
            r.reused,
            prefill_tok_s,
            r.generated,
            r.decode_tok_s,
        );
        if r.draft_tokens > 0 {
            meter.push_str(&format!(
                " · drafts {}/{} accepted ({:.0}%)",
                r.accepted_tokens,
                r.draft_tokens,
                100.0 * r.accepted_tokens as f64 / r.draft_tokens as f64
            ));
        }
        match r.stop {
            Some(StopReason::Interrupted) => meter.push_str(" · interrupted"),
            Some(StopReason::MaxTokens) => {
                meter.push_str(" · cut at max_tokens (/set max_tokens N)")
            }
            Some(StopReason::ContextFull) => meter.push_str(" · context full"),
            _ => {}
        }
        meter.push(']');
        // The meter is always there on a terminal; scripts get it unless --quiet.
        if self.interactive || !self.quiet {
            eprintln!("{}", self.style.dim(self.style.err, &meter));
        }
        if r.stop == Some(StopReason::ContextFull) {
            let hint = if s.context_shift {
                "the next turn drops the oldest turns (--context-shift)"
            } else {
                "/clear to start over, /undo to drop the last exchange, or restart with --context-shift"
            };
            eprintln!(
                "{} the context is full ({}/{} tokens): {hint}",
                report::prefix("warning"),
                r.context_used,
                s.max_context
            );
        }
    }

    fn info(&self, s: &str) {
        eprintln!("{s}");
    }

    fn command(&mut self, c: Command, out: &mut dyn Write) -> Result<Flow> {
        match c {
            Command::Help => self.info(HELP),
            Command::Exit => return Ok(Flow::Exit),
            Command::Clear => {
                self.conv_mut().clear();
                match &mut self.backend {
                    Backend::Local { session, .. } => {
                        session.engine.clear();
                        self.info("cleared the conversation and the cache");
                    }
                    Backend::Remote(r) => {
                        r.forget_counts();
                        self.info(
                            "cleared the conversation (the server's prefix cache is its own)",
                        );
                    }
                }
            }
            Command::System(None) => match self.conv().system() {
                Some(s) => self.info(&format!("system prompt: {s}")),
                None => self.info("no system prompt (/system TEXT sets one)"),
            },
            Command::System(Some(text)) => {
                let set = text.is_some();
                self.conv_mut().set_system(text);
                let again = match &mut self.backend {
                    Backend::Local { .. } => "the next turn prefills the conversation again",
                    Backend::Remote(r) => {
                        r.forget_counts();
                        "the next turn sends it with the conversation"
                    }
                };
                self.info(&if set {
                    format!("system prompt set ({again})")
                } else {
                    "system prompt removed".into()
                });
            }
            Command::Regen => {
                if self.conv_mut().pop_reply() || self.conv().awaits_reply() {
                    self.turn(out, false)?;
                } else {
                    self.fail(anyhow::anyhow!(
                        "/regen: there is no reply to generate again"
                    ))?;
                }
            }
            Command::Undo => {
                let undone = match &mut self.backend {
                    Backend::Local { session, .. } => session.undo(),
                    Backend::Remote(r) => r.undo(),
                };
                if undone {
                    self.info("removed the last exchange");
                } else {
                    self.fail(anyhow::anyhow!("/undo: there is nothing to undo"))?;
                }
            }
            Command::Save(path) => {
                let t = self.transcript();
                match transcript::save(&path, &t) {
                    Ok(()) => self.info(&format!(
                        "saved {} messages to {}",
                        t.messages.len(),
                        path.display()
                    )),
                    Err(e) => self.fail(e)?,
                }
            }
            Command::Load(path) => {
                let read = shared::read_text_limited(
                    &path,
                    shared::INPUT_LIMIT,
                    &path.display().to_string(),
                );
                match read.and_then(|text| transcript::parse(&text, &path)) {
                    Ok(t) => self.load(t, &path)?,
                    Err(e) => self.fail(e)?,
                }
            }
            Command::Set(None) => self.info(&self.settings_text()),
            Command::Set(Some(s)) => {
                let mut new = self.settings().clone();
                match s {
                    Setting::Temperature(v) => new.sampling.temperature = v,
                    Setting::TopK(v) => new.sampling.top_k = v,
                    Setting::TopP(v) => new.sampling.top_p = v,
                    Setting::MinP(v) => new.sampling.min_p = v,
                    Setting::RepeatPenalty(v) => new.sampling.repeat_penalty = v,
                    Setting::MaxTokens(v) => new.max_tokens = v,
                    Setting::Seed(v) => new.sampling.seed = v,
                    Setting::Thinking(v) => {
                        let takes = match &self.backend {
                            Backend::Local { session, .. } => session.template.takes_thinking,
                            // Sent as chat_template_kwargs; the server's template decides.
                            Backend::Remote(_) => true,
                        };
                        if !takes {
                            self.fail(anyhow::anyhow!("/set thinking: this model's chat template has no enable_thinking switch"))?;
                            return Ok(Flow::Go);
                        }
                        new.thinking = v;
                    }
                }
                match new.sampling.validate() {
                    Ok(()) => {
                        self.set_settings(new);
                        self.info(&self.settings_text());
                    }
                    Err(e) => self.fail(e)?,
                }
            }
            Command::Kv => self.info(&self.kv_text()?),
            Command::Layers => {
                self.info(&super::inspect::layer_table(self.spec()).to_string());
            }
            Command::Stats => self.info(&self.stats_text()),
        }
        Ok(Flow::Go)
    }

    /// `/kv`: each layer's cache, held here (measured) or computed for the server's counts.
    fn kv_text(&self) -> Result<String> {
        let s = match &self.backend {
            Backend::Local { session, .. } => session,
            Backend::Remote(r) => {
                let Some(tokens) = r.context_tokens() else {
                    return Ok(
                        "no token counts from the server for the conversation as it stands yet: /kv shows the KV computed for them after a reply"
                            .into(),
                    );
                };
                let t = &r.totals;
                let tok_s = if t.decode_s > 0.0 {
                    t.decoded as f64 / t.decode_s
                } else {
                    0.0
                };
                return Ok(r.remote.panel(&self.at_max, tokens, tok_s)?.join("\n"));
            }
        };
        let held = s.engine.cache().bytes();
        let at_max = &self.at_max;
        let tok_s = if s.totals.decode_s > 0.0 {
            s.totals.decoded as f64 / s.totals.decode_s
        } else {
            0.0
        };
        let draft = s.drafter.as_ref().map(|d| panel::DraftFigures {
            name: d.name(),
            reads: d.reads_layers(),
            drafted: s.totals.draft_tokens,
            accepted: s.totals.accepted_tokens,
            ..Default::default()
        });
        let lines = panel::render(&panel::Snapshot {
            spec: s.spec(),
            budget: at_max,
            held: &held,
            measured: true,
            tokens: s.engine.ids().len(),
            tok_s,
            draft: draft.as_ref(),
        });
        Ok(lines.join("\n"))
    }

    fn settings_text(&self) -> String {
        let s = self.settings();
        let opt = |v: Option<String>| v.unwrap_or_else(|| "off".into());
        format!(
            "temperature {} · top_k {} · top_p {} · min_p {} · repeat_penalty {} · max_tokens {} · seed {} · thinking {}",
            s.sampling.temperature,
            opt(s.sampling.top_k.map(|v| v.to_string())),
            opt(s.sampling.top_p.map(|v| v.to_string())),
            opt(s.sampling.min_p.map(|v| v.to_string())),
            s.sampling.repeat_penalty,
            s.max_tokens,
            s.sampling.seed,
            match s.thinking {
                Some(true) => "on",
                Some(false) => "off",
                None if matches!(self.backend, Backend::Remote(_)) => "(the server's default)",
                None => "(template default)",
            }
        )
    }

    fn stats_text(&self) -> String {
        let (s, weights, load_s) = match &self.backend {
            Backend::Local {
                session,
                weights,
                load_s,
            } => (session, weights, load_s),
            Backend::Remote(r) => return self.remote_stats_text(r),
        };
        let t = &s.totals;
        let rate = |n: usize, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let held: u64 = s.engine.cache().bytes().iter().sum();
        format!(
            "turns {} · context {}/{} tokens · prefilled {} tokens ({:.1} tok/s), reused {} from the cache · generated {} ({:.1} tok/s decode)\nresumed from a snapshot {}× · prefilled again from scratch {}× · snapshots held {} · KV {} · {} weights · load {:.1} s{}",
            t.turns,
            s.engine.ids().len(),
            s.max_context,
            t.prefilled,
            rate(t.prefilled, t.prefill_s),
            t.reused,
            t.generated,
            rate(t.decoded, t.decode_s),
            t.resumed_from_snapshot,
            t.refilled_from_scratch,
            s.engine.snapshot_count(),
            units::bytes(held),
            weights,
            load_s,
            crate::generate::peak_rss_bytes()
                .map(|b| format!(" · peak RSS {}", units::bytes(b)))
                .unwrap_or_default()
        )
    }

    fn remote_stats_text(&self, r: &RemoteChat) -> String {
        let t = &r.totals;
        let context = r.context_tokens();
        let kv = context
            .and_then(|c| r.remote.kv_at(c).ok())
            .map_or("?".into(), |b| units::bytes(b.total_bytes));
        format!(
            "turns {} · context {}/{} tokens · prompt tokens sent {}, {} of them cached by the server · generated {} ({:.1} tok/s decode) · KV {kv} computed ({} per element) · {} at {} (the server's counts)",
            t.turns,
            context.map_or("?".into(), |c| c.to_string()),
            r.max_context,
            t.prompt,
            t.cached,
            t.generated,
            if t.decode_s > 0.0 { t.decoded as f64 / t.decode_s } else { 0.0 },
            r.remote.kv.name(),
            r.remote.served,
            r.remote.endpoint.shown(),
        )
    }

    fn transcript(&self) -> Transcript {
        let s = self.settings();
        let template = match &self.backend {
            Backend::Local { session, .. } => session.template.origin.clone(),
            Backend::Remote(r) => format!("the server's ({})", r.remote.endpoint.shown()),
        };
        Transcript {
            format: transcript::FORMAT.into(),
            model: self.model_name.clone(),
            template: Some(template),
            settings: transcript::Settings {
                temperature: s.sampling.temperature,
                top_k: s.sampling.top_k,
                top_p: s.sampling.top_p,
                min_p: s.sampling.min_p,
                repeat_penalty: s.sampling.repeat_penalty,
                seed: s.sampling.seed,
                max_tokens: s.max_tokens,
                thinking: s.thinking,
            },
            messages: self.conv().messages.clone(),
        }
    }

    fn load(&mut self, t: Transcript, path: &std::path::Path) -> Result<()> {
        let mut new = self.settings().clone();
        new.sampling.temperature = t.settings.temperature;
        new.sampling.top_k = t.settings.top_k;
        new.sampling.top_p = t.settings.top_p;
        new.sampling.min_p = t.settings.min_p;
        new.sampling.repeat_penalty = t.settings.repeat_penalty;
        new.sampling.seed = t.settings.seed;
        new.max_tokens = t.settings.max_tokens.max(1);
        new.thinking = t.settings.thinking;
        if let Err(e) = new.sampling.validate() {
            return self.fail(e.context(format!("{} is not a chat transcript", path.display())));
        }
        self.set_settings(new);
        self.conv_mut().messages = t.messages;
        if let Backend::Remote(r) = &mut self.backend {
            r.forget_counts();
        }
        if t.model != self.model_name {
            eprintln!(
                "{} {} was saved with {}; continuing with {}",
                report::prefix("warning"),
                path.display(),
                t.model,
                self.model_name
            );
        }
        self.info(&format!(
            "loaded {} messages from {}{}",
            self.conv().messages.len(),
            path.display(),
            if self.conv().awaits_reply() {
                " (the last message awaits a reply: /regen answers it)"
            } else {
                ""
            }
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_cannot_drive_the_terminal() {
        assert_eq!(terminal_safe("a\tb\nc"), "a\tb\nc");
        assert_eq!(
            terminal_safe("\x1b]0;pwned\x07x\r\u{9b}2J"),
            "\u{FFFD}]0;pwned\u{FFFD}x\u{FFFD}\u{FFFD}2J"
        );
    }
}
