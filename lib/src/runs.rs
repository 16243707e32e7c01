//! Run directories: where fine-tuning runs live, and the typed files inside one
//! that the worker writes and everyone else reads.
//!
//! A run directory (`<runs root>/<name>/`, see [`crate::files::runs_root`]) is the
//! single source of truth about a run:
//!
//! | file | written by | holds |
//! |---|---|---|
//! | `config.toml` | creator | the full training configuration (`train::TrainConfig`) |
//! | `status.json` | creator, worker | [`StatusFile`]: [`Status`], pid, message, times |
//! | `tracking.json` | creator | [`TrackingFile`]: run name, experiment, server, params, tags |
//! | `progress.json` | worker, every step | [`Progress`] |
//! | `events.jsonl` | worker | one [`Event`] per line |
//! | `metrics.wal` | worker | every metric (`track::wal`) |
//! | `mlflow.json` | tracker | the MLflow run it mirrors to (`track::MlflowState`) |
//! | `worker.log` | worker | its stdout and stderr |
//! | `worker.pid` | the process that started the worker | the worker's pid |
//! | `status.lock` | worker, `Run::cancel` | the lock status changes that read first are made under |
//! | `checkpoints/step-NNNNNNNN/` | worker | weights or adapters, optimizer, state |
//! | `model/` | worker, at the end | the trained model in Hugging Face layout |
//! | `cancel` | `Run::cancel` | present: stop after the current step |
//!
//! Writer and reader share one type per file, and every JSON file is replaced
//! atomically ([`crate::files`]), so a reader never sees half of one.
//!
//! Must never: import anything but [`crate::files`] (every stage may read a run).

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use crate::files::runs_root;

/// The directory of run `name_or_path`: an existing directory path, or a run name
/// under [`runs_root`].
pub fn resolve_run_dir(name_or_path: &str) -> Result<PathBuf> {
    let p = Path::new(name_or_path);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let d = runs_root().join(name_or_path);
    if d.is_dir() {
        return Ok(d);
    }
    bail!(
        "no run named {name_or_path:?}: neither a directory nor a run under {} (list runs with `tunebook runs list`)",
        runs_root().display()
    )
}

/// The directory of the run `source` names (a run folder or a run name), when it is one
/// (it holds `status.json`); `None` for anything else (a model folder, an id).
pub fn run_dir_of(source: &str) -> Option<PathBuf> {
    resolve_run_dir(source).ok().filter(|d| d.join("status.json").is_file())
}

/// `tracking.json`: what the tracker needs to open the run's MLflow run, written
/// when the run is created, so a later `tunebook runs sync` can ship it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct TrackingFile {
    /// The run name.
    #[serde(default)]
    pub run_name: String,
    /// The MLflow experiment chosen by the user.
    #[serde(default)]
    pub experiment: Option<String>,
    /// The tracking server chosen by the user.
    #[serde(default)]
    pub tracking_uri: Option<String>,
    /// Where the final model is registered (`catalog.schema[.model][@alias,...]`).
    #[serde(default)]
    pub register_to: Option<String>,
    /// The configuration as params, secrets removed.
    #[serde(default)]
    pub params: Vec<(String, String)>,
    /// Tags of the MLflow run.
    #[serde(default)]
    pub tags: Vec<(String, String)>,
}

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
    #[serde(default)]
    pub pid: Option<u32>,
    /// What happened (errors say what to change).
    #[serde(default)]
    pub message: Option<String>,
    /// Unix seconds.
    #[serde(default)]
    pub created_at: f64,
    /// Unix seconds the worker last started.
    #[serde(default)]
    pub started_at: Option<f64>,
    /// Unix seconds it ended.
    #[serde(default)]
    pub ended_at: Option<f64>,
}

impl StatusFile {
    /// This status after a cancel that came before the worker started: STOPPED,
    /// no worker, the end time kept if one was recorded already.
    pub fn cancelled_before_start(&self) -> StatusFile {
        let mut s = self.clone();
        s.status = Status::Stopped;
        s.pid = None;
        s.message = Some("cancelled before it started".into());
        s.ended_at.get_or_insert_with(unix_now);
        s
    }
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

/// What an [`Event`] records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// The run directory was created.
    Created,
    /// The worker started training from step 0.
    Started,
    /// The worker resumed from a checkpoint.
    Resumed,
    /// Training precision in use (bf16).
    Precision,
    /// Where tracking data goes.
    Tracking,
    /// An evaluation finished.
    Eval,
    /// A checkpoint was written.
    Checkpoint,
    /// The eval prompts were answered.
    Generations,
    /// The run stopped on request.
    Cancelled,
    /// A non-finite loss or gradient stopped the run.
    Nan,
    /// Something went wrong that did not stop the run (tracking, uploads).
    Warning,
    /// The model was logged and registered.
    Registered,
    /// Trained to the end.
    Completed,
    /// The run failed.
    Failed,
}

impl EventKind {
    /// The name written in `events.jsonl`, e.g. `resumed`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Started => "started",
            EventKind::Resumed => "resumed",
            EventKind::Precision => "precision",
            EventKind::Tracking => "tracking",
            EventKind::Eval => "eval",
            EventKind::Checkpoint => "checkpoint",
            EventKind::Generations => "generations",
            EventKind::Cancelled => "cancelled",
            EventKind::Nan => "nan",
            EventKind::Warning => "warning",
            EventKind::Registered => "registered",
            EventKind::Completed => "completed",
            EventKind::Failed => "failed",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// `kind == "resumed"` reads as the file does.
impl PartialEq<&str> for EventKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One line of `events.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Unix seconds.
    pub time: f64,
    /// What happened, as a kind.
    pub kind: EventKind,
    /// What happened, for people.
    pub message: String,
}

/// Unix seconds now.
pub fn unix_now() -> f64 {
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
    /// Reads `status.json`.
    pub fn status(&self) -> Result<StatusFile> {
        let p = self.dir.join("status.json");
        let text = std::fs::read_to_string(&p).with_context(|| format!("{} is not a run directory (no status.json)", self.dir.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", p.display()))
    }
    /// Replaces `status.json`.
    pub fn write_status(&self, s: &StatusFile) -> Result<()> {
        crate::files::write_atomic(&self.dir.join("status.json"), serde_json::to_string_pretty(s)?.as_bytes())
    }
    /// Changes `status.json` under the run's status lock (`status.lock`, an
    /// exclusive `flock`), so two processes that each read, decide and write (a
    /// worker starting, a cancel arriving) never overwrite each other's decision.
    /// `f` gets the current file and returns what to write (`None`: leave it).
    pub fn update_status<T>(&self, f: impl FnOnce(&StatusFile) -> (Option<StatusFile>, T)) -> Result<T> {
        let lock_path = self.dir.join("status.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor this function owns; released when `lock` drops.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("locking {}", lock_path.display()));
        }
        let current = self.status()?;
        let (next, out) = f(&current);
        if let Some(next) = next {
            self.write_status(&next)?;
        }
        drop(lock);
        Ok(out)
    }
    /// The pid of the worker started for this run (`worker.pid`, written by the
    /// process that started it, so a worker that dies before it writes its status is
    /// still seen).
    pub fn worker_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("worker.pid")).ok()?.trim().parse().ok()
    }
    /// Records the pid of the worker just started.
    pub fn write_worker_pid(&self, pid: u32) -> Result<()> {
        crate::files::write_atomic(&self.dir.join("worker.pid"), pid.to_string().as_bytes())
    }
    /// Updates the status (under the status lock), keeping the rest; a final status
    /// records the end time and clears the pid.
    pub fn set_status(&self, status: Status, message: Option<String>) -> Result<()> {
        self.update_status(|current| {
            let mut s = current.clone();
            s.status = status;
            if message.is_some() {
                s.message = message;
            }
            if status.is_final() {
                s.ended_at = Some(unix_now());
                s.pid = None;
            }
            (Some(s), ())
        })
    }
    /// Reads `tracking.json` (None for a run created before it existed).
    pub fn tracking(&self) -> Result<Option<TrackingFile>> {
        let p = self.dir.join("tracking.json");
        match std::fs::read_to_string(&p) {
            Ok(t) => Ok(Some(serde_json::from_str(&t).with_context(|| format!("{} is damaged", p.display()))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }
    /// `tracking.json`, or an empty one for a run without it, with the run name
    /// filled in from the directory name when the file does not give one.
    pub fn tracking_or_default(&self) -> Result<TrackingFile> {
        let mut t = self.tracking()?.unwrap_or_default();
        if t.run_name.is_empty() {
            t.run_name = self.name();
        }
        Ok(t)
    }
    /// Replaces `tracking.json`.
    pub fn write_tracking(&self, t: &TrackingFile) -> Result<()> {
        crate::files::write_atomic(&self.dir.join("tracking.json"), serde_json::to_string_pretty(t)?.as_bytes())
    }
    /// Reads `progress.json` (None before the first step).
    pub fn progress(&self) -> Option<Progress> {
        std::fs::read_to_string(self.dir.join("progress.json")).ok().and_then(|t| serde_json::from_str(&t).ok())
    }
    /// Replaces `progress.json`.
    pub fn write_progress(&self, p: &Progress) -> Result<()> {
        crate::files::write_atomic(&self.dir.join("progress.json"), serde_json::to_vec(p)?.as_slice())
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
    pub fn push(&mut self, kind: EventKind, message: impl Into<String>) -> Result<()> {
        use std::io::Write;
        let e = Event { time: unix_now(), kind, message: message.into() };
        let mut line = serde_json::to_string(&e)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        Ok(())
    }
}

/// Whether process `pid` is alive and is a tunebook worker.
pub fn worker_alive(pid: u32) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kinds_read_back_as_written() {
        let all = [
            EventKind::Created, EventKind::Started, EventKind::Resumed, EventKind::Precision, EventKind::Tracking,
            EventKind::Eval, EventKind::Checkpoint, EventKind::Generations, EventKind::Cancelled, EventKind::Nan,
            EventKind::Warning, EventKind::Registered, EventKind::Completed, EventKind::Failed,
        ];
        let dir = tempfile::tempdir().unwrap();
        let files = RunFiles::new(dir.path());
        let mut log = EventLog::open(&files).unwrap();
        for k in all {
            assert_eq!(serde_json::to_value(k).unwrap(), serde_json::json!(k.as_str()), "{k:?}");
            log.push(k, format!("{k} happened")).unwrap();
        }
        let read: Vec<EventKind> = files.events().into_iter().map(|e| e.kind).collect();
        assert_eq!(read, all);
        assert!(EventKind::Resumed == "resumed" && EventKind::Resumed != "started");
    }

    #[test]
    fn run_files_are_typed_on_both_sides_and_a_damaged_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = RunFiles::new(dir.path());
        let status = StatusFile { status: Status::Running, pid: Some(7), message: None, created_at: 1.0, started_at: Some(2.0), ended_at: None };
        files.write_status(&status).unwrap();
        assert_eq!(files.status().unwrap(), status);
        files.set_status(Status::Completed, Some("done".into())).unwrap();
        let done = files.status().unwrap();
        assert_eq!((done.status, done.pid, done.message.as_deref()), (Status::Completed, None, Some("done")));
        assert!(done.ended_at.is_some());
        assert_eq!(files.tracking().unwrap(), None);
        let t = TrackingFile { run_name: "r".into(), register_to: Some("a.b".into()), ..Default::default() };
        files.write_tracking(&t).unwrap();
        assert_eq!(files.tracking().unwrap(), Some(t));
        std::fs::write(dir.path().join("status.json"), "{").unwrap();
        let e = format!("{:#}", files.status().unwrap_err());
        assert!(e.contains("status.json") && e.contains("damaged"), "{e}");
    }
}

/// The `tunebook` executable a worker runs: `$TUNEBOOK_BIN`, this executable
/// when it is `tunebook`, one beside it, or the first on `PATH`.
pub fn tunebook_binary() -> Result<PathBuf> {
    if let Some(b) = std::env::var_os("TUNEBOOK_BIN") {
        return Ok(PathBuf::from(b));
    }
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_name().is_some_and(|n| n == "tunebook") {
            return Ok(exe);
        }
        if let Some(sib) = exe.parent().map(|d| d.join("tunebook")).filter(|p| p.is_file()) {
            return Ok(sib);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("tunebook");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!("cannot find the `tunebook` executable for a background worker: set TUNEBOOK_BIN to its path (e.g. target/debug/tunebook)")
}
