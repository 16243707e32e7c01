//! A local MLflow server: `tunebook mlflow up` / `down`, and the servers the tests
//! start.
//!
//! The server runs `mlflow server` with a sqlite store and proxied artifacts in a
//! data directory, on 127.0.0.1 and a free port, with one worker and job execution
//! off (it starts in about 15-20 s instead of 90). It runs in its own process
//! group, because `mlflow server` starts children that outlive a signal sent to
//! the parent alone; stopping it ends the whole group.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What `tunebook mlflow up` records in the data directory.
pub const SERVER_FILE: &str = "server.json";

/// The `mlflow` executable: `$TUNEBOOK_MLFLOW`, then `$VENV/bin/mlflow`, then
/// `PATH`, then the project's `.venv` (`$ROOT/.venv`, or the checkout this binary
/// was built from).
pub fn find_mlflow() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("TUNEBOOK_MLFLOW").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if is_executable(&p) {
            return Ok(p);
        }
        bail!("TUNEBOOK_MLFLOW={} is not an executable file", p.display());
    }
    let mut candidates = Vec::new();
    if let Some(v) = std::env::var_os("VENV") {
        candidates.push(PathBuf::from(v).join("bin/mlflow"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("mlflow")));
    }
    if let Some(root) = std::env::var_os("ROOT") {
        candidates.push(PathBuf::from(root).join(".venv/bin/mlflow"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/mlflow"));
    candidates.into_iter().find(|p| is_executable(p)).context(
        "cannot find the `mlflow` command: run ./scripts/setup.sh (it installs MLflow into the project's .venv), \
         `pip install mlflow`, or set TUNEBOOK_MLFLOW to its path",
    )
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A port nobody listens on now (the kernel's choice for port 0).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// How to start a server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Holds `mlflow.db`, `artifacts/` and `server.log`.
    pub data_dir: PathBuf,
    /// Port on 127.0.0.1; a free one when `None`.
    pub port: Option<u16>,
    /// The `mlflow` executable ([`find_mlflow`] when `None`).
    pub mlflow: Option<PathBuf>,
    /// `--app-name` (e.g. `basic-auth`).
    pub app_name: Option<String>,
    /// Extra environment variables for the server.
    pub env: Vec<(String, String)>,
    /// End the server when this process ends (tests): a small shell watches this
    /// process and ends the server's process group after it.
    pub tied_to_this_process: bool,
}

impl ServerOptions {
    /// Defaults for a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ServerOptions { data_dir: data_dir.into(), port: None, mlflow: None, app_name: None, env: Vec::new(), tied_to_this_process: false }
    }
}

/// A running (or starting) local MLflow server.
#[derive(Debug, Serialize, Deserialize)]
pub struct LocalServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    pub port: u16,
    /// Process group of the server (the leader's pid).
    pub pgid: i32,
    pub data_dir: PathBuf,
    #[serde(skip)]
    child: Option<Child>,
}

impl LocalServer {
    /// Starts `mlflow server` in its own process group; returns without waiting
    /// for it to answer (see [`LocalServer::wait_ready`]).
    pub fn spawn(opts: &ServerOptions) -> Result<LocalServer> {
        let mlflow = match &opts.mlflow {
            Some(p) => p.clone(),
            None => find_mlflow()?,
        };
        std::fs::create_dir_all(opts.data_dir.join("artifacts"))
            .with_context(|| format!("cannot create {}", opts.data_dir.display()))?;
        let data = opts.data_dir.canonicalize()?;
        let port = match opts.port {
            Some(p) => p,
            None => free_port()?,
        };
        let mut args: Vec<String> = vec![
            "server".into(),
            "--backend-store-uri".into(),
            format!("sqlite:///{}", data.join("mlflow.db").display()),
            "--artifacts-destination".into(),
            data.join("artifacts").display().to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--workers".into(),
            "1".into(),
        ];
        if let Some(app) = &opts.app_name {
            args.push("--app-name".into());
            args.push(app.clone());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.join("server.log"))
            .with_context(|| format!("cannot write {}", data.join("server.log").display()))?;
        let mut cmd = if opts.tied_to_this_process {
            // `sh` leads the group: it starts the server, then ends the group once
            // this process is gone (even after a panic or a kill -9).
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(
                    "parent=$1; shift; \"$@\" & trap '' TERM; \
                     while kill -0 \"$parent\" 2>/dev/null; do sleep 1; done; \
                     kill -TERM 0; sleep 5; kill -KILL 0",
                )
                .arg("tunebook-mlflow-watch")
                .arg(std::process::id().to_string())
                .arg(&mlflow)
                .args(&args);
            c
        } else {
            let mut c = Command::new(&mlflow);
            c.args(&args);
            c
        };
        cmd.env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
            .envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&data)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: setsid is async-signal-safe; it only makes the child a group leader.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("cannot start {}", mlflow.display()))?;
        Ok(LocalServer { url: format!("http://127.0.0.1:{port}"), port, pgid: child.id() as i32, data_dir: data, child: Some(child) })
    }

    /// [`LocalServer::spawn`], then [`LocalServer::wait_ready`] (up to 180 s).
    pub fn start(opts: &ServerOptions) -> Result<LocalServer> {
        let mut s = Self::spawn(opts)?;
        if let Err(e) = s.wait_ready(Duration::from_secs(180)) {
            s.stop();
            return Err(e);
        }
        Ok(s)
    }

    /// Waits until `/health` answers `OK`. Fails early if the server exits, with
    /// the end of its log.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let start = Instant::now();
        loop {
            if http.get(format!("{}/health", self.url)).send().is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            let exited = match self.child.as_mut() {
                Some(c) => c.try_wait()?.is_some(),
                None => !group_alive(self.pgid),
            };
            if exited || start.elapsed() > timeout {
                bail!(
                    "the MLflow server at {} {}; the end of {}:\n{}",
                    self.url,
                    if exited { "exited" } else { "did not answer in time" },
                    self.data_dir.join("server.log").display(),
                    log_tail(&self.data_dir.join("server.log"), 15)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// True when `/health` answers.
    pub fn is_healthy(&self) -> bool {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .is_ok_and(|c| c.get(format!("{}/health", self.url)).send().is_ok_and(|r| r.status().is_success()))
    }

    /// Ends the server's process group: SIGTERM, then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        kill_group(self.pgid, Duration::from_secs(10));
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

fn group_alive(pgid: i32) -> bool {
    // SAFETY: signal 0 only checks that the group exists.
    pgid > 1 && unsafe { libc::kill(-pgid, 0) } == 0
}

fn kill_group(pgid: i32, grace: Duration) {
    if pgid <= 1 {
        return;
    }
    // SAFETY: signals to a process group this module created.
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    let start = Instant::now();
    while group_alive(pgid) && start.elapsed() < grace {
        // Reap the leader if it is our child, so the group can disappear.
        unsafe { libc::waitpid(pgid, std::ptr::null_mut(), libc::WNOHANG) };
        std::thread::sleep(Duration::from_millis(100));
    }
    if group_alive(pgid) {
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The data directory of `tunebook mlflow up` ([`crate::files::mlflow_dir`]).
pub fn default_data_dir() -> PathBuf {
    crate::files::mlflow_dir()
}

/// The server recorded in `data_dir`, if it still answers.
pub fn running(data_dir: &Path) -> Option<LocalServer> {
    let text = std::fs::read_to_string(data_dir.join(SERVER_FILE)).ok()?;
    let s: LocalServer = serde_json::from_str(&text).ok()?;
    (group_alive(s.pgid) && s.is_healthy()).then_some(s)
}

/// `tunebook mlflow up`: the server recorded in the data directory if it still
/// answers, else a new one (left running after this process ends). Returns it and
/// whether it was already running.
pub fn up(data_dir: Option<&Path>, port: Option<u16>) -> Result<(LocalServer, bool)> {
    let dir = data_dir.map(Path::to_path_buf).unwrap_or_else(default_data_dir);
    if let Some(s) = running(&dir) {
        if port.is_none_or(|p| p == s.port) {
            return Ok((s, true));
        }
        bail!("an MLflow server for {} already runs at {}: stop it with `tunebook mlflow down` to use another port", dir.display(), s.url);
    }
    let mut opts = ServerOptions::new(&dir);
    opts.port = port;
    let s = LocalServer::start(&opts)?;
    crate::files::write_atomic(&s.data_dir.join(SERVER_FILE), serde_json::to_string_pretty(&s)?.as_bytes())?;
    Ok((s, false))
}

/// `tunebook mlflow down`: stops the server recorded in the data directory.
/// Returns its URL, or `None` when none was running.
pub fn down(data_dir: Option<&Path>) -> Result<Option<String>> {
    let dir = data_dir.map(Path::to_path_buf).unwrap_or_else(default_data_dir);
    let file = dir.join(SERVER_FILE);
    let Ok(text) = std::fs::read_to_string(&file) else { return Ok(None) };
    let mut s: LocalServer = serde_json::from_str(&text).with_context(|| format!("{} is damaged", file.display()))?;
    let was = group_alive(s.pgid).then(|| s.url.clone());
    if was.is_some() {
        s.stop();
    }
    std::fs::remove_file(&file).ok();
    Ok(was)
}

/// What `tunebook mlflow up` prints.
pub fn up_message(s: &LocalServer, already: bool) -> String {
    format!(
        "MLflow {} at {url}\n  UI:        {url}\n  data:      {}\n  log:       {}\nUse it from this shell (and the notebooks you start from it):\n  export MLFLOW_TRACKING_URI={url}\nStop it with `tunebook mlflow down`.",
        if already { "is already running" } else { "started" },
        s.data_dir.display(),
        s.data_dir.join("server.log").display(),
        url = s.url
    )
}
