//! `tunebook-kernel install`: the kernelspec, and pre-warming the compile cache.

use crate::engine::{Engine, EngineConfig, Event, Frontend};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Name of the kernelspec directory (what `--kernel tunebook` selects).
pub const KERNEL_NAME: &str = "tunebook";
/// What JupyterLab's launcher shows.
pub const DISPLAY_NAME: &str = "Rust (tunebook)";

/// Where to install the kernelspec, following `jupyter kernelspec install`.
#[derive(Debug, Clone)]
pub enum Location {
    /// `$JUPYTER_DATA_DIR` or `~/.local/share/jupyter`.
    User,
    /// The active Python environment (`$VIRTUAL_ENV`, else `python3`'s `sys.prefix`).
    SysPrefix,
    /// `<prefix>/share/jupyter`.
    Prefix(PathBuf),
}

fn python_prefix() -> Result<PathBuf> {
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        return Ok(PathBuf::from(v));
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.prefix)"])
        .output()
        .context("--sys-prefix needs python3 on PATH (or VIRTUAL_ENV set)")?;
    if !out.status.success() {
        bail!("python3 could not report sys.prefix");
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The `kernels/` directory for a location.
pub fn kernels_dir(loc: &Location) -> Result<PathBuf> {
    Ok(match loc {
        Location::User => match std::env::var_os("JUPYTER_DATA_DIR") {
            Some(d) => PathBuf::from(d),
            None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".local/share/jupyter"),
        }
        .join("kernels"),
        Location::SysPrefix => python_prefix()?.join("share/jupyter/kernels"),
        Location::Prefix(p) => p.join("share/jupyter/kernels"),
    })
}

/// The kernel.json contents for this executable.
pub fn kernel_json(exe: &Path) -> serde_json::Value {
    let mut env = serde_json::Map::new();
    for var in ["TUNEBOOK_HOME", "TUNEBOOK_CACHE", "TUNEBOOK_LIB_PATH", "TUNEBOOK_TARGET_DIR", "TUNEBOOK_RUNS", "TUNEBOOK_BIN"] {
        if let Ok(v) = std::env::var(var) {
            env.insert(var.into(), v.into());
        }
    }
    // Fine-tuning runs start `tunebook train` workers: the CLI built beside this kernel.
    if !env.contains_key("TUNEBOOK_BIN") {
        if let Some(cli) = exe.parent().map(|d| d.join("tunebook")).filter(|p| p.is_file()) {
            env.insert("TUNEBOOK_BIN".into(), cli.display().to_string().into());
        }
    }
    // Workspace binaries link libstd dynamically (-Cprefer-dynamic, which evcxr
    // requires and the shared build mirrors): tell the loader where it is.
    if let Some(lib) = rust_sysroot_lib() {
        env.insert("LD_LIBRARY_PATH".into(), lib.display().to_string().into());
    }
    serde_json::json!({
        "argv": [exe.display().to_string(), "run", "--connection-file", "{connection_file}"],
        "display_name": DISPLAY_NAME,
        "language": "rust",
        "interrupt_mode": "message",
        "env": env,
        "metadata": { "debugger": false }
    })
}

/// The active toolchain's target library directory, where `libstd-*.so` lives.
pub fn rust_sysroot_lib() -> Option<PathBuf> {
    let out = std::process::Command::new("rustc").args(["--print", "target-libdir"]).output().ok()?;
    out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Writes the kernelspec (atomically: a temporary directory renamed into place).
pub fn write_kernelspec(loc: &Location) -> Result<PathBuf> {
    let kernels = kernels_dir(loc)?;
    std::fs::create_dir_all(&kernels).with_context(|| format!("cannot create {}", kernels.display()))?;
    let exe = std::env::current_exe()?.canonicalize()?;
    let tmp = kernels.join(format!(".{KERNEL_NAME}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    std::fs::write(tmp.join("kernel.json"), serde_json::to_string_pretty(&kernel_json(&exe))? + "\n")?;
    std::fs::write(tmp.join("logo-32x32.png"), include_bytes!("../assets/logo-32x32.png"))?;
    std::fs::write(tmp.join("logo-64x64.png"), include_bytes!("../assets/logo-64x64.png"))?;
    std::fs::write(tmp.join("logo-svg.svg"), include_bytes!("../assets/logo-svg.svg"))?;
    let dest = kernels.join(KERNEL_NAME);
    if dest.exists() {
        let old = kernels.join(format!(".{KERNEL_NAME}.old-{}", std::process::id()));
        std::fs::rename(&dest, &old)?;
        std::fs::rename(&tmp, &dest)?;
        let _ = std::fs::remove_dir_all(old);
    } else {
        std::fs::rename(&tmp, &dest)?;
    }
    Ok(dest)
}

/// Starts an engine, preloads tunebook and runs a few representative cells so the
/// slot's compile cache is warm. Prints progress and timings to stderr.
pub fn prewarm() -> Result<()> {
    let started = Instant::now();
    let warm = vec![
        "let _tb_warm = tunebook::info();".to_string(),
        "tunebook::info()".to_string(),
        "polars::prelude::df!(\"a\" => [1i64, 2]).unwrap().view()".to_string(),
    ];
    let engine = Engine::start(EngineConfig {
        frontend: Frontend::Jupyter,
        library: Some(crate::slot::library_path()),
        warm_cells: vec![],
        handover: None,
    });
    let mut last_progress = Instant::now();
    loop {
        match engine.events.recv_timeout(Duration::from_secs(30)) {
            Ok(Event::Progress(p)) => eprintln!("prewarm: {p}"),
            Ok(Event::Ready(Ok(d))) => {
                eprintln!("prewarm: tunebook preloaded in {:.1} s", d.as_secs_f64());
                break;
            }
            Ok(Event::Ready(Err(e))) => bail!("prewarm failed: {e}"),
            Ok(_) => {}
            Err(_) => {
                if last_progress.elapsed() > Duration::from_secs(60) {
                    eprintln!("prewarm: still compiling ({:.0} s)", started.elapsed().as_secs_f64());
                    last_progress = Instant::now();
                }
            }
        }
    }
    for cell in &warm {
        let t = Instant::now();
        engine.execute(cell);
        loop {
            match engine.events.recv() {
                Ok(Event::Done(Ok(_))) => break,
                Ok(Event::Done(Err(e))) => bail!("prewarm cell `{cell}` failed: {}", e.value()),
                Ok(_) => {}
                Err(_) => bail!("the engine stopped during prewarm"),
            }
        }
        eprintln!("prewarm: `{cell}` in {:.2} s", t.elapsed().as_secs_f64());
    }
    engine.shutdown();
    eprintln!("prewarm: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
