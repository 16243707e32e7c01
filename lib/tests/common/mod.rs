//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

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
