//! Runs on disk and the handle a notebook holds on one.
//!
//! A run directory (`~/.tunebook/runs/<name>/`) is the single source of truth:
//!
//! | file | written by | holds |
//! |---|---|---|
//! | `config.toml` | creator | the full [`TrainConfig`] |
//! | `status.json` | creator, worker | [`Status`], pid, message, times |
//! | `progress.json` | worker, every step | [`Progress`] |
//! | `events.jsonl` | worker | one [`Event`] per line |
//! | `metrics.wal` | worker | every metric ([`crate::track::wal`]) |
//! | `worker.log` | worker | its stdout and stderr |
//! | `checkpoints/step-NNNNNNNN/` | worker | weights or adapters, optimizer, state |
//! | `model/` | worker, at the end | the trained model in Hugging Face layout |
//! | `cancel` | `Run::cancel` | present: stop after the current step |
//!
//! Every JSON file is replaced atomically, so a reader never sees half of one.

use super::config::TrainConfig;
use crate::display::{Line, LinePlot, Render, Table, escape_html};
use crate::model::io::atomic_write;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a run stands (the product's status names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Created; the worker has not started yet.
    Pending,
    /// Training.
    Running,
    /// Trained to the end.
    Completed,
    /// Cancelled; a checkpoint was written first.
    Stopped,
    /// Stopped by an error (see the message), or the worker died.
    Failed,
}

impl Status {
    /// Whether the run can change no more (without a resume).
    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Stopped | Status::Failed)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        f.write_str(&s)
    }
}

/// `status.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatusFile {
    /// The status.
    pub status: Status,
    /// Worker process id while it runs.
    pub pid: Option<u32>,
    /// What happened (errors say what to change).
    pub message: Option<String>,
    /// Unix seconds.
    pub created_at: f64,
    /// Unix seconds the worker last started.
    pub started_at: Option<f64>,
    /// Unix seconds it ended.
    pub ended_at: Option<f64>,
}

/// The latest step of a run (`progress.json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    /// Optimizer steps done.
    pub step: usize,
    /// Steps in all.
    pub total_steps: usize,
    /// Fractional epoch.
    pub epoch: f64,
    /// Training loss of the last step.
    pub loss: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Window tokens per second in the last step.
    pub tokens_per_sec: f64,
    /// Estimated seconds to the end.
    pub eta_secs: f64,
    /// Window tokens processed.
    pub tokens_seen: u64,
}

/// One line of `events.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Unix seconds.
    pub time: f64,
    /// `created`, `started`, `resumed`, `eval`, `checkpoint`, `generations`, `cancelled`, `nan`, `warning`, `completed`, `failed`, `registered`.
    pub kind: String,
    /// What happened.
    pub message: String,
}

pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Paths inside a run directory.
#[derive(Clone, Debug)]
pub struct RunFiles {
    dir: PathBuf,
}

impl RunFiles {
    /// The files of the run in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        RunFiles { dir: dir.into() }
    }
    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The run name (the directory name).
    pub fn name(&self) -> String {
        self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
    /// `checkpoints/`.
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }
    /// The directory of the checkpoint at `step`.
    pub fn checkpoint_dir(&self, step: usize) -> PathBuf {
        self.checkpoints_dir().join(format!("step-{step:08}"))
    }
    /// Complete checkpoints, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<(usize, PathBuf)>> {
        let mut out = vec![];
        let rd = match std::fs::read_dir(self.checkpoints_dir()) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.checkpoints_dir().display())),
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_prefix("step-").and_then(|s| s.parse::<usize>().ok()) {
                if e.path().join("trainer_state.json").is_file() {
                    out.push((n, e.path()));
                }
            }
        }
        out.sort();
        Ok(out)
    }
    /// The newest complete checkpoint.
    pub fn latest_checkpoint(&self) -> Result<Option<PathBuf>> {
        Ok(self.checkpoints()?.pop().map(|(_, p)| p))
    }
    /// Whether `Run::cancel` asked the worker to stop.
    pub fn cancel_requested(&self) -> bool {
        self.dir.join("cancel").exists()
    }
    /// Reads `config.toml`.
    pub fn config(&self) -> Result<TrainConfig> {
        TrainConfig::from_toml_file(self.dir.join("config.toml"))
    }
    /// Reads `status.json`.
    pub fn status(&self) -> Result<StatusFile> {
        let p = self.dir.join("status.json");
        let text = std::fs::read_to_string(&p).with_context(|| format!("{} is not a run directory (no status.json)", self.dir.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", p.display()))
    }
    /// Replaces `status.json`.
    pub fn write_status(&self, s: &StatusFile) -> Result<()> {
        atomic_write(&self.dir.join("status.json"), serde_json::to_string_pretty(s)?.as_bytes())
    }
    /// Updates the status, keeping the rest.
    pub fn set_status(&self, status: Status, message: Option<String>) -> Result<()> {
        let mut s = self.status()?;
        s.status = status;
        if message.is_some() {
            s.message = message;
        }
        if status.is_final() {
            s.ended_at = Some(unix_now());
            s.pid = None;
        }
        self.write_status(&s)
    }
    /// Reads `progress.json` (None before the first step).
    pub fn progress(&self) -> Option<Progress> {
        std::fs::read_to_string(self.dir.join("progress.json")).ok().and_then(|t| serde_json::from_str(&t).ok())
    }
    /// Replaces `progress.json`.
    pub fn write_progress(&self, p: &Progress) -> Result<()> {
        atomic_write(&self.dir.join("progress.json"), serde_json::to_vec(p)?.as_slice())
    }
    /// Every event so far.
    pub fn events(&self) -> Vec<Event> {
        std::fs::read_to_string(self.dir.join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// The append side of `events.jsonl`.
pub struct EventLog {
    file: std::fs::File,
}

impl EventLog {
    /// Opens the run's event log for appending.
    pub fn open(files: &RunFiles) -> Result<Self> {
        let p = files.dir().join("events.jsonl");
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&p).with_context(|| format!("opening {}", p.display()))?;
        Ok(EventLog { file })
    }
    /// Appends an event (one write, so lines never interleave).
    pub fn push(&mut self, kind: &str, message: impl Into<String>) -> Result<()> {
        use std::io::Write;
        let e = Event { time: unix_now(), kind: kind.into(), message: message.into() };
        let mut line = serde_json::to_string(&e)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        Ok(())
    }
}

/// Whether process `pid` is alive and is a tunebook worker.
fn worker_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid as i32, 0) } == 0;
    if !exists {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/stat")) {
        // A zombie (state Z) has exited.
        Ok(stat) => {
            let s = String::from_utf8_lossy(&stat);
            !s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'))
        }
        Err(_) => true,
    }
}

/// A handle on a fine-tuning run, in this process or in a worker. Cheap to
/// create; every call reads the run directory afresh, so a handle taken after a
/// kernel restart ([`Run::attach`]) sees the same run.
#[derive(Clone, Debug)]
pub struct Run {
    files: RunFiles,
}

impl Run {
    /// The run in directory `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let files = RunFiles::new(dir);
        files.status()?;
        Ok(Run { files })
    }

    /// The run called `name` (under [`super::runs_root`]) or at path `name`.
    pub fn attach(name: &str) -> Result<Self> {
        Self::open(super::resolve_run_dir(name)?)
    }

    /// The run name.
    pub fn name(&self) -> String {
        self.files.name()
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        self.files.dir()
    }

    /// The run's configuration.
    pub fn config(&self) -> Result<TrainConfig> {
        self.files.config()
    }

    /// Current status. A run whose worker died without saying so (killed, out
    /// of memory) reads as `Failed`.
    pub fn status(&self) -> Result<Status> {
        Ok(self.status_file()?.status)
    }

    /// The full `status.json`, with a dead worker reported as failed.
    pub fn status_file(&self) -> Result<StatusFile> {
        let mut s = self.files.status()?;
        if matches!(s.status, Status::Running | Status::Pending) {
            if let Some(pid) = s.pid.filter(|&pid| !worker_alive(pid)) {
                // Read the status again: the worker may have written its final status
                // just before it exited.
                s = self.files.status()?;
                if matches!(s.status, Status::Running | Status::Pending) {
                    let log = self.dir().join("worker.log");
                    let tail = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    s.status = Status::Failed;
                    s.message = Some(format!(
                        "the worker (pid {pid}) ended without finishing. Last lines of {}:\n{}\nResume with `tunebook train --run-dir {}`",
                        log.display(),
                        tail.join("\n"),
                        self.dir().display()
                    ));
                }
            }
        }
        Ok(s)
    }

    /// The latest progress (None before the first step).
    pub fn progress(&self) -> Option<Progress> {
        self.files.progress()
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.files.events()
    }

    /// Checkpoints, oldest first: (step, directory).
    pub fn checkpoints(&self) -> Result<Vec<(usize, PathBuf)>> {
        self.files.checkpoints()
    }

    /// The registered model version (`name/version`), once the run registered one.
    pub fn registered_model(&self) -> Option<String> {
        self.events().into_iter().rev().find(|e| e.kind == "registered").and_then(|e| e.message.strip_prefix("registered as ").map(str::to_string))
    }

    /// The trained model directory, once completed.
    pub fn model_dir(&self) -> Option<PathBuf> {
        let d = self.dir().join("model");
        d.is_dir().then_some(d)
    }

    /// Every metric logged so far as a DataFrame with columns `step`, `key`,
    /// `value`, `timestamp` (read from the write-ahead log).
    pub fn metrics(&self) -> Result<polars::prelude::DataFrame> {
        use polars::prelude::*;
        let (recs, _) = crate::track::wal::read_from(self.dir(), 0, usize::MAX)?;
        let df = df!(
            "step" => recs.iter().map(|r| r.step).collect::<Vec<_>>(),
            "key" => recs.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
            "value" => recs.iter().map(|r| r.value).collect::<Vec<_>>(),
            "timestamp" => recs.iter().map(|r| r.timestamp).collect::<Vec<_>>(),
        )?;
        Ok(df)
    }

    /// `(step, value)` of one metric.
    pub fn metric(&self, key: &str) -> Result<Vec<(i64, f64)>> {
        let (recs, _) = crate::track::wal::read_from(self.dir(), 0, usize::MAX)?;
        Ok(recs.into_iter().filter(|r| r.key == key).map(|r| (r.step, r.value)).collect())
    }

    /// The training loss (and eval cross-entropy, when evaluated) against the step.
    pub fn plot(&self) -> Result<LinePlot> {
        let (recs, _) = crate::track::wal::read_from(self.dir(), 0, usize::MAX)?;
        let pts = |k: &str| -> Vec<(f64, f64)> {
            recs.iter().filter(|r| r.key == k && r.value.is_finite()).map(|r| (r.step as f64, r.value)).collect()
        };
        let mut p = LinePlot::new(format!("{}: loss", self.name())).labels("step", "loss").line(Line::new("train", pts("loss/train/total")));
        let eval = pts("metrics/eval/LanguageCrossEntropy");
        if !eval.is_empty() {
            p = p.line(Line::new("eval", eval));
        }
        Ok(p)
    }

    /// Asks the worker to checkpoint and stop after the current step, and waits
    /// up to `timeout` for it. Returns the status reached.
    pub fn cancel_and_wait(&self, timeout: Duration) -> Result<Status> {
        atomic_write(&self.dir().join("cancel"), b"")?;
        let s = self.status_file()?;
        if let Some(pid) = s.pid {
            // SAFETY: sends SIGTERM to the worker's pid recorded in status.json.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        if s.status == Status::Pending {
            self.files.set_status(Status::Stopped, Some("cancelled before it started".into()))?;
        }
        let end = std::time::Instant::now() + timeout;
        loop {
            let st = self.status()?;
            if st.is_final() || std::time::Instant::now() >= end {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Cancels the run (checkpoint first), waiting up to 10 minutes for the step
    /// in flight to finish.
    pub fn cancel(&self) -> Result<Status> {
        self.cancel_and_wait(Duration::from_secs(600))
    }

    /// Follows the run until it ends: a live progress bar (ETA, loss) and loss
    /// plot in a notebook, a progress line in a terminal. Interrupting the cell
    /// stops waiting, not the run. Returns the final status; an error when the
    /// run failed.
    pub fn wait(&self) -> Result<Status> {
        let mut bar: Option<crate::display::ProgressBar> = None;
        let mut plot = crate::display::live();
        let mut last_step = usize::MAX;
        let mut last_plot = std::time::Instant::now() - Duration::from_secs(60);
        loop {
            let st = self.status_file()?;
            if let Some(p) = self.progress() {
                if p.step != last_step {
                    last_step = p.step;
                    let b = bar.get_or_insert_with(|| crate::display::ProgressBar::new(self.name(), p.total_steps as u64));
                    b.set(
                        p.step as u64,
                        format!(
                            "step {}/{} · loss {:.4} · lr {:.2e} · {:.0} tok/s · ETA {}",
                            p.step,
                            p.total_steps,
                            p.loss,
                            p.lr,
                            p.tokens_per_sec,
                            crate::display::format_duration(Duration::from_secs_f64(p.eta_secs.max(0.0)))
                        ),
                    );
                    if crate::display::Sink::current() == crate::display::Sink::Jupyter && last_plot.elapsed() > Duration::from_secs(2) {
                        if let Ok(pl) = self.plot() {
                            plot.update(&pl);
                        }
                        last_plot = std::time::Instant::now();
                    }
                }
            }
            if st.status.is_final() {
                if crate::display::Sink::current() == crate::display::Sink::Jupyter {
                    if let Ok(pl) = self.plot() {
                        plot.update(&pl);
                    }
                }
                let b = bar.get_or_insert_with(|| crate::display::ProgressBar::new(self.name(), 1));
                b.finish(format!("{} · {}", st.status, st.message.clone().unwrap_or_default()));
                if st.status == Status::Failed {
                    bail!("run {} failed: {}", self.name(), st.message.unwrap_or_default());
                }
                return Ok(st.status);
            }
            if crate::interrupt::sleep(Duration::from_millis(300)).is_err() {
                println!("stopped waiting; the run goes on (Run::attach({:?}) to follow it again)", self.name());
                return Ok(st.status);
            }
        }
    }
}

impl Run {
    fn summary_table(&self) -> (Table, Option<String>) {
        let st = self.status_file().ok();
        let p = self.progress();
        let mut t = Table::new(["run", "status", "step", "loss", "dir"]);
        t.push([
            self.name(),
            st.as_ref().map(|s| s.status.to_string()).unwrap_or_else(|| "?".into()),
            p.as_ref().map(|p| format!("{}/{}", p.step, p.total_steps)).unwrap_or_default(),
            p.as_ref().map(|p| format!("{:.4}", p.loss)).unwrap_or_default(),
            self.dir().display().to_string(),
        ]);
        (t, st.and_then(|s| s.message))
    }
}

impl Render for Run {
    fn text_plain(&self) -> String {
        let (t, m) = self.summary_table();
        match m {
            Some(m) => format!("{}\n{m}", t.text_plain()),
            None => t.text_plain(),
        }
    }
    fn text_html(&self) -> Option<String> {
        let (t, m) = self.summary_table();
        let mut h = t.text_html().unwrap_or_default();
        if let Some(m) = m {
            h.push_str(&format!("<p>{}</p>", escape_html(&m)));
        }
        Some(h)
    }
}

/// One row of [`list`].
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// Run name.
    pub name: String,
    /// Status.
    pub status: Status,
    /// Base model.
    pub model: String,
    /// Steps done / in all.
    pub step: usize,
    /// Steps in all.
    pub total_steps: usize,
    /// Last training loss.
    pub loss: Option<f64>,
    /// Unix seconds.
    pub created_at: f64,
}

/// Every run under [`super::runs_root`], newest first.
pub fn list() -> Result<Vec<RunSummary>> {
    list_in(&super::runs_root())
}

/// Every run under `root`, newest first.
pub fn list_in(root: &Path) -> Result<Vec<RunSummary>> {
    let mut out = vec![];
    let Ok(rd) = std::fs::read_dir(root) else { return Ok(out) };
    for e in rd.flatten() {
        let Ok(run) = Run::open(e.path()) else { continue };
        let Ok(st) = run.status_file() else { continue };
        let p = run.progress();
        out.push(RunSummary {
            name: run.name(),
            status: st.status,
            model: run.config().map(|c| c.model).unwrap_or_default(),
            step: p.as_ref().map(|p| p.step).unwrap_or(0),
            total_steps: p.as_ref().map(|p| p.total_steps).unwrap_or(0),
            loss: p.map(|p| p.loss),
            created_at: st.created_at,
        });
    }
    out.sort_by(|a, b| b.created_at.total_cmp(&a.created_at));
    Ok(out)
}

/// A table of runs (what `tunebook runs list` prints and a notebook shows).
pub fn table(runs: &[RunSummary]) -> Table {
    let mut t = Table::new(["run", "status", "model", "step", "loss", "created"]).title("runs");
    for r in runs {
        let created = chrono::DateTime::from_timestamp(r.created_at as i64, 0).map(|d| d.format("%Y-%m-%d %H:%M").to_string()).unwrap_or_default();
        t.push([
            r.name.clone(),
            r.status.to_string(),
            r.model.clone(),
            format!("{}/{}", r.step, r.total_steps),
            r.loss.map(|l| format!("{l:.4}")).unwrap_or_default(),
            created,
        ]);
    }
    t
}
