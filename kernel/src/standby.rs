//! Standby kernels: a kernel process that has already created its evcxr
//! context and preloaded tunebook, waiting for the next kernel start.
//!
//! Starting a kernel from nothing costs about 20 s on two cores (evcxr's context,
//! cargo's dependency check, rust-analyzer loading the dependency graph), most of
//! it work that does not depend on the notebook. So a running kernel, once idle
//! for a few seconds or when it shuts down, starts a standby (`tunebook-kernel
//! standby`, detached): it takes a slot, preloads the library and listens on
//! `$TUNEBOOK_CACHE/kernel/standby.sock`. The next `tunebook-kernel run` that
//! Jupyter starts (the launcher) connects to that socket and sends its
//! connection file, working directory and environment; the standby becomes the
//! kernel (binds Jupyter's ports, adopts the directory and environment in its
//! cell process) and the launcher stays behind as the process Jupyter manages:
//! it forwards signals and exits with the kernel. The two are tied by the socket:
//! when the launcher is killed, the kernel sees the socket close and exits.
//!
//! A standby is only claimed by a launcher built from the same executable and
//! library sources with the same toolchain settings ([`compat_key`]); a stale
//! standby exits when refused. It also exits when the kernel executable is
//! replaced, or when no tunebook kernel has run for `TUNEBOOK_KERNEL_STANDBY_GRACE`
//! seconds (default 600). `TUNEBOOK_KERNEL_STANDBY=0` turns the mechanism off;
//! `tunebook-kernel standby --stop` stops a waiting standby.

use crate::engine::{Engine, EngineConfig, Frontend};
use crate::slot;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Environment variable pointing the cell process at its handover file.
pub const HANDOVER_ENV: &str = "TUNEBOOK_HANDOVER";

/// How long a kernel must be idle before it starts a standby.
pub const IDLE_BEFORE_SPAWN: Duration = Duration::from_secs(5);

/// Whether standby kernels are used (`TUNEBOOK_KERNEL_STANDBY`, default on).
pub fn enabled() -> bool {
    !matches!(
        std::env::var("TUNEBOOK_KERNEL_STANDBY").as_deref().map(str::trim),
        Ok("0" | "off" | "false" | "no")
    )
}

/// How long a standby waits after the last tunebook kernel ended.
fn grace() -> Duration {
    let secs = std::env::var("TUNEBOOK_KERNEL_STANDBY_GRACE").ok().and_then(|v| v.trim().parse::<u64>().ok());
    Duration::from_secs(secs.unwrap_or(600))
}

fn socket_path() -> PathBuf {
    slot::slots_root().join("standby.sock")
}

fn lock_path() -> PathBuf {
    slot::slots_root().join("standby.lock")
}

fn pid_path() -> PathBuf {
    slot::slots_root().join("standby.pid")
}

/// Written once a standby has preloaded and warmed up (holds its pid).
fn ready_path() -> PathBuf {
    slot::slots_root().join("standby.ready")
}

/// Where a claimed kernel records `launcher pid -> kernel pid` (for tools that
/// measure the kernel, such as `bench/kernel_latency.py`).
fn claim_record(launcher_pid: u32) -> PathBuf {
    slot::slots_root().join(format!("claimed-{launcher_pid}"))
}

/// What a launcher sends to a standby.
#[derive(Debug, Serialize, Deserialize)]
struct ClaimRequest {
    connection_file: PathBuf,
    cwd: PathBuf,
    env: BTreeMap<String, String>,
    compat: String,
    launcher_pid: u32,
}

/// A standby's answer.
#[derive(Debug, Serialize, Deserialize)]
struct ClaimReply {
    ok: bool,
    pid: u32,
    reason: String,
}

/// The working directory and environment a claimed kernel's cell process adopts.
#[derive(Debug, Serialize, Deserialize)]
struct Handover {
    cwd: PathBuf,
    env: BTreeMap<String, String>,
}

/// Everything that must be equal for a standby to serve a launcher: the
/// executable, the library sources it preloads, and the settings that change how
/// cells are compiled.
pub fn compat_key() -> String {
    let mut key = String::new();
    let exe = fs::metadata("/proc/self/exe").map(|m| format!("{}:{}:{}", m.dev(), m.ino(), m.mtime_nsec() + m.mtime() * 1_000_000_000));
    key.push_str(&format!("exe={}\n", exe.unwrap_or_default()));
    let lib = slot::library_path();
    let lib = lib.canonicalize().unwrap_or(lib);
    key.push_str(&format!("lib={}\nsources={}\n", lib.display(), source_fingerprint(&lib)));
    key.push_str(&format!("cuda={}\n", cfg!(feature = "cuda")));
    for var in [
        "TUNEBOOK_CACHE",
        "TUNEBOOK_LIB_PATH",
        "TUNEBOOK_TARGET_DIR",
        "PATH",
        "RUSTFLAGS",
        "CARGO_HOME",
        "CARGO_TARGET_DIR",
        "RUSTUP_HOME",
        "RUSTUP_TOOLCHAIN",
    ] {
        key.push_str(&format!("{var}={}\n", std::env::var(var).unwrap_or_default()));
    }
    key
}

/// Number of files and newest modification time under the library's sources,
/// its manifest and the workspace lock file.
fn source_fingerprint(lib: &Path) -> String {
    fn walk(dir: &Path, count: &mut u64, newest: &mut i128) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                walk(&e.path(), count, newest);
            } else {
                *count += 1;
                *newest = (*newest).max(m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128);
            }
        }
    }
    let (mut count, mut newest) = (0u64, 0i128);
    walk(&lib.join("src"), &mut count, &mut newest);
    for f in [lib.join("Cargo.toml"), lib.join("..").join("Cargo.lock")] {
        if let Ok(m) = fs::metadata(&f) {
            count += 1;
            newest = newest.max(m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128);
        }
    }
    format!("{count}@{newest}")
}

fn environment() -> BTreeMap<String, String> {
    std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).collect()
}

/// Process ids holding an exclusive `flock` on one of `files` (from `/proc/locks`,
/// without touching the locks).
fn flock_holders(files: &[PathBuf]) -> Vec<u32> {
    let inodes: Vec<u64> = files.iter().filter_map(|f| fs::metadata(f).ok().map(|m| m.ino())).collect();
    let Ok(locks) = fs::read_to_string("/proc/locks") else { return vec![] };
    let mut holders = vec![];
    for line in locks.lines() {
        // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 || fields[1] != "FLOCK" {
            continue;
        }
        let ino = fields[5].rsplit(':').next().and_then(|i| i.parse::<u64>().ok());
        if ino.is_some_and(|i| inodes.contains(&i)) {
            if let Ok(pid) = fields[4].parse() {
                holders.push(pid);
            }
        }
    }
    holders
}

/// Whether a standby process holds the standby lock (it may still be starting).
fn standby_running() -> bool {
    !flock_holders(&[lock_path()]).is_empty()
}

// ---------------------------------------------------------------------------
// Launcher side.

/// A claimed standby, serving Jupyter on behalf of this launcher.
pub struct Lifeline {
    stream: UnixStream,
    kernel_pid: u32,
}

/// Hands this kernel start to a waiting standby. `Ok(None)`: there is none (or it
/// refused); start a kernel from scratch. Must run before any thread is started.
pub fn claim(connection_file: &Path) -> Result<Option<Lifeline>> {
    let sock = socket_path();
    let deadline = Instant::now() + Duration::from_secs(2);
    let stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            // A standby that is starting binds its socket within milliseconds.
            Err(_) if standby_running() && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return Ok(None),
        }
    };
    let cwd = std::env::current_dir().context("the kernel's working directory is not readable")?;
    let connection_file = if connection_file.is_absolute() { connection_file.to_path_buf() } else { cwd.join(connection_file) };
    let request = ClaimRequest {
        connection_file,
        cwd,
        env: environment(),
        compat: compat_key(),
        launcher_pid: std::process::id(),
    };
    let mut line = serde_json::to_string(&request)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).context("cannot talk to the standby kernel")?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).context("the standby kernel did not answer")?;
    let reply: ClaimReply = serde_json::from_str(&reply).context("the standby kernel answered nonsense")?;
    if !reply.ok {
        eprintln!("tunebook-kernel: the standby kernel declined ({}); starting from scratch", reply.reason);
        return Ok(None);
    }
    stream.set_read_timeout(None)?;
    Ok(Some(Lifeline { stream, kernel_pid: reply.pid }))
}

impl Lifeline {
    /// Waits for the kernel to exit, forwarding SIGINT, SIGTERM and SIGHUP to it,
    /// and returns its exit status. `watch_parent` is given a cleanup to run if
    /// this launcher's parent goes (the kernel then goes with the lifeline).
    pub fn wait(self, watch_parent: impl FnOnce(Box<dyn FnOnce() + Send>)) -> ExitCode {
        let signals = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
        // SAFETY: signal mask manipulation with a valid, initialised set, before
        // any other thread exists.
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in signals {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            set
        };
        let pid = self.kernel_pid as libc::pid_t;
        std::thread::spawn(move || {
            loop {
                let mut sig = 0;
                // SAFETY: sigwait on a valid set of blocked signals; kill of the
                // kernel process this launcher claimed.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    unsafe { libc::kill(pid, sig) };
                }
            }
        });
        watch_parent(Box::new(move || {
            // SAFETY: kill of the kernel process this launcher claimed.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }));
        let mut code = 1u8;
        let mut text = String::new();
        let _ = BufReader::new(&self.stream).read_to_string(&mut text);
        for line in text.lines() {
            if let Some(c) = line.strip_prefix("exit ").and_then(|c| c.trim().parse().ok()) {
                code = c;
            }
        }
        ExitCode::from(code)
    }
}

// ---------------------------------------------------------------------------
// Standby side.

/// Starts a standby in the background unless one is running or standbys are
/// turned off. Never fails the caller: problems go to the standby's log.
pub fn spawn() {
    if !enabled() || standby_running() {
        return;
    }
    let root = slot::slots_root();
    let _ = fs::create_dir_all(&root);
    let log = OpenOptions::new().create(true).append(true).open(root.join("standby.log"));
    let Ok(exe) = std::env::current_exe() else { return };
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("standby").current_dir(&root).stdin(std::process::Stdio::null());
    // The standby must not inherit this kernel's slot settings or its claim.
    for var in ["EVCXR_TMPDIR", "EVCXR_CONFIG_DIR", HANDOVER_ENV] {
        cmd.env_remove(var);
    }
    match log.and_then(|l| Ok((l.try_clone()?, l))) {
        Ok((out, err)) => {
            cmd.stdout(out).stderr(err);
        }
        Err(_) => {
            cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        }
    }
    // SAFETY: setsid is async-signal-safe; the standby leaves this kernel's
    // session so that Jupyter's signals to the kernel never reach it.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    match cmd.spawn() {
        // Reap it when it exits before this kernel does.
        Ok(mut child) => {
            std::thread::spawn(move || child.wait());
        }
        Err(e) => eprintln!("tunebook-kernel: cannot start a standby kernel: {e}"),
    }
}

/// Stops a waiting standby (`tunebook-kernel standby --stop`).
pub fn stop() -> Result<()> {
    let holders = flock_holders(&[lock_path()]);
    if holders.is_empty() {
        println!("no standby kernel is running");
        return Ok(());
    }
    for pid in holders {
        // SAFETY: kill with a pid read from /proc/locks.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        println!("stopped the standby kernel (pid {pid})");
    }
    Ok(())
}

/// Why a standby stops waiting.
enum Wake {
    Claimed(UnixStream, ClaimRequest),
    Expired(&'static str),
}

/// Runs a standby: preloads, waits to be claimed, then serves Jupyter as the
/// claiming launcher's kernel. `enter_slot` takes a kernel slot; it must run
/// before any thread is started.
pub fn run(enter_slot: impl FnOnce() -> Result<slot::Slot>) -> Result<()> {
    let root = slot::slots_root();
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let Some(standby_lock) = slot::try_lock(&lock_path())? else {
        return Ok(()); // another standby is already waiting
    };
    let sock = socket_path();
    let _ = fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).with_context(|| format!("cannot listen on {}", sock.display()))?;
    fs::write(pid_path(), format!("{}\n", std::process::id()))?;
    let slot = enter_slot()?;
    let handover = slot.dir.join("handover.json");
    for stale in [handover.clone(), ack_path(&handover), fifo_path(&handover)] {
        let _ = fs::remove_file(stale);
    }
    let fifo = std::ffi::CString::new(fifo_path(&handover).as_os_str().as_encoded_bytes())?;
    // SAFETY: mkfifo with a valid NUL-terminated path.
    if unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) } != 0 {
        bail!("cannot create {}: {}", fifo_path(&handover).display(), std::io::Error::last_os_error());
    }
    let started = Instant::now();
    eprintln!("tunebook-kernel standby {}: preloading in {}", std::process::id(), slot.dir.display());
    let engine = Arc::new(Engine::start(EngineConfig {
        frontend: Frontend::Jupyter,
        library: Some(slot::library_path()),
        warm_cells: vec![],
        handover: Some(handover.clone()),
    }));

    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            if let Ok(s) = s {
                if tx.send(s).is_err() {
                    return;
                }
            }
        }
    });
    let own_key = compat_key();
    let own_slot_lock = slot.dir.with_extension("lock");
    let grace = grace();
    let mut last_kernel_seen = Instant::now();
    let mut announced = false;
    let wake = loop {
        if !announced && engine.is_settled() {
            announced = true;
            eprintln!("tunebook-kernel standby {}: ready after {:.1} s", std::process::id(), started.elapsed().as_secs_f64());
            let _ = fs::write(ready_path(), format!("{}\n", std::process::id()));
        }
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(stream) => match read_claim(&stream) {
                Ok(req) if req.compat == own_key => break Wake::Claimed(stream, req),
                Ok(_) => {
                    reply(&stream, false, "it was started from another build or with other settings");
                    break Wake::Expired("a kernel from another build or with other settings asked for it");
                }
                Err(e) => eprintln!("tunebook-kernel standby: ignored a bad claim: {e:#}"),
            },
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break Wake::Expired("its socket closed"),
        }
        if fs::read_link("/proc/self/exe").is_ok_and(|p| p.to_string_lossy().ends_with(" (deleted)")) {
            break Wake::Expired("the kernel executable was replaced");
        }
        let others: Vec<PathBuf> = (0..slot::MAX_SLOTS)
            .map(|i| root.join(format!("slot-{i}.lock")))
            .filter(|p| *p != own_slot_lock && p.exists())
            .collect();
        if !flock_holders(&others).is_empty() {
            last_kernel_seen = Instant::now();
        } else if last_kernel_seen.elapsed() > grace {
            break Wake::Expired("no tunebook kernel ran for the grace period");
        }
    };
    let _ = fs::remove_file(&sock);
    let _ = fs::remove_file(ready_path());
    let (stream, req) = match wake {
        Wake::Expired(why) => {
            eprintln!("tunebook-kernel standby {}: exiting: {why}", std::process::id());
            engine.shutdown();
            let _ = fs::remove_file(pid_path());
            return Ok(());
        }
        Wake::Claimed(stream, req) => (stream, req),
    };
    let _ = fs::remove_file(pid_path());
    drop(standby_lock); // the next standby may start now
    reply(&stream, true, "");
    eprintln!(
        "tunebook-kernel standby {}: claimed by launcher {} after {:.1} s, for {}",
        std::process::id(),
        req.launcher_pid,
        started.elapsed().as_secs_f64(),
        req.connection_file.display()
    );
    let record = claim_record(req.launcher_pid);
    let _ = fs::write(&record, format!("{}\n", std::process::id()));
    let result = adopt(&engine, &handover, &req).and_then(|()| {
        // The launcher is the process Jupyter manages: when it goes, so does this kernel.
        let lifeline = stream.try_clone()?;
        let (watched, record) = (engine.clone(), record.clone());
        std::thread::spawn(move || {
            let mut sink = [0u8; 64];
            while matches!((&lifeline).read(&mut sink), Ok(n) if n > 0) {}
            watched.shutdown();
            let _ = fs::remove_file(&record);
            std::process::exit(0);
        });
        crate::serve_kernel(&req.connection_file, engine.clone(), true)
    });
    let _ = fs::remove_file(&record);
    let code = if result.is_ok() { 0 } else { 1 };
    let _ = (&stream).write_all(format!("exit {code}\n").as_bytes());
    drop(slot);
    result
}

fn read_claim(stream: &UnixStream) -> Result<ClaimRequest> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    stream.set_read_timeout(None)?;
    Ok(serde_json::from_str(&line)?)
}

fn reply(stream: &UnixStream, ok: bool, reason: &str) {
    let r = ClaimReply { ok, pid: std::process::id(), reason: reason.into() };
    let mut line = serde_json::to_string(&r).unwrap_or_default();
    line.push('\n');
    let _ = (&*stream).write_all(line.as_bytes());
}

fn ack_path(handover: &Path) -> PathBuf {
    handover.with_extension("ack")
}

fn fifo_path(handover: &Path) -> PathBuf {
    handover.with_extension("fifo")
}

/// Moves this kernel and its cell process into the claiming launcher's working
/// directory and environment.
fn adopt(engine: &Engine, handover: &Path, req: &ClaimRequest) -> Result<()> {
    // This process compiles cells and restarts the cell process: both follow the
    // working directory (the environment that matters to compiling is part of
    // the compatibility key; a restarted cell process reads the handover file).
    std::env::set_current_dir(&req.cwd)
        .with_context(|| format!("cannot enter the notebook's directory {}", req.cwd.display()))?;
    let h = Handover { cwd: req.cwd.clone(), env: req.env.clone() };
    slot::write_if_changed(handover, &serde_json::to_string(&h)?)?;
    let _ = fs::remove_file(ack_path(handover));
    // The cell process exists once evcxr's context does (seconds after start).
    let deadline = Instant::now() + Duration::from_secs(120);
    let pid = loop {
        if let Some(pid) = engine.cell_process_id() {
            break pid;
        }
        if Instant::now() > deadline {
            bail!("the cell process did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Wake the cell process's handover thread (it blocks opening the FIFO).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Non-blocking: opening fails at once (ENXIO) while no reader has it open.
        match OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(fifo_path(handover)) {
            Ok(mut f) => {
                let _ = f.write_all(b"go\n");
                break;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => bail!("the cell process (pid {pid}) is not listening for its handover: {e}"),
        }
    }
    while Instant::now() < deadline {
        if fs::read_to_string(ack_path(handover)).is_ok_and(|a| a.trim() == pid.to_string()) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("the cell process (pid {pid}) did not take the notebook's directory and environment")
}

// ---------------------------------------------------------------------------
// Cell process side.

/// Names the handover never changes: evcxr's own settings and ours.
fn protected(name: &str) -> bool {
    name.starts_with("EVCXR_") || name == HANDOVER_ENV || name == crate::engine::protocol::DISPLAY_ENV
}

fn apply(path: &Path) -> Result<()> {
    let h: Handover = serde_json::from_slice(&fs::read(path)?)?;
    if let Err(e) = std::env::set_current_dir(&h.cwd) {
        eprintln!("tunebook: cannot enter {}: {e}", h.cwd.display());
    }
    let current: Vec<String> = std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()).collect();
    for k in current {
        if !protected(&k) && !h.env.contains_key(&k) {
            // SAFETY: see `cell_process_init`.
            unsafe { std::env::remove_var(&k) };
        }
    }
    for (k, v) in &h.env {
        if !protected(k) && std::env::var(k).as_deref() != Ok(v) {
            // SAFETY: see `cell_process_init`.
            unsafe { std::env::set_var(k, v) };
        }
    }
    Ok(())
}

/// In the cell process of a standby (`TUNEBOOK_HANDOVER` set): adopts a handover
/// that already happened (a cell process restarted after a claim), then waits on
/// the FIFO for the claim. Call before evcxr's runtime starts.
pub fn cell_process_init() {
    let Some(path) = std::env::var_os(HANDOVER_ENV).map(PathBuf::from) else { return };
    if path.exists() {
        // SAFETY (set_var/remove_var in `apply`): no other thread exists yet.
        if let Err(e) = apply(&path) {
            eprintln!("tunebook: cannot adopt the notebook's environment: {e:#}");
        }
        return;
    }
    std::thread::spawn(move || {
        // Blocks until the kernel opens the FIFO at claim time.
        let Ok(mut f) = File::open(fifo_path(&path)) else { return };
        let mut buf = String::new();
        let _ = f.read_to_string(&mut buf);
        // SAFETY (set_var/remove_var in `apply`): the claim happens while no cell
        // runs; evcxr's runtime thread is blocked reading its next command and
        // does not read the environment meanwhile.
        if let Err(e) = apply(&path) {
            eprintln!("tunebook: cannot adopt the notebook's environment: {e:#}");
        }
        let _ = slot::write_if_changed(&ack_path(&path), &format!("{}\n", std::process::id()));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compat_key_names_the_executable_sources_and_toolchain_settings() {
        let k = compat_key();
        assert!(k.contains("exe=") && !k.contains("exe=\n"), "{k}");
        assert!(k.contains("sources=") && k.contains("PATH="), "{k}");
        assert_eq!(k, compat_key(), "stable within one process");
    }

    #[test]
    fn flock_holders_sees_a_held_lock_without_taking_it() {
        let dir = std::env::temp_dir().join(format!("tb-standby-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.lock");
        let held = slot::try_lock(&p).unwrap().unwrap();
        assert_eq!(flock_holders(std::slice::from_ref(&p)), vec![std::process::id()]);
        drop(held);
        assert!(flock_holders(std::slice::from_ref(&p)).is_empty());
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn handover_sets_and_removes_variables_but_keeps_evcxr_settings() {
        // Runs in the test process: only variables with a unique prefix are touched.
        let dir = std::env::temp_dir().join(format!("tb-handover-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut env = environment();
        env.retain(|k, _| !k.starts_with("TB_HANDOVER_TEST_"));
        env.insert("TB_HANDOVER_TEST_NEW".into(), "from the notebook".into());
        // SAFETY: test-only variables; no other test reads them.
        unsafe { std::env::set_var("TB_HANDOVER_TEST_OLD", "from the standby") };
        let cwd = std::env::current_dir().unwrap();
        let path = dir.join("handover.json");
        fs::write(&path, serde_json::to_vec(&Handover { cwd: cwd.clone(), env }).unwrap()).unwrap();
        apply(&path).unwrap();
        assert_eq!(std::env::var("TB_HANDOVER_TEST_NEW").as_deref(), Ok("from the notebook"));
        assert!(std::env::var_os("TB_HANDOVER_TEST_OLD").is_none());
        assert!(protected("EVCXR_IS_RUNTIME") && protected(HANDOVER_ENV) && !protected("PATH"));
        let _ = fs::remove_dir_all(dir);
    }
}
