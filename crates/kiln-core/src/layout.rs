//! The model/run directory format, every file name defined once.
//!
//! A *model directory* is what `infer`, `finetune`, `convert --to hf` and `serve` take:
//! a training run, a fine-tuning run or a `convert` output. It holds at least
//! [`CONFIG`] (its `[model]` section, see [`ModelFile`](crate::ModelFile)) and
//! [`MODEL_WEIGHTS`]; a language model or encoder also [`TOKENIZER`]. A training run
//! adds [`RUN_INFO`], [`BEST_WEIGHTS`], [`METRICS`], the plots, [`SUMMARY`] and
//! [`CHECKPOINTS`].

use std::path::{Path, PathBuf};

use crate::config::{ConfigError, ModelFile};

/// The resolved config (`[model]`, and for a training run `[data]`, `[train]`, `[optim]`).
pub const CONFIG: &str = "config.toml";
/// The tokenizer of a language model or encoder (Hugging Face `tokenizer.json` format).
pub const TOKENIZER: &str = "tokenizer.json";
/// Backend, device and parameter count of a training run.
pub const RUN_INFO: &str = "run.json";
/// The latest weights (adapters merged).
pub const MODEL_WEIGHTS: &str = "model.safetensors";
/// The weights with the best validation loss.
pub const BEST_WEIGHTS: &str = "best.safetensors";
/// One JSON object per evaluation.
pub const METRICS: &str = "metrics.jsonl";
/// The end-of-run summary.
pub const SUMMARY: &str = "summary.json";
/// The loss curves.
pub const LOSS_PLOT: &str = "loss.png";
/// The accuracy curve of a classifier.
pub const ACCURACY_PLOT: &str = "accuracy.png";
/// Resumable checkpoints (model, optimizer and loop state).
pub const CHECKPOINTS: &str = "checkpoints";
/// Class names of an image classifier, one JSON array (index = class id).
pub const LABELS: &str = "labels.json";
/// A Hugging Face `config.json` kept from a converted checkpoint.
pub const HF_CONFIG: &str = "config.json";
/// A Hugging Face `generation_config.json` kept from a converted checkpoint.
pub const GENERATION_CONFIG: &str = "generation_config.json";
/// Hugging Face tokenizer settings beside `tokenizer.json`: the chat template, the
/// special tokens, `add_bos_token`.
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// Which weights of a model directory to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhichWeights {
    /// [`BEST_WEIGHTS`] when present, else [`MODEL_WEIGHTS`].
    #[default]
    Best,
    /// [`MODEL_WEIGHTS`] (the latest).
    Latest,
}

/// A model directory, opened: its `[model]` section and the weights file to load.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub dir: PathBuf,
    pub file: ModelFile,
    pub weights: PathBuf,
}

/// A directory that is not a usable model directory; names the path.
#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    #[error("{path}: {message}")]
    Missing { path: PathBuf, message: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl ModelDir {
    /// Open `dir`: read and validate its [`CONFIG`] and find its weights.
    pub fn open(dir: &Path, which: WhichWeights) -> Result<Self, ModelDirError> {
        if !dir.is_dir() {
            return Err(ModelDirError::Missing {
                path: dir.to_path_buf(),
                message: "no such model directory".into(),
            });
        }
        let file = ModelFile::load(&dir.join(CONFIG))?;
        let weights = weights_file(dir, which);
        if !weights.is_file() {
            return Err(ModelDirError::Missing {
                path: weights,
                message: "no weights in this model directory".into(),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            file,
            weights,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The weights file of `dir`: [`BEST_WEIGHTS`] when asked for and present, else
/// [`MODEL_WEIGHTS`] (which may not exist; the caller reports it).
pub fn weights_file(dir: &Path, which: WhichWeights) -> PathBuf {
    let best = dir.join(BEST_WEIGHTS);
    if which == WhichWeights::Best && best.is_file() {
        best
    } else {
        dir.join(MODEL_WEIGHTS)
    }
}

/// [`RUN_INFO`]: recorded when a run starts.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    pub fn new(arch: &str, backend: &crate::Selected, num_params: usize) -> Self {
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

    /// Write [`RUN_INFO`] into `run_dir`, atomically.
    pub fn write(&self, run_dir: &Path) -> Result<(), crate::StoreError> {
        let json = serde_json::to_string_pretty(self).expect("serialises");
        crate::atomic_write(&run_dir.join(RUN_INFO), json.as_bytes())
    }
}
