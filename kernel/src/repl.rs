//! `tunebook-kernel repl`: the same engine and preload in a terminal, with line
//! editing and history (rustyline), showing `text/plain` renderings.

use crate::engine::{Engine, EngineConfig, Event, Frontend, needs_more_input};
use anyhow::Result;
use rustyline::error::ReadlineError;
use std::io::Write;
use std::sync::Arc;

/// Runs the REPL until `:quit` or end of input.
pub fn run() -> Result<()> {
    // Ctrl-C while a cell runs: the terminal sends SIGINT to the whole process
    // group. Block it here and forward it to the engine from a dedicated thread.
    crate::block_sigint();
    let engine = Arc::new(Engine::start(EngineConfig {
        frontend: Frontend::Repl,
        library: Some(crate::slot::library_path()),
        warm_cells: vec![],
        handover: None,
    }));
    {
        let engine = engine.clone();
        std::thread::spawn(move || loop {
            if crate::wait_sigint() {
                engine.interrupt();
            }
        });
    }
    let mut rl = rustyline::DefaultEditor::new()?;
    let history = crate::slot::cache_dir().join("repl_history");
    let _ = rl.load_history(&history);
    eprintln!("tunebook {} REPL — loading the library in the background; :quit to leave", env!("CARGO_PKG_VERSION"));
    let mut ready_reported = false;
    loop {
        let mut code = String::new();
        let mut prompt = ">> ";
        loop {
            match rl.readline(prompt) {
                Ok(line) => {
                    code.push_str(&line);
                    code.push('\n');
                    if needs_more_input(&code).is_none() {
                        break;
                    }
                    prompt = ".. ";
                }
                Err(ReadlineError::Interrupted) => {
                    code.clear();
                    break;
                }
                Err(ReadlineError::Eof) => {
                    let _ = rl.save_history(&history);
                    engine.shutdown();
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
        let trimmed = code.trim();
        if trimmed.is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(trimmed);
        if trimmed == ":quit" || trimmed == ":q" {
            let _ = rl.save_history(&history);
            engine.shutdown();
            return Ok(());
        }
        engine.execute(&code);
        loop {
            let Ok(ev) = engine.events.recv() else { return Ok(()) };
            match ev {
                Event::Progress(p) => eprintln!("… {p}"),
                Event::Ready(Ok(d)) => {
                    if !ready_reported {
                        eprintln!("tunebook ready (preloaded in {:.1} s)", d.as_secs_f64());
                        ready_reported = true;
                    }
                }
                Event::Ready(Err(e)) => eprintln!("tunebook failed to load: {e}"),
                Event::Stdout(t) => {
                    print!("{t}");
                    let _ = std::io::stdout().flush();
                }
                Event::Stderr(t) => eprint!("{t}"),
                Event::Display(m) => {
                    if let Some(text) = m.data.get("text/plain").and_then(|v| v.as_str()) {
                        println!("{text}");
                    }
                }
                Event::Input { prompt, password: _ } => {
                    let line = rl.readline(&prompt).unwrap_or_default();
                    engine.provide_input(line);
                }
                Event::Done(Ok(data)) => {
                    if let Some(text) = data.get("text/plain") {
                        println!("{text}");
                    }
                    break;
                }
                Event::Done(Err(e)) => {
                    for line in e.traceback() {
                        eprintln!("{line}");
                    }
                    break;
                }
            }
        }
    }
}
