//! The training loop: data → packed windows → micro-batches → AdamW, with
//! evaluation, eval-prompt generations, checkpoints and exact resume.
//!
//! Determinism: the order of windows in epoch `e` is a permutation seeded by
//! `(seed, e)`, and the dropout generator is re-seeded from `(seed, step,
//! micro-batch)` before every micro-batch, so the batches, learning rates and (on
//! the CPU) losses of a resumed run equal those of an uninterrupted one. A
//! checkpoint therefore only needs the weights, the optimizer moments and the step.
//!
//! Data parallelism ([`Dist`]): `batch_size × grad_accum` is the global batch of a
//! step whatever the number of ranks. Rank `r` of `N` runs the step's micro-batches
//! `r, r+N, …`; the gradients (each micro-batch weighted by its share of the step's
//! target tokens, as in one process) and the loss are summed across ranks before
//! clipping and the optimizer step, which every rank then takes identically. So N
//! ranks follow the same data order, schedule and (up to summation order) losses as
//! one process, and a checkpoint resumes with any number of ranks. Rank 0 alone
//! writes the run directory; the others keep their logs in a scratch directory.

use super::config::{Duration, Precision, TrainConfig};
use super::optim::{AdamW, AdamWConfig, learning_rate};
use crate::files::{IfExists, StagedDir};
use crate::runs::{EventKind, EventLog, Progress, RunFiles, Status};
use crate::data::{Dataset, PackOptions, PrepareOptions, Window};
use crate::dist::Dist;
use crate::model::{GenerationConfig, LlamaModel, Lora, Model, Packing, ops, resolve_model};
use crate::tokenize::{Message, Tokenizer};
use crate::track::{MetricRecord, MetricWal, RunContext, RunOutcome, Tracker, metric_names};
use anyhow::{Context, Result, anyhow, bail};
use candle_core::{DType, Device, Tensor};
use crate::model::ops::profile;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// What a checkpoint records besides weights and optimizer moments.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Steps the run takes in all.
    pub total_steps: usize,
    /// Window tokens processed.
    pub tokens_seen: u64,
    /// The last training loss.
    pub loss: f64,
    /// The run's configuration digest (a resume refuses a different configuration).
    pub config_digest: String,
}

/// `trainer_state.json` of a checkpoint: the trainer state plus what follows from
/// it (data position, learning-rate schedule, dropout seed), written out so a
/// reader need not recompute them. Writer and reader share this type.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CheckpointState {
    /// Steps, tokens, last loss and the configuration digest.
    pub state: TrainerState,
    /// Where in the data the next step starts.
    pub data_position: DataPosition,
    /// The learning-rate schedule at the next step.
    pub scheduler: SchedulerState,
    /// The generators' seeds.
    pub rng: RngState,
}

/// Where in the data a checkpoint's next step starts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DataPosition {
    /// The epoch of the next step.
    pub epoch: usize,
    /// The next step's index within its epoch.
    pub step_in_epoch: usize,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: usize,
}

/// The learning-rate schedule at a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SchedulerState {
    /// The schedule.
    pub schedule: super::config::Schedule,
    /// The learning rate of the next step.
    pub next_lr: f64,
    /// Warm-up steps.
    pub warmup_steps: usize,
    /// Steps in all.
    pub total_steps: usize,
}

/// The generators' seeds at a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RngState {
    /// The run's seed.
    pub seed: u64,
    /// The dropout generator's seed for the next step.
    pub next_dropout_seed: u64,
}

impl CheckpointState {
    /// The file name inside a checkpoint directory.
    pub const FILE: &'static str = "trainer_state.json";

    /// Reads `trainer_state.json` of the checkpoint in `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        read_json(&dir.join(Self::FILE))
    }

    /// Writes it into the checkpoint directory `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        crate::files::write_atomic(&dir.join(Self::FILE), serde_json::to_string_pretty(self)?.as_bytes())
    }
}

/// The outcome of [`Trainer::run`].
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSummary {
    /// Steps completed.
    pub steps: usize,
    /// Training loss per step (index 0 is step 1), from the start of this process.
    pub losses: Vec<(usize, f64)>,
    /// The last evaluation, if any: cross-entropy, perplexity, token accuracy.
    pub eval: Option<EvalMetrics>,
    /// Where the final model was written.
    pub model_dir: Option<PathBuf>,
    /// The registered model version (`name/version`), when registered.
    pub registered: Option<String>,
    /// Why it stopped.
    pub status: Status,
}

/// Streaming evaluation metrics (never more than one window's logits in memory).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalMetrics {
    /// Mean next-token cross-entropy over target tokens.
    pub cross_entropy: f64,
    /// `exp(cross_entropy)`.
    pub perplexity: f64,
    /// Share of target tokens whose arg-max prediction is right.
    pub token_accuracy: f64,
    /// Target tokens scored.
    pub tokens: usize,
}

static CANCEL: AtomicBool = AtomicBool::new(false);

/// Asks a trainer running in this process to checkpoint and stop after the
/// current step (the worker's SIGTERM handler calls this).
pub fn request_cancel() {
    CANCEL.store(true, Ordering::SeqCst);
}

/// A fine-tuning run in progress, in this process.
pub struct Trainer {
    cfg: TrainConfig,
    files: RunFiles,
    model: LlamaModel,
    lora: Option<Lora>,
    tokenizer: Tokenizer,
    base_name: String,
    opt: AdamW,
    train: Vec<Window>,
    eval: Vec<Window>,
    steps_per_epoch: usize,
    total_steps: usize,
    warmup: usize,
    context_length: usize,
    state: TrainerState,
    wal: MetricWal,
    events: EventLog,
    tracker: Box<dyn Tracker>,
    device: Device,
    /// bf16 full fine-tuning: the f32 master weights the optimizer updates; the model
    /// computes with bf16 casts of them, refreshed before every step.
    masters: Option<Vec<(String, candle_core::Var)>>,
    /// The ranks training this run together (one process by default).
    dist: Arc<Dist>,
    /// Under ZeRO-1, the rank that owns each optimizer parameter.
    owners: Option<Vec<usize>>,
    /// Where a rank other than 0 keeps its own logs; removed at the end.
    _scratch: Option<tempfile::TempDir>,
}

/// The compute device a configuration asks for.
pub fn select_device(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "auto" => crate::model::default_device(),
        "cuda" => Device::new_cuda(0).context("device cuda: no CUDA device (or this build lacks --features cuda)")?,
        d => {
            let n: usize = d.strip_prefix("cuda:").and_then(|n| n.parse().ok()).ok_or_else(|| anyhow!("unknown device {d:?}"))?;
            Device::new_cuda(n).with_context(|| format!("device {d}: not available"))?
        }
    })
}

/// Opens a data source for a task (`Dataset::open` plus the task).
pub(crate) fn open_data(source: &str, cfg: &TrainConfig, what: &str) -> Result<Dataset> {
    let ds = Dataset::open(source).with_context(|| format!("{what} {source:?}"))?;
    Ok(ds.task(cfg.task))
}

/// The run's data sets, opened and checked, before tokenization.
struct TrainData {
    train: Dataset,
    eval: Option<Dataset>,
}

impl TrainData {
    /// Opens `train_data` (and `eval_data`, or the `eval_split` of the training
    /// data) and checks every row; an invalid row is an error naming it.
    fn open(cfg: &TrainConfig) -> Result<Self> {
        let train = open_data(&cfg.train_data, cfg, "train_data")?;
        train.validate_strict().with_context(|| format!("train_data {:?} has invalid rows; fix them or filter them out", cfg.train_data))?;
        Ok(match (&cfg.eval_data, cfg.eval_split) {
            (Some(e), _) => {
                let ds = open_data(e, cfg, "eval_data")?;
                ds.validate_strict().with_context(|| format!("eval_data {e:?} has invalid rows"))?;
                TrainData { train, eval: Some(ds) }
            }
            (None, s) if s > 0.0 => {
                let (train, eval) = train.split(s, cfg.seed);
                TrainData { train, eval: Some(eval) }
            }
            _ => TrainData { train, eval: None },
        })
    }

    /// Tokenizes and packs both sets into windows of `context_length` tokens
    /// (training windows shuffled, those without a target dropped) and writes
    /// `data_report.json`.
    fn pack(&self, cfg: &TrainConfig, tokenizer: &Tokenizer, context_length: usize, files: &RunFiles) -> Result<(Vec<Window>, Vec<Window>)> {
        let popts = PrepareOptions::default().chat_loss(cfg.chat_loss);
        let mut report = serde_json::Map::new();
        let mut pack = |ds: &Dataset, shuffle: bool, what: &str| -> Result<Vec<Window>> {
            let t = ds.tokenize(tokenizer, &popts)?;
            let mut o = PackOptions::new(context_length).packing(cfg.packing);
            if shuffle {
                o = o.shuffle(cfg.seed);
            }
            let p = t.pack(&o);
            report.insert(
                what.to_string(),
                serde_json::json!({
                    "source": ds.source(), "rows": ds.len(), "examples": p.examples, "truncated": p.truncated,
                    "dropped": p.dropped, "windows": p.windows.len(), "context_length": context_length,
                    "real_tokens": p.real_tokens, "trainable_tokens": p.trainable_tokens,
                    "packing_efficiency": p.efficiency(), "template_problems": t.problems.len(),
                }),
            );
            Ok(p.windows)
        };
        let train: Vec<Window> = pack(&self.train, true, "train")?.into_iter().filter(|w| w.labels().iter().any(|&l| l >= 0)).collect();
        if train.is_empty() {
            bail!("train_data {:?} gives no token to learn from (every example is empty or has no target tokens)", cfg.train_data);
        }
        let eval = match &self.eval {
            Some(ds) => {
                let mut w = pack(ds, false, "eval")?;
                if cfg.eval_max_windows > 0 {
                    w.truncate(cfg.eval_max_windows);
                }
                w
            }
            None => vec![],
        };
        crate::files::write_atomic(
            &files.dir().join("data_report.json"),
            serde_json::to_string_pretty(&serde_json::Value::Object(report))?.as_bytes(),
        )?;
        Ok((train, eval))
    }
}

/// The newest checkpoint of a run, read through its typed state.
struct ResumePoint {
    dir: PathBuf,
    state: TrainerState,
}

impl ResumePoint {
    /// The newest checkpoint, if any; an error when it was written with a
    /// different configuration.
    fn find(files: &RunFiles, cfg: &TrainConfig) -> Result<Option<Self>> {
        let Some(dir) = files.latest_checkpoint()? else { return Ok(None) };
        let state = CheckpointState::read(&dir)?.state;
        if state.config_digest != config_digest(cfg) {
            bail!("{} was written with a different configuration; start a new run (or restore the run's config.toml)", dir.display());
        }
        Ok(Some(ResumePoint { dir, state }))
    }
}

/// Makes the trainable parameters: LoRA adapters (new, or a checkpoint's), or
/// every weight (the base model's, or a checkpoint's) for full fine-tuning.
fn attach_trainables(mut llama: LlamaModel, lora: Option<&Lora>, resume: Option<&ResumePoint>, device: &Device) -> Result<LlamaModel> {
    match (lora, resume) {
        (Some(_), Some(r)) => {
            llama.load_lora(&r.dir).with_context(|| format!("loading the adapters of {}", r.dir.display()))?;
        }
        (Some(l), None) => {
            if !llama.has_lora() {
                llama.add_lora(l)?;
            }
        }
        (None, Some(r)) => {
            llama = LlamaModel::from_hf_dir(&r.dir, device, DType::F32).with_context(|| format!("loading the weights of {}", r.dir.display()))?;
            llama.unfreeze_all()?;
        }
        (None, None) => llama.unfreeze_all()?,
    }
    Ok(llama)
}

/// AdamW over the trainable parameters (their f32 masters under bf16 full
/// fine-tuning, returned as the third value), with a checkpoint's moments when
/// resuming. Under bf16 LoRA the frozen base weights become bf16.
#[allow(clippy::type_complexity)]
fn build_optimizer(
    mut llama: LlamaModel,
    cfg: &TrainConfig,
    lora: bool,
    resume: Option<&ResumePoint>,
    device: &Device,
    dist: &Dist,
) -> Result<(LlamaModel, AdamW, Option<Vec<(String, candle_core::Var)>>, Option<Vec<usize>>)> {
    let vars = llama.trainable_vars()?;
    if vars.is_empty() {
        bail!("nothing to train: the model has no trainable parameter");
    }
    let masters = match (cfg.precision, lora) {
        (Precision::F32, _) => None,
        (Precision::Bf16, true) => {
            // The adapters are f32 already.
            llama.visit_tensors_mut(|_, t| {
                *t = t.to_dtype(DType::BF16)?;
                Ok(())
            })?;
            None
        }
        (Precision::Bf16, false) => Some(vars.clone()),
    };
    let mut opt = AdamW::new(
        masters.clone().unwrap_or(vars),
        AdamWConfig { beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, eps: cfg.adam_eps, weight_decay: cfg.weight_decay },
    )?;
    let owners = (cfg.zero_stage == 1 && dist.world() > 1).then(|| opt.shard(dist.rank(), dist.world()));
    if let Some(r) = resume {
        let p = r.dir.join("optimizer.safetensors");
        let t = candle_core::safetensors::load(&p, device).with_context(|| format!("reading {}", p.display()))?;
        opt.load_state(t.into_iter().collect(), r.state.step as u64)?;
    }
    Ok((llama, opt, masters, owners))
}

impl Trainer {
    /// Loads the model and data of `cfg` into the run directory `run_dir`,
    /// validating everything first, and resumes from the newest checkpoint there
    /// if one exists. The parts, in order: the tokenizer and the data sets (the
    /// most common thing to get wrong, and cheap to check), the model, the packed
    /// windows, the resume point, the adapters, the optimizer.
    pub fn new(cfg: TrainConfig, run_dir: &Path, tracker: Box<dyn Tracker>) -> Result<Self> {
        Self::new_on(cfg, run_dir, tracker, Arc::new(Dist::single()))
    }

    /// [`Trainer::new`] as one rank of `dist`. Every rank reads the run directory
    /// (config, checkpoint to resume from); only rank 0 writes it.
    pub fn new_on(cfg: TrainConfig, run_dir: &Path, tracker: Box<dyn Tracker>, dist: Arc<Dist>) -> Result<Self> {
        cfg.validate()?;
        let (accum, ranks) = (cfg.grad_accum, dist.world());
        if accum < ranks {
            bail!(
                "grad_accum = {accum} gives {accum} micro-batches per step, fewer than the {ranks} ranks: set grad_accum to a multiple of {ranks} \
                 (each rank then runs grad_accum / {ranks} micro-batches of batch_size per step; batch_size × grad_accum is the global batch)"
            );
        }
        let run_files = RunFiles::new(run_dir);
        let scratch = match dist.is_leader() {
            true => None,
            false => Some(tempfile::Builder::new().prefix(&format!("tunebook-rank{}-", dist.rank())).tempdir()?),
        };
        let files = match &scratch {
            Some(t) => RunFiles::new(t.path()),
            None => run_files.clone(),
        };
        std::fs::create_dir_all(files.checkpoints_dir())
            .with_context(|| format!("cannot create the run directory {}", files.dir().display()))?;
        let mut events = EventLog::open(&files)?;
        let device = select_device(&cfg.device)?;

        let source = resolve_model(&cfg.model)?;
        let tokenizer = Tokenizer::load(source.path()).with_context(|| format!("loading the tokenizer of {}", cfg.model))?;
        let data = TrainData::open(&cfg)?;

        let mut model = Model::load_on(&cfg.model, &device, DType::F32)?;
        model.tokenizer = Some(tokenizer.clone());
        let max_ctx = model.llama.config.max_position_embeddings;
        let context_length = cfg.context_length.unwrap_or(max_ctx.min(2048));
        if context_length > max_ctx {
            bail!("context_length {context_length} exceeds the model's maximum of {max_ctx} tokens");
        }
        let (train, eval) = data.pack(&cfg, &tokenizer, context_length, &files)?;

        let lora = cfg.lora.clone().map(|l| l.seed(cfg.seed));
        if let Some(w) = &cfg.custom_weights_path {
            load_custom_weights(&mut model.llama, Path::new(w), lora.is_some())?;
        }
        let per_step = cfg.batch_size * cfg.grad_accum;
        let steps_per_epoch = train.len().div_ceil(per_step);
        let duration = cfg.duration()?;
        let total_steps = duration.total_steps(steps_per_epoch, per_step * context_length);
        if !matches!(duration, Duration::Epochs(_)) && total_steps == 0 {
            bail!("training_duration {:?} gives no step", cfg.training_duration);
        }
        let warmup = cfg.warmup_steps.unwrap_or((cfg.warmup_ratio * total_steps as f64).round() as usize);

        let resume = ResumePoint::find(&run_files, &cfg)?;
        let state = match &resume {
            Some(r) => r.state.clone(),
            None => TrainerState { step: 0, total_steps, tokens_seen: 0, loss: f64::NAN, config_digest: config_digest(&cfg) },
        };
        let llama = attach_trainables(model.llama, lora.as_ref(), resume.as_ref(), &device)?;
        let (llama, opt, masters, owners) = build_optimizer(llama, &cfg, lora.is_some(), resume.as_ref(), &device, &dist)?;
        let wal = MetricWal::open(files.dir())?;
        match &resume {
            Some(r) => events.push(EventKind::Resumed, format!("resumed from {} (step {})", r.dir.display(), state.step))?,
            None => events.push(
                EventKind::Started,
                format!(
                    "{} windows of {context_length} tokens ({per_step} per step, {steps_per_epoch} steps per epoch), {total_steps} steps, {} trainable values",
                    train.len(),
                    opt.num_values()
                ),
            )?,
        }
        if cfg.precision == Precision::Bf16 {
            events.push(EventKind::Precision, "bf16 compute with f32 master weights")?;
        }
        if owners.is_some() {
            events.push(
                EventKind::Started,
                format!(
                    "optimizer state sharded over {} ranks (ZeRO-1): rank {} keeps the moments of {} of {} values ({:.1} MB)",
                    dist.world(),
                    dist.rank(),
                    opt.owned_values(),
                    opt.num_values(),
                    opt.owned_values() as f64 * 8.0 / 1e6
                ),
            )?;
        }
        if dist.world() > 1 {
            let peers: Vec<String> = dist.peers().iter().map(|p| p.to_string()).collect();
            events.push(
                EventKind::Started,
                format!("{} ranks ({}, {} backend): {}", dist.world(), dist.launch().launcher, dist.backend(), peers.join(", ")),
            )?;
        }
        let base_name = cfg.model.clone();
        let mut trainer = Trainer {
            cfg,
            files,
            model: llama,
            lora,
            tokenizer,
            base_name,
            opt,
            train,
            eval,
            steps_per_epoch,
            total_steps,
            warmup,
            context_length,
            state,
            wal,
            events,
            tracker,
            device,
            masters,
            dist,
            owners,
            _scratch: scratch,
        };
        trainer.refresh_compute_weights()?;
        Ok(trainer)
    }

    /// bf16 full fine-tuning: points the model's weights at fresh bf16 casts of the
    /// f32 masters (differentiable, so gradients reach the masters).
    fn refresh_compute_weights(&mut self) -> Result<()> {
        point_at_masters(self.masters.as_deref(), &mut self.model, Some(DType::BF16))
    }

    /// The model with its f32 weights (the masters under bf16), for saving.
    fn model_to_save(&self) -> Result<LlamaModel> {
        let mut m = self.model.clone();
        point_at_masters(self.masters.as_deref(), &mut m, None)?;
        Ok(m)
    }

    /// Steps the run takes in all.
    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    /// Optimizer steps already done (more than 0 after a resume).
    pub fn step(&self) -> usize {
        self.state.step
    }

    /// Training windows.
    pub fn train_windows(&self) -> &[Window] {
        &self.train
    }

    /// The model being trained.
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// The windows of optimizer step `step` (0-based), as micro-batches.
    fn step_batches(&self, step: usize) -> Vec<Vec<&Window>> {
        let epoch = step / self.steps_per_epoch;
        let within = step % self.steps_per_epoch;
        let order = crate::data::permutation(self.train.len(), self.cfg.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let per_step = self.cfg.batch_size * self.cfg.grad_accum;
        let start = within * per_step;
        let idx: Vec<usize> = order.iter().skip(start).take(per_step).map(|&i| i as usize).collect();
        idx.chunks(self.cfg.batch_size).map(|c| c.iter().map(|&i| &self.train[i]).collect()).collect()
    }

    fn log(&mut self, records: &[MetricRecord]) -> Result<()> {
        self.wal.append(records)?;
        Ok(())
    }

    fn tracker_call(&mut self, what: &str, r: Result<()>) {
        if let Err(e) = r {
            let _ = self.events.push(EventKind::Warning, format!("tracking: {what} failed: {e:#} (the run goes on; `tunebook runs sync` can ship it later)"));
        }
    }

    /// Trains to the end (or until cancelled), checkpointing, evaluating and
    /// logging as configured. On NaN/Inf the run stops with an error and the last
    /// good checkpoint is kept.
    pub fn run(&mut self, mut on_step: impl FnMut(&Progress)) -> Result<TrainSummary> {
        CANCEL.store(false, Ordering::SeqCst);
        let params = super::redacted_params(&self.cfg);
        let name = self.files.name();
        let tags = vec![("tunebook.version".to_string(), crate::VERSION.to_string())];
        let ctx = RunContext {
            run_dir: self.files.dir(),
            run_name: &name,
            experiment: self.cfg.experiment.as_deref(),
            params: &params,
            tags: &tags,
        };
        let r = self.tracker.start(&ctx);
        self.tracker_call("start", r);
        if let Some(line) = self.tracker.summary() {
            self.events.push(EventKind::Tracking, line)?;
        }
        let result = self.train_loop(&mut on_step);
        let (outcome, status) = match &result {
            Ok(s) => (if s.status == Status::Stopped { RunOutcome::Killed } else { RunOutcome::Finished }, s.status),
            Err(_) => (RunOutcome::Failed, Status::Failed),
        };
        let _ = self.wal.sync();
        let mut result = result;
        if let Ok(summary) = &mut result {
            if let (Status::Completed, Some(dir), true) = (status, summary.model_dir.clone(), self.dist.is_leader()) {
                summary.registered = super::publish::publish_run(&self.files, &self.cfg, self.tracker.as_mut(), &mut self.events, &dir);
            }
        }
        let r = self.tracker.finish(outcome);
        self.tracker_call("finish", r);
        result
    }

    fn train_loop(&mut self, on_step: &mut dyn FnMut(&Progress)) -> Result<TrainSummary> {
        let mut losses = Vec::new();
        let mut last_eval = None;
        let started = Instant::now();
        let first_step = self.state.step;
        let lr_peak = self.cfg.peak_lr();
        while self.state.step < self.total_steps {
            if self.cancel_agreed()? {
                self.checkpoint()?;
                self.events.push(EventKind::Cancelled, format!("stopped at step {} on request; checkpoint written", self.state.step))?;
                // Handled: a later resume must not read it as a cancel before its start.
                let _ = std::fs::remove_file(self.files.dir().join("cancel"));
                return Ok(TrainSummary {
                    steps: self.state.step,
                    losses,
                    eval: last_eval,
                    model_dir: None,
                    registered: None,
                    status: Status::Stopped,
                });
            }
            let step = self.state.step;
            let t0 = Instant::now();
            let lr = learning_rate(self.cfg.schedule, lr_peak, step, self.total_steps, self.warmup, self.cfg.min_lr_ratio);
            let (loss, grad_norm, tokens) = self.train_step(step, lr)?;
            self.state.step += 1;
            self.state.tokens_seen += tokens as u64;
            self.state.loss = loss;
            let secs = t0.elapsed().as_secs_f64();
            let tps = tokens as f64 / secs.max(1e-9);
            let s = self.state.step as i64;
            self.log(&[
                MetricRecord::now(metric_names::TRAIN_LOSS, loss, s),
                MetricRecord::now(metric_names::LEARNING_RATE, lr, s),
                MetricRecord::now(metric_names::GRAD_NORM, grad_norm, s),
                MetricRecord::now(metric_names::TOKENS_PER_SEC, tps, s),
            ])?;
            losses.push((self.state.step, loss));
            let done_here = self.state.step - first_step;
            let eta = started.elapsed().as_secs_f64() / done_here as f64 * (self.total_steps - self.state.step) as f64;
            let progress = Progress {
                step: self.state.step,
                total_steps: self.total_steps,
                epoch: step as f64 / self.steps_per_epoch as f64,
                loss,
                lr,
                tokens_per_sec: tps,
                eta_secs: eta,
                tokens_seen: self.state.tokens_seen,
            };
            self.files.write_progress(&progress)?;
            on_step(&progress);
            let last = self.state.step == self.total_steps;
            if !self.eval.is_empty() && self.dist.is_leader() && ((self.cfg.eval_every > 0 && self.state.step % self.cfg.eval_every == 0) || last) {
                let m = self.evaluate()?;
                self.log(&[
                    MetricRecord::now(metric_names::EVAL_LOSS, m.cross_entropy, s),
                    MetricRecord::now(metric_names::EVAL_PERPLEXITY, m.perplexity, s),
                    MetricRecord::now(metric_names::EVAL_TOKEN_ACCURACY, m.token_accuracy, s),
                ])?;
                self.events.push(
                    EventKind::Eval,
                    format!(
                        "step {}: eval cross-entropy {:.4}, perplexity {:.3}, token accuracy {:.3} ({} tokens)",
                        self.state.step, m.cross_entropy, m.perplexity, m.token_accuracy, m.tokens
                    ),
                )?;
                last_eval = Some(m);
            }
            if !last && self.cfg.checkpoint_every > 0 && self.state.step % self.cfg.checkpoint_every == 0 {
                let dir = self.checkpoint()?;
                self.upload_checkpoint(&dir);
                self.eval_prompts()?;
            }
        }
        let dir = self.checkpoint()?;
        self.upload_checkpoint(&dir);
        self.eval_prompts()?;
        let model_dir = self.save_model()?;
        self.dist.barrier("the end of the run (rank 0 writes the model)")?;
        self.events.push(EventKind::Completed, format!("trained {} steps; model in {}", self.state.step, model_dir.display()))?;
        Ok(TrainSummary { steps: self.state.step, losses, eval: last_eval, model_dir: Some(model_dir), registered: None, status: Status::Completed })
    }

    /// One optimizer step: forward and backward over the step's micro-batches
    /// (each weighted by its share of the step's target tokens), clipping,
    /// NaN check, update. Returns (loss, gradient norm before clipping, window tokens).
    fn train_step(&mut self, step: usize, lr: f64) -> Result<(f64, f64, usize)> {
        let batches: Vec<Vec<Window>> = self.step_batches(step).into_iter().map(|b| b.into_iter().cloned().collect()).collect();
        let targets: Vec<usize> = batches.iter().map(|b| b.iter().map(|w| w.labels().iter().filter(|&&l| l >= 0).count()).sum()).collect();
        let total_targets: usize = targets.iter().sum();
        if total_targets == 0 {
            bail!("step {}: its windows hold no target token", step + 1);
        }
        let tokens = batches.iter().zip(&targets).filter(|(_, n)| **n > 0).map(|(b, _)| b.len() * self.context_length).sum();
        let vars: Vec<candle_core::Var> = self.opt.vars().map(|(_, v)| v.clone()).collect();
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss_sum = 0f64;
        let (rank, world) = (self.dist.rank(), self.dist.world());
        for (j, (batch, &n)) in batches.iter().zip(&targets).enumerate() {
            if n == 0 || j % world != rank {
                continue;
            }
            ops::lora_linear::set_dropout_seed(dropout_seed(self.cfg.seed, step).wrapping_add((j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
            let (ids, labels, packing) = batch_tensors(batch, &self.device)?;
            let fwd = profile::timer("step: forward");
            let tape = self.model.loss_tape(&ids, &labels, &packing, true)?;
            drop(fwd);
            let w = n as f64 / total_targets as f64;
            let lv = tape.loss().to_dtype(DType::F64)?.to_scalar::<f64>()?;
            loss_sum += lv * w;
            if !lv.is_finite() && world == 1 {
                return self.non_finite(step, "loss", lv);
            }
            let bwd = profile::timer("step: backward");
            let grads = tape.backward(w)?;
            drop(bwd);
            let _acc = profile::timer("step: accumulate");
            for (slot, v) in acc.iter_mut().zip(&vars) {
                if let Some(g) = grads.get(v.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(a) => (a + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        if world > 1 {
            if profile::enabled() {
                // Profiling only: separates waiting for the slower rank from the transfer.
                let _w = profile::timer("step: wait for ranks");
                self.dist.barrier(&format!("the profiling barrier of step {}", step + 1))?;
            }
            let _red = profile::timer("step: all-reduce");
            let mut loss = [loss_sum];
            self.dist.all_reduce_f64(&mut loss, &format!("the loss all-reduce of step {}", step + 1))?;
            loss_sum = loss[0];
            self.all_reduce_grads(&mut acc, &vars, step)?;
            if !loss_sum.is_finite() {
                return self.non_finite(step, "loss", loss_sum);
            }
        }
        let upd = profile::timer("step: clip + AdamW");
        let norm = self.opt.grad_norm(&acc)?;
        if !norm.is_finite() {
            return self.non_finite(step, "gradient norm", norm);
        }
        let scale = match self.cfg.max_grad_norm {
            Some(m) if m > 0.0 && norm > m => m / (norm + 1e-6),
            _ => 1.0,
        };
        self.opt.step(&acc, lr, scale)?;
        if self.owners.is_some() {
            let _g = profile::timer("step: gather weights");
            self.gather_updated_weights(step)?;
        }
        self.refresh_compute_weights()?;
        drop(upd);
        if profile::enabled() {
            for (name, secs, calls) in profile::take() {
                eprintln!("profile step {}: {name:24} {secs:8.3}s {calls:6} calls", step + 1);
            }
        }
        Ok((loss_sum, norm, tokens))
    }

    /// Sums every rank's accumulated gradients, in one flat `f32` buffer (a missing
    /// gradient counts as zeros; it stays missing only if it is missing on every rank).
    fn all_reduce_grads(&self, acc: &mut [Option<Tensor>], vars: &[candle_core::Var], step: usize) -> Result<()> {
        let total: usize = vars.iter().map(|v| v.as_tensor().elem_count()).sum();
        let flatten = profile::timer("step: all-reduce: flatten");
        let mut flat: Vec<f32> = Vec::with_capacity(total + vars.len());
        for (slot, v) in acc.iter().zip(vars) {
            match slot {
                Some(g) => flat.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                None => flat.resize(flat.len() + v.as_tensor().elem_count(), 0.0),
            }
        }
        flat.extend(acc.iter().map(|g| if g.is_some() { 1f32 } else { 0.0 }));
        drop(flatten);
        let transfer = profile::timer("step: all-reduce: transfer");
        self.dist.all_reduce_f32(&mut flat, &format!("the gradient all-reduce of step {}", step + 1))?;
        drop(transfer);
        let _unflatten = profile::timer("step: all-reduce: unflatten");
        let (values, present) = flat.split_at(total);
        let mut off = 0;
        for ((slot, v), p) in acc.iter_mut().zip(vars).zip(present) {
            let t = v.as_tensor();
            let n = t.elem_count();
            *slot = match *p > 0.0 {
                true => Some(Tensor::from_slice(&values[off..off + n], t.dims(), t.device())?.to_dtype(t.dtype())?),
                false => None,
            };
            off += n;
        }
        Ok(())
    }

    /// ZeRO-1: every rank updated only the parameters it owns; one sum across ranks
    /// (zeros where a rank does not own) gives every rank all the updated weights.
    fn gather_updated_weights(&self, step: usize) -> Result<()> {
        let Some(owners) = &self.owners else { return Ok(()) };
        let me = self.dist.rank();
        let vars: Vec<candle_core::Var> = self.opt.vars().map(|(_, v)| v.clone()).collect();
        let total: usize = vars.iter().map(|v| v.elem_count()).sum();
        let mut flat = Vec::with_capacity(total);
        for (v, &o) in vars.iter().zip(owners) {
            match o == me {
                true => flat.extend(v.as_tensor().flatten_all()?.to_vec1::<f32>()?),
                false => flat.resize(flat.len() + v.elem_count(), 0.0),
            }
        }
        self.dist.all_reduce_f32(&mut flat, &format!("the weight gather of step {}", step + 1))?;
        let mut off = 0;
        for (v, &o) in vars.iter().zip(owners) {
            let n = v.elem_count();
            if o != me {
                v.set(&Tensor::from_slice(&flat[off..off + n], v.dims(), v.device())?)?;
            }
            off += n;
        }
        Ok(())
    }

    /// Whether to stop now: a cancel request, SIGTERM or an interrupt on any rank
    /// stops them all at the same step.
    fn cancel_agreed(&self) -> Result<bool> {
        let here = CANCEL.load(Ordering::SeqCst) || self.files.cancel_requested() || crate::interrupt::requested();
        if self.dist.world() == 1 {
            return Ok(here);
        }
        let mut flag = [here as u8 as f64];
        self.dist.all_reduce_f64(&mut flag, &format!("the stop check before step {}", self.state.step + 1))?;
        Ok(flag[0] > 0.0)
    }

    fn non_finite<T>(&mut self, step: usize, what: &str, value: f64) -> Result<T> {
        let last = self.files.latest_checkpoint()?;
        let keep = match &last {
            Some(c) => format!("the last good checkpoint is {}", c.display()),
            None => "no checkpoint was written before it".to_string(),
        };
        let msg = format!(
            "the {what} became {value} at step {}: training stopped; {keep}. Lower the learning rate (now {}), enable gradient clipping (max_grad_norm), or check the data",
            step + 1,
            self.cfg.peak_lr()
        );
        self.events.push(EventKind::Nan, msg.clone())?;
        let _ = self.wal.append(&[MetricRecord::now(metric_names::TRAIN_LOSS, value, step as i64 + 1)]);
        bail!(msg)
    }

    /// Streaming evaluation over the eval windows: one window at a time, logits
    /// only at target positions.
    pub fn evaluate(&self) -> Result<EvalMetrics> {
        let mut ce = 0f64;
        let mut correct = 0usize;
        let mut n = 0usize;
        let w_lm = self.model.lm_head_weight();
        for w in &self.eval {
            let labels = w.labels();
            let pos: Vec<u32> = labels.iter().enumerate().filter(|(_, l)| **l >= 0).map(|(i, _)| i as u32).collect();
            if pos.is_empty() {
                continue;
            }
            let (ids, _, packing) = batch_tensors(&[w.clone()], &self.device)?;
            let h = self.model.hidden_states(&ids, &packing, false)?.squeeze(0)?.detach();
            let idx = Tensor::from_vec(pos.clone(), pos.len(), &self.device)?;
            let logits = ops::linear(&h.index_select(&idx, 0)?, &w_lm.detach())?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (row, &p) in logits.iter().zip(&pos) {
                let target = labels[p as usize] as usize;
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = max as f64 + row.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln();
                ce += lse - row[target] as f64;
                let arg = row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
                correct += (arg == target) as usize;
                n += 1;
            }
        }
        if n == 0 {
            bail!("the eval data holds no target token");
        }
        let cross_entropy = ce / n as f64;
        Ok(EvalMetrics { cross_entropy, perplexity: cross_entropy.exp(), token_accuracy: correct as f64 / n as f64, tokens: n })
    }

    fn inference_model(&self) -> Model {
        Model::new(self.model.clone(), Some(self.tokenizer.clone()))
    }

    /// Answers the eval prompts with the current weights (greedy) and appends the
    /// generations to `eval_generations.jsonl`.
    fn eval_prompts(&mut self) -> Result<()> {
        if self.cfg.eval_prompts.is_empty() || !self.dist.is_leader() {
            return Ok(());
        }
        let m = self.inference_model();
        let g = GenerationConfig::greedy(self.cfg.eval_max_new_tokens);
        let mut lines = String::new();
        for p in self.cfg.eval_prompts.clone() {
            let out = match self.cfg.task {
                crate::data::Task::Chat => m.chat_with(&[Message::user(p.clone())], &g, |_| {})?,
                _ => m.generate_with(&p, &g, |_| {})?,
            };
            lines.push_str(&serde_json::to_string(&serde_json::json!({"step": self.state.step, "prompt": p, "response": out.text}))?);
            lines.push('\n');
        }
        use std::io::Write;
        let path = self.files.dir().join("eval_generations.jsonl");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        f.write_all(lines.as_bytes())?;
        self.events.push(EventKind::Generations, format!("step {}: {} eval prompts answered (eval_generations.jsonl)", self.state.step, self.cfg.eval_prompts.len()))?;
        Ok(())
    }

    /// Writes a checkpoint of the current step (weights or adapters, optimizer,
    /// state) atomically, then drops the oldest beyond `keep_checkpoints`.
    pub fn checkpoint(&mut self) -> Result<PathBuf> {
        let dir = self.files.checkpoint_dir(self.state.step);
        // A sharded optimizer's state is gathered (every rank takes part) so that the
        // checkpoint holds all of it and resumes with any number of ranks.
        let gathered = match self.owners.is_some() {
            true => {
                let mut flat = self.opt.moments_flat()?;
                self.dist.all_reduce_f32(&mut flat, &format!("the optimizer-state gather for the checkpoint of step {}", self.state.step))?;
                Some(flat)
            }
            false => None,
        };
        if !self.dist.is_leader() {
            return Ok(dir);
        }
        if dir.is_dir() {
            return Ok(dir);
        }
        let stage = StagedDir::new(&dir)?;
        self.save_weights(stage.path())?;
        let opt_state = match &gathered {
            Some(flat) => self.opt.state_data_from(flat),
            None => self.opt.state_data(),
        };
        crate::model::write_safetensors_data(&stage.path().join("optimizer.safetensors"), opt_state)?;
        // Everything a resume needs is a function of the step and the config; the
        // derived positions are written out so a reader need not recompute them.
        let step = self.state.step;
        let state = CheckpointState {
            state: self.state.clone(),
            data_position: DataPosition {
                epoch: step / self.steps_per_epoch,
                step_in_epoch: step % self.steps_per_epoch,
                steps_per_epoch: self.steps_per_epoch,
            },
            scheduler: SchedulerState {
                schedule: self.cfg.schedule,
                next_lr: learning_rate(self.cfg.schedule, self.cfg.peak_lr(), step, self.total_steps, self.warmup, self.cfg.min_lr_ratio),
                warmup_steps: self.warmup,
                total_steps: self.total_steps,
            },
            rng: RngState { seed: self.cfg.seed, next_dropout_seed: dropout_seed(self.cfg.seed, step) },
        };
        state.write(stage.path())?;
        crate::files::write_atomic(&stage.path().join("config.toml"), self.cfg.to_toml()?.as_bytes())?;
        stage.commit(IfExists::Keep)?;
        self.wal.sync()?;
        self.events.push(EventKind::Checkpoint, format!("step {}: checkpoint {}", self.state.step, dir.display()))?;
        let mut all = self.files.checkpoints()?;
        while all.len() > self.cfg.keep_checkpoints {
            let (_, old) = all.remove(0);
            std::fs::remove_dir_all(&old).with_context(|| format!("removing the old checkpoint {}", old.display()))?;
        }
        Ok(dir)
    }

    fn upload_checkpoint(&mut self, dir: &Path) {
        if self.cfg.log_checkpoints && self.dist.is_leader() {
            let dest = format!("checkpoints/{}", dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            let r = self.tracker.log_artifact(dir, &dest);
            self.tracker_call("checkpoint upload", r);
        }
    }

    fn save_weights(&self, dir: &Path) -> Result<()> {
        match &self.lora {
            Some(l) => self.model.save_lora(dir, l, &self.base_name),
            None => self.model_to_save()?.save_pretrained(dir),
        }
    }

    /// Writes the trained model to `<run dir>/model` in Hugging Face layout (the
    /// adapter and a reference to its base, or full weights) with the tokenizer files.
    pub fn save_model(&self) -> Result<PathBuf> {
        if !self.dist.is_leader() {
            return Ok(self.files.dir().join("model"));
        }
        let stage = StagedDir::new(self.files.dir().join("model"))?;
        self.save_weights(stage.path())?;
        self.tokenizer.save_hf_files(stage.path())?;
        if self.lora.is_some() {
            // Where the base model came from, for loaders that rebuild it.
            crate::files::write_atomic(
                &stage.path().join("base_model.json"),
                serde_json::to_string_pretty(&serde_json::json!({"base_model": self.base_name}))?.as_bytes(),
            )?;
        }
        let out = stage.commit(IfExists::Replace)?;
        Ok(out)
    }
}

/// Replaces every weight of `model` that has an f32 master by that master, cast
/// to `cast` when given. Nothing to do without masters (outside bf16 full fine-tuning).
fn point_at_masters(masters: Option<&[(String, candle_core::Var)]>, model: &mut LlamaModel, cast: Option<DType>) -> Result<()> {
    let Some(masters) = masters else { return Ok(()) };
    let by_name: std::collections::HashMap<&str, &candle_core::Var> = masters.iter().map(|(n, v)| (n.as_str(), v)).collect();
    model.visit_tensors_mut(|name, t| {
        if let Some(v) = by_name.get(name) {
            *t = match cast {
                Some(d) => v.as_tensor().to_dtype(d)?,
                None => v.as_tensor().clone(),
            };
        }
        Ok(())
    })
}

/// The dropout generator's start for optimizer step `step` (0-based).
fn dropout_seed(seed: u64, step: usize) -> u64 {
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (step as u64 + 1)
}

/// Input ids `[B, T]`, un-shifted labels (targets where the loss mask is set) and
/// the packing layout of a micro-batch.
fn batch_tensors(batch: &[Window], device: &Device) -> Result<(Tensor, Vec<i64>, Packing)> {
    let t = batch[0].len();
    let mut ids = Vec::with_capacity(batch.len() * t);
    let mut labels = Vec::with_capacity(batch.len() * t);
    let mut segs = Vec::with_capacity(batch.len() * t);
    for w in batch {
        ids.extend_from_slice(&w.input_ids);
        segs.extend_from_slice(&w.segment_ids);
        labels.extend(w.input_ids.iter().zip(&w.loss_mask).zip(&w.segment_ids).map(|((&id, &m), &s)| {
            if m != 0 && s != 0 { i64::from(id) } else { ops::IGNORE_INDEX }
        }));
    }
    let packing = Packing::from_segments(segs, batch.len(), t)?;
    Ok((Tensor::from_vec(ids, (batch.len(), t), device)?, labels, packing))
}

fn load_custom_weights(llama: &mut LlamaModel, path: &Path, lora: bool) -> Result<()> {
    if path.join("adapter_model.safetensors").is_file() {
        if !lora {
            bail!(
                "custom_weights_path {} holds a LoRA adapter: add a `lora` section to continue training it, or merge it first",
                path.display()
            );
        }
        llama.load_lora(path)?;
        return Ok(());
    }
    let has_weights = std::fs::read_dir(path)
        .with_context(|| format!("custom_weights_path {}: cannot read the directory", path.display()))?
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().ends_with(".safetensors"));
    if !has_weights {
        bail!(
            "custom_weights_path {} holds neither adapter_model.safetensors nor model weights (*.safetensors)",
            path.display()
        );
    }
    let device = llama.device().clone();
    let loaded = LlamaModel::from_hf_dir(path, &device, DType::F32)
        .with_context(|| format!("custom_weights_path {}", path.display()))?;
    if loaded.config.hidden_size != llama.config.hidden_size || loaded.config.num_hidden_layers != llama.config.num_hidden_layers {
        bail!("custom_weights_path {}: its architecture differs from the base model {}", path.display(), llama.config.model_type);
    }
    *llama = loaded;
    Ok(())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is damaged (not the expected JSON)", path.display()))
}

/// A digest of the options that change what is computed (not names or tracking).
pub fn config_digest(cfg: &TrainConfig) -> String {
    let mut c = cfg.clone();
    c.name.clear();
    c.experiment = None;
    c.tracking_uri = None;
    c.register_to = None;
    c.eval_prompts.clear();
    c.checkpoint_every = 0;
    c.log_checkpoints = false;
    c.keep_checkpoints = 1;
    c.eval_every = 0;
    c.device.clear();
    // How the optimizer state is spread over ranks changes no result.
    c.zero_stage = 0;
    let text = serde_json::to_string(&c).unwrap_or_default();
    // FNV-1a: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}
