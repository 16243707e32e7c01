//! The evaluation engine: one evcxr context on its own thread, the tunebook
//! preload, output pumping, interrupts. Shared by the Jupyter kernel and the REPL.
//!
//! Threads:
//! * the engine thread owns evcxr's `CommandContext` and runs requests in order;
//! * the pump thread reads the cell process's stdout/stderr, turns display markers
//!   into [`Event::Display`], recognises panics, and emits [`Event::Done`] only
//!   after every line printed before the cell finished, so outputs never arrive
//!   after the reply.

// The kernel uses only the parser half of the shared protocol file.
#[allow(dead_code)]
#[path = "../../lib/src/display/protocol.rs"]
pub mod protocol;

use crossbeam_channel::{Receiver, Sender, select, unbounded};
use evcxr::{CommandContext, EvalCallbacks, EvalContext};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Idle time after the preload before rust-analyzer is warmed up.
const ANALYZER_WARMUP_IDLE: Duration = Duration::from_millis(1500);

/// How long a cell may ignore an interrupt before its process is killed.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(3);

/// How the library inside the cell process should print live displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    /// Marker lines, turned into `display_data` by the Jupyter kernel.
    Jupyter,
    /// Plain text for the terminal REPL.
    Repl,
}

/// Engine configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Display mode for the cell process.
    pub frontend: Frontend,
    /// Source directory of the tunebook library to preload (`None`: no preload).
    pub library: Option<std::path::PathBuf>,
    /// Extra cells to run after the preload (pre-warming).
    pub warm_cells: Vec<String>,
    /// Where a standby kernel hands the working directory and environment of
    /// the kernel start that claims it to the cell process (see
    /// [`crate::standby`]); `None` for a kernel started for its own client.
    pub handover: Option<std::path::PathBuf>,
}

/// A compile error, formatted for people.
#[derive(Debug, Clone)]
pub struct CompileError {
    /// rustc's message, for example "cannot find value `y` in this scope".
    pub message: String,
    /// Error code such as `E0425`.
    pub code: Option<String>,
    /// 1-based line in the cell, when the error points into the cell.
    pub line: Option<usize>,
    /// Lines of explanation (source excerpt with markers, help).
    pub detail: Vec<String>,
}

/// Why a cell did not complete normally.
#[derive(Debug, Clone)]
pub enum ExecError {
    /// rustc rejected the cell.
    Compile(Vec<CompileError>),
    /// The cell panicked; variables from earlier cells are kept.
    Panic {
        /// The panic message.
        message: String,
    },
    /// The user interrupted the cell. `variables_lost` when the cell ignored the
    /// interrupt and its process had to be killed.
    Interrupted {
        /// Whether the cell process was restarted (all variables lost).
        variables_lost: bool,
    },
    /// The cell process died (segfault, abort, exit); all variables are lost.
    ProcessDied(String),
    /// Anything else evcxr reported.
    Other(String),
}

impl ExecError {
    /// Jupyter's `ename`.
    pub fn name(&self) -> &'static str {
        match self {
            ExecError::Compile(_) => "CompilationError",
            ExecError::Panic { .. } => "Panic",
            ExecError::Interrupted { .. } => "KeyboardInterrupt",
            ExecError::ProcessDied(_) => "ProcessDied",
            ExecError::Other(_) => "Error",
        }
    }

    /// Jupyter's `evalue`: one line.
    pub fn value(&self) -> String {
        match self {
            ExecError::Compile(errs) => errs.first().map(|e| e.message.clone()).unwrap_or_default(),
            ExecError::Panic { message } => message.clone(),
            ExecError::Interrupted { variables_lost: false } => "interrupted; variables are kept".into(),
            ExecError::Interrupted { variables_lost: true } => format!(
                "the cell ignored the interrupt for {} s, so its process was restarted: variables \
                 from earlier cells are lost (library calls such as training, generation and \
                 interrupt::sleep stop cleanly and keep them)",
                INTERRUPT_GRACE.as_secs()
            ),
            ExecError::ProcessDied(m) => format!("{m}; variables from earlier cells are lost"),
            ExecError::Other(m) => m.clone(),
        }
    }

    /// Jupyter's `traceback`: the full report, one entry per line.
    pub fn traceback(&self) -> Vec<String> {
        match self {
            ExecError::Compile(errs) => {
                let mut out = vec![];
                for e in errs {
                    let code = e.code.as_ref().map(|c| format!("[{c}]")).unwrap_or_default();
                    out.push(format!("\x1b[0;31merror{code}\x1b[0m: {}", e.message));
                    if let Some(l) = e.line {
                        out.push(format!("  --> cell line {l}"));
                    }
                    out.extend(e.detail.iter().cloned());
                }
                out
            }
            other => vec![format!("\x1b[0;31m{}\x1b[0m: {}", other.name(), other.value())],
        }
    }
}

/// The outcome of one cell: rich results by MIME type, or an error.
pub type ExecResult = Result<BTreeMap<String, String>, ExecError>;

/// What the engine reports, in order.
#[derive(Debug)]
pub enum Event {
    /// Preload progress: a human-readable line.
    Progress(String),
    /// Preload finished (Ok with the time it took, or the error).
    Ready(Result<Duration, String>),
    /// Text the cell printed to stdout.
    Stdout(String),
    /// Text the cell printed to stderr.
    Stderr(String),
    /// A display or update from the display module.
    Display(protocol::Marker),
    /// The cell asks for input (`evcxr_input`).
    Input {
        /// The prompt.
        prompt: String,
        /// Whether to hide what is typed.
        password: bool,
    },
    /// The cell finished.
    Done(ExecResult),
}

enum Request {
    Execute { code: String },
    Complete { code: String, byte_pos: usize, reply: Sender<Option<(Vec<String>, usize, usize)>> },
    Inspect { code: String, byte_pos: usize, reply: Sender<Option<(String, String)>> },
    Shutdown,
}

/// Handle to a running engine.
pub struct Engine {
    requests: Sender<Request>,
    /// Events in order; read them on one thread.
    pub events: Receiver<Event>,
    input_tx: Sender<String>,
    child: Arc<Mutex<Option<Arc<Mutex<std::process::Child>>>>>,
    busy: Arc<AtomicBool>,
    exec_seq: Arc<AtomicU64>,
    interrupted: Arc<AtomicU64>,
    killed_seq: Arc<AtomicU64>,
    ready: Arc<AtomicBool>,
    settled: Arc<AtomicBool>,
}

impl Engine {
    /// Starts the engine thread, which creates the evcxr context and preloads the
    /// library in the background. Returns at once.
    pub fn start(config: EngineConfig) -> Engine {
        let (req_tx, req_rx) = unbounded();
        let (ev_tx, ev_rx) = unbounded();
        let (input_tx, input_rx) = unbounded::<String>();
        let engine = Engine {
            requests: req_tx,
            events: ev_rx,
            input_tx,
            child: Arc::new(Mutex::new(None)),
            busy: Arc::new(AtomicBool::new(false)),
            exec_seq: Arc::new(AtomicU64::new(0)),
            interrupted: Arc::new(AtomicU64::new(0)),
            killed_seq: Arc::new(AtomicU64::new(0)),
            ready: Arc::new(AtomicBool::new(false)),
            settled: Arc::new(AtomicBool::new(false)),
        };
        let shared = Shared {
            child: engine.child.clone(),
            busy: engine.busy.clone(),
            exec_seq: engine.exec_seq.clone(),
            interrupted: engine.interrupted.clone(),
            killed_seq: engine.killed_seq.clone(),
            ready: engine.ready.clone(),
            settled: engine.settled.clone(),
        };
        std::thread::Builder::new()
            .name("evcxr-engine".into())
            .spawn(move || engine_thread(config, req_rx, ev_tx, input_rx, shared))
            .expect("spawn engine thread");
        engine
    }

    /// Whether the preload has finished.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Whether the preload and the rust-analyzer warm-up after it are done.
    pub fn is_settled(&self) -> bool {
        self.settled.load(Ordering::SeqCst)
    }

    /// Whether a cell is running.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }

    /// Queues a cell. Its outputs and its [`Event::Done`] arrive on `events`.
    pub fn execute(&self, code: &str) {
        let _ = self.requests.send(Request::Execute { code: code.to_string() });
    }

    /// Answers an [`Event::Input`].
    pub fn provide_input(&self, value: String) {
        let _ = self.input_tx.send(value);
    }

    /// Completions at a byte offset: (matches, start byte, end byte). `None` while
    /// a cell runs or the preload is not done.
    pub fn complete(&self, code: &str, byte_pos: usize) -> Option<(Vec<String>, usize, usize)> {
        if self.is_busy() || !self.is_ready() {
            return None;
        }
        let (tx, rx) = unbounded();
        self.requests.send(Request::Complete { code: code.into(), byte_pos, reply: tx }).ok()?;
        rx.recv_timeout(Duration::from_secs(30)).ok().flatten()
    }

    /// Type and documentation (plain text, HTML) of the item at a byte offset.
    pub fn inspect(&self, code: &str, byte_pos: usize) -> Option<(String, String)> {
        if self.is_busy() || !self.is_ready() {
            return None;
        }
        let (tx, rx) = unbounded();
        self.requests.send(Request::Inspect { code: code.into(), byte_pos, reply: tx }).ok()?;
        rx.recv_timeout(Duration::from_secs(30)).ok().flatten()
    }

    /// Interrupts the running cell: SIGINT to the cell process (library loops stop
    /// cleanly and keep variables); if the cell is still running after
    /// [`INTERRUPT_GRACE`], its process is killed.
    pub fn interrupt(&self) {
        if !self.is_busy() {
            return;
        }
        let seq = self.exec_seq.load(Ordering::SeqCst);
        self.interrupted.store(seq, Ordering::SeqCst);
        let Some(handle) = self.child.lock().unwrap().clone() else { return };
        let pid = handle.lock().unwrap().id() as libc::pid_t;
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let busy = self.busy.clone();
        let exec_seq = self.exec_seq.clone();
        let killed = self.killed_seq.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + INTERRUPT_GRACE;
            while Instant::now() < deadline {
                if !busy.load(Ordering::SeqCst) || exec_seq.load(Ordering::SeqCst) != seq {
                    return;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            if busy.load(Ordering::SeqCst) && exec_seq.load(Ordering::SeqCst) == seq {
                killed.store(seq, Ordering::SeqCst);
                let _ = handle.lock().unwrap().kill();
            }
        });
    }

    /// Process id of the cell process, once evcxr has started it.
    pub fn cell_process_id(&self) -> Option<u32> {
        let handle = self.child.lock().unwrap().clone()?;
        let id = handle.lock().unwrap().id();
        Some(id)
    }

    /// Stops the engine and its cell process.
    pub fn shutdown(&self) {
        if let Some(handle) = self.child.lock().unwrap().clone() {
            let _ = handle.lock().unwrap().kill();
        }
        let _ = self.requests.send(Request::Shutdown);
    }
}

struct Shared {
    child: Arc<Mutex<Option<Arc<Mutex<std::process::Child>>>>>,
    busy: Arc<AtomicBool>,
    exec_seq: Arc<AtomicU64>,
    interrupted: Arc<AtomicU64>,
    killed_seq: Arc<AtomicU64>,
    ready: Arc<AtomicBool>,
    settled: Arc<AtomicBool>,
}

/// Messages from the engine thread to the pump thread.
enum PumpMsg {
    /// The cell finished with this result (and whether the user interrupted
    /// it): drain outputs, then emit `Done`.
    Finished(ExecResult, bool),
    /// Drain outputs (preload finished).
    Flush(Sender<()>),
}

fn engine_thread(
    config: EngineConfig,
    requests: Receiver<Request>,
    events: Sender<Event>,
    input_rx: Receiver<String>,
    shared: Shared,
) {
    let started = Instant::now();
    let _ = events.send(Event::Progress("starting the Rust evaluation context".into()));
    let mut command = std::process::Command::new(std::env::current_exe().expect("current exe"));
    command.env(
        protocol::DISPLAY_ENV,
        match config.frontend {
            Frontend::Jupyter => "jupyter",
            Frontend::Repl => "repl",
        },
    );
    if let Some(handover) = &config.handover {
        command.env(crate::standby::HANDOVER_ENV, handover);
    }
    let (ctx, outputs) = match EvalContext::with_subprocess_command(command) {
        Ok(x) => x,
        Err(e) => {
            let _ = events.send(Event::Ready(Err(format!("cannot start evcxr: {e}"))));
            // Answer every later request with the same error.
            for req in requests.iter() {
                match req {
                    Request::Execute { .. } => {
                        let _ = events.send(Event::Done(Err(ExecError::Other(format!("the kernel failed to start: {e}")))));
                    }
                    Request::Shutdown => return,
                    _ => {}
                }
            }
            return;
        }
    };
    log_timing("evcxr context created", started);
    let mut cc = CommandContext::with_eval_context(ctx);
    *shared.child.lock().unwrap() = Some(cc.process_handle());

    let (pump_tx, pump_rx) = unbounded::<PumpMsg>();
    {
        let events = events.clone();
        std::thread::Builder::new()
            .name("evcxr-pump".into())
            .spawn(move || pump(outputs.stdout, outputs.stderr, pump_rx, events))
            .expect("spawn pump");
    }

    // The preload: settings that keep the build identical to the workspace's, then the library.
    // One cell, so evcxr checks the dependency graph, builds and asks rust-analyzer once
    // instead of once per line (a separate `:dep` cell costs a whole build of its own).
    let linker = if which("mold") { "mold" } else { "system" };
    let mut first: Vec<String> = vec![format!(":linker {linker}")];
    if let Some(lib) = &config.library {
        // evcxr's first build (at context creation, without dependencies) pruned
        // the slot's lock file; restore the workspace's so the preload resolves
        // exactly the versions the workspace compiled.
        crate::slot::seed_lockfile(lib, true);
        let features = if cfg!(feature = "cuda") { ", features = [\"cuda\"]" } else { "" };
        match crate::slot::notebook_crate(lib) {
            Ok(dir) => first.push(format!(
                ":dep tunebook = {{ package = \"tunebook-notebook\", path = {:?}{features} }}",
                dir.display().to_string()
            )),
            Err(e) => {
                let _ = events.send(Event::Progress(format!("cannot write the notebook crate ({e:#}); linking cells against the library's rlib")));
                let lib = lib.canonicalize().unwrap_or_else(|_| lib.clone());
                first.push(format!(":dep tunebook = {{ path = {:?}{features} }}", lib.display().to_string()));
            }
        }
        first.push("use tunebook::prelude::*;".into());
    }
    let mut preload = vec![first.join("\n")];
    preload.extend(config.warm_cells.iter().cloned());
    let mut preload_error = None;
    for (i, cell) in preload.iter().enumerate() {
        if cell.contains("use tunebook::prelude") {
            let _ = events.send(Event::Progress("compiling tunebook (the first start after an install or upgrade builds its dependencies; later starts take seconds)".into()));
        }
        let result = cc.execute(cell);
        log_timing(&format!("preload `{cell}`"), started);
        match result {
            Ok(_) => {}
            Err(e) => {
                preload_error = Some(format!("preload step {} ({cell}) failed: {e}", i + 1));
                break;
            }
        }
    }
    let (ftx, frx) = unbounded();
    let _ = pump_tx.send(PumpMsg::Flush(ftx));
    let _ = frx.recv_timeout(Duration::from_secs(2));
    shared.ready.store(true, Ordering::SeqCst);
    let preload_failed = preload_error.is_some();
    let _ = events.send(Event::Ready(match preload_error {
        None => Ok(started.elapsed()),
        Some(e) => Err(e),
    }));

    // evcxr asks rust-analyzer for the type of every new `let` variable; its first
    // query loads the whole dependency graph (many seconds with polars and candle).
    // Do that while the user is still typing: once, after a short idle period.
    let mut analyzer_warm = config.library.is_none() || preload_failed;
    loop {
        if analyzer_warm {
            shared.settled.store(true, Ordering::SeqCst);
        }
        let req = if analyzer_warm {
            match requests.recv() {
                Ok(r) => r,
                Err(_) => break,
            }
        } else {
            match requests.recv_timeout(ANALYZER_WARMUP_IDLE) {
                Ok(r) => r,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    analyzer_warm = true;
                    let _ = cc.execute("let _tunebook_analyzer_warmup: u8 = 0;");
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
        };
        match req {
            Request::Shutdown => break,
            Request::Complete { code, byte_pos, reply } => {
                let r = cc.completions(&code, byte_pos).ok().map(|c| {
                    (c.completions.into_iter().map(|x| x.code).collect(), c.start_offset, c.end_offset)
                });
                let _ = reply.send(r);
            }
            Request::Inspect { code, byte_pos, reply } => {
                let r = cc.hover_at(&code, byte_pos).ok().filter(|(plain, _)| !plain.trim().is_empty());
                let _ = reply.send(r);
            }
            Request::Execute { code } => {
                if code.contains("let ") {
                    analyzer_warm = true;
                }
                let seq = shared.exec_seq.fetch_add(1, Ordering::SeqCst) + 1;
                shared.busy.store(true, Ordering::SeqCst);
                let events_for_input = events.clone();
                let input_rx = &input_rx;
                let mut callbacks = EvalCallbacks {
                    input_reader: &move |req| {
                        let _ = events_for_input.send(Event::Input { prompt: req.prompt, password: req.is_password });
                        input_rx.recv().unwrap_or_default()
                    },
                };
                let result = cc.execute_with_callbacks(&code, &mut callbacks);
                shared.busy.store(false, Ordering::SeqCst);
                let interrupted = shared.interrupted.load(Ordering::SeqCst) == seq;
                let killed = shared.killed_seq.load(Ordering::SeqCst) == seq;
                let outcome: ExecResult = match result {
                    Ok(out) => {
                        let data: BTreeMap<String, String> = out.content_by_mime_type.into_iter().collect();
                        // A cell ending in a statement-like expression (`for`, a
                        // call returning `()`) has nothing to show.
                        if data.len() == 1 && data.get("text/plain").map(String::as_str) == Some("()") {
                            Ok(BTreeMap::new())
                        } else {
                            Ok(data)
                        }
                    }
                    Err(evcxr::Error::CompilationErrors(errs)) => Err(ExecError::Compile(errs.iter().map(compile_error).collect())),
                    Err(evcxr::Error::SubprocessTerminated(m)) => {
                        if killed || interrupted {
                            Err(ExecError::Interrupted { variables_lost: true })
                        } else {
                            Err(ExecError::ProcessDied(m.trim().to_string()))
                        }
                    }
                    Err(evcxr::Error::TypeRedefinedVariablesLost(v)) => Err(ExecError::Other(format!(
                        "a type was redefined, so these variables were lost: {}",
                        v.join(", ")
                    ))),
                    Err(e) => Err(ExecError::Other(e.to_string())),
                };
                let outcome = match outcome {
                    Err(ExecError::Other(_)) if interrupted => Err(ExecError::Interrupted { variables_lost: false }),
                    o => o,
                };
                let _ = pump_tx.send(PumpMsg::Finished(outcome, interrupted));
                // A fresh process after a kill: re-point interrupts at it.
                *shared.child.lock().unwrap() = Some(cc.process_handle());
            }
        }
    }
    if let Ok(mut c) = cc.process_handle().lock() {
        let _ = c.kill();
    }
}

/// With `TUNEBOOK_KERNEL_TIMING=1`, prints how long start-up steps took (stderr).
fn log_timing(what: &str, since: Instant) {
    if std::env::var_os("TUNEBOOK_KERNEL_TIMING").is_some() {
        eprintln!("tunebook-kernel: {what} at {:.2} s", since.elapsed().as_secs_f64());
    }
}

fn compile_error(e: &evcxr::CompilationError) -> CompileError {
    let primary = e.primary_spanned_message();
    let line = primary.and_then(|m| m.span.as_ref()).map(|s| s.start_line);
    let mut detail = vec![];
    for sm in e.spanned_messages() {
        if let Some(span) = &sm.span {
            for (k, l) in sm.lines.iter().enumerate() {
                detail.push(format!("{:>4} | {l}", span.start_line + k));
            }
            if !sm.label.is_empty() {
                let pad = " ".repeat(span.start_column.saturating_sub(1));
                let width = if span.end_line == span.start_line {
                    span.end_column.saturating_sub(span.start_column).max(1)
                } else {
                    1
                };
                detail.push(format!("     | {pad}{} {}", "^".repeat(width), sm.label));
            }
        }
    }
    for h in e.help() {
        detail.push(format!("help: {h}"));
    }
    CompileError { message: e.message(), code: e.code().map(str::to_string), line, detail }
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// State of panic recognition on stderr.
#[derive(Default)]
struct PanicScan {
    /// Set after a "thread '…' panicked at …:" line; the next line is the message.
    expecting_message: bool,
    /// Inside a backtrace dump (suppressed: it points into generated code).
    in_backtrace: bool,
    message: Option<String>,
}

impl PanicScan {
    /// Returns the line to show, or `None` to hide it.
    fn scan(&mut self, line: &str) -> Option<String> {
        // "thread 'main' panicked at src/lib.rs:1:2:" (recent Rust adds the thread
        // id: "thread 'main' (4242) panicked at ...").
        if line.starts_with("thread '") && line.contains(" panicked at ") && line.ends_with(':') {
            self.expecting_message = true;
            self.in_backtrace = false;
            return None;
        }
        if self.expecting_message {
            self.expecting_message = false;
            let msg = self.message.get_or_insert_with(String::new);
            if !msg.is_empty() {
                msg.push('\n');
            }
            msg.push_str(line);
            return None;
        }
        if line == "stack backtrace:" {
            self.in_backtrace = true;
            return None;
        }
        if self.in_backtrace {
            let t = line.trim_start();
            let frame = t.split_once(':').is_some_and(|(n, _)| n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty());
            if frame || t.starts_with("at ") || t.starts_with("note: Some details are omitted") {
                return None;
            }
            self.in_backtrace = false;
        }
        if line.starts_with("note: run with `RUST_BACKTRACE=1`") {
            return None;
        }
        Some(line.to_string())
    }
}

fn pump(stdout: Receiver<String>, stderr: Receiver<String>, control: Receiver<PumpMsg>, events: Sender<Event>) {
    let mut panic = PanicScan::default();
    let out_line = |line: String, events: &Sender<Event>| match protocol::parse_marker(&line) {
        Some(Ok(m)) => {
            let _ = events.send(Event::Display(m));
        }
        Some(Err(problem)) => {
            let _ = events.send(Event::Stderr(format!("{problem}\n")));
        }
        None => {
            let _ = events.send(Event::Stdout(line + "\n"));
        }
    };
    let err_line = |line: String, panic: &mut PanicScan, events: &Sender<Event>| {
        if let Some(l) = panic.scan(&line) {
            let _ = events.send(Event::Stderr(l + "\n"));
        }
    };
    loop {
        select! {
            recv(stdout) -> l => match l { Ok(l) => out_line(l, &events), Err(_) => return },
            recv(stderr) -> l => match l { Ok(l) => err_line(l, &mut panic, &events), Err(_) => return },
            recv(control) -> msg => {
                let Ok(msg) = msg else { return };
                while let Ok(l) = stdout.try_recv() { out_line(l, &events); }
                // stderr travels through another pipe and thread: wait until it is quiet.
                while let Ok(l) = stderr.recv_timeout(Duration::from_millis(30)) { err_line(l, &mut panic, &events); }
                while let Ok(l) = stdout.try_recv() { out_line(l, &events); }
                match msg {
                    PumpMsg::Flush(done) => { panic = PanicScan::default(); let _ = done.send(()); }
                    PumpMsg::Finished(result, interrupted) => {
                        let result = match (result, panic.message.take()) {
                            // A library loop saw the interrupt and the cell unwound.
                            (Ok(_), Some(_)) if interrupted => Err(ExecError::Interrupted { variables_lost: false }),
                            (Ok(_), Some(message)) => Err(ExecError::Panic { message }),
                            (r, _) => r,
                        };
                        panic = PanicScan::default();
                        let _ = events.send(Event::Done(result));
                    }
                }
            }
        }
    }
}

/// Whether `code` is a complete cell (Jupyter `is_complete`): brackets and strings
/// balanced. Returns `Some(indent)` when more input is needed.
pub fn needs_more_input(code: &str) -> Option<String> {
    let mut depth: i64 = 0;
    let mut chars = code.chars().peekable();
    let mut in_str = false;
    let mut in_line_comment = false;
    let mut block_comment = 0;
    while let Some(c) = chars.next() {
        if in_line_comment {
            if c == '\n' {
                in_line_comment = false;
            }
            continue;
        }
        if block_comment > 0 {
            if c == '*' && chars.peek() == Some(&'/') {
                chars.next();
                block_comment -= 1;
            } else if c == '/' && chars.peek() == Some(&'*') {
                chars.next();
                block_comment += 1;
            }
            continue;
        }
        if in_str {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '/' if chars.peek() == Some(&'/') => in_line_comment = true,
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                block_comment += 1;
            }
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            _ => {}
        }
    }
    if in_str || block_comment > 0 || depth > 0 {
        Some("    ".repeat(depth.max(1) as usize))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_lines_become_the_message_and_backtraces_are_hidden() {
        let mut p = PanicScan::default();
        assert_eq!(p.scan("before"), Some("before".into()));
        assert_eq!(p.scan("thread 'main' (11096) panicked at src/lib.rs:10:5:"), None);
        assert_eq!(p.scan("boom 42"), None);
        assert_eq!(p.scan("stack backtrace:"), None);
        assert_eq!(p.scan("   0: rust_begin_unwind"), None);
        assert_eq!(p.scan("             at /rustc/x/library/std/src/panicking.rs:665:5"), None);
        assert_eq!(p.scan("note: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace."), None);
        assert_eq!(p.scan("after"), Some("after".into()));
        assert_eq!(p.message.as_deref(), Some("boom 42"));
    }

    #[test]
    fn completeness_follows_brackets_strings_and_comments() {
        assert_eq!(needs_more_input("let x = 1;"), None);
        assert!(needs_more_input("fn f() {").is_some());
        assert!(needs_more_input("let s = \"abc").is_some());
        assert_eq!(needs_more_input("let s = \"{\"; // {"), None);
        assert!(needs_more_input("/* open").is_some());
    }
}
