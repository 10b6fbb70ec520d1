//! `train`: train a model from a TOML run config, or compare finished runs.
//!
//! ```text
//! cargo run --release -p train -- --config configs/shakespeare-char.toml [--backend flex]
//!     [--device 0] [--out runs/NAME] [--set train.max_steps=200 ...] [--resume]
//! cargo run --release -p train -- compare runs/a runs/b [--out compare.png]
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kiln_train::cli::RunArgs;
use kiln_train::training::human;
use kiln_train::{RunConfig, compare, run};

#[derive(Parser)]
#[command(
    about = "Train a Kiln model from a TOML config",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Plot the validation-loss curves of several runs and print a table.
    Compare {
        /// Run directories.
        #[arg(required = true, num_args = 1..)]
        runs: Vec<PathBuf>,
        /// Output PNG.
        #[arg(long, default_value = "compare.png")]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Compare { runs, out }) = cli.command {
        let table = compare::compare_runs(&runs, &out)?;
        print!("{table}");
        println!("validation-loss curves: {}", out.display());
        return Ok(());
    }
    let cli = cli.run;
    let config = cli
        .config
        .as_ref()
        .map(|path| RunConfig::load(path, &cli.overrides))
        .transpose()?;
    let run_dir = cli.run_dir().map_err(anyhow::Error::msg)?;
    let config = run::prepare_run_dir(&run_dir, config.as_ref(), cli.resume, &cli.overrides)?;
    let backend = cli.select(&run_dir)?;
    let options = cli.options(run_dir.clone());
    let summary = run::run_training(config, &backend, &options)
        .with_context(|| format!("training into {}", run_dir.display()))?;
    let acc = summary
        .final_val_accuracy
        .map(|a| format!(" | val acc {:.2}%", a * 100.0))
        .unwrap_or_default();
    println!(
        "done: {} steps in {:.1}s ({:.1} ms/step, {} items/s) | final val loss {:.4}{acc} | best {:.4} at step {} | {:.2}M params | {}",
        summary.steps,
        summary.wall_time_s,
        summary.ms_per_step,
        human(summary.items_per_s),
        summary.final_val_loss,
        summary.best_val_loss,
        summary.best_step,
        summary.num_params as f64 / 1e6,
        run_dir.display()
    );
    Ok(())
}
