//! Fine-tuning runs end to end on a tiny randomly initialised model: in process,
//! through the CLI worker, killed with SIGKILL and resumed, cancelled, stopped by NaN.

mod common;

use anyhow::Result;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tunebook::data::Task;
use tunebook::train::{FineTune, Run, Status, TrainConfig};

use common::{Fixture, fixture};

fn losses(run: &Run) -> Vec<(i64, f64)> {
    run.metric("loss/train/total").unwrap()
}

#[test]
fn lora_fit_learns_and_writes_model_metrics_and_checkpoints() -> Result<()> {
    let f = fixture(60)?;
    let summary = FineTune::new(f.model.display().to_string())
        .name("fit-lora")
        .train_data(f.data.as_path())
        .eval_split(0.2)
        .eval_prompts(["say red 1"])
        .eval_max_new_tokens(8)
        .lora(tunebook::model::Lora::rank(4).alpha(8.0).dropout(0.0))
        .learning_rate(2e-2)
        .context_length(64)
        .batch_size(2)
        .training_duration("4ep")
        .warmup_steps(2)
        .checkpoint_every(5)
        .keep_checkpoints(2)
        .fit()?;
    assert_eq!(summary.status, Status::Completed);
    let run = Run::attach("fit-lora")?;
    assert_eq!(run.status()?, Status::Completed);
    let l = losses(&run);
    assert_eq!(l.len(), summary.steps, "one loss per step in the metric log");
    assert_eq!(l.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=summary.steps as i64).collect::<Vec<_>>());
    let first: f64 = l[..3].iter().map(|x| x.1).sum::<f64>() / 3.0;
    let last: f64 = l[l.len() - 3..].iter().map(|x| x.1).sum::<f64>() / 3.0;
    assert!(last < first * 0.7, "the loss should fall: first {first:.3}, last {last:.3}");
    // Eval metrics, streamed, at the end.
    let ce = run.metric("metrics/eval/LanguageCrossEntropy")?;
    let ppl = run.metric("metrics/eval/LanguagePerplexity")?;
    let acc = run.metric("metrics/eval/TokenAccuracy")?;
    assert_eq!(ce.len(), 1);
    assert!((ppl[0].1 - ce[0].1.exp()).abs() < 1e-9 * ppl[0].1.max(1.0));
    assert!((0.0..=1.0).contains(&acc[0].1));
    let e = summary.eval.unwrap();
    assert!(e.tokens > 0 && e.cross_entropy < 6.56, "eval CE below a uniform guess over 705 ids: {e:?}");
    // Checkpoints: newest two kept, each complete.
    let cks = run.checkpoints()?;
    assert_eq!(cks.len(), 2, "{cks:?}");
    assert_eq!(cks.last().unwrap().0, summary.steps);
    for (_, d) in &cks {
        for f in ["adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "trainer_state.json", "config.toml"] {
            assert!(d.join(f).is_file(), "{} lacks {f}", d.display());
        }
    }
    let st: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(cks.last().unwrap().1.join("trainer_state.json"))?)?;
    assert_eq!(st["state"]["step"], summary.steps);
    assert!(st["data_position"]["steps_per_epoch"].as_u64().unwrap() > 0 && st["scheduler"]["next_lr"].is_number() && st["rng"]["seed"].is_number(), "{st}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.dir().join("data_report.json"))?)?;
    assert!(report["train"]["windows"].as_u64().unwrap() > 0 && report["eval"]["examples"].as_u64().unwrap() == 12, "{report}");
    assert!(std::fs::read_to_string(run.dir().join("loss.svg"))?.contains("<svg"));
    // The model: a PEFT adapter plus tokenizer files.
    let m = summary.model_dir.unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json", "tokenizer.json"] {
        assert!(m.join(f).is_file(), "model dir lacks {f}");
    }
    let gens = std::fs::read_to_string(run.dir().join("eval_generations.jsonl"))?;
    assert!(gens.lines().count() >= 2, "generations at checkpoints and the end: {gens}");
    // The saved adapter loads on its base (merged) and answers as the trained weights did.
    let last: serde_json::Value = serde_json::from_str(gens.lines().last().unwrap())?;
    let loaded = tunebook::model::Model::load(&m.display().to_string())?;
    let g = loaded.chat_with(
        &[tunebook::tokenize::Message::user("say red 1")],
        &tunebook::model::GenerationConfig::greedy(8),
        |_| {},
    )?;
    assert!(!g.ids.is_empty());
    assert_eq!(g.text, last["response"].as_str().unwrap(), "loaded adapter vs the trainer's final weights");
    let df = run.metrics()?;
    assert_eq!(df.get_column_names().iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["step", "key", "value", "timestamp"]);
    Ok(())
}

fn write_config(dir: &Path, f: &Fixture, name: &str, extra: &str) -> Result<PathBuf> {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "model = {:?}\ntrain_data = {:?}\nname = {name:?}\ntraining_duration = \"120ba\"\nlearning_rate = 1e-2\ncontext_length = 48\nbatch_size = 2\ngrad_accum = 2\nwarmup_steps = 5\ncheckpoint_every = 4\nseed = 3\n{extra}\n[lora]\nr = 4\nalpha = 8.0\ndropout = 0.1\n",
            f.model.display().to_string(),
            f.data.display().to_string()
        ),
    )?;
    Ok(p)
}

fn tunebook() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tunebook"))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn resume_after_kill_9_equals_the_uninterrupted_run() -> Result<()> {
    let f = fixture(80)?;
    let cfgs = tempfile::tempdir()?;
    // Uninterrupted, in the foreground through the CLI.
    let a = write_config(cfgs.path(), &f, "whole", "")?;
    let out = tunebook().arg("train").arg(&a).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let whole = losses(&Run::attach("whole")?);
    assert_eq!(whole.len(), 120);

    // The same run in a detached worker, killed with SIGKILL mid-run.
    let b = write_config(cfgs.path(), &f, "killed", "")?;
    let out = tunebook().arg("train").arg(&b).arg("--detach").output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = Run::attach("killed")?;
    wait_for("step 30", Duration::from_secs(120), || run.progress().is_some_and(|p| p.step >= 30));
    let pid = run.status_file()?.pid.expect("a running worker records its pid");
    // SAFETY: kills the worker this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_for("the worker to die", Duration::from_secs(10), || run.status().is_ok_and(|s| s == Status::Failed));
    let at_kill = run.progress().unwrap().step;
    assert!(at_kill < 120, "the run finished before it could be killed");
    let msg = run.status_file()?.message.unwrap();
    assert!(msg.contains("tunebook train --run-dir"), "a dead worker says how to resume: {msg}");

    // Resume in the foreground.
    let out = tunebook().arg("train").arg("--run-dir").arg(run.dir()).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(run.status()?, Status::Completed);
    let resumed = losses(&run);
    assert_eq!(resumed.len(), 120, "every step logged exactly once");
    for ((s1, l1), (s2, l2)) in whole.iter().zip(&resumed) {
        assert_eq!(s1, s2);
        assert!((l1 - l2).abs() <= 1e-6 * l1.abs().max(1.0), "step {s1}: uninterrupted {l1} vs resumed {l2} (killed at {at_kill})");
    }
    let lrs_a = Run::attach("whole")?.metric("lr")?;
    assert_eq!(lrs_a, run.metric("lr")?, "same learning rates");
    assert!(run.events().iter().any(|e| e.kind == "resumed"));
    Ok(())
}

#[test]
fn cancel_checkpoints_then_stops_and_the_run_can_continue() -> Result<()> {
    let f = fixture(40)?;
    let cfgs = tempfile::tempdir()?;
    let c = write_config(cfgs.path(), &f, "cancelled", "checkpoint_every = 0\n".trim_end())?;
    let text = std::fs::read_to_string(&c)?.replace("checkpoint_every = 4\n", "").replace("120ba", "100000ba");
    std::fs::write(&c, text)?;
    let out = tunebook().arg("train").arg(&c).arg("--detach").output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = Run::attach("cancelled")?;
    wait_for("step 5", Duration::from_secs(120), || run.progress().is_some_and(|p| p.step >= 5));
    let out = tunebook().args(["runs", "cancel", "cancelled"]).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(run.status()?, Status::Stopped);
    let step = run.progress().unwrap().step;
    let cks = run.checkpoints()?;
    assert_eq!(
        cks.last().map(|c| c.0),
        Some(step),
        "cancel writes a checkpoint of the last step; checkpoints {:?}, events {:?}",
        cks.iter().map(|c| c.0).collect::<Vec<_>>(),
        run.events().iter().map(|e| format!("{}: {}", e.kind, e.message)).collect::<Vec<_>>()
    );
    assert!(run.events().iter().any(|e| e.kind == "cancelled"));
    let listed = tunebook().args(["runs", "list"]).output()?;
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("cancelled") && listed.contains("STOPPED"), "{listed}");
    Ok(())
}

#[test]
fn nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint() -> Result<()> {
    common::runs_home();
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    let mut model = common::tiny_chat_model(&model_dir, 11)?;
    // Corrupt the embedding of one token that only the last of 30 examples uses:
    // the loss is finite until a batch holds that example.
    let data = dir.path().join("train.jsonl");
    let mut rows = String::new();
    for i in 0..30 {
        let text = if i == 29 { "zzzz qqqq".to_string() } else { format!("say red {i}") };
        rows.push_str(&serde_json::json!({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "red"}]}).to_string());
        rows.push('\n');
    }
    std::fs::write(&data, rows)?;
    let tok = tunebook::tokenize::Tokenizer::load(&model_dir)?;
    let common: HashSet<u32> = (0..29).flat_map(|i| tok.encode(&format!("say red {i} red"), false).unwrap()).collect();
    let rare: Vec<u32> = tok.encode("zzzz qqqq", false)?.into_iter().filter(|t| !common.contains(t)).collect();
    assert!(!rare.is_empty());
    let mut emb = model.embed_tokens.to_vec2::<f32>()?;
    for &t in &rare {
        emb[t as usize].iter_mut().for_each(|x| *x = f32::NAN);
    }
    model.embed_tokens = candle_core::Tensor::new(emb, &candle_core::Device::Cpu)?;
    model.save_pretrained(&model_dir)?;
    let cfg = TrainConfig {
        model: model_dir.display().to_string(),
        name: "nan".into(),
        train_data: data.display().to_string(),
        task: Task::Chat,
        training_duration: "1ep".into(),
        learning_rate: Some(1e-3),
        context_length: Some(96),
        batch_size: 1,
        packing: false,
        checkpoint_every: 2,
        keep_checkpoints: 100,
        lora: Some(Default::default()),
        ..TrainConfig::default()
    };
    let err = FineTune::from_config(cfg.clone()).train_data(cfg.train_data.clone()).fit().unwrap_err().to_string();
    assert!(err.contains("NaN") && err.contains("learning rate"), "{err}");
    let run = Run::attach("nan")?;
    assert_eq!(run.status()?, Status::Failed);
    let bad_step = run.metric("loss/train/total")?.into_iter().find(|(_, v)| v.is_nan()).map(|(s, _)| s as usize).unwrap();
    let cks = run.checkpoints()?;
    assert!(bad_step > 2, "with seed 42 the corrupt example comes late (step {bad_step}), after checkpoints");
    let last = cks.last().expect("checkpoints before the NaN are kept").0;
    assert!(last < bad_step && last + 2 >= bad_step, "last good checkpoint {last}, NaN at {bad_step}");
    assert!(err.contains(&format!("step-{last:08}")), "{err}");
    assert!(cks.iter().all(|(s, _)| *s < bad_step), "no checkpoint after the NaN");
    Ok(())
}

#[test]
fn invalid_config_and_data_are_clear_errors() -> Result<()> {
    let f = fixture(10)?;
    let dir = tempfile::tempdir()?;
    // Bad data: a conversation that ends with the user.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"hello\"}]}\n{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}\n",
    )?;
    let e = FineTune::new(f.model.display().to_string()).train_data(bad.as_path()).create().unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("train_data") && e.contains("row"), "{e}");
    // Bad duration and unknown config key, through the CLI.
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, format!("model = {:?}\ntrain_data = {:?}\ntraining_duration = \"3 epochs\"\n", f.model, f.data))?;
    let out = tunebook().arg("train").arg(&cfg).output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("training_duration") && err.contains("\"2ep\""), "{err}");
    std::fs::write(&cfg, format!("model = {:?}\ntrain_data = {:?}\nlearning_rat = 1e-4\n", f.model, f.data))?;
    let out = tunebook().arg("train").arg(&cfg).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("learning_rat"), "{err}");
    // A context length beyond the model's.
    let e = FineTune::new(f.model.display().to_string()).train_data(f.data.as_path()).context_length(100_000).name("too-long").fit().unwrap_err();
    assert!(format!("{e:#}").contains("exceeds the model's maximum"), "{e:#}");
    // A missing data file names the path.
    let e = FineTune::new(f.model.display().to_string()).train_data("/nonexistent/data.jsonl").create().unwrap_err();
    assert!(format!("{e:#}").contains("/nonexistent/data.jsonl"), "{e:#}");
    Ok(())
}

#[test]
fn full_finetune_continues_from_custom_weights() -> Result<()> {
    let f = fixture(20)?;
    let first = FineTune::new(f.model.display().to_string())
        .name("full-1")
        .train_data(f.data.as_path())
        .learning_rate(1e-3)
        .context_length(48)
        .training_duration("6ba")
        .fit()?;
    let model_dir = first.model_dir.unwrap();
    assert!(model_dir.join("model.safetensors").is_file() && model_dir.join("config.json").is_file());
    let l1 = first.losses.last().unwrap().1;
    // A second run starting from the first's weights starts near where it ended.
    let second = FineTune::new(f.model.display().to_string())
        .name("full-2")
        .train_data(f.data.as_path())
        .learning_rate(1e-3)
        .context_length(48)
        .training_duration("1ba")
        .custom_weights_path(&model_dir)
        .fit()?;
    let l2 = second.losses[0].1;
    let base = first.losses[0].1;
    assert!((l2 - l1).abs() < (base - l1).abs(), "continued loss {l2} should be near the first run's end {l1}, not its start {base}");
    Ok(())
}

#[test]
fn a_worker_that_dies_before_training_reads_as_failed_with_its_log() -> Result<()> {
    let f = fixture(10)?;
    let run = FineTune::new(f.model.display().to_string()).name("dies-early").train_data(f.data.as_path()).create()?;
    std::fs::write(run.dir().join("config.toml"), "this is = not [valid toml")?;
    tunebook::train::spawn_worker(run.dir())?;
    wait_for("the worker to fail", Duration::from_secs(30), || run.status().is_ok_and(|s| s == Status::Failed));
    let msg = run.status_file()?.message.unwrap();
    assert!(msg.contains("worker.log") && msg.contains("config"), "{msg}");
    let err = run.wait().unwrap_err().to_string();
    assert!(err.contains("dies-early"), "{err}");
    Ok(())
}

#[test]
fn bf16_runs_compute_in_bf16_keep_f32_masters_and_learn() -> Result<()> {
    let f = fixture(40)?;
    for (name, lora) in [("bf16-lora", true), ("bf16-full", false)] {
        let mut ft = FineTune::new(f.model.display().to_string())
            .name(name)
            .train_data(f.data.as_path())
            .eval_split(0.2)
            .eval_prompts(["say red 1"])
            .eval_max_new_tokens(4)
            .precision(tunebook::train::Precision::Bf16)
            .device("cpu")
            .learning_rate(if lora { 2e-2 } else { 2e-3 })
            .context_length(64)
            .batch_size(2)
            .training_duration("3ep");
        if lora {
            ft = ft.lora(tunebook::model::Lora::rank(4).alpha(8.0).dropout(0.0));
        }
        // The model computes in bf16 (its weights are bf16), whatever the optimizer holds.
        let probe = tempfile::tempdir()?;
        let mut cfg = ft.config().clone();
        cfg.train_data = f.data.display().to_string();
        let t = tunebook::train::Trainer::new(cfg, probe.path(), Box::new(tunebook::track::LocalTracker))?;
        assert_eq!(t.model().embed_tokens.dtype(), candle_core::DType::BF16, "{name}");
        assert_eq!(t.model().layers[0].self_attn.q_proj.weight.dtype(), candle_core::DType::BF16, "{name}");
        drop(t);
        let summary = ft.fit()?;
        let l = &summary.losses;
        let (first, last) = (l[0].1, l[l.len() - 1].1);
        assert!(last < first * 0.8, "{name}: the loss should fall in bf16: {first} -> {last}");
        assert!(summary.eval.is_some_and(|e| e.cross_entropy.is_finite()));
        let run = Run::attach(name)?;
        assert!(run.events().iter().any(|e| e.kind == "precision"));
        // What is saved is the f32 master weights, not their bf16 casts.
        let dir = summary.model_dir.unwrap();
        let file = if lora { "adapter_model.safetensors" } else { "model.safetensors" };
        let tensors = candle_core::safetensors::load(dir.join(file), &candle_core::Device::Cpu)?;
        assert!(tensors.values().all(|t| t.dtype() == candle_core::DType::F32), "{name}: {file} holds f32 tensors");
        if !lora {
            // Masters carry updates smaller than bf16 can represent: some value is not a bf16 number.
            let w = tensors.values().find(|t| t.rank() == 2).unwrap().flatten_all()?.to_vec1::<f32>()?;
            assert!(w.iter().any(|&x| half::bf16::from_f32(x).to_f32() != x), "{name}: weights look like bf16 casts");
        }
    }
    Ok(())
}
