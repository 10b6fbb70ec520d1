//! From a run config to a trained run directory: prepare the directory, load the data,
//! build the model for the configured architecture, train.
//!
//! Run directory layout:
//! `config.toml` (resolved), `run.json` (backend, device, parameters), `tokenizer.json`
//! (language models), `model.safetensors`, `best.safetensors`, `metrics.jsonl`,
//! `loss.png`, `summary.json`, `checkpoints/` (resumable state).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use kiln_data::{DataConfig, ImageDataset, TextDataset, Tokenizer, TokenizerSpec};
use kiln_models::{ModelConfig, ModelKind};
use serde::{Deserialize, Serialize};

use crate::backend::Selected;
use crate::checkpoint::{CheckpointDir, atomic_write, load_weights};
use crate::config::RunConfig;
use crate::task::{ImageTask, LmTask, Task};
use crate::training::{TrainOptions, TrainSummary, train};

pub const CONFIG_FILE: &str = "config.toml";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const RUN_INFO_FILE: &str = "run.json";

/// Recorded in `run.json` at start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub arch: String,
    pub backend: String,
    pub device: String,
    pub device_index: usize,
    /// CPU threads of the backend's pool (see `--threads`).
    #[serde(default)]
    pub cpu_threads: usize,
    pub num_params: usize,
    pub kiln_version: String,
}

impl RunInfo {
    pub fn new(arch: &str, backend: &Selected, num_params: usize) -> Self {
        Self {
            arch: arch.into(),
            backend: backend.backend.to_string(),
            device: format!("{:?}", backend.device),
            device_index: backend.index,
            cpu_threads: backend.cpu_threads(),
            num_params,
            kiln_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// Write `run.json` into `run_dir`, atomically.
    pub fn write(&self, run_dir: &Path) -> Result<(), crate::checkpoint::CheckpointError> {
        let json = serde_json::to_string_pretty(self).expect("serialises");
        atomic_write(&run_dir.join(RUN_INFO_FILE), json.as_bytes())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error(transparent)]
    Train(#[from] crate::training::TrainError),
    #[error("{path}: {message}")]
    RunDir { path: PathBuf, message: String },
}

/// Prepare `run_dir` and return the config to use. A fresh run refuses a directory
/// that already holds a run; `--resume` reads the run's own `config.toml` (plus
/// `overrides`, e.g. a larger `train.max_steps`).
pub fn prepare_run_dir(
    run_dir: &Path,
    config: Option<&RunConfig>,
    resume: bool,
    overrides: &[String],
) -> Result<RunConfig, RunError> {
    prepare_dir(run_dir, CONFIG_FILE, config, resume, |path| {
        RunConfig::load(path, overrides)
    })
}

/// [`prepare_run_dir`] for any config kept in `run_dir/<saved>`: with `resume` and a
/// saved config, `load` it; else use `config` (required), refusing a directory that
/// already holds a run, and create the directory.
pub fn prepare_dir<C: Clone>(
    run_dir: &Path,
    saved: &str,
    config: Option<&C>,
    resume: bool,
    load: impl FnOnce(&Path) -> Result<C, crate::config::ConfigError>,
) -> Result<C, RunError> {
    let saved = run_dir.join(saved);
    if resume && saved.exists() {
        return Ok(load(&saved)?);
    }
    let config = config.ok_or_else(|| RunError::RunDir {
        path: saved.clone(),
        message: "no config to resume from; pass --config".into(),
    })?;
    if !resume && (saved.exists() || CheckpointDir::new(run_dir).latest()?.is_some()) {
        return Err(RunError::RunDir {
            path: run_dir.to_path_buf(),
            message: "already holds a run: pass --resume to continue it, or choose another --out".into(),
        });
    }
    std::fs::create_dir_all(run_dir).map_err(|e| RunError::RunDir {
        path: run_dir.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(config.clone())
}

/// The config with everything resolved (e.g. the vocabulary size) and the tokenizer of
/// a language model, as handed to a [`TaskJob`].
pub struct Prepared {
    pub config: RunConfig,
    pub tokenizer: Option<Tokenizer>,
}

/// Something to do with the configured task and a fresh model of the configured
/// architecture: train it, benchmark it, ... One generic method instead of one match
/// over architectures per use.
pub trait TaskJob {
    type Output;
    fn run<T: Task>(self, task: T, model: T::Model, prepared: &Prepared) -> Result<Self::Output, RunError>;
}

/// Load the configured data (tokenized with `tokenizer` when given, else with the one
/// the config asks for), build the task and the model on `device` (seeded with
/// `train.seed`), and hand both to `job`.
pub fn with_task<J: TaskJob>(
    mut cfg: RunConfig,
    tokenizer: Option<Tokenizer>,
    device: &Device,
    job: J,
) -> Result<J::Output, RunError> {
    let t = cfg.train.clone();
    match cfg.data.clone() {
        DataConfig::Text {
            path,
            tokenizer: spec,
            val_fraction,
        } => {
            let (data, tok) = match tokenizer {
                Some(tok) => (TextDataset::load_with(&path, &tok, val_fraction)?, tok),
                None => {
                    let spec = TokenizerSpec::parse(&spec).map_err(|message| kiln_data::DataError::Config {
                        key: "tokenizer",
                        message,
                    })?;
                    TextDataset::load(&path, &spec, val_fraction)?
                }
            };
            let context = cfg.model.context_len().expect("language model");
            data.check_context(context)?;
            if cfg.model.vocab_size().is_some_and(|v| v != 0 && v != tok.vocab_size()) {
                return Err(RunError::Config(crate::config::ConfigError::Invalid {
                    path: CONFIG_FILE.into(),
                    message: format!(
                        "model.vocab_size = {} but the tokenizer has {} tokens",
                        cfg.model.vocab_size().unwrap_or(0),
                        tok.vocab_size()
                    ),
                }));
            }
            cfg.model.set_vocab_size(tok.vocab_size());
            let (b, seed, accum, iters) = (t.batch_size, t.seed, t.grad_accum_steps, t.eval_iters);
            let model = cfg.model.clone();
            let prepared = Prepared {
                config: cfg,
                tokenizer: Some(tok),
            };
            match model {
                ModelConfig::Gpt2(m) => job.run(
                    LmTask::new(data, b, context, seed, accum, iters),
                    seeded_init(t.seed, device, || m.init(device)),
                    &prepared,
                ),
                ModelConfig::Llama(m) => job.run(
                    LmTask::new(data, b, context, seed, accum, iters),
                    seeded_init(t.seed, device, || m.init(device)),
                    &prepared,
                ),
                _ => unreachable!("validated: language models take text data"),
            }
        }
        DataConfig::Idx {
            path,
            max_train,
            max_test,
        } => {
            let data = ImageDataset::load(&path, max_train, max_test)?;
            let model = cfg.model.clone();
            let prepared = Prepared {
                config: cfg,
                tokenizer: None,
            };
            match model {
                ModelConfig::Mlp(m) => job.run(
                    ImageTask::new(data, t.batch_size, t.seed, t.grad_accum_steps),
                    seeded_init(t.seed, device, || m.init(device)),
                    &prepared,
                ),
                ModelConfig::Cnn(m) => job.run(
                    ImageTask::new(data, t.batch_size, t.seed, t.grad_accum_steps),
                    seeded_init(t.seed, device, || m.init(device)),
                    &prepared,
                ),
                _ => unreachable!("validated: image models take idx data"),
            }
        }
        DataConfig::Csv { .. } => unreachable!("validated: `train` refuses labelled-text data"),
    }
}

/// Run `f` holding the process-wide lock on the devices' random number generators.
/// Burn's RNG is global per backend: whatever seeds it and then draws from it (model
/// initialisation, a training step's dropout, LoRA's factors) holds this lock, so that
/// another thread of the process (e.g. tests in parallel) cannot reseed it or draw from
/// it in between, and every run stays reproducible. Not reentrant.
pub fn with_rng_lock<R>(f: impl FnOnce() -> R) -> R {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    f()
}

/// Initialise a model from `seed`, reproducibly even while other threads of the process
/// use the device's (process-wide) RNG: seeding and drawing every parameter happen under
/// [`with_rng_lock`]. Parameters are lazy in Burn, so each is read once here to draw it now.
pub fn seeded_init<M: burn::module::Module>(seed: u64, device: &Device, init: impl FnOnce() -> M) -> M {
    use burn::module::{ModuleVisitor, Param};
    use burn::tensor::Tensor;
    struct Materialize;
    impl ModuleVisitor for Materialize {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    with_rng_lock(|| {
        device.seed(seed);
        let model = init();
        model.visit(&mut Materialize);
        model
    })
}

/// Train the configured model on the configured data into `options.run_dir`.
pub fn run_training(cfg: RunConfig, backend: &Selected, options: &TrainOptions) -> Result<TrainSummary, RunError> {
    let device = backend.device.clone().autodiff();
    // A resumed run keeps its tokenizer (a retrained BPE could differ).
    let tokenizer_path = options.run_dir.join(TOKENIZER_FILE);
    let tokenizer = if options.resume && tokenizer_path.exists() {
        Some(Tokenizer::load(&tokenizer_path)?)
    } else {
        None
    };
    with_task(
        cfg,
        tokenizer,
        &device,
        TrainJob {
            backend,
            options,
            device: device.clone(),
        },
    )
}

struct TrainJob<'a> {
    backend: &'a Selected,
    options: &'a TrainOptions,
    device: Device,
}

impl TaskJob for TrainJob<'_> {
    type Output = TrainSummary;

    fn run<T: Task>(self, mut task: T, model: T::Model, prepared: &Prepared) -> Result<TrainSummary, RunError> {
        let (cfg, run_dir) = (&prepared.config, &self.options.run_dir);
        let num_params = burn::module::Module::num_params(&model);
        atomic_write(&run_dir.join(CONFIG_FILE), cfg.to_toml().as_bytes())?;
        if let Some(tok) = &prepared.tokenizer {
            atomic_write(&run_dir.join(TOKENIZER_FILE), tok.to_json()?.as_bytes())?;
        }
        RunInfo::new(cfg.model.arch(), self.backend, num_params).write(run_dir)?;
        if self.options.progress {
            let params = num_params as f64 / 1e6;
            let (arch, backend) = (cfg.model.arch(), self.backend.describe());
            eprintln!("{arch} | {backend} | {params:.2}M parameters | {}", run_dir.display());
        }
        Ok(train(&mut task, model, cfg.recipe(), &self.device, self.options)?.1)
    }
}

/// The `[model]` section of a `config.toml`: all a model directory needs (a training
/// run's config has more sections, a converted model's has only this one).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelFile {
    pub model: ModelConfig,
    /// The classification head of a fine-tuned classifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<kiln_models::ClassifierHead>,
}

impl ModelFile {
    pub fn load(path: &Path) -> Result<Self, crate::config::ConfigError> {
        let text = crate::config::read_text(path)?;
        let file: Self = toml::from_str(&text).map_err(|e| crate::config::ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let invalid = |e: kiln_models::ConfigError| crate::config::ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        file.model.validate().map_err(invalid)?;
        if let Some(head) = &file.head {
            head.validate().map_err(invalid)?;
        }
        Ok(file)
    }
}

/// A model directory opened for inference: a training run, or the output of `convert`.
pub struct LoadedRun {
    pub dir: PathBuf,
    pub model: ModelConfig,
    pub head: Option<kiln_models::ClassifierHead>,
    pub tokenizer: Option<Tokenizer>,
    pub weights: PathBuf,
}

impl LoadedRun {
    /// Open `dir`: its `config.toml`, its tokenizer (language models) and the weights
    /// file (`best.safetensors` unless `latest`, falling back to `model.safetensors`).
    pub fn open(dir: &Path, latest: bool) -> Result<Self, RunError> {
        if !dir.is_dir() {
            return Err(RunError::RunDir {
                path: dir.to_path_buf(),
                message: "no such run directory".into(),
            });
        }
        let ModelFile { model, head } = ModelFile::load(&dir.join(CONFIG_FILE))?;
        let tokenizer = match model.kind() {
            ModelKind::CausalLm | ModelKind::Encoder => Some(Tokenizer::load(&dir.join(TOKENIZER_FILE))?),
            ModelKind::ImageClassifier => None,
        };
        let best = dir.join("best.safetensors");
        let weights = if !latest && best.exists() {
            best
        } else {
            dir.join("model.safetensors")
        };
        if !weights.exists() {
            return Err(RunError::RunDir {
                path: weights,
                message: "no weights in this run directory".into(),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            model,
            head,
            tokenizer,
            weights,
        })
    }

    /// Build the model on `device` and load the weights, checking every name and shape.
    pub fn load_model<M: burn::module::Module>(&self, init: impl FnOnce() -> M) -> Result<M, RunError> {
        Ok(load_weights(init(), &self.weights)?)
    }
}
