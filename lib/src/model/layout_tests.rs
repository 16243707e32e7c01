//! `config.json` in both layouts found in the wild, checked against transformers 5.
//!
//! `lib/tests/data/config_layouts_reference.json` is made by
//! `lib/tests/data/make_config_reference.py` (transformers 5.25): four tiny models
//! (Llama 3.1 with llama3 rope scaling, an explicit head_dim and sharded
//! safetensors; Qwen2 with q/k/v biases, tied embeddings and bf16 weights; Mistral
//! with a sliding window shorter than the input; Llama with attention/MLP biases
//! and linear rope scaling), each with the `config.json` transformers 5 wrote
//! (`rope_parameters`) and the older layout (top-level `rope_theta` and
//! `rope_scaling`), the names, dtypes and shapes of the saved tensors, and
//! transformers' logits and greedy continuation. The weights are a formula of the
//! tensor name (FNV-1a seeded splitmix64), so no weight file is committed: the
//! test writes the same files again and loads them.

use super::{GenerationConfig, LlamaConfig, LlamaModel, RopeScaling};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

const REFERENCE: &str = include_str!("../../tests/data/config_layouts_reference.json");

#[path = "../../tests/common/formula.rs"]
mod formula;
use formula::{fnv1a64, weights};

fn reference() -> Value {
    serde_json::from_str(REFERENCE).expect("reference JSON")
}

/// Writes the model directory of `model` with `config.json` text `config`.
fn write_model(model: &Value, config: &str, dir: &std::path::Path) -> Result<()> {
    std::fs::write(dir.join("config.json"), config)?;
    formula::write_safetensors(&model["safetensors"], dir)?;
    if let Some(index) = model["safetensors_index_json"].as_str() {
        std::fs::write(dir.join("model.safetensors.index.json"), index)?;
    }
    Ok(())
}

#[test]
fn weight_formula_matches_the_reference_generator() {
    for s in reference()["weight_formula_samples"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        assert_eq!(format!("{:#018x}", fnv1a64(name)), s["fnv1a64"].as_str().unwrap(), "{name}");
        let first = weights(name, 4);
        for (i, want) in s["first_f32_bits"].as_array().unwrap().iter().enumerate() {
            assert_eq!(format!("{:#010x}", (first[i] as f32).to_bits()), want.as_str().unwrap(), "{name}[{i}] as f32");
        }
        for (i, want) in s["first_bf16_bits"].as_array().unwrap().iter().enumerate() {
            let bf = half::bf16::from_f32(first[i] as f32).to_bits();
            assert_eq!(format!("{bf:#06x}"), want.as_str().unwrap(), "{name}[{i}] as bf16");
        }
    }
}

#[test]
fn both_config_layouts_give_the_configuration_transformers_5_uses() -> Result<()> {
    for model in reference()["models"].as_array().unwrap() {
        let name = model["name"].as_str().unwrap();
        let v5 = LlamaConfig::from_hf_json(model["config_v5"].as_str().unwrap()).with_context(|| format!("{name}: transformers 5 layout"))?;
        let legacy = LlamaConfig::from_hf_json(model["config_legacy"].as_str().unwrap()).with_context(|| format!("{name}: older layout"))?;
        let arithmetic = |c: &LlamaConfig| {
            (c.rope_theta, c.rope_scaling.clone(), c.head_dim(), c.qkv_bias, c.o_bias, c.mlp_bias, c.sliding_window, c.rms_norm_eps, c.tie_word_embeddings)
        };
        assert_eq!(arithmetic(&v5), arithmetic(&legacy), "{name}: the two layouts describe different models");
        match name {
            "llama31" => {
                assert_eq!(v5.rope_theta, 500000.0);
                assert_eq!(
                    v5.rope_scaling,
                    Some(RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 64 })
                );
                assert_eq!((v5.head_dim(), v5.eos_token_ids.clone()), (16, vec![2, 3]));
            }
            "qwen2" => assert!(v5.qkv_bias && !v5.o_bias && !v5.mlp_bias && v5.tie_word_embeddings && v5.sliding_window.is_none()),
            "mistral" => assert_eq!((v5.sliding_window, v5.qkv_bias), (Some(4), false)),
            "llama_bias_linear" => {
                assert_eq!(v5.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
                assert!(v5.qkv_bias && v5.o_bias && v5.mlp_bias);
            }
            other => panic!("unexpected model {other} in the reference"),
        }
    }
    Ok(())
}

#[test]
fn models_saved_by_transformers_5_compute_its_logits_in_both_config_layouts() -> Result<()> {
    for model in reference()["models"].as_array().unwrap() {
        let name = model["name"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(model["input_ids"].clone())?;
        let want: Vec<Vec<f32>> = serde_json::from_value(model["logits"].clone())?;
        let want_greedy: Vec<u32> = serde_json::from_value(model["greedy_ids"].clone())?;
        for layout in ["config_v5", "config_legacy"] {
            let dir = tempfile::tempdir()?;
            write_model(model, model[layout].as_str().unwrap(), dir.path())?;
            let m = LlamaModel::from_hf_dir(dir.path(), &Device::Cpu, DType::F32).with_context(|| format!("{name} ({layout})"))?;
            let x = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu)?;
            let got = m.forward(&x)?.squeeze(0)?.to_vec2::<f32>()?;
            let mut worst = 0f32;
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                worst = worst.max((g - w).abs() / w.abs().max(1.0));
            }
            assert!(worst < 2e-5, "{name} ({layout}): logits differ from transformers 5 by up to {worst}");
            let greedy = GenerationConfig { ignore_eos: true, ..GenerationConfig::greedy(want_greedy.len()) };
            let (out, _) = m.generate_ids(&ids, &greedy)?;
            assert_eq!(out, want_greedy, "{name} ({layout}): greedy continuation");
        }
    }
    Ok(())
}

#[test]
fn unsupported_rope_and_attention_settings_are_errors_that_name_the_key() {
    let base = r#""model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":2,"num_attention_heads":2"#;
    let err = |extra: &str| LlamaConfig::from_hf_json(&format!("{{{base},{extra}}}")).map(|_| ()).unwrap_err().to_string();
    assert!(err(r#""rope_parameters":{"rope_type":"yarn","factor":4.0,"rope_theta":10000.0}"#).contains("yarn"));
    assert!(err(r#""rope_parameters":{"rope_type":"linear","factor":2.0,"rope_theta":1e4,"partial_rotary_factor":0.5}"#).contains("partial_rotary_factor"));
    assert!(err(r#""rope_theta":10000.0,"rope_parameters":{"rope_type":"default","rope_theta":500000.0}"#).contains("rope_theta"));
    assert!(err(r#""rope_scaling":{"type":"dynamic","factor":2.0}"#).contains("dynamic"));
    assert!(err(r#""layer_types":["full_attention","sliding_attention"]"#).contains("layer_types"));
    assert!(err(r#""attention_dropout":0.1"#).contains("attention_dropout"));
    assert!(err(r#""some_new_scaling_knob":3"#).contains("some_new_scaling_knob"));
    let qwen = r#""model_type":"qwen2","vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":4,"num_attention_heads":2,"num_key_value_heads":2"#;
    let e = LlamaConfig::from_hf_json(&format!(r#"{{{qwen},"use_sliding_window":true,"sliding_window":4,"max_window_layers":2}}"#)).unwrap_err().to_string();
    assert!(e.contains("some layers"), "{e}");
    // Keys that change nothing are accepted, as transformers writes them.
    let ok = LlamaConfig::from_hf_json(&format!(
        r#"{{{base},"pretraining_tp":1,"pad_token_id":null,"dtype":"float32","use_cache":true,"rope_parameters":{{"rope_type":"default","rope_theta":10000.0}}}}"#
    ))
    .unwrap();
    assert_eq!((ok.rope_theta, ok.rope_scaling), (10000.0, None));
}

#[test]
fn llama3_scaling_without_its_original_length_takes_max_position_embeddings_as_transformers_does() {
    let c = LlamaConfig::from_hf_json(
        r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,
        "max_position_embeddings":96,"rope_parameters":{"rope_type":"llama3","rope_theta":5e5,"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0}}"#,
    )
    .unwrap();
    assert_eq!(
        c.rope_scaling,
        Some(RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 96 })
    );
}
