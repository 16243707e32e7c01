//! A Hugging Face tokenizer rebuilt from GGUF metadata.
//!
//! llama.cpp stores a byte-level BPE (`tokenizer.ggml.model = gpt2`) as its
//! vocabulary (already spelled in the GPT-2 byte alphabet), its merges, token
//! types and a pre-tokenizer name (`tokenizer.ggml.pre`). The pre-tokenizer
//! decides how text is cut before BPE; getting it wrong changes ids (SmolLM2's
//! `smollm` splits every digit on its own). Each name maps to the
//! pre-tokenizer the model's own `tokenizer.json` declares; an unknown name is
//! an error rather than a silent GPT-2 fallback.

use super::{TokenizeError, tk_err};
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{Value as Json, json};
use std::path::Path;

/// Token type of a control token (`<|im_start|>`), in GGUF `tokenizer.ggml.token_type`.
const CONTROL: i32 = 3;
/// Token type of a user-defined added token (matched whole, not special).
const USER_DEFINED: i32 = 4;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pre-tokenizer names llama.cpp treats as Llama 3's (its split, and whole
/// pre-tokens looked up before merging).
const LLAMA3_IGNORE_MERGES: &[&str] = &["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"];

/// GGUF pre-tokenizer names this module knows, for error messages.
pub const KNOWN_PRE_TOKENIZERS: &[&str] = &[
    "default", "gpt-2", "gpt2", "smollm", "starcoder", "refact", "llama3", "llama-v3", "llama-bpe", "falcon3",
    "falcon-h1", "pixtral", "midm-2.0", "lfm2", "smaug-bpe", "dbrx", "qwen2", "deepseek-r1-qwen",
];

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split_then_byte_level(pattern: &str) -> Json {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
        byte_level(false),
    ]})
}

/// The `tokenizer.json` pre-tokenizer for a GGUF `tokenizer.ggml.pre` name.
pub(crate) fn pre_tokenizer_for(pre: &str) -> Option<Json> {
    Some(match pre {
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        p if LLAMA3_IGNORE_MERGES.contains(&p) || p == "smaug-bpe" || p == "dbrx" => split_then_byte_level(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" => split_then_byte_level(QWEN2_SPLIT),
        _ => return None,
    })
}

fn get<'a>(content: &'a Content, key: &str) -> Option<&'a Value> {
    content.metadata.get(key)
}

fn get_u32(content: &Content, key: &str) -> Option<u32> {
    get(content, key).and_then(|v| match v {
        Value::U32(x) => Some(*x),
        Value::I32(x) => u32::try_from(*x).ok(),
        Value::U64(x) => u32::try_from(*x).ok(),
        Value::I64(x) => u32::try_from(*x).ok(),
        Value::U16(x) => Some(u32::from(*x)),
        Value::U8(x) => Some(u32::from(*x)),
        _ => None,
    })
}

fn strings(content: &Content, key: &str, path: &Path) -> Result<Vec<String>, TokenizeError> {
    let bad = |what: &str| TokenizeError::Gguf { path: path.to_path_buf(), message: format!("`{key}` {what}") };
    let v = get(content, key).ok_or_else(|| bad("is missing"))?;
    let Value::Array(items) = v else { return Err(bad("is not an array")) };
    items
        .iter()
        .map(|i| match i {
            Value::String(s) => Ok(s.clone()),
            _ => Err(bad("holds a non-string entry")),
        })
        .collect()
}

/// What a GGUF file says about its tokenizer, as the pieces [`super::Tokenizer`] needs.
pub(crate) struct GgufTokenizer {
    pub json: String,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
    pub chat_template: Option<String>,
    pub tokens: Vec<String>,
    /// End-of-turn and end-of-message ids (`tokenizer.ggml.eot_token_id`, `eom_token_id`).
    pub end_of_turn: Vec<u32>,
}

/// Builds the `tokenizer.json` text for the tokenizer described by `content`.
pub(crate) fn build(content: &Content, path: &Path) -> Result<GgufTokenizer, TokenizeError> {
    let err = |message: String| TokenizeError::Gguf { path: path.to_path_buf(), message };
    let model = get(content, "tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok().cloned())
        .ok_or_else(|| err("no `tokenizer.ggml.model`: the file carries no tokenizer; load tokenizer.json instead".into()))?;
    if model == "llama" {
        return build_sentencepiece(content, path);
    }
    if model != "gpt2" {
        return Err(err(format!(
            "tokenizer model `{model}` is not supported from GGUF (only byte-level BPE, `gpt2`, and SentencePiece BPE, `llama`); \
             load the model's tokenizer.json instead"
        )));
    }
    let pre_name = get(content, "tokenizer.ggml.pre").and_then(|v| v.to_string().ok().cloned()).unwrap_or_else(|| "default".into());
    let pre = pre_tokenizer_for(&pre_name).ok_or_else(|| {
        err(format!(
            "pre-tokenizer `{pre_name}` is not known (known: {}); load the model's tokenizer.json instead",
            KNOWN_PRE_TOKENIZERS.join(", ")
        ))
    })?;
    let tokens = strings(content, "tokenizer.ggml.tokens", path)?;
    let merges = strings(content, "tokenizer.ggml.merges", path)?;
    let types: Vec<i32> = match get(content, "tokenizer.ggml.token_type") {
        Some(Value::Array(items)) => items.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    let mut added = vec![];
    for (i, (t, ty)) in tokens.iter().zip(types.iter().chain(std::iter::repeat(&1))).enumerate() {
        if *ty == CONTROL || *ty == USER_DEFINED {
            added.push(json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": *ty != CONTROL, "special": *ty == CONTROL}));
        }
    }
    let add_bos = get(content, "tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
    let post_processor = bos_post_processor(content, &tokens, add_bos);
    // Llama 3's own tokenizer.json looks a whole pre-token up before merging
    // (`ignore_merges`), and so does llama.cpp for these pre-tokenizers.
    let ignore_merges = LLAMA3_IGNORE_MERGES.contains(&pre_name.as_str());
    let model = json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
        "vocab": vocab, "merges": merges});
    let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
    let doc = tokenizer_json(added, pre, post_processor, decoder, model);
    Ok(specials(content, doc.to_string(), tokens))
}

/// A `tokenizer.json` document from its parts (no normalizer, truncation or padding).
fn tokenizer_json(added: Vec<Json>, pre: Json, post_processor: Json, decoder: Json, model: Json) -> Json {
    json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": pre, "post_processor": post_processor, "decoder": decoder, "model": model})
}

/// The post-processor that puts BOS first when `add_bos` is set.
fn bos_post_processor(content: &Content, tokens: &[String], add_bos: bool) -> Json {
    let bos = get_u32(content, "tokenizer.ggml.bos_token_id");
    match (add_bos, bos.and_then(|b| tokens.get(b as usize).map(|t| (b, t)))) {
        (true, Some((id, tok))) => json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": tok, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tok.as_str(): {"id": tok, "ids": [id], "tokens": [tok]}}}),
        _ => Json::Null,
    }
}

/// Special ids, chat template and end-of-turn ids, the same for every tokenizer model.
fn specials(content: &Content, json: String, tokens: Vec<String>) -> GgufTokenizer {
    GgufTokenizer {
        json,
        bos: get_u32(content, "tokenizer.ggml.bos_token_id"),
        eos: get_u32(content, "tokenizer.ggml.eos_token_id"),
        pad: get_u32(content, "tokenizer.ggml.padding_token_id"),
        unk: get_u32(content, "tokenizer.ggml.unknown_token_id"),
        chat_template: get(content, "tokenizer.chat_template").and_then(|v| v.to_string().ok().cloned()),
        tokens,
        end_of_turn: ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"].iter().filter_map(|k| get_u32(content, k)).collect(),
    }
}

/// The `tokenizer.json` of a SentencePiece BPE stored as llama.cpp's `llama` model:
/// a byte-fallback BPE whose merges follow the pieces' scores (as transformers
/// converts a `tokenizer.model`), `▁` for spaces, and a `▁` prefix unless
/// `tokenizer.ggml.add_space_prefix` is false.
fn build_sentencepiece(content: &Content, path: &Path) -> Result<GgufTokenizer, TokenizeError> {
    let err = |message: String| TokenizeError::Gguf { path: path.to_path_buf(), message };
    let tokens = strings(content, "tokenizer.ggml.tokens", path)?;
    let scores: Vec<f32> = match get(content, "tokenizer.ggml.scores") {
        Some(Value::Array(items)) => items.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
        _ => return Err(err("`tokenizer.ggml.scores` is missing: a SentencePiece vocabulary needs its scores".into())),
    };
    let types: Vec<i32> = match get(content, "tokenizer.ggml.token_type") {
        Some(Value::Array(items)) => items.iter().map(|v| v.to_i32().unwrap_or(NORMAL)).collect(),
        _ => vec![NORMAL; tokens.len()],
    };
    if scores.len() != tokens.len() || types.len() != tokens.len() {
        return Err(err(format!(
            "{} tokens, {} scores and {} token types: the vocabulary arrays must be the same length",
            tokens.len(),
            scores.len(),
            types.len()
        )));
    }
    let unk = get_u32(content, "tokenizer.ggml.unknown_token_id").or_else(|| types.iter().position(|t| *t == UNKNOWN).map(|i| i as u32));
    let prefix = get(content, "tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()).unwrap_or(true);
    let vocab: serde_json::Map<String, Json> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, ty))| matches!(**ty, CONTROL | USER_DEFINED | UNKNOWN))
        .map(|(i, (t, ty))| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": *ty == USER_DEFINED, "special": *ty != USER_DEFINED})
        })
        .collect();
    // llama.cpp adds BOS to a SentencePiece vocabulary unless told otherwise.
    let add_bos = get(content, "tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(true);
    let post_processor = bos_post_processor(content, &tokens, add_bos);
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let pre = json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": if prefix { "always" } else { "never" }, "split": false});
    let model = json!({"type": "BPE", "dropout": null, "unk_token": unk.and_then(|u| tokens.get(u as usize)), "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
        "vocab": vocab, "merges": sentencepiece_merges(&tokens, &scores, &types)});
    let doc = tokenizer_json(added, pre, post_processor, json!({"type": "Sequence", "decoders": decoders}), model);
    Ok(specials(content, doc.to_string(), tokens))
}

/// The text llama.cpp's converter encodes to recognise a pre-tokenizer
/// (`get_vocab_base_pre`'s `chktxt`: whitespace runs, emoji, digits, Khmer, Chinese,
/// Bulgarian, quotes and contractions).
const LLAMA_CPP_CHECK_TEXT: &str = include_str!("data/llama_cpp_chktxt.txt");

/// llama.cpp's table from the SHA-256 of the check text's token ids to its
/// pre-tokenizer name (`hash<TAB>name`, as its converter resolves them).
const LLAMA_CPP_PRE_HASHES: &str = include_str!("data/llama_cpp_pre_hashes.tsv");

/// Token types in `tokenizer.ggml.token_type`.
const NORMAL: i32 = 1;
const UNUSED: i32 = 5;

/// Added tokens that llama.cpp's converter treats as control tokens even when the
/// tokenizer does not mark them special.
fn looks_special(t: &str) -> bool {
    (t.starts_with("<|") && t.ends_with("|>") && t.len() > 4)
        || matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<｜") && t.ends_with("｜>"))
}

impl super::Tokenizer {
    /// The pre-tokenizer name llama.cpp gives this tokenizer: the SHA-256 of the ids
    /// of its check text (encoded with special tokens, as transformers' `encode`
    /// does), looked up in llama.cpp's table. A tokenizer llama.cpp does not know is an
    /// error: a guessed name makes llama.cpp split text differently from training.
    pub fn llama_cpp_pre_tokenizer(&self) -> Result<String, TokenizeError> {
        use sha2::Digest;
        let ids = self.encode(LLAMA_CPP_CHECK_TEXT, true)?;
        let repr = format!("[{}]", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "));
        let hash: String = sha2::Sha256::digest(repr.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        LLAMA_CPP_PRE_HASHES
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(h, _)| *h == hash)
            .map(|(_, name)| name.trim().to_string())
            .ok_or_else(|| TokenizeError::Tokenizer(format!(
                "llama.cpp does not know this tokenizer's pre-tokenizer (check-text hash {hash}, from {}): \
                 a GGUF file needs a name llama.cpp recognises, and guessing one would make it cut text \
                 differently from training. Export to Hugging Face layout instead, or use a base model llama.cpp supports",
                self.source
            )))
    }

    /// The `tokenizer.*` GGUF metadata llama.cpp reads, as its converter writes it.
    ///
    /// - Byte-level BPE (Llama 3, SmolLM2, Qwen2, Mistral Nemo): model `gpt2`, the
    ///   pre-tokenizer name ([`llama_cpp_pre_tokenizer`](Self::llama_cpp_pre_tokenizer)),
    ///   token types (control for special tokens, user-defined for other added tokens)
    ///   and the merges.
    /// - SentencePiece-style BPE (`byte_fallback`: Llama 2, Mistral v0.1–v0.3): model
    ///   `llama`, pre-tokenizer `default`, one score per token (what SentencePiece
    ///   gives a piece: minus its rank among the pieces after the unknown, control and
    ///   `<0xXX>` byte pieces; llama.cpp merges the pair whose result scores highest),
    ///   token types (unknown, control, byte, normal), no merges, and
    ///   `add_space_prefix` as the tokenizer's `▁` prefix says.
    ///
    /// Both: tokens padded to `vocab_size` with `[PAD{i}]`, special token ids,
    /// `add_bos_token` and the chat template.
    pub fn gguf_metadata(&self, vocab_size: usize) -> Result<Vec<(String, Value)>, TokenizeError> {
        let doc: Json = serde_json::from_str(&self.inner.to_string(false).map_err(tk_err)?).map_err(tk_err)?;
        let model = &doc["model"];
        let kind = model["type"].as_str().unwrap_or("?");
        if kind != "BPE" {
            return Err(TokenizeError::Tokenizer(format!(
                "a `{kind}` tokenizer ({}) is not written to GGUF: only BPE (byte-level as in Llama 3, SmolLM2 and Qwen2, \
                 or SentencePiece-style as in Llama 2 and Mistral) is",
                self.source
            )));
        }
        let spm = model["byte_fallback"].as_bool() == Some(true);
        // transformers 5 leaves the BPE model's `unk_token` out; the special tokens name it.
        let unk = model["unk_token"].as_str().or(self.special.unk.as_ref().map(|t| t.content.as_str()));
        let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
        let mut types = vec![UNUSED; vocab_size];
        let vocab = model["vocab"].as_object().ok_or_else(|| TokenizeError::Tokenizer(format!("{}: model.vocab is not a map", self.source)))?;
        let mut too_big = None;
        for (t, id) in vocab {
            let id = id.as_u64().unwrap_or(u64::MAX) as usize;
            if id >= vocab_size {
                too_big = Some(id);
                continue;
            }
            types[id] = match spm {
                true if Some(t.as_str()) == unk => UNKNOWN,
                true if is_byte_piece(t) => BYTE,
                _ => NORMAL,
            };
            tokens[id] = Some(t.clone());
        }
        for a in doc["added_tokens"].as_array().into_iter().flatten() {
            let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else { continue };
            let id = id as usize;
            if id >= vocab_size {
                too_big = Some(id);
                continue;
            }
            let special = a["special"].as_bool().unwrap_or(false);
            tokens[id] = Some(content.to_string());
            types[id] = match () {
                _ if spm && Some(content) == unk => UNKNOWN,
                _ if special || looks_special(content) => CONTROL,
                _ => USER_DEFINED,
            };
        }
        if let Some(id) = too_big {
            return Err(TokenizeError::Tokenizer(format!(
                "{}: token id {id} is beyond the model's vocabulary of {vocab_size} (embedding rows): the tokenizer does not belong to this model",
                self.source
            )));
        }
        let mut md = vec![];
        if spm {
            let add_space_prefix = self.sentencepiece_space_prefix(&doc)?;
            // SentencePiece scores its pieces by rank; the ranked pieces start after the
            // unknown, control and byte pieces, which score 0 (padding scores -10000, as
            // llama.cpp's converter pads).
            let first = types.iter().position(|t| *t == NORMAL).unwrap_or(0);
            let scores: Vec<Value> = (0..vocab_size)
                .map(|i| match (types[i], tokens[i].is_some()) {
                    (_, false) => -10000.0,
                    (NORMAL, true) => -((i - first) as f32),
                    _ => 0.0,
                })
                .map(Value::F32)
                .collect();
            md.push(("tokenizer.ggml.model".to_string(), Value::String("llama".into())));
            md.push(("tokenizer.ggml.pre".to_string(), Value::String("default".into())));
            md.push(("tokenizer.ggml.tokens".to_string(), pad_tokens(tokens)));
            md.push(("tokenizer.ggml.scores".to_string(), Value::Array(scores)));
            md.push(("tokenizer.ggml.token_type".to_string(), Value::Array(types.into_iter().map(Value::I32).collect())));
            md.push(("tokenizer.ggml.add_space_prefix".to_string(), Value::Bool(add_space_prefix)));
        } else {
            let merges: Vec<Value> = model["merges"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| match m {
                    Json::String(s) => Value::String(s.clone()),
                    Json::Array(p) => Value::String(p.iter().filter_map(Json::as_str).collect::<Vec<_>>().join(" ")),
                    other => Value::String(other.to_string()),
                })
                .collect();
            md.push(("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())));
            md.push(("tokenizer.ggml.pre".to_string(), Value::String(self.llama_cpp_pre_tokenizer()?)));
            md.push(("tokenizer.ggml.tokens".to_string(), pad_tokens(tokens)));
            md.push(("tokenizer.ggml.token_type".to_string(), Value::Array(types.into_iter().map(Value::I32).collect())));
            md.push(("tokenizer.ggml.merges".to_string(), Value::Array(merges)));
        }
        for (key, tok) in [("bos", &self.special.bos), ("eos", &self.special.eos), ("unknown", &self.special.unk), ("padding", &self.special.pad)] {
            if let Some(t) = tok {
                md.push((format!("tokenizer.ggml.{key}_token_id"), Value::U32(t.id)));
            }
        }
        // What transformers' encode adds: a BOS when the post-processor puts one first.
        let add_bos = match self.bos_id() {
            Some(b) => self.encode("a", true)?.first() == Some(&b),
            None => false,
        };
        md.push(("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(add_bos)));
        if let Some(t) = &self.template {
            md.push(("tokenizer.chat_template".to_string(), Value::String(t.source().to_string())));
        }
        Ok(md)
    }

    /// Whether a SentencePiece-style tokenizer puts `▁` before its text, the way
    /// llama.cpp's `add_space_prefix` does: a `Metaspace` pre-tokenizer that does not
    /// split on spaces, or (older `tokenizer.json` files) a `Prepend("▁")` normalizer.
    /// Anything else would make llama.cpp cut text differently, so it is an error.
    fn sentencepiece_space_prefix(&self, doc: &Json) -> Result<bool, TokenizeError> {
        let refuse = |what: String| {
            TokenizeError::Tokenizer(format!(
                "{}: {what}; llama.cpp's SentencePiece tokenizer would cut text differently from this tokenizer, \
                 so it is not written to GGUF. Export to Hugging Face layout instead",
                self.source
            ))
        };
        let pre = &doc["pre_tokenizer"];
        match pre["type"].as_str() {
            Some("Metaspace") => {
                if pre["split"].as_bool() == Some(true) {
                    return Err(refuse("its Metaspace pre-tokenizer splits on spaces".into()));
                }
                Ok(pre["prepend_scheme"].as_str() != Some("never") && pre["add_prefix_space"].as_bool() != Some(false))
            }
            None => {
                let norm = &doc["normalizer"];
                let steps: Vec<&Json> = match norm["type"].as_str() {
                    Some("Sequence") => norm["normalizers"].as_array().map(|v| v.iter().collect()).unwrap_or_default(),
                    Some(_) => vec![norm],
                    None => vec![],
                };
                let prepends = steps.iter().any(|n| n["type"] == "Prepend" && n["prepend"] == "▁");
                let replaces = steps.iter().any(|n| n["type"] == "Replace" && n["pattern"]["String"] == " " && n["content"] == "▁");
                if !replaces {
                    return Err(refuse("it does not turn spaces into `▁` (no Metaspace pre-tokenizer or Replace normalizer)".into()));
                }
                Ok(prepends)
            }
            Some(other) => Err(refuse(format!("its pre-tokenizer is `{other}`"))),
        }
    }
}

/// Token types in `tokenizer.ggml.token_type` that only SentencePiece vocabularies use.
const UNKNOWN: i32 = 2;
const BYTE: i32 = 6;

/// A SentencePiece byte piece, `<0x0A>`.
fn is_byte_piece(t: &str) -> bool {
    t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') && t[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

fn pad_tokens(tokens: Vec<Option<String>>) -> Value {
    Value::Array(tokens.into_iter().enumerate().map(|(i, t)| Value::String(t.unwrap_or_else(|| format!("[PAD{i}]")))).collect())
}

/// The merges a SentencePiece BPE implies, as transformers derives them when it
/// converts a `tokenizer.model`: every split of a normal piece into two normal
/// pieces, ordered by the piece's score (highest first), then by the longer left and
/// right part; equal keys keep the order of the ids.
fn sentencepiece_merges(tokens: &[String], scores: &[f32], types: &[i32]) -> Vec<Json> {
    let normal = |i: usize| types.get(i).is_none_or(|t| *t == NORMAL);
    let ids: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().filter(|(i, _)| normal(*i)).map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges = vec![];
    for (i, piece) in tokens.iter().enumerate().filter(|(i, _)| normal(*i)) {
        let mut local = vec![];
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&a), Some(&b)) = (ids.get(l), ids.get(r)) {
                local.push((a, b, l, r));
            }
        }
        local.sort_by_key(|m| (m.0, m.1));
        let score = scores.get(i).copied().unwrap_or(0.0);
        merges.extend(local.into_iter().map(|(_, _, l, r)| (score, l, r)));
    }
    merges.sort_by(|x, y| {
        y.0.total_cmp(&x.0).then_with(|| y.1.chars().count().cmp(&x.1.chars().count())).then_with(|| y.2.chars().count().cmp(&x.2.chars().count()))
    });
    merges.into_iter().map(|(_, l, r)| json!([l, r])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::Tokenizer;
    use candle_core::quantized::gguf_file::VersionedMagic;
    use std::collections::HashMap;

    /// GGUF metadata for a toy byte-level BPE: the 256 byte characters, a few
    /// merges, and `<s>` / `</s>` control tokens.
    fn content(model: &str, pre: Option<&str>, add_bos: bool) -> Content {
        let chars = crate::tokenize::fast::byte_chars_for_tests();
        let mut tokens: Vec<String> = vec!["<s>".into(), "</s>".into()];
        tokens.extend(chars.iter().map(|c| c.to_string()));
        for t in ["ab", "Ġa", "Ġab", "12"] {
            tokens.push(t.into());
        }
        let merges = ["Ġ a", "a b", "Ġa b", "1 2"];
        let mut types = vec![3i32, 3];
        types.extend(std::iter::repeat_n(1, tokens.len() - 2));
        let mut md: HashMap<String, Value> = HashMap::new();
        md.insert("tokenizer.ggml.model".into(), Value::String(model.into()));
        if let Some(p) = pre {
            md.insert("tokenizer.ggml.pre".into(), Value::String(p.into()));
        }
        md.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect()));
        md.insert("tokenizer.ggml.merges".into(), Value::Array(merges.iter().map(|m| Value::String(m.to_string())).collect()));
        md.insert("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect()));
        md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(0));
        md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(1));
        md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos));
        md.insert("toy.context_length".into(), Value::U32(128));
        md.insert("tokenizer.chat_template".into(), Value::String("{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}".into()));
        Content { magic: VersionedMagic::GgufV3, metadata: md, tensor_infos: HashMap::new(), tensor_data_offset: 0 }
    }

    fn id(tok: &Tokenizer, t: &str) -> u32 {
        tok.token_to_id(t).unwrap()
    }

    #[test]
    fn gpt2_and_smollm_pre_tokenizers() {
        let tok = Tokenizer::from_gguf_content(&content("gpt2", None, false), "toy.gguf").unwrap();
        assert!(tok.uses_fast_encoder());
        assert_eq!(tok.model_max_length(), Some(128));
        assert_eq!(tok.encode("ab ab", false).unwrap(), vec![id(&tok, "ab"), id(&tok, "Ġab")]);
        // plain GPT-2 keeps "12" together, smollm splits every digit
        assert_eq!(tok.encode("12", false).unwrap(), vec![id(&tok, "12")]);
        let smol = Tokenizer::from_gguf_content(&content("gpt2", Some("smollm"), false), "toy.gguf").unwrap();
        assert_eq!(smol.encode("12", false).unwrap(), vec![id(&smol, "1"), id(&smol, "2")]);
        assert_eq!(smol.encode("<s>ab</s>", false).unwrap(), vec![0, id(&smol, "ab"), 1]);
        for t in [&tok, &smol] {
            let reference = t.clone().reference_encoder();
            for text in ["ab ab", "12 ab1", " a  b\n", "x<s>12</s>"] {
                assert_eq!(t.encode(text, false).unwrap(), reference.encode(text, false).unwrap(), "{text:?}");
            }
        }
    }

    #[test]
    fn llama3_split_bos_and_template() {
        let tok = Tokenizer::from_gguf_content(&content("gpt2", Some("llama-bpe"), true), "toy.gguf").unwrap();
        assert!(!tok.uses_fast_encoder(), "Split + ByteLevel goes through tokenizers");
        assert_eq!(tok.encode("ab", true).unwrap(), vec![0, id(&tok, "ab")], "add_bos_token adds BOS");
        assert_eq!(tok.encode("ab", false).unwrap(), vec![id(&tok, "ab")]);
        // the template writes BOS: encode_chat must not add another
        let ids = tok.encode_chat(&[crate::tokenize::Message::user("ab")], false).unwrap();
        assert_eq!(ids, vec![0, id(&tok, "ab"), 1]);
    }

    #[test]
    fn unsupported_metadata_says_what_to_do() {
        let err = Tokenizer::from_gguf_content(&content("gpt2", Some("mystery"), false), "toy.gguf").unwrap_err().to_string();
        assert!(err.contains("mystery") && err.contains("smollm") && err.contains("tokenizer.json"), "{err}");
        let err = Tokenizer::from_gguf_content(&content("bert", None, false), "toy.gguf").unwrap_err().to_string();
        assert!(err.contains("bert") && err.contains("tokenizer.json"), "{err}");
        let err = Tokenizer::from_gguf_content(&content("llama", None, false), "toy.gguf").unwrap_err().to_string();
        assert!(err.contains("tokenizer.ggml.scores") && err.contains("missing"), "{err}");
        let mut c = content("gpt2", None, false);
        c.metadata.remove("tokenizer.ggml.merges");
        let err = Tokenizer::from_gguf_content(&c, "toy.gguf").unwrap_err().to_string();
        assert!(err.contains("tokenizer.ggml.merges") && err.contains("missing"), "{err}");
        let mut c = content("gpt2", None, false);
        c.metadata.clear();
        assert!(Tokenizer::from_gguf_content(&c, "toy.gguf").is_err());
    }

    /// The Llama 2 style tokenizer of the export tests, with its JSON edited by `edit`.
    fn spm_variant(edit: impl FnOnce(&mut Json)) -> Result<Tokenizer, TokenizeError> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny_spm_tokenizer/tokenizer.json");
        let mut doc: Json = serde_json::from_str(&std::fs::read_to_string(dir).unwrap()).unwrap();
        edit(&mut doc);
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("tokenizer.json");
        std::fs::write(&file, doc.to_string()).unwrap();
        Tokenizer::from_file(&file)
    }

    fn space_prefix(tok: &Tokenizer) -> Result<bool, TokenizeError> {
        let md = tok.gguf_metadata(tok.vocab_size())?;
        Ok(md.iter().find(|(k, _)| k == "tokenizer.ggml.add_space_prefix").and_then(|(_, v)| v.to_bool().ok()).unwrap())
    }

    #[test]
    fn a_sentencepiece_space_prefix_is_read_from_either_tokenizer_json_layout_and_odd_ones_are_refused() {
        assert!(space_prefix(&spm_variant(|_| {}).unwrap()).unwrap());
        let never = spm_variant(|d| d["pre_tokenizer"]["prepend_scheme"] = json!("never")).unwrap();
        assert!(!space_prefix(&never).unwrap());
        // Llama 2 / Mistral v0.1 checkpoints: no pre-tokenizer, a Prepend + Replace normalizer.
        let legacy = |prepend: bool| {
            move |d: &mut Json| {
                d["pre_tokenizer"] = Json::Null;
                let mut steps = vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})];
                if prepend {
                    steps.insert(0, json!({"type": "Prepend", "prepend": "▁"}));
                }
                d["normalizer"] = json!({"type": "Sequence", "normalizers": steps});
            }
        };
        let old = spm_variant(legacy(true)).unwrap();
        assert!(space_prefix(&old).unwrap());
        assert_eq!(old.encode("Hello world", false).unwrap(), spm_variant(|_| {}).unwrap().encode("Hello world", false).unwrap());
        assert!(!space_prefix(&spm_variant(legacy(false)).unwrap()).unwrap());
        let split = spm_variant(|d| d["pre_tokenizer"]["split"] = json!(true)).unwrap();
        let err = split.gguf_metadata(512).unwrap_err().to_string();
        assert!(err.contains("splits on spaces") && err.contains("Hugging Face layout"), "{err}");
        let whitespace = spm_variant(|d| d["pre_tokenizer"] = json!({"type": "Whitespace"})).unwrap();
        let err = whitespace.gguf_metadata(512).unwrap_err().to_string();
        assert!(err.contains("`Whitespace`"), "{err}");
    }

    #[test]
    fn sentencepiece_merges_follow_the_scores_of_the_pieces_they_make() {
        let tokens: Vec<String> = ["<unk>", "a", "b", "c", "ab", "bc", "abc"].iter().map(|s| s.to_string()).collect();
        let types = [UNKNOWN, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL];
        // "bc" outranks "ab"; "abc" splits as a+bc and ab+c, longer left part first.
        let scores = [0.0, -4.0, -5.0, -6.0, -1.0, -0.0, -2.0];
        let merges = sentencepiece_merges(&tokens, &scores, &types);
        assert_eq!(merges, vec![json!(["b", "c"]), json!(["a", "b"]), json!(["ab", "c"]), json!(["a", "bc"])]);
    }
}
