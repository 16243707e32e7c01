//! `y = x·Wᵀ` whose backward computes only the gradients that autograd follows.
//!
//! candle's matmul backward always computes (and stores) a gradient for both operands,
//! so a frozen base weight under LoRA would cost a full extra GEMM and a weight-sized
//! buffer per layer. This op asks each operand whether it is tracked first.

use super::gemm::{Threads, sgemm};
use super::{cpu_tensor, slice_f32, tracked, with_f32};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `x·Wᵀ` for `x` `[.., K]` and `w` `[M, K]`; returns `[.., M]`. Works on every device
/// and dtype; on the CPU in f32 it runs on [`sgemm`](super::gemm::sgemm).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (m, k) = w.dims2()?;
    let dims = x.dims();
    if dims.last() != Some(&k) {
        candle_core::bail!("linear: input {:?} does not end in {k}, the weight's input dimension (weight {:?})", dims, w.dims());
    }
    if x.dtype() != w.dtype() {
        candle_core::bail!("linear: input is {:?} but weight is {:?}", x.dtype(), w.dtype());
    }
    let _ = m;
    // N-D in, N-D out: no reshape nodes for autograd to walk.
    x.contiguous()?.apply_op2(&w.contiguous()?, LinearOp)
}

/// `(rows, k)` of an N-D layout whose last dimension is `k`, and the output shape with `m` last.
pub(crate) fn rows_and_out(l: &Layout, m: usize) -> Result<(usize, usize, Shape)> {
    let dims = l.shape().dims();
    let k = *dims.last().ok_or_else(|| candle_core::Error::Msg("linear: scalar input".into()))?;
    let n = l.shape().elem_count() / k.max(1);
    let mut out = dims.to_vec();
    *out.last_mut().unwrap() = m;
    Ok((n, k, Shape::from(out)))
}

struct LinearOp;

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "tunebook-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let _t = super::profile::timer("linear fwd");
        let (m, _) = l2.shape().dims2()?;
        let (n, k, out_shape) = rows_and_out(l1, m)?;
        if s1.dtype() != DType::F32 {
            let l1 = Layout::contiguous_with_offset((n, k), l1.start_offset());
            let out = s1.matmul(s2, (1, n, m, k), &l1, &l2.transpose(0, 1)?)?;
            return Ok((out, out_shape));
        }
        let x = slice_f32("linear", s1, l1)?;
        let w = slice_f32("linear", s2, l2)?;
        let mut out = vec![0f32; n * m];
        sgemm(false, true, n, m, k, 1.0, x, k, w, k, 0.0, &mut out, m, Threads::All);
        Ok((CpuStorage::F32(out), out_shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, _) = l2.shape().dims2()?;
        let (n, k, out_shape) = rows_and_out(l1, m)?;
        let l1 = Layout::contiguous_with_offset((n, k), l1.start_offset());
        let out = s1.matmul(s2, (1, n, m, k), &l1, &l2.transpose(0, 1)?)?;
        Ok((out, out_shape))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _t = super::profile::timer("linear bwd");
        let (need_x, need_w) = (tracked(x), tracked(w));
        let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32 && g.dtype() == DType::F32;
        let (m, k) = w.dims2()?;
        let n = x.elem_count() / k;
        if !cpu_f32 {
            let g2 = g.reshape((n, m))?;
            let dx = if need_x { Some(g2.matmul(&w.contiguous()?)?.reshape(x.shape())?) } else { None };
            let dw = if need_w { Some(g2.t()?.matmul(&x.reshape((n, k))?)?) } else { None };
            return Ok((dx, dw));
        }
        let dx = if need_x {
            let v = with_f32(g, |g| {
                with_f32(w, |w| {
                    let mut dx = vec![0f32; n * k];
                    sgemm(false, false, n, k, m, 1.0, g, m, w, k, 0.0, &mut dx, k, Threads::All);
                    dx
                })
            })??;
            Some(cpu_tensor(v, x.shape())?)
        } else {
            None
        };
        let dw = if need_w {
            let v = with_f32(g, |g| {
                with_f32(x, |x| {
                    let mut dw = vec![0f32; m * k];
                    sgemm(true, false, m, k, n, 1.0, g, m, x, k, 0.0, &mut dw, k, Threads::All);
                    dw
                })
            })??;
            Some(cpu_tensor(v, (m, k))?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::gradcheck::{assert_close, check_grads, rand_tensor};
    use candle_core::Var;

    #[test]
    fn linear_matches_matmul_and_finite_differences() -> Result<()> {
        let x = rand_tensor(&[2, 3, 5], 1)?;
        let w = rand_tensor(&[4, 5], 2)?;
        assert_close(&linear(&x, &w)?, &x.broadcast_matmul(&w.t()?)?, 1e-5, "linear vs matmul")?;
        check_grads("linear", &[x, w], |v| linear(&v[0], &v[1]))
    }

    #[test]
    fn frozen_weight_gets_no_gradient() -> Result<()> {
        let x = Var::from_tensor(&rand_tensor(&[3, 5], 1)?)?;
        let w = rand_tensor(&[4, 5], 2)?; // a plain tensor: frozen
        let loss = linear(x.as_tensor(), &w)?.sum_all()?;
        let grads = loss.backward()?;
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(&w).is_none(), "a frozen weight must not get a gradient");
        Ok(())
    }

    #[test]
    fn linear_rejects_mismatched_shapes() {
        let x = rand_tensor(&[3, 5], 1).unwrap();
        let w = rand_tensor(&[4, 6], 2).unwrap();
        let err = linear(&x, &w).unwrap_err().to_string();
        assert!(err.contains("does not end in 6"), "{err}");
    }
}
