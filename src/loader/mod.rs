//! Where the bytes come from: model references (alias, `org/name[@revision]`, local directory),
//! the embedded configs of the aliases, and the Hugging Face Hub (hf-hub's cache layout; requests in `hub.rs`).
//!
//! For `run`: [`model_files::resolve`] gathers a complete model folder (downloading what is
//! missing), [`weights::load`] maps and validates its safetensors into a `VarBuilder`, and
//! [`tokenizer::load`] reads the tokenizer, stop ids, chat template and sampling defaults.

pub mod aliases;
pub mod generation_config;
pub mod hub;
pub mod model_files;
pub mod quant_cache;
pub mod quantized;
pub mod tokenizer;
pub mod weights;

use crate::arch::{self, config::ParseOptions, ArchSpec};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// What the user named on the command line.
#[derive(Debug, Clone)]
pub enum ModelRef {
    Alias(&'static aliases::Alias),
    Repo {
        id: String,
        revision: Option<String>,
    },
    Local(PathBuf),
}

impl ModelRef {
    /// Parse a model argument: an existing directory, an alias, or `org/name[@revision]`.
    pub fn parse(arg: &str) -> Result<ModelRef> {
        let path = Path::new(arg);
        if path.is_dir() {
            return Ok(ModelRef::Local(path.to_path_buf()));
        }
        if let Some(a) = aliases::find(arg) {
            return Ok(ModelRef::Alias(a));
        }
        let looks_like_path =
            arg.starts_with('.') || arg.starts_with('/') || arg.starts_with('~') || path.exists();
        if looks_like_path {
            if path.exists() {
                bail!("`{arg}` is a file; a local model is a directory holding config.json");
            }
            bail!("directory `{arg}` does not exist");
        }
        let (id, revision) = match arg.split_once('@') {
            Some((id, rev)) if !rev.is_empty() => (id, Some(rev.to_string())),
            Some(_) => bail!("`{arg}`: empty revision after `@`"),
            None => (arg, None),
        };
        if is_repo_id(id) {
            if let Some(rev) = &revision {
                hub::check_revision(rev)
                    .with_context(|| format!("model `{id}@{}`", rev.escape_debug()))?;
            }
            return Ok(ModelRef::Repo {
                id: id.to_string(),
                revision,
            });
        }
        let mut msg =
            format!("unknown model `{arg}`: not an alias, a Hub repo id (org/name) or a directory");
        match aliases::closest(arg) {
            Some(a) => msg.push_str(&format!("\nhint: did you mean `{}`?", a.name)),
            None => msg.push_str("\nhint: `llmarch models` lists the aliases"),
        }
        Err(anyhow!(msg))
    }

    /// A short name for tables and JSON: the alias, the repo id, or the directory.
    pub fn display_name(&self) -> String {
        match self {
            ModelRef::Alias(a) => a.name.to_string(),
            ModelRef::Repo { id, revision: None } => id.clone(),
            ModelRef::Repo {
                id,
                revision: Some(r),
            } => format!("{id}@{r}"),
            ModelRef::Local(p) => p.display().to_string(),
        }
    }
}

/// `org/name`, each part of letters, digits, `-`, `_`, `.`.
fn is_repo_id(s: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(s.split_once('/'), Some((org, name)) if ok(org) && ok(name) && !name.contains('/'))
}

/// Read the raw `config.json` of a model.
pub fn load_config_json(model: &ModelRef, progress: bool) -> Result<Value> {
    match model {
        ModelRef::Alias(a) => serde_json::from_str(a.config_json)
            .with_context(|| format!("embedded config of alias `{}` is not valid JSON", a.name)),
        ModelRef::Local(dir) => read_json(&dir.join("config.json")),
        ModelRef::Repo { id, revision } => {
            let path = hub::fetch_file(id, revision.as_deref(), "config.json", progress)?;
            read_json(&path)
        }
    }
}

/// Read and parse a JSON file, with errors that name it.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = path.parent().unwrap_or(Path::new("."));
            bail!(
                "{} not found\nhint: a local model directory holds config.json (and for `run`, the safetensors and tokenizer.json); `{}` has none",
                path.display(),
                dir.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if text.trim().is_empty() {
        bail!("{} is empty", path.display());
    }
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Resolve a model argument all the way to its validated spec.
pub fn load_spec(arg: &str, opts: &ParseOptions, progress: bool) -> Result<(ModelRef, ArchSpec)> {
    load_spec_and_config(arg, opts, progress).map(|(model, spec, _)| (model, spec))
}

/// [`load_spec`], with the `config.json` it was read from (for what the table does not say,
/// such as how the checkpoint is quantized).
pub fn load_spec_and_config(
    arg: &str,
    opts: &ParseOptions,
    progress: bool,
) -> Result<(ModelRef, ArchSpec, Value)> {
    let model = ModelRef::parse(arg)?;
    let raw = load_config_json(&model, progress)?;
    let what = match &model {
        ModelRef::Alias(a) => format!("config of `{}` (configs/{}/config.json)", a.name, a.folder),
        ModelRef::Local(d) => d.join("config.json").display().to_string(),
        ModelRef::Repo { id, .. } => format!("config.json of {id}"),
    };
    let spec = arch::parse_config(&raw, opts).with_context(|| what)?;
    Ok((model, spec, raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        assert!(matches!(
            ModelRef::parse("gemma4-e2b").unwrap(),
            ModelRef::Alias(_)
        ));
        match ModelRef::parse("org/name@v1.0").unwrap() {
            ModelRef::Repo { id, revision } => {
                assert_eq!(id, "org/name");
                assert_eq!(revision.as_deref(), Some("v1.0"));
            }
            other => panic!("{other:?}"),
        }
        let e = ModelRef::parse("gemma4-e2").unwrap_err().to_string();
        assert!(e.contains("did you mean `gemma4-e2b`"), "{e}");
        assert!(ModelRef::parse("./no/such/dir").is_err());
        assert!(ModelRef::parse("org/name@").is_err());
        assert!(ModelRef::parse("a/b/c").is_err());
    }
}
