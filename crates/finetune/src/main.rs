//! `finetune`: adapt a pretrained model (a `convert` output or a `train` run) to a task.
//!
//! ```text
//! cargo run --release -p finetune -- --config configs/finetune-minilm-sentiment.toml
//!     [--backend flex] [--device 0] [--out runs/NAME] [--set method=lora ...] [--resume]
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use kiln_runtime::finetune::{self, FinetuneConfig};
use kiln_runtime::training::{TrainOptions, human};
use kiln_runtime::{BackendKind, Selected};

#[derive(Parser)]
#[command(about = "Fine-tune a pretrained Kiln model directory (full, frozen backbone or LoRA)")]
struct Cli {
    /// Fine-tuning config (TOML). Not needed with --resume when the run directory has one.
    #[arg(long)]
    config: Option<PathBuf>,
    /// flex | ndarray | wgpu | tch | tch-cuda
    #[arg(long, default_value = "flex")]
    backend: BackendKind,
    /// Device index (GPU backends).
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Run directory (default: runs/<config file stem>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a config key: --set method=lora, --set train.max_steps=200 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// No progress bar or evaluation lines.
    #[arg(long)]
    quiet: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let config = cli
        .config
        .as_ref()
        .map(|path| FinetuneConfig::load(path, &cli.overrides))
        .transpose()?;
    let run_dir = match (&cli.out, &cli.config) {
        (Some(out), _) => out.clone(),
        (None, Some(path)) => PathBuf::from("runs").join(path.file_stem().context("config path has no file name")?),
        (None, None) => anyhow::bail!("pass --config (and --out to choose the run directory)"),
    };
    let config = finetune::prepare_finetune_dir(&run_dir, config.as_ref(), cli.resume, &cli.overrides)?;
    let backend = Selected::new(cli.backend, cli.device)?;
    eprintln!("{} | run directory {}", backend.describe(), run_dir.display());
    let options = TrainOptions {
        run_dir: run_dir.clone(),
        resume: cli.resume,
        progress: !cli.quiet,
    };
    let report = finetune::run_finetune(config, &backend, &options)
        .with_context(|| format!("fine-tuning into {}", run_dir.display()))?;
    let s = &report.train;
    let test = report
        .test
        .as_ref()
        .map(|m| {
            format!(
                " | test acc {:.2}% macro-F1 {:.4} (n = {})",
                m.accuracy * 100.0,
                m.macro_f1,
                m.n
            )
        })
        .unwrap_or_default();
    let epoch = report
        .epoch_time_s
        .map(|e| format!(" | {e:.1} s/epoch"))
        .unwrap_or_default();
    let rss = report
        .peak_rss_mib
        .map(|m| format!(" | peak RSS {m:.0} MiB"))
        .unwrap_or_default();
    println!(
        "done: {} steps in {:.1}s ({:.1} ms/step training, {} items/s{epoch}) | best val loss {:.4} at step {}{test}{rss} | {} of {} params trained | {}",
        s.steps,
        s.wall_time_s,
        s.train_ms_per_step,
        human(s.items_per_s),
        s.best_val_loss,
        s.best_step,
        report.trainable_params,
        report.total_params,
        run_dir.display()
    );
    Ok(())
}
