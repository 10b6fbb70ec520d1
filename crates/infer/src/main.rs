//! `infer`: sample text from a trained language model (KV-cached, streamed), or
//! classify images with a trained image model.
//!
//! ```text
//! cargo run --release -p infer -- --checkpoint runs/NAME --prompt "ROMEO:" --max-new-tokens 200
//!     [--temperature 0.8] [--top-k 40] [--top-p 0.95] [--seed 1] [--backend flex]
//! cargo run --release -p infer -- --checkpoint runs/fashion-mnist-cnn --image shirt.png
//! cargo run --release -p infer -- --checkpoint runs/fashion-mnist-cnn --idx t10k-images-idx3-ubyte.gz --index 0
//! cargo run --release -p infer -- --checkpoint runs/finetune-minilm-sentiment --text "A gem." [--text-file FILE]
//! cargo run --release -p infer -- --checkpoint datasets/pretrained/all-MiniLM-L6-v2-kiln --embed --text "..."
//! ```
//!
//! Text classifiers (a `finetune` run with `task = "classify"`) print one JSON line per
//! text: `{"text", "label", "probabilities": {label: p}}`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use clap::Parser;
use kiln_data::Tokenizer;
use kiln_models::{CausalLm, ImageClassifier, ModelConfig};
use kiln_runtime::generate::{Sampling, generate};
use kiln_runtime::run::LoadedRun;
use kiln_runtime::{BackendKind, Selected};

#[derive(Parser)]
#[command(about = "Generate text or classify images with a trained Kiln model")]
struct Cli {
    /// Run directory written by `train` (config.toml, weights, tokenizer).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Use model.safetensors (latest) instead of best.safetensors.
    #[arg(long)]
    latest: bool,
    #[arg(long, default_value = "flex")]
    backend: BackendKind,
    #[arg(long, default_value_t = 0)]
    device: usize,

    /// Text to continue (language models).
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Re-run the whole sequence for every token instead of using the KV cache.
    #[arg(long)]
    no_cache: bool,

    /// Text to classify or embed (encoder models; repeatable).
    #[arg(long)]
    text: Vec<String>,
    /// File with one text a line to classify or embed (encoder models).
    #[arg(long)]
    text_file: Option<PathBuf>,
    /// Print sentence embeddings (encoder models) as JSON lines.
    #[arg(long)]
    embed: bool,

    /// PNG image to classify (image models).
    #[arg(long)]
    image: Option<PathBuf>,
    /// IDX image file to classify from (image models), with --index.
    #[arg(long)]
    idx: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    index: usize,
    /// How many classes to print.
    #[arg(long, default_value_t = 3)]
    top: usize,
}

/// Fashion-MNIST class names, used when a model has exactly ten classes.
const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

fn main() -> Result<()> {
    let cli = Cli::parse();
    let run = LoadedRun::open(&cli.checkpoint, cli.latest)?;
    let backend = Selected::new(cli.backend, cli.device)?;
    let device = backend.device.clone();
    eprintln!(
        "{} | {} | weights {}",
        run.model.arch(),
        backend.describe(),
        run.weights.display()
    );
    match &run.model {
        ModelConfig::Gpt2(c) => sample_text(&cli, &run, run.load_model(|| c.init(&device))?, &device),
        ModelConfig::Llama(c) => sample_text(&cli, &run, run.load_model(|| c.init(&device))?, &device),
        ModelConfig::Mlp(c) => classify(&cli, run.load_model(|| c.init(&device))?, &device),
        ModelConfig::Cnn(c) => classify(&cli, run.load_model(|| c.init(&device))?, &device),
        ModelConfig::Bert(c) => match &run.head {
            Some(head) => {
                let model = run.load_model(|| head.init(c.init(&device), &device))?;
                classify_text(&cli, &run, head, model, &device)
            }
            None => embed(&cli, &run, run.load_model(|| c.init(&device))?, &device),
        },
    }
}

/// The texts of `--text` and `--text-file` (one a line), each with where it came from.
fn input_texts(cli: &Cli) -> Result<Vec<(String, String)>> {
    let mut texts: Vec<(String, String)> = cli
        .text
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), format!("--text #{}", i + 1)))
        .collect();
    if let Some(path) = &cli.text_file {
        let content = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        for (i, line) in content.lines().enumerate() {
            texts.push((line.to_string(), format!("{}:{}", path.display(), i + 1)));
        }
    }
    if texts.is_empty() {
        bail!("pass --text \"...\" (repeatable) or --text-file FILE (one text a line)");
    }
    if let Some((_, place)) = texts.iter().find(|(t, _)| t.trim().is_empty()) {
        bail!("{place}: the text is empty");
    }
    Ok(texts)
}

fn classify_text(
    cli: &Cli,
    run: &LoadedRun,
    head: &kiln_models::ClassifierHead,
    model: kiln_models::BertForSequenceClassification,
    device: &Device,
) -> Result<()> {
    if cli.embed {
        return embed(cli, run, model.bert, device);
    }
    let tokenizer = run.tokenizer.as_ref().context("classifier without a tokenizer")?;
    let texts = input_texts(cli)?;
    let examples: Vec<kiln_data::Example> = texts
        .iter()
        .enumerate()
        .map(|(i, (text, _))| kiln_data::Example {
            text: text.clone(),
            label: 0,
            line: i as u64 + 1,
        })
        .collect();
    let max_len = head.max_length.unwrap_or_else(|| model.bert.max_positions());
    let started = std::time::Instant::now();
    let (split, truncated) = kiln_data::EncodedSplit::encode(
        &examples,
        std::path::Path::new("input"),
        tokenizer,
        max_len,
        kiln_data::Truncation::Warn,
    )?;
    if truncated > 0 {
        eprintln!("warning: {truncated} text(s) were longer than {max_len} tokens and were cut");
    }
    let (probs, _) = kiln_runtime::task::predict(&model, &split, 32, device);
    let mut out = std::io::stdout().lock();
    for ((text, _), p) in texts.iter().zip(&probs) {
        let best = kiln_runtime::task::argmax(p);
        let probabilities: serde_json::Map<String, serde_json::Value> = head
            .labels
            .iter()
            .zip(p)
            .map(|(l, &v)| (l.clone(), serde_json::json!(v)))
            .collect();
        let line = serde_json::json!({ "text": text, "label": head.labels[best], "probabilities": probabilities });
        writeln!(out, "{line}")?;
    }
    eprintln!(
        "{} texts classified in {:.1} ms",
        texts.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

fn sample_text<M: CausalLm>(cli: &Cli, run: &LoadedRun, model: M, device: &Device) -> Result<()> {
    let tokenizer: &Tokenizer = run.tokenizer.as_ref().context("language model without a tokenizer")?;
    let prompt = cli
        .prompt
        .as_deref()
        .context("--prompt is required for a language model")?;
    let ids = tokenizer.encode(prompt).context("encoding --prompt")?;
    let sampling = Sampling {
        temperature: cli.temperature,
        top_k: cli.top_k,
        top_p: cli.top_p,
        seed: cli.seed,
    };
    let mut out = std::io::stdout().lock();
    write!(out, "{prompt}")?;
    // Stream: decode the whole continuation and print what is new, so multi-byte
    // tokens of a byte-level BPE print once they form whole characters.
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let (_, stats) = generate(
        &model,
        &ids,
        cli.max_new_tokens,
        &sampling,
        !cli.no_cache,
        device,
        |token| {
            generated.push(token);
            if let Ok(text) = tokenizer.decode(&generated)
                && !text.ends_with('\u{FFFD}')
                && text.len() > printed
            {
                let _ = write!(out, "{}", &text[printed..]);
                let _ = out.flush();
                printed = text.len();
            }
        },
    )?;
    writeln!(out)?;
    eprintln!(
        "{} prompt tokens, {} new tokens | first token {:.1} ms | {:.1} tokens/s ({})",
        stats.prompt_tokens,
        stats.new_tokens,
        stats.prefill_s * 1e3,
        stats.tokens_per_s(),
        if cli.no_cache { "no cache" } else { "KV cache" }
    );
    Ok(())
}

fn embed(cli: &Cli, run: &LoadedRun, model: kiln_models::BertModel, device: &Device) -> Result<()> {
    let tokenizer = run.tokenizer.as_ref().context("encoder without a tokenizer")?;
    if !cli.embed {
        bail!(
            "a {} model gives sentence embeddings: pass --embed with --text \"...\"",
            run.model.arch()
        );
    }
    let texts = input_texts(cli)?;
    let texts: Vec<&str> = texts.iter().map(|(t, _)| t.as_str()).collect();
    let started = std::time::Instant::now();
    let embeddings = kiln_runtime::embed::embed_texts(&model, tokenizer, &texts, 32, device)?;
    for (text, e) in texts.iter().zip(&embeddings) {
        println!("{}", serde_json::json!({ "text": text, "embedding": e }));
    }
    eprintln!(
        "{} texts embedded in {:.1} ms",
        texts.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

fn load_image(cli: &Cli, shape: [usize; 3]) -> Result<(Vec<u8>, String)> {
    let [c, h, w] = shape;
    if let Some(path) = &cli.image {
        let img = image::open(path).with_context(|| format!("{}: cannot read image", path.display()))?;
        let gray = img.to_luma8();
        if c != 1 {
            bail!("the model expects {c} channels; only grayscale PNG input is supported");
        }
        let resized = image::imageops::resize(&gray, w as u32, h as u32, image::imageops::FilterType::Triangle);
        return Ok((resized.into_raw(), path.display().to_string()));
    }
    if let Some(path) = &cli.idx {
        let array = kiln_data::idx::read(path)?;
        if array.dims.len() != 3 || array.dims[1] != h || array.dims[2] != w {
            bail!(
                "{}: holds images {:?}, the model expects [N, {h}, {w}]",
                path.display(),
                array.dims
            );
        }
        if cli.index >= array.dims[0] {
            bail!(
                "--index {} is out of range: {} holds {} images",
                cli.index,
                path.display(),
                array.dims[0]
            );
        }
        let n = h * w;
        return Ok((
            array.data[cli.index * n..(cli.index + 1) * n].to_vec(),
            format!("{}[{}]", path.display(), cli.index),
        ));
    }
    bail!("pass --image FILE.png or --idx FILE --index N for an image model")
}

fn classify<M: ImageClassifier>(cli: &Cli, model: M, device: &Device) -> Result<()> {
    let [c, h, w] = model.input_shape();
    let (pixels, name) = load_image(cli, [c, h, w])?;
    let split = kiln_data::ImageSplit {
        pixels,
        labels: vec![0],
        height: h,
        width: w,
    };
    let batch = split.batch(&[0], device);
    let logits = model.forward(batch.images);
    let probs: Vec<f32> = burn::tensor::activation::softmax(logits, 1)
        .into_data()
        .try_into_vec::<f32>()?;
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    println!("{name}:");
    for &k in order.iter().take(cli.top) {
        let label = if probs.len() == FASHION_CLASSES.len() {
            FASHION_CLASSES[k].to_string()
        } else {
            format!("class {k}")
        };
        println!("  {:>6.2}%  {label} ({k})", probs[k] * 100.0);
    }
    Ok(())
}
