//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The GGUF path, or `None` after printing why the test is skipped. Panics
/// instead when `TUNEBOOK_REQUIRE_SMOLLM2=1`: a test suite that is meant to run
/// against the model must not pass without it.
pub fn gguf_or_skip(test: &str) -> Option<PathBuf> {
    let path = gguf_path();
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("TUNEBOOK_REQUIRE_SMOLLM2").is_ok_and(|v| v == "1") {
        panic!("{test}: {} is absent and TUNEBOOK_REQUIRE_SMOLLM2=1 (run scripts/setup.sh to download it)", path.display());
    }
    eprintln!("SKIPPED {test}: {} is absent (run scripts/setup.sh to download it)", path.display());
    None
}

pub fn gguf_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TUNEBOOK_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache/tunebook/models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub mod formula;

/// `lib/tests/data`.
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// One temporary home for every test in a test binary: runs go to `$TUNEBOOK_RUNS`,
/// detached workers run this build's CLI, and no MLflow server is used.
pub fn runs_home() -> &'static Path {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    HOME.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        // SAFETY: set once, before any test reads it (every test calls runs_home() first).
        unsafe {
            std::env::set_var("TUNEBOOK_RUNS", d.path().join("runs"));
            std::env::set_var("TUNEBOOK_BIN", env!("CARGO_BIN_EXE_tunebook"));
            std::env::remove_var("MLFLOW_TRACKING_URI");
        }
        d
    })
    .path()
}

/// The tiny chat model's configuration (the tiny tokenizer's vocabulary).
pub fn tiny_chat_config() -> tunebook::model::LlamaConfig {
    tunebook::model::LlamaConfig { vocab_size: 705, bos_token_id: Some(0), eos_token_ids: vec![4], ..tunebook::model::LlamaConfig::tiny() }
}

/// A tiny chat model (random weights from `seed`, the tiny tokenizer) in `dir`.
pub fn tiny_chat_model(dir: &Path, seed: u64) -> anyhow::Result<tunebook::model::LlamaModel> {
    let m = tunebook::model::write_tiny_model(dir, tiny_chat_config(), seed)?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(data_dir().join("tiny_tokenizer").join(f), dir.join(f))?;
    }
    Ok(m)
}

/// `n` short conversations in JSONL: the assistant repeats a colour named by the user.
pub fn colour_conversations(path: &Path, n: usize) -> anyhow::Result<()> {
    let colours = ["red", "green", "blue", "white", "black"];
    let mut out = String::new();
    for i in 0..n {
        let c = colours[i % colours.len()];
        let row = serde_json::json!({"messages": [
            {"role": "user", "content": format!("say {c} {i}")},
            {"role": "assistant", "content": format!("{c} {c} {c}")},
        ]});
        out.push_str(&row.to_string());
        out.push('\n');
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// A temporary folder with the tiny chat model (`model/`, seed 7) and `rows`
/// conversations (`train.jsonl`); the runs home is set up first.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub model: PathBuf,
    pub data: PathBuf,
}

pub fn fixture(rows: usize) -> anyhow::Result<Fixture> {
    runs_home();
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    tiny_chat_model(&model, 7)?;
    let data = dir.path().join("train.jsonl");
    colour_conversations(&data, rows)?;
    Ok(Fixture { dir, model, data })
}
