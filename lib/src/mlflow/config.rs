//! Where the MLflow server is and how to talk to it, read the way the Python client
//! reads it: `MLFLOW_TRACKING_URI`, `MLFLOW_REGISTRY_URI`, credentials, TLS options
//! and the HTTP retry settings.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How requests prove who is asking.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// No `Authorization` header.
    None,
    /// HTTP Basic (`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`, or
    /// `~/.mlflow/credentials`).
    Basic { username: String, password: String },
    /// `Authorization: Bearer` (`MLFLOW_TRACKING_TOKEN`).
    Bearer(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret.
        match self {
            Auth::None => f.write_str("None"),
            Auth::Basic { username, .. } => write!(f, "Basic({username}:***)"),
            Auth::Bearer(_) => f.write_str("Bearer(***)"),
        }
    }
}

impl Auth {
    /// Basic credentials if a username and a password are set (environment first,
    /// then `~/.mlflow/credentials` section `[mlflow]`), else a bearer token from
    /// `MLFLOW_TRACKING_TOKEN`, else none. This is the Python client's order.
    pub fn from_env() -> Auth {
        let (file_user, file_pass) = home_dir()
            .map(|h| read_credentials_file(&h.join(".mlflow").join("credentials")))
            .unwrap_or((None, None));
        let user = env_nonempty("MLFLOW_TRACKING_USERNAME").or(file_user);
        let pass = env_nonempty("MLFLOW_TRACKING_PASSWORD").or(file_pass);
        if let (Some(username), Some(password)) = (user, pass) {
            return Auth::Basic { username, password };
        }
        match env_nonempty("MLFLOW_TRACKING_TOKEN") {
            Some(t) => Auth::Bearer(t),
            None => Auth::None,
        }
    }

    /// True when the request carries credentials.
    pub fn is_set(&self) -> bool {
        !matches!(self, Auth::None)
    }
}

/// TLS settings: `MLFLOW_TRACKING_INSECURE_TLS`, `MLFLOW_TRACKING_SERVER_CERT_PATH`
/// (a PEM CA bundle to trust) and `MLFLOW_TRACKING_CLIENT_CERT_PATH` (a PEM file
/// with the client certificate and its private key).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    pub insecure: bool,
    pub server_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
}

impl TlsOptions {
    /// Read from the environment.
    pub fn from_env() -> Result<Self> {
        let insecure = match env_nonempty("MLFLOW_TRACKING_INSECURE_TLS").map(|v| v.to_ascii_lowercase()) {
            None => false,
            Some(v) if v == "true" || v == "1" => true,
            Some(v) if v == "false" || v == "0" => false,
            Some(v) => bail!("MLFLOW_TRACKING_INSECURE_TLS must be true or false, found {v:?}"),
        };
        let tls = TlsOptions {
            insecure,
            server_cert: env_nonempty("MLFLOW_TRACKING_SERVER_CERT_PATH").map(PathBuf::from),
            client_cert: env_nonempty("MLFLOW_TRACKING_CLIENT_CERT_PATH").map(PathBuf::from),
        };
        if tls.insecure && tls.server_cert.is_some() {
            bail!("MLFLOW_TRACKING_INSECURE_TLS and MLFLOW_TRACKING_SERVER_CERT_PATH are both set: choose one");
        }
        Ok(tls)
    }
}

/// When and how often a request is tried again. The defaults are the Python
/// client's (`MLFLOW_HTTP_REQUEST_MAX_RETRIES` 7, `..._BACKOFF_FACTOR` 2,
/// `..._BACKOFF_JITTER` 1.0, `..._TIMEOUT` 120 s): HTTP 408, 429, 500, 502, 503 and
/// 504 and dropped connections are retried, waiting `factor · 2^(n-1)` seconds
/// (capped at 120 s, plus up to `jitter` seconds) before try `n + 1`.
///
/// A server that is not listening at all is different: the error comes at once and
/// usually means a wrong URI or a stopped server, so connection failures stop being
/// retried after `connect_wait` in total (10 s by default,
/// `TUNEBOOK_MLFLOW_CONNECT_WAIT`), and the error says how to start one. The metric
/// shipper does not rely on this: it retries forever on its own thread.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub backoff_factor: f64,
    pub backoff_jitter: f64,
    pub backoff_max: Duration,
    /// Time limit of one request (connect + response).
    pub timeout: Duration,
    /// Total time spent retrying connection failures.
    pub connect_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 7,
            backoff_factor: 2.0,
            backoff_jitter: 1.0,
            backoff_max: Duration::from_secs(120),
            timeout: Duration::from_secs(120),
            connect_wait: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The defaults overridden by the `MLFLOW_HTTP_REQUEST_*` variables.
    pub fn from_env() -> Result<Self> {
        let mut p = RetryPolicy::default();
        if let Some(v) = env_parse::<u32>("MLFLOW_HTTP_REQUEST_MAX_RETRIES")? {
            p.max_retries = v;
        }
        if let Some(v) = env_parse::<f64>("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")? {
            p.backoff_factor = v;
        }
        if let Some(v) = env_parse::<f64>("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER")? {
            p.backoff_jitter = v;
        }
        if let Some(v) = env_parse::<f64>("MLFLOW_HTTP_REQUEST_TIMEOUT")? {
            p.timeout = Duration::from_secs_f64(v);
        }
        if let Some(v) = env_parse::<f64>("TUNEBOOK_MLFLOW_CONNECT_WAIT")? {
            p.connect_wait = Duration::from_secs_f64(v);
        }
        Ok(p)
    }

    /// One try, no waiting: for callers that retry themselves.
    pub fn no_retry(timeout: Duration) -> Self {
        RetryPolicy { max_retries: 0, connect_wait: Duration::ZERO, timeout, ..RetryPolicy::default() }
    }

    /// The wait before try `n + 1` (n ≥ 1), before jitter: urllib3's schedule
    /// (no wait before the first retry, then `factor · 2^(n-1)`).
    pub fn backoff(&self, n: u32) -> Duration {
        if n <= 1 {
            return Duration::ZERO;
        }
        let secs = self.backoff_factor * 2f64.powi(n as i32 - 1);
        Duration::from_secs_f64(secs.min(self.backoff_max.as_secs_f64()).max(0.0))
    }
}

/// Everything needed to reach one MLflow server.
#[derive(Clone, Debug)]
pub struct MlflowConfig {
    /// `http(s)://host[:port][/prefix]`, without a trailing slash.
    pub uri: String,
    pub auth: Auth,
    pub tls: TlsOptions,
    pub retry: RetryPolicy,
}

impl MlflowConfig {
    /// The server at `uri`, with credentials, TLS and retry settings from the
    /// environment.
    pub fn for_uri(uri: &str) -> Result<Self> {
        Ok(MlflowConfig {
            uri: normalize_uri(uri)?,
            auth: Auth::from_env(),
            tls: TlsOptions::from_env()?,
            retry: RetryPolicy::from_env()?,
        })
    }

    /// The tracking server: `uri` if given, else `MLFLOW_TRACKING_URI`.
    pub fn tracking(uri: Option<&str>) -> Result<Self> {
        match uri.map(str::to_string).or_else(tracking_uri_from_env) {
            Some(u) => Self::for_uri(&u),
            None => bail!(
                "no MLflow tracking server is configured: set MLFLOW_TRACKING_URI (e.g. `export MLFLOW_TRACKING_URI=http://127.0.0.1:5000`), \
                 or start a local one with `tunebook mlflow up`, which prints the line to paste"
            ),
        }
    }

    /// The model registry: `uri` if given, else `MLFLOW_REGISTRY_URI`, else the
    /// tracking server.
    pub fn registry(uri: Option<&str>) -> Result<Self> {
        match uri.map(str::to_string).or_else(|| env_nonempty("MLFLOW_REGISTRY_URI")) {
            Some(u) => Self::for_uri(&u),
            None => Self::tracking(None),
        }
    }
}

/// `MLFLOW_TRACKING_URI`, when set and not empty.
pub fn tracking_uri_from_env() -> Option<String> {
    env_nonempty("MLFLOW_TRACKING_URI")
}

/// Checks that `uri` is an HTTP(S) server address and strips trailing slashes.
pub fn normalize_uri(uri: &str) -> Result<String> {
    let u = uri.trim();
    if u.starts_with("http://") || u.starts_with("https://") {
        let parsed = url::Url::parse(u).with_context(|| format!("{u:?} is not a valid tracking server URL"))?;
        if parsed.host_str().is_none_or(str::is_empty) {
            bail!("{u:?} names no host: write it like http://127.0.0.1:5000");
        }
        return Ok(u.trim_end_matches('/').to_string());
    }
    if u.starts_with("databricks") {
        bail!(
            "tracking URI {u:?}: Databricks-hosted MLflow is not supported; point MLFLOW_TRACKING_URI at an MLflow server's http(s) address"
        );
    }
    bail!(
        "tracking URI {u:?} is not an http(s) address: tunebook talks to an MLflow server over its REST API. \
         Start one with `tunebook mlflow up` (sqlite and artifacts in a local folder) and use the URI it prints"
    )
}

/// `[mlflow]` `mlflow_tracking_username` / `mlflow_tracking_password` from an INI
/// file (the Python client's `~/.mlflow/credentials`).
pub fn read_credentials_file(path: &Path) -> (Option<String>, Option<String>) {
    let Ok(text) = std::fs::read_to_string(path) else { return (None, None) };
    let (mut user, mut pass, mut in_section) = (None, None, false);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') && line.ends_with(']') {
            in_section = line[1..line.len() - 1].trim() == "mlflow";
            continue;
        }
        if !in_section {
            continue;
        }
        let Some((k, v)) = line.split_once('=').or_else(|| line.split_once(':')) else { continue };
        let v = v.trim().to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "mlflow_tracking_username" if !v.is_empty() => user = Some(v),
            "mlflow_tracking_password" if !v.is_empty() => pass = Some(v),
            _ => {}
        }
    }
    (user, pass)
}

pub(crate) fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Result<Option<T>> {
    match env_nonempty(name) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid number")),
    }
}

pub(crate) fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_checked_and_normalised() {
        assert_eq!(normalize_uri("http://127.0.0.1:5000/").unwrap(), "http://127.0.0.1:5000");
        assert_eq!(normalize_uri(" https://h.example/mlflow// ").unwrap(), "https://h.example/mlflow");
        let e = normalize_uri("file:///tmp/mlruns").unwrap_err().to_string();
        assert!(e.contains("tunebook mlflow up"), "{e}");
        assert!(normalize_uri("databricks").unwrap_err().to_string().contains("Databricks"));
        assert!(normalize_uri("sqlite:///x.db").is_err());
    }

    #[test]
    fn credentials_file_section_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("credentials");
        std::fs::write(
            &p,
            "[other]\nmlflow_tracking_username = nope\n[mlflow]\n# comment\nmlflow_tracking_username = alice\nmlflow_tracking_password=pw = with equals\n",
        )
        .unwrap();
        assert_eq!(read_credentials_file(&p), (Some("alice".into()), Some("pw = with equals".into())));
        assert_eq!(read_credentials_file(&dir.path().join("missing")), (None, None));
    }

    #[test]
    fn backoff_follows_urllib3() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1), Duration::ZERO);
        assert_eq!(p.backoff(2), Duration::from_secs(4));
        assert_eq!(p.backoff(3), Duration::from_secs(8));
        assert_eq!(p.backoff(10), Duration::from_secs(120));
        assert_eq!(format!("{:?}", Auth::Basic { username: "u".into(), password: "secret".into() }), "Basic(u:***)");
    }
}
