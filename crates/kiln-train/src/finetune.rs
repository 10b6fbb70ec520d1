//! Fine-tuning: start from a model directory (a `train` run or a `convert` output), add a
//! head where the task needs one, choose what trains (`full`, `frozen` backbone, `lora`
//! adapters, layers frozen by pattern, per-group learning rates) and train with the same
//! loop, checkpoints and metrics as `train`.
//!
//! ```toml
//! init_from = "datasets/pretrained/all-MiniLM-L6-v2/kiln"
//! task = "classify"            # or "lm"
//! method = "lora"              # "full" | "frozen" | "lora"
//! freeze = ["^bert\\.embeddings\\."]   # regexes over parameter paths (full, lora)
//! max_length = 128
//! truncation = "warn"          # or "error"
//! [head]                       # classify only
//! pooling = "mean"             # or "cls"
//! dropout = 0.1
//! [lora]
//! rank = 8
//! alpha = 16.0
//! targets = ["query", "value"] # regexes over the paths of 2-D weights
//! [data] / [train] / [optim]   # as for `train`; classify takes kind = "csv"
//! ```
//!
//! A run directory holds what a `train` run holds, with `config.toml` describing the
//! fine-tuned model (`[model]`, and `[head]` for a classifier) so that `infer` opens it,
//! `finetune.toml` (the resolved fine-tuning config, read by `--resume`), and
//! `finetune.json` (test metrics, timings, what was trained).

use std::path::{Path, PathBuf};

use burn::module::{Lora, Module, ModuleVisitor, Param, ParamGroup};
use burn::store::ModuleSnapshot;
use burn::tensor::{Device, Tensor};
use kiln_data::{DataConfig, EncodedSplit, LabeledTexts, LoadReport, Tokenizer, Truncation};
use kiln_models::{BertForSequenceClassification, ClassifierHead, ModelConfig, ModelKind, Pooling};
use serde::{Deserialize, Serialize};

use kiln_core::Selected;
use kiln_core::config::{ConfigError, ModelFile, invalid, parse_toml, read_text};
use kiln_core::io::atomic_write;
use kiln_core::layout::{
    BEST_WEIGHTS, CONFIG, GENERATION_CONFIG, HF_CONFIG, ModelDir, RunInfo, TOKENIZER, TOKENIZER_CONFIG, WhichWeights,
};
use kiln_core::rng::{seeded_init, with_rng_lock};
use kiln_core::sys::peak_rss_mib;
use kiln_core::weights::load_weights;
use kiln_infer::classify::{argmax, predict};

use crate::config::{OptimConfig, Recipe, RunConfig, TrainConfig};
use crate::run::{Prepared, RunError};
use crate::task::{ClassMetrics, ClassifyTask, Task};
use crate::training::{TrainOptions, TrainSummary, train};

/// The resolved fine-tuning config a run directory keeps (for `--resume`).
pub const FINETUNE_FILE: &str = "finetune.toml";
/// Test metrics and timings of a finished run.
pub const REPORT_FILE: &str = "finetune.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinetuneTask {
    /// Sequence classification: an encoder plus a linear head on its pooled output.
    Classify,
    /// Continue language-model training on new text.
    Lm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every parameter trains (minus `freeze` patterns).
    #[default]
    Full,
    /// Only the head trains.
    Frozen,
    /// LoRA adapters on the `lora.targets` weights (and the head) train; the rest is frozen.
    Lora,
}

fn d_rank() -> usize {
    8
}
fn d_alpha() -> f64 {
    16.0
}
fn d_targets() -> Vec<String> {
    vec!["query".into(), "value".into()]
}
fn d_max_length() -> usize {
    128
}
fn d_head_dropout() -> f64 {
    0.1
}

/// `[lora]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    #[serde(default = "d_rank")]
    pub rank: usize,
    /// The adapter's output is scaled by `alpha / rank`.
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter's input. Burn's LoRA is a weight reparameterization
    /// (`W + scale * A B`), which has no separate adapter input to drop: only 0 is accepted.
    #[serde(default)]
    pub dropout: f64,
    /// Regexes over parameter paths; every matching 2-D weight gets an adapter.
    #[serde(default = "d_targets")]
    pub targets: Vec<String>,
}

impl Default for LoraSettings {
    fn default() -> Self {
        toml::from_str("").expect("every lora field has a default")
    }
}

/// `[head]` (classify).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadSettings {
    #[serde(default)]
    pub pooling: Pooling,
    #[serde(default = "d_head_dropout")]
    pub dropout: f64,
}

impl Default for HeadSettings {
    fn default() -> Self {
        toml::from_str("").expect("every head field has a default")
    }
}

/// A whole fine-tuning config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// A model directory: a `train` run or a `convert` output.
    pub init_from: PathBuf,
    pub task: FinetuneTask,
    #[serde(default)]
    pub method: Method,
    /// Regexes over parameter paths that stay frozen (`full` and `lora`).
    #[serde(default)]
    pub freeze: Vec<String>,
    #[serde(default)]
    pub lora: LoraSettings,
    #[serde(default)]
    pub head: HeadSettings,
    /// Longest input in tokens (classify), special tokens included.
    #[serde(default = "d_max_length")]
    pub max_length: usize,
    /// `"warn"`: cut longer texts and count them; `"error"`: refuse them.
    #[serde(default)]
    pub truncation: Truncation,
    pub data: DataConfig,
    pub train: TrainConfig,
    #[serde(default)]
    pub optim: OptimConfig,
}

/// Seeds the draw of LoRA's factors, apart from every training step's stream.
const LORA_INIT_STREAM: u64 = 0x4C6F_5241_0000_0000;

/// The path of the classifier head's parameters.
const HEAD_PATTERN: &str = r"^classifier\.";

impl FinetuneConfig {
    /// Read `path`, apply `--set` overrides, validate.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let cfg: Self = parse_toml(&read_text(path)?, path, overrides)?;
        cfg.validate().map_err(|m| invalid(path, m))?;
        Ok(cfg)
    }

    /// Check the values types cannot express; the message starts with the key.
    pub fn validate(&self) -> Result<(), String> {
        self.data.validate().map_err(|e| e.to_string())?;
        self.train.validate()?;
        self.optim.validate()?;
        match (self.task, &self.data) {
            (FinetuneTask::Classify, DataConfig::Csv { .. }) | (FinetuneTask::Lm, DataConfig::Text { .. }) => {}
            (FinetuneTask::Classify, _) => return Err("data.kind: task = \"classify\" takes kind = \"csv\"".into()),
            (FinetuneTask::Lm, _) => return Err("data.kind: task = \"lm\" takes kind = \"text\"".into()),
        }
        if self.method == Method::Frozen && self.task == FinetuneTask::Lm {
            return Err(
                "method: \"frozen\" trains only a task head and a language model has none; \
                 use method = \"full\" with freeze = [...] patterns, or \"lora\""
                    .into(),
            );
        }
        if self.max_length < 2 {
            return Err(format!("max_length: {} must be at least 2", self.max_length));
        }
        for (i, p) in self.freeze.iter().enumerate() {
            regex_group(p).map_err(|e| format!("freeze[{i}]: {e}"))?;
        }
        let l = &self.lora;
        if l.rank == 0 {
            return Err("lora.rank: must be at least 1".into());
        }
        if !(l.alpha > 0.0 && l.alpha.is_finite()) {
            return Err(format!("lora.alpha: {} must be positive", l.alpha));
        }
        if l.dropout != 0.0 {
            return Err(format!(
                "lora.dropout: {} is not supported: Burn's LoRA reparameterizes the weight (W + scale * A B), \
                 so there is no adapter input to drop; use 0 (head dropout is [head] dropout)",
                l.dropout
            ));
        }
        if self.method == Method::Lora && l.targets.is_empty() {
            return Err("lora.targets: name at least one weight pattern".into());
        }
        for (i, p) in l.targets.iter().enumerate() {
            regex_group(p).map_err(|e| format!("lora.targets[{i}]: {e}"))?;
        }
        if !(0.0..1.0).contains(&self.head.dropout) {
            return Err(format!("head.dropout: {} is not in [0, 1)", self.head.dropout));
        }
        Ok(())
    }

    fn recipe(&self) -> Recipe<'_> {
        Recipe {
            train: &self.train,
            optim: &self.optim,
        }
    }
}

fn regex_group(pattern: &str) -> Result<ParamGroup, String> {
    ParamGroup::from_regex(pattern).map_err(|e| format!("{pattern:?} is not a valid regex: {e:?}"))
}

/// Every parameter path of `model` with its rank.
fn param_paths<M: Module>(model: &M) -> Vec<(String, usize)> {
    model
        .collect(None, None, false)
        .into_iter()
        .map(|t| (t.name.clone(), t.shape.as_slice().len()))
        .collect()
}

/// Fail unless `pattern` (config key `key`) matches one of `paths`.
fn ensure_matches(key: String, pattern: &str, paths: &[String]) -> Result<(), RunError> {
    let re = regex::Regex::new(pattern).expect("validated at load");
    if paths.iter().any(|p| re.is_match(p)) {
        return Ok(());
    }
    let shown: Vec<&str> = paths.iter().map(String::as_str).take(12).collect();
    Err(RunError::RunDir {
        path: FINETUNE_FILE.into(),
        message: format!(
            "{key}: {pattern:?} matches no parameter of this model (parameters: {}{})",
            shown.join(", "),
            if paths.len() > shown.len() { ", ..." } else { "" }
        ),
    })
}

/// Freeze, attach adapters and set per-group rates as `cfg` asks. `head` is the pattern
/// of the task head's parameters (always trained), if the model has one.
pub fn apply_method<M: Module>(model: M, cfg: &FinetuneConfig, head: Option<&str>) -> Result<M, RunError> {
    let all = param_paths(&model);
    let paths: Vec<String> = all.iter().map(|(p, _)| p.clone()).collect();
    let matrices: Vec<String> = all.iter().filter(|(_, r)| *r == 2).map(|(p, _)| p.clone()).collect();
    for (i, p) in cfg.freeze.iter().enumerate() {
        ensure_matches(format!("freeze[{i}]"), p, &paths)?;
    }
    for (i, g) in cfg.optim.groups.iter().enumerate() {
        ensure_matches(format!("optim.groups[{i}].pattern"), &g.pattern, &paths)?;
    }
    let head_group = head.map(|h| regex_group(h).expect("a valid pattern"));
    let model = match cfg.method {
        Method::Full => model,
        Method::Frozen => {
            let head_group = head_group.clone().expect("validated: frozen needs a head");
            model.set_require_grad_group(ParamGroup::all().exclude(head_group), false)
        }
        Method::Lora => {
            for (i, p) in cfg.lora.targets.iter().enumerate() {
                ensure_matches(format!("lora.targets[{i}]"), p, &matrices)?;
            }
            let mut targets = ParamGroup::from_any_regexes(cfg.lora.targets.clone()).map_err(|e| RunError::RunDir {
                path: FINETUNE_FILE.into(),
                message: format!("lora.targets: {e:?}"),
            })?;
            if let Some(h) = &head_group {
                targets = targets.exclude(h.clone());
            }
            let model = model.apply_lora(Lora::new(cfg.lora.rank, cfg.lora.alpha).set_param_group(targets));
            match &head_group {
                Some(h) => model.set_require_grad_group(h.clone(), true),
                None => model,
            }
        }
    };
    Ok(if cfg.freeze.is_empty() {
        model
    } else {
        let frozen = ParamGroup::from_any_regexes(cfg.freeze.clone()).expect("validated at load");
        model.set_require_grad_group(frozen, false)
    })
}

/// Parameters that train (require gradients), in elements.
pub fn trainable_params<M: Module>(model: &M) -> usize {
    struct Count(usize);
    impl ModuleVisitor for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let t = param.base();
            if t.is_require_grad() {
                self.0 += t.shape().num_elements();
            }
        }
    }
    let mut count = Count(0);
    model.visit(&mut count);
    count.0
}

/// What a finished fine-tuning run reports (`finetune.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneReport {
    pub task: FinetuneTask,
    pub method: Method,
    pub init_from: PathBuf,
    pub trainable_params: usize,
    pub total_params: usize,
    pub train: TrainSummary,
    /// Validation loss (and accuracy) of the starting point: the pretrained model with
    /// the new head (zero: uniform predictions) or the base language model. Not measured
    /// again by a resumed run.
    pub initial_val_loss: Option<f64>,
    pub initial_val_accuracy: Option<f64>,
    /// Optimizer steps in one pass over the training data (classify).
    pub steps_per_epoch: Option<usize>,
    /// Seconds per pass over the training data (classify) at the measured step time
    /// (evaluation excluded).
    pub epoch_time_s: Option<f64>,
    /// Test-split metrics of `best.safetensors` (classify).
    pub test: Option<ClassMetrics>,
    pub labels: Vec<String>,
    /// Texts cut to `max_length`, per split (train, validation, test).
    pub truncated: [usize; 3],
    pub data: Vec<(PathBuf, LoadReport)>,
    /// Peak resident memory of the process (VmHWM), MiB.
    pub peak_rss_mib: Option<f64>,
}

/// Prepare `run_dir` and return the config: a fresh run needs `config` and a directory
/// without a run; `--resume` reads the run's own `finetune.toml` (plus `overrides`).
pub fn prepare_finetune_dir(
    run_dir: &Path,
    config: Option<&FinetuneConfig>,
    resume: bool,
    overrides: &[String],
) -> Result<FinetuneConfig, RunError> {
    crate::run::prepare_dir(run_dir, FINETUNE_FILE, config, resume, |path| {
        FinetuneConfig::load(path, overrides)
    })
}

/// Fine-tune per `cfg` into `options.run_dir`.
pub fn run_finetune(
    cfg: FinetuneConfig,
    backend: &Selected,
    options: &TrainOptions,
) -> Result<FinetuneReport, RunError> {
    let device = backend.device.clone().autodiff();
    let dir = ModelDir::open(&cfg.init_from, WhichWeights::Best)?;
    let ModelFile {
        model: base_model,
        head: base_head,
        quantization,
    } = dir.file.clone();
    if quantization.is_some() {
        return Err(RunError::RunDir {
            path: cfg.init_from.join(CONFIG),
            message: "init_from holds packed (quantized) weights ([quantization]); fine-tuning starts from \
                      f32 weights: convert the original checkpoint without --quantize"
                .into(),
        });
    }
    if base_head.is_some() {
        return Err(RunError::RunDir {
            path: cfg.init_from.join(CONFIG),
            message: "init_from is already a fine-tuned classifier; start from its encoder (the convert output)".into(),
        });
    }
    let tokenizer = match dir.path(TOKENIZER) {
        path if path.is_file() => Some(Tokenizer::load(&path)?),
        _ => None,
    };
    let job = FinetuneJob {
        cfg: &cfg,
        backend,
        options,
        device: device.clone(),
        weights: dir.weights.clone(),
    };
    match cfg.task {
        FinetuneTask::Classify => {
            // The classification head is BERT's (`BertForSequenceClassification`).
            let (ModelConfig::Bert(bert_cfg) | ModelConfig::Roberta(bert_cfg)) = &base_model else {
                return Err(wrong_arch(
                    &cfg.init_from,
                    &base_model,
                    "task = \"classify\" needs an encoder (bert, roberta)",
                ));
            };
            let tokenizer = tokenizer.ok_or_else(|| RunError::RunDir {
                path: cfg.init_from.join(TOKENIZER),
                message: "an encoder directory needs its tokenizer".into(),
            })?;
            let spec = cfg.data.csv_spec().expect("validated: classify takes csv");
            let data = LabeledTexts::load(&spec)?;
            let encode = |examples, path: &Path| {
                EncodedSplit::encode(
                    examples,
                    path,
                    &tokenizer,
                    cfg.max_length.min(bert_cfg.max_positions),
                    cfg.truncation,
                )
            };
            let (train_split, t0) = encode(&data.train, &spec.train)?;
            let (val_split, t1) = encode(&data.validation, &spec.validation)?;
            let (test_split, t2) = encode(&data.test, &spec.test)?;
            let truncated = [t0, t1, t2];
            if options.progress {
                for (path, r) in &data.reports {
                    eprintln!(
                        "{}: {} rows, {} dropped by label, {} empty dropped, {} with undecodable bytes removed, {} with HTML entities unescaped",
                        path.display(),
                        r.rows,
                        r.dropped_label,
                        r.dropped_empty,
                        r.repaired_bytes,
                        r.repaired_entities
                    );
                }
                if truncated.iter().any(|&t| t > 0) {
                    eprintln!(
                        "warning: {truncated:?} texts (train, validation, test) were longer than {} tokens and were cut",
                        cfg.max_length
                    );
                }
            }
            let head = ClassifierHead {
                labels: data.labels.clone(),
                pooling: cfg.head.pooling,
                dropout: cfg.head.dropout,
                max_length: Some(cfg.max_length.min(bert_cfg.max_positions)),
            };
            let t = &cfg.train;
            let task = ClassifyTask::new(train_split, val_split, t.batch_size, t.seed, t.grad_accum_steps);
            let steps_per_epoch = task.steps_per_epoch();
            let bert = seeded_init(t.seed, &device, || bert_cfg.init(&device));
            let bert = load_weights(bert, &dir.weights)?;
            let model = head.init(bert, &device);
            let prepared = Prepared {
                config: run_config(&base_model, &cfg),
                tokenizer: Some(tokenizer),
                labels: Vec::new(),
            };
            let mut report = job.run_with_head(task, model, &prepared, Some(&head))?;
            report.steps_per_epoch = Some(steps_per_epoch);
            report.epoch_time_s = Some(report.train.train_ms_per_step * steps_per_epoch as f64 / 1000.0);
            report.truncated = truncated;
            report.data = data.reports;
            report.labels = data.labels;
            // Score the best checkpoint on the test split.
            let eval_device = device.clone().without_autodiff();
            let best = head.init(bert_cfg.init(&eval_device), &eval_device);
            let best: BertForSequenceClassification = load_weights(best, &options.run_dir.join(BEST_WEIGHTS))?;
            let (probs, _) = predict(&best, &test_split, 64, &eval_device);
            let predicted: Vec<usize> = probs.iter().map(|p| argmax(p)).collect();
            report.test = Some(ClassMetrics::new(&predicted, &test_split.labels, head.labels.len()));
            report.peak_rss_mib = peak_rss_mib();
            write_report(&options.run_dir, &report)?;
            Ok(report)
        }
        FinetuneTask::Lm => {
            if base_model.kind() != ModelKind::CausalLm {
                return Err(wrong_arch(
                    &cfg.init_from,
                    &base_model,
                    "task = \"lm\" needs a language model (gpt2, llama)",
                ));
            }
            let run_cfg = run_config(&base_model, &cfg);
            let mut report = crate::run::with_task(run_cfg, tokenizer, &device, job)?;
            report.peak_rss_mib = peak_rss_mib();
            write_report(&options.run_dir, &report)?;
            Ok(report)
        }
    }
}

fn wrong_arch(dir: &Path, model: &ModelConfig, need: &str) -> RunError {
    RunError::RunDir {
        path: dir.join(CONFIG),
        message: format!("init_from holds a {} model; {need}", model.arch()),
    }
}

/// The `train`-style config of a fine-tuning run (model from `init_from`).
fn run_config(model: &ModelConfig, cfg: &FinetuneConfig) -> RunConfig {
    RunConfig {
        model: model.clone(),
        data: cfg.data.clone(),
        train: cfg.train.clone(),
        optim: cfg.optim.clone(),
    }
}

fn write_report(run_dir: &Path, report: &FinetuneReport) -> Result<(), RunError> {
    let json = serde_json::to_string_pretty(report).expect("report serialises");
    Ok(atomic_write(&run_dir.join(REPORT_FILE), json.as_bytes())?)
}

struct FinetuneJob<'a> {
    cfg: &'a FinetuneConfig,
    backend: &'a Selected,
    options: &'a TrainOptions,
    device: Device,
    weights: PathBuf,
}

impl FinetuneJob<'_> {
    /// Write the run's files, apply the method to `model` (pretrained weights already in
    /// place) and train it.
    fn run_with_head<T: Task>(
        self,
        mut task: T,
        model: T::Model,
        prepared: &Prepared,
        head: Option<&ClassifierHead>,
    ) -> Result<FinetuneReport, RunError> {
        let (cfg, run_dir) = (self.cfg, &self.options.run_dir);
        // LoRA's factors are drawn from the device RNG: seeded, under the RNG lock.
        let model = with_rng_lock(|| {
            self.device
                .seed(kiln_data::SplitMix64::derive(cfg.train.seed, LORA_INIT_STREAM).next_u64());
            apply_method(model, cfg, head.map(|_| HEAD_PATTERN))
        })?;
        let total = model.num_params();
        let trainable = trainable_params(&model);
        let model_file = ModelFile {
            model: prepared.config.model.clone(),
            head: head.cloned(),
            quantization: None,
        };
        atomic_write(&run_dir.join(CONFIG), model_file.to_toml().as_bytes())?;
        let cfg_toml = toml::to_string_pretty(cfg).expect("config serialises");
        atomic_write(&run_dir.join(FINETUNE_FILE), cfg_toml.as_bytes())?;
        if let Some(tok) = &prepared.tokenizer {
            atomic_write(&run_dir.join(TOKENIZER), tok.to_json()?.as_bytes())?;
        }
        // What the pretrained directory says about generation and chat (EOS / end-of-turn
        // ids, the chat template) holds for the fine-tuned model too.
        for name in [GENERATION_CONFIG, TOKENIZER_CONFIG, HF_CONFIG] {
            let from = cfg.init_from.join(name);
            if from.is_file() {
                let bytes = std::fs::read(&from).map_err(kiln_core::io::io_err(&from))?;
                atomic_write(&run_dir.join(name), &bytes)?;
            }
        }
        RunInfo::new(prepared.config.model.arch(), self.backend, total).write(run_dir)?;
        if self.options.progress {
            eprintln!(
                "finetune {:?} {:?} | {} | {} of {} parameters train ({:.2}%) | from {} | {}",
                cfg.task,
                cfg.method,
                self.backend.describe(),
                trainable,
                total,
                100.0 * trainable as f64 / total.max(1) as f64,
                self.weights.display(),
                run_dir.display()
            );
        }
        let initial =
            (!self.options.resume).then(|| task.evaluate(&model.valid(), &self.device.clone().without_autodiff()));
        if let (Some(e), true) = (initial, self.options.progress) {
            let acc = e
                .accuracy
                .map(|a| format!(" | val acc {:.2}%", a * 100.0))
                .unwrap_or_default();
            eprintln!("before fine-tuning: val loss {:.4}{acc}", e.loss);
        }
        let (_, summary) = train(&mut task, model, cfg.recipe(), &self.device, self.options)?;
        Ok(FinetuneReport {
            task: cfg.task,
            method: cfg.method,
            init_from: cfg.init_from.clone(),
            trainable_params: trainable,
            total_params: total,
            train: summary,
            initial_val_loss: initial.map(|e| e.loss),
            initial_val_accuracy: initial.and_then(|e| e.accuracy),
            steps_per_epoch: None,
            epoch_time_s: None,
            test: None,
            labels: Vec::new(),
            truncated: [0; 3],
            data: Vec::new(),
            peak_rss_mib: None,
        })
    }
}

impl crate::run::TaskJob for FinetuneJob<'_> {
    type Output = FinetuneReport;

    /// Language models: load the pretrained weights into the fresh model, then train.
    fn run<T: Task>(self, task: T, model: T::Model, prepared: &Prepared) -> Result<FinetuneReport, RunError> {
        let model = load_weights(model, &self.weights)?;
        self.run_with_head(task, model, prepared, None)
    }
}
