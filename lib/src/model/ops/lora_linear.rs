//! `y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ` as one fused CPU op for a frozen `W`.
//!
//! Composed from candle ops, a LoRA projection is about ten graph nodes (a random tensor,
//! a comparison, a cast and two products for dropout, two thin GEMMs, a scale and an add),
//! each with its own buffers and gradient bookkeeping. Here it is one node: the dropout
//! mask is drawn once from a counter-based generator (seeded per call, so a run can
//! replay it) and kept as one byte per input element for the backward pass, and the
//! small `[N, r]` intermediate is kept too.

use super::gemm::{Threads, sgemm};
use super::{cpu_tensor, fusable, slice_f32, tracked, with_f32};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_SEED: AtomicU64 = AtomicU64::new(0x5EED);

/// A fresh dropout seed (a process-wide counter, so every call draws a new mask).
pub fn next_seed() -> u64 {
    NEXT_SEED.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

/// Restarts the dropout generator at `seed`. The trainer calls this before every
/// step with a value derived from the run seed and the step, so a resumed run
/// draws the same masks as an uninterrupted one.
pub fn set_dropout_seed(seed: u64) {
    NEXT_SEED.store(seed, Ordering::Relaxed);
}

#[inline]
fn mix(seed: u64, i: u64) -> u64 {
    // splitmix64 of (seed, counter): a counter-based generator, so the backward pass can
    // regenerate the forward pass's mask.
    let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Multiplies `v[j]` (element `start + j` of the input) by the dropout factor: 0 with
/// probability `p`, else `1/(1−p)`. Four 16-bit draws per hash; `start` must be a multiple of 4.
#[cfg(test)]
fn apply_mask(seed: u64, p: f32, start: usize, v: &mut [f32]) {
    debug_assert_eq!(start % 4, 0);
    let threshold = (p * 65536.0).round() as u32;
    let inv = 1.0 / (1.0 - p);
    for (c, chunk) in v.chunks_mut(4).enumerate() {
        let h = mix(seed, ((start / 4) + c) as u64);
        for (j, x) in chunk.iter_mut().enumerate() {
            let draw = ((h >> (16 * j)) & 0xFFFF) as u32;
            *x = if draw >= threshold { *x * inv } else { 0.0 };
        }
    }
}

/// The keep/drop decisions of [`apply_mask`] for `len` elements, one byte each (1 = kept).
fn mask_bytes(seed: u64, p: f32, len: usize) -> Vec<u8> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    let threshold = (p * 65536.0).round() as u32;
    let mut out = vec![0u8; len];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, chunk)| {
        let start = ci * CHUNK;
        for (c, quad) in chunk.chunks_mut(4).enumerate() {
            let h = mix(seed, ((start / 4) + c) as u64);
            for (j, m) in quad.iter_mut().enumerate() {
                *m = (((h >> (16 * j)) & 0xFFFF) as u32 >= threshold) as u8;
            }
        }
    });
    out
}

/// `v[i] · mask[i] / (1 − p)`, in place.
fn apply_mask_bytes(mask: &[u8], p: f32, v: &mut [f32]) {
    use rayon::prelude::*;
    let inv = 1.0 / (1.0 - p);
    v.par_chunks_mut(1 << 14).zip(mask.par_chunks(1 << 14)).for_each(|(v, m)| {
        for (x, &k) in v.iter_mut().zip(m) {
            *x *= if k != 0 { inv } else { 0.0 };
        }
    });
}

/// `dropout(x)` and its keep/drop bytes in one parallel pass over `x`: the same decisions
/// as [`mask_bytes`], without first copying `x` and then masking the copy.
fn dropout_with_mask(seed: u64, p: f32, x: &[f32]) -> (Vec<f32>, Vec<u8>) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    let threshold = (p * 65536.0).round() as u32;
    let inv = 1.0 / (1.0 - p);
    let mut out = vec![0f32; x.len()];
    let mut mask = vec![0u8; x.len()];
    out.par_chunks_mut(CHUNK).zip(mask.par_chunks_mut(CHUNK)).zip(x.par_chunks(CHUNK)).enumerate().for_each(
        |(ci, ((out, mask), x))| {
            let start = ci * CHUNK;
            for (c, ((o, m), x)) in out.chunks_mut(4).zip(mask.chunks_mut(4)).zip(x.chunks(4)).enumerate() {
                let h = mix(seed, ((start / 4) + c) as u64);
                for j in 0..x.len() {
                    let keep = ((h >> (16 * j)) & 0xFFFF) as u32 >= threshold;
                    m[j] = keep as u8;
                    o[j] = if keep { x[j] * inv } else { 0.0 };
                }
            }
        },
    );
    (out, mask)
}

/// `x·Wᵀ + scale·(dropout_p(x)·Aᵀ)·Bᵀ` for `x` `[.., K]`, frozen `w` `[M, K]`, `a` `[r, K]`,
/// `b` `[M, r]`; dropout only when `train`. Differentiable in `x`, `a` and `b` (never `w`:
/// callers use it only for frozen base weights). Falls back to composed ops off the CPU.
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64, dropout: f32, train: bool) -> Result<Tensor> {
    let p = if train { dropout } else { 0.0 };
    let (m, k) = w.dims2()?;
    let (r, ka) = a.dims2()?;
    if ka != k || b.dims() != [m, r] || x.dim(candle_core::D::Minus1)? != k {
        candle_core::bail!("lora_linear: x {:?}, W {:?}, A {:?}, B {:?} do not fit together", x.dims(), w.dims(), a.dims(), b.dims());
    }
    if !(fusable(x) && w.dtype() == DType::F32 && a.dtype() == DType::F32 && !tracked(w)) {
        // Adapters are f32 masters: cast them to the compute dtype (the cast is differentiable).
        let (a, b) = (&a.to_dtype(x.dtype())?, &b.to_dtype(x.dtype())?);
        let xd = if p > 0.0 { candle_nn::ops::dropout(x, p)? } else { x.clone() };
        let base = super::linear(x, w)?;
        return base + (super::linear(&super::linear(&xd, a)?, b)? * scale)?;
    }
    let op = LoraOp {
        w: w.contiguous()?,
        scale: scale as f32,
        p,
        seed: next_seed(),
        t: std::sync::Mutex::new(None),
        mask: std::sync::Mutex::new(None),
        xd: std::sync::Mutex::new(None),
    };
    x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

struct LoraOp {
    w: Tensor,
    scale: f32,
    p: f32,
    seed: u64,
    /// `dropout(x)·Aᵀ` (`[N, r]`, small) from the forward pass, reused by the backward pass.
    t: std::sync::Mutex<Option<Vec<f32>>>,
    /// The forward pass's dropout decisions (one byte per input element), so the backward
    /// pass applies the same mask without drawing it again.
    mask: std::sync::Mutex<Option<Vec<u8>>>,
    /// `dropout(x)` from the forward pass, taken (and so freed) by the backward pass. Like
    /// PyTorch's saved dropout output: it costs one input-sized buffer per projection until
    /// the backward pass reaches it, and saves recomputing it.
    xd: std::sync::Mutex<Option<Vec<f32>>>,
}

impl LoraOp {
    /// `dropout(x)`, or `None` without dropout: the forward pass's copy when it is still
    /// held (taken, so it is freed after this use), else drawn from the same mask.
    fn dropped(&self, x: &[f32]) -> Option<Vec<f32>> {
        if self.p <= 0.0 {
            return None;
        }
        if let Some(xd) = self.xd.lock().unwrap_or_else(|e| e.into_inner()).take().filter(|v| v.len() == x.len()) {
            return Some(xd);
        }
        let mut slot = self.mask.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_deref() {
            Some(m) if m.len() == x.len() => {
                let mut out = x.to_vec();
                apply_mask_bytes(m, self.p, &mut out);
                Some(out)
            }
            _ => {
                let (out, mask) = dropout_with_mask(self.seed, self.p, x);
                *slot = Some(mask);
                Some(out)
            }
        }
    }

    /// Applies the dropout mask (and its 1/(1−p) scale) to a buffer shaped like the input.
    fn mask_in_place(&self, v: &mut [f32]) {
        let mut slot = self.mask.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_none_or(|m| m.len() != v.len()) {
            *slot = Some(mask_bytes(self.seed, self.p, v.len()));
        }
        if let Some(m) = slot.as_deref() {
            apply_mask_bytes(m, self.p, v);
        }
    }
}

impl CustomOp3 for LoraOp {
    fn name(&self) -> &'static str {
        "tunebook-lora-linear"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sa: &CpuStorage, la: &Layout, sb: &CpuStorage, lb: &Layout) -> Result<(CpuStorage, Shape)> {
        let _t = super::profile::timer("lora linear fwd");
        let x = slice_f32("lora_linear", sx, lx)?;
        let a = slice_f32("lora_linear", sa, la)?;
        let b = slice_f32("lora_linear", sb, lb)?;
        let (r, _) = la.shape().dims2()?;
        let m = lb.shape().dims()[0];
        let (n, k, out_shape) = super::linear::rows_and_out(lx, m)?;
        let mut out = vec![0f32; n * m];
        let t0 = super::profile::timer("  lf base");
        with_f32(&self.w, |w| sgemm(false, true, n, m, k, 1.0, x, k, w, k, 0.0, &mut out, m, Threads::All))?;
        drop(t0);
        let t0 = super::profile::timer("  lf dropout");
        let xd = self.dropped(x);
        drop(t0);
        let t0 = super::profile::timer("  lf thin");
        let mut t = vec![0f32; n * r];
        sgemm(false, true, n, r, k, 1.0, xd.as_deref().unwrap_or(x), k, a, k, 0.0, &mut t, r, Threads::All);
        sgemm(false, true, n, m, r, self.scale, &t, r, b, r, 1.0, &mut out, m, Threads::All);
        drop(t0);
        *self.t.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        *self.xd.lock().unwrap_or_else(|e| e.into_inner()) = xd;
        Ok((CpuStorage::F32(out), out_shape))
    }

    fn bwd(&self, x: &Tensor, a: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = super::profile::timer("lora linear bwd");
        let (r, k) = a.dims2()?;
        let (m, _) = b.dims2()?;
        let n = x.elem_count() / k;
        let s = self.scale;
        let (need_x, need_a, need_b) = (tracked(x), tracked(a), tracked(b));
        let g = g.to_dtype(DType::F32)?;
        let (dx, da, db) = with_f32(x, |x| {
            with_f32(a, |a| {
                with_f32(b, |b| {
                    with_f32(&g, |g| {
                        let xd_own = self.dropped(x);
                        let xd = xd_own.as_deref().unwrap_or(x);
                        // gB = g·B  [n, r]
                        let t0 = super::profile::timer("  lb gb+db+da");
                        let mut gb = vec![0f32; n * r];
                        sgemm(false, false, n, r, m, 1.0, g, m, b, r, 0.0, &mut gb, r, Threads::All);
                        let db = need_b.then(|| {
                            // dB = s·gᵀ·t, t = xd·Aᵀ (kept from the forward pass when A is unchanged)
                            let t = match self.t.lock().unwrap_or_else(|e| e.into_inner()).take() {
                                Some(t) if t.len() == n * r => t,
                                _ => {
                                    let mut t = vec![0f32; n * r];
                                    sgemm(false, true, n, r, k, 1.0, xd, k, a, k, 0.0, &mut t, r, Threads::All);
                                    t
                                }
                            };
                            let mut db = vec![0f32; m * r];
                            sgemm(true, false, m, r, n, s, g, m, &t, r, 0.0, &mut db, r, Threads::All);
                            db
                        });
                        let da = need_a.then(|| {
                            // dA = s·gBᵀ·xd
                            let mut da = vec![0f32; r * k];
                            sgemm(true, false, r, k, n, s, &gb, r, xd, k, 0.0, &mut da, k, Threads::All);
                            da
                        });
                        drop(t0);
                        let t0 = super::profile::timer("  lb dx lora");
                        let dx = if need_x {
                            // dx = g·W + s·dropout'(gB·A)
                            let mut lo = vec![0f32; n * k];
                            sgemm(false, false, n, k, r, s, &gb, r, a, k, 0.0, &mut lo, k, Threads::All);
                            if self.p > 0.0 {
                                self.mask_in_place(&mut lo);
                            }
                            drop(t0);
                            let _t1 = super::profile::timer("  lb dx base");
                            with_f32(&self.w, |w| sgemm(false, false, n, k, m, 1.0, g, m, w, k, 1.0, &mut lo, k, Threads::All))?;
                            Some(lo)
                        } else {
                            None
                        };
                        Ok::<_, candle_core::Error>((dx, da, db))
                    })
                })
            })
        })?????;
        Ok((
            dx.map(|v| cpu_tensor(v, x.shape())).transpose()?,
            da.map(|v| cpu_tensor(v, (r, k))).transpose()?,
            db.map(|v| cpu_tensor(v, (m, r))).transpose()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::gradcheck::{assert_close, check_grads, rand_tensor};

    #[test]
    fn fused_lora_matches_composed_and_finite_differences() -> Result<()> {
        let x = rand_tensor(&[2, 3, 8], 1)?;
        let w = rand_tensor(&[6, 8], 2)?;
        let a = rand_tensor(&[2, 8], 3)?;
        let b = rand_tensor(&[6, 2], 4)?;
        let fused = lora_linear(&x, &w, &a, &b, 1.5, 0.0, false)?;
        let composed = (super::super::linear(&x, &w)? + (super::super::linear(&super::super::linear(&x, &a)?, &b)? * 1.5)?)?;
        assert_close(&fused, &composed, 1e-5, "lora fused vs composed")?;
        check_grads("lora_linear", &[x.clone(), a.clone(), b.clone()], |v| lora_linear(&v[0], &w, &v[1], &v[2], 1.5, 0.0, false))?;
        Ok(())
    }

    #[test]
    fn dropout_drops_the_requested_fraction_and_rescales() {
        let mut v = vec![1f32; 100_000];
        apply_mask(42, 0.3, 0, &mut v);
        let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        assert!((dropped - 0.3).abs() < 0.01, "dropped {dropped}");
        assert!(v.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.7).abs() < 1e-6));
        let mut w = vec![1f32; 100_000];
        apply_mask(43, 0.3, 0, &mut w);
        assert_ne!(v, w, "another seed, another mask");
        // The stored byte mask draws exactly the same decisions.
        let mut u = vec![1f32; 100_000];
        apply_mask_bytes(&mask_bytes(42, 0.3, u.len()), 0.3, &mut u);
        assert_eq!(u, v);
        // So does the one-pass dropout, on an input that is not all ones.
        let x: Vec<f32> = (0..100_003).map(|i| (i % 7) as f32 - 3.0).collect();
        let (xd, mask) = dropout_with_mask(42, 0.3, &x);
        assert_eq!(mask, mask_bytes(42, 0.3, x.len()));
        let expect: Vec<f32> = x.iter().zip(&v).map(|(x, f)| x * f).collect();
        assert_eq!(xd[..100_000], expect[..]);
    }

    #[test]
    fn dropout_mask_is_consistent_between_forward_and_backward() -> Result<()> {
        // With dropout, the gradient of Σ y·R w.r.t. B is s·Rᵀ·(xd·Aᵀ): recover xd's mask from
        // the output and check dB uses the same mask (a different mask would not match).
        let x = (rand_tensor(&[64, 8], 5)? + 2.0)?; // all positive: dropped entries are exactly 0
        let w = Tensor::zeros((1, 8), DType::F32, &candle_core::Device::Cpu)?;
        let a = Tensor::eye(8, DType::F32, &candle_core::Device::Cpu)?;
        let bv = candle_core::Var::from_tensor(&Tensor::ones((1, 8), DType::F32, &candle_core::Device::Cpu)?)?;
        let av = candle_core::Var::from_tensor(&a)?;
        let y = lora_linear(&x, &w, av.as_tensor(), bv.as_tensor(), 1.0, 0.5, true)?;
        let grads = y.sum_all()?.backward()?;
        // dB[0, j] = Σ_i xd[i, j]; y[i] = Σ_j xd[i, j]; both from the same xd.
        let db = grads.get(bv.as_tensor()).unwrap().sum_all()?.to_scalar::<f32>()?;
        let ysum = y.sum_all()?.to_scalar::<f32>()?;
        assert!((db - ysum).abs() < 1e-3 * ysum.abs(), "{db} vs {ysum}");
        let kept = y.flatten_all()?.to_vec1::<f32>()?;
        let full = (x.sum(1)? * 2.0)?.to_vec1::<f32>()?;
        assert!(kept.iter().zip(&full).any(|(k, f)| (k - f).abs() > 1e-3), "some entries were dropped");
        let da = grads.get(av.as_tensor()).unwrap().sum_all()?.to_scalar::<f32>()?;
        // dA[j, k] = Σ_i xd[i, k] for each of the 8 rows j.
        assert!((da - 8.0 * ysum).abs() < 1e-3 * ysum.abs(), "dA uses the same mask: {da} vs 8·{ysum}");
        Ok(())
    }
}
