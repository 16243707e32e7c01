//! Persistent, locked evcxr crate directories ("slots").
//!
//! evcxr compiles every cell inside a crate directory whose `target/` holds the
//! compiled dependencies. A fresh directory per start would rebuild the whole
//! dependency tree (tens of minutes for tunebook), so kernels reuse
//! `$TUNEBOOK_CACHE/kernel/slot-N`. Each slot is guarded by an exclusive `flock`
//! held for the kernel's lifetime: a second kernel running at the same time takes
//! the next free slot, so two kernels never compile into the same directory.
//!
//! Sharing with the workspace build: a slot's `target/` starts as a hard-link
//! copy of the workspace target directory that built this kernel (no bytes are
//! copied), and the directory above the slots carries the workspace's own
//! `.cargo/config.toml` (embedded at compile time), so evcxr's build of
//! `tunebook` uses the exact profile, target triple and rustflags of
//! `cargo build`: the dependency tree is compiled once and serves the tests, the
//! CLI and the notebook. Having its own directory means a cell never waits on
//! cargo's lock while a workspace build runs.

use anyhow::{Context, Result, bail};
use std::fs::{self, File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The workspace's cargo configuration, embedded so the slot build matches it.
pub const PROFILE_CONFIG: &str = include_str!("../../.cargo/config.toml");

/// The target triple the workspace builds for (evcxr passes `--target` too).
pub const TARGET_TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// Most kernels that can run at once on one machine.
pub const MAX_SLOTS: usize = 16;

/// The kernel's state (slots, standby socket, REPL history) lives in tunebook's
/// cache, `$TUNEBOOK_CACHE`, default `~/.cache/tunebook` (the library's
/// `files::cache_dir`; runs and other user data are in `$TUNEBOOK_HOME`).
pub fn cache_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("TUNEBOOK_CACHE").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("tunebook")
}

/// Where the slots live.
pub fn slots_root() -> PathBuf {
    cache_dir().join("kernel")
}

/// The source directory of the `tunebook` library the kernel preloads:
/// `$TUNEBOOK_LIB_PATH`, else the `lib/` directory this kernel was built from.
pub fn library_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TUNEBOOK_LIB_PATH") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("lib")
}

/// The cargo target directory that built this executable, if it is one
/// (`<dir>/x86_64-unknown-linux-gnu/<profile>/tunebook-kernel` with `<dir>/CACHEDIR.TAG`).
/// `$TUNEBOOK_TARGET_DIR` overrides.
pub fn shared_target_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TUNEBOOK_TARGET_DIR") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?.canonicalize().ok()?;
    let profile_dir = exe.parent()?;
    let triple_dir = profile_dir.parent()?;
    if triple_dir.file_name()? != TARGET_TRIPLE {
        return None;
    }
    let target = triple_dir.parent()?;
    target.join("CACHEDIR.TAG").exists().then(|| target.to_path_buf())
}

/// A locked slot; the lock is released when this value is dropped or the process exits.
#[derive(Debug)]
pub struct Slot {
    /// The evcxr crate directory (`EVCXR_TMPDIR`).
    pub dir: PathBuf,
    _lock: File,
}

/// Takes an exclusive `flock` on `path` without waiting; `None` when another
/// process holds it.
pub fn try_lock(path: &Path) -> Result<Option<File>> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open lock file {}", path.display()))?;
    // SAFETY: flock on a valid open descriptor.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 { Ok(Some(f)) } else { Ok(None) }
}

/// Writes `contents` to `path` atomically (temp file + rename) if it differs.
pub fn write_if_changed(path: &Path, contents: &str) -> Result<()> {
    if fs::read_to_string(path).ok().as_deref() == Some(contents) {
        return Ok(());
    }
    let dir = path.parent().context("path has no parent")?;
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp-{}", path.file_name().unwrap().to_string_lossy(), std::process::id()));
    fs::write(&tmp, contents)?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// Takes the first free slot, preparing its directory. With `reseed`, the slot's
/// compiled dependencies are refreshed from the shared target directory (what
/// `install` and `prewarm` do after a new build).
pub fn acquire(reseed: bool) -> Result<Slot> {
    let root = slots_root();
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    // Config for every slot: cargo reads it from a parent of evcxr's crate dir.
    write_if_changed(&root.join(".cargo").join("config.toml"), PROFILE_CONFIG)?;
    for index in 0..MAX_SLOTS {
        let Some(lock) = try_lock(&root.join(format!("slot-{index}.lock")))? else { continue };
        let dir = root.join(format!("slot-{index}"));
        fs::create_dir_all(&dir)?;
        prepare_target(&dir, reseed)?;
        return Ok(Slot { dir, _lock: lock });
    }
    bail!(
        "all {MAX_SLOTS} kernel slots under {} are in use: shut down an idle kernel, or remove stale \
         slot-N.lock files if no tunebook kernel is running",
        root.display()
    )
}

/// Gives the slot its own `target/`, seeded with hard links to the shared
/// target's compiled dependencies: nothing is copied or recompiled, and the
/// slot's cargo never waits on a lock held by a workspace build.
fn prepare_target(dir: &Path, reseed: bool) -> Result<()> {
    let target = dir.join("target");
    let Some(shared) = shared_target_dir() else { return Ok(()) };
    if let Ok(meta) = fs::symlink_metadata(&target) {
        if !reseed && !meta.file_type().is_symlink() {
            return Ok(());
        }
        let old = dir.join(format!("target.old-{}", std::process::id()));
        if meta.file_type().is_symlink() {
            fs::remove_file(&target)?;
        } else {
            fs::rename(&target, &old)?;
            std::thread::spawn(move || {
                let _ = fs::remove_dir_all(old);
            });
        }
    }
    let staging = dir.join(format!("target.new-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    // Host artifacts (build scripts, proc macros) and the target-triple build,
    // without incremental caches (large, and only for workspace crates).
    let parts: Vec<(PathBuf, PathBuf)> = ["build", "deps", ".fingerprint"]
        .iter()
        .flat_map(|sub| {
            [
                (shared.join("debug").join(sub), staging.join("debug").join(sub)),
                (shared.join(TARGET_TRIPLE).join("debug").join(sub), staging.join(TARGET_TRIPLE).join("debug").join(sub)),
            ]
        })
        .collect();
    for (from, to) in parts {
        if !from.exists() {
            continue;
        }
        fs::create_dir_all(to.parent().unwrap())?;
        let status = std::process::Command::new("cp").arg("-al").arg(&from).arg(&to).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "tunebook-kernel: could not link {} into the kernel cache; it will be compiled instead",
                from.display()
            );
        }
    }
    for file in [".rustc_info.json", "CACHEDIR.TAG"] {
        let _ = fs::copy(shared.join(file), staging.join(file));
    }
    fs::create_dir_all(&staging)?;
    link_library_build(dir, &staging);
    fs::rename(&staging, &target)?;
    Ok(())
}

/// Links slot 0's build of `tunebook` itself (the rlib, and the notebook
/// crate's shared object: see [`notebook_crate`]) into a new slot's target. The
/// workspace's build of the library cannot be reused (as a path dependency of
/// evcxr's crate its metadata hash differs), so without this every new slot, a
/// second kernel or a standby, would spend minutes compiling the library
/// again. Slot 0 is the one `install` pre-warms; the cell crates' artifacts are
/// never shared between slots.
fn link_library_build(dir: &Path, staging: &Path) {
    let Some(root) = dir.parent() else { return };
    let first = root.join("slot-0").join("target").join(TARGET_TRIPLE).join("debug");
    if dir == root.join("slot-0") || !first.exists() {
        return;
    }
    for (sub, prefix) in [("deps", "libtunebook"), (".fingerprint", "tunebook-")] {
        let Ok(entries) = fs::read_dir(first.join(sub)) else { continue };
        let to_dir = staging.join(TARGET_TRIPLE).join("debug").join(sub);
        for e in entries.flatten() {
            if !e.file_name().to_string_lossy().starts_with(prefix) {
                continue;
            }
            let to = to_dir.join(e.file_name());
            if to.exists() || fs::create_dir_all(&to_dir).is_err() {
                continue;
            }
            // The shared object is copied, not linked: a running kernel has it
            // mapped, and a later rebuild in one slot must not rewrite it under
            // the other. rlibs and fingerprints are only read at build time.
            let how = if e.file_name().to_string_lossy().ends_with(".so") { "-p" } else { "-al" };
            let _ = std::process::Command::new("cp").arg(how).arg(e.path()).arg(&to).status();
        }
    }
}

/// Writes the crate notebook cells depend on: `tunebook` re-exported as one
/// shared object (`crate-type = ["dylib"]`, library name `tunebook`). Linked
/// against the rlib instead, every cell's shared object would be linked from the
/// ~360 rlibs of the dependency tree (0.7 s of a cell's 1 s compile, measured),
/// and would carry its own copy of the library's statics. Returns its directory.
pub fn notebook_crate(library: &Path) -> Result<PathBuf> {
    let dir = slots_root().join("notebook-lib");
    let library = library.canonicalize().unwrap_or_else(|_| library.to_path_buf());
    let manifest = format!(
        "# Written by tunebook-kernel (kernel/src/slot.rs): the tunebook library as one\n\
         # shared object that notebook cells link against.\n\
         [package]\nname = \"tunebook-notebook\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
         [lib]\nname = \"tunebook\"\npath = \"lib.rs\"\ncrate-type = [\"dylib\"]\n\n\
         [dependencies]\ntunebook-core = {{ package = \"tunebook\", path = {:?} }}\n\n\
         [features]\ncuda = [\"tunebook-core/cuda\"]\n",
        library.display().to_string()
    );
    write_if_changed(&dir.join("Cargo.toml"), &manifest)?;
    write_if_changed(&dir.join("lib.rs"), "//! The tunebook library, re-exported as a dylib for notebook cells.\npub use tunebook_core::*;\n")?;
    Ok(dir)
}

/// Copies the workspace's `Cargo.lock` into the evcxr crate directory
/// (`$EVCXR_TMPDIR`), so evcxr resolves the same dependency versions that the
/// workspace compiled. With `overwrite` false, an existing lock is kept.
pub fn seed_lockfile(library: &Path, overwrite: bool) {
    let Some(dir) = std::env::var_os("EVCXR_TMPDIR").map(PathBuf::from) else { return };
    let lock = dir.join("Cargo.lock");
    if lock.exists() && !overwrite {
        return;
    }
    let ws_lock = library.join("..").join("Cargo.lock");
    if ws_lock.exists() {
        let tmp = dir.join(".Cargo.lock.tmp");
        if fs::copy(&ws_lock, &tmp).is_ok() {
            let _ = fs::rename(&tmp, &lock);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_profile_matches_what_evcxr_passes() {
        // evcxr always builds with RUSTFLAGS=-Cprefer-dynamic and --target <host>;
        // the workspace must build the same way for artifacts to be shared.
        assert!(PROFILE_CONFIG.contains("rustflags = [\"-Cprefer-dynamic\"]"));
        assert!(PROFILE_CONFIG.contains(&format!("target = \"{TARGET_TRIPLE}\"")));
        assert!(PROFILE_CONFIG.contains("[profile.dev.package.\"*\"]"));
    }

    #[test]
    fn second_lock_on_a_slot_fails_while_the_first_is_held() {
        let dir = std::env::temp_dir().join(format!("tb-slot-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("slot-0.lock");
        let first = try_lock(&p).unwrap();
        assert!(first.is_some());
        assert!(try_lock(&p).unwrap().is_none(), "flock is exclusive across open file descriptions");
        drop(first);
        assert!(try_lock(&p).unwrap().is_some());
        let _ = fs::remove_dir_all(dir);
    }
}
