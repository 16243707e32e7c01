//! The fine-tuning configuration: every option of [`super::FineTune`], as one
//! serialisable struct that is also the `tunebook train CONFIG.toml` format.

use crate::data::{ChatLoss, Task};
use crate::model::Lora;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How long to train: `"2ep"` epochs (fractions allowed), `"1000000tok"` tokens,
/// `"200ba"` optimizer steps (batches).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Duration {
    /// Passes over the training data.
    Epochs(f64),
    /// Window tokens processed (batch × accumulation × context length per step).
    Tokens(u64),
    /// Optimizer steps.
    Batches(u64),
}

impl Duration {
    /// Parses `"2ep"`, `"0.5ep"`, `"1000000tok"` or `"200ba"`.
    pub fn parse(s: &str) -> Result<Duration> {
        let t = s.trim();
        let bad = || {
            anyhow::anyhow!(
                "training_duration {s:?} is not understood: write a number followed by `ep` (epochs, e.g. \"2ep\"), `tok` (tokens, e.g. \"1000000tok\") or `ba` (optimizer steps, e.g. \"200ba\")"
            )
        };
        let (num, unit) = t.find(|c: char| c.is_ascii_alphabetic()).map(|i| t.split_at(i)).ok_or_else(bad)?;
        let num = num.trim();
        let d = match unit {
            "ep" => Duration::Epochs(num.parse::<f64>().map_err(|_| bad())?),
            "tok" => Duration::Tokens(num.replace('_', "").parse::<u64>().map_err(|_| bad())?),
            "ba" => Duration::Batches(num.replace('_', "").parse::<u64>().map_err(|_| bad())?),
            _ => return Err(bad()),
        };
        let positive = match d {
            Duration::Epochs(e) => e.is_finite() && e > 0.0,
            Duration::Tokens(n) | Duration::Batches(n) => n > 0,
        };
        if !positive {
            bail!("training_duration {s:?} must be greater than zero");
        }
        Ok(d)
    }

    /// Optimizer steps this duration takes, given the steps in one epoch and the
    /// tokens one step processes.
    pub fn total_steps(self, steps_per_epoch: usize, tokens_per_step: usize) -> usize {
        match self {
            Duration::Epochs(e) => ((e * steps_per_epoch as f64).ceil() as usize).max(1),
            Duration::Tokens(n) => (n as usize).div_ceil(tokens_per_step.max(1)).max(1),
            Duration::Batches(n) => n as usize,
        }
    }
}

/// Learning-rate schedule after warmup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Half a cosine from the peak down to `min_lr_ratio × peak`.
    #[default]
    Cosine,
    /// A straight line from the peak down to `min_lr_ratio × peak`.
    Linear,
    /// The peak until the end.
    Constant,
}

/// Numeric precision of the forward and backward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 weights and activations.
    #[default]
    F32,
    /// bf16 compute with f32 master weights (meant for CUDA; on the CPU it works but is
    /// slower than f32).
    Bf16,
}

/// Everything a fine-tuning run needs. Field names are the `CONFIG.toml` keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Base model: a Hugging Face directory, a `.gguf` file, or a Hugging Face id in the local cache.
    pub model: String,
    /// Run name (also the run directory name); generated when empty.
    pub name: String,
    /// What to learn.
    pub task: Task,
    /// Training data: a `.jsonl`/`.parquet`/`.csv` file or folder, a Delta table folder (`@vN` for a version), or a folder of `.txt` files.
    pub train_data: String,
    /// Evaluation data, same formats.
    pub eval_data: Option<String>,
    /// Hold out this share of the training rows for evaluation when `eval_data` is not given (0 = none).
    pub eval_split: f64,
    /// Prompts answered at each checkpoint (logged as generations).
    pub eval_prompts: Vec<String>,
    /// Register the result as `catalog.schema` (named after the run) or `catalog.schema.model`.
    pub register_to: Option<String>,
    /// `"1ep"`, `"1000000tok"` or `"200ba"`.
    pub training_duration: String,
    /// Peak learning rate. Default: 5e-6 for full fine-tuning, 2e-4 with LoRA.
    pub learning_rate: Option<f64>,
    /// Tokens per training window; default the model's own maximum, capped at 2048.
    pub context_length: Option<usize>,
    /// Start from these weights: a checkpoint directory of an earlier run, or a saved model or adapter directory.
    pub custom_weights_path: Option<String>,
    /// MLflow experiment name.
    pub experiment: Option<String>,
    /// MLflow tracking URI (default: `MLFLOW_TRACKING_URI`).
    pub tracking_uri: Option<String>,
    /// LoRA settings; absent means full fine-tuning.
    pub lora: Option<Lora>,
    /// Windows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step, across all ranks: `batch_size × grad_accum`
    /// is the global batch whatever the number of processes (each of N ranks runs
    /// `grad_accum / N` of them).
    pub grad_accum: usize,
    /// ZeRO stage: 0 keeps the whole optimizer state on every rank; 1 shards AdamW's
    /// moments across ranks (each keeps and updates its share, then the updated weights
    /// are gathered), for full fine-tuning on several processes. Same results either way.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub zero_stage: u8,
    /// Linear warmup steps (wins over `warmup_ratio` when both are set).
    pub warmup_steps: Option<usize>,
    /// Warmup as a share of all steps.
    pub warmup_ratio: f64,
    /// Schedule after warmup.
    pub schedule: Schedule,
    /// Floor of the decayed learning rate, as a share of the peak.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay (never applied to norms and biases).
    pub weight_decay: f64,
    /// AdamW β₁.
    pub adam_beta1: f64,
    /// AdamW β₂.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_eps: f64,
    /// Clip the global gradient norm to this value (none when absent or 0).
    pub max_grad_norm: Option<f64>,
    /// Seed for data order, adapter initialisation and dropout.
    pub seed: u64,
    /// Checkpoint every N optimizer steps (0: only at the end).
    pub checkpoint_every: usize,
    /// Checkpoints to keep (the newest ones).
    pub keep_checkpoints: usize,
    /// Also upload every checkpoint to the tracking server (as artifacts `checkpoints/step-N`).
    pub log_checkpoints: bool,
    /// Evaluate every N optimizer steps (0: only at the end).
    pub eval_every: usize,
    /// Most evaluation windows per evaluation (0: all).
    pub eval_max_windows: usize,
    /// Tokens generated per eval prompt.
    pub eval_max_new_tokens: usize,
    /// Pack several examples per window.
    pub packing: bool,
    /// Which chat tokens count in the loss.
    pub chat_loss: ChatLoss,
    /// `f32`, or `bf16` (bf16 compute, f32 master weights; for CUDA).
    pub precision: Precision,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: String::new(),
            name: String::new(),
            task: Task::Chat,
            train_data: String::new(),
            eval_data: None,
            eval_split: 0.0,
            eval_prompts: Vec::new(),
            register_to: None,
            training_duration: "1ep".into(),
            learning_rate: None,
            context_length: None,
            custom_weights_path: None,
            experiment: None,
            tracking_uri: None,
            lora: None,
            batch_size: 4,
            grad_accum: 1,
            zero_stage: 0,
            warmup_steps: None,
            warmup_ratio: 0.0,
            schedule: Schedule::Cosine,
            min_lr_ratio: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: Some(1.0),
            seed: 42,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            log_checkpoints: false,
            eval_every: 0,
            eval_max_windows: 0,
            eval_max_new_tokens: 64,
            packing: true,
            chat_loss: ChatLoss::AllAssistant,
            precision: Precision::F32,
            device: "auto".into(),
        }
    }
}

impl TrainConfig {
    /// Reads a `CONFIG.toml`; unknown keys are errors naming the key.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the run config {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: TrainConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("invalid run config: {}", e.to_string().trim()))?;
        Ok(cfg)
    }

    /// The config as TOML.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// The learning rate in effect.
    pub fn peak_lr(&self) -> f64 {
        self.learning_rate.unwrap_or(if self.lora.is_some() { 2e-4 } else { 5e-6 })
    }

    /// The parsed training duration.
    pub fn duration(&self) -> Result<Duration> {
        Duration::parse(&self.training_duration)
    }

    /// Checks every option that can be checked without loading anything; the
    /// error names the option and what to change.
    pub fn validate(&self) -> Result<()> {
        if self.model.trim().is_empty() {
            bail!("model is not set: give a Hugging Face directory, a .gguf file or a cached Hugging Face id");
        }
        if self.train_data.trim().is_empty() {
            bail!("train_data is not set: give a .jsonl/.parquet/.csv file, a Delta table folder or a folder of .txt files");
        }
        self.duration()?;
        let lr = self.peak_lr();
        if !(lr.is_finite() && lr > 0.0 && lr < 1.0) {
            bail!("learning_rate {lr} is out of range: use a positive value below 1 (typical: 1e-5 to 3e-4)");
        }
        if self.batch_size == 0 {
            bail!("batch_size must be at least 1");
        }
        if self.grad_accum == 0 {
            bail!("grad_accum must be at least 1");
        }
        if self.zero_stage > 1 {
            bail!(
                "zero_stage = {}: stages 2 and 3 (sharded gradients, sharded weights) are not implemented; use 1 (sharded optimizer state) or 0",
                self.zero_stage
            );
        }
        if let Some(c) = self.context_length {
            if c < 8 {
                bail!("context_length {c} is too small: use at least 8 tokens");
            }
        }
        if !(0.0..1.0).contains(&self.eval_split) {
            bail!("eval_split {} must be in [0, 1)", self.eval_split);
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            bail!("warmup_ratio {} must be in [0, 1)", self.warmup_ratio);
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            bail!("min_lr_ratio {} must be in [0, 1]", self.min_lr_ratio);
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay < 1.0) {
            bail!("weight_decay {} must be in [0, 1)", self.weight_decay);
        }
        for (k, v) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&v) {
                bail!("{k} {v} must be in [0, 1)");
            }
        }
        if !(self.adam_eps > 0.0) {
            bail!("adam_eps must be positive");
        }
        if let Some(g) = self.max_grad_norm {
            if !(g >= 0.0) {
                bail!("max_grad_norm {g} must be positive (or 0 for no clipping)");
            }
        }
        if self.keep_checkpoints == 0 {
            bail!("keep_checkpoints must be at least 1 (the last checkpoint is what a resume continues from)");
        }
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        if let Some(r) = &self.register_to {
            let parts: Vec<&str> = r.split('.').collect();
            if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty() || p.contains(['/', ':', ' '])) {
                bail!("register_to {r:?} must be `catalog.schema` or `catalog.schema.model` (no `/`, `:` or spaces)");
            }
        }
        if !self.name.is_empty() && !self.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            bail!("name {:?} may only hold letters, digits, `-`, `_` and `.` (it names a directory)", self.name);
        }
        match self.device.as_str() {
            "auto" | "cpu" | "cuda" => {}
            d if d.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok()) => {}
            d => bail!("device {d:?} is not one of auto, cpu, cuda, cuda:N"),
        }
        Ok(())
    }

    /// The configuration flattened to `(key, value)` pairs for tracking, nested
    /// keys joined with `.` (e.g. `lora.r`); absent options are left out.
    pub fn flatten(&self) -> Vec<(String, String)> {
        let v = serde_json::to_value(self).unwrap_or_default();
        let mut out = Vec::new();
        flatten_into("", &v, &mut out);
        out
    }
}

fn flatten_into(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten_into(&key, x, out);
            }
        }
        Value::Null => {}
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        Value::Array(a) => out.push((
            prefix.to_string(),
            a.iter().map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string())).collect::<Vec<_>>().join(","),
        )),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_bad_ones_say_how_to_fix() {
        assert_eq!(Duration::parse("2ep").unwrap(), Duration::Epochs(2.0));
        assert_eq!(Duration::parse("0.5ep").unwrap(), Duration::Epochs(0.5));
        assert_eq!(Duration::parse("1_000_000tok").unwrap(), Duration::Tokens(1_000_000));
        assert_eq!(Duration::parse("200ba").unwrap(), Duration::Batches(200));
        let e = Duration::parse("3 epochs").unwrap_err().to_string();
        assert!(e.contains("\"2ep\""), "{e}");
        assert!(Duration::parse("0ba").unwrap_err().to_string().contains("greater than zero"));
        assert_eq!(Duration::Epochs(1.5).total_steps(10, 100), 15);
        assert_eq!(Duration::Tokens(1001).total_steps(10, 100), 11);
    }

    #[test]
    fn toml_round_trip_and_unknown_keys() {
        let cfg = TrainConfig::from_toml(
            "model = \"m\"\ntrain_data = \"d.jsonl\"\ntask = \"INSTRUCTION_FINETUNE\"\n[lora]\nr = 4\n",
        )
        .unwrap();
        assert_eq!(cfg.task, Task::Instruction);
        assert_eq!(cfg.lora.as_ref().unwrap().r, 4);
        assert_eq!(cfg.lora.as_ref().unwrap().alpha, 16.0);
        let back = TrainConfig::from_toml(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(back, cfg);
        let e = TrainConfig::from_toml("model = \"m\"\nlearning_rat = 1e-4\n").unwrap_err().to_string();
        assert!(e.contains("learning_rat"), "{e}");
        let flat = cfg.flatten();
        assert!(flat.contains(&("lora.r".to_string(), "4".to_string())), "{flat:?}");
        assert!(flat.contains(&("task".to_string(), "instruction_finetune".to_string())));
    }

    #[test]
    fn validation_names_the_option() {
        let base = TrainConfig { model: "m".into(), train_data: "d".into(), ..Default::default() };
        base.validate().unwrap();
        let cases: Vec<(TrainConfig, &str)> = vec![
            (TrainConfig { learning_rate: Some(-1.0), ..base.clone() }, "learning_rate"),
            (TrainConfig { batch_size: 0, ..base.clone() }, "batch_size"),
            (TrainConfig { training_duration: "forever".into(), ..base.clone() }, "training_duration"),
            (TrainConfig { register_to: Some("a/b".into()), ..base.clone() }, "register_to"),
            (TrainConfig { lora: Some(Lora { r: 0, ..Default::default() }), ..base.clone() }, "rank"),
            (TrainConfig { device: "tpu".into(), ..base.clone() }, "device"),
            (TrainConfig { model: "".into(), ..base.clone() }, "model"),
        ];
        for (c, want) in cases {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "expected {want:?} in {e:?}");
        }
    }
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}
