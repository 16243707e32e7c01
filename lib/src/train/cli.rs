//! `tunebook train` and `tunebook runs`.

use super::{FineTune, Run, Status, TrainConfig};
use crate::display::Render;
use anyhow::{Result, bail};
use std::path::Path;

/// `tunebook train CONFIG.toml [--detach]` or `tunebook train --run-dir DIR`.
/// Returns the process exit code.
pub fn train(config: Option<&Path>, run_dir: Option<&Path>, detach: bool) -> Result<i32> {
    let status = match (config, run_dir) {
        (_, Some(dir)) => super::run_worker(dir)?,
        (Some(cfg_path), None) => {
            let cfg = TrainConfig::from_toml_file(cfg_path)?;
            let data = cfg.train_data.clone();
            let eval = cfg.eval_data.clone();
            let mut ft = FineTune::from_config(cfg).train_data(data);
            if let Some(e) = eval {
                ft = ft.eval_data(e);
            }
            if detach {
                let run = ft.start()?;
                println!("started run {} in {}", run.name(), run.dir().display());
                println!("follow it with `tunebook runs show {}`; stop it with `tunebook runs cancel {}`", run.name(), run.name());
                return Ok(0);
            }
            let run = ft.create()?;
            println!("run {} ({})", run.name(), run.dir().display());
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps · {msg} · ETA {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let result = super::run_in_process(run.dir(), |p| {
                bar.set_length(p.total_steps as u64);
                bar.set_position(p.step as u64);
                bar.set_message(format!("loss {:.4} · lr {:.2e} · {:.0} tok/s", p.loss, p.lr, p.tokens_per_sec));
            });
            bar.finish();
            let summary = result?;
            if let Some(m) = &summary.model_dir {
                println!("model: {}", m.display());
            }
            if let Some(r) = &summary.registered {
                println!("registered: {r}");
            }
            summary.status
        }
        (None, None) => bail!("give a CONFIG.toml, or --run-dir DIR to run or resume a run"),
    };
    Ok(match status {
        Status::Completed => 0,
        Status::Stopped => 3,
        _ => 1,
    })
}

/// `tunebook runs list`.
pub fn list() -> Result<()> {
    println!("{}", super::runs()?.text_plain());
    Ok(())
}

/// `tunebook runs show RUN`: status, progress, checkpoints, recent events.
pub fn show(name: &str) -> Result<()> {
    let run = Run::attach(name)?;
    println!("{}", run.text_plain());
    for (step, dir) in run.checkpoints()? {
        println!("checkpoint step {step}: {}", dir.display());
    }
    for e in run.events().iter().rev().take(10).rev() {
        let t = chrono::DateTime::from_timestamp(e.time as i64, 0).map(|d| d.format("%H:%M:%S").to_string()).unwrap_or_default();
        println!("{t} {:<11} {}", e.kind, e.message);
    }
    Ok(())
}

/// `tunebook runs cancel RUN`.
pub fn cancel(name: &str) -> Result<()> {
    let run = Run::attach(name)?;
    let st = run.cancel()?;
    println!("{}: {st}", run.name());
    Ok(())
}

/// `tunebook runs sync RUN`: ships the run to MLflow and prints what was sent.
pub fn sync(name: &str, tracking_uri: Option<&str>) -> Result<()> {
    let r = super::publish::sync(name, tracking_uri)?;
    println!("{}", r.text_plain());
    Ok(())
}
