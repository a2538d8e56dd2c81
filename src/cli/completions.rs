//! `llmarch completions <SHELL>`: shell completion scripts. The committed copies under
//! `completions/` are checked against these by a test.

use clap::CommandFactory;
use clap_complete::Shell;
use std::io::Write;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// bash, zsh, fish, powershell or elvish.
    pub shell: Shell,
}

/// The completion script for `shell`.
pub fn script(shell: Shell) -> Vec<u8> {
    let mut buf = vec![];
    clap_complete::generate(shell, &mut super::Cli::command(), "llmarch", &mut buf);
    buf
}

/// The file name the script is committed under in `completions/`.
pub fn file_name(shell: Shell) -> &'static str {
    match shell {
        Shell::Bash => "llmarch.bash",
        Shell::Zsh => "_llmarch",
        Shell::Fish => "llmarch.fish",
        Shell::PowerShell => "_llmarch.ps1",
        Shell::Elvish => "llmarch.elv",
        _ => "llmarch.unknown",
    }
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<()> {
    out.write_all(&script(args.shell))?;
    Ok(())
}
