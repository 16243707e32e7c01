//! The decoder's configuration, read from a Hugging Face `config.json` or GGUF metadata.

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value, json};

/// How rotary frequencies are scaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1+ frequency-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// One divisor per rotary frequency (`head_dim / 2` of them), as a GGUF file's
    /// `rope_freqs.weight` holds them, when no Llama 3 parameters reproduce them.
    Frequencies { divisors: Vec<f64> },
}

impl RopeScaling {
    /// The divisor of each rotary inverse frequency, as llama.cpp's
    /// `rope_freqs.weight` carries Llama 3 scaling (its converter's formula); `None`
    /// for scalings llama.cpp writes as metadata (linear).
    pub fn frequency_divisors(&self, rope_theta: f64, head_dim: usize) -> Option<Vec<f64>> {
        match self {
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = *original_max_position_embeddings as f64;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                Some(
                    (0..head_dim / 2)
                        .map(|i| {
                            let freq = 1.0 / rope_theta.powf((2 * i) as f64 / head_dim as f64);
                            let wavelen = 2.0 * std::f64::consts::PI / freq;
                            if wavelen < high_wavelen {
                                1.0
                            } else if wavelen > low_wavelen {
                                *factor
                            } else {
                                let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                                1.0 / ((1.0 - smooth) / factor + smooth)
                            }
                        })
                        .collect(),
                )
            }
            RopeScaling::Frequencies { divisors } => Some(divisors.clone()),
            RopeScaling::Linear { .. } => None,
        }
    }

    /// The scaling a GGUF `rope_freqs.weight` describes: the Llama 3 parameters that
    /// reproduce it (so a model read from GGUF saves a `config.json` transformers
    /// reads), else the divisors themselves. `None` when every divisor is 1.
    pub fn from_frequency_divisors(divisors: &[f32], rope_theta: f64, head_dim: usize) -> Option<RopeScaling> {
        let d: Vec<f64> = divisors.iter().map(|&v| v as f64).collect();
        if d.iter().all(|&v| v == 1.0) {
            return None;
        }
        let factor = d.iter().cloned().fold(f64::MIN, f64::max);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1.0);
        // In the smooth band, s = (1/d - 1/factor) / (1 - 1/factor) is linear in
        // 1/wavelength: s = old/(high-low) · (1/wavelength) - low/(high-low). Only the
        // ratios are identifiable; Llama 3.1 writes high - low = 3 (1 and 4).
        let band: Vec<(f64, f64)> = d
            .iter()
            .enumerate()
            .filter(|(_, v)| !close(**v, 1.0) && !close(**v, factor))
            .map(|(i, v)| {
                let freq = 1.0 / rope_theta.powf((2 * i) as f64 / head_dim as f64);
                let x = freq / (2.0 * std::f64::consts::PI);
                (x, (1.0 / v - 1.0 / factor) / (1.0 - 1.0 / factor))
            })
            .collect();
        if factor > 1.0 && band.len() >= 2 {
            let ((x1, s1), (x2, s2)) = (band[0], band[band.len() - 1]);
            let a = (s2 - s1) / (x2 - x1);
            let b = s1 - a * x1;
            let low = (-3.0 * b * 1e6).round() / 1e6;
            let fit = RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: low + 3.0,
                original_max_position_embeddings: (3.0 * a).round() as usize,
            };
            if let Some(back) = fit.frequency_divisors(rope_theta, head_dim) {
                if back.iter().zip(&d).all(|(x, y)| close(*x, *y)) {
                    return Some(fit);
                }
            }
        }
        Some(RopeScaling::Frequencies { divisors: d })
    }
}

/// One configuration for the whole Llama family: Llama 2/3.x, Mistral, Qwen2, SmolLM2.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Fewer than `num_attention_heads` for grouped-query attention.
    pub num_key_value_heads: usize,
    /// Per-head size when it is not `hidden_size / num_attention_heads`.
    pub head_dim_override: Option<usize>,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    /// The LM head reuses the token embedding (SmolLM2, small Llama 3.2, Qwen2 0.5B).
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Mistral-style sliding-window attention.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    /// Generation stops on any of these.
    pub eos_token_ids: Vec<u32>,
    /// Everything else from `config.json`, written back unchanged on save.
    pub extra: Map<String, Value>,
}

impl LlamaConfig {
    /// Per-head size.
    pub fn head_dim(&self) -> usize {
        self.head_dim_override.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// A tiny Llama for unit tests: 2 layers, hidden 32, 4 heads over 2 KV heads, vocab 64.
    pub fn tiny() -> Self {
        Self {
            model_type: "llama".into(),
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim_override: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 512,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            sliding_window: None,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            extra: Map::new(),
        }
    }

    /// Checks the shapes add up; the error says which field is wrong.
    pub fn validate(&self) -> Result<()> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                bail!("model config: {name} must be positive");
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            bail!(
                "model config: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if self.head_dim_override.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            bail!("model config: hidden_size ({}) is not divisible by num_attention_heads ({}) and no head_dim is given", self.hidden_size, self.num_attention_heads);
        }
        if self.head_dim() % 2 != 0 {
            bail!("model config: head_dim {} must be even for rotary embeddings", self.head_dim());
        }
        Ok(())
    }

    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        let Value::Object(map) = v else { bail!("config.json must be a JSON object") };
        Self::from_hf_map(map)
    }

    fn from_hf_map(map: Map<String, Value>) -> Result<Self> {
        let get = |k: &str| map.get(k).filter(|v| !v.is_null());
        let need = |k: &str| -> Result<usize> {
            get(k)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| anyhow!("config.json: missing or non-integer field `{k}`"))
        };
        let model_type = get("model_type").and_then(Value::as_str).unwrap_or("llama").to_string();
        if !["llama", "mistral", "qwen2"].contains(&model_type.as_str()) {
            bail!("config.json: model_type `{model_type}` is not supported (supported: llama, mistral, qwen2)");
        }
        if let Some(act) = get("hidden_act").and_then(Value::as_str) {
            if act != "silu" && act != "swish" {
                bail!("config.json: hidden_act `{act}` is not supported (only silu)");
            }
        }
        let heads = need("num_attention_heads")?;
        check_keys(&map)?;
        let (rope_theta, rope_scaling) = parse_rope(&map)?;
        // As transformers reads them: Llama alone has `attention_bias` (q, k, v and o)
        // and `mlp_bias`; Qwen2 always has q/k/v biases and nothing else; Mistral none.
        let llama = model_type == "llama";
        let qwen = model_type == "qwen2";
        let flag = |k: &str| get(k).and_then(Value::as_bool).unwrap_or(false);
        let attention_bias = llama && flag("attention_bias");
        let sliding_window = sliding_window_of(&map, &model_type)?;
        // transformers' defaults where a key is absent.
        let (default_kv_heads, default_max_pos) = match model_type.as_str() {
            "qwen2" => (32, 32768),
            "mistral" => (8, 4096 * 32),
            _ => (heads, 2048),
        };
        let eos_token_ids = match get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|v| v as u32).collect(),
            _ => vec![],
        };
        let extra = map.iter().filter(|(k, _)| !HANDLED_KEYS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
        let cfg = Self {
            vocab_size: need("vocab_size")?,
            hidden_size: need("hidden_size")?,
            intermediate_size: need("intermediate_size")?,
            num_hidden_layers: need("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: get("num_key_value_heads").and_then(Value::as_u64).map(|v| v as usize).unwrap_or(default_kv_heads),
            head_dim_override: get("head_dim").and_then(Value::as_u64).map(|v| v as usize),
            rms_norm_eps: get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: get("max_position_embeddings").and_then(Value::as_u64).unwrap_or(default_max_pos) as usize,
            tie_word_embeddings: get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            qkv_bias: qwen || attention_bias,
            o_bias: attention_bias,
            mlp_bias: llama && flag("mlp_bias"),
            sliding_window,
            bos_token_id: get("bos_token_id").and_then(Value::as_u64).map(|v| v as u32),
            eos_token_ids,
            extra,
            model_type,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The `config.json` Hugging Face writes for this model.
    pub fn to_hf_json(&self) -> Value {
        let mut m = self.extra.clone();
        let arch = match self.model_type.as_str() {
            "qwen2" => "Qwen2ForCausalLM",
            "mistral" => "MistralForCausalLM",
            _ => "LlamaForCausalLM",
        };
        m.entry("architectures").or_insert_with(|| json!([arch]));
        let mut set = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        set("model_type", json!(self.model_type));
        set("vocab_size", json!(self.vocab_size));
        set("hidden_size", json!(self.hidden_size));
        set("intermediate_size", json!(self.intermediate_size));
        set("num_hidden_layers", json!(self.num_hidden_layers));
        set("num_attention_heads", json!(self.num_attention_heads));
        set("num_key_value_heads", json!(self.num_key_value_heads));
        if let Some(d) = self.head_dim_override {
            set("head_dim", json!(d));
        }
        set("hidden_act", json!("silu"));
        set("rms_norm_eps", json!(self.rms_norm_eps));
        set("rope_theta", json!(self.rope_theta));
        set(
            "rope_scaling",
            match &self.rope_scaling {
                None => Value::Null,
                Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
                Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings}),
                // No config.json form: `LlamaModel::save_pretrained` refuses it.
                Some(RopeScaling::Frequencies { .. }) => Value::Null,
            },
        );
        set("max_position_embeddings", json!(self.max_position_embeddings));
        set("tie_word_embeddings", json!(self.tie_word_embeddings));
        if self.model_type != "qwen2" {
            set("attention_bias", json!(self.qkv_bias));
            set("mlp_bias", json!(self.mlp_bias));
        }
        if let Some(w) = self.sliding_window {
            set("sliding_window", json!(w));
            if self.model_type == "qwen2" {
                set("use_sliding_window", json!(true));
            }
        }
        if let Some(b) = self.bos_token_id {
            set("bos_token_id", json!(b));
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => set("eos_token_id", json!(one)),
            many => set("eos_token_id", json!(many)),
        }
        Value::Object(m)
    }

    /// Reads the configuration from GGUF metadata (`general.architecture` `llama` or `qwen2`).
    pub fn from_gguf(md: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>) -> Result<Self> {
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| anyhow!("GGUF: metadata `general.architecture` is missing"))?;
        if arch != "llama" && arch != "qwen2" {
            bail!("GGUF: architecture `{arch}` is not supported (supported: llama, qwen2)");
        }
        let key = |k: &str| format!("{arch}.{k}");
        let int = |k: &str| -> Result<usize> {
            md.get(&key(k))
                .ok_or_else(|| anyhow!("GGUF: metadata `{}` is missing", key(k)))?
                .to_u64()
                .map(|v| v as usize)
                .map_err(|e| anyhow!("GGUF: metadata `{}`: {e}", key(k)))
        };
        let float = |k: &str| md.get(&key(k)).and_then(|v| v.to_f32().ok()).map(|v| v as f64);
        let heads = int("attention.head_count")?;
        let hidden = int("embedding_length")?;
        let vocab = match md.get("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()) {
            Some(t) => t.len(),
            None => int("vocab_size")?,
        };
        let head_dim = md.get(&key("attention.key_length")).and_then(|v| v.to_u64().ok()).map(|v| v as usize);
        let rope_scaling = match md.get(&key("rope.scaling.type")).and_then(|v| v.to_string().ok()).map(|s| s.as_str()) {
            Some("linear") => Some(RopeScaling::Linear { factor: float("rope.scaling.factor").unwrap_or(1.0) }),
            None | Some("none") => None,
            Some(other) => bail!("GGUF: {} `{other}` is not supported (supported: none, linear)", key("rope.scaling.type")),
        };
        let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let cfg = Self {
            model_type: arch.clone(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: int("feed_forward_length")?,
            num_hidden_layers: int("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: int("attention.head_count_kv").unwrap_or(heads),
            head_dim_override: head_dim.filter(|&d| d != hidden / heads),
            rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: float("rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: int("context_length").unwrap_or(2048),
            tie_word_embeddings: false, // decided by the presence of `output.weight`
            qkv_bias: arch == "qwen2",
            o_bias: false,
            mlp_bias: false,
            sliding_window: None,
            bos_token_id: id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
            extra: Map::new(),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Keys of `config.json` this parser turns into fields (everything else is kept in
/// `extra` and written back on save, once [`check_keys`] has accepted it).
const HANDLED_KEYS: &[&str] = &[
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias", "sliding_window",
    "use_sliding_window", "bos_token_id", "eos_token_id", "hidden_act",
];

/// Keys that do not change what the model computes: bookkeeping, tokens, and
/// settings of training or generation that tunebook takes from elsewhere.
const METADATA_KEYS: &[&str] = &[
    "_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache", "initializer_range",
    "pad_token_id", "unk_token_id", "sep_token_id", "decoder_start_token_id", "tokenizer_class", "prefix", "task_specific_params",
    "problem_type", "finetuning_task", "id2label", "label2id", "num_labels", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder",
    // Generation settings written by older transformers into config.json.
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    // Tensor-parallel slicing of the same products (transformers computes the same values).
    "pretraining_tp", "base_model_tp_plan", "base_model_pp_plan",
    // Read by `attn_implementation` choices in transformers, not the arithmetic.
    "_attn_implementation_autoset", "attn_implementation", "experts_implementation", "_commit_hash", "name_or_path",
    // SmolLM2's and transformers.js' markers.
    "is_llama_config", "transformers.js_config",
];

/// Refuses a `config.json` key that would change the computation and that tunebook
/// does not implement, instead of silently computing something else.
fn check_keys(map: &Map<String, Value>) -> Result<()> {
    let get = |k: &str| map.get(k).filter(|v| !v.is_null());
    if let Some(d) = get("attention_dropout").and_then(Value::as_f64) {
        if d != 0.0 {
            bail!("config.json: attention_dropout {d} is not supported (tunebook trains without attention dropout); set it to 0.0");
        }
    }
    if let Some(f) = get("partial_rotary_factor").and_then(Value::as_f64) {
        if f != 1.0 {
            bail!("config.json: partial_rotary_factor {f} is not supported (rotary embeddings on every dimension only)");
        }
    }
    for k in ["rope_interleaved", "use_mrope"] {
        if get(k).and_then(Value::as_bool) == Some(true) {
            bail!("config.json: {k} = true is not supported (rotary embeddings on halves of each head, as Llama applies them)");
        }
    }
    if get("quantization_config").is_some() {
        bail!("config.json: quantization_config is set: quantized checkpoints (GPTQ, AWQ, bitsandbytes...) are not supported; use the full-precision weights or a GGUF file");
    }
    const CHECKED: &[&str] = &[
        "attention_dropout", "partial_rotary_factor", "layer_types", "max_window_layers", "quantization_config", "rope_interleaved",
        "use_mrope",
    ];
    for k in map.keys() {
        let k = k.as_str();
        // Keys with a leading underscore are transformers' bookkeeping (`_name_or_path`,
        // `_model_name_or_path`, `_attn_implementation_autoset`, `_commit_hash`).
        if !k.starts_with('_') && !HANDLED_KEYS.contains(&k) && !METADATA_KEYS.contains(&k) && !CHECKED.contains(&k) {
            bail!(
                "config.json: key `{k}` is not understood by tunebook and may change what the model computes; \
                 remove it if it does not (tunebook supports llama, mistral and qwen2 configurations)"
            );
        }
    }
    Ok(())
}

/// The sliding window every layer uses, as transformers decides it. Mistral: the
/// `sliding_window` (default 4096; `null` for none) on every layer. Qwen2: only with
/// `use_sliding_window`, on the layers `layer_types` marks `sliding_attention`, or
/// else on layers from `max_window_layers` (default 28) on. Llama: none. A window on
/// some layers only is not implemented and is an error.
fn sliding_window_of(map: &Map<String, Value>, model_type: &str) -> Result<Option<usize>> {
    let get = |k: &str| map.get(k).filter(|v| !v.is_null());
    let window = || get("sliding_window").and_then(Value::as_u64).map(|v| v as usize);
    match model_type {
        "mistral" => Ok(if map.contains_key("sliding_window") { window() } else { Some(4096) }),
        "qwen2" => {
            if get("use_sliding_window").and_then(Value::as_bool) != Some(true) {
                return Ok(None);
            }
            let layers = get("num_hidden_layers").and_then(Value::as_u64).unwrap_or(0) as usize;
            let sliding: Vec<bool> = match get("layer_types").and_then(Value::as_array) {
                Some(types) => types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => Err(anyhow!("config.json: layer_types has {t}; expected full_attention or sliding_attention")),
                    })
                    .collect::<Result<_>>()?,
                None => {
                    let from = get("max_window_layers").and_then(Value::as_u64).unwrap_or(28) as usize;
                    (0..layers).map(|i| i >= from).collect()
                }
            };
            match (sliding.iter().all(|&s| s), sliding.iter().any(|&s| s)) {
                (_, false) => Ok(None),
                (true, true) => window().map(Some).ok_or_else(|| anyhow!("config.json: use_sliding_window is set but sliding_window is not")),
                (false, true) => bail!(
                    "config.json: sliding-window attention on some layers only (layer_types / max_window_layers) is not supported; tunebook uses one attention kind for every layer"
                ),
            }
        }
        _ => {
            if let Some(t) = get("layer_types").and_then(Value::as_array).and_then(|t| t.iter().find(|t| t.as_str() != Some("full_attention"))) {
                bail!("config.json: layer_types has {t}, but a {model_type} model attends fully in every layer here");
            }
            Ok(None)
        }
    }
}

/// `rope_theta` and the rope scaling, from either layout found in the wild:
/// transformers 5's `rope_parameters` (`{"rope_type", "rope_theta", ...}`) or the
/// older top-level `rope_theta` plus `rope_scaling` (with `rope_type`, or `type`).
/// An unknown rope type, or a field that would change the frequencies and is not
/// implemented, is an error naming it.
fn parse_rope(map: &Map<String, Value>) -> Result<(f64, Option<RopeScaling>)> {
    let get = |k: &str| map.get(k).filter(|v| !v.is_null());
    let top_theta = get("rope_theta").map(|v| v.as_f64().ok_or_else(|| anyhow!("config.json: rope_theta must be a number"))).transpose()?;
    let (params, key) = match (get("rope_parameters"), get("rope_scaling")) {
        (Some(p), None) => (Some(p), "rope_parameters"),
        (None, Some(s)) => (Some(s), "rope_scaling"),
        (None, None) => (None, ""),
        (Some(p), Some(s)) => {
            if p != s {
                bail!("config.json: both rope_parameters and rope_scaling are set and they differ; keep one (rope_parameters for transformers 5)");
            }
            (Some(p), "rope_parameters")
        }
    };
    let Some(params) = params else { return Ok((top_theta.unwrap_or(10000.0), None)) };
    let Value::Object(p) = params else { bail!("config.json: {key} must be an object") };
    if p.values().all(Value::is_object) && !p.is_empty() {
        bail!("config.json: {key} gives rope parameters per layer type ({}); that is not supported", p.keys().cloned().collect::<Vec<_>>().join(", "));
    }
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let theta = match (p.get("rope_theta").filter(|v| !v.is_null()), top_theta) {
        (Some(v), top) => {
            let t = v.as_f64().ok_or_else(|| anyhow!("config.json: {key}.rope_theta must be a number"))?;
            if top.is_some_and(|top| top != t) {
                bail!("config.json: rope_theta {} and {key}.rope_theta {t} differ; keep one", top.unwrap());
            }
            t
        }
        (None, Some(t)) => t,
        (None, None) => 10000.0,
    };
    let num = |k: &str| -> Result<f64> {
        p.get(k).and_then(Value::as_f64).ok_or_else(|| anyhow!("config.json: {key} of type `{kind}` needs a number `{k}`"))
    };
    let (scaling, fields): (Option<RopeScaling>, &[&str]) = match kind {
        "default" => (None, &[]),
        "linear" => (Some(RopeScaling::Linear { factor: num("factor")? }), &["factor"]),
        "llama3" => (
            Some(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                // transformers falls back to max_position_embeddings when it is absent.
                original_max_position_embeddings: match p.get("original_max_position_embeddings") {
                    Some(_) => num("original_max_position_embeddings")? as usize,
                    None => get("max_position_embeddings").and_then(Value::as_u64).ok_or_else(|| {
                        anyhow!("config.json: {key} of type `llama3` needs `original_max_position_embeddings` (or a top-level `max_position_embeddings`)")
                    })? as usize,
                },
            }),
            &["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"],
        ),
        other => bail!("config.json: {key} type `{other}` is not supported (supported: default, linear, llama3)"),
    };
    for (k, v) in p {
        let harmless = ["rope_type", "type", "rope_theta"].contains(&k.as_str()) || fields.contains(&k.as_str());
        // transformers writes `factor: 1.0` beside `default`; a neutral value changes nothing.
        let neutral = k == "factor" && v.as_f64() == Some(1.0);
        if !harmless && !neutral && !v.is_null() {
            bail!("config.json: {key}.{k} is not used by rope type `{kind}` in tunebook and would change the rotary frequencies; remove it or use a supported rope type");
        }
    }
    Ok((theta, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama3_qwen2_and_mistral_configs() -> Result<()> {
        let llama = LlamaConfig::from_hf_json(
            r#"{"model_type":"llama","vocab_size":128256,"hidden_size":2048,"intermediate_size":8192,
            "num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,"rms_norm_eps":1e-5,
            "rope_theta":500000.0,"rope_scaling":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
            "original_max_position_embeddings":8192,"rope_type":"llama3"},"tie_word_embeddings":true,
            "eos_token_id":[128001,128008,128009],"torch_dtype":"bfloat16","head_dim":64}"#,
        )?;
        assert_eq!(llama.num_key_value_heads, 8);
        assert!(llama.tie_word_embeddings);
        assert_eq!(llama.eos_token_ids, vec![128001, 128008, 128009]);
        assert!(matches!(llama.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 32.0));
        assert_eq!(llama.extra.get("torch_dtype").and_then(Value::as_str), Some("bfloat16"));
        let round = LlamaConfig::from_hf_json(&llama.to_hf_json().to_string())?;
        let mut expected = llama.clone();
        expected.extra.insert("architectures".into(), json!(["LlamaForCausalLM"]));
        assert_eq!(round, expected);

        let qwen = LlamaConfig::from_hf_json(
            r#"{"model_type":"qwen2","vocab_size":151936,"hidden_size":896,"intermediate_size":4864,
            "num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,"sliding_window":32768,
            "use_sliding_window":false,"eos_token_id":151643}"#,
        )?;
        assert!(qwen.qkv_bias && !qwen.o_bias && qwen.sliding_window.is_none());
        let mistral = LlamaConfig::from_hf_json(
            r#"{"model_type":"mistral","vocab_size":32000,"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"sliding_window":4096}"#,
        )?;
        assert_eq!(mistral.sliding_window, Some(4096));
        assert!(!mistral.qkv_bias);
        Ok(())
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let e = LlamaConfig::from_hf_json(r#"{"model_type":"gpt2"}"#).unwrap_err().to_string();
        assert!(e.contains("gpt2"), "{e}");
        let e = LlamaConfig::from_hf_json(r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
        let e = LlamaConfig::from_hf_json(
            r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("multiple"), "{e}");
        let e = LlamaConfig::from_hf_json(
            r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"rope_scaling":{"rope_type":"yarn","factor":4}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("yarn"), "{e}");
    }
}
