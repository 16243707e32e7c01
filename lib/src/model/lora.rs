//! LoRA adapters in PEFT's format, so PEFT and vLLM load what tunebook trains.
//!
//! `y = x·Wᵀ + (dropout(x)·Aᵀ·Bᵀ)·(alpha / r)`, A `[r, in]` Kaiming-uniform, B `[out, r]` zeros.
//! The base weight stays a plain tensor: no gradient is computed or stored for it.

use super::io::write_safetensors;
use crate::files::write_atomic;
use super::llama::LlamaModel;
use super::ops;
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;

/// The projections LoRA can target, by their Hugging Face module names.
pub const ALL_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// A LoRA configuration: what to adapt and how, with one set of defaults (rank 8,
/// alpha 16, dropout 0.05, every projection) for the model engine, runs and
/// `CONFIG.toml`'s `[lora]` section (keys `r`, `alpha`, `dropout`, `targets`,
/// `use_rslora`). Built by name:
///
/// ```
/// use tunebook::model::Lora;
/// let l = Lora::rank(16).alpha(32.0).dropout(0.0).targets(&["q_proj", "v_proj"]);
/// assert_eq!(l.scale(), 2.0);
/// ```
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Lora {
    /// Rank `r`.
    pub r: usize,
    /// Scale numerator: the update is multiplied by `alpha / r` (`alpha / √r` with rsLoRA).
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f32,
    /// Module names among [`ALL_TARGETS`].
    #[serde(rename = "targets", alias = "target_modules")]
    pub target_modules: Vec<String>,
    /// rsLoRA scaling.
    pub use_rslora: bool,
    /// Seed of A's initialisation (a run sets its own seed here).
    #[serde(skip)]
    pub seed: u64,
}

impl Default for Lora {
    /// r 8, alpha 16, dropout 0.05, every projection ([`ALL_TARGETS`]).
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: ALL_TARGETS.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
            seed: 0,
        }
    }
}

impl Lora {
    /// Adapters of rank `r`, the other settings at their defaults.
    pub fn rank(r: usize) -> Self {
        Self { r, ..Self::default() }
    }

    /// The scale numerator.
    pub fn alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }

    /// Dropout on the adapter's input while training.
    pub fn dropout(mut self, p: f32) -> Self {
        self.dropout = p;
        self
    }

    /// The projections that get adapters (names among [`ALL_TARGETS`]).
    pub fn targets(mut self, modules: &[&str]) -> Self {
        self.target_modules = modules.iter().map(|s| s.to_string()).collect();
        self
    }

    /// rsLoRA scaling (`alpha / √r`).
    pub fn rslora(mut self, on: bool) -> Self {
        self.use_rslora = on;
        self
    }

    /// The seed of A's initialisation.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

impl Lora {
    /// Targets every projection of every layer.
    pub fn all_linear(mut self) -> Self {
        self.target_modules = ALL_TARGETS.iter().map(|s| s.to_string()).collect();
        self
    }

    /// The factor applied to `B·A`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora { self.alpha / (self.r as f64).sqrt() } else { self.alpha / self.r as f64 }
    }

    /// Checks rank, dropout and target names.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("LoRA: rank r must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("LoRA: dropout must be in [0, 1), got {}", self.dropout);
        }
        if self.target_modules.is_empty() {
            bail!("LoRA: target_modules is empty (choose among {ALL_TARGETS:?})");
        }
        for t in &self.target_modules {
            if !ALL_TARGETS.contains(&t.as_str()) {
                bail!("LoRA: unknown target module `{t}` (choose among {ALL_TARGETS:?})");
            }
        }
        Ok(())
    }
}

/// The low-rank update of one projection.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
}

impl LoraAdapter {
    /// `(dropout(x)·Aᵀ·Bᵀ)·scale`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = if train && self.dropout > 0.0 { candle_nn::ops::dropout(x, self.dropout)? } else { x.clone() };
        // The f32 adapter is cast to the input's dtype (bf16 compute); gradients flow back in f32.
        let h = ops::linear(&x, &self.a.as_tensor().to_dtype(x.dtype())?)?;
        Ok((ops::linear(&h, &self.b.as_tensor().to_dtype(x.dtype())?)? * self.scale)?)
    }

    /// `scale · B·A`, the dense update (`[out, in]`).
    pub fn delta(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?.detach())
    }
}

/// Deterministic uniform values in [-bound, bound).
fn uniform(n: usize, bound: f32, seed: u64) -> Vec<f32> {
    let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
        })
        .collect()
}

/// Whether `dir` is a PEFT adapter folder (`adapter_config.json`, no full weights' `config.json`).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.is_dir() && dir.join("adapter_config.json").is_file() && !dir.join("config.json").is_file()
}

/// The base model a PEFT adapter folder names (`base_model_name_or_path` in its
/// `adapter_config.json`).
pub fn adapter_base_model(dir: &Path) -> Result<String> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
    v.get("base_model_name_or_path").and_then(Value::as_str).filter(|b| !b.is_empty()).map(str::to_string).with_context(|| {
        format!("{}: `base_model_name_or_path` is missing, so the base model of this adapter is unknown", cfg_path.display())
    })
}

fn module_name(sub: &str) -> &str {
    sub.rsplit('.').next().unwrap_or(sub)
}

impl LlamaModel {
    /// Freezes the base weights and adds fresh adapters on `config.target_modules` of every layer
    /// (replacing any adapters already there).
    pub fn add_lora(&mut self, config: &Lora) -> Result<()> {
        config.validate()?;
        self.freeze_all()?;
        let device = self.device().clone();
        // Adapters are f32 whatever the base weights are (f32 master weights under bf16).
        let dtype = DType::F32;
        let scale = config.scale();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (i, (sub, lin)) in layer.linears_mut().into_iter().enumerate() {
                if !config.target_modules.iter().any(|t| t == module_name(sub)) {
                    lin.lora = None;
                    continue;
                }
                let (inp, out) = lin.in_out();
                let bound = 1.0 / (inp as f32).sqrt();
                let seed = config.seed.wrapping_mul(1_000_003).wrapping_add((l * 7 + i) as u64);
                let a = Tensor::from_vec(uniform(config.r * inp, bound, seed), (config.r, inp), &device)?;
                let b = Tensor::zeros((out, config.r), DType::F32, &device)?;
                lin.lora = Some(LoraAdapter {
                    a: Var::from_tensor(&a.to_dtype(dtype)?)?,
                    b: Var::from_tensor(&b.to_dtype(dtype)?)?,
                    scale,
                    dropout: config.dropout,
                });
            }
        }
        Ok(())
    }

    /// Whether any projection carries an adapter.
    pub fn has_lora(&self) -> bool {
        self.layers.iter().any(|l| l.linears().iter().any(|(_, lin)| lin.lora.is_some()))
    }

    /// Removes every adapter, leaving the base weights as they are.
    pub fn remove_lora(&mut self) {
        for layer in self.layers.iter_mut() {
            for (_, lin) in layer.linears_mut() {
                lin.lora = None;
            }
        }
    }

    /// Folds every adapter into its base weight (`W += scale·B·A`) and removes the adapters.
    pub fn merge_lora(&mut self) -> Result<()> {
        for layer in self.layers.iter_mut() {
            for (_, lin) in layer.linears_mut() {
                if let Some(lora) = lin.lora.take() {
                    lin.weight = (lin.weight.detach() + lora.delta()?.to_dtype(lin.weight.dtype())?)?;
                }
            }
        }
        Ok(())
    }

    /// Saves the adapters in PEFT's layout: `dir/adapter_model.safetensors` (keys
    /// `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, ...) and
    /// `dir/adapter_config.json`. Files are written atomically.
    pub fn save_lora(&self, dir: impl AsRef<Path>, config: &Lora, base_model_name_or_path: &str) -> Result<()> {
        let dir = dir.as_ref();
        if !self.has_lora() {
            bail!("save_lora: the model has no LoRA adapters (call add_lora or load_lora first)");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut tensors = Vec::new();
        let mut targets = std::collections::BTreeSet::new();
        for (l, layer) in self.layers.iter().enumerate() {
            for (sub, lin) in layer.linears() {
                if let Some(lora) = &lin.lora {
                    let p = format!("base_model.model.model.layers.{l}.{sub}");
                    tensors.push((format!("{p}.lora_A.weight"), lora.a.as_tensor().to_dtype(DType::F32)?));
                    tensors.push((format!("{p}.lora_B.weight"), lora.b.as_tensor().to_dtype(DType::F32)?));
                    targets.insert(module_name(sub).to_string());
                }
            }
        }
        write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
        let cfg = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "target_modules": targets.into_iter().collect::<Vec<_>>(),
            "bias": "none",
            "use_rslora": config.use_rslora,
            "use_dora": false,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        });
        write_atomic(&dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
        Ok(())
    }

    /// Loads a PEFT LoRA adapter directory (as written by [`save_lora`](Self::save_lora), PEFT
    /// or any trainer using PEFT) onto this model, freezing the base weights. Returns its config.
    pub fn load_lora(&mut self, dir: impl AsRef<Path>) -> Result<Lora> {
        let dir = dir.as_ref();
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("reading {} (a PEFT adapter directory needs it)", cfg_path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
        if let Some(t) = v.get("peft_type").and_then(Value::as_str) {
            if t != "LORA" {
                bail!("{}: peft_type `{t}` is not supported (only LORA)", cfg_path.display());
            }
        }
        if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
            bail!("{}: DoRA adapters are not supported", cfg_path.display());
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if v.get(k).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
                bail!("{}: per-module `{k}` is not supported", cfg_path.display());
            }
        }
        let r = v.get("r").and_then(Value::as_u64).with_context(|| format!("{}: missing `r`", cfg_path.display()))? as usize;
        let alpha = v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(r as f64);
        let targets: Vec<String> = match v.get("target_modules") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(|s| s.to_string()).collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => vec![],
        };
        let config = Lora {
            r,
            alpha,
            dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32,
            target_modules: targets,
            use_rslora: v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
            seed: 0,
        };
        let st_path = dir.join("adapter_model.safetensors");
        if !st_path.exists() {
            bail!("{} is missing (adapters saved as adapter_model.bin are not supported: re-save with safetensors)", st_path.display());
        }
        let tensors = candle_core::safetensors::load(&st_path, &Device::Cpu)
            .with_context(|| format!("reading {}", st_path.display()))?;
        let mut found: HashMap<String, Tensor> = HashMap::new();
        for (k, t) in tensors {
            // PEFT names: base_model.model.model.layers.N.x.y.lora_A.weight, sometimes with an
            // adapter name (".lora_A.default.weight").
            let key = k.strip_prefix("base_model.model.").unwrap_or(&k).replace(".default.weight", ".weight");
            found.insert(key, t);
        }
        self.freeze_all()?;
        let scale = config.scale();
        let dtype = DType::F32;
        let device = self.device().clone();
        let mut used = 0;
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (sub, lin) in layer.linears_mut() {
                let p = format!("model.layers.{l}.{sub}");
                let a = found.get(&format!("{p}.lora_A.weight"));
                let b = found.get(&format!("{p}.lora_B.weight"));
                lin.lora = match (a, b) {
                    (Some(a), Some(b)) => {
                        let (inp, out) = lin.in_out();
                        if a.dims() != [r, inp] || b.dims() != [out, r] {
                            bail!(
                                "{}: `{p}` has lora_A {:?} and lora_B {:?}, expected [{r}, {inp}] and [{out}, {r}]",
                                st_path.display(),
                                a.dims(),
                                b.dims()
                            );
                        }
                        used += 2;
                        Some(LoraAdapter {
                            a: Var::from_tensor(&a.to_device(&device)?.to_dtype(dtype)?)?,
                            b: Var::from_tensor(&b.to_device(&device)?.to_dtype(dtype)?)?,
                            scale,
                            dropout: config.dropout,
                        })
                    }
                    (None, None) => None,
                    _ => bail!("{}: `{p}` has only one of lora_A / lora_B", st_path.display()),
                };
            }
        }
        if used != found.len() {
            let mut unknown: Vec<&String> = found.keys().filter(|k| !k.starts_with("model.layers.") || !k.contains(".lora_")).collect();
            unknown.sort();
            bail!(
                "{}: {} tensors do not match this model's projections (e.g. {:?}); was the adapter trained for another model?",
                st_path.display(),
                found.len() - used,
                unknown.into_iter().take(3).collect::<Vec<_>>()
            );
        }
        Ok(config)
    }
}
