//! Plain aligned tables for terminal output.

use palisade_cmd::outln;
/// Prints `rows` under `headers`, columns padded to their widest cell.
pub(crate) fn print(headers: &[&str], rows: Vec<Vec<String>>) {
    outln!("{}", render(headers, rows).trim_end_matches('\n'));
}

/// The table as text, one line per row.
pub(crate) fn render(headers: &[&str], rows: Vec<Vec<String>>) -> String {
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
