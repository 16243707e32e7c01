//! SwiGLU gate: `silu(gate) · up`.

use super::{cpu_tensor, fusable, par_rows, slice_f32, tracked, with_f32};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `silu(gate) · up` elementwise (same shapes). Differentiable in both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        candle_core::bail!("swiglu: gate {:?} and up {:?} must have the same shape", gate.dims(), up.dims());
    }
    if fusable(gate) && up.dtype() == DType::F32 {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwigluOp);
    }
    swiglu_composed(gate, up)
}

/// The same from candle ops.
pub fn swiglu_composed(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

struct SwigluOp;

const ROW: usize = 4096;

impl CustomOp2 for SwigluOp {
    fn name(&self) -> &'static str {
        "tunebook-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let _t = super::profile::timer("swiglu fwd");
        let g = slice_f32("swiglu", s1, l1)?;
        let u = slice_f32("swiglu", s2, l2)?;
        let mut out = vec![0f32; g.len()];
        let n = g.len();
        let (body, tail) = out.split_at_mut(n - n % ROW);
        let f = |off: usize, o: &mut [f32]| {
            // o ← exp(−x), then x·u / (1 + exp(−x))
            for (i, o) in o.iter_mut().enumerate() {
                *o = -g[off + i];
            }
            super::simd::exp_inplace(o);
            for (i, o) in o.iter_mut().enumerate() {
                *o = g[off + i] * u[off + i] / (1.0 + *o);
            }
        };
        par_rows(body, ROW, |r, o| f(r * ROW, o));
        f(n - n % ROW, tail);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _t = super::profile::timer("swiglu bwd");
        let (need_g, need_u) = (tracked(gate), tracked(up));
        let grad = grad.to_dtype(DType::F32)?;
        let (dg, du) = with_f32(gate, |g| {
            with_f32(up, |u| {
                with_f32(&grad, |d| {
                    let n = g.len();
                    let mut dg = vec![0f32; if need_g { n } else { 0 }];
                    let mut du = vec![0f32; if need_u { n } else { 0 }];
                    if need_g {
                        let f = |off: usize, o: &mut [f32]| {
                            for (i, o) in o.iter_mut().enumerate() {
                                *o = -g[off + i];
                            }
                            super::simd::exp_inplace(o);
                            for (i, o) in o.iter_mut().enumerate() {
                                let x = g[off + i];
                                let s = 1.0 / (1.0 + *o);
                                *o = d[off + i] * u[off + i] * s * (1.0 + x * (1.0 - s));
                            }
                        };
                        let (body, tail) = dg.split_at_mut(n - n % ROW);
                        par_rows(body, ROW, |r, o| f(r * ROW, o));
                        f(n - n % ROW, tail);
                    }
                    if need_u {
                        let f = |off: usize, o: &mut [f32]| {
                            for (i, o) in o.iter_mut().enumerate() {
                                *o = -g[off + i];
                            }
                            super::simd::exp_inplace(o);
                            for (i, o) in o.iter_mut().enumerate() {
                                *o = d[off + i] * g[off + i] / (1.0 + *o);
                            }
                        };
                        let (body, tail) = du.split_at_mut(n - n % ROW);
                        par_rows(body, ROW, |r, o| f(r * ROW, o));
                        f(n - n % ROW, tail);
                    }
                    (dg, du)
                })
            })
        })???;
        let dg = if need_g { Some(cpu_tensor(dg, gate.shape())?) } else { None };
        let du = if need_u { Some(cpu_tensor(du, up.shape())?) } else { None };
        Ok((dg, du))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::gradcheck::{assert_close, check_grads, rand_tensor};

    #[test]
    fn swiglu_fused_matches_composed_and_finite_differences() -> Result<()> {
        let g = (rand_tensor(&[3, 4097], 5)? * 3.0)?;
        let u = rand_tensor(&[3, 4097], 6)?;
        assert_close(&swiglu(&g, &u)?, &swiglu_composed(&g, &u)?, 1e-5, "swiglu fused vs composed")?;
        let g = (rand_tensor(&[2, 7], 5)? * 3.0)?;
        let u = rand_tensor(&[2, 7], 6)?;
        check_grads("swiglu fused", &[g.clone(), u.clone()], |v| swiglu(&v[0], &v[1]))?;
        check_grads("swiglu composed", &[g, u], |v| swiglu_composed(&v[0], &v[1]))?;
        Ok(())
    }
}
