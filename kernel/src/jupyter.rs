//! The Jupyter messaging protocol (5.3) over ZeroMQ, using `jupyter-protocol` for
//! message types and `jupyter-zmq-client` for sockets and HMAC signing.
//!
//! Tasks: the shell reader answers `kernel_info`, `complete`, `inspect`,
//! `is_complete`, `history` and `comm_info` at once and queues `execute_request`s
//! for the executor task, which runs them one at a time against the [`Engine`];
//! the control reader handles `interrupt_request` and `shutdown_request` even
//! while a cell runs; the heartbeat task echoes pings. Messages whose HMAC
//! signature does not verify are dropped (and logged on the kernel's stderr).

use crate::engine::{Engine, Event, ExecError};
use anyhow::{Context, Result};
use jupyter_protocol::{
    CommInfoReply, CompleteReply, ConnectionInfo, DisplayData, ErrorOutput, ExecuteInput, ExecuteReply, ExecuteResult,
    ExecutionCount, ExecutionState, HelpLink, HistoryReply, InputRequest, InspectReply, InterruptReply,
    IsCompleteReply, IsCompleteReplyStatus, JupyterMessage, JupyterMessageContent, KernelInfoReply, LanguageInfo,
    Media, ReplyError, ReplyStatus, ShutdownReply, Status, StreamContent, Transient, UpdateDisplayData,
};
use jupyter_zmq_client::{
    KernelIoPubConnection, KernelStdinConnection, RouterSendConnection, create_kernel_control_connection,
    create_kernel_heartbeat_connection, create_kernel_iopub_connection, create_kernel_shell_connection,
    create_kernel_stdin_connection,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, mpsc};

type IoPub = Arc<Mutex<KernelIoPubConnection>>;
type ShellSend = Arc<Mutex<RouterSendConnection>>;

/// Runs the kernel until a `shutdown_request` arrives. `from_standby`: the
/// engine was preloaded by a standby before this kernel start.
pub async fn serve(connection_file: &Path, engine: Arc<Engine>, from_standby: bool) -> Result<()> {
    let text = std::fs::read_to_string(connection_file)
        .with_context(|| format!("cannot read connection file {}", connection_file.display()))?;
    let info: ConnectionInfo = serde_json::from_str(&text)
        .with_context(|| format!("connection file {} is not a Jupyter connection file", connection_file.display()))?;
    let session = uuid::Uuid::new_v4().to_string();

    let iopub: IoPub = Arc::new(Mutex::new(create_kernel_iopub_connection(&info, &session).await?));
    let shell = create_kernel_shell_connection(&info, &session).await?;
    let mut control = create_kernel_control_connection(&info, &session).await?;
    let stdin = create_kernel_stdin_connection(&info, &session).await?;
    let mut heartbeat = create_kernel_heartbeat_connection(&info).await?;
    let (shell_send, mut shell_recv) = shell.split();
    let shell_send: ShellSend = Arc::new(Mutex::new(shell_send));

    tokio::spawn(async move {
        loop {
            if heartbeat.single_heartbeat().await.is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    // Engine events (blocking channel) into the async world.
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    {
        let events = engine.events.clone();
        std::thread::spawn(move || {
            for ev in events.iter() {
                if ev_tx.send(ev).is_err() {
                    break;
                }
            }
        });
    }

    // SIGINT to the kernel process interrupts the running cell, like interrupt_request.
    {
        let engine = engine.clone();
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                engine.interrupt();
            }
        });
    }

    let (exec_tx, exec_rx) = mpsc::unbounded_channel::<JupyterMessage>();
    let executor = Executor {
        engine: engine.clone(),
        iopub: iopub.clone(),
        shell: shell_send.clone(),
        stdin,
        events: ev_rx,
        count: 0,
        preload: PreloadState::Loading { since: Instant::now(), last: String::new() },
        announced: false,
        from_standby,
    };
    tokio::spawn(executor.run(exec_rx));

    let (shutdown_tx, mut shutdown_rx) = mpsc::unbounded_channel::<()>();
    {
        let engine = engine.clone();
        let iopub = iopub.clone();
        let shutdown_tx = shutdown_tx.clone();
        tokio::spawn(async move {
            loop {
                let msg = match control.read().await {
                    Ok(m) => m,
                    Err(e) => {
                        eprintln!("tunebook-kernel: rejected a control message: {e}");
                        continue;
                    }
                };
                let reply = match &msg.content {
                    JupyterMessageContent::KernelInfoRequest(_) => Some(kernel_info().as_child_of(&msg)),
                    JupyterMessageContent::InterruptRequest(_) => {
                        engine.interrupt();
                        Some(InterruptReply::new().as_child_of(&msg))
                    }
                    JupyterMessageContent::ShutdownRequest(req) => {
                        let r = ShutdownReply { restart: req.restart, status: ReplyStatus::Ok, error: None }.as_child_of(&msg);
                        let _ = control.send(r).await;
                        status(&iopub, &msg, ExecutionState::Idle).await;
                        let _ = shutdown_tx.send(());
                        None
                    }
                    _ => None,
                };
                if let Some(r) = reply {
                    let _ = control.send(r).await;
                }
            }
        });
    }

    let shell_task = {
        let engine = engine.clone();
        let iopub = iopub.clone();
        let shell_send = shell_send.clone();
        tokio::spawn(async move {
            loop {
                let msg = match shell_recv.read().await {
                    Ok(m) => m,
                    Err(e) => {
                        eprintln!("tunebook-kernel: rejected a shell message: {e}");
                        continue;
                    }
                };
                if matches!(msg.content, JupyterMessageContent::ExecuteRequest(_)) {
                    let _ = exec_tx.send(msg);
                    continue;
                }
                status(&iopub, &msg, ExecutionState::Busy).await;
                let reply = shell_reply(&engine, &msg, &shutdown_tx).await;
                if let Some(r) = reply {
                    let _ = shell_send.lock().await.send(r).await;
                }
                status(&iopub, &msg, ExecutionState::Idle).await;
            }
        })
    };

    let _ = shutdown_rx.recv().await;
    engine.shutdown();
    shell_task.abort();
    // Give the reply and the last status message time to leave.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

async fn shell_reply(
    engine: &Arc<Engine>,
    msg: &JupyterMessage,
    shutdown: &mpsc::UnboundedSender<()>,
) -> Option<JupyterMessage> {
    Some(match &msg.content {
        JupyterMessageContent::KernelInfoRequest(_) => kernel_info().as_child_of(msg),
        JupyterMessageContent::IsCompleteRequest(req) => {
            let reply = match crate::engine::needs_more_input(&req.code) {
                Some(indent) => IsCompleteReply { status: IsCompleteReplyStatus::Incomplete, indent },
                None => IsCompleteReply { status: IsCompleteReplyStatus::Complete, indent: String::new() },
            };
            reply.as_child_of(msg)
        }
        JupyterMessageContent::CompleteRequest(req) => {
            let byte_pos = char_to_byte(&req.code, req.cursor_pos);
            let (engine, code) = (engine.clone(), req.code.clone());
            let found = tokio::task::spawn_blocking(move || engine.complete(&code, byte_pos)).await.ok().flatten();
            let (matches, start, end) = match found {
                Some((m, s, e)) => (m, byte_to_char(&req.code, s), byte_to_char(&req.code, e)),
                None => (vec![], req.cursor_pos, req.cursor_pos),
            };
            CompleteReply {
                matches,
                cursor_start: start,
                cursor_end: end,
                metadata: Default::default(),
                status: ReplyStatus::Ok,
                error: None,
            }
            .as_child_of(msg)
        }
        JupyterMessageContent::InspectRequest(req) => {
            let byte_pos = char_to_byte(&req.code, req.cursor_pos);
            let (engine, code) = (engine.clone(), req.code.clone());
            let found = tokio::task::spawn_blocking(move || engine.inspect(&code, byte_pos)).await.ok().flatten();
            let mut data = serde_json::Map::new();
            if let Some((plain, html)) = &found {
                data.insert("text/plain".into(), Value::String(plain.clone()));
                if !html.is_empty() {
                    data.insert("text/html".into(), Value::String(html.clone()));
                }
            }
            InspectReply {
                found: found.is_some(),
                data: media(data),
                metadata: Default::default(),
                status: ReplyStatus::Ok,
                error: None,
            }
            .as_child_of(msg)
        }
        JupyterMessageContent::HistoryRequest(_) => {
            HistoryReply { history: vec![], status: ReplyStatus::Ok, error: None }.as_child_of(msg)
        }
        JupyterMessageContent::CommInfoRequest(_) => {
            CommInfoReply { status: ReplyStatus::Ok, comms: Default::default(), error: None }.as_child_of(msg)
        }
        JupyterMessageContent::ShutdownRequest(req) => {
            let _ = shutdown.send(());
            ShutdownReply { restart: req.restart, status: ReplyStatus::Ok, error: None }.as_child_of(msg)
        }
        _ => return None,
    })
}

fn kernel_info() -> KernelInfoReply {
    KernelInfoReply {
        status: ReplyStatus::Ok,
        protocol_version: "5.3".into(),
        implementation: "tunebook".into(),
        implementation_version: env!("CARGO_PKG_VERSION").into(),
        language_info: LanguageInfo {
            name: "Rust".into(),
            version: env!("CARGO_PKG_RUST_VERSION").into(),
            mimetype: Some("text/rust".into()),
            file_extension: Some(".rs".into()),
            pygments_lexer: Some("rust".into()),
            codemirror_mode: Some(jupyter_protocol::CodeMirrorMode::Simple("rust".into())),
            nbconvert_exporter: Some("rust".into()),
        },
        banner: format!(
            "tunebook {} — Rust with the tunebook library preloaded (`use tunebook::prelude::*`)",
            env!("CARGO_PKG_VERSION")
        ),
        help_links: vec![HelpLink { text: "tunebook".into(), url: "https://github.com/tunebook/tunebook".into() }],
        debugger: false,
        error: None,
    }
}

async fn status(iopub: &IoPub, parent: &JupyterMessage, state: ExecutionState) {
    let _ = iopub.lock().await.send(Status { execution_state: state }.as_child_of(parent)).await;
}

/// Builds Jupyter `Media` from `{mime: data}`; JSON mime types carry JSON values.
fn media(map: serde_json::Map<String, Value>) -> Media {
    serde_json::from_value(Value::Object(map)).unwrap_or_default()
}

fn rich_media(data: &BTreeMap<String, String>) -> Media {
    let map = data
        .iter()
        .map(|(mime, body)| {
            let v = if mime.ends_with("json") {
                serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.clone()))
            } else {
                Value::String(body.clone())
            };
            (mime.clone(), v)
        })
        .collect();
    media(map)
}

fn char_to_byte(s: &str, chars: usize) -> usize {
    s.char_indices().nth(chars).map(|(b, _)| b).unwrap_or(s.len())
}

fn byte_to_char(s: &str, byte: usize) -> usize {
    s.get(..byte.min(s.len())).map(|p| p.chars().count()).unwrap_or(0)
}

enum PreloadState {
    Loading { since: Instant, last: String },
    Ready(Duration),
    Failed(String),
}

struct Executor {
    engine: Arc<Engine>,
    iopub: IoPub,
    shell: ShellSend,
    stdin: KernelStdinConnection,
    events: mpsc::UnboundedReceiver<Event>,
    count: usize,
    preload: PreloadState,
    announced: bool,
    from_standby: bool,
}

impl Executor {
    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<JupyterMessage>) {
        loop {
            tokio::select! {
                req = requests.recv() => match req {
                    Some(msg) => self.execute(msg).await,
                    None => return,
                },
                ev = self.events.recv() => match ev {
                    Some(ev) => self.idle_event(ev),
                    None => return,
                },
            }
        }
    }

    /// Events that arrive while no cell runs (preload progress).
    fn idle_event(&mut self, ev: Event) {
        match ev {
            Event::Progress(p) => {
                if let PreloadState::Loading { last, .. } = &mut self.preload {
                    *last = p;
                }
            }
            Event::Ready(Ok(d)) => self.preload = PreloadState::Ready(d),
            Event::Ready(Err(e)) => self.preload = PreloadState::Failed(e),
            _ => {}
        }
    }

    async fn iopub(&self, msg: JupyterMessage) {
        let _ = self.iopub.lock().await.send(msg).await;
    }

    async fn stream(&self, parent: &JupyterMessage, stderr: bool, text: String) {
        let content = if stderr { StreamContent::stderr(&text) } else { StreamContent::stdout(&text) };
        self.iopub(content.as_child_of(parent)).await;
    }

    async fn display(&self, parent: &JupyterMessage, data: Media, id: Option<String>, update: bool) {
        let msg = match (update, id) {
            (true, Some(id)) => UpdateDisplayData::new(data, &id).as_child_of(parent),
            (_, id) => DisplayData {
                data,
                metadata: Default::default(),
                transient: id.map(|id| Transient { display_id: Some(id) }),
            }
            .as_child_of(parent),
        };
        self.iopub(msg).await;
    }

    /// Waits for the preload, showing its progress in the first cell.
    async fn wait_for_preload(&mut self, parent: &JupyterMessage) {
        let id = format!("tunebook-preload-{}", uuid::Uuid::new_v4());
        // Progress that arrived before this kernel's client connected (a standby's preload).
        while let Ok(ev) = self.events.try_recv() {
            self.idle_event(ev);
        }
        let mut shown = false;
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            let (since, last) = match &self.preload {
                PreloadState::Loading { since, last } => (*since, last.clone()),
                _ => break,
            };
            let line = format!("⏳ loading tunebook: {last} … {:.0} s", since.elapsed().as_secs_f64());
            let data = media(serde_json::Map::from_iter([("text/plain".to_string(), Value::String(line))]));
            self.display(parent, data, Some(id.clone()), shown).await;
            shown = true;
            tokio::select! {
                _ = tick.tick() => {}
                ev = self.events.recv() => match ev { Some(ev) => self.idle_event(ev), None => return },
            }
        }
        if !self.announced {
            self.announced = true;
            let line = match &self.preload {
                PreloadState::Ready(_) if self.from_standby => format!(
                    "tunebook {} ready (preloaded in advance by a standby kernel)",
                    env!("CARGO_PKG_VERSION")
                ),
                PreloadState::Ready(d) => format!(
                    "tunebook {} ready (preloaded in {:.1} s)",
                    env!("CARGO_PKG_VERSION"),
                    d.as_secs_f64()
                ),
                PreloadState::Failed(e) => format!("tunebook failed to load: {e}"),
                PreloadState::Loading { .. } => unreachable!(),
            };
            let data = media(serde_json::Map::from_iter([("text/plain".to_string(), Value::String(line))]));
            self.display(parent, data, Some(id), shown).await;
        }
    }

    async fn execute(&mut self, msg: JupyterMessage) {
        let JupyterMessageContent::ExecuteRequest(req) = &msg.content else { return };
        let req = req.clone();
        status(&self.iopub, &msg, ExecutionState::Busy).await;
        if !req.silent && req.store_history {
            self.count += 1;
        }
        let count = ExecutionCount::new(self.count);
        self.iopub(ExecuteInput { code: req.code.clone(), execution_count: count }.as_child_of(&msg)).await;
        self.wait_for_preload(&msg).await;

        let outcome = if let PreloadState::Failed(e) = &self.preload {
            Err(ExecError::Other(format!("{e}\nFix the problem above and restart the kernel.")))
        } else if req.code.trim().is_empty() {
            Ok(BTreeMap::new())
        } else {
            self.engine.execute(&req.code);
            loop {
                let Some(ev) = self.events.recv().await else { return };
                match ev {
                    Event::Stdout(t) => self.stream(&msg, false, t).await,
                    Event::Stderr(t) => self.stream(&msg, true, t).await,
                    Event::Display(m) => {
                        let data = match m.data {
                            Value::Object(map) => media(map),
                            _ => Media::default(),
                        };
                        self.display(&msg, data, m.id, m.update).await;
                    }
                    Event::Input { prompt, password } => {
                        let value = if req.allow_stdin { self.ask(&msg, prompt, password).await } else {
                            self.stream(&msg, true, "input was requested, but this frontend does not accept input (allow_stdin is false)\n".into()).await;
                            String::new()
                        };
                        self.engine.provide_input(value);
                    }
                    Event::Done(r) => break r,
                    other => self.idle_event(other),
                }
            }
        };

        let reply = match outcome {
            Ok(data) => {
                if !data.is_empty() && !req.silent {
                    let result = ExecuteResult {
                        execution_count: count,
                        data: rich_media(&data),
                        metadata: Default::default(),
                        transient: None,
                    };
                    self.iopub(result.as_child_of(&msg)).await;
                }
                ExecuteReply { status: ReplyStatus::Ok, execution_count: count, payload: vec![], user_expressions: None, error: None }
            }
            Err(e) => {
                let (ename, evalue, traceback) = (e.name().to_string(), e.value(), e.traceback());
                self.iopub(ErrorOutput { ename: ename.clone(), evalue: evalue.clone(), traceback: traceback.clone() }.as_child_of(&msg)).await;
                ExecuteReply {
                    status: ReplyStatus::Error,
                    execution_count: count,
                    payload: vec![],
                    user_expressions: None,
                    error: Some(Box::new(ReplyError { ename, evalue, traceback })),
                }
            }
        };
        let _ = self.shell.lock().await.send(reply.as_child_of(&msg)).await;
        status(&self.iopub, &msg, ExecutionState::Idle).await;
    }

    /// Asks the frontend for a line of input on the stdin channel.
    async fn ask(&mut self, parent: &JupyterMessage, prompt: String, password: bool) -> String {
        let req = InputRequest { prompt, password }.as_child_of(parent);
        if let Err(e) = self.stdin.send(req).await {
            eprintln!("tunebook-kernel: cannot send input_request: {e}");
            return String::new();
        }
        loop {
            match self.stdin.read().await {
                Ok(m) => {
                    if let JupyterMessageContent::InputReply(r) = m.content {
                        return r.value;
                    }
                }
                Err(e) => {
                    eprintln!("tunebook-kernel: rejected a stdin message: {e}");
                }
            }
        }
    }
}
