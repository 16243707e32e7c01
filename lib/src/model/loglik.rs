//! Log-likelihoods of continuations: what multiple-choice scoring and perplexity on
//! reference answers need. The shared context runs once; its continuations then run
//! together as one batch, each from a copy of the context's keys and values.

use super::batch::AdapterWeights;
use super::llama::{KvCache, LlamaModel};
use anyhow::{Result, bail};
use candle_core::{DType, Tensor};

/// One continuation's log-likelihood given its context.
#[derive(Clone, Debug, PartialEq)]
pub struct ContinuationScore {
    /// Sum of the natural-log probabilities of its tokens.
    pub logprob: f64,
    /// Its number of tokens.
    pub tokens: usize,
    /// Tokens that were the model's most likely next token.
    pub greedy_hits: usize,
}

impl ContinuationScore {
    /// Whether greedy decoding would have produced exactly this continuation.
    pub fn is_greedy(&self) -> bool {
        self.greedy_hits == self.tokens
    }
}

/// The natural-log probability of `target` under the logits `row`, and whether it is the argmax
/// (the first maximum, as `argmax` picks).
pub fn token_logprob(row: &[f32], target: u32) -> (f64, bool) {
    let (mut best, mut arg) = (f32::NEG_INFINITY, 0usize);
    for (i, &x) in row.iter().enumerate() {
        if x > best {
            best = x;
            arg = i;
        }
    }
    let lse = best as f64 + row.iter().map(|&x| ((x - best) as f64).exp()).sum::<f64>().ln();
    (row[target as usize] as f64 - lse, arg == target as usize)
}

impl LlamaModel {
    /// Scores every continuation after `context` (token ids; `context` must not be empty):
    /// the context runs once, the continuations as one right-padded batch after copies of
    /// its cache. `adapter` applies a LoRA adapter unmerged.
    pub fn score_continuations(&self, context: &[u32], continuations: &[Vec<u32>], adapter: Option<&AdapterWeights>) -> Result<Vec<ContinuationScore>> {
        if context.is_empty() {
            bail!("score_continuations: the context is empty (it needs at least a BOS or template token)");
        }
        let v = self.config.vocab_size;
        for c in continuations {
            if let Some(&t) = c.iter().find(|&&t| t as usize >= v) {
                bail!("score_continuations: token id {t} is outside the vocabulary (size {v})");
            }
        }
        let mut cache = KvCache::new();
        let ids = Tensor::from_vec(context.to_vec(), (1, context.len()), self.device())?;
        let first = self.forward_cached_with(&ids, &mut cache, adapter)?.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut out: Vec<ContinuationScore> = continuations
            .iter()
            .map(|c| match c.first() {
                Some(&t) => {
                    let (lp, g) = token_logprob(&first, t);
                    ContinuationScore { logprob: lp, tokens: c.len(), greedy_hits: g as usize }
                }
                None => ContinuationScore { logprob: 0.0, tokens: 0, greedy_hits: 0 },
            })
            .collect();
        let long: Vec<usize> = (0..continuations.len()).filter(|&i| continuations[i].len() > 1).collect();
        if long.is_empty() {
            return Ok(out);
        }
        // Each long continuation feeds all but its last token; position j predicts token j+1.
        let t = long.iter().map(|&i| continuations[i].len() - 1).max().unwrap_or(0);
        let mut flat = Vec::with_capacity(long.len() * t);
        for &i in &long {
            let c = &continuations[i];
            flat.extend_from_slice(&c[..c.len() - 1]);
            flat.extend(std::iter::repeat_n(0u32, t - (c.len() - 1)));
        }
        let ids = Tensor::from_vec(flat, (long.len(), t), self.device())?;
        let mut batch_cache = LlamaModel::repeat_cache(&cache, long.len())?;
        let logits = self.forward_cached_all_with(&ids, &mut batch_cache, adapter)?;
        for (b, &i) in long.iter().enumerate() {
            let rows = logits.get(b)?.to_vec2::<f32>()?;
            let c = &continuations[i];
            for j in 1..c.len() {
                let (lp, g) = token_logprob(&rows[j - 1], c[j]);
                out[i].logprob += lp;
                out[i].greedy_hits += g as usize;
            }
        }
        Ok(out)
    }
}
