//! Serving: an OpenAI-compatible HTTP endpoint for a model and its LoRA adapters.
//!
//! * [`Serve`]: the builder behind `tunebook serve` (model, adapters, host/port, API
//!   keys, inference table, limits); [`Serve::run`] serves until SIGINT/SIGTERM.
//! * `engine`: one thread owns the model and runs continuous batching
//!   ([`crate::model::LlamaModel::forward_batch`]); requests for different adapters share
//!   a step, each adapter applied unmerged to its own rows.
//! * `http`: axum routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//!   `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`, `/health`, `/metrics`), API
//!   keys, `x-request-id`, SSE streaming.
//! * `api`: the OpenAI wire format and its error envelope.
//! * [`table`]: the Delta inference table.
//! * [`Endpoint`]: the notebook handle: `tunebook serve` as a background worker.
//! * [`generate_batch`]: many prompts through the engine without HTTP (evaluation's path).
//!
//! Prompts go through the model's own chat template ([`crate::tokenize::Tokenizer::encode_chat`],
//! the code path training used) and text through [`crate::model::TextStream`] (the code
//! path `Model::generate` uses): greedy answers equal `tunebook generate`'s.
//!
//! ```no_run
//! use tunebook::serve::Serve;
//! Serve::new("HuggingFaceTB/SmolLM2-135M-Instruct")
//!     .adapter("dates", "runs/dates-1/model")
//!     .port(8000)
//!     .run(|url| println!("serving at {url}"))?;
//! # anyhow::Ok(())
//! ```

pub mod api;
mod batch;
pub mod endpoint;
mod engine;
mod http;
pub mod metrics;
pub mod table;

pub use batch::{BatchAnswer, BatchPrompt, generate_batch};
pub use endpoint::{Endpoint, EndpointBuilder};
pub use engine::EngineLimits;

use crate::model::{AdapterWeights, Model};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

/// Settings of a serving endpoint, built by name.
#[derive(Clone, Debug)]
pub struct Serve {
    model: String,
    adapters: Vec<(String, String)>,
    host: String,
    port: u16,
    api_keys: Vec<String>,
    inference_table: Option<PathBuf>,
    limits: EngineLimits,
    max_queue: usize,
    allow_adapter_updates: bool,
    served_model_name: Option<String>,
    max_model_len: Option<usize>,
    shutdown_timeout: Duration,
    int8_activations: bool,
}

impl Serve {
    /// Serves `model`: a Hugging Face directory, a `.gguf`, a run's `model/` folder, a
    /// PEFT adapter folder (merged into its base), a Hugging Face id in the local cache, or
    /// a registered model (`models:/name/3`, `name@alias`).
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            adapters: vec![],
            host: "127.0.0.1".into(),
            port: 0,
            api_keys: vec![],
            inference_table: None,
            limits: EngineLimits::default(),
            max_queue: 64,
            allow_adapter_updates: false,
            served_model_name: None,
            max_model_len: None,
            shutdown_timeout: Duration::from_secs(10),
            int8_activations: false,
        }
    }

    /// Also serves a LoRA adapter under `name` (requests choose it with `"model": name`);
    /// `source` is a PEFT adapter folder or a registered model holding one.
    pub fn adapter(mut self, name: impl Into<String>, source: impl Into<String>) -> Self {
        self.adapters.push((name.into(), source.into()));
        self
    }

    /// The address to listen on (default 127.0.0.1; `0.0.0.0` for every interface).
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// The port (0, the default, picks a free one).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Requires `Authorization: Bearer KEY` with one of `keys` on every route but `/health`.
    pub fn api_keys(mut self, keys: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.api_keys = keys.into_iter().map(Into::into).filter(|k: &String| !k.is_empty()).collect();
        self
    }

    /// Reads API keys from a file, one per line (blank lines and `#` comments skipped).
    pub fn api_key_file(self, path: impl AsRef<Path>) -> Result<Self> {
        Ok(self.api_keys(read_api_keys(path.as_ref())?))
    }

    /// Appends every request and response to the Delta table at `dir`.
    pub fn inference_table(mut self, dir: impl Into<PathBuf>) -> Self {
        self.inference_table = Some(dir.into());
        self
    }

    /// Most sequences decoded together in one step (default 8).
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.limits.max_running = n.max(1);
        self
    }

    /// Most requests waiting for a place in the batch before new ones get 429 (default 64).
    pub fn max_queue(mut self, n: usize) -> Self {
        self.max_queue = n;
        self
    }

    /// Most prompt tokens prefilled per step; longer prompts are chunked (default 256).
    pub fn prefill_chunk(mut self, tokens: usize) -> Self {
        self.limits.prefill_tokens_per_step = tokens.max(1);
        self
    }

    /// Allows `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`.
    pub fn allow_adapter_updates(mut self, on: bool) -> Self {
        self.allow_adapter_updates = on;
        self
    }

    /// The base model's id in the API (default: MODEL as given).
    pub fn served_model_name(mut self, name: impl Into<String>) -> Self {
        self.served_model_name = Some(name.into());
        self
    }

    /// Limits prompt + completion tokens (default: the model's `max_position_embeddings`).
    pub fn max_model_len(mut self, n: usize) -> Self {
        self.max_model_len = Some(n);
        self
    }

    /// Multiplies Q4 weights with activations rounded to 8 bits, as llama.cpp does
    /// ([`crate::model::LlamaModel::set_int8_activations`]): more tokens per second, most
    /// of all with many concurrent requests, but answers are no longer exactly
    /// `tunebook generate`'s. Off by default.
    pub fn int8_activations(mut self, on: bool) -> Self {
        self.int8_activations = on;
        self
    }

    /// How long in-flight requests may go on after SIGINT/SIGTERM (default 10 s).
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = d;
        self
    }

    /// Binds the port, loads the model and adapters (`/health` says 503 meanwhile), calls
    /// `on_ready` with the base URL (`http://HOST:PORT/v1`), and serves until SIGINT or
    /// SIGTERM: then it stops admitting, lets in-flight requests finish for up to the
    /// shutdown timeout, flushes the inference table and returns.
    pub fn run(self, on_ready: impl FnOnce(&str)) -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(self.run_async(on_ready))
    }

    async fn run_async(self, on_ready: impl FnOnce(&str)) -> Result<()> {
        let listener = tokio::net::TcpListener::bind((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("cannot listen on {}:{} (is the port in use? port 0 picks a free one)", self.host, self.port))?;
        let addr = listener.local_addr()?;
        let log = match &self.inference_table {
            Some(dir) => Some(table::InferenceLog::start(dir)?),
            None => None,
        };
        let name = self.served_model_name.clone().unwrap_or_else(|| self.model.clone());
        let server = Arc::new(http::Server {
            model_name: name.clone(),
            created: chrono::Utc::now().timestamp(),
            keys: self.api_keys.clone(),
            ready: OnceLock::new(),
            metrics: Arc::new(metrics::Metrics::new(&name)),
            inflight: AtomicUsize::new(0),
            max_inflight: self.limits.max_running + self.max_queue,
            allow_adapter_updates: self.allow_adapter_updates,
            shutting_down: AtomicBool::new(false),
            engine_gone: AtomicBool::new(false),
            log,
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app = http::router(server.clone());
        let mut serving = tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await
        });
        let (spec, adapters, int8) = (self.model.clone(), self.adapters.clone(), self.int8_activations);
        let loaded = tokio::task::spawn_blocking(move || -> Result<_> {
            let mut model = load_model(&spec)?;
            model.llama.set_int8_activations(int8);
            if model.tokenizer.is_none() {
                bail!("{spec} has no tokenizer (tokenizer.json): a served model needs one to read prompts");
            }
            let mut served = std::collections::BTreeMap::new();
            for (n, src) in adapters {
                let w = read_adapter(&model, &src).with_context(|| format!("adapter `{n}` from {src}"))?;
                served.insert(n, http::ServedAdapter { weights: Arc::new(w), source: src, created: chrono::Utc::now().timestamp() });
            }
            Ok((model, served))
        })
        .await?;
        let (model, served) = match loaded {
            Ok(x) => x,
            Err(e) => {
                serving.abort();
                return Err(e);
            }
        };
        if served.contains_key(&name) {
            bail!("an adapter is named `{name}`, the served model's own name: choose another adapter name");
        }
        let model = Arc::new(model);
        let context_len = self.max_model_len.unwrap_or(usize::MAX).min(model.llama.config.max_position_embeddings);
        let (jobs_tx, jobs_rx) = std::sync::mpsc::channel();
        let (m, limits, metrics) = (model.clone(), self.limits, server.metrics.clone());
        let watch = server.clone();
        std::thread::Builder::new().name("engine".into()).spawn(move || {
            // Marks the engine gone however it ends (a panic included), so /health says so.
            struct Gone(Arc<http::Server>);
            impl Drop for Gone {
                fn drop(&mut self) {
                    self.0.engine_gone.store(true, Ordering::Relaxed);
                }
            }
            let _gone = Gone(watch);
            engine::run(m, jobs_rx, limits, metrics)
        })?;
        let _ = server.ready.set(http::Ready { model, jobs: Mutex::new(jobs_tx), adapters: RwLock::new(served), context_len });
        on_ready(&format!("http://{addr}/v1"));
        tokio::select! {
            _ = shutdown_signal() => {}
            r = &mut serving => { r??; bail!("the HTTP server stopped unexpectedly"); }
        }
        server.shutting_down.store(true, Ordering::Relaxed);
        let _ = stop_tx.send(());
        if tokio::time::timeout(self.shutdown_timeout, &mut serving).await.is_err() {
            eprintln!(
                "tunebook serve: {} request(s) still running after {:?}: cancelled",
                server.inflight.load(Ordering::Relaxed),
                self.shutdown_timeout
            );
            serving.abort();
        }
        if let Some(log) = &server.log {
            log.close();
        }
        Ok(())
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Loads what `tunebook serve MODEL` names: a local path or Hugging Face id through
/// [`Model::load`], a registered model through [`crate::registry::Registry::load`].
pub fn load_model(spec: &str) -> Result<Model> {
    crate::registry::load_local_or_registered(spec, Model::load)
}

/// Reads an adapter for `model`: a PEFT folder, or a registered model holding one.
pub fn read_adapter(model: &Model, source: &str) -> Result<AdapterWeights> {
    let p = Path::new(source);
    let dir = if p.is_dir() {
        p.to_path_buf()
    } else if p.exists() {
        bail!("{source} is a file: an adapter is a PEFT folder (adapter_config.json + adapter_model.safetensors)");
    } else {
        crate::registry::Registry::new(None)?.download(source).with_context(|| format!("{source} is not a folder; as a registered model"))?
    };
    let found = [dir.clone(), dir.join("peft"), dir.join("model")].into_iter().find(|d| d.join("adapter_config.json").is_file());
    let Some(adir) = found else {
        bail!("{}: no adapter_config.json (an adapter is a PEFT folder: adapter_config.json + adapter_model.safetensors)", dir.display());
    };
    let weights = model.llama.read_adapter(&adir)?;
    // Shapes and names are checked; a base of the same shape but other weights (a base
    // model vs its instruct version) is not detectable from shapes: say so when the names differ.
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(adir.join("adapter_config.json"))?).unwrap_or_default();
    if let (Some(want), Some(src)) = (cfg["base_model_name_or_path"].as_str(), &model.source) {
        let have = match src {
            crate::model::ModelSource::HfDir(d) => d.display().to_string(),
            crate::model::ModelSource::Gguf(p) => p.display().to_string(),
        };
        if !same_model_name(want, &have) {
            eprintln!(
                "tunebook serve: warning: adapter {source} was trained on {want:?}, and the served model is {have:?}; \
                 their shapes match, but if the weights differ its answers will be wrong"
            );
        }
    }
    Ok(weights)
}

/// Whether two model references name the same model: the last path component, lower
/// case, without `.gguf`, a quantization suffix (`.Q4_1`, `-f16`) or `-GGUF`.
fn same_model_name(a: &str, b: &str) -> bool {
    fn norm(s: &str) -> String {
        let last = s.trim_end_matches('/').rsplit('/').next().unwrap_or(s).to_lowercase();
        let mut t = last.trim_end_matches(".gguf").trim_end_matches("-gguf").to_string();
        if let Some(i) = t.rfind(['.', '-']) {
            let suffix = &t[i + 1..];
            let quant = suffix.starts_with('q') && suffix[1..].starts_with(|c: char| c.is_ascii_digit())
                || ["f16", "f32", "bf16"].contains(&suffix);
            if quant {
                t.truncate(i);
            }
        }
        t
    }
    let (a, b) = (norm(a), norm(b));
    a.is_empty() || b.is_empty() || a == b
}

#[cfg(test)]
mod tests {
    #[test]
    fn model_names_match_across_paths_hub_ids_and_quantizations() {
        use super::same_model_name as same;
        assert!(same("HuggingFaceTB/SmolLM2-135M-Instruct", "/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert!(same("/runs/x/model/", "/runs/x/model"));
        assert!(same("Qwen/Qwen2-0.5B-Instruct-GGUF", "qwen2-0.5b-instruct-f16.gguf"));
        assert!(!same("HuggingFaceTB/SmolLM2-135M", "/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    }
}

/// Settings of `tunebook serve`.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Model directory, .gguf file, run's model/ folder, PEFT adapter folder, Hugging Face id,
    /// or registered model (models:/name/3, name@alias).
    pub model: String,
    /// Serve an adapter too, chosen per request with "model": NAME (repeatable).
    #[arg(long = "adapter", value_name = "NAME=SOURCE")]
    pub adapters: Vec<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: a free one).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// File with API keys, one per line; then every route but /health needs `Authorization: Bearer KEY`.
    #[arg(long)]
    pub api_key_file: Option<std::path::PathBuf>,
    /// Append every request and response to the Delta table in this folder.
    #[arg(long)]
    pub inference_table: Option<std::path::PathBuf>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 8)]
    pub max_concurrency: usize,
    /// Most requests waiting for a place in the batch before new ones get 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter.
    #[arg(long)]
    pub allow_adapter_updates: bool,
    /// The base model's id in the API (default: MODEL as given).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Most prompt + completion tokens (default: the model's context length).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Record the URL in this folder once ready (used by notebook endpoints).
    #[arg(long, hide = true)]
    pub endpoint_dir: Option<std::path::PathBuf>,
    /// Multiply Q4 weights with activations rounded to 8 bits, as llama.cpp does:
    /// faster (most of all with many concurrent requests), no longer exact.
    #[arg(long)]
    pub int8_activations: bool,
}

/// The keys of an API key file: one per line, blank lines and `#` comments skipped; a
/// file without a key is an error.
pub fn read_api_keys(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the API key file {}", path.display()))?;
    let keys: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect();
    if keys.is_empty() {
        bail!("the API key file {} holds no key (one key per line)", path.display());
    }
    Ok(keys)
}

/// Runs `tunebook serve` in the foreground: prints the base URL once ready.
pub fn run_serve_cli(args: ServeArgs) -> Result<()> {
    let mut s = Serve::new(&args.model)
        .host(&args.host)
        .port(args.port)
        .max_concurrency(args.max_concurrency)
        .max_queue(args.max_queue)
        .allow_adapter_updates(args.allow_adapter_updates)
        .int8_activations(args.int8_activations);
    for a in &args.adapters {
        let (name, src) = a.split_once('=').with_context(|| format!("--adapter {a}: expected NAME=SOURCE"))?;
        if name.is_empty() || src.is_empty() {
            bail!("--adapter {a}: expected NAME=SOURCE with both parts");
        }
        s = s.adapter(name, src);
    }
    if let Some(f) = &args.api_key_file {
        s = s.api_key_file(f)?;
    }
    if let Some(t) = &args.inference_table {
        s = s.inference_table(t);
    }
    if let Some(n) = &args.served_model_name {
        s = s.served_model_name(n);
    }
    if let Some(n) = args.max_model_len {
        s = s.max_model_len(n);
    }
    eprintln!("tunebook serve: loading {}", args.model);
    if let Some(dir) = &args.endpoint_dir {
        return s.run_as_endpoint(dir);
    }
    s.run(|url| {
        use std::io::Write;
        println!("tunebook serve: ready at {url}");
        let _ = std::io::stdout().flush();
    })
}
