//! The HTTP side of the MLflow REST client: one blocking `reqwest` client with
//! authentication, TLS, the retry policy, and errors that say what the server
//! said (its `error_code` and message, or the gist of an HTML or plain-text page).

use super::config::{Auth, MlflowConfig, RetryPolicy};
use anyhow::{Context, Result, anyhow};
use reqwest::Method;
use reqwest::blocking::{RequestBuilder, Response};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// REST prefix of the tracking and registry APIs.
pub const API: &str = "/api/2.0/mlflow";
/// REST prefix of the artifact proxy.
pub const ARTIFACTS_API: &str = "/api/2.0/mlflow-artifacts/artifacts";

/// Statuses the Python client retries.
const RETRY_STATUS: [u16; 6] = [408, 429, 500, 502, 503, 504];

/// An error answered by (or on the way to) an MLflow server.
#[derive(Debug, thiserror::Error)]
pub enum MlflowError {
    /// The server answered with an MLflow error object.
    #[error("MLflow {endpoint}: {error_code} (HTTP {status}): {message}{hint}")]
    Api { endpoint: String, status: u16, error_code: String, message: String, hint: String },
    /// The server (or a proxy in front of it) answered with a non-MLflow page.
    #[error("MLflow {endpoint}: HTTP {status}: {summary}{hint}")]
    Http { endpoint: String, status: u16, summary: String, hint: String },
    /// No answer: the server is down, unreachable, or too slow.
    #[error("cannot reach the MLflow server at {uri} ({endpoint}) after {tries} tries: {cause}{hint}")]
    Unreachable { uri: String, endpoint: String, tries: u32, cause: String, hint: String },
}

impl MlflowError {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            MlflowError::Api { status, .. } | MlflowError::Http { status, .. } => Some(*status),
            MlflowError::Unreachable { .. } => None,
        }
    }

    /// MLflow's `error_code` (e.g. `RESOURCE_DOES_NOT_EXIST`), when there is one.
    pub fn error_code(&self) -> Option<&str> {
        match self {
            MlflowError::Api { error_code, .. } => Some(error_code),
            _ => None,
        }
    }

    /// The thing asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        self.error_code() == Some("RESOURCE_DOES_NOT_EXIST") || (self.error_code().is_none() && self.status() == Some(404))
    }

    /// The thing to create exists already.
    pub fn is_already_exists(&self) -> bool {
        self.error_code() == Some("RESOURCE_ALREADY_EXISTS")
    }

    /// Trying again later may work (no answer, or a status the retry policy retries).
    pub fn is_transient(&self) -> bool {
        match self {
            MlflowError::Unreachable { .. } => true,
            other => other.status().is_some_and(|s| RETRY_STATUS.contains(&s)),
        }
    }
}

/// The [`MlflowError`] inside an error chain, if any.
pub fn mlflow_error(e: &anyhow::Error) -> Option<&MlflowError> {
    e.chain().find_map(|c| c.downcast_ref::<MlflowError>())
}

/// A blocking client for one MLflow server. Cheap to clone (the connection pool is
/// shared). Not for use inside an async runtime's worker thread.
#[derive(Clone)]
pub struct MlflowClient {
    http: reqwest::blocking::Client,
    config: Arc<MlflowConfig>,
}

impl std::fmt::Debug for MlflowClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlflowClient").field("uri", &self.config.uri).field("auth", &self.config.auth).finish()
    }
}

impl MlflowClient {
    /// The tracking server named by `MLFLOW_TRACKING_URI`.
    pub fn from_env() -> Result<Self> {
        Self::with_config(MlflowConfig::tracking(None)?)
    }

    /// The server at `uri` (credentials and TLS settings from the environment).
    pub fn new(uri: &str) -> Result<Self> {
        Self::with_config(MlflowConfig::for_uri(uri)?)
    }

    /// A client for an explicit configuration.
    pub fn with_config(config: MlflowConfig) -> Result<Self> {
        let mut b = reqwest::blocking::Client::builder()
            .timeout(config.retry.timeout)
            .connect_timeout(Duration::from_secs(10).min(config.retry.timeout))
            .user_agent(format!("tunebook/{}", crate::VERSION));
        if config.tls.insecure {
            b = b.danger_accept_invalid_certs(true);
        }
        if let Some(p) = &config.tls.server_cert {
            let pem = std::fs::read(p).with_context(|| format!("MLFLOW_TRACKING_SERVER_CERT_PATH: cannot read {}", p.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("MLFLOW_TRACKING_SERVER_CERT_PATH: {} holds no PEM certificate", p.display()))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        if let Some(p) = &config.tls.client_cert {
            let pem = std::fs::read(p).with_context(|| format!("MLFLOW_TRACKING_CLIENT_CERT_PATH: cannot read {}", p.display()))?;
            let id = reqwest::Identity::from_pem(&pem).with_context(|| {
                format!("MLFLOW_TRACKING_CLIENT_CERT_PATH: {} must hold the client certificate and its private key (PEM)", p.display())
            })?;
            b = b.identity(id);
        }
        let http = b.build().context("cannot build the HTTP client")?;
        Ok(MlflowClient { http, config: Arc::new(config) })
    }

    /// The same server with another retry policy.
    pub fn with_retry(&self, retry: RetryPolicy) -> Result<Self> {
        let mut c = (*self.config).clone();
        c.retry = retry;
        Self::with_config(c)
    }

    /// The server's base URI.
    pub fn uri(&self) -> &str {
        &self.config.uri
    }

    /// The underlying HTTP client, without authentication: send what it builds
    /// through [`MlflowClient::send`].
    pub(crate) fn raw(&self) -> &reqwest::blocking::Client {
        &self.http
    }

    /// The configuration in use.
    pub fn config(&self) -> &MlflowConfig {
        &self.config
    }

    /// `GET {API}{endpoint}?query`, decoded.
    pub fn get<T: DeserializeOwned>(&self, endpoint: &str, query: &[(&str, &str)]) -> Result<T> {
        let url = format!("{}{API}{endpoint}", self.config.uri);
        let resp = self.send(endpoint, || self.http.get(&url).query(query))?;
        decode(endpoint, resp)
    }

    /// `POST`/`PATCH`/`DELETE {API}{endpoint}` with a JSON body, decoded.
    pub fn call<T: DeserializeOwned>(&self, method: Method, endpoint: &str, body: &Value) -> Result<T> {
        let url = format!("{}{API}{endpoint}", self.config.uri);
        let bytes = serde_json::to_vec(body)?;
        let resp = self.send(endpoint, || {
            self.http.request(method.clone(), &url).header("Content-Type", "application/json").body(bytes.clone())
        })?;
        decode(endpoint, resp)
    }

    /// `POST {API}{endpoint}` with a JSON body.
    pub fn post<T: DeserializeOwned>(&self, endpoint: &str, body: &Value) -> Result<T> {
        self.call(Method::POST, endpoint, body)
    }

    /// `POST {uri}{path}` with a JSON body, for routes outside `/api/2.0/mlflow`
    /// (e.g. `/api/3.0/mlflow/traces`), decoded.
    pub fn post_path<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T> {
        let url = format!("{}{path}", self.config.uri);
        let bytes = serde_json::to_vec(body)?;
        let resp = self.send(path, || self.http.post(&url).header("Content-Type", "application/json").body(bytes.clone()))?;
        decode(path, resp)
    }

    /// `GET {uri}/health` once, without retries: true when the server answers `OK`.
    pub fn is_healthy(&self) -> bool {
        self.http
            .get(format!("{}/health", self.config.uri))
            .timeout(Duration::from_secs(5))
            .send()
            .is_ok_and(|r| r.status().is_success())
    }

    /// Sends the request `build` makes (called again for each try), with
    /// authentication and the retry policy. Any non-success answer becomes an
    /// [`MlflowError`].
    pub fn send(&self, endpoint: &str, build: impl Fn() -> RequestBuilder) -> Result<Response> {
        let policy = &self.config.retry;
        let started = Instant::now();
        let mut tries = 0u32;
        loop {
            tries += 1;
            let req = match &self.config.auth {
                Auth::None => build(),
                Auth::Basic { username, password } => build().basic_auth(username, Some(password)),
                Auth::Bearer(t) => build().bearer_auth(t),
            };
            let retries_left = tries <= policy.max_retries;
            let wait = |retry_after: Option<Duration>| {
                let base = policy.backoff(tries).max(retry_after.unwrap_or_default());
                let jitter = if policy.backoff_jitter > 0.0 { rand::random::<f64>() * policy.backoff_jitter } else { 0.0 };
                std::thread::sleep(base + Duration::from_secs_f64(if base.is_zero() { 0.0 } else { jitter }));
            };
            match req.send() {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    if RETRY_STATUS.contains(&status) && retries_left {
                        let retry_after = resp
                            .headers()
                            .get("Retry-After")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.trim().parse::<f64>().ok())
                            .map(|s| Duration::from_secs_f64(s.min(policy.backoff_max.as_secs_f64())));
                        drop(resp);
                        wait(retry_after);
                        continue;
                    }
                    return Err(self.error_from_response(endpoint, resp).into());
                }
                Err(e) => {
                    let connect = e.is_connect();
                    let may_retry = retries_left && (!connect || started.elapsed() < policy.connect_wait);
                    if may_retry {
                        if connect {
                            // Nothing listening: short, steady waits within connect_wait.
                            std::thread::sleep(Duration::from_millis(500).min(policy.connect_wait));
                        } else {
                            wait(None);
                        }
                        continue;
                    }
                    let hint = if connect {
                        format!(
                            ". Is the server running and is the URI right? Start a local one with `tunebook mlflow up`, or fix MLFLOW_TRACKING_URI (now {})",
                            self.config.uri
                        )
                    } else if e.is_timeout() {
                        format!(". It did not answer within {:?} (MLFLOW_HTTP_REQUEST_TIMEOUT)", policy.timeout)
                    } else {
                        String::new()
                    };
                    return Err(MlflowError::Unreachable {
                        uri: self.config.uri.clone(),
                        endpoint: endpoint.to_string(),
                        tries,
                        cause: error_chain(&e),
                        hint,
                    }
                    .into());
                }
            }
        }
    }

    fn error_from_response(&self, endpoint: &str, resp: Response) -> MlflowError {
        let status = resp.status().as_u16();
        let www_auth = resp.headers().get("WWW-Authenticate").is_some();
        let content_type =
            resp.headers().get("Content-Type").and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
        let body = resp.text().unwrap_or_default();
        error_from_body(endpoint, status, &content_type, &body, self.config.auth.is_set(), www_auth, &self.config.uri)
    }
}

/// Builds the error for a non-success answer (kept apart from the HTTP types so it
/// can be tested on captured bodies).
pub(crate) fn error_from_body(
    endpoint: &str,
    status: u16,
    content_type: &str,
    body: &str,
    sent_credentials: bool,
    asks_basic_auth: bool,
    uri: &str,
) -> MlflowError {
    let hint = match status {
        401 if sent_credentials => {
            ". The server refused the credentials: check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN, or ~/.mlflow/credentials)".to_string()
        }
        401 => format!(
            ". The server asks for credentials{}: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), or put them in ~/.mlflow/credentials under [mlflow]",
            if asks_basic_auth { " (HTTP Basic)" } else { "" }
        ),
        403 => ". Permission denied: the user lacks a permission on this resource, or the server rejected the request's Host or Origin (see the server's --allowed-hosts / --cors-allowed-origins)".to_string(),
        404 | 405 if !body.trim_start().starts_with('{') => format!(
            ". No such endpoint: is {uri} an MLflow server (3.x), with the right path prefix?"
        ),
        _ => String::new(),
    };
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        if let Some(code) = v.get("error_code").and_then(Value::as_str) {
            let message = v.get("message").and_then(Value::as_str).unwrap_or("").to_string();
            return MlflowError::Api { endpoint: endpoint.to_string(), status, error_code: code.to_string(), message, hint };
        }
    }
    let summary = summarize_body(content_type, body);
    MlflowError::Http { endpoint: endpoint.to_string(), status, summary, hint }
}

/// The gist of an error page: HTML tags and scripts removed, whitespace folded,
/// at most 300 characters.
pub(crate) fn summarize_body(content_type: &str, body: &str) -> String {
    let text = if content_type.contains("html") || body.trim_start().starts_with('<') {
        let mut out = String::with_capacity(body.len());
        let lower = body.to_ascii_lowercase();
        let mut i = 0;
        while i < body.len() {
            if body.as_bytes()[i] == b'<' {
                // Skip <script>/<style> blocks entirely, other tags up to '>'.
                let skip_to = ["script", "style", "title"].iter().find_map(|t| {
                    lower[i + 1..].starts_with(t).then(|| lower[i..].find(&format!("</{t}>")).map(|e| i + e + t.len() + 3))
                });
                match skip_to.flatten() {
                    Some(end) => i = end,
                    None => match body[i..].find('>') {
                        Some(e) => i += e + 1,
                        None => break,
                    },
                }
                out.push(' ');
            } else {
                let ch = body[i..].chars().next().unwrap();
                out.push(ch);
                i += ch.len_utf8();
            }
        }
        out.replace("&nbsp;", " ").replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&amp;", "&")
    } else {
        body.to_string()
    };
    let folded = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let folded = if folded.is_empty() { "(empty body)".to_string() } else { folded };
    if folded.chars().count() > 300 { format!("{}…", folded.chars().take(300).collect::<String>()) } else { folded }
}

fn decode<T: DeserializeOwned>(endpoint: &str, resp: Response) -> Result<T> {
    let text = resp.text().with_context(|| format!("MLflow {endpoint}: the answer was cut off"))?;
    let text = if text.trim().is_empty() { "{}" } else { &text };
    serde_json::from_str(text).map_err(|e| {
        anyhow!("MLflow {endpoint}: unexpected answer ({e}): {}", summarize_body("", text))
    })
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        src = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_keep_code_and_message() {
        let e = error_from_body(
            "/registered-models/get",
            404,
            "application/json",
            r#"{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Registered Model with name=nope not found"}"#,
            false,
            false,
            "http://h",
        );
        assert!(e.is_not_found());
        assert_eq!(e.error_code(), Some("RESOURCE_DOES_NOT_EXIST"));
        let s = e.to_string();
        assert!(s.contains("RESOURCE_DOES_NOT_EXIST") && s.contains("name=nope not found"), "{s}");
    }

    #[test]
    fn html_and_plain_pages_are_summarised_with_a_hint() {
        let page = "<!doctype html><html><head><title>404 Not Found</title><style>p{}</style></head><body><h1>Not Found</h1><p>The requested URL was not found on the server.</p></body></html>";
        let e = error_from_body("/runs/get", 404, "text/html; charset=utf-8", page, false, false, "http://h/prefix");
        let s = e.to_string();
        assert!(s.contains("Not Found The requested URL was not found"), "{s}");
        assert!(s.contains("is http://h/prefix an MLflow server"), "{s}");
        assert!(!s.contains('<'), "{s}");
        let e = error_from_body("/x", 401, "text/html", "You are not authenticated. Please see ...", false, true, "http://h");
        assert!(e.to_string().contains("MLFLOW_TRACKING_USERNAME"), "{e}");
        let e = error_from_body("/x", 401, "text/html", "You are not authenticated.", true, true, "http://h");
        assert!(e.to_string().contains("refused the credentials"), "{e}");
        let e = error_from_body("/x", 403, "text/plain", "Permission denied", true, false, "http://h");
        assert!(e.to_string().contains("Permission denied") && e.to_string().contains("allowed-hosts"), "{e}");
        assert!(!e.is_transient());
        let e = error_from_body("/x", 503, "text/plain", "", false, false, "http://h");
        assert!(e.is_transient() && e.to_string().contains("(empty body)"));
    }
}
