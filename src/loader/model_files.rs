//! A complete model folder from any [`ModelRef`]: `config.json`, the tokenizer files,
//! `generation_config.json`, `chat_template.jinja` when present, and the safetensors the text
//! model needs — from a local directory, the Hub, or the Hub's cache when offline.
//!
//! Notable:
//! - One selection routine over three sources (local folder, Hub, cache), so a local folder,
//!   a download and an offline run pick the same files.
//! - Only the text model's shards: with `model.safetensors.index.json`, the shards holding a
//!   tensor under the text root (`model.language_model.`, `language_model.model.` or `model.`)
//!   or the LM head; a multimodal repo's vision/audio-only shards, `consolidated.safetensors`,
//!   `*.gguf` and `pytorch_model*.bin` are never fetched.
//! - The index is untrusted input: every shard it names must be a plain `*.safetensors` file
//!   name (no separator, no `..`, not absolute), checked before any download or open, so a
//!   repo cannot make us read or write outside its snapshot.

use super::hub::{HubEnv, HubRepo};
use super::{read_json, ModelRef};
use crate::arch::{self, config::ParseOptions, ArchSpec};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub const CONFIG: &str = "config.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG: &str = "generation_config.json";
pub const CHAT_TEMPLATE: &str = "chat_template.jinja";
pub const SINGLE: &str = "model.safetensors";
pub const INDEX: &str = "model.safetensors.index.json";

/// How to fetch.
#[derive(Debug, Clone, Default)]
pub struct ResolveOptions {
    /// Show download progress bars on stderr (pass `ctx.progress()`: a terminal, no `--quiet`).
    pub progress: bool,
}

/// Every file a run needs, on local disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// For messages: the directory, or `org/name@rev`.
    pub source: String,
    /// The folder holding `config.json` (a local directory or the cache snapshot).
    pub dir: PathBuf,
    /// The commit of a Hub snapshot.
    pub commit: Option<String>,
    pub config: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
    pub chat_template: Option<PathBuf>,
    /// `model.safetensors.index.json` when the weights are sharded.
    pub index: Option<PathBuf>,
    /// The safetensors files to load: `model.safetensors`, or the text model's shards.
    pub weights: Vec<PathBuf>,
    /// Things the caller may want to warn about (e.g. the Hub was unreachable, cache used).
    pub notes: Vec<String>,
}

impl ModelFiles {
    /// The raw `config.json`.
    pub fn config_json(&self) -> Result<serde_json::Value> {
        read_json(&self.config)
    }

    /// `config.json` parsed into the per-layer table.
    pub fn spec(&self, opts: &ParseOptions) -> Result<ArchSpec> {
        arch::parse_config(&self.config_json()?, opts)
            .with_context(|| self.config.display().to_string())
    }
}

/// Resolve a model reference with the standard Hugging Face environment (see [`HubEnv`]).
pub fn resolve(model: &ModelRef, opts: &ResolveOptions) -> Result<ModelFiles> {
    match model {
        // A local folder needs no Hub settings (and is not stopped by malformed ones).
        ModelRef::Local(dir) => select(&mut LocalDir::new(dir)?),
        _ => resolve_with(model, &HubEnv::from_env()?, opts),
    }
}

/// Resolve a model reference against an explicit Hub environment.
pub fn resolve_with(model: &ModelRef, env: &HubEnv, opts: &ResolveOptions) -> Result<ModelFiles> {
    match model {
        ModelRef::Local(dir) => select(&mut LocalDir::new(dir)?),
        ModelRef::Alias(a) => resolve_hub(env, a.repo, None, opts),
        ModelRef::Repo { id, revision } => resolve_hub(env, id, revision.as_deref(), opts),
    }
}

fn resolve_hub(
    env: &HubEnv,
    id: &str,
    revision: Option<&str>,
    opts: &ResolveOptions,
) -> Result<ModelFiles> {
    let mut repo = HubRepo::new(env, id, revision, opts.progress)?;
    let listing = repo.listing()?;
    let mut notes = vec![];
    if listing.from_cache && !env.offline {
        notes.push(format!(
            "{} could not be reached; using the cached snapshot {} of {id}@{}",
            env.shown_endpoint(),
            short(&listing.commit),
            repo.revision()
        ));
    }
    let mut src = HubSource {
        from_cache: listing.from_cache,
        files: listing.files.into_iter().collect(),
        commit: listing.commit,
        repo,
        fetched: 0,
        to_fetch: 0,
    };
    let mut files = select(&mut src)?;
    files.commit = Some(src.commit.clone());
    files.notes.extend(notes);
    Ok(files)
}

fn short(commit: &str) -> &str {
    commit.get(..7).unwrap_or(commit)
}

/// Where files come from.
trait Source {
    /// For messages.
    fn describe(&self) -> String;
    fn has(&self, name: &str) -> bool;
    fn names(&self) -> Vec<String>;
    /// How many files will be fetched (for `[n/total]` on the bars).
    fn plan(&mut self, _count: usize) {}
    /// When the source only knows part of the repo (a cached snapshot): the error saying
    /// `what` is not there.
    fn absent(&self, _what: &str) -> Option<anyhow::Error> {
        None
    }
    fn get(&mut self, name: &str) -> Result<PathBuf>;
}

struct LocalDir {
    dir: PathBuf,
    names: BTreeSet<String>,
}

impl LocalDir {
    fn new(dir: &Path) -> Result<LocalDir> {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("reading model directory {}", dir.display()))?;
        let mut names = BTreeSet::new();
        for entry in entries.flatten() {
            if entry.path().is_file() {
                if let Some(n) = entry.file_name().to_str() {
                    names.insert(n.to_string());
                }
            }
        }
        Ok(LocalDir {
            dir: dir.to_path_buf(),
            names,
        })
    }
}

impl Source for LocalDir {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
    fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }
    fn names(&self) -> Vec<String> {
        self.names.iter().cloned().collect()
    }
    fn get(&mut self, name: &str) -> Result<PathBuf> {
        let p = self.dir.join(name);
        if !p.is_file() {
            bail!("{} not found", p.display());
        }
        Ok(p)
    }
}

struct HubSource<'e> {
    repo: HubRepo<'e>,
    /// The listing is the cached snapshot: what it lacks may exist on the Hub.
    from_cache: bool,
    commit: String,
    files: BTreeSet<String>,
    fetched: usize,
    to_fetch: usize,
}

impl Source for HubSource<'_> {
    fn describe(&self) -> String {
        format!("{}@{}", self.repo.id(), self.repo.revision())
    }
    fn has(&self, name: &str) -> bool {
        self.files.contains(name)
    }
    fn names(&self) -> Vec<String> {
        self.files.iter().cloned().collect()
    }
    fn plan(&mut self, count: usize) {
        self.to_fetch += count;
    }
    fn absent(&self, what: &str) -> Option<anyhow::Error> {
        self.from_cache.then(|| self.repo.not_cached(what))
    }
    fn get(&mut self, name: &str) -> Result<PathBuf> {
        self.fetched += 1;
        let n = (self.fetched, self.to_fetch.max(self.fetched));
        self.repo.get(name, Some(&self.commit), n)
    }
}

/// Pick the files of a run from `src`, fetching small files first and the weights last.
fn select(src: &mut dyn Source) -> Result<ModelFiles> {
    let what = src.describe();
    if !src.has(CONFIG) {
        if let Some(e) = src.absent(CONFIG) {
            return Err(e);
        }
        bail!(
            "{what} has no config.json\nhint: a model is a Hugging Face model folder or repo: config.json, tokenizer.json and *.safetensors"
        );
    }
    let optional = [
        TOKENIZER,
        TOKENIZER_CONFIG,
        GENERATION_CONFIG,
        CHAT_TEMPLATE,
    ];
    let present: Vec<&str> = optional.into_iter().filter(|f| src.has(f)).collect();
    let weights_plan = if src.has(INDEX) {
        2 // the index now; its shards are counted once it is read
    } else {
        1
    };
    src.plan(1 + present.len() + weights_plan);
    let config = src.get(CONFIG)?;
    let mut got = BTreeMap::new();
    for f in present {
        got.insert(f, src.get(f)?);
    }
    let (index, weights) = if src.has(INDEX) {
        let index_path = src.get(INDEX)?;
        let index = ShardIndex::read(&index_path)?;
        let shards = index.text_shards(&index_path)?;
        for s in &shards {
            if !src.has(s) {
                if let Some(e) = src.absent(s) {
                    return Err(e);
                }
                bail!(
                    "{} names shard {s}, but {what} has no such file",
                    index_path.display()
                );
            }
        }
        src.plan(shards.len().saturating_sub(1));
        let paths = shards
            .iter()
            .map(|s| src.get(s))
            .collect::<Result<Vec<_>>>()?;
        (Some(index_path), paths)
    } else if src.has(SINGLE) {
        (None, vec![src.get(SINGLE)?])
    } else if let Some(e) = src.absent(&format!("the weights ({SINGLE} or {INDEX})")) {
        return Err(e);
    } else {
        let others: Vec<String> = src
            .names()
            .into_iter()
            .filter(|n| {
                [".safetensors", ".gguf", ".bin", ".pt", ".pth", ".npz"]
                    .iter()
                    .any(|e| n.ends_with(e))
            })
            .collect();
        let found = if others.is_empty() {
            "no weights at all".to_string()
        } else {
            format!("only {}", others.join(", "))
        };
        bail!(
            "{what} has no {SINGLE} or {INDEX} ({found})\nhint: llmarch loads Hugging Face safetensors (single or sharded with an index)"
        );
    };
    let dir = config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok(ModelFiles {
        source: what,
        dir,
        commit: None,
        config,
        tokenizer: got.remove(TOKENIZER),
        tokenizer_config: got.remove(TOKENIZER_CONFIG),
        generation_config: got.remove(GENERATION_CONFIG),
        chat_template: got.remove(CHAT_TEMPLATE),
        index,
        weights,
        notes: vec![],
    })
}

/// Refuse a shard name that is not a plain `*.safetensors` file name inside the snapshot.
pub fn check_shard_name(name: &str, index: &Path) -> Result<()> {
    let bad = |why: &str| {
        anyhow!(
            "{} names shard `{}`, which {why}; refusing to read outside the model folder",
            index.display(),
            name.escape_debug()
        )
    };
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    if name.contains(['/', '\\']) {
        return Err(bad("is a path, not a file name"));
    }
    if name == "." || name == ".." || name.starts_with("..") {
        return Err(bad("points outside the folder"));
    }
    if name.contains(':') || name.chars().any(char::is_control) {
        return Err(bad("holds a drive separator or a control character"));
    }
    if !name.ends_with(".safetensors") {
        return Err(bad("is not a .safetensors file"));
    }
    Ok(())
}

/// Where the text model lives in a checkpoint's tensor names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Prefix of the text model's tensors, with its trailing dot.
    pub root: &'static str,
    /// Prefix of the LM head, with its trailing dot.
    pub lm_head: &'static str,
}

impl Layout {
    /// Multimodal wrapper (transformers 5: `Gemma4ForConditionalGeneration`, Qwen3.5 VL).
    pub const WRAPPER: Layout = Layout {
        root: "model.language_model.",
        lm_head: "lm_head.",
    };
    /// Multimodal wrapper as transformers 4 saved it (Gemma 3 era).
    pub const WRAPPER_V4: Layout = Layout {
        root: "language_model.model.",
        lm_head: "language_model.lm_head.",
    };
    /// A bare `*ForCausalLM`.
    pub const CAUSAL_LM: Layout = Layout {
        root: "model.",
        lm_head: "lm_head.",
    };

    /// A bare decoder stack at the top level (`embed.weight`, `layers.N...`, `head.weight`:
    /// DeepSeek's own naming, which the family renames at load): every tensor is text.
    pub const BARE: Layout = Layout {
        root: "",
        lm_head: "",
    };

    /// The layout of a checkpoint from its tensor names: the wrapper prefixes win, since a
    /// wrapper's vision tower also sits under `model.`; names with none of the prefixes but a
    /// top-level `layers.` are [`Layout::BARE`].
    pub fn detect<'a>(names: impl IntoIterator<Item = &'a str> + Clone) -> Option<Layout> {
        [Self::WRAPPER, Self::WRAPPER_V4, Self::CAUSAL_LM]
            .into_iter()
            .find(|l| names.clone().into_iter().any(|n| n.starts_with(l.root)))
            .or_else(|| {
                let mut names = names.into_iter();
                names
                    .any(|n| n.starts_with("layers."))
                    .then_some(Self::BARE)
            })
    }

    /// A tensor the text model may read: under the root, or the LM head.
    pub fn is_text(&self, name: &str) -> bool {
        name.starts_with(self.root) || name.starts_with(self.lm_head)
    }
}

/// `model.safetensors.index.json`: which shard holds which tensor.
#[derive(Debug, Clone)]
pub struct ShardIndex {
    pub weight_map: BTreeMap<String, String>,
}

impl ShardIndex {
    /// Read and validate an index: JSON with a `weight_map` of tensor → plain shard name.
    pub fn read(path: &Path) -> Result<ShardIndex> {
        let raw = read_json(path)?;
        let map = raw
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{} has no `weight_map` object", path.display()))?;
        let mut weight_map = BTreeMap::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                anyhow!(
                    "{}: weight_map[{tensor}] is not a file name",
                    path.display()
                )
            })?;
            check_shard_name(file, path)?;
            weight_map.insert(tensor.clone(), file.to_string());
        }
        if weight_map.is_empty() {
            bail!("{} has an empty weight_map", path.display());
        }
        Ok(ShardIndex { weight_map })
    }

    /// The shards holding the text model, in name order.
    pub fn text_shards(&self, path: &Path) -> Result<Vec<String>> {
        let layout = Layout::detect(self.weight_map.keys().map(String::as_str)).ok_or_else(|| {
            anyhow!(
                "{} maps no text-model tensor (none under `model.language_model.`, `language_model.model.` or `model.`)",
                path.display()
            )
        })?;
        let shards: BTreeSet<String> = self
            .weight_map
            .iter()
            .filter(|(t, _)| layout.is_text(t))
            .map(|(_, f)| f.clone())
            .collect();
        Ok(shards.into_iter().collect())
    }
}
