//! The Llama-family decoder: full-sequence forward for training, cached forward for generation.

use super::config::LlamaConfig;
use super::batch::{AdapterWeights, LayerAdapter, LoraRows};
use super::lora::LoraAdapter;
use super::ops::{self, AttentionMask, RopeTable, packed::PackedWeight};
use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor, TensorId, Var};
use std::collections::HashMap;
use std::sync::Arc;

/// A projection `y = x·Wᵀ (+ b) (+ LoRA)`. `weight` is a plain tensor when frozen and a
/// `Var`'s tensor when trained in full.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out, in]`, Hugging Face layout.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// A low-rank adapter added to the output, if any.
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// A projection without bias or adapter.
    pub fn new(weight: Tensor) -> Self {
        Self { weight, bias: None, lora: None }
    }

    /// Applies the projection; `train` enables LoRA dropout.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = match &self.lora {
            Some(l) if !self.weight.is_variable() => {
                ops::lora_linear(x, &self.weight, l.a.as_tensor(), l.b.as_tensor(), l.scale, l.dropout, train)?
            }
            Some(l) => (ops::linear(x, &self.weight)? + l.forward(x, train)?)?,
            None => ops::linear(x, &self.weight)?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }

    /// Input and output sizes.
    pub fn in_out(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[1], d[0])
    }
}

/// Attention projections of one layer.
#[derive(Clone, Debug)]
pub struct SelfAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

/// The SwiGLU MLP of one layer.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// One decoder block.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: Tensor,
    pub self_attn: SelfAttention,
    pub post_attention_layernorm: Tensor,
    pub mlp: Mlp,
}

/// A training forward pass cut into segments (embedding, each decoder layer, the final
/// norm with the LM head and loss) whose backward pass runs one segment at a time.
///
/// candle's backward keeps the whole forward graph alive until it returns, so a step's
/// peak memory held every layer's activations *and* every gradient. Here each segment
/// starts from a leaf copy of the previous segment's output: the backward pass goes
/// through the loss's segment first, then hands the gradient of each segment's input to
/// the segment before it and drops the segment, freeing its activations, as PyTorch
/// does. The gradients are the same as one backward pass over the whole graph.
pub struct LossTape {
    loss: Tensor,
    head_input: Option<Var>,
    /// `(input leaf, output)` per decoder layer, first to last. The leaf is `None` when
    /// nothing upstream of the layer trains.
    layers: Vec<(Option<Var>, Tensor)>,
    /// The embedding lookup, when the embedding trains.
    embedding: Option<Tensor>,
}

impl LossTape {
    /// The loss, a scalar.
    pub fn loss(&self) -> &Tensor {
        &self.loss
    }

    /// Gradients of `scale × loss` for every variable the forward pass used, keyed like
    /// candle's [`GradStore`](candle_core::backprop::GradStore). Consumes the tape,
    /// freeing each segment's activations once its gradients are taken.
    pub fn backward(self, scale: f64) -> Result<candle_core::backprop::GradStore> {
        let LossTape { loss, head_input, mut layers, embedding } = self;
        let mut grads = (loss * scale)?.backward()?;
        let mut upstream = head_input.and_then(|v| grads.remove(v.as_tensor()));
        while let Some((input, output)) = layers.pop() {
            let Some(g) = upstream.take() else { break };
            let mut seg = ops::seed_gradient(&output, &g)?.backward()?;
            drop(output);
            upstream = input.and_then(|v| seg.remove(v.as_tensor()));
            grads.extend(seg)?;
        }
        if let (Some(e), Some(g)) = (embedding, upstream) {
            grads.extend(ops::seed_gradient(&e, &g)?.backward()?)?;
        }
        Ok(grads)
    }
}

/// Next-token targets: `labels` shifted left by one within each packed sequence.
fn shifted_labels(labels: &[i64], packing: &Packing, b: usize, t: usize) -> Result<Vec<i64>> {
    if t == 0 {
        bail!("loss: the sequence is empty");
    }
    if labels.len() != b * t {
        bail!("loss: {} labels for a batch of {b}×{t}", labels.len());
    }
    if let Some(s) = &packing.segment_ids {
        if s.len() != b * t {
            bail!("packing: {} segment ids for a batch of {b}×{t}", s.len());
        }
    }
    let mut shifted = vec![ops::IGNORE_INDEX; b * t];
    for bi in 0..b {
        for ti in 0..t - 1 {
            let next = labels[bi * t + ti + 1];
            // A packed sequence's last token does not predict the next sequence's first.
            let same = packing.segment_ids.as_ref().is_none_or(|s| s[bi * t + ti] == s[bi * t + ti + 1]);
            if same {
                shifted[bi * t + ti] = next;
            }
        }
    }
    Ok(shifted)
}

/// Keys and values of past tokens, one entry per layer, for generation.
///
/// Each layer keeps `[B, capacity, Hkv·D]` buffers that new tokens are written into in
/// place; capacity doubles when full, so a decode step copies one token's keys and values
/// instead of the whole history. A clone shares the written part (which is never written
/// again) and gets buffers of its own on its first append.
#[derive(Debug, Default)]
pub struct KvCache {
    pub(super) layers: Vec<Option<(Tensor, Tensor)>>,
    pub(super) len: usize,
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        let len = self.len;
        // Views of exactly the written tokens: full, so the clone's next append reallocates.
        let layers = self
            .layers
            .iter()
            .map(|l| l.as_ref().and_then(|(k, v)| Some((k.narrow(1, 0, len).ok()?, v.narrow(1, 0, len).ok()?))))
            .collect();
        Self { layers, len }
    }
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Appends `new` (`[B, t, C]`) after the first `len` tokens of the layer buffer `slot`
/// (`[B, capacity, C]`), growing it when full; returns a view of all `len + t` tokens.
pub(super) fn kv_append(slot: &mut Option<Tensor>, len: usize, new: &Tensor) -> Result<Tensor> {
    let new = new.contiguous()?;
    let (b, t, c) = new.dims3()?;
    let cap = match slot.as_ref() {
        Some(buf) => buf.dim(1)?,
        None => 0,
    };
    if len + t > cap || slot.is_none() {
        let cap = (len + t).max(2 * cap).max(64);
        let buf = Tensor::zeros((b, cap, c), new.dtype(), new.device())?;
        if let (Some(old), true) = (slot.as_ref(), len > 0) {
            buf.slice_set(&old.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
        }
        *slot = Some(buf);
    }
    let buf = slot.as_ref().context("kv cache: no buffer")?;
    buf.slice_set(&new, 1, len)?;
    Ok(buf.narrow(1, 0, len + t)?)
}

/// How the tokens of a batch are laid out: positions restart at 0 in every packed
/// sequence, and tokens attend only within their segment.
#[derive(Clone, Debug, Default)]
pub struct Packing {
    /// Position of every token, `[B, T]` row-major; `None` means `0..T` in each row.
    pub positions: Option<Vec<u32>>,
    /// Segment id of every token, `[B, T]` row-major; `None` means one sequence per row.
    pub segment_ids: Option<Vec<u32>>,
}

impl Packing {
    /// Derives positions from segment ids (restarting at each change of id).
    pub fn from_segments(segment_ids: Vec<u32>, batch: usize, seq: usize) -> Result<Self> {
        if segment_ids.len() != batch * seq {
            bail!("packing: {} segment ids for a batch of {batch}×{seq}", segment_ids.len());
        }
        let mut positions = vec![0u32; batch * seq];
        for b in 0..batch {
            for t in 1..seq {
                let i = b * seq + t;
                positions[i] = if segment_ids[i] == segment_ids[i - 1] { positions[i - 1] + 1 } else { 0 };
            }
        }
        Ok(Self { positions: Some(positions), segment_ids: Some(segment_ids) })
    }
}

/// A Llama-family causal language model (Llama 2/3.x, Mistral, Qwen2, SmolLM2).
///
/// Tensor names follow Hugging Face (`model.layers.{i}.self_attn.q_proj.weight`, ...). The
/// training path ([`forward`](Self::forward), [`loss`](Self::loss)) keeps no state between
/// calls; generation passes an explicit [`KvCache`].
#[derive(Clone, Debug)]
pub struct LlamaModel {
    pub config: LlamaConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
    pub(super) rope: RopeTable,
    device: Device,
    dtype: DType,
    /// Compact exact copies of frozen weights for decoding, keyed by the dense tensor they
    /// mirror (a weight replaced or made trainable has a new id and is no longer mirrored).
    pub(super) packed: Arc<HashMap<TensorId, Arc<PackedWeight>>>,
    /// Decode steps round activations to 8 bits for Q4 weights ([`set_int8_activations`](Self::set_int8_activations)).
    pub(super) int8_activations: bool,
}

impl LlamaModel {
    /// Builds the model from Hugging Face-named tensors supplied by `get` (which returns
    /// `None` for a missing name). Every shape is checked against the config.
    pub fn from_tensors(
        config: LlamaConfig,
        device: &Device,
        dtype: DType,
        mut get: impl FnMut(&str) -> Result<Option<Tensor>>,
    ) -> Result<Self> {
        config.validate()?;
        if device.is_cpu() {
            ops::tune_cpu_runtime();
        }
        let (h, i, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let (nh, nkv, d) = (config.num_attention_heads, config.num_key_value_heads, config.head_dim());
        let mut load = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = get(name)?.with_context(|| format!("weights: tensor `{name}` is missing (expected shape {shape:?})"))?;
            if t.dims() != shape {
                bail!("weights: tensor `{name}` has shape {:?}, expected {shape:?} from the config", t.dims());
            }
            Ok(t.to_device(device)?.to_dtype(dtype)?)
        };
        let embed_tokens = load("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                let weight = load(&format!("{p}.{name}.weight"), &[out, inp])?;
                let bias = if bias { Some(load(&format!("{p}.{name}.bias"), &[out])?) } else { None };
                Ok(Linear { weight, bias, lora: None })
            };
            let self_attn = SelfAttention {
                q_proj: lin("self_attn.q_proj", nh * d, h, config.qkv_bias)?,
                k_proj: lin("self_attn.k_proj", nkv * d, h, config.qkv_bias)?,
                v_proj: lin("self_attn.v_proj", nkv * d, h, config.qkv_bias)?,
                o_proj: lin("self_attn.o_proj", h, nh * d, config.o_bias)?,
            };
            let mlp = Mlp {
                gate_proj: lin("mlp.gate_proj", i, h, config.mlp_bias)?,
                up_proj: lin("mlp.up_proj", i, h, config.mlp_bias)?,
                down_proj: lin("mlp.down_proj", h, i, config.mlp_bias)?,
            };
            layers.push(DecoderLayer {
                input_layernorm: load(&format!("{p}.input_layernorm.weight"), &[h])?,
                self_attn,
                post_attention_layernorm: load(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp,
            });
        }
        let norm = load("model.norm.weight", &[h])?;
        let lm_head = if config.tie_word_embeddings { None } else { Some(load("lm_head.weight", &[v, h])?) };
        let rope = RopeTable::new(&config);
        Ok(Self { config, embed_tokens, layers, norm, lm_head, rope, device: device.clone(), dtype, packed: Arc::new(HashMap::new()), int8_activations: false })
    }

    /// Registers compact decode copies for the tensors named (Hugging Face names).
    pub(crate) fn set_packed(&mut self, by_name: HashMap<String, PackedWeight>) {
        let mut map = HashMap::new();
        for (name, t) in self.named_tensors() {
            if let Some(p) = by_name.get(&name) {
                if p.dims() == (t.dims()[0], t.dims().get(1).copied().unwrap_or(0)) {
                    map.insert(t.id(), Arc::new(p.clone()));
                }
            }
        }
        self.packed = Arc::new(map);
    }

    /// Decode steps multiply Q4 weights with activations rounded to 8 bits per block of
    /// 32 and summed in integers, as llama.cpp does ([`PackedWeight::matmul_int8`]):
    /// faster, most of all for batches, but no longer exact. Off by default; evaluation
    /// and `generate` keep the exact path.
    ///
    /// [`PackedWeight::matmul_int8`]: super::ops::packed::PackedWeight::matmul_int8
    pub fn set_int8_activations(&mut self, on: bool) {
        self.int8_activations = on;
    }

    /// How many weights have a compact decode copy.
    pub fn packed_count(&self) -> usize {
        self.packed.len()
    }

    /// `x·Wᵀ` through the compact copy of `w` when `x` is one untracked f32 CPU row and `w` is
    /// frozen and mirrored; `None` otherwise.
    fn packed_matvec(&self, x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
        if x.elem_count() != x.dim(D::Minus1)? {
            return Ok(None);
        }
        self.packed_rows(x, w)
    }

    /// A projection, using the compact decode copy when it applies; `extra` is an
    /// adapter applied on top without being attached to the model (serving).
    fn project(&self, lin: &Linear, extra: Option<&LoraRows>, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = 'base: {
            if !train {
                if let Some(mut y) = self.packed_matvec(x, &lin.weight)? {
                    if let Some(b) = &lin.bias {
                        y = y.broadcast_add(b)?;
                    }
                    if let Some(l) = &lin.lora {
                        y = (y + l.forward(x, false)?)?;
                    }
                    break 'base y;
                }
            }
            lin.forward(x, train)?
        };
        if let Some(e) = extra {
            y = e.apply(x, y)?;
        }
        Ok(y)
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The LM head weight (the embedding when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Every base tensor with its Hugging Face name (LoRA adapters excluded).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.clone())];
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), layer.input_layernorm.clone()));
            out.push((format!("{p}.post_attention_layernorm.weight"), layer.post_attention_layernorm.clone()));
            for (name, lin) in layer.linears() {
                out.push((format!("{p}.{name}.weight"), lin.weight.clone()));
                if let Some(b) = &lin.bias {
                    out.push((format!("{p}.{name}.bias"), b.clone()));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(w) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), w.clone()));
        }
        out
    }

    /// Calls `f` with every base tensor and its Hugging Face name, allowing replacement.
    pub fn visit_tensors_mut(&mut self, mut f: impl FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        f("model.embed_tokens.weight", &mut self.embed_tokens)?;
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{l}");
            f(&format!("{p}.input_layernorm.weight"), &mut layer.input_layernorm)?;
            f(&format!("{p}.post_attention_layernorm.weight"), &mut layer.post_attention_layernorm)?;
            for (name, lin) in layer.linears_mut() {
                f(&format!("{p}.{name}.weight"), &mut lin.weight)?;
                if let Some(b) = &mut lin.bias {
                    f(&format!("{p}.{name}.bias"), b)?;
                }
            }
        }
        f("model.norm.weight", &mut self.norm)?;
        if let Some(w) = &mut self.lm_head {
            f("lm_head.weight", w)?;
        }
        Ok(())
    }

    /// Makes every base weight trainable (full fine-tuning): each becomes a `Var`.
    pub fn unfreeze_all(&mut self) -> Result<()> {
        self.visit_tensors_mut(|_, t| {
            *t = Var::from_tensor(t)?.as_tensor().clone();
            Ok(())
        })
    }

    /// Freezes every base weight (plain tensors: no gradient is computed or stored for them).
    pub fn freeze_all(&mut self) -> Result<()> {
        self.visit_tensors_mut(|_, t| {
            if t.is_variable() {
                *t = t.detach();
            }
            Ok(())
        })
    }

    /// Every trainable parameter (base weights made trainable and LoRA matrices) with its
    /// name: Hugging Face names for base weights, PEFT names (`…q_proj.lora_A.weight`) for adapters.
    pub fn trainable_vars(&self) -> Result<Vec<(String, Var)>> {
        let mut out = Vec::new();
        for (name, t) in self.named_tensors() {
            if t.is_variable() {
                out.push((name, Var::from_tensor(&t)?));
            }
        }
        for (l, layer) in self.layers.iter().enumerate() {
            for (name, lin) in layer.linears() {
                if let Some(lora) = &lin.lora {
                    let p = format!("model.layers.{l}.{name}");
                    out.push((format!("{p}.lora_A.weight"), lora.a.clone()));
                    out.push((format!("{p}.lora_B.weight"), lora.b.clone()));
                }
            }
        }
        Ok(out)
    }

    /// Number of parameters (base weights, tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        self.named_tensors().iter().map(|(_, t)| t.elem_count()).sum()
    }

    fn check_ids(&self, input_ids: &Tensor) -> Result<(usize, usize, Tensor)> {
        let (b, t) = input_ids.dims2().context("input_ids must be [batch, seq]")?;
        if t == 0 {
            bail!("input_ids: the sequence is empty");
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if max >= self.config.vocab_size {
            bail!("input_ids: token id {max} is outside the vocabulary (size {})", self.config.vocab_size);
        }
        Ok((b, t, ids.to_device(&self.device)?))
    }

    /// Token ids on the model's device, the rotary table for the batch's positions and
    /// the attention mask of its packing.
    fn prepare(&self, input_ids: &Tensor, packing: &Packing) -> Result<(Tensor, ops::Rope, AttentionMask)> {
        let (b, t, ids) = self.check_ids(input_ids)?;
        let default_pos;
        let positions = match &packing.positions {
            Some(p) => p.as_slice(),
            None => {
                default_pos = (0..b).flat_map(|_| 0..t as u32).collect::<Vec<_>>();
                default_pos.as_slice()
            }
        };
        let rope = self.rope.at(positions, b, t)?;
        if let Some(s) = &packing.segment_ids {
            if s.len() != b * t {
                bail!("packing: {} segment ids for a batch of {b}×{t}", s.len());
            }
        }
        let mask = AttentionMask {
            segments: packing.segment_ids.as_ref().map(|s| Arc::new(s.clone())),
            sliding_window: self.config.sliding_window,
        };
        Ok((ids, rope, mask))
    }

    /// Final hidden states `[B, T, H]` (after the last norm) for `input_ids` `[B, T]`.
    pub fn hidden_states(&self, input_ids: &Tensor, packing: &Packing, train: bool) -> Result<Tensor> {
        let (ids, rope, mask) = self.prepare(input_ids, packing)?;
        let (b, t) = ids.dims2()?;
        let mut x = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.config.hidden_size))?;
        for layer in &self.layers {
            x = self.layer_forward(layer, &x, &rope, &mask, None, None, train)?;
        }
        Ok(ops::rms_norm(&x, &self.norm, self.config.rms_norm_eps)?)
    }

    fn layer_forward(
        &self,
        layer: &DecoderLayer,
        x: &Tensor,
        rope: &ops::Rope,
        mask: &AttentionMask,
        cache: Option<(&mut Option<(Tensor, Tensor)>, usize)>,
        adapter: Option<&LayerAdapter>,
        train: bool,
    ) -> Result<Tensor> {
        let ad = |i: usize| adapter.and_then(|a: &LayerAdapter| a[i].as_ref());
        let c = &self.config;
        let d = c.head_dim();
        let eps = c.rms_norm_eps;
        let h = ops::rms_norm(x, &layer.input_layernorm, eps)?;
        let a = &layer.self_attn;
        // [B, T, heads·D] throughout: rope and attention read the heads from the layout.
        let q = rope.apply(&self.project(&a.q_proj, ad(0), &h, train)?)?;
        let mut k = rope.apply(&self.project(&a.k_proj, ad(1), &h, train)?)?;
        let mut v = self.project(&a.v_proj, ad(2), &h, train)?;
        if let Some((slot, len)) = cache {
            let (mut kb, mut vb) = slot.take().unzip();
            k = kv_append(&mut kb, len, &k)?;
            v = kv_append(&mut vb, len, &v)?;
            *slot = kb.zip(vb);
        }
        let att = ops::attention_flat(&q, &k, &v, d, mask)?;
        let x = (x + self.project(&a.o_proj, ad(3), &att, train)?)?;
        let h = ops::rms_norm(&x, &layer.post_attention_layernorm, eps)?;
        let m = &layer.mlp;
        // A decode step (one row) runs the two largest projections side by side.
        let (gate, up) = if !train && h.elem_count() == h.dim(D::Minus1)? {
            let (g, u) = rayon::join(|| self.project(&m.gate_proj, ad(4), &h, train), || self.project(&m.up_proj, ad(5), &h, train));
            (g?, u?)
        } else {
            (self.project(&m.gate_proj, ad(4), &h, train)?, self.project(&m.up_proj, ad(5), &h, train)?)
        };
        let act = ops::swiglu(&gate, &up)?;
        Ok((&x + self.project(&m.down_proj, ad(6), &act, train)?)?)
    }

    /// Logits `[B, T, V]` for every position of `input_ids` `[B, T]` (u32 token ids).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_packed(input_ids, &Packing::default(), false)
    }

    /// Logits `[B, T, V]` with explicit positions / segments; `train` enables dropout.
    pub fn forward_packed(&self, input_ids: &Tensor, packing: &Packing, train: bool) -> Result<Tensor> {
        let h = self.hidden_states(input_ids, packing, train)?;
        Ok(ops::linear(&h, self.lm_head_weight())?)
    }

    /// Mean next-token cross-entropy, Hugging Face semantics: `labels` (`[B, T]`, same
    /// layout as `input_ids`, [`ops::IGNORE_INDEX`] to skip) are shifted inside, so
    /// position `t` predicts `labels[t + 1]`. The `[tokens, vocab]` logits are never
    /// materialised on the CPU.
    pub fn loss(&self, input_ids: &Tensor, labels: &[i64], packing: &Packing, train: bool) -> Result<Tensor> {
        let (b, t) = input_ids.dims2().context("input_ids must be [batch, seq]")?;
        let shifted = shifted_labels(labels, packing, b, t)?;
        let h = self.hidden_states(input_ids, packing, train)?.reshape((b * t, self.config.hidden_size))?;
        Ok(ops::lm_head_cross_entropy(&h, self.lm_head_weight(), &shifted)?)
    }

    /// The training loss of [`loss`](Self::loss), recorded for a backward pass that runs one
    /// decoder layer at a time (see [`LossTape`]): the same gradients, but each layer's
    /// activations are freed as soon as its gradients are computed instead of when the
    /// whole backward pass ends.
    pub fn loss_tape(&self, input_ids: &Tensor, labels: &[i64], packing: &Packing, train: bool) -> Result<LossTape> {
        let (b, t) = input_ids.dims2().context("input_ids must be [batch, seq]")?;
        let shifted = shifted_labels(labels, packing, b, t)?;
        let (ids, rope, mask) = self.prepare(input_ids, packing)?;
        let embedded = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.config.hidden_size))?;
        // Each segment starts from a fresh leaf holding the previous segment's output, so
        // its graph ends there; the leaf is a variable only when something upstream trains.
        let leaf = |x: &Tensor| -> Result<(Option<Var>, Tensor)> {
            if x.track_op() {
                let v = Var::from_tensor(&x.detach())?;
                let t = v.as_tensor().clone();
                Ok((Some(v), t))
            } else {
                Ok((None, x.detach()))
            }
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        let embedding = embedded.track_op().then(|| embedded.clone());
        let mut x = embedded;
        for layer in &self.layers {
            let (input, xin) = leaf(&x)?;
            x = self.layer_forward(layer, &xin, &rope, &mask, None, None, train)?;
            layers.push((input, x.clone()));
        }
        let (head_input, xin) = leaf(&x)?;
        drop(x);
        let h = ops::rms_norm(&xin, &self.norm, self.config.rms_norm_eps)?.reshape((b * t, self.config.hidden_size))?;
        let loss = ops::lm_head_cross_entropy(&h, self.lm_head_weight(), &shifted)?;
        Ok(LossTape { loss, head_input, layers, embedding })
    }

    /// Runs `input_ids` (`[B, T]`) after the tokens already in `cache`, appends their keys and
    /// values, and returns the logits of the last position, `[B, V]`.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.forward_cached_with(input_ids, cache, None)
    }

    /// [`forward_cached`](Self::forward_cached) with a LoRA adapter applied on top of the
    /// base weights, unmerged (the model itself is not changed).
    pub fn forward_cached_with(&self, input_ids: &Tensor, cache: &mut KvCache, adapter: Option<&AdapterWeights>) -> Result<Tensor> {
        let (b, t, ids) = self.check_ids(input_ids)?;
        if let Some(a) = adapter {
            a.check_fits(self)?;
        }
        if b == 1 && t == 1 {
            // A decode step: the batched decode path with one sequence.
            let tok = ids.flatten_all()?.to_vec1::<u32>()?;
            let mut seq = super::batch::SeqStep { tokens: &tok, cache, adapter };
            let logits = self.decode_rows(&mut [&mut seq])?.pop().context("decode step: no logits")?;
            return Ok(Tensor::from_vec(logits, (1, self.config.vocab_size), &self.device)?.to_dtype(self.dtype)?);
        }
        let x = self.cached_hidden(&ids, b, t, cache, adapter)?;
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?;
        let last = ops::rms_norm(&last, &self.norm, self.config.rms_norm_eps)?;
        if b == 1 {
            if let Some(y) = self.packed_matvec(&last, self.lm_head_weight())? {
                return Ok(y);
            }
        }
        Ok(ops::linear(&last, self.lm_head_weight())?)
    }

    /// The hidden states `[B, T, C]` (before the final norm) of `ids` run after the tokens
    /// in `cache`, whose keys and values are appended.
    fn cached_hidden(&self, ids: &Tensor, b: usize, t: usize, cache: &mut KvCache, adapter: Option<&AdapterWeights>) -> Result<Tensor> {
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
            cache.len = 0;
        }
        let off = cache.len as u32;
        let positions: Vec<u32> = (0..b).flat_map(|_| off..off + t as u32).collect();
        let rope = self.rope.at(&positions, b, t)?;
        let mask = AttentionMask { segments: None, sliding_window: self.config.sliding_window };
        let mut x = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.config.hidden_size))?;
        let len = cache.len;
        for (l, (layer, slot)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let ad = adapter.map(|a| &a.layers[l]);
            x = self.layer_forward(layer, &x, &rope, &mask, Some((slot, len)), ad, false)?;
        }
        cache.len += t;
        Ok(x)
    }

    /// Like [`forward_cached_with`](Self::forward_cached_with), but the logits of every new
    /// position, `[B, T, V]` in f32.
    pub fn forward_cached_all_with(&self, input_ids: &Tensor, cache: &mut KvCache, adapter: Option<&AdapterWeights>) -> Result<Tensor> {
        let (b, t, ids) = self.check_ids(input_ids)?;
        if let Some(a) = adapter {
            a.check_fits(self)?;
        }
        let x = self.cached_hidden(&ids, b, t, cache, adapter)?;
        let x = ops::rms_norm(&x.reshape((b * t, self.config.hidden_size))?, &self.norm, self.config.rms_norm_eps)?;
        Ok(ops::linear(&x, self.lm_head_weight())?.to_dtype(DType::F32)?.reshape((b, t, self.config.vocab_size))?)
    }

    /// A copy of `cache` whose every layer holds its tokens `n` times over (batch `n`), so
    /// `n` continuations of one shared prefix run as one batch.
    pub fn repeat_cache(cache: &KvCache, n: usize) -> Result<KvCache> {
        let len = cache.len;
        let mut layers = Vec::with_capacity(cache.layers.len());
        for l in &cache.layers {
            layers.push(match l {
                Some((k, v)) => {
                    let rep = |x: &Tensor| -> Result<Tensor> {
                        let x = x.narrow(1, 0, len)?;
                        if x.dim(0)? != 1 {
                            bail!("repeat_cache: the cache holds a batch of {}, not 1", x.dim(0)?);
                        }
                        Ok(x.repeat((n, 1, 1))?)
                    };
                    Some((rep(k)?, rep(v)?))
                }
                None => None,
            });
        }
        Ok(KvCache { layers, len })
    }

    /// Log-probabilities `[B, T, V]` (convenience for evaluation; materialises all logits).
    pub fn log_probs(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::log_softmax(&self.forward(input_ids)?, D::Minus1)?)
    }
}

impl DecoderLayer {
    /// The seven projections with their Hugging Face sub-names (`self_attn.q_proj`, ...).
    pub fn linears(&self) -> [(&'static str, &Linear); 7] {
        [
            ("self_attn.q_proj", &self.self_attn.q_proj),
            ("self_attn.k_proj", &self.self_attn.k_proj),
            ("self_attn.v_proj", &self.self_attn.v_proj),
            ("self_attn.o_proj", &self.self_attn.o_proj),
            ("mlp.gate_proj", &self.mlp.gate_proj),
            ("mlp.up_proj", &self.mlp.up_proj),
            ("mlp.down_proj", &self.mlp.down_proj),
        ]
    }

    /// The seven projections, mutable.
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        let SelfAttention { q_proj, k_proj, v_proj, o_proj } = &mut self.self_attn;
        let Mlp { gate_proj, up_proj, down_proj } = &mut self.mlp;
        [
            ("self_attn.q_proj", q_proj),
            ("self_attn.k_proj", k_proj),
            ("self_attn.v_proj", v_proj),
            ("self_attn.o_proj", o_proj),
            ("mlp.gate_proj", gate_proj),
            ("mlp.up_proj", up_proj),
            ("mlp.down_proj", down_proj),
        ]
    }
}
