//! Export: a model leaves tunebook as a GGUF file for llama.cpp, Ollama and LM Studio
//! (merged and quantized, or a LoRA adapter on its base), with an Ollama `Modelfile`,
//! or as a merged Hugging Face folder for transformers, vLLM and TGI.
//!
//! Written in Rust, in one pass, without llama.cpp: [`gguf`] streams a GGUF v3 file
//! one tensor at a time (merged, permuted, quantized, written, dropped) into a temporary
//! file renamed at the end; [`quant`] holds llama.cpp's file types and its quantizer's
//! per-tensor policy. What the file says about the model is what llama.cpp's own
//! converter would write: architecture keys (`llama` for Llama 2/3.x, Mistral and
//! SmolLM2, `qwen2`), Llama 3's rope scaling as `rope_freqs.weight`, Q/K rows in
//! llama.cpp's order, the tokenizer with the pre-tokenizer name llama.cpp derives from
//! it ([`crate::tokenize::Tokenizer::gguf_metadata`]), and the chat template.
//!
//! ```no_run
//! use tunebook::export::{Export, Quant};
//! // A fine-tuning run, merged, at 4-bit, with a Modelfile for `ollama create`:
//! let out = Export::new("my-run").gguf("bot.gguf").quant(Quant::Q4KM).ollama(true).run()?;
//! println!("{}", out.files().join(", "));
//! # anyhow::Ok(())
//! ```

pub mod gguf;
pub mod kquants;
pub mod quant;

pub use gguf::TensorSpec;
pub use quant::{Quant, Role};

use crate::display::{Render, Table};
use crate::model::io::{gguf_tensor_name, unpermute_order};
use crate::model::{LoraAdapter, Model, ModelSource};
use anyhow::{Context, Result, anyhow, bail};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Loads what an export names, with LoRA adapters kept apart from their base (so a
/// full export merges them tensor by tensor and an adapter-only export writes them):
/// a run (name or folder), a PEFT adapter folder (on the base its
/// `adapter_config.json` names), a registered model (`name/3`, `name@alias`,
/// `models:/..`), or anything [`Model::load`] reads (Hugging Face folder or cached id,
/// `.gguf`).
pub fn load_source(spec: &str) -> Result<Model> {
    if let Some(d) = crate::runs::run_dir_of(spec) {
        let model = d.join("model");
        if !model.is_dir() {
            bail!("run {} has no trained model yet (no {}): wait for it to complete", d.display(), model.display());
        }
        return load_source(&model.to_string_lossy()).with_context(|| format!("loading the model of run {}", d.display()));
    }
    let p = Path::new(spec);
    if crate::model::lora::is_adapter_dir(p) {
        return Model::load_adapter_unmerged(p, &crate::model::default_device(), DType::F32);
    }
    crate::registry::load_local_or_registered(spec, Model::load)
}

/// The GGUF architecture of a model type.
fn gguf_arch(model_type: &str) -> Result<&'static str> {
    match model_type {
        "llama" | "mistral" => Ok("llama"),
        "qwen2" => Ok("qwen2"),
        other => bail!("model type `{other}` has no GGUF export (supported: llama, mistral, qwen2)"),
    }
}

/// The role of a tensor for the quantizer's policy.
fn role_of(gguf_name: &str, rank: usize, tied: bool) -> Role {
    let layer = || gguf_name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    if rank < 2 {
        Role::Vector
    } else if gguf_name == "output.weight" || (tied && gguf_name == "token_embd.weight") {
        Role::Output
    } else if gguf_name == "token_embd.weight" {
        Role::Embedding
    } else if gguf_name.ends_with(".attn_v.weight") {
        Role::AttnV { layer: layer() }
    } else if gguf_name.ends_with(".ffn_down.weight") {
        Role::FfnDown { layer: layer() }
    } else {
        Role::Matrix
    }
}

/// Rows of a Q/K projection (or its bias) in llama.cpp's order, for `heads` heads:
/// the inverse of [`crate::model::io::unpermute_rows`].
fn permute_rows(values: &[f32], rows: usize, heads: usize) -> Result<Vec<f32>> {
    if heads == 0 || rows % (2 * heads) != 0 || values.len() % rows != 0 {
        bail!("cannot permute {rows} rows for {heads} heads");
    }
    let cols = values.len() / rows;
    let order = unpermute_order(rows, heads);
    let mut out = vec![0f32; values.len()];
    for (hf_row, &gguf_row) in order.iter().enumerate() {
        out[gguf_row * cols..(gguf_row + 1) * cols].copy_from_slice(&values[hf_row * cols..(hf_row + 1) * cols]);
    }
    Ok(out)
}

/// For llama-architecture Q/K tensors: how many heads their rows are permuted for.
fn permuted_heads(model: &Model, gguf_name: &str) -> Option<usize> {
    let cfg = &model.llama.config;
    if gguf_arch(&cfg.model_type).ok()? != "llama" {
        return None;
    }
    if gguf_name.contains(".attn_q.") {
        Some(cfg.num_attention_heads)
    } else if gguf_name.contains(".attn_k.") {
        Some(cfg.num_key_value_heads)
    } else {
        None
    }
}

fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// A name for `general.name`: the source folder's or file's name.
fn model_name(model: &Model) -> String {
    let p = match &model.source {
        Some(ModelSource::HfDir(d)) => d.clone(),
        Some(ModelSource::Gguf(p)) => p.clone(),
        None => return "tunebook model".into(),
    };
    let stem = |p: &Path| p.file_stem().map(|s| s.to_string_lossy().to_string());
    // A run's `model/` folder is named after its run.
    match p.file_name().and_then(|n| n.to_str()) {
        Some("model") => p.parent().and_then(stem),
        _ => stem(&p),
    }
    .unwrap_or_else(|| "tunebook model".into())
}

/// The `general.*` and `<arch>.*` keys llama.cpp's converter writes for this config.
fn model_metadata(model: &Model, file_type: u32, kind: &str) -> Result<Vec<(String, Value)>> {
    let cfg = &model.llama.config;
    let arch = gguf_arch(&cfg.model_type)?;
    let k = |s: &str| format!("{arch}.{s}");
    let u = |v: usize| Value::U32(v as u32);
    let mut md = vec![
        ("general.architecture".to_string(), Value::String(arch.into())),
        ("general.type".to_string(), Value::String(kind.into())),
        ("general.name".to_string(), Value::String(model_name(model))),
    ];
    if kind == "adapter" {
        return Ok(md);
    }
    md.extend([
        (k("block_count"), u(cfg.num_hidden_layers)),
        (k("context_length"), u(cfg.max_position_embeddings)),
        (k("embedding_length"), u(cfg.hidden_size)),
        (k("feed_forward_length"), u(cfg.intermediate_size)),
        (k("attention.head_count"), u(cfg.num_attention_heads)),
        (k("attention.head_count_kv"), u(cfg.num_key_value_heads)),
    ]);
    if let Some(crate::model::RopeScaling::Linear { factor }) = &cfg.rope_scaling {
        md.push((k("rope.scaling.type"), Value::String("linear".into())));
        md.push((k("rope.scaling.factor"), Value::F32(*factor as f32)));
    }
    md.push((k("rope.freq_base"), Value::F32(cfg.rope_theta as f32)));
    md.push((k("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)));
    if cfg.head_dim_override.is_some() {
        md.push((k("attention.key_length"), u(cfg.head_dim())));
        md.push((k("attention.value_length"), u(cfg.head_dim())));
    }
    md.push(("general.file_type".to_string(), Value::U32(file_type)));
    if arch == "llama" {
        md.push((k("vocab_size"), u(cfg.vocab_size)));
        md.push((k("rope.dimension_count"), u(cfg.head_dim())));
    }
    md.push(("general.quantization_version".to_string(), Value::U32(2)));
    Ok(md)
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct GgufFile {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// `model` or `adapter`.
    pub kind: String,
    /// The file type asked for.
    pub quant: Quant,
    /// Every tensor: GGUF name, type, shape.
    pub tensors: Vec<TensorSpec>,
    /// Tensors copied byte for byte from the source GGUF (with [`Quant::Source`]).
    pub copied: usize,
    /// Seconds it took.
    pub seconds: f64,
    /// What the file may get wrong, in words (shown under the export's table).
    pub warnings: Vec<String>,
}

impl GgufFile {
    /// How many tensors have each type, e.g. `[("Q5_0", 150), ("F32", 61)]`, most first.
    pub fn type_counts(&self) -> Vec<(String, usize)> {
        let mut m: HashMap<String, usize> = HashMap::new();
        for t in &self.tensors {
            *m.entry(format!("{:?}", t.dtype).to_uppercase()).or_default() += 1;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }
}

/// Writes `model` as a GGUF file llama.cpp loads: LoRA adapters merged into their
/// weights one tensor at a time, each tensor converted to the type `quant` and
/// llama.cpp's policy give it. `name` sets `general.name` (default: a GGUF source's
/// own, else the source folder's name).
pub fn write_model_gguf(model: &Model, path: &Path, quant: Quant, name: Option<&str>) -> Result<GgufFile> {
    let started = Instant::now();
    let tok = model.tokenizer.as_ref().context("the model has no tokenizer: a GGUF file carries one (load the model from a folder with tokenizer.json, or a GGUF)")?;
    let cfg = &model.llama.config;
    // The source GGUF, for `Quant::Source`.
    // A GGUF source: its description is kept, and with `Quant::Source` its tensors.
    let mut source = match &model.source {
        Some(ModelSource::Gguf(p)) => {
            let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            let c = Content::read(&mut f).map_err(|e| anyhow!("{}: not a readable GGUF file: {e}", p.display()))?;
            Some((f, c))
        }
        _ => None,
    };
    let file_type = match (&source, quant) {
        (Some((_, c)), Quant::Source) => c.metadata.get("general.file_type").and_then(|v| v.to_u32().ok()).unwrap_or(quant.file_type()),
        _ => quant.file_type(),
    };
    let mut md = model_metadata(model, file_type, "model")?;
    if let Some((_, c)) = &source {
        // Name, organization, license, languages... as the source GGUF describes itself.
        let mut extra: Vec<(String, Value)> = c
            .metadata
            .iter()
            .filter(|(k, _)| {
                k.starts_with("general.")
                    && !["general.architecture", "general.type", "general.file_type", "general.quantization_version", "general.alignment"].contains(&k.as_str())
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        extra.sort_by(|a, b| a.0.cmp(&b.0));
        md.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
        md.splice(2..2, extra);
    }
    if let Some(n) = name {
        md.retain(|(k, _)| k != "general.name");
        md.insert(2, ("general.name".to_string(), Value::String(n.to_string())));
    }
    let source_types: HashMap<String, GgmlDType> =
        source.as_ref().map(|(_, c)| c.tensor_infos.iter().map(|(n, i)| (n.clone(), i.ggml_dtype)).collect()).unwrap_or_default();
    if quant != Quant::Source {
        source = None;
    }
    md.extend(tok.gguf_metadata(cfg.vocab_size).map_err(|e| anyhow!("{e}"))?);

    let adapters: HashMap<String, &LoraAdapter> = model
        .llama
        .layers
        .iter()
        .enumerate()
        .flat_map(|(l, layer)| layer.linears().into_iter().filter_map(move |(sub, lin)| lin.lora.as_ref().map(|a| (format!("model.layers.{l}.{sub}.weight"), a))))
        .collect();
    let rope_freqs = cfg.rope_scaling.as_ref().and_then(|s| s.frequency_divisors(cfg.rope_theta, cfg.head_dim()));
    let tied = model.llama.lm_head.is_none();
    let layers = cfg.num_hidden_layers;
    let named = model.llama.named_tensors();
    let mut specs = vec![];
    let mut sources: Vec<Option<(String, Tensor)>> = vec![];
    if let Some(f) = &rope_freqs {
        specs.push(TensorSpec { name: "rope_freqs.weight".into(), shape: vec![f.len()], dtype: GgmlDType::F32 });
        sources.push(None);
    }
    for (hf, t) in named {
        let name = gguf_tensor_name(&hf).with_context(|| format!("tensor `{hf}` has no llama.cpp name"))?;
        let shape = t.dims().to_vec();
        let role = role_of(&name, shape.len(), tied);
        let row = *shape.last().unwrap_or(&1);
        let dtype = match source.as_ref().and_then(|(_, c)| c.tensor_infos.get(&name)) {
            Some(info) => info.ggml_dtype,
            None if quant == Quant::Source => quant::tensor_type(Quant::F16, role, row, layers),
            None => quant::tensor_type(quant, role, row, layers),
        };
        specs.push(TensorSpec { name, shape, dtype });
        sources.push(Some((hf, t)));
    }
    // An adapter merged into a quantized base and quantized again to the base's own
    // type mostly rounds back to the base's values: its change is lost.
    let requantized = specs
        .iter()
        .zip(&sources)
        .filter(|(spec, src)| {
            src.as_ref().is_some_and(|(hf, _)| adapters.contains_key(hf))
                && !matches!(spec.dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
                && source_types.get(&spec.name) == Some(&spec.dtype)
        })
        .count();
    let mut warnings = vec![];
    if requantized > 0 {
        warnings.push(format!(
            "{requantized} tensors with a merged adapter are quantized to the type their base already had: most of the \
             adapter's change rounds back to the base's values (on the sample task, a Q4_1 base merged and exported as \
             q4_1: 95% → 46% exact match). Export the adapter alone (--adapter-only) for the original base, or choose \
             another type (q8_0, q5_0, q4_k_m)"
        ));
    }
    let mut copied = 0;
    let bytes = gguf::write_gguf(path, &md, &specs, |i, spec| {
        let Some((hf, t)) = &sources[i] else {
            let f = rope_freqs.as_ref().expect("rope_freqs is the only tensor without a source");
            return Ok(f.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect());
        };
        let mut t = t.clone();
        if let Some(a) = adapters.get(hf) {
            t = (t.to_dtype(DType::F32)? + a.delta()?.to_device(t.device())?)?;
        }
        let mut values = to_f32(&t)?;
        if let Some(h) = permuted_heads(model, &spec.name) {
            values = permute_rows(&values, spec.shape[0], h)?;
        }
        if let Some((f, c)) = source.as_mut() {
            if let Some(info) = c.tensor_infos.get(&spec.name).filter(|i| i.ggml_dtype == spec.dtype) {
                let q = info.read(f, c.tensor_data_offset, &Device::Cpu)?;
                let same = to_f32(&q.dequantize(&Device::Cpu)?)?.iter().zip(&values).all(|(a, b)| a.to_bits() == b.to_bits());
                if same {
                    copied += 1;
                    return Ok(q.data()?.into_owned());
                }
            }
        }
        quant::quantize(&values, &spec.shape, spec.dtype)
    })?;
    Ok(GgufFile { path: path.to_path_buf(), bytes, kind: "model".into(), quant, tensors: specs, copied, seconds: started.elapsed().as_secs_f64(), warnings })
}

/// Writes the model's LoRA adapters as a llama.cpp GGUF adapter (`general.type =
/// adapter`, `adapter.type = lora`, `adapter.lora.alpha`), which `llama-server --lora`
/// and Ollama's `ADAPTER` apply to the base model's GGUF. `A` and `B` keep PEFT's
/// shapes (`[r, in]`, `[out, r]`) under `<base tensor>.lora_a` / `.lora_b`; for the
/// llama architecture the rows of Q/K's `B` are permuted as the base's Q/K rows are.
/// llama.cpp scales by `alpha / r`; when the adapters do not share one `alpha`
/// (`scale · r`), each scale is folded into its `B` and `alpha` is written as 0
/// (llama.cpp then uses a scale of 1).
pub fn write_adapter_gguf(model: &Model, path: &Path, quant: Quant) -> Result<GgufFile> {
    let started = Instant::now();
    let dtype = match quant {
        Quant::F32 | Quant::Source => GgmlDType::F32,
        Quant::F16 => GgmlDType::F16,
        Quant::BF16 => GgmlDType::BF16,
        Quant::Q8_0 => GgmlDType::Q8_0,
        other => bail!("a LoRA adapter is written as f32, f16, bf16 or q8_0 (llama.cpp's adapter types), not {other}"),
    };
    let mut items: Vec<(String, &LoraAdapter)> = vec![];
    for (l, layer) in model.llama.layers.iter().enumerate() {
        for (sub, lin) in layer.linears() {
            if let Some(a) = &lin.lora {
                let hf = format!("model.layers.{l}.{sub}.weight");
                items.push((gguf_tensor_name(&hf).with_context(|| format!("`{hf}` has no llama.cpp name"))?, a));
            }
        }
    }
    if items.is_empty() {
        bail!("the model carries no LoRA adapter: --adapter-only exports the adapters of a LoRA run or PEFT folder");
    }
    let alphas: Vec<f64> = items.iter().map(|(_, a)| a.scale * a.a.as_tensor().dims()[0] as f64).collect();
    let uniform = alphas.iter().all(|x| (x - alphas[0]).abs() <= 1e-9 * alphas[0].abs().max(1.0));
    let mut md = model_metadata(model, quant.file_type(), "adapter")?;
    md.push(("adapter.type".to_string(), Value::String("lora".into())));
    md.push(("adapter.lora.alpha".to_string(), Value::F32(if uniform { alphas[0] as f32 } else { 0.0 })));
    let mut specs = vec![];
    for (name, a) in &items {
        let (ad, bd) = (a.a.as_tensor().dims().to_vec(), a.b.as_tensor().dims().to_vec());
        let t = |shape: &Vec<usize>| if shape[1] % dtype.block_size() == 0 { dtype } else { GgmlDType::F32 };
        specs.push(TensorSpec { name: format!("{name}.lora_a"), shape: ad.clone(), dtype: t(&ad) });
        specs.push(TensorSpec { name: format!("{name}.lora_b"), shape: bd.clone(), dtype: t(&bd) });
    }
    let bytes = gguf::write_gguf(path, &md, &specs, |i, spec| {
        let (name, a) = &items[i / 2];
        let values = if i % 2 == 0 {
            to_f32(a.a.as_tensor())?
        } else {
            let mut b = to_f32(a.b.as_tensor())?;
            if !uniform {
                b.iter_mut().for_each(|v| *v = (*v as f64 * a.scale) as f32);
            }
            match permuted_heads(model, name) {
                Some(h) => permute_rows(&b, spec.shape[0], h)?,
                None => b,
            }
        };
        quant::quantize(&values, &spec.shape, spec.dtype)
    })?;
    Ok(GgufFile { path: path.to_path_buf(), bytes, kind: "adapter".into(), quant, tensors: specs, copied: 0, seconds: started.elapsed().as_secs_f64(), warnings: vec![] })
}

/// An Ollama `Modelfile` for a GGUF export: `FROM` the model (or the base with
/// `ADAPTER`), a `PARAMETER stop` for each text that ends a reply (the chat
/// template's end-of-turn tokens), and `SYSTEM` when given. The chat template itself
/// travels inside the GGUF (`tokenizer.chat_template`), which Ollama applies.
pub fn modelfile(from: &Path, adapter: Option<&Path>, model: &Model, system: Option<&str>) -> String {
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let mut out = format!("# Written by tunebook: `ollama create NAME -f {}`\nFROM {}\n", "Modelfile", from.display());
    if let Some(a) = adapter {
        out.push_str(&format!("ADAPTER {}\n", a.display()));
    }
    if let Some(tok) = &model.tokenizer {
        let mut stops: Vec<String> = vec![];
        for id in tok.stop_ids() {
            if let Ok(t) = tok.decode(&[*id], false) {
                if !t.is_empty() && !stops.contains(&t) {
                    stops.push(t);
                }
            }
        }
        for s in stops {
            out.push_str(&format!("PARAMETER stop {}\n", quote(&s)));
        }
    }
    if let Some(s) = system {
        out.push_str(&format!("SYSTEM \"\"\"{}\"\"\"\n", s.replace("\"\"\"", "\\\"\\\"\\\"")));
    }
    out
}

impl Model {
    /// Writes this model as a GGUF file (adapters merged), quantized as `quant`;
    /// see [`write_model_gguf`].
    pub fn export_gguf(&self, path: impl AsRef<Path>, quant: Quant) -> Result<GgufFile> {
        write_model_gguf(self, path.as_ref(), quant, None)
    }

    /// Writes this model's LoRA adapters as a llama.cpp GGUF adapter; see
    /// [`write_adapter_gguf`].
    pub fn export_adapter_gguf(&self, path: impl AsRef<Path>, quant: Quant) -> Result<GgufFile> {
        write_adapter_gguf(self, path.as_ref(), quant)
    }

    /// Writes a merged full model in Hugging Face layout (safetensors shards,
    /// `config.json`, tokenizer files, `generation_config.json`) for transformers,
    /// vLLM and TGI. The folder is written beside its destination and renamed into place.
    pub fn export_hf(&self, dir: impl AsRef<Path>) -> Result<PathBuf> {
        let mut merged = self.clone();
        merged.llama.merge_lora()?;
        let stage = crate::files::StagedDir::new(dir.as_ref())?;
        merged.save_pretrained(stage.path())?;
        stage.commit(crate::files::IfExists::Replace)
    }
}

/// An export: a builder that reads like the CLI (`tunebook export SOURCE --gguf OUT
/// --quant q4_k_m --ollama`).
#[derive(Clone, Debug)]
pub struct Export {
    source: String,
    gguf: Option<PathBuf>,
    hf: Option<PathBuf>,
    quant: Quant,
    adapter_only: bool,
    ollama: bool,
    system: Option<String>,
    attach_to: Option<String>,
}

/// What [`Export::run`] wrote.
#[derive(Clone, Debug, Default)]
pub struct Exported {
    /// The GGUF files: the model, or the adapter (and, for Ollama, its base).
    pub gguf: Vec<GgufFile>,
    /// The Ollama `Modelfile`, when asked for.
    pub modelfile: Option<PathBuf>,
    /// The Hugging Face folder, when asked for.
    pub hf: Option<PathBuf>,
    /// The registered version the GGUF files were attached to (`name/version`).
    pub attached_to: Option<String>,
}

impl Exported {
    /// What the files may get wrong, one line each, naming the file.
    fn warnings(&self) -> Vec<String> {
        self.gguf.iter().flat_map(|g| g.warnings.iter().map(|w| format!("warning: {}: {w}", g.path.display()))).collect()
    }

    /// Every path written.
    pub fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = self.gguf.iter().map(|g| g.path.display().to_string()).collect();
        v.extend(self.modelfile.iter().chain(self.hf.iter()).map(|p| p.display().to_string()));
        v
    }

    fn table(&self) -> Table {
        let mut t = Table::new(["file", "kind", "size", "types", "time"]).title("export");
        for g in &self.gguf {
            let types = g.type_counts().iter().map(|(n, c)| format!("{c}× {n}")).collect::<Vec<_>>().join(", ");
            let copied = if g.copied > 0 { format!(" ({} copied)", g.copied) } else { String::new() };
            t.push([
                g.path.display().to_string(),
                format!("{} {}", g.kind, g.quant),
                format!("{:.1} MB", g.bytes as f64 / 1e6),
                format!("{types}{copied}"),
                format!("{:.1} s", g.seconds),
            ]);
        }
        if let Some(m) = &self.modelfile {
            t.push([m.display().to_string(), "Ollama Modelfile".into(), String::new(), String::new(), String::new()]);
        }
        if let Some(h) = &self.hf {
            t.push([h.display().to_string(), "Hugging Face folder".into(), String::new(), String::new(), String::new()]);
        }
        if let Some(v) = &self.attached_to {
            t.push([format!("{v}: gguf/"), "attached to the registered model".into(), String::new(), String::new(), String::new()]);
        }
        t
    }
}

impl Render for Exported {
    fn text_plain(&self) -> String {
        let mut s = self.table().text_plain();
        for w in self.warnings() {
            s.push('\n');
            s.push_str(&w);
        }
        s
    }
    fn text_html(&self) -> Option<String> {
        let mut h = self.table().text_html()?;
        for w in self.warnings() {
            h.push_str(&format!("<p><strong>{}</strong></p>", crate::display::escape_html(&w)));
        }
        Some(h)
    }
}

impl Export {
    /// Exports `source`: a run, a PEFT adapter folder, a registered model, a Hugging
    /// Face folder or cached id, or a `.gguf` (see [`load_source`]).
    pub fn new(source: impl Into<String>) -> Self {
        Self { source: source.into(), gguf: None, hf: None, quant: Quant::F16, adapter_only: false, ollama: false, system: None, attach_to: None }
    }

    /// Writes a GGUF file here.
    pub fn gguf(mut self, path: impl Into<PathBuf>) -> Self {
        self.gguf = Some(path.into());
        self
    }

    /// The GGUF file type (default f16; [`Quant::Source`] keeps a GGUF source's types).
    pub fn quant(mut self, q: Quant) -> Self {
        self.quant = q;
        self
    }

    /// Writes only the LoRA adapter (llama.cpp's adapter format) instead of the merged model.
    pub fn adapter_only(mut self, on: bool) -> Self {
        self.adapter_only = on;
        self
    }

    /// Also writes an Ollama `Modelfile` beside the GGUF (with `--adapter-only`, and a
    /// base that is not a GGUF file, the base is exported beside it too).
    pub fn ollama(mut self, on: bool) -> Self {
        self.ollama = on;
        self
    }

    /// The system prompt the `Modelfile` sets.
    pub fn system(mut self, text: impl Into<String>) -> Self {
        self.system = Some(text.into());
        self
    }

    /// Writes a merged Hugging Face folder here.
    pub fn hf(mut self, dir: impl Into<PathBuf>) -> Self {
        self.hf = Some(dir.into());
        self
    }

    /// Attaches the GGUF file(s) to a registered version (`name/3`, `name@alias`) under
    /// `gguf/`, where [`crate::registry::Registry::download_gguf`] finds them.
    pub fn attach_to(mut self, version: impl Into<String>) -> Self {
        self.attach_to = Some(version.into());
        self
    }

    /// Loads the source and writes everything asked for.
    pub fn run(self) -> Result<Exported> {
        if self.gguf.is_none() && self.hf.is_none() {
            bail!("nothing to export: give a GGUF path (.gguf(..) / --gguf OUT.gguf) or a Hugging Face folder (.hf(..) / --hf DIR)");
        }
        if self.ollama && self.gguf.is_none() {
            bail!("a Modelfile goes beside a GGUF file: give --gguf OUT.gguf with --ollama");
        }
        if self.attach_to.is_some() && self.gguf.is_none() {
            bail!("only GGUF files are attached to a registered model: give --gguf OUT.gguf with --attach-to");
        }
        // Nothing here decodes: the f32 weights are enough (see `without_decode_copies`).
        let model = crate::model::io::without_decode_copies(|| load_source(&self.source)).with_context(|| format!("loading {}", self.source))?;
        self.run_on(&model)
    }

    /// Writes everything asked for from an already-loaded model.
    pub fn run_on(&self, model: &Model) -> Result<Exported> {
        let mut out = Exported::default();
        if let Some(path) = &self.gguf {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            }
            if self.adapter_only {
                let a = write_adapter_gguf(model, path, self.quant)?;
                if self.ollama {
                    let base = match &model.source {
                        Some(ModelSource::Gguf(p)) => p.clone(),
                        _ => {
                            let mut base_model = model.clone();
                            base_model.llama.remove_lora();
                            let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
                            let p = path.with_file_name(format!("{stem}.base.gguf"));
                            let q = if self.quant == Quant::Source { Quant::F16 } else { self.quant };
                            out.gguf.push(write_model_gguf(&base_model, &p, q, None)?);
                            p
                        }
                    };
                    out.modelfile = Some(self.write_modelfile(&base, Some(path), model)?);
                }
                out.gguf.insert(0, a);
            } else {
                out.gguf.push(write_model_gguf(model, path, self.quant, self.model_name(model).as_deref())?);
                if self.ollama {
                    out.modelfile = Some(self.write_modelfile(path, None, model)?);
                }
            }
        }
        if let Some(dir) = &self.hf {
            out.hf = Some(model.export_hf(dir)?);
        }
        if let Some(spec) = &self.attach_to {
            let reg = crate::registry::Registry::new(None)?;
            for g in &out.gguf {
                let name = g.path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model.gguf".into());
                let v = reg.attach_file(spec, &g.path, &format!("{}/{name}", crate::registry::GGUF_DIR))?;
                out.attached_to = Some(v.reference());
            }
        }
        Ok(out)
    }

    /// A merged fine-tune is named after what was exported (the run or registered
    /// model), not after its base.
    fn model_name(&self, model: &Model) -> Option<String> {
        if !model.llama.has_lora() {
            return None;
        }
        let p = Path::new(&self.source);
        if !p.exists() {
            return Some(self.source.clone());
        }
        // A run's `model/` folder is named after its run.
        let p = if p.file_name().is_some_and(|n| n == "model") { p.parent()? } else { p };
        p.file_name().map(|n| n.to_string_lossy().to_string())
    }

    fn write_modelfile(&self, from: &Path, adapter: Option<&Path>, model: &Model) -> Result<PathBuf> {
        let gguf = self.gguf.as_ref().expect("checked by run");
        let dir = gguf.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        // Paths beside the Modelfile are written relative to it, as Ollama resolves them.
        let rel = |p: &Path| -> PathBuf {
            match (p.parent().filter(|x| !x.as_os_str().is_empty()).unwrap_or(Path::new(".")) == dir, p.file_name()) {
                (true, Some(f)) => Path::new(".").join(f),
                _ => std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()),
            }
        };
        let text = modelfile(&rel(from), adapter.map(rel).as_deref(), model, self.system.as_deref());
        let path = dir.join("Modelfile");
        crate::files::write_atomic(&path, text.as_bytes())?;
        Ok(path)
    }
}

/// `tunebook export` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct ExportArgs {
    /// What to export: a run (name or folder), a PEFT adapter folder, a registered model
    /// (name/3, name@alias, models:/..), a Hugging Face folder or cached id, or a .gguf.
    pub source: String,
    /// Write a GGUF file (llama.cpp, Ollama, LM Studio).
    #[arg(long, value_name = "OUT.gguf")]
    pub gguf: Option<PathBuf>,
    /// GGUF file type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_m, q5_k_m, q6_k,
    /// or source (keep a GGUF source's tensor types).
    #[arg(long, default_value = "f16")]
    pub quant: Quant,
    /// Write only the LoRA adapter, in llama.cpp's adapter format.
    #[arg(long)]
    pub adapter_only: bool,
    /// Also write an Ollama Modelfile beside the GGUF.
    #[arg(long)]
    pub ollama: bool,
    /// The system prompt the Modelfile sets.
    #[arg(long)]
    pub system: Option<String>,
    /// Write a merged Hugging Face folder (safetensors, config.json, tokenizer).
    #[arg(long, value_name = "OUT_DIR")]
    pub hf: Option<PathBuf>,
    /// Attach the GGUF file(s) to this registered version (name/3, name@alias), under gguf/.
    #[arg(long, value_name = "MODEL_VERSION")]
    pub attach_to: Option<String>,
}

/// Runs `tunebook export`.
pub fn run_cli(args: &ExportArgs) -> Result<()> {
    let mut e = Export::new(&args.source).quant(args.quant).adapter_only(args.adapter_only).ollama(args.ollama);
    if let Some(g) = &args.gguf {
        e = e.gguf(g);
    }
    if let Some(h) = &args.hf {
        e = e.hf(h);
    }
    if let Some(s) = &args.system {
        e = e.system(s);
    }
    if let Some(v) = &args.attach_to {
        e = e.attach_to(v);
    }
    let out = e.run()?;
    println!("{}", out.text_plain());
    Ok(())
}

#[cfg(test)]
mod tests;
