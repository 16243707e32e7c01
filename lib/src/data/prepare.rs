//! Formatting and tokenization with loss masks, and token statistics.

use super::validate::{Example, Problem, Rule};
use super::{DataError, Dataset, PackOptions, Packed, Task};
use crate::tokenize::{ChatTemplate, Message, TemplateError, TokenizeError, Tokenizer};
use rayon::prelude::*;

/// Which tokens of a conversation count in the loss (`chat_loss` in `CONFIG.toml`:
/// `all_assistant`, `last_assistant`, `all_tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatLoss {
    /// Every assistant turn (content and its end-of-turn token). The default.
    #[default]
    AllAssistant,
    /// Only the last assistant turn.
    LastAssistant,
    /// Every token, prompts included.
    AllTokens,
}

/// How examples are turned into tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareOptions {
    /// Loss on chat data (instruction data always trains on the response only,
    /// text data on everything).
    pub chat_loss: ChatLoss,
    /// Append the EOS token to instruction and text examples (chat templates
    /// write their own end-of-turn token), so the model learns to stop.
    pub add_eos: bool,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions { chat_loss: ChatLoss::AllAssistant, add_eos: true }
    }
}

impl PrepareOptions {
    /// Sets which chat tokens count in the loss.
    pub fn chat_loss(mut self, loss: ChatLoss) -> Self {
        self.chat_loss = loss;
        self
    }
    /// Whether to append EOS to instruction and text examples.
    pub fn add_eos(mut self, on: bool) -> Self {
        self.add_eos = on;
        self
    }
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    /// Row of the dataset it came from.
    pub row: usize,
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// 1 where the token is a training target (predicted from the tokens before it), else 0.
    pub loss_mask: Vec<u8>,
}

impl TokenizedExample {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    /// Whether the example has no token.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// Number of tokens that count in the loss.
    pub fn trainable(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m != 0).count()
    }
}

/// A tokenized dataset, ready to pack.
#[derive(Debug, Clone)]
pub struct Tokenized {
    /// Where the data came from.
    pub source: String,
    /// Task the examples were formatted for.
    pub task: Task,
    /// Valid examples, in dataset order.
    pub examples: Vec<TokenizedExample>,
    /// Rows left out because validation found problems.
    pub invalid_rows: usize,
    /// Conversations the chat template refused (also left out).
    pub problems: Vec<Problem>,
    /// Id used for padding.
    pub pad_id: u32,
}

impl Tokenized {
    /// Packs (or pads) the examples into fixed windows; see [`PackOptions`].
    pub fn pack(&self, opts: &PackOptions) -> Packed {
        super::pack::pack(&self.examples, opts, self.pad_id)
    }
}

fn tk(e: TokenizeError) -> DataError {
    DataError::Tokenize(e)
}

/// Byte ranges of the assistant turns to train on, found by rendering each
/// prefix of the conversation: the turn is what `messages[..=i]` adds to
/// `messages[..i]` with the generation prompt. Works with any template that
/// renders a conversation as the concatenation of its turns.
fn assistant_spans(
    t: &ChatTemplate,
    full: &str,
    msgs: &[Message],
    last_only: bool,
    eos: Option<&str>,
) -> Result<Vec<(usize, usize)>, TemplateError> {
    let mut spans = vec![];
    let targets: Vec<usize> = msgs.iter().enumerate().filter(|(_, m)| m.role == "assistant").map(|(i, _)| i).collect();
    let targets = if last_only { targets.last().copied().into_iter().collect() } else { targets };
    let mut search_from = 0;
    let values = ChatTemplate::values(msgs);
    for i in targets {
        let prompt = t.render_values(&values[..i], true)?;
        let upto = if i + 1 == msgs.len() { full.to_string() } else { t.render_values(&values[..=i], false)? };
        // Where the turn with the answer departs from the generation prompt
        // (some templates end the prompt with whitespace the turn does not have).
        let mut common = prompt.bytes().zip(upto.bytes()).take_while(|(a, b)| a == b).count();
        while !(upto.is_char_boundary(common) && prompt.is_char_boundary(common)) {
            common -= 1;
        }
        let (start, mut end) = if full.starts_with(upto.as_str()) && prompt[common..].trim().is_empty() {
            (common, upto.len())
        } else {
            // The template is not prefix-stable (e.g. it changes earlier turns
            // depending on later ones): fall back to the content's position.
            // The end-of-turn token right after the content is trained on too.
            match full[search_from..].find(msgs[i].content.as_str()) {
                Some(p) => {
                    let end = search_from + p + msgs[i].content.len();
                    let eos_len = eos.filter(|e| !e.is_empty() && full[end..].starts_with(*e)).map_or(0, str::len);
                    (search_from + p, end + eos_len)
                }
                None => continue,
            }
        };
        // The newline a template writes after the end-of-turn token is not a target
        // (whitespace inside the content is).
        let content_end = full[start..end].rfind(msgs[i].content.as_str()).map(|p| start + p + msgs[i].content.len()).unwrap_or(start);
        while end > content_end && full.as_bytes()[end - 1].is_ascii_whitespace() {
            end -= 1;
        }
        search_from = end;
        spans.push((start, end));
    }
    Ok(spans)
}

/// Rows tokenized between two interrupt checks.
const CHUNK: usize = 4096;

enum Outcome {
    Ok(TokenizedExample),
    Rejected(Problem),
}

fn tokenize_one(
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    row: usize,
    ex: &Example,
    opts: &PrepareOptions,
) -> Result<Outcome, DataError> {
    let eos = tok.eos_id().filter(|_| opts.add_eos);
    Ok(Outcome::Ok(match ex {
        Example::Chat(msgs) => {
            let t = template.ok_or_else(|| tk(TokenizeError::NoChatTemplate { source_path: tok.source().to_string() }))?;
            let full = match t.render(msgs, false) {
                Ok(s) => s,
                Err(TemplateError::Raised(m)) => {
                    return Ok(Outcome::Rejected(Problem::new(
                        Some(row),
                        "messages",
                        Rule::TemplateRejected,
                        format!("the model's chat template refused this conversation: {m}"),
                        "reshape the conversation the way the model expects, or drop the row",
                    )));
                }
                Err(e) => return Err(tk(e.into())),
            };
            let (ids, offsets) = tok.encode_with_offsets(&full, false).map_err(tk)?;
            let mask = if opts.chat_loss == ChatLoss::AllTokens {
                vec![1u8; ids.len()]
            } else {
                let eos_text = tok.special_tokens().eos.as_ref().map(|e| e.content.as_str());
                let spans = assistant_spans(t, &full, msgs, opts.chat_loss == ChatLoss::LastAssistant, eos_text)
                    .map_err(|e| tk(e.into()))?;
                offsets
                    .iter()
                    .map(|&(s, e)| u8::from(e > s && spans.iter().any(|&(a, b)| s >= a && s < b)))
                    .collect()
            };
            TokenizedExample { row, input_ids: ids, loss_mask: mask }
        }
        Example::Instruction { prompt, response } => {
            let mut ids = tok.encode(prompt, true).map_err(tk)?;
            let mut mask = vec![0u8; ids.len()];
            let resp = tok.encode(response, false).map_err(tk)?;
            mask.extend(std::iter::repeat_n(1u8, resp.len()));
            ids.extend(resp);
            if let Some(e) = eos {
                ids.push(e);
                mask.push(1);
            }
            TokenizedExample { row, input_ids: ids, loss_mask: mask }
        }
        Example::Text(text) => {
            let mut ids = tok.encode(text, true).map_err(tk)?;
            let mut mask = vec![1u8; ids.len()];
            if let (Some(b), Some(first)) = (tok.bos_id(), ids.first())
                && *first == b
            {
                mask[0] = 0;
            }
            if let Some(e) = eos {
                ids.push(e);
                mask.push(1);
            }
            TokenizedExample { row, input_ids: ids, loss_mask: mask }
        }
    }))
}

impl Dataset {
    /// Formats every valid row for its task and tokenizes it with a loss mask.
    /// Invalid rows are left out and counted (use [`Dataset::validate_strict`]
    /// first to refuse them instead). Runs on all CPU cores.
    pub fn tokenize(&self, tok: &Tokenizer, opts: &PrepareOptions) -> Result<Tokenized, DataError> {
        let (examples, report) = self.examples()?;
        self.tokenize_examples(&examples, &report, tok, opts)
    }

    /// Tokenizes examples already extracted and validated by `examples()`.
    pub(crate) fn tokenize_examples(
        &self,
        examples: &[Option<Example>],
        report: &super::ValidationReport,
        tok: &Tokenizer,
        opts: &PrepareOptions,
    ) -> Result<Tokenized, DataError> {
        let Some(task) = report.task else {
            return Err(DataError::Invalid(Box::new(report.clone())));
        };
        if task == Task::Chat && tok.chat_template().is_none() {
            return Err(tk(TokenizeError::NoChatTemplate { source_path: tok.source().to_string() }));
        }
        let template = tok.chat_template();
        let mut out = Vec::with_capacity(examples.len());
        let mut problems = vec![];
        // chunks keep the work interruptible from a notebook
        for (c, chunk) in examples.chunks(CHUNK).enumerate() {
            crate::interrupt::check()?;
            let outcomes: Vec<Result<Outcome, DataError>> = chunk
                .par_iter()
                .enumerate()
                .filter_map(|(i, ex)| ex.as_ref().map(|ex| (c * CHUNK + i, ex)))
                .map(|(row, ex)| tokenize_one(tok, template, row, ex, opts))
                .collect();
            for o in outcomes {
                match o? {
                    Outcome::Ok(e) => out.push(e),
                    Outcome::Rejected(p) => problems.push(p),
                }
            }
        }
        let pad_id = tok.pad_id().or(tok.eos_id()).unwrap_or(0);
        Ok(Tokenized {
            source: self.source.clone(),
            task,
            examples: out,
            invalid_rows: report.invalid_rows(),
            problems,
            pad_id,
        })
    }

    /// Token statistics against a model's tokenizer: tokens per example
    /// (p50/p95/max), totals, examples longer than `context_length` (default:
    /// the model's own) and what truncation would drop, and the product's
    /// guidance as warnings.
    pub fn stats(&self, tok: &Tokenizer, context_length: Option<usize>) -> Result<Stats, DataError> {
        let ctx = context_length.or(tok.model_max_length()).ok_or_else(|| {
            DataError::Option("the tokenizer does not state a context length: pass one (e.g. Some(2048))".into())
        })?;
        if ctx == 0 {
            return Err(DataError::Option("context_length must be at least 1".into()));
        }
        let t = self.tokenize(tok, &PrepareOptions::default())?;
        Ok(Stats::from_tokenized(&t, ctx))
    }
}

/// An example longer than the context length, and what truncation drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverLength {
    /// Row of the dataset.
    pub row: usize,
    /// Its tokens.
    pub tokens: usize,
    /// Tokens cut off by truncation to the context length.
    pub dropped_tokens: usize,
    /// Of those, tokens that counted in the loss.
    pub dropped_trainable: usize,
}

/// Token statistics of a dataset for one model.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Where the data came from.
    pub source: String,
    /// Task.
    pub task: Task,
    /// Valid examples counted.
    pub examples: usize,
    /// Rows left out as invalid (including conversations the template refused).
    pub invalid_rows: usize,
    /// All tokens.
    pub total_tokens: usize,
    /// Tokens counting in the loss.
    pub trainable_tokens: usize,
    /// Median tokens per example.
    pub p50: usize,
    /// 95th percentile tokens per example.
    pub p95: usize,
    /// Longest example.
    pub max: usize,
    /// Mean tokens per example.
    pub mean: f64,
    /// The context length checked against.
    pub context_length: usize,
    /// Examples over the context length.
    pub over_length: Vec<OverLength>,
    /// The product's guidance, where the data falls short.
    pub warnings: Vec<String>,
    /// Tokens of every example (for the histogram).
    pub lengths: Vec<usize>,
}

/// Continued pretraining guidance: at least this many tokens.
pub const MIN_PRETRAIN_TOKENS: usize = 1_500_000;

fn percentile(sorted: &[usize], p: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl Stats {
    /// Statistics of already tokenized data.
    pub fn from_tokenized(t: &Tokenized, context_length: usize) -> Stats {
        let lengths: Vec<usize> = t.examples.iter().map(|e| e.len()).collect();
        let mut sorted = lengths.clone();
        sorted.sort_unstable();
        let total: usize = lengths.iter().sum();
        let trainable: usize = t.examples.iter().map(|e| e.trainable()).sum();
        let over_length: Vec<OverLength> = t
            .examples
            .iter()
            .filter(|e| e.len() > context_length)
            .map(|e| OverLength {
                row: e.row,
                tokens: e.len(),
                dropped_tokens: e.len() - context_length,
                dropped_trainable: e.loss_mask[context_length..].iter().filter(|&&m| m != 0).count(),
            })
            .collect();
        let mut warnings = vec![];
        let invalid = t.invalid_rows + t.problems.len();
        if invalid > 0 {
            warnings.push(format!("{invalid} invalid rows are left out: run validate() to see why"));
        }
        match t.task {
            Task::Chat | Task::Instruction if total < context_length => warnings.push(format!(
                "only {total} tokens: fine-tuning wants at least one full context length ({context_length} tokens) of data; add examples"
            )),
            Task::Text if total < MIN_PRETRAIN_TOKENS => warnings.push(format!(
                "only {total} tokens: continued pretraining wants at least {MIN_PRETRAIN_TOKENS} tokens to have an effect; add text"
            )),
            _ => {}
        }
        if !over_length.is_empty() {
            let dropped: usize = over_length.iter().map(|o| o.dropped_tokens).sum();
            let dropped_train: usize = over_length.iter().map(|o| o.dropped_trainable).sum();
            warnings.push(format!(
                "{} examples exceed the context length {context_length}: truncation drops {dropped} tokens, {dropped_train} of them trained on; shorten them or raise context_length",
                over_length.len()
            ));
            let emptied = t
                .examples
                .iter()
                .filter(|e| e.len() > context_length && e.trainable() > 0 && e.loss_mask[..context_length].iter().all(|&m| m == 0))
                .count();
            if emptied > 0 {
                warnings.push(format!(
                    "{emptied} examples lose every trained token to truncation (the answer comes after {context_length} tokens of prompt)"
                ));
            }
        }
        if !t.examples.is_empty() && trainable == 0 {
            warnings.push("no token counts in the loss: check the chat template and the loss setting".into());
        }
        Stats {
            source: t.source.clone(),
            task: t.task,
            examples: t.examples.len(),
            invalid_rows: invalid,
            total_tokens: total,
            trainable_tokens: trainable,
            p50: percentile(&sorted, 0.5),
            p95: percentile(&sorted, 0.95),
            max: sorted.last().copied().unwrap_or(0),
            mean: if lengths.is_empty() { 0.0 } else { total as f64 / lengths.len() as f64 },
            context_length,
            over_length,
            warnings,
            lengths,
        }
    }
}
