//! Experiment tracking: where a run's parameters, metrics, artifacts and models go
//! besides the run directory.
//!
//! The trainer never talks to a tracking server directly. It appends every metric
//! to the run's write-ahead log ([`wal`]) and calls a [`Tracker`] for the rest; a
//! tracker ships the log from its own thread, so a slow or absent server never
//! slows a training step and never loses a metric.
//!
//! MLflow is the tracking server, spoken to through [`crate::mlflow`]'s client:
//! [`MlflowTracker`] mirrors a run to an MLflow run; [`sync_run`] ships a run that
//! trained offline. Models are not the tracker's business: the training stage
//! logs and registers them through [`crate::registry`] at the end of a run.

pub mod shipper;
pub mod tracker;
pub mod wal;

pub use shipper::ShipProgress;
pub use tracker::{MlflowState, MlflowTracker, SyncReport, TrackerOptions, sync_run};
pub use wal::{MetricRecord, MetricWal, WalCursor};

use crate::mlflow::{MlflowClient, RunRef, RunStatus};

/// The names a training run logs its metrics under: the ones fine-tuning users
/// already chart (Databricks / Composer names).
pub mod metric_names {
    /// Training loss of a step.
    pub const TRAIN_LOSS: &str = "loss/train/total";
    /// Learning rate of a step.
    pub const LEARNING_RATE: &str = "lr";
    /// Global gradient norm before clipping.
    pub const GRAD_NORM: &str = "grad_norm";
    /// Window tokens per second of a step.
    pub const TOKENS_PER_SEC: &str = "throughput/tokens_per_sec";
    /// Mean next-token cross-entropy on the eval data.
    pub const EVAL_LOSS: &str = "metrics/eval/LanguageCrossEntropy";
    /// `exp(EVAL_LOSS)`.
    pub const EVAL_PERPLEXITY: &str = "metrics/eval/LanguagePerplexity";
    /// Share of eval target tokens predicted right (arg-max).
    pub const EVAL_TOKEN_ACCURACY: &str = "metrics/eval/TokenAccuracy";
}

use anyhow::Result;
use std::path::Path;

/// How a run ended, as a tracking server records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// Trained to the end.
    Finished,
    /// Stopped by an error (including NaN loss).
    Failed,
    /// Cancelled by the user.
    Killed,
}

impl From<RunOutcome> for RunStatus {
    fn from(o: RunOutcome) -> Self {
        match o {
            RunOutcome::Finished => RunStatus::Finished,
            RunOutcome::Failed => RunStatus::Failed,
            RunOutcome::Killed => RunStatus::Killed,
        }
    }
}

/// The MLflow run a tracker mirrors a run to: what the training stage needs to log
/// the run's model there.
#[derive(Clone)]
pub struct MlflowRun {
    /// A client for its server.
    pub client: MlflowClient,
    /// The run.
    pub run: RunRef,
    /// The run's name (a `catalog.schema` registration names the model after it).
    pub run_name: String,
}

/// What a tracker is told when a run starts or resumes.
#[derive(Clone, Debug)]
pub struct RunContext<'a> {
    /// The run directory; its `metrics.wal` is the source of every metric.
    pub run_dir: &'a Path,
    /// Run name (also the directory name).
    pub run_name: &'a str,
    /// Experiment name, if the user chose one.
    pub experiment: Option<&'a str>,
    /// Flattened configuration (`key`, `value`), secrets already removed.
    pub params: &'a [(String, String)],
    /// Extra tags (`key`, `value`).
    pub tags: &'a [(String, String)],
}

/// A destination for a run's tracking data. Errors returned by a tracker are
/// reported as warnings by the trainer; they never stop training.
pub trait Tracker: Send {
    /// Called once when a run starts, and again when it resumes (a tracker keeps
    /// whatever it needs to continue the same remote run in the run directory).
    fn start(&mut self, ctx: &RunContext<'_>) -> Result<()>;
    /// A link to the run in a UI, once started.
    fn run_url(&self) -> Option<String> {
        None
    }
    /// Upload a file or a directory as artifacts under `artifact_path`.
    fn log_artifact(&mut self, local: &Path, artifact_path: &str) -> Result<()>;
    /// The MLflow run this tracker mirrors to (opened now if it is not yet), so the
    /// training stage can log the run's model there; `None` when tracking is local.
    fn mlflow_run(&mut self) -> Result<Option<MlflowRun>> {
        Ok(None)
    }
    /// Ship everything left in the metric log and record how the run ended.
    fn finish(&mut self, outcome: RunOutcome) -> Result<()>;
    /// One line for the user about where the run's tracking data is: a link to the
    /// run in a UI, or how to send an offline run to a server later.
    fn summary(&self) -> Option<String> {
        None
    }
}

/// The tracker used when no tracking server is configured: everything stays in
/// the run directory, from where `tunebook runs sync RUN` can ship it later.
/// Its [`summary`](Tracker::summary) says how; [`offline_hint`] says it for a named run.
#[derive(Default)]
pub struct LocalTracker;

/// How to send a run that was tracked only locally to an MLflow server later.
pub fn offline_hint(run_name: &str) -> String {
    format!(
        "no MLflow tracking server is set (MLFLOW_TRACKING_URI): the run is tracked locally only. \
         To send it to MLflow later: `tunebook mlflow up` (or export MLFLOW_TRACKING_URI=...), then `tunebook runs sync {run_name}`"
    )
}

impl Tracker for LocalTracker {
    fn start(&mut self, _ctx: &RunContext<'_>) -> Result<()> {
        Ok(())
    }
    fn summary(&self) -> Option<String> {
        Some(offline_hint("RUN"))
    }
    fn log_artifact(&mut self, _local: &Path, _artifact_path: &str) -> Result<()> {
        Ok(())
    }
    fn finish(&mut self, _outcome: RunOutcome) -> Result<()> {
        Ok(())
    }
}

/// The tracker for a run: MLflow when a tracking URI is given or set in
/// `MLFLOW_TRACKING_URI`, otherwise [`LocalTracker`] (whose
/// [`summary`](Tracker::summary) says how to sync later). An invalid URI is an
/// error; an unreachable server is not (see [`MlflowTracker`]).
pub fn tracker_for(tracking_uri: Option<&str>) -> Result<Box<dyn Tracker>> {
    match tracking_uri.map(str::to_string).or_else(crate::mlflow::config::tracking_uri_from_env) {
        Some(uri) => Ok(Box::new(MlflowTracker::new(Some(&uri))?)),
        None => Ok(Box::new(LocalTracker)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_choice_and_offline_hint() {
        let e = tracker_for(Some("/tmp/mlruns")).err().expect("a path is not a tracking server").to_string();
        assert!(e.contains("tunebook mlflow up"), "{e}");
        let t = tracker_for(Some("http://127.0.0.1:9")).unwrap();
        assert!(t.summary().unwrap().contains("not reached yet"));
        assert!(LocalTracker.summary().unwrap().contains("tunebook runs sync"));
        assert!(offline_hint("my-run").contains("tunebook runs sync my-run"));
    }
}
