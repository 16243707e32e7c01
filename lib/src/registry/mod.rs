//! The model registry: fine-tuned models logged to MLflow (the MLflow 3
//! LoggedModel flow), registered under names such as `main.support.bot` with
//! versions and aliases, and loaded back ready to chat.
//!
//! ```no_run
//! # use tunebook::prelude::*;
//! # fn main() -> anyhow::Result<()> {
//! let bot = Registry::load("main.support.bot@champion")?;   // or "main.support.bot/3", "models:/main.support.bot@champion"
//! bot.chat(&[ChatMessage::user("Where is my order?")])?;
//! # Ok(()) }
//! ```
//!
//! The registry is the tracking server's (or `MLFLOW_REGISTRY_URI`'s). Downloads
//! are cached in `$TUNEBOOK_CACHE/registry` (by default `~/.cache/tunebook/registry`)
//! by server, name and version, written to a temporary directory first and renamed
//! into place, so a cached version is always complete.

pub mod mlmodel;

use crate::model::{HfTokenizer, Model, ModelSource, TextTokenizer};
use crate::track::display::{Cell, LinkTable, format_millis, render_as_table};
use crate::track::api::paginate;
use crate::track::{MlflowClient, MlflowConfig, MlflowState, client::mlflow_error};
use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a model reference names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// A version number.
    Version(u64),
    /// An alias (`@champion`).
    Alias(String),
    /// The newest version.
    Latest,
}

/// A parsed model reference: `name/3`, `name@alias`, `name` (latest), with or
/// without `models:/`; or a LoggedModel `models:/m-…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelRef {
    Registered { name: String, selector: Selector },
    Logged { model_id: String },
}

/// Parses a model reference (see [`ModelRef`]).
pub fn parse_model_ref(spec: &str) -> Result<ModelRef> {
    let s = spec.trim();
    let s = s.strip_prefix("models:/").unwrap_or(s).trim_start_matches('/');
    if s.is_empty() {
        bail!("empty model reference: write it like main.support.bot@champion, main.support.bot/3 or models:/main.support.bot/3");
    }
    if s.starts_with("m-") && !s.contains(['/', '@']) && s.len() > 10 && s[2..].chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok(ModelRef::Logged { model_id: s.to_string() });
    }
    if let Some((name, v)) = s.rsplit_once('/') {
        if name.is_empty() || name.contains('/') {
            bail!("{spec:?}: a registered model name cannot contain '/'");
        }
        let selector = if v == "latest" {
            Selector::Latest
        } else {
            Selector::Version(v.parse().with_context(|| format!("{spec:?}: {v:?} is not a version number (write name/3, name@alias or name/latest)"))?)
        };
        return Ok(ModelRef::Registered { name: name.to_string(), selector });
    }
    if let Some((name, alias)) = s.rsplit_once('@') {
        if name.is_empty() || alias.is_empty() {
            bail!("{spec:?}: write name@alias");
        }
        return Ok(ModelRef::Registered { name: name.to_string(), selector: Selector::Alias(alias.to_string()) });
    }
    Ok(ModelRef::Registered { name: s.to_string(), selector: Selector::Latest })
}

/// Where `register_to` puts a model: the registered model's full name and the
/// aliases to point at the new version. `catalog.schema` names the model after the
/// run (`catalog.schema.<run name>`); `catalog.schema.model` and a plain `model`
/// are used as they are; `@a,b` after the name sets aliases.
pub fn register_target(register_to: &str, run_name: &str) -> Result<(String, Vec<String>)> {
    let (name, aliases) = match register_to.split_once('@') {
        Some((n, a)) => (n.trim(), a.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect()),
        None => (register_to.trim(), Vec::new()),
    };
    if name.is_empty() {
        bail!("register_to is empty: write catalog.schema or catalog.schema.model");
    }
    let parts: Vec<&str> = name.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("register_to {register_to:?}: empty part in the dotted name");
    }
    let full = match parts.len() {
        1 | 3 => name.to_string(),
        2 => {
            let model: String = run_name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
            format!("{name}.{}", if model.is_empty() { "model".into() } else { model })
        }
        _ => bail!("register_to {register_to:?}: use catalog.schema (the model is named after the run) or catalog.schema.model"),
    };
    if full.contains(['/', ':']) {
        bail!("register_to {register_to:?}: a registered model name cannot contain '/' or ':'");
    }
    for a in &aliases {
        check_alias(a)?;
    }
    Ok((full, aliases))
}

fn check_alias(a: &str) -> Result<()> {
    let reserved = a.eq_ignore_ascii_case("latest") || (a.len() > 1 && (a.starts_with('v') || a.starts_with('V')) && a[1..].chars().all(|c| c.is_ascii_digit()));
    if reserved {
        bail!("alias {a:?} is reserved by MLflow (latest and v<number> name versions): choose another, e.g. champion");
    }
    if a.is_empty() || a.len() > 255 || !a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        bail!("alias {a:?}: use letters, digits, '_' and '-'");
    }
    Ok(())
}

/// An alias and the version it points at.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct AliasEntry {
    pub alias: String,
    pub version: String,
}

/// A registered model.
#[derive(Clone, Debug, Deserialize)]
pub struct RegisteredModel {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub creation_timestamp: Option<i64>,
    #[serde(default)]
    pub last_updated_timestamp: Option<i64>,
    #[serde(default)]
    pub aliases: Vec<AliasEntry>,
    /// The server it came from (for UI links).
    #[serde(skip)]
    pub server: String,
}

impl RegisteredModel {
    /// Link to the model in the MLflow UI.
    pub fn url(&self) -> String {
        format!("{}/#/models/{}", self.server, urlencode(&self.name))
    }
}

/// A version of a registered model.
#[derive(Clone, Debug, Deserialize)]
pub struct ModelVersion {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub run_id: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub creation_timestamp: Option<i64>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// The server it came from (for UI links).
    #[serde(skip)]
    pub server: String,
}

impl ModelVersion {
    /// Link to the version in the MLflow UI.
    pub fn url(&self) -> String {
        format!("{}/#/models/{}/versions/{}", self.server, urlencode(&self.name), self.version)
    }

    /// `name/version`.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.name, self.version)
    }

    /// The card shown in a notebook.
    pub fn card(&self) -> LinkTable {
        let mut rows = vec![
            ("model", Cell::link(self.reference(), self.url())),
            ("aliases", Cell::text(if self.aliases.is_empty() { "-".into() } else { self.aliases.join(", ") })),
            ("status", Cell::text(self.status.clone().unwrap_or_default())),
            ("created", Cell::text(format_millis(self.creation_timestamp))),
            ("source", Cell::text(self.source.clone().unwrap_or_default())),
        ];
        if let Some(r) = &self.run_id {
            // The UI's /runs/<id> route finds the run's experiment itself.
            rows.push(("run", Cell::link(r, format!("{}/#/runs/{r}", self.server))));
        }
        LinkTable::card("Registered model version", rows)
    }
}

impl RegisteredModel {
    /// The card shown in a notebook.
    pub fn card(&self) -> LinkTable {
        let aliases: Vec<String> = self.aliases.iter().map(|a| format!("@{} → {}", a.alias, a.version)).collect();
        LinkTable::card(
            "Registered model",
            vec![
                ("model", Cell::link(&self.name, self.url())),
                ("aliases", Cell::text(if aliases.is_empty() { "-".into() } else { aliases.join(", ") })),
                ("updated", Cell::text(format_millis(self.last_updated_timestamp))),
                ("description", Cell::text(self.description.clone().unwrap_or_default())),
            ],
        )
    }
}

render_as_table!(ModelVersion, ModelVersion::card);
render_as_table!(Vec<ModelVersion>, |v| versions_table(v));
render_as_table!(RegisteredModel, RegisteredModel::card);
render_as_table!(Vec<RegisteredModel>, |v| models_table(v));

/// Registered models as one table, with links.
pub fn models_table(models: &[RegisteredModel]) -> LinkTable {
    let mut t = LinkTable::new(["model", "aliases", "updated"]).title("Registered models");
    for m in models {
        let aliases: Vec<String> = m.aliases.iter().map(|a| format!("@{} → {}", a.alias, a.version)).collect();
        t.push([Cell::link(&m.name, m.url()), Cell::text(aliases.join(", ")), Cell::text(format_millis(m.last_updated_timestamp))]);
    }
    t
}

/// Versions as one table, with links.
pub fn versions_table(versions: &[ModelVersion]) -> LinkTable {
    let mut t = LinkTable::new(["version", "aliases", "status", "created", "run"]).title("Model versions");
    for v in versions {
        t.push([
            Cell::link(v.reference(), v.url()),
            Cell::text(v.aliases.join(", ")),
            Cell::text(v.status.clone().unwrap_or_default()),
            Cell::text(format_millis(v.creation_timestamp)),
            match &v.run_id {
                Some(r) => Cell::link(r, format!("{}/#/runs/{r}", v.server)),
                None => Cell::text(""),
            },
        ]);
    }
    t
}

/// A LoggedModel (MLflow 3): a model's files, tied to the run that produced it.
#[derive(Clone, Debug, Deserialize)]
pub struct LoggedModel {
    pub model_id: String,
    pub experiment_id: String,
    #[serde(default)]
    pub name: String,
    pub artifact_uri: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub source_run_id: Option<String>,
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20")
}

/// The model registry of one MLflow server.
#[derive(Clone, Debug)]
pub struct Registry {
    client: MlflowClient,
    cache: Option<PathBuf>,
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
        #[derive(Deserialize)]
        struct Wrap {
            model: Inner,
        }
        #[derive(Deserialize)]
        struct Inner {
            info: LoggedModel,
        }
        let w: Wrap = self.client.get(&format!("/logged-models/{model_id}"), &[])?;
        Ok(w.model.info)
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

    /// Downloads the model a reference names into the local cache (once per
    /// version) and returns its directory (`MLmodel`, `model/` or `peft/`,
    /// `components/tokenizer/`).
    pub fn download(&self, spec: &str) -> Result<PathBuf> {
        let (key, root) = match parse_model_ref(spec)? {
            ModelRef::Logged { model_id } => {
                let m = self.logged_model(&model_id)?;
                (PathBuf::from("logged-models").join(&model_id), m.artifact_uri)
            }
            ModelRef::Registered { .. } => {
                let v = self.resolve(spec)?;
                let root = self.download_uri(&v.name, &v.version)?;
                (PathBuf::from(safe_segment(&v.name)).join(&v.version), root)
            }
        };
        let dest = self.cache.clone().unwrap_or_else(cache_root).join(server_key(self.client.uri())).join(key);
        if dest.join(".complete").is_file() {
            return Ok(dest);
        }
        let parent = dest.parent().unwrap();
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let tmp = tempfile::Builder::new().prefix(".download-").tempdir_in(parent)?;
        self.client.download(&root, "", tmp.path()).with_context(|| format!("downloading {spec} from {root}"))?;
        prepare_loadable(tmp.path())?;
        std::fs::write(tmp.path().join(".complete"), b"")?;
        let tmp = tmp.keep();
        match std::fs::rename(&tmp, &dest) {
            Ok(()) => {}
            // Someone else finished the same download first: theirs is complete too.
            Err(_) if dest.join(".complete").is_file() => {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e).with_context(|| format!("cannot move the download into {}", dest.display()));
            }
        }
        Ok(dest)
    }
}

/// `$TUNEBOOK_CACHE/registry`, by default `~/.cache/tunebook/registry`.
pub fn cache_root() -> PathBuf {
    let base = std::env::var_os("TUNEBOOK_CACHE").filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into())).join(".cache").join("tunebook")
    });
    base.join("registry")
}

fn safe_segment(s: &str) -> String {
    let t: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || "._-@".contains(c) { c } else { '_' }).collect();
    if t.chars().all(|c| c == '.') { format!("_{t}") } else { t }
}

fn server_key(uri: &str) -> String {
    safe_segment(uri.trim_start_matches("http://").trim_start_matches("https://"))
}

/// Puts the tokenizer files next to the weights of a full model, so the `model/`
/// directory loads on its own (hard links where possible).
fn prepare_loadable(dir: &Path) -> Result<()> {
    let model = dir.join(mlmodel::MODEL_DIR);
    let tok = dir.join(mlmodel::TOKENIZER_DIR);
    if model.join("config.json").is_file() && tok.is_dir() {
        for e in std::fs::read_dir(&tok)? {
            let p = e?.path();
            let target = model.join(p.file_name().unwrap());
            if p.is_file() && !target.exists() && std::fs::hard_link(&p, &target).is_err() {
                std::fs::copy(&p, &target)?;
            }
        }
    }
    Ok(())
}

/// Loads an MLflow model directory written by tunebook (or by MLflow's
/// `transformers` flavor with a Llama-family model): full weights in `model/`, or a
/// PEFT adapter in `peft/` on the base the `MLmodel` (or the adapter config) names;
/// the tokenizer from `components/tokenizer/`. A plain Hugging Face directory
/// loads too.
pub fn load_mlflow_model_dir(dir: &Path) -> Result<Model> {
    let model_dir = dir.join(mlmodel::MODEL_DIR);
    let peft_dir = dir.join(mlmodel::PEFT_DIR);
    let tok_dir = dir.join(mlmodel::TOKENIZER_DIR);
    if model_dir.join("config.json").is_file() {
        prepare_loadable(dir)?;
        return Model::load(&model_dir.to_string_lossy());
    }
    if peft_dir.join("adapter_config.json").is_file() {
        let mlmodel_text = std::fs::read_to_string(dir.join("MLmodel")).unwrap_or_default();
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(peft_dir.join("adapter_config.json"))?)?;
        let base = mlmodel::mlmodel_value(&mlmodel_text, "tunebook", "base_model")
            .or_else(|| mlmodel::mlmodel_value(&mlmodel_text, "transformers", "local_base_model_path"))
            .or_else(|| cfg.get("base_model_name_or_path").and_then(Value::as_str).map(str::to_string))
            .context("the adapter does not say which base model it goes on (base_model_name_or_path)")?;
        let mut model = Model::load(&base).with_context(|| {
            format!("loading the adapter's base model {base:?}: it must be on this machine (a local path or a Hugging Face id in the local cache)")
        })?;
        model.llama.load_lora(&peft_dir)?;
        if tok_dir.join("tokenizer.json").is_file() {
            model.tokenizer = Some(Arc::new(HfTokenizer::from_dir(&tok_dir)?) as Arc<dyn TextTokenizer>);
        }
        model.source = Some(ModelSource::HfDir(dir.to_path_buf()));
        return Ok(model);
    }
    if dir.join("config.json").is_file() {
        return Model::load(&dir.to_string_lossy());
    }
    bail!("{} holds no model: expected model/config.json (full weights), peft/adapter_config.json (an adapter) or config.json", dir.display())
}

/// What [`log_model`] did.
#[derive(Clone, Debug)]
pub struct LoggedOutput {
    /// The LoggedModel's id (`m-…`).
    pub model_id: String,
    /// `name/version` when registered.
    pub registered: Option<String>,
}

/// Uploads `model_dir` as an MLflow 3 LoggedModel of the run in `state`: creates the
/// LoggedModel, records it as the run's output, uploads the files in the layout of
/// [`mlmodel`] (MLmodel last), and marks it ready. With `reuse` (a LoggedModel a
/// previous attempt created), a model already marked ready is not uploaded again.
pub fn log_model(client: &MlflowClient, state: &MlflowState, model_dir: &Path, reuse: Option<&str>) -> Result<LoggedModel> {
    let reg = Registry::with_client(client.clone());
    if let Some(id) = reuse {
        match reg.logged_model(id) {
            Ok(m) if m.status == "LOGGED_MODEL_READY" => return Ok(m),
            Ok(_) | Err(_) => {}
        }
    }
    #[derive(Deserialize)]
    struct Wrap {
        model: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        info: LoggedModel,
    }
    let name = "model";
    let w: Wrap = client.post(
        "/logged-models",
        &json!({
            "experiment_id": state.experiment_id, "name": name, "model_type": "transformers",
            "source_run_id": state.run_id,
            "tags": [{"key": "tunebook.version", "value": crate::VERSION}, {"key": "mlflow.source.name", "value": "tunebook"}],
        }),
    )?;
    let m = w.model.info;
    let _: Value = client.post("/runs/outputs", &json!({"run_id": state.run_id, "models": [{"model_id": m.model_id, "step": 0}]}))?;
    let plan = mlmodel::plan(model_dir, &m.model_id, &state.run_id)?;
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
    match crate::track::config::env_nonempty("MLFLOW_REGISTRY_URI") {
        Some(u) if crate::track::config::normalize_uri(&u)? != client.uri() => Registry::new(Some(&u)),
        _ => Ok(Registry::with_client(client.clone())),
    }
}

/// Logs `model_dir` as the run's LoggedModel and, with `register_to`, registers it
/// (see [`register_target`]). Used by the tracker and by `sync_run`.
pub(crate) fn log_and_register_with(
    client: &MlflowClient,
    state: &MlflowState,
    run_name: &str,
    model_dir: &Path,
    register_to: Option<&str>,
    reuse: Option<&str>,
) -> Result<LoggedOutput> {
    // Check the target before uploading anything.
    let target = register_to.map(|r| register_target(r, run_name)).transpose()?;
    let m = log_model(client, state, model_dir, reuse)?;
    let registered = match target {
        Some((name, aliases)) => {
            let v = registry_for(client)?
                .create_version(&name, &m.model_id, Some(&state.run_id), &aliases)
                .with_context(|| format!("the model was logged as {} but registering it as {name} failed", m.model_id))?;
            Some(v.reference())
        }
        None => None,
    };
    Ok(LoggedOutput { model_id: m.model_id, registered })
}

/// [`log_and_register_with`] without an earlier attempt.
pub(crate) fn log_and_register(
    client: &MlflowClient,
    state: &MlflowState,
    run_name: &str,
    model_dir: &Path,
    register_to: Option<&str>,
) -> Result<LoggedOutput> {
    log_and_register_with(client, state, run_name, model_dir, register_to, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_references_parse() {
        let r = |n: &str, s: Selector| ModelRef::Registered { name: n.into(), selector: s };
        assert_eq!(parse_model_ref("main.support.bot@champion").unwrap(), r("main.support.bot", Selector::Alias("champion".into())));
        assert_eq!(parse_model_ref("models:/main.support.bot@champion").unwrap(), r("main.support.bot", Selector::Alias("champion".into())));
        assert_eq!(parse_model_ref("name/3").unwrap(), r("name", Selector::Version(3)));
        assert_eq!(parse_model_ref("models:/name/3").unwrap(), r("name", Selector::Version(3)));
        assert_eq!(parse_model_ref("models:/name/latest").unwrap(), r("name", Selector::Latest));
        assert_eq!(parse_model_ref("a.b.c").unwrap(), r("a.b.c", Selector::Latest));
        assert_eq!(
            parse_model_ref("models:/m-0123456789abcdef0123456789abcdef").unwrap(),
            ModelRef::Logged { model_id: "m-0123456789abcdef0123456789abcdef".into() }
        );
        assert!(parse_model_ref("name/three").unwrap_err().to_string().contains("not a version number"));
        assert!(parse_model_ref("").is_err());
    }

    #[test]
    fn register_targets() {
        assert_eq!(register_target("main.support", "bot run.1").unwrap(), ("main.support.bot_run_1".into(), vec![]));
        assert_eq!(
            register_target("main.support.bot@champion, staging", "x").unwrap(),
            ("main.support.bot".into(), vec!["champion".into(), "staging".into()])
        );
        assert_eq!(register_target("plain", "x").unwrap().0, "plain");
        assert!(register_target("a.b.c.d", "x").is_err());
        assert!(register_target("a..b", "x").is_err());
        assert!(register_target("a.b.c@latest", "x").unwrap_err().to_string().contains("reserved"));
        assert!(register_target("a.b.c@v3", "x").is_err());
        assert!(register_target("a.b:c", "x").is_err());
    }

    #[test]
    fn cache_paths_are_safe() {
        assert_eq!(server_key("http://127.0.0.1:5000/prefix"), "127.0.0.1_5000_prefix");
        assert_eq!(safe_segment(".."), "_..");
        assert_eq!(safe_segment("main.support.bot"), "main.support.bot");
    }
}
