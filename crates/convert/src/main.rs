//! `convert`: turn a checkpoint trained elsewhere into a Kiln model directory
//! (`model.safetensors` + `config.toml` [+ `config.json`, `tokenizer.json`]) that
//! `infer` and `finetune` take as is.
//!
//! ```text
//! cargo run --release -p convert -- --input PATH --arch gpt2|llama|bert|mlp|cnn
//!     [--config config.json|config.toml] --output DIR [--allow-partial] [--verbose]
//! ```
//! PATH: a `.safetensors`, `.pt`/`.pth`/`.bin` file, or a Hugging Face directory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use kiln_convert::{Source, convert, hf_config, write_model_dir};
use kiln_runtime::run::ModelFile;

#[derive(Parser)]
#[command(about = "Convert PyTorch / safetensors / Hugging Face checkpoints into Kiln model directories")]
struct Cli {
    /// Checkpoint file or Hugging Face model directory.
    #[arg(long)]
    input: PathBuf,
    /// Target architecture.
    #[arg(long, value_parser = ["gpt2", "llama", "bert", "mlp", "cnn"])]
    arch: String,
    /// Hyper-parameters: a Hugging Face config.json or a Kiln config.toml
    /// (default: the input directory's config.json).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output directory (must not exist).
    #[arg(long)]
    output: PathBuf,
    /// Convert even when tensors are missing, unexpected or mis-shaped (missing ones keep
    /// their initial values); prints the full report.
    #[arg(long)]
    allow_partial: bool,
    /// Print every mapped tensor.
    #[arg(long)]
    verbose: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let started = Instant::now();
    let source = Source::read(&cli.input)?;
    let model = match &cli.config {
        Some(path) if path.extension().is_some_and(|e| e == "toml") => ModelFile::load(path)?.model,
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let json = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
            hf_config::model_config(&cli.arch, &json, &path.display().to_string())?
        }
        None => match &source.hf_config {
            Some((path, json)) => hf_config::model_config(&cli.arch, json, &path.display().to_string())?,
            None => bail!(
                "{}: no config.json beside the weights; pass --config",
                cli.input.display()
            ),
        },
    };
    if model.arch() != cli.arch {
        bail!("--config describes a {} model, not --arch {}", model.arch(), cli.arch);
    }
    let (weights, report) = convert(&source, &model, cli.allow_partial)?;
    if cli.verbose || cli.allow_partial {
        for (from, to, transposed) in &report.mapped {
            println!("  {from} -> {to}{}", if *transposed { " (transposed)" } else { "" });
        }
        for name in &report.ignored {
            println!("  ignored: {name}");
        }
    }
    if !report.is_complete() {
        print!("{}", report.details());
    }
    let tokenizer = source.tokenizer.as_deref();
    let hf_json = source.hf_config.as_ref().map(|(p, _)| p.as_path());
    write_model_dir(&cli.output, &model, &weights, hf_json, tokenizer)?;
    println!(
        "converted {} ({}) -> {} | {} arch | {} | {:.2} s",
        cli.input.display(),
        source
            .files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        cli.output.display(),
        model.arch(),
        report.summary(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
