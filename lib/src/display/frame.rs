//! DataFrame display: an escaped HTML table for notebooks, comfy-table text for terminals.

use super::{Render, html_table, text_table};
use polars::prelude::{AnyValue, DataFrame};

/// How many rows and characters a frame shows by default.
const DEFAULT_ROWS: usize = 10;
const MAX_CELL_CHARS: usize = 240;

/// A view of a DataFrame with display limits; made by [`DataFrameExt::view`].
#[derive(Debug, Clone)]
pub struct FrameView<'a> {
    df: &'a DataFrame,
    rows: usize,
    title: Option<String>,
}

/// Notebook display for polars `DataFrame`s: `df.view()` in a cell renders an HTML
/// table; `df.view().rows(50)` shows more rows; `df.html()` returns the HTML.
pub trait DataFrameExt {
    /// A displayable view (first and last rows when the frame is long).
    fn view(&self) -> FrameView<'_>;
    /// The HTML table for this frame.
    fn html(&self) -> String;
    /// Shows the frame now as its own output (like IPython's `display(df)`).
    fn show(&self);
}

impl DataFrameExt for DataFrame {
    fn view(&self) -> FrameView<'_> {
        FrameView { df: self, rows: DEFAULT_ROWS, title: None }
    }
    fn html(&self) -> String {
        self.view().text_html().unwrap_or_default()
    }
    fn show(&self) {
        super::show(&self.view());
    }
}

impl<'a> FrameView<'a> {
    /// Shows at most `n` rows (half from the start, half from the end).
    pub fn rows(mut self, n: usize) -> Self {
        self.rows = n.max(1);
        self
    }
    /// A caption above the table.
    pub fn title(mut self, t: impl Into<String>) -> Self {
        self.title = Some(t.into());
        self
    }

    fn row_indices(&self) -> (Vec<usize>, bool) {
        let h = self.df.height();
        if h <= self.rows {
            return ((0..h).collect(), false);
        }
        let head = self.rows.div_ceil(2);
        let tail = self.rows - head;
        let mut idx: Vec<usize> = (0..head).collect();
        idx.extend(h - tail..h);
        (idx, true)
    }

    fn cells(&self) -> (Vec<String>, Vec<Vec<String>>) {
        let headers = self
            .df
            .columns()
            .iter()
            .map(|c| format!("{}\n{}", c.name(), c.dtype()))
            .collect();
        let (idx, elided) = self.row_indices();
        let mut rows = Vec::with_capacity(idx.len() + 1);
        for (k, &i) in idx.iter().enumerate() {
            if elided && k == self.rows.div_ceil(2) {
                rows.push(vec!["…".to_string(); self.df.width()]);
            }
            rows.push(
                self.df
                    .columns()
                    .iter()
                    .map(|c| c.get(i).map(|v| cell_text(&v)).unwrap_or_else(|e| format!("<error: {e}>")))
                    .collect(),
            );
        }
        (headers, rows)
    }

    fn footer(&self) -> String {
        format!("shape: ({} rows, {} columns)", self.df.height(), self.df.width())
    }
}

/// Text of one cell: strings without quotes, long values shortened.
pub(crate) fn cell_text(v: &AnyValue<'_>) -> String {
    let s = match v {
        AnyValue::Null => "null".to_string(),
        AnyValue::String(s) => s.to_string(),
        AnyValue::StringOwned(s) => s.to_string(),
        other => other.to_string(),
    };
    if s.chars().count() > MAX_CELL_CHARS {
        let mut t: String = s.chars().take(MAX_CELL_CHARS).collect();
        t.push('…');
        t
    } else {
        s
    }
}

impl Render for FrameView<'_> {
    fn text_plain(&self) -> String {
        let (headers, rows) = self.cells();
        let mut out = String::new();
        if let Some(t) = &self.title {
            out.push_str(t);
            out.push('\n');
        }
        out.push_str(&self.footer());
        out.push('\n');
        out.push_str(&text_table(&headers, &rows));
        out
    }
    fn text_html(&self) -> Option<String> {
        let (headers, rows) = self.cells();
        Some(html_table(self.title.as_deref(), &headers, &rows, Some(&self.footer())))
    }
}

impl Render for DataFrame {
    fn text_plain(&self) -> String {
        self.view().text_plain()
    }
    fn text_html(&self) -> Option<String> {
        self.view().text_html()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::*;

    #[test]
    fn long_frames_show_head_and_tail_with_escaped_cells() {
        let n = 25;
        let names: Vec<String> = (0..n).map(|i| format!("<row{i}>")).collect();
        let df = df!("name" => names, "x" => (0..n as i64).collect::<Vec<_>>()).unwrap();
        let html = df.html();
        assert!(html.contains("&lt;row0&gt;") && html.contains("&lt;row24&gt;"));
        assert!(!html.contains("&lt;row12&gt;"), "middle rows are elided");
        assert!(html.contains("shape: (25 rows, 2 columns)"));
        assert!(!html.contains("<row0>"));
        let text = df.view().rows(4).text_plain();
        assert!(text.contains("<row0>") && text.contains("<row24>") && text.contains('…'));
    }
}
