//! Finite-difference gradient checks for the ops (tests only).

use candle_core::{DType, Device, Result, Tensor, Var};

/// A deterministic pseudo-random f32 tensor in [-1, 1).
pub fn rand_tensor(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// Asserts that two tensors agree elementwise within `tol` (absolute, scaled by max(1, |b|)).
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) -> Result<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let a = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= tol * y.abs().max(1.0), "{what}: element {i}: {x} vs {y}");
    }
    Ok(())
}

fn weighted_sum(out: &Tensor, weights: &[f32]) -> Result<f64> {
    let o = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(o.iter().zip(weights).map(|(a, b)| *a as f64 * *b as f64).sum())
}

/// Checks the gradient of `sum(f(inputs) · R)` (R a fixed random tensor) with respect
/// to every input against central finite differences, on up to 48 elements of each.
/// Inputs whose gradient must be absent (e.g. integer tensors) are not passed here.
pub fn check_grads(name: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> Result<()> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts)?;
    let r = rand_tensor(out.dims(), 99)?;
    let weights = r.flatten_all()?.to_vec1::<f32>()?;
    let loss = (out.to_dtype(DType::F32)? * &r)?.sum_all()?;
    let grads = loss.backward()?;
    let h = 1e-2f32;
    for (vi, var) in vars.iter().enumerate() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: input {vi} received no gradient"))
            .flatten_all()?
            .to_vec1::<f32>()?;
        let base = inputs[vi].flatten_all()?.to_vec1::<f32>()?;
        let n = base.len();
        let step = (n / 48).max(1);
        let gmax = g.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        for i in (0..n).step_by(step) {
            let eval = |delta: f32| -> Result<f64> {
                let mut p = base.clone();
                p[i] += delta;
                let mut args: Vec<Tensor> = inputs.to_vec();
                args[vi] = Tensor::from_vec(p, inputs[vi].shape(), &Device::Cpu)?;
                weighted_sum(&f(&args)?, &weights)
            };
            let num = ((eval(h)? - eval(-h)?) / (2.0 * h as f64)) as f32;
            let ana = g[i];
            let err = (num - ana).abs();
            assert!(
                err <= 2e-2 * gmax + 2e-2 * ana.abs(),
                "{name}: d/d input{vi}[{i}]: analytic {ana}, numeric {num} (max |grad| {gmax})"
            );
        }
    }
    Ok(())
}
