//! The k-quant block formats (Q4_K, Q5_K, Q6_K) as `llama-quantize` writes them without
//! an importance matrix: ggml's reference quantizers (`quantize_row_q{4,5,6}_K_ref`),
//! in f32 arithmetic in ggml's order of operations.
//!
//! candle's own `from_float` for these types uses an older search (`make_qkx1_quants`)
//! that rounds worse; these follow ggml: a weighted least-squares search over scale and
//! minimum per 32-value sub-block (`make_qkx2_quants`) for Q4_K/Q5_K, and an
//! `x²`-weighted symmetric search per 16-value sub-block (`make_qx_quants`) for Q6_K,
//! then every value quantized again with the 6/8-bit scales as stored.

use half::f16;

/// Values per super-block.
pub const QK_K: usize = 256;

/// Round to nearest, ties to even, as ggml's `nearest_int` (valid for |f| ≤ 4194303).
fn nearest_int(f: f32) -> i32 {
    let val = f + 12_582_912.0;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// Asymmetric quantization of `x` to `0..=nmax` with a weighted least-squares search
/// over `nstep + 1` candidate scales (ggml's `make_qkx2_quants`). Returns the scale and
/// writes the levels to `l` and the (non-negative) minimum to `the_min`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(nmax: i32, x: &[f32], weights: &[f32], l: &mut [u8], the_min: &mut f32, laux: &mut [u8], rmin: f32, rdelta: f32, nstep: i32) -> f32 {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        *the_min = -min;
        return 0.0;
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let w = weights[i];
            let lf = q as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    scale
}

/// Symmetric quantization of `x` to `-nmax..nmax` (stored `+ nmax`), weights `x²`, with
/// ggml's search over 18 nearby scales (`make_qx_quants`, `rmse_type = 1`).
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [u8]) -> f32 {
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < 1e-15 {
        l[..x.len()].fill(0);
        return 0.0;
    }
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let levels = |iscale: f32, l: &mut [u8]| {
        for (o, &v) in l.iter_mut().zip(x) {
            *o = (nmax + nearest_int(iscale * v).clamp(-nmax, nmax - 1)) as u8;
        }
    };
    let iscale = -(nmax as f32) / max;
    levels(iscale, l);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            levels(iscale, l);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// The 6-bit scale and minimum of sub-block `j` from a Q4_K/Q5_K `scales` array.
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Scales, minimums and levels of one Q4_K / Q5_K super-block.
fn k4_block(xb: &[f32], nmax: i32, rmin: f32, nstep: i32, levels: &mut [u8; QK_K]) -> (f16, f16, [u8; 12]) {
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let mut mins = [0f32; 8];
    let mut scales = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &xb[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        scales[j] = make_qkx2_quants(nmax, xs, &weights, &mut levels[32 * j..32 * j + 32], &mut mins[j], &mut laux, rmin, 0.1, nstep);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut sc = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &sc);
        let dd = d.to_f32() * s as f32;
        if dd == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for ii in 0..32 {
            levels[32 * j + ii] = nearest_int((xb[32 * j + ii] + dm) / dd).clamp(0, nmax) as u8;
        }
    }
    (d, dmin, sc)
}

/// Q4_K blocks (144 bytes per 256 values: f16 d, f16 dmin, 12 bytes of 6-bit scales
/// and minimums, 128 bytes of 4-bit levels).
pub fn quantize_q4_k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK_K * 144);
    let mut levels = [0u8; QK_K];
    for xb in x.chunks_exact(QK_K) {
        let (d, dmin, sc) = k4_block(xb, 15, -1.0, 20, &mut levels);
        out.extend(d.to_le_bytes());
        out.extend(dmin.to_le_bytes());
        out.extend(sc);
        for c in 0..4 {
            for l in 0..32 {
                out.push(levels[64 * c + l] | (levels[64 * c + l + 32] << 4));
            }
        }
    }
    out
}

/// Q5_K blocks (176 bytes per 256 values: d, dmin, scales, 32 bytes of high bits, 128
/// bytes of low nibbles).
pub fn quantize_q5_k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK_K * 176);
    let mut levels = [0u8; QK_K];
    for xb in x.chunks_exact(QK_K) {
        let (d, dmin, sc) = k4_block(xb, 31, -0.5, 15, &mut levels);
        let mut qh = [0u8; 32];
        let mut qs = [0u8; 128];
        for c in 0..4 {
            let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
            for j in 0..32 {
                let mut l1 = levels[64 * c + j];
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                let mut l2 = levels[64 * c + j + 32];
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                qs[32 * c + j] = l1 | (l2 << 4);
            }
        }
        out.extend(d.to_le_bytes());
        out.extend(dmin.to_le_bytes());
        out.extend(sc);
        out.extend(qh);
        out.extend(qs);
    }
    out
}

/// Q6_K blocks (210 bytes per 256 values: 128 bytes of low nibbles, 64 of high bits,
/// 16 signed 8-bit scales, f16 d).
pub fn quantize_q6_k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK_K * 210);
    for xb in x.chunks_exact(QK_K) {
        let mut levels = [0u8; QK_K];
        let mut scales = [0f32; 16];
        let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
        for ib in 0..16 {
            let s = make_qx_quants(32, &xb[16 * ib..16 * ib + 16], &mut levels[16 * ib..16 * ib + 16]);
            scales[ib] = s;
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        if max_abs_scale < 1e-15 {
            out.extend([0u8; 210]);
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d = f16::from_f32(1.0 / iscale);
        let mut sc = [0i8; 16];
        for (o, s) in sc.iter_mut().zip(&scales) {
            *o = nearest_int(iscale * s).min(127) as i8;
        }
        for j in 0..16 {
            let dd = d.to_f32() * sc[j] as f32;
            if dd == 0.0 {
                continue;
            }
            for ii in 0..16 {
                levels[16 * j + ii] = (nearest_int(xb[16 * j + ii] / dd).clamp(-32, 31) + 32) as u8;
            }
        }
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for h in 0..2 {
            let b = 128 * h;
            for l in 0..32 {
                let (q1, q2, q3, q4) = (levels[b + l], levels[b + l + 32], levels[b + l + 64], levels[b + l + 96]);
                ql[64 * h + l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
                ql[64 * h + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
                qh[32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
        }
        out.extend(ql);
        out.extend(qh);
        out.extend(sc.iter().map(|s| *s as u8));
        out.extend(d.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor, QStorage};
    use candle_core::{Device, Tensor};
    use std::borrow::Cow;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 11) as f32 / (1u64 << 53) as f32 - 0.5;
                // Heavy-ish tails and an outlier per block, like real weights.
                if i % 97 == 0 { u * 2.0 } else { u * 0.1 }
            })
            .collect()
    }

    fn decode(bytes: Vec<u8>, dtype: GgmlDType, n: usize) -> Vec<f32> {
        let q = QTensor::new(QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype).unwrap(), (n,)).unwrap();
        q.dequantize(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap()
    }

    fn rmse(a: &[f32], b: &[f32]) -> f32 {
        (a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>() / a.len() as f32).sqrt()
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!([0.5, 1.5, 2.5, -0.5, -1.5, 2.49, 7.0].map(nearest_int), [0, 2, 2, 0, -2, 2, 7]);
    }

    #[test]
    fn k_quant_blocks_decode_in_candle_and_round_no_worse_than_candles_quantizer() {
        let n = 256 * 24;
        let x = values(n, 7);
        for (dtype, ours, bound) in [
            (GgmlDType::Q4K, quantize_q4_k(&x), 0.012),
            (GgmlDType::Q5K, quantize_q5_k(&x), 0.006),
            (GgmlDType::Q6K, quantize_q6_k(&x), 0.003),
        ] {
            assert_eq!(ours.len(), n / 256 * dtype.type_size(), "{dtype:?}");
            let got = decode(ours, dtype, n);
            let theirs = QTensor::quantize(&Tensor::from_slice(&x, (n,), &Device::Cpu).unwrap(), dtype).unwrap();
            let candle = theirs.dequantize(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
            let (e_ours, e_candle) = (rmse(&got, &x), rmse(&candle, &x));
            assert!(e_ours < bound, "{dtype:?}: rmse {e_ours}");
            assert!(e_ours <= e_candle * 1.001, "{dtype:?}: ggml's search rounds better ({e_ours} vs candle's {e_candle})");
        }
    }

    #[test]
    fn all_zero_and_constant_blocks_are_exact() {
        for x in [vec![0f32; 256], vec![0.25f32; 256]] {
            for (dtype, b) in [(GgmlDType::Q4K, quantize_q4_k(&x)), (GgmlDType::Q5K, quantize_q5_k(&x)), (GgmlDType::Q6K, quantize_q6_k(&x))] {
                let got = decode(b, dtype, 256);
                assert!(rmse(&got, &x) < 1e-3, "{dtype:?} {:?}", &got[..4]);
            }
        }
    }
}
