//! What the user sees: tables (comfy-table), bars, unit formatting, colour and terminal checks.

pub mod output_file;
pub mod panel;
pub mod units;

use comfy_table::{presets, CellAlignment, ContentArrangement, Table};
use std::io::IsTerminal;

/// A plain table in the house style: light box characters, header row. On a terminal, cells
/// wrap so the table fits its width (80 columns too); piped, rows never wrap (for scripts).
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    if std::io::stdout().is_terminal() {
        let (_, cols) = console::Term::stdout().size();
        t.set_content_arrangement(ContentArrangement::Dynamic)
            .set_width(cols.max(40));
    }
    t
}

/// Right-align the given columns (numbers).
pub fn align_right(t: &mut Table, columns: &[usize]) {
    for &c in columns {
        if let Some(col) = t.column_mut(c) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
}

/// A horizontal bar of `width` cells for `value / max`, with eighth-cell resolution.
pub fn bar(value: f64, max: f64, width: usize) -> String {
    const EIGHTHS: [char; 8] = [' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];
    let frac = if max > 0.0 {
        (value / max).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let eighths = (frac * (width * 8) as f64).round() as usize;
    let mut s = "█".repeat(eighths / 8);
    if !eighths.is_multiple_of(8) {
        s.push(EIGHTHS[eighths % 8]);
    }
    let used = s.chars().count();
    s.push_str(&"·".repeat(width.saturating_sub(used)));
    s
}

/// Fold consecutive rows whose cells (after the first, the layer index) are equal into one row
/// labelled with the index range: `15-18`.
pub fn fold_rows(rows: Vec<(usize, Vec<String>)>) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(usize, usize, Vec<String>)> = vec![];
    for (i, cells) in rows {
        match out.last_mut() {
            Some((_, end, last)) if *last == cells && *end + 1 == i => *end = i,
            _ => out.push((i, i, cells)),
        }
    }
    out.into_iter()
        .map(|(a, b, cells)| {
            let label = if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            };
            (label, cells)
        })
        .collect()
}

/// Whether to colour a stream: a terminal, `NO_COLOR` unset or empty, `TERM` not `dumb`.
pub fn colour(stream_is_terminal: bool) -> bool {
    stream_is_terminal
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

/// Whether stderr is an interactive terminal (progress bars, colours).
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// `error:`/`warning:`/`hint:` prefixes, coloured when stderr allows.
pub fn prefix(kind: &str) -> String {
    if !colour(stderr_is_terminal()) {
        return format!("{kind}:");
    }
    let code = match kind {
        "error" => "1;31",
        "warning" => "1;33",
        _ => "1;36",
    };
    format!("\x1b[{code}m{kind}:\x1b[0m")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_equal_neighbours() {
        let rows = vec![
            (0, vec!["a".into()]),
            (1, vec!["a".into()]),
            (2, vec!["b".into()]),
            (3, vec!["a".into()]),
        ];
        let f = fold_rows(rows);
        let labels: Vec<_> = f.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["0-1", "2", "3"]);
    }

    #[test]
    fn bars() {
        assert_eq!(bar(1.0, 1.0, 4), "████");
        assert_eq!(bar(0.0, 1.0, 4), "····");
        assert_eq!(bar(0.5, 1.0, 4), "██··");
    }
}
