//! Line plots: Vega-Lite for JupyterLab, SVG (plotters) for static viewers.

use super::Render;
use plotters::prelude::*;
use serde_json::{Value, json};

/// Points kept per series: longer curves are downsampled (every k-th point plus the last).
const MAX_POINTS: usize = 1000;

/// One named curve of `(x, y)` points.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// Legend label.
    pub name: String,
    /// Points in x order.
    pub points: Vec<(f64, f64)>,
}

impl Line {
    /// A named series.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Line { name: name.into(), points }
    }

    fn sampled(&self) -> Vec<(f64, f64)> {
        let finite = self.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite());
        let pts: Vec<(f64, f64)> = finite.collect();
        if pts.len() <= MAX_POINTS {
            return pts;
        }
        let step = pts.len().div_ceil(MAX_POINTS);
        let mut out: Vec<(f64, f64)> = pts.iter().step_by(step).copied().collect();
        if out.last() != pts.last() {
            out.push(*pts.last().unwrap());
        }
        out
    }
}

/// A line chart of one or more series (for example train and eval loss by step).
#[derive(Debug, Clone, PartialEq)]
pub struct LinePlot {
    /// Chart title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Log-scale y axis.
    pub log_y: bool,
    /// The curves.
    pub lines: Vec<Line>,
}

impl LinePlot {
    /// An empty plot with a title; axes default to `step` and `value`.
    pub fn new(title: impl Into<String>) -> Self {
        LinePlot { title: title.into(), x_label: "step".into(), y_label: "value".into(), log_y: false, lines: vec![] }
    }
    /// Adds a curve.
    pub fn line(mut self, s: Line) -> Self {
        self.lines.push(s);
        self
    }
    /// Sets axis labels.
    pub fn labels(mut self, x: impl Into<String>, y: impl Into<String>) -> Self {
        self.x_label = x.into();
        self.y_label = y.into();
        self
    }
    /// Uses a log-scale y axis.
    pub fn log_y(mut self, on: bool) -> Self {
        self.log_y = on;
        self
    }

    fn bounds(&self) -> Option<((f64, f64), (f64, f64))> {
        let pts: Vec<(f64, f64)> = self.lines.iter().flat_map(|s| s.sampled()).collect();
        if pts.is_empty() {
            return None;
        }
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for (x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        if y1 <= y0 {
            y1 = y0 + 1.0;
        }
        let pad = (y1 - y0) * 0.05;
        Some(((x0, x1), (y0 - pad, y1 + pad)))
    }
}

impl Render for LinePlot {
    fn text_plain(&self) -> String {
        let mut s = format!("{} ({} series)", self.title, self.lines.len());
        for ser in &self.lines {
            if let Some((x, y)) = ser.points.last() {
                s.push_str(&format!("\n  {}: {} points, last {} = {:.6}", ser.name, ser.points.len(), x, y));
            }
        }
        s
    }

    fn vega_lite(&self) -> Option<Value> {
        let values: Vec<Value> = self
            .lines
            .iter()
            .flat_map(|s| s.sampled().into_iter().map(move |(x, y)| json!({"x": x, "y": y, "series": s.name})))
            .collect();
        let mut y = json!({"field": "y", "type": "quantitative", "title": self.y_label});
        if self.log_y {
            y["scale"] = json!({"type": "log"});
        }
        Some(json!({
            "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
            "title": self.title,
            "width": 480, "height": 260,
            "data": {"values": values},
            "mark": {"type": "line", "point": false, "tooltip": true},
            "params": [{"name": "zoom", "select": "interval", "bind": "scales"}],
            "encoding": {
                "x": {"field": "x", "type": "quantitative", "title": self.x_label},
                "y": y,
                "color": {"field": "series", "type": "nominal", "title": null}
            }
        }))
    }

    fn svg(&self) -> Option<String> {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (560, 320)).into_drawing_area();
            root.fill(&WHITE).ok()?;
            let ((x0, x1), (y0, y1)) = self.bounds().unwrap_or(((0.0, 1.0), (0.0, 1.0)));
            let mut chart = ChartBuilder::on(&root)
                .caption(&self.title, ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(50)
                .build_cartesian_2d(x0..x1, y0..y1)
                .ok()?;
            chart.configure_mesh().x_desc(&self.x_label).y_desc(&self.y_label).draw().ok()?;
            for (i, s) in self.lines.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(s.sampled(), color.stroke_width(2)))
                    .ok()?
                    .label(s.name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            }
            if self.lines.len() > 1 {
                chart.configure_series_labels().border_style(BLACK).draw().ok()?;
            }
            root.present().ok()?;
        }
        Some(svg)
    }
}
