//! Masked next-token cross-entropy.
//!
//! [`lm_head_cross_entropy`] fuses the LM head with the loss: only the rows that carry a
//! label are projected, and on the CPU the `[rows, vocab]` logits exist one chunk of rows
//! at a time (forward and backward), never all at once.

use super::gemm::{Threads, sgemm};
use super::{cpu_tensor, fusable, linear, slice_f32, tracked, with_f32};
use candle_core::{CpuStorage, CustomOp2, D, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Label value that marks a position without a loss (prompt tokens, padding), as in PyTorch.
pub const IGNORE_INDEX: i64 = -100;

/// Rows of logits materialised at once by the fused loss.
const CHUNK: usize = 128;

fn kept_rows(labels: &[i64], vocab: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, &l) in labels.iter().enumerate() {
        if l == IGNORE_INDEX {
            continue;
        }
        if l < 0 || l as usize >= vocab {
            candle_core::bail!("cross_entropy: label {l} at position {i} is outside the vocabulary 0..{vocab} (use {IGNORE_INDEX} to ignore a position)");
        }
        rows.push(i as u32);
        targets.push(l as u32);
    }
    Ok((rows, targets))
}

/// Mean cross-entropy of `logits` (`[N, V]`) against `labels` (`N` values, [`IGNORE_INDEX`]
/// to skip). Returns a scalar; 0 when every label is ignored. Differentiable in `logits`.
pub fn cross_entropy(logits: &Tensor, labels: &[i64]) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if labels.len() != n {
        candle_core::bail!("cross_entropy: {} labels for {n} rows of logits", labels.len());
    }
    let (rows, targets) = kept_rows(labels, v)?;
    if rows.is_empty() {
        return Tensor::zeros((), DType::F32, logits.device());
    }
    let dev = logits.device();
    let cnt = rows.len();
    let rows = Tensor::from_vec(rows, cnt, dev)?;
    let targets = Tensor::from_vec(targets, (cnt, 1), dev)?;
    let logits = logits.index_select(&rows, 0)?.to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    logp.gather(&targets, 1)?.sum_all()? * (-1.0 / cnt as f64)
}

/// Mean cross-entropy of `hidden · wᵀ` (hidden `[N, H]`, the LM head `w` `[V, H]`) against
/// `labels`, projecting only labelled rows. Differentiable in `hidden` and (when tracked) `w`.
pub fn lm_head_cross_entropy(hidden: &Tensor, w: &Tensor, labels: &[i64]) -> Result<Tensor> {
    let (n, h) = hidden.dims2()?;
    let (v, hw) = w.dims2()?;
    if hw != h {
        candle_core::bail!("lm_head_cross_entropy: hidden size {h} but LM head {:?}", w.dims());
    }
    if labels.len() != n {
        candle_core::bail!("lm_head_cross_entropy: {} labels for {n} rows", labels.len());
    }
    let (rows, targets) = kept_rows(labels, v)?;
    if rows.is_empty() {
        return Tensor::zeros((), DType::F32, hidden.device());
    }
    let cnt = rows.len();
    let sel = if cnt == n {
        hidden.clone()
    } else {
        hidden.index_select(&Tensor::from_vec(rows, cnt, hidden.device())?, 0)?
    };
    if fusable(&sel) && w.dtype() == DType::F32 {
        // Keep the probabilities for the backward pass when they fit the budget (saves one
        // LM-head GEMM); otherwise recompute them chunk by chunk.
        let keep = (tracked(&sel) || tracked(w)) && cnt * v * 4 <= KEEP_PROBS_BYTES;
        let op = FusedXent { targets: Arc::new(targets), saved: Mutex::new(None), keep };
        return sel.contiguous()?.apply_op2(&w.contiguous()?, op)?.reshape(());
    }
    let logits = linear(&sel, w)?;
    let all: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
    cross_entropy(&logits, &all)
}

/// Largest probability matrix kept between the forward and backward passes.
const KEEP_PROBS_BYTES: usize = 512 << 20;

struct FusedXent {
    targets: Arc<Vec<u32>>,
    /// Softmax probabilities `[n, V]` from the forward pass, when `keep`.
    saved: Mutex<Option<Vec<f32>>>,
    keep: bool,
}

impl FusedXent {
    /// Logits of rows `r0..r0+c` into `buf`, turned into probabilities in place; returns Σ losses.
    fn chunk_probs(&self, x: &[f32], w: &[f32], h: usize, v: usize, r0: usize, c: usize, buf: &mut [f32]) -> f64 {
        sgemm(false, true, c, v, h, 1.0, &x[r0 * h..], h, w, h, 0.0, buf, v, Threads::All);
        buf[..c * v]
            .par_chunks_mut(v)
            .enumerate()
            .map(|(i, row)| {
                let t = self.targets[r0 + i] as usize;
                let zt = row[t];
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &z| m.max(z));
                let sum = super::simd::exp_shifted_sum(row, max);
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|z| *z *= inv);
                // −log p_t = log Σ e^z − z_t
                (sum.ln() + max - zt) as f64
            })
            .sum()
    }
}

impl CustomOp2 for FusedXent {
    fn name(&self) -> &'static str {
        "tunebook-lm-head-xent"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let _t = super::profile::timer("lm_head+loss fwd");
        let x = slice_f32("lm_head_cross_entropy", s1, l1)?;
        let w = slice_f32("lm_head_cross_entropy", s2, l2)?;
        let (n, h) = l1.shape().dims2()?;
        let (v, _) = l2.shape().dims2()?;
        let mut total = 0f64;
        if self.keep {
            // All rows in one GEMM: the matrix is kept anyway, and one wide product runs
            // nearer the GEMM's peak than chunks of rows.
            let mut probs = vec![0f32; n * v];
            total += self.chunk_probs(x, w, h, v, 0, n, &mut probs);
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(probs);
        } else {
            let mut buf = vec![0f32; CHUNK.min(n) * v];
            for r0 in (0..n).step_by(CHUNK) {
                let c = CHUNK.min(n - r0);
                total += self.chunk_probs(x, w, h, v, r0, c, &mut buf);
            }
        }
        Ok((CpuStorage::F32(vec![(total / n as f64) as f32]), Shape::from(1)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _t = super::profile::timer("lm_head+loss bwd");
        let (need_x, need_w) = (tracked(x), tracked(w));
        let (n, h) = x.dims2()?;
        let (v, _) = w.dims2()?;
        let scale = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[0] / n as f32;
        let (dx, dw) = with_f32(x, |x| {
            with_f32(w, |w| {
                let mut dx = vec![0f32; if need_x { n * h } else { 0 }];
                let mut dw = vec![0f32; if need_w { v * h } else { 0 }];
                let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
                let mut buf = if saved.is_some() { Vec::new() } else { vec![0f32; CHUNK.min(n) * v] };
                let mut saved = saved;
                // Kept probabilities are one chunk of all rows, so the weight gradient is
                // one GEMM with K = n instead of n / CHUNK passes over the whole `dw`.
                let chunk = if saved.is_some() { n } else { CHUNK };
                for r0 in (0..n).step_by(chunk) {
                    let c = chunk.min(n - r0);
                    let buf: &mut [f32] = match saved.as_mut() {
                        Some(p) => &mut p[r0 * v..(r0 + c) * v],
                        None => {
                            self.chunk_probs(x, w, h, v, r0, c, &mut buf);
                            &mut buf[..]
                        }
                    };
                    buf[..c * v].par_chunks_mut(v).enumerate().for_each(|(i, row)| {
                        row[self.targets[r0 + i] as usize] -= 1.0;
                        row.iter_mut().for_each(|z| *z *= scale);
                    });
                    if need_x {
                        sgemm(false, false, c, h, v, 1.0, buf, v, w, h, 0.0, &mut dx[r0 * h..], h, Threads::All);
                    }
                    if need_w {
                        sgemm(true, false, v, h, c, 1.0, buf, v, &x[r0 * h..], h, 1.0, &mut dw, h, Threads::All);
                    }
                }
                (dx, dw)
            })
        })??;
        let dx = if need_x { Some(cpu_tensor(dx, (n, h))?) } else { None };
        let dw = if need_w { Some(cpu_tensor(dw, (v, h))?) } else { None };
        Ok((dx, dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::gradcheck::{check_grads, rand_tensor};
    use candle_core::Device;

    #[test]
    fn recomputed_and_kept_probabilities_give_the_same_gradients() -> Result<()> {
        let x = candle_core::Var::from_tensor(&rand_tensor(&[300, 6], 7)?)?;
        let w = candle_core::Var::from_tensor(&rand_tensor(&[13, 6], 8)?)?;
        let targets: Vec<u32> = (0..300).map(|i| (i * 5 % 13) as u32).collect();
        let mut grads = Vec::new();
        for keep in [false, true] {
            let op = FusedXent { targets: Arc::new(targets.clone()), saved: Mutex::new(None), keep };
            let g = x.as_tensor().apply_op2(w.as_tensor(), op)?.sum_all()?.backward()?;
            grads.push((g.get(x.as_tensor()).unwrap().clone(), g.get(w.as_tensor()).unwrap().clone()));
        }
        crate::model::ops::gradcheck::assert_close(&grads[0].0, &grads[1].0, 1e-6, "dx")?;
        crate::model::ops::gradcheck::assert_close(&grads[0].1, &grads[1].1, 1e-6, "dw")
    }

    #[test]
    fn cross_entropy_matches_hand_computation() -> Result<()> {
        let logits = Tensor::new(&[[1f32, 2.0, 3.0], [0.0, 0.0, 0.0]], &Device::Cpu)?;
        let l = cross_entropy(&logits, &[2, IGNORE_INDEX])?.to_scalar::<f32>()?;
        let want = -(3f32.exp() / (1f32.exp() + 2f32.exp() + 3f32.exp())).ln();
        assert!((l - want).abs() < 1e-6, "{l} vs {want}");
        let err = cross_entropy(&logits, &[3, 0]).unwrap_err().to_string();
        assert!(err.contains("outside the vocabulary"), "{err}");
        Ok(())
    }

    #[test]
    fn fused_lm_head_loss_matches_composed_and_finite_differences() -> Result<()> {
        let x = rand_tensor(&[5, 6], 1)?;
        let w = (rand_tensor(&[11, 6], 2)? * 2.0)?;
        let labels = [3, IGNORE_INDEX, 0, 10, IGNORE_INDEX];
        let fused = lm_head_cross_entropy(&x, &w, &labels)?.to_scalar::<f32>()?;
        let composed = cross_entropy(&x.matmul(&w.t()?)?, &labels)?.to_scalar::<f32>()?;
        assert!((fused - composed).abs() < 1e-5, "{fused} vs {composed}");
        check_grads("lm_head_cross_entropy", &[x.clone(), w.clone()], |v| lm_head_cross_entropy(&v[0], &v[1], &labels))?;
        check_grads("cross_entropy", &[x.matmul(&w.t()?)?], |v| cross_entropy(&v[0], &labels))?;
        // More rows than one chunk.
        let x = rand_tensor(&[300, 4], 3)?;
        let w = rand_tensor(&[7, 4], 4)?;
        let labels: Vec<i64> = (0..300).map(|i| if i % 3 == 0 { IGNORE_INDEX } else { i % 7 }).collect();
        let fused = lm_head_cross_entropy(&x, &w, &labels)?.to_scalar::<f32>()?;
        let composed = cross_entropy(&x.matmul(&w.t()?)?, &labels)?.to_scalar::<f32>()?;
        assert!((fused - composed).abs() < 1e-5, "{fused} vs {composed}");
        Ok(())
    }
}
