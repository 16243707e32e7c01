//! How datasets, reports and statistics show themselves in a notebook.

use super::{Dataset, Packed, Stats, ValidationReport};
use crate::display::{Render, Table, escape_html};
use serde_json::{Value, json};
use std::fmt::Write as _;

/// Longest cell text in previews before it is cut.
const CELL_CHARS: usize = 600;

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n).collect();
        t.push('…');
        t
    }
}

/// The first rows of a dataset, with conversations laid out turn by turn.
#[derive(Debug, Clone)]
pub struct Preview {
    title: String,
    headers: Vec<String>,
    /// Per row, per column: plain text, and for chats the turns.
    rows: Vec<Vec<Cell>>,
}

#[derive(Debug, Clone)]
enum Cell {
    Text(String),
    Chat(Vec<(String, String)>),
}

impl Cell {
    fn plain(&self) -> String {
        match self {
            Cell::Text(t) => cut(t, 200),
            Cell::Chat(turns) => turns.iter().map(|(r, c)| format!("{r}: {}", cut(c, 120))).collect::<Vec<_>>().join("\n"),
        }
    }
    fn html(&self) -> String {
        match self {
            Cell::Text(t) => escape_html(&cut(t, CELL_CHARS)),
            Cell::Chat(turns) => {
                let mut h = String::new();
                for (role, content) in turns {
                    let colour = match role.as_str() {
                        "system" => "#6b7280",
                        "user" => "#1d4ed8",
                        "assistant" => "#047857",
                        _ => "#b91c1c",
                    };
                    let _ = write!(
                        h,
                        "<div style=\"margin:2px 0\"><span style=\"font-weight:bold;color:{colour}\">{}</span> <span style=\"white-space:pre-wrap\">{}</span></div>",
                        escape_html(role),
                        escape_html(&cut(content, CELL_CHARS))
                    );
                }
                h
            }
        }
    }
}

impl Dataset {
    /// The first `n` rows, ready to show (chats rendered turn by turn).
    pub fn preview(&self, n: usize) -> Preview {
        let head = self.df().head(Some(n));
        let headers: Vec<String> = head.get_column_names().iter().map(|c| c.to_string()).collect();
        let chat_col = (self.detect_task().ok() == Some(super::Task::Chat)).then(|| self.column_mapping().messages.clone());
        let mut rows = vec![vec![]; head.height()];
        for name in &headers {
            let Ok(col) = head.column(name) else { continue };
            let series = col.as_materialized_series().rechunk();
            for (r, v) in series.iter().enumerate() {
                let json = super::validate::any_to_json(v);
                let cell = if chat_col.as_deref() == Some(name.as_str()) {
                    let mut sink = vec![];
                    match super::validate::check_chat(r, name, json.clone(), &mut sink) {
                        Some(msgs) => Cell::Chat(msgs.into_iter().map(|m| (m.role, m.content)).collect()),
                        None => match &json {
                            Value::Array(items) => Cell::Chat(
                                items
                                    .iter()
                                    .map(|m| {
                                        let role = m.get("role").and_then(|r| r.as_str()).unwrap_or("?").to_string();
                                        let content = match m.get("content") {
                                            Some(Value::String(s)) => s.clone(),
                                            Some(other) => other.to_string(),
                                            None => String::new(),
                                        };
                                        (role, content)
                                    })
                                    .collect(),
                            ),
                            other => Cell::Text(other.to_string()),
                        },
                    }
                } else {
                    Cell::Text(match json {
                        Value::String(s) => s,
                        Value::Null => "null".into(),
                        other => other.to_string(),
                    })
                };
                rows[r].push(cell);
            }
        }
        let task = self.detect_task().map(|t| t.name().to_string()).unwrap_or_else(|_| "unknown task".into());
        Preview { title: format!("{} — {} rows, {task}", self.source(), self.len()), headers, rows }
    }
}

impl Render for Preview {
    fn text_plain(&self) -> String {
        let rows: Vec<Vec<String>> = self.rows.iter().map(|r| r.iter().map(Cell::plain).collect()).collect();
        format!("{}\n{}", self.title, crate::display::text_table(&self.headers, &rows))
    }
    fn text_html(&self) -> Option<String> {
        let mut h = format!("<div class=\"tunebook-table\"><strong>{}</strong><table><thead><tr>", escape_html(&self.title));
        for c in &self.headers {
            let _ = write!(h, "<th>{}</th>", escape_html(c));
        }
        h.push_str("</tr></thead><tbody>");
        for r in &self.rows {
            h.push_str("<tr>");
            for c in r {
                let _ = write!(h, "<td style=\"text-align:left;vertical-align:top\">{}</td>", c.html());
            }
            h.push_str("</tr>");
        }
        h.push_str("</tbody></table></div>");
        Some(h)
    }
}

impl Render for Dataset {
    fn text_plain(&self) -> String {
        self.preview(10).text_plain()
    }
    fn text_html(&self) -> Option<String> {
        self.preview(10).text_html()
    }
}

impl ValidationReport {
    /// Problems per rule, as a table.
    pub fn counts_table(&self) -> Table {
        let mut t = Table::new(["rule", "problems", "example fix"]).title(self.summary().lines().next().unwrap_or("").to_string());
        for (rule, n) in self.counts() {
            let fix = self.problems.iter().find(|p| p.rule == rule).map(|p| p.fix.clone()).unwrap_or_default();
            t.push([rule.code().to_string(), n.to_string(), fix]);
        }
        t
    }

    /// The first `n` problems, one per line: row, field, problem, fix.
    pub fn problems_table(&self, n: usize) -> Table {
        let mut t = Table::new(["row", "field", "rule", "problem", "fix"]);
        for p in self.problems.iter().take(n) {
            t.push([
                match (p.row, &p.line) {
                    (Some(r), Some(l)) => format!("{r} ({l})"),
                    (Some(r), None) => r.to_string(),
                    (None, _) => "-".into(),
                },
                p.field.clone(),
                p.rule.code().to_string(),
                p.message.clone(),
                p.fix.clone(),
            ]);
        }
        if self.problems.len() > n {
            t = t.title(format!("first {n} of {} problems", self.problems.len()));
        }
        t
    }
}

impl Render for ValidationReport {
    fn text_plain(&self) -> String {
        if self.is_valid() {
            return self.summary();
        }
        format!("{}\n{}", self.counts_table().text_plain(), self.problems_table(20).text_plain())
    }
    fn text_html(&self) -> Option<String> {
        if self.is_valid() {
            return Some(format!("<div class=\"tunebook-table\"><strong>✔ {}</strong></div>", escape_html(&self.summary())));
        }
        Some(format!("{}{}", self.counts_table().text_html()?, self.problems_table(50).text_html()?))
    }
}

impl Stats {
    /// The numbers as a table.
    pub fn table(&self) -> Table {
        Table::new(["statistic", "value"])
            .title(format!("{} — {} data, context length {}", self.source, self.task, self.context_length))
            .row(["examples".to_string(), self.examples.to_string()])
            .row(["invalid rows left out".to_string(), self.invalid_rows.to_string()])
            .row(["total tokens".to_string(), self.total_tokens.to_string()])
            .row(["trained tokens".to_string(), self.trainable_tokens.to_string()])
            .row(["tokens per example p50 / p95 / max".to_string(), format!("{} / {} / {}", self.p50, self.p95, self.max)])
            .row(["mean tokens per example".to_string(), format!("{:.1}", self.mean)])
            .row(["examples over the context length".to_string(), self.over_length.len().to_string()])
    }

    /// A histogram of tokens per example, with the context length marked.
    pub fn histogram(&self) -> TokenHistogram {
        TokenHistogram::new(&self.lengths, self.context_length)
    }
}

impl Render for Stats {
    fn text_plain(&self) -> String {
        let mut s = self.table().text_plain();
        for w in &self.warnings {
            s.push_str("\n⚠ ");
            s.push_str(w);
        }
        s
    }
    fn text_html(&self) -> Option<String> {
        let mut h = self.table().text_html()?;
        for w in &self.warnings {
            let _ = write!(h, "<div style=\"color:#b45309\">⚠ {}</div>", escape_html(w));
        }
        Some(h)
    }
}

/// Tokens-per-example histogram: Vega-Lite for JupyterLab, SVG for static viewers.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenHistogram {
    /// `(bin start, bin end, examples)`.
    pub bins: Vec<(usize, usize, usize)>,
    /// The context length, drawn as a rule.
    pub context_length: usize,
}

impl TokenHistogram {
    /// Bins `lengths` into about 40 equal-width bins.
    pub fn new(lengths: &[usize], context_length: usize) -> Self {
        let max = lengths.iter().copied().max().unwrap_or(0).max(1);
        let width = max.div_ceil(40).max(1);
        let mut counts = vec![0usize; max / width + 1];
        for &l in lengths {
            counts[l / width] += 1;
        }
        let bins = counts.into_iter().enumerate().map(|(i, c)| (i * width, (i + 1) * width, c)).collect();
        TokenHistogram { bins, context_length }
    }
}

impl Render for TokenHistogram {
    fn text_plain(&self) -> String {
        let peak = self.bins.iter().map(|b| b.2).max().unwrap_or(0).max(1);
        let mut s = format!("tokens per example (context length {})", self.context_length);
        for (a, b, c) in &self.bins {
            if *c > 0 {
                let bar = "█".repeat((c * 40).div_ceil(peak));
                let _ = write!(s, "\n{a:>7}-{b:<7} {c:>7} {bar}");
            }
        }
        s
    }

    fn vega_lite(&self) -> Option<Value> {
        let values: Vec<Value> = self.bins.iter().map(|(a, b, c)| json!({"start": a, "end": b, "examples": c})).collect();
        Some(json!({
            "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
            "title": "tokens per example",
            "width": 560, "height": 240,
            "layer": [
                {"data": {"values": values}, "mark": {"type": "bar", "tooltip": true},
                 "encoding": {"x": {"field": "start", "type": "quantitative", "title": "tokens"},
                              "x2": {"field": "end"},
                              "y": {"field": "examples", "type": "quantitative", "title": "examples"}}},
                {"data": {"values": [{"ctx": self.context_length}]}, "mark": {"type": "rule", "color": "#dc2626", "strokeDash": [4, 3]},
                 "encoding": {"x": {"field": "ctx", "type": "quantitative"}}}
            ]
        }))
    }

    fn svg(&self) -> Option<String> {
        let (w, h, pad) = (600.0f64, 260.0f64, 30.0f64);
        let peak = self.bins.iter().map(|b| b.2).max().unwrap_or(0).max(1) as f64;
        let x_max = self.bins.last().map(|b| b.1).unwrap_or(1).max(self.context_length).max(1) as f64;
        let sx = |x: f64| pad + x / x_max * (w - 2.0 * pad);
        let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">");
        let _ = write!(s, "<text x=\"{pad}\" y=\"16\" font-size=\"13\" font-family=\"sans-serif\">tokens per example (max {} examples per bin)</text>", peak);
        for (a, b, c) in &self.bins {
            let bh = *c as f64 / peak * (h - 2.0 * pad - 10.0);
            let _ = write!(
                s,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#4c78a8\"/>",
                sx(*a as f64),
                h - pad - bh,
                (sx(*b as f64) - sx(*a as f64) - 1.0).max(0.5),
                bh
            );
        }
        let cx = sx(self.context_length as f64);
        let _ = write!(s, "<line x1=\"{cx:.1}\" y1=\"{pad}\" x2=\"{cx:.1}\" y2=\"{:.1}\" stroke=\"#dc2626\" stroke-dasharray=\"4 3\"/>", h - pad);
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" font-family=\"sans-serif\" fill=\"#dc2626\" text-anchor=\"end\">context length {}</text>",
            cx - 4.0,
            pad + 10.0,
            self.context_length
        );
        let _ = write!(s, "<line x1=\"{pad}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#333\"/>", h - pad, w - pad);
        let _ = write!(s, "<text x=\"{pad}\" y=\"{:.1}\" font-size=\"11\" font-family=\"sans-serif\">0</text>", h - 10.0);
        let _ = write!(s, "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" font-family=\"sans-serif\" text-anchor=\"end\">{} tokens</text>", w - pad, h - 10.0, x_max as usize);
        s.push_str("</svg>");
        Some(s)
    }
}

impl Packed {
    /// The packing outcome as a table.
    pub fn table(&self) -> Table {
        let mode = if self.packing { "packed" } else { "one example per window (padded)" };
        Table::new(["", "value"])
            .title(format!("{} windows of {} tokens, {mode}", self.windows.len(), self.context_length))
            .row(["examples".to_string(), self.examples.to_string()])
            .row(["truncated to the window".to_string(), self.truncated.to_string()])
            .row(["dropped as too long".to_string(), self.dropped.to_string()])
            .row(["example tokens".to_string(), self.real_tokens.to_string()])
            .row(["trained tokens".to_string(), self.trainable_tokens.to_string()])
            .row(["window fill".to_string(), format!("{:.1}%", 100.0 * self.efficiency())])
    }
}

impl Render for Packed {
    fn text_plain(&self) -> String {
        self.table().text_plain()
    }
    fn text_html(&self) -> Option<String> {
        self.table().text_html()
    }
}
