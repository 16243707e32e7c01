//! Model-level tests on tiny random models written by [`write_tiny_model`].

use super::*;
use crate::model::ops::gradcheck::assert_close;
use anyhow::Result;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor, Var};

fn ids(v: &[u32], b: usize) -> Result<Tensor> {
    Ok(Tensor::from_vec(v.to_vec(), (b, v.len() / b), &Device::Cpu)?)
}

fn tiny() -> Result<LlamaModel> {
    LlamaModel::random(LlamaConfig::tiny(), 7, &Device::Cpu)
}

#[test]
fn hf_directory_round_trip_keeps_logits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = LlamaConfig::tiny();
    cfg.tie_word_embeddings = true;
    let m = write_tiny_model(dir.path(), cfg, 3)?;
    let loaded = LlamaModel::load(dir.path().to_str().unwrap(), &Device::Cpu, DType::F32)?;
    assert!(loaded.lm_head.is_none(), "tied embeddings stay tied");
    let x = ids(&[1, 5, 9, 3, 60, 2], 1)?;
    assert_close(&m.forward(&x)?, &loaded.forward(&x)?, 0.0, "logits after save/load")?;
    // The files are what transformers expects.
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json"))?)?;
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["tie_word_embeddings"], true);
    let st = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)?;
    assert!(st.contains_key("model.layers.1.self_attn.q_proj.weight"));
    assert!(!st.contains_key("lm_head.weight"));
    Ok(())
}

#[test]
fn safetensors_streams_tensors_and_borrowed_buffers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("mixed.safetensors");
    let values: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    let bf = Tensor::new(&[[1.5f32, -2.0], [0.25, 8.0]], &Device::Cpu)?.to_dtype(DType::BF16)?;
    let strided = Tensor::arange(0u32, 6, &Device::Cpu)?.reshape((2, 3))?.t()?;
    write_safetensors_data(
        &path,
        vec![
            ("z.buffer".into(), TensorData::F32(&values, vec![2, 3])),
            ("a.bf16".into(), TensorData::Tensor(bf.clone())),
            ("m.strided".into(), TensorData::Tensor(strided.clone())),
        ],
    )?;
    let back = candle_core::safetensors::load(&path, &Device::Cpu)?;
    assert_eq!(back["z.buffer"].dims(), &[2, 3]);
    assert_eq!(back["z.buffer"].flatten_all()?.to_vec1::<f32>()?, values);
    assert_eq!(back["a.bf16"].dtype(), DType::BF16);
    assert_close(&back["a.bf16"], &bf, 0.0, "bf16")?;
    assert_eq!(back["m.strided"].to_vec2::<u32>()?, strided.to_vec2::<u32>()?);
    // Names are sorted in the header, as transformers writes them.
    let raw = std::fs::read(&path)?;
    let hlen = u64::from_le_bytes(raw[..8].try_into()?) as usize;
    let header = std::str::from_utf8(&raw[8..8 + hlen])?;
    assert!(header.find("a.bf16") < header.find("m.strided") && header.find("m.strided") < header.find("z.buffer"), "{header}");
    // A buffer that does not fill its shape is refused, and nothing is written.
    let bad = dir.path().join("bad.safetensors");
    let err = write_safetensors_data(&bad, vec![("x".into(), TensorData::F32(&values, vec![4, 2]))]).unwrap_err().to_string();
    assert!(err.contains("6 values but shape [4, 2]"), "{err}");
    assert!(!bad.exists());
    Ok(())
}

#[test]
fn hugging_face_ids_resolve_through_the_local_cache() -> Result<()> {
    let cache = tempfile::tempdir()?;
    let repo = cache.path().join("models--tiny-org--tiny-llama");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::write(repo.join("refs/main"), format!("{commit}\n"))?;
    let snap = repo.join("snapshots").join(commit);
    write_tiny_model(&snap, LlamaConfig::tiny(), 1)?;
    let src = io::resolve_model_in("tiny-org/tiny-llama", cache.path())?;
    assert_eq!(src, ModelSource::HfDir(snap.clone()));
    assert_eq!(io::resolve_model_in(&format!("tiny-org/tiny-llama@{commit}"), cache.path())?, ModelSource::HfDir(snap.clone()));
    let e = io::resolve_model_in("tiny-org/tiny-llama@v2", cache.path()).unwrap_err().to_string();
    assert!(e.contains("refs/v2") && e.contains("cannot download"), "{e}");
    std::fs::remove_file(snap.join("config.json"))?;
    let e = io::resolve_model_in("tiny-org/tiny-llama", cache.path()).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
    Ok(())
}

#[test]
fn sharded_safetensors_and_qwen2_biases_load() -> Result<()> {
    let mut cfg = LlamaConfig::tiny();
    cfg.model_type = "qwen2".into();
    cfg.qkv_bias = true;
    let m = LlamaModel::random(cfg.clone(), 4, &Device::Cpu)?;
    let dir = tempfile::tempdir()?;
    let all = m.named_tensors();
    let (a, b) = all.split_at(all.len() / 2);
    write_safetensors(&dir.path().join("model-00001-of-00002.safetensors"), a)?;
    write_safetensors(&dir.path().join("model-00002-of-00002.safetensors"), b)?;
    let mut map = serde_json::Map::new();
    for (n, _) in a {
        map.insert(n.clone(), "model-00001-of-00002.safetensors".into());
    }
    for (n, _) in b {
        map.insert(n.clone(), "model-00002-of-00002.safetensors".into());
    }
    std::fs::write(dir.path().join("model.safetensors.index.json"), serde_json::json!({"weight_map": map}).to_string())?;
    std::fs::write(dir.path().join("config.json"), cfg.to_hf_json().to_string())?;
    let loaded = LlamaModel::from_hf_dir(dir.path(), &Device::Cpu, DType::F32)?;
    assert!(loaded.layers[0].self_attn.q_proj.bias.is_some());
    let x = ids(&[4, 8, 15, 16, 23, 42], 2)?;
    assert_close(&m.forward(&x)?, &loaded.forward(&x)?, 0.0, "sharded load")?;
    Ok(())
}

#[test]
fn missing_and_misshapen_tensors_are_named() -> Result<()> {
    let m = tiny()?;
    let cfg = m.config.clone();
    let err = LlamaModel::from_tensors(cfg.clone(), &Device::Cpu, DType::F32, |n| {
        Ok(if n.contains("layers.1.mlp.up_proj") { None } else { m.named_tensors().into_iter().find(|(k, _)| k == n).map(|(_, t)| t) })
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("model.layers.1.mlp.up_proj.weight"), "{err:#}");
    let err = LlamaModel::from_tensors(cfg, &Device::Cpu, DType::F32, |n| {
        let t = m.named_tensors().into_iter().find(|(k, _)| k == n).map(|(_, t)| t);
        Ok(if n == "model.norm.weight" { Some(Tensor::zeros(3, DType::F32, &Device::Cpu)?) } else { t })
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("model.norm.weight` has shape [3]"), "{err:#}");
    let e = resolve_model("no-such-org/no-such-model").unwrap_err().to_string();
    assert!(e.contains("models--no-such-org--no-such-model"), "{e}");
    let x = ids(&[1, 64], 1)?;
    assert!(m.forward(&x).unwrap_err().to_string().contains("outside the vocabulary"));
    let empty = Tensor::zeros((1, 0), DType::U32, &Device::Cpu)?;
    assert!(m.loss(&empty, &[], &Packing::default(), false).unwrap_err().to_string().contains("empty"));
    assert!(m.forward(&empty).unwrap_err().to_string().contains("empty"));
    let x = ids(&[1, 2, 3], 1)?;
    let bad = Packing { positions: None, segment_ids: Some(vec![0, 0]) };
    assert!(m.loss(&x, &[1, 2, 3], &bad, false).unwrap_err().to_string().contains("segment ids"));
    assert!(m.loss(&x, &[1, 2], &Packing::default(), false).unwrap_err().to_string().contains("labels"));
    assert!(m.generate_ids(&[], &GenerationConfig::greedy(3)).unwrap_err().to_string().contains("no tokens"));
    Ok(())
}

/// Writes `m` as a llama.cpp-style GGUF (f32 tensors, Q/K rows permuted for interleaved rope).
fn write_gguf(m: &LlamaModel, path: &std::path::Path, quant: GgmlDType) -> Result<()> {
    let c = &m.config;
    let permute = |t: &Tensor, heads: usize| -> Result<Tensor> {
        let (rows, cols) = t.dims2()?;
        Ok(t.reshape((heads, 2, rows / heads / 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
    };
    let mut qts: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in m.named_tensors() {
        let g = name
            .replace("model.embed_tokens.weight", "token_embd.weight")
            .replace("model.norm.weight", "output_norm.weight")
            .replace("lm_head.weight", "output.weight")
            .replace("model.layers.", "blk.")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down")
            .replace("post_attention_layernorm", "ffn_norm")
            .replace("input_layernorm", "attn_norm");
        let t = if g.contains("attn_q.") {
            permute(&t, c.num_attention_heads)?
        } else if g.contains("attn_k.") {
            permute(&t, c.num_key_value_heads)?
        } else {
            t
        };
        let dt = if t.rank() == 2 && t.dims()[1] % 32 == 0 { quant } else { GgmlDType::F32 };
        qts.push((g, QTensor::quantize(&t, dt)?));
    }
    use gguf_file::Value as V;
    let md: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.block_count", V::U32(c.num_hidden_layers as u32)),
        ("llama.embedding_length", V::U32(c.hidden_size as u32)),
        ("llama.feed_forward_length", V::U32(c.intermediate_size as u32)),
        ("llama.attention.head_count", V::U32(c.num_attention_heads as u32)),
        ("llama.attention.head_count_kv", V::U32(c.num_key_value_heads as u32)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(c.rms_norm_eps as f32)),
        ("llama.rope.freq_base", V::F32(c.rope_theta as f32)),
        ("llama.context_length", V::U32(c.max_position_embeddings as u32)),
        ("llama.vocab_size", V::U32(c.vocab_size as u32)),
    ];
    let mdr: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let tr: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path)?;
    gguf_file::write(&mut f, &mdr, &tr)?;
    Ok(())
}

#[test]
fn gguf_load_unpermutes_q_and_k() -> Result<()> {
    let m = tiny()?;
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("tiny.gguf");
    write_gguf(&m, &p, GgmlDType::F32)?;
    let g = LlamaModel::load(p.to_str().unwrap(), &Device::Cpu, DType::F32)?;
    assert!(g.lm_head.is_some());
    let x = ids(&[3, 1, 4, 1, 5, 9, 2, 6], 1)?;
    assert_close(&m.forward(&x)?, &g.forward(&x)?, 1e-6, "GGUF logits equal HF logits")?;
    Ok(())
}

#[test]
fn quantized_gguf_decodes_through_exact_packed_weights() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for quant in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4_0] {
        let p = dir.path().join(format!("tiny-{quant:?}.gguf"));
        write_gguf(&tiny()?, &p, quant)?;
        let g = LlamaModel::from_gguf(&p, &Device::Cpu, DType::F32)?;
        // q, k, v, o, gate, up (32 columns) of 2 layers, plus the LM head and the embedding.
        assert_eq!(g.packed_count(), 2 * 6 + 2, "{quant:?}");
        let seq = [5u32, 17, 33, 2, 40];
        let full = g.forward(&ids(&seq, 1)?)?.squeeze(0)?;
        let mut cache = KvCache::new();
        g.forward_cached(&ids(&seq[..4], 1)?, &mut cache)?;
        let step = g.forward_cached(&ids(&seq[4..], 1)?, &mut cache)?;
        assert_close(&step.squeeze(0)?, &full.get(4)?, 1e-5, "packed decode step equals dense forward")?;
        // A trainable copy no longer uses the packed weights, and still agrees.
        let mut t = g.clone();
        t.unfreeze_all()?;
        let mut cache = KvCache::new();
        t.forward_cached(&ids(&seq[..4], 1)?, &mut cache)?;
        assert_close(&t.forward_cached(&ids(&seq[4..], 1)?, &mut cache)?, &step, 1e-5, "dense decode")?;
    }
    Ok(())
}

#[test]
fn cached_forward_matches_full_forward() -> Result<()> {
    let m = tiny()?;
    let seq = [5u32, 17, 33, 2, 40, 41, 9];
    let full = m.forward(&ids(&seq, 1)?)?.squeeze(0)?;
    let mut cache = KvCache::new();
    let first = m.forward_cached(&ids(&seq[..4], 1)?, &mut cache)?;
    assert_close(&first.squeeze(0)?, &full.get(3)?, 1e-5, "prefill")?;
    for (i, &t) in seq[4..].iter().enumerate() {
        let step = m.forward_cached(&ids(&[t], 1)?, &mut cache)?;
        assert_close(&step.squeeze(0)?, &full.get(4 + i)?, 1e-5, "decode step")?;
    }
    assert_eq!(cache.len(), seq.len());
    Ok(())
}

#[test]
fn cached_decode_across_cache_growth_batches_and_clones() -> Result<()> {
    // 150 tokens per row: the per-layer buffers start at 64 and grow twice.
    let m = tiny()?;
    let rows: Vec<Vec<u32>> = (0..2u32).map(|r| (0..150u32).map(|i| (i * 7 + r * 13 + 3) % 64).collect()).collect();
    let flat: Vec<u32> = rows.concat();
    let full = m.forward(&ids(&flat, 2)?)?;
    let mut cache = KvCache::new();
    let prefill: Vec<u32> = rows.iter().flat_map(|r| r[..10].to_vec()).collect();
    m.forward_cached(&ids(&prefill, 2)?, &mut cache)?;
    let mut fork = None;
    for t in 10..150 {
        let step: Vec<u32> = rows.iter().map(|r| r[t]).collect();
        let y = m.forward_cached(&ids(&step, 2)?, &mut cache)?;
        assert_close(&y, &full.narrow(1, t, 1)?.squeeze(1)?, 1e-4, &format!("decode step {t}"))?;
        if t == 70 {
            fork = Some(cache.clone());
        }
    }
    assert_eq!(cache.len(), 150);
    // The clone taken at 71 tokens was not disturbed by the original's later writes, and
    // continues on its own: here with other tokens than the original saw.
    let mut fork = fork.unwrap();
    let other: Vec<u32> = rows.iter().map(|r| r[71] ^ 1).collect();
    let y = m.forward_cached(&ids(&other, 2)?, &mut fork)?;
    let mut alt = rows.clone();
    for (r, o) in alt.iter_mut().zip(&other) {
        r.truncate(72);
        r[71] = *o;
    }
    let expect = m.forward(&ids(&alt.concat(), 2)?)?.narrow(1, 71, 1)?.squeeze(1)?;
    assert_close(&y, &expect, 1e-4, "decode from a clone")?;
    // And the clone's write did not reach the original's history.
    let next: Vec<u32> = vec![5, 6];
    let y = m.forward_cached(&ids(&next, 2)?, &mut cache)?;
    let longer: Vec<u32> = rows.iter().zip(&next).flat_map(|(r, n)| r.iter().copied().chain([*n])).collect();
    let expect = m.forward(&ids(&longer, 2)?)?.narrow(1, 150, 1)?.squeeze(1)?;
    assert_close(&y, &expect, 1e-4, "the original after the clone's append")?;
    Ok(())
}

#[test]
fn packed_sequences_match_separate_runs() -> Result<()> {
    let m = tiny()?;
    let a = [5u32, 6, 7];
    let b = [9u32, 10, 11, 12];
    let packed: Vec<u32> = a.iter().chain(&b).copied().collect();
    let packing = Packing::from_segments(vec![0, 0, 0, 1, 1, 1, 1], 1, 7)?;
    assert_eq!(packing.positions.as_deref(), Some(&[0, 1, 2, 0, 1, 2, 3][..]));
    let lp = m.forward_packed(&ids(&packed, 1)?, &packing, false)?.squeeze(0)?;
    let la = m.forward(&ids(&a, 1)?)?.squeeze(0)?;
    let lb = m.forward(&ids(&b, 1)?)?.squeeze(0)?;
    assert_close(&lp.narrow(0, 0, 3)?, &la, 1e-5, "first sequence")?;
    assert_close(&lp.narrow(0, 3, 4)?, &lb, 1e-5, "second sequence")?;
    Ok(())
}

#[test]
fn loss_equals_cross_entropy_of_shifted_logits() -> Result<()> {
    let m = tiny()?;
    let x = ids(&[1, 2, 3, 4, 5, 6, 7, 8], 2)?;
    let labels = [1i64, 2, 3, 4, IGNORE_INDEX, 6, 7, 8];
    let loss = m.loss(&x, &labels, &Packing::default(), false)?.to_scalar::<f32>()?;
    let logits = m.forward(&x)?;
    // Position t of each row predicts the label at t + 1; ignored labels drop out.
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for b in 0..2 {
        for t in 0..3 {
            let l = labels[b * 4 + t + 1];
            if l != IGNORE_INDEX {
                rows.push(logits.get(b)?.get(t)?);
                targets.push(l);
            }
        }
    }
    let want = ops::cross_entropy(&Tensor::stack(&rows, 0)?, &targets)?.to_scalar::<f32>()?;
    assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");
    Ok(())
}

fn grad_norms(m: &LlamaModel, train: bool) -> Result<(Vec<(String, f32)>, candle_core::backprop::GradStore)> {
    let x = ids(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 2)?;
    let labels: Vec<i64> = x.flatten_all()?.to_vec1::<u32>()?.iter().map(|&v| v as i64).collect();
    let packing = Packing::from_segments(vec![0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0], 2, 6)?;
    let grads = m.loss(&x, &labels, &packing, train)?.backward()?;
    let mut out = Vec::new();
    for (name, v) in m.trainable_vars()? {
        let g = grads.get(v.as_tensor()).map(|g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt()).unwrap_or(0.0);
        out.push((name, g));
    }
    Ok((out, grads))
}

#[test]
fn every_trainable_parameter_gets_a_gradient_in_full_fine_tuning() -> Result<()> {
    let mut cfg = LlamaConfig::tiny();
    cfg.qkv_bias = true;
    let mut m = LlamaModel::random(cfg, 11, &Device::Cpu)?;
    m.unfreeze_all()?;
    let (norms, _) = grad_norms(&m, false)?;
    assert_eq!(norms.len(), m.named_tensors().len());
    for (name, n) in &norms {
        assert!(*n > 0.0 && n.is_finite(), "{name} has gradient norm {n}");
    }
    Ok(())
}

/// Gradients of every trainable variable from the layer-by-layer backward pass and from
/// one backward pass over the whole graph, side by side.
fn tape_and_graph_grads(m: &LlamaModel) -> Result<Vec<(String, Tensor, Tensor)>> {
    let x = ids(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 2)?;
    let labels: Vec<i64> = x.flatten_all()?.to_vec1::<u32>()?.iter().map(|&v| v as i64).collect();
    let packing = Packing::from_segments(vec![1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1], 2, 6)?;
    let loss = m.loss(&x, &labels, &packing, false)?;
    let want_loss = loss.to_scalar::<f32>()?;
    let whole = (loss * 0.75)?.backward()?;
    let tape = m.loss_tape(&x, &labels, &packing, false)?;
    assert_eq!(tape.loss().to_scalar::<f32>()?, want_loss, "the tape's loss is the model's loss");
    let tape = tape.backward(0.75)?;
    let mut out = vec![];
    for (name, v) in m.trainable_vars()? {
        let a = tape.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient from the tape")).clone();
        let b = whole.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient from the graph")).clone();
        out.push((name, a, b));
    }
    Ok(out)
}

#[test]
fn layer_by_layer_backward_gives_the_whole_graph_gradients() -> Result<()> {
    // Full fine-tuning with tied embeddings: the embedding gets a gradient from both ends.
    let mut cfg = LlamaConfig::tiny();
    cfg.tie_word_embeddings = true;
    cfg.num_hidden_layers = 3;
    let mut m = LlamaModel::random(cfg, 5, &Device::Cpu)?;
    m.unfreeze_all()?;
    let full = tape_and_graph_grads(&m)?;
    assert_eq!(full.len(), m.named_tensors().len());
    for (name, a, b) in &full {
        assert_close(a, b, 1e-6, name)?;
    }
    // LoRA: only adapters train, and layer 0's input needs no gradient. (Dropout stays
    // off: its seed is process-wide and other tests draw from it concurrently.)
    let mut m = LlamaModel::random(LlamaConfig::tiny(), 6, &Device::Cpu)?;
    m.add_lora(&Lora { r: 4, alpha: 8.0, dropout: 0.1, ..Lora::default() }.all_linear())?;
    for layer in &m.layers {
        for (_, lin) in layer.linears() {
            // B starts at zero; give it values so every path carries a gradient.
            let b = &lin.lora.as_ref().unwrap().b;
            b.set(&b.as_tensor().ones_like()?.affine(0.01, 0.0)?)?;
        }
    }
    let lora = tape_and_graph_grads(&m)?;
    assert_eq!(lora.len(), 2 * 2 * 7);
    for (name, a, b) in &lora {
        assert_close(a, b, 1e-6, name)?;
        assert!(a.sqr()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name}: zero gradient");
    }
    Ok(())
}

#[test]
fn lora_trains_only_adapters_and_frozen_weights_get_no_gradient() -> Result<()> {
    let mut m = tiny()?;
    m.add_lora(&Lora { r: 4, alpha: 8.0, dropout: 0.1, ..Lora::default() }.all_linear())?;
    // B starts at zero, so make it non-zero to give A a gradient too.
    for layer in &m.layers {
        for (_, lin) in layer.linears() {
            let l = lin.lora.as_ref().unwrap();
            l.b.set(&(crate::model::ops::gradcheck::rand_tensor(l.b.dims(), 5)? * 0.1)?)?;
        }
    }
    let (norms, grads) = grad_norms(&m, true)?;
    assert_eq!(norms.len(), 2 * 2 * 7, "A and B of 7 projections × 2 layers");
    for (name, n) in &norms {
        assert!(*n > 0.0 && n.is_finite(), "{name} has gradient norm {n}");
    }
    for (name, t) in m.named_tensors() {
        assert!(!t.is_variable(), "{name} should be frozen");
        assert!(grads.get(&t).is_none(), "frozen {name} must not get a gradient");
    }
    Ok(())
}

#[test]
fn model_loss_gradient_matches_finite_differences() -> Result<()> {
    let mut cfg = LlamaConfig::tiny();
    cfg.num_hidden_layers = 1;
    let mut m = LlamaModel::random(cfg, 2, &Device::Cpu)?;
    m.unfreeze_all()?;
    let x = ids(&[3, 9, 27, 17, 51, 25], 1)?;
    let labels: Vec<i64> = vec![3, 9, 27, 17, 51, 25];
    let loss_of = |m: &LlamaModel| -> Result<f64> { Ok(m.loss(&x, &labels, &Packing::default(), false)?.to_scalar::<f32>()? as f64) };
    let grads = m.loss(&x, &labels, &Packing::default(), false)?.backward()?;
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
    ] {
        let (_, var) = m.trainable_vars()?.into_iter().find(|(n, _)| n == name).unwrap();
        let g = grads.get(var.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?;
        let base = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        // The largest-gradient element, where finite differences are most informative.
        let i = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
        let h = 1e-2f32;
        let eval = |d: f32| -> Result<f64> {
            let mut p = base.clone();
            p[i] += d;
            var.set(&Tensor::from_vec(p, var.shape(), &Device::Cpu)?)?;
            let l = loss_of(&m)?;
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu)?)?;
            Ok(l)
        };
        let num = (eval(h)? - eval(-h)?) / (2.0 * h as f64);
        assert!((num - g[i] as f64).abs() < 2e-2 * (g[i].abs() as f64).max(1e-2), "{name}[{i}]: analytic {} numeric {num}", g[i]);
    }
    Ok(())
}

#[test]
fn lora_merge_and_peft_round_trip() -> Result<()> {
    let mut m = tiny()?;
    let cfg = Lora { r: 2, alpha: 4.0, dropout: 0.0, target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()], ..Default::default() };
    m.add_lora(&cfg)?;
    for layer in &m.layers {
        for (_, lin) in layer.linears() {
            if let Some(l) = &lin.lora {
                l.b.set(&(crate::model::ops::gradcheck::rand_tensor(l.b.dims(), 9)? * 0.5)?)?;
            }
        }
    }
    let x = ids(&[7, 8, 9, 10, 11], 1)?;
    let with_lora = m.forward(&x)?;
    let base = tiny()?.forward(&x)?;
    let diff = (&with_lora - &base)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff > 1e-3, "the adapter changes the output");

    let dir = tempfile::tempdir()?;
    m.save_lora(dir.path(), &cfg, "tiny-llama")?;
    let st = candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)?;
    assert!(st.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(st.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    assert_eq!(st.len(), 2 * 2 * 3);
    let ac: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json"))?)?;
    assert_eq!(ac["peft_type"], "LORA");
    assert_eq!(ac["r"], 2);
    assert_eq!(ac["target_modules"], serde_json::json!(["down_proj", "q_proj", "v_proj"]));

    let mut fresh = tiny()?;
    let loaded_cfg = fresh.load_lora(dir.path())?;
    assert_eq!(loaded_cfg.r, 2);
    assert_close(&fresh.forward(&x)?, &with_lora, 1e-6, "PEFT load")?;

    fresh.merge_lora()?;
    assert!(!fresh.has_lora());
    assert_close(&fresh.forward(&x)?, &with_lora, 1e-4, "merged")?;

    // An adapter for another shape is refused with the tensor named.
    let mut other_cfg = LlamaConfig::tiny();
    other_cfg.hidden_size = 16;
    let mut other = LlamaModel::random(other_cfg, 1, &Device::Cpu)?;
    let e = other.load_lora(dir.path()).unwrap_err().to_string();
    assert!(e.contains("lora_A"), "{e}");
    Ok(())
}

#[test]
fn generation_streams_stops_on_eos_and_is_deterministic() -> Result<()> {
    let m = tiny()?;
    let prompt = [1u32, 10, 20];
    let (greedy, reason) = m.generate_ids(&prompt, &GenerationConfig::greedy(12))?;
    // Greedy with the cache equals argmax over full recomputation.
    let mut ctx = prompt.to_vec();
    for &t in &greedy {
        let l = m.forward(&ids(&ctx, 1)?)?.squeeze(0)?;
        let last = l.get(ctx.len() - 1)?.argmax(0)?.to_scalar::<u32>()?;
        assert_eq!(last, t);
        ctx.push(t);
    }
    assert!(reason == FinishReason::Length || reason == FinishReason::Eos);
    // Stop on a chosen EOS: the first greedy token.
    let cfg = GenerationConfig { eos_token_ids: vec![greedy[0]], ..GenerationConfig::greedy(12) };
    let (none, reason) = m.generate_ids(&prompt, &cfg)?;
    assert!(none.is_empty() && reason == FinishReason::Eos);
    // Sampling: same seed, same tokens; the iterator streams one id at a time.
    let cfg = GenerationConfig { top_k: Some(20), top_p: Some(0.9), ..GenerationConfig::sampled(10, 1.0, 5) };
    let a: Vec<u32> = m.stream_ids(&prompt, &cfg)?.collect::<Result<_>>()?;
    let b = m.generate_ids(&prompt, &cfg)?.0;
    assert_eq!(a, b);
    Ok(())
}

#[test]
fn vars_are_only_what_trains() -> Result<()> {
    let mut m = tiny()?;
    assert!(m.trainable_vars()?.is_empty(), "a loaded model is frozen");
    m.unfreeze_all()?;
    assert_eq!(m.trainable_vars()?.len(), m.named_tensors().len());
    m.freeze_all()?;
    assert!(m.trainable_vars()?.is_empty());
    let _ = Var::from_tensor(&m.norm)?; // a copy; does not make the model trainable
    assert!(m.trainable_vars()?.is_empty());
    Ok(())
}

#[test]
fn bf16_model_runs_the_composed_path_and_stays_close_to_f32() -> Result<()> {
    // bf16 goes through the composed candle ops, as on CUDA: same logits within bf16 precision,
    // and the LoRA gradients flow there too.
    let dir = tempfile::tempdir()?;
    write_tiny_model(dir.path(), LlamaConfig::tiny(), 5)?;
    let f32m = LlamaModel::from_hf_dir(dir.path(), &Device::Cpu, DType::F32)?;
    let mut bf = LlamaModel::from_hf_dir(dir.path(), &Device::Cpu, DType::BF16)?;
    let x = ids(&[3, 14, 15, 9, 26, 5], 1)?;
    let a = f32m.forward(&x)?;
    let b = bf.forward(&x)?.to_dtype(DType::F32)?;
    let err = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = a.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(err < 0.05 * scale, "bf16 logits differ by {err} (scale {scale})");
    bf.add_lora(&Lora { dropout: 0.0, ..Lora::default() })?;
    let labels: Vec<i64> = vec![3, 14, 15, 9, 26, 5];
    let grads = bf.loss(&x, &labels, &Packing::default(), true)?.backward()?;
    for (name, v) in bf.trainable_vars()? {
        assert!(grads.get(v.as_tensor()).is_some(), "{name} has no gradient in bf16");
    }
    Ok(())
}

/// Writes a tiny model, a trained-looking LoRA adapter, input ids and tunebook's logits to
/// `$TUNEBOOK_EXPORT_DIR` for `lib/tests/data/check_peft_interop.py`, which loads them with
/// transformers + PEFT and compares.
#[test]
#[ignore = "interop export: run by lib/tests/data/check_peft_interop.py"]
fn export_tiny_lora_for_peft() -> Result<()> {
    let Some(dir) = std::env::var_os("TUNEBOOK_EXPORT_DIR").map(std::path::PathBuf::from) else {
        eprintln!("SKIPPED: set TUNEBOOK_EXPORT_DIR");
        return Ok(());
    };
    let mut cfg = LlamaConfig::tiny();
    cfg.tie_word_embeddings = true;
    let mut m = write_tiny_model(&dir.join("base"), cfg, 21)?;
    let lcfg = Lora { r: 4, alpha: 8.0, dropout: 0.0, ..Lora::default() }.all_linear();
    m.add_lora(&lcfg)?;
    for layer in &m.layers {
        for (_, lin) in layer.linears() {
            let l = lin.lora.as_ref().unwrap();
            l.b.set(&(crate::model::ops::gradcheck::rand_tensor(l.b.dims(), 17)? * 0.3)?)?;
        }
    }
    m.save_lora(dir.join("adapter"), &lcfg, dir.join("base").to_str().unwrap())?;
    let input: Vec<u32> = vec![1, 7, 19, 33, 2, 60, 41, 5];
    let logits = m.forward(&ids(&input, 1)?)?.squeeze(0)?.to_vec2::<f32>()?;
    m.merge_lora()?;
    m.save_pretrained(dir.join("merged"))?;
    let out = serde_json::json!({"input_ids": input, "logits": logits});
    std::fs::write(dir.join("expected.json"), out.to_string())?;
    Ok(())
}

#[test]
fn continuations_scored_as_one_batch_after_a_shared_context_equal_full_forward_passes() -> Result<()> {
    let m = tiny()?;
    let context = [1u32, 5, 9, 3];
    let conts: Vec<Vec<u32>> = vec![vec![7], vec![60, 2, 11], vec![], vec![4, 4]];
    let got = m.score_continuations(&context, &conts, None)?;
    for (c, s) in conts.iter().zip(&got) {
        // Reference: one uncached forward over context + continuation.
        let mut all = context.to_vec();
        all.extend(c);
        let lp = m.log_probs(&ids(&all, 1)?)?.squeeze(0)?.to_vec2::<f32>()?;
        let logits = m.forward(&ids(&all, 1)?)?.squeeze(0)?.to_vec2::<f32>()?;
        let (mut want, mut hits) = (0f64, 0usize);
        for (j, &t) in c.iter().enumerate() {
            let pos = context.len() + j - 1;
            want += lp[pos][t as usize] as f64;
            let arg = logits[pos].iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
            hits += (arg == t as usize) as usize;
        }
        assert!((s.logprob - want).abs() < 1e-4, "{c:?}: {} vs {want}", s.logprob);
        assert_eq!((s.tokens, s.greedy_hits), (c.len(), hits), "{c:?}");
    }
    assert!(m.score_continuations(&[], &conts, None).is_err());
    assert!(m.score_continuations(&context, &[vec![100_000]], None).unwrap_err().to_string().contains("outside the vocabulary"));
    Ok(())
}
