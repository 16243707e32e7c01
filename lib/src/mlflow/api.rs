//! Typed MLflow tracking API: experiments, runs, params, tags, metrics and the
//! artifact proxy, as methods of [`MlflowClient`].

use super::client::{ARTIFACTS_API, MlflowClient, mlflow_error};
use super::params::{MAX_PARAMS_PER_BATCH, MAX_TAGS_PER_BATCH};
use serde::{Deserializer, Serializer};
use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// A key and a value (params and tags).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    #[serde(default)]
    pub value: String,
}

/// An MLflow experiment.
#[derive(Clone, Debug, Deserialize)]
pub struct Experiment {
    pub experiment_id: String,
    pub name: String,
    #[serde(default)]
    pub artifact_location: Option<String>,
    #[serde(default)]
    pub lifecycle_stage: Option<String>,
    #[serde(default)]
    pub tags: Vec<KeyValue>,
    #[serde(default)]
    pub creation_time: Option<i64>,
    #[serde(default)]
    pub last_update_time: Option<i64>,
    /// The server it came from (for UI links); set by the client.
    #[serde(skip)]
    pub server: String,
}

impl Experiment {
    /// Link to the experiment in the MLflow UI.
    pub fn url(&self) -> String {
        format!("{}/#/experiments/{}", self.server, self.experiment_id)
    }
}

/// Where a run is in its life, as MLflow records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    Running,
    Scheduled,
    Finished,
    Failed,
    Killed,
}

impl RunStatus {
    /// The wire name (`RUNNING`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            RunStatus::Running => "RUNNING",
            RunStatus::Scheduled => "SCHEDULED",
            RunStatus::Finished => "FINISHED",
            RunStatus::Failed => "FAILED",
            RunStatus::Killed => "KILLED",
        }
    }
}

/// A run's identity and state.
#[derive(Clone, Debug, Deserialize)]
pub struct RunInfo {
    pub run_id: String,
    pub experiment_id: String,
    #[serde(default)]
    pub run_name: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    pub status: RunStatus,
    #[serde(default)]
    pub start_time: Option<i64>,
    #[serde(default)]
    pub end_time: Option<i64>,
    #[serde(default)]
    pub artifact_uri: Option<String>,
    #[serde(default)]
    pub lifecycle_stage: Option<String>,
}

/// A run's latest metrics, params and tags.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RunData {
    #[serde(default)]
    pub metrics: Vec<MetricRecord>,
    #[serde(default)]
    pub params: Vec<KeyValue>,
    #[serde(default)]
    pub tags: Vec<KeyValue>,
}

/// An MLflow run.
#[derive(Clone, Debug, Deserialize)]
pub struct Run {
    pub info: RunInfo,
    #[serde(default)]
    pub data: RunData,
    /// The server it came from (for UI links); set by the client.
    #[serde(skip)]
    pub server: String,
}

impl Run {
    /// Link to the run in the MLflow UI.
    pub fn url(&self) -> String {
        run_url(&self.server, &self.info.experiment_id, &self.info.run_id)
    }

    /// A tag's value.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.data.tags.iter().find(|t| t.key == key).map(|t| t.value.as_str())
    }

    /// A param's value.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.data.params.iter().find(|t| t.key == key).map(|t| t.value.as_str())
    }

    /// The latest value of a metric.
    pub fn metric(&self, key: &str) -> Option<f64> {
        self.data.metrics.iter().find(|m| m.key == key).map(|m| m.value)
    }
}

/// UI link of a run.
pub fn run_url(server: &str, experiment_id: &str, run_id: &str) -> String {
    format!("{server}/#/experiments/{experiment_id}/runs/{run_id}")
}

/// One entry of an artifact listing.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct FileInfo {
    /// Path relative to the listed directory's root (the artifact root).
    pub path: String,
    #[serde(default)]
    pub is_dir: bool,
    #[serde(default)]
    pub file_size: Option<u64>,
}

fn is_not_found(e: &anyhow::Error) -> bool {
    mlflow_error(e).is_some_and(|m| m.is_not_found())
}

impl MlflowClient {
    // ----- experiments -------------------------------------------------------------

    /// The experiment with this name, if it exists.
    pub fn experiment_by_name(&self, name: &str) -> Result<Option<Experiment>> {
        #[derive(Deserialize)]
        struct R {
            experiment: Experiment,
        }
        match self.get::<R>("/experiments/get-by-name", &[("experiment_name", name)]) {
            Ok(r) => Ok(Some(self.stamp_exp(r.experiment))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The experiment with this id.
    pub fn experiment(&self, experiment_id: &str) -> Result<Experiment> {
        #[derive(Deserialize)]
        struct R {
            experiment: Experiment,
        }
        let r: R = self.get("/experiments/get", &[("experiment_id", experiment_id)])?;
        Ok(self.stamp_exp(r.experiment))
    }

    /// Creates an experiment and returns its id.
    pub fn create_experiment(&self, name: &str, tags: &[(String, String)]) -> Result<String> {
        #[derive(Deserialize)]
        struct R {
            experiment_id: String,
        }
        let tags: Vec<_> = tags.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
        let r: R = self.post("/experiments/create", &json!({"name": name, "tags": tags}))?;
        Ok(r.experiment_id)
    }

    /// The experiment named `name`, created if missing (safe against a concurrent
    /// creator).
    pub fn get_or_create_experiment(&self, name: &str) -> Result<Experiment> {
        if let Some(e) = self.experiment_by_name(name)? {
            if e.lifecycle_stage.as_deref() == Some("deleted") {
                bail!(
                    "experiment {name:?} is deleted on {}: restore it in the MLflow UI, delete it permanently (`mlflow gc`), or choose another name",
                    self.uri()
                );
            }
            return Ok(e);
        }
        match self.create_experiment(name, &[]) {
            Ok(id) => self.experiment(&id),
            Err(e) if mlflow_error(&e).is_some_and(|m| m.is_already_exists()) => {
                self.experiment_by_name(name)?.with_context(|| format!("experiment {name:?} exists and does not"))
            }
            Err(e) => Err(e),
        }
    }

    /// Active experiments, newest first (at most `max`).
    pub fn experiments(&self, max: usize) -> Result<Vec<Experiment>> {
        #[derive(Deserialize)]
        struct R {
            #[serde(default)]
            experiments: Vec<Experiment>,
            #[serde(default)]
            next_page_token: Option<String>,
        }
        let out = paginate(max, |token, left| {
            let mut body = json!({"max_results": left.min(1000), "order_by": ["last_update_time DESC"]});
            if let Some(t) = token {
                body["page_token"] = json!(t);
            }
            let r: R = self.post("/experiments/search", &body)?;
            Ok((r.experiments, r.next_page_token))
        })?;
        Ok(out.into_iter().map(|e| self.stamp_exp(e)).collect())
    }

    fn stamp_exp(&self, mut e: Experiment) -> Experiment {
        e.server = self.uri().to_string();
        e
    }

    fn stamp_run(&self, mut r: Run) -> Run {
        r.server = self.uri().to_string();
        r
    }

    // ----- runs --------------------------------------------------------------------

    /// Creates a run (status RUNNING).
    pub fn create_run(&self, experiment_id: &str, run_name: &str, start_time: i64, tags: &[(String, String)]) -> Result<Run> {
        #[derive(Deserialize)]
        struct R {
            run: Run,
        }
        let tags: Vec<_> = tags.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
        let r: R = self.post(
            "/runs/create",
            &json!({"experiment_id": experiment_id, "run_name": run_name, "start_time": start_time, "tags": tags}),
        )?;
        Ok(self.stamp_run(r.run))
    }

    /// A run by id.
    pub fn run(&self, run_id: &str) -> Result<Run> {
        #[derive(Deserialize)]
        struct R {
            run: Run,
        }
        let r: R = self.get("/runs/get", &[("run_id", run_id)])?;
        Ok(self.stamp_run(r.run))
    }

    /// Sets a run's status (and end time for a final status).
    pub fn set_run_status(&self, run_id: &str, status: RunStatus, end_time: Option<i64>) -> Result<()> {
        let mut body = json!({"run_id": run_id, "status": status.as_str()});
        if let Some(t) = end_time {
            body["end_time"] = json!(t);
        }
        let _: Value = self.post("/runs/update", &body)?;
        Ok(())
    }

    /// Runs of some experiments matching an MLflow filter (`""` for all), newest
    /// first, at most `max`.
    pub fn search_runs(&self, experiment_ids: &[&str], filter: &str, max: usize) -> Result<Vec<Run>> {
        #[derive(Deserialize)]
        struct R {
            #[serde(default)]
            runs: Vec<Run>,
            #[serde(default)]
            next_page_token: Option<String>,
        }
        let out = paginate(max, |token, left| {
            let mut body = json!({
                "experiment_ids": experiment_ids, "filter": filter,
                "max_results": left.min(1000), "order_by": ["attributes.start_time DESC"],
            });
            if let Some(t) = token {
                body["page_token"] = json!(t);
            }
            let r: R = self.post("/runs/search", &body)?;
            Ok((r.runs, r.next_page_token))
        })?;
        Ok(out.into_iter().map(|x| self.stamp_run(x)).collect())
    }

    /// One `log-batch` call. The caller keeps within MLflow's limits (1000 metrics,
    /// 100 params, 100 tags); [`MlflowClient::log_params`] and
    /// [`MlflowClient::set_tags`] split for you.
    pub fn log_batch(&self, run_id: &str, metrics: &[MetricRecord], params: &[(String, String)], tags: &[(String, String)]) -> Result<()> {
        let kv = |v: &[(String, String)]| v.iter().map(|(k, v)| json!({"key": k, "value": v})).collect::<Vec<_>>();
        let _: Value =
            self.post("/runs/log-batch", &json!({"run_id": run_id, "metrics": metrics, "params": kv(params), "tags": kv(tags)}))?;
        Ok(())
    }

    /// Logs params (already fitted to MLflow's limits, see [`super::params`]) in
    /// batches of 100.
    pub fn log_params(&self, run_id: &str, params: &[(String, String)]) -> Result<()> {
        for chunk in params.chunks(MAX_PARAMS_PER_BATCH) {
            self.log_batch(run_id, &[], chunk, &[])?;
        }
        Ok(())
    }

    /// Sets tags in batches of 100.
    pub fn set_tags(&self, run_id: &str, tags: &[(String, String)]) -> Result<()> {
        for chunk in tags.chunks(MAX_TAGS_PER_BATCH) {
            self.log_batch(run_id, &[], &[], chunk)?;
        }
        Ok(())
    }

    /// Every recorded value of one metric of a run, in server order.
    pub fn metric_history(&self, run_id: &str, key: &str) -> Result<Vec<MetricRecord>> {
        #[derive(Deserialize)]
        struct R {
            #[serde(default)]
            metrics: Vec<MetricRecord>,
            #[serde(default)]
            next_page_token: Option<String>,
        }
        paginate(usize::MAX, |token, _| {
            let mut q = vec![("run_id", run_id), ("metric_key", key), ("max_results", "25000")];
            if let Some(t) = token {
                q.push(("page_token", t));
            }
            let r: R = self.get("/metrics/get-history", &q)?;
            Ok((r.metrics, r.next_page_token))
        })
    }

    // ----- artifacts ---------------------------------------------------------------

    /// The HTTP address of `path` under an artifact root (`mlflow-artifacts:/...`,
    /// as runs and logged models report it). Roots the server does not proxy
    /// (`s3://`, a local path, ...) cannot be reached over HTTP and are an error.
    pub fn artifact_url(&self, artifact_root: &str, path: &str) -> Result<String> {
        Ok(format!("{}{ARTIFACTS_API}/{}", self.uri(), join_path(&proxy_path(artifact_root)?, path)))
    }

    /// Uploads one file (streamed from disk) to `path` under `artifact_root`.
    pub fn upload_file(&self, artifact_root: &str, path: &str, local: &Path) -> Result<()> {
        let url = self.artifact_url(artifact_root, path)?;
        let len = std::fs::metadata(local).with_context(|| format!("cannot read {}", local.display()))?.len();
        let local = local.to_path_buf();
        self.send(&format!("PUT artifact {path}"), || {
            let body = match std::fs::File::open(&local) {
                Ok(f) => reqwest::blocking::Body::sized(f, len),
                // Reported by the server as a short body; the open error is clearer.
                Err(_) => reqwest::blocking::Body::from(Vec::new()),
            };
            self.raw().request(Method::PUT, &url).timeout(transfer_timeout(self, len)).body(body)
        })
        .with_context(|| format!("uploading {} to {url}", local.display()))?;
        Ok(())
    }

    /// Uploads bytes to `path` under `artifact_root`.
    pub fn upload_bytes(&self, artifact_root: &str, path: &str, bytes: &[u8]) -> Result<()> {
        let url = self.artifact_url(artifact_root, path)?;
        let bytes = bytes.to_vec();
        self.send(&format!("PUT artifact {path}"), || self.raw().request(Method::PUT, &url).body(bytes.clone()))?;
        Ok(())
    }

    /// Uploads a file to `dest/<file name>`, or a directory's contents (recursively)
    /// under `dest`, like the Python client's `log_artifact` / `log_artifacts`.
    /// Returns the number of files uploaded.
    pub fn upload(&self, artifact_root: &str, local: &Path, dest: &str) -> Result<usize> {
        if local.is_file() {
            let name = local.file_name().context("a file to upload needs a name")?.to_string_lossy();
            self.upload_file(artifact_root, &join_path(dest, &name), local)?;
            return Ok(1);
        }
        if !local.is_dir() {
            bail!("{} does not exist: nothing to upload", local.display());
        }
        let mut n = 0;
        for file in walk_files(local)? {
            let rel = file.strip_prefix(local).unwrap().to_string_lossy().replace('\\', "/");
            self.upload_file(artifact_root, &join_path(dest, &rel), &file)?;
            n += 1;
        }
        Ok(n)
    }

    /// Lists the direct children of `path` (`""` for the root) under `artifact_root`.
    /// Paths returned are relative to `path`'s root, like MLflow's.
    pub fn list_artifacts(&self, artifact_root: &str, path: &str) -> Result<Vec<FileInfo>> {
        #[derive(Deserialize)]
        struct R {
            #[serde(default)]
            files: Vec<FileInfo>,
        }
        let full = join_path(&proxy_path(artifact_root)?, path);
        let url = format!("{}{ARTIFACTS_API}", self.uri());
        let resp = self.send("list artifacts", || self.raw().get(&url).query(&[("path", full.as_str())]))?;
        let r: R = resp.json().context("artifact listing: unexpected answer")?;
        Ok(r
            .files
            .into_iter()
            .map(|mut f| {
                f.path = join_path(path, f.path.rsplit('/').next().unwrap_or(&f.path));
                f
            })
            .collect())
    }

    /// Every file under `path` (recursively), paths relative to the root.
    pub fn list_artifacts_recursive(&self, artifact_root: &str, path: &str) -> Result<Vec<FileInfo>> {
        let mut out = Vec::new();
        let mut stack = vec![path.to_string()];
        while let Some(dir) = stack.pop() {
            for f in self.list_artifacts(artifact_root, &dir)? {
                if f.is_dir {
                    stack.push(f.path);
                } else {
                    out.push(f);
                }
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Downloads one artifact file into `dest` (streamed; written to a temporary
    /// file next to it, then renamed).
    pub fn download_file(&self, artifact_root: &str, path: &str, dest: &Path) -> Result<()> {
        self.download_sized(artifact_root, path, dest, None)
    }

    fn download_sized(&self, artifact_root: &str, path: &str, dest: &Path, size: Option<u64>) -> Result<()> {
        let url = self.artifact_url(artifact_root, path)?;
        // Unknown size: allow a large file (10 GB at 1 MB/s would still not fit; pass sizes).
        let limit = transfer_timeout(self, size.unwrap_or(4_000_000_000));
        let mut resp = self.send(&format!("GET artifact {path}"), || self.raw().get(&url).timeout(limit))?;
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        crate::files::write_atomic_with(dest, |w| {
            std::io::copy(&mut resp, w).with_context(|| format!("downloading {url}"))?;
            Ok(())
        })
    }

    /// Downloads `path` (a file or a directory) under `artifact_root` into `dest`
    /// (a directory's contents land directly in `dest`). Returns the files written.
    pub fn download(&self, artifact_root: &str, path: &str, dest: &Path) -> Result<Vec<PathBuf>> {
        let files = self.list_artifacts_recursive(artifact_root, path)?;
        let prefix = path.trim_matches('/');
        if files.is_empty() {
            // Either a single file or an empty / missing directory.
            if prefix.is_empty() {
                bail!("no artifacts under {artifact_root}");
            }
            let name = prefix.rsplit('/').next().unwrap();
            let target = dest.join(name);
            self.download_file(artifact_root, prefix, &target)
                .with_context(|| format!("no artifact {prefix:?} under {artifact_root}"))?;
            return Ok(vec![target]);
        }
        let mut out = Vec::new();
        for f in files {
            let rel = f.path.strip_prefix(prefix).unwrap_or(&f.path).trim_start_matches('/');
            let target = dest.join(rel);
            self.download_sized(artifact_root, &f.path, &target, f.file_size)?;
            out.push(target);
        }
        Ok(out)
    }
}

/// Time limit of a transfer of `bytes`: the request timeout plus one second per MB
/// (a whole-request limit must grow with the file, or big checkpoints never make it).
fn transfer_timeout(c: &MlflowClient, bytes: u64) -> std::time::Duration {
    c.config().retry.timeout + std::time::Duration::from_secs(bytes / 1_000_000)
}

/// Collects pages: `page(token, still_wanted)` returns items and the next page
/// token; stops at `max` items or when no token comes back.
pub fn paginate<T>(max: usize, mut page: impl FnMut(Option<&str>, usize) -> Result<(Vec<T>, Option<String>)>) -> Result<Vec<T>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    while out.len() < max {
        let (items, next) = page(token.as_deref(), max - out.len())?;
        out.extend(items);
        match next {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => break,
        }
    }
    out.truncate(max);
    Ok(out)
}

/// `mlflow-artifacts:/1/abc/artifacts` → `1/abc/artifacts`. A `mlflow-artifacts://host/`
/// form is accepted when it names this server's proxy.
pub fn proxy_path(artifact_root: &str) -> Result<String> {
    if let Some(rest) = artifact_root.strip_prefix("mlflow-artifacts:") {
        let rest = if let Some(r) = rest.strip_prefix("//") { r.split_once('/').map(|x| x.1).unwrap_or("") } else { rest };
        return Ok(rest.trim_matches('/').to_string());
    }
    bail!(
        "artifact location {artifact_root:?} is not served by the tracking server's artifact proxy, so it cannot be reached over HTTP. \
         Start the server with proxied artifacts (the default: `mlflow server --artifacts-destination DIR`, without --default-artifact-root \
         pointing at a local folder or bucket), or use `tunebook mlflow up`"
    )
}

/// Joins artifact path segments with `/`, ignoring empty ones.
pub fn join_path(a: &str, b: &str) -> String {
    let (a, b) = (a.trim_matches('/'), b.trim_matches('/'));
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}/{b}"),
    }
}

/// Every regular file under `dir`, sorted (symlinks to files are followed).
pub fn walk_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let p = entry?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// An MLflow run as other objects point at it (a LoggedModel's source run, a
/// model version's run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRef {
    /// The experiment holding the run.
    pub experiment_id: String,
    /// The run.
    pub run_id: String,
}

/// One metric value at one optimizer step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricRecord {
    /// Metric name, e.g. `loss/train/total`.
    pub key: String,
    /// The value; NaN and infinities are kept (written as strings).
    #[serde(serialize_with = "ser_f64", deserialize_with = "de_f64")]
    pub value: f64,
    /// Optimizer step.
    pub step: i64,
    /// Milliseconds since the Unix epoch when the value was logged.
    pub timestamp: i64,
}

impl MetricRecord {
    /// A record stamped with the current time.
    pub fn now(key: impl Into<String>, value: f64, step: i64) -> Self {
        MetricRecord { key: key.into(), value, step, timestamp: now_millis() }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn ser_f64<S: Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.is_nan() {
        s.serialize_str("NaN")
    } else if v.is_infinite() {
        s.serialize_str(if *v > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        s.serialize_f64(*v)
    }
}

fn de_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        F(f64),
        S(String),
    }
    match Num::deserialize(d)? {
        Num::F(v) => Ok(v),
        Num::S(s) => match s.as_str() {
            "NaN" => Ok(f64::NAN),
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            other => Err(serde::de::Error::custom(format!("expected a number, NaN or Infinity, found {other:?}"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_roots_map_to_the_proxy() {
        assert_eq!(proxy_path("mlflow-artifacts:/1/abc/artifacts").unwrap(), "1/abc/artifacts");
        assert_eq!(proxy_path("mlflow-artifacts://host:5000/1/models/m-1/artifacts").unwrap(), "1/models/m-1/artifacts");
        let e = proxy_path("/home/u/mlruns/1/abc/artifacts").unwrap_err().to_string();
        assert!(e.contains("artifact proxy"), "{e}");
        assert_eq!(join_path("a/", "/b/c"), "a/b/c");
        assert_eq!(join_path("", "b"), "b");
        assert_eq!(join_path("a", ""), "a");
    }
}
