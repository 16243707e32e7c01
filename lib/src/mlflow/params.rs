//! Fitting params, tags and metric names into MLflow's limits, and keeping secrets
//! out of them.
//!
//! MLflow accepts keys of at most 250 characters made of letters, digits and
//! `_ - . space : /`; param values of at most 6000 characters and tag values of at
//! most 8000 (longer ones are cut by the server without a word). What tunebook
//! does instead, so nothing is lost or changed silently:
//!
//! - **Keys** with other characters get `_` in their place; keys over 250
//!   characters keep their first 241 characters plus `~` and 8 hex digits of a hash
//!   of the whole key. Two keys that become equal this way are told apart the same
//!   way.
//! - **Long values** are split into chunks: `KEY` holds the first 6000 (8000 for
//!   tags) characters, `KEY:2`, `KEY:3`, ... the rest, in order; concatenating them
//!   gives the value back ([`join_split_value`] does it).
//! - **Secrets** are dropped: a key whose words name a credential (`token`,
//!   `password`, `secret`, `api_key`, `access_key`, `private_key`, `credentials`,
//!   `auth`, ...) or a value that looks like a known kind of token (Hugging Face
//!   `hf_…`, Databricks `dapi…`, OpenAI `sk-…`, GitHub `ghp_…`, AWS `AKIA…`). The
//!   dropped keys (never their values) are listed in the tag
//!   `tunebook.params_dropped`. Counting words avoids false alarms such as
//!   `max_new_tokens` or `tokenizer`.

use std::collections::HashMap;

/// Longest key MLflow accepts (characters).
pub const MAX_KEY_LEN: usize = 250;
/// Longest param value MLflow stores whole (characters).
pub const MAX_PARAM_VALUE_LEN: usize = 6000;
/// Longest tag value MLflow stores whole (characters).
pub const MAX_TAG_VALUE_LEN: usize = 8000;
/// Params per `log-batch` request.
pub const MAX_PARAMS_PER_BATCH: usize = 100;
/// Tags per `log-batch` request.
pub const MAX_TAGS_PER_BATCH: usize = 100;
/// Metrics per `log-batch` request.
pub const MAX_METRICS_PER_BATCH: usize = 1000;
/// The tag listing the keys of params dropped as secrets.
pub const DROPPED_TAG: &str = "tunebook.params_dropped";

fn key_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' ' | ':' | '/')
}

fn short_hash(s: &str) -> String {
    // FNV-1a 64, printed as 8 hex digits: stable across versions and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:08x}", (h >> 32) ^ (h & 0xffff_ffff))
}

/// A key MLflow accepts for `key`: bad characters become `_`, an over-long key is
/// shortened with a hash of the original (see the module docs).
pub fn sanitize_key(key: &str) -> String {
    sanitize_key_within(key, MAX_KEY_LEN)
}

fn sanitize_key_within(key: &str, max: usize) -> String {
    let mut k: String = key.chars().map(|c| if key_char_ok(c) { c } else { '_' }).collect();
    if k.is_empty() {
        k = "_".into();
    }
    if k.chars().count() > max {
        let keep: String = k.chars().take(max - 9).collect();
        k = format!("{keep}~{}", short_hash(key));
    }
    k
}

const SECRET_WORDS: &[&str] = &[
    "token", "tokens_secret", "password", "passwd", "pwd", "secret", "secrets", "apikey", "credential", "credentials",
    "auth", "authorization", "bearer", "cookie", "passphrase",
];
const SECRET_PAIRS: &[(&str, &str)] = &[
    ("api", "key"),
    ("access", "key"),
    ("secret", "key"),
    ("private", "key"),
    ("signing", "key"),
    ("encryption", "key"),
    ("client", "secret"),
    ("session", "key"),
    ("sas", "key"),
];

/// The lower-case words of a key (split on non-alphanumerics and camelCase).
fn words(key: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut prev_lower = false;
    for c in key.chars() {
        if !c.is_alphanumeric() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            prev_lower = false;
            continue;
        }
        if c.is_uppercase() && prev_lower && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        prev_lower = c.is_lowercase() || c.is_ascii_digit();
        cur.extend(c.to_lowercase());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// True when a param named `key` with this value must not be logged.
pub fn is_secret(key: &str, value: &str) -> bool {
    let w = words(key);
    if w.iter().any(|x| SECRET_WORDS.contains(&x.as_str())) {
        return true;
    }
    if w.windows(2).any(|p| SECRET_PAIRS.contains(&(p[0].as_str(), p[1].as_str()))) {
        return true;
    }
    looks_like_token(value)
}

fn looks_like_token(v: &str) -> bool {
    let v = v.trim();
    let rest_ok = |prefix: &str, min: usize, f: fn(char) -> bool| {
        v.strip_prefix(prefix).is_some_and(|r| r.chars().count() >= min && r.chars().all(f) && !r.contains(' '))
    };
    let alnum = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    rest_ok("hf_", 30, alnum)
        || rest_ok("dapi", 32, |c| c.is_ascii_hexdigit() || c == '-')
        || rest_ok("sk-", 20, alnum)
        || rest_ok("ghp_", 30, alnum)
        || rest_ok("github_pat_", 30, alnum)
        || rest_ok("xoxb-", 20, alnum)
        || (rest_ok("AKIA", 16, |c| c.is_ascii_uppercase() || c.is_ascii_digit()) && v.len() == 20)
        || v.starts_with("-----BEGIN") && v.contains("PRIVATE KEY")
}

/// Splits `value` into chunks of at most `max` characters logged as `key`,
/// `key:2`, `key:3`, ... (one pair when it fits).
pub fn split_value(key: &str, value: &str, max: usize) -> Vec<(String, String)> {
    let chars: Vec<char> = value.chars().collect();
    if chars.len() <= max {
        return vec![(key.to_string(), value.to_string())];
    }
    let n = chars.len().div_ceil(max);
    // Room for the ":N" suffix within the key limit.
    let suffix_len = 1 + n.to_string().len();
    let base = if key.chars().count() + suffix_len > MAX_KEY_LEN { sanitize_key_within(key, MAX_KEY_LEN - suffix_len) } else { key.to_string() };
    chars
        .chunks(max)
        .enumerate()
        .map(|(i, c)| (if i == 0 { base.clone() } else { format!("{base}:{}", i + 1) }, c.iter().collect()))
        .collect()
}

/// The value [`split_value`] split, put back together from a run's params.
pub fn join_split_value(params: &HashMap<String, String>, key: &str) -> Option<String> {
    let mut out = params.get(key)?.clone();
    for i in 2.. {
        match params.get(&format!("{key}:{i}")) {
            Some(p) => out.push_str(p),
            None => break,
        }
    }
    Some(out)
}

/// Params or tags fitted to MLflow's limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fitted {
    /// What to log.
    pub entries: Vec<(String, String)>,
    /// Keys dropped as secrets (values never kept).
    pub dropped: Vec<String>,
    /// Keys whose value was split into chunks.
    pub split: Vec<String>,
    /// Keys renamed (original, new).
    pub renamed: Vec<(String, String)>,
}

/// Fits params: secrets dropped, keys sanitised, long values split (see the module
/// docs). Later duplicates of a key replace earlier ones.
pub fn fit_params(params: &[(String, String)]) -> Fitted {
    fit(params, MAX_PARAM_VALUE_LEN, true)
}

/// Fits tags like [`fit_params`], with MLflow's longer tag limit; secrets are not
/// looked for (tags are set by code, not copied from a user's config).
pub fn fit_tags(tags: &[(String, String)]) -> Fitted {
    fit(tags, MAX_TAG_VALUE_LEN, false)
}

fn fit(items: &[(String, String)], max_value: usize, drop_secrets: bool) -> Fitted {
    let mut out = Fitted::default();
    // Last value wins for a repeated key, keeping first-seen order.
    let mut latest: Vec<(String, String)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (k, v) in items {
        match index.get(k.as_str()) {
            Some(&i) => latest[i].1 = v.clone(),
            None => {
                index.insert(k, latest.len());
                latest.push((k.clone(), v.clone()));
            }
        }
    }
    let mut used: HashMap<String, String> = HashMap::new(); // sanitised key -> original
    for (k, v) in latest {
        if drop_secrets && is_secret(&k, &v) {
            out.dropped.push(k);
            continue;
        }
        let mut key = sanitize_key(&k);
        if let Some(orig) = used.get(&key) {
            if orig != &k {
                key = sanitize_key(&format!("{}~{}", key.chars().take(MAX_KEY_LEN - 9).collect::<String>(), short_hash(&k)));
            }
        }
        used.insert(key.clone(), k.clone());
        if key != k {
            out.renamed.push((k.clone(), key.clone()));
        }
        let parts = split_value(&key, &v, max_value);
        if parts.len() > 1 {
            out.split.push(key.clone());
        }
        out.entries.extend(parts);
    }
    out
}

/// Flattens a JSON configuration into dotted `(key, value)` params: objects by
/// key (`lora.r`), arrays by index (`targets.0`) when they hold objects, otherwise
/// as one JSON value; strings unquoted; nulls skipped.
pub fn flatten_json(value: &serde_json::Value) -> Vec<(String, String)> {
    fn go(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        use serde_json::Value as V;
        let join = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
        match v {
            V::Null => {}
            V::Object(m) => {
                for (k, x) in m {
                    go(&join(k), x, out);
                }
            }
            V::Array(a) if a.iter().any(|x| x.is_object()) => {
                for (i, x) in a.iter().enumerate() {
                    go(&join(&i.to_string()), x, out);
                }
            }
            V::String(s) => out.push((prefix.to_string(), s.clone())),
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut out = Vec::new();
    go("", value, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn secrets_are_dropped_by_words_not_substrings() {
        for k in ["hf_token", "HF_TOKEN", "mlflow.password", "db.apiKey", "aws_access_key_id", "openai_api_key", "client_secret", "auth"] {
            assert!(is_secret(k, "x"), "{k} should be a secret");
        }
        for k in ["max_new_tokens", "tokenizer", "tokens_per_sec", "lora.r", "key_column", "monkey", "data.keys"] {
            assert!(!is_secret(k, "x"), "{k} is not a secret");
        }
        assert!(is_secret("note", "hf_abcdefghijklmnopqrstuvwxyzABCDEFGH"));
        assert!(is_secret("x", "dapi0123456789abcdef0123456789abcdef"));
        assert!(!is_secret("x", "sk-short"));
        let f = fit_params(&kv(&[("lr", "1e-4"), ("hub.token", "hf_secretsecret"), ("max_new_tokens", "256")]));
        assert_eq!(f.entries, kv(&[("lr", "1e-4"), ("max_new_tokens", "256")]));
        assert_eq!(f.dropped, vec!["hub.token".to_string()]);
    }

    #[test]
    fn keys_are_sanitised_and_long_ones_hashed() {
        assert_eq!(sanitize_key("loss/train/total"), "loss/train/total");
        assert_eq!(sanitize_key("a[0]=b"), "a_0__b");
        let long = "k".repeat(300);
        let s = sanitize_key(&long);
        assert_eq!(s.chars().count(), MAX_KEY_LEN);
        assert!(s.contains('~'));
        assert_ne!(s, sanitize_key(&format!("{}x", "k".repeat(299))), "different long keys stay different");
        // Two keys that sanitise alike are told apart.
        let f = fit_params(&kv(&[("a[b]", "1"), ("a_b_", "2")]));
        assert_eq!(f.entries.len(), 2);
        assert_ne!(f.entries[0].0, f.entries[1].0);
        assert!(f.entries.iter().all(|(k, _)| k.chars().all(key_char_ok)));
    }

    #[test]
    fn long_values_are_split_and_join_back() {
        let value: String = (0..14_500).map(|i| char::from(b'a' + (i % 26) as u8)).collect::<String>() + "é";
        let f = fit_params(&kv(&[("data.prompt_template", &value), ("lr", "2")]));
        assert_eq!(f.split, vec!["data.prompt_template".to_string()]);
        let keys: Vec<&str> = f.entries.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, vec!["data.prompt_template", "data.prompt_template:2", "data.prompt_template:3", "lr"]);
        assert!(f.entries.iter().all(|(_, v)| v.chars().count() <= MAX_PARAM_VALUE_LEN));
        let map: HashMap<String, String> = f.entries.into_iter().collect();
        assert_eq!(join_split_value(&map, "data.prompt_template").unwrap(), value);
        // Tags have the larger limit.
        assert_eq!(fit_tags(&kv(&[("t", &"x".repeat(7000))])).entries.len(), 1);
    }

    #[test]
    fn json_configs_flatten_to_dotted_keys() {
        let v = serde_json::json!({"lr": 1e-4, "lora": {"r": 8, "targets": ["q_proj", "v_proj"]}, "name": "x", "none": null,
                                   "evals": [{"p": "hi"}]});
        assert_eq!(
            flatten_json(&v),
            kv(&[("lr", "0.0001"), ("lora.r", "8"), ("lora.targets", "[\"q_proj\",\"v_proj\"]"), ("name", "x"), ("evals.0.p", "hi")])
        );
    }
}
