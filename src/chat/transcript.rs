//! `/save` and `/load`: a conversation as one JSON file holding the model, the settings and the
//! messages (in the `{"role", "content"}` form chat templates read, so the file also works as
//! input elsewhere). Written through a temp file and a rename, so a failed save leaves nothing
//! half-written; a file that is missing or not a transcript gives one clear line.

use crate::report::output_file::write_whole;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// The `format` field of every transcript.
pub const FORMAT: &str = "llmarch-chat/1";

/// Sampling and template settings in force when the transcript was saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: f32,
    pub seed: u64,
    pub max_tokens: usize,
    /// `enable_thinking` passed to the template; `None`: the template's default.
    pub thinking: Option<bool>,
}

/// A saved conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transcript {
    pub format: String,
    /// The model as it was given on the command line.
    pub model: String,
    /// Where the chat template came from.
    #[serde(default)]
    pub template: Option<String>,
    pub settings: Settings,
    pub messages: Vec<Value>,
}

/// Write `t` to `path` whole (see [`write_whole`]).
pub fn save(path: &Path, t: &Transcript) -> Result<()> {
    let text = serde_json::to_string_pretty(t)? + "\n";
    write_whole(path, |p| std::fs::write(p, &text).map_err(Into::into))
}

/// Check a transcript read from `path` (the caller reads it, with a size limit).
pub fn parse(text: &str, path: &Path) -> Result<Transcript> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let t: Transcript = serde_path_to_error::deserialize(de).map_err(|e| {
        let at = e.path().to_string();
        let inner = e.into_inner();
        anyhow!(
            "{} is not a chat transcript: {}{inner}",
            path.display(),
            if at == "." {
                String::new()
            } else {
                format!("at `{at}`: ")
            }
        )
    })?;
    if t.format != FORMAT {
        bail!(
            "{} is a `{}` file, not a chat transcript ({FORMAT})",
            path.display(),
            t.format
        );
    }
    check_messages(&t.messages)
        .with_context(|| format!("{} is not a chat transcript", path.display()))?;
    Ok(t)
}

/// Every message is an object with a string `role`; `content`, where present, is text or a list
/// of parts.
pub fn check_messages(messages: &[Value]) -> Result<()> {
    for (i, m) in messages.iter().enumerate() {
        let Some(obj) = m.as_object() else {
            bail!("message {i} is not an object");
        };
        match obj.get("role") {
            Some(Value::String(r)) if !r.is_empty() => {}
            _ => bail!("message {i} has no `role` string"),
        }
        match obj.get("content") {
            None | Some(Value::Null | Value::String(_) | Value::Array(_)) => {}
            Some(_) => bail!("message {i}: `content` is neither text nor a list of parts"),
        }
    }
    Ok(())
}
