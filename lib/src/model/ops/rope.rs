//! Rotary position embeddings in Hugging Face's layout ("rotate half": the first and
//! second halves of each head are the two coordinates of each rotated pair), with
//! per-token positions so that packed sequences restart at 0.

use super::{cpu_tensor, fusable, par_rows, slice_f32, with_f32};
use crate::model::config::{LlamaConfig, RopeScaling};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// The rotary frequencies of a model (after any rope scaling).
#[derive(Clone, Debug)]
pub struct RopeTable {
    inv_freq: Vec<f32>,
    /// Multiplies cos and sin (1 except for scalings that say otherwise).
    attention_scaling: f32,
    /// Positions are divided by this ("linear" scaling), 1 otherwise.
    position_divisor: f32,
}

impl RopeTable {
    /// Frequencies for `config`: base `rope_theta`, `head_dim`, and `rope_scaling`
    /// (`default`, `linear` or `llama3`; other kinds are rejected when the config is validated).
    pub fn new(config: &LlamaConfig) -> Self {
        let d = config.head_dim();
        let base = config.rope_theta;
        let mut inv_freq: Vec<f32> =
            (0..d / 2).map(|i| (1.0 / base.powf((2 * i) as f64 / d as f64)) as f32).collect();
        let mut position_divisor = 1.0;
        match &config.rope_scaling {
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let freq = *f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    let scaled = if wavelen < high_wavelen {
                        freq
                    } else if wavelen > low_wavelen {
                        freq / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    };
                    *f = scaled as f32;
                }
            }
            Some(RopeScaling::Linear { factor }) => position_divisor = *factor as f32,
            Some(RopeScaling::Frequencies { divisors }) => {
                for (f, d) in inv_freq.iter_mut().zip(divisors) {
                    *f = (*f as f64 / d) as f32;
                }
            }
            None => {}
        }
        Self { inv_freq, attention_scaling: 1.0, position_divisor }
    }

    /// Half the head dimension.
    pub fn half(&self) -> usize {
        self.inv_freq.len()
    }

    /// The rotation for a `[batch, seq]` grid of positions (row-major in `positions`).
    pub fn at(&self, positions: &[u32], batch: usize, seq: usize) -> Result<Rope> {
        if positions.len() != batch * seq {
            candle_core::bail!("rope: {} positions given for a batch of {batch}×{seq}", positions.len());
        }
        let half = self.half();
        let mut cos = vec![0f32; positions.len() * half];
        let mut sin = vec![0f32; positions.len() * half];
        for (r, &p) in positions.iter().enumerate() {
            let p = p as f32 / self.position_divisor;
            for i in 0..half {
                let a = p * self.inv_freq[i];
                cos[r * half + i] = a.cos() * self.attention_scaling;
                sin[r * half + i] = a.sin() * self.attention_scaling;
            }
        }
        Ok(Rope { cos: Arc::new(cos), sin: Arc::new(sin), batch, seq, half })
    }
}

/// Precomputed cos/sin for one batch of positions; applies to `[batch, seq, heads, head_dim]`.
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    batch: usize,
    seq: usize,
    half: usize,
}

impl Rope {
    /// Rotates `x`: `[batch, seq, heads, head_dim]`, or `[batch, seq, heads·head_dim]` as a
    /// projection produces it. Differentiable.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let d = 2 * self.half;
        let per_row = if dims.len() >= 3 { dims[2..].iter().product::<usize>() } else { 0 };
        if dims.len() < 3 || dims[0] != self.batch || dims[1] != self.seq || per_row % d != 0 || (dims.len() == 4 && dims[3] != d) {
            candle_core::bail!(
                "rope: input {:?} does not match positions for batch {}×{} and head_dim {d}",
                dims,
                self.batch,
                self.seq,
            );
        }
        if fusable(x) {
            return x.contiguous()?.apply_op1(RopeOp { rope: self.clone(), inverse: false });
        }
        if dims.len() == 3 {
            let x4 = x.reshape((self.batch, self.seq, per_row / d, d))?;
            return self.apply_composed(&x4)?.reshape(dims);
        }
        self.apply_composed(x)
    }

    /// The same rotation from differentiable candle ops.
    pub fn apply_composed(&self, x: &Tensor) -> Result<Tensor> {
        let shape = (self.batch, self.seq, 1, self.half);
        let cos = Tensor::from_slice(&self.cos, shape, &Device::Cpu)?.to_device(x.device())?.to_dtype(x.dtype())?;
        let sin = Tensor::from_slice(&self.sin, shape, &Device::Cpu)?.to_device(x.device())?.to_dtype(x.dtype())?;
        let x1 = x.narrow(3, 0, self.half)?;
        let x2 = x.narrow(3, self.half, self.half)?;
        let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let b = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Tensor::cat(&[a, b], 3)
    }
}

struct RopeOp {
    rope: Rope,
    inverse: bool,
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "tunebook-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _t = super::profile::timer("rope");
        let x = slice_f32("rope", s, l)?;
        let half = self.rope.half;
        let d = 2 * half;
        let heads = l.shape().elem_count() / (self.rope.batch * self.rope.seq) / d;
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        let mut out = vec![0f32; x.len()];
        let (cos, sin) = (&self.rope.cos, &self.rope.sin);
        par_rows(&mut out, heads * d, |r, o| {
            let c = &cos[r * half..(r + 1) * half];
            let sn = &sin[r * half..(r + 1) * half];
            let xr = &x[r * heads * d..(r + 1) * heads * d];
            for h in 0..heads {
                let xh = &xr[h * d..(h + 1) * d];
                let oh = &mut o[h * d..(h + 1) * d];
                for i in 0..half {
                    let (x1, x2) = (xh[i], xh[i + half]);
                    let s = sign * sn[i];
                    oh[i] = x1 * c[i] - x2 * s;
                    oh[i + half] = x2 * c[i] + x1 * s;
                }
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // The rotation is orthogonal: its adjoint is the rotation by −θ.
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let shape = g.shape().clone();
        let v = with_f32(&g, |v| v.to_vec())?;
        let t = cpu_tensor(v, shape)?;
        Ok(Some(t.apply_op1_no_bwd(&RopeOp { rope: self.rope.clone(), inverse: !self.inverse })?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::LlamaConfig;
    use crate::model::ops::gradcheck::{assert_close, check_grads, rand_tensor};

    #[test]
    fn rope_fused_matches_composed_and_finite_differences() -> Result<()> {
        let mut cfg = LlamaConfig::tiny();
        cfg.hidden_size = 16;
        cfg.num_attention_heads = 2;
        let table = RopeTable::new(&cfg);
        let rope = table.at(&[0, 1, 2, 0, 1, 5, 6, 7], 2, 4)?;
        let x = rand_tensor(&[2, 4, 2, 8], 3)?;
        assert_close(&rope.apply(&x)?, &rope.apply_composed(&x)?, 1e-5, "rope fused vs composed")?;
        let flat = rope.apply(&x.reshape((2, 4, 16))?)?;
        assert_close(&flat.reshape((2, 4, 2, 8))?, &rope.apply(&x)?, 0.0, "rope on [b, t, h·d]")?;
        check_grads("rope fused", &[x.clone()], |v| rope.apply(&v[0]))?;
        check_grads("rope composed", &[x], |v| rope.apply_composed(&v[0]))?;
        Ok(())
    }

    #[test]
    fn rope_position_zero_is_identity_and_positions_are_per_row() -> Result<()> {
        let cfg = LlamaConfig::tiny();
        let d = cfg.head_dim();
        let table = RopeTable::new(&cfg);
        let x = rand_tensor(&[1, 2, 1, d], 4)?;
        let same = Tensor::cat(&[x.narrow(1, 0, 1)?, x.narrow(1, 0, 1)?], 1)?;
        let y = table.at(&[0, 0], 1, 2)?.apply(&same)?;
        assert_close(&y, &same, 1e-6, "position 0")?;
        let y = table.at(&[3, 3], 1, 2)?.apply(&same)?;
        assert_close(&y.narrow(1, 0, 1)?, &y.narrow(1, 1, 1)?, 1e-6, "same position, same rotation")?;
        Ok(())
    }

    #[test]
    fn llama3_scaling_lowers_only_low_frequencies() {
        let mut cfg = LlamaConfig::tiny();
        let plain = RopeTable::new(&cfg);
        cfg.rope_theta = 500000.0;
        cfg.rope_scaling = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        let mut base = cfg.clone();
        base.rope_scaling = None;
        let unscaled = RopeTable::new(&base);
        let scaled = RopeTable::new(&cfg);
        assert_eq!(scaled.inv_freq[0], unscaled.inv_freq[0], "highest frequency unchanged");
        let last = scaled.half() - 1;
        assert!((scaled.inv_freq[last] * 8.0 - unscaled.inv_freq[last]).abs() < 1e-9, "lowest frequency divided by factor");
        assert!(plain.half() > 0);
    }
}
