//! The live KV panel of `run`: per-layer (folded) bytes the cache holds now against the budget
//! at `--max-context`, the sharing arrows, tokens/s, and the total against the naive cache.
//!
//! [`render`] is pure (lines of text, tested); [`LivePanel`] keeps those lines drawn below the
//! streaming text on a terminal: before each piece of text it erases the panel, writes the text,
//! then draws the panel again under it with the cursor put back where the text ends.
//!
//! Putting the cursor back needs the column the text ends at: a newline sent to a terminal
//! (which turns `\n` into `\r\n`) leaves it in column 0, so [`LivePanel`] follows the text the
//! caller writes ([`LivePanel::wrote`]) in display columns, wrapping at the terminal's width.
//! Panel lines are cut to the width (a wrapped line would scroll the screen under a saved cursor)
//! and the panel to the height.

use super::{bar, fold_rows, units};
use crate::arch::budget::Budget;
use crate::arch::{ArchSpec, Attention};
use std::io::Write;

/// What the panel shows at one moment.
pub struct Snapshot<'a> {
    pub spec: &'a ArchSpec,
    /// The budget at `--max-context`, in the cache's dtype.
    pub budget: &'a Budget,
    /// Bytes each layer's cache holds now.
    pub held: &'a [u64],
    /// `held` is what the running cache holds (`run`), not computed from the table for the
    /// tokens a server reported (`--endpoint`).
    pub measured: bool,
    pub tokens: usize,
    pub tok_s: f64,
    /// Speculative decoding, when a drafter runs.
    pub draft: Option<&'a DraftFigures>,
}

/// What the panel shows of speculative decoding.
#[derive(Debug, Clone, Default)]
pub struct DraftFigures {
    /// The drafter (`ngram`, an assistant's name).
    pub name: String,
    /// Target layers whose caches the drafter reads (a Gemma 4 assistant: the last sliding and
    /// the last full layer).
    pub reads: Vec<usize>,
    /// The last verify step: drafted, accepted.
    pub step: (usize, usize),
    pub drafted: usize,
    pub accepted: usize,
    /// Target decode forwards so far (verify passes and single steps).
    pub target_steps: usize,
}

impl DraftFigures {
    /// One verify step judged `drafted` tokens and accepted `accepted`.
    pub fn verified(&mut self, drafted: usize, accepted: usize) {
        self.step = (drafted, accepted);
        self.drafted += drafted;
        self.accepted += accepted;
    }

    /// `draft NAME · step A/D accepted · total A/D (R%) · own KV B[, reads L.. L..]`, `own`
    /// being the bytes of the drafter's own cache slots (an MTP head's; 0 for the others).
    pub fn line(&self, own: u64) -> String {
        let rate = if self.drafted > 0 {
            100.0 * self.accepted as f64 / self.drafted as f64
        } else {
            0.0
        };
        let reads = if self.reads.is_empty() {
            String::new()
        } else {
            let ls: Vec<String> = self.reads.iter().map(|l| format!("L{l}")).collect();
            format!(" (reads the target's {})", ls.join(" and "))
        };
        format!(
            "draft {} · step {}/{} accepted · total {}/{} ({rate:.0}%) · own KV {}{reads}",
            self.name,
            self.step.1,
            self.step.0,
            self.accepted,
            self.drafted,
            units::bytes(own)
        )
    }
}

/// The panel as lines of text (no trailing newlines).
pub fn render(s: &Snapshot) -> Vec<String> {
    let held_total: u64 = s.held.iter().sum();
    let flops: u128 = s
        .spec
        .layers
        .iter()
        .map(|l| l.attention_flops(s.tokens as u64))
        .sum();
    let flops = u64::try_from(flops).unwrap_or(u64::MAX);
    let mut lines = vec![format!(
        "KV {} {} · budget {} at {} · naive {} · {} tokens · {:.1} tok/s · attention {}/token",
        units::bytes(held_total),
        if s.measured {
            "held"
        } else {
            "computed from the architecture (not measured)"
        },
        units::bytes(s.budget.total_bytes),
        units::context(s.budget.context),
        units::bytes(s.budget.naive_bytes),
        s.tokens,
        s.tok_s,
        units::flops(flops)
    )];
    if let Some(d) = s.draft {
        // Slots past the model's layers are the drafter's (an MTP head's cache).
        let own = s.held.iter().skip(s.spec.layers.len()).sum();
        lines.push(d.line(own));
    }
    let read_by_drafter = |i: usize| s.draft.is_some_and(|d| d.reads.contains(&i));
    let rows = s
        .spec
        .layers
        .iter()
        .zip(&s.budget.layers)
        .map(|(l, b)| {
            let held = s.held.get(l.index).copied().unwrap_or(0);
            // The head budget: query heads over KV heads, e.g. `48q/8kv`.
            let kind = format!("{} {}q/{}kv", l.attention.label(), l.q_heads, l.kv_heads);
            let mut detail = compressed_detail(&l.attention, s.tokens as u64);
            if read_by_drafter(l.index) {
                detail.push_str(if detail.is_empty() {
                    "← draft"
                } else {
                    " · ← draft"
                });
            }
            let cells = match l.kv_source {
                Some(src) => vec![kind, format!("→ L{src}"), detail],
                None => vec![
                    kind,
                    format!(
                        "{} {:>9} / {}",
                        bar(held as f64, b.bytes as f64, 10),
                        units::bytes(held),
                        units::bytes(b.bytes)
                    ),
                    detail,
                ],
            };
            (l.index, cells)
        })
        .collect();
    for (label, cells) in fold_rows(rows) {
        let n = label
            .split_once('-')
            .and_then(|(a, b)| Some(b.parse::<usize>().ok()? - a.parse::<usize>().ok()? + 1))
            .unwrap_or(1);
        let times = if n > 1 {
            format!(" ×{n}")
        } else {
            String::new()
        };
        let detail = if cells[2].is_empty() {
            String::new()
        } else {
            format!("  {}", cells[2])
        };
        lines.push(format!(
            "  L{label:<7} {:<18} {}{times}{detail}",
            cells[0], cells[1]
        ));
    }
    lines
}

/// What a compressed layer (DeepSeek V4 CSA/HCA) holds at `tokens`: window rows, compressed
/// entries (and how many a query reads), tokens of the window still open; empty otherwise.
fn compressed_detail(a: &Attention, tokens: u64) -> String {
    let Attention::Compressed {
        ratio,
        window,
        index_topk,
    } = *a
    else {
        return String::new();
    };
    let entries = tokens / ratio as u64;
    let read = match index_topk {
        Some(k) if (k as u64) < entries => format!(" (reads top {k})"),
        _ => String::new(),
    };
    format!(
        "window {} + {entries} compressed{read} · {} open",
        tokens.min(window as u64),
        tokens % ratio as u64
    )
}

/// `text` as it may go to a terminal: control characters but newline and tab shown in caret
/// notation (`^X`, `^[` for escape; `\u{fffd}` for C1 and DEL), so a model's output can neither
/// move the cursor nor send escape sequences, and every character advances the cursor as far as
/// [`LivePanel::wrote`] counts.
pub fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            '\0'..='\x1f' => {
                out.push('^');
                out.push((b'@' + c as u8) as char);
            }
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out.into()
}

/// Keeps the panel drawn under the text on a terminal.
pub struct LivePanel {
    drawn: usize,
    /// Display columns of the text since its last line break.
    col: usize,
    /// The terminal's `(rows, columns)`.
    size: (usize, usize),
}

impl Default for LivePanel {
    fn default() -> Self {
        Self::new()
    }
}

impl LivePanel {
    /// A panel for the terminal on stderr (80 × 24 when its size cannot be read).
    pub fn new() -> Self {
        let size = console::Term::stderr()
            .size_checked()
            .map_or((24, 80), |(r, c)| (r as usize, c as usize));
        LivePanel::with_size(size)
    }

    /// A panel for a terminal of `(rows, columns)`.
    pub fn with_size((rows, cols): (usize, usize)) -> Self {
        LivePanel {
            drawn: 0,
            col: 0,
            size: (rows.max(3), cols.max(10)),
        }
    }

    /// The caller wrote `text` (made [`terminal_safe`]) to the same terminal: where the panel's
    /// cursor must come back.
    pub fn wrote(&mut self, text: &str) {
        let line = match text.rfind(['\n', '\r']) {
            Some(i) => {
                self.col = 0;
                &text[i + 1..]
            }
            None => text,
        };
        for (i, part) in line.split('\t').enumerate() {
            if i > 0 {
                self.col = (self.col / 8 + 1) * 8; // the next tab stop
            }
            self.col += console::measure_text_width(part);
        }
    }

    /// `line` cut to the terminal's width.
    pub fn fit<'a>(&self, line: &'a str) -> std::borrow::Cow<'a, str> {
        console::truncate_str(line, self.size.1 - 1, "…")
    }

    /// Erase the panel (the cursor is where the text ends): its lines one by one, so that no
    /// terminal takes it for a clear screen (tmux pushes a cleared screen into the scrollback).
    pub fn erase(&mut self, term: &mut dyn Write) -> std::io::Result<()> {
        if self.drawn > 0 {
            write!(term, "\x1b7{}\x1b8", "\x1b[B\x1b[2K".repeat(self.drawn))?;
            self.drawn = 0;
        }
        term.flush()
    }

    /// Draw `lines` below the text and put the cursor back where the text ends.
    pub fn draw(&mut self, term: &mut dyn Write, lines: &[String]) -> std::io::Result<()> {
        let (rows, cols) = self.size;
        let lines = &lines[..lines.len().min(rows - 2)];
        let n = lines.len();
        // Where the next character of text goes: this row at `col % cols`, or, when the text
        // fills its last row exactly (the terminal waits to wrap), column 0 of the next row.
        let full_row = self.col > 0 && self.col.is_multiple_of(cols);
        let (down, col) = (usize::from(full_row), self.col % cols);
        // Make room first (scrolling now, so the saved position stays valid), come back up to
        // the text's row and column, then save, draw, restore.
        write!(term, "{}\x1b[{}A\r", "\n".repeat(n + down), n)?;
        if col > 0 {
            write!(term, "\x1b[{col}C")?;
        }
        write!(term, "\x1b7")?;
        if full_row {
            // The cursor now sits where the wrap would have put it: the text goes on from there.
            self.col = 0;
        }
        for l in lines {
            write!(term, "\n\r\x1b[2K{}", self.fit(l))?;
        }
        write!(term, "\x1b8")?;
        self.drawn = n;
        term.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::budget::{compute, KvDtype};
    use crate::arch::{config::ParseOptions, parse_config};

    #[test]
    fn terminal_text_has_no_control_characters_and_columns_are_counted() {
        assert_eq!(terminal_safe("a\x18b\x1b[2Jc\td\n"), "a^Xb^[[2Jc\td\n");
        assert_eq!(terminal_safe("\u{9b}x\x7f"), "\u{fffd}x\u{fffd}");
        let mut p = LivePanel::with_size((24, 80));
        p.wrote("héllo");
        assert_eq!(p.col, 5);
        p.wrote(" 世界");
        assert_eq!(p.col, 10, "wide characters take two columns");
        p.wrote("\tx");
        assert_eq!(p.col, 17, "a tab goes to the next multiple of 8");
        p.wrote("line\nab");
        assert_eq!(p.col, 2);
    }

    /// With a drafter the panel says what it drafted and accepted, the KV it holds of its own
    /// (none, or an MTP head's slot), and marks the target layers it reads.
    #[test]
    fn shows_the_drafter_and_the_layers_it_reads() {
        let raw: serde_json::Value =
            serde_json::from_str(include_str!("../../configs/gemma-4-E2B-it/config.json")).unwrap();
        let spec = parse_config(&raw, &ParseOptions::default()).unwrap();
        let budget = compute(&spec, 4096, 1, KvDtype::F32).unwrap();
        let held: Vec<u64> = budget.layers.iter().map(|l| l.bytes / 2).collect();
        let mut d = DraftFigures {
            name: "gemma4-e2b-assistant".into(),
            reads: vec![13, 14],
            ..Default::default()
        };
        d.verified(4, 3);
        d.verified(4, 1);
        let snap = Snapshot {
            spec: &spec,
            budget: &budget,
            held: &held,
            tokens: 100,
            tok_s: 3.0,
            measured: true,
            draft: Some(&d),
        };
        let lines = render(&snap);
        assert_eq!(
            lines[1],
            "draft gemma4-e2b-assistant · step 1/4 accepted · total 4/8 (50%) · own KV 0 B (reads the target's L13 and L14)"
        );
        let marked: Vec<&String> = lines.iter().filter(|l| l.contains("← draft")).collect();
        assert_eq!(marked.len(), 2, "{lines:?}");
        // A drafter with a cache of its own (an MTP head) holds the slots past the model's.
        let mut with_own = held.clone();
        with_own.push(2048);
        let own = render(&Snapshot {
            held: &with_own,
            ..snap
        });
        assert!(own[1].contains("· own KV 2.05 KB (reads"), "{}", own[1]);
        assert!(
            marked[0].contains("L13 ") && marked[1].contains("L14 "),
            "{marked:?}"
        );
    }

    #[test]
    fn folds_and_shows_sharing() {
        let raw: serde_json::Value =
            serde_json::from_str(include_str!("../../configs/gemma-4-E2B-it/config.json")).unwrap();
        let spec = parse_config(&raw, &ParseOptions::default()).unwrap();
        let budget = compute(&spec, 4096, 1, KvDtype::F32).unwrap();
        let now = compute(&spec, 100, 1, KvDtype::F32).unwrap();
        let held: Vec<u64> = now.layers.iter().map(|l| l.bytes).collect();
        let lines = render(&Snapshot {
            spec: &spec,
            budget: &budget,
            held: &held,
            tokens: 100,
            tok_s: 3.0,
            measured: true,
            draft: None,
        });
        assert!(lines[0].starts_with("KV "), "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("L15-18") && l.contains("→ L13") && l.contains("×4")),
            "{lines:?}"
        );
        let window_bytes = units::bytes(budget.layers[0].bytes);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("L0-3") && l.ends_with(&format!("/ {window_bytes} ×4"))),
            "{lines:?}"
        );
    }
}
