//! The training loop shared by `train` and `finetune`.
//!
//! Per optimizer step: seed the device from `(seed, step)` (dropout), accumulate
//! gradients over `grad_accum_steps` micro-batches, clip their global norm, take an
//! AdamW step at the scheduled learning rate. Every `eval_interval` steps: evaluate,
//! append to `metrics.jsonl`, redraw `loss.png`, save `model.safetensors` (and
//! `best.safetensors` on a new best), LoRA adapters merged (and also saved alone as
//! `*.adapter.safetensors`). Checkpoints hold the model and optimizer records
//! (with parameter ids, so optimizer state re-attaches) and the loop state; batches and
//! learning rates are pure functions of the step, so a resumed run continues exactly.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer, OptimizerRecord};
use burn::prelude::*;
use burn::store::ModuleRecord;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use kiln_core::io::{StoreError, atomic_write};
use kiln_core::layout::{BEST_WEIGHTS, MODEL_WEIGHTS, SUMMARY};
use kiln_core::rng::with_rng_lock;
use kiln_core::weights::save_inference_weights;

use crate::checkpoint::CheckpointDir;
use crate::config::Recipe;
use crate::metrics::{EvalRecord, MetricsLog, plot_run};
use crate::optim::{adamw, clip_global_norm};
use crate::task::Task;

/// The loop's own state, saved with every checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// Optimizer steps completed.
    pub step: usize,
    pub best_val_loss: Option<f64>,
    pub best_step: Option<usize>,
    /// Training-loss sum and count since the last evaluation.
    pub loss_sum: f64,
    pub loss_count: usize,
    pub last_grad_norm: f64,
    /// Wall time spent training before this process (resumed runs).
    pub elapsed_s: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub final_val_loss: f64,
    pub final_val_accuracy: Option<f64>,
    pub best_val_loss: f64,
    pub best_step: usize,
    pub wall_time_s: f64,
    pub ms_per_step: f64,
    /// Mean milliseconds of the optimizer steps alone (no evaluation, no checkpoints).
    #[serde(default)]
    pub train_ms_per_step: f64,
    pub items_per_s: f64,
    pub num_params: usize,
}

/// Where a run writes, and how it reports.
pub struct TrainOptions {
    pub run_dir: PathBuf,
    pub resume: bool,
    /// Draw a progress bar (stderr) and print evaluation lines.
    pub progress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Checkpoint(#[from] StoreError),
    #[error("{path}: {message}")]
    Resume { path: PathBuf, message: String },
    #[error("training diverged at step {step}: the loss is {loss}")]
    Diverged { step: usize, loss: f64 },
}

fn resume_err(path: &Path, message: impl std::fmt::Display) -> TrainError {
    TrainError::Resume {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Files of a resumable checkpoint directory.
const MODEL_RECORD: &str = "model.bpk";
const OPTIM_RECORD: &str = "optim.bpk";
const LOOP_STATE: &str = "state.json";

/// Train `model` (already on `device`, an autodiff device) on `task` per `cfg`:
/// [`restore`] (with `--resume`), then per step [`train_step`], an [`evaluate`] when the
/// evaluation interval says so, and a checkpoint when the [`CheckpointPolicy`] does; at
/// the end the summary.
pub fn train<T: Task>(
    task: &mut T,
    model: T::Model,
    cfg: Recipe<'_>,
    device: &Device,
    options: &TrainOptions,
) -> Result<(T::Model, TrainSummary), TrainError> {
    let t = cfg.train;
    let run_dir = &options.run_dir;
    let checkpoints = CheckpointDir::new(run_dir);
    let metrics = MetricsLog::new(run_dir);
    let eval_device = device.clone().without_autodiff();
    let num_params = model.num_params();
    let policy = CheckpointPolicy::from(t);

    let Restored {
        mut model,
        mut optim,
        mut state,
    } = restore(model, cfg, &checkpoints, &metrics, options)?;
    let start_step = state.step;
    let progress = progress_bar(options.progress, start_step, t.max_steps);
    let started = Instant::now();
    let mut window = Window::new();
    let mut last_eval = None;
    let mut step_time = std::time::Duration::ZERO;
    for step in start_step..t.max_steps {
        let step_started = Instant::now();
        let (next, stats) = train_step(task, model, &mut optim, cfg, step, device);
        step_time += step_started.elapsed();
        model = next;
        let (step_loss, lr) = (stats.loss, stats.lr);
        state.last_grad_norm = stats.grad_norm;
        if !step_loss.is_finite() {
            return Err(TrainError::Diverged { step, loss: step_loss });
        }
        state.step = step + 1;
        state.loss_sum += step_loss;
        state.loss_count += 1;
        window.items += task.items_per_batch() * t.grad_accum_steps;

        let done = state.step == t.max_steps;
        if state.step % t.log_interval == 0 || done {
            let rate = window.items as f64 / window.start.elapsed().as_secs_f64();
            progress.set_position(state.step as u64);
            progress.set_message(format!("loss {step_loss:.4} | lr {lr:.2e} | {} /s", human(rate)));
        }
        if state.step % t.eval_interval == 0 || done {
            let elapsed_s = state.elapsed_s + started.elapsed().as_secs_f64();
            let line = evaluate(
                task,
                &model,
                &mut state,
                &window,
                lr,
                elapsed_s,
                &eval_device,
                &metrics,
                run_dir,
            )?;
            if options.progress {
                progress.suspend(|| eprintln!("{}", line.1));
            }
            last_eval = Some(line.0);
            window = Window::new();
        }
        if policy.is_due(state.step, done) {
            let mut saved = state.clone();
            saved.elapsed_s = state.elapsed_s + started.elapsed().as_secs_f64();
            save_checkpoint(&checkpoints, t.keep_checkpoints, &model, &optim, &saved)?;
        }
    }
    progress.finish_and_clear();

    let wall = started.elapsed().as_secs_f64();
    let steps_run = t.max_steps.saturating_sub(start_step);
    let eval = match last_eval {
        Some(e) => e,
        None => task.evaluate(&model.valid(), &eval_device),
    };
    let per_step = |total_s: f64| {
        if steps_run > 0 {
            total_s * 1000.0 / steps_run as f64
        } else {
            0.0
        }
    };
    let summary = TrainSummary {
        steps: t.max_steps,
        final_val_loss: eval.loss,
        final_val_accuracy: eval.accuracy,
        best_val_loss: state.best_val_loss.unwrap_or(eval.loss),
        best_step: state.best_step.unwrap_or(t.max_steps),
        wall_time_s: state.elapsed_s + wall,
        ms_per_step: per_step(wall),
        train_ms_per_step: per_step(step_time.as_secs_f64()),
        items_per_s: if wall > 0.0 {
            (steps_run * task.items_per_batch() * t.grad_accum_steps) as f64 / wall
        } else {
            0.0
        },
        num_params,
    };
    atomic_write(
        &run_dir.join(SUMMARY),
        serde_json::to_string_pretty(&summary)
            .expect("summary serialises")
            .as_bytes(),
    )?;
    Ok((model, summary))
}

/// Throughput window between two evaluations.
struct Window {
    start: Instant,
    items: usize,
}

impl Window {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            items: 0,
        }
    }
}

/// When a resumable checkpoint is written: every `checkpoint_interval` steps, or at every
/// evaluation when that is 0, and always at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointPolicy {
    pub every: usize,
}

impl From<&crate::config::TrainConfig> for CheckpointPolicy {
    fn from(t: &crate::config::TrainConfig) -> Self {
        Self {
            every: if t.checkpoint_interval > 0 {
                t.checkpoint_interval
            } else {
                t.eval_interval
            },
        }
    }
}

impl CheckpointPolicy {
    pub fn is_due(&self, step: usize, done: bool) -> bool {
        done || step.is_multiple_of(self.every.max(1))
    }
}

/// The model, optimizer and loop state a run continues from.
struct Restored<M> {
    model: M,
    optim: ModuleOptimizer,
    state: LoopState,
}

/// With `--resume` and a checkpoint: load the model and optimizer records and the loop
/// state, and drop metrics recorded after it; else start at step 0. The optimizer is
/// built after the model record is loaded: its parameter groups are keyed by the
/// (restored) parameter ids.
fn restore<M: Module>(
    model: M,
    cfg: Recipe<'_>,
    checkpoints: &CheckpointDir,
    metrics: &MetricsLog,
    options: &TrainOptions,
) -> Result<Restored<M>, TrainError> {
    let mut model = model;
    let mut optim_record = None;
    let mut state = LoopState::default();
    if options.resume {
        if let Some(dir) = checkpoints.latest()? {
            let record =
                ModuleRecord::load(dir.join(MODEL_RECORD)).map_err(|e| resume_err(&dir.join(MODEL_RECORD), e))?;
            model = model
                .try_load_record(record)
                .map_err(|e| resume_err(&dir.join(MODEL_RECORD), e))?;
            let record =
                OptimizerRecord::load(dir.join(OPTIM_RECORD)).map_err(|e| resume_err(&dir.join(OPTIM_RECORD), e))?;
            optim_record = Some(record);
            let state_path = dir.join(LOOP_STATE);
            let text = std::fs::read_to_string(&state_path).map_err(|e| resume_err(&state_path, e))?;
            state = serde_json::from_str(&text).map_err(|e| resume_err(&state_path, e))?;
            metrics.truncate_after(state.step)?;
            if options.progress {
                eprintln!("resuming from {} (step {})", dir.display(), state.step);
            }
        } else if options.progress {
            eprintln!(
                "--resume: no checkpoint in {} yet, starting from step 0",
                options.run_dir.display()
            );
        }
    }
    let mut optim: ModuleOptimizer = adamw(cfg.optim, &model);
    if let Some(record) = optim_record {
        optim = optim.load_record(record);
    }
    Ok(Restored { model, optim, state })
}

/// Evaluate the model (in validation mode), append the record to `metrics.jsonl`, redraw
/// the plots, save the latest weights and, on a new best validation loss, the best ones.
/// Resets the running training loss. Returns the evaluation and its progress line.
#[allow(clippy::too_many_arguments)]
fn evaluate<T: Task>(
    task: &mut T,
    model: &T::Model,
    state: &mut LoopState,
    window: &Window,
    lr: f64,
    elapsed_s: f64,
    eval_device: &Device,
    metrics: &MetricsLog,
    run_dir: &Path,
) -> Result<(crate::task::Evaluation, String), TrainError> {
    let secs = window.start.elapsed().as_secs_f64();
    let snapshot = model.valid();
    let eval = task.evaluate(&snapshot, eval_device);
    let record = EvalRecord {
        step: state.step,
        train_loss: state.loss_sum / state.loss_count.max(1) as f64,
        val_loss: eval.loss,
        val_accuracy: eval.accuracy,
        lr,
        grad_norm: state.last_grad_norm,
        tokens_per_s: window.items as f64 / secs,
        elapsed_s,
    };
    metrics.append(&record)?;
    plot_run(run_dir, &metrics.read()?)?;
    save_inference_weights(&snapshot, &run_dir.join(MODEL_WEIGHTS))?;
    if state.best_val_loss.is_none_or(|b| eval.loss < b) {
        state.best_val_loss = Some(eval.loss);
        state.best_step = Some(state.step);
        save_inference_weights(&snapshot, &run_dir.join(BEST_WEIGHTS))?;
    }
    let acc = eval
        .accuracy
        .map(|a| format!(" | val acc {:.2}%", a * 100.0))
        .unwrap_or_default();
    let line = format!(
        "step {:>6} | train loss {:.4} | val loss {:.4}{acc} | lr {:.2e} | {} /s",
        record.step,
        record.train_loss,
        record.val_loss,
        lr,
        human(record.tokens_per_s)
    );
    state.loss_sum = 0.0;
    state.loss_count = 0;
    Ok((eval, line))
}

/// Write a resumable checkpoint: model and optimizer records and the loop state.
fn save_checkpoint<M: Module>(
    checkpoints: &CheckpointDir,
    keep: usize,
    model: &M,
    optim: &ModuleOptimizer,
    state: &LoopState,
) -> Result<(), TrainError> {
    checkpoints.commit(state.step, keep, |dir| {
        let io = |path: PathBuf| {
            move |e| StoreError::Other {
                path,
                message: format!("{e}"),
            }
        };
        model
            .clone()
            .into_record()
            .save(dir.join(MODEL_RECORD))
            .map_err(io(dir.join(MODEL_RECORD)))?;
        optim
            .to_record()
            .save(dir.join(OPTIM_RECORD))
            .map_err(io(dir.join(OPTIM_RECORD)))?;
        atomic_write(
            &dir.join(LOOP_STATE),
            serde_json::to_string_pretty(state)
                .expect("state serialises")
                .as_bytes(),
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::CheckpointPolicy;

    #[test]
    fn checkpoints_at_the_interval_or_at_evaluations_and_at_the_end() {
        let p = CheckpointPolicy { every: 50 };
        assert!(!p.is_due(49, false) && p.is_due(50, false) && p.is_due(100, false));
        assert!(p.is_due(73, true));
    }
}

/// Loss and gradient norm of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate the step used.
    pub lr: f64,
}

/// One optimizer step of `model` on `task`: seed the device from `(seed, step)`
/// (dropout), accumulate gradients over `grad_accum_steps` micro-batches, clip their
/// global norm, and take an AdamW step at the scheduled learning rate.
pub fn train_step<T: Task>(
    task: &mut T,
    mut model: T::Model,
    optim: &mut ModuleOptimizer,
    cfg: Recipe<'_>,
    step: usize,
    device: &Device,
) -> (T::Model, StepStats) {
    let t = cfg.train;
    let lr = cfg.optim.lr_at(step, t.max_steps);
    let mut loss_sum = 0.0;
    let mut accumulator = (t.grad_accum_steps > 1).then(GradientsAccumulator::<T::Model>::new);
    let mut grads = None;
    // The step's random draws (dropout) come from the device RNG seeded here; holding the
    // RNG lock keeps them the step's own when other threads train too.
    with_rng_lock(|| {
        device.seed(kiln_data::SplitMix64::derive(t.seed, step as u64).next_u64());
        for micro in 0..t.grad_accum_steps {
            let batch = task.train_batch(step, micro, device);
            let loss = task.loss(&model, &batch);
            let loss = if t.grad_accum_steps > 1 {
                loss / t.grad_accum_steps as f64
            } else {
                loss
            };
            let micro_grads = GradientsParams::from_grads(loss.backward(), &model);
            loss_sum += loss.inner().into_scalar::<f32>() as f64;
            match accumulator.as_mut() {
                Some(acc) => acc.accumulate(&model, micro_grads),
                None => grads = Some(micro_grads),
            }
        }
    });
    let mut grads = match accumulator.as_mut() {
        Some(acc) => acc.grads(),
        None => grads.expect("at least one micro-batch"),
    };
    let grad_norm = clip_global_norm(&model, &mut grads, t.grad_clip);
    let policy = if cfg.optim.groups.is_empty() {
        lr.into()
    } else {
        cfg.optim.lr_policy(step, t.max_steps)
    };
    model = optim.step(policy, model, grads);
    (
        model,
        StepStats {
            loss: loss_sum,
            grad_norm,
            lr,
        },
    )
}

fn progress_bar(enabled: bool, position: usize, total: usize) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr_with_hz(4));
    bar.set_style(
        ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} steps | {msg} | ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_position(position as u64);
    bar
}

/// `12345.6` -> `"12.3k"`.
pub fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.1}")
    }
}
