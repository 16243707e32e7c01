//! Generation with a KV cache: greedy, temperature, top-k, top-p, repetition penalty; stops on
//! EOS ids and stop strings; streams tokens (an iterator at the id level, a callback at the
//! text level).

use super::io::{ModelSource, resolve_model};
use super::llama::{KvCache, LlamaModel};
use crate::tokenize::{Message, Tokenizer};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Sampling and stopping settings. The default is greedy, 256 new tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// Most tokens to produce.
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p`.
    pub top_p: Option<f64>,
    /// > 1 discourages tokens already in the context (Hugging Face's rule).
    pub repetition_penalty: f32,
    /// Seed of the sampler.
    pub seed: u64,
    /// Extra ids that end generation (the model's EOS ids always do).
    pub eos_token_ids: Vec<u32>,
    /// Generation stops when the text contains one of these; the text is cut before it.
    pub stop_strings: Vec<String>,
    /// Keep going past EOS ids (for benchmarks and tests).
    pub ignore_eos: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 42,
            eos_token_ids: vec![],
            stop_strings: vec![],
            ignore_eos: false,
        }
    }
}

impl GenerationConfig {
    /// Greedy decoding of up to `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { max_new_tokens, ..Self::default() }
    }

    /// Sampling at `temperature` with a seed.
    pub fn sampled(max_new_tokens: usize, temperature: f64, seed: u64) -> Self {
        Self { max_new_tokens, temperature, seed, ..Self::default() }
    }

    fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("temperature must be ≥ 0, got {}", self.temperature);
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                bail!("top_p must be in (0, 1], got {p}");
            }
        }
        if self.top_k == Some(0) {
            bail!("top_k must be at least 1");
        }
        if !(self.repetition_penalty > 0.0) {
            bail!("repetition_penalty must be > 0, got {}", self.repetition_penalty);
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS / end-of-turn id was produced.
    Eos,
    /// `max_new_tokens` reached.
    Length,
    /// A stop string appeared, or the caller stopped the stream.
    Stop,
}

/// Picks the next token from logits.
#[derive(Debug)]
pub struct Sampler {
    config: GenerationConfig,
    rng: StdRng,
}

impl Sampler {
    /// A sampler for `config`.
    pub fn new(config: GenerationConfig) -> Result<Self> {
        config.validate()?;
        let rng = StdRng::seed_from_u64(config.seed);
        Ok(Self { config, rng })
    }

    /// Chooses a token from `logits` (one row, vocabulary-sized) given the `context` so far.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        let mut l = logits.to_vec();
        let rp = self.config.repetition_penalty;
        if rp != 1.0 {
            let mut seen = context.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(v) = l.get_mut(t as usize) {
                    *v = if *v < 0.0 { *v * rp } else { *v / rp };
                }
            }
        }
        if self.config.temperature == 0.0 {
            return argmax(&l);
        }
        let t = self.config.temperature as f32;
        let mut idx: Vec<u32> = (0..l.len() as u32).collect();
        idx.sort_unstable_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]));
        if let Some(k) = self.config.top_k {
            idx.truncate(k.max(1));
        }
        let max = l[idx[0] as usize] / t;
        let mut probs: Vec<f32> = idx.iter().map(|&i| (l[i as usize] / t - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if let Some(top_p) = self.config.top_p {
            let mut acc = 0f32;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= top_p as f32 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let mut r: f32 = self.rng.random();
        for (i, p) in probs.iter().enumerate() {
            if r < *p {
                return idx[i];
            }
            r -= p;
        }
        *idx.last().unwrap()
    }
}

fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in l.iter().enumerate() {
        if *v > l[best] {
            best = i;
        }
    }
    best as u32
}

/// Generated token ids, one at a time, with a KV cache. Ends on EOS (not yielded) or after
/// `max_new_tokens`; see [`finish_reason`](Self::finish_reason).
pub struct TokenStream<'a> {
    model: &'a LlamaModel,
    cache: KvCache,
    sampler: Sampler,
    context: Vec<u32>,
    next_input: Option<Vec<u32>>,
    produced: usize,
    eos: Vec<u32>,
    finish: Option<FinishReason>,
}

impl<'a> TokenStream<'a> {
    /// The tokens so far: prompt then generated ids.
    pub fn context(&self) -> &[u32] {
        &self.context
    }

    /// Why the stream ended (`None` while it runs).
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    fn step(&mut self) -> Result<Option<u32>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        if self.produced >= self.sampler.config.max_new_tokens {
            self.finish = Some(FinishReason::Length);
            return Ok(None);
        }
        let input = self.next_input.take().unwrap_or_default();
        let ids = Tensor::from_vec(input.clone(), (1, input.len()), self.model.device())?;
        let (model, cache) = (self.model, &mut self.cache);
        // Run the step on a worker of the CPU thread pool: the kernels' parallel loops then
        // start without waking a thread for every matrix.
        let logits = rayon::scope(|_| model.forward_cached(&ids, cache))?;
        let logits = logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let tok = self.sampler.sample(&logits, &self.context);
        self.produced += 1;
        if self.eos.contains(&tok) {
            self.finish = Some(FinishReason::Eos);
            return Ok(None);
        }
        self.context.push(tok);
        self.next_input = Some(vec![tok]);
        Ok(Some(tok))
    }
}

impl Iterator for TokenStream<'_> {
    type Item = Result<u32>;
    fn next(&mut self) -> Option<Result<u32>> {
        match self.step() {
            Ok(Some(t)) => Some(Ok(t)),
            Ok(None) => None,
            Err(e) => {
                self.finish = Some(FinishReason::Stop);
                Some(Err(e))
            }
        }
    }
}

impl LlamaModel {
    /// Streams new token ids after `prompt` (not empty). EOS ids: the config's plus `config.eos_token_ids`.
    pub fn stream_ids(&self, prompt: &[u32], config: &GenerationConfig) -> Result<TokenStream<'_>> {
        if prompt.is_empty() {
            bail!("generate: the prompt has no tokens");
        }
        let mut eos = self.config.eos_token_ids.clone();
        eos.extend(&config.eos_token_ids);
        if config.ignore_eos {
            eos.clear();
        }
        Ok(TokenStream {
            model: self,
            cache: KvCache::new(),
            sampler: Sampler::new(config.clone())?,
            context: prompt.to_vec(),
            next_input: Some(prompt.to_vec()),
            produced: 0,
            eos,
            finish: None,
        })
    }

    /// Generates token ids after `prompt`; returns them (EOS excluded) and why it stopped.
    pub fn generate_ids(&self, prompt: &[u32], config: &GenerationConfig) -> Result<(Vec<u32>, FinishReason)> {
        let mut s = self.stream_ids(prompt, config)?;
        let mut out = Vec::new();
        for t in s.by_ref() {
            out.push(t?);
        }
        Ok((out, s.finish_reason().unwrap_or(FinishReason::Length)))
    }
}

/// The result of a text-level generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The generated text (special tokens skipped; cut before a stop string).
    pub text: String,
    /// The generated ids (EOS excluded).
    pub ids: Vec<u32>,
    /// The prompt's ids.
    pub prompt_ids: Vec<u32>,
    pub finish_reason: FinishReason,
}

/// A model with its tokenizer: what a notebook loads to generate and chat.
#[derive(Clone)]
pub struct Model {
    pub llama: LlamaModel,
    /// The tokenizer and chat template: the same [`Tokenizer`] training uses, so a
    /// prompt is rendered and encoded exactly as the training data was.
    pub tokenizer: Option<Tokenizer>,
    /// Where it was loaded from.
    pub source: Option<ModelSource>,
    /// Default generation settings (greedy, 256 tokens).
    pub generation: GenerationConfig,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("model_type", &self.llama.config.model_type)
            .field("layers", &self.llama.config.num_hidden_layers)
            .field("parameters", &self.llama.num_parameters())
            .field("source", &self.source)
            .finish()
    }
}

/// The device tunebook computes on: the first CUDA GPU when built with `cuda` and one is
/// present, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}

impl Model {
    /// Loads a model (local directory, `.gguf`, or Hugging Face id in the local cache) with its
    /// tokenizer, on [`default_device`] in f32.
    pub fn load(spec: &str) -> Result<Self> {
        Self::load_on(spec, &default_device(), DType::F32)
    }

    /// Loads on a chosen device and dtype.
    pub fn load_on(spec: &str, device: &Device, dtype: DType) -> Result<Self> {
        let dir = std::path::Path::new(spec);
        if super::lora::is_adapter_dir(dir) {
            return Self::load_adapter(dir, device, dtype);
        }
        let source = resolve_model(spec)?;
        let (llama, tokenizer) = match &source {
            ModelSource::HfDir(d) => {
                let m = LlamaModel::from_hf_dir(d, device, dtype)?;
                let t = if d.join("tokenizer.json").is_file() { Some(Tokenizer::load(d)?) } else { None };
                (m, t)
            }
            ModelSource::Gguf(p) => (LlamaModel::from_gguf(p, device, dtype)?, Some(Tokenizer::from_gguf(p)?)),
        };
        Ok(Self { llama, tokenizer, source: Some(source), generation: GenerationConfig::default() })
    }

    /// Loads a PEFT LoRA adapter directory: its base model (`base_model_name_or_path`
    /// in `adapter_config.json`), the adapter merged into it for fast generation, and
    /// the adapter directory's own tokenizer files when present.
    pub fn load_adapter(dir: &std::path::Path, device: &Device, dtype: DType) -> Result<Self> {
        let mut m = Self::load_adapter_unmerged(dir, device, dtype)?;
        m.llama.merge_lora()?;
        Ok(m)
    }

    /// [`load_adapter`](Self::load_adapter) with the adapters kept apart from the base
    /// weights (for an export that writes them, or merges one tensor at a time).
    pub fn load_adapter_unmerged(dir: &std::path::Path, device: &Device, dtype: DType) -> Result<Self> {
        let base = super::lora::adapter_base_model(dir)?;
        let mut m = Self::load_on(&base, device, dtype)
            .with_context(|| format!("loading the base model {base:?} of the adapter in {}", dir.display()))?;
        m.llama.load_lora(dir)?;
        if dir.join("tokenizer.json").is_file() {
            m.tokenizer = Some(Tokenizer::load(dir)?);
        }
        Ok(m)
    }

    /// Wraps a model and an optional tokenizer.
    pub fn new(llama: LlamaModel, tokenizer: Option<Tokenizer>) -> Self {
        Self { llama, tokenizer, source: None, generation: GenerationConfig::default() }
    }

    /// Saves the model in Hugging Face layout: weights and `config.json` (see
    /// [`LlamaModel::save_pretrained`]), the tokenizer files, and `generation_config.json`
    /// with the EOS ids. transformers, vLLM and [`Model::load`] read the result.
    pub fn save_pretrained(&self, dir: impl AsRef<std::path::Path>) -> Result<()> {
        let dir = dir.as_ref();
        if self.llama.has_lora() {
            bail!("the model carries LoRA adapters: merge them (llama.merge_lora()) or save them with llama.save_lora()");
        }
        self.llama.save_pretrained(dir)?;
        if let Some(t) = &self.tokenizer {
            t.save_hf_files(dir)?;
        }
        if !dir.join("generation_config.json").is_file() {
            let mut eos = self.llama.config.eos_token_ids.clone();
            if let Some(t) = &self.tokenizer {
                eos.extend(t.stop_ids());
            }
            eos.sort_unstable();
            eos.dedup();
            let g = serde_json::json!({"bos_token_id": self.llama.config.bos_token_id, "eos_token_id": eos, "do_sample": false});
            crate::files::write_atomic(&dir.join("generation_config.json"), serde_json::to_string_pretty(&g)?.as_bytes())?;
        }
        Ok(())
    }

    fn tok(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .context("this model has no tokenizer (no tokenizer.json in its directory): use generate_ids with token ids")
    }

    /// Continues `prompt` greedily with the default settings and returns the new text.
    pub fn generate(&self, prompt: &str) -> Result<String> {
        Ok(self.generate_with(prompt, &self.generation, |_| {})?.text)
    }

    /// Replies to `messages` through the chat template, with the default settings.
    pub fn chat(&self, messages: &[Message]) -> Result<String> {
        Ok(self.chat_with(messages, &self.generation, |_| {})?.text)
    }

    /// Renders `messages` with the chat template and generation prompt (the same
    /// rendering and encoding training used, [`Tokenizer::encode_chat`]), then generates.
    pub fn chat_with(&self, messages: &[Message], config: &GenerationConfig, on_text: impl FnMut(&str)) -> Result<Generation> {
        let prompt_ids = self.tok()?.encode_chat(messages, true)?;
        self.generate_ids_with(prompt_ids, config, on_text)
    }

    /// Generates after `prompt` (tokenised without adding special tokens: chat templates
    /// already contain them), calling `on_text` with each new piece of text as it is decoded.
    pub fn generate_with(&self, prompt: &str, config: &GenerationConfig, on_text: impl FnMut(&str)) -> Result<Generation> {
        let prompt_ids = self.tok()?.encode(prompt, false)?;
        self.generate_ids_with(prompt_ids, config, on_text)
    }

    /// Generates after `prompt_ids`, streaming text to `on_text`. Text is decoded
    /// incrementally ([`crate::tokenize::DecodeStream`]: each token's text once, an
    /// incomplete UTF-8 character held back); nothing of a stop string is ever passed
    /// to `on_text`, even when it spans tokens, and the text ends before it.
    pub fn generate_ids_with(&self, prompt_ids: Vec<u32>, config: &GenerationConfig, mut on_text: impl FnMut(&str)) -> Result<Generation> {
        let tok = self.tok()?;
        let mut cfg = config.clone();
        cfg.eos_token_ids.extend_from_slice(tok.stop_ids());
        let mut stream = self.llama.stream_ids(&prompt_ids, &cfg)?;
        let mut text = TextStream::new(tok, &config.stop_strings);
        let mut ids = Vec::new();
        while let Some(t) = stream.next() {
            let id = t?;
            ids.push(id);
            crate::interrupt::check().map_err(|e| anyhow::anyhow!("{e}"))?;
            let piece = text.push(id)?;
            if !piece.is_empty() {
                on_text(&piece);
            }
            if text.stopped() {
                break;
            }
        }
        let rest = text.finish();
        if !rest.is_empty() {
            on_text(&rest);
        }
        let finish_reason = if text.stopped() { FinishReason::Stop } else { stream.finish_reason().unwrap_or(FinishReason::Length) };
        Ok(Generation { text: text.into_text(), ids, prompt_ids, finish_reason })
    }
}

/// The text of a generation as its tokens arrive: each token decoded once
/// ([`crate::tokenize::DecodeStream`], an incomplete UTF-8 character held back), cut before
/// the first stop string, and released only when no stop string could still begin in it,
/// so nothing of a stop string is ever shown, even when it spans tokens. `Model::generate`
/// and the serving engine both use it.
pub struct TextStream {
    decoder: crate::tokenize::DecodeStream,
    stops: Vec<String>,
    longest: usize,
    text: String,
    emitted: usize,
    stopped: bool,
}

impl TextStream {
    /// A stream decoding with `tokenizer` (special tokens skipped) that stops at `stop_strings`.
    pub fn new(tokenizer: &Tokenizer, stop_strings: &[String]) -> Self {
        let stops: Vec<String> = stop_strings.iter().filter(|s| !s.is_empty()).cloned().collect();
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        Self { decoder: tokenizer.decode_stream(true), stops, longest, text: String::new(), emitted: 0, stopped: false }
    }

    /// Feeds the next token id; returns the text that became safe to show (often empty).
    /// After a stop string appears, [`stopped`](Self::stopped) is true and the text ends before it.
    pub fn push(&mut self, id: u32) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        let Some(piece) = self.decoder.step(id)? else { return Ok(String::new()) };
        // A stop string can only end inside the new piece: search from where the longest
        // one could have started.
        let mut from = self.text.len().saturating_sub(self.longest.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.text.push_str(&piece);
        let text = &self.text;
        if let Some(cut) = self.stops.iter().filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i)).min() {
            self.text.truncate(cut);
            self.stopped = true;
        }
        // Hold back any suffix that could begin a stop string.
        let mut safe = self.text.len();
        if !self.stopped {
            for s in &self.stops {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && self.text.ends_with(&s[..k]) {
                        safe = safe.min(self.text.len() - k);
                        break;
                    }
                }
            }
        }
        if safe > self.emitted && self.text.is_char_boundary(safe) {
            let out = self.text[self.emitted..safe].to_string();
            self.emitted = safe;
            return Ok(out);
        }
        Ok(String::new())
    }

    /// Whether a stop string ended the text.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The text so far (cut before a stop string), shown or not.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Bytes of the text already returned by [`push`](Self::push) / [`finish`](Self::finish).
    pub fn emitted_len(&self) -> usize {
        self.emitted
    }

    /// At the end of generation: the text held back (a prefix of a stop string that never completed).
    pub fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    /// The whole text.
    pub fn into_text(self) -> String {
        self.text
    }
}

/// Settings of `tunebook generate`.
#[derive(Clone, Debug)]
pub struct GenerateArgs {
    /// Local directory, `.gguf` file, or Hugging Face id in the local cache.
    pub model: String,
    /// Plain-text prompt (continued as is).
    pub prompt: Option<String>,
    /// A user message sent through the chat template.
    pub chat: Option<String>,
    pub max_tokens: usize,
    pub temperature: f64,
    pub seed: u64,
    /// Generate exactly `max_tokens` (benchmarks).
    pub ignore_eos: bool,
}

/// Runs `tunebook generate`: streams the reply to stdout, then a one-line summary to stderr.
pub fn run_generate_cli(args: &GenerateArgs) -> Result<()> {
    use std::io::Write;
    let t0 = std::time::Instant::now();
    let model = Model::load(&args.model)?;
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = GenerationConfig {
        max_new_tokens: args.max_tokens,
        temperature: args.temperature,
        seed: args.seed,
        ignore_eos: args.ignore_eos,
        ..Default::default()
    };
    let mut out = std::io::stdout();
    let t1 = std::time::Instant::now();
    let print = |s: &str| {
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
    };
    let g = match (&args.prompt, &args.chat) {
        (Some(p), None) => model.generate_with(p, &cfg, print)?,
        (None, Some(c)) => model.chat_with(&[Message::user(c.clone())], &cfg, print)?,
        _ => bail!("give exactly one of --prompt TEXT or --chat TEXT"),
    };
    println!();
    let gen_s = t1.elapsed().as_secs_f64();
    eprintln!(
        "[{} prompt tokens, {} generated in {:.2}s ({:.1} tok/s), load {:.2}s, stop: {:?}]",
        g.prompt_ids.len(),
        g.ids.len(),
        gen_s,
        g.ids.len() as f64 / gen_s.max(1e-9),
        load_s,
        g.finish_reason
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_greedy_penalty_topk_topp() -> Result<()> {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let mut greedy = Sampler::new(GenerationConfig::greedy(1))?;
        assert_eq!(greedy.sample(&logits, &[]), 1);
        // Penalty 4 on token 1: 3/4 = 0.75 < 2 → token 2 wins.
        let mut pen = Sampler::new(GenerationConfig { repetition_penalty: 4.0, ..GenerationConfig::greedy(1) })?;
        assert_eq!(pen.sample(&logits, &[1]), 2);
        // Negative logits are multiplied: token 3 at −1·4 stays last.
        let mut topk = Sampler::new(GenerationConfig { top_k: Some(2), ..GenerationConfig::sampled(1, 1.0, 7) })?;
        for _ in 0..200 {
            let t = topk.sample(&logits, &[]);
            assert!(t == 1 || t == 2, "top-k 2 sampled {t}");
        }
        // top_p small keeps only the argmax.
        let mut topp = Sampler::new(GenerationConfig { top_p: Some(0.1), ..GenerationConfig::sampled(1, 1.0, 7) })?;
        for _ in 0..50 {
            assert_eq!(topp.sample(&logits, &[]), 1);
        }
        // Temperature sampling follows the softmax roughly.
        let mut s = Sampler::new(GenerationConfig::sampled(1, 1.0, 3))?;
        let n = 4000;
        let ones = (0..n).filter(|_| s.sample(&logits, &[]) == 1).count() as f64 / n as f64;
        let e: Vec<f64> = logits.iter().map(|&x| (x as f64).exp()).collect();
        let want = e[1] / e.iter().sum::<f64>();
        assert!((ones - want).abs() < 0.03, "{ones} vs {want}");
        assert!(Sampler::new(GenerationConfig { top_p: Some(1.5), ..Default::default() }).is_err());
        Ok(())
    }
}
