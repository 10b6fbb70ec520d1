//! Kiln's shared runtime: backend/device selection, TOML run configs, checkpoint I/O,
//! metrics and plots, the training loop and text generation. The `train`, `infer`,
//! `finetune` and `convert` binaries are thin layers over this crate.

pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod compare;
pub mod config;
pub mod embed;
pub mod finetune;
pub mod generate;
pub mod metrics;
pub mod optim;
pub mod run;
pub mod task;
pub mod training;

pub use backend::{BackendKind, Selected};
pub use config::RunConfig;
