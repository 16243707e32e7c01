//! The answers of one model: local models through the serving engine, endpoints through
//! `/v1/chat/completions`.

use super::result::Answer;
use super::{EvalRow, ModelSpec};
use crate::model::GenerationConfig;
use crate::serve::{BatchPrompt, generate_batch};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Generation settings shared by every model of an evaluation.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub seed: u64,
    pub temperature: f64,
    pub batch_size: usize,
    pub concurrency: usize,
    pub api_key: Option<String>,
    /// Prompts through the model's chat template (else plain text).
    pub chat_template: bool,
    /// Between a prompt and a scored continuation.
    pub target_delimiter: String,
    /// Some metric needs generated answers.
    pub generate: bool,
    /// Some metric needs the choices' log-likelihoods.
    pub choices: bool,
    /// Some metric needs the reference's log-likelihood.
    pub references: bool,
}

impl Settings {
    fn generation(&self) -> GenerationConfig {
        let mut g = if self.temperature > 0.0 {
            GenerationConfig::sampled(self.max_new_tokens, self.temperature, self.seed)
        } else {
            GenerationConfig::greedy(self.max_new_tokens)
        };
        g.seed = self.seed;
        g.stop_strings = self.stop.clone();
        g
    }
}

/// Whether `source` names an OpenAI-compatible endpoint.
pub(crate) fn is_endpoint(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

/// Every model's answers to every row (in the order of `specs`). Endpoints are asked one
/// after the other. Local models that are adapters of the same base (a run's or a PEFT
/// folder's `base_model_name_or_path`) share one load of that base: each adapter is
/// applied unmerged to its own rows, and all their rows run through one engine, so the
/// base's and the fine-tune's answers share every decode step, as `tunebook serve` runs them.
pub(crate) fn answers_all(specs: &[ModelSpec], rows: &[EvalRow], s: &Settings) -> Result<Vec<Vec<Answer>>> {
    let mut out: Vec<Option<Vec<Answer>>> = vec![None; specs.len()];
    let named = |spec: &ModelSpec| format!("model `{}` ({})", spec.name, spec.source);
    for (i, spec) in specs.iter().enumerate() {
        if is_endpoint(&spec.source) {
            out[i] = Some(endpoint_answers(spec, rows, s).with_context(|| named(spec))?);
        }
    }
    let plans: Vec<(usize, String, Option<std::path::PathBuf>)> =
        specs.iter().enumerate().filter(|(_, spec)| !is_endpoint(&spec.source)).map(|(i, spec)| {
            let (base, adapter) = local_plan(&spec.source);
            (i, base, adapter)
        }).collect();
    let mut bases: Vec<&str> = vec![];
    for (_, b, _) in &plans {
        if !bases.contains(&b.as_str()) {
            bases.push(b);
        }
    }
    for base in bases {
        let members: Vec<&(usize, String, Option<std::path::PathBuf>)> = plans.iter().filter(|p| p.1 == base).collect();
        let first = &specs[members[0].0];
        let model = Arc::new(crate::serve::load_model(base).with_context(|| named(first))?);
        let mut adapters = Vec::with_capacity(members.len());
        for (i, _, dir) in &members {
            adapters.push(match dir {
                Some(d) => Some(Arc::new(crate::serve::read_adapter(&model, &d.display().to_string()).with_context(|| named(&specs[*i]))?)),
                None => None,
            });
        }
        let answers = local_answers(&model, &adapters, rows, s).with_context(|| {
            members.iter().map(|m| named(&specs[m.0])).collect::<Vec<_>>().join(", ")
        })?;
        for ((i, _, _), a) in members.iter().zip(answers) {
            out[*i] = Some(a);
        }
    }
    Ok(out.into_iter().map(|a| a.expect("every model answered")).collect())
}

/// What to load for a local model: the base, and the adapter folder applied unmerged on
/// top of it when the source is a PEFT adapter (a run's `model/` or a folder).
fn local_plan(source: &str) -> (String, Option<std::path::PathBuf>) {
    let path = local_model_path(source);
    let p = Path::new(&path);
    if crate::model::lora::is_adapter_dir(p) {
        if let Ok(base) = crate::model::lora::adapter_base_model(p) {
            return (base, Some(p.to_path_buf()));
        }
    }
    (path, None)
}

/// A run's name or folder is its trained model; anything else is what `serve` loads.
pub(crate) fn local_model_path(source: &str) -> String {
    match crate::runs::run_dir_of(source) {
        Some(d) if d.join("model").is_dir() => d.join("model").display().to_string(),
        _ => source.to_string(),
    }
}

/// A prompt as plain text: its messages' contents, separated by blank lines.
fn raw_prompt(prompt: &[crate::tokenize::Message]) -> String {
    prompt.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n")
}

/// The answers of one base model under each of `adapters` (`None`: the base itself).
fn local_answers(model: &Arc<crate::model::Model>, adapters: &[Option<Arc<crate::model::AdapterWeights>>], rows: &[EvalRow], s: &Settings) -> Result<Vec<Vec<Answer>>> {
    let Some(tok) = model.tokenizer.clone() else {
        bail!("the model has no tokenizer (load it from a folder with tokenizer.json, or a GGUF)");
    };
    // The prompt's text and ids: the chat template's rendering (with the assistant header)
    // or the plain text with the tokenizer's special tokens.
    let mut contexts = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let (text, ids) = if s.chat_template {
            let text = tok.apply_chat_template(&r.prompt, true).with_context(|| format!("row {i}: rendering the prompt with the model's chat template"))?;
            let ids = tok.encode(&text, false)?;
            (text, ids)
        } else {
            let text = raw_prompt(&r.prompt);
            let ids = tok.encode(&text, true)?;
            (text, ids)
        };
        contexts.push((text, ids));
    }
    let n = rows.len();
    let mut all: Vec<Answer> = if s.generate {
        let prompts: Vec<BatchPrompt> = adapters
            .iter()
            .flat_map(|a| contexts.iter().map(move |(_, ids)| BatchPrompt { tokens: ids.clone(), adapter: a.clone() }))
            .collect();
        generate_batch(model.clone(), &prompts, &s.generation(), s.batch_size)?
            .into_iter()
            .map(|a| Answer {
                text: a.text,
                truncated: a.truncated,
                prompt_tokens: a.prompt_tokens,
                completion_tokens: a.completion_tokens,
                latency_s: a.latency.as_secs_f64(),
                ..Answer::default()
            })
            .collect()
    } else {
        adapters.iter().flat_map(|_| contexts.iter().map(|(_, ids)| Answer { prompt_tokens: ids.len(), ..Answer::default() })).collect()
    };
    if s.choices || s.references {
        for (m, adapter) in adapters.iter().enumerate() {
            score_likelihoods(model, &tok, adapter.as_deref(), rows, &contexts, &mut all[m * n..(m + 1) * n], s)?;
        }
    }
    let mut out = Vec::with_capacity(adapters.len());
    for _ in adapters {
        let rest = all.split_off(n);
        out.push(std::mem::replace(&mut all, rest));
    }
    Ok(out)
}

/// Fills in the choices' and the reference's log-likelihoods of each row.
fn score_likelihoods(
    model: &crate::model::Model,
    tok: &crate::tokenize::Tokenizer,
    adapter: Option<&crate::model::AdapterWeights>,
    rows: &[EvalRow],
    contexts: &[(String, Vec<u32>)],
    answers: &mut [Answer],
    s: &Settings,
) -> Result<()> {
    for (i, (r, (ctx_text, ctx_ids))) in rows.iter().zip(contexts).enumerate() {
        crate::interrupt::check()?;
        // lm-evaluation-harness's split: the whole text is tokenized and the context's
        // tokens cut off, so a token spanning the boundary is not split differently.
        let cont_ids = |cont: &str| -> Result<Vec<u32>> {
            let whole = tok.encode(&format!("{ctx_text}{cont}"), !s.chat_template)?;
            Ok(if whole.starts_with(ctx_ids) { whole[ctx_ids.len()..].to_vec() } else { tok.encode(cont, false)? })
        };
        let mut conts = Vec::new();
        if s.choices {
            for c in &r.choices {
                conts.push(cont_ids(&format!("{}{c}", s.target_delimiter))?);
            }
        }
        if s.references {
            let reference = r.references.first().map(String::as_str).unwrap_or("");
            let text = if s.chat_template {
                // The answer as the template writes it, with its end-of-turn token.
                let mut conv = r.prompt.clone();
                conv.push(crate::tokenize::Message::assistant(reference));
                let full = tok.apply_chat_template(&conv, false)?;
                match full.strip_prefix(ctx_text.as_str()) {
                    Some(rest) => rest.trim_end().to_string(),
                    None => format!("{}{reference}", s.target_delimiter),
                }
            } else {
                format!("{}{reference}", s.target_delimiter)
            };
            conts.push(cont_ids(&text)?);
        }
        let mut scores = model.llama.score_continuations(ctx_ids, &conts, adapter).with_context(|| format!("row {i}: scoring log-likelihoods"))?;
        if s.references {
            answers[i].reference = scores.pop();
        }
        answers[i].choice_logprobs = scores.into_iter().map(|c| c.logprob).collect();
        if !s.generate && s.choices {
            // The answer shown for a multiple-choice row is the most likely choice.
            let best = super::metrics::argmax(answers[i].choice_logprobs.iter().copied()).unwrap_or(0);
            answers[i].text = r.choices[best].clone();
        }
    }
    Ok(())
}

/// `url` with `/v1` appended when it has no path.
pub(crate) fn api_base(url: &str) -> String {
    let u = url.trim_end_matches('/');
    let after_scheme = u.split_once("://").map_or(u, |x| x.1);
    if after_scheme.contains('/') { u.to_string() } else { format!("{u}/v1") }
}

fn endpoint_answers(spec: &ModelSpec, rows: &[EvalRow], s: &Settings) -> Result<Vec<Answer>> {
    if s.choices || s.references {
        bail!("acc, acc_norm, perplexity and token_accuracy need the model's log-likelihoods: evaluate it as a local model (a chat endpoint returns none for the prompt)");
    }
    let base = api_base(&spec.source);
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(600)).build()?;
    let ids = served_models(&client, &base, s.api_key.as_deref())?;
    let model_id = if ids.contains(&spec.name) {
        spec.name.clone()
    } else if ids.len() == 1 {
        ids[0].clone()
    } else {
        bail!("{base} serves {:?}: name the model after one of them (e.g. .model({:?}, {:?}))", ids, ids.first().cloned().unwrap_or_default(), spec.source);
    };
    parallel_map(rows.len(), s.concurrency, |i| ask(&client, &base, &model_id, &rows[i].prompt, s).with_context(|| format!("row {i}")))
}

/// The model ids an OpenAI-compatible endpoint lists at `GET {base}/models`.
pub(crate) fn served_models(client: &reqwest::blocking::Client, base: &str, api_key: Option<&str>) -> Result<Vec<String>> {
    let mut rb = client.get(format!("{base}/models"));
    if let Some(k) = api_key {
        rb = rb.bearer_auth(k);
    }
    let r = rb.send().with_context(|| format!("GET {base}/models"))?;
    let status = r.status();
    let body = r.text().unwrap_or_default();
    if !status.is_success() {
        bail!("GET {base}/models: {status}: {body}{}", if status.as_u16() == 401 { " (set the API key with .api_key(..) or OPENAI_API_KEY)" } else { "" });
    }
    let models: Value = serde_json::from_str(&body).with_context(|| format!("GET {base}/models: not JSON: {body}"))?;
    Ok(models["data"].as_array().into_iter().flatten().filter_map(|m| m["id"].as_str().map(str::to_string)).collect())
}

/// Runs `f(i)` for every `i < n` on up to `threads` threads (requests to a server, which
/// wait on the network). No new item starts after an error or an interrupt; returns the
/// results in order, or the error of the first failed item.
pub(crate) fn parallel_map<T: Send>(n: usize, threads: usize, f: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    let next = AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let results: Vec<std::sync::Mutex<Option<Result<T>>>> = (0..n).map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads.min(n).max(1) {
            scope.spawn(|| {
                loop {
                    if failed.load(Ordering::Relaxed) || crate::interrupt::requested() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let r = f(i);
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    *results[i].lock().expect("no panics while holding") = Some(r);
                }
            });
        }
    });
    crate::interrupt::check()?;
    let mut out = Vec::with_capacity(n);
    for r in results {
        match r.into_inner().expect("no panics while holding") {
            Some(Ok(v)) => out.push(v),
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    if out.len() != n {
        bail!("{} of {n} items were not done", n - out.len());
    }
    Ok(out)
}

/// One chat completion, retried with backoff on 429, 5xx and connection errors.
fn ask(client: &reqwest::blocking::Client, base: &str, model: &str, prompt: &[crate::tokenize::Message], s: &Settings) -> Result<Answer> {
    let mut body = json!({
        "model": model,
        "messages": prompt,
        "max_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "seed": s.seed,
    });
    if !s.stop.is_empty() {
        body["stop"] = json!(s.stop);
    }
    let v = post_with_retries(client, &format!("{base}/chat/completions"), s.api_key.as_deref(), &body, TRIES)?;
    let (v, latency) = v;
    let choice = &v["choices"][0];
    let Some(text) = choice["message"]["content"].as_str() else {
        bail!("the answer has no choices[0].message.content: {v}");
    };
    Ok(Answer {
        text: text.to_string(),
        truncated: choice["finish_reason"].as_str() == Some("length"),
        prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize,
        completion_tokens: v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize,
        latency_s: latency,
        ..Answer::default()
    })
}

/// Tries per request to an endpoint (evaluated model or judge).
pub(crate) const TRIES: u32 = 6;

/// POSTs `body` as JSON and returns the JSON answer and the seconds the successful try
/// took. 429, 5xx and connection errors are retried up to `tries` times, waiting
/// 0.5 s doubling (at most 30 s), or longer when the server's `Retry-After` says so.
pub(crate) fn post_with_retries(
    client: &reqwest::blocking::Client,
    url: &str,
    api_key: Option<&str>,
    body: &Value,
    tries: u32,
) -> Result<(Value, f64)> {
    let mut last = String::new();
    let mut retry_after = Duration::ZERO;
    for attempt in 0..tries.max(1) {
        if attempt > 0 {
            let backoff = Duration::from_millis(500).saturating_mul(1 << (attempt - 1).min(6)).min(Duration::from_secs(30));
            crate::interrupt::sleep(backoff.max(retry_after))?;
        }
        let t0 = Instant::now();
        let mut rb = client.post(url).json(body);
        if let Some(k) = api_key {
            rb = rb.bearer_auth(k);
        }
        let resp = match rb.send() {
            Ok(r) => r,
            Err(e) => {
                last = format!("{e}");
                continue;
            }
        };
        let status = resp.status();
        retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|h| h.to_str().ok())
            .and_then(|s| s.parse::<f64>().ok())
            .map_or(Duration::ZERO, |s| Duration::from_secs_f64(s.clamp(0.0, 30.0)));
        let text = resp.text().unwrap_or_default();
        if status.is_success() {
            let v: Value = serde_json::from_str(&text).with_context(|| format!("POST {url}: the answer is not JSON: {text}"))?;
            return Ok((v, t0.elapsed().as_secs_f64()));
        }
        if status.as_u16() == 429 || status.is_server_error() {
            last = format!("{status}: {text}");
            continue;
        }
        bail!("POST {url}: {status}: {text}{}", if status.as_u16() == 401 { " (set the API key with .api_key(..) or OPENAI_API_KEY)" } else { "" });
    }
    bail!("POST {url}: gave up after {tries} tries; last: {last}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn endpoint_urls_get_v1_only_when_they_have_no_path() {
        assert_eq!(super::api_base("http://127.0.0.1:8000"), "http://127.0.0.1:8000/v1");
        assert_eq!(super::api_base("http://127.0.0.1:8000/"), "http://127.0.0.1:8000/v1");
        assert_eq!(super::api_base("https://h/serving-endpoints/x/v1/"), "https://h/serving-endpoints/x/v1");
    }
}
