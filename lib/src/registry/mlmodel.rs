//! The MLflow model directory tunebook uploads: a Hugging Face layout arranged the
//! way MLflow's `transformers` flavor saves one, plus its `MLmodel` file, so Python
//! MLflow users can load it with `mlflow.transformers.load_model` too.
//!
//! ```text
//! MLmodel                    flavors: transformers (+ python_function), tunebook
//! model/                     full weights: config.json, *.safetensors, generation_config.json
//! peft/                      or a PEFT adapter: adapter_config.json, adapter_model.safetensors
//! components/tokenizer/      tokenizer.json, tokenizer_config.json (chat template), ...
//! requirements.txt           what a Python user needs
//! ```
//!
//! An adapter whose base is a Hugging Face id names it (`source_model_name` and the
//! cached revision): whoever loads it gets the base from the Hub or their cache. A base
//! that is a local file (a `.gguf`) or a local folder is uploaded with the adapter, in
//! Hugging Face layout under `model/` (`model_binary`), so the registered model loads on
//! a machine that has never seen that file: MLflow's `transformers` flavor builds the
//! base from `model/` and applies `peft/` on it, and so does tunebook (adapter unmerged).

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};

/// Files that belong to the tokenizer (they go to `components/tokenizer/`).
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

/// Where the weights of a Hugging Face layout live in the MLflow model directory.
pub const MODEL_DIR: &str = "model";
/// Where a PEFT adapter lives.
pub const PEFT_DIR: &str = "peft";
/// Where the tokenizer lives.
pub const TOKENIZER_DIR: &str = "components/tokenizer";

/// What kind of model a directory holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// Full weights (`config.json` + safetensors).
    Full,
    /// A PEFT adapter on top of `base` (its `base_model_name_or_path`).
    Adapter { base: String },
}

/// The upload plan of a model directory.
#[derive(Clone, Debug)]
pub struct Plan {
    pub kind: ModelKind,
    /// (local file, path in the MLflow model directory), `MLmodel` excluded.
    pub files: Vec<(PathBuf, String)>,
    /// The `MLmodel` file's text.
    pub mlmodel: String,
    /// `requirements.txt`.
    pub requirements: String,
    /// Bytes of model files.
    pub size_bytes: u64,
}

/// Plans the upload of a Hugging Face model directory (full weights or a PEFT
/// adapter, plus tokenizer files) as an MLflow `transformers` model.
pub fn plan(model_dir: &Path, model_id: &str, run_id: &str) -> Result<Plan> {
    if !model_dir.is_dir() {
        bail!("{} is not a model directory", model_dir.display());
    }
    let adapter_cfg = model_dir.join("adapter_config.json");
    let kind = if adapter_cfg.is_file() {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&adapter_cfg)?)
            .with_context(|| format!("{} is not valid JSON", adapter_cfg.display()))?;
        let base = v.get("base_model_name_or_path").and_then(Value::as_str).unwrap_or("").to_string();
        if base.is_empty() {
            bail!("{}: `base_model_name_or_path` is missing, so nobody could load this adapter: set it to the base model", adapter_cfg.display());
        }
        if !model_dir.join("adapter_model.safetensors").is_file() {
            bail!("{}: adapter_model.safetensors is missing", model_dir.display());
        }
        ModelKind::Adapter { base }
    } else if model_dir.join("config.json").is_file() {
        let has_weights = std::fs::read_dir(model_dir)?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".safetensors"));
        if !has_weights {
            bail!("{}: config.json but no .safetensors weights", model_dir.display());
        }
        ModelKind::Full
    } else {
        bail!(
            "{} is not a Hugging Face model directory: it needs config.json + *.safetensors (full weights) or adapter_config.json + adapter_model.safetensors (a PEFT adapter)",
            model_dir.display()
        );
    };
    let weights_dir = if matches!(kind, ModelKind::Full) { MODEL_DIR } else { PEFT_DIR };
    let mut files = Vec::new();
    let mut size = 0u64;
    // A local base travels with its adapter (weights and config only; the tokenizer is the adapter's).
    let embedded_base = match &kind {
        ModelKind::Adapter { base } if !is_hub_id(base) => local_base_dir(base)?,
        _ => None,
    };
    if let Some(b) = &embedded_base {
        for f in crate::mlflow::api::walk_files(b)? {
            let rel = f.strip_prefix(b).unwrap().to_string_lossy().replace('\\', "/");
            let weights = rel.ends_with(".safetensors") || rel == "model.safetensors.index.json";
            if weights || rel == "config.json" || rel == "generation_config.json" {
                size += std::fs::metadata(&f)?.len();
                files.push((f, format!("{MODEL_DIR}/{rel}")));
            }
        }
    }
    let mut has_tokenizer = false;
    for f in crate::mlflow::api::walk_files(model_dir)? {
        let rel = f.strip_prefix(model_dir).unwrap().to_string_lossy().replace('\\', "/");
        if rel == "MLmodel" || rel.split('/').any(|s| s.starts_with('.')) {
            continue;
        }
        size += std::fs::metadata(&f)?.len();
        let dest = if TOKENIZER_FILES.contains(&rel.as_str()) {
            has_tokenizer |= rel == "tokenizer.json" || rel == "tokenizer.model";
            format!("{TOKENIZER_DIR}/{rel}")
        } else {
            format!("{weights_dir}/{rel}")
        };
        files.push((f, dest));
    }
    let mlmodel = mlmodel_yaml(model_dir, &kind, embedded_base.as_deref(), has_tokenizer, model_id, run_id, size)?;
    let requirements = match kind {
        ModelKind::Full => "mlflow\ntransformers\ntorch\nsafetensors\n",
        ModelKind::Adapter { .. } => "mlflow\ntransformers\ntorch\nsafetensors\npeft\n",
    }
    .to_string();
    Ok(Plan { kind, files, mlmodel, requirements, size_bytes: size })
}

fn read_json(p: &Path) -> Value {
    std::fs::read_to_string(p).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Value::Null)
}

/// True when `s` reads as a Hugging Face hub id (`org/name`), not a local path.
fn is_hub_id(s: &str) -> bool {
    !s.starts_with('/') && !s.starts_with('.') && !s.ends_with(".gguf") && s.split('/').count() == 2 && !Path::new(s).exists()
}

/// A local base model in Hugging Face layout: the folder itself, or a `.gguf` file
/// converted once into `<cache>/registry/bases/` (f32, exact: the values tunebook
/// trained on). `None` when the base is not on this machine.
fn local_base_dir(base: &str) -> Result<Option<PathBuf>> {
    let p = Path::new(base);
    if p.is_dir() && p.join("config.json").is_file() {
        return Ok(Some(p.to_path_buf()));
    }
    if !(p.is_file() && base.ends_with(".gguf")) {
        return Ok(None);
    }
    let meta = std::fs::metadata(p)?;
    let stamp = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs()).unwrap_or(0);
    let stem = p.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let dest = crate::files::cache_dir().join("registry/bases").join(format!("{stem}-{}-{stamp}", meta.len()));
    if dest.join("config.json").is_file() {
        return Ok(Some(dest));
    }
    let model = crate::model::Model::load(base).with_context(|| format!("loading the adapter's base {base} to upload it with the adapter"))?;
    let stage = crate::files::StagedDir::new(&dest)?;
    model.save_pretrained(stage.path()).with_context(|| format!("writing the adapter's base {base} in Hugging Face layout"))?;
    Ok(Some(stage.commit(crate::files::IfExists::Keep)?))
}

/// The commit the local Hugging Face cache has for `id` (refs/main), if any.
fn cached_revision(id: &str) -> Option<String> {
    let r = crate::model::hf_cache_dir().join(format!("models--{}", id.replace('/', "--"))).join("refs/main");
    std::fs::read_to_string(r).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn mlmodel_yaml(model_dir: &Path, kind: &ModelKind, embedded_base: Option<&Path>, has_tokenizer: bool, model_id: &str, run_id: &str, size: u64) -> Result<String> {
    // The model config: for an adapter, the base's (when it is local).
    let config = match (kind, embedded_base) {
        (ModelKind::Full, _) => read_json(&model_dir.join("config.json")),
        (ModelKind::Adapter { .. }, Some(b)) => read_json(&b.join("config.json")),
        (ModelKind::Adapter { base }, None) => read_json(&Path::new(base).join("config.json")),
    };
    let arch = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .unwrap_or("LlamaForCausalLM")
        .to_string();
    let dtype = config.get("torch_dtype").or_else(|| config.get("dtype")).and_then(Value::as_str).unwrap_or("float32");
    let tok_cfg = read_json(&model_dir.join("tokenizer_config.json"));
    let tokenizer_type = tok_cfg.get("tokenizer_class").and_then(Value::as_str).unwrap_or("PreTrainedTokenizerFast");
    let mut tf = Map::new();
    tf.insert("task".into(), json!("text-generation"));
    tf.insert("instance_type".into(), json!("TextGenerationPipeline"));
    tf.insert("pipeline_model_type".into(), json!(arch));
    tf.insert("framework".into(), json!("pt"));
    tf.insert("torch_dtype".into(), json!(format!("torch.{dtype}")));
    let run_name = model_dir.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match kind {
        ModelKind::Full => {
            tf.insert("source_model_name".into(), json!(run_name));
            tf.insert("model_binary".into(), json!(MODEL_DIR));
        }
        ModelKind::Adapter { base } => {
            tf.insert("source_model_name".into(), json!(base));
            if is_hub_id(base) {
                // Python MLflow then loads the base, and the tokenizer, from the Hub.
                let rev = cached_revision(base).unwrap_or_else(|| "main".into());
                tf.insert("source_model_revision".into(), json!(rev));
                if has_tokenizer {
                    tf.insert("tokenizer_name".into(), json!(base));
                    tf.insert("tokenizer_revision".into(), json!(rev));
                }
            } else if embedded_base.is_some() {
                // MLflow builds the base from `model/` (not from a path on this machine).
                tf.insert("model_binary".into(), json!(MODEL_DIR));
            } else {
                tf.insert("local_base_model_path".into(), json!(base));
            }
            tf.insert("peft_adaptor".into(), json!(PEFT_DIR));
        }
    }
    if has_tokenizer {
        tf.insert("tokenizer_type".into(), json!(tokenizer_type));
        tf.insert("components".into(), json!(["tokenizer"]));
    } else {
        tf.insert("components".into(), json!([]));
    }
    tf.insert("transformers_version".into(), json!(config.get("transformers_version").and_then(Value::as_str).unwrap_or("4.46.0")));
    let mut tb = Map::new();
    tb.insert("version".into(), json!(crate::VERSION));
    match kind {
        ModelKind::Full => {
            tb.insert("kind".into(), json!("full"));
            tb.insert("model_dir".into(), json!(MODEL_DIR));
        }
        ModelKind::Adapter { base } => {
            tb.insert("kind".into(), json!("peft"));
            tb.insert("adapter_dir".into(), json!(PEFT_DIR));
            tb.insert("base_model".into(), json!(base));
            if embedded_base.is_some() {
                tb.insert("base_dir".into(), json!(MODEL_DIR));
            }
        }
    }
    tb.insert("tokenizer_dir".into(), json!(TOKENIZER_DIR));
    let doc = json!({
        "artifact_path": "model",
        "flavors": {
            "python_function": {"loader_module": "mlflow.transformers", "env": {"virtualenv": "python_env.yaml"}},
            "transformers": Value::Object(tf),
            "tunebook": Value::Object(tb),
        },
        "metadata": {"created_by": format!("tunebook {}", crate::VERSION)},
        "model_id": model_id,
        "model_size_bytes": size,
        "model_uuid": model_id.trim_start_matches("m-"),
        "run_id": run_id,
        "utc_time_created": chrono::Utc::now().format("%Y-%m-%d %H:%M:%S%.6f").to_string(),
    });
    Ok(to_yaml(&doc))
}

/// `python_env.yaml` for the `python_function` flavor.
pub fn python_env_yaml() -> String {
    "python: 3.11\nbuild_dependencies:\n- pip\ndependencies:\n- -r requirements.txt\n".to_string()
}

/// Block-style YAML for a JSON value. Strings are written as JSON strings, which
/// are valid YAML double-quoted scalars, so no quoting rule can be missed.
pub fn to_yaml(v: &Value) -> String {
    fn scalar(v: &Value) -> String {
        match v {
            Value::Null => "null".into(),
            Value::String(s) => serde_json::to_string(s).unwrap(),
            other => other.to_string(),
        }
    }
    fn go(v: &Value, indent: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let key = if k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.') && !k.is_empty() {
                        k.clone()
                    } else {
                        serde_json::to_string(k).unwrap()
                    };
                    match x {
                        Value::Object(o) if !o.is_empty() => {
                            out.push_str(&format!("{pad}{key}:\n"));
                            go(x, indent + 2, out);
                        }
                        Value::Array(a) if !a.is_empty() => {
                            out.push_str(&format!("{pad}{key}:\n"));
                            go(x, indent, out);
                        }
                        Value::Object(_) => out.push_str(&format!("{pad}{key}: {{}}\n")),
                        Value::Array(_) => out.push_str(&format!("{pad}{key}: []\n")),
                        s => out.push_str(&format!("{pad}{key}: {}\n", scalar(s))),
                    }
                }
            }
            Value::Array(a) => {
                for x in a {
                    match x {
                        Value::Object(o) if !o.is_empty() => {
                            let mut inner = String::new();
                            go(x, indent + 2, &mut inner);
                            out.push_str(&format!("{pad}- {}", &inner[indent + 2..]));
                        }
                        Value::Array(_) | Value::Object(_) => out.push_str(&format!("{pad}- {}\n", x)),
                        s => out.push_str(&format!("{pad}- {}\n", scalar(s))),
                    }
                }
            }
            s => out.push_str(&format!("{pad}{}\n", scalar(s))),
        }
    }
    let mut out = String::new();
    go(v, 0, &mut out);
    out
}

/// A string value of the `MLmodel` written by [`to_yaml`] (or a simple hand-written
/// one): the first `key: value` line at any depth under the given section, e.g.
/// `mlmodel_value(text, "tunebook", "base_model")`.
pub fn mlmodel_value(text: &str, section: &str, key: &str) -> Option<String> {
    let mut in_section = false;
    let mut section_indent = 0;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let t = line.trim();
        if in_section && indent <= section_indent && !t.is_empty() {
            in_section = false;
        }
        if t == format!("{section}:") {
            in_section = true;
            section_indent = indent;
            continue;
        }
        if in_section {
            if let Some(rest) = t.strip_prefix(&format!("{key}:")) {
                let rest = rest.trim();
                return Some(if rest.starts_with('"') {
                    serde_json::from_str(rest).ok()?
                } else {
                    rest.trim_matches('\'').to_string()
                });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_is_block_style_with_quoted_strings() {
        let v = json!({"a": {"b": "x: y", "c": [1, "two"], "e": {}}, "n": null, "list": [{"k": "v", "k2": 2}]});
        let y = to_yaml(&v);
        assert_eq!(y, "a:\n  b: \"x: y\"\n  c:\n  - 1\n  - \"two\"\n  e: {}\nn: null\nlist:\n- k: \"v\"\n  k2: 2\n");
        assert_eq!(mlmodel_value(&y, "a", "b").as_deref(), Some("x: y"));
        assert_eq!(mlmodel_value(&y, "a", "k"), None);
    }

    #[test]
    fn full_and_adapter_directories_are_planned() {
        let dir = tempfile::tempdir().unwrap();
        let full = dir.path().join("run1/model");
        std::fs::create_dir_all(&full).unwrap();
        std::fs::write(full.join("config.json"), r#"{"architectures":["LlamaForCausalLM"],"torch_dtype":"bfloat16"}"#).unwrap();
        std::fs::write(full.join("model.safetensors"), b"x").unwrap();
        std::fs::write(full.join("tokenizer.json"), b"{}").unwrap();
        std::fs::write(full.join("tokenizer_config.json"), r#"{"chat_template":"{{x}}"}"#).unwrap();
        let p = plan(&full, "m-1", "r1").unwrap();
        assert_eq!(p.kind, ModelKind::Full);
        let dests: Vec<&str> = p.files.iter().map(|(_, d)| d.as_str()).collect();
        assert_eq!(dests, vec!["model/config.json", "model/model.safetensors", "components/tokenizer/tokenizer.json", "components/tokenizer/tokenizer_config.json"]);
        assert_eq!(mlmodel_value(&p.mlmodel, "transformers", "model_binary").as_deref(), Some("model"));
        assert_eq!(mlmodel_value(&p.mlmodel, "transformers", "torch_dtype").as_deref(), Some("torch.bfloat16"));
        assert_eq!(mlmodel_value(&p.mlmodel, "python_function", "loader_module").as_deref(), Some("mlflow.transformers"));

        let ad = dir.path().join("run2/model");
        std::fs::create_dir_all(&ad).unwrap();
        std::fs::write(ad.join("adapter_config.json"), format!(r#"{{"base_model_name_or_path":"{}"}}"#, full.display())).unwrap();
        std::fs::write(ad.join("adapter_model.safetensors"), b"x").unwrap();
        let p = plan(&ad, "m-2", "r2").unwrap();
        assert_eq!(p.kind, ModelKind::Adapter { base: full.display().to_string() });
        assert_eq!(mlmodel_value(&p.mlmodel, "transformers", "peft_adaptor").as_deref(), Some("peft"));
        // The local base travels with the adapter: MLflow builds it from model/, not from this machine's path.
        assert_eq!(mlmodel_value(&p.mlmodel, "transformers", "local_base_model_path"), None);
        assert_eq!(mlmodel_value(&p.mlmodel, "transformers", "model_binary").as_deref(), Some("model"));
        assert_eq!(mlmodel_value(&p.mlmodel, "tunebook", "base_dir").as_deref(), Some("model"));
        let dests: Vec<&str> = p.files.iter().map(|(_, d)| d.as_str()).collect();
        assert_eq!(dests, vec!["model/config.json", "model/model.safetensors", "peft/adapter_config.json", "peft/adapter_model.safetensors"]);
        // A base that is nowhere on this machine can only be named.
        std::fs::write(ad.join("adapter_config.json"), r#"{"base_model_name_or_path":"/nowhere/base.gguf"}"#).unwrap();
        let p = plan(&ad, "m-3", "r3").unwrap();
        assert_eq!(mlmodel_value(&p.mlmodel, "transformers", "local_base_model_path").as_deref(), Some("/nowhere/base.gguf"));
        assert!(p.files.iter().all(|(_, d)| d.starts_with("peft/")));
        assert!(plan(dir.path(), "m", "r").unwrap_err().to_string().contains("not a Hugging Face model directory"));
    }
}
