//! `tunebook train` and `tunebook runs`.

use super::{FineTune, Run, Status, TrainConfig};
use crate::display::Render;
use anyhow::{Result, bail};
use crate::dist::Dist;
use std::sync::Arc;
use std::path::Path;

/// `tunebook train CONFIG.toml [--detach]` or `tunebook train --run-dir DIR`.
/// Started by a launcher (`mpirun -n N`, `srun`), the N processes train one run
/// together: rank 0 creates it and tells the others where it is.
/// Returns the process exit code.
pub fn train(config: Option<&Path>, run_dir: Option<&Path>, detach: bool) -> Result<i32> {
    let dist = Arc::new(Dist::from_env()?);
    let leader = dist.is_leader();
    let status = match (config, run_dir) {
        (_, Some(dir)) => {
            announce(&dist);
            super::run_worker(dir, dist.clone())?
        }
        (Some(cfg_path), None) => {
            if detach && dist.world() > 1 {
                bail!("--detach starts one background worker; under {} the launcher owns the {} processes: run without --detach", dist.launch().launcher, dist.world());
            }
            let mut dir = Vec::new();
            let mut failed = None;
            if leader {
                let created = (|| {
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
                        return Ok(None);
                    }
                    ft.create().map(Some)
                })();
                match created {
                    Ok(None) => return Ok(0),
                    Ok(Some(r)) => {
                        println!("run {} ({})", r.name(), r.dir().display());
                        announce(&dist);
                        dir = r.dir().to_string_lossy().into_owned().into_bytes();
                    }
                    Err(e) => failed = Some(e),
                }
            }
            // An empty path tells the other ranks that rank 0 could not create the run
            // (it reports why); they stop instead of waiting.
            dist.broadcast(&mut dir, "sending the run directory from rank 0")?;
            if let Some(e) = failed {
                return Err(e);
            }
            if dir.is_empty() {
                bail!("rank 0 did not create the run (see its error)");
            }
            let dir = std::path::PathBuf::from(String::from_utf8_lossy(&dir).into_owned());
            let bar = indicatif::ProgressBar::new(0);
            if leader {
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps · {msg} · ETA {eta}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
            } else {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            let result = super::run_in_process_on(&dir, dist.clone(), |p| {
                bar.set_length(p.total_steps as u64);
                bar.set_position(p.step as u64);
                bar.set_message(format!("loss {:.4} · lr {:.2e} · {:.0} tok/s", p.loss, p.lr, p.tokens_per_sec));
            });
            bar.finish();
            let summary = result?;
            if leader {
                if let Some(m) = &summary.model_dir {
                    println!("model: {}", m.display());
                }
                if let Some(r) = &summary.registered {
                    println!("registered: {r}");
                }
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

/// Rank 0 names every rank with its process id and host, so that a launcher's report
/// of a dead process id reads as a rank.
fn announce(dist: &Dist) {
    if dist.world() > 1 && dist.is_leader() {
        let peers: Vec<String> = dist.peers().iter().map(|p| p.to_string()).collect();
        println!("{} ranks ({}): {}; rank 0 writes the run", dist.world(), dist.launch().launcher, peers.join(", "));
    }
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
