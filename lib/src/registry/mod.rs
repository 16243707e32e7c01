//! The model registry: fine-tuned models logged to MLflow (the MLflow 3
//! LoggedModel flow), registered under names such as `main.support.bot` with
//! versions and aliases, and loaded back ready to chat.
//!
//! ```no_run
//! # use tunebook::prelude::*;
//! # fn main() -> anyhow::Result<()> {
//! let bot = Registry::load("main.support.bot@champion")?;   // or "main.support.bot/3", "models:/main.support.bot@champion"
//! bot.chat(&[Message::user("Where is my order?")])?;
//! # Ok(()) }
//! ```
//!
//! The registry is the tracking server's (or `MLFLOW_REGISTRY_URI`'s). By concern:
//! [`refs`] parses model references and `register_to` names; [`types`] holds the
//! REST objects (registered models, versions, LoggedModels) and their notebook
//! cards; this file has [`Registry`], the client for names, versions and aliases;
//! [`cache`] downloads a version into `$TUNEBOOK_CACHE/registry` (by server, name
//! and version, staged then renamed into place, so a cached version is always
//! complete) and loads it; [`publish`] logs a model directory as a run's
//! LoggedModel and registers it.
//!
//! Must never: import the training or tracking stages (a run's end calls
//! [`publish`], not the other way round), overwrite or half-write a cached
//! version, or register before the upload is complete.

pub mod cache;
pub mod mlmodel;
pub mod publish;
pub mod refs;
pub mod types;

pub use cache::{GGUF_DIR, cache_root, load_mlflow_model_dir};
pub use publish::{LoggedOutput, log_and_register, log_model};
pub use refs::{ModelRef, Selector, parse_model_ref, register_target};
use refs::check_alias;
pub use types::{AliasEntry, LoggedModel, ModelVersion, RegisteredModel, models_table, versions_table};

use crate::mlflow::api::paginate;
use crate::mlflow::{MlflowClient, MlflowConfig, client::mlflow_error};
use crate::model::Model;
use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::PathBuf;

/// The model registry of one MLflow server.
#[derive(Clone, Debug)]
pub struct Registry {
    client: MlflowClient,
    cache: Option<PathBuf>,
}

/// Loads what a model argument names: a local path or Hugging Face id with `local`, a
/// registered model (`models:/..`, `name@alias`, or `name/3` that is nothing local)
/// through [`Registry::load`].
pub fn load_local_or_registered(spec: &str, local: impl FnOnce(&str) -> Result<Model>) -> Result<Model> {
    let exists = std::path::Path::new(spec).exists();
    if !exists && (spec.starts_with("models:/") || spec.contains('@')) {
        return Registry::load(spec);
    }
    match local(spec) {
        Ok(m) => Ok(m),
        Err(e) if !exists && parse_model_ref(spec).is_ok() => {
            Registry::load(spec).with_context(|| format!("{spec} is neither a local model ({e:#}) nor a registered one"))
        }
        Err(e) => Err(e),
    }
}

impl Registry {
    /// The registry at `uri`, else `MLFLOW_REGISTRY_URI`, else `MLFLOW_TRACKING_URI`.
    pub fn new(uri: Option<&str>) -> Result<Self> {
        Ok(Registry { client: MlflowClient::with_config(MlflowConfig::registry(uri)?)?, cache: None })
    }

    /// A registry using `client`'s server.
    pub fn with_client(client: MlflowClient) -> Self {
        Registry { client, cache: None }
    }

    /// Downloads go under `dir` instead of [`cache_root`].
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache = Some(dir.into());
        self
    }

    /// The client.
    pub fn client(&self) -> &MlflowClient {
        &self.client
    }

    /// Downloads a registered model (`main.support.bot@champion`, `name/3`,
    /// `models:/name/3`, `models:/name@alias`, `name` for the newest version) from
    /// the registry of `MLFLOW_REGISTRY_URI` / `MLFLOW_TRACKING_URI` into the local
    /// cache and loads it, ready to `chat`.
    pub fn load(spec: &str) -> Result<Model> {
        Registry::new(None)?.load_model(spec)
    }

    /// [`Registry::load`] on this registry.
    pub fn load_model(&self, spec: &str) -> Result<Model> {
        let dir = self.download(spec)?;
        load_mlflow_model_dir(&dir).with_context(|| format!("loading {spec} from {}", dir.display()))
    }

    /// The version a reference names.
    pub fn resolve(&self, spec: &str) -> Result<ModelVersion> {
        match parse_model_ref(spec)? {
            ModelRef::Logged { .. } => bail!("{spec} names a logged model, not a registered version"),
            ModelRef::Registered { name, selector } => match selector {
                Selector::Version(v) => self.version(&name, &v.to_string()),
                Selector::Alias(a) => {
                    #[derive(Deserialize)]
                    struct R {
                        model_version: ModelVersion,
                    }
                    let r: R = self
                        .client
                        .get("/registered-models/alias", &[("name", &name), ("alias", &a)])
                        .map_err(|e| self.explain_missing(e, &name, Some(&a)))?;
                    Ok(self.stamp(r.model_version))
                }
                Selector::Latest => {
                    let mut vs = self.versions(&name)?;
                    vs.sort_by_key(|v| v.version.parse::<u64>().unwrap_or(0));
                    vs.pop().with_context(|| format!("registered model {name:?} has no versions"))
                }
            },
        }
    }

    fn explain_missing(&self, e: anyhow::Error, name: &str, alias: Option<&str>) -> anyhow::Error {
        // A missing alias is a 400 INVALID_PARAMETER_VALUE "... alias x not found".
        let missing = mlflow_error(&e).is_some_and(|m| m.is_not_found() || (m.status() == Some(400) && m.to_string().contains("not found")));
        if !missing {
            return e;
        }
        let what = match alias {
            Some(a) => format!("alias @{a} of {name:?}"),
            None => format!("registered model {name:?}"),
        };
        let known = match self.model(name) {
            Ok(m) if alias.is_some() => format!(
                "; its aliases: {}",
                if m.aliases.is_empty() { "none".into() } else { m.aliases.iter().map(|a| format!("@{}", a.alias)).collect::<Vec<_>>().join(", ") }
            ),
            _ => String::new(),
        };
        e.context(format!("{what} not found on {}{known}", self.client.uri()))
    }

    /// A registered model.
    pub fn model(&self, name: &str) -> Result<RegisteredModel> {
        #[derive(Deserialize)]
        struct R {
            registered_model: RegisteredModel,
        }
        let r: R = self.client.get("/registered-models/get", &[("name", name)])?;
        let mut m = r.registered_model;
        m.server = self.client.uri().to_string();
        Ok(m)
    }

    /// Creates a registered model, or returns it if it exists.
    pub fn create_model(&self, name: &str) -> Result<RegisteredModel> {
        let body = json!({"name": name, "tags": [{"key": "tunebook.version", "value": crate::VERSION}]});
        match self.client.post::<Value>("/registered-models/create", &body) {
            Ok(_) => {}
            Err(e) if mlflow_error(&e).is_some_and(|m| m.is_already_exists()) => {}
            Err(e) => return Err(e),
        }
        self.model(name)
    }

    /// Deletes a registered model and all its versions.
    pub fn delete_model(&self, name: &str) -> Result<()> {
        let _: Value = self.client.call(Method::DELETE, "/registered-models/delete", &json!({"name": name}))?;
        Ok(())
    }

    /// Registered models matching an MLflow filter (`""` for all, e.g. `name LIKE 'main.support.%'`).
    pub fn search(&self, filter: &str) -> Result<Vec<RegisteredModel>> {
        #[derive(Deserialize)]
        struct R {
            #[serde(default)]
            registered_models: Vec<RegisteredModel>,
            #[serde(default)]
            next_page_token: Option<String>,
        }
        let out = paginate(usize::MAX, |token, _| {
            let mut q = vec![("filter", filter), ("max_results", "1000")];
            if let Some(t) = token {
                q.push(("page_token", t));
            }
            let r: R = self.client.get("/registered-models/search", &q)?;
            Ok((r.registered_models, r.next_page_token))
        })?;
        Ok(out
            .into_iter()
            .map(|mut m| {
                m.server = self.client.uri().to_string();
                m
            })
            .collect())
    }

    /// One version.
    pub fn version(&self, name: &str, version: &str) -> Result<ModelVersion> {
        #[derive(Deserialize)]
        struct R {
            model_version: ModelVersion,
        }
        let r: R = self
            .client
            .get("/model-versions/get", &[("name", name), ("version", version)])
            .map_err(|e| self.explain_missing(e, &format!("{name}/{version}"), None))?;
        Ok(self.stamp(r.model_version))
    }

    /// Every version of a model, oldest first.
    pub fn versions(&self, name: &str) -> Result<Vec<ModelVersion>> {
        #[derive(Deserialize)]
        struct R {
            #[serde(default)]
            model_versions: Vec<ModelVersion>,
            #[serde(default)]
            next_page_token: Option<String>,
        }
        let filter = format!("name='{}'", name.replace('\'', "\\'"));
        let mut out: Vec<ModelVersion> = paginate(usize::MAX, |token, _| {
            let mut q = vec![("filter", filter.as_str()), ("max_results", "10000")];
            if let Some(t) = token {
                q.push(("page_token", t));
            }
            let r: R = self.client.get("/model-versions/search", &q)?;
            Ok((r.model_versions, r.next_page_token))
        })?
        .into_iter()
        .map(|v| self.stamp(v))
        .collect();
        out.sort_by_key(|v| v.version.parse::<u64>().unwrap_or(0));
        // The search answer does not carry aliases: take them from the model.
        if let Ok(m) = self.model(name) {
            for v in &mut out {
                v.aliases = m.aliases.iter().filter(|a| a.version == v.version).map(|a| a.alias.clone()).collect();
            }
        }
        Ok(out)
    }

    /// Registers a LoggedModel as a new version of `name` (created if needed),
    /// linked to `run_id`, and points `aliases` at it.
    pub fn create_version(&self, name: &str, model_id: &str, run_id: Option<&str>, aliases: &[String]) -> Result<ModelVersion> {
        for a in aliases {
            check_alias(a)?;
        }
        self.create_model(name)?;
        #[derive(Deserialize)]
        struct R {
            model_version: ModelVersion,
        }
        let mut body = json!({"name": name, "source": format!("models:/{model_id}"), "model_id": model_id});
        if let Some(r) = run_id {
            body["run_id"] = json!(r);
        }
        let r: R = self.client.post("/model-versions/create", &body)?;
        let mut v = self.stamp(r.model_version);
        // Versions start PENDING_REGISTRATION on some stores; wait for READY.
        let start = std::time::Instant::now();
        while v.status.as_deref() == Some("PENDING_REGISTRATION") && start.elapsed().as_secs() < 300 {
            std::thread::sleep(std::time::Duration::from_millis(500));
            v = self.version(name, &v.version)?;
        }
        if v.status.as_deref() == Some("FAILED_REGISTRATION") {
            bail!("registering {}/{} failed on the server", name, v.version);
        }
        for a in aliases {
            self.set_alias(name, a, &v.version)?;
        }
        if !aliases.is_empty() {
            v.aliases = aliases.to_vec();
        }
        Ok(v)
    }

    /// Points `alias` at a version (moving it if it pointed elsewhere).
    pub fn set_alias(&self, name: &str, alias: &str, version: &str) -> Result<()> {
        check_alias(alias)?;
        let _: Value = self.client.post("/registered-models/alias", &json!({"name": name, "alias": alias, "version": version}))?;
        Ok(())
    }

    /// Removes an alias.
    pub fn delete_alias(&self, name: &str, alias: &str) -> Result<()> {
        let _: Value = self.client.call(Method::DELETE, "/registered-models/alias", &json!({"name": name, "alias": alias}))?;
        Ok(())
    }

    /// A LoggedModel by id.
    pub fn logged_model(&self, model_id: &str) -> Result<LoggedModel> {
        let w: types::LoggedModelEnvelope = self.client.get(&format!("/logged-models/{model_id}"), &[])?;
        Ok(w.info())
    }

    /// Where a version's files are (an artifact root on the server).
    pub fn download_uri(&self, name: &str, version: &str) -> Result<String> {
        #[derive(Deserialize)]
        struct R {
            artifact_uri: String,
        }
        let r: R = self.client.get("/model-versions/get-download-uri", &[("name", name), ("version", version)])?;
        Ok(r.artifact_uri)
    }

    fn stamp(&self, mut v: ModelVersion) -> ModelVersion {
        v.server = self.client.uri().to_string();
        v
    }
}
