//! `tunebook-kernel`: the Jupyter kernel and terminal REPL for tunebook.
//!
//! See `ARCHITECTURE.md` ("kernel") for how it is put together.

mod engine;
mod install;
mod jupyter;
mod repl;
mod slot;
mod standby;

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "tunebook-kernel", version, about = "Jupyter kernel and REPL for tunebook (Rust, evcxr)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run as a Jupyter kernel (Jupyter starts this; see kernel.json).
    Run {
        /// The connection file Jupyter wrote.
        #[arg(short = 'f', long)]
        connection_file: PathBuf,
    },
    /// Install the "Rust (tunebook)" kernelspec and pre-warm the compile cache.
    Install {
        /// Install for this user (default).
        #[arg(long, conflicts_with_all = ["sys_prefix", "prefix"])]
        user: bool,
        /// Install into the active Python environment.
        #[arg(long, conflicts_with = "prefix")]
        sys_prefix: bool,
        /// Install under DIR/share/jupyter.
        #[arg(long, value_name = "DIR")]
        prefix: Option<PathBuf>,
        /// Only write the kernelspec; do not compile anything.
        #[arg(long)]
        no_prewarm: bool,
    },
    /// Compile the library into the kernel's cache now (what install does after writing the spec).
    Prewarm,
    /// An interactive terminal REPL with the library preloaded.
    Repl,
    /// Keep a preloaded kernel waiting for the next kernel start (kernels start
    /// one by themselves; `TUNEBOOK_KERNEL_STANDBY=0` turns that off).
    Standby {
        /// Stop the waiting standby instead.
        #[arg(long)]
        stop: bool,
    },
}

/// Blocks SIGINT for this thread and threads started after it.
pub(crate) fn block_sigint() {
    // SAFETY: signal mask manipulation with a valid, initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits for a (blocked) SIGINT; true when one arrived.
pub(crate) fn wait_sigint() -> bool {
    // SAFETY: sigwait on a valid set containing a blocked signal.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        let mut sig = 0;
        libc::sigwait(&set, &mut sig) == 0 && sig == libc::SIGINT
    }
}

/// Points evcxr at a locked slot. Must run before any thread is started.
fn enter_slot(reseed: bool) -> anyhow::Result<slot::Slot> {
    let slot = slot::acquire(reseed)?;
    let config_dir = slot.dir.join("evcxr-config");
    std::fs::create_dir_all(&config_dir)?;
    // SAFETY: called from main before any other thread exists.
    unsafe {
        std::env::set_var("EVCXR_TMPDIR", &slot.dir);
        std::env::set_var("EVCXR_CONFIG_DIR", &config_dir);
    }
    Ok(slot)
}

/// Exits this process (after `cleanup`) once the process that started it, `parent`
/// (Jupyter, nbconvert, papermill), is gone: an orphaned kernel would otherwise
/// keep its slot and its memory forever. ipykernel does the same.
pub(crate) fn exit_with_parent(parent: libc::pid_t, cleanup: impl FnOnce() + Send + 'static) {
    if parent <= 1 {
        return;
    }
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(500));
            // SAFETY: getppid has no preconditions.
            if unsafe { libc::getppid() } != parent {
                break;
            }
        }
        eprintln!("tunebook-kernel: the process that started this kernel (pid {parent}) is gone; exiting");
        cleanup();
        std::process::exit(0);
    });
}

/// Serves Jupyter with `engine` until shutdown. Once the kernel has been idle for
/// a few seconds, or when it shuts down, it starts a standby kernel for the next
/// start (see [`standby`]).
pub(crate) fn serve_kernel(connection_file: &Path, engine: Arc<engine::Engine>, from_standby: bool) -> anyhow::Result<()> {
    let spawned = Arc::new(AtomicBool::new(!standby::enabled()));
    {
        let (engine, spawned) = (engine.clone(), spawned.clone());
        std::thread::spawn(move || {
            let mut idle_since: Option<Instant> = None;
            while !spawned.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(250));
                if !engine.is_settled() || engine.is_busy() {
                    idle_since = None;
                    continue;
                }
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= standby::IDLE_BEFORE_SPAWN && !spawned.swap(true, Ordering::SeqCst) {
                    standby::spawn();
                }
            }
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let r = rt.block_on(jupyter::serve(connection_file, engine, from_standby));
    rt.shutdown_timeout(Duration::from_millis(200));
    if !spawned.swap(true, Ordering::SeqCst) {
        standby::spawn();
    }
    r
}

fn main() -> ExitCode {
    if std::env::var_os("EVCXR_IS_RUNTIME").is_some() {
        // The process that runs cells: keep SIGINT pending for the library's
        // cooperative interrupt checks (tunebook::interrupt), and die with the
        // kernel even if the kernel is killed without cleaning up.
        block_sigint();
        // SAFETY: prctl with constant arguments.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        standby::cell_process_init();
    }
    evcxr::runtime_hook();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { connection_file } => {
            // SAFETY: getppid has no preconditions.
            let parent = unsafe { libc::getppid() };
            if standby::enabled() {
                match standby::claim(&connection_file) {
                    Ok(Some(lifeline)) => return lifeline.wait(|f| exit_with_parent(parent, f)),
                    Ok(None) => {}
                    Err(e) => eprintln!("tunebook-kernel: no standby kernel ({e:#}); starting from scratch"),
                }
            }
            enter_slot(false).and_then(|_slot| {
                let engine = Arc::new(engine::Engine::start(engine::EngineConfig {
                    frontend: engine::Frontend::Jupyter,
                    library: Some(slot::library_path()),
                    warm_cells: vec![],
                    handover: None,
                }));
                let watched = engine.clone();
                exit_with_parent(parent, move || watched.shutdown());
                serve_kernel(&connection_file, engine, false)
            })
        }
        Command::Standby { stop: true } => standby::stop(),
        Command::Standby { stop: false } => standby::run(|| enter_slot(false)),
        Command::Install { user: _, sys_prefix, prefix, no_prewarm } => {
            let loc = match (sys_prefix, prefix) {
                (true, _) => install::Location::SysPrefix,
                (_, Some(p)) => install::Location::Prefix(p),
                _ => install::Location::User,
            };
            install::write_kernelspec(&loc).and_then(|dir| {
                println!("installed kernelspec \"{}\" in {}", install::DISPLAY_NAME, dir.display());
                if no_prewarm {
                    return Ok(());
                }
                enter_slot(true).and_then(|_slot| install::prewarm())
            })
        }
        Command::Prewarm => enter_slot(true).and_then(|_slot| install::prewarm()),
        Command::Repl => enter_slot(false).and_then(|_slot| repl::run()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunebook-kernel: {e:#}");
            ExitCode::FAILURE
        }
    }
}
