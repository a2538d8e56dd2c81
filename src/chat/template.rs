//! Chat templates: the model's own Jinja template rendered with minijinja, the way transformers'
//! `apply_chat_template` renders it, plus the built-in fallbacks for models that ship none.
//!
//! Notable:
//! - **Same environment as the reference** (transformers 5.23.0 `_compile_jinja_template`):
//!   `trim_blocks` and `lstrip_blocks` on, loop controls, `raise_exception`, `strftime_now`,
//!   a `tojson` that is Python's `json.dumps(ensure_ascii=False)` (not Jinja's HTML-escaping
//!   one), Python string/dict methods (`.strip()`, `.split()`, `.get()`, `.items()` through
//!   minijinja-contrib's pycompat), and Python's `str()` for printed values (`None`, `True`).
//!   Jinja2's `sequence` test is also true for strings and mappings; so is ours. The
//!   `{% generation %}` block (a transformers extension marking assistant text) is rewritten to
//!   a plain `{% if true %}` block before parsing, keeping its whitespace control.
//! - **The context** is what `apply_chat_template` passes: `messages` (keys whose value is null
//!   dropped; `reasoning_content` copied to `thinking` as transformers aliases it), `tools`,
//!   `documents`, `add_generation_prompt`, the tokenizer's special tokens (`bos_token`,
//!   `eos_token`, ...) and extra keywords such as `enable_thinking`.
//! - **Templates are untrusted** (they come from any repository): minijinja has no file system,
//!   no imports and no attribute access to host objects; rendering runs on a fuel budget that
//!   bounds both the instructions executed and the bytes allocated, and a recursion limit, so a
//!   template that loops forever or doubles a string 60 times fails with a clear error instead
//!   of hanging the terminal or exhausting memory.
//! - [`ChatTemplate::end_of_turn_ids`] finds the token that closes an assistant turn
//!   (`<turn|>`, `<|im_end|>`, `</assistant>`) by rendering a probe conversation, so generation
//!   stops there even where `generation_config.json` does not list it.

use super::pyfmt;
use crate::arch::ArchSpec;
use crate::loader::tokenizer::TokenizerBundle;
use anyhow::{anyhow, bail, Context, Result};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::{Map, Value as Json};
use std::path::Path;

/// Fuel for one render: about this many template instructions, or 64× as many bytes created
/// (64 MB). On top, [`FUEL_PER_BYTE`] for each byte of the conversation. Measured: the Gemma 4
/// templates spend about 900 plus 1 per conversation byte on a ten-turn conversation (6 500 in
/// all for 5.6 KB), Qwen and Laguna less.
pub const BASE_FUEL: u64 = 1_000_000;

/// Fuel per byte of the conversation (messages and tools as JSON).
pub const FUEL_PER_BYTE: u64 = 4;

/// Macro and include depth.
const RECURSION_LIMIT: usize = 64;

/// The built-in templates: name, file under `templates/`, source.
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "gemma-4-E2B-it",
        include_str!("../../templates/gemma-4-E2B-it.jinja"),
    ),
    (
        "gemma-4-31B-it",
        include_str!("../../templates/gemma-4-31B-it.jinja"),
    ),
    (
        "Qwen3.6-27B",
        include_str!("../../templates/Qwen3.6-27B.jinja"),
    ),
    (
        "Laguna-XS.2",
        include_str!("../../templates/Laguna-XS.2.jinja"),
    ),
    (
        "history/gemma-4-E2B-it.pre-2026-07",
        include_str!("../../templates/history/gemma-4-E2B-it.pre-2026-07.jinja"),
    ),
    (
        "history/gemma-4-31B-it.pre-2026-07",
        include_str!("../../templates/history/gemma-4-31B-it.pre-2026-07.jinja"),
    ),
];

/// The source of a built-in template by name.
pub fn builtin(name: &str) -> Option<&'static str> {
    BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// The built-in template for a model that ships none, by family: Gemma 4 E2B/E4B (the ones with
/// KV-shared layers) and the larger Gemma 4 models differ in their generation prompt.
pub fn fallback_for(spec: &ArchSpec) -> Option<&'static str> {
    match spec.family {
        "gemma4" if spec.layers.iter().any(|l| l.kv_source.is_some()) => Some("gemma-4-E2B-it"),
        "gemma4" => Some("gemma-4-31B-it"),
        "qwen3_5" => Some("Qwen3.6-27B"),
        "laguna" => Some("Laguna-XS.2"),
        _ => None,
    }
}

/// What a render is asked for.
#[derive(Debug, Clone, Copy)]
pub struct RenderRequest<'a> {
    pub messages: &'a [Json],
    pub tools: Option<&'a Json>,
    pub add_generation_prompt: bool,
    /// Extra template variables: `enable_thinking`, `preserve_thinking`, ...
    pub kwargs: &'a Map<String, Json>,
}

/// A compiled chat template with its special tokens.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for messages.
    pub origin: String,
    /// `bos_token`, `eos_token`, ... as the tokenizer config names them.
    pub special: Map<String, Json>,
    /// Whether the template reads `enable_thinking`.
    pub takes_thinking: bool,
    name: String,
    fuel: u64,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("special", &self.special)
            .finish()
    }
}

impl ChatTemplate {
    /// Compile `source`; `origin` names it in errors (`gemma/tokenizer_config.json`).
    pub fn new(source: &str, origin: &str, special: Map<String, Json>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| anyhow!("internal: {e}"))?,
        );
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            let text = pyfmt::str(value)?;
            out.write_str(&text).map_err(Error::from)
        });
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |fmt: &str| super::strftime::now(fmt));
        env.add_filter("tojson", tojson);
        env.add_filter("string", |v: &Value| pyfmt::str(v));
        env.add_test("sequence", |v: &Value| {
            matches!(
                v.kind(),
                ValueKind::Undefined | ValueKind::Seq | ValueKind::String | ValueKind::Map
            )
        });
        let rewritten = rewrite_generation_blocks(source);
        // Errors say `(in NAME:LINE)`: name the template by its file.
        let name = Path::new(origin)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(origin)
            .to_string();
        env.add_template_owned(name.clone(), rewritten)
            .map_err(|e| template_error(e, origin))?;
        Ok(ChatTemplate {
            env,
            name,
            origin: origin.to_string(),
            special,
            takes_thinking: source.contains("enable_thinking"),
            fuel: BASE_FUEL,
        })
    }

    /// Set the fixed part of the fuel budget (the per-byte share stays).
    pub fn with_fuel(mut self, fuel: u64) -> Self {
        self.fuel = fuel;
        self
    }

    /// Render a conversation as `apply_chat_template(tokenize=False)` does.
    pub fn render(&self, req: &RenderRequest) -> Result<String> {
        let mut ctx = self.special.clone();
        for (k, v) in req.kwargs {
            ctx.insert(k.clone(), v.clone());
        }
        let messages: Vec<Json> = req.messages.iter().map(template_message).collect();
        // Every byte of the conversation may be read a few times: scale the budget with it.
        let size: usize = messages.iter().map(|m| m.to_string().len()).sum::<usize>()
            + req.tools.map_or(0, |t| t.to_string().len());
        ctx.insert("messages".into(), Json::Array(messages));
        ctx.insert("tools".into(), req.tools.cloned().unwrap_or(Json::Null));
        ctx.insert("documents".into(), Json::Null);
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(req.add_generation_prompt),
        );
        let env_fuel = self
            .fuel
            .saturating_add((size as u64).saturating_mul(FUEL_PER_BYTE))
            .max(1);
        // Fuel is an environment setting; a cheap clone keeps `render` `&self`.
        let mut env = self.env.clone();
        env.set_fuel(Some(env_fuel));
        let tmpl = env
            .get_template(&self.name)
            .map_err(|e| template_error(e, &self.origin))?;
        tmpl.render(Value::from(Serde(&Json::Object(ctx))))
            .map_err(|e| template_error(e, &self.origin))
    }

    /// The ids that close an assistant turn in this template: render `user, assistant` and take
    /// the first added (special) token after the assistant's text. Empty if the probe fails or
    /// finds none.
    pub fn end_of_turn_ids(&self, tok: &TokenizerBundle) -> Vec<u32> {
        const MARK: &str = "Probe reply 7f3a";
        let messages = [
            serde_json::json!({"role": "user", "content": "Probe question"}),
            serde_json::json!({"role": "assistant", "content": MARK}),
        ];
        let Ok(text) = self.render(&RenderRequest {
            messages: &messages,
            tools: None,
            add_generation_prompt: false,
            kwargs: &Map::new(),
        }) else {
            return vec![];
        };
        let Some(at) = text.rfind(MARK) else {
            return vec![];
        };
        let tail = &text[at + MARK.len()..];
        let Ok(ids) = tok.encode(tail, false) else {
            return vec![];
        };
        let Ok(tokenizer) = tok.tokenizer() else {
            return vec![];
        };
        let added = tokenizer.get_added_tokens_decoder();
        ids.into_iter()
            .find(|id| added.get(id).is_some_and(|t| !t.content.trim().is_empty()))
            .into_iter()
            .collect()
    }
}

/// A message as the template sees it: keys with null values dropped, and reasoning under every
/// name templates read it by (`reasoning_content`, `thinking`), as transformers does.
fn template_message(m: &Json) -> Json {
    let Some(obj) = m.as_object() else {
        return m.clone();
    };
    let mut out: Map<String, Json> = obj
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|k| out.get(*k).cloned());
    if let Some(r) = reasoning {
        // transformers: {"thinking": r, **message, "reasoning_content": r}
        let mut aliased = Map::new();
        aliased.insert("thinking".into(), r.clone());
        for (k, v) in out {
            aliased.insert(k, v);
        }
        aliased.insert("reasoning_content".into(), r);
        out = aliased;
    }
    Json::Object(out)
}

/// `raise_exception(message)`: the template refuses the conversation.
fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, RAISED).with_source(Raised(msg)))
}

const RAISED: &str = "raise_exception";

#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(
    value: &Value,
    ensure_ascii: Option<bool>,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let ensure_ascii = match kwargs.get::<Option<bool>>("ensure_ascii")? {
        Some(b) => b,
        None => ensure_ascii.unwrap_or(false),
    };
    let indent = kwargs.get::<Option<Value>>("indent")?.or(indent);
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.clamp(0, 64) as usize)),
            (None, Some(s)) => Some(s.to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be a number or a string",
                ))
            }
        },
    };
    let separators = match kwargs.get::<Option<Value>>("separators")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    )
                })?;
            match <[String; 2]>::try_from(parts) {
                Ok([i, k]) => Some((i, k)),
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let text = pyfmt::json_dumps(
        value,
        &pyfmt::JsonOptions {
            ensure_ascii,
            indent,
            separators,
            sort_keys,
        },
    )?;
    // minijinja charges the returned string against the fuel.
    Ok(Value::from(text))
}

/// Replace transformers' `{% generation %}` / `{% endgeneration %}` tags by `{% if true %}` /
/// `{% endif %}`, keeping the whitespace-control marks (`-`, `+`) around them.
pub fn rewrite_generation_blocks(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        // The closing `%}` comes after the opening `{%` (in `{%}` they overlap: no tag); a
        // malformed tag is copied as it is and minijinja reports it.
        let Some((inner, after)) = tag
            .get(2..)
            .and_then(|t| t.find("%}").map(|e| (&t[..e], &t[e + 2..])))
        else {
            out.push_str(tag);
            return out;
        };
        let (lead, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (inner.get(..1).unwrap_or(""), b),
            None => ("", inner),
        };
        let (body, trail) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, body.get(b.len()..).unwrap_or("")),
            None => (body, ""),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => out.push_str(&format!("{{%{lead} {r} {trail}%}}")),
            None => out.push_str(&tag[..tag.len() - after.len()]),
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// What went wrong in a template, as one clear line.
#[derive(Debug)]
pub enum TemplateFailure {
    /// The template called `raise_exception(message)`: it refuses this conversation.
    Raised(String),
    /// It ran out of fuel: it loops or builds too much text.
    OutOfFuel,
    /// Anything else: syntax, undefined values, bad operations.
    Other,
}

/// Classify an error returned by [`ChatTemplate::render`].
pub fn failure(e: &anyhow::Error) -> TemplateFailure {
    for cause in e.chain() {
        if let Some(r) = cause.downcast_ref::<Raised>() {
            return TemplateFailure::Raised(r.0.clone());
        }
        if let Some(m) = cause.downcast_ref::<Error>() {
            if m.kind() == ErrorKind::OutOfFuel {
                return TemplateFailure::OutOfFuel;
            }
        }
    }
    TemplateFailure::Other
}

fn template_error(e: Error, origin: &str) -> anyhow::Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Raised>() {
            return anyhow::Error::new(Raised(r.0.clone())).context(format!(
                "the chat template ({origin}) refused the conversation"
            ));
        }
        source = s.source();
    }
    let what = match e.kind() {
        ErrorKind::OutOfFuel => {
            "ran out of its execution budget (it loops, or builds too much text)"
        }
        ErrorKind::SyntaxError => "has a syntax error",
        _ => "failed",
    };
    anyhow::Error::new(e).context(format!("the chat template ({origin}) {what}"))
}

/// The special tokens a template sees, from `tokenizer_config.json` (a string or an AddedToken
/// object each): `bos_token`, `eos_token`, `unk_token`, `sep_token`, `pad_token`, `cls_token`,
/// `mask_token` where set.
pub fn special_tokens(tokenizer_config: Option<&Path>) -> Result<Map<String, Json>> {
    let mut out = Map::new();
    let Some(path) = tokenizer_config else {
        return Ok(out);
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let json: Json = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    for key in [
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
    ] {
        let v = match json.get(key) {
            None | Some(Json::Null) => continue,
            Some(Json::String(s)) => s.clone(),
            Some(v) => match v.get("content").and_then(Json::as_str) {
                Some(s) => s.to_string(),
                None => bail!(
                    "{}: `{key}` is neither a string nor a token object",
                    path.display()
                ),
            },
        };
        out.insert(key.to_string(), Json::String(v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_keep_their_whitespace_control() {
        assert_eq!(
            rewrite_generation_blocks("a{%- generation -%}b{% endgeneration +%}c{% if x %}"),
            "a{%- if true -%}b{% endif +%}c{% if x %}"
        );
    }

    /// Malformed tags from untrusted templates: never a panic (`{%}` used to slice `tag[2..1]`),
    /// a one-line syntax error naming the template instead. Then every string of up to five
    /// characters from the tag alphabet (with a multi-byte letter) through the rewrite.
    #[test]
    fn malformed_tags_are_syntax_errors_not_panics() {
        for src in [
            "{%}",
            "{%",
            "{{",
            "{#",
            "{%-}",
            "{%+",
            "{%é%}",
            "{%é",
            "é{%}é",
            "{%%}",
            "{%-%}",
            "{% generation",
            "{% generation %}",
            "{%}{% endgeneration %}",
            "{%- endgeneration",
            "{{}}",
            "{#}",
            "{{ x }",
            "%}{%",
        ] {
            if let Err(e) = ChatTemplate::new(src, "bad.jinja", Map::new()) {
                let e = format!("{e:#}");
                assert!(e.contains("bad.jinja"), "{src}: {e}");
                assert!(!e.contains('\n'), "{src}: one line: {e}");
            }
        }
        assert_eq!(rewrite_generation_blocks("{%}"), "{%}");
        assert_eq!(rewrite_generation_blocks("é{%-%}é"), "é{%-%}é");
        assert_eq!(
            rewrite_generation_blocks("{%é generation %}{%+generation-%}"),
            "{%é generation %}{%+ if true -%}"
        );

        let alphabet = ['{', '%', '}', '-', '+', '#', ' ', 'é'];
        let mut strings = vec![String::new()];
        for _ in 0..5 {
            strings = strings
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            for s in &strings {
                let out = rewrite_generation_blocks(s);
                assert_eq!(out, *s, "only generation tags are rewritten");
            }
        }
    }

    fn t(src: &str) -> ChatTemplate {
        ChatTemplate::new(src, "test", Map::new()).unwrap()
    }

    fn render(t: &ChatTemplate) -> Result<String> {
        t.render(&RenderRequest {
            messages: &[serde_json::json!({"role": "user", "content": "hi", "x": null})],
            tools: None,
            add_generation_prompt: true,
            kwargs: &Map::new(),
        })
    }

    #[test]
    fn python_semantics() {
        let out = render(&t(
            "{{ messages[0].content.upper() }} {{ none }} {{ true }} {{ [1, 'a'] }} {{ messages[0] | tojson }} {{ 'ab' is sequence }} {{ messages[0].x is defined }}",
        ))
        .unwrap();
        assert_eq!(
            out,
            r#"HI None True [1, 'a'] {"role": "user", "content": "hi"} True False"#
        );
    }

    #[test]
    fn raise_exception_and_runaway_templates_give_clear_errors() {
        let e = render(&t("{{ raise_exception('No way.') }}")).unwrap_err();
        assert!(matches!(failure(&e), TemplateFailure::Raised(m) if m == "No way."));
        assert!(
            format!("{e:#}").contains("refused the conversation: No way."),
            "{e:#}"
        );

        let looping = "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}";
        let e = render(&t(looping)).unwrap_err();
        assert!(matches!(failure(&e), TemplateFailure::OutOfFuel), "{e:#}");

        let doubling = "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}";
        let e = render(&t(doubling)).unwrap_err();
        assert!(matches!(failure(&e), TemplateFailure::OutOfFuel), "{e:#}");

        let recursing = "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}";
        let e = render(&t(recursing)).unwrap_err();
        assert!(format!("{e:#}").contains("chat template (test)"), "{e:#}");

        let e = ChatTemplate::new("{% if %}", "bad.jinja", Map::new()).unwrap_err();
        assert!(
            format!("{e:#}").contains("bad.jinja) has a syntax error"),
            "{e:#}"
        );
    }
}
