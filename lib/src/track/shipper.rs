//! Ships a run's metric log to MLflow from a background thread.
//!
//! The shipper reads `metrics.wal` from the byte offset stored in `mlflow.cursor`,
//! sends at most 1000 records per `log-batch`, and moves the cursor only after the
//! server accepted the batch. A lost answer (the server died mid-request, a
//! timeout) means the batch is sent again: records keep the timestamp they were
//! logged with, so the second copy is identical, and MLflow's SQL store keeps one
//! row per `(run, key, step, timestamp, value)` (its primary key; the integration
//! tests check that a re-sent batch adds nothing). While the server is away the
//! shipper waits with a growing pause (0.5 s to 10 s); the trainer never waits for
//! it, since it only appends to the log.

use crate::mlflow::client::{MlflowClient, mlflow_error};
use crate::mlflow::params::{MAX_METRICS_PER_BATCH, sanitize_key};
use super::wal::{MetricRecord, WalCursor, read_from};
use super::tracker::RemoteRun;
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Name of the shipper's cursor file in the run directory.
pub const CURSOR_FILE: &str = "mlflow.cursor";
/// Metrics the server refused for good (bad names or values), one JSON line each.
pub const REJECTED_FILE: &str = "mlflow.rejected";

/// What the shipper has done so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShipProgress {
    /// Records delivered by this shipper.
    pub shipped: u64,
    /// Records the server refused for good (kept in `mlflow.rejected`).
    pub rejected: u64,
    /// Byte offset delivered up to.
    pub offset: u64,
    /// True when everything in the log at the last look was delivered.
    pub caught_up: bool,
    /// The last error, cleared by the next success.
    pub last_error: Option<String>,
    /// Set when shipping stopped for good (the remote run is gone, the log is damaged).
    pub fatal: Option<String>,
}

struct Ctl {
    stop: bool,
    deadline: Option<Instant>,
    progress: ShipProgress,
}

struct Shared {
    ctl: Mutex<Ctl>,
    wake: Condvar,
}

/// Background metric shipping for one run.
pub struct Shipper {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

/// One batch's fate.
pub(crate) enum Sent {
    /// Nothing new in the log.
    Idle,
    /// Delivered (and rejected) this many records.
    Batch { delivered: usize, rejected: usize },
}

/// Sends the next batch of the log (at most 1000 records) and moves the cursor.
/// Records the server refuses for good are written to `mlflow.rejected` and
/// skipped; any other failure leaves the cursor where it was.
pub(crate) fn ship_batch(client: &MlflowClient, run_id: &str, run_dir: &Path, cursor: &WalCursor) -> Result<Sent> {
    let offset = cursor.load()?;
    let (mut records, next) = read_from(run_dir, offset, MAX_METRICS_PER_BATCH)?;
    if records.is_empty() {
        return Ok(Sent::Idle);
    }
    for r in &mut records {
        if r.key.len() > 250 || !r.key.chars().all(|c| c.is_ascii_alphanumeric() || "_-. :/".contains(c)) {
            r.key = sanitize_key(&r.key);
        }
    }
    match client.log_batch(run_id, &records, &[], &[]) {
        Ok(()) => {
            cursor.store(next)?;
            Ok(Sent::Batch { delivered: records.len(), rejected: 0 })
        }
        Err(e) if is_refusal(&e) => {
            // One bad record must not hold back the rest: send them one by one.
            let mut rejected = Vec::new();
            for r in &records {
                if let Err(e) = client.log_batch(run_id, std::slice::from_ref(r), &[], &[]) {
                    if !is_refusal(&e) {
                        return Err(e);
                    }
                    rejected.push((r.clone(), format!("{e:#}")));
                }
            }
            if !rejected.is_empty() {
                append_rejected(run_dir, &rejected)?;
            }
            cursor.store(next)?;
            Ok(Sent::Batch { delivered: records.len() - rejected.len(), rejected: rejected.len() })
        }
        Err(e) => Err(e),
    }
}

/// A 400 about the data itself (not credentials, not a missing run, not an outage).
fn is_refusal(e: &anyhow::Error) -> bool {
    mlflow_error(e).is_some_and(|m| m.status() == Some(400) && m.error_code() == Some("INVALID_PARAMETER_VALUE"))
}

fn append_rejected(run_dir: &Path, rejected: &[(MetricRecord, String)]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(run_dir.join(REJECTED_FILE))?;
    for (r, why) in rejected {
        writeln!(f, "{}", serde_json::json!({"record": r, "error": why}))?;
    }
    Ok(())
}

impl Shipper {
    /// Starts shipping `run_dir`'s log to the run `remote` opens (creating it first
    /// if the server could not be reached yet). `client` should not retry by itself.
    pub(crate) fn spawn(client: MlflowClient, remote: Arc<RemoteRun>, run_dir: PathBuf, poll: Duration) -> Result<Shipper> {
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl { stop: false, deadline: None, progress: ShipProgress::default() }),
            wake: Condvar::new(),
        });
        let s2 = shared.clone();
        let handle = std::thread::Builder::new()
            .name("tunebook-mlflow-shipper".into())
            .spawn(move || run(client, remote, run_dir, poll, s2))?;
        Ok(Shipper { shared, handle: Some(handle) })
    }

    /// A snapshot of the progress.
    pub fn progress(&self) -> ShipProgress {
        self.shared.ctl.lock().unwrap().progress.clone()
    }

    /// Asks the shipper to deliver what is left, giving up at `deadline`, and waits
    /// for it. Returns the final progress.
    pub fn drain(&mut self, deadline: Instant) -> ShipProgress {
        {
            let mut c = self.shared.ctl.lock().unwrap();
            c.stop = true;
            c.deadline = Some(deadline);
        }
        self.shared.wake.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.progress()
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        if self.handle.is_some() {
            // Dropped without finish: stop promptly; the cursor keeps what was delivered.
            self.drain(Instant::now());
        }
    }
}

fn run(client: MlflowClient, remote: Arc<RemoteRun>, run_dir: PathBuf, poll: Duration, shared: Arc<Shared>) {
    let cursor = WalCursor::new(&run_dir, CURSOR_FILE);
    let mut backoff = Duration::from_millis(500);
    let max_backoff = Duration::from_secs(10);
    // Waits up to `d` (woken early by drain). Returns false when it is time to give up.
    let pause = |d: Duration, idle: bool| -> bool {
        let c = shared.ctl.lock().unwrap();
        if c.stop {
            let Some(deadline) = c.deadline else { return false };
            let now = Instant::now();
            if idle || now >= deadline {
                return false;
            }
            let _ = shared.wake.wait_timeout(c, d.min(deadline - now)).unwrap();
            return true;
        }
        let _ = shared.wake.wait_timeout(c, d).unwrap();
        true
    };
    let set_err = |msg: Option<String>| shared.ctl.lock().unwrap().progress.last_error = msg;
    loop {
        let run_id = match remote.ensure(&client) {
            Ok(state) => state.run_id,
            Err(e) => {
                let fatal = mlflow_error(&e).is_some_and(|m| !m.is_transient() && m.status() != Some(401) && m.status() != Some(403));
                set_err(Some(format!("{e:#}")));
                if fatal {
                    shared.ctl.lock().unwrap().progress.fatal = Some(format!("{e:#}"));
                    return;
                }
                if !pause(backoff, false) {
                    return;
                }
                backoff = (backoff * 2).min(max_backoff);
                continue;
            }
        };
        match ship_batch(&client, &run_id, &run_dir, &cursor) {
            Ok(Sent::Idle) => {
                {
                    let mut c = shared.ctl.lock().unwrap();
                    c.progress.caught_up = true;
                    c.progress.last_error = None;
                    c.progress.offset = cursor.load().unwrap_or(c.progress.offset);
                }
                backoff = Duration::from_millis(500);
                if !pause(poll, true) {
                    return;
                }
            }
            Ok(Sent::Batch { delivered, rejected }) => {
                let mut c = shared.ctl.lock().unwrap();
                c.progress.shipped += delivered as u64;
                c.progress.rejected += rejected as u64;
                c.progress.caught_up = false;
                c.progress.last_error = None;
                c.progress.offset = cursor.load().unwrap_or(c.progress.offset);
                backoff = Duration::from_millis(500);
            }
            Err(e) => {
                let m = mlflow_error(&e);
                if m.is_some_and(|m| m.is_not_found()) {
                    let msg = format!("{e:#} (the MLflow run {run_id} was deleted; metrics stay in {})", run_dir.display());
                    let mut c = shared.ctl.lock().unwrap();
                    c.progress.fatal = Some(msg.clone());
                    c.progress.last_error = Some(msg);
                    return;
                }
                if m.is_none() && e.to_string().contains("not a metric record") {
                    let mut c = shared.ctl.lock().unwrap();
                    c.progress.fatal = Some(format!("{e:#}"));
                    c.progress.last_error = Some(format!("{e:#}"));
                    return;
                }
                set_err(Some(format!("{e:#}")));
                if !pause(backoff, false) {
                    return;
                }
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}
