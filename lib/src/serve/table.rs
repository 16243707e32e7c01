//! The inference table: every request and its response appended to a Delta table, with
//! the columns of Databricks' inference tables, in small batched commits written by a
//! thread of their own (never on a request's path).
//!
//! Each flush is one Delta commit: a crash (even SIGKILL) loses at most the rows not yet
//! flushed and never leaves a half-written version. [`Dataset::from_inference_table`]
//! reads the table back as chat training data.
//!
//! [`Dataset::from_inference_table`]: crate::data::Dataset::from_inference_table

use super::api::ApiError;
use crate::data::{Dataset, WriteMode};
use axum::http::HeaderMap;
use polars::prelude::*;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Rows flushed at most this long after they were recorded.
const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// A flush happens at the latest when this many rows wait.
const FLUSH_ROWS: usize = 64;

/// One request and its outcome.
#[derive(Clone, Debug)]
pub struct LogRow {
    /// The server's id of the request.
    pub request_id: String,
    /// The caller's `x-request-id`, if it sent one.
    pub client_request_id: Option<String>,
    /// Milliseconds since the Unix epoch at arrival.
    pub timestamp_ms: i64,
    pub status_code: i32,
    pub execution_time_ms: i64,
    /// The request body (JSON text).
    pub request: String,
    /// The response body (JSON text; the whole reply for streamed requests).
    pub response: String,
    /// The base model's served name.
    pub served_model: String,
    /// The adapter's name when the request chose one.
    pub served_adapter: Option<String>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

impl LogRow {
    /// A request that got an answer (or failed inside the engine, with `status_code` set after).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn ok(
        client_request_id: Option<String>,
        model: &str,
        served_model: &str,
        request: Value,
        response: Value,
        took: Duration,
        prompt_tokens: usize,
        completion_tokens: usize,
    ) -> Self {
        let now = chrono::Utc::now().timestamp_millis();
        let took_ms = took.as_millis() as i64;
        Self {
            request_id: response.get("id").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()),
            client_request_id,
            timestamp_ms: now - took_ms,
            status_code: 200,
            execution_time_ms: took_ms,
            request: request.to_string(),
            response: response.to_string(),
            served_model: served_model.to_string(),
            served_adapter: (model != served_model).then(|| model.to_string()),
            prompt_tokens: prompt_tokens as i64,
            completion_tokens: completion_tokens as i64,
        }
    }

    /// A request refused before generation.
    pub(crate) fn failed(headers: &HeaderMap, model: &str, served_model: &str, request: Value, e: &ApiError) -> Self {
        let mut r = Self::ok(
            headers.get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string),
            model,
            served_model,
            request,
            e.body(),
            Duration::ZERO,
            0,
            0,
        );
        r.status_code = e.status.as_u16() as i32;
        if model.is_empty() || e.code == Some("model_not_found") {
            r.served_adapter = None;
        }
        r
    }
}

fn frame(rows: &[LogRow]) -> PolarsResult<DataFrame> {
    let date: Vec<String> = rows
        .iter()
        .map(|r| chrono::DateTime::from_timestamp_millis(r.timestamp_ms).map(|d| d.format("%Y-%m-%d").to_string()).unwrap_or_default())
        .collect();
    df!(
        "databricks_request_id" => rows.iter().map(|r| r.request_id.clone()).collect::<Vec<_>>(),
        "client_request_id" => rows.iter().map(|r| r.client_request_id.clone()).collect::<Vec<_>>(),
        "date" => date,
        "timestamp_ms" => rows.iter().map(|r| r.timestamp_ms).collect::<Vec<_>>(),
        "status_code" => rows.iter().map(|r| r.status_code).collect::<Vec<_>>(),
        "execution_time_ms" => rows.iter().map(|r| r.execution_time_ms).collect::<Vec<_>>(),
        "request" => rows.iter().map(|r| r.request.clone()).collect::<Vec<_>>(),
        "response" => rows.iter().map(|r| r.response.clone()).collect::<Vec<_>>(),
        "served_model" => rows.iter().map(|r| r.served_model.clone()).collect::<Vec<_>>(),
        "served_adapter" => rows.iter().map(|r| r.served_adapter.clone()).collect::<Vec<_>>(),
        "prompt_tokens" => rows.iter().map(|r| r.prompt_tokens).collect::<Vec<_>>(),
        "completion_tokens" => rows.iter().map(|r| r.completion_tokens).collect::<Vec<_>>(),
    )
}

/// The writer of an inference table.
pub struct InferenceLog {
    tx: Mutex<Option<mpsc::Sender<LogRow>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
}

impl InferenceLog {
    /// Starts the writer thread for the Delta table at `dir` (created on the first flush).
    pub fn start(dir: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let path: PathBuf = dir.into();
        if path.exists() && !path.is_dir() {
            anyhow::bail!("--inference-table {}: this is a file, not a folder for a Delta table", path.display());
        }
        let (tx, rx) = mpsc::channel::<LogRow>();
        let p = path.clone();
        let thread = std::thread::Builder::new().name("inference-table".into()).spawn(move || {
            let mut pending: Vec<LogRow> = Vec::new();
            let mut since: Option<Instant> = None;
            loop {
                let wait = since.map(|s| FLUSH_EVERY.saturating_sub(s.elapsed())).unwrap_or(Duration::from_secs(3600));
                let closed = match rx.recv_timeout(wait) {
                    Ok(row) => {
                        pending.push(row);
                        since.get_or_insert_with(Instant::now);
                        false
                    }
                    Err(RecvTimeoutError::Timeout) => false,
                    Err(RecvTimeoutError::Disconnected) => true,
                };
                let due = since.is_some_and(|s| s.elapsed() >= FLUSH_EVERY) || pending.len() >= FLUSH_ROWS || closed;
                if due && !pending.is_empty() {
                    let result = frame(&pending).map_err(anyhow::Error::from).and_then(|df| {
                        Dataset::from_polars(df).to_delta(&p, WriteMode::Append).map_err(anyhow::Error::from)
                    });
                    match result {
                        Ok(_) => pending.clear(),
                        // Kept for the next flush; the table itself is never half-written.
                        Err(e) => eprintln!("inference table {}: {e:#} (will retry)", p.display()),
                    }
                    since = (!pending.is_empty()).then(Instant::now);
                }
                if closed {
                    return;
                }
            }
        })?;
        Ok(Self { tx: Mutex::new(Some(tx)), thread: Mutex::new(Some(thread)), path })
    }

    /// Queues a row (never blocks on the table).
    pub fn record(&self, row: LogRow) {
        if let Some(tx) = self.tx.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(row);
        }
    }

    /// Flushes what is queued and stops the writer.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }

    /// The table's folder.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(i: usize, status: i32, finish: &str) -> LogRow {
        let request = json!({"model": "m", "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": format!("question {i}")}]});
        let response = json!({"id": format!("chatcmpl-{i}"), "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("answer {i}")}, "finish_reason": finish}]});
        let mut r = LogRow::ok(Some(format!("client-{i}")), if i % 2 == 0 { "m" } else { "dates" }, "m", request, response, Duration::from_millis(5), 10, 3);
        r.status_code = status;
        r
    }

    #[test]
    fn logged_requests_land_in_one_delta_table_and_come_back_as_chat_training_rows() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let table = dir.path().join("inference");
        let log = InferenceLog::start(&table)?;
        for i in 0..5 {
            log.record(row(i, 200, "stop"));
        }
        log.record(row(5, 200, "length"));
        log.record(row(6, 400, "stop"));
        log.close();
        let all = Dataset::from_delta(&table)?;
        assert_eq!(all.len(), 7, "one row per request");
        let df = all.df();
        for c in ["databricks_request_id", "client_request_id", "date", "timestamp_ms", "status_code", "execution_time_ms", "request", "response", "served_model", "served_adapter", "prompt_tokens", "completion_tokens"] {
            assert!(df.column(c).is_ok(), "column {c}");
        }
        assert_eq!(df.column("served_adapter")?.str()?.get(1), Some("dates"));
        assert_eq!(df.column("served_adapter")?.str()?.get(0), None);
        // The flywheel: successful, complete chat answers become training rows.
        let train = Dataset::from_inference_table(&table)?;
        assert_eq!(train.len(), 5, "the cut (length) and the failed (400) requests are left out");
        let first = train.df().column("messages")?.get(0)?.to_string();
        assert!(first.contains("system") && first.contains("question 0") && first.contains("answer 0"), "{first}");
        assert!(train.validate()?.is_valid(), "rows pass the chat data rules");
        Ok(())
    }
}
