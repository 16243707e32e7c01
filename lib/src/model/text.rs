//! The small text interface generation needs, and a thin adapter over the Hugging Face
//! `tokenizers` crate that implements it.
//!
//! Text-level [`generate`](super::Model::generate) and [`chat`](super::Model::chat) only see
//! the [`TextTokenizer`] trait, so the project's full tokenizer module can plug in by
//! implementing it. [`HfTokenizer`] covers `tokenizer.json` directories and GGUF files with
//! a GPT-2-style byte-level BPE (SmolLM2 and plain GPT-2 pre-tokenisation).

use anyhow::{Context, Result, anyhow, bail};
use candle_core::quantized::gguf_file;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;

/// One chat turn: the data module's message type, so a conversation read for
/// training is the same value generation takes.
pub use crate::tokenize::Message as ChatMessage;

/// What text-level generation needs from a tokenizer.
pub trait TextTokenizer: Send + Sync {
    /// Token ids of `text`; `add_special_tokens` adds BOS etc. as the tokenizer is configured to.
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>>;
    /// Text of `ids`.
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String>;
    /// Ids that end a reply (EOS, end-of-turn), in addition to the model config's.
    fn eos_token_ids(&self) -> Vec<u32>;
    /// Renders `messages` with the model's chat template (Hugging Face semantics).
    fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String>;
    /// Writes the Hugging Face tokenizer files (`tokenizer.json`, `tokenizer_config.json`)
    /// into a model directory.
    fn save_hf_files(&self, dir: &Path) -> Result<()> {
        bail!("this tokenizer cannot write Hugging Face tokenizer files into {}", dir.display())
    }
}

/// A `tokenizers::Tokenizer` plus the chat template and special tokens from
/// `tokenizer_config.json` / `generation_config.json` or GGUF metadata.
pub struct HfTokenizer {
    tokenizer: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
    /// The directory it was read from: its files are copied verbatim on save.
    source_dir: Option<std::path::PathBuf>,
}

/// Tokenizer files of a Hugging Face model directory, copied when a model is saved.
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "added_tokens.json",
];

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer").field("vocab", &self.tokenizer.get_vocab_size(true)).field("eos_ids", &self.eos_ids).finish()
    }
}

fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

impl HfTokenizer {
    /// Reads `tokenizer.json` (required), `tokenizer_config.json` and `generation_config.json`
    /// (optional) from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            bail!("{} is missing: the model directory needs it to tokenize text", tj.display());
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&tj).map_err(|e| anyhow!("{}: {e}", tj.display()))?;
        let read = |name: &str| -> Result<Option<Value>> {
            let p = dir.join(name);
            if !p.is_file() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&p)?;
            Ok(Some(serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", p.display()))?))
        };
        let cfg = read("tokenizer_config.json")?.unwrap_or(Value::Null);
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| a.first())
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(String::from),
            _ => None,
        };
        let chat_template = match chat_template {
            Some(t) => Some(t),
            None => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let bos_token = token_text(cfg.get("bos_token"));
        let eos_token = token_text(cfg.get("eos_token"));
        let mut eos_ids = Vec::new();
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos_ids.push(id);
        }
        if let Some(generation) = read("generation_config.json")? {
            match generation.get("eos_token_id") {
                Some(Value::Number(n)) => eos_ids.extend(n.as_u64().map(|v| v as u32)),
                Some(Value::Array(a)) => eos_ids.extend(a.iter().filter_map(Value::as_u64).map(|v| v as u32)),
                _ => {}
            }
        }
        eos_ids.sort();
        eos_ids.dedup();
        Ok(Self { tokenizer, chat_template, bos_token, eos_token, eos_ids, source_dir: Some(dir.to_path_buf()) })
    }

    /// Builds the tokenizer from GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
    /// Supports byte-level BPE (`tokenizer.ggml.model = gpt2`) with the `smollm` (digits split
    /// one by one) and default GPT-2 pre-tokenisers.
    pub fn from_gguf_metadata(md: &HashMap<String, gguf_file::Value>) -> Result<Self> {
        let s = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
        let model = s("tokenizer.ggml.model").unwrap_or_default();
        if model != "gpt2" {
            bail!("GGUF tokenizer model `{model}` is not supported here (only byte-level BPE, `gpt2`)");
        }
        let pre = s("tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
        let strings = |k: &str| -> Result<Vec<String>> {
            md.get(k)
                .ok_or_else(|| anyhow!("GGUF: metadata `{k}` is missing"))?
                .to_vec()
                .map_err(|e| anyhow!("GGUF: `{k}`: {e}"))?
                .iter()
                .map(|v| v.to_string().cloned().map_err(|e| anyhow!("GGUF: `{k}`: {e}")))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
            Some(v) => v.iter().map(|x| x.to_i32().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let pre_tokenizer = match pre.as_str() {
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]}),
            "default" | "gpt-2" | "gpt2" => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
            other => bail!("GGUF pre-tokenizer `{other}` is not supported here (supported: smollm, default/gpt2)"),
        };
        let vocab: serde_json::Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        let added: Vec<Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": types[i] == 3})
            })
            .collect();
        let spec = json!({
            "version": "1.0",
            "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        let tokenizer = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&spec)?).map_err(|e| anyhow!("GGUF tokenizer: {e}"))?;
        let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let name = |i: Option<u32>| i.and_then(|i| tokens.get(i as usize).cloned());
        let mut eos_ids: Vec<u32> = eos.into_iter().collect();
        if let Some(e) = id("tokenizer.ggml.eot_token_id") {
            eos_ids.push(e);
        }
        eos_ids.dedup();
        Ok(Self {
            tokenizer,
            chat_template: s("tokenizer.chat_template"),
            bos_token: name(bos),
            eos_token: name(eos),
            eos_ids,
            source_dir: None,
        })
    }

    /// Reads the tokenizer of a GGUF file.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        Self::from_gguf_metadata(&super::io::gguf_metadata(path)?).with_context(|| format!("in {}", path.display()))
    }

    /// The underlying `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }
}

impl TextTokenizer for HfTokenizer {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, add_special_tokens).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer.decode(ids, skip_special_tokens).map_err(|e| anyhow!("decoding: {e}"))
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_ids.clone()
    }

    fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| anyhow!("this model has no chat template (tokenizer_config.json `chat_template`); use generate() with plain text"))?;
        let mut env = minijinja::Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().map_err(|e| anyhow!("{e}"))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", template.to_string()).map_err(|e| anyhow!("chat template does not parse: {e}"))?;
        let out = env
            .get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_token.clone().unwrap_or_default(),
                    eos_token => self.eos_token.clone().unwrap_or_default(),
                })
            })
            .map_err(|e| anyhow!("rendering the chat template: {e}"))?;
        Ok(out)
    }

    fn save_hf_files(&self, dir: &Path) -> Result<()> {
        use super::io::atomic_write;
        if let Some(src) = &self.source_dir {
            if src != dir {
                for f in TOKENIZER_FILES {
                    let p = src.join(f);
                    if p.is_file() {
                        atomic_write(&dir.join(f), &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?)?;
                    }
                }
            }
            return Ok(());
        }
        let json = self.tokenizer.to_string(false).map_err(|e| anyhow!("serialising the tokenizer: {e}"))?;
        atomic_write(&dir.join("tokenizer.json"), json.as_bytes())?;
        let mut cfg = serde_json::Map::new();
        cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        if let Some(t) = &self.chat_template {
            cfg.insert("chat_template".into(), json!(t));
        }
        if let Some(t) = &self.bos_token {
            cfg.insert("bos_token".into(), json!(t));
        }
        if let Some(t) = &self.eos_token {
            cfg.insert("eos_token".into(), json!(t));
        }
        atomic_write(&dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&Value::Object(cfg))?.as_bytes())?;
        Ok(())
    }
}

/// The data module's tokenizer serves generation too, so training and inference
/// can share one tokenizer and one chat-template implementation.
impl TextTokenizer for crate::tokenize::Tokenizer {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(crate::tokenize::Tokenizer::encode(self, text, add_special_tokens)?)
    }
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        Ok(crate::tokenize::Tokenizer::decode(self, ids, skip_special_tokens)?)
    }
    fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_id().into_iter().collect()
    }
    fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        Ok(crate::tokenize::Tokenizer::apply_chat_template(self, messages, add_generation_prompt)?)
    }
}
