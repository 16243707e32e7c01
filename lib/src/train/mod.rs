//! Fine-tuning runs: the [`FineTune`] builder, the trainer, checkpoints and the
//! worker process that runs them.

use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

/// Where runs live: `$TUNEBOOK_HOME/runs`, by default `~/.tunebook/runs`.
pub fn runs_root() -> PathBuf {
    let home = std::env::var_os("TUNEBOOK_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into())).join(".tunebook"));
    home.join("runs")
}

/// The directory of run `name_or_path`: an existing directory path, or a run name
/// under [`runs_root`].
pub fn resolve_run_dir(name_or_path: &str) -> Result<PathBuf> {
    let p = Path::new(name_or_path);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let d = runs_root().join(name_or_path);
    if d.is_dir() {
        return Ok(d);
    }
    bail!(
        "no run named {name_or_path:?}: neither a directory nor a run under {} (list runs with `tunebook runs list`)",
        runs_root().display()
    )
}

