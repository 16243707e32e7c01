//! `tunebook data ...` as a user runs it: exit status and what it prints.

use std::path::Path;
use std::process::Command;

fn tunebook(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tunebook")).args(args).output().expect("the CLI runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

const GOOD: &str = r#"{"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}"#;

#[test]
fn validate_exits_zero_on_valid_data_and_one_on_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.jsonl", &format!("{GOOD}\n{GOOD}\n"));
    let (code, out, _) = tunebook(&["data", "validate", &good]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 rows of chat data, all valid"), "{out}");

    let bad = write(dir.path(), "bad.jsonl", &format!("{GOOD}\n{{\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}]}}\n"));
    let (code, out, _) = tunebook(&["data", "validate", &bad]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("too_few_messages") && out.contains("last_not_assistant"), "{out}");

    // an explicit task that does not fit the columns is invalid, not a crash
    let (code, out, _) = tunebook(&["data", "validate", &good, "--task", "text"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("missing_column"), "{out}");

    // column mapping
    let renamed = write(dir.path(), "renamed.jsonl", &GOOD.replace("\"messages\"", "\"conversation\""));
    assert_eq!(tunebook(&["data", "validate", &renamed]).0, 1);
    assert_eq!(tunebook(&["data", "validate", &renamed, "--messages", "conversation"]).0, 0);
}

#[test]
fn unreadable_sources_are_errors_with_status_two() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = tunebook(&["data", "validate", &dir.path().join("nope.jsonl").display().to_string()]);
    assert_eq!(code, 2);
    assert!(err.contains("no such file"), "{err}");
    let broken = write(dir.path(), "broken.jsonl", &format!("{GOOD}\n{{oops\n"));
    let (code, _, err) = tunebook(&["data", "validate", &broken]);
    assert_eq!(code, 2);
    assert!(err.contains("line 2"), "{err}");
    let (code, _, err) = tunebook(&["data", "validate", &broken, "--task", "poetry"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn stats_with_a_tokenizer_folder() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.jsonl", &format!("{GOOD}\n{GOOD}\n{GOOD}\n"));
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny_tokenizer");
    let (code, out, err) = tunebook(&["data", "stats", &good, "--model", &model.display().to_string(), "--context-length", "16"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("examples over the context length") && out.contains("exceed the context length 16"), "{out}");
    let (code, _, err) = tunebook(&["data", "stats", &good, "--model", &dir.path().display().to_string()]);
    assert_eq!(code, 2);
    assert!(err.contains("no tokenizer"), "{err}");
}
