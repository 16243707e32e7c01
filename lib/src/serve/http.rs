//! The HTTP side: axum routes, API keys, request ids, SSE streaming. Handlers parse and
//! check requests, encode prompts, hand [`Job`]s to the engine and turn its [`Event`]s
//! into OpenAI bodies; they never touch tensors.

use super::api::{self, ApiError, ChatRequest, CompletionRequest, Prompt, Sampling};
use super::engine::{Event, Finish, Job, TokenLogprob};
use super::metrics::Metrics;
use crate::model::{AdapterWeights, GenerationConfig, Model};
use axum::body::Bytes;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

/// An adapter being served.
#[derive(Clone)]
pub(crate) struct ServedAdapter {
    pub weights: Arc<AdapterWeights>,
    /// Where it was loaded from, as given.
    pub source: String,
    pub created: i64,
}

/// What exists once the model is loaded.
pub(crate) struct Ready {
    pub model: Arc<Model>,
    pub jobs: Mutex<std::sync::mpsc::Sender<Job>>,
    pub adapters: RwLock<BTreeMap<String, ServedAdapter>>,
    pub context_len: usize,
}

/// The state every handler shares.
pub(crate) struct Server {
    pub model_name: String,
    pub created: i64,
    pub keys: Vec<String>,
    pub ready: OnceLock<Ready>,
    pub metrics: Arc<Metrics>,
    /// Requests admitted and not finished.
    pub inflight: AtomicUsize,
    /// Most requests admitted at once (running + queued).
    pub max_inflight: usize,
    pub allow_adapter_updates: bool,
    pub shutting_down: AtomicBool,
    /// Set when the engine thread has ended (it never should while serving).
    pub engine_gone: AtomicBool,
    pub log: Option<super::table::InferenceLog>,
}

impl Server {
    fn ready(&self) -> Result<&Ready, ApiError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(ApiError::unavailable("The server is shutting down."));
        }
        if self.engine_gone.load(Ordering::Relaxed) {
            return Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                ..ApiError::internal("The engine thread has stopped; the server log says why. Restart the server.")
            });
        }
        self.ready.get().ok_or_else(|| ApiError::unavailable("The model is still loading; retry in a moment (GET /health says when it is ready)."))
    }

    fn model_ids(&self) -> Vec<String> {
        let mut ids = vec![self.model_name.clone()];
        if let Some(r) = self.ready.get() {
            ids.extend(r.adapters.read().unwrap_or_else(|p| p.into_inner()).keys().cloned());
        }
        ids
    }
}

/// Frees an admission slot when the request ends, however it ends.
struct Admission(Arc<Server>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Largest request body accepted.
const MAX_BODY: usize = 16 << 20;

/// The routes.
pub(crate) fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_info))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|req: Request| async move { ApiError::no_route(req.method().as_str(), req.uri().path()) })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(server.clone(), around))
        .with_state(server)
}

/// Request id, API key, and the HTTP counters, around every route.
async fn around(State(s): State<Arc<Server>>, req: Request, next: Next) -> Response {
    let handler = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "other".into());
    let method = req.method().to_string();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 256)
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let mut resp = if handler != "/health" && !s.keys.is_empty() {
        let given = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim().to_string());
        match given {
            Some(k) if s.keys.iter().any(|key| constant_time_eq(key.as_bytes(), k.as_bytes())) => next.run(req).await,
            Some(_) => ApiError::unauthorized(true).into_response(),
            None => ApiError::unauthorized(false).into_response(),
        }
    } else {
        next.run(req).await
    };
    // axum's own rejections (wrong method, body over the size limit) in OpenAI's envelope.
    let plain = !resp.headers().get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if plain && resp.status() == StatusCode::METHOD_NOT_ALLOWED {
        resp = ApiError { status: StatusCode::METHOD_NOT_ALLOWED, ..ApiError::invalid(None, format!("{method} is not allowed on {handler}: see docs/serving.md for each route's method.")) }.into_response();
    } else if plain && resp.status() == StatusCode::PAYLOAD_TOO_LARGE {
        resp = ApiError { status: StatusCode::PAYLOAD_TOO_LARGE, ..ApiError::invalid(None, format!("The request body is larger than {} MiB.", MAX_BODY >> 20)) }.into_response();
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    s.metrics.count_http(&handler, &method, resp.status().as_u16());
    resp
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(s): State<Arc<Server>>) -> Response {
    match s.ready() {
        Ok(_) => Json(json!({"status": "ok"})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(s): State<Arc<Server>>) -> Response {
    ([("content-type", "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render()).into_response()
}

fn model_card(s: &Server, id: &str) -> Option<Value> {
    let r = s.ready.get()?;
    if id == s.model_name {
        return Some(json!({"id": id, "object": "model", "created": s.created, "owned_by": "tunebook", "root": id, "parent": null, "max_model_len": r.context_len}));
    }
    let adapters = r.adapters.read().unwrap_or_else(|p| p.into_inner());
    let a = adapters.get(id)?;
    Some(json!({"id": id, "object": "model", "created": a.created, "owned_by": "tunebook", "root": a.source, "parent": s.model_name, "max_model_len": r.context_len}))
}

async fn models(State(s): State<Arc<Server>>) -> Result<Json<Value>, ApiError> {
    s.ready()?;
    let data: Vec<Value> = s.model_ids().iter().filter_map(|id| model_card(&s, id)).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn model_info(State(s): State<Arc<Server>>, axum::extract::Path(id): axum::extract::Path<String>) -> Result<Json<Value>, ApiError> {
    s.ready()?;
    model_card(&s, &id).map(Json).ok_or_else(|| ApiError::model_not_found(&id, &s.model_ids()))
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_json(&e))
}

/// The adapter a `model` field names (`None` for the base model).
fn pick_model(s: &Server, r: &Ready, model: &str) -> Result<Option<Arc<AdapterWeights>>, ApiError> {
    if model == s.model_name {
        return Ok(None);
    }
    // The guard is dropped before the error lists the ids (which reads the lock again).
    let found = r.adapters.read().unwrap_or_else(|p| p.into_inner()).get(model).map(|a| a.weights.clone());
    match found {
        Some(w) => Ok(Some(w)),
        None => Err(ApiError::model_not_found(model, &s.model_ids())),
    }
}

/// A request ready to submit, with what its response needs.
struct Prepared {
    job: Job,
    rx: UnboundedReceiver<Event>,
    admission: Admission,
    model: String,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
    started: Instant,
    request: Value,
    client_request_id: Option<String>,
}

fn prepare(s: &Arc<Server>, model: String, prompt: Vec<u32>, prompt_param: &str, sampling: &Sampling, request: Value, headers: &HeaderMap) -> Result<Prepared, ApiError> {
    let r = s.ready()?;
    let adapter = pick_model(s, r, &model)?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(Some(prompt_param.into()), format!("`{prompt_param}` encodes to no tokens: send some text.")));
    }
    if let Some(&t) = prompt.iter().find(|&&t| t as usize >= r.model.llama.config.vocab_size) {
        return Err(ApiError::invalid(Some(prompt_param.into()), format!("token id {t} is outside the vocabulary (size {}).", r.model.llama.config.vocab_size)));
    }
    let room = r.context_len.saturating_sub(prompt.len());
    let max_tokens = match sampling.max_tokens {
        Some(m) if m > room => return Err(ApiError::context_length(prompt_param, r.context_len, prompt.len(), m)),
        Some(m) => m,
        None if room == 0 => return Err(ApiError::context_length(prompt_param, r.context_len, prompt.len(), 1)),
        None => room,
    };
    let n = s.inflight.fetch_add(1, Ordering::Relaxed);
    let admission = Admission(s.clone());
    if n >= s.max_inflight {
        return Err(ApiError::overloaded(n));
    }
    let defaults = &r.model.generation;
    let config = GenerationConfig {
        max_new_tokens: max_tokens,
        temperature: sampling.temperature.unwrap_or(defaults.temperature),
        top_k: sampling.top_k.or(defaults.top_k),
        top_p: sampling.top_p.or(defaults.top_p),
        repetition_penalty: sampling.repetition_penalty.unwrap_or(defaults.repetition_penalty),
        seed: sampling.seed.unwrap_or_else(rand::random),
        eos_token_ids: vec![],
        stop_strings: sampling.stop.clone(),
        ignore_eos: sampling.ignore_eos,
    };
    let (tx, rx) = unbounded_channel();
    let started = Instant::now();
    let job = Job { prompt, max_tokens, sampling: config, logprobs: sampling.logprobs, adapter, events: tx, arrived: started };
    let client_request_id = headers.get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
    Ok(Prepared {
        job,
        rx,
        admission,
        model,
        stream: sampling.stream,
        include_usage: sampling.include_usage,
        logprobs: sampling.logprobs.is_some(),
        started,
        request,
        client_request_id,
    })
}

fn submit(s: &Server, job: Job) -> Result<(), ApiError> {
    let r = s.ready()?;
    let jobs = r.jobs.lock().unwrap_or_else(|p| p.into_inner());
    jobs.send(job).map_err(|_| ApiError::unavailable("The engine has stopped."))
}

async fn chat(State(s): State<Arc<Server>>, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        let v = parse_body(&body)?;
        let req = ChatRequest::parse(&v)?;
        let r = s.ready()?;
        let tok = r.model.tokenizer.as_ref().ok_or_else(|| ApiError::internal("the model has no tokenizer"))?;
        let prompt = tok.encode_chat(&req.messages, true).map_err(|e| ApiError::invalid(Some("messages".into()), format!("The chat template could not render these messages: {e}")))?;
        prepare(&s, req.model.clone(), prompt, "messages", &req.sampling, v, &headers)
    }
    .await;
    match result {
        Ok(p) => respond(s, p, Kind::Chat).await,
        Err(e) => {
            log_error(&s, &headers, &body, &e);
            e.into_response()
        }
    }
}

async fn completions(State(s): State<Arc<Server>>, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        let v = parse_body(&body)?;
        let req = CompletionRequest::parse(&v)?;
        let r = s.ready()?;
        let prompt = match &req.prompt {
            Prompt::Tokens(t) => t.clone(),
            Prompt::Text(text) => {
                let tok = r.model.tokenizer.as_ref().ok_or_else(|| ApiError::internal("the model has no tokenizer"))?;
                tok.encode(text, false).map_err(|e| ApiError::invalid(Some("prompt".into()), format!("The prompt could not be tokenized: {e}")))?
            }
        };
        prepare(&s, req.model.clone(), prompt, "prompt", &req.sampling, v, &headers)
    }
    .await;
    match result {
        Ok(p) => respond(s, p, Kind::Completion).await,
        Err(e) => {
            log_error(&s, &headers, &body, &e);
            e.into_response()
        }
    }
}

fn log_error(s: &Server, headers: &HeaderMap, body: &Bytes, e: &ApiError) {
    if let Some(log) = &s.log {
        let request = serde_json::from_slice::<Value>(body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
        let model = request.get("model").and_then(Value::as_str).unwrap_or("").to_string();
        log.record(super::table::LogRow::failed(headers, &model, &s.model_name, request, e));
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

fn ids(kind: Kind) -> (String, &'static str, &'static str) {
    let u = uuid::Uuid::new_v4().simple().to_string();
    match kind {
        Kind::Chat => (format!("chatcmpl-{u}"), "chat.completion", "chat.completion.chunk"),
        Kind::Completion => (format!("cmpl-{u}"), "text_completion", "text_completion"),
    }
}

async fn respond(s: Arc<Server>, p: Prepared, kind: Kind) -> Response {
    let Prepared { job, rx, admission, model, stream, include_usage, logprobs, started, request, client_request_id } = p;
    if let Err(e) = submit(&s, job) {
        return e.into_response();
    }
    let created = chrono::Utc::now().timestamp();
    let (id, object, chunk_object) = ids(kind);
    let mut log = LogCtx { server: s.clone(), model: model.clone(), request, started, client_request_id, partial: String::new(), logged: false };
    if stream {
        return stream_response(rx, admission, StreamCtx { id, object: chunk_object, created, model, kind, include_usage, logprobs, log });
    }
    let mut rx = rx;
    let mut lps = Vec::<TokenLogprob>::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text { text: t, logprobs: l } => {
                log.partial.push_str(&t);
                lps.extend(l);
            }
            Event::Done { finish, prompt_tokens, completion_tokens } => {
                drop(admission);
                let lp = logprobs.then(|| if kind == Kind::Chat { api::chat_logprobs(&lps) } else { api::completion_logprobs(&lps) });
                let text = &log.partial;
                let choice = match kind {
                    Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": finish.as_str()}),
                    Kind::Completion => json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": finish.as_str()}),
                };
                let body = json!({
                    "id": id, "object": object, "created": created, "model": model,
                    "choices": [choice], "usage": api::usage(prompt_tokens, completion_tokens), "system_fingerprint": null,
                });
                log.done(&body, prompt_tokens, completion_tokens);
                return Json(body).into_response();
            }
            Event::Failed(msg) => {
                let e = ApiError::internal(format!("Generation failed: {msg}"));
                log.failed(&e);
                return e.into_response();
            }
        }
    }
    let e = ApiError::internal("The engine ended the request without an answer.");
    log.failed(&e);
    e.into_response()
}

/// What the inference table needs of a request. A request that ends without an
/// answer (its client went away) is logged when this is dropped, with status 499
/// and the text produced so far.
struct LogCtx {
    server: Arc<Server>,
    model: String,
    request: Value,
    started: Instant,
    client_request_id: Option<String>,
    /// The answer's text so far (all of it once the request is done).
    partial: String,
    logged: bool,
}

impl LogCtx {
    fn row(&self, response: Value, prompt_tokens: usize, completion_tokens: usize) -> super::table::LogRow {
        super::table::LogRow::ok(
            self.client_request_id.clone(),
            &self.model,
            &self.server.model_name,
            self.request.clone(),
            response,
            self.started.elapsed(),
            prompt_tokens,
            completion_tokens,
        )
    }

    fn done(&mut self, response: &Value, prompt_tokens: usize, completion_tokens: usize) {
        self.logged = true;
        if let Some(log) = &self.server.log {
            log.record(self.row(response.clone(), prompt_tokens, completion_tokens));
        }
    }

    fn failed(&mut self, e: &ApiError) {
        self.logged = true;
        if let Some(log) = &self.server.log {
            let mut row = self.row(e.body(), 0, 0);
            row.status_code = e.status.as_u16() as i32;
            log.record(row);
        }
    }
}

impl Drop for LogCtx {
    fn drop(&mut self) {
        if self.logged {
            return;
        }
        if let Some(log) = &self.server.log {
            let body = json!({"error": {"message": "the client closed the connection before the answer was complete", "type": "client_closed_request", "param": null, "code": null}, "partial": self.partial});
            let mut row = self.row(body, 0, 0);
            row.status_code = 499;
            log.record(row);
        }
    }
}

struct StreamCtx {
    id: String,
    object: &'static str,
    created: i64,
    model: String,
    kind: Kind,
    include_usage: bool,
    logprobs: bool,
    log: LogCtx,
}

impl StreamCtx {
    fn chunk(&self, delta_or_text: Value, lp: Option<Value>, finish: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({"index": 0, "delta": delta_or_text, "logprobs": lp, "finish_reason": finish}),
            Kind::Completion => json!({"index": 0, "text": delta_or_text, "logprobs": lp, "finish_reason": finish}),
        };
        let mut c = json!({"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": [choice]});
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }
}

enum StreamState {
    Start,
    Running,
    Finishing(Vec<Value>),
    Over,
}

fn stream_response(rx: UnboundedReceiver<Event>, admission: Admission, ctx: StreamCtx) -> Response {
    let data = |v: &Value| SseEvent::default().data(v.to_string());
    let state = (StreamState::Start, rx, Some(admission), ctx);
    let s = futures::stream::unfold(state, move |(st, mut rx, mut adm, mut ctx)| async move {
        match st {
            StreamState::Start => {
                let first = match ctx.kind {
                    Kind::Chat => ctx.chunk(json!({"role": "assistant", "content": ""}), None, None),
                    Kind::Completion => return Some((Ok::<_, std::convert::Infallible>(SseEvent::default().comment("start")), (StreamState::Running, rx, adm, ctx))),
                };
                Some((Ok(data(&first)), (StreamState::Running, rx, adm, ctx)))
            }
            StreamState::Running => match rx.recv().await {
                Some(Event::Text { text: t, logprobs }) => {
                    let lp = ctx.logprobs.then(|| match ctx.kind {
                        Kind::Chat => api::chat_logprobs(&logprobs),
                        Kind::Completion => api::completion_logprobs(&logprobs),
                    });
                    ctx.log.partial.push_str(&t);
                    let body = match ctx.kind {
                        Kind::Chat => json!({"content": t}),
                        Kind::Completion => json!(t),
                    };
                    Some((Ok(data(&ctx.chunk(body, lp, None))), (StreamState::Running, rx, adm, ctx)))
                }
                Some(Event::Done { finish, prompt_tokens, completion_tokens }) => {
                    adm.take();
                    let empty = if ctx.kind == Kind::Chat { json!({}) } else { json!("") };
                    let last = ctx.chunk(empty, None, Some(finish.as_str()));
                    let mut rest = vec![];
                    if ctx.include_usage {
                        let mut u = json!({"id": ctx.id, "object": ctx.object, "created": ctx.created, "model": ctx.model, "choices": []});
                        u["usage"] = api::usage(prompt_tokens, completion_tokens);
                        rest.push(u);
                    }
                    let full = full_response(&ctx, &ctx.log.partial, finish, prompt_tokens, completion_tokens);
                    ctx.log.done(&full, prompt_tokens, completion_tokens);
                    Some((Ok(data(&last)), (StreamState::Finishing(rest), rx, adm, ctx)))
                }
                Some(Event::Failed(msg)) => {
                    adm.take();
                    let e = ApiError::internal(format!("Generation failed: {msg}"));
                    ctx.log.failed(&e);
                    Some((Ok(data(&e.body())), (StreamState::Finishing(vec![]), rx, adm, ctx)))
                }
                None => {
                    let e = ApiError::internal("The engine ended the request without an answer.");
                    ctx.log.failed(&e);
                    Some((Ok(data(&e.body())), (StreamState::Finishing(vec![]), rx, adm, ctx)))
                }
            },
            StreamState::Finishing(mut rest) => {
                if rest.is_empty() {
                    Some((Ok(SseEvent::default().data("[DONE]")), (StreamState::Over, rx, adm, ctx)))
                } else {
                    let v = rest.remove(0);
                    Some((Ok(data(&v)), (StreamState::Finishing(rest), rx, adm, ctx)))
                }
            }
            StreamState::Over => None,
        }
    });
    Sse::new(s).keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(10))).into_response()
}

/// The non-streamed body a stream amounts to (for the inference table).
fn full_response(ctx: &StreamCtx, text: &str, finish: Finish, prompt_tokens: usize, completion_tokens: usize) -> Value {
    let choice = match ctx.kind {
        Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish.as_str()}),
        Kind::Completion => json!({"index": 0, "text": text, "finish_reason": finish.as_str()}),
    };
    let object = if ctx.kind == Kind::Chat { "chat.completion" } else { "text_completion" };
    json!({"id": ctx.id, "object": object, "created": ctx.created, "model": ctx.model, "choices": [choice], "usage": api::usage(prompt_tokens, completion_tokens)})
}

async fn load_adapter(State(s): State<Arc<Server>>, body: Bytes) -> Result<Response, ApiError> {
    let r = s.ready()?;
    if !s.allow_adapter_updates {
        return Err(ApiError { status: StatusCode::FORBIDDEN, ..ApiError::invalid(None, "Loading adapters at run time is off: start the server with --allow-adapter-updates.") });
    }
    let v = parse_body(&body)?;
    let name = v.get("lora_name").and_then(Value::as_str).filter(|n| !n.is_empty()).ok_or_else(|| ApiError::invalid(Some("lora_name".into()), "`lora_name` is required (a string)."))?.to_string();
    let path = v.get("lora_path").and_then(Value::as_str).filter(|n| !n.is_empty()).ok_or_else(|| ApiError::invalid(Some("lora_path".into()), "`lora_path` is required (a PEFT adapter directory or a registered model)."))?.to_string();
    if name == s.model_name || r.adapters.read().unwrap_or_else(|p| p.into_inner()).contains_key(&name) {
        return Err(ApiError::invalid(Some("lora_name".into()), format!("The name `{name}` is already served: unload it first or choose another name.")));
    }
    let model = r.model.clone();
    let source = path.clone();
    let weights = tokio::task::spawn_blocking(move || super::read_adapter(&model, &source))
        .await
        .map_err(|e| ApiError::internal(format!("loading the adapter: {e}")))?
        .map_err(|e| ApiError::invalid(Some("lora_path".into()), format!("{e:#}")))?;
    let mut adapters = r.adapters.write().unwrap_or_else(|p| p.into_inner());
    // Checked again under the write lock: two loads of one name may have raced.
    match adapters.entry(name.clone()) {
        std::collections::btree_map::Entry::Occupied(_) => {
            Err(ApiError::invalid(Some("lora_name".into()), format!("The name `{name}` is already served: unload it first or choose another name.")))
        }
        std::collections::btree_map::Entry::Vacant(v) => {
            v.insert(ServedAdapter { weights: Arc::new(weights), source: path, created: chrono::Utc::now().timestamp() });
            Ok(format!("Success: LoRA adapter '{name}' added successfully.").into_response())
        }
    }
}

async fn unload_adapter(State(s): State<Arc<Server>>, body: Bytes) -> Result<Response, ApiError> {
    let r = s.ready()?;
    if !s.allow_adapter_updates {
        return Err(ApiError { status: StatusCode::FORBIDDEN, ..ApiError::invalid(None, "Unloading adapters at run time is off: start the server with --allow-adapter-updates.") });
    }
    let v = parse_body(&body)?;
    let name = v.get("lora_name").and_then(Value::as_str).ok_or_else(|| ApiError::invalid(Some("lora_name".into()), "`lora_name` is required (a string)."))?;
    // Requests in flight keep their own reference to the weights.
    let removed = r.adapters.write().unwrap_or_else(|p| p.into_inner()).remove(name);
    match removed {
        Some(_) => Ok(format!("Success: LoRA adapter '{name}' removed successfully.").into_response()),
        None => Err(ApiError::model_not_found(name, &s.model_ids())),
    }
}
