//! Fine-tuning runs: the [`FineTune`] builder, the trainer, checkpoints and the
//! worker process that runs them.
//!
//! ```no_run
//! use tunebook::model::Lora;
//! use tunebook::data::Task;
//! use tunebook::train::FineTune;
//! let run = FineTune::new("HuggingFaceTB/SmolLM2-135M-Instruct")
//!     .task(Task::Chat)
//!     .train_data("data/support.jsonl")
//!     .register_to("main.support")
//!     .training_duration("2ep")
//!     .learning_rate(2e-4)
//!     .lora(Lora::rank(8).alpha(16.0).dropout(0.05).targets(&["q_proj", "v_proj"]))
//!     .start()?;          // a worker process; survives a kernel restart
//! run.wait()?;            // live progress bar and loss plot
//! # anyhow::Ok(())
//! ```

pub mod cli;
pub mod config;
pub mod optim;
pub mod publish;
pub mod run;
pub mod sample;
pub mod trainer;

pub use config::{Duration, Precision, Schedule, TrainConfig};
pub use crate::runs::{Event, EventKind, Progress, RunFiles, Status, StatusFile, resolve_run_dir, runs_root};
pub use publish::sync;
pub use run::{Run, RunSummary};
pub use trainer::{EvalMetrics, TrainSummary, Trainer, TrainerState};

use crate::data::Dataset;
use crate::dist::Dist;
use std::sync::Arc;
use crate::runs::{EventLog, TrackingFile};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// Every run under [`runs_root`], newest first, as a table.
pub fn runs() -> Result<crate::display::Table> {
    Ok(run::table(&run::list()?))
}

/// The configuration as tracking parameters, without secrets (what
/// [`crate::mlflow::params::is_secret`] calls one, and user info inside URIs).
pub fn redacted_params(cfg: &TrainConfig) -> Vec<(String, String)> {
    cfg.flatten()
        .into_iter()
        .filter(|(k, v)| !crate::mlflow::params::is_secret(k, v))
        .map(|(k, v)| match url::Url::parse(&v) {
            Ok(mut u) if u.has_host() && (!u.username().is_empty() || u.password().is_some()) => {
                let _ = u.set_username("");
                let _ = u.set_password(None);
                (k, u.to_string())
            }
            _ => (k, v),
        })
        .collect()
}

/// Training or evaluation data for the builder: a path (file, folder, Delta
/// table) or a [`Dataset`] already in memory.
#[derive(Clone)]
pub enum DataArg {
    /// Read from this source when the run starts.
    Path(String),
    /// Written into the run directory (parquet) when the run is created.
    Dataset(Box<Dataset>),
}

impl From<&str> for DataArg {
    fn from(s: &str) -> Self {
        DataArg::Path(s.to_string())
    }
}
impl From<String> for DataArg {
    fn from(s: String) -> Self {
        DataArg::Path(s)
    }
}
impl From<&Path> for DataArg {
    fn from(p: &Path) -> Self {
        DataArg::Path(p.display().to_string())
    }
}
impl From<PathBuf> for DataArg {
    fn from(p: PathBuf) -> Self {
        DataArg::Path(p.display().to_string())
    }
}
impl From<Dataset> for DataArg {
    fn from(d: Dataset) -> Self {
        DataArg::Dataset(Box::new(d))
    }
}
impl From<&Dataset> for DataArg {
    fn from(d: &Dataset) -> Self {
        DataArg::Dataset(Box::new(d.clone()))
    }
}

/// A fine-tuning run being described: the product's `fm.create(...)` as a builder.
/// Finish with [`FineTune::start`] (a worker process) or [`FineTune::fit`] (this process).
#[derive(Clone)]
pub struct FineTune {
    cfg: TrainConfig,
    train: Option<DataArg>,
    eval: Option<DataArg>,
}

macro_rules! setters {
    ($($(#[$m:meta])* $name:ident : $ty:ty => $field:ident;)*) => {$(
        $(#[$m])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.cfg.$field = value.into();
            self
        }
    )*};
}

impl FineTune {
    /// Fine-tune `model`: a Hugging Face directory, a `.gguf` file, or a Hugging
    /// Face id in the local cache. Defaults follow the product: chat completion,
    /// one epoch, full fine-tuning at learning rate 5e-6.
    pub fn new(model: impl Into<String>) -> Self {
        FineTune { cfg: TrainConfig { model: model.into(), ..TrainConfig::default() }, train: None, eval: None }
    }

    /// A builder holding a complete configuration (e.g. read from `CONFIG.toml`).
    pub fn from_config(cfg: TrainConfig) -> Self {
        FineTune { cfg, train: None, eval: None }
    }

    /// The configuration so far.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Training data: a path or a [`Dataset`].
    pub fn train_data(mut self, data: impl Into<DataArg>) -> Self {
        self.train = Some(data.into());
        self
    }

    /// Evaluation data: a path or a [`Dataset`].
    pub fn eval_data(mut self, data: impl Into<DataArg>) -> Self {
        self.eval = Some(data.into());
        self
    }

    /// Prompts answered at every checkpoint.
    pub fn eval_prompts<S: Into<String>>(mut self, prompts: impl IntoIterator<Item = S>) -> Self {
        self.cfg.eval_prompts = prompts.into_iter().map(Into::into).collect();
        self
    }

    /// Register the result as `catalog.schema` (named after the run) or `catalog.schema.model`.
    pub fn register_to(mut self, name: &str) -> Self {
        self.cfg.register_to = Some(name.to_string());
        self
    }

    /// Peak learning rate.
    pub fn learning_rate(mut self, lr: f64) -> Self {
        self.cfg.learning_rate = Some(lr);
        self
    }

    /// Tokens per training window.
    pub fn context_length(mut self, n: usize) -> Self {
        self.cfg.context_length = Some(n);
        self
    }

    /// Continue from a checkpoint directory or a saved model or adapter.
    pub fn custom_weights_path(mut self, path: impl AsRef<Path>) -> Self {
        self.cfg.custom_weights_path = Some(path.as_ref().display().to_string());
        self
    }

    /// MLflow experiment name.
    pub fn experiment(mut self, name: &str) -> Self {
        self.cfg.experiment = Some(name.to_string());
        self
    }

    /// MLflow tracking URI (default: `MLFLOW_TRACKING_URI`).
    pub fn tracking_uri(mut self, uri: &str) -> Self {
        self.cfg.tracking_uri = Some(uri.to_string());
        self
    }

    /// Train LoRA adapters instead of every weight, e.g.
    /// `.lora(Lora::rank(8).alpha(16.0).dropout(0.05))` (every projection unless
    /// `.targets(..)` says otherwise).
    pub fn lora(mut self, lora: crate::model::Lora) -> Self {
        self.cfg.lora = Some(lora);
        self
    }

    /// Train every weight (the default).
    pub fn full_finetune(mut self) -> Self {
        self.cfg.lora = None;
        self
    }

    /// Warmup steps.
    pub fn warmup_steps(mut self, n: usize) -> Self {
        self.cfg.warmup_steps = Some(n);
        self
    }

    /// Clip the global gradient norm (0: no clipping).
    pub fn max_grad_norm(mut self, v: f64) -> Self {
        self.cfg.max_grad_norm = Some(v);
        self
    }

    setters! {
        /// What to learn (default: chat completion).
        task: crate::data::Task => task;
        /// `"2ep"`, `"1000000tok"` or `"200ba"`.
        training_duration: &str => training_duration;
        /// Run name (also its directory name).
        name: &str => name;
        /// Hold out this share of the training rows for evaluation.
        eval_split: f64 => eval_split;
        /// Windows per micro-batch.
        batch_size: usize => batch_size;
        /// Micro-batches per optimizer step.
        grad_accum: usize => grad_accum;
        /// Warmup as a share of all steps.
        warmup_ratio: f64 => warmup_ratio;
        /// Learning-rate schedule after warmup.
        schedule: Schedule => schedule;
        /// Floor of the decayed learning rate, as a share of the peak.
        min_lr_ratio: f64 => min_lr_ratio;
        /// AdamW weight decay (never on norms and biases).
        weight_decay: f64 => weight_decay;
        /// Seed for data order, initialisation and dropout.
        seed: u64 => seed;
        /// Checkpoint every N steps.
        checkpoint_every: usize => checkpoint_every;
        /// Checkpoints kept.
        keep_checkpoints: usize => keep_checkpoints;
        /// Upload every checkpoint to the tracking server too.
        log_checkpoints: bool => log_checkpoints;
        /// Evaluate every N steps.
        eval_every: usize => eval_every;
        /// Most evaluation windows per evaluation (0: all).
        eval_max_windows: usize => eval_max_windows;
        /// Tokens generated per eval prompt.
        eval_max_new_tokens: usize => eval_max_new_tokens;
        /// Pack several examples per window.
        packing: bool => packing;
        /// Which chat tokens count in the loss.
        chat_loss: crate::data::ChatLoss => chat_loss;
        /// `f32`, or `bf16` on CUDA.
        precision: Precision => precision;
        /// `auto`, `cpu`, `cuda`, `cuda:N`.
        device: &str => device;
    }

    /// Checks the configuration and reads and validates the data, without
    /// loading the model. Errors say what to change.
    pub fn validate(&self) -> Result<()> {
        let mut cfg = self.cfg.clone();
        if let Some(DataArg::Path(p)) = &self.train {
            cfg.train_data = p.clone();
        } else if self.train.is_some() {
            cfg.train_data = "(in memory)".into();
        }
        cfg.validate()?;
        for (what, arg) in [("train_data", &self.train), ("eval_data", &self.eval)] {
            let ds = match arg {
                Some(DataArg::Path(p)) => trainer::open_data(p, &cfg, what)?,
                Some(DataArg::Dataset(d)) => d.as_ref().clone().task(cfg.task),
                None if what == "train_data" => bail!("train_data is not set: call .train_data(path or dataset)"),
                None => continue,
            };
            ds.validate_strict().with_context(|| format!("{what} has invalid rows; fix them or filter them out"))?;
        }
        Ok(())
    }

    /// Creates the run directory: config, status `PENDING`, and any in-memory
    /// data written as parquet. Fails if the configuration or data is invalid.
    pub fn create(self) -> Result<Run> {
        self.validate()?;
        let mut cfg = self.cfg;
        if cfg.tracking_uri.is_none() {
            cfg.tracking_uri = std::env::var("MLFLOW_TRACKING_URI").ok().filter(|s| !s.is_empty());
        }
        if cfg.experiment.is_none() {
            cfg.experiment = std::env::var("MLFLOW_EXPERIMENT_NAME").ok().filter(|s| !s.is_empty());
        }
        if cfg.name.is_empty() {
            cfg.name = generate_name(&cfg.model);
        }
        // Local paths become absolute: the worker, a resume or a loader of the
        // adapter may run from another directory.
        let absolute = |s: &str| std::fs::canonicalize(s).map(|p| p.display().to_string()).unwrap_or_else(|_| s.to_string());
        cfg.model = absolute(&cfg.model);
        if let Some(w) = &cfg.custom_weights_path {
            cfg.custom_weights_path = Some(absolute(w));
        }
        let root = runs_root();
        std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
        let dir = root.join(&cfg.name);
        std::fs::create_dir(&dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow::anyhow!(
                    "a run named {:?} exists already: attach to it with Run::attach({:?}), or choose another name",
                    cfg.name,
                    cfg.name
                )
            } else {
                anyhow::anyhow!("cannot create {}: {e}", dir.display())
            }
        })?;
        let write_data = |arg: &Option<DataArg>, file: &str| -> Result<Option<String>> {
            Ok(match arg {
                Some(DataArg::Path(p)) => Some(absolute(p)),
                Some(DataArg::Dataset(d)) => {
                    std::fs::create_dir_all(dir.join("data"))?;
                    let path = dir.join("data").join(file);
                    let mut df = d.df().clone();
                    let mut f = std::fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?;
                    polars::prelude::ParquetWriter::new(&mut f).finish(&mut df)?;
                    Some(path.display().to_string())
                }
                None => None,
            })
        };
        cfg.train_data = write_data(&self.train, "train.parquet")?.unwrap_or_default();
        if let Some(e) = write_data(&self.eval, "eval.parquet")? {
            cfg.eval_data = Some(e);
        }
        create_run_dir(&dir, &cfg)?;
        Run::open(dir)
    }

    /// Creates the run and starts it in a worker process (`tunebook train
    /// --run-dir DIR`, detached), returning at once. The run survives a kernel
    /// restart: [`Run::attach`] finds it again.
    pub fn start(self) -> Result<Run> {
        let run = self.create()?;
        spawn_worker(run.dir())?;
        Ok(run)
    }

    /// Creates the run and trains in this process until it ends (scripts, tests).
    pub fn fit(self) -> Result<TrainSummary> {
        let run = self.create()?;
        run_in_process(run.dir(), |_| {})
    }
}

/// Writes `config.toml`, `status.json` (PENDING) and `tracking.json` into `dir`.
pub fn create_run_dir(dir: &Path, cfg: &TrainConfig) -> Result<()> {
    let files = RunFiles::new(dir);
    std::fs::create_dir_all(files.checkpoints_dir())?;
    crate::files::write_atomic(&dir.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    files.write_tracking(&TrackingFile {
        run_name: files.name(),
        experiment: cfg.experiment.clone(),
        tracking_uri: cfg.tracking_uri.clone(),
        register_to: cfg.register_to.clone(),
        params: redacted_params(cfg),
        tags: vec![("tunebook.version".into(), crate::VERSION.into())],
    })?;
    files.write_status(&StatusFile {
        status: Status::Pending,
        pid: None,
        message: None,
        created_at: crate::runs::unix_now(),
        started_at: None,
        ended_at: None,
    })?;
    EventLog::open(&files)?.push(EventKind::Created, format!("run {} created", files.name()))?;
    Ok(())
}

fn generate_name(model: &str) -> String {
    let stem = Path::new(model.trim_end_matches('/'))
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    let stem: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|s| !s.is_empty())
        .take(4)
        .collect::<Vec<_>>()
        .join("-");
    let now = chrono::Local::now().format("%Y%m%d-%H%M%S");
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..4];
    format!("{stem}-{now}-{tag}")
}

pub use crate::runs::tunebook_binary;

/// Starts `tunebook train --run-dir DIR` in its own session (so it outlives the
/// notebook kernel and ignores the terminal's Ctrl-C), output to `worker.log`.
pub fn spawn_worker(dir: &Path) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let bin = tunebook_binary()?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("worker.log"))?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("train").arg("--run-dir").arg(dir).stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // The worker prints plain text, never notebook markers.
    cmd.env_remove(crate::display::DISPLAY_ENV);
    // SAFETY: setsid is async-signal-safe; it runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("starting the training worker {}", bin.display()))?;
    let pid = child.id();
    // Recorded at once, so a worker that dies before it writes its status is seen as
    // dead. In a file of its own: the worker may already be writing status.json.
    RunFiles::new(dir).write_worker_pid(pid)?;
    // Reap the worker when it exits so it does not linger as a zombie of this process.
    std::thread::spawn(move || child.wait());
    Ok(pid)
}

extern "C" fn on_sigterm(_: libc::c_int) {
    trainer::request_cancel();
}

/// The worker's entry point (`tunebook train --run-dir DIR`): runs or resumes the
/// run in `dir` as one rank of `dist`, keeping `status.json` true, and prints one
/// line per step (rank 0).
pub fn run_worker(dir: &Path, dist: Arc<Dist>) -> Result<Status> {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
    let leader = dist.is_leader();
    let summary = run_in_process_on(dir, dist, |p| {
        if !leader {
            return;
        }
        println!(
            "step {}/{} loss {:.4} lr {:.3e} {:.0} tok/s eta {}",
            p.step,
            p.total_steps,
            p.loss,
            p.lr,
            p.tokens_per_sec,
            crate::display::format_duration(std::time::Duration::from_secs_f64(p.eta_secs.max(0.0)))
        );
    })?;
    Ok(summary.status)
}

/// Runs or resumes the run in `dir` in this process, keeping `status.json` true.
pub fn run_in_process(dir: &Path, on_step: impl FnMut(&Progress)) -> Result<TrainSummary> {
    run_in_process_on(dir, Arc::new(Dist::single()), on_step)
}

/// [`run_in_process`] as one rank of `dist`: every rank trains; rank 0 alone keeps
/// `status.json`, the event log, the metrics and the tracker.
pub fn run_in_process_on(dir: &Path, dist: Arc<Dist>, on_step: impl FnMut(&Progress)) -> Result<TrainSummary> {
    let cfg = TrainConfig::from_toml_file(dir.join("config.toml"))?;
    if !dist.is_leader() {
        let tracker = crate::track::tracker_for(None)?;
        return Trainer::new_on(cfg, dir, tracker, dist)?.run(on_step);
    }
    let files = RunFiles::new(dir);
    // Under the status lock: a cancel that came before this worker started is
    // honoured (the run stays STOPPED), otherwise the run is RUNNING from here on.
    let cancelled_before_start = files.update_status(|st| {
        if files.cancel_requested() {
            return (Some(st.cancelled_before_start()), true);
        }
        let mut s = st.clone();
        s.status = Status::Running;
        s.pid = Some(std::process::id());
        s.message = None;
        s.started_at = Some(crate::runs::unix_now());
        s.ended_at = None;
        (Some(s), false)
    })?;
    if cancelled_before_start {
        let _ = std::fs::remove_file(dir.join("cancel"));
        return Ok(TrainSummary { steps: 0, losses: vec![], eval: None, model_dir: None, registered: None, status: Status::Stopped });
    }
    let result = (|| {
        let tracker = crate::track::tracker_for(cfg.tracking_uri.as_deref())?;
        let mut t = Trainer::new_on(cfg.clone(), dir, tracker, dist)?;
        t.run(on_step)
    })();
    match &result {
        Ok(s) => {
            let msg = match s.status {
                Status::Completed => match &s.registered {
                    Some(r) => format!("completed {} steps; registered as {r}", s.steps),
                    None => format!("completed {} steps", s.steps),
                },
                _ => format!("stopped at step {}", s.steps),
            };
            files.set_status(s.status, Some(msg))?;
        }
        Err(e) => {
            let msg = format!("{e:#}");
            let _ = EventLog::open(&files).and_then(|mut l| l.push(EventKind::Failed, msg.clone()));
            files.set_status(Status::Failed, Some(msg))?;
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_drop_credentials_but_keep_options_that_mention_tokens() {
        let cfg = TrainConfig {
            model: "m".into(),
            train_data: "d".into(),
            tracking_uri: Some("http://alice:s3cret@mlflow.example:5000/".into()),
            ..TrainConfig::default()
        };
        let p = redacted_params(&cfg);
        let get = |k: &str| p.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("tracking_uri"), Some("http://mlflow.example:5000/"));
        assert_eq!(get("eval_max_new_tokens"), Some("64"), "a token count is not a secret");
        assert!(p.iter().all(|(_, v)| !v.contains("s3cret")));
    }

    #[test]
    fn a_cancel_before_the_worker_starts_is_kept_and_the_worker_trains_nothing() -> Result<()> {
        let d = tempfile::tempdir()?;
        let dir = d.path().join("early");
        let cfg = TrainConfig { model: "m".into(), train_data: "d".into(), ..TrainConfig::default() };
        create_run_dir(&dir, &cfg)?;
        let run = Run::open(&dir)?;
        assert_eq!(run.cancel_and_wait(std::time::Duration::ZERO)?, Status::Stopped);
        // The worker starts after the cancel: it must not turn the run back to RUNNING.
        let summary = run_in_process(&dir, |_| {})?;
        assert_eq!((summary.status, summary.steps), (Status::Stopped, 0));
        let st = run.status_file()?;
        assert_eq!((st.status, st.message.as_deref()), (Status::Stopped, Some("cancelled before it started")));
        assert!(!dir.join("cancel").exists(), "the handled cancel is removed, so a later resume trains");
        Ok(())
    }

}
