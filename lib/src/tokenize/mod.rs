//! Tokenizers and chat templates, identical to Hugging Face's.
//!
//! A [`Tokenizer`] loads from a model folder (`tokenizer.json` plus
//! `tokenizer_config.json` or `chat_template.jinja`), a `tokenizer.json` file, or
//! a GGUF file's metadata (byte-level BPE rebuilt with the pre-tokenizer the
//! model was trained with). Token ids equal those of Hugging Face `tokenizers`
//! (checked against reference ids in `lib/tests/data`).
//!
//! The model engine needs four calls, kept small on purpose:
//!
//! * [`Tokenizer::encode`] / [`Tokenizer::decode`],
//! * [`Tokenizer::decode_stream`] for streaming generation (text appears only
//!   once the bytes of a character are complete),
//! * [`Tokenizer::apply_chat_template`] (text) and [`Tokenizer::encode_chat`]
//!   (ids): the template writes any BOS itself, so templated text is encoded
//!   without adding special tokens again (no double BOS), as transformers does.
//!
//! ```no_run
//! use tunebook::tokenize::{Message, Tokenizer};
//! let tok = Tokenizer::load("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let ids = tok.encode_chat(&[Message::user("What is the capital of France?")], true)?;
//! assert_eq!(ids[0], tok.bos_id().unwrap());
//! # Ok::<(), tunebook::tokenize::TokenizeError>(())
//! ```
//!
//! Must never: download anything, guess a pre-tokenizer it does not know, or
//! add a BOS to text that a chat template already started with one.

mod fast;
mod gguf;
mod template;

pub use template::{ChatTemplate, Message, TemplateError};

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a tokenizer could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Nothing to load a tokenizer from at this path.
    #[error("no tokenizer at {path}: expected a tokenizer.json, a .gguf file, or a folder holding one of them")]
    NotFound {
        /// Where we looked.
        path: PathBuf,
    },
    /// `tokenizer.json` / `tokenizer_config.json` is malformed.
    #[error("{path} is not a valid tokenizer file: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// GGUF metadata does not describe a usable tokenizer.
    #[error("GGUF {path}: {message}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// The model has no chat template.
    #[error(
        "the tokenizer from {source_path} has no chat template: set one with `Tokenizer::with_chat_template`, or use the instruction/text task"
    )]
    NoChatTemplate {
        /// Where the tokenizer came from.
        source_path: String,
    },
    /// Rendering or compiling the chat template failed.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// Encoding or decoding failed inside the tokenizer (for example an id out of the vocabulary).
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
}

fn tk_err(e: impl std::fmt::Display) -> TokenizeError {
    TokenizeError::Tokenizer(e.to_string())
}

/// A special token: its id and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    /// Token id.
    pub id: u32,
    /// Token text, e.g. `<|im_end|>`.
    pub content: String,
}

/// The special tokens a model declares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence.
    pub bos: Option<SpecialToken>,
    /// End of sequence / end of turn: generation stops here, training appends it.
    pub eos: Option<SpecialToken>,
    /// Padding (often equal to eos).
    pub pad: Option<SpecialToken>,
    /// Unknown token.
    pub unk: Option<SpecialToken>,
    /// Every token marked special (control tokens), in id order.
    pub all: Vec<SpecialToken>,
}

/// A loaded tokenizer with its special tokens and chat template. Cheap to clone.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    /// The direct encoder for GPT-2-style byte-level BPE, when it applies.
    fast: Option<Arc<fast::FastBpe>>,
    /// The post-processor adds tokens (e.g. BOS) when special tokens are requested.
    post_adds_tokens: bool,
    special: SpecialTokens,
    template: Option<Arc<ChatTemplate>>,
    source: String,
    model_max_length: Option<usize>,
    /// Ids that end a reply: eos, end-of-turn tokens, and `generation_config.json`'s `eos_token_id`.
    stop_ids: Vec<u32>,
    /// The model folder the tokenizer files were read from (copied verbatim on save).
    files_dir: Option<PathBuf>,
}

/// Tokenizer files of a Hugging Face model folder, copied when a model is saved.
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "added_tokens.json",
];

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .field("chat_template", &self.template.is_some())
            .finish()
    }
}

fn read(path: &Path) -> Result<String, TokenizeError> {
    std::fs::read_to_string(path).map_err(|source| TokenizeError::Io { path: path.to_path_buf(), source })
}

/// A token given in tokenizer_config.json either as a string or as `{"content": ..}`.
fn config_token(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

/// The fast encoder and whether the post-processor adds tokens, from the
/// `tokenizer.json` text.
fn fast_parts(json: &str) -> (Option<Arc<fast::FastBpe>>, bool) {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(json) else { return (None, true) };
    let post = doc.get("post_processor").filter(|p| !p.is_null());
    let post_adds = post.is_some_and(|p| p.get("type").and_then(|t| t.as_str()) != Some("ByteLevel"));
    let disabled = std::env::var("TUNEBOOK_TOKENIZER").is_ok_and(|v| v == "reference");
    let fast = if disabled { None } else { fast::FastBpe::from_tokenizer_json(&doc).map(Arc::new) };
    (fast, post_adds)
}

/// Every added token marked special, in id order.
fn control_tokens(inner: &tokenizers::Tokenizer) -> Vec<SpecialToken> {
    let mut all: Vec<SpecialToken> = inner
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, t)| t.special)
        .map(|(id, t)| SpecialToken { id, content: t.content })
        .collect();
    all.sort_by_key(|t| t.id);
    all
}

impl Tokenizer {
    /// Loads a tokenizer from a `.gguf` file, a `tokenizer.json` file, or a model
    /// folder holding `tokenizer.json` (preferred) or a single `.gguf` file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, TokenizeError> {
        let path = path.as_ref();
        if path.is_file() {
            return if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
                Self::from_gguf(path)
            } else {
                Self::from_file(path)
            };
        }
        if path.is_dir() {
            let tj = path.join("tokenizer.json");
            if tj.is_file() {
                return Self::from_file(&tj);
            }
            let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|source| TokenizeError::Io { path: path.to_path_buf(), source })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")))
                .collect();
            if ggufs.len() == 1 {
                return Self::from_gguf(&ggufs[0]);
            }
        }
        Err(TokenizeError::NotFound { path: path.to_path_buf() })
    }

    /// Loads `tokenizer.json`, plus `tokenizer_config.json` and
    /// `chat_template.jinja` from the same folder when present (special tokens,
    /// chat template, maximum length).
    pub fn from_file(tokenizer_json: impl AsRef<Path>) -> Result<Self, TokenizeError> {
        let path = tokenizer_json.as_ref();
        let text = read(path)?;
        let inner: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e: tokenizers::Error| TokenizeError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = if config_path.is_file() {
            serde_json::from_str(&read(&config_path)?)
                .map_err(|e| TokenizeError::Parse { path: config_path.clone(), message: e.to_string() })?
        } else {
            serde_json::Value::Null
        };
        let mut template = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // a list of named templates: take "default"
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template").and_then(|s| s.as_str()).map(str::to_string)),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if template.is_none() && jinja.is_file() {
            template = Some(read(&jinja)?);
        }
        let by_name = |key: &str| -> Option<SpecialToken> {
            let content = config_token(config.get(key))?;
            inner.token_to_id(&content).map(|id| SpecialToken { id, content })
        };
        let mut special = SpecialTokens {
            bos: by_name("bos_token"),
            eos: by_name("eos_token"),
            pad: by_name("pad_token"),
            unk: by_name("unk_token"),
            all: vec![],
        };
        special.all = control_tokens(&inner);
        let model_max_length = config
            .get("model_max_length")
            .and_then(|v| v.as_f64())
            .filter(|v| *v > 0.0 && *v < 1e9)
            .map(|v| v as usize);
        let mut stop_ids: Vec<u32> = special.eos.iter().map(|t| t.id).collect();
        let generation = dir.join("generation_config.json");
        if generation.is_file() {
            let g: serde_json::Value = serde_json::from_str(&read(&generation)?)
                .map_err(|e| TokenizeError::Parse { path: generation.clone(), message: e.to_string() })?;
            match g.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => stop_ids.extend(n.as_u64().map(|v| v as u32)),
                Some(serde_json::Value::Array(a)) => stop_ids.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32)),
                _ => {}
            }
        }
        let mut tok = Self::assemble(&text, inner, special, template, path, model_max_length, stop_ids)?;
        tok.files_dir = Some(dir.to_path_buf());
        Ok(tok)
    }

    /// The tokenizer from its parts; `json` is the `tokenizer.json` text `inner` was parsed from.
    fn assemble(
        json: &str,
        inner: tokenizers::Tokenizer,
        special: SpecialTokens,
        template: Option<String>,
        path: &Path,
        model_max_length: Option<usize>,
        mut stop_ids: Vec<u32>,
    ) -> Result<Self, TokenizeError> {
        let (fast, post_adds_tokens) = fast_parts(json);
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let tok = Tokenizer {
            inner: Arc::new(inner),
            fast,
            post_adds_tokens,
            special,
            template: None,
            source: path.display().to_string(),
            model_max_length,
            stop_ids,
            files_dir: None,
        };
        match template {
            Some(t) => tok.with_chat_template(&t),
            None => Ok(tok),
        }
    }

    /// Rebuilds the tokenizer described by a GGUF file's metadata.
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self, TokenizeError> {
        let path = path.as_ref();
        let mut file = std::fs::File::open(path).map_err(|source| TokenizeError::Io { path: path.to_path_buf(), source })?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)
            .map_err(|e| TokenizeError::Gguf { path: path.to_path_buf(), message: format!("not a readable GGUF file: {e}") })?;
        Self::from_gguf_content(&content, path)
    }

    /// Rebuilds the tokenizer from already-read GGUF metadata (`path` is only
    /// used in messages).
    pub fn from_gguf_content(
        content: &candle_core::quantized::gguf_file::Content,
        path: impl AsRef<Path>,
    ) -> Result<Self, TokenizeError> {
        let path = path.as_ref();
        let g = gguf::build(content, path)?;
        let inner: tokenizers::Tokenizer = g.json.parse().map_err(|e: tokenizers::Error| TokenizeError::Gguf {
            path: path.to_path_buf(),
            message: format!("the rebuilt tokenizer does not load: {e}"),
        })?;
        let named = |id: Option<u32>| id.and_then(|id| g.tokens.get(id as usize).map(|c| SpecialToken { id, content: c.clone() }));
        let all = control_tokens(&inner);
        let special = SpecialTokens { bos: named(g.bos), eos: named(g.eos), pad: named(g.pad), unk: named(g.unk), all };
        let model_max_length = content
            .metadata
            .iter()
            .find(|(k, _)| k.ends_with(".context_length"))
            .and_then(|(_, v)| v.to_u32().ok().map(|v| v as usize).or_else(|| v.to_u64().ok().map(|v| v as usize)));
        let stop_ids = g.eos.into_iter().chain(g.end_of_turn.iter().copied()).collect();
        Self::assemble(&g.json, inner, special, g.chat_template, path, model_max_length, stop_ids)
    }

    /// Replaces the chat template (Jinja source as in tokenizer_config.json).
    pub fn with_chat_template(mut self, source: &str) -> Result<Self, TokenizeError> {
        let mut t = ChatTemplate::new(source)?;
        for (name, tok) in [("bos_token", &self.special.bos), ("eos_token", &self.special.eos), ("pad_token", &self.special.pad), ("unk_token", &self.special.unk)] {
            if let Some(tok) = tok {
                t = t.with_special(name, &tok.content);
            }
        }
        self.template = Some(Arc::new(t));
        Ok(self)
    }

    /// Where this tokenizer was loaded from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The model's context length when the files state it (`model_max_length`
    /// or GGUF `<arch>.context_length`).
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    /// Special tokens (bos, eos, pad, unk and every control token).
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Beginning-of-sequence id.
    pub fn bos_id(&self) -> Option<u32> {
        self.special.bos.as_ref().map(|t| t.id)
    }

    /// End-of-sequence (end of turn) id.
    pub fn eos_id(&self) -> Option<u32> {
        self.special.eos.as_ref().map(|t| t.id)
    }

    /// Every id that ends a reply: eos, the end-of-turn tokens a GGUF declares, and
    /// `generation_config.json`'s `eos_token_id` (Llama 3 lists several). Generation
    /// stops on any of them.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Writes the Hugging Face tokenizer files into a model folder: the files it
    /// was loaded from, verbatim, or (from a GGUF) `tokenizer.json` and a
    /// `tokenizer_config.json` with the chat template and special tokens.
    pub fn save_hf_files(&self, dir: &Path) -> Result<(), TokenizeError> {
        let write = |name: &str, bytes: &[u8]| -> Result<(), TokenizeError> {
            let p = dir.join(name);
            crate::files::write_atomic(&p, bytes)
                .map_err(|e| TokenizeError::Io { path: p, source: std::io::Error::other(format!("{e:#}")) })
        };
        if let Some(src) = &self.files_dir {
            if src != dir {
                for f in TOKENIZER_FILES {
                    let p = src.join(f);
                    if p.is_file() {
                        write(f, &std::fs::read(&p).map_err(|source| TokenizeError::Io { path: p.clone(), source })?)?;
                    }
                }
            }
            return Ok(());
        }
        write("tokenizer.json", self.inner.to_string(false).map_err(tk_err)?.as_bytes())?;
        let mut cfg = serde_json::Map::new();
        cfg.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        if let Some(t) = &self.template {
            cfg.insert("chat_template".into(), t.source().into());
        }
        for (key, tok) in [("bos_token", &self.special.bos), ("eos_token", &self.special.eos), ("pad_token", &self.special.pad), ("unk_token", &self.special.unk)] {
            if let Some(t) = tok {
                cfg.insert(key.into(), t.content.clone().into());
            }
        }
        if let Some(n) = self.model_max_length {
            cfg.insert("model_max_length".into(), n.into());
        }
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(cfg)).map_err(tk_err)?;
        write("tokenizer_config.json", text.as_bytes())
    }

    /// Padding id; falls back to eos when the model declares no pad token.
    pub fn pad_id(&self) -> Option<u32> {
        self.special.pad.as_ref().or(self.special.eos.as_ref()).map(|t| t.id)
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_deref()
    }

    /// The id of a token text, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token ids of `text`. With `add_special_tokens` the tokenizer's
    /// post-processor runs (it adds a BOS for models that want one). Special
    /// token texts inside `text` (e.g. `<|im_end|>`) become their single ids.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizeError> {
        if let Some(f) = self.fast_for(add_special_tokens) {
            return Ok(f.encode(text).0);
        }
        Ok(self.inner.encode_fast(text, add_special_tokens).map_err(tk_err)?.get_ids().to_vec())
    }

    fn fast_for(&self, add_special_tokens: bool) -> Option<&fast::FastBpe> {
        self.fast.as_deref().filter(|_| !(add_special_tokens && self.post_adds_tokens))
    }

    /// Whether this tokenizer encodes through tunebook's direct byte-level BPE
    /// encoder (same ids as `tokenizers`, several times faster) rather than
    /// through `tokenizers` itself. Set `TUNEBOOK_TOKENIZER=reference` before
    /// loading to always use `tokenizers`.
    pub fn uses_fast_encoder(&self) -> bool {
        self.fast.is_some()
    }

    /// The same tokenizer, encoding through `tokenizers` only.
    pub fn reference_encoder(mut self) -> Self {
        self.fast = None;
        self
    }

    /// Like [`Tokenizer::encode`], plus each token's byte range in `text`
    /// (special tokens added by the post-processor have `(0, 0)`).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<(usize, usize)>), TokenizeError> {
        if let Some(f) = self.fast_for(add_special_tokens) {
            return Ok(f.encode(text));
        }
        let enc = self.inner.encode(text, add_special_tokens).map_err(tk_err)?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Encodes many texts at once (in parallel on the CPU cores).
    pub fn encode_batch(&self, texts: &[&str], add_special_tokens: bool) -> Result<Vec<Vec<u32>>, TokenizeError> {
        if let Some(f) = self.fast_for(add_special_tokens) {
            use rayon::prelude::*;
            return Ok(texts.par_iter().map(|t| f.encode(t).0).collect());
        }
        let encs = self.inner.encode_batch_fast(texts.to_vec(), add_special_tokens).map_err(tk_err)?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Text of `ids`; with `skip_special_tokens` control tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizeError> {
        self.inner.decode(ids, skip_special_tokens).map_err(tk_err)
    }

    /// An incremental decoder for streaming generation: feed ids one at a time.
    pub fn decode_stream(&self, skip_special_tokens: bool) -> DecodeStream {
        DecodeStream { tokenizer: self.inner.clone(), skip_special_tokens, ids: vec![], prefix: String::new(), prefix_index: 0 }
    }

    fn template_or_err(&self) -> Result<&ChatTemplate, TokenizeError> {
        self.template.as_deref().ok_or_else(|| TokenizeError::NoChatTemplate { source_path: self.source.clone() })
    }

    /// Renders `messages` with the model's chat template, exactly as
    /// transformers' `apply_chat_template(.., tokenize=False)` does.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, TokenizeError> {
        Ok(self.template_or_err()?.render(messages, add_generation_prompt)?)
    }

    /// Ids of the rendered conversation, as transformers'
    /// `apply_chat_template(.., tokenize=True)`: the template writes its own BOS,
    /// so no special tokens are added on top.
    pub fn encode_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>, TokenizeError> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }
}

/// Incremental decoding for streaming: [`DecodeStream::step`] returns new text
/// only when it forms complete characters (a multi-byte character split over
/// tokens is held back until its last byte arrives).
pub struct DecodeStream {
    tokenizer: Arc<tokenizers::Tokenizer>,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl DecodeStream {
    /// Feeds one generated id; returns the text it completes, if any.
    pub fn step(&mut self, id: u32) -> Result<Option<String>, TokenizeError> {
        tokenizers::tokenizer::step_decode_stream(
            &**self.tokenizer,
            vec![id],
            self.skip_special_tokens,
            &mut self.ids,
            &mut self.prefix,
            &mut self.prefix_index,
        )
        .map_err(tk_err)
    }
}

#[cfg(test)]
pub(crate) mod tests;
