//! `llmarch models`: the built-in aliases, their repos and families.

use crate::arch::{self, config::ParseOptions};
use crate::loader::aliases::ALIASES;
use crate::report;
use anyhow::Result;
use serde_json::json;
use std::io::Write;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Machine-readable output on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args, out: &mut dyn Write) -> Result<()> {
    let mut rows = vec![];
    for a in ALIASES {
        let raw: serde_json::Value = serde_json::from_str(a.config_json)?;
        let spec = arch::parse_config(&raw, &ParseOptions::default())?;
        let family = arch::FAMILIES
            .iter()
            .find(|f| f.name == spec.family)
            .map_or("", |f| f.summary);
        rows.push((a, spec, family));
    }
    if args.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(a, s, summary)| {
                json!({
                    "alias": a.name,
                    "repo": a.repo,
                    "family": s.family,
                    "hf_class": s.hf_class,
                    "params_total": s.params.total,
                    "params_active": s.params.active,
                    "max_context": s.max_context,
                    "new": summary,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    let mut t = report::table(&["alias", "repo", "family", "params", "context"]);
    for (a, s, _) in &rows {
        let params = if s.params.active != s.params.total {
            format!(
                "{} ({} active)",
                report::units::params(s.params.total),
                report::units::params(s.params.active)
            )
        } else {
            report::units::params(s.params.total)
        };
        t.add_row(vec![
            a.name.to_string(),
            a.repo.to_string(),
            s.family.to_string(),
            params,
            report::units::context(s.max_context as u64),
        ]);
    }
    writeln!(out, "{t}")?;
    writeln!(out)?;
    writeln!(out, "Families:")?;
    for f in arch::FAMILIES {
        writeln!(out, "  {:<12} {}", f.name, f.summary)?;
    }
    writeln!(
        out,
        "\nAny Hub repo id (org/name[@revision]) or local directory of these families works too."
    )?;
    Ok(())
}
