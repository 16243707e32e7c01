//! The handle a notebook holds on a fine-tuning run ([`Run`]), and the list of
//! runs. The run directory and its files are [`crate::runs`]'.

use super::config::TrainConfig;
use crate::display::{Line, LinePlot, Render, Table, escape_html};
use crate::files::write_atomic;
use crate::track::metric_names;
use crate::runs::{Event, Progress, RunFiles, Status, StatusFile, worker_alive};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::Duration;

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

    /// The run called `name` (under [`crate::runs::runs_root`]) or at path `name`.
    pub fn attach(name: &str) -> Result<Self> {
        Self::open(crate::runs::resolve_run_dir(name)?)
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
        TrainConfig::from_toml_file(self.dir().join("config.toml"))
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
            if let Some(pid) = s.pid.or_else(|| self.files.worker_pid()).filter(|&pid| !worker_alive(pid)) {
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
        crate::track::MlflowState::load(self.dir()).ok().flatten().and_then(|s| s.registered)
    }

    /// The trained model, loaded and ready to chat (an adapter goes on its base).
    /// An error until the run has completed.
    pub fn model(&self) -> Result<crate::model::Model> {
        let Some(dir) = self.model_dir() else {
            bail!(
                "run {} has no trained model yet (status {}): wait for it with `run.wait()`",
                self.name(),
                self.status().map(|s| s.to_string()).unwrap_or_else(|_| "unknown".into())
            )
        };
        crate::model::Model::load(&dir.to_string_lossy()).with_context(|| format!("loading the model of run {}", self.name()))
    }

    /// Exports the trained model as a GGUF file for llama.cpp and Ollama (an adapter
    /// merged into its base, tensor by tensor), quantized as `quant`; see
    /// [`crate::export::Export`] for adapter-only files, a Modelfile or attaching the file
    /// to the registered version.
    pub fn export_gguf(&self, path: impl AsRef<std::path::Path>, quant: crate::export::Quant) -> Result<crate::export::Exported> {
        if self.model_dir().is_none() {
            bail!("run {} has no trained model yet: wait for it with `run.wait()`", self.name());
        }
        crate::export::Export::new(self.dir().to_string_lossy()).gguf(path.as_ref()).quant(quant).run()
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
        let mut p = LinePlot::new(format!("{}: loss", self.name())).labels("step", "loss").line(Line::new("train", pts(metric_names::TRAIN_LOSS)));
        let eval = pts(metric_names::EVAL_LOSS);
        if !eval.is_empty() {
            p = p.line(Line::new("eval", eval));
        }
        Ok(p)
    }

    /// Asks the worker to checkpoint and stop after the current step, and waits
    /// up to `timeout` for it. Returns the status reached.
    pub fn cancel_and_wait(&self, timeout: Duration) -> Result<Status> {
        // The cancel file first: a worker that has not started yet sees it (under the
        // status lock) and stops; a running one sees it after its current step.
        write_atomic(&self.dir().join("cancel"), b"")?;
        let pid = self.files.update_status(|s| match s.status {
            Status::Pending => (Some(s.cancelled_before_start()), None),
            Status::Running => (None, s.pid),
            _ => (None, None),
        })?;
        if let Some(pid) = pid {
            // SAFETY: sends SIGTERM to the worker's pid recorded in status.json.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
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

/// Every run under [`crate::runs::runs_root`], newest first.
pub fn list() -> Result<Vec<RunSummary>> {
    list_in(&crate::runs::runs_root())
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
