//! Offline batched generation: many prompts through the serving engine without HTTP.
//!
//! Evaluation generates its answers here, so they come from exactly the code path a
//! served request takes (the same scheduler, batched decoding, stop handling and
//! end-of-turn ids): an answer does not depend on how many other prompts share the batch.

use super::engine::{self, EngineLimits, Event, Finish, Job};
use super::metrics::Metrics;
use crate::model::{AdapterWeights, GenerationConfig, Model};
use anyhow::{Result, bail};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One prompt for [`generate_batch`].
#[derive(Clone)]
pub struct BatchPrompt {
    /// The prompt's token ids (from [`crate::tokenize::Tokenizer::encode_chat`] for chat).
    pub tokens: Vec<u32>,
    /// A LoRA adapter applied, unmerged, to this prompt's rows only.
    pub adapter: Option<Arc<AdapterWeights>>,
}

/// What one prompt produced.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchAnswer {
    /// The answer, without the stop string or end-of-turn token that ended it.
    pub text: String,
    /// `true` when `max_new_tokens` cut the answer (OpenAI's `finish_reason: "length"`).
    pub truncated: bool,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// From submission to the last token (in a batch, waiting for a slot counts).
    pub latency: Duration,
}

/// Generates an answer for every prompt, `max_batch` sequences decoded together by the
/// serving engine; `sampling` gives `max_new_tokens`, temperature (0: greedy), seed and
/// stop strings. Answers come back in the order of `prompts`. Interruptible: a notebook
/// interrupt stops the engine and returns the interrupt's error.
pub fn generate_batch(model: Arc<Model>, prompts: &[BatchPrompt], sampling: &GenerationConfig, max_batch: usize) -> Result<Vec<BatchAnswer>> {
    if model.tokenizer.is_none() {
        bail!("the model has no tokenizer: generation needs one (load the model from a folder with tokenizer.json or a GGUF)");
    }
    let context = model.llama.config.max_position_embeddings;
    for (i, p) in prompts.iter().enumerate() {
        if p.tokens.is_empty() {
            bail!("prompt {i} is empty");
        }
        if p.tokens.len() + sampling.max_new_tokens > context {
            bail!(
                "prompt {i} has {} tokens; with max_new_tokens {} it exceeds the model's context of {context} tokens: shorten it or lower max_new_tokens",
                p.tokens.len(),
                sampling.max_new_tokens
            );
        }
    }
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel();
    let limits = EngineLimits { max_running: max_batch.max(1), ..EngineLimits::default() };
    let metrics = Arc::new(Metrics::new("batch"));
    let m = model.clone();
    let engine = std::thread::Builder::new().name("engine".into()).spawn(move || engine::run(m, jobs_rx, limits, metrics))?;
    let mut receivers = Vec::with_capacity(prompts.len());
    for p in prompts {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let arrived = Instant::now();
        let job = Job {
            prompt: p.tokens.clone(),
            max_tokens: sampling.max_new_tokens,
            sampling: sampling.clone(),
            logprobs: None,
            adapter: p.adapter.clone(),
            events: tx,
            arrived,
        };
        jobs_tx.send(job).map_err(|_| anyhow::anyhow!("the generation engine stopped"))?;
        receivers.push((rx, arrived));
    }
    drop(jobs_tx);
    // Every receiver is polled in turn, so a row's latency ends when its last event
    // arrives, not when it is read.
    let mut texts = vec![String::new(); prompts.len()];
    let mut out: Vec<Option<BatchAnswer>> = vec![None; prompts.len()];
    let mut left = prompts.len();
    while left > 0 {
        crate::interrupt::check()?;
        let mut progressed = false;
        for (i, (rx, arrived)) in receivers.iter_mut().enumerate() {
            if out[i].is_some() {
                continue;
            }
            loop {
                let ev = match rx.try_recv() {
                    Ok(ev) => ev,
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => bail!("prompt {i}: the generation engine stopped"),
                };
                progressed = true;
                match ev {
                    Event::Text { text, .. } => texts[i].push_str(&text),
                    Event::Done { finish, prompt_tokens, completion_tokens } => {
                        out[i] = Some(BatchAnswer {
                            text: std::mem::take(&mut texts[i]),
                            truncated: finish == Finish::Length,
                            prompt_tokens,
                            completion_tokens,
                            latency: arrived.elapsed(),
                        });
                        left -= 1;
                        break;
                    }
                    Event::Failed(e) => bail!("prompt {i}: {e}"),
                }
            }
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    drop(receivers);
    let _ = engine.join();
    Ok(out.into_iter().map(|a| a.expect("every prompt finished")).collect())
}
