//! A live progress bar: an HTML bar in notebooks, one text line elsewhere.

use super::{LiveDisplay, Render, escape_html, live};
use std::time::{Duration, Instant};

/// A progress bar that updates in place in a notebook (`update_display_data`).
///
/// Updates are rate-limited (at most every 200 ms, plus the final one) so a fast
/// loop does not flood the notebook.
#[derive(Debug)]
pub struct ProgressBar {
    label: String,
    total: u64,
    done: u64,
    message: String,
    started: Instant,
    last_draw: Option<Instant>,
    min_interval: Duration,
    handle: LiveDisplay,
}

/// A snapshot of a progress bar, as displayed.
#[derive(Debug, Clone)]
struct Snapshot {
    label: String,
    total: u64,
    done: u64,
    message: String,
    elapsed: Duration,
}

impl ProgressBar {
    /// A bar counting to `total`.
    pub fn new(label: impl Into<String>, total: u64) -> Self {
        ProgressBar {
            label: label.into(),
            total,
            done: 0,
            message: String::new(),
            started: Instant::now(),
            last_draw: None,
            min_interval: Duration::from_millis(200),
            handle: live(),
        }
    }

    /// Draws on every update (tests, slow loops).
    pub fn every_update(mut self) -> Self {
        self.min_interval = Duration::ZERO;
        self
    }

    /// The Jupyter display id.
    pub fn display_id(&self) -> &str {
        self.handle.id()
    }

    /// Sets the position and an optional message (for example the current loss).
    pub fn set(&mut self, done: u64, message: impl Into<String>) {
        self.done = done.min(self.total.max(done));
        self.message = message.into();
        let now = Instant::now();
        let due = self.last_draw.is_none_or(|t| now - t >= self.min_interval) || self.done >= self.total;
        if due {
            self.last_draw = Some(now);
            let snap = self.snapshot();
            self.handle.update(&snap);
        }
    }

    /// Advances by `n`.
    pub fn inc(&mut self, n: u64) {
        let m = std::mem::take(&mut self.message);
        self.set(self.done + n, m);
    }

    /// Marks the bar complete and draws it.
    pub fn finish(&mut self, message: impl Into<String>) {
        self.last_draw = None;
        let total = self.total;
        self.set(total, message);
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            label: self.label.clone(),
            total: self.total,
            done: self.done,
            message: self.message.clone(),
            elapsed: self.started.elapsed(),
        }
    }
}

/// Formats a duration as `1h02m03s`, `2m03s` or `4.1s`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m{:02}s", s / 3600, (s % 3600) / 60, s % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

impl Snapshot {
    fn fraction(&self) -> f64 {
        if self.total == 0 { 1.0 } else { (self.done as f64 / self.total as f64).clamp(0.0, 1.0) }
    }
    fn eta(&self) -> Option<Duration> {
        if self.done == 0 || self.done >= self.total {
            return None;
        }
        let per = self.elapsed.as_secs_f64() / self.done as f64;
        Some(Duration::from_secs_f64(per * (self.total - self.done) as f64))
    }
    fn status(&self) -> String {
        let mut s = format!(
            "{}/{} [{}",
            self.done,
            self.total,
            format_duration(self.elapsed)
        );
        if let Some(eta) = self.eta() {
            s.push_str(&format!(" < {}", format_duration(eta)));
        }
        s.push(']');
        if !self.message.is_empty() {
            s.push(' ');
            s.push_str(&self.message);
        }
        s
    }
}

impl Render for Snapshot {
    fn text_plain(&self) -> String {
        let width = 30usize;
        let filled = (self.fraction() * width as f64).round() as usize;
        format!(
            "{}: {:>3.0}%|{}{}| {}",
            self.label,
            self.fraction() * 100.0,
            "█".repeat(filled),
            " ".repeat(width - filled),
            self.status()
        )
    }
    fn text_html(&self) -> Option<String> {
        Some(format!(
            "<div class=\"tunebook-progress\" style=\"font-family:monospace\">{label} \
             <progress value=\"{done}\" max=\"{max}\" style=\"width:40%\"></progress> \
             {pct:.0}% {status}</div>",
            label = escape_html(&self.label),
            done = self.done,
            max = self.total.max(1),
            pct = self.fraction() * 100.0,
            status = escape_html(&self.status()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_text_has_percent_and_eta() {
        let s = Snapshot { label: "train".into(), total: 10, done: 5, message: "loss 1.0".into(), elapsed: Duration::from_secs(10) };
        let t = s.text_plain();
        assert!(t.contains(" 50%"), "{t}");
        assert!(t.contains("5/10 [10.0s < 10.0s] loss 1.0"), "{t}");
        assert!(s.text_html().unwrap().contains("<progress value=\"5\" max=\"10\""));
    }

    #[test]
    fn durations_read_like_tqdm() {
        assert_eq!(format_duration(Duration::from_secs(3723)), "1h02m03s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2m05s");
    }
}
