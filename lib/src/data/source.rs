//! Where datasets come from, and writing them back to Delta.

use super::delta::{self, DeltaVersion, WriteMode};
use super::validate::{Problem, Rule};
use super::{DataError, Dataset, RowLines, Task};
use std::collections::BTreeMap;
use polars::prelude::*;
use std::io::Cursor;
use std::path::{Path, PathBuf};

fn io_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Io { path: path.display().to_string(), message: e.to_string() }
}

/// Files under `path` (the file itself, or every file in the folder, recursively)
/// whose extension is one of `exts`, sorted by path.
fn files_with(path: &Path, exts: &[&str]) -> Result<Vec<PathBuf>, DataError> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(io_err(path, "no such file or folder"));
    }
    let mut out = vec![];
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))? {
            let p = entry.map_err(|e| io_err(&dir, e))?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') || name.starts_with('_') {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x))) {
                out.push(p);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(io_err(path, format!("no {} files in this folder", exts.join("/"))));
    }
    Ok(out)
}

fn concat(frames: Vec<DataFrame>, path: &Path) -> Result<DataFrame, DataError> {
    let mut iter = frames.into_iter();
    let mut df = iter.next().unwrap_or_default();
    for f in iter {
        df.vstack_mut_owned(f).map_err(|e| {
            io_err(path, format!("the files do not share one schema ({e}); load them separately and align the columns in polars"))
        })?;
    }
    df.rechunk_mut();
    Ok(df)
}

/// Remembers, per JSON field, which rows hold text and which hold something
/// else. polars gives a column one type, so a number among strings would
/// silently become text; those rows are reported as wrong types instead.
#[derive(Default)]
struct KindTracker {
    row: usize,
    /// field path -> (some row holds a string, rows holding another kind: (row, field, kind))
    fields: BTreeMap<String, (bool, Vec<(usize, String, &'static str)>)>,
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

impl KindTracker {
    fn note(&mut self, path: String, field: String, v: &serde_json::Value) {
        let entry = self.fields.entry(path).or_default();
        match v {
            serde_json::Value::Null => {}
            serde_json::Value::String(_) => entry.0 = true,
            other => entry.1.push((self.row, field, json_kind(other))),
        }
    }

    fn row(&mut self, obj: &serde_json::Map<String, serde_json::Value>) {
        for (k, v) in obj {
            match v {
                serde_json::Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if let serde_json::Value::Object(m) = item {
                            for (kk, vv) in m {
                                self.note(format!("{k}[].{kk}"), format!("{k}[{i}].{kk}"), vv);
                            }
                        }
                    }
                }
                other => self.note(k.clone(), k.clone(), other),
            }
        }
        self.row += 1;
    }

    fn problems(self) -> Vec<Problem> {
        let mut out = vec![];
        for (_, (has_string, others)) in self.fields {
            if !has_string {
                continue;
            }
            for (row, field, kind) in others {
                let name = field.rsplit('.').next().unwrap_or(&field).to_string();
                out.push(Problem::new(
                    Some(row),
                    field,
                    Rule::WrongType,
                    format!("`{name}` must be a string, found {kind}"),
                    format!("write `{name}` as text (in quotes)"),
                ));
            }
        }
        out.sort_by_key(|p| p.row);
        out
    }
}

impl Dataset {
    /// Reads the latest version of a Delta table (a folder holding `_delta_log/`).
    pub fn from_delta(path: impl AsRef<Path>) -> Result<Dataset, DataError> {
        Self::from_delta_at(path, DeltaVersion::Latest)
    }

    /// Reads a Delta table as it was at `version` (time travel).
    pub fn from_delta_version(path: impl AsRef<Path>, version: u64) -> Result<Dataset, DataError> {
        Self::from_delta_at(path, DeltaVersion::Version(version))
    }

    /// Reads a Delta table as it was at an RFC 3339 timestamp (`2025-01-31T12:00:00Z`).
    pub fn from_delta_timestamp(path: impl AsRef<Path>, timestamp: &str) -> Result<Dataset, DataError> {
        Self::from_delta_at(path, DeltaVersion::Timestamp(timestamp.to_string()))
    }

    /// Reads a Delta table at a given version.
    pub fn from_delta_at(path: impl AsRef<Path>, at: DeltaVersion) -> Result<Dataset, DataError> {
        let p = path.as_ref().to_string_lossy().to_string();
        let df = delta::read(&p, &at)?;
        let label = match &at {
            DeltaVersion::Latest => format!("delta:{p}"),
            DeltaVersion::Version(v) => format!("delta:{p}@v{v}"),
            DeltaVersion::Timestamp(t) => format!("delta:{p}@{t}"),
        };
        Ok(Dataset::with_source(df, label))
    }

    /// Chat training data from a serving endpoint's inference table (the Delta table
    /// `tunebook serve --inference-table DIR` writes): every successful chat request
    /// (status 200) becomes one `messages` row, its request's messages followed by the
    /// assistant's reply. Replies cut at `max_tokens` (finish reason `length`), failed
    /// requests and plain completions are left out. Serve, collect, fine-tune again.
    pub fn from_inference_table(path: impl AsRef<Path>) -> Result<Dataset, DataError> {
        let p = path.as_ref().to_string_lossy().to_string();
        let df = delta::read(&p, &DeltaVersion::Latest)?;
        let col = |name: &str| {
            df.column(name).map_err(|_| DataError::Delta {
                path: p.clone(),
                message: format!("no `{name}` column: is this a tunebook inference table (tunebook serve --inference-table)?"),
            })
        };
        let status = col("status_code")?.cast(&DataType::Int64).map_err(|e| DataError::Polars(e.to_string()))?;
        let (req, resp) = (col("request")?, col("response")?);
        let (status, req, resp) = (
            status.i64().map_err(|e| DataError::Polars(e.to_string()))?,
            req.str().map_err(|e| DataError::Polars(e.to_string()))?,
            resp.str().map_err(|e| DataError::Polars(e.to_string()))?,
        );
        let mut lines = Vec::new();
        for i in 0..df.height() {
            let (Some(200), Some(rq), Some(rs)) = (status.get(i), req.get(i), resp.get(i)) else { continue };
            let (Ok(rq), Ok(rs)) = (serde_json::from_str::<serde_json::Value>(rq), serde_json::from_str::<serde_json::Value>(rs)) else {
                continue;
            };
            let choice = &rs["choices"][0];
            let (Some(msgs), Some(reply)) = (rq["messages"].as_array(), choice["message"]["content"].as_str()) else { continue };
            if choice["finish_reason"] == "length" {
                continue;
            }
            let mut messages: Vec<serde_json::Value> = msgs
                .iter()
                .map(|m| {
                    let content = match &m["content"] {
                        serde_json::Value::Array(parts) => parts.iter().filter_map(|x| x["text"].as_str()).collect::<String>(),
                        c => c.as_str().unwrap_or_default().to_string(),
                    };
                    let role = match m["role"].as_str() {
                        Some("developer") => "system",
                        r => r.unwrap_or("user"),
                    };
                    serde_json::json!({"role": role, "content": content})
                })
                .collect();
            messages.push(serde_json::json!({"role": "assistant", "content": reply}));
            lines.extend_from_slice(serde_json::json!({"messages": messages}).to_string().as_bytes());
            lines.push(b'\n');
        }
        if lines.is_empty() {
            return Err(DataError::Delta { path: p, message: "no successful chat request in this inference table yet".into() });
        }
        let df = JsonReader::new(Cursor::new(lines))
            .with_json_format(JsonFormat::JsonLines)
            .infer_schema_len(None)
            .finish()
            .map_err(|e| DataError::Polars(e.to_string()))?;
        Ok(Dataset::with_source(df, format!("inference-table:{p}")).task(Task::Chat))
    }

    /// Reads JSON Lines: one JSON object per line (a `.jsonl` file, or every
    /// `.jsonl`/`.json` file in a folder). Blank lines are skipped; a line that
    /// is not a JSON object is an error naming the file and line.
    pub fn from_jsonl(path: impl AsRef<Path>) -> Result<Dataset, DataError> {
        let path = path.as_ref();
        let mut frames = vec![];
        let mut kinds = KindTracker::default();
        let mut lines = RowLines { files: vec![], at: vec![] };
        for file in files_with(path, &["jsonl", "json"])? {
            let file_index = lines.files.len() as u32;
            lines.files.push(file.display().to_string());
            let bytes = std::fs::read(&file).map_err(|e| io_err(&file, e))?;
            // editors on Windows start files with a byte order mark
            let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
            let mut clean = Vec::with_capacity(bytes.len());
            for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
                let trimmed = line.trim_ascii();
                if trimmed.is_empty() {
                    continue;
                }
                let bad = |message: String| DataError::Parse { path: file.display().to_string(), line: i + 1, message };
                match serde_json::from_slice::<serde_json::Value>(trimmed) {
                    Ok(serde_json::Value::Object(o)) => kinds.row(&o),
                    Ok(other) => {
                        let kind = match other {
                            serde_json::Value::Array(_) => "an array",
                            serde_json::Value::String(_) => "a string",
                            serde_json::Value::Number(_) => "a number",
                            serde_json::Value::Bool(_) => "a boolean",
                            _ => "null",
                        };
                        return Err(bad(format!("expected one JSON object per line, found {kind}")));
                    }
                    Err(e) => {
                        return Err(bad(format!("not valid JSON ({e}); each line must hold one complete JSON object")));
                    }
                }
                clean.extend_from_slice(trimmed);
                clean.push(b'\n');
                lines.at.push((file_index, i as u32 + 1));
            }
            if clean.is_empty() {
                continue;
            }
            let df = JsonReader::new(Cursor::new(clean))
                .with_json_format(JsonFormat::JsonLines)
                .infer_schema_len(None)
                .finish()
                .map_err(|e| io_err(&file, format!("{e}; rows must agree on the type of each field")))?;
            frames.push(df);
        }
        let mut ds = Dataset::with_source(concat(frames, path)?, format!("jsonl:{}", path.display())).with_lines(lines);
        ds.load_problems = kinds.problems();
        Ok(ds)
    }

    /// Reads Parquet (a file, or every `.parquet` file in a folder).
    pub fn from_parquet(path: impl AsRef<Path>) -> Result<Dataset, DataError> {
        let path = path.as_ref();
        let mut frames = vec![];
        for file in files_with(path, &["parquet"])? {
            let f = std::fs::File::open(&file).map_err(|e| io_err(&file, e))?;
            frames.push(ParquetReader::new(f).finish().map_err(|e| io_err(&file, e))?);
        }
        Ok(Dataset::with_source(concat(frames, path)?, format!("parquet:{}", path.display())))
    }

    /// Reads CSV with a header row (a file, or every `.csv` file in a folder).
    /// A chat `messages` column holds each conversation as a JSON string.
    pub fn from_csv(path: impl AsRef<Path>) -> Result<Dataset, DataError> {
        let path = path.as_ref();
        let mut frames = vec![];
        let mut lines = RowLines { files: vec![], at: vec![] };
        for file in files_with(path, &["csv"])? {
            let bytes = std::fs::read(&file).map_err(|e| io_err(&file, e))?;
            let file_index = lines.files.len() as u32;
            lines.files.push(file.display().to_string());
            lines.at.extend(csv_record_lines(&bytes).into_iter().skip(1).map(|l| (file_index, l)));
            let df = CsvReadOptions::default()
                .with_has_header(true)
                .with_infer_schema_length(None)
                .into_reader_with_file_handle(Cursor::new(bytes))
                .finish()
                .map_err(|e| io_err(&file, e))?;
            frames.push(df);
        }
        Ok(Dataset::with_source(concat(frames, path)?, format!("csv:{}", path.display())).with_lines(lines))
    }

    /// Reads every `.txt` file under a folder (recursively, sorted by path) for
    /// continued pretraining: one row per file, columns `path` (relative to
    /// the folder) and `text`. The task is set to [`Task::Text`].
    pub fn from_text_dir(dir: impl AsRef<Path>) -> Result<Dataset, DataError> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(io_err(dir, "not a folder: from_text_dir reads every .txt file under a folder"));
        }
        let files = files_with(dir, &["txt"])?;
        let mut paths = Vec::with_capacity(files.len());
        let mut texts = Vec::with_capacity(files.len());
        for f in &files {
            let bytes = std::fs::read(f).map_err(|e| io_err(f, e))?;
            let text = String::from_utf8(bytes)
                .map_err(|e| io_err(f, format!("not UTF-8 text (byte {}); convert the file to UTF-8", e.utf8_error().valid_up_to())))?;
            paths.push(f.strip_prefix(dir).unwrap_or(f).display().to_string());
            texts.push(text);
        }
        let df = DataFrame::new(
            files.len(),
            vec![Column::new("path".into(), paths), Column::new("text".into(), texts)],
        )?;
        Ok(Dataset::with_source(df, format!("text:{}", dir.display())).task(Task::Text))
    }

    /// Opens any source by its shape: a folder with `_delta_log/` (Delta), a
    /// folder of `.txt` (text), of `.jsonl`/`.parquet`/`.csv` files, or a file
    /// with one of those extensions; an object-store URL (`s3://bucket/table`,
    /// `abfss://…`, `gs://…`) is a Delta table. Append `@vN` to a Delta path for a
    /// version.
    pub fn open(source: &str) -> Result<Dataset, DataError> {
        // On an object store (`s3://`, `abfss://`, `gs://`…) only Delta tables are read.
        if delta::is_object_store_url(source) {
            return match source.rsplit_once("@v").and_then(|(base, v)| v.parse::<u64>().ok().map(|v| (base, v))) {
                Some((base, v)) => Self::from_delta_version(base, v),
                None => Self::from_delta(source),
            };
        }
        if let Some((base, v)) = source.rsplit_once("@v")
            && let Ok(v) = v.parse::<u64>()
            && Path::new(base).join("_delta_log").is_dir()
        {
            return Self::from_delta_version(base, v);
        }
        let path = Path::new(source);
        if path.join("_delta_log").is_dir() {
            return Self::from_delta(path);
        }
        let ext_of = |p: &Path| p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
        let ext = if path.is_dir() {
            let mut found = None;
            for ext in ["jsonl", "json", "parquet", "csv", "txt"] {
                if files_with(path, &[ext]).is_ok() {
                    found = Some(ext.to_string());
                    break;
                }
            }
            found
        } else if path.is_file() {
            ext_of(path)
        } else {
            return Err(io_err(path, "no such file or folder"));
        };
        match ext.as_deref() {
            Some("jsonl" | "json") => Self::from_jsonl(path),
            Some("parquet") => Self::from_parquet(path),
            Some("csv") => Self::from_csv(path),
            Some("txt") if path.is_dir() => Self::from_text_dir(path),
            _ => Err(io_err(
                path,
                "unknown data format: expected a Delta table folder, .jsonl, .parquet, .csv, or a folder of .txt files",
            )),
        }
    }

    /// Writes the data to a Delta table and returns the new table version.
    /// [`WriteMode::Append`] creates the table when there is none;
    /// [`WriteMode::Overwrite`] replaces every row in a single commit (earlier
    /// versions stay readable by time travel).
    pub fn to_delta(&self, path: impl AsRef<Path>, mode: WriteMode) -> Result<u64, DataError> {
        delta::write(&path.as_ref().to_string_lossy(), &self.df, mode)
    }

    /// The current version of the Delta table at `path`, or `None` when there is none.
    pub fn delta_version(path: impl AsRef<Path>) -> Result<Option<u64>, DataError> {
        delta::current_version(&path.as_ref().to_string_lossy())
    }
}

/// The 1-based line on which each record of a CSV file starts (the header
/// included), counting newlines inside quoted fields as polars does. Blank lines
/// are no records.
fn csv_record_lines(bytes: &[u8]) -> Vec<u32> {
    let (mut out, mut line, mut quoted, mut at_start) = (vec![], 1u32, false, true);
    for &b in bytes {
        if at_start && b != b'\n' && b != b'\r' {
            out.push(line);
            at_start = false;
        }
        match b {
            b'"' => quoted = !quoted,
            b'\n' => {
                line += 1;
                if !quoted {
                    at_start = true;
                }
            }
            _ => {}
        }
    }
    out
}
