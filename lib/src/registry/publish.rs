//! A model directory logged as a run's MLflow 3 LoggedModel and registered.

use super::types::{LoggedModel, LoggedModelEnvelope};
use super::{Registry, mlmodel, register_target};
use crate::mlflow::{MlflowClient, RunRef};
use anyhow::{Context, Result};
use reqwest::Method;
use serde_json::{Value, json};
use std::path::Path;

/// What [`log_model`] did.
#[derive(Clone, Debug)]
pub struct LoggedOutput {
    /// The LoggedModel's id (`m-…`).
    pub model_id: String,
    /// `name/version` when registered.
    pub registered: Option<String>,
}

/// Uploads `model_dir` as an MLflow 3 LoggedModel of `run`: creates the
/// LoggedModel, records it as the run's output, uploads the files in the layout of
/// [`mlmodel`] (MLmodel last), and marks it ready. With `reuse` (a LoggedModel a
/// previous attempt created), a model already marked ready is not uploaded again.
pub fn log_model(client: &MlflowClient, run: &RunRef, model_dir: &Path, reuse: Option<&str>) -> Result<LoggedModel> {
    let reg = Registry::with_client(client.clone());
    if let Some(id) = reuse {
        match reg.logged_model(id) {
            Ok(m) if m.status == "LOGGED_MODEL_READY" => return Ok(m),
            Ok(_) | Err(_) => {}
        }
    }
    let name = "model";
    let w: LoggedModelEnvelope = client.post(
        "/logged-models",
        &json!({
            "experiment_id": run.experiment_id, "name": name, "model_type": "transformers",
            "source_run_id": run.run_id,
            "tags": [{"key": "tunebook.version", "value": crate::VERSION}, {"key": "mlflow.source.name", "value": "tunebook"}],
        }),
    )?;
    let m = w.info();
    let _: Value = client.post("/runs/outputs", &json!({"run_id": run.run_id, "models": [{"model_id": m.model_id, "step": 0}]}))?;
    let plan = mlmodel::plan(model_dir, &m.model_id, &run.run_id)?;
    for (local, dest) in &plan.files {
        client.upload_file(&m.artifact_uri, dest, local)?;
    }
    client.upload_bytes(&m.artifact_uri, "requirements.txt", plan.requirements.as_bytes())?;
    client.upload_bytes(&m.artifact_uri, "python_env.yaml", mlmodel::python_env_yaml().as_bytes())?;
    client.upload_bytes(&m.artifact_uri, "MLmodel", plan.mlmodel.as_bytes())?;
    let _: Value = client.call(
        Method::PATCH,
        &format!("/logged-models/{}", m.model_id),
        &json!({"model_id": m.model_id, "status": "LOGGED_MODEL_READY"}),
    )?;
    reg.logged_model(&m.model_id)
}

/// The registry models are registered in: `MLFLOW_REGISTRY_URI`'s when set, else
/// the tracking server's.
fn registry_for(client: &MlflowClient) -> Result<Registry> {
    match crate::mlflow::config::env_nonempty("MLFLOW_REGISTRY_URI") {
        Some(u) if crate::mlflow::config::normalize_uri(&u)? != client.uri() => Registry::new(Some(&u)),
        _ => Ok(Registry::with_client(client.clone())),
    }
}

/// Logs `model_dir` as `run`'s LoggedModel and, with `register_to`, registers it
/// (see [`register_target`]). `reuse` is the LoggedModel an earlier attempt
/// created (it is not uploaded again once ready). The target is checked before
/// anything is uploaded.
pub fn log_and_register(
    client: &MlflowClient,
    run: &RunRef,
    run_name: &str,
    model_dir: &Path,
    register_to: Option<&str>,
    reuse: Option<&str>,
) -> Result<LoggedOutput> {
    let target = register_to.map(|r| register_target(r, run_name)).transpose()?;
    let m = log_model(client, run, model_dir, reuse)?;
    let registered = match target {
        Some((name, aliases)) => {
            let v = registry_for(client)?
                .create_version(&name, &m.model_id, Some(&run.run_id), &aliases)
                .with_context(|| format!("the model was logged as {} but registering it as {name} failed", m.model_id))?;
            Some(v.reference())
        }
        None => None,
    };
    Ok(LoggedOutput { model_id: m.model_id, registered })
}
