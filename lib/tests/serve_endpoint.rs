//! A notebook's serving endpoint: `Endpoint` runs `tunebook serve` as a background worker
//! on the SmolLM2 GGUF, answers over HTTP, is found again by name from a new handle (as
//! after a kernel restart) and stops on request.

mod common;

use anyhow::Result;
use serde_json::json;
use tunebook::display::Render;
use tunebook::serve::Endpoint;
use tunebook::tokenize::Message;

#[test]
fn an_endpoint_runs_as_a_worker_that_a_new_handle_finds_by_name_and_stops() -> Result<()> {
    let Some(gguf) = common::gguf_or_skip("an_endpoint_runs_as_a_worker") else { return Ok(()) };
    let home = tempfile::tempdir()?;
    // SAFETY: the only test in this binary; set before any thread reads the environment.
    unsafe {
        std::env::set_var("TUNEBOOK_HOME", home.path());
        std::env::set_var("TUNEBOOK_BIN", env!("CARGO_BIN_EXE_tunebook"));
    }
    let gguf = gguf.to_string_lossy().to_string();
    let ep = Endpoint::new(&gguf).name("smol").api_key("sk-local").start()?;
    assert!(ep.url().starts_with("http://127.0.0.1:") && ep.url().ends_with("/v1"), "{}", ep.url());
    let ask = |e: &Endpoint| e.chat_with("smol", &[Message::user("What is the capital of France?")], json!({"max_tokens": 20, "temperature": 0}));
    let answer = ask(&ep)?;
    assert!(answer.contains("Paris"), "{answer}");

    // The name is taken while it runs.
    let err = format!("{:#}", Endpoint::new(&gguf).name("smol").start().unwrap_err());
    assert!(err.contains("already running"), "{err}");

    // A new handle, from the files alone, reaches the same server with the stored key.
    let again = Endpoint::attach("smol")?;
    assert_eq!((again.url(), again.pid()), (ep.url(), ep.pid()));
    assert_eq!(ask(&again)?, answer, "greedy answers repeat");
    assert_eq!(Endpoint::list()?.iter().map(|e| e.name().to_string()).collect::<Vec<_>>(), ["smol"]);
    assert_eq!(again.models()?, ["smol"]);
    assert_eq!(again.request_counts()?, [(200, 2)]);
    let shown = again.text_plain();
    assert!(shown.contains(ep.url()) && shown.contains("serving") && shown.contains("2 × 200"), "{shown}");
    assert!(again.logs(50).contains("ready at"), "{}", again.logs(50));

    again.stop()?;
    let err = format!("{:#}", Endpoint::attach("smol").unwrap_err());
    assert!(err.contains("not running"), "{err}");
    assert!(Endpoint::list()?.is_empty());
    Ok(())
}
