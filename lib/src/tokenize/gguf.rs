//! A Hugging Face tokenizer rebuilt from GGUF metadata.
//!
//! llama.cpp stores a byte-level BPE (`tokenizer.ggml.model = gpt2`) as its
//! vocabulary (already spelled in the GPT-2 byte alphabet), its merges, token
//! types and a pre-tokenizer name (`tokenizer.ggml.pre`). The pre-tokenizer
//! decides how text is cut before BPE; getting it wrong changes ids (SmolLM2's
//! `smollm` splits every digit on its own). Each name maps to the
//! pre-tokenizer the model's own `tokenizer.json` declares; an unknown name is
//! an error rather than a silent GPT-2 fallback.

use super::TokenizeError;
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{Value as Json, json};
use std::path::Path;

/// Token type of a control token (`<|im_start|>`), in GGUF `tokenizer.ggml.token_type`.
const CONTROL: i32 = 3;
/// Token type of a user-defined added token (matched whole, not special).
const USER_DEFINED: i32 = 4;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF pre-tokenizer names this module knows, for error messages.
pub const KNOWN_PRE_TOKENIZERS: &[&str] = &[
    "default", "gpt-2", "gpt2", "smollm", "starcoder", "refact", "llama3", "llama-v3", "llama-bpe", "smaug-bpe",
    "falcon3", "dbrx", "qwen2", "deepseek-r1-qwen",
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
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "falcon3" | "dbrx" => split_then_byte_level(LLAMA3_SPLIT),
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
}

/// Builds the `tokenizer.json` text for the tokenizer described by `content`.
pub(crate) fn build(content: &Content, path: &Path) -> Result<GgufTokenizer, TokenizeError> {
    let err = |message: String| TokenizeError::Gguf { path: path.to_path_buf(), message };
    let model = get(content, "tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok().cloned())
        .ok_or_else(|| err("no `tokenizer.ggml.model`: the file carries no tokenizer; load tokenizer.json instead".into()))?;
    if model != "gpt2" {
        return Err(err(format!(
            "tokenizer model `{model}` is not supported from GGUF (only byte-level BPE, `gpt2`); load the model's tokenizer.json instead"
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
    let bos = get_u32(content, "tokenizer.ggml.bos_token_id");
    let eos = get_u32(content, "tokenizer.ggml.eos_token_id");
    let pad = get_u32(content, "tokenizer.ggml.padding_token_id");
    let unk = get_u32(content, "tokenizer.ggml.unknown_token_id");
    let add_bos = get(content, "tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
    let post_processor = match (add_bos, bos.and_then(|b| tokens.get(b as usize).map(|t| (b, t)))) {
        (true, Some((id, tok))) => json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": tok, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tok.as_str(): {"id": tok, "ids": [id], "tokens": [tok]}}}),
        _ => Json::Null,
    };
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    });
    let chat_template = get(content, "tokenizer.chat_template").and_then(|v| v.to_string().ok().cloned());
    Ok(GgufTokenizer { json: doc.to_string(), bos, eos, pad, unk, chat_template, tokens })
}
