//! Rich display of tunebook values in notebooks, REPLs and terminals.
//!
//! This is the only module of the library that knows notebooks exist. Everything
//! else hands it values that implement [`Render`]; this module decides how they
//! reach the user:
//!
//! * In a notebook cell, the last expression of a cell is shown through evcxr's
//!   `evcxr_display` convention ([`EvcxrDisplay`], in the prelude), which becomes
//!   one `execute_result` carrying every MIME type the value offers.
//! * [`show`] and [`live`] emit `display_data` / `update_display_data` while a cell
//!   is still running (progress bars, live loss curves). They print one line of the
//!   *marker protocol* (below) that `tunebook-kernel` turns into Jupyter messages.
//! * Outside a kernel (a script, the CLI, a test) the same calls print `text/plain`.
//!
//! # Marker protocol
//!
//! One line on stdout: the byte `0x1E` (ASCII record separator), the word
//! `TUNEBOOK_DISPLAY`, one space, then a JSON object on the same line:
//!
//! ```text
//! \x1eTUNEBOOK_DISPLAY {"op":"display","id":"d-1f2e","data":{"text/plain":"..","text/html":".."}}
//! \x1eTUNEBOOK_DISPLAY {"op":"update","id":"d-1f2e","data":{...}}
//! ```
//!
//! `op` is `display` (a new output, optionally with an `id` so it can be updated
//! later) or `update` (replace the output with that `id`). `data` maps MIME types to
//! strings, or to JSON values for `application/*json` types. The kernel selects this
//! protocol by setting `TUNEBOOK_DISPLAY=jupyter` in the environment of the process
//! that runs cells; with `TUNEBOOK_DISPLAY=repl` or unset, plain text is printed.

mod frame;
mod plot;
mod progress;
pub mod protocol;

pub use frame::{DataFrameExt, FrameView};
pub use plot::{Line, LinePlot};
pub use progress::{ProgressBar, format_duration};
pub use protocol::{DISPLAY_ENV, MARKER_PREFIX, Marker, parse_marker};

use serde_json::Value;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// MIME type of Vega-Lite 5 specifications, rendered natively by JupyterLab 4.
pub const VEGA_LITE_MIME: &str = "application/vnd.vegalite.v5+json";

/// One value rendered in several MIME types, most preferred last-added-first by
/// the frontend (Jupyter picks the richest type it can render).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MimeBundle {
    entries: Vec<(String, Value)>,
}

impl MimeBundle {
    /// An empty bundle.
    pub fn new() -> Self {
        Self::default()
    }

    /// A bundle holding only `text/plain`.
    pub fn text(text: impl Into<String>) -> Self {
        Self::new().with("text/plain", Value::String(text.into()))
    }

    /// Adds (or replaces) the rendering for `mime`. Strings for textual types,
    /// JSON values for `application/*json` types.
    pub fn with(mut self, mime: &str, value: Value) -> Self {
        self.insert(mime, value);
        self
    }

    /// Adds (or replaces) the rendering for `mime`.
    pub fn insert(&mut self, mime: &str, value: Value) {
        if let Some(slot) = self.entries.iter_mut().find(|(m, _)| m == mime) {
            slot.1 = value;
        } else {
            self.entries.push((mime.to_string(), value));
        }
    }

    /// The rendering for `mime`, if present.
    pub fn get(&self, mime: &str) -> Option<&Value> {
        self.entries.iter().find(|(m, _)| m == mime).map(|(_, v)| v)
    }

    /// The `text/plain` rendering, or an empty string.
    pub fn plain(&self) -> &str {
        self.get("text/plain").and_then(Value::as_str).unwrap_or("")
    }

    /// MIME types present, in insertion order.
    pub fn mime_types(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(m, _)| m.as_str())
    }

    /// The bundle as a JSON object `{mime: data}`, as Jupyter's `data` field wants it.
    pub fn to_json(&self) -> Value {
        Value::Object(self.entries.iter().cloned().collect())
    }
}

/// A value that can show itself in a notebook.
///
/// Implement [`Render::text_plain`] and whichever rich renderings make sense;
/// [`Render::mime_bundle`] assembles them. HTML must be escaped with [`escape_html`].
pub trait Render {
    /// Plain text: what a terminal or a log shows.
    fn text_plain(&self) -> String;

    /// An HTML fragment (escaped), or `None`.
    fn text_html(&self) -> Option<String> {
        None
    }

    /// A Vega-Lite v5 specification, or `None`.
    fn vega_lite(&self) -> Option<Value> {
        None
    }

    /// A standalone SVG image, or `None` (static viewers show it when Vega-Lite
    /// is unavailable).
    fn svg(&self) -> Option<String> {
        None
    }

    /// Every rendering this value offers.
    fn mime_bundle(&self) -> MimeBundle {
        let mut bundle = MimeBundle::text(self.text_plain());
        if let Some(spec) = self.vega_lite() {
            bundle.insert(VEGA_LITE_MIME, spec);
            if let Some(svg) = self.svg() {
                bundle.insert("image/svg+xml", Value::String(svg));
            }
            // JupyterLab prefers text/html over Vega-Lite: a plot carries no HTML.
            return bundle;
        }
        if let Some(svg) = self.svg() {
            bundle.insert("image/svg+xml", Value::String(svg));
        }
        if let Some(html) = self.text_html() {
            bundle.insert("text/html", Value::String(html));
        }
        bundle
    }
}

impl Render for MimeBundle {
    fn text_plain(&self) -> String {
        self.plain().to_string()
    }
    fn mime_bundle(&self) -> MimeBundle {
        self.clone()
    }
}

/// evcxr's display hook: a cell whose last expression implements [`Render`] shows
/// every MIME type it offers. In the prelude, so notebooks need no imports.
pub trait EvcxrDisplay {
    /// Prints the value in evcxr's content-block format.
    fn evcxr_display(&self);
}

impl<T: Render + ?Sized> EvcxrDisplay for T {
    fn evcxr_display(&self) {
        let bundle = self.mime_bundle();
        print_evcxr_content(bundle.entries.iter().map(|(mime, value)| match value {
            Value::String(s) => (mime.as_str(), s.clone()),
            other => (mime.as_str(), other.to_string()),
        }));
    }
}

/// Prints `(mime, body)` pairs as evcxr content blocks, in one write to stdout.
fn print_evcxr_content<'a>(blocks: impl IntoIterator<Item = (&'a str, String)>) {
    let mut out = String::new();
    for (mime, body) in blocks {
        let _ = write!(out, "EVCXR_BEGIN_CONTENT {mime}\n{body}\nEVCXR_END_CONTENT\n");
    }
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    let _ = lock.write_all(out.as_bytes());
    let _ = lock.flush();
}

/// evcxr's display hook for every other `Debug` value: `text/plain` of `{:?}`, exactly
/// what evcxr prints by itself, but found by the cell's first compile. Without it, a cell
/// whose last expression has no `evcxr_display` (a number, a `Vec`, a `Result`) fails to
/// compile once and is built again with evcxr's fallback: a whole second build per cell.
///
/// The receiver is `&mut self`, so method lookup reaches this trait only after
/// [`EvcxrDisplay`] (`&self`) found nothing: [`Render`] types keep their rich output. A
/// value that cannot be borrowed mutably (an immutable variable) still falls back to
/// evcxr's own path, with the same output.
pub trait EvcxrDebugDisplay {
    /// Prints the value's `Debug` form in evcxr's content-block format.
    fn evcxr_display(&mut self);
}

impl<T: std::fmt::Debug + ?Sized> EvcxrDebugDisplay for T {
    fn evcxr_display(&mut self) {
        print_evcxr_content([("text/plain", format!("{self:?}"))]);
    }
}

/// Where [`show`] and [`live`] output goes, read from `TUNEBOOK_DISPLAY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// Marker-protocol lines for `tunebook-kernel` (Jupyter).
    Jupyter,
    /// Plain text (scripts, CLI, the terminal REPL).
    Text,
}

impl Sink {
    /// The sink selected by the environment.
    pub fn current() -> Sink {
        match std::env::var(DISPLAY_ENV).as_deref() {
            Ok("jupyter") => Sink::Jupyter,
            _ => Sink::Text,
        }
    }
}

/// Escapes `&`, `<`, `>`, `"` and `'` for HTML text and attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn emit(op: &str, id: Option<&str>, bundle: &MimeBundle) {
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    let _ = match Sink::current() {
        Sink::Jupyter => writeln!(lock, "{}", protocol::marker_line(op, id, &bundle.to_json())),
        Sink::Text => writeln!(lock, "{}", bundle.plain()),
    };
    let _ = lock.flush();
}

/// Shows a value now, as its own output (`display_data`), like IPython's `display()`.
pub fn show(value: &(impl Render + ?Sized)) {
    emit("display", None, &value.mime_bundle());
}

fn next_display_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Statics are per cell in evcxr: mix in the process id and time so that
    // handles created by different cells never share an id.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("tb-{:x}-{:x}-{n}", std::process::id(), nanos)
}

/// Asks the user for one line of text: an input box in a notebook (Jupyter
/// `input_request`), a prompt in a terminal. Returns the text without the newline.
pub fn input(prompt: &str) -> String {
    if std::env::var_os("EVCXR_IS_RUNTIME").is_some() {
        return evcxr_input_line(prompt);
    }
    print!("{prompt}");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    line.trim_end_matches(['\n', '\r']).to_string()
}

/// evcxr's input protocol: a request line on stdout, the answer as one line on
/// stdin. The answer is read from file descriptor 0 directly, one byte at a
/// time: evcxr's runtime holds the lock of `std::io::stdin()` while a cell runs
/// (so `Stdin::read_line` would deadlock), and reading unbuffered never takes
/// bytes meant for the runtime.
fn evcxr_input_line(prompt: &str) -> String {
    {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let _ = writeln!(out, "EVCXR_INPUT_REQUEST:{}", prompt.replace('\n', " "));
        let _ = out.flush();
    }
    let mut bytes = Vec::new();
    loop {
        let mut b = 0u8;
        // SAFETY: reading one byte into a valid stack buffer.
        let n = unsafe { libc::read(0, (&mut b as *mut u8).cast(), 1) };
        if n <= 0 || b == b'\n' {
            break;
        }
        bytes.push(b);
    }
    String::from_utf8_lossy(&bytes).trim_end_matches('\r').to_string()
}

/// An output area that can be replaced while a cell runs: the first
/// [`LiveDisplay::update`] creates it (`display_data` with a `display_id`), later
/// ones replace it (`update_display_data`).
#[derive(Debug)]
pub struct LiveDisplay {
    id: String,
    shown: bool,
}

/// Creates a live output area. Nothing appears until the first update.
pub fn live() -> LiveDisplay {
    LiveDisplay { id: next_display_id(), shown: false }
}

impl LiveDisplay {
    /// The Jupyter `display_id` of this output.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the output has been created.
    pub fn is_shown(&self) -> bool {
        self.shown
    }

    /// Shows `value`, replacing what this handle showed before.
    pub fn update(&mut self, value: &(impl Render + ?Sized)) {
        let bundle = value.mime_bundle();
        if self.shown {
            emit("update", Some(&self.id), &bundle);
        } else {
            emit("display", Some(&self.id), &bundle);
            self.shown = true;
        }
    }
}

/// A plain table: headers and rows of strings, shown with comfy-table as text and
/// as an escaped HTML table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    /// Optional caption shown above the table.
    pub title: Option<String>,
    /// Column headers.
    pub headers: Vec<String>,
    /// Rows; each as long as `headers`.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with the given headers and no rows.
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Self {
        Table { title: None, headers: headers.into_iter().map(Into::into).collect(), rows: vec![] }
    }

    /// Sets the caption.
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = Some(title.into());
        self
    }

    /// Appends a row.
    pub fn row<S: ToString>(mut self, cells: impl IntoIterator<Item = S>) -> Self {
        self.push(cells);
        self
    }

    /// Appends a row in place.
    pub fn push<S: ToString>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(|c| c.to_string()).collect());
    }
}

/// A comfy-table preset for notebook and terminal text output.
pub(crate) fn text_table(headers: &[String], rows: &[Vec<String>]) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(comfy_table::ContentArrangement::Dynamic)
        .set_width(120)
        .set_header(headers.iter().map(String::as_str));
    for r in rows {
        t.add_row(r.iter().map(String::as_str));
    }
    t.to_string()
}

pub(crate) fn html_table(
    title: Option<&str>,
    headers: &[String],
    rows: &[Vec<String>],
    footer: Option<&str>,
) -> String {
    let escaped: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| escape_html(c)).collect()).collect();
    html_table_trusted(title, headers, &escaped, footer)
}

/// [`html_table`] with cells that are already HTML (the caller escapes user text).
pub(crate) fn html_table_trusted(
    title: Option<&str>,
    headers: &[String],
    rows: &[Vec<String>],
    footer: Option<&str>,
) -> String {
    let mut h = String::from("<div class=\"tunebook-table\">");
    if let Some(t) = title {
        let _ = write!(h, "<strong>{}</strong>", escape_html(t));
    }
    h.push_str("<table><thead><tr>");
    for c in headers {
        let _ = write!(h, "<th>{}</th>", escape_html(c));
    }
    h.push_str("</tr></thead><tbody>");
    for r in rows {
        h.push_str("<tr>");
        for c in r {
            let _ = write!(h, "<td style=\"text-align:left;white-space:pre-wrap\">{c}</td>");
        }
        h.push_str("</tr>");
    }
    h.push_str("</tbody></table>");
    if let Some(f) = footer {
        let _ = write!(h, "<small>{}</small>", escape_html(f));
    }
    h.push_str("</div>");
    h
}

impl Render for Table {
    fn text_plain(&self) -> String {
        let body = text_table(&self.headers, &self.rows);
        match &self.title {
            Some(t) => format!("{t}\n{body}"),
            None => body,
        }
    }
    fn text_html(&self) -> Option<String> {
        Some(html_table(self.title.as_deref(), &self.headers, &self.rows, None))
    }
}

/// Plain strings display as text.
impl Render for str {
    fn text_plain(&self) -> String {
        self.to_string()
    }
}

impl Render for String {
    fn text_plain(&self) -> String {
        self.clone()
    }
}

/// Formatted text with an HTML rendering, for quick rich output in a cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Html {
    /// Plain-text fallback.
    pub text: String,
    /// Trusted HTML (the caller escapes user data with [`escape_html`]).
    pub html: String,
}

impl Render for Html {
    fn text_plain(&self) -> String {
        self.text.clone()
    }
    fn text_html(&self) -> Option<String> {
        Some(self.html.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// evcxr compiles `(expr).evcxr_display();` with the prelude in scope: a `Render` value
    /// (here also `Debug`) must reach the rich hook, anything else the `Debug` one.
    #[test]
    fn the_display_hook_prefers_render_and_falls_back_to_debug() {
        use std::cell::Cell;
        thread_local! { static RICH: Cell<u32> = const { Cell::new(0) }; static PLAIN: Cell<u32> = const { Cell::new(0) }; }
        #[derive(Clone)]
        struct Both;
        impl std::fmt::Debug for Both {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                PLAIN.with(|c| c.set(c.get() + 1));
                f.write_str("Both")
            }
        }
        impl Render for Both {
            fn text_plain(&self) -> String {
                RICH.with(|c| c.set(c.get() + 1));
                "rich".into()
            }
        }
        struct DebugOnly;
        impl std::fmt::Debug for DebugOnly {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                PLAIN.with(|c| c.set(c.get() + 10));
                f.write_str("DebugOnly")
            }
        }
        (Both).evcxr_display();
        let both = Both;
        (both).evcxr_display();
        assert_eq!((RICH.with(Cell::get), PLAIN.with(Cell::get)), (2, 0), "Render values keep their rich display");
        (DebugOnly).evcxr_display();
        (vec![1, 2]).evcxr_display();
        assert_eq!((RICH.with(Cell::get), PLAIN.with(Cell::get)), (2, 10), "other values print their Debug form");
    }

    #[test]
    fn escapes_every_special_character() {
        assert_eq!(escape_html("<a href='x'>&\"</a>"), "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;");
    }

    #[test]
    fn marker_round_trips() {
        let bundle = MimeBundle::text("line one\nline two").with("text/html", Value::String("<b>x</b>".into()));
        let line = protocol::marker_line("update", Some("abc"), &bundle.to_json());
        assert!(!line.contains('\n'), "a marker must be a single line");
        let m = parse_marker(&line).unwrap().unwrap();
        assert!(m.update);
        assert_eq!(m.id.as_deref(), Some("abc"));
        assert_eq!(m.data, bundle.to_json());
    }

    #[test]
    fn bad_markers_are_reported_not_swallowed() {
        assert!(parse_marker("plain output").is_none());
        assert!(parse_marker(&format!("{MARKER_PREFIX}{{oops")).unwrap().is_err());
        assert!(parse_marker(&format!("{MARKER_PREFIX}{{\"op\":\"update\",\"data\":{{}}}}")).unwrap().is_err());
        assert!(parse_marker(&format!("{MARKER_PREFIX}{{\"op\":\"zap\",\"data\":{{}}}}")).unwrap().is_err());
    }

    #[test]
    fn plot_bundle_has_no_html() {
        let plot = LinePlot::new("loss").line(Line::new("train", vec![(0.0, 1.0), (1.0, 0.5)]));
        let b = plot.mime_bundle();
        assert!(b.get(VEGA_LITE_MIME).is_some());
        assert!(b.get("image/svg+xml").is_some());
        assert!(b.get("text/html").is_none());
    }

    #[test]
    fn table_renders_text_and_escaped_html() {
        let t = Table::new(["name", "value"]).row(["<x>", "1"]);
        assert!(t.text_plain().contains("<x>"));
        let html = t.text_html().unwrap();
        assert!(html.contains("&lt;x&gt;") && !html.contains("<x>"));
    }

    #[test]
    fn live_ids_are_unique() {
        assert_ne!(live().id().to_string(), live().id().to_string());
    }
}
