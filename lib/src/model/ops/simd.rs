//! Vectorised `exp` for the softmax and SiLU kernels.
//!
//! Cephes' single-precision polynomial (about 1 ulp on the range that matters), with
//! inputs below −87 flushed to exactly 0 so masked scores contribute nothing.

/// `x ← exp(x)` elementwise.
pub fn exp_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked above).
        unsafe { exp_avx512(x) };
        return;
    }
    for v in x.iter_mut() {
        *v = if *v < -87.0 { 0.0 } else { v.exp() };
    }
}

/// `x ← exp(x − shift)` elementwise; returns the sum of the results.
pub fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
    for v in x.iter_mut() {
        *v -= shift;
    }
    exp_inplace(x);
    let mut acc = [0f32; 16];
    let n = x.len() / 16 * 16;
    for c in x[..n].chunks_exact(16) {
        for j in 0..16 {
            acc[j] += c[j];
        }
    }
    acc.iter().sum::<f32>() + x[n..].iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let mut i = 0;
    let log2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
    let c1 = _mm512_set1_ps(0.693_359_4);
    let c2 = _mm512_set1_ps(-2.121_944_4e-4);
    let p = [1.987_569_1e-4f32, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1].map(|v| _mm512_set1_ps(v));
    let one = _mm512_set1_ps(1.0);
    let lo = _mm512_set1_ps(-87.0);
    let hi = _mm512_set1_ps(88.37);
    // SAFETY: loads and stores stay below n.
    unsafe {
        while i + 16 <= n {
            let ptr = x.as_mut_ptr().add(i);
            let v = _mm512_loadu_ps(ptr);
            let under = _mm512_cmp_ps_mask(v, lo, _CMP_LT_OQ);
            let v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
            let k = _mm512_roundscale_ps(_mm512_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            let r = _mm512_sub_ps(_mm512_sub_ps(v, _mm512_mul_ps(k, c1)), _mm512_mul_ps(k, c2));
            let mut y = p[0];
            for c in &p[1..] {
                y = _mm512_fmadd_ps(y, r, *c);
            }
            let r2 = _mm512_mul_ps(r, r);
            y = _mm512_add_ps(_mm512_fmadd_ps(y, r2, r), one);
            let e = _mm512_scalef_ps(y, k);
            _mm512_storeu_ps(ptr, _mm512_mask_mov_ps(e, under, _mm512_setzero_ps()));
            i += 16;
        }
    }
    for v in &mut x[i..] {
        *v = if *v < -87.0 { 0.0 } else { v.exp() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_exp_matches_std_within_two_ulp() {
        let xs: Vec<f32> = (0..4000).map(|i| -100.0 + i as f32 * 0.0471).collect();
        let mut y = xs.clone();
        exp_inplace(&mut y);
        for (x, e) in xs.iter().zip(&y) {
            if *x < -87.0 {
                assert_eq!(*e, 0.0);
                continue;
            }
            let want = x.exp();
            assert!((e - want).abs() <= 2.5e-7 * want, "exp({x}) = {e}, want {want}");
        }
        let mut row = vec![1f32, 2.0, 3.0, f32::NEG_INFINITY];
        let s = exp_shifted_sum(&mut row, 3.0);
        assert!((s - (1.0 + (-1f32).exp() + (-2f32).exp())).abs() < 1e-6);
        assert_eq!(row[3], 0.0);
    }
}
