//! AdamW with f32 moments and two parameter groups (with and without weight
//! decay), and the learning-rate schedule. The update follows PyTorch's
//! `torch.optim.AdamW` exactly (decoupled decay, bias corrections, ε outside
//! the square root), so runs compare step for step.
//!
//! On the CPU the update is one in-place pass over each parameter (a candle
//! `InplaceOp2`), with the moments kept as plain `Vec<f32>`; elsewhere it is
//! composed from tensor ops.
//!
//! Sharded ([`AdamW::shard`], ZeRO stage 1): each of N ranks owns a contiguous
//! share of the parameters, keeps the moments of those only and updates only them;
//! the trainer then gathers the updated weights. AdamW is element-wise, so the
//! result equals the unsharded update given the same summed gradients.

use super::config::Schedule;
use crate::model::TensorData;
use anyhow::{Context, Result, bail};
use candle_core::{CpuStorage, DType, Layout, Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Mutex;

/// AdamW hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay for the decaying group.
    pub weight_decay: f64,
}

enum Moments {
    Cpu(Vec<f32>, Vec<f32>),
    Device(Tensor, Tensor),
    /// Another rank owns this parameter's moments and update (sharded optimizer).
    Elsewhere,
}

struct Param {
    name: String,
    var: Var,
    decay: bool,
    moments: Moments,
}

/// The optimizer. Parameters whose name marks a norm or a bias get no weight decay.
pub struct AdamW {
    params: Vec<Param>,
    config: AdamWConfig,
    step: u64,
}

/// Whether weight decay applies to a parameter (not to norms and biases).
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm"))
}

impl AdamW {
    /// An optimizer over `vars` (name, variable), moments at zero.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                if var.dtype() != DType::F32 {
                    bail!("parameter {name} is {:?}: the optimizer keeps f32 master weights", var.dtype());
                }
                let n = var.elem_count();
                let moments = if var.device().is_cpu() {
                    Moments::Cpu(vec![0.0; n], vec![0.0; n])
                } else {
                    Moments::Device(var.zeros_like()?, var.zeros_like()?)
                };
                Ok(Param { decay: decays(&name), name, var, moments })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { params, config, step: 0 })
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The parameters, in order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// Number of trainable values.
    pub fn num_values(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// Shards the optimizer over `world` ranks as rank `rank` (ZeRO stage 1): the
    /// parameters are cut into `world` contiguous runs of about equal size (a
    /// parameter goes to the rank its middle value falls in); this rank keeps the
    /// moments of its own only. Returns each parameter's owner.
    pub fn shard(&mut self, rank: usize, world: usize) -> Vec<usize> {
        let total = self.num_values().max(1);
        let mut before = 0usize;
        let mut owners = Vec::with_capacity(self.params.len());
        for p in &mut self.params {
            let n = p.var.elem_count();
            let owner = (((before + n / 2) as u128 * world as u128) / total as u128).min(world as u128 - 1) as usize;
            before += n;
            if owner != rank {
                p.moments = Moments::Elsewhere;
            }
            owners.push(owner);
        }
        owners
    }

    /// Values whose moments this rank keeps (all, unless sharded).
    pub fn owned_values(&self) -> usize {
        self.params.iter().filter(|p| !matches!(p.moments, Moments::Elsewhere)).map(|p| p.var.elem_count()).sum()
    }

    /// Both moments of every parameter in one buffer (`exp_avg` then `exp_avg_sq`,
    /// parameter after parameter), zeros for the parameters another rank owns: summed
    /// across ranks, it is the whole optimizer state.
    pub fn moments_flat(&self) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(2 * self.num_values());
        for p in &self.params {
            match &p.moments {
                Moments::Cpu(m, v) => {
                    out.extend_from_slice(m);
                    out.extend_from_slice(v);
                }
                Moments::Device(m, v) => {
                    out.extend(m.flatten_all()?.to_vec1::<f32>()?);
                    out.extend(v.flatten_all()?.to_vec1::<f32>()?);
                }
                Moments::Elsewhere => out.resize(out.len() + 2 * p.var.elem_count(), 0.0),
            }
        }
        Ok(out)
    }

    /// [`AdamW::state_data`] from a whole-state buffer laid out as [`AdamW::moments_flat`].
    pub fn state_data_from<'a>(&self, flat: &'a [f32]) -> Vec<(String, TensorData<'a>)> {
        let mut out = Vec::new();
        let mut off = 0;
        for p in &self.params {
            let n = p.var.elem_count();
            out.push((format!("{}.exp_avg", p.name), TensorData::F32(&flat[off..off + n], p.var.dims().to_vec())));
            out.push((format!("{}.exp_avg_sq", p.name), TensorData::F32(&flat[off + n..off + 2 * n], p.var.dims().to_vec())));
            off += 2 * n;
        }
        out
    }

    /// The L2 norm of all gradients together (`grads[i]` belongs to parameter `i`;
    /// a missing gradient counts as zero).
    pub fn grad_norm(&self, grads: &[Option<Tensor>]) -> Result<f64> {
        let mut total = 0f64;
        for g in grads.iter().flatten() {
            total += if g.device().is_cpu() && g.dtype() == DType::F32 {
                // One pass over the gradient, no temporaries; chunk sums are added in
                // order, so the result does not depend on thread scheduling.
                crate::model::ops::with_f32(g, |v| {
                    let parts: Vec<f64> = v.par_chunks(1 << 16).map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()).collect();
                    parts.iter().sum::<f64>()
                })?
            } else {
                g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?
            };
        }
        Ok(total.sqrt())
    }

    /// One update with learning rate `lr`; every gradient is multiplied by
    /// `grad_scale` first (gradient clipping).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64, grad_scale: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            bail!("optimizer: {} gradients for {} parameters", grads.len(), self.params.len());
        }
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            if matches!(p.moments, Moments::Elsewhere) {
                continue;
            }
            let wd = if p.decay { c.weight_decay } else { 0.0 };
            match &mut p.moments {
                Moments::Cpu(m, v) => {
                    let g = g.to_dtype(DType::F32)?.contiguous()?;
                    let op = AdamKernel {
                        m: Mutex::new(std::mem::take(m)),
                        v: Mutex::new(std::mem::take(v)),
                        lr,
                        wd,
                        beta1: c.beta1,
                        beta2: c.beta2,
                        eps: c.eps,
                        bc1,
                        bc2,
                        grad_scale,
                    };
                    let r = p.var.as_tensor().inplace_op2(&g, &op);
                    *m = op.m.into_inner().unwrap_or_default();
                    *v = op.v.into_inner().unwrap_or_default();
                    r.with_context(|| format!("optimizer update of {}", p.name))?;
                }
                Moments::Device(m, v) => {
                    let g = (g.to_dtype(DType::F32)? * grad_scale)?;
                    let theta = p.var.as_tensor();
                    let theta = if wd > 0.0 { (theta * (1.0 - lr * wd))? } else { theta.clone() };
                    *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                    *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
                    let upd = ((&*m / denom)? * (lr / bc1))?;
                    p.var.set(&(theta - upd)?.detach())?;
                }
                Moments::Elsewhere => {}
            }
        }
        Ok(())
    }

    /// The moments as named entries (`NAME.exp_avg`, `NAME.exp_avg_sq`) for a checkpoint's
    /// `optimizer.safetensors`; CPU moments are borrowed, not copied (for full fine-tuning
    /// they are twice the model's size). A sharded optimizer has only its own: use
    /// [`AdamW::state_data_from`] with the gathered state instead.
    pub fn state_data(&self) -> Vec<(String, TensorData<'_>)> {
        let mut out = Vec::new();
        for p in &self.params {
            let (m, v) = match &p.moments {
                Moments::Cpu(m, v) => (TensorData::F32(m, p.var.dims().to_vec()), TensorData::F32(v, p.var.dims().to_vec())),
                Moments::Device(m, v) => (TensorData::Tensor(m.clone()), TensorData::Tensor(v.clone())),
                Moments::Elsewhere => continue,
            };
            out.push((format!("{}.exp_avg", p.name), m));
            out.push((format!("{}.exp_avg_sq", p.name), v));
        }
        out
    }

    /// Restores moments saved from [`AdamW::state_data`] and the step count.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for p in &mut self.params {
            let mut take = |suffix: &str| -> Result<Tensor> {
                let key = format!("{}.{suffix}", p.name);
                let t = tensors.remove(&key).with_context(|| {
                    format!("the optimizer state has no `{key}`: the checkpoint belongs to a different model or LoRA setup")
                })?;
                if t.shape() != p.var.shape() {
                    bail!("optimizer state `{key}` has shape {:?}, the parameter {:?}", t.dims(), p.var.dims());
                }
                Ok(t.to_dtype(DType::F32)?)
            };
            let (m, v) = (take("exp_avg")?, take("exp_avg_sq")?);
            p.moments = match &p.moments {
                Moments::Cpu(..) => Moments::Cpu(m.flatten_all()?.to_vec1()?, v.flatten_all()?.to_vec1()?),
                Moments::Device(..) => Moments::Device(m.to_device(p.var.device())?, v.to_device(p.var.device())?),
                Moments::Elsewhere => Moments::Elsewhere,
            };
        }
        self.step = steps;
        Ok(())
    }
}

struct AdamKernel {
    m: Mutex<Vec<f32>>,
    v: Mutex<Vec<f32>>,
    lr: f64,
    wd: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    bc1: f64,
    bc2: f64,
    grad_scale: f64,
}

impl candle_core::InplaceOp2 for AdamKernel {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(theta), CpuStorage::F32(grad)) = (s1, s2) else {
            candle_core::bail!("adamw: f32 parameters and gradients expected");
        };
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("adamw: contiguous parameters and gradients expected");
        };
        let theta = &mut theta[a0..a1];
        let grad = &grad[b0..b1];
        let mut m = self.m.lock().map_err(|_| candle_core::Error::Msg("adamw: poisoned".into()))?;
        let mut v = self.v.lock().map_err(|_| candle_core::Error::Msg("adamw: poisoned".into()))?;
        if theta.len() != grad.len() || m.len() != theta.len() || v.len() != theta.len() {
            candle_core::bail!("adamw: parameter, gradient and moments differ in size");
        }
        // PyTorch's single-tensor AdamW, in f32 like its CPU kernels.
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let decay = (1.0 - self.lr * self.wd) as f32;
        let step_size = (self.lr / self.bc1) as f32;
        let bc2_sqrt = self.bc2.sqrt() as f32;
        let eps = self.eps as f32;
        let gs = self.grad_scale as f32;
        const CHUNK: usize = 1 << 14;
        theta
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((th, g), (m, v))| {
                for i in 0..th.len() {
                    let gi = g[i] * gs;
                    th[i] *= decay;
                    m[i] = m[i] * b1 + gi * (1.0 - b1);
                    v[i] = v[i] * b2 + gi * gi * (1.0 - b2);
                    let denom = v[i].sqrt() / bc2_sqrt + eps;
                    th[i] -= step_size * m[i] / denom;
                }
            });
        Ok(())
    }
}

/// The learning rate at optimizer step `step` (0-based) of `total`: linear
/// warmup from 0 over `warmup` steps, then the schedule down to
/// `min_ratio × peak` at the last step (Hugging Face's `get_*_schedule_with_warmup`).
pub fn learning_rate(schedule: Schedule, peak: f64, step: usize, total: usize, warmup: usize, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay_steps).clamp(0.0, 1.0);
    let factor = match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => 1.0 - progress,
        Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    };
    peak * (min_ratio + (1.0 - min_ratio) * factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Reference AdamW written out in f64 for one scalar parameter sequence.
    fn reference(theta0: f64, grads: &[f64], lr: f64, wd: f64) -> f64 {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let (mut th, mut m, mut v) = (theta0, 0.0, 0.0);
        for (i, g) in grads.iter().enumerate() {
            let t = (i + 1) as i32;
            th *= 1.0 - lr * wd;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let denom = (v.sqrt() / (1.0 - b2.powi(t)).sqrt()) + eps;
            th -= lr / (1.0 - b1.powi(t)) * m / denom;
        }
        th
    }

    #[test]
    fn adamw_matches_the_reference_and_skips_decay_on_norms() -> Result<()> {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let w = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5], &Device::Cpu)?)?;
        let n = Var::from_tensor(&Tensor::new(&[1.0f32, 1.0, 1.0], &Device::Cpu)?)?;
        let mut opt = AdamW::new(vec![("layer.weight".into(), w.clone()), ("layer.norm.weight".into(), n.clone())], cfg)?;
        let gseq = [[0.5f32, -1.0, 2.0], [0.1, 0.3, -0.2], [-0.4, 0.0, 1.0]];
        for g in gseq {
            let gt = Tensor::new(&g, &Device::Cpu)?;
            opt.step(&[Some(gt.clone()), Some(gt)], 0.01, 1.0)?;
        }
        let got_w = w.as_tensor().to_vec1::<f32>()?;
        let got_n = n.as_tensor().to_vec1::<f32>()?;
        for i in 0..3 {
            let gs: Vec<f64> = gseq.iter().map(|g| g[i] as f64).collect();
            let th0 = [1.0, -2.0, 0.5][i];
            assert!((got_w[i] as f64 - reference(th0, &gs, 0.01, 0.1)).abs() < 1e-6, "decayed param {i}");
            assert!((got_n[i] as f64 - reference(1.0, &gs, 0.01, 0.0)).abs() < 1e-6, "norm param {i}");
        }
        let gs = [Some(Tensor::new(&[3.0f32, 4.0], &Device::Cpu)?), None, Some(Tensor::new(&[12.0f32], &Device::Cpu)?)];
        assert_eq!(opt.grad_norm(&gs)?, 13.0);
        // State round trip: a fresh optimizer loaded with the state continues identically.
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("optimizer.safetensors");
        crate::model::write_safetensors_data(&file, opt.state_data())?;
        let state: HashMap<_, _> = candle_core::safetensors::load(&file, &Device::Cpu)?;
        assert_eq!(state.len(), 4);
        let w2 = Var::from_tensor(&w.as_tensor().copy()?)?;
        let mut opt2 = AdamW::new(vec![("layer.weight".into(), w2.clone())], cfg)?;
        let mut st = state.clone();
        st.retain(|k, _| k.starts_with("layer.weight"));
        opt2.load_state(st, opt.steps())?;
        let g = Tensor::new(&[0.2f32, 0.2, 0.2], &Device::Cpu)?;
        opt.step(&[Some(g.clone()), Some(g.clone())], 0.01, 0.5)?;
        opt2.step(&[Some(g)], 0.01, 0.5)?;
        assert_eq!(w.as_tensor().to_vec1::<f32>()?, w2.as_tensor().to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn schedules_warm_up_then_decay_to_the_floor() {
        let lr = |s, step| learning_rate(s, 1.0, step, 110, 10, 0.1);
        assert_eq!(lr(Schedule::Cosine, 0), 0.0);
        assert!((lr(Schedule::Cosine, 5) - 0.5).abs() < 1e-12);
        assert!((lr(Schedule::Cosine, 10) - 1.0).abs() < 1e-12);
        assert!((lr(Schedule::Cosine, 60) - 0.55).abs() < 1e-12);
        assert!((lr(Schedule::Linear, 60) - 0.55).abs() < 1e-12);
        assert!((lr(Schedule::Cosine, 110) - 0.1).abs() < 1e-12);
        assert_eq!(lr(Schedule::Constant, 100), 1.0);
    }
}
