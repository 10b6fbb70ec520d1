//! Kiln's training: TOML run configs, the training loop (restore, step, evaluate,
//! checkpoint), AdamW, the tasks (language modelling, image and text classification),
//! fine-tuning (full, frozen, LoRA), metrics, plots and run comparison. The `train` and
//! `finetune` binaries are thin layers over this crate.

pub mod checkpoint;
pub mod cli;
pub mod compare;
pub mod config;
pub mod finetune;
pub mod metrics;
pub mod optim;
pub mod run;
pub mod task;
pub mod training;

pub use config::RunConfig;
