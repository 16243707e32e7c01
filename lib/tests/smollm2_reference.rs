//! Parity with Hugging Face transformers on the real SmolLM2-135M-Instruct GGUF (f32).
//!
//! The reference (`tests/data/smollm2_model_reference.json`) is made by
//! `tests/data/make_model_reference.py`. The GGUF is downloaded by `scripts/setup.sh` to
//! `$TUNEBOOK_SMOLLM2_GGUF`. Without it these tests say so and pass, except where
//! `TUNEBOOK_REQUIRE_SMOLLM2=1` (set by `scripts/test.sh`, so CI): there a missing
//! GGUF fails them.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use tunebook::model::{GenerationConfig, LlamaModel};
use tunebook::tokenize::{Message, Tokenizer};

mod common;
use common::gguf_or_skip;

#[test]
fn smollm2_gguf_matches_transformers() -> Result<()> {
    let Some(path) = gguf_or_skip("smollm2_gguf_matches_transformers") else { return Ok(()) };
    let reference: Value =
        serde_json::from_str(include_str!("data/smollm2_model_reference.json")).context("reference JSON")?;
    let model = LlamaModel::from_gguf(&path, &Device::Cpu, DType::F32)?;
    let tok = Tokenizer::from_gguf(&path)?;
    assert!(model.config.tie_word_embeddings && model.config.num_key_value_heads == 3);

    for case in reference["cases"].as_array().unwrap() {
        let text = case["prompt_text"].as_str().unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone())?;
        if case["kind"] == "chat" {
            let msgs: Vec<Message> = serde_json::from_value(case["messages"].clone())?;
            assert_eq!(tok.apply_chat_template(&msgs, true)?, text, "chat template rendering");
        }
        assert_eq!(tok.encode(text, false)?, want_ids, "prompt token ids of {text:?}");

        let n = want_ids.len();
        let logits = model.forward(&Tensor::from_vec(want_ids.clone(), (1, n), &Device::Cpu)?)?.squeeze(0)?;
        for (pos, top) in case["top10"].as_object().unwrap() {
            let pos: usize = pos.parse()?;
            let row = logits.get(pos)?.to_vec1::<f32>()?;
            let ref_ids: Vec<u32> = serde_json::from_value(top["ids"].clone())?;
            let ref_logits: Vec<f32> = serde_json::from_value(top["logits"].clone())?;
            let mut order: Vec<u32> = (0..row.len() as u32).collect();
            order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
            assert_eq!(&order[..10], &ref_ids[..], "top-10 ids at position {pos} of {text:?}");
            for (id, want) in ref_ids.iter().zip(&ref_logits) {
                let got = row[*id as usize];
                let rel = (got - want).abs() / want.abs().max(1e-6);
                assert!(rel <= 1e-3, "logit of token {id} at position {pos} of {text:?}: {got} vs {want} (rel {rel:.2e})");
            }
        }
        let want_gen: Vec<u32> = serde_json::from_value(case["greedy_ids"].clone())?;
        // The reference's greedy continuations run through EOS.
        let cfg = GenerationConfig { ignore_eos: true, ..GenerationConfig::greedy(want_gen.len()) };
        let (got_gen, _) = model.generate_ids(&want_ids, &cfg)?;
        assert_eq!(got_gen, want_gen, "greedy continuation of {text:?}: {:?}", tok.decode(&got_gen, false)?);
        assert_eq!(tok.decode(&got_gen, false)?, case["greedy_text"].as_str().unwrap(), "decoded continuation");
    }
    Ok(())
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// One LoRA training step (forward + backward) on SmolLM2, printed as a `BENCH {json}` line
/// for `bench/lora_step.py`. Batch and length from `BENCH_BATCH` / `BENCH_SEQ` (4 × 256).
#[test]
#[ignore = "benchmark: run by bench/lora_step.py"]
fn bench_lora_step_smollm2() -> Result<()> {
    use tunebook::model::{Lora, Packing, ops::profile};
    let Some(path) = gguf_or_skip("benchmark") else { return Ok(()) };
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (b, t, steps) = (env("BENCH_BATCH", 4), env("BENCH_SEQ", 256), env("BENCH_STEPS", 3));
    let mut model = LlamaModel::from_gguf(&path, &Device::Cpu, DType::F32)?;
    if env("BENCH_FULL", 0) == 1 {
        model.unfreeze_all()?;
    } else {
        let r = env("BENCH_RANK", 16);
        let lora = Lora { r, alpha: 2.0 * r as f64, dropout: 0.05, ..Lora::default() }.all_linear();
        model.add_lora(&lora)?;
    }
    let vocab = model.config.vocab_size as u64;
    let mut s = 12345u64;
    let ids: Vec<u32> = (0..b * t)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) % vocab) as u32
        })
        .collect();
    let labels: Vec<i64> = ids.iter().map(|&v| v as i64).collect();
    let x = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
    let mut fwd = Vec::new();
    let mut bwd = Vec::new();
    for step in 0..=steps {
        if step == 1 {
            profile::take();
        }
        let t0 = std::time::Instant::now();
        let tape = model.loss_tape(&x, &labels, &Packing::default(), true)?;
        let loss = tape.loss().clone();
        let t1 = std::time::Instant::now();
        let grads = tape.backward(1.0)?;
        let t2 = std::time::Instant::now();
        drop(grads);
        if step > 0 {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
        }
        eprintln!("step {step}: loss {:.4} forward {:.2}s backward {:.2}s", loss.to_scalar::<f32>()?, (t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (f, bw) = (median(&mut fwd), median(&mut bwd));
    let prof: Vec<serde_json::Value> = profile::take()
        .into_iter()
        .map(|(name, secs, calls)| serde_json::json!({"op": name, "seconds_per_step": secs / steps as f64, "calls_per_step": calls / steps as u64}))
        .collect();
    let out = serde_json::json!({
        "batch": b, "seq": t, "forward_s": f, "backward_s": bw, "step_s": f + bw,
        "tokens_per_s": (b * t) as f64 / (f + bw), "peak_rss_mib": peak_rss_mib(),
        "gemm": tunebook::model::ops::gemm::backend_name(), "threads": tunebook::model::ops::gemm::num_threads(),
        "profile": prof,
    });
    println!("BENCH {out}");
    Ok(())
}

/// Greedy decoding speed on SmolLM2 with a per-op profile (`TUNEBOOK_PROFILE=1`).
#[test]
#[ignore = "benchmark"]
fn bench_decode_smollm2() -> Result<()> {
    use tunebook::model::ops::profile;
    let Some(path) = gguf_or_skip("benchmark") else { return Ok(()) };
    let model = LlamaModel::from_gguf(&path, &Device::Cpu, DType::F32)?;
    let prompt: Vec<u32> = (0..40).map(|i| 100 + i * 7).collect();
    let cfg = GenerationConfig { ignore_eos: true, ..GenerationConfig::greedy(64) };
    model.generate_ids(&prompt, &GenerationConfig { ignore_eos: true, ..GenerationConfig::greedy(2) })?;
    profile::take();
    let t = std::time::Instant::now();
    let (ids, _) = model.generate_ids(&prompt, &cfg)?;
    let s = t.elapsed().as_secs_f64();
    println!("BENCH {{\"tokens\": {}, \"seconds\": {s:.3}, \"tok_per_s\": {:.2}, \"gemm\": {:?}}}", ids.len(), ids.len() as f64 / s, tunebook::model::ops::gemm::backend_name());
    for (name, secs, calls) in profile::take() {
        println!("  {name:20} {secs:8.3}s {calls:6} calls");
    }
    Ok(())
}

#[test]
fn smollm2_text_chat_streaming_and_stop_strings() -> Result<()> {
    use tunebook::model::{FinishReason, Model};
    let Some(path) = gguf_or_skip("smollm2_text_chat_streaming_and_stop_strings") else { return Ok(()) };
    let model = Model::load_on(path.to_str().unwrap(), &Device::Cpu, DType::F32)?;
    let question = [Message::user("What is the capital of France?")];
    assert_eq!(model.chat(&question)?, "The capital of France is Paris.");

    let mut pieces = Vec::new();
    let cfg = GenerationConfig { stop_strings: vec![" Paris".into()], ..GenerationConfig::greedy(32) };
    let g = model.chat_with(&question, &cfg, |s| pieces.push(s.to_string()))?;
    assert_eq!(g.text, "The capital of France is");
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert_eq!(pieces.concat(), g.text, "streamed pieces add up to the text");
    assert!(pieces.len() > 1, "text arrives token by token");
    assert!(!pieces.concat().contains("Paris"), "nothing of the stop string is streamed");

    let g = model.generate_with("The capital of France is", &GenerationConfig::greedy(4), |_| {})?;
    assert_eq!(g.ids.len(), 4);
    assert_eq!(g.finish_reason, FinishReason::Length);
    Ok(())
}

#[test]
fn cli_generate_answers_and_reports_bad_models() -> Result<()> {
    let exe = env!("CARGO_BIN_EXE_tunebook");
    let missing = std::process::Command::new(exe)
        .args(["generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"])
        .output()?;
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("/nonexistent/model.gguf") && err.contains("no such file"), "{err}");

    let Some(path) = gguf_or_skip("the GGUF half of cli_generate_answers_and_reports_bad_models") else { return Ok(()) };
    let out = std::process::Command::new(exe)
        .args(["generate", "--model", path.to_str().unwrap(), "--chat", "What is the capital of France?", "--max-tokens", "16"])
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "The capital of France is Paris.");
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(summary.contains("37 prompt tokens") && summary.contains("stop: Eos"), "{summary}");
    Ok(())
}

#[test]
fn smollm2_saved_as_hugging_face_directory_reloads_identically() -> Result<()> {
    use tunebook::model::Model;
    let Some(path) = gguf_or_skip("smollm2_saved_as_hugging_face_directory_reloads_identically") else { return Ok(()) };
    let gguf = Model::load_on(path.to_str().unwrap(), &Device::Cpu, DType::F32)?;
    let dir = tempfile::tempdir()?;
    gguf.save_pretrained(dir.path())?;
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(dir.path().join(f).is_file(), "{f} written");
    }
    let hf = Model::load_on(dir.path().to_str().unwrap(), &Device::Cpu, DType::F32)?;
    assert!(hf.llama.config.tie_word_embeddings);
    let ids = Tensor::new(&[[1u32, 9690, 198, 2683, 359, 253, 5356]], &Device::Cpu)?;
    let a = gguf.llama.forward(&ids)?;
    let b = hf.llama.forward(&ids)?;
    assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?, "bit-identical logits");
    assert_eq!(hf.chat(&[Message::user("What is the capital of France?")])?, "The capital of France is Paris.");
    // Saving again from the directory copies its tokenizer files verbatim.
    let again = tempfile::tempdir()?;
    hf.save_pretrained(again.path())?;
    assert_eq!(std::fs::read(dir.path().join("tokenizer.json"))?, std::fs::read(again.path().join("tokenizer.json"))?);
    Ok(())
}

/// A loaded model's tokenizer (the generation path) and the tokenizer training
/// data goes through must agree on SmolLM2: same chat renderings and the same
/// ids, or training and inference would see different tokens.
#[test]
fn model_and_data_tokenizers_agree_on_smollm2() -> Result<()> {
    let Some(path) = gguf_or_skip("model_and_data_tokenizers_agree_on_smollm2") else { return Ok(()) };
    let engine = tunebook::model::Model::load_on(path.to_str().unwrap(), &Device::Cpu, DType::F32)?.tokenizer.expect("a GGUF has a tokenizer");
    let data = Tokenizer::from_gguf(&path)?;
    let chats = [
        vec![Message::user("What is the capital of France?")],
        vec![Message::system("Answer in one word."), Message::user("2+2=?"), Message::assistant("4")],
        vec![Message::user("naïve café — 12345 tokens\n\tfn main() { println!(\"hi\"); }")],
    ];
    for chat in &chats {
        let a = engine.apply_chat_template(chat, true)?;
        let b = data.apply_chat_template(chat, true)?;
        assert_eq!(a, b, "chat template renderings differ");
        assert_eq!(engine.encode(&a, false)?, data.encode(&b, false)?);
    }
    assert!(engine.stop_ids().contains(&2));
    assert_eq!(data.stop_ids(), vec![2]);
    Ok(())
}
