//! The engine thread: owns the model and runs iteration-level scheduling.
//!
//! Every step it takes the requests that arrived, frees the sequences whose clients are
//! gone, admits waiting requests up to the batch limit, and runs one
//! [`LlamaModel::forward_batch`](crate::model::LlamaModel::forward_batch): every running
//! sequence advances one token, and new prompts are prefilled in the same step within a
//! token budget (a long prompt is cut into chunks over several steps, so running
//! sequences never wait for a whole long prompt). A sequence leaves the batch as soon as
//! it finishes. HTTP handlers only send [`Job`]s and read [`Event`]s: no tensor is
//! touched outside this thread.

use super::metrics::Metrics;
use crate::model::{AdapterWeights, GenerationConfig, KvCache, Model, Sampler, SeqStep, TextStream};
use anyhow::Result;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// One token's log-probability and the most likely alternatives, as OpenAI reports them.
#[derive(Clone, Debug)]
pub(crate) struct TokenLogprob {
    /// Where the token's text starts in the completion, in characters.
    pub offset: usize,
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// Why a sequence ended, in OpenAI's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the engine tells a request's handler.
#[derive(Debug)]
pub(crate) enum Event {
    /// New text (never part of a stop string) and the log-probabilities of its tokens.
    Text { text: String, logprobs: Vec<TokenLogprob> },
    /// The sequence ended.
    Done { finish: Finish, prompt_tokens: usize, completion_tokens: usize },
    /// The sequence failed; the others go on.
    Failed(String),
}

/// A generation request, ready for the engine.
pub(crate) struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// Temperature, top-p, seed and stop strings.
    pub sampling: GenerationConfig,
    /// `Some(k)`: report each token's log-probability and its `k` most likely alternatives.
    pub logprobs: Option<usize>,
    /// The adapter the request started with (kept even if it is unloaded meanwhile).
    pub adapter: Option<Arc<AdapterWeights>>,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
}

/// Limits of the scheduler.
#[derive(Clone, Copy, Debug)]
pub struct EngineLimits {
    /// Most sequences decoded together.
    pub max_running: usize,
    /// Most prompt tokens prefilled in one step (longer prompts are chunked).
    pub prefill_tokens_per_step: usize,
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self { max_running: 8, prefill_tokens_per_step: 256 }
    }
}

struct Seq {
    job: Job,
    cache: KvCache,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// The token to feed next once prefill is done.
    next: Option<u32>,
    sampler: Sampler,
    context: Vec<u32>,
    produced: usize,
    text: TextStream,
    /// Log-probabilities not yet sent, with the text offset where each token starts.
    pending: VecDeque<(usize, TokenLogprob)>,
    last_token_at: Option<Instant>,
    /// The client went away.
    gone: bool,
}

/// Runs the engine on the calling thread until every sender of `jobs` is dropped.
pub(crate) fn run(model: Arc<Model>, jobs: mpsc::Receiver<Job>, limits: EngineLimits, metrics: Arc<Metrics>) {
    let tok = model.tokenizer.clone().expect("serve checks the model has a tokenizer");
    let mut eos = model.llama.config.eos_token_ids.clone();
    eos.extend_from_slice(tok.stop_ids());
    let mut waiting: VecDeque<Seq> = VecDeque::new();
    let mut running: Vec<Seq> = Vec::new();
    let new_seq = |job: Job| -> Option<Seq> {
        let sampler = match Sampler::new(job.sampling.clone()) {
            Ok(s) => s,
            Err(e) => {
                let _ = job.events.send(Event::Failed(format!("{e:#}")));
                return None;
            }
        };
        let text = TextStream::new(&tok, &job.sampling.stop_strings);
        Some(Seq {
            context: job.prompt.clone(),
            job,
            cache: KvCache::new(),
            prefilled: 0,
            next: None,
            sampler,
            produced: 0,
            text,
            pending: VecDeque::new(),
            last_token_at: None,
            gone: false,
        })
    };
    loop {
        // Wait for work when idle; otherwise take what arrived without waiting.
        if running.is_empty() && waiting.is_empty() {
            match jobs.recv() {
                Ok(job) => waiting.extend(new_seq(job)),
                Err(_) => return,
            }
        }
        while let Ok(job) = jobs.try_recv() {
            waiting.extend(new_seq(job));
        }
        // A client that went away frees its sequence at once.
        let gone = |s: &Seq| s.job.events.is_closed();
        let before = running.len() + waiting.len();
        running.retain(|s| !gone(s));
        waiting.retain(|s| !gone(s));
        let dropped = before - running.len() - waiting.len();
        if dropped > 0 {
            metrics.aborted.fetch_add(dropped as u64, Ordering::Relaxed);
        }
        while running.len() < limits.max_running {
            let Some(s) = waiting.pop_front() else { break };
            metrics.observe_queue_time(s.job.arrived.elapsed().as_secs_f64());
            running.push(s);
        }
        metrics.running.store(running.len() as u64, Ordering::Relaxed);
        metrics.waiting.store(waiting.len() as u64, Ordering::Relaxed);
        if running.is_empty() {
            continue;
        }
        // Decoding sequences feed their last token. A prompt (or the rest of one) that fits
        // in what is left of the step's budget runs whole; a longer one runs in chunks of
        // exactly the budget, counted from its start, in steps where it has the whole
        // budget. So how a prompt is split never depends on what else arrived: prompts up
        // to the budget compute exactly what `Model::generate` does.
        let full = limits.prefill_tokens_per_step.max(1);
        let mut budget = full;
        let mut chunks: Vec<Option<(usize, usize)>> = Vec::with_capacity(running.len());
        for s in &running {
            if s.next.is_some() {
                chunks.push(None);
                continue;
            }
            let rest = s.job.prompt.len() - s.prefilled;
            let n = if rest <= budget {
                rest
            } else if budget == full {
                full
            } else {
                0
            };
            budget -= n;
            chunks.push(Some((s.prefilled, n)));
        }
        let mut steps = Vec::with_capacity(running.len());
        let mut who = Vec::with_capacity(running.len());
        for (i, (s, chunk)) in running.iter_mut().zip(&chunks).enumerate() {
            let tokens: &[u32] = match (chunk, &s.next) {
                (None, Some(t)) => std::slice::from_ref(t),
                (Some((from, n)), _) if *n > 0 => &s.job.prompt[*from..from + n],
                _ => continue,
            };
            steps.push(SeqStep { tokens, cache: &mut s.cache, adapter: s.job.adapter.as_deref() });
            who.push(i);
        }
        let t0 = Instant::now();
        let out = rayon::scope(|_| model.llama.forward_batch(&mut steps));
        drop(steps);
        metrics.observe_step(t0.elapsed().as_secs_f64(), who.len());
        let logits = match out {
            Ok(l) => l,
            Err(e) => {
                // A failed step fails its sequences, not the server.
                let msg = format!("{e:#}");
                for i in who.iter().rev() {
                    let s = running.remove(*i);
                    let _ = s.job.events.send(Event::Failed(msg.clone()));
                }
                continue;
            }
        };
        let mut finished = Vec::new();
        for (row, &i) in logits.iter().zip(&who) {
            let s = &mut running[i];
            if let Some((from, n)) = chunks[i] {
                s.prefilled = from + n;
                if s.prefilled < s.job.prompt.len() {
                    continue;
                }
            }
            match advance(s, row, &eos, &tok, &metrics) {
                Ok(None) => {}
                Ok(Some(finish)) => finished.push((i, finish)),
                Err(e) => {
                    let _ = s.job.events.send(Event::Failed(format!("{e:#}")));
                    finished.push((i, Finish::Stop));
                }
            }
        }
        for (i, finish) in finished.into_iter().rev() {
            let mut s = running.remove(i);
            if s.gone {
                metrics.aborted.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let rest = s.text.finish();
            let logprobs = s.pending.drain(..).map(|p| p.1).collect::<Vec<_>>();
            if !rest.is_empty() || !logprobs.is_empty() {
                let _ = s.job.events.send(Event::Text { text: rest, logprobs });
            }
            metrics.observe_done(&s.job, finish, s.produced);
            let _ = s.job.events.send(Event::Done { finish, prompt_tokens: s.job.prompt.len(), completion_tokens: s.produced });
        }
        metrics.running.store(running.len() as u64, Ordering::Relaxed);
    }
}

/// Samples a sequence's next token from its logits and sends the text it releases;
/// returns why the sequence ended, if it did.
fn advance(s: &mut Seq, logits: &[f32], eos: &[u32], tok: &crate::tokenize::Tokenizer, metrics: &Metrics) -> Result<Option<Finish>> {
    let id = s.sampler.sample(logits, &s.context);
    let now = Instant::now();
    match s.last_token_at {
        None => metrics.observe_ttft(now.duration_since(s.job.arrived).as_secs_f64()),
        Some(t) => metrics.observe_itl(now.duration_since(t).as_secs_f64()),
    }
    s.last_token_at = Some(now);
    s.produced += 1;
    metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
    if eos.contains(&id) && !s.job.sampling.ignore_eos {
        return Ok(Some(Finish::Stop));
    }
    s.context.push(id);
    s.next = Some(id);
    if let Some(k) = s.job.logprobs {
        let start = s.text.text().len();
        let mut lp = token_logprob(logits, id, k, tok)?;
        lp.offset = s.text.text().chars().count();
        s.pending.push_back((start, lp));
    }
    let piece = s.text.push(id)?;
    let stopped = s.text.stopped();
    // Tokens whose text starts at or after a stop string's cut never reach the client.
    let cut = s.text.text().len();
    if stopped {
        s.pending.retain(|p| p.0 < cut);
    }
    let shown = s.text.emitted_len();
    let mut logprobs = Vec::new();
    while s.pending.front().is_some_and(|p| p.0 < shown || (stopped && p.0 < cut)) {
        logprobs.push(s.pending.pop_front().expect("checked").1);
    }
    if !piece.is_empty() || !logprobs.is_empty() {
        if s.job.events.send(Event::Text { text: piece, logprobs }).is_err() {
            s.gone = true;
            return Ok(Some(Finish::Stop));
        }
    }
    if stopped {
        return Ok(Some(Finish::Stop));
    }
    if s.produced >= s.job.max_tokens {
        return Ok(Some(Finish::Length));
    }
    Ok(None)
}

/// The chosen token's log-probability and the `k` most likely tokens'.
fn token_logprob(logits: &[f32], id: u32, k: usize, tok: &crate::tokenize::Tokenizer) -> Result<TokenLogprob> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let text = |t: u32| tok.decode(&[t], false).unwrap_or_default();
    let mut top = Vec::new();
    if k > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = k.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        idx.truncate(k);
        idx.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        top = idx.into_iter().map(|t| (text(t), logits[t as usize] - lse)).collect();
    }
    Ok(TokenLogprob { offset: 0, token: text(id), logprob: logits[id as usize] - lse, top })
}
