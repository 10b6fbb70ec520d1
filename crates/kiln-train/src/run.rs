//! From a run config to a trained run directory: prepare the directory, load the data,
//! build the model for the configured architecture, train.
//!
//! Run directory layout:
//! `config.toml` (resolved), `run.json` (backend, device, parameters), `tokenizer.json`
//! (language models), `model.safetensors`, `best.safetensors`, `metrics.jsonl`,
//! `loss.png`, `summary.json`, `checkpoints/` (resumable state).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use kiln_core::config::ConfigError;
use kiln_core::io::atomic_write;
use kiln_core::layout::{CONFIG, LABELS, RunInfo, TOKENIZER};
use kiln_core::rng::seeded_init;
use kiln_core::{Selected, StoreError};
use kiln_data::{DataConfig, ImageDataset, TextDataset, Tokenizer, TokenizerSpec};
use kiln_models::{EncoderArchitecture, FamilyVisitor, ImageArchitecture, LanguageArchitecture};

use crate::checkpoint::CheckpointDir;
use crate::config::RunConfig;
use crate::task::{ImageTask, LmTask, Task};
use crate::training::{TrainOptions, TrainSummary, train};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Train(#[from] crate::training::TrainError),
    #[error(transparent)]
    ModelDir(#[from] kiln_core::layout::ModelDirError),
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
    prepare_dir(run_dir, CONFIG, config, resume, |path| RunConfig::load(path, overrides))
}

/// [`prepare_run_dir`] for any config kept in `run_dir/<saved>`: with `resume` and a
/// saved config, `load` it; else use `config` (required), refusing a directory that
/// already holds a run, and create the directory.
pub fn prepare_dir<C: Clone>(
    run_dir: &Path,
    saved: &str,
    config: Option<&C>,
    resume: bool,
    load: impl FnOnce(&Path) -> Result<C, ConfigError>,
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
    /// Class names of an image classifier (`[data] labels`), saved as `labels.json`.
    pub labels: Vec<String>,
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
/// `train.seed`), and hand both to `job`. The model is built through the architecture
/// registry ([`ModelConfig::visit_family`]), so every architecture of a family is
/// trained by the same code.
pub fn with_task<J: TaskJob>(
    mut cfg: RunConfig,
    tokenizer: Option<Tokenizer>,
    device: &Device,
    job: J,
) -> Result<J::Output, RunError> {
    let data = match cfg.data.clone() {
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
            let context = cfg.model.context_len().ok_or_else(|| wrong_data(&cfg))?;
            let context = cfg.train.lm_context(context).map_err(|message| {
                RunError::Config(ConfigError::Invalid {
                    path: CONFIG.into(),
                    message,
                })
            })?;
            data.check_context(context)?;
            if cfg.model.vocab_size().is_some_and(|v| v != 0 && v != tok.vocab_size()) {
                return Err(RunError::Config(ConfigError::Invalid {
                    path: CONFIG.into(),
                    message: format!(
                        "model.vocab_size = {} but the tokenizer has {} tokens",
                        cfg.model.vocab_size().unwrap_or(0),
                        tok.vocab_size()
                    ),
                }));
            }
            cfg.model.set_vocab_size(tok.vocab_size());
            Loaded::Text(data, tok)
        }
        DataConfig::Idx {
            path,
            max_train,
            max_test,
            ..
        } => Loaded::Images(ImageDataset::load(&path, max_train, max_test)?),
        DataConfig::Csv { .. } => return Err(wrong_data(&cfg)),
    };
    let model = cfg.model.clone();
    model.visit_family(BuildTask { cfg, data, device, job })
}

fn wrong_data(cfg: &RunConfig) -> RunError {
    RunError::RunDir {
        path: CONFIG.into(),
        message: format!(
            "a {} model does not train on this [data] kind (validated configs never get here)",
            cfg.model.arch()
        ),
    }
}

/// Loaded training data, before the model family picks its task.
enum Loaded {
    Text(TextDataset, Tokenizer),
    Images(ImageDataset),
}

/// The registry visitor of [`with_task`]: the family decides the task.
struct BuildTask<'a, J> {
    cfg: RunConfig,
    data: Loaded,
    device: &'a Device,
    job: J,
}

impl<J: TaskJob> FamilyVisitor for BuildTask<'_, J> {
    type Output = Result<J::Output, RunError>;

    fn causal_lm<A: LanguageArchitecture>(self, config: &A) -> Self::Output {
        let Loaded::Text(data, tok) = self.data else {
            return Err(wrong_data(&self.cfg));
        };
        let t = &self.cfg.train;
        let context = t.lm_context(config.context_len()).map_err(|message| {
            RunError::Config(ConfigError::Invalid {
                path: CONFIG.into(),
                message,
            })
        })?;
        let task = LmTask::new(data, t.batch_size, context, t.seed, t.grad_accum_steps, t.eval_iters);
        let model = seeded_init(t.seed, self.device, || config.init(self.device));
        let prepared = Prepared {
            config: self.cfg,
            tokenizer: Some(tok),
            labels: Vec::new(),
        };
        self.job.run(task, model, &prepared)
    }

    fn image_classifier<A: ImageArchitecture>(self, config: &A) -> Self::Output {
        let Loaded::Images(data) = self.data else {
            return Err(wrong_data(&self.cfg));
        };
        let t = &self.cfg.train;
        let task = ImageTask::new(data, t.batch_size, t.seed, t.grad_accum_steps);
        let model = seeded_init(t.seed, self.device, || config.init(self.device));
        let labels = match &self.cfg.data {
            DataConfig::Idx { labels, .. } => labels.clone(),
            _ => Vec::new(),
        };
        let prepared = Prepared {
            config: self.cfg,
            tokenizer: None,
            labels,
        };
        self.job.run(task, model, &prepared)
    }

    fn encoder<A: EncoderArchitecture>(self, _config: &A) -> Self::Output {
        // Encoders train through `finetune` (a task head on a pretrained encoder).
        Err(wrong_data(&self.cfg))
    }
}

/// Train the configured model on the configured data into `options.run_dir`.
pub fn run_training(cfg: RunConfig, backend: &Selected, options: &TrainOptions) -> Result<TrainSummary, RunError> {
    let device = backend.device.clone().autodiff();
    // A resumed run keeps its tokenizer (a retrained BPE could differ).
    let tokenizer_path = options.run_dir.join(TOKENIZER);
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
        atomic_write(&run_dir.join(CONFIG), cfg.to_toml().as_bytes())?;
        if let Some(tok) = &prepared.tokenizer {
            atomic_write(&run_dir.join(TOKENIZER), tok.to_json()?.as_bytes())?;
        }
        if !prepared.labels.is_empty() {
            let json = serde_json::to_string_pretty(&prepared.labels).expect("serialises");
            atomic_write(&run_dir.join(LABELS), json.as_bytes())?;
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
