//! Notebook display of MLflow runs and experiments, with links into the MLflow UI
//! (the registry's model versions and the tracker's sync reports use the same table).

use super::api::{Experiment, Run};
use crate::display::{Render, escape_html, html_table_trusted, text_table};

/// One cell: text, optionally a link.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    pub text: String,
    pub link: Option<String>,
}

impl Cell {
    /// Plain text.
    pub fn text(t: impl Into<String>) -> Self {
        Cell { text: t.into(), link: None }
    }
    /// Text that links to `url`.
    pub fn link(t: impl Into<String>, url: impl Into<String>) -> Self {
        Cell { text: t.into(), link: Some(url.into()) }
    }
}

impl<T: Into<String>> From<T> for Cell {
    fn from(t: T) -> Self {
        Cell::text(t)
    }
}

/// A table whose cells may link somewhere: links are `<a>` in HTML and URLs in an
/// extra `link` column in text.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkTable {
    pub title: Option<String>,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
}

impl LinkTable {
    /// A table with these headers.
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Self {
        LinkTable { title: None, headers: headers.into_iter().map(Into::into).collect(), rows: Vec::new() }
    }
    /// Sets the caption.
    pub fn title(mut self, t: impl Into<String>) -> Self {
        self.title = Some(t.into());
        self
    }
    /// Appends a row.
    pub fn row(mut self, cells: impl IntoIterator<Item = Cell>) -> Self {
        self.rows.push(cells.into_iter().collect());
        self
    }
    /// Appends a row in place.
    pub fn push(&mut self, cells: impl IntoIterator<Item = Cell>) {
        self.rows.push(cells.into_iter().collect());
    }
    /// A two-column `item | value` card.
    pub fn card(title: impl Into<String>, rows: Vec<(&str, Cell)>) -> Self {
        let mut t = LinkTable::new(["item", "value"]).title(title);
        for (k, v) in rows {
            t.push([Cell::text(k), v]);
        }
        t
    }
}

impl Render for LinkTable {
    fn text_plain(&self) -> String {
        // Text has no links: the first link of each row goes to a `link` column.
        let has_links = self.rows.iter().any(|r| r.iter().any(|c| c.link.is_some()));
        let card = self.headers.len() == 2 && self.headers[0] == "item";
        let mut headers = self.headers.clone();
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                let mut v: Vec<String> = r
                    .iter()
                    .map(|c| match (&c.link, card) {
                        (Some(l), true) if l != &c.text => format!("{} ({l})", c.text),
                        _ => c.text.clone(),
                    })
                    .collect();
                if has_links && !card {
                    v.push(r.iter().find_map(|c| c.link.clone()).unwrap_or_default());
                }
                v
            })
            .collect();
        if has_links && !card {
            headers.push("link".into());
        }
        let body = text_table(&headers, &rows);
        match &self.title {
            Some(t) => format!("{t}\n{body}"),
            None => body,
        }
    }

    fn text_html(&self) -> Option<String> {
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                r.iter()
                    .map(|c| match &c.link {
                        Some(l) => format!("<a href=\"{}\" target=\"_blank\">{}</a>", escape_html(l), escape_html(&c.text)),
                        None => escape_html(&c.text),
                    })
                    .collect()
            })
            .collect();
        Some(html_table_trusted(self.title.as_deref(), &self.headers, &rows, None))
    }
}

/// Implements [`Render`] through the [`LinkTable`] that `$f` builds from `&self`.
macro_rules! render_as_table {
    ($t:ty, $f:expr) => {
        impl $crate::display::Render for $t {
            fn text_plain(&self) -> String {
                let f: fn(&$t) -> $crate::mlflow::display::LinkTable = $f;
                f(self).text_plain()
            }
            fn text_html(&self) -> Option<String> {
                let f: fn(&$t) -> $crate::mlflow::display::LinkTable = $f;
                f(self).text_html()
            }
        }
    };
}
pub(crate) use render_as_table;

render_as_table!(Run, Run::card);
render_as_table!(Vec<Run>, |v| runs_table(v));
render_as_table!(Experiment, Experiment::card);
render_as_table!(Vec<Experiment>, |v| experiments_table(v));

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn format_millis(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

fn fmt_value(v: f64) -> String {
    if v.is_finite() && v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e6) { format!("{v:.4e}") } else { format!("{v:.6}").trim_end_matches('0').trim_end_matches('.').to_string() }
}

impl Run {
    /// The card shown for a run.
    pub fn card(&self) -> LinkTable {
        let name = self.info.run_name.clone().or_else(|| self.tag("mlflow.runName").map(str::to_string)).unwrap_or_default();
        let mut rows = vec![
            ("run", Cell::link(if name.is_empty() { self.info.run_id.clone() } else { name }, self.url())),
            ("run id", Cell::text(&self.info.run_id)),
            ("experiment", Cell::link(&self.info.experiment_id, format!("{}/#/experiments/{}", self.server, self.info.experiment_id))),
            ("status", Cell::text(self.info.status.as_str())),
            ("started", Cell::text(format_millis(self.info.start_time))),
            ("ended", Cell::text(format_millis(self.info.end_time))),
        ];
        let mut metrics: Vec<_> = self.data.metrics.iter().collect();
        metrics.sort_by(|a, b| a.key.cmp(&b.key));
        let metric_lines: Vec<String> = metrics.iter().map(|m| format!("{} = {} (step {})", m.key, fmt_value(m.value), m.step)).collect();
        rows.push(("metrics", Cell::text(if metric_lines.is_empty() { "-".into() } else { metric_lines.join("\n") })));
        rows.push(("params", Cell::text(self.data.params.len().to_string())));
        LinkTable::card("MLflow run", rows)
    }
}

/// Runs as one table (newest first, as searched).
pub fn runs_table(runs: &[Run]) -> LinkTable {
    let mut t = LinkTable::new(["run", "status", "started", "experiment"]).title("MLflow runs");
    for r in runs {
        let name = r.info.run_name.clone().unwrap_or_else(|| r.info.run_id.clone());
        t.push([
            Cell::link(name, r.url()),
            Cell::text(r.info.status.as_str()),
            Cell::text(format_millis(r.info.start_time)),
            Cell::text(&r.info.experiment_id),
        ]);
    }
    t
}

impl Experiment {
    /// The card shown for an experiment.
    pub fn card(&self) -> LinkTable {
        LinkTable::card(
            "MLflow experiment",
            vec![
                ("experiment", Cell::link(&self.name, self.url())),
                ("id", Cell::text(&self.experiment_id)),
                ("artifacts", Cell::text(self.artifact_location.clone().unwrap_or_default())),
                ("updated", Cell::text(format_millis(self.last_update_time))),
            ],
        )
    }
}

/// Experiments as one table.
pub fn experiments_table(experiments: &[Experiment]) -> LinkTable {
    let mut t = LinkTable::new(["experiment", "id", "updated"]).title("MLflow experiments");
    for e in experiments {
        t.push([Cell::link(&e.name, e.url()), Cell::text(&e.experiment_id), Cell::text(format_millis(e.last_update_time))]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_anchors_in_html_and_urls_in_text() {
        let t = LinkTable::new(["run", "status"])
            .row([Cell::link("a<b", "http://h/#/experiments/1/runs/x"), Cell::text("FINISHED")]);
        let html = t.text_html().unwrap();
        assert!(html.contains("<a href=\"http://h/#/experiments/1/runs/x\" target=\"_blank\">a&lt;b</a>"), "{html}");
        let text = t.text_plain();
        assert!(text.contains("link") && text.contains("http://h/#/experiments/1/runs/x"), "{text}");
        let card = LinkTable::card("c", vec![("run", Cell::link("r", "http://u"))]);
        assert!(card.text_plain().contains("r (http://u)"));
        assert_eq!(format_millis(Some(0)), "1970-01-01 00:00:00");
        assert_eq!(fmt_value(0.25), "0.25");
        assert_eq!(fmt_value(2.0), "2");
    }
}
