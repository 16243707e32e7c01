//! Loading and saving weights: Hugging Face directories (sharded safetensors), GGUF files,
//! Hugging Face ids through the local hub cache; atomic writes.

use super::config::{LlamaConfig, RopeScaling};
use super::llama::LlamaModel;
use super::ops;
use anyhow::{Context, Result, anyhow, bail};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};


fn st_dtype(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F64 => "F64",
        DType::U32 => "U32",
        DType::I64 => "I64",
        DType::U8 => "U8",
        other => bail!("safetensors: dtype {other:?} cannot be saved"),
    })
}

/// The data of one safetensors entry.
pub enum TensorData<'a> {
    /// A tensor on any device; copied to the CPU (when elsewhere) one tensor at a time.
    Tensor(Tensor),
    /// f32 values already in memory, with their shape; written without a copy.
    F32(&'a [f32], Vec<usize>),
}

impl TensorData<'_> {
    fn dtype(&self) -> DType {
        match self {
            TensorData::Tensor(t) => t.dtype(),
            TensorData::F32(..) => DType::F32,
        }
    }

    fn shape(&self) -> Vec<usize> {
        match self {
            TensorData::Tensor(t) => t.dims().to_vec(),
            TensorData::F32(_, shape) => shape.clone(),
        }
    }

    fn byte_len(&self) -> usize {
        match self {
            TensorData::Tensor(t) => t.elem_count() * t.dtype().size_in_bytes(),
            TensorData::F32(v, _) => v.len() * 4,
        }
    }
}

/// Serialises tensors to a safetensors file (metadata `format: pt`, as transformers writes),
/// atomically. Names are sorted; tensors are copied to the CPU.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    write_safetensors_data(path, tensors.iter().map(|(n, t)| (n.clone(), TensorData::Tensor(t.clone()))).collect())
}

/// [`write_safetensors`] for tensors and in-memory f32 buffers alike. The file is streamed
/// to a temporary file beside `path` (through a small buffer, never the whole file in
/// memory), synced, then renamed over `path`.
pub fn write_safetensors_data(path: &Path, mut entries: Vec<(String, TensorData<'_>)>) -> Result<()> {
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, d) in &entries {
        if let TensorData::F32(v, shape) = d {
            if shape.iter().product::<usize>() != v.len() {
                bail!("safetensors: `{name}` has {} values but shape {shape:?}", v.len());
            }
        }
        let len = d.byte_len();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": st_dtype(d.dtype()).with_context(|| format!("tensor `{name}`"))?, "shape": d.shape(), "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    crate::files::write_atomic_with(path, |w| {
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        for (name, d) in &entries {
            match d {
                TensorData::F32(v, _) => write_le(w, v, |x| x.to_le_bytes())?,
                TensorData::Tensor(t) => write_tensor(w, t).with_context(|| format!("writing tensor `{name}`"))?,
            }
        }
        Ok(())
    })
}

/// Writes a tensor's values little-endian, straight from its CPU storage.
fn write_tensor(w: &mut impl Write, t: &Tensor) -> Result<()> {
    use candle_core::{CpuStorage, Storage};
    let t = t.to_device(&Device::Cpu)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { bail!("tensor is not on the CPU after copying it there") };
    let (a, b) = layout.contiguous_offsets().context("tensor is not contiguous")?;
    match cpu {
        CpuStorage::F32(v) => write_le(w, &v[a..b], |x| x.to_le_bytes())?,
        CpuStorage::BF16(v) => write_le(w, &v[a..b], |x| x.to_le_bytes())?,
        CpuStorage::F16(v) => write_le(w, &v[a..b], |x| x.to_le_bytes())?,
        CpuStorage::F64(v) => write_le(w, &v[a..b], |x| x.to_le_bytes())?,
        CpuStorage::U32(v) => write_le(w, &v[a..b], |x| x.to_le_bytes())?,
        CpuStorage::I64(v) => write_le(w, &v[a..b], |x| x.to_le_bytes())?,
        CpuStorage::U8(v) => w.write_all(&v[a..b])?,
        other => bail!("dtype {:?} cannot be saved", candle_core::backend::BackendStorage::dtype(other)),
    }
    Ok(())
}

/// Writes `values` little-endian through a fixed 64 KiB buffer.
fn write_le<T: Copy, const N: usize>(w: &mut impl Write, values: &[T], bytes: impl Fn(T) -> [u8; N]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(64 << 10);
    for chunk in values.chunks((64 << 10) / N.max(1)) {
        buf.clear();
        for &x in chunk {
            buf.extend_from_slice(&bytes(x));
        }
        w.write_all(&buf)?;
    }
    Ok(())
}

/// Where a model's files are.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    /// A Hugging Face-layout directory (`config.json`, `*.safetensors`, tokenizer files).
    HfDir(PathBuf),
    /// A single GGUF file (weights, tokenizer and chat template in its metadata).
    Gguf(PathBuf),
}

impl ModelSource {
    /// The directory holding the tokenizer files (`tokenizer.json`, `tokenizer_config.json`,
    /// `generation_config.json`), when the model has one.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            ModelSource::HfDir(d) => Some(d),
            ModelSource::Gguf(_) => None,
        }
    }

    /// The directory or GGUF file itself (what [`crate::tokenize::Tokenizer::load`] takes).
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::HfDir(p) | ModelSource::Gguf(p) => p,
        }
    }
}

/// The local Hugging Face hub cache: `$HF_HUB_CACHE`, `$HUGGINGFACE_HUB_CACHE`, `$HF_HOME/hub`,
/// or `~/.cache/huggingface/hub`.
pub fn hf_cache_dir() -> PathBuf {
    for var in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"] {
        if let Some(v) = std::env::var_os(var) {
            return PathBuf::from(v);
        }
    }
    if let Some(v) = std::env::var_os("HF_HOME") {
        return PathBuf::from(v).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

/// Resolves a model given as a local directory, a `.gguf` file, or a Hugging Face id
/// (`org/name`, optionally `@revision`) found in the local hub cache. Nothing is downloaded:
/// a missing file is an error that names it.
pub fn resolve_model(spec: &str) -> Result<ModelSource> {
    resolve_model_in(spec, &hf_cache_dir())
}

/// [`resolve_model`] against a given hub cache directory.
pub fn resolve_model_in(spec: &str, cache: &Path) -> Result<ModelSource> {
    let p = Path::new(spec);
    if p.is_file() {
        if spec.ends_with(".gguf") {
            return Ok(ModelSource::Gguf(p.to_path_buf()));
        }
        bail!("{spec}: a model file must be a .gguf; for safetensors weights pass the directory that holds config.json");
    }
    if p.is_dir() {
        if !p.join("config.json").is_file() {
            bail!("{spec}: the directory has no config.json, so it is not a Hugging Face model directory");
        }
        return Ok(ModelSource::HfDir(p.to_path_buf()));
    }
    if spec.ends_with(".gguf") || spec.starts_with('/') || spec.starts_with('.') {
        bail!("{spec}: no such file or directory");
    }
    let (id, revision) = spec.split_once('@').unwrap_or((spec, "main"));
    if id.split('/').count() != 2 || id.split('/').any(|s| s.is_empty()) {
        bail!("{spec}: not a local path, and not a Hugging Face id of the form org/name");
    }
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snapshot = if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) {
        repo.join("snapshots").join(revision)
    } else {
        let r = repo.join("refs").join(revision);
        let commit = std::fs::read_to_string(&r).map_err(|_| {
            anyhow!(
                "model `{id}` is not in the local Hugging Face cache: {} is missing. This machine cannot download it; \
                 copy the model there (e.g. `huggingface-cli download {id}` on a connected machine) or pass a local directory",
                r.display()
            )
        })?;
        repo.join("snapshots").join(commit.trim())
    };
    let cfg = snapshot.join("config.json");
    if !cfg.is_file() {
        bail!("model `{id}`: {} is missing from the local Hugging Face cache (offline: nothing can be downloaded)", cfg.display());
    }
    Ok(ModelSource::HfDir(snapshot))
}

/// The safetensors files of a Hugging Face directory: the shards listed by
/// `model.safetensors.index.json`, or `model.safetensors`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no `weight_map` object", index.display()))?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        for p in &paths {
            if !p.is_file() {
                bail!("{} is listed in {} but missing", p.display(), index.display());
            }
        }
        return Ok(paths);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    if dir.join("pytorch_model.bin").is_file() {
        bail!("{}: only pytorch_model.bin found; tunebook reads safetensors (convert with transformers' save_pretrained(safe_serialization=True))", dir.display());
    }
    bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display())
}

impl LlamaModel {
    /// Loads a model from a local directory, a `.gguf` file or a Hugging Face id in the local cache.
    pub fn load(spec: &str, device: &Device, dtype: DType) -> Result<Self> {
        if device.is_cpu() {
            ops::tune_cpu_runtime();
        }
        match resolve_model(spec)? {
            ModelSource::HfDir(d) => Self::from_hf_dir(&d, device, dtype),
            ModelSource::Gguf(p) => Self::from_gguf(&p, device, dtype),
        }
    }

    /// Loads `config.json` and the (possibly sharded) safetensors of a Hugging Face directory.
    pub fn from_hf_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
        let config = LlamaConfig::from_hf_json(&text).with_context(|| format!("in {}", cfg_path.display()))?;
        let files = safetensors_files(dir)?;
        // SAFETY: the files are memory-mapped read-only; tunebook never writes to them while loaded.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files)? };
        let names: std::collections::HashSet<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        let mut packed = HashMap::new();
        let keep_bf16 = device.is_cpu() && dtype == DType::F32 && decode_copies();
        let mut model = Self::from_tensors(config, device, dtype, |name| {
            if !names.contains(name) {
                return Ok(None);
            }
            let t = st.load(name, &Device::Cpu).with_context(|| format!("reading tensor `{name}` from {}", dir.display()))?;
            let f = t.to_dtype(DType::F32)?;
            if keep_bf16 && t.dtype() == DType::BF16 && t.rank() == 2 {
                let (r, c) = t.dims2()?;
                if let Some(p) = ops::packed::PackedWeight::from_bf16_exact(&f.flatten_all()?.to_vec1::<f32>()?, r, c) {
                    packed.insert(name.to_string(), p);
                }
            }
            Ok(Some(f))
        })
        .with_context(|| format!("loading {}", dir.display()))?;
        model.set_packed(packed);
        Ok(model)
    }

    /// Loads a GGUF file (`llama` or `qwen2` architecture), dequantising every tensor to f32 and
    /// undoing llama.cpp's Q/K row permutation so the weights are in Hugging Face layout.
    pub fn from_gguf(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| anyhow!("{}: not a readable GGUF file: {e}", path.display()))?;
        let mut config = LlamaConfig::from_gguf(&content.metadata).with_context(|| format!("in {}", path.display()))?;
        config.tie_word_embeddings = !content.tensor_infos.contains_key("output.weight");
        if content.tensor_infos.contains_key("rope_freqs.weight") {
            // Llama 3.1+ rope scaling: llama.cpp carries it as per-frequency divisors.
            let f = content.tensor(&mut file, "rope_freqs.weight", &Device::Cpu)?.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            if f.len() != config.head_dim() / 2 {
                bail!("{}: rope_freqs.weight has {} values, expected head_dim / 2 = {}", path.display(), f.len(), config.head_dim() / 2);
            }
            config.rope_scaling = RopeScaling::from_frequency_divisors(&f, config.rope_theta, config.head_dim());
        }
        let permuted = config.model_type == "llama";
        let (nh, nkv) = (config.num_attention_heads, config.num_key_value_heads);
        let mut packed = HashMap::new();
        let mut model = Self::from_tensors(config, device, dtype, |hf| {
            let Some(g) = gguf_tensor_name(hf) else { return Ok(None) };
            if !content.tensor_infos.contains_key(&g) {
                return Ok(None);
            }
            let q = content.tensor(&mut file, &g, &Device::Cpu).with_context(|| format!("reading GGUF tensor `{g}`"))?;
            let mut t = q.dequantize(&Device::Cpu).with_context(|| format!("dequantising GGUF tensor `{g}`"))?;
            let mut p = if t.rank() == 2 && decode_copies() { ops::packed::PackedWeight::from_qtensor(&q)? } else { None };
            let heads = if !permuted {
                None
            } else if g.contains("attn_q.") {
                Some(nh)
            } else if g.contains("attn_k.") {
                Some(nkv)
            } else {
                None
            };
            if let Some(h) = heads {
                if t.rank() == 1 {
                    // A Q/K bias (Llama `attention_bias`) is permuted like the weight's rows.
                    t = unpermute_rows(&t.unsqueeze(1)?, h)?.squeeze(1)?;
                } else {
                    t = unpermute_rows(&t, h)?;
                    p = p.map(|p| p.permute_rows(&unpermute_order(t.dims()[0], h)));
                }
            }
            if let Some(p) = p {
                packed.insert(hf.to_string(), p);
            }
            Ok(Some(t))
        })
        .with_context(|| format!("loading {}", path.display()))?;
        if device.is_cpu() && dtype == DType::F32 {
            model.set_packed(packed);
        }
        Ok(model)
    }

    /// Writes `config.json` and `model.safetensors` (one file; `model-0000N-of-0000M.safetensors`
    /// with an index when over 4 GiB) in Hugging Face layout, each file atomically. LoRA adapters
    /// are not included: merge them first or save them with [`save_lora`](Self::save_lora).
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        if matches!(self.config.rope_scaling, Some(RopeScaling::Frequencies { .. })) {
            bail!(
                "the model's rope scaling is a list of per-frequency divisors (read from a GGUF rope_freqs.weight) that no \
                 Llama 3 parameters reproduce: config.json has no way to say it; export it as GGUF instead"
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tensors = self.named_tensors();
        const SHARD: usize = 4 << 30;
        let total: usize = tensors.iter().map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes()).sum();
        if total <= SHARD {
            write_safetensors(&dir.join("model.safetensors"), &tensors)?;
        } else {
            let mut shards: Vec<Vec<(String, Tensor)>> = vec![vec![]];
            let mut size = 0;
            for (n, t) in tensors {
                let b = t.elem_count() * t.dtype().size_in_bytes();
                if size + b > SHARD && !shards.last().unwrap().is_empty() {
                    shards.push(vec![]);
                    size = 0;
                }
                size += b;
                shards.last_mut().unwrap().push((n, t));
            }
            let m = shards.len();
            let mut weight_map = serde_json::Map::new();
            for (i, shard) in shards.iter().enumerate() {
                let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, m);
                write_safetensors(&dir.join(&file), shard)?;
                for (n, _) in shard {
                    weight_map.insert(n.clone(), serde_json::json!(file));
                }
            }
            let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            crate::files::write_atomic(&dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?.as_bytes())?;
        }
        let mut cfg = self.config.to_hf_json();
        if let serde_json::Value::Object(m) = &mut cfg {
            let dt = match self.dtype() {
                DType::BF16 => "bfloat16",
                DType::F16 => "float16",
                _ => "float32",
            };
            m.insert("torch_dtype".into(), serde_json::json!(dt));
        }
        crate::files::write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
        Ok(())
    }
}

thread_local! {
    static DECODE_COPIES: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

fn decode_copies() -> bool {
    DECODE_COPIES.with(|c| c.get())
}

/// Runs `f` with model loads on this thread skipping the compact decode copies of
/// quantized (or bf16) weights: for loads that only convert a model and never decode
/// (export), which then hold the f32 weights alone (SmolLM2 from its Q4_1 GGUF: 180 MB
/// less).
pub fn without_decode_copies<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            DECODE_COPIES.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(DECODE_COPIES.with(|c| c.replace(false)));
    f()
}

/// The GGUF (llama.cpp) name of a Hugging Face tensor name of a Llama-family model:
/// `model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight`. `None` for a
/// tensor llama.cpp has no name for.
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    let map = |s: &str| match s {
        "input_layernorm.weight" => Some("attn_norm.weight".to_string()),
        "post_attention_layernorm.weight" => Some("ffn_norm.weight".to_string()),
        _ => {
            let (module, kind) = s.rsplit_once('.')?;
            let g = match module {
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                _ => return None,
            };
            Some(format!("{g}.{kind}"))
        }
    };
    match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight".into()),
        "model.norm.weight" => Some("output_norm.weight".into()),
        "lm_head.weight" => Some("output.weight".into()),
        _ => {
            let rest = hf.strip_prefix("model.layers.")?;
            let (n, sub) = rest.split_once('.')?;
            Some(format!("blk.{n}.{}", map(sub)?))
        }
    }
}

/// llama.cpp stores Q/K rows of each head interleaved (`[h, d/2, 2]`) for its rope; Hugging Face
/// uses `[h, 2, d/2]`. This reorders rows from the former to the latter.
pub fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        bail!("cannot un-permute a {rows}×{cols} tensor for {heads} heads");
    }
    let half = rows / heads / 2;
    Ok(w.reshape((heads, half, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

/// Row order of [`unpermute_rows`]: Hugging Face row `i` is llama.cpp row `order[i]`.
pub fn unpermute_order(rows: usize, heads: usize) -> Vec<usize> {
    let d = rows / heads;
    let half = d / 2;
    (0..rows)
        .map(|i| {
            let (h, r) = (i / d, i % d);
            let (s, j) = (r / half, r % half);
            h * d + 2 * j + s
        })
        .collect()
}

/// Reads the string-valued GGUF metadata entries (for tokenizers and chat templates).
pub fn gguf_metadata(path: &Path) -> Result<HashMap<String, gguf_file::Value>> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| anyhow!("{}: not a readable GGUF file: {e}", path.display()))?;
    Ok(content.metadata)
}
