//! Plain aligned tables for terminal output.

use palisade_cmd::outln;
/// Prints `rows` under `headers`, columns padded to their widest cell.
pub(crate) fn print(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}   "));
            }
        }
        outln!("{}", out.trim_end());
    };
    line(headers.to_vec());
    if rows.is_empty() {
        outln!("(none)");
    }
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}
