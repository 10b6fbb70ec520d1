//! `serve`: one model directory (any `train`, `finetune` or `convert` output) behind an
//! OpenAI-compatible HTTP API, with continuous batching.
//!
//! ```text
//! cargo run --release -p serve -- --model DIR [--backend flex|ndarray|tch|wgpu] [--host 127.0.0.1]
//!     [--port 8080] [--max-batch 16] [--max-queue 256] [--api-key KEY | --api-key-file F] [--threads N]
//! ```
//!
//! Endpoints: `POST /v1/completions`, `/v1/chat/completions` (language models),
//! `/v1/embeddings`, `/v1/classify` (encoders), `GET /v1/models`, `/health`, `/metrics`.
//! Everything is in `kiln_serve`; this binary parses arguments.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use kiln_core::BackendKind;
use kiln_serve::ServeConfig;

#[derive(Parser)]
#[command(about = "Serve a Kiln model directory over an OpenAI-compatible HTTP API")]
struct Cli {
    /// Model directory: a `train` or `finetune` run, or a `convert` output.
    #[arg(long)]
    model: PathBuf,
    /// The name clients pass as `model` (default: the directory's name).
    #[arg(long)]
    model_name: Option<String>,
    #[arg(long, default_value = "flex")]
    backend: BackendKind,
    #[arg(long, default_value_t = 0)]
    device: usize,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (printed on stderr).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Most sequences decoded together (continuous batching).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Most sequences waiting for a batch slot; beyond it requests get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Prompt tokens per prefill chunk, interleaved with decode steps (`infer
    /// --prefill-chunk` with the same value gives the same tokens).
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// Prompts of at most this many tokens join the batched decode pass whole, their
    /// rows beside the running sequences' (longer ones prefill in chunks; 0: every
    /// prompt does). `infer --step-prompt` with the same value gives the same tokens.
    #[arg(long, default_value_t = kiln_serve::STEP_PROMPT)]
    step_prompt: usize,
    /// Padded tokens per embeddings/classification batch.
    #[arg(long, default_value_t = 16384)]
    batch_tokens: usize,
    /// Require `Authorization: Bearer KEY` on /v1/*.
    #[arg(long, conflicts_with = "api_key_file")]
    api_key: Option<String>,
    /// Read the API key from this file (its first line).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Largest request body, in bytes (413 beyond).
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Seconds a request may run before it is cut (504, or its stream ends).
    #[arg(long, default_value_t = 600)]
    request_timeout: u64,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 30)]
    shutdown_deadline: u64,
    /// CPU threads for the CPU backends (default: all cores).
    #[arg(long)]
    threads: Option<NonZeroUsize>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let api_key = match (&cli.api_key, &cli.api_key_file) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(path)) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading --api-key-file {}", path.display()))?;
            let key = text.lines().next().unwrap_or("").trim().to_string();
            if key.is_empty() {
                bail!("--api-key-file {}: the file is empty", path.display());
            }
            Some(key)
        }
        (None, None) => None,
    };
    if cli.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if !cli.model.is_dir() {
        bail!("--model {}: not a directory", cli.model.display());
    }
    let config = ServeConfig {
        model_dir: cli.model,
        model_name: cli.model_name,
        backend: cli.backend,
        device_index: cli.device,
        host: cli.host,
        port: cli.port,
        max_batch: cli.max_batch,
        max_queue: cli.max_queue,
        prefill_chunk: cli.prefill_chunk.max(1),
        step_prompt: cli.step_prompt,
        batch_tokens: cli.batch_tokens.max(1),
        api_key,
        max_body_bytes: cli.max_body_bytes,
        request_timeout: Duration::from_secs(cli.request_timeout.max(1)),
        shutdown_deadline: Duration::from_secs(cli.shutdown_deadline),
        threads: cli.threads,
    };
    // The runtime only moves bytes; the model runs on its own thread.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(kiln_serve::serve(config))?;
    Ok(())
}
