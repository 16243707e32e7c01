//! Serving and evaluation on the SmolLM2 GGUF: a notebook's `Endpoint` runs `tunebook serve`
//! as a background worker, answers over HTTP, is found again by name from a new handle (as
//! after a kernel restart) and stops on request; an `Evaluation`'s greedy answers do not
//! depend on how many rows are decoded together.

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

#[test]
fn evaluation_answers_are_identical_with_batch_size_1_and_16_and_equal_model_chat() -> Result<()> {
    use tunebook::data::Dataset;
    use tunebook::eval::Evaluation;
    let Some(gguf) = common::gguf_or_skip("evaluation_answers_are_identical") else { return Ok(()) };
    let data = Dataset::open(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/sample/dates-eval.jsonl"))?;
    let gguf = gguf.display().to_string();
    let run = |batch: usize| {
        Evaluation::new(data.clone())
            .model("smol", gguf.as_str())
            .metrics(["exact_match", "rougeL"])
            .limit(16)
            .max_new_tokens(10)
            .batch_size(batch)
            .run()
    };
    let (one, sixteen) = (run(1)?, run(16)?);
    let answers = |r: &tunebook::eval::EvalResult| r.models[0].answers.iter().map(|a| (a.text.clone(), a.truncated)).collect::<Vec<_>>();
    assert_eq!(answers(&one), answers(&sixteen));
    assert_eq!(one.score("smol", "rougeL"), sixteen.score("smol", "rougeL"));
    // The serving path renders the prompt with the model's own template and stops at its
    // end-of-turn token, as Model::chat does.
    let model = tunebook::model::Model::load(&gguf)?;
    let g = tunebook::model::GenerationConfig::greedy(10);
    for i in [0, 7] {
        let chat = model.chat_with(&one.rows[i].prompt, &g, |_| {})?;
        assert_eq!(chat.text, one.models[0].answers[i].text, "row {i}");
    }
    Ok(())
}

#[test]
fn multiple_choice_and_reference_perplexity_score_log_likelihoods_of_a_local_model() -> Result<()> {
    use polars::prelude::*;
    use tunebook::data::Dataset;
    use tunebook::eval::Evaluation;
    let Some(gguf) = common::gguf_or_skip("multiple_choice_and_reference_perplexity") else { return Ok(()) };
    let gguf = gguf.display().to_string();
    let choices = Series::new(
        "choices".into(),
        [Series::new("".into(), ["Berlin", "Paris", "Madrid"]), Series::new("".into(), ["green", "blue", "red", "purple"])],
    );
    let df = DataFrame::new(2, vec![
        Column::new("prompt".into(), ["What is the capital of France? Answer with one word.", "What color is a clear daytime sky? Answer with one word."]),
        choices.into(),
        Column::new("answer".into(), [1u32, 1]),
    ])?;
    let r = Evaluation::new(Dataset::from_polars(df))
        .model("smol", gguf.as_str())
        .multiple_choice("choices", "answer")
        .metrics(["acc", "acc_norm"])
        .run()?;
    // The most likely choice is shown as the answer, and it is the right one here.
    let answers: Vec<&str> = r.models[0].answers.iter().map(|a| a.text.as_str()).collect();
    assert_eq!(answers, ["Paris", "blue"]);
    assert_eq!(r.score("smol", "acc"), Some(1.0));
    assert_eq!(r.models[0].answers[1].choice_logprobs.len(), 4);
    assert!(r.models[0].answers[0].choice_logprobs.iter().all(|lp| *lp < 0.0));

    let data = Dataset::open(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/sample/dates-eval.jsonl"))?;
    let r = Evaluation::new(data).model("smol", gguf.as_str()).metrics(["perplexity", "token_accuracy"]).limit(6).run()?;
    let (ppl, acc) = (r.score("smol", "perplexity").unwrap(), r.score("smol", "token_accuracy").unwrap());
    assert!(ppl > 1.0 && ppl < 20.0 && acc > 0.0 && acc <= 1.0, "perplexity {ppl}, token accuracy {acc}");
    // Token-weighted: the aggregate is exp(Σ NLL / Σ tokens), not the mean of row perplexities.
    let rows: Vec<_> = r.models[0].answers.iter().map(|a| a.reference.clone().unwrap()).collect();
    let (nll, n): (f64, usize) = rows.iter().fold((0.0, 0), |(s, n), c| (s - c.logprob, n + c.tokens));
    assert!((ppl - (nll / n as f64).exp()).abs() < 1e-12);
    Ok(())
}
