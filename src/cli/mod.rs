//! The command line: clap types and one file per subcommand. No model math here: commands ask
//! `loader` for a spec, `arch::budget` for numbers, and `report` for tables.

pub mod chat;
pub mod completions;
pub mod draft;
pub mod fit;
pub mod inspect;
pub mod interrupt;
pub mod kv_budget;
pub mod models;
pub mod remote;
pub mod run;
pub mod shared;

use crate::arch::config::ParseOptions;
use clap::{Parser, Subcommand};
use std::io::Write;

/// Run and inspect the newest open-weight LLM architectures, and see what their long-context
/// tricks cost and save.
#[derive(Debug, Parser)]
#[command(name = "llmarch", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// No progress bars or notes on stderr (errors are still printed).
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// More detail on stderr: e.g. every checkpoint tensor the model never reads.
    #[arg(short, long, global = true, conflicts_with = "quiet")]
    pub verbose: bool,

    /// Treat config keys llmarch does not know as warnings instead of errors.
    #[arg(long, global = true)]
    pub allow_unknown_keys: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate once, streaming tokens to stdout, with the live KV panel on stderr.
    Run(run::Args),
    /// Interactive multi-turn chat with the model's own template, the KV cache kept across
    /// turns, and a context meter after each reply.
    Chat(chat::Args),
    /// Architecture of a model: per-layer table and parameter counts.
    Inspect(inspect::Args),
    /// KV-cache memory and attention budget, per model, context and layer.
    #[command(name = "kv-budget")]
    KvBudget(kv_budget::Args),
    /// The built-in model aliases and supported families.
    Models(models::Args),
    /// Shell completions (also committed under completions/).
    Completions(completions::Args),
}

/// An error in how the command was called (flags that cannot go together, a missing input):
/// exit code 2, like clap's own usage errors.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// `bail!` for usage errors (exit code 2).
#[macro_export]
macro_rules! usage {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::cli::UsageError(format!($($arg)*))))
    };
}

/// What every command gets besides its own arguments.
pub struct Ctx {
    pub quiet: bool,
    pub verbose: bool,
    pub parse: ParseOptions,
}

impl Ctx {
    /// Show download progress: stderr is a terminal and not `--quiet`.
    pub fn progress(&self) -> bool {
        !self.quiet && crate::report::stderr_is_terminal()
    }

    /// A warning line on stderr (hidden by `--quiet`).
    pub fn warn(&self, msg: &str) {
        if !self.quiet {
            eprintln!("{} {msg}", crate::report::prefix("warning"));
        }
    }
}

/// Run the parsed command, writing data to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    let ctx = Ctx {
        quiet: cli.quiet,
        verbose: cli.verbose,
        parse: ParseOptions {
            allow_unknown_keys: cli.allow_unknown_keys,
        },
    };
    match cli.command {
        Command::Run(a) => run::run(&ctx, a, out),
        Command::Chat(a) => chat::run(&ctx, a, out),
        Command::Inspect(a) => inspect::run(&ctx, a, out),
        Command::KvBudget(a) => kv_budget::run(&ctx, a, out),
        Command::Models(a) => models::run(a, out),
        Command::Completions(a) => completions::run(a, out),
    }
}
