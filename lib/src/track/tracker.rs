//! [`MlflowTracker`]: a training run mirrored to an MLflow run, and [`sync_run`],
//! which ships a run that trained offline (or whose server was away at the end).

use crate::mlflow::api::{Run, RunRef, RunStatus, run_url};
use crate::mlflow::client::{MlflowClient, mlflow_error};
use crate::mlflow::config::{MlflowConfig, RetryPolicy, env_nonempty};
use crate::mlflow::display::{Cell, LinkTable};
use crate::mlflow::params::{DROPPED_TAG, fit_params, fit_tags};
use crate::runs::RunFiles;
use super::shipper::{CURSOR_FILE, ShipProgress, Shipper, Sent, ship_batch};
use super::wal::{WalCursor, now_millis};
use super::{RunContext, RunOutcome, Tracker};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// File in the run directory that ties it to its MLflow run.
pub const STATE_FILE: &str = "mlflow.json";

/// What a run directory remembers about its MLflow run (`<run_dir>/mlflow.json`),
/// so a resumed run or a later sync continues the same MLflow run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MlflowState {
    pub tracking_uri: String,
    pub experiment_id: String,
    pub run_id: String,
    /// Params were logged.
    #[serde(default)]
    pub params_logged: bool,
    /// The LoggedModel holding the final model, once uploaded.
    #[serde(default)]
    pub logged_model_id: Option<String>,
    /// `name/version` once registered.
    #[serde(default)]
    pub registered: Option<String>,
    /// The final status, once the server recorded it.
    #[serde(default)]
    pub final_status: Option<RunStatus>,
}

impl MlflowState {
    /// Reads `<run_dir>/mlflow.json`, if there is one.
    pub fn load(run_dir: &Path) -> Result<Option<Self>> {
        let p = run_dir.join(STATE_FILE);
        match std::fs::read_to_string(&p) {
            Ok(t) => Ok(Some(serde_json::from_str(&t).with_context(|| {
                format!("{} is damaged; delete it to track this run as a new MLflow run", p.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    /// Writes it atomically.
    pub fn save(&self, run_dir: &Path) -> Result<()> {
        crate::files::write_atomic(&run_dir.join(STATE_FILE), serde_json::to_string_pretty(self)?.as_bytes())
    }

    /// Changes the saved state of `run_dir` (read afresh, so changes made by
    /// another writer are kept) and returns it. `None` when the run has no MLflow run.
    pub fn update(run_dir: &Path, f: impl FnOnce(&mut MlflowState)) -> Result<Option<MlflowState>> {
        let Some(mut s) = Self::load(run_dir)? else { return Ok(None) };
        f(&mut s);
        s.save(run_dir)?;
        Ok(Some(s))
    }

    /// The run as other MLflow objects point at it.
    pub fn run_ref(&self) -> RunRef {
        RunRef { experiment_id: self.experiment_id.clone(), run_id: self.run_id.clone() }
    }

    /// Link to the run in the MLflow UI.
    pub fn url(&self) -> String {
        run_url(&self.tracking_uri, &self.experiment_id, &self.run_id)
    }
}

/// An owned copy of a [`RunContext`].
#[derive(Clone, Debug)]
pub(crate) struct RunSpec {
    pub run_dir: PathBuf,
    pub run_name: String,
    pub experiment: Option<String>,
    pub params: Vec<(String, String)>,
    pub tags: Vec<(String, String)>,
}

impl RunSpec {
    fn from_ctx(ctx: &RunContext<'_>) -> Self {
        RunSpec {
            run_dir: ctx.run_dir.to_path_buf(),
            run_name: ctx.run_name.to_string(),
            experiment: ctx.experiment.map(str::to_string),
            params: ctx.params.to_vec(),
            tags: ctx.tags.to_vec(),
        }
    }
}

/// The MLflow run of a run directory, opened (found or created) once, by whoever
/// needs it first: the shipper thread or the tracker.
pub(crate) struct RemoteRun {
    spec: RunSpec,
    state: Mutex<Option<MlflowState>>,
}

impl RemoteRun {
    pub(crate) fn new(spec: RunSpec) -> Self {
        RemoteRun { spec, state: Mutex::new(None) }
    }

    /// The state if the run is open.
    pub(crate) fn get(&self) -> Option<MlflowState> {
        self.state.lock().unwrap().clone()
    }

    /// Opens the run if needed and returns its state.
    pub(crate) fn ensure(&self, client: &MlflowClient) -> Result<MlflowState> {
        let mut guard = self.state.lock().unwrap();
        if let Some(s) = guard.as_ref() {
            return Ok(s.clone());
        }
        let s = open_run(client, &self.spec)?;
        *guard = Some(s.clone());
        Ok(s)
    }

    /// Changes the state and saves it. The file is read afresh first, so what
    /// another writer recorded there (the model the training stage logged) is kept.
    pub(crate) fn update(&self, f: impl FnOnce(&mut MlflowState)) -> Result<()> {
        let mut guard = self.state.lock().unwrap();
        if guard.is_some() {
            if let Some(s) = MlflowState::update(&self.spec.run_dir, f)? {
                *guard = Some(s);
            }
        }
        Ok(())
    }
}

/// The user MLflow records: `LOGNAME`, `USER`, `LNAME`, `USERNAME` (Python's
/// `getpass.getuser`), else the password database.
fn current_user() -> String {
    for v in ["LOGNAME", "USER", "LNAME", "USERNAME"] {
        if let Some(u) = env_nonempty(v) {
            return u;
        }
    }
    // SAFETY: getpwuid returns a pointer into static storage or null; we copy the name out at once.
    unsafe {
        let pw = libc::getpwuid(libc::getuid());
        if !pw.is_null() && !(*pw).pw_name.is_null() {
            return std::ffi::CStr::from_ptr((*pw).pw_name).to_string_lossy().into_owned();
        }
    }
    "unknown".into()
}

/// The experiment a run goes to: the one the user named, else `MLFLOW_EXPERIMENT_ID`,
/// else `MLFLOW_EXPERIMENT_NAME`, else MLflow's `Default` experiment (id 0).
fn resolve_experiment(client: &MlflowClient, named: Option<&str>) -> Result<String> {
    if let Some(n) = named {
        return Ok(client.get_or_create_experiment(n)?.experiment_id);
    }
    if let Some(id) = env_nonempty("MLFLOW_EXPERIMENT_ID") {
        client.experiment(&id).with_context(|| format!("MLFLOW_EXPERIMENT_ID={id}"))?;
        return Ok(id);
    }
    if let Some(n) = env_nonempty("MLFLOW_EXPERIMENT_NAME") {
        return Ok(client.get_or_create_experiment(&n)?.experiment_id);
    }
    Ok("0".into())
}

/// The standard tags of a new run, then the caller's (which win).
fn run_tags(spec: &RunSpec) -> Vec<(String, String)> {
    let mut tags = vec![
        ("mlflow.runName".to_string(), spec.run_name.clone()),
        ("mlflow.user".to_string(), current_user()),
        ("mlflow.source.name".to_string(), "tunebook".to_string()),
        ("mlflow.source.type".to_string(), "LOCAL".to_string()),
        ("tunebook.version".to_string(), crate::VERSION.to_string()),
        ("tunebook.run_dir".to_string(), spec.run_dir.display().to_string()),
    ];
    tags.extend(spec.tags.iter().cloned());
    tags
}

/// Finds the run this directory is tied to on `client`'s server (setting it back
/// to RUNNING) or creates one, then logs its params and tags.
fn open_run(client: &MlflowClient, spec: &RunSpec) -> Result<MlflowState> {
    let dir = &spec.run_dir;
    let cursor = WalCursor::new(dir, CURSOR_FILE);
    let mut existing: Option<Run> = None;
    let mut state = match MlflowState::load(dir)? {
        Some(s) if s.tracking_uri == client.uri() => match client.run(&s.run_id) {
            Ok(run) if run.info.lifecycle_stage.as_deref() != Some("deleted") => {
                existing = Some(run);
                s
            }
            Ok(_) => fresh_state(client, spec, &cursor, "its MLflow run was deleted")?,
            Err(e) if mlflow_error(&e).is_some_and(|m| m.is_not_found()) => {
                fresh_state(client, spec, &cursor, "its MLflow run no longer exists")?
            }
            Err(e) => return Err(e),
        },
        Some(s) => fresh_state(client, spec, &cursor, &format!("it was tracked on {} before", s.tracking_uri))?,
        // The Python client's convention: MLFLOW_RUN_ID names a run to continue.
        None => match env_nonempty("MLFLOW_RUN_ID") {
            Some(id) => {
                let run = client.run(&id).with_context(|| format!("MLFLOW_RUN_ID={id}"))?;
                let s = MlflowState {
                    tracking_uri: client.uri().to_string(),
                    experiment_id: run.info.experiment_id.clone(),
                    run_id: id,
                    ..MlflowState::default()
                };
                cursor.store(0)?;
                s.save(dir)?;
                existing = Some(run);
                s
            }
            None => fresh_state(client, spec, &cursor, "")?,
        },
    };
    let fitted = fit_params(&spec.params);
    let mut tags = run_tags(spec);
    if !fitted.dropped.is_empty() {
        tags.push((DROPPED_TAG.to_string(), fitted.dropped.join(", ")));
    }
    if let Some(run) = existing {
        // A resume: RUNNING again, and only params it does not have yet (MLflow
        // refuses to change a logged param).
        if run.info.status != RunStatus::Running {
            client.set_run_status(&state.run_id, RunStatus::Running, None)?;
        }
        let have: std::collections::HashMap<&str, &str> =
            run.data.params.iter().map(|p| (p.key.as_str(), p.value.as_str())).collect();
        let changed: Vec<String> =
            fitted.entries.iter().filter(|(k, v)| have.get(k.as_str()).is_some_and(|old| old != v)).map(|(k, _)| k.clone()).collect();
        let missing: Vec<(String, String)> = fitted.entries.iter().filter(|(k, _)| !have.contains_key(k.as_str())).cloned().collect();
        client.log_params(&state.run_id, &missing)?;
        if !changed.is_empty() {
            eprintln!(
                "warning: MLflow keeps the first value of a param; these changed since the run started and keep their old value there: {}",
                changed.join(", ")
            );
            tags.push(("tunebook.params_changed_on_resume".into(), changed.join(", ")));
        }
        tags.retain(|(k, _)| k != "mlflow.user" && k != "mlflow.runName");
        state.final_status = None;
    } else {
        client.log_params(&state.run_id, &fitted.entries)?;
    }
    client.set_tags(&state.run_id, &fit_tags(&tags).entries)?;
    state.params_logged = true;
    state.save(dir)?;
    Ok(state)
}

fn fresh_state(client: &MlflowClient, spec: &RunSpec, cursor: &WalCursor, why: &str) -> Result<MlflowState> {
    let experiment_id = resolve_experiment(client, spec.experiment.as_deref())?;
    let run = client.create_run(&experiment_id, &spec.run_name, now_millis(), &fit_tags(&run_tags(spec)).entries)?;
    if !why.is_empty() {
        eprintln!("note: {} gets a new MLflow run ({why}); all its metrics are sent again", spec.run_dir.display());
    }
    cursor.store(0)?;
    let state = MlflowState {
        tracking_uri: client.uri().to_string(),
        experiment_id,
        run_id: run.info.run_id,
        ..MlflowState::default()
    };
    // Saved before anything else, so a crash now cannot leave a second run behind.
    state.save(&spec.run_dir)?;
    Ok(state)
}

/// Settings of an [`MlflowTracker`].
#[derive(Clone, Debug)]
pub struct TrackerOptions {
    /// How often the shipper looks for new metrics (default 200 ms,
    /// `TUNEBOOK_MLFLOW_POLL_MS`).
    pub poll_interval: Duration,
    /// How long [`Tracker::finish`] waits for the last metrics to reach the server
    /// (default 60 s, `TUNEBOOK_MLFLOW_DRAIN_TIMEOUT`, seconds).
    pub drain_timeout: Duration,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        let ms = env_nonempty("TUNEBOOK_MLFLOW_POLL_MS").and_then(|v| v.parse().ok()).unwrap_or(200);
        let drain = env_nonempty("TUNEBOOK_MLFLOW_DRAIN_TIMEOUT").and_then(|v| v.parse().ok()).unwrap_or(60.0);
        TrackerOptions { poll_interval: Duration::from_millis(ms), drain_timeout: Duration::from_secs_f64(drain) }
    }
}

/// A [`Tracker`] that mirrors a run to an MLflow run: params and tags at start,
/// metrics shipped from the run's write-ahead log by a background thread,
/// artifacts and models through the artifact proxy, and the final status.
///
/// Nothing it does runs on the training thread's hot path: the trainer appends
/// metrics to the log; the shipper thread reads them. If the server is away at the
/// start, the run is created as soon as it answers.
pub struct MlflowTracker {
    client: MlflowClient,
    ship_client: MlflowClient,
    options: TrackerOptions,
    remote: Option<Arc<RemoteRun>>,
    shipper: Option<Shipper>,
    /// The shipper's progress when it stopped.
    last_progress: ShipProgress,
    run_dir: Option<PathBuf>,
    run_name: String,
}

impl MlflowTracker {
    /// A tracker for the server at `uri`, or `MLFLOW_TRACKING_URI`.
    pub fn new(uri: Option<&str>) -> Result<Self> {
        Self::with_client(MlflowClient::with_config(MlflowConfig::tracking(uri)?)?)
    }

    /// A tracker using `client`.
    pub fn with_client(client: MlflowClient) -> Result<Self> {
        let ship_client = client.with_retry(RetryPolicy::no_retry(Duration::from_secs(60)))?;
        Ok(MlflowTracker {
            client,
            ship_client,
            options: TrackerOptions::default(),
            remote: None,
            shipper: None,
            last_progress: ShipProgress::default(),
            run_dir: None,
            run_name: String::new(),
        })
    }

    /// Replaces the settings.
    pub fn options(mut self, options: TrackerOptions) -> Self {
        self.options = options;
        self
    }

    /// The client (for queries about the run).
    pub fn client(&self) -> &MlflowClient {
        &self.client
    }

    /// The MLflow run id, once the run is open.
    pub fn run_id(&self) -> Option<String> {
        self.state().map(|s| s.run_id)
    }

    /// The remote run's state, once open, as `mlflow.json` records it (what the
    /// training stage added there, the logged model, included).
    pub fn state(&self) -> Option<MlflowState> {
        let open = self.remote.as_ref().and_then(|r| r.get())?;
        let on_disk = self.run_dir.as_deref().and_then(|d| MlflowState::load(d).ok().flatten());
        Some(on_disk.filter(|s| s.run_id == open.run_id).unwrap_or(open))
    }

    /// The shipper's progress (its final state after [`Tracker::finish`]).
    pub fn progress(&self) -> ShipProgress {
        self.shipper.as_ref().map(Shipper::progress).unwrap_or_else(|| self.last_progress.clone())
    }

    fn remote(&self) -> Result<&Arc<RemoteRun>> {
        self.remote.as_ref().context("the tracker was not started (call start first)")
    }

    fn sync_hint(&self) -> String {
        match &self.run_dir {
            Some(d) => format!(
                "the run's data is safe in {}; send it later with `tunebook runs sync {}`",
                d.display(),
                if self.run_name.is_empty() { d.display().to_string() } else { self.run_name.clone() }
            ),
            None => String::new(),
        }
    }
}

impl Tracker for MlflowTracker {
    /// Opens the MLflow run (continuing the one in `mlflow.json`, or
    /// `MLFLOW_RUN_ID`'s, else creating one), logs params and tags, and starts the
    /// shipper. If the server does not answer, the shipper still starts and opens
    /// the run when it does; the error returned then says so (a warning, not a
    /// reason to stop training). Refused credentials or a bad request stop
    /// tracking and are returned as errors.
    fn start(&mut self, ctx: &RunContext<'_>) -> Result<()> {
        if let Some(mut s) = self.shipper.take() {
            s.drain(Instant::now());
        }
        let spec = RunSpec::from_ctx(ctx);
        self.run_dir = Some(spec.run_dir.clone());
        self.run_name = spec.run_name.clone();
        let remote = Arc::new(RemoteRun::new(spec));
        self.remote = Some(remote.clone());
        // Open the run now when the server answers, so its link is known at once.
        let quick = self.client.with_retry(RetryPolicy { max_retries: 2, connect_wait: Duration::from_secs(2), ..self.client.config().retry.clone() })?;
        let opened = remote.ensure(&quick);
        if let Err(e) = &opened {
            let transient = mlflow_error(e).is_none_or(|m| m.is_transient());
            if !transient {
                return Err(anyhow::anyhow!("{e:#}")).context(format!("MLflow tracking is off for this run; {}", self.sync_hint()));
            }
        }
        self.shipper =
            Some(Shipper::spawn(self.ship_client.clone(), remote, ctx.run_dir.to_path_buf(), self.options.poll_interval)?);
        if let Err(e) = opened {
            bail!("{e:#}; metrics are kept and will be sent when the server answers (or later: {})", self.sync_hint());
        }
        Ok(())
    }

    fn run_url(&self) -> Option<String> {
        self.state().map(|s| s.url())
    }

    fn log_artifact(&mut self, local: &Path, artifact_path: &str) -> Result<()> {
        let state = self.remote()?.ensure(&self.client)?;
        let run = self.client.run(&state.run_id)?;
        let root = run.info.artifact_uri.context("the MLflow run has no artifact location")?;
        self.client.upload(&root, local, artifact_path)?;
        Ok(())
    }

    fn mlflow_run(&mut self) -> Result<Option<super::MlflowRun>> {
        let state = self.remote()?.ensure(&self.client)?;
        Ok(Some(super::MlflowRun { client: self.client.clone(), run: state.run_ref(), run_name: self.run_name.clone() }))
    }

    fn finish(&mut self, outcome: RunOutcome) -> Result<()> {
        let Some(mut shipper) = self.shipper.take() else {
            bail!("MLflow tracking was not running; {}", self.sync_hint());
        };
        let progress = shipper.drain(Instant::now() + self.options.drain_timeout);
        self.last_progress = progress.clone();
        let remote = self.remote()?.clone();
        let Some(state) = remote.get() else {
            bail!(
                "the MLflow server never answered ({}); {}",
                progress.last_error.unwrap_or_default(),
                self.sync_hint()
            );
        };
        if let Some(f) = progress.fatal {
            bail!("metric shipping stopped: {f}");
        }
        if !progress.caught_up {
            bail!(
                "some metrics did not reach MLflow within {:?} ({}); {}",
                self.options.drain_timeout,
                progress.last_error.unwrap_or_else(|| "still sending".into()),
                self.sync_hint()
            );
        }
        let status = RunStatus::from(outcome);
        self.client.set_run_status(&state.run_id, status, Some(now_millis())).with_context(|| self.sync_hint())?;
        remote.update(|s| s.final_status = Some(status))?;
        Ok(())
    }

    fn summary(&self) -> Option<String> {
        match self.state() {
            Some(s) => Some(format!("MLflow run: {}", s.url())),
            None => Some(format!("MLflow server not reached yet ({})", self.client.uri())),
        }
    }
}

/// What [`sync_run`] did.
#[derive(Clone, Debug)]
pub struct SyncReport {
    pub run_dir: PathBuf,
    pub run_id: String,
    pub url: String,
    /// Metric records sent by this sync.
    pub metrics_sent: u64,
    /// Metric records the server refused (see `mlflow.rejected` in the run directory).
    pub metrics_rejected: u64,
    /// The LoggedModel id, when the run has a final model.
    pub model_id: Option<String>,
    /// `name/version`, when registered.
    pub registered: Option<String>,
    /// The status recorded on the server (None: the run is still going locally).
    pub status: Option<RunStatus>,
}

/// Ships a run directory's tracking data to MLflow: opens (or continues) its
/// MLflow run, sends every metric not sent yet, and records the final status from
/// `status.json`. Safe to run again: nothing is sent twice. (The run's model is
/// logged and registered by the training stage, `train::sync`, which calls this.)
///
/// The server is `tracking_uri`, else the one `tracking.json` names, else the one
/// the run was tracked on before, else `MLFLOW_TRACKING_URI`.
pub fn sync_run(run_dir: &Path, tracking_uri: Option<&str>) -> Result<SyncReport> {
    if !run_dir.is_dir() {
        bail!("{} is not a run directory", run_dir.display());
    }
    let files = RunFiles::new(run_dir);
    // A directory that only a tracker wrote has no status.json: the run goes on.
    let local = if run_dir.join("status.json").exists() { Some(files.status()?) } else { None };
    let tracking = files.tracking_or_default()?;
    let previous = MlflowState::load(run_dir)?;
    let uri = tracking_uri
        .map(str::to_string)
        .or(tracking.tracking_uri.clone())
        .or(previous.as_ref().map(|s| s.tracking_uri.clone()))
        .or_else(crate::mlflow::config::tracking_uri_from_env);
    let client = MlflowClient::with_config(MlflowConfig::tracking(uri.as_deref())?)?;
    let spec = RunSpec {
        run_dir: run_dir.to_path_buf(),
        run_name: tracking.run_name.clone(),
        experiment: tracking.experiment.clone(),
        params: tracking.params.clone(),
        tags: tracking.tags.clone(),
    };
    let remote = RemoteRun::new(spec);
    let state = remote.ensure(&client)?;
    let cursor = WalCursor::new(run_dir, CURSOR_FILE);
    let (mut sent, mut refused) = (0u64, 0u64);
    while let Sent::Batch { delivered, rejected } = ship_batch(&client, &state.run_id, run_dir, &cursor)? {
        sent += delivered as u64;
        refused += rejected as u64;
    }
    let status = match local.as_ref().map(|l| l.status) {
        Some(crate::runs::Status::Completed) => Some(RunStatus::Finished),
        Some(crate::runs::Status::Failed) => Some(RunStatus::Failed),
        Some(crate::runs::Status::Stopped) => Some(RunStatus::Killed),
        Some(crate::runs::Status::Pending | crate::runs::Status::Running) | None => None,
    };
    if let Some(s) = status {
        let end = local.and_then(|l| l.ended_at).map(|t| (t * 1000.0) as i64).unwrap_or_else(now_millis);
        client.set_run_status(&state.run_id, s, Some(end))?;
        remote.update(|st| st.final_status = Some(s))?;
    }
    let state = MlflowState::load(run_dir)?.or_else(|| remote.get()).unwrap_or(state);
    Ok(SyncReport {
        run_dir: run_dir.to_path_buf(),
        run_id: state.run_id.clone(),
        url: state.url(),
        metrics_sent: sent,
        metrics_rejected: refused,
        model_id: state.logged_model_id.clone(),
        registered: state.registered.clone(),
        status,
    })
}

impl SyncReport {
    /// The card shown for a sync.
    pub fn card(&self) -> LinkTable {
        LinkTable::card(
            "MLflow sync",
            vec![
                ("run", Cell::link(&self.run_id, &self.url)),
                ("metrics sent", Cell::text(self.metrics_sent.to_string())),
                ("metrics refused", Cell::text(self.metrics_rejected.to_string())),
                ("model", Cell::text(self.model_id.clone().unwrap_or_else(|| "-".into()))),
                ("registered", Cell::text(self.registered.clone().unwrap_or_else(|| "-".into()))),
                ("status", Cell::text(self.status.map(|s| s.as_str()).unwrap_or("RUNNING (still going locally)"))),
            ],
        )
    }
}

crate::mlflow::display::render_as_table!(SyncReport, SyncReport::card);
