//! What happens after the training loop of a completed run: the loss plot, the
//! run's files uploaded through the tracker, and the model logged to the run's
//! MLflow run and registered through [`crate::registry`]. Also `runs sync`, which
//! does the same later for a run that trained offline.
//!
//! Nothing here stops a run that trained: failures are warnings in the run's
//! events, and `tunebook runs sync` can publish later.

use super::run::Run;
use super::config::TrainConfig;
use crate::runs::{EventKind, EventLog, RunFiles};
use crate::track::{MlflowState, SyncReport, Tracker};
use anyhow::Result;
use std::path::Path;

/// Files uploaded as artifacts at the end of a run: (file in the run directory,
/// artifact directory).
const ARTIFACTS: [(&str, &str); 4] =
    [("config.toml", ""), ("data_report.json", ""), ("eval_generations.jsonl", "eval"), ("loss.svg", "plots")];

/// Writes `loss.svg`, uploads the run's files and logs (and, with `register_to`,
/// registers) the model in `model_dir`. Returns the registered `name/version`.
/// Problems become warning events.
pub(crate) fn publish_run(
    files: &RunFiles,
    cfg: &TrainConfig,
    tracker: &mut dyn Tracker,
    events: &mut EventLog,
    model_dir: &Path,
) -> Option<String> {
    let warn = |events: &mut EventLog, what: &str, e: anyhow::Error| {
        let _ = events.push(
            EventKind::Warning,
            format!("tracking: {what} failed: {e:#} (the run goes on; `tunebook runs sync` can ship it later)"),
        );
    };
    if let Ok(Some(svg)) = Run::open(files.dir()).and_then(|r| r.plot()).map(|p| crate::display::Render::svg(&p)) {
        if let Err(e) = crate::files::write_atomic(&files.dir().join("loss.svg"), svg.as_bytes()) {
            warn(events, "writing loss.svg", e);
        }
    }
    for (file, dest) in ARTIFACTS {
        let p = files.dir().join(file);
        if p.is_file() {
            if let Err(e) = tracker.log_artifact(&p, dest) {
                warn(events, "artifact upload", e);
            }
        }
    }
    match log_model(files.dir(), tracker, model_dir, cfg.register_to.as_deref()) {
        Ok(registered) => {
            if let Some(r) = &registered {
                let _ = events.push(EventKind::Registered, format!("registered as {r}"));
            }
            registered
        }
        Err(e) => {
            warn(events, "model logging", e);
            None
        }
    }
}

/// Logs `model_dir` as the LoggedModel of the MLflow run `tracker` mirrors the run
/// in `run_dir` to and, with `register_to` (`catalog.schema[.model][@alias,...]`),
/// registers it; records both in `mlflow.json`. Returns the registered
/// `name/version`; `None` without a tracking server.
pub fn log_model(run_dir: &Path, tracker: &mut dyn Tracker, model_dir: &Path, register_to: Option<&str>) -> Result<Option<String>> {
    let Some(remote) = tracker.mlflow_run()? else { return Ok(None) };
    log_and_register(&RunFiles::new(run_dir), &remote.client, &remote.run, &remote.run_name, model_dir, register_to, None)
}

/// Logs the model (reusing `reuse`, a LoggedModel an earlier attempt made ready)
/// and registers it; records both in `mlflow.json`.
fn log_and_register(
    files: &RunFiles,
    client: &crate::mlflow::MlflowClient,
    run: &crate::mlflow::RunRef,
    run_name: &str,
    model_dir: &Path,
    register_to: Option<&str>,
    reuse: Option<&str>,
) -> Result<Option<String>> {
    let out = crate::registry::log_and_register(client, run, run_name, model_dir, register_to, reuse)?;
    MlflowState::update(files.dir(), |s| {
        s.logged_model_id = Some(out.model_id.clone());
        if out.registered.is_some() {
            s.registered = out.registered.clone();
        }
    })?;
    Ok(out.registered)
}

/// `tunebook runs sync RUN`: ships the run's metrics and status to MLflow
/// ([`crate::track::sync_run`]), then logs `model/` as the run's LoggedModel and
/// registers it when `tracking.json` has `register_to` (unless done before).
/// Safe to run again: nothing is sent twice.
pub fn sync(run: &str, tracking_uri: Option<&str>) -> Result<SyncReport> {
    let dir = crate::runs::resolve_run_dir(run)?;
    let files = RunFiles::new(&dir);
    let mut report = crate::track::sync_run(&dir, tracking_uri)?;
    let model_dir = dir.join("model");
    let state = MlflowState::load(&dir)?;
    if let (true, Some(state)) = (model_dir.is_dir(), state) {
        let tracking = files.tracking_or_default()?;
        let register_to = tracking.register_to;
        // Unless done before: logged, and registered when asked to.
        if state.logged_model_id.is_none() || (register_to.is_some() && state.registered.is_none()) {
            let client = crate::mlflow::MlflowClient::with_config(crate::mlflow::MlflowConfig::tracking(Some(&state.tracking_uri))?)?;
            let reuse = state.logged_model_id.clone();
            log_and_register(&files, &client, &state.run_ref(), &tracking.run_name, &model_dir, register_to.as_deref(), reuse.as_deref())?;
        }
        let state = MlflowState::load(&dir)?.unwrap_or(state);
        report.model_id = state.logged_model_id;
        report.registered = state.registered;
    }
    Ok(report)
}
