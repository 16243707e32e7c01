//! The bundled sample task: rewrite a date written in words as `YYYY-MM-DD`.
//!
//! Small models get the format or the digits wrong often enough that an exact-match
//! score separates a base model from a fine-tuned one within minutes of CPU
//! training. The examples are generated deterministically here and committed as
//! `data/sample/dates-{train,eval}.jsonl` (a test keeps the files and the generator
//! in step).

use crate::tokenize::Message;
use anyhow::{Context, Result, bail};
use std::path::Path;

const MONTHS: [&str; 12] = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December",
];

/// The instruction every example starts with.
pub const INSTRUCTION: &str = "Rewrite the date as YYYY-MM-DD. Answer with the date only.";

fn ordinal(d: u32) -> String {
    let suffix = match (d % 10, d % 100) {
        (1, x) if x != 11 => "st",
        (2, x) if x != 12 => "nd",
        (3, x) if x != 13 => "rd",
        _ => "th",
    };
    format!("{d}{suffix}")
}

fn days_in(month: u32, year: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The folder holding the bundled sample files (`data/sample` in the repository).
pub fn bundled_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("data").join("sample")
}

/// The model the sample task fine-tunes: SmolLM2-135M-Instruct as GGUF, from
/// `TUNEBOOK_SMOLLM2_GGUF` or the cache `scripts/setup.sh` fills.
pub fn base_model() -> Result<String> {
    let p = match std::env::var("TUNEBOOK_SMOLLM2_GGUF") {
        Ok(p) if !p.is_empty() => std::path::PathBuf::from(p),
        _ => Path::new(&std::env::var("HOME").unwrap_or_default()).join(".cache/tunebook/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    if !p.is_file() {
        bail!("the sample model {} is missing: run ./scripts/setup.sh (it fetches SmolLM2-135M-Instruct) or set TUNEBOOK_SMOLLM2_GGUF", p.display());
    }
    Ok(p.display().to_string())
}

/// One example: the user's message and the exact expected answer.
pub fn example(i: u64) -> (String, String) {
    // splitmix64 of the index: stable across platforms and releases.
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let year = 1950 + (z % 90) as u32;
    let month = 1 + ((z >> 8) % 12) as u32;
    let day = 1 + ((z >> 16) % days_in(month, year) as u64) as u32;
    let name = MONTHS[month as usize - 1];
    let short = &name[..3];
    let written = match (z >> 24) % 6 {
        0 => format!("{name} {day}, {year}"),
        1 => format!("{day} {name} {year}"),
        2 => format!("{short} {}, {year}", ordinal(day)),
        3 => format!("the {} of {name}, {year}", ordinal(day)),
        4 => format!("{name} {}, {year}", ordinal(day)),
        _ => format!("{day} {short}. {year}"),
    };
    (format!("{INSTRUCTION}\nDate: {written}"), format!("{year:04}-{month:02}-{day:02}"))
}

/// Writes `dates-train.jsonl` (`train` rows) and `dates-eval.jsonl` (`eval`
/// held-out rows, disjoint from the training rows) in chat format into `dir`.
pub fn write(dir: impl AsRef<Path>, train: usize, eval: usize) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let rows = |range: std::ops::Range<u64>| -> Result<String> {
        let mut s = String::new();
        for i in range {
            let (q, a) = example(i);
            let row = serde_json::json!({"messages": [Message::user(q), Message::assistant(a)]});
            s.push_str(&serde_json::to_string(&row)?);
            s.push('\n');
        }
        Ok(s)
    };
    crate::files::write_atomic(&dir.join("dates-train.jsonl"), rows(0..train as u64)?.as_bytes())?;
    crate::files::write_atomic(&dir.join("dates-eval.jsonl"), rows(1_000_000..1_000_000 + eval as u64)?.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_are_valid_dates_and_the_bundled_files_match_the_generator() {
        for i in 0..2000 {
            let (q, a) = example(i);
            assert!(q.starts_with(INSTRUCTION));
            let parts: Vec<u32> = a.split('-').map(|p| p.parse().unwrap()).collect();
            assert!(parts[1] >= 1 && parts[1] <= 12 && parts[2] >= 1 && parts[2] <= days_in(parts[1], parts[0]), "{a}");
        }
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 400, 100).unwrap();
        let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/sample");
        for f in ["dates-train.jsonl", "dates-eval.jsonl"] {
            let ours = std::fs::read_to_string(dir.path().join(f)).unwrap();
            let committed = std::fs::read_to_string(bundled.join(f)).unwrap();
            assert_eq!(ours, committed, "{f} differs from the generator: regenerate with `tunebook sample data/sample`");
        }
    }
}
