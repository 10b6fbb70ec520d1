//! `convert`: turn a checkpoint trained elsewhere into a Kiln model directory
//! (`model.safetensors` + `config.toml` [+ `config.json`, `tokenizer.json`]) that
//! `infer` and `finetune` take as is.
//!
//! ```text
//! cargo run --release -p convert -- --input PATH [--arch gpt2|llama|gemma3|bert|roberta|mlp|cnn]
//!     [--config config.json|config.toml] --output DIR [--allow-partial]
//! ```
//! PATH: a `.safetensors`, `.pt`/`.pth`/`.bin`, `.onnx` or `.gguf` file, or a Hugging Face
//! directory. An ONNX file's weights are placed by their role in its graph (BERT,
//! RoBERTa, GPT-2, Llama and Gemma 3 graphs, told apart by their structure; renamed and
//! pre-transposed initializers, FP16, external data and onnxruntime's dynamic int8 are
//! read), and its config is read off the graph unless a `config.json` lies beside it. The
//! architecture comes from the Hugging Face `config.json` (`model_type`, else
//! `architectures`) unless `--arch` overrides it; a file without one needs `--arch`.
//!
//! The reverse direction: `--to hf --input KILN_DIR --output DIR` writes Hugging Face
//! names and layouts (`model.safetensors`, `config.json`) that `transformers` loads.
//!
//! `--quantize q8_0|q4_0|q4_1 --input KILN_DIR --output DIR [--keep REGEX]...` packs the
//! linear weights (and a language model's token embedding) of a Kiln model directory
//! in GGUF blocks (`kiln_convert::quantize`), which `infer` runs on Kiln's quantized
//! kernels. `--keep-quantized` with a `.gguf` input keeps the file's own Q8_0/Q4_0/Q4_1/
//! Q5_0 blocks packed the same way, byte for byte, and its Q4_K/Q6_K ones as 32-value
//! blocks of the same values, instead of dequantizing them.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use kiln_convert::{Source, StoreDtype, convert_from, hf_config, write_model_dir_with};
use kiln_core::ModelFile;
use kiln_core::layout::{CONFIG, HF_CONFIG, MODEL_WEIGHTS, TOKENIZER, WhichWeights, weights_file};
use kiln_models::ModelConfig;

#[derive(Parser)]
#[command(about = "Convert PyTorch / safetensors / Hugging Face checkpoints into Kiln model directories")]
struct Cli {
    /// Checkpoint file or Hugging Face model directory.
    #[arg(long)]
    input: PathBuf,
    /// Target architecture (default: detected from the Hugging Face config.json; --to hf
    /// reads it from the Kiln directory).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(ModelConfig::ARCHITECTURES.iter().copied()))]
    arch: Option<String>,
    /// `hf`: convert a Kiln model directory back to Hugging Face names and layouts.
    #[arg(long, value_parser = ["hf"])]
    to: Option<String>,
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
    /// Pack the weights of the Kiln model directory --input in this GGUF block format.
    #[arg(long, value_parser = ["q8_0", "q4_0", "q4_1"])]
    quantize: Option<String>,
    /// With --quantize: keep the modules whose path matches this regex f32 (repeatable).
    #[arg(long, requires = "quantize")]
    keep: Vec<String>,
    /// With a .gguf --input: keep the file's Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/Q6_K weights packed
    /// (Q4_K and Q6_K as 32-value blocks of the same values) instead of dequantizing them
    /// to f32; tensors in other types are dequantized (each listed with its reason).
    #[arg(long, conflicts_with_all = ["quantize", "to"])]
    keep_quantized: bool,
    /// The float type of the converted weights: f32 (what Kiln computes in), or f16 /
    /// bf16 to keep a half-precision checkpoint at half the size (loaded as f32). Every
    /// cast is counted in the report.
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    dtype: String,
}

fn quantize(cli: &Cli, ty: &str) -> Result<()> {
    let started = Instant::now();
    let ty = kiln_kernels::quant::QuantType::from_name(ty).expect("clap checked the name");
    if !cli.input.join(CONFIG).is_file() {
        bail!(
            "{}: --quantize takes a Kiln model directory (no {CONFIG} here); convert the checkpoint first",
            cli.input.display()
        );
    }
    let keep = cli
        .keep
        .iter()
        .map(|k| regex::Regex::new(k).with_context(|| format!("--keep {k:?}: not a regex")))
        .collect::<Result<Vec<_>>>()?;
    let report = kiln_convert::quantize::quantize_dir(&cli.input, &cli.output, ty, &keep)?;
    for (module, reason) in &report.kept {
        println!("  kept f32: {module} ({reason})");
    }
    let [before, after] = report.bytes;
    println!(
        "quantized {} -> {} | {} weights packed as {} | {:.1} MB -> {:.1} MB | {:.2} s",
        cli.input.display(),
        cli.output.display(),
        report.packed.len(),
        ty.name(),
        before as f64 / 1e6,
        after as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn to_hf(cli: &Cli) -> Result<()> {
    let started = Instant::now();
    let file = ModelFile::load(&cli.input.join(CONFIG))?;
    if file.quantization.is_some() {
        bail!(
            "{}: packed (quantized) weights have no Hugging Face form here; export the f32 model directory",
            cli.input.join(CONFIG).display()
        );
    }
    let (model, head) = (file.model, file.head);
    let weights = weights_file(&cli.input, WhichWeights::Best);
    let bytes = std::fs::read(&weights).with_context(|| format!("reading {}", weights.display()))?;
    let hf = kiln_convert::export_hf(&bytes, &model, head.as_ref())?;
    let config = serde_json::to_vec_pretty(&hf_config::to_hf_json_with(&model, head.as_ref())?)?;
    let tokenizer = std::fs::read(cli.input.join(TOKENIZER)).ok();
    let mut files: Vec<(&str, &[u8])> = vec![(MODEL_WEIGHTS, &hf), (HF_CONFIG, &config)];
    if let Some(t) = &tokenizer {
        files.push((TOKENIZER, t));
    }
    kiln_convert::write_dir_atomically(&cli.output, &files)?;
    println!(
        "exported {} ({}) -> {} with Hugging Face names | {:.2} s",
        weights.display(),
        model.arch(),
        cli.output.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.to.is_some() {
        return to_hf(&cli);
    }
    if let Some(ty) = &cli.quantize {
        return quantize(&cli, ty);
    }
    let started = Instant::now();
    let mut source = Source::read_for(&cli.input, cli.keep_quantized, cli.arch.as_deref())?;
    for note in &source.notes {
        println!("{note}");
    }
    // A Hugging Face config: the --arch given, else the one it names.
    let from_json = |json: &serde_json::Value, path: &std::path::Path| match &cli.arch {
        Some(arch) => hf_config::model_config(arch, json, &path.display().to_string()),
        None => hf_config::detect_model_config(json, &path.display().to_string()),
    };
    // The model and, for a task model (`BertForSequenceClassification`), its head.
    let with_head = |json: &serde_json::Value, path: &std::path::Path| -> Result<_> {
        let model = from_json(json, path)?;
        let head = hf_config::head(json, &model, &path.display().to_string())?;
        Ok((model, head, path.display().to_string()))
    };
    let (mut model, head, config_path) = match &cli.config {
        Some(path) if path.extension().is_some_and(|e| e == "toml") => {
            let file = ModelFile::load_strict(path)?;
            (file.model, file.head, path.display().to_string())
        }
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let json = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
            with_head(&json, path)?
        }
        None => match &source.hf_config {
            Some((path, json)) => with_head(json, path)?,
            None => bail!(
                "{}: no config.json beside the weights; pass --config (and --arch)",
                cli.input.display()
            ),
        },
    };
    if let Some(h) = &head {
        println!(
            "classifier head: {} labels ({}), {:?} pooling (from {config_path})",
            h.labels.len(),
            h.labels.join(", "),
            h.pooling
        );
    }
    if let Some(arch) = &cli.arch
        && model.arch() != arch
    {
        bail!("--config describes a {} model, not --arch {arch}", model.arch());
    }
    if let Some(line) = kiln_convert::apply_sentence_pooling(&cli.input, &mut model)? {
        println!("{line}");
    }
    let dtype = StoreDtype::from_name(&cli.dtype).expect("clap checked the name");
    if dtype != StoreDtype::F32 && cli.keep_quantized {
        bail!(
            "--dtype {} with --keep-quantized: packed weights are stored f32 beside their blocks",
            cli.dtype
        );
    }
    // The source's tensors are taken out as they are mapped (one copy of the weights).
    let (weights, report) = convert_from(&mut source, &model, head.as_ref(), cli.allow_partial, dtype)?;
    for (cast, n) in &report.casts {
        println!("  cast {cast}: {n} tensors");
    }
    for (from, to, transposed) in &report.mapped {
        println!("  {from} -> {to}{}", if *transposed { " (transposed)" } else { "" });
    }
    for name in &report.ignored {
        println!("  ignored: {name}");
    }
    if !report.is_complete() {
        print!("{}", report.details());
    }
    if !report.wrappers.is_empty() {
        println!("  wrapper prefixes stripped: {}", report.wrappers.join(", "));
    }
    for name in &report.absent {
        println!("  not in the source (initial values kept): {name}");
    }
    let (weights, quantization) = if cli.keep_quantized {
        let (packed, plan, q) =
            kiln_convert::quantize::keep_gguf_blocks(&weights, &cli.input, &model, &source.packed, &report.mapped)?;
        for (module, ty, [rows, cols]) in &q.packed {
            println!("  kept {} blocks: {module} [{rows}, {cols}]", ty.name());
        }
        for (module, why) in &q.kept {
            println!("  f32: {module}: {why}");
        }
        println!(
            "kept {} weights in their GGUF blocks, {} in f32 | {:.1} MB -> {:.1} MB",
            q.packed.len(),
            q.kept.len(),
            q.bytes[0] as f64 / 1e6,
            q.bytes[1] as f64 / 1e6
        );
        (packed, (!plan.tensors.is_empty()).then_some(plan))
    } else {
        (weights, None)
    };
    let tokenizer = source.tokenizer.as_deref();
    let hf_json = source.hf_config.as_ref().map(|(p, _)| p.as_path());
    // A GGUF's config.json and tokenizer files are made from its metadata.
    let hf_json = hf_json.filter(|_| source.extra_files.is_empty());
    let file = ModelFile {
        model: model.clone(),
        head,
        quantization,
    };
    write_model_dir_with(&cli.output, &file, &weights, hf_json, tokenizer, &source.extra_files)?;
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
