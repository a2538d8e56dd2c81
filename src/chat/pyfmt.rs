//! Python's formatting of template values, which chat templates were written against: `str()`
//! (what `{{ x }}` and `|string` print), `repr()` (how `str()` shows items inside a list or dict)
//! and `json.dumps` (transformers' `tojson` filter). minijinja formats the same values the Rust
//! way (`none`, `true`, `["a"]`, compact JSON with HTML escapes), so a template printing a
//! boolean or a tool schema would render differently from the reference without these.
//!
//! Notable:
//! - Floats print as Python's `repr(float)`: shortest round-trip digits, `.0` on whole numbers,
//!   exponent form (`1e+16`, `1.5e-05`) outside `[1e-4, 1e16)`.
//! - `json.dumps` defaults as transformers calls it: `ensure_ascii=False`, separators `", "` and
//!   `": "` (`","` between items when `indent` is given), keys in insertion order unless
//!   `sort_keys`.

use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind};
use std::fmt::Write;

/// Containers nested deeper than this are refused (a self-referencing value cannot be built from
/// JSON, but a template can nest lists by hand).
const MAX_DEPTH: usize = 256;

/// Python `repr(float)`.
pub fn float(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.into();
    }
    let a = f.abs();
    if a == 0.0 || (1e-4..1e16).contains(&a) {
        // Rust's Debug is the shortest round-trip form and keeps `.0` on whole numbers.
        return format!("{f:?}");
    }
    // Exponent form: Rust gives `1.5e-5`, Python `1.5e-05`.
    let s = format!("{f:e}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// Python `str(value)`.
pub fn str(v: &Value) -> Result<String, Error> {
    match v.kind() {
        ValueKind::String => Ok(v.as_str().unwrap_or_default().to_string()),
        ValueKind::Undefined => Ok(String::new()),
        _ => repr(v),
    }
}

/// Python `repr(value)`.
pub fn repr(v: &Value) -> Result<String, Error> {
    let mut out = String::new();
    repr_into(v, &mut out, 0)?;
    Ok(out)
}

fn too_deep() -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        "value nested too deeply to print",
    )
}

fn repr_into(v: &Value, out: &mut String, depth: usize) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number => out.push_str(&number(v)),
        ValueKind::String => repr_str(v.as_str().unwrap_or_default(), out),
        ValueKind::Map => {
            out.push('{');
            for (i, key) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                repr_into(&key, out, depth + 1)?;
                out.push_str(": ");
                repr_into(&v.get_item(&key)?, out, depth + 1)?;
            }
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                repr_into(&item, out, depth + 1)?;
            }
            out.push(']');
        }
        _ => out.push_str(&v.to_string()),
    }
    Ok(())
}

fn number(v: &Value) -> String {
    if v.is_integer() {
        v.to_string()
    } else {
        match f64::try_from(v.clone()) {
            Ok(f) => float(f),
            Err(_) => v.to_string(),
        }
    }
}

/// Python's quoting: single quotes unless the text has `'` and no `"`.
fn repr_str(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// `json.dumps` options.
#[derive(Debug, Clone, Default)]
pub struct JsonOptions {
    pub ensure_ascii: bool,
    /// Spaces per level; `None` for one line.
    pub indent: Option<String>,
    /// `(item, key)` separators; defaults depend on `indent`.
    pub separators: Option<(String, String)>,
    pub sort_keys: bool,
}

/// Python `json.dumps(value, ...)`.
pub fn json_dumps(v: &Value, opts: &JsonOptions) -> Result<String, Error> {
    let (item_sep, key_sep) = match &opts.separators {
        Some((i, k)) => (i.clone(), k.clone()),
        None if opts.indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    let j = Json {
        opts,
        item_sep: &item_sep,
        key_sep: &key_sep,
    };
    j.value(v, &mut out, 0)?;
    Ok(out)
}

struct Json<'a> {
    opts: &'a JsonOptions,
    item_sep: &'a str,
    key_sep: &'a str,
}

impl Json<'_> {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(ind) = &self.opts.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn value(&self, v: &Value, out: &mut String, depth: usize) -> Result<(), Error> {
        if depth > MAX_DEPTH {
            return Err(too_deep());
        }
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                    out.push_str(&if f.is_nan() {
                        "NaN".to_string()
                    } else if f.is_infinite() {
                        if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string()
                    } else {
                        float(f)
                    });
                }
            }
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Map => {
                let mut pairs: Vec<(String, Value)> = vec![];
                for key in v.try_iter()? {
                    let item = v.get_item(&key)?;
                    let k = match key.kind() {
                        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                        ValueKind::None => "null".into(),
                        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.into(),
                        ValueKind::Number => number(&key),
                        _ => {
                            return Err(Error::new(
                                ErrorKind::InvalidOperation,
                                format!(
                                    "tojson: keys must be str, int, float, bool or None, not {}",
                                    key.kind()
                                ),
                            ))
                        }
                    };
                    pairs.push((k, item));
                }
                if self.opts.sort_keys {
                    pairs.sort_by(|a, b| a.0.cmp(&b.0));
                }
                if pairs.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, (k, item)) in pairs.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.string(k, out);
                    out.push_str(self.key_sep);
                    self.value(item, out, depth + 1)?;
                }
                self.newline(out, depth);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.value(item, out, depth + 1)?;
                }
                self.newline(out, depth);
                out.push(']');
            }
            kind => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a {kind} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.opts.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_repr() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1.5e-5, "1.5e-05"),
            (1e-4, "0.0001"),
            (123456789.0, "123456789.0"),
            (0.0, "0.0"),
        ] {
            assert_eq!(float(f), want, "{f}");
        }
    }

    #[test]
    fn str_repr_and_json_follow_python() {
        let v = Value::from(minijinja::value::Serde(serde_json::json!({
            "b": [true, null, 1, 2.5, "it's"], "a": {"x": "é\n\"q\""}
        })));
        assert_eq!(
            str(&v).unwrap(),
            r#"{'b': [True, None, 1, 2.5, "it's"], 'a': {'x': 'é\n"q"'}}"#
        );
        let dumps = |o: &JsonOptions| json_dumps(&v, o).unwrap();
        assert_eq!(
            dumps(&JsonOptions::default()),
            r#"{"b": [true, null, 1, 2.5, "it's"], "a": {"x": "é\n\"q\""}}"#
        );
        assert_eq!(
            dumps(&JsonOptions {
                ensure_ascii: true,
                sort_keys: true,
                ..Default::default()
            }),
            r#"{"a": {"x": "\u00e9\n\"q\""}, "b": [true, null, 1, 2.5, "it's"]}"#
        );
        assert_eq!(
            dumps(&JsonOptions {
                indent: Some("  ".into()),
                ..Default::default()
            }),
            "{\n  \"b\": [\n    true,\n    null,\n    1,\n    2.5,\n    \"it's\"\n  ],\n  \"a\": {\n    \"x\": \"é\\n\\\"q\\\"\"\n  }\n}"
        );
    }
}
