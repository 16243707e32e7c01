//! Compact copies of frozen weights for decoding, with f32 arithmetic.
//!
//! A decode step multiplies one row by every weight matrix: it is bound by memory
//! traffic, not arithmetic. When a weight's exact values have a compact form (the
//! blocks of a Q4_0 / Q4_1 / Q8_0 GGUF tensor, or bf16 from a bf16 checkpoint) this
//! keeps that form and computes with exactly the values the dense f32 tensor holds
//! (`q·d + m` per block, as candle's dequantiser defines them), in f32. Q4 blocks are
//! summed as `d·Σq·x + m·Σx`: the same products grouped differently, so results equal the
//! dense f32 product up to rounding order, while 3–6× fewer bytes are read. Used only for
//! untracked single-row inputs on frozen weights.

use super::gemm::num_threads;
use anyhow::{Result, bail};
use candle_core::quantized::{GgmlDType, QTensor};
use half::{bf16, f16};

/// The compact encodings supported. Block scales are kept as f32 (exact: they are f16).
#[derive(Clone, Debug)]
enum Data {
    /// Blocks of 32: 16 bytes of nibbles; w = q·d + m.
    Q4_1 { qs: Vec<u8>, d: Vec<f32>, m: Vec<f32> },
    /// Blocks of 32: 16 bytes of nibbles; w = (q − 8)·d.
    Q4_0 { qs: Vec<u8>, d: Vec<f32> },
    /// Blocks of 32 signed bytes; w = q·d.
    Q8_0 { qs: Vec<u8>, d: Vec<f32> },
    /// bf16 values.
    Bf16(Vec<bf16>),
}

/// A `[rows, cols]` weight matrix in a compact exact encoding.
#[derive(Clone, Debug)]
pub struct PackedWeight {
    data: Data,
    rows: usize,
    cols: usize,
}

const QK: usize = 32;

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

impl PackedWeight {
    /// Keeps the blocks of a Q4_0 / Q4_1 / Q8_0 tensor (`[rows, cols]`); `None` for other types.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let (rows, cols) = q.shape().dims2()?;
        if cols % QK != 0 {
            return Ok(None);
        }
        let (block, quant) = match q.dtype() {
            GgmlDType::Q4_1 => (20, 16),
            GgmlDType::Q4_0 => (18, 16),
            GgmlDType::Q8_0 => (34, 32),
            _ => return Ok(None),
        };
        let bytes = q.data()?;
        let nblocks = rows * cols / QK;
        if bytes.len() != nblocks * block {
            bail!("packed weight: {} bytes for a {rows}×{cols} {:?} tensor", bytes.len(), q.dtype());
        }
        let mut qs = Vec::with_capacity(nblocks * quant);
        let mut d = Vec::with_capacity(nblocks);
        let mut m = Vec::new();
        for b in bytes.chunks_exact(block) {
            d.push(half_at(b, 0));
            if block == 20 {
                m.push(half_at(b, 2));
            }
            qs.extend_from_slice(&b[block - quant..]);
        }
        let data = match q.dtype() {
            GgmlDType::Q4_1 => Data::Q4_1 { qs, d, m },
            GgmlDType::Q4_0 => Data::Q4_0 { qs, d },
            _ => Data::Q8_0 { qs, d },
        };
        Ok(Some(Self { data, rows, cols }))
    }

    /// bf16 copy of an f32 tensor whose values are exactly bf16 (from a bf16 checkpoint).
    pub fn from_bf16_exact(values: &[f32], rows: usize, cols: usize) -> Option<Self> {
        let v: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
        if v.iter().zip(values).any(|(b, &x)| b.to_f32().to_bits() != x.to_bits()) {
            return None;
        }
        Some(Self { data: Data::Bf16(v), rows, cols })
    }

    /// `[rows, cols]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Reorders rows: row `i` of the result is row `perm[i]` of `self`.
    pub fn permute_rows(&self, perm: &[usize]) -> Self {
        fn take<T: Copy>(v: &[T], per_row: usize, perm: &[usize]) -> Vec<T> {
            perm.iter().flat_map(|&r| v[r * per_row..(r + 1) * per_row].iter().copied()).collect()
        }
        let nb = self.cols / QK;
        let data = match &self.data {
            Data::Bf16(v) => Data::Bf16(take(v, self.cols, perm)),
            Data::Q4_1 { qs, d, m } => Data::Q4_1 { qs: take(qs, nb * 16, perm), d: take(d, nb, perm), m: take(m, nb, perm) },
            Data::Q4_0 { qs, d } => Data::Q4_0 { qs: take(qs, nb * 16, perm), d: take(d, nb, perm) },
            Data::Q8_0 { qs, d } => Data::Q8_0 { qs: take(qs, nb * 32, perm), d: take(d, nb, perm) },
        };
        Self { data, rows: self.rows, cols: self.cols }
    }

    /// `y = W·x` for one input row `x` (`cols` values); returns `rows` values.
    pub fn matvec(&self, x: &[f32]) -> Vec<f32> {
        use rayon::prelude::*;
        assert_eq!(x.len(), self.cols, "packed matvec: input length");
        let _t = super::profile::timer(match self.data {
            Data::Bf16(_) => "packed bf16 matvec",
            Data::Q8_0 { .. } => "packed q8_0 matvec",
            _ => "packed q4 matvec",
        });
        let mut y = vec![0f32; self.rows];
        // Σx over each block of 32: the offset term of every row's blocks is m·Σx.
        let sx: Vec<f32> = x.chunks(QK).map(|c| c.iter().sum()).collect();
        let run = |r0: usize, ys: &mut [f32]| {
            let mut i = 0;
            // Four rows at a time share the loads of x and hide each other's latencies.
            while i + 4 <= ys.len() {
                match self.rows4(r0 + i, x, &sx) {
                    Some(v) => ys[i..i + 4].copy_from_slice(&v),
                    None => break,
                }
                i += 4;
            }
            for (j, yv) in ys.iter_mut().enumerate().skip(i) {
                *yv = self.row_dot(r0 + j, x, &sx);
            }
        };
        // A layer's matrices take ~100 µs on one core: waking a second core costs more than it
        // saves when that core is busy. Only the large LM head is split.
        if num_threads() <= 1 || self.rows * self.cols < 1 << 22 {
            run(0, &mut y);
        } else {
            // One contiguous share per thread: the rows stream from memory.
            let chunk = self.rows.div_ceil(num_threads()).div_ceil(4) * 4;
            y.par_chunks_mut(chunk).enumerate().for_each(|(ci, ys)| run(ci * chunk, ys));
        }
        y
    }

    /// `Y = X·Wᵀ` for `n` input rows `xs` (`[n, cols]` row-major); returns `[n, rows]`.
    ///
    /// Each weight block is read once for all `n` inputs (a batched decode step costs
    /// little more memory traffic than one row), and every output equals what
    /// [`matvec`](Self::matvec) gives for that input row alone, bit for bit: the same
    /// kernel computes each row (the 4-row kernel on rows below the last multiple of
    /// four, the 1-row kernel on the rest), so a sequence's greedy text does not depend
    /// on what it is batched with.
    pub fn matmul(&self, xs: &[f32], n: usize) -> Vec<f32> {
        use rayon::prelude::*;
        assert_eq!(xs.len(), n * self.cols, "packed matmul: input length");
        if n == 1 {
            return self.matvec(xs);
        }
        let _t = super::profile::timer("packed matmul");
        let inputs: Vec<(&[f32], Vec<f32>)> =
            xs.chunks(self.cols).map(|x| (x, x.chunks(QK).map(|c| c.iter().sum()).collect())).collect();
        let aligned = self.rows / 4 * 4;
        // `out` holds rows r0.. of Wᵀ's result, weight-row-major: out[(r - r0)·n + j].
        let run = |r0: usize, out: &mut [f32]| {
            let len = out.len() / n;
            let mut i = 0;
            while i + 4 <= len && r0 + i + 4 <= aligned {
                for (j, (x, sx)) in inputs.iter().enumerate() {
                    match self.rows4(r0 + i, x, sx) {
                        Some(v) => (0..4).for_each(|k| out[(i + k) * n + j] = v[k]),
                        None => (0..4).for_each(|k| out[(i + k) * n + j] = self.row_dot(r0 + i + k, x, sx)),
                    }
                }
                i += 4;
            }
            for r in i..len {
                for (j, (x, sx)) in inputs.iter().enumerate() {
                    out[r * n + j] = self.row_dot(r0 + r, x, sx);
                }
            }
        };
        let mut t = vec![0f32; self.rows * n];
        if num_threads() <= 1 || n * self.rows * self.cols < 1 << 22 {
            run(0, &mut t);
        } else {
            let chunk = self.rows.div_ceil(num_threads()).div_ceil(4) * 4;
            t.par_chunks_mut(chunk * n).enumerate().for_each(|(ci, out)| run(ci * chunk, out));
        }
        let mut y = vec![0f32; n * self.rows];
        for r in 0..self.rows {
            for j in 0..n {
                y[j * self.rows + r] = t[r * n + j];
            }
        }
        y
    }

    /// Rows `r..r+4` of a Q4 matrix with the 4-row kernel; `None` where it does not apply.
    fn rows4(&self, r: usize, x: &[f32], sx: &[f32]) -> Option<[f32; 4]> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            let nb = self.cols / QK;
            let bs = r * nb..(r + 4) * nb;
            let (qs, d, m) = match &self.data {
                Data::Q4_1 { qs, d, m } => (qs, d, Some(m)),
                Data::Q4_0 { qs, d } => (qs, d, None),
                _ => return None,
            };
            // SAFETY: AVX-512F is present; the four rows lie inside the matrix.
            let mut v = unsafe { dot_q4_avx512_rows4(&qs[bs.start * 16..bs.end * 16], &d[bs.clone()], nb, x) };
            for (i, vi) in v.iter_mut().enumerate() {
                let rb = (r + i) * nb..(r + i + 1) * nb;
                *vi += match m {
                    Some(m) => m[rb].iter().zip(sx).map(|(a, b)| a * b).sum::<f32>(),
                    None => d[rb].iter().zip(sx).map(|(a, b)| -8.0 * a * b).sum::<f32>(),
                };
            }
            return Some(v);
        }
        let _ = (r, x, sx);
        None
    }

    fn row_dot(&self, r: usize, x: &[f32], sx: &[f32]) -> f32 {
        let nb = self.cols / QK;
        let bs = r * nb..(r + 1) * nb;
        match &self.data {
            Data::Bf16(v) => dot_bf16(&v[r * self.cols..(r + 1) * self.cols], x),
            Data::Q4_1 { qs, d, m } => dot_q4(&qs[bs.start * 16..bs.end * 16], &d[bs.clone()], Some(&m[bs]), x, sx),
            Data::Q4_0 { qs, d } => dot_q4(&qs[bs.start * 16..bs.end * 16], &d[bs], None, x, sx),
            Data::Q8_0 { qs, d } => dot_q8(&qs[bs.start * 32..bs.end * 32], &d[bs], x),
        }
    }

    /// The dense f32 values (for tests).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        let mut unit = vec![0f32; self.cols];
        for r in 0..self.rows {
            for c in 0..self.cols {
                unit.iter_mut().for_each(|u| *u = 0.0);
                unit[c] = 1.0;
                let sx: Vec<f32> = unit.chunks(QK).map(|c| c.iter().sum()).collect();
                out.push(self.row_dot(r, &unit, &sx));
            }
        }
        out
    }
}

/// Σ w·x over blocks of nibbles, w = q·d + m (Q4_1) or (q − 8)·d (Q4_0), computed as
/// Σ_b d_b·(Σ q·x) + m_b·(Σ x): the same weights, one rounding order among others.
fn dot_q4(qs: &[u8], d: &[f32], m: Option<&[f32]>, x: &[f32], sx: &[f32]) -> f32 {
    // Offset term: m_b·Σx_b (Q4_1) or −8·d_b·Σx_b (Q4_0).
    let offset: f32 = match m {
        Some(m) => m.iter().zip(sx).map(|(a, b)| a * b).sum(),
        None => d.iter().zip(sx).map(|(a, b)| -8.0 * a * b).sum(),
    };
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked above).
        return unsafe { dot_q4_avx512(qs, d, x) } + offset;
    }
    let mut acc = [0f32; QK];
    for (b, &db) in d.iter().enumerate() {
        for j in 0..QK / 2 {
            let q = qs[b * 16 + j];
            acc[j] += db * ((q & 0x0F) as f32 * x[b * QK + j]);
            acc[j + 16] += db * ((q >> 4) as f32 * x[b * QK + j + 16]);
        }
    }
    acc.iter().sum::<f32>() + offset
}

/// Σ_b d_b·Σ_j q_bj·x_bj over blocks of nibbles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_q4_avx512(qs: &[u8], d: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    let mask = _mm512_set1_epi32(0x0F);
    // SAFETY: block b reads qs[16b..16b+16] and x[32b..32b+32], in bounds by construction.
    unsafe {
        for b in 0..d.len() {
            // The rows stream from memory: ask for the blocks a few iterations ahead (one
            // cache line of nibbles per 4 blocks, of scales per 16).
            if b % 4 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(qs.as_ptr().wrapping_add((b + 32) * 16) as *const i8);
            }
            if b % 16 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(d.as_ptr().wrapping_add(b + 64) as *const i8);
            }
            let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.as_ptr().add(b * 16) as *const __m128i));
            let lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, mask));
            let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
            let db = _mm512_set1_ps(*d.get_unchecked(b));
            let xp = x.as_ptr().add(b * QK);
            acc0 = _mm512_fmadd_ps(_mm512_mul_ps(lo, _mm512_loadu_ps(xp)), db, acc0);
            acc1 = _mm512_fmadd_ps(_mm512_mul_ps(hi, _mm512_loadu_ps(xp.add(16))), db, acc1);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
    }
}

/// [`dot_q4_avx512`] for four consecutive rows of `nb` blocks each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_q4_avx512_rows4(qs: &[u8], d: &[f32], nb: usize, x: &[f32]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; 4];
    let mask = _mm512_set1_epi32(0x0F);
    // SAFETY: row i, block b reads qs[16(i·nb+b)..+16], d[i·nb+b] and x[32b..32b+32], all in bounds.
    unsafe {
        for b in 0..nb {
            let xp = x.as_ptr().add(b * QK);
            let (x0, x1) = (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)));
            for (i, a) in acc.iter_mut().enumerate() {
                let blk = i * nb + b;
                if b % 4 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(qs.as_ptr().wrapping_add((blk + 4 * nb) * 16) as *const i8);
                }
                let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.as_ptr().add(blk * 16) as *const __m128i));
                let lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, mask));
                let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
                let db = _mm512_set1_ps(*d.get_unchecked(blk));
                a[0] = _mm512_fmadd_ps(_mm512_mul_ps(lo, x0), db, a[0]);
                a[1] = _mm512_fmadd_ps(_mm512_mul_ps(hi, x1), db, a[1]);
            }
        }
        acc.map(|a| _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1])))
    }
}

/// Σ w·x over blocks of signed bytes, w = q·d.
fn dot_q8(qs: &[u8], d: &[f32], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked above).
        return unsafe { dot_q8_avx512(qs, d, x) };
    }
    let mut acc = [0f32; QK];
    for (b, &db) in d.iter().enumerate() {
        for j in 0..QK {
            acc[j] += ((qs[b * QK + j] as i8) as f32 * db) * x[b * QK + j];
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_q8_avx512(qs: &[u8], d: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    // SAFETY: block b reads qs[32b..32b+32] and x[32b..32b+32], in bounds by construction.
    unsafe {
        for b in 0..d.len() {
            if b % 2 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(qs.as_ptr().wrapping_add((b + 32) * QK) as *const i8);
            }
            if b % 16 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(d.as_ptr().wrapping_add(b + 64) as *const i8);
            }
            let p = qs.as_ptr().add(b * QK);
            let db = _mm512_set1_ps(*d.get_unchecked(b));
            let w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i))), db);
            let w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i))), db);
            let xp = x.as_ptr().add(b * QK);
            acc0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc0);
            acc1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), acc1);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
    }
}

fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked above).
        return unsafe { dot_bf16_avx512(w, x) };
    }
    let mut acc = [0f32; 16];
    let n = w.len() / 16 * 16;
    for i in (0..n).step_by(16) {
        for j in 0..16 {
            acc[j] += w[i + j].to_f32() * x[i + j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in n..w.len() {
        s += w[i].to_f32() * x[i];
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_bf16_avx512(w: &[bf16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len();
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    // SAFETY: loads stay below n.
    unsafe {
        while i + 16 <= n {
            let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(w.as_ptr().add(i) as *const __m256i));
            let f = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
            acc = _mm512_fmadd_ps(f, _mm512_loadu_ps(x.as_ptr().add(i)), acc);
            i += 16;
        }
        let mut s = _mm512_reduce_add_ps(acc);
        while i < n {
            s += w[i].to_f32() * x[i];
            i += 1;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn a_batched_product_gives_each_row_exactly_its_single_row_product() -> Result<()> {
        // 1030 rows: not a multiple of 4; 5·1030·1024 inputs·weights takes the threaded path.
        for (rows, cols, n) in [(7, 64, 3), (1030, 1024, 5)] {
            let v: Vec<f32> = (0..rows * cols).map(|i| ((i * 31 % 97) as f32 - 48.0) / 13.0).collect();
            let t = Tensor::from_vec(v.clone(), (rows, cols), &Device::Cpu)?;
            let xs: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.17).sin()).collect();
            let b: Vec<f32> = v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
            let mut weights = vec![PackedWeight::from_bf16_exact(&b, rows, cols).expect("exact")];
            for dt in [GgmlDType::Q4_1, GgmlDType::Q4_0, GgmlDType::Q8_0] {
                weights.push(PackedWeight::from_qtensor(&QTensor::quantize(&t, dt)?)?.expect("supported type"));
            }
            for p in &weights {
                let y = p.matmul(&xs, n);
                for j in 0..n {
                    let single = p.matvec(&xs[j * cols..(j + 1) * cols]);
                    assert_eq!(&y[j * rows..(j + 1) * rows], single.as_slice(), "{rows}×{cols}, input row {j}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn packed_weights_expand_to_candles_dequantised_values() -> Result<()> {
        let (rows, cols) = (5, 64);
        let v: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let t = Tensor::from_vec(v.clone(), (rows, cols), &Device::Cpu)?;
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.3).sin()).collect();
        for dt in [GgmlDType::Q4_1, GgmlDType::Q4_0, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&t, dt)?;
            let dense = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            let p = PackedWeight::from_qtensor(&q)?.expect("supported type");
            assert_eq!(p.to_f32(), dense, "{dt:?}: expanded values are bit-identical");
            let y = p.matvec(&x);
            for r in 0..rows {
                let want: f32 = (0..cols).map(|c| dense[r * cols + c] * x[c]).sum();
                assert!((y[r] - want).abs() < 1e-4 * want.abs().max(1.0), "{dt:?} row {r}");
            }
            let perm = [4, 0, 3, 1, 2];
            let pp = p.permute_rows(&perm);
            let yp = pp.matvec(&x);
            for (i, &r) in perm.iter().enumerate() {
                assert_eq!(yp[i], y[r]);
            }
        }
        let b: Vec<f32> = v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        let p = PackedWeight::from_bf16_exact(&b, rows, cols).expect("exact");
        assert_eq!(p.to_f32(), b);
        assert!(PackedWeight::from_bf16_exact(&[0.1f32; 64], 1, 64).is_none(), "0.1 is not a bf16 value");
        Ok(())
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use candle_core::{Device, Tensor};

    /// `cargo test ... packed_speed -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark"]
    fn packed_speed() -> Result<()> {
        let (rows, cols) = (1536, 576);
        let t = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)?;
        let x: Vec<f32> = (0..cols).map(|i| (i as f32).sin()).collect();
        for dt in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let p = PackedWeight::from_qtensor(&QTensor::quantize(&t, dt)?)?.unwrap();
            let n = 300;
            let s = std::time::Instant::now();
            for _ in 0..n {
                std::hint::black_box(p.matvec(&x));
            }
            let el = s.elapsed().as_secs_f64();
            let sx: Vec<f32> = x.chunks(QK).map(|c| c.iter().sum()).collect();
            let s1 = std::time::Instant::now();
            for _ in 0..n {
                let mut y = vec![0f32; rows];
                for (r, v) in y.iter_mut().enumerate() {
                    *v = p.row_dot(r, &x, &sx);
                }
                std::hint::black_box(y);
            }
            let el1 = s1.elapsed().as_secs_f64();
            let w = (n * rows * cols) as f64;
            println!("{dt:?}: {:.2} Gweights/s parallel, {:.2} single thread", w / el / 1e9, w / el1 / 1e9);
        }
        Ok(())
    }
}
