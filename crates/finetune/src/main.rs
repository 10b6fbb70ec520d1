//! `finetune`: adapt a pretrained model (a `convert` output or a `train` run) to a task.
//!
//! ```text
//! cargo run --release -p finetune -- --config configs/finetune-minilm-sentiment.toml
//!     [--backend flex] [--device 0] [--out runs/NAME] [--set method=lora ...] [--resume]
//! ```

use anyhow::{Context, Result};
use clap::Parser;
use kiln_train::cli::RunArgs;
use kiln_train::finetune::{self, FinetuneConfig};
use kiln_train::training::human;

#[derive(Parser)]
#[command(about = "Fine-tune a pretrained Kiln model directory (full, frozen backbone or LoRA)")]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

fn main() -> Result<()> {
    let cli = Cli::parse().run;
    let config = cli
        .config
        .as_ref()
        .map(|path| FinetuneConfig::load(path, &cli.overrides))
        .transpose()?;
    let run_dir = cli.run_dir().map_err(anyhow::Error::msg)?;
    let config = finetune::prepare_finetune_dir(&run_dir, config.as_ref(), cli.resume, &cli.overrides)?;
    let backend = cli.select(&run_dir)?;
    let options = cli.options(run_dir.clone());
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
