//! Serving endpoints as background workers, for notebooks: [`Endpoint::start`] launches
//! `tunebook serve` in its own session (it outlives the kernel, as a training worker
//! does) and returns a handle; [`Endpoint::attach`] and [`Endpoint::list`] find running
//! endpoints again after a kernel restart.
//!
//! An endpoint lives in `$TUNEBOOK_HOME/endpoints/NAME/`: `endpoint.json` (what was
//! started, the worker's pid), `ready.json` (the URL, written by the worker once it
//! serves), `server.log` (its output) and `api_keys` (mode 0600) when a key is set.

use super::Serve;
use crate::runs::worker_alive;
use crate::display::{Render, Table};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What an endpoint was started with (`endpoint.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct EndpointFile {
    name: String,
    model: String,
    adapters: Vec<(String, String)>,
    pid: u32,
    started_at: String,
    inference_table: Option<String>,
}

/// Written by the worker when it serves (`ready.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ReadyFile {
    pub url: String,
    pub pid: u32,
}

/// Where endpoints live: `$TUNEBOOK_HOME/endpoints`.
pub fn endpoints_root() -> PathBuf {
    crate::files::home().join("endpoints")
}

/// Settings of an endpoint to start; see [`Endpoint::new`].
#[derive(Clone, Debug)]
pub struct EndpointBuilder {
    model: String,
    name: Option<String>,
    adapters: Vec<(String, String)>,
    port: u16,
    api_key: Option<String>,
    inference_table: Option<PathBuf>,
    max_concurrency: usize,
    allow_adapter_updates: bool,
    timeout: Duration,
}

impl EndpointBuilder {
    /// The endpoint's name (default: from the model); also the base model's id in the API.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Serves a LoRA adapter too (a PEFT folder or a registered model), chosen per request
    /// with `"model": name`.
    pub fn adapter(mut self, name: impl Into<String>, source: impl Into<String>) -> Self {
        self.adapters.push((name.into(), source.into()));
        self
    }

    /// The port on 127.0.0.1 (default 0: a free one).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Requires this API key (`Authorization: Bearer KEY`) on every route but `/health`.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Logs every request and response to the Delta table at `dir`.
    pub fn inference_table(mut self, dir: impl Into<PathBuf>) -> Self {
        self.inference_table = Some(dir.into());
        self
    }

    /// Most sequences decoded together (default 8).
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.max_concurrency = n;
        self
    }

    /// Allows loading and unloading adapters at run time.
    pub fn allow_adapter_updates(mut self, on: bool) -> Self {
        self.allow_adapter_updates = on;
        self
    }

    /// How long [`start`](Self::start) waits for the model to load (default 10 minutes).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Launches the worker and waits until it serves.
    pub fn start(self) -> Result<Endpoint> {
        use std::os::unix::process::CommandExt;
        let name = self.name.clone().unwrap_or_else(|| default_name(&self.model));
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            bail!("endpoint name {name:?}: use letters, digits, `-`, `_` or `.` (not starting with `.`)");
        }
        let dir = endpoints_root().join(&name);
        if let Ok(e) = Endpoint::attach(&name) {
            bail!("an endpoint named `{name}` is already running at {} (pid {}): stop it (Endpoint::attach(\"{name}\")?.stop()) or choose another .name()", e.url(), e.pid());
        }
        // A stopped endpoint of the same name leaves its folder: start afresh.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing the old endpoint folder {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let bin = crate::runs::tunebook_binary()?;
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("serve").arg(&self.model).args(["--served-model-name", &name, "--port", &self.port.to_string()]);
        cmd.args(["--max-concurrency", &self.max_concurrency.to_string()]).arg("--endpoint-dir").arg(&dir);
        for (n, s) in &self.adapters {
            cmd.arg("--adapter").arg(format!("{n}={s}"));
        }
        if let Some(t) = &self.inference_table {
            cmd.arg("--inference-table").arg(t);
        }
        if self.allow_adapter_updates {
            cmd.arg("--allow-adapter-updates");
        }
        if let Some(k) = &self.api_key {
            let f = dir.join("api_keys");
            crate::files::write_atomic(&f, format!("{k}\n").as_bytes())?;
            std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            cmd.arg("--api-key-file").arg(&f);
        }
        let log = std::fs::File::create(dir.join("server.log"))?;
        cmd.stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
        cmd.env_remove(crate::display::DISPLAY_ENV);
        // SAFETY: setsid is async-signal-safe; it runs in the child before exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("starting the serving worker {}", bin.display()))?;
        let file = EndpointFile {
            name: name.clone(),
            model: self.model.clone(),
            adapters: self.adapters.clone(),
            pid: child.id(),
            started_at: chrono::Local::now().to_rfc3339(),
            inference_table: self.inference_table.as_ref().map(|p| p.display().to_string()),
        };
        crate::files::write_atomic(&dir.join("endpoint.json"), serde_json::to_string_pretty(&file)?.as_bytes())?;
        let t0 = Instant::now();
        let ready = loop {
            if let Ok(text) = std::fs::read_to_string(dir.join("ready.json")) {
                if let Ok(r) = serde_json::from_str::<ReadyFile>(&text) {
                    break r;
                }
            }
            if let Some(status) = child.try_wait()? {
                bail!("the serving worker exited ({status}) before it was ready; its log ({}):\n{}", dir.join("server.log").display(), tail(&dir.join("server.log"), 20));
            }
            if t0.elapsed() > self.timeout {
                let _ = child.kill();
                bail!("the serving worker was not ready after {:?}; its log:\n{}", self.timeout, tail(&dir.join("server.log"), 20));
            }
            crate::interrupt::check().map_err(|e| anyhow::anyhow!("{e}"))?;
            std::thread::sleep(Duration::from_millis(100));
        };
        // Reap the worker when it exits so it does not linger as a zombie of this process.
        std::thread::spawn(move || child.wait());
        Ok(Endpoint { dir, file, url: ready.url, api_key: self.api_key })
    }
}

fn default_name(model: &str) -> String {
    let stem = Path::new(model.trim_end_matches('/')).file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let stem = stem.trim_end_matches(".gguf").replace(['@', ':'], "-");
    let clean: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '-' }).collect();
    let clean = clean.trim_matches(['-', '.']).to_string();
    if clean.is_empty() { "endpoint".into() } else { clean }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether `pid` is this endpoint's worker: alive, and running `serve --endpoint-dir DIR`
/// (a pid reused by another process after a reboot or a crash is not ours to signal).
fn is_worker(pid: u32, dir: &Path) -> bool {
    worker_alive(pid)
        && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
            args.iter().any(|a| *a == b"serve") && args.iter().any(|a| *a == dir.as_os_str().as_encoded_bytes())
        })
}

/// A running serving endpoint.
#[derive(Clone, Debug)]
pub struct Endpoint {
    dir: PathBuf,
    file: EndpointFile,
    url: String,
    api_key: Option<String>,
}

impl Endpoint {
    /// Settings of an endpoint serving `model` (anything `tunebook serve` accepts: a model
    /// folder, a `.gguf`, a run's `model/`, an adapter folder, `models:/name/3`, `name@alias`).
    pub fn new(model: impl Into<String>) -> EndpointBuilder {
        EndpointBuilder {
            model: model.into(),
            name: None,
            adapters: vec![],
            port: 0,
            api_key: None,
            inference_table: None,
            max_concurrency: 8,
            allow_adapter_updates: false,
            timeout: Duration::from_secs(600),
        }
    }

    /// Starts an endpoint for `model` with the default settings.
    pub fn start(model: impl Into<String>) -> Result<Endpoint> {
        Self::new(model).start()
    }

    /// The running endpoint named `name` (e.g. after a kernel restart).
    pub fn attach(name: &str) -> Result<Endpoint> {
        let dir = endpoints_root().join(name);
        let text = std::fs::read_to_string(dir.join("endpoint.json"))
            .with_context(|| format!("no endpoint named `{name}` in {} (Endpoint::list() shows the running ones)", endpoints_root().display()))?;
        let file: EndpointFile = serde_json::from_str(&text).with_context(|| format!("{} is damaged", dir.join("endpoint.json").display()))?;
        if !is_worker(file.pid, &dir) {
            bail!("the endpoint `{name}` is not running (its worker, pid {}, is gone; log: {})", file.pid, dir.join("server.log").display());
        }
        let ready: ReadyFile = serde_json::from_str(&std::fs::read_to_string(dir.join("ready.json")).with_context(|| format!("the endpoint `{name}` is still loading"))?)?;
        let api_key = std::fs::read_to_string(dir.join("api_keys")).ok().and_then(|k| k.lines().next().map(str::to_string));
        Ok(Endpoint { dir, file, url: ready.url, api_key })
    }

    /// Every running endpoint.
    pub fn list() -> Result<Vec<Endpoint>> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(endpoints_root()) else { return Ok(out) };
        for e in entries.flatten() {
            if let Some(name) = e.file_name().to_str() {
                if let Ok(ep) = Endpoint::attach(name) {
                    out.push(ep);
                }
            }
        }
        out.sort_by(|a, b| a.file.name.cmp(&b.file.name));
        Ok(out)
    }

    /// The base URL of the OpenAI API (`http://127.0.0.1:PORT/v1`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The endpoint's name, also the base model's id in the API.
    pub fn name(&self) -> &str {
        &self.file.name
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.file.pid
    }

    fn client(&self) -> Result<reqwest::blocking::Client> {
        Ok(reqwest::blocking::Client::builder().timeout(Duration::from_secs(600)).build()?)
    }

    fn get(&self, path: &str) -> Result<reqwest::blocking::Response> {
        let root = self.url.trim_end_matches("/v1");
        let mut req = self.client()?.get(format!("{root}{path}"));
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        Ok(req.send().with_context(|| format!("GET {root}{path}"))?)
    }

    /// Asks the base model one question (a user message, greedy) and returns the reply.
    pub fn chat(&self, message: &str) -> Result<String> {
        self.chat_as(self.name(), message)
    }

    /// Asks `model` (the endpoint's name or one of its adapters) one question, greedy.
    pub fn chat_as(&self, model: &str, message: &str) -> Result<String> {
        self.chat_with(model, &[crate::tokenize::Message::user(message)], json!({"temperature": 0}))
    }

    /// A chat completion with `model` (the endpoint's name or an adapter's), `messages`
    /// and extra request fields (`{"max_tokens": 64, "temperature": 0}`); returns the reply.
    pub fn chat_with(&self, model: &str, messages: &[crate::tokenize::Message], extra: Value) -> Result<String> {
        let mut body = json!({"model": model, "messages": messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>()});
        if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
            b.extend(e);
        }
        let mut req = self.client()?.post(format!("{}/chat/completions", self.url)).json(&body);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().with_context(|| format!("POST {}/chat/completions", self.url))?;
        let status = resp.status();
        let v: Value = resp.json().context("the endpoint's answer is not JSON")?;
        if !status.is_success() {
            bail!("the endpoint answered {status}: {}", v["error"]["message"].as_str().unwrap_or(&v.to_string()));
        }
        v["choices"][0]["message"]["content"].as_str().map(str::to_string).context("the endpoint's answer has no message")
    }

    /// The last `lines` lines of the worker's log.
    pub fn logs(&self, lines: usize) -> String {
        tail(&self.dir.join("server.log"), lines)
    }

    /// Model ids served (the base model and its adapters).
    pub fn models(&self) -> Result<Vec<String>> {
        let v: Value = self.get("/v1/models")?.json()?;
        Ok(v["data"].as_array().map(|a| a.iter().filter_map(|m| m["id"].as_str().map(str::to_string)).collect()).unwrap_or_default())
    }

    /// Completed chat and completion requests by HTTP status, from `/metrics`.
    pub fn request_counts(&self) -> Result<Vec<(u16, u64)>> {
        let text = self.get("/metrics")?.text()?;
        let mut by: std::collections::BTreeMap<u16, u64> = Default::default();
        for line in text.lines().filter(|l| l.starts_with("http_requests_total{handler=\"/v1/") && l.contains("completions\"")) {
            let status = line.split("status=\"").nth(1).and_then(|s| s.split('"').next()).and_then(|s| s.parse().ok());
            let n = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
            if let (Some(s), Some(n)) = (status, n) {
                *by.entry(s).or_insert(0) += n as u64;
            }
        }
        Ok(by.into_iter().collect())
    }

    /// Stops the worker (SIGTERM: it finishes in-flight requests for up to 10 s and
    /// flushes its inference table), waiting up to 30 s before SIGKILL.
    pub fn stop(&self) -> Result<()> {
        if !is_worker(self.file.pid, &self.dir) {
            return Ok(());
        }
        let pid = self.file.pid as i32;
        // SAFETY: plain signals to our own worker.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t0 = Instant::now();
        while worker_alive(self.file.pid) {
            if t0.elapsed() > Duration::from_secs(30) {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Render for Endpoint {
    fn text_plain(&self) -> String {
        self.table().text_plain()
    }

    fn text_html(&self) -> Option<String> {
        self.table().text_html()
    }
}

impl Endpoint {
    fn table(&self) -> Table {
        let models = self.models().map(|m| m.join(", ")).unwrap_or_else(|e| format!("unreachable: {e:#}"));
        let counts = self
            .request_counts()
            .map(|c| if c.is_empty() { "none yet".into() } else { c.iter().map(|(s, n)| format!("{n} × {s}")).collect::<Vec<_>>().join(", ") })
            .unwrap_or_default();
        let state = if is_worker(self.file.pid, &self.dir) { "serving" } else { "stopped" };
        let mut t = Table::new(["", ""])
            .title(format!("endpoint {}", self.file.name))
            .row(["url".to_string(), self.url.clone()])
            .row(["state".to_string(), format!("{state} (pid {})", self.file.pid)])
            .row(["model".to_string(), self.file.model.clone()])
            .row(["served ids".to_string(), models])
            .row(["requests".to_string(), counts])
            .row(["started".to_string(), self.file.started_at.clone()]);
        if let Some(t2) = &self.file.inference_table {
            t = t.row(["inference table".to_string(), t2.clone()]);
        }
        t.row(["log".to_string(), self.dir.join("server.log").display().to_string()])
    }
}

/// What `tunebook serve --endpoint-dir DIR` does once ready: records the URL for the
/// notebook handle.
pub(crate) fn write_ready(dir: &Path, url: &str) -> Result<()> {
    let r = ReadyFile { url: url.to_string(), pid: std::process::id() };
    crate::files::write_atomic(&dir.join("ready.json"), serde_json::to_string(&r)?.as_bytes())
}

impl Serve {
    /// Serves like [`run`](Self::run) and, once ready, records the URL in `dir` for
    /// [`Endpoint`] handles.
    pub fn run_as_endpoint(self, dir: &Path) -> Result<()> {
        let dir = dir.to_path_buf();
        self.run(move |url| {
            println!("tunebook serve: ready at {url}");
            if let Err(e) = write_ready(&dir, url) {
                eprintln!("tunebook serve: cannot record the URL in {}: {e:#}", dir.display());
            }
        })
    }
}
