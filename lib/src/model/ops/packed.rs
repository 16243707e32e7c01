//! Compact copies of frozen weights for decoding, with f32 arithmetic.
//!
//! A decode step multiplies one row by every weight matrix: it is bound by memory
//! traffic, not arithmetic. When a weight's exact values have a compact form (the
//! blocks of a Q4_0 / Q4_1 / Q8_0 GGUF tensor, or bf16 from a bf16 checkpoint) this
//! keeps that form and computes with exactly the values the dense f32 tensor holds
//! (`q·d + m` per block, as candle's dequantiser defines them), in f32: results equal the
//! dense f32 product up to rounding order, while 3–6× fewer bytes are read. Several input
//! rows (a batched decode step) share each expanded block, and a row's result does not
//! depend on the batch it is in. Used only for untracked inputs on frozen weights.

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
        if cols % QK != 0 {
            return None;
        }
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

    /// `y = W·x` for one input row `x` (`cols` values); returns `rows` values. The same
    /// computation as one row of [`matmul`](Self::matmul).
    pub fn matvec(&self, x: &[f32]) -> Vec<f32> {
        self.matmul(x, 1)
    }

    /// `Y = X·Wᵀ` for `n` input rows `xs` (`[n, cols]` row-major); returns `[n, rows]`.
    ///
    /// Each block of 32 weights is expanded to f32 once (`q·d + m`, exactly the values of
    /// candle's dequantised tensor) and multiplied with all `n` inputs while it sits in
    /// registers, so a batched decode step reads and expands the weights once for every
    /// sequence. Every output is accumulated the same way whatever `n` is and wherever
    /// the row falls in a tile (two 16-lane accumulators over the blocks, then one sum):
    /// a row's result does not depend on what it is batched with, bit for bit.
    pub fn matmul(&self, xs: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(xs.len(), n * self.cols, "packed matmul: input length");
        let _t = super::profile::timer(match self.data {
            Data::Bf16(_) => "packed bf16 matmul",
            Data::Q8_0 { .. } => "packed q8_0 matmul",
            _ => "packed q4 matmul",
        });
        self.product(n, |r0, len, j0, jn, out| match jn {
            1 => self.tiles::<4, 1>(r0, len, xs, j0, n, out),
            2 => self.tiles::<4, 2>(r0, len, xs, j0, n, out),
            3 => self.tiles::<2, 3>(r0, len, xs, j0, n, out),
            _ => self.tiles::<2, 4>(r0, len, xs, j0, n, out),
        })
    }

    /// Whether [`matmul_int8`](Self::matmul_int8) has a kernel here (Q4 blocks on a CPU
    /// with AVX-512 VNNI); elsewhere it computes [`matmul`](Self::matmul).
    pub fn supports_int8(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if matches!(self.data, Data::Q4_1 { .. } | Data::Q4_0 { .. })
            && std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx512vl")
        {
            return true;
        }
        false
    }

    /// [`matmul`](Self::matmul) with the inputs rounded to 8 bits per block of 32 (a scale
    /// and 32 signed bytes, llama.cpp's `Q8_1`) and the products summed in integers: the
    /// trick llama.cpp uses, several times fewer instructions per weight, at the price
    /// of the activations' rounding error (about 0.4 % of each block's largest value).
    /// Not exact: an explicit option for serving throughput, never the default.
    pub fn matmul_int8(&self, xs: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(xs.len(), n * self.cols, "packed matmul: input length");
        if !self.supports_int8() {
            return self.matmul(xs, n);
        }
        let _t = super::profile::timer("packed q4 int8 matmul");
        let q = Q8Rows::quantize(xs, n, self.cols);
        self.product(n, |r0, len, j0, jn, out| match jn {
            1 => self.tiles_int8::<4, 1>(r0, len, &q, j0, n, out),
            2 => self.tiles_int8::<4, 2>(r0, len, &q, j0, n, out),
            3 => self.tiles_int8::<4, 3>(r0, len, &q, j0, n, out),
            _ => self.tiles_int8::<4, 4>(r0, len, &q, j0, n, out),
        })
    }

    /// Runs `tile(r0, len, j0, jn, out)` over row shares (in parallel when the product is
    /// large) and input groups of up to four, then lays the result out as `[n, rows]`.
    fn product(&self, n: usize, tile: impl Fn(usize, usize, usize, usize, &mut [f32]) + Sync) -> Vec<f32> {
        use rayon::prelude::*;
        // out[(r − r0)·n + j] for the rows r0.. of one share.
        let run = |r0: usize, out: &mut [f32]| {
            let len = out.len() / n;
            let mut j0 = 0;
            while j0 < n {
                let jn = (n - j0).min(4);
                tile(r0, len, j0, jn, out);
                j0 += jn;
            }
        };
        let mut t = vec![0f32; self.rows * n];
        // Below ~256k multiply-adds a second thread costs more than it saves; above, the
        // rows are split: a decode step's projections then keep both cores busy.
        if num_threads() <= 1 || n * self.rows * self.cols < 1 << 18 {
            run(0, &mut t);
        } else {
            let chunk = self.rows.div_ceil(num_threads()).div_ceil(4) * 4;
            t.par_chunks_mut(chunk * n).enumerate().for_each(|(ci, out)| run(ci * chunk, out));
        }
        if n == 1 {
            return t;
        }
        let mut y = vec![0f32; n * self.rows];
        for r in 0..self.rows {
            for j in 0..n {
                y[j * self.rows + r] = t[r * n + j];
            }
        }
        y
    }

    /// [`tiles`](Self::tiles) for 8-bit inputs.
    fn tiles_int8<const R: usize, const J: usize>(&self, r0: usize, len: usize, q: &Q8Rows, j0: usize, n: usize, out: &mut [f32]) {
        assert!(out.len() >= len * n && r0 + len <= self.rows && j0 + J <= q.n);
        #[cfg(target_arch = "x86_64")]
        {
            let nb = self.cols / QK;
            let (qs, d, m) = match &self.data {
                Data::Q4_1 { qs, d, m } => (qs, d, Some(m.as_slice())),
                Data::Q4_0 { qs, d } => (qs, d, None),
                _ => unreachable!("supports_int8 is checked first"),
            };
            // SAFETY: supports_int8 checked AVX-512 VNNI/VL; rows, inputs and outputs are in bounds (asserted).
            unsafe { kernel_q4_int8::<R, J>(qs, d, m, nb, r0, len, q, j0, out, n) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (r0, len, q, j0, n, out);
    }

    /// Rows `r0..r0+len` against inputs `j0..j0+J`, `R` rows at a time, into
    /// `out[(r − r0)·n + j]`.
    fn tiles<const R: usize, const J: usize>(&self, r0: usize, len: usize, xs: &[f32], j0: usize, n: usize, out: &mut [f32]) {
        assert!(out.len() >= len * n && r0 + len <= self.rows && (j0 + J) * self.cols <= xs.len());
        let x: [&[f32]; J] = std::array::from_fn(|j| &xs[(j0 + j) * self.cols..(j0 + j + 1) * self.cols]);
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present; the rows, inputs and outputs are in bounds (asserted above).
            unsafe {
                match &self.data {
                    Data::Q4_1 { qs, d, m } => kernel_q4_1::<R, J>(qs, d, m, self.cols, r0, len, &x, out, n, j0),
                    Data::Q4_0 { qs, d } => kernel_q4_0::<R, J>(qs, d, self.cols, r0, len, &x, out, n, j0),
                    Data::Q8_0 { qs, d } => kernel_q8_0::<R, J>(qs, d, self.cols, r0, len, &x, out, n, j0),
                    Data::Bf16(v) => kernel_bf16::<R, J>(v, self.cols, r0, len, &x, out, n, j0),
                }
            }
            return;
        }
        for (j, xj) in x.iter().enumerate() {
            for i in 0..len {
                out[i * n + j0 + j] = self.row_dot_portable(r0 + i, xj);
            }
        }
    }

    /// Block `b` of row `r` as 32 f32 values (`q·d + m`, as candle dequantises).
    fn block_values(&self, r: usize, b: usize) -> [f32; QK] {
        let nb = self.cols / QK;
        let blk = r * nb + b;
        let mut w = [0f32; QK];
        match &self.data {
            Data::Q4_1 { qs, d, m } => {
                for j in 0..QK / 2 {
                    let q = qs[blk * 16 + j];
                    w[j] = (q & 0x0F) as f32 * d[blk] + m[blk];
                    w[j + 16] = (q >> 4) as f32 * d[blk] + m[blk];
                }
            }
            Data::Q4_0 { qs, d } => {
                for j in 0..QK / 2 {
                    let q = qs[blk * 16 + j];
                    w[j] = ((q & 0x0F) as i16 - 8) as f32 * d[blk];
                    w[j + 16] = ((q >> 4) as i16 - 8) as f32 * d[blk];
                }
            }
            Data::Q8_0 { qs, d } => {
                for j in 0..QK {
                    w[j] = (qs[blk * QK + j] as i8) as f32 * d[blk];
                }
            }
            Data::Bf16(v) => {
                for j in 0..QK {
                    w[j] = v[r * self.cols + b * QK + j].to_f32();
                }
            }
        }
        w
    }

    /// One row's product without SIMD: two 16-lane accumulators, as the AVX-512 kernel.
    fn row_dot_portable(&self, r: usize, x: &[f32]) -> f32 {
        let (mut a0, mut a1) = ([0f32; 16], [0f32; 16]);
        for b in 0..self.cols / QK {
            let w = self.block_values(r, b);
            for k in 0..16 {
                a0[k] += w[k] * x[b * QK + k];
                a1[k] += w[k + 16] * x[b * QK + 16 + k];
            }
        }
        a0.iter().zip(&a1).map(|(p, q)| p + q).sum()
    }

    /// The dense f32 values (for tests).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for b in 0..self.cols / QK {
                out.extend_from_slice(&self.block_values(r, b));
            }
        }
        out
    }
}

/// The 32 nibbles of a block as two vectors of 16 integers in f32 (low nibbles, high nibbles).
#[cfg(target_arch = "x86_64")]
macro_rules! nibbles {
    ($p:expr) => {{
        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128($p as *const __m128i));
        (_mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0x0F))), _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)))
    }};
}

/// Kernels, one per block format: `R` rows (the first `nrows` real) times `J` inputs;
/// each block of each row is expanded once (by `$expand`, which sees the block index
/// `blk`, the row `row` and the block `b` in it) and multiplied into every input's two
/// accumulators. Written as a macro so that the expansion is inlined into the loop (a
/// call would spill every accumulator). Pointer and index arithmetic is wrapping: the
/// crate builds with overflow and precondition checks, which would otherwise run in the
/// innermost loop.
#[cfg(target_arch = "x86_64")]
macro_rules! block_kernel {
    ($name:ident, ($($arg:ident: $ty:ty),*), |$blk:ident, $row:ident, $b:ident| $expand:block) => {
        #[target_feature(enable = "avx512f")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name<const R: usize, const J: usize>($($arg: $ty,)* cols: usize, r0: usize, len: usize, x: &[&[f32]; J], out: &mut [f32], n: usize, j0: usize) {
            use std::arch::x86_64::*;
            let nb = cols / QK;
            let xp: [*const f32; J] = std::array::from_fn(|j| x[j].as_ptr());
            let o = out.as_mut_ptr();
            let mut t = 0;
            // SAFETY: block b of row r0 + t + i (t + i < len) is in the matrix; each x holds
            // nb·32 values; out holds len·n values.
            unsafe {
                while t < len {
                    let nrows = if len - t < R { len - t } else { R };
                    let r = r0.wrapping_add(t);
                    let mut acc = [[[_mm512_setzero_ps(); 2]; R]; J];
                    for $b in 0..nb {
                        let mut wb = [[_mm512_setzero_ps(); 2]; R];
                        for i in 0..R {
                            if i < nrows {
                                let $row = r.wrapping_add(i);
                                let $blk = $row.wrapping_mul(nb).wrapping_add($b);
                                wb[i] = $expand;
                            }
                        }
                        for j in 0..J {
                            let p = xp[j].wrapping_add($b.wrapping_mul(QK));
                            let x0 = _mm512_loadu_ps(p);
                            let x1 = _mm512_loadu_ps(p.wrapping_add(16));
                            for i in 0..R {
                                acc[j][i][0] = _mm512_fmadd_ps(wb[i][0], x0, acc[j][i][0]);
                                acc[j][i][1] = _mm512_fmadd_ps(wb[i][1], x1, acc[j][i][1]);
                            }
                        }
                    }
                    for j in 0..J {
                        for i in 0..R {
                            if i < nrows {
                                let v = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][i][0], acc[j][i][1]));
                                *o.wrapping_add(t.wrapping_add(i).wrapping_mul(n).wrapping_add(j0 + j)) = v;
                            }
                        }
                    }
                    t = t.wrapping_add(nrows);
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
block_kernel!(kernel_q4_1, (qs: &[u8], d: &[f32], m: &[f32]), |blk, row, b| {
    let q = qs.as_ptr().wrapping_add(blk.wrapping_mul(16));
    if b & 3 == 0 {
        _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(256) as *const i8);
    }
    let (lo, hi) = nibbles!(q);
    let (dv, mv) = (_mm512_set1_ps(*d.as_ptr().wrapping_add(blk)), _mm512_set1_ps(*m.as_ptr().wrapping_add(blk)));
    let _ = row;
    [_mm512_add_ps(_mm512_mul_ps(lo, dv), mv), _mm512_add_ps(_mm512_mul_ps(hi, dv), mv)]
});

#[cfg(target_arch = "x86_64")]
block_kernel!(kernel_q4_0, (qs: &[u8], d: &[f32]), |blk, row, b| {
    let q = qs.as_ptr().wrapping_add(blk.wrapping_mul(16));
    if b & 3 == 0 {
        _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(256) as *const i8);
    }
    let (lo, hi) = nibbles!(q);
    let (dv, eight) = (_mm512_set1_ps(*d.as_ptr().wrapping_add(blk)), _mm512_set1_ps(8.0));
    let _ = row;
    [_mm512_mul_ps(_mm512_sub_ps(lo, eight), dv), _mm512_mul_ps(_mm512_sub_ps(hi, eight), dv)]
});

#[cfg(target_arch = "x86_64")]
block_kernel!(kernel_q8_0, (qs: &[u8], d: &[f32]), |blk, row, b| {
    let p = qs.as_ptr().wrapping_add(blk.wrapping_mul(QK));
    if b & 1 == 0 {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(512) as *const i8);
    }
    let dv = _mm512_set1_ps(*d.as_ptr().wrapping_add(blk));
    let w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)));
    let w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.wrapping_add(16) as *const __m128i)));
    let _ = row;
    [_mm512_mul_ps(w0, dv), _mm512_mul_ps(w1, dv)]
});

#[cfg(target_arch = "x86_64")]
block_kernel!(kernel_bf16, (v: &[bf16]), |blk, row, b| {
    // Rows of whole blocks: block `blk` starts at value blk·32.
    let _ = (row, b);
    let p = v.as_ptr().wrapping_add(blk.wrapping_mul(QK)) as *const __m256i;
    let h0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p));
    let h1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.wrapping_add(1)));
    [_mm512_castsi512_ps(_mm512_slli_epi32(h0, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(h1, 16))]
});

/// Input rows rounded to 8 bits per block of 32: `x ≈ d·q`, with `s = d·Σq` per block.
struct Q8Rows {
    n: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Q8Rows {
    fn quantize(xs: &[f32], n: usize, cols: usize) -> Self {
        let mut q = vec![0i8; xs.len()];
        let (mut d, mut s) = (Vec::with_capacity(xs.len() / QK), Vec::with_capacity(xs.len() / QK));
        for (x, qb) in xs.chunks_exact(QK).zip(q.chunks_exact_mut(QK)) {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let db = amax / 127.0;
            let inv = if db > 0.0 { 1.0 / db } else { 0.0 };
            let mut sum = 0i32;
            for (v, o) in x.iter().zip(qb.iter_mut()) {
                *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
                sum += *o as i32;
            }
            d.push(db);
            s.push(db * sum as f32);
        }
        debug_assert_eq!(d.len(), n * cols / QK);
        Self { n, q, d, s }
    }
}

/// Q4 rows times 8-bit inputs: per block, `dpbusd` sums the 32 nibble·byte products
/// in integers, scaled by both blocks' scales; the offset (`m` of Q4_1, −8·d of Q4_0)
/// times each input block's `d·Σq` is added once per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_q4_int8<const R: usize, const J: usize>(
    qs: &[u8],
    d: &[f32],
    m: Option<&[f32]>,
    nb: usize,
    r0: usize,
    len: usize,
    x: &Q8Rows,
    j0: usize,
    out: &mut [f32],
    n: usize,
) {
    use std::arch::x86_64::*;
    let o = out.as_mut_ptr();
    let low = _mm_set1_epi8(0x0F);
    let mut t = 0;
    // SAFETY: block b of row r0 + t + i (t + i < len) is in the matrix; input j0 + j has nb
    // blocks; out holds len·n values (the caller asserts all three).
    unsafe {
        while t < len {
            let nrows = if len - t < R { len - t } else { R };
            let r = r0.wrapping_add(t);
            let mut acc = [[_mm256_setzero_ps(); R]; J];
            for b in 0..nb {
                let mut w = [_mm256_setzero_si256(); R];
                let mut dw = [_mm256_setzero_ps(); R];
                for i in 0..R {
                    let row = r.wrapping_add(if i < nrows { i } else { nrows - 1 });
                    let blk = row.wrapping_mul(nb).wrapping_add(b);
                    let v = _mm_loadu_si128(qs.as_ptr().wrapping_add(blk.wrapping_mul(16)) as *const __m128i);
                    let lo = _mm_and_si128(v, low);
                    let hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
                    w[i] = _mm256_set_m128i(hi, lo);
                    dw[i] = _mm256_set1_ps(*d.as_ptr().wrapping_add(blk));
                }
                for j in 0..J {
                    let jb = (j0 + j).wrapping_mul(nb).wrapping_add(b);
                    let xv = _mm256_loadu_si256(x.q.as_ptr().wrapping_add(jb.wrapping_mul(QK)) as *const __m256i);
                    let dx = _mm256_set1_ps(*x.d.as_ptr().wrapping_add(jb));
                    for i in 0..R {
                        let isum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w[i], xv);
                        acc[j][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw[i], dx), acc[j][i]);
                    }
                }
            }
            for j in 0..J {
                let s = &x.s[(j0 + j) * nb..(j0 + j + 1) * nb];
                for i in 0..R {
                    if i < nrows {
                        let row = r + i;
                        let v4 = _mm_add_ps(_mm256_castps256_ps128(acc[j][i]), _mm256_extractf128_ps(acc[j][i], 1));
                        let v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
                        let mut v = _mm_cvtss_f32(_mm_add_ss(v2, _mm_shuffle_ps(v2, v2, 1)));
                        v += match m {
                            Some(m) => super::gemm::dot(&m[row * nb..(row + 1) * nb], s),
                            None => -8.0 * super::gemm::dot(&d[row * nb..(row + 1) * nb], s),
                        };
                        *o.wrapping_add((t + i) * n + j0 + j) = v;
                    }
                }
            }
            t = t.wrapping_add(nrows);
        }
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
    fn the_int8_product_is_close_to_the_exact_one_and_batch_invariant() -> Result<()> {
        let (rows, cols, n) = (37, 256, 5);
        let t = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)?;
        let xs: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.37).sin() * (1.0 + (i % 7) as f32)).collect();
        for dt in [GgmlDType::Q4_1, GgmlDType::Q4_0] {
            let p = PackedWeight::from_qtensor(&QTensor::quantize(&t, dt)?)?.expect("supported type");
            if !p.supports_int8() {
                eprintln!("no AVX-512 VNNI here: the int8 product is the exact one");
            }
            let exact = p.matmul(&xs, n);
            let approx = p.matmul_int8(&xs, n);
            let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (e, a) in exact.iter().zip(&approx) {
                assert!((e - a).abs() < 0.02 * scale, "{dt:?}: {a} vs {e} (largest {scale})");
            }
            for j in 0..n {
                assert_eq!(&approx[j * rows..(j + 1) * rows], p.matmul_int8(&xs[j * cols..(j + 1) * cols], 1).as_slice());
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
            // The kernel expands blocks to the same values: unit inputs pick them out exactly.
            let eye: Vec<f32> = (0..cols * cols).map(|i| if i / cols == i % cols { 1.0 } else { 0.0 }).collect();
            let picked = p.matmul(&eye, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(picked[c * rows + r], dense[r * cols + c], "{dt:?} ({r}, {c})");
                }
            }
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

    /// `cargo test ... packed_speed -- --ignored --nocapture`: weights·inputs per second
    /// for one input row and for a batch of 8.
    #[test]
    #[ignore = "benchmark"]
    fn packed_speed() -> Result<()> {
        let (rows, cols) = (1536, 576);
        let t = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)?;
        for dt in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let p = PackedWeight::from_qtensor(&QTensor::quantize(&t, dt)?)?.unwrap();
            for batch in [1, 8] {
                let xs: Vec<f32> = (0..batch * cols).map(|i| (i as f32).sin()).collect();
                let n = 300;
                let s = std::time::Instant::now();
                for _ in 0..n {
                    std::hint::black_box(p.matmul(&xs, batch));
                }
                let w = (n * rows * cols * batch) as f64;
                println!("{dt:?}, {batch} rows: {:.2} G multiply-adds/s", w / s.elapsed().as_secs_f64() / 1e9);
                if p.supports_int8() {
                    let s = std::time::Instant::now();
                    for _ in 0..n {
                        std::hint::black_box(p.matmul_int8(&xs, batch));
                    }
                    println!("{dt:?}, {batch} rows, int8 activations: {:.2} G multiply-adds/s", w / s.elapsed().as_secs_f64() / 1e9);
                }
            }
        }
        Ok(())
    }
}
