//! Plain aligned tables for terminal output.

use palisade_cmd::outln;
/// Prints `rows` under `headers`, columns padded to their widest cell.
pub(crate) fn print(headers: &[&str], rows: Vec<Vec<String>>) {
    outln!("{}", render(headers, rows).trim_end_matches('\n'));
}

/// The table as text, one line per row. A line end or tab inside a cell
/// (a value a workload sent) is shown escaped, so it cannot make a row of
/// its own; other control characters are escaped on the way out.
pub(crate) fn render(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| {
            r.into_iter()
                .map(|c| if c.contains(['\n', '\t']) { c.replace('\n', "\\n").replace('\t', "\\t") } else { c })
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}   "));
            }
        }
        text.push_str(out.trim_end());
        text.push('\n');
    };
    line(headers.to_vec());
    if rows.is_empty() {
        line(vec!["(none)"]);
    }
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_end_in_a_cell_cannot_make_a_row() {
        let text = render(&["A", "B"], vec![vec!["x\nFORGED row".into(), "y\tz".into()]]);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("x\\nFORGED row") && text.contains("y\\tz"), "{text}");
        assert_eq!(palisade_cmd::neutralise_controls("a\x1b[2Kb\rc\u{85}d\n\te"), "a\\u{1b}[2Kb\\u{d}c\\u{85}d\n\te");
        assert!(matches!(palisade_cmd::neutralise_controls("plain é\n"), std::borrow::Cow::Borrowed(_)));
    }
}
