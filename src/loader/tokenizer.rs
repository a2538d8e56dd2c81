//! The tokenizer and everything around it a run needs: `tokenizer.json` (through the
//! `tokenizers` crate), the special tokens and chat template of `tokenizer_config.json` (or
//! `chat_template.jinja`), the stop ids and sampling defaults of `generation_config.json`, and a
//! streaming detokenizer.
//!
//! Notable:
//! - Stop ids, first source that names any: `generation_config.json`, then `config.json` (top
//!   level, then `text_config`), then `tokenizer_config.json`'s `eos_token` — the order
//!   transformers' `generate` follows.
//! - [`StreamDecoder`] is incremental detokenization with prefix/read offsets (as in
//!   text-generation-inference): decode the held tokens with and without the new one and emit
//!   only the difference, holding back while the text ends in U+FFFD — an incomplete UTF-8
//!   sequence such as the byte-fallback tokens `<0xE2><0x82>` before their `<0xAC>`. So stdout
//!   never receives a broken character, and decoders that strip a leading space stay right.
//!   For ids that are not valid UTF-8 at all (a random model's output) the stream can differ
//!   from a one-shot decode, and is the better of the two: the `ByteFallback` decoder turns a
//!   whole run of byte tokens into U+FFFD when any byte of it is invalid, while the stream has
//!   already emitted the run's complete characters (`,,,` before a stray `<0xEC>`).

use super::generation_config::{GenerationDefaults, OneOrMany};
use super::model_files::ModelFiles;
use super::read_json;
use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use std::path::Path;
use tokenizers::Tokenizer;

/// What turns text into ids and back, and when to stop.
pub struct TokenizerBundle {
    /// `None` when the model ships no `tokenizer.json`: then only raw ids go in and out
    /// (`run --prompt-ids`), and whatever needs text fails with a hint ([`Self::tokenizer`]).
    pub tokenizer: Option<Tokenizer>,
    /// Where the model came from, for that error.
    pub source: String,
    /// The beginning-of-sequence id, when the model has one.
    pub bos_id: Option<u32>,
    /// `tokenizer_config.json`'s `add_bos_token`: [`TokenizerBundle::encode`] with special
    /// tokens makes sure the ids start with BOS.
    pub add_bos: bool,
    /// Ids that end generation.
    pub eos_ids: Vec<u32>,
    /// Which file `eos_ids` came from.
    pub eos_source: String,
    pub pad_id: Option<u32>,
    /// The Jinja chat template, when the model ships one.
    pub chat_template: Option<String>,
    /// Sampling defaults from `generation_config.json` (all `None` without the file).
    pub generation: GenerationDefaults,
}

impl std::fmt::Debug for TokenizerBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizerBundle")
            .field("vocab", &self.vocab_size())
            .field("source", &self.source)
            .field("bos_id", &self.bos_id)
            .field("add_bos", &self.add_bos)
            .field("eos_ids", &self.eos_ids)
            .field("eos_source", &self.eos_source)
            .field(
                "chat_template",
                &self.chat_template.as_ref().map(String::len),
            )
            .field("generation", &self.generation)
            .finish()
    }
}

/// Load the tokenizer of a resolved model.
/// Without `tokenizer.json` the bundle still has the stop ids, sampling defaults and chat
/// template; only text in or out fails.
pub fn load(files: &ModelFiles) -> Result<TokenizerBundle> {
    let tokenizer = files.tokenizer.as_deref().map(load_tokenizer).transpose()?;
    let tok_path = files
        .tokenizer
        .as_deref()
        .unwrap_or(Path::new("tokenizer.json"));
    let tok_config = match &files.tokenizer_config {
        Some(p) => read_json(p)?,
        None => Value::Null,
    };
    let generation = match &files.generation_config {
        Some(p) => GenerationDefaults::read(p)?,
        None => GenerationDefaults::default(),
    };
    let config = files.config_json()?;
    let tc_path = files
        .tokenizer_config
        .as_deref()
        .unwrap_or(Path::new("tokenizer_config.json"));

    // Special tokens: a string or an AddedToken object `{"content": ...}`.
    let special = |key: &str| -> Result<Option<u32>> {
        let content = match tok_config.get(key) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(v) => match v.get("content").and_then(Value::as_str) {
                Some(s) => s.to_string(),
                None => bail!(
                    "{}: `{key}` is neither a string nor a token object",
                    tc_path.display()
                ),
            },
        };
        let Some(tokenizer) = &tokenizer else {
            return Ok(None);
        };
        match tokenizer.token_to_id(&content) {
            Some(id) => Ok(Some(id)),
            None => bail!(
                "{}: {key} `{content}` is not in the vocabulary of {}",
                tc_path.display(),
                tok_path.display()
            ),
        }
    };
    let bos_from_tokenizer = special("bos_token")?;
    let eos_from_tokenizer = special("eos_token")?;
    let pad_from_tokenizer = special("pad_token")?;

    let config_ids = |key: &str| -> Result<Vec<u32>> {
        for scope in [Some(&config), config.get("text_config")] {
            if let Some(v) = scope.and_then(|s| s.get(key)).filter(|v| !v.is_null()) {
                let ids: OneOrMany = serde_json::from_value(v.clone()).map_err(|_| {
                    anyhow!(
                        "{}: `{key}` is not a token id or a list of ids",
                        files.config.display()
                    )
                })?;
                return Ok(ids.into_vec());
            }
        }
        Ok(vec![])
    };

    let (eos_ids, eos_source) = if !generation.eos_token_ids.is_empty() {
        (generation.eos_token_ids.clone(), "generation_config.json")
    } else if let ids @ [_, ..] = config_ids("eos_token_id")?.as_slice() {
        (ids.to_vec(), "config.json")
    } else if let Some(id) = eos_from_tokenizer {
        (vec![id], "tokenizer_config.json")
    } else {
        (vec![], "none")
    };
    let bos_id = bos_from_tokenizer.or(generation.bos_token_id).or_else(|| {
        config_ids("bos_token_id")
            .ok()
            .and_then(|v| v.first().copied())
    });
    let pad_id = pad_from_tokenizer.or(generation.pad_token_id);
    let add_bos = match tok_config.get("add_bos_token") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => bail!(
            "{}: `add_bos_token` is not true or false",
            tc_path.display()
        ),
    };

    let chat_template = match &files.chat_template {
        Some(p) => {
            Some(std::fs::read_to_string(p).map_err(|e| anyhow!("reading {}: {e}", p.display()))?)
        }
        None => template_from_config(&tok_config, tc_path)?,
    };

    Ok(TokenizerBundle {
        tokenizer,
        source: files.source.to_string(),
        bos_id,
        add_bos,
        eos_ids,
        eos_source: eos_source.to_string(),
        pad_id,
        chat_template,
        generation,
    })
}

/// Parse `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| anyhow!("cannot load {}: {e}", path.display()))
}

/// `chat_template` of `tokenizer_config.json`: a string, or a list of `{name, template}` of
/// which `default` (else the first) is used.
fn template_from_config(tok_config: &Value, path: &Path) -> Result<Option<String>> {
    match tok_config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
            };
            let pick = named("default").or_else(|| list.first());
            match pick.and_then(|t| t.get("template")).and_then(Value::as_str) {
                Some(t) => Ok(Some(t.to_string())),
                None => bail!(
                    "{}: `chat_template` list has no usable template",
                    path.display()
                ),
            }
        }
        Some(_) => bail!(
            "{}: `chat_template` is neither a string nor a list",
            path.display()
        ),
    }
}

impl TokenizerBundle {
    /// The tokenizer, or an error saying the model has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            anyhow!(
                "{} has no tokenizer.json, so text cannot be turned into token ids\nhint: pass --prompt-ids to feed raw token ids (the output is then ids too)",
                self.source
            )
        })
    }

    /// Text to ids. With `add_special_tokens`, the tokenizer's post-processor runs and, when
    /// `add_bos_token` is set, the ids are made to start with BOS. A chat-templated prompt
    /// already holds its special tokens as text: encode it with `false`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer()?
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("cannot tokenize the prompt: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        if let (true, true, Some(bos)) = (add_special_tokens, self.add_bos, self.bos_id) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Ids to text, all at once.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer()?
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("cannot decode token ids: {e}"))
    }

    /// Vocabulary size including added tokens (`None` without a tokenizer).
    pub fn vocab_size(&self) -> Option<usize> {
        self.tokenizer.as_ref().map(|t| t.get_vocab_size(true))
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    /// A streaming detokenizer that skips special tokens; without a tokenizer it writes each
    /// id as a number (` 17 4 230`).
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self.tokenizer.as_ref(), true)
    }
}

/// Incremental detokenization: feed ids one at a time, get only complete new text.
pub struct StreamDecoder<'t> {
    /// `None`: ids come out as numbers.
    tokenizer: Option<&'t Tokenizer>,
    skip_special: bool,
    ids: Vec<u32>,
    /// Start of the window decoded for context (its text was emitted already).
    prefix: usize,
    /// End of what has been emitted.
    read: usize,
}

impl<'t> StreamDecoder<'t> {
    pub fn new(tokenizer: Option<&'t Tokenizer>, skip_special: bool) -> StreamDecoder<'t> {
        StreamDecoder {
            tokenizer,
            skip_special,
            ids: vec![],
            prefix: 0,
            read: 0,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        match self.tokenizer {
            Some(t) => t
                .decode(ids, self.skip_special)
                .map_err(|e| anyhow!("cannot decode token ids: {e}")),
            None => Ok(ids.iter().map(|id| format!(" {id}")).collect()),
        }
    }

    /// Add one id; return the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        if self.tokenizer.is_none() {
            return Ok(Some(format!(" {id}")));
        }
        self.ids.push(id);
        self.emit(false)
    }

    /// Flush whatever is held back (an incomplete sequence comes out as U+FFFD).
    pub fn finish(&mut self) -> Result<Option<String>> {
        self.emit(true)
    }

    fn emit(&mut self, flush: bool) -> Result<Option<String>> {
        // 1. The text of the window before and after the new ids.
        let before = self.decode(&self.ids[self.prefix..self.read])?;
        let after = self.decode(&self.ids[self.prefix..])?;
        // 2. Hold back an incomplete character until the ids that finish it arrive.
        if after.len() <= before.len() || (!flush && after.ends_with('\u{FFFD}')) {
            if flush {
                self.prefix = self.ids.len();
                self.read = self.ids.len();
            }
            return Ok(None);
        }
        // 3. Emit the difference, then slide the window.
        let new = match after.strip_prefix(before.as_str()) {
            Some(rest) => rest.to_string(),
            None => {
                // The decoder rewrote earlier text (rare): emit past the common prefix.
                let common = before
                    .char_indices()
                    .zip(after.chars())
                    .take_while(|((_, a), b)| a == b)
                    .last()
                    .map(|((i, c), _)| i + c.len_utf8())
                    .unwrap_or(0);
                after[common..].to_string()
            }
        };
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(Some(new))
    }

    /// Every id fed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
