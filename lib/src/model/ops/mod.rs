//! Differentiable building blocks of the decoder.
//!
//! Every op here has a correct backward. Each public function picks an
//! implementation: a fused CPU kernel (a candle `CustomOp` with its own `bwd`)
//! for contiguous f32 tensors on the CPU, or a composition of candle ops whose
//! backward candle derives (CUDA, bf16, or `TUNEBOOK_FUSED=0`). Both paths are
//! checked against finite differences in the tests.
//!
//! candle's own fused `softmax_last_dim`, `rms_norm`, `rope*` and `sdpa` are never
//! used on the training path: they drop gradients silently.

pub mod attention;
pub mod gemm;
pub mod linear;
pub mod lora_linear;
pub mod norm;
pub mod packed;
pub mod profile;
pub mod rope;
pub mod simd;
pub mod swiglu;
pub mod xent;

#[cfg(test)]
pub(crate) mod gradcheck;

use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Tensor};

pub use attention::{AttentionMask, attention, attention_flat};
pub use linear::linear;
pub use lora_linear::lora_linear;
pub use norm::rms_norm;
pub use rope::{Rope, RopeTable};
pub use swiglu::swiglu;
pub use xent::{IGNORE_INDEX, cross_entropy, lm_head_cross_entropy};

/// A scalar whose backward pass gives `output` the gradient `grad` (same shape): the root
/// of a backward pass that continues another one, as in
/// [`LossTape`](crate::model::LossTape). On the CPU it costs nothing either way; elsewhere
/// it is `sum(output · grad)`.
pub fn seed_gradient(output: &Tensor, grad: &Tensor) -> Result<Tensor> {
    if output.dims() != grad.dims() {
        candle_core::bail!("seed_gradient: output {:?} but gradient {:?}", output.dims(), grad.dims());
    }
    if output.device().is_cpu() {
        output.apply_op1(SeedGradient(grad.detach()))
    } else {
        (output * grad.detach())?.sum_all()
    }
}

struct SeedGradient(Tensor);

impl candle_core::CustomOp1 for SeedGradient {
    fn name(&self) -> &'static str {
        "tunebook-seed-gradient"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let zero = match s.dtype() {
            DType::F32 => CpuStorage::F32(vec![0.0]),
            DType::F64 => CpuStorage::F64(vec![0.0]),
            DType::BF16 => CpuStorage::BF16(vec![half::bf16::ZERO]),
            DType::F16 => CpuStorage::F16(vec![half::f16::ZERO]),
            other => candle_core::bail!("seed_gradient: {other:?} tensors have no gradient"),
        };
        Ok((zero, Shape::from(())))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let s = grad_res.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok(Some(if s == 1.0 { self.0.clone() } else { self.0.affine(s, 0.0)? }))
    }
}

/// Tunes the CPU runtime once per process: [`tune_allocator`] and [`pin_thread_count`].
/// Called by the CLI at start and whenever a model is built or loaded on the CPU, before
/// the loaders' worker threads first allocate.
pub fn tune_cpu_runtime() {
    tune_allocator();
    pin_thread_count();
}

/// Tunes glibc's allocator once for the large, short-lived tensors of a training step:
/// every block comes from the heap instead of a fresh `mmap` (whose page faults cost a
/// third of a step for blocks up to 32 MiB; a 113 MiB weight gradient written by a GEMM
/// took 0.67 s instead of 0.19 s on fresh pages), freed memory is kept for reuse, and all threads share
/// one arena, so a buffer freed on one thread is reused by the next op on any other instead
/// of faulting in fresh pages. Skipped when the user set any `MALLOC_*` variable, and on
/// non-glibc targets.
fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::vars_os().any(|(k, _)| k.to_string_lossy().starts_with("MALLOC_")) {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator parameters; valid for any values.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_MMAP_MAX, 0);
            // -1: never trim (the value is taken as SIZE_MAX).
            libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
            libc::mallopt(libc::M_TOP_PAD, 256 << 20);
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    });
}

/// Fixes the CPU thread count for the rest of the process by setting `RAYON_NUM_THREADS`
/// (to candle's default, the physical cores) when the user has not.
///
/// candle decides the thread count of every matrix multiply afresh, and without the
/// variable that means parsing `/proc/cpuinfo`: hundreds of times per generated token.
fn pin_thread_count() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = gemm::num_threads();
            // SAFETY: std serialises its own environment accesses; this runs once, and the
            // variable is read only by candle and rayon through std.
            unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
        }
    });
}

/// Whether the fused CPU kernels are enabled (`TUNEBOOK_FUSED=0` turns them off).
pub fn fused_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !matches!(std::env::var("TUNEBOOK_FUSED").as_deref(), Ok("0") | Ok("false") | Ok("off")))
}

/// Whether `t` can go through a fused CPU kernel.
pub(crate) fn fusable(t: &Tensor) -> bool {
    fused_enabled() && matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// Whether autograd follows `t` (a `Var`, or computed from one).
pub(crate) fn tracked(t: &Tensor) -> bool {
    t.track_op()
}

/// The f32 data of a contiguous CPU storage, or an error naming the op.
pub(crate) fn slice_f32<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        other => candle_core::bail!("{op}: expected f32 input, got {:?}", candle_core::backend::BackendStorage::dtype(other)),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous (call .contiguous() first)"),
    }
}

/// Runs `f` over the f32 data of a CPU tensor (made contiguous first).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => Ok(f(slice_f32("with_f32", s, layout)?)),
        _ => candle_core::bail!("fused kernel called on a non-CPU tensor"),
    }
}

/// Wraps a vector as a CPU tensor of the given shape.
pub(crate) fn cpu_tensor(v: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// Splits `0..n` into about `num_threads()` contiguous chunks and runs them in parallel.
pub(crate) fn par_rows<F>(data: &mut [f32], row: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    use rayon::prelude::*;
    if row == 0 {
        return;
    }
    let rows = data.len() / row;
    if data.len() < 1 << 15 || gemm::num_threads() <= 1 {
        // Too small to be worth waking the thread pool (a decode step's single row).
        for (r, d) in data.chunks_mut(row).enumerate() {
            f(r, d);
        }
        return;
    }
    let chunk = rows.div_ceil(gemm::num_threads().max(1) * 4).max(1);
    data.par_chunks_mut(chunk * row).enumerate().for_each(|(ci, block)| {
        for (ri, r) in block.chunks_mut(row).enumerate() {
            f(ci * chunk + ri, r);
        }
    });
}
