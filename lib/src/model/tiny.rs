//! Tiny randomly initialised models, written by tunebook itself, for fast tests and demos.

use super::config::LlamaConfig;
use super::llama::LlamaModel;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

fn normal(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            // Box–Muller
            let (u1, u2) = (next(), next());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * std
        })
        .collect()
}

impl LlamaModel {
    /// A model with random weights: projections and embeddings ~ N(0, 0.1²), norms ≈ 1 and
    /// biases ~ N(0, 0.02²). Deterministic in `seed`.
    pub fn random(config: LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut i = 0u64;
        Self::from_tensors(config.clone(), device, DType::F32, |name| {
            i += 1;
            let c = &config;
            let (h, d) = (c.hidden_size, c.head_dim());
            let shape: Vec<usize> = if name.ends_with("norm.weight") {
                vec![h]
            } else if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
                vec![c.vocab_size, h]
            } else {
                let out = if name.contains("q_proj") {
                    c.num_attention_heads * d
                } else if name.contains("k_proj") || name.contains("v_proj") {
                    c.num_key_value_heads * d
                } else if name.contains("gate_proj") || name.contains("up_proj") {
                    c.intermediate_size
                } else {
                    h
                };
                let inp = if name.contains("o_proj") {
                    c.num_attention_heads * d
                } else if name.contains("down_proj") {
                    c.intermediate_size
                } else {
                    h
                };
                if name.ends_with(".bias") { vec![out] } else { vec![out, inp] }
            };
            let n: usize = shape.iter().product();
            let seed = seed.wrapping_mul(1_000_003).wrapping_add(i);
            let v = if name.ends_with("norm.weight") {
                normal(n, 0.1, seed).into_iter().map(|x| 1.0 + x).collect()
            } else if name.ends_with(".bias") {
                normal(n, 0.02, seed)
            } else {
                normal(n, 0.1, seed)
            };
            Ok(Some(Tensor::from_vec(v, shape, &Device::Cpu)?))
        })
    }
}

/// Writes a tiny random Llama (see [`LlamaConfig::tiny`]) in Hugging Face layout into `dir`
/// (`config.json` + `model.safetensors`) and returns it.
pub fn write_tiny_model(dir: &Path, config: LlamaConfig, seed: u64) -> Result<LlamaModel> {
    let model = LlamaModel::random(config, seed, &Device::Cpu)?;
    model.save_pretrained(dir)?;
    Ok(model)
}
