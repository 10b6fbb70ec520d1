//! `infer`: generate text with a language model (one prompt streamed, or a file of
//! prompts as one batch), classify texts or images, or embed texts — with any model
//! directory (`train`, `finetune` or `convert` output).
//!
//! ```text
//! cargo run --release -p infer -- --checkpoint runs/NAME --prompt "ROMEO:" --max-new-tokens 200
//!     [--temperature 0.8] [--top-k 40] [--top-p 0.95] [--seed 1] [--stop "\n\n"] [--backend flex]
//! cargo run --release -p infer -- --checkpoint runs/NAME --prompt-file prompts.txt [--max-batch 16]
//! cargo run --release -p infer -- --checkpoint runs/fashion-mnist-cnn --image shirt.png
//! cargo run --release -p infer -- --checkpoint runs/fashion-mnist-cnn --idx t10k-images-idx3-ubyte.gz --index 0
//! cargo run --release -p infer -- --checkpoint runs/finetune-minilm-sentiment --text "A gem." [--text-file FILE]
//! cargo run --release -p infer -- --checkpoint datasets/pretrained/all-MiniLM-L6-v2-kiln --embed --text "..."
//! ```
//!
//! Everything model-related is in `kiln_infer`; this binary parses arguments and prints.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use kiln_core::layout::WhichWeights;
use kiln_core::{BackendKind, Selected};
use kiln_infer::engine::{ContextFull, Engine, EngineConfig, Request, generate};
use kiln_infer::{LoadedModel, Model, Sampling};
use kiln_models::{CausalLm, Encoder, ImageClassifier, SequenceClassifier};

#[derive(Parser)]
#[command(about = "Generate text, classify texts or images, or embed texts with a Kiln model directory")]
struct Cli {
    /// Model directory: a `train` or `finetune` run, or a `convert` output.
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
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// File with one prompt a line, generated as one batch; prints JSON lines.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    /// Seed of each prompt's own random stream (the same for every prompt of a file, so
    /// a prompt gives what it gives alone).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop when this text is generated (repeatable; not part of the output).
    #[arg(long)]
    stop: Vec<String>,
    /// Do not stop at the model's end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// What a full context does: slide the window (refill from the last half) or stop.
    #[arg(long, value_enum, default_value_t = OnFull::Slide)]
    context_full: OnFull,
    /// Most prompts of --prompt-file decoded together.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Prompt tokens run per model call (default: the whole prompt at once). `serve`
    /// runs prompts in chunks of its --prefill-chunk; the same value here gives what it
    /// gives.
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Prompts of at most this many tokens run inside the batched decode pass, their
    /// rows beside the decoding sequences' (longer ones prefill on their own; 0: every
    /// prompt does). `serve --step-prompt` with the same value gives the same tokens.
    #[arg(long, default_value_t = kiln_infer::engine::STEP_PROMPT)]
    step_prompt: usize,
    /// Re-run the whole sequence for every token instead of using the KV cache (the
    /// reference path: one prompt, no stop conditions).
    #[arg(long)]
    no_cache: bool,

    /// Chat interactively: each line on stdin is a user message, answered in the model's
    /// chat template (from tokenizer_config.json), with the conversation kept.
    #[arg(long, conflicts_with_all = ["prompt", "prompt_file", "messages"])]
    chat: bool,
    /// A system message opening the conversation (--chat, --messages).
    #[arg(long)]
    system: Option<String>,
    /// A conversation as JSON (`[{"role": "user", "content": "..."}, ...]`): prints the
    /// assistant's reply to it.
    #[arg(long, conflicts_with_all = ["prompt", "prompt_file"])]
    messages: Option<PathBuf>,

    /// Perplexity of a language model over this text file (prints the method with it).
    #[arg(long, conflicts_with_all = ["prompt", "prompt_file"])]
    perplexity: Option<PathBuf>,
    /// Tokens per model call for --perplexity (default: min(512, the model's context)).
    #[arg(long)]
    context: Option<usize>,
    /// Window step for --perplexity with --ppl-method sliding (default: context / 2).
    #[arg(long)]
    stride: Option<usize>,
    /// sliding: transformers' guide (overlapping windows, every token scored once);
    /// chunks: llama.cpp's llama-perplexity (BOS-first chunks, second halves scored).
    #[arg(long, value_enum, default_value_t = PplMethod::Sliding)]
    ppl_method: PplMethod,
    /// With --perplexity: also run this model directory (the same tokenizer, e.g. the f32
    /// model a quantized one came from) over the same windows and print the KL divergence
    /// of --model's next-token distributions from it (mean, median, 99th percentile,
    /// max) and how often the two agree on the most likely token, as llama.cpp's
    /// `llama-perplexity --kl-divergence` does.
    #[arg(long, requires = "perplexity")]
    kl_reference: Option<PathBuf>,

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

#[derive(Clone, Copy, ValueEnum)]
enum PplMethod {
    Sliding,
    Chunks,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnFull {
    Slide,
    Stop,
}

/// When the process started (for the cold-start figure: process start to first token).
static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn main() -> Result<()> {
    STARTED.get_or_init(std::time::Instant::now);
    let cli = Cli::parse();
    let backend = Selected::new(cli.backend, cli.device)?;
    let device = backend.device.clone();
    let which = if cli.latest {
        WhichWeights::Latest
    } else {
        WhichWeights::Best
    };
    let loaded = LoadedModel::open(&cli.checkpoint, which, &device)?;
    eprintln!(
        "{} | {} | weights {}",
        loaded.arch(),
        backend.describe(),
        loaded.dir.weights.display()
    );
    if matches!(loaded.model, Model::CausalLm(_)) {
        check_sampling(&cli)?;
    }
    match &loaded.model {
        Model::CausalLm(model) if cli.perplexity.is_some() => perplexity(&cli, &loaded, model.as_ref(), &device),
        Model::CausalLm(model) if cli.chat || cli.messages.is_some() => chat(&cli, &loaded, model.as_ref(), &device),
        Model::CausalLm(model) if cli.prompt_file.is_some() => generate_batch(&cli, &loaded, model.as_ref(), &device),
        Model::CausalLm(model) => generate_one(&cli, &loaded, model.as_ref(), &device),
        Model::ImageClassifier(model) => classify_image(&cli, &loaded, model.as_ref(), &device),
        Model::TextClassifier(model) if cli.embed => embed(&cli, &loaded, model.encoder(), &device),
        Model::TextClassifier(model) => classify_text(&cli, &loaded, model.as_ref(), &device),
        Model::Encoder(model) => embed(&cli, &loaded, model.as_ref(), &device),
    }
}

/// Generate a reply to `ids` (streamed to `out`), stopping at EOS / end of turn; the
/// reply's text.
fn reply(
    cli: &Cli,
    loaded: &LoadedModel,
    model: &dyn CausalLm,
    device: &burn::tensor::Device,
    ids: Vec<u32>,
    out: &mut impl Write,
) -> Result<String> {
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .context("language model without a tokenizer")?;
    if ids.len() >= model.context_len() {
        bail!(
            "the conversation is {} tokens, the model's context is {}: start a new one",
            ids.len(),
            model.context_len()
        );
    }
    let mut engine = Engine::new(model, device, Some(tokenizer), engine_config(cli, model, 1));
    engine.add(request(cli, loaded, ids))?;
    let mut text = String::new();
    engine.run(|event| {
        text.push_str(&event.text);
        let _ = write!(out, "{}", event.text);
        let _ = out.flush();
        true
    })?;
    writeln!(out)?;
    Ok(text)
}

/// `--chat` (a loop over stdin lines, history kept) and `--messages FILE` (one reply).
fn chat(cli: &Cli, loaded: &LoadedModel, model: &dyn CausalLm, device: &burn::tensor::Device) -> Result<()> {
    use kiln_infer::chat::{ChatTemplate, Message};
    let template = ChatTemplate::load(&loaded.dir.dir)?;
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .context("language model without a tokenizer")?;
    let mut messages: Vec<Message> = cli.system.iter().map(|s| Message::new("system", s)).collect();
    let encode = |messages: &[Message]| -> Result<Vec<u32>> {
        let text = template.render(messages, true)?;
        // The template writes the special tokens (BOS included) itself.
        Ok(tokenizer.encode(&text)?)
    };
    let mut out = std::io::stdout().lock();
    if let Some(path) = &cli.messages {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let given: Vec<Message> = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected [{{\"role\": ..., \"content\": ...}}, ...]",
                path.display()
            )
        })?;
        messages.extend(given);
        let ids = encode(&messages)?;
        reply(cli, loaded, model, device, ids, &mut out)?;
        return Ok(());
    }
    eprintln!(
        "chat with {} (one message a line; an empty line or end of input quits)",
        loaded.arch()
    );
    let stdin = std::io::stdin();
    loop {
        write!(out, "> ")?;
        out.flush()?;
        let mut line = String::new();
        if stdin.read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        messages.push(Message::new("user", line.trim_end_matches(['\r', '\n'])));
        let ids = encode(&messages)?;
        let answer = reply(cli, loaded, model, device, ids, &mut out)?;
        messages.push(Message::new("assistant", answer.trim()));
    }
}

/// `--perplexity FILE`: the whole file tokenized (BOS first when the tokenizer adds it),
/// scored by the chosen method; the output says how.
fn perplexity(cli: &Cli, loaded: &LoadedModel, model: &dyn CausalLm, device: &burn::tensor::Device) -> Result<()> {
    use kiln_infer::perplexity::{PerplexityMethod, perplexity};
    let path = cli.perplexity.as_ref().expect("checked by the caller");
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .context("language model without a tokenizer")?;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let ids = tokenizer
        .encode_with_special(&text)
        .with_context(|| format!("encoding {}", path.display()))?;
    let bos = tokenizer.encode_with_special("")?.first().copied();
    let context = cli.context.unwrap_or(model.context_len().min(512));
    let method = match cli.ppl_method {
        PplMethod::Sliding => PerplexityMethod::Sliding {
            context,
            stride: cli.stride.unwrap_or(context / 2),
        },
        PplMethod::Chunks => PerplexityMethod::Chunks { context },
    };
    let started = std::time::Instant::now();
    if let Some(dir) = &cli.kl_reference {
        let reference = LoadedModel::open(dir, WhichWeights::Best, device)
            .with_context(|| format!("loading the --kl-reference model {}", dir.display()))?;
        let Model::CausalLm(reference) = &reference.model else {
            bail!("--kl-reference {}: not a language model", dir.display());
        };
        let d = kiln_infer::perplexity::divergence(model, reference.as_ref(), &ids, method, bos, device)?;
        println!(
            "perplexity {:.4} (reference {:.4}, {:+.3} %)",
            d.model.perplexity,
            d.reference.perplexity,
            (d.model.perplexity / d.reference.perplexity - 1.0) * 100.0
        );
        println!(
            "KL divergence from the reference: mean {:.6}, median {:.6}, 99th percentile {:.6}, max {:.6} nats | same top token {:.3} % | {} positions, {} | {:.1} s",
            d.kl_mean,
            d.kl_median,
            d.kl_p99,
            d.kl_max,
            d.top1_agreement * 100.0,
            d.model.scored,
            d.model.method,
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let p = perplexity(model, &ids, method, bos, device)?;
    let seconds = started.elapsed().as_secs_f64();
    println!("perplexity {:.4}", p.perplexity);
    println!(
        "{} | {} tokens ({}), {} scored in {} windows, each window {} | mean NLL {:.6} nats | {:.1} s ({:.0} tokens/s)",
        p.method,
        p.tokens,
        if bos.is_some() { "BOS first" } else { "no BOS" },
        p.scored,
        p.windows,
        if p.bos_per_window {
            "starting with BOS"
        } else {
            "as the text runs"
        },
        p.nll / p.scored as f64,
        seconds,
        p.scored as f64 / seconds
    );
    Ok(())
}

fn sampling(cli: &Cli) -> Sampling {
    Sampling {
        temperature: cli.temperature,
        top_k: cli.top_k,
        top_p: cli.top_p,
        seed: cli.seed,
    }
}

/// The sampling flags, checked up front so an error names the flag.
fn check_sampling(cli: &Cli) -> Result<()> {
    sampling(cli)
        .validate()
        .map_err(|e| anyhow::anyhow!("--{} {}", e.field.replace('_', "-"), e.message))
}

fn request(cli: &Cli, loaded: &LoadedModel, prompt: Vec<u32>) -> Request {
    Request {
        prompt,
        max_new_tokens: cli.max_new_tokens,
        sampling: sampling(cli),
        eos_token_ids: if cli.ignore_eos {
            Vec::new()
        } else {
            loaded.eos_token_ids.clone()
        },
        stop_strings: cli.stop.clone(),
        logprobs: None,
    }
}

fn engine_config(cli: &Cli, model: &dyn CausalLm, max_batch: usize) -> EngineConfig {
    EngineConfig {
        max_batch,
        // By default the whole prompt in one pass: what a prompt alone gets, in a batch too.
        prefill_chunk: cli.prefill_chunk.unwrap_or(model.context_len()),
        step_prompt: cli.step_prompt,
        context_full: match cli.context_full {
            OnFull::Slide => ContextFull::Slide,
            OnFull::Stop => ContextFull::Stop,
        },
    }
}

/// One prompt, streamed to stdout as it is generated.
fn generate_one(cli: &Cli, loaded: &LoadedModel, model: &dyn CausalLm, device: &burn::tensor::Device) -> Result<()> {
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .context("language model without a tokenizer")?;
    let prompt = cli
        .prompt
        .as_deref()
        .context("--prompt or --prompt-file is required for a language model")?;
    // With the tokenizer's special tokens: BOS first when the model's tokenizer adds it.
    let ids = tokenizer.encode_with_special(prompt).context("encoding --prompt")?;
    let mut out = std::io::stdout().lock();
    write!(out, "{prompt}")?;
    if cli.no_cache {
        if !cli.stop.is_empty() {
            bail!("--no-cache is the reference path without stop conditions: drop --stop");
        }
        let (tokens, stats) = generate(model, &ids, cli.max_new_tokens, &sampling(cli), false, device, |_| {})?;
        writeln!(out, "{}", tokenizer.decode(&tokens)?)?;
        eprintln!(
            "{} prompt tokens, {} new tokens | first token {:.1} ms | {:.1} tokens/s (no cache) | finish_reason length",
            stats.prompt_tokens,
            stats.new_tokens,
            stats.prefill_s * 1e3,
            stats.tokens_per_s(),
        );
        return Ok(());
    }
    let mut engine = Engine::new(model, device, Some(tokenizer), engine_config(cli, model, 1));
    engine.add(request(cli, loaded, ids))?;
    let mut cold = None;
    let done = engine.run(|event| {
        cold.get_or_insert_with(|| STARTED.get().map_or(0.0, |t| t.elapsed().as_secs_f64()));
        let _ = write!(out, "{}", event.text);
        let _ = out.flush();
        true
    })?;
    writeln!(out)?;
    let done = done.into_iter().next().context("the engine finished no sequence")?;
    let why = match (&done.stop_string, done.finish_reason) {
        (Some(stop), _) => format!("stop (stop string {stop:?})"),
        (None, kiln_infer::FinishReason::Stop) => "stop (end-of-sequence token)".into(),
        (None, kiln_infer::FinishReason::Length) => "length".into(),
    };
    eprintln!(
        "{} prompt tokens, {} new tokens | first token {:.1} ms ({:.0} prompt tokens/s) | {:.1} tokens/s (KV cache) | cold start {:.0} ms (process start to first token) | finish_reason {why}",
        done.stats.prompt_tokens,
        done.stats.new_tokens,
        done.stats.prefill_s * 1e3,
        done.stats.prompt_tokens as f64 / done.stats.prefill_s.max(1e-9),
        done.stats.tokens_per_s(),
        cold.unwrap_or(0.0) * 1e3,
    );
    Ok(())
}

/// `--prompt-file`: every line a prompt, generated as one batch, one JSON line each.
fn generate_batch(cli: &Cli, loaded: &LoadedModel, model: &dyn CausalLm, device: &burn::tensor::Device) -> Result<()> {
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .context("language model without a tokenizer")?;
    let path = cli.prompt_file.as_ref().expect("checked by the caller");
    let content = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let prompts: Vec<&str> = content.lines().collect();
    if prompts.is_empty() {
        bail!("{}: no prompts (one a line)", path.display());
    }
    let mut engine = Engine::new(model, device, Some(tokenizer), engine_config(cli, model, cli.max_batch));
    for (i, prompt) in prompts.iter().enumerate() {
        let ids = tokenizer
            .encode_with_special(prompt)
            .with_context(|| format!("{}:{}: encoding the prompt", path.display(), i + 1))?;
        engine
            .add(request(cli, loaded, ids))
            .with_context(|| format!("{}:{}", path.display(), i + 1))?;
    }
    let started = std::time::Instant::now();
    let done = engine.run(|_| true)?;
    let elapsed = started.elapsed().as_secs_f64();
    let mut out = std::io::stdout().lock();
    let mut new_tokens = 0;
    for (prompt, c) in prompts.iter().zip(&done) {
        new_tokens += c.tokens.len();
        let line = serde_json::json!({
            "prompt": prompt,
            "text": c.text,
            "tokens": c.tokens,
            "finish_reason": c.finish_reason.as_str(),
            "stop": c.stop_string,
            "prompt_tokens": c.stats.prompt_tokens,
            "new_tokens": c.stats.new_tokens,
        });
        writeln!(out, "{line}")?;
    }
    // Decode alone: tokens after each sequence's first, over the longest decode time.
    let decoded: usize = done.iter().map(|c| c.stats.new_tokens.saturating_sub(1)).sum();
    let decode_s = done.iter().map(|c| c.stats.decode_s).fold(0.0, f64::max);
    eprintln!(
        "{} prompts, {new_tokens} new tokens in {elapsed:.2} s ({:.1} tokens/s, batch up to {}; decode {:.1} tokens/s)",
        prompts.len(),
        new_tokens as f64 / elapsed.max(1e-9),
        cli.max_batch,
        decoded as f64 / decode_s.max(1e-9),
    );
    Ok(())
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
    loaded: &LoadedModel,
    model: &dyn SequenceClassifier,
    device: &burn::tensor::Device,
) -> Result<()> {
    let tokenizer = loaded.tokenizer.as_ref().context("classifier without a tokenizer")?;
    let texts = input_texts(cli)?;
    let refs: Vec<&str> = texts.iter().map(|(t, _)| t.as_str()).collect();
    let max_len = loaded.classifier_max_length(model);
    let started = std::time::Instant::now();
    let predictions = kiln_infer::classify::classify_texts(model, tokenizer, &refs, max_len, 32, device)?;
    if predictions.truncated > 0 {
        eprintln!(
            "warning: {} text(s) were longer than {max_len} tokens and were cut",
            predictions.truncated
        );
    }
    let mut out = std::io::stdout().lock();
    for ((text, _), p) in texts.iter().zip(&predictions.probabilities) {
        let best = kiln_infer::classify::argmax(p);
        let probabilities: serde_json::Map<String, serde_json::Value> = (0..p.len())
            .map(|k| (loaded.label(k), serde_json::json!(p[k])))
            .collect();
        let line = serde_json::json!({ "text": text, "label": loaded.label(best), "probabilities": probabilities });
        writeln!(out, "{line}")?;
    }
    eprintln!(
        "{} texts classified in {:.1} ms",
        texts.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

fn embed(cli: &Cli, loaded: &LoadedModel, model: &dyn Encoder, device: &burn::tensor::Device) -> Result<()> {
    let tokenizer = loaded.tokenizer.as_ref().context("encoder without a tokenizer")?;
    if !cli.embed {
        bail!(
            "a {} model gives sentence embeddings: pass --embed with --text \"...\"",
            loaded.arch()
        );
    }
    let texts = input_texts(cli)?;
    let texts: Vec<&str> = texts.iter().map(|(t, _)| t.as_str()).collect();
    let started = std::time::Instant::now();
    let embeddings = kiln_infer::embed::embed_texts(model, tokenizer, &texts, 32, device)?;
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
    use kiln_infer::classify::{image_from_idx, image_from_png};
    match (&cli.image, &cli.idx) {
        (Some(path), _) => Ok((image_from_png(path, shape)?, path.display().to_string())),
        (None, Some(path)) => Ok((
            image_from_idx(path, cli.index, shape)?,
            format!("{}[{}]", path.display(), cli.index),
        )),
        (None, None) => bail!("pass --image FILE.png or --idx FILE --index N for an image model"),
    }
}

fn classify_image(
    cli: &Cli,
    loaded: &LoadedModel,
    model: &dyn ImageClassifier,
    device: &burn::tensor::Device,
) -> Result<()> {
    let (pixels, name) = load_image(cli, model.input_shape())?;
    let probs = kiln_infer::classify::classify_image(model, &pixels, device);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    println!("{name}:");
    for &k in order.iter().take(cli.top) {
        println!("  {:>6.2}%  {} ({k})", probs[k] * 100.0, loaded.label(k));
    }
    Ok(())
}
