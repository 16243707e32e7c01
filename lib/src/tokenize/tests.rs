//! Tokenizer and chat-template tests against the Hugging Face references in
//! `lib/tests/data` (made by `lib/tests/data/make_reference.py`).

use super::*;
use serde_json::Value;

pub(crate) fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn load_json(name: &str) -> Value {
    let text = std::fs::read_to_string(data_dir().join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

/// The SmolLM2 GGUF, or `None` (with a message) when it has not been downloaded.
pub(crate) fn smollm2_gguf() -> Option<PathBuf> {
    let path = std::env::var_os("TUNEBOOK_SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(".cache/tunebook/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if path.is_file() {
        Some(path)
    } else {
        eprintln!("SKIPPED: {} is absent; run scripts/setup.sh to download the SmolLM2 GGUF", path.display());
        None
    }
}

#[test]
fn tiny_tokenizer_json_matches_reference_ids() {
    let r = load_json("tiny_tokenizer_reference.json");
    let tok = Tokenizer::load(data_dir().join("tiny_tokenizer")).unwrap();
    assert_eq!(tok.bos_id(), Some(r["bos_id"].as_u64().unwrap() as u32));
    assert_eq!(tok.eos_id(), Some(r["eos_id"].as_u64().unwrap() as u32));
    assert_eq!(tok.pad_id(), Some(r["pad_id"].as_u64().unwrap() as u32));
    assert_eq!(tok.model_max_length(), Some(2048));
    let texts: Vec<&str> = r["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(tok.encode(text, false).unwrap(), ids(&r["ids"][i]), "ids of {text:?}");
        assert_eq!(tok.encode(text, true).unwrap(), ids(&r["ids_with_special"][i]), "ids+special of {text:?}");
        let decoded = tok.decode(&ids(&r["ids"][i]), false).unwrap();
        assert_eq!(decoded, r["decoded"][i].as_str().unwrap(), "decode of {text:?}");
    }
    let batch = tok.encode_batch(&texts, false).unwrap();
    for (i, b) in batch.iter().enumerate() {
        assert_eq!(*b, ids(&r["ids"][i]));
    }
}

#[test]
fn tiny_tokenizer_chat_has_exactly_one_bos() {
    let r = load_json("tiny_tokenizer_reference.json");
    let tok = Tokenizer::load(data_dir().join("tiny_tokenizer/tokenizer.json")).unwrap();
    let bos = tok.bos_id().unwrap();
    for (name, case) in r["chats"].as_object().unwrap() {
        let msgs = messages(&case["messages"]);
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(tok.apply_chat_template(&msgs, agp).unwrap(), case["text"].as_str().unwrap(), "{name}");
        let got = tok.encode_chat(&msgs, agp).unwrap();
        assert_eq!(got, ids(&case["ids"]), "{name}");
        assert_eq!(got.iter().filter(|&&i| i == bos).count(), 1, "{name}: one BOS, written by the template");
    }
}

#[test]
fn chat_templates_render_like_transformers() {
    let r = load_json("chat_templates_reference.json");
    let special = r["special_tokens"].as_object().unwrap();
    let mut checked = 0;
    for case in r["cases"].as_array().unwrap() {
        let source = r["templates"][case["template"].as_str().unwrap()].as_str().unwrap();
        let mut t = ChatTemplate::new(source).unwrap();
        for (k, v) in special {
            t = t.with_special(k, v.as_str().unwrap());
        }
        let msgs = &r["message_sets"][case["messages"].as_str().unwrap()];
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let tools = case["with_tools"].as_bool().unwrap().then(|| &r["tools"]);
        let got = t.render_json(msgs, agp, tools);
        let label = format!("{} / {} / agp={agp}", case["template"], case["messages"]);
        match (&case["rendered"], &case["error"]) {
            (Value::String(expected), _) => assert_eq!(got.unwrap(), *expected, "{label}"),
            (_, Value::String(message)) => match got {
                Err(TemplateError::Raised(m)) => assert_eq!(&m, message, "{label}"),
                other => panic!("{label}: expected the template to raise {message:?}, got {other:?}"),
            },
            _ => panic!("malformed reference case {label}"),
        }
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} cases");
}

#[test]
fn tokenizer_without_template_says_how_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(data_dir().join("tiny_tokenizer/tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    let tok = Tokenizer::load(dir.path()).unwrap();
    let err = tok.apply_chat_template(&[Message::user("hi")], true).unwrap_err();
    assert!(err.to_string().contains("with_chat_template"), "{err}");
    let tok = tok.with_chat_template("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}").unwrap();
    assert_eq!(tok.apply_chat_template(&[Message::user("hi")], false).unwrap(), "[user] hi\n");
    // newer model folders keep the template in chat_template.jinja
    std::fs::write(dir.path().join("chat_template.jinja"), "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}").unwrap();
    let tok = Tokenizer::load(dir.path()).unwrap();
    assert_eq!(tok.apply_chat_template(&[Message::user("hi")], false).unwrap(), "<user>hi");
    // a template that does not compile is an error at load time, naming the fix
    std::fs::write(dir.path().join("chat_template.jinja"), "{% for m in messages %}").unwrap();
    let err = Tokenizer::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("does not compile") && err.contains("chat_template"), "{err}");
}

#[test]
fn bad_tokenizer_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(Tokenizer::load(dir.path()), Err(TokenizeError::NotFound { .. })));
    let bad = dir.path().join("tokenizer.json");
    std::fs::write(&bad, "{not json").unwrap();
    assert!(matches!(Tokenizer::load(&bad), Err(TokenizeError::Parse { .. })));
    let gguf = dir.path().join("x.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    assert!(matches!(Tokenizer::load(&gguf), Err(TokenizeError::Gguf { .. })));
    std::fs::write(&bad, "[]").unwrap();
    assert!(Tokenizer::load(&bad).is_err());
}

#[test]
fn smollm2_gguf_matches_hugging_face_ids() {
    let Some(path) = smollm2_gguf() else { return };
    let r = load_json("smollm2_reference.json");
    let tok = Tokenizer::load(&path).unwrap();
    assert_eq!(r["pre_tokenizer_type"], "smollm");
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.pad_id(), Some(2));
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.model_max_length(), Some(8192));
    let specials: Vec<&str> = tok.special_tokens().all.iter().map(|t| t.content.as_str()).collect();
    let expected: Vec<&str> = r["special_tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(specials, expected);
    let mut loader_differs = false;
    for (i, text) in r["texts"].as_array().unwrap().iter().enumerate() {
        let text = text.as_str().unwrap();
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, ids(&r["ids"][i]), "ids of {text:?}");
        assert_eq!(tok.encode(text, true).unwrap(), got, "SmolLM2 adds no BOS to plain text");
        assert_eq!(tok.decode(&got, false).unwrap(), r["decoded"][i].as_str().unwrap());
        loader_differs |= got != ids(&r["gguf_loader_ids"][i]);
    }
    assert!(loader_differs, "digits must split one by one, unlike a plain GPT-2 pre-tokenizer");
    for (name, case) in r["chats"].as_object().unwrap() {
        let msgs = messages(&case["messages"]);
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(tok.apply_chat_template(&msgs, agp).unwrap(), case["text"].as_str().unwrap(), "{name}");
        assert_eq!(tok.encode_chat(&msgs, agp).unwrap(), ids(&case["ids"]), "{name}");
    }
    let prompt = tok.encode_chat(&[Message::user("What is the capital of France?")], true).unwrap();
    assert_eq!(prompt.len(), 37);
    assert_eq!(prompt[..7], [1, 9690, 198, 2683, 359, 253, 5356]);
}

#[test]
fn smollm2_stream_decoding_holds_back_partial_characters() {
    let Some(path) = smollm2_gguf() else { return };
    let tok = Tokenizer::load(&path).unwrap();
    let text = "Emoji: 😀👍🏽 and 你好, then 12345.";
    let ids = tok.encode(text, false).unwrap();
    let mut stream = tok.decode_stream(false);
    let mut out = String::new();
    let mut pieces = 0;
    for id in &ids {
        if let Some(piece) = stream.step(*id).unwrap() {
            assert!(!piece.contains('\u{FFFD}'), "a piece with a broken character: {piece:?}");
            out.push_str(&piece);
            pieces += 1;
        }
    }
    assert_eq!(out, text);
    assert!(pieces < ids.len(), "multi-byte characters span several tokens and are held back");
    assert!(tok.decode(&[u32::MAX], false).is_err() || tok.decode(&[u32::MAX], false).unwrap().is_empty());
}

/// Random text over awkward characters: the direct encoder and `tokenizers` agree on ids and offsets.
fn fast_equals_reference(tok: &Tokenizer, extra: &[&str]) {
    assert!(tok.uses_fast_encoder(), "{} should use the direct encoder", tok.source());
    let reference = tok.clone().reference_encoder();
    let pool: Vec<char> = " \t\n\r\u{a0}\u{3000}\u{200b}aZeé你ßʰ\u{301}0123456789٣²½'srvetlmd.,!?-_😀🇺\u{fe0f}\"#<|>imstrandÄ\u{4}".chars().collect();
    let mut state = 11u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut texts: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    for _ in 0..3000 {
        let len = (next() % 40) as usize;
        texts.push((0..len).map(|_| pool[(next() % pool.len() as u64) as usize]).collect());
    }
    for t in &texts {
        let ours = tok.encode_with_offsets(t, false).unwrap();
        let theirs = reference.encode_with_offsets(t, false).unwrap();
        assert_eq!(ours.0, theirs.0, "ids of {t:?}");
        // a byte missing from the vocabulary is dropped by both; `tokenizers` then
        // shifts the offsets after it, the direct encoder keeps true positions
        if !t.contains('\u{4}') {
            assert_eq!(ours.1, theirs.1, "offsets of {t:?}");
        }
        assert_eq!(tok.encode(t, true).unwrap(), reference.encode(t, true).unwrap(), "ids+special of {t:?}");
    }
}

#[test]
fn direct_encoder_matches_tokenizers_on_smollm2() {
    let Some(path) = smollm2_gguf() else { return };
    let tok = Tokenizer::load(&path).unwrap();
    let r = load_json("smollm2_reference.json");
    let texts: Vec<&str> = r["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    fast_equals_reference(&tok, &texts);
    let long = "abcdefghij".repeat(300);
    fast_equals_reference(&tok, &["<|im_start|>user\n12 apples<|im_end|>\n<|im_start|>assistant\n", "<|im_end|><|im_end|>x<|endoftext|>", &long]);
}

#[test]
fn tiny_tokenizer_keeps_the_reference_encoder() {
    // Split + ByteLevel(use_regex = false) is not the configuration the direct encoder reproduces
    let tok = Tokenizer::load(data_dir().join("tiny_tokenizer")).unwrap();
    assert!(!tok.uses_fast_encoder());
}
