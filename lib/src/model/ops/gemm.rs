//! Raw row-major f32 GEMM used inside the fused CPU ops.
//!
//! Routes to a system OpenBLAS (`libopenblas.so.0`, loaded at run time with
//! `dlopen`, so the build never needs it) when one is present and
//! `TUNEBOOK_BLAS` is not `gemm`; otherwise to the `gemm` crate that candle
//! itself uses. Both compute the same product; BLAS is about twice as fast on
//! the 2-core AVX-512 machines this project targets.

use std::sync::OnceLock;

/// How many threads one large GEMM may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// Single-threaded: the caller already parallelises (e.g. over heads).
    One,
    /// All of candle's CPU threads (`RAYON_NUM_THREADS`).
    All,
}

type CblasSgemm = unsafe extern "C" fn(
    order: i32,
    transa: i32,
    transb: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    a: *const f32,
    lda: i32,
    b: *const f32,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
);
type SetThreads = unsafe extern "C" fn(i32);

struct Blas {
    sgemm: CblasSgemm,
    set_threads: Option<SetThreads>,
    name: String,
}

// SAFETY: function pointers into a library that stays loaded for the whole process.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

static BLAS: OnceLock<Option<Blas>> = OnceLock::new();

fn blas() -> Option<&'static Blas> {
    BLAS.get_or_init(load_blas).as_ref()
}

fn load_blas() -> Option<Blas> {
    match std::env::var("TUNEBOOK_BLAS").as_deref() {
        Ok("gemm") | Ok("off") | Ok("0") => return None,
        _ => {}
    }
    // Debian's OpenBLAS 0.3.21 misdetects AVX-512 virtual CPUs and falls back to a
    // generic kernel 5x slower; name the core when the CPU has AVX-512 and the
    // user did not choose one. Must happen before the library initialises.
    #[cfg(target_arch = "x86_64")]
    if std::env::var_os("OPENBLAS_CORETYPE").is_none() && std::is_x86_feature_detected!("avx512f") {
        // SAFETY: called once, before any BLAS thread exists; other threads of this
        // process do not read OPENBLAS_CORETYPE.
        unsafe { std::env::set_var("OPENBLAS_CORETYPE", "SkylakeX") };
    }
    // OpenBLAS's helper threads spin for 2^28 cycles (about 0.1 s) after each GEMM before
    // they sleep, taking a core from the element-wise kernels that run between GEMMs: on two
    // cores a LoRA step's backward pass was a fifth slower. 2^4 cycles makes them sleep at
    // once; waking them costs microseconds against GEMMs of milliseconds.
    if std::env::var_os("OPENBLAS_THREAD_TIMEOUT").is_none() && std::env::var_os("GOTO_THREAD_TIMEOUT").is_none() {
        // SAFETY: as above; read only by OpenBLAS when it initialises.
        unsafe { std::env::set_var("OPENBLAS_THREAD_TIMEOUT", "4") };
    }
    let candidates: Vec<String> = match std::env::var("TUNEBOOK_BLAS") {
        Ok(path) if path.contains(".so") => vec![path],
        _ => ["libopenblas.so.0", "libopenblasp-r0.3.21.so", "libopenblas.so"].iter().map(|s| s.to_string()).collect(),
    };
    for name in candidates {
        let Ok(cname) = std::ffi::CString::new(name.clone()) else { continue };
        // SAFETY: dlopen/dlsym with valid C strings; the handle is never closed.
        unsafe {
            let handle = libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            if handle.is_null() {
                continue;
            }
            let sym = libc::dlsym(handle, c"cblas_sgemm".as_ptr());
            if sym.is_null() {
                continue;
            }
            let set = libc::dlsym(handle, c"openblas_set_num_threads".as_ptr());
            let blas = Blas {
                sgemm: std::mem::transmute::<*mut libc::c_void, CblasSgemm>(sym),
                set_threads: if set.is_null() { None } else { Some(std::mem::transmute::<*mut libc::c_void, SetThreads>(set)) },
                name,
            };
            if let Some(f) = blas.set_threads {
                f(num_threads() as i32);
            }
            return Some(blas);
        }
    }
    None
}

/// The number of threads CPU kernels use (`RAYON_NUM_THREADS`, else the physical cores),
/// decided once per process.
pub fn num_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(candle_core::utils::get_num_threads)
}

/// Which GEMM backs the fused CPU ops: `"openblas (libopenblas.so.0)"` or `"gemm crate"`.
pub fn backend_name() -> String {
    match blas() {
        Some(b) => format!("openblas ({})", b.name),
        None => "gemm crate".to_string(),
    }
}

/// Row-major `C[m,n] = alpha · op(A)[m,k] · op(B)[k,n] + beta · C`, where `op(A)` is `A`
/// (stored `[m, lda]`) or, with `ta`, `Aᵀ` (A stored `[k, lda]`); likewise `B`.
///
/// # Panics
/// Never for well-formed arguments; slices too short for the given shape and
/// leading dimensions are a caller bug and are checked with `debug_assert`.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
    threads: Threads,
) {
    if m == 0 || n == 0 {
        return;
    }
    debug_assert!(c.len() >= (m - 1) * ldc + n);
    debug_assert!(k == 0 || a.len() >= if ta { (k - 1) * lda + m } else { (m - 1) * lda + k });
    debug_assert!(k == 0 || b.len() >= if tb { (n - 1) * ldb + k } else { (k - 1) * ldb + n });
    if k == 0 {
        for i in 0..m {
            for v in &mut c[i * ldc..i * ldc + n] {
                *v *= beta;
            }
        }
        return;
    }
    // One row times a transposed matrix (a decode step's x·Wᵀ): memory-bound, so a
    // streaming dot-product kernel beats any GEMM.
    if m == 1 && tb && !ta && alpha == 1.0 && beta == 0.0 {
        gemv_rows(&a[..k], b, ldb, k, &mut c[..n], threads);
        return;
    }
    // Small per-head products run single-threaded inside the caller's parallel loop:
    // the gemm crate without threads is right there; BLAS takes the large ones.
    // Thin products (a LoRA rank as one dimension) run better on the gemm crate.
    let thin = m.min(n).min(k) <= 32;
    if let (Threads::All, false, Some(bl)) = (threads, thin, blas()) {
        const ROW_MAJOR: i32 = 101;
        const NO_TRANS: i32 = 111;
        const TRANS: i32 = 112;
        // SAFETY: shapes and leading dimensions describe memory inside the slices.
        unsafe {
            (bl.sgemm)(
                ROW_MAJOR,
                if ta { TRANS } else { NO_TRANS },
                if tb { TRANS } else { NO_TRANS },
                m as i32,
                n as i32,
                k as i32,
                alpha,
                a.as_ptr(),
                lda as i32,
                b.as_ptr(),
                ldb as i32,
                beta,
                c.as_mut_ptr(),
                ldc as i32,
            );
        }
        return;
    }
    let (a_rs, a_cs) = if ta { (1isize, lda as isize) } else { (lda as isize, 1isize) };
    let (b_rs, b_cs) = if tb { (1isize, ldb as isize) } else { (ldb as isize, 1isize) };
    let par = match threads {
        Threads::One => gemm::Parallelism::None,
        Threads::All => {
            let t = num_threads();
            if t > 1 && m * n * k > 64 * 64 * 64 { gemm::Parallelism::Rayon(t) } else { gemm::Parallelism::None }
        }
    };
    // SAFETY: as above. The gemm crate computes dst = alpha·dst + beta·lhs·rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            beta != 0.0,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// `y[j] = Σ_p x[p]·w[j·ldw + p]` for `j < y.len()`, parallel over rows when large.
fn gemv_rows(x: &[f32], w: &[f32], ldw: usize, k: usize, y: &mut [f32], threads: Threads) {
    use rayon::prelude::*;
    let n = y.len();
    let run = |j0: usize, ys: &mut [f32]| {
        for (i, yv) in ys.iter_mut().enumerate() {
            let r = (j0 + i) * ldw;
            *yv = dot(x, &w[r..r + k]);
        }
    };
    if threads == Threads::One || n * k < 1 << 16 || num_threads() <= 1 {
        run(0, y);
    } else {
        let chunk = n.div_ceil(num_threads() * 4).max(16);
        y.par_chunks_mut(chunk).enumerate().for_each(|(ci, ys)| run(ci * chunk, ys));
    }
}

/// Dot product of two equal-length slices, vectorised for the CPU at hand.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked above).
            return unsafe { dot_avx512(a, b) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let n = a.len() / 16 * 16;
    for i in (0..n).step_by(16) {
        for j in 0..16 {
            acc[j] += a[i + j] * b[i + j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in n..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load stays below n.
    unsafe {
        while i + 64 <= n {
            for (j, s) in acc.iter_mut().enumerate() {
                *s = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 16 * j)), _mm512_loadu_ps(pb.add(i + 16 * j)), *s);
            }
            i += 64;
        }
        while i + 16 <= n {
            acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc[0]);
            i += 16;
        }
        let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let mut total = _mm512_reduce_add_ps(s);
        while i < n {
            total += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        total
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load stays below n.
    unsafe {
        while i + 32 <= n {
            for (j, s) in acc.iter_mut().enumerate() {
                *s = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8 * j)), _mm256_loadu_ps(pb.add(i + 8 * j)), *s);
            }
            i += 32;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), s);
        let mut total: f32 = lanes.iter().sum();
        while i < n {
            total += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(ta: bool, tb: bool, m: usize, n: usize, k: usize, a: &[f32], lda: usize, b: &[f32], ldb: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f32;
                for p in 0..k {
                    let av = if ta { a[p * lda + i] } else { a[i * lda + p] };
                    let bv = if tb { b[j * ldb + p] } else { b[p * ldb + j] };
                    s += av * bv;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn gemv_and_dot_match_naive() {
        for len in [1usize, 15, 16, 33, 64, 100, 577] {
            let a: Vec<f32> = (0..len).map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0).collect();
            let b: Vec<f32> = (0..len).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - want).abs() < 1e-3 * want.abs().max(1.0), "len {len}");
            assert!((dot_portable(&a, &b) - want).abs() < 1e-3 * want.abs().max(1.0), "len {len}");
        }
        let (n, k) = (300, 70);
        let x: Vec<f32> = (0..k).map(|i| (i as f32).sin()).collect();
        let w: Vec<f32> = (0..n * (k + 3)).map(|i| (i as f32 * 0.37).cos()).collect();
        let want = naive(false, true, 1, n, k, &x, k, &w, k + 3);
        for threads in [Threads::One, Threads::All] {
            let mut c = vec![0f32; n];
            sgemm(false, true, 1, n, k, 1.0, &x, k, &w, k + 3, 0.0, &mut c, n, threads);
            for (u, v) in c.iter().zip(&want) {
                assert!((u - v).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn sgemm_matches_naive_for_all_transposes() {
        let (m, n, k) = (7, 5, 9);
        let a: Vec<f32> = (0..m.max(k) * m.max(k) + 16).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        let b: Vec<f32> = (0..n.max(k) * n.max(k) + 16).map(|i| ((i * 13 % 17) as f32 - 8.0) / 5.0).collect();
        for &(ta, tb) in &[(false, false), (true, false), (false, true), (true, true)] {
            let lda = if ta { m + 1 } else { k + 2 };
            let ldb = if tb { k + 3 } else { n + 1 };
            let want = naive(ta, tb, m, n, k, &a, lda, &b, ldb);
            for threads in [Threads::One, Threads::All] {
                let mut c = vec![1f32; m * n];
                sgemm(ta, tb, m, n, k, 2.0, &a, lda, &b, ldb, 0.5, &mut c, n, threads);
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - (2.0 * y + 0.5)).abs() < 1e-4, "ta={ta} tb={tb}: {x} vs {}", 2.0 * y + 0.5);
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// Memory throughput of the decode GEMV (`cargo test ... gemv_speed -- --ignored --nocapture`).
    #[test]
    #[ignore = "benchmark"]
    fn gemv_speed() {
        let (n, k, count) = (1536, 576, 120);
        let ws: Vec<Vec<f32>> = (0..count).map(|c| (0..n * k).map(|i| ((i + c) % 17) as f32 * 0.01).collect()).collect();
        let x: Vec<f32> = (0..k).map(|i| i as f32 * 0.001).collect();
        let mut y = vec![0f32; n];
        for threads in [Threads::One, Threads::All] {
            let t = std::time::Instant::now();
            for _ in 0..3 {
                for w in &ws {
                    sgemm(false, true, 1, n, k, 1.0, &x, k, w, k, 0.0, &mut y, n, threads);
                }
            }
            let gb = 3.0 * (count * n * k * 4) as f64 / 1e9;
            println!("gemv {threads:?}: {:.1} GB/s", gb / t.elapsed().as_secs_f64());
        }
    }

    /// GEMM throughput on training shapes (`... gemm_speed -- --ignored --nocapture`).
    #[test]
    #[ignore = "benchmark"]
    fn gemm_speed() {
        println!("backend: {}", backend_name());
        for &(m, k, n, ta, tb) in &[
            (1024, 576, 1536, false, true),
            (1024, 1536, 576, false, false),
            (1536, 576, 1024, true, false),
            // LoRA's thin products (r = 16)
            (1024, 576, 16, false, true),
            (16, 1024, 576, true, false),
            (1024, 16, 1536, false, true),
            (1536, 1024, 16, true, false),
            (1024, 16, 576, false, false),
        ] {
            let a = vec![0.5f32; m * k];
            let b = vec![0.25f32; k * n];
            let mut c = vec![0f32; m * n];
            let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
            sgemm(ta, tb, m, n, k, 1.0, &a, lda, &b, ldb, 0.0, &mut c, n, Threads::All);
            let reps = 10;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                sgemm(ta, tb, m, n, k, 1.0, &a, lda, &b, ldb, 0.0, &mut c, n, Threads::All);
            }
            let gf = 2.0 * (m * n * k * reps) as f64 / t.elapsed().as_secs_f64() / 1e9;
            println!("{m}x{k}x{n} ta={ta} tb={tb}: {gf:.0} GFLOP/s");
        }
    }
}
