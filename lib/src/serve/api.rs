//! The OpenAI wire format: request parsing with errors that name the field, the error
//! envelope, and the response and chunk bodies.
//!
//! Requests are checked field by field instead of through a derived deserializer so that
//! every mistake gets OpenAI's 400 with `param` set to the field, and so that a parameter
//! this server cannot honour is refused rather than silently ignored.

use super::engine::TokenLogprob;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// An error in OpenAI's envelope: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (429 / 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// 400 `invalid_request_error` about `param`.
    pub fn invalid(param: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.into(),
            code: None,
            retry_after: None,
        }
    }

    /// 400 for a body that is not JSON.
    pub fn bad_json(err: &serde_json::Error) -> Self {
        let mut e = Self::invalid(None, format!(
            "We could not parse the JSON body of your request: {err} (the body must be a JSON object; check quoting and commas)."
        ));
        e.code = Some("invalid_json");
        e
    }

    /// 404 `model_not_found`.
    pub fn model_not_found(model: &str, available: &[String]) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist. Models served here: {}.", available.join(", ")),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry_after: None,
        }
    }

    /// 400 `context_length_exceeded`.
    pub fn context_length(param: &str, context: usize, prompt: usize, max_tokens: usize) -> Self {
        let mut e = Self::invalid(
            Some(param.to_string()),
            format!(
                "This model's maximum context length is {context} tokens. However, you requested {} tokens \
                 ({prompt} in the {param}, {max_tokens} in the completion). Please reduce the length of the {param} or completion (`max_tokens`).",
                prompt + max_tokens
            ),
        );
        e.code = Some("context_length_exceeded");
        e
    }

    /// 401 for a missing or wrong API key.
    pub fn unauthorized(given: bool) -> Self {
        let message = if given {
            "Incorrect API key provided. Send one of the server's keys as `Authorization: Bearer KEY`."
        } else {
            "You didn't provide an API key. Send one of the server's keys as `Authorization: Bearer KEY`."
        };
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
            retry_after: None,
        }
    }

    /// 429: the queue is full.
    pub fn overloaded(queued: usize) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!("The server is busy ({queued} requests running or queued). Retry after a moment."),
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
            retry_after: Some(1),
        }
    }

    /// 503 while the model loads or the server shuts down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("service_unavailable"),
            retry_after: Some(1),
        }
    }

    /// 500 for a failure inside the server.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 404 for a route that does not exist.
    pub fn no_route(method: &str, path: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("Invalid URL ({method} {path}): routes are /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."),
            kind: "invalid_request_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert("retry-after", HeaderValue::from(s));
        }
        r
    }
}

/// Sampling and output settings shared by both endpoints.
#[derive(Clone, Debug, Default)]
pub struct Sampling {
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// `Some(k)`: log-probabilities with `k` alternatives.
    pub logprobs: Option<usize>,
}

/// A parsed `POST /v1/chat/completions` body.
#[derive(Clone, Debug)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<crate::tokenize::Message>,
    pub sampling: Sampling,
}

/// A parsed `POST /v1/completions` body.
#[derive(Clone, Debug)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    pub sampling: Sampling,
}

/// A completion prompt: text, or token ids.
#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// Fields accepted and without effect on a single local model (documented in docs/serving.md).
const ACCEPTED_NO_EFFECT: &[&str] = &["user", "metadata", "store", "service_tier", "parallel_tool_calls"];

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

struct Fields<'a> {
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.obj.get(k).filter(|v| !v.is_null())
    }

    fn string(&self, k: &str) -> Result<Option<String>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(ApiError::invalid(Some(k.into()), format!("`{k}` must be a string, got {}.", type_name(v)))),
        }
    }

    fn boolean(&self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(ApiError::invalid(Some(k.into()), format!("`{k}` must be a boolean, got {}.", type_name(v)))),
        }
    }

    fn number(&self, k: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if !(lo..=hi).contains(&x) {
                    return Err(ApiError::invalid(Some(k.into()), format!("`{k}` must be between {lo} and {hi}, got {x}.")));
                }
                Ok(Some(x))
            }
            Some(v) => Err(ApiError::invalid(Some(k.into()), format!("`{k}` must be a number, got {}.", type_name(v)))),
        }
    }

    fn integer(&self, k: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => {
                let Some(x) = n.as_i64() else {
                    return Err(ApiError::invalid(Some(k.into()), format!("`{k}` must be an integer from {lo} to {hi}, got {n}.")));
                };
                if !(lo..=hi).contains(&x) {
                    return Err(ApiError::invalid(Some(k.into()), format!("`{k}` must be an integer from {lo} to {hi}, got {x}.")));
                }
                Ok(Some(x))
            }
            Some(v) => Err(ApiError::invalid(Some(k.into()), format!("`{k}` must be an integer, got {}.", type_name(v)))),
        }
    }

    /// Refuses a parameter this server cannot honour unless it has its no-op value.
    fn unsupported(&self, k: &str, is_noop: impl Fn(&Value) -> bool, why: &str) -> Result<(), ApiError> {
        match self.get(k) {
            Some(v) if !is_noop(v) => Err(ApiError::invalid(Some(k.into()), format!("`{k}` is not supported by this server: {why}."))),
            _ => Ok(()),
        }
    }
}

fn object(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    body.as_object().ok_or_else(|| ApiError::invalid(None, format!("The request body must be a JSON object, got {}.", type_name(body))))
}

fn check_known(obj: &Map<String, Value>, known: &[&str]) -> Result<(), ApiError> {
    for k in obj.keys() {
        if !known.contains(&k.as_str()) && !ACCEPTED_NO_EFFECT.contains(&k.as_str()) {
            return Err(ApiError::invalid(Some(k.clone()), format!("Unrecognized request argument supplied: {k}")));
        }
    }
    Ok(())
}

fn zero(v: &Value) -> bool {
    v.as_f64() == Some(0.0)
}

fn sampling(f: &Fields, chat: bool) -> Result<Sampling, ApiError> {
    let mut s = Sampling::default();
    if chat && f.get("max_completion_tokens").is_some() && f.get("max_tokens").is_some() {
        return Err(ApiError::invalid(Some("max_tokens".into()), "Send `max_completion_tokens` or `max_tokens`, not both."));
    }
    let max_key = if chat && f.get("max_completion_tokens").is_some() { "max_completion_tokens" } else { "max_tokens" };
    s.max_tokens = f.integer(max_key, 1, 1 << 30)?.map(|x| x as usize);
    s.temperature = f.number("temperature", 0.0, 2.0)?;
    s.top_p = f.number("top_p", 0.0, 1.0)?;
    if s.top_p == Some(0.0) {
        return Err(ApiError::invalid(Some("top_p".into()), "`top_p` must be greater than 0 (use temperature 0 for greedy decoding)."));
    }
    s.top_k = match f.integer("top_k", -1, 1 << 20)? {
        None | Some(-1) | Some(0) => None,
        Some(k) => Some(k as usize),
    };
    s.repetition_penalty = f.number("repetition_penalty", 0.01, 100.0)?.map(|x| x as f32);
    s.seed = match f.get("seed") {
        None => None,
        Some(Value::Number(n)) if n.is_u64() => n.as_u64(),
        Some(Value::Number(n)) if n.is_i64() => n.as_i64().map(|x| x as u64),
        Some(v) => return Err(ApiError::invalid(Some("seed".into()), format!("`seed` must be an integer, got {}.", type_name(v)))),
    };
    s.stop = match f.get("stop") {
        None => vec![],
        Some(Value::String(x)) => vec![x.clone()],
        Some(Value::Array(a)) => {
            let mut out = Vec::new();
            for (i, v) in a.iter().enumerate() {
                match v {
                    Value::String(x) => out.push(x.clone()),
                    v => return Err(ApiError::invalid(Some("stop".into()), format!("`stop[{i}]` must be a string, got {}.", type_name(v)))),
                }
            }
            if out.len() > 16 {
                return Err(ApiError::invalid(Some("stop".into()), format!("`stop` has {} strings; at most 16 are allowed.", out.len())));
            }
            out
        }
        Some(v) => return Err(ApiError::invalid(Some("stop".into()), format!("`stop` must be a string or an array of strings, got {}.", type_name(v)))),
    };
    s.ignore_eos = f.boolean("ignore_eos")?.unwrap_or(false);
    s.stream = f.boolean("stream")?.unwrap_or(false);
    if let Some(o) = f.get("stream_options") {
        let o = o.as_object().ok_or_else(|| ApiError::invalid(Some("stream_options".into()), "`stream_options` must be an object."))?;
        if !s.stream {
            return Err(ApiError::invalid(Some("stream_options".into()), "`stream_options` is only allowed when `stream` is true."));
        }
        let of = Fields { obj: o };
        check_known(o, &["include_usage"]).map_err(|mut e| {
            e.param = Some("stream_options".into());
            e
        })?;
        s.include_usage = of.boolean("include_usage")?.unwrap_or(false);
    }
    if let Some(n) = f.integer("n", 1, 128)? {
        if n != 1 {
            return Err(ApiError::invalid(Some("n".into()), format!("`n` must be 1 on this server, got {n} (send several requests instead).")));
        }
    }
    f.unsupported("presence_penalty", zero, "use `repetition_penalty` (Hugging Face's rule)")?;
    f.unsupported("frequency_penalty", zero, "use `repetition_penalty` (Hugging Face's rule)")?;
    f.unsupported("logit_bias", |v| v.as_object().is_some_and(|m| m.is_empty()), "biasing tokens is not implemented")?;
    Ok(s)
}

/// Text of a message's `content`: a string or an array of `{"type": "text", "text"}` parts.
fn content_text(v: Option<&Value>, i: usize, role: &str) -> Result<String, ApiError> {
    let p = || Some(format!("messages[{i}].content"));
    match v {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                match (kind, part.get("text").and_then(Value::as_str)) {
                    ("text", Some(t)) => out.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(p(), format!(
                            "`messages[{i}].content[{j}]` must be {{\"type\": \"text\", \"text\": ...}}: this model reads text only (got type {kind:?})."
                        )));
                    }
                }
            }
            Ok(out)
        }
        None | Some(Value::Null) => Err(ApiError::invalid(p(), format!("`messages[{i}].content` is missing (a {role} message needs text)."))),
        Some(v) => Err(ApiError::invalid(p(), format!("`messages[{i}].content` must be a string or an array of text parts, got {}.", type_name(v)))),
    }
}

impl ChatRequest {
    /// Parses and checks a chat request body.
    pub fn parse(body: &Value) -> Result<Self, ApiError> {
        let obj = object(body)?;
        check_known(obj, &[
            "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
            "seed", "stop", "stream", "stream_options", "n", "logprobs", "top_logprobs", "presence_penalty",
            "frequency_penalty", "logit_bias", "response_format", "tools", "tool_choice", "ignore_eos",
        ])?;
        let f = Fields { obj };
        let model = f.string("model")?.ok_or_else(|| ApiError::invalid(Some("model".into()), "`model` is required: the served model's id or an adapter's name (see GET /v1/models)."))?;
        let msgs = match f.get("messages") {
            Some(Value::Array(a)) if !a.is_empty() => a,
            Some(Value::Array(_)) => return Err(ApiError::invalid(Some("messages".into()), "`messages` is empty: send at least one message.")),
            Some(v) => return Err(ApiError::invalid(Some("messages".into()), format!("`messages` must be an array of messages, got {}.", type_name(v)))),
            None => return Err(ApiError::invalid(Some("messages".into()), "`messages` is required.")),
        };
        let mut messages = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            let Some(mo) = m.as_object() else {
                return Err(ApiError::invalid(Some(format!("messages[{i}]")), format!("`messages[{i}]` must be an object with `role` and `content`, got {}.", type_name(m))));
            };
            let role = match mo.get("role") {
                Some(Value::String(r)) => r.as_str(),
                _ => return Err(ApiError::invalid(Some(format!("messages[{i}].role")), format!("`messages[{i}].role` must be one of system, developer, user, assistant."))),
            };
            let role = match role {
                "system" | "developer" => "system",
                "user" | "assistant" => role,
                other => {
                    return Err(ApiError::invalid(Some(format!("messages[{i}].role")), format!(
                        "`messages[{i}].role` is {other:?}: this server accepts system, developer, user and assistant (no tool calls)."
                    )));
                }
            };
            if mo.get("tool_calls").is_some_and(|v| !v.is_null()) {
                return Err(ApiError::invalid(Some(format!("messages[{i}].tool_calls")), "Tool calls are not supported by this server."));
            }
            messages.push(crate::tokenize::Message::new(role, content_text(mo.get("content"), i, role)?));
        }
        let mut sampling = sampling(&f, true)?;
        if f.boolean("logprobs")?.unwrap_or(false) {
            sampling.logprobs = Some(f.integer("top_logprobs", 0, 20)?.unwrap_or(0) as usize);
        } else if f.get("top_logprobs").is_some() {
            return Err(ApiError::invalid(Some("top_logprobs".into()), "`top_logprobs` needs `logprobs` set to true."));
        }
        f.unsupported("response_format", |v| v.get("type").and_then(Value::as_str) == Some("text"), "only {\"type\": \"text\"} output is implemented")?;
        f.unsupported("tools", |v| v.as_array().is_some_and(|a| a.is_empty()), "tool calling is not implemented")?;
        f.unsupported("tool_choice", |v| v.as_str() == Some("none"), "tool calling is not implemented")?;
        Ok(Self { model, messages, sampling })
    }
}

impl CompletionRequest {
    /// Parses and checks a completion request body.
    pub fn parse(body: &Value) -> Result<Self, ApiError> {
        let obj = object(body)?;
        check_known(obj, &[
            "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "stream",
            "stream_options", "n", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "echo", "suffix", "best_of",
            "ignore_eos",
        ])?;
        let f = Fields { obj };
        let model = f.string("model")?.ok_or_else(|| ApiError::invalid(Some("model".into()), "`model` is required: the served model's id or an adapter's name (see GET /v1/models)."))?;
        let bad_prompt = |v: &Value| {
            let why = match v {
                Value::Array(a) if a.is_empty() => "got an empty array".to_string(),
                Value::Array(a) if a.iter().any(Value::is_array) => "got a list of lists (batched prompts): send one request per prompt".to_string(),
                Value::Array(a) => match a.iter().position(|x| !x.as_u64().is_some_and(|t| t <= u32::MAX as u64)) {
                    Some(i) => format!("`prompt[{i}]` is {}, not a token id", a[i]),
                    None => "got an array".to_string(),
                },
                v => format!("got {}", type_name(v)),
            };
            ApiError::invalid(Some("prompt".into()), format!("`prompt` must be a string, one string in an array, or an array of token ids: {why}."))
        };
        let prompt = match f.get("prompt") {
            None => return Err(ApiError::invalid(Some("prompt".into()), "`prompt` is required.")),
            Some(Value::String(s)) => Prompt::Text(s.clone()),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => Prompt::Text(a[0].as_str().unwrap_or_default().to_string()),
            Some(Value::Array(a)) if !a.is_empty() && a.iter().all(|x| x.as_u64().is_some_and(|t| t <= u32::MAX as u64)) => {
                Prompt::Tokens(a.iter().filter_map(Value::as_u64).map(|t| t as u32).collect())
            }
            Some(Value::Array(a)) if a.len() > 1 && a.iter().all(Value::is_string) => {
                return Err(ApiError::invalid(Some("prompt".into()), "Batched prompts (several strings) are not supported: send one request per prompt."));
            }
            Some(v) => return Err(bad_prompt(v)),
        };
        let mut sampling = sampling(&f, false)?;
        // OpenAI's default for the legacy completions endpoint.
        sampling.max_tokens = Some(sampling.max_tokens.unwrap_or(16));
        sampling.logprobs = f.integer("logprobs", 0, 20)?.map(|k| k as usize);
        f.unsupported("echo", |v| v.as_bool() == Some(false), "the prompt is not echoed")?;
        f.unsupported("suffix", |v| v.as_str() == Some(""), "insertion is not implemented")?;
        f.unsupported("best_of", |v| v.as_u64() == Some(1), "best_of must be 1")?;
        Ok(Self { model, prompt, sampling })
    }
}

/// The usage object.
pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn bytes(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// Chat-style `logprobs.content` entries.
pub(crate) fn chat_logprobs(lps: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|t| {
            let top: Vec<Value> = t.top.iter().map(|(tok, lp)| json!({"token": tok, "logprob": lp, "bytes": bytes(tok)})).collect();
            json!({"token": t.token, "logprob": t.logprob, "bytes": bytes(&t.token), "top_logprobs": top})
        })
        .collect();
    json!({"content": content})
}

/// Completions-style `logprobs` (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`
/// in characters from the start of the completion, as OpenAI counts).
pub(crate) fn completion_logprobs(lps: &[TokenLogprob]) -> Value {
    let text_offset: Vec<usize> = lps.iter().map(|t| t.offset).collect();
    let top: Vec<Value> = lps
        .iter()
        .map(|t| Value::Object(t.top.iter().map(|(tok, lp)| (tok.clone(), json!(lp))).collect()))
        .collect();
    json!({
        "tokens": lps.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: Value) -> ApiError {
        ChatRequest::parse(&body).unwrap_err()
    }

    #[test]
    fn each_bad_field_is_a_400_naming_the_field() {
        let ok = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let r = ChatRequest::parse(&ok).unwrap();
        assert_eq!(r.messages[0].content, "hi");
        assert!(!r.sampling.stream);
        for (body, param) in [
            (json!({"messages": [{"role": "user", "content": "hi"}]}), "model"),
            (json!({"model": 3, "messages": []}), "model"),
            (json!({"model": "m", "messages": []}), "messages"),
            (json!({"model": "m", "messages": "hi"}), "messages"),
            (json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}), "messages[0].role"),
            (json!({"model": "m", "messages": [{"role": "user"}]}), "messages[0].content"),
            (json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "messages[0].content"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}), "temperature"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}), "temperature"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), "max_tokens"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}), "max_tokens"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1]}), "stop"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}), "n"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5}), "presence_penalty"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}), "tools"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}), "stream_options"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "frobnicate": 1}), "frobnicate"),
        ] {
            let e = err(body.clone());
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
            let env = e.body();
            assert!(env["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert_eq!(env["error"]["type"], "invalid_request_error");
        }
        // No-op values of unsupported parameters are accepted.
        let r = ChatRequest::parse(&json!({
            "model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]}],
            "n": 1, "presence_penalty": 0, "logit_bias": {}, "tools": [], "user": "u1", "stream": true,
            "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 3, "stop": "\n"
        }))
        .unwrap();
        assert_eq!((r.messages[0].role.as_str(), r.messages[0].content.as_str()), ("system", "be brief"));
        assert!(r.sampling.include_usage);
        assert_eq!(r.sampling.logprobs, Some(3));
        assert_eq!(r.sampling.stop, vec!["\n".to_string()]);
    }

    #[test]
    fn completion_prompts_are_text_one_string_or_token_ids() {
        let p = |v: Value| CompletionRequest::parse(&json!({"model": "m", "prompt": v}));
        assert!(matches!(p(json!("abc")).unwrap().prompt, Prompt::Text(ref s) if s == "abc"));
        assert!(matches!(p(json!(["abc"])).unwrap().prompt, Prompt::Text(_)));
        assert!(matches!(p(json!([1, 2, 3])).unwrap().prompt, Prompt::Tokens(ref t) if t == &[1, 2, 3]));
        assert_eq!(p(json!(["a", "b"])).unwrap_err().param.as_deref(), Some("prompt"));
        assert_eq!(p(json!({"x": 1})).unwrap_err().param.as_deref(), Some("prompt"));
        assert_eq!(p(json!("abc")).unwrap().sampling.max_tokens, Some(16), "OpenAI's default for completions");
    }
}
