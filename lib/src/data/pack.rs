//! Packing tokenized examples into fixed-length windows.
//!
//! The contract with the model engine: in a [`Window`], token `i` may attend
//! to token `j` only when `j <= i` and `segment_ids[i] == segment_ids[j] != 0`
//! ([`Window::can_attend`]); `positions` restart at 0 for every example, so
//! rotary embeddings see each example as if it were alone. Padding has segment
//! 0, position 0 and no loss.

use super::prepare::TokenizedExample;
use super::permutation;

/// How examples become windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackOptions {
    /// Tokens per window.
    pub context_length: usize,
    /// Pack several examples per window (default); `false` puts one example per
    /// window and pads the rest.
    pub packing: bool,
    /// Shuffle examples with this seed before packing (deterministic).
    pub seed: Option<u64>,
    /// Drop examples longer than the window instead of truncating them.
    pub drop_overlong: bool,
}

impl PackOptions {
    /// Packing into windows of `context_length` tokens, in dataset order.
    pub fn new(context_length: usize) -> Self {
        PackOptions { context_length: context_length.max(1), packing: true, seed: None, drop_overlong: false }
    }
    /// `false`: one example per window, padded.
    pub fn packing(mut self, on: bool) -> Self {
        self.packing = on;
        self
    }
    /// Shuffles examples by `seed` first.
    pub fn shuffle(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }
    /// Drops over-long examples instead of truncating them.
    pub fn drop_overlong(mut self, on: bool) -> Self {
        self.drop_overlong = on;
        self
    }
}

/// One training window of exactly `context_length` tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Token ids (padding at the end).
    pub input_ids: Vec<u32>,
    /// 1 where the token is a training target.
    pub loss_mask: Vec<u8>,
    /// Which example each token belongs to: 1, 2, ... within the window; 0 is padding.
    pub segment_ids: Vec<u32>,
    /// Position of each token inside its own example (0-based); 0 for padding.
    pub positions: Vec<u32>,
    /// Dataset rows packed here, in segment order.
    pub rows: Vec<usize>,
}

/// Label value for tokens that are not predicted (as in PyTorch's cross-entropy).
pub const IGNORE_INDEX: i64 = -100;

impl Window {
    fn empty(capacity: usize) -> Self {
        Window {
            input_ids: Vec::with_capacity(capacity),
            loss_mask: Vec::with_capacity(capacity),
            segment_ids: Vec::with_capacity(capacity),
            positions: Vec::with_capacity(capacity),
            rows: vec![],
        }
    }

    /// Tokens in the window (the context length).
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the window holds no token.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Tokens that belong to an example (not padding).
    pub fn real_tokens(&self) -> usize {
        self.segment_ids.iter().filter(|&&s| s != 0).count()
    }

    /// May token `query` attend to token `key`? Only earlier-or-same tokens of the same example.
    pub fn can_attend(&self, query: usize, key: usize) -> bool {
        key <= query
            && query < self.len()
            && self.segment_ids[query] != 0
            && self.segment_ids[query] == self.segment_ids[key]
    }

    /// Next-token labels: `labels[t]` is the token predicted at position `t`
    /// (`input_ids[t + 1]`) when that token is a target of the same example,
    /// else [`IGNORE_INDEX`]. No label crosses from one example into the next.
    pub fn labels(&self) -> Vec<i64> {
        let n = self.len();
        (0..n)
            .map(|t| {
                if t + 1 < n
                    && self.segment_ids[t] != 0
                    && self.segment_ids[t + 1] == self.segment_ids[t]
                    && self.loss_mask[t + 1] != 0
                {
                    i64::from(self.input_ids[t + 1])
                } else {
                    IGNORE_INDEX
                }
            })
            .collect()
    }

    fn push(&mut self, ex_ids: &[u32], ex_mask: &[u8], row: usize) {
        let seg = self.rows.len() as u32 + 1;
        self.input_ids.extend_from_slice(ex_ids);
        self.loss_mask.extend_from_slice(ex_mask);
        self.segment_ids.extend(std::iter::repeat_n(seg, ex_ids.len()));
        self.positions.extend(0..ex_ids.len() as u32);
        self.rows.push(row);
    }

    fn pad_to(&mut self, n: usize, pad_id: u32) {
        let missing = n.saturating_sub(self.len());
        self.input_ids.extend(std::iter::repeat_n(pad_id, missing));
        self.loss_mask.extend(std::iter::repeat_n(0, missing));
        self.segment_ids.extend(std::iter::repeat_n(0, missing));
        self.positions.extend(std::iter::repeat_n(0, missing));
    }
}

/// Packed (or padded) windows and how well they are filled.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// The windows, each exactly `context_length` long.
    pub windows: Vec<Window>,
    /// Tokens per window.
    pub context_length: usize,
    /// Whether several examples share a window.
    pub packing: bool,
    /// Examples placed.
    pub examples: usize,
    /// Examples cut to the context length.
    pub truncated: usize,
    /// Examples dropped for being too long (with `drop_overlong`).
    pub dropped: usize,
    /// Tokens that belong to examples.
    pub real_tokens: usize,
    /// Tokens that count in the loss.
    pub trainable_tokens: usize,
}

impl Packed {
    /// Share of window tokens that are real (not padding), 0..1.
    pub fn efficiency(&self) -> f64 {
        let total = self.windows.len() * self.context_length;
        if total == 0 { 0.0 } else { self.real_tokens as f64 / total as f64 }
    }
}

/// Windows still accepting examples; a small number keeps packing fast and
/// close to dataset order while filling gaps left by long examples.
const OPEN_WINDOWS: usize = 8;

pub(crate) fn pack(examples: &[TokenizedExample], opts: &PackOptions, pad_id: u32) -> Packed {
    let ctx = opts.context_length.max(1);
    let order: Vec<usize> = match opts.seed {
        Some(seed) => permutation(examples.len(), seed).into_iter().map(|i| i as usize).collect(),
        None => (0..examples.len()).collect(),
    };
    // windows carry their creation number so the output keeps dataset order
    let mut done: Vec<(usize, Window)> = vec![];
    let mut open: Vec<(usize, Window)> = vec![];
    let mut created = 0usize;
    let (mut placed, mut truncated, mut dropped) = (0, 0, 0);
    for i in order {
        let ex = &examples[i];
        if ex.is_empty() {
            continue;
        }
        let n = if ex.len() > ctx {
            if opts.drop_overlong {
                dropped += 1;
                continue;
            }
            truncated += 1;
            ctx
        } else {
            ex.len()
        };
        let (ids, mask) = (&ex.input_ids[..n], &ex.loss_mask[..n]);
        placed += 1;
        if !opts.packing {
            let mut w = Window::empty(ctx);
            w.push(ids, mask, ex.row);
            done.push((created, w));
            created += 1;
            continue;
        }
        if let Some((_, w)) = open.iter_mut().find(|(_, w)| w.len() + n <= ctx) {
            w.push(ids, mask, ex.row);
        } else {
            if open.len() == OPEN_WINDOWS {
                done.push(open.remove(0));
            }
            let mut w = Window::empty(ctx);
            w.push(ids, mask, ex.row);
            open.push((created, w));
            created += 1;
        }
        // a full window leaves the open set at once
        if let Some(p) = open.iter().position(|(_, w)| w.len() == ctx) {
            done.push(open.remove(p));
        }
    }
    done.extend(open);
    done.sort_by_key(|(i, _)| *i);
    let mut done: Vec<Window> = done.into_iter().map(|(_, w)| w).collect();
    let mut real = 0;
    let mut trainable = 0;
    for w in &mut done {
        real += w.len();
        trainable += w.loss_mask.iter().filter(|&&m| m != 0).count();
        w.pad_to(ctx, pad_id);
    }
    Packed { windows: done, context_length: ctx, packing: opts.packing, examples: placed, truncated, dropped, real_tokens: real, trainable_tokens: trainable }
}
