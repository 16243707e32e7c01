//! RMSNorm: `y = x / sqrt(mean(x²) + eps) · w` over the last dimension.

use super::{cpu_tensor, fusable, par_rows, slice_f32, tracked, with_f32};
use candle_core::{CpuStorage, CustomOp2, D, DType, Layout, Result, Shape, Tensor};

/// RMSNorm of `x` (`[.., H]`) with weight `w` (`[H]`), computed in f32 as Hugging
/// Face Llama does (the input is upcast, the result cast back to `x`'s dtype).
/// Differentiable in `x` and `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dim(D::Minus1)?;
    if w.dims() != [h] {
        candle_core::bail!("rms_norm: weight has shape {:?}, expected [{h}] to match the input's last dimension", w.dims());
    }
    if fusable(x) && w.dtype() == DType::F32 {
        let x = x.contiguous()?;
        return x.apply_op2(&w.contiguous()?, RmsNormOp { eps: eps as f32 });
    }
    rms_norm_composed(x, w, eps)
}

/// The same computation from candle ops whose backward candle derives.
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.to_dtype(dtype)?.broadcast_mul(&w.to_dtype(dtype)?)
}

struct RmsNormOp {
    eps: f32,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "tunebook-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let _t = super::profile::timer("rms_norm fwd");
        let x = slice_f32("rms_norm", s1, l1)?;
        let w = slice_f32("rms_norm", s2, l2)?;
        let h = w.len();
        let mut out = vec![0f32; x.len()];
        let eps = self.eps;
        par_rows(&mut out, h, |r, o| {
            let xr = &x[r * h..(r + 1) * h];
            let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
            let inv = 1.0 / (ss + eps).sqrt();
            for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
                *o = xv * inv * wv;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _t = super::profile::timer("rms_norm bwd");
        let need_x = tracked(x);
        let need_w = tracked(w);
        let h = w.elem_count();
        let eps = self.eps;
        let (dx, dw) = with_f32(x, |x| {
            with_f32(w, |w| {
                with_f32(g, |g| {
                    let rows = x.len() / h;
                    let mut dx = if need_x { vec![0f32; x.len()] } else { Vec::new() };
                    if need_x {
                        par_rows(&mut dx, h, |r, d| {
                            let xr = &x[r * h..(r + 1) * h];
                            let gr = &g[r * h..(r + 1) * h];
                            let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
                            let inv = 1.0 / (ss + eps).sqrt();
                            // dx = inv·(g·w) − x·inv³/H · Σ(g·w·x)
                            let dot: f32 = gr.iter().zip(w).zip(xr).map(|((g, w), x)| g * w * x).sum();
                            let c = inv * inv * inv * dot / h as f32;
                            for i in 0..h {
                                d[i] = inv * gr[i] * w[i] - xr[i] * c;
                            }
                        });
                    }
                    let dw = if need_w {
                        let mut dw = vec![0f32; h];
                        for r in 0..rows {
                            let xr = &x[r * h..(r + 1) * h];
                            let gr = &g[r * h..(r + 1) * h];
                            let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
                            let inv = 1.0 / (ss + eps).sqrt();
                            for i in 0..h {
                                dw[i] += gr[i] * xr[i] * inv;
                            }
                        }
                        Some(dw)
                    } else {
                        None
                    };
                    (if need_x { Some(dx) } else { None }, dw)
                })
            })
        })???;
        let dx = dx.map(|v| cpu_tensor(v, x.shape())).transpose()?;
        let dw = dw.map(|v| cpu_tensor(v, w.shape())).transpose()?;
        Ok((dx, dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::gradcheck::{check_grads, rand_tensor};

    #[test]
    fn rms_norm_fused_matches_composed_and_finite_differences() -> Result<()> {
        let x = rand_tensor(&[2, 3, 8], 1)?;
        let w = (rand_tensor(&[8], 2)? + 1.0)?;
        let a = rms_norm(&x, &w, 1e-5)?;
        let b = rms_norm_composed(&x, &w, 1e-5)?;
        crate::model::ops::gradcheck::assert_close(&a, &b, 1e-5, "rms_norm fused vs composed")?;
        check_grads("rms_norm fused", &[x.clone(), w.clone()], |v| rms_norm(&v[0], &v[1], 1e-5))?;
        check_grads("rms_norm composed", &[x, w], |v| rms_norm_composed(&v[0], &v[1], 1e-5))?;
        Ok(())
    }
}
