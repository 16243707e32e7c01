//! Causal grouped-query attention with a segment mask (packed sequences) and an
//! optional sliding window, fused on the CPU (scores are recomputed in the backward
//! pass instead of being stored, as flash attention does).

use super::gemm::{Threads, sgemm};
use super::{cpu_tensor, fusable, slice_f32, tracked, with_f32};
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// Which keys each query may attend to. Query `i` of `Tq` sits at absolute position
/// `i + (Tk − Tq)` among the keys (so a KV cache of past keys works), and sees key `j` when
/// `j ≤ i + (Tk − Tq)`, both tokens carry the same segment id (when segments are given), and
/// `i + (Tk − Tq) − j < window` (when a sliding window is set).
#[derive(Clone, Debug, Default)]
pub struct AttentionMask {
    /// Segment id of every key, `[batch, Tk]` row-major: packed sequences get distinct ids;
    /// padding gets an id of its own.
    pub segments: Option<Arc<Vec<u32>>>,
    /// Mistral-style sliding window, in tokens.
    pub sliding_window: Option<usize>,
}

impl AttentionMask {
    /// A plain causal mask.
    pub fn causal() -> Self {
        Self::default()
    }

    #[inline]
    fn allowed(&self, b: usize, tk: usize, qpos: usize, j: usize) -> bool {
        if j > qpos {
            return false;
        }
        if let Some(w) = self.sliding_window {
            if qpos - j >= w {
                return false;
            }
        }
        if let Some(s) = &self.segments {
            return s[b * tk + j] == s[b * tk + qpos];
        }
        true
    }

    /// The additive mask `[batch, 1, Tq, Tk]` (0 or −∞) for the composed path.
    fn additive(&self, b: usize, tq: usize, tk: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let off = tk - tq;
        let mut m = vec![0f32; b * tq * tk];
        for bi in 0..b {
            for i in 0..tq {
                for j in 0..tk {
                    if !self.allowed(bi, tk, i + off, j) {
                        m[(bi * tq + i) * tk + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Tensor::from_vec(m, (b, 1, tq, tk), &Device::Cpu)?.to_device(device)?.to_dtype(dtype)
    }
}

/// `softmax(q·kᵀ/√d + mask)·v` for `q` `[B, Tq, H, D]` and `k`, `v` `[B, Tk, Hkv, D]`
/// (`H` a multiple of `Hkv`); returns `[B, Tq, H, D]`. Differentiable in q, k and v.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
    let (b, tq, h, d) = q.dims4()?;
    let (bk, tk, hkv, dk) = k.dims4()?;
    if bk != b || dk != d || k.dims() != v.dims() || hkv == 0 || h % hkv != 0 || tk < tq {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?}: expected q [B,Tq,H,D], k = v [B,Tk,Hkv,D] with H a multiple of Hkv and Tk ≥ Tq",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if let Some(s) = &mask.segments {
        if s.len() != b * tk {
            candle_core::bail!("attention: {} segment ids for {b}×{tk} keys", s.len());
        }
    }
    if fusable(q) && k.dtype() == DType::F32 && v.dtype() == DType::F32 {
        let op = AttentionOp { mask: mask.clone(), scale: 1.0 / (d as f32).sqrt(), d };
        return q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    attention_composed(q, k, v, mask)
}

/// [`attention`] on the layout projections produce: `q` `[B, Tq, H·D]`, `k`, `v`
/// `[B, Tk, Hkv·D]`; returns `[B, Tq, H·D]` (no reshapes for autograd to walk).
pub fn attention_flat(q: &Tensor, k: &Tensor, v: &Tensor, head_dim: usize, mask: &AttentionMask) -> Result<Tensor> {
    let (b, tq, hd) = q.dims3()?;
    let (_, tk, hkvd) = k.dims3()?;
    if head_dim == 0 || hd % head_dim != 0 || hkvd % head_dim != 0 {
        candle_core::bail!("attention: widths {hd} and {hkvd} are not multiples of head_dim {head_dim}");
    }
    let (h, hkv) = (hd / head_dim, hkvd / head_dim);
    if !(fusable(q) && k.dtype() == DType::F32 && v.dtype() == DType::F32) {
        let out = attention(
            &q.reshape((b, tq, h, head_dim))?,
            &k.reshape((b, tk, hkv, head_dim))?,
            &v.reshape((b, tk, hkv, head_dim))?,
            mask,
        )?;
        return out.reshape((b, tq, hd));
    }
    if k.dims() != v.dims() || hkv == 0 || h % hkv != 0 || tk < tq || k.dim(0)? != b {
        candle_core::bail!("attention: q {:?}, k {:?}, v {:?} do not fit together (head_dim {head_dim})", q.dims(), k.dims(), v.dims());
    }
    if let Some(s) = &mask.segments {
        if s.len() != b * tk {
            candle_core::bail!("attention: {} segment ids for {b}×{tk} keys", s.len());
        }
    }
    let op = AttentionOp { mask: mask.clone(), scale: 1.0 / (head_dim as f32).sqrt(), d: head_dim };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// One decode step of attention for `n` sequences at once: `q` is `[n, 1, H·D]` (one
/// query per sequence, at the position after its keys) and `kv[i]` holds sequence `i`'s
/// keys and values, `[1, L_i, Hkv·D]` each (its own length). Returns `[n, 1, H·D]`.
/// Every (sequence, key-value head) pair is one task of a single parallel loop, instead
/// of one kernel launch per sequence; each output is computed the same way whatever
/// else is in the batch. Not differentiable (generation only).
pub fn decode_attention(q: &Tensor, kv: &[(Tensor, Tensor)], head_dim: usize, sliding_window: Option<usize>) -> Result<Tensor> {
    use rayon::prelude::*;
    let (n, one, hd) = q.dims3()?;
    if one != 1 || kv.len() != n || head_dim == 0 || hd % head_dim != 0 {
        candle_core::bail!("decode attention: q {:?} with {} key/value pairs (head_dim {head_dim})", q.dims(), kv.len());
    }
    let q = q.contiguous()?;
    let kvc: Vec<(Tensor, Tensor)> = kv.iter().map(|(k, v)| Ok((k.contiguous()?, v.contiguous()?))).collect::<Result<_>>()?;
    let hkvd = kvc.first().map(|(k, _)| k.dim(2)).transpose()?.unwrap_or(0);
    let (h, hkv, d) = (hd / head_dim, hkvd / head_dim, head_dim);
    if hkv == 0 || h % hkv != 0 {
        candle_core::bail!("decode attention: {h} query heads and {hkv} key/value heads");
    }
    let (qs, ql) = q.storage_and_layout();
    let qd = match &*qs {
        candle_core::Storage::Cpu(s) => slice_f32("decode attention", s, ql)?,
        _ => candle_core::bail!("decode attention runs on the CPU"),
    };
    let guards: Vec<_> = kvc.iter().map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout())).collect();
    let mut rows: Vec<(&[f32], &[f32], usize)> = Vec::with_capacity(n);
    for (i, ((ks, kl), (vs, vl))) in guards.iter().enumerate() {
        let (kd, vd) = match (&**ks, &**vs) {
            (candle_core::Storage::Cpu(k), candle_core::Storage::Cpu(v)) => (slice_f32("decode attention", k, kl)?, slice_f32("decode attention", v, vl)?),
            _ => candle_core::bail!("decode attention runs on the CPU"),
        };
        let len = kd.len() / hkvd;
        if kd.len() != vd.len() || len == 0 || kd.len() != len * hkvd {
            candle_core::bail!("decode attention: sequence {i} has {} key and {} value values for width {hkvd}", kd.len(), vd.len());
        }
        rows.push((kd, vd, len));
    }
    let _t = super::profile::timer("decode attention");
    let rep = h / hkv;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; n * hd];
    // One task per (sequence, key-value head): `rep` query heads, d columns each.
    out.par_chunks_mut(rep * d).enumerate().for_each(|(t, o)| {
        let (i, kh) = (t / hkv, t % hkv);
        let (kd, vd, len) = rows[i];
        let from = sliding_window.map_or(0, |w| len.saturating_sub(w));
        let keys = len - from;
        // The `rep` query heads of this key-value head are adjacent: scores [rep, keys]
        // = scale · Q·Kᵀ, softmax per row, then out [rep, d] = P·V.
        let mut p = vec![0f32; rep * keys];
        let q0 = i * hd + kh * rep * d;
        let k0 = from * hkvd + kh * d;
        sgemm(false, true, rep, keys, d, scale, &qd[q0..q0 + rep * d], d, &kd[k0..], hkvd, 0.0, &mut p, keys, Threads::One);
        for row in p.chunks_mut(keys) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum = super::simd::exp_shifted_sum(row, max);
            row.iter_mut().for_each(|x| *x /= sum);
        }
        sgemm(false, false, rep, d, keys, 1.0, &p, keys, &vd[k0..], hkvd, 0.0, o, d, Threads::One);
    });
    drop(guards);
    cpu_tensor(out, (n, 1, hd))
}

/// The same computation from differentiable candle ops (materialises the scores).
pub fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
    let (b, tq, h, d) = q.dims4()?;
    let (_, tk, hkv, _) = k.dims4()?;
    let rep = h / hkv;
    let q = q.transpose(1, 2)?.contiguous()?; // [B,H,Tq,D]
    let expand = |t: &Tensor| -> Result<Tensor> {
        let t = t.transpose(1, 2)?; // [B,Hkv,Tk,D]
        if rep == 1 {
            return t.contiguous();
        }
        t.unsqueeze(2)?.expand((b, hkv, rep, tk, d))?.reshape((b, h, tk, d))
    };
    let k = expand(k)?;
    let v = expand(v)?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
    let scores = scores.broadcast_add(&mask.additive(b, tq, tk, scores.dtype(), scores.device())?)?;
    let p = candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?;
    p.matmul(&v)?.transpose(1, 2)?.contiguous()
}

struct AttentionOp {
    mask: AttentionMask,
    scale: f32,
    d: usize,
}

/// A pointer that parallel tasks write through at disjoint offsets.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

struct Dims {
    b: usize,
    tq: usize,
    tk: usize,
    h: usize,
    hkv: usize,
    d: usize,
}

impl AttentionOp {
    /// Probabilities of query rows `i0..i1` of head `hh` in batch `bi` over keys `0..kn` into
    /// `p` (`[i1 − i0, kn]`), masked and softmaxed. Keys past `kn` are masked for these rows.
    #[allow(clippy::too_many_arguments)]
    fn probs(&self, dm: &Dims, q: &[f32], k: &[f32], bi: usize, hh: usize, i0: usize, i1: usize, kn: usize, p: &mut [f32]) {
        let Dims { tq, tk, h, hkv, d, .. } = *dm;
        let kh = hh / (h / hkv);
        let q0 = bi * tq * h * d + hh * d + i0 * h * d;
        let k0 = bi * tk * hkv * d + kh * d;
        let off = tk - tq;
        let rows = i1 - i0;
        sgemm(false, true, rows, kn, d, self.scale, &q[q0..], h * d, &k[k0..], hkv * d, 0.0, p, kn, Threads::One);
        for r in 0..rows {
            let row = &mut p[r * kn..(r + 1) * kn];
            let qpos = i0 + r + off;
            let mut max = f32::NEG_INFINITY;
            for (j, s) in row.iter_mut().enumerate() {
                if self.mask.allowed(bi, tk, qpos, j) {
                    max = max.max(*s);
                } else {
                    *s = f32::NEG_INFINITY;
                }
            }
            if max == f32::NEG_INFINITY {
                row.iter_mut().for_each(|s| *s = 0.0);
                continue;
            }
            let sum = super::simd::exp_shifted_sum(row, max);
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|s| *s *= inv);
        }
    }

    /// Query blocks `(i0, i1, kn)`: causality means rows `i0..i1` see at most keys `0..kn`.
    fn blocks(dm: &Dims) -> impl Iterator<Item = (usize, usize, usize)> {
        const QB: usize = 64;
        let (tq, tk) = (dm.tq, dm.tk);
        (0..tq).step_by(QB).map(move |i0| {
            let i1 = (i0 + QB).min(tq);
            (i0, i1, (i1 + tk - tq).min(tk))
        })
    }

    fn for_each_kv_head(dm: &Dims, f: impl Fn(usize, usize) + Sync + Send) {
        use rayon::prelude::*;
        (0..dm.b * dm.hkv).into_par_iter().for_each(|t| f(t / dm.hkv, t % dm.hkv));
    }
}

/// Sizes from `[B, T, H, D]` or `[B, T, H·D]` layouts.
fn dims(q: &Layout, k: &Layout, d: usize) -> Result<Dims> {
    let qd = q.shape().dims();
    let kd = k.shape().dims();
    let (b, tq, tk) = (qd[0], qd[1], kd[1]);
    let h = q.shape().elem_count() / (b * tq * d);
    let hkv = k.shape().elem_count() / (b * tk * d);
    Ok(Dims { b, tq, tk, h, hkv, d })
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "tunebook-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (slice_f32("attention", sq, lq)?, slice_f32("attention", sk, lk)?, slice_f32("attention", sv, lv)?);
        let _t = super::profile::timer("attention fwd");
        let dm = dims(lq, lk, self.d)?;
        let mut out = vec![0f32; q.len()];
        let outp = SharedMut(out.as_mut_ptr());
        let out_len = out.len();
        let rep = dm.h / dm.hkv;
        Self::for_each_kv_head(&dm, |bi, kh| {
            let Dims { tq, tk, h, hkv, d, .. } = dm;
            let mut p = vec![0f32; tq * tk];
            // SAFETY: each (batch, kv head) task writes only the columns of its own heads.
            let out = unsafe { std::slice::from_raw_parts_mut({ outp }.0, out_len) };
            let v0 = bi * tk * hkv * d + kh * d;
            for hh in kh * rep..(kh + 1) * rep {
                for (i0, i1, kn) in Self::blocks(&dm) {
                    self.probs(&dm, q, k, bi, hh, i0, i1, kn, &mut p);
                    let o0 = bi * tq * h * d + hh * d + i0 * h * d;
                    sgemm(false, false, i1 - i0, d, kn, 1.0, &p, kn, &v[v0..], hkv * d, 0.0, &mut out[o0..], h * d, Threads::One);
                }
            }
        });
        Ok((CpuStorage::F32(out), lq.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = super::profile::timer("attention bwd");
        let dm = dims(q.layout(), k.layout(), self.d)?;
        let g = g.to_dtype(DType::F32)?;
        let (dq, dk, dv) = with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(o, |o| with_f32(&g, |g| self.backward(&dm, q, k, v, o, g)))
                })
            })
        })?????;
        let dq = if tracked(q) { Some(cpu_tensor(dq, q.shape())?) } else { None };
        let dk = if tracked(k) { Some(cpu_tensor(dk, k.shape())?) } else { None };
        let dv = if tracked(v) { Some(cpu_tensor(dv, v.shape())?) } else { None };
        Ok((dq, dk, dv))
    }
}

impl AttentionOp {
    #[allow(clippy::type_complexity)]
    fn backward(&self, dm: &Dims, q: &[f32], k: &[f32], v: &[f32], o: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut dq = vec![0f32; q.len()];
        let mut dk = vec![0f32; k.len()];
        let mut dv = vec![0f32; v.len()];
        let (dqp, dkp, dvp) = (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
        let (nq, nk) = (dq.len(), dk.len());
        let rep = dm.h / dm.hkv;
        Self::for_each_kv_head(dm, |bi, kh| {
            let Dims { tq, tk, h, hkv, d, .. } = *dm;
            // SAFETY: each (batch, kv head) task touches only its own heads' columns.
            let (dq, dk, dv) = unsafe {
                (
                    std::slice::from_raw_parts_mut({ dqp }.0, nq),
                    std::slice::from_raw_parts_mut({ dkp }.0, nk),
                    std::slice::from_raw_parts_mut({ dvp }.0, nk),
                )
            };
            let mut p = vec![0f32; tq * tk];
            let mut dp = vec![0f32; tq * tk];
            let k0 = bi * tk * hkv * d + kh * d;
            for hh in kh * rep..(kh + 1) * rep {
                for (i0, i1, kn) in Self::blocks(dm) {
                    let rows = i1 - i0;
                    let q0 = bi * tq * h * d + hh * d + i0 * h * d;
                    self.probs(dm, q, k, bi, hh, i0, i1, kn, &mut p);
                    // dV += Pᵀ·dO
                    sgemm(true, false, kn, d, rows, 1.0, &p, kn, &g[q0..], h * d, 1.0, &mut dv[k0..], hkv * d, Threads::One);
                    // dP = dO·Vᵀ
                    sgemm(false, true, rows, kn, d, 1.0, &g[q0..], h * d, &v[k0..], hkv * d, 0.0, &mut dp, kn, Threads::One);
                    // dS = P ∘ (dP − rowsum(dO ∘ O))
                    for r in 0..rows {
                        let o_r = &o[q0 + r * h * d..q0 + r * h * d + d];
                        let g_r = &g[q0 + r * h * d..q0 + r * h * d + d];
                        let di: f32 = o_r.iter().zip(g_r).map(|(a, b)| a * b).sum();
                        for j in 0..kn {
                            let idx = r * kn + j;
                            dp[idx] = p[idx] * (dp[idx] - di);
                        }
                    }
                    // dQ = scale·dS·K ; dK += scale·dSᵀ·Q
                    sgemm(false, false, rows, d, kn, self.scale, &dp, kn, &k[k0..], hkv * d, 0.0, &mut dq[q0..], h * d, Threads::One);
                    sgemm(true, false, kn, d, rows, self.scale, &dp, kn, &q[q0..], h * d, 1.0, &mut dk[k0..], hkv * d, Threads::One);
                }
            }
        });
        (dq, dk, dv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_attention_equals_the_fused_attention_of_each_sequence() -> Result<()> {
        use crate::model::ops::gradcheck::rand_tensor;
        let (h, hkv, d) = (6, 2, 8);
        let lens = [1usize, 7, 30, 12];
        for window in [None, Some(5)] {
            let q = rand_tensor(&[lens.len(), 1, h * d], 1)?;
            let kv: Vec<(Tensor, Tensor)> = lens
                .iter()
                .enumerate()
                .map(|(i, &l)| Ok((rand_tensor(&[1, l, hkv * d], 10 + i as u64)?, rand_tensor(&[1, l, hkv * d], 20 + i as u64)?)))
                .collect::<Result<_>>()?;
            let got = decode_attention(&q, &kv, d, window)?;
            let mask = AttentionMask { segments: None, sliding_window: window };
            for (i, (k, v)) in kv.iter().enumerate() {
                let want = attention_flat(&q.narrow(0, i, 1)?, k, v, d, &mask)?;
                let diff = (got.narrow(0, i, 1)? - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "sequence {i}, window {window:?}: {diff}");
            }
        }
        Ok(())
    }
    use crate::model::ops::gradcheck::{assert_close, check_grads, rand_tensor};

    fn masks() -> Vec<(&'static str, AttentionMask)> {
        vec![
            ("causal", AttentionMask::causal()),
            ("segments", AttentionMask { segments: Some(Arc::new(vec![0, 0, 1, 1, 1, 0, 0, 0, 0, 2])), sliding_window: None }),
            ("window", AttentionMask { segments: None, sliding_window: Some(2) }),
        ]
    }

    #[test]
    fn attention_fused_matches_composed_and_finite_differences() -> Result<()> {
        // GQA: 4 query heads over 2 kv heads.
        let q = rand_tensor(&[2, 5, 4, 4], 10)?;
        let k = rand_tensor(&[2, 5, 2, 4], 11)?;
        let v = rand_tensor(&[2, 5, 2, 4], 12)?;
        for (name, m) in masks() {
            assert_close(&attention(&q, &k, &v, &m)?, &attention_composed(&q, &k, &v, &m)?, 1e-5, name)?;
            let flat = attention_flat(&q.reshape((2, 5, 16))?, &k.reshape((2, 5, 8))?, &v.reshape((2, 5, 8))?, 4, &m)?;
            assert_close(&flat.reshape((2, 5, 4, 4))?, &attention(&q, &k, &v, &m)?, 0.0, name)?;
            check_grads(&format!("attention flat {name}"), &[q.reshape((2, 5, 16))?, k.reshape((2, 5, 8))?, v.reshape((2, 5, 8))?], |t| {
                attention_flat(&t[0], &t[1], &t[2], 4, &m)
            })?;
            check_grads(&format!("attention fused {name}"), &[q.clone(), k.clone(), v.clone()], |t| {
                attention(&t[0], &t[1], &t[2], &m)
            })?;
            check_grads(&format!("attention composed {name}"), &[q.clone(), k.clone(), v.clone()], |t| {
                attention_composed(&t[0], &t[1], &t[2], &m)
            })?;
        }
        Ok(())
    }

    #[test]
    fn long_sequences_span_several_query_blocks() -> Result<()> {
        // 150 queries: three causal blocks of rows; also 100 queries after 50 cached keys.
        let q = rand_tensor(&[1, 150, 2, 4], 40)?;
        let k = rand_tensor(&[1, 150, 1, 4], 41)?;
        let v = rand_tensor(&[1, 150, 1, 4], 42)?;
        let segs: Vec<u32> = (0..150).map(|i| (i / 70) as u32).collect();
        for m in [AttentionMask::causal(), AttentionMask { segments: Some(Arc::new(segs)), sliding_window: Some(90) }] {
            assert_close(&attention(&q, &k, &v, &m)?, &attention_composed(&q, &k, &v, &m)?, 1e-5, "150 tokens")?;
            check_grads("attention 150 tokens", &[q.clone(), k.clone(), v.clone()], |t| attention(&t[0], &t[1], &t[2], &m))?;
        }
        let tail = q.narrow(1, 50, 100)?;
        let m = AttentionMask::causal();
        assert_close(&attention(&tail, &k, &v, &m)?, &attention_composed(&tail, &k, &v, &m)?, 1e-5, "after a cache")?;
        check_grads("attention after a cache", &[tail, k, v], |t| attention(&t[0], &t[1], &t[2], &m))
    }

    #[test]
    fn segments_isolate_packed_sequences() -> Result<()> {
        // Two sequences packed in one row must give the same outputs as run apart.
        let q = rand_tensor(&[1, 6, 2, 4], 20)?;
        let k = rand_tensor(&[1, 6, 1, 4], 21)?;
        let v = rand_tensor(&[1, 6, 1, 4], 22)?;
        let m = AttentionMask { segments: Some(Arc::new(vec![5, 5, 5, 9, 9, 9])), sliding_window: None };
        let packed = attention(&q, &k, &v, &m)?;
        let second = attention(&q.narrow(1, 3, 3)?, &k.narrow(1, 3, 3)?, &v.narrow(1, 3, 3)?, &AttentionMask::causal())?;
        assert_close(&packed.narrow(1, 3, 3)?, &second, 1e-5, "second packed sequence")
    }

    #[test]
    fn kv_cache_queries_match_full_sequence() -> Result<()> {
        let q = rand_tensor(&[1, 6, 2, 4], 30)?;
        let k = rand_tensor(&[1, 6, 2, 4], 31)?;
        let v = rand_tensor(&[1, 6, 2, 4], 32)?;
        let full = attention(&q, &k, &v, &AttentionMask::causal())?;
        let last = attention(&q.narrow(1, 4, 2)?, &k, &v, &AttentionMask::causal())?;
        assert_close(&full.narrow(1, 4, 2)?, &last, 1e-5, "last two queries against the cache")
    }
}
