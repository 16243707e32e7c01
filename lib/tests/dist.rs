//! Data-parallel training with real MPI: `mpirun -n 2 tunebook train` against one
//! process with the same global batch (`grad_accum = 2`), a rank killed mid-run, and
//! resuming with 2 ranks and with 1.
//!
//! Needs `mpirun` (MPICH or Open MPI, installed by scripts/setup.sh). Without it the
//! tests say SKIPPED, unless `TUNEBOOK_REQUIRE_MPI=1` (CI), where that fails them.

mod common;

use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use common::{Fixture, fixture};
use tunebook::train::{Run, Status};

fn runs_dir() -> PathBuf {
    common::runs_home().join("runs")
}

/// `mpirun`, or `None` after saying why the test is skipped.
fn mpirun(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("mpirun")).find(|p| p.is_file()));
    if found.is_none() {
        if std::env::var("TUNEBOOK_REQUIRE_MPI").is_ok_and(|v| v == "1") {
            panic!("{test}: mpirun is not installed and TUNEBOOK_REQUIRE_MPI=1 (scripts/setup.sh installs MPICH)");
        }
        eprintln!("SKIPPED {test}: mpirun is not installed (scripts/setup.sh installs MPICH)");
    }
    found
}

/// A config for run `name`: 2 windows per micro-batch, 2 micro-batches per step (the
/// global batch), with LoRA (dropout on, so every micro-batch's mask matters) or
/// full fine-tuning.
fn config(f: &Fixture, name: &str, steps: usize, lora: bool) -> Result<PathBuf> {
    let p = f.dir.path().join(format!("{name}.toml"));
    let mut text = format!(
        "model = {:?}\ntrain_data = {:?}\nname = {name:?}\ntraining_duration = \"{steps}ba\"\nlearning_rate = 1e-2\ncontext_length = 48\n\
         batch_size = 2\ngrad_accum = 2\nwarmup_steps = 3\ncheckpoint_every = 10\nmax_grad_norm = 1.0\nseed = 3\n",
        f.model.display().to_string(),
        f.data.display().to_string()
    );
    if lora {
        text.push_str("[lora]\nr = 4\nalpha = 8.0\ndropout = 0.1\n");
    }
    std::fs::write(&p, text)?;
    Ok(p)
}

fn tunebook_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tunebook")
}

/// `mpirun -n N tunebook ARGS`, one thread per rank.
fn mpi_command(mpirun: &Path, n: usize, args: &[&std::ffi::OsStr]) -> Command {
    let mut c = Command::new(mpirun);
    c.arg("-n").arg(n.to_string()).arg(tunebook_bin()).args(args).env("RAYON_NUM_THREADS", "1");
    c
}

fn succeeded(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn metric(name: &str, key: &str) -> Vec<(i64, f64)> {
    Run::attach(name).unwrap().metric(key).unwrap()
}

fn assert_close(what: &str, a: &[(i64, f64)], b: &[(i64, f64)], rel: f64) {
    assert_eq!(a.len(), b.len(), "{what}: {} steps against {}", a.len(), b.len());
    for ((s1, x), (s2, y)) in a.iter().zip(b) {
        assert_eq!(s1, s2, "{what}");
        assert!((x - y).abs() <= rel * x.abs().max(1e-12), "{what} at step {s1}: {x} against {y}");
    }
}

/// The run directories under `$TUNEBOOK_RUNS` whose name starts with `prefix`.
fn run_dirs(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(runs_dir())
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(prefix)).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn same_run_as_one_process(lora: bool) -> Result<()> {
    let test = if lora { "mpi_lora" } else { "mpi_full" };
    let Some(mpirun) = mpirun(test) else { return Ok(()) };
    let f = fixture(48)?;
    let one = format!("{test}-one");
    let two = format!("{test}-two");
    succeeded("one process", &Command::new(tunebook_bin()).arg("train").arg(config(&f, &one, 24, lora)?).env("RAYON_NUM_THREADS", "2").output()?);
    let out = mpi_command(&mpirun, 2, &["train".as_ref(), config(&f, &two, 24, lora)?.as_os_str()]).output()?;
    succeeded("mpirun -n 2", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().filter(|l| l.starts_with("run ")).count(), 1, "one rank announces the run: {stdout}");
    assert!(stdout.contains("2 ranks (mpirun (MPICH)): rank 0 (pid") || stdout.contains("2 ranks (mpirun (Open MPI)): rank 0 (pid"), "{stdout}");
    assert_eq!(run_dirs(&two), vec![two.clone()], "the two ranks write one run directory");
    for key in ["loss/train/total", "grad_norm"] {
        assert_close(key, &metric(&one, key), &metric(&two, key), 1e-5);
    }
    assert_eq!(metric(&one, "lr"), metric(&two, "lr"), "the same schedule");
    let run = Run::attach(&two)?;
    assert_eq!(run.status()?, Status::Completed);
    assert!(run.events().iter().any(|e| e.message.starts_with("2 ranks (mpirun")), "the run records its ranks");
    assert_eq!(run.checkpoints()?.iter().map(|c| c.0).collect::<Vec<_>>(), vec![20, 24], "the two newest, as configured");
    // The trained weights agree too.
    let file = if lora { "adapter_model.safetensors" } else { "model.safetensors" };
    let a = candle_core::safetensors::load(Run::attach(&one)?.dir().join("model").join(file), &candle_core::Device::Cpu)?;
    let b = candle_core::safetensors::load(run.dir().join("model").join(file), &candle_core::Device::Cpu)?;
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let d = (t - &b[name])?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let m = t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(d <= 1e-5 * m.max(1e-6), "{name}: max difference {d} (max {m})");
    }
    Ok(())
}

#[test]
fn two_mpi_ranks_train_a_lora_run_like_one_process_with_the_same_global_batch() -> Result<()> {
    same_run_as_one_process(true)
}

#[test]
fn two_mpi_ranks_fully_fine_tune_like_one_process_with_the_same_global_batch() -> Result<()> {
    same_run_as_one_process(false)
}

#[test]
fn fewer_micro_batches_than_ranks_is_a_clear_error_on_every_rank() -> Result<()> {
    let Some(mpirun) = mpirun("mpi_grad_accum") else { return Ok(()) };
    let f = fixture(16)?;
    let p = config(&f, "mpi-too-few", 4, true)?;
    std::fs::write(&p, std::fs::read_to_string(&p)?.replace("grad_accum = 2", "grad_accum = 1"))?;
    let out = mpi_command(&mpirun, 2, &["train".as_ref(), p.as_os_str()]).output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("grad_accum = 1") && err.contains("2 ranks"), "{err}");
    Ok(())
}

/// Sends `signal` to rank 1 of a 2-rank run after its first checkpoint; returns the
/// run, rank 1's pid, how long the job took to exit after the signal, and its output.
fn signal_rank_1(f: &Fixture, mpirun: &Path, name: &str, signal: i32, timeout: &str) -> Result<(Run, i32, Duration, String)> {
    let cfg = config(f, name, 40, true)?;
    let mut cmd = Command::new(mpirun);
    cmd.arg("-n").arg("2").arg(tunebook_bin()).arg("train").arg(&cfg).env("RAYON_NUM_THREADS", "1");
    let child = cmd
        .env("TUNEBOOK_COLLECTIVE_TIMEOUT", timeout)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let start = Instant::now();
    let run = loop {
        if let Ok(r) = Run::attach(name) {
            if r.progress().is_some_and(|p| p.step >= 12) {
                break r;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(180), "the 2-rank run did not reach step 12");
        std::thread::sleep(Duration::from_millis(2));
    };
    let line = run.events().into_iter().find(|e| e.message.starts_with("2 ranks")).expect("the ranks event").message;
    let pid: i32 = line.split("rank 1 (pid ").nth(1).and_then(|s| s.split(' ').next()).and_then(|s| s.parse().ok()).expect("rank 1's pid");
    // SAFETY: signals a rank this test started.
    unsafe { libc::kill(pid, signal) };
    let killed = Instant::now();
    let out = child.wait_with_output()?;
    let took = killed.elapsed();
    assert!(!out.status.success(), "the job must fail when a rank dies");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((run, pid, took, text))
}

#[test]
fn a_killed_or_stopped_rank_ends_the_job_naming_it_and_the_run_resumes_with_two_ranks_or_one() -> Result<()> {
    let Some(mpirun) = mpirun("mpi_kill") else { return Ok(()) };
    let f = fixture(48)?;
    succeeded("one process", &Command::new(tunebook_bin()).arg("train").arg(config(&f, "mpi-kill-whole", 40, true)?).output()?);
    let whole = metric("mpi-kill-whole", "loss/train/total");

    // As launched by default, MPICH stops the job as soon as a rank dies and reports its
    // process id, which rank 0's first line maps to rank 1.
    let (run, pid, took, text) = signal_rank_1(&f, &mpirun, "mpi-kill-resume2", libc::SIGKILL, "600")?;
    assert!(took < Duration::from_secs(30), "the job took {took:?} to exit after rank 1 died");
    assert!(text.contains(&format!("rank 1 (pid {pid} on ")) && text.contains(&format!("PID {pid} ")), "the output names rank 1:\n{text}");
    assert_eq!(run.status()?, Status::Failed, "a killed run reads as failed");
    let resume: Vec<&std::ffi::OsStr> = vec!["train".as_ref(), "--run-dir".as_ref(), run.dir().as_os_str()];
    succeeded("the resume with 2 ranks", &mpi_command(&mpirun, 2, &resume).output()?);
    assert_eq!(run.status()?, Status::Completed);
    assert_close("resumed with 2 ranks against the uninterrupted run", &whole, &metric("mpi-kill-resume2", "loss/train/total"), 1e-5);

    // A rank that stops without exiting is invisible to the launcher: rank 0's
    // collective times out and rank 0 names the stopped rank, then the launcher ends
    // the job.
    let (run, pid, took, text) = signal_rank_1(&f, &mpirun, "mpi-kill-resume1", libc::SIGSTOP, "4")?;
    assert!(took < Duration::from_secs(4 + 15), "the job took {took:?} to exit after rank 1 stopped");
    assert!(
        text.contains("rank 0: the ") && text.contains("did not complete in 4 s") && text.contains(&format!("rank 1 (pid {pid} on ")) && text.contains("is stopped"),
        "rank 0 names rank 1:\n{text}"
    );
    let resume: Vec<&std::ffi::OsStr> = vec!["train".as_ref(), "--run-dir".as_ref(), run.dir().as_os_str()];
    succeeded("the resume in one process", &Command::new(tunebook_bin()).args(&resume).output()?);
    assert_eq!(run.status()?, Status::Completed);
    assert_close("resumed in one process against the uninterrupted run", &whole, &metric("mpi-kill-resume1", "loss/train/total"), 1e-5);
    Ok(())
}

#[test]
fn sharded_optimizer_state_zero_1_trains_exactly_like_plain_data_parallelism() -> Result<()> {
    let Some(mpirun) = mpirun("mpi_zero1") else { return Ok(()) };
    let f = fixture(48)?;
    let plain = config(&f, "mpi-zero0", 12, false)?;
    let sharded = config(&f, "mpi-zero1", 12, false)?;
    std::fs::write(&sharded, std::fs::read_to_string(&sharded)?.replace("grad_accum = 2\n", "grad_accum = 2\nzero_stage = 1\n"))?;
    for cfg in [&plain, &sharded] {
        succeeded("mpirun -n 2", &mpi_command(&mpirun, 2, &["train".as_ref(), cfg.as_os_str()]).output()?);
    }
    assert_eq!(metric("mpi-zero0", "loss/train/total"), metric("mpi-zero1", "loss/train/total"), "bit for bit");
    let run = Run::attach("mpi-zero1")?;
    let shard_events: Vec<String> = run.events().into_iter().map(|e| e.message).filter(|m| m.contains("ZeRO-1")).collect();
    assert_eq!(shard_events.len(), 1, "rank 0 reports its share: {shard_events:?}");
    // Rank 0 keeps about half of the moments: "... keeps the moments of M of N values (X MB)".
    let nums: Vec<f64> = shard_events[0].split_whitespace().filter_map(|w| w.trim_start_matches('(').parse().ok()).collect();
    let (mine, all) = (nums[nums.len() - 3], nums[nums.len() - 2]);
    assert!(mine > 0.3 * all && mine < 0.7 * all, "{}", shard_events[0]);
    // The checkpoints hold the whole optimizer state, as without sharding, so they resume
    // with any number of ranks.
    let (zero0, zero1) = (Run::attach("mpi-zero0")?.checkpoints()?, run.checkpoints()?);
    assert_eq!(zero0.iter().map(|c| c.0).collect::<Vec<_>>(), vec![10, 12]);
    for ((step, a), (_, b)) in zero0.iter().zip(&zero1) {
        let (a, b) = (std::fs::read(a.join("optimizer.safetensors"))?, std::fs::read(b.join("optimizer.safetensors"))?);
        assert!(a == b, "step {step}: the sharded run's optimizer state differs from the unsharded one's");
    }
    Ok(())
}

#[test]
fn two_mpi_ranks_train_a_smollm2_lora_run_like_one_process() -> Result<()> {
    let Some(mpirun) = mpirun("mpi_smollm2") else { return Ok(()) };
    let Some(gguf) = common::gguf_or_skip("mpi_smollm2") else { return Ok(()) };
    let f = fixture(16)?;
    let write = |name: &str| -> Result<PathBuf> {
        let p = f.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "model = {:?}\ntrain_data = {:?}\nname = {name:?}\ntraining_duration = \"4ba\"\nlearning_rate = 1e-3\ncontext_length = 96\n\
                 batch_size = 1\ngrad_accum = 2\nwarmup_steps = 1\nseed = 5\n[lora]\nr = 4\nalpha = 8.0\ndropout = 0.05\n",
                gguf.display().to_string(),
                f.data.display().to_string()
            ),
        )?;
        Ok(p)
    };
    succeeded("one process", &Command::new(tunebook_bin()).arg("train").arg(write("mpi-smol-one")?).env("RAYON_NUM_THREADS", "2").output()?);
    succeeded("mpirun -n 2", &mpi_command(&mpirun, 2, &["train".as_ref(), write("mpi-smol-two")?.as_os_str()]).output()?);
    for key in ["loss/train/total", "grad_norm"] {
        assert_close(key, &metric("mpi-smol-one", key), &metric("mpi-smol-two", key), 1e-5);
    }
    assert_eq!(run_dirs("mpi-smol-two"), vec!["mpi-smol-two".to_string()]);
    Ok(())
}
