//! Several sequences advanced in one step, each with its own KV cache, position and
//! LoRA adapter: the model side of continuous batching.
//!
//! [`LlamaModel::forward_batch`] takes any mix of sequences: those feeding one token
//! (decoding) share one pass through the layers in which every projection reads its
//! weights once for all of them ([`PackedWeight::matmul`](super::ops::packed::PackedWeight::matmul));
//! attention runs per sequence over its own cache. Sequences feeding several tokens
//! (a prompt, or a chunk of one) run through the cached forward one by one.
//!
//! Adapters are never merged: an [`AdapterWeights`] is read from a PEFT directory and its
//! rank-r product is added to the rows of the sequences that chose it, so requests for
//! different adapters and for the base model share a step. A sequence's logits are the
//! same, bit for bit, whatever it is batched with: each row is computed by the same
//! kernels as when it runs alone.

use super::llama::{KvCache, LlamaModel, kv_append};
use super::lora::Lora;
use super::ops::{self, gemm::dot};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// The rank-r update of one projection in plain f32 rows: `y += scale·(x·Aᵀ)·Bᵀ`.
#[derive(Clone, Debug)]
pub struct LoraRows {
    /// `[r, in]`.
    a: Vec<f32>,
    /// `Bᵀ`, `[r, out]`.
    bt: Vec<f32>,
    inp: usize,
    out: usize,
    scale: f32,
}

impl LoraRows {
    fn new(a: &Tensor, b: &Tensor, scale: f64) -> Result<Self> {
        let (r, inp) = a.dims2()?;
        let (out, rb) = b.dims2()?;
        if rb != r {
            bail!("LoRA: A is {:?} and B is {:?}: their ranks differ", a.dims(), b.dims());
        }
        let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bt = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self { a, bt, inp, out, scale: scale as f32 })
    }

    /// Adds the update of one input row `x` (`in` values) to its output row `y` (`out`).
    fn add_row(&self, x: &[f32], y: &mut [f32]) {
        debug_assert_eq!((x.len(), y.len()), (self.inp, self.out));
        for (k, a) in self.a.chunks_exact(self.inp).enumerate() {
            let h = dot(a, x) * self.scale;
            for (yo, b) in y.iter_mut().zip(&self.bt[k * self.out..(k + 1) * self.out]) {
                *yo += h * b;
            }
        }
    }

    /// Adds the update to every row of `y` (`[.., out]`) from the matching row of `x`.
    pub(super) fn apply(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let dims = y.dims().to_vec();
        let (dtype, device) = (y.dtype(), y.device().clone());
        let mut ys = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for (xr, yr) in xs.chunks_exact(self.inp).zip(ys.chunks_exact_mut(self.out)) {
            self.add_row(xr, yr);
        }
        Ok(Tensor::from_vec(ys, dims, &Device::Cpu)?.to_device(&device)?.to_dtype(dtype)?)
    }
}

/// One layer's updates, in the order of [`DecoderLayer::linears`](super::DecoderLayer::linears).
pub(crate) type LayerAdapter = [Option<LoraRows>; 7];

/// A PEFT LoRA adapter held apart from its base model and applied unmerged, per
/// sequence ([`LlamaModel::read_adapter`]).
#[derive(Clone, Debug)]
pub struct AdapterWeights {
    /// Rank, alpha, targets as `adapter_config.json` gives them.
    pub config: Lora,
    pub(super) layers: Vec<LayerAdapter>,
    /// `(layers, hidden, intermediate)` of the base it was read for.
    base_shape: (usize, usize, usize),
}

impl AdapterWeights {
    /// Bytes of adapter weights held.
    pub fn size_bytes(&self) -> usize {
        self.layers.iter().flatten().flatten().map(|l| (l.a.len() + l.bt.len()) * 4).sum()
    }

    /// Checks that this adapter was read for a model of `model`'s shape.
    pub(super) fn check_fits(&self, model: &LlamaModel) -> Result<()> {
        let c = &model.config;
        let shape = (c.num_hidden_layers, c.hidden_size, c.intermediate_size);
        if shape != self.base_shape {
            bail!(
                "this adapter was read for a model with (layers, hidden, intermediate) = {:?}, not {shape:?}",
                self.base_shape
            );
        }
        Ok(())
    }

    pub(super) fn at(&self, layer: usize, proj: usize) -> Option<&LoraRows> {
        self.layers[layer][proj].as_ref()
    }
}

/// One sequence's part of a [`LlamaModel::forward_batch`] step.
pub struct SeqStep<'a> {
    /// The tokens to run after those in `cache` (one while decoding).
    pub tokens: &'a [u32],
    /// The sequence's keys and values; the step appends `tokens`' own.
    pub cache: &'a mut KvCache,
    /// The adapter this sequence runs with, if any.
    pub adapter: Option<&'a AdapterWeights>,
}

impl LlamaModel {
    /// Reads a PEFT LoRA adapter directory for this model without changing the model: the
    /// names and shapes of its tensors are checked against this model's projections
    /// (the same checks as [`load_lora`](Self::load_lora)).
    pub fn read_adapter(&self, dir: impl AsRef<Path>) -> Result<AdapterWeights> {
        let dir = dir.as_ref();
        let mut m = self.clone();
        let config = m.load_lora(dir)?;
        let mut layers = Vec::with_capacity(m.layers.len());
        for layer in &m.layers {
            let lins = layer.linears();
            let mut out: LayerAdapter = Default::default();
            for (slot, (_, lin)) in out.iter_mut().zip(lins) {
                if let Some(l) = &lin.lora {
                    *slot = Some(LoraRows::new(l.a.as_tensor(), l.b.as_tensor(), l.scale)?);
                }
            }
            layers.push(out);
        }
        let c = &self.config;
        Ok(AdapterWeights { config, layers, base_shape: (c.num_hidden_layers, c.hidden_size, c.intermediate_size) })
    }

    /// Advances every sequence of `seqs` by its tokens and returns each sequence's logits
    /// at its last new token (vocabulary-sized rows, in the order of `seqs`).
    pub fn forward_batch(&self, seqs: &mut [SeqStep<'_>]) -> Result<Vec<Vec<f32>>> {
        for (i, s) in seqs.iter().enumerate() {
            if s.tokens.is_empty() {
                bail!("forward_batch: sequence {i} has no tokens to run");
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
                bail!("forward_batch: sequence {i}: token id {t} is outside the vocabulary (size {})", self.config.vocab_size);
            }
            if let Some(a) = s.adapter {
                a.check_fits(self)?;
            }
        }
        let mut out = vec![Vec::new(); seqs.len()];
        let mut decoding = Vec::new();
        for (i, s) in seqs.iter_mut().enumerate() {
            if s.tokens.len() == 1 {
                decoding.push((i, s));
                continue;
            }
            let ids = Tensor::from_vec(s.tokens.to_vec(), (1, s.tokens.len()), self.device())?;
            let logits = self.forward_cached_with(&ids, s.cache, s.adapter)?;
            out[i] = logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        }
        if !decoding.is_empty() {
            let (idx, mut rows): (Vec<usize>, Vec<&mut SeqStep>) = decoding.into_iter().unzip();
            for (i, logits) in idx.into_iter().zip(self.decode_rows(&mut rows)?) {
                out[i] = logits;
            }
        }
        Ok(out)
    }

    /// One decode step of `seqs` (one token each) through shared projections. Also the
    /// decode step of [`forward_cached`](Self::forward_cached), so a sequence computes the
    /// same logits in `Model::generate` and in a served batch.
    pub(super) fn decode_rows(&self, seqs: &mut [&mut SeqStep<'_>]) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let (n, hidden, d, eps) = (seqs.len(), c.hidden_size, c.head_dim(), c.rms_norm_eps);
        for s in seqs.iter_mut() {
            if s.cache.layers.len() != self.layers.len() {
                s.cache.layers = vec![None; self.layers.len()];
                s.cache.len = 0;
            }
        }
        let ids: Vec<u32> = seqs.iter().map(|s| s.tokens[0]).collect();
        let positions: Vec<u32> = seqs.iter().map(|s| s.cache.len as u32).collect();
        let adapters: Vec<Option<&AdapterWeights>> = seqs.iter().map(|s| s.adapter).collect();
        let rope = self.rope.at(&positions, n, 1)?;
        let ids = Tensor::from_vec(ids, n, self.device())?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?.reshape((n, 1, hidden))?;
        for (l, layer) in self.layers.iter().enumerate() {
            let proj = |lin: &super::Linear, p: usize, x: &Tensor| self.project_rows(lin, x, &adapters, l, p);
            let a = &layer.self_attn;
            let h = ops::rms_norm(&x, &layer.input_layernorm, eps)?;
            let q = rope.apply(&proj(&a.q_proj, 0, &h)?)?;
            let k = rope.apply(&proj(&a.k_proj, 1, &h)?)?;
            let v = proj(&a.v_proj, 2, &h)?;
            let mut kv = Vec::with_capacity(n);
            for (r, s) in seqs.iter_mut().enumerate() {
                let len = s.cache.len;
                let slot = &mut s.cache.layers[l];
                let (mut kb, mut vb) = slot.take().unzip();
                let kr = kv_append(&mut kb, len, &k.narrow(0, r, 1)?)?;
                let vr = kv_append(&mut vb, len, &v.narrow(0, r, 1)?)?;
                *slot = kb.zip(vb);
                kv.push((kr, vr));
            }
            let att = if q.device().is_cpu() && q.dtype() == DType::F32 {
                ops::attention::decode_attention(&q, &kv, d, c.sliding_window)?
            } else {
                let mask = ops::AttentionMask { segments: None, sliding_window: c.sliding_window };
                let rows = kv.iter().enumerate().map(|(r, (k, v))| ops::attention_flat(&q.narrow(0, r, 1)?, k, v, d, &mask));
                Tensor::cat(&rows.collect::<candle_core::Result<Vec<_>>>()?, 0)?
            };
            x = (x + proj(&a.o_proj, 3, &att)?)?;
            let m = &layer.mlp;
            let h = ops::rms_norm(&x, &layer.post_attention_layernorm, eps)?;
            let (gate, up) = rayon::join(|| proj(&m.gate_proj, 4, &h), || proj(&m.up_proj, 5, &h));
            let act = ops::swiglu(&gate?, &up?)?;
            x = (&x + proj(&m.down_proj, 6, &act)?)?;
        }
        for s in seqs.iter_mut() {
            s.cache.len += 1;
        }
        let last = ops::rms_norm(&x.squeeze(1)?, &self.norm, eps)?;
        let logits = match self.packed_rows(&last, self.lm_head_weight())? {
            Some(y) => y,
            None => ops::linear(&last, self.lm_head_weight())?,
        };
        let v = c.vocab_size;
        let flat = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(flat.chunks_exact(v).map(<[f32]>::to_vec).collect())
    }

    /// `x·Wᵀ` for the rows of `x` (`[n, .., in]`) through the compact copy of `w`, each row
    /// exactly as a single-row product; `None` when `w` has no compact copy.
    pub(super) fn packed_rows(&self, x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
        if w.is_variable() || x.track_op() || !x.device().is_cpu() || x.dtype() != DType::F32 {
            return Ok(None);
        }
        let Some(p) = self.packed.get(&w.id()) else { return Ok(None) };
        let k = x.dim(candle_core::D::Minus1)?;
        let n = x.elem_count() / k;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let y = if self.int8_activations { p.matmul_int8(&xs, n) } else { p.matmul(&xs, n) };
        let mut dims = x.dims().to_vec();
        *dims.last_mut().context("packed rows: a scalar input")? = p.dims().0;
        Ok(Some(Tensor::from_vec(y, dims, &Device::Cpu)?))
    }

    /// A projection of decode rows: base weights shared, each row's own adapter added.
    fn project_rows(
        &self,
        lin: &super::Linear,
        x: &Tensor,
        adapters: &[Option<&AdapterWeights>],
        layer: usize,
        proj: usize,
    ) -> Result<Tensor> {
        let mut y = match self.packed_rows(x, &lin.weight)? {
            Some(mut y) => {
                if let Some(b) = &lin.bias {
                    y = y.broadcast_add(b)?;
                }
                if let Some(l) = &lin.lora {
                    y = (y + l.forward(x, false)?)?;
                }
                y
            }
            None => lin.forward(x, false)?,
        };
        if adapters.iter().any(|a| a.and_then(|a| a.at(layer, proj)).is_some()) {
            let _t = ops::profile::timer("decode adapters");
            let (inp, out) = lin.in_out();
            let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let dims = y.dims().to_vec();
            let dtype = y.dtype();
            let mut ys = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for (r, a) in adapters.iter().enumerate() {
                if let Some(u) = a.and_then(|a| a.at(layer, proj)) {
                    u.add_row(&xs[r * inp..(r + 1) * inp], &mut ys[r * out..(r + 1) * out]);
                }
            }
            y = Tensor::from_vec(ys, dims, &Device::Cpu)?.to_device(self.device())?.to_dtype(dtype)?;
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::packed::PackedWeight;
    use crate::model::{LlamaConfig, Lora};
    use candle_core::Var;
    use std::collections::HashMap;

    /// The tiny random model with every weight rounded to bf16 and mirrored by compact
    /// copies, as a bf16 checkpoint loads (the decode path of real models).
    fn packed_tiny(cfg: LlamaConfig) -> Result<LlamaModel> {
        let mut m = LlamaModel::random(cfg, 11, &Device::Cpu)?;
        let mut by_name = HashMap::new();
        m.visit_tensors_mut(|name, t| {
            *t = t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            if let Ok((r, c)) = t.dims2() {
                // Whole blocks of 32 columns only: the others stay dense.
                if let Some(p) = PackedWeight::from_bf16_exact(&t.flatten_all()?.to_vec1::<f32>()?, r, c) {
                    by_name.insert(name.to_string(), p);
                }
            }
            Ok(())
        })?;
        m.set_packed(by_name);
        assert!(m.packed_count() > 0);
        Ok(m)
    }

    /// A PEFT adapter with random A and B written to `dir` for `base`.
    fn random_adapter(base: &LlamaModel, dir: &Path, r: usize, seed: u64) -> Result<()> {
        let mut m = base.clone();
        let cfg = Lora::rank(r).alpha(2.0 * r as f64).seed(seed).targets(&["q_proj", "v_proj", "o_proj", "down_proj"]);
        m.add_lora(&cfg)?;
        let mut k = seed;
        for layer in m.layers.iter_mut() {
            for (_, lin) in layer.linears_mut() {
                if let Some(l) = &mut lin.lora {
                    k += 1;
                    let b = crate::model::ops::gradcheck::rand_tensor(l.b.dims(), k)?;
                    l.b = Var::from_tensor(&(b * 0.5)?)?;
                }
            }
        }
        m.save_lora(dir, &cfg, "tiny")
    }

    struct Solo<'a> {
        cache: KvCache,
        adapter: Option<&'a AdapterWeights>,
    }

    impl Solo<'_> {
        fn run(&mut self, m: &LlamaModel, tokens: &[u32]) -> Result<Vec<f32>> {
            let ids = Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), &Device::Cpu)?;
            Ok(m.forward_cached_with(&ids, &mut self.cache, self.adapter)?.squeeze(0)?.to_vec1::<f32>()?)
        }
    }

    /// Runs a schedule of steps (per step, each sequence's tokens or nothing) batched and
    /// alone, and returns the largest difference of their logits.
    fn batched_vs_alone(m: &LlamaModel, adapters: &[Option<&AdapterWeights>], schedule: &[Vec<Option<Vec<u32>>>]) -> Result<f32> {
        let n = adapters.len();
        let mut solo: Vec<Solo> = adapters.iter().map(|&adapter| Solo { cache: KvCache::new(), adapter }).collect();
        let mut caches: Vec<KvCache> = (0..n).map(|_| KvCache::new()).collect();
        let mut worst = 0f32;
        for step in schedule {
            let mut seqs = Vec::new();
            let mut who = Vec::new();
            for (i, cache) in caches.iter_mut().enumerate() {
                if let Some(t) = &step[i] {
                    seqs.push(SeqStep { tokens: t, cache, adapter: adapters[i] });
                    who.push(i);
                }
            }
            let got = m.forward_batch(&mut seqs)?;
            for (logits, &i) in got.iter().zip(&who) {
                let want = solo[i].run(m, step[i].as_ref().unwrap())?;
                assert_eq!(logits.len(), want.len());
                for (a, b) in logits.iter().zip(&want) {
                    worst = worst.max((a - b).abs());
                }
            }
        }
        Ok(worst)
    }

    fn schedule() -> Vec<Vec<Option<Vec<u32>>>> {
        let s = |v: &[u32]| Some(v.to_vec());
        vec![
            // Two prompts and a one-token prompt start together.
            vec![s(&[1, 5, 9]), s(&[3, 4, 5, 6, 7]), s(&[2]), None, None],
            // All three decode; a fourth request's prompt arrives between steps.
            vec![s(&[11]), s(&[12]), s(&[13]), s(&[8, 9, 10, 40]), None],
            vec![s(&[21]), None, s(&[23]), s(&[24]), s(&[30, 31])],
            vec![s(&[31]), s(&[32]), s(&[33]), s(&[34]), s(&[35])],
            vec![None, s(&[42]), s(&[43]), None, s(&[45])],
        ]
    }

    #[test]
    fn a_sequence_gets_the_same_logits_batched_with_others_as_alone() -> Result<()> {
        let dir = tempfile::tempdir()?;
        // Every projection in whole blocks of 32 columns, so all of them are packed.
        let mut cfg = LlamaConfig::tiny();
        cfg.intermediate_size = 64;
        let m = packed_tiny(cfg.clone())?;
        assert_eq!(m.packed_count(), 2 * 7 + 2, "every projection, the embedding and the head");
        random_adapter(&m, &dir.path().join("a"), 4, 1)?;
        random_adapter(&m, &dir.path().join("b"), 8, 2)?;
        let a = m.read_adapter(dir.path().join("a"))?;
        let b = m.read_adapter(dir.path().join("b"))?;
        // Base and adapter sequences mixed in one batch, bit for bit as when alone.
        let worst = batched_vs_alone(&m, &[None, Some(&a), Some(&b), None, Some(&a)], &schedule())?;
        assert_eq!(worst, 0.0, "packed weights: logits must not depend on the batch");
        // Dense f32 weights (no compact copies): the batch shares one GEMM; equal to rounding.
        let dense = LlamaModel::random(cfg, 11, &Device::Cpu)?;
        let (da, db) = (dense.read_adapter(dir.path().join("a"))?, dense.read_adapter(dir.path().join("b"))?);
        let worst = batched_vs_alone(&dense, &[Some(&db), None, Some(&da), Some(&da), None], &schedule())?;
        assert!(worst < 1e-4, "dense weights: batched logits differ by {worst}");
        Ok(())
    }

    #[test]
    fn an_unmerged_adapter_gives_the_logits_of_the_adapter_merged_into_the_model() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let base = LlamaModel::random(LlamaConfig::tiny(), 5, &Device::Cpu)?;
        random_adapter(&base, dir.path(), 8, 3)?;
        let adapter = base.read_adapter(dir.path())?;
        assert_eq!(adapter.config.r, 8);
        let mut merged = base.clone();
        merged.load_lora(dir.path())?;
        merged.merge_lora()?;
        let ids = Tensor::from_vec(vec![1u32, 7, 3, 9, 20], (1, 5), &Device::Cpu)?;
        let (mut c1, mut c2, mut c3) = (KvCache::new(), KvCache::new(), KvCache::new());
        let want = merged.forward_cached(&ids, &mut c1)?;
        let got = base.forward_cached_with(&ids, &mut c2, Some(&adapter))?;
        crate::model::ops::gradcheck::assert_close(&got, &want, 1e-4, "unmerged vs merged adapter")?;
        let plain = base.forward_cached(&ids, &mut c3)?;
        let moved = (got - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(moved > 1e-3, "the adapter changes the logits ({moved})");
        Ok(())
    }

    #[test]
    fn an_adapter_for_another_shape_is_refused_with_the_tensor_named() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let base = LlamaModel::random(LlamaConfig::tiny(), 5, &Device::Cpu)?;
        random_adapter(&base, dir.path(), 4, 3)?;
        let mut cfg = LlamaConfig::tiny();
        cfg.intermediate_size = 64;
        let other = LlamaModel::random(cfg, 5, &Device::Cpu)?;
        let err = format!("{:#}", other.read_adapter(dir.path()).unwrap_err());
        assert!(err.contains("mlp.down_proj") && err.contains("expected"), "{err}");
        let adapter = base.read_adapter(dir.path())?;
        let mut cache = KvCache::new();
        let err = other.forward_batch(&mut [SeqStep { tokens: &[1, 2], cache: &mut cache, adapter: Some(&adapter) }]).unwrap_err();
        assert!(format!("{err:#}").contains("read for a model with"), "{err:#}");
        Ok(())
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// Where a decode step's time goes, alone and with 8 sequences, on the SmolLM2 GGUF:
    /// `TUNEBOOK_PROFILE=1 cargo test -p tunebook --lib decode_step_profile -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark"]
    fn decode_step_profile() -> Result<()> {
        let Ok(path) = std::env::var("TUNEBOOK_SMOLLM2_GGUF") else { return Ok(()) };
        let m = LlamaModel::load(&path, &Device::Cpu, DType::F32)?;
        let prompt: Vec<u32> = (0..128).map(|i| 100 + (i * 37) % 5000).collect();
        for n in [1usize, 8] {
            let mut caches: Vec<KvCache> = (0..n).map(|_| KvCache::new()).collect();
            for c in caches.iter_mut() {
                let mut s = [SeqStep { tokens: &prompt, cache: c, adapter: None }];
                m.forward_batch(&mut s)?;
            }
            let _ = ops::profile::take();
            let steps = 32;
            let t0 = std::time::Instant::now();
            for k in 0..steps {
                let toks: Vec<[u32; 1]> = (0..n).map(|i| [(200 + k * 7 + i) as u32]).collect();
                let mut seqs: Vec<SeqStep> =
                    caches.iter_mut().zip(&toks).map(|(c, t)| SeqStep { tokens: t, cache: c, adapter: None }).collect();
                rayon::scope(|_| m.forward_batch(&mut seqs))?;
            }
            let per = t0.elapsed().as_secs_f64() / steps as f64;
            println!("{n} sequences: {:.1} ms/step, {:.1} tok/s", per * 1e3, n as f64 / per);
            for (name, secs, calls) in ops::profile::take() {
                println!("    {name:28} {:7.2} ms/step ({calls} calls)", secs / steps as f64 * 1e3);
            }
        }
        Ok(())
    }
}
