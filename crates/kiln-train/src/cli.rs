//! The command-line arguments every training binary (`train`, `finetune`) shares.

use std::path::PathBuf;

use crate::training::TrainOptions;
use kiln_core::backend::{BackendError, BackendKind, Selected, set_cpu_threads};

/// `--config`, `--backend`, `--device`, `--out`, `--set`, `--resume`, `--quiet`
/// (flattened into each binary's own clap parser).
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Config (TOML). Not needed with --resume when the run directory has one.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// flex | ndarray | wgpu | tch | tch-cuda
    #[arg(long, default_value = "flex")]
    pub backend: BackendKind,
    /// Device index (GPU backends).
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Run directory (default: runs/<config file stem>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override a config key: --set train.max_steps=200 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// No progress bar or evaluation lines.
    #[arg(long)]
    pub quiet: bool,
    /// CPU threads for the backend (rayon for flex/ndarray, libtorch's intra-op pool for
    /// tch). Default: one per core.
    #[arg(long)]
    pub threads: Option<std::num::NonZeroUsize>,
}

impl RunArgs {
    /// `--out`, else `runs/<config file stem>`.
    pub fn run_dir(&self) -> Result<PathBuf, String> {
        match (&self.out, &self.config) {
            (Some(out), _) => Ok(out.clone()),
            (None, Some(path)) => path
                .file_stem()
                .map(|stem| PathBuf::from("runs").join(stem))
                .ok_or_else(|| format!("{}: the config path has no file name", path.display())),
            (None, None) => Err("pass --config (and --out to choose the run directory)".into()),
        }
    }

    /// The selected backend and device, announced on stderr with the run directory.
    pub fn select(&self, run_dir: &std::path::Path) -> Result<Selected, BackendError> {
        if let Some(n) = self.threads {
            set_cpu_threads(n).map_err(BackendError::Threads)?;
        }
        let backend = Selected::new(self.backend, self.device)?;
        eprintln!("{} | run directory {}", backend.describe(), run_dir.display());
        Ok(backend)
    }

    pub fn options(&self, run_dir: PathBuf) -> TrainOptions {
        TrainOptions {
            run_dir,
            resume: self.resume,
            progress: !self.quiet,
        }
    }
}
