//! Registered versions downloaded into the local cache and loaded as models.

use super::refs::{ModelRef, parse_model_ref};
use super::{ModelVersion, Registry, mlmodel};
use crate::files::{IfExists, StagedDir};
use crate::model::{Model, ModelSource};
use crate::tokenize::Tokenizer;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};

impl Registry {
    /// Downloads the model a reference names into the local cache (once per
    /// version) and returns its directory (`MLmodel`, `model/` or `peft/`,
    /// `components/tokenizer/`).
    pub fn download(&self, spec: &str) -> Result<PathBuf> {
        let (key, root) = match parse_model_ref(spec)? {
            ModelRef::Logged { model_id } => {
                let m = self.logged_model(&model_id)?;
                (PathBuf::from("logged-models").join(&model_id), m.artifact_uri)
            }
            ModelRef::Registered { .. } => {
                let v = self.resolve(spec)?;
                let root = self.download_uri(&v.name, &v.version)?;
                (PathBuf::from(safe_segment(&v.name)).join(&v.version), root)
            }
        };
        let dest = self.cache.clone().unwrap_or_else(cache_root).join(server_key(self.client.uri())).join(key);
        if dest.join(".complete").is_file() {
            return Ok(dest);
        }
        let stage = StagedDir::new(&dest)?;
        // Everything but attached exports (`gguf/`), which `download_gguf` fetches one by one.
        let top = self.client.list_artifacts(&root, "").with_context(|| format!("listing {spec} at {root}"))?;
        if top.is_empty() {
            bail!("{spec} has no files at {root}");
        }
        for f in top.iter().filter(|f| f.path.trim_matches('/') != GGUF_DIR) {
            let target = if f.is_dir { stage.path().join(&f.path) } else { stage.path().to_path_buf() };
            self.client.download(&root, &f.path, &target).with_context(|| format!("downloading {spec} from {root}"))?;
        }
        prepare_loadable(stage.path())?;
        crate::files::write_atomic(&stage.path().join(".complete"), b"")?;
        // Someone else may have finished the same download first: theirs is complete too.
        stage.commit(IfExists::Keep)?;
        Ok(dest)
    }
}

/// Where exported GGUF files attached to a version live among its files.
pub const GGUF_DIR: &str = "gguf";

impl Registry {
    /// Uploads `local` among the files of the version `spec` names, at `dest` (e.g.
    /// `gguf/bot-q4_k_m.gguf`), and returns the version. An export attached this way
    /// travels with the registered model: [`Registry::download_gguf`] fetches it.
    pub fn attach_file(&self, spec: &str, local: &Path, dest: &str) -> Result<ModelVersion> {
        let v = self.resolve(spec)?;
        let root = self.download_uri(&v.name, &v.version)?;
        self.client
            .upload_file(&root, dest, local)
            .with_context(|| format!("uploading {} to {}/{} ({root})", local.display(), v.name, v.version))?;
        Ok(v)
    }

    /// The GGUF files attached to a version (`gguf/…`), by file name.
    pub fn gguf_files(&self, spec: &str) -> Result<Vec<String>> {
        let v = self.resolve(spec)?;
        let root = self.download_uri(&v.name, &v.version)?;
        let mut names: Vec<String> = self
            .client
            .list_artifacts(&root, GGUF_DIR)?
            .into_iter()
            .filter(|f| !f.is_dir && f.path.ends_with(".gguf"))
            .map(|f| f.path.rsplit('/').next().unwrap_or(&f.path).to_string())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Downloads a GGUF attached to a version into the local cache (once) and returns
    /// its path: the one named `name`, or the only one.
    pub fn download_gguf(&self, spec: &str, name: Option<&str>) -> Result<PathBuf> {
        let v = self.resolve(spec)?;
        let names = self.gguf_files(spec)?;
        let file = match (name, names.as_slice()) {
            (Some(n), _) if names.iter().any(|x| x == n) => n.to_string(),
            (Some(n), _) => bail!("{}/{} has no attached GGUF named {n:?} (attached: {})", v.name, v.version, list(&names)),
            (None, [one]) => one.clone(),
            (None, []) => bail!("{}/{} has no attached GGUF: export one with `tunebook export {spec} --gguf F.gguf --attach-to {spec}`", v.name, v.version),
            (None, _) => bail!("{}/{} has several GGUF files ({}): name one", v.name, v.version, list(&names)),
        };
        let dest = self.cache.clone().unwrap_or_else(cache_root).join(server_key(self.client.uri())).join(safe_segment(&v.name)).join(format!("{}-gguf", v.version));
        let path = dest.join(&file);
        if path.is_file() {
            return Ok(path);
        }
        std::fs::create_dir_all(&dest)?;
        let root = self.download_uri(&v.name, &v.version)?;
        let tmp = tempfile::Builder::new().prefix(".tmp-").tempdir_in(&dest)?;
        self.client.download(&root, &format!("{GGUF_DIR}/{file}"), tmp.path())?;
        std::fs::rename(tmp.path().join(&file), &path).with_context(|| format!("moving the download into {}", path.display()))?;
        Ok(path)
    }

    /// Loads a GGUF attached to a version (see [`Registry::download_gguf`]).
    pub fn load_gguf(&self, spec: &str, name: Option<&str>) -> Result<Model> {
        let p = self.download_gguf(spec, name)?;
        Model::load(&p.to_string_lossy())
    }
}

fn list(names: &[String]) -> String {
    if names.is_empty() { "none".into() } else { names.join(", ") }
}

/// `<cache>/registry` (see [`crate::files::cache_dir`]).
pub fn cache_root() -> PathBuf {
    crate::files::cache_dir().join("registry")
}

fn safe_segment(s: &str) -> String {
    let t: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || "._-@".contains(c) { c } else { '_' }).collect();
    if t.chars().all(|c| c == '.') { format!("_{t}") } else { t }
}

fn server_key(uri: &str) -> String {
    safe_segment(uri.trim_start_matches("http://").trim_start_matches("https://"))
}

/// Puts the tokenizer files next to the weights of a full model, so the `model/`
/// directory loads on its own (hard links where possible).
fn prepare_loadable(dir: &Path) -> Result<()> {
    let model = dir.join(mlmodel::MODEL_DIR);
    let tok = dir.join(mlmodel::TOKENIZER_DIR);
    if model.join("config.json").is_file() && tok.is_dir() {
        for e in std::fs::read_dir(&tok)? {
            let p = e?.path();
            let target = model.join(p.file_name().unwrap());
            if p.is_file() && !target.exists() && std::fs::hard_link(&p, &target).is_err() {
                std::fs::copy(&p, &target)?;
            }
        }
    }
    Ok(())
}

/// Loads an MLflow model directory written by tunebook (or by MLflow's
/// `transformers` flavor with a Llama-family model): full weights in `model/`, or a
/// PEFT adapter in `peft/` on the base the `MLmodel` (or the adapter config) names;
/// the tokenizer from `components/tokenizer/`. A plain Hugging Face directory
/// loads too.
pub fn load_mlflow_model_dir(dir: &Path) -> Result<Model> {
    let model_dir = dir.join(mlmodel::MODEL_DIR);
    let peft_dir = dir.join(mlmodel::PEFT_DIR);
    let tok_dir = dir.join(mlmodel::TOKENIZER_DIR);
    if peft_dir.join("adapter_config.json").is_file() {
        let mlmodel_text = std::fs::read_to_string(dir.join("MLmodel")).unwrap_or_default();
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(peft_dir.join("adapter_config.json"))?)?;
        // A base uploaded with the adapter (`model/`) comes first: it is the one trained on.
        let embedded = model_dir.join("config.json").is_file().then(|| model_dir.display().to_string());
        let base = embedded
            .or_else(|| mlmodel::mlmodel_value(&mlmodel_text, "tunebook", "base_model"))
            .or_else(|| mlmodel::mlmodel_value(&mlmodel_text, "transformers", "local_base_model_path"))
            .or_else(|| cfg.get("base_model_name_or_path").and_then(Value::as_str).map(str::to_string))
            .context("the adapter does not say which base model it goes on (base_model_name_or_path)")?;
        let mut model = Model::load(&base).with_context(|| {
            format!("loading the adapter's base model {base:?}: it must be on this machine (a local path or a Hugging Face id in the local cache)")
        })?;
        model.llama.load_lora(&peft_dir)?;
        if tok_dir.join("tokenizer.json").is_file() {
            model.tokenizer = Some(Tokenizer::load(&tok_dir)?);
        }
        model.source = Some(ModelSource::HfDir(dir.to_path_buf()));
        return Ok(model);
    }
    if model_dir.join("config.json").is_file() {
        prepare_loadable(dir)?;
        return Model::load(&model_dir.to_string_lossy());
    }
    if dir.join("config.json").is_file() {
        return Model::load(&dir.to_string_lossy());
    }
    bail!("{} holds no model: expected model/config.json (full weights), peft/adapter_config.json (an adapter) or config.json", dir.display())
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_paths_are_safe() {
        assert_eq!(server_key("http://127.0.0.1:5000/prefix"), "127.0.0.1_5000_prefix");
        assert_eq!(safe_segment(".."), "_..");
        assert_eq!(safe_segment("main.support.bot"), "main.support.bot");
    }
}
