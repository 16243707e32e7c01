//! Writing files and directories so that they appear complete or not at all, and
//! where tunebook keeps its data.
//!
//! Every file the library writes for a user (model weights, run files, checkpoints,
//! downloads) goes through here: it is written under a temporary name in the
//! destination's directory, flushed to disk (`fsync`), renamed over the final name,
//! and the directory is flushed so the rename itself survives a crash. A reader
//! never sees half a file, and an interrupted writer leaves the previous version in
//! place. Errors from each of these steps are returned, never swallowed: a full
//! disk must not leave a file that looks written.
//!
//! | place | default | override |
//! |---|---|---|
//! | [`home`]: user data (runs, the local MLflow server) | `~/.tunebook` | `TUNEBOOK_HOME` |
//! | [`runs_root`]: fine-tuning runs | `<home>/runs` | `TUNEBOOK_RUNS` |
//! | [`mlflow_dir`]: `tunebook mlflow up`'s database and artifacts | `<home>/mlflow` | `TUNEBOOK_MLFLOW_DIR` |
//! | [`cache_dir`]: what can be fetched or rebuilt again (registry downloads, models, builds) | `~/.cache/tunebook` | `TUNEBOOK_CACHE` |
//!
//! Must never: import another module of the library, or leave a file under its
//! final name that was not completely written.

use anyhow::{Context, Result, anyhow};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

fn env_dir(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn user_home() -> PathBuf {
    env_dir("HOME").unwrap_or_else(|| PathBuf::from("."))
}

/// Where tunebook keeps user data: `$TUNEBOOK_HOME`, by default `~/.tunebook`.
pub fn home() -> PathBuf {
    env_dir("TUNEBOOK_HOME").unwrap_or_else(|| user_home().join(".tunebook"))
}

/// Where runs live: `$TUNEBOOK_RUNS`, by default `<home>/runs`.
pub fn runs_root() -> PathBuf {
    env_dir("TUNEBOOK_RUNS").unwrap_or_else(|| home().join("runs"))
}

/// The local MLflow server's data (`tunebook mlflow up`): `$TUNEBOOK_MLFLOW_DIR`,
/// by default `<home>/mlflow` (user data beside the runs, not in a cache).
pub fn mlflow_dir() -> PathBuf {
    env_dir("TUNEBOOK_MLFLOW_DIR").unwrap_or_else(|| home().join("mlflow"))
}

/// Caches, safe to delete: `$TUNEBOOK_CACHE`, by default `~/.cache/tunebook`.
pub fn cache_dir() -> PathBuf {
    env_dir("TUNEBOOK_CACHE").unwrap_or_else(|| user_home().join(".cache").join("tunebook"))
}

fn parent_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Flushes a directory's entries to disk, so a rename into it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = std::fs::File::open(dir).with_context(|| format!("opening {} to flush it", dir.display()))?;
    d.sync_all().with_context(|| format!("flushing {} to disk", dir.display()))
}

/// Replaces `path` with `bytes` atomically (temporary file, `fsync`, rename,
/// `fsync` of the directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes).map_err(Into::into))
}

/// Replaces `path` atomically with what `write` writes into a buffered writer:
/// for large files written as a stream. When `write` fails, nothing changes
/// under `path` and the temporary file is removed.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut BufWriter<&mut std::fs::File>) -> Result<()>) -> Result<()> {
    let dir = parent_of(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    {
        let mut w = BufWriter::with_capacity(1 << 16, tmp.as_file_mut());
        write(&mut w).with_context(|| format!("writing {}", path.display()))?;
        w.flush().with_context(|| format!("writing {}", path.display()))?;
    }
    tmp.as_file().sync_all().with_context(|| format!("flushing {} to disk", path.display()))?;
    tmp.persist(path).map_err(|e| anyhow!("renaming a temporary file into {}: {}", path.display(), e.error))?;
    sync_dir(dir)
}

/// What [`StagedDir::commit`] does when the destination already exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfExists {
    /// Keep the existing directory (it is complete: someone committed it first)
    /// and drop the staged one.
    Keep,
    /// Replace it: the old directory is moved aside, the new one renamed in, then
    /// the old one removed.
    Replace,
}

/// A directory being written: files go into a temporary directory beside the
/// destination, and [`commit`](StagedDir::commit) renames it into place. Dropped
/// without a commit, it is removed.
pub struct StagedDir {
    tmp: tempfile::TempDir,
    dest: PathBuf,
}

impl StagedDir {
    /// Starts writing the directory `dest` (its parent is created if needed).
    pub fn new(dest: impl Into<PathBuf>) -> Result<Self> {
        let dest = dest.into();
        let parent = parent_of(&dest).to_path_buf();
        std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".tmp-{name}-"))
            .tempdir_in(&parent)
            .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
        Ok(StagedDir { tmp, dest })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// The final directory.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Flushes every file written, then renames the directory into place. Returns
    /// the final directory.
    pub fn commit(self, if_exists: IfExists) -> Result<PathBuf> {
        sync_tree(self.tmp.path())?;
        let parent = parent_of(&self.dest).to_path_buf();
        let tmp = self.tmp.keep();
        let moved_aside = match (if_exists, self.dest.exists()) {
            (IfExists::Replace, true) => {
                let aside = parent.join(format!(".old-{}", uuid::Uuid::new_v4().simple()));
                if let Err(e) = std::fs::rename(&self.dest, &aside) {
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(e).with_context(|| format!("moving the old {} aside", self.dest.display()));
                }
                Some(aside)
            }
            _ => None,
        };
        match std::fs::rename(&tmp, &self.dest) {
            Ok(()) => {}
            Err(_) if if_exists == IfExists::Keep && self.dest.is_dir() => {
                std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
                return Ok(self.dest);
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                if let Some(aside) = &moved_aside {
                    let _ = std::fs::rename(aside, &self.dest);
                }
                return Err(e).with_context(|| format!("moving the new directory into {}", self.dest.display()));
            }
        }
        sync_dir(&parent)?;
        if let Some(aside) = moved_aside {
            std::fs::remove_dir_all(&aside).with_context(|| format!("removing the old directory {}", aside.display()))?;
        }
        Ok(self.dest)
    }
}

/// `fsync`s every file under `dir`, and the directories themselves.
fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            sync_tree(&p)?;
        } else {
            let f = std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
            f.sync_all().with_context(|| format!("flushing {} to disk", p.display()))?;
        }
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_file_write_replaces_and_a_failed_write_keeps_the_old_file() -> Result<()> {
        let d = tempfile::tempdir()?;
        let p = d.path().join("status.json");
        write_atomic(&p, b"one")?;
        write_atomic(&p, b"two")?;
        assert_eq!(std::fs::read(&p)?, b"two");
        let e = write_atomic_with(&p, |w| {
            w.write_all(b"half")?;
            anyhow::bail!("disk full")
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("disk full") && format!("{e:#}").contains("status.json"), "{e:#}");
        assert_eq!(std::fs::read(&p)?, b"two");
        let left: Vec<_> = std::fs::read_dir(d.path())?.flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 1, "temporary files left behind: {left:?}");
        Ok(())
    }

    #[test]
    fn atomic_write_into_a_missing_directory_says_where() {
        let e = write_atomic(Path::new("/nonexistent-dir-for-test/x.json"), b"x").unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent-dir-for-test"), "{e:#}");
    }

    #[test]
    fn staged_directory_appears_whole_and_keep_or_replace_decides_a_second_commit() -> Result<()> {
        let d = tempfile::tempdir()?;
        let dest = d.path().join("a/model");
        let s = StagedDir::new(&dest)?;
        std::fs::write(s.path().join("w"), b"1")?;
        assert!(!dest.exists());
        assert_eq!(s.commit(IfExists::Keep)?, dest);
        assert_eq!(std::fs::read(dest.join("w"))?, b"1");

        let s = StagedDir::new(&dest)?;
        std::fs::write(s.path().join("w"), b"2")?;
        s.commit(IfExists::Keep)?;
        assert_eq!(std::fs::read(dest.join("w"))?, b"1", "Keep keeps the first complete directory");

        let s = StagedDir::new(&dest)?;
        std::fs::write(s.path().join("w"), b"3")?;
        s.commit(IfExists::Replace)?;
        assert_eq!(std::fs::read(dest.join("w"))?, b"3");

        let s = StagedDir::new(&dest)?;
        std::fs::write(s.path().join("w"), b"4")?;
        drop(s);
        assert_eq!(std::fs::read(dest.join("w"))?, b"3", "a dropped stage changes nothing");
        let left: Vec<_> = std::fs::read_dir(dest.parent().unwrap())?.flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("model")], "temporary or old directories left behind");
        Ok(())
    }
}
