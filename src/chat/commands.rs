//! What the user types, parsed without any I/O: slash commands (with their values checked, so a
//! bad one is a one-line error and the session goes on) and multi-line input (a trailing `\`
//! continues the line; `"""` opens and closes a block).

use std::path::PathBuf;

/// The `/help` text.
pub const HELP: &str = "\
/help                 this list
/exit                 end the session (also Ctrl-D)
/clear                forget the conversation (the system prompt stays)
/system [TEXT|-]      show, set or (with -) remove the system prompt
/regen                answer the last message again
/undo                 remove the last exchange
/save FILE            write the transcript (model, settings, messages) as JSON
/load FILE            continue a saved transcript
/set [KEY VALUE]      show settings, or set temperature|top_k|top_p|min_p|repeat_penalty|
                      max_tokens|seed|thinking (top_k, top_p, min_p, thinking take `off`)
/kv                   what each layer's KV cache holds now
/layers               the model's per-layer table
/stats                tokens and speeds so far
Multi-line input: end a line with \\ to continue, or wrap the text in \"\"\" ... \"\"\".
Ctrl-C stops a reply; Ctrl-D or /exit ends the session.";

/// A slash command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Help,
    Exit,
    Clear,
    /// `None`: show it; `Some(None)`: remove it; `Some(Some(text))`: set it.
    System(Option<Option<String>>),
    Regen,
    Undo,
    Save(PathBuf),
    Load(PathBuf),
    /// `None`: show the settings.
    Set(Option<Setting>),
    Kv,
    Layers,
    Stats,
}

/// A checked `/set` value.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    Temperature(f32),
    TopK(Option<usize>),
    TopP(Option<f32>),
    MinP(Option<f32>),
    RepeatPenalty(f32),
    MaxTokens(usize),
    Seed(u64),
    /// `enable_thinking` for templates that take it; `None`: the template's default.
    Thinking(Option<bool>),
}

/// `Some` if `input` is a command (starts with `/`): the command or a one-line error.
pub fn parse(input: &str) -> Option<Result<Command, String>> {
    let rest = input.trim_end().strip_prefix('/')?;
    let (name, arg) = match rest.split_once(char::is_whitespace) {
        Some((n, a)) => (n, a.trim()),
        None => (rest, ""),
    };
    let no_arg = |c: Command| -> Result<Command, String> {
        if arg.is_empty() {
            Ok(c)
        } else {
            Err(format!("/{name} takes no argument"))
        }
    };
    let file = |c: fn(PathBuf) -> Command| -> Result<Command, String> {
        if arg.is_empty() {
            Err(format!("/{name} needs a file name, e.g. /{name} chat.json"))
        } else {
            Ok(c(PathBuf::from(arg)))
        }
    };
    Some(match name {
        "help" | "?" => no_arg(Command::Help),
        "exit" | "quit" | "bye" => no_arg(Command::Exit),
        "clear" => no_arg(Command::Clear),
        "regen" => no_arg(Command::Regen),
        "undo" => no_arg(Command::Undo),
        "kv" => no_arg(Command::Kv),
        "layers" => no_arg(Command::Layers),
        "stats" => no_arg(Command::Stats),
        "system" => Ok(Command::System(match arg {
            "" => None,
            "-" => Some(None),
            text => Some(Some(text.to_string())),
        })),
        "save" => file(Command::Save),
        "load" => file(Command::Load),
        "set" if arg.is_empty() => Ok(Command::Set(None)),
        "set" => parse_setting(arg).map(|s| Command::Set(Some(s))),
        _ => Err(format!(
            "unknown command /{name} (/help lists the commands; start the line with a space to send it as text)"
        )),
    })
}

fn parse_setting(arg: &str) -> Result<Setting, String> {
    let (key, value) = match arg.split_once(char::is_whitespace) {
        Some((k, v)) => (k, v.trim()),
        None => return Err(format!("/set {arg}: give a value, e.g. /set {arg} 0.7")),
    };
    let off = matches!(value, "off" | "none");
    let float = |min: f32, max: f32| -> Result<f32, String> {
        let v: f32 = value
            .parse()
            .map_err(|_| format!("/set {key}: `{value}` is not a number"))?;
        if !v.is_finite() || v < min || v > max {
            return Err(format!(
                "/set {key}: {value} is outside {min}..={}",
                if max == f32::MAX {
                    "∞".to_string()
                } else {
                    max.to_string()
                }
            ));
        }
        Ok(v)
    };
    let count = |min: u64| -> Result<u64, String> {
        let v: u64 = value
            .parse()
            .map_err(|_| format!("/set {key}: `{value}` is not a whole number"))?;
        if v < min {
            return Err(format!("/set {key}: must be at least {min}"));
        }
        Ok(v)
    };
    match key {
        "temperature" | "temp" => float(0.0, f32::MAX).map(Setting::Temperature),
        "top_k" | "top-k" if off => Ok(Setting::TopK(None)),
        "top_k" | "top-k" => count(1).map(|v| Setting::TopK(Some(v as usize))),
        "top_p" | "top-p" if off => Ok(Setting::TopP(None)),
        "top_p" | "top-p" => float(0.0, 1.0).map(|v| Setting::TopP(Some(v))),
        "min_p" | "min-p" if off => Ok(Setting::MinP(None)),
        "min_p" | "min-p" => float(0.0, 1.0).map(|v| Setting::MinP(Some(v))),
        "repeat_penalty" | "repeat-penalty" => {
            let v = float(0.0, f32::MAX)?;
            if v == 0.0 {
                return Err(format!("/set {key}: must be positive"));
            }
            Ok(Setting::RepeatPenalty(v))
        }
        "max_tokens" | "max-tokens" => count(1).map(|v| Setting::MaxTokens(v as usize)),
        "seed" => count(0).map(Setting::Seed),
        "thinking" | "think" => match value {
            "on" | "true" | "yes" => Ok(Setting::Thinking(Some(true))),
            "off" | "false" | "no" => Ok(Setting::Thinking(Some(false))),
            "default" => Ok(Setting::Thinking(None)),
            _ => Err(format!("/set {key}: `{value}` is not on, off or default")),
        },
        _ => Err(format!(
            "/set: unknown setting `{key}` (temperature, top_k, top_p, min_p, repeat_penalty, max_tokens, seed, thinking)"
        )),
    }
}

/// Joins input lines into one message: a trailing `\` continues the line, `"""` opens a block
/// that runs until a line ending in `"""`.
#[derive(Debug, Default)]
pub struct LineAssembler {
    buf: String,
    block: bool,
    pending: bool,
}

impl LineAssembler {
    /// Add a line (without its newline); `Some(text)` when a message is complete.
    pub fn feed(&mut self, line: &str) -> Option<String> {
        if self.block {
            match line.trim_end().strip_suffix("\"\"\"") {
                Some(last) => {
                    self.buf.push_str(last);
                    return Some(self.take());
                }
                None => {
                    self.buf.push_str(line);
                    self.buf.push('\n');
                    return None;
                }
            }
        }
        if !self.pending {
            if let Some(rest) = line.trim_start().strip_prefix("\"\"\"") {
                if let Some(inner) = rest.trim_end().strip_suffix("\"\"\"") {
                    self.buf.push_str(inner);
                    return Some(self.take());
                }
                self.block = true;
                self.pending = true;
                if !rest.is_empty() {
                    self.buf.push_str(rest);
                    self.buf.push('\n');
                }
                return None;
            }
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                self.buf.push_str(head);
                self.buf.push('\n');
                self.pending = true;
                None
            }
            None => {
                self.buf.push_str(line);
                Some(self.take())
            }
        }
    }

    /// A message is half typed (the prompt shows `...`).
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// Drop a half-typed message (Ctrl-C at the continuation prompt).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.block = false;
        self.pending = false;
    }

    /// End of input: whatever is half typed.
    pub fn finish(&mut self) -> Option<String> {
        (self.pending && !self.buf.trim().is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        self.block = false;
        self.pending = false;
        std::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_bad_values() {
        assert_eq!(parse("hello"), None);
        assert_eq!(parse(" /etc/hosts is what?"), None);
        assert_eq!(parse("/exit"), Some(Ok(Command::Exit)));
        assert_eq!(
            parse("/set temperature 0.5"),
            Some(Ok(Command::Set(Some(Setting::Temperature(0.5)))))
        );
        assert_eq!(
            parse("/set top_k off"),
            Some(Ok(Command::Set(Some(Setting::TopK(None)))))
        );
        assert_eq!(
            parse("/system Be brief."),
            Some(Ok(Command::System(Some(Some("Be brief.".into())))))
        );
        for (bad, says) in [
            ("/set temperature banana", "`banana` is not a number"),
            ("/set top_p 1.5", "outside 0..=1"),
            ("/set top_k 0", "at least 1"),
            ("/set max_tokens -3", "not a whole number"),
            ("/set colour red", "unknown setting `colour`"),
            ("/set seed", "give a value"),
            ("/frobnicate", "unknown command /frobnicate"),
            ("/save", "needs a file name"),
            ("/exit now", "takes no argument"),
        ] {
            let e = parse(bad).unwrap().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
    }

    #[test]
    fn multiline_input() {
        let mut a = LineAssembler::default();
        assert_eq!(a.feed("one"), Some("one".into()));
        assert_eq!(a.feed("two \\"), None);
        assert!(a.pending());
        assert_eq!(a.feed("three"), Some("two \nthree".into()));
        assert_eq!(a.feed("\"\"\"first"), None);
        assert_eq!(a.feed("  /not a command"), None);
        assert_eq!(
            a.feed("end\"\"\""),
            Some("first\n  /not a command\nend".into())
        );
        assert_eq!(a.feed("\"\"\"inline\"\"\""), Some("inline".into()));
        assert_eq!(a.feed("dangling \\"), None);
        assert_eq!(a.finish(), Some("dangling \n".into()));
    }
}
