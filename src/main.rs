//! The `llmarch` binary: parse, dispatch, print the error chain, exit code.
//! Exit codes: 0 success (and a closed stdout pipe), 1 runtime error, 2 usage error, 130 after
//! Ctrl-C.

use clap::Parser;
use llmarch::cli::interrupt::{self, Interrupted};
use llmarch::cli::{self, Cli};
use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    llmarch::kernels::parallel::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are "errors" to clap that print to stdout and exit 0.
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = cli::run(cli, &mut out).and_then(|()| out.flush().map_err(Into::into));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if cli::shared::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) if e.is::<Interrupted>() => ExitCode::from(interrupt::EXIT_CODE),
        Err(e) => {
            report(&e);
            let usage = e.chain().any(|c| c.is::<cli::UsageError>());
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

/// `error: outer: inner: root` on one line, then each `hint:` found anywhere in the chain.
fn report(e: &anyhow::Error) {
    let mut causes = vec![];
    let mut hints = vec![];
    for cause in e.chain() {
        let text = cause.to_string();
        let mut lines = text.lines();
        if let Some(first) = lines.next() {
            match first.strip_prefix("hint: ") {
                Some(h) => hints.push(h.to_string()),
                None => causes.push(first.to_string()),
            }
        }
        for line in lines {
            match line.strip_prefix("hint: ") {
                Some(h) => hints.push(h.to_string()),
                None => causes.push(line.to_string()),
            }
        }
    }
    let prefix = llmarch::report::prefix;
    eprintln!("{} {}", prefix("error"), causes.join(": "));
    for h in hints {
        eprintln!("{} {h}", prefix("hint"));
    }
}
